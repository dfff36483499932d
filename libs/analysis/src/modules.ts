/**
 * Protection modules → one local policy per host (a `periscope.verdicts/v1` document, compiled and validated
 * with @periscope/verdicts before it is sent). Each module decides:
 * - what to command at attach (kernel code integrity: derive the KASLR slide, write-protect pages),
 * - which local rules to push down (rules scoped to the VMs its policy selects),
 * - what to alert on (rules with a severity raise agent detections; alerts are built from them).
 *
 * Rule ids are `POLICY/MODULE/RULE`, per-VM rules `POLICY/MODULE/RULE#VM-UUID`; alerts, exceptions and
 * the ATT&CK mapping (techniques.ts) key on `MODULE/RULE`.
 */
import { compilePolicy, deriveInterception, formatPolicy, type Action, type EventMatch, type Policy, type PolicyException, type Rule, type U64Range } from '@periscope/verdicts';
import { AnalysisError } from './errors.js';
import type { ModuleName, PolicySpec } from './policy.js';
import { choosePolicy, MSR_NAMES } from './policy.js';
import { sectionGpaRange, symbolPageRange, symbolRipRange, type GuestOsProfile, type KernelFacts, type ProfileRegistry } from './profiles.js';
import { localAction, type ResponseSpec } from './responses.js';

export const LOCAL_POLICY_ID = 'periscope-analysis';
const ALL_ONES = 0xffff_ffff_ffff_ffffn;
const EFER_NXE = 1n << 11n;
const W = 2;
const REPORT_EVENT = { mode: 'always', withEvent: true } as const;
const REPORT_NEVER = { mode: 'never' } as const;
/** Operator exceptions: no detection (silenced), but a verdict record per event (audit of what was let through). */
const REPORT_VERDICT = { mode: 'always' } as const;

/** An operator exception (allow-list entry), stored in the database, compiled per host. */
export interface ExceptionSpec {
  readonly id: string;
  readonly policy: string;
  readonly module: ModuleName;
  /** Rule within the module (`text`, `cr4`, `entry`, …). */
  readonly rule: string;
  /** VM UUIDs; empty = every VM of the policy. */
  readonly vms: readonly string[];
  /** Who writes: a RIP range, or a kernel symbol of the profile (resolved per VM with its slide). */
  readonly originator: { readonly rip?: U64Range; readonly symbol?: string };
  /** What is written. */
  readonly victim: {
    readonly gpa?: U64Range;
    readonly gva?: U64Range;
    readonly cr?: number;
    readonly msr?: number;
    readonly descriptor?: 'IDTR' | 'GDTR';
    readonly newValue?: bigint;
  };
  readonly action: 'allow';
  /** Unix ns; 0 = never. */
  readonly expiresNs: bigint;
  readonly reason: string;
  readonly createdBy: string;
  readonly fromAlertId?: string;
}

export interface VmView {
  readonly uuid: string;
  readonly name: string;
  readonly hostId: string;
  readonly labels: Readonly<Record<string, string>>;
  /** Present once kernel code integrity derived the slide for the current boot. */
  readonly facts?: KernelFacts;
}

export interface HostPolicy {
  readonly policy: Policy;
  /** The verdicts document sent as `LocalPolicy.verdicts_document`. */
  readonly document: string;
  /** Digest of the document without its version (to skip identical re-installs). */
  readonly contentKey: string;
  /** VM UUID → policy name. */
  readonly assignments: ReadonlyMap<string, string>;
  readonly warnings: readonly string[];
}

export interface ParsedRuleId {
  readonly policy: string;
  readonly module: string;
  readonly rule: string;
  readonly vm?: string;
}

export function parseRuleId(id: string): ParsedRuleId | undefined {
  const m = /^([^/]+)\/([^/]+)\/([^#]+)(?:#(.+))?$/.exec(id);
  if (!m) return undefined;
  return { policy: m[1]!, module: m[2]!, rule: m[3]!, ...(m[4] ? { vm: m[4] } : {}) };
}

/** The rule action of a module: allow (report), its deny, or what its response decides locally (inject, crash). */
const act = (a: 'deny' | 'report', deny: Action, response?: ResponseSpec): Action => (a === 'deny' ? localAction(response, deny) : { kind: 'allow' });

function rangesOf(rs: readonly { start: bigint; end: bigint }[]): U64Range[] {
  const sorted = [...rs].sort((a, b) => (a.start < b.start ? -1 : 1));
  const out: { start: bigint; end: bigint }[] = [];
  for (const r of sorted) {
    const last = out[out.length - 1];
    if (last && r.start <= last.end) last.end = r.end > last.end ? r.end : last.end;
    else out.push({ ...r });
  }
  return out;
}

/** Physical ranges kernel code integrity write-protects for one VM, by rule (`text`, `rodata`, `data`). */
export function protectedRanges(spec: PolicySpec, facts: KernelFacts, profiles: ProfileRegistry): Map<'text' | 'rodata' | 'data', U64Range[]> {
  const kci = spec.modules.kernelCodeIntegrity;
  const out = new Map<'text' | 'rodata' | 'data', U64Range[]>();
  if (!kci) return out;
  const profile = profiles.get(facts.profile);
  if (!profile) throw new AnalysisError('bad-profile', `unknown guest OS profile ${facts.profile}`);
  const text: U64Range[] = [];
  const ro: U64Range[] = [];
  for (const s of kci.sections) (s === '.text' ? text : ro).push(sectionGpaRange(profile, facts, s));
  if (text.length) out.set('text', rangesOf(text));
  if (ro.length) out.set('rodata', rangesOf(ro));
  if (kci.protectedData && profile.protectedData.length) out.set('data', rangesOf(profile.protectedData.map((s) => symbolPageRange(profile, facts, s))));
  return out;
}

/** Build, compile and render the local policy of one host. Throws `compile-failed` if verdicts rejects it. */
export function buildHostPolicy(args: {
  readonly policies: readonly PolicySpec[];
  readonly exceptions: readonly ExceptionSpec[];
  readonly vms: readonly VmView[];
  readonly profiles: ProfileRegistry;
  readonly version: bigint;
  /** Rules of modules that are not policy driven (breakpoint tracing's ask-central rules, tracing.ts). */
  readonly extraRules?: readonly Rule[];
}): HostPolicy {
  const warnings: string[] = [];
  const assignments = new Map<string, string>();
  const byPolicy = new Map<string, { spec: PolicySpec; vms: VmView[] }>();
  for (const vm of [...args.vms].sort((a, b) => a.uuid.localeCompare(b.uuid))) {
    const p = choosePolicy(args.policies, vm);
    if (!p) continue;
    assignments.set(vm.uuid, p.name);
    let g = byPolicy.get(p.name);
    if (!g) byPolicy.set(p.name, (g = { spec: p, vms: [] }));
    g.vms.push(vm);
  }
  const rules: Rule[] = [];
  const exceptions: PolicyException[] = [];
  for (const { spec, vms } of [...byPolicy.values()].sort((a, b) => a.spec.priority - b.spec.priority || a.spec.name.localeCompare(b.spec.name))) {
    const P = spec.name;
    const uuids = vms.map((v) => v.uuid);
    const m = spec.modules;
    if (m.crPinning) {
      const c = m.crPinning;
      if (c.cr0) rules.push({ id: `${P}/cr-pinning/cr0`, description: 'CR0 write clearing a pinned bit', match: { kind: 'CR', vms: uuids, cr: [0], clears: c.cr0 }, action: act(c.action, { kind: 'deny', forceBits: c.cr0 }, c.response), report: REPORT_EVENT, severity: c.severity });
      if (c.cr4) rules.push({ id: `${P}/cr-pinning/cr4`, description: 'CR4 write clearing a pinned bit', match: { kind: 'CR', vms: uuids, cr: [4], clears: c.cr4 }, action: act(c.action, { kind: 'deny', forceBits: c.cr4 }, c.response), report: REPORT_EVENT, severity: c.severity });
    }
    if (m.syscallMsrs) {
      const s = m.syscallMsrs;
      if (s.msrs.length) {
        const id = `${P}/syscall-msrs/entry`;
        rules.push({ id, description: 'system-call entry MSR rewritten after boot', match: { kind: 'MSR', vms: uuids, msr: s.msrs, changes: ALL_ONES }, action: act(s.action, { kind: 'deny' }, s.response), report: REPORT_EVENT, severity: s.severity });
        // The profile's boot-done condition (docs/profiles.md): a vCPU's MSR still at its unset value has not
        // been initialised by the kernel yet.
        const unset = bootDoneOf(args.profiles, spec).syscallMsrUnsetValue;
        exceptions.push({ id: `${P}/syscall-msrs/boot`, rules: [id], match: { kind: 'MSR', vms: uuids, old: { mask: ALL_ONES, value: unset } }, action: { kind: 'allow' }, report: REPORT_NEVER, reason: `boot-time initialisation (old value 0x${unset.toString(16)}, profile ${spec.profile})`, createdBy: 'module:syscall-msrs' });
      }
      if (s.eferNxe) rules.push({ id: `${P}/syscall-msrs/efer-nxe`, description: 'EFER write clearing NXE', match: { kind: 'MSR', vms: uuids, msr: [MSR_NAMES['EFER']!], clears: EFER_NXE }, action: act(s.action, { kind: 'deny', forceBits: EFER_NXE }, s.response), report: REPORT_EVENT, severity: s.severity });
    }
    if (m.descriptorTables) {
      const d = m.descriptorTables;
      for (const t of d.tables) {
        const id = `${P}/descriptor-tables/${t.toLowerCase()}`;
        rules.push({ id, description: `${t} load after boot`, match: { kind: 'DESCRIPTOR', vms: uuids, descriptor: [t === 'IDTR' ? 1 : 2], write: true }, action: act(d.action, { kind: 'skip' }, d.response), report: REPORT_EVENT, severity: d.severity });
        const below = bootDoneOf(args.profiles, spec).firmwareRipBelow;
        exceptions.push({ id: `${id}-firmware`, rules: [id], match: { kind: 'DESCRIPTOR', vms: uuids, rip: [{ start: 0n, end: below }] }, action: { kind: 'allow' }, report: REPORT_NEVER, reason: `firmware and boot loaders below RIP 0x${below.toString(16)} (boot not done; profile ${spec.profile})`, createdBy: 'module:descriptor-tables' });
      }
    }
    if (m.kernelCodeIntegrity) {
      const k = m.kernelCodeIntegrity;
      for (const vm of vms) {
        if (!vm.facts) continue; // not derived yet: the pages are not restricted either, so no PF can come
        const profile = args.profiles.get(vm.facts.profile);
        if (!profile) {
          warnings.push(`VM ${vm.name}: unknown profile ${vm.facts.profile}`);
          continue;
        }
        const ranges = protectedRanges(spec, vm.facts, args.profiles);
        const ids: string[] = [];
        for (const [rule, gpa] of ranges) {
          const id = `${P}/kernel-code-integrity/${rule}#${vm.uuid}`;
          ids.push(id);
          rules.push({ id, description: `write to write-protected kernel ${rule} (per GPA)`, match: { kind: 'PF', vms: [vm.uuid], access: W, gpa }, action: act(k.action, { kind: 'skip' }, k.response), report: REPORT_EVENT, severity: k.severity });
        }
        const writers = k.allowWriters.filter((s) => profile.symbols.has(s)).map((s) => symbolRipRange(profile, vm.facts!, s));
        if (writers.length && ids.length) {
          exceptions.push({ id: `${P}/kernel-code-integrity/writers#${vm.uuid}`, rules: ids, match: { kind: 'PF', vms: [vm.uuid], rip: rangesOf(writers) }, action: { kind: 'allow' }, report: REPORT_NEVER, reason: `allowed writers: ${k.allowWriters.join(', ')}`, createdBy: 'module:kernel-code-integrity' });
        }
      }
    }
    // An inject response: the TRAP event KVM sends after the injection is reported (its vector goes into the alert).
    if ([m.crPinning, m.syscallMsrs, m.descriptorTables, m.kernelCodeIntegrity].some((x) => x?.action === 'deny' && x.response?.kind === 'inject')) {
      rules.push({ id: `${P}/responses/trap`, description: 'what KVM injected after an inject response', match: { kind: 'TRAP', vms: uuids }, action: { kind: 'allow' }, report: REPORT_EVENT });
    }
    // Operator exceptions of this policy.
    for (const e of args.exceptions) {
      if (e.policy !== P) continue;
      const targets = rules.filter((r) => {
        const p = parseRuleId(r.id);
        return p !== undefined && p.policy === P && p.module === e.module && p.rule === e.rule && (!p.vm || !e.vms.length || e.vms.includes(p.vm));
      });
      if (!targets.length) {
        warnings.push(`exception ${e.id}: no rule ${P}/${e.module}/${e.rule} for the VMs on this host`);
        continue;
      }
      const scope = vms.filter((v) => !e.vms.length || e.vms.includes(v.uuid));
      if (!scope.length) continue;
      const kind = targets[0]!.match.kind;
      const base: { -readonly [K in keyof EventMatch]: EventMatch[K] } = { ...(kind ? { kind } : {}) };
      if (e.victim.gpa) base.gpa = [e.victim.gpa];
      if (e.victim.gva) base.gva = [e.victim.gva];
      if (e.victim.cr !== undefined) base.cr = [e.victim.cr];
      if (e.victim.msr !== undefined) base.msr = [e.victim.msr];
      if (e.victim.descriptor) base.descriptor = [e.victim.descriptor === 'IDTR' ? 1 : 2];
      if (e.victim.newValue !== undefined) base.new = { mask: ALL_ONES, value: e.victim.newValue };
      const common = { rules: targets.map((t) => t.id), action: { kind: 'allow' } as Action, report: REPORT_VERDICT, ...(e.expiresNs ? { expiresUnixNs: e.expiresNs } : {}), reason: e.reason, createdBy: e.createdBy };
      if (e.originator.symbol) {
        for (const vm of scope) {
          const profile = vm.facts ? args.profiles.get(vm.facts.profile) : undefined;
          if (!vm.facts || !profile || !profile.symbols.has(e.originator.symbol)) {
            warnings.push(`exception ${e.id}: ${e.originator.symbol} cannot be resolved for VM ${vm.name} (no derived kernel)`);
            continue;
          }
          exceptions.push({ id: `exception/${e.id}#${vm.uuid}`, ...common, match: { ...base, vms: [vm.uuid], rip: [symbolRipRange(profile, vm.facts, e.originator.symbol)] } });
        }
      } else {
        exceptions.push({ id: `exception/${e.id}`, ...common, match: { ...base, vms: scope.map((v) => v.uuid), ...(e.originator.rip ? { rip: [e.originator.rip] } : {}) } });
      }
    }
  }
  rules.push(...(args.extraRules ?? []));
  // Operator exceptions go first: they are narrower than the modules' own.
  exceptions.sort((a, b) => Number(b.id.startsWith('exception/')) - Number(a.id.startsWith('exception/')));
  const draft: Policy = {
    id: LOCAL_POLICY_ID,
    version: args.version,
    description: `compiled by analysis from ${[...byPolicy.keys()].join(', ') || 'no policy'}`,
    defaultAction: { kind: 'allow' },
    defaultReport: REPORT_NEVER,
    // Breakpoint tracing's steps take a few round trips to analysis: its rules ask for up to 1 s.
    maxAskCentralDeadlineMs: args.extraRules?.some((r) => r.askCentral) ? 1000 : 20,
    rules,
    exceptions,
  };
  const derived = deriveInterception(draft);
  // PF is enabled as soon as a policy has kernel code integrity, before any page is restricted.
  const needsPf = [...byPolicy.values()].some((g) => g.spec.modules.kernelCodeIntegrity) && !derived.events.includes('PF');
  const policy: Policy = { ...draft, interception: { ...derived, events: needsPf ? [...derived.events, 'PF'] : derived.events } };
  try {
    compilePolicy(policy);
  } catch (e) {
    throw new AnalysisError('compile-failed', `the compiled local policy does not compile: ${(e as Error).message}`, { cause: e });
  }
  const document = formatPolicy(policy);
  const contentKey = formatPolicy({ ...policy, version: 0n });
  return { policy, document, contentKey, assignments, warnings };
}

/** The boot-done condition of the policy's guest OS profile (docs/profiles.md); a policy names a known profile. */
function bootDoneOf(profiles: ProfileRegistry, spec: PolicySpec): GuestOsProfile['bootDone'] {
  const p = profiles.get(spec.profile);
  if (!p) throw new AnalysisError('bad-profile', `policy ${spec.name}: unknown guest OS profile ${spec.profile}`);
  return p.bootDone;
}
