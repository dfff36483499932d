/**
 * The hot path: one `Evaluator` per VM answers each vCPU event with a preallocated, reused `Verdict`.
 *
 * - Rules are grouped per event kind (and, for CR/MSR/XSETBV/DESCRIPTOR/TRAP, per register / index:
 *   a map from the index to the rules that can match it, in policy order), so an event only walks the
 *   rules that can apply to it; first match wins.
 * - 64-bit values are compared as two int32 halves read from the frame with layout-derived offsets
 *   (`frame.ts`); no bigint, no object, no heap number is created while matching. The CR/MSR `new_val` is
 *   kept as two halves too: `verdict.writeReply` writes it without a bigint, `verdict.newVal` makes one on
 *   demand.
 * - Slots the current event kind does not have (`a`, `b`, `c`, `key`) keep stale values; no entry of that
 *   kind reads them (the compiler only allows kind-specific criteria on their kind).
 */
import {
  EVENT_REPLY_SIZE,
  KVMI_MSG_HDR_SIZE,
  VCPU_HDR_SIZE,
  VcpuEventView,
  events,
  structs as S,
  writeEventReply,
} from '@periscope/kvmi';
import { Check, type CompiledAction, type CompiledEntry, type CompiledPolicy } from './compile.js';
import { FIELDS_BY_EVENT_ID, MODE_OFFSET, RIP_OFFSET, frameOfView, readSmall, type FieldAt } from './frame.js';
import type { ActionKind, VcpuEventKind } from './model.js';
import { SEVERITIES, type Severity } from './model.js';

const NO_EXCEPTIONS: readonly CompiledEntry[] = [];
/** Offset of `new_val` in a CR/MSR reply frame (both reply structs hold it at the same place). */
const NEW_VAL_OFFSET = KVMI_MSG_HDR_SIZE + VCPU_HDR_SIZE + EVENT_REPLY_SIZE + S.kvmi_vcpu_event_cr_reply.field('new_val').offset;
if (NEW_VAL_OFFSET !== KVMI_MSG_HDR_SIZE + VCPU_HDR_SIZE + EVENT_REPLY_SIZE + S.kvmi_vcpu_event_msr_reply.field('new_val').offset) {
  throw new TypeError('CR and MSR replies place new_val differently');
}

/** The answer to one event. The evaluator reuses one instance: copy what you keep past the next call. */
export class Verdict {
  /** The event (copied from the view). */
  eventId = 0;
  vcpu = 0;
  seq = 0;
  /** Index of the matching rule in `policy.rules`; -1 = no rule matched (the kind's default). */
  ruleIndex = -1;
  /** Its id, or null for the default. */
  ruleId: string | null = null;
  /** Index of the exception that replaced the outcome in `policy.exceptions`, or -1. */
  exceptionIndex = -1;
  exceptionId: string | null = null;
  /** What the host agent does (see `Action`); for ask-central, the default applied at the deadline. */
  kind: ActionKind = 'allow';
  /** KVMI reply action: CONTINUE 0, RETRY 1, CRASH 2. */
  action = 0;
  /** True for CR/MSR events: the reply carries `new_val` (`newValLo`/`newValHi`, or `newVal`). */
  hasNewVal = false;
  /** @internal new_val halves as int32 (Smis: storing them never allocates). */
  lo = 0;
  /** @internal */
  hi = 0;
  /** inject: vector and error code (#PF: CR2 = the event's gva); -1 otherwise. */
  injectVector = -1;
  injectErrorCode = -1;
  /** Hold the vCPU and ask central for at most `deadlineMs`, then apply this verdict's action. */
  askCentral = false;
  deadlineMs = 0;
  /** Send a verdict record for this event; `reportEvent` adds the whole event. */
  report = false;
  reportEvent = false;
  /** Detection severity of the matching rule (0 = none, 1..5 = info..critical); 0 when excepted. */
  severity = 0;

  private readonly scratch = Buffer.alloc(8);

  /** Low / high u32 of `new_val` (0 when there is none). */
  get newValLo(): number {
    return this.lo >>> 0;
  }
  get newValHi(): number {
    return this.hi >>> 0;
  }

  /** `new_val` for the reply, as a bigint (allocates one); null for events without reply data. */
  get newVal(): bigint | null {
    if (!this.hasNewVal) return null;
    this.scratch.writeInt32LE(this.lo, 0);
    this.scratch.writeInt32LE(this.hi, 4);
    return this.scratch.readBigUInt64LE(0);
  }

  get severityName(): Severity | null {
    return this.severity === 0 ? null : (SEVERITIES[this.severity - 1] ?? null);
  }

  /**
   * Write the KVMI reply for this verdict into `buf` at `off` (`writeEventReply`); returns its size.
   * For `skip` and `inject` the host agent must first send SET_REGISTERS / VCPU_INJECT_EXCEPTION.
   */
  writeReply(buf: Buffer, off = 0): number {
    // kvmi's writer validates and lays out the reply; new_val is then written from the halves, so no
    // bigint is made (0n is a constant). Offsets come from the layouts.
    const n = writeEventReply(buf, off, this.seq, this.vcpu, this.eventId, this.action, this.hasNewVal ? 0n : undefined);
    if (this.hasNewVal) {
      buf.writeInt32LE(this.lo, off + NEW_VAL_OFFSET);
      buf.writeInt32LE(this.hi, off + NEW_VAL_OFFSET + 4);
    }
    return n;
  }

  /** A plain-object copy (for logs and tests; allocates). */
  toJSON(): Record<string, unknown> {
    return {
      eventId: this.eventId, vcpu: this.vcpu, seq: this.seq, ruleIndex: this.ruleIndex, ruleId: this.ruleId,
      exceptionIndex: this.exceptionIndex, exceptionId: this.exceptionId, kind: this.kind, action: this.action,
      newVal: this.newVal === null ? null : `0x${this.newVal.toString(16)}`, injectVector: this.injectVector,
      injectErrorCode: this.injectErrorCode, askCentral: this.askCentral, deadlineMs: this.deadlineMs,
      report: this.report, reportEvent: this.reportEvent, severity: this.severity,
    };
  }
}

/** The rules of one event kind, as the evaluator walks them. */
class KindTable {
  readonly byKey = new Map<number, CompiledEntry[]>();
  /** Rules for keys not in `byKey` (those without a key criterion), or every rule when not keyed. */
  readonly other: CompiledEntry[] = [];
  readonly defaultExceptions: readonly CompiledEntry[];
  /** Per rule: the exceptions that may replace its outcome for this kind, in policy order. */
  readonly exceptionsOf = new Map<CompiledEntry, readonly CompiledEntry[]>();
  readonly index: FieldAt | null;
  readonly a: FieldAt | null;
  readonly b: FieldAt | null;
  readonly c: FieldAt | null;
  readonly hasReplyData: boolean;
  constructor(
    readonly eventId: number,
    readonly kind: VcpuEventKind,
    rules: readonly CompiledEntry[],
    exceptions: readonly CompiledEntry[],
    readonly defaultAction: CompiledAction,
    readonly defaultSlot: number,
  ) {
    const f = FIELDS_BY_EVENT_ID.get(eventId)!.fields;
    this.index = f.index;
    this.a = f.a;
    this.b = f.b;
    this.c = f.c;
    this.hasReplyData = events[kind].replyData !== null;
    const mine = rules.filter((r) => r.kinds.includes(kind));
    if (f.index) {
      const keys = new Set<number>();
      for (const r of mine) for (const k of r.keys ?? []) keys.add(k);
      for (const k of keys) this.byKey.set(k, mine.filter((r) => r.keys === null || r.keys.has(k)));
    }
    for (const r of mine) if (r.keys === null) this.other.push(r);
    const mineX = exceptions.filter((x) => x.kinds.includes(kind));
    this.defaultExceptions = mineX.filter((x) => x.targets === null);
    for (const r of mine) {
      const xs = mineX.filter((x) => x.targets === null || x.targets.has(r.id));
      if (xs.length > 0) this.exceptionsOf.set(r, xs);
    }
  }
}

export interface EvaluatorOptions {
  /**
   * The VM this evaluator answers for (canonical UUID text). Rules and exceptions restricted to other VMs
   * are left out; without it, every VM-restricted rule is left out.
   */
  vmUuid?: string;
  /** Wall clock in ms, for exception expiry. Default `Date.now`. */
  clock?: () => number;
}

/** Is the biased (hi, lo) value inside one of the biased inclusive ranges? All int32. */
const inRanges = (r: readonly number[], hi: number, lo: number): boolean => {
  for (let i = 0; i < r.length; i += 4) {
    const sHi = r[i]!;
    const sLo = r[i + 1]!;
    const lHi = r[i + 2]!;
    const lLo = r[i + 3]!;
    if ((hi > sHi || (hi === sHi && lo >= sLo)) && (hi < lHi || (hi === lHi && lo <= lLo))) return true;
  }
  return false;
};
const BIAS = 0x8000_0000 | 0;

export class Evaluator {
  readonly compiled: CompiledPolicy;
  private readonly tables: (KindTable | undefined)[] = [];
  private readonly verdict = new Verdict();
  private readonly view = new VcpuEventView();
  private readonly clock: () => number;
  /** Matches per counter slot (rules, exceptions, defaults per event id). */
  private readonly counts: Float64Array;

  // The event being evaluated: int32 halves of its 64-bit fields, its index and its small scalar.
  private key = 0;
  private aLo = 0;
  private aHi = 0;
  private bLo = 0;
  private bHi = 0;
  private c = 0;

  constructor(compiled: CompiledPolicy, options: EvaluatorOptions = {}) {
    this.compiled = compiled;
    this.clock = options.clock ?? Date.now;
    this.counts = new Float64Array(compiled.slotCount);
    const vm = options.vmUuid?.toLowerCase();
    const forVm = (e: CompiledEntry) => e.vms === null || (vm !== undefined && e.vms.has(vm));
    const exceptions = compiled.exceptions.filter(forVm);
    const rules = compiled.rules.filter(forVm);
    for (const [id, { kind }] of FIELDS_BY_EVENT_ID) {
      const def = compiled.defaults.get(id);
      if (!def) throw new TypeError(`no default action for ${kind}`);
      this.tables[id] = new KindTable(id, kind, rules, exceptions, def, compiled.defaultSlotBase + id);
    }
  }

  /** Evaluate the event a view points at (call during the session's `onVcpuEvent`). */
  evaluate(view: VcpuEventView): Verdict {
    return this.run(frameOfView(view), view.eventId, view.vcpu, view.seq, view.specificOffset);
  }

  /** Evaluate a whole vCPU event frame; null when it is not a valid vCPU event. */
  evaluateFrame(frame: Buffer): Verdict | null {
    const v = this.view;
    if (!v.reset(frame)) return null;
    return this.run(frame, v.eventId, v.vcpu, v.seq, v.specificOffset);
  }

  /** Matches so far, per rule / exception / default (not on the hot path: allocates). */
  stats(): { rules: number[]; exceptions: number[]; defaults: Partial<Record<VcpuEventKind, number>> } {
    const c = this.compiled;
    const defaults: Partial<Record<VcpuEventKind, number>> = {};
    for (const [id, { kind }] of FIELDS_BY_EVENT_ID) defaults[kind] = this.counts[c.defaultSlotBase + id]!;
    return {
      rules: Array.from(this.counts.subarray(0, c.ruleIds.length)),
      exceptions: Array.from(this.counts.subarray(c.ruleIds.length, c.defaultSlotBase)),
      defaults,
    };
  }

  private run(f: Buffer, eventId: number, vcpu: number, seq: number, spec: number): Verdict {
    const t = this.tables[eventId];
    if (t === undefined) throw new TypeError(`event id ${eventId} is not a vCPU event`);
    let list = t.other;
    if (t.index !== null) {
      this.key = readSmall(f, spec + t.index.offset, t.index.size);
      list = t.byKey.get(this.key) ?? t.other;
    }
    if (t.a !== null) {
      this.aLo = f.readInt32LE(spec + t.a.offset);
      this.aHi = f.readInt32LE(spec + t.a.offset + 4);
    }
    if (t.b !== null) {
      this.bLo = f.readInt32LE(spec + t.b.offset);
      this.bHi = f.readInt32LE(spec + t.b.offset + 4);
    }
    if (t.c !== null) this.c = readSmall(f, spec + t.c.offset, t.c.size);

    let rule: CompiledEntry | null = null;
    for (let i = 0; i < list.length; i++) {
      const e = list[i]!;
      if (this.matches(e, f, vcpu)) {
        rule = e;
        break;
      }
    }
    const exList = rule === null ? t.defaultExceptions : (t.exceptionsOf.get(rule) ?? NO_EXCEPTIONS);
    let exc: CompiledEntry | null = null;
    if (exList.length > 0) {
      for (let i = 0; i < exList.length; i++) {
        const x = exList[i]!;
        if (x.expiresMs !== 0 && this.clock() >= x.expiresMs) continue;
        if (this.matches(x, f, vcpu)) {
          exc = x;
          break;
        }
      }
    }

    const v = this.verdict;
    v.eventId = eventId;
    v.vcpu = vcpu;
    v.seq = seq;
    v.ruleIndex = rule === null ? -1 : rule.index;
    v.ruleId = rule === null ? null : rule.id;
    v.exceptionIndex = exc === null ? -1 : exc.index;
    v.exceptionId = exc === null ? null : exc.id;
    let a: CompiledAction;
    let every: number;
    let slot: number;
    if (exc !== null) {
      a = exc.action!;
      v.askCentral = false;
      v.deadlineMs = 0;
      every = exc.reportEvery;
      v.reportEvent = exc.reportEvent;
      slot = exc.slot;
      v.severity = 0;
    } else if (rule !== null) {
      if (rule.askCentral) {
        a = rule.askDefault ?? t.defaultAction;
        v.askCentral = true;
        v.deadlineMs = rule.deadlineMs;
      } else {
        a = rule.action ?? t.defaultAction;
        v.askCentral = false;
        v.deadlineMs = 0;
      }
      every = rule.reportEvery;
      v.reportEvent = rule.reportEvent;
      slot = rule.slot;
      v.severity = rule.severity;
    } else {
      a = t.defaultAction;
      v.askCentral = false;
      v.deadlineMs = 0;
      every = this.compiled.defaultReportEvery;
      v.reportEvent = this.compiled.defaultReportEvent;
      slot = t.defaultSlot;
      v.severity = 0;
    }
    const n = this.counts[slot]!;
    this.counts[slot] = n + 1;
    v.report = every === 1 ? true : every === 0 ? false : n % every === 0;
    if (!v.report) v.reportEvent = false;
    v.kind = a.kind;
    v.action = a.action;
    v.injectVector = a.injectVector;
    v.injectErrorCode = a.injectErrorCode;
    v.hasNewVal = t.hasReplyData;
    if (t.hasReplyData) {
      // a = old value, b = guest's new value.
      v.lo = (((this.bLo & ~a.keepLo) | (this.aLo & a.keepLo)) & ~a.clearLo) | a.setLo;
      v.hi = (((this.bHi & ~a.keepHi) | (this.aHi & a.keepHi)) & ~a.clearHi) | a.setHi;
    } else {
      v.lo = 0;
      v.hi = 0;
    }
    return v;
  }

  private matches(e: CompiledEntry, f: Buffer, vcpu: number): boolean {
    const c = e.checks;
    if (c === 0) return true;
    if ((c & Check.VALUE) !== 0) {
      if ((c & Check.KEY) !== 0 && !e.keyCheck!.has(this.key)) return false;
      const aLo = this.aLo;
      const aHi = this.aHi;
      const bLo = this.bLo;
      const bHi = this.bHi;
      if ((c & Check.OLD) !== 0 && ((aLo & e.oldMaskLo) !== e.oldValueLo || (aHi & e.oldMaskHi) !== e.oldValueHi)) return false;
      if ((c & Check.NEW) !== 0 && ((bLo & e.newMaskLo) !== e.newValueLo || (bHi & e.newMaskHi) !== e.newValueHi)) return false;
      if ((c & Check.CLEARS) !== 0 && ((aLo & ~bLo & e.clearsLo) | (aHi & ~bHi & e.clearsHi)) === 0) return false;
      if ((c & Check.SETS) !== 0 && ((~aLo & bLo & e.setsLo) | (~aHi & bHi & e.setsHi)) === 0) return false;
      if ((c & Check.CHANGES) !== 0 && (((aLo ^ bLo) & e.changesLo) | ((aHi ^ bHi) & e.changesHi)) === 0) return false;
    }
    if ((c & Check.EVENT) !== 0) {
      if ((c & Check.ACCESS) !== 0 && (this.c & e.access) === 0) return false;
      if ((c & Check.FLAG) !== 0 && (this.c !== 0 ? 1 : 0) !== e.flag) return false;
      if ((c & Check.GPA) !== 0 && !inRanges(e.gpa!, this.bHi ^ BIAS, this.bLo ^ BIAS)) return false;
      if ((c & Check.GVA) !== 0 && !inRanges(e.gva!, this.aHi ^ BIAS, this.aLo ^ BIAS)) return false;
    }
    if ((c & Check.COMMON) !== 0) {
      if ((c & Check.VCPUS) !== 0 && !e.vcpus!.has(vcpu)) return false;
      if ((c & Check.MODE) !== 0 && f[MODE_OFFSET] !== e.mode) return false;
      if ((c & Check.RIP) !== 0 && !inRanges(e.rip!, f.readInt32LE(RIP_OFFSET + 4) ^ BIAS, f.readInt32LE(RIP_OFFSET) ^ BIAS)) return false;
      if ((c & Check.REGS) !== 0) {
        const r = e.regs!;
        for (let i = 0; i < r.length; i += 5) {
          const off = r[i]!;
          if ((f.readInt32LE(off) & r[i + 1]!) !== r[i + 3]! || (f.readInt32LE(off + 4) & r[i + 2]!) !== r[i + 4]!) return false;
        }
      }
    }
    return true;
  }

}
