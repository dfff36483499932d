/**
 * The PGlite initdb template (src/pglite-template.ts), on real PGlite: a memory database writes it, a new
 * directory loads it and migrates like any other, an existing directory keeps its data, a broken template is
 * removed and the database is initialised as before, and `off` turns it off.
 */
import { chmodSync, existsSync, mkdtempSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { openDb } from '../src/db.js';
import { pgliteTemplatePath } from '../src/pglite-template.js';
import { migrate, MIGRATIONS } from '../src/schema.js';

let dir = '';
const saved = process.env['PERISCOPE_PGLITE_TEMPLATE'];

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'an-pgtpl-'));
});
afterEach(() => {
  if (saved === undefined) delete process.env['PERISCOPE_PGLITE_TEMPLATE'];
  else process.env['PERISCOPE_PGLITE_TEMPLATE'] = saved;
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

async function migratedVersions(url: string): Promise<number[]> {
  const db = await openDb(url);
  try {
    await migrate(db);
    return (await db.query<{ version: number }>('SELECT version FROM schema_migrations ORDER BY version')).map((r) => r.version);
  } finally {
    await db.close();
  }
}

describe('PGlite initdb template', () => {
  it('a memory database writes it; a new directory loads it, migrates and keeps its data across a reopen', async () => {
    const template = join(dir, 'a.tar.gz');
    process.env['PERISCOPE_PGLITE_TEMPLATE'] = template;
    expect(pgliteTemplatePath()).toBe(template);
    expect(await migratedVersions('pglite:memory')).toEqual(MIGRATIONS.map((m) => m.version));
    expect(existsSync(template)).toBe(true);
    expect(statSync(template).mode & 0o777).toBe(0o600);
    expect(readdirSync(dir).filter((f) => f.endsWith('.tmp'))).toEqual([]); // written whole, then renamed

    const data = join(dir, 'db1');
    expect(await migratedVersions(`pglite:${data}`)).toEqual(MIGRATIONS.map((m) => m.version));
    expect(existsSync(join(data, 'PG_VERSION'))).toBe(true);
    const db = await openDb(`pglite:${data}`);
    await db.query("INSERT INTO hosts (host_id, first_seen_ns, last_seen_ns) VALUES ('h1', 1, 1)");
    await db.close();
    // Reopened: an existing cluster is opened as it is (the template is for new ones only).
    const again = await openDb(`pglite:${data}`);
    expect(await again.query<{ host_id: string }>('SELECT host_id FROM hosts')).toEqual([{ host_id: 'h1' }]);
    await again.close();
  });

  it('new databases are loaded from the template, not initdb: a marker table in a hand-made template shows up', async () => {
    const { PGlite } = await import('@electric-sql/pglite');
    const src = await PGlite.create();
    await src.exec("CREATE TABLE template_marker (note text); INSERT INTO template_marker VALUES ('from the template')");
    const template = join(dir, 'marked.tar.gz');
    writeFileSync(template, Buffer.from(await (await src.dumpDataDir('gzip')).arrayBuffer()));
    await src.close();
    process.env['PERISCOPE_PGLITE_TEMPLATE'] = template;
    for (const url of [`pglite:${join(dir, 'db-marked')}`, 'pglite:memory']) {
      const db = await openDb(url);
      expect(await db.query('SELECT note FROM template_marker'), url).toEqual([{ note: 'from the template' }]);
      await db.close();
    }
  });

  it('a template others may write is ignored (initdb runs) and left alone', async () => {
    const template = join(dir, 'writable.tar.gz');
    writeFileSync(template, 'whatever is here is never loaded');
    chmodSync(template, 0o666);
    process.env['PERISCOPE_PGLITE_TEMPLATE'] = template;
    expect(await migratedVersions(`pglite:${join(dir, 'db-w')}`)).toEqual(MIGRATIONS.map((m) => m.version));
    expect(existsSync(template)).toBe(true); // not loaded, so not found broken either
  });

  it('a template that does not load is removed and the database is initialised as before', async () => {
    const template = join(dir, 'broken.tar.gz');
    writeFileSync(template, 'not a tarball');
    process.env['PERISCOPE_PGLITE_TEMPLATE'] = template;
    expect(await migratedVersions(`pglite:${join(dir, 'db2')}`)).toEqual(MIGRATIONS.map((m) => m.version));
    expect(existsSync(template)).toBe(false);
  });

  it('PERISCOPE_PGLITE_TEMPLATE=off: nothing read or written', async () => {
    process.env['PERISCOPE_PGLITE_TEMPLATE'] = 'off';
    expect(pgliteTemplatePath()).toBeUndefined();
    const before = readdirSync(dir).sort();
    expect(await migratedVersions('pglite:memory')).toEqual(MIGRATIONS.map((m) => m.version));
    expect(readdirSync(dir).sort()).toEqual(before);
  });
});
