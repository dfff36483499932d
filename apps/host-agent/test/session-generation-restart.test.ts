/**
 * KVMI session generations across a REAL agent restart: `periscope host-agent --state-dir DIR` as a process,
 * a simulated VM (in this process) attaches (generation g1, read from the local API), the agent is SIGKILLed
 * and restarted with the same --state-dir, QEMU reconnects: the new session's generation g2 > g1 (before,
 * every agent process started again at 1). Then the persisted floor at work in a real process: the state file
 * says the last generation was far ahead of this clock (issued before the clock was set back) — the next
 * restart continues above it, not at the wall clock.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
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

function apiGet(socketPath: string, path: string): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = request({ socketPath, path }, (res) => {
      let body = '';
      res.on('data', (c: Buffer) => (body += c.toString()));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.on('error', reject);
    req.end();
  });
}

async function until(cond: () => boolean | Promise<boolean>, ms: number, what: string): Promise<void> {
  const t0 = Date.now();
  while (!(await cond())) {
    if (Date.now() - t0 > ms) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

describe('session generation across a real agent restart', () => {
  it('SIGKILL + restart with the same --state-dir: the VM re-attaches with a greater generation; the persisted floor beats the clock', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'hag-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    writeFileSync(join(dir, 'cookie'), 'gen-secret');
    const sock = join(dir, 'k.sock');
    const api = join(dir, 'api.sock');
    const stateDir = join(dir, 'state');
    const stateFile = join(stateDir, 'session-generations.json');

    const start = async (): Promise<{ child: ChildProcess; stderr: () => string }> => {
      rmSync(api, { force: true }); // a killed agent leaves its sockets behind
      const child = spawn(
        process.execPath,
        [bin, 'host-agent', '--kvmi-listen', `unix:${sock}`, '--cookie-file', join(dir, 'cookie'), '--api-listen', `unix:${api}`, '--state-dir', stateDir, '--log-level', 'info'],
        { stdio: ['ignore', 'ignore', 'pipe'] },
      );
      let stderr = '';
      child.stderr!.on('data', (c: Buffer) => (stderr = (stderr + c.toString()).slice(-20_000)));
      cleanups.push(() => {
        if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
      });
      await until(() => existsSync(api) || child.exitCode !== null, 30_000, 'the agent API socket');
      if (child.exitCode !== null) throw new Error(`host agent exited ${child.exitCode}: ${stderr}`);
      return { child, stderr: () => stderr };
    };
    const kill = async (child: ChildProcess): Promise<void> => {
      child.kill('SIGKILL');
      await until(() => child.signalCode !== null || child.exitCode !== null, 10_000, 'the agent gone');
    };
    /** The VM's session generation as the running agent reports it, once the VM is protected. */
    const attachedGeneration = async (uuid: string): Promise<number> => {
      let gen = 0;
      await until(async () => {
        const r = await apiGet(api, `/v1/vms/${uuid}`).catch(() => undefined);
        if (r?.status !== 200) return false;
        const v = JSON.parse(r.body) as { state?: string; sessionGeneration?: number };
        gen = v.state === 'protected' ? (v.sessionGeneration ?? 0) : 0;
        return gen > 0;
      }, 30_000, `VM ${uuid} protected`);
      return gen;
    };

    const first = await start();
    const vm = new SimVm({ vcpus: 1, seed: 17, apsOnline: true, jitterMs: 0, name: 'gen-vm' });
    const qemu = new SimQemu(vm, { path: sock, key: Buffer.from('gen-secret'), reconnectSeconds: 0.05 });
    cleanups.push(() => {
      qemu.stop();
      vm.close();
    });
    let hooks = 0;
    vm.on('hooked', () => hooks++);
    qemu.start();
    const g1 = await attachedGeneration(vm.uuidText);
    expect(Number.isSafeInteger(g1)).toBe(true);
    expect(JSON.parse(readFileSync(stateFile, 'utf8'))).toEqual({ [vm.uuidText]: g1 });

    // kill -9 and restart with the same state directory; QEMU reconnects to the new process.
    await kill(first.child);
    await until(() => !vm.connected, 10_000, 'the VM unhooked');
    const hooksBefore = hooks;
    const second = await start();
    await until(() => hooks > hooksBefore, 30_000, 'the VM re-attached to the restarted agent');
    const g2 = await attachedGeneration(vm.uuidText);
    expect(g2).toBeGreaterThan(g1);
    expect(second.stderr()).toContain('VM attached');

    // The floor: the last generation on disk is ~1 year ahead of this clock (as if issued before the clock was
    // set back). The restarted process continues right above it instead of going back to the wall clock.
    await kill(second.child);
    await until(() => !vm.connected, 10_000, 'the VM unhooked again');
    const ahead = g2 + 365 * 24 * 3600 * 1000;
    writeFileSync(stateFile, JSON.stringify({ [vm.uuidText]: ahead }));
    const hooksBefore3 = hooks;
    const third = await start();
    await until(() => hooks > hooksBefore3, 30_000, 'the VM re-attached to the third agent');
    const g3 = await attachedGeneration(vm.uuidText);
    expect(g3).toBe(ahead + 1);
    expect(JSON.parse(readFileSync(stateFile, 'utf8'))).toEqual({ [vm.uuidText]: ahead + 1 });
    third.child.kill('SIGTERM');
    await until(() => third.child.exitCode !== null, 10_000, 'the agent exits on SIGTERM');
  }, 120_000);
});
