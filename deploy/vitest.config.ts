import { defineProject } from 'vitest/config';

export default defineProject({
  resolve: { conditions: ['@periscope/source'] },
  ssr: { resolve: { conditions: ['@periscope/source'] } },
  test: {
    name: 'deploy',
    include: ['test/**/*.test.ts'],
    environment: 'node',
    testTimeout: 60_000,
    hookTimeout: 60_000,
  },
});
