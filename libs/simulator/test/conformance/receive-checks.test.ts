/**
 * Raw-frame conformance: the receive thread's checks (kvmi-v12.md §2.2, §2.3, §2.5). For vCPU messages:
 * EPERM (not for event replies) → kvmi_vcpu_hdr padding EINVAL → vCPU index EINVAL → EAGAIN (not ready),
 * including messages that fail several checks at once; unknown ids → ENOSYS; short and long payloads.
 */
import { afterEach, describe, expect, it } from 'vitest';

import { E, EV, ID, eventReply, frame, hexOf, idOf, le16, le32, le64, maskEventPadding, reply, req, u8, vcpuEventFrame, vhdr } from './support/bytes.js';
import { golden, handWritten } from './support/oracles.js';
import { Rig, archOf, closeRigs } from './support/rig.js';

afterEach(closeRigs);

const ALL_BUT = (...ids: number[]): number[] => Array.from({ length: 30 }, (_, i) => i).filter((i) => !ids.includes(i));
/** VCPU_GET_CPUID with a raw kvmi_vcpu_hdr (leaf 0). */
const cpuidRaw = (seq: number, hdrHex: string): string => frame(ID.VCPU_GET_CPUID, seq, hdrHex + le32(0) + le32(0));
/** VCPU_GET_INFO with a raw payload. */
const infoRaw = (seq: number, payload: string): string => frame(ID.VCPU_GET_INFO, seq, payload);
const LEAF0 = le32(0xd) + hexOf(Buffer.from('GenuntelineI', 'latin1'));

describe('§2.5 vCPU message checks, in order', () => {
  // 2 vCPUs: vCPU 1 is an AP that is not up (mp_state UNINITIALIZED → not ready). VCPU_GET_INFO (3) disallowed.
  const start = (): Promise<Rig> => Rig.start({ vm: { vcpus: 2 }, qemu: { allowCommands: ALL_BUT(ID.VCPU_GET_INFO) } });

  it('EPERM first: a disallowed command failing every other check too gets EPERM', async () => {
    const r = await start();
    const cases = [vhdr(0), vhdr(0, 1, 1), vhdr(9), vhdr(1), vhdr(9, 0xffff, 0xffffffff), vhdr(1, 1, 0)];
    for (const [i, h] of cases.entries()) expect(await r.conn.call(infoRaw(i + 1, h))).toBe(reply(ID.VCPU_GET_INFO, i + 1, E.PERM));
  });

  it('then header padding (EINVAL) before the vCPU index and before readiness', async () => {
    const r = await start();
    const cases: Array<[string, number]> = [
      [vhdr(0, 1, 0), E.INVAL],
      [vhdr(0, 0, 0x80000000), E.INVAL],
      [vhdr(1, 1, 0), E.INVAL], // bad padding + not ready
      [vhdr(5, 0, 1), E.INVAL], // bad padding + bad index
      [vhdr(1, 0xffff, 0xffffffff), E.INVAL],
    ];
    for (const [i, [h, errno]] of cases.entries()) expect(await r.conn.call(cpuidRaw(i + 1, h))).toBe(reply(ID.VCPU_GET_CPUID, i + 1, errno));
  });

  it('then the vCPU index (EINVAL for vcpu ≥ online vCPUs), then readiness (EAGAIN), then the command runs', async () => {
    const r = await start();
    const cases: Array<[string, number]> = [
      [vhdr(2), E.INVAL],
      [vhdr(0xffff), E.INVAL],
      [vhdr(256), E.INVAL],
      [vhdr(1), E.AGAIN],
    ];
    for (const [i, [h, errno]] of cases.entries()) expect(await r.conn.call(cpuidRaw(i + 1, h))).toBe(reply(ID.VCPU_GET_CPUID, i + 1, errno));
    expect(await r.conn.call(cpuidRaw(9, vhdr(0)))).toBe(reply(ID.VCPU_GET_CPUID, 9, 0, LEAF0));
    r.vm.bringUpVcpu(1);
    expect(await r.conn.call(cpuidRaw(10, vhdr(1)))).toBe(reply(ID.VCPU_GET_CPUID, 10, 0, LEAF0));
  });

  it('the hand-written GET_INFO for vcpu 256 gets EINVAL; the golden EAGAIN / EINVAL error frames', async () => {
    const r = await Rig.start({ vm: { vcpus: 3 } });
    expect(await r.conn.call(handWritten('hw-vcpu-get-info-request-vcpu-256').hex)).toBe(reply(ID.VCPU_GET_INFO, 52719, E.INVAL));
    const g = golden('vcpu-get-info-request'); // vcpu 2: an AP that is not up
    expect(await r.conn.call(g.hex)).toBe(reply(ID.VCPU_GET_INFO, g.seq!, E.AGAIN));
  });

  it('a payload shorter than kvmi_vcpu_hdr reads as "vCPU 0, padding 0" (missing bytes are zeros, §2.2)', async () => {
    const r = await start();
    expect(await r.conn.call(frame(ID.VCPU_GET_CPUID, 1))).toBe(reply(ID.VCPU_GET_CPUID, 1, 0, LEAF0)); // size 0
    expect(await r.conn.call(frame(ID.VCPU_GET_CPUID, 2, le16(1)))).toBe(reply(ID.VCPU_GET_CPUID, 2, E.AGAIN)); // vcpu 1
    expect(await r.conn.call(frame(ID.VCPU_GET_CPUID, 3, le16(0) + u8(1)))).toBe(reply(ID.VCPU_GET_CPUID, 3, E.INVAL)); // padding1 low byte
    expect(await r.conn.call(frame(ID.VCPU_GET_CPUID, 4, le16(7)))).toBe(reply(ID.VCPU_GET_CPUID, 4, E.INVAL)); // vcpu 7
  });

  it('event replies (id 1) are exempt from the command mask: the other checks answer with id 1, size 8 (golden frames)', async () => {
    const r = await Rig.start({ vm: { vcpus: 2 }, qemu: { allowCommands: [] } });
    expect(await r.conn.call(eventReply(5, 0, 0, EV.PAUSE, { hdrPadding1: 1 }))).toBe(golden('event-reply-error-einval').hex);
    expect(await r.conn.call(eventReply(6, 1, 0, EV.PAUSE))).toBe(golden('event-reply-error-eagain').hex);
    expect(await r.conn.call(eventReply(9, 0, 0, EV.CR, { hdrPadding1: 0x100 }))).toBe(handWritten('hw-event-reply-error-einval').hex);
    expect(await r.conn.call(eventReply(10, 2, 0, EV.PAUSE))).toBe(reply(ID.VCPU_EVENT, 10, E.INVAL));
    expect(await r.conn.call(eventReply(11, 1, 0, EV.PAUSE, { hdrPadding1: 1 }))).toBe(reply(ID.VCPU_EVENT, 11, E.INVAL)); // padding + not ready
    expect(await r.conn.call(eventReply(12, 9, 0, EV.PAUSE, { hdrPadding1: 1 }))).toBe(reply(ID.VCPU_EVENT, 12, E.INVAL)); // padding + index
    // none of these reached a vCPU: no hard error, the connection is up
    expect(await r.conn.call(golden('get-version-request').hex)).toBe(golden('get-version-reply').hex);
    expect(r.vm.stats.hardErrors).toBe(0);
  });

  it('an event reply with bad kvmi_vcpu_hdr padding to a waiting vCPU is refused (EINVAL) and the vCPU keeps waiting', async () => {
    const r = await Rig.start();
    expect(await r.conn.call(req.pause(1, 0))).toBe(reply(ID.VM_PAUSE_VCPU, 1, 0));
    const ev = await r.conn.next();
    expect(maskEventPadding(ev)).toBe(vcpuEventFrame({ seq: 1, event: EV.PAUSE, vcpu: 0, arch: archOf(r.vcpu(0)) }));
    expect(await r.conn.call(eventReply(1, 0, 0, EV.PAUSE, { hdrPadding1: 1 }))).toBe(reply(ID.VCPU_EVENT, 1, E.INVAL));
    expect(r.vcpu(0).waitingFor).toMatchObject({ event: 'PAUSE', seq: 1 });
    r.conn.send(eventReply(1, 0, 0, EV.PAUSE));
    expect(await r.vcpu(0).descriptorAccess(1, false)).toMatchObject({ outcome: 'completed' });
    expect(r.conn.isClosed).toBe(false);
  });

  it('a waiting vCPU is ready (§2.5 step 4): commands to it run while it waits', async () => {
    const r = await Rig.start({ vm: { vcpus: 2 } });
    expect(await r.conn.call(req.getInfo(1, 0))).toBe(reply(ID.VCPU_GET_INFO, 1, 0, le64(2_500_000_000n)));
    expect(await r.conn.call(req.pause(2, 0))).toBe(reply(ID.VM_PAUSE_VCPU, 2, 0));
    await r.conn.next();
    expect(await r.conn.call(req.getInfo(3, 0))).toBe(reply(ID.VCPU_GET_INFO, 3, 0, le64(2_500_000_000n)));
    r.conn.send(eventReply(1, 0, 0, EV.PAUSE));
  });
});

describe('every command: the common errors (§2.4 "common meanings", §9.2)', () => {
  const VCPU_IDS = [3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29];
  const VM_IDS = [8, 10, 12, 14, 16, 18, 20, 22, 24];
  /** A payload that fits every command's struct (all zeros after the vCPU header). */
  const body = (id: number): string => (id === ID.VCPU_SET_XSAVE ? '00'.repeat(4096) : '00'.repeat(152));

  it('every vCPU command: EPERM when disallowed; EINVAL for header padding and for a bad index; EAGAIN for an AP not up', async () => {
    const denied = await Rig.start({ vm: { vcpus: 2 }, qemu: { allowCommands: [] } });
    const r = await Rig.start({ vm: { vcpus: 2 } });
    for (const id of VCPU_IDS) {
      expect(await denied.conn.call(frame(id, id, vhdr(0) + body(id)))).toBe(reply(id, id, E.PERM));
      expect(await r.conn.call(frame(id, 1000 + id, vhdr(0, 0, 1) + body(id)))).toBe(reply(id, 1000 + id, E.INVAL));
      expect(await r.conn.call(frame(id, 2000 + id, vhdr(2) + body(id)))).toBe(reply(id, 2000 + id, E.INVAL));
      expect(await r.conn.call(frame(id, 3000 + id, vhdr(1) + body(id)))).toBe(reply(id, 3000 + id, E.AGAIN));
    }
    expect(r.vm.stats.hardErrors + denied.vm.stats.hardErrors).toBe(0);
  });

  it('every VM command but the three always-allowed ones: EPERM when disallowed', async () => {
    const denied = await Rig.start({ qemu: { allowCommands: [] } });
    for (const id of VM_IDS) expect(await denied.conn.call(frame(id, id, '00'.repeat(24)))).toBe(reply(id, id, E.PERM));
    for (const id of [ID.GET_VERSION, ID.VM_CHECK_COMMAND, ID.VM_CHECK_EVENT]) {
      expect(idOf(await denied.conn.call(frame(id, id, '00'.repeat(8))))).toBe(id);
    }
    expect(denied.conn.log.filter((f) => f.slice(16, 24) === le32(-E.PERM))).toHaveLength(VM_IDS.length);
  });
});

describe('§2.3 unknown ids and disallowed commands', () => {
  it('unknown ids get ENOSYS (golden frames: 26, 28, 31, 65535; hand-written: 26)', async () => {
    const r = await Rig.start();
    for (const name of ['unknown-id-26-error-enosys', 'unknown-id-28-error-enosys', 'unknown-id-31-error-enosys', 'unknown-id-65535-error-enosys']) {
      const g = golden(name);
      const body = g.id! % 2 === 1 ? vhdr(0) : '';
      expect(await r.conn.call(frame(g.id!, g.seq!, body))).toBe(g.hex);
    }
    const hw = handWritten('hw-unknown-id-26-error-enosys');
    expect(await r.conn.call(frame(26, hw.seq!))).toBe(hw.hex);
    for (const [i, id] of [0, 30, 64, 0x8001].entries()) expect(await r.conn.call(frame(id, 40 + i))).toBe(reply(id, 40 + i, E.NOSYS));
  });

  it('a disallowed VM command gets EPERM before its own argument checks', async () => {
    const r = await Rig.start({ qemu: { allowCommands: [] } });
    expect(await r.conn.call(req.readPhys(1, 0x1000n, 0, 1))).toBe(reply(ID.VM_READ_PHYSICAL, 1, E.PERM));
    expect(await r.conn.call(req.pause(2, 99, 7))).toBe(reply(ID.VM_PAUSE_VCPU, 2, E.PERM));
    expect(await r.conn.call(req.setPageAccess(3, [], 0, 1))).toBe(reply(ID.VM_SET_PAGE_ACCESS, 3, E.PERM));
    expect(await r.conn.call(req.readPhys(4, 0x1000n, 4))).toBe(reply(ID.VM_READ_PHYSICAL, 4, E.PERM));
  });
});

describe('§2.2 payload length rules for fixed-size commands', () => {
  it('a short payload reads as zeros; bytes beyond the struct are ignored', async () => {
    const r = await Rig.start();
    // VM_CHECK_EVENT with 2 bytes (id 15, padding missing) and with 16 bytes (8 bytes of trailing junk)
    expect(await r.conn.call(frame(ID.VM_CHECK_EVENT, 1, le16(15)))).toBe(reply(ID.VM_CHECK_EVENT, 1, 0));
    expect(await r.conn.call(frame(ID.VM_CHECK_EVENT, 2, le16(15) + le16(0) + le32(0) + 'ff'.repeat(8)))).toBe(reply(ID.VM_CHECK_EVENT, 2, 0));
    // VM_READ_PHYSICAL cut after gpa: size reads as 0 → EINVAL
    expect(await r.conn.call(frame(ID.VM_READ_PHYSICAL, 3, le64(0x1000n)))).toBe(reply(ID.VM_READ_PHYSICAL, 3, E.INVAL));
    // VCPU_TRANSLATE_GVA with an empty struct: gva 0 → gpa 0 (identity map)
    expect(await r.conn.call(frame(ID.VCPU_TRANSLATE_GVA, 4, vhdr(0)))).toBe(reply(ID.VCPU_TRANSLATE_GVA, 4, 0, le64(0)));
    // VCPU_CONTROL_CR with trailing junk after the 8-byte struct
    expect(await r.conn.call(frame(ID.VCPU_CONTROL_CR, 5, vhdr(0) + u8(4) + u8(1) + le16(0) + le32(0) + 'ee'.repeat(8)))).toBe(reply(ID.VCPU_CONTROL_CR, 5, 0));
  });
});
