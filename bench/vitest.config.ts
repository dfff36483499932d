import { defineProject } from 'vitest/config';

// The benchmark suite's own checks (bench/test): the --short run produces every figure and a file that
// validates against bench/schema.json; bench:check detects a regression; the committed results and the
// docs table agree. `npm test` runs this project with the others.
export default defineProject({
  test: { name: 'bench', root: import.meta.dirname, include: ['test/**/*.test.mjs'], environment: 'node', testTimeout: 600_000, hookTimeout: 600_000 },
});
