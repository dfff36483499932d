/** Each matcher, over real frames (encodeVcpuEvent), at and around its boundaries. */
import { describe, expect, it } from 'vitest';
import { compilePolicy, Evaluator, type EventMatch, type Policy, type VcpuEventKind } from '@periscope/verdicts';
import { bpEvent, crEvent, descEvent, hypercallEvent, msrEvent, pauseEvent, pfEvent, ssEvent, trapEvent, xsetbvEvent, type FrameOptions } from './support/events.js';

const ALL = 0xffff_ffff_ffff_ffffn;
const VM_A = '6a1c2b3d-0000-4000-8000-00000000000a';
const VM_B = '6a1c2b3d-0000-4000-8000-00000000000b';

/** Does a single rule with this match decide the frame? (crash marks a match; default is allow.) */
function matcher(match: EventMatch, vmUuid?: string): (frame: Buffer) => boolean {
  const p: Policy = { id: 'm', version: 1n, rules: [{ id: 'r', match, action: { kind: 'crash' } }] };
  const ev = new Evaluator(compilePolicy(p), vmUuid === undefined ? {} : { vmUuid });
  return (f) => {
    const v = ev.evaluateFrame(f);
    if (!v) throw new Error('bad frame');
    return v.ruleIndex === 0;
  };
}

describe('common criteria', () => {
  it('kind', () => {
    const m = matcher({ kind: 'PF' });
    expect(m(pfEvent(0n, 0n, 2))).toBe(true);
    expect(m(crEvent(0, 1n, 2n))).toBe(false);
    const any = matcher({});
    for (const f of [pauseEvent(), hypercallEvent(), bpEvent(0n), crEvent(0, 0n, 1n), trapEvent(14, 0, 0n), xsetbvEvent(0, 1n, 3n), descEvent(1, 1), msrEvent(0x10, 0n, 1n), pfEvent(0n, 0n, 1), ssEvent(0)]) {
      expect(any(f)).toBe(true);
    }
  });

  it('vCPU set or any', () => {
    const m = matcher({ vcpus: [0, 5, 65535] });
    const at = (vcpu: number) => m(pauseEvent({ vcpu }));
    expect([0, 1, 4, 5, 6, 65535].map(at)).toEqual([true, false, false, true, false, true]);
    expect(matcher({ vcpus: [] })(pauseEvent({ vcpu: 9 }))).toBe(true);
  });

  it('mode', () => {
    const m = matcher({ mode: 4 });
    expect(m(pauseEvent({ mode: 4 }))).toBe(true);
    expect(m(pauseEvent({ mode: 8 }))).toBe(false);
  });

  it('RIP ranges: inclusive start, exclusive end, any of several, up to 2^64', () => {
    const m = matcher({ rip: [{ start: 0xffffffff81000000n, end: 0xffffffff82000000n }, { start: 0x1000n, end: 0x1001n }] });
    const at = (rip: bigint) => m(pauseEvent({ rip }));
    expect(at(0xffffffff81000000n)).toBe(true);
    expect(at(0xffffffff80ffffffn)).toBe(false);
    expect(at(0xffffffff81ffffffn)).toBe(true);
    expect(at(0xffffffff82000000n)).toBe(false);
    expect(at(0x1000n)).toBe(true);
    expect(at(0x1001n)).toBe(false);
    // Ranges crossing a 4 GiB boundary compare both halves.
    const cross = matcher({ rip: [{ start: 0xffff_fff0n, end: 0x1_0000_0010n }] });
    expect([0xffff_ffefn, 0xffff_fff0n, 0xffff_ffffn, 0x1_0000_0000n, 0x1_0000_000fn, 0x1_0000_0010n].map((rip) => cross(pauseEvent({ rip })))).toEqual([false, true, true, true, true, false]);
    const top = matcher({ rip: [{ start: ALL - 1n, end: 1n << 64n }] });
    expect([ALL - 2n, ALL - 1n, ALL].map((rip) => top(pauseEvent({ rip })))).toEqual([false, true, true]);
  });

  it('register values (masked), e.g. RAX == 34 for the guest-request hypercall', () => {
    const m = matcher({ kind: 'HYPERCALL', regs: [{ reg: 'rax', mask: 0xffff_ffffn, value: 34n }, { reg: 'rdi', mask: ALL, value: 24n }] });
    expect(m(hypercallEvent({ regs: { rax: 34n, rdi: 24n } }))).toBe(true);
    expect(m(hypercallEvent({ regs: { rax: 0xdead_0000_0000_0022n, rdi: 24n } }))).toBe(true); // only the low 32 bits of RAX
    expect(m(hypercallEvent({ regs: { rax: 35n, rdi: 24n } }))).toBe(false);
    expect(m(hypercallEvent({ regs: { rax: 34n, rdi: 24n | (1n << 63n) } }))).toBe(false);
    const r15 = matcher({ regs: [{ reg: 'r15', mask: 0xff00_0000_0000_0000n, value: 0xab00_0000_0000_0000n }] });
    expect(r15(pauseEvent({ regs: { r15: 0xab12_3456_789a_bcden } }))).toBe(true);
    expect(r15(pauseEvent({ regs: { r15: 0xac00_0000_0000_0000n } }))).toBe(false);
  });

  it('VM UUIDs: only for the evaluator of that VM', () => {
    expect(matcher({ vms: [VM_A] }, VM_A)(pauseEvent())).toBe(true);
    expect(matcher({ vms: [VM_A.toUpperCase()] }, VM_A)(pauseEvent())).toBe(true);
    expect(matcher({ vms: [VM_A] }, VM_B)(pauseEvent())).toBe(false);
    expect(matcher({ vms: [VM_A] })(pauseEvent())).toBe(false);
    expect(matcher({}, VM_B)(pauseEvent())).toBe(true);
  });
});

describe('CR / MSR / XSETBV', () => {
  it('CR index', () => {
    const m = matcher({ kind: 'CR', cr: [0, 4] });
    expect([0, 3, 4].map((cr) => m(crEvent(cr, 0n, 1n)))).toEqual([true, false, true]);
  });

  it('clears: some bit of the mask goes 1 → 0 (CR0.WP)', () => {
    const wp = 1n << 16n;
    const m = matcher({ kind: 'CR', cr: [0], clears: wp });
    expect(m(crEvent(0, 0x80050033n, 0x80040033n))).toBe(true);
    expect(m(crEvent(0, 0x80040033n, 0x80050033n))).toBe(false); // sets
    expect(m(crEvent(0, 0x80050033n, 0x80050032n))).toBe(false); // another bit
    // Multi-bit mask: clearing either bit is enough (SMEP|SMAP).
    const smx = matcher({ kind: 'CR', cr: [4], clears: 0x30_0000n });
    expect(smx(crEvent(4, 0x3406f0n, 0x2406f0n))).toBe(true); // SMEP only
    expect(smx(crEvent(4, 0x3406f0n, 0x1406f0n))).toBe(true); // SMAP only
    expect(smx(crEvent(4, 0x1406f0n, 0x1406f1n))).toBe(false);
  });

  it('sets and changes, on the high half too', () => {
    const hi = 1n << 63n;
    const sets = matcher({ kind: 'MSR', sets: hi | 1n });
    expect(sets(msrEvent(0x10, 0n, hi))).toBe(true);
    expect(sets(msrEvent(0x10, hi, 0n))).toBe(false);
    expect(sets(msrEvent(0x10, hi, hi | 1n))).toBe(true);
    const changes = matcher({ kind: 'MSR', changes: 1n << 40n });
    expect(changes(msrEvent(0x10, 1n << 40n, 0n))).toBe(true);
    expect(changes(msrEvent(0x10, 0n, 1n << 40n))).toBe(true);
    expect(changes(msrEvent(0x10, ALL, ALL ^ 1n))).toBe(false);
  });

  it('old / new value masks', () => {
    const m = matcher({ kind: 'MSR', msr: [0xc0000082], old: { mask: ALL, value: 0n }, new: { mask: 0xffff_0000_0000_0000n, value: 0xffff_0000_0000_0000n } });
    expect(m(msrEvent(0xc0000082, 0n, 0xffffffff81a00000n))).toBe(true);
    expect(m(msrEvent(0xc0000082, 1n, 0xffffffff81a00000n))).toBe(false);
    expect(m(msrEvent(0xc0000082, 0n, 0x0000_7fff_0000_0000n))).toBe(false);
    expect(m(msrEvent(0xc0000081, 0n, 0xffffffff81a00000n))).toBe(false);
  });

  it('MSR indexes above 2^31 (u32 compare)', () => {
    const m = matcher({ kind: 'MSR', msr: [0xc0000080, 0x176] });
    expect([0xc0000080, 0x176, 0x175, 0x40000080].map((x) => m(msrEvent(x, 0n, 1n)))).toEqual([true, true, false, false]);
  });

  it('XSETBV: xcr and the new value', () => {
    const m = matcher({ kind: 'XSETBV', xcr: [0], new: { mask: 0x4n, value: 0n } });
    expect(m(xsetbvEvent(0, 0x7n, 0x3n))).toBe(true);
    expect(m(xsetbvEvent(0, 0x3n, 0x7n))).toBe(false);
  });
});

describe('PF / BREAKPOINT / DESCRIPTOR / TRAP / SINGLESTEP', () => {
  it('PF gpa and gva ranges, access bits', () => {
    const m = matcher({ kind: 'PF', access: 2 | 4, gpa: [{ start: 0x100_0000n, end: 0x200_0000n }], gva: [{ start: 0xffffffff80000000n, end: 0xffffffffc0000000n }] });
    expect(m(pfEvent(0xffffffff81000000n, 0x100_0000n, 2))).toBe(true);
    expect(m(pfEvent(0xffffffff81000000n, 0x1ff_ffffn, 4))).toBe(true);
    expect(m(pfEvent(0xffffffff81000000n, 0x100_0000n, 1))).toBe(false); // R
    expect(m(pfEvent(0xffffffff81000000n, 0x200_0000n, 2))).toBe(false); // gpa end is exclusive
    expect(m(pfEvent(0xffffffffc0000000n, 0x100_0000n, 2))).toBe(false); // gva end is exclusive
    expect(m(pfEvent(0xffffffff7fffffffn, 0x100_0000n, 2))).toBe(false);
    expect(m(pfEvent(ALL, 0x100_0000n, 2))).toBe(false); // gva not reported (~0)
  });

  it('BREAKPOINT instruction gpa', () => {
    const m = matcher({ kind: 'BREAKPOINT', gpa: [{ start: 0x1000n, end: 0x2000n }] });
    expect([0xfffn, 0x1000n, 0x1fffn, 0x2000n].map((g) => m(bpEvent(g)))).toEqual([false, true, true, false]);
  });

  it('DESCRIPTOR kind and write flag', () => {
    const idtLoad = matcher({ kind: 'DESCRIPTOR', descriptor: [1], write: true });
    expect(idtLoad(descEvent(1, 1))).toBe(true);
    expect(idtLoad(descEvent(1, 0))).toBe(false); // SIDT
    expect(idtLoad(descEvent(2, 1))).toBe(false); // LGDT
    const stores = matcher({ kind: 'DESCRIPTOR', write: false });
    expect([descEvent(3, 0), descEvent(4, 0), descEvent(4, 1)].map(stores)).toEqual([true, true, false]);
  });

  it('TRAP vector', () => {
    const m = matcher({ kind: 'TRAP', vector: [13, 14] });
    expect([13, 14, 6].map((nr) => m(trapEvent(nr, 0, 0n)))).toEqual([true, true, false]);
  });

  it('SINGLESTEP failed flag', () => {
    const m = matcher({ kind: 'SINGLESTEP', failed: true });
    expect([m(ssEvent(1)), m(ssEvent(0))]).toEqual([true, false]);
  });

  it('criteria combine with AND', () => {
    const m = matcher({ kind: 'PF', access: 2, vcpus: [2], mode: 8, rip: [{ start: 0x10n, end: 0x20n }] });
    const o: FrameOptions = { vcpu: 2, mode: 8, rip: 0x18n };
    expect(m(pfEvent(0n, 0n, 2, o))).toBe(true);
    expect(m(pfEvent(0n, 0n, 2, { ...o, vcpu: 3 }))).toBe(false);
    expect(m(pfEvent(0n, 0n, 2, { ...o, mode: 4 }))).toBe(false);
    expect(m(pfEvent(0n, 0n, 2, { ...o, rip: 0x20n }))).toBe(false);
    expect(m(pfEvent(0n, 0n, 1, o))).toBe(false);
  });

  it('every kind-specific matcher ignores other kinds', () => {
    const kinds: VcpuEventKind[] = ['CR', 'MSR', 'PF', 'DESCRIPTOR', 'TRAP', 'SINGLESTEP', 'BREAKPOINT', 'XSETBV'];
    for (const k of kinds) expect(matcher({ kind: k })(pauseEvent())).toBe(false);
  });
});
