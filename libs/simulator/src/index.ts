/**
 * @periscope/simulator — a faithful stand-in for KVM (the kernel side of KVMI v12), QEMU (handshake,
 * hooking ioctls, reconnect, PREUNHOOK shutdown) and a minimal x86-64 guest, speaking the real wire
 * protocol over real sockets. See README.md for the API and docs/simulator.md for what is modelled.
 */
export { SimVm, SIMULATED_STATE_CHECKS, type SimVmOptions, type HookOptions, type SimVmEvents } from './kvm/vm.js';
export { SimVcpu, type AccessKind, type AccessTarget, type DescriptorId, type KvmInterceptions } from './kvm/vcpu.js';
export type { KvmiHook } from './kvm/hook.js';
export type { EventEnd, EventRecord, GuestOutcome, GuestResult, VmStats } from './kvm/types.js';
export { SimQemu, type SimQemuOptions, type SimQemuState, type SimQemuStats, type ShutdownReport } from './qemu.js';
export { Simulator, type SimulatorOptions, type SimStats, type SimSummary } from './fleet.js';
export { runSimCli, simSchema, type SimCliIo } from './cli.js';
export { DEFAULT_HOST_PROFILE, loadHostProfile, parseHostProfile, type HostProfile } from './profile.js';
export { ensureFdLimit, readFdLimit, type FdLimit } from './limits.js';
export { SimError, HostErrno, hostErrnoName, type SimErrorCode, type HostErrnoName } from './errors.js';
export { GuestMemory, PAGE_SIZE, type GfnRange } from './guest/memory.js';
export { translate, KERNEL_BASE, PAGE_TABLE_BASE, type PageTableLayout } from './guest/paging.js';
export { CpuState, MSR, MTRR_TYPE, VECTOR } from './guest/cpu.js';
export { mulberry32, deriveSeed } from './prng.js';
