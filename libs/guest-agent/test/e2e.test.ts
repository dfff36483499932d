/**
 * The whole flow on the simulator, through real gRPC: analysis mounts `GuestMemoryHub`; the guest agent
 * dials it and serves work on the simulated /dev/kvmmem; map tokens come from real KVMI GET_MAP_TOKEN
 * commands on the VM's socket (as the host agent relays them). Hashes are checked against the RAM file
 * read independently; a DMA-style write into the RAM file (no vCPU, no event) is caught by re-hashing.
 */
import { createHash } from 'node:crypto';
import { closeSync, openSync, readSync, rmSync, writeSync } from 'node:fs';

import { Server, ServerCredentials } from '@grpc/grpc-js';
import { GuestMemoryServiceService, MemoryErrorCode } from '@periscope/contracts';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { connectSimKvmmem, GuestAgent, GuestMemoryHub, GuestMemoryWorkError, type GuestAgentLink } from '../src/index.js';
import { sockPath, startSimHost, until, type SimHost } from '@periscope/testing';

/** Read the RAM file directly (an oracle independent of the simulator's and the agent's code). */
function ramBytes(path: string, gpa: bigint, length: number): Buffer {
  const fd = openSync(path, 'r');
  try {
    const b = Buffer.alloc(length);
    readSync(fd, b, 0, length, Number(gpa));
    return b;
  } finally {
    closeSync(fd);
  }
}

/** A DMA write: straight into the file, no vCPU, no KVMI event. */
function dmaWrite(path: string, gpa: bigint, bytes: Buffer): void {
  const fd = openSync(path, 'r+');
  try {
    writeSync(fd, bytes, 0, bytes.length, Number(gpa));
  } finally {
    closeSync(fd);
  }
}

const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

interface Rig {
  host: SimHost;
  hub: GuestMemoryHub;
  server: Server;
  address: string;
  agent: GuestAgent;
  link: GuestAgentLink;
}

async function startRig(abi: 1 | 2, maxMappedPages = 1 << 16): Promise<Rig> {
  const host = await startSimHost({ vms: 1, memoryMiB: 64, abi });
  const hub = new GuestMemoryHub();
  const server = new Server();
  server.addService(GuestMemoryServiceService, hub.service);
  const path = sockPath('analysis');
  const address = `unix:${path}`;
  await new Promise<void>((resolve, reject) => server.bindAsync(address, ServerCredentials.createInsecure(), (e) => (e ? reject(e) : resolve())));
  const agent = new GuestAgent({ analysis: address, hostId: 'host-1', device: await connectSimKvmmem(host.kvmmemPath), maxMappedPages, reconnectBaseMs: 20, reconnectMaxMs: 100 });
  agent.start();
  const link = await hub.waitForAgent('host-1');
  return { host, hub, server, address, agent, link };
}

async function stopRig(r: Rig): Promise<void> {
  await r.agent.stop();
  await new Promise<void>((resolve) => r.server.tryShutdown(() => resolve()));
  rmSync(r.address.slice(5), { force: true });
  await r.host.close();
}

describe.each([2, 1] as const)('guest agent end to end on the simulator, ABI v%i', (abi) => {
  let rig: Rig;
  beforeAll(async () => {
    rig = await startRig(abi);
  });
  afterAll(async () => stopRig(rig));

  it('hello carries the host, the ABI and the quota', () => {
    expect(rig.link.hello).toMatchObject({ hostId: 'host-1', abi: abi === 1 ? 2 : 3, simulated: true, maxMappedPages: 65536n });
    expect(rig.link.abi).toBe(abi);
  });

  it('maps the kernel image with GET_MAP_TOKEN tokens, hashes it page by page, and the digests match the RAM file', async () => {
    const vm = rig.host.vm(0);
    const ref = rig.host.ref(0);
    const range = { gpa: vm.kernel.textPhys, length: 0x14000n }; // .text + .rodata
    let fetched = 0;
    const tokens = rig.host.tokens(0);
    const regions = await rig.link.map(ref, range, async (n) => {
      fetched += n;
      return tokens(n);
    });
    expect(fetched).toBe(abi === 1 ? 0x14 : 1); // v1: one per page; v2: one per 2 MiB region touched
    const covered = regions.reduce((a, g) => a + g.length, 0n);
    expect(covered).toBeGreaterThanOrEqual(range.length);
    const digests = await rig.link.hash(ref, range);
    expect(digests).toHaveLength(0x14);
    const expected = Array.from({ length: 0x14 }, (_, i) => sha(ramBytes(vm.memory.path, range.gpa + BigInt(i) * 0x1000n, 0x1000)));
    expect(digests.map((d) => d.digest.toString('hex'))).toEqual(expected);
    // read returns the same bytes
    const bytes = await rig.link.read(ref, { gpa: range.gpa, length: 0x2000n });
    expect(bytes.equals(ramBytes(vm.memory.path, range.gpa, 0x2000))).toBe(true);

    // A DMA write into the text (no vCPU, no event): the re-hash shows exactly that page changed.
    const target = vm.kernel.symbolPhys('__x64_sys_getpid');
    dmaWrite(vm.memory.path, target, Buffer.from('31c048ffc8c3', 'hex'));
    const again = await rig.link.hash(ref, range);
    const changed = again.flatMap((d, i) => (d.digest.equals(digests[i]!.digest) ? [] : [d.gpa]));
    expect(changed).toEqual([target & ~0xfffn]);
    // and the signature scan finds the planted bytes
    const found = await rig.link.scan(ref, range, Buffer.from('31c048ffc8c3', 'hex'));
    expect(found.matches).toEqual([target]);
    const masked = await rig.link.scan(ref, range, Buffer.from('31c04800c8c3', 'hex'), Buffer.from('ffffff00ffff', 'hex'));
    expect(masked.matches).toEqual([target]);
  });

  it('keeps tokens the agent did not use and asks for more when they run out (NEED_TOKENS)', async () => {
    const ref = rig.host.ref(0);
    const tokens = rig.host.tokens(0);
    const asked: number[] = [];
    rig.link.maxOutstandingTokens = 4;
    try {
      const base = 0x2000000n;
      const length = abi === 1 ? 10n * 4096n : 5n * 0x200000n;
      await rig.link.map(ref, { gpa: base, length }, async (n) => {
        asked.push(n);
        return tokens(n);
      });
      expect(asked.reduce((a, b) => a + b, 0)).toBeGreaterThanOrEqual(abi === 1 ? 10 : 5);
      expect(Math.max(...asked)).toBeLessThanOrEqual(4);
      expect(asked.length).toBeGreaterThan(1);
      // 64 KiB chunks: with v1 each chunk spans 16 separately mapped pages (hashed across them)
      rig.host.vm(0).memory.write(base + 0x5432n, Buffer.from('chunk-crossing-data'));
      const h = await rig.link.hash(ref, { gpa: base, length }, { chunkSize: 0x10000 });
      const path = rig.host.vm(0).memory.path;
      const expected = Array.from({ length: Number((length + 0xffffn) / 0x10000n) }, (_, i) => {
        const at = BigInt(i) * 0x10000n;
        return sha(ramBytes(path, base + at, Number(length - at < 0x10000n ? length - at : 0x10000n)));
      });
      expect(h.map((d) => d.digest.toString('hex'))).toEqual(expected);
      expect(h[h.length - 1]!.length).toBe(length % 0x10000n || 0x10000n);
    } finally {
      rig.link.maxOutstandingTokens = 64;
    }
  });

  it('errors are typed: hashing an unmapped range is NOT_MAPPED; a spent token TOKEN_REJECTED; a bad signature INVALID_ARGUMENT', async () => {
    const ref = rig.host.ref(0);
    await expect(rig.link.hash(ref, { gpa: 0x3000000n, length: 0x1000n })).rejects.toMatchObject({ code: MemoryErrorCode.MEMORY_ERROR_CODE_NOT_MAPPED });
    const [t] = await rig.host.tokens(0)(1);
    // explicit tokens (no pool): the first use maps, the second is refused by the host
    await rig.link.run(ref, { $case: 'map', value: { range: { gpa: 0x3800000n, length: 0x1000n }, mapTokens: [Buffer.from(t!)] } });
    const err = await rig.link.run(ref, { $case: 'map', value: { range: { gpa: 0x3a00000n, length: 0x1000n }, mapTokens: [Buffer.from(t!)] } }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(GuestMemoryWorkError);
    expect((err as GuestMemoryWorkError).code).toBe(MemoryErrorCode.MEMORY_ERROR_CODE_TOKEN_REJECTED);
    await expect(rig.link.scan(ref, { gpa: 0x3800000n, length: 0x1000n }, new Uint8Array(0))).rejects.toMatchObject({ code: MemoryErrorCode.MEMORY_ERROR_CODE_INVALID_ARGUMENT });
  });

  it('unmap and close release the pages on the device', async () => {
    const ref = rig.host.ref(0);
    expect(rig.host.kvmmem.stats().mappedPages).toBeGreaterThan(0);
    const unmapped = await rig.link.unmap(ref, { gpa: 0x3800000n, length: 1n });
    expect(unmapped).toHaveLength(1);
    await rig.link.closeVm(ref);
    await until(() => rig.host.kvmmem.stats().mappedPages === 0, 2000, 'the device to drop every mapping');
    expect(rig.agent.worker.quota.used).toBe(0);
  });
});

describe('guest agent lifetime rules', () => {
  it('enforces --max-mapped-pages (QUOTA_EXCEEDED) and returns the unused tokens', async () => {
    const rig = await startRig(1, 8);
    try {
      const ref = rig.host.ref(0);
      const err = await rig.link.map(ref, { gpa: 0x100000n, length: 12n * 4096n }, rig.host.tokens(0)).catch((e: unknown) => e);
      expect((err as GuestMemoryWorkError).code).toBe(MemoryErrorCode.MEMORY_ERROR_CODE_QUOTA_EXCEEDED);
      expect(rig.agent.worker.quota.used).toBe(8);
      // the 4 tokens it did not use are pooled and serve the next map (no new GET_MAP_TOKEN)
      await rig.link.unmap(ref);
      let asked = 0;
      await rig.link.map(ref, { gpa: 0x200000n, length: 4n * 4096n }, async (n) => {
        asked += n;
        return rig.host.tokens(0)(n);
      });
      expect(asked).toBe(0);
    } finally {
      await stopRig(rig);
    }
  });

  it('a vanished analysis client: its sessions are closed (device mappings dropped) and the agent redials', async () => {
    const rig = await startRig(2);
    try {
      const ref = rig.host.ref(0);
      await rig.link.map(ref, { gpa: 0x400000n, length: 0x400000n }, rig.host.tokens(0));
      expect(rig.host.kvmmem.stats().mappedPages).toBe(1024);
      const connects = rig.agent.stats().connects;
      rig.link.disconnect();
      await until(() => rig.host.kvmmem.stats().mappedPages === 0, 3000, 'the sessions of the vanished client to close');
      const next = await rig.hub.waitForAgent('host-1');
      await until(() => rig.agent.stats().connects > connects, 3000, 'the agent to redial');
      expect(next).not.toBe(rig.link);
      // works again on the new stream
      await next.map(ref, { gpa: 0x400000n, length: 0x1000n }, rig.host.tokens(0));
      expect((await next.hash(ref, { gpa: 0x400000n, length: 0x1000n }))).toHaveLength(1);
    } finally {
      await stopRig(rig);
    }
  });

  it('a new session generation (VM re-hooked) drops the old mappings', async () => {
    const rig = await startRig(2);
    try {
      const ref = rig.host.ref(0);
      await rig.link.map(ref, { gpa: 0x400000n, length: 0x1000n }, rig.host.tokens(0));
      const ref2 = { ...ref, generation: 2n };
      await expect(rig.link.hash(ref2, { gpa: 0x400000n, length: 0x1000n })).rejects.toMatchObject({ code: MemoryErrorCode.MEMORY_ERROR_CODE_NOT_MAPPED });
      expect(rig.host.kvmmem.stats().mappedPages).toBe(0);
    } finally {
      await stopRig(rig);
    }
  });
});
