/**
 * Architectural constants (Intel SDM Vol. 3A §2.5 control registers, §2.2.1 EFER, Vol. 1 §3.4.3
 * RFLAGS, Vol. 4 model-specific registers, Vol. 3A §4.7 page-fault error code, §6.3.1 vectors).
 *
 * Register values are 64-bit and therefore `bigint`; MSR indexes, exception vectors and #PF error
 * codes are 32-bit on the wire and therefore `number`.
 */

// ---- CR0 (SDM Vol. 3A §2.5) ----
export const CR0_PE = 1n << 0n;
export const CR0_MP = 1n << 1n;
export const CR0_EM = 1n << 2n;
export const CR0_TS = 1n << 3n;
export const CR0_ET = 1n << 4n;
export const CR0_NE = 1n << 5n;
/** Write Protect: supervisor writes honour R/W when set (§4.6.1). */
export const CR0_WP = 1n << 16n;
export const CR0_AM = 1n << 18n;
export const CR0_NW = 1n << 29n;
export const CR0_CD = 1n << 30n;
/** Paging. */
export const CR0_PG = 1n << 31n;

// ---- CR4 (SDM Vol. 3A §2.5) ----
export const CR4_VME = 1n << 0n;
export const CR4_PVI = 1n << 1n;
export const CR4_TSD = 1n << 2n;
export const CR4_DE = 1n << 3n;
export const CR4_PSE = 1n << 4n;
export const CR4_PAE = 1n << 5n;
export const CR4_MCE = 1n << 6n;
export const CR4_PGE = 1n << 7n;
export const CR4_PCE = 1n << 8n;
export const CR4_OSFXSR = 1n << 9n;
export const CR4_OSXMMEXCPT = 1n << 10n;
/** User-Mode Instruction Prevention: SGDT/SIDT/SLDT/SMSW/STR at CPL > 0 raise #GP. */
export const CR4_UMIP = 1n << 11n;
/** 5-level paging (not modelled: a walk with LA57 set is refused). */
export const CR4_LA57 = 1n << 12n;
export const CR4_VMXE = 1n << 13n;
export const CR4_SMXE = 1n << 14n;
export const CR4_FSGSBASE = 1n << 16n;
export const CR4_PCIDE = 1n << 17n;
export const CR4_OSXSAVE = 1n << 18n;
/** Supervisor-Mode Execution Prevention (bit 20). */
export const CR4_SMEP = 1n << 20n;
/** Supervisor-Mode Access Prevention (bit 21). */
export const CR4_SMAP = 1n << 21n;
/** Protection keys for user pages (not modelled). */
export const CR4_PKE = 1n << 22n;
/** Control-flow enforcement (not modelled). */
export const CR4_CET = 1n << 23n;
/** Protection keys for supervisor pages (not modelled). */
export const CR4_PKS = 1n << 24n;

// ---- IA32_EFER (SDM Vol. 3A §2.2.1, Vol. 4 MSR 0xC0000080) ----
export const EFER_SCE = 1n << 0n;
/** Long mode enable. */
export const EFER_LME = 1n << 8n;
/** Long mode active (set by the CPU when CR0.PG is set with LME = 1). */
export const EFER_LMA = 1n << 10n;
/** Execute-disable enable: bit 63 of paging entries is XD when set, reserved when clear. */
export const EFER_NXE = 1n << 11n;
export const EFER_SVME = 1n << 12n;
export const EFER_FFXSR = 1n << 14n;

// ---- RFLAGS (SDM Vol. 1 §3.4.3) ----
export const RFLAGS_CF = 1n << 0n;
/** Bit 1 always reads as 1. */
export const RFLAGS_FIXED = 1n << 1n;
export const RFLAGS_PF = 1n << 2n;
export const RFLAGS_AF = 1n << 4n;
export const RFLAGS_ZF = 1n << 6n;
export const RFLAGS_SF = 1n << 7n;
/** Trap flag (single step). */
export const RFLAGS_TF = 1n << 8n;
export const RFLAGS_IF = 1n << 9n;
export const RFLAGS_DF = 1n << 10n;
export const RFLAGS_OF = 1n << 11n;
export const RFLAGS_IOPL = 3n << 12n;
export const RFLAGS_NT = 1n << 14n;
export const RFLAGS_RF = 1n << 16n;
export const RFLAGS_VM = 1n << 17n;
/** Alignment check / SMAP override (`stac`/`clac`). */
export const RFLAGS_AC = 1n << 18n;
export const RFLAGS_VIF = 1n << 19n;
export const RFLAGS_VIP = 1n << 20n;
export const RFLAGS_ID = 1n << 21n;

// ---- MSR indexes (SDM Vol. 4, Table 2-2) ----
export const MSR = {
  IA32_TIME_STAMP_COUNTER: 0x10,
  IA32_APIC_BASE: 0x1b,
  IA32_FEATURE_CONTROL: 0x3a,
  IA32_SPEC_CTRL: 0x48,
  IA32_SYSENTER_CS: 0x174,
  IA32_SYSENTER_ESP: 0x175,
  IA32_SYSENTER_EIP: 0x176,
  IA32_MISC_ENABLE: 0x1a0,
  IA32_DEBUGCTL: 0x1d9,
  IA32_PAT: 0x277,
  IA32_U_CET: 0x6a0,
  IA32_S_CET: 0x6a2,
  IA32_EFER: 0xc0000080,
  /** SYSCALL/SYSRET segment selectors. */
  IA32_STAR: 0xc0000081,
  /** 64-bit SYSCALL entry point. */
  IA32_LSTAR: 0xc0000082,
  /** Compatibility-mode SYSCALL entry point (not used by Intel CPUs, still writable). */
  IA32_CSTAR: 0xc0000083,
  /** SYSCALL RFLAGS mask. */
  IA32_FMASK: 0xc0000084,
  IA32_FS_BASE: 0xc0000100,
  IA32_GS_BASE: 0xc0000101,
  /** Swapped with GS base by SWAPGS. */
  IA32_KERNEL_GS_BASE: 0xc0000102,
  IA32_TSC_AUX: 0xc0000103,
} as const;
export type MsrName = keyof typeof MSR;

// ---- Exception vectors (SDM Vol. 3A §6.3.1, Table 6-1) ----
export const Vector = {
  DE: 0,
  DB: 1,
  NMI: 2,
  BP: 3,
  OF: 4,
  BR: 5,
  UD: 6,
  NM: 7,
  DF: 8,
  TS: 10,
  NP: 11,
  SS: 12,
  GP: 13,
  PF: 14,
  MF: 16,
  AC: 17,
  MC: 18,
  XM: 19,
  VE: 20,
  CP: 21,
} as const;

// ---- Page-fault error code (SDM Vol. 3A §4.7, Figure 4-12) ----
/** 0: non-present page; 1: protection violation (or reserved bit, which implies a present entry). */
export const PF_P = 1 << 0;
/** 0: read (or fetch); 1: write. */
export const PF_W = 1 << 1;
/** 0: supervisor-mode access; 1: user-mode access. */
export const PF_U = 1 << 2;
/** A reserved bit was set in a paging-structure entry. */
export const PF_RSVD = 1 << 3;
/** Instruction fetch (only reported when CR4.SMEP = 1 or EFER.NXE = 1). */
export const PF_I = 1 << 4;
/** Protection-key violation (not modelled, never set). */
export const PF_PK = 1 << 5;
/** Shadow-stack access (not modelled, never set). */
export const PF_SS = 1 << 6;
/** HLAT paging (not modelled, never set). */
export const PF_HLAT = 1 << 7;
/** SGX-specific (not modelled, never set). */
export const PF_SGX = 1 << 15;

// ---- Paging-structure entry bits (SDM Vol. 3A §4.5, Tables 4-15 .. 4-20) ----
export const PTE_P = 1n << 0n;
export const PTE_RW = 1n << 1n;
export const PTE_US = 1n << 2n;
export const PTE_PWT = 1n << 3n;
export const PTE_PCD = 1n << 4n;
/** Accessed. */
export const PTE_A = 1n << 5n;
/** Dirty (leaf entries only). */
export const PTE_D = 1n << 6n;
/** Page size: 1 in a PDPTE maps 1 GiB, in a PDE 2 MiB; reserved in a PML4E; PAT in a PTE. */
export const PTE_PS = 1n << 7n;
/** Global (leaf entries only). */
export const PTE_G = 1n << 8n;
/** PAT bit of a 2 MiB / 1 GiB leaf (bit 12); in a 4 KiB PTE the PAT bit is bit 7. */
export const PTE_PAT_LARGE = 1n << 12n;
/** Execute-disable (XD/NX), bit 63; reserved when EFER.NXE = 0. */
export const PTE_NX = 1n << 63n;

export const PAGE_SHIFT = 12n;
export const PAGE_SIZE_4K = 0x1000n;
export const PAGE_SIZE_2M = 0x20_0000n;
export const PAGE_SIZE_1G = 0x4000_0000n;
/** 4096 as a `number`, for byte-buffer arithmetic. */
export const PAGE_BYTES = 4096;

/** All ones: what KVMI_VCPU_TRANSLATE_GVA returns when a translation fails. */
export const INVALID_GPA = 0xffff_ffff_ffff_ffffn;

/** MAXPHYADDR assumed when a caller does not say (a common server value; 52 is the architectural max). */
export const DEFAULT_MAXPHYADDR = 46;

/** Mask of 64 bits, for wrapping bigint arithmetic. */
export const U64_MASK = 0xffff_ffff_ffff_ffffn;
