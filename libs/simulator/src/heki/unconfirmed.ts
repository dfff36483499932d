/**
 * Every reading the simulator (KVM side and VMM side of Heki) chose where `../shared/spec/heki.md` says
 * UNCONFIRMED or is silent. One place, as `libs/kvmi/src/unconfirmed.ts` is for KVMI; rendered in
 * docs/heki.md ("Readings chosen") and referenced by key from the code.
 */
export interface HekiUnconfirmed {
  readonly key: string;
  /** What the sheet says (or does not). */
  readonly sheet: string;
  /** What we do. */
  readonly reading: string;
}

export const HEKI_UNCONFIRMED: readonly HekiUnconfirmed[] = Object.freeze([
  {
    key: 'kvmi-heki-ordering',
    sheet: '§5: Heki and KVMI were never combined; how a KVMI CR event and a Heki pin interact is undefined.',
    reading:
      'A guest MOV to CR0/CR4 first passes the architectural checks, then raises the KVMI CR event (when enabled for that CR and the value changes); the Heki pin check then runs on the value the tool allowed (new_val on CONTINUE). A violation is a Heki denial (exit 40 with cr_value = that value, or #GP(0) at once); the tool is not told. A tool that denies by writing back the old value never triggers Heki.',
  },
  {
    key: 'pins-survive-reset',
    sheet: '§2: whether pins survive a guest reset is not handled in the patches.',
    reading: 'Guest reset is not modelled; pins live as long as the SimVm.',
  },
  {
    key: 'svm-coverage',
    sheet: '§2: the patch hooks the VMX exit path only; SVM coverage is unconfirmed.',
    reading: 'Every guest MOV to CR0/CR4 is checked (the simulated CPU is VMX-like).',
  },
  {
    key: 'heki-boot-param',
    sheet: '§2: the guest is activated by `heki=`; accepted values unconfirmed.',
    reading: 'The simulated guest runs its Heki init only when asked (`hekiGuestInit`, the `heki-*` scenario steps); no boot parameter is parsed.',
  },
  {
    key: 'configure-zero-bits',
    sheet: '§2/§3.3: a CR4 pin whose bits the host lacks all is silently reduced to 0 and returns 0; whether a configure exit is raised for cr_pinned = 0 is not said.',
    reading: 'The pin succeeded (RAX 0), so the configure exit is raised, with cr_pinned = 0.',
  },
  {
    key: 'hypercall-cpl',
    sheet: '§2: standard KVM hypercalls must come from CPL 0 (KVM returns -KVM_EPERM otherwise).',
    reading: 'Applied to the Heki hypercalls (13, 14): -KVM_EPERM at CPL > 0, before any other check. (The KVMI hypercall keeps the simulator\'s earlier behaviour: no CPL check.)',
  },
  {
    key: 'host-cr',
    sheet: '§2: "every bit of a1 must be set in the host\'s current CR0"; CR4 bits are masked with the host CR4.',
    reading: 'The host\'s CR0/CR4 are the host profile\'s `hostCr0` / `hostCr4` (defaults 0x80050033 and 0x370ef0: SMEP, SMAP, UMIP, FSGSBASE, no CET), not the guest\'s.',
  },
  {
    key: 'protect-memory',
    sheet: '§4: KVM_HC_PROTECT_MEMORY sets EPT permissions; no exit reaches the VMM.',
    reading: 'Out of scope: hypercall 14 returns -KVM_ENOSYS with or without Heki.',
  },
  {
    key: 'vmm-denial-wait',
    sheet: 'The RFC VMM re-enters at once (KVM injects #GP). Periscope\'s sink contract (heki.proto) lets the agent choose STOP_VM within a deadline.',
    reading:
      'The simulated VMM asks the sink with the registration\'s denial_timeout_ms (100 ms before a registration) and takes default_completion (INJECT_GP before a registration) when the sink is unreachable, late or answers UNSPECIFIED. Configure exits are reported without waiting: the vCPU re-enters at once.',
  },
]);
