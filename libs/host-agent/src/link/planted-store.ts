/**
 * Bytes analysis changed in guest memory (`VM_WRITE_PHYSICAL` relayed by this agent: breakpoint tracing's
 * INT3s), persisted per VM UUID in the state directory (`planted.json`, written atomically) with the boot
 * they belong to (QEMU start time). A clean detach (unhook, SIGTERM) restores them and the entry empties;
 * after a kill -9 the bytes stay in the guest, and the restarted agent restores them when the VM
 * re-attaches — only in the same boot, and only where the guest still holds the byte analysis wrote.
 * Without a directory the set is kept in memory only (a restart forgets it).
 */
import { mkdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { RememberedByte } from '../vm-connection.js';

export interface PlantedVm {
  /** QEMU start time (ms) of the boot the bytes were written in. */
  readonly startTimeMs: bigint;
  readonly bytes: ReadonlyMap<bigint, RememberedByte>;
}

interface FileShape {
  [uuid: string]: { startTimeMs: string; bytes: Record<string, { original: number; written: number }> };
}

export class PlantedStore {
  private readonly vms = new Map<string, PlantedVm>();
  private readonly file: string | undefined;

  constructor(dir: string | undefined) {
    if (!dir) return;
    mkdirSync(dir, { recursive: true });
    this.file = join(dir, 'planted.json');
    let raw: unknown;
    try {
      raw = JSON.parse(readFileSync(this.file, 'utf8'));
    } catch {
      return; // no file yet (or unreadable: nothing to restore)
    }
    if (!raw || typeof raw !== 'object') return;
    for (const [uuid, v] of Object.entries(raw as FileShape)) {
      if (!v || typeof v.startTimeMs !== 'string' || !v.bytes || typeof v.bytes !== 'object') continue;
      const bytes = new Map<bigint, RememberedByte>();
      for (const [gpa, b] of Object.entries(v.bytes)) {
        if (!/^0x[0-9a-f]+$/i.test(gpa) || !isByte(b?.original) || !isByte(b?.written)) continue;
        bytes.set(BigInt(gpa), { original: b.original, written: b.written });
      }
      if (bytes.size) this.vms.set(uuid.toLowerCase(), { startTimeMs: BigInt(v.startTimeMs), bytes });
    }
  }

  get(uuid: string): PlantedVm | undefined {
    return this.vms.get(uuid);
  }

  /** VMs with bytes recorded. */
  get size(): number {
    return this.vms.size;
  }

  /** Bytes recorded over every VM. */
  get bytes(): number {
    let n = 0;
    for (const v of this.vms.values()) n += v.bytes.size;
    return n;
  }

  /** Replace a VM's record (an empty map removes it). */
  set(uuid: string, startTimeMs: bigint, bytes: ReadonlyMap<bigint, RememberedByte>): void {
    const prev = this.vms.get(uuid);
    if (!bytes.size && !prev) return;
    if (bytes.size) this.vms.set(uuid, { startTimeMs, bytes: new Map([...bytes].map(([g, b]) => [g, { ...b }])) });
    else this.vms.delete(uuid);
    this.write();
  }

  private write(): void {
    if (!this.file) return;
    const out: FileShape = {};
    for (const [uuid, v] of [...this.vms].sort((a, b) => a[0].localeCompare(b[0]))) {
      const bytes: FileShape[string]['bytes'] = {};
      for (const [g, b] of [...v.bytes].sort((x, y) => (x[0] < y[0] ? -1 : 1))) bytes[`0x${g.toString(16)}`] = { original: b.original, written: b.written };
      out[uuid] = { startTimeMs: v.startTimeMs.toString(), bytes };
    }
    writeFileSync(`${this.file}.tmp`, `${JSON.stringify(out)}\n`);
    renameSync(`${this.file}.tmp`, this.file);
  }
}

function isByte(v: unknown): v is number {
  return typeof v === 'number' && Number.isInteger(v) && v >= 0 && v <= 255;
}
