import { defineProject } from 'vitest/config';

export default defineProject({
  resolve: { conditions: ['@periscope/source'] },
  ssr: { resolve: { conditions: ['@periscope/source'] } },
  test: { name: 'cli', include: ['test/**/*.test.ts'], environment: 'node', testTimeout: 20_000, hookTimeout: 20_000 },
});
