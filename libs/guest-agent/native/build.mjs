#!/usr/bin/env node
// Builds the /dev/kvmmem addon (kvmmem.node) with node-gyp against the headers of the running Node
// (`<prefix>/include/node`, as installed with Node: nothing is downloaded). Run by the package's `build`
// script (so `npm test` on a fresh clone builds it: bootstrap → npm ci → nx build). Skips the work when
// the addon is newer than its sources.
import { existsSync, statSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const out = join(here, 'build', 'Release', 'kvmmem.node');
const sources = ['kvmmem.cc', 'binding.gyp'].map((f) => join(here, f));
if (existsSync(out) && sources.every((s) => statSync(s).mtimeMs <= statSync(out).mtimeMs) && !process.argv.includes('--force')) {
  process.exit(0);
}
const nodedir = process.env.npm_config_nodedir || resolve(dirname(process.execPath), '..');
if (!existsSync(join(nodedir, 'include', 'node', 'node_api.h'))) {
  console.error(`kvmmem addon: no Node headers under ${nodedir}/include/node; set npm_config_nodedir to the Node install prefix`);
  process.exit(1);
}
// node-gyp: the one on PATH (npm puts its bundled copy there for scripts), else npm's bundled copy.
const candidates = [];
if (process.env.npm_execpath) candidates.push(join(dirname(process.env.npm_execpath), '..', 'node_modules', 'node-gyp', 'bin', 'node-gyp.js'));
candidates.push(join(dirname(process.execPath), '..', 'lib', 'node_modules', 'npm', 'node_modules', 'node-gyp', 'bin', 'node-gyp.js'));
const gypJs = candidates.find((c) => existsSync(c));
const [cmd, args] = gypJs ? [process.execPath, [gypJs]] : ['node-gyp', []];
const r = spawnSync(cmd, [...args, 'rebuild', `--nodedir=${nodedir}`, '--loglevel=warn'], {
  cwd: here,
  stdio: 'inherit',
  env: { ...process.env, npm_config_nodedir: nodedir },
});
if (r.status !== 0) {
  console.error(`kvmmem addon: node-gyp failed (exit ${r.status ?? r.signal})`);
  process.exit(r.status ?? 1);
}
