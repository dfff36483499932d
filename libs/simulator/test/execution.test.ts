/**
 * Real instructions and resume semantics: guest actions place the table encoding at RIP (what a tool
 * reads at the event's RIP is the instruction); runs fetch, execute and move RIP by the table lengths;
 * after a reply the vCPU resumes at the register RIP — CONTINUE on a PF performs the write and moves
 * past it, RETRY re-executes at the same RIP, RETRY after SET_REGISTERS moved RIP resumes at the new
 * one; CR/MSR CONTINUE write new_val, the not-CONTINUE path delivers #GP; 1000 identical consecutive
 * faults are a livelock. Expected RIPs come from the instruction table's lengths, never a decoder.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { events } from '@periscope/kvmi';
import { encodeInstruction, instruction } from '@periscope/x86';

import { assemble, LIVELOCK_FAULTS, MSR, MODULES_VADDR, type LivelockReport, type RunResult } from '../src/index.js';
import { startVm, type ToolConn, type VmHarness } from './support/tool.js';

const harnesses: VmHarness[] = [];
afterEach(async () => {
  for (const h of harnesses.splice(0)) await h.cleanup();
});
async function vm(): Promise<VmHarness> {
  const h = await startVm({ seed: 5, jitterMs: 0 });
  harnesses.push(h);
  return h;
}
const enable = (t: ToolConn, id: number, vcpu = 0): Promise<unknown> => t.ok('VCPU_CONTROL_EVENTS', { vcpu, event_id: id, enable: 1 });
const len = (n: Parameters<typeof instruction>[0]): bigint => BigInt(instruction(n).length);
const CODE = MODULES_VADDR + 0x300000n;

/**
 * A store program in the module area: mov rdi, target; mov rax, value; mov [rdi], rax; ret — the store
 * at CODE + 20 (10 + 10), the ret at CODE + 23.
 */
function storeProgram(h: VmHarness, target: bigint, value: bigint): { run: () => Promise<RunResult>; store: bigint; ret: bigint } {
  const c = h.vm.vcpus[0]!;
  const a = assemble(CODE, [{ name: 'mov rdi, imm64', imm: target }, { name: 'mov rax, imm64', imm: value }, { name: 'mov [rdi], rax' }, { name: 'ret' }]);
  expect(c.pokeLinear(CODE, a.bytes)).toBe(true);
  const k = h.vm.kernel;
  return {
    run: () => c.run({ entry: CODE, returnTo: k.symbol('cpu_idle'), regs: { rsp: k.taskStackTop(0) } }),
    store: CODE + len('mov rdi, imm64') + len('mov rax, imm64'),
    ret: CODE + len('mov rdi, imm64') + len('mov rax, imm64') + len('mov [rdi], rax'),
  };
}

/** A data page of the kernel, write-protected by the tool, PF enabled. */
async function guarded(h: VmHarness): Promise<{ gva: bigint; gpa: bigint }> {
  const k = h.vm.kernel;
  const gva = k.symbol('sim_protected_data', 0x20);
  const gpa = k.symbolPhys('sim_protected_data', 0x20);
  await h.tool.ok('VM_SET_PAGE_ACCESS', { entries: [{ gpa, access: 1 }] });
  await enable(h.tool, events.PF.id);
  return { gva, gpa };
}

describe('instruction placement', () => {
  it('a guest action writes the table encoding at RIP before it exits: the event RIP holds `mov cr4, rax` (0F 22 E0)', async () => {
    const h = await vm();
    const c = h.vm.vcpus[0]!;
    await enable(h.tool, events.CR.id);
    await h.tool.ok('VCPU_CONTROL_CR', { vcpu: 0, cr: 4, enable: 1 });
    const cr4 = c.cpu.sregs.cr4;
    const p = c.writeCr(4, cr4 ^ 0x80n);
    const e = await h.tool.nextVcpuEvent();
    expect(e.arch.regs.rax).toBe(cr4 ^ 0x80n);
    const gpa = (await h.tool.ok('VCPU_TRANSLATE_GVA', { vcpu: 0, gva: e.arch.regs.rip })).gpa;
    const at = await h.tool.ok('VM_READ_PHYSICAL', { gpa, size: instruction('mov cr4, rax').length });
    expect(Buffer.from(at.data).toString('hex')).toBe('0f22e0');
    expect(Buffer.from(at.data)).toEqual(Buffer.from(encodeInstruction('mov cr4, rax')));
    h.tool.reply(e, 'CONTINUE', cr4 ^ 0x80n);
    expect(await p).toMatchObject({ outcome: 'completed', value: cr4 ^ 0x80n });
    // A retired action moves RIP past itself by the table length, as a run does: the next action is
    // placed right after it.
    expect(c.cpu.regs.rip).toBe(e.arch.regs.rip + len('mov cr4, rax'));
    await c.wrmsr(MSR.TSC_AUX, 5n);
    expect(c.cpu.regs.rip).toBe(e.arch.regs.rip + len('mov cr4, rax') + len('wrmsr'));
    expect(Buffer.from((await h.tool.ok('VM_READ_PHYSICAL', { gpa, size: 5 })).data).toString('hex')).toBe('0f22e00f30');
  });

  it('a run executes what it finds at RIP, moving RIP by the table lengths; bytes no table entry has are #UD', async () => {
    const h = await vm();
    const c = h.vm.vcpus[0]!;
    const k = h.vm.kernel;
    const target = k.symbol('sim_counters');
    const prog = storeProgram(h, target, 0x1122334455667788n);
    const r = await prog.run();
    expect(r.outcome).toBe('completed');
    expect(r.trace.map((t) => [t.rip, t.name, t.length, t.result])).toEqual([
      [CODE, 'mov rdi, imm64', 10, 'retired'],
      [CODE + 10n, 'mov rax, imm64', 10, 'retired'],
      [prog.store, 'mov [rdi], rax', 3, 'retired'],
      [prog.ret, 'ret', 1, 'retired'],
    ]);
    expect(h.vm.memory.readU64(k.symbolPhys('sim_counters'))).toBe(0x1122334455667788n);
    expect(c.cpu.regs.rip).toBe(k.symbol('cpu_idle'));
    c.pokeLinear(CODE, Uint8Array.of(0x0f, 0xff));
    expect(await c.run({ entry: CODE })).toMatchObject({ outcome: 'exception', vector: 6, rip: CODE });
  });
});

describe('resume semantics of a PF', () => {
  it('CONTINUE: the write is performed and RIP moves past the store (+3), to the ret', async () => {
    const h = await vm();
    const g = await guarded(h);
    const prog = storeProgram(h, g.gva, 0xdeadn);
    const p = prog.run();
    const e = await h.tool.nextVcpuEvent();
    expect(e.arch.regs.rip).toBe(prog.store);
    expect(e.data).toEqual({ gva: g.gva, gpa: g.gpa, access: 2 });
    h.tool.reply(e, 'CONTINUE');
    const r = await p;
    expect(r.outcome).toBe('completed');
    expect(r.trace.filter((t) => t.rip === prog.store)).toEqual([{ rip: prog.store, name: 'mov [rdi], rax', length: 3, result: 'retired', times: 1 }]);
    expect(r.trace.at(-1)).toMatchObject({ rip: prog.ret, name: 'ret' });
    expect(h.vm.memory.readU64(g.gpa)).toBe(0xdeadn);
  });

  it('RETRY: the store runs again at the same RIP (a second event); once the tool lifts the restriction it lands', async () => {
    const h = await vm();
    const g = await guarded(h);
    const prog = storeProgram(h, g.gva, 0xbeefn);
    const p = prog.run();
    const e1 = await h.tool.nextVcpuEvent();
    h.tool.reply(e1, 'RETRY');
    const e2 = await h.tool.nextVcpuEvent();
    expect(e2.seq).toBe(e1.seq + 1);
    expect(e2.arch.regs.rip).toBe(prog.store);
    expect(h.vm.memory.readU64(g.gpa)).toBe(0n);
    await h.tool.ok('VM_SET_PAGE_ACCESS', { entries: [{ gpa: g.gpa, access: 7 }] });
    h.tool.reply(e2, 'RETRY');
    const r = await p;
    expect(r.outcome).toBe('completed');
    expect(r.trace.find((t) => t.rip === prog.store && t.result === 'retry')).toMatchObject({ times: 2 });
    expect(h.vm.memory.readU64(g.gpa)).toBe(0xbeefn);
  });

  it('RETRY after SET_REGISTERS moved RIP: the vCPU resumes at the new RIP (the ret), the write never lands', async () => {
    const h = await vm();
    const g = await guarded(h);
    const prog = storeProgram(h, g.gva, 0xbadn);
    const p = prog.run();
    const e = await h.tool.nextVcpuEvent();
    await h.tool.ok('VCPU_SET_REGISTERS', { vcpu: 0, ...e.arch.regs, rip: e.arch.regs.rip + len('mov [rdi], rax') });
    h.tool.reply(e, 'RETRY');
    const r = await p;
    expect(r.outcome).toBe('completed');
    expect(r.trace.map((t) => [t.rip, t.result])).toEqual([
      [CODE, 'retired'],
      [CODE + 10n, 'retired'],
      [prog.store, 'retry'],
      [prog.ret, 'retired'],
    ]);
    expect(h.vm.memory.readU64(g.gpa)).toBe(0n);
    expect(r.events).toEqual([{ event: 'PF', seq: e.seq, ended: 'RETRY' }]);
  });

  it(`livelock: ${LIVELOCK_FAULTS} identical consecutive faults on one vCPU are reported, and the run stops`, async () => {
    const h = await vm();
    const g = await guarded(h);
    const prog = storeProgram(h, g.gva, 1n);
    const reports: LivelockReport[] = [];
    h.vm.on('livelock', (r) => reports.push(r));
    const p = prog.run();
    let n = 0;
    const loop = (async () => {
      for (;;) {
        const e = await h.tool.nextVcpuEvent();
        n++;
        h.tool.reply(e, 'RETRY');
        if (n === LIVELOCK_FAULTS) return;
      }
    })();
    const r = await p;
    await loop;
    expect(r.outcome).toBe('livelock');
    expect(n).toBe(LIVELOCK_FAULTS);
    expect(r.trace.find((t) => t.rip === prog.store)).toMatchObject({ result: 'retry', times: LIVELOCK_FAULTS });
    expect(reports).toHaveLength(1);
    expect(reports[0]).toMatchObject({ vcpu: 0, rip: prog.store, faults: LIVELOCK_FAULTS });
    expect(reports[0]!.event).toMatch(/^PF:gva=.*access=2:RETRY$/);
    expect(h.vm.stats.livelocks).toBe(1);
    expect(h.vm.vcpus[0]!.cpu.regs.rip).toBe(prog.store);
    await h.tool.ok('VM_SET_PAGE_ACCESS', { entries: [{ gpa: g.gpa, access: 7 }] });
    expect(await h.vm.vcpus[0]!.run({ until: h.vm.kernel.symbol('cpu_idle') })).toMatchObject({ outcome: 'completed' }); // progress again
  });
});

describe('CR, MSR and descriptor exits in runs', () => {
  it('CONTINUE with new_val writes the tool\'s value and moves RIP; CRASH takes the not-CONTINUE path: #GP, RIP stays, CR unchanged', async () => {
    const h = await vm();
    const c = h.vm.vcpus[0]!;
    const k = h.vm.kernel;
    await enable(h.tool, events.CR.id);
    await h.tool.ok('VCPU_CONTROL_CR', { vcpu: 0, cr: 0, enable: 1 });
    const cr0 = c.cpu.sregs.cr0;
    const call = (): Promise<RunResult> => c.run({ entry: k.symbol('native_write_cr0'), returnTo: k.symbol('cpu_idle'), regs: { rax: cr0 & ~(1n << 16n), rsp: k.taskStackTop(0) } });
    let p = call();
    let e = await h.tool.nextVcpuEvent();
    expect(e.data).toEqual({ cr: 0, old_value: cr0, new_value: cr0 & ~(1n << 16n) });
    expect(e.arch.regs.rip).toBe(k.symbol('native_write_cr0'));
    h.tool.reply(e, 'CONTINUE', cr0); // deny: keep WP
    expect(await p).toMatchObject({ outcome: 'completed' });
    expect(c.cpu.sregs.cr0).toBe(cr0);
    p = call();
    e = await h.tool.nextVcpuEvent();
    h.tool.reply(e, 'CRASH', cr0 & ~(1n << 16n));
    expect(await p).toMatchObject({ outcome: 'vcpu-crashed', vector: 13, crashed: true, rip: k.symbol('native_write_cr0') });
    expect(c.deliveredExceptions.at(-1)).toEqual({ vector: 13, errorCode: 0 });
    expect(c.cpu.sregs.cr0).toBe(cr0);
  });

  it('WRMSR: CONTINUE with the old value blocks the write; XSETBV is informational; LIDT skipped by the tool keeps IDTR', async () => {
    const h = await vm();
    const c = h.vm.vcpus[0]!;
    const k = h.vm.kernel;
    const t = h.tool;
    await enable(t, events.MSR.id);
    await enable(t, events.XSETBV.id);
    await enable(t, events.DESCRIPTOR.id);
    await t.ok('VCPU_CONTROL_MSR', { vcpu: 0, msr: MSR.LSTAR, enable: 1 });
    const entry = k.symbol('entry_SYSCALL_64');
    const evil = MODULES_VADDR + 0x1234n;
    const a = assemble(CODE, [
      { name: 'mov ecx, imm32', imm: MSR.LSTAR },
      { name: 'mov eax, imm32', imm: evil & 0xffffffffn },
      { name: 'mov edx, imm32', imm: evil >> 32n },
      { name: 'wrmsr' },
      { name: 'mov ecx, imm32', imm: 0 },
      { name: 'mov eax, imm32', imm: 3 },
      { name: 'mov edx, imm32', imm: 0 },
      { name: 'xsetbv' },
      { name: 'mov rax, imm64', imm: CODE + 0x800n },
      { name: 'lidt [rax]' },
      { name: 'ret' },
    ]);
    c.pokeLinear(CODE, a.bytes);
    const p = c.run({ entry: CODE, returnTo: k.symbol('cpu_idle'), regs: { rsp: k.taskStackTop(0) } });
    const msr = await t.nextVcpuEvent();
    expect(msr.data).toEqual({ msr: MSR.LSTAR, old_value: entry, new_value: evil });
    expect(msr.arch.regs.rip).toBe(a.insns[3]!.at);
    t.reply(msr, 'CONTINUE', entry);
    const x = await t.nextVcpuEvent();
    expect(x.data).toEqual({ xcr: 0, old_value: 7n, new_value: 3n });
    expect(x.arch.regs.rip).toBe(a.insns[7]!.at);
    t.reply(x, 'CONTINUE');
    const d = await t.nextVcpuEvent();
    expect(d.data).toEqual({ descriptor: 1, write: 1 });
    expect(d.arch.regs.rip).toBe(a.insns[9]!.at);
    await t.ok('VCPU_SET_REGISTERS', { vcpu: 0, ...d.arch.regs, rip: d.arch.regs.rip + len('lidt [rax]') });
    t.reply(d, 'RETRY');
    expect(await p).toMatchObject({ outcome: 'completed' });
    expect(c.cpu.readMsr(MSR.LSTAR)).toBe(entry);
    expect(c.cpu.xcr0).toBe(3n);
    expect(c.cpu.sregs.idt.base).toBe(k.symbol('idt_table'));
  });
});

describe('4- and 2-byte stores, REP MOVSB, SYSCALL (table encodings, ground-truth lengths)', () => {
  it('a run executes `mov [rdi], eax` (2 bytes) and `mov [rdi], ax` (3 bytes): only the low 4 / 2 bytes of RAX land', async () => {
    const h = await vm();
    const c = h.vm.vcpus[0]!;
    const k = h.vm.kernel;
    const t = k.symbol('sim_counters');
    const a = assemble(CODE, [
      { name: 'mov rdi, imm64', imm: t },
      { name: 'mov rax, imm64', imm: 0x1122334455667788n },
      { name: 'mov [rdi], eax' },
      { name: 'mov rdi, imm64', imm: t + 8n },
      { name: 'mov [rdi], ax' },
      { name: 'ret' },
    ]);
    expect(c.pokeLinear(CODE, a.bytes)).toBe(true);
    const r = await c.run({ entry: CODE, returnTo: k.symbol('cpu_idle'), regs: { rsp: k.taskStackTop(0) } });
    expect(r.outcome).toBe('completed');
    expect(r.trace.map((x) => [x.rip, x.name, x.length])).toEqual([
      [CODE, 'mov rdi, imm64', 10],
      [CODE + 10n, 'mov rax, imm64', 10],
      [CODE + 20n, 'mov [rdi], eax', 2],
      [CODE + 22n, 'mov rdi, imm64', 10],
      [CODE + 32n, 'mov [rdi], ax', 3],
      [CODE + 35n, 'ret', 1],
    ]);
    expect(h.vm.memory.read(k.symbolPhys('sim_counters'), 16)!.toString('hex')).toBe('8877665500000000' + '8877000000000000');
  });

  it('REP MOVSB copies RCX bytes across pages; a PF RETRY mid-copy leaves RSI/RDI/RCX at the iteration reached and RIP at the instruction', async () => {
    const h = await vm();
    const c = h.vm.vcpus[0]!;
    const k = h.vm.kernel;
    const src = MODULES_VADDR + 0x310000n - 0x10n; // 16 bytes before a page boundary
    const dstGpa = k.symbolPhys('sim_protected_data');
    const dst = k.symbol('sim_protected_data') - 0x8n; // 8 bytes in the page before the protected one
    const data = Buffer.from([...Array(32).keys()].map((i) => 0xa0 + i));
    expect(c.pokeLinear(src, data)).toBe(true);
    await h.tool.ok('VM_SET_PAGE_ACCESS', { entries: [{ gpa: dstGpa, access: 5 }] });
    await enable(h.tool, events.PF.id);
    const a = assemble(CODE, [{ name: 'rep movsb' }, { name: 'ret' }]);
    expect(a.insns[0]!.length).toBe(2);
    expect(c.pokeLinear(CODE, a.bytes)).toBe(true);
    const p = c.run({ entry: CODE, returnTo: k.symbol('cpu_idle'), regs: { rsp: k.taskStackTop(0), rsi: src, rdi: dst, rcx: 32n } });
    const e = await h.tool.nextVcpuEvent();
    expect(e.arch.regs.rip).toBe(CODE);
    expect(e.data).toEqual({ gva: k.symbol('sim_protected_data'), gpa: dstGpa, access: 2 });
    // The 8 bytes before the protected page were copied; the registers say so.
    expect([e.arch.regs.rsi, e.arch.regs.rdi, e.arch.regs.rcx]).toEqual([src + 8n, dst + 8n, 24n]);
    await h.tool.ok('VM_SET_PAGE_ACCESS', { entries: [{ gpa: dstGpa, access: 7 }] });
    h.tool.reply(e, 'RETRY');
    const r = await p;
    expect(r.outcome).toBe('completed');
    expect(r.trace.map((x) => [x.rip, x.name, x.result])).toEqual([
      [CODE, 'rep movsb', 'retry'],
      [CODE, 'rep movsb', 'retired'],
      [CODE + 2n, 'ret', 'retired'],
    ]);
    expect(c.peekLinear(dst, 32)!.equals(data)).toBe(true);
    expect([c.cpu.regs.rsi, c.cpu.regs.rdi, c.cpu.regs.rcx]).toEqual([src + 32n, dst + 32n, 0n]);
  });

  it('SYSCALL from CPL 3: RIP ← LSTAR, RCX ← next RIP, R11 ← RFLAGS, RFLAGS masked by SFMASK, CPL 0; #UD with EFER.SCE = 0', async () => {
    const h = await vm();
    const c = h.vm.vcpus[0]!;
    const k = h.vm.kernel;
    const entry = k.symbol('entry_SYSCALL_64');
    expect(c.cpu.readMsr(MSR.LSTAR)).toBe(entry);
    c.cpu.writeCr(3, k.processes[0]!.cr3);
    const ut = k.processes[0]!.text.gva;
    expect(c.pokeLinear(ut, encodeInstruction('syscall'))).toBe(true);
    c.cpu.sregs = { ...c.cpu.sregs, ss: { ...c.cpu.sregs.ss, dpl: 3 }, cs: { ...c.cpu.sregs.cs, dpl: 3 } };
    c.cpu.regs.rflags = 0x202n | (1n << 8n); // IF, TF
    const r = await c.run({ entry: ut, until: entry });
    expect(r.outcome).toBe('completed');
    expect(r.trace).toEqual([{ rip: ut, name: 'syscall', length: 2, result: 'retired', times: 1 }]);
    expect(c.cpu.regs.rcx).toBe(ut + 2n);
    expect(c.cpu.regs.r11).toBe(0x302n);
    const sfmask = c.cpu.readMsr(MSR.SFMASK)!;
    expect(c.cpu.regs.rflags).toBe((0x302n & ~sfmask) | 2n);
    expect(c.cpu.cpl).toBe(0);
    expect(c.cpu.sregs.cs.selector).toBe(Number((c.cpu.readMsr(MSR.STAR)! >> 32n) & 0xfffcn));
    c.cpu.sregs = { ...c.cpu.sregs, efer: c.cpu.sregs.efer & ~1n, ss: { ...c.cpu.sregs.ss, dpl: 3 }, cs: { ...c.cpu.sregs.cs, dpl: 3 } };
    expect(await c.run({ entry: ut })).toMatchObject({ outcome: 'exception', vector: 6, rip: ut });
  });
});
