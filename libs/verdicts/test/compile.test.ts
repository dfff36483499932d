import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import {
  compilePolicy,
  legalActions,
  renderLegalityTable,
  VerdictsError,
  VCPU_EVENT_KINDS,
  type Action,
  type Policy,
  type Rule,
  type VcpuEventKind,
  type VerdictsIssue,
} from '@periscope/verdicts';

const pol = (rules: Rule[], extra: Partial<Policy> = {}): Policy => ({ id: 'p', version: 1n, rules, ...extra });

function issues(p: Policy): VerdictsIssue[] {
  try {
    compilePolicy(p);
  } catch (e) {
    expect(e).toBeInstanceOf(VerdictsError);
    return [...(e as VerdictsError).issues];
  }
  throw new Error('expected the policy to be rejected');
}
function rejects(p: Policy, code: VerdictsIssue['code'], ruleId: string | null, path?: string): VerdictsIssue {
  const list = issues(p);
  const hit = list.find((i) => i.code === code && i.ruleId === ruleId && (path === undefined || i.path === path));
  expect(hit, `expected ${code} for ${ruleId} at ${path ?? '*'}, got ${JSON.stringify(list)}`).toBeDefined();
  return hit!;
}

/**
 * Independent oracle: kvmi-v12.md §3.2 "Allowed actions" and §5.3 (only CR and MSR have reply data),
 * transcribed by hand. The compiler derives legality from the catalog; this table must agree.
 */
const SPEC_ACTIONS: Record<VcpuEventKind, { retry: boolean; replyData: boolean }> = {
  PAUSE: { retry: false, replyData: false },
  HYPERCALL: { retry: false, replyData: false },
  BREAKPOINT: { retry: true, replyData: false },
  CR: { retry: false, replyData: true },
  TRAP: { retry: false, replyData: false },
  XSETBV: { retry: false, replyData: false },
  DESCRIPTOR: { retry: true, replyData: false },
  MSR: { retry: false, replyData: true },
  PF: { retry: true, replyData: false },
  SINGLESTEP: { retry: false, replyData: false },
};

const SAMPLE_ACTION: Record<Action['kind'], Action> = {
  allow: { kind: 'allow' },
  deny: { kind: 'deny' },
  rewrite: { kind: 'rewrite', setBits: 1n },
  skip: { kind: 'skip' },
  retry: { kind: 'retry' },
  inject: { kind: 'inject', vector: 13, errorCode: 0 },
  crash: { kind: 'crash' },
};

describe('action legality comes from the catalog', () => {
  it('agrees with the fact sheet for every vCPU event kind', () => {
    expect(VCPU_EVENT_KINDS).toHaveLength(10);
    for (const k of VCPU_EVENT_KINDS) {
      const s = SPEC_ACTIONS[k];
      // inject: RETRY where accepted, else CONTINUE with the old value where the reply carries data.
      const expected = ['allow', ...(s.replyData ? ['deny', 'rewrite'] : []), ...(s.retry ? ['skip', 'retry'] : []), ...(s.retry || s.replyData ? ['inject'] : []), 'crash'];
      expect(legalActions(k), k).toEqual(expected);
    }
  });

  it('the README embeds the current legality table', () => {
    const readme = readFileSync(new URL('../README.md', import.meta.url), 'utf8');
    expect(readme).toContain(renderLegalityTable());
  });

  it('rejects every illegal (kind, action) pair with the rule id, and compiles every legal one', () => {
    for (const k of VCPU_EVENT_KINDS) {
      for (const [name, action] of Object.entries(SAMPLE_ACTION)) {
        const p = pol([{ id: `r-${k}-${name}`, match: { kind: k }, action }]);
        if (legalActions(k).includes(action.kind)) expect(() => compilePolicy(p), `${k} ${name}`).not.toThrow();
        else {
          const i = rejects(p, 'action-not-allowed', `r-${k}-${name}`, 'rules[0].action');
          expect(i.message).toContain(k);
        }
      }
    }
  });

  it('RETRY-based actions only for BREAKPOINT, DESCRIPTOR and PF; deny only for CR and MSR', () => {
    rejects(pol([{ id: 'skip-cr', match: { kind: 'CR' }, action: { kind: 'skip' } }]), 'action-not-allowed', 'skip-cr');
    rejects(pol([{ id: 'inject-xsetbv', match: { kind: 'XSETBV' }, action: { kind: 'inject', vector: 13 } }]), 'action-not-allowed', 'inject-xsetbv');
    rejects(pol([{ id: 'deny-pf', match: { kind: 'PF' }, action: { kind: 'deny' } }]), 'action-not-allowed', 'deny-pf');
    rejects(pol([{ id: 'deny-xsetbv', match: { kind: 'XSETBV' }, action: { kind: 'deny' } }]), 'action-not-allowed', 'deny-xsetbv');
  });

  it('a rule without kind must be legal for every kind', () => {
    expect(() => compilePolicy(pol([{ id: 'any-crash', match: { vcpus: [3] }, action: { kind: 'crash' } }]))).not.toThrow();
    const list = issues(pol([{ id: 'any-skip', match: {}, action: { kind: 'skip' } }]));
    expect(list.filter((i) => i.code === 'action-not-allowed' && i.ruleId === 'any-skip')).toHaveLength(7);
  });

  it('checks the ask-central default action the same way', () => {
    rejects(pol([{ id: 'ask', match: { kind: 'CR' }, askCentral: { default: { kind: 'retry' } } }]), 'action-not-allowed', 'ask', 'rules[0].askCentral.default');
    expect(() => compilePolicy(pol([{ id: 'ask', match: { kind: 'PF' }, askCentral: { default: { kind: 'skip' } } }]))).not.toThrow();
  });

  it('checks default actions per kind', () => {
    rejects(pol([], { defaultActions: { CR: { kind: 'skip' } } }), 'action-not-allowed', '<default:CR>', 'defaultActions.CR');
    rejects(pol([], { defaultAction: { kind: 'retry' } }), 'action-not-allowed', '<default:*>', 'defaultAction');
    // A kind-wide default that only the kinds using it must accept.
    const ok = pol([], {
      defaultAction: { kind: 'skip' },
      defaultActions: Object.fromEntries(VCPU_EVENT_KINDS.filter((k) => !['BREAKPOINT', 'DESCRIPTOR', 'PF'].includes(k)).map((k) => [k, { kind: 'allow' }])),
    });
    expect(() => compilePolicy(ok)).not.toThrow();
  });

  it('checks exception actions against the kinds they can meet', () => {
    const base: Rule[] = [{ id: 'pf', match: { kind: 'PF', access: 2 }, action: { kind: 'skip' } }, { id: 'cr', match: { kind: 'CR' }, action: { kind: 'deny' } }];
    expect(() => compilePolicy(pol(base, { exceptions: [{ id: 'x', rules: ['pf'], match: {}, action: { kind: 'retry' } }] }))).not.toThrow();
    rejects(pol(base, { exceptions: [{ id: 'x', rules: ['cr'], match: {}, action: { kind: 'retry' } }] }), 'action-not-allowed', 'x');
    rejects(pol(base, { exceptions: [{ id: 'x', match: {}, action: { kind: 'deny' } }] }), 'action-not-allowed', 'x');
  });
});

describe('compile errors', () => {
  it('masks: value outside mask, zero transition masks, zero forceBits, not u64', () => {
    rejects(pol([{ id: 'a', match: { kind: 'CR', old: { mask: 0xf0n, value: 0x0fn } }, action: { kind: 'deny' } }]), 'bad-mask', 'a', 'rules[0].match.old');
    rejects(pol([{ id: 'b', match: { kind: 'CR', clears: 0n }, action: { kind: 'deny' } }]), 'bad-mask', 'b', 'rules[0].match.clears');
    rejects(pol([{ id: 'c', match: { kind: 'MSR', sets: 1n << 64n }, action: { kind: 'deny' } }]), 'bad-mask', 'c', 'rules[0].match.sets');
    rejects(pol([{ id: 'd', match: { kind: 'CR' }, action: { kind: 'deny', forceBits: 0n } }]), 'bad-mask', 'd', 'rules[0].action.forceBits');
    rejects(pol([{ id: 'e', match: { kind: 'CR' }, action: { kind: 'deny', forceBits: -1n } }]), 'bad-mask', 'e', 'rules[0].action.forceBits');
    rejects(pol([{ id: 'f', match: { kind: 'PF', access: 8 }, action: { kind: 'skip' } }]), 'bad-mask', 'f', 'rules[0].match.access');
    rejects(pol([{ id: 'g', match: { regs: [{ reg: 'rax', mask: 0xffn, value: 0x100n }] }, action: { kind: 'allow' } }]), 'bad-mask', 'g', 'rules[0].match.regs[0]');
  });

  it('ranges: empty, reversed, past 2^64, negative', () => {
    rejects(pol([{ id: 'a', match: { kind: 'PF', gpa: [{ start: 0x1000n, end: 0x1000n }] }, action: { kind: 'skip' } }]), 'bad-range', 'a', 'rules[0].match.gpa[0]');
    rejects(pol([{ id: 'b', match: { kind: 'PF', gva: [{ start: 0n, end: 1n }, { start: 0x2000n, end: 0x1000n }] }, action: { kind: 'skip' } }]), 'bad-range', 'b', 'rules[0].match.gva[1]');
    rejects(pol([{ id: 'c', match: { rip: [{ start: 0n, end: (1n << 64n) + 1n }] }, action: { kind: 'allow' } }]), 'bad-range', 'c', 'rules[0].match.rip[0]');
    rejects(pol([{ id: 'd', match: { kind: 'BREAKPOINT', gpa: [{ start: -1n, end: 5n }] }, action: { kind: 'retry' } }]), 'bad-range', 'd');
    // The all-ones value can be included with end = 2^64.
    expect(() => compilePolicy(pol([{ id: 'e', match: { rip: [{ start: 0xffff_ffff_ffff_f000n, end: 1n << 64n }] }, action: { kind: 'allow' } }]))).not.toThrow();
  });

  it('ask-central deadline 1–1000 ms, and the policy maximum', () => {
    for (const ms of [0, 1001, 2.5, -3]) {
      rejects(pol([{ id: 'ask', match: { kind: 'PF' }, askCentral: { deadlineMs: ms } }]), 'bad-deadline', 'ask', 'rules[0].askCentral.deadlineMs');
    }
    for (const ms of [1, 5, 1000]) expect(() => compilePolicy(pol([{ id: 'ask', match: { kind: 'PF' }, askCentral: { deadlineMs: ms } }]))).not.toThrow();
    rejects(pol([], { maxAskCentralDeadlineMs: 5000 }), 'bad-deadline', null, 'maxAskCentralDeadlineMs');
    rejects(pol([{ id: 'both', match: { kind: 'PF' }, action: { kind: 'allow' }, askCentral: {} }]), 'bad-value', 'both');
  });

  it('criteria on the wrong kind, unknown kinds, UNHOOK', () => {
    rejects(pol([{ id: 'a', match: { kind: 'PF', cr: [0] }, action: { kind: 'allow' } }]), 'bad-kind', 'a', 'rules[0].match.cr');
    rejects(pol([{ id: 'b', match: { gpa: [{ start: 0n, end: 1n }] }, action: { kind: 'allow' } }]), 'bad-kind', 'b', 'rules[0].match.gpa');
    rejects(pol([{ id: 'c', match: { kind: 'UNHOOK' as VcpuEventKind }, action: { kind: 'allow' } }]), 'bad-kind', 'c', 'rules[0].match.kind');
    rejects(pol([{ id: 'd', match: { kind: 'NOPE' as VcpuEventKind }, action: { kind: 'allow' } }]), 'bad-kind', 'd');
  });

  it('scalar criteria and parameters outside their domains', () => {
    rejects(pol([{ id: 'a', match: { kind: 'CR', cr: [2] }, action: { kind: 'allow' } }]), 'bad-value', 'a', 'rules[0].match.cr[0]');
    rejects(pol([{ id: 'b', match: { vcpus: [70000] }, action: { kind: 'allow' } }]), 'bad-value', 'b', 'rules[0].match.vcpus[0]');
    rejects(pol([{ id: 'c', match: { kind: 'MSR', msr: [2 ** 32] }, action: { kind: 'allow' } }]), 'bad-value', 'c');
    rejects(pol([{ id: 'd', match: { kind: 'DESCRIPTOR', descriptor: [5] }, action: { kind: 'allow' } }]), 'bad-value', 'd');
    rejects(pol([{ id: 'e', match: { mode: 3 as 2 }, action: { kind: 'allow' } }]), 'bad-value', 'e', 'rules[0].match.mode');
    rejects(pol([{ id: 'f', match: { regs: [{ reg: 'cr0' as 'rax', mask: 1n, value: 1n }] }, action: { kind: 'allow' } }]), 'bad-value', 'f', 'rules[0].match.regs[0].reg');
    rejects(pol([{ id: 'g', match: { vms: ['not-a-uuid'] }, action: { kind: 'allow' } }]), 'bad-value', 'g', 'rules[0].match.vms[0]');
    rejects(pol([{ id: 'h', match: { kind: 'PF' }, action: { kind: 'inject', vector: 2 } }]), 'bad-value', 'h', 'rules[0].action.vector');
    rejects(pol([{ id: 'i', match: { kind: 'PF' }, action: { kind: 'inject', vector: 6, errorCode: 1 } }]), 'bad-value', 'i', 'rules[0].action.errorCode');
    rejects(pol([{ id: 'j', match: { kind: 'PF' }, action: { kind: 'allow' }, severity: 'dire' as 'high' }]), 'bad-value', 'j', 'rules[0].severity');
  });

  it('interception', () => {
    rejects(pol([], { interception: { events: ['UNHOOK' as VcpuEventKind], crs: [], msrs: [] } }), 'bad-kind', null, 'interception.events[0]');
    rejects(pol([], { interception: { events: [], crs: [8], msrs: [] } }), 'bad-value', null, 'interception.crs[0]');
  });

  it('report settings', () => {
    rejects(pol([{ id: 'a', match: {}, action: { kind: 'allow' }, report: { mode: 'sampled', oneIn: 0 } }]), 'bad-report', 'a', 'rules[0].report.oneIn');
    rejects(pol([{ id: 'b', match: {}, action: { kind: 'allow' }, report: { mode: 'sampled' } }]), 'bad-report', 'b');
    rejects(pol([{ id: 'c', match: {}, action: { kind: 'allow' }, report: { mode: 'often' as 'always' } }]), 'bad-report', 'c');
    rejects(pol([{ id: 'd', match: {}, action: { kind: 'allow' }, report: { mode: 'always', oneIn: 3 } }]), 'bad-report', 'd');
  });

  it('ids: duplicate and empty rule ids; exceptions naming unknown rules or unreachable kinds', () => {
    rejects(pol([{ id: 'a', match: {}, action: { kind: 'allow' } }, { id: 'a', match: {}, action: { kind: 'crash' } }]), 'duplicate-id', 'a', 'rules[1].id');
    rejects(pol([{ id: '', match: {}, action: { kind: 'allow' } }]), 'duplicate-id', null, 'rules[0].id');
    const rules: Rule[] = [{ id: 'cr', match: { kind: 'CR' }, action: { kind: 'deny' } }];
    rejects(pol(rules, { exceptions: [{ id: 'x', rules: ['nope'], match: {}, action: { kind: 'allow' } }] }), 'bad-exception', 'x', 'exceptions[0].rules[0]');
    rejects(pol(rules, { exceptions: [{ id: 'x', rules: ['cr'], match: { kind: 'PF' }, action: { kind: 'allow' } }] }), 'bad-exception', 'x', 'exceptions[0].match.kind');
  });

  it('reports every issue at once; the error carries the first one', () => {
    const p = pol([
      { id: 'one', match: { kind: 'CR' }, action: { kind: 'skip' } },
      { id: 'two', match: { kind: 'PF', gpa: [{ start: 5n, end: 1n }] }, action: { kind: 'allow' } },
      { id: 'three', match: { kind: 'PF' }, askCentral: { deadlineMs: 0 } },
    ]);
    try {
      compilePolicy(p);
      expect.unreachable();
    } catch (e) {
      const err = e as VerdictsError;
      expect(err.code).toBe('action-not-allowed');
      expect(err.ruleId).toBe('one');
      expect(err.path).toBe('rules[0].action');
      expect(err.message).toMatch(/^rule one: rules\[0\]\.action: .*and 2 more issues/);
      expect(err.issues.map((i) => [i.code, i.ruleId])).toEqual([['action-not-allowed', 'one'], ['bad-range', 'two'], ['bad-deadline', 'three']]);
    }
  });
});
