/**
 * Every v12 command (and the two seed extensions) on its success path, through the real handshake,
 * with the tool side written with the library's codec.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { commands, events, structs, type CommandInput, type CommandKey, type CommandReply } from '@periscope/kvmi';

import { KERNEL_BASE, MSR } from '../src/index.js';
import { startVm, type VmHarness } from './support/tool.js';

const harnesses: VmHarness[] = [];
afterEach(async () => {
  for (const h of harnesses.splice(0)) await h.cleanup();
});

describe('every command on its success path', () => {
  it('answers all 26 commands as the kernel would', async () => {
    const h = await startVm({ vcpus: 2, apsOnline: true, seed: 7 });
    harnesses.push(h);
    const { tool: t, vm } = h;
    const covered = new Set<CommandKey>();
    const ok = <K extends CommandKey>(key: K, input: CommandInput<K>): Promise<CommandReply<K>> => {
      covered.add(key);
      return t.ok(key, input);
    };

    // VM commands
    expect(await ok('GET_VERSION', {})).toEqual({ version: 1, max_msg_size: 8184, features: { singlestep: 1 } });
    await ok('VM_CHECK_COMMAND', { id: commands.VM_READ_PHYSICAL.id });
    await ok('VM_CHECK_EVENT', { id: events.PF.id });
    expect(await ok('VM_GET_INFO', {})).toEqual({ vcpu_count: 2 });
    await ok('VM_CONTROL_EVENTS', { event_id: events.UNHOOK.id, enable: 1 });
    expect(vm.currentHook?.unhookEventEnabled).toBe(true);
    const data = Uint8Array.from({ length: 16 }, (_, i) => i + 1);
    await ok('VM_WRITE_PHYSICAL', { gpa: 0x5008n, data });
    expect((await ok('VM_READ_PHYSICAL', { gpa: 0x5008n, size: 16 })).data).toEqual(data);
    expect(new Uint8Array(vm.memory.read(0x5008n, 16)!)).toEqual(data);
    await ok('VM_SET_PAGE_ACCESS', { entries: [{ gpa: 0x300123n, access: 1 }, { gpa: 0x301000n, access: 5 }] });
    expect(vm.restrictions.get(0x300)).toBe(1);
    expect(vm.restrictions.get(0x301)).toBe(5);
    await ok('VM_SET_PAGE_ACCESS', { entries: [{ gpa: 0x301000n, access: 7 }] });
    expect(vm.restrictions.has(0x301)).toBe(false);
    await ok('VM_CONTROL_CLEANUP', { enable: 0 });
    expect(vm.currentHook?.restoreOnUnhook).toBe(false);
    expect(await ok('VM_GET_MAX_GFN', {})).toEqual({ gfn: BigInt(64 * 256) });
    const tok = await ok('GET_MAP_TOKEN', {});
    expect(tok.token.token).toHaveLength(4);
    const tokBytes = structs.kvmi_mem_token.encode(tok.token);
    expect(vm.consumeMapToken(tokBytes)).toBe(true);
    expect(vm.consumeMapToken(tokBytes)).toBe(false); // single use

    // vCPU commands
    expect(await ok('VCPU_GET_INFO', { vcpu: 1 })).toEqual({ tsc_speed: 2_500_000_000n });
    await ok('VCPU_CONTROL_EVENTS', { vcpu: 0, event_id: events.CR.id, enable: 1 });
    expect(vm.vcpus[0]!.enabledEvents).toEqual([events.CR.id]);
    await ok('VCPU_CONTROL_CR', { vcpu: 0, cr: 4, enable: 1 });
    await ok('VCPU_CONTROL_MSR', { vcpu: 0, enable: 1, msr: MSR.LSTAR });
    expect(vm.vcpus[0]!.interceptions.msrs.has(MSR.LSTAR)).toBe(true);
    const regs = await ok('VCPU_GET_REGISTERS', { vcpu: 0, msrs_idx: [MSR.EFER, MSR.LSTAR] });
    expect(regs.mode).toBe(8);
    expect(regs.regs.rip).toBe(vm.vcpus[0]!.cpu.regs.rip);
    expect(regs.sregs.cr3).toBe(vm.pageTables.cr3);
    expect(regs.msrs.nmsrs).toBe(2);
    expect(regs.msr_entries).toEqual([
      { index: MSR.EFER, data: 0xd01n },
      { index: MSR.LSTAR, data: vm.kernel.symbol('entry_SYSCALL_64') },
    ]);
    const leaf0 = await ok('VCPU_GET_CPUID', { vcpu: 0, function: 0, index: 0 });
    expect(Buffer.from(new Uint32Array([leaf0.ebx, leaf0.edx, leaf0.ecx]).buffer).toString('latin1')).toBe('GenuineIntel');
    expect(await ok('VCPU_GET_XCR', { vcpu: 0, xcr: 0 })).toEqual({ value: 7n });
    const xs = await ok('VCPU_GET_XSAVE', { vcpu: 1 });
    expect(xs.xsave.region).toHaveLength(4096);
    expect(Buffer.from(xs.xsave.region).readUInt16LE(0)).toBe(0x037f); // FCW
    const region = new Uint8Array(xs.xsave.region);
    region[160] = 0xaa; // an XMM register byte
    await ok('VCPU_SET_XSAVE', { vcpu: 1, xsave: { region } });
    expect((await ok('VCPU_GET_XSAVE', { vcpu: 1 })).xsave.region[160]).toBe(0xaa);
    expect(await ok('VCPU_GET_MTRR_TYPE', { vcpu: 0, gpa: 0x1000n })).toEqual({ type: 6 });
    expect(await ok('VCPU_GET_MTRR_TYPE', { vcpu: 0, gpa: 0xa0000n })).toEqual({ type: 0 });
    expect(await ok('VCPU_TRANSLATE_GVA', { vcpu: 0, gva: KERNEL_BASE + 0x1234n })).toEqual({ gpa: 0x1234n });
    expect(await ok('VCPU_TRANSLATE_GVA', { vcpu: 0, gva: 0x7fff00000000n })).toEqual({ gpa: 0xffffffffffffffffn });
    await ok('VCPU_CONTROL_SINGLESTEP', { vcpu: 1, enable: 1 });
    expect(vm.vcpus[1]!.singlestepping).toBe(true);
    await ok('VCPU_CONTROL_SINGLESTEP', { vcpu: 1, enable: 0 });

    // INJECT_EXCEPTION → TRAP reports what was injected.
    await ok('VCPU_INJECT_EXCEPTION', { vcpu: 0, nr: 14, error_code: 2, address: 0xdead000n });
    const trap = await t.nextVcpuEvent();
    expect(trap.event.key).toBe('TRAP');
    expect(trap.data).toEqual({ nr: 14, error_code: 2, address: 0xdead000n });
    expect(trap.arch.sregs.cr2).toBe(0xdead000n);
    t.reply(trap);

    // VM_PAUSE_VCPU → PAUSE event; SET_REGISTERS while it waits, applied when the reply is processed.
    await ok('VM_PAUSE_VCPU', { vcpu: 1, wait: 1 });
    const pause = await t.nextVcpuEvent();
    expect(pause.event.key).toBe('PAUSE');
    expect(pause.vcpu).toBe(1);
    await ok('VCPU_SET_REGISTERS', { vcpu: 1, ...pause.arch.regs, rax: 0x1234n, rip: 0x4000n });
    expect(vm.vcpus[1]!.cpu.regs.rax).toBe(pause.arch.regs.rax); // not yet
    t.reply(pause);
    const after = await ok('VCPU_GET_REGISTERS', { vcpu: 1, msrs_idx: [] });
    expect(after.regs.rax).toBe(0x1234n);
    expect(after.regs.rip).toBe(0x4000n);

    expect([...covered].sort()).toEqual(Object.keys(commands).sort());
    expect(vm.stats.internalErrors).toBe(0);
  });
});
