/**
 * The tool side of one KVMI connection (what the host agent holds per VM after the QEMU handshake):
 * commands with replies matched by (id, seq) — vCPU replies may overtake VM replies (§2.3) — and
 * events dispatched to a handler that replies on the same socket.
 *
 * Hot path: a vCPU event is handed to `onVcpuEvent` as a `VcpuEventView` over the received frame,
 * without decoding it into objects; the handler answers with `replyToEvent`, which writes the reply
 * frame with `writeEventReply`. The view (and the frame) are valid only during the call; a handler that
 * answers later must first copy what it needs (`session.copyEvent(view)` gives a decoded event).
 */
import type { Duplex } from 'node:stream';
import { commands, type CommandKey } from './catalog.js';
import {
  decodeEvent,
  decodeReply,
  encodeCommand,
  errnoName,
  eventReplyFrameSize,
  VcpuEventView,
  writeEventReply,
  type CommandInput,
  type CommandReply,
  type DecodedEvent,
  type ReplyResult,
} from './codec.js';
import { KVMI_VCPU_EVENT, KVMI_VM_EVENT } from './constants.js';
import { eventDefById } from './catalog.js';
import { KvmiCommandError, KvmiError } from './errors.js';
import { attachFraming, frameId, frameSeq, frameSize, type FrameWriter } from './framing.js';
import { ERROR_CODE_SIZE } from './catalog.js';

export interface KvmiSessionHandlers {
  /** A vCPU event. The view is valid only during the call. Reply with `session.replyToEvent`. */
  onVcpuEvent?(view: VcpuEventView, session: KvmiSession): void;
  /** The VM event (UNHOOK). No reply is sent to it (§5.1). */
  onVmEvent?(event: Extract<DecodedEvent, { kind: 'vm-event' }>, session: KvmiSession): void;
  /** KVM's error answer to one of our event replies (id 1, size 8, §2.5). */
  onEventReplyError?(seq: number, errno: number): void;
  /** A protocol violation by the peer or the socket; the session is closed after it. */
  onError?(err: KvmiError): void;
  onClose?(): void;
}

export interface KvmiSessionOptions extends KvmiSessionHandlers {
  /** Bytes read past the handshake, to be parsed first. */
  leftover?: Buffer;
  /** Default deadline for a command reply. Default 5000 ms. */
  commandTimeoutMs?: number;
  /** First sequence number used for commands. Default 1. */
  firstSeq?: number;
  /**
   * Bound on bytes queued for a peer that does not read. Past it the session closes with
   * `write-queue-full` (only this connection). Default 4 MiB.
   */
  maxQueuedBytes?: number;
}

interface Pending {
  key: CommandKey;
  resolve(r: ReplyResult<CommandKey>): void;
  reject(e: Error): void;
  timer: NodeJS.Timeout;
}

export class KvmiSession {
  private readonly writer: FrameWriter;
  private readonly pending = new Map<number, Pending>();
  private readonly view = new VcpuEventView();
  private readonly handlers: KvmiSessionHandlers;
  private readonly timeoutMs: number;
  private readonly maxQueued: number;
  private seq: number;
  private closed = false;
  /** Set by the first failure: nothing more is reported or dispatched after it. */
  private failed = false;
  /** Counters for health and tests. */
  readonly stats = { commands: 0, replies: 0, events: 0, eventReplies: 0, eventReplyErrors: 0 };

  constructor(private readonly socket: Duplex, options: KvmiSessionOptions = {}) {
    this.handlers = options;
    this.timeoutMs = options.commandTimeoutMs ?? 5000;
    this.seq = options.firstSeq ?? 1;
    this.maxQueued = options.maxQueuedBytes ?? 4 * 1024 * 1024;
    const { writer } = attachFraming(socket, {
      ...(options.leftover ? { leftover: options.leftover } : {}),
      onFrame: (frame) => this.onFrame(frame),
      onError: (err) => this.fail(err),
      onClose: () => this.onClosed(),
    });
    this.writer = writer;
  }

  get isClosed(): boolean {
    return this.closed;
  }

  /** Send a command and resolve with its reply; a KVM error code rejects with `KvmiCommandError`. */
  async request<K extends CommandKey>(key: K, input: CommandInput<K>, timeoutMs?: number): Promise<CommandReply<K>> {
    const r = await this.tryRequest(key, input, timeoutMs);
    if (!r.ok) throw new KvmiCommandError(commands[key].name, r.errno, errnoName(r.errno));
    return r.value;
  }

  /** Send a command and resolve with `{ok, value}` or `{ok: false, errno}` (KVM's answer, not thrown). */
  tryRequest<K extends CommandKey>(key: K, input: CommandInput<K>, timeoutMs = this.timeoutMs): Promise<ReplyResult<K>> {
    if (this.closed) return Promise.reject(new KvmiError('closed', 'the KVMI connection is closed', true));
    const seq = this.nextSeq();
    const frame = encodeCommand(key, seq, input);
    const id = commands[key].id;
    return new Promise<ReplyResult<K>>((resolve, reject) => {
      const k = pendingKey(id, seq);
      const timer = setTimeout(() => {
        this.pending.delete(k);
        reject(new KvmiError('timeout', `${commands[key].name} (seq ${seq}) got no reply within ${timeoutMs} ms`, false));
      }, timeoutMs);
      this.pending.set(k, { key, resolve: resolve as (r: ReplyResult<CommandKey>) => void, reject, timer });
      this.stats.commands++;
      this.send(frame).catch((e: unknown) => this.fail(new KvmiError('closed', `write failed: ${(e as Error).message}`, true)));
    });
  }

  /**
   * Wait for the reply to a command that was written outside the session — the GET_VERSION a tool
   * sends in the same write as the handshake reply (kvmi-v7-libkvmi.md §3 step 7). Call it before the
   * reply can arrive (right after constructing the session) and start the session's own sequence
   * numbers past `seq` (`firstSeq`).
   */
  adoptRequest<K extends CommandKey>(key: K, seq: number, timeoutMs = this.timeoutMs): Promise<ReplyResult<K>> {
    return new Promise<ReplyResult<K>>((resolve, reject) => {
      const k = pendingKey(commands[key].id, seq);
      const timer = setTimeout(() => {
        this.pending.delete(k);
        reject(new KvmiError('timeout', `${commands[key].name} (seq ${seq}) got no reply within ${timeoutMs} ms`, false));
      }, timeoutMs);
      this.pending.set(k, { key, resolve: resolve as (r: ReplyResult<CommandKey>) => void, reject, timer });
    });
  }

  /**
   * Reply to a vCPU event. `action` is the numeric action; `newVal` is required for CR/MSR.
   * Throws (typed, soft) for an action the event does not accept or a CR/MSR reply without new_val.
   */
  replyToEvent(seq: number, vcpu: number, eventId: number, action: number, newVal?: bigint): void {
    const def = eventDefById(eventId);
    if (!def) throw new KvmiError('unknown-event', `no event ${eventId}`, false);
    const buf = Buffer.allocUnsafe(eventReplyFrameSize(def));
    writeEventReply(buf, 0, seq, vcpu, eventId, action, newVal);
    this.stats.eventReplies++;
    this.send(buf);
  }

  private send(frame: Buffer): Promise<void> {
    const p = this.writer.send(frame);
    if (this.writer.queuedBytes > this.maxQueued) {
      this.fail(new KvmiError('write-queue-full', `the peer stopped reading: ${this.writer.queuedBytes} bytes queued (limit ${this.maxQueued})`, true));
    }
    return p;
  }

  /** Decode the event the view points at into owned objects (for handlers that answer later). */
  copyEvent(view: VcpuEventView): DecodedEvent {
    return decodeEvent(Buffer.from(view.frame));
  }

  /** Close the socket (the way a tool ends a session after UNHOOK). */
  close(): void {
    if (!this.closed) this.socket.end();
  }

  private nextSeq(): number {
    const s = this.seq;
    this.seq = (this.seq + 1) >>> 0;
    return s;
  }

  private onFrame(frame: Buffer): void {
    if (this.failed) return;
    const id = frameId(frame);
    if (id === KVMI_VCPU_EVENT) {
      if (frameSize(frame) === ERROR_CODE_SIZE) {
        this.stats.eventReplyErrors++;
        const e = decodeEvent(frame);
        if (e.kind === 'event-reply-error') this.handlers.onEventReplyError?.(e.seq, e.errno);
        return;
      }
      this.stats.events++;
      if (!this.view.reset(frame)) {
        // Not a valid vCPU event: decodeEvent says exactly why.
        try {
          decodeEvent(frame);
          throw new KvmiError('bad-value', 'malformed vCPU event', true);
        } catch (e) {
          this.fail(e instanceof KvmiError ? e : new KvmiError('bad-value', String(e), true));
        }
        return;
      }
      this.handlers.onVcpuEvent?.(this.view, this);
      return;
    }
    if (id === KVMI_VM_EVENT) {
      try {
        const e = decodeEvent(frame);
        if (e.kind === 'vm-event') this.handlers.onVmEvent?.(e, this);
      } catch (e) {
        this.fail(e as KvmiError);
      }
      return;
    }
    const k = pendingKey(id, frameSeq(frame));
    const p = this.pending.get(k);
    if (!p) {
      this.fail(new KvmiError('unknown-message', `reply id ${id} seq ${frameSeq(frame)} matches no pending command`, true));
      return;
    }
    this.pending.delete(k);
    clearTimeout(p.timer);
    this.stats.replies++;
    try {
      p.resolve(decodeReply(p.key, frame));
    } catch (e) {
      p.reject(e as Error);
      this.fail(e as KvmiError);
    }
  }

  private fail(err: KvmiError): void {
    if (this.closed || this.failed) return;
    this.failed = true;
    this.handlers.onError?.(err);
    this.socket.destroy();
  }

  private onClosed(): void {
    if (this.closed) return;
    this.closed = true;
    for (const [, p] of this.pending) {
      clearTimeout(p.timer);
      p.reject(new KvmiError('closed', `${commands[p.key].name}: the KVMI connection closed before the reply`, true));
    }
    this.pending.clear();
    this.handlers.onClose?.();
  }
}

function pendingKey(id: number, seq: number): number {
  return id * 0x100000000 + seq;
}
