/**
 * Guest OS profiles (docs/profiles.md): data files in the format the simulator's synthetic kernel ships
 * (`periscope-guest-os-profile/1`, `libs/simulator/profiles/linux-sim.json`), parsed and used through the
 * simulator's `parseGuestOsProfile` / `deriveSlide` so that there is one reading of the format.
 *
 * Analysis adds what a protection module needs from a profile: the physical page ranges of the sections
 * to write-protect once the slide is known, the `text_poke` RIP range, and the boot-done condition.
 */
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { deriveSlide, linuxSimProfile, parseGuestOsProfile, type DerivedKernel, type GuestOsProfile, type GuestReader } from '@periscope/simulator';
import { AnalysisError } from './errors.js';

export type { DerivedKernel, GuestOsProfile, GuestReader };

export const PAGE = 0x1000n;

/** Profiles by name; `linux-sim` is always present. */
export class ProfileRegistry {
  private readonly byName = new Map<string, GuestOsProfile>();

  constructor() {
    const sim = linuxSimProfile();
    this.byName.set(sim.name, sim);
  }

  get(name: string): GuestOsProfile | undefined {
    return this.byName.get(name);
  }

  names(): string[] {
    return [...this.byName.keys()].sort();
  }

  /** Add a profile from its JSON text (`source` names it in errors). */
  addText(text: string, source: string): GuestOsProfile {
    let p: GuestOsProfile;
    try {
      p = parseGuestOsProfile(JSON.parse(text));
    } catch (e) {
      throw new AnalysisError('bad-profile', `${source}: ${(e as Error).message}`, { cause: e });
    }
    this.byName.set(p.name, p);
    return p;
  }

  /** Every `*.json` in a directory. */
  addDir(dir: string): GuestOsProfile[] {
    return readdirSync(dir)
      .filter((f) => f.endsWith('.json'))
      .sort()
      .map((f) => this.addText(readFileSync(join(dir, f), 'utf8'), join(dir, f)));
  }
}

/** What analysis keeps about a VM's kernel after deriving the slide (one boot = one QEMU start time). */
export interface KernelFacts {
  readonly profile: string;
  readonly qemuStartTimeMs: bigint;
  readonly slide: bigint;
  readonly textBase: bigint;
  readonly textPhys: bigint;
}

export async function deriveKernel(io: GuestReader, profile: GuestOsProfile): Promise<DerivedKernel> {
  try {
    return await deriveSlide(io, profile);
  } catch (e) {
    if (e instanceof AnalysisError) throw e;
    throw new AnalysisError('slide-not-derived', (e as Error).message, { cause: e });
  }
}

export interface GpaRange {
  readonly start: bigint;
  readonly end: bigint;
}

const alignDown = (v: bigint): bigint => v & ~(PAGE - 1n);
const alignUp = (v: bigint): bigint => (v + PAGE - 1n) & ~(PAGE - 1n);

/** Physical page-aligned range of a profile section (by name, e.g. `.text`). */
export function sectionGpaRange(profile: GuestOsProfile, facts: KernelFacts, section: string): GpaRange {
  const s = profile.sections.find((x) => x.name === section);
  if (!s) throw new AnalysisError('bad-profile', `profile ${profile.name} has no section ${section} (has: ${profile.sections.map((x) => x.name).join(', ')})`);
  return { start: alignDown(facts.textPhys + s.offset), end: alignUp(facts.textPhys + s.offset + s.size) };
}

/** Physical page range holding a symbol (a protected data object). */
export function symbolPageRange(profile: GuestOsProfile, facts: KernelFacts, symbol: string): GpaRange {
  const s = profile.symbols.get(symbol);
  if (!s) throw new AnalysisError('bad-profile', `profile ${profile.name} has no symbol ${symbol}`);
  const start = facts.textPhys + s.offset;
  return { start: alignDown(start), end: alignUp(start + BigInt(Math.max(1, s.size))) };
}

/** Virtual RIP range of a kernel function: [symbol, symbol + size). */
export function symbolRipRange(profile: GuestOsProfile, facts: KernelFacts, symbol: string): GpaRange {
  const s = profile.symbols.get(symbol);
  if (!s) throw new AnalysisError('bad-profile', `profile ${profile.name} has no symbol ${symbol}`);
  const start = facts.textBase + s.offset;
  return { start, end: start + BigInt(Math.max(1, s.size)) };
}

/** Every 4 KiB frame of a list of ranges, ascending, without duplicates. */
export function pagesOf(ranges: readonly GpaRange[]): bigint[] {
  const set = new Set<bigint>();
  for (const r of ranges) for (let g = alignDown(r.start); g < r.end; g += PAGE) set.add(g);
  return [...set].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
}
