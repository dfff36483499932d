/**
 * Peers that misbehave, beyond what libs/host-agent/test/agent-e2e.test.ts covers (a garbage-spewing peer,
 * a flooding peer that never reads): a peer that stalls mid-message — in the handshake, in a command reply
 * during attach, in an event after attach —, a flooding peer that does read (far more events than the agent
 * can answer), and a VM unhooked with events in flight. Each time a healthy VM on the same agent keeps
 * getting its CR0.WP clears denied.
 */
import { connect, type Socket } from 'node:net';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterEach, describe, expect, it } from 'vitest';
import { EventAction, encodeReply, events, performQemuHandshake, structs } from '@periscope/kvmi';
import { HostAgent, KvmiListener, parseCookies, type Decide, type VmConnection } from '@periscope/host-agent';
import { SimQemu, SimVm } from '@periscope/simulator';
import { loadDefaultPolicy } from '@periscope/verdicts';
import { runAgentCampaign, sleep, StallProxy, waitFor, withTimeout } from '../src/index.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '../../..');
const CR0_WP = 1n << 16n;

const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  while (cleanups.length) await cleanups.pop()!();
});

function tempDir(): string {
  const d = mkdtempSync(join(tmpdir(), 'peers-'));
  cleanups.push(() => rmSync(d, { recursive: true, force: true }));
  return d;
}

/** Deny clearing CR0.WP (keep the old value); allow everything else. */
const denyWpClear: Decide = (view) => {
  if (view.eventId === events.CR.id) {
    const oldV = view.specificU64(structs.kvmi_vcpu_event_cr, 'old_value');
    const newV = view.specificU64(structs.kvmi_vcpu_event_cr, 'new_value');
    if (view.specificUint(structs.kvmi_vcpu_event_cr, 'cr') === 0 && (oldV & CR0_WP) !== 0n && (newV & CR0_WP) === 0n) return { kind: 'reply', action: EventAction.CONTINUE, newVal: oldV, ruleId: 'wp' };
    return { kind: 'reply', action: EventAction.CONTINUE, newVal: newV };
  }
  return { kind: 'reply', action: EventAction.CONTINUE };
};

/** One CR0.WP clear on the healthy VM: answered within 5 s and denied. */
async function probe(vm: SimVm): Promise<'ok' | string> {
  const cpu = vm.vcpus[0]!;
  cpu.cpu.sregs.cr0 |= CR0_WP;
  const r = await withTimeout(cpu.writeCr(0, cpu.cpu.sregs.cr0 & ~CR0_WP), 5000);
  if (r === 'timeout') return 'healthy VM: CR0 write not answered within 5 s';
  if ((cpu.cpu.sregs.cr0 & CR0_WP) === 0n) return 'healthy VM: CR0.WP clear was allowed';
  return 'ok';
}

function closed(s: Socket): Promise<void> {
  return new Promise((r) => (s.destroyed ? r() : s.once('close', () => r())));
}

describe('a peer that stalls mid-message', () => {
  it('half a handshake, half a command reply, half an event: the agent times out what it waits for, and other VMs are unaffected', async () => {
    const dir = tempDir();
    const path = join(dir, 'kvmi.sock');
    const logs: string[] = [];
    const attached: VmConnection[] = [];
    const listener = new KvmiListener({
      paths: [path], cookies: parseCookies(Buffer.from('s')), handshakeTimeoutMs: 1000,
      plan: { vcpuEvents: ['CR'], crs: [0], msrs: [], pageAccess: [] }, decide: denyWpClear,
      log: (level, msg) => logs.push(`${level}: ${msg}`), onAttached: (vm) => attached.push(vm),
    });
    await listener.start();
    cleanups.push(() => listener.stop(200));
    const healthy = new SimVm({ vcpus: 1, seed: 31, name: 'healthy', jitterMs: 0 });
    const hq = new SimQemu(healthy, { path, key: Buffer.from('s'), reconnectSeconds: 10 });
    cleanups.push(() => {
      hq.stop();
      healthy.close();
    });
    hq.start();
    expect(await waitFor(() => attached.some((v) => v.info?.name === 'healthy' && v.state === 'protected'), 10_000)).toBe(true);
    expect(await probe(healthy)).toBe('ok');
    const probes: string[] = [];
    let probing = true;
    const prober = (async () => {
      while (probing) {
        probes.push(await probe(healthy));
        await sleep(20);
      }
    })();

    // 1. Half a QEMU handshake, then silence: closed at the handshake timeout.
    const hsPeer = connect(path);
    hsPeer.on('error', () => undefined);
    cleanups.push(() => void hsPeer.destroy());
    const full = Buffer.alloc(104);
    full.writeUInt32LE(104, 0);
    hsPeer.write(full.subarray(0, 52));
    const t1 = Date.now();
    await withTimeout(closed(hsPeer), 20_000);
    expect(hsPeer.destroyed).toBe(true);
    const hsClosedMs = Date.now() - t1;

    // 2. A complete handshake, then half of the reply to the agent's first command (GET_VERSION): closed
    //    when that command times out.
    const cmdPeer = connect(path);
    cmdPeer.on('error', () => undefined);
    cleanups.push(() => void cmdPeer.destroy());
    await new Promise<void>((r) => cmdPeer.once('connect', () => r()));
    const hs = await performQemuHandshake(cmdPeer, { form: 104, uuid: new Uint8Array(16).fill(0xcc), name: 'half-reply', startTimeMs: 1n, maxGpa: 1n << 30n, key: Buffer.from('s') });
    const first = hs.leftover.length >= 8 ? hs.leftover : await new Promise<Buffer>((r) => cmdPeer.once('data', (d: Buffer) => r(Buffer.concat([hs.leftover, d]))));
    const seq = first.readUInt32LE(structs.kvmi_msg_hdr.field('seq').offset);
    const reply = encodeReply('GET_VERSION', seq, { version: 1, max_msg_size: 8184, features: { singlestep: 0 } });
    cmdPeer.resume();
    cmdPeer.write(reply.subarray(0, reply.length >> 1));
    const t2 = Date.now();
    await withTimeout(closed(cmdPeer), 30_000);
    expect(cmdPeer.destroyed).toBe(true);
    const cmdClosedMs = Date.now() - t2;

    // 3. An attached, protected VM whose KVM sends half an event and then nothing: that vCPU is the peer's
    //    problem; the agent must not block on it (other VMs keep being answered), and it forgets the VM
    //    once the peer closes.
    const proxy = new StallProxy(join(dir, 'stall.sock'), path);
    await proxy.start();
    cleanups.push(() => proxy.stop());
    const stalled = new SimVm({ vcpus: 2, seed: 32, name: 'stalled', jitterMs: 0, apsOnline: true });
    const sq = new SimQemu(stalled, { path: join(dir, 'stall.sock'), key: Buffer.from('s'), reconnectSeconds: 10 });
    cleanups.push(() => {
      sq.stop();
      stalled.close();
    });
    sq.start();
    expect(await waitFor(() => attached.some((v) => v.info?.name === 'stalled' && v.state === 'protected'), 10_000)).toBe(true);
    proxy.stallNextFrame();
    const cpu = stalled.vcpus[0]!;
    void cpu.writeCr(0, cpu.cpu.sregs.cr0 & ~CR0_WP).catch(() => undefined); // its event is cut in half
    expect(await waitFor(() => proxy.stalledFrames === 1, 5000)).toBe(true);
    const before = probes.length;
    expect(await waitFor(() => probes.length >= before + 20, 30_000)).toBe(true);
    sq.stop();
    expect(await waitFor(() => ![...listener.vms.values()].some((v) => v.info?.name === 'stalled'), 10_000)).toBe(true);

    probing = false;
    await prober;
    console.log(`stalling peers: half handshake closed after ${hsClosedMs} ms, half command reply closed after ${cmdClosedMs} ms, ${probes.length} healthy probes`);
    expect(probes.filter((p) => p !== 'ok')).toEqual([]);
    expect(await probe(healthy)).toBe('ok');
    expect([...listener.vms.values()].map((v) => v.info?.name)).toEqual(['healthy']);
  }, 90_000);
});

describe('a peer that floods', () => {
  it('events far faster than the agent answers them (the peer reads the replies): the agent process stays up, memory bounded, the healthy VM unaffected', async () => {
    const r = await runAgentCampaign({
      repoRoot: root, frames: 10_000_000, maxSeconds: 12, seed: 7, fuzzedVms: 2,
      mutateRate: 0, injectRate: 0, handshakeMutateRate: 0, generate: true, generateWindow: 1_000_000,
    });
    console.log(`flooding peer: ${r.proxy.framesGenerated} events generated, ${r.proxy.generatedReplies} answered in ${r.seconds.toFixed(1)} s; agent RSS ${r.rssStartMiB.toFixed(0)} → ${r.rssEndMiB.toFixed(0)} MiB (max ${r.rssMaxMiB.toFixed(0)}); healthy probes ${r.probes.ok} ok, p99 ${r.probes.p99Ms.toFixed(1)} ms`);
    expect(r.failures).toEqual([]);
    expect(r.agentSurvived).toBe(true);
    expect(r.probes.failed).toBe(0);
    expect(r.probes.ok).toBeGreaterThan(10);
    // Far more events than answered were pushed at it, and it kept answering.
    expect(r.proxy.generatedReplies).toBeGreaterThan(10_000);
    expect(r.proxy.framesGenerated).toBeGreaterThan(r.proxy.generatedReplies);
    // Bounded memory: the agent reads no faster than it answers; what waits is in the kernel's socket buffers.
    expect(r.rssMaxMiB).toBeLessThan(r.rssStartMiB + 128);
  }, 120_000);
});

describe('unhook with events in flight', () => {
  it('PREUNHOOK while every vCPU waits for a reply: each is answered or released, no hard error, the agent detaches cleanly, 30 times', async () => {
    const dir = tempDir();
    const sock = join(dir, 'kvmi.sock');
    const agent = new HostAgent({ hostId: 'unhook', kvmiPaths: [sock], cookies: parseCookies(Buffer.from('u')), policy: loadDefaultPolicy(), log: () => undefined });
    await agent.start();
    cleanups.push(() => agent.stop(300));
    let inFlightAtUnhook = 0;
    let answeredDenied = 0;
    let releasedThrough = 0;
    let attempts = 0;
    for (let i = 0; i < 30; i++) {
      const vm = new SimVm({ vcpus: 4, seed: 500 + i, name: `unhook-${i}`, apsOnline: true, jitterMs: 0, runDir: dir, removeRamOnClose: true });
      const q = new SimQemu(vm, { path: sock, key: Buffer.from('u'), reconnectSeconds: 60, unhookTimeoutMs: 10_000 });
      q.start();
      expect(await waitFor(() => agent.listener.vms.get(vm.uuidText)?.state === 'protected', 10_000)).toBe(true);
      // Protected: the attack is denied on every vCPU.
      for (const cpu of vm.vcpus) {
        for (let t = 0; ; t++) {
          cpu.cpu.sregs.cr0 |= CR0_WP;
          await cpu.writeCr(0, cpu.cpu.sregs.cr0 & ~CR0_WP);
          if ((cpu.cpu.sregs.cr0 & CR0_WP) !== 0n) break;
          expect(t).toBeLessThan(500);
          await sleep(5);
        }
      }
      // Every vCPU sends an event, and QEMU starts the unhook before any reply can arrive.
      const writes = vm.vcpus.map((cpu) => {
        cpu.cpu.sregs.cr0 |= CR0_WP;
        return withTimeout(cpu.writeCr(0, cpu.cpu.sregs.cr0 & ~CR0_WP), 10_000);
      });
      // Unhook as soon as events are on the socket and unanswered (the simulated KVM says which vCPUs wait).
      for (let t = 0; !vm.vcpus.some((c) => c.waitingFor !== null) && t < 100_000; t++) await new Promise((r) => setImmediate(r));
      const waiting = vm.vcpus.filter((c) => c.waitingFor !== null).length;
      expect(waiting).toBeGreaterThan(0);
      inFlightAtUnhook += waiting;
      const report = await q.shutdown();
      const results = await Promise.all(writes);
      expect(results.filter((r) => r === 'timeout')).toEqual([]); // no vCPU left waiting
      for (const cpu of vm.vcpus) {
        if ((cpu.cpu.sregs.cr0 & CR0_WP) !== 0n) answeredDenied++;
        else releasedThrough++;
      }
      attempts += vm.vcpus.length;
      expect(report.preunhook).toBe('0');
      expect(report.closedByTool).toBe(true); // the agent saw the UNHOOK event and closed
      expect(vm.stats.hardErrors).toBe(0);
      expect(await waitFor(() => !agent.listener.vms.has(vm.uuidText), 10_000)).toBe(true);
      vm.close();
    }
    console.log(`unhook with events in flight: over 30 unhooks, ${attempts} CR0.WP clears racing the PREUNHOOK (${inFlightAtUnhook} of them waiting for a reply when it was issued): ${answeredDenied} answered (denied), ${releasedThrough} went through (released by KVM at the unhook, or run after it)`);
    expect(answeredDenied + releasedThrough).toBe(attempts);
    // Every event the agent had on its socket before the UNHOOK event was answered (by the local rule), not dropped.
    expect(answeredDenied).toBeGreaterThanOrEqual(inFlightAtUnhook);
    expect(agent.listener.vms.size).toBe(0);
  }, 120_000);
});
