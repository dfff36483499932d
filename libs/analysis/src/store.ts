/**
 * Every query of the service, written once for both drivers (db.ts). Rows are mapped to plain records;
 * 64-bit values that are guest data are hex strings inside `jsonb`, Unix-ns times are `bigint`.
 */
import { randomUUID } from 'node:crypto';
import type { Db, Queryable, SqlParam } from './db.js';
import { AnalysisError } from './errors.js';
import { specFromJson, specToJson, specDigest, type PolicySpec } from './policy.js';
import type { ExceptionSpec } from './modules.js';

import type { AlertEvidence, AlertRecord, SeverityName } from './alert-types.js';

export type { AlertEvidence, AlertRecord, SeverityName } from './alert-types.js';
export const SEVERITY_NAMES: readonly SeverityName[] = ['info', 'low', 'medium', 'high', 'critical'];
export const severityNumber = (s: SeverityName): number => SEVERITY_NAMES.indexOf(s) + 1;
export const severityName = (n: number): SeverityName => SEVERITY_NAMES[Math.min(Math.max(n, 1), 5) - 1]!;

export interface HostRecord {
  hostId: string;
  agentVersion: string;
  agentInstanceId: string;
  connected: boolean;
  replicaId: string;
  capabilities: string[];
  policyId: string;
  policyVersion: bigint;
  policyState: string;
  policyError: string;
  counters: Record<string, unknown>;
  firstSeenNs: bigint;
  lastSeenNs: bigint;
  attachedVmCount: number;
}

export interface VmRecord {
  uuid: string;
  name: string;
  hostId: string;
  attached: boolean;
  sessionGeneration: bigint;
  qemuStartTimeMs: bigint;
  vcpuCount: number;
  maxGfn: bigint | null;
  dialect: string;
  kvmiVersion: Record<string, unknown>;
  allowedCommands: string[];
  allowedEvents: string[];
  labels: Record<string, string>;
  policyName: string;
  protection: Record<string, unknown>;
  derived: Record<string, unknown> | null;
  attachedNs: bigint;
  detachedNs: bigint;
  detachReason: string;
  lastSeenNs: bigint;
}

/** What ingest computes for a detection before storing it. */
export interface AlertDraft {
  dedupKey: string;
  severity: SeverityName;
  title: string;
  description: string;
  technique: { id: string; name: string };
  module: string;
  hostId: string;
  vmUuid: string;
  vmName: string;
  vcpu: number | null;
  ruleId: string;
  exceptionId: string;
  policyId: string;
  policyVersion: bigint;
  policyName: string;
  action: string;
  tier: string;
  evidence: AlertEvidence;
  detectedNs: bigint;
}

export interface AlertFilter {
  minSeverity?: SeverityName;
  vm?: string;
  host?: string;
  technique?: string;
  module?: string;
  state?: string;
  sinceNs?: bigint;
  /** Alerts with seq < before (paging, newest first). */
  before?: bigint;
  /** Alerts with seq > after (streaming catch-up, oldest first). */
  after?: bigint;
  limit?: number;
}

export interface StoredPolicy {
  name: string;
  version: bigint;
  document: string;
  spec: PolicySpec;
  digest: string;
  source: string;
  createdBy: string;
  createdNs: bigint;
}

export interface StoredException {
  spec: ExceptionSpec;
  createdNs: bigint;
  deleted: boolean;
}

const j = (v: unknown): string => JSON.stringify(v, (_k, x: unknown) => (typeof x === 'bigint' ? `0x${x.toString(16)}` : x));

type R = Record<string, unknown>;
const big = (v: unknown): bigint => (typeof v === 'bigint' ? v : BigInt(v as number | string));

function hostFrom(r: R): HostRecord {
  return {
    hostId: r['host_id'] as string,
    agentVersion: r['agent_version'] as string,
    agentInstanceId: r['agent_instance_id'] as string,
    connected: r['connected'] as boolean,
    replicaId: r['replica_id'] as string,
    capabilities: r['capabilities'] as string[],
    policyId: r['policy_id'] as string,
    policyVersion: big(r['policy_version']),
    policyState: r['policy_state'] as string,
    policyError: r['policy_error'] as string,
    counters: r['counters'] as Record<string, unknown>,
    firstSeenNs: big(r['first_seen_ns']),
    lastSeenNs: big(r['last_seen_ns']),
    attachedVmCount: Number(r['attached_vms'] ?? 0),
  };
}

function vmFrom(r: R): VmRecord {
  return {
    uuid: r['vm_uuid'] as string,
    name: r['name'] as string,
    hostId: r['host_id'] as string,
    attached: r['attached'] as boolean,
    sessionGeneration: big(r['session_generation']),
    qemuStartTimeMs: big(r['qemu_start_time_ms']),
    vcpuCount: r['vcpu_count'] as number,
    maxGfn: r['max_gfn'] === null ? null : big(r['max_gfn']),
    dialect: r['dialect'] as string,
    kvmiVersion: r['kvmi_version'] as Record<string, unknown>,
    allowedCommands: r['allowed_commands'] as string[],
    allowedEvents: r['allowed_events'] as string[],
    labels: r['labels'] as Record<string, string>,
    policyName: r['policy_name'] as string,
    protection: r['protection'] as Record<string, unknown>,
    derived: (r['derived'] as Record<string, unknown> | null) ?? null,
    attachedNs: big(r['attached_ns']),
    detachedNs: big(r['detached_ns']),
    detachReason: r['detach_reason'] as string,
    lastSeenNs: big(r['last_seen_ns']),
  };
}

function alertFrom(r: R): AlertRecord {
  return {
    id: r['alert_id'] as string,
    seq: big(r['seq']),
    state: r['state'] as AlertRecord['state'],
    severity: severityName(r['severity'] as number),
    title: r['title'] as string,
    description: r['description'] as string,
    technique: { id: r['technique'] as string, name: r['technique_name'] as string },
    module: r['module'] as string,
    ruleId: r['rule_id'] as string,
    exceptionId: r['exception_id'] as string,
    policy: { name: r['policy_name'] as string, localId: r['policy_id'] as string, version: big(r['policy_version']) },
    hostId: r['host_id'] as string,
    vm: { uuid: r['vm_uuid'] as string, name: r['vm_name'] as string },
    vcpu: (r['vcpu'] as number | null) ?? null,
    action: r['action'] as string,
    tier: r['tier'] as string,
    evidence: r['evidence'] as AlertEvidence,
    count: big(r['count']),
    firstSeenNs: big(r['first_seen_ns']),
    lastSeenNs: big(r['last_seen_ns']),
    createdNs: big(r['created_ns']),
    acknowledgedBy: r['acknowledged_by'] as string,
    acknowledgedNs: big(r['acknowledged_ns']),
    ackComment: r['ack_comment'] as string,
  };
}

function exceptionFrom(r: R): StoredException {
  const s = r['spec'] as R;
  const range = (x: unknown): { start: bigint; end: bigint } | undefined => (x ? { start: BigInt((x as R)['start'] as string), end: BigInt((x as R)['end'] as string) } : undefined);
  const o = (s['originator'] ?? {}) as R;
  const v = (s['victim'] ?? {}) as R;
  const spec: ExceptionSpec = {
    id: r['exception_id'] as string,
    policy: r['policy_name'] as string,
    module: s['module'] as ExceptionSpec['module'],
    rule: s['rule'] as string,
    vms: (s['vms'] as string[]) ?? [],
    originator: { ...(o['rip'] ? { rip: range(o['rip'])! } : {}), ...(o['symbol'] ? { symbol: o['symbol'] as string } : {}) },
    victim: {
      ...(v['gpa'] ? { gpa: range(v['gpa'])! } : {}),
      ...(v['gva'] ? { gva: range(v['gva'])! } : {}),
      ...(v['cr'] !== undefined ? { cr: v['cr'] as number } : {}),
      ...(v['msr'] !== undefined ? { msr: v['msr'] as number } : {}),
      ...(v['descriptor'] ? { descriptor: v['descriptor'] as 'IDTR' | 'GDTR' } : {}),
      ...(v['newValue'] !== undefined ? { newValue: BigInt(v['newValue'] as string) } : {}),
    },
    action: 'allow',
    expiresNs: big(r['expires_ns']),
    reason: r['reason'] as string,
    createdBy: r['created_by'] as string,
    ...(r['from_alert_id'] ? { fromAlertId: r['from_alert_id'] as string } : {}),
  };
  return { spec, createdNs: big(r['created_ns']), deleted: r['deleted'] as boolean };
}

/** Storm window: a detection folds into an open alert with the same key seen within this many ns. */
export const STORM_WINDOW_NS = 60_000_000_000n;

export class Store {
  constructor(readonly db: Db) {}

  // ---- hosts ----
  async upsertHost(h: { hostId: string; agentVersion: string; agentInstanceId: string; capabilities: string[]; policyId: string; policyVersion: bigint; replicaId: string; nowNs: bigint }): Promise<void> {
    await this.db.query(
      `INSERT INTO hosts (host_id, agent_version, agent_instance_id, connected, replica_id, capabilities, policy_id, policy_version, first_seen_ns, last_seen_ns)
       VALUES ($1, $2, $3, true, $4, $5::jsonb, $6, $7, $8, $8)
       ON CONFLICT (host_id) DO UPDATE SET agent_version = $2, agent_instance_id = $3, connected = true, replica_id = $4, capabilities = $5::jsonb,
         policy_id = $6, policy_version = $7, last_seen_ns = $8`,
      [h.hostId, h.agentVersion, h.agentInstanceId, h.replicaId, j(h.capabilities), h.policyId, h.policyVersion, h.nowNs],
    );
  }

  /**
   * With `replicaId`, only while the host is still recorded on that replica: an agent that already reconnected
   * to another replica (which stored its hello) is not marked down by the replica it left.
   */
  async setHostConnected(hostId: string, connected: boolean, nowNs: bigint, replicaId?: string): Promise<void> {
    const rows = replicaId === undefined
      ? await this.db.query('UPDATE hosts SET connected = $2, last_seen_ns = $3 WHERE host_id = $1 RETURNING host_id', [hostId, connected, nowNs])
      : await this.db.query('UPDATE hosts SET connected = $2, last_seen_ns = $3 WHERE host_id = $1 AND replica_id = $4 RETURNING host_id', [hostId, connected, nowNs, replicaId]);
    if (!connected && rows.length > 0) await this.db.query('UPDATE vms SET attached = false, detached_ns = $2, detach_reason = $3 WHERE host_id = $1 AND attached', [hostId, nowNs, 'link-down']);
  }

  async touchHosts(lastSeen: ReadonlyMap<string, bigint>): Promise<void> {
    for (const [h, ns] of lastSeen) await this.db.query('UPDATE hosts SET last_seen_ns = greatest(last_seen_ns, $2) WHERE host_id = $1', [h, ns]);
  }

  async setHostPolicyStatus(hostId: string, s: { policyId: string; version: bigint; state: string; error: string; activeVersion: bigint }): Promise<void> {
    await this.db.query(
      `UPDATE hosts SET policy_state = $2, policy_error = $3, policy_version = $4,
       policy_id = CASE WHEN $2 = 'active' THEN $5 ELSE policy_id END WHERE host_id = $1`,
      [hostId, s.state, s.error, s.state === 'active' ? s.version : s.activeVersion, s.policyId],
    );
  }

  async setHostCounters(hostId: string, counters: Record<string, unknown>): Promise<void> {
    await this.db.query('UPDATE hosts SET counters = $2::jsonb WHERE host_id = $1', [hostId, j(counters)]);
  }

  async listHosts(opts: { connectedOnly?: boolean; after?: string; limit?: number } = {}): Promise<HostRecord[]> {
    const rows = await this.db.query(
      `SELECT h.*, (SELECT count(*) FROM vms v WHERE v.host_id = h.host_id AND v.attached) AS attached_vms FROM hosts h
       WHERE ($1::boolean = false OR h.connected) AND h.host_id > $2 ORDER BY h.host_id LIMIT $3`,
      [opts.connectedOnly ?? false, opts.after ?? '', opts.limit ?? 1000],
    );
    return rows.map(hostFrom);
  }

  // ---- VMs ----
  async upsertVm(v: {
    uuid: string; name: string; hostId: string; sessionGeneration: bigint; qemuStartTimeMs: bigint; vcpuCount: number; maxGfn: bigint | null;
    dialect: string; kvmiVersion: Record<string, unknown>; allowedCommands: string[]; allowedEvents: string[]; attachedNs: bigint; nowNs: bigint;
  }): Promise<VmRecord> {
    const rows = await this.db.query(
      `INSERT INTO vms (vm_uuid, name, host_id, attached, session_generation, qemu_start_time_ms, vcpu_count, max_gfn, dialect, kvmi_version,
          allowed_commands, allowed_events, attached_ns, detached_ns, detach_reason, last_seen_ns, protection)
       VALUES ($1, $2, $3, true, $4, $5, $6, $7, $8, $9::jsonb, $10::jsonb, $11::jsonb, $12, 0, '', $13, '{}'::jsonb)
       ON CONFLICT (vm_uuid) DO UPDATE SET name = $2, host_id = $3, attached = true, session_generation = $4, qemu_start_time_ms = $5,
          vcpu_count = $6, max_gfn = $7, dialect = $8, kvmi_version = $9::jsonb, allowed_commands = $10::jsonb, allowed_events = $11::jsonb,
          attached_ns = $12, detached_ns = 0, detach_reason = '', last_seen_ns = $13, protection = '{}'::jsonb
       RETURNING *`,
      [v.uuid, v.name, v.hostId, v.sessionGeneration, v.qemuStartTimeMs, v.vcpuCount, v.maxGfn, v.dialect, j(v.kvmiVersion), j(v.allowedCommands), j(v.allowedEvents), v.attachedNs, v.nowNs],
    );
    for (let i = 0; i < v.vcpuCount; i++) {
      await this.db.query('INSERT INTO vcpus (vm_uuid, vcpu, last_seen_ns) VALUES ($1, $2, $3) ON CONFLICT (vm_uuid, vcpu) DO NOTHING', [v.uuid, i, v.nowNs]);
    }
    return vmFrom(rows[0]!);
  }

  async detachVm(uuid: string, generation: bigint, reason: string, nowNs: bigint): Promise<void> {
    await this.db.query('UPDATE vms SET attached = false, detached_ns = $3, detach_reason = $4 WHERE vm_uuid = $1 AND session_generation = $2', [uuid, generation, nowNs, reason]);
  }

  async setVmProtection(uuid: string, protection: Record<string, unknown>): Promise<void> {
    await this.db.query('UPDATE vms SET protection = $2::jsonb WHERE vm_uuid = $1', [uuid, j(protection)]);
  }

  async setVmDerived(uuid: string, derived: Record<string, unknown>): Promise<void> {
    await this.db.query('UPDATE vms SET derived = $2::jsonb WHERE vm_uuid = $1', [uuid, j(derived)]);
  }

  async setVmPolicy(uuid: string, name: string): Promise<void> {
    await this.db.query('UPDATE vms SET policy_name = $2 WHERE vm_uuid = $1', [uuid, name]);
  }

  async setVmLabels(uuid: string, labels: Record<string, string>): Promise<VmRecord> {
    const rows = await this.db.query('UPDATE vms SET labels = $2::jsonb WHERE vm_uuid = $1 RETURNING *', [uuid, j(labels)]);
    if (!rows[0]) throw new AnalysisError('not-found', `no VM ${uuid}`);
    return vmFrom(rows[0]);
  }

  async getVm(uuid: string): Promise<VmRecord | undefined> {
    const rows = await this.db.query('SELECT * FROM vms WHERE vm_uuid = $1', [uuid]);
    return rows[0] ? vmFrom(rows[0]) : undefined;
  }

  async findVm(uuidOrName: string): Promise<VmRecord | undefined> {
    const rows = await this.db.query('SELECT * FROM vms WHERE vm_uuid = $1 OR name = $1 ORDER BY attached DESC, last_seen_ns DESC LIMIT 1', [uuidOrName]);
    return rows[0] ? vmFrom(rows[0]) : undefined;
  }

  async listVms(f: { host?: string; attachedOnly?: boolean; after?: string; limit?: number } = {}): Promise<VmRecord[]> {
    const rows = await this.db.query(
      `SELECT * FROM vms WHERE ($1::text = '' OR host_id = $1) AND ($2::boolean = false OR attached) AND vm_uuid > $3 ORDER BY vm_uuid LIMIT $4`,
      [f.host ?? '', f.attachedOnly ?? false, f.after ?? '', f.limit ?? 1000],
    );
    return rows.map(vmFrom);
  }

  async vmCounters(uuid: string): Promise<{ events: Record<string, bigint>; vcpus: { vcpu: number; events: bigint; lastSeenNs: bigint }[]; verdicts: R[] }> {
    const ev = await this.db.query<{ kind: string; count: bigint }>('SELECT kind, count FROM event_counts WHERE vm_uuid = $1 ORDER BY kind', [uuid]);
    const vc = await this.db.query<{ vcpu: number; events: bigint; last_seen_ns: bigint }>('SELECT vcpu, events, last_seen_ns FROM vcpus WHERE vm_uuid = $1 ORDER BY vcpu', [uuid]);
    const vd = await this.db.query('SELECT rule_id, exception_id, tier, action, count FROM verdict_counts WHERE vm_uuid = $1 ORDER BY count DESC', [uuid]);
    return {
      events: Object.fromEntries(ev.map((r) => [r.kind, big(r.count)])),
      vcpus: vc.map((r) => ({ vcpu: r.vcpu, events: big(r.events), lastSeenNs: big(r.last_seen_ns) })),
      verdicts: vd.map((r) => ({ ruleId: r['rule_id'], exceptionId: r['exception_id'], tier: r['tier'], action: r['action'], count: big(r['count']) })),
    };
  }

  // ---- counters (flushed each second) ----
  async flushCounters(c: {
    events: ReadonlyMap<string, { vm: string; kind: string; count: number; lastNs: bigint }>;
    vcpus: ReadonlyMap<string, { vm: string; vcpu: number; count: number; lastNs: bigint }>;
    verdicts: ReadonlyMap<string, { vm: string; ruleId: string; exceptionId: string; tier: string; action: string; count: number; lastNs: bigint }>;
    vmsSeen: ReadonlyMap<string, bigint>;
  }): Promise<void> {
    if (!c.events.size && !c.vcpus.size && !c.verdicts.size && !c.vmsSeen.size) return;
    await this.db.transaction(async (tx) => {
      for (const e of c.events.values()) {
        await tx.query(
          `INSERT INTO event_counts (vm_uuid, kind, count, last_seen_ns) VALUES ($1, $2, $3, $4)
           ON CONFLICT (vm_uuid, kind) DO UPDATE SET count = event_counts.count + $3, last_seen_ns = greatest(event_counts.last_seen_ns, $4)`,
          [e.vm, e.kind, e.count, e.lastNs],
        );
      }
      for (const v of c.vcpus.values()) {
        await tx.query(
          `INSERT INTO vcpus (vm_uuid, vcpu, events, last_seen_ns) VALUES ($1, $2, $3, $4)
           ON CONFLICT (vm_uuid, vcpu) DO UPDATE SET events = vcpus.events + $3, last_seen_ns = greatest(vcpus.last_seen_ns, $4)`,
          [v.vm, v.vcpu, v.count, v.lastNs],
        );
      }
      for (const v of c.verdicts.values()) {
        await tx.query(
          `INSERT INTO verdict_counts (vm_uuid, rule_id, exception_id, tier, action, count, last_seen_ns) VALUES ($1, $2, $3, $4, $5, $6, $7)
           ON CONFLICT (vm_uuid, rule_id, exception_id, tier, action) DO UPDATE SET count = verdict_counts.count + $6, last_seen_ns = greatest(verdict_counts.last_seen_ns, $7)`,
          [v.vm, v.ruleId, v.exceptionId, v.tier, v.action, v.count, v.lastNs],
        );
      }
      for (const [vm, ns] of c.vmsSeen) await tx.query('UPDATE vms SET last_seen_ns = greatest(last_seen_ns, $2) WHERE vm_uuid = $1', [vm, ns]);
    });
  }

  async recordLoss(l: { hostId: string; vm: string; recordType: string; reason: string; count: bigint; windowEndNs: bigint }): Promise<void> {
    await this.db.query(
      `INSERT INTO losses (host_id, vm_uuid, record_type, reason, count, last_window_end_ns) VALUES ($1, $2, $3, $4, $5, $6)
       ON CONFLICT (host_id, vm_uuid, record_type, reason) DO UPDATE SET count = losses.count + $5, last_window_end_ns = greatest(losses.last_window_end_ns, $6)`,
      [l.hostId, l.vm, l.recordType, l.reason, l.count, l.windowEndNs],
    );
  }

  /** Records the agents reported lost (LossRecord sums), for every VM or one VM. */
  async listLosses(vm?: string): Promise<R[]> {
    const rows = vm === undefined
      ? await this.db.query('SELECT * FROM losses ORDER BY host_id, vm_uuid, record_type, reason')
      : await this.db.query('SELECT * FROM losses WHERE vm_uuid = $1 ORDER BY host_id, record_type, reason', [vm]);
    return rows.map((r) => ({ hostId: r['host_id'], vm: r['vm_uuid'], recordType: r['record_type'], reason: r['reason'], count: big(r['count']) }));
  }

  // ---- alerts ----
  /**
   * Store one agent detection: exactly one alert row per detection id (a redelivered id changes nothing),
   * folded into an open alert with the same dedup key seen within the storm window.
   */
  async ingestDetection(detectionId: string, d: AlertDraft): Promise<{ alert: AlertRecord; outcome: 'created' | 'folded' | 'duplicate' }> {
    return this.db.transaction(async (tx) => {
      const seen = await tx.query<{ alert_id: string }>('SELECT alert_id FROM alert_detections WHERE detection_id = $1', [detectionId]);
      if (seen[0]) return { alert: (await this.getAlertTx(tx, seen[0].alert_id))!, outcome: 'duplicate' as const };
      const open = await tx.query<{ alert_id: string }>(
        `SELECT alert_id FROM alerts WHERE dedup_key = $1 AND state = 'open' AND last_seen_ns >= $2 ORDER BY seq DESC LIMIT 1 FOR UPDATE`,
        [d.dedupKey, d.detectedNs - STORM_WINDOW_NS],
      );
      let alertId: string;
      let outcome: 'created' | 'folded';
      if (open[0]) {
        alertId = open[0].alert_id;
        outcome = 'folded';
        await tx.query('UPDATE alerts SET count = count + 1, last_seen_ns = greatest(last_seen_ns, $2), first_seen_ns = least(first_seen_ns, $2) WHERE alert_id = $1', [alertId, d.detectedNs]);
      } else {
        alertId = randomUUID();
        outcome = 'created';
        await tx.query(
          `INSERT INTO alerts (alert_id, dedup_key, severity, title, description, technique, technique_name, module, host_id, vm_uuid, vm_name, vcpu,
             rule_id, exception_id, policy_id, policy_version, policy_name, action, tier, evidence, count, first_seen_ns, last_seen_ns, created_ns)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20::jsonb, 1, $21, $21, $22)`,
          [alertId, d.dedupKey, severityNumber(d.severity), d.title, d.description, d.technique.id, d.technique.name, d.module, d.hostId, d.vmUuid, d.vmName, d.vcpu,
            d.ruleId, d.exceptionId, d.policyId, d.policyVersion, d.policyName, d.action, d.tier, j(d.evidence), d.detectedNs, BigInt(Date.now()) * 1_000_000n],
        );
      }
      await tx.query('INSERT INTO alert_detections (detection_id, alert_id, detected_ns) VALUES ($1, $2, $3)', [detectionId, alertId, d.detectedNs]);
      return { alert: (await this.getAlertTx(tx, alertId))!, outcome };
    });
  }

  private async getAlertTx(q: Queryable, id: string): Promise<AlertRecord | undefined> {
    const rows = await q.query('SELECT * FROM alerts WHERE alert_id = $1', [id]);
    return rows[0] ? alertFrom(rows[0]) : undefined;
  }

  async getAlert(id: string, withDetections = true): Promise<AlertRecord | undefined> {
    const a = await this.getAlertTx(this.db, id);
    if (a && withDetections) {
      a.detectionIds = (await this.db.query<{ detection_id: string }>('SELECT detection_id FROM alert_detections WHERE alert_id = $1 ORDER BY detected_ns, detection_id LIMIT 1000', [id])).map((r) => r.detection_id);
    }
    return a;
  }

  async listAlerts(f: AlertFilter = {}): Promise<AlertRecord[]> {
    const where: string[] = [];
    const params: SqlParam[] = [];
    const add = (cond: string, v: SqlParam) => {
      params.push(v);
      where.push(cond.replace('?', `$${params.length}`));
    };
    if (f.minSeverity) add('severity >= ?', severityNumber(f.minSeverity));
    if (f.vm) add('(vm_uuid = ? OR vm_name = $X)'.replace('$X', `$${params.length + 1}`), f.vm);
    if (f.host) add('host_id = ?', f.host);
    if (f.technique) add('technique = ?', f.technique);
    if (f.module) add('module = ?', f.module);
    if (f.state) add('state = ?', f.state);
    if (f.sinceNs !== undefined) add('last_seen_ns >= ?', f.sinceNs);
    if (f.before !== undefined) add('seq < ?', f.before);
    if (f.after !== undefined) add('seq > ?', f.after);
    params.push(Math.min(Math.max(f.limit ?? 100, 1), 1000));
    const order = f.after !== undefined ? 'ASC' : 'DESC';
    const rows = await this.db.query(`SELECT * FROM alerts ${where.length ? `WHERE ${where.join(' AND ')}` : ''} ORDER BY seq ${order} LIMIT $${params.length}`, params);
    return rows.map(alertFrom);
  }

  async ackAlert(id: string, by: string, comment: string): Promise<AlertRecord> {
    const rows = await this.db.query(
      `UPDATE alerts SET state = 'acknowledged', acknowledged_by = $2, acknowledged_ns = $3, ack_comment = $4 WHERE alert_id = $1 RETURNING *`,
      [id, by, BigInt(Date.now()) * 1_000_000n, comment],
    );
    if (!rows[0]) throw new AnalysisError('not-found', `no alert ${id}`);
    return alertFrom(rows[0]);
  }

  // ---- policies ----
  /** Store a new version unless the latest one is identical (idempotent import). */
  /**
   * Store a new version when the document changed. `expectedVersion` (optimistic concurrency): the version
   * the caller edited, 0n = the policy must not exist yet; a mismatch throws `conflict`.
   */
  async putPolicy(spec: PolicySpec, document: string, source: string, createdBy: string, expectedVersion?: bigint): Promise<{ policy: StoredPolicy; changed: boolean }> {
    const digest = specDigest(spec);
    return this.db.transaction(async (tx) => {
      await tx.query('SELECT pg_advisory_xact_lock(7403102)');
      const latest = await tx.query('SELECT * FROM policies WHERE name = $1 ORDER BY version DESC LIMIT 1', [spec.name]);
      if (expectedVersion !== undefined) {
        const current = latest[0] && !latest[0]['deleted'] ? big(latest[0]['version']) : 0n;
        if (current !== expectedVersion) {
          throw new AnalysisError('conflict', expectedVersion === 0n ? `policy ${spec.name} already exists (version ${current}); give its version to replace it` : `policy ${spec.name} is at version ${current}, not ${expectedVersion}: re-read it and apply your change again`);
        }
      }
      if (latest[0] && latest[0]['digest'] === digest && !latest[0]['deleted']) return { policy: policyFrom(latest[0]), changed: false };
      const version = latest[0] ? big(latest[0]['version']) + 1n : 1n;
      const rows = await tx.query(
        'INSERT INTO policies (name, version, document, spec, digest, source, created_by, created_ns) VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7, $8) RETURNING *',
        [spec.name, version, document, j(specToJson(spec)), digest, source, createdBy, BigInt(Date.now()) * 1_000_000n],
      );
      return { policy: policyFrom(rows[0]!), changed: true };
    });
  }

  async deletePolicy(name: string, createdBy: string): Promise<void> {
    const latest = await this.getPolicy(name);
    if (!latest) throw new AnalysisError('not-found', `no policy ${name}`);
    await this.db.query(
      'INSERT INTO policies (name, version, document, spec, digest, source, created_by, created_ns, deleted) VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7, $8, true)',
      [name, latest.version + 1n, latest.document, j(specToJson(latest.spec)), 'deleted', 'delete', createdBy, BigInt(Date.now()) * 1_000_000n],
    );
  }

  /** Latest live version of each policy. */
  async listPolicies(): Promise<StoredPolicy[]> {
    const rows = await this.db.query('SELECT DISTINCT ON (name) * FROM policies ORDER BY name, version DESC');
    return rows.filter((r) => !r['deleted']).map(policyFrom);
  }

  async getPolicy(name: string, version?: bigint): Promise<StoredPolicy | undefined> {
    const rows = version === undefined
      ? await this.db.query('SELECT * FROM policies WHERE name = $1 ORDER BY version DESC LIMIT 1', [name])
      : await this.db.query('SELECT * FROM policies WHERE name = $1 AND version = $2', [name, version]);
    return rows[0] && !rows[0]['deleted'] ? policyFrom(rows[0]) : undefined;
  }

  async policyHistory(name: string): Promise<{ version: bigint; createdNs: bigint; createdBy: string; source: string; deleted: boolean }[]> {
    return (await this.db.query('SELECT version, created_ns, created_by, source, deleted FROM policies WHERE name = $1 ORDER BY version', [name])).map((r) => ({
      version: big(r['version']), createdNs: big(r['created_ns']), createdBy: r['created_by'] as string, source: r['source'] as string, deleted: r['deleted'] as boolean,
    }));
  }

  // ---- exceptions ----
  async insertException(e: ExceptionSpec): Promise<StoredException> {
    const spec = { module: e.module, rule: e.rule, vms: e.vms, originator: e.originator, victim: e.victim, action: e.action };
    const rows = await this.db.query(
      `INSERT INTO exceptions (exception_id, policy_name, spec, from_alert_id, reason, created_by, created_ns, expires_ns) VALUES ($1, $2, $3::jsonb, $4, $5, $6, $7, $8) RETURNING *`,
      [e.id, e.policy, j(spec), e.fromAlertId ?? '', e.reason, e.createdBy, BigInt(Date.now()) * 1_000_000n, e.expiresNs],
    );
    return exceptionFrom(rows[0]!);
  }

  async deleteException(id: string): Promise<void> {
    const rows = await this.db.query('UPDATE exceptions SET deleted = true WHERE exception_id = $1 AND NOT deleted RETURNING exception_id', [id]);
    if (!rows[0]) throw new AnalysisError('not-found', `no exception ${id}`);
  }

  async listExceptions(opts: { policy?: string; includeExpired?: boolean; nowNs?: bigint } = {}): Promise<StoredException[]> {
    const rows = await this.db.query(
      `SELECT * FROM exceptions WHERE NOT deleted AND ($1::text = '' OR policy_name = $1) AND ($2::boolean OR expires_ns = 0 OR expires_ns > $3) ORDER BY created_ns, exception_id`,
      [opts.policy ?? '', opts.includeExpired ?? false, opts.nowNs ?? BigInt(Date.now()) * 1_000_000n],
    );
    return rows.map(exceptionFrom);
  }

  async getException(id: string): Promise<StoredException | undefined> {
    const rows = await this.db.query('SELECT * FROM exceptions WHERE exception_id = $1', [id]);
    return rows[0] ? exceptionFrom(rows[0]) : undefined;
  }

  // ---- commands and versions ----
  async nextCommandId(): Promise<bigint> {
    return big((await this.db.query<{ v: bigint }>("SELECT nextval('command_ids') AS v"))[0]!.v);
  }

  async nextLocalPolicyVersion(): Promise<bigint> {
    return big((await this.db.query<{ v: bigint }>("SELECT nextval('local_policy_versions') AS v"))[0]!.v);
  }

  async recordCommand(c: { id: bigint; replicaId: string; hostId: string; vm: string; generation: bigint; vcpu: number; kind: string; purpose: string; sentNs: bigint }): Promise<void> {
    await this.db.query(
      'INSERT INTO commands (correlation_id, replica_id, host_id, vm_uuid, session_generation, vcpu, kind, purpose, sent_ns) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)',
      [c.id, c.replicaId, c.hostId, c.vm, c.generation, c.vcpu, c.kind, c.purpose, c.sentNs],
    );
  }

  async finishCommand(id: bigint, status: string, message: string, doneNs: bigint): Promise<void> {
    await this.db.query('UPDATE commands SET status = $2, message = $3, done_ns = $4 WHERE correlation_id = $1', [id, status, message, doneNs]);
  }

  async listCommands(vm?: string, limit = 100): Promise<R[]> {
    return (await this.db.query(`SELECT * FROM commands WHERE ($1::text = '' OR vm_uuid = $1) ORDER BY correlation_id DESC LIMIT $2`, [vm ?? '', limit])).map((r) => ({
      id: big(r['correlation_id']), vm: r['vm_uuid'], generation: big(r['session_generation']), vcpu: r['vcpu'], kind: r['kind'], purpose: r['purpose'], status: r['status'], message: r['message'], sentNs: big(r['sent_ns']), doneNs: big(r['done_ns']),
    }));
  }
}

function policyFrom(r: R): StoredPolicy {
  return {
    name: r['name'] as string,
    version: big(r['version']),
    document: r['document'] as string,
    spec: specFromJson(r['spec'] as Record<string, unknown>),
    digest: r['digest'] as string,
    source: r['source'] as string,
    createdBy: r['created_by'] as string,
    createdNs: big(r['created_ns']),
  };
}
