#!/usr/bin/env node
// Makes sure Debian's Chromium is installed for the dashboard's browser tests (playwright-core drives it;
// `npx playwright install` would download a browser, which this project never does).
// If `chromium` (or PERISCOPE_CHROMIUM) is not found, runs `apt-get install -y chromium`
// non-interactively (through sudo when not root). Prints the executable path; exit 1 if it cannot.
// Usage: node scripts/ensure-chromium.mjs      — or import { ensureChromium } from it.
import { spawnSync } from 'node:child_process';
import { accessSync, constants } from 'node:fs';
import { delimiter, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const NAMES = ['chromium', 'chromium-browser'];

/** The Chromium executable on PATH (or PERISCOPE_CHROMIUM), or undefined. */
export function findChromium() {
  const explicit = process.env.PERISCOPE_CHROMIUM;
  if (explicit) return explicit;
  for (const dir of (process.env.PATH ?? '').split(delimiter)) {
    for (const n of NAMES) {
      const p = join(dir || '.', n);
      try {
        accessSync(p, constants.X_OK);
        return p;
      } catch {
        /* next */
      }
    }
  }
  return undefined;
}

/** Finds Chromium, installing Debian's package when missing. Returns its path; throws if impossible. */
export function ensureChromium(log = (m) => process.stderr.write(`${m}\n`)) {
  let found = findChromium();
  if (found) return found;
  const root = typeof process.getuid === 'function' && process.getuid() === 0;
  const sudo = root ? [] : ['sudo', '-n'];
  const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
  const run = (args) => {
    log(`ensure-chromium: ${args.join(' ')}`);
    const [cmd, ...rest] = [...sudo, ...args];
    return spawnSync(cmd, rest, { stdio: ['ignore', 'inherit', 'inherit'], env }).status === 0;
  };
  if (!run(['apt-get', 'install', '-y', '--no-install-recommends', 'chromium'])) {
    run(['apt-get', 'update']);
    run(['apt-get', 'install', '-y', '--no-install-recommends', 'chromium']);
  }
  found = findChromium();
  if (!found) throw new Error('chromium is not installed and `apt-get install -y chromium` did not install it (needs root or passwordless sudo); set PERISCOPE_CHROMIUM to a Chromium binary');
  return found;
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  try {
    process.stdout.write(`${ensureChromium()}\n`);
  } catch (e) {
    process.stderr.write(`${e.message}\n`);
    process.exit(1);
  }
}
