import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import {
  compilePolicy,
  DEFAULT_POLICY_PATH,
  deriveInterception,
  Evaluator,
  formatPolicy,
  generatePolicy,
  loadDefaultPolicy,
  loadPolicyFile,
  parsePolicyText,
  VerdictsError,
} from '@periscope/verdicts';
import { crEvent, pfEvent } from './support/events.js';

function fileError(text: string): VerdictsError {
  try {
    parsePolicyText(text, 'test.json');
  } catch (e) {
    expect(e).toBeInstanceOf(VerdictsError);
    return e as VerdictsError;
  }
  throw new Error('expected a parse error');
}

describe('policy file', () => {
  it('parses the documented shorthands into the rule model', () => {
    const p = parsePolicyText(JSON.stringify({
      format: 'periscope.verdicts/v1',
      id: 'x',
      version: '0x10',
      rules: [
        {
          id: 'r',
          match: {
            kind: 'PF', vcpus: 1, access: 'wx', gva: { start: '0xffffffff80000000', end: '18446744072635809792' },
            rip: [{ start: 0, end: '0x1_0000_0000_0000_0000' }], regs: { rax: 34, rdi: { mask: '0xff', value: '0x18' } },
          },
          action: { kind: 'inject', vector: '#pf', errorCode: 17 },
          report: { mode: 'sampled', oneIn: 10, withEvent: true },
          severity: 'high',
        },
        { id: 'd', match: { kind: 'DESCRIPTOR', descriptor: ['IDTR', 2], write: true }, askCentral: { deadlineMs: 3, default: 'skip' }, report: 'event' },
        { id: 'm', match: { kind: 'MSR', msr: '0xc0000082', old: { mask: 1, value: 0 } }, action: { kind: 'deny', forceBits: '0x8000000000000000' } },
        { id: 'h', match: { kind: 'HYPERCALL', regs: [{ reg: 'rax', value: 34 }, { reg: 'rax', mask: '0xffff0000', value: 0 }] }, action: 'crash' },
      ],
      exceptions: [{ id: 'e', rules: ['m'], match: { vcpus: [0] }, action: 'allow', expiresUnixNs: '1700000000000000000', reason: 'r', createdBy: 'me' }],
      defaultActions: { PF: 'retry' },
      defaultReport: 'never',
    }));
    expect(p.version).toBe(16n);
    expect(p.rules[0]).toEqual({
      id: 'r',
      match: {
        kind: 'PF', vcpus: [1], access: 6, gva: [{ start: 0xffffffff80000000n, end: 0xffffffffc0000000n }],
        rip: [{ start: 0n, end: 1n << 64n }], regs: [{ reg: 'rax', mask: 0xffff_ffff_ffff_ffffn, value: 34n }, { reg: 'rdi', mask: 0xffn, value: 0x18n }],
      },
      action: { kind: 'inject', vector: 14, errorCode: 17 },
      report: { mode: 'sampled', oneIn: 10, withEvent: true },
      severity: 'high',
    });
    expect(p.rules[1]).toMatchObject({ match: { descriptor: [1, 2], write: true }, askCentral: { deadlineMs: 3, default: { kind: 'skip' } }, report: { mode: 'always', withEvent: true } });
    expect(p.rules[2]!.match.msr).toEqual([0xc0000082]);
    expect(p.rules[3]!.match.regs).toHaveLength(2);
    expect(p.exceptions![0]!.expiresUnixNs).toBe(1_700_000_000_000_000_000n);
    expect(() => compilePolicy(p)).not.toThrow();
    // And it writes back to an equivalent file.
    expect(parsePolicyText(formatPolicy(p))).toEqual(p);
  });

  it('rejects malformed files with a path: bad JSON, unknown keys, lossy numbers, unknown actions', () => {
    expect(fileError('{').code).toBe('bad-policy-file');
    expect(fileError('{"id": "x", "rulez": []}').path).toBe('rulez');
    expect(fileError('{"id": "x", "rules": [{"id": "r", "match": {"kind": "CR", "clears": 18446744073709551615}, "action": "deny"}]}').path).toBe('rules[0].match.clears');
    expect(fileError('{"id": "x", "rules": [{"id": "r", "match": {}, "action": "block"}]}').path).toBe('rules[0].action');
    expect(fileError('{"id": "x", "rules": [{"id": "r", "match": {"kind": "PF", "gpa": {"start": 1}}, "action": "skip"}]}').path).toBe('rules[0].match.gpa');
    expect(fileError('{"id": "x", "rules": [{"id": "r", "match": {"regs": {"cr9": 1}}, "action": "allow"}]}').path).toBe('rules[0].match.regs.cr9');
    expect(fileError('{"id": "x", "format": "other/v9"}').path).toBe('format');
    expect(fileError('{"id": "x", "rules": [{"id": "r", "match": {}, "action": {"kind": "deny", "bits": 1}}]}').path).toBe('rules[0].action.bits');
    expect(fileError('{"id": "x", "rules": [{"id": "r", "match": {}, "action": {"kind": "inject"}}]}').path).toBe('rules[0].action.vector');
    expect(fileError('{"id": "x", "rules": [{"id": "r", "match": {}, "report": "sometimes"}]}').path).toBe('rules[0].report');
  });

  it('semantic problems in a well-formed file surface from compilePolicy with the rule id', () => {
    const p = parsePolicyText('{"id": "x", "rules": [{"id": "cr-skip", "match": {"kind": "CR"}, "action": "skip"}]}');
    expect(() => compilePolicy(p)).toThrow(expect.objectContaining({ code: 'action-not-allowed', ruleId: 'cr-skip' }));
  });

  it('loads from a file (--policy FILE)', () => {
    const dir = mkdtempSync(join(tmpdir(), 'verdicts-'));
    try {
      const f = join(dir, 'p.json');
      writeFileSync(f, formatPolicy(loadDefaultPolicy()));
      expect(loadPolicyFile(f)).toEqual(loadDefaultPolicy());
      writeFileSync(f, '{"id": 5}');
      expect(() => loadPolicyFile(f)).toThrow(expect.objectContaining({ code: 'bad-policy-file', path: 'id' }));
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('shipped default policy', () => {
  it('compiles, and covers the protections it promises', () => {
    const p = loadDefaultPolicy();
    expect(DEFAULT_POLICY_PATH).toMatch(/libs\/verdicts\/policies\/default\.json$/);
    const c = compilePolicy(p);
    expect(c.ruleIds).toEqual(['cr0-wp-clear', 'cr4-smep-smap-clear', 'msr-syscall-entry', 'kernel-text-write', 'pf-exec-data', 'idt-load', 'guest-request']);
    expect(c.exceptionIds).toEqual(['msr-syscall-init', 'pf-exec-kernel-text', 'pf-exec-modules', 'idt-load-firmware']);
    expect(p.rules.find((r) => r.id === 'cr4-smep-smap-clear')!.action).toEqual({ kind: 'deny', forceBits: 0x30_0000n });
    expect(p.rules.find((r) => r.id === 'msr-syscall-entry')!.match.msr).toEqual([0xc0000081, 0xc0000082, 0x176]);
    expect(deriveInterception({ ...p, interception: undefined })).toEqual({ events: ['CR', 'MSR', 'PF', 'DESCRIPTOR', 'HYPERCALL'], crs: [0, 4], msrs: [0x176, 0xc0000081, 0xc0000082] });
  });
});

describe('generatePolicy', () => {
  it('makes ≥ 100-rule policies that compile, deterministically, with the base rules last', () => {
    const a = generatePolicy({ count: 150, seed: 3 });
    expect(a.rules.length).toBe(150 + loadDefaultPolicy().rules.length);
    expect(generatePolicy({ count: 150, seed: 3 })).toEqual(a);
    expect(generatePolicy({ count: 150, seed: 4 })).not.toEqual(a);
    const ev = new Evaluator(compilePolicy(a));
    // The fillers stay away from what the default policy decides.
    expect(ev.evaluateFrame(crEvent(4, 0x3406f0n, 0x2406f0n))!.ruleId).toBe('cr4-smep-smap-clear');
    expect(ev.evaluateFrame(pfEvent(0xffffffff81000000n, 0x100_0000n, 2))!.ruleId).toBe('kernel-text-write');
    for (const kinds of [['PF'], ['CR'], ['MSR'], ['DESCRIPTOR', 'BREAKPOINT', 'HYPERCALL', 'TRAP', 'PAUSE']] as const) {
      expect(() => compilePolicy(generatePolicy({ count: 120, kinds }))).not.toThrow();
    }
  });
});
