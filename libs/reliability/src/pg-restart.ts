/**
 * Fault: restart of PostgreSQL under a running analysis.
 *
 * A private PostgreSQL (initdb in a temp dir, its own port: `PrivatePostgres`) backs a real analysis
 * (`Analysis.start`, the `pg` driver) with a real host agent and simulated VMs raising detections
 * continuously (`AttackFleet`). Mid-run the server is stopped — `fast` (sessions terminated, open
 * transactions rolled back) and `immediate` (the postmaster aborts; crash recovery at the next start) —
 * kept down for a while, and started again. Analysis must survive (no uncaught error from the driver),
 * report the failures, not acknowledge what it did not store, and after recovery every detection id the
 * agent produced must be in `alert_detections` exactly once.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Analysis, openDb } from '@periscope/analysis';
import { AttackFleet, checkAlertLedger, CR_PINNING_POLICY, type AlertLedgerCheck } from './attack-fleet.js';
import { PrivatePostgres, type PostgresInstall, type ShutdownMode } from './private-postgres.js';
import { sleep, waitFor } from './wait.js';

export interface PgRestartOptions {
  readonly install: PostgresInstall;
  /** One restart per entry, in order (default fast, immediate). */
  readonly modes?: readonly ShutdownMode[];
  /** How long PostgreSQL stays down each time, ms (default 1500). */
  readonly downMs?: number;
  /** Storm before the first stop and between restarts, ms (default 1000). */
  readonly runMs?: number;
  readonly vms?: number;
  readonly onProgress?: (line: string) => void;
}

export interface PgRestartRound {
  readonly mode: ShutdownMode;
  /** Detections produced while the server was down. */
  readonly producedWhileDown: number;
  /** Start → the first detection stored after it, ms (-1: none). */
  readonly recoveredMs: number;
}

export interface PgRestartReport {
  readonly rounds: readonly PgRestartRound[];
  readonly ledger: AlertLedgerCheck | undefined;
  /** Analysis log lines at warn/error while the server was down (the failures were reported). */
  readonly reportedErrors: number;
  readonly attacksDenied: number;
  readonly attacksThrough: number;
  readonly spoolLeft: number;
  readonly failures: readonly string[];
}

export async function runPgRestart(opts: PgRestartOptions): Promise<PgRestartReport> {
  const failures: string[] = [];
  const onUncaught = (e: unknown) => failures.push(`uncaught in the analysis process: ${(e as Error)?.stack ?? String(e)}`.slice(0, 1500));
  process.on('uncaughtException', onUncaught);
  process.on('unhandledRejection', onUncaught);
  const dir = mkdtempSync(join(tmpdir(), 'pgr-'));
  const rounds: PgRestartRound[] = [];
  const analysisLogs: string[] = [];
  let reportedErrors = 0;
  let serverDown = false;
  let pg: PrivatePostgres | undefined;
  let analysis: Analysis | undefined;
  let fleet: AttackFleet | undefined;
  let ledger: AlertLedgerCheck | undefined;
  let spoolLeft = -1;
  try {
    pg = await PrivatePostgres.create(opts.install);
    pg.start();
    analysis = await Analysis.start({
      db: pg.url,
      grpcListen: '127.0.0.1:0',
      keepaliveMs: 200,
      flushMs: 100,
      log: (level, msg, f) => {
        if (level === 'warn' || level === 'error') {
          if (serverDown) reportedErrors++;
          analysisLogs.push(`${level}: ${msg} ${JSON.stringify(f ?? {})}`.slice(0, 300));
          if (analysisLogs.length > 200) analysisLogs.splice(0, 50);
        }
      },
    });
    await analysis.applyPolicy(CR_PINNING_POLICY);
    fleet = await AttackFleet.start({ dir, analysisAddress: `127.0.0.1:${analysis.grpcPort}`, vms: opts.vms ?? 3 });
    fleet.startStorm();
    const a = analysis;
    const storedCount = async (): Promise<number> => Number((await a.db.query<{ n: bigint }>('SELECT count(*)::int8 AS n FROM alert_detections'))[0]!.n);
    await sleep(opts.runMs ?? 1000);
    for (const mode of opts.modes ?? ['fast', 'immediate']) {
      const before = fleet.produced.size;
      serverDown = true;
      pg.stop(mode);
      await sleep(opts.downMs ?? 1500);
      const producedWhileDown = fleet.produced.size - before;
      pg.start();
      const tStart = performance.now();
      serverDown = false;
      // Recovered: a query succeeds and stored detections grow past what was there at the stop.
      const base = await waitForValue(storedCount, 30_000);
      let recoveredMs = -1;
      if (base === undefined) failures.push(`${mode} restart: analysis cannot query the restarted server within 30 s: ${analysisLogs.slice(-3).join(' | ')}`);
      else if ((await waitForValue(async () => {
        if ((await storedCount()) <= base) throw new Error('not yet');
        return true;
      }, 30_000)) === true) recoveredMs = Math.round(performance.now() - tStart);
      else failures.push(`${mode} restart: no detection stored within 30 s of the restart`);
      rounds.push({ mode, producedWhileDown, recoveredMs });
      opts.onProgress?.(`${mode}: ${producedWhileDown} detections produced while PostgreSQL was down; storing again ${recoveredMs} ms after the start`);
      await sleep(opts.runMs ?? 1000);
    }
    await fleet.stopStorm();
    // Everything the agent spooled must be acknowledged (stored) in the end.
    const f = fleet;
    if (!(await waitFor(() => f.agent.link!.spool.count === 0, 60_000))) {
      failures.push(`${f.agent.link!.spool.count} detections still unacknowledged in the agent's spool 60 s after the storm`);
    }
    spoolLeft = f.agent.link!.spool.count;
    await a.settled();
    const check = await openDb(pg.url);
    try {
      ledger = await checkAlertLedger(check, fleet.produced);
    } finally {
      await check.close();
    }
    if (ledger.missing.length) failures.push(`${ledger.missing.length} of ${ledger.produced} detections have no alert (lost)`);
    if (ledger.unexpected.length) failures.push(`${ledger.unexpected.length} stored detection ids were never produced`);
    if (ledger.alertCountSum !== ledger.stored) failures.push(`alerts count ${ledger.alertCountSum} detections but ${ledger.stored} are stored (a detection counted twice or not at all)`);
    failures.push(...fleet.stalled);
    if (fleet.attacksThrough) failures.push(`${fleet.attacksThrough} CR0.WP attacks went through while the agent was up: ${fleet.throughDetails.join('; ')}`);
  } catch (e) {
    failures.push((e as Error).message);
  } finally {
    await fleet?.stop().catch((e: unknown) => failures.push(`fleet stop: ${(e as Error).message}`));
    await analysis?.stop().catch((e: unknown) => failures.push(`analysis stop: ${(e as Error).message}`));
    pg?.destroy();
    rmSync(dir, { recursive: true, force: true });
    process.off('uncaughtException', onUncaught);
    process.off('unhandledRejection', onUncaught);
  }
  return { rounds, ledger, reportedErrors, attacksDenied: fleet?.attacksDenied ?? 0, attacksThrough: fleet?.attacksThrough ?? 0, spoolLeft, failures };
}

async function waitForValue<T>(f: () => Promise<T>, ms: number): Promise<T | undefined> {
  const t0 = Date.now();
  while (Date.now() - t0 < ms) {
    try {
      return await f();
    } catch {
      await sleep(50);
    }
  }
  return undefined;
}
