/**
 * Fuzz campaigns with a host agent running as a real process (`bin/periscope host-agent`).
 *
 * Target `agent`: fuzzed VMs reach the agent through a {@link FuzzProxy} that mutates the frames KVM
 * sends (events, command replies) and some QEMU handshakes, and pumps generated events.
 * Target `simulator`: the proxy mutates what the agent sends (commands, event replies) and pumps
 * generated commands into the simulated KVM of the fuzzed VMs, which run in this process; an uncaught
 * exception or unhandled rejection here is a failure.
 *
 * In both, one healthy VM connects to the agent directly and is
 * probed throughout: each probe clears CR0.WP, which the agent's default policy must deny (the bit stays
 * set) — so "other VMs unaffected" is checked by behaviour, not by the agent saying so. The agent's RSS
 * is sampled from /proc; a crash, a hang of the healthy VM or a failed clean shutdown is a failure.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { SimQemu, SimVm } from '@periscope/simulator';
import { AgentProcess } from './agent-process.js';
import { sleep, waitFor, withTimeout } from './wait.js';
import { FuzzProxy, type FuzzProxyStats } from './proxy.js';
import { mulberry32 } from './mutate.js';

const CR0_WP = 1n << 16n;

export interface AgentCampaignOptions {
  /** What is fuzzed (default `agent`). */
  readonly target?: 'agent' | 'simulator';
  /** Repository root (where `bin/periscope` lives). */
  readonly repoRoot: string;
  /** Stop after this many frames reached the agent through the proxy. */
  readonly frames: number;
  readonly seed?: number;
  /** Simulated VMs behind the proxy. */
  readonly fuzzedVms?: number;
  readonly mutateRate?: number;
  readonly injectRate?: number;
  readonly handshakeMutateRate?: number;
  /** Pump generated events on each connection (default true); see FuzzProxyOptions.generate. */
  readonly generate?: boolean;
  /** Generated events in flight per fuzzed connection (FuzzProxyOptions.generateWindow; huge = a flooding peer). */
  readonly generateWindow?: number;
  /** Hard stop, whatever the frame count. */
  readonly maxSeconds?: number;
  readonly onProgress?: (p: AgentCampaignProgress) => void;
}

export interface AgentCampaignProgress {
  readonly frames: number;
  readonly elapsedMs: number;
  readonly rssMiB: number;
  readonly connections: number;
}

export interface AgentCampaignReport {
  readonly target: 'agent' | 'simulator';
  readonly seed: number;
  readonly frames: number;
  readonly seconds: number;
  readonly proxy: FuzzProxyStats;
  /** Healthy-VM probes: each clears CR0.WP and must find it still set. */
  readonly probes: { readonly ok: number; readonly failed: number; readonly maxMs: number; readonly p99Ms: number };
  /** Agent RSS after warm-up and at the end, MiB. */
  readonly rssStartMiB: number;
  readonly rssEndMiB: number;
  readonly rssMaxMiB: number;
  /** The agent was alive at the end and exited 0 on SIGTERM. */
  readonly agentSurvived: boolean;
  readonly agentExitCode: number | null;
  /** Guest actions on fuzzed VMs that did not complete within 2 s (the session was then dropped). */
  readonly fuzzedStalls: number;
  readonly failures: readonly string[];
}

export async function runAgentCampaign(opts: AgentCampaignOptions): Promise<AgentCampaignReport> {
  const seed = opts.seed ?? 1;
  const target = opts.target ?? 'agent';
  const inProcessFailures: string[] = [];
  const onUncaught = (e: unknown) => inProcessFailures.push(`uncaught in the simulator process: ${(e as Error)?.stack ?? String(e)}`);
  if (target === 'simulator') {
    process.on('uncaughtException', onUncaught);
    process.on('unhandledRejection', onUncaught);
  }
  const dir = mkdtempSync(join(tmpdir(), 'fz-'));
  const agentSock = join(dir, 'kvmi.sock');
  const proxySock = join(dir, 'fuzz.sock');
  const secret = 'fuzz-secret';
  writeFileSync(join(dir, 'cookie'), secret);
  const failures: string[] = [];
  const agent = new AgentProcess({ repoRoot: opts.repoRoot, kvmiSocket: agentSock, cookieFile: join(dir, 'cookie'), hostId: 'fuzz' });
  const proxy = new FuzzProxy({
    listenPath: proxySock,
    targetPath: agentSock,
    direction: target === 'agent' ? 'to-target' : 'to-qemu',
    mutateRate: opts.mutateRate ?? 0.01,
    injectRate: opts.injectRate ?? 0.01,
    handshakeMutateRate: opts.handshakeMutateRate ?? 0.05,
    seed,
    generate: opts.generate ?? true,
    ...(opts.generateWindow !== undefined ? { generateWindow: opts.generateWindow } : {}),
  });
  const qemus: SimQemu[] = [];
  let stop = false;
  const t0 = Date.now();
  const probeTimes: number[] = [];
  let probeFailed = 0;
  let fuzzedStalls = 0;
  let rssStart = 0;
  let rssMax = 0;

  try {
    await agent.start();
    await proxy.start();

    // The healthy VM, straight to the agent.
    const healthy = new SimVm({ vcpus: 1, seed: seed + 1000, name: 'healthy' });
    const hq = new SimQemu(healthy, { path: agentSock, key: Buffer.from(secret), reconnectSeconds: 0.2 });
    qemus.push(hq);
    hq.start();
    if (!(await waitFor(() => healthy.hooked, 10_000))) throw new Error('healthy VM did not attach');
    await sleep(300); // attach sequence: controls enabled

    const prng = mulberry32(seed);
    const fuzzLoops: Promise<void>[] = [];
    for (let i = 0; i < (opts.fuzzedVms ?? 4); i++) {
      fuzzLoops.push(
        (async () => {
          let n = 0;
          while (!stop) {
            const vm = new SimVm({ vcpus: 2, seed: seed + i * 7919 + n++, name: `fuzzed-${i}` });
            const q = new SimQemu(vm, { path: proxySock, key: Buffer.from(secret), reconnectSeconds: 0.02 });
            qemus.push(q);
            q.start();
            // Drive guest activity that makes KVM send events; a stall ends this VM, a new one follows.
            const until = Date.now() + 3000;
            while (!stop && Date.now() < until) {
              if (!vm.hooked) {
                await sleep(5);
                continue;
              }
              const cpu = vm.vcpus[Math.floor(prng() * vm.vcpus.length)]!;
              const r = prng();
              const act =
                r < 0.4
                  ? cpu.writeCr(0, cpu.cpu.sregs.cr0 ^ CR0_WP)
                  : r < 0.7
                    ? cpu.wrmsr(0xc0000082, 0xffffffff81000000n + BigInt(Math.floor(prng() * 4096)))
                    : cpu.writeCr(4, cpu.cpu.sregs.cr4 ^ (1n << 20n));
              const res = await withTimeout(act.catch(() => 'error' as const), 2000);
              if (res === 'timeout') {
                fuzzedStalls++;
                break;
              }
            }
            q.stop();
            qemus.splice(qemus.indexOf(q), 1);
          }
        })(),
      );
    }

    // Probe the healthy VM and watch the agent until enough frames went through.
    let lastProgress = 0;
    while (proxy.framesDelivered < opts.frames) {
      if (agent.exited) {
        failures.push(`host agent exited (code ${agent.exitCode}) during the campaign: ${agent.stderrTail}`);
        break;
      }
      if (opts.maxSeconds !== undefined && Date.now() - t0 > opts.maxSeconds * 1000) break;
      const cpu = healthy.vcpus[0]!;
      const before = cpu.cpu.sregs.cr0;
      const p0 = performance.now();
      const res = await withTimeout(cpu.writeCr(0, before & ~CR0_WP), 5000);
      const ms = performance.now() - p0;
      if (res === 'timeout') {
        probeFailed++;
        failures.push(`healthy VM: CR0 write not answered within 5 s (frame ${proxy.framesDelivered})`);
        break;
      }
      if ((cpu.cpu.sregs.cr0 & CR0_WP) === 0n) {
        probeFailed++;
        failures.push(`healthy VM: CR0.WP cleared (the agent allowed the write) at frame ${proxy.framesDelivered}`);
        cpu.cpu.sregs.cr0 = before;
      } else probeTimes.push(ms);
      const rss = agent.rssMiB();
      rssMax = Math.max(rssMax, rss);
      if (rssStart === 0 && Date.now() - t0 > 2000) rssStart = rss;
      if (Date.now() - lastProgress > 1000) {
        lastProgress = Date.now();
        opts.onProgress?.({ frames: proxy.framesDelivered, elapsedMs: Date.now() - t0, rssMiB: rss, connections: proxy.stats.connections });
      }
      await sleep(20);
    }
    stop = true;
    await Promise.all(fuzzLoops);
  } catch (e) {
    failures.push((e as Error).message);
  } finally {
    stop = true;
    for (const q of qemus) q.stop();
    await proxy.stop().catch(() => undefined);
  }

  const rssEnd = agent.rssMiB();
  let survived = !agent.exited;
  if (survived) {
    const code = await agent.terminate(5000);
    if (code === null) {
      failures.push('host agent did not exit within 5 s of SIGTERM');
      survived = false;
    } else if (code !== 0) {
      failures.push(`host agent exited ${code} on SIGTERM: ${agent.stderrTail}`);
      survived = false;
    }
  } else if (!failures.some((f) => f.startsWith('host agent exited'))) failures.push(`host agent exited (code ${agent.exitCode}): ${agent.stderrTail}`);
  rmSync(dir, { recursive: true, force: true });
  if (target === 'simulator') {
    process.off('uncaughtException', onUncaught);
    process.off('unhandledRejection', onUncaught);
    failures.push(...inProcessFailures.slice(0, 5));
  }
  probeTimes.sort((a, b) => a - b);
  return {
    target,
    seed,
    frames: proxy.framesDelivered,
    seconds: (Date.now() - t0) / 1000,
    proxy: proxy.stats,
    probes: {
      ok: probeTimes.length,
      failed: probeFailed,
      maxMs: probeTimes.at(-1) ?? 0,
      p99Ms: probeTimes[Math.floor(probeTimes.length * 0.99)] ?? 0,
    },
    rssStartMiB: rssStart,
    rssEndMiB: rssEnd,
    rssMaxMiB: rssMax,
    agentSurvived: survived,
    agentExitCode: agent.exitCode,
    fuzzedStalls,
    failures,
  };
}
