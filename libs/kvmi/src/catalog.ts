/**
 * The KVMI v12 message catalog: every command, event, error code, action and access bit, declared once.
 *
 * Like the kernel's own `msg_vm[]` / `msg_vcpu[]` tables, each row says everything the wire needs:
 * id, scope, request and reply layouts, variable-length tails, what KVM does with a short payload,
 * the ordered argument checks the kernel performs (and the errno each gives), permission rules, and
 * for events the payload, the reply data, the allowed actions and how the event is enabled.
 * The codec (`codec.ts`), kernel-side validation, the generated protocol document and the tests all
 * derive from these tables. Sources: kvmi-v12.md §2.4, §3, §4, §5; seed extensions from kvmmem.md.
 *
 * The catalog is data about one *dialect* (`dialect: 'v12'`); a second dialect (the v7/libkvmi one)
 * would be a second set of tables of the same types.
 */
import * as S from './structs.js';
import { vcpuMessageId, vmMessageId } from './constants.js';
import * as U from './unconfirmed.js';
import type { Layout, ValueOf } from './layout.js';

// ---- error codes (§2.4) -----------------------------------------------------------------------

/** `KVM_E*` values; on the wire `err` holds the negated value. */
export const KvmErrno = {
  EPERM: 1,
  ENOENT: 2,
  E2BIG: 7,
  EAGAIN: 11,
  ENOMEM: 12,
  EFAULT: 14,
  EBUSY: 16,
  EINVAL: 22,
  EOPNOTSUPP: 95,
  ENOSYS: 1000,
} as const;
export type KvmErrnoName = keyof typeof KvmErrno;

export function errnoName(err: number): string {
  const v = Math.abs(err);
  for (const [k, n] of Object.entries(KvmErrno)) if (n === v) return `KVM_${k}`;
  return `unknown error ${err}`;
}

// ---- actions and access bits (§3.3, §3.4, §3.5) -----------------------------------------------

export const EventAction = { CONTINUE: 0, RETRY: 1, CRASH: 2 } as const;
export type EventActionName = keyof typeof EventAction;
export type EventActionValue = (typeof EventAction)[EventActionName];

export const PageAccess = { R: 1, W: 2, X: 4, RWX: 7 } as const;
export const Descriptor = { IDTR: 1, GDTR: 2, LDTR: 3, TR: 4 } as const;

// ---- event table (§3.2, §5) -------------------------------------------------------------------

/** How a tool turns an event on (§5.5). */
export type EnableRule =
  | 'vm-control-events' // VM_CONTROL_EVENTS, VM-wide (UNHOOK)
  | 'vcpu-control-events' // VCPU_CONTROL_EVENTS, per vCPU
  | 'command-result'; // always on; one event per triggering command (PAUSE, TRAP, SINGLESTEP)

export interface EventDef<P = unknown, R = unknown> {
  readonly key: string;
  /** C name, e.g. `KVMI_VCPU_EVENT_PF`. */
  readonly name: string;
  /** `kvmi_event_hdr.event`. */
  readonly id: number;
  readonly scope: 'vm' | 'vcpu';
  /** Event-specific struct after the common part, or null. */
  readonly payload: Layout<P> | null;
  /** Reply data after `kvmi_vcpu_event_reply` (CR, MSR), or null. */
  readonly replyData: Layout<R> | null;
  /** Accepted actions; empty for the VM event, which gets no reply. */
  readonly actions: readonly EventActionName[];
  readonly enable: EnableRule;
  /** The command that triggers it, for command-result events. */
  readonly trigger?: string;
  /** Extra condition the tool sets up (§5.5), for docs. */
  readonly condition?: string;
  /** What KVM does on CRASH or an unsupported action (§3.3). */
  readonly notContinue: string;
}

function event<P, R>(d: EventDef<P, R>): EventDef<P, R> {
  return d;
}

export const events = {
  UNHOOK: event({
    key: 'UNHOOK', name: 'KVMI_VM_EVENT_UNHOOK', id: 0, scope: 'vm', payload: null, replyData: null,
    actions: [], enable: 'vm-control-events', notContinue: 'no reply is sent to a VM event',
  }),
  PAUSE: event({
    key: 'PAUSE', name: 'KVMI_VCPU_EVENT_PAUSE', id: 1, scope: 'vcpu', payload: null, replyData: null,
    actions: ['CONTINUE', 'CRASH'], enable: 'command-result', trigger: 'VM_PAUSE_VCPU',
    condition: 'one event per successful VM_PAUSE_VCPU; low priority', notContinue: 'nothing else happens',
  }),
  HYPERCALL: event({
    key: 'HYPERCALL', name: 'KVMI_VCPU_EVENT_HYPERCALL', id: 3, scope: 'vcpu', payload: null, replyData: null,
    actions: ['CONTINUE', 'CRASH'], enable: 'vcpu-control-events',
    condition: 'VMCALL with RAX=34, RDI=24, RSI=0', notContinue: 'the hypercall returns -KVM_ENOSYS in RAX',
  }),
  BREAKPOINT: event({
    key: 'BREAKPOINT', name: 'KVMI_VCPU_EVENT_BREAKPOINT', id: 5, scope: 'vcpu',
    payload: S.kvmi_vcpu_event_breakpoint, replyData: null, actions: ['CONTINUE', 'RETRY', 'CRASH'],
    enable: 'vcpu-control-events', notContinue: 'as RETRY: #BP is not re-injected',
  }),
  CR: event({
    key: 'CR', name: 'KVMI_VCPU_EVENT_CR', id: 7, scope: 'vcpu', payload: S.kvmi_vcpu_event_cr,
    replyData: S.kvmi_vcpu_event_cr_reply, actions: ['CONTINUE', 'CRASH'], enable: 'vcpu-control-events',
    condition: 'VCPU_CONTROL_CR for CR0/CR3/CR4; only when the value changes',
    notContinue: 'the CR write is refused (#GP in the guest)',
  }),
  TRAP: event({
    key: 'TRAP', name: 'KVMI_VCPU_EVENT_TRAP', id: 9, scope: 'vcpu', payload: S.kvmi_vcpu_event_trap,
    replyData: null, actions: ['CONTINUE', 'CRASH'], enable: 'command-result', trigger: 'VCPU_INJECT_EXCEPTION',
    condition: 'one event per completed injection; sent before any other event', notContinue: 'nothing else happens',
  }),
  XSETBV: event({
    key: 'XSETBV', name: 'KVMI_VCPU_EVENT_XSETBV', id: 11, scope: 'vcpu', payload: S.kvmi_vcpu_event_xsetbv,
    replyData: null, actions: ['CONTINUE', 'CRASH'], enable: 'vcpu-control-events',
    condition: 'XCR0 changed (informational: already written)', notContinue: 'nothing else happens',
  }),
  DESCRIPTOR: event({
    key: 'DESCRIPTOR', name: 'KVMI_VCPU_EVENT_DESCRIPTOR', id: 13, scope: 'vcpu',
    payload: S.kvmi_vcpu_event_descriptor, replyData: null, actions: ['CONTINUE', 'RETRY', 'CRASH'],
    enable: 'vcpu-control-events', notContinue: 'as RETRY: the instruction is not emulated',
  }),
  MSR: event({
    key: 'MSR', name: 'KVMI_VCPU_EVENT_MSR', id: 15, scope: 'vcpu', payload: S.kvmi_vcpu_event_msr,
    replyData: S.kvmi_vcpu_event_msr_reply, actions: ['CONTINUE', 'CRASH'], enable: 'vcpu-control-events',
    condition: 'VCPU_CONTROL_MSR per MSR; guest WRMSR that changes the value',
    notContinue: 'the WRMSR is refused (#GP in the guest)',
  }),
  PF: event({
    key: 'PF', name: 'KVMI_VCPU_EVENT_PF', id: 17, scope: 'vcpu', payload: S.kvmi_vcpu_event_pf, replyData: null,
    actions: ['CONTINUE', 'RETRY', 'CRASH'], enable: 'vcpu-control-events',
    condition: 'a restriction set with VM_SET_PAGE_ACCESS', notContinue: 'as RETRY: the access is not emulated',
  }),
  SINGLESTEP: event({
    key: 'SINGLESTEP', name: 'KVMI_VCPU_EVENT_SINGLESTEP', id: 19, scope: 'vcpu',
    payload: S.kvmi_vcpu_event_singlestep, replyData: null, actions: ['CONTINUE', 'CRASH'],
    enable: 'command-result', trigger: 'VCPU_CONTROL_SINGLESTEP', notContinue: 'nothing else happens',
  }),
} as const;

export type EventKey = keyof typeof events;
export type AnyEventDef = (typeof events)[EventKey];
export type EventPayloadOf<K extends EventKey> = (typeof events)[K] extends EventDef<infer P, unknown> ? P : never;
export type EventReplyDataOf<K extends EventKey> = (typeof events)[K] extends EventDef<unknown, infer R> ? R : never;

const eventById = new Map<number, AnyEventDef>(Object.values(events).map((e) => [e.id, e]));
export function eventDefById(id: number): AnyEventDef | undefined {
  return eventById.get(id);
}
export function isVcpuEventId(id: number): boolean {
  const e = eventById.get(id);
  return e !== undefined && e.scope === 'vcpu';
}
export function actionAllowed(def: EventDef, action: number): boolean {
  for (const a of def.actions) if (EventAction[a] === action) return true;
  return false;
}

// ---- command table (§4) -----------------------------------------------------------------------

/** A variable-length tail after a command's struct, or after a reply's struct. */
export type TailSpec =
  | { readonly prop: string; readonly kind: 'bytes'; readonly countField: string; readonly countIn: 'self' | 'request' }
  | { readonly prop: string; readonly kind: 'u32'; readonly countField: string; readonly countIn: 'self' }
  | {
      readonly prop: string;
      readonly kind: 'struct';
      readonly layout: Layout<unknown>;
      readonly countField: string;
      readonly countIn: 'self' | 'request';
    };

/** What KVM does when a payload is shorter than the command needs (§2.2, §10). */
export type ShortPayloadRule = 'zero-fill' | 'hard-error' | 'einval';

/**
 * One argument check, in the kernel's order. Stateless checks are evaluated by the codec; `permission`
 * and `state` checks are answered by the kernel side's context (the simulator), in the same sequence.
 */
export type CommandCheck =
  | { readonly kind: 'padding'; readonly errno: 'EINVAL' }
  | { readonly kind: 'bool'; readonly field: string; readonly errno: 'EINVAL' }
  | { readonly kind: 'one-of'; readonly field: string; readonly values: readonly number[]; readonly errno: 'EINVAL' }
  | {
      readonly kind: 'predicate';
      readonly errno: KvmErrnoName;
      readonly doc: string;
      readonly fails: (req: Record<string, unknown>) => boolean;
    }
  | { readonly kind: 'permission'; readonly event: EventKey; readonly errno: 'EPERM'; readonly when?: 'enabling' }
  | { readonly kind: 'state'; readonly key: string; readonly errno: KvmErrnoName; readonly doc: string };

export interface CommandDef<Q = unknown, R = unknown> {
  readonly key: string;
  /** C name, e.g. `KVMI_VM_READ_PHYSICAL`. */
  readonly name: string;
  readonly id: number;
  readonly scope: 'vm' | 'vcpu';
  /** The command struct (after `kvmi_vcpu_hdr` for vCPU commands), or null when there is none. */
  readonly request: Layout<Q> | null;
  readonly requestTail?: TailSpec;
  readonly shortPayload: ShortPayloadRule;
  /** Reply data after `kvmi_error_code` when err == 0, or null. */
  readonly reply: Layout<R> | null;
  readonly replyTail?: TailSpec;
  /** GET_VERSION, VM_CHECK_COMMAND and VM_CHECK_EVENT need no permission (§9.1). */
  readonly alwaysAllowed: boolean;
  readonly checks: readonly CommandCheck[];
  /** Seed extension outside the v12 core, or undefined. */
  readonly extension?: { readonly seed: string; readonly note: string };
  readonly summary: string;
}

/** Keeps the literal scope in the type, so vCPU commands require `vcpu` in their input. */
function command<Q, R, const Sc extends 'vm' | 'vcpu'>(d: CommandDef<Q, R> & { readonly scope: Sc }): CommandDef<Q, R> & { readonly scope: Sc } {
  return d;
}

const padding = { kind: 'padding', errno: 'EINVAL' } as const;
const enableBool = { kind: 'bool', field: 'enable', errno: 'EINVAL' } as const;

function inInterceptableMsrRange(msr: number): boolean {
  return (msr >= 0 && msr <= 0x1fff) || (msr >= 0xc0000000 && msr <= 0xc0001fff);
}

/** The access rules shared by VM_READ_PHYSICAL and VM_WRITE_PHYSICAL (§4.2). */
const physicalRange = {
  kind: 'predicate',
  errno: 'EINVAL',
  doc: 'size is 0, larger than 4096, or the range crosses a 4 KiB page',
  fails: (r: Record<string, unknown>) => {
    const size = r['size'] as number;
    const gpa = r['gpa'] as bigint;
    return size === 0 || size > 4096 || Number(gpa & 0xfffn) + size > 4096;
  },
} as const;

export const commands = {
  GET_VERSION: command({
    key: 'GET_VERSION', name: 'KVMI_GET_VERSION', id: vmMessageId(1), scope: 'vm', request: null,
    shortPayload: 'zero-fill', reply: S.kvmi_get_version_reply, alwaysAllowed: true, checks: [],
    summary: 'protocol version, max message size and features; never fails',
  }),
  VM_CHECK_COMMAND: command({
    key: 'VM_CHECK_COMMAND', name: 'KVMI_VM_CHECK_COMMAND', id: vmMessageId(2), scope: 'vm',
    request: S.kvmi_vm_check_command, shortPayload: 'zero-fill', reply: null, alwaysAllowed: true,
    checks: [
      padding,
      { kind: 'state', key: 'command-known', errno: 'ENOENT', doc: 'unknown command id' },
      { kind: 'state', key: 'command-allowed', errno: 'EPERM', doc: 'command disallowed by the device manager' },
    ],
    summary: 'is a command id known and allowed (answer in err)',
  }),
  VM_CHECK_EVENT: command({
    key: 'VM_CHECK_EVENT', name: 'KVMI_VM_CHECK_EVENT', id: vmMessageId(3), scope: 'vm',
    request: S.kvmi_vm_check_event, shortPayload: 'zero-fill', reply: null, alwaysAllowed: true,
    checks: [
      padding,
      { kind: 'state', key: 'event-known', errno: 'ENOENT', doc: 'unknown event id' },
      { kind: 'state', key: 'event-allowed', errno: 'EPERM', doc: 'event disallowed by the device manager' },
    ],
    summary: 'is an event id known and allowed (answer in err)',
  }),
  VM_GET_INFO: command({
    key: 'VM_GET_INFO', name: 'KVMI_VM_GET_INFO', id: vmMessageId(4), scope: 'vm', request: null,
    shortPayload: 'zero-fill', reply: S.kvmi_vm_get_info_reply, alwaysAllowed: false, checks: [],
    summary: 'number of online vCPUs',
  }),
  VM_CONTROL_EVENTS: command({
    key: 'VM_CONTROL_EVENTS', name: 'KVMI_VM_CONTROL_EVENTS', id: vmMessageId(5), scope: 'vm',
    request: S.kvmi_vm_control_events, shortPayload: 'zero-fill', reply: null, alwaysAllowed: false,
    checks: [
      padding,
      enableBool,
      { kind: 'one-of', field: 'event_id', values: [0], errno: 'EINVAL' },
      { kind: 'state', key: 'event-allowed', errno: 'EPERM', doc: 'event disallowed by the device manager' },
    ],
    summary: 'enable or disable a VM event (only UNHOOK)',
  }),
  VM_READ_PHYSICAL: command({
    key: 'VM_READ_PHYSICAL', name: 'KVMI_VM_READ_PHYSICAL', id: vmMessageId(6), scope: 'vm',
    request: S.kvmi_vm_read_physical, shortPayload: 'zero-fill', reply: null,
    replyTail: { prop: 'data', kind: 'bytes', countField: 'size', countIn: 'request' }, alwaysAllowed: false,
    checks: [padding, physicalRange, { kind: 'state', key: 'gpa-backed', errno: 'ENOENT', doc: 'gpa not backed by a memslot' }],
    summary: 'read up to 4096 bytes of guest physical memory within one page',
  }),
  VM_WRITE_PHYSICAL: command({
    key: 'VM_WRITE_PHYSICAL', name: 'KVMI_VM_WRITE_PHYSICAL', id: vmMessageId(7), scope: 'vm',
    request: S.kvmi_vm_write_physical, requestTail: { prop: 'data', kind: 'bytes', countField: 'size', countIn: 'self' },
    shortPayload: 'hard-error', reply: null, alwaysAllowed: false,
    checks: [padding, physicalRange, { kind: 'state', key: 'gpa-backed', errno: 'ENOENT', doc: 'gpa not backed by a memslot' }],
    summary: 'write up to 4096 bytes of guest physical memory within one page',
  }),
  VM_PAUSE_VCPU: command({
    key: 'VM_PAUSE_VCPU', name: 'KVMI_VM_PAUSE_VCPU', id: vmMessageId(8), scope: 'vm',
    request: S.kvmi_vm_pause_vcpu, shortPayload: 'zero-fill', reply: null, alwaysAllowed: false,
    checks: [
      padding,
      { kind: 'bool', field: 'wait', errno: 'EINVAL' },
      { kind: 'permission', event: 'PAUSE', errno: 'EPERM' },
      { kind: 'state', key: 'vcpu-index', errno: 'EINVAL', doc: 'vcpu ≥ online vCPUs' },
      { kind: 'state', key: 'pause-limit', errno: 'EBUSY', doc: 'more than 1001 pause requests pending' },
    ],
    summary: 'kick a vCPU and queue one PAUSE event (wait=1: reply after the kick)',
  }),
  VM_CONTROL_CLEANUP: command({
    key: 'VM_CONTROL_CLEANUP', name: 'KVMI_VM_CONTROL_CLEANUP', id: vmMessageId(9), scope: 'vm',
    request: S.kvmi_vm_control_cleanup, shortPayload: 'zero-fill', reply: null, alwaysAllowed: false,
    checks: [padding, enableBool],
    summary: 'restore KVM interceptions on unhook (default 1)',
  }),
  VM_SET_PAGE_ACCESS: command({
    key: 'VM_SET_PAGE_ACCESS', name: 'KVMI_VM_SET_PAGE_ACCESS', id: vmMessageId(10), scope: 'vm',
    request: S.kvmi_vm_set_page_access,
    requestTail: { prop: 'entries', kind: 'struct', layout: S.kvmi_page_access_entry as Layout<unknown>, countField: 'count', countIn: 'self' },
    shortPayload: 'hard-error', reply: null, alwaysAllowed: false,
    checks: [
      padding,
      { kind: 'state', key: 'page-access-entries', errno: 'EINVAL', doc: 'per entry: padding, access bits other than rwx, gfn not visible; all entries applied, first error returned' },
      { kind: 'state', key: 'page-access-alloc', errno: 'ENOMEM', doc: 'tracking allocation failure' },
    ],
    summary: 'set allowed R/W/X per gfn in the EPT (up to 511 entries)',
  }),
  VCPU_GET_INFO: command({
    key: 'VCPU_GET_INFO', name: 'KVMI_VCPU_GET_INFO', id: vcpuMessageId(1), scope: 'vcpu', request: null,
    shortPayload: 'zero-fill', reply: S.kvmi_vcpu_get_info_reply, alwaysAllowed: false, checks: [],
    summary: 'guest TSC frequency (0 without TSC scaling)',
  }),
  VCPU_CONTROL_EVENTS: command({
    key: 'VCPU_CONTROL_EVENTS', name: 'KVMI_VCPU_CONTROL_EVENTS', id: vcpuMessageId(2), scope: 'vcpu',
    request: S.kvmi_vcpu_control_events, shortPayload: 'zero-fill', reply: null, alwaysAllowed: false,
    checks: [
      padding,
      enableBool,
      { kind: 'predicate', errno: 'EINVAL', doc: 'not a vCPU event id', fails: (r) => !isVcpuEventId(r['event_id'] as number) },
      { kind: 'state', key: 'event-allowed', errno: 'EPERM', doc: 'event disallowed by the device manager' },
      { kind: 'state', key: 'breakpoint-arbitration', errno: 'EBUSY', doc: 'BREAKPOINT: #BP already intercepted, or disabling while not enabled' },
      { kind: 'state', key: 'descriptor-exits', errno: 'EOPNOTSUPP', doc: 'DESCRIPTOR: no descriptor-table exits on this host' },
    ],
    summary: 'enable or disable one vCPU event on one vCPU',
  }),
  VCPU_GET_REGISTERS: command({
    key: 'VCPU_GET_REGISTERS', name: 'KVMI_VCPU_GET_REGISTERS', id: vcpuMessageId(3), scope: 'vcpu',
    request: S.kvmi_vcpu_get_registers, requestTail: { prop: 'msrs_idx', kind: 'u32', countField: 'nmsrs', countIn: 'self' },
    shortPayload: 'einval', reply: S.kvmi_vcpu_get_registers_reply,
    replyTail: { prop: 'msr_entries', kind: 'struct', layout: S.kvm_msr_entry as Layout<unknown>, countField: 'msrs.nmsrs', countIn: 'self' },
    alwaysAllowed: false,
    checks: [
      padding,
      { kind: 'predicate', errno: 'EINVAL', doc: 'reply too large (nmsrs > 481)', fails: (r) => (r['nmsrs'] as number) > 481 },
      { kind: 'state', key: 'msrs-readable', errno: 'EINVAL', doc: 'an MSR cannot be read' },
      { kind: 'state', key: 'reply-alloc', errno: 'ENOMEM', doc: 'the reply buffer cannot be allocated' },
    ],
    summary: 'mode, kvm_regs, kvm_sregs and the requested MSRs',
  }),
  VCPU_SET_REGISTERS: command({
    key: 'VCPU_SET_REGISTERS', name: 'KVMI_VCPU_SET_REGISTERS', id: vcpuMessageId(4), scope: 'vcpu',
    request: S.kvm_regs, shortPayload: 'einval', reply: null, alwaysAllowed: false,
    checks: [{ kind: 'state', key: 'waiting-for-reply', errno: 'EOPNOTSUPP', doc: 'vCPU not waiting for an event reply' }],
    summary: 'set kvm_regs, applied when the pending event reply is processed',
  }),
  VCPU_GET_CPUID: command({
    key: 'VCPU_GET_CPUID', name: 'KVMI_VCPU_GET_CPUID', id: vcpuMessageId(5), scope: 'vcpu',
    request: S.kvmi_vcpu_get_cpuid, shortPayload: 'zero-fill', reply: S.kvmi_vcpu_get_cpuid_reply, alwaysAllowed: false,
    checks: [{ kind: 'state', key: 'cpuid-leaf', errno: 'ENOENT', doc: 'leaf not present' }],
    summary: 'a CPUID leaf as the guest sees it',
  }),
  VCPU_CONTROL_CR: command({
    key: 'VCPU_CONTROL_CR', name: 'KVMI_VCPU_CONTROL_CR', id: vcpuMessageId(6), scope: 'vcpu',
    request: S.kvmi_vcpu_control_cr, shortPayload: 'zero-fill', reply: null, alwaysAllowed: false,
    checks: [padding, enableBool, { kind: 'one-of', field: 'cr', values: [0, 3, 4], errno: 'EINVAL' }],
    summary: 'intercept writes to CR0, CR3 or CR4',
  }),
  VCPU_INJECT_EXCEPTION: command({
    key: 'VCPU_INJECT_EXCEPTION', name: 'KVMI_VCPU_INJECT_EXCEPTION', id: vcpuMessageId(7), scope: 'vcpu',
    request: S.kvmi_vcpu_inject_exception, shortPayload: 'zero-fill', reply: null, alwaysAllowed: false,
    checks: [
      { kind: 'permission', event: 'TRAP', errno: 'EPERM' },
      padding,
      { kind: 'state', key: 'injection-pending', errno: 'EBUSY', doc: 'another injection or its TRAP pending, or single-stepping' },
    ],
    summary: 'queue an exception; a TRAP event reports what was injected',
  }),
  VCPU_GET_XCR: command({
    key: 'VCPU_GET_XCR', name: 'KVMI_VCPU_GET_XCR', id: vcpuMessageId(8), scope: 'vcpu',
    request: S.kvmi_vcpu_get_xcr, shortPayload: 'zero-fill', reply: S.kvmi_vcpu_get_xcr_reply, alwaysAllowed: false,
    checks: [padding, { kind: 'one-of', field: 'xcr', values: [0], errno: 'EINVAL' }],
    summary: 'read XCR0',
  }),
  VCPU_GET_XSAVE: command({
    key: 'VCPU_GET_XSAVE', name: 'KVMI_VCPU_GET_XSAVE', id: vcpuMessageId(9), scope: 'vcpu', request: null,
    shortPayload: 'zero-fill', reply: S.kvmi_vcpu_get_xsave_reply, alwaysAllowed: false,
    checks: [{ kind: 'state', key: 'xsave-alloc', errno: 'ENOMEM', doc: 'allocation failure' }],
    summary: 'the 4096-byte legacy kvm_xsave area',
  }),
  VCPU_SET_XSAVE: command({
    key: 'VCPU_SET_XSAVE', name: 'KVMI_VCPU_SET_XSAVE', id: vcpuMessageId(10), scope: 'vcpu',
    request: S.kvmi_vcpu_set_xsave, shortPayload: 'einval', reply: null, alwaysAllowed: false,
    checks: [{ kind: 'state', key: 'xsave-content', errno: 'EINVAL', doc: 'content rejected by KVM' }],
    summary: 'write the 4096-byte legacy kvm_xsave area',
  }),
  GET_MAP_TOKEN: command({
    key: 'GET_MAP_TOKEN', name: 'KVMI_GET_MAP_TOKEN', id: vmMessageId(11), scope: 'vm', request: null,
    shortPayload: 'zero-fill', reply: S.kvmi_get_map_token_reply, alwaysAllowed: false,
    checks: [
      { kind: 'state', key: 'token-limit', errno: 'EAGAIN', doc: 'too many outstanding tokens' },
      { kind: 'state', key: 'token-alloc', errno: 'ENOMEM', doc: 'token allocation failure' },
    ],
    extension: { seed: 'v6', note: 'single-use token for /dev/kvmmem (kvmmem.md §1); ENOSYS on a pure v12 kernel' },
    summary: 'a single-use token authorising one /dev/kvmmem map of this VM',
  }),
  VCPU_GET_MTRR_TYPE: command({
    key: 'VCPU_GET_MTRR_TYPE', name: 'KVMI_VCPU_GET_MTRR_TYPE', id: vcpuMessageId(11), scope: 'vcpu',
    request: S.kvmi_vcpu_get_mtrr_type, shortPayload: 'zero-fill', reply: S.kvmi_vcpu_get_mtrr_type_reply,
    alwaysAllowed: false, checks: [],
    summary: 'MTRR memory type of a gpa',
  }),
  VM_GET_MAX_GFN: command({
    key: 'VM_GET_MAX_GFN', name: 'KVMI_VM_GET_MAX_GFN', id: vmMessageId(12), scope: 'vm', request: null,
    shortPayload: 'zero-fill', reply: S.kvmi_vm_get_max_gfn_reply, alwaysAllowed: false, checks: [],
    extension: { seed: 'v8', note: 'removed from v12 upstream; returns the first inaccessible GFN (exclusive limit)' },
    summary: 'the first inaccessible guest frame number',
  }),
  VCPU_CONTROL_MSR: command({
    key: 'VCPU_CONTROL_MSR', name: 'KVMI_VCPU_CONTROL_MSR', id: vcpuMessageId(12), scope: 'vcpu',
    request: S.kvmi_vcpu_control_msr, shortPayload: 'zero-fill', reply: null, alwaysAllowed: false,
    checks: [
      padding,
      enableBool,
      { kind: 'predicate', errno: 'EINVAL', doc: 'MSR outside 0–0x1fff and 0xc0000000–0xc0001fff', fails: (r) => !inInterceptableMsrRange(r['msr'] as number) },
      { kind: 'state', key: 'msr-filter', errno: 'EPERM', doc: 'enabling an MSR whose writes the userspace MSR filter denies' },
    ],
    summary: 'intercept guest writes to one MSR',
  }),
  VCPU_CONTROL_SINGLESTEP: command({
    key: 'VCPU_CONTROL_SINGLESTEP', name: 'KVMI_VCPU_CONTROL_SINGLESTEP', id: vcpuMessageId(13), scope: 'vcpu',
    request: S.kvmi_vcpu_control_singlestep, shortPayload: 'zero-fill', reply: null, alwaysAllowed: false,
    checks: [
      { kind: 'permission', event: 'SINGLESTEP', errno: 'EPERM' },
      padding,
      enableBool,
      { kind: 'state', key: 'singlestep-support', errno: 'EOPNOTSUPP', doc: 'no hardware single-step (SVM)' },
    ],
    summary: 'single-step the vCPU; one SINGLESTEP event per instruction',
  }),
  VCPU_TRANSLATE_GVA: command({
    key: 'VCPU_TRANSLATE_GVA', name: 'KVMI_VCPU_TRANSLATE_GVA', id: vcpuMessageId(14), scope: 'vcpu',
    request: S.kvmi_vcpu_translate_gva, shortPayload: 'zero-fill', reply: S.kvmi_vcpu_translate_gva_reply,
    alwaysAllowed: false, checks: [],
    summary: 'translate a guest virtual address with the current paging mode (all ones on failure)',
  }),
} as const;

export type CommandKey = keyof typeof commands;
export type AnyCommandDef = (typeof commands)[CommandKey];
export type RequestOf<K extends CommandKey> = (typeof commands)[K] extends CommandDef<infer Q, unknown> ? Q : never;
export type ReplyOf<K extends CommandKey> = (typeof commands)[K] extends CommandDef<unknown, infer R> ? R : never;

const commandById = new Map<number, AnyCommandDef>(Object.values(commands).map((c) => [c.id, c]));
export function commandDefById(id: number): AnyCommandDef | undefined {
  return commandById.get(id);
}

/** The layout a command's request payload starts with (vCPU commands: `kvmi_vcpu_hdr`). */
export const VCPU_HDR_SIZE = S.kvmi_vcpu_hdr.size;
export const ERROR_CODE_SIZE = S.kvmi_error_code.size;
export const EVENT_HDR_SIZE = S.kvmi_event_hdr.size;
export const EVENT_REPLY_SIZE = S.kvmi_vcpu_event_reply.size;

/**
 * Smallest payload a command needs, excluding any variable tail: vCPU header plus struct.
 * For 'zero-fill' commands a shorter payload is legal (it reads as zeros).
 */
export function requiredPayload(def: CommandDef): number {
  return (def.scope === 'vcpu' ? VCPU_HDR_SIZE : 0) + (def.request?.size ?? 0);
}

export type { Layout, ValueOf };

// ---- hooking ioctls (device manager side, §7) -------------------------------------------------

export interface IoctlDef {
  readonly name: string;
  /** The request number; HOOK/UNHOOK are inferred (see unconfirmed.ts `hook-ioctl-numbers`). */
  readonly request: number;
  readonly arg: Layout<unknown> | null;
  /** errno names (positive Linux errno semantics) in the order the kernel checks them. */
  readonly errors: readonly string[];
  readonly summary: string;
}

export const ioctls = {
  HOOK: {
    name: 'KVM_INTROSPECTION_HOOK', request: U.KVM_INTROSPECTION_HOOK, arg: S.kvm_introspection_hook as Layout<unknown>,
    errors: ['EPERM (introspection disabled)', 'EFAULT (copy)', 'EINVAL (padding, bad fd)', 'EEXIST (hooked, or vCPU state remains)', 'ENOMEM'],
    summary: 'hand the connected socket to KVM; all commands but the three always-allowed and all events start disallowed; seq restarts at 1',
  },
  UNHOOK: {
    name: 'KVM_INTROSPECTION_UNHOOK', request: U.KVM_INTROSPECTION_UNHOOK, arg: null,
    errors: ['EPERM (introspection disabled)'],
    summary: 'shut the socket down, wait for the receive thread, clean up (§8); always 0 otherwise',
  },
  COMMAND: {
    name: 'KVM_INTROSPECTION_COMMAND', request: U.KVM_INTROSPECTION_COMMAND, arg: S.kvm_introspection_feature as Layout<unknown>,
    errors: ['EFAULT (copy)', 'EINVAL (allow > 1, id < -1 or id >= KVMI_NUM_COMMANDS)', 'EFAULT (not hooked)', 'EPERM (disallowing an always-allowed command)'],
    summary: 'allow (1) or disallow (0) one command id, or all (-1)',
  },
  EVENT: {
    name: 'KVM_INTROSPECTION_EVENT', request: U.KVM_INTROSPECTION_EVENT, arg: S.kvm_introspection_feature as Layout<unknown>,
    errors: ['EFAULT (copy)', 'EINVAL (allow > 1, id < -1 or id >= KVMI_NUM_EVENTS)', 'EFAULT (not hooked)'],
    summary: 'allow (1) or disallow (0) one event id, or all (-1)',
  },
  PREUNHOOK: {
    name: 'KVM_INTROSPECTION_PREUNHOOK', request: U.KVM_INTROSPECTION_PREUNHOOK, arg: null,
    errors: ['EPERM (introspection disabled)', 'EFAULT (not hooked)', 'ENOENT (UNHOOK event not enabled, or its send failed)'],
    summary: 'send KVMI_VM_EVENT_UNHOOK if the tool enabled it; does not wait',
  },
} as const satisfies Record<string, IoctlDef>;

// ---- the dialect ------------------------------------------------------------------------------

/**
 * One wire dialect as data. v12 is the only one implemented; the v7/libkvmi dialect (flat ids, its own
 * event-reply id, CONTROL_CMD_RESPONSE) would be a second value of this type.
 */
export interface KvmiDialect {
  readonly name: string;
  readonly version: number;
  readonly commands: Readonly<Record<string, CommandDef>>;
  readonly events: Readonly<Record<string, EventDef>>;
  readonly ioctls: Readonly<Record<string, IoctlDef>>;
  readonly errno: Readonly<Record<string, number>>;
}

export const v12: KvmiDialect = { name: 'v12', version: 1, commands, events, ioctls, errno: KvmErrno };
