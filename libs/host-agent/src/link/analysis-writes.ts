/**
 * What the agent knows about analysis's changes to the guest — the bytes it wrote (breakpoint tracing's
 * INT3s, `VmConnection.writeRemembered`) and the vCPUs it single-steps — and how the agent keeps the guest
 * running when analysis cannot answer for them (docs/tracing.md, "Fail open"):
 *
 * - A BREAKPOINT at a byte analysis planted (0xCC, remembered) is held for analysis when its rule asks
 *   central; when analysis cannot answer (link down, hold limit, no such rule) or its deadline passes, the
 *   agent writes the original byte back itself and replies RETRY: the vCPU runs the guest's own instruction,
 *   never spins on the INT3 and never takes a #BP the guest did not cause. Analysis re-plants later.
 * - A BREAKPOINT anywhere else, on a VM where analysis plants (or whose rule asks central), is answered here
 *   at once: the byte still 0xCC is the guest's own INT3 (CONTINUE re-injects #BP into the guest); any other
 *   byte means an INT3 of ours was removed while the event was on its way (RETRY re-executes the original).
 * - A SINGLESTEP on a vCPU analysis put in singlestep that analysis cannot answer in time: the agent turns
 *   singlestep off (VCPU_CONTROL_SINGLESTEP 0) and replies CONTINUE.
 * - Persistence: the remembered bytes are written per VM UUID to the state directory (planted-store.ts); a
 *   VM re-attaching with bytes left by an earlier session or agent process (kill -9) gets them restored
 *   before analysis hears of the attach.
 */
import { EventAction, events, structs, type VcpuEventView } from '@periscope/kvmi';
import type { EventDecision, VmConnection } from '../vm-connection.js';
import type { PlantedStore } from './planted-store.js';

const BREAKPOINT = events.BREAKPOINT.id;
const SINGLESTEP = events.SINGLESTEP.id;
const INT3 = 0xcc;
const INVALID_GPA = 0xffff_ffff_ffff_ffffn;

export type AnalysisEventKind = 'planted-breakpoint' | 'foreign-breakpoint' | 'analysis-singlestep';

export interface AnalysisWritesOptions {
  store: PlantedStore;
  log: (level: 'info' | 'warn' | 'error', msg: string, fields?: Record<string, unknown>) => void;
}

export class AnalysisWrites {
  /** vCPUs analysis enabled singlestep on (relayed VCPU_CONTROL_SINGLESTEP), per VM connection. */
  private readonly singlestep = new WeakMap<VmConnection, Set<number>>();
  /** VM connections analysis wrote guest memory on (they get the foreign-INT3 check). */
  private readonly wroteOn = new WeakSet<VmConnection>();
  /** Restores of bytes left by an earlier session, by VM uuid, until done. */
  private readonly recovering = new Map<string, Promise<void>>();
  readonly stats = {
    /** Planted BREAKPOINTs answered by restoring the byte + RETRY (no central verdict). */
    breakpointFailOpen: 0,
    /** SINGLESTEPs answered by turning singlestep off + CONTINUE (no central verdict). */
    singlestepFailOpen: 0,
    /** The guest's own INT3s answered CONTINUE here. */
    guestBreakpoints: 0,
    /** BREAKPOINTs at a byte no longer 0xCC (an INT3 removed in flight), answered RETRY here. */
    staleBreakpoints: 0,
    /** Bytes restored at re-attach (left by an earlier session or a killed agent). */
    recoveredBytes: 0,
    /** Recorded bytes dropped at re-attach: the guest holds something else, or another boot. */
    recoveryDropped: 0,
  };

  constructor(private readonly opts: AnalysisWritesOptions) {}

  /** A VM attached: persist its remembered bytes from now on; restore what an earlier session left. */
  attach(vm: VmConnection): Promise<void> | undefined {
    const info = vm.info;
    if (!info) return undefined;
    vm.onRememberedChange = (v) => {
      this.wroteOn.add(v);
      this.opts.store.set(v.uuid, info.startTimeMs, v.rememberedBytes());
    };
    const left = this.opts.store.get(vm.uuid);
    if (!left) return undefined;
    if (left.startTimeMs !== info.startTimeMs) {
      this.stats.recoveryDropped += left.bytes.size;
      this.opts.log('info', 'breakpoints recorded for an earlier boot of this VM dropped (the guest restarted)', { vm: vm.uuid, bytes: left.bytes.size });
      this.opts.store.set(vm.uuid, info.startTimeMs, new Map());
      return undefined;
    }
    const work = (async () => {
      vm.adoptRemembered(left.bytes);
      let restored = 0;
      let changed = 0;
      for (const gpa of [...left.bytes.keys()]) {
        try {
          const r = await vm.restoreRemembered(gpa, true);
          if (r === 'restored') restored++;
          else if (r === 'changed') changed++;
        } catch (e) {
          this.opts.log('warn', `restoring a byte left in the guest failed: ${(e as Error).message}`, { vm: vm.uuid, gpa: hex(gpa) });
        }
      }
      this.stats.recoveredBytes += restored;
      this.stats.recoveryDropped += changed;
      this.opts.log('warn', 'bytes analysis had written (breakpoints) were still in the guest after an unclean stop: restored', { vm: vm.uuid, restored, changedByGuest: changed });
    })().finally(() => this.recovering.delete(vm.uuid));
    this.recovering.set(vm.uuid, work);
    return work;
  }

  /** True while bytes left by an earlier session are being restored on this VM. */
  recoveringVm(uuid: string): boolean {
    return this.recovering.has(uuid);
  }

  /** A relayed VCPU_CONTROL_SINGLESTEP succeeded. */
  singlestepSet(vm: VmConnection, vcpu: number, enabled: boolean): void {
    let s = this.singlestep.get(vm);
    if (!s) this.singlestep.set(vm, (s = new Set()));
    if (enabled) s.add(vcpu);
    else s.delete(vcpu);
  }

  /**
   * Which of analysis's cases this event is, if any. `centralAsked`: the event's rule asks central (the
   * local policy routes this VM's breakpoints to analysis).
   */
  classify(vm: VmConnection, view: VcpuEventView, centralAsked: boolean): AnalysisEventKind | undefined {
    if (view.eventId === BREAKPOINT) {
      const gpa = view.specificU64(structs.kvmi_vcpu_event_breakpoint, 'gpa');
      if (vm.rememberedAt(gpa)?.written === INT3) return 'planted-breakpoint';
      if (gpa !== INVALID_GPA && (centralAsked || this.wroteOn.has(vm))) return 'foreign-breakpoint';
      return undefined;
    }
    if (view.eventId === SINGLESTEP && this.singlestep.get(vm)?.has(view.vcpu)) return 'analysis-singlestep';
    return undefined;
  }

  /** The decision when analysis does not (or cannot) answer: see the file comment. */
  localDecision(vm: VmConnection, view: VcpuEventView, kind: AnalysisEventKind): EventDecision {
    const vcpu = view.vcpu;
    if (kind === 'planted-breakpoint') {
      const gpa = view.specificU64(structs.kvmi_vcpu_event_breakpoint, 'gpa');
      return { kind: 'work', ruleId: 'agent/breakpoint-fail-open', run: () => this.failOpenBreakpoint(vm, vcpu, gpa, 'analysis unavailable') };
    }
    if (kind === 'analysis-singlestep') {
      return { kind: 'work', ruleId: 'agent/singlestep-fail-open', run: () => this.failOpenSinglestep(vm, vcpu, 'analysis unavailable') };
    }
    const gpa = view.specificU64(structs.kvmi_vcpu_event_breakpoint, 'gpa');
    return { kind: 'work', ruleId: 'agent/foreign-breakpoint', run: () => this.foreignBreakpoint(vm, gpa) };
  }

  /** A held event of this kind took its default (deadline, link down): answer it as failing open. */
  failOpenHeld(vm: VmConnection, view: { vcpu: number; seq: number; gpa: bigint }, kind: AnalysisEventKind, why: string): void {
    const work = kind === 'planted-breakpoint' ? this.failOpenBreakpoint(vm, view.vcpu, view.gpa, why) : this.failOpenSinglestep(vm, view.vcpu, why);
    void work.then((r) => vm.replyHeldSeq(view.vcpu, view.seq, r.action));
  }

  private async failOpenBreakpoint(vm: VmConnection, vcpu: number, gpa: bigint, why: string): Promise<{ action: number }> {
    this.stats.breakpointFailOpen++;
    try {
      const r = await vm.restoreRemembered(gpa);
      this.opts.log('warn', `breakpoint failed open (${why}): original byte ${r === 'restored' ? 'restored' : 'already back'}, vCPU resumes untraced; analysis re-plants when it can`, { vm: vm.uuid, vcpu, gpa: hex(gpa) });
    } catch (e) {
      this.opts.log('error', `breakpoint fail-open could not restore the byte: ${(e as Error).message}`, { vm: vm.uuid, vcpu, gpa: hex(gpa) });
    }
    return { action: EventAction.RETRY };
  }

  private async failOpenSinglestep(vm: VmConnection, vcpu: number, why: string): Promise<{ action: number }> {
    this.stats.singlestepFailOpen++;
    try {
      await vm.session.request('VCPU_CONTROL_SINGLESTEP', { vcpu, enable: 0 });
      this.singlestepSet(vm, vcpu, false);
      this.opts.log('warn', `singlestep failed open (${why}): singlestep turned off`, { vm: vm.uuid, vcpu });
    } catch (e) {
      this.opts.log('error', `singlestep fail-open could not turn singlestep off: ${(e as Error).message}`, { vm: vm.uuid, vcpu });
    }
    return { action: EventAction.CONTINUE };
  }

  private async foreignBreakpoint(vm: VmConnection, gpa: bigint): Promise<{ action: number }> {
    const r = await vm.session.tryRequest('VM_READ_PHYSICAL', { gpa, size: 1 });
    if (r.ok && r.value.data[0] !== INT3) {
      this.stats.staleBreakpoints++;
      return { action: EventAction.RETRY };
    }
    this.stats.guestBreakpoints++;
    return { action: EventAction.CONTINUE };
  }
}

function hex(v: bigint): string {
  return `0x${v.toString(16)}`;
}
