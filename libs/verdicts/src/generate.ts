/**
 * Large policies for benchmarks and tests: `count` plausible filler rules (seeded, deterministic) in front of
 * a base policy's rules (default: the shipped default policy), so an event the base policy decides walks
 * every filler of its kind first.
 */
import type { Action, EventMatch, Policy, Rule, U64Range, VcpuEventKind } from './model.js';
import { loadDefaultPolicy } from './policy-file.js';

export interface GenerateOptions {
  /** Filler rules to generate (default 120). */
  count?: number;
  /** PRNG seed (default 1). */
  seed?: number;
  /** Kinds to spread the fillers over (default CR, MSR, PF, DESCRIPTOR, BREAKPOINT, HYPERCALL). */
  kinds?: readonly VcpuEventKind[];
  /** Rules appended after the fillers, and the defaults/exceptions kept (default: the shipped default policy). */
  base?: Policy;
}

/** mulberry32: small, fast, deterministic. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export function generatePolicy(options: GenerateOptions = {}): Policy {
  const count = options.count ?? 120;
  const rnd = prng(options.seed ?? 1);
  const kinds = options.kinds ?? (['CR', 'MSR', 'PF', 'DESCRIPTOR', 'BREAKPOINT', 'HYPERCALL'] as const);
  const base = options.base ?? loadDefaultPolicy();
  const int = (n: number) => Math.floor(rnd() * n);
  const pick = <T>(xs: readonly T[]): T => xs[int(xs.length)]!;
  const bit = () => 1n << BigInt(int(64));
  const vcpus = () => (rnd() < 0.5 ? { vcpus: Array.from({ length: 1 + int(4) }, () => 16 + int(240)) } : {});
  // Ranges above 4 GiB (gpa) / in the user half (gva): plausible, and away from the base policy's targets.
  const gpaRange = (): U64Range => {
    const start = 0x1_0000_0000n + BigInt(int(1 << 20)) * 0x20_0000n;
    return { start, end: start + BigInt(1 + int(16)) * 0x1000n };
  };
  const gvaRange = (): U64Range => {
    const start = BigInt(int(1 << 30)) * 0x1000n;
    return { start, end: start + BigInt(1 + int(256)) * 0x1000n };
  };
  const rules: Rule[] = [];
  for (let i = 0; i < count; i++) {
    const kind = kinds[i % kinds.length]!;
    let match: EventMatch;
    let action: Action;
    switch (kind) {
      case 'CR': {
        const cr = pick([0, 4]);
        const pred = pick(['clears', 'sets', 'changes'] as const);
        // Per-vCPU CR rules (vCPUs 16+): they never decide what the base policy decides on low vCPUs.
        match = { kind, cr: [cr], [pred]: bit(), vcpus: Array.from({ length: 1 + int(4) }, () => 16 + int(240)) };
        action = pred === 'clears' ? { kind: 'deny', forceBits: bit() } : pick([{ kind: 'allow' }, { kind: 'deny' }] as const);
        break;
      }
      case 'MSR':
        match = { kind, msr: [pick([0x800, 0xc001_0000, 0x4000_0000]) + int(256)], ...(rnd() < 0.3 ? { new: { mask: 0xfffn, value: BigInt(int(4096)) } } : {}) };
        action = pick([{ kind: 'deny' }, { kind: 'allow' }, { kind: 'crash' }] as const);
        break;
      case 'PF':
        match = { kind, access: pick([1, 2, 4, 6]), ...(rnd() < 0.5 ? { gpa: [gpaRange(), gpaRange()] } : { gva: [gvaRange()] }), ...vcpus() };
        action = pick([{ kind: 'skip' }, { kind: 'allow' }, { kind: 'inject', vector: 14, errorCode: 0x11 }, { kind: 'retry' }] as const);
        break;
      case 'DESCRIPTOR':
        match = { kind, descriptor: [pick([2, 3, 4])], write: rnd() < 0.5, ...vcpus() };
        action = pick([{ kind: 'skip' }, { kind: 'allow' }] as const);
        break;
      case 'BREAKPOINT':
        match = { kind, gpa: [gpaRange()] };
        action = pick([{ kind: 'retry' }, { kind: 'allow' }] as const);
        break;
      case 'HYPERCALL':
        match = { kind, regs: [{ reg: 'rdi', mask: 0xffff_ffffn, value: BigInt(100 + int(1000)) }] };
        action = pick([{ kind: 'allow' }, { kind: 'crash' }] as const);
        break;
      default:
        match = { kind, vcpus: [16 + int(240)] };
        action = rnd() < 0.2 ? { kind: 'crash' } : { kind: 'allow' };
    }
    rules.push({ id: `gen-${i}-${kind.toLowerCase()}`, match, action, report: pick([{ mode: 'always' }, { mode: 'never' }, { mode: 'sampled', oneIn: 100 }] as const) });
  }
  return { ...base, id: `${base.id}+gen${count}`, rules: [...rules, ...base.rules] };
}
