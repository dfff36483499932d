/**
 * KvmiSession over a real Unix socket, after a real QEMU handshake, against a kernel-side peer built
 * from the codec's kernel half: replies matched by (id, seq) even when vCPU replies overtake VM
 * replies, events answered through the view, error replies to event replies, and closing.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer, connect, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import {
  EventAction,
  KvmiCommandError,
  KvmiSession,
  acceptQemuHandshake,
  attachFraming,
  checkEventReply,
  encodeCommand,
  encodeErrorReply,
  encodeReply,
  encodeVcpuEvent,
  events,
  performQemuHandshake,
  receiveKernelMessage,
  structs,
  type KernelState,
} from '@periscope/kvmi';

const cleanups: (() => void)[] = [];
afterEach(() => {
  while (cleanups.length) cleanups.pop()!();
});

const state: KernelState = {
  isCommandAllowed: () => true,
  isEventAllowed: () => true,
  vcpuCount: () => 2,
  isVcpuReady: () => true,
  extensionsEnabled: () => true,
};

/** Listen as the tool (server), connect as QEMU, handshake both ways; return both sockets. */
async function connectedPair(): Promise<{ tool: Socket; kernel: Socket; toolLeftover: Buffer; kernelLeftover: Buffer }> {
  const dir = mkdtempSync(join(tmpdir(), 'kvs-'));
  const path = join(dir, 's');
  const server: Server = createServer();
  cleanups.push(() => {
    server.close();
    rmSync(dir, { recursive: true, force: true });
  });
  await new Promise<void>((r) => server.listen(path, r));
  const accepted = new Promise<Socket>((r) => server.once('connection', r));
  const kernel = connect(path);
  const tool = await accepted;
  cleanups.push(() => {
    tool.destroy();
    kernel.destroy();
  });
  const secret = Buffer.from('s3cret');
  const getVersion = encodeCommand('GET_VERSION', 1, {});
  const [hello, q] = await Promise.all([
    acceptQemuHandshake(tool, { cookieFor: () => secret, afterReply: getVersion }),
    performQemuHandshake(kernel, { form: 104, uuid: new Uint8Array(16).fill(7), name: 'vm-a', startTimeMs: 1n, maxGpa: 1n << 32n, key: secret }),
  ]);
  expect(q.authenticated).toBe(true);
  return { tool, kernel, toolLeftover: hello.leftover, kernelLeftover: q.leftover };
}

describe('KvmiSession', () => {
  it('matches replies by (id, seq) when vCPU replies overtake VM replies; GET_VERSION sent with the handshake arrives', async () => {
    const { tool, kernel, toolLeftover, kernelLeftover } = await connectedPair();
    const seen: number[] = [];
    const held: Buffer[] = [];
    const { writer } = attachFraming(kernel, {
      leftover: kernelLeftover,
      onFrame: (frame) => {
        const m = receiveKernelMessage(Buffer.from(frame), state);
        if (m.kind !== 'command') throw new Error(`unexpected ${m.kind}`);
        seen.push(m.def.id);
        if (m.def.key === 'GET_VERSION') void writer.send(encodeReply('GET_VERSION', m.seq, { version: 1, max_msg_size: 8184, features: { singlestep: 1 } }));
        // Hold the VM command's reply until the vCPU command's reply has been sent.
        if (m.def.key === 'VM_GET_INFO') held.push(encodeReply('VM_GET_INFO', m.seq, { vcpu_count: 2 }));
        if (m.def.key === 'VCPU_GET_INFO') {
          void writer.send(encodeReply('VCPU_GET_INFO', m.seq, { tsc_speed: 2_000_000_000n }));
          void writer.send(held.pop()!);
        }
        if (m.def.key === 'VCPU_CONTROL_CR') void writer.send(encodeErrorReply(m.def.id, m.seq, 22));
      },
    });
    const session = new KvmiSession(tool, { leftover: toolLeftover, firstSeq: 2 });
    // The GET_VERSION the tool wrote together with the handshake reply (seq 1) reached the kernel.
    const version = await session.adoptRequest('GET_VERSION', 1);
    expect(seen[0]).toBe(2);
    expect(version).toEqual({ ok: true, value: { version: 1, max_msg_size: 8184, features: { singlestep: 1 } } });
    const vmInfo = session.request('VM_GET_INFO', {});
    const vcpuInfo = session.request('VCPU_GET_INFO', { vcpu: 1 });
    const order: string[] = [];
    void vmInfo.then(() => order.push('vm'));
    void vcpuInfo.then(() => order.push('vcpu'));
    expect(await vmInfo).toEqual({ vcpu_count: 2 });
    expect(await vcpuInfo).toEqual({ tsc_speed: 2_000_000_000n });
    expect(order).toEqual(['vcpu', 'vm']);
    await expect(session.request('VCPU_CONTROL_CR', { vcpu: 0, cr: 4, enable: 1 })).rejects.toMatchObject({ code: 'command-failed', errno: 22 });
    await expect(session.request('VCPU_CONTROL_CR', { vcpu: 0, cr: 4, enable: 1 })).rejects.toBeInstanceOf(KvmiCommandError);
    session.close();
  });

  it('answers vCPU events from the view; the kernel side validates the replies', async () => {
    const { tool, kernel, toolLeftover, kernelLeftover } = await connectedPair();
    const checked: unknown[] = [];
    const waiting = new Map<number, { seq: number; event: (typeof events)[keyof typeof events] }>();
    const { writer } = attachFraming(kernel, {
      leftover: kernelLeftover,
      onFrame: (frame) => {
        const m = receiveKernelMessage(Buffer.from(frame), state);
        if (m.kind === 'event-reply') {
          checked.push(checkEventReply(m, waiting.get(m.vcpu) ?? null));
          waiting.delete(m.vcpu);
        }
      },
    });
    const arch = structs.kvmi_vcpu_event_arch.zero();
    arch.mode = 8;
    arch.sregs.cr4 = 0x3406f0n;
    const session = new KvmiSession(tool, {
      leftover: toolLeftover,
      onVcpuEvent: (view, s) => {
        if (view.eventId === events.CR.id) {
          // Deny the write: keep the old value.
          const old = view.specificU64(structs.kvmi_vcpu_event_cr as never, 'old_value');
          s.replyToEvent(view.seq, view.vcpu, view.eventId, EventAction.CONTINUE, old);
        } else s.replyToEvent(view.seq, view.vcpu, view.eventId, EventAction.RETRY);
      },
    });
    waiting.set(1, { seq: 10, event: events.CR });
    await writer.send(encodeVcpuEvent({ event: 'CR', seq: 10, vcpu: 1, arch, data: { cr: 4, old_value: 0x3406f0n, new_value: 0x3006f0n }, paddingNoise: 0xcc }));
    await new Promise((r) => setTimeout(r, 30));
    waiting.set(0, { seq: 11, event: events.PF });
    await writer.send(encodeVcpuEvent({ event: 'PF', seq: 11, vcpu: 0, arch, data: { gva: 0xffffffff81000000n, gpa: 0x1000000n, access: 2 } }));
    await new Promise((r) => setTimeout(r, 30));
    expect(checked).toEqual([
      { kind: 'reply', action: 'CONTINUE', newVal: 0x3406f0n },
      { kind: 'reply', action: 'RETRY', newVal: null },
    ]);
    expect(session.stats.events).toBe(2);
    session.close();
  });

  it('reports KVM error answers to event replies and rejects pending commands on close', async () => {
    const { tool, kernel, toolLeftover, kernelLeftover } = await connectedPair();
    const errors: [number, number][] = [];
    const { writer } = attachFraming(kernel, { leftover: kernelLeftover, onFrame: () => undefined });
    const session = new KvmiSession(tool, { leftover: toolLeftover, onEventReplyError: (seq, errno) => errors.push([seq, errno]) });
    await writer.send(encodeErrorReply(1, 44, 11));
    await new Promise((r) => setTimeout(r, 20));
    expect(errors).toEqual([[44, 11]]);
    const pending = session.request('VM_GET_INFO', {});
    kernel.destroy();
    await expect(pending).rejects.toMatchObject({ code: 'closed' });
    expect(session.isClosed).toBe(true);
  });

  it('a reply nobody asked for is a protocol violation that closes the session', async () => {
    const { tool, kernel, toolLeftover, kernelLeftover } = await connectedPair();
    const errs: string[] = [];
    const { writer } = attachFraming(kernel, { leftover: kernelLeftover, onFrame: () => undefined });
    const closed = new Promise<void>((r) => {
      new KvmiSession(tool, { leftover: toolLeftover, onError: (e) => errs.push(e.code), onClose: r });
    });
    await writer.send(encodeReply('VM_GET_INFO', 999, { vcpu_count: 1 }));
    await closed;
    expect(errs).toEqual(['unknown-message']);
  });
});

describe('KvmiSession: a peer that stops reading', () => {
  it('closes only that connection with write-queue-full once the bounded queue overflows', async () => {
    const { tool, kernel, toolLeftover } = await connectedPair();
    kernel.pause(); // the "kernel" never reads our replies again
    kernel.on('error', () => undefined); // EPIPE once the tool gives up
    const errors: string[] = [];
    const closed = new Promise<void>((r) => {
      new KvmiSession(tool, {
        leftover: toolLeftover,
        maxQueuedBytes: 64 * 1024,
        onVcpuEvent: (view, s) => s.replyToEvent(view.seq, view.vcpu, view.eventId, EventAction.CONTINUE),
        onError: (e) => errors.push(e.code),
        onClose: r,
      });
    });
    const arch = structs.kvmi_vcpu_event_arch.zero();
    // Keep sending PAUSE events (each answered with a 24-byte reply nobody reads) until the session gives up.
    let seq = 100;
    let open = true;
    void closed.then(() => (open = false));
    while (open && seq < 400_000) {
      const batch = Buffer.concat(Array.from({ length: 256 }, () => encodeVcpuEvent({ event: 'PAUSE', seq: seq++, vcpu: 0, arch })));
      if (!kernel.write(batch)) await new Promise((r) => setTimeout(r, 1));
      await new Promise((r) => setImmediate(r));
    }
    await closed;
    expect(errors).toEqual(['write-queue-full']);
  });
});
