/**
 * The analysis link, composed: the gRPC client, the report queue, ask-central holds, the detection
 * spool, commands, policy installs and pause control. `HostAgent` owns one when `--analysis` is set.
 *
 * The vCPU path touches it twice, both cheap: `onVerdict` (inside the decider, before the reply: fills a
 * per-vCPU report context, and for ask-central rules holds the event and sends it up at once) and
 * `onReplied` (after the reply was written: one push into the report queue). Everything else runs on
 * later turns of the event loop.
 */
import { randomUUID } from 'node:crypto';
import { join } from 'node:path';
import { structs, type VcpuEventView } from '@periscope/kvmi';
import {
  AgentCapability,
  CommandStatus,
  CpuMode,
  DefaultReason,
  DetachReason,
  EventDisposition,
  KvmiCommandKind,
  KvmiDialect,
  KvmiEventKind,
  LossReason,
  LossRecord,
  LostRecordType,
  PolicyInstallState,
  Severity,
  VerdictTier,
  uuidFromBytes,
  type Detection,
  type LinkRequest,
  type LinkResponse,
  type LocalPolicy,
  type PolicyStatus,
  type VerdictRecord,
} from '@periscope/contracts';
import {
  compilePolicy,
  parsePolicyText,
  policyFromProto,
  type ActionKind,
  type CompiledPolicy,
  type Policy,
  type Verdict,
} from '@periscope/verdicts';
import type { VmConnection, EventDecision } from '../vm-connection.js';
import { actionToProto, crMsrValues, eventFromFrame, kindOfEventId, EVENT_KEY_BY_ID } from './convert.js';
import { heldEventEncodable, writeHeldEventRequest, type HeldEventMeta } from './event-wire.js';
import { PbWriter } from './wire.js';
import { AgentLinkClient, type BackoffOptions, type LinkTls } from './client.js';
import { CommandExecutor, policyRefusal } from './command-executor.js';
import { HeldEventRegistry, type HeldEntry, type Resolution } from './held-events.js';
import { ReportQueue, type LinkVm, type PolicyRef } from './outbound-queue.js';
import { PauseStore } from './pause-store.js';
import { AnalysisWrites, type AnalysisEventKind } from './analysis-writes.js';
import { PlantedStore } from './planted-store.js';
import { DetectionSpool } from './spool.js';
import { readInstructionAt } from '../instruction-skip.js';

/** Bound on reading a detection's instruction bytes (two KVMI round trips in the normal case). */
const INSTRUCTION_READ_TIMEOUT_MS = 500;
/** CpuMode (proto) → KVMI's mode byte (8 = 64-bit, 4 = 32-bit, 2 = 16-bit). */
const CPU_MODE_BITS: Partial<Record<CpuMode, number>> = { [CpuMode.CPU_MODE_64_BIT]: 8, [CpuMode.CPU_MODE_32_BIT]: 4, [CpuMode.CPU_MODE_16_BIT]: 2 };

function withTimeout<T>(p: Promise<T>, ms: number): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`no instruction bytes within ${ms} ms`)), ms);
    p.then((v) => { clearTimeout(t); resolve(v); }, (e: unknown) => { clearTimeout(t); reject(e instanceof Error ? e : new Error(String(e))); });
  });
}
import { HekiUplink } from './heki-uplink.js';
import type { HekiSink } from '../heki/sink.js';

export const AGENT_VERSION = '0.1.0';

export interface LinkConfig {
  /** `host:port` of analysis. */
  address: string;
  tls?: LinkTls;
  /** Enabled `--allow-command` keys. */
  allowCommands?: readonly string[];
  /** Report queue capacity in records (default 65536). */
  reportQueueSize?: number;
  /** Records per batch message (default 512). */
  batchMax?: number;
  /** Detection spool bound in bytes (default 64 MiB). */
  spoolMaxBytes?: number;
  /**
   * Detections raised per VM and second at most (token bucket, a burst of one second's worth; default 1000;
   * 0 = unlimited). Beyond it a detection is counted, not raised — reported in a LossRecord (DETECTION,
   * RATE_LIMITED) — so a guest storming a denied write cannot turn the agent's event loop, disk and link into
   * its own, and stall the other VMs' replies. The event's verdict record is reported as always.
   */
  detectionRatePerVm?: number;
  /**
   * The same over all the host's VMs together (default 2000; 0 = unlimited): several VMs storming at once must
   * not add up to more than the agent can raise (about 3,600 a second with the spool on disk, docs/benchmarks.md).
   * Each VM keeps a floor of its own (`DETECTION_FLOOR_PER_VM` a second) outside the host budget, so one tenant
   * storming cannot use up the host's budget and silence another VM's detections.
   */
  detectionRatePerHost?: number;
  backoff?: Partial<BackoffOptions>;
  keepaliveMs?: number;
  /** Events held for central at once when the policy does not say (default 1024). */
  maxHeldEvents?: number;
}

export interface LinkRuntimeOptions {
  hostId: string;
  config: LinkConfig;
  /** Persistent state: `spool/` (detections) and `paused.json`. Undefined = in memory only. */
  stateDir: string | undefined;
  policies: PolicyHolder;
  vm(uuid: string): VmConnection | undefined;
  vms(): Iterable<VmConnection>;
  log: (level: 'info' | 'warn' | 'error', msg: string, fields?: Record<string, unknown>) => void;
  /** The Heki sink (`--heki-listen`): its state goes up the link (heki-uplink.ts). */
  heki?: HekiSink;
}

/** The active compiled policy; swapped atomically by installs. */
export class PolicyHolder {
  current: CompiledPolicy;
  private readonly refs = new WeakMap<CompiledPolicy, PolicyRef>();
  /**
   * Called after a swap (interception may have grown). The promise it returns settles once the new
   * interception is in effect on every attached VM; `applied` is that promise for the latest swap.
   */
  onSwap: ((compiled: CompiledPolicy) => void | Promise<unknown>) | undefined;
  /** Settles when the interception of the latest swap is applied (installs report ACTIVE after it). */
  applied: Promise<unknown> = Promise.resolve();
  /**
   * The agent's `--allow-command` keys, which `install` checks a pushed policy's actions against (set by the
   * link runtime). Empty: a pushed policy that injects, crashes or rewrites a CR/MSR value is refused.
   */
  allow: ReadonlySet<string> = new Set();

  constructor(policy: Policy | CompiledPolicy) {
    this.current = 'ruleIds' in policy ? policy : compilePolicy(policy);
  }

  ref(c: CompiledPolicy = this.current): PolicyRef {
    let r = this.refs.get(c);
    if (!r) this.refs.set(c, (r = { id: c.policy.id, version: BigInt(c.policy.version), ruleIds: c.ruleIds, exceptionIds: c.exceptionIds }));
    return r;
  }

  /**
   * Validate, compile and (if newer) activate a LocalPolicy pushed by analysis. Never throws. A policy with
   * an action the agent's allow-list does not enable (`inject` needs `inject-exception`, `crash` needs
   * `crash`, `rewrite` needs `set-registers`: `policyRefusal`, against `allow`) is REJECTED whole, naming the
   * key; the previous policy stays active.
   */
  install(lp: LocalPolicy): PolicyStatus {
    const active = this.current.policy;
    const status = (state: PolicyInstallState, error = ''): PolicyStatus => ({
      policyId: lp.policyId,
      version: lp.version,
      state,
      error,
      activeVersion: BigInt(this.current.policy.version),
    });
    let compiled: CompiledPolicy;
    try {
      let policy: Policy;
      if (lp.verdictsDocument !== '') {
        policy = parsePolicyText(lp.verdictsDocument, 'LocalPolicy.verdicts_document');
        if (policy.id !== lp.policyId || BigInt(policy.version) !== lp.version) {
          return status(PolicyInstallState.POLICY_INSTALL_STATE_REJECTED, `verdicts_document is ${policy.id} v${policy.version}, the install says ${lp.policyId} v${lp.version}`);
        }
      } else policy = policyFromProto(lp);
      if (policy.id === active.id && BigInt(policy.version) <= BigInt(active.version)) {
        return status(PolicyInstallState.POLICY_INSTALL_STATE_STALE, `version ${lp.version} is not newer than the active ${active.version}`);
      }
      compiled = compilePolicy(policy);
      const refused = policyRefusal(compiled, this.allow);
      if (refused) return status(PolicyInstallState.POLICY_INSTALL_STATE_REJECTED, refused);
    } catch (e) {
      const issues = (e as { issues?: { path: string; ruleId?: string | null; message: string }[] }).issues;
      return status(PolicyInstallState.POLICY_INSTALL_STATE_REJECTED, issues ? issues.map((i) => `${i.path}${i.ruleId ? ` (rule ${i.ruleId})` : ''}: ${i.message}`).join('; ') : (e as Error).message);
    }
    this.current = compiled;
    this.applied = Promise.resolve(this.onSwap?.(compiled)).catch(() => undefined);
    return status(PolicyInstallState.POLICY_INSTALL_STATE_ACTIVE);
  }
}

/** Per-vCPU report context: filled before the reply, consumed after it. Reused (no allocation). */
class ReportCtx {
  active = false;
  seq = 0;
  eventId = 0;
  ruleIndex = -1;
  exceptionIndex = -1;
  /** The matched rule's (or exception's, or the kind default's) action in the policy's words. */
  actionKind: ActionKind = 'allow';
  policy: PolicyRef | undefined;
  report = false;
  withEvent = false;
  severity = 0;
  tier = VerdictTier.VERDICT_TIER_LOCAL;
  reason = DefaultReason.DEFAULT_REASON_UNSPECIFIED;
  receivedMs = 0;
  frame: Buffer | null = null;
  ruleId = '';
}

interface VmLinkState {
  readonly link: LinkVm;
  readonly ctx: ReportCtx[];
  /** Detection token bucket (`detectionRatePerVm`). */
  tokens: number;
  tokensAtMs: number;
  /** This VM's floor outside the host budget (`DETECTION_FLOOR_PER_VM`). */
  readonly floor: { tokens: number; tokensAtMs: number };
}

/** Detections a second every VM may raise whatever the host-wide budget (still within its own). */
export const DETECTION_FLOOR_PER_VM = 10;

const SEVERITY_PROTO = [Severity.SEVERITY_UNSPECIFIED, Severity.SEVERITY_INFO, Severity.SEVERITY_LOW, Severity.SEVERITY_MEDIUM, Severity.SEVERITY_HIGH, Severity.SEVERITY_CRITICAL];
const NS_PER_MS = 1e6;
const HOLD: EventDecision = { kind: 'hold' };
const nowMs = (): number => performance.timeOrigin + performance.now();
const msToNs = (ms: number): bigint => BigInt(Math.floor(ms * NS_PER_MS));

function commandKinds(keys: readonly string[]): KvmiCommandKind[] {
  return keys
    .map((k) => KvmiCommandKind[`KVMI_COMMAND_KIND_${k === 'GET_MAP_TOKEN' ? 'VM_GET_MAP_TOKEN' : k}` as keyof typeof KvmiCommandKind])
    .filter((k): k is KvmiCommandKind => k !== undefined);
}

export class LinkRuntime {
  readonly client: AgentLinkClient;
  readonly queue: ReportQueue;
  readonly held: HeldEventRegistry;
  readonly spool: DetectionSpool;
  readonly pauses: PauseStore;
  /** Bytes analysis wrote (breakpoints), its single steps, their fail-open and persistence (analysis-writes.ts). */
  readonly writes: AnalysisWrites;
  readonly commands: CommandExecutor;
  readonly instanceId = randomUUID();
  /** Heki state up the link, analysis's per-VM denial completions down (with a Heki sink only). */
  readonly heki: HekiUplink | undefined;
  private readonly startedUnixNs = BigInt(Date.now()) * 1_000_000n;
  private readonly states = new WeakMap<VmConnection, VmLinkState>();
  private readonly allow: ReadonlySet<string>;
  private streamNo = 0;
  /** PolicyStatus answers in install order, each after its interception is applied. */
  private policyStatusChain: Promise<unknown> = Promise.resolve();
  private readonly pendingDetections: { vm: VmConnection; link: LinkVm; vcpu: number; ctx: ReportCtx; action: number; newVal: bigint | undefined; latencyNs: number; repliedMs: number }[] = [];
  private detectionsScheduled = false;
  private readonly heldWriter = new PbWriter(2048);
  private readonly heldMeta: HeldEventMeta = {
    streamSeq: 0,
    hostId: '',
    vmUuid: Buffer.alloc(0),
    sessionGeneration: 0,
    receivedUnixNs: 0,
    verdictDeadlineUnixNs: 0,
    disposition: EventDisposition.EVENT_DISPOSITION_HELD,
    ruleId: '',
    policyVersion: 0,
  };
  readonly stats = { verdictsLocal: 0, verdictsCentral: 0, verdictsDefault: 0, detections: 0, policyInstalls: 0, pauseControls: 0, detectionLossRecords: 0, detectionsRateLimited: 0 };
  /** Detections not raised (spool full, rate-limited) per VM session and reason, not yet reported in a LossRecord. */
  private readonly detectionsLost = new Map<string, { link: LinkVm; reason: LossReason; count: number; sinceMs: number }>();
  private lossesScheduled = false;
  private readonly detectionRate: number;
  private readonly hostDetectionRate: number;
  /** The host-wide detection token bucket (`detectionRatePerHost`). */
  private readonly hostTokens = { tokens: 0, tokensAtMs: 0 };

  constructor(private readonly opts: LinkRuntimeOptions) {
    const cfg = opts.config;
    this.allow = new Set(cfg.allowCommands ?? []);
    this.detectionRate = cfg.detectionRatePerVm ?? 1000;
    this.hostDetectionRate = cfg.detectionRatePerHost ?? 2000;
    this.hostTokens.tokens = this.hostDetectionRate;
    this.hostTokens.tokensAtMs = nowMs();
    opts.policies.allow = this.allow; // policies pushed by analysis are checked against the same list
    this.heldMeta.hostId = opts.hostId;
    this.queue = new ReportQueue({ capacity: cfg.reportQueueSize ?? 65536, maxBatch: cfg.batchMax ?? 512, hostId: opts.hostId });
    this.spool = new DetectionSpool(opts.stateDir ? join(opts.stateDir, 'spool') : undefined, cfg.spoolMaxBytes ?? 64 * 1024 * 1024, opts.log, () => this.sendSpool());
    this.pauses = new PauseStore(opts.stateDir);
    this.writes = new AnalysisWrites({ store: new PlantedStore(opts.stateDir), log: opts.log });
    this.commands = new CommandExecutor({ allow: this.allow, vm: opts.vm, onSinglestep: (vm, vcpu, on) => this.writes.singlestepSet(vm, vcpu, on) });
    this.held = new HeldEventRegistry({
      allowCrash: this.allow.has('crash'),
      allowSetRegisters: this.allow.has('set-registers'),
      log: opts.log,
      onResolve: (e, how) => this.onHeldResolved(e, how),
    });
    this.client = new AgentLinkClient({
      address: cfg.address,
      ...(cfg.tls ? { tls: cfg.tls } : {}),
      ...(cfg.backoff ? { backoff: cfg.backoff } : {}),
      ...(cfg.keepaliveMs !== undefined ? { keepaliveMs: cfg.keepaliveMs } : {}),
      log: opts.log,
      hello: () => this.hello(),
      onUp: () => this.onUp(),
      onDown: () => this.onDown(),
      onDrain: () => {
        this.sendSpool();
        this.queue.flush();
      },
      onResponse: (r) => this.onResponse(r),
    });
    this.queue.attach(this.client);
    this.heki = opts.heki ? new HekiUplink(opts.hostId, opts.heki, this.client, { allowStop: this.allow.has('crash'), log: opts.log }) : undefined;
  }

  start(): void {
    this.client.start();
  }

  stop(): void {
    this.held.releaseAll(DefaultReason.DEFAULT_REASON_CENTRAL_UNAVAILABLE);
    this.client.stop();
  }

  /** After the VMs detached (shutdown): complete detections still reading their instruction, write the spool. */
  async drain(): Promise<void> {
    await Promise.allSettled([...this.enriching]);
    await this.spool.settled();
    this.spool.flushSync();
  }

  // ---- the vCPU path -------------------------------------------------------------------------------

  private stateOf(vm: VmConnection): VmLinkState {
    let s = this.states.get(vm);
    if (!s) {
      const uuidBytes = Buffer.from(vm.uuid.replace(/-/g, ''), 'hex');
      s = { link: { uuid: vm.uuid, uuidBytes, generation: vm.info?.sessionGeneration ?? 0 }, ctx: [], tokens: this.detectionRate, tokensAtMs: nowMs(), floor: { tokens: DETECTION_FLOOR_PER_VM, tokensAtMs: nowMs() } };
      this.states.set(vm, s);
    }
    return s;
  }

  /**
   * Inside the decider, before the reply. Returns a decision to use instead of the verdict's own
   * (a hold for ask-central), or undefined.
   */
  onVerdict(vm: VmConnection, view: VcpuEventView, v: Verdict, compiled: CompiledPolicy): EventDecision | undefined {
    const st = this.stateOf(vm);
    let ctx = st.ctx[view.vcpu];
    if (!ctx) st.ctx[view.vcpu] = ctx = new ReportCtx();
    ctx.active = true;
    ctx.seq = view.seq;
    ctx.eventId = view.eventId;
    ctx.ruleIndex = v.ruleIndex;
    ctx.exceptionIndex = v.exceptionIndex;
    ctx.actionKind = v.kind;
    ctx.policy = this.opts.policies.ref(compiled);
    ctx.report = v.report;
    ctx.withEvent = v.reportEvent;
    ctx.severity = v.severity;
    ctx.ruleId = v.ruleId ?? '';
    const matched = v.ruleIndex >= 0 || v.exceptionIndex >= 0;
    ctx.tier = matched ? VerdictTier.VERDICT_TIER_LOCAL : VerdictTier.VERDICT_TIER_DEFAULT;
    ctx.reason = matched ? DefaultReason.DEFAULT_REASON_UNSPECIFIED : DefaultReason.DEFAULT_REASON_NO_RULE;
    ctx.receivedMs = nowMs();
    // A copy only when the frame is needed after the reply (the event reported, or a detection); the
    // held event is encoded from the view below, while it is valid.
    ctx.frame = v.reportEvent || v.severity > 0 ? Buffer.from(view.frame) : null;
    // Analysis's own breakpoints and single steps: held for analysis, answered here when it cannot (fail open).
    const own = this.writes.classify(vm, view, v.askCentral);
    if (own === 'foreign-breakpoint') return this.writes.localDecision(vm, view, own);
    const local = own ? this.writes.localDecision(vm, view, own) : undefined;
    if (!v.askCentral) return local;
    ctx.report = true; // held events always leave a verdict record
    ctx.tier = VerdictTier.VERDICT_TIER_DEFAULT;
    const plain = v.kind !== 'skip' && v.kind !== 'inject';
    const max = compiled.policy.maxHeldEvents ?? this.opts.config.maxHeldEvents ?? 1024;
    if (!this.client.up || !plain) {
      ctx.reason = DefaultReason.DEFAULT_REASON_CENTRAL_UNAVAILABLE;
      this.held.stats.unavailable++;
      return local;
    }
    if (this.held.size >= max) {
      ctx.reason = DefaultReason.DEFAULT_REASON_HOLD_LIMIT;
      this.held.stats.holdLimit++;
      return local;
    }
    if (!heldEventEncodable(view.eventId)) {
      ctx.reason = DefaultReason.DEFAULT_REASON_CENTRAL_UNAVAILABLE;
      this.held.stats.unavailable++;
      return local;
    }
    // Sent at once, never batched: the vCPU is waiting. Hand-encoded from the frame (event-wire.ts).
    const w = this.heldWriter;
    const meta = this.heldMeta;
    meta.streamSeq = this.client.seq();
    meta.vmUuid = st.link.uuidBytes;
    meta.sessionGeneration = st.link.generation;
    meta.receivedUnixNs = Math.floor(ctx.receivedMs * NS_PER_MS);
    meta.verdictDeadlineUnixNs = Math.floor((ctx.receivedMs + v.deadlineMs) * NS_PER_MS);
    meta.ruleId = ctx.ruleId;
    meta.policyVersion = Number(ctx.policy.version);
    writeHeldEventRequest(w, view.frame, view.eventId, view.specificOffset, meta);
    const newVal = v.hasNewVal ? (v.newVal ?? undefined) : undefined;
    this.held.hold({
      vm,
      vcpu: view.vcpu,
      seq: view.seq,
      eventId: view.eventId,
      defaultAction: v.action,
      defaultNewVal: newVal,
      values: crMsrValues(view),
      deadlineMs: v.deadlineMs,
      ...(own ? { failOpen: this.failOpenOf(vm, view, own) } : {}),
    });
    this.client.write(w.take());
    return v.ruleId ? { kind: 'hold', ruleId: v.ruleId } : HOLD;
  }

  /** The held event's fail-open (its default when analysis does not answer in time), read from the view now. */
  private failOpenOf(vm: VmConnection, view: VcpuEventView, kind: AnalysisEventKind): (reason: DefaultReason) => void {
    const at = { vcpu: view.vcpu, seq: view.seq, gpa: kind === 'planted-breakpoint' ? view.specificU64(structs.kvmi_vcpu_event_breakpoint, 'gpa') : 0n };
    return (reason) => this.writes.failOpenHeld(vm, at, kind, reason === DefaultReason.DEFAULT_REASON_DEADLINE ? 'verdict deadline passed' : 'analysis unavailable');
  }

  private onHeldResolved(e: HeldEntry, how: Resolution): void {
    const ctx = this.states.get(e.vm)?.ctx[e.vcpu];
    if (!ctx || !ctx.active || ctx.seq !== e.seq) return;
    ctx.tier = how.tier;
    ctx.reason = how.reason;
  }

  /** After a reply was written (the vCPU runs again). */
  onReplied(vm: VmConnection, vcpu: number, seq: number, _eventId: number, action: number, newVal: bigint | undefined, ns: bigint): void {
    const st = this.states.get(vm);
    const ctx = st?.ctx[vcpu];
    if (!st || !ctx || !ctx.active || ctx.seq !== seq) return;
    ctx.active = false;
    if (ctx.tier === VerdictTier.VERDICT_TIER_LOCAL) this.stats.verdictsLocal++;
    else if (ctx.tier === VerdictTier.VERDICT_TIER_CENTRAL) this.stats.verdictsCentral++;
    else this.stats.verdictsDefault++;
    const latencyNs = Number(ns);
    if (ctx.report) {
      let lo = 0;
      let hi = 0;
      if (newVal !== undefined) {
        lo = Number(newVal & 0xffffffffn);
        hi = Number(newVal >> 32n);
      }
      this.queue.push(st.link, vcpu, seq, ctx.eventId, ctx.tier, ctx.reason, action, newVal !== undefined, lo, hi, ctx.ruleIndex, ctx.exceptionIndex, ctx.policy!, latencyNs, ctx.receivedMs, ctx.withEvent ? ctx.frame : null);
    }
    if (ctx.severity > 0 && ctx.frame) {
      if (this.takeDetectionToken(st)) {
        const snap = Object.assign(new ReportCtx(), ctx);
        this.pendingDetections.push({ vm, link: st.link, vcpu, ctx: snap, action, newVal, latencyNs, repliedMs: nowMs() });
        if (!this.detectionsScheduled) {
          this.detectionsScheduled = true;
          setImmediate(() => this.raiseDetections());
        }
      } else {
        this.detectionLost(st.link, LossReason.LOSS_REASON_RATE_LIMITED);
        this.stats.detectionsRateLimited++;
        if (!this.lossesScheduled) {
          this.lossesScheduled = true;
          setImmediate(() => {
            this.lossesScheduled = false;
            this.sendSpool();
          });
        }
      }
    }
    ctx.frame = null;
  }

  // ---- detections ----------------------------------------------------------------------------------

  private raiseDetections(): void {
    this.detectionsScheduled = false;
    const list = this.pendingDetections.splice(0);
    for (const p of list) {
      const c = p.ctx;
      const pol = c.policy!;
      const key = EVENT_KEY_BY_ID.get(c.eventId) ?? String(c.eventId);
      const event = eventFromFrame(c.frame!, {
        hostId: this.opts.hostId,
        vmUuid: p.link.uuidBytes,
        sessionGeneration: BigInt(p.link.generation),
        receivedUnixNs: msToNs(c.receivedMs),
        repliedUnixNs: msToNs(p.repliedMs),
        disposition: EventDisposition.EVENT_DISPOSITION_ANSWERED,
        verdictDeadlineUnixNs: 0n,
        ruleId: c.ruleId,
        policyVersion: pol.version,
      });
      const verdict: VerdictRecord = {
        vmUuid: p.link.uuidBytes,
        sessionGeneration: BigInt(p.link.generation),
        vcpu: p.vcpu,
        seq: c.seq,
        kind: kindOfEventId(c.eventId),
        tier: c.tier,
        defaultReason: c.reason,
        action: actionToProto(p.action),
        replyValue: p.newVal,
        ruleId: c.ruleId,
        exceptionId: c.exceptionIndex >= 0 ? (pol.exceptionIds[c.exceptionIndex] ?? '') : '',
        policyVersion: pol.version,
        latencyNs: BigInt(p.latencyNs),
        repliedUnixNs: msToNs(p.repliedMs),
      };
      const attributes: Record<string, string> = { kind: key, action: ['CONTINUE', 'RETRY', 'CRASH'][p.action] ?? String(p.action) };
      // What the local policy decided, in its words (inject, crash, deny, …): analysis shows a module's local
      // response as applied only when the agent's active policy really had it (responses.ts).
      if (c.tier === VerdictTier.VERDICT_TIER_LOCAL) attributes['policy_action'] = c.actionKind;
      const pl = event.payload;
      if (pl?.$case === 'cr') Object.assign(attributes, { cr: String(pl.value.cr), old: hex(pl.value.oldValue), new: hex(pl.value.newValue) });
      else if (pl?.$case === 'msr') Object.assign(attributes, { msr: hex(BigInt(pl.value.msr)), old: hex(pl.value.oldValue), new: hex(pl.value.newValue) });
      else if (pl?.$case === 'pf') Object.assign(attributes, { gva: hex(pl.value.gva), gpa: hex(pl.value.gpa), access: String(pl.value.access) });
      if (p.newVal !== undefined) attributes['reply_value'] = hex(p.newVal);
      const d: Detection = {
        detectionId: randomUUID(),
        hostId: this.opts.hostId,
        vmUuid: p.link.uuidBytes,
        sessionGeneration: BigInt(p.link.generation),
        vcpu: p.vcpu,
        ruleId: c.ruleId,
        severity: SEVERITY_PROTO[c.severity] ?? Severity.SEVERITY_UNSPECIFIED,
        summary: `${c.ruleId}: ${key} on VM ${p.vm.info?.name || p.link.uuid} vCPU ${p.vcpu}, answered ${attributes['action']}`,
        eventSeqs: [c.seq],
        detectedUnixNs: msToNs(p.repliedMs),
        attributes,
        event,
        verdict,
        instructionBytes: Buffer.alloc(0),
        instructionText: '',
        policyId: pol.id,
        policyVersion: pol.version,
      };
      this.stats.detections++;
      const dropped = () => {
        this.opts.log('warn', 'detection spool full: detection dropped', { rule: c.ruleId, spoolBytes: this.spool.bytes });
        this.detectionLost(p.link);
        this.sendSpool();
      };
      // Evidence: the instruction at RIP, read after the reply (off the vCPU's stall path), bounded in time;
      // without it (VM gone, page unmapped, timeout) the detection is sent all the same. It is written to the
      // spool as it is raised (a kill -9 during the read leaves it on disk, without the instruction) and sent
      // once complete and on disk (spool.ts).
      const regs = event.regs;
      if (!regs || !event.sregs || p.vm.state === 'closed' || p.vm.state === 'detaching') {
        if (!this.spool.add(d)) dropped();
        continue;
      }
      const entry = this.spool.add(d, { ready: false });
      if (!entry) {
        dropped();
        continue;
      }
      const job = withTimeout(readInstructionAt(p.vm.session, p.vcpu, CPU_MODE_BITS[event.mode] ?? 8, regs.rip, event.sregs.cs?.base ?? 0n), INSTRUCTION_READ_TIMEOUT_MS)
        .then((insn) => {
          d.instructionBytes = Buffer.from(insn.bytes);
          d.instructionText = insn.text;
        }, (e: unknown) => {
          d.attributes['instruction_unavailable'] = e instanceof Error ? e.message : String(e);
        })
        .finally(() => {
          this.enriching.delete(job);
          this.spool.update(entry, d);
        });
      this.enriching.add(job);
    }
  }

  /** Detections waiting for their instruction bytes (drain() completes them before the spool is flushed). */
  private readonly enriching = new Set<Promise<void>>();

  /**
   * One token of the VM's detection budget, and of its floor or else the host's; false when spent (buckets
   * refilled at `detectionRatePerVm`, `DETECTION_FLOOR_PER_VM` and `detectionRatePerHost` a second).
   */
  private takeDetectionToken(st: VmLinkState): boolean {
    const now = nowMs();
    if (!refill(st, this.detectionRate, now)) return false;
    if (this.hostDetectionRate > 0) {
      if (refill(st.floor, DETECTION_FLOOR_PER_VM, now)) st.floor.tokens -= 1;
      else if (refill(this.hostTokens, this.hostDetectionRate, now)) this.hostTokens.tokens -= 1;
      else return false;
    }
    if (this.detectionRate > 0) st.tokens -= 1;
    return true;
  }

  /** A detection was not raised (spool full, or rate-limited): counted per VM session and reason, reported in a LossRecord (never silent). */
  private detectionLost(link: LinkVm, reason: LossReason = LossReason.LOSS_REASON_QUEUE_FULL): void {
    const key = `${link.uuid}/${link.generation}/${reason}`;
    const l = this.detectionsLost.get(key);
    if (l) l.count++;
    else this.detectionsLost.set(key, { link, reason, count: 1, sinceMs: nowMs() });
  }

  /**
   * One LossRecord (record type DETECTION; reason QUEUE_FULL — the spool is the detections' queue — or
   * RATE_LIMITED) per VM session and reason with detections not raised, before the spooled ones. Kept while the link is down (in memory: an
   * agent restart forgets the counts; `periscope_agent_detections_dropped_total` and the log keep them).
   */
  private sendDetectionLosses(): void {
    for (const [key, l] of this.detectionsLost) {
      if (!this.client.writable) return;
      this.client.send({
        $case: 'loss',
        value: LossRecord.fromPartial({
          vmUuid: l.link.uuidBytes, sessionGeneration: BigInt(l.link.generation), recordType: LostRecordType.LOST_RECORD_TYPE_DETECTION,
          reason: l.reason, droppedCount: BigInt(l.count), windowStartUnixNs: msToNs(l.sinceMs), windowEndUnixNs: msToNs(nowMs()),
        }),
      });
      this.detectionsLost.delete(key);
      this.stats.detectionLossRecords++;
    }
  }

  /** Send spooled detections not yet sent on this stream (after any detection loss records). */
  private sendSpool(): void {
    if (!this.client.up) return;
    this.sendDetectionLosses();
    for (const e of this.spool.unsent(this.streamNo)) {
      if (!this.client.writable) return;
      e.sentOnStream = this.streamNo;
      const seq = this.client.seq();
      // LinkRequest { stream_seq = 1; detection = 16 } around the spooled bytes.
      const head = Buffer.alloc(24);
      let o = 0;
      o = putVarint(head, o, 0x08);
      o = putVarint(head, o, seq);
      o = putVarint(head, o, (16 << 3) | 2);
      o = putVarint(head, o, e.bytes.length);
      this.client.write(Buffer.concat([head.subarray(0, o), e.bytes]));
      if (this.spool.stats.spooled + this.spool.stats.loaded > 0 && this.streamNo > 1) this.spool.stats.resent++;
    }
  }

  // ---- stream lifecycle ----------------------------------------------------------------------------

  private hello(): LinkRequest['message'] {
    const c = this.opts.policies.current.policy;
    return {
      $case: 'hello',
      value: {
        hostId: this.opts.hostId,
        agentVersion: AGENT_VERSION,
        agentInstanceId: this.instanceId,
        startedUnixNs: this.startedUnixNs,
        capabilities: [
          AgentCapability.AGENT_CAPABILITY_KVMI_V12,
          AgentCapability.AGENT_CAPABILITY_LOCAL_POLICY,
          AgentCapability.AGENT_CAPABILITY_ASK_CENTRAL,
          AgentCapability.AGENT_CAPABILITY_RESEND,
          ...(this.heki ? [AgentCapability.AGENT_CAPABILITY_HEKI_SINK] : []),
        ],
        activePolicyId: c.id,
        activePolicyVersion: BigInt(c.version),
      },
    };
  }

  private onUp(): void {
    this.streamNo++;
    for (const vm of this.opts.vms()) if (vm.info && !this.writes.recoveringVm(vm.uuid)) this.sendAttached(vm);
    this.heki?.onUp();
    this.sendSpool();
    this.queue.flush();
  }

  private onDown(): void {
    this.held.releaseAll(DefaultReason.DEFAULT_REASON_CENTRAL_UNAVAILABLE);
  }

  /** A VM attached (or re-attached): report it, re-apply a persisted pause. */
  vmAttached(vm: VmConnection): void {
    const st = this.stateOf(vm);
    (st.link as { generation: number }).generation = vm.info?.sessionGeneration ?? 0;
    vm.onReplied = (vcpu, seq, eventId, action, newVal, ns) => this.onReplied(vm, vcpu, seq, eventId, action, newVal, ns);
    // Bytes an earlier session (or a killed agent) left in the guest are restored before analysis hears of
    // the attach, so that it re-plants over the guest's own bytes.
    const recovery = this.writes.attach(vm);
    if (recovery) void recovery.then(() => { if (this.client.up && vm.info && !vm.session.isClosed) this.sendAttached(vm); });
    else if (this.client.up) this.sendAttached(vm);
    if (this.pauses.isPaused(vm.uuid)) {
      this.opts.log('info', 'VM re-attached while paused by analysis: pausing it again', { vm: vm.uuid });
      vm.pause().catch((e: unknown) => this.opts.log('warn', `re-applying the pause failed: ${(e as Error).message}`, { vm: vm.uuid }));
    }
  }

  vmDetached(vm: VmConnection, reason: string): void {
    const released = vm.heldCount;
    this.held.dropVm(vm);
    if (!vm.info || !this.client.up) return;
    const r = reason.includes('unhook') || reason === 'detached'
      ? DetachReason.DETACH_REASON_UNHOOK
      : reason.includes('shutting down')
        ? DetachReason.DETACH_REASON_AGENT_SHUTDOWN
        : DetachReason.DETACH_REASON_SOCKET_CLOSED;
    this.client.send({
      $case: 'vmDetached',
      value: {
        hostId: this.opts.hostId,
        vmUuid: this.stateOf(vm).link.uuidBytes,
        sessionGeneration: BigInt(vm.info.sessionGeneration),
        reason: r,
        detail: reason,
        detachedUnixNs: BigInt(Date.now()) * 1_000_000n,
        heldEventsReleased: released,
      },
    });
  }

  private sendAttached(vm: VmConnection): void {
    const i = vm.info!;
    this.client.send({
      $case: 'vmAttached',
      value: {
        hostId: this.opts.hostId,
        vmUuid: this.stateOf(vm).link.uuidBytes,
        sessionGeneration: BigInt(i.sessionGeneration),
        name: i.name,
        qemuStartTimeMs: BigInt(i.startTimeMs),
        vcpuCount: i.vcpuCount,
        maxGfn: i.gfnLimit.value !== null ? i.gfnLimit.value - 1n : undefined,
        dialect: KvmiDialect.KVMI_DIALECT_V12,
        kvmiVersion: { version: i.version, maxMsgSize: i.maxMsgSize, features: { singlestep: i.singlestep } },
        allowedCommands: commandKinds(i.allowedCommands),
        allowedEvents: i.allowedEvents
          .map((k) => KvmiEventKind[`KVMI_EVENT_KIND_${k}` as keyof typeof KvmiEventKind])
          .filter((k): k is KvmiEventKind => k !== undefined),
        attachedUnixNs: BigInt(Date.now()) * 1_000_000n,
      },
    });
  }

  // ---- analysis → agent ----------------------------------------------------------------------------

  private onResponse(r: LinkResponse): void {
    const m = r.message;
    if (!m) return;
    switch (m.$case) {
      case 'verdict':
        this.held.verdict(m.value);
        return;
      case 'command': {
        const cmd = m.value;
        let uuid = '';
        try {
          uuid = uuidFromBytes(cmd.vmUuid);
        } catch {
          /* answered as not attached */
        }
        this.commands
          .execute(cmd, uuid)
          .then((result) => this.client.send({ $case: 'commandResult', value: result }))
          .catch((e: unknown) => this.opts.log('error', `command failed: ${(e as Error).message}`));
        return;
      }
      case 'installPolicy': {
        this.stats.policyInstalls++;
        const s = this.opts.policies.install(m.value);
        // ACTIVE only once the interception the policy needs is enabled on every attached VM: before that,
        // events the new rules are about are not delivered by KVM yet (analysis would count on them).
        const applied = s.state === PolicyInstallState.POLICY_INSTALL_STATE_ACTIVE ? this.opts.policies.applied : undefined;
        this.policyStatusChain = this.policyStatusChain.then(() => applied).then(() => {
          this.opts.log(s.state === PolicyInstallState.POLICY_INSTALL_STATE_ACTIVE ? 'info' : 'warn', `policy install ${m.value.policyId} v${m.value.version}: ${PolicyInstallState[s.state]}`, s.error ? { error: s.error } : {});
          this.client.send({ $case: 'policyStatus', value: s });
        });
        return;
      }
      case 'detectionAck':
        this.spool.ack(m.value.detectionIds);
        this.heki?.ack(m.value.detectionIds);
        return;
      case 'hekiPolicy':
        this.heki?.applyPolicy(m.value);
        return;
      case 'pauseControl':
        void this.pauseControl(m.value);
        return;
      case 'keepalive':
        return;
    }
  }

  private async pauseControl(p: NonNullable<Extract<LinkResponse['message'], { $case: 'pauseControl' }>>['value']): Promise<void> {
    this.stats.pauseControls++;
    const t0 = process.hrtime.bigint();
    let uuid: string;
    try {
      uuid = uuidFromBytes(p.vmUuid);
    } catch {
      this.client.send({ $case: 'commandResult', value: result(CommandStatus.COMMAND_STATUS_INVALID_ARGUMENT, 'vm_uuid is not 16 bytes') });
      return;
    }
    this.pauses.set(uuid, p.paused);
    const vm = this.opts.vm(uuid);
    this.opts.log('info', `analysis ${p.paused ? 'paused' : 'resumed'} VM`, { vm: uuid, by: p.requestedBy });
    function result(status: CommandStatus, message = '', generation = 0n): NonNullable<Extract<LinkRequest['message'], { $case: 'commandResult' }>>['value'] {
      return { correlationId: p.correlationId, vmUuid: p.vmUuid, sessionGeneration: generation, vcpu: 0, status, kvmError: 0, message, latencyNs: process.hrtime.bigint() - t0, result: undefined };
    }
    if (!vm || !vm.info) {
      this.client.send({ $case: 'commandResult', value: result(CommandStatus.COMMAND_STATUS_VM_NOT_ATTACHED, 'not attached: the state is persisted and applied at attach') });
      return;
    }
    const gen = BigInt(vm.info.sessionGeneration);
    try {
      if (p.paused) await vm.pause();
      else vm.resume();
      this.client.send({ $case: 'commandResult', value: result(CommandStatus.COMMAND_STATUS_OK, '', gen) });
    } catch (e) {
      const errno = (e as { errno?: number }).errno;
      this.client.send({
        $case: 'commandResult',
        value: { ...result(errno !== undefined ? CommandStatus.COMMAND_STATUS_KVM_ERROR : CommandStatus.COMMAND_STATUS_INTERNAL, (e as Error).message, gen), kvmError: errno ?? 0 },
      });
    }
  }
}

/** Refill a token bucket (`rate` per second, at most one second's worth); true when a token is there (0 = unlimited). */
function refill(b: { tokens: number; tokensAtMs: number }, rate: number, now: number): boolean {
  if (rate <= 0) return true;
  b.tokens = Math.min(rate, b.tokens + ((now - b.tokensAtMs) * rate) / 1000);
  b.tokensAtMs = now;
  return b.tokens >= 1;
}

function hex(v: bigint): string {
  return `0x${v.toString(16)}`;
}

function putVarint(b: Buffer, o: number, v: number): number {
  while (v >= 0x80) {
    b[o++] = (v % 128) | 0x80;
    v = Math.floor(v / 128);
  }
  b[o++] = v;
  return o;
}

