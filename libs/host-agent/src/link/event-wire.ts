/**
 * Hand encoder for the ask-central path: a held vCPU event frame → `LinkRequest { stream_seq,
 * event_batch { events: [KvmiEvent] } }`, written straight from the frame's bytes into a reused
 * `PbWriter`. No `decodeEvent`, no `KvmiEvent` object, no bigint: every u64 is read as two u32 halves.
 *
 * Frame offsets come from the kvmi struct layouts (`@periscope/kvmi` structs — the one source of truth);
 * field numbers are those of protos/periscope/v1/agent.proto and kvmi.proto. A test decodes the output
 * with the generated `LinkRequest.decode` and compares it with `eventFromFrame` (the object path, still
 * used off the vCPU path for detections and `withEvent` reports).
 */
import { events, structs, type EventKey } from '@periscope/kvmi';
import { LINK_REQUEST, PbWriter, WIRE_VARINT } from './wire.js';

const S = structs;
const MSG_HDR = 8;
const EVENT_HDR = S.kvmi_event_hdr.size;
const VCPU_EVENT = MSG_HDR + EVENT_HDR;
const ARCH = VCPU_EVENT + S.kvmi_vcpu_event.field('arch').offset;
const VCPU_OFF = VCPU_EVENT + S.kvmi_vcpu_event.field('vcpu').offset;
const MODE_OFF = ARCH + S.kvmi_vcpu_event_arch.field('mode').offset;
const REGS = ARCH + S.kvmi_vcpu_event_arch.field('regs').offset;
const SREGS = ARCH + S.kvmi_vcpu_event_arch.field('sregs').offset;
const MSRS = ARCH + S.kvmi_vcpu_event_arch.field('msrs').offset;

/** `Registers` field numbers 1..18, in proto order. */
const REG_OFFSETS = (['rax', 'rbx', 'rcx', 'rdx', 'rsi', 'rdi', 'rsp', 'rbp', 'r8', 'r9', 'r10', 'r11', 'r12', 'r13', 'r14', 'r15', 'rip', 'rflags'] as const).map(
  (n) => REGS + S.kvm_regs.field(n).offset,
);
/** `EventMsrs` field numbers 1..9. */
const MSR_OFFSETS = (['sysenter_cs', 'sysenter_esp', 'sysenter_eip', 'efer', 'star', 'lstar', 'cstar', 'pat', 'shadow_gs'] as const).map(
  (n) => MSRS + S.kvmi_vcpu_event_arch_msrs.field(n).offset,
);
/** `SpecialRegisters`: segments 1..8, gdt 9, idt 10, cr0.. apic_base 11..17, interrupt_bitmap 18. */
const SEGMENTS = (['cs', 'ds', 'es', 'fs', 'gs', 'ss', 'tr', 'ldt'] as const).map((n) => SREGS + S.kvm_sregs.field(n).offset);
const DTABLES = (['gdt', 'idt'] as const).map((n) => SREGS + S.kvm_sregs.field(n).offset);
const SREG_U64 = (['cr0', 'cr2', 'cr3', 'cr4', 'cr8', 'efer', 'apic_base'] as const).map((n) => SREGS + S.kvm_sregs.field(n).offset);
const IRQ_BITMAP = SREGS + S.kvm_sregs.field('interrupt_bitmap').offset;
const IRQ_WORDS = S.kvm_sregs.field('interrupt_bitmap').size / 8;
const SEG = {
  base: S.kvm_segment.field('base').offset,
  limit: S.kvm_segment.field('limit').offset,
  selector: S.kvm_segment.field('selector').offset,
  /** type, present, dpl, db, s, l, g, avl, unusable: u8 each → Segment fields 4..12 (present.. as bool). */
  bytes: (['type', 'present', 'dpl', 'db', 's', 'l', 'g', 'avl', 'unusable'] as const).map((n) => S.kvm_segment.field(n).offset),
};
const DT = { base: S.kvm_dtable.field('base').offset, limit: S.kvm_dtable.field('limit').offset };
/** Segment fields that are `bool` in the proto (the rest are uint32). */
const SEG_BOOL = [false, true, false, true, true, true, true, true, true];

type FieldKind = 'u8' | 'u32' | 'u64' | 'bool';
interface PayloadSpec {
  /** KvmiEvent oneof field number. */
  field: number;
  /** Proto field number, frame offset within the specific struct, how to read it. */
  fields: readonly (readonly [number, number, FieldKind])[];
}

const off = (layout: { field(n: string): { offset: number } }, n: string): number => layout.field(n).offset;
const PAYLOADS: Partial<Record<EventKey, PayloadSpec>> = {
  PAUSE: { field: 20, fields: [] },
  HYPERCALL: { field: 21, fields: [] },
  BREAKPOINT: { field: 22, fields: [[1, off(S.kvmi_vcpu_event_breakpoint, 'gpa'), 'u64'], [2, off(S.kvmi_vcpu_event_breakpoint, 'insn_len'), 'u8']] },
  CR: { field: 23, fields: [[1, off(S.kvmi_vcpu_event_cr, 'cr'), 'u8'], [2, off(S.kvmi_vcpu_event_cr, 'old_value'), 'u64'], [3, off(S.kvmi_vcpu_event_cr, 'new_value'), 'u64']] },
  TRAP: { field: 24, fields: [[1, off(S.kvmi_vcpu_event_trap, 'nr'), 'u8'], [2, off(S.kvmi_vcpu_event_trap, 'error_code'), 'u32'], [3, off(S.kvmi_vcpu_event_trap, 'address'), 'u64']] },
  XSETBV: { field: 25, fields: [[1, off(S.kvmi_vcpu_event_xsetbv, 'xcr'), 'u8'], [2, off(S.kvmi_vcpu_event_xsetbv, 'old_value'), 'u64'], [3, off(S.kvmi_vcpu_event_xsetbv, 'new_value'), 'u64']] },
  DESCRIPTOR: { field: 26, fields: [[1, off(S.kvmi_vcpu_event_descriptor, 'descriptor'), 'u8'], [2, off(S.kvmi_vcpu_event_descriptor, 'write'), 'bool']] },
  MSR: { field: 27, fields: [[1, off(S.kvmi_vcpu_event_msr, 'msr'), 'u32'], [2, off(S.kvmi_vcpu_event_msr, 'old_value'), 'u64'], [3, off(S.kvmi_vcpu_event_msr, 'new_value'), 'u64']] },
  PF: { field: 28, fields: [[1, off(S.kvmi_vcpu_event_pf, 'gva'), 'u64'], [2, off(S.kvmi_vcpu_event_pf, 'gpa'), 'u64'], [3, off(S.kvmi_vcpu_event_pf, 'access'), 'u8']] },
  SINGLESTEP: { field: 29, fields: [[1, off(S.kvmi_vcpu_event_singlestep, 'failed'), 'bool']] },
};
const PAYLOAD_BY_ID = new Map<number, PayloadSpec>();
for (const key of Object.keys(PAYLOADS) as EventKey[]) PAYLOAD_BY_ID.set(events[key].id, PAYLOADS[key]!);

/** KvmiEvent field numbers. */
const EV = { hostId: 1, vmUuid: 2, generation: 3, vcpu: 4, seq: 5, received: 6, replied: 7, disposition: 8, deadline: 9, ruleId: 10, policyVersion: 11, mode: 12, regs: 13, sregs: 14, msrs: 15 } as const;

/** What the frame does not say. Unix-ns values are numbers (integral floats above 2^53, as in wire.ts). */
export interface HeldEventMeta {
  streamSeq: number;
  hostId: string;
  vmUuid: Buffer;
  sessionGeneration: number;
  receivedUnixNs: number;
  verdictDeadlineUnixNs: number;
  disposition: number;
  ruleId: string;
  policyVersion: number;
}

function u64(w: PbWriter, field: number, b: Buffer, at: number): void {
  const lo = b.readUInt32LE(at);
  const hi = b.readUInt32LE(at + 4);
  if (lo === 0 && hi === 0) return;
  w.tag(field, WIRE_VARINT);
  w.varint64(lo, hi);
}

function segment(w: PbWriter, field: number, b: Buffer, at: number): void {
  const m = w.beginLen(field);
  u64(w, 1, b, at + SEG.base);
  w.uint(2, b.readUInt32LE(at + SEG.limit));
  w.uint(3, b.readUInt16LE(at + SEG.selector));
  for (let i = 0; i < SEG.bytes.length; i++) {
    const v = b[at + SEG.bytes[i]!]!;
    w.uint(4 + i, SEG_BOOL[i] ? (v !== 0 ? 1 : 0) : v);
  }
  w.endLen(m);
}

/** True when `writeHeldEventRequest` can encode events of this id. */
export function heldEventEncodable(eventId: number): boolean {
  return PAYLOAD_BY_ID.has(eventId);
}

/**
 * Write one `LinkRequest` carrying the event of `frame` (a whole vCPU event frame, header included, as
 * `VcpuEventView.frame`) into `w` (reset first). Returns false for a frame this encoder does not know.
 */
export function writeHeldEventRequest(w: PbWriter, frame: Buffer, eventId: number, specificOffset: number, meta: HeldEventMeta): boolean {
  const payload = PAYLOAD_BY_ID.get(eventId);
  if (!payload || frame.length < MSRS + S.kvmi_vcpu_event_arch_msrs.size) return false;
  w.reset();
  w.uint(LINK_REQUEST.streamSeq, meta.streamSeq);
  const batch = w.beginLen(LINK_REQUEST.eventBatch);
  const ev = w.beginLen(1);
  w.string(EV.hostId, meta.hostId);
  w.bytes(EV.vmUuid, meta.vmUuid);
  w.uint(EV.generation, meta.sessionGeneration);
  w.uint(EV.vcpu, frame.readUInt16LE(VCPU_OFF));
  w.uint(EV.seq, frame.readUInt32LE(4));
  w.uint(EV.received, meta.receivedUnixNs);
  w.uint(EV.disposition, meta.disposition);
  w.uint(EV.deadline, meta.verdictDeadlineUnixNs);
  w.string(EV.ruleId, meta.ruleId);
  w.uint(EV.policyVersion, meta.policyVersion);
  const mode = frame[MODE_OFF]!;
  w.uint(EV.mode, mode === 2 || mode === 4 || mode === 8 ? mode : 0);
  let m = w.beginLen(EV.regs);
  for (let i = 0; i < REG_OFFSETS.length; i++) u64(w, i + 1, frame, REG_OFFSETS[i]!);
  w.endLen(m);
  m = w.beginLen(EV.sregs);
  for (let i = 0; i < SEGMENTS.length; i++) segment(w, i + 1, frame, SEGMENTS[i]!);
  for (let i = 0; i < DTABLES.length; i++) {
    const d = w.beginLen(9 + i);
    u64(w, 1, frame, DTABLES[i]! + DT.base);
    w.uint(2, frame.readUInt16LE(DTABLES[i]! + DT.limit));
    w.endLen(d);
  }
  for (let i = 0; i < SREG_U64.length; i++) u64(w, 11 + i, frame, SREG_U64[i]!);
  const irq = w.beginLen(18); // packed repeated uint64
  for (let i = 0; i < IRQ_WORDS; i++) w.varint64(frame.readUInt32LE(IRQ_BITMAP + i * 8), frame.readUInt32LE(IRQ_BITMAP + i * 8 + 4));
  w.endLen(irq);
  w.endLen(m);
  m = w.beginLen(EV.msrs);
  for (let i = 0; i < MSR_OFFSETS.length; i++) u64(w, i + 1, frame, MSR_OFFSETS[i]!);
  w.endLen(m);
  m = w.beginLen(payload.field);
  for (const [field, at, kind] of payload.fields) {
    const p = specificOffset + at;
    if (kind === 'u64') u64(w, field, frame, p);
    else if (kind === 'u32') w.uint(field, frame.readUInt32LE(p));
    else if (kind === 'bool') w.uint(field, frame[p] !== 0 ? 1 : 0);
    else w.uint(field, frame[p]!);
  }
  w.endLen(m);
  w.endLen(ev);
  w.endLen(batch);
  return true;
}
