/**
 * Several analysis replicas on one PostgreSQL: liveness, operations routed to the replica that owns a VM,
 * and the live alert stream shared by all replicas.
 *
 * - **Ownership.** A VM is owned by the replica its host agent is connected to: the hello stores
 *   `hosts.replica_id`, the attach stores `vms.host_id`. Each replica heartbeats its row in `replicas`
 *   (database clock), so a caller can tell a live owner from a dead one.
 * - **Routing.** `VmOperations.run()` runs an operation here when the VM is live here; otherwise it calls
 *   `ReplicaRouter.runRemote`: the request is written to `routed_operations` and announced with
 *   `NOTIFY periscope_routed_ops` in one transaction. The owner claims it (`pending → running`, only before
 *   its deadline), runs `operations.runLocal`, writes the result or the error (`errorJson`) and announces
 *   it on `periscope_routed_results`; the caller rethrows an error with its original code. The table is the
 *   truth, NOTIFY only wakes: every replica also sweeps the table on its heartbeat, so a missed notification
 *   (the listening connection dropped) delays an operation by one heartbeat, never loses it. A caller that
 *   times out marks a still-pending request `expired`, so it never runs late. A caller whose owner stops or
 *   stops heartbeating (`staleAfterMs`) does not wait for its timeout: on its next heartbeat it expires a
 *   request still pending (not-attached: `runRemote` looks up the owner once more, which the agent may have
 *   moved to) or fails one the owner had started (link-closed: outcome unknown, see the audit log).
 * - **Alerts.** The replica that ingests an alert publishes it to its own streams and sinks (webhook, JSONL:
 *   exactly once, there) and sends `NOTIFY periscope_alerts` with the alert id; every other replica reads
 *   the stored alert and delivers it to its live streams only (WatchAlerts, `/v1/alerts/stream`). When this
 *   replica's listening connection was lost, it catches up on reconnect: alerts stored meanwhile (`seq`
 *   above the highest it had seen) that it neither ingested nor delivered go to its live streams, in `seq`
 *   order (a recent-id set keeps each created alert on a stream once). Counts folded into an existing alert
 *   during the gap are not replayed: the stream shows the alert's next update, the API the stored count.
 * - **Configuration.** Policies, exceptions and labels are stored by whichever replica the operator asked;
 *   `NOTIFY periscope_config` makes the others reload them and push new local policies to their agents.
 *
 * PostgreSQL only: PGlite serves one process (pglite-lock.ts), so there is nobody to route to.
 */
import { randomUUID } from 'node:crypto';
import pg from 'pg';
import type { Db } from './db.js';
import { redact } from './db.js';
import { AnalysisError, isAnalysisError } from './errors.js';
import { errorFromJson, errorJson, type JsonObject, type VmOperations } from './operations.js';
import type { AlertRecord, Store } from './store.js';

export const CHANNEL_OPS = 'periscope_routed_ops';
export const CHANNEL_RESULTS = 'periscope_routed_results';
export const CHANNEL_ALERTS = 'periscope_alerts';
export const CHANNEL_CONFIG = 'periscope_config';

type LogFn = (level: 'debug' | 'info' | 'warn' | 'error', msg: string, fields?: Record<string, unknown>) => void;

export interface ReplicaTuning {
  /** Heartbeat and table sweep period (default 1000 ms). */
  readonly heartbeatMs?: number;
  /** A replica whose heartbeat is older than this is dead to the others (default 10 s). */
  readonly staleAfterMs?: number;
  /** How long a caller waits for a routed operation's result (default: command timeout + 10 s). */
  readonly routeTimeoutMs?: number;
}

export interface ReplicaRouterOptions extends ReplicaTuning {
  readonly replicaId: string;
  /** The `postgres://…` URL: the router keeps one dedicated connection for LISTEN. */
  readonly connectionString: string;
  readonly db: Db;
  readonly store: Store;
  readonly operations: VmOperations;
  readonly commandTimeoutMs: number;
  readonly log: LogFn;
  /** Deliver an alert another replica ingested to this replica's live streams (not to its sinks). */
  readonly deliverAlert: (alert: AlertRecord, outcome: 'created' | 'folded') => void;
  /** Another replica changed policies/exceptions (no `vmUuid`) or one VM's labels: reload and push. */
  readonly configChanged: (vmUuid: string | undefined) => Promise<void>;
  /** This replica's addresses, shown in `replicas` (diagnostics). */
  readonly addresses: () => { grpc: string; http: string };
}

interface Waiter {
  readonly target: string;
  readonly name: string;
  readonly vmUuid: string;
  readonly resolve: (r: JsonObject) => void;
  readonly reject: (e: Error) => void;
}

interface OwnerRow {
  attached: boolean;
  connected: boolean;
  replica_id: string;
  alive: boolean | null;
  age_s: string | number | null;
  stopped: boolean | null;
  [k: string]: unknown;
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

export class ReplicaRouter {
  readonly replicaId: string;
  private readonly heartbeatMs: number;
  private readonly staleAfterMs: number;
  private readonly routeTimeoutMs: number;
  private listener: pg.Client | undefined;
  private heartbeat: NodeJS.Timeout | undefined;
  private reconnectTimer: NodeJS.Timeout | undefined;
  private reconnectDelay = 250;
  private stopping = false;
  private ticks = 0;
  private readonly waiters = new Map<string, Waiter>();
  private readonly running = new Map<string, Promise<void>>();
  private alertChain: Promise<void> = Promise.resolve();
  private configChain: Promise<void> = Promise.resolve();
  private notifyChain: Promise<void> = Promise.resolve();
  readonly stats = { routedOut: 0, routedIn: 0, remoteAlerts: 0, listenReconnects: 0, sweptOps: 0, sweptResults: 0, ownerLost: 0, alertsCaughtUp: 0 };
  /** Highest alert `seq` this replica has published or delivered (the catch-up point after a lost channel). */
  private maxAlertSeq = 0n;
  /** Set when the listening connection is lost: catch up on alerts above this `seq` once it is back. */
  private alertGapFromSeq: bigint | undefined;
  /** Created alerts recently on this replica's live streams (own or delivered), so none is delivered twice. */
  private readonly recentAlerts = new Set<string>();

  private constructor(private readonly o: ReplicaRouterOptions) {
    this.replicaId = o.replicaId;
    this.heartbeatMs = o.heartbeatMs ?? 1000;
    this.staleAfterMs = o.staleAfterMs ?? 10_000;
    this.routeTimeoutMs = o.routeTimeoutMs ?? o.commandTimeoutMs + 10_000;
  }

  /** Register this replica (refusing an id a running replica uses), LISTEN, start the heartbeat. */
  static async start(o: ReplicaRouterOptions): Promise<ReplicaRouter> {
    const r = new ReplicaRouter(o);
    await r.claimReplicaId();
    const top = await o.db.query<{ seq: string | null }>('SELECT max(seq)::text AS seq FROM alerts');
    r.maxAlertSeq = BigInt(top[0]?.seq ?? '0');
    await r.listen();
    r.heartbeat = setInterval(() => void r.tick(), r.heartbeatMs);
    r.heartbeat.unref();
    return r;
  }

  /** `VmOperations`' remote runner: run `name` on the replica that owns `vmUuid`. */
  readonly runRemote = async (vmUuid: string, name: string, args: JsonObject, by: string): Promise<JsonObject> => {
    for (let attempt = 0; ; attempt++) {
      const owner = await this.ownerOf(vmUuid);
      if (owner.replica === this.replicaId) return this.o.operations.runLocal(vmUuid, name, args, by);
      try {
        return await this.route(owner.replica, vmUuid, name, args, by);
      } catch (e) {
        // The agent may have moved between the lookup and the run: look again once.
        if (attempt === 0 && isAnalysisError(e, 'not-attached')) {
          await sleep(Math.min(500, this.heartbeatMs));
          continue;
        }
        throw e;
      }
    }
  };

  /** An alert this replica ingested (and published locally): tell the other replicas. */
  alertPublished(alert: AlertRecord, outcome: 'created' | 'folded'): void {
    if (this.stopping) return;
    this.sawAlert(alert, outcome);
    const payload = JSON.stringify({ alert: alert.id, outcome, from: this.replicaId });
    // One chain: the others see this replica's alerts in the order it published them.
    this.notifyChain = this.notifyChain
      .then(() => this.o.db.query('SELECT pg_notify($1, $2)', [CHANNEL_ALERTS, payload]))
      .then(
        () => undefined,
        (e: unknown) => this.o.log('warn', 'alert notification not sent: other replicas\' live streams miss it', { alert: alert.id, error: (e as Error).message }),
      );
  }

  /** Policies/exceptions (or one VM's labels) changed here: the other replicas reload. */
  configChanged(vmUuid?: string): void {
    if (this.stopping) return;
    const payload = JSON.stringify({ from: this.replicaId, ...(vmUuid ? { vm: vmUuid } : {}) });
    this.notifyChain = this.notifyChain
      .then(() => this.o.db.query('SELECT pg_notify($1, $2)', [CHANNEL_CONFIG, payload]))
      .then(
        () => undefined,
        (e: unknown) => this.o.log('warn', 'configuration change not announced to the other replicas', { error: (e as Error).message }),
      );
  }

  async stop(): Promise<void> {
    this.stopping = true;
    if (this.heartbeat) clearInterval(this.heartbeat);
    if (this.reconnectTimer) clearTimeout(this.reconnectTimer);
    for (const [id, w] of this.waiters) {
      this.waiters.delete(id);
      w.reject(new AnalysisError('link-closed', `replica ${this.replicaId} is stopping: routed operation ${id} abandoned`));
    }
    await Promise.allSettled([...this.running.values()]);
    await this.notifyChain;
    await this.o.db.query('UPDATE replicas SET stopped = true, heartbeat_at = now() WHERE replica_id = $1', [this.replicaId]).catch(() => undefined);
    const l = this.listener;
    this.listener = undefined;
    await l?.end().catch(() => undefined);
  }

  // ------------------------------------------------------------------------------------------ ownership

  /** The replica that owns the VM, or `not-attached` with the reason. */
  private async ownerOf(vmUuid: string): Promise<{ replica: string }> {
    const rows = await this.o.db.query<OwnerRow>(
      `SELECT v.attached, h.connected, h.replica_id, r.stopped,
              (now() - r.heartbeat_at) < make_interval(secs => $2::float8) AS alive,
              extract(epoch FROM now() - r.heartbeat_at) AS age_s
         FROM vms v JOIN hosts h ON h.host_id = v.host_id LEFT JOIN replicas r ON r.replica_id = h.replica_id
        WHERE v.vm_uuid = $1`,
      [vmUuid, this.staleAfterMs / 1000],
    );
    const r = rows[0];
    if (!r) throw new AnalysisError('not-found', `no VM ${vmUuid}`);
    if (!r.attached || !r.connected || !r.replica_id) throw new AnalysisError('not-attached', `VM ${vmUuid} is not attached through any replica (its agent is not connected)`);
    if (r.replica_id === this.replicaId) return { replica: r.replica_id };
    if (r.alive === null) throw new AnalysisError('not-attached', `VM ${vmUuid} is owned by replica ${r.replica_id}, which is not registered (an analysis older than replica routing?)`);
    if (r.stopped || !r.alive) {
      const age = Math.round(Number(r.age_s ?? 0));
      throw new AnalysisError('not-attached', `VM ${vmUuid} is owned by replica ${r.replica_id}, which ${r.stopped ? 'stopped' : `is not responding (last heartbeat ${age} s ago)`}; its agent reconnects to another replica — retry shortly`);
    }
    return { replica: r.replica_id };
  }

  // ------------------------------------------------------------------------------------------ caller side

  private async route(target: string, vmUuid: string, name: string, args: JsonObject, by: string): Promise<JsonObject> {
    if (this.stopping) throw new AnalysisError('link-closed', `replica ${this.replicaId} is stopping`);
    const id = randomUUID();
    const done = new Promise<JsonObject>((resolve, reject) => this.waiters.set(id, { target, name, vmUuid, resolve, reject }));
    this.stats.routedOut++;
    try {
      await this.o.db.transaction(async (tx) => {
        await tx.query(
          `INSERT INTO routed_operations (op_id, vm_uuid, name, args, requested_by, origin_replica, target_replica, deadline_at)
           VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7, now() + make_interval(secs => $8::float8))`,
          [id, vmUuid, name, JSON.stringify(args), by, this.replicaId, target, this.routeTimeoutMs / 1000],
        );
        await tx.query('SELECT pg_notify($1, $2)', [CHANNEL_OPS, JSON.stringify({ id, to: target })]);
      });
    } catch (e) {
      this.waiters.delete(id);
      throw e;
    }
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<JsonObject>((resolve, reject) => {
      timer = setTimeout(() => void this.expire(id, target, name, vmUuid).then(resolve, reject), this.routeTimeoutMs);
    });
    try {
      return await Promise.race([done, timeout]);
    } finally {
      clearTimeout(timer);
      this.waiters.delete(id);
    }
  }

  /** The caller's deadline passed: never let the request run late; report what the owner did. */
  private async expire(id: string, target: string, name: string, vmUuid: string): Promise<JsonObject> {
    const expired = await this.o.db.query(`UPDATE routed_operations SET state = 'expired', done_at = now() WHERE op_id = $1 AND state = 'pending' RETURNING op_id`, [id]);
    if (expired.length) throw new AnalysisError('command-timeout', `replica ${target} (owner of VM ${vmUuid}) did not take ${name} within ${this.routeTimeoutMs} ms; it will not run`);
    const settled = await this.settleFromTable([id]);
    if (settled) return settled; // finished just now
    throw new AnalysisError('command-timeout', `replica ${target} started ${name} on VM ${vmUuid} but gave no result within ${this.routeTimeoutMs} ms`);
  }

  /**
   * Waiters whose owner replica stopped or stopped heartbeating: fail them now, not at the route timeout. A
   * request still pending is expired first (it never runs late); one the owner started has an unknown outcome.
   */
  private async failOwnerLost(): Promise<void> {
    const targets = [...new Set([...this.waiters.values()].map((w) => w.target))];
    const rows = await this.o.db.query<{ replica_id: string; stopped: boolean; alive: boolean; age_s: string | number }>(
      `SELECT replica_id, stopped, (now() - heartbeat_at) < make_interval(secs => $2::float8) AS alive, extract(epoch FROM now() - heartbeat_at) AS age_s
         FROM replicas WHERE replica_id = ANY($1::text[])`,
      [`{${targets.map((t) => `"${t}"`).join(',')}}`, this.staleAfterMs / 1000],
    );
    const lost = new Map<string, string>();
    for (const r of rows) if (r.stopped || !r.alive) lost.set(r.replica_id, r.stopped ? 'stopped' : `stopped responding (last heartbeat ${Math.round(Number(r.age_s))} s ago)`);
    if (!lost.size) return;
    for (const [id, w] of [...this.waiters]) {
      const why = lost.get(w.target);
      if (!why) continue;
      const expired = await this.o.db.query(`UPDATE routed_operations SET state = 'expired', done_at = now() WHERE op_id = $1 AND state = 'pending' RETURNING op_id`, [id]);
      if (!this.waiters.has(id)) continue; // settled meanwhile
      if (!expired.length && (await this.settleFromTable([id]))) continue; // it finished after all
      this.waiters.delete(id);
      this.stats.ownerLost++;
      this.o.log('warn', 'routed operation failed: its owner replica is gone', { op: id, name: w.name, vm: w.vmUuid, owner: w.target, started: !expired.length });
      w.reject(
        expired.length
          ? new AnalysisError('not-attached', `replica ${w.target} (owner of VM ${w.vmUuid}) ${why} before taking ${w.name}; it will not run`)
          : new AnalysisError('link-closed', `replica ${w.target} (owner of VM ${w.vmUuid}) ${why} while running ${w.name}: its outcome is unknown (see the audit log)`),
      );
    }
  }

  /** Settle waiters whose rows are finished. Returns, for a single id, the promise of its outcome. */
  private async settleFromTable(ids: readonly string[]): Promise<Promise<JsonObject> | undefined> {
    if (!ids.length) return undefined;
    const rows = await this.o.db.query<{ op_id: string; state: string; result: JsonObject | null; error: JsonObject | null }>(
      `SELECT op_id, state, result, error FROM routed_operations WHERE op_id = ANY($1::text[]) AND state IN ('done', 'failed')`,
      [`{${ids.map((i) => `"${i}"`).join(',')}}`],
    );
    let single: Promise<JsonObject> | undefined;
    for (const r of rows) {
      const outcome = r.state === 'done' ? Promise.resolve(r.result ?? {}) : Promise.reject(errorFromJson(r.error ?? {}));
      const w = this.waiters.get(r.op_id);
      if (w) {
        this.waiters.delete(r.op_id);
        outcome.then(w.resolve, w.reject);
      }
      if (ids.length === 1) single = outcome;
    }
    single?.catch(() => undefined);
    return single;
  }

  // ------------------------------------------------------------------------------------------ owner side

  /** Claim and run one routed operation addressed to this replica (at most once: the claim is a state change). */
  private handleOp(id: string): void {
    if (this.stopping || this.running.has(id)) return;
    const p = (async () => {
      const claimed = await this.o.db.query<{ vm_uuid: string; name: string; args: JsonObject; requested_by: string; origin_replica: string }>(
        `UPDATE routed_operations SET state = 'running'
          WHERE op_id = $1 AND target_replica = $2 AND state = 'pending' AND deadline_at > now()
        RETURNING vm_uuid, name, args, requested_by, origin_replica`,
        [id, this.replicaId],
      );
      const op = claimed[0];
      if (!op) return;
      this.stats.routedIn++;
      let state: 'done' | 'failed';
      let result: JsonObject | null = null;
      let error: JsonObject | null = null;
      try {
        result = await this.o.operations.runLocal(op.vm_uuid, op.name, op.args ?? {}, op.requested_by);
        state = 'done';
      } catch (e) {
        error = errorJson(e);
        state = 'failed';
      }
      await this.o.db.transaction(async (tx) => {
        await tx.query('UPDATE routed_operations SET state = $2, result = $3::jsonb, error = $4::jsonb, done_at = now() WHERE op_id = $1', [
          id, state, result === null ? null : JSON.stringify(result), error === null ? null : JSON.stringify(error),
        ]);
        await tx.query('SELECT pg_notify($1, $2)', [CHANNEL_RESULTS, JSON.stringify({ id, to: op.origin_replica })]);
      });
      this.o.log('debug', 'routed operation run', { id, op: op.name, vm: op.vm_uuid, from: op.origin_replica, state });
    })()
      .catch((e: unknown) => this.o.log('warn', 'routed operation failed to run', { id, error: (e as Error).message }))
      .finally(() => this.running.delete(id));
    this.running.set(id, p);
  }

  // ------------------------------------------------------------------------------------------ notifications

  private onNotification(channel: string, payload: string | undefined): void {
    let m: Record<string, unknown>;
    try {
      m = JSON.parse(payload ?? '') as Record<string, unknown>;
    } catch {
      return;
    }
    if (channel === CHANNEL_OPS) {
      if (m['to'] === this.replicaId && typeof m['id'] === 'string') this.handleOp(m['id']);
    } else if (channel === CHANNEL_RESULTS) {
      if (m['to'] === this.replicaId && typeof m['id'] === 'string' && this.waiters.has(m['id'])) {
        void this.settleFromTable([m['id']]).catch((e: unknown) => this.o.log('warn', 'routed result not read', { error: (e as Error).message }));
      }
    } else if (channel === CHANNEL_CONFIG) {
      if (m['from'] === this.replicaId) return;
      const vm = typeof m['vm'] === 'string' ? m['vm'] : undefined;
      this.configChain = this.configChain.then(() =>
        this.o.configChanged(vm).catch((e: unknown) => this.o.log('warn', 'configuration from another replica not applied', { error: (e as Error).message })),
      );
    } else if (channel === CHANNEL_ALERTS) {
      const alertId = m['alert'];
      const outcome = m['outcome'];
      if (m['from'] === this.replicaId || typeof alertId !== 'string' || (outcome !== 'created' && outcome !== 'folded')) return;
      this.alertChain = this.alertChain.then(async () => {
        try {
          if (outcome === 'created' && this.recentAlerts.has(alertId)) return; // caught up already
          const alert = await this.o.store.getAlert(alertId, false);
          if (!alert) return;
          this.stats.remoteAlerts++;
          this.sawAlert(alert, outcome);
          this.o.deliverAlert(alert, outcome);
        } catch (e) {
          this.o.log('warn', 'alert from another replica not read', { alert: alertId, error: (e as Error).message });
        }
      });
    }
  }

  private sawAlert(alert: AlertRecord, outcome: 'created' | 'folded'): void {
    if (alert.seq > this.maxAlertSeq) this.maxAlertSeq = alert.seq;
    if (outcome !== 'created') return;
    this.recentAlerts.add(alert.id);
    if (this.recentAlerts.size > 4096) this.recentAlerts.delete(this.recentAlerts.values().next().value!);
  }

  /** The listening connection is back: alerts other replicas stored while it was down, to the live streams. */
  private catchUpAlerts(): void {
    const from = this.alertGapFromSeq;
    if (from === undefined) return;
    this.alertChain = this.alertChain.then(async () => {
      try {
        const rows = await this.o.db.query<{ alert_id: string }>('SELECT alert_id FROM alerts WHERE seq > $1 ORDER BY seq LIMIT 10000', [from.toString()]);
        let n = 0;
        for (const r of rows) {
          if (this.recentAlerts.has(r.alert_id)) continue;
          const alert = await this.o.store.getAlert(r.alert_id, false);
          if (!alert) continue;
          this.sawAlert(alert, 'created');
          this.o.deliverAlert(alert, 'created');
          n++;
        }
        this.stats.alertsCaughtUp += n;
        if (this.alertGapFromSeq === from) this.alertGapFromSeq = undefined;
        if (n) this.o.log('info', 'alerts stored by other replicas while the notification channel was down: delivered to the live streams', { alerts: n });
      } catch (e) {
        this.o.log('warn', 'alerts missed while the notification channel was down: catch-up failed, retried at the next reconnect', { error: (e as Error).message });
      }
    });
  }

  private async listen(): Promise<void> {
    // Named, so an operator can find it in pg_stat_activity.
    const c = new pg.Client({ connectionString: this.o.connectionString, application_name: `periscope-notify:${this.replicaId}` });
    c.on('notification', (n) => this.onNotification(n.channel, n.payload));
    const lost = (why: string) => {
      if (this.listener !== c) return;
      this.listener = undefined;
      c.end().catch(() => undefined);
      if (this.stopping) return;
      this.alertGapFromSeq ??= this.maxAlertSeq;
      this.o.log('warn', 'replica notification channel lost: reconnecting (routed operations and results are swept from the table meanwhile, alerts caught up after)', { error: why });
      this.scheduleListen();
    };
    c.on('error', (e) => lost(e.message));
    c.on('end', () => lost('connection ended'));
    try {
      await c.connect();
      await c.query(`LISTEN ${CHANNEL_OPS}; LISTEN ${CHANNEL_RESULTS}; LISTEN ${CHANNEL_ALERTS}; LISTEN ${CHANNEL_CONFIG}`);
    } catch (e) {
      await c.end().catch(() => undefined);
      throw new AnalysisError('db-error', `cannot LISTEN on PostgreSQL (${redact(this.o.connectionString)}): ${(e as Error).message}`, { cause: e });
    }
    this.listener = c;
    this.reconnectDelay = 250;
  }

  private scheduleListen(): void {
    if (this.stopping || this.reconnectTimer) return;
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = undefined;
      this.listen().then(
        () => {
          this.stats.listenReconnects++;
          this.o.log('info', 'replica notification channel back');
          this.catchUpAlerts();
          void this.tick();
        },
        (e: unknown) => {
          this.o.log('warn', 'replica notification channel: reconnect failed', { error: (e as Error).message });
          this.reconnectDelay = Math.min(this.reconnectDelay * 2, 5000);
          this.scheduleListen();
        },
      );
    }, this.reconnectDelay);
    this.reconnectTimer.unref();
  }

  // ------------------------------------------------------------------------------------------ heartbeat

  private async claimReplicaId(): Promise<void> {
    const read = () =>
      this.o.db.query<{ stopped: boolean; fresh: boolean; beat: string }>(
        `SELECT stopped, (now() - heartbeat_at) < make_interval(secs => $2::float8) AS fresh, heartbeat_at::text AS beat FROM replicas WHERE replica_id = $1`,
        [this.replicaId, this.staleAfterMs / 1000],
      );
    const before = (await read())[0];
    if (before && !before.stopped && before.fresh) {
      // Either a running replica with the same id, or this replica's previous life (killed): a running one beats.
      await sleep(this.heartbeatMs * 2 + 200);
      const after = (await read())[0];
      if (after && !after.stopped && after.beat !== before.beat) {
        throw new AnalysisError('conflict', `replica id ${this.replicaId} is in use by another running replica on this database; give each replica its own --replica-id`);
      }
    }
    await this.beat();
  }

  private async beat(): Promise<void> {
    const addr = this.o.addresses();
    await this.o.db.query(
      `INSERT INTO replicas (replica_id, grpc_address, http_address) VALUES ($1, $2, $3)
       ON CONFLICT (replica_id) DO UPDATE SET heartbeat_at = now(), stopped = false, grpc_address = $2, http_address = $3`,
      [this.replicaId, addr.grpc, addr.http],
    );
  }

  /** Heartbeat, then the sweep that makes NOTIFY an optimisation: pending requests for us, results for our waiters. */
  private async tick(): Promise<void> {
    if (this.stopping) return;
    try {
      await this.beat();
      const mine = await this.o.db.query<{ op_id: string }>(
        `SELECT op_id FROM routed_operations WHERE target_replica = $1 AND state = 'pending' AND deadline_at > now() ORDER BY created_at LIMIT 100`,
        [this.replicaId],
      );
      for (const r of mine) {
        if (!this.running.has(r.op_id)) this.stats.sweptOps++;
        this.handleOp(r.op_id);
      }
      const waiting = [...this.waiters.keys()];
      if (waiting.length) {
        const before = this.waiters.size;
        await this.settleFromTable(waiting);
        this.stats.sweptResults += before - this.waiters.size;
      }
      if (this.waiters.size) await this.failOwnerLost();
      if (++this.ticks % 60 === 0) {
        await this.o.db.query(`DELETE FROM routed_operations WHERE created_at < now() - interval '1 hour'`);
      }
    } catch (e) {
      this.o.log('warn', 'replica heartbeat failed', { error: (e as Error).message });
    }
  }
}
