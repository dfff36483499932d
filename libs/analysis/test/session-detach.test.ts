/**
 * `store.detachVm` matches the session generation, so a VmDetached of an OLD session never detaches the VM's
 * current one. Shown with a VM moving between two real host agents (in process, each with its own simulated
 * QEMU of the same VM uuid, as in a live migration): the VM is attached on host B while host A's session ends
 * afterwards — analysis keeps it attached on B. This needs generations that differ between the sessions: when
 * every agent numbered its sessions from 1, both were generation 1 and A's late detach marked the VM detached.
 * Real simulator, real agents and gRPC links, analysis on PGlite and PostgreSQL.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { HostAgent, parseCookies } from '@periscope/host-agent';
import { SimQemu, SimVm } from '@periscope/simulator';
import { parsePolicy } from '@periscope/verdicts';
import { Analysis } from '../src/index.js';
import { DB_VARIANTS, until } from './support.js';

const UUID = Buffer.from('5e5510de7ac4400a9b1c0d2e3f405162', 'hex');

describe.each(DB_VARIANTS)('session generations and detach on $name', (variant) => {
  it('a late VmDetached from the old host does not detach the VM attached on the new host', async () => {
    const d = await variant.create();
    const a = await Analysis.start({ db: d.url, grpcListen: '127.0.0.1:0', httpListen: '127.0.0.1:0', keepaliveMs: 200, flushMs: 100 });
    const dir = mkdtempSync(join(tmpdir(), 'an-gen-detach-'));
    const stops: (() => Promise<void> | void)[] = [];
    try {
      const agent = async (hostId: string): Promise<{ agent: HostAgent; sock: string }> => {
        const sock = join(dir, `${hostId}.sock`);
        const h = new HostAgent({
          hostId, kvmiPaths: [sock], cookies: parseCookies(Buffer.from('s')), policy: parsePolicy({ id: 'bootstrap', version: 1, rules: [] }), log: () => undefined,
          stateDir: join(dir, hostId), link: { address: `127.0.0.1:${a.grpcPort}`, backoff: { initialMs: 20, maxMs: 200 } },
        });
        await h.start();
        stops.push(() => h.stop(300));
        return { agent: h, sock };
      };
      const qemuOf = (sock: string, seed: number): { vm: SimVm; qemu: SimQemu } => {
        const vm = new SimVm({ vcpus: 1, seed, uuid: UUID, apsOnline: true, jitterMs: 0, name: 'moving-vm' });
        const qemu = new SimQemu(vm, { path: sock, key: Buffer.from('s'), reconnectSeconds: 30 });
        stops.push(() => {
          qemu.stop();
          vm.close();
        });
        qemu.start();
        return { vm, qemu };
      };
      const hostA = await agent('host-a');
      const hostB = await agent('host-b');
      const onA = qemuOf(hostA.sock, 41);
      const uuid = onA.vm.uuidText;
      await until(async () => (await a.store.getVm(uuid))?.hostId === 'host-a', 30_000, 'the VM attached on host A');
      const genA = (await a.store.getVm(uuid))!.sessionGeneration;

      // The VM now runs on host B (its new QEMU hooks there) while host A still has the old session.
      qemuOf(hostB.sock, 42);
      await until(async () => (await a.store.getVm(uuid))?.hostId === 'host-b', 30_000, 'the VM attached on host B');
      const genB = (await a.store.getVm(uuid))!.sessionGeneration;
      expect(genB).toBe(BigInt(hostB.agent.listener.vms.get(uuid)!.info!.sessionGeneration));
      expect(genB).not.toBe(genA);

      // Then the old session on host A ends: its VmDetached (generation A) reaches analysis after B's attach.
      const detachedMessages = async (): Promise<number> => {
        const text = await (await fetch(`http://${a.httpAddress}/metrics`)).text();
        return Number(/periscope_analysis_link_messages_total\{kind="vm_detached"\} (\d+)/.exec(text)?.[1] ?? 0);
      };
      onA.qemu.stop();
      await until(() => hostA.agent.listener.vms.size === 0, 10_000, 'host A detached the VM');
      await until(async () => (await detachedMessages()) >= 1, 10_000, 'analysis received the VmDetached');
      await a.settled();
      expect(await a.store.getVm(uuid)).toMatchObject({ attached: true, hostId: 'host-b', sessionGeneration: genB });
      expect(a.liveVms.get(uuid)?.generation).toBe(genB);

      // B's own detach (its generation) does detach it.
      const before = await detachedMessages();
      await hostB.agent.listener.vms.get(uuid)!.detach('test: end of session on host B');
      await until(async () => (await detachedMessages()) > before, 10_000, 'analysis received B\'s VmDetached');
      await a.settled();
      await until(async () => (await a.store.getVm(uuid))?.attached === false, 10_000, 'the VM detached');
    } finally {
      while (stops.length) await stops.pop()!();
      await a.stop();
      rmSync(dir, { recursive: true, force: true });
      await d.drop();
    }
  }, 90_000);
});
