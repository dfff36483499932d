/**
 * @periscope/x86 — the x86-64 rules the simulated guest obeys, so that "blocked" in a test means
 * blocked on real hardware.
 *
 * - `ram`: guest physical memory as a sparse file (`<dir>/<uuid>.ram`, offset = GPA), holes, limit.
 * - `paging`: 4-level paging walk, `translate` for KVMI_VCPU_TRANSLATE_GVA, `PageTableBuilder`.
 * - `access`: SDM §4.6 access rights (WP, U/S, SMEP, SMAP, XD) and §4.7 #PF error codes.
 * - `ept`: per-GFN allowed R/W/X bits as KVMI_VM_SET_PAGE_ACCESS sets them.
 * - `instructions`: hand-encoded instruction table, `placeInstruction`, `matchInstruction`.
 * - `constants`: CR0/CR4/EFER/RFLAGS bits, MSR indexes, vectors, #PF error-code bits, PTE bits.
 */
export * from './constants.js';
export * from './errors.js';
export * from './ram.js';
export * from './paging.js';
export * from './access.js';
export * from './ept.js';
export * from './instructions.js';
