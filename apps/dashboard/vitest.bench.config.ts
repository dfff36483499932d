import { defineProject } from 'vitest/config';

// `npm run bench -w @periscope/dashboard`: 1,000 VMs, fleet first paint and alert drill-down (docs/benchmarks.md).
export default defineProject({
  resolve: { conditions: ['@periscope/source'] },
  ssr: { resolve: { conditions: ['@periscope/source'] } },
  test: { name: 'dashboard-bench', root: import.meta.dirname, include: ['test/**/*.bench.test.ts'], environment: 'node', testTimeout: 300_000, hookTimeout: 300_000 },
});
