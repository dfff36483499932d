/**
 * The host capability profile: what the simulated host's CPU and KVM module can do. Loaded from a JSON
 * file (`--host-profile`); every key is optional and unknown keys are errors.
 *
 * ```json
 * { "singlestep": false, "descriptorExits": true, "userspaceBpDebug": false,
 *   "tscScaling": true, "tscKhz": 2500000, "introspection": true,
 *   "msrFilterDenyWrite": ["0xc0000082"], "xsaveFeatures": "0x7",
 *   "heki": true, "hostCr0": "0x80050033", "hostCr4": "0x370ef0" }
 * ```
 */
import { readFile } from 'node:fs/promises';

import { SimError } from './errors.js';

export interface HostProfile {
  /** `kvm.introspection=on` (HOOK/UNHOOK/PREUNHOOK give EPERM when off). */
  readonly introspection: boolean;
  /** VMX monitor trap flag: GET_VERSION `features.singlestep`, else CONTROL_SINGLESTEP → EOPNOTSUPP (SVM). */
  readonly singlestep: boolean;
  /** Descriptor-table exits (`desc_ctrl_supported`), else enabling DESCRIPTOR → EOPNOTSUPP. */
  readonly descriptorExits: boolean;
  /** Userspace (QEMU gdbstub) already intercepts #BP: enabling BREAKPOINT → EBUSY. */
  readonly userspaceBpDebug: boolean;
  /** `kvm_has_tsc_control`: VCPU_GET_INFO reports `tscKhz · 1000`, else 0. */
  readonly tscScaling: boolean;
  readonly tscKhz: number;
  /** MSRs whose writes the userspace MSR filter denies: CONTROL_MSR enable → EPERM. */
  readonly msrFilterDenyWrite: readonly number[];
  /** XCR0 bits the host supports (XSETBV / SET_XSAVE validation). */
  readonly xsaveFeatures: bigint;
  /**
   * Fault injection: allocation checks that fail (→ -KVM_ENOMEM), so the ENOMEM paths of
   * SET_PAGE_ACCESS, GET_REGISTERS, GET_XSAVE and GET_MAP_TOKEN can be exercised.
   */
  readonly failAllocations: readonly AllocationCheck[];
  /**
   * `CONFIG_HEKI` (docs/heki.md): the lock hypercall and the notification caps work. Without it
   * CHECK_EXTENSION still answers 3, ENABLE_CAP fails EINVAL and the hypercalls return -KVM_ENOSYS.
   */
  readonly heki: boolean;
  /** The host's CR0: a Heki CR0 pin must be a subset (heki unconfirmed `host-cr`). */
  readonly hostCr0: bigint;
  /** The host's CR4: Heki CR4 pins are masked with it (default: SMEP, SMAP, UMIP, FSGSBASE; no CET). */
  readonly hostCr4: bigint;
}

export const ALLOCATION_CHECKS = ['page-access-alloc', 'token-alloc', 'reply-alloc', 'xsave-alloc'] as const;
export type AllocationCheck = (typeof ALLOCATION_CHECKS)[number];

export const DEFAULT_HOST_PROFILE: HostProfile = Object.freeze({
  introspection: true,
  singlestep: true,
  descriptorExits: true,
  userspaceBpDebug: false,
  tscScaling: true,
  tscKhz: 2_500_000,
  msrFilterDenyWrite: Object.freeze([]) as readonly number[],
  xsaveFeatures: 0x7n,
  failAllocations: Object.freeze([]) as readonly AllocationCheck[],
  heki: true,
  hostCr0: 0x80050033n,
  hostCr4: 0x370ef0n,
});

const BOOL_KEYS = ['introspection', 'singlestep', 'descriptorExits', 'userspaceBpDebug', 'tscScaling', 'heki'] as const;

function intOf(v: unknown, key: string, max: number): number {
  const n = typeof v === 'string' && /^(0x[0-9a-f]+|\d+)$/i.test(v) ? Number(v) : v;
  if (typeof n !== 'number' || !Number.isInteger(n) || n < 0 || n > max) {
    throw new SimError('bad-host-profile', `host profile: ${key} must be an integer in [0, ${max}], got ${JSON.stringify(v)}`);
  }
  return n;
}

/** Validate a parsed JSON host profile (partial) and fill the defaults. */
export function parseHostProfile(json: unknown, base: HostProfile = DEFAULT_HOST_PROFILE): HostProfile {
  if (typeof json !== 'object' || json === null || Array.isArray(json)) {
    throw new SimError('bad-host-profile', 'host profile: expected a JSON object');
  }
  const src = json as Record<string, unknown>;
  const out: { -readonly [K in keyof HostProfile]: HostProfile[K] } = { ...base };
  for (const [key, v] of Object.entries(src)) {
    if ((BOOL_KEYS as readonly string[]).includes(key)) {
      if (typeof v !== 'boolean') throw new SimError('bad-host-profile', `host profile: ${key} must be true or false`);
      out[key as (typeof BOOL_KEYS)[number]] = v;
    } else if (key === 'tscKhz') {
      out.tscKhz = intOf(v, key, 0xffffffff);
    } else if (key === 'msrFilterDenyWrite') {
      if (!Array.isArray(v)) throw new SimError('bad-host-profile', 'host profile: msrFilterDenyWrite must be an array');
      out.msrFilterDenyWrite = v.map((x, i) => intOf(x, `msrFilterDenyWrite[${i}]`, 0xffffffff));
    } else if (key === 'xsaveFeatures') {
      out.xsaveFeatures = BigInt(intOf(v, key, 0xffffffff));
      if ((out.xsaveFeatures & 1n) === 0n) throw new SimError('bad-host-profile', 'host profile: xsaveFeatures must include x87 (bit 0)');
    } else if (key === 'hostCr0' || key === 'hostCr4') {
      out[key] = BigInt(intOf(v, key, 0xffffffff));
    } else if (key === 'failAllocations') {
      if (!Array.isArray(v) || !v.every((x) => (ALLOCATION_CHECKS as readonly unknown[]).includes(x))) {
        throw new SimError('bad-host-profile', `host profile: failAllocations must be a list of ${ALLOCATION_CHECKS.join(', ')}`);
      }
      out.failAllocations = Object.freeze([...(v as AllocationCheck[])]);
    } else {
      throw new SimError('bad-host-profile', `host profile: unknown key ${JSON.stringify(key)}`);
    }
  }
  return Object.freeze(out);
}

/** Read and validate a host profile JSON file. */
export async function loadHostProfile(path: string): Promise<HostProfile> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    throw new SimError('bad-host-profile', `host profile ${path}: ${(err as Error).message}`, { cause: err });
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (err) {
    throw new SimError('bad-host-profile', `host profile ${path}: not JSON: ${(err as Error).message}`, { cause: err });
  }
  return parseHostProfile(json);
}
