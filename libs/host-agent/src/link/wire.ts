/**
 * A small protobuf writer for the agent's hottest outbound message (VerdictBatch): records are written
 * straight from the report queue's typed arrays into one reused buffer — no per-record objects. Field
 * numbers are those of protos/periscope/v1/agent.proto (a test decodes the output with the generated
 * `LinkRequest.decode`). Numbers up to 2^53 are written exactly; larger unix-ns values are floats that
 * are integers (256 ns resolution), written as such.
 */
export const WIRE_VARINT = 0;
export const WIRE_LEN = 2;

export class PbWriter {
  buf: Buffer;
  pos = 0;

  constructor(initial = 64 * 1024) {
    this.buf = Buffer.allocUnsafe(initial);
  }

  reset(): void {
    this.pos = 0;
  }

  private ensure(n: number): void {
    if (this.pos + n <= this.buf.length) return;
    let size = this.buf.length * 2;
    while (size < this.pos + n) size *= 2;
    const next = Buffer.allocUnsafe(size);
    this.buf.copy(next, 0, 0, this.pos);
    this.buf = next;
  }

  /** A non-negative integer (exact up to 2^53; larger integral floats as they are). */
  varint(n: number): void {
    this.ensure(10);
    const b = this.buf;
    let p = this.pos;
    if (n < 0x80000000) {
      let v = n >>> 0;
      while (v >= 0x80) {
        b[p++] = (v & 0x7f) | 0x80;
        v >>>= 7;
      }
      b[p++] = v;
    } else {
      let v = n;
      while (v >= 128) {
        b[p++] = (v % 128) | 0x80;
        v = Math.floor(v / 128);
      }
      b[p++] = v;
    }
    this.pos = p;
  }

  /** A u64 given as two u32 halves. */
  varint64(lo: number, hi: number): void {
    if (hi === 0) {
      this.varint(lo >>> 0);
      return;
    }
    this.ensure(10);
    const b = this.buf;
    let p = this.pos;
    let l = lo >>> 0;
    let h = hi >>> 0;
    while (h !== 0 || l >= 0x80) {
      b[p++] = (l & 0x7f) | 0x80;
      l = ((l >>> 7) | (h << 25)) >>> 0;
      h >>>= 7;
    }
    b[p++] = l;
    this.pos = p;
  }

  tag(field: number, wire: number): void {
    this.varint((field << 3) | wire);
  }

  /** Field with a varint value, omitted when 0 (proto3 default). */
  uint(field: number, n: number): void {
    if (n === 0) return;
    this.tag(field, WIRE_VARINT);
    this.varint(n);
  }

  bytes(field: number, src: Buffer): void {
    this.tag(field, WIRE_LEN);
    this.varint(src.length);
    this.ensure(src.length);
    src.copy(this.buf, this.pos);
    this.pos += src.length;
  }

  string(field: number, s: string): void {
    if (s.length === 0) return;
    const n = Buffer.byteLength(s);
    this.tag(field, WIRE_LEN);
    this.varint(n);
    this.ensure(n);
    this.buf.write(s, this.pos, n, 'utf8');
    this.pos += n;
  }

  /** Start a length-delimited field; returns a mark for `endLen`. One byte is reserved for the length. */
  beginLen(field: number): number {
    this.tag(field, WIRE_LEN);
    this.ensure(1);
    return this.pos++;
  }

  endLen(mark: number): void {
    const len = this.pos - mark - 1;
    if (len < 0x80) {
      this.buf[mark] = len;
      return;
    }
    let extra = 0;
    for (let v = len >>> 7; v > 0; v >>>= 7) extra++;
    this.ensure(extra);
    this.buf.copyWithin(mark + 1 + extra, mark + 1, this.pos);
    let p = mark;
    let v = len;
    while (v >= 0x80) {
      this.buf[p++] = (v & 0x7f) | 0x80;
      v >>>= 7;
    }
    this.buf[p] = v;
    this.pos += extra;
  }

  /** Append already-encoded bytes. */
  raw(src: Uint8Array): void {
    this.ensure(src.length);
    this.buf.set(src, this.pos);
    this.pos += src.length;
  }

  /** A copy of what was written (grpc-js keeps the buffer until it is sent). */
  take(): Buffer {
    const out = Buffer.allocUnsafe(this.pos);
    this.buf.copy(out, 0, 0, this.pos);
    this.pos = 0;
    return out;
  }
}

/** `LinkRequest` envelope fields. */
export const LINK_REQUEST = { streamSeq: 1, eventBatch: 13, verdictBatch: 14 } as const;
