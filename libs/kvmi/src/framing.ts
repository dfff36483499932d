/**
 * Stream framing for KVMI sockets (kvmi-v12.md §2.1–§2.2, kvmi-v7-libkvmi.md §1).
 *
 * Every message, in either direction, is an 8-byte `kvmi_msg_hdr {u16 id; u16 size; u32 seq}` followed by
 * `size` payload bytes, `size` ≤ KVMI_MAX_MSG_SIZE (8184). A larger `size` is a hard error: KVM closes
 * the connection, and so do we.
 *
 * - `FrameReader` turns a byte stream (arbitrary chunking) into whole messages.
 * - `FrameWriter` writes whole messages, never interleaving two, batching the messages queued in one tick
 *   into one socket write, and respecting the socket's backpressure.
 * - `attachFraming` wires both to a socket.
 *
 * Header offsets come from the `kvmi_msg_hdr` layout in `structs.ts` (computed once, at module load).
 */
import type { Duplex, Writable } from 'node:stream';

import { KVMI_MAX_MSG_SIZE } from './constants.js';
import { kvmi_msg_hdr } from './structs.js';
import { KvmiWireError } from './errors.js';

export { KvmiWireError, type KvmiWireErrorCode } from './errors.js';

// ---- header access ----------------------------------------------------------------------------

function scalarField(name: string, kind: 'u16' | 'u32'): number {
  const f = kvmi_msg_hdr.field(name);
  if (f.spec.kind !== kind) throw new Error(`kvmi_msg_hdr.${name}: framing expects ${kind}, layout says ${f.spec.kind}`);
  return f.offset;
}

/** sizeof(struct kvmi_msg_hdr). */
export const MSG_HDR_SIZE: number = kvmi_msg_hdr.size;
const ID_OFFSET = scalarField('id', 'u16');
const SIZE_OFFSET = scalarField('size', 'u16');
const SEQ_OFFSET = scalarField('seq', 'u32');
/** Largest whole message: header + KVMI_MAX_MSG_SIZE. */
export const MAX_FRAME_SIZE: number = MSG_HDR_SIZE + KVMI_MAX_MSG_SIZE;

/** `hdr.id` of the message starting at `at`. */
export function frameId(buf: Buffer, at = 0): number {
  return buf.readUInt16LE(at + ID_OFFSET);
}
/** `hdr.size` (payload length) of the message starting at `at`. */
export function frameSize(buf: Buffer, at = 0): number {
  return buf.readUInt16LE(at + SIZE_OFFSET);
}
/** `hdr.seq` of the message starting at `at`. */
export function frameSeq(buf: Buffer, at = 0): number {
  return buf.readUInt32LE(at + SEQ_OFFSET);
}
/** The header as an object (allocates; the three accessors above don't). */
export function readHeader(buf: Buffer, at = 0): { id: number; size: number; seq: number } {
  return { id: frameId(buf, at), size: frameSize(buf, at), seq: frameSeq(buf, at) };
}
/** Write a header at `at` (no range checks beyond Buffer's own). */
export function writeHeader(buf: Buffer, at: number, id: number, size: number, seq: number): void {
  buf.writeUInt16LE(id, at + ID_OFFSET);
  buf.writeUInt16LE(size, at + SIZE_OFFSET);
  buf.writeUInt32LE(seq >>> 0, at + SEQ_OFFSET);
}
/** The payload of a whole message (a view). */
export function framePayload(frame: Buffer): Buffer {
  return frame.subarray(MSG_HDR_SIZE);
}

// ---- reader -----------------------------------------------------------------------------------

export interface FrameReaderOptions {
  /**
   * Called once per complete message (header + payload). The buffer is a VIEW that is valid only during
   * the call: it is either a slice of the chunk given to `push` or of the reader's reassembly buffer,
   * which the next `push` overwrites. Copy it (`Buffer.from(frame)`) to keep it.
   * If the callback throws, the reader stops and reports `handler-failed`.
   */
  onFrame(frame: Buffer): void;
  /** Called once with a hard error; the reader has stopped. Without it, errors are thrown from `push`/`end`. */
  onError?(err: KvmiWireError): void;
  /** Largest accepted `hdr.size`. Default KVMI_MAX_MSG_SIZE (8184); values above it are clamped. */
  maxPayload?: number;
}

/**
 * Reassembles messages from a byte stream. Allocation-free per message: whole messages inside a chunk are
 * handed out as `subarray` views of that chunk; only a message that straddles chunks is copied, into a
 * reassembly buffer allocated once (the only bytes ever kept are the tail of that one incomplete message,
 * so the buffer never needs more than one maximal message and the data always starts at offset 0).
 */
export class FrameReader {
  private readonly onFrame: (frame: Buffer) => void;
  private readonly onError: ((err: KvmiWireError) => void) | undefined;
  private readonly maxPayload: number;
  /** Reassembly buffer: bytes [0, fill) are the start of the next message. */
  private readonly buf: Buffer;
  private fill = 0;
  /** Whole length of the partial message once its header is complete, else 0. */
  private need = 0;
  private stopped_ = false;
  private delivering = false;
  private frames_ = 0;

  constructor(options: FrameReaderOptions) {
    this.onFrame = options.onFrame;
    this.onError = options.onError;
    this.maxPayload = Math.min(options.maxPayload ?? KVMI_MAX_MSG_SIZE, KVMI_MAX_MSG_SIZE);
    this.buf = Buffer.allocUnsafe(MAX_FRAME_SIZE);
  }

  /** True after a hard error or `stop()`; further input is ignored. */
  get stopped(): boolean {
    return this.stopped_;
  }
  /** Bytes held for an incomplete message. */
  get pending(): number {
    return this.fill;
  }
  /** Messages delivered so far. */
  get frames(): number {
    return this.frames_;
  }

  stop(): void {
    this.stopped_ = true;
  }

  /** Feed the next chunk of the stream. Not re-entrant (don't call it from `onFrame`). */
  push(chunk: Buffer): void {
    if (this.stopped_) return;
    if (this.delivering) throw new Error('FrameReader.push called from onFrame');
    const len = chunk.length;
    let off = 0;

    // 1. Complete the message started by earlier chunks.
    if (this.fill > 0) {
      const buf = this.buf;
      if (this.fill < MSG_HDR_SIZE) {
        const n = Math.min(MSG_HDR_SIZE - this.fill, len);
        chunk.copy(buf, this.fill, 0, n);
        this.fill += n;
        off = n;
        if (this.fill < MSG_HDR_SIZE) return;
        const size = frameSize(buf, 0);
        if (size > this.maxPayload) return this.tooLarge(size);
        this.need = MSG_HDR_SIZE + size;
      }
      const n = Math.min(this.need - this.fill, len - off);
      chunk.copy(buf, this.fill, off, off + n);
      this.fill += n;
      off += n;
      if (this.fill < this.need) return;
      const total = this.need;
      this.fill = 0;
      this.need = 0;
      if (!this.deliver(buf.subarray(0, total))) return;
    }

    // 2. Whole messages straight from the chunk.
    while (len - off >= MSG_HDR_SIZE) {
      const size = frameSize(chunk, off);
      if (size > this.maxPayload) return this.tooLarge(size);
      const total = MSG_HDR_SIZE + size;
      if (len - off < total) {
        chunk.copy(this.buf, 0, off, len);
        this.fill = len - off;
        this.need = total;
        return;
      }
      if (!this.deliver(chunk.subarray(off, off + total))) return;
      off += total;
    }

    // 3. Keep a partial header.
    if (off < len) {
      chunk.copy(this.buf, 0, off, len);
      this.fill = len - off;
      this.need = 0;
    }
  }

  /** The stream ended. A partial message is a `truncated` hard error. */
  end(): void {
    if (this.stopped_) return;
    this.stopped_ = true;
    if (this.fill > 0) {
      const have = this.fill;
      this.fill = 0;
      this.fail(new KvmiWireError('truncated', `stream ended inside a message (${have} of ${this.need || '≥ 8'} bytes)`));
    }
  }

  private deliver(frame: Buffer): boolean {
    this.delivering = true;
    try {
      this.onFrame(frame);
      this.frames_++;
    } catch (err) {
      this.stopped_ = true;
      this.delivering = false;
      this.fail(new KvmiWireError('handler-failed', `onFrame threw: ${String(err)}`, { cause: err }));
      return false;
    }
    this.delivering = false;
    return !this.stopped_;
  }

  private tooLarge(size: number): void {
    this.stopped_ = true;
    this.fill = 0;
    this.fail(new KvmiWireError('message-too-large', `message size ${size} exceeds ${this.maxPayload}`));
  }

  private fail(err: KvmiWireError): void {
    if (this.onError) this.onError(err);
    else throw err;
  }
}

// ---- writer -----------------------------------------------------------------------------------

export interface FrameWriterOptions {
  /**
   * Messages queued in one tick are concatenated into writes of at most this many bytes (one write per
   * tick when they fit). Default 64 KiB; never less than one maximal message.
   */
  maxBatchBytes?: number;
}

interface Deferred {
  promise: Promise<void>;
  resolve(): void;
  reject(err: unknown): void;
}

function deferred(): Deferred {
  let resolve!: () => void;
  let reject!: (err: unknown) => void;
  const promise = new Promise<void>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  // Fire-and-forget senders must not crash the process when the connection goes away; awaiting senders
  // still see the rejection.
  promise.catch(() => undefined);
  return { promise, resolve, reject };
}

const DEFAULT_BATCH = 64 * 1024;

/**
 * Writes whole messages to a socket.
 *
 * - Each message goes to the socket as one contiguous piece, so two messages never interleave, whatever
 *   the number of concurrent async callers (JavaScript runs `send` to completion; the socket keeps order).
 * - Messages sent in the same tick are flushed together on `process.nextTick`, concatenated into one
 *   socket write (a single message is written without a copy). The concatenation buffer is allocated once
 *   and reused whenever the socket has released it.
 * - Backpressure: once `socket.write` returns false the writer stops writing and queues, and resumes on
 *   'drain'. The promise returned by `send` settles when the writer is idle again (everything handed to
 *   the socket, which is below its high-water mark), so awaiting senders are slowed down.
 * - The writer listens for 'drain' and 'close' only; the socket's owner must handle 'error' (attachFraming
 *   does). After the socket closes, pending and later sends reject with `closed` / `socket-error`.
 */
export class FrameWriter {
  private readonly socket: Writable;
  private readonly maxBatch: number;
  private queue: Buffer[] = [];
  private head = 0;
  private queued = 0;
  private scheduled = false;
  private congested = false;
  private closing: Promise<void> | undefined;
  private failure: KvmiWireError | undefined;
  private idle: Deferred | undefined;
  private scratch: Buffer | undefined;
  private scratchBusy = false;
  private writes_ = 0;

  constructor(socket: Writable, options: FrameWriterOptions = {}) {
    this.socket = socket;
    this.maxBatch = Math.max(options.maxBatchBytes ?? DEFAULT_BATCH, MAX_FRAME_SIZE);
    socket.on('drain', this.onDrain);
    socket.once('close', this.onClose);
    if (socket.destroyed) this.onClose();
  }

  /** Bytes queued in the writer and not yet handed to the socket. */
  get queuedBytes(): number {
    return this.queued;
  }
  /** Number of `socket.write` calls made so far. */
  get writes(): number {
    return this.writes_;
  }
  /** False once closed, destroyed or failed. */
  get writable(): boolean {
    return this.failure === undefined && this.closing === undefined;
  }

  /**
   * Queue one whole message (header + payload). The writer keeps a reference until the message is handed
   * to the socket: don't modify `frame` before the returned promise settles.
   *
   * Throws `invalid-frame` synchronously for a malformed buffer (a programming error; nothing is queued).
   * The promise resolves when the writer is idle again (see the class comment) and rejects with `closed`
   * (or `socket-error`) if the connection is gone before the message was written. The promise is marked
   * handled: not awaiting it is safe.
   */
  send(frame: Buffer): Promise<void> {
    const len = frame.length;
    if (len < MSG_HDR_SIZE || frameSize(frame) !== len - MSG_HDR_SIZE || len > MAX_FRAME_SIZE) {
      throw new KvmiWireError(
        'invalid-frame',
        len < MSG_HDR_SIZE
          ? `a message needs at least ${MSG_HDR_SIZE} bytes, got ${len}`
          : `hdr.size ${frameSize(frame)} does not match the payload length ${len - MSG_HDR_SIZE} (max ${KVMI_MAX_MSG_SIZE})`,
      );
    }
    if (this.failure) return rejectedHandled(this.failure);
    if (this.closing) return rejectedHandled(new KvmiWireError('closed', 'send after FrameWriter.close()'));
    this.queue.push(frame);
    this.queued += len;
    this.idle ??= deferred();
    if (!this.scheduled && !this.congested) {
      this.scheduled = true;
      process.nextTick(this.flush);
    }
    return this.idle.promise;
  }

  /**
   * Stop accepting messages, write everything queued, then end the socket. Resolves once the socket has
   * finished (or closed).
   */
  close(): Promise<void> {
    if (this.closing) return this.closing;
    const socket = this.socket;
    this.closing = new Promise<void>((resolve) => {
      if (this.failure || socket.destroyed || socket.writableFinished) return resolve();
      const done = (): void => {
        socket.off('finish', done);
        socket.off('close', done);
        resolve();
      };
      socket.on('finish', done);
      socket.on('close', done);
    });
    if (!this.scheduled && !this.congested) this.flush();
    return this.closing;
  }

  /** Drop everything queued, reject pending senders with `closed`, and destroy the socket. */
  destroy(error?: Error): void {
    this.failWith(new KvmiWireError('closed', 'FrameWriter destroyed', { cause: error }));
    this.socket.destroy(error);
  }

  private readonly flush = (): void => {
    this.scheduled = false;
    if (this.failure) return;
    const socket = this.socket;
    const q = this.queue;
    while (this.head < q.length && !this.congested) {
      // Take as many whole messages as fit in one batch (at least one).
      let end = this.head;
      let bytes = 0;
      while (end < q.length && (end === this.head || bytes + q[end]!.length <= this.maxBatch)) {
        bytes += q[end]!.length;
        end++;
      }
      let out: Buffer;
      let usesScratch = false;
      if (end - this.head === 1) {
        out = q[this.head]!;
        q[this.head] = EMPTY;
      } else {
        if (!this.scratchBusy) {
          this.scratch ??= Buffer.allocUnsafe(this.maxBatch);
          usesScratch = true;
          this.scratchBusy = true;
          out = this.scratch.subarray(0, bytes);
        } else {
          out = Buffer.allocUnsafe(bytes);
        }
        let pos = 0;
        for (let i = this.head; i < end; i++) {
          const f = q[i]!;
          f.copy(out, pos);
          pos += f.length;
          q[i] = EMPTY;
        }
      }
      this.head = end;
      this.queued -= bytes;
      this.writes_++;
      const ok = usesScratch ? socket.write(out, this.releaseScratch) : socket.write(out);
      if (!ok) this.congested = true;
      if (this.failure) return; // write() may close the socket synchronously
    }
    if (this.head >= q.length) {
      q.length = 0;
      this.head = 0;
      if (!this.congested) {
        const idle = this.idle;
        this.idle = undefined;
        idle?.resolve();
      }
      if (this.closing && !socket.writableEnded && !socket.destroyed) socket.end();
    }
  };

  private readonly releaseScratch = (): void => {
    this.scratchBusy = false;
  };

  private readonly onDrain = (): void => {
    this.congested = false;
    if (!this.scheduled) this.flush();
  };

  private readonly onClose = (): void => {
    const socket = this.socket;
    const cause = socket.errored ?? undefined;
    this.failWith(
      cause
        ? new KvmiWireError('socket-error', `socket error: ${cause.message}`, { cause })
        : new KvmiWireError('closed', 'the connection closed'),
    );
  };

  private failWith(err: KvmiWireError): void {
    if (this.failure) return;
    this.failure = err;
    this.socket.off('drain', this.onDrain);
    this.socket.off('close', this.onClose);
    this.queue = [];
    this.head = 0;
    this.queued = 0;
    const idle = this.idle;
    this.idle = undefined;
    idle?.reject(err);
  }
}

const EMPTY = Buffer.alloc(0);

/** A rejected promise already marked handled (see `deferred`). */
function rejectedHandled(err: unknown): Promise<void> {
  const p = Promise.reject(err);
  p.catch(() => undefined);
  return p;
}

// ---- wiring -----------------------------------------------------------------------------------

export interface FramingHandlers {
  /** Each whole message; a view valid only during the call (see `FrameReaderOptions.onFrame`). */
  onFrame(frame: Buffer): void;
  /**
   * A hard error: oversized or truncated message, a throwing `onFrame`, or a socket error. For all but
   * socket errors attachFraming then destroys the socket (Node closes it itself after a socket error).
   */
  onError?(err: KvmiWireError): void;
  /** The socket closed (after any `onError`). */
  onClose?(hadError: boolean): void;
}

export interface AttachFramingOptions extends FramingHandlers, FrameWriterOptions {
  /**
   * Bytes already read from the socket that belong to the message stream (the `leftover` of a handshake).
   * They are parsed first, on the next tick, so `onFrame` may use the returned writer.
   */
  leftover?: Buffer;
}

/**
 * Read and write framed messages on `socket`. Resumes the socket (a handshake leaves it paused). All
 * messages, including those in `leftover`, are delivered asynchronously, after this function returns.
 */
export function attachFraming(
  socket: Duplex,
  options: AttachFramingOptions,
): { reader: FrameReader; writer: FrameWriter } {
  const { onFrame, onError, onClose, leftover } = options;
  const report = (err: KvmiWireError): void => {
    onError?.(err);
  };
  const reader = new FrameReader({
    onFrame,
    onError: (err) => {
      socket.off('data', onData);
      report(err);
      // Messages already produced (e.g. the reply to the command before a malformed header) still
      // leave, as they would have from a kernel that answers each message before reading the next.
      const timer = setTimeout(() => socket.destroy(), 100);
      timer.unref();
      void writer.close().finally(() => {
        clearTimeout(timer);
        socket.destroy();
      });
    },
  });
  const writer: FrameWriter = new FrameWriter(socket, options.maxBatchBytes === undefined ? {} : { maxBatchBytes: options.maxBatchBytes });
  const onData = (chunk: Buffer | string): void => {
    if (typeof chunk === 'string') {
      reader.stop();
      report(new KvmiWireError('invalid-argument', 'the socket has an encoding set; framing needs binary data'));
      socket.destroy();
      return;
    }
    reader.push(chunk);
  };
  // Order matters: the leftover must be parsed before any 'data' event, so it is scheduled before the
  // listener is added (adding it, or resume(), schedules the stream's own flowing on the tick queue).
  if (leftover && leftover.length > 0) process.nextTick(() => reader.push(leftover));
  socket.on('data', onData);
  socket.on('end', () => reader.end());
  socket.on('error', (err: Error) => {
    reader.stop();
    report(new KvmiWireError('socket-error', `socket error: ${err.message}`, { cause: err }));
  });
  socket.on('close', (hadError: boolean) => {
    reader.stop();
    onClose?.(hadError);
  });
  socket.resume();
  return { reader, writer };
}
