/**
 * Session generations (src/session-generations.ts): strictly increasing per VM, also across restarts (a new
 * `SessionGenerations` over the same state directory is what a restarted agent builds), with the clock
 * injected — the persisted floor beats a wall clock that was set back. The last test runs the real listener
 * and simulator: a VM re-attaching in the same millisecond gets the previous generation + 1.
 * A real `periscope host-agent` process killed and restarted: apps/host-agent/test/session-generation-restart.test.ts.
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { SimQemu, SimVm } from '@periscope/simulator';
import { KvmiListener, parseCookies, PRUNE_AFTER_MS, SESSION_GENERATIONS_FILE, SessionGenerations, type VmConnection } from '../src/index.js';

const A = '00112233-4455-6677-8899-aabbccddeeff';
const B = 'ffeeddcc-bbaa-9988-7766-554433221100';
const T = 1_795_000_000_000; // a wall-clock ms value

const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  while (cleanups.length) await cleanups.pop()!();
});
function tempDir(): string {
  const d = mkdtempSync(join(tmpdir(), 'ha-gen-'));
  cleanups.push(() => rmSync(d, { recursive: true, force: true }));
  return d;
}
const persisted = (dir: string): Record<string, number> => JSON.parse(readFileSync(join(dir, SESSION_GENERATIONS_FILE), 'utf8')) as Record<string, number>;

describe('session generations', () => {
  it('are at least the wall clock (ms), and +1 over the last one when the clock has not moved on; per VM', () => {
    let now = T;
    const g = new SessionGenerations({ now: () => now });
    expect(g.next(A)).toBe(T);
    expect(g.next(A)).toBe(T + 1); // same millisecond
    expect(g.next(B)).toBe(T); // another VM has its own sequence
    now = T + 5000;
    expect(g.next(A)).toBe(T + 5000);
    now = T - 60_000; // the clock steps back inside the process
    expect(g.next(A)).toBe(T + 5001);
    expect(g.lastIssued(A)).toBe(T + 5001);
  });

  it('persisted floor beats a wall clock set back across a restart (same state directory)', () => {
    const dir = tempDir();
    let now = T;
    const first = new SessionGenerations({ dir, now: () => now });
    const g1 = first.next(A);
    first.next(A);
    const g2 = first.next(A);
    expect([g1, g2]).toEqual([T, T + 2]);
    expect(persisted(dir)).toEqual({ [A]: T + 2 }); // written before the generation is handed out
    // The "restart": a new instance over the same directory, with the clock set back a day.
    now = T - 24 * 3600 * 1000;
    const second = new SessionGenerations({ dir, now: () => now });
    expect(second.lastIssued(A)).toBe(g2);
    const g3 = second.next(A);
    expect(g3).toBeGreaterThan(g2);
    expect(g3).toBe(g2 + 1);
    expect(second.next(B)).toBe(now); // a VM never seen: the (set back) wall clock
    expect(persisted(dir)).toEqual({ [A]: g3, [B]: now });
  });

  it('without a state directory only the wall clock survives a restart (documented: a clock set back can repeat)', () => {
    let now = T;
    const g1 = new SessionGenerations({ now: () => now }).next(A);
    now = T + 1;
    expect(new SessionGenerations({ now: () => now }).next(A)).toBeGreaterThan(g1);
    now = T - 1000;
    expect(new SessionGenerations({ now: () => now }).next(A)).toBeLessThan(g1);
  });

  it('ignores an unreadable or malformed file (wall clock), rewrites it, and prunes entries 30 days behind the clock', () => {
    const dir = tempDir();
    writeFileSync(join(dir, SESSION_GENERATIONS_FILE), '{ not json');
    const now = T;
    expect(new SessionGenerations({ dir, now: () => now }).next(A)).toBe(T);
    writeFileSync(join(dir, SESSION_GENERATIONS_FILE), JSON.stringify({ [A]: 'x', [B.toUpperCase()]: T + 10, c: -5, d: 2 ** 60 }));
    const g = new SessionGenerations({ dir, now: () => now });
    expect(g.lastIssued(A)).toBeUndefined();
    expect(g.lastIssued(B)).toBe(T + 10); // uuids are kept lower-case
    expect(g.next(B)).toBe(T + 11);
    const old = 'aaaaaaaa-0000-0000-0000-000000000000';
    writeFileSync(join(dir, SESSION_GENERATIONS_FILE), JSON.stringify({ [old]: T - PRUNE_AFTER_MS - 1, [B]: T - PRUNE_AFTER_MS + 1 }));
    new SessionGenerations({ dir, now: () => now }).next(A);
    expect(persisted(dir)).toEqual({ [A]: T, [B]: T - PRUNE_AFTER_MS + 1 });
  });

  it('the listener gives a VM re-attaching in the same millisecond (real simulator) the previous generation + 1', async () => {
    const dir = tempDir();
    const path = join(dir, 'kvmi.sock');
    const attached: VmConnection[] = [];
    const listener = new KvmiListener({
      paths: [path],
      cookies: parseCookies(Buffer.from('s')),
      plan: { vcpuEvents: ['CR'], crs: [0], msrs: [], pageAccess: [] },
      decide: () => ({ kind: 'reply', action: 0 }),
      log: () => undefined,
      generations: new SessionGenerations({ dir: join(dir, 'state'), now: () => T }), // a clock that never moves
      onAttached: (vm) => attached.push(vm),
    });
    await listener.start();
    cleanups.push(() => listener.stop(200));
    const vm = new SimVm({ vcpus: 1, seed: 5, apsOnline: true, jitterMs: 0 });
    const qemu = new SimQemu(vm, { path, key: Buffer.from('s'), reconnectSeconds: 0.05 });
    cleanups.push(() => {
      qemu.stop();
      vm.close();
    });
    qemu.start();
    await waitFor(() => attached.length === 1);
    const g1 = attached[0]!.info!.sessionGeneration;
    expect(g1).toBe(T);
    await attached[0]!.detach('test: re-attach'); // QEMU reconnects
    await waitFor(() => attached.length === 2);
    const g2 = attached[1]!.info!.sessionGeneration;
    expect(g2).toBeGreaterThan(g1);
    expect(persisted(join(dir, 'state'))).toEqual({ [vm.uuidText]: g2 });
  });
});

async function waitFor(cond: () => boolean, ms = 10_000): Promise<void> {
  const t0 = Date.now();
  while (!cond()) {
    if (Date.now() - t0 > ms) throw new Error('timed out waiting');
    await new Promise((r) => setTimeout(r, 5));
  }
}
