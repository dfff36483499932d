/**
 * Output of the operator commands: aligned tables (colours only on a terminal), key/value blocks, and
 * `--json` (one JSON document; 64-bit values as 0x-hex strings: bigints we produce are written as hex,
 * analysis' own JSON already carries guest values as 0x-hex).
 */
import { palette } from '../demo/render.js';

export interface OutIo {
  out: (line: string) => void;
  err: (line: string) => void;
  /** stdout is a terminal: colours, progress on stderr. */
  isTTY?: boolean;
}

export type Paint = (t: string) => string;
export type Palette = ReturnType<typeof palette>;

export { palette };

/** JSON text with bigints as 0x-hex strings. */
export function jsonText(v: unknown, indent = 2): string {
  return JSON.stringify(v, (_k, x: unknown) => (typeof x === 'bigint' ? `0x${x.toString(16)}` : x), indent);
}

// eslint-disable-next-line no-control-regex
const SGR = /\x1b\[[0-9;]*m/g;
const width = (s: string): number => s.replace(SGR, '').length;

/** An aligned table: header row, then rows; cells may carry colour (not counted in widths). */
export function table(headers: readonly string[], rows: readonly (readonly string[])[], p: Palette): string[] {
  const w = headers.map((h, i) => Math.max(width(h), ...rows.map((r) => width(r[i] ?? ''))));
  const line = (cells: readonly string[]): string =>
    cells
      .map((c, i) => (i === cells.length - 1 ? c : c + ' '.repeat(Math.max(0, w[i]! - width(c)))))
      .join('  ')
      .trimEnd();
  return [p.bold(line(headers)), ...rows.map(line)];
}

/** `key  value` lines, keys aligned. */
export function block(pairs: readonly (readonly [string, string])[], p: Palette, indent = ''): string[] {
  const w = Math.max(0, ...pairs.map(([k]) => k.length));
  return pairs.map(([k, v]) => `${indent}${p.bold(k.padEnd(w))}  ${v}`);
}

export function severityPaint(p: Palette, s: string): Paint {
  return s === 'critical' ? (t) => p.bold(p.red(t)) : s === 'high' ? p.red : s === 'medium' ? p.yellow : s === 'low' ? p.cyan : p.dim;
}

/** A nanosecond timestamp (decimal string) as ISO time; '' for 0/absent. */
export function nsTime(ns: unknown): string {
  if (typeof ns !== 'string' && typeof ns !== 'number') return '';
  try {
    const n = BigInt(ns);
    return n > 0n ? new Date(Number(n / 1_000_000n)).toISOString().replace(/\.\d+Z$/, 'Z') : '';
  } catch {
    return '';
  }
}

export function truncate(s: string, n: number): string {
  return s.length <= n ? s : `${s.slice(0, n - 1)}…`;
}

export function str(v: unknown): string {
  if (v === undefined || v === null) return '';
  if (typeof v === 'string') return v;
  if (typeof v === 'number' || typeof v === 'boolean' || typeof v === 'bigint') return String(v);
  return JSON.stringify(v);
}

export function labelsText(labels: unknown): string {
  if (typeof labels !== 'object' || labels === null) return '';
  return Object.entries(labels as Record<string, unknown>)
    .map(([k, v]) => `${k}=${str(v)}`)
    .join(',');
}
