/**
 * @periscope/fuzz — fuzzing and fault campaigns (issue #15).
 *
 * - `mutate`: structure-aware KVMI frame and handshake mutators (field offsets from the KVMI layouts).
 * - `proxy`: a man-in-the-middle that mutates live traffic between simulated QEMU/KVM and a peer.
 * - `agent-campaign`: the host agent as a real process under fuzzed VMs, with a healthy VM probed.
 */
export * from './mutate.js';
export * from './proxy.js';
export * from './agent-campaign.js';
