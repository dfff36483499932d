/**
 * The simulated `/dev/kvmmem` (kvmmem.md §3.3, §4.4): the guest module of the introspection VM plus the
 * host's side of the map hypercall, for the simulated fleet. Served on a Unix socket
 * (`periscope sim --kvmmem-listen PATH`); the wire format is in `protocol.ts`.
 *
 * - One connection = one open file. The first request fixes the opening process (`pid`); a request with
 *   another pid is EINVAL ("same process only", as from a forked child).
 * - ABI v1 (`abi: 1`): MAP {token, gpa, gva}; the per-process mapping database is keyed by gva and shared
 *   by every connection of that pid (EALREADY across them); UNMAP(gva) by value, ENOENT when unknown.
 * - ABI v2 (`abi: 2`): OPEN(uuid) once per file (EALREADY twice, ENOENT for an unknown VM); MAP before
 *   OPEN is EINVAL; MAP answers the region containing the gpa — the `regionBytes`-aligned block clipped to
 *   its memslot; a region overlapping a mapped one is EALREADY; UNMAP(start) by value: ENOENT unknown,
 *   EINVAL for an address inside a region that is not its start.
 * - Tokens are checked against the simulated host: `SimVm.consumeMapToken` (GET_MAP_TOKEN on the VM's
 *   KVMI socket, one use, dropped at UNHOOK). v1 finds the VM by its token (the token names the VM);
 *   v2 only accepts tokens of the opened VM.
 * - Closing the connection unmaps everything mapped through it (release always succeeds).
 *
 * Readings chosen where the sheet is silent (see docs/simulator.md): a rejected token is EPERM; a gpa
 * outside every memslot is EFAULT (what KVM answers for a gfn without a memslot); the checks that need
 * no hypercall (alignment, EALREADY, OPEN) come first and do not consume the token.
 */
import { rmSync } from 'node:fs';
import net from 'node:net';

import { HostErrno } from '../errors.js';
import type { SimVm } from '../kvm/vm.js';
import {
  encodeKvmmemMessage,
  hex64,
  KVMMEM_REQ,
  KvmmemMessageReader,
  parseHex64,
  type KvmmemRequest,
  type KvmmemResponse,
} from './protocol.js';

const PAGE = 4096n;
const EALREADY = 114;
const ENOTTY = 25;

export interface KvmmemServerOptions {
  /** Unix socket path to listen on (an existing socket file is replaced). */
  path: string;
  /** The VMs of the simulated host (looked up at each request, so VMs may come and go). */
  vms: () => Iterable<SimVm>;
  /** The ABI the simulated module speaks. Default 2. */
  abi?: 1 | 2;
  /** ABI v2 region granularity in bytes (a power of two, at least 4096). Default 2 MiB. */
  regionBytes?: number;
}

export interface KvmmemServerStats {
  opens: number;
  maps: number;
  unmaps: number;
  rejectedTokens: number;
  /** Pages currently mapped over every connection. */
  mappedPages: number;
  connections: number;
}

interface Mapping {
  vm: SimVm;
  start: bigint;
  length: bigint;
  conn: Conn;
}

interface Conn {
  socket: net.Socket;
  pid: number | undefined;
  vm: SimVm | undefined;
  /** v2 regions by start gpa. */
  regions: Map<bigint, Mapping>;
  /** v1 mappings created through this file (gva → mapping), also in the process database. */
  pages: Map<bigint, Mapping>;
}

export class KvmmemServer {
  readonly abi: 1 | 2;
  readonly regionBytes: bigint;
  private readonly server: net.Server;
  private readonly conns = new Set<Conn>();
  /** ABI v1 per-process database: pid → gva → mapping. */
  private readonly processes = new Map<number, Map<bigint, Mapping>>();
  private readonly counters = { opens: 0, maps: 0, unmaps: 0, rejectedTokens: 0 };

  constructor(private readonly opts: KvmmemServerOptions) {
    this.abi = opts.abi ?? 2;
    const rb = opts.regionBytes ?? 2 * 1024 * 1024;
    if (!Number.isInteger(rb) || rb < 4096 || (rb & (rb - 1)) !== 0) throw new Error('kvmmem: regionBytes must be a power of two ≥ 4096');
    this.regionBytes = BigInt(rb);
    this.server = net.createServer((s) => this.accept(s));
  }

  get path(): string {
    return this.opts.path;
  }

  async listen(): Promise<void> {
    rmSync(this.opts.path, { force: true });
    await new Promise<void>((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(this.opts.path, () => {
        this.server.off('error', reject);
        resolve();
      });
    });
  }

  async close(): Promise<void> {
    for (const c of this.conns) c.socket.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
    rmSync(this.opts.path, { force: true });
  }

  stats(): KvmmemServerStats {
    let pages = 0n;
    for (const c of this.conns) {
      for (const m of c.regions.values()) pages += m.length / PAGE;
      pages += BigInt(c.pages.size);
    }
    return { ...this.counters, mappedPages: Number(pages), connections: this.conns.size };
  }

  private accept(socket: net.Socket): void {
    const conn: Conn = { socket, pid: undefined, vm: undefined, regions: new Map(), pages: new Map() };
    this.conns.add(conn);
    this.counters.opens++;
    const reader = new KvmmemMessageReader();
    socket.on('data', (chunk: Buffer) => {
      try {
        reader.push(chunk, (msg) => {
          const res = this.handle(conn, msg as KvmmemRequest);
          socket.write(encodeKvmmemMessage(res));
        });
      } catch {
        socket.destroy();
      }
    });
    socket.on('error', () => undefined);
    socket.on('close', () => this.release(conn));
  }

  /** release(): every mapping made through this file is unmapped; always succeeds. */
  private release(conn: Conn): void {
    if (!this.conns.delete(conn)) return;
    const db = conn.pid === undefined ? undefined : this.processes.get(conn.pid);
    for (const gva of conn.pages.keys()) db?.delete(gva);
    if (db && db.size === 0 && conn.pid !== undefined) this.processes.delete(conn.pid);
    conn.pages.clear();
    conn.regions.clear();
  }

  private handle(conn: Conn, m: KvmmemRequest): KvmmemResponse {
    const id = typeof m.id === 'number' ? m.id : 0;
    const fail = (errno: number): KvmmemResponse => ({ id, errno });
    if (typeof m.pid !== 'number' || typeof m.req !== 'number') return fail(HostErrno.EINVAL);
    if (conn.pid === undefined) conn.pid = m.pid;
    else if (conn.pid !== m.pid) return fail(HostErrno.EINVAL);
    if (this.abi === 1) {
      if (m.req === KVMMEM_REQ.KVM_INTRO_MEM_MAP) return this.v1Map(conn, m, id);
      if (m.req === KVMMEM_REQ.KVM_INTRO_MEM_UNMAP) return this.v1Unmap(conn, m, id);
    } else {
      if (m.req === KVMMEM_REQ.KVM_GUEST_MEM_OPEN) return this.v2Open(conn, m, id);
      if (m.req === KVMMEM_REQ.KVM_GUEST_MEM_MAP) return this.v2Map(conn, m, id);
      if (m.req === KVMMEM_REQ.KVM_GUEST_MEM_UNMAP) return this.v2Unmap(conn, m, id);
    }
    return fail(ENOTTY);
  }

  private token(m: KvmmemRequest): Buffer | undefined {
    if (typeof m.token !== 'string' || !/^[0-9a-f]{64}$/i.test(m.token)) return undefined;
    return Buffer.from(m.token, 'hex');
  }

  // ---- ABI v1 -----------------------------------------------------------------------------------

  private v1Map(conn: Conn, m: KvmmemRequest, id: number): KvmmemResponse {
    const gpa = parseHex64(m.gpa);
    const gva = parseHex64(m.gva);
    const token = this.token(m);
    if (gpa === undefined || gva === undefined || token === undefined) return { id, errno: HostErrno.EFAULT };
    if (gva === 0n || gva % PAGE !== 0n) return { id, errno: HostErrno.EINVAL };
    const pid = conn.pid!;
    let db = this.processes.get(pid);
    if (db?.has(gva)) return { id, errno: EALREADY };
    // The hypercall: the token names the VM.
    let vm: SimVm | undefined;
    for (const v of this.opts.vms()) {
      if (v.consumeMapToken(token)) {
        vm = v;
        break;
      }
    }
    if (!vm) {
      this.counters.rejectedTokens++;
      return { id, errno: HostErrno.EPERM };
    }
    const page = gpa & ~(PAGE - 1n);
    if (!vm.memory.isBacked(page)) return { id, errno: HostErrno.EFAULT };
    const mapping: Mapping = { vm, start: page, length: PAGE, conn };
    if (!db) this.processes.set(pid, (db = new Map()));
    db.set(gva, mapping);
    conn.pages.set(gva, mapping);
    this.counters.maps++;
    return { id, errno: 0, path: vm.memory.path, offset: hex64(page) };
  }

  private v1Unmap(conn: Conn, m: KvmmemRequest, id: number): KvmmemResponse {
    const gva = parseHex64(m.arg);
    const db = this.processes.get(conn.pid!);
    const mapping = gva === undefined ? undefined : db?.get(gva);
    if (gva === undefined || !mapping) return { id, errno: HostErrno.ENOENT };
    db!.delete(gva);
    mapping.conn.pages.delete(gva);
    this.counters.unmaps++;
    return { id, errno: 0 };
  }

  // ---- ABI v2 -----------------------------------------------------------------------------------

  private v2Open(conn: Conn, m: KvmmemRequest, id: number): KvmmemResponse {
    if (conn.vm) return { id, errno: EALREADY };
    if (typeof m.uuid !== 'string' || !/^[0-9a-f]{32}$/i.test(m.uuid)) return { id, errno: HostErrno.EFAULT };
    const want = m.uuid.toLowerCase();
    for (const vm of this.opts.vms()) {
      if (Buffer.from(vm.uuid).toString('hex') === want) {
        conn.vm = vm;
        return { id, errno: 0 };
      }
    }
    return { id, errno: HostErrno.ENOENT };
  }

  /** The region containing `gpa`: its `regionBytes` block clipped to the memslot around gpa. */
  private regionOf(vm: SimVm, gpa: bigint): [bigint, bigint] {
    const block = gpa & ~(this.regionBytes - 1n);
    let start = gpa & ~(PAGE - 1n);
    while (start > block && vm.memory.isBacked(start - PAGE)) start -= PAGE;
    let end = (gpa & ~(PAGE - 1n)) + PAGE;
    const blockEnd = block + this.regionBytes;
    while (end < blockEnd && vm.memory.isBacked(end)) end += PAGE;
    return [start, end - start];
  }

  private v2Map(conn: Conn, m: KvmmemRequest, id: number): KvmmemResponse {
    const vm = conn.vm;
    if (!vm) return { id, errno: HostErrno.EINVAL };
    const gpa = parseHex64(m.gpa);
    const token = this.token(m);
    if (gpa === undefined || token === undefined) return { id, errno: HostErrno.EFAULT };
    const backed = vm.memory.isBacked(gpa);
    if (backed) {
      const [start, length] = this.regionOf(vm, gpa);
      for (const r of conn.regions.values()) {
        if (r.start < start + length && start < r.start + r.length) return { id, errno: EALREADY };
      }
    }
    if (!vm.consumeMapToken(token)) {
      this.counters.rejectedTokens++;
      return { id, errno: HostErrno.EPERM };
    }
    if (!backed) return { id, errno: HostErrno.EFAULT };
    const [start, length] = this.regionOf(vm, gpa);
    conn.regions.set(start, { vm, start, length, conn });
    this.counters.maps++;
    return { id, errno: 0, gpa: hex64(start), length: hex64(length), path: vm.memory.path };
  }

  private v2Unmap(conn: Conn, m: KvmmemRequest, id: number): KvmmemResponse {
    const start = parseHex64(m.arg);
    if (start === undefined) return { id, errno: HostErrno.EINVAL };
    if (conn.regions.delete(start)) {
      this.counters.unmaps++;
      return { id, errno: 0 };
    }
    for (const r of conn.regions.values()) if (start > r.start && start < r.start + r.length) return { id, errno: HostErrno.EINVAL };
    return { id, errno: HostErrno.ENOENT };
  }
}
