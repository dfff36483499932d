/**
 * A simulated KVM VM: the kernel side of KVMI v12 for one guest.
 *
 * - The hooking ioctls (§7) are methods returning 0 or a host errno: `hook`, `allowCommand`,
 *   `allowEvent`, `preunhook`, `unhook`.
 * - After `hook`, the socket's frame reader is the `kvmi-recv` thread: each message goes through the
 *   library's receive-thread checks (`receiveKernelMessage`, §2.2/§2.5); VM commands are answered here,
 *   in order; vCPU commands and event replies are queued to the target vCPU (see vcpu.ts).
 * - Connection loss (§8) shuts the socket down and queues a release job to every vCPU; interceptions
 *   and page restrictions stay until UNHOOK, which removes them and never touches guest memory.
 */
import { EventEmitter } from 'node:events';
import { rmSync } from 'node:fs';
import { Socket } from 'node:net';

import {
  attachFraming,
  encodeErrorReply,
  encodeReply,
  encodeVmEvent,
  kernelKnowsCommand,
  kernelKnowsEvent,
  KVMI_MAX_MSG_SIZE,
  KVMI_NUM_COMMANDS,
  KVMI_NUM_EVENTS,
  KVMI_VERSION,
  KvmErrno,
  PageAccess,
  MAX_OUTSTANDING_MAP_TOKENS,
  MAX_PAUSE_REQUESTS,
  receiveKernelMessage,
  runCommandChecks,
  structs,
  type KernelMessage,
  type PageAccessEntry,
} from '@periscope/kvmi';

import { EptAccess } from '@periscope/x86';

import { HostErrno, SimError } from '../errors.js';
import { HekiKvm, type HekiCompletion, type HekiExit, type HekiExitHandler } from '../heki/kvm.js';
import { bootKernel, KERNEL_BASE, MIN_MEMORY_MIB, type KernelLayout } from '../guest/kernel.js';
import { gfnOf, tempRunDir, VmMemory, type GfnRange } from '../guest/ram.js';
import { DEFAULT_HOST_PROFILE, type HostProfile } from '../profile.js';
import { deriveSeed, mulberry32, randBytes, randInt, type Prng } from '../prng.js';
import { KvmiHook } from './hook.js';
import { newVmStats, type GuestEventRecord, type LivelockReport, type VmStats } from './types.js';
import { SimVcpu, type VcpuHost } from './vcpu.js';
import { TaggedCallLog } from '../guest/tagged-copy.js';

type CommandMsg = Extract<KernelMessage, { kind: 'command' }>;
type Req = Record<string, unknown>;

export interface SimVmOptions {
  /** Position in a fleet (seeds, default name). Default 0. */
  index?: number;
  /** Default `sim-vm-<index>`. */
  name?: string;
  /** 16 raw bytes; default derived from the seed and index. */
  uuid?: Uint8Array;
  /** Number of vCPUs (online vCPUs for KVMI). Default 1. */
  vcpus?: number;
  /** Guest RAM in MiB (at least 32, for the kernel's layout). Default 64. */
  memoryMiB?: number;
  /**
   * Directory of the RAM file `<runDir>/<uuid>.ram`. Default: a fresh directory under this process's
   * temporary root (removed at process exit; `close()` removes the file).
   */
  runDir?: string;
  /** Remove the RAM file at `close()`. Default: true for the default run dir, false for a given one. */
  removeRamOnClose?: boolean;
  /** The KASLR slot (slide = 2 MiB × slot, modulo the slots RAM allows). Default: drawn from the seed. */
  kaslrSlot?: number;
  /**
   * The vCPUs online at creation have run the kernel's boot code (syscall_init: STAR/LSTAR/CSTAR/SFMASK,
   * XCR0 = x87|SSE|AVX). Default true. APs brought up later always start with reset MSRs and XCR0 = 1.
   */
  booted?: boolean;
  /** Gfn ranges outside every memslot. Default the VGA window [0xA0, 0xC0). */
  holes?: readonly GfnRange[];
  /** Seed for jitter, uuids, tokens and padding noise. Default 1. */
  seed?: number;
  /** A pure v12 kernel: the seed extensions (GET_MAP_TOKEN, VM_GET_MAX_GFN) answer ENOSYS. */
  pureV12?: boolean;
  profile?: HostProfile;
  /** Largest per-job delay before a vCPU runs a queued command, ms (seeded). Default 2. */
  jitterMs?: number;
  /** Fill the padding KVM does not zero in events with non-zero bytes (§2.2). Default true. */
  paddingNoise?: boolean;
  /** Bring the APs up at creation (a booted guest). Default false: only vCPU 0 runs. */
  apsOnline?: boolean;
  /** A reply wait longer than this counts as a stall. Default 1000 ms. */
  stallThresholdMs?: number;
}

export interface HookOptions {
  /**
   * Bytes the device manager already read from the socket past its handshake: they are the start of
   * the KVMI stream and are parsed first. (Not part of the kernel ABI: a real QEMU leaves them in the
   * socket; the simulated one reads with buffering, so it hands them over.)
   */
  leftover?: Buffer;
}

export interface SimVmEvents {
  hooked: [];
  /** The connection was lost (§8); `reason` says why (tool closed, hard error, unhook, ...). */
  'connection-lost': [reason: string];
  unhooked: [];
  /** PREUNHOOK sent KVMI_VM_EVENT_UNHOOK. */
  'unhook-event': [];
  /** A vCPU took a CRASH action (KVM_EXIT_SHUTDOWN). */
  'vcpu-crash': [vcpu: number];
  /** A simulator bug (also counted in stats.internalErrors). */
  'internal-error': [err: unknown];
  /** A vCPU event ended (any vCPU), with its RIP and data. */
  'guest-event': [record: GuestEventRecord];
  /** A KVMI command arrived from the tool (before its checks), by catalog key, with its decoded request (tests count them). */
  command: [key: string, vcpu: number | null, request: Record<string, unknown>];
  /** A vCPU faulted identically LIVELOCK_FAULTS times in a row. */
  livelock: [report: LivelockReport];
  /** KVM_RUN returned a Heki exit to the VMM (before the VMM completes it). */
  'heki-exit': [exit: HekiExit];
  /** The VMM stopped the VM (a Heki denial completed with STOP_VM): no vCPU runs guest code again. */
  'vm-stopped': [reason: string];
}

/** The boot page tables as earlier versions exposed them. */
export interface PageTableLayout {
  /** CR3 value (the PML4's gpa). */
  cr3: bigint;
  /** Identity map and kernel map cover [0, identityBytes). */
  identityBytes: bigint;
  /** The kernel map: KERNEL_BASE + x → x. */
  kernelBase: bigint;
  /** Gpas of the page-table pages. */
  tablePages: readonly bigint[];
}

export class SimVm extends EventEmitter<SimVmEvents> implements VcpuHost {
  readonly index: number;
  readonly name: string;
  readonly uuid: Uint8Array;
  /** The uuid in text form (8-4-4-4-12), the RAM file's name. */
  readonly uuidText: string;
  /** Guest RAM: the sparse file `<runDir>/<uuidText>.ram`. */
  readonly memory: VmMemory;
  /** The synthetic kernel: slide, symbols, page tables, processes. */
  readonly kernel: KernelLayout;
  readonly pageTables: PageTableLayout;
  /** EPT restrictions (VM_SET_PAGE_ACCESS). */
  readonly ept = new EptAccess();
  readonly vcpus: readonly SimVcpu[];
  readonly profile: HostProfile;
  readonly pureV12: boolean;
  readonly paddingNoise: boolean;
  readonly stallThresholdMs: number;
  readonly stats: VmStats = newVmStats();
  /** Ground truth of the guest's `sim_copy_tagged` calls (guest/tagged-copy.ts; breakpoint tracing tests). */
  readonly taggedCalls = new TaggedCallLog();
  /** Heki (RFC v2): pinned CRs, notification caps, the lock hypercall (docs/heki.md). */
  readonly heki: HekiKvm;
  /** The VMM's handling of Heki exits (KVM_RUN returning 39/40); without one KVM_RUN is re-entered at once. */
  hekiExitHandler: HekiExitHandler | null = null;
  private stoppedReason: string | null = null;
  /** QEMU_CLOCK_REALTIME ms at creation (the handshake's start_time). */
  readonly startTimeMs: bigint;
  private readonly removeRamOnClose: boolean;
  /** The per-VM temporary run dir (default), removed at close. */
  private readonly ownDir: string | null;
  private hook_: KvmiHook | null = null;
  private generation = 0;
  private readonly prng: Prng;

  constructor(opts: SimVmOptions = {}) {
    super();
    this.index = opts.index ?? 0;
    this.name = opts.name ?? `sim-vm-${this.index}`;
    const seed = opts.seed ?? 1;
    this.prng = mulberry32(deriveSeed(seed, 0x564d, this.index));
    this.uuid = opts.uuid ?? uuidV4(this.prng);
    if (this.uuid.length !== 16) throw new SimError('invalid-argument', 'uuid must be 16 bytes');
    this.profile = opts.profile ?? DEFAULT_HOST_PROFILE;
    this.heki = new HekiKvm(this.profile);
    this.pureV12 = opts.pureV12 ?? false;
    this.paddingNoise = opts.paddingNoise ?? true;
    this.stallThresholdMs = opts.stallThresholdMs ?? 1000;
    this.startTimeMs = BigInt(Date.now());
    this.uuidText = uuidText(this.uuid);
    const n = opts.vcpus ?? 1;
    if (!Number.isInteger(n) || n < 1 || n > 0xffff) throw new SimError('invalid-argument', 'vcpus must be in [1, 65535]');
    const memoryMiB = opts.memoryMiB ?? 64;
    if (!Number.isInteger(memoryMiB) || memoryMiB < MIN_MEMORY_MIB) {
      throw new SimError('invalid-argument', `memoryMiB must be an integer ≥ ${MIN_MEMORY_MIB}`);
    }
    const runDir = opts.runDir ?? tempRunDir();
    this.ownDir = opts.runDir === undefined ? runDir : null;
    this.removeRamOnClose = opts.removeRamOnClose ?? opts.runDir === undefined;
    this.memory = new VmMemory({ dir: runDir, uuid: this.uuidText, memoryMiB, ...(opts.holes ? { holes: opts.holes } : {}) });
    try {
      const slot = opts.kaslrSlot ?? randInt(mulberry32(deriveSeed(seed, 0x4b41534c, this.index)), 1 << 30);
      this.kernel = bootKernel(this.memory, slot);
    } catch (err) {
      this.memory.release(true);
      if (this.ownDir) rmSync(this.ownDir, { recursive: true, force: true });
      throw err;
    }
    const k = this.kernel;
    this.pageTables = { cr3: k.cr3, identityBytes: k.identityBytes, kernelBase: KERNEL_BASE, tablePages: k.tablePages };
    const vcpus: SimVcpu[] = [];
    for (let i = 0; i < n; i++) {
      const online = i === 0 || (opts.apsOnline ?? false);
      vcpus.push(
        new SimVcpu(this, {
          index: i,
          seed: deriveSeed(seed, 0x7663, this.index),
          jitterMs: opts.jitterMs ?? 2,
          online,
          cr3: k.cr3,
          rip: KERNEL_BASE + 0x100000n,
          rsp: KERNEL_BASE + 0x200000n - 0x10n * BigInt(i + 1),
          booted: online && (opts.booted ?? true),
          lstar: k.symbol('entry_SYSCALL_64'),
          cstar: k.symbol('entry_SYSCALL_compat'),
          idt: { base: k.symbol('idt_table'), limit: 0xfff },
          gdt: { base: k.symbol('gdt_page'), limit: 0x7f },
        }),
      );
    }
    this.vcpus = vcpus;
  }

  // ---- observation --------------------------------------------------------------------------------

  /** The current hook (KVM's `kvm->kvmi`), or null when not hooked. */
  get currentHook(): KvmiHook | null {
    return this.hook_;
  }
  get hooked(): boolean {
    return this.hook_ !== null;
  }
  /** Hooked and the socket is up. */
  get connected(): boolean {
    return this.hook_?.alive ?? false;
  }
  /** EPT restrictions: gfn → allowed access bits (R=1, W=2, X=4); absent = rwx. A snapshot of `ept`. */
  get restrictions(): ReadonlyMap<number, number> {
    const m = new Map<number, number>();
    for (const [gfn, bits] of this.ept.entries()) m.set(Number(gfn), bits);
    return m;
  }

  /**
   * Release guest RAM (the VM is destroyed): UNHOOK if hooked, close the RAM file's descriptor and,
   * unless the file was created in a run dir the caller gave (see `removeRamOnClose`), delete it.
   * Memory accesses afterwards throw. Idempotent.
   */
  close(): void {
    if (this.hook_) this.unhook();
    if (this.memory.released) return;
    this.memory.release(this.removeRamOnClose);
    if (this.ownDir && this.removeRamOnClose) rmSync(this.ownDir, { recursive: true, force: true });
  }

  vcpu(i: number): SimVcpu {
    const v = this.vcpus[i];
    if (!v) throw new SimError('invalid-argument', `no vCPU ${i} (the VM has ${this.vcpus.length})`);
    return v;
  }

  /** The guest brings an AP up (INIT/SIPI): its mp_state leaves UNINITIALIZED. */
  bringUpVcpu(i: number): void {
    this.vcpu(i).bringUp();
  }

  // ---- hooking ioctls (§7.1) -----------------------------------------------------------------------

  /** KVM_INTROSPECTION_HOOK. Returns 0 or EPERM / EINVAL / EEXIST. */
  hook(socket: Socket, uuid: Uint8Array, opts: HookOptions = {}): number {
    if (!this.profile.introspection) return HostErrno.EPERM;
    if (!(socket instanceof Socket) || socket.destroyed) return HostErrno.EINVAL;
    if (!(uuid instanceof Uint8Array) || uuid.length !== 16) return HostErrno.EINVAL;
    if (this.hook_ !== null || this.vcpus.some((v) => v.hasIntrospectionState)) return HostErrno.EEXIST;
    const hook = new KvmiHook(
      ++this.generation,
      socket,
      new Uint8Array(uuid),
      () => this.vcpus.length,
      (i) => this.vcpus[i]!.isReady,
      !this.pureV12,
    );
    this.hook_ = hook;
    for (const v of this.vcpus) v.initIntrospection(hook);
    const { reader, writer } = attachFraming(socket, {
      ...(opts.leftover && opts.leftover.length > 0 ? { leftover: opts.leftover } : {}),
      onFrame: (frame) => this.onFrame(hook, frame),
      onError: (err) => this.lose(hook, `hard error: ${err.message}`, err.code !== 'socket-error' && err.code !== 'closed'),
      onClose: () => this.lose(hook, 'the connection closed', false),
    });
    hook.reader = reader;
    hook.writer = writer;
    this.stats.hooks++;
    this.emit('hooked');
    return 0;
  }

  /** KVM_INTROSPECTION_COMMAND. `id` −1 = all. Returns 0 or EINVAL / EFAULT / EPERM. */
  allowCommand(id: number, allow: number): number {
    if (!Number.isInteger(allow) || allow < 0 || allow > 1) return HostErrno.EINVAL;
    if (!Number.isInteger(id) || id < -1 || id >= KVMI_NUM_COMMANDS) return HostErrno.EINVAL;
    const hook = this.hook_;
    if (!hook) return HostErrno.EFAULT;
    if (id === -1) {
      if (allow) hook.commandAllowed.fill(true);
      else hook.resetCommands();
      return 0;
    }
    if (!allow && KvmiHook.isAlwaysAllowed(id)) return HostErrno.EPERM;
    hook.commandAllowed[id] = allow === 1;
    return 0;
  }

  /** KVM_INTROSPECTION_EVENT. `id` −1 = all. Returns 0 or EINVAL / EFAULT. */
  allowEvent(id: number, allow: number): number {
    if (!Number.isInteger(allow) || allow < 0 || allow > 1) return HostErrno.EINVAL;
    if (!Number.isInteger(id) || id < -1 || id >= KVMI_NUM_EVENTS) return HostErrno.EINVAL;
    const hook = this.hook_;
    if (!hook) return HostErrno.EFAULT;
    if (id === -1) hook.eventAllowed.fill(allow === 1);
    else hook.eventAllowed[id] = allow === 1;
    return 0;
  }

  /** KVM_INTROSPECTION_PREUNHOOK: send KVMI_VM_EVENT_UNHOOK if enabled (0), else ENOENT. Does not wait. */
  preunhook(): number {
    if (!this.profile.introspection) return HostErrno.EPERM;
    const hook = this.hook_;
    if (!hook) return HostErrno.EFAULT;
    if (!hook.unhookEventEnabled) return HostErrno.ENOENT;
    if (!hook.send(encodeVmEvent(hook.nextSeq()))) return HostErrno.ENOENT;
    this.stats.eventsSent++;
    this.emit('unhook-event');
    return 0;
  }

  /**
   * KVM_INTROSPECTION_UNHOOK (also what VM destruction does): shut the socket down, release the vCPUs,
   * free the per-vCPU state, remove every page restriction, restore KVM's interceptions when
   * restore_on_unhook. Guest memory is not touched. Always 0 (EPERM when introspection is off).
   */
  unhook(): number {
    if (!this.profile.introspection) return HostErrno.EPERM;
    const hook = this.hook_;
    if (!hook) return 0;
    this.hook_ = null; // first, so that listeners of 'connection-lost' see an unhooked VM
    this.lose(hook, 'unhook', false);
    for (const v of this.vcpus) v.freeIntrospection(hook.restoreOnUnhook);
    this.ept.clear();
    hook.mapTokens.clear();
    this.stats.unhooks++;
    this.emit('unhooked');
    return 0;
  }

  /** A map token issued by GET_MAP_TOKEN, consumed once (for the /dev/kvmmem model). */
  consumeMapToken(token: Uint8Array): boolean {
    const hook = this.hook_;
    if (!hook) return false;
    return hook.mapTokens.delete(Buffer.from(token).toString('hex'));
  }

  // ---- VcpuHost -----------------------------------------------------------------------------------

  /** @internal */
  hardError(hook: KvmiHook, reason: string): void {
    this.lose(hook, reason, true);
  }

  /** @internal */
  internalError(err: unknown): void {
    this.stats.internalErrors++;
    this.emit('internal-error', err);
    const hook = this.hook_;
    if (hook) this.lose(hook, `internal error: ${err instanceof Error ? err.message : String(err)}`, true);
  }

  /** @internal */
  vcpuCrashed(index: number): void {
    this.emit('vcpu-crash', index);
  }

  /** @internal */
  guestEvent(record: GuestEventRecord): void {
    if (this.listenerCount('guest-event') > 0) this.emit('guest-event', record);
  }

  /** @internal */
  livelock(report: LivelockReport): void {
    this.emit('livelock', report);
  }

  /** @internal A vCPU's KVM_RUN returns a Heki exit: the VMM handles it, then re-enters or stops the VM. */
  async hekiExit(exit: HekiExit): Promise<HekiCompletion> {
    if (exit.kind === 'configure') this.heki.stats.configureExits++;
    else this.heki.stats.denialExits++;
    this.emit('heki-exit', exit);
    const h = this.hekiExitHandler;
    if (!h) return 'reenter';
    try {
      return await h(exit);
    } catch (err) {
      this.internalError(err);
      return 'reenter';
    }
  }

  /** The VMM stopped the VM (e.g. a Heki denial with STOP_VM): no vCPU enters the guest again. */
  stopVm(reason: string): void {
    if (this.stoppedReason !== null) return;
    this.stoppedReason = reason;
    this.emit('vm-stopped', reason);
  }

  /** Stopped by the VMM (`stopVm`), with the reason; null while running. */
  get stopped(): string | null {
    return this.stoppedReason;
  }

  // ---- the receive thread -------------------------------------------------------------------------

  /** Connection loss (§8): shut the socket down and release every vCPU. Idempotent per hook. */
  private lose(hook: KvmiHook, reason: string, hard: boolean): void {
    if (!hook.alive) return;
    hook.alive = false;
    hook.lossReason = reason;
    this.stats.connectionLosses++;
    this.stats.lastLossReason = reason;
    if (hard) this.stats.hardErrors++;
    hook.reader.stop();
    if (!hook.socket.destroyed) {
      // KVM answers each VM command before reading the next message, so replies already produced
      // leave before the shutdown (a hard error in the same write must not swallow them).
      const socket = hook.socket;
      const timer = setTimeout(() => socket.destroy(), 100);
      timer.unref();
      void hook.writer.close().finally(() => {
        clearTimeout(timer);
        socket.destroy();
      });
    }
    if (this.hook_ === hook) for (const v of this.vcpus) v.queueRelease();
    this.emit('connection-lost', reason);
  }

  private onFrame(hook: KvmiHook, frame: Buffer): void {
    if (!hook.alive) return;
    this.stats.messagesReceived++;
    try {
      const m = receiveKernelMessage(frame, hook.kernelState);
      switch (m.kind) {
        case 'hard-error':
          this.lose(hook, `hard error: ${m.reason}`, true);
          return;
        case 'error-reply':
          this.stats.errorReplies++;
          hook.send(encodeErrorReply(m.id, m.seq, m.errno));
          return;
        case 'event-reply':
          this.vcpus[m.vcpu]!.queueReply(hook, m.seq, m.payload);
          return;
        case 'command':
          if (this.listenerCount('command') > 0) this.emit('command', m.def.key, m.vcpu, m.request as Req);
          if (m.vcpu === null) this.vmCommand(hook, m);
          else this.vcpus[m.vcpu]!.queueCommand(hook, m);
          return;
      }
    } catch (err) {
      this.internalError(err);
    }
  }

  private vmCommand(hook: KvmiHook, m: CommandMsg): void {
    this.stats.commandsExecuted++;
    const errno = runCommandChecks(m, hook.kernelState, (c) => this.stateFails(hook, c.key, m));
    if (errno !== 0) {
      this.stats.errorReplies++;
      hook.send(encodeErrorReply(m.def.id, m.seq, errno));
      return;
    }
    hook.send(this.execute(hook, m));
  }

  /** The catalog's `state` checks for VM commands (true = the check fails). */
  private stateFails(hook: KvmiHook, key: string, m: CommandMsg): boolean {
    const r = m.request as Req;
    switch (key) {
      case 'command-known':
        return !kernelKnowsCommand(r['id'] as number, hook.kernelState);
      case 'command-allowed':
        return !(KvmiHook.isAlwaysAllowed(r['id'] as number) || hook.isCommandAllowed(r['id'] as number));
      case 'event-known':
        return !kernelKnowsEvent(r['id'] as number);
      case 'event-allowed':
        return !hook.isEventAllowed((m.def.key === 'VM_CHECK_EVENT' ? r['id'] : r['event_id']) as number);
      case 'gpa-backed':
        return !this.memory.isBacked(r['gpa'] as bigint);
      case 'vcpu-index':
        return (r['vcpu'] as number) >= this.vcpus.length;
      case 'pause-limit':
        return this.vcpus[r['vcpu'] as number]!.pendingPauseRequests > MAX_PAUSE_REQUESTS;
      case 'page-access-entries':
        // The handler applies every entry and reports the first error (§4.2).
        return this.setPageAccess(m) !== 0;
      case 'page-access-alloc':
      case 'token-alloc':
        return this.profile.failAllocations.includes(key);
      case 'token-limit':
        return hook.mapTokens.size >= MAX_OUTSTANDING_MAP_TOKENS;
      default:
        throw new Error(`simulator: no state check '${key}' for ${m.def.name}`);
    }
  }

  /** VM_SET_PAGE_ACCESS entries, in order; each bad entry fails alone. Returns the first errno or 0. */
  private setPageAccess(m: CommandMsg): number {
    const entries = (m.request as Req)['entries'] as PageAccessEntry[];
    const first = structs.kvmi_vm_set_page_access.size;
    const size = structs.kvmi_page_access_entry.size;
    let err = 0;
    entries.forEach((e, i) => {
      let ec = 0;
      if (!structs.kvmi_page_access_entry.paddingIsZero(m.body, first + i * size)) ec = KvmErrno.EINVAL;
      else if ((e.access & ~PageAccess.RWX) !== 0) ec = KvmErrno.EINVAL;
      else if (!this.memory.isBacked(e.gpa)) ec = KvmErrno.EINVAL;
      else this.ept.set(BigInt(gfnOf(e.gpa)), e.access);
      if (ec !== 0 && err === 0) err = ec;
    });
    return err;
  }

  /** Run a VM command whose checks passed; returns the reply frame. */
  private execute(hook: KvmiHook, m: CommandMsg): Buffer {
    const r = m.request as Req;
    const seq = m.seq;
    switch (m.def.key) {
      case 'GET_VERSION':
        return encodeReply('GET_VERSION', seq, {
          version: KVMI_VERSION,
          max_msg_size: KVMI_MAX_MSG_SIZE,
          features: { singlestep: this.profile.singlestep ? 1 : 0 },
        });
      case 'VM_CHECK_COMMAND':
        return encodeReply('VM_CHECK_COMMAND', seq, {});
      case 'VM_CHECK_EVENT':
        return encodeReply('VM_CHECK_EVENT', seq, {});
      case 'VM_GET_INFO':
        return encodeReply('VM_GET_INFO', seq, { vcpu_count: this.vcpus.length });
      case 'VM_CONTROL_EVENTS':
        hook.unhookEventEnabled = r['enable'] === 1;
        return encodeReply('VM_CONTROL_EVENTS', seq, {});
      case 'VM_READ_PHYSICAL':
        return encodeReply('VM_READ_PHYSICAL', seq, {
          data: new Uint8Array(this.memory.read(r['gpa'] as bigint, r['size'] as number)!),
        });
      case 'VM_WRITE_PHYSICAL':
        this.memory.write(r['gpa'] as bigint, r['data'] as Uint8Array);
        return encodeReply('VM_WRITE_PHYSICAL', seq, {});
      case 'VM_PAUSE_VCPU':
        // wait = 1 replies after the kick; the simulated kick is immediate.
        this.vcpus[r['vcpu'] as number]!.addPauseRequest();
        return encodeReply('VM_PAUSE_VCPU', seq, {});
      case 'VM_CONTROL_CLEANUP':
        hook.restoreOnUnhook = r['enable'] === 1;
        return encodeReply('VM_CONTROL_CLEANUP', seq, {});
      case 'VM_SET_PAGE_ACCESS':
        return encodeReply('VM_SET_PAGE_ACCESS', seq, {});
      case 'GET_MAP_TOKEN': {
        const bytes = Buffer.from(randBytes(this.prng, structs.kvmi_mem_token.size));
        hook.mapTokens.add(bytes.toString('hex'));
        return encodeReply('GET_MAP_TOKEN', seq, { token: structs.kvmi_mem_token.read(bytes) });
      }
      case 'VM_GET_MAX_GFN':
        return encodeReply('VM_GET_MAX_GFN', seq, { gfn: BigInt(this.memory.limitGfn) });
      default:
        throw new Error(`simulator: no handler for VM command ${m.def.name}`);
    }
  }
}

/** 8-4-4-4-12 hex. */
function uuidText(b: Uint8Array): string {
  const h = Buffer.from(b).toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** A random (version 4) uuid from the VM's generator. */
function uuidV4(prng: Prng): Uint8Array {
  const b = randBytes(prng, 16);
  b[6] = (b[6]! & 0x0f) | 0x40;
  b[8] = (b[8]! & 0x3f) | 0x80;
  return b;
}

/** Every catalog `state` check key the simulator answers (a test compares this with the catalog). */
export const SIMULATED_STATE_CHECKS: readonly string[] = [
  // VM commands
  'command-known', 'command-allowed', 'event-known', 'event-allowed', 'gpa-backed', 'vcpu-index', 'pause-limit',
  'page-access-entries', 'page-access-alloc', 'token-limit', 'token-alloc',
  // vCPU commands
  'breakpoint-arbitration', 'descriptor-exits', 'msrs-readable', 'reply-alloc', 'waiting-for-reply', 'cpuid-leaf',
  'injection-pending', 'xsave-alloc', 'xsave-content', 'msr-filter', 'singlestep-support',
];
