/**
 * Typed KVMI errors. Callers branch on `code`, never on message text.
 * `hard` means the peer (or we) must close the connection, as KVM does for the hard errors of §10.
 */
export type KvmiErrorCode =
  // framing
  | 'message-too-large'
  | 'truncated'
  | 'closed'
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
  // handshake
  | 'handshake-timeout'
  | 'handshake-too-small'
  | 'handshake-too-large'
  | 'handshake-refused'
  | 'handshake-closed';

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
