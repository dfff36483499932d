/**
 * The documented ENOMEM errors (§4.1: VM_SET_PAGE_ACCESS, VCPU_GET_REGISTERS, VCPU_GET_XSAVE; kvmmem.md:
 * GET_MAP_TOKEN), made reachable with the host profile's `failAllocations` fault injection. Raw frames
 * in, raw replies compared as hex: an 8-byte payload {err = -12, padding 0} and nothing else.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { DEFAULT_HOST_PROFILE, parseHostProfile } from '../../src/index.js';
import { E, ID, frame, reply, req } from './support/bytes.js';
import { Rig, closeRigs } from './support/rig.js';

afterEach(closeRigs);

const failing = (...keys: string[]) => parseHostProfile({ failAllocations: keys }, DEFAULT_HOST_PROFILE);

describe('ENOMEM paths (fault injection)', () => {
  it('VM_SET_PAGE_ACCESS → -KVM_ENOMEM when tracking memory cannot be allocated', async () => {
    const r = await Rig.start({ vm: { profile: failing('page-access-alloc') } });
    expect(await r.conn.call(req.setPageAccess(5, [req.pageEntry(0x10000n, 1)]))).toBe(reply(ID.VM_SET_PAGE_ACCESS, 5, E.NOMEM));
  });
  it('GET_MAP_TOKEN → -KVM_ENOMEM', async () => {
    const r = await Rig.start({ vm: { profile: failing('token-alloc') } });
    expect(await r.conn.call(frame(ID.GET_MAP_TOKEN, 6))).toBe(reply(ID.GET_MAP_TOKEN, 6, E.NOMEM));
  });
  it('VCPU_GET_REGISTERS → -KVM_ENOMEM when the reply buffer cannot be allocated (after the EINVAL checks)', async () => {
    const r = await Rig.start({ vm: { profile: failing('reply-alloc') } });
    expect(await r.conn.call(req.getRegs(7, 0, [0xc0000082]))).toBe(reply(ID.VCPU_GET_REGISTERS, 7, E.NOMEM));
    // Bad padding is still EINVAL first.
    expect(await r.conn.call(req.getRegs(8, 0, [], 0, 1))).toBe(reply(ID.VCPU_GET_REGISTERS, 8, E.INVAL));
  });
  it('VCPU_GET_XSAVE → -KVM_ENOMEM', async () => {
    const r = await Rig.start({ vm: { profile: failing('xsave-alloc') } });
    expect(await r.conn.call(req.getXsave(9, 0))).toBe(reply(ID.VCPU_GET_XSAVE, 9, E.NOMEM));
  });
  it('the profile refuses unknown fault names', () => {
    expect(() => parseHostProfile({ failAllocations: ['everything'] })).toThrow(/failAllocations/);
  });
});
