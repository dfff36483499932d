/**
 * The audit log: every command that changes a guest — written physical memory, set registers or XSAVE,
 * injected exceptions, page access changes, singlestep control, vCPU kicks, VM pause/resume, and the
 * responses policies apply (inject, crash, pause, quarantine) — with who asked, what, when and the result.
 *
 * Hooks: `AgentSession.command` and `AgentSession.pauseControl` (link.ts) call `LinkHandler.auditBegin`,
 * which `Analysis` forwards to `AuditLog.commandStarted`; the returned finisher records the result. Reads
 * (VM_READ_PHYSICAL, GET_REGISTERS, TRANSLATE_GVA, …) and interception controls are not guest changes and
 * are not audited (the command log, GET /v1/commands, has every command).
 *
 * "Who" is one string (it travels through `VmOperations` as `by`, also across replicas): `NAME` or
 * `NAME via PRINCIPAL`, where NAME is what the operator gave (`by`, `x-periscope-actor`) or the automatic
 * origin (`policy:NAME`, `module:NAME`), and PRINCIPAL the authenticated identity (`api-token`,
 * `cert:SUBJECT`) when known. Stored split into `actor` and `principal`.
 */
import { randomUUID } from 'node:crypto';
import { EventEmitter } from 'node:events';
import type { TLSSocket } from 'node:tls';
import type { IncomingMessage } from 'node:http';
import type { AuditEvent } from '@periscope/contracts';
import type { Db } from './db.js';
import { hex } from './evidence.js';
import type { CommandBody, LiveVm } from './link.js';
import { nowNs } from './schema.js';

/** Who asked, split. */
export interface Who {
  readonly actor: string;
  readonly principal: string;
}

export function formatWho(actor: string, principal = ''): string {
  return principal && principal !== actor ? `${actor} via ${principal}` : actor;
}

export function parseWho(by: string): Who {
  const i = by.lastIndexOf(' via ');
  if (i <= 0) return { actor: by || 'unknown', principal: '' };
  return { actor: by.slice(0, i), principal: by.slice(i + 5) };
}

/** The subject of a TLS peer certificate as `cert:CN=…` (or the whole subject), '' when none. */
export function certPrincipal(subject: Record<string, unknown> | undefined): string {
  if (!subject) return '';
  const cn = subject['CN'];
  if (typeof cn === 'string' && cn) return `cert:CN=${cn}`;
  const parts = Object.entries(subject).filter(([, v]) => typeof v === 'string').map(([k, v]) => `${k}=${String(v)}`);
  return parts.length ? `cert:${parts.join(',')}` : '';
}

/**
 * The authenticated identity of an HTTP request: the client certificate's subject when the TLS socket has
 * one, else `api-token` when the server requires a token (the request passed the check), else
 * `unauthenticated` (a loopback or insecure server without a token).
 */
export function httpPrincipal(req: IncomingMessage, tokenRequired: boolean): string {
  const sock = req.socket as Partial<TLSSocket>;
  if (typeof sock.getPeerCertificate === 'function') {
    const c = certPrincipal(sock.getPeerCertificate(false)?.subject as unknown as Record<string, unknown> | undefined);
    if (c) return c;
  }
  return tokenRequired ? 'api-token' : 'unauthenticated';
}

/** `by` of an operator request (body/query/header name), joined with the authenticated principal. */
export function operatorWho(name: string | undefined, principal: string): string {
  return formatWho(name && name.trim() ? name.trim() : 'operator', principal);
}

/** KVMI commands that change a guest (its memory, registers, execution or EPT permissions), by oneof case. */
export const GUEST_CHANGING_COMMANDS: Readonly<Record<string, string>> = {
  writePhysical: 'write-physical',
  setRegisters: 'set-registers',
  setXsave: 'set-xsave',
  injectException: 'inject-exception',
  setPageAccess: 'set-page-access',
  controlSinglestep: 'control-singlestep',
  pauseVcpu: 'pause-vcpu',
};

/** What a guest-changing command does, in audit details (64-bit values as 0x-hex). */
function commandDetails(c: CommandBody): Record<string, string> {
  switch (c.$case) {
    case 'writePhysical':
      return { gpa: hex(c.value.gpa), size: String(c.value.data.length) };
    case 'setRegisters':
      return c.value.regs ? { rip: hex(c.value.regs.rip), rsp: hex(c.value.regs.rsp) } : {};
    case 'setXsave':
      return { size: String(c.value.xsave.length) };
    case 'injectException':
      return { vector: String(c.value.nr), errorCode: String(c.value.errorCode), ...(c.value.nr === 14 ? { address: hex(c.value.address) } : {}) };
    case 'setPageAccess': {
      const e = c.value.entries;
      return { pages: String(e.length), ...(e.length ? { first: hex(e[0]!.gpa), access: String(e[0]!.allowedAccess) } : {}) };
    }
    case 'controlSinglestep':
      return { enable: String(c.value.enable) };
    case 'pauseVcpu':
      return { wait: String(c.value.wait) };
    default:
      return {};
  }
}

export interface AuditRecordInput {
  readonly by: string;
  readonly action: string;
  /** e.g. `vm/UUID`, `vm/UUID/vcpu/N`. */
  readonly target: string;
  readonly vm?: LiveVm | { uuid: string; hostId: string };
  readonly vcpu?: number;
  readonly correlationId?: bigint;
  readonly reason?: string;
  readonly details?: Record<string, string>;
  /** Already known (automatic responses the agent applied): the record is final at once. */
  readonly result?: { readonly result: string; readonly success: boolean };
}

export interface AuditEventRecord {
  id: string;
  seq: string;
  timeNs: string;
  doneNs: string;
  actor: string;
  principal: string;
  action: string;
  target: string;
  vm: string;
  hostId: string;
  vcpu: number | null;
  correlationId: string | null;
  replica: string;
  reason: string;
  result: string;
  success: boolean | null;
  details: Record<string, string>;
}

export interface AuditFilter {
  vm?: string;
  actor?: string;
  action?: string;
  sinceNs?: bigint;
  untilNs?: bigint;
  /** Entries with seq < before (paging, newest first). */
  before?: bigint;
  limit?: number;
}

type Row = Record<string, unknown>;
const str = (v: unknown): string => (v === null || v === undefined ? '' : String(v));

function fromRow(r: Row): AuditEventRecord {
  return {
    id: str(r['audit_id']), seq: str(r['seq']), timeNs: str(r['occurred_ns']), doneNs: str(r['done_ns']), actor: str(r['actor']), principal: str(r['principal']),
    action: str(r['action']), target: str(r['target']), vm: str(r['vm_uuid']), hostId: str(r['host_id']), vcpu: r['vcpu'] === null || r['vcpu'] === undefined ? null : Number(r['vcpu']),
    correlationId: r['correlation_id'] === null || r['correlation_id'] === undefined ? null : str(r['correlation_id']), replica: str(r['replica_id']), reason: str(r['reason']),
    result: str(r['result']), success: r['success'] === null || r['success'] === undefined ? null : Boolean(r['success']), details: (r['details'] ?? {}) as Record<string, string>,
  };
}

export function auditToProto(e: AuditEventRecord): AuditEvent {
  const details: Record<string, string> = { ...e.details, result: e.result };
  if (e.principal) details['principal'] = e.principal;
  if (e.vm) details['vm'] = e.vm;
  if (e.hostId) details['host'] = e.hostId;
  if (e.vcpu !== null) details['vcpu'] = String(e.vcpu);
  if (e.correlationId) details['correlationId'] = e.correlationId;
  return { auditId: e.id, occurredUnixNs: BigInt(e.timeNs || '0'), actor: formatWho(e.actor, e.principal), action: e.action, target: e.target, reason: e.reason, success: e.success === true, details };
}

/** A finisher for a pending record: the command's status (`ok`, `kvm_error`, `timeout`, …) and message. */
export type AuditFinish = (status: string, message: string) => void;

export class AuditLog {
  private chain: Promise<void> = Promise.resolve();
  private readonly bus = new EventEmitter();
  readonly stats = { recorded: 0, failed: 0 };

  constructor(
    private readonly db: Db,
    private readonly replicaId: string,
    private readonly log: (level: 'warn', msg: string, fields?: Record<string, unknown>) => void,
  ) {}

  /** Called for every record once it is stored (e.g. responses clear their pause state on a resume). */
  onRecord(fn: (e: { id: string; action: string; vm: string; actor: string; success: boolean | null }) => void): () => void {
    this.bus.on('record', fn);
    return () => this.bus.off('record', fn);
  }

  /** Writes are serialised (an entry's result never lands before the entry); resolves when all are stored. */
  flushed(): Promise<void> {
    return this.chain;
  }

  private enqueue(what: string, fn: () => Promise<void>): void {
    this.chain = this.chain.then(fn).catch((e: unknown) => {
      this.stats.failed++;
      this.log('warn', `audit ${what} not stored`, { error: (e as Error).message });
    });
  }

  /** Record an entry (pending unless `result` is given); returns a finisher for its result. */
  record(r: AuditRecordInput): AuditFinish {
    const id = randomUUID();
    const who = parseWho(r.by);
    const occurred = nowNs();
    const vmUuid = r.vm?.uuid ?? '';
    this.enqueue('entry', async () => {
      await this.db.query(
        `INSERT INTO audit_events (audit_id, occurred_ns, done_ns, actor, principal, action, target, vm_uuid, host_id, vcpu, correlation_id, replica_id, reason, result, success, details)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16::jsonb)`,
        [id, occurred, r.result ? occurred : 0n, who.actor, who.principal, r.action, r.target, vmUuid, r.vm?.hostId ?? '', r.vcpu ?? null, r.correlationId ?? null, this.replicaId,
          r.reason ?? '', r.result?.result ?? 'pending', r.result ? r.result.success : null, JSON.stringify(r.details ?? {})],
      );
      this.stats.recorded++;
      if (r.result) this.bus.emit('record', { id, action: r.action, vm: vmUuid, actor: who.actor, success: r.result.success });
    });
    if (r.result) return () => undefined;
    let done = false;
    return (status, message) => {
      if (done) return;
      done = true;
      const success = status === 'ok';
      this.enqueue('result', async () => {
        await this.db.query('UPDATE audit_events SET result = $2, success = $3, done_ns = $4 WHERE audit_id = $1', [id, message ? `${status}: ${message}` : status, success, nowNs()]);
        this.bus.emit('record', { id, action: r.action, vm: vmUuid, actor: who.actor, success });
      });
    };
  }

  /**
   * The hook of `AgentSession.command`: a guest-changing command is recorded (pending), others are not
   * (returns undefined). `by` defaults to `module:PURPOSE-PREFIX` (purposes read `module: what`).
   */
  commandStarted(vm: LiveVm, vcpu: number, correlationId: bigint, cmd: CommandBody, purpose: string, by?: string): AuditFinish | undefined {
    const action = GUEST_CHANGING_COMMANDS[cmd.$case];
    if (!action) return undefined;
    return this.record({
      by: by ?? defaultActor(purpose), action, target: `vm/${vm.uuid}/vcpu/${vcpu}`, vm, vcpu, correlationId, reason: purpose, details: { vmName: vm.name, ...commandDetails(cmd) },
    });
  }

  /** The hook of `AgentSession.pauseControl`. */
  pauseStarted(vm: LiveVm, correlationId: bigint, paused: boolean, by: string): AuditFinish {
    return this.record({ by, action: paused ? 'pause-vm' : 'resume-vm', target: `vm/${vm.uuid}`, vm, correlationId, details: { vmName: vm.name } });
  }

  async list(f: AuditFilter = {}): Promise<AuditEventRecord[]> {
    const limit = Math.min(Math.max(f.limit ?? 100, 1), 1000);
    const rows = await this.db.query<Row>(
      `SELECT * FROM audit_events
        WHERE ($1::text = '' OR vm_uuid = $1) AND ($2::text = '' OR actor = $2) AND ($3::text = '' OR action = $3)
          AND ($4::int8 = 0 OR occurred_ns >= $4) AND ($5::int8 = 0 OR occurred_ns < $5) AND ($6::int8 = 0 OR seq < $6)
        ORDER BY seq DESC LIMIT $7`,
      [f.vm ?? '', f.actor ?? '', f.action ?? '', f.sinceNs ?? 0n, f.untilNs ?? 0n, f.before ?? 0n, limit],
    );
    return rows.map(fromRow);
  }
}

/** `kernel-code-integrity: write-protect 12 pages` → `module:kernel-code-integrity`. */
export function defaultActor(purpose: string): string {
  const m = /^([a-z0-9][a-z0-9._-]*)[^:]*:/i.exec(purpose);
  return m ? `module:${m[1]}` : purpose || 'analysis';
}
