/**
 * A minimal introspection tool that speaks KVMI with raw frames, written from the fact sheet
 * (../shared/spec/kvmi-v12.md §2.1, §3, §4, §5) and not from the library's encoder: every message is
 * assembled here byte by byte and every reply and event is read at the sheet's offsets. Only the QEMU
 * handshake uses the library (`acceptQemuHandshake`), as it is not a KVMI frame.
 */
import { randomBytes } from 'node:crypto';
import { rmSync } from 'node:fs';
import net from 'node:net';

import { acceptQemuHandshake } from '@periscope/kvmi';
import { SimQemu, SimVm, type SimVmOptions } from '../../src/index.js';

// ---- constants from the sheet ---------------------------------------------------------------------

/** §3.1 message ids. */
export const MSG = {
  VCPU_EVENT: 1,
  GET_VERSION: 2,
  VCPU_CONTROL_EVENTS: 5,
  VCPU_GET_REGISTERS: 7,
  VM_GET_INFO: 8,
  VCPU_SET_REGISTERS: 9,
  VM_CONTROL_EVENTS: 10,
  VM_READ_PHYSICAL: 12,
  VCPU_CONTROL_CR: 13,
  VM_WRITE_PHYSICAL: 14,
  VM_SET_PAGE_ACCESS: 20,
  VCPU_CONTROL_MSR: 25,
  VCPU_TRANSLATE_GVA: 29,
} as const;

/** §3.2 event ids. */
export const EV = { UNHOOK: 0, PAUSE: 1, HYPERCALL: 3, BREAKPOINT: 5, CR: 7, TRAP: 9, XSETBV: 11, DESCRIPTOR: 13, MSR: 15, PF: 17, SINGLESTEP: 19 } as const;
export const EV_NAME: Record<number, string> = Object.fromEntries(Object.entries(EV).map(([k, v]) => [v, k]));
/** §3.3 actions. */
export const ACTION = { CONTINUE: 0, RETRY: 1, CRASH: 2 } as const;

// ---- little-endian byte helpers --------------------------------------------------------------------

export const u8 = (v: number): Buffer => Buffer.from([v & 0xff]);
export function u16(v: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16LE(v);
  return b;
}
export function u32(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(v >>> 0);
  return b;
}
export function u64(v: bigint): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt.asUintN(64, v));
  return b;
}
export const zeros = (n: number): Buffer => Buffer.alloc(n);

/** §2.1: u16 id, u16 size, u32 seq, then the payload. */
export function frame(id: number, seq: number, payload: Buffer): Buffer {
  return Buffer.concat([u16(id), u16(payload.length), u32(seq), payload]);
}

/** §2.5: the vCPU header, u16 vcpu + 6 bytes of padding. */
export const vcpuHdr = (vcpu: number): Buffer => Buffer.concat([u16(vcpu), zeros(6)]);

// ---- events (§5.2) ---------------------------------------------------------------------------------

/** Payload offsets of a vCPU event: hdr 0 (event u16), kvmi_vcpu_event 8 (size u16, vcpu u16), arch 16. */
export const EVT = {
  EVENT: 0,
  SIZE: 8,
  VCPU: 10,
  MODE: 16,
  REGS: 24, // kvm_regs, 144 bytes: rax rbx rcx rdx rsi rdi rsp rbp r8..r15 rip rflags
  RIP: 24 + 16 * 8,
  SREGS: 168, // kvm_sregs: 8 segments × 24, gdt, idt (16 each), then cr0 cr2 cr3 cr4 cr8 efer apic_base
  CR0: 168 + 8 * 24 + 2 * 16,
  CR3: 168 + 8 * 24 + 2 * 16 + 16,
  CR4: 168 + 8 * 24 + 2 * 16 + 24,
  MSRS: 480, // sysenter_cs esp eip efer star lstar cstar pat shadow_gs
} as const;

export interface RawEvent {
  seq: number;
  vcpu: number;
  event: number;
  payload: Buffer;
  rip: bigint;
  /** The event-specific struct (at 8 + kvmi_vcpu_event.size). */
  specific: Buffer;
}

// ---- the connection ---------------------------------------------------------------------------------

export class RawTool {
  private buf = Buffer.alloc(0);
  private seq = 0x1000;
  private readonly pending = new Map<string, (payload: Buffer) => void>();
  private readonly events: RawEvent[] = [];
  private eventWaiters: Array<() => void> = [];
  /** Every vCPU event received, in order. */
  readonly log: RawEvent[] = [];
  closed = false;
  onEvent: ((e: RawEvent) => void) | null = null;

  constructor(readonly socket: net.Socket, leftover: Buffer) {
    socket.on('data', (d: Buffer) => this.feed(d));
    socket.on('error', () => undefined);
    socket.on('close', () => {
      this.closed = true;
      for (const w of this.eventWaiters.splice(0)) w();
    });
    if (leftover.length > 0) this.feed(leftover);
    socket.resume();
  }

  private feed(d: Buffer): void {
    this.buf = Buffer.concat([this.buf, d]);
    while (this.buf.length >= 8) {
      const size = this.buf.readUInt16LE(2);
      if (this.buf.length < 8 + size) return;
      const id = this.buf.readUInt16LE(0);
      const seq = this.buf.readUInt32LE(4);
      const payload = Buffer.from(this.buf.subarray(8, 8 + size));
      this.buf = this.buf.subarray(8 + size);
      if (id === MSG.VCPU_EVENT) {
        const common = payload.readUInt16LE(EVT.SIZE);
        const e: RawEvent = {
          seq,
          vcpu: payload.readUInt16LE(EVT.VCPU),
          event: payload.readUInt16LE(EVT.EVENT),
          payload,
          rip: payload.readBigUInt64LE(EVT.RIP),
          specific: payload.subarray(8 + common),
        };
        this.log.push(e);
        if (this.onEvent) this.onEvent(e);
        else {
          this.events.push(e);
          for (const w of this.eventWaiters.splice(0)) w();
        }
      } else if (id === 0) {
        // VM event (UNHOOK): no reply; close.
        this.socket.end();
      } else {
        const k = `${id}:${seq}`;
        const r = this.pending.get(k);
        this.pending.delete(k);
        r?.(payload);
      }
    }
  }

  /** Send a command; resolves with { err, data } (err 0 or a negative KVM errno; data after kvmi_error_code). */
  call(id: number, payload: Buffer): Promise<{ err: number; data: Buffer }> {
    const seq = ++this.seq;
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error(`no reply to message ${id} seq ${seq}`)), 5000);
      this.pending.set(`${id}:${seq}`, (p) => {
        clearTimeout(t);
        resolve({ err: p.readInt32LE(0), data: p.subarray(8) });
      });
      this.socket.write(frame(id, seq, payload));
    });
  }

  async ok(id: number, payload: Buffer): Promise<Buffer> {
    const r = await this.call(id, payload);
    if (r.err !== 0) throw new Error(`message ${id} failed with ${r.err}`);
    return r.data;
  }

  async nextEvent(timeoutMs = 5000): Promise<RawEvent> {
    const end = Date.now() + timeoutMs;
    while (this.events.length === 0) {
      if (this.closed) throw new Error('closed');
      if (Date.now() > end) throw new Error('timed out waiting for an event');
      await new Promise<void>((r) => {
        const t = setTimeout(r, 50);
        this.eventWaiters.push(() => {
          clearTimeout(t);
          r();
        });
      });
    }
    return this.events.shift()!;
  }

  /** §5.3: header id 1 + the event's seq; vcpu hdr; action, event, padding; optional reply data. */
  reply(e: RawEvent, action: number, newVal?: bigint): void {
    const body = Buffer.concat([vcpuHdr(e.vcpu), u8(action), u8(e.event), zeros(6), ...(newVal !== undefined ? [u64(newVal)] : [])]);
    this.socket.write(frame(MSG.VCPU_EVENT, e.seq, body));
  }

  // ---- commands (§4) -------------------------------------------------------------------------------

  controlEvents(vcpu: number, event: number, enable: boolean): Promise<{ err: number; data: Buffer }> {
    return this.call(MSG.VCPU_CONTROL_EVENTS, Buffer.concat([vcpuHdr(vcpu), u16(event), u8(enable ? 1 : 0), zeros(5)]));
  }
  controlCr(vcpu: number, cr: number, enable: boolean): Promise<{ err: number; data: Buffer }> {
    return this.call(MSG.VCPU_CONTROL_CR, Buffer.concat([vcpuHdr(vcpu), u8(cr), u8(enable ? 1 : 0), zeros(6)]));
  }
  controlMsr(vcpu: number, msr: number, enable: boolean): Promise<{ err: number; data: Buffer }> {
    return this.call(MSG.VCPU_CONTROL_MSR, Buffer.concat([vcpuHdr(vcpu), u8(enable ? 1 : 0), zeros(3), u32(msr)]));
  }
  /** VCPU_GET_REGISTERS with MSR indexes; returns RIP and the MSR values. */
  async getRegisters(vcpu: number, msrs: number[]): Promise<{ rip: bigint; cr3: bigint; msrs: Map<number, bigint> }> {
    const d = await this.ok(MSG.VCPU_GET_REGISTERS, Buffer.concat([vcpuHdr(vcpu), u16(msrs.length), zeros(6), ...msrs.map(u32)]));
    // reply: u32 mode, u32 pad, kvm_regs (144) at 8, kvm_sregs (312) at 152, kvm_msrs {u32 nmsrs, u32 pad} at 464, entries at 472
    const out = new Map<number, bigint>();
    const n = d.readUInt32LE(464);
    for (let i = 0; i < n; i++) out.set(d.readUInt32LE(472 + 16 * i), d.readBigUInt64LE(472 + 16 * i + 8));
    return { rip: d.readBigUInt64LE(8 + 128), cr3: d.readBigUInt64LE(152 + 8 * 24 + 2 * 16 + 16), msrs: out };
  }
  /** VCPU_SET_REGISTERS with the event's kvm_regs and RIP replaced. */
  setRip(e: RawEvent, rip: bigint): Promise<Buffer> {
    const regs = Buffer.from(e.payload.subarray(EVT.REGS, EVT.REGS + 144));
    regs.writeBigUInt64LE(rip, 128);
    return this.ok(MSG.VCPU_SET_REGISTERS, Buffer.concat([vcpuHdr(e.vcpu), regs]));
  }
  async translate(vcpu: number, gva: bigint): Promise<bigint> {
    return (await this.ok(MSG.VCPU_TRANSLATE_GVA, Buffer.concat([vcpuHdr(vcpu), u64(gva)]))).readBigUInt64LE(0);
  }
  async readPhys(gpa: bigint, size: number): Promise<Buffer> {
    return Buffer.from(await this.ok(MSG.VM_READ_PHYSICAL, Buffer.concat([u64(gpa), u16(size), zeros(6)])));
  }
  writePhys(gpa: bigint, data: Buffer): Promise<Buffer> {
    return this.ok(MSG.VM_WRITE_PHYSICAL, Buffer.concat([u64(gpa), u16(data.length), zeros(6), data]));
  }
  /** VM_SET_PAGE_ACCESS: u16 count, padding, then { u64 gpa, u8 access, 7 padding } per entry. */
  setPageAccess(entries: Array<{ gpa: bigint; access: number }>): Promise<Buffer> {
    const parts = [u16(entries.length), zeros(6)];
    for (const e of entries) parts.push(u64(e.gpa), u8(e.access), zeros(7));
    return this.ok(MSG.VM_SET_PAGE_ACCESS, Buffer.concat(parts));
  }
  vmControlEvents(event: number, enable: boolean): Promise<Buffer> {
    return this.ok(MSG.VM_CONTROL_EVENTS, Buffer.concat([u16(event), u8(enable ? 1 : 0), zeros(5)]));
  }
}

let counter = 0;

/** A listening introspector socket; each QEMU connection becomes a RawTool after the handshake. */
export class RawListener {
  private readonly queue: RawTool[] = [];
  private waiters: Array<() => void> = [];
  private constructor(readonly path: string, private readonly server: net.Server) {
    server.on('connection', (s) => void this.accept(s));
  }

  static async listen(): Promise<RawListener> {
    const path = `/tmp/psr-${process.pid}-${++counter}-${randomBytes(2).toString('hex')}.sock`;
    const server = net.createServer();
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(path, () => resolve());
    });
    return new RawListener(path, server);
  }

  private async accept(socket: net.Socket): Promise<void> {
    socket.on('error', () => undefined);
    try {
      const hello = await acceptQemuHandshake(socket, { cookieFor: () => Buffer.from('raw-secret') });
      this.queue.push(new RawTool(socket, hello.leftover));
      for (const w of this.waiters.splice(0)) w();
    } catch {
      socket.destroy();
    }
  }

  async next(timeoutMs = 5000): Promise<RawTool> {
    const end = Date.now() + timeoutMs;
    while (this.queue.length === 0) {
      if (Date.now() > end) throw new Error('no QEMU connection');
      await new Promise<void>((r) => {
        const t = setTimeout(r, 50);
        this.waiters.push(() => {
          clearTimeout(t);
          r();
        });
      });
    }
    return this.queue.shift()!;
  }

  async close(): Promise<void> {
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
    rmSync(this.path, { force: true });
  }
}

/**
 * One simulated VM hooked to a fresh RawListener through the real handshake; returns the VM, the raw
 * tool end, and a cleanup to run after the test.
 */
export async function attachRawTool(vmOptions: SimVmOptions): Promise<{ vm: SimVm; tool: RawTool; cleanup: () => Promise<void> }> {
  const listener = await RawListener.listen();
  const vm = new SimVm(vmOptions);
  const qemu = new SimQemu(vm, { path: listener.path, key: Buffer.from('raw-secret'), reconnectSeconds: 60 });
  qemu.start();
  const tool = await listener.next();
  await qemu.waitHooked();
  return {
    vm,
    tool,
    cleanup: async () => {
      qemu.stop();
      await listener.close();
      vm.close();
    },
  };
}
