/**
 * #8 leftovers on the gRPC side: the live alert stream (`OperatorService.WatchAlerts`), the plaintext
 * health-only port for Kubernetes probes (`healthListen`), and the connection age limits
 * (`grpc.max_connection_age_ms` / `_grace_ms`) that make agents rebalance across replicas.
 */
import { credentials, Metadata, status, type ClientReadableStream, type ServiceError } from '@grpc/grpc-js';
import { afterEach, describe, expect, it } from 'vitest';
import { EventAction, EventDisposition, OperatorServiceClient, Severity, uuidToBytes, VerdictTier, type Detection, type WatchAlertsResponse } from '@periscope/contracts';
import { Analysis, ServingStatus, type AnalysisOptions } from '../src/index.js';
import { healthClient, POLICY_ALL, ScriptedAgent, until } from './support.js';

const VM1 = '11111111-2222-4333-8444-777777777777';
const TOKEN = 'watch-token';

function detection(id: string, over: { rip?: bigint; newValue?: bigint } = {}): Detection {
  const rip = over.rip ?? 0xffffffffc0200014n;
  return {
    detectionId: id, hostId: 'host-w', vmUuid: uuidToBytes(VM1), sessionGeneration: 1n, vcpu: 0, ruleId: 'fleet-default/cr-pinning/cr4', severity: Severity.SEVERITY_HIGH,
    summary: 'CR4 write clears SMEP', eventSeqs: [7], detectedUnixNs: BigInt(Date.now()) * 1_000_000n, attributes: { cr: '4' },
    event: {
      hostId: 'host-w', vmUuid: uuidToBytes(VM1), sessionGeneration: 1n, vcpu: 0, seq: 7, receivedUnixNs: 1n, repliedUnixNs: 2n, disposition: EventDisposition.EVENT_DISPOSITION_ANSWERED,
      verdictDeadlineUnixNs: 0n, ruleId: 'fleet-default/cr-pinning/cr4', policyVersion: 1000n, mode: 8,
      regs: { rax: 0n, rbx: 0n, rcx: 0n, rdx: 0n, rsi: 0n, rdi: 0n, rsp: 0n, rbp: 0n, r8: 0n, r9: 0n, r10: 0n, r11: 0n, r12: 0n, r13: 0n, r14: 0n, r15: 0n, rip, rflags: 0x246n },
      payload: { $case: 'cr', value: { cr: 4, oldValue: 0x3406e0n, newValue: over.newValue ?? 0x0406e0n } },
    },
    verdict: { vmUuid: uuidToBytes(VM1), sessionGeneration: 1n, vcpu: 0, seq: 7, kind: 5, tier: VerdictTier.VERDICT_TIER_LOCAL, defaultReason: 0, action: EventAction.EVENT_ACTION_CONTINUE, replyValue: 0x3406e0n, ruleId: 'fleet-default/cr-pinning/cr4', exceptionId: '', policyVersion: 1000n, latencyNs: 900n, repliedUnixNs: 3n },
    instructionBytes: Buffer.alloc(0), instructionText: '', policyId: 'periscope-analysis', policyVersion: 1000n,
  };
}

const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  while (cleanups.length) await cleanups.pop()!();
});

async function start(extra: Partial<AnalysisOptions> = {}): Promise<Analysis> {
  const a = await Analysis.start({ db: 'pglite:memory', grpcListen: '127.0.0.1:0', keepaliveMs: 200, flushMs: 100, ...extra });
  cleanups.push(() => a.stop());
  return a;
}

function agent(a: Analysis): ScriptedAgent {
  const ag = new ScriptedAgent(`127.0.0.1:${a.grpcPort}`, 'host-w');
  cleanups.push(() => ag.close());
  ag.hello();
  ag.attach({ uuid: VM1, name: 'watched' });
  return ag;
}

function watch(a: Analysis, req: { minSeverity?: Severity; afterSeq?: bigint; vmUuid?: Buffer }, token: string | null = TOKEN) {
  const client = new OperatorServiceClient(`127.0.0.1:${a.grpcPort}`, credentials.createInsecure());
  const md = new Metadata();
  if (token) md.set('authorization', `Bearer ${token}`);
  const call: ClientReadableStream<WatchAlertsResponse> = client.watchAlerts({ minSeverity: req.minSeverity ?? 0, hostId: '', vmUuid: req.vmUuid ?? Buffer.alloc(0), afterSeq: req.afterSeq ?? 0n }, md);
  const got: WatchAlertsResponse[] = [];
  const state: { error: ServiceError | null; ended: boolean } = { error: null, ended: false };
  call.on('data', (r: WatchAlertsResponse) => got.push(r));
  call.on('error', (e: ServiceError) => (state.error = e));
  call.on('end', () => (state.ended = true));
  cleanups.push(() => {
    call.cancel();
    client.close();
  });
  return { call, got, state };
}

describe('OperatorService.WatchAlerts (live alert stream over gRPC)', () => {
  it('streams new and folded alerts as they happen, replays stored ones after after_seq, filters, needs the token', async () => {
    const a = await start({ apiToken: TOKEN });
    await a.applyPolicy(POLICY_ALL);
    const ag = agent(a);
    // Two alerts before any watcher; a replay after the first one's seq gets the second.
    ag.send({ $case: 'detection', value: detection('w-0', { rip: 0xffffffffc0300000n }) });
    ag.send({ $case: 'detection', value: detection('w-00', { rip: 0xffffffffc0400000n }) });
    await until(async () => (await a.store.listAlerts({})).length === 2, 5000, 'stored alerts');
    const [second, first] = await a.store.listAlerts({});

    const denied = watch(a, {}, null);
    await until(() => denied.state.error !== null, 5000, 'refusal');
    expect(denied.state.error!.code).toBe(status.UNAUTHENTICATED);

    const live = watch(a, {});
    const critical = watch(a, { minSeverity: Severity.SEVERITY_CRITICAL });
    const otherVm = watch(a, { vmUuid: uuidToBytes('11111111-2222-4333-8444-000000000000') });
    const replay = watch(a, { afterSeq: first!.seq });
    await until(() => replay.got.length === 1, 5000, 'replay');
    expect(replay.got[0]).toMatchObject({ outcome: 'stored', alert: { alertId: second!.id, seq: second!.seq, technique: 'T1068' } });
    await new Promise((r) => setTimeout(r, 100)); // the live watchers are subscribed

    ag.send({ $case: 'detection', value: detection('w-1') });
    await until(() => live.got.length === 1, 5000, 'created');
    expect(live.got[0]).toMatchObject({ outcome: 'created', alert: { ruleId: 'fleet-default/cr-pinning/cr4', severity: Severity.SEVERITY_HIGH, count: 1n, detectionIds: [] } });
    expect(live.got[0]!.alert!.vmUuid).toEqual(uuidToBytes(VM1));
    ag.send({ $case: 'detection', value: detection('w-2') }); // the same attempt again: folded into the open alert
    await until(() => live.got.length === 2, 5000, 'folded');
    expect(live.got[1]).toMatchObject({ outcome: 'folded', alert: { alertId: live.got[0]!.alert!.alertId, count: 2n } });
    await until(() => replay.got.length === 3, 5000, 'replay then live');
    expect(replay.got.map((r) => r.outcome)).toEqual(['stored', 'created', 'folded']);
    expect(critical.got).toEqual([]);
    expect(otherVm.got).toEqual([]);
    expect(live.state.error).toBeNull();
  });

  it('open watches do not keep the server from stopping: they end', async () => {
    const a = await Analysis.start({ db: 'pglite:memory', grpcListen: '127.0.0.1:0', keepaliveMs: 200, flushMs: 100 });
    const w = watch(a, {}, null);
    await new Promise((r) => setTimeout(r, 200));
    const t0 = Date.now();
    await a.stop();
    expect(Date.now() - t0).toBeLessThan(3000);
    await until(() => w.state.ended || w.state.error !== null, 5000, 'stream ended');
  });
});

describe('health-only plaintext port and connection age', () => {
  it('--health-listen serves grpc.health.v1 only, in plaintext (the main port may be mTLS)', async () => {
    const a = await start({ healthListen: '127.0.0.1:0' });
    expect(a.healthPort).toBeGreaterThan(0);
    expect(a.healthPort).not.toBe(a.grpcPort);
    const h = healthClient(`127.0.0.1:${a.healthPort}`);
    cleanups.push(() => h.close());
    expect(await h.check('')).toBe(ServingStatus.SERVING);
    expect(await h.check('periscope.v1.AgentLinkService')).toBe(ServingStatus.SERVING);
    await expect(h.check('nope')).rejects.toMatchObject({ code: status.NOT_FOUND });
    // Nothing else is served there.
    const op = new OperatorServiceClient(`127.0.0.1:${a.healthPort}`, credentials.createInsecure());
    cleanups.push(() => op.close());
    const err = await new Promise<ServiceError | null>((r) => op.listHosts({ pageSize: 0, pageToken: '', connectedOnly: false }, (e) => r(e)));
    expect(err?.code).toBe(status.UNIMPLEMENTED);
  });

  it('grpc max connection age closes agent links after the age plus grace (agents reconnect and rebalance)', async () => {
    const a = await start({ grpcMaxConnectionAgeMs: 300, grpcMaxConnectionAgeGraceMs: 100 });
    const ag = agent(a);
    await until(() => a.sessions.size === 1, 5000, 'agent linked');
    const t0 = Date.now();
    await until(() => ag.ended, 5000, 'link closed by the server');
    expect(Date.now() - t0).toBeLessThan(3000);
    await until(() => a.sessions.size === 0, 5000, 'session gone');

    const b = await start();
    const bg = agent(b);
    await until(() => b.sessions.size === 1, 5000, 'agent linked');
    await new Promise((r) => setTimeout(r, 800));
    expect(bg.ended).toBe(false); // without the option connections live on
  });
});
