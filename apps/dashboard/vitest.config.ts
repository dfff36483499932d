import { defineProject } from 'vitest/config';

export default defineProject({
  resolve: { conditions: ['@periscope/source'] },
  ssr: { resolve: { conditions: ['@periscope/source'] } },
  test: { name: 'dashboard', include: ['test/**/*.test.ts'], exclude: ['test/**/*.bench.test.ts'], environment: 'node', testTimeout: 60_000, hookTimeout: 120_000, fileParallelism: false },
});
