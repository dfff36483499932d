/**
 * Typed errors of the verdict engine. Callers branch on `code`, never on message text.
 *
 * The compiler collects every problem of a policy before throwing, so an operator sees all of them at
 * once; `code`, `ruleId` and `path` of the error are those of the first issue, `issues` holds them all.
 */
export type VerdictsErrorCode =
  /** The catalog does not allow this action for (one of) the event kinds the rule applies to. */
  | 'action-not-allowed'
  /** A bit mask is not a u64, is zero where that can never match, or a match value has bits outside its mask. */
  | 'bad-mask'
  /** A range is not `start < end` with u64 `start` and `end ≤ 2^64`. */
  | 'bad-range'
  /** askCentral.deadlineMs (or the policy's maximum) outside 1–1000 ms. */
  | 'bad-deadline'
  /** An event kind that is not a vCPU event of the catalog, or a kind-specific criterion on the wrong kind. */
  | 'bad-kind'
  /** A scalar criterion or parameter outside its domain (vCPU index, CR number, MSR index, vector, ...). */
  | 'bad-value'
  /** A report setting that is not always / never / sample one in N ≥ 1. */
  | 'bad-report'
  /** Two rules (or two exceptions) with the same id, or an empty id. */
  | 'duplicate-id'
  /** An exception names a rule id the policy does not have, or can never apply. */
  | 'bad-exception'
  /** The policy file is not valid JSON, has an unknown key, or a value of the wrong type. */
  | 'bad-policy-file'
  /** A policy.proto message that has no equivalent in the rule model (e.g. action UNSPECIFIED). */
  | 'bad-proto';

export interface VerdictsIssue {
  readonly code: VerdictsErrorCode;
  /** Rule or exception id (`<default:KIND>` for a default action), or null for policy-level problems. */
  readonly ruleId: string | null;
  /** Where in the policy, e.g. `rules[3].action` or `exceptions[0].match.gpa[1]`. */
  readonly path: string;
  readonly message: string;
}

export class VerdictsError extends Error {
  readonly code: VerdictsErrorCode;
  readonly ruleId: string | null;
  readonly path: string;
  readonly issues: readonly VerdictsIssue[];
  constructor(issues: readonly VerdictsIssue[]) {
    const first = issues[0];
    if (!first) throw new TypeError('VerdictsError needs at least one issue');
    const more = issues.length > 1 ? ` (and ${issues.length - 1} more issue${issues.length > 2 ? 's' : ''})` : '';
    super(`${first.ruleId !== null ? `rule ${first.ruleId}: ` : ''}${first.path}: ${first.message}${more}`);
    this.name = 'VerdictsError';
    this.code = first.code;
    this.ruleId = first.ruleId;
    this.path = first.path;
    this.issues = issues;
  }
}

export function isVerdictsError(e: unknown): e is VerdictsError {
  return e instanceof VerdictsError;
}
