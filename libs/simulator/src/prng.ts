/**
 * Seeded pseudo-random numbers (mulberry32). Every VM and every vCPU owns its own generator, derived
 * from the run's seed and its indexes, so that a vCPU's jitter sequence does not depend on I/O timing
 * elsewhere in the process.
 */
export type Prng = () => number;

/** mulberry32: a fast 32-bit generator; returns floats in [0, 1). */
export function mulberry32(seed: number): Prng {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Mix a seed with indexes into a new 32-bit seed (murmur3 finaliser per step). */
export function deriveSeed(seed: number, ...parts: number[]): number {
  let h = (seed ^ 0x9e3779b9) >>> 0;
  for (const p of parts) {
    h = Math.imul(h ^ (p >>> 0), 0x85ebca6b) >>> 0;
    h ^= h >>> 13;
    h = Math.imul(h, 0xc2b2ae35) >>> 0;
    h ^= h >>> 16;
  }
  return h >>> 0;
}

/** An integer in [0, n). */
export function randInt(prng: Prng, n: number): number {
  return Math.floor(prng() * n);
}

/** `n` pseudo-random bytes. */
export function randBytes(prng: Prng, n: number): Uint8Array {
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i++) out[i] = randInt(prng, 256);
  return out;
}
