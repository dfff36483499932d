/**
 * The one schema (PostgreSQL dialect, identical on PGlite and a server), applied by numbered migrations at
 * start-up. A migration runs once, in a transaction, under an advisory lock (several replicas may start at
 * the same time on one server). 64-bit guest values inside evidence are hex strings in `jsonb`; counters
 * and Unix-ns times are `int8`.
 */
import type { Db } from './db.js';
import { AnalysisError } from './errors.js';

export const MIGRATIONS: readonly { readonly version: number; readonly name: string; readonly sql: string }[] = [
  {
    version: 1,
    name: 'initial',
    sql: `
CREATE TABLE hosts (
  host_id text PRIMARY KEY,
  agent_version text NOT NULL DEFAULT '',
  agent_instance_id text NOT NULL DEFAULT '',
  connected boolean NOT NULL DEFAULT false,
  replica_id text NOT NULL DEFAULT '',
  capabilities jsonb NOT NULL DEFAULT '[]',
  policy_id text NOT NULL DEFAULT '',
  policy_version int8 NOT NULL DEFAULT 0,
  policy_state text NOT NULL DEFAULT '',
  policy_error text NOT NULL DEFAULT '',
  counters jsonb NOT NULL DEFAULT '{}',
  first_seen_ns int8 NOT NULL,
  last_seen_ns int8 NOT NULL
);
CREATE TABLE vms (
  vm_uuid text PRIMARY KEY,
  name text NOT NULL DEFAULT '',
  host_id text NOT NULL,
  attached boolean NOT NULL DEFAULT false,
  session_generation int8 NOT NULL DEFAULT 0,
  qemu_start_time_ms int8 NOT NULL DEFAULT 0,
  vcpu_count int4 NOT NULL DEFAULT 0,
  max_gfn int8,
  dialect text NOT NULL DEFAULT '',
  kvmi_version jsonb NOT NULL DEFAULT '{}',
  allowed_commands jsonb NOT NULL DEFAULT '[]',
  allowed_events jsonb NOT NULL DEFAULT '[]',
  labels jsonb NOT NULL DEFAULT '{}',
  policy_name text NOT NULL DEFAULT '',
  protection jsonb NOT NULL DEFAULT '{}',
  derived jsonb,
  attached_ns int8 NOT NULL DEFAULT 0,
  detached_ns int8 NOT NULL DEFAULT 0,
  detach_reason text NOT NULL DEFAULT '',
  last_seen_ns int8 NOT NULL DEFAULT 0
);
CREATE INDEX vms_host ON vms (host_id);
CREATE TABLE vcpus (
  vm_uuid text NOT NULL,
  vcpu int4 NOT NULL,
  events int8 NOT NULL DEFAULT 0,
  last_seen_ns int8 NOT NULL DEFAULT 0,
  PRIMARY KEY (vm_uuid, vcpu)
);
CREATE TABLE event_counts (
  vm_uuid text NOT NULL,
  kind text NOT NULL,
  count int8 NOT NULL DEFAULT 0,
  last_seen_ns int8 NOT NULL DEFAULT 0,
  PRIMARY KEY (vm_uuid, kind)
);
CREATE TABLE verdict_counts (
  vm_uuid text NOT NULL,
  rule_id text NOT NULL,
  exception_id text NOT NULL,
  tier text NOT NULL,
  action text NOT NULL,
  count int8 NOT NULL DEFAULT 0,
  last_seen_ns int8 NOT NULL DEFAULT 0,
  PRIMARY KEY (vm_uuid, rule_id, exception_id, tier, action)
);
CREATE TABLE losses (
  host_id text NOT NULL,
  vm_uuid text NOT NULL,
  record_type text NOT NULL,
  reason text NOT NULL,
  count int8 NOT NULL DEFAULT 0,
  last_window_end_ns int8 NOT NULL DEFAULT 0,
  PRIMARY KEY (host_id, vm_uuid, record_type, reason)
);
CREATE TABLE alerts (
  alert_id text PRIMARY KEY,
  seq int8 GENERATED ALWAYS AS IDENTITY,
  dedup_key text NOT NULL,
  state text NOT NULL DEFAULT 'open',
  severity int4 NOT NULL,
  title text NOT NULL,
  description text NOT NULL DEFAULT '',
  technique text NOT NULL DEFAULT '',
  technique_name text NOT NULL DEFAULT '',
  module text NOT NULL DEFAULT '',
  host_id text NOT NULL,
  vm_uuid text NOT NULL,
  vm_name text NOT NULL DEFAULT '',
  vcpu int4,
  rule_id text NOT NULL DEFAULT '',
  exception_id text NOT NULL DEFAULT '',
  policy_id text NOT NULL DEFAULT '',
  policy_version int8 NOT NULL DEFAULT 0,
  policy_name text NOT NULL DEFAULT '',
  action text NOT NULL DEFAULT '',
  tier text NOT NULL DEFAULT '',
  evidence jsonb NOT NULL DEFAULT '{}',
  count int8 NOT NULL DEFAULT 1,
  first_seen_ns int8 NOT NULL,
  last_seen_ns int8 NOT NULL,
  created_ns int8 NOT NULL,
  acknowledged_by text NOT NULL DEFAULT '',
  acknowledged_ns int8 NOT NULL DEFAULT 0,
  ack_comment text NOT NULL DEFAULT ''
);
CREATE INDEX alerts_dedup ON alerts (dedup_key, last_seen_ns);
CREATE INDEX alerts_seq ON alerts (seq);
CREATE INDEX alerts_vm ON alerts (vm_uuid, seq);
CREATE TABLE alert_detections (
  detection_id text PRIMARY KEY,
  alert_id text NOT NULL REFERENCES alerts (alert_id),
  detected_ns int8 NOT NULL
);
CREATE INDEX alert_detections_alert ON alert_detections (alert_id);
CREATE TABLE policies (
  name text NOT NULL,
  version int8 NOT NULL,
  document text NOT NULL,
  spec jsonb NOT NULL,
  digest text NOT NULL,
  source text NOT NULL DEFAULT '',
  created_by text NOT NULL DEFAULT '',
  created_ns int8 NOT NULL,
  deleted boolean NOT NULL DEFAULT false,
  PRIMARY KEY (name, version)
);
CREATE TABLE exceptions (
  exception_id text PRIMARY KEY,
  policy_name text NOT NULL,
  spec jsonb NOT NULL,
  from_alert_id text NOT NULL DEFAULT '',
  reason text NOT NULL DEFAULT '',
  created_by text NOT NULL DEFAULT '',
  created_ns int8 NOT NULL,
  expires_ns int8 NOT NULL DEFAULT 0,
  deleted boolean NOT NULL DEFAULT false
);
CREATE TABLE commands (
  correlation_id int8 PRIMARY KEY,
  replica_id text NOT NULL,
  host_id text NOT NULL,
  vm_uuid text NOT NULL,
  session_generation int8 NOT NULL,
  vcpu int4 NOT NULL,
  kind text NOT NULL,
  purpose text NOT NULL DEFAULT '',
  status text NOT NULL DEFAULT 'sent',
  message text NOT NULL DEFAULT '',
  sent_ns int8 NOT NULL,
  done_ns int8 NOT NULL DEFAULT 0
);
CREATE SEQUENCE command_ids;
CREATE SEQUENCE local_policy_versions START WITH 1000;
`,
  },
  {
    version: 2,
    name: 'heki',
    sql: `
CREATE TABLE heki_vms (
  vm_uuid text PRIMARY KEY,
  host_id text NOT NULL,
  name text NOT NULL DEFAULT '',
  status text NOT NULL,
  state jsonb NOT NULL,
  updated_ns int8 NOT NULL
);
CREATE INDEX heki_vms_host ON heki_vms (host_id);
`,
  },
  {
    version: 3,
    name: 'breakpoint-tracing',
    sql: `
CREATE TABLE traces (
  trace_id text PRIMARY KEY,
  vm_uuid text NOT NULL,
  function text NOT NULL,
  args int4 NOT NULL,
  state text NOT NULL,
  status text NOT NULL DEFAULT '',
  created_by text NOT NULL DEFAULT '',
  created_ns int8 NOT NULL,
  stopped_ns int8 NOT NULL DEFAULT 0,
  stopped_by text NOT NULL DEFAULT '',
  profile text NOT NULL DEFAULT '',
  boot_ms int8 NOT NULL DEFAULT 0,
  gva text NOT NULL DEFAULT '',
  gpa text NOT NULL DEFAULT '',
  original_byte int4 NOT NULL DEFAULT -1
);
CREATE UNIQUE INDEX traces_active ON traces (vm_uuid, function) WHERE state = 'active';
CREATE INDEX traces_vm ON traces (vm_uuid, created_ns);
CREATE SEQUENCE trace_hit_ids;
CREATE TABLE trace_hits (
  hit_id int8 PRIMARY KEY DEFAULT nextval('trace_hit_ids'),
  trace_id text NOT NULL,
  vm_uuid text NOT NULL,
  function text NOT NULL,
  session_generation int8 NOT NULL,
  event_seq int8 NOT NULL,
  vcpu int4 NOT NULL,
  rip text NOT NULL,
  args jsonb NOT NULL,
  hit_ns int8 NOT NULL,
  UNIQUE (vm_uuid, session_generation, event_seq)
);
CREATE INDEX trace_hits_trace ON trace_hits (trace_id, hit_id);
CREATE INDEX trace_hits_vm ON trace_hits (vm_uuid, hit_id);
`,
  },
  {
    version: 4,
    name: 'audit',
    // Every command that changes a guest, who asked, and its result (audit.ts).
    sql: `
CREATE TABLE audit_events (
  audit_id text PRIMARY KEY,
  seq int8 GENERATED ALWAYS AS IDENTITY,
  occurred_ns int8 NOT NULL,
  done_ns int8 NOT NULL DEFAULT 0,
  actor text NOT NULL,
  principal text NOT NULL DEFAULT '',
  action text NOT NULL,
  target text NOT NULL DEFAULT '',
  vm_uuid text NOT NULL DEFAULT '',
  host_id text NOT NULL DEFAULT '',
  vcpu int4,
  correlation_id int8,
  replica_id text NOT NULL DEFAULT '',
  reason text NOT NULL DEFAULT '',
  result text NOT NULL DEFAULT 'pending',
  success boolean,
  details jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_events_seq ON audit_events (seq);
CREATE INDEX audit_events_vm ON audit_events (vm_uuid, seq);
CREATE INDEX audit_events_time ON audit_events (occurred_ns);
`,
  },
  {
    version: 5,
    name: 'replicas',
    // Several replicas on one PostgreSQL (replicas.ts): who is alive, operations routed to a VM's owning
    // replica (request and result, so a missed NOTIFY loses nothing), and the page restrictions applied per
    // KVMI session (re-established once, whichever replica the agent reconnects to). Times that replicas
    // compare are the database's clock (timestamptz), never a replica's.
    sql: `
CREATE TABLE replicas (
  replica_id text PRIMARY KEY,
  started_at timestamptz NOT NULL DEFAULT now(),
  heartbeat_at timestamptz NOT NULL DEFAULT now(),
  grpc_address text NOT NULL DEFAULT '',
  http_address text NOT NULL DEFAULT '',
  stopped boolean NOT NULL DEFAULT false
);
CREATE TABLE routed_operations (
  op_id text PRIMARY KEY,
  vm_uuid text NOT NULL,
  name text NOT NULL,
  args jsonb NOT NULL DEFAULT '{}',
  requested_by text NOT NULL DEFAULT '',
  origin_replica text NOT NULL,
  target_replica text NOT NULL,
  state text NOT NULL DEFAULT 'pending',
  result jsonb,
  error jsonb,
  created_at timestamptz NOT NULL DEFAULT now(),
  deadline_at timestamptz NOT NULL,
  done_at timestamptz
);
CREATE INDEX routed_operations_target ON routed_operations (target_replica, state);
CREATE TABLE vm_page_restrictions (
  vm_uuid text PRIMARY KEY,
  agent_instance_id text NOT NULL,
  session_generation int8 NOT NULL,
  pages_digest text NOT NULL,
  pages int4 NOT NULL,
  replica_id text NOT NULL,
  applied_ns int8 NOT NULL
);
`,
  },
];

/** Apply the migrations not applied yet (idempotent; safe with several replicas starting together). */
export async function migrate(db: Db): Promise<number[]> {
  await db.exec('CREATE TABLE IF NOT EXISTS schema_migrations (version int4 PRIMARY KEY, name text NOT NULL, applied_ns int8 NOT NULL)');
  const applied: number[] = [];
  await db.transaction(async (tx) => {
    await tx.query('SELECT pg_advisory_xact_lock(7403101)');
    const done = new Set((await tx.query<{ version: number }>('SELECT version FROM schema_migrations')).map((r) => r.version));
    for (const m of MIGRATIONS) {
      if (done.has(m.version)) continue;
      try {
        for (const stmt of m.sql.split(/;\s*\n/).map((s) => s.trim()).filter(Boolean)) await tx.query(stmt);
      } catch (e) {
        throw new AnalysisError('migration-failed', `migration ${m.version} (${m.name}) failed: ${(e as Error).message}`, { cause: e });
      }
      await tx.query('INSERT INTO schema_migrations (version, name, applied_ns) VALUES ($1, $2, $3)', [m.version, m.name, nowNs()]);
      applied.push(m.version);
    }
  });
  return applied;
}

export function nowNs(): bigint {
  return BigInt(Date.now()) * 1_000_000n;
}
