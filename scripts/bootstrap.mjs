#!/usr/bin/env node
// Before `npm start` / `npm test`: install dependencies if this is a fresh clone, then build.
import { existsSync, statSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const run = (cmd, args) => {
  const r = spawnSync(cmd, args, { cwd: root, stdio: 'inherit', env: process.env });
  if (r.status !== 0) {
    console.error(`periscope: '${cmd} ${args.join(' ')}' failed (exit ${r.status ?? r.signal})`);
    process.exit(r.status ?? 1);
  }
};
const marker = join(root, 'node_modules', '.package-lock.json');
const stale = !existsSync(marker) || statSync(join(root, 'package-lock.json')).mtimeMs > statSync(marker).mtimeMs;
if (stale) {
  console.log('periscope: installing dependencies (npm ci)…');
  run('npm', ['ci', '--no-audit', '--no-fund']);
}
console.log('periscope: building (nx run-many -t build)…');
run(process.execPath, [join(root, 'scripts/nx.mjs'), 'run-many', '-t', 'build']);
// The embedded database's initdb template (libs/analysis/src/pglite-template.ts): made once per machine and
// PGlite version, so the demo's analysis and the tests' PGlite databases start without running initdb.
const { pgliteTemplatePath } = await import('../libs/analysis/dist/pglite-template.js');
const template = pgliteTemplatePath();
if (template && !existsSync(template)) {
  console.log('periscope: preparing the embedded database template (once)…');
  const { openDb } = await import('../libs/analysis/dist/db.js');
  await (await openDb('pglite:memory')).close();
}
