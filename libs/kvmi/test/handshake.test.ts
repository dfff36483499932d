/**
 * QEMU ↔ introspector handshake over real Unix sockets.
 *
 * The raw bytes here are written at the offsets of the fact sheet's tables (kvmi-v7-libkvmi.md §3), not
 * taken from structs.ts, so the tests are an independent oracle:
 *   QEMU → tool: struct_size u32 @0, uuid u8[16] @4, padding u32 @20, start_time s64 @24, name char[64] @32,
 *                max_gpa u64 @96 (104-byte form)
 *   tool → QEMU: struct_size u32 @0, cookie_hash u8[20] @4 (24 bytes)
 */
import { createHash } from 'node:crypto';
import net from 'node:net';

import { describe, expect, it } from 'vitest';

import { KvmiWireError, attachFraming } from '../src/framing.js';
import {
  acceptQemuHandshake,
  performQemuHandshake,
  uuidFromText,
  uuidToText,
  type QemuHello,
} from '../src/handshake.js';
import { socketPair as unixPair } from './support/unix.js';

// ---- helpers ----------------------------------------------------------------------------------

async function socketPair(): ReturnType<typeof unixPair> {
  return unixPair('kh', { quiet: true });
}

const sha1 = (b: Uint8Array): Buffer => createHash('sha1').update(b).digest();
const tick = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));
const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));
const closedPromise = (s: net.Socket): Promise<void> =>
  s.destroyed ? Promise.resolve() : new Promise((resolve) => s.once('close', () => resolve()));

const UUID = Uint8Array.from([0x6b, 0x1d, 0x8e, 0x4a, 0x02, 0x9c, 0x4f, 0x11, 0x8a, 0x3e, 0xc0, 0xff, 0xee, 0x00, 0x12, 0x34]);
const UUID_TEXT = '6b1d8e4a-029c-4f11-8a3e-c0ffee001234';
const SECRET = Buffer.from('top secret key bytes');

/** QEMU's handshake struct, by hand. `name` bytes are copied raw (up to 64). */
function rawQemuHello(o: { size: number; uuid?: Uint8Array; startTime?: bigint; name?: Buffer; maxGpa?: bigint; fill?: number }): Buffer {
  const b = Buffer.alloc(o.size, o.fill ?? 0);
  b.writeUInt32LE(o.size, 0);
  if (o.size >= 20) Buffer.from(o.uuid ?? UUID).copy(b, 4);
  if (o.size >= 24) b.writeUInt32LE(0, 20);
  if (o.size >= 32) b.writeBigInt64LE(o.startTime ?? 0n, 24);
  if (o.size >= 96) {
    b.fill(0, 32, 96);
    (o.name ?? Buffer.alloc(0)).copy(b, 32, 0, 64);
  }
  if (o.maxGpa !== undefined && o.size >= 104) b.writeBigUInt64LE(o.maxGpa, 96);
  return b;
}

/** The tool's reply, by hand. */
function rawReply(hash: Uint8Array, size = 24): Buffer {
  const b = Buffer.alloc(size);
  b.writeUInt32LE(size, 0);
  Buffer.from(hash).copy(b, 4, 0, 20);
  return b;
}

/** A KVMI header by hand (id u16 @0, size u16 @2, seq u32 @4). */
function rawHeader(id: number, size: number, seq: number): Buffer {
  const b = Buffer.alloc(8);
  b.writeUInt16LE(id, 0);
  b.writeUInt16LE(size, 2);
  b.writeUInt32LE(seq, 4);
  return b;
}

/** Accumulates everything a raw peer receives. */
function collector(s: net.Socket) {
  const chunks: Buffer[] = [];
  let n = 0;
  s.on('data', (c: Buffer) => {
    chunks.push(c);
    n += c.length;
  });
  return {
    async take(count: number, ms = 5000): Promise<Buffer> {
      const deadline = Date.now() + ms;
      while (n < count) {
        if (Date.now() > deadline) throw new Error(`timed out waiting for ${count} bytes (have ${n})`);
        await sleep(2);
      }
      return Buffer.concat(chunks);
    },
    get length() {
      return n;
    },
  };
}

async function expectWireError(p: Promise<unknown>, code: string): Promise<KvmiWireError> {
  const err = await p.then(
    () => {
      throw new Error(`expected a ${code} error, got success`);
    },
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(KvmiWireError);
  expect((err as KvmiWireError).code).toBe(code);
  return err as KvmiWireError;
}

// ---- uuid helpers -----------------------------------------------------------------------------

describe('uuid helpers', () => {
  it('print bytes in order, lowercase 8-4-4-4-12, and parse back (either case)', () => {
    expect(uuidToText(UUID)).toBe(UUID_TEXT);
    expect(uuidToText(Uint8Array.from({ length: 16 }, (_, i) => i))).toBe('00010203-0405-0607-0809-0a0b0c0d0e0f');
    expect([...uuidFromText(UUID_TEXT.toUpperCase())]).toEqual([...UUID]);
    // A view into a larger buffer.
    const big = Buffer.concat([Buffer.from([9, 9, 9]), Buffer.from(UUID)]);
    expect(uuidToText(big.subarray(3))).toBe(UUID_TEXT);
  });

  it('reject malformed input', () => {
    expect(() => uuidToText(new Uint8Array(15))).toThrow(expect.objectContaining({ code: 'invalid-argument' }));
    for (const bad of ['', UUID_TEXT.replace(/-/g, ''), `${UUID_TEXT}0`, UUID_TEXT.replace('6', 'g'), ` ${UUID_TEXT}`]) {
      expect(() => uuidFromText(bad)).toThrow(expect.objectContaining({ code: 'invalid-argument' }));
    }
  });
});

// ---- both sides against each other ------------------------------------------------------------

describe('tool side against QEMU side', () => {
  for (const form of [96, 104] as const) {
    it(`${form}-byte form, matching key`, async () => {
      const { client, server } = await socketPair();
      const seen: { uuid: string; name: string }[] = [];
      const tool = acceptQemuHandshake(server, {
        cookieFor: (uuid, name) => {
          seen.push({ uuid: uuidToText(uuid), name });
          return SECRET;
        },
      });
      const qemu = performQemuHandshake(client, {
        form,
        uuid: UUID,
        name: 'win10-guest',
        startTimeMs: 1_700_000_123_456n,
        maxGpa: 0x2_3fff_ffffn,
        key: SECRET,
      });
      const [hello, q] = await Promise.all([tool, qemu]);
      expect(seen).toEqual([{ uuid: UUID_TEXT, name: 'win10-guest' }]);
      expect(hello).toEqual({
        uuid: UUID,
        uuidText: UUID_TEXT,
        name: 'win10-guest',
        startTimeMs: 1_700_000_123_456n,
        maxGpa: form === 104 ? 0x2_3fff_ffffn : undefined,
        structSize: form,
        leftover: Buffer.alloc(0),
      } satisfies QemuHello);
      expect(q).toEqual({ authenticated: true, leftover: Buffer.alloc(0) });
      expect(server.isPaused()).toBe(true);
      expect(client.isPaused()).toBe(true);
    });
  }

  it('start_time is signed; no key → accepted unauthenticated', async () => {
    const { client, server } = await socketPair();
    const [hello, q] = await Promise.all([
      acceptQemuHandshake(server, { cookieFor: () => Buffer.from('whatever') }),
      performQemuHandshake(client, { form: 104, uuid: UUID, name: 'x', startTimeMs: -5n, maxGpa: 0n }),
    ]);
    expect(hello.startTimeMs).toBe(-5n);
    expect(hello.maxGpa).toBe(0n);
    expect(q.authenticated).toBe(false);
  });

  it('wrong cookie: the QEMU side refuses and closes', async () => {
    const { client, server } = await socketPair();
    const tool = acceptQemuHandshake(server, { cookieFor: () => Buffer.from('the wrong secret') });
    const qemu = performQemuHandshake(client, { form: 96, uuid: UUID, name: 'vm', startTimeMs: 1n, maxGpa: 0n, key: SECRET });
    await tool; // the tool cannot know
    const err = await expectWireError(qemu, 'handshake-refused');
    expect(err.hard).toBe(true);
    await closedPromise(server);
  });

  it('GET_VERSION written in the same write as the reply reaches the QEMU side as leftover', async () => {
    const { client, server } = await socketPair();
    const writes: number[] = [];
    const realWrite = server.write.bind(server) as (c: Buffer, cb?: (e?: Error | null) => void) => boolean;
    (server as unknown as { write: typeof realWrite }).write = (c, cb) => {
      writes.push(c.length);
      return realWrite(c, cb);
    };
    const getVersion = rawHeader(2, 0, 0x01020304);
    const [, q] = await Promise.all([
      acceptQemuHandshake(server, { cookieFor: () => SECRET, afterReply: getVersion }),
      performQemuHandshake(client, { form: 104, uuid: UUID, name: 'vm', startTimeMs: 1n, maxGpa: 1n << 32n, key: SECRET }),
    ]);
    expect(writes).toEqual([24 + 8]);
    expect(q.authenticated).toBe(true);
    expect(q.leftover).toHaveLength(8);
    expect(q.leftover.readUInt16LE(0)).toBe(2);
    expect(q.leftover.readUInt16LE(2)).toBe(0);
    expect(q.leftover.readUInt32LE(4)).toBe(0x01020304);
  });
});

// ---- tool side against raw QEMU bytes ---------------------------------------------------------

describe('tool side (acceptQemuHandshake) against raw bytes', () => {
  for (const size of [96, 104]) {
    it(`reads a ${size}-byte struct and replies SHA-1(secret) in 24 bytes`, async () => {
      const { client, server } = await socketPair();
      const raw = collector(client);
      const tool = acceptQemuHandshake(server, { cookieFor: () => SECRET });
      client.write(rawQemuHello({ size, startTime: 0x0123_4567_89abn, name: Buffer.from('guest-α\0junk'), maxGpa: 0xfeedf00dn }));
      const hello = await tool;
      expect(hello.uuidText).toBe(UUID_TEXT);
      expect([...hello.uuid]).toEqual([...UUID]);
      expect(hello.name).toBe('guest-α');
      expect(hello.startTimeMs).toBe(0x0123_4567_89abn);
      expect(hello.maxGpa).toBe(size === 104 ? 0xfeedf00dn : undefined);
      expect(hello.structSize).toBe(size);
      const reply = await raw.take(24);
      expect(reply).toHaveLength(24);
      expect(reply.readUInt32LE(0)).toBe(24);
      expect(reply.subarray(4, 24)).toEqual(sha1(SECRET));
    });
  }

  it('accepts the struct delivered one byte at a time', async () => {
    const { client, server } = await socketPair();
    const raw = collector(client);
    const tool = acceptQemuHandshake(server, { cookieFor: async () => SECRET });
    const bytes = rawQemuHello({ size: 104, name: Buffer.from('slow'), maxGpa: 77n });
    for (let i = 0; i < bytes.length; i++) {
      client.write(bytes.subarray(i, i + 1));
      await tick();
    }
    const hello = await tool;
    expect(hello.name).toBe('slow');
    expect(hello.maxGpa).toBe(77n);
    expect((await raw.take(24)).subarray(4, 24)).toEqual(sha1(SECRET));
  });

  it('forces name[63] to NUL: 64 non-NUL bytes give 63 characters', async () => {
    const { client, server } = await socketPair();
    const tool = acceptQemuHandshake(server, { cookieFor: () => SECRET });
    client.write(rawQemuHello({ size: 96, name: Buffer.from('N'.repeat(64)) }));
    const hello = await tool;
    expect(hello.name).toBe('N'.repeat(63));
  });

  it('rejects struct_size < 32 (ENODATA) and closes the connection', async () => {
    const { client, server } = await socketPair();
    const tool = acceptQemuHandshake(server, { cookieFor: () => SECRET });
    client.write(rawQemuHello({ size: 31 }));
    const err = await expectWireError(tool, 'handshake-too-small');
    expect(err.hard).toBe(true);
    await closedPromise(client);
  });

  it('accepts struct_size 32 (start_time present, name all zero)', async () => {
    const { client, server } = await socketPair();
    const tool = acceptQemuHandshake(server, { cookieFor: () => SECRET });
    client.write(rawQemuHello({ size: 32, startTime: 42n }));
    const hello = await tool;
    expect(hello).toMatchObject({ structSize: 32, startTimeMs: 42n, name: '', maxGpa: undefined, uuidText: UUID_TEXT });
  });

  it('rejects struct_size > 65536 (E2BIG) without waiting for the body', async () => {
    const { client, server } = await socketPair();
    const tool = acceptQemuHandshake(server, { cookieFor: () => SECRET });
    const b = Buffer.alloc(4);
    b.writeUInt32LE(65537, 0);
    client.write(b);
    await expectWireError(tool, 'handshake-too-large');
    await closedPromise(client);
  });

  it('accepts struct_size 65536, discarding everything past max_gpa', async () => {
    const { client, server } = await socketPair();
    const raw = collector(client);
    const tool = acceptQemuHandshake(server, { cookieFor: () => SECRET });
    client.write(rawQemuHello({ size: 65536, name: Buffer.from('huge'), maxGpa: 5n, fill: 0xee }));
    const hello = await tool;
    expect(hello).toMatchObject({ structSize: 65536, name: 'huge', maxGpa: 5n, leftover: Buffer.alloc(0) });
    expect((await raw.take(24)).readUInt32LE(0)).toBe(24);
  });

  it('struct_size 200: discards the trailing bytes; what follows is leftover', async () => {
    const { client, server } = await socketPair();
    const tool = acceptQemuHandshake(server, { cookieFor: () => SECRET });
    const next = Buffer.concat([rawHeader(1, 4, 9), Buffer.from([1, 2, 3, 4])]);
    client.write(Buffer.concat([rawQemuHello({ size: 200, name: Buffer.from('vm200'), maxGpa: 0x1234n, fill: 0x5a }), next]));
    const hello = await tool;
    expect(hello.structSize).toBe(200);
    expect(hello.name).toBe('vm200');
    expect(hello.maxGpa).toBe(0x1234n);
    expect(hello.leftover).toEqual(next);
  });

  it('a struct between 96 and 104 bytes has no max_gpa', async () => {
    const { client, server } = await socketPair();
    const tool = acceptQemuHandshake(server, { cookieFor: () => SECRET });
    client.write(rawQemuHello({ size: 100, fill: 0x11 }));
    expect((await tool).maxGpa).toBeUndefined();
  });

  it('rejects the VM when cookieFor returns undefined or throws, and closes', async () => {
    for (const cookieFor of [() => undefined, () => Promise.reject(new Error('vault down')), (): Buffer => { throw new Error('sync'); }]) {
      const { client, server } = await socketPair();
      const raw = collector(client);
      const tool = acceptQemuHandshake(server, { cookieFor });
      const qemuClosed = closedPromise(client);
      client.write(rawQemuHello({ size: 96 }));
      const err = await expectWireError(tool, 'handshake-rejected');
      expect(err.hard).toBe(true);
      await qemuClosed;
      expect(raw.length).toBe(0); // no reply was sent
    }
  });

  it('times out when QEMU stays silent (or stops half-way)', async () => {
    for (const prefix of [Buffer.alloc(0), rawQemuHello({ size: 96 }).subarray(0, 40)]) {
      const { client, server } = await socketPair();
      const t0 = Date.now();
      const tool = acceptQemuHandshake(server, { cookieFor: () => SECRET, timeoutMs: 80 });
      if (prefix.length) client.write(prefix);
      await expectWireError(tool, 'handshake-timeout');
      expect(Date.now() - t0).toBeGreaterThanOrEqual(70);
      await closedPromise(client);
    }
  });

  it('reports a QEMU that disconnects early as closed', async () => {
    const { client, server } = await socketPair();
    const tool = acceptQemuHandshake(server, { cookieFor: () => SECRET });
    client.end(rawQemuHello({ size: 96 }).subarray(0, 10));
    const err = await expectWireError(tool, 'closed');
    expect(err.hard).toBe(true);
  });
});

// ---- QEMU side against a raw tool -------------------------------------------------------------

describe('QEMU side (performQemuHandshake) against raw bytes', () => {
  for (const form of [96, 104] as const) {
    it(`writes the ${form}-byte struct at the sheet offsets in one write`, async () => {
      const { client, server } = await socketPair();
      const raw = collector(server);
      const name = 'é'.repeat(40); // 80 UTF-8 bytes: truncated to 31 characters (62 bytes) + NUL
      const qemu = performQemuHandshake(client, {
        form,
        uuid: UUID,
        name,
        startTimeMs: -1_234_567n,
        maxGpa: 0xffff_ffff_ffffn,
        key: SECRET,
      });
      const b = await raw.take(form);
      expect(b).toHaveLength(form);
      expect(b.readUInt32LE(0)).toBe(form);
      expect([...b.subarray(4, 20)]).toEqual([...UUID]);
      expect(b.readUInt32LE(20)).toBe(0);
      expect(b.readBigInt64LE(24)).toBe(-1_234_567n);
      const nameBytes = b.subarray(32, 96);
      const nul = nameBytes.indexOf(0);
      expect(nul).toBe(62);
      expect(nameBytes.subarray(0, nul).toString('utf8')).toBe('é'.repeat(31));
      expect(nameBytes.subarray(nul).every((x) => x === 0)).toBe(true);
      if (form === 104) expect(b.readBigUInt64LE(96)).toBe(0xffff_ffff_ffffn);
      server.write(rawReply(sha1(SECRET)));
      expect(await qemu).toEqual({ authenticated: true, leftover: Buffer.alloc(0) });
    });
  }

  it('truncates a 64-character ASCII name to 63 bytes + NUL', async () => {
    const { client, server } = await socketPair();
    const raw = collector(server);
    const qemu = performQemuHandshake(client, { form: 96, uuid: UUID, name: 'M'.repeat(64), startTimeMs: 0n, maxGpa: 0n });
    const b = await raw.take(96);
    expect(b.subarray(32, 95).toString('latin1')).toBe('M'.repeat(63));
    expect(b[95]).toBe(0);
    server.write(rawReply(Buffer.alloc(20)));
    expect((await qemu).authenticated).toBe(false);
  });

  it('without a key, any cookie_hash (even zeros) is accepted, unauthenticated', async () => {
    const { client, server } = await socketPair();
    const raw = collector(server);
    const qemu = performQemuHandshake(client, { form: 104, uuid: UUID, name: 'vm', startTimeMs: 0n, maxGpa: 0n });
    await raw.take(104);
    server.write(rawReply(Buffer.alloc(20)));
    expect(await qemu).toEqual({ authenticated: false, leftover: Buffer.alloc(0) });
  });

  it('refuses a wrong cookie_hash and closes', async () => {
    const { client, server } = await socketPair();
    const raw = collector(server);
    const qemu = performQemuHandshake(client, { form: 104, uuid: UUID, name: 'vm', startTimeMs: 0n, maxGpa: 0n, key: SECRET });
    await raw.take(104);
    const wrong = sha1(SECRET);
    wrong[19]! ^= 1;
    server.write(rawReply(wrong));
    await expectWireError(qemu, 'handshake-refused');
    await closedPromise(server);
  });

  it('requires reply struct_size ≥ 24', async () => {
    const { client, server } = await socketPair();
    const raw = collector(server);
    const qemu = performQemuHandshake(client, { form: 96, uuid: UUID, name: 'vm', startTimeMs: 0n, maxGpa: 0n });
    await raw.take(96);
    const r = rawReply(sha1(SECRET));
    r.writeUInt32LE(23, 0);
    server.write(r);
    await expectWireError(qemu, 'handshake-too-small');
  });

  it('consumes exactly struct_size bytes of a longer reply; the rest is leftover', async () => {
    const { client, server } = await socketPair();
    const raw = collector(server);
    const qemu = performQemuHandshake(client, { form: 96, uuid: UUID, name: 'vm', startTimeMs: 0n, maxGpa: 0n, key: SECRET });
    await raw.take(96);
    const reply = rawReply(sha1(SECRET), 40);
    reply.fill(0x77, 24); // tail of a longer struct: consumed and ignored
    server.write(Buffer.concat([reply, rawHeader(2, 0, 7)]));
    const q = await qemu;
    expect(q.authenticated).toBe(true);
    expect(q.leftover).toEqual(rawHeader(2, 0, 7));
  });

  it('leaves later bytes in the socket: leftover + later data form the kernel-side stream', async () => {
    const { client, server } = await socketPair();
    const raw = collector(server);
    const qemu = performQemuHandshake(client, { form: 104, uuid: UUID, name: 'vm', startTimeMs: 0n, maxGpa: 0n, key: SECRET });
    await raw.take(104);
    const frames = [
      rawHeader(2, 0, 1),
      Buffer.concat([rawHeader(4, 8, 2), Buffer.from([1, 0, 0, 0, 0, 0, 0, 0])]),
      Buffer.concat([rawHeader(6, 8, 3), Buffer.from([5, 0, 0, 0, 0, 0, 0, 0])]),
    ];
    const stream = Buffer.concat(frames);
    const cut = 8 + 5; // one whole message and part of the next arrive with the reply
    server.write(Buffer.concat([rawReply(sha1(SECRET)), stream.subarray(0, cut)]));
    const q = await qemu;
    expect(q.leftover).toEqual(stream.subarray(0, cut));
    expect(client.isPaused()).toBe(true);
    server.write(stream.subarray(cut));
    await sleep(20); // arrives while nobody reads: must wait in the socket, not be lost
    const got: Buffer[] = [];
    attachFraming(client, { onFrame: (f) => got.push(Buffer.from(f)), leftover: q.leftover });
    const deadline = Date.now() + 5000;
    while (got.length < frames.length && Date.now() < deadline) await sleep(2);
    expect(got).toEqual(frames);
  });

  it('times out when the tool never replies', async () => {
    const { client, server } = await socketPair();
    collector(server);
    const qemu = performQemuHandshake(client, { form: 96, uuid: UUID, name: 'vm', startTimeMs: 0n, maxGpa: 0n, timeoutMs: 80 });
    await expectWireError(qemu, 'handshake-timeout');
    await closedPromise(server);
  });

  it('reports a tool that closes before replying as closed', async () => {
    const { client, server } = await socketPair();
    const raw = collector(server);
    const qemu = performQemuHandshake(client, { form: 96, uuid: UUID, name: 'vm', startTimeMs: 0n, maxGpa: 0n });
    await raw.take(96);
    server.end(Buffer.from([24, 0]));
    await expectWireError(qemu, 'closed');
  });

  it('rejects bad arguments before touching the socket', async () => {
    const { client } = await socketPair();
    await expectWireError(
      performQemuHandshake(client, { form: 96, uuid: new Uint8Array(15), name: 'vm', startTimeMs: 0n, maxGpa: 0n }),
      'invalid-argument',
    );
    await expectWireError(
      performQemuHandshake(client, { form: 104, uuid: UUID, name: 'vm', startTimeMs: 0n, maxGpa: -1n }),
      'invalid-argument',
    );
    expect(client.destroyed).toBe(false);
  });
});
