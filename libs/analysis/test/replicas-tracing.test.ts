/**
 * Replica failover with an active breakpoint trace (issue #9: "protections are re-established idempotently …
 * no double-planted breakpoints"), on the real PostgreSQL (a fresh database, dropped after) with two real
 * analysis replica processes:
 *
 * a trace is active on a VM whose host agent is linked to replica B, both vCPUs calling the traced function;
 * B is killed with SIGKILL; the agent moves to replica A, which re-establishes the trace from the database.
 * Checked against the simulator's own records:
 *  - the INT3 is never planted twice: every VM_WRITE_PHYSICAL of 0xCC at the function's address the simulated
 *    KVM receives finds the guest's original byte there, never 0xCC (counted, and their sequence alternates);
 *  - the original byte the agent remembers (in memory and in its state directory) is the real one, never 0xCC;
 *  - hits resume on A, every hit is one real call with its exact arguments, no call is recorded twice;
 *  - the guest never took #BP and every call returned having copied its bytes (`taggedCalls`).
 * Without PostgreSQL (and without PERISCOPE_TEST_POSTGRES) it is skipped with a message.
 */
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { HostAgent, parseCookies } from '@periscope/host-agent';
import { callTaggedCopy, SimQemu, SimVm, type TaggedCall } from '@periscope/simulator';
import { parsePolicy } from '@periscope/verdicts';
import { DB_VARIANTS, http, PG_DSN, POLICY_ALL, postgresAnswers, startReplicaProcess, until, type ReplicaProcess } from './support.js';

const BOOTSTRAP = parsePolicy({ id: 'bootstrap', version: 1, rules: [] });
const FN = 'sim_copy_tagged';
const INT3 = 0xcc;


const PG_UP = await postgresAnswers();
if (!PG_UP) {
  if (process.env['PERISCOPE_TEST_POSTGRES']) throw new Error(`PERISCOPE_TEST_POSTGRES=${PG_DSN} does not answer`);
  console.warn(`SKIPPED: replica failover with a trace needs PostgreSQL; nothing answers at ${PG_DSN} (set PERISCOPE_TEST_POSTGRES)`);
}



interface Hit {
  id: string;
  vcpu: number;
  args: string[];
  hitNs: string;
}

/** One VM_WRITE_PHYSICAL at the traced address, as the simulated KVM received it. */
interface WriteAt {
  readonly byte: number;
  /** The byte in guest memory when the command arrived (before it was applied). */
  readonly before: number;
  readonly atMs: number;
}

const hexOf = (v: bigint): string => `0x${v.toString(16)}`;
const argsOf = (c: TaggedCall): string[] => [c.dst, c.src, c.tag, c.len].map(hexOf);

describe.skipIf(!PG_UP)('replica failover with an active trace (real replica processes, PostgreSQL)', () => {
  let db: { url: string; drop: () => Promise<void> };
  let dir = '';
  let q: pg.Client;
  const replicas: ReplicaProcess[] = [];
  let agent: HostAgent;
  let vm: SimVm;
  let qemu: SimQemu;

  beforeAll(async () => {
    db = await DB_VARIANTS.find((v) => v.name === 'postgres')!.create();
    dir = mkdtempSync(join(tmpdir(), 'an-rep-trace-'));
    writeFileSync(join(dir, 'fleet-default.yaml'), POLICY_ALL);
    q = new pg.Client({ connectionString: db.url });
    await q.connect();
  }, 60_000);

  afterAll(async () => {
    qemu?.stop();
    vm?.close();
    await agent?.stop(300);
    for (const r of replicas) r.child.kill('SIGKILL');
    await q?.end();
    if (dir) rmSync(dir, { recursive: true, force: true });
    await db?.drop();
  });

  it('killed replicas mid-trace: the agent moves on, the next replica re-establishes the trace once; hits resume, each call once; the guest never takes #BP', async () => {
    // Three replicas; the agent lists B, A, C: the VM is owned by B, moves to A when B dies, then to C when A dies.
    const ra = await startReplicaProcess('replica-a', db.url, dir);
    const rb = await startReplicaProcess('replica-b', db.url, dir);
    const rc = await startReplicaProcess('replica-c', db.url, dir);
    replicas.push(ra, rb, rc);
    const stateDir = join(dir, 'state');
    const sock = join(dir, 'kvmi.sock');
    agent = new HostAgent({
      hostId: 'failover-host', kvmiPaths: [sock], cookies: parseCookies(Buffer.from('s')), policy: BOOTSTRAP, log: () => undefined, stateDir,
      link: { address: [rb, ra, rc].map((r) => r.grpc).join(','), backoff: { initialMs: 20, maxMs: 500 }, allowCommands: ['write-physical'] },
    });
    await agent.start();
    vm = new SimVm({ vcpus: 2, seed: 71, apsOnline: true, jitterMs: 0, name: 'failover-vm' });
    const gpa = vm.kernel.symbolPhys(FN);
    const original = vm.memory.read(gpa, 1)![0]!;
    expect(original).not.toBe(INT3);
    const writes: WriteAt[] = [];
    vm.on('command', (key, _vcpu, req) => {
      if (key !== 'VM_WRITE_PHYSICAL' || (req['gpa'] as bigint) !== gpa) return;
      // VM commands run right after this event: the memory still holds the byte before the write.
      writes.push({ byte: (req['data'] as Uint8Array)[0]!, before: vm.memory.read(gpa, 1)![0]!, atMs: performance.now() });
    });
    qemu = new SimQemu(vm, { path: sock, key: Buffer.from('s'), reconnectSeconds: 0.05 });
    qemu.start();

    const vmOn = async (r: ReplicaProcess) => (await http(`http://${r.http}`, `/v1/vms/${vm.uuidText}`).catch(() => undefined))?.body['vm'] as { protection?: Record<string, string> } | undefined;
    await until(async () => (await vmOn(rb))?.protection?.['kernel-code-integrity']?.startsWith('protected') ?? false, 60_000, 'the VM protected through B');
    const owner = async () => (await q.query<{ replica_id: string }>('SELECT replica_id FROM hosts WHERE host_id = $1', ['failover-host'])).rows[0]?.replica_id;
    expect(await owner()).toBe('replica-b');

    // The agent's remembered original byte, sampled throughout: always the real one.
    const remembered: number[] = [];
    const filed: number[] = [];
    const sampler = setInterval(() => {
      const b = agent.listener.vms.get(vm.uuidText)?.rememberedAt(gpa);
      if (b) remembered.push(b.original);
      const f = join(stateDir, 'planted.json');
      if (existsSync(f)) {
        try {
          const rec = (JSON.parse(readFileSync(f, 'utf8')) as Record<string, { bytes: Record<string, { original: number }> }>)[vm.uuidText];
          const at = rec?.bytes[hexOf(gpa)];
          if (at) filed.push(at.original);
        } catch {
          /* mid-rename */
        }
      }
    }, 5);

    // The guest calls the function on both vCPUs (while `calling`).
    let calling = false;
    let loops: Promise<void>[] = [];
    const startCalling = () => {
      calling = true;
      loops = vm.vcpus.map(async (c, i) => {
        let n = 0;
        while (calling) {
          n++;
          await callTaggedCopy(vm, c, 1 + ((n * 5 + i) % 64), (n * 11 + i) % 64);
          await new Promise((r) => setTimeout(r, 2));
        }
      });
    };
    const stopCalling = async () => {
      calling = false;
      await Promise.all(loops);
    };
    const hits = async (r: ReplicaProcess): Promise<Hit[]> => ((await http(`http://${r.http}`, `/v1/traces/hits?vm=${vm.uuidText}&function=${FN}&limit=5000`)).body['hits'] as Hit[]) ?? [];
    const metric = async (r: ReplicaProcess, name: string): Promise<number> => {
      const text = await (await fetch(`http://${r.http}/metrics`)).text();
      const line = text.split('\n').find((l) => l.startsWith(`${name} `));
      return line ? Number(line.slice(name.length + 1)) : 0;
    };
    const REESTABLISH_PLANTS = 'periscope_analysis_trace_plants_total{reason="re-establish"}';
    const hitsSince = async (r: ReplicaProcess, ns: bigint) => (await hits(r)).filter((h) => BigInt(h.hitNs) > ns);
    let afterFailover: Hit[] = [];
    const diag: string[] = [];

    // The trace is started through B, the owner.
    const started = await http(`http://${rb.http}`, `/v1/vms/${vm.uuidText}/traces`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ function: FN, args: 4, by: 'test' }) });
    expect(started.status, JSON.stringify(started.body)).toBe(201);
    expect(vm.memory.read(gpa, 1)![0]).toBe(INT3);
    try {
      startCalling();
      await until(async () => (await hits(rb)).length >= 10, 60_000, 'hits recorded by B');
      await stopCalling();

      // 1. kill -9 of B while the guest is not in the function: the INT3 is still in the guest when A re-establishes
      //    the trace — A must find it and leave it (no write at all), and the hits resume.
      await until(() => agent.listener.vms.get(vm.uuidText)?.heldCount === 0 && vm.memory.read(gpa, 1)![0] === INT3, 10_000, 'no step in progress');
      const writesBefore1 = writes.length;
      const installsBefore1 = agent.link!.stats.policyInstalls;
      rb.child.kill('SIGKILL');
      const kill1Ns = BigInt(Date.now()) * 1_000_000n;
      await until(async () => (await owner()) === 'replica-a', 60_000, 'the agent on replica A');
      expect(agent.link!.client.address).toBe(ra.grpc);
      // A has the trace state once the agent runs a local policy from A with the tracing rules (A checks the byte
      // right after, before any step).
      await until(() => agent.link!.stats.policyInstalls > installsBefore1 && agent.policies.current.policy.rules.some((r) => r.id === 'tracing/breakpoint'), 60_000, 'the tracing rules from A active');
      await until(async () => (await metric(ra, 'periscope_analysis_traces_active')) === 1, 60_000, 'A re-established the trace');
      expect(vm.memory.read(gpa, 1)![0]).toBe(INT3);
      startCalling();
      await until(async () => (await hitsSince(ra, kill1Ns)).length >= 10, 60_000, 'hits recorded by A');
      await stopCalling();
      expect(await metric(ra, REESTABLISH_PLANTS)).toBe(0);
      // Its first write at the address is a step's restore of the original byte, never an INT3 over ours.
      expect(writes[writesBefore1]).toMatchObject({ byte: original, before: INT3 });
      diag.push(`A: ${await metric(ra, 'periscope_analysis_trace_hits_total')} hits, ${await metric(ra, REESTABLISH_PLANTS)} re-establish plants`);

      // 2. kill -9 of A while both vCPUs keep calling the traced function: breakpoints in flight fail open at the
      //    agent (byte restored), C re-establishes: it plants at most once, and the hits resume.
      startCalling();
      await until(async () => (await hitsSince(ra, kill1Ns)).length >= 20, 60_000, 'more hits recorded by A');
      ra.child.kill('SIGKILL');
      const kill2Ns = BigInt(Date.now()) * 1_000_000n;
      await until(async () => (await owner()) === 'replica-c', 60_000, 'the agent on replica C');
      expect(agent.link!.client.address).toBe(rc.grpc);
      await until(async () => (afterFailover = await hitsSince(rc, kill2Ns)).length >= 20, 60_000, 'hits recorded by C after the failover');
      await stopCalling();
      const listed = (await http(`http://${rc.http}`, `/v1/traces?vm=${vm.uuidText}`)).body['traces'] as Record<string, string>[];
      expect(listed).toHaveLength(1);
      expect(listed[0]).toMatchObject({ function: FN, state: 'active', originalByte: `0x${original.toString(16).padStart(2, '0')}` });
      // Once if the agent had failed the INT3 open meanwhile (the guest was calling), else never.
      expect(await metric(rc, REESTABLISH_PLANTS)).toBeLessThanOrEqual(1);
      const firstOnC = afterFailover.reduce((m, h) => (BigInt(h.hitNs) < m ? BigInt(h.hitNs) : m), BigInt(afterFailover[0]!.hitNs));
      diag.push(`C: ${await metric(rc, 'periscope_analysis_trace_hits_total')} hits, ${await metric(rc, REESTABLISH_PLANTS)} re-establish plants, first hit ${(Number(firstOnC - kill2Ns) / 1e6).toFixed(0)} ms after the kill`);
      diag.push(`agent: breakpoint fail-open ${agent.link!.writes.stats.breakpointFailOpen}, singlestep fail-open ${agent.link!.writes.stats.singlestepFailOpen}, link disconnects ${agent.link!.client.stats.disconnects}`);
    } finally {
      await stopCalling();
    }
    const stopped = await http(`http://${rc.http}`, `/v1/vms/${vm.uuidText}/traces/${FN}?by=test`, { method: 'DELETE' });
    expect(stopped.status, JSON.stringify(stopped.body)).toBe(200);
    expect(vm.memory.read(gpa, 1)![0]).toBe(original);
    clearInterval(sampler);

    // Never double-planted: every 0xCC written found the original byte, and plants and restores alternate.
    const plants = writes.filter((w) => w.byte === INT3);
    expect(plants.length).toBeGreaterThan(20);
    expect(plants.filter((w) => w.before === INT3)).toEqual([]);
    expect(writes.filter((w) => w.byte !== INT3 && w.byte !== original)).toEqual([]);
    const changes = writes.filter((w) => w.byte !== w.before).map((w) => w.byte);
    for (let i = 1; i < changes.length; i++) expect(changes[i], `write ${i}`).not.toBe(changes[i - 1]);
    // The agent's remembered original was always the real byte.
    expect(remembered.length).toBeGreaterThan(0);
    expect([...new Set(remembered)]).toEqual([original]);
    expect([...new Set(filed)]).toEqual([original]);

    // Hits: every one a real call with its exact arguments and vCPU, none twice (also across the failover).
    const all = await hits(rc);
    const byTag = new Map(all.map((h) => [h.args[2]!, h]));
    expect(byTag.size).toBe(all.length);
    const truth = new Map(vm.taggedCalls.calls.map((c) => [hexOf(c.tag), c]));
    for (const h of all) {
      const c = truth.get(h.args[2]!);
      expect(c, `hit ${JSON.stringify(h)} has no call`).toBeDefined();
      expect(h.args).toEqual(argsOf(c!));
      expect(h.vcpu).toBe(c!.vcpu);
    }
    expect(afterFailover.length).toBeGreaterThanOrEqual(20);

    // The guest ran on unchanged: every call returned having copied, no #BP, no livelock.
    expect(vm.taggedCalls.calls.filter((c) => c.outcome !== 'completed' || !c.copied)).toEqual([]);
    expect(vm.stats.livelocks).toBe(0);
    for (const c of vm.vcpus) expect(c.deliveredExceptions.filter((x) => x.vector === 3)).toEqual([]);
    const counts = { plants: plants.length, restores: writes.filter((w) => w.byte === original && w.before === INT3).length, hits: all.length, hitsAfterFailover: afterFailover.length, calls: vm.taggedCalls.total };
    console.log(`failover with a trace: ${JSON.stringify(counts)}; ${diag.join('; ')}`);
  }, 300_000);
});
