/**
 * Typed simulator errors. Callers branch on `code`, never on the message text.
 */
export type SimErrorCode =
  /** The process may not open enough file descriptors for the requested VMs. */
  | 'fd-limit'
  /** A host profile file is unreadable or malformed. */
  | 'bad-host-profile'
  /** A QEMU key file is unreadable. */
  | 'bad-key-file'
  /** A caller-supplied argument is out of range (vCPU index, register, ...). */
  | 'invalid-argument'
  /** A guest OS profile is unreadable or malformed. */
  | 'bad-guest-profile'
  /** `deriveSlide`: the guest does not match the profile (LSTAR out of range, signature mismatch). */
  | 'slide-not-derived'
  /** A scenario file is unreadable or malformed (the message names the file and the key). */
  | 'bad-scenario';

export class SimError extends Error {
  override readonly name = 'SimError';
  readonly code: SimErrorCode;
  constructor(code: SimErrorCode, message: string, options: { cause?: unknown } = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.code = code;
  }
}

/**
 * Host errno values returned by the simulated hooking ioctls (they are ioctl results, `-1` + `errno`,
 * not `KVM_E*` wire codes).
 */
export const HostErrno = {
  EPERM: 1,
  ENOENT: 2,
  ENOMEM: 12,
  EFAULT: 14,
  EEXIST: 17,
  EINVAL: 22,
} as const;
export type HostErrnoName = keyof typeof HostErrno;

export function hostErrnoName(errno: number): string {
  if (errno === 0) return '0';
  for (const [k, v] of Object.entries(HostErrno)) if (v === errno) return k;
  return `errno ${errno}`;
}
