/**
 * The synthetic kernel and its shipped guest OS profile: the profile file equals what the kernel's
 * layout gives; the text in guest memory matches the profile's per-page SHA-256 whatever the seeded
 * KASLR slide; and a tool derives the slide from the guest alone (`deriveSlide` fed by raw KVMI frames:
 * VCPU_GET_REGISTERS for LSTAR, VCPU_TRANSLATE_GVA, VM_READ_PHYSICAL), never from the simulator's
 * configuration (which the test reads only to check the answer).
 */
import { createHash } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';

import { afterEach, describe, expect, it } from 'vitest';

import { buildLinuxSimProfile, deriveSlide, LINUX_SIM_PROFILE_PATH, linuxSimProfile, SimError, SimVm } from '../src/index.js';
import { type RawTool, attachRawTool } from './support/raw.js';

const LSTAR = 0xc0000082;
const cleanups: Array<() => Promise<void> | void> = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

describe('the shipped guest OS profile', () => {
  it('profiles/linux-sim.json is what the kernel layout gives (UPDATE_PROFILE=1 rewrites it)', () => {
    const want = `${JSON.stringify(buildLinuxSimProfile(), null, 2)}\n`;
    if (process.env['UPDATE_PROFILE'] === '1') writeFileSync(LINUX_SIM_PROFILE_PATH, want);
    expect(readFileSync(LINUX_SIM_PROFILE_PATH, 'utf8')).toBe(want);
  });

  it('offsets from _text: sections, symbols, 16 text page hashes, the entry signature', () => {
    const p = linuxSimProfile();
    expect(p.sections.map((s) => [s.name, s.perms])).toEqual([['.text', 'r-x'], ['.rodata', 'r--'], ['.data', 'rw-'], ['.idt', 'rw-'], ['.gdt', 'rw-']]);
    expect(p.textPageSha256).toHaveLength(16);
    expect(p.offsetOf('_text')).toBe(0n);
    for (const s of ['entry_SYSCALL_64', 'text_poke', 'sys_call_table', 'idt_table', 'gdt_page', 'sim_protected_data', '__x64_sys_getpid']) {
      expect(p.symbols.has(s)).toBe(true);
    }
    expect(p.syscallEntry.signature).toHaveLength(32);
    expect(p.defaultTextBase).toBe(0xffffffff81000000n);
  });

  it('the text in guest memory hashes to the profile for every slide; the slide is seeded and 2 MiB aligned', () => {
    const p = linuxSimProfile();
    const slides = new Set<bigint>();
    for (let seed = 1; seed <= 6; seed++) {
      const vm = new SimVm({ seed });
      cleanups.push(() => vm.close());
      const k = vm.kernel;
      expect(k.slide % 0x200000n).toBe(0n);
      expect(k.text).toBe(p.defaultTextBase + k.slide);
      slides.add(k.slide);
      for (const [i, h] of p.textPageSha256.entries()) {
        const page = vm.memory.read(k.textPhys + BigInt(i) * 0x1000n, 4096)!;
        expect(createHash('sha256').update(page).digest('hex')).toBe(h);
      }
      expect(vm.memory.read(k.symbolPhys('linux_banner'), 14)!.toString('latin1')).toBe('Linux version ');
      // sys_call_table entries are slid pointers to the handlers
      expect(vm.memory.readU64(k.symbolPhys('sys_call_table', 39 * 8))).toBe(k.symbol('__x64_sys_getpid'));
    }
    expect(slides.size).toBeGreaterThan(2);
  });
});

async function attach(seed: number): Promise<{ vm: SimVm; tool: RawTool }> {
  const { vm, tool, cleanup } = await attachRawTool({ seed, vcpus: 2, apsOnline: true, jitterMs: 0 });
  cleanups.push(cleanup);
  return { vm, tool };
}

function reader(tool: RawTool): Parameters<typeof deriveSlide>[0] {
  return {
    readMsr: async (i) => (await tool.getRegisters(1, [i])).msrs.get(i)!,
    translate: (gva) => tool.translate(1, gva),
    readPhys: (gpa, n) => tool.readPhys(gpa, n),
  };
}

describe('deriveSlide (for tools)', () => {
  it('finds _text from LSTAR and the entry signature over raw KVMI frames, for several seeds', async () => {
    for (const seed of [3, 17, 99]) {
      const { vm, tool } = await attach(seed);
      const k = await deriveSlide(reader(tool));
      expect(k.slide).toBe(vm.kernel.slide);
      expect(k.textBase).toBe(vm.kernel.text);
      expect(k.textPhys).toBe(vm.kernel.textPhys);
      expect(k.symbol('idt_table')).toBe(vm.vcpus[0]!.cpu.sregs.idt.base);
      expect(k.symbolPhys('text_poke')).toBe(vm.kernel.symbolPhys('text_poke'));
      // without TRANSLATE_GVA, the profile's kernel map gives the same answer
      expect((await deriveSlide({ readMsr: reader(tool).readMsr, readPhys: reader(tool).readPhys })).textPhys).toBe(k.textPhys);
    }
  });

  it('refuses a guest that does not match: LSTAR hijacked, or the entry bytes changed', async () => {
    const { vm, tool } = await attach(8);
    vm.vcpus[1]!.setMsrFromHost(LSTAR, 0xffffffffc0001000n);
    await expect(deriveSlide(reader(tool))).rejects.toMatchObject({ code: 'slide-not-derived' });
    vm.vcpus[1]!.setMsrFromHost(LSTAR, vm.kernel.symbol('entry_SYSCALL_64') + 0x200000n); // aligned, but the wrong bytes
    await expect(deriveSlide(reader(tool))).rejects.toThrow(SimError);
    vm.vcpus[1]!.setMsrFromHost(LSTAR, vm.kernel.symbol('entry_SYSCALL_64'));
    await tool.writePhys(vm.kernel.symbolPhys('entry_SYSCALL_64'), Buffer.from([0x90]));
    await expect(deriveSlide(reader(tool))).rejects.toThrow(/do not match the profile's signature/);
  });
});
