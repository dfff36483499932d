/**
 * The hooking ioctls (§7.1) as functions on the simulated VM, connection loss vs UNHOOK (§8), re-hook,
 * and QEMU's PREUNHOOK shutdown flow.
 */
import net from 'node:net';

import { afterEach, describe, expect, it } from 'vitest';
import { commands, events, KVMI_NUM_COMMANDS, KVMI_NUM_EVENTS } from '@periscope/kvmi';

import { HostErrno, KERNEL_BASE, MSR, parseHostProfile, SimVm } from '../src/index.js';
import { socketPath, startVm, ToolServer, until, type VmHarness } from './support/tool.js';

const harnesses: VmHarness[] = [];
const cleanups: Array<() => Promise<void> | void> = [];
afterEach(async () => {
  for (const h of harnesses.splice(0)) await h.cleanup();
  for (const c of cleanups.splice(0)) await c();
});
async function vm(...args: Parameters<typeof startVm>): Promise<VmHarness> {
  const h = await startVm(...args);
  harnesses.push(h);
  return h;
}

/** A connected socket pair over a real Unix socket (KVM only needs "a socket"). */
async function socketPair(): Promise<{ kernel: net.Socket; tool: net.Socket }> {
  const path = socketPath('p');
  const srv = net.createServer();
  await new Promise<void>((r) => srv.listen(path, r));
  const accepted = new Promise<net.Socket>((r) => srv.once('connection', r));
  const kernel = net.createConnection(path);
  await new Promise<void>((r) => kernel.once('connect', () => r()));
  const tool = await accepted;
  kernel.on('error', () => undefined);
  tool.on('error', () => undefined);
  cleanups.push(() => {
    kernel.destroy();
    tool.destroy();
    srv.close();
  });
  return { kernel, tool };
}

const { EPERM, ENOENT, EFAULT, EEXIST, EINVAL } = HostErrno;

describe('permission ioctls (KVM_INTROSPECTION_COMMAND / _EVENT)', () => {
  it('argument checks come before the hooked check', () => {
    const v = new SimVm();
    expect(v.allowCommand(KVMI_NUM_COMMANDS, 1)).toBe(EINVAL);
    expect(v.allowCommand(-2, 1)).toBe(EINVAL);
    expect(v.allowCommand(4, 2)).toBe(EINVAL);
    expect(v.allowCommand(commands.GET_VERSION.id, 0)).toBe(EFAULT); // not hooked, before EPERM
    expect(v.allowCommand(-1, 1)).toBe(EFAULT);
    expect(v.allowEvent(KVMI_NUM_EVENTS, 1)).toBe(EINVAL);
    expect(v.allowEvent(-2, 0)).toBe(EINVAL);
    expect(v.allowEvent(3, 7)).toBe(EINVAL);
    expect(v.allowEvent(3, 1)).toBe(EFAULT);
    expect(v.preunhook()).toBe(EFAULT);
    expect(v.unhook()).toBe(0);
  });

  it('after HOOK only the three always-allowed commands and no events are allowed; −1 allows or resets all', async () => {
    const v = new SimVm();
    const { kernel } = await socketPair();
    expect(v.hook(kernel, v.uuid)).toBe(0);
    cleanups.push(() => void v.unhook());
    const h = v.currentHook!;
    const allowedNow = (): number[] => [...Array(KVMI_NUM_COMMANDS).keys()].filter((i) => h.isCommandAllowed(i));
    const always = [commands.GET_VERSION.id, commands.VM_CHECK_COMMAND.id, commands.VM_CHECK_EVENT.id];
    expect(allowedNow()).toEqual(always);
    expect([...Array(KVMI_NUM_EVENTS).keys()].filter((i) => h.isEventAllowed(i))).toEqual([]);
    expect(v.allowCommand(commands.VM_GET_INFO.id, 1)).toBe(0);
    expect(v.allowCommand(22, 1)).toBe(0); // unused ids in range are accepted
    expect(v.allowCommand(commands.GET_VERSION.id, 0)).toBe(EPERM);
    expect(v.allowCommand(commands.VM_CHECK_EVENT.id, 0)).toBe(EPERM);
    expect(v.allowCommand(commands.GET_VERSION.id, 1)).toBe(0);
    expect(v.allowCommand(-1, 1)).toBe(0);
    expect(allowedNow()).toHaveLength(KVMI_NUM_COMMANDS);
    expect(v.allowCommand(-1, 0)).toBe(0);
    expect(allowedNow()).toEqual(always);
    expect(v.allowEvent(-1, 1)).toBe(0);
    expect(v.allowEvent(events.PF.id, 0)).toBe(0);
    expect(h.isEventAllowed(events.PF.id)).toBe(false);
    expect(h.isEventAllowed(events.CR.id)).toBe(true);
    expect(v.allowEvent(-1, 0)).toBe(0);
    expect(h.isEventAllowed(events.CR.id)).toBe(false);
  });

  it('HOOK: EEXIST when hooked, EINVAL for a bad socket or uuid, EPERM with introspection off', async () => {
    const v = new SimVm();
    const a = await socketPair();
    const b = await socketPair();
    expect(v.hook(b.kernel, new Uint8Array(15))).toBe(EINVAL);
    const dead = new net.Socket();
    dead.destroy();
    expect(v.hook(dead, v.uuid)).toBe(EINVAL);
    expect(v.hook(a.kernel, v.uuid)).toBe(0);
    expect(v.hook(b.kernel, v.uuid)).toBe(EEXIST);
    expect(v.unhook()).toBe(0);
    expect(v.hook(b.kernel, v.uuid)).toBe(0); // a new hook after UNHOOK
    expect(v.preunhook()).toBe(ENOENT); // UNHOOK event not enabled
    v.unhook();
    const off = new SimVm({ profile: parseHostProfile({ introspection: false }) });
    const c = await socketPair();
    expect(off.hook(c.kernel, off.uuid)).toBe(EPERM);
    expect(off.preunhook()).toBe(EPERM);
    expect(off.unhook()).toBe(EPERM);
  });

  it('disallowing an event after the tool enabled it does not stop it (§4.2)', async () => {
    const { tool: t, vm: v } = await vm();
    await t.ok('VCPU_CONTROL_EVENTS', { vcpu: 0, event_id: events.HYPERCALL.id, enable: 1 });
    expect(v.allowEvent(events.HYPERCALL.id, 0)).toBe(0);
    const p = v.vcpus[0]!.vmcall();
    t.reply(await t.nextVcpuEvent());
    expect((await p).value).toBe(0n);
    expect(await t.errno('VM_CHECK_EVENT', { id: events.HYPERCALL.id })).toBe(1);
  });
});

describe('connection loss vs UNHOOK (§8)', () => {
  it('loss releases the vCPUs but keeps restrictions and interceptions until UNHOOK; UNHOOK removes them, never touching memory', async () => {
    const { tool: t, vm: v, server, qemu } = await vm({ vcpus: 2, apsOnline: true }, { unhookDelayMs: 300, reconnectSeconds: 0.05 });
    const [c0, c1] = [v.vcpus[0]!, v.vcpus[1]!];
    await t.ok('VM_SET_PAGE_ACCESS', { entries: [{ gpa: 0x200000n, access: 5 }] });
    await t.ok('VCPU_CONTROL_EVENTS', { vcpu: 0, event_id: events.BREAKPOINT.id, enable: 1 });
    await t.ok('VCPU_CONTROL_EVENTS', { vcpu: 0, event_id: events.PF.id, enable: 1 });
    await t.ok('VCPU_CONTROL_EVENTS', { vcpu: 1, event_id: events.CR.id, enable: 1 });
    await t.ok('VCPU_CONTROL_CR', { vcpu: 1, cr: 3, enable: 1 });
    await t.ok('VCPU_CONTROL_MSR', { vcpu: 1, enable: 1, msr: MSR.LSTAR });
    await t.ok('VCPU_CONTROL_SINGLESTEP', { vcpu: 0, enable: 1 });
    await t.ok('VM_WRITE_PHYSICAL', { gpa: 0x100800n, data: Uint8Array.of(0xcc) }); // the tool's breakpoint
    // vCPU 1 blocks on a CR event that will never be answered.
    const blocked = c1.writeCr(3, c1.cpu.sregs.cr3 | 0x10n);
    const cr = await t.nextVcpuEvent();
    expect(cr.event.key).toBe('CR');
    t.close();
    // The release job: the CR write completes as with CONTINUE (the guest's value), singlestep stops.
    const r = await blocked;
    expect(r).toMatchObject({ outcome: 'completed', value: c1.cpu.sregs.cr3, events: [{ event: 'CR', ended: 'released' }] });
    await until(() => !c0.singlestepping, 1000, 'singlestep to stop');
    expect(v.hooked).toBe(true);
    expect(v.connected).toBe(false);
    expect(v.restrictions.get(0x200)).toBe(5);
    expect(c0.interceptions.breakpoint).toBe(true);
    expect(c1.interceptions.cr3).toBe(true);
    expect([...c1.interceptions.msrs]).toEqual([MSR.LSTAR]);
    // A restricted access between loss and UNHOOK: the PF event cannot be sent → proceeds as CONTINUE.
    expect(await c0.access({ gva: KERNEL_BASE + 0x200000n }, 'w')).toMatchObject({
      outcome: 'completed',
      events: [{ event: 'PF', seq: 0, ended: 'send-failed' }],
    });
    // QEMU sees the disconnect and calls UNHOOK.
    await until(() => !v.hooked, 2000, 'UNHOOK');
    expect(v.restrictions.size).toBe(0);
    expect(c0.interceptions.breakpoint).toBe(false);
    expect(c1.interceptions.cr3).toBe(false);
    expect(c1.interceptions.msrs.size).toBe(0);
    expect(c0.hasIntrospectionState).toBe(false);
    expect(v.memory.read(0x100800n, 1)![0]).toBe(0xcc); // guest memory untouched
    // QEMU reconnects; the new hook starts from scratch: seq 1, nothing enabled.
    const t2 = await server.next();
    await qemu.waitHooked();
    expect(c0.enabledEvents).toEqual([]);
    await t2.ok('VM_PAUSE_VCPU', { vcpu: 0, wait: 1 });
    const e = await t2.nextVcpuEvent();
    expect(e.seq).toBe(1);
    t2.reply(e);
    expect(v.stats.hooks).toBe(2);
  });

  it('VM_CONTROL_CLEANUP 0 leaves the interceptions active after UNHOOK', async () => {
    const { tool: t, vm: v, server, qemu } = await vm({}, { reconnectSeconds: 0.05 });
    await t.ok('VM_CONTROL_CLEANUP', { enable: 0 });
    await t.ok('VCPU_CONTROL_EVENTS', { vcpu: 0, event_id: events.BREAKPOINT.id, enable: 1 });
    await t.ok('VCPU_CONTROL_CR', { vcpu: 0, cr: 3, enable: 1 });
    t.close();
    await until(() => v.stats.unhooks === 1, 2000, 'UNHOOK');
    expect(v.vcpus[0]!.interceptions.breakpoint).toBe(true);
    expect(v.vcpus[0]!.interceptions.cr3).toBe(true);
    // #BP is still intercepted by KVM: the next tool's enable is EBUSY.
    const t2 = await server.next();
    await qemu.waitHooked();
    expect(await t2.errno('VCPU_CONTROL_EVENTS', { vcpu: 0, event_id: events.BREAKPOINT.id, enable: 1 })).toBe(16);
    // Without KVMI, a guest INT3 simply reaches the guest.
    expect(await v.vcpus[0]!.int3()).toMatchObject({ outcome: 'exception', vector: 3, events: [] });
  });

  it('UNHOOK while a vCPU waits releases it; guest actions continue unhooked', async () => {
    const { tool: t, vm: v, qemu } = await vm();
    await t.ok('VM_PAUSE_VCPU', { vcpu: 0, wait: 1 });
    await t.nextVcpuEvent();
    qemu.stop();
    await t.closed;
    expect(v.hooked).toBe(false);
    expect(v.vcpus[0]!.waitingFor).toBe(null);
    expect(await v.vcpus[0]!.vmcall()).toMatchObject({ value: 0xfffffffffffffc18n });
  });
});

describe('QEMU shutdown through PREUNHOOK', () => {
  it('sends the UNHOOK event, waits for the tool to close, then unhooks', async () => {
    const { tool: t, vm: v, qemu } = await vm();
    await t.ok('VM_CONTROL_EVENTS', { event_id: events.UNHOOK.id, enable: 1 });
    const done = qemu.shutdown();
    const e = await t.nextEvent();
    expect(e.kind).toBe('vm-event');
    expect(e.event.key).toBe('UNHOOK');
    await new Promise((r) => setTimeout(r, 20));
    expect(v.hooked).toBe(true);
    t.close();
    const report = await done;
    expect(report).toMatchObject({ preunhook: '0', closedByTool: true });
    expect(v.hooked).toBe(false);
    expect(qemu.state).toBe('stopped');
  });

  it('without the UNHOOK event enabled, PREUNHOOK fails (ENOENT) and QEMU unhooks at once', async () => {
    const { tool: t, vm: v, qemu } = await vm();
    const report = await qemu.shutdown();
    expect(report).toMatchObject({ preunhook: 'ENOENT', closedByTool: false, waitedMs: 0 });
    await t.closed;
    expect(v.hooked).toBe(false);
  });

  it('a tool that does not close is unhooked after the unhook timeout', async () => {
    const { tool: t, vm: v, qemu } = await vm({}, { unhookTimeoutMs: 150 });
    await t.ok('VM_CONTROL_EVENTS', { event_id: events.UNHOOK.id, enable: 1 });
    const report = await qemu.shutdown();
    expect(report.preunhook).toBe('0');
    expect(report.closedByTool).toBe(false);
    expect(report.waitedMs).toBeGreaterThanOrEqual(140);
    await t.closed;
    expect(v.hooked).toBe(false);
  });

  it('the UNHOOK event needs the event allowed to be enabled', async () => {
    const { tool: t, vm: v } = await vm({}, { allowEvents: [events.PAUSE.id] });
    expect(await t.errno('VM_CONTROL_EVENTS', { event_id: events.UNHOOK.id, enable: 1 })).toBe(1);
    expect(v.preunhook()).toBe(ENOENT);
  });
});

describe('QEMU allow-lists', () => {
  it('allows only the listed commands and events when configured', async () => {
    const server = await ToolServer.listen();
    cleanups.push(() => server.close());
    const { SimQemu } = await import('../src/index.js');
    const v = new SimVm();
    const q = new SimQemu(v, {
      path: server.path,
      key: Buffer.from('sim-secret'),
      allowCommands: [commands.VM_GET_INFO.id],
      allowEvents: [events.PAUSE.id],
    });
    q.start();
    cleanups.push(() => q.stop());
    const t = await server.next();
    await q.waitHooked();
    expect(await t.errno('VM_GET_INFO', {})).toBe(0);
    expect(await t.errno('VCPU_GET_INFO', { vcpu: 0 })).toBe(1);
    expect(await t.errno('VM_PAUSE_VCPU', { vcpu: 0, wait: 0 })).toBe(1); // command not allowed
    expect(await t.errno('VM_CHECK_EVENT', { id: events.PAUSE.id })).toBe(0);
    expect(await t.errno('VM_CHECK_EVENT', { id: events.CR.id })).toBe(1);
  });
});
