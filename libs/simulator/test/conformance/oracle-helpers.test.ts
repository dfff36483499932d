/**
 * The suite's hand-written byte builders (support/bytes.ts) checked against the C fixture generator's
 * frames (golden-frames.json) and the hand-typed frames (hand-written-frames.json). If a builder is
 * wrong, these fail before any simulator test can pass by agreeing with a wrong expectation.
 */
import { describe, expect, it } from 'vitest';

import {
  E, EV, ID, eventReply, frame, getRegistersReplyData, le16, le32, le64, maskEventPadding, patchSeq, reply, specific, u8, vcmd,
  vcpuEventFrame, vmEventUnhook, zeros,
} from './support/bytes.js';
import { archOfFixture, big, golden, handWritten, regsOf, sregsOf } from './support/oracles.js';

type J = Record<string, unknown>;

describe('hand-written builders reproduce the C oracle', () => {
  const eventSpecific: Record<string, (s: J) => string> = {
    'event-pause': () => '',
    'event-hypercall': () => '',
    'event-breakpoint': (s) => specific.breakpoint(big(s['gpa']), s['insn_len'] as number),
    'event-breakpoint-gpa-unknown': (s) => specific.breakpoint(big(s['gpa']), s['insn_len'] as number),
    'event-cr': (s) => specific.cr(s['cr'] as number, big(s['old_value']), big(s['new_value'])),
    'event-trap': (s) => specific.trap(s['nr'] as number, s['error_code'] as number, big(s['address'])),
    'event-xsetbv': (s) => specific.xsetbv(s['xcr'] as number, big(s['old_value']), big(s['new_value'])),
    'event-descriptor': (s) => specific.descriptor(s['descriptor'] as number, s['write'] as number),
    'event-msr': (s) => specific.msr(s['msr'] as number, big(s['old_value']), big(s['new_value'])),
    'event-pf': (s) => specific.pf(big(s['gva']), big(s['gpa']), s['access'] as number),
    'event-singlestep': (s) => specific.singlestep(s['failed'] as number),
  };
  for (const [name, spec] of Object.entries(eventSpecific)) {
    it(`vCPU event frame: ${name}`, () => {
      const g = golden(name);
      const f = g.fields;
      const ve = f['vcpu_event'] as J;
      const built = vcpuEventFrame({
        seq: g.seq!, event: f['event'] as number, vcpu: ve['vcpu'] as number, arch: archOfFixture(ve['arch'] as J),
        specific: spec((f['specific'] as J | null) ?? {}),
      });
      // The golden frames carry junk in the padding KVM does not clear: equal once that is masked.
      expect(maskEventPadding(built)).toBe(maskEventPadding(g.hex));
    });
  }

  it('the padding mask covers exactly the junk bytes of the golden events (nothing else differs)', () => {
    const g = golden('event-cr');
    const ve = g.fields['vcpu_event'] as J;
    const built = vcpuEventFrame({ seq: g.seq!, event: EV.CR, vcpu: 5, arch: archOfFixture(ve['arch'] as J), specific: specific.cr(3, 0x1234f5000n, 0x8000000abcdef000n) });
    const a = Buffer.from(built, 'hex');
    const b = Buffer.from(g.hex, 'hex');
    let differing = 0;
    for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) differing++;
    expect(differing).toBe(4 + 7 + 8 + 12); // vcpu_event.padding, arch.padding, 8 segment pads, 2 dtable pads
  });

  it('VM event UNHOOK', () => {
    const g = golden('vm-event-unhook');
    expect(vmEventUnhook(g.seq!)).toBe(g.hex);
    expect(vmEventUnhook(4)).toBe(handWritten('hw-vm-event-unhook').hex);
  });

  it('GET_REGISTERS reply', () => {
    const g = golden('vcpu-get-registers-reply');
    const f = g.fields;
    const msrs = (f['msrs'] as J[]).map((m) => ({ index: m['index'] as number, data: big(m['data']) }));
    const data = getRegistersReplyData(f['mode'] as number, regsOf(f['regs'] as J), sregsOf(f['sregs'] as J), msrs);
    expect(reply(ID.VCPU_GET_REGISTERS, g.seq!, 0, data)).toBe(g.hex);
  });

  it('commands, replies, error replies and event replies', () => {
    expect(frame(ID.GET_VERSION, 1)).toBe(golden('get-version-request').hex);
    expect(reply(ID.GET_VERSION, 1, 0, le32(1) + le32(8184) + u8(1) + zeros(7))).toBe(golden('get-version-reply').hex);
    expect(frame(ID.VM_CHECK_COMMAND, 258, le16(29) + zeros(6))).toBe(golden('vm-check-command-request').hex);
    expect(reply(ID.VM_CHECK_COMMAND, 259, E.NOENT)).toBe(golden('vm-check-command-error-enoent').hex);
    expect(vcmd(ID.VCPU_GET_INFO, 2156961968, 2)).toBe(golden('vcpu-get-info-request').hex);
    expect(vcmd(ID.VCPU_CONTROL_CR, 3504402432, 7, u8(3) + u8(1) + le16(0) + le32(0))).toBe(golden('vcpu-control-cr-request').hex);
    expect(vcmd(ID.VCPU_TRANSLATE_GVA, 1365340545, 6, le64(0xffff888012345abcn))).toBe(golden('vcpu-translate-gva-request').hex);
    expect(reply(ID.VCPU_TRANSLATE_GVA, 1365340546, 0, le64(0xffffffffffffffffn))).toBe(golden('vcpu-translate-gva-reply-untranslatable').hex);
    expect(reply(ID.VCPU_EVENT, 5, E.INVAL)).toBe(golden('event-reply-error-einval').hex);
    expect(reply(65535, 0xffffffff, E.NOSYS)).toBe(golden('unknown-id-65535-error-enosys').hex);
    expect(eventReply(1, 3, 0, EV.PAUSE)).toBe(golden('event-pause-reply-continue').hex);
    expect(eventReply(16909060, 5, 0, EV.CR, { data: le64(0x8000000abcdef000n) })).toBe(golden('event-cr-reply-continue').hex);
    expect(eventReply(2, 5, 0, EV.CR, { data: le64(0x80000000abcd1000n) })).toBe(handWritten('hw-event-cr-reply-continue-new-val').hex);
    expect(patchSeq(golden('vm-pause-vcpu-error-ebusy').hex, 7)).toBe(reply(ID.VM_PAUSE_VCPU, 7, E.BUSY));
  });
});
