/**
 * `periscope demo`: a simulated fleet under attack, as separate processes — per host one simulator
 * (guests with the benign workload, attack scenarios on a loop) and one host agent; the analysis
 * service and guest agents join when their commands exist (see plan.ts). A live summary on the
 * terminal; Ctrl-C / SIGTERM stops every process (SIGTERM, then SIGKILL) and removes the run dir.
 */
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { basename, dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

import { hostAgentSchema } from '@periscope/app-host-agent';
import { defineSchema, formatDuration, loadConfig } from '@periscope/config';
import { shippedScenarioFiles, simSchema } from '@periscope/simulator';
import { DEFAULT_POLICY_PATH, loadPolicyFile, type Policy } from '@periscope/verdicts';
import { SHIPPED_POLICY_DIR } from '@periscope/app-analysis';

import { FleetCollector, ruleInfo, type FleetSnapshot } from './collector.js';
import { MAX_SOCKET_PATH, longSocketPaths, planDemo, portsNeeded, type DemoPlan } from './plan.js';
import { detectionText, palette, renderLine, renderScreen, type ScreenContext } from './render.js';
import { Supervisor, within, type ChildExit } from './supervisor.js';

/** The repository root (this file is apps/cli/{src,dist}/demo/command.{ts,js}). */
export const REPO_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '../../../..');

/** The attack scenarios the demo loops through (shipped with the simulator), blockable ones first. */
export const DEFAULT_ATTACKS = [
  'attack-lstar-hijack',
  'attack-cr4-smep-smap-clear',
  'attack-cr0-wp-text-write',
  'attack-idt-replacement',
  'attack-kernel-text-patch',
  'attack-dma-text-write',
] as const;

export const demoSchema = defineSchema({
  options: {
    hosts: { kind: 'integer', min: 1, max: 32, default: 3, description: 'simulated hosts: one simulator and one host agent each (separate processes)' },
    vms: { kind: 'integer', min: 1, max: 256, default: 4, description: 'VMs per host' },
    vcpus: { kind: 'integer', min: 1, max: 16, default: 2, description: 'vCPUs per VM' },
    activity: { kind: 'integer', min: 0, max: 10000, default: 20, description: 'benign workload: kernel routine calls per vCPU per second' },
    scenario: { kind: 'list', items: 'path', description: `attack scenario (a YAML file, or a shipped name such as attack-lstar-hijack) run on a loop on one VM per host; repeatable. Default: ${DEFAULT_ATTACKS.join(', ')}` },
    'attack-interval': { kind: 'duration', min: 1000, default: '20s', description: 'pause between two passes of the attack scenarios on a VM' },
    'attack-delay': { kind: 'duration', min: 0, default: '2s', description: "first attack this long after host 1's VM attaches (later hosts are staggered over the interval)" },
    policy: { kind: 'path', description: "the host agents' local policy (periscope.verdicts/v1 JSON); default: the shipped default policy" },
    seed: { kind: 'integer', min: 0, max: 1000000, default: 1, description: 'seed of the simulated guests (host N uses seed + 1000·N)' },
    'run-dir': { kind: 'path', description: 'directory for sockets, guest RAM files and logs (created; must be new or empty; Unix socket paths must stay under 100 bytes). Default: a new directory under the temporary directory' },
    'keep-run-dir': { kind: 'boolean', description: 'keep the run directory (logs, RAM files) after exit' },
    duration: { kind: 'duration', min: 1, description: 'stop by itself after this long (default: run until Ctrl-C / SIGTERM)' },
    json: { kind: 'boolean', description: 'print one JSON object per line (plan, a summary per second, stopped) instead of the live summary' },
  },
});

const SUMMARY = `Run a simulated fleet under attack, and Periscope stopping it. Every part is a separate process: per host one simulator (KVM + QEMU + guests running a benign workload, with attack scenarios on a loop), one host agent answering the guests' vCPU events from its local policy, and one guest agent; one analysis service turns detections into alerts and serves the dashboard and the HTTP API the operator commands use (\`periscope alerts --server <dashboard host:port>\`). The terminal shows hosts and VMs attached, events/s, verdicts by tier, detections and alerts by severity and the dashboard URL, refreshed every second (one line per second when stdout is not a terminal). Ctrl-C stops every process within 10 s and removes the run directory.

Examples:
  periscope demo                          3 hosts × 4 VMs until Ctrl-C (what \`npm start\` runs)
  periscope demo --hosts 1 --vms 2        a small fleet
  periscope demo --duration 60s --json    one minute, machine-readable, then exit
  periscope demo --scenario attack-idt-replacement --attack-interval 5s
  periscope demo --keep-run-dir           keep the logs: <run dir>/logs/host-1.agent.log, …

Exit status: 0 after a clean stop; 1 when a process died unexpectedly (its last output is shown); 2 on a usage error.`;

export interface DemoIo {
  stdout(text: string): void;
  stderr(text: string): void;
  /** Whether stdout is a terminal (redrawn summary, colours). */
  isTTY: boolean;
  columns?: number;
  /** Aborting stops the demo as SIGINT would. */
  signal?: AbortSignal;
  /** Listen for SIGINT/SIGTERM. Default true. */
  handleSignals?: boolean;
}

export interface DemoOptions {
  /** `periscope` subcommands that exist (the CLI's APPS table): parts whose command is missing are left out. */
  readonly commands: ReadonlySet<string>;
  /** The `bin/periscope` the children run. Default: the repository's. */
  readonly bin?: string;
  readonly io?: DemoIo;
}

class ExitRequest {
  constructor(readonly code: number) {}
}

function defaultIo(): DemoIo {
  return {
    stdout: (t) => void process.stdout.write(t),
    stderr: (t) => void process.stderr.write(t),
    isTTY: process.stdout.isTTY === true,
    ...(process.stdout.columns ? { columns: process.stdout.columns } : {}),
  };
}

/** Loopback TCP ports that were free a moment ago (all held open together, so they are distinct). */
export async function freePorts(n: number): Promise<number[]> {
  const servers = await Promise.all(
    Array.from({ length: n }, () => new Promise<import('node:net').Server>((res, rej) => {
      const s = createServer();
      s.once('error', rej);
      s.listen(0, '127.0.0.1', () => res(s));
    })),
  );
  const ports = servers.map((s) => (s.address() as import('node:net').AddressInfo).port);
  await Promise.all(servers.map((s) => new Promise<void>((r) => s.close(() => r()))));
  return ports;
}

/**
 * Scenario arguments: a shipped name (with or without `.yaml`) or a path. None: the default attacks,
 * plus any shipped Heki attack (`attack-heki*`, issue #11) once it exists.
 */
export function resolveScenarios(args: readonly string[]): string[] {
  const shipped = shippedScenarioFiles();
  const heki = shipped.map((f) => basename(f, '.yaml')).filter((n) => n.startsWith('attack-heki'));
  const names = args.length > 0 ? args : [...DEFAULT_ATTACKS, ...heki];
  return names.map((a) => {
    const byName = shipped.find((f) => basename(f, '.yaml') === a || basename(f) === a);
    if (byName) return byName;
    if (existsSync(a)) return resolve(a);
    throw new Error(`--scenario ${a}: no such file, and not a shipped scenario (${shipped.map((f) => basename(f, '.yaml')).join(', ')})`);
  });
}

/** A new run directory: the one asked for (must be absent or empty), else a short one under the temp dir. */
function makeRunDir(asked: string | undefined): string {
  if (asked !== undefined) {
    const dir = resolve(asked);
    if (existsSync(dir) && (!statSync(dir).isDirectory() || readdirSync(dir).length > 0)) throw new Error(`--run-dir ${dir}: exists and is not an empty directory`);
    mkdirSync(dir, { recursive: true });
    return dir;
  }
  // sun_path is 108 bytes: prefer the temp dir, fall back to /tmp when its path is long.
  const base = Buffer.byteLength(tmpdir()) <= 40 ? tmpdir() : '/tmp';
  return mkdtempSync(join(base, 'psd-'));
}

function fitWidth(line: string, columns: number | undefined): string {
  if (columns === undefined || columns <= 0) return line;
  // Count visible characters only (SGR sequences have no width).
  let visible = 0;
  let out = '';
  for (let i = 0; i < line.length; i++) {
    if (line[i] === '\x1b') {
      const end = line.indexOf('m', i);
      if (end > 0) {
        out += line.slice(i, end + 1);
        i = end;
        continue;
      }
    }
    if (visible >= columns - 1) {
      out += '\x1b[0m';
      break;
    }
    out += line[i];
    visible++;
  }
  return out;
}

/** Run `periscope demo` with the arguments after the command name; resolves with the exit code. */
export async function runDemo(argv: readonly string[], opts: DemoOptions): Promise<number> {
  const io = opts.io ?? defaultIo();
  let cfg;
  try {
    cfg = loadConfig(demoSchema, argv, process.env, {
      command: 'periscope demo',
      summary: SUMMARY,
      io: { stdout: io.stdout, stderr: io.stderr, exit: (code: number): never => { throw new ExitRequest(code); } },
    });
  } catch (e) {
    if (e instanceof ExitRequest) return e.code;
    throw e;
  }
  const v = cfg.values;
  const json = v.json;
  const tty = io.isTTY && !json;
  const p = palette(tty);

  let policy: Policy;
  let scenarios: string[];
  const policyPath = resolve(v.policy ?? DEFAULT_POLICY_PATH);
  try {
    policy = loadPolicyFile(policyPath);
    scenarios = resolveScenarios(v.scenario);
  } catch (e) {
    io.stderr(`periscope demo: ${(e as Error).message}\n`);
    return 2;
  }

  let runDir: string;
  try {
    runDir = makeRunDir(v['run-dir']);
  } catch (e) {
    io.stderr(`periscope demo: ${(e as Error).message}\n`);
    return 2;
  }
  const removeRunDir = (): boolean => {
    if (v['keep-run-dir']) return false;
    rmSync(runDir, { recursive: true, force: true });
    return true;
  };

  let plan: DemoPlan;
  try {
    plan = planDemo({
      runDir,
      hosts: v.hosts,
      vms: v.vms,
      vcpus: v.vcpus,
      activity: v.activity,
      scenarios,
      attackIntervalMs: v['attack-interval'],
      attackDelayMs: v['attack-delay'],
      policy: policyPath,
      analysisPolicyDir: SHIPPED_POLICY_DIR,
      seed: v.seed,
      commands: opts.commands,
      simFlags: new Set(Object.keys(simSchema.options)),
      agentFlags: new Set(Object.keys(hostAgentSchema.options)),
      ports: await freePorts(portsNeeded(v.hosts, opts.commands)),
    });
    const long = longSocketPaths(plan);
    if (long.length > 0) throw new Error(`Unix socket paths must stay under ${MAX_SOCKET_PATH} bytes; choose a shorter --run-dir (e.g. /tmp/psd): ${long[0]}`);
    mkdirSync(plan.logDir, { recursive: true });
    for (const h of plan.hosts) mkdirSync(h.dir, { recursive: true });
    writeFileSync(plan.cookieFile, randomBytes(32).toString('hex'), { mode: 0o600 });
  } catch (e) {
    removeRunDir();
    io.stderr(`periscope demo: ${(e as Error).message}\n`);
    return 2;
  }

  const attackNames = scenarios.map((f) => basename(f, '.yaml').replace(/^attack-/, ''));
  const ctx: ScreenContext = {
    hosts: v.hosts,
    vms: v.vms,
    runDir,
    logDir: plan.logDir,
    scenarios: attackNames,
    attackIntervalMs: v['attack-interval'],
    notRunning: plan.notRunning,
  };

  // ---- stop requests: signal, --duration, a process that died, a start-up failure ----------------
  let stopReason: string | undefined;
  let requestStop!: (reason: string) => void;
  const stopRequested = new Promise<string>((res) => {
    requestStop = (reason) => {
      if (stopReason !== undefined) return;
      stopReason = reason;
      res(reason);
    };
  });
  const supervisor = new Supervisor({
    bin: opts.bin ?? join(REPO_ROOT, 'bin/periscope'),
    logDir: plan.logDir,
    guard: join(REPO_ROOT, 'apps/cli/dist/demo/orphan-guard.js'),
    onUnexpectedExit: (exit: ChildExit) => requestStop(`${exit.name} exited`),
  });
  // A second signal kills at once; one within a second of the first is the same Ctrl-C delivered twice
  // (the terminal signals the whole foreground group, and `npm start` also forwards it).
  let firstSignalAt: number | undefined;
  const onSignal = (sig: string): void => {
    if (firstSignalAt === undefined) {
      firstSignalAt = Date.now();
      requestStop(sig);
    } else if (Date.now() - firstSignalAt > 1000) supervisor.killAll();
  };
  const onInt = (): void => onSignal('SIGINT');
  const onTerm = (): void => onSignal('SIGTERM');
  const handleSignals = io.handleSignals ?? true;
  if (handleSignals) {
    process.on('SIGINT', onInt);
    process.on('SIGTERM', onTerm);
  }
  const onAbort = (): void => onSignal('abort');
  io.signal?.addEventListener('abort', onAbort);
  if (io.signal?.aborted) onAbort();
  const durationTimer = v.duration !== undefined ? setTimeout(() => requestStop('duration'), v.duration) : undefined;

  const out = (line: string): void => io.stdout(`${line}\n`);
  if (json) {
    out(JSON.stringify({
      type: 'plan',
      runDir,
      hosts: plan.hosts.map((h) => ({ id: h.id, vms: h.vms, api: h.apiSocket, metrics: h.metrics, attackVm: h.attackVm })),
      processes: plan.specs.map((s) => ({ name: s.name, command: s.command, args: s.args })),
      scenarios,
      ...(plan.analysis ? { dashboard: plan.analysis.dashboardUrl } : {}),
      notRunning: plan.notRunning,
    }));
  } else {
    out(`${p.bold('periscope demo')}: starting ${plan.specs.length} processes (${plan.specs.map((s) => s.name).join(', ')}) in ${runDir}`);
    if (plan.analysis) out(`${p.bold('dashboard')}: ${p.cyan(plan.analysis.dashboardUrl)}`);
  }

  const started = Date.now();
  const startup = supervisor.start(plan.specs).catch((e: unknown) => requestStop(`start-up failed: ${(e as Error).message}`));
  const collector = new FleetCollector(plan, ruleInfo(policy), started);

  // ---- the live summary ---------------------------------------------------------------------------
  let drawn = 0;
  let firstShown = false;
  let firstAlertShown = false;
  let lastSnapshot: FleetSnapshot | undefined;
  const draw = (s: FleetSnapshot, stopping = false): void => {
    if (json) {
      out(JSON.stringify({ type: 'summary', ...s, processes: supervisor.list() }));
      return;
    }
    if (tty) {
      const lines = renderScreen(s, { ...ctx, stopping }, true).map((l) => fitWidth(l, io.columns));
      io.stdout(`${drawn > 0 ? `\x1b[${drawn}F` : '\x1b[?25l'}\x1b[J${lines.join('\n')}\n`);
      drawn = lines.length;
      return;
    }
    if (s.firstDetection && !firstShown) {
      firstShown = true;
      out(`first detection ${(s.firstDetection.afterMs / 1000).toFixed(1)} s after start: ${detectionText(s.firstDetection)}`);
    }
    if (s.firstAlert && !firstAlertShown) {
      firstAlertShown = true;
      out(`first alert ${(s.firstAlert.afterMs / 1000).toFixed(1)} s after start: ${s.firstAlert.host} ${s.firstAlert.rule}, ${s.firstAlert.severity}: ${s.firstAlert.title}`);
    }
    for (const d of s.fresh) out(`detection: ${detectionText(d)}${d.count > 1 ? ` ×${d.count}` : ''}`);
    out(renderLine(s));
  };

  let ticking = true;
  const ticker = (async () => {
    while (ticking) {
      const tickStart = Date.now();
      const s = await collector.poll();
      if (!ticking) break;
      lastSnapshot = s;
      draw(s);
      await within(stopRequested, Math.max(50, 1000 - (Date.now() - tickStart)));
    }
  })();

  const reason = await stopRequested;
  ticking = false;
  await ticker;
  if (durationTimer) clearTimeout(durationTimer);
  if (!json) {
    if (tty && lastSnapshot) {
      draw(lastSnapshot, true);
      io.stdout('\x1b[?25h');
    }
    out(`${p.bold('periscope demo')}: stopping (${reason}): ${plan.specs.length} processes…`);
  }
  const stopAt = Date.now();
  await supervisor.stop();
  await startup;
  const failures = supervisor.failures();
  const pids = supervisor.list().map((c) => c.pid).filter((x): x is number => x !== undefined);
  const alive = pids.filter((pid) => {
    try {
      process.kill(pid, 0);
      return true;
    } catch {
      return false;
    }
  });
  let removed = false;
  try {
    removed = removeRunDir();
  } catch (e) {
    io.stderr(`periscope demo: could not remove ${runDir}: ${(e as Error).message}\n`);
  }
  for (const f of failures) {
    io.stderr(`periscope demo: ${f.name} (pid ${f.pid ?? '-'}) exited unexpectedly: ${f.signal ? `signal ${f.signal}` : `exit code ${f.code}`}; its last output:\n`);
    for (const l of f.lastLines) io.stderr(`  | ${l}\n`);
  }
  const startFailed = reason.startsWith('start-up failed');
  if (startFailed && failures.length === 0) io.stderr(`periscope demo: ${reason}\n`);
  if (alive.length > 0) io.stderr(`periscope demo: processes still running after SIGKILL: ${alive.join(', ')}\n`);
  const stoppedIn = Date.now() - stopAt;
  if (json) {
    out(JSON.stringify({ type: 'stopped', reason, stoppedInMs: stoppedIn, pids, alive, exits: supervisor.exits(), runDirRemoved: removed, failures }));
  } else {
    out(`${p.bold('periscope demo')}: stopped in ${formatDuration(stoppedIn)}; ${removed ? `removed ${runDir}` : `kept ${runDir} (logs in ${plan.logDir})`}`);
  }
  if (handleSignals) {
    process.off('SIGINT', onInt);
    process.off('SIGTERM', onTerm);
  }
  io.signal?.removeEventListener('abort', onAbort);
  return failures.length > 0 || startFailed || alive.length > 0 ? 1 : 0;
}
