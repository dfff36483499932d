/**
 * Types shared by the simulated VM, its vCPUs and the public API.
 */
import type { EventActionName, EventKey } from '@periscope/kvmi';

/** How one vCPU event ended, from the vCPU's point of view. */
export type EventOutcome =
  /** A valid reply with a supported action (`newVal` for CR/MSR, zero-filled when short). */
  | { kind: 'reply'; action: EventActionName; newVal: bigint | null }
  /** A valid reply with an action the event does not support: socket shut down, not-CONTINUE path. */
  | { kind: 'unsupported-action'; action: number }
  /** A bad reply (§5.3): socket shut down, the vCPU continues as with CONTINUE, no reply data. */
  | { kind: 'hard-error'; reason: string }
  /** The event could not be sent (connection gone): counts as CONTINUE. */
  | { kind: 'send-failed' }
  /** The wait was dropped by the connection-loss release job or by UNHOOK: counts as CONTINUE. */
  | { kind: 'released' };

/** `ended` of an event record. */
export type EventEnd = EventActionName | 'unsupported-action' | 'hard-error' | 'send-failed' | 'released';

export interface EventRecord {
  event: EventKey;
  /** Wire seq (0 when the event could not be sent). */
  seq: number;
  ended: EventEnd;
}

export function endOf(o: EventOutcome): EventEnd {
  return o.kind === 'reply' ? o.action : o.kind;
}

/** True for outcomes after which KVM proceeds exactly as for CONTINUE (§3.3 last paragraph, §5.3). */
export function actsAsContinue(o: EventOutcome): boolean {
  return (o.kind === 'reply' && o.action === 'CONTINUE') || o.kind === 'hard-error' || o.kind === 'send-failed' || o.kind === 'released';
}

/**
 * What a guest instruction ended as.
 * - `completed`: executed (possibly emulated by KVM after a CONTINUE).
 * - `gp`: the instruction faulted with #GP (refused CR/MSR write, invalid XCR0, unknown MSR).
 * - `retry`: KVM re-entered the guest without executing it (RETRY, or the not-CONTINUE path of
 *   BREAKPOINT/DESCRIPTOR/PF); the same instruction would run again.
 * - `exception`: an exception was delivered to the guest (`vector`; #BP for INT3).
 * - `page-fault`: the guest's own page tables do not map the address (#PF, CR2 = gva).
 * - `mmio`: the gpa is not backed by a memslot (an exit to the device manager).
 * - `userspace-exit`: #BP taken by userspace guest debugging.
 * - `vcpu-offline` / `vcpu-crashed`: the vCPU does not run guest code.
 */
export type GuestOutcome =
  | 'completed'
  | 'gp'
  | 'retry'
  | 'exception'
  | 'page-fault'
  | 'mmio'
  | 'userspace-exit'
  | 'vcpu-offline'
  | 'vcpu-crashed';

export interface GuestResult {
  outcome: GuestOutcome;
  /** KVMI events raised while executing it (a pending TRAP, the instruction's event, SINGLESTEP), in order. */
  events: EventRecord[];
  /** CR/MSR/XCR0 value now in the register; RAX after a VMCALL. */
  value?: bigint;
  /** Bytes read by a read access. */
  data?: Uint8Array;
  /** Exception vector delivered to the guest (`gp` → 13, `page-fault` → 14, `exception`). */
  vector?: number;
  /** The vCPU took a CRASH action and no longer runs guest code (unconfirmed.ts `crash-action`). */
  crashed: boolean;
}

export interface VmStats {
  hooks: number;
  unhooks: number;
  connectionLosses: number;
  /** Connection losses caused by a protocol error (§10), including bad event replies. */
  hardErrors: number;
  messagesReceived: number;
  commandsExecuted: number;
  errorReplies: number;
  eventsSent: number;
  eventReplies: number;
  /** Events whose reply took longer than the stall threshold. */
  stalls: number;
  /** Longest wait for an event reply, ms. */
  maxReplyWaitMs: number;
  /** Exceptions thrown by simulator code (a bug); each also drops the connection. */
  internalErrors: number;
  lastLossReason: string | undefined;
}

export function newVmStats(): VmStats {
  return {
    hooks: 0, unhooks: 0, connectionLosses: 0, hardErrors: 0, messagesReceived: 0, commandsExecuted: 0,
    errorReplies: 0, eventsSent: 0, eventReplies: 0, stalls: 0, maxReplyWaitMs: 0, internalErrors: 0,
    lastLossReason: undefined,
  };
}
