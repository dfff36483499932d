/**
 * Typed errors of @periscope/x86. Callers branch on `code`, never on message text.
 *
 * Architectural faults (#PF, #GP) are *not* errors: they are values returned by `walk`,
 * `checkAccess` and `translateAccess`. `X86Error` is for things a real CPU never sees: an access to
 * guest-physical memory that has no backing, a misuse of the API, a full page-table pool.
 */
export type X86ErrorCode =
  /** The GPA lies in a hole or at/after the gfn limit. The KVMI layer maps this to `KVM_ENOENT`. */
  | 'unbacked'
  /** A bad argument: negative or oversized address, misaligned mapping, unknown access kind, … */
  | 'invalid-argument'
  /** The page-table builder has no free page left in its pool. */
  | 'pool-exhausted'
  /** A mapping collides with an existing mapping of a different page size. */
  | 'mapping-conflict'
  /** The instruction table has no entry of that name. */
  | 'unknown-instruction'
  /** The CPU state is not in 4-level paging (CR0.PG, CR4.PAE, EFER.LME set, CR4.LA57 clear). */
  | 'unsupported-mode'
  /** The guest RAM file was closed. */
  | 'closed';

export class X86Error extends Error {
  readonly code: X86ErrorCode;
  /** For `unbacked`: the first guest-physical address without backing. */
  readonly gpa: bigint | undefined;
  constructor(code: X86ErrorCode, message: string, gpa?: bigint) {
    super(message);
    this.name = 'X86Error';
    this.code = code;
    this.gpa = gpa;
  }
}

export function isX86Error(e: unknown, code?: X86ErrorCode): e is X86Error {
  return e instanceof X86Error && (code === undefined || e.code === code);
}
