/**
 * @periscope/guest-agent — the agent inside a host's introspection VM: `/dev/kvmmem` (ABI v1 and v2, or
 * the simulator's model of it) through a native addon, per-VM memory sessions (map with single-use
 * tokens, read, SHA-256 per chunk, masked signature scans, unmap, close, a page quota), the link that
 * serves `GuestMemoryService` work to analysis, and the analysis end of that link (`GuestMemoryHub`).
 */
export { GuestAgentError, KvmmemError, type GuestAgentErrorCode, type GpaSpan, type KvmmemErrnoName } from './errors.js';
export { ADDON_PATH, loadAddon, type KvmmemAddon, type NativeHandle, type NativeMapping, type NativeRegion } from './native.js';
export { PAGE_SIZE, connectSimKvmmem, openKvmmemDevice, type KvmmemDevice, type KvmmemFile, type KvmmemMapping } from './device.js';
export { PageQuota, VmMemorySession, unpackDigests, type ChunkDigest, type MapOptions, type MapOutcome, type PackedDigests } from './session.js';
export { MAX_SIGNATURE_BYTES, checkSignature, parseSignature, scanSegments, type Segment, type Signature } from './scan.js';
export { GuestMemoryWorker, memoryErrorOf, type WorkerOptions } from './worker.js';
export { GUEST_AGENT_VERSION, GuestAgent, type GuestAgentOptions, type GuestAgentStats, type GuestAgentTls } from './agent.js';
export {
  DEFAULT_MAX_OUTSTANDING_TOKENS,
  GuestAgentLink,
  GuestMemoryHub,
  GuestMemoryWorkError,
  type GuestMemoryHubEvents,
  type PackedChunkHashes,
  type RunOptions,
  type TokenSource,
  type VmRef,
} from './hub.js';
