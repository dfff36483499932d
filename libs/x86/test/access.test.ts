/**
 * Access rights and #PF error codes (SDM Vol. 3A §4.6, §4.7). Expected error codes are written as
 * literal numbers (bit 0 P, bit 1 W/R, bit 2 U/S, bit 3 RSVD, bit 4 I/D), not built from the
 * library's constants.
 */
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  CR0_PE,
  CR0_PG,
  CR0_WP,
  CR4_LA57,
  CR4_PAE,
  CR4_SMAP,
  CR4_SMEP,
  EFER_LMA,
  EFER_LME,
  EFER_NXE,
  GuestRam,
  PageTableBuilder,
  RFLAGS_AC,
  RFLAGS_FIXED,
  X86Error,
  checkAccess,
  pagingMode,
  translateAccess,
  translateAccessRange,
  walk,
  type AccessKind,
  type AccessResult,
  type PageSize,
  type PagingLevel,
} from '../src/index.js';
import { scratchRam } from './support/ram.js';

const K4 = 0x1000n;
const M2 = 0x20_0000n;
const G1 = 0x4000_0000n;
const SIZES: Array<[string, PageSize, PagingLevel[]]> = [
  ['4K', K4, [4, 3, 2, 1]],
  ['2M', M2, [4, 3, 2]],
  ['1G', G1, [4, 3]],
];
const GVA = 0x7f12_3456_7000n; // distinct indexes at every level
const GPA = 0x8000_0000n;

let ram: GuestRam;
let cleanup: () => void;
let b: PageTableBuilder;
beforeAll(() => {
  ({ ram, cleanup } = scratchRam(0x400n, [{ start: 0x300n, end: 0x301n }]));
});
afterAll(() => cleanup());

/** Map GVA with P RW US at every level (the most permissive page), then edit single levels. */
function page(size: PageSize): void {
  b = new PageTableBuilder(ram, { pool: { start: 0x10_0000n, end: 0x20_0000n } });
  b.map(GVA & ~(size - 1n), GPA, size, { rw: true, us: true });
}
function set(level: PagingLevel, bits: bigint): void {
  const e = b.entryGpa(GVA, level)!;
  ram.writeU64(e, ram.readU64(e) | bits);
}
function clear(level: PagingLevel, bits: bigint): void {
  const e = b.entryGpa(GVA, level)!;
  ram.writeU64(e, ram.readU64(e) & ~bits);
}
const P = 1n;
const RW = 2n;
const US = 4n;
const XD = 1n << 63n;
const RSVD46 = 1n << 46n; // reserved with MAXPHYADDR 46 (the default)

interface Cpu {
  cpl?: number;
  wp?: boolean;
  smep?: boolean;
  smap?: boolean;
  nxe?: boolean;
  ac?: boolean;
  implicit?: boolean;
  gva?: bigint;
}
function run(access: AccessKind, cpu: Cpu = {}): AccessResult {
  const efer = EFER_LME | EFER_LMA | (cpu.nxe === false ? 0n : EFER_NXE);
  const cr0 = CR0_PE | CR0_PG | (cpu.wp === false ? 0n : CR0_WP);
  const cr4 = CR4_PAE | (cpu.smep ? CR4_SMEP : 0n) | (cpu.smap ? CR4_SMAP : 0n);
  return checkAccess({
    walk: walk(ram, b.cr3, cpu.gva ?? GVA + 0x18n, { efer }),
    access,
    cpl: cpu.cpl ?? 0,
    cr0,
    cr4,
    efer,
    rflagsAC: cpu.ac === true,
    implicitSupervisor: cpu.implicit === true,
  });
}
/** 'ok', or the #PF error code, or 'GP'. */
function outcome(r: AccessResult): 'ok' | 'GP' | number {
  if (r.ok) return 'ok';
  return r.exception === 'GP' ? 'GP' : r.errorCode;
}
const o = (access: AccessKind, cpu: Cpu = {}): 'ok' | 'GP' | number => outcome(run(access, cpu));

describe('the most permissive page is accessible to everyone', () => {
  for (const [label, size] of SIZES) {
    it(label, () => {
      page(size);
      for (const cpl of [0, 1, 2, 3]) for (const a of ['read', 'write', 'execute'] as const) expect(o(a, { cpl })).toBe('ok');
      const r = run('write');
      expect(r).toMatchObject({ ok: true, gpa: GPA + ((GVA + 0x18n) & (size - 1n)), pageSize: size });
    });
  }
});

for (const [label, size, levels] of SIZES) {
  describe(`${label} pages`, () => {
    for (const level of levels) {
      describe(`level ${level}`, () => {
        it('not present: P = 0, W/R, U/S and I/D as the access was', () => {
          page(size);
          clear(level, P);
          expect(o('read')).toBe(0x00);
          expect(o('write')).toBe(0x02);
          expect(o('read', { cpl: 3 })).toBe(0x04);
          expect(o('write', { cpl: 3 })).toBe(0x06);
          expect(o('execute')).toBe(0x10);
          expect(o('execute', { cpl: 3 })).toBe(0x14);
          expect(o('execute', { nxe: false })).toBe(0x00); // I/D only with NXE or SMEP
          expect(o('execute', { nxe: false, smep: true })).toBe(0x10);
          expect(o('execute', { cpl: 3, nxe: false })).toBe(0x04);
          expect(o('read', { cpl: 3, implicit: true })).toBe(0x00); // implicit: supervisor access
          expect(run('read')).toMatchObject({ ok: false, exception: 'PF', vector: 14, reason: 'not-present', level, gva: GVA + 0x18n });
        });

        it('reserved bit (51:MAXPHYADDR): RSVD with P', () => {
          page(size);
          set(level, RSVD46);
          expect(o('read')).toBe(0x09);
          expect(o('write')).toBe(0x0b);
          expect(o('write', { cpl: 3 })).toBe(0x0f);
          expect(o('execute')).toBe(0x19);
          expect(o('execute', { nxe: false })).toBe(0x09);
          expect(run('read')).toMatchObject({ reason: 'reserved', level });
        });

        it('XD with EFER.NXE = 0 is a reserved bit', () => {
          page(size);
          set(level, XD);
          expect(o('read', { nxe: false })).toBe(0x09);
          expect(o('write', { nxe: false })).toBe(0x0b);
          expect(o('read', { nxe: false, cpl: 3 })).toBe(0x0d);
          expect(o('execute', { nxe: false })).toBe(0x09);
          expect(o('execute', { nxe: false, smep: true })).toBe(0x19);
          expect(o('execute', { nxe: false, cpl: 3 })).toBe(0x0d);
        });

        it('XD with EFER.NXE = 1 blocks fetches only', () => {
          page(size);
          set(level, XD);
          expect(o('read')).toBe('ok');
          expect(o('write')).toBe('ok');
          expect(o('read', { cpl: 3 })).toBe('ok');
          expect(o('execute')).toBe(0x11);
          expect(o('execute', { cpl: 3 })).toBe(0x15);
          expect(run('execute')).toMatchObject({ reason: 'nx' });
          clear(level, XD);
          expect(o('execute')).toBe('ok');
          expect(o('execute', { cpl: 3 })).toBe('ok');
        });

        it('R/W = 0: supervisor writes fault only with CR0.WP = 1; user writes always fault', () => {
          page(size);
          clear(level, RW);
          expect(o('write', { wp: true })).toBe(0x03);
          expect(run('write')).toMatchObject({ reason: 'write-protect' });
          expect(o('write', { wp: false })).toBe('ok');
          expect(o('write', { cpl: 1, wp: true })).toBe(0x03);
          expect(o('write', { cpl: 2, wp: false })).toBe('ok');
          expect(o('write', { cpl: 3, wp: true })).toBe(0x07);
          expect(o('write', { cpl: 3, wp: false })).toBe(0x07);
          expect(o('read', { cpl: 3 })).toBe('ok');
          expect(o('read')).toBe('ok');
          expect(o('execute', { cpl: 3 })).toBe('ok');
          // an implicit supervisor write at CPL 3 follows the supervisor rule
          expect(o('write', { cpl: 3, implicit: true, wp: false })).toBe('ok');
          expect(o('write', { cpl: 3, implicit: true, wp: true })).toBe(0x03);
        });

        it('U/S = 0 makes it a supervisor page: user accesses fault, SMEP/SMAP do not apply', () => {
          page(size);
          clear(level, US);
          expect(o('read', { cpl: 3 })).toBe(0x05);
          expect(o('write', { cpl: 3 })).toBe(0x07);
          expect(o('execute', { cpl: 3 })).toBe(0x15);
          expect(o('execute', { cpl: 3, nxe: false })).toBe(0x05);
          expect(run('read', { cpl: 3 })).toMatchObject({ reason: 'user-supervisor' });
          expect(o('read', { smap: true })).toBe('ok');
          expect(o('write', { smap: true })).toBe('ok');
          expect(o('execute', { smep: true })).toBe('ok');
          expect(o('read', { cpl: 3, implicit: true, smap: true })).toBe('ok');
        });

        it('SMEP: supervisor fetch from a user page faults (also with NXE = 0); user fetch unaffected', () => {
          page(size);
          expect(o('execute', { smep: true })).toBe(0x11);
          expect(run('execute', { smep: true })).toMatchObject({ reason: 'smep' });
          expect(o('execute', { smep: true, nxe: false })).toBe(0x11);
          expect(o('execute', { smep: true, cpl: 2 })).toBe(0x11);
          expect(o('execute', { smep: false })).toBe('ok');
          expect(o('execute', { smep: true, cpl: 3 })).toBe('ok');
          expect(o('read', { smep: true })).toBe('ok');
          // with U/S = 0 at this level the page is a supervisor page again
          clear(level, US);
          expect(o('execute', { smep: true })).toBe('ok');
        });

        it('SMAP: supervisor data access to a user page faults unless RFLAGS.AC = 1 (explicit only)', () => {
          page(size);
          expect(o('read', { smap: true })).toBe(0x01);
          expect(o('write', { smap: true })).toBe(0x03);
          expect(run('read', { smap: true })).toMatchObject({ reason: 'smap' });
          expect(o('read', { smap: true, ac: true })).toBe('ok');
          expect(o('write', { smap: true, ac: true })).toBe('ok');
          expect(o('read', { smap: true, ac: true, implicit: true })).toBe(0x01);
          expect(o('write', { smap: true, ac: true, implicit: true })).toBe(0x03);
          expect(o('read', { smap: true, ac: true, implicit: true, cpl: 3 })).toBe(0x01);
          expect(o('read', { smap: true, cpl: 1 })).toBe(0x01);
          expect(o('read', { smap: false })).toBe('ok');
          expect(o('write', { smap: false })).toBe('ok');
          expect(o('read', { smap: true, cpl: 3 })).toBe('ok'); // user accesses are not SMAP-checked
          expect(o('execute', { smap: true })).toBe('ok'); // fetches are SMEP's business
          // AC lifts SMAP but not write protection
          clear(level, RW);
          expect(o('write', { smap: true, ac: true, wp: true })).toBe(0x03);
          expect(run('write', { smap: true, ac: true, wp: true })).toMatchObject({ reason: 'write-protect' });
          expect(o('write', { smap: true, ac: true, wp: false })).toBe('ok');
          expect(o('write', { smap: true, ac: false, wp: false })).toBe(0x03);
        });
      });
    }

    it('non-canonical: #GP(0), not #PF, for every access and CPL', () => {
      page(size);
      for (const gva of [0x0000_8000_0000_0000n, 0xffff_7fff_ffff_fff0n, 0x1234_5678_9abc_def0n]) {
        for (const a of ['read', 'write', 'execute'] as const) {
          for (const cpl of [0, 3]) {
            const r = run(a, { gva, cpl });
            expect(r).toEqual({ ok: false, exception: 'GP', vector: 13, errorCode: 0, reason: 'non-canonical', gva });
          }
        }
      }
    });
  });
}

describe('checkAccess argument rules', () => {
  function code(fn: () => unknown): string {
    try {
      fn();
    } catch (e) {
      if (e instanceof X86Error) return e.code;
      throw e;
    }
    return 'no error';
  }
  const mode = { cr0: CR0_PE | CR0_PG | CR0_WP, cr4: CR4_PAE, efer: EFER_LME | EFER_LMA | EFER_NXE };

  it('refuses a walk made with another EFER.NXE, bad CPLs, implicit fetches and non-4-level modes', () => {
    page(K4);
    const w = walk(ram, b.cr3, GVA, { efer: EFER_LME });
    expect(code(() => checkAccess({ walk: w, access: 'read', cpl: 0, ...mode }))).toBe('invalid-argument');
    const w2 = walk(ram, b.cr3, GVA, { efer: mode.efer });
    expect(code(() => checkAccess({ walk: w2, access: 'read', cpl: 4, ...mode }))).toBe('invalid-argument');
    expect(code(() => checkAccess({ walk: w2, access: 'read', cpl: -1, ...mode }))).toBe('invalid-argument');
    expect(code(() => checkAccess({ walk: w2, access: 'fetch' as AccessKind, cpl: 0, ...mode }))).toBe('invalid-argument');
    expect(code(() => checkAccess({ walk: w2, access: 'execute', cpl: 0, implicitSupervisor: true, ...mode }))).toBe(
      'invalid-argument',
    );
    expect(code(() => checkAccess({ walk: w2, access: 'read', cpl: 0, ...mode, cr0: CR0_PE }))).toBe('unsupported-mode');
    expect(code(() => checkAccess({ walk: w2, access: 'read', cpl: 0, ...mode, cr4: 0n }))).toBe('unsupported-mode');
    expect(code(() => checkAccess({ walk: w2, access: 'read', cpl: 0, ...mode, efer: EFER_NXE }))).toBe('unsupported-mode');
    expect(code(() => checkAccess({ walk: w2, access: 'read', cpl: 0, ...mode, cr4: CR4_PAE | CR4_LA57 }))).toBe(
      'unsupported-mode',
    );
    expect(pagingMode(0n, 0n, 0n)).toBe('none');
    expect(pagingMode(CR0_PG, 0n, 0n)).toBe('32-bit');
    expect(pagingMode(CR0_PG, CR4_PAE, 0n)).toBe('pae');
    expect(pagingMode(CR0_PG, CR4_PAE, EFER_LME)).toBe('4-level');
    expect(pagingMode(CR0_PG, CR4_PAE | CR4_LA57, EFER_LME)).toBe('5-level');
  });

  it('a paging structure in unbacked memory faults like a non-present entry', () => {
    page(K4);
    const e = b.entryGpa(GVA, 2)!;
    const old = ram.readU64(e);
    ram.writeU64(e, 0x30_0007n); // PD entry → page table in the hole (gfn 0x300)
    expect(o('write')).toBe(0x02);
    expect(run('read')).toMatchObject({ reason: 'unbacked', level: 1 });
    ram.writeU64(e, old);
  });
});

describe('translateAccess / translateAccessRange (CPU state in registers)', () => {
  const cpu = {
    cr0: CR0_PE | CR0_PG | CR0_WP,
    cr4: CR4_PAE | CR4_SMEP | CR4_SMAP,
    efer: EFER_LME | EFER_LMA | EFER_NXE,
    rflags: RFLAGS_FIXED,
    cpl: 0,
  };
  it('reads AC from RFLAGS and walks with the vCPU EFER', () => {
    b = new PageTableBuilder(ram, { pool: { start: 0x10_0000n, end: 0x20_0000n } });
    b.map(0x40_0000n, 0x5000n, K4, { rw: true, us: true });
    b.map(0x40_1000n, 0x6000n, K4, { rw: true, us: false, nx: true });
    const c = { ...cpu, cr3: b.cr3 };
    expect(translateAccess(ram, c, 0x40_0010n, 'read')).toMatchObject({ ok: false, errorCode: 0x01, reason: 'smap' });
    expect(translateAccess(ram, { ...c, rflags: RFLAGS_FIXED | RFLAGS_AC }, 0x40_0010n, 'read')).toMatchObject({ ok: true, gpa: 0x5010n });
    expect(translateAccess(ram, { ...c, rflags: RFLAGS_AC }, 0x40_0010n, 'read', { implicitSupervisor: true })).toMatchObject({
      errorCode: 0x01,
    });
    expect(translateAccess(ram, c, 0x40_1000n, 'execute')).toMatchObject({ errorCode: 0x11, reason: 'nx' });
    expect(translateAccess(ram, { ...c, efer: EFER_LME | EFER_LMA }, 0x40_1000n, 'read')).toMatchObject({ errorCode: 0x09 });
  });

  it('splits an access at page boundaries and reports the first faulting page', () => {
    const c = { ...cpu, cr3: b.cr3, rflags: RFLAGS_AC };
    const r = translateAccessRange(ram, c, 0x40_0ffcn, 8, 'write');
    expect(r).toEqual({
      ok: true,
      pieces: [
        { gva: 0x40_0ffcn, gpa: 0x5ffcn, length: 4 },
        { gva: 0x40_1000n, gpa: 0x6000n, length: 4 },
      ],
    });
    // the second page is a supervisor page: a user write faults there, CR2 = start of that page
    expect(translateAccessRange(ram, { ...c, cpl: 3 }, 0x40_0ffcn, 8, 'write')).toMatchObject({ errorCode: 0x07, gva: 0x40_1000n });
    // the next page is not mapped at all
    expect(translateAccessRange(ram, c, 0x40_1ff8n, 16, 'read')).toMatchObject({ errorCode: 0x00, gva: 0x40_2000n });
    expect(() => translateAccessRange(ram, c, 0x40_0000n, 0, 'read')).toThrow(X86Error);
  });
});

// ---------------------------------------------------------------------------------------------
// An independent model, written from the SDM's prose rather than from src/access.ts, compared on
// random page-table shapes and CPU states.

interface LevelBits {
  p: boolean;
  rw: boolean;
  us: boolean;
  xd: boolean;
  rsvd: boolean;
}
interface Ctx {
  access: AccessKind;
  cpl: number;
  wp: boolean;
  smep: boolean;
  smap: boolean;
  nxe: boolean;
  ac: boolean;
  implicit: boolean;
}

function sdmModel(levels: LevelBits[], c: Ctx): 'ok' | number {
  const userMode = c.cpl === 3 && !c.implicit;
  const isWrite = c.access === 'write';
  const isFetch = c.access === 'execute';
  const idBit = isFetch && (c.smep || c.nxe) ? 16 : 0;
  const errorCode = (present: boolean, rsvd: boolean): number =>
    (present ? 1 : 0) + (isWrite ? 2 : 0) + (userMode ? 4 : 0) + (rsvd ? 8 : 0) + idBit;
  // §4.5.4: the walk stops at the first entry that is not present or has a reserved bit set
  for (const l of levels) {
    if (!l.p) return errorCode(false, false);
    if (l.rsvd || (l.xd && !c.nxe)) return errorCode(true, true);
  }
  // §4.6.1
  const userAddress = levels.every((l) => l.us);
  const readOnly = levels.some((l) => !l.rw);
  const executeDisabled = c.nxe && levels.some((l) => l.xd);
  const denied: string[] = [];
  if (userMode) {
    if (!userAddress) denied.push('supervisor address');
    if (isWrite && readOnly) denied.push('read-only');
    if (isFetch && executeDisabled) denied.push('XD');
  } else if (isFetch) {
    if (userAddress && c.smep) denied.push('SMEP');
    if (executeDisabled) denied.push('XD');
  } else {
    if (userAddress && c.smap && !(c.ac && !c.implicit)) denied.push('SMAP');
    if (isWrite && readOnly && c.wp) denied.push('WP');
  }
  return denied.length === 0 ? 'ok' : errorCode(true, false);
}

describe('random page shapes × CPU states agree with an independent SDM model', () => {
  const arbLevel = fc.record({
    p: fc.constantFrom(true, true, true, true, true, true, false),
    rw: fc.boolean(),
    us: fc.boolean(),
    xd: fc.constantFrom(false, false, true),
    rsvd: fc.constantFrom(false, false, false, false, false, true),
  });
  const arbCtx = fc
    .record({
      access: fc.constantFrom<AccessKind>('read', 'write', 'execute'),
      cpl: fc.integer({ min: 0, max: 3 }),
      wp: fc.boolean(),
      smep: fc.boolean(),
      smap: fc.boolean(),
      nxe: fc.boolean(),
      ac: fc.boolean(),
      implicit: fc.boolean(),
    })
    .map((c) => (c.access === 'execute' ? { ...c, implicit: false } : c));

  it('error codes and outcomes match', () => {
    fc.assert(
      fc.property(
        fc.constantFrom<[string, PageSize, PagingLevel[]]>(...SIZES),
        fc.array(arbLevel, { minLength: 4, maxLength: 4 }),
        arbCtx,
        ([, size, levels], bits, c) => {
          page(size);
          const used = bits.slice(0, levels.length);
          const addrs = levels.map((level) => b.entryGpa(GVA, level)!); // before any P is cleared
          levels.forEach((_, i) => {
            const l = used[i]!;
            const e = addrs[i]!;
            let v = ram.readU64(e) & ~(P | RW | US | XD | RSVD46);
            if (l.p) v |= P;
            if (l.rw) v |= RW;
            if (l.us) v |= US;
            if (l.xd) v |= XD;
            if (l.rsvd) v |= RSVD46;
            ram.writeU64(e, v);
          });
          // entries after a non-present one are never read, whatever they hold
          const got = o(c.access, c);
          expect(got).toBe(sdmModel(used, c));
        },
      ),
      { numRuns: 3000 },
    );
  });
});
