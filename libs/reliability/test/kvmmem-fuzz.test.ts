/**
 * The guest agent's /dev/kvmmem path fuzzed against the simulated device, both ABIs: hostile arguments,
 * tokens and call sequences through the agent's device layer (the addon maps the pages), and raw request
 * frames into the device. Typed errors only, no crash, no mapping left behind.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startSimHost, type SimHost } from '@periscope/testing';
import { runKvmmemFuzz } from '../src/index.js';

describe.each([1, 2] as const)('guest-agent device fuzz, ABI v%i', (abi) => {
  let host: SimHost;
  beforeAll(async () => {
    host = await startSimHost({ vms: 2, memoryMiB: 32, abi });
  }, 30_000);
  afterAll(async () => host?.close());

  it('10,000 hostile calls and 5,000 raw frames: typed errors, no crash, no leaked mapping', async () => {
    const r = await runKvmmemFuzz({
      target: {
        kvmmemPath: host.kvmmemPath,
        vmUuids: [host.vm(0).uuid, host.vm(1).uuid],
        tokens: (i, n) => host.tokens(i)(n),
        mappedPages: () => host.kvmmem.stats().mappedPages,
      },
      operations: 10_000,
      rawFrames: 5000,
      seed: 40 + abi,
    });
    console.log(`kvmmem fuzz v${abi}: ${JSON.stringify({ ...r, failures: r.failures.length })}`);
    expect(r.failures).toEqual([]);
    expect(r.mapsOk).toBeGreaterThan(20); // the campaign reached the mapped state, not only errors
    for (const code of abi === 2 ? ['EPERM', 'EINVAL', 'ENOENT'] : ['EPERM', 'ENOENT']) expect(r.outcomes[code] ?? 0).toBeGreaterThan(0);
    expect(r.mappedPagesEnd).toBe(0);
    expect(r.ramMappingsPeak).toBeGreaterThan(r.ramMappingsBefore); // the count does see the addon's mappings
    expect(r.ramMappingsAfter).toBeLessThanOrEqual(r.ramMappingsBefore);
    expect(r.rawAnswered).toBeGreaterThan(50);
  }, 120_000);
});
