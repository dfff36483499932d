/**
 * kill -9 of a REAL host agent process (`bin/periscope host-agent --analysis … --state-dir DIR`) holding
 * detections analysis has received but not acknowledged: the restarted agent (same state directory) sends
 * every one of them again with the same id, and none is lost. Each detection reached the (real gRPC) analysis
 * peer only after its spool file was in place — checked at each arrival, which is what makes the resend after
 * a kill -9 possible at all (libs/host-agent/src/link/spool.ts, write-then-send).
 */
import { existsSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterEach, describe, expect, it } from 'vitest';
import { SimQemu, SimVm } from '@periscope/simulator';
import { AnalysisPeer } from '@periscope/testing';
import { AgentProcess } from '../src/index.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '../../..');
const CR0_WP = 1n << 16n;

const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  while (cleanups.length) await cleanups.pop()!();
});

describe('kill -9 of a real host agent with unacknowledged detections', () => {
  it('the restarted agent resends every spooled detection with its id; each had its file before analysis saw it', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'kill-spool-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    writeFileSync(join(dir, 'cookie'), 'spool-secret');
    const sock = join(dir, 'kvmi.sock');
    const spoolDir = join(dir, 'state', 'spool');
    const peer = new AnalysisPeer(); // acknowledges nothing until told to
    await peer.start();
    cleanups.push(() => peer.kill());
    const agentOpts = {
      repoRoot: root, kvmiSocket: sock, cookieFile: join(dir, 'cookie'), hostId: 'kill-spool',
      extraArgs: ['--analysis', peer.address, '--state-dir', join(dir, 'state'), '--link-backoff-max', '500ms'],
    };
    let agent = new AgentProcess(agentOpts);
    cleanups.push(() => agent.kill9());
    await agent.start();

    const vm = new SimVm({ vcpus: 1, seed: 31, jitterMs: 0, name: 'kill-spool-vm' });
    const qemu = new SimQemu(vm, { path: sock, key: Buffer.from('spool-secret'), reconnectSeconds: 0.05 });
    qemu.start();
    cleanups.push(() => {
      qemu.stop();
      vm.close();
    });
    await peer.waitFor(() => peer.vmAttached().length > 0, 20_000, 'the VM attached');

    // Whether the spool file existed when each detection arrived (recorded on every peer message).
    const fileAtArrival = new Map<string, boolean>();
    const watchArrivals = (): boolean => {
      for (const d of peer.detections()) if (!fileAtArrival.has(d.detectionId)) fileAtArrival.set(d.detectionId, existsSync(join(spoolDir, `${d.detectionId}.pb`)));
      return true;
    };
    const cpu = vm.vcpus[0]!;
    const attacks = 5;
    for (let i = 0; i < attacks; i++) {
      cpu.cpu.sregs.cr0 |= CR0_WP;
      await cpu.writeCr(0, cpu.cpu.sregs.cr0 & ~CR0_WP);
      expect(cpu.cpu.sregs.cr0 & CR0_WP).toBe(CR0_WP); // denied by the default policy
    }
    await peer.waitFor(() => watchArrivals() && fileAtArrival.size >= attacks, 10_000, 'every detection at analysis');
    const before = [...fileAtArrival.keys()].sort();
    expect(before).toHaveLength(attacks);
    expect([...fileAtArrival].filter(([, had]) => !had)).toEqual([]);
    expect(readdirSync(spoolDir).filter((n) => n.endsWith('.pb')).sort()).toEqual(before.map((id) => `${id}.pb`));

    await agent.kill9();
    const firstConnections = peer.connections.length;
    agent = new AgentProcess(agentOpts);
    await agent.start();
    // The new stream carries every unacknowledged detection again, same ids.
    const resent = await peer.waitFor(() => {
      const later = peer.connections.slice(firstConnections).flatMap((c) => c.received).flatMap((m) => (m.message?.$case === 'detection' ? [m.message.value.detectionId] : []));
      return new Set(later).size >= attacks ? [...new Set(later)].sort() : undefined;
    }, 30_000, 'the detections resent after the restart');
    expect(resent).toEqual(before);
    // Acknowledged now: the restarted agent empties its spool.
    peer.ackDetections(before);
    const t0 = Date.now();
    while (readdirSync(spoolDir).length > 0 && Date.now() - t0 < 10_000) await new Promise((r) => setTimeout(r, 20));
    expect(readdirSync(spoolDir)).toEqual([]);
  }, 90_000);
});
