/**
 * A simulated vCPU: KVM's vCPU thread with its introspection state (`struct kvm_vcpu_introspection`)
 * and the guest instructions it runs.
 *
 * Two strands run per vCPU, as in KVM:
 * - the **job strand** executes the vCPU commands and event replies that the receive thread queued for
 *   this vCPU (FIFO, each after a seeded jitter), and sends each command's reply itself — so replies for
 *   different vCPUs overtake each other (§2.3). It runs whether or not the vCPU waits for an event
 *   reply: commands sent to a waiting vCPU are executed (§2.6);
 * - the **main strand** is the vCPU's run loop: before each guest entry it waits for the queued jobs to
 *   drain, sends a pending TRAP, then one PAUSE event per pause request (low priority), injects a
 *   queued exception, and only then runs the next guest instruction requested through the guest-action
 *   API. Any event blocks the strand until the reply (or a release) arrives.
 */
import {
  checkEventReply,
  encodeErrorReply,
  encodeReply,
  encodeVcpuEvent,
  events,
  KVMI_INVALID_GPA,
  runCommandChecks,
  type AnyEventDef,
  type EventDef,
  type EventKey,
  type KernelMessage,
  type structs,
} from '@periscope/kvmi';

import { SimError } from '../errors.js';
import { cloneSregs, CpuState, mtrrType, VECTOR, VECTORS_WITH_ERROR_CODE, xcr0Invalid, xsaveRejected } from '../guest/cpu.js';
import { gfnOf, PAGE_SIZE, type GuestMemory } from '../guest/memory.js';
import { translate } from '../guest/paging.js';
import type { HostProfile } from '../profile.js';
import { deriveSeed, mulberry32, randInt, type Prng } from '../prng.js';
import type { KvmiHook } from './hook.js';
import { actsAsContinue, endOf, type EventOutcome, type EventRecord, type GuestResult, type VmStats } from './types.js';

type KvmRegs = structs.KvmRegs;
type CommandMsg = Extract<KernelMessage, { kind: 'command' }>;
type Req = Record<string, unknown>;

/** What a vCPU needs from its VM (implemented by SimVm). */
export interface VcpuHost {
  readonly currentHook: KvmiHook | null;
  readonly memory: GuestMemory;
  readonly profile: HostProfile;
  /** EPT restrictions: gfn → allowed access bits (absent = rwx). */
  readonly restrictions: ReadonlyMap<number, number>;
  readonly paddingNoise: boolean;
  readonly stats: VmStats;
  readonly stallThresholdMs: number;
  /** A protocol error on this hook: shut the socket down (§10). */
  hardError(hook: KvmiHook, reason: string): void;
  /** Simulator bug: count it and drop the connection. */
  internalError(err: unknown): void;
  vcpuCrashed(index: number): void;
}

type Job =
  | { kind: 'command'; hook: KvmiHook; msg: CommandMsg }
  | { kind: 'reply'; hook: KvmiHook; seq: number; payload: Buffer }
  | { kind: 'release' };

interface Waiting {
  seq: number;
  event: AnyEventDef;
  since: number;
  resolve(o: EventOutcome): void;
}

/** Per-hook vCPU state: freed by UNHOOK (§8). */
interface VcpuIntro {
  readonly hook: KvmiHook;
  jobs: Job[];
  /** VCPU_CONTROL_EVENTS bits (event ids). */
  readonly enabled: Set<number>;
  /** VCPU_CONTROL_CR. */
  readonly crs: Set<number>;
  /** VCPU_CONTROL_MSR. */
  readonly msrs: Set<number>;
  pauseRequests: number;
  waiting: Waiting | null;
  /** VCPU_SET_REGISTERS, applied when the reply is processed. */
  delayedRegs: KvmRegs | null;
  /** VCPU_INJECT_EXCEPTION not yet injected. */
  exception: { nr: number; errorCode: number; address: bigint } | null;
  /** TRAP event to send before any other event. */
  trap: { nr: number; error_code: number; address: bigint } | null;
  singlestep: boolean;
}

/** KVM's own interception state that the tool changes and UNHOOK restores (when restore_on_unhook). */
export interface KvmInterceptions {
  /** #BP intercepted for the tool (guest debug). */
  breakpoint: boolean;
  /** CR3-write exits. */
  cr3: boolean;
  /** Descriptor-table exits. */
  descriptor: boolean;
  /** MSRs whose writes are intercepted. */
  readonly msrs: Set<number>;
}

export interface VcpuOptions {
  index: number;
  seed: number;
  jitterMs: number;
  online: boolean;
  cr3: bigint;
  rip: bigint;
  rsp: bigint;
}

interface GuestCtx {
  events: EventRecord[];
  /** The instruction caused a VM exit other than an EPT violation (for SINGLESTEP `failed`). */
  otherExit: boolean;
}
type GuestBody = Omit<GuestResult, 'events' | 'crashed'>;

interface QueuedInsn {
  run(ctx: GuestCtx): Promise<GuestBody>;
  resolve(r: GuestResult): void;
}

const ID = {
  PAUSE: events.PAUSE.id,
  HYPERCALL: events.HYPERCALL.id,
  BREAKPOINT: events.BREAKPOINT.id,
  CR: events.CR.id,
  XSETBV: events.XSETBV.id,
  DESCRIPTOR: events.DESCRIPTOR.id,
  MSR: events.MSR.id,
  PF: events.PF.id,
} as const;

const KVM_ENOSYS_RAX = BigInt.asUintN(64, -1000n);
const MAX_EXCEPTION_LOG = 256;
const ACCESS_BIT = { r: 1, w: 2, x: 4 } as const;

export type AccessKind = keyof typeof ACCESS_BIT;
export type AccessTarget = { gpa: bigint } | { gva: bigint };
/** KVMI_DESC_IDTR / GDTR / LDTR / TR. */
export type DescriptorId = 1 | 2 | 3 | 4;

const immediate = (): Promise<void> => new Promise((r) => setImmediate(r));
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export class SimVcpu {
  readonly index: number;
  /** Architectural state (registers, MSRs, XCR0, xsave, CPUID). */
  readonly cpu: CpuState;
  /** KVM_MP_STATE_UNINITIALIZED until the guest brings the AP up. */
  private online: boolean;
  private crashed_ = false;
  private intro: VcpuIntro | null = null;
  readonly interceptions: KvmInterceptions = { breakpoint: false, cr3: false, descriptor: false, msrs: new Set() };
  /** The last exceptions delivered to the guest (injected by the tool, #BP, #GP, #PF), oldest first. */
  readonly deliveredExceptions: Array<{ vector: number; errorCode: number | undefined }> = [];
  private readonly prng: Prng;
  private readonly noise: Prng;
  private readonly jitterMs: number;
  private jobsRunning = false;
  private idleWaiters: Array<() => void> = [];
  private mainActive = false;
  private mainScheduled = false;
  private readonly insns: QueuedInsn[] = [];

  constructor(
    private readonly vm: VcpuHost,
    opts: VcpuOptions,
  ) {
    this.index = opts.index;
    this.online = opts.online;
    this.jitterMs = opts.jitterMs;
    this.prng = mulberry32(deriveSeed(opts.seed, 1, opts.index));
    this.noise = mulberry32(deriveSeed(opts.seed, 2, opts.index));
    this.cpu = new CpuState({
      apicId: opts.index, bsp: opts.index === 0, cr3: opts.cr3, xsaveFeatures: vm.profile.xsaveFeatures, rip: opts.rip, rsp: opts.rsp,
    });
  }

  // ---- state as KVM sees it -----------------------------------------------------------------------

  /** mp_state is not UNINITIALIZED. */
  get isOnline(): boolean {
    return this.online;
  }
  get isCrashed(): boolean {
    return this.crashed_;
  }
  /** §2.5 step 4: not UNINITIALIZED, or waiting for an event reply. */
  get isReady(): boolean {
    return this.online || this.intro?.waiting != null;
  }
  /** Waiting for the reply to this event (or null). */
  get waitingFor(): { event: EventKey; seq: number; sinceMs: number } | null {
    const w = this.intro?.waiting;
    return w ? { event: w.event.key as EventKey, seq: w.seq, sinceMs: w.since } : null;
  }
  get pendingPauseRequests(): number {
    return this.intro?.pauseRequests ?? 0;
  }
  get singlestepping(): boolean {
    return this.intro?.singlestep ?? false;
  }
  /** Per-hook introspection state exists (HOOK fails with EEXIST while it does). */
  get hasIntrospectionState(): boolean {
    return this.intro !== null;
  }
  /** Enabled vCPU event ids (VCPU_CONTROL_EVENTS). */
  get enabledEvents(): number[] {
    return this.intro ? [...this.intro.enabled].sort((a, b) => a - b) : [];
  }
  /** Queued vCPU jobs (commands, event replies, release). */
  get queuedJobs(): number {
    return this.intro?.jobs.length ?? 0;
  }

  // ---- hook lifecycle (called by the VM) ----------------------------------------------------------

  /** @internal HOOK: fresh per-vCPU state. */
  initIntrospection(hook: KvmiHook): void {
    this.intro = {
      hook, jobs: [], enabled: new Set(), crs: new Set(), msrs: new Set(), pauseRequests: 0, waiting: null,
      delayedRegs: null, exception: null, trap: null, singlestep: false,
    };
  }

  /** @internal UNHOOK: release any wait, drop queued jobs, free the state, restore interceptions. */
  freeIntrospection(restore: boolean): void {
    const intro = this.intro;
    if (!intro) return;
    this.releaseWait(intro);
    intro.jobs = [];
    this.intro = null;
    if (restore) {
      this.interceptions.breakpoint = false;
      this.interceptions.cr3 = false;
      this.interceptions.descriptor = false;
      this.interceptions.msrs.clear();
    }
    this.wakeIdle();
    this.kickMain();
  }

  /** @internal Receive thread: queue a vCPU command (§2.5 step 5). */
  queueCommand(hook: KvmiHook, msg: CommandMsg): void {
    this.queueJob({ kind: 'command', hook, msg });
  }
  /** @internal Receive thread: queue an event reply. */
  queueReply(hook: KvmiHook, seq: number, payload: Buffer): void {
    this.queueJob({ kind: 'reply', hook, seq, payload });
  }
  /** @internal Connection loss: the release job (§8). */
  queueRelease(): void {
    this.queueJob({ kind: 'release' });
  }

  /** @internal VM_PAUSE_VCPU: one more PAUSE event to send. */
  addPauseRequest(): void {
    if (!this.intro) return;
    this.intro.pauseRequests++;
    this.kickMain();
  }

  // ---- guest control ----------------------------------------------------------------------------

  /** INIT/SIPI: the AP leaves KVM_MP_STATE_UNINITIALIZED (in the BSP's long mode, as after the guest's trampoline). */
  bringUp(): void {
    if (this.online) return;
    this.online = true;
    this.kickMain();
  }

  /** A host-initiated MSR write (KVM_SET_MSRS from the device manager): never an MSR event. */
  setMsrFromHost(msr: number, value: bigint): boolean {
    return this.cpu.writeMsr(msr, value);
  }

  // ---- guest actions ------------------------------------------------------------------------------

  /** `mov crN, value` (N = 0, 3, 4). */
  writeCr(cr: 0 | 3 | 4, value: bigint): Promise<GuestResult> {
    if (cr !== 0 && cr !== 3 && cr !== 4) throw new SimError('invalid-argument', `CR${String(cr)} is not interceptable`);
    return this.guest(async (ctx) => {
      const old = this.cpu.readCr(cr);
      const proposed = BigInt.asUintN(64, value);
      const intro = this.intro;
      if (intro && intro.enabled.has(ID.CR) && intro.crs.has(cr) && old !== proposed) {
        ctx.otherExit = true;
        const o = await this.raise(ctx, 'CR', { cr, old_value: old, new_value: proposed });
        if (o.kind === 'reply' && o.action === 'CONTINUE') {
          this.cpu.writeCr(cr, o.newVal ?? 0n);
          return { outcome: 'completed', value: this.cpu.readCr(cr) };
        }
        if (!actsAsContinue(o)) return this.gp(old);
      }
      this.cpu.writeCr(cr, proposed);
      return { outcome: 'completed', value: proposed };
    });
  }

  /** Guest `wrmsr` (ECX = msr, EDX:EAX = value). */
  wrmsr(msr: number, value: bigint): Promise<GuestResult> {
    return this.guest(async (ctx) => {
      const proposed = BigInt.asUintN(64, value);
      const old = this.cpu.readMsr(msr);
      if (old === undefined) return this.gp(undefined);
      const intro = this.intro;
      if (intro && intro.enabled.has(ID.MSR) && intro.msrs.has(msr) && old !== proposed) {
        ctx.otherExit = true;
        const o = await this.raise(ctx, 'MSR', { msr, old_value: old, new_value: proposed });
        if (o.kind === 'reply' && o.action === 'CONTINUE') {
          this.cpu.writeMsr(msr, o.newVal ?? 0n);
          return { outcome: 'completed', value: this.cpu.readMsr(msr) ?? 0n };
        }
        if (!actsAsContinue(o)) return this.gp(old);
      }
      this.cpu.writeMsr(msr, proposed);
      return { outcome: 'completed', value: proposed };
    });
  }

  /** Guest `xsetbv` with ECX = 0 (XCR0). The event is informational: XCR0 is written first. */
  xsetbv(value: bigint): Promise<GuestResult> {
    return this.guest(async (ctx) => {
      const v = BigInt.asUintN(64, value);
      if (xcr0Invalid(v, this.vm.profile.xsaveFeatures)) return this.gp(this.cpu.xcr0);
      const old = this.cpu.xcr0;
      this.cpu.xcr0 = v;
      const intro = this.intro;
      if (intro && intro.enabled.has(events.XSETBV.id) && old !== v) {
        ctx.otherExit = true;
        await this.raise(ctx, 'XSETBV', { xcr: 0, old_value: old, new_value: v });
      }
      return { outcome: 'completed', value: v };
    });
  }

  /** Guest `int3` at the current RIP. */
  int3(): Promise<GuestResult> {
    return this.guest(async (ctx) => {
      const intro = this.intro;
      if (intro && intro.enabled.has(ID.BREAKPOINT)) {
        ctx.otherExit = true;
        const linear = this.cpu.sregs.cs.base + this.cpu.regs.rip;
        const gpa = translate(this.vm.memory, this.cpu.paging, linear) ?? KVMI_INVALID_GPA;
        const o = await this.raise(ctx, 'BREAKPOINT', { gpa, insn_len: 1 });
        if (!actsAsContinue(o)) return { outcome: 'retry' };
        return this.deliver(VECTOR.BP, undefined);
      }
      if (this.vm.profile.userspaceBpDebug) return { outcome: 'userspace-exit' };
      return this.deliver(VECTOR.BP, undefined);
    });
  }

  /**
   * Guest `vmcall`. The registers given are loaded first; the default is the KVMI hypercall
   * (RAX = 34, RDI = 24, RSI = 0). `value` is RAX afterwards.
   */
  vmcall(regs: Partial<Pick<KvmRegs, 'rax' | 'rbx' | 'rcx' | 'rdx' | 'rsi' | 'rdi'>> = {}): Promise<GuestResult> {
    return this.guest(async (ctx) => {
      const load = { rax: 34n, rdi: 24n, rsi: 0n, ...regs };
      this.cpu.regs = { ...this.cpu.regs, ...load };
      const r = this.cpu.regs;
      let ret = KVM_ENOSYS_RAX;
      if ((r.rax & 0xffffffffn) === 34n) {
        const long = this.cpu.mode === 8;
        const a0 = long ? r.rdi : r.rbx & 0xffffffffn;
        const a1 = long ? r.rsi : r.rcx & 0xffffffffn;
        const intro = this.intro;
        if (intro && intro.enabled.has(ID.HYPERCALL) && a0 === 24n && a1 === 0n) {
          ctx.otherExit = true;
          const o = await this.raise(ctx, 'HYPERCALL');
          ret = actsAsContinue(o) ? 0n : KVM_ENOSYS_RAX;
        }
      }
      this.cpu.regs = { ...this.cpu.regs, rax: ret };
      return { outcome: 'completed', value: ret };
    });
  }

  /** LIDT/SIDT/LGDT/SGDT/LLDT/SLDT/LTR/STR: `write` = load (the register is written). */
  descriptorAccess(descriptor: DescriptorId, write: boolean): Promise<GuestResult> {
    if (![1, 2, 3, 4].includes(descriptor)) throw new SimError('invalid-argument', `descriptor ${String(descriptor)} is not 1..4`);
    return this.guest(async (ctx) => {
      const intro = this.intro;
      if (intro && intro.enabled.has(ID.DESCRIPTOR)) {
        ctx.otherExit = true;
        const o = await this.raise(ctx, 'DESCRIPTOR', { descriptor, write: write ? 1 : 0 });
        if (!actsAsContinue(o)) return { outcome: 'retry' };
      }
      return { outcome: 'completed' };
    });
  }

  /**
   * A guest memory access through a gva (walked with the guest's page tables) or straight to a gpa.
   * Reads return `length` bytes (default 8); writes store `data`. The access must stay within a page.
   */
  access(target: AccessTarget, kind: AccessKind, opts: { data?: Uint8Array; length?: number } = {}): Promise<GuestResult> {
    const bit = ACCESS_BIT[kind];
    if (bit === undefined) throw new SimError('invalid-argument', `access kind must be r, w or x`);
    const len = kind === 'w' ? (opts.data?.length ?? 1) : (opts.length ?? 8);
    return this.guest(async (ctx) => {
      let gva: bigint;
      let gpa: bigint;
      if ('gva' in target) {
        gva = BigInt.asUintN(64, target.gva);
        const t = translate(this.vm.memory, this.cpu.paging, gva);
        if (t === null) {
          this.cpu.sregs = { ...this.cpu.sregs, cr2: gva };
          // #PF error code: not present (P = 0), W/R from the access, I/D for fetches, supervisor.
          this.recordException({ vector: VECTOR.PF, errorCode: (kind === 'w' ? 0x2 : 0) | (kind === 'x' ? 0x10 : 0) });
          return { outcome: 'page-fault', vector: VECTOR.PF };
        }
        gpa = t;
      } else {
        gpa = BigInt.asUintN(64, target.gpa);
        gva = KVMI_INVALID_GPA;
      }
      if (Number(gpa & 0xfffn) + len > PAGE_SIZE) throw new SimError('invalid-argument', 'a guest access must stay within one page');
      if (!this.vm.memory.isBacked(gpa)) return { outcome: 'mmio' };
      const allowed = this.vm.restrictions.get(gfnOf(gpa));
      const intro = this.intro;
      if (allowed !== undefined && (bit & ~allowed) !== 0 && intro && intro.enabled.has(ID.PF)) {
        const o = await this.raise(ctx, 'PF', { gva, gpa, access: bit });
        if (!actsAsContinue(o)) return { outcome: 'retry' };
      }
      if (kind === 'w') {
        this.vm.memory.write(gpa, opts.data ?? new Uint8Array(1));
        return { outcome: 'completed' };
      }
      if (kind === 'r') return { outcome: 'completed', data: new Uint8Array(this.vm.memory.read(gpa, len)!) };
      return { outcome: 'completed' };
    });
  }

  // ---- the main strand --------------------------------------------------------------------------------

  private guest(run: (ctx: GuestCtx) => Promise<GuestBody>): Promise<GuestResult> {
    if (!this.online) return Promise.resolve({ outcome: 'vcpu-offline', events: [], crashed: false });
    return new Promise<GuestResult>((resolve) => {
      this.insns.push({ run, resolve });
      this.kickMain();
    });
  }

  private recordException(e: { vector: number; errorCode: number | undefined }): void {
    this.deliveredExceptions.push(e);
    if (this.deliveredExceptions.length > MAX_EXCEPTION_LOG) this.deliveredExceptions.shift();
  }

  private gp(value: bigint | undefined): GuestBody {
    this.recordException({ vector: VECTOR.GP, errorCode: 0 });
    return value === undefined ? { outcome: 'gp', vector: VECTOR.GP } : { outcome: 'gp', vector: VECTOR.GP, value };
  }

  private deliver(vector: number, errorCode: number | undefined): GuestBody {
    this.recordException({ vector, errorCode });
    return { outcome: 'exception', vector };
  }

  /** Wake the run loop, as a kick (KVM_REQ_INTROSPECTION + IPI) would: on a later turn of the event loop. */
  private kickMain(): void {
    if (this.mainActive || this.mainScheduled) return;
    this.mainScheduled = true;
    setImmediate(() => {
      this.mainScheduled = false;
      if (this.mainActive) return;
      this.mainActive = true;
      this.mainLoop()
        .catch((err: unknown) => this.vm.internalError(err))
        .finally(() => {
          this.mainActive = false;
          if (this.hasMainWork()) this.kickMain();
        });
    });
  }

  private hasMainWork(): boolean {
    if (!this.online) return false;
    const intro = this.intro;
    if (!this.crashed_ && intro && (intro.trap || intro.pauseRequests > 0 || intro.exception)) return true;
    return this.insns.length > 0;
  }

  private async mainLoop(): Promise<void> {
    for (;;) {
      // kvmi_handle_requests: run the queued jobs first.
      while (this.jobsBusy) await new Promise<void>((r) => this.idleWaiters.push(r));
      if (!this.online) return;
      const intro = this.intro;
      if (intro && !this.crashed_) {
        if (intro.trap) {
          const o = await this.raise(null, 'TRAP');
          if (o.kind === 'reply' && o.action === 'CRASH') this.crash();
          continue;
        }
        if (intro.pauseRequests > 0) {
          intro.pauseRequests--;
          const o = await this.raise(null, 'PAUSE');
          if (o.kind === 'reply' && o.action === 'CRASH') this.crash();
          continue;
        }
        if (intro.exception) {
          this.inject(intro);
          continue;
        }
      }
      const insn = this.insns.shift();
      if (!insn) return;
      if (this.crashed_) {
        insn.resolve({ outcome: 'vcpu-crashed', events: [], crashed: true });
        continue;
      }
      const ctx: GuestCtx = { events: [], otherExit: false };
      const body = await insn.run(ctx);
      let crashed = ctx.events.some((e) => e.ended === 'CRASH');
      const after = this.intro;
      if (!crashed && after?.singlestep) {
        const o = await this.raise(ctx, 'SINGLESTEP', { failed: ctx.otherExit ? 1 : 0 });
        crashed = o.kind === 'reply' && o.action === 'CRASH';
      }
      if (crashed) this.crash();
      insn.resolve({ ...body, events: ctx.events, crashed });
    }
  }

  private crash(): void {
    if (this.crashed_) return;
    this.crashed_ = true;
    this.vm.vcpuCrashed(this.index);
  }

  /** Guest entry with a queued exception: inject it; the TRAP event reports what was injected. */
  private inject(intro: VcpuIntro): void {
    const e = intro.exception!;
    intro.exception = null;
    if (e.nr === VECTOR.PF) this.cpu.sregs = { ...this.cpu.sregs, cr2: e.address };
    const hasCode = VECTORS_WITH_ERROR_CODE.has(e.nr);
    this.recordException({ vector: e.nr, errorCode: hasCode ? e.errorCode : undefined });
    intro.trap = { nr: e.nr, error_code: hasCode ? e.errorCode : 0, address: this.cpu.sregs.cr2 };
  }

  /**
   * Send a vCPU event and block until it is answered (jobs keep running meanwhile). A pending TRAP is
   * sent first. Returns how the wait ended.
   */
  private async raise(ctx: GuestCtx | null, key: EventKey, data?: Record<string, unknown>): Promise<EventOutcome> {
    if (key !== 'TRAP' && this.intro?.trap) await this.raise(ctx, 'TRAP');
    const intro = this.intro;
    const hook = this.vm.currentHook;
    let data_ = data;
    if (key === 'TRAP' && intro?.trap) {
      data_ = { ...intro.trap };
      intro.trap = null;
    }
    let seq = 0;
    let outcome: EventOutcome;
    if (!intro || !hook || intro.hook !== hook || !hook.alive) {
      outcome = { kind: 'send-failed' };
    } else {
      seq = hook.nextSeq();
      const frame = encodeVcpuEvent({
        event: key,
        seq,
        vcpu: this.index,
        arch: this.cpu.eventArch(),
        ...(data_ ? { data: data_ } : {}),
        ...(this.vm.paddingNoise ? { paddingNoise: 1 + randInt(this.noise, 255) } : {}),
      });
      const since = Date.now();
      outcome = await new Promise<EventOutcome>((resolve) => {
        intro.waiting = { seq, event: events[key], since, resolve };
        if (!hook.send(frame)) {
          intro.waiting = null;
          resolve({ kind: 'send-failed' });
        } else this.vm.stats.eventsSent++;
      });
      const waited = Date.now() - since;
      if (waited > this.vm.stats.maxReplyWaitMs) this.vm.stats.maxReplyWaitMs = waited;
      if (waited > this.vm.stallThresholdMs) this.vm.stats.stalls++;
    }
    ctx?.events.push({ event: key, seq, ended: endOf(outcome) });
    return outcome;
  }

  private releaseWait(intro: VcpuIntro): void {
    const w = intro.waiting;
    intro.waiting = null;
    intro.delayedRegs = null;
    w?.resolve({ kind: 'released' });
  }

  // ---- the job strand -----------------------------------------------------------------------------

  private get jobsBusy(): boolean {
    return this.jobsRunning || (this.intro?.jobs.length ?? 0) > 0;
  }

  private queueJob(job: Job): void {
    const intro = this.intro;
    if (!intro) return;
    intro.jobs.push(job);
    if (!this.jobsRunning) void this.runJobs();
  }

  private jitter(): Promise<void> {
    const ms = this.jitterMs > 0 ? randInt(this.prng, this.jitterMs + 1) : 0;
    return ms === 0 ? immediate() : sleep(ms);
  }

  private async runJobs(): Promise<void> {
    this.jobsRunning = true;
    try {
      for (;;) {
        if (!this.intro || this.intro.jobs.length === 0) break;
        await this.jitter();
        const intro = this.intro;
        if (!intro) break;
        const job = intro.jobs.shift();
        if (!job) break;
        try {
          this.execJob(intro, job);
        } catch (err) {
          this.vm.internalError(err);
        }
      }
    } finally {
      this.jobsRunning = false;
      this.wakeIdle();
    }
  }

  private wakeIdle(): void {
    if (this.jobsBusy) return;
    const w = this.idleWaiters;
    this.idleWaiters = [];
    for (const r of w) r();
  }

  private execJob(intro: VcpuIntro, job: Job): void {
    switch (job.kind) {
      case 'release':
        intro.pauseRequests = 0;
        this.releaseWait(intro);
        intro.singlestep = false;
        return;
      case 'reply':
        return this.handleReply(intro, job.hook, job.seq, job.payload);
      case 'command':
        return this.handleCommand(intro, job.hook, job.msg);
    }
  }

  /** §5.3, on the vCPU thread. */
  private handleReply(intro: VcpuIntro, hook: KvmiHook, seq: number, payload: Buffer): void {
    this.vm.stats.eventReplies++;
    const w = intro.waiting;
    const r = checkEventReply({ seq, payload }, w ? { seq: w.seq, event: w.event as EventDef } : null);
    if (r.kind === 'hard-error') {
      if (w) this.releaseWaitAs(intro, { kind: 'hard-error', reason: r.reason });
      this.vm.hardError(hook, `bad event reply: ${r.reason}`);
      return;
    }
    // A valid reply: apply SET_REGISTERS, then let the event code act on the action.
    intro.waiting = null;
    if (intro.delayedRegs) {
      this.cpu.regs = intro.delayedRegs;
      intro.delayedRegs = null;
    }
    if (r.kind === 'unsupported-action') {
      w!.resolve({ kind: 'unsupported-action', action: r.action });
      this.vm.hardError(hook, `unsupported action ${r.action} for ${w!.event.name}`);
      return;
    }
    w!.resolve({ kind: 'reply', action: r.action, newVal: r.newVal });
  }

  private releaseWaitAs(intro: VcpuIntro, o: EventOutcome): void {
    const w = intro.waiting;
    intro.waiting = null;
    intro.delayedRegs = null;
    w?.resolve(o);
  }

  // ---- vCPU commands ------------------------------------------------------------------------------

  private handleCommand(intro: VcpuIntro, hook: KvmiHook, m: CommandMsg): void {
    const errno = runCommandChecks(m, hook.kernelState, (c) => this.stateFails(intro, c.key, m));
    this.vm.stats.commandsExecuted++;
    if (errno !== 0) {
      this.vm.stats.errorReplies++;
      hook.send(encodeErrorReply(m.def.id, m.seq, errno));
      return;
    }
    hook.send(this.execute(intro, m));
  }

  /** The catalog's `state` checks for vCPU commands (true = the check fails). */
  private stateFails(intro: VcpuIntro, key: string, m: CommandMsg): boolean {
    const r = m.request as Req;
    const p = this.vm.profile;
    switch (key) {
      case 'event-allowed':
        return !intro.hook.isEventAllowed(r['event_id'] as number);
      case 'breakpoint-arbitration': {
        if (r['event_id'] !== ID.BREAKPOINT) return false;
        const mine = intro.enabled.has(ID.BREAKPOINT);
        return r['enable'] === 1 ? p.userspaceBpDebug || mine || this.interceptions.breakpoint : !mine;
      }
      case 'descriptor-exits':
        return r['event_id'] === ID.DESCRIPTOR && !p.descriptorExits;
      case 'msrs-readable':
        return (r['msrs_idx'] as number[]).some((i) => this.cpu.readMsr(i) === undefined);
      case 'reply-alloc':
      case 'xsave-alloc':
        return false;
      case 'waiting-for-reply':
        return intro.waiting === null;
      case 'cpuid-leaf':
        return this.cpu.findCpuid(r['function'] as number, r['index'] as number) === undefined;
      case 'injection-pending':
        return intro.exception !== null || intro.trap !== null || intro.singlestep;
      case 'xsave-content':
        return xsaveRejected((r['xsave'] as { region: Uint8Array }).region, p.xsaveFeatures) !== null;
      case 'msr-filter':
        return r['enable'] === 1 && p.msrFilterDenyWrite.includes(r['msr'] as number);
      case 'singlestep-support':
        return !p.singlestep;
      default:
        throw new Error(`simulator: no state check '${key}' for ${m.def.name}`);
    }
  }

  /** Run a vCPU command whose checks passed; returns the reply frame. */
  private execute(intro: VcpuIntro, m: CommandMsg): Buffer {
    const r = m.request as Req;
    const seq = m.seq;
    switch (m.def.key) {
      case 'VCPU_GET_INFO':
        return encodeReply('VCPU_GET_INFO', seq, {
          tsc_speed: this.vm.profile.tscScaling ? BigInt(this.vm.profile.tscKhz) * 1000n : 0n,
        });
      case 'VCPU_CONTROL_EVENTS': {
        const id = r['event_id'] as number;
        const on = r['enable'] === 1;
        if (on) intro.enabled.add(id);
        else intro.enabled.delete(id);
        if (id === ID.BREAKPOINT) this.interceptions.breakpoint = on;
        if (id === ID.DESCRIPTOR) this.interceptions.descriptor = on;
        return encodeReply('VCPU_CONTROL_EVENTS', seq, {});
      }
      case 'VCPU_GET_REGISTERS': {
        const idx = r['msrs_idx'] as number[];
        return encodeReply('VCPU_GET_REGISTERS', seq, {
          mode: this.cpu.mode,
          regs: { ...this.cpu.regs },
          sregs: cloneSregs(this.cpu.sregs),
          msrs: { nmsrs: idx.length },
          msr_entries: idx.map((index) => ({ index, data: this.cpu.readMsr(index)! })),
        });
      }
      case 'VCPU_SET_REGISTERS':
        intro.delayedRegs = { ...(r as unknown as KvmRegs) };
        return encodeReply('VCPU_SET_REGISTERS', seq, {});
      case 'VCPU_GET_CPUID': {
        const e = this.cpu.findCpuid(r['function'] as number, r['index'] as number)!;
        return encodeReply('VCPU_GET_CPUID', seq, { eax: e.eax, ebx: e.ebx, ecx: e.ecx, edx: e.edx });
      }
      case 'VCPU_CONTROL_CR': {
        const cr = r['cr'] as number;
        const on = r['enable'] === 1;
        if (on) intro.crs.add(cr);
        else intro.crs.delete(cr);
        if (cr === 3) this.interceptions.cr3 = on;
        return encodeReply('VCPU_CONTROL_CR', seq, {});
      }
      case 'VCPU_INJECT_EXCEPTION':
        intro.exception = { nr: r['nr'] as number, errorCode: r['error_code'] as number, address: r['address'] as bigint };
        this.kickMain();
        return encodeReply('VCPU_INJECT_EXCEPTION', seq, {});
      case 'VCPU_GET_XCR':
        return encodeReply('VCPU_GET_XCR', seq, { value: this.cpu.xcr0 });
      case 'VCPU_GET_XSAVE':
        return encodeReply('VCPU_GET_XSAVE', seq, { xsave: { region: new Uint8Array(this.cpu.xsave) } });
      case 'VCPU_SET_XSAVE':
        this.cpu.xsave = Buffer.from((r['xsave'] as { region: Uint8Array }).region);
        return encodeReply('VCPU_SET_XSAVE', seq, {});
      case 'VCPU_GET_MTRR_TYPE':
        return encodeReply('VCPU_GET_MTRR_TYPE', seq, { type: mtrrType(r['gpa'] as bigint) });
      case 'VCPU_CONTROL_MSR': {
        const msr = r['msr'] as number;
        const on = r['enable'] === 1;
        if (on) {
          intro.msrs.add(msr);
          this.interceptions.msrs.add(msr);
        } else {
          intro.msrs.delete(msr);
          this.interceptions.msrs.delete(msr);
        }
        return encodeReply('VCPU_CONTROL_MSR', seq, {});
      }
      case 'VCPU_CONTROL_SINGLESTEP':
        intro.singlestep = r['enable'] === 1;
        return encodeReply('VCPU_CONTROL_SINGLESTEP', seq, {});
      case 'VCPU_TRANSLATE_GVA':
        return encodeReply('VCPU_TRANSLATE_GVA', seq, {
          gpa: translate(this.vm.memory, this.cpu.paging, r['gva'] as bigint) ?? KVMI_INVALID_GPA,
        });
      default:
        throw new Error(`simulator: no handler for vCPU command ${m.def.name}`);
    }
  }
}
