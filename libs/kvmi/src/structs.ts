/**
 * Every struct that crosses a Periscope wire boundary with KVM, QEMU or the guest, declared once.
 *
 * Names are the C names used by the fact sheets (`kvmi-v12.md`, `kvmi-v7-libkvmi.md`, `kvmmem.md`,
 * `heki.md`) and by `struct-sizes*.json`; field names are the C field names. Layout tests compare every
 * declaration here with those JSON files, which are written independently of this code.
 */
import { bytes, cstring, nested, pad, s32, s64, struct, u16, u32, u64, u64Array, u8, type ValueOf } from './layout.js';

// ---- framing (kvmi-v12.md §2) -----------------------------------------------------------------

export const kvmi_msg_hdr = struct('kvmi_msg_hdr', { id: u16, size: u16, seq: u32 });
export const kvmi_error_code = struct('kvmi_error_code', { err: s32, padding: pad(4) });
export const kvmi_vcpu_hdr = struct('kvmi_vcpu_hdr', { vcpu: u16, padding1: pad(2), padding2: pad(4) });
export const kvmi_event_hdr = struct('kvmi_event_hdr', { event: u16, padding: pad(2, 3) });

// ---- embedded KVM x86 structs (§6) ------------------------------------------------------------

export const kvm_regs = struct('kvm_regs', {
  rax: u64, rbx: u64, rcx: u64, rdx: u64, rsi: u64, rdi: u64, rsp: u64, rbp: u64,
  r8: u64, r9: u64, r10: u64, r11: u64, r12: u64, r13: u64, r14: u64, r15: u64,
  rip: u64, rflags: u64,
});
export const kvm_segment = struct('kvm_segment', {
  base: u64, limit: u32, selector: u16, type: u8, present: u8, dpl: u8, db: u8, s: u8, l: u8, g: u8,
  avl: u8, unusable: u8, padding: pad(1),
});
export const kvm_dtable = struct('kvm_dtable', { base: u64, limit: u16, padding: pad(2, 3) });
export const kvm_sregs = struct('kvm_sregs', {
  cs: nested(kvm_segment), ds: nested(kvm_segment), es: nested(kvm_segment), fs: nested(kvm_segment),
  gs: nested(kvm_segment), ss: nested(kvm_segment), tr: nested(kvm_segment), ldt: nested(kvm_segment),
  gdt: nested(kvm_dtable), idt: nested(kvm_dtable),
  cr0: u64, cr2: u64, cr3: u64, cr4: u64, cr8: u64, efer: u64, apic_base: u64,
  interrupt_bitmap: u64Array(4),
});
export const kvm_msr_entry = struct('kvm_msr_entry', { index: u32, reserved: pad(4), data: u64 });
/** Header only; `nmsrs` × kvm_msr_entry follow. */
export const kvm_msrs = struct('kvm_msrs', { nmsrs: u32, pad: pad(4) });
export const kvm_xsave = struct('kvm_xsave', { region: bytes(4096, 4) });

// ---- commands and replies (§4) ----------------------------------------------------------------

export const kvmi_features = struct('kvmi_features', { singlestep: u8, padding: pad(1, 7) });
export const kvmi_get_version_reply = struct('kvmi_get_version_reply', {
  version: u32, max_msg_size: u32, features: nested(kvmi_features),
});
export const kvmi_vm_check_command = struct('kvmi_vm_check_command', { id: u16, padding1: pad(2), padding2: pad(4) });
export const kvmi_vm_check_event = struct('kvmi_vm_check_event', { id: u16, padding1: pad(2), padding2: pad(4) });
export const kvmi_vm_get_info_reply = struct('kvmi_vm_get_info_reply', { vcpu_count: u32, padding: pad(4, 3) });
export const kvmi_vm_control_events = struct('kvmi_vm_control_events', {
  event_id: u16, enable: u8, padding1: pad(1), padding2: pad(4),
});
export const kvmi_vm_read_physical = struct('kvmi_vm_read_physical', {
  gpa: u64, size: u16, padding1: pad(2), padding2: pad(4),
});
/** Header only; `size` data bytes follow. */
export const kvmi_vm_write_physical = struct('kvmi_vm_write_physical', {
  gpa: u64, size: u16, padding1: pad(2), padding2: pad(4),
});
export const kvmi_vm_pause_vcpu = struct('kvmi_vm_pause_vcpu', { vcpu: u16, wait: u8, padding1: pad(1), padding2: pad(4) });
export const kvmi_vm_control_cleanup = struct('kvmi_vm_control_cleanup', { enable: u8, padding: pad(1, 7) });
export const kvmi_page_access_entry = struct('kvmi_page_access_entry', { gpa: u64, access: u8, padding: pad(1, 7) });
/** Header only; `count` × kvmi_page_access_entry follow. */
export const kvmi_vm_set_page_access = struct('kvmi_vm_set_page_access', { count: u16, padding1: pad(2), padding2: pad(4) });

export const kvmi_vcpu_get_info_reply = struct('kvmi_vcpu_get_info_reply', { tsc_speed: u64 });
export const kvmi_vcpu_control_events = struct('kvmi_vcpu_control_events', {
  event_id: u16, enable: u8, padding1: pad(1), padding2: pad(4),
});
/** Header only; `nmsrs` × u32 MSR indexes follow. */
export const kvmi_vcpu_get_registers = struct('kvmi_vcpu_get_registers', { nmsrs: u16, padding1: pad(2), padding2: pad(4) });
/** Followed by msrs.nmsrs × kvm_msr_entry. */
export const kvmi_vcpu_get_registers_reply = struct('kvmi_vcpu_get_registers_reply', {
  mode: u32, padding: pad(4), regs: nested(kvm_regs), sregs: nested(kvm_sregs), msrs: nested(kvm_msrs),
});
export const kvmi_vcpu_get_cpuid = struct('kvmi_vcpu_get_cpuid', { function: u32, index: u32 });
export const kvmi_vcpu_get_cpuid_reply = struct('kvmi_vcpu_get_cpuid_reply', { eax: u32, ebx: u32, ecx: u32, edx: u32 });
/** v12 order: `cr` before `enable` (older revisions differ, §12). */
export const kvmi_vcpu_control_cr = struct('kvmi_vcpu_control_cr', { cr: u8, enable: u8, padding1: pad(2), padding2: pad(4) });
export const kvmi_vcpu_inject_exception = struct('kvmi_vcpu_inject_exception', {
  nr: u8, padding1: pad(1), padding2: pad(2), error_code: u32, address: u64,
});
export const kvmi_vcpu_get_xcr = struct('kvmi_vcpu_get_xcr', { xcr: u8, padding: pad(1, 7) });
export const kvmi_vcpu_get_xcr_reply = struct('kvmi_vcpu_get_xcr_reply', { value: u64 });
export const kvmi_vcpu_get_xsave_reply = struct('kvmi_vcpu_get_xsave_reply', { xsave: nested(kvm_xsave) });
export const kvmi_vcpu_set_xsave = struct('kvmi_vcpu_set_xsave', { xsave: nested(kvm_xsave) });
export const kvmi_vcpu_get_mtrr_type = struct('kvmi_vcpu_get_mtrr_type', { gpa: u64 });
export const kvmi_vcpu_get_mtrr_type_reply = struct('kvmi_vcpu_get_mtrr_type_reply', { type: u8, padding: pad(1, 7) });
export const kvmi_vcpu_control_msr = struct('kvmi_vcpu_control_msr', { enable: u8, padding1: pad(1), padding2: pad(2), msr: u32 });
export const kvmi_vcpu_control_singlestep = struct('kvmi_vcpu_control_singlestep', { enable: u8, padding: pad(1, 7) });
export const kvmi_vcpu_translate_gva = struct('kvmi_vcpu_translate_gva', { gva: u64 });
export const kvmi_vcpu_translate_gva_reply = struct('kvmi_vcpu_translate_gva_reply', { gpa: u64 });

// ---- seed extensions (not in v12; capability-checked with VM_CHECK_COMMAND) ------------------

/** kvmmem.md §1: `u64 token[4]`, single use. */
export const kvmi_mem_token = struct('kvmi_mem_token', { token: u64Array(4) });
/** The GET_MAP_TOKEN reply wraps the token (kvmmem.md §1). */
export const kvmi_get_map_token_reply = struct('kvmi_get_map_token_reply', { token: nested(kvmi_mem_token) });
/** VM_GET_MAX_GFN reply: the first inaccessible GFN (an exclusive limit). */
export const kvmi_vm_get_max_gfn_reply = struct('kvmi_vm_get_max_gfn_reply', { gfn: u64 });

// ---- events (§5) ------------------------------------------------------------------------------

export const kvmi_vcpu_event_arch_msrs = struct('kvmi_vcpu_event_arch_msrs', {
  sysenter_cs: u64, sysenter_esp: u64, sysenter_eip: u64, efer: u64, star: u64, lstar: u64, cstar: u64,
  pat: u64, shadow_gs: u64,
});
export const kvmi_vcpu_event_arch = struct('kvmi_vcpu_event_arch', {
  mode: u8, padding: pad(1, 7), regs: nested(kvm_regs), sregs: nested(kvm_sregs), msrs: nested(kvmi_vcpu_event_arch_msrs),
});
export const kvmi_vcpu_event = struct('kvmi_vcpu_event', {
  size: u16, vcpu: u16, padding: pad(4), arch: nested(kvmi_vcpu_event_arch),
});
export const kvmi_vcpu_event_reply = struct('kvmi_vcpu_event_reply', { action: u8, event: u8, padding1: pad(2), padding2: pad(4) });

export const kvmi_vcpu_event_breakpoint = struct('kvmi_vcpu_event_breakpoint', { gpa: u64, insn_len: u8, padding: pad(1, 7) });
export const kvmi_vcpu_event_cr = struct('kvmi_vcpu_event_cr', { cr: u8, padding: pad(1, 7), old_value: u64, new_value: u64 });
export const kvmi_vcpu_event_cr_reply = struct('kvmi_vcpu_event_cr_reply', { new_val: u64 });
export const kvmi_vcpu_event_trap = struct('kvmi_vcpu_event_trap', {
  nr: u8, padding1: pad(1), padding2: pad(2), error_code: u32, address: u64,
});
export const kvmi_vcpu_event_xsetbv = struct('kvmi_vcpu_event_xsetbv', { xcr: u8, padding: pad(1, 7), old_value: u64, new_value: u64 });
export const kvmi_vcpu_event_descriptor = struct('kvmi_vcpu_event_descriptor', { descriptor: u8, write: u8, padding: pad(1, 6) });
export const kvmi_vcpu_event_msr = struct('kvmi_vcpu_event_msr', { msr: u32, padding: pad(4), old_value: u64, new_value: u64 });
export const kvmi_vcpu_event_msr_reply = struct('kvmi_vcpu_event_msr_reply', { new_val: u64 });
export const kvmi_vcpu_event_pf = struct('kvmi_vcpu_event_pf', {
  gva: u64, gpa: u64, access: u8, padding1: pad(1), padding2: pad(2), padding3: pad(4),
});
export const kvmi_vcpu_event_singlestep = struct('kvmi_vcpu_event_singlestep', { failed: u8, padding: pad(1, 7) });

// ---- hooking ioctls (device manager side, §7) -------------------------------------------------

export const kvm_introspection_hook = struct('kvm_introspection_hook', { fd: s32, padding: pad(4), uuid: bytes(16) });
export const kvm_introspection_feature = struct('kvm_introspection_feature', { allow: u32, id: s32 });

// ---- QEMU ↔ introspector handshake (kvmi-v7-libkvmi.md §3) ------------------------------------

/** The older 96-byte form; also the part every QEMU sends first. */
export const kvmi_qemu2introspector = struct('kvmi_qemu2introspector', {
  struct_size: u32, uuid: bytes(16), padding: pad(4), start_time: s64, name: cstring(64),
});
/** The current 104-byte form with `max_gpa`. */
export const qemu_vmi_to_introspector_newer = struct('qemu_vmi_to_introspector_newer', {
  struct_size: u32, uuid: bytes(16), padding: pad(4), start_time: s64, name: cstring(64), max_gpa: u64,
});
export const kvmi_introspector2qemu = struct('kvmi_introspector2qemu', { struct_size: u32, cookie_hash: bytes(20) });

// ---- /dev/kvmmem ioctl arguments (kvmmem.md) --------------------------------------------------

export const kvmi_mem_map = struct('kvmi_mem_map', { token: nested(kvmi_mem_token), gpa: u64, gva: u64 });
export const kvmi_guest_mem_map = struct('kvmi_guest_mem_map', { token: nested(kvmi_mem_token), gpa: u64, length: u64 });

// ---- Heki exit data (heki.md) -----------------------------------------------------------------

/**
 * `reason` then a union: `cr_pinned` (configure) or `cr_value` (denial) overlays the first of
 * `reserved[7]`. Declared with the union's first member and the rest of the reserved area.
 */
export const heki_exit = struct('heki_exit', { reason: u64, cr_value: u64, reserved: pad(8, 6) });
export const heki_pages = struct('heki_pages', { pa: u64, epa: u64, permissions: u64 });

// ---- value types ------------------------------------------------------------------------------

export type KvmRegs = ValueOf<typeof kvm_regs>;
export type KvmSregs = ValueOf<typeof kvm_sregs>;
export type KvmSegment = ValueOf<typeof kvm_segment>;
export type KvmDtable = ValueOf<typeof kvm_dtable>;
export type EventArchMsrs = ValueOf<typeof kvmi_vcpu_event_arch_msrs>;
export type VcpuEventArch = ValueOf<typeof kvmi_vcpu_event_arch>;
export type MsgHeader = ValueOf<typeof kvmi_msg_hdr>;
