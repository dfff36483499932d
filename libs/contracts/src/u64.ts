import { ContractError } from './errors.js';

/** Largest value of a `uint64` field: 2^64 - 1. KVM uses it ("all ones") for failed translations. */
export const U64_MAX = 0xffff_ffff_ffff_ffffn;

/** True when `value` fits a protobuf `uint64` field without loss. */
export function isU64(value: bigint): boolean {
  return value >= 0n && value <= U64_MAX;
}

/** Returns `value` unchanged, or throws `CONTRACTS_U64_OUT_OF_RANGE` naming `what`. */
export function checkU64(value: bigint, what: string): bigint {
  if (!isU64(value)) {
    throw new ContractError('CONTRACTS_U64_OUT_OF_RANGE', `${what} = ${value} does not fit uint64`);
  }
  return value;
}
