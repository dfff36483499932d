/**
 * The `/dev/kvmmem` addon (`native/kvmmem.cc`, built by `native/build.mjs` from the package's `build`
 * script). Loaded lazily: a process that never maps (e.g. `--help`) does not need it.
 */
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';

import { GuestAgentError } from './errors.js';

/** A local mapping: its address in this process and a zero-copy ArrayBuffer over it (detached on unmap). */
export interface NativeMapping {
  readonly address: bigint;
  readonly buffer: ArrayBuffer;
}

/** An ABI v2 region: what the module answered, and our MAP_SHARED view of it. */
export interface NativeRegion extends NativeMapping {
  readonly start: bigint;
  readonly length: bigint;
}

/** One open of the device (or, without a path, only the local mapping primitives). */
export interface NativeHandle {
  /** libkvmi's detection: ioctl(KVM_GUEST_MEM_UNMAP, 0); ENOTTY → 1, anything else → 2. */
  probe(): { abi: 1 | 2; errno: number };
  v1Map(token: Uint8Array, gpa: bigint): NativeMapping;
  v1Unmap(gva: bigint): void;
  v2Open(uuid: Uint8Array): void;
  v2Map(token: Uint8Array, gpa: bigint): NativeRegion;
  v2Unmap(start: bigint): void;
  reservePage(): NativeMapping;
  mapFile(path: string, offset: bigint, length: number, at?: bigint): { address: bigint; buffer: ArrayBuffer | null };
  release(address: bigint): void;
  close(): void;
  stats(): { mappings: number; bytes: number; closed: boolean; fd: number };
}

export interface KvmmemAddon {
  KvmmemHandle: new (path?: string) => NativeHandle;
  /** The ioctl request numbers compiled into the addon (kvmmem.md §3.2, §4.2). */
  requests: {
    KVM_INTRO_MEM_MAP: number;
    KVM_INTRO_MEM_UNMAP: number;
    KVM_GUEST_MEM_OPEN: number;
    KVM_GUEST_MEM_MAP: number;
    KVM_GUEST_MEM_UNMAP: number;
  };
  pageSize: number;
  /** SHA-256 of each chunk of the view (32 bytes per digest, the last chunk may be shorter). */
  sha256Chunks(view: Uint8Array, chunkSize: number): Buffer;
  /** SHA-256 of consecutive chunks of the concatenated views (cut at chunk boundaries). */
  sha256Segments(views: readonly Uint8Array[], chunkSize: number): Buffer;
  /** The same on a libuv worker thread; the memory must stay mapped until the promise settles. */
  sha256SegmentsAsync(views: readonly Uint8Array[], chunkSize: number): Promise<Buffer>;
}

/** Where the built addon lives (the same from `src/` and `dist/`). */
export const ADDON_PATH = fileURLToPath(new URL('../native/build/Release/kvmmem.node', import.meta.url));

let addon: KvmmemAddon | undefined;

export function loadAddon(): KvmmemAddon {
  if (addon) return addon;
  if (!existsSync(ADDON_PATH)) {
    throw new GuestAgentError('addon-missing', `the kvmmem addon is not built (${ADDON_PATH}); run the guest-agent build (node libs/guest-agent/native/build.mjs)`);
  }
  addon = createRequire(import.meta.url)(ADDON_PATH) as KvmmemAddon;
  return addon;
}
