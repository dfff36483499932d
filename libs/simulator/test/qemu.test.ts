/**
 * The simulated QEMU: both handshake forms, the cookie check, the bytes after the handshake, the
 * handshake deadline, reconnection, and a failing HOOK.
 */
import { rmSync } from 'node:fs';
import net from 'node:net';

import { afterEach, describe, expect, it } from 'vitest';
import { uuidToText } from '@periscope/kvmi';

import { parseHostProfile, SimQemu, SimVm } from '../src/index.js';
import { socketPath, ToolServer, until, type ToolServerOptions } from './support/tool.js';

const cleanups: Array<() => Promise<void> | void> = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

function qemuFor(vm: SimVm, path: string, opts: Partial<ConstructorParameters<typeof SimQemu>[1]> = {}): { q: SimQemu; logs: string[] } {
  const logs: string[] = [];
  const q = new SimQemu(vm, { path, reconnectSeconds: 0.05, log: (l) => logs.push(l), ...opts });
  q.start();
  cleanups.push(() => q.stop());
  return { q, logs };
}
async function server(opts: ToolServerOptions = {}, path?: string): Promise<ToolServer> {
  const s = await ToolServer.listen(opts, path);
  cleanups.push(() => s.close());
  return s;
}

describe('QEMU handshake', () => {
  it('sends the 104-byte form by default (with max_gpa), hooks, and the tool talks to the kernel', async () => {
    const s = await server();
    const vm = new SimVm({ index: 3, memoryMiB: 128 });
    const { q } = qemuFor(vm, s.path, { key: Buffer.from('sim-secret') });
    const t = await s.next();
    expect(t.hello.structSize).toBe(104);
    expect(t.hello.maxGpa).toBe((128n << 20n) - 1n);
    expect(t.hello.name).toBe('sim-vm-3');
    expect(t.hello.uuidText).toBe(uuidToText(vm.uuid));
    expect(t.hello.startTimeMs).toBe(vm.startTimeMs);
    await q.waitHooked();
    expect(q.stats.authenticated).toBe(true);
    expect(vm.currentHook?.uuid).toEqual(vm.uuid);
    expect(await t.ok('VM_GET_INFO', {})).toEqual({ vcpu_count: 1 });
  });

  it('sends the 96-byte form on request', async () => {
    const s = await server();
    qemuFor(new SimVm(), s.path, { handshake: 96 });
    const t = await s.next();
    expect(t.hello.structSize).toBe(96);
    expect(t.hello.maxGpa).toBeUndefined();
  });

  it('a GET_VERSION written together with the handshake reply reaches the kernel', async () => {
    const s = await server({ versionInHandshakeSeq: 77 });
    qemuFor(new SimVm(), s.path);
    const t = await s.next();
    expect(await t.initialVersion).toEqual({ ok: true, value: { version: 1, max_msg_size: 8184, features: { singlestep: 1 } } });
  });

  it('a wrong cookie hash is refused: no hook, QEMU retries', async () => {
    const s = await server({ secret: Buffer.from('not-the-secret') });
    const vm = new SimVm();
    const { q, logs } = qemuFor(vm, s.path, { key: Buffer.from('sim-secret') });
    const t = await s.next();
    await t.closed;
    await until(() => q.stats.handshakeFailures >= 2, 3000, 'two refused handshakes');
    expect(vm.stats.hooks).toBe(0);
    expect(q.stats.lastError).toMatch(/cookie_hash/);
    expect(logs.some((l) => l.includes('handshake-refused'))).toBe(true);
  });

  it('without a key any hash is accepted, and QEMU logs that the tool is not authenticated', async () => {
    const s = await server({ secret: Buffer.from('whatever') });
    const vm = new SimVm();
    const { q, logs } = qemuFor(vm, s.path);
    const t = await s.next();
    await q.waitHooked();
    expect(q.stats.authenticated).toBe(false);
    expect(logs.some((l) => /not authenticated/.test(l))).toBe(true);
    expect(await t.errno('GET_VERSION', {})).toBe(0);
  });

  it('retries until the introspector listens (reconnect=N)', async () => {
    const path = socketPath('r');
    const vm = new SimVm();
    const { q } = qemuFor(vm, path);
    await until(() => q.stats.connectAttempts >= 3, 3000, 'connect retries');
    expect(vm.hooked).toBe(false);
    const s = await server({}, path);
    await s.next();
    await q.waitHooked();
    expect(vm.hooked).toBe(true);
  });

  it('gives up a handshake the tool never answers after the handshake timeout, then retries', async () => {
    const path = socketPath('h');
    const silent = net.createServer((sock) => sock.on('error', () => undefined));
    await new Promise<void>((r) => silent.listen(path, r));
    cleanups.push(() => {
      silent.close();
      rmSync(path, { force: true });
    });
    const vm = new SimVm();
    const { q, logs } = qemuFor(vm, path, { handshakeTimeoutMs: 60 });
    await until(() => q.stats.handshakeFailures >= 2, 3000, 'handshake timeouts');
    expect(logs.some((l) => l.includes('handshake-timeout'))).toBe(true);
    expect(vm.hooked).toBe(false);
  });

  it('a failing HOOK (introspection disabled) closes the connection with the module-parameter hint', async () => {
    const s = await server();
    const vm = new SimVm({ profile: parseHostProfile({ introspection: false }) });
    const { q, logs } = qemuFor(vm, s.path);
    const t = await s.next();
    await t.closed;
    await until(() => q.stats.hookFailures >= 1, 2000, 'a hook failure');
    expect(logs.some((l) => l.includes('EPERM') && l.includes('kvm.introspection=on'))).toBe(true);
  });
});
