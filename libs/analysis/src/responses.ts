/**
 * Responses: what a policy does about each detection of a module (issue #9), in the policy document as
 * `modules.<module>.response` (docs/profiles.md):
 *
 * | response | decided | what happens |
 * | --- | --- | --- |
 * | `deny` (default) | agent, local rule | the write is refused (CR/MSR old value, PF/descriptor skipped) |
 * | `inject` `{vector: GP, error-code: 0}` | agent, local rule | `VCPU_INJECT_EXCEPTION` into the offending vCPU, the write refused; the TRAP event KVM sends after the injection is reported and its vector recorded in the alert (`evidence.response.trap`) |
 * | `crash` | agent, local rule | the CRASH action (the VM stops) |
 * | `pause` `{resume-after: 30s}` | analysis, after the detection arrives | the write refused locally, then the whole VM paused (`VmPauseControl`: held PAUSE events, persisted by the agent); with `resume-after`, analysis resumes it after that delay |
 * | `quarantine` | analysis | pause + a critical `responses/quarantine` alert; only an operator resumes (`periscope vm resume`) |
 *
 * Local responses take microseconds and work with analysis down; pause/quarantine need the VM-wide
 * control and an operator's view, so analysis applies them when the detection arrives (milliseconds later:
 * the offending write itself is already refused locally). Every response is written to the audit log
 * (who: `policy:NAME`).
 */
import { EventAction, uuidFromBytes, type Detection, type KvmiEvent } from '@periscope/contracts';
import { EXCEPTION_VECTORS, vectorInfo, type Action } from '@periscope/verdicts';
import type { AuditFinish, AuditLog } from './audit.js';
import type { Db } from './db.js';
import { hex } from './evidence.js';
import { parseRuleId } from './modules.js';
import type { VmOperations } from './operations.js';
import type { PolicySpec } from './policy.js';
import { nowNs } from './schema.js';
import type { AlertDraft, AlertRecord } from './store.js';

export const RESPONSE_KINDS = ['deny', 'inject', 'pause', 'quarantine', 'crash'] as const;
export type ResponseKind = (typeof RESPONSE_KINDS)[number];

export interface ResponseSpec {
  readonly kind: ResponseKind;
  /** inject: the exception vector (default 13, #GP). */
  readonly vector?: number;
  /** inject: the error code, for vectors that push one (default 0). */
  readonly errorCode?: number;
  /** pause: analysis resumes the VM this long after pausing it; absent = an operator resumes. */
  readonly resumeAfterMs?: number;
}

/** Where each response is decided. */
export const RESPONSE_DECIDED_AT: Readonly<Record<ResponseKind, 'agent' | 'analysis'>> = { deny: 'agent', inject: 'agent', crash: 'agent', pause: 'analysis', quarantine: 'analysis' };

const GP = 13;
const KEYS = ['kind', 'vector', 'error-code', 'resume-after'];

function durationMs(v: unknown): number | undefined {
  if (typeof v === 'number' && Number.isFinite(v) && v >= 0) return Math.round(v * 1000);
  if (typeof v !== 'string') return undefined;
  const m = /^(\d+(?:\.\d+)?)(ms|s|m|h)$/.exec(v.trim());
  return m ? Math.round(Number(m[1]) * { ms: 1, s: 1000, m: 60_000, h: 3_600_000 }[m[2] as 'ms' | 's' | 'm' | 'h']) : undefined;
}

function vectorOf(v: unknown): number | undefined {
  if (typeof v === 'number' && Number.isInteger(v)) return vectorInfo(v) ? v : undefined;
  if (typeof v !== 'string') return undefined;
  const name = v.trim().toUpperCase();
  const e = EXCEPTION_VECTORS[name.startsWith('#') ? name : `#${name}`];
  return e?.vector;
}

/**
 * `response:` of a module: a kind (`inject`) or a mapping (`{kind: inject, vector: GP, error-code: 0}`).
 * Problems go to `fail` with their path. `action` is the module's action: `report` lets the write through,
 * which contradicts inject and crash.
 */
export function parseResponse(v: unknown, path: string, action: 'deny' | 'report', fail: (path: string, message: string) => void): ResponseSpec | undefined {
  if (v === undefined || v === null) return undefined;
  let o: Record<string, unknown>;
  if (typeof v === 'string') o = { kind: v };
  else if (typeof v === 'object' && !Array.isArray(v)) o = v as Record<string, unknown>;
  else {
    fail(path, `must be one of ${RESPONSE_KINDS.join(', ')}, or a mapping {kind: …}`);
    return undefined;
  }
  for (const k of Object.keys(o)) if (!KEYS.includes(k)) fail(`${path}.${k}`, `unknown key (allowed: ${KEYS.join(', ')})`);
  const kind = o['kind'];
  if (typeof kind !== 'string' || !(RESPONSE_KINDS as readonly string[]).includes(kind)) {
    fail(typeof v === 'string' ? path : `${path}.kind`, `must be one of ${RESPONSE_KINDS.join(', ')} (got ${JSON.stringify(kind)})`);
    return undefined;
  }
  const k = kind as ResponseKind;
  const only = (key: string, kinds: readonly ResponseKind[]) => {
    if (o[key] !== undefined && !kinds.includes(k)) fail(`${path}.${key}`, `only for ${kinds.join(', ')} (this response is ${k})`);
  };
  only('vector', ['inject']);
  only('error-code', ['inject']);
  only('resume-after', ['pause']);
  if ((k === 'inject' || k === 'crash') && action === 'report') fail(path, `${k} needs the module's action deny (action: report lets the write through)`);
  const out: { -readonly [K in keyof ResponseSpec]: ResponseSpec[K] } = { kind: k };
  if (k === 'inject') {
    const vector = o['vector'] === undefined ? GP : vectorOf(o['vector']);
    if (vector === undefined) {
      fail(`${path}.vector`, `${JSON.stringify(o['vector'])} is not an exception vector (${Object.keys(EXCEPTION_VECTORS).map((n) => n.slice(1)).join(', ')}, or a number)`);
      return undefined;
    }
    out.vector = vector;
    const info = vectorInfo(vector)!;
    const ec = o['error-code'];
    if (ec !== undefined) {
      if (!info.errorCode) fail(`${path}.error-code`, `${info.name} pushes no error code`);
      else if (typeof ec !== 'number' || !Number.isInteger(ec) || ec < 0 || ec > 0xffff_ffff) fail(`${path}.error-code`, 'must be an integer 0..0xffffffff');
      else out.errorCode = ec;
    } else if (info.errorCode) out.errorCode = 0;
  }
  if (k === 'pause' && o['resume-after'] !== undefined) {
    const ms = durationMs(o['resume-after']);
    if (ms === undefined || ms < 100 || ms > 86_400_000) fail(`${path}.resume-after`, 'must be a duration like 500ms, 30s, 5m (100ms..24h)');
    else out.resumeAfterMs = ms;
  }
  return out;
}

/** The local rule's action for a module whose `deny` action is `deny`, under a response. */
export function localAction(r: ResponseSpec | undefined, deny: Action): Action {
  if (r?.kind === 'inject') return { kind: 'inject', vector: r.vector ?? GP, ...(r.errorCode !== undefined ? { errorCode: r.errorCode } : {}) };
  if (r?.kind === 'crash') return { kind: 'crash' };
  return deny;
}

export function exceptionName(vector: number, errorCode?: number): string {
  const n = vectorInfo(vector)?.name ?? `vector ${vector}`;
  return errorCode !== undefined && vectorInfo(vector)?.errorCode ? `${n}(${errorCode})` : n;
}

/** The alert's action under a response. */
/**
 * Why a response the agent decides (inject, crash) did not happen for this detection, or undefined when it
 * did (or cannot be told). The agent names its local policy's action in the detection (`policy_action`,
 * libs/host-agent/src/link/runtime.ts); an agent that does not (older) is judged by its reply: crash is
 * CRASH. Analysis's own responses (pause, quarantine) are always in force.
 */
export function localResponseNotInForce(kind: ResponseKind, attributes: Readonly<Record<string, string>>, action: string): string | undefined {
  if (RESPONSE_DECIDED_AT[kind] !== 'agent' || kind === 'deny') return undefined;
  const decided = attributes['policy_action'];
  if (decided !== undefined) return decided === kind ? undefined : `the agent's active local policy answered ${decided}, not ${kind}`;
  if (kind === 'crash' && action !== 'crash') return `the agent answered ${action}, not crash`;
  return undefined;
}

export function responseLabel(r: ResponseSpec, localAction: string): string {
  switch (r.kind) {
    case 'inject':
      return `inject ${exceptionName(r.vector ?? GP, r.errorCode)}`;
    case 'crash':
      return 'crash';
    case 'pause':
    case 'quarantine':
      return `${localAction} + ${r.kind}`;
    default:
      return localAction;
  }
}

const MODULE_KEYS: Readonly<Record<string, keyof PolicySpec['modules']>> = {
  'kernel-code-integrity': 'kernelCodeIntegrity',
  'cr-pinning': 'crPinning',
  'syscall-msrs': 'syscallMsrs',
  'descriptor-tables': 'descriptorTables',
};

export function moduleResponse(spec: PolicySpec | undefined, module: string): ResponseSpec | undefined {
  const key = MODULE_KEYS[module];
  if (!spec || !key) return undefined;
  const m = spec.modules[key] as { response?: ResponseSpec } | undefined;
  return m?.response;
}

// ---------------------------------------------------------------- analysis side

export interface ResponseHost {
  readonly db: Db;
  readonly operations: VmOperations;
  readonly audit: AuditLog;
  specs(): readonly PolicySpec[];
  raiseAlert(detectionId: string, draft: AlertDraft): Promise<AlertRecord>;
  log(level: 'debug' | 'info' | 'warn' | 'error', msg: string, fields?: Record<string, unknown>): void;
}

interface Trap {
  readonly seq: number;
  readonly vector: number;
  readonly errorCode: number;
  readonly address: bigint;
  readonly rip: bigint;
  readonly atNs: bigint;
}

interface PendingInjection {
  readonly alertId: string;
  readonly seq: number;
  readonly finish: AuditFinish;
  readonly sinceMs: number;
}

const TRAP_KEEP = 32;
const INJECTION_WAIT_MS = 60_000;

/** Analysis's half of the responses: alert wording, pause/quarantine, the TRAP after an injection, audit. */
export class ResponseEngine {
  /** (VM, generation, vCPU) → TRAP events not matched yet / injections waiting for their TRAP. */
  private readonly traps = new Map<string, Trap[]>();
  private readonly waiting = new Map<string, PendingInjection[]>();
  /** VMs a response paused (and no resume since): a storm of detections sends one pause. */
  private readonly paused = new Set<string>();
  private readonly timers = new Set<NodeJS.Timeout>();
  private readonly offAudit: () => void;
  readonly stats = { injectionsConfirmed: 0, pauses: 0, quarantines: 0, crashes: 0, resumes: 0 };

  constructor(private readonly h: ResponseHost) {
    this.offAudit = h.audit.onRecord((e) => {
      if (e.action === 'resume-vm' && e.success) this.paused.delete(e.vm);
    });
  }

  stop(): void {
    this.offAudit();
    for (const t of this.timers) clearTimeout(t);
    this.timers.clear();
  }

  /** The response of the policy rule that raised a detection. */
  responseFor(ruleId: string): { policy: string; module: string; response: ResponseSpec } | undefined {
    const p = parseRuleId(ruleId);
    if (!p) return undefined;
    const spec = this.h.specs().find((s) => s.name === p.policy);
    const response = moduleResponse(spec, p.module);
    return response && response.kind !== 'deny' ? { policy: p.policy, module: p.module, response } : undefined;
  }

  /** Before the alert is stored: its action and title in the policy's words, and `evidence.response`. */
  adjustDraft(draft: AlertDraft): AlertDraft {
    const r = this.responseFor(draft.ruleId);
    if (!r) return draft;
    const notInForce = localResponseNotInForce(r.response.kind, draft.evidence.attributes, draft.action);
    if (notInForce) {
      // The agent answered with a policy without this response (it refused the install, or had not received
      // it yet): the alert says what really happened, and why the response did not.
      const response = { kind: r.response.kind, decidedAt: RESPONSE_DECIDED_AT[r.response.kind], policy: r.policy, status: `not applied: ${notInForce} (local policy v${draft.policyVersion}; \`periscope fleet\` shows why a host refused a policy)` };
      return { ...draft, evidence: { ...draft.evidence, response } as AlertDraft['evidence'] };
    }
    const action = responseLabel(r.response, draft.action);
    const response: Record<string, unknown> = { kind: r.response.kind, decidedAt: RESPONSE_DECIDED_AT[r.response.kind], policy: r.policy };
    if (r.response.kind === 'inject') Object.assign(response, { vector: r.response.vector ?? GP, exception: exceptionName(r.response.vector ?? GP, r.response.errorCode), errorCode: r.response.errorCode ?? null, trap: null });
    if (r.response.kind === 'pause' || r.response.kind === 'quarantine') Object.assign(response, { status: 'pending', ...(r.response.resumeAfterMs ? { resumeAfterMs: r.response.resumeAfterMs } : {}) });
    return {
      ...draft,
      action,
      dedupKey: draft.dedupKey.endsWith(`|${draft.action}`) ? `${draft.dedupKey.slice(0, -draft.action.length)}${action}` : `${draft.dedupKey}|${action}`,
      title: r.response.kind === 'inject' || r.response.kind === 'crash' ? draft.title.replace(/^Detected: /, 'Blocked: ') : draft.title,
      evidence: { ...draft.evidence, response } as AlertDraft['evidence'],
    };
  }

  /**
   * After a detection was stored (created or folded). Synchronous part first (an injection starts waiting
   * for its TRAP before any later link message is handled); the returned promise runs pause/quarantine.
   */
  afterDetection(d: Detection, alert: AlertRecord): Promise<void> {
    const r = this.responseFor(d.ruleId);
    if (!r || localResponseNotInForce(r.response.kind, d.attributes, alert.action)) return Promise.resolve();
    const uuid = uuidFromBytes(d.vmUuid);
    const vm = { uuid, hostId: d.hostId };
    const by = `policy:${r.policy} via agent:${d.hostId}`;
    const seq = d.event?.seq ?? d.eventSeqs[0] ?? 0;
    switch (r.response.kind) {
      case 'inject': {
        const finish = this.h.audit.record({
          by, action: 'inject-exception', target: `vm/${uuid}/vcpu/${d.vcpu}`, vm, vcpu: d.vcpu, reason: `response of ${d.ruleId} (alert ${alert.id})`,
          details: { vector: String(r.response.vector ?? GP), exception: exceptionName(r.response.vector ?? GP, r.response.errorCode), rule: d.ruleId, alert: alert.id, detection: d.detectionId },
        });
        this.expectTrap(`${uuid}|${d.sessionGeneration}|${d.vcpu}`, { alertId: alert.id, seq, finish, sinceMs: Date.now() });
        return Promise.resolve();
      }
      case 'crash': {
        const crashed = d.verdict?.action === EventAction.EVENT_ACTION_CRASH;
        this.stats.crashes++;
        this.h.audit.record({
          by, action: 'crash', target: `vm/${uuid}/vcpu/${d.vcpu}`, vm, vcpu: d.vcpu, reason: `response of ${d.ruleId} (alert ${alert.id})`,
          details: { rule: d.ruleId, alert: alert.id, detection: d.detectionId }, result: { result: crashed ? 'the agent replied CRASH' : 'the agent did not reply CRASH', success: crashed },
        });
        return Promise.resolve();
      }
      case 'pause':
      case 'quarantine':
        return this.pauseVm(uuid, r.policy, r.response, d, alert);
      default:
        return Promise.resolve();
    }
  }

  private async pauseVm(uuid: string, policy: string, resp: ResponseSpec, d: Detection, alert: AlertRecord): Promise<void> {
    const by = `policy:${policy}`;
    let status: string;
    if (this.paused.has(uuid)) status = 'already paused by a response';
    else {
      try {
        const r = await this.h.operations.run(uuid, 'pause', {}, by);
        status = `paused (${String(r['status'])})`;
        this.paused.add(uuid);
        this.stats.pauses++;
      } catch (e) {
        status = `pause failed: ${(e as Error).message}`;
        this.h.log('warn', 'pause response failed', { vm: uuid, rule: d.ruleId, error: (e as Error).message });
      }
    }
    await this.patchResponse(alert.id, { status, pausedNs: nowNs().toString() });
    if (resp.kind === 'quarantine') {
      this.stats.quarantines++;
      const q = await this.h.raiseAlert(`quarantine:${d.detectionId}`, {
        dedupKey: `${uuid}|responses/quarantine|${policy}`,
        severity: 'critical',
        title: `Quarantined: ${alert.vm.name || uuid} paused after ${alert.module}/${alert.ruleId.split('/')[2]?.split('#')[0] ?? alert.ruleId}`,
        description: `Policy ${policy} quarantines the VM on this detection: every vCPU is paused until an operator resumes it (periscope vm resume). Cause: alert ${alert.id} — ${alert.title}. Pause: ${status}.`,
        technique: { id: '', name: '' },
        module: 'responses',
        hostId: d.hostId,
        vmUuid: uuid,
        vmName: alert.vm.name,
        vcpu: d.vcpu,
        ruleId: `${policy}/responses/quarantine`,
        exceptionId: '',
        policyId: alert.policy.localId,
        policyVersion: alert.policy.version,
        policyName: policy,
        action: 'quarantine',
        tier: 'analysis',
        evidence: { attempt: { event: 'QUARANTINE', cause: alert.id, rule: alert.ruleId, pause: status }, registers: {}, sregs: {}, summary: `paused after ${alert.ruleId}`, attributes: { cause: alert.id }, session: d.sessionGeneration.toString(), seqs: [] },
        detectedNs: nowNs(),
      });
      await this.patchResponse(alert.id, { quarantineAlert: q.id });
    }
    if (resp.kind === 'pause' && resp.resumeAfterMs && status.startsWith('paused')) {
      const t = setTimeout(() => {
        this.timers.delete(t);
        void this.h.operations.run(uuid, 'resume', {}, by).then(
          (r) => {
            this.stats.resumes++;
            return this.patchResponse(alert.id, { resumed: `resumed after ${resp.resumeAfterMs} ms (${String(r['status'])})` });
          },
          (e: unknown) => this.h.log('warn', 'resume after a pause response failed', { vm: uuid, error: (e as Error).message }),
        );
      }, resp.resumeAfterMs);
      t.unref();
      this.timers.add(t);
    }
  }

  /** A reported event: TRAP events confirm injections (KVM sends one after every VCPU_INJECT_EXCEPTION). */
  onEvent(e: KvmiEvent): void {
    if (e.payload?.$case !== 'trap') return;
    const key = `${uuidFromBytes(e.vmUuid)}|${e.sessionGeneration}|${e.vcpu}`;
    const trap: Trap = { seq: e.seq, vector: e.payload.value.nr, errorCode: e.payload.value.errorCode, address: e.payload.value.address, rip: e.regs?.rip ?? 0n, atNs: e.receivedUnixNs || nowNs() };
    const w = this.waiting.get(key);
    const i = w ? w.findIndex((p) => p.seq < trap.seq) : -1;
    if (w && i >= 0) {
      const [p] = w.splice(i, 1);
      if (!w.length) this.waiting.delete(key);
      void this.confirm(p!, trap);
      return;
    }
    const list = this.traps.get(key) ?? [];
    list.push(trap);
    if (list.length > TRAP_KEEP) list.shift();
    this.traps.set(key, list);
  }

  private expectTrap(key: string, p: PendingInjection): void {
    const list = this.traps.get(key);
    const i = list ? list.findIndex((t) => t.seq > p.seq) : -1;
    if (list && i >= 0) {
      const [t] = list.splice(i, 1);
      void this.confirm(p, t!);
      return;
    }
    const now = Date.now();
    const w = (this.waiting.get(key) ?? []).filter((x) => {
      if (now - x.sinceMs < INJECTION_WAIT_MS) return true;
      x.finish('unconfirmed', `no TRAP event within ${INJECTION_WAIT_MS} ms`);
      return false;
    });
    w.push(p);
    this.waiting.set(key, w);
  }

  private async confirm(p: PendingInjection, t: Trap): Promise<void> {
    this.stats.injectionsConfirmed++;
    const trap = { vector: t.vector, exception: exceptionName(t.vector, t.errorCode), errorCode: t.errorCode, address: hex(t.address), rip: hex(t.rip), seq: t.seq };
    p.finish('ok', `KVM injected ${trap.exception} at ${trap.rip} (TRAP seq ${t.seq})`);
    await this.patchResponse(p.alertId, { trap });
  }

  /** Merge into the stored alert's `evidence.response`. */
  private async patchResponse(alertId: string, patch: Record<string, unknown>): Promise<void> {
    try {
      await this.h.db.query(
        `UPDATE alerts SET evidence = jsonb_set(evidence, '{response}', coalesce(evidence->'response', '{}'::jsonb) || $2::jsonb, true) WHERE alert_id = $1`,
        [alertId, JSON.stringify(patch)],
      );
    } catch (e) {
      this.h.log('warn', 'alert response not recorded', { alert: alertId, error: (e as Error).message });
    }
  }
}
