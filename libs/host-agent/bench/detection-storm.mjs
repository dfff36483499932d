#!/usr/bin/env node
// Detection storm: what a guest storming a denied write that raises a detection does to ANOTHER VM's replies
// on the same host agent — with `--detection-rate 0 --detection-rate-host 0` (every detection raised) and with
// the defaults (1000 per VM and second, 2000 per host; the rest counted in RATE_LIMITED loss records).
//
//   storm VM  1 VM × 4 vCPUs, 4 events in flight: CR0.WP clears, denied by a rule with a severity (a detection
//             each: frame copy, event decode, instruction read over KVMI, spool writes, send to analysis)
//   quiet VM  1 VM × 1 vCPU, 1 event in flight: CR4.SMEP clears, denied by a rule without a severity; its
//             reply time (measured by the C generator) is the figure: a customer's vCPU on the same host
//
// The KVM side is the C replay generator (replay.c) replaying frames recorded from the simulator, so neither
// VM is limited by JavaScript; the analysis peer acknowledges every detection. The agent has a --state-dir (the
// spool on disk, as deployed). Not part of the suite (no target): `node libs/host-agent/bench/detection-storm.mjs
// [--seconds N]`; figures in docs/benchmarks.md.
import { fork, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { buildReplay, freePort, loadavg, measured, metric, recordingProxy, startGen, stopGen, templatesFile, track, until, vmStates } from './replay-driver.mjs';

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, '../../..');
const arg = (name, def) => {
  const i = process.argv.indexOf(name);
  return i > 0 ? Number(process.argv[i + 1]) : def;
};
if (process.argv.includes('--help')) {
  console.log('usage: node libs/host-agent/bench/detection-storm.mjs [--seconds N (default 5)] [--warmup N (default 1)]\n\nA storming VM raising detections vs a quiet VM\'s reply time on the same host agent, with --detection-rate 0 and 1000.');
  process.exit(0);
}
const SECONDS = arg('--seconds', 5);
const WARMUP = arg('--warmup', 1);
if (!(SECONDS > 0) || !(WARMUP >= 0)) {
  console.error('detection-storm: --seconds must be > 0 and --warmup ≥ 0');
  process.exit(2);
}
const progress = (msg) => process.stderr.write(`[detection storm] ${msg}\n`);
const WP = 1n << 16n;
const SMEP = 1n << 20n;

async function main() {
  const sim = await import(join(root, 'libs/simulator/dist/index.js'));
  const dir = mkdtempSync(join(tmpdir(), 'hab-storm-'));
  const load0 = loadavg();
  const bin = buildReplay(dir);
  // The analysis peer of the link bench (acknowledges every detection, answers held events).
  const peer = track(fork(join(here, 'link.mjs'), ['--peer'], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] }));
  const { address } = await new Promise((r) => peer.once('message', r));
  writeFileSync(join(dir, 'cookie'), 'bench');
  writeFileSync(
    join(dir, 'policy.json'),
    JSON.stringify({
      format: 'periscope.verdicts/v1', id: 'bench-storm', version: 1, defaultReport: 'never',
      rules: [
        { id: 'cr0-wp-clear', match: { kind: 'CR', cr: 0, clears: '0x10000' }, action: 'deny', severity: 'high' },
        { id: 'cr4-smep-clear', match: { kind: 'CR', cr: 4, clears: '0x100000' }, action: 'deny' },
      ],
      interception: { events: ['CR'], crs: [0, 4], msrs: [] },
    }),
  );
  let metricsPort = 0;
  const startAgent = async (rate) => {
    metricsPort = await freePort();
    const agent = track(
      spawn(process.execPath, [join(root, 'bin/periscope'), 'host-agent', '--kvmi-listen', `unix:${dir}/k.sock`, '--cookie-file', join(dir, 'cookie'), '--policy', join(dir, 'policy.json'), '--analysis', address, '--api-listen', `unix:${dir}/api.sock`, '--metrics-listen', `127.0.0.1:${metricsPort}`, '--state-dir', join(dir, `state-${rate}`), '--detection-rate', String(rate), ...(rate === 0 ? ['--detection-rate-host', '0'] : []), '--log-level', 'error'], { stdio: ['ignore', 'ignore', 'inherit'] }),
    );
    await until(() => existsSync(join(dir, 'api.sock')), 30000, 'the agent API');
    await until(async () => (await metric(metricsPort, 'periscope_agent_link_state')) === 2, 30000, 'the link to the peer');
    return agent;
  };
  const stopAgent = async (agent) => {
    agent.kill('SIGTERM');
    await new Promise((r) => agent.once('exit', r));
    rmSync(join(dir, 'api.sock'), { force: true });
  };

  // Record each guest write (the simulator's own bytes) through the tapping proxy, from two VMs (the generator
  // keeps the recorded UUID's prefix, so the storm and the quiet VM must come from different VMs).
  let agent = await startAgent(0);
  const record = async (seed, file, write) => {
    const proxy = recordingProxy(join(dir, `rec-${seed}.sock`), join(dir, 'k.sock'));
    await proxy.listen();
    const vm = new sim.SimVm({ vcpus: 1, seed, jitterMs: 0 });
    const qemu = new sim.SimQemu(vm, { path: join(dir, `rec-${seed}.sock`), key: Buffer.from('bench'), reconnectSeconds: 30 });
    qemu.start();
    await until(async () => (await vmStates(dir)).some((v) => v.state === 'protected'), 30000, 'the recorded VM to be protected');
    await write(vm.vcpus[0]);
    await until(() => proxy.rec.eventReplies.length >= 1, 5000, 'the agent reply');
    qemu.stop();
    await until(async () => (await vmStates(dir)).length === 0, 10000, 'the recorded VM to detach');
    proxy.server.close();
    templatesFile(proxy.rec, join(dir, file), [0]);
  };
  progress('recording a CR0.WP clear and a CR4.SMEP clear from two simulated VMs');
  await record(2, 'storm.bin', async (cpu) => {
    cpu.cpu.sregs.cr0 |= WP;
    const r = await cpu.writeCr(0, cpu.cpu.sregs.cr0 & ~WP);
    if (r.events.length !== 1 || (cpu.cpu.sregs.cr0 & WP) === 0n) throw new Error('the recorded CR0.WP clear was not intercepted and denied');
  });
  await record(3, 'quiet.bin', async (cpu) => {
    cpu.cpu.sregs.cr4 |= SMEP;
    const r = await cpu.writeCr(4, cpu.cpu.sregs.cr4 & ~SMEP);
    if (r.events.length !== 1 || (cpu.cpu.sregs.cr4 & SMEP) === 0n) throw new Error('the recorded CR4.SMEP clear was not intercepted and denied');
  });

  const rows = [];
  for (const rate of [0, 1000]) {
    if (rate !== 0) agent = await startAgent(rate);
    progress(`--detection-rate ${rate}: storm 1 VM × 4 vCPUs (4 in flight) + quiet 1 VM × 1 vCPU, ${WARMUP} s warm-up + ${SECONDS} s`);
    const storm = startGen(bin, [join(dir, 'k.sock'), join(dir, 'storm.bin'), '1', '4', '4', String(WARMUP), String(SECONDS)]);
    const quiet = startGen(bin, [join(dir, 'k.sock'), join(dir, 'quiet.bin'), '1', '1', '1', String(WARMUP), String(SECONDS)]);
    await until(async () => (await vmStates(dir)).filter((v) => v.state === 'protected').length === 2, 60000, 'both replayed VMs protected');
    const counters = async () => ({
      raised: await metric(metricsPort, 'periscope_agent_detections_total'),
      limited: await metric(metricsPort, 'periscope_agent_detections_rate_limited_total'),
      dropped: await metric(metricsPort, 'periscope_agent_detections_dropped_total'),
    });
    const pids = { agent: agent.pid, peer: peer.pid };
    const [s, q] = await Promise.all([measured(storm, pids, counters), measured(quiet, pids)]);
    await Promise.all([stopGen(storm), stopGen(quiet)]);
    await until(async () => (await vmStates(dir)).length === 0, 20000, 'the replayed VMs to detach');
    if (s.result.bad || q.result.bad) throw new Error(`bad replies: storm ${s.result.bad}, quiet ${q.result.bad}`);
    const per = (k) => Math.round((s.extraAfter[k] - s.extraBefore[k]) / s.seconds);
    rows.push({
      rate, stormEventsPerSec: Math.round(s.result.eventsPerSec), detectionsPerSec: per('raised'), rateLimitedPerSec: per('limited'), spoolDroppedPerSec: per('dropped'),
      quiet: { p50: q.result.rttUs.p50, p99: q.result.rttUs.p99, max: q.result.rttUs.max, over1ms: q.result.over1ms, over5ms: q.result.over5ms, eventsPerSec: Math.round(q.result.eventsPerSec) },
      cpu: s.cpu,
    });
    await stopAgent(agent);
  }
  peer.disconnect();
  await new Promise((r) => peer.once('exit', r));
  rmSync(dir, { recursive: true, force: true });
  const load1 = loadavg();

  const f = (x, w = 8) => String(Math.round(x)).padStart(w);
  console.log(`\nDetection storm vs a quiet VM on one host agent — ${cpus()[0]?.model ?? 'cpu'} × ${cpus().length}, node ${process.version}, ${SECONDS} s per row`);
  console.log(`load average before ${load0.join(' ')}, after ${load1.join(' ')}`);
  console.log('   --detection-rate   storm events/s   detections/s   rate-limited/s   quiet p50 µs   p99 µs   max µs   >1 ms   >5 ms   quiet events/s   CPU % agent / peer');
  for (const r of rows) {
    console.log(`   ${String(r.rate || '0 (unlimited)').padEnd(16)} ${f(r.stormEventsPerSec, 15)} ${f(r.detectionsPerSec, 14)} ${f(r.rateLimitedPerSec, 16)} ${f(r.quiet.p50, 14)} ${f(r.quiet.p99)} ${f(r.quiet.max)} ${f(r.quiet.over1ms, 7)} ${f(r.quiet.over5ms, 7)} ${f(r.quiet.eventsPerSec, 16)}   ${r.cpu.agent} / ${r.cpu.peer}`);
  }
  console.log(JSON.stringify({ bench: 'host-agent-detection-storm', seconds: SECONDS, load: { before: load0, after: load1 }, rows }));
}

await main();
