/**
 * Property: on random rule sets and random events (real frames), the compiled, allocation-free evaluator
 * agrees with the slow bigint reference evaluator (test/support/reference.ts) on every verdict field,
 * including report sampling over a sequence of events.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import {
  compilePolicy,
  Evaluator,
  formatPolicy,
  parsePolicyText,
  type Action,
  type BitsMatch,
  type EventMatch,
  type Policy,
  type PolicyException,
  type ReportSetting,
  type Rule,
  type U64Range,
  type VcpuEventKind,
} from '@periscope/verdicts';
import { ReferenceEvaluator } from './support/reference.js';
import { frame } from './support/events.js';

const ALL = (1n << 64n) - 1n;
const VM = '0f0e0d0c-0b0a-4009-8807-060504030201';
const OTHER_VM = '0f0e0d0c-0b0a-4009-8807-0605040302ff';

const KINDS: VcpuEventKind[] = ['PAUSE', 'HYPERCALL', 'BREAKPOINT', 'CR', 'TRAP', 'XSETBV', 'DESCRIPTOR', 'MSR', 'PF', 'SINGLESTEP'];
/** kvmi-v12.md §3.2 by hand: which kinds accept RETRY, which carry reply data. */
const RETRY = new Set<VcpuEventKind>(['BREAKPOINT', 'DESCRIPTOR', 'PF']);
const REPLY_DATA = new Set<VcpuEventKind>(['CR', 'MSR']);

// Values that sit on the edges the evaluator must get right: halves, sign bits, all ones.
const EDGES = [0n, 1n, 0x10000n, 0x300000n, 0x7fff_ffffn, 0x8000_0000n, 0xffff_ffffn, 0x1_0000_0000n, 0x8000_0000_0000_0000n, 0xffff_ffff_8000_0000n, 0xffff_ffff_c000_0000n, ALL - 1n, ALL];
const u64 = fc.oneof(fc.constantFrom(...EDGES), fc.bigInt({ min: 0n, max: ALL }), fc.constantFrom(...EDGES).chain((e) => fc.bigInt({ min: -2n, max: 2n }).map((d) => (e + d) & ALL)));
const small = (xs: number[]) => fc.constantFrom(...xs);

const arbRange: fc.Arbitrary<U64Range> = fc.tuple(u64, fc.oneof(fc.bigInt({ min: 1n, max: 0x1000n }), u64)).map(([start, x]) => {
  let end = x > start ? x : start + (x === 0n ? 1n : x);
  if (end > 1n << 64n) end = 1n << 64n; // start <= ALL < end still holds
  return { start, end };
});
const arbRanges = fc.array(arbRange, { minLength: 1, maxLength: 3 });
const arbBits: fc.Arbitrary<BitsMatch> = fc.tuple(u64, u64).map(([mask, v]) => ({ mask, value: v & mask }));
const arbMask = u64.filter((m) => m !== 0n);

const CR_IDX = [0, 3, 4];
const MSR_IDX = [0x10, 0x176, 0xc0000082, 0xffffffff];
const VECTORS = [6, 13, 14];

/** `a` with probability p, else undefined. */
function opt<T>(a: fc.Arbitrary<T>, p = 0.35): fc.Arbitrary<T | undefined> {
  const w = Math.round(p * 100);
  return fc.oneof({ weight: 100 - w, arbitrary: fc.constant(undefined) }, { weight: w, arbitrary: a });
}
function clean<T extends object>(o: T): T {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as T;
}

function arbMatch(kind: VcpuEventKind | undefined): fc.Arbitrary<EventMatch> {
  const common = {
    vcpus: opt(fc.uniqueArray(small([0, 1, 2, 3]), { minLength: 1, maxLength: 3 }), 0.25),
    mode: opt(small([2, 4, 8]) as fc.Arbitrary<2 | 4 | 8>, 0.1),
    rip: opt(arbRanges, 0.1),
    regs: opt(fc.array(fc.record({ reg: fc.constantFrom('rax' as const, 'rdi' as const, 'r15' as const), bits: arbBits }).map(({ reg, bits }) => ({ reg, ...bits })), { minLength: 1, maxLength: 2 }), 0.1),
    vms: opt(fc.constantFrom([VM], [OTHER_VM], [VM, OTHER_VM]), 0.08),
  };
  const value = { old: opt(arbBits, 0.2), new: opt(arbBits, 0.2), clears: opt(arbMask, 0.3), sets: opt(arbMask, 0.2), changes: opt(arbMask, 0.2) };
  let detail: Record<string, fc.Arbitrary<unknown>> = {};
  switch (kind) {
    case 'CR': detail = { cr: opt(fc.uniqueArray(small(CR_IDX), { minLength: 1, maxLength: 2 }), 0.6), ...value }; break;
    case 'MSR': detail = { msr: opt(fc.uniqueArray(small(MSR_IDX), { minLength: 1, maxLength: 2 }), 0.6), ...value }; break;
    case 'XSETBV': detail = { xcr: opt(fc.constant([0])), ...value }; break;
    case 'PF': detail = { gpa: opt(arbRanges), gva: opt(arbRanges), access: opt(fc.integer({ min: 1, max: 7 }), 0.5) }; break;
    case 'BREAKPOINT': detail = { gpa: opt(arbRanges, 0.5) }; break;
    case 'DESCRIPTOR': detail = { descriptor: opt(fc.uniqueArray(small([1, 2, 3, 4]), { minLength: 1, maxLength: 2 }), 0.6), write: opt(fc.boolean(), 0.5) }; break;
    case 'TRAP': detail = { vector: opt(fc.uniqueArray(small(VECTORS), { minLength: 1, maxLength: 2 }), 0.6) }; break;
    case 'SINGLESTEP': detail = { failed: opt(fc.boolean(), 0.5) }; break;
    default: break;
  }
  return fc.record({ ...common, ...detail }).map((m) => clean({ ...(kind ? { kind } : {}), ...m }) as EventMatch);
}

function arbAction(kind: VcpuEventKind | undefined): fc.Arbitrary<Action> {
  const xs: fc.Arbitrary<Action>[] = [fc.constant({ kind: 'allow' }), fc.constant({ kind: 'crash' })];
  if (kind && REPLY_DATA.has(kind)) {
    xs.push(fc.constant({ kind: 'deny' }), arbMask.map((forceBits) => ({ kind: 'deny', forceBits })));
    xs.push(fc.record({ clearBits: opt(u64, 0.7), setBits: opt(u64, 0.7) }).map((r) => clean({ kind: 'rewrite' as const, ...r })));
  }
  if (kind && RETRY.has(kind)) {
    xs.push(fc.constant({ kind: 'skip' }), fc.constant({ kind: 'retry' }));
    xs.push(fc.constantFrom<Action>({ kind: 'inject', vector: 14, errorCode: 0x11 }, { kind: 'inject', vector: 6 }, { kind: 'inject', vector: 13 }));
  }
  return fc.oneof(...xs);
}

const arbReport: fc.Arbitrary<ReportSetting | undefined> = opt(
  fc.oneof(
    fc.constant<ReportSetting>({ mode: 'always' }),
    fc.constant<ReportSetting>({ mode: 'never' }),
    fc.constant<ReportSetting>({ mode: 'always', withEvent: true }),
    fc.integer({ min: 1, max: 4 }).map((oneIn): ReportSetting => ({ mode: 'sampled', oneIn })),
  ),
  0.5,
);

// Kinds with reply values and RETRY actions are where the arithmetic is: weight them up.
const arbKind = opt(fc.constantFrom<VcpuEventKind>(...KINDS, 'CR', 'CR', 'MSR', 'MSR', 'PF', 'PF', 'DESCRIPTOR'), 0.85);

const arbRule = (i: number): fc.Arbitrary<Rule> =>
  arbKind.chain((kind) =>
    fc.record({
      match: arbMatch(kind),
      outcome: fc.oneof(
        { weight: 6, arbitrary: arbAction(kind).map((action) => ({ action })) },
        { weight: 2, arbitrary: fc.record({ deadlineMs: opt(fc.integer({ min: 1, max: 1000 })), default: opt(arbAction(kind)) }).map((a) => ({ askCentral: clean(a) })) },
        { weight: 1, arbitrary: fc.constant({}) },
      ),
      report: arbReport,
      severity: opt(fc.constantFrom('info' as const, 'high' as const)),
    }).map(({ match, outcome, report, severity }) => clean({ id: `r${i}`, match, ...outcome, report, severity }) as Rule),
  );

function arbException(j: number, rules: Rule[]): fc.Arbitrary<PolicyException> {
  return fc.record({
    target: fc.option(fc.integer({ min: 0, max: Math.max(0, rules.length - 1) }), { nil: undefined }),
    expires: opt(fc.bigInt({ min: 1n, max: 4_000_000_000n }), 0.3),
    report: arbReport,
  }).chain(({ target, expires, report }) => {
    const rule = target === undefined ? undefined : rules[target];
    const kind = rule?.match.kind;
    return fc.tuple(arbMatch(kind), arbAction(kind)).map(([match, action]) =>
      clean({ id: `x${j}`, rules: rule ? [rule.id] : undefined, match, action, report, expiresUnixNs: expires }) as PolicyException,
    );
  });
}

const arbPolicy: fc.Arbitrary<Policy> = fc.integer({ min: 0, max: 8 }).chain((n) =>
  fc.tuple(...Array.from({ length: n }, (_, i) => arbRule(i))).chain((rules) =>
    fc.record({
      exceptions: fc.integer({ min: 0, max: 3 }).chain((m) => fc.tuple(...Array.from({ length: m }, (_, j) => arbException(j, rules)))),
      defaultAction: opt(fc.constantFrom<Action>({ kind: 'allow' }, { kind: 'crash' })),
      pfDefault: opt(arbAction('PF')),
      crDefault: opt(arbAction('CR')),
      defaultReport: arbReport,
      maxAsk: opt(fc.integer({ min: 1, max: 1000 })),
    }).map(({ exceptions, defaultAction, pfDefault, crDefault, defaultReport, maxAsk }) =>
      clean({
        id: 'prop', version: 1n, rules, exceptions, defaultAction, defaultReport, maxAskCentralDeadlineMs: maxAsk,
        defaultActions: pfDefault || crDefault ? clean({ PF: pfDefault, CR: crDefault }) : undefined,
      }) as Policy,
    ),
  ),
);

const arbEvent: fc.Arbitrary<Buffer> = fc.record({
  kind: fc.constantFrom(...KINDS),
  vcpu: small([0, 1, 2, 3]),
  mode: small([2, 4, 8]),
  rip: u64,
  rax: u64,
  rdi: u64,
  a: u64,
  b: u64,
  idx: fc.nat(),
  c: fc.nat({ max: 7 }),
  seq: fc.nat(),
}).map((e) => {
  const pick = <T>(xs: T[]) => xs[e.idx % xs.length]!;
  const data: Record<VcpuEventKind, Record<string, unknown> | undefined> = {
    PAUSE: undefined,
    HYPERCALL: undefined,
    BREAKPOINT: { gpa: e.b, insn_len: 1 },
    CR: { cr: pick(CR_IDX), old_value: e.a, new_value: e.b },
    TRAP: { nr: pick([...VECTORS, 3]), error_code: e.c, address: e.a },
    XSETBV: { xcr: 0, old_value: e.a, new_value: e.b },
    DESCRIPTOR: { descriptor: pick([1, 2, 3, 4]), write: e.c & 1 },
    MSR: { msr: pick([...MSR_IDX, 0x11]), old_value: e.a, new_value: e.b },
    PF: { gva: e.a, gpa: e.b, access: pick([1, 2, 4]) },
    SINGLESTEP: { failed: e.c & 1 },
  };
  return frame(e.kind, data[e.kind], { vcpu: e.vcpu, mode: e.mode, rip: e.rip, regs: { rax: e.rax, rdi: e.rdi, r15: e.a ^ e.b }, seq: e.seq });
});

/** Events that share values with the policy make matches likely: derive some from the rules' constants. */
function eventsNear(p: Policy): fc.Arbitrary<Buffer[]> {
  const consts: bigint[] = [];
  const visit = (m: EventMatch) => {
    for (const r of [...(m.rip ?? []), ...(m.gpa ?? []), ...(m.gva ?? [])]) consts.push(r.start, r.end - 1n, r.end & ALL);
    for (const b of [m.old, m.new]) if (b) consts.push(b.value, b.value | ~b.mask & ALL);
    for (const x of [m.clears, m.sets, m.changes]) if (x !== undefined) consts.push(x, 0n, ALL);
  };
  p.rules.forEach((r) => visit(r.match));
  (p.exceptions ?? []).forEach((x) => visit(x.match));
  if (consts.length === 0) return fc.array(arbEvent, { minLength: 1, maxLength: 12 });
  const near = fc.constantFrom(...consts);
  const kinds = [...new Set(p.rules.map((r) => r.match.kind).filter((k): k is VcpuEventKind => k !== undefined))];
  const kindArb = kinds.length > 0 ? fc.constantFrom(...kinds) : fc.constantFrom(...KINDS);
  // Old/new pairs: both near the policy's constants, or a random value with constant bits cleared/set.
  const pair = fc.oneof(
    fc.tuple(near, near),
    fc.tuple(u64, near, fc.boolean()).map(([x, c, clear]) => (clear ? [x | c, x & ~c & ALL] : [x & ~c & ALL, x | c]) as [bigint, bigint]),
  );
  const focused = fc.record({ kind: kindArb, ab: pair, rip: near, vcpu: small([0, 1, 2, 3]), mode: small([2, 4, 8]), idx: fc.nat(), c: fc.nat({ max: 7 }) }).map(({ ab: [a, b], ...e }) => {
    const pick = <T>(xs: T[]) => xs[e.idx % xs.length]!;
    const data: Record<VcpuEventKind, Record<string, unknown> | undefined> = {
      PAUSE: undefined, HYPERCALL: undefined,
      BREAKPOINT: { gpa: b, insn_len: 1 },
      CR: { cr: pick(CR_IDX), old_value: a, new_value: b },
      TRAP: { nr: pick(VECTORS), error_code: 0, address: a },
      XSETBV: { xcr: 0, old_value: a, new_value: b },
      DESCRIPTOR: { descriptor: pick([1, 2, 3, 4]), write: e.c & 1 },
      MSR: { msr: pick(MSR_IDX), old_value: a, new_value: b },
      PF: { gva: a, gpa: b, access: pick([1, 2, 4]) },
      SINGLESTEP: { failed: e.c & 1 },
    };
    return frame(e.kind, data[e.kind], { vcpu: e.vcpu, mode: e.mode, rip: e.rip, regs: { rax: a, rdi: b, r15: a ^ b } });
  });
  return fc.array(fc.oneof(focused, arbEvent), { minLength: 1, maxLength: 16 });
}

function fast(v: ReturnType<Evaluator['evaluateFrame']>) {
  if (!v) throw new Error('frame rejected');
  return {
    ruleIndex: v.ruleIndex, exceptionIndex: v.exceptionIndex, kind: v.kind, action: v.action, newVal: v.newVal,
    injectVector: v.injectVector, injectErrorCode: v.injectErrorCode, askCentral: v.askCentral, deadlineMs: v.deadlineMs,
    report: v.report, reportEvent: v.reportEvent, severity: v.severity,
  };
}

describe('evaluator ≡ reference evaluator', () => {
  it('on random policies and random event sequences', () => {
    const seen = new Map<string, number>();
    const count = (tag: string) => seen.set(tag, (seen.get(tag) ?? 0) + 1);
    fc.assert(
      fc.property(
        arbPolicy.chain((p) => fc.tuple(fc.constant(p), eventsNear(p), fc.constantFrom(VM, undefined), fc.integer({ min: 0, max: 5000 }))),
        ([policy, frames, vm, now]) => {
          const compiled = compilePolicy(policy);
          const ev = new Evaluator(compiled, { ...(vm ? { vmUuid: vm } : {}), clock: () => now });
          const ref = new ReferenceEvaluator(policy, vm, () => now);
          for (const f of frames) {
            const got = fast(ev.evaluateFrame(f));
            const want = ref.evaluate(f);
            expect(got).toEqual(want);
            count('event');
            count(want.exceptionIndex >= 0 ? 'exception' : want.ruleIndex >= 0 ? 'rule' : 'default');
            if (want.ruleIndex >= 0 || want.exceptionIndex >= 0) count(`matched:${want.kind}`);
            if (want.askCentral) count('ask');
            if (!want.report) count('not-reported');
          }
        },
      ),
      { numRuns: 1000, seed: 20261121 },
    );
    // The generator must exercise matches of every action, exceptions and ask-central, not only defaults.
    const n = (k: string) => seen.get(k) ?? 0;
    expect(n('rule') + n('exception')).toBeGreaterThan(n('event') * 0.3);
    for (const tag of ['exception', 'ask', 'not-reported', ...['allow', 'deny', 'rewrite', 'skip', 'retry', 'inject', 'crash'].map((k) => `matched:${k}`)]) {
      expect(n(tag), tag).toBeGreaterThan(15);
    }
  });

  it('a policy survives the file format unchanged (formatPolicy → parsePolicyText)', () => {
    fc.assert(
      fc.property(arbPolicy, (p) => {
        const back = parsePolicyText(formatPolicy(p));
        expect(back).toEqual(p);
      }),
      { numRuns: 200, seed: 7 },
    );
  });
});
