/**
 * kill -9 of a host agent (a real process) while every VM keeps attacking CR0.WP: the simulated QEMU
 * reconnects, VMs re-attach to the restarted agent and are denied again; the fail-open window is
 * measured, not assumed.
 */
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { runAgentKill } from '../src/index.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '../../..');

describe('kill -9 of the host agent', () => {
  it('VMs re-attach and are re-protected after each restart; no vCPU stalls', async () => {
    const report = await runAgentKill({ repoRoot: root, vms: 4, kills: 2, reconnectSeconds: 0.1 });
    expect(report.failures).toEqual([]);
    expect(report.rounds).toHaveLength(2);
    for (const r of report.rounds) {
      expect(r.reprotectMs).toBeLessThan(20_000);
      expect(r.reprotectMs).toBeGreaterThan(0); // every VM denied again after re-attach
    }
    expect(report.reprotectedAll).toBe(true);
  }, 90_000);
});
