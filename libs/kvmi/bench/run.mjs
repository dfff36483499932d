#!/usr/bin/env node
// KVMI library benchmarks (run after `tsc -b`; `npm run bench` does both through nx).
//  1. codec: a PF event and its reply, per message — tool side (view decode + in-place reply) and
//     kernel side (reply check) — messages/s and bytes allocated per message.
//  2. ping-pong: event → reply over a Unix socket, tool side in a second process, through the library
//     (framing + session + view + writeEventReply) vs a raw Node socket echo of the same pre-encoded
//     bytes. Reported as p50/p99 round trip and the library/raw ratio.
import { fork, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { cpus, tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import v8 from 'node:v8';

const here = dirname(fileURLToPath(import.meta.url));
const lib = await import(join(here, '../dist/index.js'));

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
  const r = spawnSync(process.execPath, ['--expose-gc', '--min-semi-space-size=128', '--max-semi-space-size=128', fileURLToPath(import.meta.url), '--child-codec'], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(r.stderr);
  return JSON.parse(r.stdout);
}

// Bytes in V8's young generation; with a fixed 128 MiB semi-space no scavenge runs inside the loop.
function newSpaceUsed() {
  return v8.getHeapSpaceStatistics().find((sp) => sp.space_name === 'new_space').space_used_size;
}

function codecChild() {
  const N = 200_000;
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
  const kernel = (n) => {
    const m = lib.receiveKernelMessage(reply.subarray(0, n), state);
    return lib.checkEventReply(m, waiting);
  };
  const objects = () => {
    const e = lib.decodeEvent(event);
    return lib.encodeEventReply(e, 'RETRY');
  };
  const measure = (fn) => {
    for (let i = 0; i < 20_000; i++) fn();
    // Allocation: a short loop that fits in the young generation, so no scavenge hides garbage.
    const A = 5_000;
    globalThis.gc();
    const h0 = newSpaceUsed();
    for (let i = 0; i < A; i++) fn();
    const h1 = newSpaceUsed();
    const t0 = process.hrtime.bigint();
    for (let i = 0; i < N; i++) fn();
    const ns = Number(process.hrtime.bigint() - t0);
    return { msgsPerSec: Math.round((N / ns) * 1e9), nsPerMsg: Math.round(ns / N), bytesPerMsg: Math.max(0, Math.round((h1 - h0) / A)) };
  };
  const out = {
    toolSide: measure(tool),
    toolSideNoReads: measure(toolNoReads),
    kernelSide: (() => { const n = tool(); return measure(() => kernel(n)); })(),
    objectDecode: measure(objects),
  };
  if (sink === 42n) console.error('');
  process.stdout.write(JSON.stringify(out));
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
  const rounds = Number(process.env.KVMI_BENCH_ROUNDS ?? 20_000);
  const codec = codecBench();
  const lib1 = await pingPong('library', rounds);
  const raw = await pingPong('raw', rounds);
  const f = (x) => x.toFixed(1).padStart(7);
  console.log(`\nKVMI library benchmark — ${cpus()[0]?.model ?? 'cpu'} × ${cpus().length}, node ${process.version}`);
  console.log('\n1. PF event + reply, per message (200k iterations after 20k warm-up)');
  console.log('   path                                    msgs/s     ns/msg   bytes allocated/msg');
  for (const [name, r] of [['tool side: view + 2 u64 reads + reply', codec.toolSide], ['tool side: view + reply (no field reads)', codec.toolSideNoReads], ['kernel side: receive + check reply', codec.kernelSide], ['objects: decodeEvent + encodeEventReply', codec.objectDecode]]) {
    console.log(`   ${name.padEnd(40)}${String(r.msgsPerSec).padStart(9)}  ${String(r.nsPerMsg).padStart(8)}   ${String(r.bytesPerMsg).padStart(8)}`);
  }
  console.log(`\n2. Event → reply ping-pong over a Unix socket, two processes, ${rounds} round trips (first 10% dropped)`);
  console.log('   tool side                       p50 µs   p99 µs');
  console.log(`   through the library           ${f(lib1.p50)}  ${f(lib1.p99)}`);
  console.log(`   raw Node socket echo          ${f(raw.p50)}  ${f(raw.p99)}`);
  console.log(`   ratio library/raw (p50)       ${(lib1.p50 / raw.p50).toFixed(2).padStart(7)}`);
  console.log(JSON.stringify({ bench: 'kvmi', codec, pingPong: { library: lib1, raw, ratioP50: lib1.p50 / raw.p50 } }));
}
