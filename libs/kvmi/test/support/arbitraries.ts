/**
 * fast-check arbitraries generated from layouts and the catalog (structure-aware generation).
 */
import fc from 'fast-check';
import type { Arbitrary } from 'fast-check';
import { commands, type CommandKey, type Layout, type TailSpec } from '@periscope/kvmi';

export function arbLayout(layout: Layout<unknown>): Arbitrary<Record<string, unknown>> {
  const rec: Record<string, Arbitrary<unknown>> = {};
  for (const f of layout.fields) {
    if (f.isPadding) continue;
    const s = f.spec;
    switch (s.kind) {
      case 'u8': rec[f.name] = fc.integer({ min: 0, max: 0xff }); break;
      case 'u16': rec[f.name] = fc.integer({ min: 0, max: 0xffff }); break;
      case 'u32': rec[f.name] = fc.integer({ min: 0, max: 0xffffffff }); break;
      case 's32': rec[f.name] = fc.integer({ min: -0x80000000, max: 0x7fffffff }); break;
      case 'u64': rec[f.name] = fc.bigInt({ min: 0n, max: 0xffffffffffffffffn }); break;
      case 's64': rec[f.name] = fc.bigInt({ min: -(1n << 63n), max: (1n << 63n) - 1n }); break;
      case 'bytes': rec[f.name] = fc.uint8Array({ minLength: s.size, maxLength: s.size }); break;
      case 'cstring': rec[f.name] = fc.string({ unit: fc.constantFrom(...'abcdefghijklmnopqrstuvwxyz-0123456789'), maxLength: s.size - 1 }); break;
      case 'u64[]': rec[f.name] = fc.array(fc.bigInt({ min: 0n, max: 0xffffffffffffffffn }), { minLength: s.count, maxLength: s.count }); break;
      case 'struct': rec[f.name] = arbLayout(s.layout as Layout<unknown>); break;
    }
  }
  return fc.record(rec);
}

function arbTail(t: TailSpec, max: number): Arbitrary<unknown> {
  if (t.kind === 'bytes') return fc.uint8Array({ minLength: 0, maxLength: max });
  if (t.kind === 'u32') return fc.array(fc.integer({ min: 0, max: 0xffffffff }), { maxLength: max });
  return fc.array(arbLayout(t.layout), { maxLength: max });
}

/** A valid input for command `key` (count fields are derived by the encoder). */
export function arbCommandInput(key: CommandKey): Arbitrary<Record<string, unknown>> {
  const def = commands[key];
  const parts: Record<string, Arbitrary<unknown>> = {};
  if (def.scope === 'vcpu') parts['vcpu'] = fc.integer({ min: 0, max: 0xffff });
  let base: Arbitrary<Record<string, unknown>> = fc.record(parts);
  if (def.request) {
    const req = arbLayout(def.request as Layout<unknown>);
    base = fc.tuple(base, req).map(([a, b]) => ({ ...b, ...a }));
  }
  const tail = 'requestTail' in def ? (def.requestTail as TailSpec | undefined) : undefined;
  if (tail) {
    base = fc.tuple(base, arbTail(tail, 40)).map(([a, t]) => {
      const out: Record<string, unknown> = { ...a, [tail.prop]: t };
      delete out[tail.countField];
      return out;
    });
  }
  return base;
}
