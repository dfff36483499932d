/**
 * `inject` on CR/MSR events (no RETRY there): the verdict replies CONTINUE with new_val = the old value
 * (the write is refused) and carries the injection; on PF it stays RETRY. Legality for XSETBV (no reply
 * data, no RETRY) is refused.
 */
import { describe, expect, it } from 'vitest';
import { EventAction } from '@periscope/kvmi';
import { compilePolicy, Evaluator, injectReplyAction, type Policy, type Rule } from '@periscope/verdicts';
import { crEvent, msrEvent, pfEvent } from './support/events.js';

const pol = (rules: Rule[]): Policy => ({ id: 'p', version: 1n, rules });

describe('inject on events without RETRY', () => {
  it('replies CONTINUE with the old value on MSR and CR, RETRY on PF; the injection rides along', () => {
    const ev = new Evaluator(compilePolicy(pol([
      { id: 'msr', match: { kind: 'MSR', msr: [0xc0000082] }, action: { kind: 'inject', vector: 13, errorCode: 0 } },
      { id: 'cr', match: { kind: 'CR', cr: [4] }, action: { kind: 'inject', vector: 13 } },
      { id: 'pf', match: { kind: 'PF' }, action: { kind: 'inject', vector: 13, errorCode: 0 } },
    ])));
    const m = ev.evaluateFrame(msrEvent(0xc0000082, 0xffffffff81000000n, 0xffffffffc0000800n))!;
    expect(m).toMatchObject({ kind: 'inject', action: EventAction.CONTINUE, hasNewVal: true, injectVector: 13, injectErrorCode: 0 });
    expect(m.newVal).toBe(0xffffffff81000000n);
    const c = ev.evaluateFrame(crEvent(4, 0x3406f0n, 0x3406f0n & ~(1n << 20n)))!;
    expect(c).toMatchObject({ kind: 'inject', action: EventAction.CONTINUE });
    expect(c.newVal).toBe(0x3406f0n);
    const p = ev.evaluateFrame(pfEvent(0xffffffff81000000n, 0x1000n, 2))!;
    expect(p).toMatchObject({ kind: 'inject', action: EventAction.RETRY, hasNewVal: false });
  });

  it('injectReplyAction follows the catalog', () => {
    expect(injectReplyAction('PF')).toBe('RETRY');
    expect(injectReplyAction('MSR')).toBe('CONTINUE');
    expect(injectReplyAction('CR')).toBe('CONTINUE');
    expect(injectReplyAction('XSETBV')).toBeNull();
    expect(() => compilePolicy(pol([{ id: 'x', match: { kind: 'XSETBV' }, action: { kind: 'inject', vector: 13 } }]))).toThrow(/inject/);
  });
});
