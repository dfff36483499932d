/**
 * Many simulated VMs in one process, each with its own QEMU and its own socket to the introspector:
 * what `periscope sim` runs. Optionally drives a background guest workload (CR3 switches, MSR writes,
 * hypercalls, memory accesses, XSETBV, descriptor-table stores) so that an introspector that enables
 * events receives a steady stream of them.
 */
import { ensureFdLimit } from './limits.js';
import { MSR } from './guest/cpu.js';
import type { DescriptorId, SimVcpu } from './kvm/vcpu.js';
import { SimVm } from './kvm/vm.js';
import { DEFAULT_HOST_PROFILE, type HostProfile } from './profile.js';
import { deriveSeed, mulberry32, randInt, type Prng } from './prng.js';
import { SimQemu, type ShutdownReport } from './qemu.js';

export interface SimulatorOptions {
  /** The introspector's Unix socket path (every VM's QEMU connects to it). */
  introspector: string;
  vms: number;
  /** vCPUs per VM. Default 1. */
  vcpus?: number;
  seed?: number;
  pureV12?: boolean;
  handshake?: 96 | 104;
  key?: Uint8Array;
  profile?: HostProfile;
  jitterMs?: number;
  reconnectSeconds?: number;
  handshakeTimeoutMs?: number;
  unhookTimeoutMs?: number;
  memoryMiB?: number;
  /** APs online from the start (a booted guest). Default true. */
  apsOnline?: boolean;
  stallThresholdMs?: number;
  /** Guest actions per vCPU per second (0 = idle guests). Default 0. */
  activity?: number;
  log?: (line: string) => void;
}

export interface SimStats {
  vms: number;
  vcpus: number;
  /** VMs whose socket to the introspector is hooked and up. */
  connected: number;
  eventsSent: number;
  eventReplies: number;
  commandsExecuted: number;
  errorReplies: number;
  connectionLosses: number;
  hardErrors: number;
  handshakeFailures: number;
  /** Replies that took longer than the stall threshold. */
  stalls: number;
  /** vCPUs waiting for a reply longer than the stall threshold right now. */
  stalledNow: number;
  maxReplyWaitMs: number;
  guestActions: number;
  crashedVcpus: number;
  internalErrors: number;
}

export interface SimSummary extends SimStats {
  seed: number;
  durationMs: number;
  shutdown: { preunhookSent: number; closedByTool: number; timedOut: number; notHooked: number };
}

export class Simulator {
  readonly vms: readonly SimVm[];
  readonly qemus: readonly SimQemu[];
  private readonly opts: SimulatorOptions;
  private readonly started = Date.now();
  private running = false;
  private guestActions = 0;
  private readonly workloads: Promise<void>[] = [];
  private stopWorkloads!: () => void;
  private readonly stopped = new Promise<void>((resolve) => {
    this.stopWorkloads = resolve;
  });

  constructor(opts: SimulatorOptions) {
    this.opts = opts;
    const vms: SimVm[] = [];
    const qemus: SimQemu[] = [];
    for (let i = 0; i < opts.vms; i++) {
      const vm = new SimVm({
        index: i,
        vcpus: opts.vcpus ?? 1,
        seed: opts.seed ?? 1,
        pureV12: opts.pureV12 ?? false,
        profile: opts.profile ?? DEFAULT_HOST_PROFILE,
        apsOnline: opts.apsOnline ?? true,
        ...(opts.jitterMs !== undefined ? { jitterMs: opts.jitterMs } : {}),
        ...(opts.memoryMiB !== undefined ? { memoryMiB: opts.memoryMiB } : {}),
        ...(opts.stallThresholdMs !== undefined ? { stallThresholdMs: opts.stallThresholdMs } : {}),
      });
      vms.push(vm);
      qemus.push(
        new SimQemu(vm, {
          path: opts.introspector,
          handshake: opts.handshake ?? 104,
          ...(opts.key ? { key: opts.key } : {}),
          ...(opts.reconnectSeconds !== undefined ? { reconnectSeconds: opts.reconnectSeconds } : {}),
          ...(opts.handshakeTimeoutMs !== undefined ? { handshakeTimeoutMs: opts.handshakeTimeoutMs } : {}),
          ...(opts.unhookTimeoutMs !== undefined ? { unhookTimeoutMs: opts.unhookTimeoutMs } : {}),
          ...(opts.log ? { log: opts.log } : {}),
        }),
      );
    }
    this.vms = vms;
    this.qemus = qemus;
  }

  /** Check the descriptor limit (throws `SimError('fd-limit')`), then start every QEMU. */
  start(): void {
    if (this.running) return;
    ensureFdLimit(this.vms.length);
    this.running = true;
    for (const q of this.qemus) q.start();
    const rate = this.opts.activity ?? 0;
    if (rate > 0) {
      for (const vm of this.vms) for (const v of vm.vcpus) this.workloads.push(this.workload(vm, v, rate));
    }
  }

  stats(): SimStats {
    const now = Date.now();
    const s: SimStats = {
      vms: this.vms.length, vcpus: 0, connected: 0, eventsSent: 0, eventReplies: 0, commandsExecuted: 0, errorReplies: 0,
      connectionLosses: 0, hardErrors: 0, handshakeFailures: 0, stalls: 0, stalledNow: 0, maxReplyWaitMs: 0,
      guestActions: this.guestActions, crashedVcpus: 0, internalErrors: 0,
    };
    for (const vm of this.vms) {
      const v = vm.stats;
      s.vcpus += vm.vcpus.length;
      if (vm.connected) s.connected++;
      s.eventsSent += v.eventsSent;
      s.eventReplies += v.eventReplies;
      s.commandsExecuted += v.commandsExecuted;
      s.errorReplies += v.errorReplies;
      s.connectionLosses += v.connectionLosses;
      s.hardErrors += v.hardErrors;
      s.stalls += v.stalls;
      s.internalErrors += v.internalErrors;
      s.maxReplyWaitMs = Math.max(s.maxReplyWaitMs, v.maxReplyWaitMs);
      for (const c of vm.vcpus) {
        const w = c.waitingFor;
        if (w && now - w.sinceMs > vm.stallThresholdMs) s.stalledNow++;
        if (c.isCrashed) s.crashedVcpus++;
      }
    }
    for (const q of this.qemus) s.handshakeFailures += q.stats.handshakeFailures;
    return s;
  }

  /** Clean shutdown of every VM through PREUNHOOK (in parallel), then a summary. */
  async shutdown(): Promise<SimSummary> {
    this.running = false;
    this.stopWorkloads();
    const reports: ShutdownReport[] = await Promise.all(this.qemus.map((q) => q.shutdown()));
    await Promise.all(this.workloads);
    const shutdown = { preunhookSent: 0, closedByTool: 0, timedOut: 0, notHooked: 0 };
    for (const r of reports) {
      if (r.preunhook === 'not-hooked') shutdown.notHooked++;
      else if (r.preunhook === '0') {
        shutdown.preunhookSent++;
        if (r.closedByTool) shutdown.closedByTool++;
        else shutdown.timedOut++;
      }
    }
    return { ...this.stats(), seed: this.opts.seed ?? 1, durationMs: Date.now() - this.started, shutdown };
  }

  private async workload(vm: SimVm, vcpu: SimVcpu, perSecond: number): Promise<void> {
    const prng: Prng = mulberry32(deriveSeed(this.opts.seed ?? 1, 0x776b, vm.index, vcpu.index));
    const meanMs = 1000 / perSecond;
    let xcr0 = vcpu.cpu.xcr0;
    while (this.running) {
      const delay = Math.min(-Math.log(1 - prng()) * meanMs, meanMs * 10);
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([new Promise((r) => (timer = setTimeout(r, delay))), this.stopped]);
      clearTimeout(timer);
      if (!this.running || vcpu.isCrashed || !vcpu.isOnline) continue;
      this.guestActions++;
      switch (randInt(prng, 6)) {
        case 0: // context switch: toggle CR3.PWT (the page tables stay valid)
          await vcpu.writeCr(3, vcpu.cpu.readCr(3) ^ 0x8n);
          break;
        case 1:
          await vcpu.wrmsr(MSR.TSC_AUX, BigInt(randInt(prng, 0x10000)));
          break;
        case 2:
          await vcpu.vmcall();
          break;
        case 3: {
          const off = BigInt(randInt(prng, Number(vm.pageTables.identityBytes >> 12n))) << 12n;
          await vcpu.access({ gva: vm.pageTables.kernelBase + off }, prng() < 0.5 ? 'r' : 'w');
          break;
        }
        case 4:
          xcr0 = xcr0 === 0x7n ? 0x3n : 0x7n;
          await vcpu.xsetbv(xcr0 & vm.profile.xsaveFeatures);
          break;
        default:
          await vcpu.descriptorAccess((1 + randInt(prng, 4)) as DescriptorId, false);
      }
    }
  }
}
