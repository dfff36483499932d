#!/usr/bin/env node
// Fuzz campaign against the host agent (a real process): node libs/reliability/bin/fuzz-agent.mjs [--frames N] [--seed S] [--vms N] [--max-seconds S] [--json]
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { runAgentCampaign } from '../dist/index.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '../../..');
const { values } = parseArgs({
  options: {
    target: { type: 'string', default: 'agent' },
    frames: { type: 'string', default: '1000000' },
    seed: { type: 'string', default: '1' },
    vms: { type: 'string', default: '4' },
    'mutate-rate': { type: 'string', default: '0.01' },
    'max-seconds': { type: 'string' },
    json: { type: 'boolean', default: false },
    help: { type: 'boolean', short: 'h', default: false },
  },
});
if (values.help) {
  console.log(`fuzz-agent: mutate KVM->agent traffic of simulated VMs through a proxy while a healthy VM is probed.

 --target T        agent (mutate KVM->agent traffic) or simulator (mutate agent->KVM traffic); default agent
  --frames N        frames to deliver through the proxy (default 1000000)
  --seed S          PRNG seed (default 1); a run is reproducible from it
  --vms N           fuzzed VMs at once (default 4)
  --mutate-rate R   share of frames mutated (default 0.01)
  --max-seconds S   stop after S seconds whatever the count
  --json            print the report as JSON

Example: node libs/reliability/bin/fuzz-agent.mjs --frames 20000 --seed 7`);
  process.exit(0);
}
const num = (k) => {
  const v = Number(values[k]);
  if (!Number.isFinite(v) || v < 0) {
    console.error(`fuzz-agent: --${k} must be a non-negative number, got ${values[k]}`);
    process.exit(2);
  }
  return v;
};
if (values.target !== 'agent' && values.target !== 'simulator') {
  console.error(`fuzz-agent: --target must be agent or simulator, got ${values.target}`);
  process.exit(2);
}
const report = await runAgentCampaign({
  target: values.target,
  repoRoot: root,
  frames: num('frames'),
  seed: num('seed'),
  fuzzedVms: num('vms'),
  mutateRate: num('mutate-rate'),
  ...(values['max-seconds'] !== undefined ? { maxSeconds: num('max-seconds') } : {}),
  onProgress: (p) => process.stderr.write(`\r${p.frames} frames, ${(p.elapsedMs / 1000).toFixed(0)} s, agent RSS ${p.rssMiB.toFixed(0)} MiB, ${p.connections} connections   `),
});
process.stderr.write('\n');
if (values.json) console.log(JSON.stringify(report, null, 2));
else {
  console.log(`target ${report.target}: frames ${report.frames} in ${report.seconds.toFixed(1)} s (${(report.frames / report.seconds).toFixed(0)}/s), seed ${report.seed}`);
  console.log(`generated ${report.proxy.framesGenerated} (replies ${report.proxy.generatedReplies}), mutated ${Object.values(report.proxy.byMutator).reduce((a, b) => a + b, 0)} (${Object.entries(report.proxy.byMutator).map(([k, v]) => `${k} ${v}`).join(', ')}), injected ${report.proxy.framesInjected}, handshakes mutated ${report.proxy.handshakesMutated}, connections ${report.proxy.connections} (closed by agent ${report.proxy.closedByTarget})`);
  console.log(`healthy VM probes: ${report.probes.ok} ok, ${report.probes.failed} failed, p99 ${report.probes.p99Ms.toFixed(2)} ms, max ${report.probes.maxMs.toFixed(2)} ms`);
  console.log(`agent RSS: ${report.rssStartMiB.toFixed(0)} MiB after warm-up, ${report.rssEndMiB.toFixed(0)} MiB at end, max ${report.rssMaxMiB.toFixed(0)} MiB; survived: ${report.agentSurvived}`);
  for (const f of report.failures) console.log(`FAILURE: ${f}`);
}
process.exit(report.failures.length ? 1 : 0);
