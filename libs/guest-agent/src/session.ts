/**
 * One VM's memory session in the guest agent: a `/dev/kvmmem` file opened for that VM, the pages (v1)
 * or regions (v2) mapped through it, and the memory work done on them zero-copy — read, SHA-256 hashes
 * per chunk, masked signature scans. Mapping consumes one single-use token per map call (v1: per page,
 * v2: per region); the page quota is shared by every session of the agent.
 */
import { createHash } from 'node:crypto';

import type { KvmmemDevice, KvmmemFile, KvmmemMapping } from './device.js';
import { PAGE_SIZE } from './device.js';
import { GuestAgentError, KvmmemError, type GpaSpan } from './errors.js';
import { loadAddon } from './native.js';
import { scanSegments, type Segment, type Signature } from './scan.js';

const PAGE = BigInt(PAGE_SIZE);
/** ABI v2 map calls sent together once the region size is known. */
const MAP_PIPELINE = 8;
const U64_END = 1n << 64n;

/** Pages mapped by every session of an agent, against `--max-mapped-pages`. */
export class PageQuota {
  private used_ = 0;
  constructor(readonly limit: number) {}
  get used(): number {
    return this.used_;
  }
  tryTake(pages: number): boolean {
    if (this.used_ + pages > this.limit) return false;
    this.used_ += pages;
    return true;
  }
  give(pages: number): void {
    this.used_ = Math.max(0, this.used_ - pages);
  }
}

export interface MapOptions {
  /** EAGAIN/EBUSY from a map call: retry with the next token after this long (libkvmi: 1 s, 30 attempts). */
  retryDelayMs?: number;
  maxAttempts?: number;
  signal?: AbortSignal;
}

export interface MapOutcome {
  /** Every mapping that intersects the range, in address order. */
  regions: GpaSpan[];
  /** Tokens not consumed (still valid). */
  unusedTokens: Uint8Array[];
}

export interface ChunkDigest {
  gpa: bigint;
  length: bigint;
  digest: Buffer;
}

/** Consecutive chunk digests: chunk i starts at gpa + i·chunkSize; all are chunkSize long but the last (lastLength). */
export interface PackedDigests {
  gpa: bigint;
  chunkSize: number;
  lastLength: number;
  /** 32 bytes per chunk. */
  digests: Buffer;
}

export function unpackDigests(p: PackedDigests): ChunkDigest[] {
  const n = p.digests.length / 32;
  const out: ChunkDigest[] = [];
  for (let i = 0; i < n; i++) {
    out.push({ gpa: p.gpa + BigInt(i * p.chunkSize), length: BigInt(i === n - 1 ? p.lastLength : p.chunkSize), digest: p.digests.subarray(i * 32, i * 32 + 32) });
  }
  return out;
}

/** SHA-256 of consecutive chunks of the concatenated views, in JavaScript (chunks straddling views). */
function hashAcross(views: readonly Buffer[], chunkSize: number): Buffer {
  const parts: Buffer[] = [];
  let h = createHash('sha256');
  let inChunk = 0;
  for (const v of views) {
    let off = 0;
    while (off < v.length) {
      const take = Math.min(chunkSize - inChunk, v.length - off);
      h.update(v.subarray(off, off + take));
      off += take;
      inChunk += take;
      if (inChunk === chunkSize) {
        parts.push(h.digest());
        h = createHash('sha256');
        inChunk = 0;
      }
    }
  }
  if (inChunk > 0) parts.push(h.digest());
  return Buffer.concat(parts);
}

function checkRange(r: GpaSpan): void {
  if (r.gpa < 0n || r.length < 0n || r.gpa + r.length > U64_END) throw new GuestAgentError('invalid-argument', `bad range ${r.gpa}+${r.length}`);
}

const sleep = (ms: number, signal?: AbortSignal): Promise<void> =>
  new Promise((resolve, reject) => {
    const t = setTimeout(resolve, ms);
    signal?.addEventListener('abort', () => {
      clearTimeout(t);
      reject(new GuestAgentError('cancelled', 'cancelled'));
    }, { once: true });
  });

export class VmMemorySession {
  /** Mappings sorted by start gpa, never overlapping. */
  private readonly maps: KvmmemMapping[] = [];
  private readonly inflight = new Set<Promise<unknown>>();
  /** ABI v2: the region size the device answers (a power of two, learned from the first map). */
  private regionHint = 0n;
  private closed_ = false;
  lastUsed = Date.now();

  private constructor(
    readonly uuid: Uint8Array,
    readonly generation: bigint,
    private readonly file: KvmmemFile,
    private readonly quota: PageQuota,
  ) {}

  /** Open a device file for the VM (v2: KVM_GUEST_MEM_OPEN with its uuid). */
  static async open(device: KvmmemDevice, uuid: Uint8Array, generation: bigint, quota: PageQuota): Promise<VmMemorySession> {
    const file = await device.openFile();
    try {
      await file.open(uuid);
    } catch (e) {
      await file.close();
      throw e;
    }
    return new VmMemorySession(uuid, generation, file, quota);
  }

  get abi(): 1 | 2 {
    return this.file.abi;
  }

  get closed(): boolean {
    return this.closed_;
  }

  /** Pages mapped in this session. */
  get mappedPages(): number {
    return this.maps.reduce((a, m) => a + m.length / PAGE_SIZE, 0);
  }

  /** The mappings, in address order (for tests and diagnostics). */
  mappings(): readonly KvmmemMapping[] {
    return this.maps;
  }

  private live(): void {
    if (this.closed_) throw new GuestAgentError('closed', 'the memory session is closed');
    this.lastUsed = Date.now();
  }

  /** Index of the mapping containing gpa, or -(insertion point) - 1. */
  private find(gpa: bigint): number {
    let lo = 0;
    let hi = this.maps.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      const m = this.maps[mid]!;
      if (gpa < m.start) hi = mid - 1;
      else if (gpa >= m.start + BigInt(m.length)) lo = mid + 1;
      else return mid;
    }
    return -lo - 1;
  }

  private insert(m: KvmmemMapping): void {
    const i = this.find(m.start);
    this.maps.splice(i >= 0 ? i : -i - 1, 0, m);
  }

  /**
   * Map [gpa, gpa + length) page by page (v1) or region by region (v2), skipping what is mapped already,
   * one token per map call. Throws `need-tokens` (with the unmapped rest as `range`) when the tokens run
   * out — what was mapped stays mapped —, `quota-exceeded`, or the device's `KvmmemError`.
   */
  async map(range: GpaSpan, tokens: readonly Uint8Array[], opts: MapOptions = {}): Promise<MapOutcome> {
    this.live();
    checkRange(range);
    const queue = [...tokens];
    const unused = (): Uint8Array[] => queue.splice(0);
    let cursor = range.gpa & ~(PAGE - 1n);
    const end = range.length === 0n ? cursor : (range.gpa + range.length + PAGE - 1n) & ~(PAGE - 1n);
    const maxAttempts = opts.maxAttempts ?? 30;
    const rest = (from: bigint): GpaSpan => ({ gpa: from, length: end - from });

    /** One map call at gpa (retried with the next token on EAGAIN/EBUSY); quota taken for its pages. */
    const mapOne = async (gpa: bigint): Promise<KvmmemMapping> => {
      if (!this.quota.tryTake(1)) {
        throw new GuestAgentError('quota-exceeded', `--max-mapped-pages ${this.quota.limit} reached (${this.quota.used} mapped)`, { range: rest(gpa) });
      }
      let mapping: KvmmemMapping | undefined;
      for (let attempt = 1; !mapping; attempt++) {
        const token = queue.shift();
        if (!token) {
          this.quota.give(1);
          throw new GuestAgentError('need-tokens', `map tokens ran out at ${gpa.toString(16)}`, { range: rest(gpa) });
        }
        try {
          mapping = await this.file.map(token, gpa);
        } catch (e) {
          const busy = e instanceof KvmmemError && (e.code === 'EAGAIN' || e.code === 'EBUSY');
          if (!busy || attempt >= maxAttempts) {
            this.quota.give(1);
            throw e;
          }
          await sleep(opts.retryDelayMs ?? 1000, opts.signal);
        }
      }
      const pages = mapping.length / PAGE_SIZE;
      if (pages > 1 && !this.quota.tryTake(pages - 1)) {
        this.quota.give(1);
        await this.file.unmap(mapping).catch(() => undefined);
        throw new GuestAgentError('quota-exceeded', `a ${pages}-page region would exceed --max-mapped-pages ${this.quota.limit}`, { range: rest(gpa) });
      }
      return mapping;
    };

    try {
      while (cursor < end) {
        const i = this.find(cursor);
        if (i >= 0) {
          const m = this.maps[i]!;
          cursor = m.start + BigInt(m.length);
          continue;
        }
        // ABI v2: once the region size is known, the map calls for the next uncovered blocks go out
        // together (a round trip each otherwise); v1 is one page per call and stays in order.
        const targets = [cursor];
        if (this.file.abi === 2 && this.regionHint > 0n) {
          for (let g = (cursor & ~(this.regionHint - 1n)) + this.regionHint; g < end && targets.length < MAP_PIPELINE; g += this.regionHint) {
            if (this.find(g) < 0) targets.push(g);
          }
          if (targets.length > queue.length) targets.length = Math.max(1, queue.length);
        }
        const results = await Promise.allSettled(targets.map((g) => mapOne(g)));
        let failure: unknown;
        for (const r of results) {
          if (r.status === 'rejected') {
            failure ??= r.reason;
            continue;
          }
          const m = r.value;
          const end_ = m.start + BigInt(m.length);
          if (this.maps.some((x) => x.start < end_ && m.start < x.start + BigInt(x.length))) {
            this.quota.give(m.length / PAGE_SIZE); // a region the device also gave another call: keep one
            await this.file.unmap(m).catch(() => undefined);
            continue;
          }
          this.insert(m);
          if (this.file.abi === 2 && (m.length & (m.length - 1)) === 0 && m.start % BigInt(m.length) === 0n) this.regionHint = BigInt(m.length);
        }
        if (failure !== undefined) {
          // what was mapped stays mapped; need-tokens names the first hole left
          if (failure instanceof GuestAgentError && failure.code === 'need-tokens') {
            let hole = cursor;
            for (let k = this.find(hole); k >= 0; k = this.find(hole)) hole = this.maps[k]!.start + BigInt(this.maps[k]!.length);
            throw new GuestAgentError('need-tokens', failure.message, { range: rest(hole) });
          }
          throw failure;
        }
        if (opts.signal?.aborted) throw new GuestAgentError('cancelled', 'cancelled');
      }
    } catch (e) {
      throw Object.assign(e as Error, { unusedTokens: unused() });
    }
    return { regions: this.covering(range).map((m) => ({ gpa: m.start, length: BigInt(m.length) })), unusedTokens: unused() };
  }

  private covering(range: GpaSpan): KvmmemMapping[] {
    const end = range.gpa + range.length;
    return this.maps.filter((m) => m.start < end && range.gpa < m.start + BigInt(m.length));
  }

  /**
   * Zero-copy views of [gpa, gpa + length) in address order (valid until the range is unmapped).
   * Throws `not-mapped` naming the first hole.
   */
  segments(range: GpaSpan): Segment[] {
    this.live();
    checkRange(range);
    const out: Segment[] = [];
    let cursor = range.gpa;
    const end = range.gpa + range.length;
    while (cursor < end) {
      const i = this.find(cursor);
      if (i < 0) {
        const next = this.maps[-i - 1];
        const holeEnd = next && next.start < end ? next.start : end;
        throw new GuestAgentError('not-mapped', `${cursor.toString(16)} is not mapped`, { range: { gpa: cursor, length: holeEnd - cursor } });
      }
      const m = this.maps[i]!;
      const off = Number(cursor - m.start);
      const stop = m.start + BigInt(m.length) < end ? m.length : Number(end - m.start);
      out.push({ gpa: cursor, view: Buffer.from(m.buffer, off, stop - off) });
      cursor = m.start + BigInt(stop);
    }
    return out;
  }

  /** A copy of the bytes. */
  read(range: GpaSpan): Buffer {
    const segs = this.segments(range);
    return Buffer.concat(segs.map((s) => s.view));
  }

  /**
   * SHA-256 of each `chunkSize` chunk of the range (the last one may be shorter), straight from the
   * mapped pages, in packed batches of up to `batch` chunks: `onBatch` gets each batch as it is done and
   * the event loop runs between batches. Chunks cut at segment boundaries are hashed by the addon in one
   * call per batch; a chunk straddling two mappings is hashed in JavaScript.
   */
  async hashPacked(range: GpaSpan, chunkSize: number, onBatch?: (digests: PackedDigests) => void, opts: { batch?: number; parallel?: number; signal?: AbortSignal } = {}): Promise<PackedDigests[]> {
    if (!Number.isInteger(chunkSize) || chunkSize <= 0) throw new GuestAgentError('invalid-argument', `chunk size must be a positive integer, got ${chunkSize}`);
    const segs = this.segments(range); // checks the whole range first
    const { sha256SegmentsAsync } = loadAddon();
    const out: PackedDigests[] = [];
    const per = BigInt((opts.batch ?? 1024) * chunkSize);
    const parallel = Math.max(1, opts.parallel ?? 2);
    const end = range.gpa + range.length;
    const queue: Promise<PackedDigests>[] = [];
    const take = async (): Promise<void> => {
      const p = await queue.shift()!;
      out.push(p);
      onBatch?.(p);
    };
    let si = 0;
    try {
      for (let g = range.gpa; g < end; g += per) {
        if (opts.signal?.aborted) throw new GuestAgentError('cancelled', 'cancelled');
        this.live(); // closed meanwhile: schedule nothing more (close waits for what is in flight)
        const stop = g + per < end ? g + per : end;
        const views: Buffer[] = [];
        while (si < segs.length && segs[si]!.gpa + BigInt(segs[si]!.view.length) <= g) si++;
        for (let k = si; k < segs.length && segs[k]!.gpa < stop; k++) {
          const sg = segs[k]!;
          const from = g > sg.gpa ? Number(g - sg.gpa) : 0;
          const to = stop < sg.gpa + BigInt(sg.view.length) ? Number(stop - sg.gpa) : sg.view.length;
          views.push(sg.view.subarray(from, to));
        }
        const span = Number(stop - g);
        const lastLength = span % chunkSize === 0 ? chunkSize : span % chunkSize;
        const gpa = g;
        const aligned = views.every((v, i) => i === views.length - 1 || v.length % chunkSize === 0);
        // Aligned batches hash on the thread pool (two in flight: two cores); a chunk straddling mappings
        // is hashed here.
        const digests = aligned ? this.track(sha256SegmentsAsync(views, chunkSize)) : Promise.resolve(hashAcross(views, chunkSize));
        queue.push(digests.then((d) => ({ gpa, chunkSize, lastLength, digests: d })));
        if (queue.length >= parallel) await take();
      }
      while (queue.length > 0) await take();
    } finally {
      await Promise.allSettled(queue);
    }
    return out;
  }

  /** Native hashing in flight reads the mappings: close() waits for it before unmapping. */
  private track<T>(p: Promise<T>): Promise<T> {
    this.inflight.add(p);
    const done = (): void => void this.inflight.delete(p);
    p.then(done, done);
    return p;
  }

  /** The same digests as `hashPacked`, one object per chunk. */
  async hash(range: GpaSpan, chunkSize: number): Promise<ChunkDigest[]> {
    return (await this.hashPacked(range, chunkSize)).flatMap(unpackDigests);
  }

  /** Masked signature scan of a mapped range. */
  scan(range: GpaSpan, sig: Signature, maxMatches = 1024): { matches: bigint[]; truncated: boolean } {
    return scanSegments(this.segments(range), sig, maxMatches);
  }

  /** Unmap every mapping that intersects the range (all of them for an empty range); returns them. */
  async unmap(range?: GpaSpan): Promise<GpaSpan[]> {
    this.live();
    const victims = !range || range.length === 0n ? [...this.maps] : this.covering(range);
    await Promise.allSettled([...this.inflight]);
    const out: GpaSpan[] = [];
    let first: unknown;
    for (const m of victims) {
      const i = this.maps.indexOf(m);
      if (i >= 0) this.maps.splice(i, 1);
      this.quota.give(m.length / PAGE_SIZE);
      out.push({ gpa: m.start, length: BigInt(m.length) });
      try {
        await this.file.unmap(m);
      } catch (e) {
        first ??= e;
      }
    }
    if (first !== undefined) throw first;
    return out;
  }

  /** Unmap everything and close the device file (every buffer is detached). Idempotent. */
  async close(): Promise<GpaSpan[]> {
    if (this.closed_) return [];
    this.closed_ = true;
    await Promise.allSettled([...this.inflight]); // never unmap under a hashing thread
    const out = this.maps.map((m) => ({ gpa: m.start, length: BigInt(m.length) }));
    this.quota.give(this.mappedPages);
    this.maps.length = 0;
    await this.file.close();
    return out;
  }
}
