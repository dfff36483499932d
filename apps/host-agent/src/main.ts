/**
 * `periscope host-agent`: the per-host daemon. Parses configuration (flags > PERISCOPE_* env >
 * --config JSON > defaults), loads the local policy, starts the agent, and on SIGTERM/SIGINT detaches
 * every VM (guest restored) before exiting.
 */
import { hostname } from 'node:os';
import { ConfigError, defineSchema, loadConfig, networkOptions, parseAddress } from '@periscope/config';
import { ALLOW_COMMAND_KEYS, CookieFileError, HostAgent, loadCookieFile, type CookieLookup, type LinkConfig } from '@periscope/host-agent';
import { loadDefaultPolicy, loadPolicyFile, VerdictsError, type Policy } from '@periscope/verdicts';

export const hostAgentSchema = defineSchema({
  options: {
    ...networkOptions,
    'kvmi-listen': { kind: 'list', items: 'address', description: 'Unix socket(s) QEMU connects to (unix:PATH); repeat for several', required: true },
    analysis: {
      kind: 'list',
      items: 'address',
      description:
        'analysis service HOST:PORT: the agent dials out and keeps one gRPC stream (mTLS with --tls-*); several replicas: comma-separated or repeated, tried in order, the next one on every reconnect (a dead replica\'s agents move to the others); without it the agent runs standalone on its local rules',
    },
    'state-dir': { kind: 'path', description: 'directory for state that must survive restarts: the detection spool (spool/), VMs paused by analysis (paused.json), the bytes analysis wrote into guests (planted.json: breakpoint INT3s, restored at re-attach after a kill -9) and the last KVMI session generation per VM (session-generations.json: generations keep increasing across restarts even if the clock steps back); without it all are kept in memory only (generations then rely on the wall clock)' },
    'allow-command': {
      kind: 'list',
      description: `let analysis run a dangerous operation on this host (repeat, or comma-separated): ${ALLOW_COMMAND_KEYS.join(', ')}; refused (REFUSED_BY_AGENT_POLICY) by default. Also gates the local policy analysis pushes: one with an inject action (a module's inject response) needs inject-exception, one with a crash action needs crash, one with a rewrite action (and a central verdict choosing a CR/MSR value) needs set-registers, else the whole install is rejected naming the key and the previous policy stays active (the --policy file is trusted)`,
      validate: (xs: string[]) => {
        const bad = xs.filter((x) => !(ALLOW_COMMAND_KEYS as readonly string[]).includes(x));
        return bad.length > 0 ? `unknown command key(s) ${bad.join(', ')}; known: ${ALLOW_COMMAND_KEYS.join(', ')}` : undefined;
      },
    },
    'report-queue-size': { kind: 'integer', min: 16, max: 16777216, default: 65536, description: 'bound of the report queue (records); beyond it reports are dropped, counted and a loss record goes up' },
    'report-batch': { kind: 'integer', min: 1, max: 65536, default: 512, description: 'most records per EventBatch/VerdictBatch message' },
    'spool-max-bytes': { kind: 'integer', min: 4096, max: 68719476736, default: 67108864, description: 'bound of the detection spool in bytes; a detection that does not fit is dropped, counted and reported in a loss record' },
    'detection-rate': { kind: 'integer', min: 0, max: 1000000, default: 1000, description: 'detections raised per VM and second at most (a burst of one second\'s worth); beyond it they are counted, not raised, and reported in a loss record (RATE_LIMITED), so a guest storming a denied write cannot stall the other VMs\' replies; 0 = unlimited' },
    'detection-rate-host': { kind: 'integer', min: 0, max: 1000000, default: 2000, description: 'the same over all VMs of this host together (several VMs storming at once); every VM keeps 10 a second of its own outside it, so one VM cannot silence another\'s detections; 0 = unlimited' },
    'link-backoff-max': { kind: 'duration', min: '100ms', max: '5m', default: '10s', description: 'longest wait between reconnect attempts (jittered exponential backoff from 100ms)' },
    'max-held-events': { kind: 'integer', min: 1, max: 1000000, default: 1024, description: 'events held for central verdicts at once, unless the policy says (beyond it: the default at once)' },
    'host-id': { kind: 'string', description: 'this host\'s id in the fleet (default: the hostname)' },
    'cookie-file': { kind: 'path', description: 'shared secret QEMU checks (raw bytes), or a JSON map {"<vm uuid>": "secret", "*": "default"}' },
    policy: { kind: 'path', description: 'local policy file (periscope.verdicts/v1 JSON); default: the shipped default policy' },
    'socket-group': { kind: 'integer', min: 0, max: 2147483647, description: 'numeric gid for the KVMI socket files (mode 0660): QEMU\'s group' },
    'heki-listen': { kind: 'address', description: 'Unix socket (unix:PATH) for the VMMs\' Heki sink: RegisterVm, configure and denial exits (docs/heki.md)' },
    'heki-denial': { kind: 'enum', values: ['reenter', 'stop'], default: 'reenter', description: 'how a Heki denial is completed: reenter (KVM injects #GP(0)) or stop (the VMM stops the VM)' },
    'api-listen': { kind: 'address', description: 'local API for the CLI (unix:PATH)' },
    'metrics-listen': { kind: 'address', description: 'HOST:PORT for Prometheus /metrics and /healthz' },
    'health-listen': { kind: 'address', description: 'HOST:PORT for grpc.health.v1 (plaintext, health only; for kubelet gRPC probes)' },
    'log-level': { kind: 'enum', values: ['debug', 'info', 'warn', 'error'], default: 'info', description: 'least severe log level written (JSON lines on stderr)' },
  },
});

const LEVELS = { debug: 10, info: 20, warn: 30, error: 40 } as const;

function unixPath(addr: string): string {
  const p = parseAddress(addr);
  if (!p || p.kind !== 'unix') throw new ConfigError('invalid-value', `${addr} is not a unix: address`, { key: 'kvmi-listen' });
  return p.path;
}

/** `--analysis A,B` = `--analysis A --analysis B` (the env form PERISCOPE_ANALYSIS=A,B is split by the config library). */
export function splitAnalysisFlag(argv: readonly string[]): string[] {
  const out: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    const inline = /^--analysis=(.*)$/.exec(arg);
    const value = inline ? inline[1]! : arg === '--analysis' && i + 1 < argv.length && !argv[i + 1]!.startsWith('--') ? argv[++i]! : undefined;
    if (value === undefined || !value.includes(',')) {
      out.push(...(inline || value === undefined ? [arg] : [arg, value]));
      continue;
    }
    for (const item of value.split(',').map((x) => x.trim()).filter((x) => x !== '')) out.push('--analysis', item);
  }
  return out;
}

export async function runHostAgent(argv: string[]): Promise<number> {
  const cfg = loadConfig(hostAgentSchema, splitAnalysisFlag(argv), process.env, {
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
  let hekiListen: string | undefined;
  let health: { host: string; port: number } | undefined;
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
    if (v['heki-listen']) hekiListen = unixPath(v['heki-listen']);
    if (v['metrics-listen']) {
      const a = parseAddress(v['metrics-listen']);
      if (!a || a.kind !== 'tcp' || a.port === undefined) throw new ConfigError('invalid-value', `--metrics-listen must be HOST:PORT, got ${v['metrics-listen']}`, { key: 'metrics-listen' });
      metrics = { host: a.host, port: a.port };
    }
    if (v['health-listen']) {
      const a = parseAddress(v['health-listen']);
      if (!a || a.kind !== 'tcp' || a.port === undefined) throw new ConfigError('invalid-value', `--health-listen must be HOST:PORT, got ${v['health-listen']}`, { key: 'health-listen' });
      health = { host: a.host, port: a.port };
    }
  } catch (e) {
    if (e instanceof ConfigError || e instanceof CookieFileError || e instanceof VerdictsError) {
      process.stderr.write(`periscope host-agent: ${e.message}\n`);
      return 2;
    }
    throw e;
  }
  let link: LinkConfig | undefined;
  if (v.analysis.length > 0) {
    link = {
      address: v.analysis.join(','),
      ...(cfg.tls ? { tls: { ca: cfg.tls.ca, cert: cfg.tls.cert, key: cfg.tls.key } } : {}),
      allowCommands: v['allow-command'],
      reportQueueSize: v['report-queue-size'],
      batchMax: v['report-batch'],
      spoolMaxBytes: v['spool-max-bytes'],
      detectionRatePerVm: v['detection-rate'],
      detectionRatePerHost: v['detection-rate-host'],
      maxHeldEvents: v['max-held-events'],
      backoff: { maxMs: v['link-backoff-max'] },
    };
    if (!v['state-dir']) log('warn', 'no --state-dir: spooled detections, analysis pauses and planted breakpoint bytes are kept in memory only (lost on restart); session generations rely on the wall clock');
    log('info', 'analysis link configured', { analysis: v.analysis, fleetMode: cfg.fleetMode, allowCommands: v['allow-command'] });
  } else if (v['allow-command'].length > 0) {
    log('warn', '--allow-command without --analysis has no effect');
  }
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
    ...(health ? { healthListen: health } : {}),
    ...(apiPath ? { apiPath } : {}),
    ...(link ? { link } : {}),
    ...(v['state-dir'] ? { stateDir: v['state-dir'] } : {}),
    ...(hekiListen ? { hekiListen, hekiPolicy: { denial: v['heki-denial'] } } : {}),
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
