/**
 * Framing over real Unix sockets. Frames are built and parsed here by hand, at the offsets of the fact
 * sheet's `kvmi_msg_hdr` table (kvmi-v12.md §2.1: id u16 @0, size u16 @2, seq u32 @4), independently of
 * structs.ts.
 */
import net from 'node:net';

import { describe, expect, it } from 'vitest';

import {
  FrameReader,
  FrameWriter,
  KvmiWireError,
  MAX_FRAME_SIZE,
  MSG_HDR_SIZE,
  attachFraming,
  frameId,
  framePayload,
  frameSeq,
  frameSize,
  readHeader,
  writeHeader,
} from '../src/framing.js';
import { socketPair as unixPair } from './support/unix.js';

// ---- helpers ----------------------------------------------------------------------------------

async function socketPair(): ReturnType<typeof unixPair> {
  return unixPair('kf');
}

/** Seeded PRNG (mulberry32). */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
const randInt = (r: () => number, lo: number, hi: number): number => lo + Math.floor(r() * (hi - lo + 1));

/** A message built by hand at the sheet's offsets. */
function makeFrame(id: number, seq: number, payload: Buffer): Buffer {
  const b = Buffer.alloc(8 + payload.length);
  b.writeUInt16LE(id, 0);
  b.writeUInt16LE(payload.length, 2);
  b.writeUInt32LE(seq, 4);
  payload.copy(b, 8);
  return b;
}
function pattern(n: number, salt: number): Buffer {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = (i * 31 + salt * 7 + (i >> 8)) & 0xff;
  return b;
}

/** Independent parser: splits a byte stream into frames, asserting it ends on a boundary. */
function parseStream(stream: Buffer): { id: number; size: number; seq: number; payload: Buffer }[] {
  const out = [];
  let off = 0;
  while (off < stream.length) {
    expect(stream.length - off).toBeGreaterThanOrEqual(8);
    const id = stream.readUInt16LE(off);
    const size = stream.readUInt16LE(off + 2);
    const seq = stream.readUInt32LE(off + 4);
    expect(size).toBeLessThanOrEqual(8184);
    expect(stream.length - off - 8).toBeGreaterThanOrEqual(size);
    out.push({ id, size, seq, payload: stream.subarray(off + 8, off + 8 + size) });
    off += 8 + size;
  }
  return out;
}

const tick = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));
const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

async function until(cond: () => boolean, what: string, ms = 5000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(2);
  }
}

/** Collects framed messages (copied) from the server side of a pair via attachFraming. */
function receive(server: net.Socket, leftover?: Buffer) {
  const frames: Buffer[] = [];
  const errors: KvmiWireError[] = [];
  let closed = false;
  let chunks = 0;
  server.on('data', () => chunks++);
  const { reader, writer } = attachFraming(server, {
    onFrame: (f) => frames.push(Buffer.from(f)),
    onError: (e) => errors.push(e),
    onClose: () => {
      closed = true;
    },
    ...(leftover ? { leftover } : {}),
  });
  return {
    frames,
    errors,
    reader,
    writer,
    get closed() {
      return closed;
    },
    get chunks() {
      return chunks;
    },
  };
}

// ---- header helpers ---------------------------------------------------------------------------

describe('header helpers', () => {
  it('read id/size/seq at the sheet offsets (0, 2, 4), at any base offset', () => {
    const b = Buffer.alloc(3 + 8);
    b.writeUInt16LE(0xbeef, 3);
    b.writeUInt16LE(0x0123, 5);
    b.writeUInt32LE(0xdeadbeef, 7);
    expect(frameId(b, 3)).toBe(0xbeef);
    expect(frameSize(b, 3)).toBe(0x0123);
    expect(frameSeq(b, 3)).toBe(0xdeadbeef);
    expect(readHeader(b, 3)).toEqual({ id: 0xbeef, size: 0x0123, seq: 0xdeadbeef });
    expect(MSG_HDR_SIZE).toBe(8);
    expect(MAX_FRAME_SIZE).toBe(8192);
  });

  it('writeHeader writes at the sheet offsets', () => {
    const b = Buffer.alloc(12, 0xaa);
    writeHeader(b, 2, 29, 8184, 0xfffffffe);
    expect(b.readUInt16LE(2)).toBe(29);
    expect(b.readUInt16LE(4)).toBe(8184);
    expect(b.readUInt32LE(6)).toBe(0xfffffffe);
    expect(b[0]).toBe(0xaa);
    expect(b[10]).toBe(0xaa);
    const f = makeFrame(3, 9, Buffer.from([1, 2, 3]));
    expect([...framePayload(f)]).toEqual([1, 2, 3]);
  });
});

// ---- FrameReader without a socket -------------------------------------------------------------

describe('FrameReader (direct pushes)', () => {
  const frames = [
    makeFrame(2, 1, Buffer.alloc(0)),
    makeFrame(1, 2, pattern(552, 1)),
    makeFrame(7, 3, pattern(8184, 2)),
    makeFrame(4, 0xffffffff, pattern(3, 3)),
    makeFrame(0, 5, pattern(8, 4)),
  ];
  const stream = Buffer.concat(frames);

  function collect(chunks: Buffer[]): Buffer[] {
    const got: Buffer[] = [];
    const r = new FrameReader({ onFrame: (f) => got.push(Buffer.from(f)), onError: (e) => { throw e; } });
    for (const c of chunks) r.push(c);
    r.end();
    return got;
  }

  it('gives the same messages for every split of the stream into two chunks', () => {
    for (let cut = 0; cut <= stream.length; cut++) {
      const got = collect([stream.subarray(0, cut), stream.subarray(cut)]);
      if (!got.every((f, i) => f.equals(frames[i]!)) || got.length !== frames.length) {
        throw new Error(`split at ${cut} gave different messages`);
      }
    }
  });

  it('handles one byte per push', () => {
    const chunks = [];
    for (let i = 0; i < stream.length; i++) chunks.push(stream.subarray(i, i + 1));
    expect(collect(chunks)).toEqual(frames);
  });

  it('hands out views of the chunk for whole messages, and of one preallocated buffer otherwise', () => {
    const chunk = Buffer.concat([frames[0]!, frames[1]!, frames[3]!.subarray(0, 5)]);
    const views: Buffer[] = [];
    const r = new FrameReader({ onFrame: (f) => views.push(f) });
    r.push(chunk);
    expect(views).toHaveLength(2);
    expect(views[0]!.buffer).toBe(chunk.buffer);
    expect(views[0]!.byteOffset).toBe(chunk.byteOffset);
    expect(views[1]!.byteOffset).toBe(chunk.byteOffset + frames[0]!.length);
    expect(r.pending).toBe(5);
    // Two messages that straddle chunks are both reassembled in the same buffer.
    r.push(Buffer.concat([frames[3]!.subarray(5), frames[4]!.subarray(0, 9)]));
    r.push(frames[4]!.subarray(9));
    expect(views).toHaveLength(4);
    expect(views[2]!.buffer).toBe(views[3]!.buffer);
    expect(views[2]!.buffer).not.toBe(chunk.buffer);
    expect(views[2]!.byteOffset).toBe(views[3]!.byteOffset);
    expect(r.frames).toBe(4);
  });

  it('accepts a payload of exactly 8184 and stops with a hard error at 8185', () => {
    for (const split of [0, 1, 3, 8, 100]) {
      const got: Buffer[] = [];
      const errs: KvmiWireError[] = [];
      const r = new FrameReader({ onFrame: (f) => got.push(Buffer.from(f)), onError: (e) => errs.push(e) });
      const bad = Buffer.alloc(8 + 8185);
      bad.writeUInt16LE(2, 0);
      bad.writeUInt16LE(8185, 2);
      const s = Buffer.concat([makeFrame(2, 1, pattern(8184, 9)), bad, makeFrame(2, 3, Buffer.alloc(0))]);
      const at = 8192 + split;
      r.push(s.subarray(0, at));
      r.push(s.subarray(at));
      r.push(makeFrame(2, 4, Buffer.alloc(0)));
      expect(got).toHaveLength(1);
      expect(frameSize(got[0]!)).toBe(8184);
      expect(errs).toHaveLength(1);
      expect(errs[0]).toBeInstanceOf(KvmiWireError);
      expect(errs[0]!.code).toBe('message-too-large');
      expect(errs[0]!.hard).toBe(true);
      expect(r.stopped).toBe(true);
    }
  });

  it('throws from push when there is no onError', () => {
    const r = new FrameReader({ onFrame: () => undefined });
    const bad = Buffer.alloc(8);
    bad.writeUInt16LE(0xffff, 2);
    expect(() => r.push(bad)).toThrow(expect.objectContaining({ code: 'message-too-large' }));
  });

  it('reports a stream that ends inside a message (header or payload) as truncated', () => {
    for (const cut of [1, 7, 8, 20]) {
      const errs: KvmiWireError[] = [];
      const r = new FrameReader({ onFrame: () => undefined, onError: (e) => errs.push(e) });
      r.push(makeFrame(2, 1, pattern(30, 1)).subarray(0, cut));
      r.end();
      expect(errs.map((e) => [e.code, e.hard])).toEqual([['truncated', true]]);
    }
    const errs: KvmiWireError[] = [];
    const r = new FrameReader({ onFrame: () => undefined, onError: (e) => errs.push(e) });
    r.push(makeFrame(2, 1, pattern(30, 1)));
    r.end();
    expect(errs).toEqual([]);
  });

  it('stops with handler-failed when onFrame throws', () => {
    const errs: KvmiWireError[] = [];
    let n = 0;
    const r = new FrameReader({
      onFrame: () => {
        if (++n === 2) throw new Error('boom');
      },
      onError: (e) => errs.push(e),
    });
    r.push(stream);
    expect(n).toBe(2);
    expect(errs.map((e) => e.code)).toEqual(['handler-failed']);
    expect((errs[0]!.cause as Error).message).toBe('boom');
  });
});

// ---- FrameReader over a socket ----------------------------------------------------------------

describe('FrameReader over a Unix socket', () => {
  it('reassembles messages written one byte at a time', async () => {
    const { client, server } = await socketPair();
    const rx = receive(server);
    const r = prng(1);
    const frames = Array.from({ length: 12 }, (_, i) => makeFrame(i * 2, i + 1, pattern(randInt(r, 0, 60), i)));
    const stream = Buffer.concat(frames);
    for (let i = 0; i < stream.length; i++) {
      client.write(stream.subarray(i, i + 1));
      await tick();
    }
    await until(() => rx.frames.length === frames.length, 'all frames');
    expect(rx.frames).toEqual(frames);
    expect(rx.chunks).toBeGreaterThan(frames.length); // the stream really arrived in pieces
    expect(rx.errors).toEqual([]);
  });

  it('reassembles messages split at seeded random points', async () => {
    const { client, server } = await socketPair();
    const rx = receive(server);
    const r = prng(0xc0ffee);
    const frames: Buffer[] = [];
    for (let i = 0; i < 60; i++) {
      const size = i === 0 ? 8184 : i === 1 ? 0 : randInt(r, 0, r() < 0.2 ? 8184 : 200);
      frames.push(makeFrame(randInt(r, 0, 60), randInt(r, 0, 0xffffffff), pattern(size, i)));
    }
    const stream = Buffer.concat(frames);
    let pieces = 0;
    for (let off = 0; off < stream.length; ) {
      const n = randInt(r, 1, 3000);
      client.write(stream.subarray(off, off + n));
      off += n;
      pieces++;
      if (r() < 0.7) await tick();
    }
    await until(() => rx.frames.length === frames.length, 'all frames');
    expect(pieces).toBeGreaterThan(frames.length / 2);
    expect(rx.frames).toEqual(frames);
    expect(rx.errors).toEqual([]);
  });

  it('splits many messages coalesced into one write', async () => {
    const { client, server } = await socketPair();
    const rx = receive(server);
    const frames = Array.from({ length: 300 }, (_, i) => makeFrame(1, i, pattern(i % 50, i)));
    client.write(Buffer.concat(frames));
    await until(() => rx.frames.length === frames.length, 'all frames');
    expect(rx.frames).toEqual(frames);
    expect(rx.chunks).toBeLessThan(frames.length);
  });

  it('delivers a payload of exactly 8184; 8185 is a hard error that closes the connection', async () => {
    const { client, server } = await socketPair();
    const rx = receive(server);
    const ok = makeFrame(2, 1, pattern(8184, 5));
    client.write(ok);
    await until(() => rx.frames.length === 1, 'the 8184-byte message');
    expect(rx.frames[0]).toEqual(ok);

    const clientClosed = new Promise<void>((resolve) => client.once('close', () => resolve()));
    client.on('error', () => undefined);
    const bad = Buffer.alloc(8 + 8185);
    bad.writeUInt16LE(2, 0);
    bad.writeUInt16LE(8185, 2);
    client.write(Buffer.concat([bad, makeFrame(2, 3, Buffer.alloc(0))]));
    await until(() => rx.closed, 'the server side to close');
    await clientClosed;
    expect(rx.errors.map((e) => [e.code, e.hard])).toEqual([['message-too-large', true]]);
    expect(rx.frames).toHaveLength(1);
  });

  it('reports a connection that ends inside a message as truncated', async () => {
    const { client, server } = await socketPair();
    const rx = receive(server);
    client.end(makeFrame(2, 1, pattern(100, 1)).subarray(0, 50));
    await until(() => rx.closed, 'close');
    expect(rx.errors.map((e) => e.code)).toEqual(['truncated']);
  });

  it('parses handshake leftover first, then the socket data, in order', async () => {
    const { client, server } = await socketPair();
    const frames = Array.from({ length: 4 }, (_, i) => makeFrame(2, i + 1, pattern(10 + i, i)));
    const stream = Buffer.concat(frames);
    const cut = frames[0]!.length + 13;
    server.pause();
    client.write(stream.subarray(cut)); // arrives (and waits in the paused socket) before attaching
    await sleep(20);
    const rx = receive(server, Buffer.from(stream.subarray(0, cut)));
    expect(rx.frames).toHaveLength(0); // asynchronous, so onFrame may use the returned writer
    await until(() => rx.frames.length === frames.length, 'all frames');
    expect(rx.frames).toEqual(frames);
  });
});

// ---- FrameWriter ------------------------------------------------------------------------------

describe('FrameWriter over a Unix socket', () => {
  function rawCollector(server: net.Socket) {
    const chunks: Buffer[] = [];
    let bytes = 0;
    let events = 0;
    server.on('data', (c: Buffer) => {
      chunks.push(c);
      bytes += c.length;
      events++;
    });
    return {
      get bytes() {
        return bytes;
      },
      get events() {
        return events;
      },
      all: () => Buffer.concat(chunks),
    };
  }

  it('never interleaves messages from 50 concurrent async senders', async () => {
    const { client, server } = await socketPair();
    const rx = rawCollector(server);
    const writer = new FrameWriter(client);
    const r = prng(50);
    const perSender = 20;
    const plan = Array.from({ length: 50 }, () => Array.from({ length: perSender }, () => (r() < 0.15 ? 8184 : randInt(r, 0, 3000))));
    const delays = Array.from({ length: 50 * perSender }, () => randInt(r, 0, 3));
    let expectedBytes = 0;
    for (const sizes of plan) for (const s of sizes) expectedBytes += 8 + s;

    await Promise.all(
      plan.map(async (sizes, sender) => {
        for (let k = 0; k < sizes.length; k++) {
          const d = delays[sender * perSender + k]!;
          if (d === 1) await tick();
          else if (d === 2) await sleep(0);
          else if (d === 3) await Promise.resolve();
          const p = writer.send(makeFrame(sender, k, pattern(sizes[k]!, sender * 1000 + k)));
          if (k % 2 === 0) await p;
        }
      }),
    );
    await until(() => rx.bytes === expectedBytes, 'all bytes');
    const parsed = parseStream(rx.all());
    expect(parsed).toHaveLength(50 * perSender);
    const nextSeq = new Array<number>(50).fill(0);
    for (const m of parsed) {
      expect(m.seq).toBe(nextSeq[m.id]); // per-sender order kept
      nextSeq[m.id]!++;
      expect(m.size).toBe(plan[m.id]![m.seq]);
      if (!m.payload.equals(pattern(m.size, m.id * 1000 + m.seq))) throw new Error(`payload of ${m.id}/${m.seq} corrupted`);
    }
    expect(writer.writes).toBeLessThan(50 * perSender); // some batching happened
  });

  it('writes the messages sent in one tick with one socket write', async () => {
    const { client, server } = await socketPair();
    const rx = rawCollector(server);
    const writes: number[] = [];
    const realWrite = client.write.bind(client) as (chunk: Buffer, cb?: () => void) => boolean;
    (client as unknown as { write: (chunk: Buffer, cb?: () => void) => boolean }).write = (chunk, cb) => {
      writes.push(chunk.length);
      return realWrite(chunk, cb);
    };
    const writer = new FrameWriter(client);
    const frames = Array.from({ length: 10 }, (_, i) => makeFrame(3, i, pattern(40 + i, i)));
    const done = Promise.all(frames.map((f) => writer.send(f)));
    expect(writes).toEqual([]); // nothing written synchronously: the batch is flushed on the next tick
    await done;
    const total = frames.reduce((n, f) => n + f.length, 0);
    expect(writes).toEqual([total]);
    await until(() => rx.bytes === total, 'the batch');
    expect(rx.events).toBe(1);
    expect(rx.all()).toEqual(Buffer.concat(frames));

    // A message sent in a later tick is a separate write; a lone message is written without a copy.
    const lone = makeFrame(5, 99, pattern(10, 1));
    await writer.send(lone);
    expect(writes).toEqual([total, lone.length]);
    expect(writer.writes).toBe(2);
    await until(() => rx.bytes === total + lone.length, 'the lone message');
  });

  it('respects backpressure: queues instead of overfilling the socket, then delivers everything', async () => {
    const { client, server } = await socketPair();
    server.pause();
    const writer = new FrameWriter(client);
    const frames = Array.from({ length: 400 }, (_, i) => makeFrame(9, i, pattern(8184, i)));
    let settled = false;
    const all = Promise.all(frames.map((f) => writer.send(f))).then(() => {
      settled = true;
    });
    await sleep(50);
    expect(settled).toBe(false);
    expect(writer.queuedBytes).toBeGreaterThan(0);
    expect(client.writableLength).toBeLessThanOrEqual(client.writableHighWaterMark + 64 * 1024);

    const rx = rawCollector(server);
    server.resume();
    await all;
    const total = frames.length * 8192;
    await until(() => rx.bytes === total, 'all bytes');
    const parsed = parseStream(rx.all());
    expect(parsed.map((m) => m.seq)).toEqual(frames.map((_, i) => i));
    expect(parsed.every((m) => m.payload.equals(pattern(8184, m.seq)))).toBe(true);
  });

  it('close() flushes what is queued, then ends the socket; later sends are rejected', async () => {
    const { client, server } = await socketPair();
    const rx = rawCollector(server);
    const ended = new Promise<void>((resolve) => server.once('end', () => resolve()));
    const writer = new FrameWriter(client);
    const frames = Array.from({ length: 5 }, (_, i) => makeFrame(2, i, pattern(100, i)));
    for (const f of frames) void writer.send(f);
    const closed = writer.close();
    expect(writer.writable).toBe(false);
    await expect(writer.send(frames[0]!)).rejects.toMatchObject({ code: 'closed', hard: true });
    await closed;
    await ended;
    expect(rx.all()).toEqual(Buffer.concat(frames));
  });

  it('rejects pending and later sends when the peer goes away', async () => {
    const { client, server } = await socketPair();
    client.on('error', () => undefined);
    const writer = new FrameWriter(client);
    const gone = new Promise<void>((resolve) => client.once('close', () => resolve()));
    server.destroy();
    // Keep writing until the client notices (EPIPE / reset), without awaiting.
    const p = writer.send(makeFrame(2, 1, pattern(8184, 1)));
    const timer = setInterval(() => {
      if (writer.writable) void writer.send(makeFrame(2, 2, pattern(8184, 2)));
    }, 1);
    await gone;
    clearInterval(timer);
    await p.catch(() => undefined); // may have been written before the peer vanished
    await expect(writer.send(makeFrame(2, 3, Buffer.alloc(0)))).rejects.toSatisfy(
      (e: unknown) => e instanceof KvmiWireError && (e.code === 'closed' || e.code === 'socket-error') && e.hard,
    );
    expect(writer.writable).toBe(false);
  });

  it('throws invalid-frame synchronously for a malformed message', async () => {
    const { client } = await socketPair();
    const writer = new FrameWriter(client);
    const bad = makeFrame(2, 1, pattern(10, 1));
    bad.writeUInt16LE(11, 2);
    expect(() => writer.send(bad)).toThrow(expect.objectContaining({ code: 'invalid-frame', hard: false }));
    expect(() => writer.send(Buffer.alloc(7))).toThrow(expect.objectContaining({ code: 'invalid-frame' }));
    const big = Buffer.alloc(8 + 8185);
    big.writeUInt16LE(8185, 2);
    expect(() => writer.send(big)).toThrow(expect.objectContaining({ code: 'invalid-frame' }));
    expect(writer.queuedBytes).toBe(0);
  });

  it('attachFraming: request/reply both ways over one pair', async () => {
    const { client, server } = await socketPair();
    // "KVM" echoes every message back with the same id/seq and an 8-byte error-code payload.
    const kvm = attachFraming(server, {
      onFrame: (f) => {
        const reply = Buffer.alloc(16);
        reply.writeUInt16LE(frameId(f), 0);
        reply.writeUInt16LE(8, 2);
        reply.writeUInt32LE(frameSeq(f), 4);
        reply.writeInt32LE(-(frameSize(f) % 23), 8);
        void kvm.writer.send(reply);
      },
    });
    const replies: { id: number; seq: number; err: number }[] = [];
    const tool = attachFraming(client, {
      onFrame: (f) => replies.push({ id: frameId(f), seq: frameSeq(f), err: f.readInt32LE(8) }),
    });
    for (let i = 0; i < 100; i++) void tool.writer.send(makeFrame(2 * (i % 15), i, pattern(i, i)));
    await until(() => replies.length === 100, 'replies');
    expect(replies).toEqual(Array.from({ length: 100 }, (_, i) => ({ id: 2 * (i % 15), seq: i, err: -(i % 23) || 0 })));
  });
});
