/**
 * Raw-frame conformance: every vCPU command (kvmi-v12.md §4.1, odd ids) — success reply and every
 * documented error — as raw bytes. The vCPU indexes of the golden requests are honoured (VMs with 8
 * online vCPUs, or 260 vCPUs for the fixtures that address vCPU 258/259).
 */
import { afterEach, describe, expect, it } from 'vitest';

import { DEFAULT_HOST_PROFILE, KERNEL_BASE } from '../../src/index.js';
import {
  ALL_ONES, E, EV, ID, eventReply, getRegistersReplyData, hexOf, le32, le64, maskEventPadding, patchSeq, regsHex, reply, req, specific,
  u8, vcmd, vcpuEventFrame, zeros,
} from './support/bytes.js';
import { golden, handWritten, regsOf } from './support/oracles.js';
import { Rig, archOf, closeRigs } from './support/rig.js';

afterEach(closeRigs);

const EIGHT = { vcpus: 8, apsOnline: true } as const;
const goldenErr = (name: string, seq: number): string => patchSeq(golden(name).hex, seq);
const gseq = (name: string): number => golden(name).seq!;

describe('KVMI_VCPU_GET_INFO (3)', () => {
  it('tsc_speed = 1000 · tsc_khz with TSC scaling (golden reply for 3 GHz), 0 without', async () => {
    const r = await Rig.start({ vm: { ...EIGHT, profile: { ...DEFAULT_HOST_PROFILE, tscKhz: 3_000_000 } } });
    expect(await r.conn.call(golden('vcpu-get-info-request').hex)).toBe(golden('vcpu-get-info-reply').hex);
    const n = await Rig.start({ vm: { ...EIGHT, profile: { ...DEFAULT_HOST_PROFILE, tscScaling: false } } });
    expect(await n.conn.call(req.getInfo(5, 7))).toBe(reply(ID.VCPU_GET_INFO, 5, 0, le64(0)));
  });

  it('EAGAIN for an AP that is not up (golden); answered once it is', async () => {
    const r = await Rig.start({ vm: { vcpus: 3 } });
    const g = golden('vcpu-get-info-request'); // vcpu 2
    expect(await r.conn.call(g.hex)).toBe(goldenErr('vcpu-get-info-error-eagain', g.seq!));
    r.vm.bringUpVcpu(2);
    expect(await r.conn.call(g.hex)).toBe(reply(ID.VCPU_GET_INFO, g.seq!, 0, le64(2_500_000_000n)));
  });
});

describe('KVMI_VCPU_CONTROL_EVENTS (5)', () => {
  it('golden request (vcpu 1, PF) → golden reply; every vCPU event can be enabled and disabled', async () => {
    const r = await Rig.start({ vm: EIGHT });
    expect(await r.conn.call(golden('vcpu-control-events-request').hex)).toBe(golden('vcpu-control-events-reply').hex);
    expect(r.vcpu(1).enabledEvents).toEqual([EV.PF]);
    const ids = [EV.PAUSE, EV.HYPERCALL, EV.BREAKPOINT, EV.CR, EV.TRAP, EV.XSETBV, EV.DESCRIPTOR, EV.MSR, EV.PF, EV.SINGLESTEP];
    r.conn.send(...ids.map((id, i) => req.controlEvents(100 + i, 3, id, 1)));
    expect(await r.conn.nextN(ids.length)).toEqual(ids.map((_, i) => reply(ID.VCPU_CONTROL_EVENTS, 100 + i, 0)));
    expect(r.vcpu(3).interceptions.breakpoint).toBe(true);
    expect(r.vcpu(3).interceptions.descriptor).toBe(true);
    r.conn.send(...ids.map((id, i) => req.controlEvents(200 + i, 3, id, 0)));
    expect(await r.conn.nextN(ids.length)).toEqual(ids.map((_, i) => reply(ID.VCPU_CONTROL_EVENTS, 200 + i, 0)));
    expect(r.vcpu(3).interceptions.breakpoint).toBe(false);
    expect(r.vcpu(3).interceptions.descriptor).toBe(false);
    expect(await r.conn.call(handWritten('hw-vcpu-control-events-pf').hex)).toBe(reply(ID.VCPU_CONTROL_EVENTS, 9029, 0));
    expect(r.vcpu(3).enabledEvents).toEqual([EV.PF]);
  });

  it('EINVAL padding / enable > 1 / not a vCPU event id; EPERM for a disallowed event', async () => {
    const r = await Rig.start({ qemu: { allowEvents: [0, 1, 5, 7, 9, 11, 13, 15, 17, 19] } });
    const cases: Array<[string, number]> = [
      [req.controlEvents(1, 0, EV.CR, 1, 1), E.INVAL],
      [req.controlEvents(2, 0, EV.CR, 1, 0, 1), E.INVAL],
      [req.controlEvents(3, 0, EV.CR, 2), E.INVAL],
      [req.controlEvents(4, 0, EV.UNHOOK, 1), E.INVAL],
      [req.controlEvents(5, 0, 2, 1), E.INVAL],
      [req.controlEvents(6, 0, 21, 1), E.INVAL],
      [req.controlEvents(7, 0, EV.HYPERCALL, 1), E.PERM],
      [req.controlEvents(8, 0, EV.HYPERCALL, 0), E.PERM],
    ];
    for (const [i, [q, errno]] of cases.entries()) expect(await r.conn.call(q)).toBe(reply(ID.VCPU_CONTROL_EVENTS, i + 1, errno));
    expect(r.vcpu(0).enabledEvents).toEqual([]);
  });

  it('BREAKPOINT: EBUSY on a repeated enable (golden), on a disable while not enabled, and when userspace debugs', async () => {
    const r = await Rig.start();
    expect(await r.conn.call(req.controlEvents(1, 0, EV.BREAKPOINT, 0))).toBe(reply(ID.VCPU_CONTROL_EVENTS, 1, E.BUSY));
    expect(await r.conn.call(req.controlEvents(2, 0, EV.BREAKPOINT, 1))).toBe(reply(ID.VCPU_CONTROL_EVENTS, 2, 0));
    const s = gseq('vcpu-control-events-error-ebusy');
    expect(await r.conn.call(req.controlEvents(s, 0, EV.BREAKPOINT, 1))).toBe(golden('vcpu-control-events-error-ebusy').hex);
    expect(await r.conn.call(req.controlEvents(3, 0, EV.BREAKPOINT, 0))).toBe(reply(ID.VCPU_CONTROL_EVENTS, 3, 0));
    const u = await Rig.start({ vm: { profile: { ...DEFAULT_HOST_PROFILE, userspaceBpDebug: true } } });
    expect(await u.conn.call(req.controlEvents(4, 0, EV.BREAKPOINT, 1))).toBe(reply(ID.VCPU_CONTROL_EVENTS, 4, E.BUSY));
  });

  it('DESCRIPTOR: EOPNOTSUPP (golden) for enable and disable on a host without descriptor-table exits', async () => {
    const r = await Rig.start({ vm: { profile: { ...DEFAULT_HOST_PROFILE, descriptorExits: false } } });
    const s = gseq('vcpu-control-events-error-eopnotsupp');
    expect(await r.conn.call(req.controlEvents(s, 0, EV.DESCRIPTOR, 1))).toBe(golden('vcpu-control-events-error-eopnotsupp').hex);
    expect(await r.conn.call(req.controlEvents(2, 0, EV.DESCRIPTOR, 0))).toBe(reply(ID.VCPU_CONTROL_EVENTS, 2, E.OPNOTSUPP));
  });
});

describe('KVMI_VCPU_GET_REGISTERS (7)', () => {
  it('golden request (vcpu 258, LSTAR + PAT) → mode, kvm_regs, kvm_sregs and the MSR entries', async () => {
    const r = await Rig.start({ vm: { vcpus: 260 } });
    r.vm.bringUpVcpu(258);
    const g = golden('vcpu-get-registers-request');
    const a = archOf(r.vcpu(258));
    const msrs = [0xc0000082, 0x277].map((index) => ({ index, data: r.vcpu(258).cpu.readMsr(index)! }));
    expect(await r.conn.call(g.hex)).toBe(reply(ID.VCPU_GET_REGISTERS, g.seq!, 0, getRegistersReplyData(8, a.regs, a.sregs, msrs)));
  });

  it('nmsrs 0 → the 472-byte reply; nmsrs 481 → the largest reply (8176 bytes); EFER/APIC_BASE mirror sregs', async () => {
    const r = await Rig.start();
    const v = r.vcpu(0);
    const a = archOf(v);
    const zero = await r.conn.call(req.getRegs(1, 0, []));
    expect(zero).toBe(reply(ID.VCPU_GET_REGISTERS, 1, 0, getRegistersReplyData(8, a.regs, a.sregs, [])));
    expect(zero.length / 2).toBe(8 + 8 + 472);
    const big = await r.conn.call(req.getRegs(2, 0, Array<number>(481).fill(0x10)));
    expect(big.length / 2 - 8).toBe(8176);
    expect(big).toBe(reply(ID.VCPU_GET_REGISTERS, 2, 0, getRegistersReplyData(8, a.regs, a.sregs, Array.from({ length: 481 }, () => ({ index: 0x10, data: v.cpu.readMsr(0x10)! })))));
    expect(await r.conn.call(req.getRegs(3, 0, [0xc0000080, 0x1b]))).toBe(
      reply(ID.VCPU_GET_REGISTERS, 3, 0, getRegistersReplyData(8, a.regs, a.sregs, [{ index: 0xc0000080, data: a.sregs.efer }, { index: 0x1b, data: a.sregs.apic_base }])),
    );
  });

  it('EINVAL: struct padding, payload too short for nmsrs, an unreadable MSR (golden), nmsrs > 481', async () => {
    const r = await Rig.start();
    const cases: string[] = [
      req.getRegs(1, 0, [], 0, 1),
      req.getRegs(2, 0, [], 0, 0, 1),
      req.getRegs(3, 0, [0x10], 2),
      req.getRegs(4, 0, [], 1),
      req.getRegs(5, 0, Array<number>(482).fill(0x10)),
    ];
    for (const [i, q] of cases.entries()) expect(await r.conn.call(q)).toBe(reply(ID.VCPU_GET_REGISTERS, i + 1, E.INVAL));
    const s = gseq('vcpu-get-registers-error-einval');
    expect(await r.conn.call(req.getRegs(s, 0, [0x10, 0x12345]))).toBe(golden('vcpu-get-registers-error-einval').hex);
  });
});

describe('KVMI_VCPU_SET_REGISTERS (9)', () => {
  it('EOPNOTSUPP when the vCPU is not waiting for an event reply (golden); EINVAL for a short payload, checked first', async () => {
    const r = await Rig.start({ vm: EIGHT });
    const g = golden('vcpu-set-registers-request'); // vcpu 4
    const before = { ...r.vcpu(4).cpu.regs };
    expect(await r.conn.call(g.hex)).toBe(goldenErr('vcpu-set-registers-error-eopnotsupp', g.seq!));
    expect(await r.conn.call(vcmd(ID.VCPU_SET_REGISTERS, 2, 4, regsHex(before).slice(0, 2 * 143)))).toBe(reply(ID.VCPU_SET_REGISTERS, 2, E.INVAL));
    expect(r.vcpu(4).cpu.regs).toEqual(before);
  });

  it('accepted while the vCPU waits (golden request/reply); applied only when the reply is processed', async () => {
    const r = await Rig.start({ vm: EIGHT });
    const g = golden('vcpu-set-registers-request');
    const regs = regsOf(g.fields['regs'] as Record<string, unknown>);
    r.conn.send(req.pause(1, 4));
    expect(await r.conn.next()).toBe(reply(ID.VM_PAUSE_VCPU, 1, 0));
    const ev = await r.conn.next();
    const a = archOf(r.vcpu(4));
    expect(maskEventPadding(ev)).toBe(vcpuEventFrame({ seq: 1, event: EV.PAUSE, vcpu: 4, arch: a }));
    expect(await r.conn.call(vcmd(ID.VCPU_SET_REGISTERS, 2, 4, regsHex(regs).slice(0, 2 * 143)))).toBe(reply(ID.VCPU_SET_REGISTERS, 2, E.INVAL));
    expect(await r.conn.call(g.hex)).toBe(golden('vcpu-set-registers-reply').hex);
    expect(await r.conn.call(req.getRegs(3, 4, []))).toBe(reply(ID.VCPU_GET_REGISTERS, 3, 0, getRegistersReplyData(8, a.regs, a.sregs, [])));
    r.conn.send(eventReply(1, 4, 0, EV.PAUSE));
    expect(await r.conn.call(req.getRegs(4, 4, []))).toBe(reply(ID.VCPU_GET_REGISTERS, 4, 0, getRegistersReplyData(8, regs, a.sregs, [])));
    expect(r.vcpu(4).cpu.regs).toEqual(regs);
  });
});

describe('KVMI_VCPU_GET_CPUID (11)', () => {
  it('the leaf as the guest sees it (golden request); ENOENT for a missing leaf (golden); significant index', async () => {
    const r = await Rig.start({ vm: EIGHT });
    const g = golden('vcpu-get-cpuid-request'); // vcpu 6, 0x80000008 / 3
    const leaf = (v: number, fn: number, idx: number): string => {
      const e = r.vcpu(v).cpu.findCpuid(fn, idx)!;
      return le32(e.eax) + le32(e.ebx) + le32(e.ecx) + le32(e.edx);
    };
    expect(await r.conn.call(g.hex)).toBe(reply(ID.VCPU_GET_CPUID, g.seq!, 0, leaf(6, 0x80000008, 3)));
    expect(await r.conn.call(req.cpuid(2, 0, 0, 0))).toBe(reply(ID.VCPU_GET_CPUID, 2, 0, le32(0xd) + hexOf(Buffer.from('GenuntelineI', 'latin1'))));
    expect(await r.conn.call(req.cpuid(3, 0, 0xd, 1))).toBe(reply(ID.VCPU_GET_CPUID, 3, 0, leaf(0, 0xd, 1)));
    expect(await r.conn.call(req.cpuid(4, 0, 0xd, 5))).toBe(reply(ID.VCPU_GET_CPUID, 4, E.NOENT));
    const s = gseq('vcpu-get-cpuid-error-enoent');
    expect(await r.conn.call(req.cpuid(s, 6, 0x2, 0))).toBe(golden('vcpu-get-cpuid-error-enoent').hex);
    // a payload cut after `function` reads index 0 (§2.2): same as index 0
    expect(await r.conn.call(vcmd(ID.VCPU_GET_CPUID, 5, 0, le32(0)))).toBe(reply(ID.VCPU_GET_CPUID, 5, 0, le32(0xd) + hexOf(Buffer.from('GenuntelineI', 'latin1'))));
  });
});

describe('KVMI_VCPU_CONTROL_CR (13)', () => {
  it('golden (vcpu 7, CR3) and hand-written (vcpu 2, CR4) requests; CR0; disable; CR3 exits follow', async () => {
    const r = await Rig.start({ vm: EIGHT });
    expect(await r.conn.call(golden('vcpu-control-cr-request').hex)).toBe(golden('vcpu-control-cr-reply').hex);
    expect(r.vcpu(7).interceptions.cr3).toBe(true);
    expect(await r.conn.call(handWritten('hw-vcpu-control-cr4').hex)).toBe(reply(ID.VCPU_CONTROL_CR, 13398, 0));
    expect(await r.conn.call(req.controlCr(2, 0, 0, 1))).toBe(reply(ID.VCPU_CONTROL_CR, 2, 0));
    expect(await r.conn.call(req.controlCr(3, 7, 3, 0))).toBe(reply(ID.VCPU_CONTROL_CR, 3, 0));
    expect(r.vcpu(7).interceptions.cr3).toBe(false);
  });

  it('EINVAL padding / enable > 1 / cr not 0, 3, 4 (golden); the hand-written request on a 2-vCPU VM (bad index, hand-written reply)', async () => {
    const r = await Rig.start({ vm: { vcpus: 2 } });
    const cases = [req.controlCr(1, 0, 4, 1, 1), req.controlCr(2, 0, 4, 1, 0, 1), req.controlCr(3, 0, 4, 2), req.controlCr(4, 0, 2, 1), req.controlCr(5, 0, 8, 1), req.controlCr(6, 0, 8, 2, 1)];
    for (const [i, q] of cases.entries()) expect(await r.conn.call(q)).toBe(reply(ID.VCPU_CONTROL_CR, i + 1, E.INVAL));
    expect(await r.conn.call(req.controlCr(gseq('vcpu-control-cr-error-einval'), 0, 1, 1))).toBe(golden('vcpu-control-cr-error-einval').hex);
    expect(await r.conn.call(handWritten('hw-vcpu-control-cr4').hex)).toBe(handWritten('hw-vcpu-control-cr-error-einval').hex);
  });
});

describe('KVMI_VCPU_INJECT_EXCEPTION (15)', () => {
  it('golden request (vcpu 1, #PF) → golden reply, then the TRAP event reports what was injected', async () => {
    const r = await Rig.start({ vm: EIGHT });
    expect(await r.conn.call(golden('vcpu-inject-exception-request').hex)).toBe(golden('vcpu-inject-exception-reply').hex);
    const trap = await r.conn.next();
    expect(maskEventPadding(trap)).toBe(
      vcpuEventFrame({ seq: 1, event: EV.TRAP, vcpu: 1, arch: archOf(r.vcpu(1)), specific: specific.trap(14, 2343420126, 0xffffc90012345678n) }),
    );
    r.conn.send(eventReply(1, 1, 0, EV.TRAP));
    await r.conn.quiet(20);
  });

  it('EPERM when TRAP is disallowed (before EINVAL padding, before EBUSY)', async () => {
    const r = await Rig.start({ qemu: { allowEvents: [0, 1, 3, 5, 7, 11, 13, 15, 17, 19] } });
    expect(await r.conn.call(req.inject(1, 0, 3, 0, 0n))).toBe(reply(ID.VCPU_INJECT_EXCEPTION, 1, E.PERM));
    expect(await r.conn.call(req.inject(2, 0, 3, 0, 0n, 1))).toBe(reply(ID.VCPU_INJECT_EXCEPTION, 2, E.PERM));
  });

  it('EINVAL padding (before EBUSY); EBUSY while an injection is pending (golden) and while single-stepping', async () => {
    const r = await Rig.start();
    expect(await r.conn.call(req.inject(1, 0, 3, 0, 0n, 1))).toBe(reply(ID.VCPU_INJECT_EXCEPTION, 1, E.INVAL));
    expect(await r.conn.call(req.inject(2, 0, 3, 0, 0n, 0, 1))).toBe(reply(ID.VCPU_INJECT_EXCEPTION, 2, E.INVAL));
    // Two injections in one write: the vCPU runs both jobs before its next guest entry, so the first is still pending.
    const s = gseq('vcpu-inject-exception-error-ebusy');
    r.conn.send(req.inject(3, 0, 6, 0, 0n), req.inject(s, 0, 13, 0, 0n), req.inject(4, 0, 13, 0, 0n, 1));
    expect(await r.conn.nextN(3)).toEqual([
      reply(ID.VCPU_INJECT_EXCEPTION, 3, 0),
      golden('vcpu-inject-exception-error-ebusy').hex,
      reply(ID.VCPU_INJECT_EXCEPTION, 4, E.INVAL),
    ]);
    const trap = await r.conn.next();
    expect(maskEventPadding(trap)).toBe(vcpuEventFrame({ seq: 1, event: EV.TRAP, vcpu: 0, arch: archOf(r.vcpu(0)), specific: specific.trap(6, 0, 0n) }));
    r.conn.send(eventReply(1, 0, 0, EV.TRAP));
    expect(await r.conn.call(req.singlestep(5, 0, 1))).toBe(reply(ID.VCPU_CONTROL_SINGLESTEP, 5, 0));
    expect(await r.conn.call(req.inject(6, 0, 3, 0, 0n))).toBe(reply(ID.VCPU_INJECT_EXCEPTION, 6, E.BUSY));
    expect(r.vcpu(0).deliveredExceptions).toEqual([{ vector: 6, errorCode: undefined }]);
  });
});

describe('KVMI_VCPU_GET_XCR (17)', () => {
  it('XCR0 (golden request, vcpu 2); EINVAL for xcr ≠ 0 (golden) and padding', async () => {
    const r = await Rig.start({ vm: EIGHT });
    const g = golden('vcpu-get-xcr-request');
    expect(await r.conn.call(g.hex)).toBe(reply(ID.VCPU_GET_XCR, g.seq!, 0, le64(r.vcpu(2).cpu.xcr0)));
    expect(r.vcpu(2).cpu.xcr0).toBe(7n);
    expect(await r.conn.call(req.getXcr(gseq('vcpu-get-xcr-error-einval'), 2, 1))).toBe(golden('vcpu-get-xcr-error-einval').hex);
    expect(await r.conn.call(req.getXcr(3, 2, 0, 1))).toBe(reply(ID.VCPU_GET_XCR, 3, E.INVAL));
  });
});

describe('KVMI_VCPU_GET_XSAVE (19) / KVMI_VCPU_SET_XSAVE (21)', () => {
  /** A valid legacy xsave area (Intel SDM vol. 1 §13.4): FCW, MXCSR, MXCSR_MASK, an XMM0 value, XSTATE_BV = x87|SSE. */
  function validXsave(): Buffer {
    const x = Buffer.alloc(4096);
    x.writeUInt16LE(0x037f, 0);
    x.writeUInt32LE(0x1f80, 24);
    x.writeUInt32LE(0xffff, 28);
    x.write('00112233445566778899aabbccddeeff', 160, 'hex');
    x.writeBigUInt64LE(3n, 512);
    return x;
  }

  it('GET_XSAVE returns the 4096-byte area (golden request, vcpu 3); SET_XSAVE replaces it', async () => {
    const r = await Rig.start({ vm: EIGHT });
    const g = golden('vcpu-get-xsave-request');
    const got = await r.conn.call(g.hex);
    expect(got).toBe(reply(ID.VCPU_GET_XSAVE, g.seq!, 0, hexOf(r.vcpu(3).cpu.xsave)));
    expect(got.length / 2).toBe(8 + 8 + 4096);
    const x = validXsave();
    expect(await r.conn.call(req.setXsave(2, 3, hexOf(x)))).toBe(reply(ID.VCPU_SET_XSAVE, 2, 0));
    expect(await r.conn.call(req.getXsave(3, 3))).toBe(reply(ID.VCPU_GET_XSAVE, 3, 0, hexOf(x)));
  });

  it('SET_XSAVE: EINVAL for a short payload and for content KVM rejects (golden request → golden error)', async () => {
    const r = await Rig.start({ vm: EIGHT });
    const before = Buffer.from(r.vcpu(3).cpu.xsave);
    const g = golden('vcpu-set-xsave-request'); // random bytes: XSTATE_BV has bits the host lacks
    expect(await r.conn.call(g.hex)).toBe(goldenErr('vcpu-set-xsave-error-einval', g.seq!));
    expect(await r.conn.call(req.setXsave(2, 3, hexOf(validXsave()).slice(0, 2 * 4095)))).toBe(reply(ID.VCPU_SET_XSAVE, 2, E.INVAL));
    const unsupported = validXsave();
    unsupported.writeBigUInt64LE(1n << 9n, 512);
    expect(await r.conn.call(req.setXsave(3, 3, hexOf(unsupported)))).toBe(reply(ID.VCPU_SET_XSAVE, 3, E.INVAL));
    expect(r.vcpu(3).cpu.xsave.equals(before)).toBe(true);
  });
});

describe('KVMI_VCPU_GET_MTRR_TYPE (23)', () => {
  it('WB for RAM (golden request → golden reply), UC for the VGA window and the 3–4 GiB hole', async () => {
    const r = await Rig.start({ vm: EIGHT });
    expect(await r.conn.call(golden('vcpu-get-mtrr-type-request').hex)).toBe(golden('vcpu-get-mtrr-type-reply').hex);
    expect(await r.conn.call(req.mtrr(2, 0, 0xa0000n))).toBe(reply(ID.VCPU_GET_MTRR_TYPE, 2, 0, u8(0) + zeros(7)));
    expect(await r.conn.call(req.mtrr(3, 0, 0xc0000000n))).toBe(reply(ID.VCPU_GET_MTRR_TYPE, 3, 0, u8(0) + zeros(7)));
    expect(await r.conn.call(req.mtrr(4, 0, 0x100000n))).toBe(reply(ID.VCPU_GET_MTRR_TYPE, 4, 0, u8(6) + zeros(7)));
    const ea = await Rig.start({ vm: { vcpus: 2 } });
    expect(await ea.conn.call(req.mtrr(gseq('vcpu-get-mtrr-type-error-eagain'), 1, 0n))).toBe(golden('vcpu-get-mtrr-type-error-eagain').hex);
  });
});

describe('KVMI_VCPU_CONTROL_MSR (25)', () => {
  it('golden (vcpu 2, 0xc0000103) and hand-written (vcpu 1, LSTAR) requests; the range edges are inclusive', async () => {
    const r = await Rig.start({ vm: EIGHT });
    expect(await r.conn.call(golden('vcpu-control-msr-request').hex)).toBe(golden('vcpu-control-msr-reply').hex);
    expect(r.vcpu(2).interceptions.msrs.has(0xc0000103)).toBe(true);
    expect(await r.conn.call(handWritten('hw-vcpu-control-msr-lstar').hex)).toBe(reply(ID.VCPU_CONTROL_MSR, 17767, 0));
    for (const [i, msr] of [0, 0x1fff, 0xc0000000, 0xc0001fff].entries()) {
      expect(await r.conn.call(req.controlMsr(10 + i, 0, msr, 1))).toBe(reply(ID.VCPU_CONTROL_MSR, 10 + i, 0));
    }
    expect(await r.conn.call(req.controlMsr(20, 2, 0xc0000103, 0))).toBe(reply(ID.VCPU_CONTROL_MSR, 20, 0));
    expect(r.vcpu(2).interceptions.msrs.has(0xc0000103)).toBe(false);
  });

  it('EINVAL padding / enable > 1 / MSR out of range; EPERM (golden) only when enabling a filtered MSR', async () => {
    const r = await Rig.start({ vm: { ...EIGHT, profile: { ...DEFAULT_HOST_PROFILE, msrFilterDenyWrite: [0xc0000103] } } });
    const cases = [
      req.controlMsr(1, 0, 0x10, 1, 1), req.controlMsr(2, 0, 0x10, 1, 0, 1), req.controlMsr(3, 0, 0x10, 2),
      req.controlMsr(4, 0, 0x2000, 1), req.controlMsr(5, 0, 0xbfffffff, 1), req.controlMsr(6, 0, 0xc0002000, 1), req.controlMsr(7, 0, 0x40000000, 1),
    ];
    for (const [i, q] of cases.entries()) expect(await r.conn.call(q)).toBe(reply(ID.VCPU_CONTROL_MSR, i + 1, E.INVAL));
    const g = golden('vcpu-control-msr-request');
    expect(await r.conn.call(g.hex)).toBe(goldenErr('vcpu-control-msr-error-eperm', g.seq!));
    expect(await r.conn.call(req.controlMsr(8, 2, 0xc0000103, 0))).toBe(reply(ID.VCPU_CONTROL_MSR, 8, 0));
    expect(await r.conn.call(req.controlMsr(9, 2, 0x2000, 1, 0, 0))).toBe(reply(ID.VCPU_CONTROL_MSR, 9, E.INVAL));
  });
});

describe('KVMI_VCPU_CONTROL_SINGLESTEP (27)', () => {
  it('golden request (vcpu 4) → golden reply; disable', async () => {
    const r = await Rig.start({ vm: EIGHT });
    expect(await r.conn.call(golden('vcpu-control-singlestep-request').hex)).toBe(golden('vcpu-control-singlestep-reply').hex);
    expect(r.vcpu(4).singlestepping).toBe(true);
    expect(await r.conn.call(req.singlestep(2, 4, 0))).toBe(reply(ID.VCPU_CONTROL_SINGLESTEP, 2, 0));
    expect(r.vcpu(4).singlestepping).toBe(false);
  });

  it('checks in the order EPERM → EINVAL (padding, enable > 1) → EOPNOTSUPP (golden)', async () => {
    const d = await Rig.start({ qemu: { allowEvents: [0, 1, 3, 5, 7, 9, 11, 13, 15, 17] }, vm: { profile: { ...DEFAULT_HOST_PROFILE, singlestep: false } } });
    expect(await d.conn.call(req.singlestep(1, 0, 2, 1))).toBe(reply(ID.VCPU_CONTROL_SINGLESTEP, 1, E.PERM));
    const r = await Rig.start({ vm: { ...EIGHT, profile: { ...DEFAULT_HOST_PROFILE, singlestep: false } } });
    expect(await r.conn.call(req.singlestep(2, 0, 1, 1))).toBe(reply(ID.VCPU_CONTROL_SINGLESTEP, 2, E.INVAL));
    expect(await r.conn.call(req.singlestep(3, 0, 2))).toBe(reply(ID.VCPU_CONTROL_SINGLESTEP, 3, E.INVAL));
    const g = golden('vcpu-control-singlestep-request');
    expect(await r.conn.call(g.hex)).toBe(goldenErr('vcpu-control-singlestep-error-eopnotsupp', g.seq!));
    expect(await r.conn.call(req.singlestep(4, 4, 0))).toBe(reply(ID.VCPU_CONTROL_SINGLESTEP, 4, E.OPNOTSUPP));
  });
});

describe('KVMI_VCPU_TRANSLATE_GVA (29)', () => {
  it('walks the guest page tables: the golden gva is unmapped (all ones); kernel and identity maps translate', async () => {
    const r = await Rig.start({ vm: { ...EIGHT, memoryMiB: 512 } });
    const g = golden('vcpu-translate-gva-request'); // 0xffff888012345abc: PML4 slot 273 is empty
    expect(await r.conn.call(g.hex)).toBe(patchSeq(golden('vcpu-translate-gva-reply-untranslatable').hex, g.seq!));
    const ok = golden('vcpu-translate-gva-reply'); // gpa 0x12345abc
    expect(await r.conn.call(req.translate(ok.seq!, 6, KERNEL_BASE + 0x12345abcn))).toBe(ok.hex);
    expect(await r.conn.call(req.translate(2, 0, 0x5123n))).toBe(reply(ID.VCPU_TRANSLATE_GVA, 2, 0, le64(0x5123n)));
    expect(await r.conn.call(req.translate(3, 0, 0x0000800000000000n))).toBe(reply(ID.VCPU_TRANSLATE_GVA, 3, 0, le64(ALL_ONES))); // non-canonical
    expect(await r.conn.call(req.translate(57072, 0, 0x40000000n))).toBe(handWritten('hw-vcpu-translate-gva-reply-untranslatable').hex); // past the 512 MiB map
  });

  it('EPERM when disallowed (golden)', async () => {
    const r = await Rig.start({ vm: EIGHT, qemu: { allowCommands: Array.from({ length: 29 }, (_, i) => i) } });
    const g = golden('vcpu-translate-gva-request');
    expect(await r.conn.call(g.hex)).toBe(goldenErr('vcpu-translate-gva-error-eperm', g.seq!));
  });
});
