/**
 * `periscope guest-agent`: the agent inside a host's introspection VM. Opens `/dev/kvmmem` (or the
 * simulator's model of it), detects its ABI, dials analysis (mTLS in fleet mode) and serves
 * GuestMemoryService work — map with tokens, read, hash, scan, unmap — until SIGTERM/SIGINT, when every
 * mapping is released.
 */
import { hostname } from 'node:os';

import { ConfigError, defineSchema, loadConfig, networkOptions, parseAddress } from '@periscope/config';
import { connectSimKvmmem, GuestAgent, GuestAgentError, KvmmemError, openKvmmemDevice, type KvmmemDevice } from '@periscope/guest-agent';

export const guestAgentSchema = defineSchema({
  options: {
    ...networkOptions,
    analysis: { kind: 'address', required: true, description: 'analysis service address to dial (host:port or unix:PATH)' },
    'host-id': { kind: 'string', description: "the host whose VMs this agent maps (default: this machine's hostname)" },
    'agent-id': { kind: 'string', description: 'stable id of this guest agent (default: guest-agent@<host-id>)' },
    device: { kind: 'path', description: 'the kvmmem device (default /dev/kvmmem unless --sim-kvmmem is given)' },
    'sim-kvmmem': { kind: 'path', description: "the simulator's /dev/kvmmem socket (periscope sim --kvmmem-listen PATH) instead of a device" },
    'max-mapped-pages': { kind: 'integer', min: 1, max: 268435456, default: 262144, description: 'quota: pages kept mapped at most over all VMs (262144 = 1 GiB)' },
    'map-retry-delay': { kind: 'duration', min: 0, default: '1s', description: 'wait before retrying a map the device answered EAGAIN/EBUSY (libkvmi: 1s, 30 attempts)' },
    'idle-session': { kind: 'duration', min: 1000, default: '10m', description: "close a VM's session (unmapping it) after this long without work" },
    'log-level': { kind: 'enum', values: ['debug', 'info', 'warn', 'error'], default: 'info', description: 'least severe log level written (JSON lines on stderr)' },
  },
});

const LEVELS = { debug: 10, info: 20, warn: 30, error: 40 } as const;

class ExitRequest {
  constructor(readonly code: number) {}
}

export interface GuestAgentIo {
  stdout(text: string): void;
  stderr(text: string): void;
}

const defaultIo: GuestAgentIo = {
  stdout: (t) => void process.stdout.write(t),
  stderr: (t) => void process.stderr.write(t),
};

/** Run `periscope guest-agent` with the arguments after the command name; resolves with the exit code. */
export async function runGuestAgent(argv: string[], io: GuestAgentIo = defaultIo): Promise<number> {
  let cfg;
  try {
    cfg = loadConfig(guestAgentSchema, argv, process.env, {
      command: 'periscope guest-agent',
      summary: "The introspection-VM agent: maps other VMs' pages with /dev/kvmmem (tokens from GET_MAP_TOKEN) and hashes/scans them for analysis.",
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
    io.stderr(`${JSON.stringify({ ts: new Date().toISOString(), level, msg, ...fields }, (_k, x: unknown) => (typeof x === 'bigint' ? x.toString() : x))}\n`);
  };
  let analysis: string;
  try {
    if (v.device !== undefined && v['sim-kvmmem'] !== undefined) {
      throw new ConfigError('conflicting-options', '--device and --sim-kvmmem are exclusive', { key: 'sim-kvmmem' });
    }
    const a = parseAddress(v.analysis);
    if (!a) throw new ConfigError('invalid-value', `--analysis: not an address: ${v.analysis}`, { key: 'analysis' });
    analysis = a.kind === 'unix' ? `unix:${a.path}` : v.analysis;
  } catch (e) {
    if (e instanceof ConfigError) {
      io.stderr(`periscope guest-agent: ${e.message}\n`);
      return 2;
    }
    throw e;
  }
  let device: KvmmemDevice;
  try {
    device = v['sim-kvmmem'] !== undefined ? await connectSimKvmmem(v['sim-kvmmem']) : openKvmmemDevice(v.device ?? '/dev/kvmmem');
  } catch (e) {
    if (e instanceof KvmmemError || e instanceof GuestAgentError) {
      io.stderr(`periscope guest-agent: cannot use ${v['sim-kvmmem'] ?? v.device ?? '/dev/kvmmem'}: ${e.message}\n`);
      return 1;
    }
    throw e;
  }
  const hostId = v['host-id'] ?? hostname();
  const agent = new GuestAgent({
    analysis,
    hostId,
    ...(v['agent-id'] !== undefined ? { agentId: v['agent-id'] } : {}),
    device,
    maxMappedPages: v['max-mapped-pages'],
    mapRetryDelayMs: v['map-retry-delay'],
    idleSessionMs: v['idle-session'],
    ...(cfg.tls ? { tls: cfg.tls } : {}),
    log,
  });
  agent.start();
  log('info', 'guest agent running', { analysis, hostId, device: device.description, abi: device.abi, maxMappedPages: v['max-mapped-pages'], fleetMode: cfg.fleetMode });
  return new Promise<number>((resolve) => {
    let stopping = false;
    const stop = (signal: string): void => {
      if (stopping) {
        resolve(130);
        return;
      }
      stopping = true;
      log('info', `${signal}: releasing every mapping`);
      agent.stop().then(
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
