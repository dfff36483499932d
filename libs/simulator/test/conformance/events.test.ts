/**
 * Raw-frame conformance: every event kind (kvmi-v12.md §3.2, §5) triggered by a guest action, read raw
 * and compared with a frame built from the sheet, answered with raw reply bytes (the golden event
 * replies, seq patched to KVM's counter, on the golden vCPU index) for every allowed action, and the
 * guest-visible outcome checked (§3.3).
 */
import { afterEach, describe, expect, it } from 'vitest';

import { KERNEL_BASE } from '../../src/index.js';
import {
  ACTION, ALL_ONES, E, EV, ID, INSN, RAX_ENOSYS, eventReply, idOf, insnLen, le64, maskEventPadding, patchSeq, reply, req, seqOf, specific,
  vmEventUnhook,
} from './support/bytes.js';
import { expectEvent } from './support/events.js';
import { golden, handWritten } from './support/oracles.js';
import { Rig, archOf, closeRigs, until } from './support/rig.js';

afterEach(closeRigs);

const EIGHT = { vcpus: 8, apsOnline: true } as const;
/** A golden event reply with the seq KVM gave the event. */
const gr = (name: string, seq: number): string => patchSeq(golden(name).hex, seq);
/** Send a command and expect its plain success reply (no reply data). */
async function ok(r: Rig, q: string): Promise<void> {
  expect(await r.conn.call(q)).toBe(reply(idOf(q), seqOf(q), 0));
}
const LSTAR = 0xc0000082;

describe('KVMI_VCPU_EVENT_PAUSE (1)', () => {
  it('one PAUSE event after VM_PAUSE_VCPU; CONTINUE (golden reply, seq 1, vcpu 3) resumes the vCPU', async () => {
    const r = await Rig.start({ vm: EIGHT });
    await ok(r, req.pause(1, 3));
    const f = await expectEvent(r, { seq: 1, event: EV.PAUSE, vcpu: 3 });
    expect(f).not.toBe(maskEventPadding(f)); // the uninitialised padding is not zero here (§2.2): the comparison ignores it
    expect(r.vcpu(3).waitingFor).toMatchObject({ event: 'PAUSE', seq: 1 });
    expect(golden('event-pause-reply-continue').hex).toBe(handWritten('hw-event-pause-reply-continue').hex);
    r.conn.send(golden('event-pause-reply-continue').hex);
    expect(await r.vcpu(3).descriptorAccess(1, false)).toMatchObject({ outcome: 'completed', events: [], crashed: false });
    expect(r.vcpu(3).waitingFor).toBeNull();
    expect(r.conn.isClosed).toBe(false);
  });

  it('CRASH (golden): the vCPU runs no more guest code and sends no more events; the socket stays open', async () => {
    const r = await Rig.start({ vm: EIGHT });
    await ok(r, req.pause(1, 3));
    await expectEvent(r, { seq: 1, event: EV.PAUSE, vcpu: 3 });
    r.conn.send(golden('event-pause-reply-crash').hex);
    await until(() => r.vcpu(3).isCrashed, 'the crash');
    expect(await r.vcpu(3).descriptorAccess(1, false)).toMatchObject({ outcome: 'vcpu-crashed', crashed: true });
    await ok(r, req.pause(2, 3));
    expect(await r.conn.call(req.getInfo(3, 3))).toBe(reply(ID.VCPU_GET_INFO, 3, 0, le64(2_500_000_000n)));
    await r.conn.quiet(30);
    expect(r.conn.isClosed).toBe(false);
  });
});

describe('KVMI_VCPU_EVENT_HYPERCALL (3)', () => {
  it('VMCALL RAX=34 RDI=24 RSI=0 raises it; CONTINUE (golden) → RAX 0', async () => {
    const r = await Rig.start({ vm: EIGHT });
    await ok(r, req.controlEvents(1, 1, EV.HYPERCALL, 1));
    const p = r.vcpu(1).vmcall();
    const f = await expectEvent(r, { seq: 1, event: EV.HYPERCALL, vcpu: 1 });
    // §5.2: kvm_regs at payload 24: rax, then rbx, rcx, rdx, rsi, rdi (RAX = 34, RSI = 0, RDI = 24).
    expect(f.slice(2 * 32, 2 * 40)).toBe(le64(34));
    expect(f.slice(2 * 64, 2 * 80)).toBe(le64(0) + le64(24));
    expect(f.length / 2).toBe(8 + 552);
    r.conn.send(gr('event-hypercall-reply-continue', 1));
    expect(await p).toMatchObject({ outcome: 'completed', value: 0n, crashed: false, events: [{ event: 'HYPERCALL', seq: 1, ended: 'CONTINUE' }] });
    expect(r.vcpu(1).cpu.regs.rax).toBe(0n);
  });

  it('CRASH (golden) → RAX = −KVM_ENOSYS (−1000)', async () => {
    const r = await Rig.start({ vm: EIGHT });
    await ok(r, req.controlEvents(1, 1, EV.HYPERCALL, 1));
    const p = r.vcpu(1).vmcall();
    await expectEvent(r, { seq: 1, event: EV.HYPERCALL, vcpu: 1 });
    r.conn.send(gr('event-hypercall-reply-crash', 1));
    expect(await p).toMatchObject({ outcome: 'completed', value: RAX_ENOSYS, crashed: true, events: [{ event: 'HYPERCALL', seq: 1, ended: 'CRASH' }] });
    expect(r.vcpu(1).cpu.regs.rax).toBe(0xfffffffffffffc18n);
  });

  it('no event and RAX −1000 when not enabled or when the sub-arguments do not match', async () => {
    const r = await Rig.start({ vm: EIGHT });
    expect(await r.vcpu(1).vmcall()).toMatchObject({ value: RAX_ENOSYS, events: [] });
    await ok(r, req.controlEvents(1, 1, EV.HYPERCALL, 1));
    expect(await r.vcpu(1).vmcall({ rdi: 25n })).toMatchObject({ value: RAX_ENOSYS, events: [] });
    expect(await r.vcpu(1).vmcall({ rsi: 1n })).toMatchObject({ value: RAX_ENOSYS, events: [] });
    await r.conn.quiet(20);
  });

  it('`mode` follows the guest (4 in 32-bit code, 2 in 16-bit code); in 32-bit mode the sub-arguments are EBX and ECX', async () => {
    const r = await Rig.start();
    const v = r.vcpu(0);
    await ok(r, req.controlEvents(1, 0, EV.HYPERCALL, 1));
    v.cpu.sregs = { ...v.cpu.sregs, cs: { ...v.cpu.sregs.cs, l: 0, db: 1 } }; // the guest runs 32-bit code
    expect(await v.vmcall({ rdi: 24n, rsi: 0n, rbx: 7n, rcx: 0n })).toMatchObject({ value: RAX_ENOSYS, events: [] });
    let p = v.vmcall({ rbx: 0xffffffff00000018n, rcx: 0n, rdi: 99n, rsi: 99n });
    await expectEvent(r, { seq: 1, event: EV.HYPERCALL, vcpu: 0, mode: 4 });
    r.conn.send(eventReply(1, 0, ACTION.CONTINUE, EV.HYPERCALL));
    expect(await p).toMatchObject({ value: 0n });
    v.cpu.sregs = { ...v.cpu.sregs, cs: { ...v.cpu.sregs.cs, l: 0, db: 0 } }; // 16-bit code
    p = v.vmcall({ rbx: 24n, rcx: 0n });
    await expectEvent(r, { seq: 2, event: EV.HYPERCALL, vcpu: 0, mode: 2 });
    r.conn.send(eventReply(2, 0, ACTION.CONTINUE, EV.HYPERCALL));
    expect(await p).toMatchObject({ value: 0n });
  });
});

describe('KVMI_VCPU_EVENT_BREAKPOINT (5)', () => {
  it('INT3: gpa of RIP and insn_len 1; CONTINUE (golden) re-injects #BP; RETRY (golden) does not', async () => {
    const r = await Rig.start({ vm: EIGHT });
    await ok(r, req.controlEvents(1, 2, EV.BREAKPOINT, 1));
    const v = r.vcpu(2);
    // RIP = KERNEL_BASE + 0x100000, mapped by the boot page tables to gpa 0x100000.
    expect(v.cpu.regs.rip).toBe(KERNEL_BASE + 0x100000n);
    let p = v.int3();
    await expectEvent(r, { seq: 1, event: EV.BREAKPOINT, vcpu: 2, specific: specific.breakpoint(0x100000n, 1) });
    r.conn.send(gr('event-breakpoint-reply-continue', 1));
    expect(await p).toMatchObject({ outcome: 'exception', vector: 3, events: [{ event: 'BREAKPOINT', seq: 1, ended: 'CONTINUE' }] });
    expect(v.deliveredExceptions.at(-1)).toEqual({ vector: 3, errorCode: undefined });
    p = v.int3();
    await expectEvent(r, { seq: 2, event: EV.BREAKPOINT, vcpu: 2, specific: specific.breakpoint(0x100000n, 1) });
    r.conn.send(gr('event-breakpoint-reply-retry', 2));
    expect(await p).toMatchObject({ outcome: 'retry', crashed: false, events: [{ event: 'BREAKPOINT', seq: 2, ended: 'RETRY' }] });
    expect(v.deliveredExceptions).toHaveLength(1);
  });

  it('CRASH (golden) acts as RETRY (no #BP); gpa is ~0 when RIP does not translate', async () => {
    const r = await Rig.start({ vm: EIGHT });
    await ok(r, req.controlEvents(1, 2, EV.BREAKPOINT, 1));
    const v = r.vcpu(2);
    v.cpu.regs = { ...v.cpu.regs, rip: 0x0000700000000000n }; // the guest jumped to an unmapped address
    const p = v.int3();
    await expectEvent(r, { seq: 1, event: EV.BREAKPOINT, vcpu: 2, specific: specific.breakpoint(ALL_ONES, 1) });
    r.conn.send(gr('event-breakpoint-reply-crash', 1));
    expect(await p).toMatchObject({ outcome: 'retry', crashed: true, events: [{ event: 'BREAKPOINT', seq: 1, ended: 'CRASH' }] });
    expect(v.deliveredExceptions).toHaveLength(0);
  });
});

describe('KVMI_VCPU_EVENT_CR (7)', () => {
  it('CONTINUE writes new_val: changed by the tool (golden, hand-written), kept (old_value), echoed, 0 when omitted', async () => {
    const r = await Rig.start({ vm: EIGHT });
    const v = r.vcpu(5);
    await ok(r, req.controlEvents(1, 5, EV.CR, 1));
    await ok(r, req.controlCr(2, 5, 3, 1));
    const cr3 = v.cpu.sregs.cr3;
    let p = v.writeCr(3, 0x1234f5000n);
    await expectEvent(r, { seq: 1, event: EV.CR, vcpu: 5, specific: specific.cr(3, cr3, 0x1234f5000n) });
    r.conn.send(gr('event-cr-reply-continue', 1)); // new_val 0x8000000abcdef000
    expect(await p).toMatchObject({ outcome: 'completed', value: 0x8000000abcdef000n, events: [{ event: 'CR', seq: 1, ended: 'CONTINUE' }] });
    expect(v.cpu.sregs.cr3).toBe(0x8000000abcdef000n);
    p = v.writeCr(3, 0x5000n);
    await expectEvent(r, { seq: 2, event: EV.CR, vcpu: 5, specific: specific.cr(3, 0x8000000abcdef000n, 0x5000n) });
    r.conn.send(handWritten('hw-event-cr-reply-continue-new-val').hex); // seq 2, vcpu 5, new_val 0x80000000abcd1000
    expect((await p).value).toBe(0x80000000abcd1000n);
    p = v.writeCr(3, 0x6000n);
    await expectEvent(r, { seq: 3, event: EV.CR, vcpu: 5, specific: specific.cr(3, 0x80000000abcd1000n, 0x6000n) });
    r.conn.send(eventReply(3, 5, ACTION.CONTINUE, EV.CR, { data: le64(0x80000000abcd1000n) })); // block: old_value
    expect(await p).toMatchObject({ outcome: 'completed', value: 0x80000000abcd1000n });
    p = v.writeCr(3, 0x7000n);
    await expectEvent(r, { seq: 4, event: EV.CR, vcpu: 5, specific: specific.cr(3, 0x80000000abcd1000n, 0x7000n) });
    r.conn.send(eventReply(4, 5, ACTION.CONTINUE, EV.CR, { data: le64(0x7000n) })); // allow: echo new_value
    expect((await p).value).toBe(0x7000n);
    p = v.writeCr(3, 0x8000n);
    await expectEvent(r, { seq: 5, event: EV.CR, vcpu: 5, specific: specific.cr(3, 0x7000n, 0x8000n) });
    r.conn.send(eventReply(5, 5, ACTION.CONTINUE, EV.CR)); // 16-byte reply: new_val reads as 0
    expect((await p).value).toBe(0n);
    expect(v.cpu.sregs.cr3).toBe(0n);
    expect(r.conn.isClosed).toBe(false);
  });

  it('CR0 and CR4 events; none when the value does not change, the CR or the event is not enabled', async () => {
    const r = await Rig.start({ vm: EIGHT });
    const v = r.vcpu(5);
    expect((await v.writeCr(4, 0x6f0n)).events).toEqual([]); // event not enabled
    await ok(r, req.controlEvents(1, 5, EV.CR, 1));
    expect((await v.writeCr(4, 0x6e0n)).events).toEqual([]); // CR4 not enabled
    await ok(r, req.controlCr(2, 5, 4, 1));
    await ok(r, req.controlCr(3, 5, 0, 1));
    expect((await v.writeCr(4, 0x6e0n)).events).toEqual([]); // same value
    let p = v.writeCr(4, 0x6a0n);
    await expectEvent(r, { seq: 1, event: EV.CR, vcpu: 5, specific: specific.cr(4, 0x6e0n, 0x6a0n) });
    r.conn.send(eventReply(1, 5, ACTION.CONTINUE, EV.CR, { data: le64(0x6a0n) }));
    expect((await p).value).toBe(0x6a0n);
    const cr0 = v.cpu.sregs.cr0;
    p = v.writeCr(0, cr0 | 0x40000000n); // CD
    await expectEvent(r, { seq: 2, event: EV.CR, vcpu: 5, specific: specific.cr(0, cr0, cr0 | 0x40000000n) });
    r.conn.send(eventReply(2, 5, ACTION.CONTINUE, EV.CR, { data: le64(cr0) }));
    expect((await p).value).toBe(cr0);
  });

  it('CRASH (golden, carrying a new_val) refuses the write: #GP, CR unchanged', async () => {
    const r = await Rig.start({ vm: EIGHT });
    const v = r.vcpu(5);
    await ok(r, req.controlEvents(1, 5, EV.CR, 1));
    await ok(r, req.controlCr(2, 5, 3, 1));
    const cr3 = v.cpu.sregs.cr3;
    const p = v.writeCr(3, 0x8000000abcdef000n);
    await expectEvent(r, { seq: 1, event: EV.CR, vcpu: 5, specific: specific.cr(3, cr3, 0x8000000abcdef000n) });
    r.conn.send(gr('event-cr-reply-crash', 1));
    expect(await p).toMatchObject({ outcome: 'gp', vector: 13, value: cr3, crashed: true, events: [{ event: 'CR', seq: 1, ended: 'CRASH' }] });
    expect(v.cpu.sregs.cr3).toBe(cr3);
    expect(r.conn.isClosed).toBe(false);
  });
});

describe('KVMI_VCPU_EVENT_TRAP (9)', () => {
  it('reports the injected exception (error code only for vectors that have one, address = CR2 whatever the vector); CONTINUE (golden)', async () => {
    const r = await Rig.start({ vm: EIGHT });
    const v = r.vcpu(7);
    const cr2 = 0xffff800012345000n;
    await ok(r, req.inject(1, 7, 14, 0x2, cr2)); // #PF: address becomes CR2
    await expectEvent(r, { seq: 1, event: EV.TRAP, vcpu: 7, specific: specific.trap(14, 2, cr2) });
    expect(v.cpu.sregs.cr2).toBe(cr2);
    r.conn.send(gr('event-trap-reply-continue', 1));
    await ok(r, req.inject(2, 7, 13, 0x18, 0xdeadn)); // #GP: address ignored, TRAP reports the current CR2
    await expectEvent(r, { seq: 2, event: EV.TRAP, vcpu: 7, specific: specific.trap(13, 0x18, cr2) });
    r.conn.send(gr('event-trap-reply-continue', 2));
    await ok(r, req.inject(3, 7, 6, 0x1234, 0xdeadn)); // #UD has no error code
    await expectEvent(r, { seq: 3, event: EV.TRAP, vcpu: 7, specific: specific.trap(6, 0, cr2) });
    r.conn.send(gr('event-trap-reply-continue', 3));
    expect(await v.descriptorAccess(1, false)).toMatchObject({ outcome: 'completed', crashed: false });
    expect(v.deliveredExceptions).toEqual([{ vector: 14, errorCode: 2 }, { vector: 13, errorCode: 0x18 }, { vector: 6, errorCode: undefined }]);
  });

  it('CRASH (golden)', async () => {
    const r = await Rig.start({ vm: EIGHT });
    await ok(r, req.inject(1, 7, 3, 0, 0n));
    await expectEvent(r, { seq: 1, event: EV.TRAP, vcpu: 7, specific: specific.trap(3, 0, 0n) });
    r.conn.send(gr('event-trap-reply-crash', 1));
    await until(() => r.vcpu(7).isCrashed, 'the crash');
    expect(await r.vcpu(7).descriptorAccess(1, false)).toMatchObject({ outcome: 'vcpu-crashed' });
  });
});

describe('KVMI_VCPU_EVENT_XSETBV (11)', () => {
  it('informational: XCR0 is already written; CONTINUE and CRASH (golden) both leave the new value', async () => {
    const r = await Rig.start({ vm: EIGHT });
    const v = r.vcpu(4);
    await ok(r, req.controlEvents(1, 4, EV.XSETBV, 1));
    expect((await v.xsetbv(7n)).events).toEqual([]); // unchanged
    let p = v.xsetbv(3n);
    await expectEvent(r, { seq: 1, event: EV.XSETBV, vcpu: 4, specific: specific.xsetbv(0, 7n, 3n) });
    expect(await r.conn.call(req.getXcr(2, 4, 0))).toBe(reply(ID.VCPU_GET_XCR, 2, 0, le64(3)));
    r.conn.send(gr('event-xsetbv-reply-continue', 1));
    expect(await p).toMatchObject({ outcome: 'completed', value: 3n, events: [{ event: 'XSETBV', seq: 1, ended: 'CONTINUE' }] });
    p = v.xsetbv(7n);
    await expectEvent(r, { seq: 2, event: EV.XSETBV, vcpu: 4, specific: specific.xsetbv(0, 3n, 7n) });
    r.conn.send(gr('event-xsetbv-reply-crash', 2));
    expect(await p).toMatchObject({ outcome: 'completed', value: 7n, crashed: true });
    expect(v.cpu.xcr0).toBe(7n);
  });
});

describe('KVMI_VCPU_EVENT_DESCRIPTOR (13)', () => {
  it('IDTR/GDTR/LDTR/TR loads and stores; CONTINUE emulates, RETRY and CRASH (golden) do not', async () => {
    const r = await Rig.start({ vm: EIGHT });
    const v = r.vcpu(6);
    await ok(r, req.controlEvents(1, 6, EV.DESCRIPTOR, 1));
    const steps: Array<[1 | 2 | 3 | 4, boolean, string, string]> = [
      [1, true, 'event-descriptor-reply-continue', 'completed'],
      [2, false, 'event-descriptor-reply-retry', 'retry'],
      [3, true, 'event-descriptor-reply-continue', 'completed'],
      [4, false, 'event-descriptor-reply-crash', 'retry'],
    ];
    for (const [i, [desc, write, rep, outcome]] of steps.entries()) {
      const p = v.descriptorAccess(desc, write);
      await expectEvent(r, { seq: i + 1, event: EV.DESCRIPTOR, vcpu: 6, specific: specific.descriptor(desc, write ? 1 : 0) });
      r.conn.send(gr(rep, i + 1));
      expect(await p).toMatchObject({ outcome, crashed: i === 3 });
    }
  });
});

describe('KVMI_VCPU_EVENT_MSR (15)', () => {
  it('guest WRMSR to an enabled MSR: CONTINUE writes new_val (golden: changed; hand: kept); CRASH (golden) → #GP', async () => {
    const r = await Rig.start({ vm: EIGHT });
    const v = r.vcpu(1);
    await ok(r, req.controlEvents(1, 1, EV.MSR, 1));
    await ok(r, req.controlMsr(2, 1, LSTAR, 1));
    const old = v.cpu.readMsr(LSTAR)!;
    let p = v.wrmsr(LSTAR, 0xffffffff81000000n);
    await expectEvent(r, { seq: 1, event: EV.MSR, vcpu: 1, specific: specific.msr(LSTAR, old, 0xffffffff81000000n) });
    r.conn.send(gr('event-msr-reply-continue', 1)); // new_val 0xffffffffc0ffee00
    expect(await p).toMatchObject({ outcome: 'completed', value: 0xffffffffc0ffee00n });
    expect(v.cpu.readMsr(LSTAR)).toBe(0xffffffffc0ffee00n);
    p = v.wrmsr(LSTAR, 0x1234n);
    await expectEvent(r, { seq: 2, event: EV.MSR, vcpu: 1, specific: specific.msr(LSTAR, 0xffffffffc0ffee00n, 0x1234n) });
    r.conn.send(eventReply(2, 1, ACTION.CONTINUE, EV.MSR, { data: le64(0xffffffffc0ffee00n) }));
    expect((await p).value).toBe(0xffffffffc0ffee00n);
    expect(v.setMsrFromHost(LSTAR, 0x42n)).toBe(true); // host-initiated: never an event
    p = v.wrmsr(LSTAR, 0x43n);
    await expectEvent(r, { seq: 3, event: EV.MSR, vcpu: 1, specific: specific.msr(LSTAR, 0x42n, 0x43n) });
    r.conn.send(gr('event-msr-reply-crash', 3));
    expect(await p).toMatchObject({ outcome: 'gp', vector: 13, crashed: true, events: [{ event: 'MSR', seq: 3, ended: 'CRASH' }] });
    expect(v.cpu.readMsr(LSTAR)).toBe(0x42n);
  });
});

describe('KVMI_VCPU_EVENT_PF (17)', () => {
  it('a restricted access with PF enabled: gva ~0 for a gpa access; CONTINUE (golden) emulates, RETRY (golden, hand-written) does not', async () => {
    const r = await Rig.start({ vm: EIGHT });
    const v = r.vcpu(2);
    await ok(r, req.setPageAccess(1, [req.pageEntry(0x200000n, 5), req.pageEntry(0x201000n, 3)]));
    expect((await v.access({ gpa: 0x200010n }, 'w', { data: Buffer.from('01', 'hex') })).events).toEqual([]); // PF not enabled
    await ok(r, req.controlEvents(2, 2, EV.PF, 1));
    let p = v.access({ gpa: 0x200010n }, 'w', { data: Buffer.from('aabbccdd', 'hex') });
    await expectEvent(r, { seq: 1, event: EV.PF, vcpu: 2, specific: specific.pf(ALL_ONES, 0x200010n, 2) });
    r.conn.send(gr('event-pf-reply-continue', 1));
    expect(await p).toMatchObject({ outcome: 'completed', events: [{ event: 'PF', seq: 1, ended: 'CONTINUE' }] });
    expect(r.vm.memory.read(0x200010n, 4)!.toString('hex')).toBe('aabbccdd');
    p = v.access({ gpa: 0x200020n }, 'w', { data: Buffer.from('eeff', 'hex') });
    await expectEvent(r, { seq: 2, event: EV.PF, vcpu: 2, specific: specific.pf(ALL_ONES, 0x200020n, 2) });
    r.conn.send(gr('event-pf-reply-retry', 2));
    expect(await p).toMatchObject({ outcome: 'retry' });
    expect(r.vm.memory.read(0x200020n, 2)!.toString('hex')).toBe('0000');
    p = v.access({ gva: KERNEL_BASE + 0x201008n }, 'x');
    await expectEvent(r, { seq: 3, event: EV.PF, vcpu: 2, specific: specific.pf(KERNEL_BASE + 0x201008n, 0x201008n, 4) });
    r.conn.send(handWritten('hw-event-pf-reply-retry').hex); // seq 3, vcpu 2
    expect(await p).toMatchObject({ outcome: 'retry' });
    expect(await v.access({ gpa: 0x200010n }, 'r', { length: 4 })).toMatchObject({ outcome: 'completed', events: [] }); // read allowed
    await r.conn.quiet(20);
  });

  it('CRASH (golden) acts as RETRY', async () => {
    const r = await Rig.start({ vm: EIGHT });
    await ok(r, req.setPageAccess(1, [req.pageEntry(0x300000n, 0)]));
    await ok(r, req.controlEvents(2, 2, EV.PF, 1));
    const p = r.vcpu(2).access({ gpa: 0x300000n }, 'r');
    await expectEvent(r, { seq: 1, event: EV.PF, vcpu: 2, specific: specific.pf(ALL_ONES, 0x300000n, 1) });
    r.conn.send(gr('event-pf-reply-crash', 1));
    expect(await p).toMatchObject({ outcome: 'retry', crashed: true });
  });
});

describe('guest actions resume at the register RIP (real instructions, ground-truth lengths)', () => {
  // The boot RIP KERNEL_BASE + 0x100000 maps to gpa 0x100000 (boot page tables, 2 MiB kernel map).
  const BOOT_RIP = KERNEL_BASE + 0x100000n;
  const BOOT_GPA = 0x100000n;
  /** The bytes at a gpa, read raw with VM_READ_PHYSICAL. */
  async function readRaw(r: Rig, seq: number, gpa: bigint, size: number): Promise<string> {
    const f = await r.conn.call(req.readPhys(seq, gpa, size));
    expect(f.slice(0, 32)).toBe(reply(ID.VM_READ_PHYSICAL, seq, 0, '00'.repeat(size)).slice(0, 32));
    return f.slice(32);
  }

  it('a retired action moves RIP by its length; the next action is placed after it (straight-line code)', async () => {
    const r = await Rig.start({ vm: EIGHT });
    const v = r.vcpu(4);
    await ok(r, req.controlEvents(1, 4, EV.CR, 1));
    await ok(r, req.controlCr(2, 4, 4, 1));
    expect(v.cpu.regs.rip).toBe(BOOT_RIP);
    const cr4 = v.cpu.sregs.cr4;
    const p = v.writeCr(4, cr4 ^ 0x80n);
    await expectEvent(r, { seq: 1, event: EV.CR, vcpu: 4, specific: specific.cr(4, cr4, cr4 ^ 0x80n) });
    expect(archOf(v).regs.rip).toBe(BOOT_RIP); // the event's RIP is the MOV
    expect(await readRaw(r, 3, BOOT_GPA, 3)).toBe(INSN['mov cr4, rax']);
    r.conn.send(eventReply(1, 4, ACTION.CONTINUE, EV.CR, { data: le64(cr4) })); // deny: keep the old value
    expect(await p).toMatchObject({ outcome: 'completed', value: cr4 });
    expect(v.cpu.regs.rip).toBe(BOOT_RIP + insnLen('mov cr4, rax'));
    expect((await v.wrmsr(0xc0000103, 9n)).outcome).toBe('completed'); // TSC_AUX, no event
    expect(v.cpu.regs.rip).toBe(BOOT_RIP + insnLen('mov cr4, rax') + insnLen('wrmsr'));
    expect(await readRaw(r, 4, BOOT_GPA, 5)).toBe(INSN['mov cr4, rax'] + INSN.wrmsr);
    // A fault leaves RIP at the faulting instruction: WRMSR to an MSR the vCPU does not have is #GP.
    const before = v.cpu.regs.rip;
    expect((await v.wrmsr(0x12345, 1n)).outcome).toBe('gp');
    expect(v.cpu.regs.rip).toBe(before);
  });

  it('PF on a 4-byte store (`mov [rdi], eax`): CONTINUE performs the write and moves RIP past it', async () => {
    const r = await Rig.start({ vm: EIGHT });
    const v = r.vcpu(2);
    await ok(r, req.setPageAccess(1, [req.pageEntry(0x300000n, 5)]));
    await ok(r, req.controlEvents(2, 2, EV.PF, 1));
    const rip = v.cpu.regs.rip;
    const p = v.access({ gva: KERNEL_BASE + 0x300010n }, 'w', { data: Buffer.from('11223344', 'hex') });
    await expectEvent(r, { seq: 1, event: EV.PF, vcpu: 2, specific: specific.pf(KERNEL_BASE + 0x300010n, 0x300010n, 2) });
    expect(await readRaw(r, 3, BOOT_GPA, 2)).toBe(INSN['mov [rdi], eax']);
    r.conn.send(eventReply(1, 2, ACTION.CONTINUE, EV.PF));
    expect(await p).toMatchObject({ outcome: 'completed', events: [{ event: 'PF', seq: 1, ended: 'CONTINUE' }] });
    expect(r.vm.memory.read(0x300010n, 5)!.toString('hex')).toBe('1122334400');
    expect(v.cpu.regs.rip).toBe(rip + insnLen('mov [rdi], eax'));
  });

  it('PF on a 2-byte store (`mov [rdi], ax`): RETRY leaves RIP at the store and memory unchanged; RETRY after SET_REGISTERS RIP + length skips it', async () => {
    const r = await Rig.start({ vm: EIGHT });
    const v = r.vcpu(2);
    await ok(r, req.setPageAccess(1, [req.pageEntry(0x300000n, 5)]));
    await ok(r, req.controlEvents(2, 2, EV.PF, 1));
    const rip = v.cpu.regs.rip;
    let p = v.access({ gva: KERNEL_BASE + 0x300020n }, 'w', { data: Buffer.from('aabb', 'hex') });
    await expectEvent(r, { seq: 1, event: EV.PF, vcpu: 2, specific: specific.pf(KERNEL_BASE + 0x300020n, 0x300020n, 2) });
    expect(await readRaw(r, 3, BOOT_GPA, 3)).toBe(INSN['mov [rdi], ax']);
    r.conn.send(eventReply(1, 2, ACTION.RETRY, EV.PF));
    expect(await p).toMatchObject({ outcome: 'retry' });
    expect(v.cpu.regs.rip).toBe(rip); // the store is still at RIP: the next entry re-executes it
    expect(r.vm.memory.read(0x300020n, 2)!.toString('hex')).toBe('0000');
    p = v.access({ gva: KERNEL_BASE + 0x300020n }, 'w', { data: Buffer.from('aabb', 'hex') });
    await expectEvent(r, { seq: 2, event: EV.PF, vcpu: 2, specific: specific.pf(KERNEL_BASE + 0x300020n, 0x300020n, 2) });
    const regs = archOf(v).regs;
    await ok(r, req.setRegs(4, 2, { ...regs, rip: regs.rip + insnLen('mov [rdi], ax') }));
    r.conn.send(eventReply(2, 2, ACTION.RETRY, EV.PF));
    expect(await p).toMatchObject({ outcome: 'retry' });
    expect(v.cpu.regs.rip).toBe(rip + insnLen('mov [rdi], ax')); // skipped
    expect(r.vm.memory.read(0x300020n, 2)!.toString('hex')).toBe('0000');
  });

  it('a CR write refused by the not-CONTINUE path (#GP) leaves RIP at the MOV', async () => {
    const r = await Rig.start({ vm: EIGHT });
    const v = r.vcpu(5);
    await ok(r, req.controlEvents(1, 5, EV.CR, 1));
    await ok(r, req.controlCr(2, 5, 0, 1));
    const cr0 = v.cpu.sregs.cr0;
    const rip = v.cpu.regs.rip;
    const p = v.writeCr(0, cr0 & ~0x10000n);
    await expectEvent(r, { seq: 1, event: EV.CR, vcpu: 5, specific: specific.cr(0, cr0, cr0 & ~0x10000n) });
    r.conn.send(gr('event-cr-reply-crash', 1));
    expect(await p).toMatchObject({ outcome: 'gp', value: cr0 });
    expect(v.cpu.regs.rip).toBe(rip);
  });
});

describe('KVMI_VCPU_EVENT_SINGLESTEP (19)', () => {
  it('one event after each guest action: failed 0, or 1 after an action that exited; CONTINUE and CRASH (golden)', async () => {
    const r = await Rig.start({ vm: EIGHT });
    const v = r.vcpu(5);
    await ok(r, req.singlestep(1, 5, 1));
    let p = v.descriptorAccess(1, false);
    await expectEvent(r, { seq: 1, event: EV.SINGLESTEP, vcpu: 5, specific: specific.singlestep(0) });
    r.conn.send(gr('event-singlestep-reply-continue', 1));
    expect(await p).toMatchObject({ outcome: 'completed', events: [{ event: 'SINGLESTEP', seq: 1, ended: 'CONTINUE' }] });
    await ok(r, req.controlEvents(2, 5, EV.HYPERCALL, 1));
    p = v.vmcall();
    await expectEvent(r, { seq: 2, event: EV.HYPERCALL, vcpu: 5 });
    r.conn.send(eventReply(2, 5, ACTION.CONTINUE, EV.HYPERCALL));
    await expectEvent(r, { seq: 3, event: EV.SINGLESTEP, vcpu: 5, specific: specific.singlestep(1) });
    r.conn.send(gr('event-singlestep-reply-crash', 3));
    expect(await p).toMatchObject({
      outcome: 'completed', value: 0n, crashed: true,
      events: [{ event: 'HYPERCALL', seq: 2, ended: 'CONTINUE' }, { event: 'SINGLESTEP', seq: 3, ended: 'CRASH' }],
    });
  });
});

describe('KVMI_VM_EVENT_UNHOOK (0)', () => {
  it('PREUNHOOK sends it (hand-written frame: seq 4 after three vCPU events, the counter is shared); no reply; the tool closes', async () => {
    const r = await Rig.start();
    for (let s = 1; s <= 3; s++) {
      await ok(r, req.pause(100 + s, 0));
      await expectEvent(r, { seq: s, event: EV.PAUSE, vcpu: 0 });
      r.conn.send(eventReply(s, 0, ACTION.CONTINUE, EV.PAUSE));
    }
    await ok(r, req.vmControlEvents(200, EV.UNHOOK, 1));
    const shutdown = r.qemu.shutdown();
    expect(await r.conn.next()).toBe(handWritten('hw-vm-event-unhook').hex);
    expect(vmEventUnhook(4)).toBe(patchSeq(golden('vm-event-unhook').hex, 4));
    r.conn.end();
    expect(await shutdown).toMatchObject({ preunhook: '0', closedByTool: true });
    expect(r.vm.hooked).toBe(false);
  });

  it('not enabled: PREUNHOOK fails with ENOENT and nothing is sent; QEMU unhooks at once', async () => {
    const r = await Rig.start();
    const shutdown = r.qemu.shutdown();
    expect(await shutdown).toMatchObject({ preunhook: 'ENOENT', closedByTool: false });
    await r.conn.waitClosed();
    expect(r.conn.log).toEqual([]);
  });
});

describe('§5.3 reply details, §5.5 enabling and permissions', () => {
  it('the reply’s `event` byte is not checked; short reply data is zero-filled (4 of 8 new_val bytes)', async () => {
    const r = await Rig.start();
    const v = r.vcpu(0);
    await ok(r, req.controlEvents(1, 0, EV.CR, 1));
    await ok(r, req.controlCr(2, 0, 4, 1));
    const cr4 = v.cpu.sregs.cr4;
    let p = v.writeCr(4, cr4 | 0x10000n);
    await expectEvent(r, { seq: 1, event: EV.CR, vcpu: 0, specific: specific.cr(4, cr4, cr4 | 0x10000n) });
    r.conn.send(eventReply(1, 0, ACTION.CONTINUE, 0x63, { data: le64(cr4 | 0x10000n) }));
    expect(await p).toMatchObject({ outcome: 'completed', value: cr4 | 0x10000n, events: [{ event: 'CR', seq: 1, ended: 'CONTINUE' }] });
    p = v.writeCr(4, cr4);
    await expectEvent(r, { seq: 2, event: EV.CR, vcpu: 0, specific: specific.cr(4, cr4 | 0x10000n, cr4) });
    r.conn.send(eventReply(2, 0, ACTION.CONTINUE, EV.CR, { data: '78563412' }));
    expect((await p).value).toBe(0x12345678n);
    expect(r.conn.isClosed).toBe(false);
    expect(r.vm.stats.hardErrors).toBe(0);
  });

  it('disallowing an event after it was enabled (or requested) does not stop it', async () => {
    const r = await Rig.start({ vm: { vcpus: 2 } });
    await ok(r, req.controlEvents(1, 0, EV.HYPERCALL, 1));
    await ok(r, req.pause(2, 1)); // vCPU 1 not up yet: the request waits
    expect(r.vm.allowEvent(EV.HYPERCALL, 0)).toBe(0); // KVM_INTROSPECTION_EVENT, by the device manager
    expect(r.vm.allowEvent(EV.PAUSE, 0)).toBe(0);
    expect(await r.conn.call(req.checkEvent(3, EV.HYPERCALL))).toBe(reply(ID.VM_CHECK_EVENT, 3, E.PERM));
    const p = r.vcpu(0).vmcall();
    await expectEvent(r, { seq: 1, event: EV.HYPERCALL, vcpu: 0 });
    r.conn.send(eventReply(1, 0, ACTION.CONTINUE, EV.HYPERCALL));
    expect(await p).toMatchObject({ value: 0n });
    r.vm.bringUpVcpu(1);
    await expectEvent(r, { seq: 2, event: EV.PAUSE, vcpu: 1 });
    r.conn.send(eventReply(2, 1, ACTION.CONTINUE, EV.PAUSE));
    expect(await r.conn.call(req.controlEvents(4, 0, EV.HYPERCALL, 0))).toBe(reply(ID.VCPU_CONTROL_EVENTS, 4, E.PERM));
    expect(await r.conn.call(req.pause(5, 1))).toBe(reply(ID.VM_PAUSE_VCPU, 5, E.PERM));
  });

  it('CONTROL_EVENTS on PAUSE, TRAP and SINGLESTEP succeeds and has no effect', async () => {
    const r = await Rig.start();
    const v = r.vcpu(0);
    await ok(r, req.controlEvents(1, 0, EV.SINGLESTEP, 1));
    await ok(r, req.controlEvents(2, 0, EV.PAUSE, 0));
    await ok(r, req.controlEvents(3, 0, EV.TRAP, 0));
    expect(v.singlestepping).toBe(false);
    expect(await v.descriptorAccess(1, false)).toMatchObject({ outcome: 'completed', events: [] });
    await ok(r, req.pause(4, 0));
    await expectEvent(r, { seq: 1, event: EV.PAUSE, vcpu: 0 });
    r.conn.send(eventReply(1, 0, ACTION.CONTINUE, EV.PAUSE));
    await ok(r, req.inject(5, 0, 6, 0, 0n));
    await expectEvent(r, { seq: 2, event: EV.TRAP, vcpu: 0, specific: specific.trap(6, 0, 0n) });
    r.conn.send(eventReply(2, 0, ACTION.CONTINUE, EV.TRAP));
    await r.conn.quiet(20);
  });

  it('SINGLESTEP after an EPT violation (PF event) reports failed = 0', async () => {
    const r = await Rig.start();
    await ok(r, req.setPageAccess(1, [req.pageEntry(0x200000n, 6)]));
    await ok(r, req.controlEvents(2, 0, EV.PF, 1));
    await ok(r, req.singlestep(3, 0, 1));
    const p = r.vcpu(0).access({ gpa: 0x200000n }, 'r');
    await expectEvent(r, { seq: 1, event: EV.PF, vcpu: 0, specific: specific.pf(ALL_ONES, 0x200000n, 1) });
    r.conn.send(eventReply(1, 0, ACTION.CONTINUE, EV.PF));
    await expectEvent(r, { seq: 2, event: EV.SINGLESTEP, vcpu: 0, specific: specific.singlestep(0) });
    r.conn.send(eventReply(2, 0, ACTION.CONTINUE, EV.SINGLESTEP));
    expect(await p).toMatchObject({ outcome: 'completed', events: [{ event: 'PF', seq: 1, ended: 'CONTINUE' }, { event: 'SINGLESTEP', seq: 2, ended: 'CONTINUE' }] });
  });
});
