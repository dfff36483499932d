/**
 * A simulated host for guest-agent tests (the library's and the app's): the simulator's VMs (KVM + QEMU + guest RAM files) connected to
 * a KVMI tool socket held here with `@periscope/kvmi`'s session (as the host agent holds them; map tokens
 * come from real GET_MAP_TOKEN commands), plus the simulated `/dev/kvmmem` on its own Unix socket.
 */
import { randomBytes } from 'node:crypto';
import { rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { acceptQemuHandshake, KvmiSession, structs, type QemuHello } from '@periscope/kvmi';
import { KvmmemServer, Simulator, type SimVm } from '@periscope/simulator';

/** A VM session as the guest agent's hub names it (structurally @periscope/guest-agent's `VmRef`). */
export interface VmRef {
  readonly uuid: Uint8Array;
  readonly generation: bigint;
}
/** Map tokens on demand (structurally @periscope/guest-agent's `TokenSource`). */
export type TokenSource = (count: number) => Promise<Uint8Array[]>;

export function sockPath(tag: string): string {
  return join(tmpdir(), `ga-${tag}-${process.pid}-${randomBytes(3).toString('hex')}.sock`);
}

export const until = async (cond: () => boolean, timeoutMs = 10_000, what = 'a condition'): Promise<void> => {
  const end = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
};

export interface SimHostOptions {
  vms?: number;
  memoryMiB?: number;
  abi?: 1 | 2;
  pureV12?: boolean;
  regionBytes?: number;
}

export interface ToolSide {
  session: KvmiSession;
  hello: QemuHello;
  /** This tool session's generation for the VM: 1 for the first hook, +1 for every re-hook (as the host agent counts). */
  generation: bigint;
}

export interface SimHost {
  sim: Simulator;
  kvmmem: KvmmemServer;
  kvmmemPath: string;
  /** KVMI sessions by VM uuid text. */
  tools: Map<string, ToolSide>;
  vm(i: number): SimVm;
  ref(i: number): VmRef;
  /** Map tokens for VM i through KVMI GET_MAP_TOKEN (one command per token). */
  tokens(i: number): TokenSource;
  close(): Promise<void>;
}

const SECRET = Buffer.from('guest-agent-test');

export async function startSimHost(opts: SimHostOptions = {}): Promise<SimHost> {
  const introspector = sockPath('kvmi');
  const kvmmemPath = sockPath('kvmmem');
  const tools = new Map<string, ToolSide>();
  const server = net.createServer((socket) => {
    socket.on('error', () => undefined);
    void acceptQemuHandshake(socket, { cookieFor: () => SECRET }).then(
      (hello) => tools.set(hello.uuidText, { hello, session: new KvmiSession(socket, { leftover: hello.leftover }), generation: (tools.get(hello.uuidText)?.generation ?? 0n) + 1n }),
      () => socket.destroy(),
    );
  });
  await new Promise<void>((resolve) => server.listen(introspector, resolve));
  const sim = new Simulator({
    introspector,
    vms: opts.vms ?? 1,
    memoryMiB: opts.memoryMiB ?? 64,
    key: SECRET,
    jitterMs: 0,
    reconnectSeconds: 0.05,
    pureV12: opts.pureV12 ?? false,
    unhookTimeoutMs: 1000,
  });
  sim.start();
  const kvmmem = new KvmmemServer({ path: kvmmemPath, vms: () => sim.vms, abi: opts.abi ?? 2, ...(opts.regionBytes ? { regionBytes: opts.regionBytes } : {}) });
  await kvmmem.listen();
  await until(() => sim.vms.every((v) => v.connected && tools.has(v.uuidText)), 10_000, 'every VM hooked');
  const vm = (i: number): SimVm => sim.vms[i]!;
  return {
    sim,
    kvmmem,
    kvmmemPath,
    tools,
    vm,
    ref: (i) => ({ uuid: vm(i).uuid, generation: tools.get(vm(i).uuidText)?.generation ?? 0n }),
    tokens: (i) => async (count) => {
      const s = tools.get(vm(i).uuidText)!.session;
      const replies = await Promise.all(Array.from({ length: count }, () => s.request('GET_MAP_TOKEN', {})));
      return replies.map((r) => structs.kvmi_mem_token.encode(r.token));
    },
    close: async () => {
      await kvmmem.close();
      for (const t of tools.values()) t.session.close();
      for (const q of sim.qemus) q.stop();
      await sim.shutdown().catch(() => undefined);
      await new Promise<void>((resolve) => server.close(() => resolve()));
      rmSync(introspector, { force: true });
    },
  };
}
