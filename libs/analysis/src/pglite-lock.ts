/**
 * One analysis process per PGlite directory. PGlite is an embedded, single-process database with no lock of
 * its own (two processes on one directory both open it and corrupt it), so analysis holds a lock file in the
 * directory while it runs: `periscope-analysis.lock`, created with O_EXCL, holding the owner's pid, host and
 * start time. A second replica on the same directory refuses to start with `db-locked` — several replicas
 * need PostgreSQL.
 *
 * A lock left by a process that died (kill -9, a crash) is taken over when its owner is provably gone: same
 * host and no such pid (or our own pid but not held by this process: a container restarted as pid 1). A
 * lock from another host is never taken over (shared volume: the other host may be alive); the message says
 * which file to remove. Taking over a stale lock moves it aside first and checks it moved the stale file,
 * so two processes starting at once on a stale lock cannot both win.
 */
import { randomBytes } from 'node:crypto';
import { closeSync, linkSync, openSync, readFileSync, renameSync, statSync, unlinkSync, writeSync } from 'node:fs';
import { hostname } from 'node:os';
import { join, resolve } from 'node:path';
import { AnalysisError } from './errors.js';

export const PGLITE_LOCK_FILE = 'periscope-analysis.lock';

interface LockOwner {
  readonly pid: number;
  readonly host: string;
  readonly startedAt: string;
}

export interface DirLock {
  readonly path: string;
  release(): void;
}

/** Directories this process holds (a second `Analysis` in the same process must refuse too). */
const heldHere = new Set<string>();

function parseOwner(text: string): LockOwner | undefined {
  try {
    const o = JSON.parse(text) as Partial<LockOwner>;
    return typeof o.pid === 'number' && typeof o.host === 'string' ? { pid: o.pid, host: o.host, startedAt: String(o.startedAt ?? '') } : undefined;
  } catch {
    return undefined;
  }
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

function ioError(path: string, e: unknown): AnalysisError {
  return new AnalysisError('db-error', `cannot lock the PGlite directory (${path}): ${(e as Error).message}`, { cause: e });
}

function lockedError(dir: string, path: string, owner: LockOwner | undefined): AnalysisError {
  const who = owner ? `analysis process ${owner.pid} on ${owner.host}${owner.startedAt ? ` (since ${owner.startedAt})` : ''}` : 'another analysis process';
  const remote = owner && owner.host !== hostname() ? `; if that process is gone, remove ${path}` : '';
  return new AnalysisError(
    'db-locked',
    `the PGlite directory ${dir} is in use by ${who}${remote}. PGlite is embedded and serves one process: run a single replica on it, or run several replicas on PostgreSQL (--db postgres://USER@HOST:PORT/DB)`,
  );
}

/** Is the lock's owner provably gone? */
function stale(owner: LockOwner | undefined, path: string, dir: string): boolean {
  if (!owner) {
    // Unreadable: a crash between create and write, or a process writing it right now. Stale once it is old.
    try {
      return Date.now() - statSync(path).mtimeMs > 5_000;
    } catch {
      return true;
    }
  }
  if (owner.host !== hostname()) return false;
  if (owner.pid === process.pid) return !heldHere.has(dir);
  return !pidAlive(owner.pid);
}

/** Take the directory's lock or throw `db-locked` (naming the directory and the owner). */
export function lockPgliteDir(location: string): DirLock {
  const dir = resolve(location);
  const path = join(dir, PGLITE_LOCK_FILE);
  const mine = JSON.stringify({ pid: process.pid, host: hostname(), startedAt: new Date().toISOString() } satisfies LockOwner);
  for (let attempt = 0; attempt < 5; attempt++) {
    try {
      const fd = openSync(path, 'wx', 0o644);
      try {
        writeSync(fd, mine);
      } finally {
        closeSync(fd);
      }
      heldHere.add(dir);
      return {
        path,
        release() {
          heldHere.delete(dir);
          try {
            if (readFileSync(path, 'utf8') === mine) unlinkSync(path);
          } catch {
            /* already gone */
          }
        },
      };
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw ioError(path, e);
    }
    let text: string;
    try {
      text = readFileSync(path, 'utf8');
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') continue; // released meanwhile
      throw ioError(path, e);
    }
    const owner = parseOwner(text);
    if (!stale(owner, path, dir)) throw lockedError(dir, path, owner);
    // Stale: move it aside, then make sure what moved is the stale file (not a lock a racing process just took).
    const aside = `${path}.stale-${process.pid}-${randomBytes(4).toString('hex')}`;
    try {
      renameSync(path, aside);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') continue;
      throw ioError(path, e);
    }
    let moved = '';
    try {
      moved = readFileSync(aside, 'utf8');
    } catch {
      /* read below as different */
    }
    if (moved !== text) {
      try {
        linkSync(aside, path); // put the racing process's lock back (fails if yet another one exists: fine)
      } catch {
        /* see the loop */
      }
    }
    try {
      unlinkSync(aside);
    } catch {
      /* gone */
    }
  }
  throw lockedError(dir, path, parseOwner(safeRead(path)));
}

function safeRead(path: string): string {
  try {
    return readFileSync(path, 'utf8');
  } catch {
    return '';
  }
}
