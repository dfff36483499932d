/**
 * 4-level paging (Intel SDM Vol. 3A §4.5): CR0.PG = 1, CR4.PAE = 1, EFER.LME = 1, CR4.LA57 = 0.
 *
 * - `walk` translates a linear address exactly as the page walker does: PML4E → PDPTE → PDE → PTE,
 *   stopping at the first non-present entry (§4.5.4) or the first entry with a reserved bit set
 *   (§4.5.4 and the entry-format tables of §4.5, Tables 4-15 … 4-20 in current editions), and
 *   accumulating the access rights of §4.6.1 (R/W and U/S are ANDed over all levels, XD is ORed).
 * - `PageTableBuilder` writes real paging structures into guest RAM from a pool of guest-physical
 *   pages, so that the walk over them is the CPU's walk, not a lookup in a side table.
 *
 * Permission checks (R/W, U/S, SMEP, SMAP, XD) are in `access.ts`; `walk` only answers "is there a
 * translation and what are its effective rights".
 */
import {
  DEFAULT_MAXPHYADDR,
  EFER_LMA,
  EFER_LME,
  EFER_NXE,
  INVALID_GPA,
  PAGE_SHIFT,
  PAGE_SIZE_1G,
  PAGE_SIZE_2M,
  PAGE_SIZE_4K,
  PTE_A,
  PTE_D,
  PTE_G,
  PTE_NX,
  PTE_P,
  PTE_PCD,
  PTE_PS,
  PTE_PWT,
  PTE_RW,
  PTE_US,
} from './constants.js';
import { X86Error } from './errors.js';
import type { GuestRam } from './ram.js';

/** 4 KiB, 2 MiB or 1 GiB. */
export type PageSize = 0x1000n | 0x20_0000n | 0x4000_0000n;
/** 4 = PML4E, 3 = PDPTE, 2 = PDE, 1 = PTE. */
export type PagingLevel = 1 | 2 | 3 | 4;

export const PAGE_SIZES: readonly PageSize[] = [PAGE_SIZE_4K, PAGE_SIZE_2M, PAGE_SIZE_1G];

/** The level whose entry maps a page of that size (PTE, PDE with PS = 1, PDPTE with PS = 1). */
export function leafLevelOf(size: PageSize): PagingLevel {
  return size === PAGE_SIZE_4K ? 1 : size === PAGE_SIZE_2M ? 2 : 3;
}

export function pageSizeOfLevel(level: 1 | 2 | 3): PageSize {
  return level === 1 ? PAGE_SIZE_4K : level === 2 ? PAGE_SIZE_2M : PAGE_SIZE_1G;
}

/** Guest frame number of a GPA. */
export function gfnOf(gpa: bigint): bigint {
  return gpa >> PAGE_SHIFT;
}

/**
 * Canonical 48-bit linear address (SDM Vol. 1 §3.3.7.1): bits 63:47 all equal. Non-canonical accesses raise
 * #GP(0) (or #SS(0) for stack references) before any page walk.
 */
export function isCanonical(gva: bigint): boolean {
  if (gva < 0n || gva > 0xffff_ffff_ffff_ffffn) return false;
  const top = gva >> 47n;
  return top === 0n || top === 0x1_ffffn;
}

/** Sign-extend bit 47, e.g. `canonical(0xffff_8000_0000_0000n & ((1n << 48n) - 1n))`. */
export function canonical(gva48: bigint): bigint {
  const low = gva48 & ((1n << 48n) - 1n);
  return low & (1n << 47n) ? low | 0xffff_0000_0000_0000n : low;
}

/** The paging mode a walk runs in. */
export interface PagingOptions {
  /** IA32_EFER; only NXE matters to the walk (XD is reserved when NXE = 0). Default LME|LMA|NXE. */
  readonly efer?: bigint;
  /** Physical-address width; bits 51:MAXPHYADDR of every present entry are reserved. Default 46. */
  readonly maxPhyAddr?: number;
}

export const DEFAULT_EFER = EFER_LME | EFER_LMA | EFER_NXE;

/** One paging-structure entry read by a walk. */
export interface WalkEntry {
  readonly level: PagingLevel;
  /** Guest-physical address of the entry itself. */
  readonly gpa: bigint;
  /** The 64-bit entry as read. */
  readonly value: bigint;
}

/** Access rights accumulated over the walk (§4.6.1). */
export interface EffectiveFlags {
  /** Writable: R/W = 1 in every entry. */
  readonly rw: boolean;
  /** User-mode address: U/S = 1 in every entry. */
  readonly us: boolean;
  /** Execute-disable: XD = 1 in any entry (always false when EFER.NXE = 0, where XD faults as reserved). */
  readonly nx: boolean;
}

export interface WalkOk {
  readonly ok: true;
  readonly gva: bigint;
  readonly gpa: bigint;
  readonly pageSize: PageSize;
  /** Level of the leaf entry (1 for 4 KiB, 2 for 2 MiB, 3 for 1 GiB). */
  readonly level: PagingLevel;
  readonly flags: EffectiveFlags;
  /** The leaf entry (for A/D/G/PAT/PCD/PWT). */
  readonly leaf: bigint;
  readonly entries: readonly WalkEntry[];
  /** EFER.NXE the walk ran with. */
  readonly nxe: boolean;
}

/**
 * - `not-present`: P = 0 in the entry at `level`;
 * - `reserved`: a reserved bit is set in the (present) entry at `level`;
 * - `non-canonical`: the address is not canonical (level 0; the CPU raises #GP, not #PF);
 * - `unbacked`: the entry at `level` lies in guest-physical memory without backing (a simulator
 *   condition; KVM's walker turns it into a #PF, and so does `checkAccess`, with P = 0).
 */
export type WalkFaultReason = 'not-present' | 'reserved' | 'non-canonical' | 'unbacked';

export interface WalkFault {
  readonly ok: false;
  readonly gva: bigint;
  readonly level: PagingLevel | 0;
  readonly reason: WalkFaultReason;
  readonly entries: readonly WalkEntry[];
  readonly nxe: boolean;
}

export type WalkResult = WalkOk | WalkFault;

interface Masks {
  /** Bits MAXPHYADDR-1:12. */
  readonly addr: bigint;
  /** Bits 51:MAXPHYADDR. */
  readonly high: bigint;
  readonly maxPhyAddr: number;
}

const maskCache = new Map<number, Masks>();

function masksFor(maxPhyAddr: number | undefined): Masks {
  const m = maxPhyAddr ?? DEFAULT_MAXPHYADDR;
  let masks = maskCache.get(m);
  if (masks) return masks;
  if (!Number.isInteger(m) || m < 32 || m > 52) {
    throw new X86Error('invalid-argument', `MAXPHYADDR ${m} must be an integer in [32, 52]`);
  }
  const below = (1n << BigInt(m)) - 1n;
  masks = { addr: below & ~0xfffn, high: ((1n << 52n) - 1n) & ~below, maxPhyAddr: m };
  maskCache.set(m, masks);
  return masks;
}

/** Bits 29:13: reserved in a PDPTE that maps a 1 GiB page (bit 12 is PAT). */
const RSVD_1G = ((1n << 30n) - 1n) & ~((1n << 13n) - 1n);
/** Bits 20:13: reserved in a PDE that maps a 2 MiB page (bit 12 is PAT). */
const RSVD_2M = ((1n << 21n) - 1n) & ~((1n << 13n) - 1n);

/** Translate `gva` with the paging structures rooted at `cr3` (bits MAXPHYADDR-1:12). */
export function walk(ram: GuestRam, cr3: bigint, gva: bigint, opts: PagingOptions = {}): WalkResult {
  const nxe = ((opts.efer ?? DEFAULT_EFER) & EFER_NXE) !== 0n;
  const masks = masksFor(opts.maxPhyAddr);
  const entries: WalkEntry[] = [];
  if (!isCanonical(gva)) return { ok: false, gva, level: 0, reason: 'non-canonical', entries, nxe };

  let table = cr3 & masks.addr;
  let rw = true;
  let us = true;
  let nx = false;
  for (let level = 4 as PagingLevel; ; level = (level - 1) as PagingLevel) {
    const shift = 12n + 9n * BigInt(level - 1);
    const entryGpa = table + ((gva >> shift) & 0x1ffn) * 8n;
    if (!ram.isBackedRange(entryGpa, 8)) return { ok: false, gva, level, reason: 'unbacked', entries, nxe };
    const value = ram.readU64(entryGpa);
    entries.push({ level, gpa: entryGpa, value });
    if ((value & PTE_P) === 0n) return { ok: false, gva, level, reason: 'not-present', entries, nxe };

    const large = level !== 1 && (value & PTE_PS) !== 0n;
    let reserved = value & masks.high;
    if (!nxe) reserved |= value & PTE_NX;
    if (level === 4 && large) reserved |= PTE_PS; // PS is reserved in a PML4E
    if (level === 3 && large) reserved |= value & RSVD_1G;
    if (level === 2 && large) reserved |= value & RSVD_2M;
    if (reserved !== 0n) return { ok: false, gva, level, reason: 'reserved', entries, nxe };

    rw &&= (value & PTE_RW) !== 0n;
    us &&= (value & PTE_US) !== 0n;
    nx ||= (value & PTE_NX) !== 0n;

    if (level === 1 || (large && level <= 3)) {
      const pageSize = pageSizeOfLevel(level as 1 | 2 | 3);
      const offsetMask = pageSize - 1n;
      const gpa = (value & masks.addr & ~offsetMask) | (gva & offsetMask);
      return { ok: true, gva, gpa, pageSize, level, flags: { rw, us, nx }, leaf: value, entries, nxe };
    }
    table = value & masks.addr;
  }
}

/**
 * GVA → GPA for KVMI_VCPU_TRANSLATE_GVA: the walk only (presence and reserved bits, no permission
 * checks); all ones (`INVALID_GPA`) when there is no translation.
 */
export function translate(ram: GuestRam, cr3: bigint, gva: bigint, opts: PagingOptions = {}): bigint {
  const r = walk(ram, cr3, gva, opts);
  return r.ok ? r.gpa : INVALID_GPA;
}

/**
 * What the CPU writes back after a successful, permitted access (§4.8): A = 1 in every entry used,
 * and D = 1 in the leaf for a write. Entries already carrying the bits are not rewritten.
 */
export function setAccessedDirty(ram: GuestRam, result: WalkOk, write: boolean): void {
  for (const e of result.entries) {
    let v = e.value | PTE_A;
    if (write && e.level === result.level) v |= PTE_D;
    if (v !== e.value) ram.writeU64(e.gpa, v);
  }
}

// ---------------------------------------------------------------------------------------------
// Building page tables

/** Flags of a paging-structure entry. P is always set by the builder. */
export interface PageFlags {
  /** R/W (default false: read-only). */
  readonly rw?: boolean;
  /** U/S (default false: supervisor). */
  readonly us?: boolean;
  /** XD, bit 63 (default false). */
  readonly nx?: boolean;
  /** Accessed (default false). */
  readonly accessed?: boolean;
  /** Dirty, leaf only (default false). */
  readonly dirty?: boolean;
  /** Global, leaf only (default false). */
  readonly global?: boolean;
  readonly pwt?: boolean;
  readonly pcd?: boolean;
}

/** Encode flags into entry bits (P included). */
export function encodeFlags(flags: PageFlags): bigint {
  let v = PTE_P;
  if (flags.rw) v |= PTE_RW;
  if (flags.us) v |= PTE_US;
  if (flags.nx) v |= PTE_NX;
  if (flags.accessed) v |= PTE_A;
  if (flags.dirty) v |= PTE_D;
  if (flags.global) v |= PTE_G;
  if (flags.pwt) v |= PTE_PWT;
  if (flags.pcd) v |= PTE_PCD;
  return v;
}

export interface PageTableBuilderOptions {
  /** Guest-physical pages the builder may use for paging structures: `[start, end)`, 4 KiB aligned. */
  readonly pool: { readonly start: bigint; readonly end: bigint };
  /** Default 46; leaf and table addresses must be below 2^MAXPHYADDR. */
  readonly maxPhyAddr?: number;
  /**
   * Flags of the non-leaf entries the builder creates (default `{ rw: true, us: true }`, as Linux
   * does: the leaf decides). Existing non-leaf entries are never changed.
   */
  readonly tableFlags?: PageFlags;
  /** Use an existing PML4 (CR3 value) instead of allocating a new one from the pool. */
  readonly cr3?: bigint;
}

/**
 * Writes 4-level paging structures into guest RAM. The PML4 is allocated (and zeroed) on
 * construction; `cr3` is its address. Tables are allocated from the pool in order and zeroed.
 */
export class PageTableBuilder {
  readonly ram: GuestRam;
  readonly cr3: bigint;
  private readonly masks: Masks;
  private readonly tableBits: bigint;
  private readonly poolEnd: bigint;
  private next: bigint;
  private readonly allocated: bigint[] = [];

  constructor(ram: GuestRam, opts: PageTableBuilderOptions) {
    this.ram = ram;
    this.masks = masksFor(opts.maxPhyAddr);
    const { start, end } = opts.pool;
    if (start < 0n || end < start || start & 0xfffn || end & 0xfffn) {
      throw new X86Error('invalid-argument', `page-table pool [0x${start.toString(16)}, 0x${end.toString(16)}) must be 4 KiB aligned`);
    }
    if (end > 1n << BigInt(this.masks.maxPhyAddr)) {
      throw new X86Error('invalid-argument', 'page-table pool lies above MAXPHYADDR');
    }
    this.next = start;
    this.poolEnd = end;
    this.tableBits = encodeFlags(opts.tableFlags ?? { rw: true, us: true }) & ~(PTE_D | PTE_G);
    if (opts.cr3 !== undefined) {
      this.cr3 = opts.cr3 & this.masks.addr;
    } else {
      this.cr3 = this.allocTable();
    }
  }

  /** Pages taken from the pool so far, in allocation order (the PML4 first unless `cr3` was given). */
  get tablePages(): readonly bigint[] {
    return this.allocated;
  }

  /** Pool pages left. */
  get pagesFree(): number {
    return Number((this.poolEnd - this.next) >> PAGE_SHIFT);
  }

  /**
   * Map one page: `gva` → `gpa`, both aligned to `size`. Replaces an existing leaf of the same size;
   * a collision with a leaf of another size (or a table where a large leaf should go) is a
   * `mapping-conflict`.
   */
  map(gva: bigint, gpa: bigint, size: PageSize = PAGE_SIZE_4K, flags: PageFlags = {}): void {
    this.validate(gva, gpa, size);
    const leafLevel = leafLevelOf(size);
    let table = this.cr3;
    for (let level = 4 as PagingLevel; level > leafLevel; level = (level - 1) as PagingLevel) {
      const entryGpa = entryAddress(table, gva, level);
      const value = this.ram.readU64(entryGpa);
      if ((value & PTE_P) === 0n) {
        const page = this.allocTable();
        this.ram.writeU64(entryGpa, page | this.tableBits);
        table = page;
      } else if (level !== 4 && (value & PTE_PS) !== 0n) {
        throw new X86Error('mapping-conflict', `GVA 0x${gva.toString(16)} lies in a ${level === 3 ? '1 GiB' : '2 MiB'} page already mapped`);
      } else {
        table = value & this.masks.addr;
      }
    }
    const entryGpa = entryAddress(table, gva, leafLevel);
    const old = this.ram.readU64(entryGpa);
    if (leafLevel !== 1 && (old & PTE_P) !== 0n && (old & PTE_PS) === 0n) {
      throw new X86Error('mapping-conflict', `GVA 0x${gva.toString(16)}: a page table already covers this ${size === PAGE_SIZE_2M ? '2 MiB' : '1 GiB'} range`);
    }
    this.ram.writeU64(entryGpa, gpa | encodeFlags(flags) | (leafLevel === 1 ? 0n : PTE_PS));
  }

  /** Map `length` bytes (a multiple of `size`) of consecutive pages. */
  mapRange(gva: bigint, gpa: bigint, length: bigint, flags: PageFlags = {}, size: PageSize = PAGE_SIZE_4K): void {
    if (length < 0n || length % size !== 0n) {
      throw new X86Error('invalid-argument', `length 0x${length.toString(16)} is not a multiple of the page size`);
    }
    for (let off = 0n; off < length; off += size) this.map(gva + off, gpa + off, size, flags);
  }

  /** Clear the leaf entry that maps `gva` (tables are kept). Returns false when nothing was mapped. */
  unmap(gva: bigint): boolean {
    const leaf = this.findLeaf(gva);
    if (!leaf) return false;
    this.ram.writeU64(leaf.gpa, 0n);
    return true;
  }

  /** Rewrite the flags of the leaf mapping `gva`, keeping its address and size. False when unmapped. */
  protect(gva: bigint, flags: PageFlags): boolean {
    const leaf = this.findLeaf(gva);
    if (!leaf) return false;
    const size = pageSizeOfLevel(leaf.level as 1 | 2 | 3);
    const addr = leaf.value & this.masks.addr & ~(size - 1n);
    this.ram.writeU64(leaf.gpa, addr | encodeFlags(flags) | (leaf.level === 1 ? 0n : PTE_PS));
    return true;
  }

  /**
   * Guest-physical address of the entry at `level` on the path of `gva`, or undefined when a
   * higher-level entry is not present or is a large leaf.
   */
  entryGpa(gva: bigint, level: PagingLevel): bigint | undefined {
    let table = this.cr3;
    for (let l = 4 as PagingLevel; ; l = (l - 1) as PagingLevel) {
      const e = entryAddress(table, gva, l);
      if (l === level) return e;
      const v = this.ram.readU64(e);
      if ((v & PTE_P) === 0n || (l !== 4 && (v & PTE_PS) !== 0n)) return undefined;
      table = v & this.masks.addr;
    }
  }

  private findLeaf(gva: bigint): WalkEntry | undefined {
    if (!isCanonical(gva)) return undefined;
    let table = this.cr3;
    for (let level = 4 as PagingLevel; ; level = (level - 1) as PagingLevel) {
      const e = entryAddress(table, gva, level);
      const v = this.ram.readU64(e);
      if ((v & PTE_P) === 0n) return undefined;
      if (level === 1 || (level !== 4 && (v & PTE_PS) !== 0n)) return { level, gpa: e, value: v };
      table = v & this.masks.addr;
    }
  }

  private validate(gva: bigint, gpa: bigint, size: PageSize): void {
    if (!PAGE_SIZES.includes(size)) {
      throw new X86Error('invalid-argument', `page size 0x${String(size)} is not 4 KiB, 2 MiB or 1 GiB`);
    }
    if (!isCanonical(gva)) throw new X86Error('invalid-argument', `GVA 0x${gva.toString(16)} is not canonical`);
    if (gva % size !== 0n || gpa < 0n || gpa % size !== 0n) {
      throw new X86Error('invalid-argument', `GVA 0x${gva.toString(16)} / GPA 0x${gpa.toString(16)} not aligned to 0x${size.toString(16)}`);
    }
    if (gpa + size > 1n << BigInt(this.masks.maxPhyAddr)) {
      throw new X86Error('invalid-argument', `GPA 0x${gpa.toString(16)} lies above MAXPHYADDR`);
    }
  }

  private allocTable(): bigint {
    if (this.next >= this.poolEnd) {
      throw new X86Error('pool-exhausted', `page-table pool exhausted after ${this.allocated.length} pages`);
    }
    const page = this.next;
    this.ram.zero(page, 4096);
    this.next += PAGE_SIZE_4K;
    this.allocated.push(page);
    return page;
  }
}

function entryAddress(table: bigint, gva: bigint, level: PagingLevel): bigint {
  return table + ((gva >> (12n + 9n * BigInt(level - 1))) & 0x1ffn) * 8n;
}
