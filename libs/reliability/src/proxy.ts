/**
 * A man-in-the-middle between simulated QEMU/KVM and a KVMI peer that mutates the traffic.
 *
 * The simulated QEMU connects to `listenPath` as if it were the introspector; the proxy connects to
 * `targetPath` (the host agent's KVMI socket) and forwards the QEMU handshake and then every KVMI frame
 * in both directions. Frames travelling in the fuzzed direction are mutated at `mutateRate`, and
 * mutated copies of recent frames are injected at `injectRate`; handshakes are mutated at
 * `handshakeMutateRate`. Fuzzing real traffic this way reaches the peer's steady state (attached VM,
 * enabled events, held vCPUs) that generated frames alone would not.
 *
 * - direction `to-target`: frames from KVM (events, command replies) are mutated → fuzzes the agent.
 * - direction `to-qemu`: frames from the introspector (commands, event replies) are mutated → fuzzes
 *   the simulated kernel side.
 */
import net from 'node:net';
import { rmSync } from 'node:fs';
import { structs, KVMI_VCPU_EVENT } from '@periscope/kvmi';
import { mulberry32, mutateFrame, mutateHandshake, type MutatorName, type Prng } from './mutate.js';

const HDR_SIZE = structs.kvmi_msg_hdr.size;
const OFF_SIZE = structs.kvmi_msg_hdr.field('size').offset;
const OFF_ID = structs.kvmi_msg_hdr.field('id').offset;
const OFF_SEQ = structs.kvmi_msg_hdr.field('seq').offset;
const HANDSHAKE_MAX = 65536;
/** Sequence numbers of generated events start here, far above what a simulated session reaches. */
const GENERATED_SEQ_BASE = 0x80000000;
/** Generated events in flight per connection (default of `generateWindow`). */
const GENERATED_WINDOW = 32;

export interface FuzzProxyOptions {
  readonly listenPath: string;
  readonly targetPath: string;
  readonly direction: 'to-target' | 'to-qemu';
  /** Share of frames in the fuzzed direction that are mutated (0..1). */
  readonly mutateRate: number;
  /** Share of frames after which a mutated copy of a recent frame is injected (0..1). */
  readonly injectRate?: number;
  /** Share of QEMU handshakes mutated (0..1). */
  readonly handshakeMutateRate?: number;
  readonly seed: number;
  /**
   * Once a connection has carried a real message of the kind the fuzzed peer answers — a vCPU event
   * (direction `to-target`) or a command (direction `to-qemu`) — keep pumping copies of it (fresh
   * sequence numbers, perturbed trailing bytes, mutated at `mutateRate`) with up to 32 in flight; the
   * peer's replies to them are absorbed by the proxy. This drives the peer at full speed instead of at
   * the guest's (or the attach sequence's) pace.
   */
  readonly generate?: boolean;
  /**
   * Generated events in flight per connection (default 32). A huge window makes a flooding peer: events
   * as fast as the peer's socket takes them, far more than it can answer (bounded only by the proxy's
   * own 1 MiB write buffer).
   */
  readonly generateWindow?: number;
}

export interface FuzzProxyStats {
  connections: number;
  framesForwarded: number;
  framesMutated: number;
  framesInjected: number;
  /** Events generated from captured ones (valid or mutated). */
  framesGenerated: number;
  /** Replies to generated events the peer sent (absorbed by the proxy). */
  generatedReplies: number;
  handshakesMutated: number;
  /** Connections the peer under test closed. */
  closedByTarget: number;
  byMutator: Record<string, number>;
}

/** Splits a byte stream into a handshake struct (u32 struct_size first) followed by KVMI frames. */
export class StreamSplitter {
  private buf: Buffer = Buffer.alloc(0);
  private handshakeDone = false;
  /** When the stream stops making sense (a lying size was forwarded), pass bytes through raw. */
  raw = false;

  constructor(expectHandshake: boolean) {
    this.handshakeDone = !expectHandshake;
  }

  push(chunk: Buffer, onHandshake: (b: Buffer) => void, onFrame: (b: Buffer) => void, onRaw: (b: Buffer) => void): void {
    if (this.raw) return onRaw(chunk);
    this.buf = this.buf.length ? Buffer.concat([this.buf, chunk]) : chunk;
    for (;;) {
      if (!this.handshakeDone) {
        if (this.buf.length < 4) return;
        const size = this.buf.readUInt32LE(0);
        if (size < 4 || size > HANDSHAKE_MAX) {
          this.raw = true;
          const rest = this.buf;
          this.buf = Buffer.alloc(0);
          return onRaw(rest);
        }
        if (this.buf.length < size) return;
        onHandshake(this.buf.subarray(0, size));
        this.buf = this.buf.subarray(size);
        this.handshakeDone = true;
        continue;
      }
      if (this.buf.length < HDR_SIZE) return;
      const total = HDR_SIZE + this.buf.readUInt16LE(OFF_SIZE);
      if (this.buf.length < total) return;
      onFrame(this.buf.subarray(0, total));
      this.buf = this.buf.subarray(total);
    }
  }
}

export class FuzzProxy {
  readonly stats: FuzzProxyStats = {
    connections: 0,
    framesForwarded: 0,
    framesMutated: 0,
    framesInjected: 0,
    framesGenerated: 0,
    generatedReplies: 0,
    handshakesMutated: 0,
    closedByTarget: 0,
    byMutator: {},
  };
  private server: net.Server | null = null;
  private readonly prng: Prng;
  private readonly sockets = new Set<net.Socket>();
  private recent: Buffer | null = null;

  constructor(private readonly opts: FuzzProxyOptions) {
    this.prng = mulberry32(opts.seed);
  }

  async start(): Promise<void> {
    rmSync(this.opts.listenPath, { force: true });
    this.server = net.createServer((qemu) => this.onQemu(qemu));
    await new Promise<void>((resolve, reject) => {
      this.server!.once('error', reject);
      this.server!.listen(this.opts.listenPath, () => resolve());
    });
  }

  async stop(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((r) => (this.server ? this.server.close(() => r()) : r()));
    rmSync(this.opts.listenPath, { force: true });
  }

  /** Frames that went through in the fuzzed direction, mutated or not, plus injected ones. */
  get framesDelivered(): number {
    return this.stats.framesForwarded + this.stats.framesMutated + this.stats.framesInjected + this.stats.framesGenerated;
  }

  private count(m: MutatorName): void {
    this.stats.byMutator[m] = (this.stats.byMutator[m] ?? 0) + 1;
  }

  private onQemu(qemu: net.Socket): void {
    this.stats.connections++;
    const target = net.createConnection(this.opts.targetPath);
    this.sockets.add(qemu);
    this.sockets.add(target);
    const closeBoth = (byTarget: boolean) => {
      if (byTarget && !qemu.destroyed) this.stats.closedByTarget++;
      qemu.destroy();
      target.destroy();
      this.sockets.delete(qemu);
      this.sockets.delete(target);
    };
    qemu.on('error', () => closeBoth(false));
    qemu.on('close', () => closeBoth(false));
    target.on('error', () => closeBoth(true));
    target.on('close', () => closeBoth(true));

    const pump = { captured: null as Buffer | null, inFlight: 0, seq: GENERATED_SEQ_BASE, timer: null as NodeJS.Timeout | null, lastReplies: 0 };
    const stopPump = () => {
      if (pump.timer) clearInterval(pump.timer);
      pump.timer = null;
    };
    qemu.once('close', stopPump);
    target.once('close', stopPump);
    const fuzzed = this.opts.direction === 'to-target' ? target : qemu;
    const fill = () => {
      while (pump.captured && pump.inFlight < (this.opts.generateWindow ?? GENERATED_WINDOW) && !fuzzed.destroyed && fuzzed.writableLength < 1 << 20) {
        const ev = Buffer.from(pump.captured);
        ev.writeUInt32LE(pump.seq++ >>> 0, OFF_SEQ);
        // Perturb the event-specific tail (CR/MSR values, PF addresses...), keeping the headers valid.
        const tail = Math.min(24, ev.length - HDR_SIZE);
        for (let i = 0; tail > 0 && i < 4; i++) ev[ev.length - 1 - Math.floor(this.prng() * tail)] = Math.floor(this.prng() * 256);
        this.stats.framesGenerated++;
        pump.inFlight++;
        if (this.prng() < this.opts.mutateRate) {
          const { bytes, mutator } = mutateFrame(ev, this.prng);
          this.count(mutator);
          fuzzed.write(bytes);
        } else fuzzed.write(ev);
      }
    };
    const startPump = (event: Buffer) => {
      pump.captured = Buffer.from(event);
      if (pump.timer) return;
      // Replies to mutated events may never come (the peer drops them or closes): refill on a timer.
      pump.timer = setInterval(() => {
        if (this.stats.generatedReplies === pump.lastReplies) pump.inFlight = 0;
        pump.lastReplies = this.stats.generatedReplies;
        fill();
      }, 50);
      fill();
    };
    const absorbed = (frame: Buffer): boolean => {
      if (!this.opts.generate || frame.length < HDR_SIZE || frame.readUInt32LE(OFF_SEQ) < GENERATED_SEQ_BASE) return false;
      this.stats.generatedReplies++;
      pump.inFlight = Math.max(0, pump.inFlight - 1);
      fill();
      return true;
    };

    const fromQemu = new StreamSplitter(true);
    const fromTarget = new StreamSplitter(true);
    const fuzzToTarget = this.opts.direction === 'to-target';
    const write = (s: net.Socket, b: Buffer) => {
      if (!s.destroyed && b.length) s.write(b);
    };

    qemu.on('data', (chunk) =>
      fromQemu.push(
        chunk,
        (hs) => {
          if (fuzzToTarget && this.prng() < (this.opts.handshakeMutateRate ?? 0)) {
            this.stats.handshakesMutated++;
            write(target, mutateHandshake(hs, this.prng));
          } else write(target, hs);
        },
        (frame) => {
          if (!fuzzToTarget && absorbed(frame)) return;
          if (fuzzToTarget && this.opts.generate && frame.length > HDR_SIZE && frame.readUInt16LE(OFF_ID) === KVMI_VCPU_EVENT) startPump(frame);
          return fuzzToTarget ? this.fuzzFrame(frame, target) : write(target, frame);
        },
        (raw) => write(target, raw),
      ),
    );
    target.on('data', (chunk) =>
      fromTarget.push(
        chunk,
        (hs) => write(qemu, hs),
        (frame) => {
          if (fuzzToTarget && absorbed(frame)) return;
          // Commands (not event replies) are what the simulated kernel side answers.
          if (!fuzzToTarget && this.opts.generate && frame.length >= HDR_SIZE && frame.readUInt16LE(OFF_ID) > KVMI_VCPU_EVENT) startPump(frame);
          return fuzzToTarget ? write(qemu, frame) : this.fuzzFrame(frame, qemu);
        },
        (raw) => write(qemu, raw),
      ),
    );
  }

  private fuzzFrame(frame: Buffer, to: net.Socket): void {
    if (to.destroyed) return;
    const other = this.recent;
    this.recent = Buffer.from(frame);
    if (this.prng() < this.opts.mutateRate) {
      const { bytes, mutator } = mutateFrame(frame, this.prng, other ?? undefined);
      this.count(mutator);
      this.stats.framesMutated++;
      to.write(bytes);
    } else {
      this.stats.framesForwarded++;
      to.write(frame);
    }
    if (this.prng() < (this.opts.injectRate ?? 0)) {
      const { bytes, mutator } = mutateFrame(this.recent, this.prng, other ?? undefined);
      this.count(mutator);
      this.stats.framesInjected++;
      to.write(bytes);
    }
  }
}
