// The central analysis service: agent link server, inventory, policies, protection modules, alerts, exceptions, storage on PGlite or PostgreSQL
export { Analysis, type AnalysisOptions, type AlertNotice, type Log, type LogLevel, type TlsMaterial } from './service.js';
export { AnalysisError, isAnalysisError, type AnalysisErrorCode, type PolicyIssue } from './errors.js';
export { openDb, parseDbUrl, redact, type Db, type Queryable, type SqlParam } from './db.js';
export { migrate, MIGRATIONS } from './schema.js';
export { Store, STORM_WINDOW_NS, SEVERITY_NAMES, type AlertRecord, type AlertFilter, type HostRecord, type VmRecord, type StoredPolicy, type StoredException, type SeverityName } from './store.js';
export {
  parsePolicyDocument,
  validatePolicy,
  choosePolicy,
  selects,
  POLICY_FORMAT,
  MODULE_NAMES,
  type PolicySpec,
  type ModuleName,
  type VmSelector,
} from './policy.js';
export { buildHostPolicy, parseRuleId, protectedRanges, LOCAL_POLICY_ID, type ExceptionSpec, type HostPolicy, type VmView } from './modules.js';
export { ProfileRegistry, sectionGpaRange, symbolRipRange, pagesOf, type KernelFacts } from './profiles.js';
export { TECHNIQUES, techniqueOf, renderTechniqueTable, type Technique } from './techniques.js';
export { MAX_PAGE_ACCESS_BATCH, PROTECTED_ACCESS } from './kci.js';
export { HealthService, ServingStatus } from '@periscope/contracts';
export { MemoryService, MemoryRouter, GuestAgentAccess, ReadPhysicalAccess, MemoryAccessError, HOST_LACKS_GET_MAP_TOKEN, DEFAULT_REHASH_SECONDS, KernelIntegrity, parseRanges, type AccessPath, type MemoryAccess, type MemRange, type IntegrityStatus, type IntegrityMismatch, type BreakpointSource, type PlantedByte } from './memory/index.js';
export { alertJson } from './sinks.js';
export type { AlertJson, Jsonified } from './alert-types.js';
export type { WebhookOptions } from './sinks.js';
export { HekiTracker, HEKI_STATUS_TEXT, CORRELATION_WINDOW_MS, type HekiStatus, type HekiVmRecord } from './heki.js';
export { validateHekiModule, hekiBitNames, HEKI_CR0_BITS, HEKI_CR4_BITS, type HekiModuleParams, type HekiDenialResponse } from './heki-policy.js';
/** The shipped fleet policy directory (`policies/fleet-default.yaml`): what `periscope demo` imports with `--policy`. */
export const SHIPPED_POLICY_DIR: string = new URL('../policies', import.meta.url).pathname;
export { AuditLog, formatWho, parseWho, GUEST_CHANGING_COMMANDS, type AuditEventRecord, type AuditFilter, type AuditRecordInput } from './audit.js';
export { ResponseEngine, parseResponse, RESPONSE_KINDS, RESPONSE_DECIDED_AT, type ResponseKind, type ResponseSpec } from './responses.js';
export { readGuestPhysical, readRegisters, MAX_READ_BYTES, REGS_MSRS } from './inspect.js';
export { VmOperations, errorJson, errorFromJson, type OperationContext, type OperationHandler, type RemoteRunner, type JsonObject, type JsonValue } from './operations.js';
export { Tracing, registerTraceOperations, TRACE_DEADLINE_MS, SYSV_ARGS, DEFAULT_TRACE_ARGS, type TracingHost } from './tracing.js';
export { TraceStore, type TraceRow, type TraceHit, type TraceState } from './tracing-store.js';
export { CentralVerdicts, sendVerdict, type HeldEvent, type HeldEventClaim, type VerdictAction } from './central-verdicts.js';
