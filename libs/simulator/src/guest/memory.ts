/**
 * Guest physical memory: a sparse page map behind a memslot layout. A gfn is *backed* (inside a
 * memslot) when it is below the limit and not in a hole; backed pages that were never written read as
 * zeros and take no host memory. Unbacked gfns (holes such as the legacy VGA window, or beyond the end
 * of RAM) are what KVM reports as ENOENT / "not visible", and what the guest reaches as MMIO.
 */
export const PAGE_SIZE = 4096;
export const PAGE_SHIFT = 12n;

/** A half-open gfn range [start, end). */
export type GfnRange = readonly [start: number, end: number];

export interface GuestMemoryOptions {
  /** RAM size in MiB (the gfn limit is `memoryMiB · 256`). */
  memoryMiB: number;
  /** Gfn ranges that are not in any memslot. Default: the legacy VGA window 0xA0000–0xBFFFF. */
  holes?: readonly GfnRange[];
}

export const DEFAULT_HOLES: readonly GfnRange[] = [[0xa0, 0xc0]];

export class GuestMemory {
  /** First gfn past the end of RAM (exclusive limit; VM_GET_MAX_GFN answers this). */
  readonly limitGfn: number;
  readonly holes: readonly GfnRange[];
  private readonly pages = new Map<number, Buffer>();

  constructor(opts: GuestMemoryOptions) {
    if (!Number.isInteger(opts.memoryMiB) || opts.memoryMiB < 4) throw new RangeError('memoryMiB must be an integer ≥ 4');
    this.limitGfn = opts.memoryMiB * 256;
    this.holes = opts.holes ?? DEFAULT_HOLES;
  }

  /** Highest backed guest physical address (inclusive), as QEMU's handshake `max_gpa`. */
  get maxGpa(): bigint {
    return (BigInt(this.limitGfn) << PAGE_SHIFT) - 1n;
  }

  /** Pages that hold data (were written). */
  get residentPages(): number {
    return this.pages.size;
  }

  isBackedGfn(gfn: number): boolean {
    if (!Number.isSafeInteger(gfn) || gfn < 0 || gfn >= this.limitGfn) return false;
    for (const [s, e] of this.holes) if (gfn >= s && gfn < e) return false;
    return true;
  }

  isBacked(gpa: bigint): boolean {
    return gpa >= 0n && this.isBackedGfn(gfnOf(gpa));
  }

  /** Read `len` bytes at `gpa` (may span pages); null if any byte is unbacked. */
  read(gpa: bigint, len: number): Buffer | null {
    const out = Buffer.alloc(len);
    let done = 0;
    while (done < len) {
      const at = gpa + BigInt(done);
      const gfn = gfnOf(at);
      if (!this.isBackedGfn(gfn)) return null;
      const off = Number(at & 0xfffn);
      const n = Math.min(len - done, PAGE_SIZE - off);
      const page = this.pages.get(gfn);
      if (page) page.copy(out, done, off, off + n);
      done += n;
    }
    return out;
  }

  /** Write bytes at `gpa` (may span pages); false (nothing written) if any byte is unbacked. */
  write(gpa: bigint, data: Uint8Array): boolean {
    for (let g = gfnOf(gpa), last = gfnOf(gpa + BigInt(Math.max(data.length, 1) - 1)); g <= last; g++) {
      if (!this.isBackedGfn(g)) return false;
    }
    let done = 0;
    while (done < data.length) {
      const at = gpa + BigInt(done);
      const gfn = gfnOf(at);
      const off = Number(at & 0xfffn);
      const n = Math.min(data.length - done, PAGE_SIZE - off);
      let page = this.pages.get(gfn);
      if (!page) {
        page = Buffer.alloc(PAGE_SIZE);
        this.pages.set(gfn, page);
      }
      page.set(data.subarray(done, done + n), off);
      done += n;
    }
    return true;
  }

  readU64(gpa: bigint): bigint | null {
    const b = this.read(gpa, 8);
    return b ? b.readBigUInt64LE(0) : null;
  }
  readU32(gpa: bigint): number | null {
    const b = this.read(gpa, 4);
    return b ? b.readUInt32LE(0) : null;
  }
  writeU64(gpa: bigint, value: bigint): boolean {
    const b = Buffer.alloc(8);
    b.writeBigUInt64LE(BigInt.asUintN(64, value));
    return this.write(gpa, b);
  }

  /** A copy of the whole page (zeros if never written), or null if unbacked. For tests and snapshots. */
  snapshotPage(gfn: number): Buffer | null {
    if (!this.isBackedGfn(gfn)) return null;
    const p = this.pages.get(gfn);
    return p ? Buffer.from(p) : Buffer.alloc(PAGE_SIZE);
  }
}

export function gfnOf(gpa: bigint): number {
  return Number(BigInt.asUintN(64, gpa) >> PAGE_SHIFT);
}
