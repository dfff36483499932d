import { describe, expect, it } from 'vitest';

import { GuestAgentError, parseSignature, scanSegments, type Segment } from '../src/index.js';

/** The bytes split at arbitrary points into segments (as discontiguous pages are). */
function split(bytes: Buffer, cuts: number[], gpa = 0x1000n): Segment[] {
  const out: Segment[] = [];
  let at = 0;
  for (const c of [...cuts, bytes.length]) {
    out.push({ gpa: gpa + BigInt(at), view: bytes.subarray(at, c) });
    at = c;
  }
  return out;
}

/** Brute force oracle. */
function naive(bytes: Buffer, sig: Uint8Array, mask: Uint8Array, gpa = 0x1000n): bigint[] {
  const out: bigint[] = [];
  for (let i = 0; i + sig.length <= bytes.length; i++) {
    let ok = true;
    for (let k = 0; k < sig.length && ok; k++) ok = (bytes[i + k]! & mask[k]!) === (sig[k]! & mask[k]!);
    if (ok) out.push(gpa + BigInt(i));
  }
  return out;
}

describe('signature scan', () => {
  it('finds masked matches, including those straddling segment boundaries', () => {
    const bytes = Buffer.alloc(3 * 4096);
    for (let i = 0; i < bytes.length; i++) bytes[i] = (i * 7 + 3) & 0xff;
    const plant = (at: number): void => void Buffer.from('0f22e0c3', 'hex').copy(bytes, at);
    plant(100);
    plant(4094); // straddles 4096
    plant(8190); // straddles 8192
    plant(bytes.length - 4); // ends at the end
    const sig = parseSignature('0f22??c3');
    const segs = split(bytes, [4096, 8192]);
    const got = scanSegments(segs, sig, 100);
    expect(got.matches).toEqual(naive(bytes, sig.bytes, sig.mask!));
    expect(got.matches).toContain(0x1000n + 4094n);
    expect(got.matches).toContain(0x1000n + 8190n);
    expect(got.truncated).toBe(false);
  });

  it('agrees with brute force on random data and masks (no fully significant byte too)', () => {
    let seed = 42;
    const rnd = (): number => ((seed = (seed * 1103515245 + 12345) >>> 0) >>> 16) & 0xff;
    for (let round = 0; round < 30; round++) {
      const bytes = Buffer.from(Array.from({ length: 2000 }, () => rnd() & 3));
      const n = 1 + (rnd() % 4);
      const sig = Uint8Array.from({ length: n }, () => rnd() & 3);
      const mask = Uint8Array.from({ length: n }, () => (round % 3 === 0 ? 0x01 : rnd() % 2 ? 0xff : 0x03));
      const cuts = [rnd() * 3, 700 + rnd(), 1500 + rnd()].sort((a, b) => a - b).filter((c, i, a) => c > 0 && c < 2000 && a.indexOf(c) === i);
      expect(scanSegments(split(bytes, cuts), { bytes: sig, mask }, 10_000).matches).toEqual(naive(bytes, sig, mask));
    }
  });

  it('stops at max matches', () => {
    const bytes = Buffer.alloc(100, 0x90);
    const r = scanSegments(split(bytes, [50]), parseSignature('9090'), 5);
    expect(r.matches).toHaveLength(5);
    expect(r.truncated).toBe(true);
  });

  it('parses HEX[/MASK] and refuses malformed signatures', () => {
    expect(parseSignature('4889/fff8')).toEqual({ bytes: Uint8Array.from([0x48, 0x88]), mask: Uint8Array.from([0xff, 0xf8]) });
    for (const bad of ['', '4', 'zz', '48/ff00', '48/f', 'a/b/c']) {
      expect(() => parseSignature(bad)).toThrow(GuestAgentError);
    }
  });
});
