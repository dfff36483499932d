/**
 * Calls of the synthetic kernel's `sim_copy_tagged(dst, src, tag, len)` and their ground truth.
 *
 * The function (kernel.ts: `rep movsb; ret`) takes SysV arguments — RDI = destination, RSI = source,
 * RDX = a tag (the caller's call id), RCX = length — so a tool that traces it with breakpoints can read its
 * arguments from the registers at the BREAKPOINT event. The simulator records what it passed and what
 * happened, independently of any tool: each call's arguments, when it started and ended, how the run ended
 * (`completed` = returned to its caller; an INT3 left in place would end it with `exception` #BP or a
 * livelock) and whether the destination holds the source bytes afterwards. A traced guest must show the
 * same ground truth as an untraced one: every call completed, every copy landed.
 */
import type { SimVcpu } from '../kvm/vcpu.js';
import type { RunOutcome } from '../kvm/types.js';
import type { KernelLayout } from './kernel.js';
import type { VmMemory } from './ram.js';

/** One call of `sim_copy_tagged`, as the simulator made it. */
export interface TaggedCall {
  readonly vcpu: number;
  /** RDX: unique per VM, (vCPU << 32) | n. */
  readonly tag: bigint;
  /** RDI, RSI, RCX. */
  readonly dst: bigint;
  readonly src: bigint;
  readonly len: bigint;
  /** `performance.now()` before the call was queued and after its run ended. */
  readonly startedMs: number;
  readonly endedMs: number;
  readonly outcome: RunOutcome;
  /** The exception vector delivered to the guest, when the run ended with one. */
  readonly vector?: number;
  /** The destination holds the source's bytes after the call. */
  readonly copied: boolean;
}

/** The ground truth of one VM's `sim_copy_tagged` calls (bounded: the oldest are dropped first). */
export class TaggedCallLog {
  private readonly list: TaggedCall[] = [];
  private readonly counters = new Map<number, number>();
  /** Calls made in total (also those dropped from the bounded list). */
  total = 0;

  constructor(readonly capacity = 100_000) {}

  get calls(): readonly TaggedCall[] {
    return this.list;
  }

  /** The next tag for a vCPU: (vCPU << 32) | n, n from 1. */
  nextTag(vcpu: number): bigint {
    const n = (this.counters.get(vcpu) ?? 0) + 1;
    this.counters.set(vcpu, n);
    return (BigInt(vcpu) << 32n) | BigInt(n);
  }

  add(c: TaggedCall): void {
    this.total++;
    this.list.push(c);
    if (this.list.length > this.capacity) this.list.splice(0, this.list.length - this.capacity);
  }
}

export interface TaggedCopyTarget {
  readonly kernel: KernelLayout;
  readonly memory: VmMemory;
  readonly taggedCalls: TaggedCallLog;
}

/**
 * Call `sim_copy_tagged` on `vcpu` from the vCPU's task stack, returning to `cpu_idle`: copy `len` (1–64)
 * bytes of `linux_banner` (from `srcOffset`) into the vCPU's 64-byte slice of `sim_copy_buffer`, and record it.
 */
export async function callTaggedCopy(vm: TaggedCopyTarget, vcpu: SimVcpu, len: number, srcOffset: number): Promise<TaggedCall> {
  const k = vm.kernel;
  const n = BigInt(Math.min(64, Math.max(1, len)));
  const slice = (vcpu.index % 64) * 64;
  const dst = k.symbol('sim_copy_buffer', slice);
  const src = k.symbol('linux_banner', srcOffset % 64);
  const tag = vm.taggedCalls.nextTag(vcpu.index);
  // Clear the destination first, so that "copied" can only hold when this call copied.
  vm.memory.ram.write(k.symbolPhys('sim_copy_buffer', slice), Buffer.alloc(64));
  const startedMs = performance.now();
  const r = await vcpu.run({ entry: k.symbol('sim_copy_tagged'), returnTo: k.symbol('cpu_idle'), regs: { rsp: k.taskStackTop(vcpu.index), rdi: dst, rsi: src, rdx: tag, rcx: n } });
  const endedMs = performance.now();
  const want = vm.memory.read(k.symbolPhys('linux_banner', srcOffset % 64), Number(n));
  const got = vm.memory.read(k.symbolPhys('sim_copy_buffer', slice), Number(n));
  const call: TaggedCall = { vcpu: vcpu.index, tag, dst, src, len: n, startedMs, endedMs, outcome: r.outcome, ...(r.vector !== undefined ? { vector: r.vector } : {}), copied: want !== null && got !== null && want.equals(got) };
  vm.taggedCalls.add(call);
  return call;
}
