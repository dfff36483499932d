/** Stable codes of the errors thrown by the hand-written helpers of `@periscope/contracts`. */
export type ContractErrorCode =
  /** Text is not a canonical 8-4-4-4-12 hexadecimal UUID. */
  | 'CONTRACTS_UUID_TEXT_INVALID'
  /** A byte UUID is not exactly 16 bytes long. */
  | 'CONTRACTS_UUID_BYTES_INVALID'
  /** A bigint does not fit an unsigned 64-bit protobuf field. */
  | 'CONTRACTS_U64_OUT_OF_RANGE';

/** Error thrown by the helpers; branch on `code`, never on the message. */
export class ContractError extends Error {
  override readonly name = 'ContractError';
  readonly code: ContractErrorCode;

  constructor(code: ContractErrorCode, message: string) {
    super(message);
    this.code = code;
  }
}
