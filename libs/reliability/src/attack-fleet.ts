/**
 * A host agent (in process, the real `HostAgent` with its analysis link and on-disk detection spool) and
 * simulated VMs under a continuous storm, for the analysis-side fault campaigns (PostgreSQL restart,
 * kill -9 of analysis).
 *
 * Every vCPU loops: clear CR0.WP (denied locally by the cr-pinning rule analysis compiled; each denial is
 * a detection with a fresh id, spooled by the agent until analysis acknowledges it) and, in between,
 * toggle CR4.PGE (intercepted, allowed, no detection). The ledger records every detection id the agent
 * spooled — read from the spool itself, the one place each id is born — so the campaigns can check that
 * analysis stored each exactly once.
 */
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { monitorEventLoopDelay, type IntervalHistogram } from 'node:perf_hooks';
import type { Detection } from '@periscope/contracts';
import { HostAgent, parseCookies } from '@periscope/host-agent';
import { SimQemu, SimVm } from '@periscope/simulator';
import { parsePolicy } from '@periscope/verdicts';
import type { Db } from '@periscope/analysis';
import { sleep, waitFor, withTimeout } from './wait.js';

const CR0_WP = 1n << 16n;
const CR4_PGE = 1n << 7n;

/** The analysis policy the campaigns install: CR pinning only (decided locally, a detection per attack). */
export const CR_PINNING_POLICY = `
format: periscope.policy/v1
name: reliability-cr-pinning
description: CR pinning on every VM (reliability campaigns)
select: {}
modules:
  cr-pinning: { action: deny, cr0: [WP], cr4: [SMEP, SMAP] }
`;

export interface AttackFleetOptions {
  /** Working directory (sockets, agent state). */
  readonly dir: string;
  /** analysis gRPC `host:port`. */
  readonly analysisAddress: string;
  readonly vms?: number;
  readonly vcpus?: number;
  readonly hostId?: string;
  /** Pause between two guest actions of one vCPU, ms (default 3). */
  readonly pauseMs?: number;
}

export class AttackFleet {
  readonly agent: HostAgent;
  readonly vms: SimVm[] = [];
  private readonly qemus: SimQemu[] = [];
  /** Detection ids the agent spooled (each one must become exactly one alert row). */
  readonly produced = new Set<string>();
  readonly agentLogs: string[] = [];
  /** Guest actions not completed within 10 s (a stalled vCPU): always a failure. */
  readonly stalled: string[] = [];
  attacksDenied = 0;
  attacksThrough = 0;
  /** The agent's policy when an attack went through (first 5). */
  readonly throughDetails: string[] = [];
  benignEvents = 0;
  private running = false;
  private loops: Promise<void>[] = [];
  private lag: IntervalHistogram | undefined;

  private constructor(private readonly opts: AttackFleetOptions) {
    const sock = join(opts.dir, 'kvmi.sock');
    mkdirSync(join(opts.dir, 'state'), { recursive: true });
    this.agent = new HostAgent({
      hostId: opts.hostId ?? 'reliability-host',
      kvmiPaths: [sock],
      cookies: parseCookies(Buffer.from('fleet-secret')),
      // Bootstrap until analysis pushes its compiled policy.
      policy: parsePolicy({ id: 'bootstrap', version: 1, rules: [] }),
      log: (level, msg, f) => {
        if (level !== 'info') this.agentLogs.push(`${level}: ${msg} ${JSON.stringify(f ?? {}, (_k, v: unknown) => (typeof v === 'bigint' ? v.toString() : v))}`.slice(0, 400));
        if (this.agentLogs.length > 500) this.agentLogs.splice(0, 100);
      },
      link: { address: opts.analysisAddress, backoff: { initialMs: 50, maxMs: 500 } },
      stateDir: join(opts.dir, 'state'),
    });
    // The ledger: every detection the agent spools (the spool assigns nothing; the id is the detection's).
    const spool = this.agent.link!.spool;
    const add = spool.add.bind(spool);
    spool.add = (d: Detection) => {
      const e = add(d);
      if (e) this.produced.add(d.detectionId);
      return e;
    };
  }

  /** Start the agent and the VMs; resolves once every VM is attached and its CR0.WP attack is denied. */
  static async start(opts: AttackFleetOptions): Promise<AttackFleet> {
    const f = new AttackFleet(opts);
    await f.agent.start();
    for (let i = 0; i < (opts.vms ?? 3); i++) {
      const vm = new SimVm({ vcpus: opts.vcpus ?? 2, seed: 100 + i, apsOnline: true, jitterMs: 0, name: `rel-${i}`, runDir: opts.dir });
      const q = new SimQemu(vm, { path: join(opts.dir, 'kvmi.sock'), key: Buffer.from('fleet-secret'), reconnectSeconds: 0.1 });
      f.vms.push(vm);
      f.qemus.push(q);
      q.start();
    }
    if (!(await waitFor(() => f.vms.every((v) => v.hooked), 20_000))) throw new Error('VMs did not attach to the host agent');
    // Protected: analysis's policy is active and CR0.WP clears are denied on every vCPU.
    const deadline = Date.now() + 30_000;
    for (const vm of f.vms) {
      for (const cpu of vm.vcpus) {
        for (;;) {
          cpu.cpu.sregs.cr0 |= CR0_WP;
          await cpu.writeCr(0, cpu.cpu.sregs.cr0 & ~CR0_WP);
          if ((cpu.cpu.sregs.cr0 & CR0_WP) !== 0n) break;
          if (Date.now() > deadline) throw new Error(`${vm.name}: CR0.WP attack still allowed 30 s after attach (analysis policy not active); agent: ${f.agentLogs.slice(-5).join(' | ')}`);
          await sleep(20);
        }
      }
    }
    return f;
  }

  /** Begin the storm on every vCPU. */
  startStorm(): void {
    this.running = true;
    this.lag = monitorEventLoopDelay({ resolution: 5 });
    this.lag.enable();
    for (const vm of this.vms) {
      for (const cpu of vm.vcpus) {
        this.loops.push(
          (async () => {
            let i = 0;
            while (this.running) {
              const attack = i++ % 2 === 0;
              const r = attack
                ? (() => {
                    cpu.cpu.sregs.cr0 |= CR0_WP;
                    return withTimeout(cpu.writeCr(0, cpu.cpu.sregs.cr0 & ~CR0_WP), 10_000);
                  })()
                : withTimeout(cpu.writeCr(4, cpu.cpu.sregs.cr4 ^ CR4_PGE), 10_000);
              const res = await r;
              if (res === 'timeout') {
                this.stalled.push(`${vm.name} vCPU ${cpu.index}: ${attack ? 'CR0' : 'CR4'} write not completed within 10 s`);
                return;
              }
              if (attack) {
                if ((cpu.cpu.sregs.cr0 & CR0_WP) !== 0n) this.attacksDenied++;
                else {
                  this.attacksThrough++;
                  // What the agent ran at that moment: the first few go into the failure message.
                  const pol = this.agent.policies.current.policy;
                  const covered = pol.rules.some((r) => (r.match as { vms?: readonly string[] }).vms?.includes(vm.uuidText));
                  if (this.throughDetails.length < 5) this.throughDetails.push(`${vm.name}: agent policy ${pol.id} v${pol.version}, ${pol.rules.length} rules, ${covered ? '' : 'none '}covering this VM`);
                }
              } else this.benignEvents++;
              await sleep(this.opts.pauseMs ?? 3);
            }
          })(),
        );
      }
    }
  }

  async stopStorm(): Promise<void> {
    this.running = false;
    await Promise.all(this.loops);
    this.loops = [];
    this.lag?.disable();
  }

  /** Largest wait of any vCPU for a reply, as the simulated KVM measured it (ms). */
  get maxReplyWaitMs(): number {
    return Math.max(0, ...this.vms.map((v) => v.stats.maxReplyWaitMs));
  }
  /** Replies slower than the simulator's stall threshold (1 s), over every VM. */
  get simulatorStalls(): number {
    return this.vms.reduce((a, v) => a + v.stats.stalls, 0);
  }
  get hardErrors(): number {
    return this.vms.reduce((a, v) => a + v.stats.hardErrors, 0);
  }
  /** The largest event-loop delay of this process during the storm (ms): the scheduling noise the waits include. */
  get eventLoopLagMaxMs(): number {
    return this.lag ? this.lag.max / 1e6 : 0;
  }

  async stop(): Promise<void> {
    await this.stopStorm();
    for (const q of this.qemus) q.stop();
    for (const v of this.vms) v.close();
    await this.agent.stop(300);
  }
}

export interface AlertLedgerCheck {
  /** Detection ids the agents produced. */
  readonly produced: number;
  /** Rows in alert_detections (one per stored detection id; the primary key forbids two). */
  readonly stored: number;
  /** Produced but never stored: lost detections. */
  readonly missing: readonly string[];
  /** Stored but never produced by the ledger's agents. */
  readonly unexpected: readonly string[];
  /** Alerts, and the sum of their counts (must equal `stored`: a detection is folded once). */
  readonly alerts: number;
  readonly alertCountSum: number;
}

/** Compare the agents' ledger with what analysis stored. */
export async function checkAlertLedger(db: Db, produced: ReadonlySet<string>): Promise<AlertLedgerCheck> {
  const rows = await db.query<{ detection_id: string }>('SELECT detection_id FROM alert_detections');
  const stored = new Set(rows.map((r) => r.detection_id));
  const sums = await db.query<{ n: bigint; total: bigint | null }>('SELECT count(*)::int8 AS n, sum(count)::int8 AS total FROM alerts');
  return {
    produced: produced.size,
    stored: rows.length,
    missing: [...produced].filter((id) => !stored.has(id)),
    unexpected: [...stored].filter((id) => !produced.has(id)),
    alerts: Number(sums[0]?.n ?? 0n),
    alertCountSum: Number(sums[0]?.total ?? 0n),
  };
}
