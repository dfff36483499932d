/**
 * Raw-frame conformance: KVMI_VM_PAUSE_VCPU and KVMI_VCPU_EVENT_PAUSE rules (kvmi-v12.md §4.2, §5.4):
 * one event per successful request; low priority (only with no vCPU command queued, after any other
 * event in progress or pending TRAP); EBUSY once more than MAX_PAUSE_REQUESTS (1001) are pending.
 */
import { afterEach, describe, expect, it } from 'vitest';

import { ACTION, E, EV, ID, eventReply, idOf, le64, patchSeq, reply, req, seqOf, specific } from './support/bytes.js';
import { expectEvent } from './support/events.js';
import { golden } from './support/oracles.js';
import { Rig, closeRigs } from './support/rig.js';

afterEach(closeRigs);

async function ok(r: Rig, q: string): Promise<void> {
  expect(await r.conn.call(q)).toBe(reply(idOf(q), seqOf(q), 0));
}
const TSC = le64(2_500_000_000n);

describe('one PAUSE event per request', () => {
  it('three requests in one write → three replies, then three PAUSE events, each after the previous reply', async () => {
    const r = await Rig.start();
    r.conn.send(req.pause(1, 0, 1), req.pause(2, 0, 0), req.pause(3, 0, 1));
    expect(await r.conn.nextN(3)).toEqual([1, 2, 3].map((s) => reply(ID.VM_PAUSE_VCPU, s, 0)));
    for (let s = 1; s <= 3; s++) {
      await expectEvent(r, { seq: s, event: EV.PAUSE, vcpu: 0 });
      await r.conn.quiet(10); // no second event while this one waits
      r.conn.send(eventReply(s, 0, ACTION.CONTINUE, EV.PAUSE));
    }
    expect(await r.conn.call(req.getInfo(9, 0))).toBe(reply(ID.VCPU_GET_INFO, 9, 0, TSC));
    await r.conn.quiet(20);
    expect(r.vcpu(0).pendingPauseRequests).toBe(0);
  });
});

describe('low priority', () => {
  it('commands queued in the same write are answered before the PAUSE event', async () => {
    const r = await Rig.start();
    r.conn.send(req.pause(1, 0), req.getInfo(2, 0), req.getXcr(3, 0, 0), req.getInfo(4, 0));
    expect(await r.conn.nextN(4)).toEqual([
      reply(ID.VM_PAUSE_VCPU, 1, 0),
      reply(ID.VCPU_GET_INFO, 2, 0, TSC),
      reply(ID.VCPU_GET_XCR, 3, 0, le64(7)),
      reply(ID.VCPU_GET_INFO, 4, 0, TSC),
    ]);
    await expectEvent(r, { seq: 1, event: EV.PAUSE, vcpu: 0 });
    r.conn.send(eventReply(1, 0, ACTION.CONTINUE, EV.PAUSE));
  });

  it('after the event in progress: a request while a CR event waits is delivered only after that reply', async () => {
    const r = await Rig.start();
    await ok(r, req.controlEvents(1, 0, EV.CR, 1));
    await ok(r, req.controlCr(2, 0, 4, 1));
    const cr4 = r.vcpu(0).cpu.sregs.cr4;
    const p = r.vcpu(0).writeCr(4, cr4 | 0x10000n);
    await expectEvent(r, { seq: 1, event: EV.CR, vcpu: 0, specific: specific.cr(4, cr4, cr4 | 0x10000n) });
    await ok(r, req.pause(3, 0));
    expect(await r.conn.call(req.getInfo(4, 0))).toBe(reply(ID.VCPU_GET_INFO, 4, 0, TSC));
    await r.conn.quiet(20);
    r.conn.send(eventReply(1, 0, ACTION.CONTINUE, EV.CR, { data: le64(cr4 | 0x10000n) }));
    expect(await p).toMatchObject({ outcome: 'completed', value: cr4 | 0x10000n });
    await expectEvent(r, { seq: 2, event: EV.PAUSE, vcpu: 0 });
    r.conn.send(eventReply(2, 0, ACTION.CONTINUE, EV.PAUSE));
  });

  it('after a TRAP: a request while the TRAP waits is delivered after the TRAP reply', async () => {
    const r = await Rig.start();
    await ok(r, req.inject(1, 0, 6, 0, 0n));
    await expectEvent(r, { seq: 1, event: EV.TRAP, vcpu: 0, specific: specific.trap(6, 0, 0n) });
    await ok(r, req.pause(2, 0));
    await r.conn.quiet(20);
    r.conn.send(eventReply(1, 0, ACTION.CONTINUE, EV.TRAP));
    await expectEvent(r, { seq: 2, event: EV.PAUSE, vcpu: 0 });
    r.conn.send(eventReply(2, 0, ACTION.CONTINUE, EV.PAUSE));
  });

  it('a pending TRAP is sent before the event of the next guest instruction (§2.6)', async () => {
    const r = await Rig.start();
    await ok(r, req.controlEvents(1, 0, EV.HYPERCALL, 1));
    await ok(r, req.inject(2, 0, 3, 0, 0n));
    const p = r.vcpu(0).vmcall();
    await expectEvent(r, { seq: 1, event: EV.TRAP, vcpu: 0, specific: specific.trap(3, 0, 0n) });
    r.conn.send(eventReply(1, 0, ACTION.CONTINUE, EV.TRAP));
    await expectEvent(r, { seq: 2, event: EV.HYPERCALL, vcpu: 0 });
    r.conn.send(eventReply(2, 0, ACTION.CONTINUE, EV.HYPERCALL));
    expect(await p).toMatchObject({ value: 0n });
  });
});

describe('MAX_PAUSE_REQUESTS', () => {
  it('EBUSY (golden) once the counter is above 1001: 1002 requests pending; one event sent makes room for one more', async () => {
    const r = await Rig.start({ vm: { vcpus: 2 } }); // vCPU 1 not up: requests accumulate, no event yet
    r.conn.send(...Array.from({ length: 1002 }, (_, i) => req.pause(1000 + i, 1)));
    const replies = await r.conn.nextN(1002);
    expect(replies).toEqual(Array.from({ length: 1002 }, (_, i) => reply(ID.VM_PAUSE_VCPU, 1000 + i, 0)));
    expect(r.vcpu(1).pendingPauseRequests).toBe(1002);
    const g = golden('vm-pause-vcpu-error-ebusy');
    expect(await r.conn.call(req.pause(g.seq!, 1))).toBe(g.hex);
    expect(await r.conn.call(req.pause(5, 1, 1))).toBe(patchSeq(g.hex, 5));
    expect(r.vcpu(1).pendingPauseRequests).toBe(1002);
    r.vm.bringUpVcpu(1);
    await expectEvent(r, { seq: 1, event: EV.PAUSE, vcpu: 1 });
    expect(r.vcpu(1).pendingPauseRequests).toBe(1001);
    await ok(r, req.pause(6, 1));
    expect(await r.conn.call(req.pause(7, 1))).toBe(reply(ID.VM_PAUSE_VCPU, 7, E.BUSY));
    for (let s = 1; s <= 3; s++) {
      if (s > 1) await expectEvent(r, { seq: s, event: EV.PAUSE, vcpu: 1 });
      r.conn.send(eventReply(s, 1, ACTION.CONTINUE, EV.PAUSE));
    }
    await expectEvent(r, { seq: 4, event: EV.PAUSE, vcpu: 1 });
    expect(r.vcpu(1).pendingPauseRequests).toBe(1002 - 4 + 1);
  });
});
