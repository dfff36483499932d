/**
 * The minimal guest: sparse memory with holes, the page-table walker in every paging mode, the boot
 * page tables, the CPU state helpers, and the catalog ↔ simulator state-check coverage.
 */
import { describe, expect, it } from 'vitest';
import { commands } from '@periscope/kvmi';

import { CpuState, GuestMemory, KERNEL_BASE, MSR, PAGE_TABLE_BASE, SIMULATED_STATE_CHECKS, SimVm, translate } from '../src/index.js';

describe('guest memory', () => {
  it('is sparse, with a gfn limit and holes', () => {
    const m = new GuestMemory({ memoryMiB: 4, holes: [[0xa0, 0xc0]] });
    expect(m.limitGfn).toBe(1024);
    expect(m.isBackedGfn(0x9f)).toBe(true);
    expect(m.isBackedGfn(0xa0)).toBe(false);
    expect(m.isBackedGfn(0xbf)).toBe(false);
    expect(m.isBackedGfn(0xc0)).toBe(true);
    expect(m.isBackedGfn(1024)).toBe(false);
    expect(m.read(0x1000n, 16)).toEqual(Buffer.alloc(16));
    expect(m.residentPages).toBe(0);
    expect(m.write(0x1ffcn, Uint8Array.of(1, 2, 3, 4, 5, 6))).toBe(true); // across a page boundary
    expect([...m.read(0x1ffcn, 6)!]).toEqual([1, 2, 3, 4, 5, 6]);
    expect(m.residentPages).toBe(2);
    expect(m.write(0x9fffen, Uint8Array.of(1, 2, 3, 4))).toBe(false); // runs into the hole
    expect(m.read(0x9fff0n, 0x20)).toBeNull();
    expect(m.maxGpa).toBe((4n << 20n) - 1n);
  });
});

describe('page-table walks', () => {
  const vm = new SimVm({ memoryMiB: 16 });
  const regs = vm.vcpus[0]!.cpu.paging;

  it('the boot tables map identity (4 KiB then 2 MiB pages) and the higher half', () => {
    expect(regs.cr3).toBe(PAGE_TABLE_BASE);
    expect(translate(vm.memory, regs, 0x1234n)).toBe(0x1234n);
    expect(translate(vm.memory, regs, 0x345678n)).toBe(0x345678n);
    expect(translate(vm.memory, regs, KERNEL_BASE + 0xabcdefn)).toBe(0xabcdefn);
    expect(translate(vm.memory, regs, (16n << 20n) + 5n)).toBeNull(); // beyond the mapped RAM
    expect(translate(vm.memory, regs, 0x0000800000000000n)).toBeNull(); // non-canonical
    expect(translate(vm.memory, { ...regs, cr3: 0x4000000n }, 0x1000n)).toBeNull(); // CR3 outside RAM
  });

  it('no paging, 32-bit (4 MiB pages) and PAE walks', () => {
    const m = new GuestMemory({ memoryMiB: 8 });
    expect(translate(m, { cr0: 1n, cr3: 0n, cr4: 0n, efer: 0n }, 0x12345678n)).toBe(0x12345678n);
    // 32-bit: PD at 0x1000, PDE[1] = 4 MiB page at 0x400000 (PS, needs CR4.PSE), PDE[2] → PT at 0x2000.
    const w32 = (at: bigint, v: number): void => void m.write(at, Buffer.from(new Uint32Array([v]).buffer));
    w32(0x1000n + 4n, 0x400000 | 0x83);
    w32(0x1000n + 8n, 0x2000 | 0x3);
    w32(0x2000n + 3n * 4n, 0x7000 | 0x3);
    const r32 = { cr0: 0x80000001n, cr3: 0x1000n, cr4: 0x10n, efer: 0n };
    expect(translate(m, r32, 0x00412345n)).toBe(0x412345n);
    expect(translate(m, r32, 0x00803abcn)).toBe(0x7abcn);
    expect(translate(m, r32, 0x00c00000n)).toBeNull();
    // PAE: PDPT at 0x3000 (32-byte aligned), PDPTE[0] → PD 0x4000, PDE[0] → 2 MiB page at 0x600000.
    m.writeU64(0x3000n, 0x4000n | 1n);
    m.writeU64(0x4000n, 0x600000n | 0x83n);
    expect(translate(m, { cr0: 0x80000001n, cr3: 0x3000n, cr4: 0x20n, efer: 0n }, 0x1abcdn)).toBe(0x61abcdn);
    expect(translate(m, { cr0: 0x80000001n, cr3: 0x3000n, cr4: 0x20n, efer: 0n }, 0x40000000n)).toBeNull();
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
});

describe('catalog coverage', () => {
  it('the simulator answers exactly the catalog\'s state checks', () => {
    const keys = new Set<string>();
    for (const c of Object.values(commands)) for (const k of c.checks) if (k.kind === 'state') keys.add(k.key);
    expect([...keys].sort()).toEqual([...SIMULATED_STATE_CHECKS].sort());
  });
});
