/**
 * The `heki` protection module's parameters in a policy document (issue #11):
 *
 * ```yaml
 * modules:
 *   heki:
 *     expect: { cr0: [WP], cr4: [SMEP, SMAP] }   # the pins every selected VM's guest must make (default)
 *     pin-within: 60s                            # after the VM's Heki registration (its start); 0 = no check
 *     denial: reenter                            # reenter (KVM injects #GP, default) | stop (stop the VM)
 *     severity: high                             # of violation alerts (missing pins: missing-severity)
 *     missing-severity: medium
 * ```
 *
 * Validation returns every problem with its path, like the other modules (policy.ts merges them).
 */
import type { Severity } from '@periscope/verdicts';

export type HekiDenialResponse = 'reenter' | 'stop';

export interface HekiModuleParams {
  /** CR0 bits every selected guest must pin (mask). */
  readonly expectCr0: bigint;
  /** CR4 bits every selected guest must pin (mask). */
  readonly expectCr4: bigint;
  /** Alert when the expected pins are not all in place this long after the VM registered; 0 = never. */
  readonly pinWithinMs: number;
  /** The completion pushed to the agent for a denial on these VMs. */
  readonly denial: HekiDenialResponse;
  readonly severity: Severity;
  readonly missingSeverity: Severity;
}

/** The bits a Heki guest can pin (KVM refuses others): CR0.WP; CR4 SMEP, SMAP, UMIP, FSGSBASE, CET. */
export const HEKI_CR0_BITS: Readonly<Record<string, bigint>> = { WP: 1n << 16n };
export const HEKI_CR4_BITS: Readonly<Record<string, bigint>> = { UMIP: 1n << 11n, FSGSBASE: 1n << 16n, SMEP: 1n << 20n, SMAP: 1n << 21n, CET: 1n << 23n };
const SEVERITIES: readonly Severity[] = ['info', 'low', 'medium', 'high', 'critical'];
const KEYS = ['enabled', 'expect', 'pin-within', 'denial', 'severity', 'missing-severity'];

/** `0x…` bits as names (`CR4.SMEP`), for the fleet view and alert texts. */
export function hekiBitNames(cr: 'CR0' | 'CR4', mask: bigint): string[] {
  const table = cr === 'CR0' ? HEKI_CR0_BITS : HEKI_CR4_BITS;
  const out: string[] = [];
  let rest = mask;
  for (const [n, b] of Object.entries(table)) {
    if (mask & b) {
      out.push(`${cr}.${n}`);
      rest &= ~b;
    }
  }
  for (let i = 0n; rest; i++, rest >>= 1n) if (rest & 1n) out.push(`${cr}.bit${i}`);
  return out;
}

function duration(v: unknown): number | undefined {
  if (typeof v === 'number' && Number.isFinite(v) && v >= 0) return Math.round(v * 1000); // seconds
  if (typeof v !== 'string') return undefined;
  const m = /^(\d+(?:\.\d+)?)(ms|s|m|h)$/.exec(v.trim());
  if (!m) return undefined;
  const n = Number(m[1]);
  return Math.round(n * { ms: 1, s: 1000, m: 60_000, h: 3_600_000 }[m[2] as 'ms' | 's' | 'm' | 'h']);
}

export function validateHekiModule(o: Record<string, unknown>, path: string): { params: HekiModuleParams; issues: { path: string; message: string }[] } {
  const issues: { path: string; message: string }[] = [];
  const fail = (p: string, message: string) => issues.push({ path: p, message });
  for (const k of Object.keys(o)) if (!KEYS.includes(k)) fail(`${path}.${k}`, `unknown key (allowed: ${KEYS.join(', ')})`);
  const bits = (v: unknown, p: string, table: Readonly<Record<string, bigint>>, def: readonly string[]): bigint => {
    const list = v === undefined || v === null ? def : Array.isArray(v) ? v : [v];
    let mask = 0n;
    list.forEach((b, i) => {
      const name = typeof b === 'string' ? b.toUpperCase() : '';
      const bit = table[name];
      if (bit === undefined) fail(Array.isArray(v) ? `${p}[${i}]` : p, `${JSON.stringify(b)} is not a bit Heki can pin here (known: ${Object.keys(table).join(', ')})`);
      else mask |= bit;
    });
    return mask;
  };
  let expectCr0 = HEKI_CR0_BITS['WP']!;
  let expectCr4 = HEKI_CR4_BITS['SMEP']! | HEKI_CR4_BITS['SMAP']!;
  const ex = o['expect'];
  if (ex !== undefined && ex !== null) {
    if (typeof ex !== 'object' || Array.isArray(ex)) fail(`${path}.expect`, 'must be a mapping {cr0: [...], cr4: [...]}');
    else {
      const e = ex as Record<string, unknown>;
      for (const k of Object.keys(e)) if (k !== 'cr0' && k !== 'cr4') fail(`${path}.expect.${k}`, 'unknown key (allowed: cr0, cr4)');
      expectCr0 = bits(e['cr0'], `${path}.expect.cr0`, HEKI_CR0_BITS, []);
      expectCr4 = bits(e['cr4'], `${path}.expect.cr4`, HEKI_CR4_BITS, []);
    }
  }
  let pinWithinMs = 60_000;
  if (o['pin-within'] !== undefined) {
    const d = duration(o['pin-within']);
    if (d === undefined || d > 86_400_000) fail(`${path}.pin-within`, 'must be a duration like 500ms, 30s, 5m (at most 24h), or 0 for no check');
    else pinWithinMs = d;
  }
  const oneOf = <T extends string>(k: string, values: readonly T[], def: T): T => {
    const v = o[k];
    if (v === undefined || v === null) return def;
    if (typeof v !== 'string' || !(values as readonly string[]).includes(v)) {
      fail(`${path}.${k}`, `must be one of ${values.join(', ')} (got ${JSON.stringify(v)})`);
      return def;
    }
    return v as T;
  };
  const params: HekiModuleParams = {
    expectCr0,
    expectCr4,
    pinWithinMs,
    denial: oneOf('denial', ['reenter', 'stop'] as const, 'reenter'),
    severity: oneOf('severity', SEVERITIES, 'high'),
    missingSeverity: oneOf('missing-severity', SEVERITIES, 'medium'),
  };
  return { params, issues };
}

/** The stored (JSON) form back to params: masks are `0x…` strings there. */
export function hekiParamsFromJson(j: Record<string, unknown>): HekiModuleParams {
  return { ...(j as unknown as HekiModuleParams), expectCr0: BigInt(j['expectCr0'] as string), expectCr4: BigInt(j['expectCr4'] as string) };
}
