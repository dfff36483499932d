/**
 * A private PostgreSQL server for fault campaigns: `initdb` in a temporary directory, its own free
 * loopback port and socket directory, started and stopped with `pg_ctl` — never the shared server at
 * 5432. When the tests run as root the server runs as the `postgres` OS user (PostgreSQL refuses to run
 * as root), through `runuser`.
 *
 * `findPostgres()` says whether this machine can do it and, if not, why (tests skip with that reason).
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { chownSync, existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export type ShutdownMode = 'smart' | 'fast' | 'immediate';

export class PrivatePostgresError extends Error {
  constructor(
    readonly code: 'postgres-unavailable' | 'postgres-command-failed',
    message: string,
  ) {
    super(message);
    this.name = 'PrivatePostgresError';
  }
}

export interface PostgresInstall {
  /** Directory holding initdb, pg_ctl, postgres. */
  readonly binDir: string;
  /** OS user the server runs as (undefined: the current user). */
  readonly runAs?: { readonly name: string; readonly uid: number; readonly gid: number };
}

/** Where PostgreSQL's server binaries are, and as whom to run them; a string says why not. */
export function findPostgres(): PostgresInstall | string {
  const candidates: string[] = [];
  const which = spawnSync('sh', ['-c', 'command -v initdb'], { encoding: 'utf8' });
  if (which.status === 0 && which.stdout.trim()) {
    try {
      candidates.push(join(execFileSync('readlink', ['-f', which.stdout.trim()], { encoding: 'utf8' }).trim(), '..'));
    } catch {
      /* fall through to the versioned directories */
    }
  }
  if (existsSync('/usr/lib/postgresql')) {
    const versions = readdirSync('/usr/lib/postgresql').filter((v) => /^\d+$/.test(v)).sort((a, b) => Number(b) - Number(a));
    for (const v of versions) candidates.push(`/usr/lib/postgresql/${v}/bin`);
  }
  const binDir = candidates.find((d) => existsSync(join(d, 'initdb')) && existsSync(join(d, 'pg_ctl')) && existsSync(join(d, 'postgres')));
  if (!binDir) return 'PostgreSQL server binaries (initdb, pg_ctl, postgres) not found on PATH or in /usr/lib/postgresql/*/bin';
  if (process.getuid?.() !== 0) return { binDir };
  const id = spawnSync('id', ['-u', 'postgres'], { encoding: 'utf8' });
  const gid = spawnSync('id', ['-g', 'postgres'], { encoding: 'utf8' });
  if (id.status !== 0 || gid.status !== 0) return 'running as root and there is no `postgres` OS user to run a private server as (PostgreSQL refuses root)';
  if (spawnSync('sh', ['-c', 'command -v runuser'], { encoding: 'utf8' }).status !== 0) return 'running as root and `runuser` is missing';
  return { binDir, runAs: { name: 'postgres', uid: Number(id.stdout.trim()), gid: Number(gid.stdout.trim()) } };
}

/** A free TCP port on 127.0.0.1 (bound and released; a race with another process is possible but rare). */
export async function freeLoopbackPort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
  });
}

export class PrivatePostgres {
  private constructor(
    readonly install: PostgresInstall,
    readonly dir: string,
    readonly port: number,
  ) {}

  /** Data directory. */
  get dataDir(): string {
    return join(this.dir, 'data');
  }
  /** Superuser connection string to database `postgres` (trust authentication, loopback only). */
  get url(): string {
    return `postgres://postgres@127.0.0.1:${this.port}/postgres`;
  }
  /** The server log (initdb and pg_ctl output go there too). */
  get logPath(): string {
    return join(this.dir, 'server.log');
  }

  /** initdb a fresh cluster in a temporary directory; not started. Throws PrivatePostgresError. */
  static async create(install: PostgresInstall = PrivatePostgres.requireInstall()): Promise<PrivatePostgres> {
    const dir = mkdtempSync(join(tmpdir(), 'pg-private-'));
    if (install.runAs) chownSync(dir, install.runAs.uid, install.runAs.gid);
    const pg = new PrivatePostgres(install, dir, await freeLoopbackPort());
    pg.run('initdb', ['-D', pg.dataDir, '-A', 'trust', '-U', 'postgres', '-E', 'UTF8', '--no-instructions', '--no-sync']);
    return pg;
  }

  private static requireInstall(): PostgresInstall {
    const i = findPostgres();
    if (typeof i === 'string') throw new PrivatePostgresError('postgres-unavailable', i);
    return i;
  }

  private run(tool: string, args: readonly string[]): string {
    const bin = join(this.install.binDir, tool);
    const [cmd, argv] = this.install.runAs ? ['runuser', ['-u', this.install.runAs.name, '--', bin, ...args]] : [bin, [...args]];
    const r = spawnSync(cmd, argv, { encoding: 'utf8', cwd: this.dir, timeout: 120_000 });
    if (r.status !== 0) {
      throw new PrivatePostgresError('postgres-command-failed', `${tool} ${args.join(' ')} failed (${r.status ?? r.signal}): ${(r.stderr || r.stdout || '').trim().slice(-800)}${this.logTail()}`);
    }
    return r.stdout;
  }

  private logTail(): string {
    try {
      return `\n--- server log ---\n${readFileSync(this.logPath, 'utf8').slice(-1500)}`;
    } catch {
      return '';
    }
  }

  /**
   * Start (and wait until it accepts connections). Listens on 127.0.0.1:`port` and a socket in its own
   * directory. fsync is off: the faults here are process kills and restarts, which the OS page cache
   * survives; it does not model power loss.
   */
  start(): void {
    const opts = `-p ${this.port} -c listen_addresses=127.0.0.1 -k ${this.dir} -c fsync=off -c max_connections=50`;
    this.run('pg_ctl', ['-D', this.dataDir, '-l', this.logPath, '-o', opts, '-w', '-t', '60', 'start']);
  }

  /** `pg_ctl stop -m MODE`: fast rolls back and disconnects every session; immediate aborts (crash recovery at the next start). */
  stop(mode: ShutdownMode = 'fast'): void {
    this.run('pg_ctl', ['-D', this.dataDir, '-m', mode, '-w', '-t', '60', 'stop']);
  }

  /** Running according to pg_ctl. */
  running(): boolean {
    try {
      this.run('pg_ctl', ['-D', this.dataDir, 'status']);
      return true;
    } catch {
      return false;
    }
  }

  /** Stop if running (immediate) and remove everything. */
  destroy(): void {
    if (existsSync(join(this.dataDir, 'postmaster.pid'))) {
      try {
        this.stop('immediate');
      } catch {
        /* already gone */
      }
    }
    rmSync(this.dir, { recursive: true, force: true });
  }
}
