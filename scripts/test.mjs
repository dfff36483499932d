#!/usr/bin/env node
// `npm test`: lint the protos, run every vitest project once, and print the closing line
// `N passed, N failed` that CI reads (vitest's own summary is not one CI knows).
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, rmSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const env = { ...process.env, NX_NO_CLOUD: 'true', NX_DAEMON: 'false' };

let lintFailed = 0;
if (existsSync(join(root, 'buf.yaml'))) {
  console.log('periscope: buf lint');
  const buf = spawnSync(join(root, 'node_modules/.bin/buf'), ['lint'], { cwd: root, stdio: 'inherit', env });
  if (buf.status !== 0) lintFailed = 1;
}

mkdirSync(join(root, 'test-results'), { recursive: true });
const out = join(root, 'test-results', 'vitest.json');
rmSync(out, { force: true });
const vitest = join(root, 'node_modules/vitest/vitest.mjs');
const args = [vitest, 'run', '--reporter=default', '--reporter=json', `--outputFile.json=${out}`, ...process.argv.slice(2)];
const r = spawnSync(process.execPath, args, { cwd: root, stdio: 'inherit', env });

let passed = 0;
let failed = lintFailed;
let skipped = 0;
if (existsSync(out)) {
  const report = JSON.parse(readFileSync(out, 'utf8'));
  passed += report.numPassedTests ?? 0;
  failed += report.numFailedTests ?? 0;
  skipped += (report.numPendingTests ?? 0) + (report.numTodoTests ?? 0);
  if ((report.numFailedTestSuites ?? 0) > 0 && (report.numFailedTests ?? 0) === 0) failed += report.numFailedTestSuites;
} else {
  failed += 1;
}
if (r.status !== 0 && failed === 0) failed = 1;
console.log(`\n${passed} passed, ${failed} failed${skipped ? `, ${skipped} skipped` : ''}`);
process.exit(failed === 0 ? 0 : 1);
