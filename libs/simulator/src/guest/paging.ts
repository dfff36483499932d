/**
 * x86 paging: the guest's own page tables, in guest memory. `translate` walks them the way KVM's
 * `kvm_mmu_gva_to_gpa_system` does for VCPU_TRANSLATE_GVA and for the breakpoint event's `gpa`
 * (supervisor, implicit access: only presence and the page size matter); `buildPageTables` writes a
 * real 4-level hierarchy at VM creation.
 *
 * Architectural constants (Intel SDM vol. 3 §4), not KVMI structs.
 */
import type { GuestMemory } from './memory.js';

export const CR0_PE = 1n << 0n;
export const CR0_PG = 1n << 31n;
export const CR4_PSE = 1n << 4n;
export const CR4_PAE = 1n << 5n;
export const CR4_LA57 = 1n << 12n;
export const EFER_LMA = 1n << 10n;

const PTE_P = 1n;
const PTE_RW = 2n;
const PTE_PS = 1n << 7n;
const ADDR_MASK = 0x000ffffffffff000n;
const ADDR_MASK_1G = 0x000fffffc0000000n;
const ADDR_MASK_2M = 0x000fffffffe00000n;

export interface PagingRegs {
  cr0: bigint;
  cr3: bigint;
  cr4: bigint;
  efer: bigint;
}

/** Translate a linear address with the current paging mode. Null when the walk fails. */
export function translate(mem: GuestMemory, r: PagingRegs, gva: bigint): bigint | null {
  gva = BigInt.asUintN(64, gva);
  if ((r.cr0 & CR0_PG) === 0n) return gva & 0xffffffffn; // no paging: linear = physical (32-bit)
  if ((r.efer & EFER_LMA) !== 0n) return (r.cr4 & CR4_LA57) !== 0n ? walkLong(mem, r.cr3, gva, 5) : walkLong(mem, r.cr3, gva, 4);
  if ((r.cr4 & CR4_PAE) !== 0n) return walkPae(mem, r.cr3, gva & 0xffffffffn);
  return walk32(mem, r, gva & 0xffffffffn);
}

function walkLong(mem: GuestMemory, cr3: bigint, gva: bigint, levels: 4 | 5): bigint | null {
  const bits = levels === 4 ? 48n : 57n;
  const top = gva >> (bits - 1n);
  if (top !== 0n && top !== (1n << (65n - bits)) - 1n) return null; // non-canonical
  let table = cr3 & ADDR_MASK;
  for (let level: number = levels; level >= 1; level--) {
    const shift = 12n + 9n * BigInt(level - 1);
    const idx = (gva >> shift) & 0x1ffn;
    const e = mem.readU64(table + idx * 8n);
    if (e === null || (e & PTE_P) === 0n) return null;
    if (level === 3 && (e & PTE_PS) !== 0n) return (e & ADDR_MASK_1G) | (gva & 0x3fffffffn);
    if (level === 2 && (e & PTE_PS) !== 0n) return (e & ADDR_MASK_2M) | (gva & 0x1fffffn);
    if (level === 1) return (e & ADDR_MASK) | (gva & 0xfffn);
    table = e & ADDR_MASK;
  }
  return null;
}

function walkPae(mem: GuestMemory, cr3: bigint, gva: bigint): bigint | null {
  const pdpte = mem.readU64((cr3 & 0xffffffe0n) + ((gva >> 30n) & 3n) * 8n);
  if (pdpte === null || (pdpte & PTE_P) === 0n) return null;
  const pde = mem.readU64((pdpte & ADDR_MASK) + ((gva >> 21n) & 0x1ffn) * 8n);
  if (pde === null || (pde & PTE_P) === 0n) return null;
  if ((pde & PTE_PS) !== 0n) return (pde & ADDR_MASK_2M) | (gva & 0x1fffffn);
  const pte = mem.readU64((pde & ADDR_MASK) + ((gva >> 12n) & 0x1ffn) * 8n);
  if (pte === null || (pte & PTE_P) === 0n) return null;
  return (pte & ADDR_MASK) | (gva & 0xfffn);
}

function walk32(mem: GuestMemory, r: PagingRegs, gva: bigint): bigint | null {
  const pde = mem.readU32((r.cr3 & 0xfffff000n) + ((gva >> 22n) & 0x3ffn) * 4n);
  if (pde === null || (pde & 1) === 0) return null;
  const pdeB = BigInt(pde);
  if ((r.cr4 & CR4_PSE) !== 0n && (pdeB & PTE_PS) !== 0n) return (pdeB & 0xffc00000n) | (gva & 0x3fffffn);
  const pte = mem.readU32((pdeB & 0xfffff000n) + ((gva >> 12n) & 0x3ffn) * 4n);
  if (pte === null || (pte & 1) === 0) return null;
  return (BigInt(pte) & 0xfffff000n) | (gva & 0xfffn);
}

/** Where the boot page tables live and what they map. */
export interface PageTableLayout {
  /** CR3 value (the PML4's gpa). */
  cr3: bigint;
  /** Identity map [0, identityBytes): 4 KiB pages for the first 2 MiB, 2 MiB pages above. */
  identityBytes: bigint;
  /** Kernel-style higher-half map: KERNEL_BASE + x → x for x < identityBytes (2 MiB pages). */
  kernelBase: bigint;
  /** Gpas of the page-table pages (for tests). */
  tablePages: bigint[];
}

export const PAGE_TABLE_BASE = 0x70000n;
export const KERNEL_BASE = 0xffffffff80000000n;

/**
 * Write a 4-level page-table hierarchy into guest memory at PAGE_TABLE_BASE (below the VGA hole):
 * PML4, then identity PDPT/PD/PT, then the higher-half PDPT/PD. Maps min(RAM, 1 GiB).
 */
export function buildPageTables(mem: GuestMemory): PageTableLayout {
  const ram = BigInt(mem.limitGfn) << 12n;
  const identityBytes = ram < 1n << 30n ? ram : 1n << 30n;
  const pml4 = PAGE_TABLE_BASE;
  const pdptLow = pml4 + 0x1000n;
  const pdLow = pml4 + 0x2000n;
  const ptLow = pml4 + 0x3000n;
  const pdptHigh = pml4 + 0x4000n;
  const pdHigh = pml4 + 0x5000n;
  const flags = PTE_P | PTE_RW;
  const w = (at: bigint, v: bigint): void => {
    if (!mem.writeU64(at, v)) throw new Error(`page table at ${at.toString(16)} is not backed`);
  };
  w(pml4 + 0n * 8n, pdptLow | flags);
  w(pml4 + 511n * 8n, pdptHigh | flags);
  w(pdptLow, pdLow | flags);
  w(pdLow, ptLow | flags);
  for (let i = 0n; i < 512n; i++) w(ptLow + i * 8n, (i << 12n) | flags);
  for (let i = 1n; i * (1n << 21n) < identityBytes; i++) w(pdLow + i * 8n, (i << 21n) | flags | PTE_PS);
  // KERNEL_BASE: PML4 511, PDPT 510, PD 0.. → phys 0..
  w(pdptHigh + 510n * 8n, pdHigh | flags);
  for (let i = 0n; i * (1n << 21n) < identityBytes; i++) w(pdHigh + i * 8n, (i << 21n) | flags | PTE_PS);
  return { cr3: pml4, identityBytes, kernelBase: KERNEL_BASE, tablePages: [pml4, pdptLow, pdLow, ptLow, pdptHigh, pdHigh] };
}
