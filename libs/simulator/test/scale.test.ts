/**
 * Many VMs in one process, each with its own QEMU and socket: 256 active VMs × 4 vCPUs, and 1024
 * idle VMs × 1 vCPU, through the real handshake, ending with a PREUNHOOK shutdown.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { events } from '@periscope/kvmi';

import { Simulator } from '../src/index.js';
import { respond } from './support/responder.js';
import { ToolServer, type ToolConn } from './support/tool.js';

const cleanups: Array<() => Promise<void> | void> = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

async function collect(server: ToolServer, n: number): Promise<ToolConn[]> {
  const out: ToolConn[] = [];
  while (out.length < n) out.push(await server.next(30_000));
  return out;
}

describe('many VMs', () => {
  it('256 active VMs × 4 vCPUs: every VM hooked, commands and events on all of them, clean shutdown', async () => {
    const server = await ToolServer.listen();
    cleanups.push(() => server.close());
    const sim = new Simulator({ introspector: server.path, vms: 256, vcpus: 4, seed: 11, jitterMs: 1, reconnectSeconds: 0.1 });
    cleanups.push(async () => {
      for (const q of sim.qemus) q.stop();
    });
    sim.start();
    const tools = await collect(server, 256);
    await Promise.all(sim.qemus.map((q) => q.waitHooked()));
    expect(sim.stats().connected).toBe(256);

    const uuids = new Set(tools.map((t) => t.hello.uuidText));
    expect(uuids.size).toBe(256);
    await Promise.all(
      tools.map(async (t) => {
        expect(await t.ok('VM_GET_INFO', {})).toEqual({ vcpu_count: 4 });
        await t.ok('VM_CONTROL_EVENTS', { event_id: events.UNHOOK.id, enable: 1 });
        for (let v = 0; v < 4; v++) await t.ok('VCPU_CONTROL_EVENTS', { vcpu: v, event_id: events.HYPERCALL.id, enable: 1 });
      }),
    );
    const loops = tools.map((t) => respond(t));
    // Every vCPU of every VM makes a KVMI hypercall; each is answered by its tool.
    const results = await Promise.all(sim.vms.flatMap((vm) => vm.vcpus.map((c) => c.vmcall())));
    expect(results.every((r) => r.value === 0n && r.events.length === 1 && r.events[0]!.ended === 'CONTINUE')).toBe(true);
    expect(sim.stats().eventsSent).toBe(1024);

    const summary = await sim.shutdown();
    await Promise.all(loops.map((l) => l.done));
    expect(summary.shutdown).toEqual({ preunhookSent: 256, closedByTool: 256, timedOut: 0, notHooked: 0 });
    expect(summary.internalErrors).toBe(0);
    expect(summary.hardErrors).toBe(0);
    expect(sim.vms.every((v) => !v.hooked)).toBe(true);
  }, 60_000);

  it('1024 idle VMs × 1 vCPU, each on its own socket', async () => {
    const server = await ToolServer.listen();
    cleanups.push(() => server.close());
    const sim = new Simulator({ introspector: server.path, vms: 1024, vcpus: 1, seed: 5, reconnectSeconds: 0.2, memoryMiB: 32 });
    cleanups.push(async () => {
      for (const q of sim.qemus) q.stop();
    });
    sim.start();
    const tools = await collect(server, 1024);
    await Promise.all(sim.qemus.map((q) => q.waitHooked()));
    const versions = await Promise.all(tools.map((t) => t.ok('GET_VERSION', {})));
    expect(versions.every((v) => v.version === 1)).toBe(true);
    expect(sim.stats().connected).toBe(1024);
    const summary = await sim.shutdown(); // UNHOOK event not enabled: PREUNHOOK fails, immediate unhook
    expect(summary.shutdown.preunhookSent).toBe(0);
    expect(summary.vms).toBe(1024);
    await Promise.all(tools.map((t) => t.closed));
  }, 120_000);
});
