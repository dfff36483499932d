/**
 * Events held for a central verdict (ask-central rules), keyed by (VM uuid, session generation, seq).
 *
 * Each held event has a deadline timer (the rule's `deadlineMs`, 1–1000). The first of these wins and
 * the others are dropped and counted — never a second reply to KVM:
 *   - an `EventVerdict` for the key → applied (tier CENTRAL), or the default when it is unusable;
 *   - the deadline → the rule's default (DEFAULT_REASON_DEADLINE);
 *   - the stream going down → the default at once (DEFAULT_REASON_CENTRAL_UNAVAILABLE);
 *   - the session ending → nothing to answer (KVM released the vCPU).
 * A verdict for a key that is not held (late, already defaulted, an older session) is counted as late.
 */
import { DefaultReason, VerdictTier, type EventVerdict } from '@periscope/contracts';
import { uuidFromBytes } from '@periscope/contracts';
import { decisionToReply } from './convert.js';
import type { VmConnection } from '../vm-connection.js';

export interface HeldEntry {
  readonly key: string;
  readonly vm: VmConnection;
  readonly vcpu: number;
  readonly seq: number;
  readonly eventId: number;
  readonly defaultAction: number;
  readonly defaultNewVal: bigint | undefined;
  /** CR/MSR old/new values (for central reply values). */
  readonly values: { old: bigint; new: bigint } | undefined;
  readonly deadlineMs: number;
  /**
   * Instead of replying the default action: answer the held event some other way (breakpoint tracing's
   * fail-open, analysis-writes.ts), given the reason. It must reply to the vCPU itself.
   */
  readonly failOpen?: (reason: DefaultReason) => void;
  timer: NodeJS.Timeout | undefined;
}

export interface Resolution {
  tier: VerdictTier;
  reason: DefaultReason;
}

export interface HeldEventRegistryOptions {
  /** Before the reply is written: how it was decided (for the verdict record). */
  onResolve(entry: HeldEntry, how: Resolution): void;
  /** Central CRASH verdicts are refused unless allowed (`--allow-command crash`). */
  allowCrash: boolean;
  /**
   * Central verdicts that make a CR/MSR write land with a value that is neither the guest's old nor its new
   * one (`fixed`, `override_bits`) are refused unless allowed (`--allow-command set-registers`): analysis
   * would be choosing register contents, as with VCPU_SET_REGISTERS. `keep_old` / `keep_new` need no key.
   */
  allowSetRegisters: boolean;
  log: (level: 'warn', msg: string, fields?: Record<string, unknown>) => void;
}

export function heldKey(uuid: string, generation: number | bigint, seq: number): string {
  return `${uuid}/${generation}/${seq}`;
}

const CRASH = 2;

export class HeldEventRegistry {
  private readonly held = new Map<string, HeldEntry>();
  readonly stats = { held: 0, central: 0, deadline: 0, unavailable: 0, holdLimit: 0, late: 0, invalid: 0 };

  constructor(private readonly opts: HeldEventRegistryOptions) {}

  get size(): number {
    return this.held.size;
  }

  hold(e: Omit<HeldEntry, 'key' | 'timer'>): HeldEntry {
    const key = heldKey(e.vm.uuid, e.vm.info?.sessionGeneration ?? 0, e.seq);
    const entry: HeldEntry = { ...e, key, timer: undefined };
    entry.timer = setTimeout(() => this.resolveDefault(entry, DefaultReason.DEFAULT_REASON_DEADLINE), e.deadlineMs);
    this.held.set(key, entry);
    this.stats.held++;
    return entry;
  }

  /** A verdict from analysis. Returns what happened. */
  verdict(v: EventVerdict): 'applied' | 'late' | 'invalid' {
    let uuid: string;
    try {
      uuid = uuidFromBytes(v.vmUuid);
    } catch {
      this.stats.late++;
      return 'late';
    }
    const key = heldKey(uuid, v.sessionGeneration, v.seq);
    const entry = this.held.get(key);
    if (!entry) {
      this.stats.late++;
      return 'late';
    }
    const r = decisionToReply(v.decision, entry.eventId, entry.values);
    const refusal = !r.ok
      ? `unusable central verdict: ${r.why}`
      : r.action === CRASH && !this.opts.allowCrash
        ? 'central CRASH verdict refused: enable it with --allow-command crash (config key "allow-command")'
        : r.newVal !== undefined && entry.values && r.newVal !== entry.values.old && r.newVal !== entry.values.new && !this.opts.allowSetRegisters
          ? 'central verdict choosing a register value the guest did not write refused: enable it with --allow-command set-registers (config key "allow-command")'
          : undefined;
    if (refusal || !r.ok) {
      this.stats.invalid++;
      this.opts.log('warn', refusal ?? 'unusable central verdict', { vm: uuid, seq: v.seq });
      this.resolveDefault(entry, DefaultReason.DEFAULT_REASON_INVALID_VERDICT);
      return 'invalid';
    }
    this.finish(entry);
    this.opts.onResolve(entry, { tier: VerdictTier.VERDICT_TIER_CENTRAL, reason: DefaultReason.DEFAULT_REASON_UNSPECIFIED });
    if (entry.vm.replyHeldSeq(entry.vcpu, entry.seq, r.action, r.newVal)) this.stats.central++;
    return 'applied';
  }

  /** The stream is down: every held event takes its default now. */
  releaseAll(reason: DefaultReason = DefaultReason.DEFAULT_REASON_CENTRAL_UNAVAILABLE): void {
    for (const e of [...this.held.values()]) this.resolveDefault(e, reason);
  }

  /** The VM session ended: forget its entries (KVM released the vCPUs). */
  dropVm(vm: VmConnection): void {
    for (const e of [...this.held.values()]) if (e.vm === vm) this.finish(e);
  }

  private resolveDefault(entry: HeldEntry, reason: DefaultReason): void {
    if (!this.held.has(entry.key)) return;
    this.finish(entry);
    if (reason === DefaultReason.DEFAULT_REASON_DEADLINE) this.stats.deadline++;
    else if (reason === DefaultReason.DEFAULT_REASON_CENTRAL_UNAVAILABLE) this.stats.unavailable++;
    this.opts.onResolve(entry, { tier: VerdictTier.VERDICT_TIER_DEFAULT, reason });
    if (entry.failOpen) entry.failOpen(reason);
    else entry.vm.replyHeldSeq(entry.vcpu, entry.seq, entry.defaultAction, entry.defaultNewVal);
  }

  private finish(entry: HeldEntry): void {
    if (entry.timer) clearTimeout(entry.timer);
    entry.timer = undefined;
    this.held.delete(entry.key);
  }
}
