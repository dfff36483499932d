/**
 * `periscope guest-agent` as a real process (the app's built entry point): configuration errors exit 2;
 * against a simulated host it detects the ABI, dials analysis, maps and hashes on request, and on
 * SIGTERM releases every mapping and exits 0.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, rmSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

import { Server, ServerCredentials } from '@grpc/grpc-js';
import { GuestMemoryServiceService } from '@periscope/contracts';
import { GuestMemoryHub } from '@periscope/guest-agent';
import { afterEach, describe, expect, it } from 'vitest';

import { sockPath, startSimHost, until } from '@periscope/testing';

const here = dirname(fileURLToPath(import.meta.url));
const entry = join(here, '../dist/main.js');
const script = `import(${JSON.stringify(entry)}).then(async (m) => { process.exitCode = await m.runGuestAgent(process.argv.slice(1)); })`;
const cleanups: (() => void | Promise<void>)[] = [];
afterEach(async () => {
  while (cleanups.length) await cleanups.pop()!();
});

function built(): void {
  if (!existsSync(entry)) throw new Error('apps/guest-agent is not built: run npm run build (npm test builds first)');
}

describe('periscope guest-agent process', () => {
  it('refuses bad configuration with exit 2 and names the key', () => {
    built();
    const run = (...args: string[]) => spawnSync(process.execPath, ['--input-type=module', '-e', script, '--', ...args], { encoding: 'utf8', env: { ...process.env, PERISCOPE_ANALYSIS: '' } });
    const missing = run();
    expect(missing.status).toBe(2);
    expect(missing.stderr).toContain('--analysis');
    const both = run('--analysis', 'unix:/tmp/x.sock', '--device', '/dev/null', '--sim-kvmmem', '/tmp/y.sock');
    expect(both.status).toBe(2);
    expect(both.stderr).toContain('--sim-kvmmem');
    const plaintext = run('--analysis', '10.1.2.3:7443', '--sim-kvmmem', '/tmp/y.sock');
    expect(plaintext.status).toBe(2);
    expect(plaintext.stderr).toMatch(/tls|TLS/);
    const help = run('--help');
    expect(help.status).toBe(0);
    expect(help.stdout).toContain('--max-mapped-pages');
    const nodev = run('--analysis', 'unix:/tmp/x.sock', '--device', '/nonexistent/kvmmem');
    expect(nodev.status).toBe(1);
    expect(nodev.stderr).toContain('ENOENT');
  });

  it('serves memory work for a simulated host and releases everything on SIGTERM', async () => {
    built();
    const host = await startSimHost({ vms: 1, memoryMiB: 32, abi: 2 });
    cleanups.push(() => host.close());
    const hub = new GuestMemoryHub();
    const server = new Server();
    server.addService(GuestMemoryServiceService, hub.service);
    const path = sockPath('analysis');
    await new Promise<void>((resolve, reject) => server.bindAsync(`unix:${path}`, ServerCredentials.createInsecure(), (e) => (e ? reject(e) : resolve())));
    cleanups.push(() => new Promise<void>((resolve) => server.tryShutdown(() => { rmSync(path, { force: true }); resolve(); })));
    const child: ChildProcess = spawn(process.execPath, ['--input-type=module', '-e', script, '--', '--analysis', `unix:${path}`, '--host-id', 'h7', '--sim-kvmmem', host.kvmmemPath, '--max-mapped-pages', '2048', '--log-level', 'debug'], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stderr = '';
    child.stderr!.on('data', (c: Buffer) => (stderr += c.toString()));
    const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
    cleanups.push(() => void child.kill('SIGKILL'));
    const link = await hub.waitForAgent('h7', 10_000);
    expect(link.hello).toMatchObject({ hostId: 'h7', simulated: true, maxMappedPages: 2048n });
    const ref = host.ref(0);
    const text = host.vm(0).kernel.textPhys;
    await link.map(ref, { gpa: text, length: 0x10000n }, host.tokens(0));
    expect(host.kvmmem.stats().mappedPages).toBeGreaterThan(0);
    const h = await link.hash(ref, { gpa: text, length: 0x10000n });
    expect(h).toHaveLength(16);
    child.kill('SIGTERM');
    expect(await exited).toBe(0);
    await until(() => host.kvmmem.stats().mappedPages === 0, 3000, 'the device to drop the mappings');
    expect(stderr).toContain('guest agent running');
  });
});
