/**
 * HTTP routes of breakpoint tracing (mounted by servers.ts after the bearer-token check; errors are
 * AnalysisErrors, mapped to HTTP statuses there):
 *
 * - `POST /v1/vms/{id}/traces` `{"function": "NAME", "args"?: 0…6, "by"?: "who"}` → 201 `{trace}` (the VM
 *   operation `trace-start`, run on the replica that owns the VM). 403 `refused` when the VM's agent does not
 *   allow VM_WRITE_PHYSICAL (the message is the agent's), 501 `unsupported` without the singlestep feature,
 *   409 `conflict` when the function is traced already, 404 for a function the profile does not have.
 * - `DELETE /v1/vms/{id}/traces/{function}` → `{trace}` (`trace-stop`: the original byte goes back; a VM that
 *   is not attached anywhere only has its row stopped — its agent restored the bytes when it detached).
 * - `GET /v1/traces?vm=ID&all=true` → `{traces}` (active ones; `all` adds stopped ones), with hit counts.
 * - `GET /v1/traces/hits?vm=ID&function=NAME&trace=ID&after=HIT_ID&limit=N` → `{hits, next}`: hits oldest
 *   first after a cursor (`next` is the cursor to pass as `after`), for `periscope trace` to print them live.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import { AnalysisError } from './errors.js';
import type { VmOperations } from './operations.js';
import type { Store } from './store.js';
import type { Tracing } from './tracing.js';

export interface TracingHttpHost {
  readonly store: Store;
  readonly tracing: Tracing;
  readonly operations: Pick<VmOperations, 'run'>;
}

function send(res: ServerResponse, status: number, body: unknown): void {
  res.writeHead(status, { 'content-type': 'application/json' }).end(JSON.stringify(body));
}

async function readJson(req: IncomingMessage): Promise<Record<string, unknown>> {
  const chunks: Buffer[] = [];
  let n = 0;
  for await (const c of req) {
    n += (c as Buffer).length;
    if (n > 1 << 16) throw new AnalysisError('bad-request', 'request body above 64 KiB');
    chunks.push(c as Buffer);
  }
  const t = Buffer.concat(chunks).toString('utf8');
  if (!t.trim()) return {};
  let v: unknown;
  try {
    v = JSON.parse(t);
  } catch (e) {
    throw new AnalysisError('bad-request', `body is not JSON: ${(e as Error).message}`);
  }
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new AnalysisError('bad-request', 'body must be a JSON object');
  return v as Record<string, unknown>;
}

async function vmOf(h: TracingHttpHost, id: string): Promise<{ uuid: string; name: string; attached: boolean }> {
  const vm = await h.store.findVm(decodeURIComponent(id));
  if (!vm) throw new AnalysisError('not-found', `no VM ${id}`);
  return { uuid: vm.uuid, name: vm.name, attached: vm.attached };
}

const uint = (q: URLSearchParams, k: string): bigint | undefined => {
  const v = q.get(k);
  if (v === null || v === '') return undefined;
  if (!/^\d+$/.test(v)) throw new AnalysisError('bad-request', `${k} must be a non-negative integer`);
  return BigInt(v);
};

/** Returns true when the request was a tracing route (answered). */
export async function handleTracingHttp(h: TracingHttpHost, req: IncomingMessage, res: ServerResponse, path: string, url: URL): Promise<boolean> {
  const method = req.method ?? 'GET';
  let m: RegExpExecArray | null;
  if ((m = /^\/v1\/vms\/([^/]+)\/traces$/.exec(path))) {
    const vm = await vmOf(h, m[1]!);
    if (method === 'GET') {
      send(res, 200, { traces: await h.tracing.list({ vmUuid: vm.uuid, includeStopped: url.searchParams.get('all') === 'true' }) });
      return true;
    }
    if (method !== 'POST') return false;
    const body = await readJson(req);
    const fn = body['function'];
    if (typeof fn !== 'string' || !fn) throw new AnalysisError('bad-request', 'body must be {"function": "NAME", "args"?: 0…6}');
    const args = body['args'];
    if (args !== undefined && (typeof args !== 'number' || !Number.isInteger(args))) throw new AnalysisError('bad-request', 'args must be an integer 0…6');
    const by = typeof body['by'] === 'string' && body['by'] ? body['by'] : 'operator';
    const r = await h.operations.run(vm.uuid, 'trace-start', { function: fn, ...(args !== undefined ? { args } : {}) }, by);
    send(res, 201, r);
    return true;
  }
  if ((m = /^\/v1\/vms\/([^/]+)\/traces\/([^/]+)$/.exec(path)) && method === 'DELETE') {
    const vm = await vmOf(h, m[1]!);
    const fn = decodeURIComponent(m[2]!);
    const by = url.searchParams.get('by') || 'operator';
    try {
      send(res, 200, await h.operations.run(vm.uuid, 'trace-stop', { function: fn }, by));
    } catch (e) {
      if (!(e instanceof AnalysisError) || e.code !== 'not-attached') throw e;
      send(res, 200, { trace: await h.tracing.stopOffline(vm.uuid, fn, by) });
    }
    return true;
  }
  if (path === '/v1/traces' && method === 'GET') {
    const id = url.searchParams.get('vm');
    const vm = id ? await vmOf(h, id) : undefined;
    send(res, 200, { traces: await h.tracing.list({ ...(vm ? { vmUuid: vm.uuid } : {}), includeStopped: url.searchParams.get('all') === 'true' }) });
    return true;
  }
  if (path === '/v1/traces/hits' && method === 'GET') {
    const q = url.searchParams;
    const id = q.get('vm');
    const vm = id ? await vmOf(h, id) : undefined;
    const after = uint(q, 'after');
    const limit = uint(q, 'limit');
    const hits = await h.tracing.hits({
      ...(vm ? { vmUuid: vm.uuid } : {}),
      ...(q.get('function') ? { function: q.get('function')! } : {}),
      ...(q.get('trace') ? { traceId: q.get('trace')! } : {}),
      ...(after !== undefined ? { afterId: after } : {}),
      ...(limit !== undefined ? { limit: Number(limit) } : {}),
    });
    const last = hits[hits.length - 1];
    send(res, 200, { hits, next: last ? String(last['id']) : after !== undefined ? after.toString() : '0' });
    return true;
  }
  return false;
}
