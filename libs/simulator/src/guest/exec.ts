/**
 * The guest CPU executing table instructions (`@periscope/x86` `INSTRUCTIONS`): fetch at RIP through
 * the guest's page tables (NX/SMEP and the EPT X bit), identify the instruction by table lookup
 * (`matchInstruction`: the length is the table's ground truth, nothing is decoded), then run its
 * `effect` — data accesses walk the page tables (`walk` + `checkAccess`: CR0.WP, SMEP, SMAP/AC, NX,
 * with architectural #PF error codes, and A/D bits as the CPU sets them), then meet the EPT restrictions
 * (one PF event per violated bit, in the order R, W, X), and only then touch guest RAM.
 *
 * The KVMI side (whether an exit raises an event, and what the reply means) is the `ExecEnv` the vCPU
 * provides; this module is only the CPU.
 *
 * RIP: an instruction that retires moves RIP past itself (register RIP + the table length — a tool's
 * SET_REGISTERS during an exit is honoured, as KVM's skip does) or to its branch target; a fault, a
 * RETRY and every other non-retired end leave RIP where the instruction is. Exception handlers are not
 * modelled: a delivered exception is recorded and RIP stays at the instruction that raised it.
 */
import {
  checkAccess,
  CR0_CD,
  CR0_NW,
  CR0_PE,
  CR0_PG,
  CR4_LA57,
  CR4_OSXSAVE,
  CR4_PAE,
  CR4_UMIP,
  EFER_LMA,
  EFER_SCE,
  INVALID_GPA,
  isCanonical,
  matchInstruction,
  pagingMode,
  RFLAGS_AC,
  RFLAGS_RF,
  setAccessedDirty,
  translate,
  walk,
  type AccessKind as X86AccessKind,
  type EptAccess,
  type EptBit,
  type InstructionEntry,
} from '@periscope/x86';

import { MSR, VECTOR, xcr0Invalid, type CpuState } from './cpu.js';
import type { VmMemory } from './ram.js';

export type DescriptorId = 1 | 2 | 3 | 4;

/** What the KVM side decides at each exit. */
export interface ExecEnv {
  readonly cpu: CpuState;
  readonly mem: VmMemory;
  readonly ept: EptAccess;
  readonly xsaveFeatures: bigint;
  /** An access hits a restricted gfn and uses the cleared `bit`: continue (emulate) or retry. */
  pf(gva: bigint, gpa: bigint, bit: EptBit): Promise<'continue' | 'retry'>;
  /**
   * A CR write that passed the CPU's checks: the value to write, refuse (#GP), or `stop` (the VMM
   * stopped the VM during the exit: nothing more runs).
   */
  cr(cr: 0 | 3 | 4, old: bigint, proposed: bigint): Promise<{ write: bigint } | 'refuse' | 'stop'>;
  /** A WRMSR to an MSR the vCPU has: the value to write, or refuse (#GP). */
  msr(index: number, old: bigint, proposed: bigint): Promise<{ write: bigint } | 'refuse'>;
  /** XCR0 changed (already stored). */
  xsetbv(old: bigint, value: bigint): Promise<void>;
  /** A descriptor-table instruction: `native` when not intercepted, `emulate` after CONTINUE, `retry`. */
  descriptor(descriptor: DescriptorId, write: boolean): Promise<'native' | 'emulate' | 'retry'>;
  /** INT3: re-inject #BP, retry, or an exit to userspace (guest debugging). */
  breakpoint(gpa: bigint, insnLen: number): Promise<'reinject' | 'retry' | 'userspace'>;
  /** VMCALL: RAX afterwards. */
  hypercall(): Promise<bigint>;
  /** An exception reaches the guest (recorded; #PF loads CR2 first). */
  deliver(vector: number, errorCode: number | undefined): void;
}

export type ExecResult =
  /** The instruction retired (RIP updated). `value`: the CR/MSR/XCR0 now in the register; `data`: bytes loaded. */
  | { kind: 'retired'; value?: bigint; data?: Uint8Array }
  /** HLT retired: the vCPU halts. */
  | { kind: 'halted' }
  /** An exception was delivered to the guest. */
  | { kind: 'fault'; vector: number; errorCode?: number; reason: string }
  /** KVM re-entered the guest without executing it (RETRY, or the not-CONTINUE path). */
  | { kind: 'retry' }
  /** The access reached a gpa outside every memslot (an MMIO exit to the device manager). */
  | { kind: 'mmio'; gpa: bigint }
  /** #BP taken by userspace guest debugging. */
  | { kind: 'userspace-exit' }
  /** The CPU is in a paging mode the simulator does not model (32-bit, PAE, 5-level). */
  | { kind: 'unsupported'; reason: string }
  /** The VMM stopped the VM during the instruction's exit (it never completes). */
  | { kind: 'stopped' };

export interface Piece {
  gva: bigint;
  gpa: bigint;
  length: number;
}

export type XlateResult = { ok: true; pieces: Piece[] } | { ok: false; result: ExecResult };

const X86_KIND = { r: 'read', w: 'write', x: 'execute' } as const satisfies Record<string, X86AccessKind>;
export type AccessKind = keyof typeof X86_KIND;

/** CR4 bits the simulated CPU supports (CPUID); any other bit in a MOV to CR4 is #GP. */
const CR4_SUPPORTED = 0xfffn | (1n << 16n) | (1n << 17n) | (1n << 18n) | (1n << 20n) | (1n << 21n);
/** MSRs holding linear addresses: a non-canonical WRMSR value is #GP. */
const ADDRESS_MSRS: ReadonlySet<number> = new Set([
  MSR.LSTAR, MSR.CSTAR, MSR.FS_BASE, MSR.GS_BASE, MSR.KERNEL_GS_BASE, MSR.SYSENTER_EIP, MSR.SYSENTER_ESP,
]);

function fault(env: ExecEnv, vector: number, errorCode: number | undefined, reason: string, cr2?: bigint): ExecResult {
  if (vector === VECTOR.PF && cr2 !== undefined) env.cpu.sregs = { ...env.cpu.sregs, cr2 };
  env.deliver(vector, errorCode);
  return errorCode === undefined ? { kind: 'fault', vector, reason } : { kind: 'fault', vector, errorCode, reason };
}

const gp = (env: ExecEnv, reason: string): ExecResult => fault(env, VECTOR.GP, 0, reason);
const ud = (env: ExecEnv, reason: string): ExecResult => fault(env, VECTOR.UD, undefined, reason);

/**
 * The guest side of a linear access: walk + rights for each 4 KiB piece (first fault wins, lowest
 * page first), A/D bits on success. A fault is delivered to the guest here.
 */
export function translateLinear(env: ExecEnv, gva: bigint, length: number, kind: AccessKind): XlateResult {
  const cpu = env.cpu;
  const { cr0, cr4, efer } = cpu.sregs;
  const mode = pagingMode(cr0, cr4, efer);
  if (mode === 'none') {
    const gpa = gva & 0xffffffffn;
    return { ok: true, pieces: [{ gva, gpa, length }] };
  }
  if (mode !== '4-level') return { ok: false, result: { kind: 'unsupported', reason: `${mode} paging is not modelled` } };
  const pieces: Piece[] = [];
  let at = BigInt.asUintN(64, gva);
  let left = length;
  const ram = env.mem.ram;
  while (left > 0) {
    const w = walk(ram, cpu.sregs.cr3, at, { efer, maxPhyAddr: cpu.maxPhyAddr });
    const r = checkAccess({
      walk: w,
      access: X86_KIND[kind],
      cpl: cpu.cpl,
      cr0,
      cr4,
      efer,
      rflagsAC: (cpu.regs.rflags & RFLAGS_AC) !== 0n,
    });
    if (!r.ok) {
      const res = r.exception === 'GP' ? gp(env, 'non-canonical address') : fault(env, VECTOR.PF, r.errorCode, r.reason, r.gva);
      return { ok: false, result: res };
    }
    if (w.ok) setAccessedDirty(ram, w, kind === 'w');
    const n = Math.min(4096 - Number(at & 0xfffn), left);
    pieces.push({ gva: at, gpa: r.gpa, length: n });
    left -= n;
    at = BigInt.asUintN(64, at + BigInt(n));
  }
  return { ok: true, pieces };
}

/** The EPT side: unbacked → MMIO; each violated bit raises a PF event (R, W, X order); RETRY stops. */
export async function eptCheck(env: ExecEnv, pieces: readonly Piece[], kind: AccessKind, reportGva: boolean): Promise<ExecResult | null> {
  for (const p of pieces) {
    if (!env.mem.isBackedRange(p.gpa, p.length)) return { kind: 'mmio', gpa: p.gpa };
    const gfn = p.gpa >> 12n;
    for (const bit of env.ept.violations(gfn, [X86_KIND[kind]])) {
      if ((await env.pf(reportGva ? p.gva : INVALID_GPA, p.gpa, bit)) === 'retry') return { kind: 'retry' };
    }
  }
  return null;
}

/** A complete data access: guest rules, then EPT. */
export async function dataAccess(env: ExecEnv, gva: bigint, length: number, kind: AccessKind): Promise<Piece[] | ExecResult> {
  const t = translateLinear(env, gva, length, kind);
  if (!t.ok) return t.result;
  const e = await eptCheck(env, t.pieces, kind, true);
  return e ?? t.pieces;
}

export function readPieces(env: ExecEnv, pieces: readonly Piece[]): Buffer {
  return Buffer.concat(pieces.map((p) => env.mem.read(p.gpa, p.length) ?? Buffer.alloc(p.length)));
}

export function writePieces(env: ExecEnv, pieces: readonly Piece[], bytes: Uint8Array): void {
  let off = 0;
  for (const p of pieces) {
    env.mem.write(p.gpa, bytes.subarray(off, off + p.length));
    off += p.length;
  }
}

export interface Fetched {
  readonly entry: InstructionEntry;
  readonly immediate?: bigint;
  readonly rip: bigint;
}

/**
 * Fetch at RIP: execute rights for the bytes the instruction occupies, identified by the table
 * (`matchInstruction`); bytes that match no table entry are #UD.
 */
export async function fetch(env: ExecEnv): Promise<Fetched | ExecResult> {
  const rip = env.cpu.regs.rip;
  const first = translateLinear(env, rip, 1, 'x');
  if (!first.ok) return first.result;
  const p0 = first.pieces[0]!;
  const inPage = Math.min(15, 4096 - Number(rip & 0xfffn));
  if (!env.mem.isBackedRange(p0.gpa, inPage)) return { kind: 'mmio', gpa: p0.gpa };
  let code: Uint8Array = env.mem.read(p0.gpa, inPage)!;
  let m = matchInstruction(code);
  const pieces = [{ gva: rip, gpa: p0.gpa, length: inPage }];
  if ((!m || m.entry.length > inPage) && inPage < 15) {
    const next = BigInt.asUintN(64, rip + BigInt(inPage));
    const second = translateLinear(env, next, 1, 'x');
    if (!second.ok) return second.result;
    const p1 = second.pieces[0]!;
    if (!env.mem.isBackedRange(p1.gpa, 15 - inPage)) return { kind: 'mmio', gpa: p1.gpa };
    code = Buffer.concat([code, env.mem.read(p1.gpa, 15 - inPage)!]);
    pieces.push({ gva: next, gpa: p1.gpa, length: 15 - inPage });
    m = matchInstruction(code);
  }
  if (!m) return ud(env, 'no table instruction at RIP');
  // Execute rights at EPT level for the bytes the instruction really occupies.
  const used: Piece[] = [];
  let left = m.entry.length;
  for (const p of pieces) {
    if (left <= 0) break;
    const n = Math.min(left, p.length);
    used.push({ gva: p.gva, gpa: p.gpa, length: n });
    left -= n;
  }
  const e = await eptCheck(env, used, 'x', true);
  if (e) return e;
  return m.immediate === undefined ? { entry: m.entry, rip } : { entry: m.entry, immediate: m.immediate, rip };
}

function retire(env: ExecEnv, length: number, extra: { value?: bigint; data?: Uint8Array } = {}): ExecResult {
  const regs = env.cpu.regs;
  regs.rip = BigInt.asUintN(64, regs.rip + BigInt(length));
  return { kind: 'retired', ...extra };
}

function crWriteFault(cpu: CpuState, cr: 0 | 3 | 4, v: bigint): string | null {
  const long = (cpu.sregs.efer & EFER_LMA) !== 0n;
  if (cr === 0) {
    if (v >> 32n !== 0n) return 'CR0 bits 63:32 are reserved';
    if ((v & CR0_PG) !== 0n && (v & CR0_PE) === 0n) return 'CR0.PG without CR0.PE';
    if ((v & CR0_NW) !== 0n && (v & CR0_CD) === 0n) return 'CR0.NW without CR0.CD';
    if (long && (v & CR0_PG) === 0n) return 'clearing CR0.PG in IA-32e mode';
  } else if (cr === 4) {
    if ((v & ~CR4_SUPPORTED) !== 0n) return 'reserved or unsupported CR4 bits';
    if (long && (v & CR4_PAE) === 0n) return 'clearing CR4.PAE in IA-32e mode';
    if (long && ((v ^ cpu.sregs.cr4) & CR4_LA57) !== 0n) return 'changing CR4.LA57 in IA-32e mode';
  }
  return null;
}

/** Execute one fetched (or named) instruction at `rip` (the instruction's address). */
export async function execute(env: ExecEnv, f: Fetched): Promise<ExecResult> {
  const { entry, rip } = f;
  const cpu = env.cpu;
  /** How far a retiring (non-branch) instruction moves RIP: the table's ground-truth length. */
  const len = entry.length;
  const cpl = cpu.cpl;
  switch (entry.privilege) {
    case 'cpl0-gp':
      if (cpl > 0) return gp(env, `${entry.name} at CPL ${cpl}`);
      break;
    case 'cpl0-ud':
      if (cpl > 0) return ud(env, `${entry.name} at CPL ${cpl}`);
      break;
    case 'cpl0-gp-if-umip':
      if (cpl > 0 && (cpu.sregs.cr4 & CR4_UMIP) !== 0n) return gp(env, `${entry.name} at CPL ${cpl} with UMIP`);
      break;
    case 'any':
      break;
  }
  const e = entry.effect;
  const reg = (name: 'rax' | 'rbx' | 'rcx' | 'rdx' | 'rsi' | 'rdi' | 'rsp'): bigint => cpu.regs[name];
  switch (e.kind) {
    case 'nop':
      return retire(env, len);
    case 'store': {
      const a = await dataAccess(env, reg(e.base), e.size, 'w');
      if (!Array.isArray(a)) return a;
      const b = Buffer.alloc(8);
      b.writeBigUInt64LE(reg('rax'));
      writePieces(env, a, b.subarray(0, e.size));
      return retire(env, len);
    }
    case 'rep-movs': {
      // Chunks that stay inside one source page and one destination page; the registers advance
      // after each chunk, so a fault or RETRY leaves RSI/RDI/RCX at the iteration reached (RIP at the
      // instruction), as an interrupted REP MOVS does.
      for (;;) {
        const count = reg('rcx');
        if (count === 0n) return retire(env, len);
        const rsi = reg('rsi');
        const rdi = reg('rdi');
        const inPage = (x: bigint): bigint => 4096n - (x & 0xfffn);
        let n = count;
        if (inPage(rsi) < n) n = inPage(rsi);
        if (inPage(rdi) < n) n = inPage(rdi);
        const src = await dataAccess(env, rsi, Number(n), 'r');
        if (!Array.isArray(src)) return src;
        const bytes = readPieces(env, src);
        const dst = await dataAccess(env, rdi, Number(n), 'w');
        if (!Array.isArray(dst)) return dst;
        writePieces(env, dst, bytes);
        cpu.regs.rsi = BigInt.asUintN(64, rsi + n);
        cpu.regs.rdi = BigInt.asUintN(64, rdi + n);
        cpu.regs.rcx = count - n;
      }
    }
    case 'syscall': {
      if (cpu.mode !== 8) return ud(env, 'SYSCALL outside 64-bit mode');
      if ((cpu.sregs.efer & EFER_SCE) === 0n) return ud(env, 'SYSCALL with EFER.SCE = 0');
      const star = cpu.readMsr(MSR.STAR) ?? 0n;
      const sfmask = cpu.readMsr(MSR.SFMASK) ?? 0n;
      const lstar = cpu.readMsr(MSR.LSTAR) ?? 0n;
      const sel = Number((star >> 32n) & 0xfffcn);
      cpu.regs.rcx = BigInt.asUintN(64, rip + BigInt(entry.length));
      cpu.regs.r11 = cpu.regs.rflags;
      cpu.regs.rflags = (cpu.regs.rflags & ~sfmask & ~RFLAGS_RF) | 0x2n;
      const s = cpu.sregs;
      cpu.sregs = {
        ...s,
        cs: { ...s.cs, selector: sel, dpl: 0, l: 1, db: 0 },
        ss: { ...s.ss, selector: sel + 8, dpl: 0 },
      };
      cpu.regs.rip = lstar;
      return { kind: 'retired' };
    }
    case 'load': {
      const a = await dataAccess(env, reg(e.base), e.size, 'r');
      if (!Array.isArray(a)) return a;
      const data = readPieces(env, a);
      cpu.regs.rax = data.readBigUInt64LE(0);
      return retire(env, len, { data: new Uint8Array(data) });
    }
    case 'load-immediate': {
      const imm = BigInt.asUintN(64, f.immediate ?? 0n);
      cpu.regs[e.dst] = e.size === 4 ? imm & 0xffffffffn : imm;
      return retire(env, len);
    }
    case 'wrmsr': {
      const index = Number(reg('rcx') & 0xffffffffn);
      const value = ((reg('rdx') & 0xffffffffn) << 32n) | (reg('rax') & 0xffffffffn);
      const old = cpu.readMsr(index);
      if (old === undefined) return gp(env, `WRMSR to MSR 0x${index.toString(16)} the vCPU does not have`);
      if (ADDRESS_MSRS.has(index) && !isCanonical(value)) return gp(env, 'non-canonical address in an address MSR');
      const r = await env.msr(index, old, value);
      if (r === 'refuse') return gp(env, 'the WRMSR was refused');
      cpu.writeMsr(index, r.write);
      return retire(env, len, { value: cpu.readMsr(index) ?? 0n });
    }
    case 'rdmsr': {
      const index = Number(reg('rcx') & 0xffffffffn);
      const v = cpu.readMsr(index);
      if (v === undefined) return gp(env, `RDMSR of MSR 0x${index.toString(16)} the vCPU does not have`);
      cpu.regs.rax = v & 0xffffffffn;
      cpu.regs.rdx = v >> 32n;
      return retire(env, len, { value: v });
    }
    case 'mov-to-cr': {
      const proposed = reg('rax');
      const why = crWriteFault(cpu, e.cr, proposed);
      if (why) return gp(env, why);
      const old = cpu.readCr(e.cr);
      const r = await env.cr(e.cr, old, proposed);
      if (r === 'stop') return { kind: 'stopped' };
      if (r === 'refuse') return gp(env, `the CR${e.cr} write was refused`);
      cpu.writeCr(e.cr, r.write);
      return retire(env, len, { value: cpu.readCr(e.cr) });
    }
    case 'mov-from-cr':
      cpu.regs.rax = cpu.readCr(e.cr);
      return retire(env, len, { value: cpu.regs.rax });
    case 'load-dtr':
    case 'store-dtr': {
      const write = e.kind === 'load-dtr';
      const d = await env.descriptor(e.table === 'idtr' ? 1 : 2, write);
      if (d === 'retry') return { kind: 'retry' };
      const a = await dataAccess(env, reg('rax'), 10, write ? 'r' : 'w');
      if (!Array.isArray(a)) return a;
      if (write) {
        const b = readPieces(env, a);
        const t = { limit: b.readUInt16LE(0), base: b.readBigUInt64LE(2) };
        cpu.sregs = e.table === 'idtr' ? { ...cpu.sregs, idt: t } : { ...cpu.sregs, gdt: t };
      } else {
        const t = e.table === 'idtr' ? cpu.sregs.idt : cpu.sregs.gdt;
        const b = Buffer.alloc(10);
        b.writeUInt16LE(t.limit & 0xffff, 0);
        b.writeBigUInt64LE(t.base, 2);
        writePieces(env, a, b);
      }
      return retire(env, len);
    }
    case 'load-selector': {
      const d = await env.descriptor(e.table === 'ldtr' ? 3 : 4, true);
      if (d === 'retry') return { kind: 'retry' };
      const selector = Number(reg('rax') & 0xffffn);
      cpu.sregs = e.table === 'ldtr' ? { ...cpu.sregs, ldt: { ...cpu.sregs.ldt, selector } } : { ...cpu.sregs, tr: { ...cpu.sregs.tr, selector } };
      return retire(env, len);
    }
    case 'breakpoint': {
      const gpa = linearToGpa(env, rip);
      const r = await env.breakpoint(gpa, entry.length);
      if (r === 'retry') return { kind: 'retry' };
      if (r === 'userspace') return { kind: 'userspace-exit' };
      return fault(env, VECTOR.BP, undefined, 'int3');
    }
    case 'hypercall': {
      const rax = await env.hypercall();
      cpu.regs.rax = rax;
      return retire(env, len, { value: rax });
    }
    case 'xsetbv': {
      if ((cpu.sregs.cr4 & CR4_OSXSAVE) === 0n) return ud(env, 'XSETBV with CR4.OSXSAVE = 0');
      if ((reg('rcx') & 0xffffffffn) !== 0n) return gp(env, 'XSETBV to an XCR other than XCR0');
      const v = ((reg('rdx') & 0xffffffffn) << 32n) | (reg('rax') & 0xffffffffn);
      const why = xcr0Invalid(v, env.xsaveFeatures);
      if (why) return gp(env, why);
      const old = cpu.xcr0;
      cpu.xcr0 = v;
      if (old !== v) await env.xsetbv(old, v);
      return retire(env, len, { value: v });
    }
    case 'xgetbv': {
      if ((cpu.sregs.cr4 & CR4_OSXSAVE) === 0n) return ud(env, 'XGETBV with CR4.OSXSAVE = 0');
      if ((reg('rcx') & 0xffffffffn) !== 0n) return gp(env, 'XGETBV of an XCR other than XCR0');
      cpu.regs.rax = cpu.xcr0 & 0xffffffffn;
      cpu.regs.rdx = cpu.xcr0 >> 32n;
      return retire(env, len, { value: cpu.xcr0 });
    }
    case 'set-ac':
      cpu.regs.rflags = e.value ? cpu.regs.rflags | RFLAGS_AC : cpu.regs.rflags & ~RFLAGS_AC;
      return retire(env, len);
    case 'jump':
      cpu.regs.rip = BigInt.asUintN(64, rip + BigInt(entry.length) + (f.immediate ?? 0n));
      return { kind: 'retired' };
    case 'call': {
      const rsp = BigInt.asUintN(64, reg('rsp') - 8n);
      const a = await dataAccess(env, rsp, 8, 'w');
      if (!Array.isArray(a)) return a;
      const b = Buffer.alloc(8);
      b.writeBigUInt64LE(BigInt.asUintN(64, rip + BigInt(entry.length)));
      writePieces(env, a, b);
      cpu.regs.rsp = rsp;
      cpu.regs.rip = BigInt.asUintN(64, rip + BigInt(entry.length) + (f.immediate ?? 0n));
      return { kind: 'retired' };
    }
    case 'ret': {
      const a = await dataAccess(env, reg('rsp'), 8, 'r');
      if (!Array.isArray(a)) return a;
      cpu.regs.rip = readPieces(env, a).readBigUInt64LE(0);
      cpu.regs.rsp = BigInt.asUintN(64, reg('rsp') + 8n);
      return { kind: 'retired' };
    }
    case 'hlt':
      retire(env, len);
      return { kind: 'halted' };
    case 'undefined':
      return ud(env, 'ud2');
  }
}

/** The gpa of a linear address by the walk alone (no rights), as `kvm_mmu_gva_to_gpa_system`; all ones on failure. */
export function linearToGpa(env: { cpu: CpuState; mem: VmMemory }, gva: bigint): bigint {
  const { cr0, cr4, efer, cr3 } = env.cpu.sregs;
  const mode = pagingMode(cr0, cr4, efer);
  if (mode === 'none') return gva & 0xffffffffn;
  if (mode !== '4-level') return INVALID_GPA;
  return translate(env.mem.ram, cr3, BigInt.asUintN(64, gva), { efer, maxPhyAddr: env.cpu.maxPhyAddr });
}
