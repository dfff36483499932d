export * from './constants.js';
export { HEKI_UNCONFIRMED, type HekiUnconfirmed } from './unconfirmed.js';
export {
  HekiKvm,
  decodeKvmRunHekiExit,
  kvmRunHekiExit,
  reasonOf,
  type HekiCompletion,
  type HekiExit,
  type HekiExitHandler,
  type HekiHost,
  type HekiReasonBit,
  type HekiStats,
  type KvmEnableCap,
  type LockResult,
} from './kvm.js';
export { HekiVmm, type HekiVmmOptions, type HekiVmmStats } from './vmm.js';
export { hekiGuestInit, hekiLockCr, hekiProbe, type HekiInitResult } from './guest.js';
