/**
 * Raw reads from a KVMI vCPU event frame, as u32 halves, with every offset derived from the struct
 * layouts of `@periscope/kvmi` (never a hard-coded number).
 *
 * Why not `VcpuEventView.reg()/specificU64()`: each returns a heap `bigint` (30–56 bytes per read, see
 * docs/benchmarks.md). The evaluator compares 64-bit values as two u32 halves instead, read here.
 */
import {
  EVENT_HDR_SIZE,
  KVMI_MSG_HDR_SIZE,
  events,
  structs as S,
  type Layout,
  type VcpuEventView,
} from '@periscope/kvmi';
import type { RegisterName, VcpuEventKind } from './model.js';

const ARCH_AT = KVMI_MSG_HDR_SIZE + EVENT_HDR_SIZE + S.kvmi_vcpu_event.field('arch').offset;
/** Absolute offset of `kvmi_vcpu_event_arch.mode` in a frame. */
export const MODE_OFFSET = ARCH_AT + S.kvmi_vcpu_event_arch.field('mode').offset;
const REGS_AT = ARCH_AT + S.kvmi_vcpu_event_arch.field('regs').offset;

/** Absolute offset of a `kvm_regs` field (a u64) in a frame. */
export function registerOffset(name: RegisterName): number {
  const f = S.kvm_regs.field(name);
  if (f.size !== 8) throw new TypeError(`kvm_regs.${name} is not a u64`);
  return REGS_AT + f.offset;
}
export const RIP_OFFSET = registerOffset('rip');

/** Offset (relative to the event-specific struct) and size of one payload field. */
export interface FieldAt {
  readonly offset: number;
  readonly size: number;
}

function fieldAt(layout: Layout<unknown>, name: string, sizes: readonly number[]): FieldAt {
  const f = layout.field(name);
  if (!sizes.includes(f.size)) throw new TypeError(`${layout.name}.${name}: size ${f.size}, expected ${sizes.join('/')}`);
  return { offset: f.offset, size: f.size };
}

/**
 * Which payload fields of each event kind the matcher reads, in four generic slots:
 * `index` (the CR / MSR / XCR / descriptor / vector the event is about), `a` and `b` (64-bit values:
 * old/new, gva/gpa, address), `c` (a small scalar: access bits, write flag, failed flag, error code).
 */
export interface KindFields {
  readonly index: FieldAt | null;
  readonly a: FieldAt | null;
  readonly b: FieldAt | null;
  readonly c: FieldAt | null;
}

const SMALL = [1, 2, 4] as const;
const U64 = [8] as const;

function kindFields(kind: VcpuEventKind): KindFields {
  const none: KindFields = { index: null, a: null, b: null, c: null };
  switch (kind) {
    case 'CR':
      return { index: fieldAt(S.kvmi_vcpu_event_cr, 'cr', SMALL), a: fieldAt(S.kvmi_vcpu_event_cr, 'old_value', U64), b: fieldAt(S.kvmi_vcpu_event_cr, 'new_value', U64), c: null };
    case 'MSR':
      return { index: fieldAt(S.kvmi_vcpu_event_msr, 'msr', SMALL), a: fieldAt(S.kvmi_vcpu_event_msr, 'old_value', U64), b: fieldAt(S.kvmi_vcpu_event_msr, 'new_value', U64), c: null };
    case 'XSETBV':
      return { index: fieldAt(S.kvmi_vcpu_event_xsetbv, 'xcr', SMALL), a: fieldAt(S.kvmi_vcpu_event_xsetbv, 'old_value', U64), b: fieldAt(S.kvmi_vcpu_event_xsetbv, 'new_value', U64), c: null };
    case 'PF':
      return { index: null, a: fieldAt(S.kvmi_vcpu_event_pf, 'gva', U64), b: fieldAt(S.kvmi_vcpu_event_pf, 'gpa', U64), c: fieldAt(S.kvmi_vcpu_event_pf, 'access', SMALL) };
    case 'BREAKPOINT':
      return { index: null, a: null, b: fieldAt(S.kvmi_vcpu_event_breakpoint, 'gpa', U64), c: null };
    case 'DESCRIPTOR':
      return { index: fieldAt(S.kvmi_vcpu_event_descriptor, 'descriptor', SMALL), a: null, b: null, c: fieldAt(S.kvmi_vcpu_event_descriptor, 'write', SMALL) };
    case 'TRAP':
      return { index: fieldAt(S.kvmi_vcpu_event_trap, 'nr', SMALL), a: fieldAt(S.kvmi_vcpu_event_trap, 'address', U64), b: null, c: fieldAt(S.kvmi_vcpu_event_trap, 'error_code', SMALL) };
    case 'SINGLESTEP':
      return { ...none, c: fieldAt(S.kvmi_vcpu_event_singlestep, 'failed', SMALL) };
    case 'PAUSE':
    case 'HYPERCALL':
      return none;
  }
}

/** Per event id (the wire's `kvmi_event_hdr.event`): the kind and its fields. */
export const FIELDS_BY_EVENT_ID: ReadonlyMap<number, { readonly kind: VcpuEventKind; readonly fields: KindFields }> = new Map(
  (Object.keys(events) as (keyof typeof events)[])
    .filter((k): k is VcpuEventKind => events[k].scope === 'vcpu')
    .map((k) => [events[k].id, { kind: k, fields: kindFields(k) }] as const),
);

/** Read a u8/u16 field, or a u32 field as int32 (so it stays a Smi; compare against `x | 0`). */
export function readSmall(frame: Buffer, at: number, size: number): number {
  return size === 1 ? frame[at]! : size === 2 ? frame.readUInt16LE(at) : frame.readInt32LE(at);
}

/** The frame a `VcpuEventView` currently points at (read in place as u32 halves, no bigints). */
export function frameOfView(view: VcpuEventView): Buffer {
  return view.frame;
}
