/**
 * Server side of `AgentLinkService.Link`: one `AgentSession` per agent stream. Messages are handled in
 * stream order (one promise chain); the session acknowledges what it has processed with keepalives,
 * acknowledges stored detections with `DetectionAck`, and sends commands whose results it awaits by
 * correlation id.
 */
import type { ServerDuplexStream } from '@grpc/grpc-js';
import {
  agentCapabilityToJSON,
  commandStatusToJSON,
  CommandStatus,
  detachReasonToJSON,
  EventDisposition,
  kvmErrorToJSON,
  kvmiCommandKindToJSON,
  kvmiDialectToJSON,
  kvmiEventKindToJSON,
  lossReasonToJSON,
  lostRecordTypeToJSON,
  policyInstallStateToJSON,
  uuidFromBytes,
  uuidToBytes,
  type CommandResult,
  type KvmiCommand,
  type LinkRequest,
  type LinkResponse,
} from '@periscope/contracts';
import { AnalysisError } from './errors.js';
import { hex } from './evidence.js';
import type { KernelFacts } from './profiles.js';
import { nowNs } from './schema.js';

export type CommandBody = NonNullable<KvmiCommand['command']>;
export type ResponseBody = NonNullable<LinkResponse['message']>;

export interface RecentEvent {
  seq: number;
  vcpu: number;
  kind: string;
  receivedNs: string;
  rip: string;
  ruleId: string;
  disposition: string;
  detail: Record<string, string | number | boolean>;
}

/** A VM as this replica sees it live (its current session on a connected agent). */
export interface LiveVm {
  uuid: string;
  name: string;
  hostId: string;
  generation: bigint;
  vcpuCount: number;
  startTimeMs: bigint;
  labels: Record<string, string>;
  allowedCommands: string[];
  policyName: string;
  facts?: KernelFacts;
  protection: Record<string, string>;
  ring: RecentEvent[];
  /** vCPU stall from the agent's verdict records since attach: count, sum and max of read -> reply, ns. */
  stall?: { verdicts: number; totalNs: number; maxNs: number };
  session: AgentSession;
}

/** What a session needs from the service (implemented by `Analysis`). */
export interface LinkHandler {
  readonly replicaId: string;
  readonly ringSize: number;
  readonly commandTimeoutMs: number;
  log(level: 'debug' | 'info' | 'warn' | 'error', msg: string, fields?: Record<string, unknown>): void;
  onHello(s: AgentSession, m: Extract<LinkRequest['message'], { $case: 'hello' }>['value']): Promise<void>;
  onVmAttached(s: AgentSession, m: Extract<LinkRequest['message'], { $case: 'vmAttached' }>['value']): Promise<void>;
  onVmDetached(s: AgentSession, m: Extract<LinkRequest['message'], { $case: 'vmDetached' }>['value']): Promise<void>;
  onEvents(s: AgentSession, m: Extract<LinkRequest['message'], { $case: 'eventBatch' }>['value']): Promise<void>;
  onVerdicts(s: AgentSession, m: Extract<LinkRequest['message'], { $case: 'verdictBatch' }>['value']): void;
  onDetection(s: AgentSession, m: Extract<LinkRequest['message'], { $case: 'detection' }>['value']): Promise<void>;
  onMisc(s: AgentSession, m: LinkRequest['message']): Promise<void>;
  onClosed(s: AgentSession): Promise<void>;
  recordCommand(s: AgentSession, id: bigint, vm: LiveVm, vcpu: number, kind: string, purpose: string): void;
  finishCommand(id: bigint, status: string, message: string): void;
  /** Audit log (audit.ts): a guest-changing command or pause control starts; returns its result recorder. */
  auditBegin?(vm: LiveVm, vcpu: number, id: bigint, what: CommandBody | { readonly $case: 'pauseControl'; readonly paused: boolean }, purpose: string, by: string | undefined): ((status: string, message: string) => void) | undefined;
  nextCommandId(): Promise<bigint>;
}

export function commandKindName(c: CommandBody): string {
  return c.$case;
}

export const enumName = {
  capability: (v: number) => agentCapabilityToJSON(v).replace('AGENT_CAPABILITY_', ''),
  detach: (v: number) => detachReasonToJSON(v).replace('DETACH_REASON_', '').toLowerCase(),
  eventKind: (v: number) => kvmiEventKindToJSON(v).replace('KVMI_EVENT_KIND_', ''),
  commandKind: (v: number) => kvmiCommandKindToJSON(v).replace('KVMI_COMMAND_KIND_', ''),
  dialect: (v: number) => kvmiDialectToJSON(v).replace('KVMI_DIALECT_', '').toLowerCase(),
  commandStatus: (v: number) => commandStatusToJSON(v).replace('COMMAND_STATUS_', '').toLowerCase(),
  policyState: (v: number) => policyInstallStateToJSON(v).replace('POLICY_INSTALL_STATE_', '').toLowerCase(),
  lostType: (v: number) => lostRecordTypeToJSON(v).replace('LOST_RECORD_TYPE_', '').toLowerCase(),
  lossReason: (v: number) => lossReasonToJSON(v).replace('LOSS_REASON_', '').toLowerCase(),
};

export class CommandError extends AnalysisError {
  constructor(readonly result: CommandResult, what: string) {
    super('command-failed', `${what}: ${enumName.commandStatus(result.status)}${result.status === CommandStatus.COMMAND_STATUS_KVM_ERROR ? ` ${kvmErrorToJSON(result.kvmError)}` : ''}${result.message ? ` (${result.message})` : ''}`);
  }
}

export class AgentSession {
  hostId = '';
  agentInstanceId = '';
  readonly vms = new Map<string, LiveVm>();
  /** Content key of the local policy last sent, and its version. */
  lastPolicyKey = '';
  lastPolicyVersion = 0n;
  lastSeenNs = nowNs();
  closed = false;
  private outSeq = 0n;
  private inSeqProcessed = 0n;
  private chain: Promise<void> = Promise.resolve();
  /**
   * Detections are stored (a database transaction each) in stream order on a chain of their own: on the message
   * chain a detection storm — the agent's spool resent after a reconnect — delayed held events and command
   * results behind it past their deadlines (breakpoint tracing's steps then failed open).
   */
  private detections: Promise<void> = Promise.resolve();
  private readonly pending = new Map<bigint, { resolve: (r: CommandResult) => void; reject: (e: Error) => void; timer: NodeJS.Timeout }>();
  private readonly keepaliveTimer: NodeJS.Timeout;
  readonly connectedNs = nowNs();

  constructor(
    readonly call: ServerDuplexStream<LinkRequest, LinkResponse>,
    private readonly h: LinkHandler,
    keepaliveMs: number,
  ) {
    call.on('data', (req: LinkRequest) => {
      this.lastSeenNs = nowNs();
      this.chain = this.chain.then(() => this.handle(req)).catch((e: unknown) => {
        this.h.log('error', 'link message failed', { host: this.hostId, error: (e as Error).message });
      });
    });
    const end = () => void this.close();
    call.on('end', end);
    call.on('error', end);
    call.on('cancelled', end);
    call.on('close', end);
    this.keepaliveTimer = setInterval(() => this.sendKeepalive(), keepaliveMs);
    this.keepaliveTimer.unref();
  }

  /** Resolves once every message received so far has been handled (detections may still be being stored: `drained`). */
  idle(): Promise<void> {
    return this.chain;
  }

  /** Resolves once every message received so far has been handled and every detection among them stored (or left to retry). */
  async drained(): Promise<void> {
    await this.chain;
    await this.detections;
  }

  send(message: ResponseBody): void {
    if (this.closed) return;
    this.outSeq += 1n;
    this.call.write({ streamSeq: this.outSeq, message });
  }

  sendKeepalive(): void {
    this.send({ $case: 'keepalive', value: { sentUnixNs: nowNs(), ackedStreamSeq: this.inSeqProcessed } });
  }

  /**
   * Run one KVMI command on a VM of this agent and await its result (throws on a status other than OK).
   * `by`: who asked, for the audit log of guest-changing commands (default `module:` + the purpose's prefix).
   */
  async command(vm: LiveVm, vcpu: number, cmd: CommandBody, purpose: string, timeoutMs = this.h.commandTimeoutMs, by?: string): Promise<CommandResult> {
    if (this.closed) throw new AnalysisError('link-closed', `link to ${this.hostId} is closed`);
    const id = await this.h.nextCommandId();
    const kind = commandKindName(cmd);
    this.h.recordCommand(this, id, vm, vcpu, kind, purpose);
    const audited = this.h.auditBegin?.(vm, vcpu, id, cmd, purpose, by);
    const result = await new Promise<CommandResult>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        this.h.finishCommand(id, 'timeout', `no result within ${timeoutMs} ms`);
        audited?.('timeout', `no result within ${timeoutMs} ms`);
        reject(new AnalysisError('command-timeout', `${kind} on ${vm.name} vCPU ${vcpu}: no result within ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(id, { resolve, reject, timer });
      this.send({
        $case: 'command',
        value: { correlationId: id, vmUuid: uuidToBytes(vm.uuid), sessionGeneration: vm.generation, vcpu, timeoutMs: 0, command: cmd },
      });
    }).catch((e: unknown) => {
      audited?.('failed', (e as Error).message); // link closed (a timeout was recorded already)
      throw e;
    });
    this.h.finishCommand(id, enumName.commandStatus(result.status), result.message);
    audited?.(enumName.commandStatus(result.status), result.status === CommandStatus.COMMAND_STATUS_KVM_ERROR ? kvmErrorToJSON(result.kvmError) : result.message);
    if (result.status !== CommandStatus.COMMAND_STATUS_OK) throw new CommandError(result, `${kind} on ${vm.name} vCPU ${vcpu}`);
    return result;
  }

  /**
   * Pause or resume a whole VM (`VmPauseControl`): the agent persists the state and re-applies it when
   * the VM re-attaches. Resolves with the agent's CommandResult (OK, or VM_NOT_ATTACHED: persisted,
   * applied at attach); recorded in the command log like a KVMI command.
   */
  async pauseControl(vm: LiveVm, paused: boolean, requestedBy: string, timeoutMs = this.h.commandTimeoutMs): Promise<CommandResult> {
    if (this.closed) throw new AnalysisError('link-closed', `link to ${this.hostId} is closed`);
    const id = await this.h.nextCommandId();
    const kind = paused ? 'pauseControl' : 'resumeControl';
    this.h.recordCommand(this, id, vm, 0, kind, `operator ${requestedBy}`);
    const audited = this.h.auditBegin?.(vm, 0, id, { $case: 'pauseControl', paused }, `operator ${requestedBy}`, requestedBy);
    const result = await new Promise<CommandResult>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        this.h.finishCommand(id, 'timeout', `no result within ${timeoutMs} ms`);
        audited?.('timeout', `no result within ${timeoutMs} ms`);
        reject(new AnalysisError('command-timeout', `${kind} on ${vm.name}: no result within ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(id, { resolve, reject, timer });
      this.send({ $case: 'pauseControl', value: { correlationId: id, vmUuid: uuidToBytes(vm.uuid), paused, requestedBy } });
    }).catch((e: unknown) => {
      audited?.('failed', (e as Error).message);
      throw e;
    });
    this.h.finishCommand(id, enumName.commandStatus(result.status), result.message);
    audited?.(enumName.commandStatus(result.status), result.message);
    return result;
  }

  private async handle(req: LinkRequest): Promise<void> {
    const m = req.message;
    if (!m) return;
    if (m.$case !== 'hello' && !this.hostId) {
      this.h.log('warn', 'link message before hello: ignored', { kind: m.$case });
      return;
    }
    switch (m.$case) {
      case 'hello':
        this.hostId = m.value.hostId;
        this.agentInstanceId = m.value.agentInstanceId;
        await this.h.onHello(this, m.value);
        break;
      case 'vmAttached':
        await this.h.onVmAttached(this, m.value);
        break;
      case 'vmDetached':
        await this.h.onVmDetached(this, m.value);
        break;
      case 'eventBatch':
        await this.h.onEvents(this, m.value);
        break;
      case 'verdictBatch':
        this.h.onVerdicts(this, m.value);
        break;
      case 'detection': {
        const d = m.value;
        this.detections = this.detections.then(() => this.h.onDetection(this, d)).catch((e: unknown) => {
          this.h.log('error', 'link message failed', { host: this.hostId, error: (e as Error).message });
        });
        break;
      }
      case 'commandResult': {
        const p = this.pending.get(m.value.correlationId);
        if (p) {
          clearTimeout(p.timer);
          this.pending.delete(m.value.correlationId);
          p.resolve(m.value);
        } else {
          this.h.finishCommand(m.value.correlationId, enumName.commandStatus(m.value.status), m.value.message);
        }
        break;
      }
      case 'keepalive':
        break;
      default:
        // Heki messages are correlated with CR detections of the same incident (heki.ts): after the detections before them.
        if (m.$case.startsWith('heki')) await this.detections;
        await this.h.onMisc(this, m);
    }
    if (req.streamSeq > this.inSeqProcessed) this.inSeqProcessed = req.streamSeq;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    clearInterval(this.keepaliveTimer);
    for (const [, p] of this.pending) {
      clearTimeout(p.timer);
      p.reject(new AnalysisError('link-closed', `link to ${this.hostId} closed`));
    }
    this.pending.clear();
    try {
      this.call.end();
    } catch {
      /* already ended */
    }
    await this.chain.catch(() => undefined);
    await this.detections;
    await this.h.onClosed(this);
  }
}

export function recentEventOf(e: import('@periscope/contracts').KvmiEvent): RecentEvent {
  const p = e.payload;
  const detail: Record<string, string | number | boolean> = {};
  if (p) {
    for (const [k, v] of Object.entries(p.value as Record<string, unknown>)) {
      if (typeof v === 'bigint') detail[k] = hex(v);
      else if (typeof v === 'number' || typeof v === 'boolean' || typeof v === 'string') detail[k] = v;
    }
  }
  return {
    seq: e.seq,
    vcpu: e.vcpu,
    kind: p ? p.$case.toUpperCase() : 'UNKNOWN',
    receivedNs: e.receivedUnixNs.toString(),
    rip: e.regs ? hex(e.regs.rip) : '',
    ruleId: e.ruleId,
    disposition: e.disposition === EventDisposition.EVENT_DISPOSITION_HELD ? 'held' : e.disposition === EventDisposition.EVENT_DISPOSITION_NO_REPLY ? 'no-reply' : 'answered',
    detail,
  };
}

export { uuidFromBytes };
