/**
 * The rule model: what a local policy says, in memory, before compilation.
 *
 * It maps 1:1 from `protos/periscope/v1/policy.proto` (`LocalPolicy`, see `proto.ts`) and adds what the
 * host agent needs that the proto cannot say yet (register matches, several RIP ranges, bit-transition
 * predicates, skip/inject actions, force-bits-from-old). 64-bit guest values are `bigint`.
 *
 * Semantics (the README has the long form):
 * - Rules are evaluated in list order; the **first matching rule wins**. No match: the default action of the
 *   event kind (`defaultActions[kind]`, else `defaultAction`, else allow).
 * - Within one match, every present criterion must hold (AND); a list criterion holds when any element
 *   does (OR). Absent criteria match anything.
 * - Exceptions: once rule R matched, the first unexpired exception that targets R (its `rules` names R, or
 *   is empty) and whose own `match` holds replaces R's action and report. An exception with an empty
 *   `rules` also applies when no rule matched (the default). An exception never makes a non-matching
 *   event match.
 */
import { events, Descriptor, structs as S, type EventKey } from '@periscope/kvmi';

/** Event kinds a verdict is given for: every vCPU event of the catalog (not the VM event UNHOOK). */
export type VcpuEventKind = Exclude<EventKey, 'UNHOOK'>;

export const VCPU_EVENT_KINDS: readonly VcpuEventKind[] = (Object.keys(events) as EventKey[]).filter(
  (k): k is VcpuEventKind => events[k].scope === 'vcpu',
);

export function isVcpuEventKind(k: string): k is VcpuEventKind {
  return (VCPU_EVENT_KINDS as readonly string[]).includes(k);
}

/** `start <= x < end`. `end` may be 2^64 to include the all-ones value. */
export interface U64Range {
  readonly start: bigint;
  readonly end: bigint;
}

/** `(x & mask) == value`; bits of `value` outside `mask` are an error. */
export interface BitsMatch {
  readonly mask: bigint;
  readonly value: bigint;
}

/** A `kvm_regs` field name (`rax` … `r15`, `rip`, `rflags`). */
export type RegisterName = keyof S.KvmRegs;
export const REGISTER_NAMES: readonly RegisterName[] = S.kvm_regs.fields
  .filter((f) => !f.isPadding)
  .map((f) => f.name as RegisterName);

/** `(reg & mask) == value`, from the registers the event carries. */
export interface RegisterMatch {
  readonly reg: RegisterName;
  readonly mask: bigint;
  readonly value: bigint;
}

/** CPU mode as KVMI reports it (`kvmi_vcpu_event_arch.mode`): bytes per word. */
export type CpuMode = 2 | 4 | 8;

export interface EventMatch {
  /** Event kind; absent = every vCPU event kind (then no kind-specific criterion may be present). */
  readonly kind?: VcpuEventKind;
  /** VM UUIDs (canonical lower-case text); absent or empty = every VM. */
  readonly vms?: readonly string[];
  /** vCPU indexes; absent or empty = any vCPU. */
  readonly vcpus?: readonly number[];
  /** RIP ranges (OR); absent or empty = any. */
  readonly rip?: readonly U64Range[];
  readonly mode?: CpuMode;
  /** Register predicates (AND), e.g. RAX == 34 for a hypercall. */
  readonly regs?: readonly RegisterMatch[];

  // ---- CR, MSR, XSETBV: the register and its old/new value ----
  /** CR numbers (0, 3, 4). */
  readonly cr?: readonly number[];
  /** MSR indexes. */
  readonly msr?: readonly number[];
  /** XCR numbers (0). */
  readonly xcr?: readonly number[];
  readonly old?: BitsMatch;
  readonly new?: BitsMatch;
  /** Some bit of the mask goes 1 → 0: `(old & ~new & mask) != 0`. */
  readonly clears?: bigint;
  /** Some bit of the mask goes 0 → 1: `(~old & new & mask) != 0`. */
  readonly sets?: bigint;
  /** Some bit of the mask changes: `((old ^ new) & mask) != 0`. */
  readonly changes?: bigint;

  // ---- PF and BREAKPOINT ----
  /** Guest physical ranges (PF `gpa`, BREAKPOINT instruction `gpa`). */
  readonly gpa?: readonly U64Range[];
  /** Guest linear ranges (PF `gva`). */
  readonly gva?: readonly U64Range[];
  /** PF access bits (R=1, W=2, X=4): matches when `(access & mask) != 0`. */
  readonly access?: number;

  // ---- DESCRIPTOR ----
  /** `KVMI_DESC_*` values (IDTR=1, GDTR=2, LDTR=3, TR=4). */
  readonly descriptor?: readonly number[];
  /** Load (true) or store (false); absent = either. */
  readonly write?: boolean;

  // ---- TRAP ----
  /** Injected vectors. */
  readonly vector?: readonly number[];

  // ---- SINGLESTEP ----
  readonly failed?: boolean;
}

/**
 * What happens to a matching event.
 * - `allow`: CONTINUE; a CR/MSR reply carries the guest's new value.
 * - `deny` (CR/MSR): CONTINUE with the old value, or with `forceBits` pinned:
 *   `new_val = (new & ~forceBits) | (old & forceBits)` (the rest of the write goes through).
 * - `rewrite` (CR/MSR): CONTINUE with `new_val = (new & ~clearBits) | setBits` (proto `override_bits`;
 *   `fixed: v` is `clearBits = ~0, setBits = v`).
 * - `skip`: the host agent advances RIP past the instruction (decoded length), SET_REGISTERS, RETRY.
 * - `retry`: RETRY as is (the host agent must have changed something, or the instruction exits again).
 * - `inject`: VCPU_INJECT_EXCEPTION (vector, error code; #PF gets the event's gva as CR2), then RETRY.
 * - `crash`: CRASH (a CR/MSR reply still carries the old value).
 */
export type Action =
  | { readonly kind: 'allow' }
  | { readonly kind: 'deny'; readonly forceBits?: bigint }
  | { readonly kind: 'rewrite'; readonly clearBits?: bigint; readonly setBits?: bigint }
  | { readonly kind: 'skip' }
  | { readonly kind: 'retry' }
  | { readonly kind: 'inject'; readonly vector: number; readonly errorCode?: number }
  | { readonly kind: 'crash' };

export type ActionKind = Action['kind'];
export const ACTION_KINDS: readonly ActionKind[] = ['allow', 'deny', 'rewrite', 'skip', 'retry', 'inject', 'crash'];

/** Hold the vCPU and ask the analysis service, with a deadline and a default. */
export interface AskCentral {
  /** 1–1000 ms; default 5. Clamped to the policy's `maxAskCentralDeadlineMs`. */
  readonly deadlineMs?: number;
  /** Applied at the deadline (or when central is unreachable); absent = the kind's default action. */
  readonly default?: Action;
}

/**
 * Per-event reporting. `never` = counters only; `always` = a verdict record per event; `sampled` = one
 * event in `oneIn` (the first, then every N-th, per rule per evaluator). `withEvent` adds the whole event
 * (registers included) to the record.
 */
export interface ReportSetting {
  readonly mode: 'always' | 'sampled' | 'never';
  readonly oneIn?: number;
  readonly withEvent?: boolean;
}

export type Severity = 'info' | 'low' | 'medium' | 'high' | 'critical';
export const SEVERITIES: readonly Severity[] = ['info', 'low', 'medium', 'high', 'critical'];

export interface Rule {
  /** Stable id, unique in the policy; used by verdict records, exceptions and compile errors. */
  readonly id: string;
  readonly description?: string;
  readonly match: EventMatch;
  /** At most one of `action` / `askCentral`; neither = the kind's default action. */
  readonly action?: Action;
  readonly askCentral?: AskCentral;
  /** Absent = the policy's `defaultReport`. */
  readonly report?: ReportSetting;
  /** When present, every match also raises a local detection of this severity. */
  readonly severity?: Severity;
}

export interface PolicyException {
  readonly id: string;
  /** Rule ids this exception applies to; absent or empty = any rule and the default. */
  readonly rules?: readonly string[];
  readonly match: EventMatch;
  readonly action: Action;
  /** Absent = always. */
  readonly report?: ReportSetting;
  /** Expiry (Unix ns); absent or 0 = never. */
  readonly expiresUnixNs?: bigint;
  readonly reason?: string;
  readonly createdBy?: string;
}

/** What the host agent enables on every vCPU at attach (passed through; see `deriveInterception`). */
export interface Interception {
  readonly events: readonly VcpuEventKind[];
  readonly crs: readonly number[];
  readonly msrs: readonly number[];
}

export interface Policy {
  readonly id: string;
  readonly version: bigint;
  readonly description?: string;
  readonly rules: readonly Rule[];
  readonly exceptions?: readonly PolicyException[];
  /** Default action for every kind; absent = allow. */
  readonly defaultAction?: Action;
  /** Per-kind default actions (override `defaultAction`). */
  readonly defaultActions?: Partial<Readonly<Record<VcpuEventKind, Action>>>;
  /** Reporting for rules without `report` and for default verdicts; absent = always. */
  readonly defaultReport?: ReportSetting;
  /** Upper bound for every askCentral deadline (1–1000); absent = 1000. */
  readonly maxAskCentralDeadlineMs?: number;
  /** Upper bound on events held for central at once (enforced by the host agent). */
  readonly maxHeldEvents?: number;
  readonly interception?: Interception;
}

// ---- small vocabularies -------------------------------------------------------------------------

export const DESCRIPTOR_NAMES = Descriptor;

/** Exception vectors an `inject` may name, and whether the CPU pushes an error code for them. */
export const EXCEPTION_VECTORS: Readonly<Record<string, { readonly vector: number; readonly errorCode: boolean }>> = {
  '#DE': { vector: 0, errorCode: false },
  '#DB': { vector: 1, errorCode: false },
  '#BP': { vector: 3, errorCode: false },
  '#OF': { vector: 4, errorCode: false },
  '#BR': { vector: 5, errorCode: false },
  '#UD': { vector: 6, errorCode: false },
  '#NM': { vector: 7, errorCode: false },
  '#DF': { vector: 8, errorCode: true },
  '#TS': { vector: 10, errorCode: true },
  '#NP': { vector: 11, errorCode: true },
  '#SS': { vector: 12, errorCode: true },
  '#GP': { vector: 13, errorCode: true },
  '#PF': { vector: 14, errorCode: true },
  '#MF': { vector: 16, errorCode: false },
  '#AC': { vector: 17, errorCode: true },
  '#MC': { vector: 18, errorCode: false },
  '#XM': { vector: 19, errorCode: false },
  '#VE': { vector: 20, errorCode: false },
  '#CP': { vector: 21, errorCode: true },
};

export function vectorInfo(vector: number): { name: string; errorCode: boolean } | undefined {
  for (const [name, v] of Object.entries(EXCEPTION_VECTORS)) if (v.vector === vector) return { name, errorCode: v.errorCode };
  return undefined;
}

export const U64_MAX = 0xffff_ffff_ffff_ffffn;
/** Range ends may be 2^64 (exclusive), so the all-ones value can be included. */
export const RANGE_END_MAX = 0x1_0000_0000_0000_0000n;
