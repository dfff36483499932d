/**
 * The network faces of the service: one gRPC server (AgentLinkService, grpc.health.v1.Health,
 * OperatorService) and one HTTP server (JSON API, live alert stream, /metrics, /healthz).
 * In fleet mode gRPC uses TLS with client certificates and HTTP is HTTPS; with an API token the HTTP API
 * and the operator RPCs need `authorization: Bearer TOKEN` (/healthz and /metrics stay open).
 */
import { createServer as createHttpServer, type IncomingMessage, type Server as HttpServer, type ServerResponse } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import { timingSafeEqual } from 'node:crypto';
import { Server, ServerCredentials, status as GrpcStatus, type Metadata, type sendUnaryData, type ServerDuplexStream, type ServerUnaryCall, type UntypedServiceImplementation } from '@grpc/grpc-js';
import {
  AgentLinkServiceService,
  AlertState,
  GuestMemoryServiceService,
  OperatorServiceService,
  uuidFromBytes,
  uuidToBytes,
  type Alert,
  type LinkRequest,
  type LinkResponse,
} from '@periscope/contracts';
import { AnalysisError, isAnalysisError } from './errors.js';
import { healthImplementation, HealthService } from '@periscope/contracts';
import { AgentSession } from './link.js';
import { handleMemoryHttp } from './memory/http.js';
import { handleTracingHttp } from './tracing-http.js';
import type { ExceptionSpec } from './modules.js';
import type { ModuleName } from './policy.js';
import type { Analysis, TlsMaterial } from './service.js';
import { alertJson, jsonReplacer } from './sinks.js';
import { serveStatic } from './static.js';
import { startHealthServer, type HealthServer } from '@periscope/contracts';
import { watchAlertsImplementation } from './alert-watch.js';
import { auditToProto, httpPrincipal, operatorWho } from './audit.js';
import { handleOperatorHttp } from './operator-http.js';
import { SEVERITY_NAMES, severityNumber, type AlertFilter, type AlertRecord, type SeverityName } from './store.js';

export interface Servers {
  readonly grpcPort: number;
  readonly httpPort: number;
  readonly grpcAddress: string;
  readonly httpAddress: string;
  /** The health-only plaintext gRPC server's port (0 without `healthListen`). */
  readonly healthPort: number;
  close(): Promise<void>;
}

function splitHostPort(addr: string): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:]+)):(\d+)$/.exec(addr);
  if (!m) throw new AnalysisError('bad-request', `expected HOST:PORT, got ${addr}`);
  return { host: m[1] ?? m[2]!, port: Number(m[3]) };
}

function tokenOk(expected: string | undefined, header: string | undefined): boolean {
  if (!expected) return true;
  const m = /^Bearer\s+(.+)$/i.exec(header ?? '');
  if (!m) return false;
  const a = Buffer.from(m[1]!.trim());
  const b = Buffer.from(expected);
  return a.length === b.length && timingSafeEqual(a, b);
}

export async function startServers(a: Analysis, o: { grpcListen: string; httpListen?: string; tls?: TlsMaterial; apiToken?: string; keepaliveMs: number; dashboardDir?: string; healthListen?: string; maxConnectionAgeMs?: number; maxConnectionAgeGraceMs?: number }): Promise<Servers> {
  const grpc = new Server({
    'grpc.keepalive_time_ms': 30_000,
    'grpc.max_receive_message_length': 64 * 1024 * 1024,
    ...(o.maxConnectionAgeMs !== undefined ? { 'grpc.max_connection_age_ms': o.maxConnectionAgeMs } : {}),
    ...(o.maxConnectionAgeGraceMs !== undefined ? { 'grpc.max_connection_age_grace_ms': o.maxConnectionAgeGraceMs } : {}),
  });
  let serving = true;
  grpc.addService(AgentLinkServiceService, {
    link: (call: ServerDuplexStream<LinkRequest, LinkResponse>) => {
      new AgentSession(call, a, o.keepaliveMs);
    },
  } as UntypedServiceImplementation);
  grpc.addService(GuestMemoryServiceService, a.memory.hub.service); // guest agents (memory/access.ts routes work to them)
  grpc.addService(HealthService, healthImplementation(['periscope.v1.AgentLinkService', 'periscope.v1.OperatorService', 'periscope.v1.GuestMemoryService'], () => serving));
  const watches = new Set<{ end(): void }>();
  grpc.addService(OperatorServiceService, operatorImplementation(a, o.apiToken, watches));
  const creds = o.tls ? ServerCredentials.createSsl(o.tls.ca, [{ private_key: o.tls.key, cert_chain: o.tls.cert }], true) : ServerCredentials.createInsecure();
  const g = splitHostPort(o.grpcListen);
  const grpcPort = await new Promise<number>((resolve, reject) => grpc.bindAsync(`${g.host.includes(':') ? `[${g.host}]` : g.host}:${g.port}`, creds, (err, port) => (err ? reject(err) : resolve(port))));
  let health: HealthServer | undefined;
  if (o.healthListen) {
    try {
      health = await startHealthServer(splitHostPort(o.healthListen), ['periscope.v1.AgentLinkService', 'periscope.v1.OperatorService'], () => serving);
    } catch (e) {
      grpc.forceShutdown();
      throw e;
    }
  }
  let http: HttpServer | undefined;
  let httpPort = 0;
  const streams = new Set<ServerResponse>();
  if (o.httpListen) {
    const handler = (req: IncomingMessage, res: ServerResponse) => void handleHttp(a, req, res, o.apiToken, streams, o.dashboardDir);
    http = o.tls ? createHttpsServer({ key: o.tls.key, cert: o.tls.cert, ca: o.tls.ca }, handler) : createHttpServer(handler);
    const h = splitHostPort(o.httpListen);
    await new Promise<void>((resolve, reject) => {
      http!.once('error', reject);
      http!.listen(h.port, h.host, () => resolve());
    });
    const addr = http.address();
    httpPort = typeof addr === 'object' && addr ? addr.port : h.port;
  }
  return {
    grpcPort,
    httpPort,
    grpcAddress: `${g.host}:${grpcPort}`,
    httpAddress: o.httpListen ? `${splitHostPort(o.httpListen).host}:${httpPort}` : '',
    healthPort: health?.port ?? 0,
    async close() {
      serving = false;
      await health?.close();
      for (const w of [...watches]) w.end();
      for (const r of streams) r.end();
      if (http) {
        http.closeAllConnections?.();
        await new Promise<void>((r) => http!.close(() => r()));
      }
      await new Promise<void>((r) => grpc.tryShutdown(() => r()));
      grpc.forceShutdown();
    },
  };
}

// ------------------------------------------------------------------------------------------------ operator

const STATE_TO_PROTO: Record<string, AlertState> = { open: AlertState.ALERT_STATE_OPEN, acknowledged: AlertState.ALERT_STATE_ACKNOWLEDGED, resolved: AlertState.ALERT_STATE_RESOLVED };

export function alertToProto(x: AlertRecord): Alert {
  return {
    alertId: x.id, severity: severityNumber(x.severity), state: STATE_TO_PROTO[x.state] ?? AlertState.ALERT_STATE_UNSPECIFIED, title: x.title, description: x.description,
    hostId: x.hostId, vmUuid: uuidToBytes(x.vm.uuid), ruleId: x.ruleId, detectionIds: x.detectionIds ?? [], count: x.count, firstSeenUnixNs: x.firstSeenNs, lastSeenUnixNs: x.lastSeenNs,
    acknowledgedBy: x.acknowledgedBy, acknowledgedUnixNs: x.acknowledgedNs, ackComment: x.ackComment, seq: x.seq, technique: x.technique.id,
  };
}

function grpcError(e: unknown): { code: GrpcStatus; details: string } {
  if (isAnalysisError(e)) {
    const code = e.code === 'not-found' ? GrpcStatus.NOT_FOUND : e.code === 'bad-policy' || e.code === 'bad-request' ? GrpcStatus.INVALID_ARGUMENT : e.code === 'unauthorized' ? GrpcStatus.UNAUTHENTICATED : e.code === 'refused' ? GrpcStatus.PERMISSION_DENIED : e.code === 'not-attached' || e.code === 'conflict' ? GrpcStatus.FAILED_PRECONDITION : e.code === 'unsupported' ? GrpcStatus.UNIMPLEMENTED : e.code === 'command-timeout' ? GrpcStatus.DEADLINE_EXCEEDED : GrpcStatus.INTERNAL;
    return { code, details: e.message };
  }
  return { code: GrpcStatus.INTERNAL, details: (e as Error).message };
}

function operatorImplementation(a: Analysis, token: string | undefined, watches: Set<{ end(): void }>): UntypedServiceImplementation {
  const unary = <Req, Res>(fn: (req: Req, md: Metadata) => Promise<Res>) => (call: ServerUnaryCall<Req, Res>, cb: sendUnaryData<Res>) => {
    const auth = call.metadata.get('authorization')[0];
    if (!tokenOk(token, typeof auth === 'string' ? auth : undefined)) {
      cb({ code: GrpcStatus.UNAUTHENTICATED, details: 'a bearer token is required (authorization: Bearer TOKEN)' });
      return;
    }
    fn(call.request, call.metadata).then((r) => cb(null, r), (e: unknown) => cb(grpcError(e)));
  };
  const size = (n: number) => (n === 0 ? 100 : Math.min(n, 1000));
  return {
    listHosts: unary(async (req: { pageSize: number; pageToken: string; connectedOnly: boolean }) => {
      const hosts = await a.store.listHosts({ connectedOnly: req.connectedOnly, after: req.pageToken, limit: size(req.pageSize) });
      return {
        hosts: hosts.map((h) => ({ hostId: h.hostId, agentVersion: h.agentVersion, agentInstanceId: h.agentInstanceId, connected: h.connected, lastSeenUnixNs: h.lastSeenNs, capabilities: [], policyId: h.policyId, policyVersion: h.policyVersion, attachedVmCount: h.attachedVmCount })),
        nextPageToken: hosts.length === size(req.pageSize) ? hosts[hosts.length - 1]!.hostId : '',
      };
    }),
    listVms: unary(async (req: { pageSize: number; pageToken: string; hostId: string; attachedOnly: boolean }) => {
      const vms = await a.store.listVms({ host: req.hostId, attachedOnly: req.attachedOnly, after: req.pageToken, limit: size(req.pageSize) });
      return {
        vms: vms.map((v) => ({ vmUuid: uuidToBytes(v.uuid), name: v.name, hostId: v.hostId, attached: v.attached, sessionGeneration: v.sessionGeneration, vcpuCount: v.vcpuCount, qemuStartTimeMs: v.qemuStartTimeMs, dialect: 0, attachedUnixNs: v.attachedNs, detachedUnixNs: v.detachedNs })),
        nextPageToken: vms.length === size(req.pageSize) ? vms[vms.length - 1]!.uuid : '',
      };
    }),
    listAlerts: unary(async (req: { pageSize: number; pageToken: string; states: AlertState[]; minSeverity: number; hostId: string; vmUuid: Buffer; sinceUnixNs: bigint }) => {
      const f: AlertFilter = { limit: size(req.pageSize) };
      if (req.minSeverity) f.minSeverity = SEVERITY_NAMES[req.minSeverity - 1]!;
      if (req.hostId) f.host = req.hostId;
      if (req.vmUuid.length) f.vm = uuidFromBytes(req.vmUuid);
      if (req.sinceUnixNs) f.sinceNs = req.sinceUnixNs;
      if (req.pageToken) f.before = BigInt(req.pageToken);
      if (req.states.length === 1) f.state = Object.keys(STATE_TO_PROTO).find((k) => STATE_TO_PROTO[k] === req.states[0]) ?? '';
      const alerts = await a.store.listAlerts(f);
      return { alerts: alerts.map(alertToProto), nextPageToken: alerts.length === f.limit ? alerts[alerts.length - 1]!.seq.toString() : '' };
    }),
    acknowledgeAlert: unary(async (req: { alertId: string; comment: string }, md) => ({ alert: alertToProto(await a.store.ackAlert(req.alertId, String(md.get('x-periscope-actor')[0] ?? 'operator'), req.comment)) })),
    listPolicies: unary(async () => ({
      policies: a.currentPolicies().map((p) => ({ policy: { policyId: p.name, version: p.version, rules: [], exceptions: [], maxAskCentralDeadlineMs: 0, maxHeldEvents: 0, verdictsDocument: '' }, target: { hostIds: [...p.spec.select.hosts] }, description: p.spec.description, createdBy: p.createdBy, createdUnixNs: p.createdNs, hostsActive: 0, hostsTargeted: 0 })),
      nextPageToken: '',
    })),
    applyPolicy: unary(async (req: { document: string; policy?: unknown; expectedVersion: bigint; validateOnly: boolean; reason: string }, md) => {
      if (!req.document) {
        throw new AnalysisError('bad-request', req.policy
          ? 'ApplyPolicyRequest.policy (a typed LocalPolicy) is what analysis compiles and pushes to agents; apply a periscope.policy/v1 document in ApplyPolicyRequest.document instead'
          : 'ApplyPolicyRequest.document is empty: give a periscope.policy/v1 document (YAML or JSON)');
      }
      const actor = String(md.get('x-periscope-actor')[0] ?? 'operator');
      const stored = (name: string, version: bigint, description: string, createdBy: string, createdNs: bigint, hosts: readonly string[]) => ({
        policy: { policyId: name, version, rules: [], exceptions: [], maxAskCentralDeadlineMs: 0, maxHeldEvents: 0, verdictsDocument: '' },
        target: { hostIds: [...hosts] }, description, createdBy, createdUnixNs: createdNs, hostsActive: 0, hostsTargeted: 0,
      });
      if (req.validateOnly) {
        const spec = a.checkPolicy(req.document, 'request');
        return { policy: stored(spec.name, 0n, spec.description, actor, 0n, spec.select.hosts), warnings: [] };
      }
      const r = await a.applyPolicy(req.document, { source: 'grpc', createdBy: actor, expectedVersion: req.expectedVersion });
      const p = r.policy;
      return { policy: stored(p.name, p.version, p.spec.description, p.createdBy, p.createdNs, p.spec.select.hosts), warnings: r.changed ? [] : [`policy ${p.name} unchanged: version ${p.version} kept`] };
    }),
    listExceptions: unary(async (req: { policyId: string; includeExpired: boolean }) => ({
      exceptions: (await a.store.listExceptions({ policy: req.policyId, includeExpired: req.includeExpired })).map((e) => ({
        exceptionId: e.spec.id, ruleIds: [`${e.spec.policy}/${e.spec.module}/${e.spec.rule}`], expiresUnixNs: e.spec.expiresNs, reason: e.spec.reason, createdBy: e.spec.createdBy,
      })),
      nextPageToken: '',
    })),
    createException: unary(async (req: { policyId: string; exception?: { ruleIds: string[]; match?: { vmUuids: Buffer[]; rip?: { start: bigint; end: bigint } }; expiresUnixNs: bigint; reason: string } }) => {
      const e = req.exception;
      const rule = e?.ruleIds[0]?.split('/') ?? [];
      if (!e || rule.length < 2) throw new AnalysisError('bad-request', 'exception.rule_ids[0] must name MODULE/RULE (e.g. cr-pinning/cr4); to except an alert use the HTTP API (POST /v1/exceptions {"fromAlert": ID})');
      const [module, r] = rule.length >= 3 ? [rule[1]!, rule[2]!] : [rule[0]!, rule[1]!];
      const spec = await a.createException({
        policy: req.policyId, module: module as ModuleName, rule: r, vms: (e.match?.vmUuids ?? []).map((b) => uuidFromBytes(b)),
        originator: e.match?.rip ? { rip: e.match.rip } : {}, victim: {}, reason: e.reason, expiresNs: e.expiresUnixNs, createdBy: 'operator',
      });
      return { exception: { exceptionId: spec.id, ruleIds: [`${spec.policy}/${spec.module}/${spec.rule}`], expiresUnixNs: spec.expiresNs, reason: spec.reason, createdBy: spec.createdBy }, policyVersion: 0n };
    }),
    deleteException: unary(async (req: { exceptionId: string }) => {
      await a.deleteException(req.exceptionId);
      return { policyVersion: 0n };
    }),
    listAuditEvents: unary(async (req: { pageSize: number; pageToken: string; actor: string; action: string; sinceUnixNs: bigint; untilUnixNs: bigint; vmUuid: Buffer }) => {
      if (req.pageToken && !/^\d+$/.test(req.pageToken)) throw new AnalysisError('bad-request', 'page_token must be the token of a previous page');
      const limit = size(req.pageSize);
      const events = await a.audit.list({
        limit, ...(req.actor ? { actor: req.actor } : {}), ...(req.action ? { action: req.action } : {}), ...(req.sinceUnixNs ? { sinceNs: req.sinceUnixNs } : {}),
        ...(req.untilUnixNs ? { untilNs: req.untilUnixNs } : {}), ...(req.vmUuid?.length ? { vm: uuidFromBytes(req.vmUuid) } : {}), ...(req.pageToken ? { before: BigInt(req.pageToken) } : {}),
      });
      return { events: events.map(auditToProto), nextPageToken: events.length === limit ? events[events.length - 1]!.seq : '' };
    }),
    watchAlerts: watchAlertsImplementation(a, (h) => tokenOk(token, h), alertToProto, watches),
  };
}

// ------------------------------------------------------------------------------------------------ HTTP

const hexJson = (v: unknown): unknown => JSON.parse(JSON.stringify(v, (_k, x: unknown) => (typeof x === 'bigint' ? `0x${x.toString(16)}` : x))) as unknown;

/** An exception as the API shows it: guest values (RIPs, addresses, register values) as 0x-hex. */
export function exceptionJson(e: ExceptionSpec, createdNs?: bigint): Record<string, unknown> {
  const { expiresNs, ...rest } = e;
  return { ...(hexJson(rest) as Record<string, unknown>), expiresNs: expiresNs.toString(), ...(createdNs !== undefined ? { createdNs: createdNs.toString() } : {}) };
}

class HttpError extends Error {
  constructor(readonly status: number, readonly code: string, message: string, readonly issues: readonly unknown[] = []) {
    super(message);
  }
}


function send(res: ServerResponse, status: number, body: unknown): void {
  res.writeHead(status, { 'content-type': 'application/json' }).end(JSON.stringify(body, jsonReplacer));
}

async function readBody(req: IncomingMessage, limit = 4 * 1024 * 1024): Promise<string> {
  const chunks: Buffer[] = [];
  let n = 0;
  for await (const c of req) {
    n += (c as Buffer).length;
    if (n > limit) throw new HttpError(413, 'too-large', `request body above ${limit} bytes`);
    chunks.push(c as Buffer);
  }
  return Buffer.concat(chunks).toString('utf8');
}

async function readJson(req: IncomingMessage): Promise<Record<string, unknown>> {
  const t = await readBody(req);
  if (!t.trim()) return {};
  try {
    const v = JSON.parse(t) as unknown;
    if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new Error('not an object');
    return v as Record<string, unknown>;
  } catch (e) {
    throw new HttpError(400, 'bad-request', `body is not a JSON object: ${(e as Error).message}`);
  }
}

function alertFilter(q: URLSearchParams): AlertFilter {
  const f: AlertFilter = {};
  const sev = q.get('severity');
  if (sev) {
    if (!(SEVERITY_NAMES as readonly string[]).includes(sev)) throw new HttpError(400, 'bad-request', `severity must be one of ${SEVERITY_NAMES.join(', ')}`);
    f.minSeverity = sev as SeverityName;
  }
  for (const [k, p] of [['vm', 'vm'], ['host', 'host'], ['technique', 'technique'], ['module', 'module'], ['state', 'state']] as const) {
    const v = q.get(k);
    if (v) f[p] = v;
  }
  const num = (k: string): bigint | undefined => {
    const v = q.get(k);
    if (v === null || v === '') return undefined;
    if (!/^\d+$/.test(v)) throw new HttpError(400, 'bad-request', `${k} must be a non-negative integer`);
    return BigInt(v);
  };
  const since = num('since');
  if (since !== undefined) f.sinceNs = since;
  const cursor = num('cursor');
  if (cursor !== undefined) f.before = cursor;
  const limit = num('limit');
  if (limit !== undefined) f.limit = Number(limit);
  return f;
}

const matches = (f: AlertFilter, x: AlertRecord): boolean =>
  (!f.minSeverity || severityNumber(x.severity) >= severityNumber(f.minSeverity)) && (!f.vm || x.vm.uuid === f.vm || x.vm.name === f.vm) && (!f.host || x.hostId === f.host) &&
  (!f.technique || x.technique.id === f.technique) && (!f.module || x.module === f.module) && (!f.state || x.state === f.state);

async function handleHttp(a: Analysis, req: IncomingMessage, res: ServerResponse, token: string | undefined, streams: Set<ServerResponse>, dashboardDir?: string): Promise<void> {
  const url = new URL(req.url ?? '/', 'http://analysis');
  const path = url.pathname;
  const method = req.method ?? 'GET';
  try {
    if (path === '/healthz') return send(res, 200, { status: 'ok', replica: a.replicaId, agents: a.sessions.size, vms: a.liveVms.size, db: a.db.driver });
    if (path === '/metrics') {
      res.writeHead(200, { 'content-type': 'text/plain; version=0.0.4' }).end(a.registry.render());
      return;
    }
    // The dashboard (static files, no data in them: its API calls carry the token).
    if (dashboardDir && !path.startsWith('/v1/') && (await serveStatic(dashboardDir, req, res, path))) return;
    if (!tokenOk(token, req.headers.authorization)) throw new HttpError(401, 'unauthorized', 'a bearer token is required (Authorization: Bearer TOKEN)');
    let m: RegExpExecArray | null;
    if (await handleMemoryHttp(a, req, res, path, url)) return; // /v1/vms/{id}/scan, /v1/vms/{id}/integrity (memory/http.ts)
    if (await handleTracingHttp(a, req, res, path, url)) return; // /v1/vms/{id}/traces, /v1/traces, /v1/traces/hits (tracing-http.ts)
    const who = operatorWho(url.searchParams.get('by') ?? (req.headers['x-periscope-actor'] as string | undefined), httpPrincipal(req, token !== undefined));
    if (await handleOperatorHttp(a, req, res, path, url, who)) return; // /v1/audit, /v1/vms/{id}/memory, /v1/vms/{id}/vcpus/{n}/registers (operator-http.ts)
    if (path === '/v1/heki' && method === 'GET') {
      const attached = [...a.liveVms.values()].map((v) => ({ uuid: v.uuid, name: v.name, hostId: v.hostId }));
      return send(res, 200, await a.heki.fleet(url.searchParams.get('host') ? { host: url.searchParams.get('host')! } : {}, attached));
    }
    if (path === '/v1/hosts' && method === 'GET') return send(res, 200, { hosts: await a.store.listHosts({ connectedOnly: url.searchParams.get('connected') === 'true' }) });
    if (path === '/v1/vms' && method === 'GET') {
      const vms = await a.store.listVms({ ...(url.searchParams.get('host') ? { host: url.searchParams.get('host')! } : {}), attachedOnly: url.searchParams.get('attached') === 'true', ...(url.searchParams.get('after') ? { after: url.searchParams.get('after')! } : {}), limit: Number(url.searchParams.get('limit') ?? 1000) });
      const heki = await a.heki.viewsByUuid();
      return send(res, 200, { vms: vms.map((v) => ({ ...v, protection: a.liveVms.get(v.uuid)?.protection ?? v.protection, heki: heki.get(v.uuid) ?? null })) });
    }
    if ((m = /^\/v1\/vms\/([^/]+)$/.exec(path)) && method === 'GET') {
      const vm = await a.store.findVm(decodeURIComponent(m[1]!));
      if (!vm) throw new HttpError(404, 'not-found', `no VM ${m[1]}`);
      const live = a.liveVms.get(vm.uuid);
      return send(res, 200, { vm: { ...vm, protection: live?.protection ?? vm.protection, heki: (await a.heki.viewsByUuid(vm.uuid)).get(vm.uuid) ?? null }, counters: await a.store.vmCounters(vm.uuid), stall: live?.stall ?? null, recentEvents: live?.ring ?? [], commands: await a.store.listCommands(vm.uuid, 50), losses: await a.store.listLosses(vm.uuid) });
    }
    if ((m = /^\/v1\/vms\/([^/]+)\/labels$/.exec(path)) && (method === 'PUT' || method === 'POST')) {
      const body = await readJson(req);
      const labels = body['labels'];
      if (typeof labels !== 'object' || labels === null || Object.values(labels).some((v) => typeof v !== 'string')) throw new HttpError(400, 'bad-request', 'body must be {"labels": {"key": "value", …}}');
      const vm = await a.store.findVm(decodeURIComponent(m[1]!));
      if (!vm) throw new HttpError(404, 'not-found', `no VM ${m[1]}`);
      await a.setVmLabels(vm.uuid, labels as Record<string, string>);
      return send(res, 200, { vm: await a.store.getVm(vm.uuid) });
    }
    if ((m = /^\/v1\/vms\/([^/]+)\/(pause|resume)$/.exec(path)) && method === 'POST') {
      // VmPauseControl to the owning agent, which persists it and re-applies it when the VM re-attaches.
      const body = await readJson(req);
      const vm = await a.store.findVm(decodeURIComponent(m[1]!));
      if (!vm) throw new HttpError(404, 'not-found', `no VM ${m[1]}`);
      const paused = m[2] === 'pause';
      const r = await a.operations.run(vm.uuid, m[2]!, {}, operatorWho(typeof body['by'] === 'string' ? body['by'] : undefined, httpPrincipal(req, token !== undefined)));
      return send(res, r['status'] === 'ok' ? 200 : 202, { vm: { uuid: vm.uuid, name: vm.name, hostId: r['hostId'] }, paused, status: r['status'], message: r['message'] });
    }
    if (path === '/v1/alerts' && method === 'GET') {
      const f = alertFilter(url.searchParams);
      const alerts = await a.store.listAlerts(f);
      const limit = Math.min(Math.max(f.limit ?? 100, 1), 1000);
      return send(res, 200, { alerts: alerts.map(alertJson), nextCursor: alerts.length === limit ? alerts[alerts.length - 1]!.seq.toString() : null });
    }
    if (path === '/v1/alerts/export' && method === 'GET') {
      const f = alertFilter(url.searchParams);
      res.writeHead(200, { 'content-type': 'application/x-ndjson' });
      let after = 0n;
      for (;;) {
        const page = await a.store.listAlerts({ ...f, after, limit: 1000 });
        for (const x of page) res.write(`${JSON.stringify(alertJson(x))}\n`);
        if (page.length < 1000) break;
        after = page[page.length - 1]!.seq;
      }
      res.end();
      return;
    }
    if (path === '/v1/alerts/stream' && method === 'GET') return streamAlerts(a, url, req, res, streams);
    if ((m = /^\/v1\/alerts\/([^/]+)$/.exec(path)) && method === 'GET') {
      const x = await a.store.getAlert(decodeURIComponent(m[1]!));
      if (!x) throw new HttpError(404, 'not-found', `no alert ${m[1]}`);
      return send(res, 200, { alert: alertJson(x) });
    }
    if ((m = /^\/v1\/alerts\/([^/]+)\/ack$/.exec(path)) && method === 'POST') {
      const body = await readJson(req);
      return send(res, 200, { alert: alertJson(await a.store.ackAlert(decodeURIComponent(m[1]!), typeof body['by'] === 'string' ? body['by'] : 'operator', typeof body['comment'] === 'string' ? body['comment'] : '')) });
    }
    if (path === '/v1/policies' && method === 'GET') return send(res, 200, { policies: a.currentPolicies().map((p) => ({ name: p.name, version: p.version, description: p.spec.description, priority: p.spec.priority, select: p.spec.select, profile: p.spec.profile, modules: Object.keys(p.spec.modules), createdBy: p.createdBy, createdNs: p.createdNs, source: p.source })) });
    if ((path === '/v1/policies' || path === '/v1/policies/validate') && (method === 'POST' || method === 'PUT')) {
      const text = await readBody(req);
      if (path.endsWith('/validate')) {
        const { parsePolicyDocument } = await import('./policy.js');
        const spec = parsePolicyDocument(text, 'request');
        return send(res, 200, { valid: true, name: spec.name, modules: Object.keys(spec.modules) });
      }
      const r = await a.applyPolicy(text, { source: 'http', createdBy: url.searchParams.get('by') ?? 'operator' });
      return send(res, r.changed ? 201 : 200, { name: r.policy.name, version: r.policy.version, changed: r.changed });
    }
    if ((m = /^\/v1\/policies\/([^/]+)$/.exec(path))) {
      const name = decodeURIComponent(m[1]!);
      if (method === 'DELETE') {
        await a.deletePolicy(name, 'operator');
        return send(res, 200, { deleted: name });
      }
      const v = url.searchParams.get('version');
      const p = await a.store.getPolicy(name, v ? BigInt(v) : undefined);
      if (!p) throw new HttpError(404, 'not-found', `no policy ${name}`);
      return send(res, 200, { name: p.name, version: p.version, document: p.document, spec: p.spec, history: await a.store.policyHistory(name) });
    }
    if (path === '/v1/local-policy' && method === 'GET') {
      const host = url.searchParams.get('host') ?? '';
      const s = a.sessions.get(host);
      if (!s) throw new HttpError(404, 'not-found', `no agent connected for host ${host} on this replica`);
      const hp = a.build([...s.vms.values()].map((v) => ({ uuid: v.uuid, name: v.name, hostId: v.hostId, labels: v.labels, ...(v.facts ? { facts: v.facts } : {}) })), s.lastPolicyVersion);
      res.writeHead(200, { 'content-type': 'application/json' }).end(hp.document);
      return;
    }
    if (path === '/v1/exceptions' && method === 'GET') return send(res, 200, { exceptions: (await a.store.listExceptions({ ...(url.searchParams.get('policy') ? { policy: url.searchParams.get('policy')! } : {}), includeExpired: url.searchParams.get('expired') === 'true' })).map((e) => exceptionJson(e.spec, e.createdNs)) });
    if (path === '/v1/exceptions' && method === 'POST') {
      const b = await readJson(req);
      const expiresNs = typeof b['expiresInSeconds'] === 'number' ? BigInt(Date.now() + b['expiresInSeconds'] * 1000) * 1_000_000n : undefined;
      if (typeof b['fromAlert'] === 'string') {
        const e = await a.createExceptionFromAlert(b['fromAlert'], { ...(typeof b['reason'] === 'string' ? { reason: b['reason'] } : {}), createdBy: typeof b['by'] === 'string' ? b['by'] : 'operator', ...(expiresNs ? { expiresNs } : {}), anyVm: b['anyVm'] === true });
        return send(res, 201, { exception: exceptionJson(e) });
      }
      const need = (k: string) => {
        if (typeof b[k] !== 'string') throw new HttpError(400, 'bad-request', `${k} is required (or give fromAlert)`);
        return b[k] as string;
      };
      const range = (v: unknown, k: string) => {
        if (v === undefined) return undefined;
        const o = v as Record<string, unknown>;
        try {
          return { start: BigInt(o['start'] as string), end: BigInt(o['end'] as string) };
        } catch {
          throw new HttpError(400, 'bad-request', `${k} must be {"start": "0x…", "end": "0x…"}`);
        }
      };
      const orig = (b['originator'] ?? {}) as Record<string, unknown>;
      const vic = (b['victim'] ?? {}) as Record<string, unknown>;
      const rip = range(orig['rip'], 'originator.rip');
      const gpa = range(vic['gpa'], 'victim.gpa');
      const gva = range(vic['gva'], 'victim.gva');
      const e = await a.createException({
        policy: need('policy'), module: need('module') as ModuleName, rule: need('rule'), vms: Array.isArray(b['vms']) ? (b['vms'] as string[]) : [],
        originator: { ...(rip ? { rip } : {}), ...(typeof orig['symbol'] === 'string' ? { symbol: orig['symbol'] } : {}) },
        victim: { ...(gpa ? { gpa } : {}), ...(gva ? { gva } : {}), ...(typeof vic['cr'] === 'number' ? { cr: vic['cr'] } : {}), ...(typeof vic['msr'] === 'number' ? { msr: vic['msr'] } : {}), ...(vic['descriptor'] === 'IDTR' || vic['descriptor'] === 'GDTR' ? { descriptor: vic['descriptor'] } : {}) },
        reason: typeof b['reason'] === 'string' ? b['reason'] : '', createdBy: typeof b['by'] === 'string' ? b['by'] : 'operator', ...(expiresNs ? { expiresNs } : {}),
      });
      return send(res, 201, { exception: exceptionJson(e) });
    }
    if ((m = /^\/v1\/exceptions\/([^/]+)$/.exec(path)) && method === 'DELETE') {
      await a.deleteException(decodeURIComponent(m[1]!));
      return send(res, 200, { deleted: m[1] });
    }
    if (path === '/v1/commands' && method === 'GET') return send(res, 200, { commands: await a.store.listCommands(url.searchParams.get('vm') ?? undefined, 200) });
    if (path === '/v1/losses' && method === 'GET') return send(res, 200, { losses: await a.store.listLosses() });
    if (path === '/v1/profiles' && method === 'GET') return send(res, 200, { profiles: a.profiles.names() });
    throw new HttpError(404, 'not-found', `no route ${method} ${path}`);
  } catch (e) {
    if (res.headersSent) {
      res.end();
      return;
    }
    if (e instanceof HttpError) return send(res, e.status, { error: { code: e.code, message: e.message, issues: e.issues } });
    if (isAnalysisError(e)) {
      const status = e.code === 'not-found' ? 404 : e.code === 'bad-policy' || e.code === 'bad-request' || e.code === 'compile-failed' ? 400 : e.code === 'unauthorized' ? 401 : e.code === 'refused' ? 403 : e.code === 'not-attached' || e.code === 'conflict' ? 409 : e.code === 'unsupported' ? 501 : e.code === 'command-failed' ? 502 : e.code === 'command-timeout' ? 504 : 500;
      return send(res, status, { error: { code: e.code, message: e.message, issues: e.issues } });
    }
    return send(res, 500, { error: { code: 'internal', message: (e as Error).message } });
  }
}

/**
 * Live alerts: server-sent events (`event: alert`, `id: SEQ`) by default, or JSON lines with
 * `?format=jsonl`. `?after=SEQ` (or the `Last-Event-ID` header) first replays stored alerts after that
 * sequence number. Filters as for /v1/alerts.
 */
async function streamAlerts(a: Analysis, url: URL, req: IncomingMessage, res: ServerResponse, streams: Set<ServerResponse>): Promise<void> {
  const f = alertFilter(url.searchParams);
  const jsonl = url.searchParams.get('format') === 'jsonl';
  const write = (x: AlertRecord, outcome: string) => {
    const body = JSON.stringify({ outcome, alert: alertJson(x) });
    res.write(jsonl ? `${body}\n` : `id: ${x.seq}\nevent: alert\ndata: ${body}\n\n`);
  };
  res.writeHead(200, { 'content-type': jsonl ? 'application/x-ndjson' : 'text/event-stream', 'cache-control': 'no-cache', connection: 'keep-alive' });
  res.flushHeaders();
  streams.add(res);
  const buffered: { alert: AlertRecord; outcome: string }[] = [];
  let replaying = true;
  const off = a.onAlert((n) => {
    if (!matches(f, n.alert)) return;
    if (replaying) buffered.push(n);
    else write(n.alert, n.outcome);
  });
  const hb = setInterval(() => res.write(jsonl ? '' : ': keepalive\n\n'), 15_000);
  const done = () => {
    off();
    clearInterval(hb);
    streams.delete(res);
  };
  req.on('close', done);
  res.on('close', done);
  const afterText = url.searchParams.get('after') ?? (req.headers['last-event-id'] as string | undefined);
  let last = 0n;
  if (afterText && /^\d+$/.test(afterText)) {
    let after = BigInt(afterText);
    for (;;) {
      const page = await a.store.listAlerts({ ...f, after, limit: 500 });
      for (const x of page) write(x, 'stored');
      if (page.length) after = last = page[page.length - 1]!.seq;
      if (page.length < 500) break;
    }
  }
  replaying = false;
  for (const n of buffered) if (n.alert.seq > last || n.outcome === 'folded') write(n.alert, n.outcome);
  if (!jsonl) res.write(': ready\n\n');
}
