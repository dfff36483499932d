/**
 * Many simulated VMs in one process, each with its own QEMU and its own socket to the introspector:
 * what `periscope sim` runs. Optionally drives a deterministic benign guest workload (the synthetic
 * kernel's own routines: boot-time MSR and XCR0 setup, memory traffic, CR3 switches, module loads,
 * text_poke, hypercalls, descriptor-table stores) and runs scenario files on chosen VMs.
 */
import { rmSync } from 'node:fs';

import { ensureFdLimit } from './limits.js';
import { BOOT_MSRS, MSR } from './guest/cpu.js';
import { MODULES_VADDR, STATIC_KEY_VARIANTS } from './guest/kernel.js';
import { ramFdPoolSize, tempRunDir } from './guest/ram.js';
import type { SimVcpu } from './kvm/vcpu.js';
import { SimVm } from './kvm/vm.js';
import { DEFAULT_HOST_PROFILE, type HostProfile } from './profile.js';
import { HekiVmm } from './heki/vmm.js';
import { deriveSeed, mulberry32, randInt, type Prng } from './prng.js';
import { SimQemu, type ShutdownReport } from './qemu.js';
import { callTaggedCopy } from './guest/tagged-copy.js';
import { runScenario } from './scenario/run.js';
import type { Scenario, ScenarioReport } from './scenario/types.js';

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
  /**
   * Where the VMs' RAM files `<uuid>.ram` go. Default: a temporary directory removed at shutdown; a
   * given directory keeps the files after shutdown.
   */
  runDir?: string;
  /** APs online from the start (a booted guest). Default true. */
  apsOnline?: boolean;
  /**
   * The guests start before the kernel's boot code ran (MSRs and XCR0 at reset values); the workload's
   * boot sequence sets them, so an introspector sees those writes. Default false.
   */
  coldBoot?: boolean;
  stallThresholdMs?: number;
  /** Benign workload: kernel routine calls per vCPU per second (0 = idle guests). Default 0. */
  activity?: number;
  /** The workload starts this long after its VM is hooked (the introspector sets up). Default 0. */
  workloadDelayMs?: number;
  /** Scenarios to run (in order) on each VM of `scenarioVms`, once that VM is hooked. */
  scenarios?: readonly Scenario[];
  /** VM indexes for the scenarios; default [0]. */
  scenarioVms?: readonly number[] | 'all';
  /** Wait this long after a VM is hooked before its first scenario (the introspector sets up). Default 1000 ms. */
  scenarioDelayMs?: number;
  /** Run the scenarios again this long after each pass, until shutdown (the demo's attack loop). Only the first pass is reported. */
  scenarioLoopMs?: number;
  /**
   * `unix:PATH` of the host agent's Heki sink: each VM's simulated VMM enables the Heki notification caps
   * and forwards configure/denial exits there (docs/heki.md). Default: no Heki forwarding.
   */
  hekiSink?: string;
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
  livelocks: number;
  internalErrors: number;
}

export interface SimSummary extends SimStats {
  seed: number;
  durationMs: number;
  shutdown: { preunhookSent: number; closedByTool: number; timedOut: number; notHooked: number };
  /** Scenario reports (when scenarios were given). */
  scenarios?: ScenarioReport[];
}

export class Simulator {
  readonly vms: readonly SimVm[];
  readonly qemus: readonly SimQemu[];
  /** The VMMs' Heki forwarders (with `hekiSink`), one per VM. */
  readonly hekiVmms: HekiVmm[] = [];
  /** Where the RAM files are. */
  readonly runDir: string;
  private readonly ownRunDir: boolean;
  private readonly opts: SimulatorOptions;
  private readonly started = Date.now();
  private running = false;
  private guestActions = 0;
  private readonly workloads: Promise<void>[] = [];
  private stopWorkloads!: () => void;
  private readonly stopped = new Promise<void>((resolve) => {
    this.stopWorkloads = resolve;
  });
  private scenarioRun: Promise<ScenarioReport[]> | null = null;
  private readonly reports: ScenarioReport[] = [];

  constructor(opts: SimulatorOptions) {
    this.opts = opts;
    this.ownRunDir = opts.runDir === undefined;
    this.runDir = opts.runDir ?? tempRunDir();
    const vms: SimVm[] = [];
    const qemus: SimQemu[] = [];
    try {
      for (let i = 0; i < opts.vms; i++) {
        const vm = new SimVm({
          index: i,
          vcpus: opts.vcpus ?? 1,
          seed: opts.seed ?? 1,
          pureV12: opts.pureV12 ?? false,
          profile: opts.profile ?? DEFAULT_HOST_PROFILE,
          apsOnline: opts.apsOnline ?? true,
          booted: !(opts.coldBoot ?? false),
          runDir: this.runDir,
          removeRamOnClose: this.ownRunDir,
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
    } catch (err) {
      for (const vm of vms) vm.close();
      if (this.ownRunDir) rmSync(this.runDir, { recursive: true, force: true });
      throw err;
    }
    this.vms = vms;
    this.qemus = qemus;
  }

  /**
   * Check the descriptor limit (one socket per VM plus the RAM-file pool; throws `SimError('fd-limit')`),
   * then start every QEMU, the workload and the scenarios.
   */
  start(): void {
    if (this.running) return;
    ensureFdLimit(this.vms.length + Math.min(this.vms.length, ramFdPoolSize()));
    this.running = true;
    for (const q of this.qemus) q.start();
    if (this.opts.hekiSink !== undefined) {
      for (const vm of this.vms) {
        const h = new HekiVmm(vm, { sink: this.opts.hekiSink, ...(this.opts.log ? { log: this.opts.log } : {}) });
        this.hekiVmms.push(h);
        void h.start(); // the caps are enabled synchronously; registration is best effort
      }
    }
    const rate = this.opts.activity ?? 0;
    if (rate > 0) {
      for (const [i, vm] of this.vms.entries()) {
        for (const v of vm.vcpus) this.workloads.push(this.workload(vm, this.qemus[i]!, v, rate));
      }
    }
    if ((this.opts.scenarios?.length ?? 0) > 0) this.scenarioRun = this.runScenarios();
  }

  /** Resolves with every scenario report once all scenarios ran (immediately with [] when there are none). */
  scenariosDone(): Promise<ScenarioReport[]> {
    return this.scenarioRun ?? Promise.resolve([]);
  }

  stats(): SimStats {
    const now = Date.now();
    const s: SimStats = {
      vms: this.vms.length, vcpus: 0, connected: 0, eventsSent: 0, eventReplies: 0, commandsExecuted: 0, errorReplies: 0,
      connectionLosses: 0, hardErrors: 0, handshakeFailures: 0, stalls: 0, stalledNow: 0, maxReplyWaitMs: 0,
      guestActions: this.guestActions, crashedVcpus: 0, livelocks: 0, internalErrors: 0,
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
      s.livelocks += v.livelocks;
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

  /**
   * Clean shutdown of every VM through PREUNHOOK (in parallel), then a summary. The VMs' RAM is
   * released (files removed when the run dir is the default temporary one).
   */
  async shutdown(): Promise<SimSummary> {
    this.running = false;
    this.stopWorkloads();
    const reports: ShutdownReport[] = await Promise.all(this.qemus.map((q) => q.shutdown()));
    await Promise.all(this.hekiVmms.map((h) => h.close()));
    await Promise.all(this.workloads);
    if (this.scenarioRun) await this.scenarioRun.catch(() => undefined);
    const shutdown = { preunhookSent: 0, closedByTool: 0, timedOut: 0, notHooked: 0 };
    for (const r of reports) {
      if (r.preunhook === 'not-hooked') shutdown.notHooked++;
      else if (r.preunhook === '0') {
        shutdown.preunhookSent++;
        if (r.closedByTool) shutdown.closedByTool++;
        else shutdown.timedOut++;
      }
    }
    const summary: SimSummary = { ...this.stats(), seed: this.opts.seed ?? 1, durationMs: Date.now() - this.started, shutdown };
    if ((this.opts.scenarios?.length ?? 0) > 0) summary.scenarios = [...this.reports];
    for (const vm of this.vms) vm.close();
    if (this.ownRunDir) rmSync(this.runDir, { recursive: true, force: true });
    return summary;
  }

  // ---- scenarios -------------------------------------------------------------------------------------

  private async runScenarios(): Promise<ScenarioReport[]> {
    const sel = this.opts.scenarioVms ?? [0];
    const indexes = sel === 'all' ? this.vms.map((_, i) => i) : sel.filter((i) => i >= 0 && i < this.vms.length);
    const delay = this.opts.scenarioDelayMs ?? 1000;
    await Promise.all(
      indexes.map(async (i) => {
        const vm = this.vms[i]!;
        const hooked = await Promise.race([this.qemus[i]!.waitHooked().then(() => true), this.stopped.then(() => false)]);
        if (!hooked || !this.running) return;
        const pause = async (ms: number): Promise<void> => {
          let timer: NodeJS.Timeout | undefined;
          await Promise.race([new Promise((r) => (timer = setTimeout(r, ms))), this.stopped]);
          clearTimeout(timer); // a pending timer would keep the process alive after shutdown
        };
        if (delay > 0) await pause(delay);
        for (let pass = 0; ; pass++) {
          for (const sc of this.opts.scenarios ?? []) {
            if (!this.running) return;
            const r = await runScenario(vm, sc);
            if (pass > 0) continue;
            this.reports.push(r);
            this.opts.log?.(`scenario ${sc.name} on ${vm.name}: ${r.passed ? 'expectations held' : 'expectations FAILED'}`);
          }
          const loopMs = this.opts.scenarioLoopMs;
          if (loopMs === undefined || !this.running) return;
          await pause(loopMs);
        }
      }),
    );
    return [...this.reports];
  }

  // ---- the benign workload ---------------------------------------------------------------------------

  /**
   * One vCPU's benign workload, seeded per (seed, VM, vCPU): after the VM is hooked, the kernel's boot
   * sequence on this vCPU (syscall_init's MSR writes and XCR0 through the kernel's routines), then
   * kernel routine calls at `perSecond` on average (exponential gaps): memory traffic on kernel data,
   * CR3 switches between the processes and the kernel, module loads (256 bytes) into the module area,
   * text_poke of the static key, KVMI hypercalls, SIDT into kernel data; and, from a stream of its own, a
   * `sim_copy_tagged` call before one call in four (its ground truth: `vm.taggedCalls`).
   */
  private async workload(vm: SimVm, qemu: SimQemu, vcpu: SimVcpu, perSecond: number): Promise<void> {
    const prng: Prng = mulberry32(deriveSeed(this.opts.seed ?? 1, 0x776b, vm.index, vcpu.index));
    const k = vm.kernel;
    const sentinel = k.symbol('cpu_idle');
    const call = (name: string, regs: Record<string, bigint>): Promise<unknown> => {
      this.guestActions++;
      return vcpu.run({ entry: k.symbol(name), returnTo: sentinel, regs: { rsp: k.taskStackTop(vcpu.index), ...regs } });
    };
    const hooked = await Promise.race([qemu.waitHooked().then(() => true), this.stopped.then(() => false)]);
    if (!hooked) return;
    const wait = async (ms: number): Promise<void> => {
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([new Promise((r) => (timer = setTimeout(r, ms))), this.stopped]);
      clearTimeout(timer);
    };
    if ((this.opts.workloadDelayMs ?? 0) > 0) await wait(this.opts.workloadDelayMs!);
    // Boot: syscall_init and the XCR0 setup.
    while (this.running && !vcpu.isOnline) await wait(50);
    if (!this.running) return;
    const msr = (index: number, v: bigint): Promise<unknown> => call('native_write_msr', { rcx: BigInt(index), rax: v & 0xffffffffn, rdx: v >> 32n });
    await msr(MSR.STAR, BOOT_MSRS.STAR);
    await msr(MSR.LSTAR, k.symbol('entry_SYSCALL_64'));
    await msr(MSR.CSTAR, k.symbol('entry_SYSCALL_compat'));
    await msr(MSR.SFMASK, BOOT_MSRS.SFMASK);
    const xcr0 = vm.profile.xsaveFeatures & 0x7n;
    await call('xsetbv_xcr0', { rcx: 0n, rax: xcr0 & 0xffffffffn, rdx: xcr0 >> 32n });
    const meanMs = 1000 / perSecond;
    let poke = 0;
    // sim_copy_tagged calls (a traceable function with arguments, guest/tagged-copy.ts) come from a stream of
    // their own, so the sequence of the other calls is the same as without them.
    const copies: Prng = mulberry32(deriveSeed(this.opts.seed ?? 1, 0x7467, vm.index, vcpu.index));
    while (this.running) {
      await wait(Math.min(-Math.log(1 - prng()) * meanMs, meanMs * 10));
      if (!this.running || vcpu.isCrashed || !vcpu.isOnline) continue;
      if (copies() < 0.25) {
        this.guestActions++;
        await callTaggedCopy(vm, vcpu, 1 + randInt(copies, 64), randInt(copies, 64));
      }
      const pick = randInt(prng, 16);
      if (pick < 6) {
        // memory traffic on this vCPU's slice of sim_counters
        const at = k.symbol('sim_counters', (vcpu.index % 64) * 64 + randInt(prng, 8) * 8);
        if (prng() < 0.5) await call('memcpy_word', { rdi: at, rax: BigInt(randInt(prng, 0x7fffffff)) });
        else await call('memread_word', { rdi: at });
      } else if (pick < 9) {
        const p = randInt(prng, k.processes.length + 1);
        await call('native_write_cr3', { rax: p === 0 ? k.cr3 : k.processes[p - 1]!.cr3 });
      } else if (pick < 10) {
        // a small module: 256 bytes into one of the module slots, 8 bytes per memcpy_word
        const base = MODULES_VADDR + BigInt(randInt(prng, 32)) * 0x10000n;
        for (let off = 0n; off < 256n && this.running; off += 8n) {
          await call('memcpy_word', { rdi: base + off, rax: off === 0n ? 0x00444f4d4953437fn : 0xccccccccccccccccn });
        }
      } else if (pick < 11) {
        // text_poke runs on the kernel's page tables (its physmap alias of the text)
        if (vcpu.cpu.sregs.cr3 !== k.cr3) await call('native_write_cr3', { rax: k.cr3 });
        const v = STATIC_KEY_VARIANTS[++poke % 2]!;
        await call('text_poke', { rdi: k.symbolPhys('static_key_site'), rax: Buffer.from(v).readBigUInt64LE(0) });
      } else if (pick < 13) {
        await call('kvm_hypercall', { rax: 34n, rdi: 24n, rsi: 0n });
      } else {
        await call('store_idt', { rax: k.symbol('desc_scratch', (vcpu.index % 256) * 16) });
      }
    }
  }
}
