/**
 * kill -9 of a REAL host agent process (`bin/periscope host-agent … --state-dir DIR --allow-command
 * write-physical`) while a breakpoint trace is planted (issue #9, docs/tracing.md "Unhook, SIGTERM, kill -9"):
 *  - nothing runs on SIGKILL, so the INT3 stays in guest memory (read through the simulator), and the record
 *    of it is in the state directory (`planted.json`);
 *  - until an agent hooks the VM again a call of the traced function takes #BP in the guest (the documented
 *    window, shown here once);
 *  - the agent restarted with the same state directory restores the original byte when the VM re-attaches,
 *    before analysis hears of the attach: the first write at the address the simulated KVM receives from the new
 *    session is the original byte over our INT3, then analysis re-plants from its row;
 *  - the guest's calls then run on without #BP, traced again (the simulator's ground truth `taggedCalls`).
 * Analysis runs in process (PostgreSQL when it answers, else PGlite), the simulator in process.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { callTaggedCopy, SimQemu, SimVm, type TaggedCall } from '@periscope/simulator';
import { Analysis } from '../src/index.js';
import { DB_VARIANTS, http, POLICY_ALL, until } from './support.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '../../..');
const bin = join(root, 'bin/periscope');
const FN = 'sim_copy_tagged';
const INT3 = 0xcc;
const KEY = Buffer.from('kill-test-secret');

/** A loopback port nobody listens on (bound, then released). */
async function freePort(): Promise<number> {
  const s = createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  const port = (s.address() as { port: number }).port;
  await new Promise<void>((r) => s.close(() => r()));
  return port;
}

/** `periscope host-agent` as a real process; resolves once its KVMI socket exists. */
async function startAgentProcess(o: { sock: string; cookieFile: string; analysis: string; stateDir: string; metricsPort: number }): Promise<{ child: ChildProcess; stderr: () => string }> {
  rmSync(o.sock, { force: true });
  const child = spawn(
    process.execPath,
    [
      bin, 'host-agent', '--kvmi-listen', `unix:${o.sock}`, '--cookie-file', o.cookieFile, '--host-id', 'kill-host',
      '--analysis', o.analysis, '--state-dir', o.stateDir, '--allow-command', 'write-physical',
      '--metrics-listen', `127.0.0.1:${o.metricsPort}`, '--link-backoff-max', '500ms', '--log-level', 'info',
    ],
    { stdio: ['ignore', 'ignore', 'pipe'] },
  );
  let stderr = '';
  child.stderr!.on('data', (c: Buffer) => (stderr = (stderr + c.toString()).slice(-40_000)));
  await until(() => existsSync(o.sock) || child.exitCode !== null, 30_000, 'the agent socket');
  if (child.exitCode !== null) throw new Error(`host agent exited ${child.exitCode}: ${stderr}`);
  return { child, stderr: () => stderr };
}

/** One VM_WRITE_PHYSICAL at the traced address as the simulated KVM received it (before it was applied). */
interface WriteAt {
  readonly byte: number;
  readonly before: number;
  readonly atMs: number;
  readonly hook: number;
}

const hexOf = (v: bigint): string => `0x${v.toString(16)}`;
const argsOf = (c: TaggedCall): string[] => [c.dst, c.src, c.tag, c.len].map(hexOf);
const variant = DB_VARIANTS.find((v) => v.name === 'postgres')!;

describe('kill -9 of a real host agent process with a planted INT3', () => {
  let drop: () => Promise<void> = async () => undefined;
  let a: Analysis;
  let vm: SimVm;
  let qemu: SimQemu;
  let dir = '';
  const children: ChildProcess[] = [];

  beforeAll(async () => {
    const d = await variant.create();
    drop = d.drop;
    a = await Analysis.start({ db: d.url, grpcListen: '127.0.0.1:0', httpListen: '127.0.0.1:0', keepaliveMs: 200, flushMs: 100 });
    await a.applyPolicy(POLICY_ALL);
    dir = mkdtempSync(join(tmpdir(), 'an-trace-kill-'));
  }, 60_000);

  afterAll(async () => {
    qemu?.stop();
    vm?.close();
    for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
    await a?.stop();
    if (dir) rmSync(dir, { recursive: true, force: true });
    await drop();
  });

  it('the INT3 stays after SIGKILL; the restarted agent (same --state-dir) restores the byte at re-attach first; calls run on without #BP', async () => {
    const base = `http://${a.httpAddress}`;
    const sock = join(dir, 'kvmi.sock');
    const stateDir = join(dir, 'state');
    const cookieFile = join(dir, 'qemu.key');
    writeFileSync(cookieFile, KEY);
    const common = { sock, cookieFile, analysis: `127.0.0.1:${a.grpcPort}`, stateDir };
    const first = await startAgentProcess({ ...common, metricsPort: await freePort() });
    children.push(first.child);

    vm = new SimVm({ vcpus: 2, seed: 23, apsOnline: true, jitterMs: 0, name: 'kill-vm' });
    const gpa = vm.kernel.symbolPhys(FN);
    const original = vm.memory.read(gpa, 1)![0]!;
    const byte = (): number => vm.memory.read(gpa, 1)![0]!;
    let hooks = 0;
    let hookedAtMs = 0;
    vm.on('hooked', () => {
      hooks++;
      hookedAtMs = performance.now();
    });
    const writes: WriteAt[] = [];
    vm.on('command', (key, _vcpu, req) => {
      if (key === 'VM_WRITE_PHYSICAL' && (req['gpa'] as bigint) === gpa) writes.push({ byte: (req['data'] as Uint8Array)[0]!, before: byte(), atMs: performance.now(), hook: hooks });
    });
    qemu = new SimQemu(vm, { path: sock, key: KEY, reconnectSeconds: 0.05 });
    qemu.start();
    await until(() => a.liveVms.get(vm.uuidText)?.protection['kernel-code-integrity']?.startsWith('protected') ?? false, 60_000, 'the VM protected');

    // A trace, planted, with hits from both vCPUs.
    const r = await http(base, `/v1/vms/${vm.uuidText}/traces`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ function: FN, args: 4, by: 'test' }) });
    expect(r.status, JSON.stringify(r.body)).toBe(201);
    expect(byte()).toBe(INT3);
    const calls = async (n: number, from: number): Promise<TaggedCall[]> => {
      const out: TaggedCall[] = [];
      for (let i = 0; i < n; i++) {
        out.push(...(await Promise.all(vm.vcpus.map((c, j) => callTaggedCopy(vm, c, 1 + ((from + i * 3 + j) % 64), (from + i * 7 + j) % 64)))));
      }
      return out;
    };
    const before = await calls(10, 0);
    expect(before.filter((c) => c.outcome !== 'completed' || !c.copied)).toEqual([]);
    await a.settled();
    expect(byte()).toBe(INT3);
    const planted = JSON.parse(readFileSync(join(stateDir, 'planted.json'), 'utf8')) as Record<string, { bytes: Record<string, { original: number; written: number }> }>;
    expect(planted[vm.uuidText]?.bytes[hexOf(gpa)]).toEqual({ original, written: INT3 });

    // kill -9: the process dies without detaching; the INT3 stays in guest memory.
    const hooksBefore = hooks;
    first.child.kill('SIGKILL');
    await until(() => first.child.exitCode !== null || first.child.signalCode !== null, 10_000, 'the agent gone');
    await until(() => !vm.connected, 10_000, 'the VM unhooked (socket closed by the kernel)');
    expect(byte()).toBe(INT3);
    // The documented window: with no introspector a call of the traced function takes #BP inside the guest.
    const unprotected = await callTaggedCopy(vm, vm.vcpus[1]!, 8, 1);
    expect(unprotected).toMatchObject({ outcome: 'exception', vector: 3 });
    expect(byte()).toBe(INT3);

    // The agent restarted with the same state directory: at re-attach it restores the byte before anything else.
    const killedAt = performance.now();
    const metricsPort = await freePort();
    const second = await startAgentProcess({ ...common, metricsPort });
    children.push(second.child);
    await until(() => hooks > hooksBefore, 30_000, 'the VM re-attached to the restarted agent');
    await until(() => writes.some((w) => w.hook > hooksBefore), 30_000, 'a write at the address in the new session');
    const afterRestart = writes.filter((w) => w.hook > hooksBefore);
    expect(afterRestart[0]).toMatchObject({ byte: original, before: INT3 });
    const metric = async (name: string) => {
      const text = await (await fetch(`http://127.0.0.1:${metricsPort}/metrics`)).text();
      return Number(text.split('\n').find((l) => l.startsWith(`${name} `))?.slice(name.length + 1) ?? 'NaN');
    };
    expect(await metric('periscope_agent_planted_bytes_recovered_total')).toBe(1);
    expect(second.stderr()).toContain('still in the guest after an unclean stop: restored');
    // Analysis, which learns of the attach only after the restore, re-plants from its row (over the original byte).
    await until(() => byte() === INT3, 30_000, 'analysis re-planted');
    const replant = writes.filter((w) => w.hook > hooksBefore)[1]!;
    expect(replant).toMatchObject({ byte: INT3, before: original });
    const restoredMs = afterRestart[0]!.atMs - killedAt;
    const restoredAfterHookMs = afterRestart[0]!.atMs - hookedAtMs;

    // The guest's calls run on without #BP, and are traced again.
    const hitsBefore = ((await http(base, `/v1/traces/hits?vm=${vm.uuidText}&function=${FN}&limit=5000`)).body['hits'] as unknown[]).length;
    const after = await calls(10, 100);
    expect(after.filter((c) => c.outcome !== 'completed' || !c.copied)).toEqual([]);
    await a.settled();
    const hits = (await http(base, `/v1/traces/hits?vm=${vm.uuidText}&function=${FN}&limit=5000`)).body['hits'] as { args: string[]; generation: string }[];
    // The restarted agent's session has a greater generation than the killed one's (generations keep increasing
    // across agent restarts), so its hits are new (VM, generation, seq) keys, never taken for re-deliveries.
    const generations = (from: number, to?: number): bigint[] => [...new Set(hits.slice(from, to).map((h) => h.generation))].map(BigInt);
    const [killedGen, ...moreKilled] = generations(0, hitsBefore);
    const [restartedGen, ...moreRestarted] = generations(hitsBefore);
    expect([moreKilled, moreRestarted]).toEqual([[], []]);
    expect(restartedGen! > killedGen!).toBe(true);
    // Every new hit is one of these calls, with its arguments, once (a step slower than the 1 s deadline on a
    // loaded machine fails open and is missed, never recorded wrong).
    const newHits = hits.slice(hitsBefore).map((h) => JSON.stringify(h.args));
    const made = new Set(after.map((c) => JSON.stringify(argsOf(c))));
    expect(newHits.length).toBeGreaterThan(0);
    expect(new Set(newHits).size).toBe(newHits.length);
    expect(newHits.filter((h) => !made.has(h))).toEqual([]);
    for (const c of vm.vcpus) expect(c.deliveredExceptions.filter((x) => x.vector === 3).length).toBe(c.index === 1 ? 1 : 0); // only the documented one
    // No double plant anywhere: every INT3 written found the original byte.
    expect(writes.filter((w) => w.byte === INT3 && w.before === INT3)).toEqual([]);

    // Trace stop restores the byte; SIGTERM of the restarted agent leaves nothing planted.
    expect((await http(base, `/v1/vms/${vm.uuidText}/traces/${FN}?by=test`, { method: 'DELETE' })).status).toBe(200);
    expect(byte()).toBe(original);
    second.child.kill('SIGTERM');
    await until(() => second.child.exitCode !== null, 30_000, 'the agent exits on SIGTERM');
    expect(byte()).toBe(original);
    console.log(`kill -9 with a planted INT3: the restarted agent restored the byte ${restoredMs.toFixed(0)} ms after its start began (process start + QEMU reconnect + attach), ${restoredAfterHookMs.toFixed(1)} ms after the VM re-attached; ${newHits.length}/${after.length} calls traced after the restart`);
  }, 180_000);
});
