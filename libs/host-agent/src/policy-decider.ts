/**
 * The bridge from compiled local rules (`@periscope/verdicts`) to the agent's event decisions.
 * One evaluator per VM (its counters are per VM); the verdict is read in place from the event frame.
 *
 * The compiled policy may be a fixed `CompiledPolicy` or a holder whose `current` is swapped by policy
 * installs (a VM's evaluator is rebuilt on its next event after a swap). With `hooks` (the analysis
 * link) an ask-central rule may hold the event for a central verdict; without it, or with the link
 * down, the rule applies its default action at once.
 */
import { EventAction, events, structs, type VcpuEventView } from '@periscope/kvmi';
import { Evaluator, type CompiledPolicy, type Policy, type VcpuEventKind, type Verdict } from '@periscope/verdicts';
import type { Decide, EventDecision, ProtectionPlan } from './vm-connection.js';
import type { VmConnection } from './vm-connection.js';

export interface VerdictObserver {
  (vm: VmConnection, verdict: Verdict): void;
}

/** A policy that can be replaced while VMs are attached. */
export interface PolicySource {
  readonly current: CompiledPolicy;
}

export interface DeciderHooks {
  /** After evaluation, before the reply: a decision that replaces the verdict's (e.g. hold), or undefined. */
  onVerdict(vm: VmConnection, view: VcpuEventView, verdict: Verdict, compiled: CompiledPolicy): EventDecision | undefined;
}

export function policyDecider(policy: CompiledPolicy | PolicySource, observe?: VerdictObserver, hooks?: DeciderHooks): Decide {
  const evaluators = new WeakMap<VmConnection, Evaluator>();
  const source: PolicySource = 'current' in policy ? policy : { current: policy };
  return (view: VcpuEventView, vm: VmConnection): EventDecision => {
    const compiled = source.current;
    let ev = evaluators.get(vm);
    if (!ev || ev.compiled !== compiled) {
      ev = new Evaluator(compiled, { vmUuid: vm.uuid });
      evaluators.set(vm, ev);
    }
    const v = ev.evaluate(view);
    observe?.(vm, v);
    if (hooks) {
      const d = hooks.onVerdict(vm, view, v, compiled);
      if (d) return d;
    }
    const ruleId = v.ruleId ?? undefined;
    switch (v.kind) {
      case 'skip':
        return { kind: 'skip', fallback: EventAction.CONTINUE, ...(ruleId ? { ruleId } : {}) };
      case 'inject': {
        // #PF: CR2 = the faulting linear address.
        const address = view.eventId === events.PF.id ? view.specificU64(structs.kvmi_vcpu_event_pf, 'gva') : 0n;
        // CR/MSR accept no RETRY: CONTINUE with the old value (the write is refused), RIP moved back over the
        // instruction so that the exception is delivered at it (verdicts `injectReplyAction`).
        if (v.hasNewVal && v.newVal !== null) {
          return { kind: 'inject', vector: v.injectVector, errorCode: Math.max(0, v.injectErrorCode), address, then: EventAction.CONTINUE, newVal: v.newVal, rewind: true, ...(ruleId ? { ruleId } : {}) };
        }
        return { kind: 'inject', vector: v.injectVector, errorCode: Math.max(0, v.injectErrorCode), address, then: EventAction.RETRY, ...(ruleId ? { ruleId } : {}) };
      }
      default:
        return { kind: 'reply', action: v.action, ...(v.hasNewVal && v.newVal !== null ? { newVal: v.newVal } : {}), ...(ruleId ? { ruleId } : {}) };
    }
  };
}

/** What KVM must be asked for, from the policy's interception section (or derived from its rules). */
export function planFromPolicy(interception: { events: readonly string[]; crs: readonly number[]; msrs: readonly number[] }, pageAccess: ProtectionPlan['pageAccess'] = []): ProtectionPlan {
  const vcpuEvents = interception.events.filter((e): e is ProtectionPlan['vcpuEvents'][number] => e in events);
  return { vcpuEvents, crs: [...interception.crs], msrs: [...interception.msrs], pageAccess };
}

/**
 * Whether `policy` needs exits of `kind` from the VM `vmUuid`: a default action for the kind is not allow, or a
 * rule about the kind applies to this VM (no `vms`, or the VM listed). The interception section is host-wide:
 * when rules about the kind exist they say which VMs need it (analysis derives the section from its rules, and
 * breakpoint tracing's rules list the traced VMs); a kind the section names without any rule about it is
 * needed everywhere. Used to keep BREAKPOINT interception to traced VMs and turn it off once a VM's last trace
 * stopped (host-agent.ts).
 */
export function policyNeedsEvent(policy: Policy, kind: VcpuEventKind, vmUuid: string): boolean {
  const byDefault = policy.defaultActions?.[kind];
  if (byDefault && byDefault.kind !== 'allow') return true;
  const uuid = vmUuid.toLowerCase();
  const about = policy.rules.filter((r) => r.match.kind === kind);
  if (about.some((r) => !r.match.vms?.length || r.match.vms.some((v) => v.toLowerCase() === uuid))) return true;
  return about.length === 0 && (policy.interception?.events.includes(kind) ?? false);
}
