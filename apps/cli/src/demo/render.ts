/**
 * The demo's terminal output: a redrawn block on a terminal (colours), one line per tick otherwise,
 * or JSON lines (`--json`).
 */
import type { Severity } from '@periscope/verdicts';
import { SEVERITY_ORDER, type Detection, type FleetSnapshot } from './collector.js';

export interface ScreenContext {
  readonly hosts: number;
  readonly vms: number;
  readonly runDir: string;
  readonly logDir: string;
  readonly scenarios: readonly string[];
  readonly attackIntervalMs: number;
  readonly notRunning: readonly { readonly part: string; readonly why: string }[];
  readonly stopping?: boolean;
}

type Paint = (text: string) => string;
interface Palette {
  bold: Paint;
  dim: Paint;
  red: Paint;
  yellow: Paint;
  green: Paint;
  cyan: Paint;
  magenta: Paint;
}

const sgr = (code: string): Paint => (t) => `\x1b[${code}m${t}\x1b[0m`;
const COLOURS: Palette = { bold: sgr('1'), dim: sgr('2'), red: sgr('31'), yellow: sgr('33'), green: sgr('32'), cyan: sgr('36'), magenta: sgr('35') };
const id: Paint = (t) => t;
const PLAIN: Palette = { bold: id, dim: id, red: id, yellow: id, green: id, cyan: id, magenta: id };

export function palette(colour: boolean): Palette {
  return colour ? COLOURS : PLAIN;
}

const num = (n: number): string => Math.round(n).toLocaleString('en-US');

export function clock(ms: number): string {
  const s = Math.floor(ms / 1000);
  const h = Math.floor(s / 3600);
  const mm = String(Math.floor((s % 3600) / 60)).padStart(2, '0');
  const ss = String(s % 60).padStart(2, '0');
  return h > 0 ? `${h}:${mm}:${ss}` : `${mm}:${ss}`;
}

function timeOfDay(ms: number): string {
  return new Date(ms).toTimeString().slice(0, 8);
}

function severityPaint(p: Palette, s: Severity): Paint {
  return s === 'critical' ? (t) => p.bold(p.red(t)) : s === 'high' ? p.red : s === 'medium' ? p.yellow : p.dim;
}

export function detectionText(d: Detection | NonNullable<FleetSnapshot['firstDetection']>, p: Palette = PLAIN): string {
  const verb = d.action === 'allow' ? 'reported' : `blocked (${d.action})`;
  return `${d.host} ${d.rule} ${verb}, ${severityPaint(p, d.severity)(d.severity)}`;
}

/** The redrawn block (a terminal). */
export function renderScreen(s: FleetSnapshot, ctx: ScreenContext, colour: boolean): string[] {
  const p = palette(colour);
  const label = (t: string): string => p.bold(t.padEnd(12));
  const lines: string[] = [];
  lines.push(
    `${p.bold(p.cyan('Periscope demo'))} · ${ctx.hosts} hosts × ${ctx.vms} VMs · up ${clock(s.uptimeMs)} · ` +
      (ctx.stopping ? p.yellow('stopping…') : p.dim('Ctrl-C stops everything and removes the run dir')),
  );
  const upOk = s.hostsUp === s.hosts.length && s.vmsAttached === s.vmsExpected;
  lines.push(
    `${label('fleet')}${(upOk ? p.green : p.yellow)(`${s.hostsUp}/${s.hosts.length} host agents · ${s.vmsAttached}/${s.vmsExpected} VMs attached`)}` +
      ` (${s.vmsProtected} protected) · ${p.bold(num(s.eventsPerSecond))} events/s` +
      (s.stallMeanUs !== null ? ` · vCPU stall mean ${num(s.stallMeanUs)} µs` : ''),
  );
  const t = s.verdictsByTier;
  const acts = Object.entries(s.verdictsByAction)
    .sort((a, b) => b[1] - a[1])
    .map(([a, n]) => `${a} ${num(n)}`)
    .join(' · ');
  lines.push(`${label('verdicts')}local rule ${num(t.local)} · policy default ${num(t.default)} · ask-central ${num(t.central)}${s.analysis ? '' : p.dim(' (answered by its default: no analysis)')}`);
  lines.push(`${' '.repeat(12)}${p.dim(acts === '' ? 'none yet' : acts)}`);
  const sev = SEVERITY_ORDER.map((x) => {
    const n = s.detectionsBySeverity[x];
    return n > 0 ? severityPaint(p, x)(`${x} ${num(n)}`) : p.dim(`${x} 0`);
  }).join(' · ');
  lines.push(`${label('detections')}${sev} — ${p.bold(p.green(`${num(s.blocked)} blocked`))}${s.reported > 0 ? `, ${num(s.reported)} reported` : ''}`);
  if (s.firstDetection) {
    lines.push(`${' '.repeat(12)}${p.dim(`first ${(s.firstDetection.afterMs / 1000).toFixed(1)} s after start: `)}${detectionText(s.firstDetection, p)}`);
  }
  if (s.heki) lines.push(`${label('heki')}${num(s.heki.vms)} VMs registered · ${num(s.heki.configureExits)} configure exits · ${num(s.heki.denials)} denials`);
  for (const h of s.hosts) {
    const text = (h.agentUp ? `${h.vmsAttached}/${h.vmsExpected} VMs` : 'agent down').padEnd(10);
    const state = (h.agentUp ? (h.vmsAttached === h.vmsExpected ? p.green : p.yellow) : p.red)(text);
    lines.push(`  ${h.id.padEnd(9)}${state} ${num(h.eventsPerSecond).padStart(6)} ev/s  ${num(h.blocked).padStart(5)} blocked`);
  }
  if (s.recent.length === 0) lines.push(`${label('latest')}${p.dim(s.hostsUp === 0 ? 'starting…' : 'no detection yet — the first attack runs a few seconds after the VMs attach')}`);
  for (const [i, d] of s.recent.entries()) {
    lines.push(`${i === 0 ? label('latest') : ' '.repeat(12)}${p.dim(timeOfDay(d.at))} ${detectionText(d, p)}${d.count > 1 ? ` ×${d.count}` : ''}`);
  }
  if (s.analysis) {
    const a = s.analysis;
    const alerts = a.alertsBySeverity
      ? SEVERITY_ORDER.map((x) => `${x} ${num(a.alertsBySeverity?.[x] ?? 0)}`).join(' · ')
      : 'none yet';
    lines.push(`${label('alerts')}${a.up ? alerts : p.yellow('analysis not answering')}${a.agents !== undefined ? p.dim(` (analysis: ${a.agents} agents linked, ${a.vms ?? 0} VMs)`) : ''}`);
    if (s.firstAlert) lines.push(`${' '.repeat(12)}${p.dim(`first ${(s.firstAlert.afterMs / 1000).toFixed(1)} s after start: `)}${s.firstAlert.host} ${s.firstAlert.rule}, ${severityPaint(p, s.firstAlert.severity as Severity)(s.firstAlert.severity)}`);
    lines.push(`${label('dashboard')}${p.bold(p.cyan(a.url))}`);
  }
  lines.push(`${label('attacks')}${p.dim(`on one VM per host, every ${Math.round(ctx.attackIntervalMs / 1000)} s: ${ctx.scenarios.join(', ')}`)}`);
  for (const n of ctx.notRunning) lines.push(`${label('not running')}${p.dim(`${n.part}: ${n.why}`)}`);
  lines.push(`${label('run dir')}${p.dim(`${ctx.runDir} (logs in ${ctx.logDir})`)}`);
  return lines;
}

function alertsLine(by: Readonly<Record<string, number>>): string {
  const parts = SEVERITY_ORDER.filter((x) => (by[x] ?? 0) > 0).map((x) => `${x} ${by[x]}`);
  return parts.length > 0 ? parts.join(' ') : 'none';
}

/** One line per tick (not a terminal). */
export function renderLine(s: FleetSnapshot): string {
  const t = s.verdictsByTier;
  const sev = SEVERITY_ORDER.filter((x) => s.detectionsBySeverity[x] > 0)
    .map((x) => `${x} ${s.detectionsBySeverity[x]}`)
    .join(' ');
  return (
    `[${clock(s.uptimeMs)}] hosts ${s.hostsUp}/${s.hosts.length} · VMs ${s.vmsAttached}/${s.vmsExpected} · ${Math.round(s.eventsPerSecond)} events/s · ` +
    `verdicts local ${t.local} default ${t.default} central ${t.central} · detections ${sev === '' ? 'none' : sev} · blocked ${s.blocked}` +
    (s.analysis?.alertsBySeverity ? ` · alerts ${alertsLine(s.analysis.alertsBySeverity)}` : '') +
    (s.analysis ? ` · dashboard ${s.analysis.url}` : '')
  );
}
