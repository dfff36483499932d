/**
 * The guest model's plumbing: RAM as the x86 sparse file `<run dir>/<uuid>.ram` with a gfn limit and
 * holes, bounded descriptors, the boot page tables, the per-vCPU state, and the catalog ↔ simulator
 * state-check coverage. (Rules and instructions: paging-rules.test.ts, execution.test.ts.)
 */
import { existsSync, mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterEach, describe, expect, it } from 'vitest';
import { commands } from '@periscope/kvmi';
import { GuestRam, INVALID_GPA, translate } from '@periscope/x86';

import {
  CpuState,
  KERNEL_BASE,
  MSR,
  openRamFiles,
  PAGE_TABLE_BASE,
  ramFdPoolSize,
  setRamFdPoolSize,
  SIMULATED_STATE_CHECKS,
  SimError,
  SimVm,
  USER_DATA,
  USER_TEXT,
} from '../src/index.js';

const cleanups: Array<() => void> = [];
afterEach(() => {
  for (const c of cleanups.splice(0).reverse()) c();
});

function scratch(): string {
  const d = mkdtempSync(join(tmpdir(), 'sim-guest-'));
  cleanups.push(() => rmSync(d, { recursive: true, force: true }));
  return d;
}

describe('guest RAM: a sparse file, offset = GPA', () => {
  it('lives at <runDir>/<uuid>.ram, sparse, with a gfn limit and holes; another descriptor sees the same bytes', () => {
    const dir = scratch();
    const vm = new SimVm({ runDir: dir, memoryMiB: 64, holes: [[0xa0, 0xc0], [0x3000, 0x3100]] });
    cleanups.push(() => vm.close());
    const m = vm.memory;
    expect(m.path).toBe(join(dir, `${vm.uuidText}.ram`));
    expect(vm.uuidText).toMatch(/^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
    expect(statSync(m.path).size).toBe(64 * 1024 * 1024);
    expect(m.allocatedBytes).toBeLessThan(2 * 1024 * 1024); // the kernel and page tables only
    expect(m.limitGfn).toBe(64 * 256);
    expect(m.maxGpa).toBe((64n << 20n) - 1n);
    expect([m.isBackedGfn(0x9f), m.isBackedGfn(0xa0), m.isBackedGfn(0xbf), m.isBackedGfn(0xc0)]).toEqual([true, false, false, true]);
    expect([m.isBackedGfn(0x2fff), m.isBackedGfn(0x3000), m.isBackedGfn(0x30ff), m.isBackedGfn(0x3100)]).toEqual([true, false, false, true]);
    expect(m.isBackedGfn(64 * 256)).toBe(false);
    expect(m.write(0x5ffcn, Uint8Array.of(1, 2, 3, 4, 5, 6))).toBe(true); // across a page boundary
    expect([...m.read(0x5ffcn, 6)!]).toEqual([1, 2, 3, 4, 5, 6]);
    expect(m.write(0x9fffen, Uint8Array.of(1, 2, 3, 4))).toBe(false); // runs into the hole: nothing written
    expect([...m.read(0x9fffen, 2)!]).toEqual([0, 0]);
    expect(m.read(0x9fff0n, 0x20)).toBeNull();
    expect(m.read(64n << 20n, 1)).toBeNull();
    // The guest agent's /dev/kvmmem model maps the same file: offset = GPA, no cache in between.
    const view = GuestRam.open({ path: m.path, gfnLimit: BigInt(m.limitGfn), holes: [{ start: 0xa0n, end: 0xc0n }] });
    cleanups.push(() => view.close());
    expect([...view.read(0x5ffcn, 6)]).toEqual([1, 2, 3, 4, 5, 6]);
    view.write(0x7000n, Uint8Array.of(0xab));
    expect(m.read(0x7000n, 1)![0]).toBe(0xab);
  });

  it('close() removes the file of a default (temporary) run dir, keeps it in a given one; later accesses throw', () => {
    const tmp = new SimVm({ seed: 2 });
    const p = tmp.memory.path;
    expect(existsSync(p)).toBe(true);
    tmp.close();
    expect(existsSync(p)).toBe(false);
    expect(() => tmp.memory.read(0n, 1)).toThrow(SimError);
    const dir = scratch();
    const kept = new SimVm({ seed: 2, runDir: dir });
    kept.close();
    expect(existsSync(kept.memory.path)).toBe(true);
    // Two live VMs of one process never share a RAM file.
    const a = new SimVm({ seed: 3, runDir: dir });
    cleanups.push(() => a.close());
    expect(() => new SimVm({ seed: 3, runDir: dir })).toThrow(/another VM of this process uses/);
  });

  it('descriptors are bounded: VMs beyond the pool are parked and re-opened on use', () => {
    const before = ramFdPoolSize();
    setRamFdPoolSize(4);
    cleanups.push(() => setRamFdPoolSize(before));
    const vms = Array.from({ length: 10 }, (_, i) => new SimVm({ index: i, seed: 9 }));
    cleanups.push(() => vms.forEach((v) => v.close()));
    expect(openRamFiles()).toBeLessThanOrEqual(4);
    for (const [i, v] of vms.entries()) v.memory.writeU64(0x6000n, BigInt(i) + 0x100n);
    expect(openRamFiles()).toBeLessThanOrEqual(4);
    for (const [i, v] of vms.entries()) expect(v.memory.readU64(0x6000n)).toBe(BigInt(i) + 0x100n);
  });

  it('needs 32 MiB for the kernel; a hole over the kernel layout is refused', () => {
    expect(() => new SimVm({ memoryMiB: 16 })).toThrow(/memoryMiB must be an integer ≥ 32/);
    expect(() => new SimVm({ holes: [[0x800, 0x801]] })).toThrow(/a memory hole covers the kernel's layout/);
  });
});

describe('the boot page tables (x86 PageTableBuilder)', () => {
  it('identity (physmap) and kernel maps of min(RAM, 1 GiB), the module area, two processes', () => {
    const vm = new SimVm({ memoryMiB: 64, seed: 6 });
    cleanups.push(() => vm.close());
    const ram = vm.memory.ram;
    const k = vm.kernel;
    expect(k.cr3).toBe(PAGE_TABLE_BASE);
    expect(vm.vcpus[0]!.cpu.sregs.cr3).toBe(PAGE_TABLE_BASE);
    expect(vm.memory.readU64(PAGE_TABLE_BASE)).toBe(0x71003n); // PML4[0] → PDPT 0x71000, P|RW (supervisor tables)
    const t = (gva: bigint, cr3 = k.cr3): bigint => translate(ram, cr3, gva, { maxPhyAddr: 39 });
    expect(t(0x1234n)).toBe(0x1234n);
    expect(t(0x345678n)).toBe(0x345678n);
    expect(t(KERNEL_BASE + 0xabcdefn)).toBe(0xabcdefn);
    expect(t(k.text)).toBe(k.textPhys);
    expect(t(k.symbol('idt_table'))).toBe(k.symbolPhys('idt_table'));
    expect(t(0xffffffffc0000000n)).toBe(0x800000n); // MODULES_VADDR
    expect(t(64n << 20n)).toBe(INVALID_GPA); // beyond RAM
    expect(t(0x0000800000000000n)).toBe(INVALID_GPA); // non-canonical
    expect(t(0xffff888012345abcn)).toBe(INVALID_GPA); // no direct map at PAGE_OFFSET
    // A process: user pages low, the kernel half shared, no physmap alias.
    const p = k.processes[0]!;
    expect(t(USER_TEXT, p.cr3)).toBe(p.text.gpa);
    expect(t(USER_DATA, p.cr3)).toBe(p.data.gpa);
    expect(t(k.text, p.cr3)).toBe(k.textPhys);
    expect(t(0x1234n, p.cr3)).toBe(INVALID_GPA);
    expect(t(USER_TEXT)).toBe(USER_TEXT); // in the kernel's tables that is the physmap
  });
});

describe('CPU state', () => {
  it('mode follows EFER.LMA/CS.L and CR0.PE/CS.DB; EFER and APIC_BASE are MSRs and sregs at once', () => {
    const c = new CpuState({ apicId: 0, bsp: true, cr3: 0x1000n, xsaveFeatures: 7n, rip: 0n, rsp: 0n });
    expect(c.mode).toBe(8);
    c.sregs = { ...c.sregs, cs: { ...c.sregs.cs, l: 0, db: 1 } };
    expect(c.mode).toBe(4);
    c.sregs = { ...c.sregs, cr0: 0n };
    expect(c.mode).toBe(2);
    expect(c.writeMsr(MSR.EFER, 0x501n)).toBe(true);
    expect(c.sregs.efer).toBe(0x501n);
    expect(c.readMsr(MSR.APIC_BASE)).toBe(0xfee00900n);
    expect(c.writeMsr(0x999, 1n)).toBe(false);
    expect(c.eventArch().msrs.efer).toBe(0x501n);
  });

  it('per vCPU: booted MSRs point into the kernel; an AP not yet up has reset MSRs and XCR0 = 1; CPUID has SMEP and SMAP', () => {
    const vm = new SimVm({ vcpus: 2, seed: 8 });
    cleanups.push(() => vm.close());
    const [bsp, ap] = [vm.vcpus[0]!.cpu, vm.vcpus[1]!.cpu];
    expect(bsp.readMsr(MSR.LSTAR)).toBe(vm.kernel.symbol('entry_SYSCALL_64'));
    expect(bsp.readMsr(MSR.CSTAR)).toBe(vm.kernel.symbol('entry_SYSCALL_compat'));
    expect(bsp.readMsr(MSR.STAR)).toBe(0x0023001000000000n);
    expect(bsp.xcr0).toBe(7n);
    expect(bsp.sregs.idt).toEqual({ base: vm.kernel.symbol('idt_table'), limit: 0xfff });
    expect(bsp.sregs.gdt).toEqual({ base: vm.kernel.symbol('gdt_page'), limit: 0x7f });
    expect(bsp.sregs.cr4 & (3n << 20n)).toBe(3n << 20n); // SMEP | SMAP
    expect(bsp.sregs.cr0 & (1n << 16n)).toBe(1n << 16n); // WP
    expect(ap.readMsr(MSR.LSTAR)).toBe(0n);
    expect(ap.xcr0).toBe(1n);
    expect(bsp.findCpuid(7, 0)!.ebx & ((1 << 7) | (1 << 20))).toBe((1 << 7) | (1 << 20));
    expect(bsp.maxPhyAddr).toBe(39);
    // the same slide for the same seed and index, another for another seed
    const again = new SimVm({ vcpus: 2, seed: 8 });
    cleanups.push(() => again.close());
    expect(again.kernel.slide).toBe(vm.kernel.slide);
  });
});

describe('catalog coverage', () => {
  it("the simulator answers exactly the catalog's state checks", () => {
    const keys = new Set<string>();
    for (const c of Object.values(commands)) for (const k of c.checks) if (k.kind === 'state') keys.add(k.key);
    expect([...keys].sort()).toEqual([...SIMULATED_STATE_CHECKS].sort());
  });
});
