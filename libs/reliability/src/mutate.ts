/**
 * Structure-aware KVMI frame mutation. Field positions come from the KVMI library's struct layouts
 * (`structs.kvmi_msg_hdr`, `kvmi_vcpu_hdr`, `kvmi_event_hdr`) and message ids from its catalog, so the
 * mutations land on the fields a parser trusts (sizes, ids, sequence numbers, vCPU indexes, event ids)
 * as well as on payload bytes; a share of the output is raw garbage.
 *
 * Every mutator is a pure function of (frame, prng): a run is reproducible from its seed.
 */
import { commands, events, structs, KVMI_MAX_MESSAGE, KVMI_VCPU_EVENT, KVMI_VM_EVENT } from '@periscope/kvmi';
import { mulberry32 } from '@periscope/simulator';

/** A seeded generator returning floats in [0, 1). */
export type Prng = () => number;

export { mulberry32 };

const HDR = structs.kvmi_msg_hdr;
const HDR_SIZE = HDR.size;
const OFF_ID = HDR.field('id').offset;
const OFF_SIZE = HDR.field('size').offset;
const OFF_SEQ = HDR.field('seq').offset;
const VCPU_OFF = HDR_SIZE + structs.kvmi_vcpu_hdr.field('vcpu').offset;
const EVENT_OFF = HDR_SIZE + structs.kvmi_vcpu_hdr.size + structs.kvmi_event_hdr.field('event').offset;

/** Every message id the catalog knows (commands and events), and a few it does not. */
const KNOWN_IDS: readonly number[] = [...new Set([KVMI_VM_EVENT, KVMI_VCPU_EVENT, ...Object.values(commands).map((c) => c.id)])];
const EVENT_IDS: readonly number[] = Object.values(events).map((e) => e.id);
const INTERESTING16 = [0, 1, 0x7f, 0x80, 0xff, 0x100, 0x7fff, 0x8000, 0xfffe, 0xffff];
const INTERESTING32 = [0, 1, 0x7fffffff, 0x80000000, 0xfffffffe, 0xffffffff];

/** The name of each mutator, for statistics. */
export const MUTATORS = [
  'size-field',
  'id-known',
  'id-random',
  'seq',
  'vcpu',
  'event-id',
  'bit-flip',
  'byte-interesting',
  'truncate',
  'extend',
  'splice',
  'garbage',
] as const;
export type MutatorName = (typeof MUTATORS)[number];

function int(prng: Prng, n: number): number {
  return Math.floor(prng() * n);
}

function pick<T>(prng: Prng, xs: readonly T[]): T {
  return xs[int(prng, xs.length)]!;
}

/** Rewrite the header's size field to match the frame's body length (clamped to u16). */
export function fixSize(frame: Buffer): Buffer {
  if (frame.length >= HDR_SIZE) frame.writeUInt16LE(Math.min(0xffff, frame.length - HDR_SIZE), OFF_SIZE);
  return frame;
}

/**
 * Mutate one frame. Returns the bytes to send (a new buffer; the input is not changed) and the
 * mutator used. Mutations that keep the frame self-consistent (size field matching the body) are
 * preferred so that the peer parses past the header; some deliberately lie about the size.
 */
export function mutateFrame(frame: Buffer, prng: Prng, other?: Buffer): { bytes: Buffer; mutator: MutatorName } {
  const mutator = pick(prng, MUTATORS);
  const out = Buffer.from(frame);
  const canHdr = out.length >= HDR_SIZE;
  switch (mutator) {
    case 'size-field':
      if (canHdr) out.writeUInt16LE(prng() < 0.5 ? pick(prng, INTERESTING16) : int(prng, 0x10000), OFF_SIZE);
      return { bytes: out, mutator };
    case 'id-known':
      if (canHdr) out.writeUInt16LE(pick(prng, KNOWN_IDS), OFF_ID);
      return { bytes: out, mutator };
    case 'id-random':
      if (canHdr) out.writeUInt16LE(prng() < 0.5 ? pick(prng, INTERESTING16) : int(prng, 0x10000), OFF_ID);
      return { bytes: out, mutator };
    case 'seq':
      if (canHdr) out.writeUInt32LE(prng() < 0.5 ? pick(prng, INTERESTING32) : int(prng, 0x100000000), OFF_SEQ);
      return { bytes: out, mutator };
    case 'vcpu':
      if (out.length >= VCPU_OFF + 2) out.writeUInt16LE(pick(prng, INTERESTING16), VCPU_OFF);
      return { bytes: out, mutator };
    case 'event-id':
      if (out.length >= EVENT_OFF + 2) out.writeUInt16LE(prng() < 0.7 ? pick(prng, EVENT_IDS) : pick(prng, INTERESTING16), EVENT_OFF);
      return { bytes: out, mutator };
    case 'bit-flip': {
      const flips = 1 + int(prng, 8);
      for (let i = 0; i < flips && out.length > 0; i++) {
        const at = int(prng, out.length);
        out[at] = out[at]! ^ (1 << int(prng, 8));
      }
      return { bytes: out, mutator };
    }
    case 'byte-interesting': {
      if (out.length > HDR_SIZE) {
        const at = HDR_SIZE + int(prng, out.length - HDR_SIZE);
        out[at] = pick(prng, [0, 1, 0x7f, 0x80, 0xff]);
      }
      return { bytes: out, mutator };
    }
    case 'truncate': {
      const len = int(prng, out.length);
      const cut = Buffer.from(out.subarray(0, len));
      return { bytes: prng() < 0.5 ? fixSize(cut) : cut, mutator };
    }
    case 'extend': {
      const extra = Buffer.alloc(1 + int(prng, prng() < 0.9 ? 64 : KVMI_MAX_MESSAGE));
      for (let i = 0; i < extra.length; i++) extra[i] = int(prng, 256);
      const longer = Buffer.concat([out, extra]);
      return { bytes: prng() < 0.5 ? fixSize(longer) : longer, mutator };
    }
    case 'splice': {
      if (!other || other.length === 0) return { bytes: out, mutator };
      const at = int(prng, out.length + 1);
      const from = int(prng, other.length);
      const spliced = Buffer.concat([out.subarray(0, at), other.subarray(from)]);
      return { bytes: fixSize(spliced), mutator };
    }
    case 'garbage':
      return { bytes: garbage(prng), mutator };
  }
}

/** Raw garbage: random length (mostly short), random bytes, sometimes with a plausible header. */
export function garbage(prng: Prng): Buffer {
  const len = prng() < 0.8 ? int(prng, 64) : int(prng, KVMI_MAX_MESSAGE * 2);
  const out = Buffer.alloc(len);
  for (let i = 0; i < len; i++) out[i] = int(prng, 256);
  if (len >= HDR_SIZE && prng() < 0.5) fixSize(out);
  return out;
}

/** Mutate a QEMU handshake struct (struct_size, uuid, start_time, name) for handshake fuzzing. */
export function mutateHandshake(bytes: Buffer, prng: Prng): Buffer {
  const out = Buffer.from(bytes);
  const S = structs.kvmi_qemu2introspector;
  switch (int(prng, 5)) {
    case 0:
      out.writeUInt32LE(pick(prng, [0, 1, 4, 23, 24, 95, 96, 97, 103, 104, 105, 4096, 65536, 65537, 0xffffffff]), S.field('struct_size').offset);
      return out;
    case 1: {
      const name = S.field('name').offset;
      out.fill(0x41, name, Math.min(out.length, name + 64)); // no NUL terminator
      return out;
    }
    case 2:
      return Buffer.from(out.subarray(0, int(prng, out.length)));
    case 3: {
      for (let i = 0; i < 4; i++) {
        const at = int(prng, out.length);
        out[at] = int(prng, 256);
      }
      return out;
    }
    default:
      return garbage(prng);
  }
}
