/**
 * Reading vCPU events raw: take the next message, check it byte for byte against a frame built from the
 * sheet's §5.2 layout and the vCPU's current state (the vCPU is blocked while its event waits, so its
 * state at our read equals its state at the send), with the padding KVM leaves uninitialised masked.
 */
import { expect } from 'vitest';

import { maskEventPadding, vcpuEventFrame } from './bytes.js';
import { archOf, type Rig } from './rig.js';

export interface ExpectedEvent {
  seq: number;
  event: number;
  vcpu: number;
  specific?: string;
  /** 8 for the 64-bit boot state. */
  mode?: number;
}

/** The next message must be this vCPU event; returns its raw hex. */
export async function expectEvent(r: Rig, e: ExpectedEvent, timeoutMs = 3000): Promise<string> {
  const f = await r.conn.next(timeoutMs);
  const arch = archOf(r.vcpu(e.vcpu), e.mode ?? 8);
  expect(maskEventPadding(f)).toBe(
    vcpuEventFrame({ seq: e.seq, event: e.event, vcpu: e.vcpu, arch, ...(e.specific !== undefined ? { specific: e.specific } : {}) }),
  );
  return f;
}
