#!/usr/bin/env node
// The README's first quick-start command, checked end to end: `npm start` on this checkout (CI runs it on a
// clean clone, before `npm test`), machine-readable (`--json`). Like a user at a terminal: wait for the first
// alert (bound: 60 s after the demo started), let it run a little longer, then Ctrl-C — SIGINT to the whole
// foreground process group. Passes when every host's agent came up, every VM attached and was protected, the
// attacks raised detections and analysis alerts, the first alert came within the bound, and after Ctrl-C every
// process was gone within 10 s and the run directory removed.
import { spawn } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const args = process.argv.slice(2);
if (args.includes('--help')) {
  console.log(`usage: node scripts/demo-smoke.mjs [--run-after-alert SECONDS]

Runs \`npm start -- --json\`, waits for the first alert (at most 60 s after the demo started), runs on for
--run-after-alert seconds (default 15), sends Ctrl-C (SIGINT to the process group) and checks: hosts up,
VMs protected, detections and alerts raised, every process gone within 10 s, run directory removed.`);
  process.exit(0);
}
const i = args.indexOf('--run-after-alert');
const runAfterAlertS = i >= 0 ? Number(args[i + 1]) : 15;
if (!Number.isFinite(runAfterAlertS) || runAfterAlertS < 0) {
  console.error('demo-smoke: --run-after-alert needs a number of seconds');
  process.exit(2);
}
const FIRST_ALERT_BOUND_MS = 60_000;
const BUILD_AND_START_LIMIT_MS = 10 * 60_000; // npm start on a clean clone builds first

const child = spawn('npm', ['start', '--', '--json'], { cwd: root, stdio: ['ignore', 'pipe', 'inherit'], detached: true });
const ctrlC = () => {
  try {
    process.kill(-child.pid, 'SIGINT');
  } catch {
    /* already gone */
  }
};
let buf = '';
let plan;
let last;
let stopped;
let firstAlertMs;
let interruptedAt;
const best = { vmsProtected: 0, detections: 0, alerts: 0 };
const problems = [];
const hardStop = setTimeout(() => {
  problems.push('the demo never reached its first alert');
  ctrlC();
}, BUILD_AND_START_LIMIT_MS);
child.stdout.on('data', (chunk) => {
  buf += chunk;
  let n;
  while ((n = buf.indexOf('\n')) >= 0) {
    const line = buf.slice(0, n);
    buf = buf.slice(n + 1);
    if (!line.startsWith('{')) {
      process.stdout.write(`demo-smoke: ${line}\n`); // npm / bootstrap output
      continue;
    }
    const o = JSON.parse(line);
    if (o.type === 'plan') plan = o;
    else if (o.type === 'stopped') stopped = o;
    else if (o.type === 'summary') {
      last = o;
      const detections = Object.values(o.detectionsBySeverity ?? {}).reduce((a, b) => a + b, 0);
      const alerts = Object.values(o.analysis?.alertsBySeverity ?? {}).reduce((a, b) => a + b, 0);
      best.vmsProtected = Math.max(best.vmsProtected, o.vmsProtected);
      best.detections = Math.max(best.detections, detections);
      best.alerts = Math.max(best.alerts, alerts);
      const s = Math.round(o.uptimeMs / 1000);
      if (s % 10 === 0) process.stdout.write(`demo-smoke: ${s} s: hosts up ${o.hostsUp}/${o.hosts.length}, VMs protected ${o.vmsProtected}/${o.vmsExpected}, events ${o.eventsTotal}, detections ${detections}, alerts ${alerts}\n`);
      if (o.firstAlert && firstAlertMs === undefined) {
        firstAlertMs = o.firstAlert.afterMs;
        process.stdout.write(`demo-smoke: first alert ${(firstAlertMs / 1000).toFixed(1)} s after start: ${o.firstAlert.rule} (${o.firstAlert.severity})\n`);
        clearTimeout(hardStop);
        setTimeout(() => {
          interruptedAt = Date.now();
          process.stdout.write('demo-smoke: Ctrl-C\n');
          ctrlC();
        }, runAfterAlertS * 1000);
      }
    }
  }
});
const code = await new Promise((r) => child.on('exit', (c, s) => r(c ?? (s === 'SIGINT' ? 130 : 1))));
const stopMs = interruptedAt ? Date.now() - interruptedAt : undefined;
clearTimeout(hardStop);
// npm itself exits 130 after a Ctrl-C (it got the SIGINT too); the demo's own verdict is its `stopped` line.
if (code !== 0 && !(interruptedAt && code === 130)) problems.push(`npm start exited ${code}`);
if (stopped && stopped.failures.length) problems.push(`processes failed: ${stopped.failures.map((f) => f.name).join(', ')}`);
if (!plan) problems.push('no plan line');
if (!last) problems.push('no summary line');
if (!stopped) problems.push('no stopped line');
if (last && last.hostsUp !== last.hosts.length) problems.push(`hosts up ${last.hostsUp}/${last.hosts.length}`);
if (last && best.vmsProtected < last.vmsExpected) problems.push(`VMs protected at most ${best.vmsProtected}/${last.vmsExpected}`);
if (best.detections === 0) problems.push('no detection raised by the attack scenarios');
if (best.alerts === 0) problems.push('analysis raised no alert');
if (firstAlertMs !== undefined && firstAlertMs > FIRST_ALERT_BOUND_MS) problems.push(`first alert after ${firstAlertMs} ms (bound ${FIRST_ALERT_BOUND_MS} ms)`);
if (stopMs !== undefined && stopMs > 10_000) problems.push(`Ctrl-C took ${stopMs} ms (bound 10 s)`);
// Every process the demo started must be gone — checked from outside, not only by the demo's own report.
const alive = (stopped?.pids ?? []).filter((pid) => {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
});
if (alive.length) problems.push(`processes still running after Ctrl-C: ${alive.join(', ')}`);
if (stopped && !stopped.runDirRemoved) problems.push(`run directory ${plan?.runDir} not removed`);
if (problems.length) {
  console.error(`demo-smoke: FAILED: ${problems.join('; ')}`);
  process.exit(1);
}
console.log(`demo-smoke: ok — ${last.hosts.length} hosts, ${best.vmsProtected} VMs protected, ${best.detections} detections, ${best.alerts} alerts, first alert ${(firstAlertMs / 1000).toFixed(1)} s after start; Ctrl-C: ${stopped.pids.length} processes gone in ${stopMs} ms, run directory removed`);
