/**
 * A minimal REAL analysis peer for host-agent tests: a grpc-js server implementing
 * `periscope.v1.AgentLinkService/Link` (protos/periscope/v1/agent.proto). It records every message an
 * agent sends, lets the test send commands, verdicts, policies, pause controls and detection acks down
 * the stream (awaiting the matching CommandResult / PolicyStatus), can be slowed (it stops reading for a
 * while after each message, so HTTP/2 flow control pushes back on the agent), and can be killed and
 * restarted on the same port. With `tls` it requires client certificates signed by `tls.ca` (mTLS).
 *
 * `mode: 'count'` (benchmarks) does not decode event and verdict batches: it only counts their records
 * from the protobuf tags; every other message is decoded and recorded as in `'decode'` mode.
 */
import {
  Server,
  ServerCredentials,
  type ServerDuplexStream,
  type ServiceDefinition,
  type UntypedServiceImplementation,
} from '@grpc/grpc-js';
import {
  AgentLinkServiceService,
  LinkRequest,
  LinkResponse,
  type CommandResult,
  type Detection,
  type EventVerdict,
  type KvmiCommand,
  type KvmiEvent,
  type LocalPolicy,
  type LossRecord,
  type PolicyStatus,
  type VerdictRecord,
  type VmAttached,
} from '@periscope/contracts';

export interface PeerTls {
  /** CA bundle client certificates must chain to. */
  ca: Buffer;
  /** The server's certificate chain and key. */
  cert: Buffer;
  key: Buffer;
}

export interface AnalysisPeerOptions {
  host?: string;
  /** 0 (default) = any free port; kept across `restart()`. */
  port?: number;
  tls?: PeerTls;
  mode?: 'decode' | 'count';
  /** Acknowledge every detection as soon as it arrives (default false: the test acks). */
  autoAckDetections?: boolean;
  /** Called for every reported event the agent is holding (disposition HELD); answer with `peer.verdict`. */
  onHeldEvent?: (event: KvmiEvent, peer: AnalysisPeer) => void;
  /**
   * Keep every decoded message in `received` / `connections[i].received` (default true, what tests read).
   * Benchmarks pass false: a long run would otherwise grow the heap without bound and time the peer's
   * garbage collector instead of the link.
   */
  retain?: boolean;
}

type Message = NonNullable<LinkRequest['message']>;
type MessageOf<C extends Message['$case']> = Extract<Message, { $case: C }>['value'];
type ResponseMessage = NonNullable<LinkResponse['message']>;

/** One agent connection (one Link call). */
export interface PeerConnection {
  readonly index: number;
  readonly peer: string;
  /** Subject CN of the client certificate (mTLS), if any. */
  readonly clientCn: string | undefined;
  readonly received: LinkRequest[];
  ended: boolean;
}

interface Conn extends PeerConnection {
  call: ServerDuplexStream<unknown, LinkResponse>;
  seq: bigint;
}

const DISPOSITION_HELD = 2;

export class AnalysisPeer {
  /** Every decoded message, all connections, in arrival order. */
  readonly received: LinkRequest[] = [];
  readonly connections: PeerConnection[] = [];
  /** Counts over all connections (count mode included). */
  readonly counts = { messages: 0, bytes: 0, events: 0, verdictRecords: 0, eventBatches: 0, verdictBatches: 0 };
  private server: Server | undefined;
  private conns: Conn[] = [];
  private port: number;
  private slowMs = 0;
  private nextCorrelation = 1n;
  private readonly waiting = new Map<bigint, (r: CommandResult) => void>();
  private readonly policyWaiters: { id: string; version: bigint; resolve: (s: PolicyStatus) => void }[] = [];
  private readonly listeners = new Set<() => void>();

  constructor(private readonly opts: AnalysisPeerOptions = {}) {
    this.port = opts.port ?? 0;
  }

  get host(): string {
    return this.opts.host ?? '127.0.0.1';
  }

  /** `host:port`, for the agent's `--analysis`. */
  get address(): string {
    return `${this.host}:${this.port}`;
  }

  /** True while an agent stream is open. */
  get connected(): boolean {
    return this.conns.some((c) => !c.ended);
  }

  async start(): Promise<void> {
    if (this.server) throw new Error('peer already started');
    const server = new Server({ 'grpc.keepalive_permit_without_calls': 1, 'grpc.http2.min_ping_interval_without_data_ms': 1000 });
    const count = this.opts.mode === 'count';
    const def = (count
      ? { link: { ...AgentLinkServiceService.link, requestDeserialize: (b: Buffer): Buffer => b } }
      : AgentLinkServiceService) as unknown as ServiceDefinition;
    server.addService(def, { link: (call: ServerDuplexStream<unknown, LinkResponse>) => this.onCall(call) } as UntypedServiceImplementation);
    const creds = this.opts.tls
      ? ServerCredentials.createSsl(this.opts.tls.ca, [{ cert_chain: this.opts.tls.cert, private_key: this.opts.tls.key }], true)
      : ServerCredentials.createInsecure();
    this.port = await new Promise<number>((resolve, reject) =>
      server.bindAsync(`${this.host}:${this.port}`, creds, (err, port) => (err ? reject(err) : resolve(port))),
    );
    this.server = server;
  }

  /** Kill the server abruptly (every stream is cancelled, as if the process died). */
  async kill(): Promise<void> {
    const s = this.server;
    this.server = undefined;
    if (!s) return;
    for (const c of this.conns) c.ended = true;
    this.conns = [];
    s.forceShutdown();
    this.notify();
  }

  /** Start again on the same port. */
  async restart(): Promise<void> {
    await this.kill();
    await this.start();
  }

  /**
   * Slow consumer: after each message, stop reading for `ms` (0 = full speed). The agent's writes then
   * back up through HTTP/2 flow control.
   */
  slow(ms: number): void {
    this.slowMs = ms;
  }

  // ---- sending -------------------------------------------------------------------------------------

  /** Send one message on the newest open stream. Throws when no agent is connected. */
  send(message: ResponseMessage): void {
    const c = this.current();
    if (!c) throw new Error('no agent connected');
    c.seq += 1n;
    c.call.write({ streamSeq: c.seq, message });
  }

  /** Run a KVMI command on the agent; resolves with its CommandResult. */
  command(cmd: Omit<KvmiCommand, 'correlationId' | 'timeoutMs'> & { correlationId?: bigint; timeoutMs?: number }): Promise<CommandResult> {
    const correlationId = cmd.correlationId ?? this.nextCorrelation++;
    const p = this.resultFor(correlationId);
    this.send({ $case: 'command', value: { timeoutMs: 0, ...cmd, correlationId } });
    return p;
  }

  /** Answer a held event. */
  verdict(v: EventVerdict): void {
    this.send({ $case: 'verdict', value: v });
  }

  /** Install a policy; resolves with the agent's PolicyStatus for that id/version. */
  installPolicy(policy: LocalPolicy): Promise<PolicyStatus> {
    const p = new Promise<PolicyStatus>((resolve) => this.policyWaiters.push({ id: policy.policyId, version: policy.version, resolve }));
    this.send({ $case: 'installPolicy', value: policy });
    return p;
  }

  /** Pause or resume a whole VM; resolves with the CommandResult. */
  pauseVm(vmUuid: Buffer, paused: boolean, requestedBy = 'test'): Promise<CommandResult> {
    const correlationId = this.nextCorrelation++;
    const p = this.resultFor(correlationId);
    this.send({ $case: 'pauseControl', value: { correlationId, vmUuid, paused, requestedBy } });
    return p;
  }

  ackDetections(ids: string[]): void {
    this.send({ $case: 'detectionAck', value: { detectionIds: ids } });
  }

  // ---- what was received ---------------------------------------------------------------------------

  private all<C extends Message['$case']>(c: C): MessageOf<C>[] {
    const out: MessageOf<C>[] = [];
    for (const m of this.received) if (m.message?.$case === c) out.push(m.message.value as MessageOf<C>);
    return out;
  }

  hellos(): MessageOf<'hello'>[] {
    return this.all('hello');
  }
  vmAttached(): VmAttached[] {
    return this.all('vmAttached');
  }
  events(): KvmiEvent[] {
    return this.all('eventBatch').flatMap((b) => b.events);
  }
  eventBatches(): MessageOf<'eventBatch'>[] {
    return this.all('eventBatch');
  }
  verdictRecords(): VerdictRecord[] {
    return this.all('verdictBatch').flatMap((b) => b.records);
  }
  verdictBatches(): MessageOf<'verdictBatch'>[] {
    return this.all('verdictBatch');
  }
  detections(): Detection[] {
    return this.all('detection');
  }
  losses(): LossRecord[] {
    return this.all('loss');
  }
  commandResults(): CommandResult[] {
    return this.all('commandResult');
  }
  policyStatuses(): PolicyStatus[] {
    return this.all('policyStatus');
  }

  /** Resolve when `check()` returns a value other than undefined/false (re-checked on every message). */
  waitFor<T>(check: () => T | undefined | false, timeoutMs = 5000, what = 'condition'): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      const first = check();
      if (first !== undefined && first !== false) return resolve(first);
      const timer = setTimeout(() => {
        this.listeners.delete(probe);
        clearInterval(tick);
        reject(new Error(`analysis peer: timed out after ${timeoutMs} ms waiting for ${what}`));
      }, timeoutMs);
      const tick = setInterval(() => probe(), 20);
      const probe = (): void => {
        const v = check();
        if (v === undefined || v === false) return;
        clearTimeout(timer);
        clearInterval(tick);
        this.listeners.delete(probe);
        resolve(v);
      };
      this.listeners.add(probe);
    });
  }

  // ---- internals -----------------------------------------------------------------------------------

  private current(): Conn | undefined {
    for (let i = this.conns.length - 1; i >= 0; i--) if (!this.conns[i]!.ended) return this.conns[i];
    return undefined;
  }

  private resultFor(correlationId: bigint): Promise<CommandResult> {
    return new Promise<CommandResult>((resolve) => this.waiting.set(correlationId, resolve));
  }

  private notify(): void {
    for (const l of [...this.listeners]) l();
  }

  private onCall(call: ServerDuplexStream<unknown, LinkResponse>): void {
    const peerCert = (call.getAuthContext?.() as { sslPeerCertificate?: { subject?: { CN?: string } } } | undefined)?.sslPeerCertificate;
    const conn: Conn = {
      index: this.connections.length,
      peer: call.getPeer(),
      clientCn: peerCert?.subject?.CN,
      received: [],
      ended: false,
      call,
      seq: 0n,
    };
    this.connections.push(conn);
    this.conns.push(conn);
    const end = (): void => {
      if (conn.ended) return;
      conn.ended = true;
      this.notify();
    };
    call.on('data', (raw: unknown) => {
      this.onMessage(conn, raw);
      if (this.slowMs > 0) {
        call.pause();
        setTimeout(() => call.resume(), this.slowMs);
      }
    });
    call.on('end', () => {
      end();
      call.end();
    });
    call.on('error', end);
    call.on('cancelled', end);
    call.on('close', end);
    this.notify();
  }

  private onMessage(conn: Conn, raw: unknown): void {
    this.counts.messages++;
    let msg: LinkRequest | undefined;
    if (Buffer.isBuffer(raw)) {
      this.counts.bytes += raw.length;
      const counted = countBatch(raw);
      if (counted) {
        if (counted.field === 13) {
          this.counts.eventBatches++;
          this.counts.events += counted.records;
        } else {
          this.counts.verdictBatches++;
          this.counts.verdictRecords += counted.records;
        }
        return;
      }
      msg = LinkRequest.decode(raw);
    } else {
      msg = raw as LinkRequest;
      const m = msg.message;
      if (m?.$case === 'eventBatch') {
        this.counts.eventBatches++;
        this.counts.events += m.value.events.length;
      } else if (m?.$case === 'verdictBatch') {
        this.counts.verdictBatches++;
        this.counts.verdictRecords += m.value.records.length;
      }
    }
    if (this.opts.retain !== false) {
      conn.received.push(msg);
      this.received.push(msg);
    }
    const m = msg.message;
    if (m?.$case === 'commandResult') {
      const w = this.waiting.get(m.value.correlationId);
      if (w) {
        this.waiting.delete(m.value.correlationId);
        w(m.value);
      }
    } else if (m?.$case === 'policyStatus') {
      const i = this.policyWaiters.findIndex((w) => w.id === m.value.policyId && w.version === m.value.version);
      if (i >= 0) this.policyWaiters.splice(i, 1)[0]!.resolve(m.value);
    } else if (m?.$case === 'detection' && this.opts.autoAckDetections) {
      conn.seq += 1n;
      conn.call.write({ streamSeq: conn.seq, message: { $case: 'detectionAck', value: { detectionIds: [m.value.detectionId] } } });
    } else if (m?.$case === 'eventBatch' && this.opts.onHeldEvent) {
      for (const e of m.value.events) if (e.disposition === DISPOSITION_HELD) this.opts.onHeldEvent(e, this);
    }
    this.notify();
  }
}

/** Count the records of an event batch (field 13) or verdict batch (field 14) without decoding them. */
function countBatch(b: Buffer): { field: 13 | 14; records: number } | undefined {
  let off = 0;
  while (off < b.length) {
    const [tag, t1] = varint(b, off);
    off = t1;
    const field = tag >>> 3;
    const wire = tag & 7;
    if (wire === 0) {
      off = varint(b, off)[1];
      continue;
    }
    if (wire !== 2) return undefined;
    const [len, l1] = varint(b, off);
    off = l1;
    if (field === 13 || field === 14) {
      let records = 0;
      let p = off;
      const end = off + len;
      while (p < end) {
        const [t, p1] = varint(b, p);
        const [n, p2] = varint(b, p1);
        if ((t & 7) !== 2) return undefined;
        records++;
        p = p2 + n;
      }
      return { field, records };
    }
    off += len;
  }
  return undefined;
}

function varint(b: Buffer, off: number): [number, number] {
  let v = 0;
  let shift = 0;
  for (;;) {
    const byte = b[off++]!;
    v += (byte & 0x7f) * 2 ** shift;
    if (byte < 0x80) return [v, off];
    shift += 7;
  }
}
