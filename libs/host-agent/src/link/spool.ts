/**
 * The detection spool: every detection is written to disk (one file per detection, `<id>.pb`, the
 * encoded `Detection`) before it is sent, and removed only when analysis acknowledges it
 * (`DetectionAck`). After a reconnect — or an agent restart — every spooled detection is sent again
 * with its original id: delivery is at-least-once and analysis deduplicates by id. The spool is
 * bounded in bytes; a detection that does not fit is dropped and counted (a loss record goes up).
 * Without a directory the spool lives in memory only (lost with the process).
 */
import { mkdirSync, readdirSync, readFileSync, unlinkSync, writeFileSync, renameSync } from 'node:fs';
import { writeFile, rename, unlink } from 'node:fs/promises';
import { join } from 'node:path';
import { Detection } from '@periscope/contracts';

export interface SpoolEntry {
  id: string;
  bytes: Buffer;
  /** Sent on the current stream (not again until the next reconnect). */
  sentOnStream: number;
}

export class DetectionSpool {
  private readonly entries = new Map<string, SpoolEntry>();
  private total = 0;
  readonly stats = { spooled: 0, acked: 0, dropped: 0, resent: 0, loaded: 0 };

  constructor(
    readonly dir: string | undefined,
    readonly maxBytes: number,
    private readonly log: (level: 'warn', msg: string, f?: Record<string, unknown>) => void = () => undefined,
  ) {
    if (dir) {
      mkdirSync(dir, { recursive: true });
      for (const name of readdirSync(dir).sort()) {
        if (!name.endsWith('.pb')) continue;
        try {
          const bytes = readFileSync(join(dir, name));
          const d = Detection.decode(bytes);
          if (d.detectionId + '.pb' !== name) throw new Error('id does not match the file name');
          this.entries.set(d.detectionId, { id: d.detectionId, bytes, sentOnStream: 0 });
          this.total += bytes.length;
          this.stats.loaded++;
        } catch (e) {
          this.log('warn', `detection spool: ignoring unreadable ${name}: ${(e as Error).message}`);
        }
      }
    }
  }

  /** Bytes held (the metric `periscope_agent_spool_bytes`). */
  get bytes(): number {
    return this.total;
  }

  get count(): number {
    return this.entries.size;
  }

  /** Add a detection; false when it does not fit (dropped, counted). */
  add(d: Detection): SpoolEntry | undefined {
    const bytes = Buffer.from(Detection.encode(d).finish());
    if (this.total + bytes.length > this.maxBytes) {
      this.stats.dropped++;
      return undefined;
    }
    const e: SpoolEntry = { id: d.detectionId, bytes, sentOnStream: 0 };
    this.entries.set(e.id, e);
    this.total += bytes.length;
    this.stats.spooled++;
    if (this.dir) {
      const path = join(this.dir, `${e.id}.pb`);
      const tmp = `${path}.tmp`;
      writeFile(tmp, bytes)
        .then(() => (this.entries.has(e.id) ? rename(tmp, path) : unlink(tmp)))
        .catch((err: unknown) => this.log('warn', `detection spool: write failed: ${(err as Error).message}`, { id: e.id }));
    }
    return e;
  }

  /** Analysis stored these: forget them. Unknown ids are ignored. */
  ack(ids: readonly string[]): number {
    let n = 0;
    for (const id of ids) {
      const e = this.entries.get(id);
      if (!e) continue;
      this.entries.delete(id);
      this.total -= e.bytes.length;
      this.stats.acked++;
      n++;
      if (this.dir) unlink(join(this.dir, `${id}.pb`)).catch(() => undefined);
    }
    return n;
  }

  /** Entries not yet sent on `stream`, oldest first. */
  *unsent(stream: number): Generator<SpoolEntry> {
    for (const e of this.entries.values()) if (e.sentOnStream !== stream) yield e;
  }

  /** Synchronous write of everything (tests, shutdown). */
  flushSync(): void {
    if (!this.dir) return;
    for (const e of this.entries.values()) {
      const path = join(this.dir, `${e.id}.pb`);
      writeFileSync(`${path}.tmp`, e.bytes);
      renameSync(`${path}.tmp`, path);
    }
  }

  has(id: string): boolean {
    return this.entries.has(id);
  }

  /** Remove a file left for an id that is gone (ack raced the write). */
  static removeStale(dir: string, id: string): void {
    try {
      unlinkSync(join(dir, `${id}.pb`));
    } catch {
      /* already gone */
    }
  }
}
