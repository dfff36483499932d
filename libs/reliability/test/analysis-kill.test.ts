/**
 * kill -9 of a real analysis process (bin/periscope analysis, on a private PostgreSQL) during an event
 * storm from a real host agent and simulated VMs: no vCPU stalled past its deadline (measured by the
 * simulated KVM), the agent reconnects to the restarted analysis, protections are restored, and every
 * spooled detection id ends as exactly one alert row.
 */
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { findPostgres, runAnalysisKill } from '../src/index.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '../../..');
const install = findPostgres();
if (typeof install === 'string') console.warn(`analysis-kill: SKIPPED — ${install}`);

describe.skipIf(typeof install === 'string')('kill -9 of analysis during an event storm', () => {
  it('no vCPU stalls, the agent reconnects, protections are restored, no detection lost or duplicated', async () => {
    if (typeof install === 'string') return;
    const r = await runAnalysisKill({ repoRoot: root, install, kills: 2, vms: 3, downMs: 1000, onProgress: (l) => console.log(`analysis-kill: ${l}`) });
    console.log(`analysis-kill: ${JSON.stringify({ rounds: r.rounds, ledger: r.ledger && { ...r.ledger, missing: r.ledger.missing.length, unexpected: r.ledger.unexpected.length }, maxReplyWaitMs: r.maxReplyWaitMs, lagMs: r.eventLoopLagMaxMs, attacksDenied: r.attacksDenied, benignEvents: r.benignEvents })}`);
    expect(r.failures).toEqual([]);
    expect(r.rounds).toHaveLength(2);
    for (const k of r.rounds) {
      expect(k.producedWhileDown).toBeGreaterThan(0); // the agent kept deciding (and spooling) while analysis was dead
      expect(k.restoredMs).toBeGreaterThan(0);
    }
    expect(r.ledger!.missing).toEqual([]);
    expect(r.ledger!.stored).toBe(r.ledger!.produced);
    expect(r.simulatorStalls).toBe(0);
    expect(r.benignEvents).toBeGreaterThan(100);
  }, 180_000);
});
