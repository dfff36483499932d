export { KvmiListener, ListenerError, type KvmiListenerOptions, type Log } from './kvmi-listener.js';
export { VmConnection, EMPTY_PLAN, type Decide, type EventDecision, type ProtectionPlan, type VmInfo, type VmConnectionOptions } from './vm-connection.js';
export { loadCookieFile, parseCookies, CookieFileError, type CookieLookup } from './cookies.js';
export { skipInstruction, type SkipResult } from './instruction-skip.js';
export { policyDecider, planFromPolicy, type VerdictObserver } from './policy-decider.js';
export { HostAgent, type HostAgentOptions } from './host-agent.js';
export { Registry, Counter, Gauge, Histogram, STALL_BUCKETS } from './metrics.js';
