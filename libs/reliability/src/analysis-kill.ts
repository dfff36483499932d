/**
 * Fault: kill -9 of the analysis service during an event storm.
 *
 * A real analysis process (`bin/periscope analysis`, PostgreSQL behind it) and a real host agent with
 * simulated VMs under a continuous storm (`AttackFleet`: denied CR0.WP clears, each a spooled detection,
 * and allowed CR4 toggles). The analysis process is killed with SIGKILL mid-storm and started again on
 * the same address and database. Checked:
 * - no vCPU waited for a reply longer than the local-verdict deadline plus this process's own event-loop
 *   lag (the simulated KVM measures every wait), none stalled (> 1 s), no hard KVMI error;
 * - the agent reconnects to the restarted analysis, which sees every VM attached again, gives each its
 *   protection and has its local policy active on the agent (protections restored);
 * - no attack went through at any time (verdicts are local: analysis is off the vCPU's path);
 * - every detection id the agent spooled has exactly one alert row (none lost, none counted twice).
 */
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { openDb } from '@periscope/analysis';
import { AnalysisProcess } from './analysis-process.js';
import { AttackFleet, checkAlertLedger, CR_PINNING_POLICY, type AlertLedgerCheck } from './attack-fleet.js';
import { freeLoopbackPort, PrivatePostgres, type PostgresInstall } from './private-postgres.js';
import { pollAsync, sleep, waitFor } from './wait.js';

/** The compiled local policy's ask-central ceiling (analysis/modules.ts): the longest a verdict may take. */
export const LOCAL_DEADLINE_MS = 20;

export interface AnalysisKillOptions {
  readonly repoRoot: string;
  readonly install: PostgresInstall;
  readonly kills?: number;
  readonly vms?: number;
  /** Analysis stays dead this long, ms (default 1000). */
  readonly downMs?: number;
  readonly onProgress?: (line: string) => void;
}

export interface AnalysisKillRound {
  /** Detections spooled by the agent while analysis was dead. */
  readonly producedWhileDown: number;
  /** Restart → agent link up, analysis sees every VM protected and the host's policy active, ms. */
  readonly restoredMs: number;
}

export interface AnalysisKillReport {
  readonly rounds: readonly AnalysisKillRound[];
  readonly ledger: AlertLedgerCheck | undefined;
  readonly maxReplyWaitMs: number;
  readonly eventLoopLagMaxMs: number;
  readonly simulatorStalls: number;
  readonly attacksDenied: number;
  readonly benignEvents: number;
  readonly failures: readonly string[];
}

interface VmView {
  uuid: string;
  attached: boolean;
  protection: Record<string, string>;
}
interface HostView {
  hostId: string;
  connected: boolean;
  policyState: string;
  policyVersion: string;
}

export async function runAnalysisKill(opts: AnalysisKillOptions): Promise<AnalysisKillReport> {
  const failures: string[] = [];
  const rounds: AnalysisKillRound[] = [];
  const dir = mkdtempSync(join(tmpdir(), 'akill-'));
  const policyDir = join(dir, 'policies');
  let pg: PrivatePostgres | undefined;
  let analysis: AnalysisProcess | undefined;
  let fleet: AttackFleet | undefined;
  let ledger: AlertLedgerCheck | undefined;
  try {
    pg = await PrivatePostgres.create(opts.install);
    pg.start();
    mkdirSync(policyDir);
    writeFileSync(join(policyDir, 'cr.yaml'), CR_PINNING_POLICY);
    const grpc = `127.0.0.1:${await freeLoopbackPort()}`;
    analysis = new AnalysisProcess({ repoRoot: opts.repoRoot, db: pg.url, listen: grpc, http: `127.0.0.1:${await freeLoopbackPort()}`, policyDir });
    await analysis.start();
    fleet = await AttackFleet.start({ dir: join(dir, 'host'), analysisAddress: grpc, vms: opts.vms ?? 3 });
    const f = fleet;
    const a = analysis;
    const vmUuids = f.vms.map((v) => v.uuidText);
    /** The restarted analysis has every VM attached and protected, and the host's local policy active. */
    const restored = async (): Promise<boolean> => {
      try {
        const { vms } = await a.get<{ vms: VmView[] }>('/v1/vms?attached=true');
        const { hosts } = await a.get<{ hosts: HostView[] }>('/v1/hosts?connected=true');
        const host = hosts.find((h) => h.hostId === 'reliability-host');
        return (
          f.agent.link!.client.up &&
          vmUuids.every((u) => vms.some((v) => v.uuid === u && v.protection['cr-pinning'] === 'local rules')) &&
          host?.policyState === 'active'
        );
      } catch {
        return false;
      }
    };
    if (!(await pollAsync(restored, 30_000))) failures.push(`before the storm: analysis does not show every VM protected: ${a.stderrTail}`);
    f.startStorm();
    await sleep(1000);
    for (let k = 0; k < (opts.kills ?? 2); k++) {
      const before = f.produced.size;
      await a.kill9();
      await sleep(opts.downMs ?? 1000);
      const producedWhileDown = f.produced.size - before;
      const t0 = performance.now();
      await a.start();
      const ok = await pollAsync(restored, 30_000);
      const restoredMs = ok ? Math.round(performance.now() - t0) : -1;
      if (!ok) failures.push(`kill ${k + 1}: protections not restored within 30 s of the restart (link up: ${f.agent.link!.client.up}); analysis: ${a.stderrTail.slice(-400)}`);
      rounds.push({ producedWhileDown, restoredMs });
      opts.onProgress?.(`kill ${k + 1}: ${producedWhileDown} detections spooled while analysis was dead; restored ${restoredMs} ms after the restart`);
      await sleep(1000);
    }
    await f.stopStorm();
    if (!(await waitFor(() => f.agent.link!.spool.count === 0, 60_000))) failures.push(`${f.agent.link!.spool.count} detections still unacknowledged 60 s after the storm`);
    const db = await openDb(pg.url);
    try {
      ledger = await checkAlertLedger(db, f.produced);
    } finally {
      await db.close();
    }
    if (ledger.missing.length) failures.push(`${ledger.missing.length} of ${ledger.produced} detections have no alert (lost)`);
    if (ledger.unexpected.length) failures.push(`${ledger.unexpected.length} stored detection ids were never produced`);
    if (ledger.alertCountSum !== ledger.stored) failures.push(`alerts count ${ledger.alertCountSum} detections but ${ledger.stored} are stored`);
    failures.push(...f.stalled);
    if (f.attacksThrough) failures.push(`${f.attacksThrough} CR0.WP attacks went through (verdicts are local: none may): ${f.throughDetails.join('; ')}`);
    if (f.hardErrors) failures.push(`${f.hardErrors} hard KVMI errors in the simulated KVM`);
    if (f.simulatorStalls) failures.push(`${f.simulatorStalls} replies slower than the simulator's 1 s stall threshold`);
    const bound = LOCAL_DEADLINE_MS + f.eventLoopLagMaxMs + 200;
    if (f.maxReplyWaitMs > bound) failures.push(`a vCPU waited ${f.maxReplyWaitMs.toFixed(1)} ms for a reply (bound: ${LOCAL_DEADLINE_MS} ms deadline + ${f.eventLoopLagMaxMs.toFixed(0)} ms event-loop lag + 200 ms)`);
    if (analysis.exited) failures.push(`analysis exited (${analysis.exitCode}) on its own: ${analysis.stderrTail}`);
  } catch (e) {
    failures.push((e as Error).message);
  } finally {
    await fleet?.stop().catch((e: unknown) => failures.push(`fleet stop: ${(e as Error).message}`));
    if (analysis && !analysis.exited) {
      const code = await analysis.terminate();
      if (code !== 0) failures.push(`analysis did not exit 0 on SIGTERM (${code}): ${analysis.stderrTail.slice(-400)}`);
    }
    pg?.destroy();
    rmSync(dir, { recursive: true, force: true });
  }
  return {
    rounds,
    ledger,
    maxReplyWaitMs: fleet?.maxReplyWaitMs ?? 0,
    eventLoopLagMaxMs: fleet?.eventLoopLagMaxMs ?? 0,
    simulatorStalls: fleet?.simulatorStalls ?? 0,
    attacksDenied: fleet?.attacksDenied ?? 0,
    benignEvents: fleet?.benignEvents ?? 0,
    failures,
  };
}

