/**
 * Raw-frame conformance: reply order (kvmi-v12.md §2.3) and blocking semantics (§2.6).
 *
 * - VM commands are answered on the receive thread, vCPU commands by the vCPU threads: replies for
 *   different vCPUs, and VM replies, overtake each other. The simulator's per-vCPU jitter is seeded; seed
 *   106 with `jitterMs` 20 draws 0, 0 ms for vCPU 0's first two jobs and 19 ms for vCPU 1's first job
 *   (mulberry32, derived per vCPU), so the order below is fixed by construction, not by luck.
 * - A vCPU waiting for an event reply still runs the commands sent to it; SET_REGISTERS is applied only
 *   when the reply is processed, so GET_REGISTERS before the reply sees the old values.
 */
import { afterEach, describe, expect, it } from 'vitest';

import { ACTION, E, EV, ID, eventReply, frame, getRegistersReplyData, idOf, insnLen, le32, le64, reply, req, seqOf, specific, zeros } from './support/bytes.js';
import { expectEvent } from './support/events.js';
import { Rig, archOf, closeRigs, sleep } from './support/rig.js';

afterEach(closeRigs);

async function ok(r: Rig, q: string): Promise<void> {
  expect(await r.conn.call(q)).toBe(reply(idOf(q), seqOf(q), 0));
}
const TSC = le64(2_500_000_000n);

describe('§2.3 out-of-order replies (fixed seed)', () => {
  it('a VM reply overtakes the reply to a vCPU command sent before it', async () => {
    const r = await Rig.start({ vm: { seed: 106, jitterMs: 20 } });
    r.conn.send(req.getInfo(1, 0), frame(ID.VM_GET_INFO, 2));
    expect(await r.conn.nextN(2)).toEqual([reply(ID.VM_GET_INFO, 2, 0, le32(1) + zeros(12)), reply(ID.VCPU_GET_INFO, 1, 0, TSC)]);
  });

  it('vCPU 0 replies overtake an earlier vCPU 1 reply; the VM reply comes first; one vCPU keeps its own order', async () => {
    const r = await Rig.start({ vm: { vcpus: 2, apsOnline: true, seed: 106, jitterMs: 20 } });
    r.conn.send(req.getInfo(1, 1), req.getInfo(2, 0), req.getXcr(3, 0, 0), frame(ID.VM_GET_INFO, 4));
    expect(await r.conn.nextN(4)).toEqual([
      reply(ID.VM_GET_INFO, 4, 0, le32(2) + zeros(12)),
      reply(ID.VCPU_GET_INFO, 2, 0, TSC),
      reply(ID.VCPU_GET_XCR, 3, 0, le64(7)),
      reply(ID.VCPU_GET_INFO, 1, 0, TSC),
    ]);
  });

  it('many commands to one vCPU are answered in the order sent', async () => {
    const r = await Rig.start({ vm: { seed: 7, jitterMs: 3 } });
    const n = 20;
    r.conn.send(...Array.from({ length: n }, (_, i) => (i % 2 ? req.getInfo(100 + i, 0) : req.getXcr(100 + i, 0, 0))));
    expect(await r.conn.nextN(n)).toEqual(
      Array.from({ length: n }, (_, i) => (i % 2 ? reply(ID.VCPU_GET_INFO, 100 + i, 0, TSC) : reply(ID.VCPU_GET_XCR, 100 + i, 0, le64(7)))),
    );
  });
});

describe('§2.6 blocking semantics', () => {
  /** vCPU 0 waits for the reply to a CR3 write event (seq 1). */
  async function waitingOnCr3(r: Rig, proposed: bigint): Promise<{ p: Promise<unknown>; settled: () => boolean }> {
    await ok(r, req.controlEvents(1, 0, EV.CR, 1));
    await ok(r, req.controlCr(2, 0, 3, 1));
    const cr3 = r.vcpu(0).cpu.sregs.cr3;
    let done = false;
    const p = r.vcpu(0).writeCr(3, proposed).then((x) => {
      done = true;
      return x;
    });
    await expectEvent(r, { seq: 1, event: EV.CR, vcpu: 0, specific: specific.cr(3, cr3, proposed) });
    return { p, settled: () => done };
  }

  it('vCPU commands run while the vCPU waits; GET_REGISTERS after SET_REGISTERS still sees the old values; the last SET wins', async () => {
    const r = await Rig.start({ vm: { vcpus: 2, apsOnline: true } });
    const v = r.vcpu(0);
    const w = await waitingOnCr3(r, 0x9000n);
    const old = archOf(v);
    expect(await r.conn.call(req.getRegs(10, 0, [0xc0000082]))).toBe(
      reply(ID.VCPU_GET_REGISTERS, 10, 0, getRegistersReplyData(8, old.regs, old.sregs, [{ index: 0xc0000082, data: v.cpu.readMsr(0xc0000082)! }])),
    );
    await ok(r, req.setRegs(11, 0, { ...old.regs, rax: 0x1111n, rip: old.regs.rip + 3n }));
    expect(await r.conn.call(req.getRegs(12, 0, []))).toBe(reply(ID.VCPU_GET_REGISTERS, 12, 0, getRegistersReplyData(8, old.regs, old.sregs, [])));
    await ok(r, req.setRegs(13, 0, { ...old.regs, rax: 0x2222n, rip: old.regs.rip + 3n }));
    expect(await r.conn.call(req.getXcr(14, 0, 0))).toBe(reply(ID.VCPU_GET_XCR, 14, 0, le64(7)));
    expect(await r.conn.call(req.translate(15, 0, 0x5000n))).toBe(reply(ID.VCPU_TRANSLATE_GVA, 15, 0, le64(0x5000n)));
    expect(await r.conn.call(req.getInfo(16, 1))).toBe(reply(ID.VCPU_GET_INFO, 16, 0, TSC)); // another vCPU
    expect(await r.conn.call(req.readPhys(17, 0x70000n, 8))).toBe(reply(ID.VM_READ_PHYSICAL, 17, 0, le64(0x71003n))); // VM command: PML4[0]
    await sleep(10);
    expect(w.settled()).toBe(false);
    expect(v.cpu.regs.rax).toBe(old.regs.rax);
    r.conn.send(eventReply(1, 0, ACTION.CONTINUE, EV.CR, { data: le64(0x9000n) }));
    await w.p;
    const now = archOf(v);
    // KVM emulates the CR write after applying SET_REGISTERS, then skips the instruction: the register
    // RIP the tool set, plus the MOV's length.
    expect(now.regs).toEqual({ ...old.regs, rax: 0x2222n, rip: old.regs.rip + 3n + insnLen('mov cr3, rax') });
    expect(now.sregs.cr3).toBe(0x9000n);
    expect(await r.conn.call(req.getRegs(18, 0, []))).toBe(reply(ID.VCPU_GET_REGISTERS, 18, 0, getRegistersReplyData(8, now.regs, now.sregs, [])));
  });

  it('jobs are FIFO with the event reply: [SET_REGISTERS, reply, GET_REGISTERS, SET_REGISTERS] in one write', async () => {
    const r = await Rig.start();
    const v = r.vcpu(0);
    const w = await waitingOnCr3(r, 0x9000n);
    const old = archOf(v);
    const regs = { ...old.regs, rbx: 0xb0bn };
    r.conn.send(req.setRegs(20, 0, regs), eventReply(1, 0, ACTION.CONTINUE, EV.CR, { data: le64(0x9000n) }), req.getRegs(21, 0, []), req.setRegs(22, 0, old.regs));
    const [a, b, c] = await r.conn.nextN(3);
    await w.p;
    expect(a).toBe(reply(ID.VCPU_SET_REGISTERS, 20, 0));
    // The CR write retired before the next job: RIP moved past `mov cr3, rax`.
    expect(b).toBe(reply(ID.VCPU_GET_REGISTERS, 21, 0, getRegistersReplyData(8, { ...regs, rip: regs.rip + insnLen('mov cr3, rax') }, { ...old.sregs, cr3: 0x9000n }, [])));
    expect(c).toBe(reply(ID.VCPU_SET_REGISTERS, 22, E.OPNOTSUPP)); // no longer waiting
    expect(v.cpu.regs.rbx).toBe(0xb0bn);
  });
});
