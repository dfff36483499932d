/**
 * Raw-frame conformance: connection loss and UNHOOK (kvmi-v12.md §8, §7.1).
 *
 * - Connection loss (the tool closes, or a hard error): waiting vCPUs are released as CONTINUE, pause
 *   requests cleared, single-step stopped; restrictions, enabled events and interceptions stay until
 *   UNHOOK (QEMU's unhook is delayed here so that the window can be observed); an event raised in that
 *   window cannot be sent and proceeds as CONTINUE.
 * - UNHOOK: page restrictions removed, per-vCPU state freed, KVM's interceptions restored when
 *   restore_on_unhook (VM_CONTROL_CLEANUP), guest memory untouched; a new hook starts afresh (seq 1).
 */
import { afterEach, describe, expect, it } from 'vitest';

import { ACTION, E, EV, ID, RAX_ENOSYS, eventReply, idOf, le64, reply, req, seqOf, specific, vmEventUnhook } from './support/bytes.js';
import { expectEvent } from './support/events.js';
import { Rig, closeRigs, until } from './support/rig.js';

afterEach(closeRigs);

async function ok(r: Rig, q: string): Promise<void> {
  expect(await r.conn.call(q)).toBe(reply(idOf(q), seqOf(q), 0));
}
const LSTAR = 0xc0000082;
const PAGES = [0x70, 0x71, 0x72, 0x200, 0x300, 0x301];
const snapshot = (r: Rig): string[] => PAGES.map((g) => r.vm.memory.snapshotPage(g)!.toString('hex'));

/** Restrictions, events and interceptions on vCPU 0 and 1 set through raw commands; the tool also writes RAM. */
async function instrument(r: Rig): Promise<void> {
  await ok(r, req.writePhys(1, 0x300ff0n, 4, 'cafebabe'));
  await ok(r, req.setPageAccess(2, [req.pageEntry(0x200000n, 5), req.pageEntry(0x301000n, 0)]));
  await ok(r, req.controlEvents(3, 0, EV.PF, 1));
  await ok(r, req.controlEvents(4, 0, EV.HYPERCALL, 1));
  await ok(r, req.controlEvents(5, 0, EV.BREAKPOINT, 1));
  await ok(r, req.controlEvents(6, 0, EV.DESCRIPTOR, 1));
  await ok(r, req.controlEvents(7, 0, EV.CR, 1));
  await ok(r, req.controlCr(8, 0, 3, 1));
  await ok(r, req.controlEvents(9, 0, EV.MSR, 1));
  await ok(r, req.controlMsr(10, 0, LSTAR, 1));
}

describe('§8 connection loss', () => {
  it('the tool closes while vCPU 0 waits: released as CONTINUE (guest value, SET_REGISTERS dropped); pause requests cleared; single-step stopped', async () => {
    const r = await Rig.start({ vm: { vcpus: 3, apsOnline: true }, qemu: { unhookDelayMs: 400 } });
    await instrument(r);
    await ok(r, req.singlestep(11, 2, 1));
    await ok(r, req.pause(12, 1));
    await expectEvent(r, { seq: 1, event: EV.PAUSE, vcpu: 1 });
    await ok(r, req.pause(13, 1));
    await ok(r, req.pause(14, 1));
    const v = r.vcpu(0);
    const cr3 = v.cpu.sregs.cr3;
    const rbx = v.cpu.regs.rbx;
    const p = v.writeCr(3, 0x9000n);
    await expectEvent(r, { seq: 2, event: EV.CR, vcpu: 0, specific: specific.cr(3, cr3, 0x9000n) });
    await ok(r, req.setRegs(15, 0, { ...v.cpu.regs, rbx: 0x5555n }));
    expect(r.vcpu(1).pendingPauseRequests).toBe(2);
    r.conn.end();
    expect(await p).toMatchObject({ outcome: 'completed', value: 0x9000n, crashed: false, events: [{ event: 'CR', seq: 2, ended: 'released' }] });
    expect(v.cpu.regs.rbx).toBe(rbx);
    await until(() => r.vcpu(1).waitingFor === null, 'the release of vCPU 1');
    expect(r.vcpu(1).pendingPauseRequests).toBe(0);
    expect(r.vcpu(2).singlestepping).toBe(false);
    expect(r.vm.stats.hardErrors).toBe(0);
  });

  it('until UNHOOK: restrictions, enabled events and interceptions stay; events cannot be sent and act as CONTINUE; then UNHOOK cleans up without touching RAM', async () => {
    const r = await Rig.start({ qemu: { unhookDelayMs: 400 } });
    await instrument(r);
    const v = r.vcpu(0);
    const before = snapshot(r);
    r.conn.end();
    await r.conn.closed;
    await until(() => !r.vm.connected, 'the connection loss');
    expect(r.vm.hooked).toBe(true);
    expect([...r.vm.restrictions].sort((a, b) => a[0] - b[0])).toEqual([[0x200, 5], [0x301, 0]]);
    expect(v.enabledEvents).toEqual([EV.HYPERCALL, EV.BREAKPOINT, EV.CR, EV.DESCRIPTOR, EV.MSR, EV.PF]);
    expect(v.interceptions).toMatchObject({ breakpoint: true, cr3: true, descriptor: true });
    expect(v.interceptions.msrs.has(LSTAR)).toBe(true);
    // a restricted write: PF enabled, the send fails → emulated as for CONTINUE
    expect(await v.access({ gpa: 0x200008n }, 'w', { data: Buffer.from('11', 'hex') })).toMatchObject({
      outcome: 'completed', events: [{ event: 'PF', seq: 0, ended: 'send-failed' }],
    });
    // a failed send counts as CONTINUE: the hypercall returns 0 (§5.4)
    expect(await v.vmcall()).toMatchObject({ value: 0n, events: [{ event: 'HYPERCALL', seq: 0, ended: 'send-failed' }] });
    expect(await v.writeCr(3, 0x9000n)).toMatchObject({ outcome: 'completed', value: 0x9000n, events: [{ event: 'CR', ended: 'send-failed' }] });
    expect(r.conn.log).toHaveLength(10); // the 10 command replies of instrument(): nothing after the close
    const mid = snapshot(r);
    await until(() => !r.vm.hooked, 'QEMU’s UNHOOK');
    expect(r.vm.restrictions.size).toBe(0);
    expect(v.enabledEvents).toEqual([]);
    expect(v.interceptions).toMatchObject({ breakpoint: false, cr3: false, descriptor: false });
    expect(v.interceptions.msrs.size).toBe(0);
    expect(snapshot(r)).toEqual(mid);
    expect(mid[PAGES.indexOf(0x300)]).toBe(before[PAGES.indexOf(0x300)]);
    expect(r.vm.memory.read(0x300ff0n, 4)!.toString('hex')).toBe('cafebabe'); // the tool's write stays
    // after UNHOOK, the same guest actions raise nothing: hypercall → −1000, no restriction
    expect(await v.vmcall()).toMatchObject({ value: RAX_ENOSYS, events: [] });
    expect(await v.access({ gpa: 0x301000n }, 'r')).toMatchObject({ outcome: 'completed', events: [] });
  });

  it('the tool half-closes right after a VM command: the reply (sent before the EOF is read) still arrives, then KVM closes', async () => {
    const r = await Rig.start();
    r.conn.send(req.checkEvent(7, EV.PF));
    r.conn.end();
    await r.conn.waitClosed();
    expect(r.conn.log).toEqual([reply(ID.VM_CHECK_EVENT, 7, 0)]);
    expect(r.vm.stats.hardErrors).toBe(0);
  });

  it('a hard error is a connection loss too: the state stays until UNHOOK', async () => {
    const r = await Rig.start({ qemu: { unhookDelayMs: 300 } });
    await instrument(r);
    r.conn.send(eventReply(1, 0, ACTION.CONTINUE, EV.PAUSE)); // not waiting: hard error
    await r.conn.waitClosed();
    expect(r.vm.stats.hardErrors).toBe(1);
    expect(r.vm.hooked).toBe(true);
    expect(r.vm.restrictions.size).toBe(2);
    expect(r.vcpu(0).interceptions.breakpoint).toBe(true);
    await until(() => !r.vm.hooked, 'QEMU’s UNHOOK');
    expect(r.vm.restrictions.size).toBe(0);
    expect(r.vcpu(0).interceptions.breakpoint).toBe(false);
  });
});

describe('§8 UNHOOK', () => {
  it('UNHOOK with a vCPU waiting: released as CONTINUE; restrictions removed; interceptions restored; RAM untouched', async () => {
    const r = await Rig.start();
    await instrument(r);
    const v = r.vcpu(0);
    const p = v.int3();
    await expectEvent(r, { seq: 1, event: EV.BREAKPOINT, vcpu: 0, specific: specific.breakpoint(0x100000n, 1) });
    const before = snapshot(r);
    r.qemu.stop(); // KVM_INTROSPECTION_UNHOOK without PREUNHOOK (VM destroyed / QEMU killed)
    expect(await p).toMatchObject({ outcome: 'exception', vector: 3, events: [{ event: 'BREAKPOINT', seq: 1, ended: 'released' }] });
    await r.conn.waitClosed();
    expect(r.vm.hooked).toBe(false);
    expect(r.vm.restrictions.size).toBe(0);
    expect(v.interceptions).toMatchObject({ breakpoint: false, cr3: false, descriptor: false });
    expect(v.interceptions.msrs.size).toBe(0);
    expect(v.hasIntrospectionState).toBe(false);
    expect(snapshot(r)).toEqual(before);
  });

  it('VM_CONTROL_CLEANUP 0: interceptions survive UNHOOK (restrictions do not); the next hook sees #BP taken (EBUSY)', async () => {
    const r = await Rig.start({ qemu: { reconnectSeconds: 0.02 } });
    await instrument(r);
    await ok(r, req.controlCleanup(11, 0));
    r.conn.end();
    await until(() => !r.vm.hooked, 'UNHOOK');
    const v = r.vcpu(0);
    expect(v.interceptions).toMatchObject({ breakpoint: true, cr3: true, descriptor: true });
    expect(v.interceptions.msrs.has(LSTAR)).toBe(true);
    expect(r.vm.restrictions.size).toBe(0);
    const c = await r.reconnected();
    expect(await c.call(req.controlEvents(1, 0, EV.BREAKPOINT, 1))).toBe(reply(ID.VCPU_CONTROL_EVENTS, 1, E.BUSY));
  });

  it('a new hook after UNHOOK starts afresh: seq 1 again, no event enabled, restore_on_unhook back to 1', async () => {
    const r = await Rig.start({ qemu: { reconnectSeconds: 0.02 } });
    await ok(r, req.controlEvents(1, 0, EV.HYPERCALL, 1));
    await ok(r, req.controlCleanup(2, 0));
    const p1 = r.vcpu(0).vmcall();
    await expectEvent(r, { seq: 1, event: EV.HYPERCALL, vcpu: 0 });
    r.conn.send(eventReply(1, 0, ACTION.CONTINUE, EV.HYPERCALL));
    expect(await p1).toMatchObject({ value: 0n });
    await ok(r, req.pause(3, 0));
    await expectEvent(r, { seq: 2, event: EV.PAUSE, vcpu: 0 });
    r.conn.end();
    const c = await r.reconnected();
    expect(r.vm.currentHook!.restoreOnUnhook).toBe(true);
    expect(await r.vcpu(0).vmcall()).toMatchObject({ value: 0xfffffffffffffc18n, events: [] });
    expect(await c.call(req.pause(4, 0))).toBe(reply(ID.VM_PAUSE_VCPU, 4, 0));
    await expectEvent(r, { seq: 1, event: EV.PAUSE, vcpu: 0 });
    c.send(eventReply(1, 0, ACTION.CONTINUE, EV.PAUSE));
    expect(await c.call(req.getInfo(5, 0))).toBe(reply(ID.VCPU_GET_INFO, 5, 0, le64(2_500_000_000n)));
  });

  it('PREUNHOOK while a vCPU waits: the UNHOOK event is sent; the tool closes without replying; the vCPU is released', async () => {
    const r = await Rig.start();
    await ok(r, req.vmControlEvents(1, EV.UNHOOK, 1));
    await ok(r, req.pause(2, 0));
    await expectEvent(r, { seq: 1, event: EV.PAUSE, vcpu: 0 });
    const sd = r.qemu.shutdown();
    expect(await r.conn.next()).toBe(vmEventUnhook(2)); // the counter is shared: PAUSE was seq 1
    r.conn.end();
    expect(await sd).toMatchObject({ preunhook: '0', closedByTool: true });
    expect(r.vcpu(0).waitingFor).toBeNull();
    expect(await r.vcpu(0).descriptorAccess(1, false)).toMatchObject({ outcome: 'completed', events: [] });
  });
});
