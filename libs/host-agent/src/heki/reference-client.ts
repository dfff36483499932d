/**
 * Reference client for VMM integrations (docs/heki.md): what QEMU or cloud-hypervisor adds to forward
 * Heki `KVM_RUN` exits to the host agent's sink. A VMM in C or Rust follows the same steps:
 *
 * 1. At VM creation: `KVM_CHECK_EXTENSION(235/236)` (3 on every host: it proves nothing), then
 *    `KVM_ENABLE_CAP` on the VM fd with `{cap, flags 0, args[0] = reasons}` for both caps. Success of
 *    ENABLE_CAP is the only proof the host has Heki. Then `RegisterVm` (best effort, bounded).
 * 2. In the vCPU thread, when `KVM_RUN` returns `exit_reason` 39 or 40: decode the union at offset 32
 *    (`decodeHekiKvmRun`) and call `onExit`:
 *    - 39 (configure): report without waiting and call `KVM_RUN` again at once (KVM sets RAX = 0, skips
 *      the VMCALL);
 *    - 40 (denial): ask the sink, bounded by the registration's `denial_timeout_ms`; `STOP_VM` → stop the
 *      VM; anything else, an error or a timeout → `default_completion` (before any registration: call
 *      `KVM_RUN` again, KVM injects #GP(0) — the RFC's behaviour).
 * 3. Never block a vCPU on the sink beyond the deadline; never fail the VM because the sink is down.
 */
import { credentials, Metadata, status, type ServiceError } from '@grpc/grpc-js';
import { DenialCompletion, HekiReason, HekiSinkServiceClient, type RegisterVmResponse } from '@periscope/contracts';

/** `kvm_run.exit_reason` (u32 at offset 8). */
export const KVM_EXIT_HEKI_CONFIGURE = 39;
export const KVM_EXIT_HEKI_DENIAL = 40;
export const KVM_CAP_HEKI_CONFIGURE = 235;
export const KVM_CAP_HEKI_DENIAL = 236;

/** A Heki exit as read from `struct kvm_run`. */
export interface HekiKvmRunExit {
  exitReason: typeof KVM_EXIT_HEKI_CONFIGURE | typeof KVM_EXIT_HEKI_DENIAL;
  /** `heki_*.reason` (u64 at 32): one of the reason bits 1 (CR0), 2 (CR4). */
  reason: bigint;
  /** u64 at 40: `cr_pinned` (configure: the bits pinned by this call) or `cr_value` (denial: the value the guest tried to write). */
  value: bigint;
}

/** Decode the Heki member of `kvm_run`; null when the exit is not a Heki exit. */
export function decodeHekiKvmRun(run: Uint8Array): HekiKvmRunExit | null {
  if (run.length < 48) throw new RangeError(`kvm_run: ${run.length} bytes, need at least 48`);
  const v = new DataView(run.buffer, run.byteOffset, run.byteLength);
  const exitReason = v.getUint32(8, true);
  if (exitReason !== KVM_EXIT_HEKI_CONFIGURE && exitReason !== KVM_EXIT_HEKI_DENIAL) return null;
  return { exitReason, reason: v.getBigUint64(32, true), value: v.getBigUint64(40, true) };
}

export interface HekiForwarderOptions {
  /** `unix:PATH` of the agent's `--heki-listen`. */
  sink: string;
  vmUuid: Uint8Array;
  vmName: string;
  /** The VMM's start time in ms (the KVMI handshake's start_time). */
  qemuStartTimeMs: bigint;
  /** Deadline of a denial report before any registration answered (default 100 ms). */
  fallbackDenialTimeoutMs?: number;
  /** Deadline of RegisterVm / configure reports (default 1000 ms). */
  callTimeoutMs?: number;
}

/** What KVM_ENABLE_CAP gave the VMM. */
export interface HekiEnabled {
  hostHasHeki: boolean;
  /** Reason masks passed to ENABLE_CAP (0 when it failed). */
  configure: bigint;
  denial: bigint;
}

export type VmmCompletion = 'reenter' | 'stop';

const reasonEnum = (bit: bigint): HekiReason => (bit === 1n ? HekiReason.HEKI_REASON_CR0 : bit === 2n ? HekiReason.HEKI_REASON_CR4 : HekiReason.HEKI_REASON_UNSPECIFIED);
const reasonsOf = (mask: bigint): HekiReason[] => [1n, 2n].filter((b) => (mask & b) !== 0n).map(reasonEnum);

export class HekiForwarder {
  private readonly client: HekiSinkServiceClient;
  private registration: RegisterVmResponse | null = null;
  private enabled: HekiEnabled = { hostHasHeki: false, configure: 0n, denial: 0n };

  constructor(private readonly opts: HekiForwarderOptions) {
    this.client = new HekiSinkServiceClient(opts.sink, credentials.createInsecure());
  }

  get registered(): RegisterVmResponse | null {
    return this.registration;
  }

  /** Announce the VM (after ENABLE_CAP). Resolves false when the sink is unreachable; the VM runs on. */
  register(enabled: HekiEnabled): Promise<boolean> {
    this.enabled = enabled;
    return new Promise((resolve) => {
      this.client.registerVm(
        {
          vmUuid: Buffer.from(this.opts.vmUuid),
          vmName: this.opts.vmName,
          hostHasHeki: enabled.hostHasHeki,
          configureReasons: enabled.hostHasHeki ? reasonsOf(enabled.configure) : [],
          denialReasons: enabled.hostHasHeki ? reasonsOf(enabled.denial) : [],
          qemuStartTimeMs: this.opts.qemuStartTimeMs,
        },
        new Metadata(),
        { deadline: Date.now() + (this.opts.callTimeoutMs ?? 1000) },
        (err, res) => {
          if (!err) this.registration = res;
          resolve(!err);
        },
      );
    });
  }

  /**
   * A Heki exit of vCPU `vcpu` at guest `rip`: how to complete it. Configure never waits for the sink
   * (the report runs in the background); a denial waits at most the deadline.
   */
  async onExit(vcpu: number, rip: bigint, exit: HekiKvmRunExit): Promise<VmmCompletion> {
    const meta = { vmUuid: Buffer.from(this.opts.vmUuid), vcpu, reason: reasonEnum(exit.reason), rip, exitUnixNs: BigInt(Date.now()) * 1_000_000n };
    if (exit.exitReason === KVM_EXIT_HEKI_CONFIGURE) {
      this.client.reportConfigureExit({ ...meta, crPinned: exit.value }, new Metadata(), { deadline: Date.now() + (this.opts.callTimeoutMs ?? 1000) }, (err) => {
        if (err?.code === status.FAILED_PRECONDITION) void this.register(this.enabled); // the agent restarted
      });
      return 'reenter';
    }
    const timeout = this.registration?.denialTimeoutMs || this.opts.fallbackDenialTimeoutMs || 100;
    const byDefault: VmmCompletion = this.registration?.defaultCompletion === DenialCompletion.DENIAL_COMPLETION_STOP_VM ? 'stop' : 'reenter';
    const answer = await new Promise<{ err: ServiceError | null; completion?: DenialCompletion }>((resolve) => {
      this.client.reportDenialExit({ ...meta, attemptedValue: exit.value }, new Metadata(), { deadline: Date.now() + timeout }, (err, res) =>
        resolve(err ? { err } : { err: null, completion: res.completion }),
      );
    });
    if (answer.err) {
      if (answer.err.code === status.FAILED_PRECONDITION) void this.register(this.enabled);
      return byDefault;
    }
    return answer.completion === DenialCompletion.DENIAL_COMPLETION_STOP_VM ? 'stop' : 'reenter';
  }

  close(): void {
    this.client.close();
  }
}
