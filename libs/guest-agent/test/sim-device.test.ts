/**
 * The simulated /dev/kvmmem (`KvmmemServer` in the simulator) through the agent's device layer and the
 * same addon: tokens from real KVMI GET_MAP_TOKEN commands, one use each; the pages are the VM's RAM file
 * (MAP_SHARED: what the guest writes is seen without re-mapping); errno semantics of both ABIs; closing a
 * file unmaps everything and detaches every buffer.
 */
import net from 'node:net';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { connectSimKvmmem, GuestAgentError, KvmmemError, PageQuota, VmMemorySession, type KvmmemDevice } from '../src/index.js';
import { startSimHost, type SimHost } from '@periscope/testing';

const errnoOf = async (p: Promise<unknown>): Promise<string> => {
  try {
    await p;
    return 'ok';
  } catch (e) {
    if (e instanceof KvmmemError) return e.code;
    throw e;
  }
};

describe.each([1, 2] as const)('simulated kvmmem, ABI v%i', (abi) => {
  let host: SimHost;
  let device: KvmmemDevice;
  beforeAll(async () => {
    host = await startSimHost({ vms: 2, memoryMiB: 32, abi });
    device = await connectSimKvmmem(host.kvmmemPath);
  });
  afterAll(async () => host.close());

  it('detects the ABI with the probe', () => {
    expect(device.abi).toBe(abi);
    expect(device.simulated).toBe(true);
  });

  it('maps the RAM file page (zero-copy, shared with the guest), one use per token', async () => {
    const vm = host.vm(0);
    const gpa = 0x345000n;
    vm.memory.write(gpa + 0x10n, Buffer.from('periscope-was-here'));
    const f = await device.openFile();
    await f.open(vm.uuid);
    const [token] = await host.tokens(0)(1);
    const m = await f.map(token!, gpa + 0x123n);
    expect(m.start).toBe(abi === 1 ? gpa : 0x200000n);
    expect(m.length).toBe(abi === 1 ? 4096 : 0x200000);
    const view = Buffer.from(m.buffer, Number(gpa - m.start), 4096);
    expect(view.subarray(0x10, 0x22).toString()).toBe('periscope-was-here');
    // The guest (or a DMA) writes: the mapping sees it at once.
    vm.memory.write(gpa + 0x10n, Buffer.from('PERISCOPE'));
    expect(view.subarray(0x10, 0x19).toString()).toBe('PERISCOPE');
    // The token is spent.
    expect(await errnoOf(f.map(token!, 0x800000n))).toBe('EPERM');
    await f.unmap(m);
    expect(m.buffer.byteLength).toBe(0);
    expect(view.length).toBe(0);
    await f.close();
  });

  it('a token of another VM is rejected (EPERM); an unbacked gpa is EFAULT', async () => {
    const f = await device.openFile();
    await f.open(host.vm(0).uuid);
    const [other] = await host.tokens(1)(1);
    if (abi === 2) expect(await errnoOf(f.map(other!, 0x1000n))).toBe('EPERM');
    const [t] = await host.tokens(0)(1);
    expect(await errnoOf(f.map(t!, 0xa0000n))).toBe('EFAULT'); // the VGA hole
    const [t2] = await host.tokens(0)(1);
    expect(await errnoOf(f.map(t2!, 1n << 40n))).toBe('EFAULT'); // past the end of RAM
    await f.close();
  });

  it('unmapping an unknown address is ENOENT', async () => {
    const f = await device.openFile();
    await f.open(host.vm(0).uuid);
    expect(await errnoOf(f.unmap(0x40000000n))).toBe('ENOENT');
    await f.close();
  });

  it('closing the file unmaps everything on the device and detaches every buffer', async () => {
    const f = await device.openFile();
    await f.open(host.vm(0).uuid);
    const tokens = await host.tokens(0)(3);
    const maps = [];
    for (const [i, t] of tokens.entries()) maps.push(await f.map(t, 0x1000000n + BigInt(i) * (abi === 1 ? 0x1000n : 0x200000n)));
    const before = host.kvmmem.stats().mappedPages;
    expect(before).toBe(abi === 1 ? 3 : 3 * 512);
    const views = maps.map((m) => new Uint8Array(m.buffer));
    await f.close();
    expect(maps.every((m) => m.buffer.byteLength === 0)).toBe(true);
    expect(views.every((v) => v.length === 0 && v[0] === undefined)).toBe(true);
    await new Promise((r) => setTimeout(r, 50));
    expect(host.kvmmem.stats().mappedPages).toBe(0);
  });

  it('a session closed while it hashes waits for the hashing threads, then unmaps (no access after unmap)', async () => {
    const quota = new PageQuota(1 << 20);
    const s = await VmMemorySession.open(device, host.vm(0).uuid, 1n, quota);
    const range = { gpa: 0x1000000n, length: 0x800000n };
    const pages = Number(range.length / 4096n);
    // fetch tokens as the map asks for them (few outstanding at a time, as the host requires)
    for (;;) {
      const r = await s.map(range, await host.tokens(0)(32)).catch((e: unknown) => e);
      if (!(r instanceof GuestAgentError)) break;
      expect(r.code).toBe('need-tokens');
    }
    expect(quota.used).toBe(pages);
    const views = s.mappings().map((m) => new Uint8Array(m.buffer));
    const hashing = s.hashPacked(range, 4096, undefined, { batch: 64 });
    const closing = s.close();
    const outcome = await hashing.then(() => 'done', (e: unknown) => (e instanceof GuestAgentError ? e.code : String(e)));
    await closing;
    expect(['done', 'closed']).toContain(outcome);
    expect(views.every((v) => v.length === 0)).toBe(true);
    expect(quota.used).toBe(0);
  });

  it('a request from another process than the opener (a forked child) is EINVAL; an unknown request ENOTTY', async () => {
    const sock = net.createConnection(host.kvmmemPath);
    await new Promise((r) => sock.once('connect', r));
    const answers: { id: number; errno: number }[] = [];
    let buf = Buffer.alloc(0);
    sock.on('data', (c: Buffer) => {
      buf = Buffer.concat([buf, c]);
      while (buf.length >= 4 && buf.length >= 4 + buf.readUInt32LE(0)) {
        answers.push(JSON.parse(buf.subarray(4, 4 + buf.readUInt32LE(0)).toString()) as { id: number; errno: number });
        buf = buf.subarray(4 + buf.readUInt32LE(0));
      }
    });
    const send = (m: object): void => {
      const body = Buffer.from(JSON.stringify(m));
      const h = Buffer.alloc(4);
      h.writeUInt32LE(body.length);
      sock.write(Buffer.concat([h, body]));
    };
    const unmap = abi === 1 ? 0x40086902 : 0x40086903;
    send({ id: 1, pid: 1000, req: unmap, arg: '0x1000' }); // the opener
    send({ id: 2, pid: 1001, req: unmap, arg: '0x1000' }); // its child
    send({ id: 3, pid: 1000, req: 0x40086999 });
    while (answers.length < 3) await new Promise((r) => setTimeout(r, 5));
    sock.destroy();
    expect(answers).toEqual([{ id: 1, errno: 2 }, { id: 2, errno: 22 }, { id: 3, errno: 25 }]);
  });

  if (abi === 2) {
    it('v2: OPEN twice is EALREADY, MAP before OPEN is EINVAL, overlapping maps EALREADY, UNMAP inside a region EINVAL', async () => {
      const f = await device.openFile();
      const [t0] = await host.tokens(0)(1);
      expect(await errnoOf(f.map(t0!, 0x1000n))).toBe('EINVAL');
      await f.open(host.vm(0).uuid);
      expect(await errnoOf(f.open(host.vm(0).uuid))).toBe('EALREADY');
      const [t1, t2] = await host.tokens(0)(2);
      const m = await f.map(t1!, 0x600000n);
      expect(await errnoOf(f.map(t2!, 0x6ff000n))).toBe('EALREADY');
      expect(await errnoOf(f.unmap(0x601000n))).toBe('EINVAL');
      await f.unmap(m);
      // t2 was not consumed by the EALREADY (no hypercall was made)
      const again = await f.map(t2!, 0x6ff000n);
      expect(again.start).toBe(0x600000n);
      await f.close();
    });

    it('v2: an unknown VM uuid is ENOENT at OPEN', async () => {
      const f = await device.openFile();
      expect(await errnoOf(f.open(new Uint8Array(16).fill(7)))).toBe('ENOENT');
      await f.close();
    });
  } else {
    it('v1: the token names the VM (no OPEN); each page needs its own token', async () => {
      const f = await device.openFile();
      const [a, b] = await host.tokens(1)(2);
      host.vm(1).memory.write(0x2000n, Buffer.from('vm-one'));
      const m = await f.map(a!, 0x2000n);
      expect(Buffer.from(m.buffer, 0, 6).toString()).toBe('vm-one');
      const m2 = await f.map(b!, 0x2000n); // another local page for the same gpa: allowed
      expect(m2.key).not.toBe(m.key);
      await f.close();
    });
  }
});
