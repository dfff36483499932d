/**
 * Several replicas (issue #9), on the real PostgreSQL (a fresh database per run, dropped after):
 *  - one PGlite directory serves one replica: a second one refuses (typed `db-locked`; the app exits 2);
 *  - two replicas, host agents spread over them with simulated VMs: an operator command sent to one replica
 *    reaches a VM owned by the other (same result, same error codes), a request whose NOTIFY was missed still
 *    runs (table sweep), the live alert streams of each replica (HTTP and gRPC) show alerts the other ingested,
 *    sinks fire only where ingested, configuration changes reach every replica;
 *  - a replica process killed with SIGKILL while detections flow: its agents reconnect to the other replica,
 *    every detection id ends up with exactly one alert, page restrictions are not sent again.
 * Without PostgreSQL (and without PERISCOPE_TEST_POSTGRES) the PostgreSQL parts are skipped with a message.
 */
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { get as httpGet, type IncomingMessage } from 'node:http';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { credentials, Metadata } from '@grpc/grpc-js';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { OperatorServiceClient, type WatchAlertsResponse } from '@periscope/contracts';
import { HostAgent, parseCookies } from '@periscope/host-agent';
import { parseScenario, runScenario, SimQemu, SimVm } from '@periscope/simulator';
import { parsePolicy } from '@periscope/verdicts';
import { Analysis, AnalysisError, isAnalysisError } from '../src/index.js';
import { PGLITE_LOCK_FILE } from '../src/pglite-lock.js';
import { freshPostgresDatabase, http, PG_DSN, POLICY_ALL, postgresAnswers, startReplicaProcess, until, type ReplicaProcess } from './support.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '../../..');
const bin = join(root, 'bin/periscope');
const BOOTSTRAP = parsePolicy({ id: 'bootstrap', version: 1, rules: [] });
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** Denied by syscall-msrs (a detection per run); the guest's LSTAR stays unchanged. */
const LSTAR_WRITE = parseScenario(`
name: lstar-write
kind: attack
steps:
  - { id: rewrite, from: kernel, wrmsr: { msr: LSTAR, value: sym:entry_SYSCALL_64 + 0x40 } }
expect:
  events:
    - { event: MSR, step: rewrite, msr: LSTAR }
  registers:
    - { reg: msr:LSTAR, equals: sym:entry_SYSCALL_64 }
`);


const PG_UP = await postgresAnswers();
if (!PG_UP) {
  if (process.env['PERISCOPE_TEST_POSTGRES']) throw new Error(`PERISCOPE_TEST_POSTGRES=${PG_DSN} does not answer`);
  console.warn(`SKIPPED: the several-replicas tests need PostgreSQL; nothing answers at ${PG_DSN} (set PERISCOPE_TEST_POSTGRES)`);
}


/** One simulated host: a real host agent (its link to `analysis`, possibly a list) and one simulated VM. */
interface SimHost {
  readonly hostId: string;
  readonly agent: HostAgent;
  readonly vm: SimVm;
  readonly qemu: SimQemu;
  /** VM_SET_PAGE_ACCESS commands and entries the simulated KVM received. */
  readonly pageAccess: { commands: number; entries: number };
  /** Every detection id the agent raised (at its spool). */
  readonly detections: Set<string>;
  stop(): Promise<void>;
}

async function startHost(hostId: string, analysis: string, seed: number): Promise<SimHost> {
  const dir = mkdtempSync(join(tmpdir(), 'an-rep-'));
  const sock = join(dir, 'kvmi.sock');
  const agent = new HostAgent({
    hostId, kvmiPaths: [sock], cookies: parseCookies(Buffer.from('s')), policy: BOOTSTRAP, log: () => undefined, stateDir: join(dir, 'state'),
    link: { address: analysis, backoff: { initialMs: 20, maxMs: 500 } },
  });
  await agent.start();
  const detections = new Set<string>();
  const spool = agent.link!.spool;
  const add = spool.add.bind(spool);
  spool.add = (d, o) => {
    detections.add(d.detectionId);
    return add(d, o);
  };
  const vm = new SimVm({ vcpus: 2, seed, apsOnline: true, jitterMs: 0, name: `${hostId}-vm` });
  const pageAccess = { commands: 0, entries: 0 };
  vm.on('command', (key, _vcpu, req) => {
    if (key !== 'VM_SET_PAGE_ACCESS') return;
    pageAccess.commands++;
    pageAccess.entries += (req['entries'] as unknown[]).length;
  });
  const qemu = new SimQemu(vm, { path: sock, key: Buffer.from('s'), reconnectSeconds: 0.05 });
  qemu.start();
  return {
    hostId, agent, vm, qemu, pageAccess, detections,
    async stop() {
      qemu.stop();
      vm.close();
      await agent.stop(300);
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

const interceptsLstar = (vm: SimVm) => vm.vcpus.every((c) => c.interceptions.msrs.has(0xc0000082));
const allPaused = (vm: SimVm) => vm.vcpus.every((c) => c.waitingFor?.event === 'PAUSE');
const running = (vm: SimVm) => vm.vcpus.every((c) => c.waitingFor === null);

/** Lines of a JSONL HTTP stream, as they arrive. */
function jsonlStream(url: string): { lines: Record<string, unknown>[]; close: () => void } {
  const lines: Record<string, unknown>[] = [];
  let res: IncomingMessage | undefined;
  let buf = '';
  const req = httpGet(url, (r) => {
    res = r;
    r.setEncoding('utf8');
    r.on('data', (c: string) => {
      buf += c;
      let i;
      while ((i = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, i);
        buf = buf.slice(i + 1);
        if (line.trim()) lines.push(JSON.parse(line) as Record<string, unknown>);
      }
    });
  });
  req.on('error', () => undefined);
  return { lines, close: () => (res?.destroy(), req.destroy()) };
}

// ------------------------------------------------------------------------------------------------ PGlite

describe('one PGlite directory serves one replica', () => {
  const dirs: string[] = [];
  afterAll(() => dirs.forEach((d) => rmSync(d, { recursive: true, force: true })));
  const tmp = () => {
    const d = mkdtempSync(join(tmpdir(), 'an-pglite-lock-'));
    dirs.push(d);
    return d;
  };

  it('a second replica on the same directory refuses with db-locked, naming the directory and PostgreSQL; the app exits 2', async () => {
    const dir = join(tmp(), 'data');
    const first = await Analysis.start({ db: `pglite:${dir}`, grpcListen: '127.0.0.1:0' });
    try {
      const second = await Analysis.start({ db: `pglite:${dir}`, grpcListen: '127.0.0.1:0' }).then(
        (a) => a,
        (e: unknown) => e,
      );
      if (second instanceof Analysis) await second.stop();
      expect(second).toBeInstanceOf(AnalysisError);
      const e = second as AnalysisError;
      expect(e.code).toBe('db-locked');
      expect(e.message).toContain(dir);
      expect(e.message).toContain(`analysis process ${process.pid}`);
      expect(e.message).toMatch(/several replicas on PostgreSQL/);
      // The real app: exit code 2 and the same message, no stack trace.
      const r = spawnSync(process.execPath, [bin, 'analysis', '--db', `pglite:${dir}`, '--listen', '127.0.0.1:0', '--http', '127.0.0.1:0'], { encoding: 'utf8', timeout: 60_000 });
      expect(r.status, r.stderr).toBe(2);
      expect(r.stderr).toContain(`the PGlite directory ${dir} is in use by analysis process ${process.pid}`);
      expect(r.stderr).toContain('PostgreSQL');
      expect(r.stderr).not.toContain('    at ');
      // The first replica is unharmed.
      await first.applyPolicy(POLICY_ALL);
      expect(first.currentPolicies().map((p) => p.name)).toEqual(['fleet-default']);
    } finally {
      await first.stop();
    }
    // Released on stop: the directory opens again, with its data.
    expect(existsSync(join(dir, PGLITE_LOCK_FILE))).toBe(false);
    const again = await Analysis.start({ db: `pglite:${dir}`, grpcListen: '127.0.0.1:0' });
    expect(again.currentPolicies().map((p) => p.name)).toEqual(['fleet-default']);
    await again.stop();
  }, 90_000);

  it('a lock left by a process that died is taken over; a lock held by another host is not', async () => {
    const dir = join(tmp(), 'data');
    const gone = spawnSync(process.execPath, ['-e', 'process.stdout.write(String(process.pid))'], { encoding: 'utf8' });
    const deadPid = Number(gone.stdout);
    expect(deadPid).toBeGreaterThan(0);
    const { hostname } = await import('node:os');
    const { mkdirSync } = await import('node:fs');
    mkdirSync(dir, { recursive: true });
    writeFileSync(join(dir, PGLITE_LOCK_FILE), JSON.stringify({ pid: deadPid, host: hostname(), startedAt: '2020-01-01T00:00:00Z' }));
    const a = await Analysis.start({ db: `pglite:${dir}`, grpcListen: '127.0.0.1:0' });
    expect(JSON.parse(readFileSync(join(dir, PGLITE_LOCK_FILE), 'utf8'))).toMatchObject({ pid: process.pid });
    await a.stop();
    writeFileSync(join(dir, PGLITE_LOCK_FILE), JSON.stringify({ pid: deadPid, host: 'some-other-host', startedAt: '2020-01-01T00:00:00Z' }));
    const refused = await Analysis.start({ db: `pglite:${dir}`, grpcListen: '127.0.0.1:0' }).then(
      async (x) => (await x.stop(), undefined),
      (e: unknown) => e,
    );
    expect(isAnalysisError(refused, 'db-locked')).toBe(true);
    expect((refused as Error).message).toContain(`on some-other-host`);
    expect((refused as Error).message).toContain(`remove ${join(dir, PGLITE_LOCK_FILE)}`);
  }, 60_000);
});

// ------------------------------------------------------------------------------------------------ two replicas, in process

describe.skipIf(!PG_UP)('two replicas on one PostgreSQL (in process)', () => {
  let db: { url: string; drop: () => Promise<void> };
  let dir = '';
  let a: Analysis;
  let b: Analysis;
  let onA: SimHost;
  let onB: SimHost;
  const closers: (() => void)[] = [];

  beforeAll(async () => {
    db = await freshPostgresDatabase();
    dir = mkdtempSync(join(tmpdir(), 'an-rep2-'));
    const common = { db: db.url, grpcListen: '127.0.0.1:0', httpListen: '127.0.0.1:0', keepaliveMs: 200, flushMs: 100, replicas: { heartbeatMs: 200 } };
    a = await Analysis.start({ ...common, replicaId: 'replica-a', alertsJsonl: join(dir, 'a.jsonl') });
    b = await Analysis.start({ ...common, replicaId: 'replica-b', alertsJsonl: join(dir, 'b.jsonl') });
    for (const r of [a, b]) {
      r.operations.register('whoami', async ({ vm, by }, args) => ({ replica: r.replicaId, vm: vm.name, by, echo: args['echo'] ?? null }));
      r.operations.register('refuse', async ({ vm }) => {
        throw new AnalysisError('conflict', `${r.replicaId} refuses for ${vm.name}`);
      });
    }
    // The policy is stored through A; B learns it through the configuration channel.
    await a.applyPolicy(POLICY_ALL);
    await until(() => b.currentPolicies().some((p) => p.name === 'fleet-default'), 10_000, 'B reloads the policy A stored');
    onA = await startHost('host-on-a', `127.0.0.1:${a.grpcPort}`, 31);
    // B's agent lists A second: when B goes, it moves to A.
    onB = await startHost('host-on-b', `127.0.0.1:${b.grpcPort},127.0.0.1:${a.grpcPort}`, 32);
    await until(() => a.liveVms.get(onA.vm.uuidText)?.protection['kernel-code-integrity']?.startsWith('protected') ?? false, 30_000, 'VM on A protected');
    await until(() => b.liveVms.get(onB.vm.uuidText)?.protection['kernel-code-integrity']?.startsWith('protected') ?? false, 30_000, 'VM on B protected');
    await until(() => interceptsLstar(onA.vm) && interceptsLstar(onB.vm), 15_000, 'interception enabled');
  }, 120_000);

  afterAll(async () => {
    closers.forEach((c) => c());
    await onA?.stop();
    await onB?.stop();
    await a?.stop();
    await b?.stop().catch(() => undefined);
    if (dir) rmSync(dir, { recursive: true, force: true });
    await db?.drop();
  });

  it('agents spread: each VM is owned by the replica its agent is connected to', async () => {
    const hosts = (await a.store.listHosts()).map((h) => [h.hostId, h.replicaId, h.connected]);
    expect(hosts.sort()).toEqual([['host-on-a', 'replica-a', true], ['host-on-b', 'replica-b', true]]);
    expect([...a.liveVms.keys()]).toEqual([onA.vm.uuidText]);
    expect([...b.liveVms.keys()]).toEqual([onB.vm.uuidText]);
  });

  it('an operator command sent to A reaches the VM owned by B: paused in the simulator, then resumed', async () => {
    const base = `http://${a.httpAddress}`;
    const paused = await http(base, `/v1/vms/${onB.vm.uuidText}/pause`, { method: 'POST', body: JSON.stringify({ by: 'alice' }), headers: { 'content-type': 'application/json' } });
    expect(paused.status, JSON.stringify(paused.body)).toBe(200);
    expect(JSON.stringify(paused.body)).toContain('host-on-b');
    await until(() => allPaused(onB.vm), 10_000, 'every vCPU of the VM on B holding a PAUSE event');
    expect(running(onA.vm)).toBe(true);
    const resumed = await http(base, `/v1/vms/${onB.vm.uuidText}/resume`, { method: 'POST', body: '{}', headers: { 'content-type': 'application/json' } });
    expect(resumed.status, JSON.stringify(resumed.body)).toBe(200);
    await until(() => running(onB.vm), 10_000, 'the VM on B running again');
    const rows = (await a.db.query<{ name: string; origin_replica: string; target_replica: string; state: string }>(`SELECT name, origin_replica, target_replica, state FROM routed_operations WHERE vm_uuid = $1 ORDER BY created_at`, [onB.vm.uuidText]));
    expect(rows.map((r) => [r.name, r.origin_replica, r.target_replica, r.state])).toEqual([['pause', 'replica-a', 'replica-b', 'done'], ['resume', 'replica-a', 'replica-b', 'done']]);
  }, 30_000);

  it('a routed operation returns the owner\'s result, and its error with the same code', async () => {
    expect(await a.operations.run(onB.vm.uuidText, 'whoami', { echo: 'x' }, 'bob')).toEqual({ replica: 'replica-b', vm: 'host-on-b-vm', by: 'bob', echo: 'x' });
    expect(await b.operations.run(onA.vm.uuidText, 'whoami', {}, 'carol')).toEqual({ replica: 'replica-a', vm: 'host-on-a-vm', by: 'carol', echo: null });
    const e = await a.operations.run(onB.vm.uuidText, 'refuse', {}, 'bob').catch((x: unknown) => x);
    expect(isAnalysisError(e, 'conflict')).toBe(true);
    expect((e as Error).message).toBe('replica-b refuses for host-on-b-vm');
    // Through the HTTP API of A the code maps to the same status as a local error.
    const unknownVm = await a.operations.run('99999999-9999-4999-8999-999999999999', 'whoami', {}, 'bob').catch((x: unknown) => x);
    expect(isAnalysisError(unknownVm, 'not-found')).toBe(true);
  });

  it('a request whose NOTIFY was missed still runs: the owner sweeps the table', async () => {
    await a.db.query(
      `INSERT INTO routed_operations (op_id, vm_uuid, name, args, requested_by, origin_replica, target_replica, deadline_at)
       VALUES ('missed-notify', $1, 'whoami', '{"echo":"swept"}'::jsonb, 'test', 'replica-a', 'replica-b', now() + interval '30 seconds')`,
      [onB.vm.uuidText],
    );
    let row: { state: string; result: Record<string, unknown> | null } | undefined;
    await until(async () => {
      row = (await a.db.query<{ state: string; result: Record<string, unknown> | null }>(`SELECT state, result FROM routed_operations WHERE op_id = 'missed-notify'`))[0];
      return row?.state === 'done';
    }, 10_000, 'the swept request done');
    expect(row!.result).toEqual({ replica: 'replica-b', vm: 'host-on-b-vm', by: 'test', echo: 'swept' });
  });

  it('the live alert streams of A (HTTP and gRPC) show an alert ingested by B; the sinks fire only on B, once', async () => {
    const http = jsonlStream(`http://${a.httpAddress}/v1/alerts/stream?format=jsonl`);
    closers.push(http.close);
    const client = new OperatorServiceClient(`127.0.0.1:${a.grpcPort}`, credentials.createInsecure());
    const grpcGot: WatchAlertsResponse[] = [];
    const call = client.watchAlerts({ minSeverity: 0, hostId: '', vmUuid: Buffer.alloc(0), afterSeq: 0n }, new Metadata());
    call.on('data', (r: WatchAlertsResponse) => grpcGot.push(r));
    call.on('error', () => undefined);
    closers.push(() => (call.cancel(), client.close()));
    await sleep(300); // both streams registered
    const report = await runScenario(onB.vm, LSTAR_WRITE);
    expect(report.expectations.filter((x) => !x.ok)).toEqual([]);
    await until(() => http.lines.some((l) => (l['alert'] as { vm: { uuid: string } }).vm.uuid === onB.vm.uuidText), 15_000, 'the HTTP stream of A shows the alert B ingested');
    const alertId = (http.lines.find((l) => (l['alert'] as { vm: { uuid: string } }).vm.uuid === onB.vm.uuidText)!['alert'] as { id: string }).id;
    await until(() => grpcGot.some((r) => r.alert?.alertId === alertId), 15_000, 'the gRPC stream of A shows it');
    const stored = (await b.store.getAlert(alertId))!;
    expect(stored).toMatchObject({ hostId: 'host-on-b', ruleId: 'fleet-default/syscall-msrs/entry' });
    // Sinks: B's JSONL has it exactly once as created; A's has nothing about it.
    await until(() => existsSync(join(dir, 'b.jsonl')) && readFileSync(join(dir, 'b.jsonl'), 'utf8').includes(alertId), 10_000, 'B\'s JSONL sink');
    await sleep(500);
    const linesOf = (f: string) => (existsSync(f) ? readFileSync(f, 'utf8').split('\n').filter((l) => l.includes(alertId)) : []);
    expect(linesOf(join(dir, 'b.jsonl')).filter((l) => l.includes('"created"')).length).toBe(1);
    expect(linesOf(join(dir, 'a.jsonl'))).toEqual([]);
  }, 40_000);

  it('A\'s notification channel lost: on reconnect the alerts stored meanwhile reach its live stream, once', async () => {
    const stream = jsonlStream(`http://${a.httpAddress}/v1/alerts/stream?format=jsonl`);
    closers.push(stream.close);
    await sleep(300); // the stream registered
    // An alert stored with no NOTIFY (as one stored by B while A was not listening would be missed)…
    const ns = BigInt(Date.now()) * 1_000_000n;
    await b.db.query(
      `INSERT INTO alerts (alert_id, dedup_key, severity, title, host_id, vm_uuid, vm_name, first_seen_ns, last_seen_ns, created_ns)
       VALUES ('missed-while-down', 'test/missed', 3, 'Detected: stored while A was not listening', 'host-on-b', $1, 'host-on-b-vm', $2, $2, $2)`,
      [onB.vm.uuidText, ns.toString()],
    );
    // …then A's listening connection dies (PostgreSQL restart, network): A reconnects and catches up.
    const killed = await b.db.query<{ ok: boolean }>(`SELECT pg_terminate_backend(pid) AS ok FROM pg_stat_activity WHERE application_name = 'periscope-notify:replica-a'`);
    expect(killed).toEqual([{ ok: true }]);
    const ofIt = () => stream.lines.filter((l) => (l['alert'] as { id: string }).id === 'missed-while-down');
    await until(() => ofIt().length > 0, 15_000, 'A\'s live stream shows the alert stored while it was not listening');
    expect(ofIt()[0]).toMatchObject({ outcome: 'created', alert: { title: 'Detected: stored while A was not listening', hostId: 'host-on-b' } });
    const metrics = await new Promise<string>((resolve, reject) => {
      httpGet(`http://${a.httpAddress}/metrics`, (r) => {
        let body = '';
        r.setEncoding('utf8');
        r.on('data', (c: string) => (body += c));
        r.on('end', () => resolve(body));
      }).on('error', reject);
    });
    expect(metrics).toMatch(/^periscope_analysis_alerts_caught_up_total [1-9]\d*$/m);
    expect(metrics).toMatch(/^periscope_analysis_notify_reconnects_total [1-9]\d*$/m);
    // A new alert through B after the reconnect arrives by NOTIFY as before, and nothing is delivered twice.
    const report = await runScenario(onB.vm, LSTAR_WRITE);
    expect(report.expectations.filter((x) => !x.ok)).toEqual([]);
    await sleep(1000);
    expect(ofIt()).toHaveLength(1);
    const ids = stream.lines.filter((l) => l['outcome'] === 'created').map((l) => (l['alert'] as { id: string }).id);
    expect(new Set(ids).size).toBe(ids.length);
  }, 40_000);

  it('labels set through A reach the VM live on B', async () => {
    const r = await http(`http://${a.httpAddress}`, `/v1/vms/${onB.vm.uuidText}/labels`, { method: 'PUT', body: JSON.stringify({ labels: { tier: 'web' } }), headers: { 'content-type': 'application/json' } });
    expect(r.status).toBe(200);
    await until(() => b.liveVms.get(onB.vm.uuidText)?.labels['tier'] === 'web', 10_000, 'B reloads the labels');
  });

  it('B stops: its agent moves to A, which owns the VM; page restrictions are not sent again', async () => {
    const sentBefore = { ...onB.pageAccess };
    expect(sentBefore.commands).toBeGreaterThan(0);
    await b.stop();
    await until(() => a.liveVms.get(onB.vm.uuidText)?.protection['kernel-code-integrity']?.startsWith('protected') ?? false, 30_000, 'the VM of B protected through A');
    await a.settled();
    expect((await a.store.listHosts()).find((h) => h.hostId === 'host-on-b')).toMatchObject({ replicaId: 'replica-a', connected: true });
    expect(onB.pageAccess).toEqual(sentBefore);
    // Still denied (the agent's local rules never stopped), and A now acts on it locally.
    expect((await runScenario(onB.vm, LSTAR_WRITE)).expectations.filter((x) => !x.ok)).toEqual([]);
    expect(await a.operations.run(onB.vm.uuidText, 'whoami', {}, 'dave')).toMatchObject({ replica: 'replica-a' });
  }, 60_000);
});

// ------------------------------------------------------------------------------------------------ a replica killed



describe.skipIf(!PG_UP)('a replica killed mid-run (real processes)', () => {
  let db: { url: string; drop: () => Promise<void> };
  let policyDir = '';
  const replicas: ReplicaProcess[] = [];
  const hosts: SimHost[] = [];
  let q: pg.Client;

  beforeAll(async () => {
    db = await freshPostgresDatabase();
    policyDir = mkdtempSync(join(tmpdir(), 'an-rep-pol-'));
    writeFileSync(join(policyDir, 'fleet-default.yaml'), POLICY_ALL);
    q = new pg.Client({ connectionString: db.url });
    await q.connect();
  });

  afterAll(async () => {
    for (const h of hosts) await h.stop();
    for (const r of replicas) r.child.kill('SIGKILL');
    await q?.end();
    if (policyDir) rmSync(policyDir, { recursive: true, force: true });
    await db?.drop();
  });

  const protectedOn = async (r: ReplicaProcess, h: SimHost): Promise<boolean> => {
    const v = await http(`http://${r.http}`, `/v1/vms/${h.vm.uuidText}`).catch(() => undefined);
    const prot = (v?.body['vm'] as { protection?: Record<string, string> } | undefined)?.protection?.['kernel-code-integrity'] ?? '';
    return prot.startsWith('protected');
  };
  const ownerOf = async (hostId: string): Promise<string> =>
    ((await q.query<{ replica_id: string; connected: boolean }>('SELECT replica_id, connected FROM hosts WHERE host_id = $1', [hostId])).rows[0]?.replica_id ?? '');

  it('agents reconnect to the surviving replica; every detection id has exactly one alert; protections restored once', async () => {
    replicas.push(await startReplicaProcess('replica-1', db.url, policyDir));
    replicas.push(await startReplicaProcess('replica-2', db.url, policyDir));
    const [r1, r2] = replicas as [ReplicaProcess, ReplicaProcess];
    // Four hosts, spread: even ones list replica-1 first, odd ones replica-2 first.
    for (let i = 0; i < 4; i++) {
      const order = i % 2 === 0 ? [r1, r2] : [r2, r1];
      hosts.push(await startHost(`host-${i}`, order.map((r) => r.grpc).join(','), 40 + i));
    }
    const onR2 = hosts.filter((_h, i) => i % 2 === 1);
    for (const [i, h] of hosts.entries()) {
      await until(() => protectedOn(i % 2 === 0 ? r1 : r2, h), 60_000, `${h.hostId} protected`);
    }
    await until(() => hosts.every((h) => interceptsLstar(h.vm)), 20_000, 'interception enabled everywhere');
    const owners: string[] = [];
    for (const h of hosts) owners.push(await ownerOf(h.hostId));
    expect(owners).toEqual(['replica-1', 'replica-2', 'replica-1', 'replica-2']);
    const restrictionsSent = hosts.map((h) => ({ ...h.pageAccess }));
    expect(restrictionsSent.every((p) => p.commands > 0 && p.entries > 0)).toBe(true);

    // A command through replica-1 reaches a VM owned by replica-2.
    const target = onR2[0]!;
    const paused = await http(`http://${r1.http}`, `/v1/vms/${target.vm.uuidText}/pause`, { method: 'POST', body: '{"by":"ops"}', headers: { 'content-type': 'application/json' } });
    expect(paused.status, JSON.stringify(paused.body)).toBe(200);
    await until(() => allPaused(target.vm), 10_000, 'paused through the other replica');
    const resumed = await http(`http://${r1.http}`, `/v1/vms/${target.vm.uuidText}/resume`, { method: 'POST', body: '{}', headers: { 'content-type': 'application/json' } });
    expect(resumed.status, JSON.stringify(resumed.body)).toBe(200);
    await until(() => running(target.vm), 10_000, 'resumed through the other replica');

    // Detections flow on every VM; the guest's writes stay denied throughout (local verdicts).
    let flowing = true;
    const failures: string[] = [];
    const flows = hosts.map(async (h) => {
      while (flowing) {
        const r = await runScenario(h.vm, LSTAR_WRITE);
        for (const x of r.expectations) if (!x.ok) failures.push(`${h.hostId}: ${JSON.stringify(x)}`);
        await sleep(10);
      }
    });
    const ingestedFrom = async (hostIds: string[]): Promise<number> =>
      Number((await q.query<{ n: string }>('SELECT count(*) AS n FROM alert_detections d JOIN alerts a ON a.alert_id = d.alert_id WHERE a.host_id = ANY($1)', [hostIds])).rows[0]!.n);
    const r2Hosts = onR2.map((h) => h.hostId);
    await until(async () => (await ingestedFrom(r2Hosts)) >= 10, 30_000, 'replica-2 ingesting detections');

    r2.child.kill('SIGKILL');
    const before = await ingestedFrom(r2Hosts);
    const allOnR1 = async () => {
      for (const h of r2Hosts) if ((await ownerOf(h)) !== 'replica-1') return false;
      return true;
    };
    await until(allOnR1, 30_000, 'replica-2\'s agents on replica-1');
    // They lost their stream (the replica died under them) and opened a new one, on the next listed address.
    for (const h of onR2) expect(h.agent.link!.client.stats.disconnects).toBeGreaterThanOrEqual(1);
    for (const h of onR2) expect(h.agent.link!.client.address).toBe(r1.grpc);
    await until(async () => (await ingestedFrom(r2Hosts)) >= before + 10, 30_000, 'replica-1 ingesting the moved hosts\' detections');
    flowing = false;
    await Promise.all(flows);
    expect(failures).toEqual([]);

    // Nothing lost: every spool drains (acknowledged by replica-1), and each detection id has one alert.
    await until(() => hosts.every((h) => h.agent.link!.spool.count === 0), 30_000, 'every spooled detection acknowledged');
    const generated = new Set(hosts.flatMap((h) => [...h.detections]));
    expect(generated.size).toBeGreaterThan(40);
    const stored = (await q.query<{ detection_id: string; alert_id: string | null }>('SELECT d.detection_id, a.alert_id FROM alert_detections d LEFT JOIN alerts a ON a.alert_id = d.alert_id')).rows;
    expect(stored.length).toBe(generated.size);
    expect(new Set(stored.map((r) => r.detection_id))).toEqual(generated);
    expect(stored.every((r) => r.alert_id !== null)).toBe(true);

    // Protections restored once: protected through replica-1, no page restriction sent again.
    for (const h of onR2) await until(() => protectedOn(r1, h), 30_000, `${h.hostId} protected through replica-1`);
    expect(hosts.map((h) => ({ ...h.pageAccess }))).toEqual(restrictionsSent);
    const status = await http(`http://${r1.http}`, '/v1/hosts');
    expect((status.body['hosts'] as { hostId: string; replicaId: string; connected: boolean }[]).map((h) => [h.hostId, h.replicaId, h.connected]).sort()).toEqual(
      hosts.map((h) => [h.hostId, 'replica-1', true]),
    );
  }, 240_000);
});

// ------------------------------------------------------------------------------------------------ an owner that stops responding

describe.skipIf(!PG_UP)('a routed operation whose owner replica stops responding (SIGSTOP, real process)', () => {
  let db: { url: string; drop: () => Promise<void> };
  let policyDir = '';
  let owner: ReplicaProcess | undefined;
  let caller: Analysis | undefined;
  let host: SimHost | undefined;

  beforeAll(async () => {
    db = await freshPostgresDatabase();
    policyDir = mkdtempSync(join(tmpdir(), 'an-rep-stop-'));
    writeFileSync(join(policyDir, 'fleet-default.yaml'), POLICY_ALL);
  });

  afterAll(async () => {
    owner?.child.kill('SIGCONT');
    await host?.stop();
    await caller?.stop();
    owner?.child.kill('SIGKILL');
    if (policyDir) rmSync(policyDir, { recursive: true, force: true });
    await db?.drop();
  });

  it('the caller fails on the owner\'s lost heartbeat with a clear not-attached error, not its route timeout; the request never runs late', async () => {
    owner = await startReplicaProcess('replica-frozen', db.url, policyDir);
    // The caller's route timeout is far longer than the test: only noticing the lost owner can end the call.
    caller = await Analysis.start({
      db: db.url, grpcListen: '127.0.0.1:0', httpListen: '127.0.0.1:0', replicaId: 'replica-caller', keepaliveMs: 200, flushMs: 100,
      replicas: { heartbeatMs: 200, staleAfterMs: 5000, routeTimeoutMs: 120_000 },
    });
    host = await startHost('host-frozen', owner.grpc, 50); // only the owner's address: its agent cannot move
    const vm = host.vm;
    await until(async () => {
      const v = await http(`http://${owner!.http}`, `/v1/vms/${vm.uuidText}`).catch(() => undefined);
      return ((v?.body['vm'] as { protection?: Record<string, string> } | undefined)?.protection?.['kernel-code-integrity'] ?? '').startsWith('protected');
    }, 60_000, 'the VM protected through its owner');

    owner.child.kill('SIGSTOP');
    const failure = await caller.operations.run(vm.uuidText, 'pause', {}, 'ops').then(
      () => new Error('the pause succeeded through a stopped owner'),
      (e: unknown) => e as Error,
    );
    expect(isAnalysisError(failure, 'not-attached'), String(failure)).toBe(true);
    expect(failure.message).toMatch(/replica-frozen.*(stopped responding|is not responding) \(last heartbeat \d+ s ago\)/);
    const rows = await caller.db.query<{ name: string; state: string }>('SELECT name, state FROM routed_operations WHERE vm_uuid = $1', [vm.uuidText]);
    expect(rows).toEqual([{ name: 'pause', state: 'expired' }]);

    // The owner wakes up: it must not run the expired request (the guest is never paused behind the caller's back).
    owner.child.kill('SIGCONT');
    await until(async () => {
      const h = await http(`http://${owner!.http}`, '/v1/hosts').catch(() => undefined);
      return h?.status === 200;
    }, 30_000, 'the owner answering again');
    await sleep(1500); // several of the owner's sweeps (1 s heartbeat)
    expect(vm.vcpus.some((c) => c.waitingFor?.event === 'PAUSE')).toBe(false);
    expect(await caller.db.query<{ state: string }>('SELECT state FROM routed_operations WHERE vm_uuid = $1', [vm.uuidText])).toEqual([{ state: 'expired' }]);
  }, 120_000);
});
