import { closeSync, existsSync, openSync, readSync, statSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { GuestRam, X86Error, isX86Error } from '../src/index.js';
import { scratchDir } from './support/ram.js';

function caught(fn: () => unknown): X86Error {
  try {
    fn();
  } catch (e) {
    if (e instanceof X86Error) return e;
    throw e;
  }
  throw new Error('expected an X86Error');
}

describe('GuestRam', () => {
  const cleanups: Array<() => void> = [];
  afterEach(() => {
    while (cleanups.length) cleanups.pop()!();
  });
  function make(gfnLimit: bigint, holes: { start: bigint; end: bigint }[] = []): { ram: GuestRam; dir: string } {
    const s = scratchDir();
    const ram = GuestRam.create({ dir: s.dir, uuid: '6b1f2a3c-0d4e-4f50-8a9b-112233445566', gfnLimit, holes });
    cleanups.push(() => {
      ram.close();
      s.cleanup();
    });
    return { ram, dir: s.dir };
  }

  it('creates <dir>/<uuid>.ram as a sparse file of gfnLimit pages that reads as zeros', () => {
    const { ram, dir } = make(0x4000n); // 64 MiB
    expect(ram.path).toBe(join(dir, '6b1f2a3c-0d4e-4f50-8a9b-112233445566.ram'));
    const st = statSync(ram.path);
    expect(st.size).toBe(64 * 1024 * 1024);
    expect(st.blocks * 512).toBeLessThan(1024 * 1024); // sparse: nothing allocated yet
    expect(ram.sizeBytes).toBe(0x400_0000n);
    expect(ram.read(0x123_4000n, 16)).toEqual(new Uint8Array(16));
    expect(ram.readU64(0x3ff_fff8n)).toBe(0n);
  });

  it('reads and writes within a page and across page boundaries', () => {
    const { ram } = make(16n);
    ram.write(0x1010n, Uint8Array.of(1, 2, 3, 4));
    expect(ram.read(0x100fn, 6)).toEqual(Uint8Array.of(0, 1, 2, 3, 4, 0));
    const span = Uint8Array.from({ length: 300 }, (_, i) => (i * 7 + 3) & 0xff);
    ram.write(0x2f80n, span); // crosses 0x3000
    expect(ram.read(0x2f80n, 300)).toEqual(span);
    expect(ram.read(0x3000n, 4)).toEqual(span.subarray(0x80, 0x84));
    // three pages at once
    const big = Uint8Array.from({ length: 9000 }, (_, i) => i & 0xff);
    ram.write(0x4800n, big);
    expect(ram.read(0x4800n, 9000)).toEqual(big);
  });

  it('u64 accessors are little-endian, also across a page boundary', () => {
    const { ram } = make(4n);
    ram.writeU64(0x10n, 0x0807_0605_0403_0201n);
    expect(ram.read(0x10n, 8)).toEqual(Uint8Array.of(1, 2, 3, 4, 5, 6, 7, 8));
    ram.write(0xffcn, Uint8Array.of(0xef, 0xbe, 0xad, 0xde, 0x78, 0x56, 0x34, 0x12));
    expect(ram.readU64(0xffcn)).toBe(0x1234_5678_dead_beefn);
    ram.writeU64(0x1ffdn, 0xffff_ffff_ffff_ffffn);
    expect(ram.read(0x1ffcn, 10)).toEqual(Uint8Array.of(0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0));
    ram.writeU32(0x20n, 0xa1b2c3d4);
    expect(ram.read(0x20n, 4)).toEqual(Uint8Array.of(0xd4, 0xc3, 0xb2, 0xa1));
    expect(ram.readU32(0x20n)).toBe(0xa1b2c3d4);
    ram.writeU8(0x30n, 0x5a);
    expect(ram.readU8(0x30n)).toBe(0x5a);
    expect(caught(() => ram.writeU64(0n, 1n << 64n)).code).toBe('invalid-argument');
    expect(caught(() => ram.writeU64(0n, -1n)).code).toBe('invalid-argument');
    expect(caught(() => ram.writeU32(0n, 2 ** 32)).code).toBe('invalid-argument');
  });

  it('holes and the limit are unbacked: typed error naming the first unbacked GPA, nothing transferred', () => {
    const { ram } = make(32n, [
      { start: 8n, end: 10n },
      { start: 9n, end: 12n }, // overlaps: merged into [8, 12)
      { start: 20n, end: 21n },
      { start: 30n, end: 99n }, // clipped to the limit
    ]);
    expect(ram.holes).toEqual([
      { start: 8n, end: 12n },
      { start: 20n, end: 21n },
      { start: 30n, end: 32n },
    ]);
    const backed = [...Array(34).keys()].filter((g) => ram.isBacked(BigInt(g)));
    expect(backed).toEqual([0, 1, 2, 3, 4, 5, 6, 7, 12, 13, 14, 15, 16, 17, 18, 19, 21, 22, 23, 24, 25, 26, 27, 28, 29]);
    expect(ram.isBacked(-1n)).toBe(false);

    let e = caught(() => ram.read(0x8000n, 1));
    expect(e.code).toBe('unbacked');
    expect(e.gpa).toBe(0x8000n);
    e = caught(() => ram.read(0xb123n, 4));
    expect(e.gpa).toBe(0xb123n);
    // a read starting in backed RAM and running into the hole reports the hole's first byte
    e = caught(() => ram.read(0x7ff0n, 0x20));
    expect(e.code).toBe('unbacked');
    expect(e.gpa).toBe(0x8000n);
    // a write running into the hole writes nothing at all
    e = caught(() => ram.write(0x7ffcn, Uint8Array.of(9, 9, 9, 9, 9, 9, 9, 9)));
    expect(e.code).toBe('unbacked');
    expect(ram.read(0x7ffcn, 4)).toEqual(new Uint8Array(4));
    expect(caught(() => ram.readU64(0x14000n)).code).toBe('unbacked');
    expect(caught(() => ram.writeU64(0x14ff8n, 1n)).code).toBe('unbacked');
    // the gfn limit is exclusive
    ram.writeU64(0x1cff8n, 7n);
    expect(ram.readU64(0x1cff8n)).toBe(7n);
    e = caught(() => ram.read(0x1e000n, 1)); // gfn 30: hole clipped at the limit
    expect(e.gpa).toBe(0x1e000n);
    e = caught(() => ram.read(0x20000n, 1)); // gfn 32 = limit
    expect(e.code).toBe('unbacked');
    expect(e.gpa).toBe(0x20000n);
    expect(ram.firstUnbacked(0x1000n, 0x3000)).toBeUndefined();
    expect(ram.firstUnbacked(0x13ff0n, 0x20)).toBe(0x14000n);
    expect(ram.isBackedRange(0x15000n, 0x1000)).toBe(true);
    expect(ram.isBackedRange(0x15000n, 0x1001)).toBe(true);
    expect(ram.isBackedRange(0x13000n, 0x1001)).toBe(false);
    expect(isX86Error(e, 'unbacked')).toBe(true);
    expect(isX86Error(e, 'closed')).toBe(false);
  });

  it('a limit alone (no holes): the last page is backed, the next is not', () => {
    const { ram } = make(3n);
    expect(ram.isBacked(2n)).toBe(true);
    expect(ram.isBacked(3n)).toBe(false);
    ram.write(0x2ff0n, new Uint8Array(16).fill(1));
    const e = caught(() => ram.write(0x2ff8n, new Uint8Array(16)));
    expect(e.gpa).toBe(0x3000n);
    expect(ram.read(0x2ff8n, 8)).toEqual(new Uint8Array(8).fill(1));
  });

  it('writes are visible to a second descriptor on the same file, and the other way round (no cache)', () => {
    const { ram } = make(16n);
    ram.writeU64(0x5008n, 0x1122_3344_5566_7788n);
    const fd = openSync(ram.path, 'r+');
    try {
      const buf = Buffer.alloc(8);
      readSync(fd, buf, 0, 8, 0x5008);
      expect([...buf]).toEqual([0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]);
      // warm any hypothetical cache, then change the bytes behind the library's back
      expect(ram.readU64(0x6000n)).toBe(0n);
      writeSync(fd, Buffer.from([0xaa, 0xbb]), 0, 2, 0x6000);
      expect(ram.read(0x6000n, 3)).toEqual(Uint8Array.of(0xaa, 0xbb, 0));
    } finally {
      closeSync(fd);
    }
  });

  it('GuestRam.open attaches to an existing file; create truncates', () => {
    const { ram, dir } = make(8n);
    ram.write(0x1234n, Uint8Array.of(5, 6, 7));
    const other = GuestRam.open({ path: ram.path, gfnLimit: 8n, holes: [{ start: 1n, end: 2n }] });
    try {
      // the layout is the opener's: gfn 1 is a hole for this view
      expect(caught(() => other.read(0x1234n, 3)).code).toBe('unbacked');
      expect(other.isBacked(0n)).toBe(true);
    } finally {
      other.close();
    }
    const view = GuestRam.open({ path: ram.path, gfnLimit: 8n, readOnly: true });
    try {
      expect(view.read(0x1234n, 3)).toEqual(Uint8Array.of(5, 6, 7));
      ram.write(0x1235n, Uint8Array.of(0x66));
      expect(view.read(0x1234n, 3)).toEqual(Uint8Array.of(5, 0x66, 7));
      expect(() => view.write(0n, Uint8Array.of(1))).toThrow(); // read-only descriptor: EBADF
    } finally {
      view.close();
    }
    ram.close();
    const again = GuestRam.create({ dir, uuid: '6b1f2a3c-0d4e-4f50-8a9b-112233445566', gfnLimit: 8n });
    try {
      expect(again.read(0x1234n, 3)).toEqual(new Uint8Array(3));
    } finally {
      again.close();
    }
  });

  it('a shorter file reads as zeros past its end (another process may not have grown it yet)', () => {
    const s = scratchDir();
    cleanups.push(s.cleanup);
    const path = join(s.dir, 'short.ram');
    writeFileSync(path, Buffer.from([1, 2, 3]));
    const ram = GuestRam.open({ path, gfnLimit: 2n });
    try {
      expect(ram.read(1n, 6)).toEqual(Uint8Array.of(2, 3, 0, 0, 0, 0));
    } finally {
      ram.close();
    }
  });

  it('close makes every access fail with closed; remove deletes the file; both idempotent', () => {
    const { ram } = make(2n);
    ram.close();
    ram.close();
    expect(ram.closed).toBe(true);
    expect(caught(() => ram.read(0n, 1)).code).toBe('closed');
    expect(caught(() => ram.writeU64(0n, 1n)).code).toBe('closed');
    // unbacked is still decided first: it does not need the file
    expect(caught(() => ram.read(0x2000n, 1)).code).toBe('unbacked');
    expect(existsSync(ram.path)).toBe(true);
    ram.remove();
    ram.remove();
    expect(existsSync(ram.path)).toBe(false);
  });

  it('rejects bad arguments', () => {
    const s = scratchDir();
    cleanups.push(s.cleanup);
    expect(caught(() => GuestRam.create({ dir: s.dir, uuid: '../x', gfnLimit: 1n })).code).toBe('invalid-argument');
    expect(caught(() => GuestRam.create({ dir: s.dir, uuid: 'a', gfnLimit: 0n })).code).toBe('invalid-argument');
    expect(caught(() => GuestRam.create({ dir: s.dir, uuid: 'a', gfnLimit: (1n << 40n) + 1n })).code).toBe('invalid-argument');
    expect(caught(() => GuestRam.create({ dir: s.dir, uuid: 'a', gfnLimit: 4n, holes: [{ start: 3n, end: 2n }] })).code).toBe(
      'invalid-argument',
    );
    const { ram } = make(2n);
    expect(caught(() => ram.read(-1n, 1)).code).toBe('invalid-argument');
    expect(caught(() => ram.read(0n, -1)).code).toBe('invalid-argument');
    expect(caught(() => ram.read(0n, 1.5)).code).toBe('invalid-argument');
    expect(ram.read(0x1fffn, 0)).toEqual(new Uint8Array(0));
    expect(ram.read(0x2000n, 0)).toEqual(new Uint8Array(0)); // empty access at the limit touches nothing
  });
});
