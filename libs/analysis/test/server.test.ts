/**
 * Server-level tests: a real analysis service (real gRPC, real HTTP, PGlite and the real PostgreSQL)
 * against a scripted agent speaking LinkRequest over a real grpc-js client.
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { CommandStatus, EventAction, EventDisposition, Severity, uuidToBytes, VerdictTier, type Detection } from '@periscope/contracts';
import { compilePolicy, parsePolicyText } from '@periscope/verdicts';
import { Analysis, MAX_PAGE_ACCESS_BATCH, MIGRATIONS, ServingStatus, type AnalysisOptions } from '../src/index.js';
import { DB_VARIANTS, fakeGuest, resetDatabase, healthClient, http, POLICY_ALL, ScriptedAgent, until } from './support.js';

const SLIDE = 0x1400000n;
const VM1 = '11111111-2222-4333-8444-555555555555';
const VM2 = '11111111-2222-4333-8444-666666666666';

function detection(id: string, over: Partial<Detection> = {}): Detection {
  return {
    detectionId: id, hostId: 'host-a', vmUuid: uuidToBytes(VM1), sessionGeneration: 1n, vcpu: 0, ruleId: 'fleet-default/cr-pinning/cr4', severity: Severity.SEVERITY_HIGH,
    summary: 'CR4 write clears SMEP', eventSeqs: [7], detectedUnixNs: BigInt(Date.now()) * 1_000_000n, attributes: { cr: '4' },
    event: {
      hostId: 'host-a', vmUuid: uuidToBytes(VM1), sessionGeneration: 1n, vcpu: 0, seq: 7, receivedUnixNs: 1n, repliedUnixNs: 2n, disposition: EventDisposition.EVENT_DISPOSITION_ANSWERED,
      verdictDeadlineUnixNs: 0n, ruleId: 'fleet-default/cr-pinning/cr4', policyVersion: 1000n, mode: 8,
      regs: { rax: 0x3406e0n, rbx: 0n, rcx: 0n, rdx: 0n, rsi: 0n, rdi: 0n, rsp: 0xffffc90000001000n, rbp: 0n, r8: 0n, r9: 0n, r10: 0n, r11: 0n, r12: 0n, r13: 0n, r14: 0n, r15: 0n, rip: 0xffffffffc0200014n, rflags: 0x246n },
      payload: { $case: 'cr', value: { cr: 4, oldValue: 0x3406e0n, newValue: 0x0406e0n } },
    },
    verdict: { vmUuid: uuidToBytes(VM1), sessionGeneration: 1n, vcpu: 0, seq: 7, kind: 5, tier: VerdictTier.VERDICT_TIER_LOCAL, defaultReason: 0, action: EventAction.EVENT_ACTION_CONTINUE, replyValue: 0x3406e0n, ruleId: 'fleet-default/cr-pinning/cr4', exceptionId: '', policyVersion: 1000n, latencyNs: 900n, repliedUnixNs: 3n },
    instructionBytes: Buffer.from('0f22e0', 'hex'), instructionText: 'mov cr4, rax', policyId: 'periscope-analysis', policyVersion: 1000n,
    ...over,
  };
}

describe.each(DB_VARIANTS)('analysis server on $name', (variant) => {
  let dbUrl = '';
  let drop: () => Promise<void> = async () => undefined;
  const cleanups: (() => Promise<void> | void)[] = [];
  beforeAll(async () => {
    const d = await variant.create();
    dbUrl = d.url;
    drop = d.drop;
  });
  afterEach(async () => {
    while (cleanups.length) await cleanups.pop()!();
  });
  afterAll(async () => drop());

  async function start(extra: Partial<AnalysisOptions> = {}): Promise<{ a: Analysis; base: string }> {
    await resetDatabase(dbUrl);
    const a = await Analysis.start({ db: dbUrl, grpcListen: '127.0.0.1:0', httpListen: '127.0.0.1:0', keepaliveMs: 200, flushMs: 100, ...extra });
    cleanups.push(() => a.stop());
    return { a, base: `http://127.0.0.1:${a.httpPort}` };
  }

  function agent(a: Analysis, host = 'host-a'): ScriptedAgent {
    const ag = new ScriptedAgent(`127.0.0.1:${a.grpcPort}`, host);
    cleanups.push(() => ag.close());
    return ag;
  }

  it('migrates once, answers grpc.health.v1 and /healthz', async () => {
    const { a, base } = await start();
    const h = healthClient(`127.0.0.1:${a.grpcPort}`);
    cleanups.push(() => h.close());
    expect(await h.check('')).toBe(ServingStatus.SERVING);
    expect(await h.check('periscope.v1.AgentLinkService')).toBe(ServingStatus.SERVING);
    await expect(h.check('no.such.Service')).rejects.toThrow(/NOT_FOUND|unknown service/);
    expect((await http(base, '/healthz')).body).toMatchObject({ status: 'ok', db: variant.name === 'pglite' || dbUrl.startsWith('pglite') ? 'pglite' : 'postgres' });
    const rows = await a.db.query<{ version: number }>('SELECT version FROM schema_migrations');
    expect(rows.map((r) => r.version)).toEqual(MIGRATIONS.map((m) => m.version));
  });

  it('policy documents: validated with paths, versioned, idempotent import', async () => {
    const { a, base } = await start();
    const bad = await http(base, '/v1/policies', { method: 'POST', body: 'name: Bad Name\nmodules:\n  cr-pinning: { cr4: [SMEPP], action: block }\n  nope: {}\n' });
    expect(bad.status).toBe(400);
    expect(bad.body.error!.issues).toEqual(expect.arrayContaining([
      { path: 'name', message: expect.stringContaining('a-z') },
      { path: 'modules.nope', message: expect.stringContaining('unknown key') },
      { path: 'modules.cr-pinning.cr4[0]', message: expect.stringContaining('unknown bit "SMEPP"') },
      { path: 'modules.cr-pinning.action', message: expect.stringContaining('deny, report') },
    ]));
    const syntax = await http(base, '/v1/policies', { method: 'POST', body: 'name: x\nmodules: [\n' });
    expect(syntax.body.error!.issues[0]!.path).toMatch(/^line \d+, column \d+$/);
    const dir = mkdtempSync(join(tmpdir(), 'pol-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    writeFileSync(join(dir, 'fleet.yaml'), POLICY_ALL);
    expect(await a.importPolicyDir(dir)).toEqual([{ name: 'fleet-default', version: 1n, changed: true }]);
    expect(await a.importPolicyDir(dir)).toEqual([{ name: 'fleet-default', version: 1n, changed: false }]);
    writeFileSync(join(dir, 'fleet.yaml'), POLICY_ALL.replace('tables: [IDTR, GDTR]', 'tables: [IDTR]'));
    expect(await a.importPolicyDir(dir)).toEqual([{ name: 'fleet-default', version: 2n, changed: true }]);
    const got = await http(base, '/v1/policies/fleet-default');
    expect(got.body).toMatchObject({ name: 'fleet-default', version: '2' });
    expect((got.body['history'] as unknown[]).length).toBe(2);
  });

  it('inventory, local policy and kernel code integrity at attach (slide, translate, page access ≤ 511)', async () => {
    const { a, base } = await start();
    await a.applyPolicy(POLICY_ALL);
    const ag = agent(a);
    const guest = fakeGuest(SLIDE);
    ag.onCommand = guest.answer;
    ag.hello();
    ag.attach({ uuid: VM1, name: 'web-1', vcpus: 2 });
    await until(() => a.liveVms.get(VM1)?.protection['kernel-code-integrity']?.startsWith('protected') ?? false, 10_000, 'protection');
    await a.settled();
    // Commands: read LSTAR, translate it, read the signature, then restrict pages.
    const kinds = guest.commands.map((c) => c.command!.$case);
    expect(kinds.slice(0, 3)).toEqual(['getRegisters', 'translateGva', 'readPhysical']);
    const spa = guest.commands.filter((c) => c.command!.$case === 'setPageAccess').map((c) => (c.command as { value: { entries: { gpa: bigint; allowedAccess: number }[] } }).value.entries);
    const pages = spa.flat();
    for (const b of spa) expect(b.length).toBeLessThanOrEqual(MAX_PAGE_ACCESS_BATCH);
    // .text 0x10000 + .rodata 0x4000 + sim_protected_data's page = 16 + 4 + 1 pages
    expect(pages.length).toBe(21);
    expect(pages[0]).toEqual({ gpa: guest.textPhys, allowedAccess: 5 });
    expect(pages.every((p) => p.allowedAccess === 5 && p.gpa % 0x1000n === 0n)).toBe(true);
    // The local policy: a verdicts document that compiles, with the per-GPA rule and text_poke allowed.
    const installs = ag.of('installPolicy');
    expect(installs.length).toBeGreaterThanOrEqual(1);
    const last = installs[installs.length - 1]!;
    expect(last.policyId).toBe('periscope-analysis');
    const doc = parsePolicyText(last.verdictsDocument);
    expect(doc.version).toBe(last.version);
    compilePolicy(doc);
    const text = doc.rules.find((r) => r.id === `fleet-default/kernel-code-integrity/text#${VM1}`)!;
    expect(text.match.gpa).toEqual([{ start: guest.textPhys, end: guest.textPhys + 0x10000n }]);
    expect(text.action).toEqual({ kind: 'skip' });
    const poke = doc.exceptions!.find((e) => e.id.startsWith('fleet-default/kernel-code-integrity/writers'))!;
    expect(poke.match.rip).toEqual([{ start: guest.textBase + 0x300n, end: guest.textBase + 0x304n }]);
    expect(doc.interception).toMatchObject({ events: expect.arrayContaining(['CR', 'MSR', 'PF', 'DESCRIPTOR']), crs: [0, 4] });
    // Versions strictly increase.
    for (let i = 1; i < installs.length; i++) expect(installs[i]!.version > installs[i - 1]!.version).toBe(true);
    // The policy was sent before the first page was restricted.
    const order = ag.received.map((r) => (r.message?.$case === 'command' ? r.message.value.command!.$case : r.message?.$case));
    expect(order.indexOf('installPolicy')).toBeLessThan(order.indexOf('setPageAccess'));
    // Inventory over HTTP.
    const vms = await http(base, '/v1/vms');
    expect(vms.body['vms']).toEqual([expect.objectContaining({ uuid: VM1, name: 'web-1', hostId: 'host-a', attached: true, sessionGeneration: '1', vcpuCount: 2, maxGfn: '8192', policyName: 'fleet-default', allowedCommands: ['GET_VERSION', 'VM_SET_PAGE_ACCESS', 'VCPU_GET_REGISTERS', 'VCPU_TRANSLATE_GVA'], kvmiVersion: { version: 1, maxMsgSize: 4096, singlestep: true } })]);
    const hosts = await http(base, '/v1/hosts');
    expect(hosts.body['hosts']).toEqual([expect.objectContaining({ hostId: 'host-a', connected: true, capabilities: ['LOCAL_POLICY', 'ASK_CENTRAL'], attachedVmCount: 1 })]);
    const vm = await http(base, `/v1/vms/${VM1}`);
    expect((vm.body['vm'] as { derived: Record<string, string> }).derived).toMatchObject({ slide: `0x${SLIDE.toString(16)}`, profile: 'linux-sim' });
  });

  it('translation all-ones on vCPU 0 is retried on a vCPU in kernel mode', async () => {
    const { a } = await start();
    await a.applyPolicy(POLICY_ALL);
    const ag = agent(a);
    const guest = fakeGuest(0x200000n, { allOnesOnVcpu0: true });
    ag.onCommand = guest.answer;
    ag.hello();
    ag.attach({ uuid: VM1, name: 'web-1', vcpus: 2 });
    await until(() => a.liveVms.get(VM1)?.protection['kernel-code-integrity']?.startsWith('protected') ?? false, 10_000, 'protection');
    const tr = guest.commands.filter((c) => c.command!.$case === 'translateGva').map((c) => c.vcpu);
    expect(tr).toEqual([0, 1]);
  });

  it('the slide is derived once per boot and again when the QEMU start time changes', async () => {
    const { a } = await start();
    await a.applyPolicy(POLICY_ALL);
    const ag = agent(a);
    const guest = fakeGuest(SLIDE);
    ag.onCommand = guest.answer;
    ag.hello();
    ag.attach({ uuid: VM1, name: 'web-1', generation: 1n, startTimeMs: 1000n });
    await until(() => a.liveVms.get(VM1)?.protection['kernel-code-integrity']?.startsWith('protected') ?? false);
    const derivations = () => guest.commands.filter((c) => c.command!.$case === 'readPhysical').length;
    const restrictions = () => guest.commands.filter((c) => c.command!.$case === 'setPageAccess').length;
    expect([derivations(), restrictions()]).toEqual([1, 1]);
    ag.attach({ uuid: VM1, name: 'web-1', generation: 2n, startTimeMs: 1000n }); // new session, same boot
    await until(() => restrictions() === 2);
    await a.settled();
    expect(derivations()).toBe(1);
    ag.attach({ uuid: VM1, name: 'web-1', generation: 3n, startTimeMs: 2000n }); // guest rebooted
    await until(() => restrictions() === 3);
    expect(derivations()).toBe(2);
  });

  it('detections: one alert per detection id, acked, redelivery is idempotent, storms fold', async () => {
    const { a, base } = await start();
    await a.applyPolicy(POLICY_ALL);
    const ag = agent(a);
    ag.onCommand = fakeGuest(SLIDE).answer;
    ag.hello();
    ag.attach({ uuid: VM1, name: 'web-1' });
    ag.send({ $case: 'detection', value: detection('d-1') });
    await until(() => ag.of('detectionAck').length === 1);
    expect(ag.of('detectionAck')[0]!.detectionIds).toEqual(['d-1']);
    ag.send({ $case: 'detection', value: detection('d-1') }); // redelivered after a reconnect
    await until(() => ag.of('detectionAck').length === 2);
    let list = await http(base, '/v1/alerts');
    expect((list.body['alerts'] as unknown[]).length).toBe(1);
    const alert = (list.body['alerts'] as Record<string, unknown>[])[0]!;
    expect(alert).toMatchObject({
      severity: 'high', state: 'open', technique: { id: 'T1068', name: 'Exploitation for Privilege Escalation' }, module: 'cr-pinning', ruleId: 'fleet-default/cr-pinning/cr4',
      policy: { name: 'fleet-default', localId: 'periscope-analysis', version: '1000' }, hostId: 'host-a', vm: { uuid: VM1, name: 'web-1' }, vcpu: 0, action: 'deny', tier: 'local', count: '1',
      evidence: {
        attempt: { event: 'CR', register: 'cr4', old: '0x3406e0', new: '0x406e0', rip: '0xffffffffc0200014', instruction: { bytes: '0f22e0', text: 'mov cr4, rax' } },
        registers: expect.objectContaining({ rip: '0xffffffffc0200014', rax: '0x3406e0' }),
      },
    });
    expect(alert['title']).toMatch(/^Blocked: SMEP\/SMAP cleared .* on web-1 vCPU 0$/);
    // A storm of the same attempt folds into the alert.
    for (let i = 2; i <= 6; i++) ag.send({ $case: 'detection', value: detection(`d-${i}`) });
    await until(() => ag.of('detectionAck').length === 7);
    list = await http(base, '/v1/alerts');
    expect((list.body['alerts'] as unknown[]).length).toBe(1);
    const one = await http(base, `/v1/alerts/${alert['id'] as string}`);
    expect(one.body['alert']).toMatchObject({ count: '6', detectionIds: ['d-1', 'd-2', 'd-3', 'd-4', 'd-5', 'd-6'] });
    const rows = await a.db.query<{ n: bigint }>('SELECT count(*) AS n FROM alert_detections');
    expect(rows[0]!.n).toBe(6n);
    // A different victim is a different alert; filters and paging.
    ag.send({ $case: 'detection', value: detection('d-msr', { ruleId: 'fleet-default/syscall-msrs/entry', event: { ...detection('x').event!, payload: { $case: 'msr', value: { msr: 0xc0000082, oldValue: 0xffffffff81001000n, newValue: 0xffffffffc0200800n } } }, verdict: { ...detection('x').verdict!, replyValue: 0xffffffff81001000n } }) });
    await until(() => ag.of('detectionAck').length === 8);
    const msr = await http(base, '/v1/alerts?technique=T1014');
    expect(msr.body['alerts']).toEqual([expect.objectContaining({ module: 'syscall-msrs', action: 'deny', evidence: expect.objectContaining({ attempt: expect.objectContaining({ register: 'LSTAR', old: '0xffffffff81001000', new: '0xffffffffc0200800' }) }) })]);
    const page1 = await http(base, '/v1/alerts?limit=1');
    expect((page1.body['alerts'] as unknown[]).length).toBe(1);
    const page2 = await http(base, `/v1/alerts?limit=1&cursor=${page1.body['nextCursor'] as string}`);
    expect((page2.body['alerts'] as { id: string }[])[0]!.id).toBe(alert['id']);
    expect((await http(base, '/v1/alerts?severity=critical')).body['alerts']).toEqual([]);
    // JSON-lines export, oldest first.
    const exp = await fetch(`${base}/v1/alerts/export`).then((r) => r.text());
    expect(exp.trim().split('\n').map((l) => (JSON.parse(l) as { module: string }).module)).toEqual(['cr-pinning', 'syscall-msrs']);
  });

  it('live alert stream (server-sent events and JSON lines) and the webhook with retries', async () => {
    let hits = 0;
    const bodies: string[] = [];
    const hook = createServer((req, res) => {
      let b = '';
      req.on('data', (c: Buffer) => (b += c.toString()));
      req.on('end', () => {
        hits++;
        if (hits <= 2) return void res.writeHead(503).end();
        bodies.push(b);
        res.writeHead(204).end();
      });
    });
    await new Promise<void>((r) => hook.listen(0, '127.0.0.1', () => r()));
    cleanups.push(() => new Promise<void>((r) => hook.close(() => r())));
    const port = (hook.address() as { port: number }).port;
    const dir = mkdtempSync(join(tmpdir(), 'jsonl-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    const { a, base } = await start({ webhook: { url: `http://127.0.0.1:${port}/hook`, backoffMs: 20 }, alertsJsonl: join(dir, 'alerts.jsonl') });
    await a.applyPolicy(POLICY_ALL);
    const ctrl = new AbortController();
    cleanups.push(() => ctrl.abort());
    const sse = await fetch(`${base}/v1/alerts/stream`, { signal: ctrl.signal });
    const jl = await fetch(`${base}/v1/alerts/stream?format=jsonl&severity=high`, { signal: ctrl.signal });
    const reader = sse.body!.getReader();
    const jlReader = jl.body!.getReader();
    let sseText = '';
    let jlText = '';
    void (async () => {
      for (;;) {
        const r = await reader.read().catch(() => ({ done: true, value: undefined }));
        if (r.done) break;
        sseText += Buffer.from(r.value!).toString();
      }
    })();
    void (async () => {
      for (;;) {
        const r = await jlReader.read().catch(() => ({ done: true, value: undefined }));
        if (r.done) break;
        jlText += Buffer.from(r.value!).toString();
      }
    })();
    await until(() => sseText.includes(': ready'));
    const ag = agent(a);
    ag.onCommand = fakeGuest(SLIDE).answer;
    ag.hello();
    ag.attach({ uuid: VM1, name: 'web-1' });
    ag.send({ $case: 'detection', value: detection('s-1') });
    await until(() => sseText.includes('event: alert') && jlText.includes('\n'), 5000, 'streamed alert');
    const data = JSON.parse(/data: (.*)\n/.exec(sseText)![1]!) as { outcome: string; alert: { ruleId: string; seq: string } };
    expect(data).toMatchObject({ outcome: 'created', alert: { ruleId: 'fleet-default/cr-pinning/cr4' } });
    expect(sseText).toContain(`id: ${data.alert.seq}`);
    expect(JSON.parse(jlText.trim()) as unknown).toMatchObject({ outcome: 'created' });
    await until(() => bodies.length === 1, 5000, 'webhook delivery');
    expect(hits).toBe(3);
    expect(JSON.parse(bodies[0]!) as unknown).toMatchObject({ alert: { ruleId: 'fleet-default/cr-pinning/cr4' } });
    await until(() => { try { return readFileSync(join(dir, 'alerts.jsonl'), 'utf8').includes('cr-pinning'); } catch { return false; } });
    // Replay from a sequence number.
    const replay = await fetch(`${base}/v1/alerts/stream?format=jsonl&after=0`, { signal: ctrl.signal });
    const rr = replay.body!.getReader();
    const first = Buffer.from((await rr.read()).value!).toString();
    expect(JSON.parse(first.split('\n')[0]!) as unknown).toMatchObject({ outcome: 'stored', alert: { id: expect.any(String) } });
  });

  it('an exception from an alert becomes a local rule in a new policy version', async () => {
    const { a, base } = await start();
    await a.applyPolicy(POLICY_ALL);
    const ag = agent(a);
    ag.onCommand = fakeGuest(SLIDE).answer;
    ag.hello();
    ag.attach({ uuid: VM1, name: 'web-1' });
    await until(() => a.liveVms.get(VM1)?.protection['kernel-code-integrity']?.startsWith('protected') ?? false);
    await a.settled();
    const before = ag.of('installPolicy').length;
    ag.send({ $case: 'detection', value: detection('e-1') });
    await until(() => ag.of('detectionAck').length === 1);
    const alertId = ((await http(base, '/v1/alerts')).body['alerts'] as { id: string }[])[0]!.id;
    const created = await http(base, '/v1/exceptions', { method: 'POST', body: JSON.stringify({ fromAlert: alertId, reason: 'vendor driver', expiresInSeconds: 3600 }) });
    expect(created.status).toBe(201);
    expect(created.body['exception']).toMatchObject({ policy: 'fleet-default', module: 'cr-pinning', rule: 'cr4', vms: [VM1], originator: { rip: { start: '0xffffffffc0200014', end: '0xffffffffc0200015' } }, victim: { cr: 4, newValue: '0x406e0' } });
    await until(() => ag.of('installPolicy').length > before);
    const doc = parsePolicyText(ag.of('installPolicy').at(-1)!.verdictsDocument);
    compilePolicy(doc);
    const ex = doc.exceptions!.find((e) => e.id.startsWith('exception/'))!;
    expect(ex).toMatchObject({ rules: ['fleet-default/cr-pinning/cr4'], action: { kind: 'allow' }, match: { kind: 'CR', vms: [VM1], cr: [4], rip: [{ start: 0xffffffffc0200014n, end: 0xffffffffc0200015n }], new: { mask: 0xffffffffffffffffn, value: 0x406e0n } } });
    expect(ex.expiresUnixNs! > BigInt(Date.now()) * 1_000_000n).toBe(true);
    expect(doc.exceptions![0]!.id).toBe(ex.id); // operator exceptions first
    const listed = await http(base, '/v1/exceptions');
    expect((listed.body['exceptions'] as unknown[]).length).toBe(1);
    const del = await http(base, `/v1/exceptions/${(created.body['exception'] as { id: string }).id}`, { method: 'DELETE' });
    expect(del.status).toBe(200);
    await until(() => !parsePolicyText(ag.of('installPolicy').at(-1)!.verdictsDocument).exceptions!.some((e) => e.id.startsWith('exception/')));
  });

  it('events: per-VM/per-kind counters flushed, recent-event ring, held events answered, losses and policy status stored', async () => {
    const { a, base } = await start({ ringSize: 4 });
    const ag = agent(a);
    ag.hello();
    ag.attach({ uuid: VM2, name: 'db-1' });
    const ev = (seq: number, disposition = EventDisposition.EVENT_DISPOSITION_ANSWERED) => ({
      hostId: 'host-a', vmUuid: uuidToBytes(VM2), sessionGeneration: 1n, vcpu: seq % 2, seq, receivedUnixNs: BigInt(seq), repliedUnixNs: 0n, disposition, verdictDeadlineUnixNs: 0n, ruleId: '', policyVersion: 0n, mode: 8,
      payload: seq % 3 === 0 ? { $case: 'msr' as const, value: { msr: 0xc0000082, oldValue: 1n, newValue: 2n } } : { $case: 'cr' as const, value: { cr: 3, oldValue: 0x1000n, newValue: 0x2000n } },
    });
    ag.send({ $case: 'eventBatch', value: { events: Array.from({ length: 9 }, (_, i) => ev(i + 1)) } });
    ag.send({ $case: 'eventBatch', value: { events: [ev(10, EventDisposition.EVENT_DISPOSITION_HELD)] } });
    await until(() => ag.of('verdict').length === 1);
    expect(ag.of('verdict')[0]).toMatchObject({ seq: 10, sessionGeneration: 1n, decision: { action: EventAction.EVENT_ACTION_CONTINUE } });
    ag.send({ $case: 'verdictBatch', value: { records: [{ vmUuid: uuidToBytes(VM2), sessionGeneration: 1n, vcpu: 0, seq: 3, kind: 9, tier: VerdictTier.VERDICT_TIER_LOCAL, defaultReason: 0, action: EventAction.EVENT_ACTION_CONTINUE, ruleId: 'r', exceptionId: '', policyVersion: 1n, latencyNs: 1n, repliedUnixNs: 5n }] } });
    ag.send({ $case: 'loss', value: { vmUuid: uuidToBytes(VM2), sessionGeneration: 1n, recordType: 1, reason: 1, droppedCount: 42n, windowStartUnixNs: 1n, windowEndUnixNs: 2n } });
    ag.send({ $case: 'policyStatus', value: { policyId: 'periscope-analysis', version: 1001n, state: 2, error: 'bad rule', activeVersion: 1000n } });
    await until(async () => (await a.store.listHosts())[0]!.policyState === 'rejected');
    await a.flush();
    const vm = await http(base, `/v1/vms/${VM2}`);
    expect((vm.body['counters'] as { events: unknown }).events).toEqual({ CR: '7', MSR: '3' });
    expect((vm.body['counters'] as { verdicts: unknown[] }).verdicts).toEqual([{ ruleId: 'r', exceptionId: '', tier: 'local', action: 'continue', count: '1' }]);
    expect((vm.body['recentEvents'] as { seq: number }[]).map((e) => e.seq)).toEqual([7, 8, 9, 10]);
    expect((vm.body['recentEvents'] as { detail: unknown; disposition: string }[])[3]).toMatchObject({ disposition: 'held', detail: { cr: 3, oldValue: '0x1000', newValue: '0x2000' } });
    expect((await http(base, '/v1/losses')).body['losses']).toEqual([{ hostId: 'host-a', vm: VM2, recordType: 'event', reason: 'queue_full', count: '42' }]);
    expect((await http(base, '/v1/hosts')).body['hosts']).toEqual([expect.objectContaining({ policyState: 'rejected', policyError: 'bad rule', policyVersion: '1000' })]);
    // Metrics.
    const metrics = await fetch(`${base}/metrics`).then((r) => r.text());
    expect(metrics).toMatch(/periscope_analysis_events_total\{kind="CR"\} 7/);
    expect(metrics).toMatch(/periscope_analysis_agents_connected 1/);
    // Detach, then the link goes away: the VM and host are marked.
    ag.send({ $case: 'vmDetached', value: { hostId: 'host-a', vmUuid: uuidToBytes(VM2), sessionGeneration: 1n, reason: 1, detail: '', detachedUnixNs: 9n, heldEventsReleased: 0 } });
    await until(async () => !(await a.store.getVm(VM2))!.attached);
    expect((await a.store.getVm(VM2))!).toMatchObject({ attached: false, detachReason: 'unhook' });
    ag.close();
    await until(async () => !(await a.store.listHosts())[0]!.connected);
  });

  it('commands that fail are reported in the protection status', async () => {
    const { a } = await start();
    await a.applyPolicy(POLICY_ALL);
    const ag = agent(a);
    ag.onCommand = (c) => (c.command!.$case === 'readPhysical' ? { status: CommandStatus.COMMAND_STATUS_REFUSED_BY_AGENT_POLICY, message: 'allow-commands.read-physical is off' } : fakeGuest(SLIDE).answer(c));
    ag.hello();
    ag.attach({ uuid: VM1, name: 'web-1' });
    await until(() => a.liveVms.get(VM1)?.protection['kernel-code-integrity']?.startsWith('failed') ?? false);
    expect(a.liveVms.get(VM1)!.protection['kernel-code-integrity']).toContain('refused_by_agent_policy (allow-commands.read-physical is off)');
  });

  it('a bearer token guards the HTTP API and operator RPCs', async () => {
    const { base } = await start({ apiToken: 's3cret' });
    expect((await http(base, '/v1/alerts')).status).toBe(401);
    expect((await http(base, '/v1/alerts', { headers: { authorization: 'Bearer wrong' } })).status).toBe(401);
    expect((await http(base, '/v1/alerts', { headers: { authorization: 'Bearer s3cret' } })).status).toBe(200);
    expect((await http(base, '/healthz')).status).toBe(200);
  });
});
