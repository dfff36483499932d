import type { KvmiEvent } from './generated/periscope/v1/agent.js';
import { KvmiEventKind } from './generated/periscope/v1/kvmi.js';

/** The `$case` names of `KvmiEvent.payload`. */
export type KvmiEventPayloadCase = NonNullable<KvmiEvent['payload']>['$case'];

/**
 * Event kind of a `KvmiEvent` payload case. The oneof case IS the kind on the wire; this is the one mapping
 * to the `KvmiEventKind` enum used by policies, controls and verdict records.
 */
export function eventKindOfCase(payloadCase: KvmiEventPayloadCase): KvmiEventKind {
  switch (payloadCase) {
    case 'unhook':
      return KvmiEventKind.KVMI_EVENT_KIND_UNHOOK;
    case 'pause':
      return KvmiEventKind.KVMI_EVENT_KIND_PAUSE;
    case 'hypercall':
      return KvmiEventKind.KVMI_EVENT_KIND_HYPERCALL;
    case 'breakpoint':
      return KvmiEventKind.KVMI_EVENT_KIND_BREAKPOINT;
    case 'cr':
      return KvmiEventKind.KVMI_EVENT_KIND_CR;
    case 'trap':
      return KvmiEventKind.KVMI_EVENT_KIND_TRAP;
    case 'xsetbv':
      return KvmiEventKind.KVMI_EVENT_KIND_XSETBV;
    case 'descriptor':
      return KvmiEventKind.KVMI_EVENT_KIND_DESCRIPTOR;
    case 'msr':
      return KvmiEventKind.KVMI_EVENT_KIND_MSR;
    case 'pf':
      return KvmiEventKind.KVMI_EVENT_KIND_PF;
    case 'singlestep':
      return KvmiEventKind.KVMI_EVENT_KIND_SINGLESTEP;
    default: {
      const unreachable: never = payloadCase;
      return unreachable;
    }
  }
}

/** Event kind of an event; `KVMI_EVENT_KIND_UNSPECIFIED` when the payload is absent. */
export function eventKindOf(event: Pick<KvmiEvent, 'payload'>): KvmiEventKind {
  return event.payload === undefined
    ? KvmiEventKind.KVMI_EVENT_KIND_UNSPECIFIED
    : eventKindOfCase(event.payload.$case);
}
