/**
 * `periscope analysis`: the central service. Parses configuration (flags > PERISCOPE_* env > --config JSON
 * > defaults), opens the database (embedded PGlite by default, or PostgreSQL), applies migrations,
 * imports --policy DIR, serves AgentLink + health + operator gRPC on --listen and the HTTP API on --http,
 * and stops cleanly on SIGTERM/SIGINT.
 */
import { readFileSync } from 'node:fs';
import { ConfigError, defineSchema, loadConfig, networkOptions, parseAddress } from '@periscope/config';
import { Analysis, AnalysisError, type AnalysisOptions } from '@periscope/analysis';

export const analysisSchema = defineSchema({
  options: {
    ...networkOptions,
    listen: { kind: 'address', default: '127.0.0.1:7400', description: 'gRPC address (HOST:PORT) for the agent link, grpc.health.v1 and the operator API' },
    db: { kind: 'string', default: 'pglite:./periscope-data', description: 'database: pglite:DIR (embedded, default), pglite:memory, or postgres://USER@HOST:PORT/DB' },
    http: { kind: 'address', default: '127.0.0.1:7401', description: 'HOST:PORT for the HTTP API, the live alert stream, /metrics and /healthz' },
    policy: { kind: 'path', description: 'directory of policy documents (*.yaml, *.yml, *.json) imported at start; idempotent (a new version only when a document changed)' },
    profiles: { kind: 'path', description: 'directory of extra guest OS profiles (*.json, docs/profiles.md); linux-sim is built in' },
    'api-token-file': { kind: 'path', description: 'file holding the bearer token the HTTP API and operator RPCs require (required in fleet mode)' },
    'replica-id': { kind: 'string', description: 'this replica\'s id (default: hostname-pid)' },
    webhook: { kind: 'string', description: 'POST every new or updated alert (JSON) to this URL, with retries' },
    'alerts-jsonl': { kind: 'string', description: 'append every new or updated alert as a JSON line to this file (- = stdout)' },
    'log-level': { kind: 'enum', values: ['debug', 'info', 'warn', 'error'], default: 'info', description: 'least severe log level written (JSON lines on stderr)' },
  },
});

const LEVELS = { debug: 10, info: 20, warn: 30, error: 40 } as const;

function hostPort(addr: string, key: string): string {
  const p = parseAddress(addr);
  if (!p || p.kind !== 'tcp' || p.port === undefined) throw new ConfigError('invalid-value', `--${key} must be HOST:PORT, got ${addr}`, { key });
  return `${p.host.includes(':') ? `[${p.host}]` : p.host}:${p.port}`;
}

export async function runAnalysis(argv: string[]): Promise<number> {
  const cfg = loadConfig(analysisSchema, argv, process.env, {
    command: 'periscope analysis',
    summary:
      'The central analysis service: inventory of hosts/VMs, policies and protection modules compiled to local rules for the host agents, alerts (query, live stream, export, webhook) and exceptions.\n' +
      'Examples:\n  periscope analysis                                  # PGlite in ./periscope-data, gRPC 127.0.0.1:7400, HTTP 127.0.0.1:7401\n' +
      '  periscope analysis --db postgres://postgres@127.0.0.1:5432/periscope --policy deploy/policies\n' +
      '  curl -s 127.0.0.1:7401/v1/alerts; curl -N 127.0.0.1:7401/v1/alerts/stream',
  });
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
      ...(v.policy ? { policyDir: v.policy } : {}),
      ...(v.profiles ? { profileDir: v.profiles } : {}),
      ...(apiToken ? { apiToken } : {}),
      ...(cfg.tls ? { tls: cfg.tls } : {}),
      ...(v['replica-id'] ? { replicaId: v['replica-id'] } : {}),
      ...(v.webhook ? { webhook: { url: v.webhook } } : {}),
      ...(v['alerts-jsonl'] ? { alertsJsonl: v['alerts-jsonl'] } : {}),
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
      return e.code === 'bad-policy' || e.code === 'bad-db-url' || e.code === 'bad-profile' ? 2 : 1;
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
