/**
 * The fleet's benign workload: seeded per vCPU, made of the synthetic kernel's own routines — boot-time
 * MSR and XCR0 writes (cold boot), memory traffic, CR3 switches, module loads into the module area,
 * text_poke from its routine, hypercalls, SIDT — at the configured rate; and scenarios run by the
 * Simulator on chosen VMs once they are hooked.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { events } from '@periscope/kvmi';

import { loadScenario, MODULES_VADDR, MSR, shippedScenarioFiles, Simulator } from '../src/index.js';
import { ToolServer, type ToolConn, type VcpuEvent } from './support/tool.js';

const cleanups: Array<() => Promise<void> | void> = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

/** Enable the events the workload produces on every vCPU, write-protect the kernel text, answer CONTINUE (echo). */
async function watch(t: ToolConn, sim: Simulator, vcpus: number): Promise<{ seen: VcpuEvent[]; stop: () => void }> {
  const k = sim.vms[0]!.kernel; // the test may know the layout: it checks the simulator, it is not a tool
  const text: Array<{ gpa: bigint; access: number }> = [];
  for (let off = 0n; off < 0x10000n; off += 0x1000n) text.push({ gpa: k.textPhys + off, access: 5 });
  await t.ok('VM_SET_PAGE_ACCESS', { entries: text });
  for (let v = 0; v < vcpus; v++) {
    for (const e of ['CR', 'MSR', 'XSETBV', 'HYPERCALL', 'DESCRIPTOR', 'PF'] as const) await t.ok('VCPU_CONTROL_EVENTS', { vcpu: v, event_id: events[e].id, enable: 1 });
    await t.ok('VCPU_CONTROL_CR', { vcpu: v, cr: 3, enable: 1 });
    await t.ok('VCPU_CONTROL_MSR', { vcpu: v, msr: MSR.LSTAR, enable: 1 });
  }
  const seen: VcpuEvent[] = [];
  let running = true;
  void (async () => {
    while (running && !t.isClosed) {
      let e: VcpuEvent;
      try {
        e = await t.nextVcpuEvent(200);
      } catch {
        continue;
      }
      seen.push(e);
      const d = e.data as { new_value?: bigint } | null;
      t.reply(e, 'CONTINUE', e.event.replyData ? (d?.new_value ?? 0n) : undefined);
    }
  })();
  return { seen, stop: () => void (running = false) };
}

async function workloadRun(seed: number, ms: number): Promise<{ sim: Simulator; seen: VcpuEvent[] }> {
  const server = await ToolServer.listen();
  cleanups.push(() => server.close());
  const sim = new Simulator({ introspector: server.path, vms: 1, vcpus: 2, seed, activity: 300, coldBoot: true, workloadDelayMs: 300, jitterMs: 0 });
  cleanups.push(() => sim.qemus.forEach((q) => q.stop()));
  sim.start();
  const t = await server.next();
  await sim.qemus[0]!.waitHooked();
  const w = await watch(t, sim, 2);
  await new Promise((r) => setTimeout(r, ms));
  w.stop();
  return { sim, seen: w.seen };
}

describe('the benign workload', () => {
  it('boots each vCPU (LSTAR, XCR0), then switches CR3, pokes text from text_poke, loads modules, makes hypercalls and SIDTs', async () => {
    const { sim, seen } = await workloadRun(7, 1500);
    const vm = sim.vms[0]!;
    const k = vm.kernel;
    const of = (key: string): VcpuEvent[] => seen.filter((e) => e.event.key === key);
    for (const v of [0, 1]) {
      expect(of('MSR').find((e) => e.vcpu === v)?.data).toEqual({ msr: MSR.LSTAR, old_value: 0n, new_value: k.symbol('entry_SYSCALL_64') });
      expect(of('XSETBV').find((e) => e.vcpu === v)?.data).toEqual({ xcr: 0, old_value: 1n, new_value: 7n });
    }
    const pgds = new Set([k.cr3, ...k.processes.map((p) => p.cr3)]);
    expect(of('CR').length).toBeGreaterThan(5);
    expect(of('CR').every((e) => pgds.has((e.data as { new_value: bigint }).new_value))).toBe(true);
    expect(of('CR').every((e) => e.arch.regs.rip === k.symbol('native_write_cr3'))).toBe(true);
    const pokes = of('PF');
    expect(pokes.length).toBeGreaterThan(0);
    expect(pokes.every((e) => e.arch.regs.rip === k.symbol('text_poke'))).toBe(true);
    expect(pokes.every((e) => (e.data as { gpa: bigint }).gpa === k.symbolPhys('static_key_site'))).toBe(true);
    expect(of('HYPERCALL').length).toBeGreaterThan(5);
    expect(of('DESCRIPTOR').every((e) => (e.data as { descriptor: number; write: number }).write === 0)).toBe(true);
    // modules landed in the module area (magic "\x7fSIMMOD\0" at the start of some slot)
    let modules = 0;
    for (let s = 0n; s < 32n; s++) if (vm.memory.readU64(0x800000n + s * 0x10000n) === 0x00444f4d4953437fn) modules++;
    expect(modules).toBeGreaterThan(0);
    expect(sim.stats().guestActions).toBeGreaterThan(200);
    expect(MODULES_VADDR).toBe(0xffffffffc0000000n);
    const summary = await sim.shutdown();
    expect(summary.internalErrors).toBe(0);
    expect(summary.livelocks).toBe(0);
  });

  it('is deterministic per seed: the same routine calls in the same order on each vCPU', async () => {
    const key = (e: VcpuEvent): string => `${e.event.key}@${e.arch.regs.rip.toString(16)}:${JSON.stringify(e.data, (_k, v: unknown) => (typeof v === 'bigint' ? v.toString(16) : v))}`;
    const first = (seen: VcpuEvent[], v: number): string[] => seen.filter((e) => e.vcpu === v).slice(0, 40).map(key);
    // Long enough for 40 events per vCPU even on a loaded machine; b and c are compared by prefix.
    const a = await workloadRun(11, 2500);
    const b = await workloadRun(11, 700);
    const c = await workloadRun(12, 700);
    for (const v of [0, 1]) {
      expect(first(a.seen, v).length).toBe(40);
      expect(first(b.seen, v)).toEqual(first(a.seen, v).slice(0, first(b.seen, v).length));
    }
    expect(first(c.seen, 0)).not.toEqual(first(a.seen, 0));
  });
});

describe('scenarios in the fleet', () => {
  it('run on the chosen VMs once hooked; the reports are in the summary', async () => {
    const server = await ToolServer.listen();
    cleanups.push(() => server.close());
    const files = shippedScenarioFiles();
    const scenarios = [await loadScenario(files.find((f) => f.endsWith('benign-module-load.yaml'))!), await loadScenario(files.find((f) => f.endsWith('attack-lstar-hijack.yaml'))!)];
    const sim = new Simulator({ introspector: server.path, vms: 3, seed: 2, scenarios, scenarioVms: [0, 2], scenarioDelayMs: 50 });
    cleanups.push(() => sim.qemus.forEach((q) => q.stop()));
    sim.start();
    for (let i = 0; i < 3; i++) await server.next();
    const reports = await sim.scenariosDone();
    expect(reports.map((r) => [r.vm, r.scenario, r.passed]).sort()).toEqual([
      ['sim-vm-0', 'lstar-hijack', false],
      ['sim-vm-0', 'module-load', true],
      ['sim-vm-2', 'lstar-hijack', false],
      ['sim-vm-2', 'module-load', true],
    ]);
    const summary = await sim.shutdown();
    expect(summary.scenarios).toHaveLength(4);
  });
});
