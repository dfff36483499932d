/**
 * C struct layouts as data.
 *
 * Every KVMI struct is declared exactly once (see `structs.ts`) with this small DSL. Offsets, sizes and
 * alignment are computed the way gcc does on x86-64 (natural alignment), and a declaration that would
 * need *implicit* compiler padding is rejected: every KVMI struct names its padding, so a gap means a
 * transcription mistake. Readers and writers are derived from the declaration; nothing else in the
 * code base knows an offset.
 *
 * Byte order is little-endian (x86-64 host-native, kvmi-v12.md §2.1).
 */

export type ScalarKind = 'u8' | 'u16' | 'u32' | 'u64' | 's32' | 's64';

export interface ScalarSpec<K extends ScalarKind = ScalarKind> {
  readonly kind: K;
}
/** A named reserved field. Written as zero; never part of a decoded value. */
export interface PaddingSpec {
  readonly kind: 'padding';
  readonly size: number;
  readonly align: number;
}
/** A fixed-size byte array (uuid, token, xsave area) decoded as a copy. */
export interface BytesSpec {
  readonly kind: 'bytes';
  readonly size: number;
  readonly align: number;
}
/** A fixed-size NUL-terminated char array, decoded as a string (bytes after the first NUL ignored). */
export interface CStringSpec {
  readonly kind: 'cstring';
  readonly size: number;
}
/** A fixed-size array of u64, decoded as bigint[]. */
export interface U64ArraySpec {
  readonly kind: 'u64[]';
  readonly count: number;
}
export interface StructSpec<V> {
  readonly kind: 'struct';
  readonly layout: Layout<V>;
}

export type FieldSpec =
  | ScalarSpec
  | PaddingSpec
  | BytesSpec
  | CStringSpec
  | U64ArraySpec
  | StructSpec<unknown>;

export type Shape = Readonly<Record<string, FieldSpec>>;

export type ValueOfField<F> = F extends ScalarSpec<'u8' | 'u16' | 'u32' | 's32'>
  ? number
  : F extends ScalarSpec<'u64' | 's64'>
    ? bigint
    : F extends BytesSpec
      ? Uint8Array
      : F extends CStringSpec
        ? string
        : F extends U64ArraySpec
          ? bigint[]
          : F extends StructSpec<infer V>
            ? V
            : never;

type NonPaddingKeys<S extends Shape> = {
  [K in keyof S]: S[K] extends PaddingSpec ? never : K;
}[keyof S];

/** The decoded value of a struct: every field except padding. */
export type ValueOfShape<S extends Shape> = { [K in NonPaddingKeys<S>]: ValueOfField<S[K]> };

/** One field of a compiled layout (metadata used by validation, docs and tests). */
export interface CompiledField {
  readonly name: string;
  readonly offset: number;
  readonly size: number;
  readonly align: number;
  readonly spec: FieldSpec;
  readonly isPadding: boolean;
}

/** A byte range inside a struct (used for padding checks and for filling padding on purpose). */
export interface ByteRange {
  readonly offset: number;
  readonly size: number;
  /** Dotted path of the field, e.g. `sregs.cs.padding`. */
  readonly path: string;
}

export interface Layout<V> {
  readonly name: string;
  readonly size: number;
  readonly align: number;
  readonly fields: readonly CompiledField[];
  /** Decode the struct at `offset`. `buf` must hold `size` bytes from there. */
  read(buf: Buffer, offset?: number): V;
  /** Encode into `buf` at `offset`; padding bytes are written as zero. */
  write(buf: Buffer, offset: number, value: V): void;
  /** Encode into a new zero-filled buffer of exactly `size` bytes. */
  encode(value: V): Buffer;
  /** A value with every field zero (bigint 0n, empty string, zeroed arrays). */
  zero(): V;
  /** Every padding range, recursively through nested structs, relative to the struct start. */
  readonly paddingRanges: readonly ByteRange[];
  /** True when every padding byte (recursively) at `offset` is zero. */
  paddingIsZero(buf: Buffer, offset?: number): boolean;
  field(name: string): CompiledField;
}

// ---- field constructors -----------------------------------------------------------------------

export const u8: ScalarSpec<'u8'> = { kind: 'u8' };
export const u16: ScalarSpec<'u16'> = { kind: 'u16' };
export const u32: ScalarSpec<'u32'> = { kind: 'u32' };
export const u64: ScalarSpec<'u64'> = { kind: 'u64' };
export const s32: ScalarSpec<'s32'> = { kind: 's32' };
export const s64: ScalarSpec<'s64'> = { kind: 's64' };

/** Padding of `count` elements of `elemSize` bytes (e.g. `pad(2)` = u16, `pad(1, 7)` = u8[7]). */
export function pad(elemSize: 1 | 2 | 4 | 8, count = 1): PaddingSpec {
  return { kind: 'padding', size: elemSize * count, align: elemSize };
}
export function bytes(size: number, align = 1): BytesSpec {
  return { kind: 'bytes', size, align };
}
export function cstring(size: number): CStringSpec {
  return { kind: 'cstring', size };
}
export function u64Array(count: number): U64ArraySpec {
  return { kind: 'u64[]', count };
}
export function nested<V>(layout: Layout<V>): StructSpec<V> {
  return { kind: 'struct', layout };
}

// ---- compilation ------------------------------------------------------------------------------

const SCALAR_SIZE: Record<ScalarKind, number> = { u8: 1, u16: 2, u32: 4, u64: 8, s32: 4, s64: 8 };

function sizeAndAlign(spec: FieldSpec): { size: number; align: number } {
  switch (spec.kind) {
    case 'padding':
    case 'bytes':
      return { size: spec.size, align: spec.align };
    case 'cstring':
      return { size: spec.size, align: 1 };
    case 'u64[]':
      return { size: 8 * spec.count, align: 8 };
    case 'struct':
      return { size: spec.layout.size, align: spec.layout.align };
    default: {
      const n = SCALAR_SIZE[spec.kind];
      return { size: n, align: n };
    }
  }
}

type Reader = (buf: Buffer, at: number) => unknown;
type Writer = (buf: Buffer, at: number, v: unknown) => void;

function readerFor(spec: FieldSpec): Reader {
  switch (spec.kind) {
    case 'u8':
      return (b, at) => b[at];
    case 'u16':
      return (b, at) => b.readUInt16LE(at);
    case 'u32':
      return (b, at) => b.readUInt32LE(at);
    case 's32':
      return (b, at) => b.readInt32LE(at);
    case 'u64':
      return (b, at) => b.readBigUInt64LE(at);
    case 's64':
      return (b, at) => b.readBigInt64LE(at);
    case 'bytes': {
      const n = spec.size;
      return (b, at) => copyBytes(b, at, n);
    }
    case 'cstring': {
      const n = spec.size;
      return (b, at) => {
        let end = at;
        const limit = at + n;
        while (end < limit && b[end] !== 0) end++;
        return b.toString('utf8', at, end);
      };
    }
    case 'u64[]': {
      const n = spec.count;
      return (b, at) => {
        const out = new Array<bigint>(n);
        for (let i = 0; i < n; i++) out[i] = b.readBigUInt64LE(at + 8 * i);
        return out;
      };
    }
    case 'struct': {
      const l = spec.layout;
      return (b, at) => l.read(b, at);
    }
    case 'padding':
      return () => undefined;
  }
}

function writerFor(spec: FieldSpec, path: string): Writer {
  const bad = (v: unknown, what: string): never => {
    throw new LayoutError(`${path}: ${what} (got ${typeof v === 'bigint' ? `${v}n` : String(v)})`);
  };
  const int = (min: number, max: number) => (v: unknown) => {
    if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max) {
      bad(v, `expected an integer in [${min}, ${max}]`);
    }
    return v as number;
  };
  switch (spec.kind) {
    case 'u8': {
      const c = int(0, 0xff);
      return (b, at, v) => {
        b[at] = c(v);
      };
    }
    case 'u16': {
      const c = int(0, 0xffff);
      return (b, at, v) => {
        b.writeUInt16LE(c(v), at);
      };
    }
    case 'u32': {
      const c = int(0, 0xffffffff);
      return (b, at, v) => {
        b.writeUInt32LE(c(v), at);
      };
    }
    case 's32': {
      const c = int(-0x80000000, 0x7fffffff);
      return (b, at, v) => {
        b.writeInt32LE(c(v), at);
      };
    }
    case 'u64':
      return (b, at, v) => {
        if (typeof v !== 'bigint' || v < 0n || v > 0xffffffffffffffffn) bad(v, 'expected a bigint in [0, 2^64)');
        b.writeBigUInt64LE(v as bigint, at);
      };
    case 's64':
      return (b, at, v) => {
        if (typeof v !== 'bigint' || v < -(1n << 63n) || v >= 1n << 63n) bad(v, 'expected a signed 64-bit bigint');
        b.writeBigInt64LE(v as bigint, at);
      };
    case 'bytes': {
      const n = spec.size;
      return (b, at, v) => {
        if (!(v instanceof Uint8Array) || v.length > n) bad(v, `expected a Uint8Array of at most ${n} bytes`);
        const src = v as Uint8Array;
        b.set(src, at);
        if (src.length < n) b.fill(0, at + src.length, at + n);
      };
    }
    case 'cstring': {
      const n = spec.size;
      return (b, at, v) => {
        if (typeof v !== 'string') bad(v, 'expected a string');
        b.fill(0, at, at + n);
        // Leave room for the terminating NUL, as a C strncpy into char[n] with name[n-1] = 0.
        b.write(v as string, at, n - 1, 'utf8');
      };
    }
    case 'u64[]': {
      const n = spec.count;
      return (b, at, v) => {
        if (!Array.isArray(v) || v.length !== n) bad(v, `expected ${n} bigints`);
        const arr = v as unknown[];
        for (let i = 0; i < n; i++) {
          const e = arr[i];
          if (typeof e !== 'bigint' || e < 0n || e > 0xffffffffffffffffn) bad(e, `element ${i}: expected a u64 bigint`);
          b.writeBigUInt64LE(e as bigint, at + 8 * i);
        }
      };
    }
    case 'struct': {
      const l = spec.layout;
      return (b, at, v) => {
        if (typeof v !== 'object' || v === null) bad(v, `expected a ${l.name} object`);
        l.write(b, at, v);
      };
    }
    case 'padding': {
      const n = spec.size;
      return (b, at) => {
        b.fill(0, at, at + n);
      };
    }
  }
}

function zeroFor(spec: FieldSpec): unknown {
  switch (spec.kind) {
    case 'u64':
    case 's64':
      return 0n;
    case 'bytes':
      return new Uint8Array(spec.size);
    case 'cstring':
      return '';
    case 'u64[]':
      return new Array<bigint>(spec.count).fill(0n);
    case 'struct':
      return spec.layout.zero();
    default:
      return 0;
  }
}

/** Raised for a malformed declaration or a value that does not fit its field (programming errors). */
export class LayoutError extends Error {
  readonly code = 'layout';
  constructor(message: string) {
    super(message);
    this.name = 'LayoutError';
  }
}

/**
 * Declare a C struct. Field order is declaration order; `name` is the C struct name
 * (the key used in `struct-sizes.json`).
 */
export function struct<S extends Shape>(name: string, shape: S): Layout<ValueOfShape<S>> {
  const fields: CompiledField[] = [];
  let cursor = 0;
  let structAlign = 1;
  for (const [fname, spec] of Object.entries(shape)) {
    const { size, align } = sizeAndAlign(spec);
    if (cursor % align !== 0) {
      throw new LayoutError(`${name}.${fname}: offset ${cursor} is not ${align}-aligned (implicit padding)`);
    }
    fields.push({ name: fname, offset: cursor, size, align, spec, isPadding: spec.kind === 'padding' });
    cursor += size;
    structAlign = Math.max(structAlign, align);
  }
  if (cursor % structAlign !== 0) {
    throw new LayoutError(`${name}: size ${cursor} is not a multiple of its alignment ${structAlign}`);
  }
  const size = cursor;
  const byName = new Map(fields.map((f) => [f.name, f]));

  const valueFields = fields.filter((f) => !f.isPadding);
  const names = valueFields.map((f) => f.name);
  const offsets = valueFields.map((f) => f.offset);
  const readers = valueFields.map((f) => readerFor(f.spec));
  const writers = fields.map((f) => writerFor(f.spec, `${name}.${f.name}`));
  const allOffsets = fields.map((f) => f.offset);
  const allNames = fields.map((f) => f.name);
  const allPadding = fields.map((f) => f.isPadding);
  const count = names.length;

  const paddingRanges: ByteRange[] = [];
  for (const f of fields) {
    if (f.isPadding) paddingRanges.push({ offset: f.offset, size: f.size, path: f.name });
    else if (f.spec.kind === 'struct') {
      for (const r of f.spec.layout.paddingRanges) {
        paddingRanges.push({ offset: f.offset + r.offset, size: r.size, path: `${f.name}.${r.path}` });
      }
    }
  }

  const layout: Layout<ValueOfShape<S>> = {
    name,
    size,
    align: structAlign,
    fields,
    paddingRanges,
    read(buf: Buffer, offset = 0): ValueOfShape<S> {
      if (offset < 0 || offset + size > buf.length) {
        throw new LayoutError(`${name}: need ${size} bytes at offset ${offset}, buffer has ${buf.length}`);
      }
      const out: Record<string, unknown> = {};
      for (let i = 0; i < count; i++) out[names[i]!] = readers[i]!(buf, offset + offsets[i]!);
      return out as ValueOfShape<S>;
    },
    write(buf: Buffer, offset: number, value: ValueOfShape<S>): void {
      if (offset < 0 || offset + size > buf.length) {
        throw new LayoutError(`${name}: need ${size} bytes at offset ${offset}, buffer has ${buf.length}`);
      }
      const v = value as Record<string, unknown>;
      for (let i = 0; i < writers.length; i++) {
        const at = offset + allOffsets[i]!;
        if (allPadding[i]) {
          writers[i]!(buf, at, undefined);
          continue;
        }
        const fv = v[allNames[i]!];
        if (fv === undefined) throw new LayoutError(`${name}.${allNames[i]!}: missing value`);
        writers[i]!(buf, at, fv);
      }
    },
    encode(value: ValueOfShape<S>): Buffer {
      const b = Buffer.alloc(size);
      layout.write(b, 0, value);
      return b;
    },
    zero(): ValueOfShape<S> {
      const out: Record<string, unknown> = {};
      for (const f of valueFields) out[f.name] = zeroFor(f.spec);
      return out as ValueOfShape<S>;
    },
    paddingIsZero(buf: Buffer, offset = 0): boolean {
      for (const r of paddingRanges) {
        for (let i = offset + r.offset, end = i + r.size; i < end; i++) if (buf[i] !== 0) return false;
      }
      return true;
    },
    field(fname: string): CompiledField {
      const f = byName.get(fname);
      if (!f) throw new LayoutError(`${name} has no field ${fname}`);
      return f;
    },
  };
  return layout;
}

/** The value type a layout decodes to. */
export type ValueOf<L> = L extends Layout<infer V> ? V : never;

/** A plain Uint8Array copy of `n` bytes at `at` (not a Buffer view: decoded values own their bytes). */
export function copyBytes(b: Buffer, at: number, n: number): Uint8Array {
  const out = new Uint8Array(n);
  out.set(b.subarray(at, at + n));
  return out;
}
