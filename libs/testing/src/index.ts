// Test support shared by projects: a minimal real gRPC analysis peer, a throwaway certificate authority,
// a simulated host (VMs + KVMI tool socket + simulated /dev/kvmmem) for guest-agent tests
export { AnalysisPeer, type AnalysisPeerOptions, type PeerConnection, type PeerTls } from './analysis-peer.js';
export { TestCa, TestCaError, type IssuedCert, type IssueOptions } from './ca.js';
export * from './sim-host.js';
