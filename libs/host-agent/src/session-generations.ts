/**
 * KVMI session generations: the host agent numbers every attach of a VM, and (VM uuid, session generation,
 * KVMI seq) names an event, a held verdict, a command target and a stored trace hit everywhere downstream
 * (protos/periscope/v1/agent.proto). The contract: **strictly increasing per VM uuid on this host, never 0,
 * also across agent restarts** (kill -9, OOM kill, upgrade) — a restarted agent must never reuse a
 * generation, or analysis would confuse the new session with the old one (a late detach of the old session
 * detaching the new one, hits deduplicated away).
 *
 * The next generation for a VM is the largest of
 *   - the last one issued for that VM by this process, + 1;
 *   - the last one persisted for that VM in the state directory, + 1 (the floor across restarts);
 *   - the wall clock in ms (`Date.now()`; injectable for tests).
 * so a generation is roughly the attach time in ms (~1.7e12 today), far below 2^53: it stays an exact JS
 * number (the wire is uint64, `PbWriter.varint` is exact up to 2^53, the database column is int8).
 *
 * With `--state-dir` the last generation issued per VM is written to `<state-dir>/session-generations.json`
 * (a JSON object uuid → generation, written to a temporary file and renamed over the old one, like
 * `paused.json`) **before** the generation is used, so the floor holds even when the wall clock steps back
 * (NTP correction, an RTC reset). Without a state directory only the wall-clock floor survives a restart: the
 * generation is still increasing across restarts unless the clock was set back past the last attach of that VM.
 * The file is not fsynced: a kill -9 keeps it (page cache); after a power loss the wall clock, which moved on
 * through the reboot, is the floor.
 *
 * Entries whose generation is more than `PRUNE_AFTER_MS` (30 days) behind the wall clock are dropped when the
 * file is written, so it does not grow with every VM the host ever ran; such an entry matters only if the
 * clock later steps back by more than that.
 */
import { mkdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

export const SESSION_GENERATIONS_FILE = 'session-generations.json';
export const PRUNE_AFTER_MS = 30 * 24 * 3600 * 1000;

export interface SessionGenerationsOptions {
  /** The agent's `--state-dir`; without it nothing is persisted. */
  dir?: string | undefined;
  /** Wall clock in ms (default `Date.now`). */
  now?: () => number;
  log?: (level: 'info' | 'warn' | 'error', msg: string, fields?: Record<string, unknown>) => void;
}

export class SessionGenerations {
  /** Last generation issued (or loaded) per VM uuid. */
  private readonly last = new Map<string, number>();
  private readonly file: string | undefined;
  private readonly now: () => number;

  constructor(private readonly opts: SessionGenerationsOptions = {}) {
    this.now = opts.now ?? Date.now;
    if (!opts.dir) return;
    mkdirSync(opts.dir, { recursive: true });
    this.file = join(opts.dir, SESSION_GENERATIONS_FILE);
    let raw: unknown;
    try {
      raw = JSON.parse(readFileSync(this.file, 'utf8'));
    } catch {
      return; // no file yet (or unreadable: the wall clock is the floor)
    }
    if (!raw || typeof raw !== 'object' || Array.isArray(raw)) return;
    for (const [uuid, g] of Object.entries(raw as Record<string, unknown>)) {
      if (typeof g === 'number' && Number.isSafeInteger(g) && g > 0) this.last.set(uuid.toLowerCase(), g);
    }
  }

  /** The last generation issued for a VM (this process or a persisted earlier one), if any. */
  lastIssued(uuid: string): number | undefined {
    return this.last.get(uuid);
  }

  /** The generation for a new session of this VM; persisted (with a state directory) before it returns. */
  next(uuid: string): number {
    const floor = this.last.get(uuid) ?? 0;
    const generation = Math.max(floor + 1, Math.floor(this.now()));
    if (!Number.isSafeInteger(generation)) throw new RangeError(`session generation ${generation} for ${uuid} is not an exact integer`);
    this.last.set(uuid, generation);
    this.write();
    return generation;
  }

  private write(): void {
    if (!this.file) return;
    const oldest = this.now() - PRUNE_AFTER_MS;
    const out: Record<string, number> = {};
    for (const [uuid, g] of [...this.last].sort((a, b) => a[0].localeCompare(b[0]))) {
      if (g < oldest) this.last.delete(uuid);
      else out[uuid] = g;
    }
    try {
      writeFileSync(`${this.file}.tmp`, `${JSON.stringify(out)}\n`);
      renameSync(`${this.file}.tmp`, this.file);
    } catch (e) {
      // The attach goes on: the wall clock is still a floor. Logged, not thrown.
      this.opts.log?.('warn', `cannot persist session generations: ${(e as Error).message}`, { file: this.file });
    }
  }
}
