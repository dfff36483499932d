#!/usr/bin/env node
// KVMI library benchmarks (run after `tsc -b`; `npm run bench` does both through nx).
//  1. codec: a PF event and its reply, per message — tool side (view decode + in-place reply) and
//     kernel side (reply check) — messages/s and bytes allocated per message; beside them, in the same
//     child, a raw loop over the same frame (Buffer.copy + readUInt*/writeUInt*, no library) as the
//     same-run baseline. B1.codec.kvmi-event* of the suite (bench/run.mjs) are the "view + reply" row.
//  2. ping-pong: event → reply over a Unix socket, tool side in a second process, through the library
//     (framing + session + view + writeEventReply) vs a raw Node socket echo of the same pre-encoded
//     bytes. Reported as p50/p99 round trip and the library/raw ratio.
//
//   node libs/kvmi/bench/run.mjs [--json] [--short] [--codec-only]
// `--json`: the human table goes to stderr and stdout gets one JSON line (read by bench/run.mjs).
// `--short`: 20k timed iterations per codec path instead of 200k, 2000 ping-pong round trips instead of
// 20 000 (KVMI_BENCH_ROUNDS overrides). `--codec-only`: part 1 only.
import { fork, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { cpus, tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import v8 from 'node:v8';
import { microTimer } from '../../../bench/lib/micro.mjs';

const here = dirname(fileURLToPath(import.meta.url));
const lib = await import(join(here, '../dist/index.js'));
const SHORT = process.argv.includes('--short');
const JSON_OUT = process.argv.includes('--json');
const CODEC_ONLY = process.argv.includes('--codec-only');
const say = JSON_OUT ? (...a) => console.error(...a) : (...a) => console.log(...a);
/** Timed iterations per codec path (median of 5 runs of N/5), after 20k warm-up. */
const N = SHORT ? 20_000 : 200_000;
/** Iterations over which allocation is measured (bytes per message = floor(young-generation bytes / A)). */
const A = 5_000;

const arch = lib.structs.kvmi_vcpu_event_arch.zero();
arch.mode = 8;
arch.regs.rip = 0xffffffff81234567n;
arch.sregs.cr0 = 0x80050033n;
arch.sregs.cr4 = 0x3406f0n;
const PF = { gva: 0xffffffff81000000n, gpa: 0x1000000n, access: 2 };
export const pfEvent = (seq) => lib.encodeVcpuEvent({ event: 'PF', seq, vcpu: 1, arch, data: PF });

function codecBench() {
  if (process.argv.includes('--child-codec')) return;
  // Run in a child with a large young generation so no scavenge runs inside the measured loop.
  const r = spawnSync(process.execPath, ['--expose-gc', '--no-concurrent-recompilation', '--min-semi-space-size=128', '--max-semi-space-size=128', fileURLToPath(import.meta.url), '--child-codec', ...(SHORT ? ['--short'] : [])], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(r.stderr);
  return JSON.parse(r.stdout);
}

// Bytes in V8's young generation; with a fixed 128 MiB semi-space no scavenge runs inside the loop.
function newSpaceUsed() {
  return v8.getHeapSpaceStatistics().find((sp) => sp.space_name === 'new_space').space_used_size;
}

function codecChild() {
  const event = pfEvent(7);
  const view = new lib.VcpuEventView();
  const reply = Buffer.alloc(64);
  const pfLayout = lib.structs.kvmi_vcpu_event_pf;
  const state = { isCommandAllowed: () => true, isEventAllowed: () => true, vcpuCount: () => 4, isVcpuReady: () => true, extensionsEnabled: () => true };
  const waiting = { seq: 7, event: lib.events.PF };
  let sink = 0n;
  const tool = () => {
    view.reset(event);
    sink ^= view.specificU64(pfLayout, 'gva') ^ view.reg('rip');
    return lib.writeEventReply(reply, 0, view.seq, view.vcpu, view.eventId, 1);
  };
  const toolNoReads = () => {
    view.reset(event);
    return lib.writeEventReply(reply, 0, view.seq, view.vcpu, view.eventId, 1);
  };
  // Same-run baseline, no library: copy the frame (as a socket read into a buffer would), read the header
  // fields the reply needs (seq, vCPU, event id) with readUInt*, write the same 24-byte RETRY reply with
  // writeUInt* at fixed offsets — no validation. The library path it is compared with is toolSideNoReads.
  const S = lib.structs;
  const H = lib.KVMI_MSG_HDR_SIZE;
  const EVENT_ID_AT = H + S.kvmi_event_hdr.field('event').offset;
  const VCPU_AT = H + S.kvmi_event_hdr.size + S.kvmi_vcpu_event.field('vcpu').offset;
  const R_VCPU = H + S.kvmi_vcpu_hdr.field('vcpu').offset;
  const R_ACTION = H + S.kvmi_vcpu_hdr.size + S.kvmi_vcpu_event_reply.field('action').offset;
  const R_EVENT = H + S.kvmi_vcpu_hdr.size + S.kvmi_vcpu_event_reply.field('event').offset;
  const R_SIZE = S.kvmi_vcpu_hdr.size + S.kvmi_vcpu_event_reply.size;
  const copy = Buffer.alloc(event.length);
  const rawReply = Buffer.alloc(64);
  const rawFrame = () => {
    event.copy(copy, 0);
    rawReply.fill(0, 0, H + R_SIZE);
    rawReply.writeUInt16LE(lib.KVMI_VCPU_EVENT, 0);
    rawReply.writeUInt16LE(R_SIZE, 2);
    rawReply.writeUInt32LE(copy.readUInt32LE(4), 4);
    rawReply.writeUInt16LE(copy.readUInt16LE(VCPU_AT), R_VCPU);
    rawReply[R_ACTION] = lib.EventAction.RETRY;
    rawReply[R_EVENT] = copy.readUInt16LE(EVENT_ID_AT);
    return H + R_SIZE;
  };
  // The baseline does the same work: byte-identical reply.
  const n = toolNoReads();
  if (rawFrame() !== n || !rawReply.subarray(0, n).equals(reply.subarray(0, n))) throw new Error('raw baseline reply differs from writeEventReply');
  const kernel = (n) => {
    const m = lib.receiveKernelMessage(reply.subarray(0, n), state);
    return lib.checkEventReply(m, waiting);
  };
  const objects = () => {
    const e = lib.decodeEvent(event);
    return lib.encodeEventReply(e, 'RETRY');
  };
  // Warm-up, then allocation: a short loop that fits in the young generation, so no scavenge hides
  // garbage. Rounded down: a one-off allocation of less than A bytes in the loop reads 0; any per-message
  // object (≥ 16 B) does not.
  const prepare = (fn) => {
    for (let i = 0; i < 20_000; i++) fn();
    globalThis.gc();
    const h0 = newSpaceUsed();
    for (let i = 0; i < A; i++) fn();
    const h1 = newSpaceUsed();
    return Math.max(0, Math.floor((h1 - h0) / A));
  };
  const timeRun = (fn) => {
    const t0 = process.hrtime.bigint();
    for (let i = 0; i < N / 5; i++) fn();
    return Number(process.hrtime.bigint() - t0) / (N / 5);
  };
  const result = (runs, bytesPerMsg) => {
    const ns = runs.sort((a, b) => a - b)[2];
    return { msgsPerSec: Math.round(1e9 / ns), nsPerMsg: Math.round(ns * 10) / 10, bytesPerMsg };
  };
  // Five runs each, the median kept; a path and its baseline in alternating runs (bench/lib/micro.mjs).
  const { measure, measurePair } = microTimer({ prepare, timeRun, result });
  const [toolSideNoReads, rawFrameResult] = measurePair(toolNoReads, rawFrame);
  const out = {
    toolSideNoReads,
    rawFrame: rawFrameResult,
    toolSide: measure(tool),
    kernelSide: (() => { const n = tool(); return measure(() => kernel(n)); })(),
    objectDecode: measure(objects),
  };
  if (sink === 42n) console.error('');
  process.stdout.write(JSON.stringify({ frameBytes: event.length, iterations: N, allocIterations: A, ...out }));
}

function percentile(sorted, p) {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

async function pingPong(mode, rounds) {
  const dir = mkdtempSync(join(tmpdir(), 'kvb-'));
  const path = join(dir, 's');
  const server = createServer();
  await new Promise((r) => server.listen(path, r));
  const child = fork(fileURLToPath(import.meta.url), ['--child-tool', mode, path], { stdio: 'inherit' });
  const sock = await new Promise((r) => server.once('connection', r));
  sock.setNoDelay?.(true);
  const events = Array.from({ length: 64 }, (_, i) => pfEvent(i + 1));
  const replySize = lib.eventReplyFrameSize(lib.events.PF);
  const samples = new Float64Array(rounds);
  let got = 0;
  let i = 0;
  let t0 = 0n;
  await new Promise((resolve) => {
    const send = () => {
      t0 = process.hrtime.bigint();
      sock.write(events[i % events.length]);
    };
    sock.on('data', (chunk) => {
      got += chunk.length;
      while (got >= replySize) {
        got -= replySize;
        samples[i] = Number(process.hrtime.bigint() - t0) / 1000;
        i++;
        if (i === rounds) return resolve();
        send();
      }
    });
    send();
  });
  sock.destroy();
  child.kill();
  server.close();
  rmSync(dir, { recursive: true, force: true });
  const warm = Array.from(samples.subarray(Math.floor(rounds / 10))).sort((a, b) => a - b);
  return { p50: percentile(warm, 50), p99: percentile(warm, 99), n: warm.length };
}

function toolChild(mode, path) {
  const sock = (await_import_net()).connect(path);
  if (mode === 'raw') {
    const reply = lib.encodeEventReply({ seq: 1, vcpu: 1, event: lib.events.PF }, 'RETRY');
    const size = lib.frameSize(pfEvent(1)) + 8;
    let pending = 0;
    sock.on('data', (chunk) => {
      pending += chunk.length;
      while (pending >= size) {
        pending -= size;
        sock.write(reply);
      }
    });
  } else {
    new lib.KvmiSession(sock, {
      onVcpuEvent: (view, s) => s.replyToEvent(view.seq, view.vcpu, view.eventId, lib.EventAction.RETRY),
    });
  }
}
function await_import_net() {
  return netModule;
}
const netModule = await import('node:net');

if (process.argv.includes('--child-codec')) codecChild();
else if (process.argv.includes('--child-tool')) {
  const i = process.argv.indexOf('--child-tool');
  toolChild(process.argv[i + 1], process.argv[i + 2]);
} else {
  const rounds = Number(process.env.KVMI_BENCH_ROUNDS ?? (SHORT ? 2_000 : 20_000));
  const { frameBytes, iterations, allocIterations, ...codec } = codecBench();
  const lib1 = CODEC_ONLY ? null : await pingPong('library', rounds);
  const raw = CODEC_ONLY ? null : await pingPong('raw', rounds);
  const f = (x) => x.toFixed(1).padStart(7);
  say(`\nKVMI library benchmark — ${cpus()[0]?.model ?? 'cpu'} × ${cpus().length}, node ${process.version}${SHORT ? ' (--short)' : ''}`);
  say(`\n1. PF event (${frameBytes}-byte frame) + reply, per message (median of 5 × ${iterations / 5} after 20k warm-up; bytes over ${allocIterations} messages)`);
  say('   path                                    msgs/s     ns/msg   bytes allocated/msg');
  for (const [name, r] of [['tool side: view + reply (no field reads)', codec.toolSideNoReads], ['raw: copy + readUInt + writeUInt reply', codec.rawFrame], ['tool side: view + 2 u64 reads + reply', codec.toolSide], ['kernel side: receive + check reply', codec.kernelSide], ['objects: decodeEvent + encodeEventReply', codec.objectDecode]]) {
    say(`   ${name.padEnd(40)}${String(r.msgsPerSec).padStart(9)}  ${String(r.nsPerMsg).padStart(8)}   ${String(r.bytesPerMsg).padStart(8)}`);
  }
  say(`   ratio view + reply / raw (ns)          ${(codec.toolSideNoReads.nsPerMsg / codec.rawFrame.nsPerMsg).toFixed(2).padStart(10)}`);
  if (!CODEC_ONLY) {
    say(`\n2. Event → reply ping-pong over a Unix socket, two processes, ${rounds} round trips (first 10% dropped)`);
    say('   tool side                       p50 µs   p99 µs');
    say(`   through the library           ${f(lib1.p50)}  ${f(lib1.p99)}`);
    say(`   raw Node socket echo          ${f(raw.p50)}  ${f(raw.p99)}`);
    say(`   ratio library/raw (p50)       ${(lib1.p50 / raw.p50).toFixed(2).padStart(7)}`);
  }
  console.log(JSON.stringify({ bench: 'kvmi', short: SHORT, frameBytes, iterations, allocIterations, codec, pingPong: CODEC_ONLY ? null : { library: lib1, raw, ratioP50: lib1.p50 / raw.p50 } }));
}
