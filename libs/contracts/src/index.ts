/**
 * @periscope/contracts: the gRPC contracts of Periscope (protos/periscope/v1) as TypeScript.
 *
 * The generated code (ts-proto, `src/generated/`, produced by `npm run generate`) is re-exported flat:
 * protobuf requires every message, enum and service name to be unique within the `periscope.v1` package, so
 * the files cannot clash (ts-proto's per-file utility symbols are not exported: `exportCommonSymbols=false`).
 * 64-bit fields are `bigint`; `bytes` fields are `Buffer`; oneofs are `{ $case, value }` unions.
 */
export * from './generated/periscope/v1/common.js';
export * from './generated/periscope/v1/kvmi.js';
export * from './generated/periscope/v1/policy.js';
export * from './generated/periscope/v1/agent.js';
export * from './generated/periscope/v1/heki.js';
export * from './generated/periscope/v1/guest_memory.js';
export * from './generated/periscope/v1/operator.js';

export { ContractError, type ContractErrorCode } from './errors.js';
export { UUID_BYTE_LENGTH, uuidFromBytes, uuidToBytes } from './uuid.js';
export { U64_MAX, checkU64, isU64 } from './u64.js';
export { eventKindOf, eventKindOfCase, type KvmiEventPayloadCase } from './events.js';
export { HealthService, healthImplementation, ServingStatus, type HealthCheckRequest, type HealthCheckResponse } from './health.js';
export { startHealthServer, type HealthServer } from './health-server.js';
