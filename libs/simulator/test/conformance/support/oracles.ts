/**
 * The independent byte oracles of `libs/kvmi/test/oracles/` (produced from the fact sheet by a C program
 * and by hand; never by the library). Read-only: we only look fixtures up by name.
 */
import { readFileSync } from 'node:fs';

import { REG_NAMES, type Arch, type EventMsrs, type Regs, type Segment, type Sregs } from './bytes.js';

export interface Fixture {
  name: string;
  direction: string;
  kind: string;
  message: string | null;
  id: number | null;
  seq: number | null;
  vcpu: number | null;
  fields: Record<string, unknown>;
  hex: string;
}

function load(file: string): Map<string, Fixture> {
  const url = new URL(`../../../../kvmi/test/oracles/${file}`, import.meta.url);
  const json = JSON.parse(readFileSync(url, 'utf8')) as { fixtures: Fixture[] };
  return new Map(json.fixtures.map((f) => [f.name, f]));
}

const goldenFrames = load('golden-frames.json');
const handFrames = load('hand-written-frames.json');

/** A fixture of golden-frames.json (made by fixtures.c). */
export function golden(name: string): Fixture {
  const f = goldenFrames.get(name);
  if (!f) throw new Error(`no golden fixture ${name}`);
  return f;
}

/** A fixture of hand-written-frames.json. */
export function handWritten(name: string): Fixture {
  const f = handFrames.get(name);
  if (!f) throw new Error(`no hand-written fixture ${name}`);
  return f;
}

/** Every golden fixture (for the helper self-checks). */
export function allGolden(): Fixture[] {
  return [...goldenFrames.values()];
}

/** A u64 field of a fixture ("0x…" string). */
export const big = (v: unknown): bigint => BigInt(v as string);

// ---- fixture fields → the builders' value types ------------------------------------------------

type J = Record<string, unknown>;
export const regsOf = (j: J): Regs => Object.fromEntries(REG_NAMES.map((n) => [n, big(j[n])])) as Regs;
const segOf = (j: J): Segment => ({
  base: big(j['base']), limit: j['limit'] as number, selector: j['selector'] as number, type: j['type'] as number,
  present: j['present'] as number, dpl: j['dpl'] as number, db: j['db'] as number, s: j['s'] as number, l: j['l'] as number,
  g: j['g'] as number, avl: j['avl'] as number, unusable: j['unusable'] as number,
});
export const sregsOf = (j: J): Sregs => {
  const seg = (k: string): Segment => segOf(j[k] as J);
  const dt = (k: string): { base: bigint; limit: number } => ({ base: big((j[k] as J)['base']), limit: (j[k] as J)['limit'] as number });
  return {
    cs: seg('cs'), ds: seg('ds'), es: seg('es'), fs: seg('fs'), gs: seg('gs'), ss: seg('ss'), tr: seg('tr'), ldt: seg('ldt'),
    gdt: dt('gdt'), idt: dt('idt'), cr0: big(j['cr0']), cr2: big(j['cr2']), cr3: big(j['cr3']), cr4: big(j['cr4']),
    cr8: big(j['cr8']), efer: big(j['efer']), apic_base: big(j['apic_base']),
    interrupt_bitmap: (j['interrupt_bitmap'] as string[]).map(big),
  };
};
export const archOfFixture = (j: J): Arch => ({
  mode: j['mode'] as number,
  regs: regsOf(j['regs'] as J),
  sregs: sregsOf(j['sregs'] as J),
  msrs: Object.fromEntries(Object.entries(j['msrs'] as J).map(([k, v]) => [k, big(v)])) as EventMsrs,
});

