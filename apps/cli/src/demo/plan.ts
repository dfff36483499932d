/**
 * The demo's fleet as a table of process specs: which `periscope <command>` processes run, with which
 * arguments, sockets and ports, in which order they start and stop. Pure: the supervisor runs the
 * table; tests read it.
 *
 * A part is planned only when its command exists (the CLI's APPS table) and, where it needs a flag of
 * another part, when that flag exists (the simulator's and host agent's schemas), so the demo grows as
 * the services land: today simulators + host agents; with `analysis`, one analysis service that the
 * agents link to and whose HTTP API serves the dashboard; with `guest-agent` (and the simulator's
 * `--kvmmem-listen`), one guest agent per host.
 */
import { join } from 'node:path';

export type Role = 'analysis' | 'host-agent' | 'sim' | 'guest-agent';

/** When a started process counts as ready (its dependants start then). */
export type ReadyCheck =
  | { readonly kind: 'unix-http'; readonly socket: string; readonly path: string }
  | { readonly kind: 'http'; readonly url: string }
  /** A Unix socket file exists (its server listens): e.g. the simulator's /dev/kvmmem the guest agent opens at start. */
  | { readonly kind: 'unix-socket'; readonly path: string }
  | { readonly kind: 'started' };

export interface ProcessSpec {
  /** Unique, e.g. `host-1/agent`. */
  readonly name: string;
  readonly role: Role;
  /** The `periscope` subcommand. */
  readonly command: string;
  readonly args: readonly string[];
  /** 0-based host index, for per-host parts. */
  readonly host?: number;
  readonly ready: ReadyCheck;
  /** How long it may take to become ready (default: the supervisor's). */
  readonly readyTimeoutMs?: number;
  /** Names of processes that must be ready before this one starts. */
  readonly after: readonly string[];
  /** Shutdown order: lower phases get SIGTERM (and their grace period) first. */
  readonly stopPhase: number;
}

export interface HostPlan {
  readonly index: number;
  readonly id: string;
  readonly dir: string;
  readonly kvmiSocket: string;
  readonly apiSocket: string;
  /** `127.0.0.1:PORT` of the agent's /metrics. */
  readonly metrics: string;
  readonly vms: number;
  /** The VM the attack scenarios run on. */
  readonly attackVm: number;
  /** When the first attack starts after the VM is attached (ms). */
  readonly attackDelayMs: number;
}

export interface AnalysisPlan {
  /** gRPC address the agents dial. */
  readonly listen: string;
  /** `127.0.0.1:PORT`: HTTP API, /metrics and the dashboard. */
  readonly http: string;
  readonly dashboardUrl: string;
}

export interface DemoPlan {
  readonly runDir: string;
  readonly cookieFile: string;
  readonly logDir: string;
  readonly hosts: readonly HostPlan[];
  readonly analysis?: AnalysisPlan;
  readonly specs: readonly ProcessSpec[];
  /** Parts left out, and why (shown at start-up). */
  readonly notRunning: readonly { readonly part: string; readonly why: string }[];
}

export interface PlanInput {
  readonly runDir: string;
  readonly hosts: number;
  readonly vms: number;
  readonly vcpus: number;
  /** Benign workload: kernel routine calls per vCPU per second. */
  readonly activity: number;
  /** Scenario files run on a loop on one VM per host. */
  readonly scenarios: readonly string[];
  /** Pause between two passes of the scenarios (ms). */
  readonly attackIntervalMs: number;
  /** Wait after attach before the first pass on host 1; later hosts are staggered over the interval. */
  readonly attackDelayMs: number;
  readonly policy: string;
  /** Fleet policy directory analysis imports (`--policy DIR`); absent = analysis starts with none. */
  readonly analysisPolicyDir?: string;
  readonly seed: number;
  /** `periscope` subcommands that exist (the APPS table). */
  readonly commands: ReadonlySet<string>;
  /** Flags `periscope sim` accepts (its schema). */
  readonly simFlags: ReadonlySet<string>;
  /** Flags `periscope host-agent` accepts (its schema). */
  readonly agentFlags: ReadonlySet<string>;
  /** Free loopback TCP ports, at least `portsNeeded(...)` of them. */
  readonly ports: readonly number[];
}

/** Unix socket paths must fit `sun_path` (108 bytes on Linux); keep a margin. */
export const MAX_SOCKET_PATH = 100;

export function hasAnalysis(commands: ReadonlySet<string>): boolean {
  return commands.has('analysis');
}

export function portsNeeded(hosts: number, commands: ReadonlySet<string>): number {
  return hosts + (hasAnalysis(commands) ? 2 : 0);
}

/**
 * The demo agents' allow-list (`--allow-command`). Breakpoint tracing (`periscope trace`) plants INT3s with
 * VM_WRITE_PHYSICAL. The shipped fleet policies (libs/analysis/policies) answer with `deny` only; a module
 * `response: inject` or `crash` there would need `inject-exception` / `crash` here too, else every agent
 * rejects the pushed policy (docs/alerts.md "Responses"; test/demo.test.ts checks the two agree).
 */
export const DEMO_ALLOW_COMMANDS: readonly string[] = ['write-physical'];

export function planDemo(input: PlanInput): DemoPlan {
  const ports = [...input.ports];
  const port = (): number => {
    const p = ports.shift();
    if (p === undefined) throw new Error('planDemo: not enough ports');
    return p;
  };
  const runDir = input.runDir;
  const cookieFile = join(runDir, 'cookie');
  const logDir = join(runDir, 'logs');
  const specs: ProcessSpec[] = [];
  const notRunning: { part: string; why: string }[] = [];

  let analysis: AnalysisPlan | undefined;
  if (hasAnalysis(input.commands)) {
    const http = `127.0.0.1:${port()}`;
    analysis = { listen: `127.0.0.1:${port()}`, http, dashboardUrl: `http://${http}/` };
    specs.push({
      name: 'analysis',
      role: 'analysis',
      command: 'analysis',
      args: [
        '--db', `pglite:${join(runDir, 'analysis-db')}`, '--listen', analysis.listen, '--http', analysis.http,
        ...(input.analysisPolicyDir ? ['--policy', input.analysisPolicyDir] : []),
      ],
      ready: { kind: 'http', url: `http://${http}/healthz` },
      readyTimeoutMs: 60_000, // migrations on a fresh PGlite directory
      after: [],
      stopPhase: 3,
    });
  } else {
    notRunning.push({ part: 'analysis', why: 'not built yet (issue #8): local verdicts only; no alerts, no dashboard; kernel text is not write-protected, so the text-patch attack lands' });
  }
  const agentLinks = analysis !== undefined && input.agentFlags.has('analysis');
  const guestAgents = analysis !== undefined && input.commands.has('guest-agent') && input.simFlags.has('kvmmem-listen');
  if (!input.commands.has('guest-agent')) notRunning.push({ part: 'guest agent', why: 'not built yet (issue #10): the DMA write to kernel text goes unseen' });
  else if (!guestAgents) notRunning.push({ part: 'guest agent', why: analysis ? 'the simulator has no --kvmmem-listen yet' : 'needs the analysis service' });

  // Heki: each VM's VMM forwards its configure/denial exits to the host agent's sink (issue #11).
  const heki = input.simFlags.has('heki-sink') && input.agentFlags.has('heki-listen');
  const hosts: HostPlan[] = [];
  const stagger = input.hosts > 0 ? Math.floor(input.attackIntervalMs / input.hosts) : 0;
  for (let h = 0; h < input.hosts; h++) {
    const id = `host-${h + 1}`;
    const dir = join(runDir, `h${h + 1}`);
    const host: HostPlan = {
      index: h,
      id,
      dir,
      kvmiSocket: join(dir, 'kvmi.sock'),
      apiSocket: join(dir, 'api.sock'),
      metrics: `127.0.0.1:${port()}`,
      vms: input.vms,
      attackVm: h % input.vms,
      attackDelayMs: input.attackDelayMs + h * stagger,
    };
    hosts.push(host);
    specs.push({
      name: `${id}/agent`,
      role: 'host-agent',
      command: 'host-agent',
      host: h,
      args: [
        '--host-id', id,
        '--kvmi-listen', `unix:${host.kvmiSocket}`,
        '--cookie-file', cookieFile,
        '--api-listen', `unix:${host.apiSocket}`,
        '--metrics-listen', host.metrics,
        '--policy', input.policy,
        // What analysis may do to the demo's guests (`--allow-command`): see DEMO_ALLOW_COMMANDS.
        // Analysis starts at the same time and takes a few seconds: retry at most every second (default 10 s).
        ...(agentLinks && analysis ? ['--analysis', analysis.listen, '--link-backoff-max', '1s', ...DEMO_ALLOW_COMMANDS.flatMap((k) => ['--allow-command', k])] : []),
        ...(heki ? ['--heki-listen', `unix:${join(dir, 'heki.sock')}`] : []),
      ],
      ready: { kind: 'unix-http', socket: host.apiSocket, path: '/v1/vms' },
      // Not after analysis: an agent dials out and links whenever analysis is up (never a start-up dependency).
      after: [],
      stopPhase: 2,
    });
    const kvmmem = join(dir, 'mem.sock');
    specs.push({
      name: `${id}/sim`,
      role: 'sim',
      command: 'sim',
      host: h,
      args: [
        '--introspector', host.kvmiSocket,
        '--qemu-key-file', cookieFile,
        '--vms', String(input.vms),
        '--vcpus', String(input.vcpus),
        '--seed', String(input.seed + 1000 * (h + 1)),
        '--activity', String(input.activity),
        '--run-dir', join(dir, 'ram'),
        '--unhook-timeout', '2s',
        '--status-interval', '5s',
        ...input.scenarios.flatMap((f) => ['--scenario', f]),
        ...(input.scenarios.length > 0
          ? ['--scenario-vms', String(host.attackVm), '--scenario-delay', `${host.attackDelayMs}ms`, '--scenario-loop', `${input.attackIntervalMs}ms`]
          : []),
        ...(guestAgents ? ['--kvmmem-listen', kvmmem] : []),
        ...(heki ? ['--heki-sink', `unix:${join(dir, 'heki.sock')}`] : []),
      ],
      // The guest agent opens the simulated /dev/kvmmem once at start (and exits 1 when it is not there
      // yet), so with a guest agent the simulator is ready when that socket listens.
      ready: guestAgents ? { kind: 'unix-socket', path: kvmmem } : { kind: 'started' },
      after: [`${id}/agent`],
      stopPhase: 1,
    });
    if (guestAgents && analysis) {
      specs.push({
        name: `${id}/guest-agent`,
        role: 'guest-agent',
        command: 'guest-agent',
        host: h,
        args: ['--analysis', analysis.listen, '--host-id', id, '--sim-kvmmem', kvmmem],
        ready: { kind: 'started' },
        after: [`${id}/sim`], // dials analysis and reconnects, like the host agent
        stopPhase: 0,
      });
    }
  }
  return { runDir, cookieFile, logDir, hosts, ...(analysis ? { analysis } : {}), specs, notRunning };
}

/** Unix socket paths of the plan that are too long for `sun_path`. */
export function longSocketPaths(plan: DemoPlan): string[] {
  const paths = plan.hosts.flatMap((h) => [h.kvmiSocket, h.apiSocket, join(h.dir, 'mem.sock'), join(h.dir, 'heki.sock')]);
  return paths.filter((p) => Buffer.byteLength(p) >= MAX_SOCKET_PATH);
}
