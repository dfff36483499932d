/**
 * Every reading Periscope chose where a fact sheet says UNCONFIRMED — in one place, so that a
 * corrected fact is a one-line change. `docs/protocol.md` is generated from `unconfirmedChoices`
 * (`npm run docs:protocol`), and a test fails when the document is stale.
 */

export interface UnconfirmedChoice {
  /** Stable key, referenced from code that depends on the choice. */
  readonly key: string;
  /** Where the sheet leaves it open. */
  readonly sheet: string;
  readonly question: string;
  /** What we do. */
  readonly choice: string;
  readonly why: string;
}

/** KVM_CAP_INTROSPECTION in v12 (probably ≥ 206). We never rely on it: device managers probe HOOK. */
export const KVM_CAP_INTROSPECTION_ASSUMED = 206;
/** HOOK / UNHOOK ioctl numbers inferred from v10/v11 (0xc8/0xc9) and v12's 0xca–0xcc. */
export const KVM_INTROSPECTION_HOOK = 0x4018aec8;
export const KVM_INTROSPECTION_UNHOOK = 0xaec9;
export const KVM_INTROSPECTION_COMMAND = 0x4008aeca;
export const KVM_INTROSPECTION_EVENT = 0x4008aecb;
export const KVM_INTROSPECTION_PREUNHOOK = 0xaecc;
/** How many GET_MAP_TOKEN tokens may be outstanding per VM before EAGAIN. */
export const MAX_OUTSTANDING_MAP_TOKENS = 64;
/** After a CRASH reply, the simulated vCPU exits with KVM_EXIT_SHUTDOWN when the event completes. */
export const CRASH_STOPS_VCPU_AFTER_EVENT = true;
/** VM_SET_PAGE_ACCESS: the "entries do not fit" hard error is checked before header padding. */
export const SET_PAGE_ACCESS_LENGTH_BEFORE_PADDING = true;

export const unconfirmedChoices: readonly UnconfirmedChoice[] = [
  {
    key: 'cap-introspection',
    sheet: 'kvmi-v12.md §7',
    question: 'The v12 value of KVM_CAP_INTROSPECTION.',
    choice: `Assume ${KVM_CAP_INTROSPECTION_ASSUMED}, but never depend on it: the simulated device manager probes the HOOK ioctl.`,
    why: '5.15 ends at 205; the sheet says probably ≥ 206 and recommends probing.',
  },
  {
    key: 'hook-ioctl-numbers',
    sheet: 'kvmi-v12.md §7',
    question: 'The v12 numbers of KVM_INTROSPECTION_HOOK / UNHOOK.',
    choice: 'HOOK = 0x4018AEC8, UNHOOK = 0xAEC9 (nr 0xc8/0xc9), as in v10/v11.',
    why: 'v12 gives 0xca–0xcc for COMMAND/EVENT/PREUNHOOK, which continues the v10/v11 numbering.',
  },
  {
    key: 'crash-action',
    sheet: 'kvmi-v12.md §3.3',
    question: 'Whether and when KVM_RUN returns KVM_EXIT_SHUTDOWN after a CRASH reply.',
    choice:
      'The event takes its not-CONTINUE path; the simulated vCPU then leaves KVM_RUN with KVM_EXIT_SHUTDOWN and sends no further events. Periscope never relies on CRASH as an immediate stop: responses that must stop a guest also pause its vCPUs.',
    why: 'v12-48 sets exit_reason = KVM_EXIT_SHUTDOWN; the most plausible intent is a stop at the next exit to userspace.',
  },
  {
    key: 'handshake-offset-20',
    sheet: 'kvmi-v7-libkvmi.md §3',
    question: 'Bytes 20–23 of the QEMU handshake struct: padding, or u8 cpu_type + padding[3].',
    choice: 'Opaque: written as zero, ignored on read.',
    why: 'QEMU and libkvmi declare padding; only one third-party reader sees cpu_type.',
  },
  {
    key: 'map-token-limit',
    sheet: 'kvmmem.md §1',
    question: 'How many GET_MAP_TOKEN tokens may accumulate before -KVM_EAGAIN.',
    choice: `${MAX_OUTSTANDING_MAP_TOKENS} outstanding tokens per VM.`,
    why: 'Tokens are single-use; a small bound keeps an abusive tool from exhausting host memory.',
  },
  {
    key: 'set-page-access-check-order',
    sheet: 'kvmi-v12.md §4.1',
    question: 'VM_SET_PAGE_ACCESS with non-zero header padding and entries that do not fit: hard error or EINVAL first.',
    choice: 'The length (hard error) is checked first, then header padding (EINVAL, no entry applied).',
    why: 'A frame whose entries do not fit cannot be parsed at all; the handler can only look at padding of a whole message.',
  },
  {
    key: 'extension-ids',
    sheet: 'issue #3 (seed extensions)',
    question: 'Wire ids of GET_MAP_TOKEN (seed v6) and VM_GET_MAX_GFN (seed v8), absent from v12.',
    choice: 'GET_MAP_TOKEN = VM id 22, VM_GET_MAX_GFN = VM id 24: unused even ids below KVMI_NUM_COMMANDS, so a device manager allow-all (id −1) covers them. A pure v12 kernel answers ENOSYS (command) and ENOENT (CHECK_COMMAND).',
    why: 'Keeps the v12 numbering intact and lets tools capability-check with VM_CHECK_COMMAND.',
  },
];
