/**
 * @periscope/reliability — fuzzing and fault campaigns (issue #15).
 *
 * - `mutate`: structure-aware KVMI frame and handshake mutators (field offsets from the KVMI layouts).
 * - `proxy`: a man-in-the-middle that mutates live traffic between simulated QEMU/KVM and a peer.
 * - `agent-campaign`: the host agent (or the simulated KVM) fuzzed, with a healthy VM probed.
 * - `agent-kill`: kill -9 of the agent under attack; re-attach, re-protection and the fail-open window.
 * - `private-postgres`, `attack-fleet`, `pg-restart`, `analysis-process`, `analysis-kill`: PostgreSQL restarts
 *   and kill -9 of analysis under a detection storm, checked against the agent's detection ledger.
 * - `analysis-kill-tracing`: kill -9 of analysis with breakpoint tracing active (held events, fail-open, re-plant),
 *   real agent and analysis processes.
 * - `stall-proxy`: a peer that stalls mid-message; `kvmmem-fuzz`: the guest agent's /dev/kvmmem path fuzzed.
 * - `managed-process`: the base of `AgentProcess` and `AnalysisProcess` (spawn `bin/periscope`, stderr, kill -9, SIGTERM).
 */
export * from './mutate.js';
export * from './proxy.js';
export * from './agent-campaign.js';
export * from './managed-process.js';
export * from './agent-process.js';
export * from './agent-kill.js';
export * from './wait.js';
export * from './heki-campaign.js';
export * from './private-postgres.js';
export * from './attack-fleet.js';
export * from './pg-restart.js';
export * from './analysis-process.js';
export * from './analysis-kill.js';
export * from './analysis-kill-tracing.js';
export * from './stall-proxy.js';
export * from './kvmmem-fuzz.js';
