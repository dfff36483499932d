/**
 * The guest agent's link to analysis: it dials out (`GuestMemoryService.Session`, mTLS in fleet mode),
 * sends `hello`, runs the `MemoryWork` that arrives and streams the results back. A lost stream is
 * redialled with jittered exponential backoff ("full jitter": a random delay in [0, min(cap, base·2^n)]),
 * reset once a stream has carried a message. The sessions of a vanished client are closed (everything
 * they mapped is unmapped) when its stream goes away.
 */
import { credentials as grpcCredentials, type ChannelCredentials, type ClientDuplexStream } from '@grpc/grpc-js';
import {
  GuestMemoryServiceClient,
  HashAlgorithm,
  KvmmemAbi,
  type MemoryWorkResult,
  type SessionRequest,
  type SessionResponse,
} from '@periscope/contracts';

import type { KvmmemDevice } from './device.js';
import { GuestMemoryWorker, type WorkerOptions } from './worker.js';

export const GUEST_AGENT_VERSION = '0.1.0';

export interface GuestAgentTls {
  ca: Buffer;
  cert: Buffer;
  key: Buffer;
}

export interface GuestAgentOptions extends Omit<WorkerOptions, 'device'> {
  /** Analysis address as grpc-js dials it: `host:port` or `unix:/path`. */
  analysis: string;
  hostId: string;
  /** Default: `guest-agent@<hostId>`. */
  agentId?: string;
  device: KvmmemDevice;
  /** mTLS material (fleet mode); absent = plaintext (the config rule allows it only on local addresses). */
  tls?: GuestAgentTls;
  /** Work items run concurrently (reported in hello). Default 4. */
  maxInFlight?: number;
  /** Reconnect backoff: first ceiling and cap, ms. Defaults 250 / 10000. */
  reconnectBaseMs?: number;
  reconnectMaxMs?: number;
  /** Keepalive period, ms. Default 15000. */
  keepaliveMs?: number;
}

export interface GuestAgentStats {
  connects: number;
  disconnects: number;
  workItems: number;
  connected: boolean;
}

export class GuestAgent {
  readonly worker: GuestMemoryWorker;
  private readonly client: GuestMemoryServiceClient;
  private call: ClientDuplexStream<SessionRequest, SessionResponse> | undefined;
  private stopped = false;
  private attempt = 0;
  private timer: NodeJS.Timeout | undefined;
  private keepalive: NodeJS.Timeout | undefined;
  private seq = 0n;
  private acked = 0n;
  private readonly stats_ = { connects: 0, disconnects: 0, workItems: 0 };
  private readonly waiters: Array<() => void> = [];

  constructor(private readonly opts: GuestAgentOptions) {
    this.worker = new GuestMemoryWorker({ ...opts, device: opts.device });
    const creds: ChannelCredentials = opts.tls
      ? grpcCredentials.createSsl(opts.tls.ca, opts.tls.key, opts.tls.cert)
      : grpcCredentials.createInsecure();
    this.client = new GuestMemoryServiceClient(opts.analysis, creds, {
      'grpc.keepalive_time_ms': 30_000,
      'grpc.keepalive_timeout_ms': 10_000,
      'grpc.initial_reconnect_backoff_ms': opts.reconnectBaseMs ?? 250,
      'grpc.max_reconnect_backoff_ms': opts.reconnectMaxMs ?? 10_000,
    });
  }

  stats(): GuestAgentStats {
    return { ...this.stats_, connected: this.call !== undefined };
  }

  start(): void {
    this.dial();
  }

  /** Resolves once a stream is open and hello is sent. */
  connected(): Promise<void> {
    if (this.call) return Promise.resolve();
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  async stop(): Promise<void> {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    if (this.keepalive) clearInterval(this.keepalive);
    this.call?.end();
    this.call?.cancel();
    this.call = undefined;
    await this.worker.stop();
    this.client.close();
  }

  private log(level: 'debug' | 'info' | 'warn' | 'error', msg: string, fields?: Record<string, unknown>): void {
    this.opts.log?.(level, msg, fields);
  }

  private send(call: ClientDuplexStream<SessionRequest, SessionResponse>, message: SessionRequest['message']): void {
    if (this.call !== call) return;
    call.write({ streamSeq: ++this.seq, message });
  }

  private dial(): void {
    if (this.stopped) return;
    this.seq = 0n;
    this.acked = 0n;
    const call = this.client.session();
    this.call = call;
    let carried = false;
    let ended = false;
    const abi = this.opts.device.abi === 1 ? KvmmemAbi.KVMMEM_ABI_V1 : KvmmemAbi.KVMMEM_ABI_V2;
    this.send(call, {
      $case: 'hello',
      value: {
        agentId: this.opts.agentId ?? `guest-agent@${this.opts.hostId}`,
        agentVersion: GUEST_AGENT_VERSION,
        abi,
        maxInFlight: this.opts.maxInFlight ?? 4,
        hashAlgorithms: [HashAlgorithm.HASH_ALGORITHM_SHA256],
        hostId: this.opts.hostId,
        maxMappedPages: BigInt(this.opts.maxMappedPages),
        simulated: this.opts.device.simulated,
      },
    });
    call.on('metadata', () => {
      if (!carried) {
        carried = true;
        this.onConnected();
      }
    });
    call.on('data', (msg: SessionResponse) => {
      if (!carried) {
        carried = true;
        this.onConnected();
      }
      this.acked = msg.streamSeq;
      const m = msg.message;
      if (!m) return;
      if (m.$case === 'work') {
        this.stats_.workItems++;
        void this.worker.run(m.value, (r: MemoryWorkResult) => this.send(call, { $case: 'result', value: r }));
      } else if (m.$case === 'cancel') {
        this.worker.cancel(m.value.workId);
      }
    });
    const onEnd = (why: string): void => {
      if (ended) return;
      ended = true;
      if (this.call === call) this.call = undefined;
      if (this.keepalive) clearInterval(this.keepalive);
      this.stats_.disconnects++;
      // The client vanished: its sessions go, and with them every mapping.
      void this.worker.closeAll();
      if (this.stopped) return;
      if (carried) this.attempt = 0;
      const ceiling = Math.min(this.opts.reconnectMaxMs ?? 10_000, (this.opts.reconnectBaseMs ?? 250) * 2 ** this.attempt);
      this.attempt = Math.min(this.attempt + 1, 30);
      const delay = Math.floor(Math.random() * ceiling);
      this.log(carried ? 'warn' : 'debug', 'analysis stream lost; redialling', { why, delayMs: delay });
      this.timer = setTimeout(() => this.dial(), delay);
    };
    call.on('error', (e: Error) => onEnd(e.message));
    call.on('end', () => onEnd('stream ended'));
    call.on('close', () => onEnd('stream closed'));
  }

  private onConnected(): void {
    this.stats_.connects++;
    this.log('info', 'connected to analysis', { analysis: this.opts.analysis });
    const call = this.call;
    if (this.keepalive) clearInterval(this.keepalive);
    this.keepalive = setInterval(() => {
      if (call) this.send(call, { $case: 'keepalive', value: { sentUnixNs: BigInt(Date.now()) * 1_000_000n, ackedStreamSeq: this.acked } });
    }, this.opts.keepaliveMs ?? 15_000);
    this.keepalive.unref();
    for (const w of this.waiters.splice(0)) w();
  }
}
