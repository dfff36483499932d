/**
 * A simulated vCPU: KVM's vCPU thread with its introspection state (`struct kvm_vcpu_introspection`)
 * and the guest CPU it runs (`guest/exec.ts`: table instructions over real page tables).
 *
 * Two strands run per vCPU, as in KVM:
 * - the **job strand** executes the vCPU commands and event replies that the receive thread queued for
 *   this vCPU (FIFO, each after a seeded jitter), and sends each command's reply itself — so replies for
 *   different vCPUs overtake each other (§2.3). It runs whether or not the vCPU waits for an event
 *   reply: commands sent to a waiting vCPU are executed (§2.6);
 * - the **main strand** is the vCPU's run loop: before each guest instruction it waits for the queued
 *   jobs to drain, sends a pending TRAP, then one PAUSE event per pause request (low priority), injects
 *   a queued exception, and only then executes the instruction. Any event blocks the strand until the
 *   reply (or a release) arrives.
 *
 * Guest code comes in two forms: the single-instruction **guest actions** (`writeCr`, `wrmsr`, `access`,
 * …: the instruction is named, its encoding is written at RIP when RIP maps to RAM, and it executes
 * once with the same resume rules as a run — retired, RIP moves past it by the table length; a RETRY
 * ends the action with `retry` and RIP at the register RIP, where the next entry resumes), and **runs** (`run`): the CPU fetches and executes the
 * table instructions it finds at RIP until a stop address, re-executing at the register RIP after a
 * RETRY. ≥ `LIVELOCK_FAULTS` identical consecutive faults (an instruction that RETRYs with the same
 * event) are reported as a livelock.
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
import { encodeInstruction, instruction, type EptAccess, type EptBit, type InstructionName } from '@periscope/x86';

import { SimError } from '../errors.js';
import { cloneSregs, CpuState, mtrrType, VECTOR, VECTORS_WITH_ERROR_CODE, xsaveRejected, type CpuStateOptions } from '../guest/cpu.js';
import {
  eptCheck,
  execute,
  fetch,
  linearToGpa,
  readPieces,
  translateLinear,
  writePieces,
  type DescriptorId,
  type ExecEnv,
  type ExecResult,
  type Fetched,
} from '../guest/exec.js';
import type { VmMemory } from '../guest/ram.js';
import type { HostProfile } from '../profile.js';
import { deriveSeed, mulberry32, randInt, type Prng } from '../prng.js';
import { kvmRunHekiExit, reasonOf, type HekiCompletion, type HekiExit, type HekiKvm } from '../heki/kvm.js';
import { KVM_EXIT_HEKI_CONFIGURE, KVM_EXIT_HEKI_DENIAL } from '../heki/constants.js';
import type { KvmiHook } from './hook.js';
import {
  actsAsContinue,
  endOf,
  type EventOutcome,
  type EventRecord,
  type GuestEventRecord,
  type GuestResult,
  type InsnRecord,
  type LivelockReport,
  type RunOptions,
  type RunResult,
  type VmStats,
} from './types.js';

type KvmRegs = structs.KvmRegs;
type CommandMsg = Extract<KernelMessage, { kind: 'command' }>;
type Req = Record<string, unknown>;

/** What a vCPU needs from its VM (implemented by SimVm). */
export interface VcpuHost {
  readonly currentHook: KvmiHook | null;
  readonly memory: VmMemory;
  readonly profile: HostProfile;
  /** EPT restrictions set by VM_SET_PAGE_ACCESS. */
  readonly ept: EptAccess;
  readonly paddingNoise: boolean;
  readonly stats: VmStats;
  readonly stallThresholdMs: number;
  /** A protocol error on this hook: shut the socket down (§10). */
  hardError(hook: KvmiHook, reason: string): void;
  /** Simulator bug: count it and drop the connection. */
  internalError(err: unknown): void;
  vcpuCrashed(index: number): void;
  /** A vCPU event ended (for scenario expectations). */
  guestEvent(record: GuestEventRecord): void;
  livelock(report: LivelockReport): void;
  /** Heki's per-VM KVM state (pins, caps, the lock hypercall). */
  readonly heki: HekiKvm;
  /** KVM_RUN returned a Heki exit: the VMM completes it. */
  hekiExit(exit: HekiExit): Promise<HekiCompletion>;
  /** Stopped by the VMM (reason), or null. */
  readonly stopped: string | null;
  stopVm(reason: string): void;
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

export interface VcpuOptions extends Omit<CpuStateOptions, 'apicId' | 'bsp' | 'xsaveFeatures'> {
  index: number;
  seed: number;
  jitterMs: number;
  online: boolean;
}

interface GuestCtx {
  events: EventRecord[];
  /** The instruction caused a VM exit other than an EPT violation (for SINGLESTEP `failed`). */
  otherExit: boolean;
}
type GuestBody = Omit<GuestResult, 'events' | 'crashed'>;

/** A unit of guest work on the main strand: a guest action or a run. */
interface Unit {
  start(): Promise<void>;
  /** The vCPU crashed before the unit ran. */
  refuse(): void;
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
/** The store a gva write of each size runs as a guest action. */
const STORE_BY_SIZE: ReadonlyMap<number, InstructionName> = new Map<number, InstructionName>([
  [1, 'mov [rdi], al'],
  [2, 'mov [rdi], ax'],
  [4, 'mov [rdi], eax'],
  [8, 'mov [rdi], rax'],
]);
const MAX_EXCEPTION_LOG = 256;
const MAX_TRACE = 4096;
/** Identical consecutive faults on one vCPU from which a livelock is reported. */
export const LIVELOCK_FAULTS = 1000;

export type AccessKind = 'r' | 'w' | 'x';
export type AccessTarget = { gpa: bigint } | { gva: bigint };
export type { DescriptorId };

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
  /** The last exceptions delivered to the guest (injected by the tool, #BP, #GP, #PF, #UD), oldest first. */
  readonly deliveredExceptions: Array<{ vector: number; errorCode: number | undefined }> = [];
  private readonly prng: Prng;
  private readonly noise: Prng;
  private readonly jitterMs: number;
  private jobsRunning = false;
  private idleWaiters: Array<() => void> = [];
  private mainActive = false;
  private mainScheduled = false;
  private readonly units: Unit[] = [];
  /** The current streak of identical faults (livelock detection). */
  private streak: { key: string; count: number } = { key: '', count: 0 };
  /** Signature of the last event this vCPU sent (what a retried instruction raised). */
  private lastEventKey = '';

  constructor(
    private readonly vm: VcpuHost,
    opts: VcpuOptions,
  ) {
    this.index = opts.index;
    this.online = opts.online;
    this.jitterMs = opts.jitterMs;
    this.prng = mulberry32(deriveSeed(opts.seed, 1, opts.index));
    this.noise = mulberry32(deriveSeed(opts.seed, 2, opts.index));
    this.cpu = new CpuState({ ...opts, apicId: opts.index, bsp: opts.index === 0, xsaveFeatures: vm.profile.xsaveFeatures });
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
  //
  // Each action is one named instruction: its registers are loaded, its encoding is written at RIP
  // (when RIP translates to RAM; otherwise the instruction runs without being placed), and it executes
  // once on the run loop. A retired instruction moves RIP past itself by its table length (register RIP
  // + length, so a SET_REGISTERS during the exit is honoured), so consecutive actions lay down straight-
  // line code; a RETRY ends the action with `retry`, the vCPU at the register RIP (unchanged: the same
  // instruction is there for the next entry; moved: the skip); a fault leaves RIP at the instruction.

  /** `mov crN, rax` (N = 0, 3, 4) with RAX = `value`. */
  writeCr(cr: 0 | 3 | 4, value: bigint): Promise<GuestResult> {
    if (cr !== 0 && cr !== 3 && cr !== 4) throw new SimError('invalid-argument', `CR${String(cr)} is not interceptable`);
    return this.guest((ctx) =>
      this.named(ctx, `mov cr${cr}, rax`, { rax: BigInt.asUintN(64, value) }, () => this.cpu.readCr(cr)),
    );
  }

  /** Guest `wrmsr` (ECX = msr, EDX:EAX = value). */
  wrmsr(msr: number, value: bigint): Promise<GuestResult> {
    const v = BigInt.asUintN(64, value);
    return this.guest((ctx) =>
      this.named(ctx, 'wrmsr', { rcx: BigInt(msr >>> 0), rax: v & 0xffffffffn, rdx: v >> 32n }, () => this.cpu.readMsr(msr)),
    );
  }

  /** Guest `xsetbv` with ECX = 0 (XCR0). The event is informational: XCR0 is written first. */
  xsetbv(value: bigint): Promise<GuestResult> {
    const v = BigInt.asUintN(64, value);
    return this.guest((ctx) => this.named(ctx, 'xsetbv', { rcx: 0n, rax: v & 0xffffffffn, rdx: v >> 32n }, () => this.cpu.xcr0));
  }

  /** Guest `int3` at the current RIP. */
  int3(): Promise<GuestResult> {
    return this.guest((ctx) => this.named(ctx, 'int3', {}));
  }

  /**
   * Guest `vmcall`. The registers given are loaded first; the default is the KVMI hypercall
   * (RAX = 34, RDI = 24, RSI = 0). `value` is RAX afterwards.
   */
  vmcall(regs: Partial<Pick<KvmRegs, 'rax' | 'rbx' | 'rcx' | 'rdx' | 'rsi' | 'rdi'>> = {}): Promise<GuestResult> {
    return this.guest((ctx) => this.named(ctx, 'vmcall', { rax: 34n, rdi: 24n, rsi: 0n, ...regs }));
  }

  /**
   * LIDT/SIDT/LGDT/SGDT/LLDT/SLDT/LTR/STR as an exit only: `write` = load. No operand is read or
   * written and RIP does not move (the scenario steps `lidt`/`lgdt` run the real instructions).
   */
  descriptorAccess(descriptor: DescriptorId, write: boolean): Promise<GuestResult> {
    if (![1, 2, 3, 4].includes(descriptor)) throw new SimError('invalid-argument', `descriptor ${String(descriptor)} is not 1..4`);
    return this.guest(async (ctx) => {
      const d = await this.env(ctx).descriptor(descriptor, write);
      return d === 'retry' ? { outcome: 'retry' } : { outcome: 'completed' };
    });
  }

  /**
   * A guest memory access through a gva (the guest's page tables and access rules apply) or straight
   * to a gpa (no linear address: the PF event's gva is ~0). Reads return `length` bytes (default 8);
   * writes store `data` (default one zero byte).
   *
   * A gva write of 1, 2, 4 or 8 bytes runs `mov [rdi], al` / `ax` / `eax` / `rax`, a gva read of 8
   * bytes `mov rax, [rdi]` (RDI = gva, RAX = the data), placed at RIP; retired, RIP moves past it.
   * Other sizes, fetches (`x`) and gpa accesses are the same checks without an instruction: RIP does
   * not move.
   */
  access(target: AccessTarget, kind: AccessKind, opts: { data?: Uint8Array; length?: number } = {}): Promise<GuestResult> {
    if (kind !== 'r' && kind !== 'w' && kind !== 'x') throw new SimError('invalid-argument', `access kind must be r, w or x`);
    const data = kind === 'w' ? (opts.data ?? new Uint8Array(1)) : undefined;
    const len = data ? data.length : (opts.length ?? 8);
    if (!Number.isSafeInteger(len) || len < 1 || len > 4096) throw new SimError('invalid-argument', 'an access is 1 to 4096 bytes');
    return this.guest(async (ctx) => {
      if ('gva' in target) {
        const gva = BigInt.asUintN(64, target.gva);
        const store = kind === 'w' ? STORE_BY_SIZE.get(len) : undefined;
        if (store) {
          // RAX = the data in its low `len` bytes, the rest of RAX kept (a partial-register write).
          const b = Buffer.alloc(8);
          b.set(data!);
          const mask = len === 8 ? ~0n : (1n << BigInt(8 * len)) - 1n;
          const rax = (this.cpu.regs.rax & ~mask & 0xffffffffffffffffn) | (b.readBigUInt64LE(0) & mask);
          return this.named(ctx, store, { rdi: gva, rax });
        }
        if (kind === 'r' && len === 8) return this.named(ctx, 'mov rax, [rdi]', { rdi: gva });
        const env = this.env(ctx);
        const t = translateLinear(env, gva, len, kind);
        if (!t.ok) return this.body(t.result);
        const e = await eptCheck(env, t.pieces, kind, true);
        if (e) return this.body(e);
        if (kind === 'w') writePieces(env, t.pieces, data!);
        return kind === 'r' ? { outcome: 'completed', data: new Uint8Array(readPieces(env, t.pieces)) } : { outcome: 'completed' };
      }
      const gpa = BigInt.asUintN(64, target.gpa);
      const env = this.env(ctx);
      const piecesOf = (): Array<{ gva: bigint; gpa: bigint; length: number }> => {
        const out = [];
        for (let at = gpa, left = len; left > 0; ) {
          const n = Math.min(left, 4096 - Number(at & 0xfffn));
          out.push({ gva: KVMI_INVALID_GPA, gpa: at, length: n });
          at += BigInt(n);
          left -= n;
        }
        return out;
      };
      const pieces = piecesOf();
      const e = await eptCheck(env, pieces, kind, false);
      if (e) return this.body(e);
      if (kind === 'w') writePieces(env, pieces, data!);
      return kind === 'r' ? { outcome: 'completed', data: new Uint8Array(readPieces(env, pieces)) } : { outcome: 'completed' };
    });
  }

  /**
   * Run guest code: load `regs`, optionally push a return address (a call from code that is not
   * modelled) and jump to `entry`, then fetch and execute table instructions until RIP reaches `until`
   * (default: the pushed return address), HLT, an exception delivered to the guest, an MMIO access, a
   * livelock, the vCPU crashing, or `maxInstructions` (default 100 000).
   */
  run(opts: RunOptions = {}): Promise<RunResult> {
    if (!this.online) {
      return Promise.resolve({ outcome: 'vcpu-offline', events: [], trace: [], crashed: false, rip: this.cpu.regs.rip, instructions: 0 });
    }
    return new Promise<RunResult>((resolve) => {
      this.units.push({
        start: async () => resolve(await this.runUnit(opts)),
        refuse: () =>
          resolve({
            outcome: this.crashed_ ? 'vcpu-crashed' : 'vm-stopped', events: [], trace: [], crashed: this.crashed_, rip: this.cpu.regs.rip, instructions: 0,
          }),
      });
      this.kickMain();
    });
  }

  /** Write bytes at a linear address through the current page tables, as code that is not modelled would (no checks, no events). False when unmapped or unbacked. */
  pokeLinear(gva: bigint, bytes: Uint8Array): boolean {
    const parts: Array<{ gpa: bigint; off: number; n: number }> = [];
    for (let off = 0; off < bytes.length; ) {
      const at = BigInt.asUintN(64, gva + BigInt(off));
      const gpa = linearToGpa({ cpu: this.cpu, mem: this.vm.memory }, at);
      const n = Math.min(bytes.length - off, 4096 - Number(at & 0xfffn));
      if (gpa === KVMI_INVALID_GPA || !this.vm.memory.isBackedRange(gpa, n)) return false;
      parts.push({ gpa, off, n });
      off += n;
    }
    for (const p of parts) this.vm.memory.write(p.gpa, bytes.subarray(p.off, p.off + p.n));
    return true;
  }

  /** Read bytes at a linear address through the current page tables (no checks); null when unmapped. */
  peekLinear(gva: bigint, length: number): Buffer | null {
    const out: Buffer[] = [];
    for (let off = 0; off < length; ) {
      const at = BigInt.asUintN(64, gva + BigInt(off));
      const gpa = linearToGpa({ cpu: this.cpu, mem: this.vm.memory }, at);
      const n = Math.min(length - off, 4096 - Number(at & 0xfffn));
      const b = gpa === KVMI_INVALID_GPA ? null : this.vm.memory.read(gpa, n);
      if (!b) return null;
      out.push(b);
      off += n;
    }
    return Buffer.concat(out);
  }

  // ---- guest execution ----------------------------------------------------------------------------

  /** The KVM side of every exit the guest CPU makes, for one unit of guest work. */
  private env(ctx: GuestCtx): ExecEnv {
    return {
      cpu: this.cpu,
      mem: this.vm.memory,
      ept: this.vm.ept,
      xsaveFeatures: this.vm.profile.xsaveFeatures,
      deliver: (vector, errorCode) => this.recordException({ vector, errorCode }),
      pf: async (gva: bigint, gpa: bigint, bit: EptBit) => {
        const intro = this.intro;
        if (!intro || !intro.enabled.has(ID.PF)) return 'continue';
        const o = await this.raise(ctx, 'PF', { gva, gpa, access: bit });
        return actsAsContinue(o) ? 'continue' : 'retry';
      },
      cr: async (cr, old, proposed) => {
        const intro = this.intro;
        let write = proposed;
        if (intro && intro.enabled.has(ID.CR) && intro.crs.has(cr) && old !== proposed) {
          ctx.otherExit = true;
          const o = await this.raise(ctx, 'CR', { cr, old_value: old, new_value: proposed });
          if (o.kind === 'reply' && o.action === 'CONTINUE') write = o.newVal ?? 0n;
          else if (!actsAsContinue(o)) return 'refuse';
        }
        // Heki (heki unconfirmed `kvmi-heki-ordering`): the pin check runs on the value the tool allowed.
        if ((cr === 0 || cr === 4) && this.vm.heki.violates(cr, write)) {
          const reason = reasonOf(cr);
          if (!this.vm.heki.exitEnabled('denial', reason)) return 'refuse'; // #GP(0) at once, no exit
          ctx.otherExit = true;
          const exit: HekiExit = {
            kind: 'denial', vcpu: this.index, reason, crValue: write, rip: this.cpu.regs.rip,
            kvmRun: kvmRunHekiExit(KVM_EXIT_HEKI_DENIAL, reason, write),
          };
          const c = await this.vm.hekiExit(exit);
          if (c === 'stop') {
            this.vm.stopVm(`Heki denial: CR${cr} ← 0x${write.toString(16)} on vCPU ${this.index}`);
            return 'stop';
          }
          return 'refuse'; // re-entered: KVM injects #GP(0) at the MOV, the CR is unchanged
        }
        return { write };
      },
      msr: async (msr, old, proposed) => {
        const intro = this.intro;
        if (intro && intro.enabled.has(ID.MSR) && intro.msrs.has(msr) && old !== proposed) {
          ctx.otherExit = true;
          const o = await this.raise(ctx, 'MSR', { msr, old_value: old, new_value: proposed });
          if (o.kind === 'reply' && o.action === 'CONTINUE') return { write: o.newVal ?? 0n };
          if (!actsAsContinue(o)) return 'refuse';
        }
        return { write: proposed };
      },
      xsetbv: async (old, value) => {
        const intro = this.intro;
        if (intro && intro.enabled.has(ID.XSETBV)) {
          ctx.otherExit = true;
          await this.raise(ctx, 'XSETBV', { xcr: 0, old_value: old, new_value: value });
        }
      },
      descriptor: async (descriptor, write) => {
        const intro = this.intro;
        if (!intro || !intro.enabled.has(ID.DESCRIPTOR)) return 'native';
        ctx.otherExit = true;
        const o = await this.raise(ctx, 'DESCRIPTOR', { descriptor, write: write ? 1 : 0 });
        return actsAsContinue(o) ? 'emulate' : 'retry';
      },
      breakpoint: async (gpa, insnLen) => {
        const intro = this.intro;
        if (intro && intro.enabled.has(ID.BREAKPOINT)) {
          ctx.otherExit = true;
          const o = await this.raise(ctx, 'BREAKPOINT', { gpa, insn_len: insnLen });
          return actsAsContinue(o) ? 'reinject' : 'retry';
        }
        return this.vm.profile.userspaceBpDebug ? 'userspace' : 'reinject';
      },
      hypercall: async () => {
        const r = this.cpu.regs;
        const long = this.cpu.mode === 8;
        const w = (v: bigint): bigint => (long ? v : v & 0xffffffffn);
        // KVM's hypercall ABI: nr = RAX, a0 = RBX, a1 = RCX, a2 = RDX (32-bit outside 64-bit mode).
        const heki = this.vm.heki.hypercall(w(r.rax), w(r.rbx), w(r.rcx), w(r.rdx), this.cpu.cpl);
        if (heki) {
          if (heki.pinned && this.vm.heki.exitEnabled('configure', heki.pinned.reason)) {
            ctx.otherExit = true;
            const { reason, bits } = heki.pinned;
            // The pin is already in effect; on re-entry KVM sets RAX = 0 and skips the VMCALL.
            await this.vm.hekiExit({
              kind: 'configure', vcpu: this.index, reason, crPinned: bits, rip: this.cpu.regs.rip,
              kvmRun: kvmRunHekiExit(KVM_EXIT_HEKI_CONFIGURE, reason, bits),
            });
            return 0n;
          }
          return heki.rax;
        }
        if ((r.rax & 0xffffffffn) !== 34n) return KVM_ENOSYS_RAX;
        const a0 = long ? r.rdi : r.rbx & 0xffffffffn;
        const a1 = long ? r.rsi : r.rcx & 0xffffffffn;
        const intro = this.intro;
        if (intro && intro.enabled.has(ID.HYPERCALL) && a0 === 24n && a1 === 0n) {
          ctx.otherExit = true;
          const o = await this.raise(ctx, 'HYPERCALL');
          return actsAsContinue(o) ? 0n : KVM_ENOSYS_RAX;
        }
        return KVM_ENOSYS_RAX;
      },
    };
  }

  /** Run one named instruction (a guest action): load registers, place the encoding at RIP, execute. */
  private async named(ctx: GuestCtx, name: InstructionName, regs: Partial<KvmRegs>, gpValue?: () => bigint | undefined): Promise<GuestBody> {
    Object.assign(this.cpu.regs, regs);
    const entry = instruction(name);
    const rip = this.cpu.regs.rip;
    this.pokeLinear(rip, encodeInstruction(name, entry.immediate ? 0n : undefined));
    const r = await execute(this.env(ctx), { entry, rip });
    this.account(r, rip);
    const body = this.body(r);
    if (body.outcome === 'gp' && gpValue) {
      const v = gpValue();
      if (v !== undefined) body.value = v;
    }
    return body;
  }

  private body(r: ExecResult): GuestBody {
    switch (r.kind) {
      case 'retired':
        return { outcome: 'completed', ...(r.value !== undefined ? { value: r.value } : {}), ...(r.data ? { data: r.data } : {}) };
      case 'halted':
        return { outcome: 'completed' };
      case 'fault':
        if (r.vector === VECTOR.GP) return { outcome: 'gp', vector: r.vector };
        if (r.vector === VECTOR.PF) return { outcome: 'page-fault', vector: r.vector };
        return { outcome: 'exception', vector: r.vector };
      case 'retry':
        return { outcome: 'retry' };
      case 'mmio':
        return { outcome: 'mmio' };
      case 'userspace-exit':
        return { outcome: 'userspace-exit' };
      case 'unsupported':
        return { outcome: 'unsupported' };
      case 'stopped':
        return { outcome: 'vm-stopped' };
    }
  }

  /** Livelock accounting: an instruction that made progress ends a streak; a retried one extends it. */
  private account(r: ExecResult, rip: bigint): boolean {
    if (r.kind !== 'retry') {
      this.streak = { key: '', count: 0 };
      return false;
    }
    const key = `${rip.toString(16)}|${this.lastEventKey}`;
    if (key === this.streak.key) this.streak.count++;
    else this.streak = { key, count: 1 };
    if (this.streak.count === LIVELOCK_FAULTS) {
      this.vm.stats.livelocks++;
      this.vm.livelock({ vcpu: this.index, rip, faults: this.streak.count, event: this.lastEventKey });
    }
    return this.streak.count >= LIVELOCK_FAULTS;
  }

  private async runUnit(opts: RunOptions): Promise<RunResult> {
    const events: EventRecord[] = [];
    const trace: InsnRecord[] = [];
    let instructions = 0;
    const done = (outcome: RunResult['outcome'], extra: { vector?: number } = {}): RunResult => ({
      outcome, events, trace, crashed: this.crashed_, rip: this.cpu.regs.rip, instructions, ...extra,
    });
    if (opts.regs) Object.assign(this.cpu.regs, opts.regs);
    let until = opts.until;
    if (opts.returnTo !== undefined) {
      const rsp = BigInt.asUintN(64, this.cpu.regs.rsp - 8n);
      const b = Buffer.alloc(8);
      b.writeBigUInt64LE(opts.returnTo);
      if (!this.pokeLinear(rsp, b)) return done('page-fault');
      this.cpu.regs.rsp = rsp;
      until ??= opts.returnTo;
    }
    if (opts.entry !== undefined) this.cpu.regs.rip = opts.entry;
    const max = opts.maxInstructions ?? 100_000;
    for (let first = true; ; first = false) {
      if (!first) await this.preEntry();
      if (this.crashed_) return done('vcpu-crashed');
      if (this.vm.stopped !== null) return done('vm-stopped');
      if (until !== undefined && this.cpu.regs.rip === until) return done('completed');
      if (instructions >= max) return done('step-limit');
      const ctx: GuestCtx = { events: [], otherExit: false };
      const env = this.env(ctx);
      const rip = this.cpu.regs.rip;
      const stepping = this.intro?.singlestep ?? false;
      const f = await fetch(env);
      let r: ExecResult;
      let name: InstructionName | undefined;
      let length: number | undefined;
      if ('entry' in f) {
        name = f.entry.name;
        length = f.entry.length;
        r = await execute(env, f as Fetched);
      } else r = f;
      instructions++;
      let crashed = ctx.events.some((e) => e.ended === 'CRASH');
      if (!crashed && this.singlestepAfter(stepping, r.kind === 'retry')) {
        const o = await this.raise(ctx, 'SINGLESTEP', { failed: stepping && ctx.otherExit ? 1 : 0 });
        crashed = o.kind === 'reply' && o.action === 'CRASH';
      }
      events.push(...ctx.events);
      const last = trace[trace.length - 1];
      const vector = r.kind === 'fault' ? r.vector : undefined;
      if (last && last.rip === rip && last.result === r.kind && r.kind === 'retry') last.times++;
      else if (trace.length < MAX_TRACE) trace.push({ rip, ...(name ? { name, length: length! } : {}), result: r.kind, ...(vector !== undefined ? { vector } : {}), times: 1 });
      const livelock = this.account(r, rip);
      if (crashed) {
        this.crash();
        return done('vcpu-crashed', vector !== undefined ? { vector } : {});
      }
      switch (r.kind) {
        case 'retired':
          continue;
        case 'retry':
          if (livelock) return done('livelock');
          continue;
        case 'halted':
          return done('halted');
        case 'fault':
          return done(r.vector === VECTOR.GP ? 'gp' : r.vector === VECTOR.PF ? 'page-fault' : 'exception', { vector: r.vector });
        case 'mmio':
        case 'userspace-exit':
        case 'unsupported':
          return done(r.kind);
        case 'stopped':
          return done('vm-stopped');
      }
    }
  }

  // ---- the main strand --------------------------------------------------------------------------------

  private guest(run: (ctx: GuestCtx) => Promise<GuestBody>): Promise<GuestResult> {
    if (!this.online) return Promise.resolve({ outcome: 'vcpu-offline', events: [], crashed: false });
    return new Promise<GuestResult>((resolve) => {
      this.units.push({
        start: async () => {
          const ctx: GuestCtx = { events: [], otherExit: false };
          const stepping = this.intro?.singlestep ?? false;
          const body = await run(ctx);
          let crashed = ctx.events.some((e) => e.ended === 'CRASH');
          if (!crashed && this.singlestepAfter(stepping, body.outcome === 'retry')) {
            const o = await this.raise(ctx, 'SINGLESTEP', { failed: stepping && ctx.otherExit ? 1 : 0 });
            crashed = o.kind === 'reply' && o.action === 'CRASH';
          }
          if (crashed) this.crash();
          resolve({ ...body, events: ctx.events, crashed });
        },
        refuse: () =>
          resolve(this.crashed_ ? { outcome: 'vcpu-crashed', events: [], crashed: true } : { outcome: 'vm-stopped', events: [], crashed: false }),
      });
      this.kickMain();
    });
  }

  private recordException(e: { vector: number; errorCode: number | undefined }): void {
    this.deliveredExceptions.push(e);
    if (this.deliveredExceptions.length > MAX_EXCEPTION_LOG) this.deliveredExceptions.shift();
  }

  /**
   * Whether the monitor trap flag ends this instruction in a SINGLESTEP event. Singlestep enabled before the
   * instruction: yes, after it (`failed` when it also exited for another reason). Enabled by a command run
   * while the instruction's own exit waited for its reply (the tool's breakpoint pattern: restore the byte,
   * enable singlestep, RETRY): KVM had not armed MTF at that exit, and a retried instruction has not executed
   * yet — the event comes after it re-executes; an instruction that completed through its exit steps now.
   */
  private singlestepAfter(steppingBefore: boolean, retried: boolean): boolean {
    if (!this.intro?.singlestep) return false;
    return steppingBefore || !retried;
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
    return this.units.length > 0;
  }

  /** Before a guest entry: the queued jobs, then a pending TRAP, PAUSE events, a queued injection. */
  private async preEntry(): Promise<void> {
    for (;;) {
      // kvmi_handle_requests: run the queued jobs first.
      while (this.jobsBusy) await new Promise<void>((r) => this.idleWaiters.push(r));
      const intro = this.intro;
      if (!this.online || !intro || this.crashed_) return;
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
      return;
    }
  }

  private async mainLoop(): Promise<void> {
    for (;;) {
      await this.preEntry();
      if (!this.online) return;
      const unit = this.units.shift();
      if (!unit) return;
      if (this.crashed_ || this.vm.stopped !== null) {
        unit.refuse();
        continue;
      }
      await unit.start();
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
    const rip = this.cpu.regs.rip;
    let seq = 0;
    let waitedMs: number | undefined;
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
      waitedMs = waited;
      if (waited > this.vm.stats.maxReplyWaitMs) this.vm.stats.maxReplyWaitMs = waited;
      if (waited > this.vm.stallThresholdMs) this.vm.stats.stalls++;
    }
    const ended = endOf(outcome);
    ctx?.events.push({ event: key, seq, ended });
    this.lastEventKey = `${key}:${data_ ? eventDataKey(data_) : ''}:${ended}`;
    this.vm.guestEvent({ vcpu: this.index, event: key, seq, ended, rip, ...(waitedMs !== undefined ? { waitedMs } : {}), ...(data_ ? { data: data_ } : {}) });
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
        return p.failAllocations.includes(key);
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
          gpa: linearToGpa({ cpu: this.cpu, mem: this.vm.memory }, r['gva'] as bigint),
        });
      default:
        throw new Error(`simulator: no handler for vCPU command ${m.def.name}`);
    }
  }
}

/** A stable text key of event data (bigints included), for livelock detection. */
function eventDataKey(d: Record<string, unknown>): string {
  return Object.entries(d)
    .map(([k, v]) => `${k}=${typeof v === 'bigint' ? v.toString(16) : String(v)}`)
    .join(',');
}
