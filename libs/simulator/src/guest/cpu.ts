/**
 * One vCPU's architectural state, minimal but truthful: `kvm_regs`, `kvm_sregs`, the MSRs KVM can read,
 * XCR0, the legacy 4 KiB xsave area, the guest CPUID table and an MTRR type map. The register structs
 * are the library's value types (`structs.KvmRegs` / `KvmSregs`), so what the guest holds is what goes
 * on the wire.
 *
 * Architectural numbers (MSR indexes, CR bits, the XSAVE legacy-area layout) come from the Intel SDM;
 * they are guest facts, not KVMI struct offsets.
 */
import { structs } from '@periscope/kvmi';
import { CR0_PE, CR0_PG, EFER_LMA, type CpuPagingState } from '@periscope/x86';

type KvmRegs = structs.KvmRegs;
type KvmSregs = structs.KvmSregs;
type KvmSegment = structs.KvmSegment;

// ---- MSRs -------------------------------------------------------------------------------------

export const MSR = {
  TSC: 0x10,
  APIC_BASE: 0x1b,
  SPEC_CTRL: 0x48,
  SYSENTER_CS: 0x174,
  SYSENTER_ESP: 0x175,
  SYSENTER_EIP: 0x176,
  MISC_ENABLE: 0x1a0,
  PAT: 0x277,
  MTRR_DEF_TYPE: 0x2ff,
  EFER: 0xc0000080,
  STAR: 0xc0000081,
  LSTAR: 0xc0000082,
  CSTAR: 0xc0000083,
  SFMASK: 0xc0000084,
  FS_BASE: 0xc0000100,
  GS_BASE: 0xc0000101,
  KERNEL_GS_BASE: 0xc0000102,
  TSC_AUX: 0xc0000103,
} as const;

export const CR0_BOOT = 0x80050033n; // PG | AM | WP | NE | ET | MP | PE
export const CR4_BOOT = 0x003406e0n; // SMAP | SMEP | OSXSAVE | OSXMMEXCPT | OSFXSR | PGE | MCE | PAE
export const EFER_BOOT = 0xd01n; // NXE | LMA | LME | SCE
export const APIC_BASE_BSP = 0xfee00900n; // enabled, BSP
export const APIC_BASE_AP = 0xfee00800n;

// ---- CPUID ------------------------------------------------------------------------------------

export interface CpuidEntry {
  function: number;
  index: number;
  /** KVM_CPUID_FLAG_SIGNIFCANT_INDEX: the entry matches only its own `index`. */
  significantIndex: boolean;
  eax: number;
  ebx: number;
  ecx: number;
  edx: number;
}

function str4(s: string): number {
  return Buffer.from(s, 'latin1').readUInt32LE(0);
}

/** A small, consistent Intel-like CPUID table as KVM would expose it to the guest. */
export function defaultCpuid(apicId: number, xsaveFeatures: bigint): CpuidEntry[] {
  const e = (fn: number, index: number, sig: boolean, eax: number, ebx: number, ecx: number, edx: number): CpuidEntry => ({
    function: fn, index, significantIndex: sig, eax: eax >>> 0, ebx: ebx >>> 0, ecx: ecx >>> 0, edx: edx >>> 0,
  });
  const xcr0Lo = Number(xsaveFeatures & 0xffffffffn);
  return [
    e(0x0, 0, false, 0xd, str4('Genu'), str4('ntel'), str4('ineI')),
    // family 6 model 0x55; ecx: SSE3 SSSE3 CX16 SSE4.1/4.2 x2APIC POPCNT XSAVE OSXSAVE AVX HYPERVISOR
    e(0x1, 0, false, 0x00050654, ((apicId & 0xff) << 24) | 0x00010800, 0xf6f82203, 0x0f8bfbff),
    // ebx: FSGSBASE BMI1 AVX2 SMEP BMI2 ERMS INVPCID SMAP
    e(0x7, 0, true, 0, 0x001003ab, 0, 0),
    e(0xd, 0, true, xcr0Lo, 0x340, 0x340, 0),
    e(0xd, 1, true, 0x1, 0, 0, 0),
    e(0x40000000, 0, false, 0x40000001, str4('KVMK'), str4('VMKV'), str4('M\0\0\0')),
    e(0x40000001, 0, false, 0x01007afb, 0, 0, 0),
    e(0x80000000, 0, false, 0x80000008, 0, 0, 0),
    e(0x80000001, 0, false, 0, 0, 0x00000121, 0x2c100800), // LM, NX, SYSCALL, RDTSCP; LAHF, ABM
    e(0x80000008, 0, false, 0x00003027, 0, 0, 0), // 39-bit physical, 48-bit linear
  ];
}

// ---- xsave (legacy 4 KiB kvm_xsave region) ----------------------------------------------------

/** FXSAVE/XSAVE legacy-area offsets (SDM vol. 1 §13.4). */
export const XSAVE = {
  FCW: 0,
  MXCSR: 24,
  MXCSR_MASK: 28,
  XSTATE_BV: 512,
  XCOMP_BV: 520,
  HEADER_RESERVED: 528,
  HEADER_END: 576,
} as const;
export const MXCSR_FEATURE_MASK = 0xffff;

export function bootXsave(xstateBv: bigint): Buffer {
  const x = Buffer.alloc(4096);
  x.writeUInt16LE(0x037f, XSAVE.FCW);
  x.writeUInt32LE(0x1f80, XSAVE.MXCSR);
  x.writeUInt32LE(MXCSR_FEATURE_MASK, XSAVE.MXCSR_MASK);
  x.writeBigUInt64LE(xstateBv, XSAVE.XSTATE_BV);
  return x;
}

/**
 * What KVM_SET_XSAVE (and so VCPU_SET_XSAVE) rejects with EINVAL: features the host does not support
 * in XSTATE_BV, a compacted-format XCOMP_BV, non-zero header reserved bytes, reserved MXCSR bits.
 */
export function xsaveRejected(region: Uint8Array, supported: bigint): string | null {
  const b = Buffer.from(region.buffer, region.byteOffset, region.length);
  if ((b.readBigUInt64LE(XSAVE.XSTATE_BV) & ~supported) !== 0n) return 'XSTATE_BV has unsupported features';
  if (b.readBigUInt64LE(XSAVE.XCOMP_BV) !== 0n) return 'XCOMP_BV is not zero';
  for (let i = XSAVE.HEADER_RESERVED; i < XSAVE.HEADER_END; i++) if (b[i] !== 0) return 'xsave header reserved bytes are not zero';
  if ((b.readUInt32LE(XSAVE.MXCSR) & ~MXCSR_FEATURE_MASK) !== 0) return 'reserved MXCSR bits set';
  return null;
}

// ---- XCR0 -------------------------------------------------------------------------------------

/** Why XSETBV with `value` faults (#GP), or null (SDM: x87 must be set, AVX needs SSE, supported bits only). */
export function xcr0Invalid(value: bigint, supported: bigint): string | null {
  if ((value & 1n) === 0n) return 'x87 state (bit 0) must be enabled';
  if ((value & 4n) !== 0n && (value & 2n) === 0n) return 'AVX (bit 2) requires SSE (bit 1)';
  if ((value & ~supported) !== 0n) return 'unsupported XCR0 bits';
  return null;
}

// ---- exceptions -------------------------------------------------------------------------------

/** Vectors that push an error code (`x86_exception_has_error_code`). */
export const VECTORS_WITH_ERROR_CODE: ReadonlySet<number> = new Set([8, 10, 11, 12, 13, 14, 17, 21, 29, 30]);
export const VECTOR = { BP: 3, UD: 6, GP: 13, PF: 14 } as const;

// ---- MTRR -------------------------------------------------------------------------------------

export const MTRR_TYPE = { UC: 0, WC: 1, WT: 4, WP: 5, WB: 6 } as const;

/** The memory type of a gpa as the guest's boot MTRRs set it: UC for the VGA window and the 3–4 GiB MMIO hole, WB elsewhere. */
export function mtrrType(gpa: bigint): number {
  if (gpa >= 0xa0000n && gpa < 0xc0000n) return MTRR_TYPE.UC;
  if (gpa >= 0xc0000000n && gpa < 0x100000000n) return MTRR_TYPE.UC;
  return MTRR_TYPE.WB;
}

// ---- the state --------------------------------------------------------------------------------

/** The values the kernel's `syscall_init` writes (besides LSTAR/CSTAR, which depend on the KASLR slide). */
export const BOOT_MSRS = {
  /** SYSRET CS/SS base 0x23, SYSCALL CS/SS base 0x10 (Linux's __USER32_CS / __KERNEL_CS). */
  STAR: 0x0023001000000000n,
  /** TF | DF | IF | IOPL | AC | NT cleared on SYSCALL. */
  SFMASK: 0x47700n,
} as const;

export interface CpuStateOptions {
  apicId: number;
  bsp: boolean;
  cr3: bigint;
  xsaveFeatures: bigint;
  rip: bigint;
  rsp: bigint;
  /** The kernel has run syscall_init and set XCR0 on this vCPU (default true); else reset values. */
  booted?: boolean;
  lstar?: bigint;
  cstar?: bigint;
  idt?: { base: bigint; limit: number };
  gdt?: { base: bigint; limit: number };
}

export class CpuState {
  regs: KvmRegs;
  sregs: KvmSregs;
  /** MSRs other than EFER/APIC_BASE (those live in `sregs`). */
  readonly msrs = new Map<number, bigint>();
  xcr0: bigint;
  xsave: Buffer;
  readonly cpuid: CpuidEntry[];

  constructor(opts: CpuStateOptions) {
    const seg = (selector: number, type: number, code: boolean): KvmSegment => ({
      base: 0n, limit: 0xffffffff, selector, type, present: 1, dpl: 0, db: code ? 0 : 1, s: 1, l: code ? 1 : 0, g: 1, avl: 0, unusable: 0,
    });
    const data = seg(0x18, 0x3, false);
    this.regs = { ...zeroRegs(), rip: opts.rip, rsp: opts.rsp, rflags: 0x2n };
    this.sregs = {
      cs: seg(0x10, 0xb, true),
      ds: data, es: { ...data }, fs: { ...data }, gs: { ...data }, ss: { ...data },
      tr: { base: 0n, limit: 0x67, selector: 0x40, type: 0xb, present: 1, dpl: 0, db: 0, s: 0, l: 0, g: 0, avl: 0, unusable: 0 },
      ldt: { base: 0n, limit: 0xffff, selector: 0, type: 0x2, present: 0, dpl: 0, db: 0, s: 0, l: 0, g: 0, avl: 0, unusable: 1 },
      gdt: { base: opts.gdt?.base ?? 0x1000n, limit: opts.gdt?.limit ?? 0x7f },
      idt: { base: opts.idt?.base ?? 0x2000n, limit: opts.idt?.limit ?? 0xfff },
      cr0: CR0_BOOT, cr2: 0n, cr3: opts.cr3, cr4: CR4_BOOT, cr8: 0n, efer: EFER_BOOT,
      apic_base: opts.bsp ? APIC_BASE_BSP : APIC_BASE_AP,
      interrupt_bitmap: [0n, 0n, 0n, 0n],
    };
    this.msrs.set(MSR.TSC, 0n);
    this.msrs.set(MSR.SPEC_CTRL, 0n);
    this.msrs.set(MSR.SYSENTER_CS, 0n);
    this.msrs.set(MSR.SYSENTER_ESP, 0n);
    this.msrs.set(MSR.SYSENTER_EIP, 0n);
    this.msrs.set(MSR.MISC_ENABLE, 0x1n);
    this.msrs.set(MSR.PAT, 0x0007040600070406n);
    this.msrs.set(MSR.MTRR_DEF_TYPE, 0xc06n);
    // What the kernel's syscall_init writes; zero (the reset value) on a vCPU that has not run it yet.
    const booted = opts.booted ?? true;
    this.msrs.set(MSR.STAR, booted ? BOOT_MSRS.STAR : 0n);
    this.msrs.set(MSR.LSTAR, booted ? (opts.lstar ?? 0xffffffff81a00000n) : 0n);
    this.msrs.set(MSR.CSTAR, booted ? (opts.cstar ?? 0xffffffff81a01000n) : 0n);
    this.msrs.set(MSR.SFMASK, booted ? BOOT_MSRS.SFMASK : 0n);
    this.msrs.set(MSR.FS_BASE, 0n);
    this.msrs.set(MSR.GS_BASE, 0n);
    this.msrs.set(MSR.KERNEL_GS_BASE, 0n);
    this.msrs.set(MSR.TSC_AUX, BigInt(opts.apicId));
    this.xcr0 = booted ? opts.xsaveFeatures & 0x7n : 1n; // XCR0 resets to x87 only
    this.xsave = bootXsave(this.xcr0);
    this.cpuid = defaultCpuid(opts.apicId, opts.xsaveFeatures);
  }

  /** `mode` as KVMI reports it: 2, 4 or 8 (16-, 32-, 64-bit code). */
  get mode(): 2 | 4 | 8 {
    if ((this.sregs.efer & EFER_LMA) !== 0n && this.sregs.cs.l === 1) return 8;
    if ((this.sregs.cr0 & CR0_PE) !== 0n && this.sregs.cs.db === 1) return 4;
    return 2;
  }

  /** What the x86 page walker and access checks need (`translateAccess`). */
  get paging(): CpuPagingState {
    return { cr0: this.sregs.cr0, cr3: this.sregs.cr3, cr4: this.sregs.cr4, efer: this.sregs.efer, rflags: this.regs.rflags, cpl: this.cpl };
  }

  /** Current privilege level: SS.DPL (as VMX reads it). */
  get cpl(): number {
    return this.sregs.ss.dpl & 3;
  }

  /** MAXPHYADDR as CPUID 0x80000008 reports it to the guest. */
  get maxPhyAddr(): number {
    return (this.findCpuid(0x80000008, 0)?.eax ?? 46) & 0xff;
  }

  get pagingEnabled(): boolean {
    return (this.sregs.cr0 & CR0_PG) !== 0n;
  }

  /** An MSR as KVM reads it (host-initiated), or undefined when KVM cannot read it. */
  readMsr(index: number): bigint | undefined {
    if (index === MSR.EFER) return this.sregs.efer;
    if (index === MSR.APIC_BASE) return this.sregs.apic_base;
    return this.msrs.get(index);
  }

  /** Store an MSR value; false (nothing stored) for an MSR this vCPU does not have. */
  writeMsr(index: number, value: bigint): boolean {
    value = BigInt.asUintN(64, value);
    if (index === MSR.EFER) this.sregs = { ...this.sregs, efer: value };
    else if (index === MSR.APIC_BASE) this.sregs = { ...this.sregs, apic_base: value };
    else if (this.msrs.has(index)) this.msrs.set(index, value);
    else return false;
    return true;
  }

  readCr(cr: 0 | 3 | 4): bigint {
    return cr === 0 ? this.sregs.cr0 : cr === 3 ? this.sregs.cr3 : this.sregs.cr4;
  }
  writeCr(cr: 0 | 3 | 4, value: bigint): void {
    value = BigInt.asUintN(64, value);
    this.sregs = cr === 0 ? { ...this.sregs, cr0: value } : cr === 3 ? { ...this.sregs, cr3: value } : { ...this.sregs, cr4: value };
  }

  /** `kvm_find_cpuid_entry`: function match, and index match for entries with a significant index. */
  findCpuid(fn: number, index: number): CpuidEntry | undefined {
    return this.cpuid.find((e) => e.function === fn && (!e.significantIndex || e.index === index));
  }

  /** The `arch` part of a vCPU event (kvmi_vcpu_event_arch), from the current state. */
  eventArch(): structs.VcpuEventArch {
    const m = (i: number): bigint => this.readMsr(i) ?? 0n;
    return {
      mode: this.mode,
      regs: { ...this.regs },
      sregs: cloneSregs(this.sregs),
      msrs: {
        sysenter_cs: m(MSR.SYSENTER_CS),
        sysenter_esp: m(MSR.SYSENTER_ESP),
        sysenter_eip: m(MSR.SYSENTER_EIP),
        efer: m(MSR.EFER),
        star: m(MSR.STAR),
        lstar: m(MSR.LSTAR),
        cstar: m(MSR.CSTAR),
        pat: m(MSR.PAT),
        shadow_gs: m(MSR.KERNEL_GS_BASE),
      },
    };
  }
}

export function zeroRegs(): KvmRegs {
  return structs.kvm_regs.zero();
}

export function cloneSregs(s: KvmSregs): KvmSregs {
  return {
    ...s,
    cs: { ...s.cs }, ds: { ...s.ds }, es: { ...s.es }, fs: { ...s.fs }, gs: { ...s.gs }, ss: { ...s.ss },
    tr: { ...s.tr }, ldt: { ...s.ldt }, gdt: { ...s.gdt }, idt: { ...s.idt },
    interrupt_bitmap: [...s.interrupt_bitmap],
  };
}
