/**
 * Raw-frame conformance: every VM command (kvmi-v12.md §4.1, even ids) — its success reply and every
 * documented error — as bytes written to the simulator's socket and bytes read back. Requests come
 * from golden-frames.json / hand-written-frames.json where the oracle has the exact request; the rest
 * are typed with the hand-written helpers of support/bytes.ts.
 */
import { afterEach, describe, expect, it } from 'vitest';

import { DEFAULT_HOST_PROFILE } from '../../src/index.js';
import { E, ID, frame, hexOf, le32, patchSeq, reply, req, u8, zeros } from './support/bytes.js';
import { golden, handWritten } from './support/oracles.js';
import { Rig, closeRigs } from './support/rig.js';

afterEach(closeRigs);

/** 80000 MiB of (sparse) RAM so that the golden fixtures' gpas (up to 0x123456ba80) are backed. */
const BIG = { vcpus: 8, apsOnline: true, memoryMiB: 80000 } as const;
const ALL_BUT = (...ids: number[]): number[] => Array.from({ length: 30 }, (_, i) => i).filter((i) => !ids.includes(i));
/** The golden error reply for a request of seq `seq` (fixtures.c generated it with the request's seq + 1). */
const goldenErr = (name: string, seq: number): string => patchSeq(golden(name).hex, seq);

const { readPhys, writePhys, pause, checkCommand, checkEvent, setPageAccess } = req;
const controlEvents = req.vmControlEvents;
const entry = req.pageEntry;

describe('KVMI_GET_VERSION (2)', () => {
  it('golden and hand-written requests get the oracle replies byte for byte', async () => {
    const { conn } = await Rig.start();
    expect(await conn.call(golden('get-version-request').hex)).toBe(golden('get-version-reply').hex);
    expect(await conn.call(handWritten('hw-get-version-request').hex)).toBe(handWritten('hw-get-version-reply').hex);
  });

  it('features.singlestep is 0 on a host without single-step (SVM); bytes beyond an empty request are ignored', async () => {
    const { conn } = await Rig.start({ vm: { profile: { ...DEFAULT_HOST_PROFILE, singlestep: false } } });
    expect(await conn.call(frame(ID.GET_VERSION, 9))).toBe(reply(ID.GET_VERSION, 9, 0, le32(1) + le32(8184) + u8(0) + zeros(7)));
    expect(await conn.call(frame(ID.GET_VERSION, 10, 'ff'.repeat(24)))).toBe(reply(ID.GET_VERSION, 10, 0, le32(1) + le32(8184) + u8(0) + zeros(7)));
  });
});

describe('KVMI_VM_CHECK_COMMAND (4)', () => {
  it('success for every v12 command id (golden request id 29 included), replies in request order', async () => {
    const { conn } = await Rig.start();
    expect(await conn.call(golden('vm-check-command-request').hex)).toBe(golden('vm-check-command-reply').hex);
    const ids = [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 23, 25, 27, 29];
    conn.send(...ids.map((id, i) => checkCommand(500 + i, id)));
    expect(await conn.nextN(ids.length)).toEqual(ids.map((_, i) => reply(ID.VM_CHECK_COMMAND, 500 + i, 0)));
  });

  it('ENOENT for unknown ids (golden), EINVAL for padding (checked first)', async () => {
    const { conn } = await Rig.start();
    expect(await conn.call(checkCommand(259, 26))).toBe(golden('vm-check-command-error-enoent').hex);
    for (const [i, id] of [28, 30, 31, 0x7fff, 0xffff].entries()) {
      expect(await conn.call(checkCommand(600 + i, id))).toBe(reply(ID.VM_CHECK_COMMAND, 600 + i, E.NOENT));
    }
    expect(await conn.call(checkCommand(700, 8, 1))).toBe(reply(ID.VM_CHECK_COMMAND, 700, E.INVAL));
    expect(await conn.call(checkCommand(701, 8, 0, 0x80000000))).toBe(reply(ID.VM_CHECK_COMMAND, 701, E.INVAL));
    expect(await conn.call(checkCommand(702, 26, 1))).toBe(reply(ID.VM_CHECK_COMMAND, 702, E.INVAL));
  });

  it('EPERM for a disallowed command; the always-allowed three answer 0 whatever the mask', async () => {
    const { conn } = await Rig.start({ qemu: { allowCommands: ALL_BUT(8) } });
    expect(await conn.call(checkCommand(1, 8))).toBe(reply(ID.VM_CHECK_COMMAND, 1, E.PERM));
    const none = await Rig.start({ qemu: { allowCommands: [] } });
    for (const [i, id] of [2, 4, 6].entries()) expect(await none.conn.call(checkCommand(10 + i, id))).toBe(reply(ID.VM_CHECK_COMMAND, 10 + i, 0));
    expect(await none.conn.call(checkCommand(20, 16))).toBe(reply(ID.VM_CHECK_COMMAND, 20, E.PERM));
  });

  it('the seed extension id 22 (hand-written request): known by default, ENOENT on a pure v12 kernel', async () => {
    const req = handWritten('hw-vm-check-command-id-22').hex;
    const ext = await Rig.start();
    expect(await ext.conn.call(req)).toBe(reply(ID.VM_CHECK_COMMAND, 256, 0));
    const pure = await Rig.start({ vm: { pureV12: true } });
    expect(await pure.conn.call(req)).toBe(reply(ID.VM_CHECK_COMMAND, 256, E.NOENT));
  });
});

describe('KVMI_VM_CHECK_EVENT (6)', () => {
  it('success for every event id (golden request id 15 included)', async () => {
    const { conn } = await Rig.start();
    expect(await conn.call(golden('vm-check-event-request').hex)).toBe(golden('vm-check-event-reply').hex);
    const ids = [0, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19];
    conn.send(...ids.map((id, i) => checkEvent(800 + i, id)));
    expect(await conn.nextN(ids.length)).toEqual(ids.map((_, i) => reply(ID.VM_CHECK_EVENT, 800 + i, 0)));
  });

  it('ENOENT unknown event id, EINVAL padding, EPERM disallowed (golden)', async () => {
    const { conn } = await Rig.start({ qemu: { allowEvents: [0, 1, 3, 5, 7, 9, 11, 13, 17, 19] } });
    for (const [i, id] of [2, 4, 20, 21, 0xffff].entries()) {
      expect(await conn.call(checkEvent(30 + i, id))).toBe(reply(ID.VM_CHECK_EVENT, 30 + i, E.NOENT));
    }
    expect(await conn.call(checkEvent(40, 3, 2))).toBe(reply(ID.VM_CHECK_EVENT, 40, E.INVAL));
    expect(await conn.call(checkEvent(41, 3, 0, 1))).toBe(reply(ID.VM_CHECK_EVENT, 41, E.INVAL));
    const req = golden('vm-check-event-request').hex; // event 15, disallowed here
    expect(await conn.call(req)).toBe(goldenErr('vm-check-event-error-eperm', golden('vm-check-event-request').seq!));
  });
});

describe('KVMI_VM_GET_INFO (8)', () => {
  it('vcpu_count = online vCPUs; EPERM when disallowed (golden)', async () => {
    const g = golden('vm-get-info-request');
    const { conn } = await Rig.start({ vm: { vcpus: 3 } });
    expect(await conn.call(g.hex)).toBe(reply(ID.VM_GET_INFO, g.seq!, 0, le32(3) + zeros(12)));
    const denied = await Rig.start({ qemu: { allowCommands: [] } });
    expect(await denied.conn.call(g.hex)).toBe(goldenErr('vm-get-info-error-eperm', g.seq!));
  });
});

describe('KVMI_VM_CONTROL_EVENTS (10)', () => {
  it('enables and disables UNHOOK (golden request/reply)', async () => {
    const r = await Rig.start();
    expect(await r.conn.call(golden('vm-control-events-request').hex)).toBe(golden('vm-control-events-reply').hex);
    expect(r.vm.currentHook!.unhookEventEnabled).toBe(true);
    expect(await r.conn.call(controlEvents(5, 0, 0))).toBe(reply(ID.VM_CONTROL_EVENTS, 5, 0));
    expect(r.vm.currentHook!.unhookEventEnabled).toBe(false);
  });

  it('EINVAL for padding, enable > 1 and a non-VM event id (golden); EPERM when UNHOOK is disallowed', async () => {
    const r = await Rig.start({ qemu: { allowEvents: [1, 3, 5, 7, 9, 11, 13, 15, 17, 19] } });
    const seq = golden('vm-control-events-error-einval').seq!;
    expect(await r.conn.call(controlEvents(seq, 1, 1))).toBe(golden('vm-control-events-error-einval').hex);
    expect(await r.conn.call(controlEvents(2, 0, 2))).toBe(reply(ID.VM_CONTROL_EVENTS, 2, E.INVAL));
    expect(await r.conn.call(controlEvents(3, 0, 1, 1))).toBe(reply(ID.VM_CONTROL_EVENTS, 3, E.INVAL));
    expect(await r.conn.call(controlEvents(4, 0, 1, 0, 1))).toBe(reply(ID.VM_CONTROL_EVENTS, 4, E.INVAL));
    expect(await r.conn.call(controlEvents(6, 0, 1))).toBe(reply(ID.VM_CONTROL_EVENTS, 6, E.PERM));
    expect(r.vm.currentHook!.unhookEventEnabled).toBe(false);
  });
});

describe('KVMI_VM_READ_PHYSICAL (12)', () => {
  it('golden request → golden reply (the fixture data planted in guest RAM first); a full page; hand-written request', async () => {
    const r = await Rig.start({ vm: BIG });
    const g = golden('vm-read-physical-request');
    const data = Buffer.from(golden('vm-read-physical-reply').fields['data'] as string, 'hex');
    r.vm.memory.write(0x123456ba80n, data);
    expect(await r.conn.call(g.hex)).toBe(golden('vm-read-physical-reply').hex);
    const page = Buffer.alloc(4096, 0x5a);
    page.writeUInt32LE(0xfeedface, 4092);
    r.vm.memory.write(0x5000n, page);
    const full = await r.conn.call(readPhys(2, 0x5000n, 4096));
    expect(full).toBe(reply(ID.VM_READ_PHYSICAL, 2, 0, hexOf(page)));
    expect(full.length / 2).toBe(8 + 8 + 4096);
    r.vm.memory.write(0x123456789n, Buffer.from('0123456789abcdef', 'hex'));
    expect(await r.conn.call(handWritten('hw-vm-read-physical-request').hex)).toBe(
      reply(ID.VM_READ_PHYSICAL, 4660, 0, '0123456789abcdef' + zeros(56)),
    );
    expect(await r.conn.call(readPhys(3, 0xfffn, 1))).toBe(reply(ID.VM_READ_PHYSICAL, 3, 0, '00')); // last byte of a page
  });

  it('EINVAL padding / size 0 / size > 4096 / crossing a page; ENOENT for a hole and past the end of RAM (golden)', async () => {
    const { conn } = await Rig.start(); // 64 MiB, VGA hole
    const cases: Array<[number, string, number]> = [
      [1, readPhys(1, 0x1000n, 8, 1), E.INVAL],
      [2, readPhys(2, 0x1000n, 8, 0, 1), E.INVAL],
      [3, readPhys(3, 0x1000n, 0), E.INVAL],
      [4, readPhys(4, 0x1000n, 4097), E.INVAL],
      [5, readPhys(5, 0x1ff8n, 16), E.INVAL],
      [6, readPhys(6, 0xa0000n, 8), E.NOENT],
      [7, readPhys(7, 64n << 20n, 8), E.NOENT],
    ];
    for (const [seq, req, errno] of cases) expect(await conn.call(req)).toBe(reply(ID.VM_READ_PHYSICAL, seq, errno));
    const g = golden('vm-read-physical-request'); // gpa 0x123456ba80 is past the end of 64 MiB
    expect(await conn.call(g.hex)).toBe(goldenErr('vm-read-physical-error-enoent', g.seq!));
  });
});

describe('KVMI_VM_WRITE_PHYSICAL (14)', () => {
  it('golden and hand-written requests write guest RAM and get the oracle reply', async () => {
    const r = await Rig.start({ vm: BIG });
    const g = golden('vm-write-physical-request');
    expect(await r.conn.call(g.hex)).toBe(golden('vm-write-physical-reply').hex);
    expect(hexOf(r.vm.memory.read(0x9abcdef0n, 16)!)).toBe(g.fields['data']);
    expect(await r.conn.call(handWritten('hw-vm-write-physical-4-bytes').hex)).toBe(reply(ID.VM_WRITE_PHYSICAL, 43981, 0));
    expect(hexOf(r.vm.memory.read(0x101ff0n, 4)!)).toBe('deadbeef');
  });

  it('EINVAL padding / size 0 / size > 4096 / crossing a page; ENOENT (golden): RAM untouched', async () => {
    const r = await Rig.start();
    const before = r.vm.memory.snapshotPage(1)!;
    const d8 = 'a5'.repeat(8);
    const cases: Array<[number, string, number]> = [
      [1, writePhys(1, 0x1000n, 8, d8, 1), E.INVAL],
      [2, writePhys(2, 0x1000n, 8, d8, 0, 1), E.INVAL],
      [3, writePhys(3, 0x1000n, 0, ''), E.INVAL],
      [4, writePhys(4, 0x1000n, 4097, 'a5'.repeat(4097)), E.INVAL],
      [5, writePhys(5, 0x1ffcn, 8, d8), E.INVAL],
      [6, writePhys(6, 0xb0000n, 8, d8), E.NOENT],
    ];
    for (const [seq, req, errno] of cases) expect(await r.conn.call(req)).toBe(reply(ID.VM_WRITE_PHYSICAL, seq, errno));
    expect(r.vm.memory.snapshotPage(1)!.equals(before)).toBe(true);
    const g = golden('vm-write-physical-request'); // 0x9abcdef0 is past 64 MiB
    expect(await r.conn.call(patchSeq(g.hex, 7))).toBe(reply(ID.VM_WRITE_PHYSICAL, 7, E.NOENT));
    expect(golden('vm-write-physical-error-einval').hex).toBe(reply(ID.VM_WRITE_PHYSICAL, g.seq! + 1, E.INVAL));
    expect(r.conn.isClosed).toBe(false);
  });
});

describe('KVMI_VM_PAUSE_VCPU (16)', () => {
  it('golden request (vcpu 259, wait 1) → golden reply; the request is counted', async () => {
    const r = await Rig.start({ vm: { vcpus: 260 } }); // APs not up: the PAUSE event stays pending
    expect(await r.conn.call(golden('vm-pause-vcpu-request').hex)).toBe(golden('vm-pause-vcpu-reply').hex);
    expect(r.vcpu(259).pendingPauseRequests).toBe(1);
    expect(await r.conn.call(handWritten('hw-vm-pause-vcpu').hex)).toBe(reply(ID.VM_PAUSE_VCPU, 22136, 0));
    expect(r.vcpu(1).pendingPauseRequests).toBe(1);
  });

  it('EINVAL padding / wait > 1 / bad index; EPERM when PAUSE is disallowed; checks in the order padding/wait → EPERM → index', async () => {
    const r = await Rig.start({ vm: { vcpus: 2 } });
    expect(await r.conn.call(pause(1, 0, 0, 1))).toBe(reply(ID.VM_PAUSE_VCPU, 1, E.INVAL));
    expect(await r.conn.call(pause(2, 0, 0, 0, 1))).toBe(reply(ID.VM_PAUSE_VCPU, 2, E.INVAL));
    expect(await r.conn.call(pause(3, 0, 2))).toBe(reply(ID.VM_PAUSE_VCPU, 3, E.INVAL));
    expect(await r.conn.call(pause(4, 2))).toBe(reply(ID.VM_PAUSE_VCPU, 4, E.INVAL));
    expect(await r.conn.call(golden('vm-pause-vcpu-request').hex)).toBe(reply(ID.VM_PAUSE_VCPU, golden('vm-pause-vcpu-request').seq!, E.INVAL));
    expect(r.vcpu(0).pendingPauseRequests + r.vcpu(1).pendingPauseRequests).toBe(0);
    const d = await Rig.start({ vm: { vcpus: 2 }, qemu: { allowEvents: [3, 5, 7, 9, 11, 13, 15, 17, 19] } });
    expect(await d.conn.call(pause(1, 1))).toBe(reply(ID.VM_PAUSE_VCPU, 1, E.PERM));
    expect(await d.conn.call(pause(2, 1, 2))).toBe(reply(ID.VM_PAUSE_VCPU, 2, E.INVAL)); // wait before EPERM
    expect(await d.conn.call(pause(3, 1, 0, 0, 9))).toBe(reply(ID.VM_PAUSE_VCPU, 3, E.INVAL)); // padding before EPERM
    expect(await d.conn.call(pause(4, 7))).toBe(reply(ID.VM_PAUSE_VCPU, 4, E.PERM)); // EPERM before the index
  });
});

describe('KVMI_VM_CONTROL_CLEANUP (18)', () => {
  it('sets restore_on_unhook (golden request/reply); EINVAL padding (golden) / enable > 1', async () => {
    const r = await Rig.start();
    expect(await r.conn.call(frame(ID.VM_CONTROL_CLEANUP, 1, u8(0) + zeros(7)))).toBe(reply(ID.VM_CONTROL_CLEANUP, 1, 0));
    expect(r.vm.currentHook!.restoreOnUnhook).toBe(false);
    expect(await r.conn.call(golden('vm-control-cleanup-request').hex)).toBe(golden('vm-control-cleanup-reply').hex);
    expect(r.vm.currentHook!.restoreOnUnhook).toBe(true);
    const s = golden('vm-control-cleanup-error-einval').seq!;
    expect(await r.conn.call(frame(ID.VM_CONTROL_CLEANUP, s, u8(0) + zeros(6) + u8(1)))).toBe(golden('vm-control-cleanup-error-einval').hex);
    expect(await r.conn.call(frame(ID.VM_CONTROL_CLEANUP, 3, u8(2) + zeros(7)))).toBe(reply(ID.VM_CONTROL_CLEANUP, 3, E.INVAL));
    expect(r.vm.currentHook!.restoreOnUnhook).toBe(true);
  });
});

describe('KVMI_VM_SET_PAGE_ACCESS (20)', () => {
  it('golden (3 entries) and hand-written (1 entry) requests are applied; access 7 removes a restriction', async () => {
    const r = await Rig.start({ vm: BIG });
    expect(await r.conn.call(golden('vm-set-page-access-request').hex)).toBe(golden('vm-set-page-access-reply').hex);
    expect([...r.vm.restrictions.entries()].sort((a, b) => a[0] - b[0])).toEqual([[0x123456, 5], [0x4fedcb, 3], [0x789abc, 6]]);
    expect(await r.conn.call(handWritten('hw-vm-set-page-access-1-entry').hex)).toBe(reply(ID.VM_SET_PAGE_ACCESS, 48350, 0));
    expect(r.vm.restrictions.get(0xabc)).toBe(6);
    expect(await r.conn.call(setPageAccess(2, [entry(0x123456000n, 7), entry(0xabc123n, 7)]))).toBe(reply(ID.VM_SET_PAGE_ACCESS, 2, 0));
    expect(r.vm.restrictions.has(0x123456)).toBe(false);
    expect(r.vm.restrictions.has(0xabc)).toBe(false);
    expect(await r.conn.call(setPageAccess(3, []))).toBe(reply(ID.VM_SET_PAGE_ACCESS, 3, 0));
  });

  it('511 entries fill the largest message (8184 bytes) and are all applied', async () => {
    const r = await Rig.start();
    const entries = Array.from({ length: 511 }, (_, i) => entry(BigInt(0x1000 + i) << 12n, 1));
    const req = setPageAccess(4, entries);
    expect(req.length / 2).toBe(8 + 8184);
    expect(await r.conn.call(req)).toBe(reply(ID.VM_SET_PAGE_ACCESS, 4, 0));
    expect(r.vm.restrictions.size).toBe(511);
  });

  it('header padding rejects the whole message (EINVAL, nothing applied)', async () => {
    const r = await Rig.start();
    expect(await r.conn.call(setPageAccess(1, [entry(0x10000n, 1)], 1, 1))).toBe(reply(ID.VM_SET_PAGE_ACCESS, 1, E.INVAL));
    expect(await r.conn.call(setPageAccess(2, [entry(0x10000n, 1)], 1, 0, 1))).toBe(reply(ID.VM_SET_PAGE_ACCESS, 2, E.INVAL));
    expect(r.vm.restrictions.size).toBe(0);
  });

  it('a bad entry (padding, unknown access bit, gfn not visible) fails alone: the others are applied, the first error returned', async () => {
    const r = await Rig.start();
    const req = setPageAccess(9, [
      entry(0x10000n, 1),
      entry(0x11000n, 1, 1), // entry padding
      entry(0x12000n, 6),
      entry(0x13000n, 8), // access bit other than rwx
      entry(0xa0000n, 1), // VGA hole
      entry(64n << 20n, 1), // past the end of RAM
      entry(0x14000n, 3),
    ]);
    expect(await r.conn.call(req)).toBe(reply(ID.VM_SET_PAGE_ACCESS, 9, E.INVAL));
    expect([...r.vm.restrictions.entries()].sort((a, b) => a[0] - b[0])).toEqual([[0x10, 1], [0x12, 6], [0x14, 3]]);
    // ENOMEM (golden vm-set-page-access-error-enomem) needs an allocation failure: not reachable.
    expect(golden('vm-set-page-access-error-enomem').hex).toBe(reply(ID.VM_SET_PAGE_ACCESS, golden('vm-set-page-access-error-enomem').seq!, E.NOMEM));
  });
});

describe('seed extensions: KVMI_GET_MAP_TOKEN (22), KVMI_VM_GET_MAX_GFN (24)', () => {
  it('GET_MAP_TOKEN: 32 token bytes; EAGAIN past 64 outstanding tokens (golden); ENOSYS on a pure v12 kernel (golden)', async () => {
    const r = await Rig.start();
    const first = await r.conn.call(handWritten('hw-get-map-token-request').hex);
    const tokens = [...r.vm.currentHook!.mapTokens];
    expect(tokens).toHaveLength(1);
    expect(first).toBe(reply(ID.GET_MAP_TOKEN, 26505, 0, tokens[0]!));
    r.conn.send(...Array.from({ length: 63 }, (_, i) => frame(ID.GET_MAP_TOKEN, 100 + i)));
    await r.conn.nextN(63);
    const g = golden('get-map-token-request');
    expect(await r.conn.call(g.hex)).toBe(goldenErr('get-map-token-error-eagain', g.seq!));
    const pure = await Rig.start({ vm: { pureV12: true } });
    expect(await pure.conn.call(g.hex)).toBe(goldenErr('get-map-token-error-enosys-plain-v12-kernel', g.seq!));
  });

  it('VM_GET_MAX_GFN: the hand-written reply for 18 GiB of RAM; ENOSYS on a pure v12 kernel (golden)', async () => {
    const r = await Rig.start({ vm: { memoryMiB: 18432 } });
    expect(await r.conn.call(frame(ID.VM_GET_MAX_GFN, 30874))).toBe(handWritten('hw-vm-get-max-gfn-reply').hex);
    const g = golden('vm-get-max-gfn-request');
    const pure = await Rig.start({ vm: { pureV12: true } });
    expect(await pure.conn.call(g.hex)).toBe(goldenErr('vm-get-max-gfn-error-enosys-plain-v12-kernel', g.seq!));
    const denied = await Rig.start({ qemu: { allowCommands: ALL_BUT(24) } });
    expect(await denied.conn.call(g.hex)).toBe(goldenErr('vm-get-max-gfn-error-eperm', g.seq!));
  });
});
