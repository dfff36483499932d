/**
 * The instruction table against an independent, hand-written hex transcription (from the Intel SDM
 * Vol. 2 opcode tables). Every table entry must appear here: adding an instruction means writing its
 * bytes a second time, independently.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  GuestRam,
  INSTRUCTIONS,
  X86Error,
  branchDisplacement,
  encodeInstruction,
  instruction,
  isInstructionName,
  matchInstruction,
  placeInstruction,
  type InstructionName,
} from '../src/index.js';
import { scratchRam } from './support/ram.js';

const HEX: Record<InstructionName, string> = {
  'mov [rdi], rax': '48 89 07',
  'mov [rdi], eax': '89 07',
  'mov [rdi], ax': '66 89 07',
  'mov [rdi], al': '88 07',
  'rep movsb': 'f3 a4',
  'mov rax, [rdi]': '48 8b 07',
  'mov rax, imm64': '48 b8 00 00 00 00 00 00 00 00',
  'mov rdi, imm64': '48 bf 00 00 00 00 00 00 00 00',
  'mov rbx, imm64': '48 bb 00 00 00 00 00 00 00 00',
  'mov rcx, imm64': '48 b9 00 00 00 00 00 00 00 00',
  'mov rdx, imm64': '48 ba 00 00 00 00 00 00 00 00',
  'mov eax, imm32': 'b8 00 00 00 00',
  'mov ecx, imm32': 'b9 00 00 00 00',
  'mov edx, imm32': 'ba 00 00 00 00',
  wrmsr: '0f 30',
  rdmsr: '0f 32',
  'mov cr0, rax': '0f 22 c0',
  'mov cr3, rax': '0f 22 d8',
  'mov cr4, rax': '0f 22 e0',
  'mov rax, cr0': '0f 20 c0',
  'mov rax, cr3': '0f 20 d8',
  'mov rax, cr4': '0f 20 e0',
  'lgdt [rax]': '0f 01 10',
  'lidt [rax]': '0f 01 18',
  'sgdt [rax]': '0f 01 00',
  'sidt [rax]': '0f 01 08',
  'lldt ax': '0f 00 d0',
  'ltr ax': '0f 00 d8',
  int3: 'cc',
  vmcall: '0f 01 c1',
  syscall: '0f 05',
  xsetbv: '0f 01 d1',
  xgetbv: '0f 01 d0',
  stac: '0f 01 cb',
  clac: '0f 01 ca',
  nop: '90',
  'jmp rel8': 'eb 00',
  'jmp rel32': 'e9 00 00 00 00',
  'call rel32': 'e8 00 00 00 00',
  ret: 'c3',
  hlt: 'f4',
  ud2: '0f 0b',
};
const hex = (b: Uint8Array): string => [...b].map((x) => x.toString(16).padStart(2, '0')).join(' ');

function code(fn: () => unknown): string {
  try {
    fn();
  } catch (e) {
    if (e instanceof X86Error) return e.code;
    throw e;
  }
  return 'no error';
}

describe('instruction table', () => {
  it('every entry: length = bytes.length and the bytes equal the independent transcription', () => {
    expect(INSTRUCTIONS.map((e) => e.name).sort()).toEqual(Object.keys(HEX).sort());
    for (const e of INSTRUCTIONS) {
      expect(e.length, e.name).toBe(e.bytes.length);
      expect(hex(e.bytes), e.name).toBe(HEX[e.name]);
    }
  });

  it('the brief’s ground truths', () => {
    expect([hex(instruction('mov [rdi], rax').bytes), instruction('mov [rdi], rax').length]).toEqual(['48 89 07', 3]);
    expect([hex(instruction('wrmsr').bytes), instruction('wrmsr').length]).toEqual(['0f 30', 2]);
    expect([hex(instruction('mov cr0, rax').bytes), instruction('mov cr0, rax').length]).toEqual(['0f 22 c0', 3]);
    expect(hex(instruction('mov cr3, rax').bytes)).toBe('0f 22 d8');
    expect(hex(instruction('mov cr4, rax').bytes)).toBe('0f 22 e0');
    expect([hex(instruction('lidt [rax]').bytes), instruction('lidt [rax]').length]).toEqual(['0f 01 18', 3]);
    expect(hex(instruction('lgdt [rax]').bytes)).toBe('0f 01 10');
    expect([hex(instruction('int3').bytes), instruction('int3').length]).toEqual(['cc', 1]);
    expect([hex(instruction('vmcall').bytes), instruction('vmcall').length]).toEqual(['0f 01 c1', 3]);
    expect([hex(instruction('xsetbv').bytes), instruction('xsetbv').length]).toEqual(['0f 01 d1', 3]);
    expect(hex(instruction('nop').bytes)).toBe('90');
    expect([instruction('jmp rel32').length, instruction('call rel32').length]).toEqual([5, 5]);
    // 4- and 2-byte stores, the string move, SYSCALL (SDM Vol. 2: 89 /r; 66 prefix; F3 A4; 0F 05).
    expect([hex(instruction('mov [rdi], eax').bytes), instruction('mov [rdi], eax').length]).toEqual(['89 07', 2]);
    expect([hex(instruction('mov [rdi], ax').bytes), instruction('mov [rdi], ax').length]).toEqual(['66 89 07', 3]);
    expect([hex(instruction('rep movsb').bytes), instruction('rep movsb').length]).toEqual(['f3 a4', 2]);
    expect([hex(instruction('syscall').bytes), instruction('syscall').length]).toEqual(['0f 05', 2]);
  });

  it('ModR/M fields of the CR and descriptor-table forms decode to the documented registers', () => {
    const modrm = (name: InstructionName): [number, number, number] => {
      const m = instruction(name).bytes[2]!;
      return [m >> 6, (m >> 3) & 7, m & 7];
    };
    expect(modrm('mov cr0, rax')).toEqual([3, 0, 0]);
    expect(modrm('mov cr3, rax')).toEqual([3, 3, 0]);
    expect(modrm('mov cr4, rax')).toEqual([3, 4, 0]);
    expect(modrm('lgdt [rax]')).toEqual([0, 2, 0]);
    expect(modrm('lidt [rax]')).toEqual([0, 3, 0]);
    expect(modrm('sgdt [rax]')).toEqual([0, 0, 0]);
    expect(modrm('sidt [rax]')).toEqual([0, 1, 0]);
    expect(modrm('mov [rdi], rax')).toEqual([0, 0, 7]);
  });

  it('semantics, privilege and exits are consistent', () => {
    for (const e of INSTRUCTIONS) {
      if (e.effect.kind === 'store') expect(e.memory).toEqual({ access: 'write', size: e.effect.size, address: 'rdi' });
      if (e.effect.kind === 'load') expect(e.memory?.access).toBe('read');
      if (e.effect.kind === 'load-dtr') expect(e.memory).toEqual({ access: 'read', size: 10, address: 'rax' });
      if (e.effect.kind === 'store-dtr') expect(e.memory).toEqual({ access: 'write', size: 10, address: 'rax' });
      if (e.immediate) expect(e.immediate.offset + e.immediate.size).toBe(e.length);
      expect(e.description.length).toBeGreaterThan(0);
      expect(e.operands.length).toBeGreaterThan(0);
    }
    expect(instruction('wrmsr')).toMatchObject({ privilege: 'cpl0-gp', vmExit: { reason: 32 } });
    expect(instruction('rdmsr')).toMatchObject({ privilege: 'cpl0-gp', vmExit: { reason: 31 } });
    expect(instruction('mov cr4, rax')).toMatchObject({ effect: { kind: 'mov-to-cr', cr: 4 }, vmExit: { reason: 28 } });
    expect(instruction('lidt [rax]')).toMatchObject({ effect: { kind: 'load-dtr', table: 'idtr' }, vmExit: { reason: 46 } });
    expect(instruction('ltr ax').vmExit?.reason).toBe(47);
    expect(instruction('vmcall')).toMatchObject({ privilege: 'any', vmExit: { reason: 18 } });
    expect(instruction('xsetbv').vmExit?.reason).toBe(55);
    expect(instruction('int3').vmExit?.reason).toBe(0);
    expect(instruction('hlt').vmExit?.reason).toBe(12);
    expect(instruction('stac').privilege).toBe('cpl0-ud');
    expect(instruction('sidt [rax]').privilege).toBe('cpl0-gp-if-umip');
    expect(instruction('call rel32').memory).toEqual({ access: 'write', size: 8, address: 'rsp-8' });
    expect(instruction('ret').memory).toEqual({ access: 'read', size: 8, address: 'rsp' });
    expect(instruction('rep movsb')).toMatchObject({
      effect: { kind: 'rep-movs', size: 1 },
      memory: { access: 'write', size: 1, address: 'rdi' },
      source: { access: 'read', size: 1, address: 'rsi' },
    });
    expect(instruction('syscall')).toMatchObject({ effect: { kind: 'syscall' }, privilege: 'any' });
    expect(instruction('syscall').vmExit).toBeUndefined();
    expect(isInstructionName('nop')).toBe(true);
    expect(isInstructionName('mov cr8, rax')).toBe(false);
    expect(code(() => instruction('bogus' as InstructionName))).toBe('unknown-instruction');
  });

  it('immediates are little-endian, range-checked, signed for displacements', () => {
    expect(hex(encodeInstruction('jmp rel32', -5))).toBe('e9 fb ff ff ff');
    expect(hex(encodeInstruction('jmp rel8', -2))).toBe('eb fe');
    expect(hex(encodeInstruction('call rel32', 0x1234_5678))).toBe('e8 78 56 34 12');
    expect(hex(encodeInstruction('mov ecx, imm32', 0xc000_0082))).toBe('b9 82 00 00 c0');
    expect(hex(encodeInstruction('mov rax, imm64', 0xffff_ffff_ffef_ffffn))).toBe('48 b8 ff ff ef ff ff ff ff ff');
    expect(hex(encodeInstruction('mov rdi, imm64', 0x1122_3344_5566_7788n))).toBe('48 bf 88 77 66 55 44 33 22 11');
    expect(hex(encodeInstruction('jmp rel32', 2 ** 31 - 1))).toBe('e9 ff ff ff 7f');
    expect(hex(encodeInstruction('jmp rel32', -(2 ** 31)))).toBe('e9 00 00 00 80');
    expect(code(() => encodeInstruction('jmp rel32', 2 ** 31))).toBe('invalid-argument');
    expect(code(() => encodeInstruction('jmp rel8', 128))).toBe('invalid-argument');
    expect(code(() => encodeInstruction('jmp rel8', -129))).toBe('invalid-argument');
    expect(code(() => encodeInstruction('mov ecx, imm32', -1))).toBe('invalid-argument');
    expect(code(() => encodeInstruction('mov ecx, imm32', 2 ** 32))).toBe('invalid-argument');
    expect(code(() => encodeInstruction('mov rax, imm64', 1n << 64n))).toBe('invalid-argument');
    expect(code(() => encodeInstruction('jmp rel32'))).toBe('invalid-argument');
    expect(code(() => encodeInstruction('nop', 1))).toBe('invalid-argument');
    // the table's own bytes are not touched by encoding
    expect(hex(instruction('jmp rel32').bytes)).toBe('e9 00 00 00 00');
    expect(branchDisplacement(0x1000n, 5, 0x1000n)).toBe(-5n);
    expect(branchDisplacement(0x1000n, 5, 0x2005n)).toBe(0x1000n);
  });

  it('matchInstruction identifies every entry and its immediate; fixed parts are unambiguous', () => {
    for (const e of INSTRUCTIONS) {
      const imm = e.immediate ? (e.immediate.signed ? -3n : 0x7bn) : undefined;
      const bytes = encodeInstruction(e.name, imm);
      const padded = new Uint8Array([...bytes, 0x90, 0xcc, 0x0f]);
      const m = matchInstruction(padded);
      expect(m?.entry.name, e.name).toBe(e.name);
      expect(m?.immediate).toBe(imm);
      // truncated encodings are not recognised as this instruction
      if (e.length > 1) expect(matchInstruction(bytes.subarray(0, e.length - 1))?.entry.name).not.toBe(e.name);
    }
    const fixed = INSTRUCTIONS.map((e) => hex(e.bytes.subarray(0, e.immediate ? e.immediate.offset : e.length)));
    for (let i = 0; i < fixed.length; i++) {
      for (let j = 0; j < fixed.length; j++) {
        if (i !== j) expect(fixed[j]!.startsWith(fixed[i]!), `${fixed[i]} prefixes ${fixed[j]}`).toBe(false);
      }
    }
    expect(matchInstruction(Uint8Array.of(0x0f, 0x07))).toBeUndefined(); // sysret: not in the table
    expect(matchInstruction(Uint8Array.of(0x66, 0x89, 0x0f))).toBeUndefined(); // mov [rdi], cx: not in the table
    expect(matchInstruction(new Uint8Array(0))).toBeUndefined();
  });
});

describe('placeInstruction', () => {
  let ram: GuestRam;
  let cleanup: () => void;
  beforeAll(() => {
    ({ ram, cleanup } = scratchRam(4n, [{ start: 3n, end: 4n }]));
  });
  afterAll(() => cleanup());

  it('writes a program into guest RAM that reads back and matches instruction by instruction', () => {
    let at = 0x1ff8n; // crosses into the next page
    const program: Array<[InstructionName, bigint | number | undefined]> = [
      ['mov ecx, imm32', 0xc000_0082],
      ['mov eax, imm32', 0x1000],
      ['mov edx, imm32', 0xffff_ffff],
      ['wrmsr', undefined],
      ['mov rax, imm64', 0x0000_0000_0010_06f0n],
      ['mov cr4, rax', undefined],
      ['int3', undefined],
      ['jmp rel8', -2],
    ];
    const placed = program.map(([name, imm]) => {
      const p = placeInstruction(ram, at, name, imm);
      expect(p.gpa).toBe(at);
      expect(p.next).toBe(at + BigInt(p.length));
      at = p.next;
      return p;
    });
    const image = ram.read(0x1ff8n, Number(at - 0x1ff8n));
    expect(hex(image)).toBe(
      'b9 82 00 00 c0 b8 00 10 00 00 ba ff ff ff ff 0f 30 48 b8 f0 06 10 00 00 00 00 00 0f 22 e0 cc eb fe',
    );
    let off = 0;
    for (const [i, p] of placed.entries()) {
      const m = matchInstruction(image.subarray(off));
      expect(m?.entry.name).toBe(program[i]![0]);
      off += p.length;
    }
    expect(code(() => placeInstruction(ram, 0x2ffen, 'vmcall'))).toBe('unbacked');
    expect(ram.read(0x2ffen, 2)).toEqual(new Uint8Array(2)); // nothing written
  });
});
