/**
 * A deliberately slow, straightforward reference evaluator: decodes the event into objects with
 * `decodeEvent` and evaluates the *source* `Policy` with bigint arithmetic, written from the README's
 * semantics without sharing code with the compiler/evaluator. The property test checks the fast path
 * against it.
 */
import { decodeEvent } from '@periscope/kvmi';
import type { Action, BitsMatch, EventMatch, Policy, ReportSetting, U64Range, VcpuEventKind } from '@periscope/verdicts';

const ALL = (1n << 64n) - 1n;
const KVMI = { CONTINUE: 0, RETRY: 1, CRASH: 2 } as const;
const ACTION_NUMBER: Record<Action['kind'], number> = {
  allow: KVMI.CONTINUE, deny: KVMI.CONTINUE, rewrite: KVMI.CONTINUE, skip: KVMI.RETRY, retry: KVMI.RETRY, inject: KVMI.RETRY, crash: KVMI.CRASH,
};
const SEVERITY = { info: 1, low: 2, medium: 3, high: 4, critical: 5 } as const;

export interface RefVerdict {
  ruleIndex: number;
  exceptionIndex: number;
  kind: Action['kind'];
  action: number;
  newVal: bigint | null;
  injectVector: number;
  injectErrorCode: number;
  askCentral: boolean;
  deadlineMs: number;
  report: boolean;
  reportEvent: boolean;
  severity: number;
}

type Ev = Extract<ReturnType<typeof decodeEvent>, { kind: 'vcpu-event' }>;

const inRange = (x: bigint, rs: readonly U64Range[] | undefined) => !rs || rs.length === 0 || rs.some((r) => r.start <= x && x < r.end);
const bits = (x: bigint, b: BitsMatch | undefined) => !b || (x & b.mask) === b.value;
const listHas = (xs: readonly number[] | undefined, x: number) => !xs || xs.length === 0 || xs.includes(x);

export class ReferenceEvaluator {
  private readonly counts = new Map<string, number>();
  constructor(private readonly policy: Policy, private readonly vmUuid?: string, private readonly now: () => number = Date.now) {}

  private matches(m: EventMatch, ev: Ev): boolean {
    const kind = ev.event.key as VcpuEventKind;
    const d = (ev.data ?? {}) as Record<string, unknown>;
    if (m.kind !== undefined && m.kind !== kind) return false;
    if (m.vms && m.vms.length > 0 && (this.vmUuid === undefined || !m.vms.map((v) => v.toLowerCase()).includes(this.vmUuid.toLowerCase()))) return false;
    if (!listHas(m.vcpus, ev.vcpu)) return false;
    if (!inRange(ev.arch.regs.rip, m.rip)) return false;
    if (m.mode !== undefined && ev.arch.mode !== m.mode) return false;
    for (const r of m.regs ?? []) if ((ev.arch.regs[r.reg] & r.mask) !== r.value) return false;
    if (kind === 'CR' && !listHas(m.cr, d['cr'] as number)) return false;
    if (kind === 'MSR' && !listHas(m.msr, d['msr'] as number)) return false;
    if (kind === 'XSETBV' && !listHas(m.xcr, d['xcr'] as number)) return false;
    if (kind === 'CR' || kind === 'MSR' || kind === 'XSETBV') {
      const o = d['old_value'] as bigint;
      const n = d['new_value'] as bigint;
      if (!bits(o, m.old) || !bits(n, m.new)) return false;
      if (m.clears !== undefined && (o & ~n & m.clears & ALL) === 0n) return false;
      if (m.sets !== undefined && (~o & n & m.sets & ALL) === 0n) return false;
      if (m.changes !== undefined && ((o ^ n) & m.changes) === 0n) return false;
    }
    if (kind === 'PF') {
      if (!inRange(d['gpa'] as bigint, m.gpa) || !inRange(d['gva'] as bigint, m.gva)) return false;
      if (m.access !== undefined && ((d['access'] as number) & m.access) === 0) return false;
    }
    if (kind === 'BREAKPOINT' && !inRange(d['gpa'] as bigint, m.gpa)) return false;
    if (kind === 'DESCRIPTOR') {
      if (!listHas(m.descriptor, d['descriptor'] as number)) return false;
      if (m.write !== undefined && ((d['write'] as number) !== 0) !== m.write) return false;
    }
    if (kind === 'TRAP' && !listHas(m.vector, d['nr'] as number)) return false;
    if (kind === 'SINGLESTEP' && m.failed !== undefined && ((d['failed'] as number) !== 0) !== m.failed) return false;
    return true;
  }

  private defaultAction(kind: VcpuEventKind): Action {
    return this.policy.defaultActions?.[kind] ?? this.policy.defaultAction ?? { kind: 'allow' };
  }

  private sample(key: string, r: ReportSetting | undefined): boolean {
    const n = this.counts.get(key) ?? 0;
    this.counts.set(key, n + 1);
    const mode = r?.mode ?? 'always';
    if (mode === 'never') return false;
    if (mode === 'always') return true;
    return n % (r!.oneIn ?? 1) === 0;
  }

  evaluate(frame: Buffer): RefVerdict {
    const ev = decodeEvent(frame);
    if (ev.kind !== 'vcpu-event') throw new Error('not a vCPU event');
    const kind = ev.event.key as VcpuEventKind;
    const rules = this.policy.rules;
    const ri = rules.findIndex((r) => this.matches(r.match, ev));
    const rule = ri >= 0 ? rules[ri]! : null;
    const xs = this.policy.exceptions ?? [];
    const xi = xs.findIndex((x) => {
      const targets = x.rules ?? [];
      if (rule === null ? targets.length > 0 : targets.length > 0 && !targets.includes(rule.id)) return false;
      if (x.expiresUnixNs !== undefined && x.expiresUnixNs !== 0n && BigInt(this.now()) * 1_000_000n >= x.expiresUnixNs) return false;
      return this.matches(x.match, ev);
    });
    const exc = xi >= 0 ? xs[xi]! : null;
    let action: Action;
    let ask = false;
    let deadlineMs = 0;
    let report: ReportSetting | undefined;
    let key: string;
    let severity = 0;
    if (exc) {
      action = exc.action;
      report = exc.report;
      key = `x${xi}`;
    } else if (rule) {
      if (rule.askCentral) {
        ask = true;
        deadlineMs = Math.min(rule.askCentral.deadlineMs ?? 5, this.policy.maxAskCentralDeadlineMs ?? 1000);
        action = rule.askCentral.default ?? this.defaultAction(kind);
      } else action = rule.action ?? this.defaultAction(kind);
      report = rule.report ?? this.policy.defaultReport;
      key = `r${ri}`;
      severity = rule.severity ? SEVERITY[rule.severity] : 0;
    } else {
      action = this.defaultAction(kind);
      report = this.policy.defaultReport;
      key = `d${kind}`;
    }
    const rep = this.sample(key, report);
    let newVal: bigint | null = null;
    if (kind === 'CR' || kind === 'MSR') {
      const d = ev.data as { old_value: bigint; new_value: bigint };
      const o = d.old_value;
      const n = d.new_value;
      switch (action.kind) {
        case 'allow': newVal = n; break;
        case 'deny': newVal = action.forceBits === undefined ? o : (n & ~action.forceBits & ALL) | (o & action.forceBits); break;
        case 'rewrite': newVal = ((n & ~(action.clearBits ?? 0n)) & ALL) | (action.setBits ?? 0n); break;
        case 'crash': newVal = o; break;
        default: throw new Error(`${action.kind} on ${kind}`);
      }
    }
    return {
      ruleIndex: ri,
      exceptionIndex: xi,
      kind: action.kind,
      action: ACTION_NUMBER[action.kind],
      newVal,
      injectVector: action.kind === 'inject' ? action.vector : -1,
      injectErrorCode: action.kind === 'inject' ? (action.errorCode ?? 0) : -1,
      askCentral: ask,
      deadlineMs,
      report: rep,
      reportEvent: rep && (report?.withEvent ?? false),
      severity: exc ? 0 : severity,
    };
  }
}
