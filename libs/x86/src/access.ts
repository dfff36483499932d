/**
 * Access rights and page-fault error codes, as the CPU applies them in 4-level paging
 * (Intel SDM Vol. 3A §4.6 "Access Rights", §4.6.1 "Determination of Access Rights", §4.7
 * "Page-Fault Exceptions").
 *
 * An access is a *user-mode access* when CPL = 3 and it is not an implicit supervisor-mode access
 * (e.g. a GDT/IDT/TSS reference); every other access is a *supervisor-mode access*. An address is a
 * *user-mode address* when U/S = 1 in every paging-structure entry of its translation.
 *
 * | access | target | allowed when |
 * | --- | --- | --- |
 * | user read | user address | always (supervisor address: fault) |
 * | user write | user address | R/W = 1 (effective) |
 * | user fetch | user address | EFER.NXE = 0 or XD = 0 (effective) |
 * | supervisor read | supervisor address | always |
 * | supervisor read | user address | CR4.SMAP = 0, or (explicit and RFLAGS.AC = 1) |
 * | supervisor write | any address | the SMAP rule above for user addresses, and (CR0.WP = 0 or R/W = 1) |
 * | supervisor fetch | user address | CR4.SMEP = 0, and the XD rule |
 * | supervisor fetch | supervisor address | EFER.NXE = 0 or XD = 0 |
 *
 * Protection keys, CET shadow stacks and HLAT are not modelled.
 */
import {
  CR0_PG,
  CR0_WP,
  CR4_LA57,
  CR4_PAE,
  CR4_SMAP,
  CR4_SMEP,
  EFER_LME,
  EFER_NXE,
  PF_I,
  PF_P,
  PF_RSVD,
  PF_U,
  PF_W,
  RFLAGS_AC,
  Vector,
} from './constants.js';
import { X86Error } from './errors.js';
import { walk, type EffectiveFlags, type PageSize, type PagingLevel, type WalkResult } from './paging.js';
import type { GuestRam } from './ram.js';

export type AccessKind = 'read' | 'write' | 'execute';

export const ACCESS_KINDS: readonly AccessKind[] = ['read', 'write', 'execute'];

/** The CPU state that decides an access (besides the paging structures). */
export interface AccessContext {
  readonly access: AccessKind;
  /** Current privilege level 0..3; 0–2 are supervisor, 3 is user. */
  readonly cpl: number;
  readonly cr0: bigint;
  readonly cr4: bigint;
  readonly efer: bigint;
  /** RFLAGS.AC (the SMAP override for explicit supervisor data accesses). Default false. */
  readonly rflagsAC?: boolean;
  /**
   * An implicit supervisor-mode access (descriptor tables, TSS, …): supervisor even at CPL 3, and
   * SMAP applies regardless of RFLAGS.AC. Not meaningful for instruction fetches. Default false.
   */
  readonly implicitSupervisor?: boolean;
}

export interface CheckAccessInput extends AccessContext {
  readonly walk: WalkResult;
}

/** Why an access faulted (diagnostic only; the error code is what the guest sees). */
export type FaultReason =
  | 'not-present'
  | 'reserved'
  | 'unbacked'
  | 'user-supervisor'
  | 'write-protect'
  | 'smep'
  | 'smap'
  | 'nx'
  | 'non-canonical';

export interface AccessOk {
  readonly ok: true;
  readonly gva: bigint;
  readonly gpa: bigint;
  readonly pageSize: PageSize;
  readonly flags: EffectiveFlags;
}

export interface PageFault {
  readonly ok: false;
  readonly exception: 'PF';
  readonly vector: typeof Vector.PF;
  /** The architectural error code pushed on the stack (§4.7): P, W/R, U/S, RSVD, I/D. */
  readonly errorCode: number;
  readonly reason: Exclude<FaultReason, 'non-canonical'>;
  /** The faulting linear address (what the CPU loads into CR2). */
  readonly gva: bigint;
  /** Paging level of the faulting entry for walk faults (4 = PML4E … 1 = PTE); undefined for rights. */
  readonly level?: PagingLevel;
}

export interface GeneralProtection {
  readonly ok: false;
  readonly exception: 'GP';
  readonly vector: typeof Vector.GP;
  readonly errorCode: 0;
  readonly reason: 'non-canonical';
  readonly gva: bigint;
}

export type AccessFault = PageFault | GeneralProtection;
export type AccessResult = AccessOk | AccessFault;

/** The paging mode of a CPU state; only `4-level` is modelled. */
export function pagingMode(cr0: bigint, cr4: bigint, efer: bigint): 'none' | '32-bit' | 'pae' | '4-level' | '5-level' {
  if ((cr0 & CR0_PG) === 0n) return 'none';
  if ((cr4 & CR4_PAE) === 0n) return '32-bit';
  if ((efer & EFER_LME) === 0n) return 'pae';
  return (cr4 & CR4_LA57) !== 0n ? '5-level' : '4-level';
}

function requireFourLevel(cr0: bigint, cr4: bigint, efer: bigint): void {
  const mode = pagingMode(cr0, cr4, efer);
  if (mode !== '4-level') {
    throw new X86Error('unsupported-mode', `paging mode is ${mode}; only 4-level paging is modelled`);
  }
}

/**
 * Decide an access after a walk: ok, #PF with the architectural error code, or #GP(0) for a
 * non-canonical address. The walk must have run with the same EFER.NXE (`walk(..., { efer })`).
 */
export function checkAccess(input: CheckAccessInput): AccessResult {
  const { walk: w, access, cpl, cr0, cr4, efer } = input;
  requireFourLevel(cr0, cr4, efer);
  if (!Number.isInteger(cpl) || cpl < 0 || cpl > 3) {
    throw new X86Error('invalid-argument', `CPL ${cpl} is not 0..3`);
  }
  if (access !== 'read' && access !== 'write' && access !== 'execute') {
    throw new X86Error('invalid-argument', `unknown access kind ${String(access)}`);
  }
  const implicit = input.implicitSupervisor === true;
  if (implicit && access === 'execute') {
    throw new X86Error('invalid-argument', 'an instruction fetch is never an implicit supervisor-mode access');
  }
  const nxe = (efer & EFER_NXE) !== 0n;
  if (w.nxe !== nxe) {
    throw new X86Error('invalid-argument', 'the walk ran with a different EFER.NXE than this access check');
  }

  if (!w.ok && w.reason === 'non-canonical') {
    return { ok: false, exception: 'GP', vector: Vector.GP, errorCode: 0, reason: 'non-canonical', gva: w.gva };
  }

  const smep = (cr4 & CR4_SMEP) !== 0n;
  const user = cpl === 3 && !implicit;
  const fetch = access === 'execute';
  let code = 0;
  if (access === 'write') code |= PF_W;
  if (user) code |= PF_U;
  // §4.7: I/D is reported for fetches only when SMEP = 1 or (PAE = 1 and NXE = 1); PAE is 1 here.
  if (fetch && (smep || nxe)) code |= PF_I;

  if (!w.ok) {
    const level = w.level as PagingLevel;
    switch (w.reason) {
      case 'reserved':
        // Reserved bits are only checked in present entries, so RSVD always comes with P.
        return pf(code | PF_P | PF_RSVD, 'reserved', w.gva, level);
      case 'not-present':
      case 'unbacked':
        return pf(code, w.reason, w.gva, level);
      case 'non-canonical':
        break; // handled above
    }
    throw new X86Error('invalid-argument', `unexpected walk fault ${w.reason}`);
  }

  const { rw, us, nx } = w.flags;
  let reason: PageFault['reason'] | undefined;
  if (user) {
    if (!us) reason = 'user-supervisor';
    else if (access === 'write' && !rw) reason = 'write-protect';
    else if (fetch && nxe && nx) reason = 'nx';
  } else if (fetch) {
    if (us && smep) reason = 'smep';
    else if (nxe && nx) reason = 'nx';
  } else {
    const smap = (cr4 & CR4_SMAP) !== 0n;
    const ac = input.rflagsAC === true;
    if (us && smap && (implicit || !ac)) reason = 'smap';
    else if (access === 'write' && !rw && (cr0 & CR0_WP) !== 0n) reason = 'write-protect';
  }
  if (reason) return pf(code | PF_P, reason, w.gva, undefined);
  return { ok: true, gva: w.gva, gpa: w.gpa, pageSize: w.pageSize, flags: w.flags };
}

function pf(errorCode: number, reason: PageFault['reason'], gva: bigint, level: PagingLevel | undefined): PageFault {
  return level === undefined
    ? { ok: false, exception: 'PF', vector: Vector.PF, errorCode, reason, gva }
    : { ok: false, exception: 'PF', vector: Vector.PF, errorCode, reason, gva, level };
}

/** The CPU registers that matter to a linear-address access. */
export interface CpuPagingState {
  readonly cr0: bigint;
  readonly cr3: bigint;
  readonly cr4: bigint;
  readonly efer: bigint;
  /** RFLAGS (AC is bit 18). */
  readonly rflags: bigint;
  readonly cpl: number;
}

export interface TranslateAccessOptions {
  readonly implicitSupervisor?: boolean;
  readonly maxPhyAddr?: number;
}

/** Walk + check in one step: what the CPU does for one access to one linear address. */
export function translateAccess(
  ram: GuestRam,
  cpu: CpuPagingState,
  gva: bigint,
  access: AccessKind,
  opts: TranslateAccessOptions = {},
): AccessResult {
  requireFourLevel(cpu.cr0, cpu.cr4, cpu.efer);
  const w = walk(ram, cpu.cr3, gva, opts.maxPhyAddr === undefined ? { efer: cpu.efer } : { efer: cpu.efer, maxPhyAddr: opts.maxPhyAddr });
  return checkAccess({
    walk: w,
    access,
    cpl: cpu.cpl,
    cr0: cpu.cr0,
    cr4: cpu.cr4,
    efer: cpu.efer,
    rflagsAC: (cpu.rflags & RFLAGS_AC) !== 0n,
    implicitSupervisor: opts.implicitSupervisor === true,
  });
}

/** One page-sized piece of a linear range. */
export interface AccessPiece {
  readonly gva: bigint;
  readonly gpa: bigint;
  readonly length: number;
}

/**
 * An access of `length` bytes at `gva` that may cross pages: each 4 KiB piece is translated and
 * checked in ascending address order; the first fault wins (which page of a split access the CPU
 * faults on first is not architecturally specified; we report the lowest).
 */
export function translateAccessRange(
  ram: GuestRam,
  cpu: CpuPagingState,
  gva: bigint,
  length: number,
  access: AccessKind,
  opts: TranslateAccessOptions = {},
): { readonly ok: true; readonly pieces: readonly AccessPiece[] } | AccessFault {
  if (!Number.isSafeInteger(length) || length <= 0) {
    throw new X86Error('invalid-argument', `access length ${length} must be a positive integer`);
  }
  const pieces: AccessPiece[] = [];
  let at = gva;
  let left = length;
  while (left > 0) {
    const r = translateAccess(ram, cpu, at, access, opts);
    if (!r.ok) return r;
    const inPage = 4096 - Number(at & 0xfffn);
    const n = Math.min(inPage, left);
    pieces.push({ gva: at, gpa: r.gpa, length: n });
    left -= n;
    at = (at + BigInt(n)) & 0xffff_ffff_ffff_ffffn;
  }
  return { ok: true, pieces };
}
