/**
 * The simulated VMM's Heki side (what QEMU / cloud-hypervisor would add, docs/heki.md): at VM start it
 * probes the capabilities (`KVM_CHECK_EXTENSION`, which says 3 even without Heki), enables the
 * notifications (`KVM_ENABLE_CAP` 235/236 with the configured reason masks — success is the proof the
 * host has Heki), registers the VM with the host agent's sink (`HekiSinkService.RegisterVm` over gRPC on
 * a Unix socket), and then handles the vCPUs' Heki exits as its KVM_RUN loop would:
 *
 * - **configure (39)**: reported to the sink without waiting (fire-and-forget); the vCPU re-enters at
 *   once (KVM sets RAX = 0 and skips the VMCALL).
 * - **denial (40)**: `ReportDenialExit` with the registration's deadline; `STOP_VM` stops the VM,
 *   `INJECT_GP` / `UNSPECIFIED` re-enter (KVM injects #GP(0)); an unreachable, failing or late sink gives
 *   the registration's default completion, or — before any registration — the RFC's: re-enter.
 *
 * The exit fields are read from the `kvm_run` image (`exit_reason` at 8, the union at 32), as a real VMM
 * reads its mmap'ed `kvm_run`. Nothing here can block a vCPU for longer than the deadline.
 */
import { credentials, Metadata, status, type ServiceError } from '@grpc/grpc-js';
import {
  DenialCompletion,
  HekiReason,
  HekiSinkServiceClient,
  type RegisterVmResponse,
} from '@periscope/contracts';

import { SimError } from '../errors.js';
import type { SimVm } from '../kvm/vm.js';
import {
  KVM_CAP_HEKI_CONFIGURE,
  KVM_CAP_HEKI_DENIAL,
  KVM_EXIT_HEKI_CONFIGURE,
  KVM_EXIT_HEKI_DENIAL,
} from './constants.js';
import { decodeKvmRunHekiExit, type HekiCompletion, type HekiExit } from './kvm.js';

export interface HekiVmmOptions {
  /** `unix:PATH` of the host agent's Heki sink; absent: no forwarding (every exit completes as the RFC does). */
  sink?: string;
  /** Reasons enabled with KVM_CAP_HEKI_CONFIGURE (default 3: CR0 | CR4). */
  configureReasons?: bigint;
  /** Reasons enabled with KVM_CAP_HEKI_DENIAL (default 3). */
  denialReasons?: bigint;
  /** Deadline of a denial report before the sink answered a registration (default 100 ms). */
  denialTimeoutMs?: number;
  /** Deadline of RegisterVm and of configure reports (default 1000 ms). */
  callTimeoutMs?: number;
  log?: (line: string) => void;
}

export interface HekiVmmStats {
  registrations: number;
  registerFailures: number;
  configureReported: number;
  configureFailures: number;
  denialsAnswered: number;
  /** Denials completed with the default (sink unreachable, failing or late). */
  denialDefaults: number;
  stops: number;
}

const REASONS: ReadonlyArray<[bigint, HekiReason]> = [
  [1n, HekiReason.HEKI_REASON_CR0],
  [2n, HekiReason.HEKI_REASON_CR4],
];
const reasonsOf = (mask: bigint): HekiReason[] => REASONS.filter(([b]) => (mask & b) !== 0n).map(([, r]) => r);
const reasonEnum = (bit: bigint): HekiReason =>
  bit === 1n ? HekiReason.HEKI_REASON_CR0 : bit === 2n ? HekiReason.HEKI_REASON_CR4 : HekiReason.HEKI_REASON_UNSPECIFIED;

export class HekiVmm {
  readonly stats: HekiVmmStats = { registrations: 0, registerFailures: 0, configureReported: 0, configureFailures: 0, denialsAnswered: 0, denialDefaults: 0, stops: 0 };
  /** What ENABLE_CAP proved; set by `start()`. */
  hostHasHeki = false;
  /** CHECK_EXTENSION results (3 and 3 on every host). */
  extensions: { configure: number; denial: number } = { configure: 0, denial: 0 };
  private registration: RegisterVmResponse | null = null;
  private registering: Promise<boolean> | null = null;
  private client: HekiSinkServiceClient | null = null;
  private readonly pending = new Set<Promise<unknown>>();
  private closed = false;

  constructor(
    private readonly vm: SimVm,
    private readonly opts: HekiVmmOptions = {},
  ) {
    if (opts.sink !== undefined && !opts.sink.startsWith('unix:')) {
      throw new SimError('invalid-argument', `heki sink must be unix:PATH, got ${JSON.stringify(opts.sink)}`);
    }
  }

  /** The registration the sink answered (deadline and default), or null. */
  get registered(): RegisterVmResponse | null {
    return this.registration;
  }

  /**
   * VM start: probe and enable the caps, install the exit handler, register with the sink (best effort:
   * a sink that is down does not delay the VM; registration is retried on the next exit).
   */
  async start(): Promise<void> {
    const k = this.vm.heki;
    this.extensions = { configure: k.checkExtension(KVM_CAP_HEKI_CONFIGURE), denial: k.checkExtension(KVM_CAP_HEKI_DENIAL) };
    const cfg = this.opts.configureReasons ?? 3n;
    const den = this.opts.denialReasons ?? 3n;
    const a = k.enableCap({ cap: KVM_CAP_HEKI_CONFIGURE, flags: 0, args: [cfg & BigInt(this.extensions.configure)] });
    const b = k.enableCap({ cap: KVM_CAP_HEKI_DENIAL, flags: 0, args: [den & BigInt(this.extensions.denial)] });
    this.hostHasHeki = a === 0 && b === 0;
    if (!this.hostHasHeki) this.opts.log?.(`heki: KVM_ENABLE_CAP failed (EINVAL) on ${this.vm.name}: Heki unavailable on this host`);
    this.vm.hekiExitHandler = (exit) => this.onExit(exit);
    if (this.opts.sink !== undefined) {
      this.client = new HekiSinkServiceClient(this.opts.sink, credentials.createInsecure());
      await this.register();
    }
  }

  /** Stop forwarding; waits for reports in flight (each bounded by its deadline). */
  async close(): Promise<void> {
    this.closed = true;
    if (this.vm.hekiExitHandler) this.vm.hekiExitHandler = null;
    await Promise.allSettled([...this.pending]);
    this.client?.close();
    this.client = null;
  }

  private register(): Promise<boolean> {
    if (this.registering) return this.registering;
    const client = this.client;
    if (!client || this.closed) return Promise.resolve(false);
    const k = this.vm.heki;
    const p = new Promise<boolean>((resolve) => {
      client.registerVm(
        {
          vmUuid: Buffer.from(this.vm.uuid),
          vmName: this.vm.name,
          hostHasHeki: this.hostHasHeki,
          configureReasons: this.hostHasHeki ? reasonsOf(k.configureReasons) : [],
          denialReasons: this.hostHasHeki ? reasonsOf(k.denialReasons) : [],
          qemuStartTimeMs: this.vm.startTimeMs,
        },
        ...this.callOptions(this.opts.callTimeoutMs ?? 1000),
        (err, res) => {
          if (err) {
            this.stats.registerFailures++;
            this.opts.log?.(`heki: RegisterVm for ${this.vm.name} failed: ${err.message}`);
            resolve(false);
          } else {
            this.stats.registrations++;
            this.registration = res;
            resolve(true);
          }
        },
      );
    }).finally(() => {
      this.registering = null;
    });
    this.registering = p;
    return this.track(p);
  }

  private callOptions(ms: number): [Metadata, { deadline: Date }] {
    return [new Metadata(), { deadline: new Date(Date.now() + ms) }];
  }

  private track<T>(p: Promise<T>): Promise<T> {
    this.pending.add(p);
    void p.finally(() => this.pending.delete(p)).catch(() => undefined);
    return p;
  }

  private async onExit(exit: HekiExit): Promise<HekiCompletion> {
    // Read the exit as a VMM does: from kvm_run.
    const run = decodeKvmRunHekiExit(exit.kvmRun);
    if (run.exitReason === KVM_EXIT_HEKI_CONFIGURE) {
      if (this.client && !this.closed) void this.track(this.reportConfigure(exit.vcpu, run.reason, run.value, exit.rip));
      return 'reenter';
    }
    if (run.exitReason !== KVM_EXIT_HEKI_DENIAL) return 'reenter';
    if (!this.client || this.closed) return 'reenter';
    const completion = await this.track(this.reportDenial(exit.vcpu, run.reason, run.value, exit.rip));
    if (completion === 'stop') this.stats.stops++;
    return completion;
  }

  private async reportConfigure(vcpu: number, reason: bigint, bits: bigint, rip: bigint): Promise<void> {
    const send = (): Promise<ServiceError | null> =>
      new Promise((resolve) => {
        const client = this.client;
        if (!client) return resolve(null);
        client.reportConfigureExit(
          { vmUuid: Buffer.from(this.vm.uuid), vcpu, reason: reasonEnum(reason), crPinned: bits, rip, exitUnixNs: nowNs() },
          ...this.callOptions(this.opts.callTimeoutMs ?? 1000),
          (err) => resolve(err),
        );
      });
    if (!this.registration) await this.register();
    let err = await send();
    if (err?.code === status.FAILED_PRECONDITION && (await this.register())) err = await send(); // the agent restarted
    if (err) {
      this.stats.configureFailures++;
      this.opts.log?.(`heki: configure report for ${this.vm.name} failed: ${err.message}`);
    } else this.stats.configureReported++;
  }

  private async reportDenial(vcpu: number, reason: bigint, value: bigint, rip: bigint): Promise<HekiCompletion> {
    const started = Date.now();
    const budget = (): number => (this.registration?.denialTimeoutMs || this.opts.denialTimeoutMs || 100) - (Date.now() - started);
    const fallback = (): HekiCompletion => {
      this.stats.denialDefaults++;
      return this.registration?.defaultCompletion === DenialCompletion.DENIAL_COMPLETION_STOP_VM ? 'stop' : 'reenter';
    };
    if (!this.registration) await Promise.race([this.register(), sleep(Math.max(0, budget()))]);
    const ask = (): Promise<{ err: ServiceError | null; completion: DenialCompletion }> =>
      new Promise((resolve) => {
        const client = this.client;
        const ms = budget();
        if (!client || ms <= 0) return resolve({ err: { code: status.DEADLINE_EXCEEDED } as ServiceError, completion: 0 });
        client.reportDenialExit(
          { vmUuid: Buffer.from(this.vm.uuid), vcpu, reason: reasonEnum(reason), attemptedValue: value, rip, exitUnixNs: nowNs() },
          ...this.callOptions(ms),
          (err, res) => resolve({ err, completion: res?.completion ?? 0 }),
        );
      });
    let r = await ask();
    if (r.err?.code === status.FAILED_PRECONDITION && budget() > 0 && (await this.register())) r = await ask();
    if (r.err) {
      this.opts.log?.(`heki: denial report for ${this.vm.name} got no answer (${r.err.message ?? r.err.code}): default completion`);
      return fallback();
    }
    this.stats.denialsAnswered++;
    return r.completion === DenialCompletion.DENIAL_COMPLETION_STOP_VM ? 'stop' : 'reenter';
  }
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
const nowNs = (): bigint => BigInt(Date.now()) * 1_000_000n;
