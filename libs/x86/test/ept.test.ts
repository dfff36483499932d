import { describe, expect, it } from 'vitest';
import { EPT_BIT_OF, EPT_RWX, EPT_VIOLATION_ORDER, EptAccess, X86Error } from '../src/index.js';

function code(fn: () => unknown): string {
  try {
    fn();
  } catch (e) {
    if (e instanceof X86Error) return e.code;
    throw e;
  }
  return 'no error';
}

describe('EptAccess (KVMI page access bits: R = 1, W = 2, X = 4 allowed)', () => {
  it('bit values and the reporting order are the KVMI ones', () => {
    expect(EPT_BIT_OF).toEqual({ read: 1, write: 2, execute: 4 });
    expect(EPT_RWX).toBe(7);
    expect(EPT_VIOLATION_ORDER).toEqual([1, 2, 4]);
  });

  it('unrestricted by default; 7 removes a restriction', () => {
    const ept = new EptAccess();
    expect(ept.get(0x1234n)).toBe(7);
    expect(ept.check(0x1234n, 'write')).toBe(0);
    ept.set(0x1234n, 1);
    expect(ept.isRestricted(0x1234n)).toBe(true);
    expect(ept.size).toBe(1);
    ept.set(0x1234n, 7);
    expect(ept.isRestricted(0x1234n)).toBe(false);
    expect(ept.size).toBe(0);
  });

  it('check returns the single violated bit for every allowed-set × access', () => {
    const ept = new EptAccess();
    const expected: Record<number, [number, number, number]> = {
      // allowed: [read, write, execute] violation
      0: [1, 2, 4],
      1: [0, 2, 4], // r--
      2: [1, 0, 4], // -w-
      3: [0, 0, 4], // rw-
      4: [1, 2, 0], // --x
      5: [0, 2, 0], // r-x
      6: [1, 0, 0], // -wx
      7: [0, 0, 0],
    };
    for (let allowed = 0; allowed <= 7; allowed++) {
      ept.set(5n, allowed);
      expect([ept.check(5n, 'read'), ept.check(5n, 'write'), ept.check(5n, 'execute')]).toEqual(expected[allowed]);
      expect(ept.check(6n, 'read')).toBe(0); // restrictions are per gfn
    }
  });

  it('violations lists one bit per violated access, in the order R, W, X', () => {
    const ept = new EptAccess();
    ept.set(9n, 0);
    expect(ept.violations(9n, 7)).toEqual([1, 2, 4]);
    expect(ept.violations(9n, ['execute', 'write', 'read'])).toEqual([1, 2, 4]);
    expect(ept.violations(9n, ['write', 'read'])).toEqual([1, 2]);
    ept.set(9n, 1); // read-only: a read-modify-write violates W only
    expect(ept.violations(9n, ['read', 'write'])).toEqual([2]);
    expect(ept.violations(9n, 5)).toEqual([4]);
    expect(ept.violations(10n, 7)).toEqual([]);
    expect(ept.violations(9n, [])).toEqual([]);
  });

  it('entries and clear', () => {
    const ept = new EptAccess();
    ept.set(1n, 3);
    ept.set(2n, 6);
    expect([...ept.entries()]).toEqual([
      [1n, 3],
      [2n, 6],
    ]);
    ept.clear();
    expect(ept.size).toBe(0);
    expect(ept.get(1n)).toBe(7);
  });

  it('rejects bits outside rwx, negative gfns and unknown access kinds', () => {
    const ept = new EptAccess();
    expect(code(() => ept.set(1n, 8))).toBe('invalid-argument');
    expect(code(() => ept.set(1n, -1))).toBe('invalid-argument');
    expect(code(() => ept.set(1n, 1.5))).toBe('invalid-argument');
    expect(code(() => ept.set(-1n, 1))).toBe('invalid-argument');
    expect(code(() => ept.check(1n, 'fetch' as 'read'))).toBe('invalid-argument');
    expect(code(() => ept.violations(1n, 8))).toBe('invalid-argument');
    expect(code(() => ept.violations(1n, ['fetch' as 'read']))).toBe('invalid-argument');
    expect(ept.size).toBe(0);
  });
});
