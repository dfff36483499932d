/** Protocol constants of KVMI v12 (kvmi-v12.md §2.1, §3, §3.5). */

/** Largest payload after the 8-byte header: 4096·2 − 8. A larger `size` closes the connection. */
export const KVMI_MAX_MSG_SIZE = 8184;
/** Size of `struct kvmi_msg_hdr`. */
export const KVMI_MSG_HDR_SIZE = 8;
/** Largest whole message (header + payload). */
export const KVMI_MAX_MESSAGE = KVMI_MSG_HDR_SIZE + KVMI_MAX_MSG_SIZE;
export const KVMI_VERSION = 1;
export const KVMI_NUM_COMMANDS = 30;
export const KVMI_NUM_EVENTS = 20;
/** Message id of VM events (KVM → tool, no reply). */
export const KVMI_VM_EVENT = 0;
/** Message id of vCPU events (KVM → tool) and of event replies (tool → KVM). */
export const KVMI_VCPU_EVENT = 1;
/** Common part of a vCPU event as v12 sends it (`kvmi_vcpu_event.size`). */
export const KVMI_VCPU_EVENT_COMMON_SIZE = 544;
/** Maximum pending pause requests per vCPU. */
export const MAX_PAUSE_REQUESTS = 1001;
/** Hypercall number (RAX) that raises KVMI_VCPU_EVENT_HYPERCALL, and its first sub-argument. */
export const KVM_HC_XEN_HVM_OP = 34;
export const KVM_HC_XEN_HVM_OP_GUEST_REQUEST_VM_EVENT = 24;
/** Entries per VM_SET_PAGE_ACCESS message: (8184 − 8) / 16. */
export const KVMI_MAX_PAGE_ACCESS_ENTRIES = 511;
/** Largest `nmsrs` for VCPU_GET_REGISTERS: 8 + 472 + 16·n ≤ 8184. */
export const KVMI_MAX_GET_REGISTERS_MSRS = 481;
/** A failed VCPU_TRANSLATE_GVA answers all ones. */
export const KVMI_INVALID_GPA = 0xffffffffffffffffn;

/** Message ids: VM messages are even (n << 1), vCPU messages odd ((n << 1) | 1). */
export function vmMessageId(n: number): number {
  return n << 1;
}
export function vcpuMessageId(n: number): number {
  return (n << 1) | 1;
}
export function isVcpuMessageId(id: number): boolean {
  return (id & 1) === 1;
}
