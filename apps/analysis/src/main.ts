/**
 * `periscope analysis`: the central service. Parses configuration (flags > PERISCOPE_* env > --config JSON
 * > defaults), opens the database (embedded PGlite by default, or PostgreSQL), applies migrations,
 * imports --policy DIR, serves AgentLink + health + operator gRPC on --listen and the HTTP API on --http,
 * and stops cleanly on SIGTERM/SIGINT.
 */
import { existsSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { ConfigError, defineSchema, loadConfig, networkOptions, parseAddress } from '@periscope/config';
import { Analysis, AnalysisError, type AnalysisOptions } from '@periscope/analysis';

export { SHIPPED_POLICY_DIR } from '@periscope/analysis';

export const analysisSchema = defineSchema({
  options: {
    ...networkOptions,
    listen: { kind: 'address', default: '127.0.0.1:7400', description: 'gRPC address (HOST:PORT) for the agent link, grpc.health.v1 and the operator API' },
    db: { kind: 'string', default: 'pglite:./periscope-data', description: 'database: pglite:DIR (embedded, default), pglite:memory, or postgres://USER@HOST:PORT/DB' },
    'health-listen': { kind: 'address', description: 'plaintext gRPC address (HOST:PORT) serving only grpc.health.v1, for Kubernetes gRPC probes (they cannot do mTLS)' },
    'grpc-max-connection-age': { kind: 'duration', min: '1s', description: 'close gRPC connections (agent links included) after this age, so agents rebalance across replicas; unset = never' },
    'grpc-max-connection-age-grace': { kind: 'duration', min: '0ms', description: 'time a connection past --grpc-max-connection-age gets to finish its calls before it is closed' },
    http: { kind: 'address', default: '127.0.0.1:7401', description: 'HOST:PORT for the HTTP API, the live alert stream, /metrics and /healthz' },
    policy: { kind: 'path', description: 'directory of policy documents (*.yaml, *.yml, *.json) imported at start; idempotent (a new version only when a document changed)' },
    profiles: { kind: 'path', description: 'directory of extra guest OS profiles (*.json, docs/profiles.md); linux-sim is built in' },
    'api-token-file': { kind: 'path', description: 'file holding the bearer token the HTTP API and operator RPCs require (required in fleet mode)' },
    'replica-id': { kind: 'string', description: 'this replica\'s id (default: hostname-pid), unique among the replicas sharing one PostgreSQL (VM ownership and routing use it; several replicas need PostgreSQL)' },
    webhook: { kind: 'string', description: 'POST every new or updated alert (JSON) to this URL, with retries' },
    'alerts-jsonl': { kind: 'string', description: 'append every new or updated alert as a JSON line to this file (- = stdout)' },
    'dashboard-dir': { kind: 'path', description: 'directory of the web dashboard served at / of --http (default: the built @periscope/dashboard, apps/dashboard/dist)' },
    'log-level': { kind: 'enum', values: ['debug', 'info', 'warn', 'error'], default: 'info', description: 'least severe log level written (JSON lines on stderr)' },
  },
});

const LEVELS = { debug: 10, info: 20, warn: 30, error: 40 } as const;

/** The built dashboard of the installed @periscope/dashboard package, if it is there. */
export function defaultDashboardDir(): string | undefined {
  try {
    const dir = join(dirname(createRequire(import.meta.url).resolve('@periscope/dashboard/package.json')), 'dist');
    return existsSync(join(dir, 'index.html')) ? dir : undefined;
  } catch {
    return undefined;
  }
}

function hostPort(addr: string, key: string): string {
  const p = parseAddress(addr);
  if (!p || p.kind !== 'tcp' || p.port === undefined) throw new ConfigError('invalid-value', `--${key} must be HOST:PORT, got ${addr}`, { key });
  return `${p.host.includes(':') ? `[${p.host}]` : p.host}:${p.port}`;
}

class ExitRequest {
  constructor(readonly code: number) {}
}

/** Where --help and usage errors go (default: the process's stdout/stderr). */
export interface AnalysisIo {
  stdout(text: string): void;
  stderr(text: string): void;
}

const defaultIo: AnalysisIo = { stdout: (t) => void process.stdout.write(t), stderr: (t) => void process.stderr.write(t) };

/** Run `periscope analysis`; resolves with the exit code (never calls process.exit: --help resolves 0, a usage error 2). */
export async function runAnalysis(argv: string[], io: AnalysisIo = defaultIo): Promise<number> {
  let cfg;
  try {
    cfg = loadConfig(analysisSchema, argv, process.env, {
    command: 'periscope analysis',
    summary:
      'The central analysis service: inventory of hosts/VMs, policies and protection modules compiled to local rules for the host agents, alerts (query, live stream, export, webhook) and exceptions.\n' +
      'Examples:\n  periscope analysis                                  # PGlite in ./periscope-data, gRPC 127.0.0.1:7400, HTTP 127.0.0.1:7401\n' +
      '  periscope analysis --db postgres://postgres@127.0.0.1:5432/periscope --policy deploy/policies\n' +
      '  curl -s 127.0.0.1:7401/v1/alerts; curl -N 127.0.0.1:7401/v1/alerts/stream',
      io: { stdout: io.stdout, stderr: io.stderr, exit: (code: number): never => { throw new ExitRequest(code); } },
    });
  } catch (e) {
    if (e instanceof ExitRequest) return e.code;
    throw e;
  }
  const v = cfg.values;
  const min = LEVELS[v['log-level']];
  const log = (level: keyof typeof LEVELS, msg: string, fields: Record<string, unknown> = {}): void => {
    if (LEVELS[level] < min) return;
    process.stderr.write(`${JSON.stringify({ ts: new Date().toISOString(), level, msg, ...fields }, (_k, x: unknown) => (typeof x === 'bigint' ? x.toString() : x))}\n`);
  };
  let opts: AnalysisOptions;
  try {
    let apiToken: string | undefined;
    if (v['api-token-file']) {
      apiToken = readFileSync(v['api-token-file'], 'utf8').trim();
      if (!apiToken) throw new ConfigError('invalid-value', `--api-token-file ${v['api-token-file']} is empty`, { key: 'api-token-file' });
    } else if (cfg.fleetMode) {
      throw new ConfigError('missing-required', 'fleet mode (TLS configured) requires --api-token-file: the HTTP and operator APIs need a bearer token', { key: 'api-token-file' });
    }
    opts = {
      db: v.db,
      grpcListen: hostPort(v.listen, 'listen'),
      httpListen: hostPort(v.http, 'http'),
      ...(v['health-listen'] ? { healthListen: hostPort(v['health-listen'], 'health-listen') } : {}),
      ...(v['grpc-max-connection-age'] !== undefined ? { grpcMaxConnectionAgeMs: v['grpc-max-connection-age'] } : {}),
      ...(v['grpc-max-connection-age-grace'] !== undefined ? { grpcMaxConnectionAgeGraceMs: v['grpc-max-connection-age-grace'] } : {}),
      ...(v.policy ? { policyDir: v.policy } : {}),
      ...(v.profiles ? { profileDir: v.profiles } : {}),
      ...(apiToken ? { apiToken } : {}),
      ...(cfg.tls ? { tls: cfg.tls } : {}),
      ...(v['replica-id'] ? { replicaId: v['replica-id'] } : {}),
      ...(v.webhook ? { webhook: { url: v.webhook } } : {}),
      ...(v['alerts-jsonl'] ? { alertsJsonl: v['alerts-jsonl'] } : {}),
      ...((v['dashboard-dir'] ?? defaultDashboardDir()) ? { dashboardDir: (v['dashboard-dir'] ?? defaultDashboardDir())! } : {}),
      log,
    };
  } catch (e) {
    if (e instanceof ConfigError) {
      process.stderr.write(`periscope analysis: ${e.message}\n`);
      return 2;
    }
    throw e;
  }
  let svc: Analysis;
  try {
    svc = await Analysis.start(opts);
  } catch (e) {
    if (e instanceof AnalysisError) {
      process.stderr.write(`periscope analysis: ${e.message}\n${e.issues.map((i) => `  ${i.path}: ${i.message}\n`).join('')}`);
      // db-locked: a second replica on one PGlite directory (several replicas need PostgreSQL)
      return e.code === 'bad-policy' || e.code === 'bad-db-url' || e.code === 'bad-profile' || e.code === 'db-locked' ? 2 : 1;
    }
    process.stderr.write(`periscope analysis: ${(e as Error).message}\n`);
    return 1;
  }
  process.stdout.write(`${JSON.stringify({ grpc: svc.grpcAddress, http: svc.httpAddress, db: svc.db.driver, replica: svc.replicaId })}\n`);
  return new Promise<number>((resolve) => {
    let stopping = false;
    const stop = (signal: string) => {
      if (stopping) {
        resolve(130);
        return;
      }
      stopping = true;
      log('info', `${signal}: stopping`);
      svc.stop().then(
        () => resolve(0),
        (e: unknown) => {
          log('error', `shutdown failed: ${(e as Error).message}`);
          resolve(1);
        },
      );
    };
    process.on('SIGTERM', () => stop('SIGTERM'));
    process.on('SIGINT', () => stop('SIGINT'));
  });
}
