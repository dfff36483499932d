#!/usr/bin/env node
// B5 (second half): N agent streams into ONE analysis replica, from <= 4 load-generator processes replaying
// recorded agent traffic. Run after the build; bench/run.mjs runs it as part of the suite.
//
//  1. Record. A real host agent (`bin/periscope host-agent --analysis`) reports to a recording gRPC server in
//     this process (the Link method with an identity deserializer: the bytes exactly as grpc-js received
//     them). The simulator (4 VMs × 2 vCPUs, in this process) toggles CR4.PGE (rule `bench-cr4-pge`: allow,
//     reported → VerdictRecords) and CR4.PCE (rule `bench-cr4-pce`: allow, reported with the event →
//     EventBatch) on every vCPU for RECORD_S seconds. The recording: hello, the VmAttached snapshot, then
//     every EventBatch / VerdictBatch the agent sent, in order. Nothing is hand-encoded.
//  2. Replay. Each load generator (a child process, real grpc-js clients) takes STREAMS/PROCS streams. Per
//     stream the recording is re-encoded once with the real ts-proto encoders: its own host id and its own
//     VM uuids, stream_seq left out (the generator prefixes field 1 per message, so a message costs one small
//     concat). Each stream sends hello + snapshot, then loops over the recorded batches as fast as HTTP/2
//     flow control accepts (the generators saturate the replica: this is its capacity, not a paced load).
//  3. Measure, into a real analysis replica (`Analysis.start` on PostgreSQL — a fresh database on
//     PERISCOPE_TEST_POSTGRES or postgres://postgres@127.0.0.1:5432/postgres, dropped after; PGlite in memory
//     when no server answers — in a child process whose CPU and RSS come from /proc; keepalive 250 ms): records ingested per second = records in the messages
//     the replica acknowledged (Keepalive.acked_stream_seq is the highest stream_seq it has *processed*),
//     per stream between the first and last acknowledgement inside the window; ack lag = acknowledgement
//     received − message written (an upper bound on per-message latency: acknowledgements are cumulative
//     and come every 250 ms).
//  4. Baseline, same run, same generators and bytes: the `@periscope/testing` AnalysisPeer in count mode (it
//     counts records from the protobuf tags without decoding) — the transport's ceiling on this machine.
//
// Flags: --streams N (100) --procs P (4) --seconds S (10) --warmup W (2) --record-seconds R (2) --json
import { fork, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { request } from 'node:http';
import { cpus, tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, '..');
const arg = (name, def) => {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? Number(process.argv[i + 1]) : def;
};
const STREAMS = arg('streams', 100);
const PROCS = Math.min(4, arg('procs', 4));
const SECONDS = arg('seconds', 10);
const WARMUP = arg('warmup', 2);
const RECORD_S = arg('record-seconds', 2);
const KEEPALIVE_MS = 250;
const JSON_OUT = process.argv.includes('--json');
const say = JSON_OUT ? (...a) => console.error(...a) : (...a) => console.log(...a);
const progress = (m) => process.stderr.write(`[streams bench] ${m}\n`);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
async function until(cond, ms, what) {
  const t0 = Date.now();
  while (!(await cond())) {
    if (Date.now() - t0 > ms) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}
const lib = (name) => import(join(root, `libs/${name}/dist/index.js`));
const grpcModule = () => import(join(root, 'node_modules/@grpc/grpc-js/build/src/index.js'));
const pct = (sorted, p) => (sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))] : null);

const children = new Set();
process.on('exit', () => {
  for (const c of children) c.kill('SIGKILL');
});
const track = (c) => {
  children.add(c);
  c.once('exit', () => children.delete(c));
  return c;
};
const ask = (child, msg, key) =>
  new Promise((resolve) => {
    const on = (m) => {
      if (m && m[key] !== undefined) {
        child.off('message', on);
        resolve(m[key]);
      }
    };
    child.on('message', on);
    child.send(msg);
  });

function procStat(pid) {
  const st = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const f = st.slice(st.lastIndexOf(')') + 2).split(' ');
  const rss = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return { cpuS: (Number(f[11]) + Number(f[12])) / 100, rssMiB: rss ? Number(rss[1]) / 1024 : NaN, t: performance.now() };
}

// ---- 1. recording ------------------------------------------------------------------------------------
async function record(dir) {
  const grpc = await grpcModule();
  const contracts = await lib('contracts');
  const sim = await lib('simulator');
  const verdicts = await lib('verdicts');
  const messages = [];
  const server = new grpc.Server();
  server.addService({ link: { ...contracts.AgentLinkServiceService.link, requestDeserialize: (b) => b } }, {
    link: (call) => {
      call.on('data', (b) => messages.push(Buffer.from(b)));
      call.on('error', () => undefined);
      call.on('end', () => call.end());
    },
  });
  const port = await new Promise((resolve, reject) => server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (e, p) => (e ? reject(e) : resolve(p))));
  writeFileSync(join(dir, 'cookie'), 'bench');
  const policy = JSON.parse(readFileSync(verdicts.DEFAULT_POLICY_PATH, 'utf8'));
  policy.rules.unshift(
    { id: 'bench-cr4-pge', match: { kind: 'CR', cr: 4, changes: '0x80' }, action: 'allow', report: 'always' },
    { id: 'bench-cr4-pce', match: { kind: 'CR', cr: 4, changes: '0x100' }, action: 'allow', report: 'event' },
  );
  writeFileSync(join(dir, 'policy.json'), JSON.stringify(policy));
  const agent = track(spawn(process.execPath, [join(root, 'bin/periscope'), 'host-agent', '--kvmi-listen', `unix:${dir}/k.sock`, '--cookie-file', join(dir, 'cookie'), '--policy', join(dir, 'policy.json'), '--analysis', `127.0.0.1:${port}`, '--api-listen', `unix:${dir}/api.sock`, '--log-level', 'warn'], { stdio: ['ignore', 'ignore', 'inherit'] }));
  await until(() => existsSync(join(dir, 'api.sock')), 30000, 'the agent API');
  const fleet = new sim.Simulator({ introspector: join(dir, 'k.sock'), vms: 4, vcpus: 2, key: Buffer.from('bench'), jitterMs: 0, apsOnline: true });
  await fleet.start();
  const vms = async () =>
    JSON.parse(
      await new Promise((resolve, reject) => {
        const req = request({ socketPath: join(dir, 'api.sock'), path: '/v1/vms' }, (res) => {
          let b = '';
          res.on('data', (c) => (b += c));
          res.on('end', () => resolve(b));
        });
        req.on('error', reject);
        req.end();
      }),
    ).vms;
  await until(async () => {
    const v = await vms();
    return v.length === 4 && v.every((x) => x.state === 'protected');
  }, 60000, 'the recorded VMs to be protected');
  const end = Date.now() + RECORD_S * 1000;
  let writes = 0;
  await Promise.all(
    fleet.vms.flatMap((vm) =>
      vm.vcpus.map(async (cpu, i) => {
        const bit = i % 2 === 0 ? 1n << 7n : 1n << 8n;
        while (Date.now() < end) {
          await cpu.writeCr(4, cpu.cpu.sregs.cr4 ^ bit);
          writes++;
        }
      }),
    ),
  );
  await sleep(1500); // the last batches flushed
  agent.kill('SIGTERM');
  await new Promise((r) => agent.once('exit', r));
  await fleet.shutdown().catch(() => undefined);
  server.forceShutdown();
  return { messages, writes };
}

// ---- the fixture: recorded messages → per-stream re-encoded bodies -----------------------------------
/** Walks a decoded message and replaces the recorded host id and VM uuids (any 16-byte field equal to one). */
function rewrite(value, hostFrom, hostTo, uuidMap) {
  if (value instanceof Uint8Array) {
    if (value.length === 16) {
      const to = uuidMap.get(Buffer.from(value).toString('hex'));
      if (to) return to;
    }
    return value;
  }
  if (Array.isArray(value)) return value.map((v) => rewrite(v, hostFrom, hostTo, uuidMap));
  if (value && typeof value === 'object') {
    const out = {};
    for (const [k, v] of Object.entries(value)) out[k] = k === 'hostId' && v === hostFrom ? hostTo : rewrite(v, hostFrom, hostTo, uuidMap);
    return out;
  }
  return value;
}

async function fixtureFor(recorded, streamIndex) {
  const { LinkRequest } = await lib('contracts');
  const decoded = recorded.map((b) => LinkRequest.decode(b));
  const hello = decoded.find((m) => m.message?.$case === 'hello');
  if (!hello) throw new Error('the recording has no hello');
  const hostFrom = hello.message.value.hostId;
  const uuids = [...new Set(decoded.filter((m) => m.message?.$case === 'vmAttached').map((m) => Buffer.from(m.message.value.vmUuid).toString('hex')))];
  const uuidMap = new Map(uuids.map((u, i) => {
    const b = Buffer.alloc(16);
    b.writeUInt32BE(0xb5b5b5b5, 0);
    b.writeUInt32BE(streamIndex, 8);
    b.writeUInt32BE(i + 1, 12);
    b[6] = 0x40; // version 4, variant 10 (a well-formed uuid)
    b[8] = (b[8] & 0x3f) | 0x80;
    return [u, b];
  }));
  const seen = new Set();
  const attach = [];
  const steady = [];
  for (const m of decoded) {
    const c = m.message?.$case;
    const body = () => Buffer.from(LinkRequest.encode(rewrite({ ...m, streamSeq: 0n }, hostFrom, `replay-${streamIndex}`, uuidMap)).finish());
    if (c === 'hello' && !seen.has('hello')) {
      seen.add('hello');
      attach.push({ body: body(), records: 0 });
    } else if (c === 'vmAttached' && !seen.has(Buffer.from(m.message.value.vmUuid).toString('hex'))) {
      seen.add(Buffer.from(m.message.value.vmUuid).toString('hex'));
      attach.push({ body: body(), records: 0 });
    } else if (c === 'eventBatch') steady.push({ body: body(), records: m.message.value.events.length });
    else if (c === 'verdictBatch') steady.push({ body: body(), records: m.message.value.records.length });
  }
  return { attach, steady };
}

// ---- load generator (child process) ------------------------------------------------------------------
async function loadgenChild() {
  const grpc = await grpcModule();
  const { LinkResponse } = await lib('contracts');
  const cfg = await new Promise((r) => process.once('message', r));
  const recorded = JSON.parse(readFileSync(cfg.fixture, 'utf8')).map((h) => Buffer.from(h, 'hex'));
  const varint = (n) => {
    const out = [0x08];
    let v = BigInt(n);
    while (v >= 0x80n) {
      out.push(Number(v & 0x7fn) | 0x80);
      v >>= 7n;
    }
    out.push(Number(v));
    return Buffer.from(out);
  };
  const streams = [];
  for (const idx of cfg.streams) {
    const fx = await fixtureFor(recorded, idx);
    const client = new grpc.Client(cfg.address, grpc.credentials.createInsecure(), { 'grpc.max_send_message_length': 64 << 20 });
    const call = client.makeBidiStreamRequest('/periscope.v1.AgentLinkService/Link', (b) => b, (b) => LinkResponse.decode(b), new grpc.Metadata(), {});
    const st = { fx, client, call, seq: 0, cum: [0], sentAt: [0], lastAck: { seq: 0, t: 0 }, marks: [], lags: [], measuring: false };
    call.on('data', (r) => {
      if (r.message?.$case !== 'keepalive') return;
      const q = Number(r.message.value.ackedStreamSeq);
      const t = performance.now();
      if (q > st.lastAck.seq) {
        if (st.measuring) for (let s = st.lastAck.seq + 1; s <= q; s++) st.lags.push(t - st.sentAt[s]);
        st.lastAck = { seq: q, t };
      }
    });
    call.on('error', () => undefined);
    const send = (m) => {
      st.seq++;
      st.cum.push(st.cum[st.cum.length - 1] + m.records);
      st.sentAt.push(performance.now());
      return call.write(Buffer.concat([varint(st.seq), m.body]));
    };
    st.send = send;
    for (const m of fx.attach) send(m);
    streams.push(st);
  }
  let running = false;
  const pump = async (st) => {
    let i = 0;
    while (running) {
      const ok = st.send(st.fx.steady[i]);
      i = (i + 1) % st.fx.steady.length;
      if (!ok) await new Promise((r) => st.call.once('drain', r));
      else if ((i & 15) === 0) await new Promise((r) => setImmediate(r));
    }
  };
  let pumps = [];
  process.on('message', async (m) => {
    if (m === 'go') {
      running = true;
      pumps = streams.map(pump);
    } else if (m === 'mark') {
      for (const st of streams) {
        st.marks.push({ ack: { ...st.lastAck }, sentSeq: st.seq, t: performance.now() });
        st.measuring = st.marks.length === 1;
      }
      process.send({ marked: true });
    } else if (m === 'stop') {
      running = false;
      await Promise.all(pumps);
      const per = streams.map((st) => {
        const [a, b] = st.marks;
        const acked = st.cum[b.ack.seq] - st.cum[a.ack.seq];
        const secs = (b.ack.t - a.ack.t) / 1000;
        return { ackedRecords: acked, ackSeconds: secs, sentRecords: st.cum[b.sentSeq] - st.cum[a.sentSeq], sentSeconds: (b.t - a.t) / 1000, messages: b.sentSeq - a.sentSeq };
      });
      const lags = streams.flatMap((st) => st.lags);
      for (const st of streams) {
        st.call.cancel();
        st.client.close();
      }
      process.send({ stats: { per, lags } });
    }
  });
  process.send({ ready: true });
  process.on('disconnect', () => process.exit(0));
}

// ---- sinks (child processes) -------------------------------------------------------------------------
async function analysisChild() {
  const { Analysis } = await lib('analysis');
  const a = await Analysis.start({ db: process.env.STREAMS_BENCH_DB || 'pglite:memory', grpcListen: '127.0.0.1:0', keepaliveMs: KEEPALIVE_MS, flushMs: 1000 });
  process.on('message', (m) => {
    if (m === 'agents') process.send({ agents: a.liveVms.size });
  });
  process.send({ address: `127.0.0.1:${a.grpcPort}` });
  process.on('disconnect', () => process.exit(0));
}

async function peerChild() {
  const { AnalysisPeer } = await lib('testing');
  const peer = new AnalysisPeer({ mode: 'count', autoAckDetections: true, retain: false });
  await peer.start();
  process.on('message', (m) => {
    if (m === 'counts') process.send({ counts: { ...peer.counts } });
  });
  process.send({ address: peer.address });
  process.on('disconnect', () => process.exit(0));
}

// ---- driver ------------------------------------------------------------------------------------------
/** A fresh PostgreSQL database for the replica (dropped after), or PGlite in memory when none answers. */
async function withDatabase(fn) {
  const dsn = process.env.PERISCOPE_TEST_POSTGRES || 'postgres://postgres@127.0.0.1:5432/postgres';
  let admin;
  try {
    const { default: pg } = await import('pg');
    admin = new pg.Client({ connectionString: dsn, connectionTimeoutMillis: 2000 });
    await admin.connect();
  } catch {
    progress(`no PostgreSQL answers at ${dsn}: PGlite in memory`);
    return fn('pglite:memory', 'PGlite (in memory)');
  }
  const name = `periscope_streams_${Date.now().toString(36)}`;
  await admin.query(`CREATE DATABASE ${name}`);
  const u = new URL(dsn);
  u.pathname = `/${name}`;
  try {
    return await fn(u.toString(), 'PostgreSQL');
  } finally {
    await admin.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`).catch(() => undefined);
    await admin.end();
  }
}

async function phase(kind, fixturePath, perProc, db) {
  const sink = track(fork(fileURLToPath(import.meta.url), [kind === 'analysis' ? '--analysis-child' : '--peer-child'], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'], env: { ...process.env, STREAMS_BENCH_DB: db ?? '' } }));
  const address = await new Promise((r) => sink.once('message', (m) => r(m.address)));
  const sinkStart = procStat(sink.pid);
  const gens = [];
  for (let p = 0; p < perProc.length; p++) {
    const g = track(fork(fileURLToPath(import.meta.url), ['--loadgen'], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] }));
    g.send({ address, fixture: fixturePath, streams: perProc[p] });
    await new Promise((r) => g.once('message', r));
    gens.push(g);
  }
  if (kind === 'analysis') await until(async () => (await ask(sink, 'agents', 'agents')) >= STREAMS * 4, 60000, 'every replayed VM to attach');
  await sleep(500);
  const attached = procStat(sink.pid);
  for (const g of gens) g.send('go');
  await sleep(WARMUP * 1000);
  const c0 = kind === 'peer' ? await ask(sink, 'counts', 'counts') : null;
  const s0 = procStat(sink.pid);
  const g0 = gens.map((g) => procStat(g.pid));
  await Promise.all(gens.map((g) => ask(g, 'mark', 'marked')));
  await sleep(SECONDS * 1000);
  await Promise.all(gens.map((g) => ask(g, 'mark', 'marked')));
  const s1 = procStat(sink.pid);
  const g1 = gens.map((g) => procStat(g.pid));
  const c1 = kind === 'peer' ? await ask(sink, 'counts', 'counts') : null;
  const stats = await Promise.all(gens.map((g) => ask(g, 'stop', 'stats')));
  for (const g of gens) g.disconnect();
  sink.disconnect();
  await Promise.all([sink, ...gens].map((c) => (c.exitCode === null ? new Promise((r) => c.once('exit', r)) : undefined)));
  const per = stats.flatMap((s) => s.per);
  const secs = (s1.t - s0.t) / 1000;
  const sentPerSec = per.reduce((n, p) => n + p.sentRecords / p.sentSeconds, 0);
  const ackedPerSec = per.reduce((n, p) => n + (p.ackSeconds > 0 ? p.ackedRecords / p.ackSeconds : 0), 0);
  const lags = stats.flatMap((s) => s.lags).sort((a, b) => a - b);
  return {
    recordsPerSec: kind === 'peer' ? (c1.events + c1.verdictRecords - c0.events - c0.verdictRecords) / secs : ackedPerSec,
    sentPerSec,
    messagesPerSec: per.reduce((n, p) => n + p.messages / p.sentSeconds, 0),
    cpuPercent: ((s1.cpuS - s0.cpuS) / secs) * 100,
    generatorsCpuPercent: g0.reduce((n, g, i) => n + ((g1[i].cpuS - g.cpuS) / secs) * 100, 0),
    rssMiB: { start: sinkStart.rssMiB, attached: attached.rssMiB, end: s1.rssMiB },
    ackLagMs: kind === 'analysis' ? { p50: pct(lags, 50), p99: pct(lags, 99), n: lags.length } : null,
  };
}

async function main() {
  const dir = mkdtempSync(join(tmpdir(), 'b5s-'));
  const load0 = readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).map(Number);
  progress(`recording a real agent's link traffic (${RECORD_S} s, 4 VMs × 2 vCPUs)`);
  const rec = await record(dir);
  const fixturePath = join(dir, 'recording.json');
  writeFileSync(fixturePath, JSON.stringify(rec.messages.map((b) => b.toString('hex'))));
  const probe = await fixtureFor(rec.messages, 0);
  const steadyRecords = probe.steady.reduce((n, m) => n + m.records, 0);
  if (!probe.steady.length) throw new Error('the recording has no event or verdict batches');
  progress(`recorded ${rec.messages.length} messages (${probe.attach.length} hello/attach, ${probe.steady.length} batches, ${steadyRecords} records) from ${rec.writes} guest CR writes`);
  const perProc = Array.from({ length: PROCS }, () => []);
  for (let s = 0; s < STREAMS; s++) perProc[s % PROCS].push(s);
  progress(`analysis replica: ${STREAMS} streams from ${PROCS} load generators, ${WARMUP} s warm-up + ${SECONDS} s`);
  const analysis = await withDatabase(async (db, label) => ({ ...(await phase('analysis', fixturePath, perProc, db)), db: label }));
  progress('baseline: the same replay into the AnalysisPeer (count mode)');
  const peer = await phase('peer', fixturePath, perProc);
  rmSync(dir, { recursive: true, force: true });
  const load1 = readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).map(Number);
  const k = (n) => `${(n / 1000).toFixed(1)}k`;
  say(`\nB5 streams — ${cpus()[0]?.model ?? 'cpu'} × ${cpus().length}, node ${process.version}; load ${load0.join(' ')} → ${load1.join(' ')}`);
  say(`${STREAMS} agent streams from ${PROCS} load generators replaying a recorded agent (${probe.steady.length} batches, ${(steadyRecords / probe.steady.length).toFixed(0)} records each on average), ${SECONDS} s`);
  say(`   analysis replica (${analysis.db}): ${k(analysis.recordsPerSec)} records/s acknowledged (${k(analysis.sentPerSec)}/s written), CPU ${analysis.cpuPercent.toFixed(0)} %, RSS ${analysis.rssMiB.start.toFixed(0)} → ${analysis.rssMiB.attached.toFixed(0)} (attached) → ${analysis.rssMiB.end.toFixed(0)} MiB; ack lag p50 ${analysis.ackLagMs.p50?.toFixed(0)} ms, p99 ${analysis.ackLagMs.p99?.toFixed(0)} ms`);
  say(`   AnalysisPeer (count mode): ${k(peer.recordsPerSec)} records/s, CPU ${peer.cpuPercent.toFixed(0)} %`);
  console.log(JSON.stringify({ bench: 'analysis-streams', streams: STREAMS, procs: PROCS, seconds: SECONDS, recording: { messages: rec.messages.length, batches: probe.steady.length, records: steadyRecords, guestWrites: rec.writes }, load: { before: load0, after: load1 }, analysis, peer }));
}

if (process.argv.includes('--loadgen')) await loadgenChild();
else if (process.argv.includes('--analysis-child')) await analysisChild();
else if (process.argv.includes('--peer-child')) await peerChild();
else await main();
