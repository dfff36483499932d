/**
 * `periscope analysis` as a real process (the built app, `runAnalysis`): --help, configuration errors exit 2
 * naming the key, a start on embedded PGlite answers /healthz and imports --policy DIR, SIGTERM exits 0.
 */
import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterEach, describe, expect, it } from 'vitest';

const root = join(dirname(fileURLToPath(import.meta.url)), '../../..');
const runner = `import('@periscope/app-analysis').then(async (m) => process.exit(await m.runAnalysis(process.argv.slice(1))))`;
const run = (args: string[]) => spawnSync(process.execPath, ['--input-type=module', '-e', runner, '--', ...args], { cwd: root, encoding: 'utf8', timeout: 30_000 });
const cleanups: (() => void)[] = [];
afterEach(() => {
  while (cleanups.length) cleanups.pop()!();
});

describe('periscope analysis (process)', () => {
  it('--help lists the flags; bad configuration exits 2 with the key named', () => {
    const h = run(['--help']);
    expect(h.status).toBe(0);
    for (const f of ['--listen', '--db', '--http', '--policy', '--api-token-file', '--replica-id', '--tls-ca']) expect(h.stdout).toContain(f);
    const bad = run(['--db', 'mysql://x']);
    expect(bad.status).toBe(2);
    expect(bad.stderr).toContain('--db mysql://x: expected pglite:DIR');
    const remote = run(['--listen', '10.1.2.3:7400']);
    expect(remote.status).toBe(2);
    expect(remote.stderr).toMatch(/listen/);
  });

  it('starts on PGlite, imports --policy DIR, serves /healthz, stops on SIGTERM', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'an-proc-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    writeFileSync(join(dir, 'p.yaml'), 'name: only-cr\nmodules:\n  cr-pinning: {}\n');
    const child = spawn(process.execPath, ['--input-type=module', '-e', runner, '--', '--db', `pglite:${join(dir, 'data')}`, '--listen', '127.0.0.1:0', '--http', '127.0.0.1:0', '--policy', dir], { cwd: root, stdio: ['ignore', 'pipe', 'pipe'] });
    cleanups.push(() => child.kill('SIGKILL'));
    let out = '';
    child.stdout.on('data', (c: Buffer) => (out += c.toString()));
    const t0 = Date.now();
    while (!out.includes('\n')) {
      if (Date.now() - t0 > 30_000 || child.exitCode !== null) throw new Error(`no start line: ${out}`);
      await new Promise((r) => setTimeout(r, 50));
    }
    const info = JSON.parse(out.split('\n')[0]!) as { grpc: string; http: string; db: string };
    expect(info.db).toBe('pglite');
    const health = (await fetch(`http://${info.http}/healthz`).then((r) => r.json())) as { status: string };
    expect(health.status).toBe('ok');
    const pol = (await fetch(`http://${info.http}/v1/policies`).then((r) => r.json())) as { policies: { name: string; version: string }[] };
    expect(pol.policies.map((p) => [p.name, p.version])).toEqual([['only-cr', '1']]);
    const code = new Promise<number | null>((r) => child.on('exit', (c) => r(c)));
    child.kill('SIGTERM');
    expect(await code).toBe(0);
  }, 60_000);
});
