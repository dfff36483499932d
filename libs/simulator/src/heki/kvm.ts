/**
 * KVM's side of Heki (RFC v2, `../shared/spec/heki.md` §1–§3) for one VM: `KVM_CHECK_EXTENSION` /
 * `KVM_ENABLE_CAP` for the two notification capabilities, the `KVM_HC_LOCK_CR_UPDATE` hypercall with
 * its checks in the sheet's order, the per-VM pinned masks and the pin check of a CR write, and the
 * `kvm_run` image of the two exits.
 *
 * Without `CONFIG_HEKI` (host profile `heki: false`): CHECK_EXTENSION still answers 3, ENABLE_CAP fails
 * with EINVAL and both hypercalls return -KVM_ENOSYS.
 */
import { SimError } from '../errors.js';
import {
  CR4_PINNED_MASK,
  EINVAL,
  HEKI_ABI_VERSION,
  HEKI_EXIT_SIZE,
  HEKI_VALID_REASONS,
  KVM_CAP_HEKI_CONFIGURE,
  KVM_CAP_HEKI_DENIAL,
  KVM_EINVAL,
  KVM_ENOSYS,
  KVM_EPERM,
  KVM_EXIT_HEKI_CONFIGURE,
  KVM_EXIT_HEKI_DENIAL,
  KVM_HC_LOCK_CR_UPDATE,
  KVM_HEKI_EXIT_REASON_CR0,
  KVM_HEKI_EXIT_REASON_CR4,
  KVM_LOCK_CR_UPDATE_VERSION,
  KVM_RUN_EXIT_REASON_OFFSET,
  KVM_RUN_UNION_OFFSET,
  kvmErr,
  X86_CR0_WP,
} from './constants.js';

/** One reason bit: CR0 = 1, CR4 = 2. */
export type HekiReasonBit = 1 | 2;

/** A Heki exit as KVM_RUN reports it to the VMM. */
export type HekiExit =
  | { readonly kind: 'configure'; readonly vcpu: number; readonly reason: HekiReasonBit; readonly crPinned: bigint; readonly rip: bigint; readonly kvmRun: Buffer }
  | { readonly kind: 'denial'; readonly vcpu: number; readonly reason: HekiReasonBit; readonly crValue: bigint; readonly rip: bigint; readonly kvmRun: Buffer };

/**
 * How the VMM completes an exit: call KVM_RUN again (`reenter`: configure → RAX 0 and the VMCALL skipped;
 * denial → #GP(0) at the faulting MOV), or stop the VM instead (denial only).
 */
export type HekiCompletion = 'reenter' | 'stop';

/** The VMM's KVM_RUN loop for Heki exits (the simulated VMM, or a test). */
export type HekiExitHandler = (exit: HekiExit) => Promise<HekiCompletion>;

/** The KVM side's view of what the host has. */
export interface HekiHost {
  /** `CONFIG_HEKI`. */
  readonly heki: boolean;
  /** The host's CR0 (a CR0 pin must be a subset). */
  readonly hostCr0: bigint;
  /** The host's CR4 (CR4 pins are masked with it). */
  readonly hostCr4: bigint;
}

/** `struct kvm_enable_cap` as the ioctl takes it (args[1..3] are ignored by these caps). */
export interface KvmEnableCap {
  cap: number;
  flags: number;
  args: readonly bigint[];
}

/** Result of the lock hypercall: RAX, and the pin made (for the configure exit). */
export interface LockResult {
  readonly rax: bigint;
  readonly pinned?: { readonly reason: HekiReasonBit; readonly bits: bigint };
}

export interface HekiStats {
  /** Successful pins. */
  pins: number;
  /** Lock hypercalls that returned an error. */
  rejected: number;
  /** CR writes refused by a pin (the host's rate-limited warning). */
  violations: number;
  configureExits: number;
  denialExits: number;
}

export class HekiKvm {
  /** The VM's pinned CR0 / CR4 bits (accumulated by OR; no unpin). */
  private cr0 = 0n;
  private cr4 = 0n;
  /** Reasons enabled with KVM_ENABLE_CAP (replaced on each call; 0 = off). */
  private configure = 0n;
  private denial = 0n;
  readonly stats: HekiStats = { pins: 0, rejected: 0, violations: 0, configureExits: 0, denialExits: 0 };

  constructor(private readonly host: HekiHost) {}

  get hostHasHeki(): boolean {
    return this.host.heki;
  }
  get pinnedCr0(): bigint {
    return this.cr0;
  }
  get pinnedCr4(): bigint {
    return this.cr4;
  }
  get configureReasons(): bigint {
    return this.configure;
  }
  get denialReasons(): bigint {
    return this.denial;
  }
  pinned(cr: 0 | 4): bigint {
    return cr === 0 ? this.cr0 : this.cr4;
  }

  /** `KVM_CHECK_EXTENSION` on the VM fd: 3 for both Heki caps, even without CONFIG_HEKI; 0 for others. */
  checkExtension(cap: number): number {
    return cap === KVM_CAP_HEKI_CONFIGURE || cap === KVM_CAP_HEKI_DENIAL ? Number(HEKI_VALID_REASONS) : 0;
  }

  /**
   * `KVM_ENABLE_CAP` on the VM fd for 235/236: 0, or the errno (EINVAL without CONFIG_HEKI, for unknown
   * reason bits or non-zero flags). The mask replaces the earlier one; 0 turns notifications off.
   */
  enableCap(c: KvmEnableCap): 0 | typeof EINVAL {
    if (c.cap !== KVM_CAP_HEKI_CONFIGURE && c.cap !== KVM_CAP_HEKI_DENIAL) return EINVAL;
    if (!this.host.heki) return EINVAL;
    const mask = c.args[0] ?? 0n;
    if (c.flags !== 0 || mask < 0n || (mask & ~HEKI_VALID_REASONS) !== 0n) return EINVAL;
    if (c.cap === KVM_CAP_HEKI_CONFIGURE) this.configure = mask;
    else this.denial = mask;
    return 0;
  }

  /**
   * A VMCALL with a Heki number (`nr`, already truncated to 32 bits outside 64-bit mode, as are the
   * arguments). Returns undefined for numbers that are not Heki's.
   */
  hypercall(nr: bigint, a0: bigint, a1: bigint, a2: bigint, cpl: number): LockResult | undefined {
    if (nr !== KVM_HC_LOCK_CR_UPDATE && nr !== 14n) return undefined;
    if (!this.host.heki) return { rax: kvmErr(KVM_ENOSYS) };
    if (cpl !== 0) return this.fail(KVM_EPERM); // unconfirmed: hypercall-cpl
    if (nr !== KVM_HC_LOCK_CR_UPDATE) return { rax: kvmErr(KVM_ENOSYS) }; // unconfirmed: protect-memory
    // §2, in this order.
    if (a0 > 0xffffffffn) return this.fail(KVM_EINVAL);
    if (a2 !== 0n) {
      if (a2 === KVM_LOCK_CR_UPDATE_VERSION && a0 === 0n && a1 === 0n) return { rax: HEKI_ABI_VERSION };
      return this.fail(KVM_EINVAL);
    }
    if (a1 === 0n) return this.fail(KVM_EINVAL);
    if (a0 === 0n) {
      if ((a1 & X86_CR0_WP) === 0n || (a1 & ~this.host.hostCr0) !== 0n) return this.fail(KVM_EINVAL);
      this.cr0 |= a1;
      this.stats.pins++;
      return { rax: 0n, pinned: { reason: 1, bits: a1 } };
    }
    if (a0 === 4n) {
      if ((a1 & ~CR4_PINNED_MASK) !== 0n) return this.fail(KVM_EINVAL);
      const bits = a1 & this.host.hostCr4; // bits the host lacks are silently dropped
      this.cr4 |= bits;
      this.stats.pins++;
      return { rax: 0n, pinned: { reason: 2, bits } };
    }
    return this.fail(KVM_EINVAL);
  }

  /** Whether a configure / denial exit is enabled for this reason. */
  exitEnabled(kind: 'configure' | 'denial', reason: HekiReasonBit): boolean {
    return ((kind === 'configure' ? this.configure : this.denial) & BigInt(reason)) !== 0n;
  }

  /** The pin check of a CR0/CR4 write: true when `value` clears a pinned bit (the write is refused). */
  violates(cr: 0 | 4, value: bigint): boolean {
    const p = this.pinned(cr);
    if ((value & p) === p) return false;
    this.stats.violations++;
    return true;
  }

  private fail(err: bigint): LockResult {
    this.stats.rejected++;
    return { rax: kvmErr(err) };
  }
}

/** The reason bit of a CR. */
export const reasonOf = (cr: 0 | 4): HekiReasonBit => (cr === 0 ? Number(KVM_HEKI_EXIT_REASON_CR0) : Number(KVM_HEKI_EXIT_REASON_CR4)) as HekiReasonBit;

/**
 * The first 96 bytes of `struct kvm_run` for a Heki exit, as KVM fills them: `exit_reason` (u32 at 8),
 * the union at 32: `reason` (u64), `cr_pinned` / `cr_value` (u64), the rest of `reserved[7]` zeroed.
 */
export function kvmRunHekiExit(exitReason: typeof KVM_EXIT_HEKI_CONFIGURE | typeof KVM_EXIT_HEKI_DENIAL, reason: HekiReasonBit, value: bigint): Buffer {
  const b = Buffer.alloc(KVM_RUN_UNION_OFFSET + HEKI_EXIT_SIZE);
  b.writeUInt32LE(exitReason, KVM_RUN_EXIT_REASON_OFFSET);
  b.writeBigUInt64LE(BigInt(reason), KVM_RUN_UNION_OFFSET);
  b.writeBigUInt64LE(BigInt.asUintN(64, value), KVM_RUN_UNION_OFFSET + 8);
  return b;
}

/** What a VMM reads back from a `kvm_run` image (the inverse of `kvmRunHekiExit`). */
export function decodeKvmRunHekiExit(run: Buffer): { exitReason: number; reason: bigint; value: bigint } {
  if (run.length < KVM_RUN_UNION_OFFSET + 16) throw new SimError('invalid-argument', `kvm_run image too short: ${run.length} bytes`);
  return {
    exitReason: run.readUInt32LE(KVM_RUN_EXIT_REASON_OFFSET),
    reason: run.readBigUInt64LE(KVM_RUN_UNION_OFFSET),
    value: run.readBigUInt64LE(KVM_RUN_UNION_OFFSET + 8),
  };
}
