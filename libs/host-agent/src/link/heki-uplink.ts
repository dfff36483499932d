/**
 * Heki state up the analysis link (issue #11): the sink's `registered` / `configure` / `denial` events
 * become `HekiVmRegistered` / `HekiConfigure` / `HekiDenial` link messages, and analysis's
 * `HekiPolicyUpdate` (per-VM denial completion) feeds the sink's `decideDenial` hook.
 *
 * - Nothing here is on a VMM's critical path: events are sent on the link's own turn; the decider answers
 *   from a map (synchronously resolved promise), never waiting for analysis.
 * - After every (re)connect: one `HekiVmRegistered` per VM the sink knows (with its pins so far), then the
 *   denials not yet acknowledged (`DetectionAck` with their detection ids: at-least-once, bounded).
 */
import {
  DenialCompletion,
  HekiReason,
  uuidFromBytes,
  uuidToBytes,
  type HekiPolicyUpdate,
  type LinkRequest,
} from '@periscope/contracts';
import type { HekiConfigureRecord, HekiCr, HekiDenialAction, HekiDenialRecord, HekiSink, HekiVmState } from '../heki/sink.js';

/** What the uplink needs from the link client. */
export interface HekiUplinkClient {
  readonly up: boolean;
  send(message: LinkRequest['message']): boolean;
}

const REASON: Record<HekiCr, HekiReason> = { CR0: HekiReason.HEKI_REASON_CR0, CR4: HekiReason.HEKI_REASON_CR4 };
const msToNs = (ms: number | undefined): bigint => (ms === undefined ? 0n : BigInt(Math.floor(ms)) * 1_000_000n);
const completionOf = (a: HekiDenialAction): DenialCompletion => (a === 'stop' ? DenialCompletion.DENIAL_COMPLETION_STOP_VM : DenialCompletion.DENIAL_COMPLETION_INJECT_GP);

export class HekiUplink {
  /** Denials sent (or to send) and not yet acknowledged by analysis, by detection id. */
  private readonly unacked = new Map<string, NonNullable<Extract<LinkRequest['message'], { $case: 'hekiDenial' }>>['value']>();
  /** Per-VM denial completion pushed by analysis. */
  private readonly completions = new Map<string, HekiDenialAction>();
  readonly stats = { registered: 0, configures: 0, denials: 0, denialsResent: 0, denialsDropped: 0, policyUpdates: 0, stopRefused: 0 };

  /**
   * `allowStop`: analysis may make a denial stop the VM (`--allow-command crash`, the same key as a central
   * CRASH verdict); otherwise a pushed STOP_VM is refused (counted, logged) and the sink's own policy applies.
   */
  constructor(
    private readonly hostId: string,
    private readonly sink: HekiSink,
    private readonly client: HekiUplinkClient,
    private readonly opts: { allowStop: boolean; log?: (level: 'warn', msg: string, fields?: Record<string, unknown>) => void; maxUnacked?: number } = { allowStop: false },
  ) {
    sink.on('registered', (vm) => {
      this.stats.registered++;
      if (this.client.up) this.client.send({ $case: 'hekiRegistered', value: this.registered(vm) });
    });
    sink.on('configure', (rec, vm) => {
      this.stats.configures++;
      if (this.client.up) this.client.send({ $case: 'hekiConfigure', value: this.configure(rec, vm) });
    });
    sink.on('denial', (rec, vm) => {
      this.stats.denials++;
      const d = this.denial(rec, vm);
      if (this.unacked.size >= (this.opts.maxUnacked ?? 4096)) {
        const oldest = this.unacked.keys().next().value;
        if (oldest !== undefined) this.unacked.delete(oldest);
        this.stats.denialsDropped++;
      }
      this.unacked.set(d.detectionId, d);
      if (this.client.up) this.client.send({ $case: 'hekiDenial', value: d });
    });
  }

  /** The stream is up: the sink's VMs (a snapshot), then unacknowledged denials. */
  onUp(): void {
    for (const vm of this.sink.vms()) this.client.send({ $case: 'hekiRegistered', value: this.registered(vm) });
    for (const d of this.unacked.values()) {
      this.stats.denialsResent++;
      this.client.send({ $case: 'hekiDenial', value: d });
    }
  }

  /** DetectionAck: ids that are not Heki denials are ignored. */
  ack(ids: readonly string[]): void {
    for (const id of ids) this.unacked.delete(id);
  }

  get pendingDenials(): number {
    return this.unacked.size;
  }

  /**
   * Analysis's per-VM completions (the whole set: VMs not listed fall back to the agent's policy). STOP_VM
   * without `allowStop` is refused for that VM: the agent's own policy applies to it.
   */
  applyPolicy(u: HekiPolicyUpdate): void {
    this.stats.policyUpdates++;
    this.completions.clear();
    const refused: string[] = [];
    for (const v of u.vms) {
      let uuid: string;
      try {
        uuid = uuidFromBytes(v.vmUuid);
      } catch {
        continue;
      }
      if (v.denialCompletion === DenialCompletion.DENIAL_COMPLETION_STOP_VM) {
        if (this.opts.allowStop) this.completions.set(uuid, 'stop');
        else refused.push(uuid);
      } else if (v.denialCompletion === DenialCompletion.DENIAL_COMPLETION_INJECT_GP) this.completions.set(uuid, 'reenter');
    }
    if (refused.length > 0) {
      this.stats.stopRefused += refused.length;
      this.opts.log?.('warn', `Heki STOP_VM completion from analysis refused by this agent's allow-list for ${refused.length} VM(s): enable it with --allow-command crash (config key "allow-command"); the agent's own --heki-denial applies`, {
        vms: refused.slice(0, 3),
      });
    }
  }

  /** The completion analysis asked for this VM, or undefined (the sink's policy applies). */
  completionFor(uuid: string): HekiDenialAction | undefined {
    return this.completions.get(uuid);
  }

  /** The sink's `decideDenial` hook: answered at once from the pushed map. */
  decide = (exit: { uuid: string }): Promise<HekiDenialAction | undefined> => Promise.resolve(this.completions.get(exit.uuid));

  private registered(vm: HekiVmState): NonNullable<Extract<LinkRequest['message'], { $case: 'hekiRegistered' }>>['value'] {
    return {
      hostId: this.hostId,
      vmUuid: uuidToBytes(vm.uuid),
      vmName: vm.name,
      hostHasHeki: vm.hostHasHeki,
      configureReasons: vm.configureReasons.map((c) => REASON[c]),
      denialReasons: vm.denialReasons.map((c) => REASON[c]),
      qemuStartTimeMs: vm.qemuStartTimeMs,
      registeredUnixNs: msToNs(vm.registeredAtMs),
      pinnedCr0: vm.pinnedCr0,
      pinnedCr4: vm.pinnedCr4,
      firstPinUnixNs: msToNs(vm.firstPinAtMs),
      lastPinUnixNs: msToNs(vm.lastPinAtMs),
      configureExits: vm.configureExits,
      denials: vm.denials,
      stops: vm.stops,
      defaultCompletion: completionOf(this.sink.policy.denial),
      analysisStopAllowed: this.opts.allowStop,
    };
  }

  private configure(r: HekiConfigureRecord, vm: HekiVmState): NonNullable<Extract<LinkRequest['message'], { $case: 'hekiConfigure' }>>['value'] {
    return {
      hostId: this.hostId,
      vmUuid: uuidToBytes(r.uuid),
      vcpu: r.vcpu,
      reason: REASON[r.cr],
      crPinned: r.bits,
      rip: r.rip,
      exitUnixNs: r.exitUnixNs || msToNs(Date.now()),
      pinnedCr0: r.pinnedCr0,
      pinnedCr4: r.pinnedCr4,
      qemuStartTimeMs: vm.qemuStartTimeMs,
    };
  }

  private denial(r: HekiDenialRecord, vm: HekiVmState): NonNullable<Extract<LinkRequest['message'], { $case: 'hekiDenial' }>>['value'] {
    return {
      detectionId: r.detectionId,
      hostId: this.hostId,
      vmUuid: uuidToBytes(r.uuid),
      vcpu: r.vcpu,
      reason: REASON[r.cr],
      attemptedValue: r.attemptedValue,
      rip: r.rip,
      exitUnixNs: r.exitUnixNs || msToNs(Date.now()),
      clearedPins: r.clearedPins,
      pinnedCr0: vm.pinnedCr0,
      pinnedCr4: vm.pinnedCr4,
      completion: completionOf(r.completion),
      decidedBy: r.decidedBy === 'decider' ? 'analysis' : this.completions.has(r.uuid) || r.decidedBy === 'policy' ? r.decidedBy : 'policy',
      vmName: vm.name,
      qemuStartTimeMs: vm.qemuStartTimeMs,
    };
  }
}
