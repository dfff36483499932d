/**
 * "Skip the faulting instruction": the deny verdict for a PF write or a descriptor load.
 *
 * The bytes at RIP are fetched from the guest (TRANSLATE_GVA, then READ_PHYSICAL — two reads when the
 * 15-byte window crosses a page), decoded with iced-x86 in the event's mode, and the vCPU's registers
 * are set to the event's registers with RIP advanced by the decoded length (VCPU_SET_REGISTERS, which
 * KVM applies when the reply is processed); the reply is then RETRY. RETRY without moving RIP would
 * re-execute the same instruction forever, so a failure anywhere falls back to the caller's policy.
 */
import { Decoder, DecoderOptions, Formatter, FormatterSyntax } from 'iced-x86';
import { KVMI_INVALID_GPA, KvmiError, type KvmiSession, type structs } from '@periscope/kvmi';

type KvmRegs = structs.KvmRegs;

const MAX_INSN = 15;
const PAGE = 0x1000n;

export interface SkipResult {
  length: number;
  newRip: bigint;
}

/** Linear address of RIP: CS.base + RIP in legacy modes; RIP in 64-bit mode. */
function linearRip(mode: number, rip: bigint, csBase: bigint): bigint {
  return mode === 8 ? rip : (csBase + rip) & 0xffffffffn;
}

async function readGuestLinear(session: KvmiSession, vcpu: number, gva: bigint, length: number): Promise<Uint8Array> {
  const out = new Uint8Array(length);
  let done = 0;
  while (done < length) {
    const at = gva + BigInt(done);
    const inPage = Number(PAGE - (at & (PAGE - 1n)));
    const n = Math.min(length - done, inPage);
    const { gpa } = await session.request('VCPU_TRANSLATE_GVA', { vcpu, gva: at });
    if (gpa === KVMI_INVALID_GPA) {
      if (done > 0) return out.subarray(0, done); // the instruction may end before the unmapped page
      throw new KvmiError('bad-value', `RIP ${at.toString(16)} does not translate`, false);
    }
    const { data } = await session.request('VM_READ_PHYSICAL', { gpa, size: n });
    out.set(data, done);
    done += n;
  }
  return out;
}

/**
 * Decode the instruction at the event's RIP and queue SET_REGISTERS with RIP *before* it by its length: for a
 * CR/MSR event answered CONTINUE, KVM completes the exit by adding the instruction's length to RIP (VMX
 * VM_EXIT_INSTRUCTION_LEN; the simulator the same), so the vCPU resumes at the instruction and an injected
 * exception is delivered there, as a fault. (AMD's next_rip would land after it: the exception then follows
 * the instruction; docs/alerts.md.)
 */
export async function rewindInstruction(session: KvmiSession, vcpu: number, mode: number, regs: KvmRegs, csBase: bigint): Promise<SkipResult> {
  return moveRip(session, vcpu, mode, regs, csBase, -1n);
}

/** Decode the instruction at the event's RIP and queue SET_REGISTERS with RIP past it. */
export async function skipInstruction(session: KvmiSession, vcpu: number, mode: number, regs: KvmRegs, csBase: bigint): Promise<SkipResult> {
  return moveRip(session, vcpu, mode, regs, csBase, 1n);
}

async function moveRip(
  session: KvmiSession,
  vcpu: number,
  mode: number,
  regs: KvmRegs,
  csBase: bigint,
  direction: 1n | -1n,
): Promise<SkipResult> {
  const bitness = mode === 8 ? 64 : mode === 4 ? 32 : 16;
  const bytes = await readGuestLinear(session, vcpu, linearRip(mode, regs.rip, csBase), MAX_INSN);
  const decoder = new Decoder(bitness, bytes, DecoderOptions.None);
  let length = 0;
  try {
    decoder.ip = regs.rip;
    const insn = decoder.decode();
    try {
      if (insn.isInvalid) throw new KvmiError('bad-value', `no valid instruction at RIP ${regs.rip.toString(16)}`, false);
      length = insn.length;
    } finally {
      insn.free();
    }
  } finally {
    decoder.free();
  }
  const mask = mode === 8 ? 0xffffffffffffffffn : 0xffffffffn;
  const newRip = (regs.rip + direction * BigInt(length)) & mask;
  await session.request('VCPU_SET_REGISTERS', { vcpu, ...regs, rip: newRip });
  return { length, newRip };
}

export interface InstructionAt {
  /** The instruction's bytes (up to 15; fewer when it could not be decoded). */
  bytes: Uint8Array;
  /** Intel syntax (nasm flavour), e.g. `mov cr4,rax`; empty when the bytes do not decode. */
  text: string;
}

/**
 * Read and decode the instruction at a guest RIP (detection evidence). Runs after the event's reply, off
 * the vCPU's stall path; the caller bounds it with a timeout.
 */
export async function readInstructionAt(session: KvmiSession, vcpu: number, mode: number, rip: bigint, csBase: bigint): Promise<InstructionAt> {
  const bitness = mode === 8 ? 64 : mode === 4 ? 32 : 16;
  const window = await readGuestLinear(session, vcpu, linearRip(mode, rip, csBase), MAX_INSN);
  const decoder = new Decoder(bitness, window, DecoderOptions.None);
  try {
    decoder.ip = rip;
    const insn = decoder.decode();
    try {
      if (insn.isInvalid) return { bytes: window, text: '' };
      const formatter = new Formatter(FormatterSyntax.Nasm);
      try {
        return { bytes: window.slice(0, insn.length), text: formatter.format(insn) };
      } finally {
        formatter.free();
      }
    } finally {
      insn.free();
    }
  } finally {
    decoder.free();
  }
}
