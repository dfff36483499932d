/**
 * The agent's end of `AgentLinkService.Link`: it dials out, keeps ONE bidirectional stream open, and
 * reconnects with jittered exponential backoff. In fleet mode the channel is mutual TLS (the agent's
 * certificate, the analysis certificate checked against `--tls-ca`).
 *
 * Requests are written as pre-encoded `LinkRequest` bytes (the report queue hand-encodes its batches),
 * so the method's request serializer is the identity; responses are decoded with the generated code.
 *
 * States: connecting (waiting for the channel) → up (stream open, hello written) → backoff → … A stream
 * counts as up once the channel is READY and the call is started; the call failing (server gone, a TLS
 * refusal, keepalive timeout) takes it down at once, so ask-central never waits on a dead stream.
 *
 * Several analysis replicas: `address` may list several `host:port`s (comma-separated). Each connect attempt
 * uses a fresh channel to one address, and every reconnect moves to the next one, so when a replica dies its
 * agents land on the others; the backoff grows per round over the whole list, not per address. A connect
 * attempt fails as soon as the channel reports TRANSIENT_FAILURE (refused, TLS refused) or at its deadline.
 *
 * Stopping never waits on the network: no grpc-js timer of ours outlives `stop()` (grpc-js's own
 * `waitForReady` deadline timer survives `close()` and kept a SIGTERMed agent alive for ~10 s when analysis
 * had never been reachable), so an agent exits at once whatever the link state.
 */
import { Client, credentials, Metadata, connectivityState, type ClientDuplexStream } from '@grpc/grpc-js';
import { LinkRequest, LinkResponse } from '@periscope/contracts';
import type { BatchSink } from './outbound-queue.js';

export const LINK_METHOD = '/periscope.v1.AgentLinkService/Link';

export interface LinkTls {
  ca: Buffer;
  cert: Buffer;
  key: Buffer;
}

export interface BackoffOptions {
  initialMs: number;
  maxMs: number;
  multiplier: number;
  /** Fraction of the delay that is random: delay × (1 − jitter × U[0,1)). */
  jitter: number;
}

export const DEFAULT_BACKOFF: BackoffOptions = { initialMs: 100, maxMs: 10_000, multiplier: 2, jitter: 0.5 };

export interface AgentLinkClientOptions {
  /** `host:port` of the analysis service, or several comma-separated (replicas: the next one on every reconnect). */
  address: string;
  tls?: LinkTls;
  backoff?: Partial<BackoffOptions>;
  /** HTTP/2 keepalive ping interval (default 10 s) and timeout (default 5 s). */
  keepaliveMs?: number;
  keepaliveTimeoutMs?: number;
  /** Application Keepalive message interval (default 5 s). */
  appKeepaliveMs?: number;
  log: (level: 'info' | 'warn' | 'error', msg: string, fields?: Record<string, unknown>) => void;
  /** The hello for a new stream (first message). */
  hello(): LinkRequest['message'];
  /** The stream is up: send the inventory, spooled detections, queued reports. */
  onUp(): void;
  /** The stream went down. */
  onDown(reason: string): void;
  /** The stream accepts writes again. */
  onDrain(): void;
  onResponse(msg: LinkResponse): void;
}

export type LinkState = 'idle' | 'connecting' | 'up' | 'backoff' | 'stopped';
export const LINK_STATE_VALUE: Record<LinkState, number> = { idle: 0, connecting: 1, up: 2, backoff: 3, stopped: 4 };

/** `host:port[,host:port…]` → the addresses, in order (blank items dropped). */
export function parseAnalysisAddresses(list: string): string[] {
  return list.split(',').map((s) => s.trim()).filter((s) => s !== '');
}

export class AgentLinkClient implements BatchSink {
  state: LinkState = 'idle';
  /** The analysis addresses, in the order they are tried. */
  readonly addresses: readonly string[];
  private current = 0;
  private readyTimer: NodeJS.Timeout | undefined;
  private client: Client | undefined;
  private call: ClientDuplexStream<Buffer, LinkResponse> | undefined;
  private streamSeq = 0;
  private receivedSeq = 0n;
  private pushedBack = false;
  private attempt = 0;
  private timer: NodeJS.Timeout | undefined;
  private keepaliveTimer: NodeJS.Timeout | undefined;
  private readonly backoff: BackoffOptions;
  readonly stats = { connects: 0, disconnects: 0, attempts: 0, messagesOut: 0, bytesOut: 0, messagesIn: 0, lastError: '' };

  constructor(private readonly opts: AgentLinkClientOptions) {
    this.backoff = { ...DEFAULT_BACKOFF, ...opts.backoff };
    this.addresses = parseAnalysisAddresses(opts.address);
    if (this.addresses.length === 0) throw new Error(`no analysis address in ${JSON.stringify(opts.address)}`);
  }

  /** The address in use (or tried next). */
  get address(): string {
    return this.addresses[this.current]!;
  }

  get up(): boolean {
    return this.state === 'up';
  }

  get writable(): boolean {
    return this.state === 'up' && !this.pushedBack;
  }

  seq(): number {
    return ++this.streamSeq;
  }

  start(): void {
    if (this.state !== 'idle') return;
    this.connect();
  }

  /** A fresh channel to one address (its own subchannel: no state left over from an earlier attempt). */
  private newClient(address: string): Client {
    const creds = this.opts.tls
      ? credentials.createSsl(this.opts.tls.ca, this.opts.tls.key, this.opts.tls.cert)
      : credentials.createInsecure();
    return new Client(address, creds, {
      'grpc.use_local_subchannel_pool': 1,
      'grpc.keepalive_time_ms': this.opts.keepaliveMs ?? 10_000,
      'grpc.keepalive_timeout_ms': this.opts.keepaliveTimeoutMs ?? 5_000,
      'grpc.keepalive_permit_without_calls': 1,
      'grpc.initial_reconnect_backoff_ms': this.backoff.initialMs,
      'grpc.min_reconnect_backoff_ms': this.backoff.initialMs,
      'grpc.max_reconnect_backoff_ms': this.backoff.maxMs,
      'grpc.enable_retries': 0,
      'grpc.max_send_message_length': 16 * 1024 * 1024,
      'grpc.max_receive_message_length': 16 * 1024 * 1024,
    });
  }

  stop(): void {
    this.state = 'stopped';
    if (this.timer) clearTimeout(this.timer);
    if (this.readyTimer) clearTimeout(this.readyTimer);
    this.readyTimer = undefined;
    if (this.keepaliveTimer) clearInterval(this.keepaliveTimer);
    const call = this.call;
    this.call = undefined;
    if (call) {
      call.end();
      call.cancel();
    }
    this.client?.close();
  }

  /** Write one encoded LinkRequest; false = the stream pushes back (wait for onDrain). */
  write(encoded: Buffer): boolean {
    const call = this.call;
    if (!call || this.state !== 'up') return false;
    this.stats.messagesOut++;
    this.stats.bytesOut += encoded.length;
    const ok = call.write(encoded);
    if (!ok) this.pushedBack = true;
    return ok;
  }

  /** Encode and write a message with the next stream_seq. */
  send(message: LinkRequest['message']): boolean {
    if (this.state !== 'up') return false;
    return this.write(Buffer.from(LinkRequest.encode({ streamSeq: BigInt(this.seq()), message }).finish()));
  }

  private connect(): void {
    if (this.state === 'stopped') return;
    this.state = 'connecting';
    this.stats.attempts++;
    const address = this.address;
    this.client?.close();
    const client = this.newClient(address);
    this.client = client;
    this.awaitReady(client, Math.max(1000, this.backoff.maxMs), (err) => {
      if (this.state !== 'connecting' || this.client !== client) return;
      if (err !== undefined) return this.failed(`analysis ${address} unreachable: ${err}`);
      this.startCall();
    });
  }

  /**
   * Wait for the channel to be READY (`done()`), fail on TRANSIENT_FAILURE / SHUTDOWN or after `deadlineMs`
   * (`done(reason)`). Watches without a grpc-js deadline (no timer of grpc-js's outlives the channel); the only
   * timer is ours, cleared by `stop()`.
   */
  private awaitReady(client: Client, deadlineMs: number, done: (err?: string) => void): void {
    const ch = client.getChannel();
    let settled = false;
    const finish = (err?: string): void => {
      if (settled) return;
      settled = true;
      if (this.readyTimer) clearTimeout(this.readyTimer);
      this.readyTimer = undefined;
      done(err);
    };
    if (this.readyTimer) clearTimeout(this.readyTimer);
    this.readyTimer = setTimeout(() => finish(`no connection within ${deadlineMs} ms`), deadlineMs);
    const check = (): void => {
      if (settled) return;
      let st: connectivityState;
      try {
        st = ch.getConnectivityState(true); // also kicks an IDLE channel into connecting
      } catch {
        return finish('channel closed');
      }
      if (st === connectivityState.READY) return finish();
      if (st === connectivityState.TRANSIENT_FAILURE) return finish('connection failed (refused, unreachable or TLS refused)');
      if (st === connectivityState.SHUTDOWN) return finish('channel closed');
      try {
        ch.watchConnectivityState(st, Infinity, check);
      } catch {
        finish('channel closed');
      }
    };
    check();
  }

  private startCall(): void {
    const client = this.client!;
    const call = client.makeBidiStreamRequest(
      LINK_METHOD,
      (b: Buffer) => b,
      (b: Buffer) => LinkResponse.decode(b),
      new Metadata(),
      {},
    );
    this.call = call;
    this.streamSeq = 0;
    this.receivedSeq = 0n;
    this.pushedBack = false;
    call.on('data', (r: LinkResponse) => {
      if (this.call !== call) return;
      this.stats.messagesIn++;
      if (r.streamSeq > this.receivedSeq) this.receivedSeq = r.streamSeq;
      try {
        this.opts.onResponse(r);
      } catch (e) {
        this.opts.log('error', `handling a message from analysis failed: ${(e as Error).message}`);
      }
    });
    call.on('drain', () => {
      if (this.call !== call) return;
      this.pushedBack = false;
      this.opts.onDrain();
    });
    call.on('error', (e: Error) => this.ended(call, e.message));
    call.on('end', () => this.ended(call, 'analysis ended the stream'));
    call.on('status', (s: { code: number; details: string }) => {
      if (s.code !== 0) this.ended(call, `status ${s.code}: ${s.details}`);
    });
    this.state = 'up';
    this.attempt = 0;
    this.stats.connects++;
    this.opts.log('info', 'analysis link up', { analysis: this.address, tls: this.opts.tls !== undefined });
    this.send(this.opts.hello());
    this.opts.onUp();
    const every = this.opts.appKeepaliveMs ?? 5000;
    if (this.keepaliveTimer) clearInterval(this.keepaliveTimer);
    this.keepaliveTimer = setInterval(() => {
      if (this.call !== call || this.state !== 'up') return;
      const now = BigInt(Date.now()) * 1_000_000n;
      this.send({ $case: 'keepalive', value: { sentUnixNs: now, ackedStreamSeq: this.receivedSeq } });
    }, every);
    this.keepaliveTimer.unref();
  }

  private ended(call: ClientDuplexStream<Buffer, LinkResponse>, reason: string): void {
    if (this.call !== call) return;
    this.call = undefined;
    if (this.keepaliveTimer) clearInterval(this.keepaliveTimer);
    call.removeAllListeners('data');
    call.on('error', () => undefined);
    call.cancel();
    if (this.state === 'stopped') return;
    this.stats.disconnects++;
    this.failed(reason);
  }

  private failed(reason: string): void {
    if (this.state === 'stopped') return;
    const wasUp = this.state === 'up';
    this.stats.lastError = reason;
    this.state = 'backoff';
    if (wasUp) this.opts.log('warn', 'analysis link down', { reason });
    this.opts.onDown(reason);
    // Next time, the next replica; the backoff grows once per round over the whole list.
    this.current = (this.current + 1) % this.addresses.length;
    const b = this.backoff;
    const round = Math.floor(this.attempt / this.addresses.length);
    const base = Math.min(b.maxMs, b.initialMs * b.multiplier ** round);
    const delay = Math.max(1, Math.round(base * (1 - b.jitter * Math.random())));
    this.attempt++;
    if (!wasUp && this.attempt === 1) this.opts.log('warn', 'analysis link: cannot connect, retrying with backoff', { reason });
    this.timer = setTimeout(() => this.connect(), delay);
  }
}
