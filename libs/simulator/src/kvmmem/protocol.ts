/**
 * The simulated `/dev/kvmmem` on the wire (`periscope sim --kvmmem-listen PATH`): one Unix stream
 * connection is one `open()` of the device; each message is a u32 little-endian byte length followed by
 * that many bytes of UTF-8 JSON.
 *
 * Request  `{ "id": n, "pid": p, "req": <ioctl request number>, ...arguments }`
 * Response `{ "id": n, "errno": 0 | <positive errno>, ...results }`
 *
 * The request numbers are the real ones (kvmmem.md §3.2, §4.2); the device answers ENOTTY to a number
 * of the ABI it does not speak, exactly as the module does, so libkvmi's probe works unchanged.
 *
 * | req | ABI | arguments | results |
 * | --- | --- | --- | --- |
 * | `0x40306901` KVM_INTRO_MEM_MAP | v1 | `token` (64 hex), `gpa`, `gva` | `path`, `offset` (the page: map it over `gva`) |
 * | `0x40086902` KVM_INTRO_MEM_UNMAP | v1 | `arg` = the gva (by value) | — |
 * | `0x40086901` KVM_GUEST_MEM_OPEN | v2 | `uuid` (32 hex) | — |
 * | `0xC0306902` KVM_GUEST_MEM_MAP | v2 | `token`, `gpa` | `gpa` (region start), `length`, `path` (mmap `length` bytes at offset `gpa`) |
 * | `0x40086903` KVM_GUEST_MEM_UNMAP | v2 | `arg` = the region start (by value) | — |
 *
 * 64-bit values travel as `0x…` hex strings. The device cannot mmap into another process, so it answers
 * the RAM file and offset of the validated page/region and the client maps the file there (the file is
 * the VM's memory: offset = GPA, shared with the simulated guest).
 */
export const KVMMEM_REQ = {
  KVM_INTRO_MEM_MAP: 0x40306901,
  KVM_INTRO_MEM_UNMAP: 0x40086902,
  KVM_GUEST_MEM_OPEN: 0x40086901,
  KVM_GUEST_MEM_MAP: 0xc0306902,
  KVM_GUEST_MEM_UNMAP: 0x40086903,
} as const;

/** Largest message either side accepts. */
export const KVMMEM_MAX_MESSAGE = 64 * 1024;

export interface KvmmemRequest {
  id: number;
  pid: number;
  req: number;
  token?: string;
  gpa?: string;
  gva?: string;
  arg?: string;
  uuid?: string;
}

export interface KvmmemResponse {
  id: number;
  errno: number;
  path?: string;
  offset?: string;
  gpa?: string;
  length?: string;
}

export function encodeKvmmemMessage(msg: KvmmemRequest | KvmmemResponse): Buffer {
  const body = Buffer.from(JSON.stringify(msg), 'utf8');
  const out = Buffer.allocUnsafe(4 + body.length);
  out.writeUInt32LE(body.length, 0);
  body.copy(out, 4);
  return out;
}

/** Cuts a byte stream into messages; throws on an oversized length. */
export class KvmmemMessageReader {
  private buf: Buffer = Buffer.alloc(0);
  push(chunk: Buffer, onMessage: (msg: unknown) => void): void {
    this.buf = this.buf.length === 0 ? chunk : Buffer.concat([this.buf, chunk]);
    while (this.buf.length >= 4) {
      const n = this.buf.readUInt32LE(0);
      if (n > KVMMEM_MAX_MESSAGE) throw new Error(`kvmmem message of ${n} bytes (limit ${KVMMEM_MAX_MESSAGE})`);
      if (this.buf.length < 4 + n) break;
      const body = this.buf.subarray(4, 4 + n);
      this.buf = this.buf.subarray(4 + n);
      onMessage(JSON.parse(body.toString('utf8')));
    }
  }
}

export const hex64 = (v: bigint): string => `0x${v.toString(16)}`;

export function parseHex64(v: unknown): bigint | undefined {
  if (typeof v !== 'string' || !/^0x[0-9a-f]{1,16}$/i.test(v)) return undefined;
  return BigInt(v);
}
