/**
 * HTTP routes of the audit log and of reading a guest (mounted by servers.ts after the bearer-token check):
 *
 * - `GET /v1/audit?vm=&since=&until=&actor=&action=&limit=&cursor=` — audit entries, newest first
 *   (`nextCursor` pages on). `vm`: name or UUID; `since`/`until`: Unix ns, an ISO time, or a duration
 *   ago (`15m`, `2h`, `7d`).
 * - `GET /v1/vms/{id}/memory?gpa=0x…&length=N` — VM_READ_PHYSICAL split at pages (the `mem-read` operation,
 *   run on the replica owning the VM; ENOENT pages are gaps).
 * - `GET /v1/vms/{id}/vcpus/{n}/registers` — VCPU_GET_REGISTERS (the `regs` operation).
 *
 * Errors are AnalysisErrors (servers.ts maps their codes to statuses: not-found 404, bad-request 400,
 * refused 403, not-attached 409, command-failed 502, command-timeout 504).
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import { AnalysisError } from './errors.js';
import type { AuditFilter, AuditLog } from './audit.js';
import type { VmOperations } from './operations.js';
import { jsonReplacer } from './sinks.js';
import type { Store } from './store.js';

export interface OperatorHttpHost {
  readonly store: Store;
  readonly audit: AuditLog;
  readonly operations: VmOperations;
}

const DURATION = /^(\d+(?:\.\d+)?)(ms|s|m|h|d)$/;
const UNIT_MS = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 } as const;

/** Unix ns (digits), an ISO time, or a duration ago; undefined when absent. */
export function parseInstant(v: string | null, what: string, now = Date.now()): bigint | undefined {
  if (v === null || v.trim() === '') return undefined;
  const t = v.trim();
  if (/^\d+$/.test(t)) return BigInt(t);
  const d = DURATION.exec(t);
  if (d) return BigInt(Math.round(now - Number(d[1]) * UNIT_MS[d[2] as keyof typeof UNIT_MS])) * 1_000_000n;
  const ms = Date.parse(t);
  if (!Number.isNaN(ms)) return BigInt(ms) * 1_000_000n;
  throw new AnalysisError('bad-request', `${what} must be Unix nanoseconds, an ISO time (2025-01-31T12:00:00Z) or a duration ago (15m, 2h, 7d); got ${JSON.stringify(v)}`);
}

function send(res: ServerResponse, status: number, body: unknown): void {
  res.writeHead(status, { 'content-type': 'application/json' }).end(JSON.stringify(body, jsonReplacer));
}

async function vmUuid(h: OperatorHttpHost, id: string): Promise<string> {
  const vm = await h.store.findVm(id);
  if (!vm) throw new AnalysisError('not-found', `no VM ${id}`);
  return vm.uuid;
}

/** Handles the routes above; false when the path is not one of them. `who`: the audit identity of the caller. */
export async function handleOperatorHttp(h: OperatorHttpHost, req: IncomingMessage, res: ServerResponse, path: string, url: URL, who: string): Promise<boolean> {
  const method = req.method ?? 'GET';
  let m: RegExpExecArray | null;
  if (path === '/v1/audit' && method === 'GET') {
    const q = url.searchParams;
    const f: AuditFilter = {};
    if (q.get('vm')) f.vm = await vmUuid(h, q.get('vm')!);
    const since = parseInstant(q.get('since'), 'since');
    if (since !== undefined) f.sinceNs = since;
    const until = parseInstant(q.get('until'), 'until');
    if (until !== undefined) f.untilNs = until;
    if (q.get('actor')) f.actor = q.get('actor')!;
    if (q.get('action')) f.action = q.get('action')!;
    const cursor = q.get('cursor');
    if (cursor) {
      if (!/^\d+$/.test(cursor)) throw new AnalysisError('bad-request', 'cursor must be a sequence number');
      f.before = BigInt(cursor);
    }
    const limit = Number(q.get('limit') ?? 100);
    if (!Number.isInteger(limit) || limit < 1 || limit > 1000) throw new AnalysisError('bad-request', 'limit must be 1..1000');
    f.limit = limit;
    const events = await h.audit.list(f);
    send(res, 200, { events, nextCursor: events.length === limit ? events[events.length - 1]!.seq : null });
    return true;
  }
  if ((m = /^\/v1\/vms\/([^/]+)\/memory$/.exec(path)) && method === 'GET') {
    const uuid = await vmUuid(h, decodeURIComponent(m[1]!));
    const gpa = url.searchParams.get('gpa');
    const length = url.searchParams.get('length');
    if (!gpa || !length) throw new AnalysisError('bad-request', 'gpa and length are required (?gpa=0x1000&length=256)');
    send(res, 200, await h.operations.run(uuid, 'mem-read', { gpa, length }, who));
    return true;
  }
  if ((m = /^\/v1\/vms\/([^/]+)\/vcpus\/([^/]+)\/registers$/.exec(path)) && method === 'GET') {
    const uuid = await vmUuid(h, decodeURIComponent(m[1]!));
    if (!/^\d+$/.test(m[2]!)) throw new AnalysisError('bad-request', `vCPU must be an index (got ${JSON.stringify(m[2])})`);
    send(res, 200, await h.operations.run(uuid, 'regs', { vcpu: Number(m[2]) }, who));
    return true;
  }
  return false;
}
