/**
 * The demo's live numbers, gathered once per tick from each host agent's local API (`/v1/vms`) and
 * Prometheus `/metrics` (libs/host-agent: periscope_agent_events_total{kind},
 * periscope_agent_verdicts_total{rule,action}, periscope_agent_vcpu_stall_seconds), and from the
 * analysis service's HTTP API when it runs.
 *
 * Until analysis raises alerts, a *detection* is a local verdict by a policy rule that carries a
 * severity: blocked when its action is not `allow`, reported when the rule itself only reports. An
 * exception that turns a rule's verdict into `allow` is not a detection (as in the policy model).
 */
import type { Policy, Severity } from '@periscope/verdicts';
import { httpGet } from './http.js';
import type { DemoPlan, HostPlan } from './plan.js';
import { parsePrometheus, sumOf, type Sample } from './prom.js';

export const SEVERITY_ORDER: readonly Severity[] = ['critical', 'high', 'medium', 'low', 'info'];

export interface RuleInfo {
  readonly severity?: Severity;
  /** The rule's own action kind; absent = the kind's default (a report-only rule). */
  readonly action?: string;
  readonly askCentral: boolean;
  readonly description?: string;
}

export function ruleInfo(policy: Policy): Map<string, RuleInfo> {
  return new Map(
    policy.rules.map((r) => [
      r.id,
      {
        ...(r.severity ? { severity: r.severity } : {}),
        ...(r.action ? { action: r.action.kind } : {}),
        askCentral: r.askCentral !== undefined,
        ...(r.description ? { description: r.description } : {}),
      },
    ]),
  );
}

/** Which tier decided: a local rule, the policy's default (no rule matched), or an ask-central rule. */
export type Tier = 'local' | 'default' | 'central';

export interface Detection {
  /** ms since the epoch (when the demo saw it). */
  readonly at: number;
  readonly host: string;
  readonly rule: string;
  readonly action: string;
  readonly severity: Severity;
  readonly count: number;
  readonly blocked: boolean;
}

export interface HostView {
  readonly id: string;
  readonly agentUp: boolean;
  readonly vmsAttached: number;
  readonly vmsProtected: number;
  readonly vmsExpected: number;
  readonly eventsTotal: number;
  readonly eventsPerSecond: number;
  readonly detections: number;
  readonly blocked: number;
}

export interface FleetSnapshot {
  readonly at: number;
  readonly uptimeMs: number;
  readonly hosts: readonly HostView[];
  readonly hostsUp: number;
  readonly vmsAttached: number;
  readonly vmsProtected: number;
  readonly vmsExpected: number;
  readonly eventsTotal: number;
  readonly eventsPerSecond: number;
  /** Mean vCPU stall (event received → reply written) over the last tick, µs; null without events. */
  readonly stallMeanUs: number | null;
  readonly verdictsByTier: Readonly<Record<Tier, number>>;
  readonly verdictsByAction: Readonly<Record<string, number>>;
  readonly detectionsBySeverity: Readonly<Record<Severity, number>>;
  readonly blocked: number;
  readonly reported: number;
  /** Newest first. */
  readonly recent: readonly Detection[];
  /** Detections first seen in this poll. */
  readonly fresh: readonly Detection[];
  readonly firstDetection?: { readonly afterMs: number; readonly host: string; readonly rule: string; readonly action: string; readonly severity: Severity };
  readonly analysis?: AnalysisView;
  /** The first alert analysis raised, when the demo first saw it. */
  readonly firstAlert?: { readonly afterMs: number; readonly severity: string; readonly host: string; readonly rule: string; readonly title: string };
  /** Heki (issue #11), when the agents export it: VMs registered with their sinks, configure exits, denials. */
  readonly heki?: { readonly vms: number; readonly configureExits: number; readonly denials: number };
}

/** What the analysis service's HTTP API says (/healthz, /v1/alerts), when it runs. */
export interface AnalysisView {
  readonly url: string;
  readonly up: boolean;
  /** Agents linked to it and VMs it knows live (from /healthz). */
  readonly agents?: number;
  readonly vms?: number;
  /** Alerts by severity (the latest 1000, storms counted once per alert). */
  readonly alertsBySeverity?: Readonly<Record<string, number>>;
}

interface HostState {
  at: number;
  /** The agent's current rules (/v1/rules: the local file, or a policy analysis pushed), refreshed every few polls. */
  rules?: Map<string, RuleInfo>;
  rulesAt?: number;
  events: number;
  stallSum: number;
  stallCount: number;
  verdicts: Map<string, number>;
}

const KEEP_RECENT = 6;

export class FleetCollector {
  private readonly started: number;
  private readonly last = new Map<string, HostState>();
  private readonly recent: Detection[] = [];
  private firstDetection: FleetSnapshot['firstDetection'];
  private firstAlert: FleetSnapshot['firstAlert'];

  constructor(
    private readonly plan: DemoPlan,
    private readonly rules: ReadonlyMap<string, RuleInfo>,
    startedAt = Date.now(),
  ) {
    this.started = startedAt;
  }

  /** One round of requests (each host in parallel); never rejects. */
  async poll(): Promise<FleetSnapshot> {
    const at = Date.now();
    const [hosts, analysis] = await Promise.all([Promise.all(this.plan.hosts.map((h) => this.pollHost(h))), this.pollAnalysis()]);
    const tiers: Record<Tier, number> = { local: 0, default: 0, central: 0 };
    const actions: Record<string, number> = {};
    const severities = Object.fromEntries(SEVERITY_ORDER.map((s) => [s, 0])) as Record<Severity, number>;
    let blocked = 0;
    let reported = 0;
    let stallSum = 0;
    let stallCount = 0;
    const fresh: Detection[] = [];
    let heki: { vms: number; configureExits: number; denials: number } | undefined;
    const views: HostView[] = [];
    for (const [i, h] of this.plan.hosts.entries()) {
      const r = hosts[i]!;
      let hostDetections = 0;
      let hostBlocked = 0;
      let eventsPerSecond = 0;
      if (r.samples) {
        const prev = this.last.get(h.id);
        const hostRules = r.rules ?? prev?.rules;
        const verdicts = new Map<string, number>();
        for (const s of r.samples) {
          if (s.name !== 'periscope_agent_verdicts_total') continue;
          const key = `${s.labels.rule ?? 'default'}\u0000${s.labels.action ?? '?'}`;
          verdicts.set(key, (verdicts.get(key) ?? 0) + s.value);
        }
        if (r.samples.some((x) => x.name === 'periscope_agent_heki_vms')) {
          heki ??= { vms: 0, configureExits: 0, denials: 0 };
          heki.vms += sumOf(r.samples, 'periscope_agent_heki_vms');
          heki.configureExits += sumOf(r.samples, 'periscope_agent_heki_configure_exits_total');
          heki.denials += sumOf(r.samples, 'periscope_agent_heki_denials_total');
        }
        const events = sumOf(r.samples, 'periscope_agent_events_total');
        const sSum = sumOf(r.samples, 'periscope_agent_vcpu_stall_seconds_sum');
        const sCount = sumOf(r.samples, 'periscope_agent_vcpu_stall_seconds_count');
        if (prev && events >= prev.events) {
          eventsPerSecond = ((events - prev.events) * 1000) / Math.max(1, at - prev.at);
          stallSum += sSum - prev.stallSum;
          stallCount += sCount - prev.stallCount;
        }
        for (const [key, n] of verdicts) {
          const [rule, action] = key.split('\u0000') as [string, string];
          const info = hostRules?.get(rule) ?? this.rules.get(rule);
          const tier: Tier = rule === 'default' || !info ? 'default' : info.askCentral ? 'central' : 'local';
          tiers[tier] += n;
          actions[action] = (actions[action] ?? 0) + n;
          const d = classify(info, action);
          if (!d || !info?.severity) continue;
          severities[info.severity] += n;
          hostDetections += n;
          if (d === 'blocked') {
            blocked += n;
            hostBlocked += n;
          } else reported += n;
          const before = prev?.verdicts.get(key) ?? 0;
          if (n > before) {
            const det: Detection = { at, host: h.id, rule, action, severity: info.severity, count: n - before, blocked: d === 'blocked' };
            this.recent.unshift(det);
            fresh.push(det);
            if (this.firstDetection === undefined) this.firstDetection = { afterMs: at - this.started, host: h.id, rule, action, severity: info.severity };
          }
        }
        this.last.set(h.id, { at, events, stallSum: sSum, stallCount: sCount, verdicts, ...(hostRules ? { rules: hostRules } : {}), rulesAt: r.rules ? at : (prev?.rulesAt ?? 0) });
      }
      const prev = this.last.get(h.id);
      views.push({
        id: h.id,
        agentUp: r.up,
        vmsAttached: r.vmsAttached,
        vmsProtected: r.vmsProtected,
        vmsExpected: h.vms,
        eventsTotal: prev?.events ?? 0,
        eventsPerSecond,
        detections: hostDetections,
        blocked: hostBlocked,
      });
    }
    this.recent.splice(KEEP_RECENT);
    return {
      at,
      uptimeMs: at - this.started,
      hosts: views,
      hostsUp: views.filter((v) => v.agentUp).length,
      vmsAttached: views.reduce((n, v) => n + v.vmsAttached, 0),
      vmsProtected: views.reduce((n, v) => n + v.vmsProtected, 0),
      vmsExpected: views.reduce((n, v) => n + v.vmsExpected, 0),
      eventsTotal: views.reduce((n, v) => n + v.eventsTotal, 0),
      eventsPerSecond: views.reduce((n, v) => n + v.eventsPerSecond, 0),
      stallMeanUs: stallCount > 0 ? (stallSum / stallCount) * 1e6 : null,
      verdictsByTier: tiers,
      verdictsByAction: actions,
      detectionsBySeverity: severities,
      blocked,
      reported,
      recent: [...this.recent],
      fresh,
      ...(this.firstDetection ? { firstDetection: this.firstDetection } : {}),
      ...(analysis ? { analysis } : {}),
      ...(this.firstAlert ? { firstAlert: this.firstAlert } : {}),
      ...(heki ? { heki } : {}),
    };
  }

  private async pollAnalysis(): Promise<AnalysisView | undefined> {
    const a = this.plan.analysis;
    if (!a) return undefined;
    const [health, alerts] = await Promise.all([httpGet({ url: `http://${a.http}/healthz` }, 800), httpGet({ url: `http://${a.http}/v1/alerts?limit=1000` }, 800)]);
    const view: { url: string; up: boolean; agents?: number; vms?: number; alertsBySeverity?: Record<string, number> } = { url: a.dashboardUrl, up: health !== null };
    try {
      const h = health?.status === 200 ? (JSON.parse(health.body) as { agents?: unknown; vms?: unknown }) : {};
      if (typeof h.agents === 'number') view.agents = h.agents;
      if (typeof h.vms === 'number') view.vms = h.vms;
      const list = alerts?.status === 200 ? (JSON.parse(alerts.body) as { alerts?: { severity?: unknown; hostId?: unknown; ruleId?: unknown; title?: unknown }[] }).alerts : undefined;
      if (Array.isArray(list)) {
        const oldest = list[list.length - 1];
        if (oldest && this.firstAlert === undefined) {
          const s = (v: unknown): string => (typeof v === 'string' ? v : '');
          this.firstAlert = { afterMs: Date.now() - this.started, severity: s(oldest.severity), host: s(oldest.hostId), rule: s(oldest.ruleId), title: s(oldest.title) };
        }
        const by: Record<string, number> = {};
        for (const x of list) if (typeof x.severity === 'string') by[x.severity] = (by[x.severity] ?? 0) + 1;
        view.alertsBySeverity = by;
      }
    } catch {
      // an answer in another shape: show what we have
    }
    return view;
  }

  private async pollHost(h: HostPlan): Promise<{ up: boolean; vmsAttached: number; vmsProtected: number; samples: Sample[] | null; rules?: Map<string, RuleInfo> }> {
    const last = this.last.get(h.id);
    const wantRules = last?.rulesAt === undefined || Date.now() - last.rulesAt > 5000;
    const [vms, metrics, rules] = await Promise.all([
      httpGet({ socket: h.apiSocket, path: '/v1/vms' }, 800),
      httpGet({ url: `http://${h.metrics}/metrics` }, 800),
      wantRules ? httpGet({ socket: h.apiSocket, path: '/v1/rules' }, 800) : Promise.resolve(null),
    ]);
    let vmsAttached = 0;
    let vmsProtected = 0;
    if (vms?.status === 200) {
      try {
        const body = JSON.parse(vms.body) as { vms?: { state?: string }[] };
        vmsAttached = body.vms?.length ?? 0;
        vmsProtected = body.vms?.filter((v) => v.state === 'protected').length ?? 0;
      } catch {
        // a half-written answer: count nothing this tick
      }
    }
    const ruleMap = rules?.status === 200 ? this.agentRules(rules.body) : undefined;
    return { up: vms !== null, vmsAttached, vmsProtected, samples: metrics?.status === 200 ? parsePrometheus(metrics.body) : null, ...(ruleMap ? { rules: ruleMap } : {}) };
  }

  /**
   * The agent's current rules. Severity and ask-central come from the agent when it reports them, else
   * from the same rule id in the demo's policy file.
   */
  private agentRules(body: string): Map<string, RuleInfo> | undefined {
    try {
      const list = (JSON.parse(body) as { rules?: { id?: unknown; action?: { kind?: unknown }; severity?: unknown; askCentral?: unknown }[] }).rules;
      if (!Array.isArray(list)) return undefined;
      const out = new Map<string, RuleInfo>();
      for (const r of list) {
        if (typeof r.id !== 'string') continue;
        const file = this.rules.get(r.id);
        const severity = typeof r.severity === 'string' && (SEVERITY_ORDER as readonly string[]).includes(r.severity) ? (r.severity as Severity) : file?.severity;
        const action = typeof r.action?.kind === 'string' ? r.action.kind : undefined;
        out.set(r.id, {
          ...(severity ? { severity } : {}),
          ...(action ? { action } : {}),
          askCentral: r.askCentral !== undefined ? r.askCentral !== null : (file?.askCentral ?? false),
        });
      }
      return out;
    } catch {
      return undefined;
    }
  }
}

/** Whether a verdict (rule, action) is a detection: blocked, reported, or none. */
export function classify(info: RuleInfo | undefined, action: string): 'blocked' | 'reported' | undefined {
  if (!info?.severity) return undefined;
  if (action !== 'allow') return 'blocked';
  // allow: a report-only rule (or an allow rule) reports; a blocking rule turned into allow was an exception.
  return info.action === undefined || info.action === 'allow' ? 'reported' : undefined;
}
