/**
 * The paging and permission rules through the simulator's guest path — the guest actions (`access`:
 * `mov [rdi], rax` / `mov rax, [rdi]` placed at RIP and executed) and runs (fetches) — for each page
 * size: not present, U/S, CR0.WP, SMEP, SMAP (with STAC), NX, the A/D bits the CPU sets, and the EPT
 * access bits (one PF event per violated bit, R/W/X order; TRANSLATE_GVA). The rules themselves are
 * @periscope/x86's (tested there against the SDM); here we test that the simulated CPU applies them,
 * with the architectural error codes reaching the guest (CR2, deliveredExceptions).
 */
import { afterEach, describe, expect, it } from 'vitest';
import { events } from '@periscope/kvmi';
import { PAGE_SIZE_1G, PAGE_SIZE_2M, PAGE_SIZE_4K, PageTableBuilder, PTE_A, PTE_D, type PageFlags, type PageSize } from '@periscope/x86';

import { SimVm, type SimVcpu } from '../src/index.js';
import { startVm, type VmHarness } from './support/tool.js';

const WP = 1n << 16n;
const SMEP = 1n << 20n;
const SMAP = 1n << 21n;
/** Where the test mappings live: PML4 slot 32, unused by the kernel. */
const BASE = 0x0000_1000_0000_0000n;
/** The gpa every test mapping reaches (1 GiB pages map gpa 0, so the target sits at BASE + DATA there). */
const DATA = 0x3000000n;

const cleanups: Array<() => Promise<void> | void> = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

interface Rig {
  vm: SimVm;
  c: SimVcpu;
  /** Map the target page with these flags (the page size of the suite). */
  map(flags: PageFlags): void;
  unmap(): void;
  /** The target's linear address (+0x10 into the page's data). */
  gva: bigint;
  gpa: bigint;
  leafGpa(): bigint;
  lastFault(): { vector: number; errorCode: number | undefined } | undefined;
  /** Run `code` placed at the target: a fetch from the target page (returns to cpu_idle). */
  runAtTarget(): ReturnType<SimVcpu['run']>;
}

function rig(vm: SimVm, size: PageSize): Rig {
  const b = new PageTableBuilder(vm.memory.ram, { pool: { start: 0x4000000n, end: 0x4100000n }, cr3: vm.kernel.cr3, maxPhyAddr: 39 });
  const va = size === PAGE_SIZE_1G ? BASE + DATA : BASE;
  const pageVa = size === PAGE_SIZE_1G ? BASE : BASE;
  const pageGpa = size === PAGE_SIZE_1G ? 0n : DATA;
  const c = vm.vcpus[0]!;
  const level = size === PAGE_SIZE_4K ? 1 : size === PAGE_SIZE_2M ? 2 : 3;
  return {
    vm,
    c,
    map: (flags) => b.map(pageVa, pageGpa, size, flags),
    unmap: () => void b.unmap(pageVa),
    gva: va + 0x10n,
    gpa: DATA + 0x10n,
    leafGpa: () => b.entryGpa(pageVa, level as 1 | 2 | 3)!,
    lastFault: () => c.deliveredExceptions.at(-1),
    runAtTarget: () => {
      if (!c.pokeLinear(va + 0x10n, Uint8Array.of(0xc3))) throw new Error('target not mapped'); // ret
      return c.run({ entry: va + 0x10n, returnTo: vm.kernel.symbol('cpu_idle'), regs: { rsp: vm.kernel.taskStackTop(0) } });
    },
  };
}

const SIZES: ReadonlyArray<[string, PageSize]> = [['4 KiB', PAGE_SIZE_4K], ['2 MiB', PAGE_SIZE_2M], ['1 GiB', PAGE_SIZE_1G]];
const eight = (v: number): Uint8Array => new Uint8Array(8).fill(v);

describe.each(SIZES)('%s pages', (_n, size) => {
  function fresh(): Rig {
    const vm = new SimVm({ memoryMiB: 128, seed: 1, kaslrSlot: 0 });
    cleanups.push(() => vm.close());
    return rig(vm, size);
  }

  it('not present: #PF with P = 0 (read 0x0, write 0x2, fetch 0x10), CR2 = the address', async () => {
    const r = fresh();
    expect(await r.c.access({ gva: r.gva }, 'r')).toMatchObject({ outcome: 'page-fault', vector: 14 });
    expect(r.lastFault()).toEqual({ vector: 14, errorCode: 0 });
    expect(r.c.cpu.sregs.cr2).toBe(r.gva);
    expect(await r.c.access({ gva: r.gva }, 'w', { data: eight(1) })).toMatchObject({ outcome: 'page-fault' });
    expect(r.lastFault()).toEqual({ vector: 14, errorCode: 0x2 });
    const base = r.gva - 0x10n;
    const run = await r.c.run({ entry: base, regs: { rsp: r.vm.kernel.taskStackTop(0) } });
    expect(run).toMatchObject({ outcome: 'page-fault', vector: 14, rip: base });
    expect(r.lastFault()).toEqual({ vector: 14, errorCode: 0x10 }); // I/D: NXE = 1
  });

  it('CR0.WP: a supervisor write to a read-only page faults (0x3) only while WP = 1', async () => {
    const r = fresh();
    r.map({ rw: false });
    expect(await r.c.access({ gva: r.gva }, 'w', { data: eight(7) })).toMatchObject({ outcome: 'page-fault' });
    expect(r.lastFault()).toEqual({ vector: 14, errorCode: 0x3 });
    expect([...r.vm.memory.read(r.gpa, 8)!]).toEqual([...eight(0)]);
    expect(await r.c.access({ gva: r.gva }, 'r')).toMatchObject({ outcome: 'completed', data: eight(0) }); // reads are fine
    const cr0 = r.c.cpu.sregs.cr0;
    expect(await r.c.writeCr(0, cr0 & ~WP)).toMatchObject({ outcome: 'completed' });
    expect(await r.c.access({ gva: r.gva }, 'w', { data: eight(7) })).toMatchObject({ outcome: 'completed' });
    expect([...r.vm.memory.read(r.gpa, 8)!]).toEqual([...eight(7)]);
  });

  it('U/S: a user-mode read of a supervisor page faults (0x5); a user write to a read-only user page faults (0x7) even with WP = 0', async () => {
    const r = fresh();
    r.map({ rw: true });
    const cpu = r.c.cpu;
    cpu.sregs = { ...cpu.sregs, ss: { ...cpu.sregs.ss, dpl: 3 }, cs: { ...cpu.sregs.cs, dpl: 3 } }; // CPL 3
    expect(await r.c.access({ gva: r.gva }, 'r')).toMatchObject({ outcome: 'page-fault' });
    expect(r.lastFault()).toEqual({ vector: 14, errorCode: 0x5 });
    r.map({ rw: false, us: true });
    cpu.sregs = { ...cpu.sregs, cr0: cpu.sregs.cr0 & ~WP };
    expect(await r.c.access({ gva: r.gva }, 'w', { data: eight(1) })).toMatchObject({ outcome: 'page-fault' });
    expect(r.lastFault()).toEqual({ vector: 14, errorCode: 0x7 });
    expect(await r.c.access({ gva: r.gva }, 'r')).toMatchObject({ outcome: 'completed' });
  });

  it('SMEP: a supervisor fetch from a user page faults (0x11) while CR4.SMEP = 1, executes after it is cleared', async () => {
    const r = fresh();
    r.map({ us: true });
    const run = await r.runAtTarget();
    expect(run).toMatchObject({ outcome: 'page-fault', rip: r.gva });
    expect(r.lastFault()).toEqual({ vector: 14, errorCode: 0x11 });
    expect(await r.c.writeCr(4, r.c.cpu.sregs.cr4 & ~SMEP)).toMatchObject({ outcome: 'completed' });
    const ok = await r.runAtTarget();
    expect(ok).toMatchObject({ outcome: 'completed', rip: r.vm.kernel.symbol('cpu_idle') });
    expect(ok.trace[0]).toMatchObject({ rip: r.gva, name: 'ret', result: 'retired' });
  });

  it('SMAP: a supervisor read of a user page faults (0x1) unless RFLAGS.AC (STAC in copy_from_user) or CR4.SMAP = 0', async () => {
    const r = fresh();
    r.map({ us: true, rw: true });
    r.vm.memory.write(r.gpa, eight(0x5a));
    expect(await r.c.access({ gva: r.gva }, 'r')).toMatchObject({ outcome: 'page-fault' });
    expect(r.lastFault()).toEqual({ vector: 14, errorCode: 0x1 });
    const k = r.vm.kernel;
    const viaCopy = await r.c.run({ entry: k.symbol('copy_from_user'), returnTo: k.symbol('cpu_idle'), regs: { rdi: r.gva, rsp: k.taskStackTop(0) } });
    expect(viaCopy.outcome).toBe('completed');
    expect(viaCopy.trace.map((t) => t.name)).toEqual(['stac', 'mov rax, [rdi]', 'clac', 'ret']);
    expect(r.c.cpu.regs.rax).toBe(0x5a5a5a5a5a5a5a5an);
    expect(r.c.cpu.regs.rflags & (1n << 18n)).toBe(0n); // AC cleared again
    expect(await r.c.writeCr(4, r.c.cpu.sregs.cr4 & ~SMAP)).toMatchObject({ outcome: 'completed' });
    expect(await r.c.access({ gva: r.gva }, 'r')).toMatchObject({ outcome: 'completed', data: eight(0x5a) });
  });

  it('NX: a fetch from an execute-disabled page faults (0x11); without XD it executes', async () => {
    const r = fresh();
    r.map({ nx: true });
    expect(await r.runAtTarget()).toMatchObject({ outcome: 'page-fault' });
    expect(r.lastFault()).toEqual({ vector: 14, errorCode: 0x11 });
    r.map({ nx: false });
    expect(await r.runAtTarget()).toMatchObject({ outcome: 'completed' });
  });

  it('the CPU sets A on the walk and D on a write, in the leaf of this size', async () => {
    const r = fresh();
    r.map({ rw: true });
    const leaf = (): bigint => r.vm.memory.readU64(r.leafGpa())!;
    expect(leaf() & (PTE_A | PTE_D)).toBe(0n);
    await r.c.access({ gva: r.gva }, 'r');
    expect(leaf() & (PTE_A | PTE_D)).toBe(PTE_A);
    await r.c.access({ gva: r.gva }, 'w', { data: eight(2) });
    expect(leaf() & (PTE_A | PTE_D)).toBe(PTE_A | PTE_D);
  });
});

describe.each(SIZES)('EPT access bits over %s pages', (_n, size) => {
  const harnesses: VmHarness[] = [];
  afterEach(async () => {
    for (const h of harnesses.splice(0)) await h.cleanup();
  });

  it('a restricted bit raises the PF event (gva, gpa, one bit); CONTINUE performs the access; TRANSLATE_GVA walks the same tables', async () => {
    const h = await startVm({ memoryMiB: 128, seed: 2, kaslrSlot: 0, jitterMs: 0 });
    harnesses.push(h);
    const r = rig(h.vm, size);
    r.map({ rw: true });
    const t = h.tool;
    expect(await t.ok('VCPU_TRANSLATE_GVA', { vcpu: 0, gva: r.gva })).toEqual({ gpa: r.gpa });
    await t.ok('VM_SET_PAGE_ACCESS', { entries: [{ gpa: r.gpa, access: 1 }] }); // read only
    await t.ok('VCPU_CONTROL_EVENTS', { vcpu: 0, event_id: events.PF.id, enable: 1 });
    expect(await r.c.access({ gva: r.gva }, 'r')).toMatchObject({ outcome: 'completed', events: [] });
    const p = r.c.access({ gva: r.gva }, 'w', { data: eight(9) });
    const e = await t.nextVcpuEvent();
    expect(e.event.key).toBe('PF');
    expect(e.data).toEqual({ gva: r.gva, gpa: r.gpa, access: 2 });
    expect(e.arch.regs.rdi).toBe(r.gva);
    t.reply(e, 'CONTINUE');
    expect(await p).toMatchObject({ outcome: 'completed', events: [{ event: 'PF', ended: 'CONTINUE' }] });
    expect([...h.vm.memory.read(r.gpa, 8)!]).toEqual([...eight(9)]);
  });

  it('one instruction that violates two bits raises two PF events, each with one bit, fetch (X) before data (R)', async () => {
    const h = await startVm({ memoryMiB: 128, seed: 3, kaslrSlot: 0, jitterMs: 0 });
    harnesses.push(h);
    const r = rig(h.vm, size);
    r.map({ rw: true });
    const t = h.tool;
    // `mov rax, [rdi]; ret` at the target, reading the target page itself; the page allows nothing.
    r.c.pokeLinear(r.gva, Uint8Array.of(0x48, 0x8b, 0x07, 0xc3));
    h.vm.memory.writeU64(r.gpa + 0x100n, 0x1122334455667788n);
    await t.ok('VM_SET_PAGE_ACCESS', { entries: [{ gpa: r.gpa, access: 0 }] });
    await t.ok('VCPU_CONTROL_EVENTS', { vcpu: 0, event_id: events.PF.id, enable: 1 });
    const k = h.vm.kernel;
    const p = r.c.run({ entry: r.gva, returnTo: k.symbol('cpu_idle'), regs: { rdi: r.gva + 0x100n, rsp: k.taskStackTop(0) } });
    const got: unknown[] = [];
    for (let i = 0; i < 3; i++) {
      const e = await t.nextVcpuEvent();
      got.push(e.data);
      t.reply(e, 'CONTINUE');
    }
    expect(got).toEqual([
      { gva: r.gva, gpa: r.gpa, access: 4 }, // fetch of mov rax, [rdi]
      { gva: r.gva + 0x100n, gpa: r.gpa + 0x100n, access: 1 }, // its read
      { gva: r.gva + 3n, gpa: r.gpa + 3n, access: 4 }, // fetch of ret
    ]);
    expect(await p).toMatchObject({ outcome: 'completed' });
    expect(r.c.cpu.regs.rax).toBe(0x1122334455667788n);
  });
});
