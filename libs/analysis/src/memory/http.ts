/**
 * HTTP routes of guest memory work (mounted by servers.ts after the bearer-token check):
 *
 * - `POST /v1/vms/{id}/scan` `{"signature": "HEX[/MASK]", "ranges"?: [{"gpa": "0x…", "length": "0x…"}],
 *   "maxMatches"?: N}` — a masked signature scan (`??` = any byte; `/MASK` ANDs a bit mask). Without
 *   `ranges`: the guest kernel's image (every section of the profile, from the derived slide). Progress and
 *   results stream as JSON lines (`application/x-ndjson`, default) or server-sent events (`Accept:
 *   text/event-stream` or `?format=sse`): `start` {via, viaDetail, fallbackReason, ranges, totalBytes},
 *   `progress` {bytesScanned, totalBytes, matches (new ones)}, `fallback` {reason} when the guest agent
 *   path fails mid-way and the scan restarts on VM_READ_PHYSICAL, then `done` {matches, count, truncated,
 *   bytesScanned, via, ms} or `error` {code, message}. Addresses are 0x-hex GPAs.
 * - `GET /v1/vms/{id}/integrity` — the kernel integrity module's state for the VM (baseline, last check,
 *   how memory was read and why, mismatches, explained changes); `POST /v1/vms/{id}/integrity/check`
 *   re-hashes now and answers the same.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import { GuestAgentError, parseSignature, type Signature } from '@periscope/guest-agent';
import { GuestMemoryWorkError } from '@periscope/guest-agent';
import { memoryErrorCodeToJSON } from '@periscope/contracts';
import { hex } from '../evidence.js';
import type { LiveVm } from '../link.js';
import type { ProfileRegistry } from '../profiles.js';
import type { Store } from '../store.js';
import { MemoryAccessError, PAGE, type MemRange } from './access.js';
import type { MemoryService } from './index.js';

export interface MemoryHttpHost {
  readonly store: Store;
  readonly profiles: ProfileRegistry;
  readonly liveVms: ReadonlyMap<string, LiveVm>;
  readonly memory: MemoryService;
}

const ROUTE = /^\/v1\/vms\/([^/]+)\/(scan|integrity|integrity\/check)$/;
const MAX_SCAN_BYTES = 1n << 36n;

class RouteError extends Error {
  constructor(readonly status: number, readonly code: string, message: string) {
    super(message);
  }
}

function send(res: ServerResponse, status: number, body: unknown): void {
  res.writeHead(status, { 'content-type': 'application/json' }).end(JSON.stringify(body));
}

async function readJson(req: IncomingMessage): Promise<Record<string, unknown>> {
  const chunks: Buffer[] = [];
  let n = 0;
  for await (const c of req) {
    n += (c as Buffer).length;
    if (n > 1 << 20) throw new RouteError(413, 'too-large', 'request body above 1 MiB');
    chunks.push(c as Buffer);
  }
  const t = Buffer.concat(chunks).toString('utf8');
  if (!t.trim()) return {};
  try {
    const v = JSON.parse(t) as unknown;
    if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new Error('not an object');
    return v as Record<string, unknown>;
  } catch (e) {
    throw new RouteError(400, 'bad-request', `body is not a JSON object: ${(e as Error).message}`);
  }
}

const big = (v: unknown, what: string): bigint => {
  if (typeof v === 'string' && /^(0x[0-9a-f]+|\d+)$/i.test(v)) return BigInt(v);
  if (typeof v === 'number' && Number.isSafeInteger(v) && v >= 0) return BigInt(v);
  throw new RouteError(400, 'bad-request', `${what} must be a non-negative integer or a "0x…" string`);
};

/** `[{gpa, length}]` or `[{start, end}]`. */
export function parseRanges(v: unknown): MemRange[] {
  if (!Array.isArray(v) || v.length === 0) throw new RouteError(400, 'bad-request', 'ranges must be a non-empty list of {"gpa": "0x…", "length": "0x…"}');
  return v.map((r: unknown, i) => {
    if (typeof r !== 'object' || r === null) throw new RouteError(400, 'bad-request', `ranges[${i}] must be an object`);
    const o = r as Record<string, unknown>;
    const gpa = big(o['gpa'] ?? o['start'], `ranges[${i}].gpa`);
    const length = o['length'] !== undefined ? big(o['length'], `ranges[${i}].length`) : big(o['end'], `ranges[${i}].end`) - gpa;
    if (length <= 0n) throw new RouteError(400, 'bad-request', `ranges[${i}] is empty`);
    return { gpa, length };
  });
}

/** The kernel image of a VM whose slide is derived (every profile section). */
function kernelImage(h: MemoryHttpHost, vm: LiveVm): MemRange[] {
  const f = vm.facts;
  const p = f ? h.profiles.get(f.profile) : undefined;
  if (!f || !p || !p.sections.length) throw new RouteError(400, 'bad-request', `VM ${vm.name}: no derived kernel yet (kernel-code-integrity derives it); give "ranges"`);
  const start = p.sections.reduce((a, s) => (s.offset < a ? s.offset : a), p.sections[0]!.offset);
  const end = p.sections.reduce((a, s) => (s.offset + s.size > a ? s.offset + s.size : a), 0n);
  const gpa = (f.textPhys + start) & ~(PAGE - 1n);
  return [{ gpa, length: ((f.textPhys + end + PAGE - 1n) & ~(PAGE - 1n)) - gpa }];
}

async function liveVm(h: MemoryHttpHost, id: string): Promise<LiveVm> {
  const rec = await h.store.findVm(id);
  if (!rec) throw new RouteError(404, 'not-found', `no VM ${id}`);
  const vm = h.liveVms.get(rec.uuid);
  if (!vm) throw new RouteError(409, 'not-attached', `VM ${rec.name || rec.uuid} is not attached through this replica`);
  return vm;
}

/** Handle the memory routes; false when the path is not one of them. */
export async function handleMemoryHttp(h: MemoryHttpHost, req: IncomingMessage, res: ServerResponse, path: string, url: URL): Promise<boolean> {
  const m = ROUTE.exec(path);
  if (!m) return false;
  const method = req.method ?? 'GET';
  const id = decodeURIComponent(m[1]!);
  try {
    if (m[2] === 'integrity' && method === 'GET') {
      const rec = await h.store.findVm(id);
      if (!rec) throw new RouteError(404, 'not-found', `no VM ${id}`);
      const st = h.memory.integrity.status(rec.uuid);
      if (!st) throw new RouteError(404, 'not-monitored', `VM ${rec.name || rec.uuid}: kernel integrity hashing is not running on this replica (needs kernel-code-integrity in its policy and a derived kernel)`);
      send(res, 200, { integrity: st });
      return true;
    }
    if (m[2] === 'integrity/check' && method === 'POST') {
      const vm = await liveVm(h, id);
      const st = await h.memory.integrity.checkNow(vm.uuid);
      if (!st) throw new RouteError(404, 'not-monitored', `VM ${vm.name}: kernel integrity hashing is not running`);
      send(res, 200, { integrity: st });
      return true;
    }
    if (m[2] === 'scan' && method === 'POST') {
      await scan(h, req, res, id, url);
      return true;
    }
    throw new RouteError(405, 'method-not-allowed', `${method} ${path}`);
  } catch (e) {
    if (res.headersSent) {
      res.end();
      return true;
    }
    if (e instanceof RouteError) send(res, e.status, { error: { code: e.code, message: e.message, issues: [] } });
    else send(res, 500, { error: { code: 'internal', message: (e as Error).message, issues: [] } });
    return true;
  }
}

async function scan(h: MemoryHttpHost, req: IncomingMessage, res: ServerResponse, id: string, url: URL): Promise<void> {
  const body = await readJson(req);
  if (typeof body['signature'] !== 'string') throw new RouteError(400, 'bad-request', 'signature is required: "HEX[/MASK]" (?? = any byte)');
  let sig: Signature;
  try {
    sig = parseSignature(body['signature']);
  } catch (e) {
    throw new RouteError(400, 'bad-signature', e instanceof GuestAgentError ? e.message : String(e));
  }
  const maxMatches = body['maxMatches'] === undefined ? 1000 : Number(big(body['maxMatches'], 'maxMatches'));
  const vm = await liveVm(h, id);
  const explicit = body['ranges'] !== undefined;
  const ranges = explicit ? parseRanges(body['ranges']) : kernelImage(h, vm);
  const totalBytes = ranges.reduce((a, r) => a + r.length, 0n);
  if (totalBytes > MAX_SCAN_BYTES) throw new RouteError(400, 'bad-request', `at most ${MAX_SCAN_BYTES} bytes per scan`);
  const sse = url.searchParams.get('format') === 'sse' || (url.searchParams.get('format') !== 'jsonl' && /text\/event-stream/.test(req.headers.accept ?? ''));
  res.writeHead(200, { 'content-type': sse ? 'text/event-stream' : 'application/x-ndjson', 'cache-control': 'no-cache' });
  res.flushHeaders();
  let closed = false;
  res.on('close', () => (closed = true));
  const emit = (event: string, data: Record<string, unknown>): void => {
    if (closed) return;
    const text = JSON.stringify({ event, ...data });
    res.write(sse ? `event: ${event}\ndata: ${text}\n\n` : `${text}\n`);
  };
  const t0 = performance.now();
  const rangesJson = ranges.map((r) => ({ gpa: hex(r.gpa), length: hex(r.length) }));
  const choice = h.memory.router.choose(vm);
  emit('start', { vm: { uuid: vm.uuid, name: vm.name, hostId: vm.hostId }, signature: body['signature'], via: choice.access.path, viaDetail: choice.access.detail, fallbackReason: choice.fallbackReason, ranges: rangesJson, totalBytes: totalBytes.toString() });
  try {
    const run = await h.memory.router.run(
      vm,
      async (access) => {
        const all: bigint[] = [];
        let done = 0n;
        let truncated = false;
        for (const r of ranges) {
          const left = maxMatches - all.length;
          if (left <= 0) {
            truncated = true;
            break;
          }
          const out = await access.scan(r, sig, {
            maxMatches: left,
            onProgress: (p) => emit('progress', { bytesScanned: (done + p.bytesScanned).toString(), totalBytes: totalBytes.toString(), matches: p.matches.map(hex) }),
          });
          all.push(...out.matches);
          truncated ||= out.truncated;
          done += r.length;
          emit('progress', { bytesScanned: done.toString(), totalBytes: totalBytes.toString(), matches: [] });
          // Explicit ranges are unmapped again; the kernel image stays mapped (kernel integrity re-hashes it).
          if (explicit && access.path === 'guest-agent') await access.release(r).catch(() => undefined);
        }
        return { matches: all, truncated, bytesScanned: done };
      },
      (reason) => emit('fallback', { reason, via: 'read-physical' }),
    );
    emit('done', {
      matches: run.value.matches.map(hex), count: run.value.matches.length, truncated: run.value.truncated, bytesScanned: run.value.bytesScanned.toString(),
      via: run.access.path, viaDetail: run.access.detail, fallbackReason: run.fallbackReason, ms: Math.round(performance.now() - t0),
    });
  } catch (e) {
    const code = e instanceof GuestMemoryWorkError ? memoryErrorCodeToJSON(e.code).replace('MEMORY_ERROR_CODE_', '').toLowerCase() : e instanceof MemoryAccessError ? e.kind : 'failed';
    emit('error', { code, message: (e as Error).message });
  }
  res.end();
}
