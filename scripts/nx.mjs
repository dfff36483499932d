#!/usr/bin/env node
// Run nx offline and daemon-less, the same way locally and in CI (see shared/notes/toolchain.md).
import { spawnSync } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const nxBin = join(dirname(fileURLToPath(import.meta.url)), '../node_modules/nx/dist/bin/nx.js');
const env = { ...process.env, NX_NO_CLOUD: 'true', NX_DAEMON: 'false', NX_TUI: 'false' };
const r = spawnSync(process.execPath, [nxBin, ...process.argv.slice(2), '--outputStyle=static'], { stdio: 'inherit', env });
process.exit(r.status ?? 1);
