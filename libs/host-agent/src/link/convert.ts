/**
 * KVMI (libs/kvmi) ↔ periscope.v1 (libs/contracts) conversions used off the vCPU's critical path:
 * a received event frame → `KvmiEvent`, a central `Decision` → the KVMI reply, event ids ↔ kinds.
 */
import { decodeEvent, events, EventAction as KvmiAction, structs, type EventKey, type VcpuEventView } from '@periscope/kvmi';
import {
  CpuMode,
  DescriptorTableKind,
  EventAction,
  EventDisposition,
  KvmiEventKind,
  type Decision,
  type KvmiEvent,
  type Segment,
  type SpecialRegisters,
} from '@periscope/contracts';

/** KVMI wire event id → proto kind. */
const KIND_BY_ID = new Map<number, KvmiEventKind>();
/** KVMI wire event id → catalog key. */
export const EVENT_KEY_BY_ID = new Map<number, EventKey>();
for (const key of Object.keys(events) as EventKey[]) {
  const kind = KvmiEventKind[`KVMI_EVENT_KIND_${key}` as keyof typeof KvmiEventKind];
  KIND_BY_ID.set(events[key].id, kind);
  EVENT_KEY_BY_ID.set(events[key].id, key);
}

export function kindOfEventId(id: number): KvmiEventKind {
  return KIND_BY_ID.get(id) ?? KvmiEventKind.KVMI_EVENT_KIND_UNSPECIFIED;
}

/** KVMI reply action (CONTINUE 0, RETRY 1, CRASH 2) → proto EventAction. */
export function actionToProto(action: number): EventAction {
  return action === KvmiAction.CONTINUE ? EventAction.EVENT_ACTION_CONTINUE : action === KvmiAction.RETRY ? EventAction.EVENT_ACTION_RETRY : EventAction.EVENT_ACTION_CRASH;
}

export interface EventContext {
  hostId: string;
  vmUuid: Buffer;
  sessionGeneration: bigint;
  receivedUnixNs: bigint;
  repliedUnixNs: bigint;
  disposition: EventDisposition;
  verdictDeadlineUnixNs: bigint;
  ruleId: string;
  policyVersion: bigint;
}

function seg(s: structs.KvmSegment): Segment {
  return {
    base: s.base, limit: s.limit, selector: s.selector, type: s.type, present: s.present !== 0, dpl: s.dpl, db: s.db !== 0,
    s: s.s !== 0, l: s.l !== 0, g: s.g !== 0, avl: s.avl !== 0, unusable: s.unusable !== 0,
  };
}

function sregsToProto(s: structs.KvmSregs): SpecialRegisters {
  return {
    cs: seg(s.cs), ds: seg(s.ds), es: seg(s.es), fs: seg(s.fs), gs: seg(s.gs), ss: seg(s.ss), tr: seg(s.tr), ldt: seg(s.ldt),
    gdt: { base: s.gdt.base, limit: s.gdt.limit }, idt: { base: s.idt.base, limit: s.idt.limit },
    cr0: s.cr0, cr2: s.cr2, cr3: s.cr3, cr4: s.cr4, cr8: s.cr8, efer: s.efer, apicBase: s.apic_base,
    interruptBitmap: [...(s.interrupt_bitmap as readonly bigint[])],
  };
}

const MODES: Record<number, CpuMode> = { 2: CpuMode.CPU_MODE_16_BIT, 4: CpuMode.CPU_MODE_32_BIT, 8: CpuMode.CPU_MODE_64_BIT };

/** A whole vCPU event frame (header included) → `KvmiEvent`. */
export function eventFromFrame(frame: Buffer, ctx: EventContext): KvmiEvent {
  const e = decodeEvent(frame);
  if (e.kind !== 'vcpu-event') throw new Error(`not a vCPU event frame (${e.kind})`);
  const a = e.arch;
  const d = (e.data ?? {}) as Record<string, number | bigint>;
  const n = (k: string): number => Number(d[k] ?? 0);
  const b = (k: string): bigint => BigInt(d[k] ?? 0n);
  let payload: KvmiEvent['payload'];
  switch (e.event.key) {
    case 'PAUSE':
      payload = { $case: 'pause', value: {} };
      break;
    case 'HYPERCALL':
      payload = { $case: 'hypercall', value: {} };
      break;
    case 'BREAKPOINT':
      payload = { $case: 'breakpoint', value: { gpa: b('gpa'), insnLen: n('insn_len') } };
      break;
    case 'CR':
      payload = { $case: 'cr', value: { cr: n('cr'), oldValue: b('old_value'), newValue: b('new_value') } };
      break;
    case 'TRAP':
      payload = { $case: 'trap', value: { nr: n('nr'), errorCode: n('error_code'), address: b('address') } };
      break;
    case 'XSETBV':
      payload = { $case: 'xsetbv', value: { xcr: n('xcr'), oldValue: b('old_value'), newValue: b('new_value') } };
      break;
    case 'DESCRIPTOR':
      payload = { $case: 'descriptor', value: { descriptor: n('descriptor') as DescriptorTableKind, write: n('write') !== 0 } };
      break;
    case 'MSR':
      payload = { $case: 'msr', value: { msr: n('msr'), oldValue: b('old_value'), newValue: b('new_value') } };
      break;
    case 'PF':
      payload = { $case: 'pf', value: { gva: b('gva'), gpa: b('gpa'), access: n('access') } };
      break;
    case 'SINGLESTEP':
      payload = { $case: 'singlestep', value: { failed: n('failed') !== 0 } };
      break;
    default:
      payload = undefined;
  }
  const r = a.regs;
  const m = a.msrs;
  return {
    hostId: ctx.hostId,
    vmUuid: ctx.vmUuid,
    sessionGeneration: ctx.sessionGeneration,
    vcpu: e.vcpu,
    seq: e.seq,
    receivedUnixNs: ctx.receivedUnixNs,
    repliedUnixNs: ctx.repliedUnixNs,
    disposition: ctx.disposition,
    verdictDeadlineUnixNs: ctx.verdictDeadlineUnixNs,
    ruleId: ctx.ruleId,
    policyVersion: ctx.policyVersion,
    mode: MODES[a.mode] ?? CpuMode.CPU_MODE_UNSPECIFIED,
    regs: {
      rax: r.rax, rbx: r.rbx, rcx: r.rcx, rdx: r.rdx, rsi: r.rsi, rdi: r.rdi, rsp: r.rsp, rbp: r.rbp, r8: r.r8, r9: r.r9,
      r10: r.r10, r11: r.r11, r12: r.r12, r13: r.r13, r14: r.r14, r15: r.r15, rip: r.rip, rflags: r.rflags,
    },
    sregs: sregsToProto(a.sregs),
    msrs: {
      sysenterCs: m.sysenter_cs, sysenterEsp: m.sysenter_esp, sysenterEip: m.sysenter_eip, efer: m.efer, star: m.star,
      lstar: m.lstar, cstar: m.cstar, pat: m.pat, shadowGs: m.shadow_gs,
    },
    payload,
  };
}

/**
 * The guest's old/new values of a CR/MSR event (for mapping a central decision's reply value), read in
 * place from the view (two u64 reads, no decode); undefined for other kinds.
 */
export function crMsrValues(view: VcpuEventView): { old: bigint; new: bigint } | undefined {
  const layout = view.eventId === events.CR.id ? structs.kvmi_vcpu_event_cr : view.eventId === events.MSR.id ? structs.kvmi_vcpu_event_msr : undefined;
  if (!layout) return undefined;
  return { old: view.specificU64(layout, 'old_value'), new: view.specificU64(layout, 'new_value') };
}

const U64 = (1n << 64n) - 1n;

/**
 * A central `Decision` for an event of `eventId` → KVMI `{action, newVal}`, or a reason it is unusable
 * (an action the kind does not accept: KVM would close the socket).
 */
export function decisionToReply(
  d: Decision | undefined,
  eventId: number,
  values: { old: bigint; new: bigint } | undefined,
): { ok: true; action: number; newVal: bigint | undefined } | { ok: false; why: string } {
  const key = EVENT_KEY_BY_ID.get(eventId);
  if (!key || !d) return { ok: false, why: 'no decision' };
  const def = events[key];
  let action: number;
  switch (d.action) {
    case EventAction.EVENT_ACTION_CONTINUE:
      action = KvmiAction.CONTINUE;
      break;
    case EventAction.EVENT_ACTION_RETRY:
      action = KvmiAction.RETRY;
      break;
    case EventAction.EVENT_ACTION_CRASH:
      action = KvmiAction.CRASH;
      break;
    default:
      return { ok: false, why: `action ${d.action} is not a reply action` };
  }
  const actionName = action === KvmiAction.CONTINUE ? 'CONTINUE' : action === KvmiAction.RETRY ? 'RETRY' : 'CRASH';
  if (!(def.actions as readonly string[]).includes(actionName)) return { ok: false, why: `${key} events do not accept ${actionName}` };
  if (!def.replyData) return { ok: true, action, newVal: undefined };
  if (!values) return { ok: false, why: 'no old/new values' };
  // CR/MSR always carry new_val (a short reply would make KVM write 0); CRASH keeps the old value.
  if (action !== KvmiAction.CONTINUE) return { ok: true, action, newVal: values.old };
  const p = d.replyValue?.policy;
  if (!p || p.$case === 'keepNew') return { ok: true, action, newVal: values.new };
  if (p.$case === 'keepOld') return { ok: true, action, newVal: values.old };
  if (p.$case === 'fixed') return { ok: true, action, newVal: p.value & U64 };
  return { ok: true, action, newVal: ((values.new & ~p.value.clearBits) | p.value.setBits) & U64 };
}

export { EventDisposition };
