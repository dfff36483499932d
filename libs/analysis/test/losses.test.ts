/**
 * Records an agent reports lost reach the operator: a guest storming a denied write beyond the agent's
 * detection budget (`--detection-rate`) has its extra detections counted in RATE_LIMITED loss records, which
 * analysis sums per VM and shows in `GET /v1/vms/{id}` (`periscope vm show`: "lost records") and
 * `GET /v1/losses`. Real analysis (embedded database), a real host agent in process, the simulator.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { HostAgent, parseCookies } from '@periscope/host-agent';
import { SimQemu, SimVm } from '@periscope/simulator';
import { parsePolicy } from '@periscope/verdicts';
import { Analysis } from '../src/index.js';
import { until } from './support.js';

const CR0_WP = 1n << 16n;
const BOOTSTRAP = parsePolicy({ id: 'bootstrap', version: 1, rules: [] });
/** The fleet policy analysis compiles and pushes: CR0.WP pinned (a denied clear raises a detection). */
const FLEET = `
format: periscope.policy/v1
name: losses
select: { names: [loss-vm] }
modules:
  cr-pinning: { action: deny, cr0: [WP] }
`;

describe('lost records reach the operator', () => {
  let a: Analysis;
  let agent: HostAgent;
  let vm: SimVm;
  let qemu: SimQemu;
  let dir = '';

  beforeAll(async () => {
    a = await Analysis.start({ db: 'pglite:memory', grpcListen: '127.0.0.1:0', httpListen: '127.0.0.1:0', keepaliveMs: 200, flushMs: 100 });
    await a.applyPolicy(FLEET);
    dir = mkdtempSync(join(tmpdir(), 'an-loss-'));
    const sock = join(dir, 'kvmi.sock');
    agent = new HostAgent({
      hostId: 'loss-host', kvmiPaths: [sock], cookies: parseCookies(Buffer.from('s')), policy: BOOTSTRAP, log: () => undefined,
      link: { address: `127.0.0.1:${a.grpcPort}`, backoff: { initialMs: 20, maxMs: 200 }, detectionRatePerVm: 3 },
    });
    await agent.start();
    vm = new SimVm({ vcpus: 1, seed: 41, jitterMs: 0, name: 'loss-vm' });
    qemu = new SimQemu(vm, { path: sock, key: Buffer.from('s'), reconnectSeconds: 0.05 });
    qemu.start();
    await until(() => a.liveVms.get(vm.uuidText)?.policyName === 'losses', 20_000, 'the VM assigned its fleet policy');
    await a.settled();
    await until(async () => {
      const h = (await a.store.listHosts()).find((x) => x.hostId === 'loss-host');
      return h?.policyState === 'active' && h.policyVersion === a.sessions.get('loss-host')?.lastPolicyVersion;
    }, 20_000, 'the pushed policy active on the agent');
  }, 60_000);

  afterAll(async () => {
    qemu?.stop();
    vm?.close();
    await agent?.stop(300);
    await a?.stop();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it('detections beyond the VM budget: counted by the agent, summed by analysis, shown with the VM', async () => {
    const cpu = vm.vcpus[0]!;
    for (let i = 0; i < 40; i++) {
      cpu.cpu.sregs.cr0 |= CR0_WP;
      await cpu.writeCr(0, cpu.cpu.sregs.cr0 & ~CR0_WP);
      expect(cpu.cpu.sregs.cr0 & CR0_WP).toBe(CR0_WP); // every write denied
    }
    const limited = (): number => Number(/periscope_agent_detections_rate_limited_total (\d+)/.exec(agent.registry.render())?.[1] ?? 0);
    expect(limited()).toBeGreaterThan(0);
    const base = `http://${a.httpAddress}`;
    type Loss = { hostId: string; vm: string; recordType: string; reason: string; count: string };
    let shown: Loss[] = [];
    await until(async () => {
      const r = (await (await fetch(`${base}/v1/vms/${vm.uuidText}`)).json()) as { losses: Loss[] };
      shown = r.losses;
      return shown.some((l) => l.recordType === 'detection' && l.reason === 'rate_limited' && Number(l.count) === limited());
    }, 10_000, 'the rate-limited detections summed by analysis');
    expect(shown).toEqual([{ hostId: 'loss-host', vm: vm.uuidText, recordType: 'detection', reason: 'rate_limited', count: String(limited()) }]);
    const all = (await (await fetch(`${base}/v1/losses`)).json()) as { losses: Loss[] };
    expect(all.losses).toContainEqual(shown[0]);
  }, 60_000);
});
