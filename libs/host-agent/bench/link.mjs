#!/usr/bin/env node
// Host agent link benchmarks (issue #7). Run after the build (`npm run bench` runs it after run.mjs).
//
//  B4  ask-central stall: a guest CR4.PGE toggle held by an ask-central rule, sent to analysis, answered by
//      a verdict and applied — timed by the simulator's guest action (event written → reply processed →
//      instruction completed). The agent runs as its own process (`bin/periscope host-agent --analysis`),
//      the analysis peer (`@periscope/testing`, answering every held event at once) as another. Baseline in
//      the same run: a raw grpc-js bidi ping-pong from this process to the same peer — one pre-encoded HELD
//      EventBatch up, the verdict back — i.e. the gRPC round trip without the agent and KVMI.
//
// `--json`: the human table goes to stderr and stdout gets one JSON line (read by bench/run.mjs).
import { fork, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { request } from 'node:http';
import { cpus, tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, '../../..');
const ROUNDS = Number(process.env.AGENT_LINK_BENCH_ROUNDS ?? 2000);
// Extra node flags for the agent and peer processes (profiling), e.g. "--cpu-prof --cpu-prof-dir=/tmp/p".
const NODE_ARGS = (process.env.AGENT_BENCH_NODE_ARGS ?? '').split(' ').filter(Boolean);
const JSON_OUT = process.argv.includes('--json');
const say = JSON_OUT ? (...a) => console.error(...a) : (...a) => console.log(...a);
const progress = (msg) => process.stderr.write(`[agent link bench] ${msg}\n`);
const pct = (sorted, p) => sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
async function until(cond, ms = 30000) {
  const t0 = Date.now();
  while (!(await cond())) {
    if (Date.now() - t0 > ms) throw new Error('timed out');
    await sleep(20);
  }
}
const stats = (samples) => {
  const s = samples.slice(Math.floor(samples.length / 10)).sort((a, b) => a - b);
  return { p50: pct(s, 50), p99: pct(s, 99), n: s.length };
};

// ---- the analysis peer (child process) -------------------------------------------------------------
async function peerChild() {
  const { AnalysisPeer } = await import(join(root, 'libs/testing/dist/index.js'));
  const continueDecision = { action: 1, replyValue: undefined };
  const peer = new AnalysisPeer({
    onHeldEvent: (e, p) => p.verdict({ vmUuid: e.vmUuid, sessionGeneration: e.sessionGeneration, seq: e.seq, decision: continueDecision, ruleId: 'bench', detectionId: '' }),
  });
  await peer.start();
  // Forget what was received (a long run would otherwise keep every message).
  setInterval(() => peer.received.splice(0), 1000).unref();
  process.send?.({ address: peer.address });
  process.on('disconnect', () => process.exit(0));
}

const children = new Set();
process.on('exit', () => {
  for (const c of children) c.kill('SIGKILL');
});

/** The agent's stall histogram sum/count (seconds) from /metrics. */
function stall(port) {
  return new Promise((resolve, reject) => {
    const req = request({ host: '127.0.0.1', port, path: '/metrics' }, (res) => {
      let b = '';
      res.on('data', (c) => (b += c));
      res.on('end', () => {
        const v = (name) => b.split('\n').filter((l) => l.startsWith(name)).reduce((n, l) => n + Number(l.slice(l.lastIndexOf(' ') + 1)), 0);
        resolve({ sum: v('periscope_agent_vcpu_stall_seconds_sum'), count: v('periscope_agent_vcpu_stall_seconds_count') });
      });
    });
    req.on('error', reject);
    req.end();
  });
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

async function main() {
  const sim = await import(join(root, 'libs/simulator/dist/index.js'));
  const dir = mkdtempSync(join(tmpdir(), 'hab-link-'));
  const peer = fork(fileURLToPath(import.meta.url), ['--peer'], { execArgv: NODE_ARGS, stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
  children.add(peer);
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
  const metricsPort = 20000 + Math.floor(Math.random() * 20000);
  const agent = spawn(process.execPath, [...NODE_ARGS, join(root, 'bin/periscope'), 'host-agent', '--kvmi-listen', `unix:${dir}/k.sock`, '--cookie-file', join(dir, 'cookie'), '--policy', join(dir, 'policy.json'), '--analysis', address, '--api-listen', `unix:${dir}/api.sock`, '--metrics-listen', `127.0.0.1:${metricsPort}`, '--log-level', 'warn'], { stdio: ['ignore', 'ignore', 'inherit'] });
  children.add(agent);
  await until(() => existsSync(join(dir, 'api.sock')));
  const vm = new sim.SimVm({ vcpus: 1, seed: 2, jitterMs: 0 });
  const qemu = new sim.SimQemu(vm, { path: join(dir, 'k.sock'), key: Buffer.from('bench'), reconnectSeconds: 30 });
  qemu.start();
  await qemu.waitHooked();
  await sleep(1000); // attach sequence + link up
  const cpu = vm.vcpus[0];
  const round = async (bit) => {
    const t0 = process.hrtime.bigint();
    const r = await cpu.writeCr(4, cpu.cpu.sregs.cr4 ^ bit);
    const us = Number(process.hrtime.bigint() - t0) / 1000;
    if (r.events.length !== 1) throw new Error('no CR event');
    return us;
  };
  progress(`B4: ${ROUNDS} ask-central rounds (agent → analysis → agent)`);
  const ask = [];
  const local = [];
  const PGE = 1n << 7n;
  const SMEP = 1n << 20n;
  const s0 = await stall(metricsPort);
  for (let i = 0; i < ROUNDS; i++) ask.push(await round(PGE));
  const s1 = await stall(metricsPort);
  cpu.cpu.sregs.cr4 |= SMEP;
  for (let i = 0; i < ROUNDS; i++) local.push(await round(SMEP)); // denied locally: SMEP stays set
  const s2 = await stall(metricsPort);
  // The agent's own view: event parsed → reply written (periscope_agent_vcpu_stall_seconds), mean per phase.
  const agentStall = { askMeanUs: ((s1.sum - s0.sum) / (s1.count - s0.count)) * 1e6, localMeanUs: ((s2.sum - s1.sum) / (s2.count - s1.count)) * 1e6 };
  const defaults = vm.stats.maxReplyWaitMs;
  progress('B4: raw grpc-js bidi ping-pong to the same peer');
  const raw = await rawPingPong(address, ROUNDS);
  qemu.stop();
  agent.kill('SIGTERM');
  await new Promise((r) => agent.once('exit', r));
  peer.disconnect();
  await new Promise((r) => peer.once('exit', r));
  rmSync(dir, { recursive: true, force: true });
  const a = stats(ask);
  const l = stats(local);
  const f = (x) => x.toFixed(1).padStart(8);
  say(`\nHost agent link benchmark — ${cpus()[0]?.model ?? 'cpu'} × ${cpus().length}, node ${process.version}`);
  say(`\nB4. ask-central stall (guest CR4 write held, verdict from analysis, applied); ${ROUNDS} rounds, first 10% dropped`);
  say('   path                                      p50 µs    p99 µs');
  say(`   ask central (sim → agent → peer → back) ${f(a.p50)}  ${f(a.p99)}   (target p99 ≤ 1000 µs)`);
  say(`   raw grpc-js bidi ping-pong, same peer   ${f(raw.p50)}  ${f(raw.p99)}`);
  say(`   local deny, same agent (no central)     ${f(l.p50)}  ${f(l.p99)}`);
  say(`   agent's own stall (event parsed → reply written), mean: ask central ${agentStall.askMeanUs.toFixed(1)} µs, local deny ${agentStall.localMeanUs.toFixed(1)} µs`);
  say(`   longest vCPU wait seen by the simulator: ${defaults} ms`);
  console.log(JSON.stringify({ bench: 'host-agent-link', rounds: ROUNDS, askCentral: a, rawPingPong: raw, localDeny: l, agentStall, maxReplyWaitMs: defaults }));
}

if (process.argv[2] === '--peer') await peerChild();
else await main();
