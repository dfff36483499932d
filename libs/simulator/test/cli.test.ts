/**
 * `periscope sim` (runSimCli): options through @periscope/config, the live status, the clean PREUNHOOK
 * shutdown and the final JSON summary.
 */
import { existsSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterEach, describe, expect, it } from 'vitest';
import { events } from '@periscope/kvmi';

import { runSimCli, shippedScenarioFiles, type SimSummary } from '../src/index.js';
import { respond } from './support/responder.js';
import { ToolServer } from './support/tool.js';

const cleanups: Array<() => Promise<void> | void> = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

function io(signal?: AbortSignal): { out: string[]; err: string[]; io: Parameters<typeof runSimCli>[1] } {
  const out: string[] = [];
  const err: string[] = [];
  return {
    out,
    err,
    io: { stdout: (t) => out.push(t), stderr: (t) => err.push(t), handleSignals: false, isTTY: false, ...(signal ? { signal } : {}) },
  };
}

describe('periscope sim', () => {
  it('runs VMs against an introspector, reports status, shuts down through PREUNHOOK and prints a JSON summary', async () => {
    const server = await ToolServer.listen();
    cleanups.push(() => server.close());
    const dir = mkdtempSync(join(tmpdir(), 'psim-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    writeFileSync(join(dir, 'key'), 'sim-secret');
    writeFileSync(join(dir, 'host.json'), JSON.stringify({ singlestep: false }));
    const ac = new AbortController();
    const o = io(ac.signal);
    const run = runSimCli(
      [
        '--introspector', server.path, '--vms', '3', '--vcpus', '2', '--seed', '9', '--handshake', '96',
        '--qemu-key-file', join(dir, 'key'), '--host-profile', join(dir, 'host.json'),
        '--status-interval', '50ms', '--json', '--activity', '200',
      ],
      o.io,
    );
    const tools = [await server.next(), await server.next(), await server.next()];
    const loops = await Promise.all(
      tools.map(async (t) => {
        expect(t.hello.structSize).toBe(96);
        expect((await t.ok('GET_VERSION', {})).features.singlestep).toBe(0);
        await t.ok('VM_CONTROL_EVENTS', { event_id: events.UNHOOK.id, enable: 1 });
        for (const v of [0, 1]) await t.ok('VCPU_CONTROL_EVENTS', { vcpu: v, event_id: events.HYPERCALL.id, enable: 1 });
        return respond(t);
      }),
    );
    await new Promise((r) => setTimeout(r, 300));
    ac.abort();
    expect(await run).toBe(0);
    await Promise.all(loops.map((l) => l.done));
    const status = o.err.filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as { status: { connected: number } });
    expect(status.length).toBeGreaterThan(1);
    expect(status.some((s) => s.status.connected === 3)).toBe(true);
    const summary = JSON.parse(o.out.join('')) as SimSummary;
    expect(summary).toMatchObject({ vms: 3, vcpus: 6, seed: 9, internalErrors: 0, hardErrors: 0 });
    expect(summary.shutdown).toEqual({ preunhookSent: 3, closedByTool: 3, timedOut: 0, notHooked: 0 });
    expect(summary.guestActions).toBeGreaterThan(0);
    expect(summary.eventsSent).toBeGreaterThan(0);
  });

  it('--run-for ends the run; the text status line names connected VMs and events/s', async () => {
    const server = await ToolServer.listen();
    cleanups.push(() => server.close());
    const o = io();
    const run = runSimCli(['--introspector', server.path, '--run-for', '250ms', '--status-interval', '50ms', '--unhook-timeout', '100ms'], o.io);
    await server.next();
    expect(await run).toBe(0);
    expect(o.err.some((l) => /sim: 1\/1 VMs connected · \d+ events\/s/.test(l))).toBe(true);
    expect(JSON.parse(o.out.join(''))).toMatchObject({ vms: 1, shutdown: { notHooked: 0 } });
  });

  it('usage errors exit 2 with the key named; --help exits 0', async () => {
    let o = io();
    expect(await runSimCli([], o.io)).toBe(2);
    expect(o.err.join('')).toMatch(/introspector/);
    o = io();
    expect(await runSimCli(['--introspector', '/tmp/x.sock', '--handshake', '100'], o.io)).toBe(2);
    expect(o.err.join('')).toMatch(/--handshake/);
    o = io();
    expect(await runSimCli(['--introspector', '/tmp/x.sock', '--host-profile', '/nonexistent/host.json'], o.io)).toBe(2);
    expect(o.err.join('')).toMatch(/host profile/);
    o = io();
    expect(await runSimCli(['--help'], o.io)).toBe(0);
    expect(o.out.join('')).toMatch(/--pure-v12/);
  });

  it('--scenario FILE... runs them on the chosen VMs, then exits: the reports are in the summary, exit 3 when an expectation failed', async () => {
    const server = await ToolServer.listen();
    cleanups.push(() => server.close());
    const files = shippedScenarioFiles();
    const attack = files.find((f) => f.endsWith('attack-kernel-text-patch.yaml'))!;
    const benign = files.find((f) => f.endsWith('benign-cr3-switching.yaml'))!;
    const runDir = mkdtempSync(join(tmpdir(), 'psim-run-'));
    cleanups.push(() => rmSync(runDir, { recursive: true, force: true }));
    const o = io();
    const run = runSimCli(
      ['--introspector', server.path, '--vms', '2', '--scenario', benign, '--scenario', attack, '--scenario-vms', '1', '--scenario-delay', '0', '--run-dir', runDir, '--unhook-timeout', '100ms'],
      o.io,
    );
    await server.next();
    await server.next();
    expect(await run).toBe(3); // nothing protected the guest: the attack's expectations failed
    const summary = JSON.parse(o.out.join('')) as SimSummary;
    expect(summary.scenarios!.map((r) => [r.scenario, r.vm, r.passed])).toEqual([
      ['cr3-switching', 'sim-vm-1', true],
      ['kernel-text-patch', 'sim-vm-1', false],
    ]);
    expect(summary.scenarios![1]!.expectations.find((e) => e.kind === 'write')).toMatchObject({ ok: false, observed: expect.stringMatching(/^landed/) });
    // a given run dir keeps the RAM files: <uuid>.ram
    expect(readdirSync(runDir).filter((f) => /^[0-9a-f-]{36}\.ram$/.test(f))).toHaveLength(2);
    o.out.length = 0;
    const ok = runSimCli(['--introspector', server.path, '--scenario', benign, '--scenario-delay', '0', '--unhook-timeout', '100ms'], o.io);
    await server.next();
    expect(await ok).toBe(0);
    const bad = io();
    const f = join(runDir, 'bad.yaml');
    writeFileSync(f, 'name: x\nkind: attack\nsteps:\n  - explode: 1\n');
    expect(await runSimCli(['--introspector', server.path, '--scenario', f], bad.io)).toBe(2);
    expect(bad.err.join('')).toMatch(/bad\.yaml: steps\[0\]\.explode: unknown key/);
    expect(existsSync(runDir)).toBe(true);
  });
});
