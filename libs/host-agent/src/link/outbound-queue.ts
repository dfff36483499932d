/**
 * The bounded report queue between the vCPU path and the analysis stream.
 *
 * `push` runs after the KVMI reply was written and costs a few typed-array stores: a record lives in
 * a preallocated ring (struct of arrays), so reporting allocates nothing per event unless the rule
 * wants the whole event (the frame is then copied). When the ring is full the record is dropped and
 * counted; the next flush sends a `LossRecord` first. Nothing here ever waits: a vCPU reply never
 * depends on the link.
 *
 * `flush` (scheduled `lingerMs` after the first push — at once when a full batch is waiting — so
 * events close in time share a message) writes up to `maxBatch` verdict records per `VerdictBatch` (hand-encoded, see wire.ts)
 * and the events that carry a frame as an `EventBatch`, while the sink accepts writes.
 */
import { EventBatch, LossReason, LossRecord, LostRecordType, LinkRequest, EventDisposition, VerdictTier } from '@periscope/contracts';
import { eventFromFrame, kindOfEventId, actionToProto } from './convert.js';
import { LINK_REQUEST, PbWriter } from './wire.js';

/** What the queue needs to know about a VM session (one object per attach, shared by its records). */
export interface LinkVm {
  readonly uuid: string;
  readonly uuidBytes: Buffer;
  readonly generation: number;
}

/** The policy that decided (one object per installed policy). */
export interface PolicyRef {
  readonly id: string;
  readonly version: bigint;
  readonly ruleIds: readonly string[];
  readonly exceptionIds: readonly string[];
}

/** Where batches go (the link's current stream). */
export interface BatchSink {
  /** True while a stream is open and not pushing back. */
  readonly writable: boolean;
  /** Write one encoded LinkRequest whose stream_seq is written by `seq()`; false = stop (backpressure). */
  write(encoded: Buffer): boolean;
  /** The next stream_seq. */
  seq(): number;
  /** True while a stream is open at all. */
  readonly up: boolean;
}

export interface ReportQueueOptions {
  capacity: number;
  maxBatch?: number;
  /** How long the first record of a batch may wait for company (default 2 ms). */
  lingerMs?: number;
  hostId: string;
  wallClockMs?: () => number;
}

const NS_PER_MS = 1e6;

export class ReportQueue {
  readonly capacity: number;
  private readonly maxBatch: number;
  private readonly vm: (LinkVm | undefined)[];
  private readonly policy: (PolicyRef | undefined)[];
  private readonly frame: (Buffer | null)[];
  private readonly i32: Int32Array; // 9 per record
  private readonly f64: Float64Array; // 4 per record: replyLo, replyHi, latencyNs, repliedMs / receivedMs
  private head = 0;
  private size = 0;
  private scheduled = false;
  private lingerTimer: NodeJS.Timeout | undefined;
  private readonly lingerMs: number;
  private readonly writer = new PbWriter();
  private sink: BatchSink | undefined;
  readonly stats = { pushed: 0, sentRecords: 0, sentEvents: 0, verdictBatches: 0, eventBatches: 0, dropped: 0, lossRecords: 0 };
  private readonly lost = { events: 0, verdicts: 0, reason: LossReason.LOSS_REASON_QUEUE_FULL as LossReason, since: 0 };
  private readonly now: () => number;

  constructor(private readonly opts: ReportQueueOptions) {
    this.capacity = Math.max(1, opts.capacity);
    this.maxBatch = opts.maxBatch ?? 512;
    this.lingerMs = opts.lingerMs ?? 2;
    this.vm = new Array<LinkVm | undefined>(this.capacity);
    this.policy = new Array<PolicyRef | undefined>(this.capacity);
    this.frame = new Array<Buffer | null>(this.capacity).fill(null);
    this.i32 = new Int32Array(this.capacity * 9);
    this.f64 = new Float64Array(this.capacity * 5);
    this.now = opts.wallClockMs ?? (() => performance.timeOrigin + performance.now());
  }

  get depth(): number {
    return this.size;
  }

  attach(sink: BatchSink | undefined): void {
    this.sink = sink;
    if (sink) this.schedule();
  }

  /**
   * Queue one verdict record (and the event when `frame` is given — it is copied). Returns false when
   * the record was dropped (queue full).
   */
  push(
    vm: LinkVm,
    vcpu: number,
    seq: number,
    eventId: number,
    tier: VerdictTier,
    defaultReason: number,
    action: number,
    hasReply: boolean,
    replyLo: number,
    replyHi: number,
    ruleIndex: number,
    exceptionIndex: number,
    policy: PolicyRef,
    latencyNs: number,
    receivedMs: number,
    frame: Buffer | null,
  ): boolean {
    if (this.size >= this.capacity) {
      if (this.lost.events + this.lost.verdicts === 0) this.lost.since = this.now();
      this.lost.reason = this.sink?.up ? LossReason.LOSS_REASON_QUEUE_FULL : LossReason.LOSS_REASON_LINK_DOWN;
      this.lost.verdicts++;
      if (frame) this.lost.events++;
      this.stats.dropped++;
      this.schedule();
      return false;
    }
    let slot = this.head + this.size;
    if (slot >= this.capacity) slot -= this.capacity;
    this.size++;
    this.stats.pushed++;
    this.vm[slot] = vm;
    this.policy[slot] = policy;
    this.frame[slot] = frame ? Buffer.from(frame) : null;
    const i = slot * 9;
    const a = this.i32;
    a[i] = vcpu;
    a[i + 1] = seq;
    a[i + 2] = eventId;
    a[i + 3] = tier;
    a[i + 4] = defaultReason;
    a[i + 5] = action;
    a[i + 6] = hasReply ? 1 : 0;
    a[i + 7] = ruleIndex;
    a[i + 8] = exceptionIndex;
    const f = slot * 5;
    const d = this.f64;
    d[f] = replyLo >>> 0;
    d[f + 1] = replyHi >>> 0;
    d[f + 2] = latencyNs;
    d[f + 3] = this.now();
    d[f + 4] = receivedMs;
    this.schedule();
    return true;
  }

  private schedule(): void {
    if (this.scheduled || !this.sink?.writable) return;
    if (this.size < this.maxBatch && this.lost.verdicts === 0 && this.lingerMs > 0) {
      if (!this.lingerTimer) {
        this.lingerTimer = setTimeout(() => {
          this.lingerTimer = undefined;
          this.flush();
        }, this.lingerMs);
      }
      return;
    }
    this.scheduled = true;
    setImmediate(() => {
      this.scheduled = false;
      this.flush();
    });
  }

  /** Send what the sink accepts now. Called again by the link on 'drain' and on (re)connect. */
  flush(): void {
    const sink = this.sink;
    if (!sink) return;
    if (this.lingerTimer) {
      clearTimeout(this.lingerTimer);
      this.lingerTimer = undefined;
    }
    while (sink.writable) {
      if (this.lost.events + this.lost.verdicts > 0) {
        if (!this.sendLoss(sink)) return;
        continue;
      }
      if (this.size === 0) return;
      if (!this.sendBatch(sink)) return;
    }
  }

  private sendLoss(sink: BatchSink): boolean {
    const end = this.now();
    const mk = (type: LostRecordType, n: number): Buffer =>
      Buffer.from(
        LinkRequest.encode({
          streamSeq: BigInt(sink.seq()),
          message: {
            $case: 'loss',
            value: LossRecord.fromPartial({
              recordType: type,
              reason: this.lost.reason,
              droppedCount: BigInt(n),
              windowStartUnixNs: BigInt(Math.round(this.lost.since * NS_PER_MS)),
              windowEndUnixNs: BigInt(Math.round(end * NS_PER_MS)),
            }),
          },
        }).finish(),
      );
    const v = this.lost.verdicts;
    const e = this.lost.events;
    this.lost.verdicts = 0;
    this.lost.events = 0;
    this.stats.lossRecords++;
    let ok = sink.write(mk(LostRecordType.LOST_RECORD_TYPE_VERDICT, v));
    if (e > 0) {
      this.stats.lossRecords++;
      ok = sink.write(mk(LostRecordType.LOST_RECORD_TYPE_EVENT, e)) && ok;
    }
    return ok;
  }

  /** One VerdictBatch (and one EventBatch when some records carry events) from the queue's head. */
  private sendBatch(sink: BatchSink): boolean {
    const n = Math.min(this.size, this.maxBatch);
    const w = this.writer;
    const a = this.i32;
    const d = this.f64;
    let withEvents = 0;
    for (let k = 0, slot = this.head; k < n; k++) {
      if (this.frame[slot]) withEvents++;
      if (++slot === this.capacity) slot = 0;
    }
    let events: Buffer | undefined;
    if (withEvents > 0) {
      const list = [];
      for (let k = 0, slot = this.head; k < n; k++) {
        const fr = this.frame[slot];
        if (fr) {
          const vm = this.vm[slot]!;
          const pol = this.policy[slot]!;
          const i = slot * 9;
          const f = slot * 5;
          try {
            list.push(
              eventFromFrame(fr, {
                hostId: this.opts.hostId,
                vmUuid: vm.uuidBytes,
                sessionGeneration: BigInt(vm.generation),
                receivedUnixNs: BigInt(Math.floor(d[f + 4]! * NS_PER_MS)),
                repliedUnixNs: BigInt(Math.floor(d[f + 3]! * NS_PER_MS)),
                disposition: EventDisposition.EVENT_DISPOSITION_ANSWERED,
                verdictDeadlineUnixNs: 0n,
                ruleId: a[i + 7]! >= 0 ? (pol.ruleIds[a[i + 7]!] ?? '') : '',
                policyVersion: pol.version,
              }),
            );
          } catch {
            // A frame that does not decode is counted as lost (malformed) rather than stopping the queue.
            this.stats.dropped++;
          }
        }
        if (++slot === this.capacity) slot = 0;
      }
      if (list.length > 0) {
        const body = EventBatch.encode({ events: list }).finish();
        w.reset();
        w.uint(LINK_REQUEST.streamSeq, sink.seq());
        w.tag(LINK_REQUEST.eventBatch, 2);
        w.varint(body.length);
        w.raw(body);
        events = w.take();
      }
    }
    w.reset();
    w.uint(LINK_REQUEST.streamSeq, sink.seq());
    const batch = w.beginLen(LINK_REQUEST.verdictBatch);
    for (let k = 0, slot = this.head; k < n; k++) {
      const i = slot * 9;
      const f = slot * 5;
      const vm = this.vm[slot]!;
      const pol = this.policy[slot]!;
      const rec = w.beginLen(1);
      w.bytes(1, vm.uuidBytes);
      w.uint(2, vm.generation);
      w.uint(3, a[i]!);
      w.uint(4, a[i + 1]! >>> 0);
      w.uint(5, kindOfEventId(a[i + 2]!));
      w.uint(6, a[i + 3]!);
      w.uint(7, a[i + 4]!);
      w.uint(8, actionToProto(a[i + 5]!));
      if (a[i + 6] === 1) {
        w.tag(9, 0);
        w.varint64(d[f]!, d[f + 1]!);
      }
      const ri = a[i + 7]!;
      if (ri >= 0) w.string(10, pol.ruleIds[ri] ?? '');
      const xi = a[i + 8]!;
      if (xi >= 0) w.string(11, pol.exceptionIds[xi] ?? '');
      if (pol.version !== 0n) {
        w.tag(12, 0);
        w.varint(Number(pol.version));
      }
      w.uint(13, Math.round(d[f + 2]!));
      w.uint(14, Math.floor(d[f + 3]! * NS_PER_MS));
      w.endLen(rec);
      if (++slot === this.capacity) slot = 0;
    }
    w.endLen(batch);
    const verdicts = w.take();
    // Release the slots (drop references so frames and VMs can be collected).
    for (let k = 0; k < n; k++) {
      this.vm[this.head] = undefined;
      this.policy[this.head] = undefined;
      this.frame[this.head] = null;
      if (++this.head === this.capacity) this.head = 0;
    }
    this.size -= n;
    this.stats.sentRecords += n;
    this.stats.verdictBatches++;
    let ok = true;
    if (events) {
      this.stats.eventBatches++;
      this.stats.sentEvents += withEvents;
      ok = sink.write(events);
    }
    return sink.write(verdicts) && ok;
  }
}
