import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { GuestRam, type GfnRange } from '../../src/index.js';

/** A scratch directory removed by `cleanup()`. */
export function scratchDir(): { dir: string; cleanup: () => void } {
  const dir = mkdtempSync(join(tmpdir(), 'periscope-x86-'));
  return { dir, cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

/** A fresh RAM file in its own scratch directory. */
export function scratchRam(gfnLimit: bigint, holes: GfnRange[] = []): { ram: GuestRam; dir: string; cleanup: () => void } {
  const s = scratchDir();
  const ram = GuestRam.create({ dir: s.dir, uuid: 'vm-test', gfnLimit, holes });
  return {
    ram,
    dir: s.dir,
    cleanup: () => {
      ram.close();
      s.cleanup();
    },
  };
}
