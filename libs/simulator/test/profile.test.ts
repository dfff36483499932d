/**
 * Host capability profile and the pure-v12 switch (seed extensions on/off).
 */
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterEach, describe, expect, it } from 'vitest';
import { commands, KvmErrno, MAX_OUTSTANDING_MAP_TOKENS } from '@periscope/kvmi';

import { DEFAULT_HOST_PROFILE, ensureFdLimit, loadHostProfile, parseHostProfile, readFdLimit, SimError } from '../src/index.js';
import { startVm, type VmHarness } from './support/tool.js';

const harnesses: VmHarness[] = [];
afterEach(async () => {
  for (const h of harnesses.splice(0)) await h.cleanup();
});
async function vm(...args: Parameters<typeof startVm>): Promise<VmHarness> {
  const h = await startVm(...args);
  harnesses.push(h);
  return h;
}

describe('pure v12 vs the seed extensions', () => {
  it('pure v12: GET_MAP_TOKEN and VM_GET_MAX_GFN are ENOSYS, VM_CHECK_COMMAND says ENOENT', async () => {
    const { tool: t } = await vm({ pureV12: true });
    expect(await t.errno('GET_MAP_TOKEN', {})).toBe(KvmErrno.ENOSYS);
    expect(await t.errno('VM_GET_MAX_GFN', {})).toBe(KvmErrno.ENOSYS);
    expect(await t.errno('VM_CHECK_COMMAND', { id: commands.GET_MAP_TOKEN.id })).toBe(KvmErrno.ENOENT);
    expect(await t.errno('VM_CHECK_COMMAND', { id: commands.VM_GET_MAX_GFN.id })).toBe(KvmErrno.ENOENT);
  });

  it('with the extensions: both answer and VM_CHECK_COMMAND says 0', async () => {
    const { tool: t } = await vm();
    expect(await t.errno('VM_CHECK_COMMAND', { id: commands.GET_MAP_TOKEN.id })).toBe(0);
    expect(await t.errno('VM_CHECK_COMMAND', { id: commands.VM_GET_MAX_GFN.id })).toBe(0);
    expect(await t.ok('VM_GET_MAX_GFN', {})).toEqual({ gfn: 64n * 256n });
  });

  it(`GET_MAP_TOKEN: EAGAIN beyond ${MAX_OUTSTANDING_MAP_TOKENS} outstanding tokens (unconfirmed: map-token-limit)`, async () => {
    const { tool: t, vm: v } = await vm();
    const tokens = await Promise.all(Array.from({ length: MAX_OUTSTANDING_MAP_TOKENS }, () => t.ok('GET_MAP_TOKEN', {})));
    expect(new Set(tokens.map((x) => x.token.token.join(','))).size).toBe(MAX_OUTSTANDING_MAP_TOKENS);
    expect(await t.errno('GET_MAP_TOKEN', {})).toBe(KvmErrno.EAGAIN);
    expect(v.currentHook!.mapTokens.size).toBe(MAX_OUTSTANDING_MAP_TOKENS);
  });
});

describe('host profile', () => {
  it('TSC scaling off: tsc_speed 0', async () => {
    const { tool: t } = await vm({ profile: parseHostProfile({ tscScaling: false }) });
    expect(await t.ok('VCPU_GET_INFO', { vcpu: 0 })).toEqual({ tsc_speed: 0n });
  });

  it('userspace #BP debugging: a guest INT3 goes to userspace', async () => {
    const { vm: v } = await vm({ profile: parseHostProfile({ userspaceBpDebug: true }) });
    expect(await v.vcpus[0]!.int3()).toMatchObject({ outcome: 'userspace-exit', events: [] });
  });

  it('validates the JSON strictly and fills defaults', () => {
    expect(parseHostProfile({})).toEqual(DEFAULT_HOST_PROFILE);
    const p = parseHostProfile({ singlestep: false, msrFilterDenyWrite: ['0xc0000082', 0x174], xsaveFeatures: '0x3', tscKhz: 1000 });
    expect(p).toMatchObject({ singlestep: false, msrFilterDenyWrite: [0xc0000082, 0x174], xsaveFeatures: 3n, tscKhz: 1000 });
    const bad = (j: unknown): string => {
      try {
        parseHostProfile(j);
      } catch (e) {
        expect(e).toBeInstanceOf(SimError);
        expect((e as SimError).code).toBe('bad-host-profile');
        return (e as Error).message;
      }
      throw new Error('accepted');
    };
    expect(bad({ singlestepp: true })).toMatch(/unknown key "singlestepp"/);
    expect(bad({ singlestep: 'yes' })).toMatch(/singlestep/);
    expect(bad({ xsaveFeatures: 6 })).toMatch(/x87/);
    expect(bad({ msrFilterDenyWrite: [-1] })).toMatch(/msrFilterDenyWrite\[0\]/);
    expect(bad([])).toMatch(/object/);
  });

  it('loads from a file', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'psim-'));
    const f = join(dir, 'host.json');
    writeFileSync(f, JSON.stringify({ descriptorExits: false }));
    expect((await loadHostProfile(f)).descriptorExits).toBe(false);
    writeFileSync(f, '{nope');
    await expect(loadHostProfile(f)).rejects.toMatchObject({ code: 'bad-host-profile' });
    await expect(loadHostProfile(join(dir, 'missing.json'))).rejects.toMatchObject({ code: 'bad-host-profile' });
  });
});

describe('file-descriptor limit', () => {
  it('reads /proc/self/limits and refuses, with the numbers and the fix, what it cannot raise', () => {
    const lim = readFdLimit();
    expect(lim).not.toBeNull();
    expect(ensureFdLimit(10)).toEqual(readFdLimit());
    const huge = lim!.hard === Infinity ? Number.MAX_SAFE_INTEGER - 1000 : lim!.hard + 1;
    let err: unknown;
    try {
      ensureFdLimit(huge);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(SimError);
    expect((err as SimError).code).toBe('fd-limit');
    expect((err as Error).message).toMatch(/ulimit -n/);
  });
});
