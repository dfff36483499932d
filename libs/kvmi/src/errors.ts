/**
 * Typed KVMI errors. Callers branch on `code`, never on message text.
 * `hard` means the peer (or we) must close the connection, as KVM does for the hard errors of §10.
 */
export type KvmiErrorCode =
  // framing
  // payload shape
  | 'short-payload'
  | 'long-payload'
  | 'bad-padding'
  | 'unknown-message'
  | 'unknown-event'
  | 'bad-value'
  // event replies
  | 'not-waiting'
  | 'seq-mismatch'
  | 'action-not-allowed'
  | 'missing-reply-data'
  // command results and sessions
  | 'command-failed'
  | 'timeout'
  /** The peer stopped reading: our bounded write queue overflowed. */
  | 'write-queue-full'
  // transport and handshake (KvmiWireError)
  | KvmiWireErrorCode;

export class KvmiError extends Error {
  readonly code: KvmiErrorCode;
  readonly hard: boolean;
  constructor(code: KvmiErrorCode, message: string, hard: boolean) {
    super(message);
    this.name = 'KvmiError';
    this.code = code;
    this.hard = hard;
  }
}

/** KVM answered a command with a negative error code (a soft error: the connection stays up). */
export class KvmiCommandError extends KvmiError {
  /** Positive `KVM_E*` value, e.g. 22 for KVM_EINVAL. */
  readonly errno: number;
  readonly command: string;
  constructor(command: string, errno: number, errnoText: string) {
    super('command-failed', `${command} failed: ${errnoText} (-${errno})`, false);
    this.name = 'KvmiCommandError';
    this.errno = errno;
    this.command = command;
  }
}

export function isKvmiError(e: unknown): e is KvmiError {
  return e instanceof KvmiError;
}

export type KvmiWireErrorCode =
  /** Framing: `hdr.size` > KVMI_MAX_MSG_SIZE. The stream can't be resynchronised. Hard. */
  | 'message-too-large'
  /** Framing: the stream ended in the middle of a message. Hard. */
  | 'truncated'
  /** Framing: the `onFrame` callback threw; that message (and the rest of the stream) is lost. Hard. */
  | 'handler-failed'
  /** The socket reported an I/O error (`cause` holds it). Hard. */
  | 'socket-error'
  /** The connection closed (or the writer was closed) before the operation finished. Hard. */
  | 'closed'
  /** `FrameWriter.send`: the buffer is not one well-formed message. Nothing was written. Not hard. */
  | 'invalid-frame'
  /** A caller-supplied argument is malformed (uuid, handshake options). Nothing was written. Not hard. */
  | 'invalid-argument'
  /** Handshake: the peer did not complete it within the timeout. Hard. */
  | 'handshake-timeout'
  /** Handshake: `struct_size` < 32 from QEMU (libkvmi: ENODATA), or < 24 in the tool's reply. Hard. */
  | 'handshake-too-small'
  /** Handshake: `struct_size` > 65536 from QEMU (libkvmi: E2BIG). Hard. */
  | 'handshake-too-large'
  /** Handshake (tool side): `cookieFor` returned no secret, or failed; the VM is rejected. Hard. */
  | 'handshake-rejected'
  /** Handshake (QEMU side): `cookie_hash` ≠ SHA-1(key); QEMU closes the socket. Hard. */
  | 'handshake-refused';

const SOFT_WIRE_CODES: ReadonlySet<KvmiWireErrorCode> = new Set<KvmiWireErrorCode>(['invalid-frame', 'invalid-argument']);

/**
 * A transport or handshake failure (framing.ts, handshake.ts). `hard` means the connection must be
 * (and, where this library owns the socket, has been) closed.
 */
export class KvmiWireError extends KvmiError {
  declare readonly code: KvmiWireErrorCode;
  constructor(code: KvmiWireErrorCode, message: string, options: { cause?: unknown } = {}) {
    super(code, message, !SOFT_WIRE_CODES.has(code));
    this.name = 'KvmiWireError';
    if (options.cause !== undefined) (this as { cause?: unknown }).cause = options.cause;
  }
}
