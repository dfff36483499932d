/**
 * Types shared by the simulated VM, its vCPUs and the public API.
 */
import type { EventActionName, EventKey, structs } from '@periscope/kvmi';
import type { InstructionName } from '@periscope/x86';

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
 * - `unsupported`: the vCPU is in a paging mode the simulator does not model (32-bit, PAE, 5-level).
 * - `vcpu-offline` / `vcpu-crashed`: the vCPU does not run guest code.
 * - `vm-stopped`: the VMM stopped the VM instead of re-entering (a Heki denial with STOP_VM).
 */
export type GuestOutcome =
  | 'completed'
  | 'gp'
  | 'retry'
  | 'exception'
  | 'page-fault'
  | 'mmio'
  | 'userspace-exit'
  | 'unsupported'
  | 'vcpu-offline'
  | 'vcpu-crashed'
  | 'vm-stopped';

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
  /** Livelocks: a vCPU faulted identically `LIVELOCK_FAULTS` times in a row. */
  livelocks: number;
  lastLossReason: string | undefined;
}

export function newVmStats(): VmStats {
  return {
    hooks: 0, unhooks: 0, connectionLosses: 0, hardErrors: 0, messagesReceived: 0, commandsExecuted: 0,
    errorReplies: 0, eventsSent: 0, eventReplies: 0, stalls: 0, maxReplyWaitMs: 0, internalErrors: 0, livelocks: 0,
    lastLossReason: undefined,
  };
}

/** One vCPU event as the guest saw it end (the VM's `guest-event`, used by scenario expectations). */
export interface GuestEventRecord {
  vcpu: number;
  event: EventKey;
  /** Wire seq (0 when it could not be sent). */
  seq: number;
  ended: EventEnd;
  /** RIP in the event (the instruction that exited). */
  rip: bigint;
  /** How long the vCPU waited for the reply, ms (absent when the event could not be sent). */
  waitedMs?: number;
  /** The event-specific data sent (PF gva/gpa/access, CR cr/old/new, ...). */
  data?: Record<string, unknown>;
}

/** A livelock: `faults` identical consecutive faults at `rip`. */
export interface LivelockReport {
  vcpu: number;
  rip: bigint;
  faults: number;
  /** The repeated event (kind, data, how it ended). */
  event: string;
}

export interface RunOptions {
  /** Registers loaded before the first instruction (what the code that is not modelled left there). */
  regs?: Partial<structs.KvmRegs>;
  /** RIP ← entry first. */
  entry?: bigint;
  /** Push this return address first (RSP −= 8): a call from code that is not modelled. */
  returnTo?: bigint;
  /** Stop when RIP reaches this address (default: `returnTo`). */
  until?: bigint;
  /** Default 100 000. */
  maxInstructions?: number;
}

/** One executed instruction of a run (consecutive identical retries are merged: `times`). */
export interface InsnRecord {
  rip: bigint;
  /** The table instruction (absent when the fetch itself ended it). */
  name?: InstructionName;
  /** Its table length. */
  length?: number;
  result: 'retired' | 'halted' | 'fault' | 'retry' | 'mmio' | 'userspace-exit' | 'unsupported' | 'stopped';
  vector?: number;
  times: number;
}

/**
 * How a run ended: `completed` (RIP reached the stop address), `halted` (HLT), `exception` / `gp` /
 * `page-fault` (delivered to the guest; RIP at the faulting instruction), `mmio`, `userspace-exit`,
 * `unsupported`, `livelock`, `step-limit`, `vcpu-offline`, `vcpu-crashed`, `vm-stopped` (the VMM stopped
 * the VM: a Heki denial with STOP_VM).
 */
export type RunOutcome =
  | 'completed'
  | 'halted'
  | 'exception'
  | 'gp'
  | 'page-fault'
  | 'mmio'
  | 'userspace-exit'
  | 'unsupported'
  | 'livelock'
  | 'step-limit'
  | 'vcpu-offline'
  | 'vcpu-crashed'
  | 'vm-stopped';

export interface RunResult {
  outcome: RunOutcome;
  events: EventRecord[];
  trace: InsnRecord[];
  vector?: number;
  crashed: boolean;
  /** RIP at the end. */
  rip: bigint;
  /** Instructions executed (retries included). */
  instructions: number;
}
