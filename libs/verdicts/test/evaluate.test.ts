import { describe, expect, it } from 'vitest';
import {
  checkEventReply,
  EventAction,
  events,
  KvmiSession,
  receiveKernelMessage,
  type EventDef,
  type KernelState,
} from '@periscope/kvmi';
import { compilePolicy, Evaluator, loadDefaultPolicy, type Policy, type Rule, type VcpuEventKind } from '@periscope/verdicts';
import { Duplex } from 'node:stream';
import {
  bpEvent,
  crEvent,
  descEvent,
  hypercallEvent,
  msrEvent,
  pauseEvent,
  pfEvent,
  ssEvent,
  trapEvent,
  viewOf,
  xsetbvEvent,
} from './support/events.js';

const ALL = 0xffff_ffff_ffff_ffffn;
const pol = (rules: Rule[], extra: Partial<Policy> = {}): Policy => ({ id: 'p', version: 1n, rules, ...extra });
const evaluator = (p: Policy, clock?: () => number) => new Evaluator(compilePolicy(p), clock ? { clock } : {});

describe('first match wins', () => {
  it('the earliest matching rule decides, later ones are not consulted', () => {
    const ev = evaluator(pol([
      { id: 'narrow', match: { kind: 'PF', access: 2, gva: [{ start: 0x1000n, end: 0x2000n }] }, action: { kind: 'allow' } },
      { id: 'broad', match: { kind: 'PF', access: 2 }, action: { kind: 'skip' } },
      { id: 'any', match: {}, action: { kind: 'crash' } },
    ]));
    expect(ev.evaluateFrame(pfEvent(0x1800n, 0n, 2))).toMatchObject({ ruleIndex: 0, ruleId: 'narrow', kind: 'allow', action: 0 });
    expect(ev.evaluateFrame(pfEvent(0x2800n, 0n, 2))).toMatchObject({ ruleIndex: 1, ruleId: 'broad', kind: 'skip', action: EventAction.RETRY });
    expect(ev.evaluateFrame(pfEvent(0x2800n, 0n, 1))).toMatchObject({ ruleIndex: 2, kind: 'crash', action: EventAction.CRASH });
  });

  it('order is kept inside the per-index buckets (CR number, MSR index)', () => {
    const ev = evaluator(pol([
      { id: 'any-cr', match: { kind: 'CR', vcpus: [9] }, action: { kind: 'crash' } },
      { id: 'cr4', match: { kind: 'CR', cr: [4] }, action: { kind: 'deny' } },
      { id: 'cr0-or-4', match: { kind: 'CR', cr: [0, 4] }, action: { kind: 'allow' } },
      { id: 'msr-a', match: { kind: 'MSR', msr: [0x10] }, action: { kind: 'deny' } },
      { id: 'msr-any', match: { kind: 'MSR' }, action: { kind: 'crash' } },
    ]));
    expect(ev.evaluateFrame(crEvent(4, 1n, 2n, { vcpu: 9 }))!.ruleId).toBe('any-cr');
    expect(ev.evaluateFrame(crEvent(4, 1n, 2n))!.ruleId).toBe('cr4');
    expect(ev.evaluateFrame(crEvent(0, 1n, 2n))!.ruleId).toBe('cr0-or-4');
    expect(ev.evaluateFrame(crEvent(3, 1n, 2n))!.ruleId).toBe(null);
    expect(ev.evaluateFrame(crEvent(3, 1n, 2n, { vcpu: 9 }))!.ruleId).toBe('any-cr');
    expect(ev.evaluateFrame(msrEvent(0x10, 1n, 2n))!.ruleId).toBe('msr-a');
    expect(ev.evaluateFrame(msrEvent(0x11, 1n, 2n))!.ruleId).toBe('msr-any');
  });

  it('no match: the default of the event kind (allow unless the policy says otherwise)', () => {
    const ev = evaluator(pol([], { defaultActions: { PF: { kind: 'retry' }, CR: { kind: 'deny' } } }));
    expect(ev.evaluateFrame(pfEvent(0n, 0n, 2))).toMatchObject({ ruleIndex: -1, ruleId: null, kind: 'retry', action: 1 });
    expect(ev.evaluateFrame(crEvent(0, 5n, 6n))).toMatchObject({ kind: 'deny', newVal: 5n });
    expect(ev.evaluateFrame(msrEvent(0x10, 5n, 6n))).toMatchObject({ kind: 'allow', newVal: 6n });
    expect(ev.evaluateFrame(pauseEvent())).toMatchObject({ kind: 'allow', action: 0, newVal: null });
    // A rule without action takes its kind's default.
    const ev2 = evaluator(pol([{ id: 'just-report', match: {}, report: { mode: 'always' } }], { defaultActions: { PF: { kind: 'skip' } } }));
    expect(ev2.evaluateFrame(pfEvent(0n, 0n, 2))).toMatchObject({ ruleId: 'just-report', kind: 'skip' });
    expect(ev2.evaluateFrame(crEvent(0, 1n, 2n))).toMatchObject({ ruleId: 'just-report', kind: 'allow', newVal: 2n });
  });
});

describe('exceptions', () => {
  const rules: Rule[] = [
    { id: 'msr-entry', match: { kind: 'MSR', msr: [0xc0000082] }, action: { kind: 'deny' }, severity: 'high' },
    { id: 'pf-x', match: { kind: 'PF', access: 4 }, action: { kind: 'inject', vector: 14, errorCode: 0x11 }, severity: 'high' },
  ];
  it('replace the outcome of the rules they name, only for events they match', () => {
    const ev = evaluator(pol(rules, {
      exceptions: [
        { id: 'init', rules: ['msr-entry'], match: { old: { mask: ALL, value: 0n }, kind: 'MSR' }, action: { kind: 'allow' } },
        { id: 'text', rules: ['pf-x'], match: { kind: 'PF', gva: [{ start: 0xffffffff80000000n, end: 0xffffffffc0000000n }] }, action: { kind: 'allow' }, report: { mode: 'never' } },
      ],
    }));
    expect(ev.evaluateFrame(msrEvent(0xc0000082, 0n, 0xffffffff81a00000n))).toMatchObject({ ruleId: 'msr-entry', exceptionIndex: 0, exceptionId: 'init', kind: 'allow', newVal: 0xffffffff81a00000n, severity: 0 });
    expect(ev.evaluateFrame(msrEvent(0xc0000082, 0xffffffff81a00000n, 0x4141n))).toMatchObject({ ruleId: 'msr-entry', exceptionIndex: -1, kind: 'deny', newVal: 0xffffffff81a00000n, severity: 4 });
    expect(ev.evaluateFrame(pfEvent(0xffffffff81000000n, 0n, 4))).toMatchObject({ ruleId: 'pf-x', exceptionId: 'text', kind: 'allow', report: false });
    expect(ev.evaluateFrame(pfEvent(0xffff888000000000n, 0n, 4))).toMatchObject({ ruleId: 'pf-x', exceptionId: null, kind: 'inject', injectVector: 14, injectErrorCode: 0x11 });
  });

  it('never make a non-matching event match; an exception for any rule also covers the default', () => {
    const ev = evaluator(pol(rules, { exceptions: [{ id: 'vcpu7', match: { vcpus: [7] }, action: { kind: 'crash' } }] }));
    expect(ev.evaluateFrame(pfEvent(0n, 0n, 2, { vcpu: 7 }))).toMatchObject({ ruleIndex: -1, exceptionId: 'vcpu7', kind: 'crash' });
    expect(ev.evaluateFrame(pfEvent(0n, 0n, 4, { vcpu: 7 }))).toMatchObject({ ruleId: 'pf-x', exceptionId: 'vcpu7', kind: 'crash' });
    const named = evaluator(pol(rules, { exceptions: [{ id: 'vcpu7', rules: ['pf-x'], match: { vcpus: [7] }, action: { kind: 'crash' } }] }));
    expect(named.evaluateFrame(pfEvent(0n, 0n, 2, { vcpu: 7 }))).toMatchObject({ ruleIndex: -1, exceptionIndex: -1, kind: 'allow' });
    expect(named.evaluateFrame(msrEvent(0xc0000082, 1n, 2n, { vcpu: 7 }))).toMatchObject({ ruleId: 'msr-entry', exceptionIndex: -1, kind: 'deny' });
  });

  it('first matching exception wins; expired ones are skipped', () => {
    let now = 1_000;
    const ev = evaluator(pol(rules, {
      exceptions: [
        { id: 'temp', rules: ['msr-entry'], match: { kind: 'MSR' }, action: { kind: 'allow' }, expiresUnixNs: 2_000_000_001n },
        { id: 'later', rules: ['msr-entry'], match: { kind: 'MSR' }, action: { kind: 'crash' } },
      ],
    }), () => now);
    expect(ev.evaluateFrame(msrEvent(0xc0000082, 1n, 2n))!.exceptionId).toBe('temp');
    now = 2_000;
    expect(ev.evaluateFrame(msrEvent(0xc0000082, 1n, 2n))!.exceptionId).toBe('temp'); // 2.000000001 s not reached
    now = 2_001;
    expect(ev.evaluateFrame(msrEvent(0xc0000082, 1n, 2n))).toMatchObject({ exceptionId: 'later', kind: 'crash', newVal: 1n });
  });
});

describe('actions and new_val', () => {
  it('deny with forceBits on 64-bit values with high bits set', () => {
    const force = 0xffff_0000_0030_0000n;
    const ev = evaluator(pol([{ id: 'pin', match: { kind: 'CR', cr: [4] }, action: { kind: 'deny', forceBits: force } }]));
    const cases: [bigint, bigint][] = [
      [ALL, 0n],
      [0n, ALL],
      [0xffff_ffff_ffff_ffffn, 0x0000_ffff_ffcf_ffffn],
      [0x8000_0000_0030_0000n, 0x7fff_ffff_ff00_0001n],
      [0x1234_5678_9abc_def0n, 0xfedc_ba98_7654_3210n],
    ];
    for (const [old, nw] of cases) {
      const v = ev.evaluateFrame(crEvent(4, old, nw))!;
      expect(v.kind).toBe('deny');
      expect(v.action).toBe(EventAction.CONTINUE);
      expect(v.newVal, `${old.toString(16)} → ${nw.toString(16)}`).toBe((nw & ~force & ALL) | (old & force));
    }
  });

  it('deny without forceBits replies the old value; allow the new one; crash carries the old one', () => {
    const ev = evaluator(pol([
      { id: 'd', match: { kind: 'MSR', msr: [1] }, action: { kind: 'deny' } },
      { id: 'a', match: { kind: 'MSR', msr: [2] }, action: { kind: 'allow' } },
      { id: 'c', match: { kind: 'MSR', msr: [3] }, action: { kind: 'crash' } },
    ]));
    expect(ev.evaluateFrame(msrEvent(1, ALL, 0x8000_0000_0000_0001n))!.newVal).toBe(ALL);
    expect(ev.evaluateFrame(msrEvent(2, ALL, 0x8000_0000_0000_0001n))!.newVal).toBe(0x8000_0000_0000_0001n);
    expect(ev.evaluateFrame(msrEvent(3, 0xffff_ffff_0000_0000n, 1n))).toMatchObject({ action: EventAction.CRASH, newVal: 0xffff_ffff_0000_0000n });
  });

  it('rewrite: (new & ~clearBits) | setBits (proto override_bits / fixed)', () => {
    const ev = evaluator(pol([
      { id: 'ovr', match: { kind: 'CR', cr: [0] }, action: { kind: 'rewrite', clearBits: 0xff00_0000_0000_0000n, setBits: 0x0000_0000_0001_0000n } },
      { id: 'fixed', match: { kind: 'CR', cr: [4] }, action: { kind: 'rewrite', clearBits: ALL, setBits: 0x3406f0n } },
    ]));
    expect(ev.evaluateFrame(crEvent(0, 0n, ALL ^ 0x10000n))!.newVal).toBe(0x00ff_ffff_ffff_ffffn);
    expect(ev.evaluateFrame(crEvent(4, 1n, ALL))!.newVal).toBe(0x3406f0n);
  });

  it('skip / retry / inject are RETRY; the verdict carries the injection', () => {
    const ev = evaluator(pol([
      { id: 's', match: { kind: 'DESCRIPTOR', descriptor: [1], write: true }, action: { kind: 'skip' } },
      { id: 'r', match: { kind: 'BREAKPOINT' }, action: { kind: 'retry' } },
      { id: 'i', match: { kind: 'PF', access: 4 }, action: { kind: 'inject', vector: 6 } },
    ]));
    expect(ev.evaluateFrame(descEvent(1, 1))).toMatchObject({ kind: 'skip', action: 1, newVal: null, injectVector: -1 });
    expect(ev.evaluateFrame(bpEvent(0x1000n))).toMatchObject({ kind: 'retry', action: 1 });
    expect(ev.evaluateFrame(pfEvent(0n, 0n, 4))).toMatchObject({ kind: 'inject', action: 1, injectVector: 6, injectErrorCode: 0 });
  });

  it('ask central: deadline (default 5, clamped to the policy maximum) and the default action', () => {
    const ev = evaluator(pol([
      { id: 'a', match: { kind: 'PF', access: 1 }, askCentral: {} },
      { id: 'b', match: { kind: 'PF', access: 2 }, askCentral: { deadlineMs: 50, default: { kind: 'skip' } } },
      { id: 'c', match: { kind: 'CR' }, askCentral: { deadlineMs: 1, default: { kind: 'deny' } } },
    ], { maxAskCentralDeadlineMs: 20, defaultActions: { PF: { kind: 'retry' } } }));
    expect(ev.evaluateFrame(pfEvent(0n, 0n, 1))).toMatchObject({ askCentral: true, deadlineMs: 5, kind: 'retry' });
    expect(ev.evaluateFrame(pfEvent(0n, 0n, 2))).toMatchObject({ askCentral: true, deadlineMs: 20, kind: 'skip' });
    expect(ev.evaluateFrame(crEvent(0, 3n, 4n))).toMatchObject({ askCentral: true, deadlineMs: 1, kind: 'deny', newVal: 3n });
    expect(ev.evaluateFrame(pfEvent(0n, 0n, 4))).toMatchObject({ askCentral: false, deadlineMs: 0 });
  });
});

describe('report decisions', () => {
  it('always / never / one in N per rule, inherited from the policy default', () => {
    const ev = evaluator(pol([
      { id: 'always', match: { kind: 'PF', access: 1 }, action: { kind: 'allow' }, report: { mode: 'always', withEvent: true } },
      { id: 'never', match: { kind: 'PF', access: 2 }, action: { kind: 'allow' }, report: { mode: 'never' } },
      { id: 'third', match: { kind: 'PF', access: 4 }, action: { kind: 'allow' }, report: { mode: 'sampled', oneIn: 3 } },
      { id: 'inherit', match: { kind: 'CR' }, action: { kind: 'allow' } },
    ], { defaultReport: { mode: 'sampled', oneIn: 2 } }));
    const seq = (f: Buffer, n: number) => Array.from({ length: n }, () => ev.evaluateFrame(f)!.report);
    expect(seq(pfEvent(0n, 0n, 1), 3)).toEqual([true, true, true]);
    expect(ev.evaluateFrame(pfEvent(0n, 0n, 1))!.reportEvent).toBe(true);
    expect(seq(pfEvent(0n, 0n, 2), 3)).toEqual([false, false, false]);
    expect(seq(pfEvent(0n, 0n, 4), 7)).toEqual([true, false, false, true, false, false, true]);
    expect(seq(crEvent(0, 0n, 1n), 4)).toEqual([true, false, true, false]);
    expect(seq(pauseEvent(), 4)).toEqual([true, false, true, false]); // the default verdict
    expect(ev.stats()).toMatchObject({ rules: [4, 3, 7, 4], exceptions: [], defaults: { PAUSE: 4, PF: 0 } });
  });
});

describe('over the view, every event kind, and the reply KVM would accept', () => {
  const state: KernelState = { isCommandAllowed: () => true, isEventAllowed: () => true, vcpuCount: () => 8, isVcpuReady: () => true, extensionsEnabled: () => true };
  const frames: [VcpuEventKind, Buffer][] = [
    ['PAUSE', pauseEvent({ seq: 11 })],
    ['HYPERCALL', hypercallEvent({ seq: 12, regs: { rax: 34n } })],
    ['BREAKPOINT', bpEvent(0x1000n, 1, { seq: 13 })],
    ['CR', crEvent(4, 0x3406f0n, 0x2406f0n, { seq: 14 })],
    ['TRAP', trapEvent(14, 2, 0xdeadn, { seq: 15 })],
    ['XSETBV', xsetbvEvent(0, 3n, 7n, { seq: 16 })],
    ['DESCRIPTOR', descEvent(1, 1, { seq: 17 })],
    ['MSR', msrEvent(0xc0000082, 0xffffffff81a00000n, 0x4141n, { seq: 18 })],
    ['PF', pfEvent(0xffffffff81000000n, 0x100_0000n, 2, { seq: 19 })],
    ['SINGLESTEP', ssEvent(0, { seq: 20 })],
  ];
  const p = loadDefaultPolicy();

  it('covers every vCPU event kind', () => {
    expect(frames.map(([k]) => k).sort()).toEqual(Object.values(events).filter((e) => e.scope === 'vcpu').map((e) => e.key).sort());
  });

  it.each(frames)('%s: evaluate(view) equals evaluateFrame, and writeReply passes the kernel-side check', (kind, f) => {
    const a = new Evaluator(compilePolicy(p));
    const b = new Evaluator(compilePolicy(p));
    const viaView = a.evaluate(viewOf(f)).toJSON();
    const viaFrame = b.evaluateFrame(f)!.toJSON();
    expect(viaView).toEqual(viaFrame);
    const v = a.evaluate(viewOf(f));
    const buf = Buffer.alloc(64);
    const n = v.writeReply(buf);
    const msg = receiveKernelMessage(buf.subarray(0, n), state);
    expect(msg.kind).toBe('event-reply');
    if (msg.kind !== 'event-reply') return;
    const check = checkEventReply(msg, { seq: v.seq, event: events[kind] as EventDef });
    expect(check).toEqual({ kind: 'reply', action: (['CONTINUE', 'RETRY', 'CRASH'] as const)[v.action], newVal: v.newVal });
  });

  it('the default policy decides the architecture walkthrough (CR4 SMEP clear) and friends', () => {
    const ev = new Evaluator(compilePolicy(p));
    const verdicts = Object.fromEntries(frames.map(([k, f]) => [k, ev.evaluateFrame(f)!.toJSON()]));
    expect(verdicts['CR']).toMatchObject({ ruleId: 'cr4-smep-smap-clear', kind: 'deny', newVal: '0x3406f0', report: true, reportEvent: true, severity: 4 });
    expect(verdicts['MSR']).toMatchObject({ ruleId: 'msr-syscall-entry', kind: 'deny', newVal: '0xffffffff81a00000' });
    expect(verdicts['PF']).toMatchObject({ ruleId: 'kernel-text-write', kind: 'skip', action: 1, severity: 5 });
    expect(verdicts['DESCRIPTOR']).toMatchObject({ ruleId: 'idt-load', kind: 'skip' });
    expect(verdicts['HYPERCALL']).toMatchObject({ ruleId: 'guest-request', askCentral: true, deadlineMs: 5, kind: 'allow' });
    for (const k of ['PAUSE', 'BREAKPOINT', 'TRAP', 'XSETBV', 'SINGLESTEP']) expect(verdicts[k]).toMatchObject({ ruleId: null, kind: 'allow', report: false });
    // CR0.WP clear → old value; other CR0 writes allowed.
    expect(ev.evaluateFrame(crEvent(0, 0x80050033n, 0x80040033n))).toMatchObject({ ruleId: 'cr0-wp-clear', newVal: 0x80050033n });
    expect(ev.evaluateFrame(crEvent(0, 0x80050033n, 0x80050031n))).toMatchObject({ ruleId: null, newVal: 0x80050031n });
    // SMEP cleared together with another change: SMEP comes back, the rest goes through.
    expect(ev.evaluateFrame(crEvent(4, 0x3406f0n, 0x2406f0n | 0x80n))!.newVal).toBe(0x3406f0n | 0x80n);
    // Exceptions.
    expect(ev.evaluateFrame(msrEvent(0xc0000082, 0n, 0xffffffff81a00000n))).toMatchObject({ exceptionId: 'msr-syscall-init', kind: 'allow', newVal: 0xffffffff81a00000n });
    expect(ev.evaluateFrame(pfEvent(0xffff888000001000n, 0x1000n, 4))).toMatchObject({ ruleId: 'pf-exec-data', kind: 'inject', injectVector: 14, injectErrorCode: 0x11 });
    expect(ev.evaluateFrame(pfEvent(0xffffffffc0001000n, 0x1000n, 4))).toMatchObject({ exceptionId: 'pf-exec-modules', kind: 'allow' });
    expect(ev.evaluateFrame(descEvent(1, 1, { rip: 0x7c00n, mode: 2 }))).toMatchObject({ exceptionId: 'idt-load-firmware', kind: 'allow' });
  });

  it('works inside a real KvmiSession handler (the view the session hands out)', async () => {
    // The tool side of a socket: what the kernel writes is pushed in; replies are collected.
    const replies: Buffer[] = [];
    const sock = new Duplex({
      read() {},
      write(chunk: Buffer, _enc, cb) {
        replies.push(chunk);
        cb();
      },
    });
    const ev = new Evaluator(compilePolicy(p));
    const seen: string[] = [];
    const session = new KvmiSession(sock, {
      onVcpuEvent: (view, s) => {
        const v = ev.evaluate(view);
        seen.push(`${v.ruleId}:${v.kind}`);
        s.replyToEvent(view.seq, view.vcpu, view.eventId, v.action, v.newVal ?? undefined);
      },
    });
    sock.push(crEvent(4, 0x3406f0n, 0x2406f0n, { seq: 40 }));
    sock.push(pfEvent(0xffffffff81000000n, 0x100_0000n, 2, { seq: 41 }));
    await new Promise((r) => setTimeout(r, 20));
    expect(seen).toEqual(['cr4-smep-smap-clear:deny', 'kernel-text-write:skip']);
    const all = Buffer.concat(replies);
    expect(all.length).toBe(32 + 24);
    expect(all.readUInt32LE(4)).toBe(40); // seq of the CR reply
    expect(all.readBigUInt64LE(24)).toBe(0x3406f0n); // new_val: SMEP/SMAP forced back
    session.close();
  });
});
