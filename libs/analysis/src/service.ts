/**
 * The analysis service, composed: storage (PGlite or PostgreSQL), the agent link server, policies and
 * protection modules, alerts and their sinks, exceptions, the HTTP API and the gRPC services.
 * `apps/analysis` only parses configuration and calls `Analysis.start()` / `stop()`.
 */
import { EventEmitter } from 'node:events';
import { randomUUID } from 'node:crypto';
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { hostname } from 'node:os';
import { CommandStatus, EventAction, LocalPolicy, uuidFromBytes, VerdictTier, EventDisposition, type Detection, type LinkRequest } from '@periscope/contracts';
import { openDb, type Db } from './db.js';
import { AnalysisError } from './errors.js';
import { draftFromDetection, hex } from './evidence.js';
import { deriveFacts } from './kci.js';
import { AgentSession, enumName, recentEventOf, type LinkHandler, type LiveVm } from './link.js';
import { Registry } from './metrics.js';
import { buildHostPolicy, LOCAL_POLICY_ID, parseRuleId, type ExceptionSpec, type HostPolicy } from './modules.js';
import { choosePolicy, parsePolicyDocument, type ModuleName, type PolicySpec } from './policy.js';
import { ProfileRegistry, type KernelFacts } from './profiles.js';
import { migrate, nowNs } from './schema.js';
import { AlertSinks, type WebhookOptions } from './sinks.js';
import { Store, type AlertDraft, type AlertRecord, type StoredPolicy } from './store.js';
import { startServers, type Servers } from './servers.js';
import { HekiTracker } from './heki.js';
import { MemoryService } from './memory/index.js';
import { STATUS_KEY as MEMORY_STATUS_KEY } from './memory/integrity.js';
import { VmOperations } from './operations.js';
import { CentralVerdicts } from './central-verdicts.js';
import { registerTraceOperations, Tracing } from './tracing.js';
import { TraceStore } from './tracing-store.js';
import { AuditLog } from './audit.js';
import { ResponseEngine } from './responses.js';
import { registerInspectOperations } from './inspect.js';
import { ReplicaRouter, type ReplicaTuning } from './replicas.js';
import { restrictPagesOnce } from './page-restrictions.js';
import { DetectionRetry } from './detection-retry.js';

export type LogLevel = 'debug' | 'info' | 'warn' | 'error';
export type Log = (level: LogLevel, msg: string, fields?: Record<string, unknown>) => void;

export interface TlsMaterial {
  readonly ca: Buffer;
  readonly cert: Buffer;
  readonly key: Buffer;
}

export interface AnalysisOptions {
  /** `pglite:DIR`, `pglite:memory` or `postgres://…`. */
  readonly db: string;
  /** gRPC (AgentLink, health, operator): `HOST:PORT`; port 0 = ephemeral. Default 127.0.0.1:7400. */
  readonly grpcListen?: string;
  /** Plaintext gRPC `HOST:PORT` serving only grpc.health.v1 (Kubernetes probes; `--health-listen`). */
  readonly healthListen?: string;
  /** grpc-js `grpc.max_connection_age_ms` / `grpc.max_connection_age_grace_ms` of the main gRPC server. */
  readonly grpcMaxConnectionAgeMs?: number;
  readonly grpcMaxConnectionAgeGraceMs?: number;
  /** HTTP API and /metrics: `HOST:PORT`; absent = no HTTP server. */
  readonly httpListen?: string;
  /** Import every `*.yaml`/`*.yml`/`*.json` policy in this directory at start (idempotent). */
  readonly policyDir?: string;
  /** Extra guest OS profiles (`*.json`); `linux-sim` is built in. */
  readonly profileDir?: string;
  /** Bearer token for the HTTP API and operator RPCs (required in fleet mode). */
  readonly apiToken?: string;
  /** Fleet mode: TLS on gRPC (client certificates required) and HTTPS. */
  readonly tls?: TlsMaterial;
  readonly replicaId?: string;
  readonly webhook?: WebhookOptions;
  /** Append every new or updated alert as a JSON line to this file (`-` = stdout). */
  readonly alertsJsonl?: string;
  readonly log?: Log;
  readonly keepaliveMs?: number;
  readonly flushMs?: number;
  readonly commandTimeoutMs?: number;
  readonly ringSize?: number;
  /** Serve the dashboard's built files (apps/dashboard/dist) at `/` of the HTTP server. */
  readonly dashboardDir?: string;
  /** Several replicas on PostgreSQL: heartbeat, liveness and routing timeouts (replicas.ts). */
  readonly replicas?: ReplicaTuning;
}

export interface AlertNotice {
  readonly alert: AlertRecord;
  readonly outcome: 'created' | 'folded';
}

interface Pending {
  events: Map<string, { vm: string; kind: string; count: number; lastNs: bigint }>;
  vcpus: Map<string, { vm: string; vcpu: number; count: number; lastNs: bigint }>;
  verdicts: Map<string, { vm: string; ruleId: string; exceptionId: string; tier: string; action: string; count: number; lastNs: bigint }>;
  vmsSeen: Map<string, bigint>;
}

let instancesInProcess = 0;

const emptyPending = (): Pending => ({ events: new Map(), vcpus: new Map(), verdicts: new Map(), vmsSeen: new Map() });

export class Analysis implements LinkHandler {
  readonly replicaId: string;
  readonly ringSize: number;
  readonly commandTimeoutMs: number;
  readonly profiles = new ProfileRegistry();
  readonly registry = new Registry();
  readonly store: Store;
  readonly sessions = new Map<string, AgentSession>();
  readonly liveVms = new Map<string, LiveVm>();
  /** Heki state, fleet view, expected pins, violation alerts and their KVMI correlation (heki.ts). */
  readonly heki: HekiTracker;
  /** Guest memory: the guest agents' hub, routing, kernel integrity hashing (memory/). */
  readonly memory: MemoryService;
  /** Operations on a VM, run on the replica that owns it (operations.ts; cross-replica routing: replicas.ts). */
  readonly operations = new VmOperations((uuid) => this.liveVms.get(uuid));
  /** Every command that changes a guest, who asked, its result (audit.ts). */
  readonly audit: AuditLog;
  /** Policy responses to detections: inject, crash (local rules), pause, quarantine (here) (responses.ts). */
  readonly responses: ResponseEngine;
  /** Answers to events agents hold for analysis: modules claim theirs, the rest go through (central-verdicts.ts). */
  readonly central: CentralVerdicts;
  /** Breakpoint tracing (tracing.ts). */
  readonly tracing: Tracing;
  private readonly bus = new EventEmitter();
  private policies: StoredPolicy[] = [];
  private exceptions: ExceptionSpec[] = [];
  private pending = emptyPending();
  private flushTimer: NodeJS.Timeout | undefined;
  private flushing: Promise<void> = Promise.resolve();
  private readonly jobs = new Set<Promise<void>>();
  private readonly pushChains = new Map<AgentSession, Promise<void>>();
  private readonly pushTimers = new Map<AgentSession, NodeJS.Timeout>();
  private servers: Servers | undefined;
  private sinks: AlertSinks | undefined;
  /** Cross-replica routing and alert fan-out (replicas.ts); PostgreSQL only. */
  private replicas: ReplicaRouter | undefined;
  /** Command-log rows whose INSERT is still in flight (finishCommand waits for it). */
  private readonly commandRowsInFlight = new Map<bigint, Promise<void>>();
  private readonly logFn: Log;
  private readonly m;
  /** Detections whose storage failed, retried until stored (then acknowledged) or their stream closes. */
  private readonly detectionRetry = new DetectionRetry({ store: (s, d) => this.storeDetection(s, d), log: (l, m, f) => this.log(l, m, f) });

  private constructor(readonly db: Db, readonly opts: AnalysisOptions) {
    this.store = new Store(db);
    this.heki = new HekiTracker({
      db, store: this.store, registry: this.registry, log: (l, m, f) => this.log(l, m, f), specs: () => this.specs(),
      labels: (uuid) => this.liveVms.get(uuid)?.labels ?? {}, publish: (n) => this.publish(n), sessions: () => this.sessions.values(),
    });
    // Default hostname-pid; a second instance in one process (tests, tools) gets a suffix: replica ids are unique.
    this.replicaId = opts.replicaId ?? `${hostname()}-${process.pid}${++instancesInProcess > 1 ? `-${instancesInProcess}` : ''}`;
    this.ringSize = opts.ringSize ?? 256;
    this.commandTimeoutMs = opts.commandTimeoutMs ?? 5000;
    this.logFn = opts.log ?? (() => undefined);
    this.memory = new MemoryService(this);
    const r = this.registry;
    this.m = {
      messages: r.counter('periscope_analysis_link_messages_total', 'agent link messages received, by kind'),
      events: r.counter('periscope_analysis_events_total', 'KVMI events ingested, by kind'),
      detections: r.counter('periscope_analysis_detections_total', 'agent detections, by outcome (created, folded, duplicate)'),
      alerts: r.counter('periscope_analysis_alerts_total', 'alerts created, by severity'),
      commands: r.counter('periscope_analysis_commands_total', 'KVMI commands sent, by kind and status'),
      policies: r.counter('periscope_analysis_policy_installs_total', 'local policies sent to agents'),
      held: r.counter('periscope_analysis_central_verdicts_total', 'held events answered by analysis'),
      flushes: r.counter('periscope_analysis_counter_flushes_total', 'counter flushes to the database'),
    };
    this.audit = new AuditLog(db, this.replicaId, (l, m, f) => this.log(l, m, f));
    this.responses = new ResponseEngine({ db, operations: this.operations, audit: this.audit, specs: () => this.specs(), raiseAlert: (id, d) => this.raiseAlert(id, d), log: (l, m, f) => this.log(l, m, f) });
    this.tracing = new Tracing({
      store: this.store, traces: new TraceStore(db), profiles: this.profiles, liveVms: this.liveVms, registry: r, log: (l, m, f) => this.log(l, m, f),
      pushPolicy: (s) => this.pushPolicy(s), profileName: (vm) => this.policies.find((p) => p.name === vm.policyName)?.spec.profile ?? 'linux-sim', track: (p) => this.track(p),
    });
    this.central = new CentralVerdicts(this.m.held);
    this.central.register('tracing', (h) => this.tracing.claim(h));
    this.memory.integrity.breakpoints = (vm) => this.tracing.plantedBytes(vm); // our INT3s hash as the original byte
    registerTraceOperations(this.operations, this.tracing);
    this.registerVmOperations();
    r.gauge('periscope_analysis_agents_connected', 'agent links up on this replica').track(() => this.sessions.size);
    r.gauge('periscope_analysis_vms_attached', 'VMs attached through this replica').track(() => this.liveVms.size);
  }

  static async start(opts: AnalysisOptions): Promise<Analysis> {
    const db = await openDb(opts.db);
    let a: Analysis | undefined;
    try {
      const applied = await migrate(db);
      a = new Analysis(db, opts);
      if (applied.length) a.log('info', 'database migrated', { applied, driver: db.driver });
      if (opts.profileDir) a.profiles.addDir(opts.profileDir);
      if (opts.policyDir) await a.importPolicyDir(opts.policyDir);
      await a.reloadCaches();
      await a.heki.load();
      a.sinks = new AlertSinks({ ...(opts.webhook ? { webhook: opts.webhook } : {}), ...(opts.alertsJsonl ? { jsonl: opts.alertsJsonl } : {}), log: a.logFn });
      a.flushTimer = setInterval(() => void a!.flush(), opts.flushMs ?? 1000);
      a.flushTimer.unref();
      if (db.driver === 'postgres') await a.startReplicaRouter();
      a.servers = await startServers(a, {
        grpcListen: opts.grpcListen ?? '127.0.0.1:7400',
        ...(opts.httpListen ? { httpListen: opts.httpListen } : {}),
        ...(opts.tls ? { tls: opts.tls } : {}),
        ...(opts.apiToken ? { apiToken: opts.apiToken } : {}),
        keepaliveMs: opts.keepaliveMs ?? 5000,
        ...(opts.healthListen ? { healthListen: opts.healthListen } : {}),
        ...(opts.grpcMaxConnectionAgeMs !== undefined ? { maxConnectionAgeMs: opts.grpcMaxConnectionAgeMs } : {}),
        ...(opts.grpcMaxConnectionAgeGraceMs !== undefined ? { maxConnectionAgeGraceMs: opts.grpcMaxConnectionAgeGraceMs } : {}),
        ...(opts.dashboardDir ? { dashboardDir: opts.dashboardDir } : {}),
      });
      a.log('info', 'analysis running', { replica: a.replicaId, grpc: a.grpcAddress, http: a.httpAddress, db: db.driver });
      return a;
    } catch (e) {
      if (a?.servers) await a.servers.close();
      await a?.replicas?.stop().catch(() => undefined);
      await db.close().catch(() => undefined);
      throw e;
    }
  }

  get grpcPort(): number {
    return this.servers?.grpcPort ?? 0;
  }
  get httpPort(): number {
    return this.servers?.httpPort ?? 0;
  }
  get grpcAddress(): string {
    return this.servers?.grpcAddress ?? '';
  }
  get httpAddress(): string {
    return this.servers?.httpAddress ?? '';
  }
  /** Port of the plaintext health-only gRPC server (`healthListen`), 0 without one. */
  get healthPort(): number {
    return this.servers?.healthPort ?? 0;
  }

  async stop(): Promise<void> {
    if (this.flushTimer) clearInterval(this.flushTimer);
    this.heki.stop();
    this.responses.stop();
    this.detectionRetry.stop();
    this.memory.stop();
    this.tracing.close();
    for (const t of this.pushTimers.values()) clearTimeout(t);
    for (const s of [...this.sessions.values()]) await s.close();
    await this.servers?.close();
    await Promise.allSettled([...this.jobs]);
    await this.flush();
    await this.sinks?.close();
    await this.audit.flushed();
    await this.replicas?.stop();
    await this.db.close();
  }

  /** Several replicas: route operations on VMs owned elsewhere, share the live alert stream (replicas.ts). */
  private async startReplicaRouter(): Promise<void> {
    const router = await ReplicaRouter.start({
      ...this.opts.replicas,
      replicaId: this.replicaId, connectionString: this.opts.db, db: this.db, store: this.store, operations: this.operations,
      commandTimeoutMs: this.commandTimeoutMs, log: this.logFn,
      deliverAlert: (alert, outcome) => this.bus.emit('alert', { alert, outcome } satisfies AlertNotice), // live streams only: sinks fire where ingested
      addresses: () => ({ grpc: this.grpcAddress, http: this.httpAddress }),
      configChanged: async (vmUuid) => {
        const vm = vmUuid ? this.liveVms.get(vmUuid) : undefined;
        if (!vmUuid) return this.refresh({ fromReplica: true });
        if (!vm) return;
        vm.labels = (await this.store.getVm(vm.uuid))?.labels ?? vm.labels;
        this.assign(vm);
        await this.pushPolicy(vm.session);
        this.heki.refresh();
      },
    });
    this.replicas = router;
    this.operations.setRemote(router.runRemote);
    const r = this.registry;
    const st = router.stats;
    r.counter('periscope_analysis_routed_operations_total', 'operations this replica routed to the owner of a VM').track(() => st.routedOut);
    r.counter('periscope_analysis_routed_owner_lost_total', 'routed operations failed early: the owner replica stopped or lost its heartbeat').track(() => st.ownerLost);
    r.counter('periscope_analysis_remote_alerts_total', 'alerts other replicas ingested, delivered to this replica\'s live streams').track(() => st.remoteAlerts);
    r.counter('periscope_analysis_alerts_caught_up_total', 'alerts delivered to the live streams after the notification channel came back').track(() => st.alertsCaughtUp);
    r.counter('periscope_analysis_notify_reconnects_total', 'notification channel (LISTEN) reconnects').track(() => st.listenReconnects);
  }

  log(level: LogLevel, msg: string, fields?: Record<string, unknown>): void {
    this.logFn(level, msg, fields);
  }

  // ---------------------------------------------------------------- alerts
  onAlert(fn: (n: AlertNotice) => void): () => void {
    this.bus.on('alert', fn);
    return () => this.bus.off('alert', fn);
  }

  /** Store and publish an alert analysis raised itself (kernel integrity hashing); idempotent by detection id. */
  async raiseAlert(detectionId: string, draft: AlertDraft): Promise<AlertRecord> {
    const r = await this.store.ingestDetection(detectionId, draft);
    this.m.detections.inc({ outcome: r.outcome });
    if (r.outcome === 'created') this.m.alerts.inc({ severity: r.alert.severity });
    if (r.outcome !== 'duplicate') this.publish({ alert: r.alert, outcome: r.outcome });
    return r.alert;
  }

  private publish(n: AlertNotice): void {
    this.bus.emit('alert', n);
    this.sinks?.publish(n);
    this.replicas?.alertPublished(n.alert, n.outcome); // the other replicas' live streams
  }

  // ---------------------------------------------------------------- policies
  async importPolicyDir(dir: string): Promise<{ name: string; version: bigint; changed: boolean }[]> {
    const files = readdirSync(dir).filter((f) => /\.(ya?ml|json)$/.test(f)).sort();
    const out = [];
    for (const f of files) {
      const r = await this.applyPolicy(readFileSync(join(dir, f), 'utf8'), { source: join(dir, f), createdBy: 'policy-dir', refresh: false });
      out.push({ name: r.policy.name, version: r.policy.version, changed: r.changed });
    }
    return out;
  }

  /** Validate and store a policy document (YAML/JSON); a new version only when it changed. */
  async applyPolicy(text: string, o: { source?: string; createdBy?: string; refresh?: boolean; expectedVersion?: bigint } = {}): Promise<{ policy: StoredPolicy; changed: boolean }> {
    const spec = this.checkPolicy(text, o.source ?? 'policy');
    const r = await this.store.putPolicy(spec, text, o.source ?? 'api', o.createdBy ?? 'api', o.expectedVersion);
    if (r.changed) this.log('info', 'policy stored', { name: spec.name, version: r.policy.version.toString(), source: o.source });
    if (r.changed && o.refresh !== false) await this.refresh();
    return r;
  }

  /** Parse and validate a policy document (its profile must be known) without storing it. */
  checkPolicy(text: string, source = 'policy'): PolicySpec {
    const spec = parsePolicyDocument(text, source);
    if (!this.profiles.get(spec.profile)) {
      throw new AnalysisError('bad-policy', `${source}: profile: unknown guest OS profile ${JSON.stringify(spec.profile)} (known: ${this.profiles.names().join(', ')})`, {
        issues: [{ path: 'profile', message: `unknown guest OS profile (known: ${this.profiles.names().join(', ')})` }],
      });
    }
    return spec;
  }

  async deletePolicy(name: string, by = 'api'): Promise<void> {
    await this.store.deletePolicy(name, by);
    await this.refresh();
  }

  /** Policies and exceptions as in effect here (latest versions). */
  currentPolicies(): readonly StoredPolicy[] {
    return this.policies;
  }

  private async reloadCaches(): Promise<void> {
    this.policies = await this.store.listPolicies();
    this.exceptions = (await this.store.listExceptions()).map((e) => e.spec);
  }

  /** Re-read policies/exceptions, re-assign VMs, start module work where needed and push new local policies. */
  async refresh(o: { fromReplica?: boolean } = {}): Promise<void> {
    await this.reloadCaches();
    if (!o.fromReplica) this.replicas?.configChanged(); // the other replicas reload too
    for (const s of this.sessions.values()) {
      for (const vm of s.vms.values()) this.assign(vm);
      await this.pushPolicy(s);
    }
    this.heki.refresh();
  }

  private specs(): PolicySpec[] {
    return this.policies.map((p) => p.spec);
  }

  private assign(vm: LiveVm): void {
    const spec = choosePolicy(this.specs(), vm);
    const name = spec?.name ?? '';
    const changed = name !== vm.policyName;
    vm.policyName = name;
    if (changed) void this.store.setVmPolicy(vm.uuid, name).catch((e: unknown) => this.log('warn', 'setVmPolicy failed', { error: (e as Error).message }));
    const modules: ModuleName[] = [];
    if (spec?.modules.crPinning) modules.push('cr-pinning');
    if (spec?.modules.syscallMsrs) modules.push('syscall-msrs');
    if (spec?.modules.descriptorTables) modules.push('descriptor-tables');
    const prot: Record<string, string> = {};
    for (const m of modules) prot[m] = 'local rules';
    if (spec?.modules.kernelCodeIntegrity) {
      const cur = vm.protection['kernel-code-integrity'];
      prot['kernel-code-integrity'] = cur && !changed ? cur : 'pending';
      const mem = vm.protection[MEMORY_STATUS_KEY];
      if (mem && !changed) prot[MEMORY_STATUS_KEY] = mem;
      if (!cur || changed || cur.startsWith('failed')) this.track(this.protectKernel(vm, spec));
    }
    vm.protection = prot;
    void this.store.setVmProtection(vm.uuid, prot).catch(() => undefined);
  }

  private track(p: Promise<void>): void {
    this.jobs.add(p);
    void p.finally(() => this.jobs.delete(p));
  }

  private async protectKernel(vm: LiveVm, spec: PolicySpec): Promise<void> {
    const s = vm.session;
    const current = () => this.liveVms.get(vm.uuid) === vm && !s.closed;
    const set = async (status: string) => {
      vm.protection = { ...vm.protection, 'kernel-code-integrity': status };
      await this.store.setVmProtection(vm.uuid, vm.protection);
    };
    try {
      const profile = this.profiles.get(spec.profile);
      if (!profile) throw new AnalysisError('bad-profile', `unknown profile ${spec.profile}`);
      let facts = vm.facts;
      if (!facts || facts.qemuStartTimeMs !== vm.startTimeMs || facts.profile !== profile.name) {
        await set('deriving slide');
        facts = await deriveFacts(s, vm, profile);
        vm.facts = facts;
        await this.store.setVmDerived(vm.uuid, factsJson(facts));
        this.log('info', 'kernel derived', { vm: vm.name, slide: hex(facts.slide), textPhys: hex(facts.textPhys) });
      }
      if (!current()) return;
      await this.pushPolicy(s); // the PF rules are installed before the first page is restricted
      const { pages } = await restrictPagesOnce(this.db, this.replicaId, s, vm, spec, facts, this.profiles); // once per KVMI session
      if (current()) await set(`protected (${pages} pages write-protected)`);
      if (current()) this.track(this.memory.integrity.start(vm, spec, facts)); // hashing: memory/integrity.ts
    } catch (e) {
      this.log('warn', 'kernel code integrity failed', { vm: vm.name, error: (e as Error).message });
      if (current()) await set(`failed: ${(e as Error).message}`).catch(() => undefined);
    }
  }

  /** Build this host's local policy and send it when it differs from the last one sent (serialised per agent). */
  pushPolicy(s: AgentSession): Promise<void> {
    const prev = this.pushChains.get(s) ?? Promise.resolve();
    const next = prev.then(async () => {
      if (s.closed || !s.hostId) return;
      const vms = [...s.vms.values()].map((v) => ({ uuid: v.uuid, name: v.name, hostId: v.hostId, labels: v.labels, ...(v.facts ? { facts: v.facts } : {}) }));
      const draft = this.build(vms, 0n);
      if (draft.contentKey === s.lastPolicyKey) return;
      const version = await this.store.nextLocalPolicyVersion();
      const hp = this.build(vms, version);
      for (const w of hp.warnings) this.log('warn', 'local policy', { host: s.hostId, warning: w });
      s.lastPolicyKey = hp.contentKey;
      s.lastPolicyVersion = version;
      s.send({ $case: 'installPolicy', value: LocalPolicy.fromPartial({ policyId: LOCAL_POLICY_ID, version, verdictsDocument: hp.document }) });
      this.m.policies.inc();
      this.log('debug', 'local policy sent', { host: s.hostId, version: version.toString(), rules: hp.policy.rules.length });
    });
    const guarded = next.catch((e: unknown) => this.log('error', 'local policy not sent', { host: s.hostId, error: (e as Error).message }));
    this.pushChains.set(s, guarded);
    return guarded;
  }

  /** The local policy a host with these VMs gets (exported for the CLI / tests). */
  build(vms: Parameters<typeof buildHostPolicy>[0]['vms'], version: bigint): HostPolicy {
    const now = nowNs();
    return buildHostPolicy({ policies: this.specs(), exceptions: this.exceptions.filter((e) => !e.expiresNs || e.expiresNs > now), vms, profiles: this.profiles, version, extraRules: this.tracing.localRules(vms.map((v) => v.uuid)) });
  }

  private schedulePush(s: AgentSession, delayMs = 20): void {
    const t = this.pushTimers.get(s);
    if (t) clearTimeout(t);
    const timer = setTimeout(() => {
      // Build only once every message received so far is handled: on a new stream (analysis restarted, another
      // replica) the agent sends its whole inventory right after hello, and a policy built before the last
      // VmAttached would replace the agent's policy with one that leaves those VMs unprotected until the next push.
      void s.idle().then(() => {
        if (this.pushTimers.get(s) !== timer) return; // rescheduled meanwhile
        this.pushTimers.delete(s);
        void this.pushPolicy(s);
      });
    }, delayMs);
    this.pushTimers.set(s, timer);
  }

  // ---------------------------------------------------------------- exceptions
  async createException(e: Omit<ExceptionSpec, 'id' | 'createdBy' | 'action' | 'expiresNs'> & { id?: string; createdBy?: string; expiresNs?: bigint }): Promise<ExceptionSpec> {
    if (!this.policies.some((p) => p.name === e.policy)) throw new AnalysisError('not-found', `no policy ${e.policy}`);
    const spec: ExceptionSpec = { ...e, id: e.id ?? `exc-${randomUUID().slice(0, 8)}`, createdBy: e.createdBy ?? 'api', action: 'allow', expiresNs: e.expiresNs ?? 0n };
    await this.store.insertException(spec);
    this.log('info', 'exception created', { id: spec.id, policy: spec.policy, rule: `${spec.module}/${spec.rule}` });
    await this.refresh();
    return spec;
  }

  /** An exception that lets exactly this alert's event through next time (same VM, RIP, victim). */
  async createExceptionFromAlert(alertId: string, o: { reason?: string; createdBy?: string; expiresNs?: bigint; anyVm?: boolean } = {}): Promise<ExceptionSpec> {
    const a = await this.store.getAlert(alertId, false);
    if (!a) throw new AnalysisError('not-found', `no alert ${alertId}`);
    const p = parseRuleId(a.ruleId);
    if (!p) throw new AnalysisError('bad-request', `alert ${alertId} was raised by ${a.ruleId}, not by a module rule: no exception can target it`);
    const at = a.evidence.attempt;
    const big = (k: string): bigint | undefined => (typeof at[k] === 'string' ? BigInt(at[k] as string) : undefined);
    const rip = big('rip') ?? (a.evidence.registers['rip'] ? BigInt(a.evidence.registers['rip']) : undefined);
    const victim: { -readonly [K in keyof ExceptionSpec['victim']]: ExceptionSpec['victim'][K] } = {};
    switch (at['event']) {
      case 'PF': {
        const gpa = big('gpa')!;
        victim.gpa = { start: gpa, end: gpa + 1n };
        break;
      }
      case 'CR':
        victim.cr = at['cr'] as number;
        victim.newValue = big('new')!;
        break;
      case 'MSR':
        victim.msr = Number(big('msr')!);
        victim.newValue = big('new')!;
        break;
      case 'DESCRIPTOR':
        victim.descriptor = (at['descriptor'] as string) === 'GDTR' ? 'GDTR' : 'IDTR';
        break;
      default:
        throw new AnalysisError('bad-request', `alert ${alertId}: no victim in its evidence`);
    }
    return this.createException({
      policy: p.policy,
      module: p.module as ModuleName,
      rule: p.rule,
      vms: o.anyVm ? [] : [a.vm.uuid],
      originator: rip !== undefined ? { rip: { start: rip, end: rip + 1n } } : {},
      victim,
      reason: o.reason ?? `from alert ${alertId}`,
      fromAlertId: alertId,
      ...(o.createdBy ? { createdBy: o.createdBy } : {}),
      ...(o.expiresNs ? { expiresNs: o.expiresNs } : {}),
    });
  }

  async deleteException(id: string): Promise<void> {
    await this.store.deleteException(id);
    await this.refresh();
  }

  async setVmLabels(uuid: string, labels: Record<string, string>): Promise<void> {
    await this.store.setVmLabels(uuid, labels);
    const vm = this.liveVms.get(uuid);
    if (vm) {
      vm.labels = labels;
      this.assign(vm);
      await this.pushPolicy(vm.session);
    } else this.replicas?.configChanged(uuid); // live on another replica: it reloads the labels
    this.heki.refresh();
  }

  // ---------------------------------------------------------------- VM operations
  private registerVmOperations(): void {
    // mem-read, regs: VM_READ_PHYSICAL / VCPU_GET_REGISTERS for operators (inspect.ts).
    registerInspectOperations(this.operations, async (uuid) => (await this.store.getVm(uuid))?.maxGfn ?? null);
    // Pause / resume: VmPauseControl to the owning agent, which persists the state and re-applies it when the
    // VM re-attaches (OK, or VM_NOT_ATTACHED: persisted, applied at attach).
    for (const paused of [true, false]) {
      this.operations.register(paused ? 'pause' : 'resume', async ({ vm, by }) => {
        const r = await vm.session.pauseControl(vm, paused, by);
        const status = enumName.commandStatus(r.status);
        if (r.status === CommandStatus.COMMAND_STATUS_REFUSED_BY_AGENT_POLICY) throw new AnalysisError('refused', `the agent on ${vm.hostId} refused: ${r.message}`);
        if (r.status !== CommandStatus.COMMAND_STATUS_OK && r.status !== CommandStatus.COMMAND_STATUS_VM_NOT_ATTACHED) {
          throw new AnalysisError('command-failed', `${paused ? 'pause' : 'resume'} ${vm.name}: ${status}${r.message ? ` (${r.message})` : ''}`);
        }
        return { status, message: r.message, hostId: vm.hostId };
      });
    }
  }

  // ---------------------------------------------------------------- link handlers
  async onHello(s: AgentSession, h: Extract<LinkRequest['message'], { $case: 'hello' }>['value']): Promise<void> {
    const old = this.sessions.get(h.hostId);
    this.sessions.set(h.hostId, s);
    if (old && old !== s) await old.close();
    await this.store.upsertHost({
      hostId: h.hostId, agentVersion: h.agentVersion, agentInstanceId: h.agentInstanceId, capabilities: h.capabilities.map(enumName.capability),
      policyId: h.activePolicyId, policyVersion: h.activePolicyVersion, replicaId: this.replicaId, nowNs: nowNs(),
    });
    this.m.messages.inc({ kind: 'hello' });
    this.log('info', 'agent connected', { host: h.hostId, agent: h.agentVersion, instance: h.agentInstanceId });
    this.schedulePush(s);
  }

  async onVmAttached(s: AgentSession, a: Extract<LinkRequest['message'], { $case: 'vmAttached' }>['value']): Promise<void> {
    this.m.messages.inc({ kind: 'vm_attached' });
    const uuid = uuidFromBytes(a.vmUuid);
    const rec = await this.store.upsertVm({
      uuid, name: a.name, hostId: s.hostId, sessionGeneration: a.sessionGeneration, qemuStartTimeMs: a.qemuStartTimeMs, vcpuCount: a.vcpuCount,
      maxGfn: a.maxGfn ?? null, dialect: enumName.dialect(a.dialect),
      kvmiVersion: a.kvmiVersion ? { version: a.kvmiVersion.version, maxMsgSize: a.kvmiVersion.maxMsgSize, singlestep: a.kvmiVersion.features?.singlestep ?? false } : {},
      allowedCommands: a.allowedCommands.map(enumName.commandKind), allowedEvents: a.allowedEvents.map(enumName.eventKind),
      attachedNs: a.attachedUnixNs, nowNs: nowNs(),
    });
    const prevFacts = this.liveVms.get(uuid)?.facts ?? factsFrom(rec.derived);
    const vm: LiveVm = {
      uuid, name: a.name, hostId: s.hostId, generation: a.sessionGeneration, vcpuCount: a.vcpuCount, startTimeMs: a.qemuStartTimeMs,
      labels: rec.labels, allowedCommands: rec.allowedCommands, policyName: '', protection: {}, ring: [], session: s,
      ...(prevFacts && prevFacts.qemuStartTimeMs === a.qemuStartTimeMs ? { facts: prevFacts } : {}),
    };
    const old = this.liveVms.get(uuid);
    if (old && old.session !== s) old.session.vms.delete(uuid);
    s.vms.set(uuid, vm);
    this.liveVms.set(uuid, vm);
    this.assign(vm);
    this.schedulePush(s);
    this.tracing.vmAttached(vm); // re-establish active traces (idempotent)
  }

  async onVmDetached(s: AgentSession, d: Extract<LinkRequest['message'], { $case: 'vmDetached' }>['value']): Promise<void> {
    this.m.messages.inc({ kind: 'vm_detached' });
    const uuid = uuidFromBytes(d.vmUuid);
    await this.store.detachVm(uuid, d.sessionGeneration, enumName.detach(d.reason), d.detachedUnixNs || nowNs());
    const vm = s.vms.get(uuid);
    if (vm && vm.generation === d.sessionGeneration) {
      s.vms.delete(uuid);
      if (this.liveVms.get(uuid) === vm) this.liveVms.delete(uuid);
      this.tracing.vmDetached(uuid);
      this.schedulePush(s);
    }
  }

  async onEvents(s: AgentSession, b: Extract<LinkRequest['message'], { $case: 'eventBatch' }>['value']): Promise<void> {
    this.m.messages.inc({ kind: 'event_batch' });
    const p = this.pending;
    for (const e of b.events) {
      const uuid = uuidFromBytes(e.vmUuid);
      const kind = e.payload ? e.payload.$case.toUpperCase() : 'UNKNOWN';
      const now = e.receivedUnixNs || nowNs();
      const ek = `${uuid}|${kind}`;
      const ec = p.events.get(ek);
      if (ec) {
        ec.count++;
        if (now > ec.lastNs) ec.lastNs = now;
      } else p.events.set(ek, { vm: uuid, kind, count: 1, lastNs: now });
      if (kind !== 'UNHOOK') {
        const vk = `${uuid}|${e.vcpu}`;
        const vc = p.vcpus.get(vk);
        if (vc) {
          vc.count++;
          if (now > vc.lastNs) vc.lastNs = now;
        } else p.vcpus.set(vk, { vm: uuid, vcpu: e.vcpu, count: 1, lastNs: now });
      }
      p.vmsSeen.set(uuid, now);
      this.m.events.inc({ kind });
      if (kind === 'TRAP') this.responses.onEvent(e); // the TRAP after an inject response (responses.ts)
      const vm = s.vms.get(uuid);
      if (vm) {
        vm.ring.push(recentEventOf(e));
        if (vm.ring.length > this.ringSize) vm.ring.splice(0, vm.ring.length - this.ringSize);
      }
      // Central verdict: a module claims the held event (tracing: its breakpoints, steps and pauses), or it
      // is let through at once (CONTINUE, the guest's value) rather than waiting for the agent's deadline.
      if (e.disposition === EventDisposition.EVENT_DISPOSITION_HELD) this.central.dispatch(s, e);
    }
  }

  onVerdicts(s: AgentSession, b: Extract<LinkRequest['message'], { $case: 'verdictBatch' }>['value']): void {
    this.m.messages.inc({ kind: 'verdict_batch' });
    for (const r of b.records) {
      const uuid = uuidFromBytes(r.vmUuid);
      const live = s.vms.get(uuid);
      if (live) {
        // vCPU stall (event read -> reply written, as the agent measured it), cumulative for the dashboard.
        const st = (live.stall ??= { verdicts: 0, totalNs: 0, maxNs: 0 });
        const ns = Number(r.latencyNs);
        st.verdicts++;
        st.totalNs += ns;
        if (ns > st.maxNs) st.maxNs = ns;
      }
      if (r.tier === VerdictTier.VERDICT_TIER_DEFAULT) this.tracing.onVerdictRecord(uuid, enumName.eventKind(r.kind), r.tier); // a trace's INT3 failed open: re-plant
      const tier = r.tier === VerdictTier.VERDICT_TIER_LOCAL ? 'local' : r.tier === VerdictTier.VERDICT_TIER_CENTRAL ? 'central' : r.tier === VerdictTier.VERDICT_TIER_DEFAULT ? 'default' : 'unknown';
      const action = r.action === EventAction.EVENT_ACTION_CONTINUE ? 'continue' : r.action === EventAction.EVENT_ACTION_RETRY ? 'retry' : r.action === EventAction.EVENT_ACTION_CRASH ? 'crash' : 'unknown';
      const k = `${uuid}|${r.ruleId}|${r.exceptionId}|${tier}|${action}`;
      const now = r.repliedUnixNs || nowNs();
      const c = this.pending.verdicts.get(k);
      if (c) {
        c.count++;
        if (now > c.lastNs) c.lastNs = now;
      } else this.pending.verdicts.set(k, { vm: uuid, ruleId: r.ruleId, exceptionId: r.exceptionId, tier, action, count: 1, lastNs: now });
    }
  }

  async onDetection(s: AgentSession, d: Detection): Promise<void> {
    this.m.messages.inc({ kind: 'detection' });
    try {
      await this.storeDetection(s, d);
    } catch (e) {
      // Not stored, so not acknowledged: retried until stored or the stream closes (detection-retry.ts).
      this.detectionRetry.add(s, d);
      throw e;
    }
  }

  private async storeDetection(s: AgentSession, d: Detection): Promise<void> {
    const uuid = uuidFromBytes(d.vmUuid);
    const name = s.vms.get(uuid)?.name ?? (await this.store.getVm(uuid))?.name ?? '';
    // A CR detection on a Heki VM may be the same incident as a Heki denial (heki.ts).
    const r = await this.heki.ingestDetection(d, this.responses.adjustDraft(draftFromDetection(d, name)), (id, draft) => this.store.ingestDetection(id, draft));
    this.m.detections.inc({ outcome: r.outcome });
    if (r.outcome === 'created') this.m.alerts.inc({ severity: r.alert.severity });
    // Acknowledge after the commit: the agent may now delete it from its spool.
    s.send({ $case: 'detectionAck', value: { detectionIds: [d.detectionId] } });
    if (r.outcome !== 'duplicate') this.publish({ alert: r.alert, outcome: r.outcome });
    if (r.outcome !== 'duplicate') this.track(this.responses.afterDetection(d, r.alert)); // not awaited: a pause awaits this link
  }

  async onMisc(s: AgentSession, m: LinkRequest['message']): Promise<void> {
    if (!m) return;
    this.m.messages.inc({ kind: m.$case });
    switch (m.$case) {
      case 'loss':
        await this.store.recordLoss({
          hostId: s.hostId, vm: m.value.vmUuid.length ? uuidFromBytes(m.value.vmUuid) : '', recordType: enumName.lostType(m.value.recordType),
          reason: enumName.lossReason(m.value.reason), count: m.value.droppedCount, windowEndNs: m.value.windowEndUnixNs,
        });
        break;
      case 'counters':
        await this.store.setHostCounters(s.hostId, JSON.parse(JSON.stringify(m.value, (_k, v: unknown) => (typeof v === 'bigint' ? v.toString() : v))) as Record<string, unknown>);
        break;
      case 'policyStatus': {
        const st = enumName.policyState(m.value.state);
        this.tracing.policyStatus(s, { version: m.value.version, state: st, error: m.value.error, activeVersion: m.value.activeVersion });
        await this.store.setHostPolicyStatus(s.hostId, { policyId: m.value.policyId, version: m.value.version, state: st, error: m.value.error, activeVersion: m.value.activeVersion });
        if (st === 'rejected') this.log('error', 'agent rejected the local policy', { host: s.hostId, version: m.value.version.toString(), error: m.value.error });
        break;
      }
      case 'hekiRegistered':
      case 'hekiConfigure':
      case 'hekiDenial':
        await this.heki.onMessage(s, m);
        break;
      default:
        break;
    }
  }

  async onClosed(s: AgentSession): Promise<void> {
    this.pushChains.delete(s);
    const t = this.pushTimers.get(s);
    if (t) clearTimeout(t);
    if (this.sessions.get(s.hostId) !== s) return;
    this.sessions.delete(s.hostId);
    for (const [uuid, vm] of s.vms) if (this.liveVms.get(uuid) === vm) this.liveVms.delete(uuid);
    this.log('info', 'agent disconnected', { host: s.hostId });
    await this.store.setHostConnected(s.hostId, false, nowNs(), this.replicaId).catch((e: unknown) => this.log('warn', 'host state not stored', { error: (e as Error).message }));
  }

  recordCommand(s: AgentSession, id: bigint, vm: LiveVm, vcpu: number, kind: string, purpose: string): void {
    const inserted = this.store.recordCommand({ id, replicaId: this.replicaId, hostId: s.hostId, vm: vm.uuid, generation: vm.generation, vcpu, kind, purpose, sentNs: nowNs() }).catch(() => undefined);
    this.commandRowsInFlight.set(id, inserted);
    void inserted.finally(() => {
      if (this.commandRowsInFlight.get(id) === inserted) this.commandRowsInFlight.delete(id);
    });
  }

  auditBegin(vm: LiveVm, vcpu: number, id: bigint, what: Parameters<NonNullable<LinkHandler['auditBegin']>>[3], purpose: string, by: string | undefined): ((status: string, message: string) => void) | undefined {
    if (what.$case === 'pauseControl') return this.audit.pauseStarted(vm, id, what.paused, by ?? 'analysis');
    return this.audit.commandStarted(vm, vcpu, id, what, purpose, by);
  }

  finishCommand(id: bigint, status: string, message: string): void {
    this.m.commands.inc({ status });
    // After the row's INSERT (both are fire-and-forget on a pool: the UPDATE could otherwise overtake it and be lost).
    const doneNs = nowNs();
    const inserted = this.commandRowsInFlight.get(id);
    const update = () => this.store.finishCommand(id, status, message, doneNs).catch(() => undefined);
    if (inserted) void inserted.then(update);
    else void update();
  }

  nextCommandId(): Promise<bigint> {
    return this.store.nextCommandId();
  }

  /** Write the per-second counters now. */
  flush(): Promise<void> {
    this.flushing = this.flushing.then(async () => {
      const p = this.pending;
      this.pending = emptyPending();
      const seen = new Map<string, bigint>();
      for (const s of this.sessions.values()) if (s.hostId) seen.set(s.hostId, s.lastSeenNs);
      try {
        await this.store.flushCounters(p);
        await this.store.touchHosts(seen);
        this.m.flushes.inc();
      } catch (e) {
        this.log('warn', 'counter flush failed', { error: (e as Error).message });
      }
    });
    return this.flushing;
  }

  /** Resolves when every link message received so far is handled and module work has finished (tests). */
  async settled(): Promise<void> {
    for (let i = 0; i < 50; i++) {
      await Promise.all([...this.sessions.values()].map((s) => s.drained()));
      await Promise.allSettled([...this.jobs]);
      await Promise.all([...this.pushChains.values()]);
      if (!this.jobs.size && !this.pushTimers.size) return;
      await new Promise((r) => setTimeout(r, 25));
    }
  }
}

function factsJson(f: KernelFacts): Record<string, unknown> {
  return { profile: f.profile, qemuStartTimeMs: f.qemuStartTimeMs.toString(), slide: hex(f.slide), textBase: hex(f.textBase), textPhys: hex(f.textPhys) };
}

function factsFrom(d: Record<string, unknown> | null): KernelFacts | undefined {
  if (!d || typeof d['slide'] !== 'string') return undefined;
  return { profile: d['profile'] as string, qemuStartTimeMs: BigInt(d['qemuStartTimeMs'] as string), slide: BigInt(d['slide']), textBase: BigInt(d['textBase'] as string), textPhys: BigInt(d['textPhys'] as string) };
}
