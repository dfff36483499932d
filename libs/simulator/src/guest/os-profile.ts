/**
 * The guest OS profile of the synthetic kernel, as a tool would ship it (`profiles/linux-sim.json`):
 * section and symbol offsets from `_text`, the expected SHA-256 of every text page, the syscall entry's
 * signature. The JSON is derived from the kernel's layout (`buildLinuxSimProfile`); a test keeps the
 * shipped file equal to it.
 *
 * Tools find where the kernel is from the guest alone with `deriveSlide`: LSTAR (the syscall entry)
 * minus the entry's offset gives `_text`, and the entry's bytes, read through the guest's own
 * translation, confirm it. Nothing here reads the simulator's configuration.
 */
import { readFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';

import { SimError } from '../errors.js';
import {
  buildText,
  DEFAULT_TEXT,
  KASLR_ALIGN,
  KASLR_MAX_SLOTS,
  KERNEL_BASE,
  KERNEL_SYMBOLS,
  LINUX_BANNER,
  MODULES_SIZE,
  MODULES_VADDR,
  NR_SYSCALLS,
  SECTIONS,
  STATIC_KEY_VARIANTS,
  SYSCALLS,
  textPageHashes,
} from './kernel.js';

export const PROFILE_FORMAT = 'periscope-guest-os-profile/1';

const hex = (v: bigint | number): string => `0x${v.toString(16)}`;

/** The profile as JSON (numbers that may exceed 2^53 are hex strings). */
export interface GuestOsProfileJson {
  format: string;
  name: string;
  release: string;
  /** __START_KERNEL_map: the kernel image's physical address is its virtual address minus this. */
  kernelMap: string;
  /** `_text` when the slide is 0. */
  defaultTextBase: string;
  slideAlign: string;
  maxSlide: string;
  syscallEntry: { symbol: string; msr: string; signature: string };
  sections: Array<{ name: string; offset: string; size: string; perms: string }>;
  symbols: Record<string, { offset: string; size: number }>;
  textPageSha256: string[];
  syscallTable: { symbol: string; entries: number; numbers: Record<string, number> };
  textPoke: { symbol: string; sites: Array<{ symbol: string; variants: string[] }> };
  protectedData: string[];
  modules: { base: string; size: string };
  banner: { symbol: string; text: string };
  /**
   * When the kernel's boot counts as done, per vCPU (docs/profiles.md): a write to a system-call MSR whose old
   * value is `syscallMsrUnsetValue` is the kernel initialising it (boot not done on that vCPU); a descriptor-table
   * load from a RIP below `firmwareRipBelow` is firmware or a boot loader. Optional: absent = these defaults.
   */
  bootDone?: { syscallMsrUnsetValue: string; firmwareRipBelow: string };
}

/** Defaults of `bootDone` (x86-64 Linux: the MSRs reset to 0; firmware and real-mode loaders live below 1 MiB). */
export const DEFAULT_BOOT_DONE = { syscallMsrUnsetValue: 0n, firmwareRipBelow: 0x100000n } as const;

/** The profile, parsed. */
export interface GuestOsProfile {
  readonly name: string;
  readonly release: string;
  readonly kernelMap: bigint;
  readonly defaultTextBase: bigint;
  readonly slideAlign: bigint;
  readonly maxSlide: bigint;
  readonly syscallEntry: { readonly symbol: string; readonly msr: number; readonly signature: Uint8Array };
  readonly sections: ReadonlyArray<{ readonly name: string; readonly offset: bigint; readonly size: bigint; readonly perms: string }>;
  readonly symbols: ReadonlyMap<string, { readonly offset: bigint; readonly size: number }>;
  readonly textPageSha256: readonly string[];
  readonly syscallTable: { readonly symbol: string; readonly entries: number; readonly numbers: Readonly<Record<string, number>> };
  readonly textPoke: { readonly symbol: string; readonly sites: ReadonlyArray<{ readonly symbol: string; readonly variants: readonly Uint8Array[] }> };
  readonly protectedData: readonly string[];
  readonly modules: { readonly base: bigint; readonly size: bigint };
  readonly banner: { readonly symbol: string; readonly text: string };
  /** The boot-done condition (see GuestOsProfileJson.bootDone). */
  readonly bootDone: { readonly syscallMsrUnsetValue: bigint; readonly firmwareRipBelow: bigint };
  /** Offset of a symbol from `_text` (throws for an unknown one). */
  offsetOf(symbol: string): bigint;
}

/** The profile of the synthetic kernel, derived from its layout. */
export function buildLinuxSimProfile(): GuestOsProfileJson {
  const text = buildText();
  const entry = KERNEL_SYMBOLS.get('entry_SYSCALL_64')!;
  const symbols: Record<string, { offset: string; size: number }> = {};
  for (const [name, s] of [...KERNEL_SYMBOLS].sort((a, b) => a[1].offset - b[1].offset || a[0].localeCompare(b[0]))) {
    symbols[name] = { offset: hex(s.offset), size: s.size };
  }
  return {
    format: PROFILE_FORMAT,
    name: 'linux-sim',
    release: '6.6.0-periscope-sim',
    kernelMap: hex(KERNEL_BASE),
    defaultTextBase: hex(DEFAULT_TEXT),
    slideAlign: hex(KASLR_ALIGN),
    maxSlide: hex(KASLR_ALIGN * BigInt(KASLR_MAX_SLOTS - 1)),
    syscallEntry: {
      symbol: 'entry_SYSCALL_64',
      msr: hex(0xc0000082),
      signature: Buffer.from(text.subarray(entry.offset, entry.offset + entry.size)).toString('hex'),
    },
    sections: SECTIONS.map((s) => ({ name: s.name, offset: hex(s.offset), size: hex(s.size), perms: s.perms })),
    symbols,
    textPageSha256: textPageHashes(text),
    syscallTable: { symbol: 'sys_call_table', entries: NR_SYSCALLS, numbers: { ...SYSCALLS } },
    textPoke: {
      symbol: 'text_poke',
      sites: [{ symbol: 'static_key_site', variants: STATIC_KEY_VARIANTS.map((v) => Buffer.from(v).toString('hex')) }],
    },
    protectedData: ['sim_protected_data'],
    modules: { base: hex(MODULES_VADDR), size: hex(MODULES_SIZE) },
    banner: { symbol: 'linux_banner', text: LINUX_BANNER },
    bootDone: { syscallMsrUnsetValue: hex(DEFAULT_BOOT_DONE.syscallMsrUnsetValue), firmwareRipBelow: hex(DEFAULT_BOOT_DONE.firmwareRipBelow) },
  };
}

function big(v: unknown, what: string): bigint {
  if (typeof v === 'string' && /^(0x[0-9a-f]+|\d+)$/i.test(v)) return BigInt(v);
  if (typeof v === 'number' && Number.isSafeInteger(v) && v >= 0) return BigInt(v);
  throw new SimError('bad-guest-profile', `guest OS profile: ${what} is not a number: ${JSON.stringify(v)}`);
}

function bytes(v: unknown, what: string): Uint8Array {
  if (typeof v !== 'string' || !/^([0-9a-f]{2})*$/i.test(v)) throw new SimError('bad-guest-profile', `guest OS profile: ${what} is not hex bytes`);
  return new Uint8Array(Buffer.from(v, 'hex'));
}

/** Validate a parsed profile JSON. */
export function parseGuestOsProfile(json: unknown): GuestOsProfile {
  const j = json as Partial<GuestOsProfileJson> | null;
  if (typeof j !== 'object' || j === null || j.format !== PROFILE_FORMAT) {
    throw new SimError('bad-guest-profile', `guest OS profile: expected an object with format ${JSON.stringify(PROFILE_FORMAT)}`);
  }
  const need = <K extends keyof GuestOsProfileJson>(k: K): GuestOsProfileJson[K] => {
    const v = j[k];
    if (v === undefined || v === null) throw new SimError('bad-guest-profile', `guest OS profile: ${k} is missing`);
    return v as GuestOsProfileJson[K];
  };
  const symbols = new Map<string, { offset: bigint; size: number }>();
  for (const [name, s] of Object.entries(need('symbols'))) symbols.set(name, { offset: big(s.offset, `symbol ${name}`), size: s.size });
  const entry = need('syscallEntry');
  const tp = need('textPoke');
  const p: GuestOsProfile = {
    name: need('name'),
    release: need('release'),
    kernelMap: big(need('kernelMap'), 'kernelMap'),
    defaultTextBase: big(need('defaultTextBase'), 'defaultTextBase'),
    slideAlign: big(need('slideAlign'), 'slideAlign'),
    maxSlide: big(need('maxSlide'), 'maxSlide'),
    syscallEntry: { symbol: entry.symbol, msr: Number(big(entry.msr, 'syscallEntry.msr')), signature: bytes(entry.signature, 'syscallEntry.signature') },
    sections: need('sections').map((s) => ({ name: s.name, offset: big(s.offset, s.name), size: big(s.size, s.name), perms: s.perms })),
    symbols,
    textPageSha256: [...need('textPageSha256')],
    syscallTable: need('syscallTable'),
    textPoke: { symbol: tp.symbol, sites: tp.sites.map((s) => ({ symbol: s.symbol, variants: s.variants.map((v, i) => bytes(v, `${s.symbol} variant ${i}`)) })) },
    protectedData: [...need('protectedData')],
    modules: { base: big(need('modules').base, 'modules.base'), size: big(need('modules').size, 'modules.size') },
    banner: need('banner'),
    bootDone: j.bootDone === undefined
      ? DEFAULT_BOOT_DONE
      : { syscallMsrUnsetValue: big(j.bootDone.syscallMsrUnsetValue, 'bootDone.syscallMsrUnsetValue'), firmwareRipBelow: big(j.bootDone.firmwareRipBelow, 'bootDone.firmwareRipBelow') },
    offsetOf(symbol: string): bigint {
      const s = symbols.get(symbol);
      if (!s) throw new SimError('bad-guest-profile', `guest OS profile ${j.name}: no symbol ${JSON.stringify(symbol)}`);
      return s.offset;
    },
  };
  if (!symbols.has(entry.symbol)) throw new SimError('bad-guest-profile', `guest OS profile: the syscall entry ${entry.symbol} is not a symbol`);
  return p;
}

/** The shipped profile of the synthetic kernel. */
export const LINUX_SIM_PROFILE_PATH = new URL('../../profiles/linux-sim.json', import.meta.url);

let shipped: GuestOsProfile | null = null;

/** The shipped `profiles/linux-sim.json`, parsed (cached). */
export function linuxSimProfile(): GuestOsProfile {
  shipped ??= parseGuestOsProfile(JSON.parse(readFileSync(LINUX_SIM_PROFILE_PATH, 'utf8')));
  return shipped;
}

export async function loadGuestOsProfile(path: string | URL): Promise<GuestOsProfile> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    throw new SimError('bad-guest-profile', `guest OS profile ${String(path)}: ${(err as Error).message}`, { cause: err });
  }
  try {
    return parseGuestOsProfile(JSON.parse(text));
  } catch (err) {
    if (err instanceof SimError) throw err;
    throw new SimError('bad-guest-profile', `guest OS profile ${String(path)}: not JSON: ${(err as Error).message}`, { cause: err });
  }
}

// ---- deriving the slide from the guest ------------------------------------------------------------

/** What a tool can observe in the guest (each typically one KVMI command). */
export interface GuestReader {
  /** The guest's value of an MSR (VCPU_GET_REGISTERS with that MSR). */
  readMsr(index: number): Promise<bigint> | bigint;
  /** Guest-physical bytes (VM_READ_PHYSICAL). */
  readPhys(gpa: bigint, length: number): Promise<Uint8Array> | Uint8Array;
  /**
   * GVA → GPA through the guest's page tables (VCPU_TRANSLATE_GVA; all ones when unmapped). Without it
   * the profile's kernel map (`virt − kernelMap`) is assumed.
   */
  translate?(gva: bigint): Promise<bigint> | bigint;
}

export interface DerivedKernel {
  readonly slide: bigint;
  /** Virtual `_text`. */
  readonly textBase: bigint;
  /** Physical `_text` (from the guest's translation of the entry). */
  readonly textPhys: bigint;
  /** Virtual address of a symbol (+ offset). */
  symbol(name: string, offset?: bigint | number): bigint;
  /** Physical address of a kernel-image symbol (+ offset). */
  symbolPhys(name: string, offset?: bigint | number): bigint;
}

/**
 * Find the kernel's KASLR slide from guest-observable data only: LSTAR − the entry's offset − the
 * unslid `_text`, which must be aligned and in range, confirmed by reading the entry's signature at
 * the entry's guest-physical address. Throws `SimError('slide-not-derived')` when the guest does not
 * match the profile.
 */
export async function deriveSlide(io: GuestReader, profile: GuestOsProfile = linuxSimProfile()): Promise<DerivedKernel> {
  const fail = (why: string): never => {
    throw new SimError('slide-not-derived', `cannot derive the ${profile.name} slide: ${why}`);
  };
  const entryOff = profile.offsetOf(profile.syscallEntry.symbol);
  const lstar = BigInt.asUintN(64, await io.readMsr(profile.syscallEntry.msr));
  const textBase = BigInt.asUintN(64, lstar - entryOff);
  const slide = BigInt.asIntN(64, textBase - profile.defaultTextBase);
  if (slide < 0n || slide > profile.maxSlide) fail(`LSTAR 0x${lstar.toString(16)} is outside the kernel's range`);
  if (slide % profile.slideAlign !== 0n) fail(`LSTAR 0x${lstar.toString(16)} gives a misaligned slide 0x${slide.toString(16)}`);
  const entryGpa = io.translate ? BigInt.asUintN(64, await io.translate(lstar)) : lstar - profile.kernelMap;
  if (entryGpa === 0xffff_ffff_ffff_ffffn) fail(`LSTAR 0x${lstar.toString(16)} does not translate`);
  const sig = profile.syscallEntry.signature;
  const seen = await io.readPhys(entryGpa, sig.length);
  if (!Buffer.from(seen).equals(Buffer.from(sig))) fail(`the bytes at the syscall entry (gpa 0x${entryGpa.toString(16)}) do not match the profile's signature`);
  const textPhys = entryGpa - entryOff;
  return {
    slide,
    textBase,
    textPhys,
    symbol: (name, offset = 0n) => textBase + profile.offsetOf(name) + BigInt(offset),
    symbolPhys: (name, offset = 0n) => textPhys + profile.offsetOf(name) + BigInt(offset),
  };
}
