/**
 * 1000 VM connect/disconnect cycles against one in-process host agent: open file descriptors, active
 * handles and the heap after a forced GC must come back to their baseline (±2 descriptors/handles,
 * +5 MiB heap). Each cycle is a full session: QEMU handshake, attach sequence, a denied attack, then the
 * VM goes away (half of them with an orderly UNHOOK, half by closing the socket).
 */
import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { describe, expect, it } from 'vitest';
import { HostAgent, parseCookies } from '@periscope/host-agent';
import { SimQemu, SimVm } from '@periscope/simulator';
import { loadDefaultPolicy } from '@periscope/verdicts';
import { sleep, waitFor } from '../src/index.js';

setFlagsFromString('--expose-gc');
const gc = runInNewContext('gc') as () => void;

const CR0_WP = 1n << 16n;

function openFds(): number {
  return readdirSync('/proc/self/fd').length;
}

function handles(): number {
  return process.getActiveResourcesInfo().filter((r) => r !== 'TTYWrap' && r !== 'Timeout').length;
}

async function settle(): Promise<{ fds: number; handles: number; heapMiB: number }> {
  await sleep(200);
  for (let i = 0; i < 3; i++) {
    gc();
    await sleep(20);
  }
  return { fds: openFds(), handles: handles(), heapMiB: process.memoryUsage().heapUsed / 2 ** 20 };
}

describe('connect/disconnect cycles', () => {
  it('1000 VM sessions leave descriptors, handles and heap where they were', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'cyc-'));
    const sock = join(dir, 'kvmi.sock');
    const agent = new HostAgent({ hostId: 'cycles', kvmiPaths: [sock], cookies: parseCookies(Buffer.from('c')), policy: loadDefaultPolicy(), log: () => undefined });
    await agent.start();
    const runOne = async (i: number) => {
      const vm = new SimVm({ vcpus: 1, seed: i, name: `cyc-${i}`, runDir: dir, removeRamOnClose: true });
      const q = new SimQemu(vm, { path: sock, key: Buffer.from('c'), reconnectSeconds: 60 });
      q.start();
      if (!(await waitFor(() => vm.hooked, 10_000))) throw new Error(`cycle ${i}: no attach`);
      // The attach sequence enables CR interception shortly after the hook: attack until denied.
      const cpu = vm.vcpus[0]!;
      const t0 = Date.now();
      for (;;) {
        cpu.cpu.sregs.cr0 |= CR0_WP;
        await cpu.writeCr(0, cpu.cpu.sregs.cr0 & ~CR0_WP);
        if ((cpu.cpu.sregs.cr0 & CR0_WP) !== 0n) break;
        if (Date.now() - t0 > 5000) throw new Error(`cycle ${i}: attack not denied within 5 s of attach`);
        await sleep(2);
      }
      if (i % 2 === 0) await q.shutdown();
      q.stop();
      vm.close();
    };
    // Warm up (JIT, pools, first-use allocations), then take the baseline.
    for (let i = 0; i < 50; i++) await runOne(i);
    const before = await settle();
    const cycles = 1000;
    for (let i = 50; i < 50 + cycles; i++) await runOne(i);
    await sleep(300);
    const after = await settle();
    await agent.stop(500);
    rmSync(dir, { recursive: true, force: true });
    console.log(`cycles: fds ${before.fds} → ${after.fds}, handles ${before.handles} → ${after.handles}, heap ${before.heapMiB.toFixed(1)} → ${after.heapMiB.toFixed(1)} MiB`);
    expect(Math.abs(after.fds - before.fds)).toBeLessThanOrEqual(2);
    expect(Math.abs(after.handles - before.handles)).toBeLessThanOrEqual(2);
    expect(after.heapMiB - before.heapMiB).toBeLessThan(5);
  }, 240_000);
});
