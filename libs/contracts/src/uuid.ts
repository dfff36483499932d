import { ContractError } from './errors.js';

/** Length of a VM UUID on the wire: the 16 raw bytes QEMU hands to KVM (`kvm_introspection_hook.uuid`). */
export const UUID_BYTE_LENGTH = 16;

const UUID_TEXT = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

/**
 * Converts canonical UUID text (`8-4-4-4-12` hex digits, any case) to the 16-byte form carried in `bytes`
 * fields such as `vm_uuid`. Throws `CONTRACTS_UUID_TEXT_INVALID` for anything else (braces, URNs, missing
 * dashes are rejected on purpose: one spelling per fact).
 */
export function uuidToBytes(text: string): Buffer {
  if (!UUID_TEXT.test(text)) {
    throw new ContractError('CONTRACTS_UUID_TEXT_INVALID', `not a canonical UUID: ${JSON.stringify(text)}`);
  }
  return Buffer.from(text.replaceAll('-', ''), 'hex');
}

/**
 * Converts a 16-byte UUID to canonical lower-case text. Throws `CONTRACTS_UUID_BYTES_INVALID` when the
 * length is not 16 (an empty `bytes` field, i.e. "unset", included).
 */
export function uuidFromBytes(bytes: Uint8Array): string {
  if (bytes.length !== UUID_BYTE_LENGTH) {
    throw new ContractError(
      'CONTRACTS_UUID_BYTES_INVALID',
      `a UUID is ${UUID_BYTE_LENGTH} bytes, got ${bytes.length}`,
    );
  }
  const hex = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString('hex');
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}
