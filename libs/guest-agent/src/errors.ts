/** Errors of @periscope/guest-agent: branch on `code`, never on the message. */

/** errno names the device paths produce (kvmmem.md §3.3, §4.4); any other errno keeps its name. */
export type KvmmemErrnoName =
  | 'EALREADY'
  | 'ENOENT'
  | 'EINVAL'
  | 'EPERM'
  | 'ENOMEM'
  | 'EAGAIN'
  | 'EBUSY'
  | 'EFAULT'
  | 'ENOTTY'
  | 'ENODEV'
  | 'EBADF'
  | 'ENXIO'
  | (string & {});

/** A failed device call (ioctl, mmap, open, or the simulated device's answer) with its errno. */
export class KvmmemError extends Error {
  override readonly name = 'KvmmemError';
  /** The errno name, e.g. `EALREADY`. */
  readonly code: KvmmemErrnoName;
  readonly errno: number;
  /** `ioctl KVM_INTRO_MEM_MAP`, `mmap`, `open /dev/kvmmem`, ... */
  readonly syscall: string;

  constructor(code: KvmmemErrnoName, errno: number, syscall: string, message?: string) {
    super(message ?? `${syscall}: ${code}`);
    this.code = code;
    this.errno = errno;
    this.syscall = syscall;
  }
}

export type GuestAgentErrorCode =
  /** The native addon is not built. */
  | 'addon-missing'
  /** Read/hash/scan/unmap of a range that is not (entirely) mapped. */
  | 'not-mapped'
  /** The map tokens ran out; `range` is what is still unmapped. */
  | 'need-tokens'
  /** --max-mapped-pages would be exceeded. */
  | 'quota-exceeded'
  /** A malformed request. */
  | 'invalid-argument'
  /** The session or device file is closed. */
  | 'closed'
  /** The simulated device broke its protocol or went away. */
  | 'device-protocol'
  /** The work was cancelled or its deadline passed. */
  | 'cancelled'
  | 'deadline-exceeded';

export interface GpaSpan {
  readonly gpa: bigint;
  readonly length: bigint;
}

export class GuestAgentError extends Error {
  override readonly name = 'GuestAgentError';
  readonly code: GuestAgentErrorCode;
  /** The part of the range concerned, when there is one. */
  readonly range: GpaSpan | undefined;

  constructor(code: GuestAgentErrorCode, message: string, options: { range?: GpaSpan; cause?: unknown } = {}) {
    super(message, options.cause !== undefined ? { cause: options.cause } : undefined);
    this.code = code;
    this.range = options.range;
  }
}

/** Turn what the addon throws (an Error with code/errno/syscall) into a `KvmmemError`; rethrow anything else. */
export function toKvmmemError(err: unknown): never {
  if (err instanceof KvmmemError || err instanceof GuestAgentError) throw err;
  const e = err as { code?: unknown; errno?: unknown; syscall?: unknown; message?: unknown };
  if (err instanceof Error && typeof e.code === 'string' && typeof e.errno === 'number') {
    throw new KvmmemError(e.code, e.errno, typeof e.syscall === 'string' ? e.syscall : 'kvmmem', err.message);
  }
  throw err;
}
