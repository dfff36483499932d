#!/usr/bin/env node
// The benchmark suite (issue #14): B1–B5, every figure beside its baseline measured in the same run, with
// p50/p99 and the spread over repeated runs; writes bench/results/<YYYY-MM-DD>.json and regenerates the
// table in docs/benchmarks.md. Run after the build (`npm run bench` builds first).
//
//   node bench/run.mjs [--short] [--repeats N] [--only B1,B3] [--out FILE] [--no-docs]
//   node bench/run.mjs --docs FILE     regenerate the docs table from a results file, nothing measured
//
// --short: tiny sizes, one repeat, results to bench/results/short.tmp.json (git-ignored), docs untouched;
// checks that every figure is produced and the file validates against bench/schema.json (exit 1 if not),
// prints the ratios, never fails on timing.
//
// Each step runs an existing per-project bench script as a child process with `--json` (one JSON line on
// stdout) — libs/host-agent/bench/{run,link,throughput}.mjs, libs/kvmi/bench/run.mjs,
// libs/verdicts/bench/run.mjs, libs/analysis/bench/{run,memory}.mjs, libs/guest-agent/bench/run.mjs — or
// this folder's streams.mjs and c/pingpong.c (built here with `cc`).
import { execFileSync, spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import { FORMAT, buildFigures, cpuTimes, evaluateTargets, loadavg, machine, renderTable, replaceTable, stealPercent } from './lib/results.mjs';
import { validate } from './lib/schema.mjs';

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, '..');
const argv = process.argv.slice(2);
const flag = (name) => argv.includes(`--${name}`);
const opt = (name, def) => (argv.includes(`--${name}`) ? argv[argv.indexOf(`--${name}`) + 1] : def);

const USAGE = `usage: node bench/run.mjs [--short] [--repeats N] [--only B1,B2,...] [--out FILE] [--no-docs]
       node bench/run.mjs --docs FILE`;
if (flag('help') || flag('h')) {
  console.log(USAGE);
  process.exit(0);
}
const KNOWN_FLAGS = new Set(['--short', '--repeats', '--only', '--out', '--no-docs', '--docs']);
for (let i = 0; i < argv.length; i++) {
  if (!KNOWN_FLAGS.has(argv[i])) {
    console.error(`bench: unknown argument '${argv[i]}'\n${USAGE}`);
    process.exit(2);
  }
  if (['--repeats', '--only', '--out', '--docs'].includes(argv[i])) i++;
}

const SHORT = flag('short');
const REPEATS = Number(opt('repeats', SHORT ? 1 : 3));
const ONLY = new Set(opt('only', 'B1,B2,B3,B4,B5').split(',').map((s) => s.trim().toUpperCase()));
if (!Number.isInteger(REPEATS) || REPEATS < 1) {
  console.error(`bench: --repeats must be a positive integer\n${USAGE}`);
  process.exit(2);
}
for (const g of ONLY) {
  if (!/^B[1-5]$/.test(g)) {
    console.error(`bench: --only takes B1..B5, got '${g}'\n${USAGE}`);
    process.exit(2);
  }
}
const schema = JSON.parse(readFileSync(join(here, 'schema.json'), 'utf8'));
const docsPath = join(root, 'docs/benchmarks.md');
const progress = (m) => process.stderr.write(`[bench] ${m}\n`);

// ---- sizes ---------------------------------------------------------------------------------------------
const SIZES = SHORT
  ? { codecRuns: '5 × 4k', verdictRuns: '5 × 10k', crRounds: 300, crVms: 4, cRounds: 2000, linkRounds: 200, link: { seconds: 2, warmup: 1 }, tput: { vms: 8, vcpus: 4, warmup: 1, seconds: 1 }, ingest: { agents: 2, seconds: 1, detections: 20 }, memMiB: 4, guestMiB: 4, idleVms: 32, idleCpuS: 1, streams: { streams: 8, procs: 2, seconds: 2, warmup: 1, record: 1 } }
  : { codecRuns: '5 × 40k', verdictRuns: '5 × 100k', crRounds: 3000, crVms: 64, cRounds: 20000, linkRounds: 2000, link: { seconds: 10, warmup: 2 }, tput: { vms: 64, vcpus: 4, warmup: 2, seconds: 10 }, ingest: { agents: 4, seconds: 5, detections: 200 }, memMiB: 64, guestMiB: 64, idleVms: 1024, idleCpuS: 5, streams: { streams: 100, procs: 4, seconds: 10, warmup: 2, record: 2 } };

// ---- figure definitions (the method text goes into the results file and, shortened, into the docs) -----
const FIGURES = [
  { id: 'B1.cr-deny.agent', group: 'B1', title: 'local verdict: CR4.SMEP-clear denied by the host agent, vCPU stall', unit: 'µs', better: 'lower', against: ['B1.cr-deny.raw-responder', 'B1.c-pingpong'],
    method: `Simulator guest action SimVcpu.writeCr (event written → reply processed → instruction completed) on VM 0 of ${SIZES.crVms} attached VMs; the agent as its own process (bin/periscope host-agent), 120 generated rules + shipped defaults, metrics and local API on; ${SIZES.crRounds} rounds, first 10% dropped (libs/host-agent/bench/run.mjs --phases cr,pf).` },
  { id: 'B1.cr-deny.raw-responder', group: 'B1', title: 'same harness, raw responder (pre-encoded reply, seq and new_val patched)', unit: 'µs', better: 'lower', against: ['B1.c-pingpong'],
    method: 'The same simulator harness against a Node process that enables CR4 interception and answers each CR event with a pre-encoded reply (nothing decoded).' },
  { id: 'B1.c-pingpong', group: 'B1', title: 'physical limit: C ping-pong of the same CR event / reply bytes', unit: 'µs', better: 'lower',
    method: `bench/c/pingpong.c built with the system cc -O2: two processes on a Unix socket pair; the CR event frame (8 + 552 + 24 bytes) and the 32-byte reply encoded by @periscope/kvmi; seq and new_val patched; ${SIZES.cRounds} round trips, first 10% dropped.` },
  { id: 'B1.pf-skip.agent', group: 'B1', title: 'local verdict: PF write to a protected page skipped (4 KVMI round trips)', unit: 'µs', better: 'lower', against: ['B1.cr-deny.raw-responder'],
    method: 'In-process agent library (KvmiListener) with a write-protected page; the simulator runs real guest code (mov [rdi], rax; hlt) in a loop; each write is skipped (TRANSLATE_GVA, READ_PHYSICAL, SET_REGISTERS, RETRY reply); time per write.' },
  { id: 'B1.codec.kvmi-event', group: 'B1', title: 'KVMI codec, per message: PF event checked and read in place (VcpuEventView) + RETRY reply written in place', unit: 'ns', better: 'lower', against: ['B1.codec.kvmi-raw'],
    method: `libs/kvmi/bench/run.mjs --codec-only: one 584-byte KVMI_VCPU_EVENT_PF frame; VcpuEventView.reset (frame id, size, event id, common size checked; seq, vCPU, event id read) + writeEventReply into a reused buffer; median of ${SIZES.codecRuns} iterations after 20k warm-up, in a child with --no-concurrent-recompilation and a fixed 128 MiB semi-space.` },
  { id: 'B1.codec.kvmi-event-alloc', group: 'B1', title: 'KVMI codec: bytes allocated per message on the same path (the hot path must allocate nothing)', unit: 'B/msg', better: 'lower',
    method: 'The same child: V8 new-space bytes used across 5 000 iterations after warm-up and a full GC (no scavenge can run inside: fixed 128 MiB semi-space), divided by 5 000, rounded down. Gated by value: any rise from 0 fails bench:check.' },
  { id: 'B1.codec.kvmi-raw', group: 'B1', title: 'reference: the same frame with plain Buffer calls (copy, readUInt* of seq / vCPU / event id, the same 24-byte reply with writeUInt*)', unit: 'ns', better: 'lower',
    method: 'The same child, no library and no validation: Buffer.copy of the frame into a reused buffer, the header fields read at fixed offsets, the reply written field by field (checked byte-identical to writeEventReply\'s); timed in runs alternating with B1.codec.kvmi-event\'s.' },
  { id: 'B1.codec.verdict', group: 'B1', title: 'local verdict evaluation per event: view.reset + Evaluator.evaluate, 127-rule policy (mean of 4 CR / PF events)', unit: 'ns', better: 'lower', against: ['B1.codec.verdict-raw'],
    method: `libs/verdicts/bench/run.mjs: generatePolicy (120 seeded filler rules in front of the shipped default policy, 22 of them on CR or PF); CR4 SMEP clear → deny, CR0 benign → default allow, PF write to kernel text → skip, PF read → default allow; per event the median of ${SIZES.verdictRuns} iterations after 20k warm-up, then the mean over the four; a child with --no-concurrent-recompilation and a fixed 128 MiB semi-space.` },
  { id: 'B1.codec.verdict-alloc', group: 'B1', title: 'local verdict: bytes allocated per evaluation (largest of the 4 events; the evaluation must allocate nothing)', unit: 'B/msg', better: 'lower',
    method: 'The same child: V8 new-space bytes across 5 000 evaluations after warm-up and a full GC, divided by 5 000, rounded down; the largest of the four events. Gated by value: any rise from 0 fails bench:check.' },
  { id: 'B1.codec.verdict-raw', group: 'B1', title: 'reference: the same four decisions hand-coded (the rule\'s fields read with readUInt*, compared with constants)', unit: 'ns', better: 'lower',
    method: 'The same child: the two shipped rules these events hit (cr4-smep-smap-clear, kernel-text-write) written out for one frame layout, no rule walk; checked to decide as the evaluator does; timed in runs alternating with the evaluator\'s on the same event; mean of the four events.' },
  { id: 'B2.ask-central', group: 'B2', title: 'ask-central: CR4.PGE toggle held, verdict from analysis, vCPU stall (KVM side in C)', unit: 'µs', better: 'lower', against: ['B2.grpc-pingpong'],
    method: `Agent process with --analysis to an AnalysisPeer process answering every HELD event with CONTINUE at once; KVM + QEMU played by the C replay generator (libs/host-agent/bench/replay.c) replaying the simulator's own recorded CR4.PGE event for 1 VM × 1 vCPU with one event in flight, as KVM does; each event timed event written → reply read (CLOCK_MONOTONIC, 1 µs histogram); ${SIZES.link.warmup} s warm-up + ${SIZES.link.seconds} s (libs/host-agent/bench/link.mjs).` },
  { id: 'B2.ask-central.simulator', group: 'B2', title: 'the same through the JavaScript simulator (SimVcpu.writeCr)', unit: 'µs', better: 'lower', against: ['B2.grpc-pingpong'],
    method: `The same agent and peer; the simulator's guest action timed (event written → reply processed → instruction completed); ${SIZES.linkRounds} rounds, first 10% dropped. Includes the simulator's own event loop and garbage collector.` },
  { id: 'B2.grpc-pingpong', group: 'B2', title: 'raw grpc-js bidi ping-pong to the same peer (pre-encoded HELD EventBatch up, verdict back)', unit: 'µs', better: 'lower',
    method: `From the bench process to the same AnalysisPeer: the gRPC round trip without the agent and KVMI; ${SIZES.linkRounds} rounds, first 10% dropped.` },
  { id: 'B2.local-deny', group: 'B2', title: 'reference: CR4.SMEP clear denied locally by the same agent (KVM side in C)', unit: 'µs', better: 'lower',
    method: 'The same generator replaying the recorded SMEP-clear event, denied by a local rule of the same agent process in the same run.' },
  { id: 'B3.agent-throughput', group: 'B3', title: 'events/s through one host agent (256 vCPU streams, local verdicts, reporting on)', unit: 'events/s', better: 'higher', against: ['B3.raw-echo'],
    method: `C replay generator (libs/host-agent/bench/replay.c) replaying a recorded attach and two recorded CR4 events: ${SIZES.tput.vms} VMs × ${SIZES.tput.vcpus} vCPUs, one event in flight per vCPU, half reported to an AnalysisPeer process (count mode); ${SIZES.tput.warmup} s warm-up + ${SIZES.tput.seconds} s (libs/host-agent/bench/throughput.mjs).` },
  { id: 'B3.raw-echo', group: 'B3', title: 'raw socket pipelined throughput: the same generator against a C echo responder', unit: 'events/s', better: 'higher',
    method: 'The same generator and streams against replay.c echo (recorded reply, seq/vcpu/new_val patched, nothing decoded).' },
  { id: 'B3.analysis-ingest', group: 'B3', title: 'analysis ingest per replica (events/s from agent streams)', unit: 'events/s', better: 'higher', against: ['B3.grpc-sink'],
    method: `${SIZES.ingest.agents} scripted agents × 8 VMs on real gRPC, EventBatch of 512 events (CR/MSR/PF with registers) as fast as the streams accept, ${SIZES.ingest.seconds} s after 1 s warm-up; the service's own events counter (libs/analysis/bench/run.mjs --baseline).` },
  { id: 'B3.grpc-sink', group: 'B3', title: 'the same agents into a raw grpc-js sink (counts messages)', unit: 'events/s', better: 'higher',
    method: 'The same clients and batches into a grpc-js server whose Link method has an identity deserializer and counts messages.' },
  { id: 'B4.v2-cold', group: 'B4', title: `memory: hash ${SIZES.memMiB} MiB through analysis → guest agent, ABI v2, cold (tokens + map + hash)`, unit: 'MiB/s', better: 'higher', against: ['B4.read', 'B4.memcpy'],
    method: `SHA-256 of every 4 KiB page of ${SIZES.memMiB} MiB: analysis (PGlite in memory) → guest agent on the simulated /dev/kvmmem; every GET_MAP_TOKEN relayed through the host agent; digests compared page by page with the read path (libs/analysis/bench/memory.mjs).` },
  { id: 'B4.v2-warm', group: 'B4', title: 'memory: the same, warm (mapped: hash only)', unit: 'MiB/s', better: 'higher', against: ['B4.read', 'B4.memcpy', 'B4.sha256'],
    method: 'HashMemory again over the mapped range.' },
  { id: 'B4.read', group: 'B4', title: 'memory: VM_READ_PHYSICAL through analysis → host agent, 4 KiB per command', unit: 'MiB/s', better: 'higher',
    method: 'ReadPhysicalAccess, 64 commands in flight, each command recorded in the database as in production, hashed in analysis.' },
  { id: 'B4.memcpy', group: 'B4', title: 'reference: plain memory copy of the same size (Buffer.copy)', unit: 'MiB/s', better: 'higher',
    method: 'Buffer.copy of the same number of bytes in one process, median of 3; no I/O.' },
  { id: 'B4.sha256', group: 'B4', title: 'reference: SHA-256 page by page in one process, no I/O', unit: 'MiB/s', better: 'higher',
    method: 'createHash per 4 KiB page of an in-memory buffer, median of 3.' },
  { id: 'B4.direct.v2-cold', group: 'B4', title: 'memory, no analysis hop: hub + guest agent direct, ABI v2 cold', unit: 'MiB/s', better: 'higher', against: ['B4.direct.read'],
    method: `libs/guest-agent/bench/run.mjs: GuestMemoryHub and GuestAgent in the bench process, the simulator in a child; ${SIZES.guestMiB} MiB; tokens from the VM's KVMI socket directly.` },
  { id: 'B4.direct.v2-warm', group: 'B4', title: 'memory, no analysis hop: ABI v2 warm', unit: 'MiB/s', better: 'higher', against: ['B4.direct.read'], method: 'As above, hash only.' },
  { id: 'B4.direct.read', group: 'B4', title: 'memory, no analysis hop: VM_READ_PHYSICAL, 128 in flight', unit: 'MiB/s', better: 'higher', method: 'KVMI VM_READ_PHYSICAL from the bench process straight to the simulator.' },
  { id: 'B5.agent-rss', group: 'B5', title: `scale: host agent RSS with ${SIZES.idleVms} idle VMs attached`, unit: 'MiB', better: 'lower', against: ['B5.agent-rss-start'],
    method: `VmRSS of the agent process once ${SIZES.idleVms} simulated VMs (1 vCPU, 32 MiB each) are all protected (libs/host-agent/bench/run.mjs --phases idle).` },
  { id: 'B5.agent-rss-start', group: 'B5', title: 'scale: host agent RSS at start, no VM', unit: 'MiB', better: 'lower', method: 'VmRSS 0.5 s after the agent started.' },
  { id: 'B5.attach', group: 'B5', title: `scale: time to attach ${SIZES.idleVms} VMs (simulator start → all protected)`, unit: 's', better: 'lower', method: "Simulator start until the agent's local API lists every VM protected (polled every 20 ms)." },
  { id: 'B5.idle-cpu', group: 'B5', title: `scale: agent CPU with ${SIZES.idleVms} idle VMs`, unit: '% of a core', better: 'lower', method: `utime+stime of the agent over ${SIZES.idleCpuS} s with every VM attached and idle.` },
  { id: 'B5.streams.analysis', group: 'B5', title: `scale: ${SIZES.streams.streams} agent streams into one analysis replica (recorded agent traffic)`, unit: 'records/s', better: 'higher', against: ['B5.streams.peer'],
    method: `A real agent's LinkRequest stream recorded at run time, replayed by ${SIZES.streams.procs} load-generator processes (real grpc-js clients, own host id and VM uuids per stream) as fast as flow control allows; records the replica acknowledged (Keepalive.acked_stream_seq) per second; analysis on PostgreSQL (PGlite if none) in its own process (bench/streams.mjs).` },
  { id: 'B5.streams.peer', group: 'B5', title: 'the same replay into the AnalysisPeer (count mode: records counted from tags)', unit: 'records/s', better: 'higher', method: 'Same generators and bytes; the transport ceiling.' },
  { id: 'B5.streams.analysis-cpu', group: 'B5', title: 'scale: analysis replica CPU during the streams run', unit: '% of a core', better: 'lower', method: 'utime+stime of the analysis process over the measured window.' },
  { id: 'B5.streams.analysis-rss', group: 'B5', title: 'scale: analysis replica RSS at the end of the streams run', unit: 'MiB', better: 'lower', method: 'VmRSS of the analysis process.' },
  { id: 'B5.streams.ack-lag', group: 'B5', title: 'scale: per-message lag, written → acknowledged by the replica (upper bound: acks every 250 ms)', unit: 'ms', better: 'lower', method: 'Keepalive acknowledgements are cumulative and sent every 250 ms, so this bounds the per-message latency from above.' },
];

const TARGETS = [
  { id: 'B1-p50', text: 'B1 p50 ≤ 1.3× the raw responder', figure: 'B1.cr-deny.agent', stat: 'p50', of: 'ratio', against: 'B1.cr-deny.raw-responder', op: '<=', limit: 1.3 },
  { id: 'B1-p99', text: 'B1 p99 ≤ 2× the raw responder', figure: 'B1.cr-deny.agent', stat: 'p99', of: 'ratio', against: 'B1.cr-deny.raw-responder', op: '<=', limit: 2 },
  { id: 'B2-p99', text: 'B2 ask-central p99 ≤ 1 ms', figure: 'B2.ask-central', stat: 'p99', of: 'value', op: '<=', limit: 1000 },
  { id: 'B3-agent', text: 'B3 ≥ 100k events/s per agent', figure: 'B3.agent-throughput', stat: 'value', of: 'value', op: '>=', limit: 100000 },
  { id: 'B4-cold', text: 'B4 v2 cold ≥ 10× the read path', figure: 'B4.v2-cold', stat: 'value', of: 'ratio', against: 'B4.read', op: '>=', limit: 10 },
  { id: 'B4-warm', text: 'B4 v2 warm ≥ 10× the read path', figure: 'B4.v2-warm', stat: 'value', of: 'ratio', against: 'B4.read', op: '>=', limit: 10 },
  { id: 'B5-rss', text: `B5 agent RSS ≤ 512 MiB with ${SIZES.idleVms} VMs`, figure: 'B5.agent-rss', stat: 'value', of: 'value', op: '<=', limit: 512 },
];

// ---- running a step --------------------------------------------------------------------------------------
const children = new Set();
process.on('exit', () => {
  for (const c of children) c.kill('SIGKILL');
});
for (const sig of ['SIGINT', 'SIGTERM']) process.on(sig, () => process.exit(130));

/** Runs a bench script (node) or binary, returns the last JSON line of its stdout; stderr passes through. */
function runStep(label, cmd, args, env = {}, cwd = root) {
  const shown = (p) => (p.startsWith(root) ? relative(root, p) : p === process.execPath ? 'node' : p);
  progress(`${label}: ${shown(cmd)} ${args.map(shown).join(' ')}`);
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { cwd, env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'inherit'] });
    children.add(child);
    let out = '';
    child.stdout.on('data', (c) => (out += c));
    child.on('error', reject);
    child.on('exit', (code, signal) => {
      children.delete(child);
      const line = out.trim().split('\n').reverse().find((l) => l.startsWith('{'));
      if (code !== 0 || !line) return reject(new Error(`${label}: exited ${code ?? signal}${line ? '' : ' without a JSON result'}`));
      resolve(JSON.parse(line));
    });
  });
}
const nodeStep = (label, script, args = [], env = {}) => runStep(label, process.execPath, [join(root, script), '--json', ...args], env, dirname(join(root, script)));

async function postgresAnswers() {
  try {
    const { default: pg } = await import('pg');
    const c = new pg.Client({ connectionString: process.env.PERISCOPE_TEST_POSTGRES || 'postgres://postgres@127.0.0.1:5432/postgres', connectionTimeoutMillis: 2000 });
    await c.connect();
    await c.end();
    return true;
  } catch {
    return false;
  }
}

/** The C ping-pong, built into a temporary directory; frames from the kvmi encoders. */
async function buildPingPong(dir) {
  const kvmi = await import(join(root, 'libs/kvmi/dist/index.js'));
  const arch = kvmi.structs.kvmi_vcpu_event_arch.zero();
  arch.mode = 8;
  arch.regs.rip = 0xffffffff81000220n;
  arch.sregs.cr4 = 0x3406f0n;
  const event = kvmi.encodeVcpuEvent({ event: 'CR', seq: 1, vcpu: 0, arch, data: { cr: 4, old_value: 0x3406f0n, new_value: 0x2406f0n } });
  const reply = kvmi.encodeEventReply({ seq: 1, vcpu: 0, event: kvmi.events.CR }, 'CONTINUE', { new_val: 0n });
  writeFileSync(join(dir, 'event.bin'), event);
  writeFileSync(join(dir, 'reply.bin'), reply);
  const bin = join(dir, 'pingpong');
  execFileSync('cc', ['-std=c11', '-O2', '-Wall', '-Wextra', '-Werror', '-o', bin, join(here, 'c/pingpong.c')], { stdio: 'inherit' });
  return { bin, event: join(dir, 'event.bin'), reply: join(dir, 'reply.bin'), eventBytes: event.length, replyBytes: reply.length };
}

// ---- one repeat of the suite --------------------------------------------------------------------------
async function repeat(samples, pp, usePostgres) {
  // Each figure records the hypervisor's steal during the step that measured it (extra.stealPercent).
  let steal = 0;
  const put = (id, stats, load, extra) => (samples[id] ??= []).push({ stats, load, extra: { ...extra, stealPercent: steal } });
  const pq = (x) => ({ p50: x.p50, p99: x.p99 });
  const step = async (fn) => {
    const l0 = loadavg()[0];
    const c0 = cpuTimes();
    const r = await fn();
    steal = stealPercent(c0, cpuTimes());
    return { r, load: [l0, loadavg()[0]] };
  };
  if (ONLY.has('B1')) {
    const { r, load } = await step(() => nodeStep('B1', 'libs/host-agent/bench/run.mjs', ['--phases', 'cr,pf'], { AGENT_BENCH_ROUNDS: String(SIZES.crRounds), AGENT_BENCH_VMS: String(SIZES.crVms) }));
    put('B1.cr-deny.agent', pq(r.stall.agent), load, { rules: r.rules, vms: r.vms });
    put('B1.cr-deny.raw-responder', pq(r.stall.raw), load);
    put('B1.pf-skip.agent', pq(r.pfSkip), load, { kvmiRoundTripsPerVerdict: r.pfSkip.roundTrips });
    const c = await step(() => runStep('B1 C ping-pong', pp.bin, [pp.event, pp.reply, String(SIZES.cRounds)]));
    put('B1.c-pingpong', pq(c.r), c.load, { eventBytes: pp.eventBytes, replyBytes: pp.replyBytes });
    const k = await step(() => nodeStep('B1 KVMI codec', 'libs/kvmi/bench/run.mjs', ['--codec-only', ...(SHORT ? ['--short'] : [])]));
    const kc = k.r.codec;
    put('B1.codec.kvmi-event', { value: kc.toolSideNoReads.nsPerMsg }, k.load, { msgsPerSec: kc.toolSideNoReads.msgsPerSec, frameBytes: k.r.frameBytes, withU64ReadsNs: kc.toolSide.nsPerMsg, withU64ReadsBytesPerMsg: kc.toolSide.bytesPerMsg, kernelSideNs: kc.kernelSide.nsPerMsg, kernelSideBytesPerMsg: kc.kernelSide.bytesPerMsg, objectDecodeNs: kc.objectDecode.nsPerMsg, objectDecodeBytesPerMsg: kc.objectDecode.bytesPerMsg });
    put('B1.codec.kvmi-event-alloc', { value: kc.toolSideNoReads.bytesPerMsg }, k.load, { allocIterations: k.r.allocIterations });
    put('B1.codec.kvmi-raw', { value: kc.rawFrame.nsPerMsg }, k.load, { bytesPerMsg: kc.rawFrame.bytesPerMsg });
    const v = await step(() => nodeStep('B1 verdict evaluation', 'libs/verdicts/bench/run.mjs', SHORT ? ['--short'] : []));
    const vm = v.r.mixed;
    const worst = Math.max(...v.r.rows.map((x) => x.verdictOnly.ns));
    put('B1.codec.verdict', { value: vm.verdictNs }, v.load, { rules: vm.rules, events: vm.events, withReplyNs: vm.withReplyNs, viewResetNs: vm.viewResetNs, ...(SHORT ? {} : { worstCasePolicyNs: worst }) });
    put('B1.codec.verdict-alloc', { value: vm.verdictBytes }, v.load, { withReplyBytesPerMsg: vm.withReplyBytes, allPoliciesBytesPerMsg: Math.max(...v.r.rows.map((x) => x.verdictOnly.bytes)) });
    put('B1.codec.verdict-raw', { value: vm.rawNs }, v.load);
  }
  if (ONLY.has('B2')) {
    const { r, load } = await step(() => nodeStep('B2', 'libs/host-agent/bench/link.mjs', [], { AGENT_LINK_BENCH_ROUNDS: String(SIZES.linkRounds), AGENT_LINK_BENCH_SECONDS: String(SIZES.link.seconds), AGENT_LINK_BENCH_WARMUP: String(SIZES.link.warmup) }));
    put('B2.ask-central', pq(r.askCentral), load, { maxUs: r.askCentral.max, events: r.askCentral.n, over1ms: r.askCentral.over1ms, over5ms: r.askCentral.over5ms, heldPerSec: Math.round(r.askCentral.eventsPerSec), agentCpuPercent: r.askCentral.cpu.agent, peerCpuPercent: r.askCentral.cpu.peer, deadlinesMissed: r.deadlinesMissed, windowStealPercent: r.askCentral.stealPercent });
    put('B2.ask-central.simulator', pq(r.askCentralSimulator), load, { maxUs: r.askCentralSimulator.max, maxReplyWaitMs: r.maxReplyWaitMs });
    put('B2.grpc-pingpong', pq(r.rawPingPong), load, { maxUs: r.rawPingPong.max });
    put('B2.local-deny', pq(r.localDeny), load, { maxUs: r.localDeny.max, events: r.localDeny.n, over1ms: r.localDeny.over1ms, over5ms: r.localDeny.over5ms });
  }
  if (ONLY.has('B3')) {
    const t = SIZES.tput;
    const { r, load } = await step(() => nodeStep('B3 throughput', 'libs/host-agent/bench/throughput.mjs', [], { AGENT_TPUT_VMS: String(t.vms), AGENT_TPUT_VCPUS: String(t.vcpus), AGENT_TPUT_SECONDS: String(t.seconds), AGENT_TPUT_WARMUP_SECONDS: String(t.warmup) }));
    if (r.agent.bad || r.raw.bad) throw new Error(`B3: ${r.agent.bad + r.raw.bad} bad replies`);
    put('B3.agent-throughput', { value: r.agent.eventsPerSec }, load, { rttP50Us: r.agent.rttUs.p50, rttP99Us: r.agent.rttUs.p99, agentCpuPercent: r.agent.cpu.agent, generatorCpuPercent: r.agent.cpu.generator, peerCpuPercent: r.agent.cpu.peer, reportedPerSec: r.agent.reportedPerSec, reportsDropped: r.agent.dropped, streams: r.vms * r.vcpus });
    put('B3.raw-echo', { value: r.raw.eventsPerSec }, load, { responderCpuPercent: r.raw.cpu.responder, generatorCpuPercent: r.raw.cpu.generator });
    const i = SIZES.ingest;
    const a = await step(() => nodeStep('B3 analysis ingest', 'libs/analysis/bench/run.mjs', ['--baseline', '--only', usePostgres ? 'postgres' : 'pglite', '--agents', String(i.agents), '--seconds', String(i.seconds), '--detections', String(i.detections)]));
    const res = a.r.results[0];
    if (!res) throw new Error('B3 analysis ingest: no result');
    put('B3.analysis-ingest', { value: res.eventsPerSec }, a.load, { store: res.label, detectionsPerSec: res.detectionsPerSec });
    put('B3.grpc-sink', { value: a.r.raw.eventsPerSec }, a.load);
  }
  if (ONLY.has('B4')) {
    const { r, load } = await step(() => nodeStep('B4 through analysis', 'libs/analysis/bench/memory.mjs', [], { MEM_BENCH_MIB: String(SIZES.memMiB), MEM_BENCH_V1: '0' }));
    const mibs = (s) => ({ value: r.mib / s });
    put('B4.v2-cold', mibs(r.seconds.v2cold), load, { seconds: r.seconds.v2cold });
    put('B4.v2-warm', mibs(r.seconds.v2warm), load, { seconds: r.seconds.v2warm });
    put('B4.read', mibs(r.seconds.read), load, { seconds: r.seconds.read });
    put('B4.memcpy', mibs(r.seconds.memcpy), load);
    put('B4.sha256', mibs(r.seconds.sha256), load);
    const g = await step(() => nodeStep('B4 direct', 'libs/guest-agent/bench/run.mjs', [], { GUEST_BENCH_MIB: String(SIZES.guestMiB), GUEST_BENCH_ROUNDS: '1', GUEST_BENCH_V1: '0' }));
    const gm = (s) => ({ value: g.r.mib / s });
    put('B4.direct.v2-cold', gm(g.r.seconds.v2cold), g.load, { tokens: g.r.tokens.v2 });
    put('B4.direct.v2-warm', gm(g.r.seconds.v2warm), g.load);
    put('B4.direct.read', gm(g.r.seconds.read), g.load);
  }
  if (ONLY.has('B5')) {
    const { r, load } = await step(() => nodeStep('B5 1024 VMs', 'libs/host-agent/bench/run.mjs', ['--phases', 'idle'], { AGENT_BENCH_IDLE_VMS: String(SIZES.idleVms), AGENT_BENCH_IDLE_CPU_SECONDS: String(SIZES.idleCpuS) }));
    put('B5.agent-rss', { value: r.rssMiB.attached }, load, { vms: r.rssMiB.idleVms });
    put('B5.agent-rss-start', { value: r.rssMiB.start }, load);
    put('B5.attach', { value: r.rssMiB.attachSeconds }, load);
    put('B5.idle-cpu', { value: r.rssMiB.idleCpuPercent }, load);
    const s = SIZES.streams;
    const st = await step(() => nodeStep('B5 streams', 'bench/streams.mjs', ['--streams', String(s.streams), '--procs', String(s.procs), '--seconds', String(s.seconds), '--warmup', String(s.warmup), '--record-seconds', String(s.record)]));
    const an = st.r.analysis;
    put('B5.streams.analysis', { value: an.recordsPerSec }, st.load, { streams: st.r.streams, generators: st.r.procs, store: an.db, writtenPerSec: an.sentPerSec, generatorsCpuPercent: an.generatorsCpuPercent, recordedBatches: st.r.recording.batches, recordedRecords: st.r.recording.records });
    put('B5.streams.peer', { value: st.r.peer.recordsPerSec }, st.load, { peerCpuPercent: st.r.peer.cpuPercent });
    put('B5.streams.analysis-cpu', { value: an.cpuPercent }, st.load);
    put('B5.streams.analysis-rss', { value: an.rssMiB.end }, st.load, { rssAtStartMiB: an.rssMiB.start, rssAttachedMiB: an.rssMiB.attached });
    put('B5.streams.ack-lag', { p50: an.ackLagMs.p50, p99: an.ackLagMs.p99 }, st.load, { acks: an.ackLagMs.n });
  }
}

// ---- main ---------------------------------------------------------------------------------------------
function writeDocs(results, file) {
  const doc = readFileSync(docsPath, 'utf8');
  writeFileSync(docsPath, replaceTable(doc, renderTable(results, relative(root, file))));
  progress(`docs/benchmarks.md: table regenerated from ${relative(root, file)}`);
}

function printRatios(results) {
  console.log(`\nPeriscope benchmark suite${results.short ? ' (--short: sizes too small for the figures to mean anything; ratios printed, never gated)' : ''}`);
  console.log(`${results.machine.cpuModel} × ${results.machine.cores}, Node ${results.machine.node}, load ${results.machine.loadBefore.join(' ')} → ${results.machine.loadAfter.join(' ')}, ${results.repeats} repeat(s)\n`);
  for (const f of results.figures) {
    const main = f.stats.p50 ?? f.stats.value;
    const p99 = f.stats.p99 ? ` p99 ${f.stats.p99.median.toFixed(1)}` : '';
    const ratios = f.compare.map((c) => ` ${(c.ratio.p50 ?? c.ratio.value).median.toFixed(2)}× ${c.against}${c.ratio.p99 ? ` (p99 ${c.ratio.p99.median.toFixed(2)}×)` : ''}`).join(';');
    console.log(`  ${f.id.padEnd(28)} ${main.median.toFixed(1).padStart(12)}${p99} ${f.unit}${ratios ? '  →' + ratios : ''}`);
  }
  console.log('');
  for (const t of results.targets) console.log(`  target ${t.text}: ${t.of === 'ratio' ? `${t.measured.toFixed(2)}×` : t.measured.toFixed(1)} — ${t.met ? 'met' : 'NOT met'} (${t.metInRuns}/${results.repeats} repeats)`);
}

async function main() {
  if (argv.includes('--docs')) {
    const file = opt('docs');
    const results = JSON.parse(readFileSync(file, 'utf8'));
    const errors = validate(schema, results);
    if (errors.length) {
      console.error(`bench: ${file} does not match bench/schema.json:\n  ${errors.join('\n  ')}`);
      process.exit(1);
    }
    writeDocs(results, file);
    return;
  }
  const startedAt = new Date();
  const m = machine(root);
  const loadBefore = loadavg();
  const cpuBefore = cpuTimes();
  progress(`${SHORT ? 'short run' : 'full run'}: ${REPEATS} repeat(s) of ${[...ONLY].join(', ')}; ${m.cpuModel} × ${m.cores}, load ${loadBefore.join(' ')}`);
  const tmp = mkdtempSync(join(tmpdir(), 'periscope-bench-'));
  const samples = {};
  try {
    const pp = ONLY.has('B1') ? await buildPingPong(tmp) : null;
    const usePostgres = ONLY.has('B3') ? await postgresAnswers() : false;
    for (let i = 0; i < REPEATS; i++) {
      progress(`repeat ${i + 1}/${REPEATS}`);
      await repeat(samples, pp, usePostgres);
    }
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
  const figures = buildFigures(FIGURES, samples);
  const date = startedAt.toISOString().slice(0, 10);
  const results = {
    format: FORMAT,
    date,
    startedAt: startedAt.toISOString(),
    short: SHORT,
    repeats: REPEATS,
    durationSeconds: Math.round((Date.now() - startedAt.getTime()) / 1000),
    machine: { ...m, loadBefore, loadAfter: loadavg(), stealPercent: stealPercent(cpuBefore, cpuTimes()) },
    figures,
    targets: evaluateTargets(TARGETS, figures),
  };
  const errors = validate(schema, results);
  const expected = FIGURES.filter((f) => ONLY.has(f.group)).map((f) => f.id);
  const missing = expected.filter((id) => !figures.some((f) => f.id === id));
  const out = opt('out', join(here, 'results', SHORT ? 'short.tmp.json' : `${date}.json`));
  mkdirSync(dirname(out), { recursive: true });
  writeFileSync(out, `${JSON.stringify(results, null, 2)}\n`);
  printRatios(results);
  progress(`results: ${relative(root, out)}`);
  if (errors.length || missing.length) {
    console.error(`bench: the results are incomplete or invalid:${missing.map((id) => `\n  figure ${id} was not produced`).join('')}${errors.map((e) => `\n  schema: ${e}`).join('')}`);
    process.exit(1);
  }
  if (!SHORT && !flag('no-docs') && ONLY.size === 5) writeDocs(results, out);
}

await main();
