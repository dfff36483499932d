/**
 * API tracing with breakpoints — the DRAKVUF technique through KVMI commands (docs/tracing.md).
 *
 * `trace-start VM FUNCTION`: the function's address comes from the guest OS profile and the VM's derived
 * KASLR slide; the byte there is read once (and kept in the database), the local policy of the VM's host
 * gets ask-central rules for BREAKPOINT, SINGLESTEP and PAUSE events (deadline `TRACE_DEADLINE_MS`), and once
 * the agent has them active an INT3 (0xCC) is planted with VM_WRITE_PHYSICAL.
 *
 * A hit (a held BREAKPOINT at a planted address) is recorded with the SysV argument registers of the event
 * (rdi, rsi, rdx, rcx, r8, r9), then stepped over, one vCPU at a time per VM:
 *   1. every other vCPU paused (VM_PAUSE_VCPU wait=1: out of guest mode when it returns; their PAUSE events
 *      are held and answered at the end) and singlestep enabled on the hitting vCPU, then the original byte
 *      written back;
 *   2. verdict RETRY (CONTINUE would inject #BP): the vCPU executes the original instruction;
 *   3. on its SINGLESTEP event: INT3 re-planted, singlestep disabled, verdict CONTINUE, the other vCPUs
 *      resumed. While the byte is restored no other vCPU runs, so no call is missed.
 * Hits of other vCPUs that arrive meanwhile wait (held) and are stepped in turn.
 *
 * Fail open: the agent restores the byte itself when analysis cannot answer in time (link down, deadline),
 * and a verdict record of a BREAKPOINT answered by default makes analysis check and re-plant. The trace rows
 * (migration 3, tracing-store.ts) let any replica re-establish a trace when the VM's agent connects to it:
 * the byte found is compared with the stored original — 0xCC means still planted (never planted twice), the
 * original means plant again, anything else means the code changed and the trace is marked failed.
 */
import { CommandStatus, VerdictTier, type KvmiEvent } from '@periscope/contracts';
import type { Rule } from '@periscope/verdicts';
import { sendVerdict, type HeldEvent } from './central-verdicts.js';
import { AnalysisError } from './errors.js';
import { hex } from './evidence.js';
import { deriveFacts } from './kci.js';
import { CommandError, type AgentSession, type CommandBody, type LiveVm } from './link.js';
import type { PlantedByte } from './memory/integrity.js';
import type { Registry } from './metrics.js';
import type { JsonObject, VmOperations } from './operations.js';
import type { GuestOsProfile, KernelFacts, ProfileRegistry } from './profiles.js';
import { nowNs } from './schema.js';
import type { Store } from './store.js';
import { TraceStore, type TraceHit, type TraceRow } from './tracing-store.js';

/** Ask-central deadline of the tracing rules: how long a vCPU may wait for a step at most. */
export const TRACE_DEADLINE_MS = 1000;
/** SysV argument registers, in order. */
export const SYSV_ARGS = ['rdi', 'rsi', 'rdx', 'rcx', 'r8', 'r9'] as const;
export const DEFAULT_TRACE_ARGS = SYSV_ARGS.length;
const INT3 = 0xcc;
/** Give up waiting for the stepping vCPU's SINGLESTEP after this long (the agent failed it open). */
const STEP_TIMEOUT_MS = 3000;
/** A held event this close to its deadline is left to the agent's fail-open. */
const DEADLINE_MARGIN_NS = 100_000_000n;
const POLICY_ACTIVE_TIMEOUT_MS = 15_000;
/** Re-check planted bytes this often (an agent may have failed them open). */
const VERIFY_INTERVAL_MS = 5000;
const REQUIRED_EVENTS = ['BREAKPOINT', 'SINGLESTEP', 'PAUSE'] as const;
const REQUIRED_COMMANDS = ['VM_READ_PHYSICAL', 'VM_WRITE_PHYSICAL', 'VM_PAUSE_VCPU', 'VCPU_CONTROL_SINGLESTEP'] as const;

export interface TracingHost {
  readonly store: Store;
  readonly traces: TraceStore;
  readonly profiles: ProfileRegistry;
  readonly liveVms: ReadonlyMap<string, LiveVm>;
  readonly registry: Registry;
  log(level: 'debug' | 'info' | 'warn' | 'error', msg: string, fields?: Record<string, unknown>): void;
  /** Push the host's local policy now (it includes `localRules`). */
  pushPolicy(s: AgentSession): Promise<void>;
  /** The guest OS profile the VM's policy names (`linux-sim` without one). */
  profileName(vm: LiveVm): string;
  /** Keep a background job (awaited by `settled()` / stop). */
  track(p: Promise<void>): void;
}

interface ActiveTrace {
  row: TraceRow;
  readonly fn: string;
  readonly args: number;
  gva: bigint;
  gpa: bigint;
  original: number;
  /** Where things are: `planted`, `stepping`, `failed: …`. */
  status: string;
}

interface Step {
  readonly vcpu: number;
  readonly done: (ss: HeldEvent | undefined) => void;
}

class VmTraces {
  vm: LiveVm;
  readonly traces = new Map<string, ActiveTrace>();
  chain: Promise<void> = Promise.resolve();
  /** vCPUs stopped in a BREAKPOINT of ours, waiting for their step. */
  readonly heldBreakpoints = new Set<number>();
  step: Step | undefined;
  /** VM_PAUSE_VCPU requests sent per vCPU whose PAUSE event has not come yet. */
  readonly pausesOutstanding = new Map<number, number>();
  /** PAUSE events held until the current step ends. */
  heldPauses: HeldEvent[] = [];
  /** vCPUs we enabled singlestep on. */
  readonly singlestepping = new Set<number>();
  verifyTimer: NodeJS.Timeout | undefined;
  verifyQueued = false;

  constructor(vm: LiveVm) {
    this.vm = vm;
  }

  byGpa(gpa: bigint): ActiveTrace | undefined {
    for (const t of this.traces.values()) if (t.gpa === gpa) return t;
    return undefined;
  }

  /** Run `fn` after everything queued on this VM (plants, stops, steps, checks). */
  run<T>(fn: () => Promise<T>): Promise<T> {
    const p = this.chain.then(fn, fn);
    this.chain = p.then(() => undefined, () => undefined);
    return p;
  }
}

export class Tracing {
  private readonly vms = new Map<string, VmTraces>();
  private readonly activeVersion = new WeakMap<AgentSession, { active: bigint; rejected: Map<bigint, string> }>();
  private readonly policyWaiters = new Set<() => void>();
  private stopped = false;
  private readonly m;

  constructor(private readonly host: TracingHost) {
    const r = host.registry;
    this.m = {
      hits: r.counter('periscope_analysis_trace_hits_total', 'breakpoint hits recorded (calls of traced functions)'),
      steps: r.counter('periscope_analysis_trace_steps_total', 'breakpoint steps, by outcome (stepped, late, timeout, failed)'),
      plants: r.counter('periscope_analysis_trace_plants_total', 'INT3 writes, by reason (start, re-establish, re-plant)'),
      missedRisk: r.counter('periscope_analysis_trace_pause_failures_total', 'steps during which another vCPU could not be paused (a call could be missed)'),
    };
    r.gauge('periscope_analysis_traces_active', 'active traces on VMs live on this replica').track(() => [...this.vms.values()].reduce((n, s) => n + s.traces.size, 0));
  }

  /** Shutdown: no more checks or re-establishing. */
  close(): void {
    this.stopped = true;
    for (const st of this.vms.values()) if (st.verifyTimer) clearInterval(st.verifyTimer);
  }

  // ------------------------------------------------------------------------------------------ queries

  /** VMs (of `uuids`) with active traces: their hosts get the tracing rules. */
  localRules(uuids: readonly string[]): Rule[] {
    const vms = uuids.filter((u) => (this.vms.get(u)?.traces.size ?? 0) > 0).sort();
    if (!vms.length) return [];
    const ask = (d: Rule['action']) => ({ deadlineMs: TRACE_DEADLINE_MS, ...(d ? { default: d } : {}) });
    return [
      // The agent answers its own fail-open for planted addresses; RETRY is the nominal default.
      { id: 'tracing/breakpoint', description: 'breakpoint tracing: INT3 hits, stepped by analysis', match: { kind: 'BREAKPOINT', vms }, askCentral: ask({ kind: 'retry' }), report: { mode: 'never' } },
      { id: 'tracing/singlestep', description: 'breakpoint tracing: the step over the original instruction', match: { kind: 'SINGLESTEP', vms }, askCentral: ask({ kind: 'allow' }), report: { mode: 'never' } },
      { id: 'tracing/pause', description: 'breakpoint tracing: other vCPUs paused during a step', match: { kind: 'PAUSE', vms }, askCentral: ask({ kind: 'allow' }), report: { mode: 'never' } },
    ];
  }

  /** Bytes planted in a VM (kernel integrity hashes them as the original byte). */
  plantedBytes(vm: LiveVm): readonly PlantedByte[] {
    const st = this.vms.get(vm.uuid);
    if (!st) return [];
    return [...st.traces.values()].filter((t) => t.original >= 0).map((t) => ({ gpa: t.gpa, original: t.original }));
  }

  async list(o: { vmUuid?: string; includeStopped?: boolean } = {}): Promise<JsonObject[]> {
    const rows = await this.host.traces.list(o);
    const counts = await this.host.traces.hitCounts(rows.map((r) => r.traceId));
    return rows.map((r) => this.traceJson(r, counts.get(r.traceId) ?? 0n));
  }

  async hits(o: Parameters<TraceStore['hits']>[0]): Promise<JsonObject[]> {
    return (await this.host.traces.hits(o)).map(hitJson);
  }

  // ------------------------------------------------------------------------------------------ start / stop

  /** Start tracing `fn` on a live VM. Plain JSON (a VM operation). */
  async start(vm: LiveVm, fn: string, args: number, by: string): Promise<JsonObject> {
    if (!/^[A-Za-z_][A-Za-z0-9_.$]{0,127}$/.test(fn)) throw new AnalysisError('bad-request', `${JSON.stringify(fn)} is not a function name`);
    if (!Number.isInteger(args) || args < 0 || args > SYSV_ARGS.length) throw new AnalysisError('bad-request', `--args must be 0…${SYSV_ARGS.length} (the SysV argument registers ${SYSV_ARGS.join(', ')})`);
    await this.checkVm(vm);
    const profile = this.profileOf(vm);
    const sym = profile.symbols.get(fn);
    if (!sym) {
      const some = [...profile.symbols.keys()].filter((n) => !n.startsWith('_')).slice(0, 8).join(', ');
      throw new AnalysisError('not-found', `guest OS profile ${profile.name} has no function ${fn} (e.g. ${some}, …)`);
    }
    const st = this.stateOf(vm);
    return st.run(async () => {
      if (st.traces.has(fn) || (await this.host.traces.active(vm.uuid, fn))) throw new AnalysisError('conflict', `${fn} is already traced on ${vm.name || vm.uuid} (periscope trace list)`);
      const facts = await this.factsOf(vm, profile);
      const gva = facts.textBase + sym.offset;
      const gpa = facts.textPhys + sym.offset;
      const original = await this.readByte(vm, gpa, `trace ${fn}: read the original byte`);
      if (original === INT3) throw new AnalysisError('conflict', `the first byte of ${fn} (gpa ${hex(gpa)}) is already 0xCC: an INT3 the guest or another tool placed; not tracing over it`);
      // Writing the byte it already holds changes nothing and tells at once whether the agent lets analysis write.
      await this.write(vm, gpa, original, `trace ${fn}: check the agent allows VM_WRITE_PHYSICAL`);
      const row = await this.host.traces.create({ vmUuid: vm.uuid, function: fn, args, createdBy: by, profile: profile.name });
      await this.host.traces.setPlacement(row.traceId, { bootMs: vm.startTimeMs, gva, gpa, originalByte: original });
      const t: ActiveTrace = { row: { ...row, bootMs: vm.startTimeMs, gva, gpa, originalByte: original }, fn, args, gva, gpa, original, status: 'starting' };
      st.traces.set(fn, t);
      try {
        await this.ensureRules(vm);
        await this.write(vm, gpa, INT3, `trace ${fn}: plant INT3`);
        this.m.plants.inc({ reason: 'start' });
        t.status = 'planted';
        await this.host.traces.setStatus(row.traceId, t.status);
      } catch (e) {
        st.traces.delete(fn);
        await this.write(vm, gpa, original, `trace ${fn}: undo`).catch(() => undefined);
        await this.host.traces.stop(row.traceId, by, `failed: ${(e as Error).message}`).catch(() => undefined);
        void this.host.pushPolicy(vm.session);
        throw e;
      }
      this.ensureVerifier(st);
      this.host.log('info', 'trace started', { vm: vm.name, function: fn, gva: hex(gva), gpa: hex(gpa), by });
      return this.traceJson((await this.host.traces.byId(row.traceId))!, 0n);
    });
  }

  /** Stop tracing `fn` on a live VM: the original byte goes back, then the rules go. */
  async stop(vm: LiveVm, fn: string, by: string): Promise<JsonObject> {
    const st = this.stateOf(vm);
    return st.run(async () => {
      const t = st.traces.get(fn);
      const row = t?.row ?? (await this.host.traces.active(vm.uuid, fn));
      if (!row) throw new AnalysisError('not-found', `${fn} is not traced on ${vm.name || vm.uuid}`);
      st.traces.delete(fn);
      let status = 'stopped';
      const gpa = t?.gpa ?? row.gpa;
      const original = t?.original ?? row.originalByte;
      if (gpa !== null && original >= 0 && (t !== undefined || row.bootMs === vm.startTimeMs)) {
        try {
          await this.write(vm, gpa, original, `trace ${fn}: restore the original byte`);
        } catch (e) {
          status = `stopped; restoring the byte failed (the agent restores it at detach): ${(e as Error).message}`;
        }
      }
      await this.host.traces.stop(row.traceId, by, status);
      await this.host.pushPolicy(vm.session);
      this.host.log('info', 'trace stopped', { vm: vm.name, function: fn, by });
      const counts = await this.host.traces.hitCounts([row.traceId]);
      return this.traceJson((await this.host.traces.byId(row.traceId))!, counts.get(row.traceId) ?? 0n);
    });
  }

  /** Stop a trace of a VM no replica has live: the row only (the agent restored the bytes when it detached). */
  async stopOffline(vmUuid: string, fn: string, by: string): Promise<JsonObject> {
    const row = await this.host.traces.active(vmUuid, fn);
    if (!row) throw new AnalysisError('not-found', `${fn} is not traced on VM ${vmUuid}`);
    await this.host.traces.stop(row.traceId, by, 'stopped while the VM was not attached');
    return this.traceJson((await this.host.traces.byId(row.traceId))!, (await this.host.traces.hitCounts([row.traceId])).get(row.traceId) ?? 0n);
  }

  // ------------------------------------------------------------------------------------------ link events

  /** A VM (re-)attached: re-establish its active traces, idempotently. */
  vmAttached(vm: LiveVm): void {
    if (this.stopped) return;
    const st = this.vms.get(vm.uuid);
    if (st) {
      st.vm = vm;
      st.heldBreakpoints.clear();
      st.pausesOutstanding.clear();
      st.singlestepping.clear();
      st.heldPauses = [];
    }
    this.host.track(this.reestablish(vm));
  }

  vmDetached(uuid: string): void {
    const st = this.vms.get(uuid);
    if (st?.verifyTimer) clearInterval(st.verifyTimer);
    if (st) st.verifyTimer = undefined;
  }

  /** The agent answered one of our held events by default (deadline, link): it failed open; check the bytes. */
  onVerdictRecord(vmUuid: string, kind: string, tier: VerdictTier): void {
    if (tier !== VerdictTier.VERDICT_TIER_DEFAULT || (kind !== 'BREAKPOINT' && kind !== 'SINGLESTEP')) return;
    const st = this.vms.get(vmUuid);
    if (st && st.traces.size) this.queueVerify(st);
  }

  /** A LocalPolicy status from an agent. */
  policyStatus(s: AgentSession, v: { version: bigint; state: string; error: string; activeVersion: bigint }): void {
    let a = this.activeVersion.get(s);
    if (!a) this.activeVersion.set(s, (a = { active: 0n, rejected: new Map() }));
    if (v.state === 'active' && v.version > a.active) a.active = v.version;
    if (v.activeVersion > a.active) a.active = v.activeVersion;
    if (v.state === 'rejected') a.rejected.set(v.version, v.error);
    for (const w of [...this.policyWaiters]) w();
  }

  /** Held events: BREAKPOINT and SINGLESTEP of traced VMs, PAUSE events this module caused. */
  claim(h: HeldEvent): boolean {
    const st = this.vms.get(h.vmUuid);
    const e = h.event;
    const vcpu = e.vcpu;
    if (h.kind === 'BREAKPOINT') {
      // The agent holds only breakpoints at bytes analysis planted: never let one through as CONTINUE (that
      // would inject #BP). Without a trace state here (not re-established yet) it is left to the agent's
      // fail-open at the deadline: the byte restored, RETRY.
      if (!st || !h.vm || h.vm !== st.vm) return true;
      const p = e.payload;
      const gpa = p?.$case === 'breakpoint' ? p.value.gpa : -1n;
      const t = st.byGpa(gpa);
      if (t) this.recordHit(st, t, e);
      st.heldBreakpoints.add(vcpu);
      void st.run(() => this.stepOver(st, h, gpa)).catch((err: unknown) => this.host.log('warn', 'trace step failed', { vm: st.vm.name, vcpu, error: (err as Error).message }));
      return true;
    }
    if (h.kind === 'SINGLESTEP') {
      if (!st) return false;
      if (st.step && st.step.vcpu === vcpu) {
        st.step.done(h);
        return true;
      }
      if (!st.singlestepping.has(vcpu)) return false;
      // A late singlestep (its step timed out): turn it off and let the vCPU go.
      st.singlestepping.delete(vcpu);
      void this.cmd(st.vm, vcpu, { $case: 'controlSinglestep', value: { enable: false } }, 'trace: stray singlestep off')
        .catch(() => undefined)
        .then(() => sendVerdict(h.session, e, 'continue', 'tracing/stray-singlestep'));
      return true;
    }
    if (h.kind === 'PAUSE') {
      const n = st?.pausesOutstanding.get(vcpu) ?? 0;
      if (!st || n <= 0) return false;
      st.pausesOutstanding.set(vcpu, n - 1);
      // A pause an earlier step asked for can reach a vCPU only after the BREAKPOINT it was stopped in: when
      // that vCPU is the one stepping now, it must run (its SINGLESTEP ends the step), not wait for the step.
      if (st.step && st.step.vcpu !== vcpu) st.heldPauses.push(h);
      else sendVerdict(h.session, e, 'continue', 'tracing/resume');
      return true;
    }
    return false;
  }

  // ------------------------------------------------------------------------------------------ the step

  private recordHit(st: VmTraces, t: ActiveTrace, e: KvmiEvent): void {
    const regs = e.regs;
    const args = SYSV_ARGS.slice(0, t.args).map((r) => (regs ? regs[r] : 0n));
    const hit: Omit<TraceHit, 'hitId'> = {
      traceId: t.row.traceId, vmUuid: st.vm.uuid, function: t.fn, sessionGeneration: e.sessionGeneration, eventSeq: e.seq,
      vcpu: e.vcpu, rip: regs?.rip ?? t.gva, args, hitNs: e.receivedUnixNs || nowNs(),
    };
    this.m.hits.inc();
    this.host.track(this.host.traces.addHit(hit).catch((err: unknown) => this.host.log('warn', 'trace hit not stored', { error: (err as Error).message })));
  }

  private async stepOver(st: VmTraces, h: HeldEvent, gpa: bigint): Promise<void> {
    const e = h.event;
    const vcpu = e.vcpu;
    const vm = st.vm;
    const t = st.byGpa(gpa);
    try {
      if (h.vm !== vm || vm.session.closed) return;
      if (e.verdictDeadlineUnixNs && nowNs() > e.verdictDeadlineUnixNs - DEADLINE_MARGIN_NS) {
        // The agent restores the byte and resumes the vCPU itself (fail open); plant again afterwards.
        this.m.steps.inc({ outcome: 'late' });
        this.queueVerify(st);
        return;
      }
      if (!t) {
        // Stopped meanwhile: the original is back, so the vCPU can retry; an INT3 still there is not ours.
        const b = await this.readByte(vm, gpa, 'trace: byte at a hit without a trace').catch(() => INT3);
        if (b !== INT3) sendVerdict(h.session, e, 'retry', 'tracing/stopped');
        return;
      }
      const others: number[] = [];
      for (let j = 0; j < vm.vcpuCount; j++) if (j !== vcpu && !st.heldBreakpoints.has(j)) others.push(j);
      let finish: (ss: HeldEvent | undefined) => void = () => undefined;
      const stepped = new Promise<HeldEvent | undefined>((resolve) => (finish = resolve));
      st.step = { vcpu, done: finish };
      t.status = 'stepping';
      for (const j of others) st.pausesOutstanding.set(j, (st.pausesOutstanding.get(j) ?? 0) + 1);
      // The other vCPUs are out of guest mode (wait=1) before the byte is restored: none can run the original
      // instruction unseen in between.
      const [ss, ...pauses] = await Promise.allSettled([
        this.cmd(vm, vcpu, { $case: 'controlSinglestep', value: { enable: true } }, `trace ${t.fn}: singlestep on`),
        ...others.map((j) => this.cmd(vm, j, { $case: 'pauseVcpu', value: { wait: true } }, `trace ${t.fn}: pause vCPU ${j} for the step`)),
      ]);
      const [restore] = await Promise.allSettled([this.write(vm, t.gpa, t.original, `trace ${t.fn}: restore for the step`)]);
      pauses.forEach((p, i) => {
        if (p.status === 'rejected') {
          const j = others[i]!;
          st.pausesOutstanding.set(j, Math.max(0, (st.pausesOutstanding.get(j) ?? 1) - 1));
          this.m.missedRisk.inc();
          this.host.log('warn', 'trace: a vCPU could not be paused for a step (a call on it could be missed)', { vm: vm.name, vcpu: j, error: (p.reason as Error).message });
        }
      });
      if (restore.status === 'rejected') {
        // The INT3 is still there: the agent's fail-open (deadline) restores it.
        t.status = `failed: ${(restore.reason as Error).message}`;
        this.m.steps.inc({ outcome: 'failed' });
        this.queueVerify(st);
        return;
      }
      if (ss.status === 'rejected') {
        // No step without singlestep: the vCPU runs on over the original byte, the trace is left unplanted.
        sendVerdict(h.session, e, 'retry', 'tracing/no-singlestep');
        st.traces.delete(t.fn);
        await this.host.traces.stop(t.row.traceId, 'tracing', `failed: singlestep refused: ${(ss.reason as Error).message}`).catch(() => undefined);
        this.m.steps.inc({ outcome: 'failed' });
        return;
      }
      st.singlestepping.add(vcpu);
      st.heldBreakpoints.delete(vcpu);
      sendVerdict(h.session, e, 'retry', 'tracing/step');
      let timer: NodeJS.Timeout | undefined;
      const ssEvent = await Promise.race([stepped, new Promise<undefined>((r) => (timer = setTimeout(() => r(undefined), STEP_TIMEOUT_MS)))]);
      clearTimeout(timer);
      // Re-plant (unless stopped meanwhile) and turn singlestep off, then let the vCPU go: it must not reach the
      // function again (a loop, the next call) before the INT3 is back, nor may the paused vCPUs.
      const active = st.traces.get(t.fn) === t;
      const replant = active ? this.write(vm, t.gpa, INT3, `trace ${t.fn}: re-plant after the step`) : Promise.resolve();
      const off = this.cmd(vm, vcpu, { $case: 'controlSinglestep', value: { enable: false } }, `trace ${t.fn}: singlestep off`);
      st.singlestepping.delete(vcpu);
      const [rp] = await Promise.allSettled([replant, off]);
      if (ssEvent) sendVerdict(ssEvent.session, ssEvent.event, 'continue', 'tracing/stepped');
      if (active) {
        t.status = rp.status === 'fulfilled' ? 'planted' : `failed: re-plant: ${(rp.reason as Error).message}`;
        if (rp.status === 'fulfilled') this.m.plants.inc({ reason: 're-plant' });
      }
      this.m.steps.inc({ outcome: ssEvent ? 'stepped' : 'timeout' });
      if (!ssEvent) this.host.log('warn', 'trace: no SINGLESTEP within the step timeout (the agent failed it open); re-planted', { vm: vm.name, vcpu, function: t.fn });
    } finally {
      st.heldBreakpoints.delete(vcpu);
      st.step = undefined;
      const held = st.heldPauses;
      st.heldPauses = [];
      for (const p of held) sendVerdict(p.session, p.event, 'continue', 'tracing/resume');
    }
  }

  // ------------------------------------------------------------------------------------------ re-establish / verify

  private async reestablish(vm: LiveVm): Promise<void> {
    let rows: TraceRow[];
    try {
      rows = await this.host.traces.activeForVm(vm.uuid);
    } catch (e) {
      this.host.log('warn', 'traces not loaded', { vm: vm.name, error: (e as Error).message });
      return;
    }
    const st0 = this.vms.get(vm.uuid);
    if (!rows.length && !st0) return;
    const st = this.stateOf(vm);
    await st.run(async () => {
      if (st.vm !== vm || vm.session.closed) return;
      for (const row of rows) {
        if (st.traces.has(row.function) && st.traces.get(row.function)!.row.bootMs === vm.startTimeMs) continue;
        try {
          let { gva, gpa } = row;
          let original = row.originalByte;
          if (row.bootMs !== vm.startTimeMs || gva === null || gpa === null || original < 0) {
            // Another boot (new slide, fresh memory): place it again; the byte read now is the guest's own.
            const profile = this.host.profiles.get(row.profile) ?? this.profileOf(vm);
            const sym = profile.symbols.get(row.function);
            if (!sym) throw new AnalysisError('bad-profile', `profile ${profile.name} has no ${row.function}`);
            const facts = await this.factsOf(vm, profile);
            gva = facts.textBase + sym.offset;
            gpa = facts.textPhys + sym.offset;
            original = await this.readByte(vm, gpa, `trace ${row.function}: read the original byte (new boot)`);
            if (original === INT3) throw new AnalysisError('conflict', `the first byte of ${row.function} is 0xCC in this boot before planting`);
            await this.host.traces.setPlacement(row.traceId, { bootMs: vm.startTimeMs, gva, gpa, originalByte: original });
          }
          st.traces.set(row.function, { row: { ...row, bootMs: vm.startTimeMs, gva, gpa, originalByte: original }, fn: row.function, args: row.args, gva, gpa, original, status: 'pending' });
        } catch (e) {
          await this.host.traces.setStatus(row.traceId, `failed: ${(e as Error).message}`).catch(() => undefined);
          this.host.log('warn', 'trace not re-established', { vm: vm.name, function: row.function, error: (e as Error).message });
        }
      }
      if (!st.traces.size) return;
      await this.ensureRules(vm);
      await this.verify(st, 're-establish');
      this.ensureVerifier(st);
      this.host.log('info', 'traces re-established', { vm: vm.name, traces: [...st.traces.keys()] });
    }).catch((e: unknown) => {
      // E.g. a command timed out (analysis or the agent overloaded): nothing else would plant again while the VM
      // stays attached (no hit, no verdict record, the periodic check starts only after a re-establish), so retry.
      this.host.log('warn', 'traces not re-established; retrying', { vm: vm.name, error: (e as Error).message, retryMs: VERIFY_INTERVAL_MS });
      setTimeout(() => {
        if (!this.stopped && !vm.session.closed && this.host.liveVms.get(vm.uuid) === vm) this.host.track(this.reestablish(vm));
      }, VERIFY_INTERVAL_MS).unref();
    });
  }

  /** Every trace's byte: 0xCC = planted, the original = plant it, anything else = the code changed. */
  private async verify(st: VmTraces, reason: 're-establish' | 're-plant'): Promise<void> {
    const vm = st.vm;
    for (const t of [...st.traces.values()]) {
      if (vm.session.closed) return;
      const b = await this.readByte(vm, t.gpa, `trace ${t.fn}: check the INT3`);
      let status = t.status;
      if (b === INT3) status = 'planted';
      else if (b === t.original) {
        await this.write(vm, t.gpa, INT3, `trace ${t.fn}: plant INT3 (${reason})`);
        this.m.plants.inc({ reason });
        status = 'planted';
      } else {
        status = `failed: the code changed (byte 0x${b.toString(16)}, expected 0x${t.original.toString(16)} or 0xcc)`;
        st.traces.delete(t.fn);
      }
      if (status !== t.status || status !== t.row.status) {
        t.status = status;
        await this.host.traces.setStatus(t.row.traceId, status);
      }
    }
  }

  private queueVerify(st: VmTraces): void {
    if (st.verifyQueued) return;
    st.verifyQueued = true;
    this.host.track(
      st.run(async () => {
        st.verifyQueued = false;
        if (!st.vm.session.closed && st.traces.size) await this.verify(st, 're-plant');
      }).catch((e: unknown) => this.host.log('warn', 'trace check failed', { vm: st.vm.name, error: (e as Error).message })),
    );
  }

  private ensureVerifier(st: VmTraces): void {
    if (st.verifyTimer || this.stopped) return;
    st.verifyTimer = setInterval(() => {
      if (!st.traces.size || st.vm.session.closed) return;
      this.queueVerify(st);
    }, VERIFY_INTERVAL_MS);
    st.verifyTimer.unref();
  }

  // ------------------------------------------------------------------------------------------ helpers

  private stateOf(vm: LiveVm): VmTraces {
    let st = this.vms.get(vm.uuid);
    if (!st) this.vms.set(vm.uuid, (st = new VmTraces(vm)));
    else if (st.vm !== vm && this.host.liveVms.get(vm.uuid) === vm) st.vm = vm;
    return st;
  }

  private profileOf(vm: LiveVm): GuestOsProfile {
    const name = this.host.profileName(vm);
    const p = this.host.profiles.get(name);
    if (!p) throw new AnalysisError('bad-profile', `unknown guest OS profile ${name}`);
    return p;
  }

  private async factsOf(vm: LiveVm, profile: GuestOsProfile): Promise<KernelFacts> {
    const f = vm.facts;
    if (f && f.qemuStartTimeMs === vm.startTimeMs && f.profile === profile.name) return f;
    const facts = await deriveFacts(vm.session, vm, profile);
    vm.facts = facts;
    return facts;
  }

  /** What tracing needs from the VM's KVM: the singlestep feature, the events and the commands. */
  private async checkVm(vm: LiveVm): Promise<void> {
    const rec = await this.host.store.getVm(vm.uuid);
    if (!rec) throw new AnalysisError('not-found', `no VM ${vm.uuid}`);
    if (rec.kvmiVersion['singlestep'] !== true) {
      throw new AnalysisError('unsupported', `${vm.name || vm.uuid}: its KVM did not report the singlestep feature (GET_VERSION features.singlestep = 0, e.g. AMD SVM); breakpoint tracing needs VCPU_CONTROL_SINGLESTEP to step over the original instruction, so it is refused`);
    }
    const missingEvents = REQUIRED_EVENTS.filter((k) => !rec.allowedEvents.includes(k));
    const missingCommands = REQUIRED_COMMANDS.filter((k) => !vm.allowedCommands.includes(k));
    if (missingEvents.length || missingCommands.length) {
      throw new AnalysisError('unsupported', `${vm.name || vm.uuid}: the device manager does not allow ${[...missingEvents.map((k) => `event ${k}`), ...missingCommands].join(', ')}; breakpoint tracing needs them`);
    }
  }

  /** Push the host's policy and wait until the agent runs a version with the tracing rules. */
  private async ensureRules(vm: LiveVm): Promise<void> {
    const s = vm.session;
    await this.host.pushPolicy(s);
    const want = s.lastPolicyVersion;
    const t0 = Date.now();
    for (;;) {
      const a = this.activeVersion.get(s);
      const rejected = a?.rejected.get(want);
      if (rejected !== undefined) throw new AnalysisError('refused', `the agent on ${vm.hostId} rejected the local policy with the tracing rules: ${rejected}`);
      if (a && a.active >= want) return;
      if (s.closed) throw new AnalysisError('link-closed', `link to ${vm.hostId} closed`);
      if (Date.now() - t0 > POLICY_ACTIVE_TIMEOUT_MS) throw new AnalysisError('command-timeout', `the agent on ${vm.hostId} did not activate local policy v${want} (the tracing rules) within ${POLICY_ACTIVE_TIMEOUT_MS} ms`);
      await new Promise<void>((resolve) => {
        const w = () => {
          this.policyWaiters.delete(w);
          clearTimeout(timer);
          resolve();
        };
        const timer = setTimeout(w, 200);
        this.policyWaiters.add(w);
      });
    }
  }

  private async cmd(vm: LiveVm, vcpu: number, c: CommandBody, purpose: string): Promise<void> {
    try {
      await vm.session.command(vm, vcpu, c, purpose);
    } catch (e) {
      throw refusal(e, vm);
    }
  }

  private async readByte(vm: LiveVm, gpa: bigint, purpose: string): Promise<number> {
    let r;
    try {
      r = await vm.session.command(vm, 0, { $case: 'readPhysical', value: { gpa, size: 1 } }, purpose);
    } catch (e) {
      throw refusal(e, vm);
    }
    if (r.result?.$case !== 'readPhysical' || r.result.value.data.length < 1) throw new AnalysisError('command-failed', 'VM_READ_PHYSICAL returned no data');
    return r.result.value.data[0]!;
  }

  private write(vm: LiveVm, gpa: bigint, byte: number, purpose: string): Promise<void> {
    return this.cmd(vm, 0, { $case: 'writePhysical', value: { gpa, data: Buffer.from([byte]) } }, purpose);
  }

  private traceJson(r: TraceRow, hits: bigint): JsonObject {
    const live = this.vms.get(r.vmUuid)?.traces.get(r.function);
    return {
      id: r.traceId,
      vm: r.vmUuid,
      vmName: this.host.liveVms.get(r.vmUuid)?.name ?? '',
      function: r.function,
      args: r.args,
      registers: SYSV_ARGS.slice(0, r.args) as unknown as string[],
      state: r.state,
      status: live && r.state === 'active' ? live.status : r.status,
      gva: r.gva !== null ? hex(r.gva) : '',
      gpa: r.gpa !== null ? hex(r.gpa) : '',
      originalByte: r.originalByte >= 0 ? `0x${r.originalByte.toString(16).padStart(2, '0')}` : '',
      hits: hits.toString(),
      createdBy: r.createdBy,
      createdNs: r.createdNs.toString(),
      stoppedNs: r.stoppedNs.toString(),
      stoppedBy: r.stoppedBy,
    };
  }
}

function hitJson(h: TraceHit): JsonObject {
  return {
    id: h.hitId.toString(),
    trace: h.traceId,
    vm: h.vmUuid,
    function: h.function,
    vcpu: h.vcpu,
    rip: hex(h.rip),
    args: h.args.map(hex),
    generation: h.sessionGeneration.toString(),
    seq: h.eventSeq,
    hitNs: h.hitNs.toString(),
  };
}

/** A command the agent's allow-list refused becomes `refused` with the agent's own message. */
function refusal(e: unknown, vm: LiveVm): unknown {
  if (e instanceof CommandError && e.result.status === CommandStatus.COMMAND_STATUS_REFUSED_BY_AGENT_POLICY) {
    return new AnalysisError('refused', `the agent on ${vm.hostId} refused: ${e.result.message}`, { cause: e });
  }
  return e;
}

/**
 * `trace-start` {function, args?}, `trace-stop` {function}, `trace-list` {}: VM operations (operations.ts), so
 * that an operator command reaches the replica that owns the VM. Plain JSON in and out.
 */
export function registerTraceOperations(ops: VmOperations, tracing: Tracing): void {
  const fnArg = (args: JsonObject): string => {
    const f = args['function'];
    if (typeof f !== 'string' || !f) throw new AnalysisError('bad-request', 'function is required');
    return f;
  };
  ops.register('trace-start', async ({ vm, by }, args) => {
    const n = args['args'] === undefined || args['args'] === null ? DEFAULT_TRACE_ARGS : Number(args['args']);
    return { trace: await tracing.start(vm, fnArg(args), n, by) };
  });
  ops.register('trace-stop', async ({ vm, by }, args) => ({ trace: await tracing.stop(vm, fnArg(args), by) }));
  ops.register('trace-list', async ({ vm }) => ({ traces: await tracing.list({ vmUuid: vm.uuid }) }));
}
