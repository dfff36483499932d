/**
 * @periscope/verdicts — local verdicts for held vCPU events.
 *
 * - `model`: the rule model (maps 1:1 from policy.proto's LocalPolicy: `policyFromProto`).
 * - `compilePolicy`: full validation (typed `VerdictsError` with rule ids) → `CompiledPolicy`.
 * - `Evaluator`: one per VM; `evaluate(view)` → a reused `Verdict`, allocation-free.
 * - policy files (`--policy FILE`): `loadPolicyFile`, `parsePolicyText`, `formatPolicy`, the shipped
 *   `DEFAULT_POLICY_PATH`; `generatePolicy` for 100+-rule benchmark policies.
 */
export * from './model.js';
export * from './errors.js';
export { illegalBecause, injectReplyAction, isActionLegal, kvmiActionValue, legalActions, renderLegalityTable, KVMI_ACTION_OF } from './legality.js';
export { compilePolicy, policyActions, CompiledPolicy, DEFAULT_ASK_CENTRAL_DEADLINE_MS, MAX_ASK_CENTRAL_DEADLINE_MS, type PolicyActionUse } from './compile.js';
export { Evaluator, Verdict, type EvaluatorOptions } from './evaluator.js';
export {
  DEFAULT_POLICY_PATH,
  POLICY_FILE_FORMAT,
  formatPolicy,
  loadDefaultPolicy,
  loadPolicyFile,
  parsePolicy,
  parsePolicyText,
} from './policy-file.js';
export { actionFromProto, kindFromProto, policyFromProto } from './proto.js';
export { generatePolicy, type GenerateOptions } from './generate.js';
export { deriveInterception } from './interception.js';
