/**
 * The QEMU ↔ introspector handshake (kvmi-v7-libkvmi.md §3), both sides.
 *
 * The introspection tool is the server. QEMU connects and writes `qemu_vmi_to_introspector` (96 bytes,
 * or 104 with `max_gpa`) in one write; the tool answers with the 24-byte `kvmi_introspector2qemu`
 * carrying SHA-1 of the VM's secret; QEMU then hands the socket to KVM, and the same socket carries KVMI.
 *
 * Both sides read with socket 'data' events and manual buffering, and stop reading (pause + remove the
 * listener) as soon as the handshake bytes are in: whatever arrived beyond them is returned as
 * `leftover`, to be fed to the FrameReader (`attachFraming({ leftover })`). The socket is left paused.
 * On any failure the socket is destroyed (libkvmi and QEMU both close the connection).
 */
import { createHash, timingSafeEqual } from 'node:crypto';
import type { Duplex } from 'node:stream';

import { KvmiWireError } from './framing.js';
import { LayoutError } from './layout.js';
import { kvmi_introspector2qemu, kvmi_qemu2introspector, qemu_vmi_to_introspector_newer } from './structs.js';

// ---- layout-derived facts ---------------------------------------------------------------------

const Q2I_SIZE_OFFSET = kvmi_qemu2introspector.field('struct_size').offset;
/** libkvmi's lower bound: offsetof(name) — fewer bytes are ENODATA. */
export const QEMU_HANDSHAKE_MIN_STRUCT_SIZE: number = kvmi_qemu2introspector.field('name').offset;
/** libkvmi's upper bound (E2BIG above). A protocol constant, not a layout fact. */
export const QEMU_HANDSHAKE_MAX_STRUCT_SIZE = 65536;
/** The older form: the part libkvmi keeps. */
const Q2I_KEPT = kvmi_qemu2introspector.size;
const NAME_LAST_BYTE = kvmi_qemu2introspector.field('name').offset + kvmi_qemu2introspector.field('name').size - 1;
const MAX_GPA_OFFSET = qemu_vmi_to_introspector_newer.field('max_gpa').offset;
/** The newer form: a struct at least this long carries `max_gpa`. */
const Q2I_NEWER = qemu_vmi_to_introspector_newer.size;

const I2Q_SIZE_OFFSET = kvmi_introspector2qemu.field('struct_size').offset;
const COOKIE_OFFSET = kvmi_introspector2qemu.field('cookie_hash').offset;
const COOKIE_SIZE = kvmi_introspector2qemu.field('cookie_hash').size;
/** QEMU requires the reply's struct_size ≥ offsetof(cookie_hash) + 20. */
export const INTROSPECTOR_REPLY_MIN_SIZE: number = COOKIE_OFFSET + COOKIE_SIZE;
/** sizeof(kvmi_introspector2qemu): what the tool sends. */
export const INTROSPECTOR_REPLY_SIZE: number = kvmi_introspector2qemu.size;

if (Q2I_SIZE_OFFSET !== 0 || I2Q_SIZE_OFFSET !== 0) {
  throw new Error('handshake: struct_size must be the first field of both handshake structs');
}

// ---- uuid helpers -----------------------------------------------------------------------------

const UUID_RE = /^([0-9a-f]{8})-([0-9a-f]{4})-([0-9a-f]{4})-([0-9a-f]{4})-([0-9a-f]{12})$/i;

/** 16 raw bytes → canonical lowercase `8-4-4-4-12` text, bytes in order (as QEMU prints them). */
export function uuidToText(uuid: Uint8Array): string {
  if (uuid.length !== 16) throw new KvmiWireError('invalid-argument', `a uuid has 16 bytes, got ${uuid.length}`);
  const h = Buffer.from(uuid.buffer, uuid.byteOffset, 16).toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** `8-4-4-4-12` hex text (either case) → 16 raw bytes. */
export function uuidFromText(text: string): Uint8Array {
  const m = UUID_RE.exec(text);
  if (!m) throw new KvmiWireError('invalid-argument', `not a canonical uuid: ${JSON.stringify(text)}`);
  return new Uint8Array(Buffer.from(m.slice(1).join(''), 'hex'));
}

/** SHA-1 of the secret's raw bytes: the `cookie_hash` QEMU expects. */
export function cookieHash(secret: Uint8Array): Buffer {
  return createHash('sha1').update(secret).digest();
}

// ---- socket reading with manual buffering -----------------------------------------------------

/**
 * Buffers 'data' chunks of a socket for a pull-style parser, under one deadline for the whole exchange.
 * Every failure destroys the socket.
 */
class HandshakeIo {
  private chunks: Buffer[] = [];
  private avail = 0;
  private ended = false;
  private reading = true;
  private waiter: { n: number; resolve: () => void; reject: (err: unknown) => void } | undefined;
  private failure: KvmiWireError | undefined;
  private readonly timer: NodeJS.Timeout;
  private rejectFailed!: (err: unknown) => void;
  /** Rejects when the exchange fails; raced against anything the parser awaits. */
  readonly failed: Promise<never>;

  constructor(
    private readonly socket: Duplex,
    timeoutMs: number,
    private readonly what: string,
  ) {
    this.failed = new Promise<never>((_, reject) => {
      this.rejectFailed = reject;
    });
    this.failed.catch(() => undefined);
    this.timer = setTimeout(
      () => this.fail(new KvmiWireError('handshake-timeout', `${what}: handshake not completed within ${timeoutMs} ms`)),
      timeoutMs,
    );
    socket.on('data', this.onData);
    socket.on('end', this.onEnd);
    socket.on('close', this.onClose);
    socket.on('error', this.onError);
    if (socket.destroyed) this.onClose();
    else socket.resume();
  }

  /** Wait for and take exactly `n` bytes. */
  async read(n: number): Promise<Buffer> {
    await this.waitFor(n);
    return this.take(n);
  }

  /** Wait for and drop exactly `n` bytes (without keeping more than one chunk at a time). */
  async discard(n: number): Promise<void> {
    let left = n;
    while (left > 0) {
      if (this.avail === 0) await this.waitFor(1);
      const k = Math.min(left, this.avail);
      this.take(k, false);
      left -= k;
    }
  }

  /** Race a promise against the deadline and connection loss. */
  guard<T>(p: Promise<T> | T): Promise<T> {
    return Promise.race([Promise.resolve(p), this.failed]);
  }

  /** Write `data` in one write and wait until it is handed to the OS. */
  write(data: Buffer): Promise<void> {
    this.check();
    const done = new Promise<void>((resolve, reject) => {
      this.socket.write(data, (err?: Error | null) => {
        if (err) reject(new KvmiWireError('socket-error', `${this.what}: write failed: ${err.message}`, { cause: err }));
        else resolve();
      });
    });
    done.catch(() => undefined);
    return this.guard(done);
  }

  /** Stop reading: pause the socket, drop the 'data' listener, and return the bytes read past the handshake. */
  stopReading(): Buffer {
    if (this.reading) {
      this.reading = false;
      this.socket.pause();
      this.socket.off('data', this.onData);
    }
    const rest = this.chunks.length === 1 ? this.chunks[0]! : Buffer.concat(this.chunks, this.avail);
    this.chunks = [];
    this.avail = 0;
    return rest;
  }

  /** Success: stop reading, clear the deadline, remove every listener; returns the leftover. */
  finish(): Buffer {
    this.check();
    const leftover = this.stopReading();
    clearTimeout(this.timer);
    this.socket.off('end', this.onEnd);
    this.socket.off('close', this.onClose);
    this.socket.off('error', this.onError);
    return leftover;
  }

  /** Failure: destroy the socket and normalise `err` into a KvmiWireError. */
  abort(err: unknown): KvmiWireError {
    const e =
      err instanceof KvmiWireError
        ? err
        : new KvmiWireError('socket-error', `${this.what}: ${err instanceof Error ? err.message : String(err)}`, { cause: err });
    this.fail(e);
    return this.failure ?? e;
  }

  fail(err: KvmiWireError): void {
    if (this.failure) return;
    this.failure = err;
    clearTimeout(this.timer);
    this.socket.off('data', this.onData);
    this.socket.off('end', this.onEnd);
    this.socket.off('close', this.onClose);
    // Keep an 'error' listener: the socket is being destroyed, and a late error must not crash the process.
    this.socket.off('error', this.onError);
    this.socket.on('error', ignoreError);
    this.socket.destroy();
    const w = this.waiter;
    this.waiter = undefined;
    w?.reject(err);
    this.rejectFailed(err);
  }

  private check(): void {
    if (this.failure) throw this.failure;
  }

  private waitFor(n: number): Promise<void> {
    this.check();
    if (this.avail >= n) return Promise.resolve();
    if (this.ended) {
      const err = new KvmiWireError('closed', `${this.what}: the peer closed the connection during the handshake`);
      this.fail(err);
      return Promise.reject(err);
    }
    return new Promise<void>((resolve, reject) => {
      this.waiter = { n, resolve, reject };
    });
  }

  private take(n: number, keep = true): Buffer {
    const out = keep ? Buffer.allocUnsafe(n) : undefined;
    let pos = 0;
    while (pos < n) {
      const c = this.chunks[0]!;
      const k = Math.min(c.length, n - pos);
      if (out) c.copy(out, pos, 0, k);
      pos += k;
      if (k === c.length) this.chunks.shift();
      else this.chunks[0] = c.subarray(k);
    }
    this.avail -= n;
    return out ?? EMPTY;
  }

  private readonly onData = (chunk: Buffer | string): void => {
    if (typeof chunk === 'string') {
      this.fail(new KvmiWireError('invalid-argument', `${this.what}: the socket has an encoding set; binary data required`));
      return;
    }
    this.chunks.push(chunk);
    this.avail += chunk.length;
    const w = this.waiter;
    if (w && this.avail >= w.n) {
      this.waiter = undefined;
      w.resolve();
    }
  };

  private readonly onEnd = (): void => {
    this.ended = true;
    if (this.waiter) {
      this.fail(new KvmiWireError('closed', `${this.what}: the peer closed the connection during the handshake`));
    }
  };

  private readonly onClose = (): void => {
    const cause = this.socket.errored ?? undefined;
    this.fail(
      cause
        ? new KvmiWireError('socket-error', `${this.what}: socket error: ${cause.message}`, { cause })
        : new KvmiWireError('closed', `${this.what}: the connection closed during the handshake`),
    );
  };

  private readonly onError = (err: Error): void => {
    this.fail(new KvmiWireError('socket-error', `${this.what}: socket error: ${err.message}`, { cause: err }));
  };
}

const EMPTY = Buffer.alloc(0);
const ignoreError = (): void => undefined;

// ---- tool side (server) -----------------------------------------------------------------------

export interface AcceptQemuHandshakeOptions {
  /**
   * The VM's secret (the raw bytes of QEMU's `key=` secret object), or undefined to reject the VM.
   * May be async; it runs under the same deadline. A throw also rejects the VM.
   */
  cookieFor(
    uuid: Uint8Array,
    name: string,
  ): Buffer | Uint8Array | undefined | Promise<Buffer | Uint8Array | undefined>;
  /** Deadline for the whole exchange, ms. Default 15000 (libkvmi's KVMI_MAX_TIMEOUT). */
  timeoutMs?: number;
  /** Bytes written in the same write as the 24-byte reply (e.g. an encoded KVMI_GET_VERSION). */
  afterReply?: Buffer;
}

export interface QemuHello {
  /** 16 raw bytes. */
  uuid: Uint8Array;
  /** Canonical lowercase `8-4-4-4-12`. */
  uuidText: string;
  /** At most 63 bytes (name[63] is forced to NUL), decoded as UTF-8. */
  name: string;
  /** QEMU_CLOCK_REALTIME milliseconds at VM creation / last reset (s64). */
  startTimeMs: bigint;
  /** Highest guest physical address; only when struct_size ≥ 104. */
  maxGpa: bigint | undefined;
  /** struct_size as QEMU sent it. */
  structSize: number;
  /** Bytes read past the handshake: feed them to the FrameReader before anything else. */
  leftover: Buffer;
}

/**
 * Tool side: read QEMU's handshake exactly as libkvmi does, answer with SHA-1(secret) (+ `afterReply`, in
 * the same write). Resolves once the reply has been handed to the OS; the socket is left paused.
 */
export async function acceptQemuHandshake(socket: Duplex, options: AcceptQemuHandshakeOptions): Promise<QemuHello> {
  const io = new HandshakeIo(socket, options.timeoutMs ?? 15000, 'QEMU handshake (tool side)');
  try {
    const sizeBytes = await io.read(4);
    const structSize = sizeBytes.readUInt32LE(0);
    if (structSize < QEMU_HANDSHAKE_MIN_STRUCT_SIZE) {
      throw new KvmiWireError('handshake-too-small', `QEMU handshake struct_size ${structSize} < ${QEMU_HANDSHAKE_MIN_STRUCT_SIZE}`);
    }
    if (structSize > QEMU_HANDSHAKE_MAX_STRUCT_SIZE) {
      throw new KvmiWireError('handshake-too-large', `QEMU handshake struct_size ${structSize} > ${QEMU_HANDSHAKE_MAX_STRUCT_SIZE}`);
    }
    // Keep up to the end of max_gpa (the first 96 bytes as libkvmi does, plus max_gpa); discard the rest.
    const kept = Math.min(structSize, Q2I_NEWER);
    const raw = Buffer.alloc(Q2I_NEWER);
    sizeBytes.copy(raw, 0);
    (await io.read(kept - 4)).copy(raw, 4);
    await io.discard(structSize - kept);
    const leftover = io.stopReading();

    raw[NAME_LAST_BYTE] = 0;
    // libkvmi reads min(struct_size, 96) − 4 bytes into a zero-filled 96-byte struct: bytes 96.. are not
    // part of it (max_gpa is read separately, and only when the whole field is present).
    const hello = kvmi_qemu2introspector.read(raw.subarray(0, Q2I_KEPT), 0);
    const maxGpa = structSize >= Q2I_NEWER ? raw.readBigUInt64LE(MAX_GPA_OFFSET) : undefined;

    let secret: Buffer | Uint8Array | undefined;
    try {
      secret = await io.guard(options.cookieFor(hello.uuid, hello.name));
    } catch (err) {
      if (err instanceof KvmiWireError) throw err;
      throw new KvmiWireError('handshake-rejected', `cookieFor failed: ${err instanceof Error ? err.message : String(err)}`, {
        cause: err,
      });
    }
    const uuidText = uuidToText(hello.uuid);
    if (secret === undefined) {
      throw new KvmiWireError('handshake-rejected', `no secret for VM ${uuidText} (${JSON.stringify(hello.name)}); rejected`);
    }

    const reply = kvmi_introspector2qemu.encode({ struct_size: INTROSPECTOR_REPLY_SIZE, cookie_hash: cookieHash(secret) });
    const after = options.afterReply;
    await io.write(after && after.length > 0 ? Buffer.concat([reply, after]) : reply);
    io.finish();
    return {
      uuid: hello.uuid,
      uuidText,
      name: hello.name,
      startTimeMs: hello.start_time,
      maxGpa,
      structSize,
      leftover,
    };
  } catch (err) {
    throw io.abort(err);
  }
}

// ---- QEMU side (client, for the simulator) ----------------------------------------------------

export interface PerformQemuHandshakeOptions {
  /** 96 = older QEMU (`kvmi_qemu2introspector`), 104 = current QEMU (with `max_gpa`). */
  form: 96 | 104;
  /** 16 raw bytes. */
  uuid: Uint8Array;
  /** Truncated to 63 UTF-8 bytes (never splitting a character) + NUL. */
  name: string;
  startTimeMs: bigint;
  /** Sent only in the 104-byte form. */
  maxGpa: bigint;
  /** The secret. Absent: any cookie_hash is accepted and `authenticated` is false (QEMU only warns). */
  key?: Buffer | Uint8Array;
  /** Deadline for the whole exchange, ms. Default 10000 (QEMU's handshake_timeout). */
  timeoutMs?: number;
}

export interface QemuHandshakeResult {
  /** True when a key was set and the tool's cookie_hash matched it. */
  authenticated: boolean;
  /** Bytes that arrived after the reply (e.g. the tool's GET_VERSION): they belong to the kernel side. */
  leftover: Buffer;
}

/**
 * QEMU side: write the handshake struct in one write, read the tool's reply (4 bytes of struct_size, then
 * exactly struct_size − 4 more), check the cookie. The socket is left paused with nothing consumed past the
 * reply except what `leftover` returns.
 */
export async function performQemuHandshake(
  socket: Duplex,
  options: PerformQemuHandshakeOptions,
): Promise<QemuHandshakeResult> {
  const { form, uuid, name, startTimeMs, maxGpa, key } = options;
  if (form !== 96 && form !== 104) throw new KvmiWireError('invalid-argument', `form must be 96 or 104, got ${String(form)}`);
  if (!(uuid instanceof Uint8Array) || uuid.length !== 16) {
    throw new KvmiWireError('invalid-argument', 'uuid must be 16 bytes');
  }
  let hello: Buffer;
  try {
    const common = { uuid, start_time: startTimeMs, name };
    hello =
      form === 96
        ? kvmi_qemu2introspector.encode({ struct_size: kvmi_qemu2introspector.size, ...common })
        : qemu_vmi_to_introspector_newer.encode({ struct_size: qemu_vmi_to_introspector_newer.size, ...common, max_gpa: maxGpa });
  } catch (err) {
    if (err instanceof LayoutError) throw new KvmiWireError('invalid-argument', err.message, { cause: err });
    throw err;
  }
  if (hello.length !== form) throw new Error(`handshake struct is ${hello.length} bytes, expected ${form}`);
  const expected = key === undefined ? undefined : cookieHash(key);

  const io = new HandshakeIo(socket, options.timeoutMs ?? 10000, 'QEMU handshake (QEMU side)');
  try {
    await io.write(hello);
    const structSize = (await io.read(4)).readUInt32LE(0);
    if (structSize < INTROSPECTOR_REPLY_MIN_SIZE) {
      throw new KvmiWireError('handshake-too-small', `introspector reply struct_size ${structSize} < ${INTROSPECTOR_REPLY_MIN_SIZE}`);
    }
    const body = await io.read(INTROSPECTOR_REPLY_MIN_SIZE - 4);
    await io.discard(structSize - INTROSPECTOR_REPLY_MIN_SIZE);
    const hash = body.subarray(COOKIE_OFFSET - 4, COOKIE_OFFSET - 4 + COOKIE_SIZE);
    if (expected !== undefined && !timingSafeEqual(hash, expected)) {
      throw new KvmiWireError('handshake-refused', 'the introspector sent a wrong cookie_hash (invalid authentication token)');
    }
    return { authenticated: expected !== undefined, leftover: io.finish() };
  } catch (err) {
    throw io.abort(err);
  }
}
