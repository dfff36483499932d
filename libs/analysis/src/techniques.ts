/**
 * MITRE ATT&CK techniques of alerts, by `MODULE/RULE` (docs/alerts.md renders this table; a test keeps the
 * two equal and checks every shipped attack scenario against it).
 */
export interface Technique {
  readonly id: string;
  readonly name: string;
  readonly why: string;
}

export const TECHNIQUES: Readonly<Record<string, Technique>> = {
  'kernel-code-integrity/text': { id: 'T1014', name: 'Rootkit', why: 'kernel code patched in place (inline hook)' },
  'kernel-code-integrity/rodata': { id: 'T1014', name: 'Rootkit', why: 'read-only kernel data (e.g. sys_call_table) redirected' },
  'kernel-code-integrity/text-hash': { id: 'T1014', name: 'Rootkit', why: 'kernel text changed without a vCPU write (DMA or another EPT bypass), found by re-hashing' },
  'kernel-code-integrity/rodata-hash': { id: 'T1014', name: 'Rootkit', why: 'read-only kernel data changed without a vCPU write (DMA or another EPT bypass), found by re-hashing' },
  'kernel-code-integrity/profile-hash': { id: 'T1014', name: 'Rootkit', why: 'kernel text differs from the guest OS profile\'s page hashes at attach (patched before protection)' },
  'kernel-code-integrity/data': { id: 'T1562.001', name: 'Impair Defenses: Disable or Modify Tools', why: 'a protected security setting of the kernel overwritten' },
  'cr-pinning/cr0': { id: 'T1562', name: 'Impair Defenses', why: 'CR0.WP cleared to write read-only kernel memory' },
  'cr-pinning/cr4': { id: 'T1068', name: 'Exploitation for Privilege Escalation', why: 'SMEP/SMAP cleared to run or read user memory in kernel mode (ret2usr)' },
  'syscall-msrs/entry': { id: 'T1014', name: 'Rootkit', why: 'system-call entry MSR pointed at attacker code' },
  'syscall-msrs/efer-nxe': { id: 'T1562', name: 'Impair Defenses', why: 'EFER.NXE cleared: data becomes executable' },
  'descriptor-tables/idtr': { id: 'T1014', name: 'Rootkit', why: 'interrupt descriptor table replaced' },
  'descriptor-tables/gdtr': { id: 'T1014', name: 'Rootkit', why: 'global descriptor table replaced' },
  'heki/cr0': { id: 'T1562', name: 'Impair Defenses', why: 'a Heki-pinned CR0 bit (WP) cleared: KVM refused the write' },
  'heki/cr4': { id: 'T1068', name: 'Exploitation for Privilege Escalation', why: 'a Heki-pinned CR4 bit (SMEP/SMAP/UMIP…) cleared: KVM refused the write' },
  'heki/missing-pin': { id: 'T1562.001', name: 'Impair Defenses: Disable or Modify Tools', why: 'the guest kernel did not pin the CR bits its policy expects (Heki off or boot tampered)' },
};

export function techniqueOf(module: string, rule: string): Technique | undefined {
  return TECHNIQUES[`${module}/${rule}`];
}

export function renderTechniqueTable(): string {
  const lines = ['| module / rule | technique | name | why |', '| --- | --- | --- | --- |'];
  for (const [k, t] of Object.entries(TECHNIQUES)) lines.push(`| \`${k}\` | ${t.id} | ${t.name} | ${t.why} |`);
  return lines.join('\n');
}
