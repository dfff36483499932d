/**
 * Guest physical memory as a sparse file.
 *
 * File format (the contract with every other process that maps the same RAM, e.g. the guest agent's
 * simulated `/dev/kvmmem`):
 *
 * - path `<dir>/<uuid>.ram`;
 * - a plain, headerless, sparse file: **byte offset = guest-physical address**, guest bytes stored as
 *   is (x86 is little-endian, so a u64 at GPA g is the 8 bytes at offset g, least significant first);
 * - the file is `gfnLimit × 4096` bytes long (set with ftruncate, so unwritten pages occupy no disk
 *   space and read as zeros) and can be `mmap`ed with `MAP_SHARED` at offset `gfn << 12`;
 * - holes (unbacked GFN ranges) and the gfn limit are *not* recorded in the file; the owner of the VM
 *   publishes them (they are the memslot layout). Bytes of a hole in the file are meaningless.
 *
 * Every access is positional I/O on one file descriptor, with no in-process page cache, so a write by
 * another process that mapped or opened the file is visible to the next read here, and vice versa.
 */
import { closeSync, ftruncateSync, mkdirSync, openSync, readSync, rmSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { PAGE_SHIFT } from './constants.js';
import { X86Error } from './errors.js';

/** A half-open range of guest frame numbers: `start ≤ gfn < end`. */
export interface GfnRange {
  readonly start: bigint;
  readonly end: bigint;
}

export interface GuestRamLayout {
  /** First GFN that is *not* guest RAM (exclusive limit). The file is `gfnLimit × 4096` bytes. */
  readonly gfnLimit: bigint;
  /** Unbacked GFN ranges below the limit (e.g. the PCI hole). Overlapping ranges are merged. */
  readonly holes?: readonly GfnRange[];
}

export interface GuestRamCreateOptions extends GuestRamLayout {
  /** Directory of the RAM file (created if missing). */
  readonly dir: string;
  /** VM identifier; the file is `<dir>/<uuid>.ram`. Letters, digits, `-` and `_` only. */
  readonly uuid: string;
}

export interface GuestRamOpenOptions extends GuestRamLayout {
  /** Path of an existing RAM file. */
  readonly path: string;
  /** Open read-only (writes then fail with the OS error). Default false. */
  readonly readOnly?: boolean;
}

/** Largest GFN limit: 52-bit guest-physical addresses (the architectural MAXPHYADDR maximum). */
const MAX_GFN_LIMIT = 1n << 40n;
const PAGE = 1n << PAGE_SHIFT;

export class GuestRam {
  /** `<dir>/<uuid>.ram`. */
  static pathFor(dir: string, uuid: string): string {
    if (!/^[A-Za-z0-9_-]+$/.test(uuid)) {
      throw new X86Error('invalid-argument', `GuestRam: uuid ${JSON.stringify(uuid)} is not a plain file name`);
    }
    return join(dir, `${uuid}.ram`);
  }

  /** Create (or truncate to zeros) the RAM file of a VM and open it read-write. */
  static create(opts: GuestRamCreateOptions): GuestRam {
    const path = GuestRam.pathFor(opts.dir, opts.uuid);
    const layout = normaliseLayout(opts);
    mkdirSync(opts.dir, { recursive: true });
    const fd = openSync(path, 'w+', 0o600);
    try {
      ftruncateSync(fd, Number(layout.gfnLimit * PAGE));
    } catch (e) {
      closeSync(fd);
      throw e;
    }
    return new GuestRam(path, fd, layout.gfnLimit, layout.holes);
  }

  /** Attach to an existing RAM file (another process's view of the same guest memory). */
  static open(opts: GuestRamOpenOptions): GuestRam {
    const layout = normaliseLayout(opts);
    const fd = openSync(opts.path, opts.readOnly ? 'r' : 'r+');
    return new GuestRam(opts.path, fd, layout.gfnLimit, layout.holes);
  }

  readonly path: string;
  readonly gfnLimit: bigint;
  /** Sorted, merged, clipped to the limit. */
  readonly holes: readonly GfnRange[];
  private fd: number;
  private readonly scratch = Buffer.alloc(8);

  private constructor(path: string, fd: number, gfnLimit: bigint, holes: readonly GfnRange[]) {
    this.path = path;
    this.fd = fd;
    this.gfnLimit = gfnLimit;
    this.holes = holes;
  }

  /** Size of the guest-physical address space in bytes (`gfnLimit × 4096`). */
  get sizeBytes(): bigint {
    return this.gfnLimit * PAGE;
  }

  get closed(): boolean {
    return this.fd < 0;
  }

  /** True when `gfn` is below the limit and outside every hole. */
  isBacked(gfn: bigint): boolean {
    if (gfn < 0n || gfn >= this.gfnLimit) return false;
    return this.holeIndex(gfn) < 0;
  }

  /** True when every byte of `[gpa, gpa + len)` is backed. */
  isBackedRange(gpa: bigint, len: number): boolean {
    return this.firstUnbacked(gpa, len) === undefined;
  }

  /** The first unbacked GPA of `[gpa, gpa + len)`, or undefined when the whole range is backed. */
  firstUnbacked(gpa: bigint, len: number): bigint | undefined {
    checkRange(gpa, len);
    if (len === 0) return undefined;
    const last = (gpa + BigInt(len) - 1n) >> PAGE_SHIFT;
    for (let gfn = gpa >> PAGE_SHIFT; gfn <= last; gfn++) {
      if (gfn >= this.gfnLimit) return gfn === gpa >> PAGE_SHIFT ? gpa : gfn << PAGE_SHIFT;
      const h = this.holeIndex(gfn);
      if (h >= 0) return gfn === gpa >> PAGE_SHIFT ? gpa : gfn << PAGE_SHIFT;
    }
    return undefined;
  }

  /** Read `len` bytes at `gpa` (may cross pages). Throws `unbacked` before reading anything. */
  read(gpa: bigint, len: number): Uint8Array {
    checkRange(gpa, len);
    const out = new Uint8Array(len);
    this.readInto(gpa, out);
    return out;
  }

  /** Read `dst.length` bytes at `gpa` into `dst`. */
  readInto(gpa: bigint, dst: Uint8Array): void {
    this.requireBacked(gpa, dst.length);
    this.pread(gpa, dst);
  }

  /** Write `bytes` at `gpa` (may cross pages). Throws `unbacked` before writing anything. */
  write(gpa: bigint, bytes: Uint8Array): void {
    this.requireBacked(gpa, bytes.length);
    const fd = this.requireOpen();
    let done = 0;
    const base = Number(gpa);
    while (done < bytes.length) {
      done += writeSync(fd, bytes, done, bytes.length - done, base + done);
    }
  }

  readU8(gpa: bigint): number {
    this.readInto(gpa, this.scratch.subarray(0, 1));
    return this.scratch[0]!;
  }

  writeU8(gpa: bigint, value: number): void {
    if (!Number.isInteger(value) || value < 0 || value > 0xff) {
      throw new X86Error('invalid-argument', `writeU8: ${value} is not a u8`);
    }
    this.scratch[0] = value;
    this.write(gpa, this.scratch.subarray(0, 1));
  }

  readU32(gpa: bigint): number {
    this.readInto(gpa, this.scratch.subarray(0, 4));
    return this.scratch.readUInt32LE(0);
  }

  writeU32(gpa: bigint, value: number): void {
    if (!Number.isInteger(value) || value < 0 || value > 0xffff_ffff) {
      throw new X86Error('invalid-argument', `writeU32: ${value} is not a u32`);
    }
    this.scratch.writeUInt32LE(value, 0);
    this.write(gpa, this.scratch.subarray(0, 4));
  }

  /** Little-endian u64 at `gpa` (any alignment; may cross a page). */
  readU64(gpa: bigint): bigint {
    this.readInto(gpa, this.scratch);
    return this.scratch.readBigUInt64LE(0);
  }

  writeU64(gpa: bigint, value: bigint): void {
    if (value < 0n || value > 0xffff_ffff_ffff_ffffn) {
      throw new X86Error('invalid-argument', `writeU64: ${value} is not a u64`);
    }
    this.scratch.writeBigUInt64LE(value, 0);
    this.write(gpa, this.scratch);
  }

  /** Fill `[gpa, gpa + len)` with zeros. */
  zero(gpa: bigint, len: number): void {
    checkRange(gpa, len);
    this.write(gpa, new Uint8Array(len));
  }

  /** Close the file descriptor (the file stays). Idempotent. */
  close(): void {
    if (this.fd >= 0) {
      const fd = this.fd;
      this.fd = -1;
      closeSync(fd);
    }
  }

  /** Close and delete the file. Idempotent. */
  remove(): void {
    this.close();
    rmSync(this.path, { force: true });
  }

  private requireOpen(): number {
    if (this.fd < 0) throw new X86Error('closed', `GuestRam ${this.path} is closed`);
    return this.fd;
  }

  private requireBacked(gpa: bigint, len: number): void {
    const bad = this.firstUnbacked(gpa, len);
    if (bad !== undefined) {
      throw new X86Error('unbacked', `GPA 0x${bad.toString(16)} is not backed by guest RAM`, bad);
    }
  }

  private pread(gpa: bigint, dst: Uint8Array): void {
    const fd = this.requireOpen();
    let done = 0;
    const base = Number(gpa);
    while (done < dst.length) {
      const n = readSync(fd, dst, done, dst.length - done, base + done);
      if (n === 0) {
        dst.fill(0, done); // beyond the end of a shorter file: reads as zeros, like a sparse page
        return;
      }
      done += n;
    }
  }

  /** Index of the hole containing gfn, or -1. */
  private holeIndex(gfn: bigint): number {
    const holes = this.holes;
    let lo = 0;
    let hi = holes.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      const h = holes[mid]!;
      if (gfn < h.start) hi = mid - 1;
      else if (gfn >= h.end) lo = mid + 1;
      else return mid;
    }
    return -1;
  }
}

function checkRange(gpa: bigint, len: number): void {
  if (typeof gpa !== 'bigint' || gpa < 0n) {
    throw new X86Error('invalid-argument', `GPA ${String(gpa)} is not a non-negative bigint`);
  }
  if (!Number.isSafeInteger(len) || len < 0) {
    throw new X86Error('invalid-argument', `length ${len} is not a non-negative integer`);
  }
}

function normaliseLayout(layout: GuestRamLayout): { gfnLimit: bigint; holes: GfnRange[] } {
  const { gfnLimit } = layout;
  if (typeof gfnLimit !== 'bigint' || gfnLimit <= 0n || gfnLimit > MAX_GFN_LIMIT) {
    throw new X86Error('invalid-argument', `gfnLimit ${String(gfnLimit)} must be a bigint in (0, 2^40]`);
  }
  const sorted = [...(layout.holes ?? [])]
    .map((h) => {
      if (typeof h.start !== 'bigint' || typeof h.end !== 'bigint' || h.start < 0n || h.end < h.start) {
        throw new X86Error('invalid-argument', `hole [${String(h.start)}, ${String(h.end)}) is not a GFN range`);
      }
      return { start: h.start, end: h.end < gfnLimit ? h.end : gfnLimit };
    })
    .filter((h) => h.start < h.end)
    .sort((a, b) => (a.start < b.start ? -1 : a.start > b.start ? 1 : 0));
  const merged: GfnRange[] = [];
  for (const h of sorted) {
    const last = merged[merged.length - 1];
    if (last && h.start <= last.end) {
      merged[merged.length - 1] = { start: last.start, end: h.end > last.end ? h.end : last.end };
    } else {
      merged.push(h);
    }
  }
  return { gfnLimit, holes: merged };
}
