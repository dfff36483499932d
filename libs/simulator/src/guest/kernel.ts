/**
 * The synthetic Linux-like guest kernel: a small kernel image (text, rodata, data, IDT, GDT) loaded at
 * a seeded KASLR slide, real 4-level page tables built with `@periscope/x86`'s `PageTableBuilder`
 * (4 KiB pages with Linux's permissions for the image, 2 MiB pages elsewhere), a module area, two user
 * processes with their own page tables, and the guest OS profile derived from the same layout.
 *
 * Guest-physical layout (RAM ≥ 32 MiB):
 *
 * | gpa | what |
 * | --- | --- |
 * | 0x70000–0x8ffff | page tables (boot PML4 = CR3 0x70000, then the two processes') |
 * | 0xa0000–0xbffff | the VGA hole (no memslot) |
 * | 0x100000 | boot RIP (`KERNEL_BASE + 0x100000`), boot stacks just below 0x200000 |
 * | 0x800000–0xbfffff | module area (`MODULES_VADDR`, 2 MiB pages) |
 * | 0xc00000–0xdfffff | user pages of the processes |
 * | 0xe00000–0xffffff | per-vCPU kernel task stacks |
 * | 0x1000000 + slide | the kernel image (`_text`), slide = 2 MiB × k (seeded) |
 *
 * Virtual layout: an identity map of the first min(RAM, 1 GiB) (supervisor, RW, NX: the synthetic
 * kernel's physmap alias), the kernel map `KERNEL_BASE + x → x` (2 MiB RWX pages, except the image,
 * mapped page by page: text R-X, rodata R-- NX, data/IDT/GDT RW- NX), and the module area.
 *
 * The text is position independent: its bytes, and so the profile's per-page SHA-256, do not depend on
 * the slide. Pointers (the syscall table, IDT gates, LSTAR) are slid.
 */
import { createHash } from 'node:crypto';

import { PageTableBuilder, PAGE_SIZE_2M, PAGE_SIZE_4K, type InstructionName, type PageFlags } from '@periscope/x86';

import { SimError } from '../errors.js';
import { assemble, type AsmInsn } from './asm.js';
import type { VmMemory } from './ram.js';

export const KERNEL_BASE = 0xffffffff80000000n;
/** Where the boot page tables start (the boot CR3). */
export const PAGE_TABLE_BASE = 0x70000n;
/** LOAD_PHYSICAL_ADDR: the image's physical address without slide. */
export const PHYS_LOAD = 0x1000000n;
/** `_text` without slide. */
export const DEFAULT_TEXT = KERNEL_BASE + PHYS_LOAD;
export const KASLR_ALIGN = 0x200000n;
export const KASLR_MAX_SLOTS = 32;
export const MODULES_VADDR = 0xffffffffc0000000n;
export const MODULES_PHYS = 0x800000n;
export const MODULES_SIZE = 0x400000n;
export const USER_PHYS = 0xc00000n;
export const TASK_STACKS_PHYS = 0xe00000n;
export const TASK_STACK_SIZE = 0x4000n;
export const USER_TEXT = 0x400000n;
export const USER_DATA = 0x600000n;
/** CPUID 0x80000008 EAX[7:0] of the simulated guest. */
export const GUEST_MAXPHYADDR = 39;
export const MIN_MEMORY_MIB = 32;

const BOOT_POOL = { start: 0x70000n, end: 0x80000n };
const PROCESS_POOL_BASE = 0x80000n;
const PROCESS_POOL_PAGES = 8n;
/** Number of user processes (pid 1, 2) with their own page tables. */
export const PROCESSES = 2;

// ---- the image layout (offsets from _text) --------------------------------------------------------

export const IMAGE = {
  text: { offset: 0x0, size: 0x10000 },
  rodata: { offset: 0x10000, size: 0x4000 },
  data: { offset: 0x14000, size: 0x4000 },
  idt: { offset: 0x18000, size: 0x1000 },
  gdt: { offset: 0x19000, size: 0x1000 },
  end: 0x1a000,
} as const;

export type SectionName = '.text' | '.rodata' | '.data' | '.idt' | '.gdt';

export const SECTIONS: ReadonlyArray<{ name: SectionName; offset: number; size: number; perms: 'r-x' | 'r--' | 'rw-' }> = [
  { name: '.text', ...IMAGE.text, perms: 'r-x' },
  { name: '.rodata', ...IMAGE.rodata, perms: 'r--' },
  { name: '.data', ...IMAGE.data, perms: 'rw-' },
  { name: '.idt', ...IMAGE.idt, perms: 'rw-' },
  { name: '.gdt', ...IMAGE.gdt, perms: 'rw-' },
];

/** Syscalls the kernel implements (everything else in the table points at sys_ni_syscall). */
export const SYSCALLS: Readonly<Record<string, number>> = {
  read: 0, write: 1, open: 2, close: 3, mmap: 9, getpid: 39, kill: 62, getdents64: 217,
};
export const NR_SYSCALLS = 256;

/** The bytes at entry_SYSCALL_64 (never executed: SYSCALL is not modelled): the profile's signature. */
const ENTRY_SIGNATURE = Uint8Array.from([
  0x0f, 0x01, 0xf8, 0x65, 0x48, 0x89, 0x24, 0x25, 0x14, 0x60, 0x00, 0x00, 0x66, 0x90, 0x0f, 0x20,
  0xd8, 0x66, 0x90, 0x65, 0x48, 0x8b, 0x24, 0x25, 0x0c, 0x60, 0x00, 0x00, 0x6a, 0x2b, 0x65, 0xff,
]);

/** The two encodings text_poke switches `static_key_site` between (8 bytes each). */
export const STATIC_KEY_VARIANTS: readonly [Uint8Array, Uint8Array] = [
  Uint8Array.from([0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90]), // nop × 8 (key off)
  Uint8Array.from([0xeb, 0x06, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90]), // jmp +6 (key on)
];

/** The kernel's routines: straight-line table instructions ending in `ret`, at fixed offsets. */
const ROUTINES: ReadonlyArray<{ name: string; offset: number; code: readonly InstructionName[] }> = [
  { name: 'cpu_idle', offset: 0x100, code: ['hlt', 'jmp rel8'] },
  { name: 'native_write_cr0', offset: 0x200, code: ['mov cr0, rax', 'ret'] },
  { name: 'native_write_cr3', offset: 0x210, code: ['mov cr3, rax', 'ret'] },
  { name: 'native_write_cr4', offset: 0x220, code: ['mov cr4, rax', 'ret'] },
  { name: 'native_read_cr0', offset: 0x230, code: ['mov rax, cr0', 'ret'] },
  { name: 'native_read_cr4', offset: 0x238, code: ['mov rax, cr4', 'ret'] },
  { name: 'native_write_msr', offset: 0x240, code: ['wrmsr', 'ret'] },
  { name: 'native_read_msr', offset: 0x250, code: ['rdmsr', 'ret'] },
  { name: 'xsetbv_xcr0', offset: 0x260, code: ['xsetbv', 'ret'] },
  { name: 'load_idt', offset: 0x270, code: ['lidt [rax]', 'ret'] },
  { name: 'load_gdt', offset: 0x280, code: ['lgdt [rax]', 'ret'] },
  { name: 'store_idt', offset: 0x290, code: ['sidt [rax]', 'ret'] },
  { name: 'store_gdt', offset: 0x2a0, code: ['sgdt [rax]', 'ret'] },
  { name: 'kvm_hypercall', offset: 0x2b0, code: ['vmcall', 'ret'] },
  { name: 'kprobe_site', offset: 0x2c0, code: ['int3', 'ret'] },
  { name: 'memcpy_word', offset: 0x2d0, code: ['mov [rdi], rax', 'ret'] },
  { name: 'memcpy_byte', offset: 0x2e0, code: ['mov [rdi], al', 'ret'] },
  { name: 'memread_word', offset: 0x2f0, code: ['mov rax, [rdi]', 'ret'] },
  { name: 'text_poke', offset: 0x300, code: ['mov [rdi], rax', 'ret'] },
  { name: 'copy_from_user', offset: 0x310, code: ['stac', 'mov rax, [rdi]', 'clac', 'ret'] },
  { name: 'copy_to_user', offset: 0x320, code: ['stac', 'mov [rdi], rax', 'clac', 'ret'] },
  /**
   * `sim_copy_tagged(dst = RDI, src = RSI, tag = RDX, len = RCX)`: copies RCX bytes (`rep movsb`); the tag is
   * the caller's call id (ignored by the code). A function with SysV arguments for breakpoint tracing, whose
   * first instruction is longer than the INT3 planted over it (docs/tracing.md).
   */
  { name: 'sim_copy_tagged', offset: 0x330, code: ['rep movsb', 'ret'] },
];

/** Fixed symbol offsets (routines are added from ROUTINES, syscalls from SYSCALLS). */
const FIXED_SYMBOLS: Readonly<Record<string, { offset: number; size: number }>> = {
  _text: { offset: 0, size: 0 },
  startup_64: { offset: 0, size: 0x40 },
  static_key_site: { offset: 0x400, size: 8 },
  entry_SYSCALL_64: { offset: 0x1000, size: ENTRY_SIGNATURE.length },
  entry_SYSCALL_compat: { offset: 0x1100, size: 0x10 },
  sys_ni_syscall: { offset: 0x2000, size: 0x10 },
  asm_exc_entries: { offset: 0x3000, size: 32 * 0x20 },
  common_interrupt: { offset: 0x3400, size: 0x10 },
  _etext: { offset: IMAGE.text.size, size: 0 },
  sys_call_table: { offset: 0x10000, size: NR_SYSCALLS * 8 },
  linux_banner: { offset: 0x10800, size: 0x80 },
  sim_counters: { offset: 0x14000, size: 0x1000 },
  sim_protected_data: { offset: 0x15000, size: 0x1000 },
  desc_scratch: { offset: 0x16000, size: 0x1000 },
  sim_copy_buffer: { offset: 0x17000, size: 0x1000 },
  idt_table: { offset: IMAGE.idt.offset, size: 0x1000 },
  gdt_page: { offset: IMAGE.gdt.offset, size: 0x1000 },
  _end: { offset: IMAGE.end, size: 0 },
};

export const LINUX_BANNER = 'Linux version 6.6.0-periscope-sim (sim@periscope) #1 SMP PREEMPT_DYNAMIC\n';
export const PROTECTED_DATA_MAGIC = 'SELINUX-STATE\0\0\0';

function buildSymbols(): Map<string, { offset: number; size: number }> {
  const m = new Map<string, { offset: number; size: number }>(Object.entries(FIXED_SYMBOLS));
  for (const r of ROUTINES) m.set(r.name, { offset: r.offset, size: assemble(0n, routineCode(r.code)).bytes.length });
  for (const [name, nr] of Object.entries(SYSCALLS)) m.set(`__x64_sys_${name}`, { offset: 0x2000 + 0x10 * (nr + 1), size: 0x10 });
  return m;
}

function routineCode(code: readonly InstructionName[]): AsmInsn[] {
  // `jmp rel8` in cpu_idle jumps back to the hlt: displacement −3 (hlt 1 + jmp 2).
  return code.map((name) => (name === 'jmp rel8' ? { name, imm: -3 } : { name }));
}

/** Symbol offsets from _text (with sizes), in the profile's order. */
export const KERNEL_SYMBOLS: ReadonlyMap<string, { offset: number; size: number }> = buildSymbols();

function sym(name: string): number {
  const s = KERNEL_SYMBOLS.get(name);
  if (!s) throw new SimError('invalid-argument', `no kernel symbol ${JSON.stringify(name)}`);
  return s.offset;
}

/** The text section (slide independent). */
export function buildText(): Uint8Array {
  const t = new Uint8Array(IMAGE.text.size).fill(0xcc); // int3 padding, as Linux pads
  const put = (off: number, b: Uint8Array): void => t.set(b, off);
  put(0, assemble(0n, Array.from({ length: 15 }, () => ({ name: 'nop' as const }))).bytes);
  put(15, assemble(0n, [{ name: 'hlt' }]).bytes);
  for (const r of ROUTINES) put(r.offset, assemble(0n, routineCode(r.code)).bytes);
  put(sym('static_key_site'), STATIC_KEY_VARIANTS[0]);
  put(sym('entry_SYSCALL_64'), ENTRY_SIGNATURE);
  put(sym('entry_SYSCALL_compat'), Uint8Array.from([0x0f, 0x01, 0xf8, 0x48, 0x89, 0xe0, 0x66, 0x90, 0x0f, 0x20, 0xdf, 0x66, 0x90, 0x6a, 0x2b, 0x50]));
  // sys_ni_syscall: mov eax, -ENOSYS (as u32) ; ret. Syscall handlers: mov eax, nr ; ret.
  put(sym('sys_ni_syscall'), assemble(0n, [{ name: 'mov eax, imm32', imm: 0xffffffda }, { name: 'ret' }]).bytes);
  for (const [name, nr] of Object.entries(SYSCALLS)) {
    put(sym(`__x64_sys_${name}`), assemble(0n, [{ name: 'mov eax, imm32', imm: nr }, { name: 'ret' }]).bytes);
  }
  for (let v = 0; v < 32; v++) put(sym('asm_exc_entries') + v * 0x20, assemble(0n, [{ name: 'nop' }, { name: 'hlt' }]).bytes);
  put(sym('common_interrupt'), assemble(0n, [{ name: 'nop' }, { name: 'hlt' }]).bytes);
  return t;
}

const TEXT = buildText();

/** SHA-256 (hex) of each 4 KiB page of the text. */
export function textPageHashes(text: Uint8Array = TEXT): string[] {
  const out: string[] = [];
  for (let off = 0; off < text.length; off += 4096) out.push(createHash('sha256').update(text.subarray(off, off + 4096)).digest('hex'));
  return out;
}

// ---- one booted kernel ----------------------------------------------------------------------------

export interface UserProcess {
  pid: number;
  /** The process's CR3 (its PML4; the kernel half is shared with the boot tables). */
  cr3: bigint;
  /** User text (U/S, R-X) and data (U/S, RW-, NX) pages. */
  text: { gva: bigint; gpa: bigint };
  data: { gva: bigint; gpa: bigint };
}

export interface KernelLayout {
  /** The KASLR slide (a multiple of 2 MiB). */
  readonly slide: bigint;
  /** Virtual `_text`. */
  readonly text: bigint;
  /** Physical `_text`. */
  readonly textPhys: bigint;
  /** The boot CR3 (swapper_pg_dir). */
  readonly cr3: bigint;
  /** Mapped by the identity and kernel maps: min(RAM, 1 GiB). */
  readonly identityBytes: bigint;
  /** Page-table pages of the boot tables, in allocation order. */
  readonly tablePages: readonly bigint[];
  readonly processes: readonly UserProcess[];
  /** Virtual address of a symbol (+ offset). Throws for an unknown name. */
  symbol(name: string, offset?: number): bigint;
  /** Size of a symbol (0 for markers). */
  symbolSize(name: string): number;
  /** Physical address of a kernel-image symbol (+ offset). */
  symbolPhys(name: string, offset?: number): bigint;
  /** RSP top of vCPU `i`'s kernel task stack. */
  taskStackTop(vcpu: number): bigint;
}

/** How many 2 MiB slots the slide may take in `ramBytes` of RAM. */
export function kaslrSlots(ramBytes: bigint): number {
  const room = ramBytes - PHYS_LOAD - KASLR_ALIGN;
  if (room < 0n) return 0;
  const n = Number(room / KASLR_ALIGN) + 1;
  return Math.min(KASLR_MAX_SLOTS, n);
}

const KERNEL_FLAGS = { accessed: true, dirty: true, global: true } as const;

/**
 * Write the kernel (page tables, image) into guest RAM. `slot` picks the slide (0 ≤ slot < kaslrSlots).
 * Throws `SimError('invalid-argument')` when RAM is too small or a hole covers the kernel's layout.
 */
export function bootKernel(mem: VmMemory, slot: number): KernelLayout {
  const ramBytes = BigInt(mem.limitGfn) << 12n;
  const slots = kaslrSlots(ramBytes);
  if (slots === 0 || BigInt(mem.limitGfn) < BigInt(MIN_MEMORY_MIB) * 256n) {
    throw new SimError('invalid-argument', `the synthetic kernel needs at least ${MIN_MEMORY_MIB} MiB of RAM`);
  }
  const slide = BigInt(((slot % slots) + slots) % slots) * KASLR_ALIGN;
  const textPhys = PHYS_LOAD + slide;
  const text = KERNEL_BASE + textPhys;
  const required: Array<[bigint, bigint]> = [
    [BOOT_POOL.start, PROCESS_POOL_BASE + BigInt(PROCESSES) * PROCESS_POOL_PAGES * 0x1000n],
    [0x100000n, 0x200000n],
    [MODULES_PHYS, 0x1000000n],
    [textPhys, textPhys + BigInt(IMAGE.end)],
  ];
  for (const [s, e] of required) {
    if (!mem.isBackedRange(s, Number(e - s))) {
      throw new SimError('invalid-argument', `a memory hole covers the kernel's layout at 0x${s.toString(16)}–0x${e.toString(16)}`);
    }
  }

  // Page tables.
  // Supervisor tables (P|RW, as the boot code of earlier versions wrote them): the leaves decide.
  const b = new PageTableBuilder(mem.ram, { pool: BOOT_POOL, maxPhyAddr: GUEST_MAXPHYADDR, tableFlags: { rw: true } });
  const oneGiB = 1n << 30n;
  const identityBytes = ramBytes < oneGiB ? ramBytes : oneGiB;
  const mapped = ((identityBytes + PAGE_SIZE_2M - 1n) / PAGE_SIZE_2M) * PAGE_SIZE_2M;
  b.mapRange(0n, 0n, mapped, { rw: true, nx: true, ...KERNEL_FLAGS }, PAGE_SIZE_2M);
  const imageRegion = textPhys & ~(PAGE_SIZE_2M - 1n);
  for (let pa = 0n; pa < mapped; pa += PAGE_SIZE_2M) {
    if (pa === imageRegion) continue;
    b.map(KERNEL_BASE + pa, pa, PAGE_SIZE_2M, { rw: true, ...KERNEL_FLAGS });
  }
  for (const s of SECTIONS) {
    const flags: PageFlags =
      s.perms === 'r-x' ? { ...KERNEL_FLAGS } : s.perms === 'r--' ? { nx: true, ...KERNEL_FLAGS } : { rw: true, nx: true, ...KERNEL_FLAGS };
    b.mapRange(text + BigInt(s.offset), textPhys + BigInt(s.offset), BigInt(s.size), flags, PAGE_SIZE_4K);
  }
  b.mapRange(MODULES_VADDR, MODULES_PHYS, MODULES_SIZE, { rw: true, ...KERNEL_FLAGS }, PAGE_SIZE_2M);
  const cr3 = b.cr3;
  const tablePages = [...b.tablePages];
  const kernelHalf = mem.ram.readU64(cr3 + 511n * 8n);

  const processes: UserProcess[] = [];
  for (let i = 0; i < PROCESSES; i++) {
    const start = PROCESS_POOL_BASE + BigInt(i) * PROCESS_POOL_PAGES * 0x1000n;
    const pb = new PageTableBuilder(mem.ram, { pool: { start, end: start + PROCESS_POOL_PAGES * 0x1000n }, maxPhyAddr: GUEST_MAXPHYADDR });
    mem.ram.writeU64(pb.cr3 + 511n * 8n, kernelHalf);
    const textGpa = USER_PHYS + BigInt(i) * 0x10000n;
    const dataGpa = textGpa + 0x8000n;
    pb.map(USER_TEXT, textGpa, PAGE_SIZE_4K, { us: true, accessed: true });
    pb.map(USER_DATA, dataGpa, PAGE_SIZE_4K, { us: true, rw: true, nx: true, accessed: true, dirty: true });
    processes.push({ pid: i + 1, cr3: pb.cr3, text: { gva: USER_TEXT, gpa: textGpa }, data: { gva: USER_DATA, gpa: dataGpa } });
  }

  // The image.
  const ram = mem.ram;
  ram.write(textPhys, TEXT);
  const ro = Buffer.alloc(IMAGE.rodata.size);
  for (let nr = 0; nr < NR_SYSCALLS; nr++) ro.writeBigUInt64LE(text + BigInt(sym('sys_ni_syscall')), nr * 8);
  for (const [name, nr] of Object.entries(SYSCALLS)) ro.writeBigUInt64LE(text + BigInt(sym(`__x64_sys_${name}`)), nr * 8);
  ro.write(LINUX_BANNER, sym('linux_banner') - IMAGE.rodata.offset, 'latin1');
  ram.write(textPhys + BigInt(IMAGE.rodata.offset), ro);
  const data = Buffer.alloc(IMAGE.data.size);
  const pd = sym('sim_protected_data') - IMAGE.data.offset;
  data.write(PROTECTED_DATA_MAGIC, pd, 'latin1');
  data.writeBigUInt64LE(1n, pd + 16); // enforcing
  ram.write(textPhys + BigInt(IMAGE.data.offset), data);
  const idt = Buffer.alloc(IMAGE.idt.size);
  for (let v = 0; v < 256; v++) {
    const handler = text + BigInt(v < 32 ? sym('asm_exc_entries') + v * 0x20 : sym('common_interrupt'));
    const o = v * 16;
    idt.writeUInt16LE(Number(handler & 0xffffn), o);
    idt.writeUInt16LE(0x10, o + 2); // __KERNEL_CS
    idt.writeUInt8(0, o + 4); // IST
    idt.writeUInt8(0x8e, o + 5); // present, DPL 0, 64-bit interrupt gate
    idt.writeUInt16LE(Number((handler >> 16n) & 0xffffn), o + 6);
    idt.writeUInt32LE(Number((handler >> 32n) & 0xffffffffn), o + 8);
  }
  ram.write(textPhys + BigInt(IMAGE.idt.offset), idt);
  const gdt = Buffer.alloc(IMAGE.gdt.size);
  const gdtEntries = [0n, 0x00cf9b000000ffffn, 0x00af9b000000ffffn, 0x00cf93000000ffffn, 0x00cffb000000ffffn, 0x00cff3000000ffffn, 0x00affb000000ffffn];
  gdtEntries.forEach((e, i) => gdt.writeBigUInt64LE(e, i * 8));
  ram.write(textPhys + BigInt(IMAGE.gdt.offset), gdt);

  const layout: KernelLayout = {
    slide,
    text,
    textPhys,
    cr3,
    identityBytes,
    tablePages,
    processes,
    symbol: (name, offset = 0) => text + BigInt(sym(name)) + BigInt(offset),
    symbolSize: (name) => {
      const s = KERNEL_SYMBOLS.get(name);
      if (!s) throw new SimError('invalid-argument', `no kernel symbol ${name}`);
      return s.size;
    },
    symbolPhys: (name, offset = 0) => textPhys + BigInt(sym(name)) + BigInt(offset),
    taskStackTop: (vcpu) => KERNEL_BASE + TASK_STACKS_PHYS + BigInt((vcpu % 128) + 1) * TASK_STACK_SIZE - 0x10n,
  };
  return layout;
}
