/**
 * Which rule actions are legal for which event kind — derived from the KVMI catalog, the single source of
 * truth for the actions KVM accepts (`events[kind].actions`) and for which events carry reply data
 * (`events[kind].replyData`, the CR/MSR `new_val`). An action KVM does not accept would make it shut the
 * introspection socket down, so the compiler rejects it instead.
 */
import { EventAction, events, type EventActionName } from '@periscope/kvmi';
import { ACTION_KINDS, VCPU_EVENT_KINDS, type ActionKind, type VcpuEventKind } from './model.js';

/**
 * The KVMI reply action each rule action ends in. One exception: `inject` on an event whose reply carries
 * data (CR, MSR — they accept no RETRY) ends in CONTINUE with `new_val` = the old value (the write is refused
 * and the injected exception is delivered at the writing instruction: see `injectReplyAction`).
 */
export const KVMI_ACTION_OF: Readonly<Record<ActionKind, EventActionName>> = {
  allow: 'CONTINUE',
  deny: 'CONTINUE',
  rewrite: 'CONTINUE',
  skip: 'RETRY',
  retry: 'RETRY',
  inject: 'RETRY',
  crash: 'CRASH',
};

/** Actions that choose the reply's `new_val`: only for events whose reply carries data (CR, MSR). */
const CHOOSES_REPLY_VALUE: Readonly<Record<ActionKind, boolean>> = {
  allow: false,
  deny: true,
  rewrite: true,
  skip: false,
  retry: false,
  inject: false,
  crash: false,
};

export function kvmiActionValue(kind: ActionKind): number {
  return EventAction[KVMI_ACTION_OF[kind]];
}

/**
 * The KVMI action an `inject` verdict replies with: RETRY where the event accepts it (the instruction is
 * re-entered and takes the exception), else CONTINUE for events with reply data (CR/MSR: `new_val` = old
 * value, so the write does not happen; the host agent also moves RIP back over the instruction so that the
 * exception is delivered at it — libs/host-agent instruction-skip.ts). Null when neither applies.
 */
export function injectReplyAction(kind: VcpuEventKind): EventActionName | null {
  const def = events[kind];
  if ((def.actions as readonly EventActionName[]).includes('RETRY')) return 'RETRY';
  if (def.replyData !== null && (def.actions as readonly EventActionName[]).includes('CONTINUE')) return 'CONTINUE';
  return null;
}

/** Why `action` is illegal for `kind`, or null when it is legal. */
export function illegalBecause(kind: VcpuEventKind, action: ActionKind): string | null {
  const def = events[kind];
  if (action === 'inject') {
    return injectReplyAction(kind) ? null : `${def.name} accepts ${def.actions.join(', ')}; 'inject' needs RETRY, or CONTINUE with reply data (CR, MSR)`;
  }
  const kvmi = KVMI_ACTION_OF[action];
  if (!(def.actions as readonly EventActionName[]).includes(kvmi)) {
    return `${def.name} accepts ${def.actions.join(', ')}; '${action}' needs ${kvmi}`;
  }
  if (CHOOSES_REPLY_VALUE[action] && def.replyData === null) {
    return `'${action}' chooses the reply's new_val, and ${def.name} replies carry no data`;
  }
  return null;
}

export function isActionLegal(kind: VcpuEventKind, action: ActionKind): boolean {
  return illegalBecause(kind, action) === null;
}

/** The rule actions legal for an event kind, in `ACTION_KINDS` order. */
export function legalActions(kind: VcpuEventKind): ActionKind[] {
  return ACTION_KINDS.filter((a) => isActionLegal(kind, a));
}

/** A Markdown table of `legalActions` for every vCPU event kind (the README embeds it; a test checks it). */
export function renderLegalityTable(): string {
  const head = `| event | ${ACTION_KINDS.join(' | ')} |`;
  const sep = `| --- | ${ACTION_KINDS.map(() => ':-:').join(' | ')} |`;
  const rows = VCPU_EVENT_KINDS.map((k) => `| ${k} | ${ACTION_KINDS.map((a) => (isActionLegal(k, a) ? '✓' : '')).join(' | ')} |`);
  return [head, sep, ...rows].join('\n');
}
