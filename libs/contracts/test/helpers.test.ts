import { describe, expect, it } from 'vitest';
import {
  ContractError,
  KvmiEventKind,
  U64_MAX,
  checkU64,
  eventKindOf,
  eventKindOfCase,
  isU64,
  uuidFromBytes,
  uuidToBytes,
  type KvmiEventPayloadCase,
} from '../src/index.js';

function codeOf(fn: () => unknown): string | undefined {
  try {
    fn();
  } catch (error) {
    return error instanceof ContractError ? error.code : `not a ContractError: ${String(error)}`;
  }
  return undefined;
}

describe('UUID helpers', () => {
  it('converts text to the 16 raw bytes in RFC 4122 order and back', () => {
    const bytes = uuidToBytes('00112233-4455-6677-8899-AABBCCDDEEFF');
    expect([...bytes]).toStrictEqual([
      0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff,
    ]);
    expect(uuidFromBytes(bytes)).toBe('00112233-4455-6677-8899-aabbccddeeff');
  });

  it('reads a UUID from a view into a larger buffer', () => {
    const backing = new Uint8Array(20).fill(0xee);
    backing.set(uuidToBytes('01234567-89ab-cdef-0123-456789abcdef'), 2);
    expect(uuidFromBytes(backing.subarray(2, 18))).toBe('01234567-89ab-cdef-0123-456789abcdef');
  });

  it('rejects non-canonical text and wrong lengths with stable codes', () => {
    for (const text of ['', '0011223344556677 8899aabbccddeeff', '{00112233-4455-6677-8899-aabbccddeeff}',
      '00112233-4455-6677-8899-aabbccddeef', '00112233-4455-6677-8899-aabbccddeefg']) {
      expect(codeOf(() => uuidToBytes(text))).toBe('CONTRACTS_UUID_TEXT_INVALID');
    }
    expect(codeOf(() => uuidFromBytes(new Uint8Array(0)))).toBe('CONTRACTS_UUID_BYTES_INVALID');
    expect(codeOf(() => uuidFromBytes(new Uint8Array(17)))).toBe('CONTRACTS_UUID_BYTES_INVALID');
  });
});

describe('uint64 helpers', () => {
  it('accepts exactly 0 .. 2^64-1', () => {
    expect(U64_MAX).toBe(2n ** 64n - 1n);
    expect([0n, U64_MAX, 2n ** 53n + 1n].map(isU64)).toStrictEqual([true, true, true]);
    expect([-1n, U64_MAX + 1n].map(isU64)).toStrictEqual([false, false]);
    expect(checkU64(U64_MAX, 'gpa')).toBe(U64_MAX);
    expect(codeOf(() => checkU64(-1n, 'gpa'))).toBe('CONTRACTS_U64_OUT_OF_RANGE');
  });
});

describe('eventKindOf', () => {
  it('maps each of the 11 payload cases to a distinct kind, covering the whole enum', () => {
    const cases: KvmiEventPayloadCase[] = [
      'pause', 'hypercall', 'breakpoint', 'cr', 'trap', 'xsetbv', 'descriptor', 'msr', 'pf', 'singlestep', 'unhook',
    ];
    const kinds = cases.map(eventKindOfCase);
    const allKinds = Object.values(KvmiEventKind).filter(
      (v): v is KvmiEventKind =>
        typeof v === 'number' && v !== KvmiEventKind.KVMI_EVENT_KIND_UNSPECIFIED && v !== KvmiEventKind.UNRECOGNIZED,
    );
    expect(new Set(kinds).size).toBe(11);
    expect([...kinds].sort((a, b) => a - b)).toStrictEqual([...allKinds].sort((a, b) => a - b));
    expect(eventKindOfCase('cr')).toBe(KvmiEventKind.KVMI_EVENT_KIND_CR);
    expect(eventKindOf({ payload: { $case: 'pf', value: { gva: 0n, gpa: 0n, access: 1 } } })).toBe(
      KvmiEventKind.KVMI_EVENT_KIND_PF,
    );
    expect(eventKindOf({})).toBe(KvmiEventKind.KVMI_EVENT_KIND_UNSPECIFIED);
  });
});
