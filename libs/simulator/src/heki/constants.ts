/**
 * Heki (RFC v2) constants, from `../shared/spec/heki.md` §1. One place: the KVM side, the simulated VMM
 * and the guest use these names; the host agent's sink has its own copy of the few it needs (reason bits)
 * so that the two ends of the wire are checked against each other, not against one table.
 */

/** `KVM_HC_LOCK_CR_UPDATE` (13 in RFC v2; 14 in v1). */
export const KVM_HC_LOCK_CR_UPDATE = 13n;
/** `KVM_HC_PROTECT_MEMORY` (14 in RFC v2): out of scope here (no exit reaches the VMM). */
export const KVM_HC_PROTECT_MEMORY = 14n;
/** `KVM_LOCK_CR_UPDATE_VERSION`: the a2 flag of the version probe. */
export const KVM_LOCK_CR_UPDATE_VERSION = 1n;
/** `HEKI_ABI_VERSION`, returned by the probe: CR0 and CR4 pinning available. */
export const HEKI_ABI_VERSION = 1n;

/** `kvm_run.exit_reason` values. */
export const KVM_EXIT_HEKI_CONFIGURE = 39;
export const KVM_EXIT_HEKI_DENIAL = 40;

/** Capabilities for `KVM_CHECK_EXTENSION` / `KVM_ENABLE_CAP` (VM fd). */
export const KVM_CAP_HEKI_CONFIGURE = 235;
export const KVM_CAP_HEKI_DENIAL = 236;

/** Reason bits (`KVM_HEKI_EXIT_REASON_*`). */
export const KVM_HEKI_EXIT_REASON_CR0 = 1n;
export const KVM_HEKI_EXIT_REASON_CR4 = 2n;
/** The valid reason mask: what `KVM_CHECK_EXTENSION(235/236)` returns, with or without CONFIG_HEKI. */
export const HEKI_VALID_REASONS = 3n;

/** `KVM_CHECK_EXTENSION` = `_IO(0xAE, 0x03)`; `KVM_ENABLE_CAP` = `_IOW(0xAE, 0xa3, struct kvm_enable_cap)` (104 bytes). */
export const KVM_CHECK_EXTENSION_IOCTL = 0xae03;
export const KVM_ENABLE_CAP_IOCTL = 0x4068aea3;

/** CR0.WP: a CR0 pin must include it. */
export const X86_CR0_WP = 1n << 16n;
/** CR4 bits that can be pinned (`cr4_pinned_mask`): SMEP, SMAP, UMIP, FSGSBASE, CET. */
export const CR4_SMEP = 1n << 20n;
export const CR4_SMAP = 1n << 21n;
export const CR4_UMIP = 1n << 11n;
export const CR4_FSGSBASE = 1n << 16n;
export const CR4_CET = 1n << 23n;
export const CR4_PINNED_MASK = CR4_SMEP | CR4_SMAP | CR4_UMIP | CR4_FSGSBASE | CR4_CET;

/** KVM hypercall error values (`include/uapi/linux/kvm_para.h`), returned negated in RAX. */
export const KVM_EPERM = 1n;
export const KVM_EINVAL = 22n;
export const KVM_ENOSYS = 1000n;
/** RAX for `-KVM_<err>`. */
export const kvmErr = (e: bigint): bigint => BigInt.asUintN(64, -e);

/** Host errno for `KVM_ENABLE_CAP` failures. */
export const EINVAL = 22;

/** `kvm_run` offsets (x86-64, gcc): `exit_reason` (u32) at 8, the exit union at 32; the Heki member is 64 bytes. */
export const KVM_RUN_EXIT_REASON_OFFSET = 8;
export const KVM_RUN_UNION_OFFSET = 32;
export const HEKI_EXIT_SIZE = 64;
