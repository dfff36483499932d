/**
 * The host agent's Heki sink under hostile gRPC requests: as a real agent process (every request
 * answered with a typed status, the healthy VM always served, clean exit), and in this process with
 * the heap measured after a forced GC (memory flat).
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { describe, expect, it } from 'vitest';
import { HekiSink } from '@periscope/host-agent';
import { runHekiCampaign, sleep } from '../src/index.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '../../..');
setFlagsFromString('--expose-gc');
const gc = runInNewContext('gc') as () => void;

async function heapMiB(): Promise<number> {
  for (let i = 0; i < 3; i++) {
    gc();
    await sleep(20);
  }
  return process.memoryUsage().heapUsed / 2 ** 20;
}

describe('Heki sink fuzzing', () => {
  it('an agent process answers every hostile request with a typed status and keeps serving', async () => {
    const r = await runHekiCampaign({ repoRoot: root, requests: 3000, seed: 21 });
    expect(r.failures).toEqual([]);
    expect(r.agentSurvived).toBe(true);
    expect(r.byStatus.OK).toBeGreaterThan(100);
    expect(r.byStatus.INVALID_ARGUMENT).toBeGreaterThan(100);
    expect(r.byStatus.FAILED_PRECONDITION).toBeGreaterThan(10); // unregistered VMs
    expect(r.healthyChecks).toBe(30);
  }, 120_000);

  it('in process: the heap after GC stays flat over 10,000 hostile requests', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'hsk-'));
    const sink = new HekiSink({ path: join(dir, 'heki.sock') });
    await sink.start();
    const warm = await runHekiCampaign({ repoRoot: root, sinkPath: sink.path, requests: 2000, seed: 1 });
    expect(warm.failures).toEqual([]);
    const before = await heapMiB();
    const run = await runHekiCampaign({ repoRoot: root, sinkPath: sink.path, requests: 10_000, seed: 2 });
    const after = await heapMiB();
    await sink.stop();
    rmSync(dir, { recursive: true, force: true });
    console.log(`heki sink heap: ${before.toFixed(1)} → ${after.toFixed(1)} MiB over 10,000 requests`);
    expect(run.failures).toEqual([]);
    expect(after - before).toBeLessThan(5);
  }, 120_000);
});
