/**
 * The host agent's Heki sink (issue #11, docs/heki.md): a gRPC `HekiSinkService` on a Unix socket
 * (`--heki-listen`) that VMMs call with the Heki `KVM_RUN` exits of their VMs.
 *
 * - **RegisterVm**: the VM's uuid, the reasons its VMM enabled with `KVM_ENABLE_CAP`, and whether the
 *   host has Heki at all (only a successful ENABLE_CAP proves it). Answers the denial deadline and the
 *   default completion, from local policy.
 * - **ReportConfigureExit**: the pin is already in effect (KVM forces RAX = 0): acknowledged at once,
 *   never waiting for anything; the bits are ORed into the VM's Heki state (two pins → their union).
 * - **ReportDenialExit**: the completion from local policy (default: INJECT_GP, i.e. re-enter and KVM
 *   injects #GP(0); option STOP_VM). An optional asynchronous decider (e.g. ask central) gets a deadline
 *   and the policy's default applies when it is late, fails or abstains — as for KVMI events.
 *
 * Malformed requests get `INVALID_ARGUMENT` with a message naming the field; reports for a VM that is not
 * registered get `FAILED_PRECONDITION` (the VMM registers again and retries).
 *
 * Everything the sink learns is also emitted (`registered`, `configure`, `denial`): the analysis link
 * forwards it upstream; the sink itself never talks to central on a VMM's critical path.
 */
import { EventEmitter } from 'node:events';
import { chmodSync, chownSync, existsSync, statSync, unlinkSync } from 'node:fs';
import { randomUUID } from 'node:crypto';
import {
  Server,
  ServerCredentials,
  status,
  type sendUnaryData,
  type ServerUnaryCall,
  type ServiceError,
} from '@grpc/grpc-js';
import {
  DenialCompletion,
  HekiReason,
  HekiSinkServiceService,
  type HekiSinkServiceServer,
  type RegisterVmRequest,
  type RegisterVmResponse,
  type ReportConfigureExitRequest,
  type ReportConfigureExitResponse,
  type ReportDenialExitRequest,
  type ReportDenialExitResponse,
} from '@periscope/contracts';
import { uuidToText } from '@periscope/kvmi';

import type { Log } from '../kvmi-listener.js';
import type { Counter, Registry } from '../metrics.js';

/** CR0.WP: every CR0 pin contains it (KVM refuses CR0 pins without it). */
const CR0_WP = 1n << 16n;
/** `cr4_pinned_mask`: SMEP, SMAP, UMIP, FSGSBASE, CET. */
const CR4_PINNABLE = (1n << 20n) | (1n << 21n) | (1n << 11n) | (1n << 16n) | (1n << 23n);
const U64_MAX = (1n << 64n) - 1n;
/** Most VMs whose Heki state the sink keeps (least recently registered evicted first). */
export const MAX_HEKI_VMS = 4096;

export type HekiDenialAction = 'reenter' | 'stop';

export interface HekiPolicy {
  /** Completion of a denial (default `reenter`: KVM injects #GP(0)). */
  denial: HekiDenialAction;
  /** What the VMM may wait for a denial answer (RegisterVmResponse.denial_timeout_ms). Default 50 ms. */
  vmmTimeoutMs: number;
  /** Deadline of the optional `decideDenial` hook (ask central); then `denial` applies. Default 5 ms. */
  decisionDeadlineMs: number;
}

export const DEFAULT_HEKI_POLICY: HekiPolicy = Object.freeze({ denial: 'reenter', vmmTimeoutMs: 50, decisionDeadlineMs: 5 });

export type HekiCr = 'CR0' | 'CR4';

/** What the agent knows about one VM's Heki. */
export interface HekiVmState {
  uuid: string;
  name: string;
  /** False: ENABLE_CAP failed — "Heki unavailable on host", not "guest did not pin". */
  hostHasHeki: boolean;
  configureReasons: HekiCr[];
  denialReasons: HekiCr[];
  qemuStartTimeMs: bigint;
  registeredAtMs: number;
  /** Union of every configure exit's bits. */
  pinnedCr0: bigint;
  pinnedCr4: bigint;
  firstPinAtMs?: number;
  lastPinAtMs?: number;
  configureExits: number;
  denials: number;
  stops: number;
  lastDenial?: HekiDenialRecord;
  /** `heki-unavailable` (host), `not-pinned` (yet), `pinned`, or `stopped` (a denial stopped it). */
  status: 'heki-unavailable' | 'not-pinned' | 'pinned' | 'stopped';
}

export interface HekiConfigureRecord {
  uuid: string;
  vcpu: number;
  cr: HekiCr;
  /** Bits pinned by this call. */
  bits: bigint;
  rip: bigint;
  exitUnixNs: bigint;
  /** The VM's pins after the union. */
  pinnedCr0: bigint;
  pinnedCr4: bigint;
}

export interface HekiDenialRecord {
  uuid: string;
  vcpu: number;
  cr: HekiCr;
  attemptedValue: bigint;
  rip: bigint;
  exitUnixNs: bigint;
  /** The pinned bits the write would have cleared (by the agent's view of the pins). */
  clearedPins: bigint;
  completion: HekiDenialAction;
  /** Who decided: the local policy, the decider, or the default after its deadline / failure. */
  decidedBy: 'policy' | 'decider' | 'default';
  detectionId: string;
}

/** The sink's events: the interface the analysis link (or anything else) subscribes to. */
export interface HekiSinkEvents {
  registered: [vm: HekiVmState];
  configure: [exit: HekiConfigureRecord, vm: HekiVmState];
  denial: [exit: HekiDenialRecord, vm: HekiVmState];
}

/** An asynchronous verdict source for denials (e.g. ask central); undefined = abstain. */
export type DenialDecider = (exit: Omit<HekiDenialRecord, 'completion' | 'decidedBy' | 'detectionId'>, vm: HekiVmState) => Promise<HekiDenialAction | undefined>;

export interface HekiSinkOptions {
  /** Unix socket path (or `unix:PATH`). */
  path: string;
  policy?: Partial<HekiPolicy>;
  decideDenial?: DenialDecider;
  log?: Log;
  registry?: Registry;
  socketGid?: number;
}

export class HekiSinkError extends Error {
  constructor(
    readonly code: 'bad-socket-dir' | 'socket-in-use' | 'listen-failed',
    message: string,
  ) {
    super(message);
    this.name = 'HekiSinkError';
  }
}

/** A request the sink refuses: the gRPC status and a message naming the field. */
class Refusal extends Error {
  constructor(
    readonly grpcCode: status,
    message: string,
  ) {
    super(message);
  }
}

const CR_OF: Partial<Record<HekiReason, HekiCr>> = { [HekiReason.HEKI_REASON_CR0]: 'CR0', [HekiReason.HEKI_REASON_CR4]: 'CR4' };

export class HekiSink extends EventEmitter<HekiSinkEvents> {
  readonly path: string;
  readonly policy: HekiPolicy;
  private readonly states = new Map<string, HekiVmState>();
  private server: Server | null = null;
  private readonly m: { registrations: Counter; configure: Counter; denials: Counter; invalid: Counter } | null;

  constructor(private readonly opts: HekiSinkOptions) {
    super();
    this.path = opts.path.startsWith('unix:') ? opts.path.slice('unix:'.length).replace(/^\/\/(?=\/)/, '') : opts.path;
    this.policy = Object.freeze({ ...DEFAULT_HEKI_POLICY, ...(opts.policy ?? {}) });
    const r = opts.registry;
    if (r) {
      this.m = {
        registrations: r.counter('periscope_agent_heki_registrations_total', 'Heki VM registrations by VMMs, by host_has_heki'),
        configure: r.counter('periscope_agent_heki_configure_exits_total', 'Heki configure exits reported, by cr'),
        denials: r.counter('periscope_agent_heki_denials_total', 'Heki denial exits reported, by cr and completion'),
        invalid: r.counter('periscope_agent_heki_invalid_requests_total', 'Heki sink requests refused, by method and code'),
      };
      const g = r.gauge('periscope_agent_heki_vms', 'VMs registered with the Heki sink, by status');
      for (const st of ['pinned', 'not-pinned', 'heki-unavailable', 'stopped'] as const) g.track(() => this.countStatus(st), { status: st });
    } else this.m = null;
  }

  /** Every VM's Heki state (copies). */
  vms(): HekiVmState[] {
    return [...this.states.values()].map((s) => ({ ...s }));
  }

  /** One VM's Heki state by uuid text, or undefined. */
  vm(uuid: string): HekiVmState | undefined {
    const s = this.states.get(uuid);
    return s ? { ...s } : undefined;
  }

  async start(): Promise<void> {
    const path = this.path;
    const dir = path.slice(0, Math.max(0, path.lastIndexOf('/'))) || '/';
    let st;
    try {
      st = statSync(dir);
    } catch {
      throw new HekiSinkError('bad-socket-dir', `Heki socket directory ${dir} does not exist`);
    }
    if (!st.isDirectory()) throw new HekiSinkError('bad-socket-dir', `${dir} is not a directory`);
    if (existsSync(path)) {
      if (!statSync(path).isSocket()) throw new HekiSinkError('socket-in-use', `${path} exists and is not a socket`);
      unlinkSync(path); // stale, from a previous run
    }
    const server = new Server();
    const impl: HekiSinkServiceServer = {
      registerVm: (call, cb) => this.handle('RegisterVm', call, cb, (r) => this.registerVm(r)),
      reportConfigureExit: (call, cb) => this.handle('ReportConfigureExit', call, cb, (r) => this.configure(r)),
      reportDenialExit: (call, cb) => this.handle('ReportDenialExit', call, cb, (r) => this.denial(r)),
    };
    server.addService(HekiSinkServiceService, impl);
    await new Promise<void>((resolve, reject) => {
      server.bindAsync(`unix:${path}`, ServerCredentials.createInsecure(), (err) => {
        if (err) reject(new HekiSinkError('listen-failed', `cannot listen on ${path}: ${err.message}`));
        else resolve();
      });
    });
    chmodSync(path, 0o660);
    if (this.opts.socketGid !== undefined) chownSync(path, process.getuid?.() ?? 0, this.opts.socketGid);
    this.server = server;
    this.opts.log?.('info', 'Heki sink listening', { path, denial: this.policy.denial });
  }

  async stop(): Promise<void> {
    const s = this.server;
    this.server = null;
    if (!s) return;
    await new Promise<void>((resolve) => s.tryShutdown(() => resolve()));
    if (existsSync(this.path)) {
      try {
        unlinkSync(this.path);
      } catch {
        /* already gone */
      }
    }
  }

  // ---- handlers -------------------------------------------------------------------------------------

  private handle<Req, Res>(
    method: string,
    call: ServerUnaryCall<Req, Res>,
    cb: sendUnaryData<Res>,
    fn: (req: Req) => Res | Promise<Res>,
  ): void {
    let out: Res | Promise<Res>;
    try {
      out = fn(call.request);
    } catch (e) {
      return this.refuse(method, e, cb);
    }
    if (out instanceof Promise) out.then((r) => cb(null, r), (e: unknown) => this.refuse(method, e, cb));
    else cb(null, out);
  }

  private refuse<Res>(method: string, e: unknown, cb: sendUnaryData<Res>): void {
    if (e instanceof Refusal) {
      this.m?.invalid.inc({ method, code: status[e.grpcCode] ?? String(e.grpcCode) });
      this.opts.log?.('warn', `Heki ${method} refused: ${e.message}`);
      const err: Partial<ServiceError> = { code: e.grpcCode, details: e.message, message: e.message };
      cb(err as ServiceError, null);
      return;
    }
    this.opts.log?.('error', `Heki ${method} failed: ${(e as Error).message}`);
    cb({ code: status.INTERNAL, details: (e as Error).message } as ServiceError, null);
  }

  private registerVm(r: RegisterVmRequest): RegisterVmResponse {
    const uuid = uuidOf(r.vmUuid);
    if (r.vmName.length > 256) throw invalid(`vm_name: ${r.vmName.length} characters, at most 256`);
    const cfg = reasonList('configure_reasons', r.configureReasons);
    const den = reasonList('denial_reasons', r.denialReasons);
    if (!r.hostHasHeki && (cfg.length > 0 || den.length > 0)) {
      throw invalid('configure_reasons/denial_reasons: reasons cannot be enabled when host_has_heki is false (ENABLE_CAP failed)');
    }
    const old = this.states.get(uuid);
    // A new boot (a different QEMU start time) starts from no pins; a re-registration of the same boot
    // (an agent or VMM restart) keeps what is known.
    const sameBoot = old !== undefined && old.qemuStartTimeMs === r.qemuStartTimeMs;
    const s: HekiVmState = {
      uuid,
      name: r.vmName,
      hostHasHeki: r.hostHasHeki,
      configureReasons: cfg,
      denialReasons: den,
      qemuStartTimeMs: r.qemuStartTimeMs,
      registeredAtMs: Date.now(),
      pinnedCr0: sameBoot ? old.pinnedCr0 : 0n,
      pinnedCr4: sameBoot ? old.pinnedCr4 : 0n,
      ...(sameBoot && old.firstPinAtMs !== undefined ? { firstPinAtMs: old.firstPinAtMs } : {}),
      ...(sameBoot && old.lastPinAtMs !== undefined ? { lastPinAtMs: old.lastPinAtMs } : {}),
      configureExits: sameBoot ? old.configureExits : 0,
      denials: sameBoot ? old.denials : 0,
      stops: sameBoot ? old.stops : 0,
      status: 'not-pinned',
    };
    s.status = statusOf(s);
    // Bounded: a VMM registering ever new UUIDs must not grow the agent without limit. A host runs far
    // fewer VMs than this; the least recently registered state goes first (Map keeps insertion order).
    this.states.delete(uuid);
    if (this.states.size >= MAX_HEKI_VMS) {
      const oldest = this.states.keys().next().value;
      if (oldest !== undefined) this.states.delete(oldest);
      this.m?.invalid.inc({ method: 'RegisterVm', code: 'EVICTED_OLDEST' });
    }
    this.states.set(uuid, s);
    this.m?.registrations.inc({ host_has_heki: String(r.hostHasHeki) });
    this.opts.log?.('info', r.hostHasHeki ? 'Heki VM registered' : 'Heki VM registered: Heki unavailable on this host', { uuid, name: r.vmName, configure: cfg, denial: den });
    this.emit('registered', { ...s });
    return {
      denialTimeoutMs: this.policy.vmmTimeoutMs,
      defaultCompletion: this.policy.denial === 'stop' ? DenialCompletion.DENIAL_COMPLETION_STOP_VM : DenialCompletion.DENIAL_COMPLETION_INJECT_GP,
    };
  }

  private configure(r: ReportConfigureExitRequest): ReportConfigureExitResponse {
    const s = this.registeredState(r.vmUuid);
    const cr = crOf(r.reason);
    checkU64('cr_pinned', r.crPinned);
    checkU64('rip', r.rip);
    if (cr === 'CR0' && (r.crPinned & CR0_WP) === 0n) throw invalid(`cr_pinned: 0x${r.crPinned.toString(16)} is a CR0 pin without CR0.WP (bit 16); KVM refuses those`);
    if (cr === 'CR4' && (r.crPinned & ~CR4_PINNABLE) !== 0n) {
      throw invalid(`cr_pinned: 0x${r.crPinned.toString(16)} has CR4 bits that cannot be pinned (allowed: SMEP, SMAP, UMIP, FSGSBASE, CET = 0x${CR4_PINNABLE.toString(16)})`);
    }
    if (!s.hostHasHeki) throw new Refusal(status.FAILED_PRECONDITION, `VM ${s.uuid} was registered with host_has_heki = false: a configure exit cannot happen`);
    if (cr === 'CR0') s.pinnedCr0 |= r.crPinned;
    else s.pinnedCr4 |= r.crPinned;
    const now = Date.now();
    s.firstPinAtMs ??= now;
    s.lastPinAtMs = now;
    s.configureExits++;
    s.status = statusOf(s);
    this.m?.configure.inc({ cr });
    const rec: HekiConfigureRecord = { uuid: s.uuid, vcpu: r.vcpu, cr, bits: r.crPinned, rip: r.rip, exitUnixNs: r.exitUnixNs, pinnedCr0: s.pinnedCr0, pinnedCr4: s.pinnedCr4 };
    this.emit('configure', rec, { ...s });
    return {};
  }

  private async denial(r: ReportDenialExitRequest): Promise<ReportDenialExitResponse> {
    const s = this.registeredState(r.vmUuid);
    const cr = crOf(r.reason);
    checkU64('attempted_value', r.attemptedValue);
    checkU64('rip', r.rip);
    if (!s.hostHasHeki) throw new Refusal(status.FAILED_PRECONDITION, `VM ${s.uuid} was registered with host_has_heki = false: a denial exit cannot happen`);
    const pinned = cr === 'CR0' ? s.pinnedCr0 : s.pinnedCr4;
    const base = { uuid: s.uuid, vcpu: r.vcpu, cr, attemptedValue: r.attemptedValue, rip: r.rip, exitUnixNs: r.exitUnixNs, clearedPins: pinned & ~r.attemptedValue };
    let completion: HekiDenialAction = this.policy.denial;
    let decidedBy: HekiDenialRecord['decidedBy'] = 'policy';
    const decider = this.opts.decideDenial;
    if (decider) {
      const v = await withDeadline(decider(base, { ...s }), this.policy.decisionDeadlineMs);
      if (v === 'reenter' || v === 'stop') {
        completion = v;
        decidedBy = 'decider';
      } else decidedBy = 'default';
    }
    s.denials++;
    if (completion === 'stop') s.stops++;
    s.status = completion === 'stop' ? 'stopped' : statusOf(s);
    const rec: HekiDenialRecord = { ...base, completion, decidedBy, detectionId: randomUUID() };
    s.lastDenial = rec;
    this.m?.denials.inc({ cr, completion });
    this.opts.log?.('warn', 'Heki denial: a pinned CR bit was cleared', { uuid: s.uuid, vcpu: r.vcpu, cr, value: r.attemptedValue, completion });
    this.emit('denial', rec, { ...s });
    return {
      completion: completion === 'stop' ? DenialCompletion.DENIAL_COMPLETION_STOP_VM : DenialCompletion.DENIAL_COMPLETION_INJECT_GP,
      detectionId: rec.detectionId,
    };
  }

  private registeredState(raw: Buffer): HekiVmState {
    const uuid = uuidOf(raw);
    const s = this.states.get(uuid);
    if (!s) throw new Refusal(status.FAILED_PRECONDITION, `vm_uuid ${uuid} is not registered: call RegisterVm first`);
    return s;
  }

  private countStatus(st: HekiVmState['status']): number {
    let n = 0;
    for (const s of this.states.values()) if (s.status === st) n++;
    return n;
  }
}

function invalid(message: string): Refusal {
  return new Refusal(status.INVALID_ARGUMENT, message);
}

function uuidOf(b: Buffer): string {
  if (b.length !== 16) throw invalid(`vm_uuid: ${b.length} bytes, expected 16`);
  return uuidToText(b);
}

function crOf(reason: HekiReason): HekiCr {
  const cr = CR_OF[reason];
  if (!cr) throw invalid(`reason: ${String(reason)} is not HEKI_REASON_CR0 (1) or HEKI_REASON_CR4 (2)`);
  return cr;
}

function reasonList(field: string, list: readonly HekiReason[]): HekiCr[] {
  const out: HekiCr[] = [];
  for (const [i, r] of list.entries()) {
    const cr = CR_OF[r];
    if (!cr) throw invalid(`${field}[${i}]: ${String(r)} is not HEKI_REASON_CR0 (1) or HEKI_REASON_CR4 (2)`);
    if (out.includes(cr)) throw invalid(`${field}[${i}]: ${cr} is listed twice`);
    out.push(cr);
  }
  return out;
}

function checkU64(field: string, v: bigint): void {
  if (v < 0n || v > U64_MAX) throw invalid(`${field}: ${v} is not a u64`);
}

function statusOf(s: HekiVmState): HekiVmState['status'] {
  if (!s.hostHasHeki) return 'heki-unavailable';
  if (s.stops > 0) return 'stopped';
  return s.configureExits > 0 ? 'pinned' : 'not-pinned';
}

/** The decider's answer, or undefined when it is late or fails. */
async function withDeadline<T>(p: Promise<T>, ms: number): Promise<T | undefined> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([p.catch(() => undefined), new Promise<undefined>((r) => (timer = setTimeout(() => r(undefined), ms)))]);
  } finally {
    clearTimeout(timer);
  }
}
