/**
 * The policy compiler: validates a `Policy` completely (every problem, each with its rule id and path),
 * then turns every rule and exception into a flat, monomorphic `CompiledEntry` whose 64-bit constants are
 * pre-split into u32 halves, so the evaluator compares numbers read straight from the frame.
 *
 * Action legality comes from the KVMI catalog (`legality.ts`): an action is checked against every event
 * kind the rule can apply to (all vCPU kinds for a rule without `kind`), the ask-central default the same
 * way, and an exception against the kinds it can meet.
 */
import { EventAction, events } from '@periscope/kvmi';
import { VerdictsError, type VerdictsErrorCode, type VerdictsIssue } from './errors.js';
import { registerOffset } from './frame.js';
import { illegalBecause, injectReplyAction, kvmiActionValue } from './legality.js';
import {
  EXCEPTION_VECTORS,
  RANGE_END_MAX,
  REGISTER_NAMES,
  SEVERITIES,
  U64_MAX,
  VCPU_EVENT_KINDS,
  isVcpuEventKind,
  vectorInfo,
  type Action,
  type ActionKind,
  type BitsMatch,
  type EventMatch,
  type Policy,
  type ReportSetting,
  type U64Range,
  type VcpuEventKind,
} from './model.js';

/** Default ask-central deadline (ARCHITECTURE.md: "default 5 ms"). */
export const DEFAULT_ASK_CENTRAL_DEADLINE_MS = 5;
export const MAX_ASK_CENTRAL_DEADLINE_MS = 1000;

const lo32 = (x: bigint): number => Number(x & 0xffff_ffffn);
const hi32 = (x: bigint): number => Number(x >> 32n);

/** A compiled action: the KVMI action and the `new_val` recipe as int32 halves. @internal */
export class CompiledAction {
  readonly kind: ActionKind;
  /** KVMI action value (CONTINUE 0, RETRY 1, CRASH 2). */
  readonly action: number;
  /** `new_val = ((new & ~keep) | (old & keep)) & ~clear | set`, per half. */
  readonly keepLo: number;
  readonly keepHi: number;
  readonly clearLo: number;
  readonly clearHi: number;
  readonly setLo: number;
  readonly setHi: number;
  /** For inject: vector and error code; -1 otherwise. */
  readonly injectVector: number;
  readonly injectErrorCode: number;
  /** `kinds`: the event kinds the action applies to (an `inject` on CR/MSR replies CONTINUE with the old value). */
  constructor(a: Action, kinds: readonly VcpuEventKind[] = []) {
    let keep = 0n;
    let clear = 0n;
    let set = 0n;
    const injectContinues = a.kind === 'inject' && kinds.length > 0 && kinds.every((k) => injectReplyAction(k) === 'CONTINUE');
    if (a.kind === 'deny') keep = a.forceBits ?? U64_MAX;
    else if (injectContinues) keep = U64_MAX; // the write is refused; the exception is injected at the instruction
    else if (a.kind === 'crash') keep = U64_MAX; // a CRASH reply to CR/MSR still carries the old value
    else if (a.kind === 'rewrite') {
      clear = a.clearBits ?? 0n;
      set = a.setBits ?? 0n;
    }
    this.kind = a.kind;
    this.action = injectContinues ? EventAction.CONTINUE : kvmiActionValue(a.kind);
    this.keepLo = lo32(keep) | 0;
    this.keepHi = hi32(keep) | 0;
    this.clearLo = lo32(clear) | 0;
    this.clearHi = hi32(clear) | 0;
    this.setLo = lo32(set) | 0;
    this.setHi = hi32(set) | 0;
    this.injectVector = a.kind === 'inject' ? a.vector : -1;
    this.injectErrorCode = a.kind === 'inject' ? (a.errorCode ?? 0) : -1;
  }
}

/** Report decision inputs: 0 = never, 1 = always, N = one in N. @internal */
function reportEvery(r: ReportSetting | undefined): number {
  if (!r) return 1;
  return r.mode === 'never' ? 0 : r.mode === 'always' ? 1 : (r.oneIn ?? 1);
}

/**
 * One rule or exception, flattened. Every 64-bit constant is split into int32 halves (masks and values for
 * `&`; ranges biased, see `biased`). Absent criteria are null / 0 / -1 so the evaluator tests a field, never
 * a shape. @internal
 */
export class CompiledEntry {
  /** Index in `policy.rules` or `policy.exceptions`. */
  readonly index: number;
  readonly id: string;
  readonly isException: boolean;
  /** Event kinds the entry can match. */
  readonly kinds: readonly VcpuEventKind[];
  readonly vms: ReadonlySet<string> | null;
  readonly vcpus: ReadonlySet<number> | null;
  readonly mode: number;
  /** Flattened biased int32 [startHi, startLo, lastHi, lastLo]* (inclusive); null = any. */
  readonly rip: readonly number[] | null;
  readonly gpa: readonly number[] | null;
  readonly gva: readonly number[] | null;
  /** Flattened [frameOffset, maskLo, maskHi, valueLo, valueHi]*. */
  readonly regs: readonly number[] | null;
  /** CR/MSR/XCR/descriptor/vector set. Rules are bucketed by it (see Evaluator); exceptions test it. */
  readonly keys: ReadonlySet<number> | null;
  readonly keyCheck: ReadonlySet<number> | null;
  readonly hasOld: boolean;
  readonly oldMaskLo: number;
  readonly oldMaskHi: number;
  readonly oldValueLo: number;
  readonly oldValueHi: number;
  readonly hasNew: boolean;
  readonly newMaskLo: number;
  readonly newMaskHi: number;
  readonly newValueLo: number;
  readonly newValueHi: number;
  readonly hasClears: boolean;
  readonly clearsLo: number;
  readonly clearsHi: number;
  readonly hasSets: boolean;
  readonly setsLo: number;
  readonly setsHi: number;
  readonly hasChanges: boolean;
  readonly changesLo: number;
  readonly changesHi: number;
  /** PF access mask; 0 = any. */
  readonly access: number;
  /** DESCRIPTOR write / SINGLESTEP failed: -1 any, 0 false, 1 true. */
  readonly flag: number;
  /** Which criteria are present (`Check` bits), so absent ones cost one bit test. */
  readonly checks: number;

  // ---- outcome ----
  /** null = the event kind's default action. */
  readonly action: CompiledAction | null;
  readonly askCentral: boolean;
  readonly deadlineMs: number;
  /** Ask-central default; null = the kind's default action. */
  readonly askDefault: CompiledAction | null;
  readonly reportEvery: number;
  readonly reportEvent: boolean;
  /** 0 = none, 1..5 = info..critical. */
  readonly severity: number;
  /** Counter slot in the evaluator. */
  readonly slot: number;
  /** Exceptions: rule ids targeted (null = any rule and the default). */
  readonly targets: ReadonlySet<string> | null;
  /** Exceptions: expiry in ms since the epoch; 0 = never. */
  readonly expiresMs: number;

  constructor(init: {
    index: number; id: string; isException: boolean; kinds: readonly VcpuEventKind[]; match: EventMatch;
    action: CompiledAction | null; askCentral: boolean; deadlineMs: number; askDefault: CompiledAction | null;
    report: ReportSetting | undefined; severity: number; slot: number; targets: ReadonlySet<string> | null; expiresMs: number;
  }) {
    const m = init.match;
    this.index = init.index;
    this.id = init.id;
    this.isException = init.isException;
    this.kinds = init.kinds;
    this.vms = m.vms && m.vms.length > 0 ? new Set(m.vms.map((v) => v.toLowerCase())) : null;
    this.vcpus = m.vcpus && m.vcpus.length > 0 ? new Set(m.vcpus) : null;
    this.mode = m.mode ?? 0;
    this.rip = flatRanges(m.rip);
    this.gpa = flatRanges(m.gpa);
    this.gva = flatRanges(m.gva);
    this.regs = m.regs && m.regs.length > 0
      ? m.regs.flatMap((r) => [registerOffset(r.reg), lo32(r.mask) | 0, hi32(r.mask) | 0, lo32(r.value) | 0, hi32(r.value) | 0])
      : null;
    const idx = m.cr ?? m.msr ?? m.xcr ?? m.descriptor ?? m.vector;
    this.keys = idx && idx.length > 0 ? new Set(idx.map((x) => x | 0)) : null; // int32, as the evaluator reads them
    this.keyCheck = init.isException ? this.keys : null;
    const bits = (b: BitsMatch | undefined) => [b ? lo32(b.mask) | 0 : 0, b ? hi32(b.mask) | 0 : 0, b ? lo32(b.value) | 0 : 0, b ? hi32(b.value) | 0 : 0] as const;
    this.hasOld = m.old !== undefined;
    [this.oldMaskLo, this.oldMaskHi, this.oldValueLo, this.oldValueHi] = bits(m.old);
    this.hasNew = m.new !== undefined;
    [this.newMaskLo, this.newMaskHi, this.newValueLo, this.newValueHi] = bits(m.new);
    this.hasClears = m.clears !== undefined;
    this.clearsLo = lo32(m.clears ?? 0n) | 0;
    this.clearsHi = hi32(m.clears ?? 0n) | 0;
    this.hasSets = m.sets !== undefined;
    this.setsLo = lo32(m.sets ?? 0n) | 0;
    this.setsHi = hi32(m.sets ?? 0n) | 0;
    this.hasChanges = m.changes !== undefined;
    this.changesLo = lo32(m.changes ?? 0n) | 0;
    this.changesHi = hi32(m.changes ?? 0n) | 0;
    this.access = m.access ?? 0;
    const flag = m.write ?? m.failed;
    this.flag = flag === undefined ? -1 : flag ? 1 : 0;
    this.checks =
      (this.keyCheck !== null ? Check.KEY : 0) |
      (this.hasOld ? Check.OLD : 0) |
      (this.hasNew ? Check.NEW : 0) |
      (this.hasClears ? Check.CLEARS : 0) |
      (this.hasSets ? Check.SETS : 0) |
      (this.hasChanges ? Check.CHANGES : 0) |
      (this.access !== 0 ? Check.ACCESS : 0) |
      (this.flag !== -1 ? Check.FLAG : 0) |
      (this.gpa !== null ? Check.GPA : 0) |
      (this.gva !== null ? Check.GVA : 0) |
      (this.vcpus !== null ? Check.VCPUS : 0) |
      (this.mode !== 0 ? Check.MODE : 0) |
      (this.rip !== null ? Check.RIP : 0) |
      (this.regs !== null ? Check.REGS : 0);
    this.action = init.action;
    this.askCentral = init.askCentral;
    this.deadlineMs = init.deadlineMs;
    this.askDefault = init.askDefault;
    this.reportEvery = reportEvery(init.report);
    this.reportEvent = init.report?.withEvent ?? false;
    this.severity = init.severity;
    this.slot = init.slot;
    this.targets = init.targets;
    this.expiresMs = init.expiresMs;
  }
}

/** Presence bits of `CompiledEntry.checks`, grouped so a whole absent group costs one test. @internal */
export const Check = {
  KEY: 1 << 0,
  OLD: 1 << 1,
  NEW: 1 << 2,
  CLEARS: 1 << 3,
  SETS: 1 << 4,
  CHANGES: 1 << 5,
  ACCESS: 1 << 8,
  FLAG: 1 << 9,
  GPA: 1 << 10,
  GVA: 1 << 11,
  VCPUS: 1 << 16,
  MODE: 1 << 17,
  RIP: 1 << 18,
  REGS: 1 << 19,
  /** Groups. */
  VALUE: 0xff,
  EVENT: 0xff00,
  COMMON: 0xff0000,
} as const;

/**
 * u32 → int32 whose signed order is the unsigned order (flip the sign bit). The evaluator biases the
 * frame's halves the same way, so every number on the hot path is an int32 — a Smi, never a heap number.
 */
export const biased = (u32: number): number => (u32 ^ 0x8000_0000) | 0;

/** Ranges as biased int32 [startHi, startLo, lastHi, lastLo]* with last = end − 1 (inclusive). */
function flatRanges(rs: readonly U64Range[] | undefined): number[] | null {
  if (!rs || rs.length === 0) return null;
  return rs.flatMap((r) => {
    const last = r.end - 1n;
    return [biased(hi32(r.start)), biased(lo32(r.start)), biased(hi32(last)), biased(lo32(last))];
  });
}

/** The output of `compilePolicy`: immutable, shareable by every evaluator (one per VM). */
export class CompiledPolicy {
  /** The validated source policy. */
  readonly policy: Policy;
  readonly ruleIds: readonly string[];
  readonly exceptionIds: readonly string[];
  /** @internal */
  readonly rules: readonly CompiledEntry[];
  /** @internal */
  readonly exceptions: readonly CompiledEntry[];
  /** @internal Default action per event id. */
  readonly defaults: ReadonlyMap<number, CompiledAction>;
  /** @internal */
  readonly defaultReportEvery: number;
  /** @internal */
  readonly defaultReportEvent: boolean;
  /** @internal Counter slots: rules, then exceptions, then one per event id (`defaultSlotBase + id`). */
  readonly defaultSlotBase: number;
  readonly slotCount: number;
  /** @internal */
  constructor(init: Omit<CompiledPolicy, never>) {
    this.policy = init.policy;
    this.ruleIds = init.ruleIds;
    this.exceptionIds = init.exceptionIds;
    this.rules = init.rules;
    this.exceptions = init.exceptions;
    this.defaults = init.defaults;
    this.defaultReportEvery = init.defaultReportEvery;
    this.defaultReportEvent = init.defaultReportEvent;
    this.defaultSlotBase = init.defaultSlotBase;
    this.slotCount = init.slotCount;
  }
}

/** One action a compiled policy can take, and where it comes from. */
export interface PolicyActionUse {
  readonly kind: ActionKind;
  /** `rule ID`, `rule ID (ask-central default)`, `exception ID`, `default for KIND`. */
  readonly where: string;
}

/**
 * Every action the compiled policy can apply, from what the evaluator will actually use: rule actions,
 * ask-central defaults, exception actions and the per-kind defaults. The host agent gates the dangerous
 * ones (inject, crash) of a policy pushed by analysis with its allow-list.
 */
export function policyActions(c: CompiledPolicy): PolicyActionUse[] {
  const out: PolicyActionUse[] = [];
  for (const r of c.rules) {
    if (r.action) out.push({ kind: r.action.kind, where: `rule ${r.id}` });
    if (r.askDefault) out.push({ kind: r.askDefault.kind, where: `rule ${r.id} (ask-central default)` });
  }
  for (const x of c.exceptions) if (x.action) out.push({ kind: x.action.kind, where: `exception ${x.id}` });
  for (const k of VCPU_EVENT_KINDS) {
    const d = c.defaults.get(events[k].id);
    if (d) out.push({ kind: d.kind, where: `default for ${k}` });
  }
  return out;
}

// ---- validation ---------------------------------------------------------------------------------

class Issues {
  readonly list: VerdictsIssue[] = [];
  add(code: VerdictsErrorCode, ruleId: string | null, path: string, message: string): void {
    this.list.push({ code, ruleId, path, message });
  }
}

const isU64 = (x: unknown): x is bigint => typeof x === 'bigint' && x >= 0n && x <= U64_MAX;
const isInt = (x: unknown, min: number, max: number): x is number =>
  typeof x === 'number' && Number.isInteger(x) && x >= min && x <= max;
const hex = (x: bigint): string => `0x${x.toString(16)}`;
const UUID_TEXT = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

/** Kind-specific criteria and the kinds they belong to. */
const DETAIL_KINDS: Readonly<Record<string, readonly VcpuEventKind[]>> = {
  cr: ['CR'],
  msr: ['MSR'],
  xcr: ['XSETBV'],
  old: ['CR', 'MSR', 'XSETBV'],
  new: ['CR', 'MSR', 'XSETBV'],
  clears: ['CR', 'MSR', 'XSETBV'],
  sets: ['CR', 'MSR', 'XSETBV'],
  changes: ['CR', 'MSR', 'XSETBV'],
  gpa: ['PF', 'BREAKPOINT'],
  gva: ['PF'],
  access: ['PF'],
  descriptor: ['DESCRIPTOR'],
  write: ['DESCRIPTOR'],
  vector: ['TRAP'],
  failed: ['SINGLESTEP'],
};
const COMMON_KEYS = new Set(['kind', 'vms', 'vcpus', 'rip', 'mode', 'regs']);

function checkRanges(issues: Issues, id: string | null, path: string, rs: readonly U64Range[] | undefined): void {
  if (rs === undefined) return;
  if (!Array.isArray(rs)) return issues.add('bad-range', id, path, 'expected a list of ranges');
  rs.forEach((r, i) => {
    const p = `${path}[${i}]`;
    if (!isU64(r.start)) return issues.add('bad-range', id, p, `start ${String(r.start)} is not a u64`);
    if (typeof r.end !== 'bigint' || r.end < 0n || r.end > RANGE_END_MAX) return issues.add('bad-range', id, p, `end ${String(r.end)} is not in [0, 2^64]`);
    if (r.end <= r.start) issues.add('bad-range', id, p, `empty range: end ${hex(r.end)} <= start ${hex(r.start)} (start is inclusive, end exclusive)`);
  });
}

function checkBits(issues: Issues, id: string | null, path: string, b: BitsMatch | undefined): void {
  if (b === undefined) return;
  if (!isU64(b.mask)) return issues.add('bad-mask', id, `${path}.mask`, `${String(b.mask)} is not a u64`);
  if (!isU64(b.value)) return issues.add('bad-mask', id, `${path}.value`, `${String(b.value)} is not a u64`);
  if ((b.value & ~b.mask) !== 0n) issues.add('bad-mask', id, path, `value ${hex(b.value)} has bits outside mask ${hex(b.mask)}: it can never match`);
}

function checkTransition(issues: Issues, id: string | null, path: string, m: bigint | undefined): void {
  if (m === undefined) return;
  if (!isU64(m)) return issues.add('bad-mask', id, path, `${String(m)} is not a u64`);
  if (m === 0n) issues.add('bad-mask', id, path, 'a zero mask can never match');
}

function checkIntList(issues: Issues, id: string | null, path: string, xs: readonly number[] | undefined, ok: (x: number) => boolean, what: string): void {
  if (xs === undefined) return;
  if (!Array.isArray(xs)) return issues.add('bad-value', id, path, 'expected a list');
  xs.forEach((x, i) => {
    if (!ok(x)) issues.add('bad-value', id, `${path}[${i}]`, `${String(x)} is not ${what}`);
  });
}

/** Validate a match; returns the event kinds it can apply to. */
function checkMatch(issues: Issues, id: string | null, path: string, m: EventMatch | undefined): VcpuEventKind[] {
  if (m === undefined || m === null || typeof m !== 'object') {
    issues.add('bad-value', id, path, 'a match is required (use {} to match every event)');
    return [];
  }
  let kinds: VcpuEventKind[] = [...VCPU_EVENT_KINDS];
  if (m.kind !== undefined) {
    if (!isVcpuEventKind(m.kind)) {
      const why = (m.kind as string) === 'UNHOOK' ? 'UNHOOK is a VM event and gets no reply' : `not a vCPU event kind (${VCPU_EVENT_KINDS.join(', ')})`;
      issues.add('bad-kind', id, `${path}.kind`, `${String(m.kind)}: ${why}`);
      return [];
    }
    kinds = [m.kind];
  }
  for (const [key, value] of Object.entries(m)) {
    if (value === undefined || COMMON_KEYS.has(key)) continue;
    const allowed = DETAIL_KINDS[key];
    if (!allowed) {
      issues.add('bad-value', id, `${path}.${key}`, 'unknown criterion');
      continue;
    }
    if (m.kind === undefined || !allowed.includes(m.kind)) {
      issues.add('bad-kind', id, `${path}.${key}`, `'${key}' applies to ${allowed.join('/')} events only${m.kind ? `, not ${m.kind}` : ' (set match.kind)'}`);
    }
  }
  if (m.vms !== undefined) {
    if (!Array.isArray(m.vms)) issues.add('bad-value', id, `${path}.vms`, 'expected a list of UUIDs');
    else m.vms.forEach((v, i) => { if (typeof v !== 'string' || !UUID_TEXT.test(v)) issues.add('bad-value', id, `${path}.vms[${i}]`, `${String(v)} is not a canonical UUID`); });
  }
  checkIntList(issues, id, `${path}.vcpus`, m.vcpus, (x) => isInt(x, 0, 0xffff), 'a vCPU index (0–65535)');
  checkRanges(issues, id, `${path}.rip`, m.rip);
  if (m.mode !== undefined && ![2, 4, 8].includes(m.mode)) issues.add('bad-value', id, `${path}.mode`, `${String(m.mode)} is not a KVMI mode (2, 4, 8)`);
  if (m.regs !== undefined) {
    if (!Array.isArray(m.regs)) issues.add('bad-value', id, `${path}.regs`, 'expected a list');
    else m.regs.forEach((r, i) => {
      const p = `${path}.regs[${i}]`;
      if (!(REGISTER_NAMES as readonly string[]).includes(r.reg)) issues.add('bad-value', id, `${p}.reg`, `${String(r.reg)} is not a kvm_regs field`);
      checkBits(issues, id, p, r);
    });
  }
  checkIntList(issues, id, `${path}.cr`, m.cr, (x) => x === 0 || x === 3 || x === 4, 'an interceptable CR (0, 3, 4)');
  checkIntList(issues, id, `${path}.msr`, m.msr, (x) => isInt(x, 0, 0xffff_ffff), 'an MSR index (u32)');
  checkIntList(issues, id, `${path}.xcr`, m.xcr, (x) => x === 0, 'an XCR KVMI reports (0)');
  checkIntList(issues, id, `${path}.descriptor`, m.descriptor, (x) => isInt(x, 1, 4), 'a KVMI_DESC_* value (1–4)');
  checkIntList(issues, id, `${path}.vector`, m.vector, (x) => isInt(x, 0, 255), 'a vector (0–255)');
  checkBits(issues, id, `${path}.old`, m.old);
  checkBits(issues, id, `${path}.new`, m.new);
  checkTransition(issues, id, `${path}.clears`, m.clears);
  checkTransition(issues, id, `${path}.sets`, m.sets);
  checkTransition(issues, id, `${path}.changes`, m.changes);
  checkRanges(issues, id, `${path}.gpa`, m.gpa);
  checkRanges(issues, id, `${path}.gva`, m.gva);
  if (m.access !== undefined && !isInt(m.access, 1, 7)) issues.add('bad-mask', id, `${path}.access`, `${String(m.access)} is not a non-empty subset of R=1|W=2|X=4`);
  if (m.write !== undefined && typeof m.write !== 'boolean') issues.add('bad-value', id, `${path}.write`, 'expected a boolean');
  if (m.failed !== undefined && typeof m.failed !== 'boolean') issues.add('bad-value', id, `${path}.failed`, 'expected a boolean');
  return kinds;
}

/** Validate an action's parameters and its legality for every kind; returns it compiled (or null). */
function checkAction(issues: Issues, id: string, path: string, a: Action | undefined, kinds: readonly VcpuEventKind[]): CompiledAction | null {
  if (a === undefined || a === null || typeof a !== 'object') {
    issues.add('bad-value', id, path, 'an action is required');
    return null;
  }
  const before = issues.list.length;
  switch (a.kind) {
    case 'deny':
      if (a.forceBits !== undefined) {
        if (!isU64(a.forceBits)) issues.add('bad-mask', id, `${path}.forceBits`, `${String(a.forceBits)} is not a u64`);
        else if (a.forceBits === 0n) issues.add('bad-mask', id, `${path}.forceBits`, 'a zero mask forces nothing (use allow, or deny without forceBits)');
      }
      break;
    case 'rewrite':
      if (a.clearBits !== undefined && !isU64(a.clearBits)) issues.add('bad-mask', id, `${path}.clearBits`, `${String(a.clearBits)} is not a u64`);
      if (a.setBits !== undefined && !isU64(a.setBits)) issues.add('bad-mask', id, `${path}.setBits`, `${String(a.setBits)} is not a u64`);
      break;
    case 'inject': {
      const info = isInt(a.vector, 0, 31) ? vectorInfo(a.vector) : undefined;
      if (!info) {
        issues.add('bad-value', id, `${path}.vector`, `${String(a.vector)} is not an injectable exception (${Object.entries(EXCEPTION_VECTORS).map(([n, v]) => `${n}=${v.vector}`).join(' ')})`);
      } else if (a.errorCode !== undefined) {
        if (!info.errorCode) issues.add('bad-value', id, `${path}.errorCode`, `${info.name} has no error code`);
        else if (!isInt(a.errorCode, 0, 0xffff_ffff)) issues.add('bad-value', id, `${path}.errorCode`, `${String(a.errorCode)} is not a u32`);
      }
      break;
    }
    case 'allow':
    case 'skip':
    case 'retry':
    case 'crash':
      break;
    default:
      issues.add('bad-value', id, `${path}.kind`, `unknown action ${String((a as { kind: unknown }).kind)}`);
      return null;
  }
  for (const k of kinds) {
    const why = illegalBecause(k, a.kind);
    if (why) issues.add('action-not-allowed', id, path, `'${a.kind}' is not allowed for ${k} events: ${why}`);
  }
  return issues.list.length === before ? new CompiledAction(a, kinds) : null;
}

function checkReport(issues: Issues, id: string | null, path: string, r: ReportSetting | undefined): void {
  if (r === undefined) return;
  if (r === null || typeof r !== 'object' || !['always', 'sampled', 'never'].includes(r.mode)) {
    return issues.add('bad-report', id, path, 'expected mode always, sampled or never');
  }
  if (r.mode === 'sampled' && !isInt(r.oneIn, 1, 0xffff_ffff)) issues.add('bad-report', id, `${path}.oneIn`, `sampled reporting needs oneIn ≥ 1, got ${String(r.oneIn)}`);
  if (r.mode !== 'sampled' && r.oneIn !== undefined) issues.add('bad-report', id, `${path}.oneIn`, `oneIn applies to mode sampled, not ${r.mode}`);
  if (r.withEvent !== undefined && typeof r.withEvent !== 'boolean') issues.add('bad-report', id, `${path}.withEvent`, 'expected a boolean');
}

function checkDeadline(issues: Issues, id: string | null, path: string, ms: number | undefined): void {
  if (ms !== undefined && !isInt(ms, 1, MAX_ASK_CENTRAL_DEADLINE_MS)) {
    issues.add('bad-deadline', id, path, `${String(ms)} ms is outside 1–${MAX_ASK_CENTRAL_DEADLINE_MS} ms`);
  }
}

const defaultId = (k: VcpuEventKind | '*') => `<default:${k}>`;

/**
 * Validate and compile a policy. Throws one `VerdictsError` listing every issue (its `code`, `ruleId` and
 * `path` are the first issue's).
 */
export function compilePolicy(policy: Policy): CompiledPolicy {
  const issues = new Issues();
  if (typeof policy.id !== 'string' || policy.id === '') issues.add('bad-value', null, 'id', 'a policy id is required');
  if (typeof policy.version !== 'bigint' || policy.version < 0n) issues.add('bad-value', null, 'version', 'expected a non-negative bigint');
  checkReport(issues, null, 'defaultReport', policy.defaultReport);
  checkDeadline(issues, null, 'maxAskCentralDeadlineMs', policy.maxAskCentralDeadlineMs);
  if (policy.maxHeldEvents !== undefined && !isInt(policy.maxHeldEvents, 0, 0xffff_ffff)) {
    issues.add('bad-value', null, 'maxHeldEvents', `${String(policy.maxHeldEvents)} is not a u32`);
  }
  if (policy.interception !== undefined) {
    const i = policy.interception;
    (i.events ?? []).forEach((k, n) => { if (!isVcpuEventKind(k)) issues.add('bad-kind', null, `interception.events[${n}]`, `${String(k)} is not a vCPU event kind`); });
    checkIntList(issues, null, 'interception.crs', i.crs, (x) => x === 0 || x === 3 || x === 4, 'an interceptable CR (0, 3, 4)');
    checkIntList(issues, null, 'interception.msrs', i.msrs, (x) => isInt(x, 0, 0xffff_ffff), 'an MSR index (u32)');
  }
  const maxDeadline = policy.maxAskCentralDeadlineMs ?? MAX_ASK_CENTRAL_DEADLINE_MS;
  const rulesIn = Array.isArray(policy.rules) ? policy.rules : [];
  if (!Array.isArray(policy.rules)) issues.add('bad-value', null, 'rules', 'expected a list of rules');
  const exceptionsIn = policy.exceptions ?? [];

  // Defaults, per kind.
  const defaults = new Map<number, CompiledAction>();
  if (policy.defaultActions !== undefined) {
    for (const k of Object.keys(policy.defaultActions)) {
      if (!isVcpuEventKind(k)) issues.add('bad-kind', defaultId('*'), `defaultActions.${k}`, `${k} is not a vCPU event kind`);
    }
  }
  if (policy.defaultAction !== undefined) {
    const kindsUsingIt = VCPU_EVENT_KINDS.filter((k) => policy.defaultActions?.[k] === undefined);
    checkAction(issues, defaultId('*'), 'defaultAction', policy.defaultAction, kindsUsingIt);
  }
  for (const k of VCPU_EVENT_KINDS) {
    const own = policy.defaultActions?.[k];
    const a = own ?? policy.defaultAction ?? { kind: 'allow' as const };
    const c = own !== undefined ? checkAction(issues, defaultId(k), `defaultActions.${k}`, own, [k]) : illegalBecause(k, a.kind) ? null : new CompiledAction(a, [k]);
    if (c) defaults.set(events[k].id, c);
  }

  // Rules.
  const ruleIds = new Map<string, number>();
  const ruleKinds: VcpuEventKind[][] = [];
  const rules: CompiledEntry[] = [];
  const severityOf = (s: string | undefined) => (s === undefined ? 0 : SEVERITIES.indexOf(s as (typeof SEVERITIES)[number]) + 1);
  rulesIn.forEach((r, i) => {
    const p = `rules[${i}]`;
    const id = typeof r.id === 'string' ? r.id : '';
    if (id === '') issues.add('duplicate-id', null, `${p}.id`, 'a rule id is required');
    else if (ruleIds.has(id)) issues.add('duplicate-id', id, `${p}.id`, `also the id of rules[${ruleIds.get(id)}]`);
    else ruleIds.set(id, i);
    const kinds = checkMatch(issues, id, `${p}.match`, r.match);
    ruleKinds.push(kinds);
    if (r.action !== undefined && r.askCentral !== undefined) issues.add('bad-value', id, p, 'a rule has an action or askCentral, not both');
    const action = r.action !== undefined ? checkAction(issues, id, `${p}.action`, r.action, kinds) : null;
    let askDefault: CompiledAction | null = null;
    let deadlineMs = 0;
    if (r.askCentral !== undefined) {
      checkDeadline(issues, id, `${p}.askCentral.deadlineMs`, r.askCentral.deadlineMs);
      deadlineMs = Math.min(r.askCentral.deadlineMs ?? DEFAULT_ASK_CENTRAL_DEADLINE_MS, maxDeadline);
      if (r.askCentral.default !== undefined) askDefault = checkAction(issues, id, `${p}.askCentral.default`, r.askCentral.default, kinds);
    }
    checkReport(issues, id, `${p}.report`, r.report);
    if (r.severity !== undefined && !SEVERITIES.includes(r.severity)) issues.add('bad-value', id, `${p}.severity`, `${String(r.severity)} is not one of ${SEVERITIES.join(', ')}`);
    if (issues.list.length > 0) return; // compiled entries are only built for a clean policy
    rules.push(new CompiledEntry({
      index: i, id, isException: false, kinds, match: r.match, action, askCentral: r.askCentral !== undefined, deadlineMs, askDefault,
      report: r.report ?? policy.defaultReport, severity: severityOf(r.severity), slot: i, targets: null, expiresMs: 0,
    }));
  });

  // Exceptions.
  const exceptionIds = new Set<string>();
  const exceptions: CompiledEntry[] = [];
  exceptionsIn.forEach((x, j) => {
    const p = `exceptions[${j}]`;
    const id = typeof x.id === 'string' ? x.id : '';
    if (id === '') issues.add('duplicate-id', null, `${p}.id`, 'an exception id is required');
    else if (exceptionIds.has(id)) issues.add('duplicate-id', id, `${p}.id`, 'duplicate exception id');
    exceptionIds.add(id);
    const own = checkMatch(issues, id, `${p}.match`, x.match);
    const targets = x.rules ?? [];
    let reach: Set<VcpuEventKind>;
    if (targets.length === 0) reach = new Set(VCPU_EVENT_KINDS);
    else {
      reach = new Set();
      targets.forEach((t, k) => {
        const ri = ruleIds.get(t);
        if (ri === undefined) issues.add('bad-exception', id, `${p}.rules[${k}]`, `no rule with id ${JSON.stringify(t)}`);
        else for (const kind of ruleKinds[ri] ?? []) reach.add(kind);
      });
    }
    const kinds = own.filter((k) => reach.has(k));
    if (own.length > 0 && reach.size > 0 && kinds.length === 0) {
      issues.add('bad-exception', id, `${p}.match.kind`, `matches ${own.join('/')} events, which the rules it targets never see`);
    }
    const action = checkAction(issues, id, `${p}.action`, x.action, kinds);
    checkReport(issues, id, `${p}.report`, x.report);
    if (x.expiresUnixNs !== undefined && !isU64(x.expiresUnixNs)) issues.add('bad-value', id, `${p}.expiresUnixNs`, 'expected a u64 (ns since the epoch)');
    if (issues.list.length > 0) return;
    exceptions.push(new CompiledEntry({
      index: j, id, isException: true, kinds, match: x.match, action, askCentral: false, deadlineMs: 0, askDefault: null,
      report: x.report, severity: 0, slot: rulesIn.length + j, targets: targets.length > 0 ? new Set(targets) : null,
      // Expired once now_ms * 1e6 >= expiresUnixNs, i.e. from ceil(ns / 1e6) ms on.
      expiresMs: x.expiresUnixNs ? Number((x.expiresUnixNs + 999_999n) / 1_000_000n) : 0,
    }));
  });

  if (issues.list.length > 0) throw new VerdictsError(issues.list);

  const defaultSlotBase = rulesIn.length + exceptionsIn.length;
  const maxEventId = Math.max(...Object.values(events).map((e) => e.id));
  return new CompiledPolicy({
    policy,
    ruleIds: rulesIn.map((r) => r.id),
    exceptionIds: exceptionsIn.map((x) => x.id),
    rules,
    exceptions,
    defaults,
    defaultReportEvery: reportEvery(policy.defaultReport),
    defaultReportEvent: policy.defaultReport?.withEvent ?? false,
    defaultSlotBase,
    slotCount: defaultSlotBase + maxEventId + 1,
  });
}
