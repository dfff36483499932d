/**
 * The ask-central hand encoder (src/link/event-wire.ts) against the generated decoder: for every vCPU
 * event kind, the bytes it writes decode (`LinkRequest.decode`) to exactly the `KvmiEvent` that the object
 * path (`eventFromFrame`, which goes through the kvmi library's `decodeEvent`) builds from the same frame.
 * The arch part is filled with pseudo-random bytes, so u64 values have their high bits set and every
 * segment flag byte is exercised.
 */
import { describe, expect, it } from 'vitest';
import { encodeVcpuEvent, structs, VcpuEventView, type EventKey } from '@periscope/kvmi';
import { EventDisposition, LinkRequest } from '@periscope/contracts';
import { eventFromFrame } from '../../src/link/convert.js';
import { heldEventEncodable, writeHeldEventRequest } from '../../src/link/event-wire.js';
import { PbWriter } from '../../src/link/wire.js';

const HIGH = 0xfedcba9876543210n;
const DATA: Partial<Record<EventKey, Record<string, unknown>>> = {
  PAUSE: undefined,
  HYPERCALL: undefined,
  BREAKPOINT: { gpa: HIGH, insn_len: 1 },
  CR: { cr: 4, old_value: 0x3406f0n, new_value: HIGH },
  TRAP: { nr: 14, error_code: 0xfffffff0, address: HIGH },
  XSETBV: { xcr: 0, old_value: 7n, new_value: HIGH },
  DESCRIPTOR: { descriptor: 1, write: 1 },
  MSR: { msr: 0xc0000082, old_value: HIGH, new_value: 0n },
  PF: { gva: HIGH, gpa: 0x1000n, access: 2 },
  SINGLESTEP: { failed: 1 },
};

function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = Math.imul(a ^ (a >>> 15), a | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) & 0xff;
  };
}

function frameOf(key: EventKey, seed: number, commonSize?: number): Buffer {
  const frame = encodeVcpuEvent({
    event: key,
    seq: 0xfffffff0 - seed,
    vcpu: 3,
    arch: structs.kvmi_vcpu_event_arch.zero(),
    ...(DATA[key] ? { data: DATA[key] } : {}),
    ...(commonSize ? { commonSize } : {}),
  });
  // Random bytes over regs, sregs and msrs (not the mode byte).
  const rnd = prng(seed);
  const arch = 8 + structs.kvmi_event_hdr.size + structs.kvmi_vcpu_event.field('arch').offset;
  const regs = arch + structs.kvmi_vcpu_event_arch.field('regs').offset;
  for (let i = regs; i < arch + structs.kvmi_vcpu_event_arch.size; i++) frame[i] = rnd();
  frame[arch] = 8;
  return frame;
}

describe('agent link: hand-encoded held events', () => {
  for (const key of Object.keys(DATA) as EventKey[]) {
    it(`${key}: decodes to what eventFromFrame builds`, () => {
      for (const commonSize of [undefined, 560]) {
        const frame = frameOf(key, key.length * 31 + (commonSize ?? 0));
        const view = new VcpuEventView();
        expect(view.reset(frame)).toBe(true);
        expect(heldEventEncodable(view.eventId)).toBe(true);
        const uuid = Buffer.from('00112233445566778899aabbccddeeff', 'hex');
        const receivedMs = 1_795_000_000_123.456;
        const w = new PbWriter(16);
        writeHeldEventRequest(w, view.frame, view.eventId, view.specificOffset, {
          streamSeq: 300,
          hostId: 'host-1',
          vmUuid: uuid,
          sessionGeneration: 1_795_000_000_001, // a wall-clock session generation (> 2^32)
          receivedUnixNs: Math.floor(receivedMs * 1e6),
          verdictDeadlineUnixNs: Math.floor((receivedMs + 5) * 1e6),
          disposition: EventDisposition.EVENT_DISPOSITION_HELD,
          ruleId: 'rule-ü',
          policyVersion: 12,
        });
        const msg = LinkRequest.decode(w.take());
        expect(msg.streamSeq).toBe(300n);
        expect(msg.message?.$case).toBe('eventBatch');
        const events = msg.message?.$case === 'eventBatch' ? msg.message.value.events : [];
        expect(events).toHaveLength(1);
        const expected = eventFromFrame(frame, {
          hostId: 'host-1',
          vmUuid: uuid,
          sessionGeneration: 1_795_000_000_001n,
          receivedUnixNs: BigInt(Math.floor(receivedMs * 1e6)),
          repliedUnixNs: 0n,
          disposition: EventDisposition.EVENT_DISPOSITION_HELD,
          verdictDeadlineUnixNs: BigInt(Math.floor((receivedMs + 5) * 1e6)),
          ruleId: 'rule-ü',
          policyVersion: 12n,
        });
        expect(events[0]).toEqual(expected);
        expect(events[0]!.payload?.$case).toBeDefined();
      }
    });
  }
});
