import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { main } from '../src/main.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '../../..');

function capture() {
  const out: string[] = [];
  const err: string[] = [];
  return { io: { out: (l: string) => out.push(l), err: (l: string) => err.push(l) }, out, err };
}

describe('periscope CLI', () => {
  it('version prints the package version and the KVMI dialect', async () => {
    const c = capture();
    expect(await main(['version'], c.io)).toBe(0);
    const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { version: string };
    expect(c.out[0]).toMatch(new RegExp(`^periscope ${pkg.version.replace(/\./g, '\\.')}`));
    expect(c.out.join('\n')).toContain('KVMI protocol: v12, version 1');
  });
  it('version --json is machine readable', async () => {
    const c = capture();
    expect(await main(['version', '--json'], c.io)).toBe(0);
    expect(JSON.parse(c.out[0]!)).toMatchObject({ kvmiVersion: 1, kvmiDialect: 'v12' });
  });
  it('unknown commands fail with usage; --help lists every command', async () => {
    const bad = capture();
    expect(await main(['frobnicate'], bad.io)).toBe(2);
    expect(bad.err[0]).toContain("unknown command 'frobnicate'");
    const help = capture();
    expect(await main(['--help'], help.io)).toBe(0);
    for (const name of ['version', 'sim', 'host-agent', 'analysis', 'guest-agent', 'demo']) expect(help.out.join('\n')).toContain(name);
  });
  it('every command has --help; a missing required option is a usage error', async () => {
    const c = capture();
    expect(await main(['guest-agent', '--help'], c.io)).toBe(0);
    expect(await main(['guest-agent'], c.io)).toBe(2);
    const h = capture();
    expect(await main(['analysis', '--help'], h.io)).toBe(0);
    expect(h.out.join('\n')).toContain('periscope analysis');
  });
  it('sim --help is the simulator\'s own help, from the real process', () => {
    const r = spawnSync(process.execPath, [join(root, 'bin/periscope'), 'sim', '--help'], { encoding: 'utf8' });
    expect(r.status).toBe(0);
    expect(r.stdout).toContain('--introspector');
    expect(r.stdout).toContain('PERISCOPE_');
  });
  it('bin/periscope runs the built CLI as a real process', () => {
    if (!existsSync(join(root, 'apps/cli/dist/main.js'))) throw new Error('apps/cli is not built: run npm run build (npm test builds first)');
    const r = spawnSync(process.execPath, [join(root, 'bin/periscope'), 'version', '--json'], { encoding: 'utf8' });
    expect(r.status).toBe(0);
    expect(JSON.parse(r.stdout)).toMatchObject({ kvmiDialect: 'v12' });
  });
});
