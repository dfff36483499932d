/**
 * The stream: hello + inventory on (re)connect, reports batched behind a bounded queue, drops counted
 * and reported in loss records under a slow consumer — never delaying a vCPU.
 */
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { LinkRequest, LossReason, LostRecordType, VerdictTier } from '@periscope/contracts';
import { cleanup, CR0_WP, CR4_PGE, protectedVm, startAgent, startPeer, startVm, tempDir, testPolicy, until, uuidBytes, metric } from './fixture.js';
import { PbWriter } from '../../src/link/wire.js';
import { ReportQueue, type BatchSink } from '../../src/link/outbound-queue.js';
import type { SimVm } from '@periscope/simulator';
import type { AnalysisPeer } from '@periscope/testing';

afterEach(cleanup);

/** A guest CR0.WP clear, denied locally by testPolicy's cr0-wp-clear rule (a detection): one event, WP kept. */
async function clearWp(cpu: SimVm['vcpus'][number]): Promise<void> {
  cpu.cpu.sregs.cr0 |= CR0_WP;
  const r = await cpu.writeCr(0, cpu.cpu.sregs.cr0 & ~CR0_WP);
  expect(r.events).toHaveLength(1);
  expect(cpu.cpu.sregs.cr0 & CR0_WP).toBe(CR0_WP); // the protection itself is never rate-limited or dropped
}

/** Counts per VM: detections delivered, and detections counted in RATE_LIMITED loss records. */
const ofVm = (vm: SimVm) => (x: { vmUuid: Uint8Array }): boolean => Buffer.from(x.vmUuid).equals(uuidBytes(vm));
const rateLimited = (peer: AnalysisPeer, vm: SimVm): number =>
  peer.losses().filter((l) => l.recordType === LostRecordType.LOST_RECORD_TYPE_DETECTION && l.reason === LossReason.LOSS_REASON_RATE_LIMITED && ofVm(vm)(l)).reduce((n, l) => n + Number(l.droppedCount), 0);

describe('agent link: stream', () => {
  it('dials out, sends hello then one VmAttached per VM (with session generations), again after a reconnect', async () => {
    const peer = await startPeer();
    const dir = tempDir();
    const sock = join(dir, 'k.sock');
    const h = await startAgent({ socketPath: sock, peer });
    const a = await startVm(sock, { vcpus: 2, seed: 1, name: 'vm-a' });
    const b = await startVm(sock, { vcpus: 1, seed: 2, name: 'vm-b' });
    await protectedVm(h, a.vm);
    await protectedVm(h, b.vm);
    await peer.waitFor(() => peer.vmAttached().length >= 2, 5000, 'two VmAttached');
    const first = peer.connections[0]!.received;
    expect(first[0]!.message?.$case).toBe('hello');
    expect(first[0]!.streamSeq).toBe(1n);
    const hello = peer.hellos()[0]!;
    expect(hello).toMatchObject({ hostId: 'test-host', activePolicyId: 'link-test', activePolicyVersion: 1n });
    const byName = new Map(peer.vmAttached().map((v) => [v.name, v]));
    // The generation the listener issued goes up as is (a ms wall-clock value, far above 2^32).
    const genA = h.agent.listener.vms.get(a.vm.uuidText)!.info!.sessionGeneration;
    expect(Number.isSafeInteger(genA) && genA > 2 ** 32).toBe(true);
    expect(byName.get('vm-a')).toMatchObject({ vcpuCount: 2, sessionGeneration: BigInt(genA), vmUuid: uuidBytes(a.vm) });
    // Analysis goes away and comes back on the same port: hello and the full inventory again.
    await peer.restart();
    await peer.waitFor(() => peer.connections.length === 2 && peer.connections[1]!.received.filter((m) => m.message?.$case === 'vmAttached').length === 2, 10_000, 'inventory after reconnect');
    const second = peer.connections[1]!.received;
    expect(second[0]!.message?.$case).toBe('hello');
    expect(second[0]!.message?.$case === 'hello' && second[0]!.message.value.agentInstanceId).toBe(hello.agentInstanceId);
    // The same sessions: a reconnect of the link is not a new KVMI session.
    const again = second.flatMap((m) => (m.message?.$case === 'vmAttached' ? [m.message.value] : []));
    expect(again.find((v) => v.name === 'vm-a')!.sessionGeneration).toBe(BigInt(genA));
    expect(metric(h, 'periscope_agent_link_connects_total')).toBe(2);
    expect(metric(h, 'periscope_agent_link_state')).toBe(2);
  });

  it('batches verdict records; a slow consumer makes the bounded queue drop, and every drop is counted in a loss record', async () => {
    const peer = await startPeer();
    const dir = tempDir();
    const sock = join(dir, 'k.sock');
    const h = await startAgent({ socketPath: sock, peer, link: { reportQueueSize: 200, batchMax: 50 }, policy: testPolicy({ defaultReport: 'always' }) });
    // The event-loop lag is measured over the same window as the simulator's maxReplyWaitMs (from the VM's
    // start), so the bound below compares like with like.
    const { monitorEventLoopDelay } = await import('node:perf_hooks');
    const loop = monitorEventLoopDelay({ resolution: 5 });
    loop.enable();
    const { vm } = await startVm(sock, { vcpus: 4, seed: 3 });
    await protectedVm(h, vm);
    await peer.waitFor(() => peer.vmAttached().length === 1);
    // Phase 1, fast consumer: several records per message.
    const cpu0 = vm.vcpus[0]!;
    for (let i = 0; i < 300; i++) await cpu0.writeCr(0, cpu0.cpu.sregs.cr0 ^ 8n); // CR0.TS toggles: default allow, reported
    await peer.waitFor(() => peer.verdictRecords().length >= 300, 5000, '300 records');
    expect(peer.verdictBatches().some((b) => b.records.length > 1)).toBe(true);
    const rec = peer.verdictRecords()[0]!;
    expect(rec).toMatchObject({ vmUuid: uuidBytes(vm), sessionGeneration: BigInt(h.agent.listener.vms.get(vm.uuidText)!.info!.sessionGeneration), tier: VerdictTier.VERDICT_TIER_DEFAULT, policyVersion: 1n });
    expect(rec.latencyNs).toBeGreaterThan(0n);
    expect(rec.replyValue).toBeDefined();
    // Phase 2, slow consumer: the peer stops reading for 2 s after each message, until the agent's
    // HTTP/2 window fills and its bounded queue overflows.
    peer.slow(2000);
    let N = 0;
    const dropped = () => metric(h, 'periscope_agent_reports_dropped_total');
    await Promise.all(
      vm.vcpus.map(async (cpu) => {
        while ((N < 2000 || dropped() === 0) && N < 100_000) {
          await cpu.writeCr(0, cpu.cpu.sregs.cr0 ^ 8n);
          N++;
        }
      }),
    );
    loop.disable();
    expect(dropped()).toBeGreaterThan(0);
    // No vCPU waited on the link: every reply was immediate even with the consumer stalled (allowing for
    // the time this process — agent and simulator together — was not scheduled on the shared cores).
    expect(vm.stats.maxReplyWaitMs).toBeLessThan(loop.max / 1e6 + 100);
    peer.slow(0);
    const total = 300 + N;
    await peer.waitFor(() => {
      const got = peer.verdictRecords().length;
      const lost = peer.losses().reduce((n, l) => n + (l.recordType === LostRecordType.LOST_RECORD_TYPE_VERDICT ? Number(l.droppedCount) : 0), 0);
      return got + lost === total;
    }, 30_000, 'every record delivered or counted lost');
    const lost = peer.losses();
    expect(lost.length).toBeGreaterThan(0);
    expect(lost.every((l) => l.reason === LossReason.LOSS_REASON_QUEUE_FULL)).toBe(true);
    expect(lost.every((l) => l.windowEndUnixNs >= l.windowStartUnixNs)).toBe(true);
    expect(metric(h, 'periscope_agent_reports_dropped_total')).toBe(lost.reduce((n, l) => n + Number(l.droppedCount), 0));
    expect(peer.verdictBatches().every((b) => b.records.length <= 50)).toBe(true);
  }, 60_000);

  it('a detection that does not fit the spool is dropped, counted and reported in a LossRecord (also one dropped while the link was down)', async () => {
    const peer = await startPeer();
    const dir = tempDir();
    const sock = join(dir, 'k.sock');
    // A spool smaller than one detection: every detection is dropped.
    const h = await startAgent({ socketPath: sock, peer, link: { spoolMaxBytes: 64 }, stateDir: join(dir, 'state') });
    const { vm } = await startVm(sock, { vcpus: 1, seed: 17 });
    await protectedVm(h, vm);
    await peer.waitFor(() => peer.vmAttached().length === 1);
    const cpu = vm.vcpus[0]!;
    const attack = (): Promise<void> => clearWp(cpu);
    const detectionLosses = () => peer.losses().filter((l) => l.recordType === LostRecordType.LOST_RECORD_TYPE_DETECTION);
    const lostCount = () => detectionLosses().reduce((n, l) => n + Number(l.droppedCount), 0);
    for (let i = 0; i < 3; i++) await attack();
    await peer.waitFor(() => lostCount() === 3, 5000, 'three detections reported lost');
    for (const l of detectionLosses()) {
      expect(l).toMatchObject({ vmUuid: uuidBytes(vm), sessionGeneration: peer.vmAttached()[0]!.sessionGeneration, reason: LossReason.LOSS_REASON_QUEUE_FULL });
      expect(l.windowEndUnixNs >= l.windowStartUnixNs).toBe(true);
    }
    expect(peer.detections()).toEqual([]);
    expect(metric(h, 'periscope_agent_detections_dropped_total')).toBe(3);
    expect(h.logs.filter((l) => l.includes('detection spool full'))).toHaveLength(3);
    // Dropped while analysis is down: the count waits for the next stream.
    await peer.kill();
    await until(() => !h.agent.link!.client.up, 5000, 'the agent to see the stream down');
    await attack();
    expect(metric(h, 'periscope_agent_detections_dropped_total')).toBe(4);
    await peer.start();
    await peer.waitFor(() => lostCount() === 4, 10_000, 'the fourth loss reported after the reconnect');
  });

  it('detections beyond the per-VM rate are counted, not raised, and reported in RATE_LIMITED loss records; other VMs keep their budget; every verdict record still goes up', async () => {
    const peer = await startPeer({ autoAckDetections: true });
    const dir = tempDir();
    const sock = join(dir, 'k.sock');
    const h = await startAgent({ socketPath: sock, peer, link: { detectionRatePerVm: 5 } });
    const a = await startVm(sock, { vcpus: 1, seed: 18, name: 'storm' });
    const b = await startVm(sock, { vcpus: 1, seed: 19, name: 'quiet' });
    await protectedVm(h, a.vm);
    await protectedVm(h, b.vm);
    await peer.waitFor(() => peer.vmAttached().length === 2);
    const attack = clearWp;
    const storm = 60;
    const t0 = performance.now();
    for (let i = 0; i < storm; i++) await attack(a.vm.vcpus[0]!);
    const stormS = (performance.now() - t0) / 1000;
    await attack(b.vm.vcpus[0]!);
    const of = ofVm;
    const raisedA = () => peer.detections().filter(of(a.vm)).length;
    const lostA = () => rateLimited(peer, a.vm);
    // Every attack is accounted for exactly once: raised, or counted in a loss record.
    await peer.waitFor(() => raisedA() + lostA() === storm && peer.detections().some(of(b.vm)), 10_000, 'every detection raised or counted');
    expect(raisedA()).toBeGreaterThanOrEqual(5); // the burst
    expect(raisedA()).toBeLessThanOrEqual(5 + Math.ceil(5 * (stormS + 0.1))); // the burst + the refill over the storm's time
    expect(lostA()).toBe(metric(h, 'periscope_agent_detections_rate_limited_total'));
    expect(rateLimited(peer, b.vm)).toBe(0); // the quiet VM had its own budget
    // The verdict records are not rate-limited: one per attack.
    await peer.waitFor(() => peer.verdictRecords().filter((r) => r.ruleId === 'cr0-wp-clear' && of(a.vm)(r)).length === storm, 10_000, 'every verdict record');
  });

  it('the host-wide detection budget caps several VMs together, but a storming VM cannot use up another VM\'s floor', async () => {
    const peer = await startPeer({ autoAckDetections: true });
    const dir = tempDir();
    const sock = join(dir, 'k.sock');
    // No per-VM cap; 15 a second for the whole host.
    const h = await startAgent({ socketPath: sock, peer, link: { detectionRatePerVm: 0, detectionRatePerHost: 15 } });
    const a = await startVm(sock, { vcpus: 1, seed: 20, name: 'storm' });
    const b = await startVm(sock, { vcpus: 1, seed: 21, name: 'victim' });
    await protectedVm(h, a.vm);
    await protectedVm(h, b.vm);
    await peer.waitFor(() => peer.vmAttached().length === 2);
    const attack = clearWp;
    const of = ofVm;
    const limited = (vm: SimVm): number => rateLimited(peer, vm);
    const t0 = performance.now();
    for (let i = 0; i < 80; i++) await attack(a.vm.vcpus[0]!); // uses its floor, then the whole host budget
    for (let i = 0; i < 5; i++) await attack(b.vm.vcpus[0]!); // the victim: within its own floor
    const elapsedS = (performance.now() - t0) / 1000;
    await peer.waitFor(() => peer.detections().filter(of(a.vm)).length + limited(a.vm) === 80 && peer.detections().filter(of(b.vm)).length === 5, 10_000, 'every attack accounted for');
    // The storm got its floor (10) and the host budget (15) plus their refill over the run, not 80.
    expect(peer.detections().filter(of(a.vm)).length).toBeLessThanOrEqual(10 + 15 + Math.ceil((10 + 15) * (elapsedS + 0.1)));
    expect(limited(a.vm)).toBeGreaterThan(0);
    expect(limited(b.vm)).toBe(0); // every one of the victim's detections raised
  });

  it('hand-encoded verdict batches decode with the generated code, including u64 values with the high bit set', () => {
    const writes: Buffer[] = [];
    let seq = 0;
    const sink: BatchSink = { writable: true, up: true, write: (b) => (writes.push(b), true), seq: () => ++seq };
    const q = new ReportQueue({ capacity: 4, maxBatch: 4, hostId: 'h' });
    const vmRef = { uuid: '00112233-4455-6677-8899-aabbccddeeff', uuidBytes: Buffer.from('00112233445566778899aabbccddeeff', 'hex'), generation: 1_795_000_000_123 }; // a wall-clock session generation (> 2^32)
    const pol = { id: 'p', version: 3n, ruleIds: ['r0', 'r1'], exceptionIds: ['x0'] };
    q.push(vmRef, 5, 0xfffffff0, 8, VerdictTier.VERDICT_TIER_LOCAL, 0, 0, true, 0xdeadbeef, 0xffffffff, 1, 0, pol, 12345, 1, null);
    q.push(vmRef, 0, 1, 3, VerdictTier.VERDICT_TIER_DEFAULT, 1, 2, false, 0, 0, -1, -1, pol, 0, 1, null);
    q.push(vmRef, 0, 2, 3, VerdictTier.VERDICT_TIER_DEFAULT, 1, 0, false, 0, 0, -1, -1, pol, 0, 1, null);
    expect(q.push(vmRef, 0, 3, 3, 1, 0, 0, false, 0, 0, -1, -1, pol, 0, 1, null)).toBe(true);
    expect(q.push(vmRef, 0, 4, 3, 1, 0, 0, false, 0, 0, -1, -1, pol, 0, 1, null)).toBe(false);
    q.attach(sink);
    q.flush();
    const msgs = writes.map((b) => LinkRequest.decode(b));
    expect(msgs.map((m) => m.message?.$case)).toEqual(['loss', 'verdictBatch']);
    const batch = msgs[1]!.message!.$case === 'verdictBatch' ? msgs[1]!.message!.value : undefined;
    expect(batch!.records).toHaveLength(4);
    expect(batch!.records[0]).toMatchObject({ vcpu: 5, seq: 0xfffffff0, sessionGeneration: 1_795_000_000_123n, replyValue: 0xffffffffdeadbeefn, ruleId: 'r1', exceptionId: 'x0', policyVersion: 3n, latencyNs: 12345n });
    expect(batch!.records[1]!.replyValue).toBeUndefined();
    expect(msgs.map((m) => m.streamSeq)).toEqual([1n, 2n]);
    // Long length prefixes are moved into place.
    const w = new PbWriter(8);
    const mark = w.beginLen(1);
    w.string(2, 'x'.repeat(300));
    w.endLen(mark);
    const out = w.take();
    expect(out.subarray(0, 3)).toEqual(Buffer.from([0x0a, 0xaf, 0x02])); // 303 = tag + 2-byte length + 300
    expect(out.length).toBe(306);
    void CR4_PGE;
  });
});
