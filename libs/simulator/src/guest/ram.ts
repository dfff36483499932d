/**
 * A VM's guest-physical memory: the `@periscope/x86` `GuestRam` sparse file `<run dir>/<uuid>.ram`
 * (offset = GPA, the format the guest agent's simulated `/dev/kvmmem` maps), seen through the memslot
 * layout (a gfn limit and holes). `VmMemory` adds what KVM needs on top of it:
 *
 * - answers that never throw for the KVMI paths (`read` → null, `write` → false when any byte is
 *   unbacked: the caller turns that into ENOENT / MMIO);
 * - **bounded descriptors**: the file is opened on first use and parked in a process-wide LRU pool
 *   (`RAM_FD_POOL_SIZE` descriptors at most, default 128), so a process can hold 1024 idle VMs with one
 *   socket each and a bounded number of open RAM files. Closing a parked file only costs a re-open on
 *   the next access; the file (and so the guest's memory) stays.
 *
 * Every access is positional I/O with no cache in this process (see `GuestRam`), so another process
 * that writes the file is seen at the next read.
 */
import { mkdirSync, mkdtempSync, readdirSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { GuestRam, isX86Error, type GfnRange as X86GfnRange } from '@periscope/x86';

import { SimError } from '../errors.js';

export const PAGE_SIZE = 4096;

/** A half-open gfn range [start, end). */
export type GfnRange = readonly [start: number, end: number];

/** The legacy VGA window 0xA0000–0xBFFFF: not in any memslot. */
export const DEFAULT_HOLES: readonly GfnRange[] = [[0xa0, 0xc0]];

export interface VmMemoryOptions {
  /** Directory of the RAM file (created if missing). */
  dir: string;
  /** The file name stem (the VM uuid in text form). */
  uuid: string;
  /** RAM size in MiB: the gfn limit is `memoryMiB · 256`. */
  memoryMiB: number;
  holes?: readonly GfnRange[];
}

// ---- the descriptor pool ------------------------------------------------------------------------

let poolSize = 128;
const open = new Map<VmMemory, true>(); // insertion order = LRU order

/** The largest number of RAM files this process keeps open at once (VMs beyond it re-open on use). */
export function setRamFdPoolSize(n: number): void {
  if (!Number.isInteger(n) || n < 1) throw new SimError('invalid-argument', 'the RAM descriptor pool needs at least 1 slot');
  poolSize = n;
  trimPool();
}

export function ramFdPoolSize(): number {
  return poolSize;
}

/** RAM files open right now (for tests and the descriptor-limit check). */
export function openRamFiles(): number {
  return open.size;
}

function touch(m: VmMemory): void {
  open.delete(m);
  open.set(m, true);
  trimPool();
}

function trimPool(): void {
  while (open.size > poolSize) {
    const oldest = open.keys().next().value as VmMemory;
    open.delete(oldest);
    oldest.park();
  }
}

// ---- run directories ------------------------------------------------------------------------------

let tempRoot: string | null = null;
let tempCounter = 0;

const TEMP_PREFIX = 'periscope-sim-';

/** Remove the temporary roots of processes that are gone (killed before their exit handler ran). */
function collectStaleRoots(): void {
  let names: string[];
  try {
    names = readdirSync(tmpdir());
  } catch {
    return;
  }
  for (const name of names) {
    const m = /^periscope-sim-(\d+)-[A-Za-z0-9]{6}$/.exec(name);
    if (!m || Number(m[1]) === process.pid) continue;
    try {
      process.kill(Number(m[1]), 0);
      continue; // alive (or not ours to signal): leave it
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ESRCH') continue;
    }
    rmSync(join(tmpdir(), name), { recursive: true, force: true });
  }
}

/**
 * A fresh directory under this process's temporary root (`$TMPDIR/periscope-sim-<pid>-XXXXXX`), which
 * is removed when the process exits. Roots left behind by processes that were killed are removed when
 * another process creates its root.
 */
export function tempRunDir(): string {
  if (tempRoot === null) {
    collectStaleRoots();
    tempRoot = mkdtempSync(join(tmpdir(), `${TEMP_PREFIX}${process.pid}-`));
    const root = tempRoot;
    process.once('exit', () => rmSync(root, { recursive: true, force: true }));
  }
  const dir = join(tempRoot, String(++tempCounter));
  mkdirSync(dir);
  return dir;
}

/** Paths of RAM files owned by live VMs of this process (two VMs must never share one). */
const livePaths = new Set<string>();

export class VmMemory {
  /** First gfn past the end of RAM (exclusive limit; VM_GET_MAX_GFN answers this). */
  readonly limitGfn: number;
  readonly holes: readonly GfnRange[];
  /** `<dir>/<uuid>.ram`. */
  readonly path: string;
  private readonly layout: { gfnLimit: bigint; holes: X86GfnRange[] };
  private ram_: GuestRam | null;
  private closed = false;

  constructor(opts: VmMemoryOptions) {
    if (!Number.isInteger(opts.memoryMiB) || opts.memoryMiB < 1) throw new SimError('invalid-argument', 'memoryMiB must be a positive integer');
    this.limitGfn = opts.memoryMiB * 256;
    this.holes = opts.holes ?? DEFAULT_HOLES;
    this.layout = {
      gfnLimit: BigInt(this.limitGfn),
      holes: this.holes.map(([s, e]) => ({ start: BigInt(s), end: BigInt(e) })),
    };
    this.path = GuestRam.pathFor(opts.dir, opts.uuid);
    if (livePaths.has(this.path)) throw new SimError('invalid-argument', `another VM of this process uses ${this.path}`);
    this.ram_ = GuestRam.create({ dir: opts.dir, uuid: opts.uuid, ...this.layout });
    livePaths.add(this.path);
    touch(this);
  }

  /** The open `GuestRam` (re-opened when it was parked). For the x86 walker, builder and instructions. */
  get ram(): GuestRam {
    if (this.closed) throw new SimError('invalid-argument', `guest RAM ${this.path} was released`);
    if (this.ram_ === null) this.ram_ = GuestRam.open({ path: this.path, ...this.layout });
    touch(this);
    return this.ram_;
  }

  /** @internal The pool closes the descriptor of the least recently used file. */
  park(): void {
    const r = this.ram_;
    this.ram_ = null;
    r?.close();
  }

  /** Release the descriptor; with `remove`, delete the file too. Idempotent. Further accesses throw. */
  release(remove: boolean): void {
    if (this.closed) return;
    this.closed = true;
    open.delete(this);
    this.park();
    livePaths.delete(this.path);
    if (remove) rmSync(this.path, { force: true });
  }

  get released(): boolean {
    return this.closed;
  }

  /** Highest backed guest physical address (inclusive), as QEMU's handshake `max_gpa`. */
  get maxGpa(): bigint {
    return (BigInt(this.limitGfn) << 12n) - 1n;
  }

  /** Bytes the sparse file really occupies on disk (pages written at least once). */
  get allocatedBytes(): number {
    return statSync(this.path).blocks * 512;
  }

  isBackedGfn(gfn: number): boolean {
    if (!Number.isSafeInteger(gfn) || gfn < 0 || gfn >= this.limitGfn) return false;
    for (const [s, e] of this.holes) if (gfn >= s && gfn < e) return false;
    return true;
  }

  isBacked(gpa: bigint): boolean {
    return gpa >= 0n && gpa <= 0xffff_ffff_ffff_ffffn && this.isBackedGfn(gfnOf(gpa));
  }

  /** True when every byte of [gpa, gpa + len) is backed. */
  isBackedRange(gpa: bigint, len: number): boolean {
    if (gpa < 0n || len < 0) return false;
    if (len === 0) return true;
    for (let g = gfnOf(gpa), last = gfnOf(gpa + BigInt(len) - 1n); g <= last; g++) if (!this.isBackedGfn(g)) return false;
    return true;
  }

  /** Read `len` bytes at `gpa` (may span pages); null if any byte is unbacked. */
  read(gpa: bigint, len: number): Buffer | null {
    if (!this.isBackedRange(gpa, len)) return null;
    const out = Buffer.alloc(len);
    this.guard(() => this.ram.readInto(gpa, out));
    return out;
  }

  /** Write bytes at `gpa` (may span pages); false (nothing written) if any byte is unbacked. */
  write(gpa: bigint, data: Uint8Array): boolean {
    if (!this.isBackedRange(gpa, data.length)) return false;
    if (data.length > 0) this.guard(() => this.ram.write(gpa, data));
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

  /** A copy of the whole page (zeros if never written), or null if unbacked. */
  snapshotPage(gfn: number): Buffer | null {
    return this.read(BigInt(gfn) << 12n, PAGE_SIZE);
  }

  private guard(f: () => void): void {
    try {
      f();
    } catch (err) {
      // Checked above: an `unbacked` error here is a simulator bug, anything else is an I/O error.
      if (isX86Error(err, 'unbacked')) throw new Error(`simulator: unexpected unbacked access (${err.message})`);
      throw err;
    }
  }
}

export function gfnOf(gpa: bigint): number {
  return Number(BigInt.asUintN(64, gpa) >> 12n);
}
