import { defineProject } from 'vitest/config';

export default defineProject({
  resolve: { conditions: ['@periscope/source'] },
  ssr: { resolve: { conditions: ['@periscope/source'] } },
  test: { name: 'fuzz', include: ['test/**/*.test.ts', 'src/**/*.test.ts'], environment: 'node', testTimeout: 20_000 },
});
