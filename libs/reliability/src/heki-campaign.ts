/**
 * Fuzz campaign against the host agent's Heki sink (`--heki-listen`, HekiSinkService over gRPC on a
 * Unix socket), with the agent as a real process.
 *
 * Requests are sent with raw serializers so that any bytes can be the request message: valid messages
 * with hostile field values (UUIDs of every length, unknown reason enums, all-ones bit masks, huge vCPU
 * indexes, unregistered VMs), the same messages with their encoding mutated (bit flips, truncation,
 * extension), and raw garbage. Every call must complete — OK or a gRPC error status — within a deadline;
 * undecodable bytes may only fail as INTERNAL (grpc-js's own parse error) or INVALID_ARGUMENT. A healthy
 * VM registers and pins through the same sink every 100 calls and must always succeed.
 */
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { credentials, makeGenericClientConstructor, Metadata, status, type ServiceError } from '@grpc/grpc-js';
import { RegisterVmRequest, ReportConfigureExitRequest, ReportDenialExitRequest } from '@periscope/contracts';
import { AgentProcess } from './agent-process.js';
import { garbage, mulberry32, type Prng } from './mutate.js';

const METHODS = {
  register: '/periscope.v1.HekiSinkService/RegisterVm',
  configure: '/periscope.v1.HekiSinkService/ReportConfigureExit',
  denial: '/periscope.v1.HekiSinkService/ReportDenialExit',
} as const;
type Method = keyof typeof METHODS;

const identity = (b: Buffer): Buffer => b;
const RawClient = makeGenericClientConstructor(
  Object.fromEntries(
    Object.entries(METHODS).map(([k, path]) => [
      k,
      { path, requestStream: false, responseStream: false, requestSerialize: identity, requestDeserialize: identity, responseSerialize: identity, responseDeserialize: identity },
    ]),
  ),
  'RawHekiSink',
);

export interface HekiCampaignOptions {
  readonly repoRoot: string;
  /** Fuzz an already running sink (e.g. in this process, to measure its heap) instead of an agent process. */
  readonly sinkPath?: string;
  readonly requests: number;
  readonly seed?: number;
  readonly onProgress?: (done: number) => void;
}

export interface HekiCampaignReport {
  readonly requests: number;
  readonly seconds: number;
  /** Outcomes by gRPC status name. */
  readonly byStatus: Record<string, number>;
  readonly healthyChecks: number;
  readonly agentSurvived: boolean;
  readonly rssStartMiB: number;
  readonly rssEndMiB: number;
  readonly failures: readonly string[];
}

function int(prng: Prng, n: number): number {
  return Math.floor(prng() * n);
}

function hostileU64(prng: Prng): bigint {
  const picks = [0n, 1n, 0xffffffffffffffffn, 0x8000000000000000n, 1n << 16n, 1n << 20n, 0x300000n];
  return prng() < 0.5 ? picks[int(prng, picks.length)]! : BigInt(int(prng, 2 ** 32)) * BigInt(int(prng, 2 ** 32));
}

function hostileUuid(prng: Prng, known: Buffer[]): Buffer {
  if (known.length && prng() < 0.5) return known[int(prng, known.length)]!;
  const len = prng() < 0.7 ? 16 : int(prng, 33);
  const b = Buffer.alloc(len);
  for (let i = 0; i < len; i++) b[i] = int(prng, 256);
  return b;
}

/** A request of a random method: valid-shaped with hostile values, mutated encoding, or garbage. */
function makeRequest(prng: Prng, known: Buffer[]): { method: Method; bytes: Buffer; kind: 'shaped' | 'mutated' | 'garbage' } {
  const method = (['register', 'configure', 'denial'] as const)[int(prng, 3)]!;
  const reason = prng() < 0.8 ? 1 + int(prng, 2) : int(prng, 2 ** 31);
  const uuid = hostileUuid(prng, known);
  let bytes: Buffer;
  if (method === 'register') {
    bytes = Buffer.from(
      RegisterVmRequest.encode({
        vmUuid: uuid,
        vmName: prng() < 0.9 ? `fz-${int(prng, 100)}` : 'x'.repeat(int(prng, 5000)),
        hostHasHeki: prng() < 0.8,
        configureReasons: Array.from({ length: int(prng, 4) }, () => (prng() < 0.8 ? 1 + int(prng, 2) : int(prng, 100))),
        denialReasons: Array.from({ length: int(prng, 4) }, () => (prng() < 0.8 ? 1 + int(prng, 2) : int(prng, 100))),
        qemuStartTimeMs: BigInt(int(prng, 2 ** 31)) * (prng() < 0.5 ? -1n : 1n),
      }).finish(),
    );
  } else if (method === 'configure') {
    bytes = Buffer.from(ReportConfigureExitRequest.encode({ vmUuid: uuid, vcpu: prng() < 0.8 ? int(prng, 8) : int(prng, 2 ** 32), reason, crPinned: hostileU64(prng), rip: hostileU64(prng), exitUnixNs: hostileU64(prng) }).finish());
  } else {
    bytes = Buffer.from(ReportDenialExitRequest.encode({ vmUuid: uuid, vcpu: prng() < 0.8 ? int(prng, 8) : int(prng, 2 ** 32), reason, attemptedValue: hostileU64(prng), rip: hostileU64(prng), exitUnixNs: hostileU64(prng) }).finish());
  }
  const r = prng();
  if (r < 0.6) return { method, bytes, kind: 'shaped' };
  if (r < 0.9) {
    const out = Buffer.from(bytes);
    if (out.length && prng() < 0.5) for (let i = 0; i < 1 + int(prng, 4); i++) {
      const at = int(prng, out.length);
      out[at] = out[at]! ^ (1 << int(prng, 8));
    }
    else return { method, bytes: Buffer.concat([out.subarray(0, int(prng, out.length + 1)), garbage(prng).subarray(0, int(prng, 16))]), kind: 'mutated' };
    return { method, bytes: out, kind: 'mutated' };
  }
  return { method, bytes: garbage(prng), kind: 'garbage' };
}

export async function runHekiCampaign(opts: HekiCampaignOptions): Promise<HekiCampaignReport> {
  const dir = mkdtempSync(join(tmpdir(), 'hfz-'));
  const hekiSock = opts.sinkPath ?? join(dir, 'heki.sock');
  writeFileSync(join(dir, 'cookie'), 'heki-fuzz');
  const agent = new AgentProcess({ repoRoot: opts.repoRoot, kvmiSocket: join(dir, 'kvmi.sock'), cookieFile: join(dir, 'cookie'), hostId: 'heki-fuzz', extraArgs: ['--heki-listen', `unix:${hekiSock}`] });
  const failures: string[] = [];
  const byStatus: Record<string, number> = {};
  const prng = mulberry32(opts.seed ?? 1);
  const known: Buffer[] = [];
  let healthyChecks = 0;
  let rssStart = 0;
  const t0 = Date.now();
  let client: InstanceType<typeof RawClient> | null = null;
  const call = (method: Method, bytes: Buffer): Promise<{ code: number; body?: Buffer }> =>
    new Promise((resolve) => {
      const fn = client![method] as unknown as (req: Buffer, md: Metadata, o: { deadline: number }, cb: (e: ServiceError | null, res?: Buffer) => void) => void;
      fn.call(client, bytes, new Metadata(), { deadline: Date.now() + 5000 }, (err, res) => resolve(err ? { code: err.code } : { code: status.OK, ...(res ? { body: res } : {}) }));
    });
  try {
    if (!opts.sinkPath) await agent.start();
    for (let i = 0; i < 200 && !existsSync(hekiSock); i++) await new Promise((r) => setTimeout(r, 10));
    client = new RawClient(`unix:${hekiSock}`, credentials.createInsecure());
    const healthyUuid = Buffer.from('5eed5eed5eed5eed5eed5eed5eed5eed', 'hex');
    for (let i = 0; i < opts.requests; i++) {
      if (i % 100 === 0) {
        healthyChecks++;
        const reg = await call('register', Buffer.from(RegisterVmRequest.encode({ vmUuid: healthyUuid, vmName: 'healthy', hostHasHeki: true, configureReasons: [1, 2], denialReasons: [1, 2], qemuStartTimeMs: 1n }).finish()));
        const cfg = await call('configure', Buffer.from(ReportConfigureExitRequest.encode({ vmUuid: healthyUuid, vcpu: 0, reason: 1, crPinned: 1n << 16n, rip: 0xffffffff81000000n, exitUnixNs: 1n }).finish()));
        if (reg.code !== status.OK || cfg.code !== status.OK) failures.push(`healthy VM refused at request ${i}: register ${status[reg.code]}, configure ${status[cfg.code]}`);
        if (i === 200) rssStart = agent.rssMiB();
        opts.onProgress?.(i);
        if (!opts.sinkPath && agent.exited) {
          failures.push(`host agent exited (${agent.exitCode}): ${agent.stderrTail}`);
          break;
        }
      }
      const req = makeRequest(prng, known);
      const res = await call(req.method, req.bytes);
      const name = status[res.code] ?? String(res.code);
      byStatus[name] = (byStatus[name] ?? 0) + 1;
      if (res.code === status.DEADLINE_EXCEEDED || res.code === status.UNAVAILABLE) failures.push(`request ${i} (${req.kind} ${req.method}) not answered: ${name}`);
      else if (req.kind === 'shaped' && res.code === status.INTERNAL) failures.push(`request ${i}: a decodable ${req.method} failed as INTERNAL (should be a typed error)`);
      if (req.method === 'register' && res.code === status.OK && req.kind === 'shaped') {
        const uuid = RegisterVmRequest.decode(req.bytes).vmUuid;
        if (uuid.length === 16 && known.length < 32) known.push(Buffer.from(uuid));
      }
      if (failures.length > 20) break;
    }
  } catch (e) {
    failures.push((e as Error).message);
  } finally {
    client?.close();
  }
  const rssEnd = opts.sinkPath ? 0 : agent.rssMiB();
  const code = opts.sinkPath ? 0 : await agent.terminate(5000);
  const survived = code === 0;
  if (!survived) failures.push(`host agent did not exit cleanly on SIGTERM (${code}): ${agent.stderrTail}`);
  rmSync(dir, { recursive: true, force: true });
  return { requests: opts.requests, seconds: (Date.now() - t0) / 1000, byStatus, healthyChecks, agentSurvived: survived, rssStartMiB: rssStart, rssEndMiB: rssEnd, failures };
}
