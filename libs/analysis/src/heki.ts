/**
 * Heki on the analysis side (issue #11): per-VM Heki state from the agents' sinks, the fleet view of Heki
 * coverage, the `heki` policy module (expected pins per VM group with a deadline, the denial response
 * pushed to the agent), violation alerts, and the correlation with KVMI CR events of the same VM.
 *
 * State. Agents forward `HekiVmRegistered` (a registration, or the snapshot after a reconnect),
 * `HekiConfigure` and `HekiDenial`. A VM's state is the union of its pins for one boot
 * (`qemu_start_time_ms`); a new boot starts from no pins. Stored in `heki_vms` (one row per VM, JSON
 * state with 0x-hex register values) so every replica's fleet view sees it.
 *
 * Status (what the fleet view says): `heki-unavailable` → "Heki unavailable on host" (ENABLE_CAP failed:
 * nothing the guest could do), `not-pinned` → "guest did not pin", `pinned`, `stopped` (a denial stopped
 * it); KVMI-attached VMs whose VMM never registered them: `not-registered`.
 *
 * Correlation: one attempt = one incident = one alert.
 * - KVMI denies (the write never reaches Heki: no exit): the KVMI module's alert, annotated with the Heki
 *   pins it also violated (`attributes.heki_correlation = kvmi-denied`).
 * - KVMI allows (report mode, or no rule) and Heki denies: the denial is folded into the KVMI alert when
 *   one exists for the same VM, CR and attempted value (action becomes the Heki completion, evidence gains
 *   `heki`), else the Heki alert stands alone; a KVMI detection arriving after the Heki alert folds into it.
 */
import { DenialCompletion, HekiReason, uuidFromBytes, uuidToBytes, type Detection, type LinkRequest } from '@periscope/contracts';
import type { Db } from './db.js';
import { hex } from './evidence.js';
import { hekiBitNames, type HekiModuleParams } from './heki-policy.js';
import type { AgentSession } from './link.js';
import type { Registry } from './metrics.js';
import { choosePolicy, type PolicySpec } from './policy.js';
import { nowNs } from './schema.js';
import type { AlertDraft, AlertRecord, Store } from './store.js';
import { techniqueOf } from './techniques.js';

type Msg<K extends string> = Extract<NonNullable<LinkRequest['message']>, { $case: K }>['value'];

export type HekiStatus = 'heki-unavailable' | 'not-pinned' | 'pinned' | 'stopped';

export const HEKI_STATUS_TEXT: Readonly<Record<HekiStatus | 'not-registered', string>> = {
  'heki-unavailable': 'Heki unavailable on host',
  'not-pinned': 'guest did not pin',
  pinned: 'pinned',
  stopped: 'stopped after a Heki violation',
  'not-registered': 'not registered by its VMM (no Heki forwarding)',
};

/** One VM's Heki state for one boot (bigint registers; the JSON form uses 0x-hex). */
export interface HekiVmRecord {
  uuid: string;
  hostId: string;
  name: string;
  hostHasHeki: boolean;
  configureReasons: string[];
  denialReasons: string[];
  qemuStartTimeMs: bigint;
  registeredNs: bigint;
  pinnedCr0: bigint;
  pinnedCr4: bigint;
  firstPinNs: bigint;
  lastPinNs: bigint;
  configureExits: number;
  denials: number;
  stops: number;
  agentDefault: 'reenter' | 'stop';
  /** The agent applies a STOP_VM completion pushed by analysis (it runs with `--allow-command crash`). */
  stopAllowed: boolean;
  lastDenial: Record<string, string> | null;
  missingAlertId: string;
}

export interface HekiContext {
  readonly db: Db;
  readonly store: Store;
  readonly registry: Registry;
  log(level: 'debug' | 'info' | 'warn' | 'error', msg: string, fields?: Record<string, unknown>): void;
  specs(): PolicySpec[];
  labels(uuid: string): Record<string, string>;
  publish(n: { alert: AlertRecord; outcome: 'created' | 'folded' }): void;
  sessions(): Iterable<AgentSession>;
}

/** How long a KVMI alert waits for the Heki denial of the same attempt (and vice versa). */
export const CORRELATION_WINDOW_MS = 10_000;

const CR_OF: Partial<Record<HekiReason, 0 | 4>> = { [HekiReason.HEKI_REASON_CR0]: 0, [HekiReason.HEKI_REASON_CR4]: 4 };
const REASON_NAME: Partial<Record<HekiReason, string>> = { [HekiReason.HEKI_REASON_CR0]: 'CR0', [HekiReason.HEKI_REASON_CR4]: 'CR4' };
const ms2ns = (ms: number): bigint => BigInt(Math.floor(ms)) * 1_000_000n;

function statusOf(r: HekiVmRecord): HekiStatus {
  if (!r.hostHasHeki) return 'heki-unavailable';
  if (r.stops > 0) return 'stopped';
  return r.configureExits > 0 ? 'pinned' : 'not-pinned';
}

function toJson(r: HekiVmRecord): Record<string, unknown> {
  return JSON.parse(JSON.stringify(r, (k, v: unknown) => (typeof v === 'bigint' ? (k === 'pinnedCr0' || k === 'pinnedCr4' ? hex(v) : v.toString()) : v))) as Record<string, unknown>;
}

function fromJson(j: Record<string, unknown>): HekiVmRecord {
  const b = (k: string): bigint => BigInt((j[k] as string | undefined) ?? '0');
  return {
    ...(j as unknown as HekiVmRecord),
    qemuStartTimeMs: b('qemuStartTimeMs'),
    registeredNs: b('registeredNs'),
    pinnedCr0: b('pinnedCr0'),
    pinnedCr4: b('pinnedCr4'),
    firstPinNs: b('firstPinNs'),
    lastPinNs: b('lastPinNs'),
    stopAllowed: j['stopAllowed'] === true, // rows saved before the field: not known to be allowed
  };
}

interface Incident {
  alertId: string;
  source: 'kvmi' | 'heki';
  atMs: number;
}

export class HekiTracker {
  private readonly vms = new Map<string, HekiVmRecord>();
  private readonly timers = new Map<string, NodeJS.Timeout>();
  private readonly incidents = new Map<string, Incident>();
  private readonly pushedKey = new WeakMap<AgentSession, string>();
  private readonly jobs = new Set<Promise<void>>();
  private readonly m;

  constructor(private readonly ctx: HekiContext) {
    const r = ctx.registry;
    this.m = {
      messages: r.counter('periscope_analysis_heki_messages_total', 'Heki messages from agents, by kind'),
      alerts: r.counter('periscope_analysis_heki_alerts_total', 'Heki alerts, by kind (violation, missing-pin) and outcome'),
      correlated: r.counter('periscope_analysis_heki_correlated_total', 'Heki denials and KVMI CR detections counted as one incident, by case'),
    };
    r.gauge('periscope_analysis_heki_vms', 'VMs with Heki state known to this replica').track(() => this.vms.size);
  }

  /** Load the stored state (fleet view and correlation survive a restart). */
  async load(): Promise<void> {
    for (const row of await this.ctx.db.query<{ state: Record<string, unknown> }>('SELECT state FROM heki_vms')) {
      const r = fromJson(row.state);
      this.vms.set(r.uuid, r);
    }
  }

  stop(): void {
    for (const t of this.timers.values()) clearTimeout(t);
    this.timers.clear();
  }

  /** Resolves when alert work started so far has finished (tests). */
  async settled(): Promise<void> {
    await Promise.allSettled([...this.jobs]);
  }

  /** One VM's record (copy), or undefined. */
  vm(uuid: string): HekiVmRecord | undefined {
    const r = this.vms.get(uuid);
    return r ? { ...r } : undefined;
  }

  // ---------------------------------------------------------------- policy

  /** The `heki` module of the policy that selects this VM (name, host, labels), or undefined. */
  moduleFor(r: { uuid: string; name: string; hostId: string }): { policy: string; params: HekiModuleParams } | undefined {
    const spec = choosePolicy(this.ctx.specs(), { name: r.name, hostId: r.hostId, labels: this.ctx.labels(r.uuid) });
    return spec?.modules.heki ? { policy: spec.name, params: spec.modules.heki } : undefined;
  }

  /** Policies or labels changed: re-arm the missing-pin checks and push the denial responses. */
  refresh(): void {
    for (const r of this.vms.values()) this.arm(r);
    for (const s of this.ctx.sessions()) this.pushPolicy(s);
  }

  /** Send this host's per-VM denial completions when they differ from the last ones sent. */
  pushPolicy(s: AgentSession): void {
    if (s.closed || !s.hostId) return;
    const vms: { vmUuid: Buffer; denialCompletion: DenialCompletion }[] = [];
    for (const r of [...this.vms.values()].sort((a, b) => a.uuid.localeCompare(b.uuid))) {
      if (r.hostId !== s.hostId) continue;
      const mod = this.moduleFor(r);
      if (!mod) continue;
      vms.push({ vmUuid: uuidToBytes(r.uuid), denialCompletion: mod.params.denial === 'stop' ? DenialCompletion.DENIAL_COMPLETION_STOP_VM : DenialCompletion.DENIAL_COMPLETION_INJECT_GP });
    }
    const key = vms.map((v) => `${uuidFromBytes(v.vmUuid)}=${v.denialCompletion}`).join(',');
    if (this.pushedKey.get(s) === key) return;
    this.pushedKey.set(s, key);
    s.send({ $case: 'hekiPolicy', value: { vms } });
    this.ctx.log('debug', 'Heki policy sent', { host: s.hostId, vms: vms.length });
  }

  // ---------------------------------------------------------------- link messages

  async onMessage(s: AgentSession, m: NonNullable<LinkRequest['message']>): Promise<void> {
    switch (m.$case) {
      case 'hekiRegistered':
        this.m.messages.inc({ kind: 'registered' });
        return this.onRegistered(s, m.value);
      case 'hekiConfigure':
        this.m.messages.inc({ kind: 'configure' });
        return this.onConfigure(s, m.value);
      case 'hekiDenial':
        this.m.messages.inc({ kind: 'denial' });
        return this.onDenial(s, m.value);
      default:
        return;
    }
  }

  private async onRegistered(s: AgentSession, g: Msg<'hekiRegistered'>): Promise<void> {
    const uuid = uuidFromBytes(g.vmUuid);
    const old = this.vms.get(uuid);
    const sameBoot = old !== undefined && old.qemuStartTimeMs === g.qemuStartTimeMs;
    const r: HekiVmRecord = {
      uuid,
      hostId: s.hostId,
      name: g.vmName || old?.name || '',
      hostHasHeki: g.hostHasHeki,
      configureReasons: g.configureReasons.map((x) => REASON_NAME[x] ?? String(x)),
      denialReasons: g.denialReasons.map((x) => REASON_NAME[x] ?? String(x)),
      qemuStartTimeMs: g.qemuStartTimeMs,
      registeredNs: sameBoot && old.registeredNs ? old.registeredNs : g.registeredUnixNs || nowNs(),
      // The agent's view is authoritative for its boot; keep what we knew when it knows less (a restarted agent).
      pinnedCr0: g.pinnedCr0 | (sameBoot ? old.pinnedCr0 : 0n),
      pinnedCr4: g.pinnedCr4 | (sameBoot ? old.pinnedCr4 : 0n),
      firstPinNs: sameBoot && old.firstPinNs ? old.firstPinNs : g.firstPinUnixNs,
      lastPinNs: g.lastPinUnixNs > (sameBoot ? old.lastPinNs : 0n) ? g.lastPinUnixNs : sameBoot ? old.lastPinNs : 0n,
      configureExits: Math.max(g.configureExits, sameBoot ? old.configureExits : 0),
      denials: Math.max(g.denials, sameBoot ? old.denials : 0),
      stops: Math.max(g.stops, sameBoot ? old.stops : 0),
      agentDefault: g.defaultCompletion === DenialCompletion.DENIAL_COMPLETION_STOP_VM ? 'stop' : 'reenter',
      stopAllowed: g.analysisStopAllowed,
      lastDenial: sameBoot ? old.lastDenial : null,
      missingAlertId: sameBoot ? old.missingAlertId : '',
    };
    this.vms.set(uuid, r);
    await this.save(r);
    if (!r.hostHasHeki) this.ctx.log('info', 'Heki unavailable on host', { host: s.hostId, vm: r.name || uuid });
    this.arm(r);
    this.pushPolicy(s);
  }

  private async onConfigure(s: AgentSession, c: Msg<'hekiConfigure'>): Promise<void> {
    const uuid = uuidFromBytes(c.vmUuid);
    const r = this.vms.get(uuid);
    if (!r) {
      this.ctx.log('warn', 'Heki configure for a VM never registered: ignored until its registration', { host: s.hostId, vm: uuid });
      return;
    }
    if (c.qemuStartTimeMs && c.qemuStartTimeMs !== r.qemuStartTimeMs) return; // an older boot's exit
    r.pinnedCr0 |= c.pinnedCr0;
    r.pinnedCr4 |= c.pinnedCr4;
    if (CR_OF[c.reason] === 0) r.pinnedCr0 |= c.crPinned;
    else if (CR_OF[c.reason] === 4) r.pinnedCr4 |= c.crPinned;
    const at = c.exitUnixNs || nowNs();
    if (!r.firstPinNs) r.firstPinNs = at;
    if (at > r.lastPinNs) r.lastPinNs = at;
    r.configureExits++;
    await this.save(r);
    if (this.missing(r) === undefined) this.disarm(uuid);
  }

  private async onDenial(s: AgentSession, d: Msg<'hekiDenial'>): Promise<void> {
    const uuid = uuidFromBytes(d.vmUuid);
    const cr = CR_OF[d.reason] ?? 4;
    const crName = `CR${cr}` as const;
    const completion = d.completion === DenialCompletion.DENIAL_COMPLETION_STOP_VM ? 'stop' : 'reenter';
    let r = this.vms.get(uuid);
    if (!r) {
      // A denial before its registration reached us (cannot happen on one stream, but be safe).
      r = {
        uuid, hostId: s.hostId, name: d.vmName, hostHasHeki: true, configureReasons: [], denialReasons: [], qemuStartTimeMs: d.qemuStartTimeMs, registeredNs: nowNs(),
        pinnedCr0: 0n, pinnedCr4: 0n, firstPinNs: 0n, lastPinNs: 0n, configureExits: 0, denials: 0, stops: 0, agentDefault: 'reenter', stopAllowed: false, lastDenial: null, missingAlertId: '',
      };
      this.vms.set(uuid, r);
    }
    const seen = await this.ctx.db.query<{ alert_id: string }>('SELECT alert_id FROM alert_detections WHERE detection_id = $1', [d.detectionId]);
    if (seen[0]) {
      s.send({ $case: 'detectionAck', value: { detectionIds: [d.detectionId] } }); // redelivered after a reconnect
      return;
    }
    r.pinnedCr0 |= d.pinnedCr0;
    r.pinnedCr4 |= d.pinnedCr4;
    r.denials++;
    if (completion === 'stop') r.stops++;
    const heki = {
      detectionId: d.detectionId, cr: crName, attempted: hex(d.attemptedValue), clearedPins: hex(d.clearedPins), clearedBits: hekiBitNames(crName, d.clearedPins).join(' '),
      pinned: hex(cr === 0 ? r.pinnedCr0 : r.pinnedCr4), rip: hex(d.rip), vcpu: String(d.vcpu), completion, decidedBy: d.decidedBy, exitNs: d.exitUnixNs.toString(),
    };
    r.lastDenial = heki;
    await this.save(r);
    const mod = this.moduleFor(r);
    const key = incidentKey(uuid, cr, d.attemptedValue, d.vcpu);
    const kvmi = this.incident(key, 'kvmi');
    const response = completion === 'stop' ? 'heki: VM stopped' : 'heki: #GP injected (re-enter)';
    let result: { alert: AlertRecord; outcome: 'created' | 'folded' };
    if (kvmi) {
      // KVMI allowed the write, Heki denied it: one incident, the KVMI alert.
      const alert = await this.foldInto(kvmi.alertId, d.detectionId, d.exitUnixNs || nowNs(), {
        action: response,
        title: (t) => t.replace(/^Detected: /, 'Blocked: '),
        evidence: { heki },
        attributes: { heki_correlation: 'kvmi-allowed-heki-denied', heki_detection_id: d.detectionId },
      });
      this.incidents.delete(key);
      this.m.correlated.inc({ case: 'kvmi-allowed-heki-denied' });
      result = { alert, outcome: 'folded' };
    } else {
      const rule = `heki/cr${cr}`;
      const tech = techniqueOf('heki', `cr${cr}`);
      const vmName = r.name || uuid;
      const draft: AlertDraft = {
        dedupKey: `${uuid}|${rule}|${hex(d.attemptedValue)}|${hex(d.rip)}|${completion}`,
        severity: mod?.params.severity ?? 'high',
        title: `Blocked: ${tech?.why ?? 'Heki pinned bit cleared'} on ${vmName} vCPU ${d.vcpu}`,
        description: `The guest tried to write ${crName} = ${hex(d.attemptedValue)}, clearing ${heki.clearedBits || hex(d.clearedPins)} pinned with Heki; KVM refused the write (${crName} unchanged) and the VMM was told to ${completion === 'stop' ? 'stop the VM' : 're-enter (KVM injects #GP(0) at the MOV)'}.`,
        technique: { id: tech?.id ?? '', name: tech?.name ?? '' },
        module: 'heki',
        hostId: s.hostId,
        vmUuid: uuid,
        vmName: r.name,
        vcpu: d.vcpu,
        ruleId: `${mod?.policy ?? 'agent'}/${rule}`,
        exceptionId: '',
        policyId: '',
        policyVersion: 0n,
        policyName: mod?.policy ?? '',
        action: response,
        tier: d.decidedBy === 'analysis' ? 'central' : 'local',
        evidence: {
          attempt: { event: 'HEKI_DENIAL', register: crName.toLowerCase(), cr, new: hex(d.attemptedValue), rip: hex(d.rip), clearedPins: hex(d.clearedPins) },
          registers: { rip: hex(d.rip) },
          sregs: { [crName.toLowerCase()]: heki.pinned },
          summary: `Heki denial: ${crName} write clearing ${heki.clearedBits || hex(d.clearedPins)}`,
          attributes: { cr: String(cr), new: hex(d.attemptedValue), heki_completion: completion, heki_decided_by: d.decidedBy },
          session: '',
          seqs: [],
        },
        detectedNs: d.exitUnixNs || nowNs(),
      };
      const x = await this.ctx.store.ingestDetection(d.detectionId, draft);
      if (x.outcome === 'duplicate') {
        s.send({ $case: 'detectionAck', value: { detectionIds: [d.detectionId] } });
        return;
      }
      result = { alert: x.alert, outcome: x.outcome };
      this.incidents.set(key, { alertId: x.alert.id, source: 'heki', atMs: Date.now() });
    }
    this.m.alerts.inc({ kind: 'violation', outcome: result.outcome });
    s.send({ $case: 'detectionAck', value: { detectionIds: [d.detectionId] } });
    this.ctx.publish(result);
  }

  // ---------------------------------------------------------------- KVMI correlation

  /**
   * Store a KVMI detection, as one incident with a Heki denial of the same attempt when there is one.
   * `ingest` is the plain path (Store.ingestDetection).
   */
  async ingestDetection(
    d: Detection,
    draft: AlertDraft,
    ingest: (id: string, draft: AlertDraft) => Promise<{ alert: AlertRecord; outcome: 'created' | 'folded' | 'duplicate' }>,
  ): Promise<{ alert: AlertRecord; outcome: 'created' | 'folded' | 'duplicate' }> {
    const p = d.event?.payload;
    const r = p?.$case === 'cr' ? this.vms.get(draft.vmUuid) : undefined;
    if (!p || p.$case !== 'cr' || !r || !r.hostHasHeki || (p.value.cr !== 0 && p.value.cr !== 4)) return ingest(d.detectionId, draft);
    const cr = p.value.cr as 0 | 4;
    const crName = `CR${cr}` as const;
    const pinned = cr === 0 ? r.pinnedCr0 : r.pinnedCr4;
    const cleared = pinned & ~p.value.newValue;
    if (!cleared) return ingest(d.detectionId, draft);
    const key = incidentKey(r.uuid, cr, p.value.newValue, d.vcpu);
    const blocked = d.verdict?.replyValue !== undefined && (d.verdict.replyValue & cleared) === cleared;
    const hekiAttrs = { heki_pinned: hex(pinned), heki_cleared: hekiBitNames(crName, cleared).join(' ') };
    const earlier = this.incident(key, 'heki');
    if (earlier && !blocked) {
      // The Heki alert came first: this detection is the same attempt.
      const seen = await this.ctx.db.query<{ alert_id: string }>('SELECT alert_id FROM alert_detections WHERE detection_id = $1', [d.detectionId]);
      if (seen[0]) return { alert: (await this.ctx.store.getAlert(seen[0].alert_id, false))!, outcome: 'duplicate' };
      const alert = await this.foldInto(earlier.alertId, d.detectionId, draft.detectedNs, {
        evidence: { kvmi: { ruleId: d.ruleId, action: draft.action, tier: draft.tier, attempt: draft.evidence.attempt } },
        attributes: { ...hekiAttrs, heki_correlation: 'kvmi-allowed-heki-denied', kvmi_rule: d.ruleId },
      });
      this.incidents.delete(key);
      this.m.correlated.inc({ case: 'kvmi-allowed-heki-denied' });
      return { alert, outcome: 'folded' };
    }
    const annotated: AlertDraft = {
      ...draft,
      description: blocked
        ? `${draft.description} — the bits are also pinned with Heki; KVMI denied the write first, so it never reached KVM's Heki check (no Heki exit).`
        : `${draft.description} — KVMI let the write through; the bits are pinned with Heki, so KVM refuses it (Heki denial expected).`,
      evidence: { ...draft.evidence, attributes: { ...draft.evidence.attributes, ...hekiAttrs, heki_correlation: blocked ? 'kvmi-denied' : 'kvmi-allowed' } },
    };
    const x = await ingest(d.detectionId, annotated);
    if (blocked) this.m.correlated.inc({ case: 'kvmi-denied' });
    else if (x.outcome !== 'duplicate') this.incidents.set(key, { alertId: x.alert.id, source: 'kvmi', atMs: Date.now() });
    return x;
  }

  private incident(key: string, source: Incident['source']): Incident | undefined {
    const now = Date.now();
    for (const [k, v] of this.incidents) if (now - v.atMs > CORRELATION_WINDOW_MS) this.incidents.delete(k);
    const i = this.incidents.get(key);
    return i && i.source === source ? i : undefined;
  }

  /** Attach a detection id to an existing alert and merge what it adds (one transaction). */
  private async foldInto(
    alertId: string,
    detectionId: string,
    atNs: bigint,
    patch: { action?: string; title?: (t: string) => string; evidence?: Record<string, unknown>; attributes?: Record<string, string> },
  ): Promise<AlertRecord> {
    await this.ctx.db.transaction(async (tx) => {
      const rows = await tx.query<{ title: string; evidence: Record<string, unknown>; action: string }>('SELECT title, evidence, action FROM alerts WHERE alert_id = $1 FOR UPDATE', [alertId]);
      const row = rows[0];
      if (!row) return;
      const ev = { ...row.evidence, ...(patch.evidence ?? {}) } as Record<string, unknown>;
      ev['attributes'] = { ...((row.evidence['attributes'] as Record<string, string> | undefined) ?? {}), ...(patch.attributes ?? {}) };
      await tx.query('UPDATE alerts SET title = $2, action = $3, evidence = $4::jsonb, last_seen_ns = greatest(last_seen_ns, $5) WHERE alert_id = $1', [
        alertId, patch.title ? patch.title(row.title) : row.title, patch.action ?? row.action, JSON.stringify(ev), atNs,
      ]);
      await tx.query('INSERT INTO alert_detections (detection_id, alert_id, detected_ns) VALUES ($1, $2, $3) ON CONFLICT (detection_id) DO NOTHING', [detectionId, alertId, atNs]);
    });
    return (await this.ctx.store.getAlert(alertId, false))!;
  }

  // ---------------------------------------------------------------- expected pins

  /** The expected bits still missing, or undefined when nothing is expected / all are pinned / N/A. */
  private missing(r: HekiVmRecord): { cr0: bigint; cr4: bigint; params: HekiModuleParams; policy: string } | undefined {
    if (!r.hostHasHeki) return undefined; // "Heki unavailable on host": nothing the guest could do
    const mod = this.moduleFor(r);
    if (!mod || mod.params.pinWithinMs <= 0) return undefined;
    const cr0 = mod.params.expectCr0 & ~r.pinnedCr0;
    const cr4 = mod.params.expectCr4 & ~r.pinnedCr4;
    return cr0 || cr4 ? { cr0, cr4, params: mod.params, policy: mod.policy } : undefined;
  }

  private disarm(uuid: string): void {
    const t = this.timers.get(uuid);
    if (t) clearTimeout(t);
    this.timers.delete(uuid);
  }

  /** (Re)arm the missing-pin check of a VM: at registration + pin-within. */
  private arm(r: HekiVmRecord): void {
    this.disarm(r.uuid);
    const miss = this.missing(r);
    if (!miss || r.missingAlertId) return;
    const deadlineMs = Number(r.registeredNs / 1_000_000n) + miss.params.pinWithinMs;
    const boot = r.qemuStartTimeMs;
    const t = setTimeout(() => {
      this.timers.delete(r.uuid);
      const job = this.checkMissing(r.uuid, boot).catch((e: unknown) => this.ctx.log('warn', 'Heki missing-pin check failed', { vm: r.uuid, error: (e as Error).message }));
      this.jobs.add(job);
      void job.finally(() => this.jobs.delete(job));
    }, Math.max(0, deadlineMs - Date.now()));
    t.unref();
    this.timers.set(r.uuid, t);
  }

  private async checkMissing(uuid: string, boot: bigint): Promise<void> {
    const r = this.vms.get(uuid);
    if (!r || r.qemuStartTimeMs !== boot || r.missingAlertId) return;
    const miss = this.missing(r);
    if (!miss) return;
    const tech = techniqueOf('heki', 'missing-pin');
    const missingNames = [...hekiBitNames('CR0', miss.cr0), ...hekiBitNames('CR4', miss.cr4)];
    const expected = [...hekiBitNames('CR0', miss.params.expectCr0), ...hekiBitNames('CR4', miss.params.expectCr4)];
    const pinned = [...hekiBitNames('CR0', r.pinnedCr0), ...hekiBitNames('CR4', r.pinnedCr4)];
    const within = `${miss.params.pinWithinMs / 1000}s`;
    const draft: AlertDraft = {
      dedupKey: `${uuid}|heki/missing-pin|${boot}`,
      severity: miss.params.missingSeverity,
      title: `Detected: ${r.configureExits ? 'incomplete Heki pins' : 'no Heki pins'} on ${r.name || uuid}: ${missingNames.join(', ')} not pinned within ${within} of its start`,
      description: `Policy ${miss.policy} expects the guest to pin ${expected.join(', ')} within ${within} of the VM's start; ${r.configureExits ? `it pinned ${pinned.join(', ')}` : 'no configure exit arrived'}. The host has Heki, so the guest kernel did not pin (Heki disabled, an old kernel, or a tampered boot).`,
      technique: { id: tech?.id ?? '', name: tech?.name ?? '' },
      module: 'heki',
      hostId: r.hostId,
      vmUuid: uuid,
      vmName: r.name,
      vcpu: null,
      ruleId: `${miss.policy}/heki/missing-pin`,
      exceptionId: '',
      policyId: '',
      policyVersion: 0n,
      policyName: miss.policy,
      action: 'alert',
      tier: 'central',
      evidence: {
        attempt: { event: 'HEKI_MISSING_PIN', expectedCr0: hex(miss.params.expectCr0), expectedCr4: hex(miss.params.expectCr4), pinnedCr0: hex(r.pinnedCr0), pinnedCr4: hex(r.pinnedCr4), missing: missingNames, pinWithinMs: miss.params.pinWithinMs },
        registers: {},
        sregs: {},
        summary: `expected Heki pins missing: ${missingNames.join(', ')}`,
        attributes: { configure_exits: String(r.configureExits), registered_ns: r.registeredNs.toString(), qemu_start_time_ms: boot.toString() },
        session: '',
        seqs: [],
      },
      detectedNs: nowNs(),
    };
    const x = await this.ctx.store.ingestDetection(`heki-missing-pin:${uuid}:${boot}`, draft);
    r.missingAlertId = x.alert.id;
    await this.save(r);
    if (x.outcome === 'duplicate') return;
    this.m.alerts.inc({ kind: 'missing-pin', outcome: x.outcome });
    this.ctx.log('warn', 'Heki pins missing', { vm: r.name || uuid, missing: missingNames });
    this.ctx.publish({ alert: x.alert, outcome: x.outcome });
  }

  // ---------------------------------------------------------------- views

  private async save(r: HekiVmRecord): Promise<void> {
    await this.ctx.db.query(
      `INSERT INTO heki_vms (vm_uuid, host_id, name, status, state, updated_ns) VALUES ($1, $2, $3, $4, $5::jsonb, $6)
       ON CONFLICT (vm_uuid) DO UPDATE SET host_id = $2, name = $3, status = $4, state = $5::jsonb, updated_ns = $6`,
      [r.uuid, r.hostId, r.name, statusOf(r), JSON.stringify(toJson(r)), nowNs()],
    );
  }

  /** A VM's Heki state as the API shows it (0x-hex registers, bit names, the policy's expectation). */
  view(r: HekiVmRecord): Record<string, unknown> {
    const st = statusOf(r);
    const mod = this.moduleFor(r);
    const miss = this.missing(r);
    const stopRefused = mod?.params.denial === 'stop' && !r.stopAllowed;
    const pinWithin = mod?.params.pinWithinMs ?? 0;
    return {
      uuid: r.uuid,
      name: r.name,
      hostId: r.hostId,
      status: st,
      statusText: HEKI_STATUS_TEXT[st],
      hostHasHeki: r.hostHasHeki,
      pinnedCr0: hex(r.pinnedCr0),
      pinnedCr4: hex(r.pinnedCr4),
      pinned: [...hekiBitNames('CR0', r.pinnedCr0), ...hekiBitNames('CR4', r.pinnedCr4)],
      firstPinNs: r.firstPinNs.toString(),
      lastPinNs: r.lastPinNs.toString(),
      registeredNs: r.registeredNs.toString(),
      qemuStartTimeMs: r.qemuStartTimeMs.toString(),
      configureReasons: r.configureReasons,
      denialReasons: r.denialReasons,
      configureExits: r.configureExits,
      denials: r.denials,
      stops: r.stops,
      lastDenial: r.lastDenial,
      // A stop the agent's allow-list refuses is not what happens: the agent's own completion is.
      denialResponse: stopRefused || !mod ? r.agentDefault : mod.params.denial,
      denialResponseFrom: !mod ? 'agent (--heki-denial)' : stopRefused ? `agent (--heki-denial): policy ${mod.policy} asks stop, refused by the agent (needs --allow-command crash)` : `policy ${mod.policy}`,
      expected: mod
        ? {
            policy: mod.policy,
            pins: [...hekiBitNames('CR0', mod.params.expectCr0), ...hekiBitNames('CR4', mod.params.expectCr4)],
            pinWithinMs: pinWithin,
            deadlineNs: pinWithin > 0 ? (r.registeredNs + ms2ns(pinWithin)).toString() : null,
            missing: miss ? [...hekiBitNames('CR0', miss.cr0), ...hekiBitNames('CR4', miss.cr4)] : [],
            compliant: r.hostHasHeki ? !miss : null,
            missingAlertId: r.missingAlertId || null,
          }
        : null,
    };
  }

  /** Fleet view from the database (every replica's agents): per VM, per host, and totals. */
  async fleet(f: { host?: string } = {}, attachedVms: readonly { uuid: string; name: string; hostId: string }[] = []): Promise<Record<string, unknown>> {
    const rows = await this.ctx.db.query<{ state: Record<string, unknown> }>(`SELECT state FROM heki_vms WHERE ($1::text = '' OR host_id = $1) ORDER BY host_id, name, vm_uuid`, [f.host ?? '']);
    const recs = rows.map((x) => fromJson(x.state));
    const views = recs.map((r) => this.view(r));
    const known = new Set(recs.map((r) => r.uuid));
    const unregistered = attachedVms
      .filter((v) => !known.has(v.uuid) && (!f.host || v.hostId === f.host))
      .map((v) => ({ uuid: v.uuid, name: v.name, hostId: v.hostId, status: 'not-registered', statusText: HEKI_STATUS_TEXT['not-registered'] }));
    const count = (s: string) => views.filter((v) => v['status'] === s).length;
    const hosts = new Map<string, { hostId: string; hekiAvailable: boolean | null; vms: number; pinned: number; notPinned: number }>();
    for (const r of recs) {
      const h = hosts.get(r.hostId) ?? { hostId: r.hostId, hekiAvailable: null, vms: 0, pinned: 0, notPinned: 0 };
      h.vms++;
      h.hekiAvailable = (h.hekiAvailable ?? false) || r.hostHasHeki;
      if (statusOf(r) === 'pinned') h.pinned++;
      if (statusOf(r) === 'not-pinned') h.notPinned++;
      hosts.set(r.hostId, h);
    }
    let cr0 = 0n;
    let cr4 = 0n;
    for (const r of recs) {
      cr0 |= r.pinnedCr0;
      cr4 |= r.pinnedCr4;
    }
    return {
      summary: {
        vms: views.length + unregistered.length,
        pinned: count('pinned'),
        notPinned: count('not-pinned'),
        hekiUnavailable: count('heki-unavailable'),
        stopped: count('stopped'),
        notRegistered: unregistered.length,
        missingExpectedPins: views.filter((v) => (v['expected'] as { compliant: boolean | null } | null)?.compliant === false).length,
        pinnedAnywhere: [...hekiBitNames('CR0', cr0), ...hekiBitNames('CR4', cr4)],
      },
      hosts: [...hosts.values()].map((h) => ({ ...h, statusText: h.hekiAvailable === false ? HEKI_STATUS_TEXT['heki-unavailable'] : 'Heki available' })),
      vms: [...views, ...unregistered],
    };
  }

  /** A VM's view for /v1/vms, or null when its VMM never registered it. */
  vmView(uuid: string): Record<string, unknown> | null {
    const r = this.vms.get(uuid);
    return r ? this.view(r) : null;
  }

  /** Every VM's Heki view from the database, by uuid (for /v1/vms). */
  async viewsByUuid(uuid?: string): Promise<Map<string, Record<string, unknown>>> {
    const rows = await this.ctx.db.query<{ state: Record<string, unknown> }>(`SELECT state FROM heki_vms WHERE ($1::text = '' OR vm_uuid = $1)`, [uuid ?? '']);
    return new Map(rows.map((x) => {
      const r = fromJson(x.state);
      return [r.uuid, this.view(r)];
    }));
  }
}

function incidentKey(uuid: string, cr: number, value: bigint, vcpu: number): string {
  return `${uuid}|cr${cr}|${hex(value)}|${vcpu}`;
}
