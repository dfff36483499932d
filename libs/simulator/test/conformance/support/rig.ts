/**
 * The conformance suite's introspection tool, connected to the simulator exactly as a real one: it
 * listens on a Unix socket, lets SimQemu connect and do the handshake (the library's
 * `acceptQemuHandshake` is used for that step only; the handshake bytes are covered by the kvmi tests),
 * then speaks KVMI with raw bytes: frames are written as hex and read back with the minimal reader
 * below (8-byte header `u16 id, u16 size, u32 seq`, little-endian, kvmi-v12.md §2.1).
 */
import { randomBytes } from 'node:crypto';
import { rmSync } from 'node:fs';
import net from 'node:net';

import { acceptQemuHandshake } from '@periscope/kvmi';

import { SimQemu, SimVm, type SimQemuOptions, type SimVcpu, type SimVmOptions } from '../../../src/index.js';
import { EVENT_MSRS, type Arch, type EventMsrs } from './bytes.js';

export const KEY = Buffer.from('conformance-secret');

/** One tool-side connection: raw writes, and a frame queue fed by a hand-written reader. */
export class RawConn {
  private buf = Buffer.alloc(0);
  private readonly queue: string[] = [];
  private wake: Array<() => void> = [];
  /** Every message received, in arrival order (hex). */
  readonly log: string[] = [];
  isClosed = false;
  readonly closed: Promise<void>;

  constructor(
    readonly socket: net.Socket,
    leftover: Buffer,
  ) {
    let onClosed!: () => void;
    this.closed = new Promise<void>((r) => (onClosed = r));
    socket.on('data', (d: Buffer) => this.feed(d));
    socket.on('error', () => undefined);
    socket.on('close', () => {
      this.isClosed = true;
      onClosed();
      this.notify();
    });
    if (leftover.length > 0) this.feed(leftover);
    socket.resume();
  }

  /** §2.1: 8-byte header, `size` (u16 at offset 2) payload bytes follow. */
  private feed(d: Buffer): void {
    this.buf = Buffer.concat([this.buf, d]);
    while (this.buf.length >= 8) {
      const size = this.buf.readUInt16LE(2);
      if (this.buf.length < 8 + size) break;
      const f = this.buf.subarray(0, 8 + size).toString('hex');
      this.buf = this.buf.subarray(8 + size);
      this.queue.push(f);
      this.log.push(f);
    }
    this.notify();
  }

  private notify(): void {
    const w = this.wake;
    this.wake = [];
    for (const f of w) f();
  }

  /** Write the concatenation of the given hex messages as ONE socket write. */
  send(...hex: string[]): void {
    this.socket.write(Buffer.from(hex.join(''), 'hex'));
  }

  /** Messages received and not yet taken. */
  get pending(): number {
    return this.queue.length;
  }

  /** Resolve with the first queued message that `match` accepts (removing it), waiting up to `timeoutMs`. */
  async take(match: (hex: string) => boolean, what: string, timeoutMs = 3000): Promise<string> {
    const end = Date.now() + timeoutMs;
    for (;;) {
      const i = this.queue.findIndex(match);
      if (i >= 0) return this.queue.splice(i, 1)[0]!;
      if (this.isClosed) throw new Error(`connection closed while waiting for ${what}`);
      const left = end - Date.now();
      if (left <= 0) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.wake.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
  }

  /** The next message in arrival order. */
  next(timeoutMs = 3000): Promise<string> {
    return this.take(() => true, 'a message', timeoutMs);
  }

  /** The next `n` messages in arrival order. */
  async nextN(n: number, timeoutMs = 3000): Promise<string[]> {
    const out: string[] = [];
    for (let i = 0; i < n; i++) out.push(await this.next(timeoutMs));
    return out;
  }

  /** Send one message and return the next message received (use only when nothing else is in flight). */
  async call(hex: string, timeoutMs = 3000): Promise<string> {
    if (this.queue.length > 0) throw new Error(`unexpected queued message ${this.queue[0]!.slice(0, 32)}…`);
    this.send(hex);
    return this.next(timeoutMs);
  }

  /** Assert that nothing arrives for `ms`. */
  async quiet(ms: number): Promise<void> {
    await new Promise((r) => setTimeout(r, ms));
    if (this.queue.length > 0) throw new Error(`expected silence, got ${this.queue[0]!.slice(0, 48)}…`);
  }

  /** Wait until KVM shuts the connection (hard error); rejects after `timeoutMs`. */
  async waitClosed(timeoutMs = 3000): Promise<void> {
    let t: NodeJS.Timeout | undefined;
    await Promise.race([
      this.closed,
      new Promise<never>((_, reject) => (t = setTimeout(() => reject(new Error('the connection was not closed')), timeoutMs))),
    ]).finally(() => clearTimeout(t));
  }

  /** The tool closes its end. */
  end(): void {
    this.socket.end();
  }
}

let counter = 0;

/** A listening introspector socket; every QEMU connection is handshaked and queued as a RawConn. */
export class RawServer {
  private readonly conns: RawConn[] = [];
  private wake: Array<() => void> = [];
  readonly all: RawConn[] = [];
  private constructor(
    readonly path: string,
    private readonly server: net.Server,
  ) {
    server.on('connection', (s) => void this.accept(s));
  }

  static async listen(): Promise<RawServer> {
    const path = `/tmp/psc-${process.pid}-${++counter}-${randomBytes(2).toString('hex')}.sock`;
    const server = net.createServer();
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(path, () => resolve());
    });
    return new RawServer(path, server);
  }

  private async accept(socket: net.Socket): Promise<void> {
    socket.on('error', () => undefined);
    try {
      const hello = await acceptQemuHandshake(socket, { cookieFor: () => KEY });
      const c = new RawConn(socket, hello.leftover);
      this.all.push(c);
      this.conns.push(c);
      const w = this.wake;
      this.wake = [];
      for (const f of w) f();
    } catch {
      socket.destroy();
    }
  }

  async next(timeoutMs = 5000): Promise<RawConn> {
    const end = Date.now() + timeoutMs;
    while (this.conns.length === 0) {
      const left = end - Date.now();
      if (left <= 0) throw new Error('timed out waiting for a QEMU connection');
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.wake.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
    return this.conns.shift()!;
  }

  async close(): Promise<void> {
    for (const c of this.all) c.socket.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
    rmSync(this.path, { force: true });
  }
}

export interface RigOptions {
  vm?: SimVmOptions;
  qemu?: Partial<Omit<SimQemuOptions, 'path'>>;
}

const live = new Set<Rig>();

/** A simulated VM + its QEMU, connected to a raw tool. */
export class Rig {
  private constructor(
    readonly vm: SimVm,
    readonly qemu: SimQemu,
    readonly server: RawServer,
    public conn: RawConn,
  ) {}

  /** Fixed seed (1) and 1 ms jitter unless given; QEMU does not reconnect unless asked. */
  static async start(opts: RigOptions = {}): Promise<Rig> {
    const server = await RawServer.listen();
    const vm = new SimVm({ seed: 1, jitterMs: 1, ...opts.vm });
    const qemu = new SimQemu(vm, { path: server.path, key: KEY, reconnectSeconds: 60, ...opts.qemu });
    qemu.start();
    const conn = await server.next();
    await qemu.waitHooked();
    const rig = new Rig(vm, qemu, server, conn);
    live.add(rig);
    return rig;
  }

  vcpu(i: number): SimVcpu {
    return this.vm.vcpu(i);
  }

  /** After a connection loss and QEMU's reconnect: the new connection, once hooked. */
  async reconnected(): Promise<RawConn> {
    this.conn = await this.server.next();
    await this.qemu.waitHooked();
    return this.conn;
  }

  async close(): Promise<void> {
    live.delete(this);
    this.qemu.stop();
    await this.server.close();
  }
}

/** Close every rig still open (afterEach). */
export async function closeRigs(): Promise<void> {
  for (const r of [...live]) await r.close();
}

/** The `arch` part KVM would put in an event for this vCPU now (mode given: 8 for the 64-bit boot state). */
export function archOf(v: SimVcpu, mode = 8): Arch {
  const msrs = {} as EventMsrs;
  for (const [k, idx] of Object.entries(EVENT_MSRS) as Array<[keyof EventMsrs, number]>) msrs[k] = v.cpu.readMsr(idx) ?? 0n;
  return { mode, regs: { ...v.cpu.regs }, sregs: structuredClone(v.cpu.sregs), msrs };
}

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export async function until(cond: () => boolean, what: string, timeoutMs = 3000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(2);
  }
}
