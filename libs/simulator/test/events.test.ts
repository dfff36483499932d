/**
 * vCPU events through the guest-action API: blocking semantics (commands run while a vCPU waits),
 * reply data applied, SET_REGISTERS applied only on a valid reply, events only when values change,
 * the not-CONTINUE path of each event (§3.3), reply hard errors (§5.3), padding noise (§2.2), seq.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { events, type EventKey } from '@periscope/kvmi';

import { KERNEL_BASE, MSR } from '../src/index.js';
import { rawFrame, startVm, vcpuHdr, until, type ToolConn, type VmHarness } from './support/tool.js';

const harnesses: VmHarness[] = [];
afterEach(async () => {
  for (const h of harnesses.splice(0)) await h.cleanup();
});
async function vm(...args: Parameters<typeof startVm>): Promise<VmHarness> {
  const h = await startVm(...args);
  harnesses.push(h);
  return h;
}
const enable = (t: ToolConn, key: EventKey, vcpu = 0): Promise<unknown> =>
  t.ok('VCPU_CONTROL_EVENTS', { vcpu, event_id: events[key].id, enable: 1 });

/** An event reply laid out from §5.3: kvmi_vcpu_hdr, {u8 action, u8 event, u16 pad1, u32 pad2}, data. */
function rawReply(seq: number, vcpu: number, action: number, eventId: number, opts: { pad?: number; data?: Buffer; cut?: number } = {}): Buffer {
  const r = Buffer.alloc(8);
  r[0] = action;
  r[1] = eventId;
  r.writeUInt32LE(opts.pad ?? 0, 4);
  let p = Buffer.concat([vcpuHdr(vcpu), r, opts.data ?? Buffer.alloc(0)]);
  if (opts.cut !== undefined) p = p.subarray(0, opts.cut);
  return rawFrame(1, seq, p);
}

describe('blocking semantics (§2.6)', () => {
  it('a CR event blocks the vCPU; commands run meanwhile; SET_REGISTERS and new_val applied on the reply', async () => {
    const { tool: t, vm: v } = await vm();
    const cpu = v.vcpus[0]!.cpu;
    await enable(t, 'CR');
    await t.ok('VCPU_CONTROL_CR', { vcpu: 0, cr: 4, enable: 1 });
    const old = cpu.sregs.cr4;
    const pending = v.vcpus[0]!.writeCr(4, old ^ (1n << 7n)); // toggle PGE
    const e = await t.nextVcpuEvent();
    expect(e.event.key).toBe('CR');
    expect(e.seq).toBe(1);
    expect(e.vcpu).toBe(0);
    expect(e.data).toEqual({ cr: 4, old_value: old, new_value: old ^ (1n << 7n) });
    expect(e.arch.sregs.cr4).toBe(old);
    expect(v.vcpus[0]!.waitingFor).toMatchObject({ event: 'CR', seq: 1 });
    // Commands sent to the waiting vCPU are executed.
    const before = await t.ok('VCPU_GET_REGISTERS', { vcpu: 0, msrs_idx: [] });
    expect(before.sregs.cr4).toBe(old);
    await t.ok('VCPU_SET_REGISTERS', { vcpu: 0, ...before.regs, rbx: 1n });
    await t.ok('VCPU_SET_REGISTERS', { vcpu: 0, ...before.regs, rbx: 2n }); // the last one wins
    expect((await t.ok('VCPU_GET_REGISTERS', { vcpu: 0, msrs_idx: [] })).regs.rbx).toBe(before.regs.rbx);
    let settled = false;
    void pending.then(() => (settled = true));
    await new Promise((r) => setTimeout(r, 20));
    expect(settled).toBe(false);
    t.reply(e, 'CONTINUE', old); // block the write
    const r = await pending;
    expect(r).toMatchObject({ outcome: 'completed', value: old, crashed: false });
    expect(r.events).toEqual([{ event: 'CR', seq: 1, ended: 'CONTINUE' }]);
    expect(cpu.regs.rbx).toBe(2n);
    expect(cpu.sregs.cr4).toBe(old);
  });

  it('a CR/MSR reply without new_val writes 0 (§5.3)', async () => {
    const { tool: t, vm: v } = await vm();
    await enable(t, 'CR');
    await t.ok('VCPU_CONTROL_CR', { vcpu: 0, cr: 0, enable: 1 });
    const p = v.vcpus[0]!.writeCr(0, 0x80000011n);
    const e = await t.nextVcpuEvent();
    t.send(rawReply(e.seq, 0, 0, events.CR.id)); // 16 bytes: no cr_reply
    expect((await p).value).toBe(0n);
    expect(v.vcpus[0]!.cpu.sregs.cr0).toBe(0n);
    expect(v.connected).toBe(true);
  });

  it('CR and MSR events only when the value changes and the CR/MSR is enabled; never for host-initiated writes', async () => {
    const { tool: t, vm: v } = await vm();
    const c = v.vcpus[0]!;
    await enable(t, 'CR');
    await enable(t, 'MSR');
    await t.ok('VCPU_CONTROL_CR', { vcpu: 0, cr: 3, enable: 1 });
    await t.ok('VCPU_CONTROL_MSR', { vcpu: 0, enable: 1, msr: MSR.LSTAR });
    expect(v.vcpus[0]!.interceptions.cr3).toBe(true);
    expect((await c.writeCr(3, c.cpu.sregs.cr3)).events).toEqual([]); // same value
    expect((await c.writeCr(4, 0x6f0n)).events).toEqual([]); // CR4 not enabled
    expect((await c.wrmsr(MSR.LSTAR, c.cpu.readMsr(MSR.LSTAR)!)).events).toEqual([]);
    expect((await c.wrmsr(MSR.CSTAR, 0x1234n)).events).toEqual([]); // not enabled with CONTROL_MSR
    expect(c.setMsrFromHost(MSR.LSTAR, 0xffffffff81000000n)).toBe(true);
    expect(t.events.length).toBe(0);
    expect(await c.wrmsr(0x12345, 1n)).toMatchObject({ outcome: 'gp', vector: 13, events: [] }); // unknown MSR
    const p = c.wrmsr(MSR.LSTAR, 0xdeadbeefn);
    const e = await t.nextVcpuEvent();
    expect(e.event.key).toBe('MSR');
    expect(e.data).toEqual({ msr: MSR.LSTAR, old_value: 0xffffffff81000000n, new_value: 0xdeadbeefn });
    t.reply(e, 'CONTINUE', 0xcafen);
    expect(await p).toMatchObject({ outcome: 'completed', value: 0xcafen });
    expect(c.cpu.readMsr(MSR.LSTAR)).toBe(0xcafen);
  });

  it('XSETBV is informational: XCR0 is already written when the event is sent', async () => {
    const { tool: t, vm: v } = await vm();
    const c = v.vcpus[0]!;
    await enable(t, 'XSETBV');
    expect((await c.xsetbv(7n)).events).toEqual([]);
    expect(await c.xsetbv(5n)).toMatchObject({ outcome: 'gp', events: [] }); // AVX without SSE
    const p = c.xsetbv(3n);
    const e = await t.nextVcpuEvent();
    expect(e.data).toEqual({ xcr: 0, old_value: 7n, new_value: 3n });
    expect(await t.ok('VCPU_GET_XCR', { vcpu: 0, xcr: 0 })).toEqual({ value: 3n });
    t.reply(e, 'CRASH');
    expect(await p).toMatchObject({ outcome: 'completed', value: 3n, crashed: true });
  });

  it('the first event of a hook has seq 1 and VM and vCPU events share the counter', async () => {
    const { tool: t, vm: v } = await vm();
    await t.ok('VM_CONTROL_EVENTS', { event_id: 0, enable: 1 });
    await enable(t, 'HYPERCALL');
    const p = v.vcpus[0]!.vmcall();
    const e1 = await t.nextVcpuEvent();
    t.reply(e1);
    await p;
    expect(v.preunhook()).toBe(0);
    const e2 = await t.nextEvent();
    expect(e2).toMatchObject({ kind: 'vm-event', seq: 2 });
    expect(e2.event.key).toBe('UNHOOK');
    expect(e1.seq).toBe(1);
  });
});

describe('events and their not-CONTINUE paths (§3.3)', () => {
  it('HYPERCALL: RAX 0 after CONTINUE, −KVM_ENOSYS when not enabled, sub-arguments wrong, or CRASH', async () => {
    const { tool: t, vm: v } = await vm();
    const c = v.vcpus[0]!;
    const ENOSYS = 0xfffffffffffffc18n;
    expect(await c.vmcall()).toMatchObject({ value: ENOSYS, events: [] });
    await enable(t, 'HYPERCALL');
    expect(await c.vmcall({ rdi: 25n })).toMatchObject({ value: ENOSYS, events: [] });
    expect(await c.vmcall({ rax: 12n })).toMatchObject({ value: ENOSYS, events: [] });
    let p = c.vmcall({ rax: 0xffffffff00000022n }); // only the low 32 bits of RAX are compared
    let e = await t.nextVcpuEvent();
    expect(e.event.key).toBe('HYPERCALL');
    expect(e.arch.regs.rdi).toBe(24n);
    await t.ok('VCPU_SET_REGISTERS', { vcpu: 0, ...e.arch.regs, rax: 77n, r12: 5n });
    t.reply(e);
    expect(await p).toMatchObject({ outcome: 'completed', value: 0n });
    expect(c.cpu.regs.r12).toBe(5n);
    p = c.vmcall();
    e = await t.nextVcpuEvent();
    t.reply(e, 'CRASH');
    expect(await p).toMatchObject({ value: ENOSYS, crashed: true });
    expect(v.connected).toBe(true); // CRASH leaves the socket open
  });

  it('BREAKPOINT: CONTINUE re-injects #BP, RETRY does not, CRASH acts as RETRY', async () => {
    const { tool: t, vm: v } = await vm();
    const c = v.vcpus[0]!;
    await enable(t, 'BREAKPOINT');
    let p = c.int3();
    let e = await t.nextVcpuEvent();
    expect(e.data).toEqual({ gpa: c.cpu.regs.rip - KERNEL_BASE, insn_len: 1 });
    t.reply(e, 'CONTINUE');
    expect(await p).toMatchObject({ outcome: 'exception', vector: 3 });
    expect(c.deliveredExceptions).toEqual([{ vector: 3, errorCode: undefined }]);
    p = c.int3();
    t.reply(await t.nextVcpuEvent(), 'RETRY');
    expect(await p).toMatchObject({ outcome: 'retry' });
    p = c.int3();
    e = await t.nextVcpuEvent();
    t.reply(e, 'CRASH');
    expect(await p).toMatchObject({ outcome: 'retry', crashed: true });
    expect(c.deliveredExceptions).toHaveLength(1);
    // A crashed vCPU runs no more guest code and sends no more events.
    expect(await c.int3()).toMatchObject({ outcome: 'vcpu-crashed', events: [] });
    expect(await t.errno('VM_PAUSE_VCPU', { vcpu: 0, wait: 1 })).toBe(0);
    await new Promise((r) => setTimeout(r, 30));
    expect(t.events.length).toBe(0);
    // ... but still answers commands.
    expect(await t.errno('VCPU_GET_INFO', { vcpu: 0 })).toBe(0);
  });

  it('DESCRIPTOR: CONTINUE emulates, RETRY re-executes', async () => {
    const { tool: t, vm: v } = await vm();
    const c = v.vcpus[0]!;
    expect(await c.descriptorAccess(1, true)).toMatchObject({ outcome: 'completed', events: [] });
    await enable(t, 'DESCRIPTOR');
    expect(v.vcpus[0]!.interceptions.descriptor).toBe(true);
    let p = c.descriptorAccess(2, true);
    let e = await t.nextVcpuEvent();
    expect(e.data).toEqual({ descriptor: 2, write: 1 });
    t.reply(e, 'RETRY');
    expect(await p).toMatchObject({ outcome: 'retry' });
    p = c.descriptorAccess(4, false);
    e = await t.nextVcpuEvent();
    expect(e.data).toEqual({ descriptor: 4, write: 0 });
    t.reply(e);
    expect(await p).toMatchObject({ outcome: 'completed' });
  });

  it('PF: only for a cleared bit and only when enabled; CONTINUE emulates, RETRY does not', async () => {
    const { tool: t, vm: v } = await vm();
    const c = v.vcpus[0]!;
    const gva = KERNEL_BASE + 0x432100n;
    await t.ok('VM_SET_PAGE_ACCESS', { entries: [{ gpa: 0x432000n, access: 1 }] }); // read only
    // PF not enabled on the vCPU: the access proceeds.
    expect(await c.access({ gva }, 'w', { data: Uint8Array.of(1) })).toMatchObject({ outcome: 'completed', events: [] });
    await enable(t, 'PF');
    expect(await c.access({ gva }, 'r', { length: 1 })).toMatchObject({ outcome: 'completed', data: Uint8Array.of(1), events: [] });
    let p = c.access({ gva }, 'w', { data: Uint8Array.of(2) });
    let e = await t.nextVcpuEvent();
    expect(e.data).toEqual({ gva, gpa: 0x432100n, access: 2 });
    t.reply(e, 'RETRY');
    expect(await p).toMatchObject({ outcome: 'retry' });
    expect(v.memory.read(0x432100n, 1)![0]).toBe(1);
    p = c.access({ gpa: 0x432100n }, 'x');
    e = await t.nextVcpuEvent();
    expect(e.data).toEqual({ gva: 0xffffffffffffffffn, gpa: 0x432100n, access: 4 });
    t.reply(e, 'CRASH');
    expect(await p).toMatchObject({ outcome: 'retry', crashed: true });
  });

  it('PF CONTINUE emulates the access despite the restriction; unmapped gva is a guest #PF; a hole is MMIO', async () => {
    const { tool: t, vm: v } = await vm();
    const c = v.vcpus[0]!;
    await t.ok('VM_SET_PAGE_ACCESS', { entries: [{ gpa: 0x10000n, access: 0 }] });
    await enable(t, 'PF');
    const p = c.access({ gpa: 0x10008n }, 'w', { data: Uint8Array.of(9, 9) });
    t.reply(await t.nextVcpuEvent());
    expect(await p).toMatchObject({ outcome: 'completed' });
    expect([...v.memory.read(0x10008n, 2)!]).toEqual([9, 9]);
    expect(await c.access({ gva: 0x7fff00000000n }, 'r')).toMatchObject({ outcome: 'page-fault', vector: 14 });
    expect(c.cpu.sregs.cr2).toBe(0x7fff00000000n);
    expect(await c.access({ gpa: 0xa0000n }, 'r')).toMatchObject({ outcome: 'mmio' });
  });

  it('an unsupported action shuts the socket and takes the not-CONTINUE path (CR write refused)', async () => {
    const { tool: t, vm: v } = await vm();
    const c = v.vcpus[0]!;
    await enable(t, 'CR');
    await t.ok('VCPU_CONTROL_CR', { vcpu: 0, cr: 4, enable: 1 });
    const old = c.cpu.sregs.cr4;
    const p = c.writeCr(4, old ^ 0x80n);
    const e = await t.nextVcpuEvent();
    await t.ok('VCPU_SET_REGISTERS', { vcpu: 0, ...e.arch.regs, rcx: 0x55n });
    const nv = Buffer.alloc(8);
    nv.writeBigUInt64LE(old ^ 0x80n);
    t.send(rawReply(e.seq, 0, 1 /* RETRY */, events.CR.id, { data: nv }));
    expect(await p).toMatchObject({ outcome: 'gp', vector: 13, value: old, events: [{ event: 'CR', ended: 'unsupported-action' }] });
    expect(c.cpu.sregs.cr4).toBe(old);
    expect(c.cpu.regs.rcx).toBe(0x55n); // a valid reply: registers applied
    await t.closed;
    expect(v.stats.hardErrors).toBe(1);
  });

  it('an unknown action on a PAUSE event shuts the socket; nothing else happens', async () => {
    const { tool: t, vm: v } = await vm();
    await t.ok('VM_PAUSE_VCPU', { vcpu: 0, wait: 0 });
    const e = await t.nextVcpuEvent();
    t.send(rawReply(e.seq, 0, 9, events.PAUSE.id));
    await t.closed;
    expect(v.vcpus[0]!.isCrashed).toBe(false);
  });
});

describe('SINGLESTEP', () => {
  it('one event after each guest instruction; failed = 1 when the instruction exited for another reason', async () => {
    const { tool: t, vm: v } = await vm();
    const c = v.vcpus[0]!;
    await t.ok('VCPU_CONTROL_SINGLESTEP', { vcpu: 0, enable: 1 });
    let p = c.access({ gpa: 0x1000n }, 'r');
    let e = await t.nextVcpuEvent();
    expect(e.event.key).toBe('SINGLESTEP');
    expect(e.data).toEqual({ failed: 0 });
    t.reply(e);
    expect((await p).events).toEqual([{ event: 'SINGLESTEP', seq: e.seq, ended: 'CONTINUE' }]);
    await enable(t, 'HYPERCALL');
    p = c.vmcall();
    const hc = await t.nextVcpuEvent();
    t.reply(hc);
    e = await t.nextVcpuEvent();
    expect(e.event.key).toBe('SINGLESTEP');
    expect(e.data).toEqual({ failed: 1 });
    t.reply(e, 'CRASH');
    expect(await p).toMatchObject({ value: 0n, crashed: true });
    expect(c.isCrashed).toBe(true);
  });

  it('stops with the connection (release job)', async () => {
    const { tool: t, vm: v } = await vm({}, { unhookDelayMs: 200, reconnectSeconds: 10 });
    await t.ok('VCPU_CONTROL_SINGLESTEP', { vcpu: 0, enable: 1 });
    t.close();
    await until(() => !v.vcpus[0]!.singlestepping, 1000, 'singlestep to stop');
    expect(v.hooked).toBe(true);
    expect((await v.vcpus[0]!.access({ gpa: 0x1000n }, 'r')).events).toEqual([]);
  });
});

describe('event reply hard errors (§5.3): socket shut down, the vCPU continues as with CONTINUE', () => {
  const cases: Array<[string, (seq: number) => Buffer]> = [
    ['wrong seq', (seq) => rawReply(seq + 1, 0, 0, events.CR.id, { data: Buffer.alloc(8) })],
    ['reply data longer than expected', (seq) => rawReply(seq, 0, 0, events.CR.id, { data: Buffer.alloc(9) })],
    ['non-zero padding', (seq) => rawReply(seq, 0, 0, events.CR.id, { pad: 1, data: Buffer.alloc(8) })],
    ['shorter than the reply header', (seq) => rawReply(seq, 0, 0, events.CR.id, { cut: 15 })],
  ];
  for (const [name, build] of cases) {
    it(name, async () => {
      const { tool: t, vm: v } = await vm();
      const c = v.vcpus[0]!;
      await enable(t, 'CR');
      await t.ok('VCPU_CONTROL_CR', { vcpu: 0, cr: 4, enable: 1 });
      const proposed = c.cpu.sregs.cr4 ^ 0x80n;
      const p = c.writeCr(4, proposed);
      const e = await t.nextVcpuEvent();
      await t.ok('VCPU_SET_REGISTERS', { vcpu: 0, ...e.arch.regs, rdx: 0x99n });
      t.send(build(e.seq));
      const r = await p;
      expect(r).toMatchObject({ outcome: 'completed', value: proposed, events: [{ event: 'CR', ended: 'hard-error' }] });
      expect(c.cpu.sregs.cr4).toBe(proposed); // the guest's value, not 0
      expect(c.cpu.regs.rdx).toBe(e.arch.regs.rdx); // SET_REGISTERS dropped
      await t.closed;
      expect(v.stats.hardErrors).toBe(1);
    });
  }

  it('a reply to a vCPU that is not waiting', async () => {
    const { tool: t, vm: v } = await vm();
    t.send(rawReply(5, 0, 0, events.PAUSE.id));
    await t.closed;
    expect(v.stats.hardErrors).toBe(1);
    expect(v.stats.lastLossReason).toMatch(/not waiting/);
  });

  it('after the loss, events are not sent: a hypercall returns 0 (failed send = CONTINUE) until UNHOOK', async () => {
    const { tool: t, vm: v, qemu } = await vm({}, { unhookDelayMs: 200, reconnectSeconds: 10 });
    await enable(t, 'HYPERCALL');
    t.send(rawReply(5, 0, 0, events.PAUSE.id));
    await t.closed;
    expect(v.hooked).toBe(true);
    expect(await v.vcpus[0]!.vmcall()).toMatchObject({ value: 0n, events: [{ event: 'HYPERCALL', seq: 0, ended: 'send-failed' }] });
    await until(() => !v.hooked, 2000, 'QEMU to unhook');
    expect(await v.vcpus[0]!.vmcall()).toMatchObject({ value: 0xfffffffffffffc18n, events: [] });
    expect(qemu.stats.disconnects).toBe(1);
  });
});

describe('padding KVM does not zero (§2.2)', () => {
  it('is non-zero in events by default and zero with paddingNoise off; decoding ignores it', async () => {
    for (const noise of [true, false]) {
      const { tool: t } = await vm({ paddingNoise: noise });
      await t.ok('VM_PAUSE_VCPU', { vcpu: 0, wait: 0 });
      const e = await t.nextVcpuEvent();
      const f = t.eventFrames[0]!;
      // Frame offsets from the sheet: header 8, event hdr 8, kvmi_vcpu_event {size u16, vcpu u16, padding u32 @ +4},
      // arch {mode u8, padding[7]}.
      const vcpuEvent = 8 + 8;
      const pad = [...f.subarray(vcpuEvent + 4, vcpuEvent + 8), ...f.subarray(vcpuEvent + 9, vcpuEvent + 16)];
      expect(pad.some((x) => x !== 0)).toBe(noise);
      expect(f.subarray(8 + 2, 8 + 8).every((x) => x === 0)).toBe(true); // kvmi_event_hdr padding is zeroed
      expect(e.arch.mode).toBe(8);
      t.reply(e);
    }
  });
});
