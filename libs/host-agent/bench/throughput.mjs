#!/usr/bin/env node
// Host agent throughput benchmark (B5, issue #7). Run after the build (`npm run bench` runs it after link.mjs).
//
//  B5  sustained events/s through ONE host agent process (`bin/periscope host-agent --analysis`) with
//      reporting on, the analysis peer (`@periscope/testing`, count mode) as another process, and the load
//      from a small C replay generator (bench/replay.c, compiled here with the system `cc`) so that the
//      simulator is not the bottleneck.
//
//  1. Record: the real simulator (one VM, 4 vCPUs) attaches to the agent through a tapping proxy. The
//     transcript gives the QEMU handshake struct, the agent's handshake reply, the simulator's reply to
//     every command id of the attach sequence, and two real CR4 event frames (guest writes through
//     `SimVcpu.writeCr`) with the agent's replies. They go to a templates file; nothing is hand-encoded.
//  2. Replay: the generator opens VMS sockets, does the handshake, answers the attach from the recorded
//     replies, and once every VM is `protected` (the agent's local API) drives VMS × VCPUS vCPU streams,
//     each keeping INFLIGHT events outstanding (1 = as KVM does: the vCPU waits for its reply), events
//     alternating between the two templates: a CR4.PGE toggle (rule `bench-cr4-pge`: allow, report always →
//     a VerdictRecord to analysis) and a CR4.PCE toggle (no rule: default allow, not reported). The policy
//     is the shipped default behind 120 generated filler rules (as B1) plus that rule.
//  3. CPU% per process: utime+stime from /proc/<pid>/stat over the measured window (100% = one core).
//  4. Baseline in the same run: the same generator (raw mode, no handshake) against a C echo responder
//     that answers each event with the recorded reply, seq/vcpu/new_val patched.
//
// `--json`: the human table goes to stderr and stdout gets one JSON line (read by bench/run.mjs).
// `--short` (or BENCH_SHORT=1): CI-sized (1 s warm-up, 3 s measured). Env: AGENT_TPUT_VMS (64),
// AGENT_TPUT_VCPUS (4), AGENT_TPUT_INFLIGHT (1), AGENT_TPUT_SECONDS (10), AGENT_TPUT_WARMUP_SECONDS (2), AGENT_TPUT_REPORT=all|half.
import { fork, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { buildReplay, freePort, loadavg, measured, metric, recordingProxy, sleep, startGen, stopGen, templatesFile, track, until, vmStates } from './replay-driver.mjs';

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, '../../..');
const SHORT = process.argv.includes('--short') || process.env.BENCH_SHORT === '1';
const VMS = Number(process.env.AGENT_TPUT_VMS ?? 64);
const VCPUS = Number(process.env.AGENT_TPUT_VCPUS ?? 4);
const INFLIGHT = Number(process.env.AGENT_TPUT_INFLIGHT ?? 1);
const MEASURE_S = Number(process.env.AGENT_TPUT_SECONDS ?? (SHORT ? 3 : 10));
const WARMUP_S = Number(process.env.AGENT_TPUT_WARMUP_SECONDS ?? (SHORT ? 1 : 2));
const REPORT_ALL = process.env.AGENT_TPUT_REPORT === 'all';
const PGE = 1n << 7n;
const PCE = 1n << 8n;

const JSON_OUT = process.argv.includes('--json');
const say = JSON_OUT ? (...a) => console.error(...a) : (...a) => console.log(...a);
const progress = (msg) => process.stderr.write(`[agent throughput bench] ${msg}\n`);
// ---- the analysis peer (child process, count mode) ---------------------------------------------------
async function peerChild() {
  const { AnalysisPeer } = await import(join(root, 'libs/testing/dist/index.js'));
  const peer = new AnalysisPeer({ mode: 'count', autoAckDetections: true, retain: false });
  await peer.start();
  process.on('message', (m) => {
    if (m === 'counts') process.send?.({ counts: { ...peer.counts } });
  });
  process.send?.({ address: peer.address });
  process.on('disconnect', () => process.exit(0));
}

function peerCounts(peer) {
  return new Promise((resolve) => {
    const on = (m) => {
      if (!m.counts) return;
      peer.off('message', on);
      resolve(m.counts);
    };
    peer.on('message', on);
    peer.send('counts');
  });
}

async function main() {
  const sim = await import(join(root, 'libs/simulator/dist/index.js'));
  const verdicts = await import(join(root, 'libs/verdicts/dist/index.js'));
  const dir = mkdtempSync(join(tmpdir(), 'hab-tput-'));
  const bin = buildReplay(dir);
  const load0 = loadavg();

  // The peer and the agent.
  const peer = track(fork(fileURLToPath(import.meta.url), ['--peer'], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] }));
  const { address } = await new Promise((r) => peer.once('message', r));
  writeFileSync(join(dir, 'cookie'), 'bench');
  const defaults = JSON.parse(readFileSync(verdicts.DEFAULT_POLICY_PATH, 'utf8'));
  defaults.rules.unshift({ id: 'bench-cr4-pge', match: { kind: 'CR', cr: 4, changes: '0x80' }, action: 'allow', report: 'always' });
  if (REPORT_ALL) defaults.defaultReport = 'always';
  const policy = verdicts.generatePolicy({ count: 120, seed: 7, base: verdicts.parsePolicy(defaults, 'bench base') });
  writeFileSync(join(dir, 'policy.json'), verdicts.formatPolicy(policy));
  const metricsPort = await freePort();
  const agent = track(
    spawn(process.execPath, [join(root, 'bin/periscope'), 'host-agent', '--kvmi-listen', `unix:${dir}/k.sock`, '--cookie-file', join(dir, 'cookie'), '--policy', join(dir, 'policy.json'), '--analysis', address, '--api-listen', `unix:${dir}/api.sock`, '--metrics-listen', `127.0.0.1:${metricsPort}`, '--log-level', 'warn'], { stdio: ['ignore', 'ignore', 'inherit'] }),
  );
  await until(() => existsSync(join(dir, 'api.sock')), 30000, 'the agent API');

  // 1. Record a real attach + two CR events through the proxy.
  progress('recording an attach transcript from the simulator (1 VM, 4 vCPUs)');
  const proxy = recordingProxy(join(dir, 'rec.sock'), join(dir, 'k.sock'));
  await proxy.listen();
  const vm = new sim.SimVm({ vcpus: 4, seed: 5, jitterMs: 0, apsOnline: true });
  const qemu = new sim.SimQemu(vm, { path: join(dir, 'rec.sock'), key: Buffer.from('bench'), reconnectSeconds: 30 });
  qemu.start();
  await until(async () => (await vmStates(dir)).some((v) => v.state === 'protected'), 30000, 'the recorded VM to be protected');
  const cpu = vm.vcpus[0];
  for (const bit of [PGE, PCE]) {
    const r = await cpu.writeCr(4, cpu.cpu.sregs.cr4 ^ bit);
    if (r.events.length !== 1) throw new Error('the CR4 write raised no event');
  }
  await until(() => proxy.rec.eventReplies.length >= 2, 5000, 'the agent replies');
  qemu.stop();
  await until(async () => (await vmStates(dir)).length === 0, 10000, 'the recorded VM to detach');
  proxy.server.close();
  const rec = proxy.rec;
  const tmpl = join(dir, 'templates.bin');
  templatesFile(rec, tmpl, [0, 1]);
  progress(`recorded: handshake ${rec.handshake.length} B, ${rec.cmdReplies.size} command replies, events ${rec.events.map((e) => e.length).join('/')} B`);

  // 2. The agent under the generator.
  const streams = VMS * VCPUS;
  progress(`B5: ${VMS} VMs × ${VCPUS} vCPUs = ${streams} streams, ${INFLIGHT} in flight each, ${WARMUP_S} s warm-up + ${MEASURE_S} s`);
  const g = startGen(bin, [join(dir, 'k.sock'), tmpl, String(VMS), String(VCPUS), String(INFLIGHT), String(WARMUP_S), String(MEASURE_S)]);
  await until(async () => {
    const vms = await vmStates(dir);
    return vms.length === VMS && vms.every((v) => v.state === 'protected');
  }, 120000, 'every replayed VM to be protected');
  const dropped0 = await metric(metricsPort, 'periscope_agent_reports_dropped_total');
  const withAgent = await measured(g, { agent: agent.pid, peer: peer.pid }, async () => ({ peer: await peerCounts(peer), t: performance.now() }));
  const dropped = (await metric(metricsPort, 'periscope_agent_reports_dropped_total')) - dropped0;
  const stallSum = await metric(metricsPort, 'periscope_agent_vcpu_stall_seconds_sum');
  const stallCount = await metric(metricsPort, 'periscope_agent_vcpu_stall_seconds_count');
  const pa = withAgent.extraBefore;
  const pb = withAgent.extraAfter;
  const peerSecs = (pb.t - pa.t) / 1000;
  const reportedPerSec = (pb.peer.verdictRecords - pa.peer.verdictRecords) / peerSecs;
  const batchesPerSec = (pb.peer.verdictBatches - pa.peer.verdictBatches) / peerSecs;
  // The generator stops sending after its result but keeps answering: the agent detaches every VM cleanly.
  agent.kill('SIGTERM');
  await new Promise((r) => agent.once('exit', r));
  await stopGen(g);

  // 3. Baseline: the same generator against the C echo responder.
  progress('B5 baseline: the same generator against a C echo responder');
  const echo = track(spawn(bin, ['echo', join(dir, 'raw.sock'), tmpl], { stdio: ['ignore', 'pipe', 'inherit'] }));
  await new Promise((r) => createInterface({ input: echo.stdout }).once('line', r));
  const rg = startGen(bin, [join(dir, 'raw.sock'), tmpl, String(VMS), String(VCPUS), String(INFLIGHT), String(WARMUP_S), String(MEASURE_S), 'raw']);
  await sleep(200);
  const raw = await measured(rg, { responder: echo.pid });
  await stopGen(rg);
  echo.kill();
  peer.kill();
  const load1 = loadavg();
  rmSync(dir, { recursive: true, force: true });

  const r = withAgent.result;
  const k = (n) => `${(n / 1000).toFixed(1)}k`;
  say(`\nHost agent throughput benchmark — ${cpus()[0]?.model ?? 'cpu'} × ${cpus().length}, node ${process.version}${SHORT ? ' (--short)' : ''}`);
  say(`load average before ${load0.join(' ')}, after ${load1.join(' ')}`);
  say(`\nB5. sustained events/s, ${VMS} VMs × ${VCPUS} vCPUs = ${streams} vCPU streams, ${INFLIGHT} event(s) in flight per vCPU, ${MEASURE_S} s after ${WARMUP_S} s warm-up`);
  say(`   events: CR4.PGE toggle (rule bench-cr4-pge, allow, reported) / CR4.PCE toggle (no rule, allow${REPORT_ALL ? ', reported by defaultReport' : ', not reported'}), alternating; policy ${policy.rules.length} rules`);
  say('   responder                    events/s    rtt p50 / p99 µs   CPU% (100 = one core)');
  say(`   host agent + analysis peer  ${k(r.eventsPerSec).padStart(8)}    ${String(r.rttUs.p50).padStart(6)} / ${String(r.rttUs.p99).padEnd(6)}     agent ${withAgent.cpu.agent}, generator ${withAgent.cpu.generator}, peer ${withAgent.cpu.peer}   (target ≥ 100k/s)`);
  say(`   raw C echo responder        ${k(raw.result.eventsPerSec).padStart(8)}    ${String(raw.result.rttUs.p50).padStart(6)} / ${String(raw.result.rttUs.p99).padEnd(6)}     responder ${raw.cpu.responder}, generator ${raw.cpu.generator}`);
  say(`   reported to analysis: ${k(reportedPerSec)} verdict records/s in ${batchesPerSec.toFixed(0)} batches/s; dropped (queue full) ${dropped}; bad replies ${r.bad}`);
  say(`   agent's own decision time (event parsed → reply queued), mean over the agent's life: ${stallCount ? ((stallSum / stallCount) * 1e6).toFixed(1) : '?'} µs`);
  console.log(JSON.stringify({ bench: 'host-agent-throughput', short: SHORT, vms: VMS, vcpus: VCPUS, inflight: INFLIGHT, seconds: MEASURE_S, load: { before: load0, after: load1 }, agent: { ...r, cpu: withAgent.cpu, reportedPerSec, batchesPerSec, dropped }, raw: { ...raw.result, cpu: raw.cpu } }));
}

if (process.argv[2] === '--peer') await peerChild();
else await main();
