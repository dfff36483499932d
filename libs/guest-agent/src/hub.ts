/**
 * The analysis end of `GuestMemoryService.Session`: mount `hub.service` on a grpc-js server
 * (`server.addService(GuestMemoryServiceService, hub.service)`), then drive connected guest agents with
 * promises: `hub.agentFor(hostId).hash(vm, range)`.
 *
 * Tokens: `map` takes a `TokenSource` (analysis relays KVMI GET_MAP_TOKEN through the VM's host agent)
 * and fetches only what it needs — v1 one token per page, v2 one per region — keeping tokens the agent
 * did not use in a per-VM pool (they stay valid; the host allows few outstanding tokens per VM, 64 in the
 * simulator), and repeating while the agent answers NEED_TOKENS.
 */
import { EventEmitter } from 'node:events';

import type { ServerDuplexStream } from '@grpc/grpc-js';
import { Metadata } from '@grpc/grpc-js';
import {
  HashAlgorithm,
  KvmmemAbi,
  MemoryErrorCode,
  memoryErrorCodeToJSON,
  type ChunkHash,
  type GpaRange,
  type GuestAgentHello,
  type GuestMemoryServiceServer,
  type MemoryWork,
  type MemoryWorkResult,
  type SessionRequest,
  type SessionResponse,
} from '@periscope/contracts';

/** A VM as analysis knows it: the 16-byte uuid and the host agent's session generation. */
export interface VmRef {
  readonly uuid: Uint8Array;
  readonly generation: bigint;
}

/** Digests of consecutive chunks: chunk i at gpa + i·chunkSize, 32 bytes each; the last one lastLength long. */
export interface PackedChunkHashes {
  gpa: bigint;
  chunkSize: bigint;
  lastLength: bigint;
  digests: Buffer;
}

/** Fresh single-use map tokens (32 bytes each) for the VM, e.g. KVMI GET_MAP_TOKEN through its host agent. */
export type TokenSource = (count: number) => Promise<Uint8Array[]>;

/** A work item failed on the agent: `code` is the contract's `MemoryErrorCode`. */
export class GuestMemoryWorkError extends Error {
  override readonly name = 'GuestMemoryWorkError';
  constructor(
    readonly code: MemoryErrorCode,
    readonly errno: number,
    message: string,
    readonly range: GpaRange | undefined,
  ) {
    super(`${memoryErrorCodeToJSON(code)}: ${message}`);
  }
}

export interface RunOptions {
  deadlineMs?: number;
  /** Every non-final result, as it arrives. */
  onPartial?: (r: MemoryWorkResult) => void;
}

type WorkOp = NonNullable<MemoryWork['op']>;

interface PendingWork {
  results: MemoryWorkResult[];
  resolve(r: MemoryWorkResult[]): void;
  reject(e: Error): void;
  onPartial: ((r: MemoryWorkResult) => void) | undefined;
}

/** Default cap on tokens a map asks for at once (the simulator's outstanding-token limit per VM). */
export const DEFAULT_MAX_OUTSTANDING_TOKENS = 64;

/** One connected guest agent. */
export class GuestAgentLink {
  private seq = 0n;
  private nextWork = 1n;
  private readonly pending = new Map<bigint, PendingWork>();
  private closed_ = false;
  /** v2 region size learned from map results (a hint for how many tokens to fetch). */
  private regionHint = 2n << 20n;
  maxOutstandingTokens = DEFAULT_MAX_OUTSTANDING_TOKENS;

  /**
   * @param tokenPools unused tokens per VM (`<uuid hex>:<generation>`), shared by every link of a hub so
   *   that tokens outlive an agent's reconnect: each one still counts against the host's outstanding limit.
   */
  constructor(
    readonly hello: GuestAgentHello,
    private readonly call: ServerDuplexStream<SessionRequest, SessionResponse>,
    private readonly tokenPools: Map<string, Uint8Array[]> = new Map(),
  ) {}

  get hostId(): string {
    return this.hello.hostId;
  }

  get abi(): 1 | 2 | undefined {
    return this.hello.abi === KvmmemAbi.KVMMEM_ABI_V1 ? 1 : this.hello.abi === KvmmemAbi.KVMMEM_ABI_V2 ? 2 : undefined;
  }

  get closed(): boolean {
    return this.closed_;
  }

  /** Send one work item; resolves with all its results once the final one arrives (rejects on an error result). */
  run(vm: VmRef, op: WorkOp, opts: RunOptions = {}): Promise<MemoryWorkResult[]> {
    if (this.closed_) return Promise.reject(new Error(`guest agent ${this.hello.agentId} is gone`));
    const workId = this.nextWork++;
    return new Promise<MemoryWorkResult[]>((resolve, reject) => {
      this.pending.set(workId, { results: [], resolve, reject, onPartial: opts.onPartial });
      this.call.write({
        streamSeq: ++this.seq,
        message: {
          $case: 'work',
          value: { workId, vmUuid: Buffer.from(vm.uuid), sessionGeneration: vm.generation, deadlineMs: opts.deadlineMs ?? 0, op },
        },
      });
    });
  }

  /** Cancel in-flight work (the agent answers CANCELLED). */
  cancel(workId: bigint): void {
    this.call.write({ streamSeq: ++this.seq, message: { $case: 'cancel', value: { workId } } });
  }

  /** @internal */
  onResult(r: MemoryWorkResult): void {
    const p = this.pending.get(r.workId);
    if (!p) return;
    if (r.unusedMapTokens.length > 0) this.keepTokens(r, r.unusedMapTokens);
    if (!r.final) {
      p.results.push(r);
      p.onPartial?.(r);
      return;
    }
    this.pending.delete(r.workId);
    if (r.result?.$case === 'error') {
      const e = r.result.value;
      p.reject(new GuestMemoryWorkError(e.code, e.errno, e.message, e.range));
      return;
    }
    p.results.push(r);
    p.resolve(p.results);
  }

  private poolKeyOf = new Map<bigint, string>();
  private keepTokens(_r: MemoryWorkResult, tokens: Buffer[]): void {
    const key = this.poolKeyOf.get(_r.workId);
    if (key === undefined) return;
    this.poolKeyOf.delete(_r.workId);
    const pool = this.tokenPools.get(key) ?? [];
    pool.push(...tokens);
    this.tokenPools.set(key, pool);
  }

  /** End the stream (the agent redials and its sessions are closed meanwhile). */
  disconnect(): void {
    this.call.end();
    this.onClose('disconnected by analysis');
  }

  /** @internal */
  onClose(reason: string): void {
    if (this.closed_) return;
    this.closed_ = true;
    for (const p of this.pending.values()) p.reject(new Error(`guest agent ${this.hello.agentId} disconnected: ${reason}`));
    this.pending.clear();
  }

  /** Map calls [gpa, gpa + length) needs at most: pages (v1), or aligned region-size blocks it touches (v2). */
  private tokensNeeded(r: GpaRange): number {
    if (r.length <= 0n) return 0;
    const unit = this.abi === 1 ? 4096n : this.regionHint;
    const first = r.gpa / unit;
    const last = (r.gpa + r.length - 1n) / unit;
    return Number(last - first + 1n);
  }

  /**
   * Map a range, fetching tokens as needed. Resolves with the mapped regions covering the range.
   * Unused tokens are kept for the next map of the same VM (same generation).
   */
  async map(vm: VmRef, range: GpaRange, tokens: TokenSource, opts: RunOptions = {}): Promise<GpaRange[]> {
    const key = `${Buffer.from(vm.uuid).toString('hex')}:${vm.generation}`;
    // a new generation: the old pool is worthless (the host dropped those tokens at UNHOOK)
    for (const k of this.tokenPools.keys()) if (k.startsWith(`${Buffer.from(vm.uuid).toString('hex')}:`) && k !== key) this.tokenPools.delete(k);
    let rest: GpaRange = range;
    let lastRemaining = -1n;
    for (;;) {
      const pool = this.tokenPools.get(key) ?? [];
      this.tokenPools.delete(key);
      const want = Math.max(1, Math.min(this.tokensNeeded(rest), this.maxOutstandingTokens));
      if (pool.length < want) {
        try {
          pool.push(...(await tokens(Math.min(want - pool.length, this.maxOutstandingTokens - pool.length))));
        } catch (e) {
          // e.g. EAGAIN: too many tokens outstanding on the host; go on with what the pool has
          if (pool.length === 0) throw e;
        }
      }
      const workId = this.nextWork;
      this.poolKeyOf.set(workId, key);
      try {
        const results = await this.run(vm, { $case: 'map', value: { range: rest, mapTokens: pool.map((t) => Buffer.from(t)) } }, opts);
        const last = results[results.length - 1]!;
        if (last.result?.$case !== 'mapped') throw new Error(`unexpected map result ${String(last.result?.$case)}`);
        const regions = last.result.value.regions;
        for (const g of regions) if (g.length > 4096n && g.length > this.regionHint) this.regionHint = g.length;
        if (rest === range) return regions;
        // the regions of the whole range (earlier rounds mapped the start)
        const all = await this.run(vm, { $case: 'map', value: { range, mapTokens: [] } }, opts);
        const a = all[all.length - 1]!;
        return a.result?.$case === 'mapped' ? a.result.value.regions : regions;
      } catch (e) {
        if (e instanceof GuestMemoryWorkError && e.code === MemoryErrorCode.MEMORY_ERROR_CODE_NEED_TOKENS && e.range) {
          if (e.range.length === lastRemaining) throw e; // no progress
          lastRemaining = e.range.length;
          rest = e.range;
          continue;
        }
        throw e;
      } finally {
        this.poolKeyOf.delete(workId);
      }
    }
  }

  /** SHA-256 per chunk (default one page) of a mapped range, one object per chunk. */
  async hash(vm: VmRef, range: GpaRange, opts: RunOptions & { chunkSize?: number } = {}): Promise<ChunkHash[]> {
    const packed = await this.hashPacked(vm, range, opts);
    return packed.flatMap((p) => {
      const n = p.digests.length / 32;
      return Array.from({ length: n }, (_, i) => ({
        gpa: p.gpa + BigInt(i) * p.chunkSize,
        length: i === n - 1 ? p.lastLength : p.chunkSize,
        digest: p.digests.subarray(i * 32, i * 32 + 32),
      }));
    });
  }

  /** SHA-256 per chunk in the packed form: batches of consecutive 32-byte digests (no object per chunk). */
  async hashPacked(vm: VmRef, range: GpaRange, opts: RunOptions & { chunkSize?: number } = {}): Promise<PackedChunkHashes[]> {
    const results = await this.run(vm, { $case: 'hash', value: { range, algorithm: HashAlgorithm.HASH_ALGORITHM_SHA256, chunkSize: BigInt(opts.chunkSize ?? 0) } }, opts);
    const out: PackedChunkHashes[] = [];
    for (const r of results) {
      if (r.result?.$case !== 'hash') continue;
      const h = r.result.value;
      if (h.digests.length > 0) out.push({ gpa: h.firstGpa, chunkSize: h.chunkSize, lastLength: h.lastChunkLength, digests: h.digests });
      // an agent sending the unpacked form
      for (const c of h.hashes) out.push({ gpa: c.gpa, chunkSize: c.length, lastLength: c.length, digests: c.digest });
    }
    return out;
  }

  /** The bytes of a mapped range. */
  async read(vm: VmRef, range: GpaRange, opts: RunOptions = {}): Promise<Buffer> {
    const results = await this.run(vm, { $case: 'read', value: { range } }, opts);
    return Buffer.concat(results.flatMap((r) => (r.result?.$case === 'read' ? [r.result.value.data] : [])));
  }

  /** Masked signature scan of a mapped range; `onPartial` sees progress (bytes scanned). */
  async scan(vm: VmRef, range: GpaRange, signature: Uint8Array, mask?: Uint8Array, opts: RunOptions & { maxMatches?: number } = {}): Promise<{ matches: bigint[]; truncated: boolean; bytesScanned: bigint }> {
    const results = await this.run(vm, { $case: 'scan', value: { range, signature: Buffer.from(signature), mask: Buffer.from(mask ?? new Uint8Array(0)), maxMatches: opts.maxMatches ?? 0 } }, opts);
    const out = { matches: [] as bigint[], truncated: false, bytesScanned: 0n };
    for (const r of results) {
      if (r.result?.$case !== 'scan') continue;
      out.matches.push(...r.result.value.matches);
      out.truncated ||= r.result.value.truncated;
      out.bytesScanned = r.result.value.bytesScanned;
    }
    return out;
  }

  /** Unmap what intersects the range (everything without one). */
  async unmap(vm: VmRef, range?: GpaRange, opts: RunOptions = {}): Promise<GpaRange[]> {
    const results = await this.run(vm, { $case: 'unmap', value: { range: range ?? { gpa: 0n, length: 0n } } }, opts);
    const last = results[results.length - 1];
    return last?.result?.$case === 'unmapped' ? last.result.value.regions : [];
  }

  /** Close the VM's session on the agent (everything unmapped, device file closed). */
  async closeVm(vm: VmRef, opts: RunOptions = {}): Promise<GpaRange[]> {
    const results = await this.run(vm, { $case: 'close', value: {} }, opts);
    const last = results[results.length - 1];
    return last?.result?.$case === 'unmapped' ? last.result.value.regions : [];
  }
}

export interface GuestMemoryHubEvents {
  agent: [link: GuestAgentLink];
  'agent-gone': [link: GuestAgentLink, reason: string];
}

/** The server side of GuestMemoryService: one `GuestAgentLink` per connected agent. */
export class GuestMemoryHub extends EventEmitter<GuestMemoryHubEvents> {
  private readonly links = new Set<GuestAgentLink>();
  /** Unused map tokens per VM, shared by the links (see GuestAgentLink). */
  private readonly tokenPools = new Map<string, Uint8Array[]>();

  /** Mount with `server.addService(GuestMemoryServiceService, hub.service)`. */
  readonly service: GuestMemoryServiceServer = {
    session: (call: ServerDuplexStream<SessionRequest, SessionResponse>) => this.accept(call),
  };

  agents(): GuestAgentLink[] {
    return [...this.links];
  }

  /** The most recent agent of a host. */
  agentFor(hostId: string): GuestAgentLink | undefined {
    let found: GuestAgentLink | undefined;
    for (const l of this.links) if (l.hostId === hostId) found = l;
    return found;
  }

  /** Resolves with the host's agent once it is connected. */
  waitForAgent(hostId: string, timeoutMs = 10_000): Promise<GuestAgentLink> {
    const now = this.agentFor(hostId);
    if (now) return Promise.resolve(now);
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => {
        this.off('agent', on);
        reject(new Error(`no guest agent for host ${hostId} within ${timeoutMs} ms`));
      }, timeoutMs);
      const on = (l: GuestAgentLink): void => {
        if (l.hostId !== hostId) return;
        clearTimeout(t);
        this.off('agent', on);
        resolve(l);
      };
      this.on('agent', on);
    });
  }

  /** Drop every agent stream (agents redial). */
  disconnectAll(): void {
    for (const l of this.links) l.disconnect();
  }

  private accept(call: ServerDuplexStream<SessionRequest, SessionResponse>): void {
    let link: GuestAgentLink | undefined;
    call.sendMetadata(new Metadata());
    call.on('data', (req: SessionRequest) => {
      const m = req.message;
      if (!m) return;
      if (m.$case === 'hello') {
        if (link) return;
        link = new GuestAgentLink(m.value, call, this.tokenPools);
        this.links.add(link);
        this.emit('agent', link);
      } else if (m.$case === 'result') {
        link?.onResult(m.value);
      }
    });
    const gone = (reason: string): void => {
      if (!link || !this.links.delete(link)) return;
      link.onClose(reason);
      this.emit('agent-gone', link, reason);
    };
    call.on('error', (e: Error) => gone(e.message));
    call.on('end', () => {
      gone('stream ended');
      call.end();
    });
    call.on('cancelled', () => gone('cancelled'));
    call.on('close', () => gone('closed'));
  }
}
