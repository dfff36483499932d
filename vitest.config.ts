import { defineConfig } from 'vitest/config';

// One vitest run over every project (each has its own vitest.config.ts with `defineProject`).
export default defineConfig({
  test: {
    projects: ['libs/*/vitest.config.ts', 'apps/*/vitest.config.ts', 'deploy/vitest.config.ts', 'bench/vitest.config.ts'],
    testTimeout: 30_000,
    hookTimeout: 30_000,
  },
});
