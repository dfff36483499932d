/**
 * Fault: kill -9 of a host agent under load, then a restart on the same socket.
 *
 * Every simulated VM keeps trying to clear CR0.WP (an attack the default policy denies) and puts the bit
 * back itself when a write went through. While the agent is dead, KVM has released the session (events
 * in flight continue as CONTINUE, §unhook) and nothing intercepts: those writes succeed — the fail-open
 * window, counted here per kill, from the kill to the moment every VM is re-attached and denies again.
 * The simulated QEMU reconnects on its own (`reconnectSeconds`), as `-chardev socket,reconnect=N` does.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { SimQemu, SimVm } from '@periscope/simulator';
import { AgentProcess } from './agent-process.js';
import { sleep, waitFor, withTimeout } from './wait.js';

const CR0_WP = 1n << 16n;

export interface AgentKillOptions {
  readonly repoRoot: string;
  readonly vms?: number;
  readonly kills?: number;
  /** QEMU reconnect interval, seconds (default 0.2). */
  readonly reconnectSeconds?: number;
  readonly seed?: number;
  readonly onProgress?: (line: string) => void;
}

export interface KillRound {
  /** Attack writes that went through (CR0.WP cleared) between the kill and full re-protection. */
  readonly failOpenWrites: number;
  /** Attack writes denied from the kill until every VM was re-protected. */
  readonly deniedWrites: number;
  /** vCPUs that were waiting for a reply at the kill (KVM released them as CONTINUE on the close). */
  readonly releasedInFlight: number;
  /** Kill → the last VM's first denial after the restart, ms (-1: not re-protected). */
  readonly reprotectMs: number;
}

export interface AgentKillReport {
  readonly vms: number;
  readonly rounds: readonly KillRound[];
  /** After the last restart: every VM denies the attack again. */
  readonly reprotectedAll: boolean;
  readonly failures: readonly string[];
}

export async function runAgentKill(opts: AgentKillOptions): Promise<AgentKillReport> {
  const dir = mkdtempSync(join(tmpdir(), 'kill-'));
  const sock = join(dir, 'kvmi.sock');
  writeFileSync(join(dir, 'cookie'), 'kill-secret');
  const agent = new AgentProcess({ repoRoot: opts.repoRoot, kvmiSocket: sock, cookieFile: join(dir, 'cookie'), hostId: 'kill' });
  const failures: string[] = [];
  const rounds: KillRound[] = [];
  const nVms = opts.vms ?? 8;
  const vms: SimVm[] = [];
  const qemus: SimQemu[] = [];
  let stop = false;
  // Per-VM state of the attack loop: writes that went through, and when the last denial happened.
  const state = new Map<SimVm, { through: number; denied: number; lastDeniedAt: number; inFlight: boolean }>();
  let reprotectedAll = false;
  try {
    await agent.start();
    for (let i = 0; i < nVms; i++) {
      const vm = new SimVm({ vcpus: 1, seed: (opts.seed ?? 1) * 1000 + i, name: `kill-${i}` });
      const q = new SimQemu(vm, { path: sock, key: Buffer.from('kill-secret'), reconnectSeconds: opts.reconnectSeconds ?? 0.2 });
      vms.push(vm);
      qemus.push(q);
      state.set(vm, { through: 0, denied: 0, lastDeniedAt: 0, inFlight: false });
      q.start();
    }
    if (!(await waitFor(() => vms.every((v) => v.hooked), 15_000))) throw new Error('VMs did not attach');
    await sleep(300);

    const loops = vms.map(async (vm) => {
      const cpu = vm.vcpus[0]!;
      const st = state.get(vm)!;
      while (!stop) {
        cpu.cpu.sregs.cr0 |= CR0_WP;
        st.inFlight = true;
        const r = await withTimeout(cpu.writeCr(0, cpu.cpu.sregs.cr0 & ~CR0_WP), 10_000);
        st.inFlight = false;
        if (r === 'timeout') {
          failures.push(`${vm.name}: CR0 write not completed within 10 s (stalled vCPU); agent: ${agent.stderrTail}`);
          return;
        }
        if ((cpu.cpu.sregs.cr0 & CR0_WP) === 0n) st.through++;
        else {
          st.denied++;
          st.lastDeniedAt = performance.now();
        }
        await sleep(2);
      }
    });

    for (let k = 0; k < (opts.kills ?? 3); k++) {
      await sleep(300);
      let leaked = 0;
      for (const st of state.values()) {
        leaked += st.through;
        st.through = 0;
        st.denied = 0;
      }
      if (leaked !== 0) failures.push(`before kill ${k + 1}: ${leaked} attack writes went through while the agent was up`);
      const inFlightAtKill = [...state.values()].filter((st) => st.inFlight).length;
      const t0 = performance.now();
      await agent.kill9();
      await agent.start();
      // Only a denial after the restart proves re-protection: a write in flight at the kill may still have
      // been denied by the dying agent just after t0.
      const tRestart = performance.now();
      // Re-protected: every VM hooked and denying again after the restart. Writes that went through
      // before a VM's first denial after the restart are that VM's fail-open window.
      const ok = await waitFor(() => vms.every((v) => v.hooked && state.get(v)!.lastDeniedAt > tRestart), 20_000);
      const reprotectMs = Math.round(Math.max(...[...state.values()].map((st) => st.lastDeniedAt)) - t0);
      if (!ok) failures.push(`kill ${k + 1}: VMs not re-protected within 20 s (${vms.filter((v) => v.hooked).length}/${vms.length} hooked)`);
      let failOpen = 0;
      let denied = 0;
      for (const st of state.values()) {
        failOpen += st.through;
        denied += st.denied;
        st.through = 0;
      }
      const round: KillRound = { failOpenWrites: failOpen, deniedWrites: denied, releasedInFlight: inFlightAtKill, reprotectMs: ok ? reprotectMs : -1 };
      rounds.push(round);
      opts.onProgress?.(`kill ${k + 1}: re-protected in ${round.reprotectMs} ms, ${failOpen} attack writes went through meanwhile, ${inFlightAtKill} in flight at the kill`);
    }
    await sleep(300);
    const leaked = [...state.values()].reduce((a, st) => a + st.through, 0);
    reprotectedAll = vms.every((v) => v.hooked) && leaked === 0;
    if (!reprotectedAll) failures.push(`after the last restart: ${leaked} attack writes went through, hooked ${vms.filter((v) => v.hooked).length}/${vms.length}`);
    stop = true;
    await Promise.all(loops);
  } catch (e) {
    failures.push((e as Error).message);
  } finally {
    stop = true;
    for (const q of qemus) q.stop();
    await agent.terminate(5000);
    rmSync(dir, { recursive: true, force: true });
  }
  return { vms: nVms, rounds, reprotectedAll, failures };
}
