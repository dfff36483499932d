/**
 * Kernel code integrity, attach side: derive the KASLR slide from the guest (LSTAR − the entry's offset,
 * confirmed by reading the entry's signature), translating with VCPU_TRANSLATE_GVA (an all-ones answer is
 * retried on a vCPU that is in kernel mode), then write-protect the profile's pages per GPA with
 * VM_SET_PAGE_ACCESS in batches of at most 511 entries. The derivation is kept per boot (QEMU start time)
 * and redone when it changes; the restrictions are re-applied for every new session.
 */
import type { GuestOsProfile } from '@periscope/simulator';
import { AnalysisError } from './errors.js';
import type { AgentSession, LiveVm } from './link.js';
import { protectedRanges } from './modules.js';
import type { PolicySpec } from './policy.js';
import { deriveKernel, pagesOf, type KernelFacts, type ProfileRegistry } from './profiles.js';

export const MAX_PAGE_ACCESS_BATCH = 511;
const ALL_ONES = 0xffff_ffff_ffff_ffffn;
/** Text and data stay readable and executable; only writes fault (R|X). */
export const PROTECTED_ACCESS = 1 | 4;

export async function deriveFacts(s: AgentSession, vm: LiveVm, profile: GuestOsProfile): Promise<KernelFacts> {
  const regs = async (vcpu: number, msrIndexes: number[]) => {
    const r = await s.command(vm, vcpu, { $case: 'getRegisters', value: { msrIndexes } }, 'kernel-code-integrity: read registers');
    if (r.result?.$case !== 'getRegisters') throw new AnalysisError('command-failed', 'VCPU_GET_REGISTERS returned no registers');
    return r.result.value;
  };
  const translateOn = async (vcpu: number, gva: bigint): Promise<bigint> => {
    const r = await s.command(vm, vcpu, { $case: 'translateGva', value: { gva } }, 'kernel-code-integrity: translate');
    if (r.result?.$case !== 'translateGva') throw new AnalysisError('command-failed', 'VCPU_TRANSLATE_GVA returned no gpa');
    return r.result.value.gpa;
  };
  const derived = await deriveKernel(
    {
      readMsr: async (index) => {
        const r = await regs(0, [index]);
        const m = r.msrs.find((x) => x.index === index);
        if (!m) throw new AnalysisError('slide-not-derived', `VCPU_GET_REGISTERS did not return MSR 0x${index.toString(16)}`);
        return m.data;
      },
      translate: async (gva) => {
        const first = await translateOn(0, gva);
        if (first !== ALL_ONES) return first;
        // vCPU 0 may be in user mode with a CR3 that does not map the kernel: retry on one in kernel mode.
        for (let v = 1; v < vm.vcpuCount; v++) {
          const r = await regs(v, []);
          if ((r.sregs?.cs?.dpl ?? 3) !== 0) continue;
          const gpa = await translateOn(v, gva);
          if (gpa !== ALL_ONES) return gpa;
        }
        return ALL_ONES;
      },
      readPhys: async (gpa, length) => {
        const r = await s.command(vm, 0, { $case: 'readPhysical', value: { gpa, size: length } }, 'kernel-code-integrity: signature');
        if (r.result?.$case !== 'readPhysical') throw new AnalysisError('command-failed', 'VM_READ_PHYSICAL returned no data');
        return new Uint8Array(r.result.value.data);
      },
    },
    profile,
  );
  return { profile: profile.name, qemuStartTimeMs: vm.startTimeMs, slide: derived.slide, textBase: derived.textBase, textPhys: derived.textPhys };
}

/** Write-protect every page of the policy's ranges for this VM session. Returns the number of pages. */
export async function restrictPages(s: AgentSession, vm: LiveVm, spec: PolicySpec, facts: KernelFacts, profiles: ProfileRegistry): Promise<number> {
  const pages = pagesOf([...protectedRanges(spec, facts, profiles).values()].flat());
  for (let i = 0; i < pages.length; i += MAX_PAGE_ACCESS_BATCH) {
    const entries = pages.slice(i, i + MAX_PAGE_ACCESS_BATCH).map((gpa) => ({ gpa, allowedAccess: PROTECTED_ACCESS }));
    await s.command(vm, 0, { $case: 'setPageAccess', value: { entries } }, `kernel-code-integrity: write-protect ${entries.length} pages`);
  }
  return pages.length;
}
