/**
 * Per-GFN access restrictions set with KVMI_VM_SET_PAGE_ACCESS (the EPT permissions the
 * introspector controls). Bits say which accesses are **allowed**: R = 1, W = 2, X = 4; 7 (rwx)
 * means unrestricted and removes the entry.
 *
 * An access that uses a cleared bit is a violation; KVM sends one PF event per violated bit, each
 * carrying exactly one bit. When one instruction makes several kinds of access to a restricted page,
 * `violations` reports them in the order **read, write, execute** (R, W, X). The v12 fact sheet says
 * the order is "set by the emulator"; this fixed order is our reading, documented here and in the
 * README, and it is the order the simulator must send its PF events in.
 */
import type { AccessKind } from './access.js';
import { X86Error } from './errors.js';

export const EPT_R = 1;
export const EPT_W = 2;
export const EPT_X = 4;
export const EPT_RWX = 7;

/** One access bit. */
export type EptBit = 1 | 2 | 4;

/** The access bit an access kind uses. */
export const EPT_BIT_OF: Readonly<Record<AccessKind, EptBit>> = { read: EPT_R, write: EPT_W, execute: EPT_X };

/** The reporting order of violated bits. */
export const EPT_VIOLATION_ORDER: readonly EptBit[] = [EPT_R, EPT_W, EPT_X];

export class EptAccess {
  private readonly restricted = new Map<bigint, number>();

  /** Set the allowed bits of `gfn` (an integer 0..7; 7 lifts the restriction). */
  set(gfn: bigint, allowed: number): void {
    if (typeof gfn !== 'bigint' || gfn < 0n) throw new X86Error('invalid-argument', `gfn ${String(gfn)} is not a non-negative bigint`);
    if (!Number.isInteger(allowed) || allowed < 0 || allowed > EPT_RWX) {
      throw new X86Error('invalid-argument', `access bits ${allowed} are not a subset of rwx (0..7)`);
    }
    if (allowed === EPT_RWX) this.restricted.delete(gfn);
    else this.restricted.set(gfn, allowed);
  }

  /** Allowed bits of `gfn` (7 when unrestricted). */
  get(gfn: bigint): number {
    return this.restricted.get(gfn) ?? EPT_RWX;
  }

  /** The single bit an access of this kind violates on `gfn`, or 0 when it is allowed. */
  check(gfn: bigint, access: AccessKind): 0 | EptBit {
    const bit = EPT_BIT_OF[access];
    if (bit === undefined) throw new X86Error('invalid-argument', `unknown access kind ${String(access)}`);
    return (this.get(gfn) & bit) === 0 ? bit : 0;
  }

  /**
   * Every violated bit for a set of accesses to `gfn` (a mask of R/W/X, or a list of kinds), one
   * entry per bit, in the order R, W, X.
   */
  violations(gfn: bigint, accesses: number | readonly AccessKind[]): EptBit[] {
    let mask = 0;
    if (typeof accesses === 'number') {
      if (!Number.isInteger(accesses) || accesses < 0 || accesses > EPT_RWX) {
        throw new X86Error('invalid-argument', `access mask ${accesses} is not a subset of rwx`);
      }
      mask = accesses;
    } else {
      for (const a of accesses) {
        const bit = EPT_BIT_OF[a];
        if (bit === undefined) throw new X86Error('invalid-argument', `unknown access kind ${String(a)}`);
        mask |= bit;
      }
    }
    const denied = mask & ~this.get(gfn);
    return EPT_VIOLATION_ORDER.filter((b) => (denied & b) !== 0);
  }

  /** True when `gfn` has a restriction. */
  isRestricted(gfn: bigint): boolean {
    return this.restricted.has(gfn);
  }

  /** Number of restricted GFNs. */
  get size(): number {
    return this.restricted.size;
  }

  /** Restricted GFNs and their allowed bits. */
  entries(): IterableIterator<[bigint, number]> {
    return this.restricted.entries();
  }

  /** Lift every restriction. */
  clear(): void {
    this.restricted.clear();
  }
}
