/**
 * Fault: kill -9 of the analysis service during an event storm **with breakpoint tracing active** — the
 * events a host agent holds for analysis (ask-central) through an analysis kill, with real processes only.
 *
 * A real analysis process (`bin/periscope analysis`, on PostgreSQL or a PGlite directory) and a real host
 * agent process (`bin/periscope host-agent --allow-command write-physical --state-dir …`); simulated VMs
 * (≥ 2 vCPUs, in this process) whose vCPUs loop: a CR0.WP clear (denied locally, one spooled detection
 * each), a call of the traced kernel function `sim_copy_tagged`, an allowed CR4.PGE toggle, another call.
 * A trace of `sim_copy_tagged` is active on every VM, so analysis has pushed ask-central rules (BREAKPOINT,
 * SINGLESTEP, PAUSE held for analysis, deadline `TRACE_DEADLINE_MS`) and every call is a held BREAKPOINT,
 * a step with the other vCPUs paused (held PAUSE events), and a held SINGLESTEP. Analysis is killed with
 * SIGKILL mid-storm, left dead, and started again on the same address and database. Measured and checked:
 *
 * - every vCPU's wait for a reply, by event kind, as the simulated KVM measured it: held events within
 *   their ask-central deadline, local verdicts within the local deadline — each plus the measured
 *   event-loop delay of this process (the simulator) and of the agent process (a preloaded probe), plus
 *   a fixed margin;
 * - while analysis was dead the agent failed the breakpoints open: it wrote the original byte back (seen
 *   in the simulated KVM's VM_WRITE_PHYSICAL commands and the agent's metric) and the guest kept calling
 *   the function — every call returned to its caller with its bytes copied, no #BP reached the guest;
 * - after each restart the trace is re-established from its row: planted again at most once per VM,
 *   never an INT3 written over an INT3 (every write at the traced byte is logged with the byte it
 *   replaced), one active trace row per VM with the original byte unchanged, and hits resume;
 * - every hit is a real call with exactly its arguments and vCPU, and no call is recorded twice;
 * - the detection ledger: each VM's denied CR0.WP clears (the simulator's count — each is one detection
 *   the agent spooled) equals the detections stored for that VM (none lost, none duplicated), the agent's
 *   spool drains and it dropped none.
 */
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import { openDb, TRACE_DEADLINE_MS } from '@periscope/analysis';
import { callTaggedCopy, SimQemu, SimVm, type GuestEventRecord } from '@periscope/simulator';
import { AgentProcess } from './agent-process.js';
import { AnalysisProcess } from './analysis-process.js';
import { LOCAL_DEADLINE_MS } from './analysis-kill.js';
import { CR_PINNING_POLICY } from './attack-fleet.js';
import { freeLoopbackPort } from './private-postgres.js';
import { pollAsync, sleep, waitFor, withTimeout } from './wait.js';

const CR0_WP = 1n << 16n;
const CR4_PGE = 1n << 7n;
const INT3 = 0xcc;
export const TRACED_FUNCTION = 'sim_copy_tagged';
/** Events the tracing rules hold for analysis (deadline TRACE_DEADLINE_MS); every other kind is decided locally. */
const HELD_KINDS = new Set(['BREAKPOINT', 'SINGLESTEP', 'PAUSE']);
/** Scheduling noise beyond the measured event-loop delays (socket hops between three processes). */
export const WAIT_MARGIN_MS = 200;
const HOST_ID = 'reliability-tracing-host';
const PROBE = join(dirname(fileURLToPath(import.meta.url)), '../bin/event-loop-probe.mjs');

export interface AnalysisKillTracingOptions {
  readonly repoRoot: string;
  /** `postgres://…` of a server to create a fresh database on (dropped at the end); undefined: a PGlite directory. */
  readonly postgres?: string;
  readonly kills?: number;
  readonly vms?: number;
  readonly vcpus?: number;
  /** Analysis stays dead this long, ms (default 1000). */
  readonly downMs?: number;
  /** Pause of each vCPU between two guest actions, ms (default 2). */
  readonly pauseMs?: number;
  /** Storm time between a restart's recovery and the next kill, ms (default 1500). */
  readonly upMs?: number;
  readonly onProgress?: (line: string) => void;
  /** Keep the processes' logs here (analysis.log at debug level, agent.log): for diagnosing a failure. */
  readonly logDir?: string;
}

export interface TracingKillRound {
  /** Detections spooled while analysis was dead (denied attacks in that window). */
  readonly detectionsWhileDown: number;
  /** `sim_copy_tagged` calls that started and returned while analysis was dead (the guest kept running). */
  readonly callsWhileDown: number;
  /** The agent's `fail_open_restored` count during the window (breakpoints it answered by restoring the byte). */
  readonly failOpenRestored: number;
  /** The agent's `singlestep_fail_open` count during the window (a step in progress at the kill: singlestep turned off). */
  readonly singlestepFailOpen: number;
  /** Original bytes written back over our INT3 while analysis was dead (the simulated KVM's commands), over all VMs. */
  readonly bytesRestoredWhileDown: number;
  /** VMs whose traced byte was the guest's original when analysis came back (none left with our INT3 unattended). */
  readonly originalAtRestart: number;
  /** Restart → link up, every VM protected, the host's policy active, ms. */
  readonly restoredMs: number;
  /** Restart → the INT3 back on every VM (first plant after the restart, or found still planted), ms. */
  readonly replantedMs: number;
  /** Restart → a new hit stored on every VM, ms. */
  readonly hitsResumedMs: number;
  /** The restarted analysis's own count of re-establish plants (`periscope_analysis_trace_plants_total{reason="re-establish"}`). */
  readonly reestablishPlants: number;
}

export interface WaitFigure {
  readonly kind: string;
  readonly events: number;
  readonly maxMs: number;
  readonly deadlineMs: number;
  readonly boundMs: number;
}

export interface AnalysisKillTracingReport {
  readonly db: 'postgres' | 'pglite';
  readonly rounds: readonly TracingKillRound[];
  /** Per event kind: how many, the longest wait, the deadline and the bound checked. */
  readonly waits: readonly WaitFigure[];
  readonly eventLoopLagMs: { readonly simulator: number; readonly agent: number; readonly analysis: number };
  readonly calls: { readonly total: number; readonly recorded: number; readonly longestMs: number; readonly notCompleted: number; readonly breakpointExceptions: number };
  /**
   * Calls made entirely while analysis was up with the INT3 planted (until 500 ms before a kill), how many of them
   * have no hit, and calls recorded twice (checked only when no held event took its deadline default: `agentAskCentral`).
   */
  readonly coverage: { readonly calls: number; readonly missed: number; readonly twice: number };
  readonly plants: { readonly total: number; readonly intoInt3: number; readonly restores: number };
  readonly ledger: { readonly denied: number; readonly stored: number; readonly alertCountSum: number; readonly perVm: readonly { vm: string; denied: number; stored: number }[] } | undefined;
  readonly agentFailOpen: number;
  readonly agentAskCentral: Readonly<Record<string, number>>;
  readonly benignEvents: number;
  readonly failures: readonly string[];
}

interface ByteWrite {
  readonly atMs: number;
  readonly phase: number;
  readonly before: number;
  readonly value: number;
}

/** One simulated VM, its QEMU, and what this campaign observes of it. */
class TracedVm {
  readonly vm: SimVm;
  readonly qemu: SimQemu;
  readonly gpa: bigint;
  readonly original: number;
  readonly writes: ByteWrite[] = [];
  readonly waits = new Map<string, { n: number; max: number }>();
  denied = 0;
  through = 0;
  benign = 0;

  constructor(index: number, vcpus: number, dir: string, sock: string, phase: () => number) {
    this.vm = new SimVm({ vcpus, seed: 300 + index, apsOnline: true, jitterMs: 0, name: `traced-${index}`, runDir: dir, stallThresholdMs: 2 * TRACE_DEADLINE_MS });
    this.gpa = this.vm.kernel.symbolPhys(TRACED_FUNCTION);
    this.original = this.byte();
    this.vm.on('guest-event', (r: GuestEventRecord) => {
      if (r.waitedMs === undefined) return;
      const w = this.waits.get(r.event) ?? { n: 0, max: 0 };
      w.n++;
      if (r.waitedMs > w.max) w.max = r.waitedMs;
      this.waits.set(r.event, w);
    });
    // Every write at the traced byte, with the byte it replaced (the command is executed right after this event).
    this.vm.on('command', (key, _vcpu, req) => {
      if (key !== 'VM_WRITE_PHYSICAL') return;
      const gpa = req['gpa'] as bigint;
      const data = req['data'] as Uint8Array;
      if (this.gpa < gpa || this.gpa >= gpa + BigInt(data.length)) return;
      this.writes.push({ atMs: performance.now(), phase: phase(), before: this.byte(), value: data[Number(this.gpa - gpa)]! });
    });
    this.qemu = new SimQemu(this.vm, { path: sock, key: Buffer.from('tracing-secret'), reconnectSeconds: 0.1 });
  }

  byte(): number {
    return this.vm.memory.read(this.gpa, 1)![0]!;
  }
}

export async function runAnalysisKillTracing(opts: AnalysisKillTracingOptions): Promise<AnalysisKillTracingReport> {
  const failures: string[] = [];
  const rounds: TracingKillRound[] = [];
  const dir = mkdtempSync(join(tmpdir(), 'aktrace-'));
  const policyDir = join(dir, 'policies');
  const hostDir = join(dir, 'host');
  mkdirSync(policyDir);
  mkdirSync(hostDir);
  writeFileSync(join(policyDir, 'cr.yaml'), CR_PINNING_POLICY);
  writeFileSync(join(hostDir, 'cookie'), 'tracing-secret');
  const agentProbe = join(dir, 'agent-loop.json');
  const analysisProbe = join(dir, 'analysis-loop.json');
  const nVcpus = Math.max(2, opts.vcpus ?? 2);
  let phase = 0; // even: analysis up (0, 2, …), odd: analysis dead
  let db: { url: string; kind: 'postgres' | 'pglite'; drop: () => Promise<void> } | undefined;
  let analysis: AnalysisProcess | undefined;
  let agent: AgentProcess | undefined;
  const vms: TracedVm[] = [];
  const lag = monitorEventLoopDelay({ resolution: 5 });
  let analysisLagMs = 0;
  const lagPoll = setInterval(() => (analysisLagMs = Math.max(analysisLagMs, readProbe(analysisProbe))), 100);
  lagPoll.unref();
  let storm: Storm | undefined;
  let ledger: AnalysisKillTracingReport['ledger'];
  let recorded = 0;
  /** Analysis up and the INT3 planted: every call made in these windows must be recorded. */
  const windows: { from: number; to: number }[] = [];
  const coverage = { calls: 0, missed: 0, twice: 0 };
  let deadlineDefaults = 0;
  let agentMetrics = '';
  let agentLagMs = 0;
  try {
    db = await freshDatabase(opts.postgres, join(dir, 'pglite'));
    const grpc = `127.0.0.1:${await freeLoopbackPort()}`;
    const metricsAddr = `127.0.0.1:${await freeLoopbackPort()}`;
    analysis = new AnalysisProcess({
      repoRoot: opts.repoRoot, db: db.url, listen: grpc, http: `127.0.0.1:${await freeLoopbackPort()}`, policyDir,
      nodeArgs: ['--import', PROBE], env: { PERISCOPE_EVENT_LOOP_PROBE: analysisProbe },
      ...(opts.logDir ? { stderrFile: join(opts.logDir, 'analysis.log'), extraArgs: ['--log-level', 'debug'] } : {}),
    });
    await analysis.start();
    const sock = join(hostDir, 'kvmi.sock');
    agent = new AgentProcess({
      repoRoot: opts.repoRoot, kvmiSocket: sock, cookieFile: join(hostDir, 'cookie'), hostId: HOST_ID, logLevel: 'warn',
      extraArgs: ['--analysis', grpc, '--allow-command', 'write-physical', '--state-dir', join(hostDir, 'state'), '--metrics-listen', metricsAddr, '--link-backoff-max', '500ms'],
      nodeArgs: ['--import', PROBE], env: { PERISCOPE_EVENT_LOOP_PROBE: agentProbe },
      ...(opts.logDir ? { stderrFile: join(opts.logDir, 'agent.log') } : {}),
    });
    await agent.start();
    const a = analysis;
    const ag = agent;
    const metrics = async (): Promise<string> => {
      const r = await fetch(`http://${metricsAddr}/metrics`);
      return r.text();
    };
    for (let i = 0; i < (opts.vms ?? 2); i++) vms.push(new TracedVm(i, nVcpus, hostDir, sock, () => phase));
    for (const v of vms) v.qemu.start();
    if (!(await waitFor(() => vms.every((v) => v.vm.hooked), 30_000))) throw new Error(`VMs did not attach to the host agent: ${ag.stderrTail}`);
    const uuids = vms.map((v) => v.vm.uuidText);
    const restored = async (): Promise<boolean> => {
      try {
        const { vms: live } = await a.get<{ vms: { uuid: string; protection: Record<string, string> }[] }>('/v1/vms?attached=true');
        const { hosts } = await a.get<{ hosts: { hostId: string; policyState: string }[] }>('/v1/hosts?connected=true');
        return uuids.every((u) => live.some((v) => v.uuid === u && v.protection['cr-pinning'] === 'local rules')) && hosts.find((h) => h.hostId === HOST_ID)?.policyState === 'active';
      } catch {
        return false;
      }
    };
    if (!(await pollAsync(restored, 60_000))) throw new Error(`analysis does not show every VM protected: ${a.stderrTail.slice(-600)} | agent: ${ag.stderrTail.slice(-400)}`);
    // Protected on every vCPU: a CR0.WP clear is denied (each denial is a detection: counted in the ledger).
    const deadline = Date.now() + 30_000;
    for (const v of vms) {
      for (const cpu of v.vm.vcpus) {
        while (!(await attack(v, cpu))) {
          if (Date.now() > deadline) throw new Error(`${v.vm.name}: CR0.WP clears still allowed 30 s after attach`);
          await sleep(20);
        }
      }
    }
    // A trace on every VM: the ask-central rules are active on the agent before the INT3 is planted.
    for (const v of vms) {
      const r = await request(a, 'POST', `/v1/vms/${v.vm.uuidText}/traces`, { function: TRACED_FUNCTION, args: 4, by: 'reliability' });
      if (r.status !== 201) throw new Error(`trace start on ${v.vm.name}: HTTP ${r.status} ${JSON.stringify(r.body)}`);
      if (v.byte() !== INT3) throw new Error(`${v.vm.name}: no INT3 at ${TRACED_FUNCTION} after the trace started`);
    }
    lag.enable();
    let upFrom = performance.now();
    storm = new Storm(vms, opts.pauseMs ?? 2);
    const st = storm;
    const lastHit = new Map<string, bigint>();
    const newHits = async (): Promise<boolean> => {
      for (const v of vms) {
        const r = await request(a, 'GET', `/v1/traces/hits?vm=${v.vm.uuidText}&function=${TRACED_FUNCTION}&after=${lastHit.get(v.vm.uuidText) ?? 0n}&limit=1`).catch(() => undefined);
        if (!r || r.status !== 200 || !(r.body['hits'] as unknown[]).length) return false;
      }
      return true;
    };
    const maxHitId = async (uuid: string): Promise<bigint> => {
      let after = lastHit.get(uuid) ?? 0n;
      for (;;) {
        const r = await request(a, 'GET', `/v1/traces/hits?vm=${uuid}&function=${TRACED_FUNCTION}&after=${after}&limit=5000`);
        const hits = r.body['hits'] as { id: string }[];
        if (!hits.length) return after;
        after = BigInt(hits[hits.length - 1]!.id);
      }
    };
    if (!(await pollAsync(newHits, 60_000))) failures.push('before the first kill: no hit on some VM within 60 s');
    await sleep(opts.upMs ?? 1500);
    for (let k = 0; k < (opts.kills ?? 2); k++) {
      const m0 = await metrics();
      const failOpen0 = metricValue(m0, 'periscope_agent_analysis_breakpoints_total', 'fail_open_restored');
      const ssFailOpen0 = metricValue(m0, 'periscope_agent_analysis_breakpoints_total', 'singlestep_fail_open');
      const denied0 = sum(vms, (v) => v.denied);
      const tKill = performance.now();
      windows.push({ from: upFrom, to: tKill - 500 });
      opts.onProgress?.(`kill ${k + 1} at ${new Date().toISOString()}`);
      await a.kill9();
      phase++;
      await sleep(opts.downMs ?? 1000);
      const m1 = await metrics();
      const failOpen = metricValue(m1, 'periscope_agent_analysis_breakpoints_total', 'fail_open_restored') - failOpen0;
      const singlestepFailOpen = metricValue(m1, 'periscope_agent_analysis_breakpoints_total', 'singlestep_fail_open') - ssFailOpen0;
      const tRestart = performance.now();
      const detectionsWhileDown = sum(vms, (v) => v.denied) - denied0;
      const callsWhileDown = sum(vms, (v) => v.vm.taggedCalls.calls.filter((c) => c.startedMs > tKill && c.endedMs < tRestart).length);
      const bytesRestoredWhileDown = sum(vms, (v) => v.writes.filter((w) => w.phase === phase && w.before === INT3 && w.value === v.original).length);
      const originalAtRestart = vms.filter((v) => v.byte() === v.original).length;
      for (const v of vms) lastHit.set(v.vm.uuidText, 0n);
      phase++;
      opts.onProgress?.(`restart ${k + 1} at ${new Date().toISOString()}`);
      await a.start();
      for (const v of vms) lastHit.set(v.vm.uuidText, await maxHitId(v.vm.uuidText).catch(() => 0n));
      const ok = await pollAsync(restored, 30_000);
      const restoredMs = ok ? Math.round(performance.now() - tRestart) : -1;
      if (!ok) failures.push(`kill ${k + 1}: protections not restored within 30 s of the restart; analysis: ${a.stderrTail.slice(-400)}`);
      const replanted = await waitFor(() => vms.every((v) => v.byte() === INT3 || v.writes.some((w) => w.phase === phase && w.value === INT3)), 30_000);
      const replantedMs = replanted ? Math.round(performance.now() - tRestart) : -1;
      upFrom = performance.now();
      if (!replanted) failures.push(`kill ${k + 1}: the INT3 was not re-planted on every VM within 30 s of the restart`);
      const resumed = await pollAsync(newHits, 30_000);
      const hitsResumedMs = resumed ? Math.round(performance.now() - tRestart) : -1;
      if (!resumed) failures.push(`kill ${k + 1}: hits did not resume on every VM within 30 s of the restart`);
      const analysisMetrics = await fetch(`${a.httpBase}/metrics`).then((r) => r.text()).catch(() => '');
      const round: TracingKillRound = {
        detectionsWhileDown, callsWhileDown, failOpenRestored: failOpen, singlestepFailOpen, bytesRestoredWhileDown, originalAtRestart, restoredMs, replantedMs, hitsResumedMs,
        reestablishPlants: metricValue(analysisMetrics, 'periscope_analysis_trace_plants_total', 're-establish'),
      };
      rounds.push(round);
      opts.onProgress?.(`kill ${k + 1}: ${JSON.stringify(round)}`);
      if (round.reestablishPlants > vms.length) failures.push(`kill ${k + 1}: the restarted analysis planted ${round.reestablishPlants} times to re-establish ${vms.length} traces (more than once per VM)`);
      await sleep(opts.upMs ?? 1500);
    }
    windows.push({ from: upFrom, to: performance.now() - 500 });
    await st.stop();
    lag.disable();
    // Spool drained (every detection acknowledged = stored), nothing dropped.
    if (!(await pollAsync(async () => metricValue(await metrics(), 'periscope_agent_spool_detections') === 0, 60_000))) failures.push('detections still in the agent spool 60 s after the storm');
    agentMetrics = await metrics();
    deadlineDefaults = metricValue(agentMetrics, 'periscope_agent_ask_central_total', 'deadline') + metricValue(agentMetrics, 'periscope_agent_ask_central_total', 'hold_limit');
    const dropped = metricValue(agentMetrics, 'periscope_agent_detections_dropped_total');
    if (dropped) failures.push(`the agent dropped ${dropped} detections (spool full)`);
    // Trace rows: one active per VM, the original byte from the first read; then stop: the original byte goes back.
    for (const v of vms) {
      const r = await request(a, 'GET', `/v1/traces?vm=${v.vm.uuidText}`);
      const rows = (r.body['traces'] as Record<string, string>[]).filter((t) => t['function'] === TRACED_FUNCTION);
      if (rows.length !== 1) failures.push(`${v.vm.name}: ${rows.length} active trace rows (want 1)`);
      else if (rows[0]!['originalByte'] !== `0x${v.original.toString(16).padStart(2, '0')}`) failures.push(`${v.vm.name}: the trace row's original byte is ${rows[0]!['originalByte']}, the guest's is 0x${v.original.toString(16)}`);
      const s = await request(a, 'DELETE', `/v1/vms/${v.vm.uuidText}/traces/${TRACED_FUNCTION}?by=reliability`);
      if (s.status !== 200) failures.push(`${v.vm.name}: trace stop: HTTP ${s.status} ${JSON.stringify(s.body)}`);
      if (v.byte() !== v.original) failures.push(`${v.vm.name}: byte 0x${v.byte().toString(16)} after the trace stopped (original 0x${v.original.toString(16)})`);
    }
    // Ground truth of the guest.
    for (const v of vms) {
      failures.push(...st.stalled.filter((x) => x.startsWith(v.vm.name)));
      if (v.through) failures.push(`${v.vm.name}: ${v.through} CR0.WP clears went through`);
      if (v.vm.stats.hardErrors) failures.push(`${v.vm.name}: ${v.vm.stats.hardErrors} hard KVMI errors`);
      if (v.vm.stats.livelocks) failures.push(`${v.vm.name}: ${v.vm.stats.livelocks} livelocks`);
      const bad = v.vm.taggedCalls.calls.filter((c) => c.outcome !== 'completed' || !c.copied);
      if (bad.length) failures.push(`${v.vm.name}: ${bad.length} calls of ${TRACED_FUNCTION} did not complete with their copy (first: ${JSON.stringify(bad[0], big)})`);
      const bp = v.vm.vcpus.reduce((n, c) => n + c.deliveredExceptions.filter((x) => x.vector === 3).length, 0);
      if (bp) failures.push(`${v.vm.name}: ${bp} #BP delivered to the guest`);
      const intoInt3 = v.writes.filter((w) => w.value === INT3 && w.before === INT3).length;
      if (intoInt3) failures.push(`${v.vm.name}: an INT3 was written over an INT3 ${intoInt3} times (planted twice)`);
      const strange = v.writes.filter((w) => w.value !== INT3 && w.value !== v.original);
      if (strange.length) failures.push(`${v.vm.name}: ${strange.length} writes of a byte that is neither the original nor INT3 at ${TRACED_FUNCTION}`);
    }
    for (const r of rounds) {
      // The INT3 planted at the kill: the next call fails open (byte restored); restored for a step in progress: its SINGLESTEP does.
      if (r.failOpenRestored + r.singlestepFailOpen === 0) failures.push('a kill after which the agent failed nothing open (no traced call while analysis was dead?)');
      if (r.originalAtRestart !== vms.length) failures.push(`only ${r.originalAtRestart} of ${vms.length} VMs had the original byte back when analysis restarted (an INT3 left while nobody could step it)`);
      if (r.callsWhileDown === 0) failures.push('no call of the traced function completed while analysis was dead (the guest stopped?)');
      if (r.detectionsWhileDown === 0) failures.push('no detection while analysis was dead (the storm stopped?)');
    }
    const code = await ag.terminate();
    if (code !== 0) failures.push(`the host agent did not exit 0 on SIGTERM (${code}): ${ag.stderrTail.slice(-400)}`);
    if (a.exited) failures.push(`analysis exited (${a.exitCode}) on its own: ${a.stderrTail.slice(-400)}`);
    const ac = await a.terminate();
    if (ac !== 0) failures.push(`analysis did not exit 0 on SIGTERM (${ac}): ${a.stderrTail.slice(-400)}`);
    // The database (after analysis: a PGlite directory has one user at a time).
    const d = await openDb(db.url);
    try {
      const rows = await d.query<{ vm_uuid: string; n: bigint }>('SELECT a.vm_uuid, count(*)::int8 AS n FROM alert_detections d JOIN alerts a ON a.alert_id = d.alert_id GROUP BY a.vm_uuid');
      const sums = await d.query<{ total: bigint | null }>('SELECT sum(count)::int8 AS total FROM alerts');
      const perVm = vms.map((v) => ({ vm: v.vm.name, denied: v.denied, stored: Number(rows.find((r) => r.vm_uuid === v.vm.uuidText)?.n ?? 0n) }));
      ledger = { denied: sum(vms, (v) => v.denied), stored: rows.reduce((n, r) => n + Number(r.n), 0), alertCountSum: Number(sums[0]?.total ?? 0n), perVm };
      for (const p of perVm) if (p.stored !== p.denied) failures.push(`${p.vm}: ${p.denied} detections spooled (denied CR0.WP clears), ${p.stored} stored (${p.stored < p.denied ? 'lost' : 'duplicated or foreign'})`);
      if (ledger.alertCountSum !== ledger.stored) failures.push(`alerts count ${ledger.alertCountSum} detections but ${ledger.stored} are stored`);
      // Hits against the simulator's ground truth: each a real call with exactly its arguments and vCPU, each call once.
      for (const v of vms) {
        const hits = await d.query<{ vcpu: number; args: unknown; session_generation: bigint; event_seq: bigint; hit_ns: bigint }>('SELECT vcpu, args, session_generation, event_seq, hit_ns FROM trace_hits WHERE vm_uuid = $1 AND function = $2 ORDER BY hit_id', [v.vm.uuidText, TRACED_FUNCTION]);
        recorded += hits.length;
        const truth = new Map(v.vm.taggedCalls.calls.map((c) => [hex(c.tag), c]));
        const seen = new Map<string, (typeof hits)[number]>();
        let wrong = 0;
        const twice: string[] = [];
        for (const h of hits) {
          const args = (typeof h.args === 'string' ? JSON.parse(h.args) : h.args) as string[];
          const c = truth.get(args[2]!);
          if (!c || c.vcpu !== h.vcpu || args.join() !== [c.dst, c.src, c.tag, c.len].map(hex).join()) wrong++;
          const first = seen.get(args[2]!);
          if (first) twice.push(`tag ${args[2]} vCPU ${h.vcpu}: session ${first.session_generation} seq ${first.event_seq} at ${new Date(Number(first.hit_ns / 1_000_000n)).toISOString()} and session ${h.session_generation} seq ${h.event_seq} at ${new Date(Number(h.hit_ns / 1_000_000n)).toISOString()}`);
          seen.set(args[2]!, h);
        }
        if (wrong) failures.push(`${v.vm.name}: ${wrong} of ${hits.length} hits match no call (arguments or vCPU)`);
        const inside = v.vm.taggedCalls.calls.filter((c) => windows.some((w) => c.startedMs > w.from && c.endedMs < w.to));
        const missed = inside.filter((c) => !seen.has(hex(c.tag)));
        coverage.calls += inside.length;
        coverage.missed += missed.length;
        coverage.twice += twice.length;
        // Held events answered by the agent's deadline (analysis overloaded) legitimately leave calls untraced — and a
        // re-plant may then race the vCPU's retry of the original instruction (a call hit twice); otherwise neither may happen.
        if (deadlineDefaults === 0) {
          if (missed.length) failures.push(`${v.vm.name}: ${missed.length} of ${inside.length} calls made while analysis was up with the INT3 planted have no hit (first: vCPU ${missed[0]!.vcpu} tag ${hex(missed[0]!.tag)})`);
          if (twice.length) failures.push(`${v.vm.name}: ${twice.length} calls recorded twice (${twice.slice(0, 3).join('; ')})`);
        }
      }
    } finally {
      await d.close();
    }
  } catch (e) {
    failures.push((e as Error).message);
  } finally {
    clearInterval(lagPoll);
    lag.disable();
    analysisLagMs = Math.max(analysisLagMs, readProbe(analysisProbe));
    agentLagMs = readProbe(agentProbe);
    if (agentLagMs < 0 && agent) failures.push("the agent process's event-loop probe reported nothing (the wait bound would leave out its delay)");
    await storm?.stop();
    for (const v of vms) {
      v.qemu.stop();
      v.vm.close();
    }
    if (agent && !agent.exited) await agent.terminate();
    if (analysis && !analysis.exited) await analysis.terminate();
    await db?.drop().catch((e: unknown) => failures.push(`dropping the database: ${(e as Error).message}`));
    rmSync(dir, { recursive: true, force: true });
  }
  // Waits by event kind, against the bound: deadline + the event-loop delays measured in both processes the wait crosses
  // + margin. A held event's fail-open makes one more round trip to KVM before the reply (the byte restored, singlestep
  // off), so the simulator's delay counts twice there.
  const simulatorLag = lag.max / 1e6;
  const agentLag = Math.max(0, agentLagMs);
  const waits: WaitFigure[] = [];
  const kinds = new Set(vms.flatMap((v) => [...v.waits.keys()]));
  for (const kind of [...kinds].sort()) {
    const held = HELD_KINDS.has(kind);
    const deadlineMs = held ? TRACE_DEADLINE_MS : LOCAL_DEADLINE_MS;
    const boundMs = deadlineMs + (held ? 2 : 1) * simulatorLag + agentLag + WAIT_MARGIN_MS;
    const events = sum(vms, (v) => v.waits.get(kind)?.n ?? 0);
    const maxMs = Math.max(0, ...vms.map((v) => v.waits.get(kind)?.max ?? 0));
    waits.push({ kind, events, maxMs, deadlineMs, boundMs: Math.round(boundMs) });
    if (maxMs > boundMs) failures.push(`a vCPU waited ${maxMs} ms for the reply to a ${kind} event (bound ${Math.round(boundMs)} ms: deadline ${deadlineMs} + event-loop delay ${held ? '2 × ' : ''}${simulatorLag.toFixed(0)} (simulator) + ${agentLag.toFixed(0)} (agent) + ${WAIT_MARGIN_MS})`);
  }
  for (const k of HELD_KINDS) if (!kinds.has(k) && vms.length) failures.push(`no ${k} event was raised: the trace did not run`);
  const allCalls = vms.flatMap((v) => [...v.vm.taggedCalls.calls]);
  const ask: Record<string, number> = {};
  for (const o of ['central', 'deadline', 'central_unavailable', 'hold_limit', 'invalid_verdict']) ask[o] = metricValue(agentMetrics, 'periscope_agent_ask_central_total', o);
  return {
    db: db?.kind ?? 'pglite',
    rounds,
    waits,
    eventLoopLagMs: { simulator: round1(simulatorLag), agent: round1(agentLag), analysis: round1(analysisLagMs) },
    calls: {
      total: sum(vms, (v) => v.vm.taggedCalls.total),
      recorded,
      longestMs: round1(Math.max(0, ...allCalls.map((c) => c.endedMs - c.startedMs))),
      notCompleted: allCalls.filter((c) => c.outcome !== 'completed' || !c.copied).length,
      breakpointExceptions: sum(vms, (v) => v.vm.vcpus.reduce((n, c) => n + c.deliveredExceptions.filter((x) => x.vector === 3).length, 0)),
    },
    coverage,
    plants: {
      total: sum(vms, (v) => v.writes.filter((w) => w.value === INT3 && w.before !== INT3).length),
      intoInt3: sum(vms, (v) => v.writes.filter((w) => w.value === INT3 && w.before === INT3).length),
      restores: sum(vms, (v) => v.writes.filter((w) => w.value === v.original && w.before === INT3).length),
    },
    ledger,
    agentFailOpen: metricValue(agentMetrics, 'periscope_agent_analysis_breakpoints_total', 'fail_open_restored'),
    agentAskCentral: ask,
    benignEvents: sum(vms, (v) => v.benign),
    failures,
  };
}

/** Every vCPU of every VM: CR0.WP clear, a traced call, CR4.PGE toggle, a traced call, … */
class Storm {
  private running = true;
  private readonly loops: Promise<void>[] = [];
  readonly stalled: string[] = [];

  constructor(vms: readonly TracedVm[], pauseMs: number) {
    for (const v of vms) {
      for (const cpu of v.vm.vcpus) {
        this.loops.push(
          (async () => {
            let i = 0;
            while (this.running) {
              const step = i++ % 4;
              const what = step === 0 ? 'CR0.WP clear' : step === 2 ? 'CR4.PGE toggle' : `${TRACED_FUNCTION} call`;
              const r =
                step === 0 ? await withTimeout(attack(v, cpu), 10_000)
                : step === 2 ? await withTimeout(cpu.writeCr(4, cpu.cpu.sregs.cr4 ^ CR4_PGE).then(() => void v.benign++), 10_000)
                : await withTimeout(callTaggedCopy(v.vm, cpu, 1 + ((i * 7 + cpu.index) % 64), (i * 13) % 64), 10_000);
              if (r === 'timeout') {
                this.stalled.push(`${v.vm.name} vCPU ${cpu.index}: ${what} not completed within 10 s`);
                return;
              }
              await sleep(pauseMs);
            }
          })(),
        );
      }
    }
  }

  async stop(): Promise<void> {
    this.running = false;
    await Promise.all(this.loops);
  }
}

/** Clear CR0.WP on `cpu`; true when it was denied (one detection), counted on the VM. */
async function attack(v: TracedVm, cpu: SimVm['vcpus'][number]): Promise<boolean> {
  cpu.cpu.sregs.cr0 |= CR0_WP;
  await cpu.writeCr(0, cpu.cpu.sregs.cr0 & ~CR0_WP);
  if ((cpu.cpu.sregs.cr0 & CR0_WP) !== 0n) {
    v.denied++;
    return true;
  }
  return false;
}

/** A fresh database: on the PostgreSQL server at `dsn` (dropped afterwards), or a PGlite directory. */
async function freshDatabase(dsn: string | undefined, pgliteDir: string): Promise<{ url: string; kind: 'postgres' | 'pglite'; drop: () => Promise<void> }> {
  if (!dsn) return { url: `pglite:${pgliteDir}`, kind: 'pglite', drop: async () => undefined };
  const name = `periscope_aktrace_${Date.now().toString(36)}_${process.pid}`;
  const admin = await openDb(dsn);
  try {
    await admin.exec(`CREATE DATABASE ${name}`);
  } finally {
    await admin.close();
  }
  const u = new URL(dsn);
  u.pathname = `/${name}`;
  return {
    url: u.toString(),
    kind: 'postgres',
    drop: async () => {
      const c = await openDb(dsn);
      try {
        await c.exec(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`);
      } finally {
        await c.close();
      }
    },
  };
}

async function request(a: AnalysisProcess, method: string, path: string, body?: unknown): Promise<{ status: number; body: Record<string, unknown> }> {
  const r = await fetch(`${a.httpBase}${path}`, { method, ...(body !== undefined ? { headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) } : {}) });
  const text = await r.text();
  let parsed: Record<string, unknown> = {};
  try {
    parsed = text ? (JSON.parse(text) as Record<string, unknown>) : {};
  } catch {
    parsed = { text };
  }
  return { status: r.status, body: parsed };
}

/** Sum of a metric's samples (those whose labels contain `label`, when given) in Prometheus text. */
export function metricValue(text: string, name: string, label?: string): number {
  let total = 0;
  for (const line of text.split('\n')) {
    if (!line.startsWith(name)) continue;
    const rest = line.slice(name.length);
    if (rest[0] !== ' ' && rest[0] !== '{') continue;
    if (label !== undefined && !rest.includes(`"${label}"`)) continue;
    const v = Number(line.slice(line.lastIndexOf(' ') + 1));
    if (Number.isFinite(v)) total += v;
  }
  return total;
}

/** The largest event-loop delay a probed process reported, ms (-1 before it wrote anything). */
function readProbe(file: string): number {
  try {
    return (JSON.parse(readFileSync(file, 'utf8')) as { maxMs: number }).maxMs;
  } catch {
    return -1;
  }
}

const sum = <T>(xs: readonly T[], f: (x: T) => number): number => xs.reduce((n, x) => n + f(x), 0);
const hex = (v: bigint): string => `0x${v.toString(16)}`;
const round1 = (x: number): number => Math.round(x * 10) / 10;
const big = (_k: string, v: unknown): unknown => (typeof v === 'bigint' ? v.toString() : v);
