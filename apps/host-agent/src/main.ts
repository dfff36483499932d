/**
 * `periscope host-agent`: the per-host daemon. Parses configuration (flags > PERISCOPE_* env >
 * --config JSON > defaults), loads the local policy, starts the agent, and on SIGTERM/SIGINT detaches
 * every VM (guest restored) before exiting.
 */
import { hostname } from 'node:os';
import { ConfigError, defineSchema, loadConfig, networkOptions, parseAddress } from '@periscope/config';
import { CookieFileError, HostAgent, loadCookieFile, type CookieLookup } from '@periscope/host-agent';
import { loadDefaultPolicy, loadPolicyFile, VerdictsError, type Policy } from '@periscope/verdicts';

export const hostAgentSchema = defineSchema({
  options: {
    ...networkOptions,
    'kvmi-listen': { kind: 'list', items: 'address', description: 'Unix socket(s) QEMU connects to (unix:PATH); repeat for several', required: true },
    analysis: { kind: 'address', description: 'analysis service address (the streaming link arrives with issue #7; accepted and reported now)' },
    'host-id': { kind: 'string', description: 'this host\'s id in the fleet (default: the hostname)' },
    'cookie-file': { kind: 'path', description: 'shared secret QEMU checks (raw bytes), or a JSON map {"<vm uuid>": "secret", "*": "default"}' },
    policy: { kind: 'path', description: 'local policy file (periscope.verdicts/v1 JSON); default: the shipped default policy' },
    'socket-group': { kind: 'integer', min: 0, max: 2147483647, description: 'numeric gid for the KVMI socket files (mode 0660): QEMU\'s group' },
    'heki-listen': { kind: 'address', description: 'Unix socket for the VMM Heki sink (issue #11; accepted and reported now)' },
    'api-listen': { kind: 'address', description: 'local API for the CLI (unix:PATH)' },
    'metrics-listen': { kind: 'address', description: 'HOST:PORT for Prometheus /metrics and /healthz' },
    'log-level': { kind: 'enum', values: ['debug', 'info', 'warn', 'error'], default: 'info', description: 'least severe log level written (JSON lines on stderr)' },
  },
});

const LEVELS = { debug: 10, info: 20, warn: 30, error: 40 } as const;

function unixPath(addr: string): string {
  const p = parseAddress(addr);
  if (!p || p.kind !== 'unix') throw new ConfigError('invalid-value', `${addr} is not a unix: address`, { key: 'kvmi-listen' });
  return p.path;
}

export async function runHostAgent(argv: string[]): Promise<number> {
  const cfg = loadConfig(hostAgentSchema, argv, process.env, {
    command: 'periscope host-agent',
    summary: 'The per-host agent: terminates the KVMI sockets QEMU connects to and answers vCPU events from local rules.',
  });
  const v = cfg.values;
  const min = LEVELS[v['log-level']];
  const log = (level: keyof typeof LEVELS, msg: string, fields: Record<string, unknown> = {}): void => {
    if (LEVELS[level] < min) return;
    process.stderr.write(`${JSON.stringify({ ts: new Date().toISOString(), level, msg, ...fields }, (_k, x: unknown) => (typeof x === 'bigint' ? x.toString() : x))}\n`);
  };
  let policy: Policy;
  let cookies: CookieLookup;
  let kvmiPaths: string[];
  let apiPath: string | undefined;
  let metrics: { host: string; port: number } | undefined;
  try {
    kvmiPaths = v['kvmi-listen'].map(unixPath);
    policy = v.policy ? loadPolicyFile(v.policy) : loadDefaultPolicy();
    if (v['cookie-file']) cookies = loadCookieFile(v['cookie-file']);
    else {
      log('warn', 'no --cookie-file: answering the hash of an empty secret; only QEMUs started without a key will accept it');
      cookies = () => Buffer.alloc(0);
    }
    if (v['api-listen']) apiPath = unixPath(v['api-listen']);
    if (v['metrics-listen']) {
      const a = parseAddress(v['metrics-listen']);
      if (!a || a.kind !== 'tcp' || a.port === undefined) throw new ConfigError('invalid-value', `--metrics-listen must be HOST:PORT, got ${v['metrics-listen']}`, { key: 'metrics-listen' });
      metrics = { host: a.host, port: a.port };
    }
  } catch (e) {
    if (e instanceof ConfigError || e instanceof CookieFileError || e instanceof VerdictsError) {
      process.stderr.write(`periscope host-agent: ${e.message}\n`);
      return 2;
    }
    throw e;
  }
  if (v.analysis) log('info', 'analysis link not built yet (issue #7): running standalone on local rules', { analysis: v.analysis });
  if (v['heki-listen']) log('info', 'Heki sink not built yet (issue #11)', { heki: v['heki-listen'] });
  let agent: HostAgent;
  try {
    agent = new HostAgent({
    hostId: v['host-id'] ?? hostname(),
    kvmiPaths,
    cookies,
    policy,
    log,
    ...(v['socket-group'] !== undefined ? { socketGid: v['socket-group'] } : {}),
    ...(metrics ? { metricsListen: metrics } : {}),
    ...(apiPath ? { apiPath } : {}),
    });
  } catch (e) {
    if (e instanceof VerdictsError) {
      process.stderr.write(`periscope host-agent: the policy does not compile:\n${e.issues.map((i) => `  ${i.path}: ${i.message}`).join('\n')}\n`);
      return 2;
    }
    throw e;
  }
  try {
    await agent.start();
  } catch (e) {
    process.stderr.write(`periscope host-agent: ${(e as Error).message}\n`);
    return 1;
  }
  log('info', 'host agent running', { policy: policy.id, rules: policy.rules.length, sockets: kvmiPaths });
  return new Promise<number>((resolve) => {
    let stopping = false;
    const stop = (signal: string) => {
      if (stopping) {
        log('warn', `second ${signal}: exiting now`);
        resolve(130);
        return;
      }
      stopping = true;
      log('info', `${signal}: detaching every VM`);
      agent.stop(1000).then(
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
