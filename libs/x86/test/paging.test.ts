import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  EFER_LMA,
  EFER_LME,
  EFER_NXE,
  GuestRam,
  INVALID_GPA,
  PageTableBuilder,
  X86Error,
  canonical,
  isCanonical,
  setAccessedDirty,
  translate,
  walk,
  type PageSize,
  type PagingLevel,
  type WalkFault,
  type WalkOk,
} from '../src/index.js';
import { scratchRam } from './support/ram.js';

const K4 = 0x1000n;
const M2 = 0x20_0000n;
const G1 = 0x4000_0000n;
const NXE_ON = EFER_LME | EFER_LMA | EFER_NXE;
const NXE_OFF = EFER_LME | EFER_LMA;

function ok(r: ReturnType<typeof walk>): WalkOk {
  if (!r.ok) throw new Error(`walk faulted: ${r.reason} at level ${r.level}`);
  return r;
}
function fault(r: ReturnType<typeof walk>): WalkFault {
  if (r.ok) throw new Error(`walk succeeded: gpa 0x${r.gpa.toString(16)}`);
  return r;
}
function code(fn: () => unknown): string {
  try {
    fn();
  } catch (e) {
    if (e instanceof X86Error) return e.code;
    throw e;
  }
  return 'no error';
}

let ram: GuestRam;
let cleanup: () => void;
beforeAll(() => {
  ({ ram, cleanup } = scratchRam(0x800n, [{ start: 0x700n, end: 0x710n }])); // 8 MiB with a hole
});
afterAll(() => cleanup());

describe('canonical addresses (48-bit)', () => {
  it('bits 63:47 must be equal', () => {
    expect(isCanonical(0n)).toBe(true);
    expect(isCanonical(0x0000_7fff_ffff_ffffn)).toBe(true);
    expect(isCanonical(0x0000_8000_0000_0000n)).toBe(false);
    expect(isCanonical(0xffff_7fff_ffff_ffffn)).toBe(false);
    expect(isCanonical(0xffff_8000_0000_0000n)).toBe(true);
    expect(isCanonical(0xffff_ffff_ffff_ffffn)).toBe(true);
    expect(isCanonical(0x0001_0000_0000_0000n)).toBe(false);
    expect(isCanonical(-1n)).toBe(false);
    expect(isCanonical(1n << 64n)).toBe(false);
    expect(canonical(0x8000_0000_0000n)).toBe(0xffff_8000_0000_0000n);
    expect(canonical(0x7fff_ffff_f000n)).toBe(0x7fff_ffff_f000n);
  });
});

describe('walk over hand-written paging structures (no builder involved)', () => {
  // CR3 = 0x10000. gva 0x80_4020_1abc has index 1 at every level (bits 39, 30, 21, 12 set).
  beforeAll(() => {
    ram.zero(0x10000n, 0x4000);
    ram.writeU64(0x10008n, 0x11007n); // PML4[1] → PDPT 0x11000, P RW US
    ram.writeU64(0x11008n, 0x12007n); // PDPT[1] → PD 0x12000, P RW US
    ram.writeU64(0x12008n, 0x13007n); // PD[1] → PT 0x13000, P RW US
    ram.writeU64(0x13008n, 0x8000_0000_0005_5025n); // PT[1] → 0x55000, P US A, read-only, XD
    ram.writeU64(0x12010n, 0x60_0083n); // PD[2]: 2 MiB page at 0x600000, P RW PS, supervisor
    ram.writeU64(0x11010n, 0x4000_1087n); // PDPT[2]: 1 GiB page at 0x4000_0000, P RW US PS, PAT (bit 12)
    ram.writeU64(0x11018n, 0x4000_1086n); // PDPT[3]: same but P = 0
  });

  it('4 KiB: gpa, size, level, effective flags and the entry addresses', () => {
    const r = ok(walk(ram, 0x10000n, 0x80_4020_1abcn));
    expect(r.gpa).toBe(0x55abcn);
    expect(r.pageSize).toBe(K4);
    expect(r.level).toBe(1);
    expect(r.flags).toEqual({ rw: false, us: true, nx: true });
    expect(r.leaf).toBe(0x8000_0000_0005_5025n);
    expect(r.entries.map((e) => [e.level, e.gpa])).toEqual([
      [4, 0x10008n],
      [3, 0x11008n],
      [2, 0x12008n],
      [1, 0x13008n],
    ]);
    // CR3 low bits (PCID / PWT / PCD) do not move the table
    expect(ok(walk(ram, 0x10fffn, 0x80_4020_1abcn)).gpa).toBe(0x55abcn);
  });

  it('2 MiB: PD entry with PS = 1', () => {
    const r = ok(walk(ram, 0x10000n, 0x80_4041_2345n));
    expect(r.gpa).toBe(0x61_2345n);
    expect(r.pageSize).toBe(M2);
    expect(r.level).toBe(2);
    expect(r.flags).toEqual({ rw: true, us: false, nx: false });
    expect(r.entries).toHaveLength(3);
  });

  it('1 GiB: PDPT entry with PS = 1; the PAT bit (12) is not part of the address', () => {
    const r = ok(walk(ram, 0x10000n, 0x80_9234_5678n));
    expect(r.gpa).toBe(0x5234_5678n);
    expect(r.pageSize).toBe(G1);
    expect(r.level).toBe(3);
    expect(r.flags).toEqual({ rw: true, us: true, nx: false });
  });

  it('not present at each level', () => {
    expect(fault(walk(ram, 0x10000n, 0x0n))).toMatchObject({ level: 4, reason: 'not-present' });
    expect(fault(walk(ram, 0x10000n, 0x80_0000_0000n))).toMatchObject({ level: 3, reason: 'not-present' });
    expect(fault(walk(ram, 0x10000n, 0x80_c000_0000n))).toMatchObject({ level: 3, reason: 'not-present' }); // P = 0 with PS = 1
    expect(fault(walk(ram, 0x10000n, 0x80_4000_0000n))).toMatchObject({ level: 2, reason: 'not-present' });
    expect(fault(walk(ram, 0x10000n, 0x80_4020_0000n))).toMatchObject({ level: 1, reason: 'not-present' });
  });

  it('translate: the GPA or all ones', () => {
    expect(translate(ram, 0x10000n, 0x80_4020_1abcn)).toBe(0x55abcn);
    expect(translate(ram, 0x10000n, 0x80_4020_0000n)).toBe(0xffff_ffff_ffff_ffffn);
    expect(translate(ram, 0x10000n, 0x8000_0000_0000n)).toBe(0xffff_ffff_ffff_ffffn);
    expect(INVALID_GPA).toBe(0xffff_ffff_ffff_ffffn);
    // with NXE = 0 the XD bit of the PTE is reserved: no translation
    expect(translate(ram, 0x10000n, 0x80_4020_1abcn, { efer: NXE_OFF })).toBe(0xffff_ffff_ffff_ffffn);
  });

  it('non-canonical addresses fault before any table is read', () => {
    const r = fault(walk(ram, 0x10000n, 0x0000_8000_0000_0000n));
    expect(r).toMatchObject({ level: 0, reason: 'non-canonical' });
    expect(r.entries).toHaveLength(0);
    expect(fault(walk(ram, 0x10000n, 0xffff_7fff_ffff_f000n)).reason).toBe('non-canonical');
  });

  it('a table in unbacked memory is reported as unbacked at that level', () => {
    const r = fault(walk(ram, 0x70_0000n, 0x1000n)); // CR3 in the hole
    expect(r).toMatchObject({ level: 4, reason: 'unbacked' });
    ram.writeU64(0x10010n, 0x70_1007n); // PML4[2] → PDPT in the hole
    expect(fault(walk(ram, 0x10000n, 0x100_0000_0000n))).toMatchObject({ level: 3, reason: 'unbacked' });
    ram.writeU64(0x10010n, 0n);
  });
});

describe('reserved bits (SDM Tables 4-15 … 4-20)', () => {
  let b: PageTableBuilder;
  const gva = 0x7f12_3456_0000n; // different index at every level
  function setup(size: PageSize): void {
    b = new PageTableBuilder(ram, { pool: { start: 0x10_0000n, end: 0x20_0000n } });
    b.map(gva & ~(size - 1n), 0x4000_0000n, size, { rw: true, us: true });
  }
  function poke(level: PagingLevel, bits: bigint, clear = 0n): void {
    const e = b.entryGpa(gva, level)!;
    ram.writeU64(e, (ram.readU64(e) | bits) & ~clear);
  }
  const levelsOf = (size: PageSize): PagingLevel[] => (size === K4 ? [4, 3, 2, 1] : size === M2 ? [4, 3, 2] : [4, 3]);

  for (const size of [K4, M2, G1] as PageSize[]) {
    const label = size === K4 ? '4K' : size === M2 ? '2M' : '1G';
    for (const level of levelsOf(size)) {
      it(`${label}: bits 51:MAXPHYADDR reserved at level ${level}`, () => {
        setup(size);
        poke(level, 1n << 46n);
        expect(fault(walk(ram, b.cr3, gva, { maxPhyAddr: 46 }))).toMatchObject({ level, reason: 'reserved' });
        expect(fault(walk(ram, b.cr3, gva, { maxPhyAddr: 40 }))).toMatchObject({ level, reason: 'reserved' });
        // with MAXPHYADDR 52, bit 46 is an address bit: the walk goes somewhere else, but no RSVD
        const wide = walk(ram, b.cr3, gva, { maxPhyAddr: 52 });
        expect(wide.ok || wide.reason !== 'reserved').toBe(true);
      });
      it(`${label}: XD reserved at level ${level} when EFER.NXE = 0, honoured when 1`, () => {
        setup(size);
        poke(level, 1n << 63n);
        expect(fault(walk(ram, b.cr3, gva, { efer: NXE_OFF }))).toMatchObject({ level, reason: 'reserved', nxe: false });
        expect(ok(walk(ram, b.cr3, gva, { efer: NXE_ON })).flags.nx).toBe(true);
      });
      it(`${label}: bits 62:52 are ignored at level ${level}`, () => {
        setup(size);
        poke(level, 0x7ffn << 52n);
        expect(ok(walk(ram, b.cr3, gva, { efer: NXE_OFF })).gpa).toBe(0x4000_0000n + (gva & (size - 1n)));
      });
    }
  }

  it('PS = 1 in a PML4E is reserved', () => {
    setup(K4);
    poke(4, 1n << 7n);
    expect(fault(walk(ram, b.cr3, gva))).toMatchObject({ level: 4, reason: 'reserved' });
  });
  it('2 MiB leaf: bits 20:13 reserved, bit 12 (PAT) not', () => {
    for (const bit of [13n, 16n, 20n]) {
      setup(M2);
      poke(2, 1n << bit);
      expect(fault(walk(ram, b.cr3, gva))).toMatchObject({ level: 2, reason: 'reserved' });
    }
    setup(M2);
    poke(2, 1n << 12n);
    expect(ok(walk(ram, b.cr3, gva)).gpa).toBe(0x4000_0000n + (gva & (M2 - 1n)));
    setup(M2);
    poke(2, 1n << 21n); // the lowest address bit of a 2 MiB frame
    expect(ok(walk(ram, b.cr3, gva)).gpa).toBe(0x4020_0000n + (gva & (M2 - 1n)));
  });
  it('1 GiB leaf: bits 29:13 reserved, bit 12 (PAT) not', () => {
    for (const bit of [13n, 21n, 29n]) {
      setup(G1);
      poke(3, 1n << bit);
      expect(fault(walk(ram, b.cr3, gva))).toMatchObject({ level: 3, reason: 'reserved' });
    }
    setup(G1);
    poke(3, 1n << 12n);
    expect(ok(walk(ram, b.cr3, gva)).pageSize).toBe(G1);
  });
  it('4 KiB PTE: bit 7 is PAT, bits 12..20 are address bits (nothing reserved below MAXPHYADDR)', () => {
    setup(K4);
    poke(1, (1n << 7n) | (1n << 13n));
    expect(ok(walk(ram, b.cr3, gva)).gpa).toBe(0x4000_2000n + (gva & 0xfffn));
  });
  it('a non-present entry is not checked for reserved bits', () => {
    setup(K4);
    poke(2, (1n << 63n) | (1n << 50n), 1n);
    expect(fault(walk(ram, b.cr3, gva, { efer: NXE_OFF }))).toMatchObject({ level: 2, reason: 'not-present' });
  });
});

describe('PageTableBuilder', () => {
  const pool = { start: 0x10_0000n, end: 0x20_0000n };

  it('allocates the PML4 first, zeroes pages it takes, maps all three sizes', () => {
    ram.write(0x10_0000n, new Uint8Array(0x3000).fill(0xff)); // garbage in the pool
    const b = new PageTableBuilder(ram, { pool });
    expect(b.cr3).toBe(0x10_0000n);
    expect(b.pagesFree).toBe(255);
    b.map(0xffff_8000_0000_0000n, 0x20_0000n, K4, { rw: true });
    expect(b.tablePages).toEqual([0x10_0000n, 0x10_1000n, 0x10_2000n, 0x10_3000n]);
    b.map(0xffff_8000_0020_0000n, 0x40_0000n, M2, { nx: true });
    b.map(0xffff_8000_4000_0000n, 0x8000_0000n, G1, { us: true, rw: true });
    expect(b.tablePages).toHaveLength(4); // the 2 MiB and 1 GiB leaves reuse the tables
    const a = ok(walk(ram, b.cr3, 0xffff_8000_0000_0123n));
    expect([a.gpa, a.pageSize, a.flags]).toEqual([0x20_0123n, K4, { rw: true, us: false, nx: false }]);
    const m = ok(walk(ram, b.cr3, 0xffff_8000_003f_ffffn));
    expect([m.gpa, m.pageSize, m.flags]).toEqual([0x5f_ffffn, M2, { rw: false, us: false, nx: true }]);
    const g = ok(walk(ram, b.cr3, 0xffff_8000_7fff_fff8n));
    expect([g.gpa, g.pageSize, g.flags]).toEqual([0xbfff_fff8n, G1, { rw: true, us: true, nx: false }]);
    // the garbage of a reused pool page does not leak in as mappings
    expect(fault(walk(ram, b.cr3, 0xffff_8000_0000_1000n)).reason).toBe('not-present');
    expect(fault(walk(ram, b.cr3, 0x1000n)).level).toBe(4);
  });

  it('leaf bits: exact entry values for each size', () => {
    const b = new PageTableBuilder(ram, { pool });
    b.map(0x1000n, 0x7000n, K4, { rw: true, us: true, nx: true, accessed: true, dirty: true, global: true, pwt: true, pcd: true });
    expect(ram.readU64(b.entryGpa(0x1000n, 1)!)).toBe(0x8000_0000_0000_717fn);
    b.map(0x20_0000n, 0x60_0000n, M2, {});
    expect(ram.readU64(b.entryGpa(0x20_0000n, 2)!)).toBe(0x60_0081n);
    b.map(0x4000_0000n, 0x4000_0000n, G1, { rw: true });
    expect(ram.readU64(b.entryGpa(0x4000_0000n, 3)!)).toBe(0x4000_0083n);
    // non-leaf entries: P RW US by default
    expect(ram.readU64(b.entryGpa(0x1000n, 4)!) & 0xfffn).toBe(0x7n);
    const strict = new PageTableBuilder(ram, { pool, tableFlags: { rw: false, us: false, nx: true } });
    strict.map(0x1000n, 0x7000n, K4, { rw: true, us: true });
    expect(ram.readU64(strict.entryGpa(0x1000n, 4)!)).toBe(0x8000_0000_0010_1001n);
    expect(ok(walk(ram, strict.cr3, 0x1000n)).flags).toEqual({ rw: false, us: false, nx: true });
  });

  it('conflicts, alignment, MAXPHYADDR and pool exhaustion are typed errors', () => {
    const b = new PageTableBuilder(ram, { pool: { start: 0x10_0000n, end: 0x10_4000n } });
    b.map(0x20_0000n, 0x20_0000n, M2);
    expect(code(() => b.map(0x20_1000n, 0x1000n, K4))).toBe('mapping-conflict');
    b.map(0x40_0000n, 0x1000n, K4);
    expect(code(() => b.map(0x40_0000n, 0x20_0000n, M2))).toBe('mapping-conflict');
    b.map(0x4000_0000n, 0x4000_0000n, G1);
    expect(code(() => b.map(0x4000_0000n, 0x20_0000n, M2))).toBe('mapping-conflict');
    expect(code(() => b.map(0x1001n, 0x1000n, K4))).toBe('invalid-argument');
    expect(code(() => b.map(0x1000n, 0x1800n, K4))).toBe('invalid-argument');
    expect(code(() => b.map(0x20_0000n, 0x1000n, M2))).toBe('invalid-argument');
    expect(code(() => b.map(0x8000_0000_0000n, 0x1000n, K4))).toBe('invalid-argument');
    expect(code(() => b.map(0x1000n, 1n << 46n, K4))).toBe('invalid-argument');
    expect(code(() => b.map(0x1000n, 0n, 0x2000n as PageSize))).toBe('invalid-argument');
    // 4 pool pages: PML4, PDPT, PD used; one PT for 0x40_0000 → the pool is empty now
    expect(b.pagesFree).toBe(0);
    expect(code(() => b.map(0x8000_0000_0000n - 0x1000n, 0x1000n, K4))).toBe('pool-exhausted');
    expect(code(() => new PageTableBuilder(ram, { pool: { start: 0x10_0800n, end: 0x10_4000n } }))).toBe('invalid-argument');
    expect(code(() => new PageTableBuilder(ram, { pool: { start: 0x70_0000n, end: 0x70_1000n } }))).toBe('unbacked');
  });

  it('remapping the same size replaces; unmap and protect rewrite the leaf', () => {
    const b = new PageTableBuilder(ram, { pool });
    b.map(0x5000n, 0x1_0000n, K4, { rw: true });
    b.map(0x5000n, 0x2_0000n, K4, { us: true });
    expect(ok(walk(ram, b.cr3, 0x5008n))).toMatchObject({ gpa: 0x2_0008n, flags: { rw: false, us: true, nx: false } });
    expect(b.protect(0x5fffn, { rw: true, nx: true })).toBe(true);
    expect(ok(walk(ram, b.cr3, 0x5008n))).toMatchObject({ gpa: 0x2_0008n, flags: { rw: true, us: false, nx: true } });
    b.map(0x20_0000n, 0x40_0000n, M2);
    expect(b.protect(0x21_0000n, { us: true })).toBe(true);
    expect(ok(walk(ram, b.cr3, 0x21_0000n))).toMatchObject({ gpa: 0x41_0000n, pageSize: M2, flags: { us: true } });
    expect(b.unmap(0x5000n)).toBe(true);
    expect(fault(walk(ram, b.cr3, 0x5000n))).toMatchObject({ level: 1, reason: 'not-present' });
    expect(b.unmap(0x5000n)).toBe(false);
    expect(b.protect(0x9000_0000n, {})).toBe(false);
    expect(b.unmap(0x8000_0000_0000n)).toBe(false);
  });

  it('mapRange maps consecutive pages; a second builder can extend existing tables via cr3', () => {
    const b = new PageTableBuilder(ram, { pool: { start: 0x10_0000n, end: 0x18_0000n } });
    b.mapRange(0xffff_ffff_ffe0_0000n, 0x30_0000n, 0x10_0000n, { rw: true }, K4);
    for (let off = 0n; off < 0x10_0000n; off += 0x1_1000n) {
      expect(translate(ram, b.cr3, 0xffff_ffff_ffe0_0000n + off + 7n)).toBe(0x30_0007n + off);
    }
    expect(code(() => b.mapRange(0n, 0n, 0x1800n))).toBe('invalid-argument');
    const more = new PageTableBuilder(ram, { pool: { start: 0x18_0000n, end: 0x20_0000n }, cr3: b.cr3 | 0x18n });
    expect(more.cr3).toBe(b.cr3);
    more.map(0x1000n, 0x9000n);
    expect(translate(ram, b.cr3, 0x1234n)).toBe(0x9234n);
    expect(more.tablePages[0]).toBe(0x18_0000n);
  });

  it('setAccessedDirty sets A on every level and D on the leaf for writes only', () => {
    const b = new PageTableBuilder(ram, { pool, tableFlags: { rw: true, us: true } });
    b.map(0x3000n, 0x8000n, K4, { rw: true });
    b.map(0x40_0000n, 0x60_0000n, M2, { rw: true });
    const r = ok(walk(ram, b.cr3, 0x3000n));
    setAccessedDirty(ram, r, false);
    const afterRead = ok(walk(ram, b.cr3, 0x3000n)).entries.map((e) => e.value & 0x60n);
    expect(afterRead).toEqual([0x20n, 0x20n, 0x20n, 0x20n]);
    setAccessedDirty(ram, ok(walk(ram, b.cr3, 0x3000n)), true);
    expect(ok(walk(ram, b.cr3, 0x3000n)).entries.map((e) => e.value & 0x60n)).toEqual([0x20n, 0x20n, 0x20n, 0x60n]);
    setAccessedDirty(ram, ok(walk(ram, b.cr3, 0x40_0000n)), true);
    expect(ok(walk(ram, b.cr3, 0x40_0000n)).entries.map((e) => e.value & 0x60n)).toEqual([0x20n, 0x20n, 0x60n]);
  });
});

describe('builder → walker round trips (fast-check)', () => {
  type M = { size: PageSize; gva: bigint; gpa: bigint; rw: boolean; us: boolean; nx: boolean };
  // a small index space so that mappings share tables: PML4 ∈ {0, 1, 255, 256, 511}, others 0..3 / 0..7
  const pml4 = fc.constantFrom(0n, 1n, 255n, 256n, 511n);
  const arbMapping = fc
    .record({
      size: fc.constantFrom<PageSize>(K4, K4, K4, M2, M2, G1),
      i4: pml4,
      i3: fc.bigInt(0n, 3n),
      i2: fc.bigInt(0n, 3n),
      i1: fc.bigInt(0n, 7n),
      frame: fc.bigInt(0n, (1n << 34n) - 1n), // 4 KiB frame number below 2^46
      rw: fc.boolean(),
      us: fc.boolean(),
      nx: fc.boolean(),
    })
    .map(({ size, i4, i3, i2, i1, frame, rw, us, nx }): M => {
      let gva = (i4 << 39n) | (i3 << 30n);
      if (size !== G1) gva |= i2 << 21n;
      if (size === K4) gva |= i1 << 12n;
      return { size, gva: canonical(gva), gpa: (frame << 12n) & ~(size - 1n), rw, us, nx };
    });
  const overlaps = (a: M, b: M): boolean => a.gva < b.gva + b.size && b.gva < a.gva + a.size;

  it('every mapped address translates to its GPA with AND/OR-combined flags; others do not', () => {
    fc.assert(
      fc.property(
        fc.array(arbMapping, { minLength: 1, maxLength: 40 }),
        fc.record({ rw: fc.boolean(), us: fc.boolean(), nx: fc.boolean() }),
        fc.array(fc.bigInt(0n, (1n << 48n) - 1n), { minLength: 20, maxLength: 20 }),
        fc.array(fc.bigInt(0n, G1 - 1n), { minLength: 1, maxLength: 5 }),
        (candidates, tableFlags, probes, offsets) => {
          const kept: M[] = [];
          for (const c of candidates) if (!kept.some((k) => overlaps(k, c))) kept.push(c);
          const b = new PageTableBuilder(ram, { pool: { start: 0x10_0000n, end: 0x20_0000n }, tableFlags });
          for (const m of kept) b.map(m.gva, m.gpa, m.size, m);
          for (const m of kept) {
            for (const o of offsets) {
              const off = o & (m.size - 1n);
              const r = ok(walk(ram, b.cr3, m.gva + off));
              expect(r.gpa).toBe(m.gpa + off);
              expect(r.pageSize).toBe(m.size);
              expect(r.flags).toEqual({ rw: m.rw && tableFlags.rw, us: m.us && tableFlags.us, nx: m.nx || tableFlags.nx });
              expect(translate(ram, b.cr3, m.gva + off)).toBe(m.gpa + off);
            }
          }
          for (const p of probes) {
            const gva = canonical(p);
            const hit = kept.find((m) => gva >= m.gva && gva < m.gva + m.size);
            const r = walk(ram, b.cr3, gva);
            if (hit) expect(ok(r).gpa).toBe(hit.gpa + (gva - hit.gva));
            else expect(fault(r).reason).toBe('not-present');
          }
        },
      ),
      { numRuns: 150 },
    );
  });
});
