/**
 * Restart of a private PostgreSQL (initdb in a temp dir, its own port — never the shared server) under a
 * real analysis with a real host agent and simulated VMs raising detections continuously: a fast and an
 * immediate shutdown mid-run. Analysis survives, and every detection id the agent produced has exactly
 * one alert row after recovery (none lost, none counted twice).
 */
import { describe, expect, it } from 'vitest';
import { findPostgres, runPgRestart } from '../src/index.js';

const install = findPostgres();
if (typeof install === 'string') console.warn(`postgres-restart: SKIPPED — ${install}`);

describe.skipIf(typeof install === 'string')('restart of a private PostgreSQL under a running analysis', () => {
  it('fast and immediate shutdowns mid-run: no crash, no alert lost, none duplicated', async () => {
    if (typeof install === 'string') return;
    const report = await runPgRestart({ install, modes: ['fast', 'immediate'], downMs: 1500, runMs: 1000, vms: 3, onProgress: (l) => console.log(`postgres-restart: ${l}`) });
    console.log(`postgres-restart: ${JSON.stringify({ rounds: report.rounds, ledger: report.ledger && { ...report.ledger, missing: report.ledger.missing.length, unexpected: report.ledger.unexpected.length }, reportedErrors: report.reportedErrors, attacksDenied: report.attacksDenied })}`);
    expect(report.failures).toEqual([]);
    expect(report.rounds.map((r) => r.mode)).toEqual(['fast', 'immediate']);
    // The outage was real: detections were produced while the server was down, and analysis said so.
    for (const r of report.rounds) expect(r.producedWhileDown).toBeGreaterThan(0);
    expect(report.reportedErrors).toBeGreaterThan(0);
    expect(report.ledger!.produced).toBeGreaterThan(50);
    expect(report.ledger!.missing).toEqual([]);
    expect(report.ledger!.unexpected).toEqual([]);
    expect(report.ledger!.stored).toBe(report.ledger!.produced);
    expect(report.ledger!.alertCountSum).toBe(report.ledger!.stored);
    expect(report.spoolLeft).toBe(0);
  }, 180_000);
});
