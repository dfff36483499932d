/**
 * A running fleet for the browser tests, the way libs/analysis/test/e2e.test.ts builds one: analysis in
 * process (PGlite in memory, real gRPC and HTTP, serving the built dashboard), and per host a real host
 * agent linked to it over gRPC with a real simulator (KVM + QEMU + guests on the KVMI wire protocol)
 * whose guests run a benign workload. Plus Chromium (Debian's, installed by scripts/ensure-chromium.mjs)
 * driven by playwright-core.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium, type Browser } from 'playwright-core';
import { Analysis } from '@periscope/analysis';
import { HostAgent, parseCookies } from '@periscope/host-agent';
import { Simulator, type SimVm } from '@periscope/simulator';
import { parsePolicy } from '@periscope/verdicts';

export const ROOT = join(dirname(fileURLToPath(import.meta.url)), '../../..');
export const DASHBOARD_DIST = join(ROOT, 'apps/dashboard/dist');
export const SCREENSHOTS = join(ROOT, 'docs/screenshots');

export const POLICY_ALL = `
format: periscope.policy/v1
name: fleet-default
description: every protection module on every VM
select: {}
modules:
  kernel-code-integrity: { action: deny }
  cr-pinning: { action: deny, cr0: [WP], cr4: [SMEP, SMAP] }
  syscall-msrs: { action: deny }
  descriptor-tables: { action: deny, tables: [IDTR, GDTR] }
`;

export async function until(cond: () => boolean | Promise<boolean>, ms = 10_000, what = 'condition'): Promise<void> {
  const t0 = Date.now();
  while (!(await cond())) {
    if (Date.now() - t0 > ms) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

export async function launchChromium(): Promise<Browser> {
  // @ts-expect-error a plain .mjs script of the repository, no type declarations
  const { ensureChromium } = (await import('../../../scripts/ensure-chromium.mjs')) as { ensureChromium: () => string };
  const executablePath = ensureChromium();
  return chromium.launch({ executablePath, headless: true, args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'] });
}

export interface Fleet {
  analysis: Analysis;
  base: string;
  hosts: { id: string; agent: HostAgent; sim: Simulator }[];
  stop(): Promise<void>;
}

const BOOTSTRAP = parsePolicy({ id: 'bootstrap', version: 1, rules: [] });

export async function startFleet(o: { hosts: number; vmsPerHost: number; activity?: number; apiToken?: string }): Promise<Fleet> {
  const dir = mkdtempSync(join(tmpdir(), 'psdash-'));
  writeFileSync(join(dir, 'fleet-default.yaml'), POLICY_ALL);
  const analysis = await Analysis.start({
    db: 'pglite:memory', grpcListen: '127.0.0.1:0', httpListen: '127.0.0.1:0', policyDir: dir, dashboardDir: DASHBOARD_DIST, keepaliveMs: 500, flushMs: 250,
    ...(o.apiToken ? { apiToken: o.apiToken } : {}),
  });
  const hosts: Fleet['hosts'] = [];
  for (let h = 1; h <= o.hosts; h++) {
    const sock = join(dir, `h${h}.sock`);
    const id = `host-${h}`;
    const agent = new HostAgent({ hostId: id, kvmiPaths: [sock], cookies: parseCookies(Buffer.from('s')), policy: BOOTSTRAP, log: () => undefined, link: { address: `127.0.0.1:${analysis.grpcPort}`, backoff: { initialMs: 20, maxMs: 200 } } });
    await agent.start();
    const sim = new Simulator({ introspector: sock, key: Buffer.from('s'), vms: o.vmsPerHost, vcpus: 2, seed: h * 101, activity: o.activity ?? 5, workloadDelayMs: 500, reconnectSeconds: 0.05, jitterMs: 0 });
    sim.start();
    hosts.push({ id, agent, sim });
  }
  return {
    analysis,
    base: `http://${analysis.httpAddress}`,
    hosts,
    async stop() {
      for (const h of hosts) await h.sim.shutdown().catch(() => undefined);
      for (const h of hosts) await h.agent.stop(300).catch(() => undefined);
      await analysis.stop();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** Every VM of the fleet attached, kernel-protected, and KVM intercepting the syscall MSRs on every vCPU. */
export async function fleetProtected(f: Fleet, ms = 60_000): Promise<void> {
  const all: SimVm[] = f.hosts.flatMap((h) => [...h.sim.vms]);
  await until(() => all.every((vm) => f.analysis.liveVms.get(vm.uuidText)?.protection['kernel-code-integrity']?.startsWith('protected') ?? false), ms, 'every VM protected');
  await f.analysis.settled();
  await until(() => all.every((vm) => vm.vcpus.every((c) => c.interceptions.msrs.has(0xc0000082))), ms, 'LSTAR interception on every vCPU');
}
