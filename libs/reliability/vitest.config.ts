import { defineProject } from 'vitest/config';

export default defineProject({
  resolve: { conditions: ['@periscope/source'] },
  ssr: { resolve: { conditions: ['@periscope/source'] } },
  test: { name: 'reliability', include: ['test/**/*.test.ts', 'src/**/*.test.ts'], environment: 'node', testTimeout: 20_000 },
});
