#!/usr/bin/env node
// The README's first quick-start command, checked end to end: `npm start` on this checkout (CI runs it on
// a clean clone after `npm test`), for --duration, machine-readable. Passes when every host's agent came up,
// every VM attached and was protected, the attacks raised detections and analysis raised alerts, and the
// demo stopped cleanly (exit 0, no process left, run directory removed).
import { spawn } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const args = process.argv.slice(2);
if (args.includes('--help')) {
  console.log('usage: node scripts/demo-smoke.mjs [--duration 45s]\n\nRuns `npm start -- --duration D --json` and checks the demo: hosts up, VMs protected, detections, alerts, clean stop.');
  process.exit(0);
}
const duration = args[args.indexOf('--duration') + 1] && args.includes('--duration') ? args[args.indexOf('--duration') + 1] : '45s';

const child = spawn('npm', ['start', '--', '--duration', duration, '--json'], { cwd: root, stdio: ['ignore', 'pipe', 'inherit'] });
let buf = '';
let plan;
let last;
let stopped;
let best = { vmsProtected: 0, detections: 0, alerts: 0 };
child.stdout.on('data', (chunk) => {
  buf += chunk;
  let i;
  while ((i = buf.indexOf('\n')) >= 0) {
    const line = buf.slice(0, i);
    buf = buf.slice(i + 1);
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
      best = { vmsProtected: Math.max(best.vmsProtected, o.vmsProtected), detections: Math.max(best.detections, detections), alerts: Math.max(best.alerts, alerts) };
      if (Math.round(o.uptimeMs / 1000) % 10 === 0) process.stdout.write(`demo-smoke: ${Math.round(o.uptimeMs / 1000)} s: hosts up ${o.hostsUp}/${o.hosts.length}, VMs protected ${o.vmsProtected}/${o.vmsExpected}, events ${o.eventsTotal}, detections ${detections}\n`);
    }
  }
});
const code = await new Promise((r) => child.on('exit', (c, s) => r(c ?? (s ? 128 : 1))));
const problems = [];
if (code !== 0) problems.push(`npm start exited ${code}`);
if (!plan) problems.push('no plan line');
if (!last) problems.push('no summary line');
if (!stopped) problems.push('no stopped line');
if (last && last.hostsUp !== last.hosts.length) problems.push(`hosts up ${last.hostsUp}/${last.hosts.length}`);
if (last && best.vmsProtected < last.vmsExpected) problems.push(`VMs protected at most ${best.vmsProtected}/${last.vmsExpected}`);
if (best.detections === 0) problems.push('no detection raised by the attack scenarios');
if (last?.analysis && best.alerts === 0) problems.push('analysis raised no alert');
if (stopped && (stopped.alive.length > 0 || !stopped.runDirRemoved)) problems.push(`unclean stop: alive ${stopped.alive.join(',') || 'none'}, run dir removed ${stopped.runDirRemoved}`);
if (problems.length) {
  console.error(`demo-smoke: FAILED: ${problems.join('; ')}`);
  process.exit(1);
}
console.log(`demo-smoke: ok — ${last.hosts.length} hosts, ${best.vmsProtected} VMs protected, ${best.detections} detections, ${best.alerts} alerts; stopped in ${stopped.stoppedInMs} ms`);
