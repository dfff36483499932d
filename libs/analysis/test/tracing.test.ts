/**
 * Breakpoint tracing end to end: the real simulator (2 vCPUs calling `sim_copy_tagged`, whose ground truth
 * the simulator keeps), the real host agent (in process, its analysis link over real gRPC) and analysis on
 * PostgreSQL (PGlite without a server).
 *
 * - every call made while the INT3 was planted is recorded once, with its SysV arguments; no other hit exists;
 * - the guest runs on unchanged: every call returned to its caller and copied its bytes, no #BP reached the
 *   guest, no livelock; kernel integrity hashing does not see our INT3;
 * - `trace stop` restores the original byte; no hit afterwards;
 * - analysis stops: the agent fails the breakpoint open (byte restored, vCPU resumed) and the guest keeps
 *   running; analysis comes back on the same database and re-plants (never twice);
 * - agent SIGTERM restores the byte;
 * - an agent without `--allow-command write-physical` refuses, and so does a VM without singlestep.
 */
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { HostAgent, parseCookies } from '@periscope/host-agent';
import { callTaggedCopy, linuxSimProfile, parseHostProfile, SimQemu, SimVm, type TaggedCall } from '@periscope/simulator';
import { parsePolicy } from '@periscope/verdicts';
import { Analysis } from '../src/index.js';
import { DB_VARIANTS, http, POLICY_ALL, until } from './support.js';

const BOOTSTRAP = parsePolicy({ id: 'bootstrap', version: 1, rules: [] });
const FN = 'sim_copy_tagged';
const PROFILE = linuxSimProfile();
const FN_OFFSET = PROFILE.symbols.get(FN)!.offset;
const variant = DB_VARIANTS.find((v) => v.name === 'postgres')!;

interface Hit {
  id: string;
  vcpu: number;
  args: string[];
  function: string;
}

/** Guest code on every vCPU: sim_copy_tagged calls back to back (the simulator records each). */
class Caller {
  private running = true;
  private readonly loops: Promise<void>[];
  constructor(readonly vm: SimVm) {
    this.loops = vm.vcpus.map(async (c, i) => {
      let n = 0;
      while (this.running) {
        n++;
        await callTaggedCopy(vm, c, 1 + ((n * 7 + i) % 64), (n * 13 + i) % 64);
        await new Promise((r) => setTimeout(r, 2));
      }
    });
  }
  async stop(): Promise<void> {
    this.running = false;
    await Promise.all(this.loops);
  }
}

const hexOf = (v: bigint): string => `0x${v.toString(16)}`;
const argsOf = (c: TaggedCall): string[] => [c.dst, c.src, c.tag, c.len].map(hexOf);

function groundTruthHolds(vm: SimVm): void {
  const bad = vm.taggedCalls.calls.filter((c) => c.outcome !== 'completed' || !c.copied);
  expect(bad).toEqual([]);
  expect(vm.stats.livelocks).toBe(0);
  for (const c of vm.vcpus) expect(c.deliveredExceptions.filter((x) => x.vector === 3)).toEqual([]);
}

describe(`breakpoint tracing on ${variant.name}`, () => {
  let dbUrl = '';
  let drop: () => Promise<void> = async () => undefined;
  let a: Analysis;
  let agent: HostAgent;
  let vm: SimVm;
  let qemu: SimQemu;
  let dir = '';
  let base = '';
  let gpa = 0n;
  const agentLogs: string[] = [];
  const analysisLogs: string[] = [];

  const startAnalysis = async (): Promise<Analysis> => {
    const x = await Analysis.start({
      db: dbUrl, grpcListen: `127.0.0.1:${a ? a.grpcPort : 0}`, httpListen: '127.0.0.1:0', keepaliveMs: 200, flushMs: 100,
      log: (level, msg, f) => {
        if (level !== 'debug') analysisLogs.push(`${(performance.now()).toFixed(1)} ${level}: ${msg} ${JSON.stringify(f ?? {}, (_k, v: unknown) => (typeof v === 'bigint' ? v.toString() : v))}`);
      },
    });
    base = `http://${x.httpAddress}`;
    return x;
  };
  const byte = (): number => vm.memory.read(gpa, 1)![0]!;
  const hits = async (after = '0'): Promise<Hit[]> => {
    const r = await http(base, `/v1/traces/hits?vm=${vm.uuidText}&function=${FN}&after=${after}&limit=5000`);
    return r.body['hits'] as Hit[];
  };

  beforeAll(async () => {
    const d = await variant.create();
    dbUrl = d.url;
    drop = d.drop;
    a = await startAnalysis();
    await a.applyPolicy(POLICY_ALL);
    dir = mkdtempSync(join(tmpdir(), 'an-trace-'));
    const sock = join(dir, 'kvmi.sock');
    agent = new HostAgent({
      hostId: 'trace-host', kvmiPaths: [sock], cookies: parseCookies(Buffer.from('s')), policy: BOOTSTRAP, stateDir: join(dir, 'state'),
      log: (level, msg, f) => agentLogs.push(`${level}: ${msg} ${JSON.stringify(f ?? {}, (_k, v: unknown) => (typeof v === 'bigint' ? v.toString() : v))}`),
      link: { address: `127.0.0.1:${a.grpcPort}`, backoff: { initialMs: 20, maxMs: 200 }, allowCommands: ['write-physical'] },
    });
    await agent.start();
    vm = new SimVm({ vcpus: 2, seed: 11, apsOnline: true, jitterMs: 0, name: 'trace-vm' });
    gpa = vm.kernel.symbolPhys(FN);
    expect(gpa).toBe(vm.kernel.textPhys + FN_OFFSET);
    qemu = new SimQemu(vm, { path: sock, key: Buffer.from('s'), reconnectSeconds: 0.05 });
    qemu.start();
    await until(() => a.liveVms.get(vm.uuidText)?.protection['kernel-code-integrity']?.startsWith('protected') ?? false, 30_000, 'kernel protected');
    await until(() => a.memory.integrity.status(vm.uuidText)?.state === 'monitoring', 30_000, 'integrity baseline');
  }, 90_000);

  afterAll(async () => {
    qemu?.stop();
    vm?.close();
    await agent?.stop(300);
    await a?.stop();
    if (dir) rmSync(dir, { recursive: true, force: true });
    await drop();
  });

  it('records every call with its arguments on 2 vCPUs, the guest runs on unchanged, stop restores the byte', async () => {
    const original = byte();
    expect(original).not.toBe(0xcc);
    const caller = new Caller(vm);
    try {
      const r = await http(base, `/v1/vms/${vm.uuidText}/traces`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ function: FN, args: 4, by: 'test' }) });
      expect(r.status, JSON.stringify(r.body)).toBe(201);
      const trace = r.body['trace'] as Record<string, string>;
      expect(trace).toMatchObject({ function: FN, state: 'active', status: 'planted', gpa: hexOf(gpa), originalByte: `0x${original.toString(16)}`, registers: ['rdi', 'rsi', 'rdx', 'rcx'] });
      const plantedAt = performance.now();
      expect(byte()).toBe(0xcc);
      // Kernel integrity hashing sees the original byte, not our INT3.
      const integ = await a.memory.integrity.checkNow(vm.uuidText);
      expect(integ?.maskedBytes.breakpoints).toBe(1);
      expect(integ?.mismatches).toEqual([]);
      await until(async () => {
        const h = await hits();
        return new Set(h.map((x) => x.vcpu)).size === 2 && h.length >= 40;
      }, 60_000, 'hits on both vCPUs');
      const stopAt = performance.now();
      const s = await http(base, `/v1/vms/${vm.uuidText}/traces/${FN}?by=test`, { method: 'DELETE' });
      expect(s.status, JSON.stringify(s.body)).toBe(200);
      expect((s.body['trace'] as Record<string, string>)['state']).toBe('stopped');
      expect(byte()).toBe(original);
      // After stop: calls go on, nothing more is recorded.
      await a.settled();
      const atStop = await hits();
      const before = vm.taggedCalls.total;
      await until(() => vm.taggedCalls.total > before + 20, 30_000, 'calls after stop');
      await caller.stop();
      await a.settled();
      const recorded = await hits();
      expect(recorded.map((h) => h.id)).toEqual(atStop.map((h) => h.id));
      const byTag = new Map(recorded.map((h) => [h.args[2]!, h]));
      expect(byTag.size).toBe(recorded.length); // each call once
      const truth = new Map(vm.taggedCalls.calls.map((c) => [hexOf(c.tag), c]));
      // Every hit is a real call, with exactly its arguments and its vCPU.
      for (const h of recorded) {
        const c = truth.get(h.args[2]!);
        expect(c, `hit ${JSON.stringify(h)} has no call`).toBeDefined();
        expect(h.args).toEqual(argsOf(c!));
        expect(h.vcpu).toBe(c!.vcpu);
      }
      // Every call made entirely while the INT3 was planted was recorded (the other vCPU was paused for each step).
      const inside = vm.taggedCalls.calls.filter((c) => c.startedMs > plantedAt && c.endedMs < stopAt);
      expect(inside.length).toBeGreaterThanOrEqual(20);
      const missed = inside.filter((c) => !byTag.has(hexOf(c.tag)));
      const diagnosis = (): string => [...analysisLogs.filter((l) => !l.includes(' info: ')).slice(-20), ...a.registry.render().split('\n').filter((l) => l.startsWith('periscope_analysis_trace'))].join('\n');
      expect(missed, missed.length ? diagnosis() : '').toEqual([]);
    } finally {
      await caller.stop();
    }
    groundTruthHolds(vm);
    expect(a.registry.render()).toMatch(/periscope_analysis_trace_steps_total\{outcome="stepped"\} [1-9]/);
  }, 120_000);

  it('fails open when analysis is gone, re-plants once it is back, and the guest never stops', async () => {
    const original = byte();
    const r = await http(base, `/v1/vms/${vm.uuidText}/traces`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ function: FN, by: 'test' }) });
    expect(r.status, JSON.stringify(r.body)).toBe(201);
    expect(byte()).toBe(0xcc);
    const caller = new Caller(vm);
    try {
      await until(async () => (await hits()).length > 0, 30_000, 'a hit');
      const failOpen0 = agent.link!.writes.stats.breakpointFailOpen;
      await a.stop(); // the link goes down: held breakpoints and new hits fail open at the agent
      await until(() => agent.link!.writes.stats.breakpointFailOpen > failOpen0, 30_000, 'a breakpoint failing open');
      await until(() => byte() === original, 10_000, 'the agent restored the byte');
      const calls = vm.taggedCalls.total;
      await until(() => vm.taggedCalls.total > calls + 20, 30_000, 'the guest runs on untraced');
      expect(agent.registry.render()).toMatch(/periscope_agent_analysis_breakpoints_total\{outcome="fail_open_restored"\} [1-9]/);
      // Analysis comes back on the same database: the trace is re-established from its row.
      a = await startAnalysis();
      await until(() => byte() === 0xcc, 30_000, 'the INT3 re-planted');
      const n = (await hits()).length;
      await until(async () => (await hits()).length > n + 5, 30_000, 'hits again');
      const rows = (await http(base, `/v1/traces?vm=${vm.uuidText}`)).body['traces'] as Record<string, string>[];
      expect(rows.filter((t) => t['function'] === FN)).toHaveLength(1);
      expect(rows[0]!['originalByte']).toBe(`0x${original.toString(16)}`); // from the database, not re-read over 0xCC
      expect((await http(base, `/v1/vms/${vm.uuidText}/traces/${FN}`, { method: 'DELETE' })).status).toBe(200);
      expect(byte()).toBe(original);
    } finally {
      await caller.stop();
    }
    groundTruthHolds(vm);
  }, 150_000);

  it('agent SIGTERM restores the planted byte', async () => {
    const original = byte();
    const r = await http(base, `/v1/vms/${vm.uuidText}/traces`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ function: FN }) });
    expect(r.status, JSON.stringify(r.body)).toBe(201);
    expect(byte()).toBe(0xcc);
    await agent.stop(2000);
    expect(byte()).toBe(original);
    groundTruthHolds(vm);
  }, 60_000);

  it('after a kill -9 the INT3 stays in the guest; the restarted agent restores it when the VM re-attaches', async () => {
    // The trace of the previous test is still active in the database: a new agent re-attaches, analysis re-plants.
    const sock = join(dir, 'kvmi.sock');
    const stateDir = join(dir, 'state');
    const mk = (address: string) =>
      new HostAgent({ hostId: 'trace-host', kvmiPaths: [sock], cookies: parseCookies(Buffer.from('s')), policy: BOOTSTRAP, stateDir, log: (level, msg) => agentLogs.push(`${level}: ${msg}`), link: { address, backoff: { initialMs: 20, maxMs: 200 }, allowCommands: ['write-physical'] } });
    const original = (await a.tracing.list({ vmUuid: vm.uuidText }))[0]!['originalByte'];
    agent = mk(`127.0.0.1:${a.grpcPort}`);
    await agent.start();
    await until(() => byte() === 0xcc, 30_000, 're-planted after the agent came back');
    expect(readFileSync(join(stateDir, 'planted.json'), 'utf8')).toContain(`0x${gpa.toString(16)}`);
    // kill -9: the process dies without detaching — the sockets close, nothing is restored.
    agent.link!.stop();
    for (const c of agent.listener.vms.values()) c.session.close();
    await until(() => !vm.connected, 10_000, 'the VM unhooked');
    await agent.stop(100);
    expect(byte()).toBe(0xcc);
    // The restarted agent (analysis unreachable here, so nobody re-plants) restores the byte at re-attach.
    agent = mk('127.0.0.1:1');
    await agent.start();
    // Waited for on the agent's own count: the simulated guest shows the byte as soon as KVM applied the write,
    // before the agent has its reply and updates planted.json.
    await until(() => agent.link!.writes.stats.recoveredBytes === 1, 30_000, 'the byte restored by the restarted agent');
    expect(byte()).toBe(Number(original));
    expect(JSON.parse(readFileSync(join(stateDir, 'planted.json'), 'utf8'))).toEqual({});
  }, 90_000);
});

describe('breakpoint tracing refusals', () => {
  let a: Analysis;
  const agents: HostAgent[] = [];
  const sims: { vm: SimVm; qemu: SimQemu }[] = [];
  let dir = '';
  let base = '';

  beforeAll(async () => {
    a = await Analysis.start({ db: 'pglite:memory', grpcListen: '127.0.0.1:0', httpListen: '127.0.0.1:0', keepaliveMs: 200, flushMs: 100 });
    base = `http://${a.httpAddress}`;
    dir = mkdtempSync(join(tmpdir(), 'an-trace-refuse-'));
  }, 60_000);

  afterAll(async () => {
    for (const s of sims) {
      s.qemu.stop();
      s.vm.close();
    }
    for (const g of agents) await g.stop(300);
    await a?.stop();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  async function attach(name: string, allow: string[], singlestep: boolean, seed = 3): Promise<SimVm> {
    const sock = join(dir, `${name}.sock`);
    const g = new HostAgent({ hostId: name, kvmiPaths: [sock], cookies: parseCookies(Buffer.from('s')), policy: BOOTSTRAP, log: () => undefined, link: { address: `127.0.0.1:${a.grpcPort}`, backoff: { initialMs: 20, maxMs: 200 }, allowCommands: allow } });
    await g.start();
    agents.push(g);
    const vm = new SimVm({ vcpus: 2, seed, apsOnline: true, jitterMs: 0, name, profile: parseHostProfile({ singlestep }) });
    const qemu = new SimQemu(vm, { path: sock, key: Buffer.from('s'), reconnectSeconds: 0.05 });
    qemu.start();
    sims.push({ vm, qemu });
    await until(() => a.liveVms.has(vm.uuidText), 20_000, `${name} attached`);
    return vm;
  }

  it('an agent without --allow-command write-physical: refused with its message, nothing planted or stored', async () => {
    const vm = await attach('no-write', [], true);
    const gpa = vm.kernel.symbolPhys(FN);
    const before = vm.memory.read(gpa, 1)![0];
    const r = await http(base, `/v1/vms/${vm.uuidText}/traces`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ function: FN }) });
    expect(r.status).toBe(403);
    expect(r.body.error?.code).toBe('refused');
    expect(r.body.error?.message).toMatch(/--allow-command write-physical/);
    expect(vm.memory.read(gpa, 1)![0]).toBe(before);
    expect((await http(base, `/v1/traces?vm=${vm.uuidText}`)).body['traces']).toEqual([]);
  }, 60_000);

  it('a VM whose KVM lacks the singlestep feature: refused, clearly', async () => {
    const vm = await attach('no-singlestep', ['write-physical'], false, 4);
    const r = await http(base, `/v1/vms/${vm.uuidText}/traces`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ function: FN }) });
    expect(r.status).toBe(501);
    expect(r.body.error?.code).toBe('unsupported');
    expect(r.body.error?.message).toMatch(/singlestep/);
    expect(vm.memory.read(vm.kernel.symbolPhys(FN), 1)![0]).not.toBe(0xcc);
  }, 60_000);

  it('an unknown function and bad arguments are bad requests', async () => {
    const vm = sims[0]!.vm;
    const post = (body: unknown) => http(base, `/v1/vms/${vm.uuidText}/traces`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
    const r = await post({ function: 'no_such_fn' });
    expect(r.status).toBe(404);
    expect(r.body.error?.message).toMatch(/has no function no_such_fn/);
    expect((await post({ function: FN, args: 9 })).status).toBe(400);
    expect((await post({})).status).toBe(400);
    expect((await http(base, `/v1/vms/${vm.uuidText}/traces/${FN}`, { method: 'DELETE' })).status).toBe(404);
  }, 30_000);
});
