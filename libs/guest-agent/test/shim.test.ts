/**
 * The real-device path of the addon, against an LD_PRELOAD ioctl shim standing in for the kvmmem module
 * on a plain file: request numbers, argument bytes (offsets from ../shared/spec/struct-sizes-v7.json, not
 * from the addon), by-value UNMAP arguments, ABI detection, errno names, detaching on unmap and close.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync, openSync, writeSync, closeSync, ftruncateSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { ADDON_PATH } from '../src/index.js';

const here = dirname(fileURLToPath(import.meta.url));
const sizes = JSON.parse(readFileSync(join(here, '../../../../shared/spec/struct-sizes-v7.json'), 'utf8')) as Record<string, { size: number; fields: { name: string; offset: number; size: number }[] }>;
const field = (struct: string, name: string): { offset: number; size: number } => sizes[struct]!.fields.find((f) => f.name === name)!;

let dir: string;
let shim: string;
let device: string;

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'kvmmem-shim-'));
  shim = join(dir, 'ioctl-shim.so');
  execFileSync('cc', ['-shared', '-fPIC', '-O1', '-o', shim, join(here, 'fixtures/ioctl-shim.c'), '-ldl']);
  device = join(dir, 'kvmmem');
  const fd = openSync(device, 'w+');
  ftruncateSync(fd, 16 * 1024 * 1024);
  writeSync(fd, Buffer.from('c0ffee0011223344', 'hex'), 0, 8, 0x200000); // what region 0x200000 holds
  closeSync(fd);
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

interface OpResult {
  ok: boolean;
  code?: string;
  errno?: number;
  syscall?: string;
  [k: string]: unknown;
}

function run(ops: object[], results: string[] = []): { out: OpResult[]; log: string[] } {
  const log = join(dir, `log-${Math.random().toString(16).slice(2)}`);
  writeFileSync(log, '');
  const r = spawnSync(process.execPath, [join(here, 'fixtures/shim-driver.mjs'), JSON.stringify(ops)], {
    env: {
      ...process.env,
      LD_PRELOAD: shim,
      KVMMEM_ADDON: ADDON_PATH,
      KVMMEM_SHIM_DEVICE: device,
      KVMMEM_SHIM_LOG: log,
      KVMMEM_SHIM_RESULTS: results.join(','),
    },
    encoding: 'utf8',
  });
  if (r.status !== 0) throw new Error(`driver failed (${r.status} ${r.signal}): ${r.stderr}`);
  const out = JSON.parse(r.stdout) as OpResult[];
  const lines = readFileSync(log, 'utf8').split('\n').filter(Boolean);
  rmSync(log);
  return { out, log: lines };
}

const TOKEN = Buffer.from(Array.from({ length: 32 }, (_, i) => i + 1)).toString('hex');
const le64 = (v: bigint): string => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(v);
  return b.toString('hex');
};
const argOf = (line: string): Buffer => Buffer.from(/arg=([0-9a-f]*)/.exec(line)![1]!, 'hex');

describe('ABI v1 through the shim', () => {
  it('probe ENOTTY → v1; MAP passes a pointer to {token, gpa, gva = our page}; close UNMAPs the gva by value and detaches the buffer', () => {
    const { out, log } = run(
      [{ op: 'open', path: device }, { op: 'probe' }, { op: 'v1Map', token: TOKEN, gpa: '0x1234567' }, { op: 'byteLength', buffer: 0 }, { op: 'close' }, { op: 'byteLength', buffer: 0 }],
      ['ENOTTY'],
    );
    expect(out[1]).toMatchObject({ ok: true, abi: 1, errno: 25 });
    expect(out[2]).toMatchObject({ ok: true, byteLength: 4096 });
    expect(out[3]).toMatchObject({ byteLength: 4096, first: 0xab });
    expect(out[5]).toMatchObject({ byteLength: 0, viewLength: 0, first: null });
    const gva = BigInt(out[2]!['address'] as string);
    expect(gva % 4096n).toBe(0n);
    expect(log[0]).toBe('req=0x40086903 val=0x0');
    expect(log[1]!.startsWith('req=0x40306901 arg=')).toBe(true);
    const arg = argOf(log[1]!);
    expect(arg.length).toBe(sizes['kvmi_mem_map']!.size);
    const tok = field('kvmi_mem_map', 'token');
    expect(arg.subarray(tok.offset, tok.offset + tok.size).toString('hex')).toBe(TOKEN);
    const g = field('kvmi_mem_map', 'gpa');
    expect(arg.subarray(g.offset, g.offset + 8).toString('hex')).toBe(le64(0x1234567n));
    const v = field('kvmi_mem_map', 'gva');
    expect(arg.readBigUInt64LE(v.offset)).toBe(gva);
    // close unmaps what is left: UNMAP with the gva itself, by value
    expect(log[2]).toBe(`req=0x40086902 val=0x${gva.toString(16)}`);
    expect(log).toHaveLength(3);
  });

  it('explicit UNMAP by value, then the buffer is detached and the page forgotten', () => {
    // two maps in one process; unmap the first by the address the driver reports through `stats`
    const { out, log } = run([
      { op: 'open', path: device },
      { op: 'v1Map', token: TOKEN, gpa: '0x5000' },
      { op: 'stats' },
    ]);
    const gva = out[1]!['address'] as string;
    const second = run([
      { op: 'open', path: device },
      { op: 'v1Unmap', gva },
    ]);
    // in a fresh process that address is not ours: the device is still asked (it answers), nothing is munmapped
    expect(second.out[1]).toMatchObject({ ok: true });
    expect(second.log).toEqual([`req=0x40086902 val=${gva}`]);
    expect(out[2]).toMatchObject({ mappings: 1, bytes: 4096 });
    expect(log).toHaveLength(1);
  });

  it('errors carry the errno name: EALREADY, EPERM, ENOMEM, EINVAL on MAP (page released), ENOENT on UNMAP', () => {
    const { out, log } = run(
      [
        { op: 'open', path: device },
        { op: 'v1Map', token: TOKEN, gpa: '0x1000' },
        { op: 'v1Map', token: TOKEN, gpa: '0x1000' },
        { op: 'v1Map', token: TOKEN, gpa: '0x1000' },
        { op: 'v1Map', token: TOKEN, gpa: '0x1000' },
        { op: 'stats' },
        { op: 'v1Unmap', gva: '0x7000' },
      ],
      ['EALREADY', 'EPERM', 'ENOMEM', 'EINVAL', 'ENOENT'],
    );
    expect(out.slice(1, 5).map((r) => r.code)).toEqual(['EALREADY', 'EPERM', 'ENOMEM', 'EINVAL']);
    expect(out[1]).toMatchObject({ errno: 114, syscall: 'ioctl KVM_INTRO_MEM_MAP' });
    expect(out[5]).toMatchObject({ mappings: 0, bytes: 0 });
    expect(out[6]).toMatchObject({ ok: false, code: 'ENOENT', syscall: 'ioctl KVM_INTRO_MEM_UNMAP' });
    expect(log[4]).toBe('req=0x40086902 val=0x7000');
  });
});

describe('ABI v2 through the shim', () => {
  const UUID = '00112233445566778899aabbccddeeff';

  it('probe (any errno but ENOTTY) → v2; OPEN passes the uuid; MAP is _IOWR with {token, gpa, length}; the region is mmapped at offset = start; UNMAP by value', () => {
    const { out, log } = run(
      [
        { op: 'open', path: device },
        { op: 'probe' },
        { op: 'v2Open', uuid: UUID },
        { op: 'v2Map', token: TOKEN, gpa: '0x201234' },
        { op: 'v2Unmap', start: '0x200000' },
        { op: 'byteLength', buffer: 0 },
        { op: 'stats' },
      ],
      ['ENOENT'],
    );
    expect(out[1]).toMatchObject({ abi: 2, errno: 2 });
    expect(out[3]).toMatchObject({ ok: true, start: '0x200000', length: '0x200000', byteLength: 0x200000, peek: 'c0ffee0011223344' });
    expect(out[5]).toMatchObject({ byteLength: 0 });
    expect(out[6]).toMatchObject({ mappings: 0 });
    expect(log[0]).toBe('req=0x40086903 val=0x0');
    expect(log[1]).toBe(`req=0x40086901 arg=${UUID}`);
    expect(log[2]!.startsWith('req=0xc0306902 arg=')).toBe(true);
    const arg = argOf(log[2]!);
    expect(arg.length).toBe(sizes['kvmi_guest_mem_map']!.size);
    const tok = field('kvmi_guest_mem_map', 'token');
    expect(arg.subarray(tok.offset, tok.offset + 32).toString('hex')).toBe(TOKEN);
    expect(arg.readBigUInt64LE(field('kvmi_guest_mem_map', 'gpa').offset)).toBe(0x201234n);
    expect(arg.readBigUInt64LE(field('kvmi_guest_mem_map', 'length').offset)).toBe(0n);
    expect(log[3]).toBe('req=0x40086903 val=0x200000');
  });

  it('close unmaps every region (munmap + UNMAP by value) and detaches every buffer', () => {
    const { out, log } = run([
      { op: 'open', path: device },
      { op: 'v2Open', uuid: UUID },
      { op: 'v2Map', token: TOKEN, gpa: '0x0' },
      { op: 'v2Map', token: TOKEN, gpa: '0x400000' },
      { op: 'close' },
      { op: 'byteLength', buffer: 0 },
      { op: 'byteLength', buffer: 1 },
      { op: 'v2Map', token: TOKEN, gpa: '0x0' },
    ]);
    expect(out[5]).toMatchObject({ byteLength: 0 });
    expect(out[6]).toMatchObject({ byteLength: 0 });
    expect(out[7]).toMatchObject({ ok: false, code: 'EBADF' });
    expect(log.slice(3).sort()).toEqual(['req=0x40086903 val=0x0', 'req=0x40086903 val=0x400000']);
  });

  it('errors: EALREADY (overlap), EINVAL (MAP before OPEN), EPERM, ENOMEM on MAP; ENOENT / EINVAL on UNMAP', () => {
    const { out } = run(
      [
        { op: 'open', path: device },
        { op: 'v2Map', token: TOKEN, gpa: '0x0' },
        { op: 'v2Map', token: TOKEN, gpa: '0x0' },
        { op: 'v2Map', token: TOKEN, gpa: '0x0' },
        { op: 'v2Map', token: TOKEN, gpa: '0x0' },
        { op: 'v2Unmap', start: '0x1000' },
        { op: 'v2Unmap', start: '0x9000' },
        { op: 'v2Open', uuid: UUID },
        { op: 'stats' },
      ],
      ['EALREADY', 'EINVAL', 'EPERM', 'ENOMEM', 'EINVAL', 'ENOENT', 'EALREADY'],
    );
    expect(out.slice(1, 5).map((r) => r.code)).toEqual(['EALREADY', 'EINVAL', 'EPERM', 'ENOMEM']);
    expect(out[1]).toMatchObject({ syscall: 'ioctl KVM_GUEST_MEM_MAP' });
    expect(out[5]).toMatchObject({ code: 'EINVAL', syscall: 'ioctl KVM_GUEST_MEM_UNMAP' });
    expect(out[6]).toMatchObject({ code: 'ENOENT' });
    expect(out[7]).toMatchObject({ code: 'EALREADY', syscall: 'ioctl KVM_GUEST_MEM_OPEN' });
    expect(out[8]).toMatchObject({ mappings: 0 });
  });

  it('the request numbers compiled into the addon are the fact sheet\'s', async () => {
    const { loadAddon } = await import('../src/index.js');
    expect(loadAddon().requests).toEqual({
      KVM_INTRO_MEM_MAP: 0x40306901,
      KVM_INTRO_MEM_UNMAP: 0x40086902,
      KVM_GUEST_MEM_OPEN: 0x40086901,
      KVM_GUEST_MEM_MAP: 0xc0306902,
      KVM_GUEST_MEM_UNMAP: 0x40086903,
    });
  });
});
