/** Typed errors of the analysis service: callers branch on `code`. */
export type AnalysisErrorCode =
  | 'bad-db-url'
  | 'db-error'
  /** A PGlite directory already in use by another analysis process (several replicas need PostgreSQL). */
  | 'db-locked'
  | 'migration-failed'
  | 'bad-policy'
  | 'policy-conflict'
  | 'not-found'
  | 'bad-request'
  | 'bad-profile'
  | 'slide-not-derived'
  | 'command-failed'
  | 'command-timeout'
  | 'link-closed'
  | 'unauthorized'
  | 'compile-failed'
  | 'not-attached'
  | 'refused'
  | 'unsupported'
  | 'conflict'
  | 'internal';

export interface PolicyIssue {
  /** Where in the document, e.g. `modules.cr-pinning.cr4[1]`. */
  readonly path: string;
  readonly message: string;
}

export class AnalysisError extends Error {
  override readonly name = 'AnalysisError';
  readonly code: AnalysisErrorCode;
  /** Policy validation: every problem found, with its path. */
  readonly issues: readonly PolicyIssue[];

  constructor(code: AnalysisErrorCode, message: string, opts: { issues?: readonly PolicyIssue[]; cause?: unknown } = {}) {
    super(message, opts.cause !== undefined ? { cause: opts.cause } : undefined);
    this.code = code;
    this.issues = opts.issues ?? [];
  }
}

export function isAnalysisError(e: unknown, code?: AnalysisErrorCode): e is AnalysisError {
  return e instanceof AnalysisError && (code === undefined || e.code === code);
}
