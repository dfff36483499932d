/**
 * The bridge from compiled local rules (`@periscope/verdicts`) to the agent's event decisions.
 * One evaluator per VM (its counters are per VM); the verdict is read in place from the event frame.
 *
 * Ask-central is part 2 (issue #7): until the analysis link exists, an ask-central rule applies its
 * default action at once — the same outcome as a deadline expiring with central unreachable.
 */
import { EventAction, events, structs, type VcpuEventView } from '@periscope/kvmi';
import { Evaluator, type CompiledPolicy, type Verdict } from '@periscope/verdicts';
import type { Decide, EventDecision, ProtectionPlan } from './vm-connection.js';
import type { VmConnection } from './vm-connection.js';

export interface VerdictObserver {
  (vm: VmConnection, verdict: Verdict): void;
}

export function policyDecider(compiled: CompiledPolicy, observe?: VerdictObserver): Decide {
  const evaluators = new WeakMap<VmConnection, Evaluator>();
  return (view: VcpuEventView, vm: VmConnection): EventDecision => {
    let ev = evaluators.get(vm);
    if (!ev) {
      ev = new Evaluator(compiled, { vmUuid: vm.uuid });
      evaluators.set(vm, ev);
    }
    const v = ev.evaluate(view);
    observe?.(vm, v);
    const ruleId = v.ruleId ?? undefined;
    switch (v.kind) {
      case 'skip':
        return { kind: 'skip', fallback: EventAction.CONTINUE, ...(ruleId ? { ruleId } : {}) };
      case 'inject': {
        // #PF: CR2 = the faulting linear address.
        const address = view.eventId === events.PF.id ? view.specificU64(structs.kvmi_vcpu_event_pf, 'gva') : 0n;
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
