#!/usr/bin/env node
/**
 * Ingest bench (`npm run bench` in libs/analysis): events/s and detections/s one analysis replica ingests
 * from scripted agents over real gRPC, on PGlite (embedded, data directory) and on PostgreSQL.
 *
 * Method: A agents (default 4), each with V VMs (default 8), send EventBatch messages of B events (default
 * 512, CR/MSR/PF mix with registers, as the agent reports them) as fast as the stream accepts for S seconds
 * (default 5) after a 1 s warm-up; the figure is events handled by the service (its own counter) per second.
 * Then D detections (default 2000, distinct ids, 50 distinct victims) are sent and timed until every one is
 * acknowledged (each is one transaction). PostgreSQL: PERISCOPE_TEST_POSTGRES or postgres://postgres@127.0.0.1:5432/postgres
 * (a fresh database, dropped after); skipped with a note when no server answers.
 * Flags: --agents A --vms V --batch B --seconds S --detections D --only pglite|postgres
 *   --baseline  also run the same agents against a raw grpc-js sink (the Link method with an identity
 *               deserializer, counting messages): the transport's own ceiling for these messages.
 *   --json      human lines to stderr, one JSON line to stdout (read by bench/run.mjs).
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir, cpus } from 'node:os';
import { join } from 'node:path';
import { randomBytes, randomUUID } from 'node:crypto';
import grpc from '@grpc/grpc-js';
import pg from 'pg';
import { AgentLinkServiceClient, AgentLinkServiceService, LinkRequest, uuidToBytes } from '@periscope/contracts';
import { Analysis } from '@periscope/analysis';

const arg = (name, def) => {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? process.argv[i + 1] : def;
};
const AGENTS = Number(arg('agents', 4));
const VMS = Number(arg('vms', 8));
const BATCH = Number(arg('batch', 512));
const SECONDS = Number(arg('seconds', 5));
const DETECTIONS = Number(arg('detections', 2000));
const ONLY = arg('only', '');
const BASELINE = process.argv.includes('--baseline');
const JSON_OUT = process.argv.includes('--json');
const say = JSON_OUT ? (...a) => console.error(...a) : (...a) => console.log(...a);
const DSN = process.env.PERISCOPE_TEST_POSTGRES || 'postgres://postgres@127.0.0.1:5432/postgres';

const regs = { rax: 0x3406e0n, rbx: 1n, rcx: 2n, rdx: 3n, rsi: 4n, rdi: 5n, rsp: 0xffffc90000001000n, rbp: 6n, r8: 0n, r9: 0n, r10: 0n, r11: 0n, r12: 0n, r13: 0n, r14: 0n, r15: 0n, rip: 0xffffffff81000220n, rflags: 0x246n };

function agent(port, hostId, vms) {
  const client = new AgentLinkServiceClient(`127.0.0.1:${port}`, grpc.credentials.createInsecure());
  const stream = client.link();
  const acks = new Set();
  stream.on('data', (r) => {
    if (r.message?.$case === 'detectionAck') for (const id of r.message.value.detectionIds) acks.add(id);
  });
  stream.on('error', () => undefined);
  let seq = 0n;
  const send = (message) => stream.write(LinkRequest.fromPartial({ streamSeq: ++seq, message }));
  send({ $case: 'hello', value: { hostId, agentVersion: 'bench', agentInstanceId: randomUUID(), startedUnixNs: 1n, capabilities: [], activePolicyId: '', activePolicyVersion: 0n } });
  for (const uuid of vms) send({ $case: 'vmAttached', value: { hostId, vmUuid: uuidToBytes(uuid), sessionGeneration: 1n, name: `bench-${uuid.slice(0, 8)}`, qemuStartTimeMs: 1n, vcpuCount: 2, dialect: 1, allowedCommands: [], allowedEvents: [], attachedUnixNs: 1n } });
  let n = 0;
  const batch = () => {
    const events = [];
    for (let i = 0; i < BATCH; i++) {
      n++;
      const k = n % 3;
      events.push({
        hostId, vmUuid: uuidToBytes(vms[n % vms.length]), sessionGeneration: 1n, vcpu: n & 1, seq: n, receivedUnixNs: BigInt(Date.now()) * 1_000_000n, repliedUnixNs: 0n, disposition: 1, verdictDeadlineUnixNs: 0n, ruleId: '', policyVersion: 0n, mode: 8, regs,
        payload: k === 0 ? { $case: 'cr', value: { cr: 3, oldValue: 0x1000n, newValue: 0x2000n } } : k === 1 ? { $case: 'msr', value: { msr: 0xc0000082, oldValue: 1n, newValue: 1n } } : { $case: 'pf', value: { gva: 0xffffffff81000000n, gpa: 0x1000000n, access: 2 } },
      });
    }
    return LinkRequest.fromPartial({ streamSeq: ++seq, message: { $case: 'eventBatch', value: { events } } });
  };
  return { client, stream, send, acks, batch };
}

async function pump(agents, ms) {
  const batches = agents.map((a) => a.batch()); // built once per agent: the bench measures analysis, not the client
  const end = Date.now() + ms;
  await Promise.all(agents.map((a, i) => (async () => {
    while (Date.now() < end) {
      const ok = a.stream.write(batches[i]);
      if (!ok) await new Promise((r) => a.stream.once('drain', r));
      else await new Promise((r) => setImmediate(r));
    }
  })()));
}

function eventsHandled(svc) {
  const text = svc.registry.render();
  let sum = 0;
  for (const line of text.split('\n')) if (line.startsWith('periscope_analysis_events_total{')) sum += Number(line.slice(line.lastIndexOf(' ') + 1));
  return sum;
}

async function runOne(label, db) {
  const svc = await Analysis.start({ db, grpcListen: '127.0.0.1:0', keepaliveMs: 1000, flushMs: 1000 });
  const agents = [];
  for (let i = 0; i < AGENTS; i++) agents.push(agent(svc.grpcPort, `bench-host-${i}`, Array.from({ length: VMS }, () => randomUUID())));
  await new Promise((r) => setTimeout(r, 300));
  await pump(agents, 1000);
  await svc.settled();
  const e0 = eventsHandled(svc);
  const t0 = process.hrtime.bigint();
  await pump(agents, SECONDS * 1000);
  await svc.settled();
  const secs = Number(process.hrtime.bigint() - t0) / 1e9;
  const events = eventsHandled(svc) - e0;
  // Detections: each one is a transaction (one alert row per detection id, storms folded).
  const a0 = agents[0];
  const vm = randomUUID();
  a0.send({ $case: 'vmAttached', value: { hostId: 'bench-host-0', vmUuid: uuidToBytes(vm), sessionGeneration: 1n, name: 'det', qemuStartTimeMs: 1n, vcpuCount: 1, dialect: 1, allowedCommands: [], allowedEvents: [], attachedUnixNs: 1n } });
  const d0 = process.hrtime.bigint();
  for (let i = 0; i < DETECTIONS; i++) {
    a0.send({ $case: 'detection', value: {
      detectionId: `d-${i}-${randomBytes(4).toString('hex')}`, hostId: 'bench-host-0', vmUuid: uuidToBytes(vm), sessionGeneration: 1n, vcpu: 0, ruleId: 'bench/cr-pinning/cr4', severity: 4, summary: 'bench', eventSeqs: [i], detectedUnixNs: BigInt(Date.now()) * 1_000_000n, attributes: {},
      event: { hostId: 'bench-host-0', vmUuid: uuidToBytes(vm), sessionGeneration: 1n, vcpu: 0, seq: i, receivedUnixNs: 1n, repliedUnixNs: 1n, disposition: 1, verdictDeadlineUnixNs: 0n, ruleId: 'bench/cr-pinning/cr4', policyVersion: 1n, mode: 8, regs: { ...regs, rip: regs.rip + BigInt(i % 50) }, payload: { $case: 'cr', value: { cr: 4, oldValue: 0x3406e0n, newValue: 0x2406e0n } } },
      instructionBytes: Buffer.alloc(0), instructionText: '', policyId: 'p', policyVersion: 1n,
    } });
  }
  while (a0.acks.size < DETECTIONS) await new Promise((r) => setTimeout(r, 20));
  const dsecs = Number(process.hrtime.bigint() - d0) / 1e9;
  const alerts = (await svc.db.query('SELECT count(*) AS n FROM alerts'))[0].n;
  for (const a of agents) {
    a.stream.end();
    a.client.close();
  }
  await svc.stop();
  return { label, eventsPerSec: Math.round(events / secs), events, seconds: +secs.toFixed(2), detectionsPerSec: Math.round(DETECTIONS / dsecs), alerts: Number(alerts) };
}

/** The baseline: the same agents and batches into a grpc-js server that only counts the messages. */
async function runRawSink() {
  let batches = 0;
  const service = { link: { ...AgentLinkServiceService.link, requestDeserialize: (b) => b } };
  const server = new grpc.Server();
  server.addService(service, {
    link: (call) => {
      call.on('data', (b) => {
        if (b.length > 1024) batches++; // hello and vmAttached are small; every batch is BATCH events
      });
      call.on('end', () => call.end());
      call.on('error', () => undefined);
    },
  });
  const port = await new Promise((resolve, reject) => server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (e, p) => (e ? reject(e) : resolve(p))));
  const agents = [];
  for (let i = 0; i < AGENTS; i++) agents.push(agent(port, `bench-host-${i}`, Array.from({ length: VMS }, () => randomUUID())));
  await new Promise((r) => setTimeout(r, 300));
  await pump(agents, 1000);
  const b0 = batches;
  const t0 = process.hrtime.bigint();
  await pump(agents, SECONDS * 1000);
  const secs = Number(process.hrtime.bigint() - t0) / 1e9;
  const events = (batches - b0) * BATCH;
  for (const a of agents) {
    a.stream.end();
    a.client.close();
  }
  server.forceShutdown();
  return { label: 'raw grpc-js sink (counts messages)', eventsPerSec: Math.round(events / secs), events, seconds: +secs.toFixed(2) };
}

async function withPostgres(fn) {
  const admin = new pg.Client({ connectionString: DSN, connectionTimeoutMillis: 2000 });
  try {
    await admin.connect();
  } catch {
    say(`note: no PostgreSQL answers at ${DSN}: PostgreSQL figures skipped`);
    return undefined;
  }
  const name = `periscope_bench_${Date.now().toString(36)}`;
  await admin.query(`CREATE DATABASE ${name}`);
  const u = new URL(DSN);
  u.pathname = `/${name}`;
  try {
    return await fn(u.toString());
  } finally {
    await admin.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`).catch(() => undefined);
    await admin.end();
  }
}

const results = [];
say(`analysis ingest bench: ${AGENTS} agents × ${VMS} VMs, batches of ${BATCH} events, ${SECONDS} s; ${DETECTIONS} detections; ${cpus().length} CPUs, Node ${process.version}`);
if (ONLY !== 'postgres') {
  const dir = mkdtempSync(join(tmpdir(), 'an-bench-'));
  try {
    results.push(await runOne('PGlite (data dir)', `pglite:${dir}`));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}
if (ONLY !== 'pglite') {
  const r = await withPostgres((url) => runOne('PostgreSQL 127.0.0.1', url));
  if (r) results.push(r);
}
const raw = BASELINE ? await runRawSink() : null;
if (JSON_OUT) {
  for (const r of [...results, ...(raw ? [raw] : [])]) say(JSON.stringify(r));
  console.log(JSON.stringify({ bench: 'analysis-ingest', agents: AGENTS, vms: VMS, batch: BATCH, seconds: SECONDS, detections: DETECTIONS, results, raw }));
} else {
  for (const r of results) console.log(JSON.stringify(r));
  if (raw) console.log(JSON.stringify(raw));
}
