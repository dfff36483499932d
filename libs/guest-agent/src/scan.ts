/**
 * Masked byte-signature search over a range made of discontiguous segments (pages or regions mapped at
 * unrelated local addresses), without copying them: candidates come from `indexOf` of an anchor byte
 * (the first fully-significant byte of the signature) inside each segment; a candidate is then checked
 * byte by byte, reading across segment boundaries when the match straddles them.
 */
import { GuestAgentError } from './errors.js';

export interface Segment {
  /** Guest physical address of view[0]. */
  readonly gpa: bigint;
  readonly view: Buffer;
}

export interface Signature {
  readonly bytes: Uint8Array;
  /** Same length as `bytes`; absent = every bit significant. */
  readonly mask?: Uint8Array;
}

export const MAX_SIGNATURE_BYTES = 4096;

export function checkSignature(sig: Signature): void {
  if (sig.bytes.length === 0 || sig.bytes.length > MAX_SIGNATURE_BYTES) {
    throw new GuestAgentError('invalid-argument', `a signature has 1..${MAX_SIGNATURE_BYTES} bytes, got ${sig.bytes.length}`);
  }
  if (sig.mask && sig.mask.length !== 0 && sig.mask.length !== sig.bytes.length) {
    throw new GuestAgentError('invalid-argument', `the mask has ${sig.mask.length} bytes, the signature ${sig.bytes.length}`);
  }
}

/**
 * Parse `HEX[/MASK]` (the CLI form): hex digits, `??` for a wildcard byte in HEX, optional `/MASKHEX`.
 * E.g. `0f22e0`, `e8????????c3`, `4889/fff8`.
 */
export function parseSignature(text: string): Signature {
  const [sigText, maskText, extra] = text.split('/');
  if (extra !== undefined || !sigText || sigText.length % 2 !== 0) throw new GuestAgentError('invalid-argument', `bad signature ${JSON.stringify(text)}`);
  const n = sigText.length / 2;
  const bytes = new Uint8Array(n);
  const mask = new Uint8Array(n).fill(0xff);
  for (let i = 0; i < n; i++) {
    const pair = sigText.slice(2 * i, 2 * i + 2);
    if (pair === '??') {
      mask[i] = 0;
      continue;
    }
    if (!/^[0-9a-fA-F]{2}$/.test(pair)) throw new GuestAgentError('invalid-argument', `bad signature byte ${JSON.stringify(pair)}`);
    bytes[i] = parseInt(pair, 16);
  }
  if (maskText !== undefined) {
    if (maskText.length !== sigText.length || !/^[0-9a-fA-F]*$/.test(maskText)) {
      throw new GuestAgentError('invalid-argument', `the mask must have as many hex digits as the signature: ${JSON.stringify(text)}`);
    }
    for (let i = 0; i < n; i++) mask[i] = mask[i]! & parseInt(maskText.slice(2 * i, 2 * i + 2), 16);
  }
  const sig = { bytes: bytes.map((b, i) => b & mask[i]!), mask };
  checkSignature(sig);
  return sig;
}

/**
 * Matches of `sig` whose bytes lie entirely in the segments (which must be contiguous in gpa order and
 * cover the range being scanned). Returns at most `maxMatches` addresses, in order.
 */
export function scanSegments(segments: readonly Segment[], sig: Signature, maxMatches: number): { matches: bigint[]; truncated: boolean } {
  checkSignature(sig);
  const n = sig.bytes.length;
  const mask = sig.mask && sig.mask.length > 0 ? sig.mask : new Uint8Array(n).fill(0xff);
  const want = sig.bytes.map((b, i) => b & mask[i]!);
  let anchor = mask.findIndex((m) => m === 0xff);
  const total = segments.reduce((a, s) => a + s.view.length, 0);
  // offsets[i] = position of segment i in the virtual concatenation
  const offsets: number[] = [];
  let acc = 0;
  for (const s of segments) {
    offsets.push(acc);
    acc += s.view.length;
  }
  const matchesAt = (pos: number, seg: number): boolean => {
    if (pos < 0 || pos + n > total) return false;
    let s = seg;
    while (s > 0 && pos < offsets[s]!) s--;
    for (let k = 0; k < n; k++) {
      if (mask[k] === 0) continue;
      const p = pos + k;
      while (p >= offsets[s]! + segments[s]!.view.length) s++;
      if ((segments[s]!.view[p - offsets[s]!]! & mask[k]!) !== want[k]) return false;
    }
    return true;
  };
  const matches: bigint[] = [];
  const base = segments[0]?.gpa ?? 0n;
  const gpaAt = (pos: number, _seg: number): bigint => base + BigInt(pos);
  if (anchor < 0) {
    // No fully significant byte: check every position.
    anchor = 0;
    for (let si = 0; si < segments.length; si++) {
      const len = segments[si]!.view.length;
      for (let j = 0; j < len; j++) {
        const pos = offsets[si]! + j;
        if (matchesAt(pos, si)) {
          matches.push(gpaAt(pos, si));
          if (matches.length >= maxMatches) return { matches, truncated: true };
        }
      }
    }
    return { matches, truncated: false };
  }
  const a = want[anchor]!;
  for (let si = 0; si < segments.length; si++) {
    const view = segments[si]!.view;
    let j = view.indexOf(a);
    while (j >= 0) {
      const pos = offsets[si]! + j - anchor;
      if (matchesAt(pos, si)) {
        matches.push(gpaAt(pos, si));
        if (matches.length >= maxMatches) return { matches, truncated: true };
      }
      j = view.indexOf(a, j + 1);
    }
  }
  return { matches, truncated: false };
}
