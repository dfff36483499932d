#!/usr/bin/env node
// Host agent link benchmark: B2 of the suite (issue #7). Run after the build; bench/run.mjs runs it.
//
//  B2  ask-central stall: a guest CR4.PGE toggle held by an ask-central rule, sent to analysis, answered by
//      a verdict and applied. The agent runs as its own process (`bin/periscope host-agent --analysis`), the
//      analysis peer (`@periscope/testing` AnalysisPeer, answering every held event with CONTINUE at once)
//      as another. The stall is what a vCPU waits: event written → reply read, timed on the KVM side.
//
//   1. Record: the real simulator attaches through a tapping proxy (replay-driver.mjs) and makes the two
//      guest writes of this bench — CR4.PGE toggled (held for analysis) and CR4.SMEP cleared (denied by a
//      local rule) — so the frames replayed below are the simulator's own bytes, nothing hand-encoded.
//   2. KVM side in C (the figure the target is read on): the replay generator (replay.c) plays KVM + QEMU
//      for 1 VM × 1 vCPU with ONE event in flight — as KVM does, the vCPU waits for its reply — replaying
//      the held CR4.PGE event for WARMUP + SECONDS; the generator times each event with CLOCK_MONOTONIC
//      into a 1 µs histogram (p50/p99/max). Then the same for the locally denied SMEP clear (reference).
//      Why C: real KVM answers in-kernel in microseconds; the JavaScript simulator's own event loop and
//      garbage collector add millisecond tails of their own that no agent change can remove.
//   3. KVM side in the simulator (reported beside it): SimVcpu.writeCr on a directly attached simulated VM
//      (event written → reply processed → instruction completed), ROUNDS rounds, first 10% dropped.
//   4. Baseline in the same run: a raw grpc-js bidi ping-pong from this process to the same peer — one
//      pre-encoded HELD EventBatch up, the verdict back — i.e. the gRPC round trip without agent and KVMI.
//
// `--json`: the human table goes to stderr and stdout gets one JSON line (read by bench/run.mjs).
// Env: AGENT_LINK_BENCH_SECONDS (C-driven measured seconds, default 10; --short 1), AGENT_LINK_BENCH_WARMUP
// (seconds, default 2; --short 0.5), AGENT_LINK_BENCH_ROUNDS (simulator rounds and ping-pong rounds, 2000),
// AGENT_BENCH_NODE_ARGS (extra node flags for the agent and peer, e.g. "--cpu-prof --cpu-prof-dir=/tmp/p").
import { fork, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { cpuTimes, stealPercent } from '../../../bench/lib/results.mjs';
import { buildReplay, freePort, loadavg, measured, metric, recordingProxy, startGen, stopGen, templatesFile, track, until, vmStates } from './replay-driver.mjs';

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, '../../..');
const SHORT = process.argv.includes('--short') || process.env.BENCH_SHORT === '1';
const ROUNDS = Number(process.env.AGENT_LINK_BENCH_ROUNDS ?? (SHORT ? 200 : 2000));
const SECONDS = Number(process.env.AGENT_LINK_BENCH_SECONDS ?? (SHORT ? 1 : 10));
const WARMUP = Number(process.env.AGENT_LINK_BENCH_WARMUP ?? (SHORT ? 0.5 : 2));
const NODE_ARGS = (process.env.AGENT_BENCH_NODE_ARGS ?? '').split(' ').filter(Boolean);
const JSON_OUT = process.argv.includes('--json');
const say = JSON_OUT ? (...a) => console.error(...a) : (...a) => console.log(...a);
const progress = (msg) => process.stderr.write(`[agent link bench] ${msg}\n`);
const pct = (sorted, p) => sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
const stats = (samples) => {
  const s = samples.slice(Math.floor(samples.length / 10)).sort((a, b) => a - b);
  return { p50: pct(s, 50), p99: pct(s, 99), max: s[s.length - 1], n: s.length };
};
const PGE = 1n << 7n;
const SMEP = 1n << 20n;

// ---- the analysis peer (child process) -------------------------------------------------------------
async function peerChild() {
  const { AnalysisPeer } = await import(join(root, 'libs/testing/dist/index.js'));
  const continueDecision = { action: 1, replyValue: undefined };
  const peer = new AnalysisPeer({
    autoAckDetections: true,
    retain: false,
    onHeldEvent: (e, p) => p.verdict({ vmUuid: e.vmUuid, sessionGeneration: e.sessionGeneration, seq: e.seq, decision: continueDecision, ruleId: 'bench', detectionId: '' }),
  });
  await peer.start();
  process.send?.({ address: peer.address });
  process.on('disconnect', () => process.exit(0));
}

async function rawPingPong(address, rounds) {
  const grpc = await import(join(root, 'node_modules/@grpc/grpc-js/build/src/index.js'));
  const contracts = await import(join(root, 'libs/contracts/dist/index.js'));
  const client = new grpc.Client(address, grpc.credentials.createInsecure());
  const call = client.makeBidiStreamRequest('/periscope.v1.AgentLinkService/Link', (b) => b, (b) => contracts.LinkResponse.decode(b), new grpc.Metadata(), {});
  const ev = (seq) => ({
    hostId: 'bench', vmUuid: Buffer.alloc(16, 1), sessionGeneration: 1n, vcpu: 0, seq, receivedUnixNs: 1n, repliedUnixNs: 0n,
    disposition: contracts.EventDisposition.EVENT_DISPOSITION_HELD, verdictDeadlineUnixNs: 5n, ruleId: 'r', policyVersion: 1n, mode: 8,
    regs: undefined, sregs: undefined, msrs: undefined, payload: { $case: 'cr', value: { cr: 4, oldValue: 0x3406f0n, newValue: 0x340670n } },
  });
  let waiting;
  call.on('data', () => waiting?.());
  call.on('error', () => undefined);
  call.write(Buffer.from(contracts.LinkRequest.encode({ streamSeq: 1n, message: { $case: 'hello', value: { hostId: 'raw', agentVersion: '', agentInstanceId: 'raw', startedUnixNs: 0n, capabilities: [], activePolicyId: '', activePolicyVersion: 0n } } }).finish()));
  const samples = [];
  for (let i = 0; i < rounds; i++) {
    // Pre-encoded before the clock starts: the baseline is the round trip only.
    const bytes = Buffer.from(contracts.LinkRequest.encode({ streamSeq: BigInt(i + 2), message: { $case: 'eventBatch', value: { events: [ev(i + 1)] } } }).finish());
    const done = new Promise((r) => (waiting = r));
    const t0 = process.hrtime.bigint();
    call.write(bytes);
    await done;
    samples.push(Number(process.hrtime.bigint() - t0) / 1000);
  }
  call.end();
  call.cancel();
  client.close();
  return stats(samples);
}

/** One C-driven phase: 1 VM × 1 vCPU, one event in flight, the given template only. */
async function cPhase(bin, dir, tmpl, pids, label) {
  progress(`${label}: C replay generator, 1 VM × 1 vCPU, one event in flight, ${WARMUP} s warm-up + ${SECONDS} s`);
  const g = startGen(bin, [join(dir, 'k.sock'), tmpl, '1', '1', '1', String(WARMUP), String(SECONDS)]);
  await until(async () => (await vmStates(dir)).some((v) => v.state === 'protected'), 60000, 'the replayed VM to be protected');
  const c0 = cpuTimes();
  const m = await measured(g, pids);
  const steal = stealPercent(c0, cpuTimes());
  await stopGen(g);
  await until(async () => (await vmStates(dir)).length === 0, 10000, 'the replayed VM to detach');
  if (m.result.bad) throw new Error(`${label}: ${m.result.bad} bad replies`);
  return { p50: m.result.rttUs.p50, p99: m.result.rttUs.p99, max: m.result.rttUs.max, over1ms: m.result.over1ms, over5ms: m.result.over5ms, slow: m.result.slow, n: m.result.replies, eventsPerSec: m.result.eventsPerSec, cpu: m.cpu, stealPercent: steal };
}

async function main() {
  const sim = await import(join(root, 'libs/simulator/dist/index.js'));
  const dir = mkdtempSync(join(tmpdir(), 'hab-link-'));
  const load0 = loadavg();
  const bin = buildReplay(dir);
  const peer = track(fork(fileURLToPath(import.meta.url), ['--peer'], { execArgv: NODE_ARGS, stdio: ['ignore', 'inherit', 'inherit', 'ipc'] }));
  const { address } = await new Promise((r) => peer.once('message', r));
  writeFileSync(join(dir, 'cookie'), 'bench');
  const policy = {
    format: 'periscope.verdicts/v1', id: 'bench-link', version: 1, defaultReport: 'never',
    rules: [
      { id: 'cr4-pge-ask', match: { kind: 'CR', cr: 4, changes: '0x80' }, askCentral: { deadlineMs: 50, default: 'allow' } },
      { id: 'cr4-smep-clear', match: { kind: 'CR', cr: 4, clears: '0x100000' }, action: 'deny' },
    ],
    interception: { events: ['CR'], crs: [4], msrs: [] },
  };
  writeFileSync(join(dir, 'policy.json'), JSON.stringify(policy));
  const metricsPort = await freePort();
  const agent = track(
    spawn(process.execPath, [...NODE_ARGS, join(root, 'bin/periscope'), 'host-agent', '--kvmi-listen', `unix:${dir}/k.sock`, '--cookie-file', join(dir, 'cookie'), '--policy', join(dir, 'policy.json'), '--analysis', address, '--api-listen', `unix:${dir}/api.sock`, '--metrics-listen', `127.0.0.1:${metricsPort}`, '--log-level', 'warn'], { stdio: ['ignore', 'ignore', 'inherit'] }),
  );
  await until(() => existsSync(join(dir, 'api.sock')), 30000, 'the agent API');
  await until(async () => (await metric(metricsPort, 'periscope_agent_link_state')) === 2, 30000, 'the link to the peer');
  const centralTotal = () => metric(metricsPort, 'periscope_agent_ask_central_total', 'outcome="central"');

  // 1. Record the two guest writes through the tapping proxy.
  progress('recording an attach and the two CR4 writes from the simulator');
  const proxy = recordingProxy(join(dir, 'rec.sock'), join(dir, 'k.sock'));
  await proxy.listen();
  {
    const vm = new sim.SimVm({ vcpus: 1, seed: 2, jitterMs: 0 });
    const qemu = new sim.SimQemu(vm, { path: join(dir, 'rec.sock'), key: Buffer.from('bench'), reconnectSeconds: 30 });
    qemu.start();
    await until(async () => (await vmStates(dir)).some((v) => v.state === 'protected'), 30000, 'the recorded VM to be protected');
    const cpu = vm.vcpus[0];
    const pge = await cpu.writeCr(4, cpu.cpu.sregs.cr4 ^ PGE);
    cpu.cpu.sregs.cr4 |= SMEP;
    const smep = await cpu.writeCr(4, cpu.cpu.sregs.cr4 & ~SMEP);
    if (pge.events.length !== 1 || smep.events.length !== 1) throw new Error('a recorded CR4 write raised no event');
    if ((cpu.cpu.sregs.cr4 & SMEP) === 0n) throw new Error('the SMEP clear was not denied');
    await until(() => proxy.rec.eventReplies.length >= 2, 5000, 'the agent replies');
    qemu.stop();
    await until(async () => (await vmStates(dir)).length === 0, 10000, 'the recorded VM to detach');
    proxy.server.close();
  }
  const central0 = await centralTotal();
  if (!(central0 >= 1)) throw new Error('the recorded CR4.PGE toggle was not answered by analysis');
  templatesFile(proxy.rec, join(dir, 'ask.bin'), [0]);
  templatesFile(proxy.rec, join(dir, 'deny.bin'), [1]);

  // 2. KVM side in C.
  const pids = { agent: agent.pid, peer: peer.pid };
  const ask = await cPhase(bin, dir, join(dir, 'ask.bin'), pids, 'ask central');
  // Every replayed event must have been answered by analysis (not by a deadline default).
  const central = (await centralTotal()) - central0;
  const deadlines = await metric(metricsPort, 'periscope_agent_ask_central_total', 'outcome="deadline"');
  if (central < ask.n) throw new Error(`only ${central} of ${ask.n} replayed events were answered by analysis`);
  const local = await cPhase(bin, dir, join(dir, 'deny.bin'), pids, 'local deny');

  // 3. KVM side in the simulator.
  progress(`ask central through the simulator: ${ROUNDS} rounds (SimVcpu.writeCr)`);
  const vm = new sim.SimVm({ vcpus: 1, seed: 3, jitterMs: 0 });
  const qemu = new sim.SimQemu(vm, { path: join(dir, 'k.sock'), key: Buffer.from('bench'), reconnectSeconds: 30 });
  qemu.start();
  await until(async () => (await vmStates(dir)).some((v) => v.state === 'protected'), 30000, 'the simulated VM to be protected');
  const cpu = vm.vcpus[0];
  const simSamples = [];
  for (let i = 0; i < ROUNDS; i++) {
    const t0 = process.hrtime.bigint();
    const r = await cpu.writeCr(4, cpu.cpu.sregs.cr4 ^ PGE);
    simSamples.push(Number(process.hrtime.bigint() - t0) / 1000);
    if (r.events.length !== 1) throw new Error('no CR event');
  }
  const maxReplyWaitMs = vm.stats.maxReplyWaitMs;
  qemu.stop();

  // 4. The raw grpc-js baseline.
  progress(`raw grpc-js bidi ping-pong to the same peer: ${ROUNDS} rounds`);
  const raw = await rawPingPong(address, ROUNDS);
  agent.kill('SIGTERM');
  await new Promise((r) => agent.once('exit', r));
  peer.disconnect();
  await new Promise((r) => peer.once('exit', r));
  rmSync(dir, { recursive: true, force: true });
  const load1 = loadavg();

  const viaSim = stats(simSamples);
  const f = (x) => String(Math.round(x)).padStart(8);
  say(`\nHost agent link benchmark — ${cpus()[0]?.model ?? 'cpu'} × ${cpus().length}, node ${process.version}${SHORT ? ' (--short)' : ''}`);
  say(`load average before ${load0.join(' ')}, after ${load1.join(' ')}`);
  say('\nB2. vCPU stall for a guest CR4 write: held for an analysis verdict (ask central) vs decided locally');
  say('   KVM side                 path                                   p50 µs    p99 µs    max µs   events');
  say(`   C (replay.c)             ask central (agent → peer → agent)   ${f(ask.p50)}  ${f(ask.p99)}  ${f(ask.max)}   ${ask.n}   (target p99 ≤ 1000 µs)`);
  say(`   C (replay.c)             local deny, same agent               ${f(local.p50)}  ${f(local.p99)}  ${f(local.max)}   ${local.n}`);
  say(`   simulator (JavaScript)   ask central                          ${f(viaSim.p50)}  ${f(viaSim.p99)}  ${f(viaSim.max)}   ${viaSim.n}`);
  say(`   —                        raw grpc-js bidi ping-pong, same peer ${f(raw.p50)}  ${f(raw.p99)}  ${f(raw.max)}   ${raw.n}`);
  say(`   CPU during ask central (% of a core): agent ${ask.cpu.agent}, peer ${ask.cpu.peer}, generator ${ask.cpu.generator}; ${Math.round(ask.eventsPerSec)} held events/s, ${deadlines} verdict deadlines missed`);
  const slowList = (x) => x.slow.map((e) => `${Math.round(e.us / 100) / 10} ms at +${Math.round(e.atMs)} ms`).join(', ');
  say(`   replies over 1 ms / over 5 ms (C side): ask central ${ask.over1ms} / ${ask.over5ms}, local deny ${local.over1ms} / ${local.over5ms}`);
  if (ask.slow.length) say(`   first slow ask-central replies (wait, when after the window opened): ${slowList(ask)}`);
  if (local.slow.length) say(`   first slow local-deny replies: ${slowList(local)}`);
  say(`   longest vCPU wait seen by the simulator: ${maxReplyWaitMs} ms; CPU time stolen by the hypervisor: ${ask.stealPercent} % during ask central, ${local.stealPercent} % during local deny`);
  console.log(JSON.stringify({ bench: 'host-agent-link', short: SHORT, seconds: SECONDS, rounds: ROUNDS, load: { before: load0, after: load1 }, askCentral: ask, localDeny: local, askCentralSimulator: viaSim, rawPingPong: raw, deadlinesMissed: deadlines, maxReplyWaitMs }));
}

if (process.argv[2] === '--peer') await peerChild();
else await main();
