/**
 * Detections whose storage failed (the database is down or restarting) are retried here, off the link's
 * message chain, until they are stored — then acknowledged — or their stream closes. The agent sends a
 * spooled detection once per stream and resends it only after a reconnect, so without this a detection
 * that met a database outage on a live stream would stay unacknowledged in the agent's spool and never
 * become an alert until the link happened to reconnect. Nothing is acknowledged before it is stored.
 *
 * Bounded: at most `maxPending` detections wait per replica; beyond that the newest is not kept here
 * (it stays in the agent's spool and is resent on the next stream) and the drop is counted.
 */
import type { Detection } from '@periscope/contracts';
import type { AgentSession } from './link.js';

export interface DetectionRetryOptions {
  /** Store and acknowledge one detection (throws when storage fails). */
  readonly store: (s: AgentSession, d: Detection) => Promise<void>;
  readonly log: (level: 'warn' | 'info', msg: string, fields?: Record<string, unknown>) => void;
  readonly maxPending?: number;
  readonly initialDelayMs?: number;
  readonly maxDelayMs?: number;
}

export class DetectionRetry {
  private readonly pending = new Map<string, { s: AgentSession; d: Detection }>();
  private timer: NodeJS.Timeout | undefined;
  private delayMs: number;
  private running = false;
  private stopped = false;
  readonly stats = { queued: 0, stored: 0, droppedFull: 0, droppedClosed: 0 };

  constructor(private readonly o: DetectionRetryOptions) {
    this.delayMs = o.initialDelayMs ?? 100;
  }

  get size(): number {
    return this.pending.size;
  }

  /** Keep `d` (received on `s`, storage failed) for a retry. */
  add(s: AgentSession, d: Detection): void {
    if (this.stopped || s.closed) return;
    if (this.pending.has(d.detectionId)) return;
    if (this.pending.size >= (this.o.maxPending ?? 100_000)) {
      this.stats.droppedFull++;
      return;
    }
    if (this.pending.size === 0) this.o.log('warn', 'detection storage failing: retrying until stored (not acknowledged meanwhile)', {});
    this.pending.set(d.detectionId, { s, d });
    this.stats.queued++;
    this.schedule();
  }

  private schedule(): void {
    if (this.timer || this.running || this.stopped || !this.pending.size) return;
    this.timer = setTimeout(() => {
      this.timer = undefined;
      void this.retry();
    }, this.delayMs);
    this.timer.unref();
  }

  private async retry(): Promise<void> {
    this.running = true;
    let failed = false;
    try {
      for (const [id, { s, d }] of [...this.pending]) {
        if (this.stopped) return;
        if (s.closed) {
          // The agent resends everything unacknowledged on its next stream.
          this.pending.delete(id);
          this.stats.droppedClosed++;
          continue;
        }
        try {
          await this.o.store(s, d);
          this.pending.delete(id);
          this.stats.stored++;
        } catch {
          failed = true;
          break;
        }
      }
    } finally {
      this.running = false;
    }
    this.delayMs = failed ? Math.min(this.delayMs * 2, this.o.maxDelayMs ?? 2000) : (this.o.initialDelayMs ?? 100);
    if (!failed && this.stats.stored && !this.pending.size) this.o.log('info', 'detection storage recovered', { retried: this.stats.stored });
    this.schedule();
  }

  stop(): void {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    this.pending.clear();
  }
}
