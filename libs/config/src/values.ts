import { isAbsolute, join } from 'node:path';
import { addressProblem } from './address.js';
import type { OptionSpec } from './schema.js';
import { closest } from './suggest.js';

/** Outcome of converting one raw value. */
export type Converted = { readonly ok: true; readonly value: unknown } | { readonly ok: false; readonly problem: string };

const ok = (value: unknown): Converted => ({ ok: true, value });
const bad = (problem: string): Converted => ({ ok: false, problem });
const q = (v: unknown): string => JSON.stringify(v) ?? String(v);

const UNIT_MS = { ms: 1, s: 1_000, m: 60_000, h: 3_600_000 } as const;

/**
 * Parses a duration into whole milliseconds: a bare integer (ms) or one or more `<number><unit>`
 * groups with units ms, s, m, h (`250ms`, `1.5s`, `1m30s`). Returns undefined when malformed or not a
 * whole number of milliseconds.
 */
export function parseDuration(text: string): number | undefined {
  const t = text.trim();
  if (/^\d+$/.test(t)) return Number(t);
  if (t === '') return undefined;
  const group = /(\d+(?:\.\d+)?)(ms|h|m|s)/y;
  let total = 0;
  let pos = 0;
  while (pos < t.length) {
    group.lastIndex = pos;
    const m = group.exec(t);
    if (m === null) return undefined;
    total += Number(m[1]) * UNIT_MS[m[2] as keyof typeof UNIT_MS];
    pos = group.lastIndex;
  }
  const rounded = Math.round(total);
  if (Math.abs(total - rounded) > 1e-6 || !Number.isSafeInteger(rounded)) return undefined;
  return rounded;
}

/** Compact rendering of milliseconds for help text and messages: `1500ms`, `5s`, `2m`, `1h`. */
export function formatDuration(ms: number): string {
  if (ms !== 0 && ms % UNIT_MS.h === 0) return `${ms / UNIT_MS.h}h`;
  if (ms !== 0 && ms % UNIT_MS.m === 0) return `${ms / UNIT_MS.m}m`;
  if (ms !== 0 && ms % UNIT_MS.s === 0) return `${ms / UNIT_MS.s}s`;
  return `${ms}ms`;
}

function durationBound(b: number | string | undefined): number | undefined {
  return typeof b === 'string' ? parseDuration(b) : b;
}

function rangeProblem(shown: string, value: number, min: number | undefined, max: number | undefined, fmt: (n: number) => string): string | undefined {
  if (min !== undefined && value < min) return `${shown} is below the minimum ${fmt(min)}`;
  if (max !== undefined && value > max) return `${shown} is above the maximum ${fmt(max)}`;
  return undefined;
}

function stringItem(kind: 'string' | 'path' | 'address', text: string): Converted {
  if (kind === 'string') return ok(text);
  if (kind === 'path') {
    if (text === '') return bad('an empty string is not a path');
    if (text.includes('\0')) return bad(`${q(text)} contains a NUL byte`);
    return ok(text);
  }
  const problem = addressProblem(text);
  return problem === undefined ? ok(text) : bad(problem);
}

function fromScalarText(spec: Exclude<OptionSpec, { kind: 'list' }>, text: string): Converted {
  switch (spec.kind) {
    case 'string':
    case 'path':
    case 'address':
      return stringItem(spec.kind, text);
    case 'integer': {
      if (!/^[+-]?\d+$/.test(text.trim())) return bad(`${q(text)} is not an integer`);
      const n = Number(text.trim());
      if (!Number.isSafeInteger(n)) return bad(`${q(text)} is out of the safe integer range`);
      const p = rangeProblem(String(n), n, spec.min, spec.max, String);
      return p === undefined ? ok(n) : bad(p);
    }
    case 'duration': {
      const ms = parseDuration(text);
      if (ms === undefined) {
        return bad(`${q(text)} is not a duration (use e.g. 250ms, 5s, 2m, 1h, 1m30s, or a whole number of milliseconds)`);
      }
      const p = rangeProblem(`${q(text)} (${ms}ms)`, ms, durationBound(spec.min), durationBound(spec.max), formatDuration);
      return p === undefined ? ok(ms) : bad(p);
    }
    case 'boolean': {
      const t = text.trim().toLowerCase();
      if (t === 'true' || t === '1') return ok(true);
      if (t === 'false' || t === '0') return ok(false);
      return bad(`${q(text)} is not a boolean (use true, false, 1 or 0)`);
    }
    case 'enum': {
      if (spec.values.includes(text)) return ok(text);
      const guess = closest(text, spec.values);
      return bad(
        `${q(text)} is not one of ${spec.values.join(', ')}` + (guess === undefined ? '' : `; did you mean ${q(guess)}?`),
      );
    }
  }
}

function listFromItems(spec: Extract<OptionSpec, { kind: 'list' }>, items: readonly string[]): Converted {
  const out: string[] = [];
  for (const [i, item] of items.entries()) {
    const c = stringItem(spec.items ?? 'string', item);
    if (!c.ok) return items.length === 1 ? c : bad(`item ${i + 1}: ${c.problem}`);
    out.push(item);
  }
  return ok(out);
}

/** Converts a command-line value (repeated occurrences of a list flag arrive as an array). */
export function fromFlag(spec: OptionSpec, raw: string | readonly string[]): Converted {
  if (spec.kind === 'list') return listFromItems(spec, typeof raw === 'string' ? [raw] : raw);
  return fromScalarText(spec, typeof raw === 'string' ? raw : (raw[0] ?? ''));
}

/** Converts an environment value; lists are comma-separated (blank items dropped). */
export function fromEnv(spec: OptionSpec, raw: string): Converted {
  if (spec.kind === 'list') {
    return listFromItems(
      spec,
      raw.split(',').map((s) => s.trim()).filter((s) => s !== ''),
    );
  }
  return fromScalarText(spec, raw);
}

function jsonType(v: unknown): string {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'an array';
  return `a ${typeof v}`;
}

/**
 * Converts a config-file (JSON) value. Relative `path` values (and `path` list items) are joined to
 * `fileDir`, the config file's directory, when given.
 */
export function fromJson(spec: OptionSpec, value: unknown, fileDir: string | undefined): Converted {
  const relocate = (p: string): string => (fileDir === undefined || isAbsolute(p) ? p : join(fileDir, p));
  switch (spec.kind) {
    case 'string':
    case 'address':
    case 'enum':
      return typeof value === 'string'
        ? fromScalarText(spec, value)
        : bad(`expected a JSON string, got ${jsonType(value)} ${q(value)}`);
    case 'path': {
      if (typeof value !== 'string') return bad(`expected a JSON string, got ${jsonType(value)} ${q(value)}`);
      const c = fromScalarText(spec, value);
      return c.ok ? ok(relocate(value)) : c;
    }
    case 'integer':
      if (typeof value !== 'number') return bad(`expected a JSON number, got ${jsonType(value)} ${q(value)}`);
      return fromScalarText(spec, String(value));
    case 'duration':
      if (typeof value === 'number') {
        if (!Number.isSafeInteger(value) || value < 0) return bad(`${q(value)} is not a whole number of milliseconds`);
        return fromScalarText(spec, String(value));
      }
      if (typeof value === 'string') return fromScalarText(spec, value);
      return bad(`expected a duration string (e.g. "5s") or a number of milliseconds, got ${jsonType(value)} ${q(value)}`);
    case 'boolean':
      return typeof value === 'boolean' ? ok(value) : bad(`expected true or false, got ${jsonType(value)} ${q(value)}`);
    case 'list': {
      if (!Array.isArray(value) || !value.every((v): v is string => typeof v === 'string')) {
        return bad(`expected a JSON array of strings, got ${q(value)}`);
      }
      const c = listFromItems(spec, value);
      return c.ok && spec.items === 'path' ? ok(value.map(relocate)) : c;
    }
  }
}

/** Runs the option's custom validator; returns its problem description, if any. */
export function validatorProblem(spec: OptionSpec, value: unknown): string | undefined {
  const validate = spec.validate as ((v: unknown) => string | undefined | void) | undefined;
  if (validate === undefined) return undefined;
  try {
    const r = validate(value);
    return typeof r === 'string' && r !== '' ? r : undefined;
  } catch (err) {
    return err instanceof Error ? err.message : String(err);
  }
}

/** The default value in resolved form (durations in ms; booleans false and lists [] when undeclared). */
export function defaultValue(spec: OptionSpec): unknown {
  switch (spec.kind) {
    case 'boolean':
      return spec.default ?? false;
    case 'list':
      return spec.default === undefined ? [] : [...spec.default];
    case 'duration':
      return typeof spec.default === 'string' ? parseDuration(spec.default) : spec.default;
    default:
      return spec.default;
  }
}

/** Schema-time check of an option's bounds and default (programmer errors). */
export function defaultProblem(spec: OptionSpec): string | undefined {
  if (spec.kind === 'integer') {
    for (const b of [spec.min, spec.max]) {
      if (b !== undefined && !Number.isSafeInteger(b)) return `bound ${q(b)} is not an integer`;
    }
    if (spec.min !== undefined && spec.max !== undefined && spec.min > spec.max) return 'min is greater than max';
  }
  if (spec.kind === 'duration') {
    for (const b of [spec.min, spec.max]) {
      if (b !== undefined && durationBound(b) === undefined) return `bound ${q(b)} is not a duration`;
    }
    const min = durationBound(spec.min);
    const max = durationBound(spec.max);
    if (min !== undefined && max !== undefined && min > max) return 'min is greater than max';
  }
  if (spec.default === undefined) return undefined;
  const c = fromJson(spec, spec.default, undefined);
  if (!c.ok) return c.problem;
  return validatorProblem(spec, c.value);
}
