/**
 * Central verdicts: the answers analysis gives to events a host agent holds for it (an ask-central rule;
 * the vCPU waits, with a deadline and a default at the agent — docs/ARCHITECTURE.md "Ask central").
 *
 * A module claims the held events it is responsible for and answers them itself, possibly after sending
 * commands while the vCPU waits (breakpoint tracing claims the BREAKPOINT and SINGLESTEP events of VMs it
 * traces and the PAUSE events it caused: tracing.ts). An event no module claims is let through at once —
 * CONTINUE, keeping the guest's value — rather than left to wait for the agent's deadline.
 *
 * Claims run on the link's message chain and must return at once; the work that follows runs on later
 * turns (a claim that awaited a command result would deadlock: results arrive on that same chain).
 */
import { Decision, EventAction, uuidFromBytes, type KvmiEvent } from '@periscope/contracts';
import type { AgentSession, LiveVm } from './link.js';
import type { Metric } from './metrics.js';

/** One held event, as a module sees it. */
export interface HeldEvent {
  readonly session: AgentSession;
  readonly event: KvmiEvent;
  readonly vmUuid: string;
  /** The live VM of this session (undefined when it detached meanwhile). */
  readonly vm: LiveVm | undefined;
  /** `BREAKPOINT`, `SINGLESTEP`, `PAUSE`, … (the payload case, upper case). */
  readonly kind: string;
}

/** Returns true when the module takes the event (and will answer it, or deliberately leave it to the agent's default). */
export type HeldEventClaim = (h: HeldEvent) => boolean;

export type VerdictAction = 'continue' | 'retry' | 'crash';

const ACTION: Record<VerdictAction, EventAction> = {
  continue: EventAction.EVENT_ACTION_CONTINUE,
  retry: EventAction.EVENT_ACTION_RETRY,
  crash: EventAction.EVENT_ACTION_CRASH,
};

/** Send the verdict for a held event (CR/MSR CONTINUE keeps the guest's new value). */
export function sendVerdict(s: AgentSession, e: KvmiEvent, action: VerdictAction, ruleId: string): void {
  s.send({
    $case: 'verdict',
    value: {
      vmUuid: e.vmUuid,
      sessionGeneration: e.sessionGeneration,
      seq: e.seq,
      decision: Decision.fromPartial({ action: ACTION[action], ...(action === 'continue' ? { replyValue: { policy: { $case: 'keepNew', value: {} } } } : {}) }),
      ruleId,
      detectionId: '',
    },
  });
}

export class CentralVerdicts {
  private readonly claims: { readonly module: string; readonly claim: HeldEventClaim }[] = [];

  constructor(private readonly answered: Metric) {}

  /** Register a module's claim (asked in registration order; the first that claims takes the event). */
  register(module: string, claim: HeldEventClaim): void {
    this.claims.push({ module, claim });
  }

  /** A held event arrived: a module takes it, or it is let through at once. */
  dispatch(session: AgentSession, event: KvmiEvent): string {
    const vmUuid = uuidFromBytes(event.vmUuid);
    const h: HeldEvent = { session, event, vmUuid, vm: session.vms.get(vmUuid), kind: event.payload ? event.payload.$case.toUpperCase() : 'UNKNOWN' };
    for (const c of this.claims) {
      if (c.claim(h)) {
        this.answered.inc({ module: c.module });
        return c.module;
      }
    }
    this.answered.inc({ module: 'default' });
    sendVerdict(session, event, 'continue', 'analysis/central-default');
    return 'default';
  }
}
