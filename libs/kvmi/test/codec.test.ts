/**
 * Codec behaviour: kernel-side validation in the kernel's order (§2.2, §2.5, §10), event-reply checks
 * (§5.3), tool-side event decoding rules, and property tests (round trips; random bytes give only
 * typed errors). Frames that must be *invalid* are built with raw Buffer writes at offsets written
 * from the sheet, not with the encoder.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import {
  KvmiError,
  VcpuEventView,
  checkEventReply,
  commands,
  decodeEvent,
  decodeReply,
  encodeCommand,
  encodeErrorReply,
  encodeEventReply,
  encodeReply,
  encodeVcpuEvent,
  encodeVmEvent,
  events,
  receiveKernelMessage,
  runCommandChecks,
  structs,
  writeEventReply,
  type CommandKey,
  type KernelState,
  type Layout,
} from '@periscope/kvmi';
import { arbCommandInput, arbLayout } from './support/arbitraries.js';

/** A raw frame: header {id, size, seq} + payload, laid out from the sheet (§2.1), not from the library. */
function raw(id: number, seq: number, payload: Buffer | number[]): Buffer {
  const p = Buffer.isBuffer(payload) ? payload : Buffer.from(payload);
  const h = Buffer.alloc(8);
  h.writeUInt16LE(id, 0);
  h.writeUInt16LE(p.length, 2);
  h.writeUInt32LE(seq, 4);
  return Buffer.concat([h, p]);
}
function vcpuHdr(vcpu: number, pad1 = 0, pad2 = 0): Buffer {
  const b = Buffer.alloc(8);
  b.writeUInt16LE(vcpu, 0);
  b.writeUInt16LE(pad1, 2);
  b.writeUInt32LE(pad2, 4);
  return b;
}

function kernel(over: Partial<KernelState> = {}): KernelState {
  return {
    isCommandAllowed: () => true,
    isEventAllowed: () => true,
    vcpuCount: () => 4,
    isVcpuReady: () => true,
    extensionsEnabled: () => true,
    ...over,
  };
}
const noState = () => false;

function sampleArch(): ReturnType<typeof structs.kvmi_vcpu_event_arch.zero> {
  return fc.sample(arbLayout(structs.kvmi_vcpu_event_arch as Layout<unknown>), { seed: 7, numRuns: 1 })[0] as never;
}

describe('kernel side: receive-thread order for vCPU messages (§2.5)', () => {
  const CONTROL_CR = 13;
  const body = Buffer.from([4, 1, 0, 0, 0, 0, 0, 0]); // cr 4, enable 1

  it('EPERM wins over bad header padding, bad vCPU index and not-ready', () => {
    const f = raw(CONTROL_CR, 9, Buffer.concat([vcpuHdr(99, 1, 1), body]));
    const m = receiveKernelMessage(f, kernel({ isCommandAllowed: () => false, isVcpuReady: () => false }));
    expect(m).toEqual({ kind: 'error-reply', id: CONTROL_CR, seq: 9, errno: 1 });
  });
  it('header padding EINVAL wins over vCPU index and not-ready', () => {
    const f = raw(CONTROL_CR, 10, Buffer.concat([vcpuHdr(99, 0, 5), body]));
    expect(receiveKernelMessage(f, kernel({ isVcpuReady: () => false }))).toEqual({ kind: 'error-reply', id: CONTROL_CR, seq: 10, errno: 22 });
  });
  it('vCPU index EINVAL wins over not-ready', () => {
    const f = raw(CONTROL_CR, 11, Buffer.concat([vcpuHdr(4), body]));
    expect(receiveKernelMessage(f, kernel({ isVcpuReady: () => false }))).toEqual({ kind: 'error-reply', id: CONTROL_CR, seq: 11, errno: 22 });
  });
  it('EAGAIN for a vCPU that is not ready', () => {
    const f = raw(CONTROL_CR, 12, Buffer.concat([vcpuHdr(3), body]));
    expect(receiveKernelMessage(f, kernel({ isVcpuReady: (v) => v !== 3 }))).toEqual({ kind: 'error-reply', id: CONTROL_CR, seq: 12, errno: 11 });
  });
  it('event replies are exempt from the command mask but not from the header checks', () => {
    const reply = Buffer.concat([vcpuHdr(1), Buffer.alloc(8)]);
    const ok = receiveKernelMessage(raw(1, 5, reply), kernel({ isCommandAllowed: () => false }));
    expect(ok.kind).toBe('event-reply');
    const bad = receiveKernelMessage(raw(1, 5, Buffer.concat([vcpuHdr(7), Buffer.alloc(8)])), kernel());
    expect(bad).toEqual({ kind: 'error-reply', id: 1, seq: 5, errno: 22 });
  });
  it('a vCPU message shorter than the vCPU header reads as vCPU 0 with zero padding', () => {
    const m = receiveKernelMessage(raw(3, 1, [0, 0]), kernel()); // VCPU_GET_INFO, 2 bytes
    expect(m.kind === 'command' && m.vcpu).toBe(0);
  });
  it('unknown ids (and ids whose parity matches no handler) get ENOSYS', () => {
    for (const id of [22 + 100, 31, 26, 28]) {
      expect(receiveKernelMessage(raw(id, 3, []), kernel())).toMatchObject({ kind: 'error-reply', errno: 1000 });
    }
  });
  it('seed extensions: answered when enabled, ENOSYS on a pure v12 kernel', () => {
    expect(receiveKernelMessage(raw(22, 1, []), kernel()).kind).toBe('command');
    expect(receiveKernelMessage(raw(24, 1, []), kernel({ extensionsEnabled: () => false }))).toMatchObject({ errno: 1000 });
  });
  it('always-allowed commands ignore the command mask', () => {
    for (const id of [2, 4, 6]) expect(receiveKernelMessage(raw(id, 1, Buffer.alloc(8)), kernel({ isCommandAllowed: () => false })).kind).toBe('command');
    expect(receiveKernelMessage(raw(8, 1, []), kernel({ isCommandAllowed: () => false }))).toMatchObject({ errno: 1 });
  });
  it('payload size > 8184 is a hard error', () => {
    const h = Buffer.alloc(8);
    h.writeUInt16LE(2, 0);
    h.writeUInt16LE(8185, 2);
    expect(receiveKernelMessage(Buffer.concat([h, Buffer.alloc(8185)]), kernel()).kind).toBe('hard-error');
  });
});

describe('kernel side: payload length rules (§2.2, §10)', () => {
  it('a short fixed-size command is zero-filled and extra bytes are ignored', () => {
    const short = receiveKernelMessage(raw(12, 1, [0x00, 0x10, 0, 0]), kernel()); // READ_PHYSICAL, 4 of 16 bytes
    expect(short.kind === 'command' && short.request).toMatchObject({ gpa: 0x1000n, size: 0 });
    const long = receiveKernelMessage(raw(4, 1, [22, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]), kernel()); // CHECK_COMMAND + 2 extra
    expect(long.kind === 'command' && long.request).toEqual({ id: 22 });
    expect(long.kind === 'command' && long.paddingZero).toBe(true);
  });
  it('VM_WRITE_PHYSICAL whose data does not fit is a hard error', () => {
    const p = Buffer.alloc(16 + 3);
    p.writeBigUInt64LE(0x2000n, 0);
    p.writeUInt16LE(4, 8); // claims 4 bytes, carries 3
    expect(receiveKernelMessage(raw(14, 1, p), kernel()).kind).toBe('hard-error');
    p.writeUInt16LE(3, 8);
    const ok = receiveKernelMessage(raw(14, 1, p), kernel());
    expect(ok.kind === 'command' && ok.request['data']).toEqual(new Uint8Array(3));
  });
  it('VM_SET_PAGE_ACCESS whose entries do not fit is a hard error', () => {
    const p = Buffer.alloc(8 + 16);
    p.writeUInt16LE(2, 0);
    expect(receiveKernelMessage(raw(20, 1, p), kernel()).kind).toBe('hard-error');
  });
  it('VCPU_GET_REGISTERS too short for nmsrs is EINVAL (not a hard error)', () => {
    const p = Buffer.concat([vcpuHdr(0), Buffer.from([2, 0, 0, 0, 0, 0, 0, 0]), Buffer.alloc(4)]); // nmsrs 2, one index
    const m = receiveKernelMessage(raw(7, 1, p), kernel());
    expect(m.kind).toBe('command');
    if (m.kind === 'command') expect(runCommandChecks(m, kernel(), noState)).toBe(22);
  });
  it('VCPU_GET_REGISTERS with nmsrs 482 is EINVAL; 481 passes the codec checks', () => {
    for (const [n, errno] of [[482, 22], [481, 0]] as const) {
      const p = Buffer.alloc(16 + 4 * n);
      p.writeUInt16LE(n, 8);
      const m = receiveKernelMessage(raw(7, 1, p), kernel());
      if (m.kind !== 'command') throw new Error('expected a command');
      expect(runCommandChecks(m, kernel(), noState)).toBe(errno);
    }
  });
  it('VCPU_SET_REGISTERS shorter than 152 bytes and VCPU_SET_XSAVE shorter than 4104 are EINVAL, checked first', () => {
    const waiting = () => true; // the EOPNOTSUPP state check would fail too; the length rule wins
    for (const [id, len] of [[9, 151], [21, 4103]] as const) {
      const m = receiveKernelMessage(raw(id, 1, Buffer.alloc(len)), kernel());
      if (m.kind !== 'command') throw new Error('expected a command');
      expect(runCommandChecks(m, kernel(), waiting)).toBe(22);
    }
  });
});

describe('kernel side: per-command checks in catalog order', () => {
  function check(id: number, payload: Buffer, st: Partial<KernelState> = {}, fails: (key: string) => boolean = () => false): number {
    const m = receiveKernelMessage(raw(id, 1, payload), kernel(st));
    if (m.kind !== 'command') throw new Error(`expected a command, got ${m.kind}`);
    return runCommandChecks(m, kernel(st), (c) => fails(c.key));
  }
  it('VM_PAUSE_VCPU: padding/wait EINVAL → EPERM → vCPU index → EBUSY', () => {
    const p = (vcpu: number, wait: number, pad = 0) => { const b = Buffer.alloc(8); b.writeUInt16LE(vcpu, 0); b[2] = wait; b[3] = pad; return b; };
    expect(check(16, p(9, 2), { isEventAllowed: () => false }, () => true)).toBe(22);
    expect(check(16, p(9, 1, 1), { isEventAllowed: () => false }, () => true)).toBe(22);
    expect(check(16, p(9, 1), { isEventAllowed: () => false }, () => true)).toBe(1);
    expect(check(16, p(9, 1), {}, (k) => k === 'vcpu-index' || k === 'pause-limit')).toBe(22);
    expect(check(16, p(1, 1), {}, (k) => k === 'pause-limit')).toBe(16);
    expect(check(16, p(1, 1))).toBe(0);
  });
  it('VCPU_INJECT_EXCEPTION: EPERM (TRAP disallowed) → padding EINVAL → EBUSY', () => {
    const p = (pad: number) => { const b = Buffer.alloc(16); b[0] = 14; b[1] = pad; return Buffer.concat([vcpuHdr(0), b]); };
    expect(check(15, p(1), { isEventAllowed: (e) => e !== 9 }, () => true)).toBe(1);
    expect(check(15, p(1), {}, () => true)).toBe(22);
    expect(check(15, p(0), {}, () => true)).toBe(16);
  });
  it('VCPU_CONTROL_SINGLESTEP: EPERM → EINVAL → EOPNOTSUPP', () => {
    const p = (enable: number) => Buffer.concat([vcpuHdr(0), Buffer.from([enable, 0, 0, 0, 0, 0, 0, 0])]);
    expect(check(27, p(2), { isEventAllowed: () => false }, () => true)).toBe(1);
    expect(check(27, p(2), {}, () => true)).toBe(22);
    expect(check(27, p(1), {}, () => true)).toBe(95);
  });
  it('VCPU_CONTROL_CR: cr must be 0, 3 or 4; enable ≤ 1', () => {
    const p = (cr: number, en: number) => Buffer.concat([vcpuHdr(0), Buffer.from([cr, en, 0, 0, 0, 0, 0, 0])]);
    expect(check(13, p(2, 1))).toBe(22);
    expect(check(13, p(4, 2))).toBe(22);
    for (const cr of [0, 3, 4]) expect(check(13, p(cr, 1))).toBe(0);
  });
  it('VCPU_CONTROL_MSR: both interceptable ranges inclusive, EPERM only from the filter', () => {
    const p = (msr: number) => { const b = Buffer.alloc(8); b[0] = 1; b.writeUInt32LE(msr, 4); return Buffer.concat([vcpuHdr(0), b]); };
    for (const msr of [0, 0x1fff, 0xc0000000, 0xc0001fff]) expect(check(25, p(msr))).toBe(0);
    for (const msr of [0x2000, 0xbfffffff, 0xc0002000]) expect(check(25, p(msr))).toBe(22);
    expect(check(25, p(0xc0000082), {}, (k) => k === 'msr-filter')).toBe(1);
  });
  it('VM_READ_PHYSICAL: size 0, > 4096 or crossing a page is EINVAL', () => {
    const p = (gpa: bigint, size: number) => { const b = Buffer.alloc(16); b.writeBigUInt64LE(gpa, 0); b.writeUInt16LE(size, 8); return b; };
    expect(check(12, p(0x1000n, 0))).toBe(22);
    expect(check(12, p(0x1000n, 4097))).toBe(22);
    expect(check(12, p(0x1ff8n, 9))).toBe(22);
    expect(check(12, p(0x1ff8n, 8))).toBe(0);
    expect(check(12, p(0x1000n, 4096))).toBe(0);
  });
  it('VCPU_CONTROL_EVENTS: an id that is not a vCPU event is EINVAL (UNHOOK, unknown)', () => {
    const p = (ev: number) => { const b = Buffer.alloc(8); b.writeUInt16LE(ev, 0); b[2] = 1; return Buffer.concat([vcpuHdr(0), b]); };
    expect(check(5, p(0))).toBe(22);
    expect(check(5, p(2))).toBe(22);
    expect(check(5, p(17))).toBe(0);
  });
  it('non-zero padding in a command struct is EINVAL, not a hard error', () => {
    const b = Buffer.alloc(8); b.writeUInt16LE(22, 0); b[5] = 1;
    expect(check(4, b)).toBe(22);
  });
});

describe('kernel side: event replies (§5.3)', () => {
  const cr = events.CR;
  const reply = (action: number, opts: { pad?: number; data?: Buffer } = {}) => {
    const r = Buffer.alloc(8);
    r[0] = action;
    r[1] = cr.id;
    r[4] = opts.pad ?? 0;
    return Buffer.concat([vcpuHdr(0), r, opts.data ?? Buffer.alloc(0)]);
  };
  const nv = (v: bigint) => { const b = Buffer.alloc(8); b.writeBigUInt64LE(v); return b; };
  const waiting = { seq: 40, event: cr };

  it('a valid CR reply carries new_val', () => {
    expect(checkEventReply({ seq: 40, payload: reply(0, { data: nv(0x80050033n) }) }, waiting)).toEqual({ kind: 'reply', action: 'CONTINUE', newVal: 0x80050033n });
  });
  it('short reply data is zero-filled: a CR reply without new_val writes 0', () => {
    expect(checkEventReply({ seq: 40, payload: reply(0) }, waiting)).toEqual({ kind: 'reply', action: 'CONTINUE', newVal: 0n });
    expect(checkEventReply({ seq: 40, payload: reply(0, { data: Buffer.from([0x33, 0x00]) }) }, waiting)).toEqual({ kind: 'reply', action: 'CONTINUE', newVal: 0x33n });
  });
  it('hard errors: too much data, padding, wrong seq, not waiting, short header', () => {
    expect(checkEventReply({ seq: 40, payload: reply(0, { data: Buffer.alloc(9) }) }, waiting).kind).toBe('hard-error');
    expect(checkEventReply({ seq: 40, payload: reply(0, { pad: 1, data: nv(1n) }) }, waiting).kind).toBe('hard-error');
    expect(checkEventReply({ seq: 41, payload: reply(0, { data: nv(1n) }) }, waiting).kind).toBe('hard-error');
    expect(checkEventReply({ seq: 40, payload: reply(0, { data: nv(1n) }) }, null).kind).toBe('hard-error');
    expect(checkEventReply({ seq: 40, payload: Buffer.alloc(15) }, waiting).kind).toBe('hard-error');
    // Any data at all for an event without reply data.
    expect(checkEventReply({ seq: 3, payload: reply(0, { data: Buffer.alloc(1) }) }, { seq: 3, event: events.PF }).kind).toBe('hard-error');
  });
  it('an action the event does not accept is reported for the not-CONTINUE path', () => {
    expect(checkEventReply({ seq: 40, payload: reply(1, { data: nv(1n) }) }, waiting)).toEqual({ kind: 'unsupported-action', action: 1 });
    expect(checkEventReply({ seq: 40, payload: reply(7, { data: nv(1n) }) }, waiting)).toEqual({ kind: 'unsupported-action', action: 7 });
    expect(checkEventReply({ seq: 3, payload: reply(1) }, { seq: 3, event: events.PF })).toEqual({ kind: 'reply', action: 'RETRY', newVal: null });
  });
  it('the reply `event` field is not checked', () => {
    const p = reply(0, { data: nv(5n) });
    p[9] = 99;
    expect(checkEventReply({ seq: 40, payload: p }, waiting).kind).toBe('reply');
  });
});

describe('tool side: events and replies', () => {
  const arch = sampleArch();
  it('finds the specific struct at 8 + kvmi_vcpu_event.size (a larger common part)', () => {
    const f = encodeVcpuEvent({ event: 'PF', seq: 77, vcpu: 2, arch, data: { gva: 0xffffffff81000000n, gpa: 0x1000000n, access: 2 }, commonSize: 560 });
    const e = decodeEvent(f);
    expect(e).toMatchObject({ kind: 'vcpu-event', seq: 77, vcpu: 2, commonSize: 560, data: { gva: 0xffffffff81000000n, gpa: 0x1000000n, access: 2 } });
    const view = new VcpuEventView();
    expect(view.reset(f)).toBe(true);
    expect(view.specificU64(structs.kvmi_vcpu_event_pf as Layout<unknown>, 'gva')).toBe(0xffffffff81000000n);
    expect(view.reg('rip')).toBe(arch.regs.rip);
    expect(view.sreg('cr4')).toBe(arch.sregs.cr4);
    expect(view.msr('lstar')).toBe(arch.msrs.lstar);
  });
  it('ignores padding KVM does not zero (§2.2)', () => {
    const f = encodeVcpuEvent({ event: 'CR', seq: 1, vcpu: 0, arch, data: { cr: 0, old_value: 1n, new_value: 0x10001n }, paddingNoise: 0xa5 });
    const zero = encodeVcpuEvent({ event: 'CR', seq: 1, vcpu: 0, arch, data: { cr: 0, old_value: 1n, new_value: 0x10001n } });
    expect(f.equals(zero)).toBe(false);
    expect(decodeEvent(f)).toEqual(decodeEvent(zero));
  });
  it('an id-1 message with an 8-byte payload is an error reply to our event reply', () => {
    expect(decodeEvent(raw(1, 12, [0xea, 0xff, 0xff, 0xff, 0, 0, 0, 0]))).toEqual({ kind: 'event-reply-error', seq: 12, errno: 22 });
  });
  it('the VM UNHOOK event', () => {
    expect(decodeEvent(encodeVmEvent(3))).toMatchObject({ kind: 'vm-event', seq: 3, event: { name: 'KVMI_VM_EVENT_UNHOOK' } });
  });
  it('refuses a CR/MSR reply without new_val and an action the event does not accept', () => {
    const target = { seq: 5, vcpu: 1, event: events.CR };
    expect(() => encodeEventReply(target, 'CONTINUE')).toThrowError(expect.objectContaining({ code: 'missing-reply-data' }));
    expect(() => encodeEventReply(target, 'RETRY', { new_val: 1n })).toThrowError(expect.objectContaining({ code: 'action-not-allowed' }));
    expect(() => encodeEventReply({ ...target, event: events.MSR }, 'CONTINUE')).toThrowError(expect.objectContaining({ code: 'missing-reply-data' }));
    expect(encodeEventReply(target, 'CONTINUE', { new_val: 7n }).length).toBe(32);
    expect(encodeEventReply({ seq: 5, vcpu: 1, event: events.PF }, 'RETRY').length).toBe(24);
  });
  it('writeEventReply writes in place without allocating a frame', () => {
    const buf = Buffer.alloc(64, 0xff);
    const n = writeEventReply(buf, 8, 0xdeadbeef, 3, events.MSR.id, 0, 0xffffffffffffffffn);
    expect(n).toBe(32);
    expect(buf.subarray(0, 8).every((b) => b === 0xff)).toBe(true);
    const m = receiveKernelMessage(buf.subarray(8, 8 + n), kernel());
    expect(m.kind).toBe('event-reply');
    if (m.kind === 'event-reply') {
      expect(checkEventReply(m, { seq: 0xdeadbeef, event: events.MSR })).toEqual({ kind: 'reply', action: 'CONTINUE', newVal: 0xffffffffffffffffn });
    }
  });
  it('error replies decode to the positive errno', () => {
    expect(decodeReply('VM_GET_INFO', encodeErrorReply(8, 4, 1))).toEqual({ ok: false, errno: 1 });
  });
  it('encoders refuse values that do not fit', () => {
    expect(() => encodeCommand('VM_READ_PHYSICAL', 1, { gpa: -1n, size: 8 })).toThrowError(KvmiError);
    expect(() => encodeCommand('VCPU_GET_INFO', 1, { vcpu: 70000 })).toThrowError(KvmiError);
    expect(() => encodeCommand('VM_WRITE_PHYSICAL', 1, { gpa: 0n, data: new Uint8Array(8200) })).toThrowError(expect.objectContaining({ code: 'message-too-large' }));
  });
});

describe('property: round trips and typed errors only', () => {
  const keys = Object.keys(commands) as CommandKey[];
  it.each(keys)('%s request: tool encoder → kernel decoder round-trips', (key) => {
    fc.assert(
      fc.property(arbCommandInput(key), fc.integer({ min: 0, max: 0xffffffff }), (input, seq) => {
        const frame = encodeCommand(key, seq, input as never);
        const vcpuCount = 0x10000;
        const m = receiveKernelMessage(frame, kernel({ vcpuCount: () => vcpuCount }));
        expect(m.kind).toBe('command');
        if (m.kind !== 'command') return;
        expect(m.seq).toBe(seq);
        expect(m.def.key).toBe(key);
        const { vcpu, ...fields } = input as Record<string, unknown>;
        if (commands[key].scope === 'vcpu') expect(m.vcpu).toBe(vcpu);
        expect(m.request).toMatchObject(fields);
      }),
      { numRuns: 60 },
    );
  });
  it.each(keys.filter((k) => commands[k].reply || 'replyTail' in commands[k]))('%s reply: kernel encoder → tool decoder round-trips', (key) => {
    const def = commands[key];
    let arb = def.reply ? arbLayout(def.reply as Layout<unknown>) : fc.constant({} as Record<string, unknown>);
    if (key === 'VM_READ_PHYSICAL') arb = fc.uint8Array({ minLength: 1, maxLength: 4096 }).map((data) => ({ data }));
    if (key === 'VCPU_GET_REGISTERS') {
      arb = fc.tuple(arb, fc.array(fc.record({ index: fc.integer({ min: 0, max: 0xffffffff }), data: fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }) }), { maxLength: 481 }))
        .map(([r, msr_entries]) => ({ ...r, msrs: { nmsrs: msr_entries.length }, msr_entries }));
    }
    fc.assert(
      fc.property(arb, (value) => {
        const frame = encodeReply(key, 9, value as never);
        expect(decodeReply(key, frame)).toEqual({ ok: true, value });
      }),
      { numRuns: 40 },
    );
  });
  it.each(Object.keys(events).filter((k) => k !== 'UNHOOK'))('%s event: kernel encoder → tool decoder round-trips', (key) => {
    const def = events[key as keyof typeof events];
    const dataArb = def.payload ? arbLayout(def.payload as Layout<unknown>) : fc.constant(null);
    fc.assert(
      fc.property(arbLayout(structs.kvmi_vcpu_event_arch as Layout<unknown>), dataArb, fc.integer({ min: 0, max: 0xffff }), (arch, data, vcpu) => {
        const frame = encodeVcpuEvent({ event: key as 'PF', seq: 1, vcpu, arch: arch as never, ...(data ? { data } : {}), paddingNoise: 0x5a });
        const e = decodeEvent(frame);
        expect(e).toMatchObject({ kind: 'vcpu-event', vcpu, arch, data });
      }),
      { numRuns: 25 },
    );
  });
  it('random bytes give only typed errors or results, never another exception', () => {
    const st = kernel({ vcpuCount: () => 2 });
    const keysWithReply = keys;
    fc.assert(
      fc.property(fc.uint8Array({ minLength: 0, maxLength: 700 }), fc.boolean(), fc.constantFrom(...keysWithReply), (bytes, fixHeader, key) => {
        const b = Buffer.from(bytes);
        if (fixHeader && b.length >= 8) b.writeUInt16LE(Math.min(b.length - 8, 8184), 2);
        const typedOnly = (fn: () => unknown) => {
          try {
            fn();
          } catch (e) {
            expect(e).toBeInstanceOf(KvmiError);
          }
        };
        typedOnly(() => decodeEvent(b));
        typedOnly(() => decodeReply(key, b));
        typedOnly(() => {
          const m = receiveKernelMessage(b, st);
          if (m.kind === 'command') runCommandChecks(m, st, () => false);
          if (m.kind === 'event-reply') checkEventReply(m, { seq: m.seq, event: events.CR });
        });
        const view = new VcpuEventView();
        if (view.reset(b)) {
          expect(typeof view.reg('rip')).toBe('bigint');
        }
      }),
      { numRuns: 3000 },
    );
  });
});

describe('catalog: hooking ioctls and dialect as data', () => {
  it('ioctl numbers follow _IOW/_IO(KVMIO=0xAE, nr, T) with the argument struct sizes (§7)', async () => {
    const { ioctls, v12 } = await import('@periscope/kvmi');
    const iow = (nr: number, size: number) => (0x40000000 | (size << 16) | (0xae << 8) | nr) >>> 0;
    const io = (nr: number) => (0xae << 8) | nr;
    expect(ioctls.HOOK.request).toBe(iow(0xc8, 24));
    expect(ioctls.UNHOOK.request).toBe(io(0xc9));
    expect(ioctls.COMMAND.request).toBe(iow(0xca, 8));
    expect(ioctls.EVENT.request).toBe(iow(0xcb, 8));
    expect(ioctls.PREUNHOOK.request).toBe(io(0xcc));
    expect(ioctls.HOOK.arg?.size).toBe(24);
    expect(v12.name).toBe('v12');
    expect(Object.keys(v12.commands).length).toBe(26);
    expect(Object.keys(v12.events).length).toBe(11);
  });
});
