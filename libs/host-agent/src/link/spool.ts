/**
 * The detection spool: every detection is written to disk (one file per detection, `<id>.pb`, the
 * encoded `Detection`) before it is sent — `unsent()` yields an entry only once its file is renamed into
 * place, and `onPersisted` tells the link to send it — and removed only when analysis acknowledges it
 * (`DetectionAck`). After a reconnect — or an agent restart, also after kill -9 — every spooled detection
 * is sent again with its original id: delivery is at-least-once and analysis deduplicates by id.
 * A detection still being completed (the instruction at RIP read after the reply) is written at once and
 * held back (`ready: false`); `update` rewrites it complete and releases it. A kill -9 in between leaves the
 * first version on disk, sent after the restart. The spool is bounded in bytes; a detection that does not
 * fit is dropped and counted (a loss record goes up). Without a directory the spool lives in memory only
 * (lost with the process) and entries are sendable at once.
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
  /** False while `bytes` are not on disk yet (a write in flight). */
  persisted: boolean;
  /** False while the detection is being completed (`add(d, {ready: false})` until `update`). */
  ready: boolean;
  /** Writes of this entry, in order (the first and an update must not cross). */
  writes: Promise<void>;
  /** Writes started, to name their temporary files apart. */
  generation: number;
}

export class DetectionSpool {
  private readonly entries = new Map<string, SpoolEntry>();
  private total = 0;
  readonly stats = { spooled: 0, acked: 0, dropped: 0, resent: 0, loaded: 0 };

  constructor(
    readonly dir: string | undefined,
    readonly maxBytes: number,
    private readonly log: (level: 'warn', msg: string, f?: Record<string, unknown>) => void = () => undefined,
    /** An entry became sendable (its file is in place, and it is ready). */
    private readonly onPersisted: () => void = () => undefined,
  ) {
    if (dir) {
      mkdirSync(dir, { recursive: true });
      for (const name of readdirSync(dir).sort()) {
        if (name.endsWith('.tmp')) {
          // A write a kill -9 interrupted: its detection is either complete under `<id>.pb` or never was.
          try {
            unlinkSync(join(dir, name));
          } catch {
            /* gone */
          }
          continue;
        }
        if (!name.endsWith('.pb')) continue;
        try {
          const bytes = readFileSync(join(dir, name));
          const d = Detection.decode(bytes);
          if (d.detectionId + '.pb' !== name) throw new Error('id does not match the file name');
          this.entries.set(d.detectionId, { id: d.detectionId, bytes, sentOnStream: 0, persisted: true, ready: true, writes: Promise.resolve(), generation: 0 });
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

  /**
   * Add a detection; undefined when it does not fit (dropped, counted). With `ready: false` it is written
   * but not sent until `update` completes it.
   */
  add(d: Detection, opts: { ready?: boolean } = {}): SpoolEntry | undefined {
    const bytes = Buffer.from(Detection.encode(d).finish());
    if (this.total + bytes.length > this.maxBytes) {
      this.stats.dropped++;
      return undefined;
    }
    const e: SpoolEntry = { id: d.detectionId, bytes, sentOnStream: 0, persisted: !this.dir, ready: opts.ready ?? true, writes: Promise.resolve(), generation: 0 };
    this.entries.set(e.id, e);
    this.total += bytes.length;
    this.stats.spooled++;
    this.persist(e);
    return e;
  }

  /**
   * The completed version of a detection added with `ready: false`: rewritten (when it still fits the
   * bound; else the first version stays) and released for sending once on disk.
   */
  update(e: SpoolEntry, d: Detection): void {
    if (this.entries.get(e.id) !== e) return;
    const bytes = Buffer.from(Detection.encode(d).finish());
    if (this.total - e.bytes.length + bytes.length <= this.maxBytes) {
      this.total += bytes.length - e.bytes.length;
      e.bytes = bytes;
      e.ready = true;
      if (this.dir) e.persisted = false;
      this.persist(e);
    } else {
      e.ready = true;
      if (e.persisted) this.onPersisted();
    }
  }

  private persist(e: SpoolEntry): void {
    if (!this.dir) {
      if (e.ready) this.onPersisted();
      return;
    }
    const path = join(this.dir, `${e.id}.pb`);
    const tmp = `${path}.${++e.generation}.tmp`;
    const bytes = e.bytes;
    e.writes = e.writes.then(async () => {
      try {
        await writeFile(tmp, bytes);
        if (this.entries.get(e.id) !== e) {
          await unlink(tmp);
          return;
        }
        await rename(tmp, path);
        if (this.entries.get(e.id) !== e) {
          // Acknowledged while the rename was in flight: the file must not outlive the entry.
          await unlink(path).catch(() => undefined);
          return;
        }
      } catch (err) {
        // Not on disk, but still held in memory and sent: the stream must not wait forever on a full disk.
        this.log('warn', `detection spool: write failed: ${(err as Error).message}`, { id: e.id });
      }
      if (e.bytes !== bytes || this.entries.get(e.id) !== e) return; // a newer version is on its way, or acked
      e.persisted = true;
      if (e.ready) this.onPersisted();
    }).catch((err: unknown) => this.log('warn', `detection spool: sending after the write failed: ${(err as Error).message}`, { id: e.id }));
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
    for (const e of this.entries.values()) if (e.sentOnStream !== stream && e.persisted && e.ready) yield e;
  }

  /** Synchronous write of everything (tests, shutdown). */
  flushSync(): void {
    if (!this.dir) return;
    for (const e of this.entries.values()) {
      const path = join(this.dir, `${e.id}.pb`);
      writeFileSync(`${path}.sync.tmp`, e.bytes);
      renameSync(`${path}.sync.tmp`, path);
      e.persisted = true;
    }
  }

  /** Settles when every write started so far has (tests, shutdown). */
  async settled(): Promise<void> {
    await Promise.all([...this.entries.values()].map((e) => e.writes));
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
