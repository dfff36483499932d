/**
 * Guest memory for analysis's modules, by one of two paths (issue #10):
 *
 * - **guest agent**: the VM's host runs a guest agent (its `GuestAgentHello.host_id`); the work goes to it
 *   over `GuestMemoryService` (`GuestMemoryHub`), and every map token is a KVMI `GET_MAP_TOKEN` relayed
 *   through the VM's host agent (`KvmiCommand.get_map_token` on the agent link). Pages stay mapped (warm)
 *   between calls; a range the agent no longer has (it reconnected, a scan unmapped it) is mapped again.
 * - **VM_READ_PHYSICAL** through the host agent, one ≤ 4 KiB command per page, hashed and scanned here:
 *   when the host has no guest agent, the agent cannot map (no /dev/kvmmem), or the host lacks
 *   `GET_MAP_TOKEN` (a pure v12 kernel: the VM does not allow the command, or the agent answers
 *   UNSUPPORTED). The reason is kept and shown (`MemoryRouter.choose`).
 */
import { createHash } from 'node:crypto';
import { CommandStatus, KvmmemAbi, MemoryErrorCode, uuidToBytes } from '@periscope/contracts';
import { GuestMemoryHub, GuestMemoryWorkError, scanSegments, type GuestAgentLink, type Signature, type TokenSource, type VmRef } from '@periscope/guest-agent';
import { CommandError, type LiveVm } from '../link.js';

export const PAGE = 0x1000n;
const PAGE_N = 4096;

/** A guest-physical range (bigint: never a JS number). */
export interface MemRange {
  readonly gpa: bigint;
  readonly length: bigint;
}

export type AccessPath = 'guest-agent' | 'read-physical';

export interface ScanProgress {
  readonly bytesScanned: bigint;
  /** Matches found since the previous progress report. */
  readonly matches: readonly bigint[];
}

export interface ScanOutcome {
  matches: bigint[];
  truncated: boolean;
  bytesScanned: bigint;
}

/** One way to reach a VM's memory. */
export interface MemoryAccess {
  readonly path: AccessPath;
  /** Who serves it: `guest agent AGENT (ABI v2, host H)` or `VM_READ_PHYSICAL via host agent H`. */
  readonly detail: string;
  /** SHA-256 of every 4 KiB page of a page-aligned range, in order. */
  hashPages(range: MemRange): Promise<Buffer[]>;
  read(range: MemRange): Promise<Buffer>;
  scan(range: MemRange, sig: Signature, opts?: { maxMatches?: number; onProgress?: (p: ScanProgress) => void }): Promise<ScanOutcome>;
  /** Give back what `hashPages`/`read`/`scan` mapped for this range (guest agent; no-op otherwise). */
  release(range?: MemRange): Promise<void>;
}

export type MemoryErrorKind = 'host-lacks-get-map-token' | 'no-read-physical' | 'not-attached';

/** Typed error of this layer (`kind`); guest-agent work errors stay `GuestMemoryWorkError`. */
export class MemoryAccessError extends Error {
  override readonly name = 'MemoryAccessError';
  constructor(readonly kind: MemoryErrorKind, message: string) {
    super(message);
  }
}

export const HOST_LACKS_GET_MAP_TOKEN = 'host lacks GET_MAP_TOKEN';

const sha = (b: Uint8Array): Buffer => createHash('sha256').update(b).digest();

function vmRefOf(vm: LiveVm): VmRef {
  return { uuid: uuidToBytes(vm.uuid), generation: vm.generation };
}

/** Pages of [gpa, gpa+length) clipped to 4 KiB boundaries: [{gpa, length ≤ 4096}]. */
function pieces(range: MemRange): { gpa: bigint; size: number }[] {
  const out: { gpa: bigint; size: number }[] = [];
  let g = range.gpa;
  const end = range.gpa + range.length;
  while (g < end) {
    const pageEnd = (g & ~(PAGE - 1n)) + PAGE;
    const stop = pageEnd < end ? pageEnd : end;
    out.push({ gpa: g, size: Number(stop - g) });
    g = stop;
  }
  return out;
}

async function pool<T, R>(items: readonly T[], width: number, fn: (t: T, i: number) => Promise<R>): Promise<R[]> {
  const out = new Array<R>(items.length);
  let next = 0;
  const worker = async (): Promise<void> => {
    for (;;) {
      const i = next++;
      if (i >= items.length) return;
      out[i] = await fn(items[i]!, i);
    }
  };
  await Promise.all(Array.from({ length: Math.min(width, items.length) }, worker));
  return out;
}

/** VM_READ_PHYSICAL through the VM's host agent, one command per (piece of a) page. */
export class ReadPhysicalAccess implements MemoryAccess {
  readonly path = 'read-physical' as const;
  readonly detail: string;
  /** Commands in flight at once (each is one KVMI round trip on the VM's socket). */
  width = 8;

  constructor(private readonly vm: LiveVm, readonly reason: string) {
    this.detail = `VM_READ_PHYSICAL via host agent ${vm.hostId}${reason ? ` (${reason})` : ''}`;
    if (!vm.allowedCommands.includes('VM_READ_PHYSICAL')) throw new MemoryAccessError('no-read-physical', `VM ${vm.name} does not allow VM_READ_PHYSICAL${reason ? ` and ${reason}` : ''}: its memory cannot be read`);
  }

  private async readPiece(gpa: bigint, size: number): Promise<Buffer> {
    const r = await this.vm.session.command(this.vm, 0, { $case: 'readPhysical', value: { gpa, size } }, 'memory: read physical');
    if (r.result?.$case !== 'readPhysical') throw new MemoryAccessError('no-read-physical', 'VM_READ_PHYSICAL returned no data');
    return Buffer.from(r.result.value.data);
  }

  async read(range: MemRange): Promise<Buffer> {
    const parts = await pool(pieces(range), this.width, (p) => this.readPiece(p.gpa, p.size));
    return Buffer.concat(parts);
  }

  async hashPages(range: MemRange): Promise<Buffer[]> {
    return pool(pieces(range), this.width, async (p) => sha(await this.readPiece(p.gpa, p.size)));
  }

  async scan(range: MemRange, sig: Signature, opts: { maxMatches?: number; onProgress?: (p: ScanProgress) => void } = {}): Promise<ScanOutcome> {
    const max = opts.maxMatches && opts.maxMatches > 0 ? opts.maxMatches : 10_000;
    const chunk = 64n * PAGE;
    const out: ScanOutcome = { matches: [], truncated: false, bytesScanned: 0n };
    // A match may straddle two chunks: the last (n − 1) bytes of a chunk lead the next one (a match that
    // starts there ends past the previous chunk, so none is found twice).
    let carry = Buffer.alloc(0);
    for (let at = range.gpa; at < range.gpa + range.length; at += chunk) {
      const len = range.gpa + range.length - at < chunk ? range.gpa + range.length - at : chunk;
      const bytes = await this.read({ gpa: at, length: len });
      const view = carry.length ? Buffer.concat([carry, bytes]) : bytes;
      const found = scanSegments([{ gpa: at - BigInt(carry.length), view }], sig, max - out.matches.length);
      out.matches.push(...found.matches);
      out.bytesScanned += len;
      opts.onProgress?.({ bytesScanned: out.bytesScanned, matches: found.matches });
      if (found.truncated || out.matches.length >= max) {
        out.truncated = true;
        break;
      }
      carry = Buffer.from(view.subarray(Math.max(0, view.length - (sig.bytes.length - 1))));
    }
    return out;
  }

  async release(): Promise<void> {
    /* nothing is mapped */
  }
}

/** The VM's host's guest agent; tokens from GET_MAP_TOKEN through the VM's host agent. */
export class GuestAgentAccess implements MemoryAccess {
  readonly path = 'guest-agent' as const;
  readonly detail: string;
  private readonly ref: VmRef;
  /** Tokens fetched through the host agent (tests, status). */
  tokensFetched = 0;

  constructor(private readonly vm: LiveVm, readonly link: GuestAgentLink) {
    this.ref = vmRefOf(vm);
    this.detail = `guest agent ${link.hello.agentId || '?'} (ABI v${link.abi ?? '?'}${link.hello.simulated ? ', simulated /dev/kvmmem' : ''}) on host ${link.hostId}`;
  }

  /** GET_MAP_TOKEN through the VM's host agent; an UNSUPPORTED answer means the host lacks the command. */
  readonly tokens: TokenSource = async (count) => {
    const one = async (): Promise<Uint8Array> => {
      const r = await this.vm.session.command(this.vm, 0, { $case: 'getMapToken', value: {} }, 'memory: map token');
      if (r.result?.$case !== 'getMapToken' || r.result.value.token.length !== 32) throw new Error('GET_MAP_TOKEN returned no 32-byte token');
      this.tokensFetched++;
      return new Uint8Array(r.result.value.token);
    };
    const settled = await Promise.allSettled(Array.from({ length: count }, one));
    const got = settled.flatMap((s) => (s.status === 'fulfilled' ? [s.value] : []));
    const failed = settled.find((s): s is PromiseRejectedResult => s.status === 'rejected');
    if (failed && got.length === 0) {
      const e = failed.reason as unknown;
      if (e instanceof CommandError && e.result.status === CommandStatus.COMMAND_STATUS_UNSUPPORTED) throw new MemoryAccessError('host-lacks-get-map-token', `${HOST_LACKS_GET_MAP_TOKEN}: ${e.message}`);
      throw e;
    }
    return got; // e.g. EAGAIN after some: the hub goes on with what it has
  };

  /** Map (idempotent: an already mapped range needs no token), run, and map again once if the agent lost it. */
  private async mapped<T>(range: MemRange, fn: () => Promise<T>): Promise<T> {
    await this.link.map(this.ref, range, this.tokens);
    try {
      return await fn();
    } catch (e) {
      if (!(e instanceof GuestMemoryWorkError) || e.code !== MemoryErrorCode.MEMORY_ERROR_CODE_NOT_MAPPED) throw e;
      await this.link.map(this.ref, range, this.tokens);
      return fn();
    }
  }

  hashPages(range: MemRange): Promise<Buffer[]> {
    return this.mapped(range, async () => {
      const packed = await this.link.hashPacked(this.ref, range, { chunkSize: PAGE_N });
      const out: Buffer[] = [];
      for (const p of packed) for (let i = 0; i < p.digests.length; i += 32) out.push(Buffer.from(p.digests.subarray(i, i + 32)));
      return out;
    });
  }

  read(range: MemRange): Promise<Buffer> {
    return this.mapped(range, () => this.link.read(this.ref, range));
  }

  scan(range: MemRange, sig: Signature, opts: { maxMatches?: number; onProgress?: (p: ScanProgress) => void } = {}): Promise<ScanOutcome> {
    return this.mapped(range, () =>
      this.link.scan(this.ref, range, sig.bytes, sig.mask, {
        ...(opts.maxMatches ? { maxMatches: opts.maxMatches } : {}),
        onPartial: (r) => {
          if (r.result?.$case === 'scan') opts.onProgress?.({ bytesScanned: r.result.value.bytesScanned, matches: r.result.value.matches });
        },
      }),
    );
  }

  async release(range?: MemRange): Promise<void> {
    if (this.link.closed) return;
    await this.link.unmap(this.ref, range);
  }

  /** Close the VM's session on the agent (everything unmapped). */
  async close(): Promise<void> {
    if (!this.link.closed) await this.link.closeVm(this.ref).catch(() => undefined);
  }
}

export interface Choice {
  readonly access: MemoryAccess;
  /** Why the read path was chosen (empty for the guest agent). */
  readonly fallbackReason: string;
}

/** Routes a VM's memory work to the guest agent of its host, or to VM_READ_PHYSICAL with the reason. */
export class MemoryRouter {
  readonly hub = new GuestMemoryHub();
  /** Hosts whose kernel refused GET_MAP_TOKEN (by VM uuid + generation): no token is asked again. */
  private readonly lacksToken = new Set<string>();

  /** Why this VM cannot use the guest agent, or '' when it can. */
  guestAgentBlocker(vm: LiveVm): { reason: string; link?: GuestAgentLink } {
    const link = this.hub.agentFor(vm.hostId);
    if (!link || link.closed) return { reason: `no guest agent on host ${vm.hostId}` };
    if (link.hello.abi === KvmmemAbi.KVMMEM_ABI_NONE || link.abi === undefined) return { reason: `the guest agent of host ${vm.hostId} has no usable /dev/kvmmem` };
    if (!vm.allowedCommands.includes('VM_GET_MAP_TOKEN') || this.lacksToken.has(`${vm.uuid}:${vm.generation}`)) return { reason: HOST_LACKS_GET_MAP_TOKEN };
    return { reason: '', link };
  }

  /** The path to use now: the guest agent when it can serve the VM, else VM_READ_PHYSICAL (with the reason). */
  choose(vm: LiveVm): Choice {
    const b = this.guestAgentBlocker(vm);
    if (b.link) return { access: new GuestAgentAccess(vm, b.link), fallbackReason: '' };
    return { access: new ReadPhysicalAccess(vm, b.reason), fallbackReason: b.reason };
  }

  /**
   * Run `fn` on the chosen path; if the guest agent path fails because the host lacks GET_MAP_TOKEN or the
   * agent cannot map, run it again on VM_READ_PHYSICAL. `onFallback` hears the reason.
   */
  async run<T>(vm: LiveVm, fn: (a: MemoryAccess) => Promise<T>, onFallback?: (reason: string) => void): Promise<{ value: T; access: MemoryAccess; fallbackReason: string }> {
    const c = this.choose(vm);
    if (c.access.path === 'read-physical') return { value: await fn(c.access), access: c.access, fallbackReason: c.fallbackReason };
    try {
      return { value: await fn(c.access), access: c.access, fallbackReason: '' };
    } catch (e) {
      const reason = this.fallbackReasonOf(vm, e);
      if (!reason) throw e;
      onFallback?.(reason);
      const rp = new ReadPhysicalAccess(vm, reason);
      return { value: await fn(rp), access: rp, fallbackReason: reason };
    }
  }

  /** A guest-agent failure that the read path can stand in for (and remember it), or ''. */
  fallbackReasonOf(vm: LiveVm, e: unknown): string {
    if (e instanceof MemoryAccessError && e.kind === 'host-lacks-get-map-token') {
      this.lacksToken.add(`${vm.uuid}:${vm.generation}`);
      return HOST_LACKS_GET_MAP_TOKEN;
    }
    if (e instanceof GuestMemoryWorkError && e.code === MemoryErrorCode.MEMORY_ERROR_CODE_KVMMEM_UNAVAILABLE) return `the guest agent of host ${vm.hostId} cannot map: ${e.message}`;
    if (e instanceof Error && /^guest agent .* (is gone|disconnected)/.test(e.message)) return `the guest agent of host ${vm.hostId} went away`;
    return '';
  }

  stop(): void {
    this.hub.disconnectAll();
  }
}
