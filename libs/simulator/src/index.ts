/**
 * @periscope/simulator — a faithful stand-in for KVM (the kernel side of KVMI v12), QEMU (handshake,
 * hooking ioctls, reconnect, PREUNHOOK shutdown) and an x86-64 guest under attack (sparse-file RAM,
 * real page tables and access rules from @periscope/x86, real instructions, a synthetic Linux-like
 * kernel with a KASLR slide, a benign workload and scenario files), speaking the real wire protocol over
 * real sockets. See README.md for the API and docs/simulator.md for what is modelled.
 */
export { SimVm, SIMULATED_STATE_CHECKS, type SimVmOptions, type HookOptions, type SimVmEvents, type PageTableLayout } from './kvm/vm.js';
export { SimVcpu, LIVELOCK_FAULTS, type AccessKind, type AccessTarget, type DescriptorId, type KvmInterceptions } from './kvm/vcpu.js';
export type { KvmiHook } from './kvm/hook.js';
export type {
  EventEnd,
  EventRecord,
  GuestEventRecord,
  GuestOutcome,
  GuestResult,
  InsnRecord,
  LivelockReport,
  RunOptions,
  RunOutcome,
  RunResult,
  VmStats,
} from './kvm/types.js';
export { SimQemu, type SimQemuOptions, type SimQemuState, type SimQemuStats, type ShutdownReport } from './qemu.js';
export { Simulator, type SimulatorOptions, type SimStats, type SimSummary } from './fleet.js';
export { runSimCli, simSchema, type SimCliIo } from './cli.js';
export { DEFAULT_HOST_PROFILE, loadHostProfile, parseHostProfile, type HostProfile } from './profile.js';
export { ensureFdLimit, readFdLimit, type FdLimit } from './limits.js';
export { SimError, HostErrno, hostErrnoName, type SimErrorCode, type HostErrnoName } from './errors.js';
export { VmMemory, PAGE_SIZE, DEFAULT_HOLES, setRamFdPoolSize, ramFdPoolSize, openRamFiles, tempRunDir, type GfnRange } from './guest/ram.js';
export {
  KERNEL_BASE,
  PAGE_TABLE_BASE,
  MODULES_VADDR,
  USER_TEXT,
  USER_DATA,
  MIN_MEMORY_MIB,
  type KernelLayout,
  type UserProcess,
} from './guest/kernel.js';
export {
  buildLinuxSimProfile,
  deriveSlide,
  linuxSimProfile,
  loadGuestOsProfile,
  parseGuestOsProfile,
  LINUX_SIM_PROFILE_PATH,
  type DerivedKernel,
  type GuestOsProfile,
  type GuestOsProfileJson,
  type GuestReader,
} from './guest/os-profile.js';
export { assemble, type AsmInsn, type Assembled, type AssembledInsn } from './guest/asm.js';
export { callTaggedCopy, TaggedCallLog, type TaggedCall, type TaggedCopyTarget } from './guest/tagged-copy.js';
export { CpuState, MSR, MTRR_TYPE, VECTOR } from './guest/cpu.js';
export { mulberry32, deriveSeed } from './prng.js';
export { parseScenario, loadScenario, CR_BITS } from './scenario/parse.js';
export { runScenario, type RunScenarioOptions } from './scenario/run.js';
export type {
  Scenario,
  Step,
  StepVerb,
  StepOrigin,
  Expr,
  Expectations,
  EventExpectation,
  RegisterExpectation,
  ScenarioReport,
  StepReport,
  ExpectationResult,
  ScenarioEventReport,
} from './scenario/types.js';
export { SHIPPED_SCENARIOS_DIR, shippedScenarioFiles } from './scenario/shipped.js';
export { KvmmemServer, type KvmmemServerOptions, type KvmmemServerStats } from './kvmmem/server.js';
export { KVMMEM_REQ, type KvmmemRequest, type KvmmemResponse } from './kvmmem/protocol.js';
export * from './heki/index.js';
