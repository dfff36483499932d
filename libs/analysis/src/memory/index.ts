/**
 * Guest memory work in analysis (issue #10): the `GuestMemoryHub` the guest agents dial (mounted on the
 * gRPC server next to AgentLinkService), routing of a VM's work to its host's guest agent with tokens
 * relayed through the host agent (or VM_READ_PHYSICAL, with the reason), the kernel integrity module
 * (hashing) and the HTTP routes (`/v1/vms/{id}/scan`, `/v1/vms/{id}/integrity`).
 */
import { MemoryRouter } from './access.js';
import { KernelIntegrity, type IntegrityHost } from './integrity.js';

export class MemoryService {
  readonly router = new MemoryRouter();
  readonly integrity: KernelIntegrity;

  constructor(host: IntegrityHost) {
    this.integrity = new KernelIntegrity(host, this.router);
  }

  get hub() {
    return this.router.hub;
  }

  /** Stop monitoring and drop the guest agents' streams (they redial). */
  stop(): void {
    this.integrity.stop();
    this.router.stop();
  }
}

export { GuestAgentAccess, HOST_LACKS_GET_MAP_TOKEN, MemoryAccessError, MemoryRouter, ReadPhysicalAccess, type AccessPath, type MemoryAccess, type MemRange, type ScanOutcome, type ScanProgress } from './access.js';
export { DEFAULT_REHASH_SECONDS, KernelIntegrity, STATUS_KEY, type BreakpointSource, type IntegrityHost, type IntegrityMismatch, type IntegrityStatus, type PlantedByte } from './integrity.js';
export { handleMemoryHttp, parseRanges, type MemoryHttpHost } from './http.js';
