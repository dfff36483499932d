/**
 * The host agent, composed: KVMI listener + compiled local rules + metrics + local API.
 * `apps/host-agent` only parses configuration and calls `HostAgent.start()` / `stop()`.
 */
import { startHealthServer, type HealthServer } from '@periscope/contracts';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { existsSync, unlinkSync } from 'node:fs';
import { events, type EventKey } from '@periscope/kvmi';
import { deriveInterception, type Policy } from '@periscope/verdicts';
import type { CookieLookup } from './cookies.js';
import { KvmiListener, type Log } from './kvmi-listener.js';
import { SessionGenerations } from './session-generations.js';
import { Registry, STALL_BUCKETS } from './metrics.js';
import { planFromPolicy, policyDecider, policyNeedsEvent } from './policy-decider.js';
import type { VmConnection } from './vm-connection.js';
import { HekiSink, type HekiPolicy } from './heki/sink.js';
import { vmsWithHeki, vmWithHeki } from './heki/api.js';
import { LINK_STATE_VALUE } from './link/client.js';
import { LinkRuntime, PolicyHolder, type LinkConfig } from './link/runtime.js';

export interface HostAgentOptions {
  hostId: string;
  kvmiPaths: string[];
  cookies: CookieLookup;
  policy: Policy;
  log: Log;
  socketGid?: number;
  /** `host:port` for /metrics and /healthz. */
  metricsListen?: { host: string; port: number };
  /** `host:port` for `grpc.health.v1` (plaintext, health only: kubelet gRPC probes). SERVING while the KVMI listener runs. */
  healthListen?: { host: string; port: number };
  /** Unix socket path for the local API (CLI). */
  apiPath?: string;
  /** Unix socket path for the VMMs' Heki sink (`--heki-listen`); its local policy. */
  hekiListen?: string;
  hekiPolicy?: Partial<HekiPolicy>;
  /** The analysis link (`--analysis`); without it the agent runs standalone on its local rules. */
  link?: LinkConfig;
  /** Persistent state (`--state-dir`): the detection spool, the paused-VM list, planted bytes, session generations. */
  stateDir?: string;
}

const EVENT_NAME = new Map<number, string>(Object.values(events).map((e) => [e.id, e.key]));
const ACTION_NAME = ['CONTINUE', 'RETRY', 'CRASH'];
const INT3 = 0xcc;

export class HostAgent {
  readonly registry = new Registry();
  readonly listener: KvmiListener;
  private metricsServer: Server | undefined;
  private healthServer: HealthServer | undefined;
  private serving = false;
  /** The gRPC health port actually bound (`healthListen` with port 0 picks one). */
  get healthPort(): number | undefined {
    return this.healthServer?.port;
  }
  private apiServer: Server | undefined;
  readonly policies: PolicyHolder;
  readonly link: LinkRuntime | undefined;
  /** The Heki sink (`--heki-listen`): subscribe to its `configure` / `denial` / `registered` events. */
  readonly heki: HekiSink | undefined;

  constructor(private readonly opts: HostAgentOptions) {
    this.policies = new PolicyHolder(opts.policy);
    this.heki = opts.hekiListen
      ? new HekiSink({
          path: opts.hekiListen, log: opts.log, registry: this.registry, ...(opts.hekiPolicy ? { policy: opts.hekiPolicy } : {}), ...(opts.socketGid !== undefined ? { socketGid: opts.socketGid } : {}),
          // With the analysis link: analysis's per-VM completion (pushed, answered from a map) before the local policy.
          ...(opts.link ? { decideDenial: (exit) => this.link?.heki?.decide(exit) ?? Promise.resolve(undefined) } : {}),
        })
      : undefined;
    const r = this.registry;
    const eventsTotal = r.counter('periscope_agent_events_total', 'KVMI vCPU events received, by kind');
    const verdicts = r.counter('periscope_agent_verdicts_total', 'local verdicts, by rule and action');
    const stall = r.histogram('periscope_agent_vcpu_stall_seconds', 'vCPU stall: event received to reply written', STALL_BUCKETS);
    const attached = r.counter('periscope_agent_vm_attach_total', 'VM attaches');
    const detached = r.counter('periscope_agent_vm_detach_total', 'VM detaches, by reason');
    // Label sets are bound once and cached by number/constant keys: no strings built per event.
    const eventCounters = new Map<number, { inc(): void }>();
    const verdictCounters = new Map<number, Map<string, { inc(): void }>>();
    const stallSeries = new Map<number, Map<string | number, { observe(v: number): void }>>();
    this.link = opts.link
      ? new LinkRuntime({
          hostId: opts.hostId,
          config: opts.link,
          stateDir: opts.stateDir,
          policies: this.policies,
          vm: (uuid) => this.listener.vms.get(uuid),
          vms: () => this.listener.vms.values(),
          log: opts.log,
          ...(this.heki ? { heki: this.heki } : {}),
        })
      : undefined;
    const link = this.link;
    const decide = policyDecider(this.policies, (_vm, v) => {
      let ec = eventCounters.get(v.eventId);
      if (!ec) eventCounters.set(v.eventId, (ec = eventsTotal.bind({ kind: EVENT_NAME.get(v.eventId) ?? String(v.eventId) })));
      ec.inc();
      const key = v.ruleIndex * 64 + v.eventId; // a rule may apply to several kinds; defaults are per kind
      let byAction = verdictCounters.get(key);
      if (!byAction) verdictCounters.set(key, (byAction = new Map()));
      let vc = byAction.get(v.kind);
      if (!vc) byAction.set(v.kind, (vc = verdicts.bind({ rule: v.ruleId ?? 'default', action: v.kind })));
      vc.inc();
    }, link ? { onVerdict: (vm, view, v, compiled) => link.onVerdict(vm, view, v, compiled) } : undefined);
    const stallFor = (eventId: number, outcome: string | number) => {
      let byOutcome = stallSeries.get(eventId);
      if (!byOutcome) stallSeries.set(eventId, (byOutcome = new Map()));
      let h = byOutcome.get(outcome);
      if (!h) {
        const action = typeof outcome === 'number' ? (ACTION_NAME[outcome] ?? '?') : outcome;
        byOutcome.set(outcome, (h = stall.bind({ kind: EVENT_NAME.get(eventId) ?? '?', action })));
      }
      return h;
    };
    this.listener = new KvmiListener({
      paths: opts.kvmiPaths,
      cookies: opts.cookies,
      plan: planFromPolicy(deriveInterception(opts.policy)),
      decide,
      log: opts.log,
      generations: new SessionGenerations({ dir: opts.stateDir, log: opts.log }),
      ...(opts.socketGid !== undefined ? { socketGid: opts.socketGid } : {}),
      onAttached: (vm) => {
        attached.inc();
        vm.onStall = (ns, eventId, d) => stallFor(eventId, d.kind === 'reply' ? d.action : d.kind).observe(Number(ns) / 1e9);
        link?.vmAttached(vm);
      },
      onDetached: (vm, reason) => {
        detached.inc({ reason });
        link?.vmDetached(vm, reason);
      },
    });
    this.policies.onSwap = (compiled) => {
      const plan = planFromPolicy(deriveInterception(compiled.policy));
      this.listener.setPlan(plan);
      // Settles when every attached VM has the new interception (the install reports ACTIVE after it).
      return Promise.all(
        [...this.listener.vms.values()].map((vm) =>
          // BREAKPOINT only where a rule is about this VM's breakpoints (the traced VMs), not the whole host.
          vm.extendPlan(policyNeedsEvent(compiled.policy, 'BREAKPOINT', vm.uuid) ? plan : { ...plan, vcpuEvents: plan.vcpuEvents.filter((e) => e !== 'BREAKPOINT') }, () => this.retractableEvents(vm)).catch((e: unknown) => opts.log('warn', `changing interception for the new policy failed: ${(e as Error).message}`, { vm: vm.uuid })),
        ),
      );
    };
    const c = this.listener.counters;
    r.gauge('periscope_agent_vms_attached', 'VMs currently attached').track(() => this.listener.vms.size);
    r.gauge('periscope_agent_connections_total', 'QEMU connections accepted').track(() => c.connections);
    r.gauge('periscope_agent_handshake_refused_total', 'handshakes QEMU refused (cookie mismatch)').track(() => c.handshakeRefusedByQemu);
    r.gauge('periscope_agent_handshake_failures_total', 'handshakes that failed on our side').track(() => c.handshakeFailures);
    r.gauge('periscope_agent_attach_failures_total', 'attach sequences that failed').track(() => c.attachFailures);
    r.gauge('periscope_agent_held_events', 'vCPUs currently waiting for a decision').track(() => [...this.listener.vms.values()].reduce((n, vm) => n + vm.heldCount, 0));
    r.gauge('periscope_agent_policy_version', 'version of the active local policy').track(() => Number(this.policies.current.policy.version));
    if (link) this.linkMetrics(link);
  }

  /**
   * Interception a VM no longer needs, asked when its plan change runs: BREAKPOINT once the active local policy
   * has no rule for this VM's breakpoints (its last trace stopped) — but never while an INT3 analysis planted is
   * in the guest (a policy without the tracing rules can arrive first after a failover: that INT3 must still
   * exit, to be failed open here, never reach the guest as #BP). SINGLESTEP is not an interception (analysis
   * turns it on and off per step), and the rest stays as it was.
   */
  private retractableEvents(vm: VmConnection): EventKey[] {
    if (policyNeedsEvent(this.policies.current.policy, 'BREAKPOINT', vm.uuid)) return [];
    for (const b of vm.rememberedBytes().values()) if (b.written === INT3) return [];
    return ['BREAKPOINT'];
  }

  private linkMetrics(link: LinkRuntime): void {
    const r = this.registry;
    const q = link.queue;
    const h = link.held.stats;
    r.gauge('periscope_agent_link_state', 'analysis link: 0 idle, 1 connecting, 2 up, 3 backoff, 4 stopped').track(() => LINK_STATE_VALUE[link.client.state]);
    r.gauge('periscope_agent_link_connects_total', 'analysis streams opened').track(() => link.client.stats.connects);
    r.gauge('periscope_agent_link_disconnects_total', 'analysis streams lost').track(() => link.client.stats.disconnects);
    r.gauge('periscope_agent_report_queue_depth', 'report records waiting to be sent').track(() => q.depth);
    r.gauge('periscope_agent_report_queue_capacity', 'report queue bound (records)').track(() => q.capacity);
    r.gauge('periscope_agent_reports_sent_total', 'verdict records sent').track(() => q.stats.sentRecords);
    r.gauge('periscope_agent_report_batches_total', 'batch messages sent').track(() => q.stats.verdictBatches + q.stats.eventBatches);
    r.gauge('periscope_agent_reports_dropped_total', 'report records dropped (queue full or link down), each counted in a loss record').track(() => q.stats.dropped);
    r.gauge('periscope_agent_loss_records_total', 'loss records sent').track(() => q.stats.lossRecords);
    r.gauge('periscope_agent_spool_bytes', 'detection spool size in bytes').track(() => link.spool.bytes);
    r.gauge('periscope_agent_spool_detections', 'detections spooled, not yet acknowledged').track(() => link.spool.count);
    r.gauge('periscope_agent_detections_total', 'detections raised (spooled and sent to analysis)').track(() => link.stats.detections);
    r.gauge('periscope_agent_detections_dropped_total', 'detections dropped: spool full').track(() => link.spool.stats.dropped);
    r.gauge('periscope_agent_detections_rate_limited_total', 'detections not raised: the VM exceeded --detection-rate (each counted in a loss record)').track(() => link.stats.detectionsRateLimited);
    r.gauge('periscope_agent_ask_central_held', 'events currently held for a central verdict').track(() => link.held.size);
    const ask = r.gauge('periscope_agent_ask_central_total', 'ask-central events, by outcome');
    ask.track(() => h.central, { outcome: 'central' });
    ask.track(() => h.deadline, { outcome: 'deadline' });
    ask.track(() => h.unavailable, { outcome: 'central_unavailable' });
    ask.track(() => h.holdLimit, { outcome: 'hold_limit' });
    ask.track(() => h.invalid, { outcome: 'invalid_verdict' });
    r.gauge('periscope_agent_verdicts_late_total', 'central verdicts dropped: late, unknown or for an old session').track(() => h.late);
    r.gauge('periscope_agent_commands_total', 'commands from analysis executed').track(() => link.commands.stats.executed);
    r.gauge('periscope_agent_commands_refused_total', 'commands refused by the agent allow-list').track(() => link.commands.stats.refused);
    const heki = link.heki;
    if (heki) r.gauge('periscope_agent_heki_stop_refused_total', 'Heki STOP_VM completions pushed by analysis and refused by the allow-list (needs --allow-command crash), per VM and update').track(() => heki.stats.stopRefused);
    r.gauge('periscope_agent_vms_paused', 'VMs paused by analysis (persisted)').track(() => link.pauses.size);
    const w = link.writes.stats;
    const bp = r.gauge('periscope_agent_analysis_breakpoints_total', "breakpoint events answered by the agent for analysis's tracing, by outcome (docs/tracing.md)");
    bp.track(() => w.breakpointFailOpen, { outcome: 'fail_open_restored' });
    bp.track(() => w.singlestepFailOpen, { outcome: 'singlestep_fail_open' });
    bp.track(() => w.guestBreakpoints, { outcome: 'guest_int3' });
    bp.track(() => w.staleBreakpoints, { outcome: 'stale_int3' });
    r.gauge('periscope_agent_planted_bytes_recovered_total', 'bytes analysis wrote that a re-attach found left in the guest and restored').track(() => w.recoveredBytes);
  }

  async start(): Promise<void> {
    await this.listener.start();
    this.serving = true;
    if (this.opts.healthListen) {
      this.healthServer = await startHealthServer(this.opts.healthListen, ['periscope.agent'], () => this.serving);
      this.opts.log('info', 'grpc.health.v1 listening', { address: this.healthServer.address });
    }
    await this.heki?.start();
    this.link?.start();
    if (this.opts.metricsListen) {
      const { host, port } = this.opts.metricsListen;
      this.metricsServer = createServer((req, res) => this.serveMetrics(req, res));
      await listenHttp(this.metricsServer, { host, port });
      const bound = this.metricsServer.address();
      this.opts.log('info', 'metrics listening', { address: `${host}:${bound && typeof bound === 'object' ? bound.port : port}` });
    }
    if (this.opts.apiPath) {
      if (existsSync(this.opts.apiPath)) unlinkSync(this.opts.apiPath);
      this.apiServer = createServer((req, res) => this.serveApi(req, res));
      await listenHttp(this.apiServer, { path: this.opts.apiPath });
      this.opts.log('info', 'local API listening', { path: this.opts.apiPath });
    }
  }

  /** SIGTERM: detach every VM (guest restored), then stop serving. */
  async stop(deadlineMs = 1000): Promise<void> {
    this.serving = false;
    this.link?.stop();
    await this.listener.stop(deadlineMs);
    await this.link?.drain();
    await this.heki?.stop();
    await Promise.all([this.metricsServer, this.apiServer].map((s) => (s ? new Promise<void>((r) => s.close(() => r())) : undefined)));
    await this.healthServer?.close();
  }

  private serveMetrics(req: IncomingMessage, res: ServerResponse): void {
    if (req.url === '/metrics') {
      res.writeHead(200, { 'content-type': 'text/plain; version=0.0.4' }).end(this.registry.render());
    } else if (req.url === '/healthz') {
      res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ status: 'ok', vms: this.listener.vms.size }));
    } else res.writeHead(404).end();
  }

  private serveApi(req: IncomingMessage, res: ServerResponse): void {
    const send = (code: number, body: unknown): void => {
      res.writeHead(code, { 'content-type': 'application/json' }).end(JSON.stringify(body, (_k, v: unknown) => (typeof v === 'bigint' ? v.toString() : v)));
    };
    const url = new URL(req.url ?? '/', 'http://agent');
    if (url.pathname === '/v1/vms') return send(200, { hostId: this.opts.hostId, vms: vmsWithHeki([...this.listener.vms.values()].map(vmSummary), this.heki) });
    const m = /^\/v1\/vms\/([0-9a-f-]{36})$/.exec(url.pathname);
    if (m) {
      const vm = this.listener.vms.get(m[1]!);
      const body = vmWithHeki(vm ? vmSummary(vm) : undefined, m[1]!, this.heki);
      return body ? send(200, body) : send(404, { error: 'no such VM attached', uuid: m[1] });
    }
    if (url.pathname === '/v1/rules') {
      const p = this.policies.current.policy;
      return send(200, { policy: { id: p.id, version: p.version.toString(), rules: p.rules.length }, rules: p.rules.map((r) => ({ id: r.id, match: r.match, action: r.action })) });
    }
    return send(404, { error: `unknown path ${url.pathname}`, paths: ['/v1/vms', '/v1/vms/{uuid}', '/v1/rules'] });
  }
}

function vmSummary(vm: VmConnection): Record<string, unknown> {
  return { ...(vm.info ?? { uuid: vm.uuid }), state: vm.state, heldEvents: vm.heldCount, vcpusPending: vm.vcpusPending, events: vm.stats.events, skips: vm.stats.skips };
}

function listenHttp(server: Server, at: { host: string; port: number } | { path: string }): Promise<void> {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    if ('path' in at) server.listen(at.path, () => resolve());
    else server.listen(at.port, at.host, () => resolve());
  });
}
