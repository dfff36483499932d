/**
 * Which VMs analysis paused (`VmPauseControl`), persisted in the state directory (`paused.json`, a
 * sorted list of VM uuids, written atomically) so a pause survives the VM re-attaching and the agent
 * restarting. Without a directory it is kept in memory only.
 */
import { mkdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

export class PauseStore {
  private readonly paused = new Set<string>();
  private readonly file: string | undefined;

  constructor(dir: string | undefined) {
    if (dir) {
      mkdirSync(dir, { recursive: true });
      this.file = join(dir, 'paused.json');
      try {
        const list = JSON.parse(readFileSync(this.file, 'utf8')) as unknown;
        if (Array.isArray(list)) for (const u of list) if (typeof u === 'string') this.paused.add(u.toLowerCase());
      } catch {
        /* no file yet */
      }
    }
  }

  isPaused(uuid: string): boolean {
    return this.paused.has(uuid);
  }

  /** Record the state; returns true when it changed. */
  set(uuid: string, paused: boolean): boolean {
    const had = this.paused.has(uuid);
    if (had === paused) return false;
    if (paused) this.paused.add(uuid);
    else this.paused.delete(uuid);
    if (this.file) {
      writeFileSync(`${this.file}.tmp`, `${JSON.stringify([...this.paused].sort())}\n`);
      renameSync(`${this.file}.tmp`, this.file);
    }
    return true;
  }

  get size(): number {
    return this.paused.size;
  }
}
