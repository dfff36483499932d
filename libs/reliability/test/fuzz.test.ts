/**
 * Short fuzz run against the host agent as a real process (the long run is `bin/fuzz-agent.mjs`,
 * figures in docs/reliability.md): mutated live traffic and generated events through the proxy, a
 * healthy VM on the same agent probed throughout.
 */
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { mutateFrame, mulberry32, MUTATORS, garbage, mutateHandshake } from '../src/index.js';
import { runAgentCampaign } from '../src/index.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '../../..');

describe('mutators', () => {
  it('are reproducible from the seed and all of them get used', () => {
    const frame = Buffer.alloc(64, 7);
    frame.writeUInt16LE(56, 2);
    const a = mulberry32(9);
    const b = mulberry32(9);
    const used = new Set<string>();
    for (let i = 0; i < 2000; i++) {
      const x = mutateFrame(frame, a, frame);
      const y = mutateFrame(frame, b, frame);
      expect(x.mutator).toBe(y.mutator);
      expect(x.bytes.equals(y.bytes)).toBe(true);
      used.add(x.mutator);
    }
    expect([...used].sort()).toEqual([...MUTATORS].sort());
    expect(frame.readUInt16LE(2)).toBe(56); // the input is never changed
    expect(garbage(mulberry32(1)).length).toBeGreaterThanOrEqual(0);
    expect(mutateHandshake(Buffer.alloc(104, 1), mulberry32(2)).equals(Buffer.alloc(104, 1))).toBe(false);
  });
});

describe('host agent under fuzzed KVM traffic', () => {
  it('stays up, keeps protecting a healthy VM and shuts down cleanly', async () => {
    const report = await runAgentCampaign({ repoRoot: root, frames: 15_000, seed: 11, fuzzedVms: 3, mutateRate: 0.02, maxSeconds: 90 });
    expect(report.failures).toEqual([]);
    expect(report.agentSurvived).toBe(true);
    expect(report.frames).toBeGreaterThanOrEqual(15_000);
    expect(report.proxy.generatedReplies).toBeGreaterThan(1000); // the agent answered generated events
    expect(Object.values(report.proxy.byMutator).reduce((a, b) => a + b, 0)).toBeGreaterThan(100);
    expect(report.proxy.handshakesMutated).toBeGreaterThan(0);
    expect(report.probes.ok).toBeGreaterThan(10);
    expect(report.probes.failed).toBe(0);
  }, 120_000);
});

describe('simulated KVM under fuzzed introspector traffic', () => {
  it('never throws, answers generated commands and leaves the healthy VM protected', async () => {
    const report = await runAgentCampaign({ target: 'simulator', repoRoot: root, frames: 15_000, seed: 12, fuzzedVms: 3, mutateRate: 0.02, maxSeconds: 90 });
    expect(report.failures).toEqual([]);
    expect(report.frames).toBeGreaterThanOrEqual(15_000);
    expect(report.proxy.generatedReplies).toBeGreaterThan(1000); // the simulated kernel answered generated commands
    expect(Object.values(report.proxy.byMutator).reduce((a, b) => a + b, 0)).toBeGreaterThan(100);
    expect(report.probes.failed).toBe(0);
    expect(report.agentSurvived).toBe(true);
  }, 120_000);
});
