/**
 * Link tests: the real agent (`HostAgent`, in process) + the real simulator over Unix sockets + a real
 * gRPC analysis peer (`@periscope/testing`).
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { SimQemu, SimVm } from '@periscope/simulator';
import { AnalysisPeer, type AnalysisPeerOptions } from '@periscope/testing';
import { parsePolicy, type Policy } from '@periscope/verdicts';
import { parseCookies } from '../../src/cookies.js';
import { HostAgent } from '../../src/host-agent.js';
import type { LinkConfig } from '../../src/link/runtime.js';

export const CR0_WP = 1n << 16n;
export const CR4_SMEP = 1n << 20n;
export const CR4_PGE = 1n << 7n;

/** The test policy: a CR0.WP-clear deny that raises a detection, an ask-central CR4.PGE rule, reports. */
export function testPolicy(over: { askDeadlineMs?: number; version?: number; defaultReport?: 'always' | 'never' } = {}): Policy {
  return parsePolicy({
    id: 'link-test',
    version: over.version ?? 1,
    defaultReport: over.defaultReport ?? 'always',
    rules: [
      { id: 'cr0-wp-clear', match: { kind: 'CR', cr: 0, clears: '0x10000' }, action: 'deny', report: 'event', severity: 'high' },
      { id: 'cr4-pge-ask', match: { kind: 'CR', cr: 4, changes: '0x80' }, askCentral: { deadlineMs: over.askDeadlineMs ?? 50, default: 'allow' } },
      { id: 'guest-request', match: { kind: 'HYPERCALL' }, askCentral: { deadlineMs: over.askDeadlineMs ?? 50, default: 'allow' } },
    ],
    interception: { events: ['CR', 'HYPERCALL'], crs: [0, 4], msrs: [] },
  });
}

export interface AgentHandle {
  agent: HostAgent;
  logs: string[];
  stop(): Promise<void>;
}

const cleanups: (() => Promise<void> | void)[] = [];
export async function cleanup(): Promise<void> {
  while (cleanups.length) await cleanups.pop()!();
}
export function onCleanup(fn: () => Promise<void> | void): void {
  cleanups.push(fn);
}

export function tempDir(prefix = 'ha-link-'): string {
  const d = mkdtempSync(join(tmpdir(), prefix));
  cleanups.push(() => rmSync(d, { recursive: true, force: true }));
  return d;
}

export async function startPeer(opts: AnalysisPeerOptions = {}): Promise<AnalysisPeer> {
  const peer = new AnalysisPeer(opts);
  await peer.start();
  cleanups.push(() => peer.kill());
  return peer;
}

export async function startAgent(opts: {
  socketPath: string;
  peer?: AnalysisPeer;
  address?: string;
  link?: Partial<LinkConfig>;
  policy?: Policy;
  stateDir?: string;
  hostId?: string;
}): Promise<AgentHandle> {
  const logs: string[] = [];
  const address = opts.address ?? opts.peer?.address;
  const agent = new HostAgent({
    hostId: opts.hostId ?? 'test-host',
    kvmiPaths: [opts.socketPath],
    cookies: parseCookies(Buffer.from('s')),
    policy: opts.policy ?? testPolicy(),
    log: (level, msg, f) => logs.push(`${level}: ${msg}${f ? ` ${JSON.stringify(f, (_k, v: unknown) => (typeof v === 'bigint' ? v.toString() : v))}` : ''}`),
    ...(address ? { link: { address, backoff: { initialMs: 20, maxMs: 200 }, ...opts.link } } : {}),
    ...(opts.stateDir ? { stateDir: opts.stateDir } : {}),
  });
  await agent.start();
  let stopped = false;
  const stop = async (): Promise<void> => {
    if (stopped) return;
    stopped = true;
    await agent.stop(300);
  };
  cleanups.push(stop);
  return { agent, logs, stop };
}

export async function startVm(socketPath: string, opts: { vcpus?: number; seed?: number; name?: string } = {}): Promise<{ vm: SimVm; qemu: SimQemu }> {
  const vm = new SimVm({ vcpus: opts.vcpus ?? 1, seed: opts.seed ?? 1, apsOnline: true, jitterMs: 0, ...(opts.name ? { name: opts.name } : {}) });
  const qemu = new SimQemu(vm, { path: socketPath, key: Buffer.from('s'), reconnectSeconds: 0.05 });
  cleanups.push(() => {
    qemu.stop();
    vm.close();
  });
  qemu.start();
  return { vm, qemu };
}

export async function until(cond: () => boolean, ms = 5000, what = 'condition'): Promise<void> {
  const t0 = Date.now();
  while (!cond()) {
    if (Date.now() - t0 > ms) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

/** Wait until the agent has `vm` attached and protected. */
export async function protectedVm(h: AgentHandle, vm: SimVm): Promise<void> {
  await until(() => h.agent.listener.vms.get(vm.uuidText)?.state === 'protected', 10_000, `VM ${vm.uuidText} protected`);
}

export function uuidBytes(vm: SimVm): Buffer {
  return Buffer.from(vm.uuidText.replace(/-/g, ''), 'hex');
}

export function metric(h: AgentHandle, name: string): number {
  const text = h.agent.registry.render();
  let sum = 0;
  for (const line of text.split('\n')) {
    if (line.startsWith(`${name} `) || line.startsWith(`${name}{`)) sum += Number(line.slice(line.lastIndexOf(' ') + 1));
  }
  return sum;
}
