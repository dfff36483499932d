/**
 * Real KVMI event frames for tests, built with @periscope/kvmi's kernel-side encoder (`encodeVcpuEvent`),
 * with padding noise so a reader that trusts padding fails here.
 */
import { encodeVcpuEvent, structs, VcpuEventView, type EventKey } from '@periscope/kvmi';
import type { VcpuEventKind } from '@periscope/verdicts';

export type Regs = Partial<Record<keyof structs.KvmRegs, bigint>>;
export interface FrameOptions {
  vcpu?: number;
  seq?: number;
  mode?: number;
  rip?: bigint;
  regs?: Regs;
}

export function arch(o: FrameOptions = {}): structs.VcpuEventArch {
  const a = structs.kvmi_vcpu_event_arch.zero();
  a.mode = o.mode ?? 8;
  a.regs.rip = o.rip ?? 0xffffffff81234567n;
  a.sregs.cr0 = 0x80050033n;
  a.sregs.cr4 = 0x3406f0n;
  for (const [k, v] of Object.entries(o.regs ?? {})) (a.regs as Record<string, bigint>)[k] = v;
  return a;
}

export function frame(kind: VcpuEventKind, data: Record<string, unknown> | undefined, o: FrameOptions = {}): Buffer {
  return encodeVcpuEvent({
    event: kind as EventKey,
    seq: o.seq ?? 7,
    vcpu: o.vcpu ?? 1,
    arch: arch(o),
    ...(data ? { data } : {}),
    paddingNoise: 0xa5,
  });
}

export const crEvent = (cr: number, old_value: bigint, new_value: bigint, o?: FrameOptions) => frame('CR', { cr, old_value, new_value }, o);
export const msrEvent = (msr: number, old_value: bigint, new_value: bigint, o?: FrameOptions) => frame('MSR', { msr, old_value, new_value }, o);
export const xsetbvEvent = (xcr: number, old_value: bigint, new_value: bigint, o?: FrameOptions) => frame('XSETBV', { xcr, old_value, new_value }, o);
export const pfEvent = (gva: bigint, gpa: bigint, access: number, o?: FrameOptions) => frame('PF', { gva, gpa, access }, o);
export const bpEvent = (gpa: bigint, insn_len = 1, o?: FrameOptions) => frame('BREAKPOINT', { gpa, insn_len }, o);
export const descEvent = (descriptor: number, write: number, o?: FrameOptions) => frame('DESCRIPTOR', { descriptor, write }, o);
export const trapEvent = (nr: number, error_code: number, address: bigint, o?: FrameOptions) => frame('TRAP', { nr, error_code, address }, o);
export const ssEvent = (failed: number, o?: FrameOptions) => frame('SINGLESTEP', { failed }, o);
export const hypercallEvent = (o?: FrameOptions) => frame('HYPERCALL', undefined, o);
export const pauseEvent = (o?: FrameOptions) => frame('PAUSE', undefined, o);

/** A view over a frame, as the session hands it to `onVcpuEvent`. */
export function viewOf(f: Buffer): VcpuEventView {
  const v = new VcpuEventView();
  if (!v.reset(f)) throw new Error('not a vCPU event frame');
  return v;
}
