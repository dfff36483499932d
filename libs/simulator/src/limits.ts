/**
 * File-descriptor limit: every simulated VM holds one socket. Node cannot call setrlimit(2) on itself,
 * so we read `/proc/self/limits`, try to raise the soft limit up to the hard limit with util-linux
 * `prlimit --pid <self>` (allowed without privileges), re-read, and otherwise fail with a clear message.
 */
import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';

import { SimError } from './errors.js';

export interface FdLimit {
  soft: number;
  hard: number;
}

/** The open-files limit of this process (Infinity for "unlimited"), or null where /proc is absent. */
export function readFdLimit(): FdLimit | null {
  let text: string;
  try {
    text = readFileSync('/proc/self/limits', 'utf8');
  } catch {
    return null;
  }
  const line = text.split('\n').find((l) => l.startsWith('Max open files'));
  if (!line) return null;
  const m = /^Max open files\s+(\S+)\s+(\S+)/.exec(line);
  if (!m) return null;
  const num = (s: string): number => (s === 'unlimited' ? Infinity : Number(s));
  return { soft: num(m[1]!), hard: num(m[2]!) };
}

/** Descriptors we keep free for everything else (stdio, the event loop, test peers' listeners). */
export const FD_MARGIN = 64;

/**
 * Make sure `needed` descriptors (plus a margin) can be open. Raises the soft limit if it can; throws
 * `SimError('fd-limit')` naming the numbers and the fix otherwise. Returns the limit in force.
 */
export function ensureFdLimit(needed: number): FdLimit | null {
  const want = needed + FD_MARGIN;
  const cur = readFdLimit();
  if (cur === null || cur.soft >= want) return cur;
  if (cur.hard >= want) {
    const target = Math.min(cur.hard, Math.max(want, 4096));
    const hard = cur.hard === Infinity ? 'unlimited' : String(cur.hard);
    spawnSync('prlimit', ['--pid', String(process.pid), `--nofile=${target}:${hard}`], { stdio: 'ignore' });
    const after = readFdLimit();
    if (after && after.soft >= want) return after;
  }
  throw new SimError(
    'fd-limit',
    `the simulator needs about ${want} open files (one socket per VM plus ${FD_MARGIN}), but this process may open ` +
      `${cur.soft} (hard limit ${cur.hard}). Raise it before starting, e.g. 'ulimit -n ${want}'` +
      (cur.hard < want ? ' (as root, or raise the hard limit in /etc/security/limits.conf)' : ''),
  );
}
