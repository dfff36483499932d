/**
 * A freshly initialised PGlite cluster (what `initdb` leaves: no Periscope schema), kept as a gzipped
 * tarball so that the next new database loads it instead of running `initdb` again: measured on a 2-core
 * VM, a new directory 3.3 s → 0.7–0.8 s, `pglite:memory` 1.6–2.4 s → 0.8 s. It speeds up the demo's
 * analysis start (a new `pglite:` directory per run) and every test that opens `pglite:memory`.
 *
 * - Only new databases use it (a directory without `PG_VERSION`, or memory); migrations still run on each.
 * - Cached per PGlite version in the OS temp directory (`periscope-pglite-<version>-initdb.tar.gz`, ~4.5 MB);
 *   `PERISCOPE_PGLITE_TEMPLATE=FILE` puts it elsewhere, `PERISCOPE_PGLITE_TEMPLATE=off` turns it off.
 * - Written once, by the first process that initialises a cluster without one (temp file + rename, so a
 *   reader never sees half a file; mode 0600). A template that fails to load is removed and `initdb` runs
 *   as before. One that this user does not own, or that others may write, is ignored: a database seeded
 *   by someone else could carry their policies or exceptions.
 */
import { existsSync, readFileSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';

/** The PGlite package version (the template's format follows it). */
function pgliteVersion(): string {
  try {
    let dir = dirname(createRequire(import.meta.url).resolve('@electric-sql/pglite'));
    for (let i = 0; i < 6; i++, dir = dirname(dir)) {
      const f = join(dir, 'package.json');
      if (!existsSync(f)) continue;
      const p = JSON.parse(readFileSync(f, 'utf8')) as { name?: string; version?: string };
      if (p.name === '@electric-sql/pglite' && p.version) return p.version;
    }
  } catch {
    /* fall through */
  }
  return 'unknown';
}

/** Where the template lives, or undefined when turned off. */
export function pgliteTemplatePath(): string | undefined {
  const env = process.env['PERISCOPE_PGLITE_TEMPLATE'];
  if (env === 'off') return undefined;
  if (env) return env;
  const uid = typeof process.getuid === 'function' ? process.getuid() : 0;
  return join(tmpdir(), `periscope-pglite-${pgliteVersion()}-u${uid}-initdb.tar.gz`);
}

/** The template's bytes for a new database, or undefined (none yet, or turned off). */
export function readPgliteTemplate(): Blob | undefined {
  const path = pgliteTemplatePath();
  if (!path || !existsSync(path)) return undefined;
  try {
    const st = statSync(path);
    const uid = typeof process.getuid === 'function' ? process.getuid() : st.uid;
    if (!st.isFile() || st.uid !== uid || (st.mode & 0o022) !== 0) return undefined;
    return new Blob([readFileSync(path)]);
  } catch {
    return undefined;
  }
}

/** The template did not load: remove it, so the next database runs initdb (and writes a good one). */
export function discardPgliteTemplate(): void {
  const path = pgliteTemplatePath();
  if (path) rmSync(path, { force: true });
}

/** Keep a just-initialised cluster as the template (best effort: a failure only costs the next start time). */
export async function savePgliteTemplate(dump: () => Promise<Blob | File>): Promise<void> {
  const path = pgliteTemplatePath();
  if (!path || existsSync(path)) return;
  const tmp = `${path}.${process.pid}.tmp`;
  try {
    writeFileSync(tmp, Buffer.from(await (await dump()).arrayBuffer()), { mode: 0o600 });
    renameSync(tmp, path);
  } catch {
    rmSync(tmp, { force: true });
  }
}
