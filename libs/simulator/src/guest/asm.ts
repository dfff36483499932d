/**
 * Assembling straight-line code from the `@periscope/x86` instruction table: the encodings and their
 * lengths are the table's hand-written ground truth (`encodeInstruction`), never a decoder's. Every
 * instruction's address is known before the code runs, so expectations can name RIPs exactly.
 */
import { branchDisplacement, encodeInstruction, instruction, X86Error, type InstructionName } from '@periscope/x86';

import { SimError } from '../errors.js';

export interface AsmInsn {
  readonly name: InstructionName;
  /** The immediate (register value, MSR index, …). */
  readonly imm?: bigint | number;
  /** For `jmp rel8/rel32` and `call rel32`: the absolute target (the displacement is computed). */
  readonly target?: bigint;
}

export interface AssembledInsn {
  readonly name: InstructionName;
  /** Linear address of the instruction. */
  readonly at: bigint;
  readonly length: number;
  readonly bytes: Uint8Array;
}

export interface Assembled {
  readonly at: bigint;
  readonly bytes: Uint8Array;
  readonly insns: readonly AssembledInsn[];
  /** `at + bytes.length`. */
  readonly end: bigint;
}

/** Lay `insns` out from linear address `at`. */
export function assemble(at: bigint, insns: readonly AsmInsn[]): Assembled {
  const out: AssembledInsn[] = [];
  let pc = at;
  for (const i of insns) {
    const e = instruction(i.name);
    let imm = i.imm;
    if (i.target !== undefined) {
      if (e.effect.kind !== 'jump' && e.effect.kind !== 'call') throw new SimError('invalid-argument', `${i.name} takes no branch target`);
      imm = branchDisplacement(pc, e.length, i.target);
    }
    let bytes: Uint8Array;
    try {
      bytes = e.immediate ? encodeInstruction(i.name, typeof imm === 'bigint' ? imm : BigInt(imm ?? 0)) : encodeInstruction(i.name);
    } catch (err) {
      if (err instanceof X86Error) throw new SimError('invalid-argument', `cannot assemble ${i.name} at 0x${pc.toString(16)}: ${err.message}`);
      throw err;
    }
    out.push({ name: i.name, at: pc, length: e.length, bytes });
    pc = BigInt.asUintN(64, pc + BigInt(e.length));
  }
  const bytes = new Uint8Array(out.reduce((n, i) => n + i.length, 0));
  let off = 0;
  for (const i of out) {
    bytes.set(i.bytes, off);
    off += i.length;
  }
  return { at, bytes, insns: out, end: pc };
}

/** Length of an instruction, from the table. */
export function insnLength(name: InstructionName): number {
  return instruction(name).length;
}
