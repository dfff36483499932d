/**
 * Breakpoint tracing's rows (migration 3): `traces` (one active row per VM and function; the planted address
 * and the original byte of the boot it was planted in) and `trace_hits` (one row per BREAKPOINT event, unique
 * by VM, session generation and KVMI seq, so a re-delivered event is stored once). Everything another
 * replica needs to re-establish a trace idempotently is here: the original byte comes from this table, never
 * from re-reading guest memory that may already hold our 0xCC.
 */
import { randomUUID } from 'node:crypto';
import type { Db } from './db.js';
import { AnalysisError } from './errors.js';
import { hex } from './evidence.js';
import { nowNs } from './schema.js';

export type TraceState = 'active' | 'stopped';

export interface TraceRow {
  readonly traceId: string;
  readonly vmUuid: string;
  readonly function: string;
  readonly args: number;
  readonly state: TraceState;
  readonly status: string;
  readonly createdBy: string;
  readonly createdNs: bigint;
  readonly stoppedNs: bigint;
  readonly stoppedBy: string;
  readonly profile: string;
  /** QEMU start time (ms) of the boot gva/gpa/original belong to; 0 = not planted yet. */
  readonly bootMs: bigint;
  readonly gva: bigint | null;
  readonly gpa: bigint | null;
  /** The byte the INT3 replaced; -1 = unknown. */
  readonly originalByte: number;
}

export interface TraceHit {
  readonly hitId: bigint;
  readonly traceId: string;
  readonly vmUuid: string;
  readonly function: string;
  readonly sessionGeneration: bigint;
  readonly eventSeq: number;
  readonly vcpu: number;
  readonly rip: bigint;
  /** SysV argument registers in order (rdi, rsi, rdx, rcx, r8, r9), as many as the trace asked for. */
  readonly args: readonly bigint[];
  readonly hitNs: bigint;
}

type Row = Record<string, unknown>;
const big = (v: unknown): bigint => (typeof v === 'bigint' ? v : BigInt(v as string | number));
const optBig = (v: unknown): bigint | null => (typeof v === 'string' && v !== '' ? BigInt(v) : null);

function traceOf(r: Row): TraceRow {
  return {
    traceId: r['trace_id'] as string,
    vmUuid: r['vm_uuid'] as string,
    function: r['function'] as string,
    args: Number(r['args']),
    state: r['state'] as TraceState,
    status: r['status'] as string,
    createdBy: r['created_by'] as string,
    createdNs: big(r['created_ns']),
    stoppedNs: big(r['stopped_ns']),
    stoppedBy: r['stopped_by'] as string,
    profile: r['profile'] as string,
    bootMs: big(r['boot_ms']),
    gva: optBig(r['gva']),
    gpa: optBig(r['gpa']),
    originalByte: Number(r['original_byte']),
  };
}

/**
 * `trace_hits.event_seq` is the KVMI seq: with the VM and the agent's session generation it names the event
 * (the UNIQUE constraint that stores a re-delivered event once). Session generations are strictly increasing
 * per VM across agent restarts (libs/host-agent/src/session-generations.ts), so the hits of a restarted agent
 * never collide with those of the earlier process. Rows written before that (when generations restarted at 1)
 * hold the agent's receive time above the low 32 bits; reading keeps only the low 32 bits — the KVMI seq is a
 * u32, so for every other row this changes nothing.
 */
const SEQ_MASK = 0xffff_ffffn;

function hitOf(r: Row): TraceHit {
  return {
    hitId: big(r['hit_id']),
    traceId: r['trace_id'] as string,
    vmUuid: r['vm_uuid'] as string,
    function: r['function'] as string,
    sessionGeneration: big(r['session_generation']),
    eventSeq: Number(big(r['event_seq']) & SEQ_MASK),
    vcpu: Number(r['vcpu']),
    rip: BigInt(r['rip'] as string),
    args: (r['args'] as string[]).map((a) => BigInt(a)),
    hitNs: big(r['hit_ns']),
  };
}

export class TraceStore {
  constructor(private readonly db: Db) {}

  /** The active trace of a function on a VM, if any. */
  async active(vmUuid: string, fn: string): Promise<TraceRow | undefined> {
    const r = await this.db.query(`SELECT * FROM traces WHERE vm_uuid = $1 AND function = $2 AND state = 'active'`, [vmUuid, fn]);
    return r[0] ? traceOf(r[0]) : undefined;
  }

  async activeForVm(vmUuid: string): Promise<TraceRow[]> {
    return (await this.db.query(`SELECT * FROM traces WHERE vm_uuid = $1 AND state = 'active' ORDER BY created_ns`, [vmUuid])).map(traceOf);
  }

  /** Traces (active first, then the latest stopped), optionally of one VM. */
  async list(o: { vmUuid?: string; includeStopped?: boolean; limit?: number } = {}): Promise<TraceRow[]> {
    const where: string[] = [];
    const params: string[] = [];
    if (o.vmUuid) {
      params.push(o.vmUuid);
      where.push(`vm_uuid = $${params.length}`);
    }
    if (!o.includeStopped) where.push(`state = 'active'`);
    const limit = Math.min(Math.max(o.limit ?? 200, 1), 1000);
    const rows = await this.db.query(`SELECT * FROM traces ${where.length ? `WHERE ${where.join(' AND ')}` : ''} ORDER BY (state = 'active') DESC, created_ns DESC LIMIT ${limit}`, params);
    return rows.map(traceOf);
  }

  /** Create the active trace row (conflict when one is active already). */
  async create(t: { vmUuid: string; function: string; args: number; createdBy: string; profile: string }): Promise<TraceRow> {
    const id = randomUUID();
    try {
      await this.db.query(
        `INSERT INTO traces (trace_id, vm_uuid, function, args, state, status, created_by, created_ns, profile) VALUES ($1, $2, $3, $4, 'active', 'starting', $5, $6, $7)`,
        [id, t.vmUuid, t.function, t.args, t.createdBy, nowNs(), t.profile],
      );
    } catch (e) {
      if (/duplicate key|unique/i.test((e as Error).message)) throw new AnalysisError('conflict', `${t.function} is already traced on VM ${t.vmUuid}`);
      throw e;
    }
    return (await this.byId(id))!;
  }

  async byId(traceId: string): Promise<TraceRow | undefined> {
    const r = await this.db.query('SELECT * FROM traces WHERE trace_id = $1', [traceId]);
    return r[0] ? traceOf(r[0]) : undefined;
  }

  /** Record where the INT3 goes in this boot and the byte it replaces. */
  async setPlacement(traceId: string, p: { bootMs: bigint; gva: bigint; gpa: bigint; originalByte: number }): Promise<void> {
    await this.db.query('UPDATE traces SET boot_ms = $2, gva = $3, gpa = $4, original_byte = $5 WHERE trace_id = $1', [traceId, p.bootMs, hex(p.gva), hex(p.gpa), p.originalByte]);
  }

  async setStatus(traceId: string, status: string): Promise<void> {
    await this.db.query('UPDATE traces SET status = $2 WHERE trace_id = $1', [traceId, status]);
  }

  async stop(traceId: string, by: string, status: string): Promise<void> {
    await this.db.query(`UPDATE traces SET state = 'stopped', status = $2, stopped_ns = $3, stopped_by = $4 WHERE trace_id = $1`, [traceId, status, nowNs(), by]);
  }

  /** Store one hit (idempotent by VM, generation and seq). */
  async addHit(h: Omit<TraceHit, 'hitId'>): Promise<void> {
    await this.db.query(
      `INSERT INTO trace_hits (trace_id, vm_uuid, function, session_generation, event_seq, vcpu, rip, args, hit_ns) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING`,
      [h.traceId, h.vmUuid, h.function, h.sessionGeneration, h.eventSeq, h.vcpu, hex(h.rip), JSON.stringify(h.args.map(hex)), h.hitNs],
    );
  }

  /** Hits after `afterId` (a cursor), oldest first. */
  async hits(o: { traceId?: string; vmUuid?: string; function?: string; afterId?: bigint; limit?: number }): Promise<TraceHit[]> {
    const where: string[] = [];
    const params: (string | bigint)[] = [];
    const add = (sql: string, v: string | bigint): void => {
      params.push(v);
      where.push(sql.replace('?', `$${params.length}`));
    };
    if (o.traceId) add('trace_id = ?', o.traceId);
    if (o.vmUuid) add('vm_uuid = ?', o.vmUuid);
    if (o.function) add('function = ?', o.function);
    if (o.afterId !== undefined) add('hit_id > ?', o.afterId);
    const limit = Math.min(Math.max(o.limit ?? 500, 1), 5000);
    const rows = await this.db.query(`SELECT * FROM trace_hits ${where.length ? `WHERE ${where.join(' AND ')}` : ''} ORDER BY hit_id LIMIT ${limit}`, params);
    return rows.map(hitOf);
  }

  async hitCounts(traceIds: readonly string[]): Promise<Map<string, bigint>> {
    const out = new Map<string, bigint>();
    if (!traceIds.length) return out;
    const rows = await this.db.query<{ trace_id: string; n: bigint }>('SELECT trace_id, count(*)::int8 AS n FROM trace_hits WHERE trace_id = ANY($1::text[]) GROUP BY trace_id', [`{${traceIds.join(',')}}`]);
    for (const r of rows) out.set(r.trace_id, big(r.n));
    return out;
  }
}
