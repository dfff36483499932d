/**
 * `periscope sim`: run N simulated VMs (KVM + QEMU + guest) against an introspector's Unix socket.
 * A live one-line status goes to stderr; on exit (SIGINT/SIGTERM, `--run-for`, or the caller's abort
 * signal) every VM is shut down through PREUNHOOK and a JSON summary is printed on stdout.
 */
import { readFile } from 'node:fs/promises';

import { defineSchema, formatDuration, loadConfig } from '@periscope/config';

import { SimError } from './errors.js';
import { Simulator, type SimStats } from './fleet.js';
import { MIN_MEMORY_MIB } from './guest/kernel.js';
import { KvmmemServer } from './kvmmem/server.js';
import { loadHostProfile, DEFAULT_HOST_PROFILE, type HostProfile } from './profile.js';
import { loadScenario } from './scenario/parse.js';
import type { Scenario } from './scenario/types.js';

export const simSchema = defineSchema({
  options: {
    introspector: { kind: 'path', required: true, description: "the introspector's Unix socket path (each VM's QEMU connects to it)" },
    vms: { kind: 'integer', min: 1, max: 65535, default: 1, description: 'number of VMs' },
    vcpus: { kind: 'integer', min: 1, max: 288, default: 1, description: 'vCPUs per VM' },
    seed: { kind: 'integer', min: 0, max: 0xffffffff, default: 1, description: 'seed for vCPU jitter, uuids, tokens and padding noise' },
    'pure-v12': { kind: 'boolean', description: 'behave as an upstream v12 kernel: no GET_MAP_TOKEN / VM_GET_MAX_GFN' },
    handshake: { kind: 'enum', values: ['104', '96'], default: '104', description: 'QEMU handshake struct size: 104 (with max_gpa) or 96 (older QEMU)' },
    'qemu-key-file': { kind: 'path', description: "QEMU's secret (raw file bytes); without it any cookie hash is accepted" },
    'host-profile': { kind: 'path', description: 'host capability profile (JSON): singlestep, descriptorExits, userspaceBpDebug, tscScaling, ...' },
    json: { kind: 'boolean', description: 'status updates as JSON lines on stderr instead of a redrawn line' },
    'jitter-ms': { kind: 'integer', min: 0, max: 1000, default: 2, description: 'largest seeded delay before a vCPU runs a queued command' },
    activity: { kind: 'integer', min: 0, max: 100000, default: 0, description: 'benign workload: kernel routine calls per vCPU per second (0 = idle guests)' },
    'workload-delay': { kind: 'duration', min: 0, default: 0, description: 'start the workload this long after a VM is hooked' },
    'cold-boot': { kind: 'boolean', description: "start the guests before the kernel's boot code (MSRs/XCR0 at reset values); the workload boots them" },
    'memory-mib': { kind: 'integer', min: MIN_MEMORY_MIB, max: 1048576, default: 64, description: 'guest RAM per VM (a sparse file <run dir>/<uuid>.ram)' },
    'run-dir': { kind: 'path', description: 'directory of the RAM files (kept after exit); default: a temporary directory removed at exit' },
    scenario: { kind: 'list', items: 'path', description: 'scenario file (YAML) to run on the chosen VMs; repeatable. Without --run-for, exit when all ran' },
    'kvmmem-listen': { kind: 'path', description: "serve the simulated /dev/kvmmem on this Unix socket (the guest agent's --sim-kvmmem): map tokens checked against these VMs" },
    'kvmmem-abi': { kind: 'enum', values: ['1', '2'], default: '2', description: 'the /dev/kvmmem ABI the simulated module speaks: 1 (KVM_INTRO_MEM_*, per page) or 2 (KVM_GUEST_MEM_*, per region)' },
    'scenario-vms': { kind: 'list', default: ['0'], description: "VM indexes the scenarios run on (comma-separated or repeated), or 'all'" },
    'heki-sink': { kind: 'string', description: "the host agent's Heki sink (unix:PATH): each VM's VMM enables KVM_CAP_HEKI_CONFIGURE/DENIAL and forwards the exits (docs/heki.md)" },
    'scenario-delay': { kind: 'duration', min: 0, default: '1s', description: 'wait after a VM is hooked before its first scenario (the introspector sets up)' },
    'scenario-loop': { kind: 'duration', min: 1, description: 'run the scenarios again this long after each pass, until shutdown (an attack loop, e.g. for `periscope demo`); only the first pass is in the summary' },
    reconnect: { kind: 'duration', min: 1, default: '1s', description: "QEMU's chardev reconnect interval" },
    'unhook-timeout': { kind: 'duration', min: 0, default: '60s', description: 'how long shutdown waits for the tool to close after PREUNHOOK' },
    'status-interval': { kind: 'duration', min: 50, default: '1s', description: 'status line period' },
    'run-for': { kind: 'duration', min: 1, description: 'shut down cleanly after this long (default: until SIGINT/SIGTERM)' },
  },
});

export interface SimCliIo {
  stdout(text: string): void;
  stderr(text: string): void;
  /** Aborting shuts the simulator down as SIGINT would (for embedding and tests). */
  signal?: AbortSignal;
  /** Listen for SIGINT/SIGTERM. Default true. */
  handleSignals?: boolean;
  /** Whether stderr is a terminal (a redrawn status line). Default `process.stderr.isTTY`. */
  isTTY?: boolean;
}

const defaultIo: SimCliIo = {
  stdout: (t) => void process.stdout.write(t),
  stderr: (t) => void process.stderr.write(t),
};

class ExitRequest {
  constructor(readonly code: number) {}
}

function statusLine(s: SimStats, eventsPerSecond: number): string {
  return (
    `sim: ${s.connected}/${s.vms} VMs connected · ${eventsPerSecond.toFixed(0)} events/s · ` +
    `${s.stalledNow} stalled now (${s.stalls} stalls, max wait ${formatDuration(s.maxReplyWaitMs)}) · ` +
    `${s.hardErrors} hard errors · ${s.handshakeFailures} handshake failures`
  );
}

/** Run `periscope sim` with the arguments after the command name; resolves with the exit code. */
export async function runSimCli(argv: readonly string[], io: SimCliIo = defaultIo): Promise<number> {
  let cfg;
  try {
    cfg = loadConfig(simSchema, argv, process.env, {
      command: 'periscope sim',
      summary: 'Run simulated VMs (KVM kernel side of KVMI v12, QEMU, an x86-64 guest with a synthetic Linux-like kernel) against an introspector socket; optionally a benign workload and scenario files.',
      io: { stdout: io.stdout, stderr: io.stderr, exit: (code: number): never => { throw new ExitRequest(code); } },
    });
  } catch (e) {
    if (e instanceof ExitRequest) return e.code;
    throw e;
  }
  const v = cfg.values;

  let key: Uint8Array | undefined;
  let profile: HostProfile = DEFAULT_HOST_PROFILE;
  const scenarios: Scenario[] = [];
  try {
    if (v['qemu-key-file'] !== undefined) {
      try {
        key = await readFile(v['qemu-key-file']);
      } catch (err) {
        throw new SimError('bad-key-file', `--qemu-key-file ${v['qemu-key-file']}: ${(err as Error).message}`, { cause: err });
      }
    }
    if (v['host-profile'] !== undefined) profile = await loadHostProfile(v['host-profile']);
    if (v['heki-sink'] !== undefined && !/^unix:.+/.test(v['heki-sink'])) {
      throw new SimError('invalid-argument', `--heki-sink: expected unix:PATH, got ${JSON.stringify(v['heki-sink'])}`);
    }
    for (const f of v.scenario) scenarios.push(await loadScenario(f));
    if (!v['scenario-vms'].every((x) => x === 'all' || /^\d+$/.test(x))) {
      throw new SimError('invalid-argument', `--scenario-vms: expected VM indexes or 'all', got ${v['scenario-vms'].join(',')}`);
    }
  } catch (err) {
    io.stderr(`periscope sim: ${(err as Error).message}\n`);
    return 2;
  }

  const json = v.json;
  const isTTY = io.isTTY ?? (io === defaultIo && process.stderr.isTTY === true);
  // One line per kind of message (VM names masked); repeats are counted, not printed.
  const seen = new Map<string, number>();
  const log = (line: string): void => {
    const kind = line.replace(/sim-vm-\d+/g, 'sim-vm-*');
    const n = seen.get(kind) ?? 0;
    seen.set(kind, n + 1);
    if (n === 0) io.stderr(`${isTTY ? '\r\x1b[K' : ''}periscope sim: ${line}\n`);
  };
  let sim: Simulator;
  try {
    sim = new Simulator({
    introspector: v.introspector,
    vms: v.vms,
    vcpus: v.vcpus,
    seed: v.seed,
    pureV12: v['pure-v12'],
    handshake: v.handshake === '96' ? 96 : 104,
    ...(key ? { key } : {}),
    profile,
    jitterMs: v['jitter-ms'],
    activity: v.activity,
    workloadDelayMs: v['workload-delay'],
    coldBoot: v['cold-boot'],
    memoryMiB: v['memory-mib'],
    ...(v['run-dir'] !== undefined ? { runDir: v['run-dir'] } : {}),
    ...(v['heki-sink'] !== undefined ? { hekiSink: v['heki-sink'] } : {}),
    ...(scenarios.length > 0
      ? {
          scenarios,
          scenarioVms: v['scenario-vms'].includes('all') ? ('all' as const) : v['scenario-vms'].map(Number),
          scenarioDelayMs: v['scenario-delay'],
          ...(v['scenario-loop'] !== undefined ? { scenarioLoopMs: v['scenario-loop'] } : {}),
        }
      : {}),
    reconnectSeconds: v.reconnect / 1000,
    unhookTimeoutMs: v['unhook-timeout'],
    log,
  });
  } catch (err) {
    if (err instanceof SimError) {
      io.stderr(`periscope sim: ${err.message}\n`);
      return 2;
    }
    throw err;
  }
  try {
    sim.start();
  } catch (err) {
    if (err instanceof SimError) {
      io.stderr(`periscope sim: ${err.message}\n`);
      return 1;
    }
    throw err;
  }

  // The simulated /dev/kvmmem of the introspection VM (issue #10).
  let kvmmem: KvmmemServer | undefined;
  if (v['kvmmem-listen'] !== undefined) {
    kvmmem = new KvmmemServer({ path: v['kvmmem-listen'], vms: () => sim.vms, abi: v['kvmmem-abi'] === '1' ? 1 : 2 });
    try {
      await kvmmem.listen();
    } catch (err) {
      io.stderr(`periscope sim: --kvmmem-listen ${v['kvmmem-listen']}: ${(err as Error).message}\n`);
      await sim.shutdown();
      return 1;
    }
  }

  let lastEvents = 0;
  let lastAt = Date.now();
  const status = setInterval(() => {
    const s = sim.stats();
    const now = Date.now();
    const rate = ((s.eventsSent - lastEvents) * 1000) / Math.max(1, now - lastAt);
    lastEvents = s.eventsSent;
    lastAt = now;
    if (json) io.stderr(`${JSON.stringify({ status: { ...s, eventsPerSecond: Math.round(rate) } })}\n`);
    else io.stderr(isTTY ? `\r\x1b[K${statusLine(s, rate)}` : `${statusLine(s, rate)}\n`);
  }, v['status-interval']);

  let signals = 0;
  let stop!: () => void;
  const stopped = new Promise<void>((resolve) => (stop = resolve));
  const onSignal = (): void => {
    signals++;
    if (signals === 1) {
      io.stderr(`${isTTY ? '\r\x1b[K' : ''}periscope sim: shutting down (PREUNHOOK; again to stop at once)\n`);
      stop();
    } else {
      for (const q of sim.qemus) q.stop();
    }
  };
  const handleSignals = io.handleSignals ?? true;
  if (handleSignals) {
    process.on('SIGINT', onSignal);
    process.on('SIGTERM', onSignal);
  }
  const onAbort = (): void => onSignal();
  io.signal?.addEventListener('abort', onAbort);
  if (io.signal?.aborted) onSignal();
  const runFor = v['run-for'];
  const runTimer = runFor !== undefined ? setTimeout(stop, runFor) : undefined;
  // With scenarios, no --run-for and no --scenario-loop: stop once every scenario ran.
  if (scenarios.length > 0 && runFor === undefined && v['scenario-loop'] === undefined) {
    void sim.scenariosDone().then(
      () => stop(),
      (err: unknown) => {
        io.stderr(`periscope sim: scenarios failed to run: ${(err as Error).message}\n`);
        stop();
      },
    );
  }

  try {
    await stopped;
    await kvmmem?.close();
    clearInterval(status);
    const summary = await sim.shutdown();
    if (isTTY && !json) io.stderr('\r\x1b[K');
    const repeats = [...seen.values()].reduce((a, n) => a + n - 1, 0);
    if (repeats > 0) io.stderr(`periscope sim: ${repeats} similar log lines for other VMs were not shown\n`);
    io.stdout(`${JSON.stringify(summary)}\n`);
    if (summary.internalErrors > 0) return 1;
    return summary.scenarios?.some((r) => !r.passed) ? 3 : 0;
  } finally {
    clearInterval(status);
    if (runTimer) clearTimeout(runTimer);
    io.signal?.removeEventListener('abort', onAbort);
    if (handleSignals) {
      process.off('SIGINT', onSignal);
      process.off('SIGTERM', onSignal);
    }
  }
}
