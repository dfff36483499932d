/**
 * One VM's KVMI connection in the host agent, from the accepted handshake to detach.
 *
 * Attach (kvmi-v12.md §11): the GET_VERSION written with the handshake reply, CHECK_COMMAND /
 * CHECK_EVENT for every id the agent may use, VM_GET_INFO, VM_CONTROL_EVENTS(UNHOOK), the gfn limit,
 * then the per-vCPU controls the protection needs — retrying vCPUs that answer EAGAIN until the guest
 * brings them up. Events are answered by the `decide` callback (the local verdict engine) on the
 * socket's own turn; a decision that needs guest state first (skip, inject) is answered after its
 * commands complete, and the event stays "held" until then.
 *
 * Detach (on KVMI_VM_EVENT_UNHOOK, or for every VM on SIGTERM): restore planted bytes, reset every
 * restricted GFN, disable events, reply to every held event, close — bounded by a deadline.
 */
import type { Socket } from 'node:net';
import { rewindInstruction, skipInstruction } from './instruction-skip.js';
import {
  commands,
  events,
  EventAction,
  KvmErrno,
  KvmiCommandError,
  KvmiError,
  KvmiSession,
  PageAccess,
  structs,
  type CommandKey,
  type DecodedEvent,
  type EventKey,
  type QemuHello,
  type VcpuEventView,
} from '@periscope/kvmi';

/** What the protection asks KVM for; derived from the local rules. */
export interface ProtectionPlan {
  vcpuEvents: EventKey[];
  crs: number[];
  msrs: number[];
  /** Page restrictions: allowed access bits per page (gpa page-aligned). */
  pageAccess: { gpa: bigint; access: number }[];
}

export const EMPTY_PLAN: ProtectionPlan = { vcpuEvents: [], crs: [], msrs: [], pageAccess: [] };

/** A decision for one event. `newVal` is required for CR/MSR CONTINUE. */
export type EventDecision =
  | { kind: 'reply'; action: number; newVal?: bigint; ruleId?: string }
  /** Answer later (the caller will call `vm.replyHeld(...)`); the vCPU stays held. */
  | { kind: 'hold'; ruleId?: string }
  /**
   * Deny a PF write / descriptor load by skipping the instruction: decode at RIP, SET_REGISTERS with
   * RIP advanced, RETRY. If that fails, answer `fallback` (logged and counted).
   */
  | { kind: 'skip'; ruleId?: string; fallback: number }
  /**
   * Inject an exception while the vCPU waits, then answer `then` (RETRY for a denied PF execute). CR/MSR:
   * `then` CONTINUE with `newVal` (the old value) and `rewind`: RIP is set back over the instruction first,
   * so that KVM's completion of the exit lands on it and the exception is delivered at the instruction.
   */
  | { kind: 'inject'; ruleId?: string; vector: number; errorCode: number; address: bigint; then: number; newVal?: bigint; rewind?: boolean }
  /**
   * Run commands while the vCPU waits, then answer what `run` resolves to (e.g. a breakpoint failing open:
   * restore the original byte, then RETRY). `run` should not reject; a rejection is answered CONTINUE.
   */
  | { kind: 'work'; ruleId?: string; run: () => Promise<{ action: number; newVal?: bigint }> };

export type Decide = (view: VcpuEventView, vm: VmConnection) => EventDecision;

export interface VmInfo {
  uuid: string;
  name: string;
  startTimeMs: bigint;
  /** Strictly increasing per uuid on this host, also across agent restarts (session-generations.ts). */
  sessionGeneration: number;
  version: number;
  maxMsgSize: number;
  singlestep: boolean;
  vcpuCount: number;
  allowedCommands: string[];
  allowedEvents: string[];
  gfnLimit: { value: bigint; source: 'handshake' | 'VM_GET_MAX_GFN' } | { value: null; source: 'unknown' };
}

export interface VmConnectionOptions {
  hello: QemuHello;
  socket: Socket;
  sessionGeneration: number;
  plan: ProtectionPlan;
  decide: Decide;
  log: (level: 'info' | 'warn' | 'error', msg: string, fields?: Record<string, unknown>) => void;
  onDetached?: (vm: VmConnection, reason: string) => void;
  /** Retry interval for vCPUs answering EAGAIN. Default 50 ms. */
  eagainRetryMs?: number;
  commandTimeoutMs?: number;
  /** Bound on bytes queued for a VM that stops reading (default 4 MiB); past it only that VM is closed. */
  maxQueuedBytes?: number;
}

interface HeldEvent {
  seq: number;
  eventId: number;
  /** CONTINUE default for releasing on detach: new_val for CR/MSR is the guest's proposed value. */
  newVal: bigint | undefined;
  since: bigint;
}

const CR_EVENT = events.CR.id;
const PAUSE_EVENT = events.PAUSE.id;
const MSR_EVENT = events.MSR.id;

export class VmConnection {
  readonly session: KvmiSession;
  info: VmInfo | undefined;
  readonly uuid: string;
  /**
   * attaching → protected (every vCPU has its controls) or partial (some vCPUs answered EAGAIN and are
   * retried until the guest brings them up) → detaching → closed.
   */
  state: 'attaching' | 'protected' | 'partial' | 'detaching' | 'closed' = 'attaching';
  private readonly held = new Map<number, HeldEvent>();
  private readonly planted = new Map<bigint, Uint8Array>();
  /** Bytes analysis changed with VM_WRITE_PHYSICAL (`writeRemembered`): gpa → the guest's byte and ours. */
  private readonly remembered = new Map<bigint, RememberedByte>();
  /** Serialises `writeRemembered` / `restoreRemembered` (read the originals, then write). */
  private rememberChain: Promise<unknown> = Promise.resolve();
  /** Called after the remembered bytes changed (the link persists them per VM UUID). */
  onRememberedChange: ((vm: VmConnection) => void) | undefined;
  private readonly restricted = new Set<bigint>();
  /** Serialises `extendPlan` steps. */
  private planChain: Promise<unknown> = Promise.resolve();
  private readonly enabled = new Map<number, { events: Set<EventKey>; crs: Set<number>; msrs: Set<number> }>();
  private detaching: Promise<void> | undefined;
  private readonly pendingVcpus = new Set<number>();
  private retryTimer: NodeJS.Timeout | undefined;
  readonly stats = { events: 0, stallNsTotal: 0n, eventsByKind: new Map<number, number>(), skips: 0, skipFailures: 0 };
  /** Called after each reply with the stall time (event received → reply written). */
  onStall: ((ns: bigint, eventId: number, decision: EventDecision) => void) | undefined;
  /**
   * Called after each reply written for a decided event (the analysis link reports from here, after
   * the vCPU was released): vCPU, seq, event id, KVMI action, new_val, stall time.
   */
  onReplied: ((vcpu: number, seq: number, eventId: number, action: number, newVal: bigint | undefined, ns: bigint) => void) | undefined;
  /** Paused by analysis (VmPauseControl): PAUSE events are held unanswered until resume. */
  private pausedByAnalysis = false;
  /** vCPUs holding a PAUSE event for the analysis pause. */
  private readonly pauseHeld = new Set<number>();
  /** vCPUs with a VM_PAUSE_VCPU in flight or its PAUSE event still to come. */
  private readonly pauseRequested = new Set<number>();

  constructor(private readonly opts: VmConnectionOptions) {
    this.uuid = opts.hello.uuidText;
    this.session = new KvmiSession(opts.socket, {
      leftover: opts.hello.leftover,
      firstSeq: 2,
      commandTimeoutMs: opts.commandTimeoutMs ?? 5000,
      ...(opts.maxQueuedBytes !== undefined ? { maxQueuedBytes: opts.maxQueuedBytes } : {}),
      onVcpuEvent: (view) => this.onEvent(view),
      onVmEvent: () => {
        this.opts.log('info', 'KVMI_VM_EVENT_UNHOOK received: detaching', { vm: this.uuid });
        void this.detach('unhook');
      },
      onEventReplyError: (seq, errno) => this.opts.log('warn', 'KVM refused an event reply', { vm: this.uuid, seq, errno }),
      onError: (err) => this.opts.log('error', `KVMI protocol error: ${err.message}`, { vm: this.uuid, code: err.code }),
      onClose: () => {
        this.state = 'closed';
        if (this.retryTimer) clearTimeout(this.retryTimer);
        this.held.clear();
        this.pauseHeld.clear();
        this.pauseRequested.clear();
        this.opts.onDetached?.(this, this.detaching ? 'detached' : 'connection closed');
      },
    });
  }

  get heldCount(): number {
    return this.held.size;
  }

  /** vCPUs currently stopped by an analysis pause (holding their PAUSE event). */
  get pausedVcpus(): number {
    return this.pauseHeld.size;
  }

  get paused(): boolean {
    return this.pausedByAnalysis;
  }

  /**
   * Pause the whole VM for analysis: VM_PAUSE_VCPU(wait=1) to every vCPU that is not already stopped
   * (or about to be); the PAUSE events are then held unanswered, exempt from any deadline. Idempotent.
   */
  async pause(): Promise<void> {
    this.pausedByAnalysis = true;
    const n = this.info?.vcpuCount ?? 0;
    const work: Promise<unknown>[] = [];
    for (let vcpu = 0; vcpu < n; vcpu++) {
      if (this.pauseHeld.has(vcpu) || this.pauseRequested.has(vcpu)) continue;
      this.pauseRequested.add(vcpu);
      work.push(
        this.session.request('VM_PAUSE_VCPU', { vcpu, wait: 1 }).catch((e: unknown) => {
          this.pauseRequested.delete(vcpu);
          throw e;
        }),
      );
    }
    await Promise.all(work);
  }

  /** Resume: answer every held PAUSE event CONTINUE. Idempotent. */
  resume(): void {
    this.pausedByAnalysis = false;
    for (const vcpu of [...this.pauseHeld]) {
      this.pauseHeld.delete(vcpu);
      this.replyHeld(vcpu, EventAction.CONTINUE);
    }
  }

  /**
   * Extend the protection plan (a newly installed policy needs more interception), then turn off the vCPU
   * events `retractable` names — asked when this step runs, so that it sees the guest as it is then (e.g. no
   * INT3 of analysis left: host-agent.ts). CRs, MSRs and page restrictions are never removed here. Plan changes
   * of one VM run one after the other: a later install that needs an event again re-enables it after an
   * earlier one turned it off, never before.
   */
  extendPlan(plan: ProtectionPlan, retractable?: () => readonly EventKey[]): Promise<void> {
    const run = async (): Promise<void> => {
      const cur = this.opts.plan;
      const merged: ProtectionPlan = {
        vcpuEvents: [...new Set([...cur.vcpuEvents, ...plan.vcpuEvents])],
        crs: [...new Set([...cur.crs, ...plan.crs])],
        msrs: [...new Set([...cur.msrs, ...plan.msrs])],
        pageAccess: cur.pageAccess,
      };
      this.opts.plan = merged;
      if (!this.info || this.detaching || this.session.isClosed) return;
      for (let vcpu = 0; vcpu < this.info.vcpuCount; vcpu++) if (!this.pendingVcpus.has(vcpu)) await this.protectVcpu(vcpu);
      if (retractable) await this.retractEvents(retractable());
    };
    const p = this.planChain.then(run, run);
    this.planChain = p.catch(() => undefined);
    return p;
  }

  /** Turn vCPU events off on every vCPU (VCPU_CONTROL_EVENTS enable=0) and drop them from the plan. */
  private async retractEvents(keys: readonly EventKey[]): Promise<void> {
    const drop = new Set(keys.filter((k) => events[k].enable === 'vcpu-control-events'));
    if (!drop.size) return;
    this.opts.plan = { ...this.opts.plan, vcpuEvents: this.opts.plan.vcpuEvents.filter((e) => !drop.has(e)) };
    const off = new Set<EventKey>();
    for (const [vcpu, st] of this.enabled) {
      for (const ev of drop) {
        if (!st.events.has(ev) || this.detaching || this.session.isClosed) continue;
        await this.session.request('VCPU_CONTROL_EVENTS', { vcpu, event_id: events[ev].id, enable: 0 });
        st.events.delete(ev);
        off.add(ev);
      }
    }
    if (off.size) this.opts.log('info', `interception turned off (the local policy no longer needs it): ${[...off].join(', ')}`, { vm: this.uuid });
  }

  /** The attach sequence. Resolves with the VM's info; rejects (and closes) if the VM cannot be used. */
  async attach(): Promise<VmInfo> {
    const s = this.session;
    const v = await s.adoptRequest('GET_VERSION', 1);
    if (!v.ok) throw new KvmiCommandError('KVMI_GET_VERSION', v.errno, 'GET_VERSION failed');
    if (v.value.version < 1) throw new KvmiError('bad-value', `KVMI version ${v.value.version} < 1`, true);
    const allowedCommands: string[] = [];
    for (const key of Object.keys(commands) as CommandKey[]) {
      const def = commands[key];
      if (def.alwaysAllowed) {
        allowedCommands.push(key);
        continue;
      }
      const r = await s.tryRequest('VM_CHECK_COMMAND', { id: def.id });
      if (r.ok) allowedCommands.push(key);
    }
    const allowedEvents: string[] = [];
    for (const key of Object.keys(events) as EventKey[]) {
      const r = await s.tryRequest('VM_CHECK_EVENT', { id: events[key].id });
      if (r.ok) allowedEvents.push(key);
    }
    const can = (k: CommandKey) => allowedCommands.includes(k);
    if (!can('VM_GET_INFO')) throw new KvmiError('bad-value', 'VM_GET_INFO is not allowed: cannot learn the vCPU count', true);
    const { vcpu_count } = await s.request('VM_GET_INFO', {});
    if (can('VM_CONTROL_EVENTS') && allowedEvents.includes('UNHOOK')) {
      await s.request('VM_CONTROL_EVENTS', { event_id: events.UNHOOK.id, enable: 1 });
    } else {
      this.opts.log('warn', 'UNHOOK event not available: the agent will not hear about migrations/shutdown in advance', { vm: this.uuid });
    }
    let gfnLimit: VmInfo['gfnLimit'] = { value: null, source: 'unknown' };
    if (this.opts.hello.maxGpa !== undefined) gfnLimit = { value: (this.opts.hello.maxGpa >> 12n) + 1n, source: 'handshake' };
    else if (can('VM_GET_MAX_GFN')) {
      const g = await s.tryRequest('VM_GET_MAX_GFN', {});
      if (g.ok) gfnLimit = { value: g.value.gfn, source: 'VM_GET_MAX_GFN' };
    }
    if (gfnLimit.source === 'unknown') this.opts.log('warn', 'gfn limit unknown (no max_gpa in the handshake, no VM_GET_MAX_GFN)', { vm: this.uuid });
    this.info = {
      uuid: this.uuid,
      name: this.opts.hello.name,
      startTimeMs: this.opts.hello.startTimeMs,
      sessionGeneration: this.opts.sessionGeneration,
      version: v.value.version,
      maxMsgSize: v.value.max_msg_size,
      singlestep: v.value.features.singlestep === 1,
      vcpuCount: vcpu_count,
      allowedCommands,
      allowedEvents,
      gfnLimit,
    };
    await this.applyPageAccess(this.opts.plan.pageAccess);
    for (let i = 0; i < vcpu_count; i++) this.pendingVcpus.add(i);
    await this.protectPendingVcpus();
    return this.info;
  }

  /** vCPUs whose controls are not applied yet (not brought up by the guest: EAGAIN). */
  get vcpusPending(): number[] {
    return [...this.pendingVcpus];
  }

  private async protectPendingVcpus(): Promise<void> {
    for (const vcpu of [...this.pendingVcpus]) {
      try {
        await this.protectVcpu(vcpu);
        this.pendingVcpus.delete(vcpu);
      } catch (e) {
        if (e instanceof KvmiCommandError && e.errno === KvmErrno.EAGAIN) continue;
        throw e;
      }
    }
    if (!this.detaching && !this.session.isClosed) this.state = this.pendingVcpus.size === 0 ? 'protected' : 'partial';
    if (this.pendingVcpus.size > 0 && !this.session.isClosed && !this.detaching) {
      this.retryTimer = setTimeout(() => {
        this.protectPendingVcpus().catch((e: unknown) => this.opts.log('error', `protecting vCPUs failed: ${(e as Error).message}`, { vm: this.uuid }));
      }, this.opts.eagainRetryMs ?? 50);
    }
  }

  private async protectVcpu(vcpu: number): Promise<void> {
    const s = this.session;
    const plan = this.opts.plan;
    const state = this.enabled.get(vcpu) ?? { events: new Set<EventKey>(), crs: new Set<number>(), msrs: new Set<number>() };
    this.enabled.set(vcpu, state);
    for (const ev of plan.vcpuEvents) {
      if (state.events.has(ev) || events[ev].enable !== 'vcpu-control-events') continue;
      await s.request('VCPU_CONTROL_EVENTS', { vcpu, event_id: events[ev].id, enable: 1 });
      state.events.add(ev);
    }
    for (const cr of plan.crs) {
      if (state.crs.has(cr)) continue;
      await s.request('VCPU_CONTROL_CR', { vcpu, cr, enable: 1 });
      state.crs.add(cr);
    }
    for (const msr of plan.msrs) {
      if (state.msrs.has(msr)) continue;
      await s.request('VCPU_CONTROL_MSR', { vcpu, msr, enable: 1 });
      state.msrs.add(msr);
    }
  }

  /** Restrict (or release, with access 7) pages; remembers what to reset on detach. */
  async applyPageAccess(entries: { gpa: bigint; access: number }[]): Promise<void> {
    for (let i = 0; i < entries.length; i += 511) {
      const chunk = entries.slice(i, i + 511);
      await this.session.request('VM_SET_PAGE_ACCESS', { entries: chunk });
      for (const e of chunk) {
        const page = e.gpa & ~0xfffn;
        if (e.access === PageAccess.RWX) this.restricted.delete(page);
        else this.restricted.add(page);
      }
    }
  }

  /** Write guest memory, remembering the original bytes so detach can restore them exactly. */
  async plant(gpa: bigint, data: Uint8Array): Promise<void> {
    if (!this.planted.has(gpa)) {
      const orig = await this.session.request('VM_READ_PHYSICAL', { gpa, size: data.length });
      this.planted.set(gpa, orig.data);
    }
    await this.session.request('VM_WRITE_PHYSICAL', { gpa, data });
  }

  /** Restore planted bytes at one address (e.g. `trace stop`). */
  async unplant(gpa: bigint): Promise<void> {
    const orig = this.planted.get(gpa);
    if (!orig) return;
    await this.session.request('VM_WRITE_PHYSICAL', { gpa, data: orig });
    this.planted.delete(gpa);
  }

  /**
   * VM_WRITE_PHYSICAL on behalf of analysis, remembering each changed byte's original (read first, unless
   * already remembered: a byte written twice keeps its first original) so that detach restores it; writing
   * a byte's original back forgets it. Resolves with KVM's answer (the errno when the write failed).
   */
  writeRemembered(gpa: bigint, data: Uint8Array, timeoutMs?: number): Promise<{ ok: true } | { ok: false; errno: number }> {
    const run = async (): Promise<{ ok: true } | { ok: false; errno: number }> => {
      let before: Uint8Array | undefined;
      for (let i = 0; i < data.length; i++) {
        if (!this.remembered.has(gpa + BigInt(i))) {
          const r = await this.session.tryRequest('VM_READ_PHYSICAL', { gpa, size: data.length }, timeoutMs);
          if (!r.ok) return { ok: false, errno: r.errno };
          before = r.value.data;
          break;
        }
      }
      // New and changed records are in place before the write is sent: an event the new bytes cause (a vCPU
      // hitting a fresh INT3) can be read from the socket in the same chunk as the write's reply, before this
      // function resumes. They are also persisted first (write-ahead), so a kill -9 between the write and its
      // reply never leaves an INT3 nobody knows about; a record whose byte never landed is dropped as "changed by
      // the guest" at the next re-attach, which reads the byte first. A byte written back to its original is
      // forgotten only once KVM has applied the write (until then the guest may still hold what analysis wrote).
      const undo = new Map<bigint, RememberedByte | undefined>();
      const forget: bigint[] = [];
      for (let i = 0; i < data.length; i++) {
        const at = gpa + BigInt(i);
        const cur = this.remembered.get(at);
        const value = data[i]!;
        if (cur) {
          if (value === cur.original) forget.push(at);
          else if (value !== cur.written) {
            undo.set(at, { ...cur });
            cur.written = value;
          }
        } else if (before && before[i] !== value) {
          undo.set(at, undefined);
          this.remembered.set(at, { original: before[i]!, written: value });
        }
      }
      if (undo.size) this.onRememberedChange?.(this);
      const w = await this.session.tryRequest('VM_WRITE_PHYSICAL', { gpa, data }, timeoutMs).catch((e: unknown) => e as Error);
      if (w instanceof Error || !w.ok) {
        for (const [at, b] of undo) {
          if (b) this.remembered.set(at, b);
          else this.remembered.delete(at);
        }
        if (undo.size) this.onRememberedChange?.(this);
        if (w instanceof Error) throw w;
        return { ok: false, errno: w.errno };
      }
      if (forget.length) {
        for (const at of forget) this.remembered.delete(at);
        this.onRememberedChange?.(this);
      }
      return { ok: true };
    };
    const p = this.rememberChain.then(run, run);
    this.rememberChain = p.catch(() => undefined);
    return p;
  }

  /** The byte analysis wrote at `gpa` and the guest's original, when analysis changed it. */
  rememberedAt(gpa: bigint): RememberedByte | undefined {
    return this.remembered.get(gpa);
  }

  /** Every byte analysis changed (gpa → original, written). */
  rememberedBytes(): ReadonlyMap<bigint, RememberedByte> {
    return this.remembered;
  }

  /** Take over bytes a previous agent process remembered (restart after kill -9); `restoreRemembered` writes them back. */
  adoptRemembered(bytes: Iterable<[bigint, RememberedByte]>): void {
    for (const [gpa, b] of bytes) if (!this.remembered.has(gpa)) this.remembered.set(gpa, { ...b });
  }

  /**
   * Write the guest's original byte back at `gpa` and forget it. With `onlyIfWritten`, only when the guest
   * still holds the byte analysis wrote (a restarted agent must not overwrite what the guest changed since).
   */
  restoreRemembered(gpa: bigint, onlyIfWritten = false): Promise<'restored' | 'changed' | 'absent'> {
    const run = async (): Promise<'restored' | 'changed' | 'absent'> => {
      const b = this.remembered.get(gpa);
      if (!b) return 'absent';
      if (onlyIfWritten) {
        const cur = await this.session.request('VM_READ_PHYSICAL', { gpa, size: 1 });
        if (cur.data[0] !== b.written) {
          this.remembered.delete(gpa);
          this.onRememberedChange?.(this);
          return 'changed';
        }
      }
      await this.session.request('VM_WRITE_PHYSICAL', { gpa, data: Uint8Array.of(b.original) });
      this.remembered.delete(gpa);
      this.onRememberedChange?.(this);
      return 'restored';
    };
    const p = this.rememberChain.then(run, run);
    this.rememberChain = p.catch(() => undefined);
    return p;
  }

  private onEvent(view: VcpuEventView): void {
    const t0 = process.hrtime.bigint();
    this.stats.events++;
    this.stats.eventsByKind.set(view.eventId, (this.stats.eventsByKind.get(view.eventId) ?? 0) + 1);
    if (this.detaching) {
      // Release anything that arrives while detaching, as CONTINUE with the guest's own value.
      this.replyContinue(view);
      return;
    }
    if (view.eventId === PAUSE_EVENT && this.pauseRequested.delete(view.vcpu)) {
      if (this.pausedByAnalysis) {
        // The analysis pause: hold the vCPU here, unanswered, until resume (no deadline applies).
        this.pauseHeld.add(view.vcpu);
        this.held.set(view.vcpu, { seq: view.seq, eventId: view.eventId, newVal: undefined, since: t0 });
        return;
      }
      // Resumed before the PAUSE event arrived: let it go at once.
      this.replyContinue(view);
      return;
    }
    let decision: EventDecision;
    try {
      decision = this.opts.decide(view, this);
    } catch (e) {
      this.opts.log('error', `verdict failed, answering CONTINUE: ${(e as Error).message}`, { vm: this.uuid, event: view.eventId });
      decision = { kind: 'reply', action: EventAction.CONTINUE };
      this.replyContinue(view);
      this.recordStall(t0, view.eventId, decision);
      return;
    }
    if (decision.kind !== 'reply') {
      this.held.set(view.vcpu, { seq: view.seq, eventId: view.eventId, newVal: proposedValue(view), since: t0 });
      if (decision.kind === 'skip') this.runSkip(this.session.copyEvent(view), decision);
      else if (decision.kind === 'inject') this.runInject(view.vcpu, decision, decision.rewind ? this.session.copyEvent(view) : undefined);
      else if (decision.kind === 'work') this.runWork(view.vcpu, view.seq, decision);
      return;
    }
    this.session.replyToEvent(view.seq, view.vcpu, view.eventId, decision.action, decision.newVal);
    const ns = this.recordStall(t0, view.eventId, decision);
    this.onReplied?.(view.vcpu, view.seq, view.eventId, decision.action, decision.newVal, ns);
  }

  private runSkip(e: DecodedEvent, decision: Extract<EventDecision, { kind: 'skip' }>): void {
    if (e.kind !== 'vcpu-event') return;
    skipInstruction(this.session, e.vcpu, e.arch.mode, e.arch.regs, e.arch.sregs.cs.base)
      .then(() => {
        this.stats.skips++;
        this.replyHeld(e.vcpu, EventAction.RETRY);
      })
      .catch((err: unknown) => {
        this.stats.skipFailures++;
        this.opts.log('warn', `cannot skip the instruction at RIP; answering the fallback action: ${(err as Error).message}`, { vm: this.uuid, vcpu: e.vcpu, rule: decision.ruleId });
        this.replyHeld(e.vcpu, decision.fallback, proposedFromHeld(this.held.get(e.vcpu)));
      });
  }

  private runInject(vcpu: number, d: Extract<EventDecision, { kind: 'inject' }>, e?: DecodedEvent): void {
    const rewind = async (): Promise<void> => {
      if (!e || e.kind !== 'vcpu-event') return;
      try {
        await rewindInstruction(this.session, e.vcpu, e.arch.mode, e.arch.regs, e.arch.sregs.cs.base);
      } catch (err) {
        // The write is refused all the same; the exception then arrives after the instruction.
        this.opts.log('warn', `cannot move RIP back over the instruction; the exception follows it: ${(err as Error).message}`, { vm: this.uuid, vcpu, rule: d.ruleId });
      }
    };
    rewind()
      .then(() => this.session.request('VCPU_INJECT_EXCEPTION', { vcpu, nr: d.vector, error_code: d.errorCode, address: d.address }))
      .then(() => this.replyHeld(vcpu, d.then, d.newVal))
      .catch((err: unknown) => {
        this.opts.log('warn', `injection failed; answering CONTINUE: ${(err as Error).message}`, { vm: this.uuid, vcpu, rule: d.ruleId });
        this.replyHeld(vcpu, EventAction.CONTINUE, proposedFromHeld(this.held.get(vcpu)));
      });
  }

  private runWork(vcpu: number, seq: number, d: Extract<EventDecision, { kind: 'work' }>): void {
    d.run()
      .then((r) => this.replyHeldSeq(vcpu, seq, r.action, r.newVal))
      .catch((err: unknown) => {
        this.opts.log('warn', `held-event work failed; answering CONTINUE: ${(err as Error).message}`, { vm: this.uuid, vcpu, rule: d.ruleId });
        this.replyHeldSeq(vcpu, seq, EventAction.CONTINUE, proposedFromHeld(this.held.get(vcpu)));
      });
  }

  /** Answer an event previously held. */
  replyHeld(vcpu: number, action: number, newVal?: bigint): boolean {
    const h = this.held.get(vcpu);
    if (!h) return false;
    this.held.delete(vcpu);
    this.session.replyToEvent(h.seq, vcpu, h.eventId, action, newVal);
    const ns = this.recordStall(h.since, h.eventId, { kind: 'reply', action, ...(newVal !== undefined ? { newVal } : {}) });
    this.onReplied?.(vcpu, h.seq, h.eventId, action, newVal, ns);
    return true;
  }

  /** Answer the held event `seq` of `vcpu` — false when that event is not held any more (never a second reply). */
  replyHeldSeq(vcpu: number, seq: number, action: number, newVal?: bigint): boolean {
    const h = this.held.get(vcpu);
    if (!h || h.seq !== seq || this.session.isClosed) return false;
    return this.replyHeld(vcpu, action, newVal);
  }

  private replyContinue(view: VcpuEventView): void {
    this.session.replyToEvent(view.seq, view.vcpu, view.eventId, EventAction.CONTINUE, proposedValue(view));
  }

  private recordStall(t0: bigint, eventId: number, decision: EventDecision): bigint {
    const ns = process.hrtime.bigint() - t0;
    this.stats.stallNsTotal += ns;
    this.onStall?.(ns, eventId, decision);
    return ns;
  }

  /**
   * Leave the guest exactly as found: restore planted bytes, reset restricted pages, disable events,
   * release held events, close. Bounded by `deadlineMs` (default 1000); the socket is closed at the
   * deadline whatever remains (KVM then releases waiting vCPUs as CONTINUE, §8).
   */
  detach(reason: string, deadlineMs = 1000): Promise<void> {
    if (this.detaching) return this.detaching;
    this.opts.log('info', `detaching: ${reason}`, { vm: this.uuid });
    this.state = 'detaching';
    if (this.retryTimer) clearTimeout(this.retryTimer);
    const work = (async () => {
      const s = this.session;
      // Held events first: a vCPU waiting on us must not wait for the cleanup.
      this.pausedByAnalysis = false;
      this.pauseHeld.clear();
      for (const [vcpu, h] of [...this.held]) {
        this.held.delete(vcpu);
        s.replyToEvent(h.seq, vcpu, h.eventId, EventAction.CONTINUE, h.newVal);
      }
      for (const gpa of [...this.planted.keys()]) await this.unplant(gpa);
      for (const gpa of [...this.remembered.keys()]) await this.restoreRemembered(gpa);
      if (this.restricted.size > 0) await this.applyPageAccess([...this.restricted].map((gpa) => ({ gpa, access: PageAccess.RWX })));
      for (const [vcpu, st] of this.enabled) {
        for (const msr of st.msrs) await s.request('VCPU_CONTROL_MSR', { vcpu, msr, enable: 0 });
        for (const cr of st.crs) await s.request('VCPU_CONTROL_CR', { vcpu, cr, enable: 0 });
        for (const ev of st.events) await s.request('VCPU_CONTROL_EVENTS', { vcpu, event_id: events[ev].id, enable: 0 });
      }
      this.enabled.clear();
    })();
    const deadline = new Promise<'timeout'>((r) => setTimeout(() => r('timeout'), deadlineMs).unref());
    this.detaching = Promise.race([work.then(() => 'done' as const), deadline])
      .then((outcome) => {
        if (outcome === 'timeout') this.opts.log('warn', `detach did not finish within ${deadlineMs} ms; closing anyway`, { vm: this.uuid });
      })
      .catch((e: unknown) => this.opts.log('warn', `detach cleanup failed: ${(e as Error).message}`, { vm: this.uuid }))
      .finally(() => this.session.close());
    return this.detaching;
  }
}

/** A byte analysis changed: the guest's original and the value written. */
export interface RememberedByte {
  original: number;
  written: number;
}

function proposedFromHeld(h: HeldEvent | undefined): bigint | undefined {
  return h?.newVal;
}

/** The value the guest proposed, for CONTINUE replies that must not change it (CR/MSR). */
function proposedValue(view: VcpuEventView): bigint | undefined {
  if (view.eventId === CR_EVENT) return view.specificU64(structs.kvmi_vcpu_event_cr, 'new_value');
  if (view.eventId === MSR_EVENT) return view.specificU64(structs.kvmi_vcpu_event_msr, 'new_value');
  return undefined;
}
