/**
 * One tiny database interface over two drivers: embedded PGlite (a data directory, or memory) and a real
 * PostgreSQL server (`pg`). Every query of the service is written once, in plain PostgreSQL, and runs on
 * both. `int8` columns come back as `bigint` on both drivers (64-bit counters and Unix-ns times never pass
 * through a JS number); `jsonb` comes back parsed.
 */
import { existsSync, mkdirSync, readdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { AnalysisError } from './errors.js';
import { lockPgliteDir, PGLITE_LOCK_FILE } from './pglite-lock.js';
import { discardPgliteTemplate, readPgliteTemplate, savePgliteTemplate } from './pglite-template.js';

export type SqlParam = string | number | bigint | boolean | null | Buffer;
export type Row = Record<string, unknown>;

export interface Queryable {
  query<T extends Row = Row>(sql: string, params?: readonly SqlParam[]): Promise<T[]>;
}

export interface Db extends Queryable {
  /** `pglite` or `postgres`. */
  readonly driver: 'pglite' | 'postgres';
  /** Several statements, no parameters (migrations). */
  exec(sql: string): Promise<void>;
  /** Run `fn` in one transaction (BEGIN … COMMIT, ROLLBACK on a throw). */
  transaction<T>(fn: (tx: Queryable) => Promise<T>): Promise<T>;
  close(): Promise<void>;
}

const INT8 = 20;
const toBig = (v: string): bigint => BigInt(v);

export interface DbTarget {
  readonly driver: 'pglite' | 'postgres';
  /** PGlite: a directory, or `memory`. Postgres: the connection string. */
  readonly location: string;
}

/** `pglite:DIR`, `pglite:memory`, `postgres://…` / `postgresql://…`. */
export function parseDbUrl(url: string): DbTarget {
  if (url.startsWith('pglite:')) {
    const location = url.slice('pglite:'.length);
    if (!location) throw new AnalysisError('bad-db-url', `--db ${url}: pglite: needs a directory (or pglite:memory)`);
    return { driver: 'pglite', location };
  }
  if (/^postgres(ql)?:\/\//.test(url)) return { driver: 'postgres', location: url };
  throw new AnalysisError('bad-db-url', `--db ${url}: expected pglite:DIR, pglite:memory or postgres://USER@HOST:PORT/DB`);
}

export async function openDb(url: string): Promise<Db> {
  const t = parseDbUrl(url);
  return t.driver === 'pglite' ? openPglite(t.location) : openPostgres(t.location);
}

function dbError(e: unknown, sql: string): AnalysisError {
  const msg = e instanceof Error ? e.message : String(e);
  return new AnalysisError('db-error', `${msg} (in: ${sql.replace(/\s+/g, ' ').slice(0, 120)})`, { cause: e });
}

async function openPglite(location: string): Promise<Db> {
  const { PGlite } = await import('@electric-sql/pglite');
  if (location !== 'memory') mkdirSync(location, { recursive: true });
  // One process per directory (PGlite has no lock of its own): a second replica refuses with db-locked.
  const lock = location === 'memory' ? undefined : lockPgliteDir(location);
  // A new cluster loads the initdb template when there is one (pglite-template.ts); memory ones write it.
  const memory = location === 'memory';
  const template = memory || !existsSync(join(location, 'PG_VERSION')) ? readPgliteTemplate() : undefined;
  const create = (loadDataDir?: Blob) => {
    const o = loadDataDir ? { loadDataDir } : {};
    return memory ? new PGlite(o) : new PGlite(location, o);
  };
  let pg = create(template);
  try {
    try {
      await pg.waitReady;
    } catch (e) {
      if (!template) throw e;
      discardPgliteTemplate(); // unusable: initdb as before, in an emptied directory (our lock stays)
      await pg.close().catch(() => undefined);
      if (!memory) for (const f of readdirSync(location)) if (f !== PGLITE_LOCK_FILE) rmSync(join(location, f), { recursive: true, force: true });
      pg = create();
      await pg.waitReady;
    }
  } catch (e) {
    lock?.release();
    throw e;
  }
  if (memory && !template) {
    const fresh = pg;
    await savePgliteTemplate(() => fresh.dumpDataDir('gzip'));
  }
  const opts = { parsers: { [INT8]: toBig } };
  type Tx = { query: (sql: string, params?: unknown[], o?: typeof opts) => Promise<{ rows: unknown[] }> };
  const wrap = (q: Tx): Queryable => ({
    async query<T extends Row>(sql: string, params: readonly SqlParam[] = []): Promise<T[]> {
      try {
        return (await q.query(sql, [...params], opts)).rows as T[];
      } catch (e) {
        throw dbError(e, sql);
      }
    },
  });
  const base = wrap(pg as unknown as Tx);
  return {
    driver: 'pglite',
    query: base.query,
    async exec(sql) {
      try {
        await pg.exec(sql);
      } catch (e) {
        throw dbError(e, sql);
      }
    },
    transaction: (fn) => pg.transaction((tx) => fn(wrap(tx as unknown as Tx))),
    async close() {
      try {
        await pg.close();
      } finally {
        lock?.release();
      }
    },
  };
}

async function openPostgres(connectionString: string): Promise<Db> {
  const pgMod = await import('pg');
  const pg = pgMod.default;
  const pool = new pg.Pool({
    connectionString,
    max: 8,
    types: { getTypeParser: ((oid: number, format?: 'text' | 'binary') => (oid === INT8 ? toBig : pg.types.getTypeParser(oid, format as 'text'))) as typeof pg.types.getTypeParser },
  });
  pool.on('error', () => undefined); // idle client errors surface on the next query
  const prep = (params: readonly SqlParam[]): unknown[] => params.map((p) => (typeof p === 'bigint' ? p.toString() : p));
  const q = async <T extends Row>(c: { query: (s: string, p: unknown[]) => Promise<{ rows: unknown[] }> }, sql: string, params: readonly SqlParam[]): Promise<T[]> => {
    try {
      return (await c.query(sql, prep(params))).rows as T[];
    } catch (e) {
      throw dbError(e, sql);
    }
  };
  // Fail early with a clear message when the server does not answer.
  try {
    await pool.query('select 1');
  } catch (e) {
    await pool.end().catch(() => undefined);
    throw new AnalysisError('db-error', `cannot connect to PostgreSQL (${redact(connectionString)}): ${(e as Error).message}`, { cause: e });
  }
  return {
    driver: 'postgres',
    query: (sql, params = []) => q(pool, sql, params),
    async exec(sql) {
      await q(pool, sql, []);
    },
    async transaction(fn) {
      let client: import('pg').PoolClient;
      try {
        client = await pool.connect();
      } catch (e) {
        throw dbError(e, 'BEGIN');
      }
      // A checked-out client has no pool error listener: without this, the server going away mid-transaction
      // (restart, failover) is an uncaught 'error' event that ends the process. The broken client is
      // destroyed on release instead of going back to the pool.
      let broken: Error | undefined;
      const onError = (e: Error): void => {
        broken = e;
      };
      client.on('error', onError);
      try {
        await q(client, 'BEGIN', []);
        const r = await fn({ query: (sql, params = []) => q(client, sql, params) });
        await q(client, 'COMMIT', []);
        return r;
      } catch (e) {
        if (!broken) await client.query('ROLLBACK').catch((err: Error) => (broken = err));
        throw e;
      } finally {
        client.off('error', onError);
        client.release(broken);
      }
    },
    async close() {
      await pool.end();
    },
  };
}

export function redact(url: string): string {
  return url.replace(/\/\/([^:@/]+):[^@/]*@/, '//$1:***@');
}
