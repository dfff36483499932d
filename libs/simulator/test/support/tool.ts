/**
 * A minimal introspection tool for tests, written with the library's tool-side codec: it listens on a
 * real Unix socket, accepts QEMU's handshake (`acceptQemuHandshake`), then speaks KVMI with
 * `encodeCommand` / `decodeReply` / `decodeEvent` / `encodeEventReply`. It records the order in which
 * messages arrive, and can send raw bytes for messages the encoder refuses to build.
 */
import { randomBytes } from 'node:crypto';
import { rmSync } from 'node:fs';
import net from 'node:net';

import {
  acceptQemuHandshake,
  attachFraming,
  commands,
  decodeEvent,
  decodeReply,
  encodeCommand,
  encodeEventReply,
  frameId,
  frameSeq,
  frameSize,
  type CommandInput,
  type CommandKey,
  type CommandReply,
  type DecodedEvent,
  type EventActionName,
  type FrameWriter,
  type QemuHello,
  type ReplyResult,
} from '@periscope/kvmi';

import { SimQemu, SimVm, type SimQemuOptions, type SimVmOptions } from '../../src/index.js';

export type VcpuEvent = Extract<DecodedEvent, { kind: 'vcpu-event' }>;
export type AnyEvent = Exclude<DecodedEvent, { kind: 'event-reply-error' }>;

class Queue<T> {
  private items: T[] = [];
  private waiters: Array<{ resolve: (v: T) => void; reject: (e: Error) => void; timer: NodeJS.Timeout }> = [];
  push(v: T): void {
    const w = this.waiters.shift();
    if (w) {
      clearTimeout(w.timer);
      w.resolve(v);
    } else this.items.push(v);
  }
  next(timeoutMs: number, what: string): Promise<T> {
    const v = this.items.shift();
    if (v !== undefined) return Promise.resolve(v);
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiters = this.waiters.filter((w) => w.timer !== timer);
        reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}`));
      }, timeoutMs);
      this.waiters.push({ resolve, reject, timer });
    });
  }
  get length(): number {
    return this.items.length;
  }
  drain(): T[] {
    return this.items.splice(0);
  }
}

let pathCounter = 0;
export function socketPath(tag = 't'): string {
  return `/tmp/ps-${tag}-${process.pid}-${++pathCounter}-${randomBytes(2).toString('hex')}.sock`;
}

export interface ToolServerOptions {
  /** The secret whose SHA-1 we answer with (default: 'sim-secret'). */
  secret?: Uint8Array;
  /** Send GET_VERSION (this seq) in the same write as the handshake reply. */
  versionInHandshakeSeq?: number;
}

export class ToolServer {
  readonly conns = new Queue<ToolConn>();
  readonly all: ToolConn[] = [];
  readonly handshakeErrors: Error[] = [];
  private constructor(
    readonly path: string,
    readonly server: net.Server,
    private readonly opts: ToolServerOptions,
  ) {
    server.on('connection', (s) => void this.accept(s));
  }

  static async listen(opts: ToolServerOptions = {}, path = socketPath()): Promise<ToolServer> {
    const server = net.createServer();
    server.maxConnections = 100000;
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen({ path, backlog: 4096 }, () => resolve());
    });
    return new ToolServer(path, server, opts);
  }

  private async accept(socket: net.Socket): Promise<void> {
    socket.on('error', () => undefined);
    const seq = this.opts.versionInHandshakeSeq;
    try {
      const hello = await acceptQemuHandshake(socket, {
        cookieFor: () => this.opts.secret ?? Buffer.from('sim-secret'),
        ...(seq !== undefined ? { afterReply: encodeCommand('GET_VERSION', seq, {}) } : {}),
      });
      const conn = new ToolConn(socket, hello, seq);
      this.all.push(conn);
      this.conns.push(conn);
    } catch (err) {
      this.handshakeErrors.push(err as Error);
    }
  }

  next(timeoutMs = 5000): Promise<ToolConn> {
    return this.conns.next(timeoutMs, 'a QEMU connection');
  }

  async close(): Promise<void> {
    for (const c of this.all) c.socket.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
    rmSync(this.path, { force: true });
  }
}

interface Pending {
  key: CommandKey;
  resolve(r: ReplyResult<CommandKey>): void;
}

export class ToolConn {
  readonly writer: FrameWriter;
  /** Every message received, in arrival order. */
  readonly received: Array<{ id: number; seq: number; size: number }> = [];
  readonly events = new Queue<AnyEvent>();
  /** KVM's error answers to our event replies (id 1, size 8). */
  readonly eventReplyErrors = new Queue<{ seq: number; errno: number }>();
  /** Replies that matched no pending command (raw frames). */
  readonly rawReplies = new Queue<Buffer>();
  /** Raw frames of the vCPU events received (for byte-level checks). */
  readonly eventFrames: Buffer[] = [];
  readonly closed: Promise<void>;
  isClosed = false;
  private readonly pending = new Map<string, Pending>();
  private seq = 1000;
  /** The reply to the GET_VERSION sent inside the handshake write, if any. */
  readonly initialVersion: Promise<ReplyResult<'GET_VERSION'>> | undefined;

  constructor(
    readonly socket: net.Socket,
    readonly hello: QemuHello,
    versionSeq: number | undefined,
  ) {
    if (versionSeq !== undefined) {
      this.initialVersion = new Promise((resolve) => {
        this.pending.set(`${commands.GET_VERSION.id}:${versionSeq}`, { key: 'GET_VERSION', resolve: resolve as Pending['resolve'] });
      });
    }
    let onClosed!: () => void;
    this.closed = new Promise<void>((r) => (onClosed = r));
    const { writer } = attachFraming(socket, {
      leftover: hello.leftover,
      onFrame: (f) => this.onFrame(Buffer.from(f)),
      onClose: () => {
        this.isClosed = true;
        onClosed();
      },
    });
    this.writer = writer;
  }

  private onFrame(f: Buffer): void {
    const id = frameId(f);
    const seq = frameSeq(f);
    this.received.push({ id, seq, size: frameSize(f) });
    if (id === 0 || id === 1) {
      if (id === 1 && frameSize(f) !== 8) this.eventFrames.push(f);
      const e = decodeEvent(f);
      if (e.kind === 'event-reply-error') this.eventReplyErrors.push({ seq: e.seq, errno: e.errno });
      else this.events.push(e);
      return;
    }
    const k = `${id}:${seq}`;
    const p = this.pending.get(k);
    if (!p) {
      this.rawReplies.push(f);
      return;
    }
    this.pending.delete(k);
    p.resolve(decodeReply(p.key, f));
  }

  nextSeq(): number {
    return ++this.seq;
  }

  /** Send a command; resolves with `{ok, value}` or `{ok: false, errno}`. */
  cmd<K extends CommandKey>(key: K, input: CommandInput<K>, seq = this.nextSeq()): Promise<ReplyResult<K>> {
    const frame = encodeCommand(key, seq, input);
    const p = new Promise<ReplyResult<K>>((resolve) => {
      this.pending.set(`${commands[key].id}:${seq}`, { key, resolve: resolve as Pending['resolve'] });
    });
    void this.writer.send(frame);
    return p;
  }

  /** Send a command and return its reply value; throws on a KVM error code. */
  async ok<K extends CommandKey>(key: K, input: CommandInput<K>): Promise<CommandReply<K>> {
    const r = await this.cmd(key, input);
    if (!r.ok) throw new Error(`${key} failed with errno ${r.errno}`);
    return r.value;
  }

  /** Send a command; resolves with the errno (0 on success). */
  async errno<K extends CommandKey>(key: K, input: CommandInput<K>): Promise<number> {
    const r = await this.cmd(key, input);
    return r.ok ? 0 : r.errno;
  }

  /** Register interest in the reply to a raw frame we are about to send (id, seq) and get the decoded result. */
  expect<K extends CommandKey>(key: K, seq: number): Promise<ReplyResult<K>> {
    return new Promise<ReplyResult<K>>((resolve) => {
      this.pending.set(`${commands[key].id}:${seq}`, { key, resolve: resolve as Pending['resolve'] });
    });
  }

  send(frame: Buffer): void {
    void this.writer.send(frame);
  }

  nextEvent(timeoutMs = 5000): Promise<AnyEvent> {
    return this.events.next(timeoutMs, 'an event');
  }

  async nextVcpuEvent(timeoutMs = 5000): Promise<VcpuEvent> {
    const e = await this.nextEvent(timeoutMs);
    if (e.kind !== 'vcpu-event') throw new Error(`expected a vCPU event, got ${e.kind} ${e.event.name}`);
    return e;
  }

  reply(e: VcpuEvent, action: EventActionName = 'CONTINUE', newVal?: bigint): void {
    this.send(encodeEventReply(e, action, newVal === undefined ? undefined : { new_val: newVal }));
  }

  close(): void {
    this.socket.end();
  }
}

export interface VmHarness {
  vm: SimVm;
  qemu: SimQemu;
  server: ToolServer;
  tool: ToolConn;
  cleanup(): Promise<void>;
}

/** A VM with its QEMU connected to a fresh tool server; resolves once the tool holds the connection. */
export async function startVm(
  vmOpts: SimVmOptions = {},
  qemuOpts: Partial<SimQemuOptions> = {},
  serverOpts: ToolServerOptions = {},
): Promise<VmHarness> {
  const server = await ToolServer.listen(serverOpts);
  const vm = new SimVm({ jitterMs: 2, ...vmOpts });
  const qemu = new SimQemu(vm, { path: server.path, reconnectSeconds: 0.05, key: Buffer.from('sim-secret'), ...qemuOpts });
  qemu.start();
  const tool = await server.next();
  await qemu.waitHooked();
  return {
    vm,
    qemu,
    server,
    tool,
    cleanup: async () => {
      qemu.stop();
      await server.close();
      vm.close();
      if (vm.stats.internalErrors > 0) throw new Error(`the simulator had ${vm.stats.internalErrors} internal errors`);
    },
  };
}

/** A raw frame: header {u16 id, u16 size, u32 seq} (§2.1) + payload, for messages the encoder refuses to build. */
export function rawFrame(id: number, seq: number, payload: Buffer | number[] = []): Buffer {
  const p = Buffer.isBuffer(payload) ? payload : Buffer.from(payload);
  const h = Buffer.alloc(8);
  h.writeUInt16LE(id, 0);
  h.writeUInt16LE(p.length, 2);
  h.writeUInt32LE(seq, 4);
  return Buffer.concat([h, p]);
}

/** kvmi_vcpu_hdr {u16 vcpu, u16 padding1, u32 padding2} (§2.5). */
export function vcpuHdr(vcpu: number, pad1 = 0, pad2 = 0): Buffer {
  const b = Buffer.alloc(8);
  b.writeUInt16LE(vcpu, 0);
  b.writeUInt16LE(pad1, 2);
  b.writeUInt32LE(pad2, 4);
  return b;
}

export const until = async (cond: () => boolean, timeoutMs = 5000, what = 'a condition'): Promise<void> => {
  const end = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
};

export const delay = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
