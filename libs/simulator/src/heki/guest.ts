/**
 * The guest kernel's side of Heki ([h04]): `heki_early_init` probes the ABI version, and at the end of
 * init (after rodata is read-only) the kernel pins CR0.WP and `CR4 & cr4_pinned_mask` with
 * `KVM_HC_LOCK_CR_UPDATE`. Each call is a real VMCALL guest action (KVM's ABI: RAX = 13, RBX = CR,
 * RCX = mask, RDX = flags, result in RAX).
 */
import type { GuestResult } from '../kvm/types.js';
import type { SimVcpu } from '../kvm/vcpu.js';
import { CR4_PINNED_MASK, HEKI_ABI_VERSION, KVM_HC_LOCK_CR_UPDATE, KVM_LOCK_CR_UPDATE_VERSION, X86_CR0_WP } from './constants.js';

/** `KVM_HC_LOCK_CR_UPDATE(cr, mask, flags)` from the guest: a VMCALL; `value` is RAX afterwards. */
export function hekiLockCr(vcpu: SimVcpu, cr: bigint, mask: bigint, flags = 0n): Promise<GuestResult> {
  return vcpu.vmcall({ rax: KVM_HC_LOCK_CR_UPDATE, rbx: cr, rcx: mask, rdx: flags });
}

/** The version probe: RAX = 1 (HEKI_ABI_VERSION) on a Heki host, -KVM_ENOSYS without. */
export function hekiProbe(vcpu: SimVcpu): Promise<GuestResult> {
  return hekiLockCr(vcpu, 0n, 0n, KVM_LOCK_CR_UPDATE_VERSION);
}

export interface HekiInitResult {
  /** RAX of the probe. */
  probe: bigint;
  /** RAX of the CR0 / CR4 pins (absent when the probe failed: the kernel does not pin). */
  cr0?: bigint;
  cr4?: bigint;
  /** The CR4 bits the guest asked to pin (before the host mask). */
  cr4Requested?: bigint;
}

/** The Heki-enabled guest kernel's init on one vCPU: probe, then pin CR0.WP and CR4 & cr4_pinned_mask. */
export async function hekiGuestInit(vcpu: SimVcpu): Promise<HekiInitResult> {
  const probe = (await hekiProbe(vcpu)).value ?? 0n;
  if (probe !== HEKI_ABI_VERSION) return { probe };
  const cr0 = (await hekiLockCr(vcpu, 0n, X86_CR0_WP)).value ?? 0n;
  const cr4Requested = vcpu.cpu.sregs.cr4 & CR4_PINNED_MASK;
  const cr4 = (await hekiLockCr(vcpu, 4n, cr4Requested)).value ?? 0n;
  return { probe, cr0, cr4, cr4Requested };
}
