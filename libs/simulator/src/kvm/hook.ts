/**
 * One hook of one VM: KVM's `struct kvm_introspection`. Created by KVM_INTROSPECTION_HOOK, freed by
 * UNHOOK. Owns the socket (its reader is the `kvmi-recv` thread), the permission masks set by the
 * device manager, the VM-wide event switch (UNHOOK), `restore_on_unhook`, the event sequence counter
 * and the outstanding map tokens.
 */
import type { Socket } from 'node:net';

import {
  commands,
  KVMI_NUM_COMMANDS,
  KVMI_NUM_EVENTS,
  type FrameReader,
  type FrameWriter,
  type KernelState,
} from '@periscope/kvmi';

const ALWAYS_ALLOWED: readonly number[] = Object.values(commands)
  .filter((c) => c.alwaysAllowed)
  .map((c) => c.id);

export class KvmiHook {
  /** False once the connection is lost (socket shut down); the session stays until UNHOOK. */
  alive = true;
  /** Why the connection was lost, once it was. */
  lossReason: string | undefined;
  /** The shared VM + vCPU event counter; the first event of a hook has seq 1. */
  private seq = 0;
  /** KVM_INTROSPECTION_COMMAND mask, indexed by message id (< KVMI_NUM_COMMANDS). */
  readonly commandAllowed: boolean[] = new Array<boolean>(KVMI_NUM_COMMANDS).fill(false);
  /** KVM_INTROSPECTION_EVENT mask, indexed by event id (< KVMI_NUM_EVENTS). */
  readonly eventAllowed: boolean[] = new Array<boolean>(KVMI_NUM_EVENTS).fill(false);
  /** VM_CONTROL_EVENTS(UNHOOK). */
  unhookEventEnabled = false;
  /** VM_CONTROL_CLEANUP; 1 by default in v12. */
  restoreOnUnhook = true;
  /** GET_MAP_TOKEN tokens not yet used (hex of the 32 bytes). */
  readonly mapTokens = new Set<string>();
  reader!: FrameReader;
  writer!: FrameWriter;
  readonly kernelState: KernelState;

  constructor(
    readonly generation: number,
    readonly socket: Socket,
    readonly uuid: Uint8Array,
    vcpuCount: () => number,
    isVcpuReady: (vcpu: number) => boolean,
    extensions: boolean,
  ) {
    this.resetCommands();
    this.kernelState = {
      isCommandAllowed: (id) => this.isCommandAllowed(id),
      isEventAllowed: (id) => this.isEventAllowed(id),
      vcpuCount,
      isVcpuReady,
      extensionsEnabled: () => extensions,
    };
  }

  /** "Disallow all": only the three always-allowed commands remain (§7.1). */
  resetCommands(): void {
    this.commandAllowed.fill(false);
    for (const id of ALWAYS_ALLOWED) this.commandAllowed[id] = true;
  }

  static isAlwaysAllowed(id: number): boolean {
    return ALWAYS_ALLOWED.includes(id);
  }

  isCommandAllowed(id: number): boolean {
    return this.commandAllowed[id] === true;
  }
  isEventAllowed(id: number): boolean {
    return this.eventAllowed[id] === true;
  }

  nextSeq(): number {
    this.seq = (this.seq + 1) >>> 0;
    return this.seq;
  }

  /**
   * Queue one whole message on the socket. False when the connection is already gone (the caller
   * treats it as a failed send). A later write failure surfaces as a connection loss.
   */
  send(frame: Buffer): boolean {
    if (!this.alive || !this.writer.writable) return false;
    void this.writer.send(frame);
    return true;
  }
}
