/**
 * The guest agent's work loop, independent of the transport: `MemoryWork` in, `MemoryWorkResult`s out
 * (the last one `final`). One `VmMemorySession` per VM (keyed by uuid); a work item naming another
 * session generation than the VM's session (the VM was re-hooked: its tokens and mappings are gone on the
 * host) closes that session first. Items run concurrently up to `maxInFlight`, items of one VM in order.
 */
import {
  HashAlgorithm,
  MemoryErrorCode,
  type GpaRange,
  type HashResult,
  type MemoryWork,
  type MemoryWorkResult,
} from '@periscope/contracts';

import type { KvmmemDevice } from './device.js';
import { GuestAgentError, KvmmemError } from './errors.js';
import { PageQuota, VmMemorySession, type PackedDigests } from './session.js';

export interface WorkerOptions {
  device: KvmmemDevice;
  /** --max-mapped-pages. */
  maxMappedPages: number;
  /** Default deadline of a work item, ms. Default 60 s. */
  defaultDeadlineMs?: number;
  /** Delay between map retries on EAGAIN/EBUSY (libkvmi: 1000 ms). */
  mapRetryDelayMs?: number;
  /** Close a VM's session after this long without work. Default 10 min. */
  idleSessionMs?: number;
  /** Bytes per ReadChunk result. Default 1 MiB. */
  readChunkBytes?: number;
  log?: (level: 'debug' | 'info' | 'warn' | 'error', msg: string, fields?: Record<string, unknown>) => void;
}

const toRange = (r: { gpa: bigint; length: bigint }): GpaRange => ({ gpa: r.gpa, length: r.length });
const uuidKey = (u: Uint8Array): string => Buffer.from(u).toString('hex');

/** Map errors to the contract's codes. */
export function memoryErrorOf(e: unknown): { code: MemoryErrorCode; errno: number; message: string; range?: GpaRange } {
  if (e instanceof GuestAgentError) {
    const code = {
      'addon-missing': MemoryErrorCode.MEMORY_ERROR_CODE_KVMMEM_UNAVAILABLE,
      'not-mapped': MemoryErrorCode.MEMORY_ERROR_CODE_NOT_MAPPED,
      'need-tokens': MemoryErrorCode.MEMORY_ERROR_CODE_NEED_TOKENS,
      'quota-exceeded': MemoryErrorCode.MEMORY_ERROR_CODE_QUOTA_EXCEEDED,
      'invalid-argument': MemoryErrorCode.MEMORY_ERROR_CODE_INVALID_ARGUMENT,
      closed: MemoryErrorCode.MEMORY_ERROR_CODE_KVMMEM_UNAVAILABLE,
      'device-protocol': MemoryErrorCode.MEMORY_ERROR_CODE_KVMMEM_UNAVAILABLE,
      cancelled: MemoryErrorCode.MEMORY_ERROR_CODE_CANCELLED,
      'deadline-exceeded': MemoryErrorCode.MEMORY_ERROR_CODE_DEADLINE_EXCEEDED,
    }[e.code];
    return { code, errno: 0, message: e.message, ...(e.range ? { range: toRange(e.range) } : {}) };
  }
  if (e instanceof KvmmemError) {
    const code =
      e.code === 'EPERM'
        ? MemoryErrorCode.MEMORY_ERROR_CODE_TOKEN_REJECTED
        : e.code === 'EAGAIN' || e.code === 'EBUSY'
          ? MemoryErrorCode.MEMORY_ERROR_CODE_BUSY
          : e.code === 'EFAULT'
            ? MemoryErrorCode.MEMORY_ERROR_CODE_OUT_OF_RANGE
            : MemoryErrorCode.MEMORY_ERROR_CODE_SYSTEM;
    return { code, errno: e.errno, message: `${e.message}` };
  }
  return { code: MemoryErrorCode.MEMORY_ERROR_CODE_SYSTEM, errno: 0, message: e instanceof Error ? e.message : String(e) };
}

export class GuestMemoryWorker {
  readonly quota: PageQuota;
  private readonly sessions = new Map<string, Promise<VmMemorySession>>();
  private readonly chains = new Map<string, Promise<void>>();
  private readonly inFlight = new Map<bigint, AbortController>();
  private readonly idleTimer: NodeJS.Timeout;

  constructor(private readonly opts: WorkerOptions) {
    this.quota = new PageQuota(opts.maxMappedPages);
    const idle = opts.idleSessionMs ?? 600_000;
    this.idleTimer = setInterval(() => void this.closeIdle(idle), Math.min(idle, 60_000));
    this.idleTimer.unref();
  }

  get device(): KvmmemDevice {
    return this.opts.device;
  }

  /** Open sessions (for tests and status). */
  async sessionList(): Promise<VmMemorySession[]> {
    const out: VmMemorySession[] = [];
    for (const p of this.sessions.values()) {
      const s = await p.catch(() => undefined);
      if (s && !s.closed) out.push(s);
    }
    return out;
  }

  cancel(workId: bigint): void {
    this.inFlight.get(workId)?.abort(new GuestAgentError('cancelled', `work ${workId} cancelled`));
  }

  /** Run one work item; `emit` gets every result (the last one final). Never rejects. */
  run(work: MemoryWork, emit: (r: MemoryWorkResult) => void): Promise<void> {
    const key = uuidKey(work.vmUuid);
    const prev = this.chains.get(key) ?? Promise.resolve();
    const next = prev.then(() => this.execute(work, emit));
    const tail = next.finally(() => {
      if (this.chains.get(key) === tail) this.chains.delete(key);
    });
    this.chains.set(key, tail);
    return next;
  }

  private async session(uuid: Uint8Array, generation: bigint): Promise<VmMemorySession> {
    const key = uuidKey(uuid);
    const existing = this.sessions.get(key);
    if (existing) {
      const s = await existing.catch(() => undefined);
      if (s && !s.closed && s.generation === generation) return s;
      if (s && !s.closed) {
        this.opts.log?.('info', 'VM session generation changed: dropping its mappings', { vm: key, old: s.generation, new: generation });
        await s.close();
      }
      this.sessions.delete(key);
    }
    const p = VmMemorySession.open(this.opts.device, uuid, generation, this.quota);
    this.sessions.set(key, p);
    p.catch(() => {
      if (this.sessions.get(key) === p) this.sessions.delete(key);
    });
    return p;
  }

  private async execute(work: MemoryWork, emit: (r: MemoryWorkResult) => void): Promise<void> {
    const ac = new AbortController();
    this.inFlight.set(work.workId, ac);
    const deadline = work.deadlineMs > 0 ? work.deadlineMs : (this.opts.defaultDeadlineMs ?? 60_000);
    const timer = setTimeout(() => ac.abort(new GuestAgentError('deadline-exceeded', `deadline of ${deadline} ms passed`)), deadline);
    let unusedTokens: Uint8Array[] = [];
    try {
      if (work.vmUuid.length !== 16) throw new GuestAgentError('invalid-argument', `vm_uuid must be 16 bytes, got ${work.vmUuid.length}`);
      const op = work.op;
      if (!op) throw new GuestAgentError('invalid-argument', 'the work item has no operation');
      if (op.$case === 'close') {
        const key = uuidKey(work.vmUuid);
        const s = await this.sessions.get(key)?.catch(() => undefined);
        this.sessions.delete(key);
        const regions = s ? await s.close() : [];
        emit({ workId: work.workId, final: true, result: { $case: 'unmapped', value: { regions: regions.map(toRange) } }, unusedMapTokens: [] });
        return;
      }
      if (op.$case === 'map') unusedTokens = [...op.value.mapTokens];
      const s = await this.session(work.vmUuid, work.sessionGeneration);
      const range = op.$case === 'unmap' ? op.value.range : op.value.range;
      const r = range ? { gpa: range.gpa, length: range.length } : { gpa: 0n, length: 0n };
      switch (op.$case) {
        case 'map': {
          try {
            const out = await s.map(r, op.value.mapTokens, { signal: ac.signal, ...(this.opts.mapRetryDelayMs !== undefined ? { retryDelayMs: this.opts.mapRetryDelayMs } : {}) });
            unusedTokens = out.unusedTokens;
            emit({ workId: work.workId, final: true, result: { $case: 'mapped', value: { regions: out.regions.map(toRange) } }, unusedMapTokens: unusedTokens.map((t) => Buffer.from(t)) });
          } catch (e) {
            unusedTokens = (e as { unusedTokens?: Uint8Array[] }).unusedTokens ?? [];
            throw e;
          }
          return;
        }
        case 'read': {
          const step = BigInt(this.opts.readChunkBytes ?? 1 << 20);
          s.segments(r); // the whole range must be mapped before anything is sent
          for (let g = r.gpa; g < r.gpa + r.length; g += step) {
            const len = r.gpa + r.length - g < step ? r.gpa + r.length - g : step;
            const last = g + len >= r.gpa + r.length;
            emit({ workId: work.workId, final: last, result: { $case: 'read', value: { gpa: g, data: s.read({ gpa: g, length: len }) } }, unusedMapTokens: [] });
          }
          if (r.length === 0n) emit({ workId: work.workId, final: true, result: { $case: 'read', value: { gpa: r.gpa, data: Buffer.alloc(0) } }, unusedMapTokens: [] });
          return;
        }
        case 'hash': {
          if (op.value.algorithm !== HashAlgorithm.HASH_ALGORITHM_SHA256 && op.value.algorithm !== HashAlgorithm.HASH_ALGORITHM_UNSPECIFIED) {
            throw new GuestAgentError('invalid-argument', `unsupported hash algorithm ${op.value.algorithm}`);
          }
          const chunk = op.value.chunkSize === 0n ? 4096 : Number(op.value.chunkSize);
          let pending: MemoryWorkResult | undefined;
          const packed = (p: PackedDigests): HashResult => ({ hashes: [], firstGpa: p.gpa, chunkSize: BigInt(p.chunkSize), lastChunkLength: BigInt(p.lastLength), digests: p.digests });
          await s.hashPacked(r, chunk, (batch) => {
            if (pending) emit(pending);
            pending = { workId: work.workId, final: false, result: { $case: 'hash', value: packed(batch) }, unusedMapTokens: [] };
          }, { signal: ac.signal, batch: 4096 });
          emit(pending ? { ...pending, final: true } : { workId: work.workId, final: true, result: { $case: 'hash', value: packed({ gpa: r.gpa, chunkSize: chunk, lastLength: 0, digests: Buffer.alloc(0) }) }, unusedMapTokens: [] });
          return;
        }
        case 'scan': {
          const max = op.value.maxMatches === 0 ? 1024 : op.value.maxMatches;
          const sig = { bytes: op.value.signature, mask: op.value.mask };
          // Progress: one partial result per 16 MiB scanned; a match may straddle two steps.
          const STEP = 16n << 20n;
          const overlap = BigInt(Math.max(0, sig.bytes.length - 1));
          const end = r.gpa + r.length;
          s.segments(r); // the whole range must be mapped
          let found = 0;
          for (let g = r.gpa; ; g += STEP) {
            const stepEnd = g + STEP < end ? g + STEP : end;
            const stop = stepEnd + overlap < end ? stepEnd + overlap : end;
            const res = stop > g ? s.scan({ gpa: g, length: stop - g }, sig, max - found) : { matches: [] };
            const mine = res.matches.filter((m) => m < stepEnd);
            found += mine.length;
            const truncated = found >= max;
            const last = stepEnd >= end || truncated;
            emit({ workId: work.workId, final: last, result: { $case: 'scan', value: { matches: mine, bytesScanned: stepEnd - r.gpa, truncated } }, unusedMapTokens: [] });
            if (last) return;
            await new Promise<void>((res2) => setImmediate(res2));
            if (ac.signal.aborted) throw ac.signal.reason instanceof Error ? ac.signal.reason : new GuestAgentError('cancelled', 'cancelled');
          }
        }
        case 'unmap': {
          const regions = await s.unmap(r.length === 0n ? undefined : r);
          emit({ workId: work.workId, final: true, result: { $case: 'unmapped', value: { regions: regions.map(toRange) } }, unusedMapTokens: [] });
          return;
        }
      }
    } catch (e) {
      const err = ac.signal.aborted && ac.signal.reason instanceof GuestAgentError ? ac.signal.reason : e;
      const me = memoryErrorOf(err);
      emit({ workId: work.workId, final: true, result: { $case: 'error', value: me }, unusedMapTokens: unusedTokens.map((t) => Buffer.from(t)) });
    } finally {
      clearTimeout(timer);
      this.inFlight.delete(work.workId);
    }
  }

  private async closeIdle(idleMs: number): Promise<void> {
    const now = Date.now();
    for (const [key, p] of this.sessions) {
      const s = await p.catch(() => undefined);
      if (s && !s.closed && now - s.lastUsed > idleMs && !this.chains.has(key)) {
        this.sessions.delete(key);
        this.opts.log?.('info', 'closing an idle VM session', { vm: key, pages: s.mappedPages });
        await s.close();
      }
    }
  }

  /** Close every session (the client vanished, or shutdown): everything is unmapped. */
  async closeAll(): Promise<void> {
    for (const ac of this.inFlight.values()) ac.abort(new GuestAgentError('cancelled', 'the client went away'));
    const all = [...this.sessions.values()];
    this.sessions.clear();
    for (const p of all) {
      const s = await p.catch(() => undefined);
      await s?.close();
    }
  }

  async stop(): Promise<void> {
    clearInterval(this.idleTimer);
    await this.closeAll();
  }
}
