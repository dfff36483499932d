/**
 * Layout oracle: every struct in ../shared/spec/struct-sizes.json (and the handshake, kvmmem and Heki
 * entries of struct-sizes-v7.json) against the declarations in structs.ts — size, and each field at
 * its offset. The JSON files were produced independently (gcc offsetof on re-declarations from the
 * sheets); every size and offset here is taken from them, none from the code under test.
 */
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { structs, type Layout } from '@periscope/kvmi';

interface JsonField { name: string; offset: number; size: number; type: string }
interface JsonStruct { size: number; fields: JsonField[] }

const specDir = join(dirname(fileURLToPath(import.meta.url)), '../../../../shared/spec');
const v12 = JSON.parse(readFileSync(join(specDir, 'struct-sizes.json'), 'utf8')) as Record<string, JsonStruct>;
const v7 = JSON.parse(readFileSync(join(specDir, 'struct-sizes-v7.json'), 'utf8')) as Record<string, JsonStruct>;

const layouts = new Map<string, Layout<unknown>>();
for (const v of Object.values(structs)) {
  if (typeof v === 'object' && v !== null && 'fields' in v && 'name' in v) layouts.set((v as Layout<unknown>).name, v as Layout<unknown>);
}

const V7_ENTRIES = [
  'kvmi_qemu2introspector', 'qemu_vmi_to_introspector_newer', 'kvmi_introspector2qemu', // handshake
  'kvmi_mem_token', 'kvmi_mem_map', 'kvmi_guest_mem_map', // kvmmem
  'heki_exit', 'heki_pages', // heki
];

/** Encode a value where every non-padding byte is distinct-ish, then check each field's bytes sit at the JSON offset. */
function distinctValue(layout: Layout<unknown>, seed: { n: number }): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const f of layout.fields) {
    if (f.isPadding) continue;
    const spec = f.spec;
    const next = () => (seed.n = (seed.n * 31 + 17) % 251) + 1; // 1..251, never 0
    switch (spec.kind) {
      case 'u8': out[f.name] = next(); break;
      case 'u16': out[f.name] = next() * 256 + next(); break;
      case 'u32': out[f.name] = (next() * 0x1000000 + next() * 0x10000 + next() * 256 + next()) >>> 0; break;
      case 's32': out[f.name] = next() * 0x10000 + next(); break;
      case 'u64': case 's64': {
        let v = 0n;
        for (let i = 0; i < 7; i++) v = (v << 8n) | BigInt(next());
        out[f.name] = v;
        break;
      }
      case 'bytes': out[f.name] = Uint8Array.from({ length: spec.size }, () => next()); break;
      case 'cstring': out[f.name] = 'x'.repeat(Math.min(5, spec.size - 1)); break;
      case 'u64[]': out[f.name] = Array.from({ length: spec.count }, () => BigInt(next()) << 8n | BigInt(next())); break;
      case 'struct': out[f.name] = distinctValue(spec.layout as Layout<unknown>, seed); break;
    }
  }
  return out;
}

function check(name: string, expected: JsonStruct): void {
  const layout = layouts.get(name);
  expect(layout, `structs.ts declares ${name}`).toBeDefined();
  const l = layout!;
  expect(l.size, `${name} size`).toBe(expected.size);
  for (const jf of expected.fields) {
    // Variable-length tails (size 0, type "...[count]") are declared in the catalog, not the struct.
    if (jf.size === 0) {
      expect(jf.offset, `${name}.${jf.name} tail starts at the struct end`).toBe(l.size);
      continue;
    }
    // heki_exit: `reserved[7]` is a union with cr_value; declared as cr_value + reserved[6].
    if (name === 'heki_exit' && jf.name === 'reserved') {
      const cr = l.field('cr_value');
      const rest = l.field('reserved');
      expect(cr.offset).toBe(jf.offset);
      expect(rest.offset + rest.size - cr.offset).toBe(jf.size);
      continue;
    }
    const f = l.field(jf.name);
    expect({ field: jf.name, offset: f.offset, size: f.size }).toEqual({ field: jf.name, offset: jf.offset, size: jf.size });
  }
  // Every declared field appears in the JSON (nothing invented).
  const jsonNames = new Set(expected.fields.map((f) => f.name));
  for (const f of l.fields) {
    if (name === 'heki_exit' && f.name === 'cr_value') continue;
    expect(jsonNames.has(f.name), `${name}.${f.name} is in the JSON`).toBe(true);
  }
  // Distinct values land at the JSON offsets.
  const value = distinctValue(l, { n: name.length });
  const buf = l.encode(value as never);
  expect(buf.length).toBe(expected.size);
  for (const jf of expected.fields) {
    if (jf.size === 0 || !(jf.name in value)) continue;
    const v = value[jf.name];
    const at = buf.subarray(jf.offset, jf.offset + jf.size);
    if (typeof v === 'number') {
      const n = jf.size === 1 ? at[0] : jf.size === 2 ? at.readUInt16LE(0) : jf.type === 's32' ? at.readInt32LE(0) : at.readUInt32LE(0);
      expect(n, `${name}.${jf.name} at ${jf.offset}`).toBe(v);
    } else if (typeof v === 'bigint') {
      expect(at.readBigUInt64LE(0), `${name}.${jf.name} at ${jf.offset}`).toBe(v);
    } else if (v instanceof Uint8Array) {
      expect(Buffer.from(at).equals(Buffer.from(v)), `${name}.${jf.name} at ${jf.offset}`).toBe(true);
    } else if (typeof v === 'string') {
      expect(at.toString('utf8', 0, v.length)).toBe(v);
    }
  }
  // And decode back.
  expect(l.read(buf)).toEqual(value);
}

describe('struct layouts match struct-sizes.json (v12)', () => {
  for (const [name, s] of Object.entries(v12)) {
    it(`${name}: ${s.size} bytes, every field at its offset`, () => check(name, s));
  }
});

describe('struct layouts match struct-sizes-v7.json (handshake, kvmmem, Heki)', () => {
  for (const name of V7_ENTRIES) {
    it(`${name}: ${v7[name]!.size} bytes, every field at its offset`, () => check(name, v7[name]!));
  }
});
