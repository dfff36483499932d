/**
 * The instructions the simulated guest executes, with ground-truth x86-64 encodings.
 *
 * Every byte below was written by hand from the opcode tables of the Intel SDM Vol. 2 (instruction
 * reference, and Vol. 2 Appendix A/B for ModR/M): nothing is produced by an assembler or decoder.
 * ModR/M = mod(2) | reg(3) | rm(3); `/r` puts a register in `reg`, `/digit` puts an opcode extension
 * there. `[rdi]` is mod 00 rm 111, `[rax]` is mod 00 rm 000, a register operand is mod 11.
 *
 * `effect` says what the instruction does so the simulator can execute it; `memory` is its data
 * access (the fetch of the instruction bytes is implied); `privilege` is the CPL rule; `vmExit` is
 * the VMX exit it can cause (SDM Vol. 3C Appendix C, basic exit reasons) and under which control.
 */
import { X86Error } from './errors.js';
import type { AccessKind } from './access.js';
import type { GuestRam } from './ram.js';

export type InstructionName =
  | 'mov [rdi], rax'
  | 'mov [rdi], eax'
  | 'mov [rdi], ax'
  | 'mov [rdi], al'
  | 'rep movsb'
  | 'mov rax, [rdi]'
  | 'mov rax, imm64'
  | 'mov rdi, imm64'
  | 'mov rbx, imm64'
  | 'mov rcx, imm64'
  | 'mov rdx, imm64'
  | 'mov eax, imm32'
  | 'mov ecx, imm32'
  | 'mov edx, imm32'
  | 'wrmsr'
  | 'rdmsr'
  | 'mov cr0, rax'
  | 'mov cr3, rax'
  | 'mov cr4, rax'
  | 'mov rax, cr0'
  | 'mov rax, cr3'
  | 'mov rax, cr4'
  | 'lgdt [rax]'
  | 'lidt [rax]'
  | 'sgdt [rax]'
  | 'sidt [rax]'
  | 'lldt ax'
  | 'ltr ax'
  | 'int3'
  | 'vmcall'
  | 'syscall'
  | 'xsetbv'
  | 'xgetbv'
  | 'stac'
  | 'clac'
  | 'nop'
  | 'jmp rel8'
  | 'jmp rel32'
  | 'call rel32'
  | 'ret'
  | 'hlt'
  | 'ud2';

export type GeneralRegister = 'rax' | 'rbx' | 'rcx' | 'rdx' | 'rdi' | 'rsp';

/** What an instruction does, in terms the simulator can execute. */
export type InstructionEffect =
  /** memory[base] ← low `size` bytes of `src`. */
  | { readonly kind: 'store'; readonly src: 'rax'; readonly base: 'rdi'; readonly size: 1 | 2 | 4 | 8 }
  /**
   * REP MOVSB with RFLAGS.DF = 0: while RCX ≠ 0 { byte [RDI] ← byte [RSI]; RSI += 1; RDI += 1; RCX -= 1 }.
   * Interruptible: a fault or exit between iterations leaves RSI/RDI/RCX at the iteration reached and RIP
   * at the instruction (SDM Vol. 2B "REP/REPE/REPZ/REPNE/REPNZ"); RCX = 0 executes nothing.
   */
  | { readonly kind: 'rep-movs'; readonly size: 1 }
  /**
   * SYSCALL (64-bit mode, EFER.SCE = 1, else #UD): RCX ← next RIP, R11 ← RFLAGS, RFLAGS ← RFLAGS & ~SFMASK
   * (RF cleared), RIP ← LSTAR, CS ← STAR[47:32] & 0xFFFC (DPL 0), SS ← that + 8 (CPL 0).
   */
  | { readonly kind: 'syscall' }
  /** dst ← memory[base] (`size` bytes). */
  | { readonly kind: 'load'; readonly dst: 'rax'; readonly base: 'rdi'; readonly size: 8 }
  /** dst ← immediate; a 32-bit destination zero-extends into the whole 64-bit register. */
  | { readonly kind: 'load-immediate'; readonly dst: GeneralRegister; readonly size: 4 | 8 }
  /** MSR[ECX] ← EDX:EAX. #GP(0) at CPL > 0 or for an unknown/read-only MSR or a reserved-bit value. */
  | { readonly kind: 'wrmsr' }
  /** EDX:EAX ← MSR[ECX] (upper halves of RAX/RDX cleared). #GP(0) at CPL > 0 or for an unknown MSR. */
  | { readonly kind: 'rdmsr' }
  /** CRn ← src. #GP(0) at CPL > 0 or for invalid bit combinations. */
  | { readonly kind: 'mov-to-cr'; readonly cr: 0 | 3 | 4; readonly src: 'rax' }
  /** dst ← CRn. */
  | { readonly kind: 'mov-from-cr'; readonly cr: 0 | 3 | 4; readonly dst: 'rax' }
  /**
   * GDTR/IDTR ← memory[base]: in 64-bit mode a 10-byte operand, 16-bit limit at +0 then 64-bit base
   * at +2.
   */
  | { readonly kind: 'load-dtr'; readonly table: 'gdtr' | 'idtr'; readonly base: 'rax' }
  /** memory[base] ← GDTR/IDTR (10 bytes, same layout). */
  | { readonly kind: 'store-dtr'; readonly table: 'gdtr' | 'idtr'; readonly base: 'rax' }
  /** LDTR/TR ← selector in AX (the descriptor is read from the GDT: an implicit supervisor access). */
  | { readonly kind: 'load-selector'; readonly table: 'ldtr' | 'tr'; readonly src: 'ax' }
  /** #BP, a trap: the RIP pushed is the address after the INT3. */
  | { readonly kind: 'breakpoint' }
  /** VMCALL: always exits in VMX non-root operation; KVM's hypercall ABI (RAX = number, result in RAX). */
  | { readonly kind: 'hypercall' }
  /** XCR[ECX] ← EDX:EAX. #GP(0) at CPL > 0 or invalid value; #UD when CR4.OSXSAVE = 0. */
  | { readonly kind: 'xsetbv' }
  /** EDX:EAX ← XCR[ECX]. #UD when CR4.OSXSAVE = 0. */
  | { readonly kind: 'xgetbv' }
  /** RFLAGS.AC ← `value` (STAC sets, CLAC clears). #UD at CPL > 0. */
  | { readonly kind: 'set-ac'; readonly value: boolean }
  | { readonly kind: 'nop' }
  /** RIP ← next RIP + sign-extended displacement. */
  | { readonly kind: 'jump'; readonly displacement: 1 | 4 }
  /** push next RIP (RSP −= 8, 8-byte write at the new RSP); RIP ← next RIP + rel32. */
  | { readonly kind: 'call'; readonly displacement: 4 }
  /** RIP ← 8-byte read at RSP; RSP += 8. */
  | { readonly kind: 'ret' }
  /** Halt until the next interrupt. #GP(0) at CPL > 0. */
  | { readonly kind: 'hlt' }
  /** Always #UD. */
  | { readonly kind: 'undefined' };

/** The CPL rule of an instruction. */
export type PrivilegeRule =
  /** Any CPL. */
  | 'any'
  /** #GP(0) when CPL > 0. */
  | 'cpl0-gp'
  /** #UD when CPL > 0 (STAC/CLAC). */
  | 'cpl0-ud'
  /** #GP(0) when CPL > 0 and CR4.UMIP = 1 (SGDT/SIDT). */
  | 'cpl0-gp-if-umip';

export interface MemoryOperand {
  readonly access: AccessKind;
  /** Bytes accessed. */
  readonly size: number;
  /** The linear address: a register, or `rsp-8` for a push. */
  readonly address: 'rdi' | 'rsi' | 'rax' | 'rsp' | 'rsp-8';
}

export interface ImmediateField {
  /** Byte offset of the immediate inside the encoding (always the tail here). */
  readonly offset: number;
  readonly size: 1 | 4 | 8;
  /** Displacements are signed; register immediates are unsigned. */
  readonly signed: boolean;
}

export interface VmExitInfo {
  /** Basic exit reason (SDM Vol. 3C Appendix C). */
  readonly reason: number;
  readonly name: string;
  /** The VM-execution control or condition under which the exit happens. */
  readonly when: string;
}

export interface InstructionEntry {
  /** Intel syntax; also the table key. */
  readonly name: InstructionName;
  /** The encoding (immediate bytes zero). Shared: do not mutate; `encodeInstruction` returns a copy. */
  readonly bytes: Uint8Array;
  readonly length: number;
  /** The SDM opcode column. */
  readonly opcode: string;
  /** Operand description. */
  readonly operands: string;
  readonly effect: InstructionEffect;
  readonly privilege: PrivilegeRule;
  readonly memory?: MemoryOperand;
  /** A second data access, read before `memory` is written (the source of a string move). */
  readonly source?: MemoryOperand;
  readonly immediate?: ImmediateField;
  readonly vmExit?: VmExitInfo;
  readonly description: string;
}

type Def = Omit<InstructionEntry, 'name' | 'length'>;

const CR_ACCESS = 28;
const crExit = (when: string): VmExitInfo => ({ reason: CR_ACCESS, name: 'control-register access', when });
const DTR_EXIT: VmExitInfo = { reason: 46, name: 'access to GDTR or IDTR', when: '"descriptor-table exiting" control = 1' };
const LDTR_TR_EXIT: VmExitInfo = { reason: 47, name: 'access to LDTR or TR', when: '"descriptor-table exiting" control = 1' };

const DEFS: { readonly [K in InstructionName]: Def } = {
  'mov [rdi], rax': {
    bytes: Uint8Array.of(0x48, 0x89, 0x07),
    opcode: 'REX.W + 89 /r',
    operands: 'r/m64 = [rdi] (ModR/M 07: mod 00, reg 000 = rax, rm 111 = rdi), r64 = rax',
    effect: { kind: 'store', src: 'rax', base: 'rdi', size: 8 },
    privilege: 'any',
    memory: { access: 'write', size: 8, address: 'rdi' },
    description: 'store the 8 bytes of RAX at [RDI]',
  },
  'mov [rdi], eax': {
    bytes: Uint8Array.of(0x89, 0x07),
    opcode: '89 /r',
    operands: 'r/m32 = [rdi] (ModR/M 07: mod 00, reg 000 = eax, rm 111 = rdi), r32 = eax (no REX.W: operand size 32)',
    effect: { kind: 'store', src: 'rax', base: 'rdi', size: 4 },
    privilege: 'any',
    memory: { access: 'write', size: 4, address: 'rdi' },
    description: 'store EAX (the low 4 bytes of RAX) at [RDI]',
  },
  'mov [rdi], ax': {
    bytes: Uint8Array.of(0x66, 0x89, 0x07),
    opcode: '66 + 89 /r',
    operands: 'operand-size prefix 66 (16 bits), r/m16 = [rdi] (ModR/M 07), r16 = ax',
    effect: { kind: 'store', src: 'rax', base: 'rdi', size: 2 },
    privilege: 'any',
    memory: { access: 'write', size: 2, address: 'rdi' },
    description: 'store AX (the low 2 bytes of RAX) at [RDI]',
  },
  'mov [rdi], al': {
    bytes: Uint8Array.of(0x88, 0x07),
    opcode: '88 /r',
    operands: 'r/m8 = [rdi], r8 = al',
    effect: { kind: 'store', src: 'rax', base: 'rdi', size: 1 },
    privilege: 'any',
    memory: { access: 'write', size: 1, address: 'rdi' },
    description: 'store AL (the low byte of RAX) at [RDI]',
  },
  'rep movsb': {
    bytes: Uint8Array.of(0xf3, 0xa4),
    opcode: 'F3 A4',
    operands: 'implicit: m8 [rdi] ← m8 [rsi], RCX times (REP prefix F3, MOVS m8, m8 = A4); 64-bit addresses',
    effect: { kind: 'rep-movs', size: 1 },
    privilege: 'any',
    memory: { access: 'write', size: 1, address: 'rdi' },
    source: { access: 'read', size: 1, address: 'rsi' },
    description: 'copy RCX bytes from [RSI] to [RDI] (RFLAGS.DF = 0: ascending), one byte per iteration',
  },
  'mov rax, [rdi]': {
    bytes: Uint8Array.of(0x48, 0x8b, 0x07),
    opcode: 'REX.W + 8B /r',
    operands: 'r64 = rax, r/m64 = [rdi]',
    effect: { kind: 'load', dst: 'rax', base: 'rdi', size: 8 },
    privilege: 'any',
    memory: { access: 'read', size: 8, address: 'rdi' },
    description: 'load 8 bytes from [RDI] into RAX',
  },
  'mov rax, imm64': {
    bytes: Uint8Array.of(0x48, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0),
    opcode: 'REX.W + B8+rd io',
    operands: 'r64 = rax (rd 0), imm64',
    effect: { kind: 'load-immediate', dst: 'rax', size: 8 },
    privilege: 'any',
    immediate: { offset: 2, size: 8, signed: false },
    description: 'RAX ← imm64',
  },
  'mov rdi, imm64': {
    bytes: Uint8Array.of(0x48, 0xbf, 0, 0, 0, 0, 0, 0, 0, 0),
    opcode: 'REX.W + B8+rd io',
    operands: 'r64 = rdi (rd 7), imm64',
    effect: { kind: 'load-immediate', dst: 'rdi', size: 8 },
    privilege: 'any',
    immediate: { offset: 2, size: 8, signed: false },
    description: 'RDI ← imm64',
  },
  'mov rbx, imm64': {
    bytes: Uint8Array.of(0x48, 0xbb, 0, 0, 0, 0, 0, 0, 0, 0),
    opcode: 'REX.W + B8+rd io',
    operands: 'r64 = rbx (rd 3), imm64',
    effect: { kind: 'load-immediate', dst: 'rbx', size: 8 },
    privilege: 'any',
    immediate: { offset: 2, size: 8, signed: false },
    description: 'RBX ← imm64 (a0 of a KVM hypercall)',
  },
  'mov rcx, imm64': {
    bytes: Uint8Array.of(0x48, 0xb9, 0, 0, 0, 0, 0, 0, 0, 0),
    opcode: 'REX.W + B8+rd io',
    operands: 'r64 = rcx (rd 1), imm64',
    effect: { kind: 'load-immediate', dst: 'rcx', size: 8 },
    privilege: 'any',
    immediate: { offset: 2, size: 8, signed: false },
    description: 'RCX ← imm64 (a1 of a KVM hypercall)',
  },
  'mov rdx, imm64': {
    bytes: Uint8Array.of(0x48, 0xba, 0, 0, 0, 0, 0, 0, 0, 0),
    opcode: 'REX.W + B8+rd io',
    operands: 'r64 = rdx (rd 2), imm64',
    effect: { kind: 'load-immediate', dst: 'rdx', size: 8 },
    privilege: 'any',
    immediate: { offset: 2, size: 8, signed: false },
    description: 'RDX ← imm64 (a2 of a KVM hypercall)',
  },
  'mov eax, imm32': {
    bytes: Uint8Array.of(0xb8, 0, 0, 0, 0),
    opcode: 'B8+rd id',
    operands: 'r32 = eax (rd 0), imm32',
    effect: { kind: 'load-immediate', dst: 'rax', size: 4 },
    privilege: 'any',
    immediate: { offset: 1, size: 4, signed: false },
    description: 'EAX ← imm32 (bits 63:32 of RAX cleared)',
  },
  'mov ecx, imm32': {
    bytes: Uint8Array.of(0xb9, 0, 0, 0, 0),
    opcode: 'B8+rd id',
    operands: 'r32 = ecx (rd 1), imm32',
    effect: { kind: 'load-immediate', dst: 'rcx', size: 4 },
    privilege: 'any',
    immediate: { offset: 1, size: 4, signed: false },
    description: 'ECX ← imm32 (bits 63:32 of RCX cleared); the MSR/XCR index for WRMSR/RDMSR/XSETBV',
  },
  'mov edx, imm32': {
    bytes: Uint8Array.of(0xba, 0, 0, 0, 0),
    opcode: 'B8+rd id',
    operands: 'r32 = edx (rd 2), imm32',
    effect: { kind: 'load-immediate', dst: 'rdx', size: 4 },
    privilege: 'any',
    immediate: { offset: 1, size: 4, signed: false },
    description: 'EDX ← imm32 (bits 63:32 of RDX cleared)',
  },
  wrmsr: {
    bytes: Uint8Array.of(0x0f, 0x30),
    opcode: '0F 30',
    operands: 'implicit: ECX = MSR index, EDX:EAX = value',
    effect: { kind: 'wrmsr' },
    privilege: 'cpl0-gp',
    vmExit: { reason: 32, name: 'WRMSR', when: 'always unless the MSR bitmap clears the MSR' },
    description: 'write EDX:EAX to the MSR selected by ECX',
  },
  rdmsr: {
    bytes: Uint8Array.of(0x0f, 0x32),
    opcode: '0F 32',
    operands: 'implicit: ECX = MSR index; result in EDX:EAX',
    effect: { kind: 'rdmsr' },
    privilege: 'cpl0-gp',
    vmExit: { reason: 31, name: 'RDMSR', when: 'always unless the MSR bitmap clears the MSR' },
    description: 'read the MSR selected by ECX into EDX:EAX',
  },
  'mov cr0, rax': {
    bytes: Uint8Array.of(0x0f, 0x22, 0xc0),
    opcode: '0F 22 /r',
    operands: 'cr0 (reg 000), r64 = rax (mod 11, rm 000)',
    effect: { kind: 'mov-to-cr', cr: 0, src: 'rax' },
    privilege: 'cpl0-gp',
    vmExit: crExit('the write changes a bit owned by the host (CR0 guest/host mask)'),
    description: 'CR0 ← RAX',
  },
  'mov cr3, rax': {
    bytes: Uint8Array.of(0x0f, 0x22, 0xd8),
    opcode: '0F 22 /r',
    operands: 'cr3 (reg 011), r64 = rax',
    effect: { kind: 'mov-to-cr', cr: 3, src: 'rax' },
    privilege: 'cpl0-gp',
    vmExit: crExit('"CR3-load exiting" control = 1 (and the value is not in the CR3-target list)'),
    description: 'CR3 ← RAX (switches address space)',
  },
  'mov cr4, rax': {
    bytes: Uint8Array.of(0x0f, 0x22, 0xe0),
    opcode: '0F 22 /r',
    operands: 'cr4 (reg 100), r64 = rax',
    effect: { kind: 'mov-to-cr', cr: 4, src: 'rax' },
    privilege: 'cpl0-gp',
    vmExit: crExit('the write changes a bit owned by the host (CR4 guest/host mask)'),
    description: 'CR4 ← RAX',
  },
  'mov rax, cr0': {
    bytes: Uint8Array.of(0x0f, 0x20, 0xc0),
    opcode: '0F 20 /r',
    operands: 'r64 = rax (mod 11, rm 000), cr0 (reg 000)',
    effect: { kind: 'mov-from-cr', cr: 0, dst: 'rax' },
    privilege: 'cpl0-gp',
    description: 'RAX ← CR0 (host-owned bits read from the CR0 read shadow; never exits)',
  },
  'mov rax, cr3': {
    bytes: Uint8Array.of(0x0f, 0x20, 0xd8),
    opcode: '0F 20 /r',
    operands: 'r64 = rax, cr3 (reg 011)',
    effect: { kind: 'mov-from-cr', cr: 3, dst: 'rax' },
    privilege: 'cpl0-gp',
    vmExit: crExit('"CR3-store exiting" control = 1'),
    description: 'RAX ← CR3',
  },
  'mov rax, cr4': {
    bytes: Uint8Array.of(0x0f, 0x20, 0xe0),
    opcode: '0F 20 /r',
    operands: 'r64 = rax, cr4 (reg 100)',
    effect: { kind: 'mov-from-cr', cr: 4, dst: 'rax' },
    privilege: 'cpl0-gp',
    description: 'RAX ← CR4 (host-owned bits read from the CR4 read shadow; never exits)',
  },
  'lgdt [rax]': {
    bytes: Uint8Array.of(0x0f, 0x01, 0x10),
    opcode: '0F 01 /2',
    operands: 'm16&64 = [rax] (mod 00, reg 010, rm 000)',
    effect: { kind: 'load-dtr', table: 'gdtr', base: 'rax' },
    privilege: 'cpl0-gp',
    memory: { access: 'read', size: 10, address: 'rax' },
    vmExit: DTR_EXIT,
    description: 'GDTR ← 10-byte pseudo-descriptor at [RAX] (limit u16, base u64)',
  },
  'lidt [rax]': {
    bytes: Uint8Array.of(0x0f, 0x01, 0x18),
    opcode: '0F 01 /3',
    operands: 'm16&64 = [rax] (mod 00, reg 011, rm 000)',
    effect: { kind: 'load-dtr', table: 'idtr', base: 'rax' },
    privilege: 'cpl0-gp',
    memory: { access: 'read', size: 10, address: 'rax' },
    vmExit: DTR_EXIT,
    description: 'IDTR ← 10-byte pseudo-descriptor at [RAX] (limit u16, base u64)',
  },
  'sgdt [rax]': {
    bytes: Uint8Array.of(0x0f, 0x01, 0x00),
    opcode: '0F 01 /0',
    operands: 'm16&64 = [rax] (mod 00, reg 000, rm 000)',
    effect: { kind: 'store-dtr', table: 'gdtr', base: 'rax' },
    privilege: 'cpl0-gp-if-umip',
    memory: { access: 'write', size: 10, address: 'rax' },
    vmExit: DTR_EXIT,
    description: '10-byte pseudo-descriptor at [RAX] ← GDTR',
  },
  'sidt [rax]': {
    bytes: Uint8Array.of(0x0f, 0x01, 0x08),
    opcode: '0F 01 /1',
    operands: 'm16&64 = [rax] (mod 00, reg 001, rm 000)',
    effect: { kind: 'store-dtr', table: 'idtr', base: 'rax' },
    privilege: 'cpl0-gp-if-umip',
    memory: { access: 'write', size: 10, address: 'rax' },
    vmExit: DTR_EXIT,
    description: '10-byte pseudo-descriptor at [RAX] ← IDTR',
  },
  'lldt ax': {
    bytes: Uint8Array.of(0x0f, 0x00, 0xd0),
    opcode: '0F 00 /2',
    operands: 'r/m16 = ax (mod 11, reg 010, rm 000)',
    effect: { kind: 'load-selector', table: 'ldtr', src: 'ax' },
    privilege: 'cpl0-gp',
    vmExit: LDTR_TR_EXIT,
    description: 'LDTR ← selector AX',
  },
  'ltr ax': {
    bytes: Uint8Array.of(0x0f, 0x00, 0xd8),
    opcode: '0F 00 /3',
    operands: 'r/m16 = ax (mod 11, reg 011, rm 000)',
    effect: { kind: 'load-selector', table: 'tr', src: 'ax' },
    privilege: 'cpl0-gp',
    vmExit: LDTR_TR_EXIT,
    description: 'TR ← selector AX (marks the TSS descriptor busy)',
  },
  int3: {
    bytes: Uint8Array.of(0xcc),
    opcode: 'CC',
    operands: 'none',
    effect: { kind: 'breakpoint' },
    privilege: 'any',
    vmExit: {
      reason: 0,
      name: 'exception or NMI',
      when: 'bit 3 (#BP) of the exception bitmap is set; the exit is fault-like: guest RIP = the INT3, instruction length 1',
    },
    description: 'raise #BP (trap-like: the pushed RIP is the next instruction)',
  },
  vmcall: {
    bytes: Uint8Array.of(0x0f, 0x01, 0xc1),
    opcode: '0F 01 C1',
    operands: 'implicit: RAX = hypercall number, RBX/RCX/RDX/RSI = arguments (KVM ABI)',
    effect: { kind: 'hypercall' },
    privilege: 'any',
    vmExit: { reason: 18, name: 'VMCALL', when: 'always (unconditional in VMX non-root operation, at any CPL)' },
    description: 'call the hypervisor; KVM returns -KVM_EPERM in RAX to CPL > 0 callers',
  },
  syscall: {
    bytes: Uint8Array.of(0x0f, 0x05),
    opcode: '0F 05',
    operands: 'implicit: RCX ← next RIP, R11 ← RFLAGS; target LSTAR, selectors from STAR, mask SFMASK',
    effect: { kind: 'syscall' },
    privilege: 'any',
    description: 'fast call to the CPL 0 entry at IA32_LSTAR (#UD outside 64-bit mode or with EFER.SCE = 0)',
  },
  xsetbv: {
    bytes: Uint8Array.of(0x0f, 0x01, 0xd1),
    opcode: '0F 01 D1',
    operands: 'implicit: ECX = XCR index, EDX:EAX = value',
    effect: { kind: 'xsetbv' },
    privilege: 'cpl0-gp',
    vmExit: { reason: 55, name: 'XSETBV', when: 'always (unconditional)' },
    description: 'write EDX:EAX to the extended control register selected by ECX (XCR0)',
  },
  xgetbv: {
    bytes: Uint8Array.of(0x0f, 0x01, 0xd0),
    opcode: '0F 01 D0',
    operands: 'implicit: ECX = XCR index; result in EDX:EAX',
    effect: { kind: 'xgetbv' },
    privilege: 'any',
    description: 'read the extended control register selected by ECX into EDX:EAX',
  },
  stac: {
    bytes: Uint8Array.of(0x0f, 0x01, 0xcb),
    opcode: '0F 01 CB',
    operands: 'none',
    effect: { kind: 'set-ac', value: true },
    privilege: 'cpl0-ud',
    description: 'set RFLAGS.AC (allow explicit supervisor access to user pages under SMAP)',
  },
  clac: {
    bytes: Uint8Array.of(0x0f, 0x01, 0xca),
    opcode: '0F 01 CA',
    operands: 'none',
    effect: { kind: 'set-ac', value: false },
    privilege: 'cpl0-ud',
    description: 'clear RFLAGS.AC',
  },
  nop: {
    bytes: Uint8Array.of(0x90),
    opcode: 'NP 90',
    operands: 'none',
    effect: { kind: 'nop' },
    privilege: 'any',
    description: 'no operation',
  },
  'jmp rel8': {
    bytes: Uint8Array.of(0xeb, 0),
    opcode: 'EB cb',
    operands: 'rel8, relative to the next instruction',
    effect: { kind: 'jump', displacement: 1 },
    privilege: 'any',
    immediate: { offset: 1, size: 1, signed: true },
    description: 'RIP ← RIP + 2 + rel8',
  },
  'jmp rel32': {
    bytes: Uint8Array.of(0xe9, 0, 0, 0, 0),
    opcode: 'E9 cd',
    operands: 'rel32, relative to the next instruction',
    effect: { kind: 'jump', displacement: 4 },
    privilege: 'any',
    immediate: { offset: 1, size: 4, signed: true },
    description: 'RIP ← RIP + 5 + rel32',
  },
  'call rel32': {
    bytes: Uint8Array.of(0xe8, 0, 0, 0, 0),
    opcode: 'E8 cd',
    operands: 'rel32, relative to the next instruction',
    effect: { kind: 'call', displacement: 4 },
    privilege: 'any',
    immediate: { offset: 1, size: 4, signed: true },
    memory: { access: 'write', size: 8, address: 'rsp-8' },
    description: 'push RIP + 5; RIP ← RIP + 5 + rel32',
  },
  ret: {
    bytes: Uint8Array.of(0xc3),
    opcode: 'C3',
    operands: 'none (near return)',
    effect: { kind: 'ret' },
    privilege: 'any',
    memory: { access: 'read', size: 8, address: 'rsp' },
    description: 'pop RIP',
  },
  hlt: {
    bytes: Uint8Array.of(0xf4),
    opcode: 'F4',
    operands: 'none',
    effect: { kind: 'hlt' },
    privilege: 'cpl0-gp',
    vmExit: { reason: 12, name: 'HLT', when: '"HLT exiting" control = 1' },
    description: 'halt until an interrupt',
  },
  ud2: {
    bytes: Uint8Array.of(0x0f, 0x0b),
    opcode: '0F 0B',
    operands: 'none',
    effect: { kind: 'undefined' },
    privilege: 'any',
    description: 'raise #UD',
  },
};

/** Every instruction, in declaration order. */
export const INSTRUCTIONS: readonly InstructionEntry[] = Object.entries(DEFS).map(([name, d]) =>
  Object.freeze({ ...d, name: name as InstructionName, length: d.bytes.length }),
);

const BY_NAME = new Map<string, InstructionEntry>(INSTRUCTIONS.map((e) => [e.name, e]));

export function instruction(name: InstructionName): InstructionEntry {
  const e = BY_NAME.get(name);
  if (!e) throw new X86Error('unknown-instruction', `no instruction named ${JSON.stringify(name)}`);
  return e;
}

export function isInstructionName(name: string): name is InstructionName {
  return BY_NAME.has(name);
}

/**
 * A fresh copy of the encoding with `immediate` filled in (little-endian). Instructions with an
 * immediate field require one; others refuse one.
 */
export function encodeInstruction(name: InstructionName, immediate?: bigint | number): Uint8Array {
  const e = instruction(name);
  const out = new Uint8Array(e.bytes);
  const f = e.immediate;
  if (!f) {
    if (immediate !== undefined) throw new X86Error('invalid-argument', `${name} has no immediate`);
    return out;
  }
  if (immediate === undefined) throw new X86Error('invalid-argument', `${name} needs an immediate`);
  const v = BigInt(immediate);
  const bits = BigInt(f.size * 8);
  const min = f.signed ? -(1n << (bits - 1n)) : 0n;
  const max = f.signed ? (1n << (bits - 1n)) - 1n : (1n << bits) - 1n;
  if (v < min || v > max) {
    throw new X86Error('invalid-argument', `${name}: immediate ${v} does not fit ${f.signed ? 'signed' : 'unsigned'} ${bits} bits`);
  }
  let u = BigInt.asUintN(Number(bits), v);
  for (let i = 0; i < f.size; i++) {
    out[f.offset + i] = Number(u & 0xffn);
    u >>= 8n;
  }
  return out;
}

/** The displacement a relative branch at `at` of `length` bytes needs to reach `target`. */
export function branchDisplacement(at: bigint, length: number, target: bigint): bigint {
  return BigInt.asIntN(64, target - (at + BigInt(length)));
}

export interface PlacedInstruction {
  readonly entry: InstructionEntry;
  readonly gpa: bigint;
  readonly bytes: Uint8Array;
  readonly length: number;
  /** `gpa + length`: where the next instruction goes. */
  readonly next: bigint;
}

/** Write an instruction into guest RAM at `gpa`. */
export function placeInstruction(ram: GuestRam, gpa: bigint, name: InstructionName, immediate?: bigint | number): PlacedInstruction {
  const entry = instruction(name);
  const bytes = encodeInstruction(name, immediate);
  ram.write(gpa, bytes);
  return { entry, gpa, bytes, length: bytes.length, next: gpa + BigInt(bytes.length) };
}

export interface MatchedInstruction {
  readonly entry: InstructionEntry;
  /** The immediate, sign-extended for displacements. */
  readonly immediate?: bigint;
}

/**
 * Identify the table instruction at the start of `code` by its fixed bytes (a table lookup, not a
 * general decoder: anything not in the table is undefined, as is a truncated encoding).
 */
export function matchInstruction(code: Uint8Array): MatchedInstruction | undefined {
  for (const e of INSTRUCTIONS) {
    if (code.length < e.length) continue;
    const fixed = e.immediate ? e.immediate.offset : e.length;
    let same = true;
    for (let i = 0; i < fixed; i++) {
      if (code[i] !== e.bytes[i]) {
        same = false;
        break;
      }
    }
    if (!same) continue;
    const f = e.immediate;
    if (!f) return { entry: e };
    let v = 0n;
    for (let i = f.size - 1; i >= 0; i--) v = (v << 8n) | BigInt(code[f.offset + i]!);
    return { entry: e, immediate: f.signed ? BigInt.asIntN(f.size * 8, v) : v };
  }
  return undefined;
}
