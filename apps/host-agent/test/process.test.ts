/**
 * `periscope host-agent` as a real process: config errors exit 2 with the key named; a simulated VM
 * (in this process) attaches through the real socket; the default policy denies a CR0.WP clear; the
 * local API and /metrics report it; SIGTERM detaches and exits 0 within the deadline.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { request } from 'node:http';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterEach, describe, expect, it } from 'vitest';
import { SimQemu, SimVm } from '@periscope/simulator';

const root = join(dirname(fileURLToPath(import.meta.url)), '../../..');
const bin = join(root, 'bin/periscope');
const cleanups: (() => void)[] = [];
afterEach(() => {
  while (cleanups.length) cleanups.pop()!();
});

function get(opts: { socketPath?: string; port?: number; path: string }): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = request({ ...(opts.socketPath ? { socketPath: opts.socketPath } : { host: '127.0.0.1', port: opts.port }), path: opts.path }, (res) => {
      let body = '';
      res.on('data', (c: Buffer) => (body += c.toString()));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.on('error', reject);
    req.end();
  });
}

async function until(cond: () => boolean | Promise<boolean>, ms = 8000): Promise<void> {
  const t0 = Date.now();
  while (!(await cond())) {
    if (Date.now() - t0 > ms) throw new Error('timed out');
    await new Promise((r) => setTimeout(r, 20));
  }
}

describe('periscope host-agent (process)', () => {
  it('refuses bad configuration with the key named', () => {
    const r = spawnSync(process.execPath, [bin, 'host-agent', '--kvmi-listen', 'unix:/tmp/x.sock', '--metrics-listen', '10.0.0.1:9464'], { encoding: 'utf8' });
    expect(r.status).toBe(2);
    expect(r.stderr).toContain('metrics-listen');
    const missing = spawnSync(process.execPath, [bin, 'host-agent'], { encoding: 'utf8' });
    expect(missing.status).toBe(2);
    expect(missing.stderr).toContain('kvmi-listen');
    const dir = mkdtempSync(join(tmpdir(), 'hap-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    writeFileSync(join(dir, 'p.json'), JSON.stringify({ format: 'periscope.verdicts/v1', id: 'bad', version: 1, rules: [{ id: 'x', match: { kind: 'CR', cr: 0 }, action: 'skip' }] }));
    const bad = spawnSync(process.execPath, [bin, 'host-agent', '--kvmi-listen', `unix:${dir}/k.sock`, '--policy', join(dir, 'p.json')], { encoding: 'utf8' });
    expect(bad.status).toBe(2);
    expect(bad.stderr).toContain('rules[0]');
    expect(bad.stderr).not.toContain('    at ');
  });

  it('attaches a VM, denies CR0.WP clear with the default policy, reports through API and metrics, detaches on SIGTERM', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'hap-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    writeFileSync(join(dir, 'cookie'), 'proc-secret');
    const child: ChildProcess = spawn(
      process.execPath,
      [bin, 'host-agent', '--kvmi-listen', `unix:${dir}/k.sock`, '--cookie-file', join(dir, 'cookie'), '--api-listen', `unix:${dir}/api.sock`, '--metrics-listen', '127.0.0.1:0'],
      { stdio: ['ignore', 'ignore', 'pipe'] },
    );
    let stderr = '';
    child.stderr!.on('data', (c: Buffer) => (stderr += c.toString()));
    cleanups.push(() => child.kill('SIGKILL'));
    await until(() => existsSync(join(dir, 'api.sock')));
    // Port 0: the kernel picks a free port and the agent logs the one it bound (a random fixed port could be
    // an ephemeral port another test has open).
    await until(() => /"msg":"metrics listening".*"address":"127\.0\.0\.1:[1-9]\d*"/.test(stderr));
    const port = Number(/"msg":"metrics listening".*"address":"127\.0\.0\.1:(\d+)"/.exec(stderr)![1]);
    const vm = new SimVm({ vcpus: 2, seed: 11, apsOnline: true, name: 'proc-vm' });
    const qemu = new SimQemu(vm, { path: join(dir, 'k.sock'), key: Buffer.from('proc-secret'), reconnectSeconds: 30 });
    cleanups.push(() => qemu.stop());
    qemu.start();
    await until(async () => {
      const r = await get({ socketPath: join(dir, 'api.sock'), path: '/v1/vms' });
      const vms = (JSON.parse(r.body) as { vms: { state: string; name?: string }[] }).vms;
      return vms.length === 1 && vms[0]!.state === 'protected';
    });
    const cpu = vm.vcpus[1]!;
    const cr0 = cpu.cpu.sregs.cr0;
    const r = await cpu.writeCr(0, cr0 & ~(1n << 16n));
    expect(r.events.map((e) => e.event)).toEqual(['CR']);
    expect(cpu.cpu.sregs.cr0).toBe(cr0);
    const metrics = await get({ port, path: '/metrics' });
    expect(metrics.body).toContain('periscope_agent_verdicts_total{action="deny",rule="cr0-wp-clear"} 1');
    expect(metrics.body).toMatch(/periscope_agent_vcpu_stall_seconds_count\{action="CONTINUE",kind="CR"\} 1/);
    const t0 = Date.now();
    child.kill('SIGTERM');
    const code = await new Promise<number | null>((res) => child.once('exit', (c) => res(c)));
    expect(code).toBe(0);
    expect(Date.now() - t0).toBeLessThan(3000);
    expect(stderr).toContain('SIGTERM: detaching every VM');
    // The agent disabled what it enabled before closing: no CR interception left on the vCPU.
    expect(vm.vcpus[1]!.enabledEvents).toEqual([]);
  });
});
