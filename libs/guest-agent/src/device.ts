/**
 * `/dev/kvmmem`, real or simulated, behind one interface: a `KvmmemDevice` knows which ABI the module
 * speaks; each `openFile()` is one `open()` of the device (mappings belong to that file: closing it
 * unmaps everything, and every buffer handed out is detached).
 *
 * - Real device (`openKvmmemDevice('/dev/kvmmem')`): the addon's ioctls — ABI v1 `KVM_INTRO_MEM_MAP`
 *   on a page-aligned local page (one token per page) / `KVM_INTRO_MEM_UNMAP(gva)` by value; ABI v2
 *   `KVM_GUEST_MEM_OPEN(uuid)`, `KVM_GUEST_MEM_MAP` (region) + `mmap(MAP_SHARED, offset = start)` /
 *   `munmap` + `KVM_GUEST_MEM_UNMAP(start)` by value. ABI detection: libkvmi's probe (§4.3).
 * - Simulated device (`connectSimKvmmem(socketPath)`, served by `periscope sim --kvmmem-listen`): the
 *   same requests (same numbers) on a Unix socket; the simulator validates the token against the
 *   simulated host and answers the VM's RAM file and offset, which the addon maps MAP_SHARED — over the
 *   reserved page for v1 (MAP_FIXED, as the module replaces the page at gva), or as a new view for v2.
 */
import net from 'node:net';

import { GuestAgentError, KvmmemError, toKvmmemError } from './errors.js';
import { loadAddon, type NativeHandle } from './native.js';

export const PAGE_SIZE = 4096;
const PAGE = 4096n;

/** One mapped page (v1) or region (v2). `buffer` is zero-copy and detached once unmapped. */
export interface KvmmemMapping {
  /** Guest physical address (in the introspected VM) of the first byte. */
  readonly start: bigint;
  /** Bytes. */
  readonly length: number;
  readonly buffer: ArrayBuffer;
  /** What UNMAP takes: v1 the local address (gva), v2 the region start. */
  readonly key: bigint;
}

export interface KvmmemFile {
  readonly abi: 1 | 2;
  readonly simulated: boolean;
  readonly closed: boolean;
  /** ABI v2 `KVM_GUEST_MEM_OPEN(uuid)`; ABI v1 has no OPEN (the token names the VM): a no-op. */
  open(uuid: Uint8Array): Promise<void>;
  /** One map call with one token: v1 the page containing gpa, v2 the region containing it. */
  map(token: Uint8Array, gpa: bigint): Promise<KvmmemMapping>;
  /**
   * Unmap a mapping of this file (its buffer is detached), or send UNMAP for a raw key (the device
   * answers: ENOENT for an unknown address).
   */
  unmap(target: KvmmemMapping | bigint): Promise<void>;
  /** Unmap everything (buffers detached) and close the file. Idempotent. */
  close(): Promise<void>;
}

export interface KvmmemDevice {
  readonly abi: 1 | 2;
  readonly simulated: boolean;
  /** `/dev/kvmmem` or `sim:/path/to.sock`. */
  readonly description: string;
  openFile(): Promise<KvmmemFile>;
}

// ---- the real device ------------------------------------------------------------------------------

class RealFile implements KvmmemFile {
  readonly simulated = false;
  private readonly handle: NativeHandle;
  private readonly live = new Map<bigint, KvmmemMapping>();

  constructor(readonly abi: 1 | 2, path: string) {
    const { KvmmemHandle } = loadAddon();
    try {
      this.handle = new KvmmemHandle(path);
    } catch (e) {
      toKvmmemError(e);
    }
  }

  get closed(): boolean {
    return this.handle.stats().closed;
  }

  async open(uuid: Uint8Array): Promise<void> {
    if (this.abi === 1) return;
    try {
      this.handle.v2Open(uuid);
    } catch (e) {
      toKvmmemError(e);
    }
  }

  async map(token: Uint8Array, gpa: bigint): Promise<KvmmemMapping> {
    try {
      if (this.abi === 1) {
        const m = this.handle.v1Map(token, gpa);
        const mapping = { start: gpa & ~(PAGE - 1n), length: PAGE_SIZE, buffer: m.buffer, key: m.address };
        this.live.set(mapping.key, mapping);
        return mapping;
      }
      const r = this.handle.v2Map(token, gpa);
      const mapping = { start: r.start, length: Number(r.length), buffer: r.buffer, key: r.start };
      this.live.set(mapping.key, mapping);
      return mapping;
    } catch (e) {
      toKvmmemError(e);
    }
  }

  async unmap(target: KvmmemMapping | bigint): Promise<void> {
    const key = typeof target === 'bigint' ? target : target.key;
    this.live.delete(key);
    try {
      if (this.abi === 1) this.handle.v1Unmap(key);
      else this.handle.v2Unmap(key);
    } catch (e) {
      toKvmmemError(e);
    }
  }

  async close(): Promise<void> {
    this.live.clear();
    this.handle.close();
  }
}

/** Open the real device once to learn its ABI (libkvmi's probe), then close it. */
export function openKvmmemDevice(path = '/dev/kvmmem'): KvmmemDevice {
  const { KvmmemHandle } = loadAddon();
  let abi: 1 | 2;
  try {
    const h = new KvmmemHandle(path);
    try {
      abi = h.probe().abi;
    } finally {
      h.close();
    }
  } catch (e) {
    toKvmmemError(e);
  }
  return {
    abi,
    simulated: false,
    description: path,
    openFile: async () => new RealFile(abi, path),
  };
}

// ---- the simulated device ---------------------------------------------------------------------------

const REQ = {
  KVM_INTRO_MEM_MAP: 0x40306901,
  KVM_INTRO_MEM_UNMAP: 0x40086902,
  KVM_GUEST_MEM_OPEN: 0x40086901,
  KVM_GUEST_MEM_MAP: 0xc0306902,
  KVM_GUEST_MEM_UNMAP: 0x40086903,
} as const;
const REQ_NAME = new Map<number, string>(Object.entries(REQ).map(([k, v]) => [v, k]));
const MAX_MESSAGE = 64 * 1024;

interface SimAnswer {
  id: number;
  errno: number;
  path?: string;
  offset?: string;
  gpa?: string;
  length?: string;
}

const ERRNO_NAMES: Record<number, string> = {
  1: 'EPERM', 2: 'ENOENT', 11: 'EAGAIN', 12: 'ENOMEM', 14: 'EFAULT', 16: 'EBUSY', 19: 'ENODEV', 22: 'EINVAL', 25: 'ENOTTY', 114: 'EALREADY',
};
const errnoName = (n: number): string => ERRNO_NAMES[n] ?? `ERRNO_${n}`;
const hex = (v: bigint): string => `0x${v.toString(16)}`;

/** One connection to the simulated device = one open file (the wire format: libs/simulator/src/kvmmem/protocol.ts). */
class SimConnection {
  private nextId = 1;
  private readonly pending = new Map<number, { resolve(a: SimAnswer): void; reject(e: Error): void }>();
  private buf: Buffer = Buffer.alloc(0);
  private failure: GuestAgentError | undefined;

  private constructor(private readonly socket: net.Socket, readonly path: string) {
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('error', (e) => this.fail(new GuestAgentError('device-protocol', `simulated kvmmem ${path}: ${e.message}`, { cause: e })));
    socket.on('close', () => this.fail(new GuestAgentError('device-protocol', `simulated kvmmem ${path}: connection closed`)));
  }

  static connect(path: string): Promise<SimConnection> {
    return new Promise((resolve, reject) => {
      const s = net.createConnection(path);
      s.once('connect', () => {
        s.removeAllListeners('error');
        resolve(new SimConnection(s, path));
      });
      s.once('error', (e: NodeJS.ErrnoException) => {
        reject(new KvmmemError(e.code ?? 'ENOENT', typeof e.errno === 'number' ? -e.errno : 2, `open sim:${path}`, `cannot open the simulated kvmmem at ${path}: ${e.message}`));
      });
    });
  }

  get isClosed(): boolean {
    return this.failure !== undefined;
  }

  /** One "ioctl": resolves with the answer; a non-zero errno rejects with `KvmmemError`. */
  call(req: number, args: Record<string, string>): Promise<SimAnswer> {
    if (this.failure) return Promise.reject(this.failure);
    const id = this.nextId++;
    const body = Buffer.from(JSON.stringify({ id, pid: process.pid, req, ...args }), 'utf8');
    const frame = Buffer.allocUnsafe(4 + body.length);
    frame.writeUInt32LE(body.length, 0);
    body.copy(frame, 4);
    return new Promise<SimAnswer>((resolve, reject) => {
      this.pending.set(id, {
        resolve: (a) => {
          if (a.errno === 0) resolve(a);
          else reject(new KvmmemError(errnoName(a.errno), a.errno, `ioctl ${REQ_NAME.get(req) ?? hex(BigInt(req))}`));
        },
        reject,
      });
      this.socket.write(frame);
    });
  }

  close(): void {
    this.socket.end();
    this.fail(new GuestAgentError('closed', 'the simulated kvmmem file is closed'));
  }

  private onData(chunk: Buffer): void {
    this.buf = this.buf.length === 0 ? chunk : Buffer.concat([this.buf, chunk]);
    while (this.buf.length >= 4) {
      const n = this.buf.readUInt32LE(0);
      if (n > MAX_MESSAGE) {
        this.socket.destroy();
        return;
      }
      if (this.buf.length < 4 + n) return;
      let a: SimAnswer;
      try {
        a = JSON.parse(this.buf.subarray(4, 4 + n).toString('utf8')) as SimAnswer;
      } catch {
        this.socket.destroy();
        return;
      }
      this.buf = this.buf.subarray(4 + n);
      const p = this.pending.get(a.id);
      if (!p) continue;
      this.pending.delete(a.id);
      p.resolve(a);
    }
  }

  private fail(e: GuestAgentError): void {
    if (this.failure) return;
    this.failure = e;
    for (const p of this.pending.values()) p.reject(e);
    this.pending.clear();
  }
}

function parseU64(v: string | undefined, what: string): bigint {
  if (typeof v !== 'string' || !/^0x[0-9a-f]{1,16}$/i.test(v)) throw new GuestAgentError('device-protocol', `simulated kvmmem: bad ${what} ${String(v)}`);
  return BigInt(v);
}

class SimFile implements KvmmemFile {
  readonly simulated = true;
  private readonly handle: NativeHandle;
  private readonly live = new Map<bigint, { mapping: KvmmemMapping; address: bigint }>();
  private closed_ = false;

  constructor(readonly abi: 1 | 2, private readonly conn: SimConnection) {
    this.handle = new (loadAddon().KvmmemHandle)();
  }

  get closed(): boolean {
    return this.closed_;
  }

  async open(uuid: Uint8Array): Promise<void> {
    if (this.abi === 1) return;
    await this.conn.call(REQ.KVM_GUEST_MEM_OPEN, { uuid: Buffer.from(uuid).toString('hex') });
  }

  async map(token: Uint8Array, gpa: bigint): Promise<KvmmemMapping> {
    if (this.closed_) throw new GuestAgentError('closed', 'the kvmmem file is closed');
    const tok = Buffer.from(token.buffer, token.byteOffset, token.byteLength).toString('hex');
    if (this.abi === 1) {
      // The module replaces the backing page of a resident, page-aligned local page (§3.4).
      let page;
      try {
        page = this.handle.reservePage();
      } catch (e) {
        toKvmmemError(e);
      }
      let answer: SimAnswer;
      try {
        answer = await this.conn.call(REQ.KVM_INTRO_MEM_MAP, { token: tok, gpa: hex(gpa), gva: hex(page.address) });
      } catch (e) {
        this.handle.release(page.address);
        throw e;
      }
      try {
        this.handle.mapFile(answer.path ?? '', parseU64(answer.offset, 'offset'), PAGE_SIZE, page.address);
      } catch (e) {
        this.handle.release(page.address);
        await this.conn.call(REQ.KVM_INTRO_MEM_UNMAP, { arg: hex(page.address) }).catch(() => undefined);
        toKvmmemError(e);
      }
      const mapping: KvmmemMapping = { start: gpa & ~(PAGE - 1n), length: PAGE_SIZE, buffer: page.buffer, key: page.address };
      this.live.set(mapping.key, { mapping, address: page.address });
      return mapping;
    }
    const answer = await this.conn.call(REQ.KVM_GUEST_MEM_MAP, { token: tok, gpa: hex(gpa) });
    const start = parseU64(answer.gpa, 'region start');
    const length = parseU64(answer.length, 'region length');
    let view;
    try {
      view = this.handle.mapFile(answer.path ?? '', start, Number(length));
    } catch (e) {
      await this.conn.call(REQ.KVM_GUEST_MEM_UNMAP, { arg: hex(start) }).catch(() => undefined);
      toKvmmemError(e);
    }
    const mapping: KvmmemMapping = { start, length: Number(length), buffer: view.buffer as ArrayBuffer, key: start };
    this.live.set(start, { mapping, address: view.address });
    return mapping;
  }

  async unmap(target: KvmmemMapping | bigint): Promise<void> {
    if (this.closed_) throw new GuestAgentError('closed', 'the kvmmem file is closed');
    const key = typeof target === 'bigint' ? target : target.key;
    const entry = this.live.get(key);
    this.live.delete(key);
    if (this.abi === 1) {
      // UNMAP first (the module drops the entry in every case), then our page goes.
      try {
        await this.conn.call(REQ.KVM_INTRO_MEM_UNMAP, { arg: hex(key) });
      } finally {
        if (entry) this.handle.release(entry.address);
      }
    } else {
      // munmap first: the module refuses to unmap a region that is still mmapped.
      if (entry) this.handle.release(entry.address);
      await this.conn.call(REQ.KVM_GUEST_MEM_UNMAP, { arg: hex(key) });
    }
  }

  async close(): Promise<void> {
    if (this.closed_) return;
    this.closed_ = true;
    this.live.clear();
    this.handle.close(); // every buffer detached, every view unmapped
    this.conn.close(); // the device's release unmaps everything mapped through this file
  }
}

/** Connect to the simulated device, learn its ABI with libkvmi's probe (UNMAP(0): ENOTTY → v1). */
export async function connectSimKvmmem(socketPath: string): Promise<KvmmemDevice> {
  loadAddon();
  const probe = await SimConnection.connect(socketPath);
  let abi: 1 | 2 = 2;
  try {
    await probe.call(REQ.KVM_GUEST_MEM_UNMAP, { arg: '0x0' });
  } catch (e) {
    if (e instanceof KvmmemError && e.code === 'ENOTTY') abi = 1;
    else if (!(e instanceof KvmmemError)) throw e;
  } finally {
    probe.close();
  }
  return {
    abi,
    simulated: true,
    description: `sim:${socketPath}`,
    openFile: async () => new SimFile(abi, await SimConnection.connect(socketPath)),
  };
}
