/**
 * Encoding, decoding and validation of KVMI v12 messages, in both directions, derived from the catalog.
 *
 * Tool side (the host agent): encode commands, decode replies and events, encode event replies.
 * Kernel side (the simulator): validate and decode commands in the kernel's order, encode replies and
 * events, and check event replies exactly as KVM does (§2.2, §2.5, §5.3, §10).
 *
 * Every frame here is a whole message: the 8-byte `kvmi_msg_hdr` followed by `hdr.size` payload bytes.
 */
import {
  actionAllowed,
  commandDefById,
  commands,
  ERROR_CODE_SIZE,
  EVENT_HDR_SIZE,
  EVENT_REPLY_SIZE,
  EventAction,
  eventDefById,
  events,
  errnoName,
  KvmErrno,
  requiredPayload,
  VCPU_HDR_SIZE,
  type AnyCommandDef,
  type AnyEventDef,
  type CommandCheck,
  type CommandDef,
  type CommandKey,
  type EventActionName,
  type EventDef,
  type EventKey,
  type KvmErrnoName,
  type ReplyOf,
  type RequestOf,
  type TailSpec,
} from './catalog.js';
import {
  KVMI_MAX_MSG_SIZE,
  KVMI_MSG_HDR_SIZE,
  KVMI_VCPU_EVENT,
  KVMI_VCPU_EVENT_COMMON_SIZE,
  KVMI_VM_EVENT,
  isVcpuMessageId,
} from './constants.js';
import { KvmiError } from './errors.js';
import { frameId, frameSeq, frameSize, writeHeader } from './framing.js';
import { copyBytes, type Layout } from './layout.js';
import * as S from './structs.js';

// ---- header access: one set of helpers, in framing.ts ------------------------------------------

/** The payload view of a frame; checks that the header's size matches the bytes present. */
function payloadOf(frame: Buffer): Buffer {
  if (frame.length < KVMI_MSG_HDR_SIZE) throw new KvmiError('truncated', `frame of ${frame.length} bytes has no header`, true);
  const size = frameSize(frame);
  if (size > KVMI_MAX_MSG_SIZE) throw new KvmiError('message-too-large', `payload size ${size} > ${KVMI_MAX_MSG_SIZE}`, true);
  if (frame.length < KVMI_MSG_HDR_SIZE + size) {
    throw new KvmiError('truncated', `frame holds ${frame.length - KVMI_MSG_HDR_SIZE} of ${size} payload bytes`, true);
  }
  return frame.subarray(KVMI_MSG_HDR_SIZE, KVMI_MSG_HDR_SIZE + size);
}

function finish(payload: Buffer, id: number, seq: number): Buffer {
  if (payload.length > KVMI_MAX_MSG_SIZE) {
    throw new KvmiError('message-too-large', `payload of ${payload.length} bytes exceeds ${KVMI_MAX_MSG_SIZE}`, false);
  }
  const out = Buffer.allocUnsafe(KVMI_MSG_HDR_SIZE + payload.length);
  writeHeader(out, 0, id, payload.length, seq);
  payload.copy(out, KVMI_MSG_HDR_SIZE);
  return out;
}

// ---- tails ------------------------------------------------------------------------------------

function getPath(obj: Record<string, unknown>, path: string): unknown {
  let cur: unknown = obj;
  for (const part of path.split('.')) cur = (cur as Record<string, unknown>)[part];
  return cur;
}
function setPath(obj: Record<string, unknown>, path: string, value: unknown): void {
  const parts = path.split('.');
  let cur = obj;
  for (let i = 0; i < parts.length - 1; i++) cur = cur[parts[i]!] as Record<string, unknown>;
  cur[parts[parts.length - 1]!] = value;
}

function tailElemSize(t: TailSpec): number {
  return t.kind === 'bytes' ? 1 : t.kind === 'u32' ? 4 : t.layout.size;
}

function tailLength(t: TailSpec, value: unknown): number {
  if (t.kind === 'bytes') {
    if (!(value instanceof Uint8Array)) throw new KvmiError('bad-value', `${t.prop}: expected a Uint8Array`, false);
    return value.length;
  }
  if (!Array.isArray(value)) throw new KvmiError('bad-value', `${t.prop}: expected an array`, false);
  return value.length;
}

function writeTail(t: TailSpec, buf: Buffer, off: number, value: unknown): number {
  if (t.kind === 'bytes') {
    const v = value as Uint8Array;
    buf.set(v, off);
    return v.length;
  }
  const arr = value as unknown[];
  if (t.kind === 'u32') {
    arr.forEach((x, i) => {
      if (typeof x !== 'number' || !Number.isInteger(x) || x < 0 || x > 0xffffffff) {
        throw new KvmiError('bad-value', `${t.prop}[${i}]: expected a u32`, false);
      }
      buf.writeUInt32LE(x, off + 4 * i);
    });
    return 4 * arr.length;
  }
  arr.forEach((x, i) => t.layout.write(buf, off + i * t.layout.size, x));
  return arr.length * t.layout.size;
}

function readTail(t: TailSpec, buf: Buffer, off: number, count: number): unknown {
  if (t.kind === 'bytes') return copyBytes(buf, off, count);
  if (t.kind === 'u32') {
    const out = new Array<number>(count);
    for (let i = 0; i < count; i++) out[i] = buf.readUInt32LE(off + 4 * i);
    return out;
  }
  const out = new Array<unknown>(count);
  for (let i = 0; i < count; i++) out[i] = t.layout.read(buf, off + i * t.layout.size);
  return out;
}

// ---- typed inputs -----------------------------------------------------------------------------

export interface PageAccessEntry {
  gpa: bigint;
  access: number;
}
export interface MsrEntry {
  index: number;
  data: bigint;
}

type TailInput<K extends CommandKey> = K extends 'VM_WRITE_PHYSICAL'
  ? { data: Uint8Array }
  : K extends 'VM_SET_PAGE_ACCESS'
    ? { entries: PageAccessEntry[] }
    : K extends 'VCPU_GET_REGISTERS'
      ? { msrs_idx: number[] }
      : unknown;
type CountField<K extends CommandKey> = K extends 'VM_WRITE_PHYSICAL'
  ? 'size'
  : K extends 'VM_SET_PAGE_ACCESS'
    ? 'count'
    : K extends 'VCPU_GET_REGISTERS'
      ? 'nmsrs'
      : never;
type VcpuInput<K extends CommandKey> = (typeof commands)[K]['scope'] extends 'vcpu' ? { vcpu: number } : unknown;

/** What a tool passes to encode command K: its struct fields (count fields are derived), tail, vCPU. */
export type CommandInput<K extends CommandKey> = Omit<RequestOf<K>, CountField<K>> & TailInput<K> & VcpuInput<K>;

type ReplyTail<K extends CommandKey> = K extends 'VM_READ_PHYSICAL'
  ? { data: Uint8Array }
  : K extends 'VCPU_GET_REGISTERS'
    ? { msr_entries: MsrEntry[] }
    : unknown;
/** The decoded success reply of command K. */
export type CommandReply<K extends CommandKey> = (ReplyOf<K> extends never ? unknown : ReplyOf<K>) & ReplyTail<K>;

// ---- tool side: commands and replies ----------------------------------------------------------

/** Encode command `key` as a whole frame (header, vCPU header, struct, tail). */
export function encodeCommand<K extends CommandKey>(key: K, seq: number, input: CommandInput<K>): Buffer {
  const def = commands[key] as AnyCommandDef as CommandDef;
  const src = input as unknown as Record<string, unknown>;
  const tail = def.requestTail;
  const tailValue = tail ? src[tail.prop] : undefined;
  const tailLen = tail ? tailLength(tail, tailValue) : 0;
  const fixed = requiredPayload(def);
  const payloadLen = fixed + tailLen * (tail ? tailElemSize(tail) : 0);
  if (payloadLen > KVMI_MAX_MSG_SIZE) {
    throw new KvmiError('message-too-large', `${def.name}: payload of ${payloadLen} bytes exceeds ${KVMI_MAX_MSG_SIZE}`, false);
  }
  const buf = Buffer.alloc(KVMI_MSG_HDR_SIZE + payloadLen);
  writeHeader(buf, 0, def.id, payloadLen, seq);
  let off = KVMI_MSG_HDR_SIZE;
  if (def.scope === 'vcpu') {
    const vcpu = src['vcpu'];
    if (typeof vcpu !== 'number' || !Number.isInteger(vcpu) || vcpu < 0 || vcpu > 0xffff) {
      throw new KvmiError('bad-value', `${def.name}: vcpu must be an integer in [0, 65535]`, false);
    }
    S.kvmi_vcpu_hdr.write(buf, off, { vcpu });
    off += VCPU_HDR_SIZE;
  }
  if (def.request) {
    const fields = tail ? { ...src, [tail.countField]: tailLen } : src;
    try {
      def.request.write(buf, off, fields);
    } catch (e) {
      throw new KvmiError('bad-value', `${def.name}: ${(e as Error).message}`, false);
    }
    off += def.request.size;
  }
  if (tail) writeTail(tail, buf, off, tailValue);
  return buf;
}

export type ReplyResult<K extends CommandKey> = { ok: true; value: CommandReply<K> } | { ok: false; errno: number };

/**
 * Decode the reply frame to command `key`. A negative `err` gives `{ok: false, errno}` (positive
 * errno). Malformed replies throw a hard `KvmiError`.
 */
export function decodeReply<K extends CommandKey>(key: K, frame: Buffer): ReplyResult<K> {
  const def = commands[key] as AnyCommandDef as CommandDef;
  const payload = payloadOf(frame);
  if (payload.length < ERROR_CODE_SIZE) {
    throw new KvmiError('short-payload', `${def.name} reply: ${payload.length} bytes, need ${ERROR_CODE_SIZE}`, true);
  }
  const { err } = S.kvmi_error_code.read(payload, 0);
  if (err !== 0) return { ok: false, errno: -err };
  const body = payload.subarray(ERROR_CODE_SIZE);
  let value: Record<string, unknown> = {};
  let off = 0;
  if (def.reply) {
    if (body.length < def.reply.size) {
      throw new KvmiError('short-payload', `${def.name} reply data: ${body.length} bytes, need ${def.reply.size}`, true);
    }
    value = def.reply.read(body, 0) as Record<string, unknown>;
    off = def.reply.size;
  }
  const tail = def.replyTail;
  if (tail) {
    const elem = tailElemSize(tail);
    let count: number;
    if (tail.countIn === 'self') count = Number(getPath(value, tail.countField));
    else count = Math.floor((body.length - off) / elem); // READ_PHYSICAL: the data is the rest
    if (off + count * elem > body.length) {
      throw new KvmiError('short-payload', `${def.name} reply: ${count} × ${elem}-byte ${tail.prop} do not fit`, true);
    }
    value[tail.prop] = readTail(tail, body, off, count);
  }
  return { ok: true, value: value as CommandReply<K> };
}

// ---- tool side: events ------------------------------------------------------------------------

export type DecodedEvent =
  | { kind: 'vm-event'; seq: number; event: AnyEventDef }
  | {
      kind: 'vcpu-event';
      seq: number;
      event: AnyEventDef;
      vcpu: number;
      /** `kvmi_vcpu_event.size` as sent (544 in v12). */
      commonSize: number;
      arch: S.VcpuEventArch;
      /** The event-specific struct, or null for events without one. */
      data: Record<string, unknown> | null;
    }
  /** KVM's error answer (id 1, size 8) to one of our event replies (§2.5). */
  | { kind: 'event-reply-error'; seq: number; errno: number };

const VCPU_EVENT_SIZE_OFF = EVENT_HDR_SIZE + S.kvmi_vcpu_event.field('size').offset;
const VCPU_EVENT_VCPU_OFF = EVENT_HDR_SIZE + S.kvmi_vcpu_event.field('vcpu').offset;
const VCPU_EVENT_ARCH_OFF = EVENT_HDR_SIZE + S.kvmi_vcpu_event.field('arch').offset;
const EVENT_ID_OFF = S.kvmi_event_hdr.field('event').offset;

/** Decode any message KVM sends with id 0 or 1. Padding in these messages is ignored (§2.2). */
export function decodeEvent(frame: Buffer): DecodedEvent {
  const payload = payloadOf(frame);
  const id = frameId(frame);
  const seq = frameSeq(frame);
  if (id === KVMI_VCPU_EVENT && payload.length === ERROR_CODE_SIZE) {
    return { kind: 'event-reply-error', seq, errno: -S.kvmi_error_code.read(payload, 0).err };
  }
  if (id !== KVMI_VM_EVENT && id !== KVMI_VCPU_EVENT) {
    throw new KvmiError('unknown-message', `message id ${id} is not an event`, true);
  }
  if (payload.length < EVENT_HDR_SIZE) {
    throw new KvmiError('short-payload', `event payload of ${payload.length} bytes`, true);
  }
  const eventId = payload.readUInt16LE(EVENT_ID_OFF);
  const def = eventDefById(eventId);
  if (!def || (def.scope === 'vm') !== (id === KVMI_VM_EVENT)) {
    throw new KvmiError('unknown-event', `unknown ${id === KVMI_VM_EVENT ? 'VM' : 'vCPU'} event id ${eventId}`, true);
  }
  if (def.scope === 'vm') return { kind: 'vm-event', seq, event: def };
  if (payload.length < EVENT_HDR_SIZE + S.kvmi_vcpu_event.size) {
    throw new KvmiError('short-payload', `${def.name}: payload of ${payload.length} bytes, common part needs ${EVENT_HDR_SIZE + S.kvmi_vcpu_event.size}`, true);
  }
  const commonSize = payload.readUInt16LE(VCPU_EVENT_SIZE_OFF);
  const specificOff = EVENT_HDR_SIZE + commonSize;
  if (commonSize < S.kvmi_vcpu_event.size) {
    throw new KvmiError('bad-value', `${def.name}: kvmi_vcpu_event.size ${commonSize} < ${S.kvmi_vcpu_event.size}`, true);
  }
  let data: Record<string, unknown> | null = null;
  const layout = def.payload as Layout<unknown> | null;
  if (layout) {
    if (payload.length < specificOff + layout.size) {
      throw new KvmiError('short-payload', `${def.name}: specific data needs ${specificOff + layout.size} bytes, payload has ${payload.length}`, true);
    }
    data = layout.read(payload, specificOff) as Record<string, unknown>;
  }
  return {
    kind: 'vcpu-event',
    seq,
    event: def,
    vcpu: payload.readUInt16LE(VCPU_EVENT_VCPU_OFF),
    commonSize,
    arch: S.kvmi_vcpu_event_arch.read(payload, VCPU_EVENT_ARCH_OFF),
    data,
  };
}

/**
 * An allocation-free reader over one vCPU event frame, for the hot path (local verdicts). Call
 * `reset(frame)` for each event; the getters read straight from the frame with offsets derived from
 * the layouts. The frame must stay untouched while the view is used.
 */
export class VcpuEventView {
  private frame_: Buffer = Buffer.alloc(0);
  private specific = 0;
  seq = 0;
  eventId = 0;
  vcpu = 0;

  private static readonly archAt = KVMI_MSG_HDR_SIZE + VCPU_EVENT_ARCH_OFF;
  private static readonly modeOff = VcpuEventView.archAt + S.kvmi_vcpu_event_arch.field('mode').offset;
  private static readonly regsOff = VcpuEventView.archAt + S.kvmi_vcpu_event_arch.field('regs').offset;
  private static readonly sregsOff = VcpuEventView.archAt + S.kvmi_vcpu_event_arch.field('sregs').offset;
  private static readonly msrsOff = VcpuEventView.archAt + S.kvmi_vcpu_event_arch.field('msrs').offset;

  /** Point the view at a frame. Returns false (and leaves the view unusable) if it is not a vCPU event. */
  reset(frame: Buffer): boolean {
    if (frame.length < KVMI_MSG_HDR_SIZE + EVENT_HDR_SIZE + S.kvmi_vcpu_event.size) return false;
    if (frameId(frame) !== KVMI_VCPU_EVENT) return false;
    const size = frameSize(frame);
    if (frame.length < KVMI_MSG_HDR_SIZE + size) return false;
    const common = frame.readUInt16LE(KVMI_MSG_HDR_SIZE + VCPU_EVENT_SIZE_OFF);
    if (common < S.kvmi_vcpu_event.size) return false;
    const eventId = frame.readUInt16LE(KVMI_MSG_HDR_SIZE + EVENT_ID_OFF);
    const def = eventDefById(eventId);
    if (!def || def.scope !== 'vcpu') return false;
    const specific = KVMI_MSG_HDR_SIZE + EVENT_HDR_SIZE + common;
    if (def.payload && specific + def.payload.size > KVMI_MSG_HDR_SIZE + size) return false;
    this.frame_ = frame;
    this.seq = frameSeq(frame);
    this.eventId = eventId;
    this.vcpu = frame.readUInt16LE(KVMI_MSG_HDR_SIZE + VCPU_EVENT_VCPU_OFF);
    this.specific = specific;
    return true;
  }
  /**
   * The whole frame the view reads (header included), for readers that compare fields in place, e.g.
   * as two u32 halves to avoid a bigint per field. Valid only as long as the view is.
   */
  get frame(): Buffer {
    return this.frame_;
  }
  get mode(): number {
    return this.frame_[VcpuEventView.modeOff]!;
  }
  /** A `kvm_regs` field by name, e.g. `reg('rip')`. */
  reg(name: keyof S.KvmRegs): bigint {
    return this.frame_.readBigUInt64LE(VcpuEventView.regsOff + S.kvm_regs.field(name).offset);
  }
  /** A u64 field of `kvm_sregs` (cr0, cr3, cr4, efer, ...). */
  sreg(name: 'cr0' | 'cr2' | 'cr3' | 'cr4' | 'cr8' | 'efer' | 'apic_base'): bigint {
    return this.frame_.readBigUInt64LE(VcpuEventView.sregsOff + SREG_OFFSETS[name]);
  }
  msr(name: keyof S.EventArchMsrs): bigint {
    return this.frame_.readBigUInt64LE(VcpuEventView.msrsOff + S.kvmi_vcpu_event_arch_msrs.field(name).offset);
  }
  /** Absolute offset of the event-specific struct in the frame. */
  get specificOffset(): number {
    return this.specific;
  }
  /** Read a u8/u16/u32 or u64 field of the event-specific struct (by its layout). */
  specificU64(layout: Layout<unknown>, field: string): bigint {
    return this.frame_.readBigUInt64LE(this.specific + layout.field(field).offset);
  }
  specificUint(layout: Layout<unknown>, field: string): number {
    const f = layout.field(field);
    const at = this.specific + f.offset;
    return f.size === 1 ? this.frame_[at]! : f.size === 2 ? this.frame_.readUInt16LE(at) : this.frame_.readUInt32LE(at);
  }
}
const SREG_OFFSETS = {
  cr0: S.kvm_sregs.field('cr0').offset,
  cr2: S.kvm_sregs.field('cr2').offset,
  cr3: S.kvm_sregs.field('cr3').offset,
  cr4: S.kvm_sregs.field('cr4').offset,
  cr8: S.kvm_sregs.field('cr8').offset,
  efer: S.kvm_sregs.field('efer').offset,
  apic_base: S.kvm_sregs.field('apic_base').offset,
} as const;

/** Size of a whole event-reply frame for an event (24, or 32 with CR/MSR reply data). */
export function eventReplyFrameSize(def: EventDef): number {
  return KVMI_MSG_HDR_SIZE + VCPU_HDR_SIZE + EVENT_REPLY_SIZE + (def.replyData?.size ?? 0);
}

const REPLY_ACTION_OFF = KVMI_MSG_HDR_SIZE + VCPU_HDR_SIZE + S.kvmi_vcpu_event_reply.field('action').offset;
const REPLY_EVENT_OFF = KVMI_MSG_HDR_SIZE + VCPU_HDR_SIZE + S.kvmi_vcpu_event_reply.field('event').offset;
const REPLY_DATA_OFF = KVMI_MSG_HDR_SIZE + VCPU_HDR_SIZE + EVENT_REPLY_SIZE;
const REPLY_VCPU_OFF = KVMI_MSG_HDR_SIZE + S.kvmi_vcpu_hdr.field('vcpu').offset;
// Both CR and MSR reply data are a single u64 `new_val` at the same offset.
const NEW_VAL_OFF = S.kvmi_vcpu_event_cr_reply.field('new_val').offset;

/**
 * Write an event reply into `buf` at `off` without allocating; returns the bytes written.
 * Refuses (typed, soft error) an action the event does not accept — KVM would shut the socket — and a
 * CR/MSR reply without `newVal`, which KVM would zero-fill and write 0 into the register (§5.3).
 */
export function writeEventReply(
  buf: Buffer,
  off: number,
  seq: number,
  vcpu: number,
  eventId: number,
  action: number,
  newVal?: bigint,
): number {
  const def = eventDefById(eventId);
  if (!def || def.scope !== 'vcpu') throw new KvmiError('unknown-event', `no vCPU event with id ${eventId}`, false);
  if (!actionAllowed(def, action)) {
    throw new KvmiError('action-not-allowed', `${def.name} does not accept action ${action} (allowed: ${def.actions.join(', ')})`, false);
  }
  const total = eventReplyFrameSize(def);
  if (def.replyData) {
    if (newVal === undefined) {
      throw new KvmiError('missing-reply-data', `${def.name} reply needs new_val (KVM would write 0 without it)`, false);
    }
    if (newVal < 0n || newVal > 0xffffffffffffffffn) throw new KvmiError('bad-value', 'new_val must be a u64', false);
  }
  if (off + total > buf.length) throw new KvmiError('bad-value', `buffer too small for a ${total}-byte reply`, false);
  buf.fill(0, off, off + total);
  writeHeader(buf, off, KVMI_VCPU_EVENT, total - KVMI_MSG_HDR_SIZE, seq);
  buf.writeUInt16LE(vcpu, off + REPLY_VCPU_OFF);
  buf[off + REPLY_ACTION_OFF] = action;
  buf[off + REPLY_EVENT_OFF] = eventId;
  if (def.replyData && newVal !== undefined) buf.writeBigUInt64LE(newVal, off + REPLY_DATA_OFF + NEW_VAL_OFF);
  return total;
}

/** Encode an event reply as a new frame (see `writeEventReply`). */
export function encodeEventReply(
  to: { seq: number; vcpu: number; event: EventDef },
  action: EventActionName,
  replyData?: { new_val: bigint },
): Buffer {
  const buf = Buffer.alloc(eventReplyFrameSize(to.event));
  writeEventReply(buf, 0, to.seq, to.vcpu, to.event.id, EventAction[action], replyData?.new_val);
  return buf;
}

// ---- kernel side: receiving commands ----------------------------------------------------------

/** What the kernel side needs to know to validate a message as KVM's receive thread does. */
export interface KernelState {
  /** `KVM_INTROSPECTION_COMMAND` mask (always-allowed commands are handled by the codec). */
  isCommandAllowed(id: number): boolean;
  /** `KVM_INTROSPECTION_EVENT` mask. */
  isEventAllowed(eventId: number): boolean;
  /** Online vCPUs. */
  vcpuCount(): number;
  /** §2.5 step 4: not UNINITIALIZED, or waiting for an event reply. */
  isVcpuReady(vcpu: number): boolean;
  /** Seed extensions answered (false = a pure v12 kernel: ENOSYS / ENOENT). */
  extensionsEnabled(): boolean;
}

export type KernelMessage =
  /** Close the connection (§10). */
  | { kind: 'hard-error'; reason: string }
  /** Answer with this error (the receive thread's checks, §2.5, or an unknown id). */
  | { kind: 'error-reply'; id: number; seq: number; errno: number }
  | {
      kind: 'command';
      def: AnyCommandDef;
      seq: number;
      /** vCPU index for vCPU commands, null for VM commands. */
      vcpu: number | null;
      /** The command struct as KVM sees it (short payload zero-filled), or an empty object. */
      request: Record<string, unknown>;
      /** The whole payload (after the vCPU header for vCPU commands) for handlers that need raw bytes. */
      body: Buffer;
      /** Payload length as sent (for length rules applied by the handler). */
      payloadSize: number;
      /** True when the struct's padding (not the vCPU header's) is all zero. */
      paddingZero: boolean;
    }
  /** An event reply for a vCPU; check it with `checkEventReply` on that vCPU. */
  | { kind: 'event-reply'; seq: number; vcpu: number; payload: Buffer };

const VCPU_HDR_VCPU_OFF = S.kvmi_vcpu_hdr.field('vcpu').offset;

/** Is `id` a command this kernel knows (extensions count only when enabled)? */
export function kernelKnowsCommand(id: number, state: Pick<KernelState, 'extensionsEnabled'>): boolean {
  const def = commandDefById(id);
  return def !== undefined && (def.extension === undefined || state.extensionsEnabled());
}

/** Is `id` a known event id (§3.2)? */
export function kernelKnowsEvent(id: number): boolean {
  return eventDefById(id) !== undefined;
}

/**
 * Validate one frame as KVM's receive thread does (§2.2, §2.5, §10) and decode the command struct.
 * Per-command argument checks run later, in the handler, with `runCommandChecks`.
 */
export function receiveKernelMessage(frame: Buffer, state: KernelState): KernelMessage {
  if (frame.length < KVMI_MSG_HDR_SIZE) return { kind: 'hard-error', reason: 'short read of the message header' };
  const size = frameSize(frame);
  if (size > KVMI_MAX_MSG_SIZE) return { kind: 'hard-error', reason: `payload size ${size} > ${KVMI_MAX_MSG_SIZE}` };
  if (frame.length < KVMI_MSG_HDR_SIZE + size) return { kind: 'hard-error', reason: 'short read' };
  const id = frameId(frame);
  const seq = frameSeq(frame);
  const payload = frame.subarray(KVMI_MSG_HDR_SIZE, KVMI_MSG_HDR_SIZE + size);
  const isEventReply = id === KVMI_VCPU_EVENT;
  const def = isEventReply ? undefined : commandDefById(id);
  if (!isEventReply && (!def || !kernelKnowsCommand(id, state))) {
    return { kind: 'error-reply', id, seq, errno: KvmErrno.ENOSYS };
  }
  if (isEventReply || isVcpuMessageId(id)) {
    // §2.5: EPERM (not for event replies) → header padding → vCPU index → EAGAIN.
    if (def && !def.alwaysAllowed && !state.isCommandAllowed(id)) return { kind: 'error-reply', id, seq, errno: KvmErrno.EPERM };
    // A payload shorter than the header reads as zeros (§2.2); only then is a copy needed.
    let hdr = payload;
    if (payload.length < VCPU_HDR_SIZE) {
      hdr = Buffer.alloc(VCPU_HDR_SIZE);
      payload.copy(hdr);
    }
    if (!S.kvmi_vcpu_hdr.paddingIsZero(hdr)) return { kind: 'error-reply', id, seq, errno: KvmErrno.EINVAL };
    const vcpu = hdr.readUInt16LE(VCPU_HDR_VCPU_OFF);
    if (vcpu >= state.vcpuCount()) return { kind: 'error-reply', id, seq, errno: KvmErrno.EINVAL };
    if (!state.isVcpuReady(vcpu)) return { kind: 'error-reply', id, seq, errno: KvmErrno.EAGAIN };
    if (isEventReply) return { kind: 'event-reply', seq, vcpu, payload: Buffer.from(payload) };
    return decodeCommandBody(def!, seq, vcpu, payload.subarray(Math.min(VCPU_HDR_SIZE, payload.length)), size);
  }
  if (!def!.alwaysAllowed && !state.isCommandAllowed(id)) return { kind: 'error-reply', id, seq, errno: KvmErrno.EPERM };
  return decodeCommandBody(def!, seq, null, payload, size);
}

function decodeCommandBody(def: AnyCommandDef, seq: number, vcpu: number | null, raw: Buffer, payloadSize: number): KernelMessage {
  const d = def as CommandDef;
  const need = d.request?.size ?? 0;
  // KVM reads into a zero-filled buffer: a short fixed-size struct reads as zeros (§2.2).
  const body = Buffer.alloc(Math.max(need, raw.length));
  raw.copy(body);
  const request = d.request ? (d.request.read(body, 0) as Record<string, unknown>) : {};
  const paddingZero = d.request ? d.request.paddingIsZero(body, 0) : true;
  const tail = d.requestTail;
  if (tail && d.shortPayload === 'hard-error') {
    const count = Number(request[tail.countField]);
    if (raw.length < need + count * tailElemSize(tail)) {
      return { kind: 'hard-error', reason: `${d.name}: ${count} ${tail.prop} do not fit in a ${payloadSize}-byte payload` };
    }
  }
  if (tail && raw.length >= need) {
    const count = Number(request[tail.countField]);
    const avail = Math.floor((raw.length - need) / tailElemSize(tail));
    request[tail.prop] = readTail(tail, body, need, Math.min(count, avail));
  }
  return { kind: 'command', def, seq, vcpu, request, body, payloadSize, paddingZero };
}

/** Answers the catalog's `state` and `permission` checks for one command, from the kernel's state. */
export type StateCheck = (check: Extract<CommandCheck, { kind: 'state' }>, msg: Extract<KernelMessage, { kind: 'command' }>) => boolean;

/**
 * Run a command's checks in the kernel's order (the length rule first, then the catalog's list).
 * Returns the positive errno of the first failing check, or 0. `stateFails` answers 'state' checks
 * (true = the check fails).
 */
export function runCommandChecks(
  msg: Extract<KernelMessage, { kind: 'command' }>,
  state: Pick<KernelState, 'isEventAllowed'>,
  stateFails: StateCheck,
): number {
  const d = msg.def as CommandDef;
  if (d.shortPayload === 'einval') {
    const tail = d.requestTail;
    const need = (d.request?.size ?? 0) + (tail ? Number(msg.request[tail.countField]) * tailElemSize(tail) : 0);
    if (msg.payloadSize - (d.scope === 'vcpu' ? VCPU_HDR_SIZE : 0) < need) return KvmErrno.EINVAL;
  }
  for (const c of d.checks) {
    let fails: boolean;
    switch (c.kind) {
      case 'padding':
        fails = !msg.paddingZero;
        break;
      case 'bool':
        fails = (msg.request[c.field] as number) > 1;
        break;
      case 'one-of':
        fails = !c.values.includes(msg.request[c.field] as number);
        break;
      case 'predicate':
        fails = c.fails(msg.request);
        break;
      case 'permission':
        fails = !state.isEventAllowed(events[c.event].id);
        break;
      case 'state':
        fails = stateFails(c, msg);
        break;
    }
    if (fails) return KvmErrno[c.errno as KvmErrnoName];
  }
  return 0;
}

// ---- kernel side: sending -----------------------------------------------------------------------

/** An error reply: `kvmi_error_code` with the negated errno and nothing else. */
export function encodeErrorReply(id: number, seq: number, errno: number): Buffer {
  const buf = Buffer.alloc(KVMI_MSG_HDR_SIZE + ERROR_CODE_SIZE);
  writeHeader(buf, 0, id, ERROR_CODE_SIZE, seq);
  S.kvmi_error_code.write(buf, KVMI_MSG_HDR_SIZE, { err: -Math.abs(errno) });
  return buf;
}

/** A success reply to command `key` with its reply struct and tail (READ_PHYSICAL `data`, GET_REGISTERS `msr_entries`). */
export function encodeReply<K extends CommandKey>(key: K, seq: number, value: CommandReply<K>): Buffer {
  const def = commands[key] as AnyCommandDef as CommandDef;
  const v = value as unknown as Record<string, unknown>;
  const tail = def.replyTail;
  const tailValue = tail ? v[tail.prop] : undefined;
  const tailLen = tail ? tailLength(tail, tailValue) * tailElemSize(tail) : 0;
  const replySize = def.reply?.size ?? 0;
  const payload = Buffer.alloc(ERROR_CODE_SIZE + replySize + tailLen);
  S.kvmi_error_code.write(payload, 0, { err: 0 });
  if (def.reply) {
    let fields: Record<string, unknown> = v;
    if (tail && tail.countIn === 'self') {
      fields = structuredCloneShallow(v);
      setPath(fields, tail.countField, tailLength(tail, tailValue));
    }
    def.reply.write(payload, ERROR_CODE_SIZE, fields);
  }
  if (tail) writeTail(tail, payload, ERROR_CODE_SIZE + replySize, tailValue);
  return finish(payload, def.id, seq);
}

function structuredCloneShallow(v: Record<string, unknown>): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [k, x] of Object.entries(v)) out[k] = typeof x === 'object' && x !== null && !ArrayBuffer.isView(x) && !Array.isArray(x) ? structuredCloneShallow(x as Record<string, unknown>) : x;
  return out;
}

/** The VM event (UNHOOK): just `kvmi_event_hdr`. */
export function encodeVmEvent(seq: number): Buffer {
  return finish(S.kvmi_event_hdr.encode({ event: events.UNHOOK.id }), KVMI_VM_EVENT, seq);
}

export interface VcpuEventInput<K extends EventKey> {
  event: K;
  seq: number;
  vcpu: number;
  arch: S.VcpuEventArch;
  /** Event-specific struct, for events that have one. */
  data?: Record<string, unknown>;
  /**
   * Fill the padding KVM does not zero (§2.2: kvmi_vcpu_event.padding, arch padding, segment and
   * dtable padding) with this byte, so that a tool which rejects it fails in tests, not production.
   */
  paddingNoise?: number;
  /** Override `kvmi_vcpu_event.size` (a future kernel with a larger common part); default 544. */
  commonSize?: number;
}

export function encodeVcpuEvent<K extends EventKey>(input: VcpuEventInput<K>): Buffer {
  const def = events[input.event] as EventDef;
  if (def.scope !== 'vcpu') throw new KvmiError('bad-value', `${def.name} is not a vCPU event`, false);
  const common = input.commonSize ?? KVMI_VCPU_EVENT_COMMON_SIZE;
  if (common < S.kvmi_vcpu_event.size) throw new KvmiError('bad-value', `commonSize ${common} < ${S.kvmi_vcpu_event.size}`, false);
  const specific = def.payload?.size ?? 0;
  const payload = Buffer.alloc(EVENT_HDR_SIZE + common + specific);
  S.kvmi_event_hdr.write(payload, 0, { event: def.id });
  S.kvmi_vcpu_event.write(payload, EVENT_HDR_SIZE, { size: common, vcpu: input.vcpu, arch: input.arch });
  if (input.paddingNoise !== undefined) {
    for (const r of S.kvmi_vcpu_event.paddingRanges) payload.fill(input.paddingNoise, EVENT_HDR_SIZE + r.offset, EVENT_HDR_SIZE + r.offset + r.size);
  }
  if (def.payload) {
    if (!input.data) throw new KvmiError('bad-value', `${def.name} needs its specific data`, false);
    def.payload.write(payload, EVENT_HDR_SIZE + common, input.data);
  }
  return finish(payload, KVMI_VCPU_EVENT, input.seq);
}

// ---- kernel side: checking event replies (§5.3) ----------------------------------------------

export type EventReplyCheck =
  /** Hard error: shut the socket; the vCPU continues as with CONTINUE (no register/value changes). */
  | { kind: 'hard-error'; reason: string }
  /** Valid reply, but an action the event does not support: shut the socket; take the not-CONTINUE path. */
  | { kind: 'unsupported-action'; action: number }
  /** Valid reply. `newVal` is the (zero-filled) reply data for CR/MSR. */
  | { kind: 'reply'; action: EventActionName; newVal: bigint | null };

const EVENT_REPLY_PAD_OK = (p: Buffer) => S.kvmi_vcpu_event_reply.paddingIsZero(p, VCPU_HDR_SIZE);

/**
 * Check an event reply payload (as returned by `receiveKernelMessage`) against the event the vCPU
 * waits for. `waiting` is null when the vCPU waits for nothing.
 */
export function checkEventReply(
  msg: { seq: number; payload: Buffer },
  waiting: { seq: number; event: EventDef } | null,
): EventReplyCheck {
  if (!waiting) return { kind: 'hard-error', reason: 'the vCPU is not waiting for an event reply' };
  if (msg.seq !== waiting.seq) return { kind: 'hard-error', reason: `reply seq ${msg.seq} != event seq ${waiting.seq}` };
  const p = msg.payload;
  const head = VCPU_HDR_SIZE + EVENT_REPLY_SIZE;
  if (p.length < head) return { kind: 'hard-error', reason: `reply payload of ${p.length} bytes < ${head}` };
  const expected = waiting.event.replyData?.size ?? 0;
  if (p.length - head > expected) {
    return { kind: 'hard-error', reason: `${p.length - head} bytes of reply data, ${waiting.event.name} expects ${expected}` };
  }
  if (!EVENT_REPLY_PAD_OK(p)) return { kind: 'hard-error', reason: 'non-zero padding in kvmi_vcpu_event_reply' };
  const action = p[VCPU_HDR_SIZE + S.kvmi_vcpu_event_reply.field('action').offset]!;
  let newVal: bigint | null = null;
  if (waiting.event.replyData) {
    const data = Buffer.alloc(expected); // short reply data is zero-filled
    p.copy(data, 0, head);
    newVal = data.readBigUInt64LE(NEW_VAL_OFF);
  }
  if (!actionAllowed(waiting.event, action)) return { kind: 'unsupported-action', action };
  const name = (Object.keys(EventAction) as EventActionName[]).find((k) => EventAction[k] === action)!;
  return { kind: 'reply', action: name, newVal };
}

export { errnoName };
