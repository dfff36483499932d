/**
 * Agent detection → alert draft: title, technique, the attempt (old/new value, address, access,
 * instruction), registers, action and tier, policy and rule. 64-bit values become 0x-hex strings.
 */
import {
  descriptorTableKindToJSON,
  eventActionToJSON,
  uuidFromBytes,
  verdictTierToJSON,
  type Detection,
  type KvmiEvent,
  type Registers,
  type SpecialRegisters,
  type VerdictRecord,
} from '@periscope/contracts';
import { parseRuleId } from './modules.js';
import { MSR_NAMES } from './policy.js';
import { severityName, type AlertDraft, type AlertEvidence, type SeverityName } from './store.js';
import { techniqueOf } from './techniques.js';

export const hex = (v: bigint | number): string => `0x${v.toString(16)}`;
const MSR_BY_INDEX = new Map(Object.entries(MSR_NAMES).map(([k, v]) => [v, k]));
const ACCESS = (a: number): string => `${a & 1 ? 'r' : ''}${a & 2 ? 'w' : ''}${a & 4 ? 'x' : ''}` || '-';

export function registersJson(r: Registers | undefined): Record<string, string> {
  if (!r) return {};
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(r)) if (typeof v === 'bigint') out[k] = hex(v);
  return out;
}

export function sregsJson(s: SpecialRegisters | undefined, e: KvmiEvent | undefined): Record<string, string> {
  const out: Record<string, string> = {};
  if (s) {
    for (const k of ['cr0', 'cr2', 'cr3', 'cr4', 'efer'] as const) {
      const v = (s as unknown as Record<string, unknown>)[k];
      if (typeof v === 'bigint') out[k] = hex(v);
    }
    if (s.idt) out['idtr'] = `${hex(s.idt.base)}/${hex(s.idt.limit)}`;
    if (s.gdt) out['gdtr'] = `${hex(s.gdt.base)}/${hex(s.gdt.limit)}`;
  }
  if (e?.msrs) out['lstar'] = hex(e.msrs.lstar);
  return out;
}

/** The event's kind and data, as the alert's "attempt". */
export function attemptOf(e: KvmiEvent | undefined): Record<string, unknown> {
  if (!e?.payload) return {};
  const p = e.payload;
  const base: Record<string, unknown> = { event: p.$case.toUpperCase(), rip: e.regs ? hex(e.regs.rip) : undefined };
  switch (p.$case) {
    case 'cr':
      return { ...base, register: `cr${p.value.cr}`, cr: p.value.cr, old: hex(p.value.oldValue), new: hex(p.value.newValue) };
    case 'msr':
      return { ...base, register: MSR_BY_INDEX.get(p.value.msr) ?? hex(p.value.msr), msr: hex(p.value.msr), old: hex(p.value.oldValue), new: hex(p.value.newValue) };
    case 'pf':
      return { ...base, gva: hex(p.value.gva), gpa: hex(p.value.gpa), access: ACCESS(p.value.access) };
    case 'descriptor':
      return { ...base, descriptor: descriptorTableKindToJSON(p.value.descriptor).replace('DESCRIPTOR_TABLE_KIND_', ''), write: p.value.write };
    case 'breakpoint':
      return { ...base, gpa: hex(p.value.gpa), insnLen: p.value.insnLen };
    case 'xsetbv':
      return { ...base, xcr: p.value.xcr, old: hex(p.value.oldValue), new: hex(p.value.newValue) };
    case 'trap':
      return { ...base, vector: p.value.nr, errorCode: p.value.errorCode, address: hex(p.value.address) };
    default:
      return base;
  }
}

/** What the agent did, in the policy's words: allow, deny, skip, crash, … */
export function actionOf(v: VerdictRecord | undefined, e: KvmiEvent | undefined): string {
  if (!v) return 'unknown';
  const a = eventActionToJSON(v.action).replace('EVENT_ACTION_', '').toLowerCase();
  if (a === 'crash') return 'crash';
  if (a === 'retry') return e?.payload?.$case === 'pf' || e?.payload?.$case === 'descriptor' || e?.payload?.$case === 'breakpoint' ? 'skip' : 'retry';
  if (a === 'continue') {
    const p = e?.payload;
    if (p && (p.$case === 'cr' || p.$case === 'msr') && v.replyValue !== undefined) {
      if (v.replyValue === p.value.newValue) return 'allow';
      if (v.replyValue === p.value.oldValue) return 'deny';
      return 'deny (pinned bits forced)';
    }
    return 'allow';
  }
  return a;
}

/** Victim identity used for storm aggregation (same VM, rule and victim = one alert). */
function victimKey(e: KvmiEvent | undefined): string {
  const p = e?.payload;
  if (!p) return '';
  switch (p.$case) {
    case 'pf':
      return `gpa:${hex(p.value.gpa & ~0xfffn)}`;
    case 'cr':
      return `cr${p.value.cr}`;
    case 'msr':
      return `msr:${hex(p.value.msr)}`;
    case 'descriptor':
      return `desc:${p.value.descriptor}`;
    default:
      return p.$case;
  }
}

const BLOCKED = new Set(['deny', 'deny (pinned bits forced)', 'skip', 'crash']);

export function draftFromDetection(d: Detection, vmName: string): AlertDraft {
  const vmUuid = uuidFromBytes(d.vmUuid);
  const parsed = parseRuleId(d.ruleId);
  const module = parsed?.module ?? '';
  const rule = parsed?.rule ?? d.ruleId;
  const tech = techniqueOf(module, rule);
  const e = d.event;
  const attempt = attemptOf(e);
  if (d.instructionBytes.length || d.instructionText) attempt['instruction'] = { bytes: Buffer.from(d.instructionBytes).toString('hex'), text: d.instructionText };
  const action = actionOf(d.verdict, e);
  const tier = d.verdict ? verdictTierToJSON(d.verdict.tier).replace('VERDICT_TIER_', '').toLowerCase() : 'unknown';
  const severity: SeverityName = severityName(d.severity || 1);
  const what = tech?.why ?? (d.summary || d.ruleId);
  const evidence: AlertEvidence = {
    attempt,
    registers: registersJson(e?.regs),
    sregs: sregsJson(e?.sregs, e),
    summary: d.summary,
    attributes: { ...d.attributes },
    session: d.sessionGeneration.toString(),
    seqs: [...d.eventSeqs],
  };
  return {
    dedupKey: `${vmUuid}|${module}/${rule}|${victimKey(e)}|${e?.regs ? hex(e.regs.rip) : ''}|${action}`,
    severity,
    title: `${BLOCKED.has(action) ? 'Blocked' : 'Detected'}: ${what} on ${vmName || vmUuid}${d.vcpu !== undefined ? ` vCPU ${d.vcpu}` : ''}`,
    description: d.summary || what,
    technique: { id: tech?.id ?? '', name: tech?.name ?? '' },
    module,
    hostId: d.hostId,
    vmUuid,
    vmName,
    vcpu: e || d.vcpu ? d.vcpu : d.vcpu,
    ruleId: d.ruleId,
    exceptionId: d.verdict?.exceptionId ?? '',
    policyId: d.policyId,
    policyVersion: d.policyVersion,
    policyName: parsed?.policy ?? '',
    action,
    tier,
    evidence,
    detectedNs: d.detectedUnixNs || BigInt(Date.now()) * 1_000_000n,
  };
}
