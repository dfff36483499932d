/*
 * fixtures.c - independent KVMI v12 wire-format test oracle (x86-64, little-endian host).
 *
 * Every struct below was re-declared BY HAND from the tables of the fact sheets
 *   /work/shared/spec/kvmi-v12.md          (protocol, §2-§6)
 *   /work/shared/spec/kvmi-v7-libkvmi.md §3 (QEMU <-> introspector handshake)
 *   /work/shared/spec/kvmmem.md §1          (GET_MAP_TOKEN reply: struct kvmi_mem_token)
 * It does NOT use libs/kvmi/src (the library under test) and must never be regenerated from it.
 *
 * The program builds concrete messages with memcpy into byte buffers and prints ONE JSON document
 *   {"generator": "fixtures.c", "fixtures": [ ... ]}
 * to stdout (one fixture per line). See README.md in this folder for the fixture format.
 *
 * Build and run (the output is committed as golden-frames.json):
 *   cc -std=c11 -Wall -Wextra -Werror -O0 -o /tmp/fixtures fixtures.c && /tmp/fixtures > golden-frames.json
 * The exit status is non-zero if anything went wrong (buffer overflow, duplicate name, oversize message).
 *
 * Only <stdio.h>, <stdint.h>, <string.h> and <stddef.h> are used.
 */
#include <stdio.h>
#include <stdint.h>
#include <string.h>
#include <stddef.h>

#define SA(T, N) _Static_assert(sizeof(struct T) == (N), "sizeof(struct " #T ") != " #N)
#define OA(T, F, N) _Static_assert(offsetof(struct T, F) == (N), "offsetof(struct " #T ", " #F ") != " #N)

/* ------------------------------------------------------------------------------------------------
 * Constants (kvmi-v12.md §2.1, §2.4, §3.1, §3.2, §3.3, §3.4, §3.5)
 * ---------------------------------------------------------------------------------------------- */
#define KVMI_MAX_MSG_SIZE 8184

#define KVM_EPERM 1
#define KVM_ENOENT 2
#define KVM_E2BIG 7
#define KVM_EAGAIN 11
#define KVM_ENOMEM 12
#define KVM_EFAULT 14
#define KVM_EBUSY 16
#define KVM_EINVAL 22
#define KVM_EOPNOTSUPP 95
#define KVM_ENOSYS 1000

/* message ids, §3.1 (+ two project extensions at 22 and 24) */
#define KVMI_VM_EVENT 0
#define KVMI_VCPU_EVENT 1
#define KVMI_GET_VERSION 2
#define KVMI_VCPU_GET_INFO 3
#define KVMI_VM_CHECK_COMMAND 4
#define KVMI_VCPU_CONTROL_EVENTS 5
#define KVMI_VM_CHECK_EVENT 6
#define KVMI_VCPU_GET_REGISTERS 7
#define KVMI_VM_GET_INFO 8
#define KVMI_VCPU_SET_REGISTERS 9
#define KVMI_VM_CONTROL_EVENTS 10
#define KVMI_VCPU_GET_CPUID 11
#define KVMI_VM_READ_PHYSICAL 12
#define KVMI_VCPU_CONTROL_CR 13
#define KVMI_VM_WRITE_PHYSICAL 14
#define KVMI_VCPU_INJECT_EXCEPTION 15
#define KVMI_VM_PAUSE_VCPU 16
#define KVMI_VCPU_GET_XCR 17
#define KVMI_VM_CONTROL_CLEANUP 18
#define KVMI_VCPU_GET_XSAVE 19
#define KVMI_VM_SET_PAGE_ACCESS 20
#define KVMI_VCPU_SET_XSAVE 21
#define KVMI_GET_MAP_TOKEN 22 /* extension */
#define KVMI_VCPU_GET_MTRR_TYPE 23
#define KVMI_VM_GET_MAX_GFN 24 /* extension */
#define KVMI_VCPU_CONTROL_MSR 25
#define KVMI_VCPU_CONTROL_SINGLESTEP 27
#define KVMI_VCPU_TRANSLATE_GVA 29

/* event ids, §3.2 */
#define KVMI_VM_EVENT_UNHOOK 0
#define KVMI_VCPU_EVENT_PAUSE 1
#define KVMI_VCPU_EVENT_HYPERCALL 3
#define KVMI_VCPU_EVENT_BREAKPOINT 5
#define KVMI_VCPU_EVENT_CR 7
#define KVMI_VCPU_EVENT_TRAP 9
#define KVMI_VCPU_EVENT_XSETBV 11
#define KVMI_VCPU_EVENT_DESCRIPTOR 13
#define KVMI_VCPU_EVENT_MSR 15
#define KVMI_VCPU_EVENT_PF 17
#define KVMI_VCPU_EVENT_SINGLESTEP 19

/* actions §3.3, page access §3.4, descriptors §3.5 */
#define KVMI_EVENT_ACTION_CONTINUE 0
#define KVMI_EVENT_ACTION_RETRY 1
#define KVMI_EVENT_ACTION_CRASH 2
#define KVMI_PAGE_ACCESS_R 1
#define KVMI_PAGE_ACCESS_W 2
#define KVMI_PAGE_ACCESS_X 4
#define KVMI_DESC_IDTR 1
#define KVMI_DESC_GDTR 2
#define KVMI_DESC_LDTR 3
#define KVMI_DESC_TR 4
#define KVM_HC_XEN_HVM_OP 34
#define KVM_HC_XEN_HVM_OP_GUEST_REQUEST_VM_EVENT 24

/* ------------------------------------------------------------------------------------------------
 * Framing (§2.1, §2.3, §2.5)
 * ---------------------------------------------------------------------------------------------- */
struct kvmi_msg_hdr {
	uint16_t id;
	uint16_t size;
	uint32_t seq;
};
SA(kvmi_msg_hdr, 8);
OA(kvmi_msg_hdr, id, 0);
OA(kvmi_msg_hdr, size, 2);
OA(kvmi_msg_hdr, seq, 4);

struct kvmi_error_code {
	int32_t err;
	uint32_t padding;
};
SA(kvmi_error_code, 8);
OA(kvmi_error_code, padding, 4);

struct kvmi_vcpu_hdr {
	uint16_t vcpu;
	uint16_t padding1;
	uint32_t padding2;
};
SA(kvmi_vcpu_hdr, 8);
OA(kvmi_vcpu_hdr, padding1, 2);
OA(kvmi_vcpu_hdr, padding2, 4);

/* ------------------------------------------------------------------------------------------------
 * Embedded KVM x86 structures (§6)
 * ---------------------------------------------------------------------------------------------- */
struct kvm_regs {
	uint64_t rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp;
	uint64_t r8, r9, r10, r11, r12, r13, r14, r15;
	uint64_t rip, rflags;
};
SA(kvm_regs, 144);
OA(kvm_regs, rsi, 32);
OA(kvm_regs, r8, 64);
OA(kvm_regs, rip, 128);
OA(kvm_regs, rflags, 136);

struct kvm_segment {
	uint64_t base;
	uint32_t limit;
	uint16_t selector;
	uint8_t type;
	uint8_t present, dpl, db, s, l, g, avl;
	uint8_t unusable;
	uint8_t padding;
};
SA(kvm_segment, 24);
OA(kvm_segment, limit, 8);
OA(kvm_segment, selector, 12);
OA(kvm_segment, type, 14);
OA(kvm_segment, present, 15);
OA(kvm_segment, dpl, 16);
OA(kvm_segment, db, 17);
OA(kvm_segment, s, 18);
OA(kvm_segment, l, 19);
OA(kvm_segment, g, 20);
OA(kvm_segment, avl, 21);
OA(kvm_segment, unusable, 22);
OA(kvm_segment, padding, 23);

struct kvm_dtable {
	uint64_t base;
	uint16_t limit;
	uint16_t padding[3];
};
SA(kvm_dtable, 16);
OA(kvm_dtable, limit, 8);
OA(kvm_dtable, padding, 10);

struct kvm_sregs {
	struct kvm_segment cs, ds, es, fs, gs, ss;
	struct kvm_segment tr, ldt;
	struct kvm_dtable gdt, idt;
	uint64_t cr0, cr2, cr3, cr4, cr8;
	uint64_t efer;
	uint64_t apic_base;
	uint64_t interrupt_bitmap[4];
};
SA(kvm_sregs, 312);
OA(kvm_sregs, ds, 24);
OA(kvm_sregs, ss, 120);
OA(kvm_sregs, tr, 144);
OA(kvm_sregs, ldt, 168);
OA(kvm_sregs, gdt, 192);
OA(kvm_sregs, idt, 208);
OA(kvm_sregs, cr0, 224);
OA(kvm_sregs, cr8, 256);
OA(kvm_sregs, efer, 264);
OA(kvm_sregs, apic_base, 272);
OA(kvm_sregs, interrupt_bitmap, 280);

struct kvm_msr_entry {
	uint32_t index;
	uint32_t reserved;
	uint64_t data;
};
SA(kvm_msr_entry, 16);
OA(kvm_msr_entry, data, 8);

/* header only; nmsrs x struct kvm_msr_entry follow on the wire */
struct kvm_msrs {
	uint32_t nmsrs;
	uint32_t pad;
};
SA(kvm_msrs, 8);

struct kvm_xsave {
	uint32_t region[1024];
};
SA(kvm_xsave, 4096);

/* ------------------------------------------------------------------------------------------------
 * Command structs (§4.2)
 * ---------------------------------------------------------------------------------------------- */
struct kvmi_features {
	uint8_t singlestep;
	uint8_t padding[7];
};
SA(kvmi_features, 8);

struct kvmi_get_version_reply {
	uint32_t version;
	uint32_t max_msg_size;
	struct kvmi_features features;
};
SA(kvmi_get_version_reply, 16);
OA(kvmi_get_version_reply, max_msg_size, 4);
OA(kvmi_get_version_reply, features, 8);

struct kvmi_vm_check_command {
	uint16_t id;
	uint16_t padding1;
	uint32_t padding2;
};
SA(kvmi_vm_check_command, 8);

struct kvmi_vm_check_event {
	uint16_t id;
	uint16_t padding1;
	uint32_t padding2;
};
SA(kvmi_vm_check_event, 8);

struct kvmi_vm_get_info_reply {
	uint32_t vcpu_count;
	uint32_t padding[3];
};
SA(kvmi_vm_get_info_reply, 16);

struct kvmi_vm_control_events {
	uint16_t event_id;
	uint8_t enable;
	uint8_t padding1;
	uint32_t padding2;
};
SA(kvmi_vm_control_events, 8);
OA(kvmi_vm_control_events, enable, 2);

struct kvmi_vm_read_physical {
	uint64_t gpa;
	uint16_t size;
	uint16_t padding1;
	uint32_t padding2;
};
SA(kvmi_vm_read_physical, 16);
OA(kvmi_vm_read_physical, size, 8);

struct kvmi_vm_write_physical {
	uint64_t gpa;
	uint16_t size;
	uint16_t padding1;
	uint32_t padding2;
	uint8_t data[];
};
SA(kvmi_vm_write_physical, 16);
OA(kvmi_vm_write_physical, data, 16);

struct kvmi_vm_pause_vcpu {
	uint16_t vcpu;
	uint8_t wait;
	uint8_t padding1;
	uint32_t padding2;
};
SA(kvmi_vm_pause_vcpu, 8);
OA(kvmi_vm_pause_vcpu, wait, 2);

struct kvmi_vm_control_cleanup {
	uint8_t enable;
	uint8_t padding[7];
};
SA(kvmi_vm_control_cleanup, 8);

struct kvmi_page_access_entry {
	uint64_t gpa;
	uint8_t access;
	uint8_t padding[7];
};
SA(kvmi_page_access_entry, 16);
OA(kvmi_page_access_entry, access, 8);

struct kvmi_vm_set_page_access {
	uint16_t count;
	uint16_t padding1;
	uint32_t padding2;
	struct kvmi_page_access_entry entries[];
};
SA(kvmi_vm_set_page_access, 8);
OA(kvmi_vm_set_page_access, entries, 8);

struct kvmi_vcpu_get_info_reply {
	uint64_t tsc_speed;
};
SA(kvmi_vcpu_get_info_reply, 8);

struct kvmi_vcpu_control_events {
	uint16_t event_id;
	uint8_t enable;
	uint8_t padding1;
	uint32_t padding2;
};
SA(kvmi_vcpu_control_events, 8);
OA(kvmi_vcpu_control_events, enable, 2);

struct kvmi_vcpu_get_registers {
	uint16_t nmsrs;
	uint16_t padding1;
	uint32_t padding2;
	uint32_t msrs_idx[];
};
SA(kvmi_vcpu_get_registers, 8);
OA(kvmi_vcpu_get_registers, msrs_idx, 8);

struct kvmi_vcpu_get_registers_reply {
	uint32_t mode;
	uint32_t padding;
	struct kvm_regs regs;
	struct kvm_sregs sregs;
	struct kvm_msrs msrs; /* header; entries[nmsrs] follow */
};
SA(kvmi_vcpu_get_registers_reply, 472);
OA(kvmi_vcpu_get_registers_reply, regs, 8);
OA(kvmi_vcpu_get_registers_reply, sregs, 152);
OA(kvmi_vcpu_get_registers_reply, msrs, 464);

struct kvmi_vcpu_get_cpuid {
	uint32_t function;
	uint32_t index;
};
SA(kvmi_vcpu_get_cpuid, 8);

struct kvmi_vcpu_get_cpuid_reply {
	uint32_t eax, ebx, ecx, edx;
};
SA(kvmi_vcpu_get_cpuid_reply, 16);

struct kvmi_vcpu_control_cr {
	uint8_t cr;
	uint8_t enable;
	uint16_t padding1;
	uint32_t padding2;
};
SA(kvmi_vcpu_control_cr, 8);
OA(kvmi_vcpu_control_cr, cr, 0);
OA(kvmi_vcpu_control_cr, enable, 1);

struct kvmi_vcpu_inject_exception {
	uint8_t nr;
	uint8_t padding1;
	uint16_t padding2;
	uint32_t error_code;
	uint64_t address;
};
SA(kvmi_vcpu_inject_exception, 16);
OA(kvmi_vcpu_inject_exception, error_code, 4);
OA(kvmi_vcpu_inject_exception, address, 8);

struct kvmi_vcpu_get_xcr {
	uint8_t xcr;
	uint8_t padding[7];
};
SA(kvmi_vcpu_get_xcr, 8);

struct kvmi_vcpu_get_xcr_reply {
	uint64_t value;
};
SA(kvmi_vcpu_get_xcr_reply, 8);

struct kvmi_vcpu_get_xsave_reply {
	struct kvm_xsave xsave;
};
SA(kvmi_vcpu_get_xsave_reply, 4096);

struct kvmi_vcpu_set_xsave {
	struct kvm_xsave xsave;
};
SA(kvmi_vcpu_set_xsave, 4096);

struct kvmi_vcpu_get_mtrr_type {
	uint64_t gpa;
};
SA(kvmi_vcpu_get_mtrr_type, 8);

struct kvmi_vcpu_get_mtrr_type_reply {
	uint8_t type;
	uint8_t padding[7];
};
SA(kvmi_vcpu_get_mtrr_type_reply, 8);

struct kvmi_vcpu_control_msr {
	uint8_t enable;
	uint8_t padding1;
	uint16_t padding2;
	uint32_t msr;
};
SA(kvmi_vcpu_control_msr, 8);
OA(kvmi_vcpu_control_msr, msr, 4);

struct kvmi_vcpu_control_singlestep {
	uint8_t enable;
	uint8_t padding[7];
};
SA(kvmi_vcpu_control_singlestep, 8);

struct kvmi_vcpu_translate_gva {
	uint64_t gva;
};
SA(kvmi_vcpu_translate_gva, 8);

struct kvmi_vcpu_translate_gva_reply {
	uint64_t gpa;
};
SA(kvmi_vcpu_translate_gva_reply, 8);

/* extensions: kvmmem.md §1 (GET_MAP_TOKEN) and the project brief (VM_GET_MAX_GFN) */
struct kvmi_mem_token {
	uint64_t token[4];
};
SA(kvmi_mem_token, 32);

struct kvmi_get_map_token_reply {
	struct kvmi_mem_token token;
};
SA(kvmi_get_map_token_reply, 32);

struct kvmi_vm_get_max_gfn_reply {
	uint64_t gfn;
};
SA(kvmi_vm_get_max_gfn_reply, 8);

/* ------------------------------------------------------------------------------------------------
 * Events (§5.1 - §5.4)
 * ---------------------------------------------------------------------------------------------- */
struct kvmi_event_hdr {
	uint16_t event;
	uint16_t padding[3];
};
SA(kvmi_event_hdr, 8);

struct kvmi_vcpu_event_arch_msrs { /* anonymous in the original */
	uint64_t sysenter_cs;
	uint64_t sysenter_esp;
	uint64_t sysenter_eip;
	uint64_t efer;
	uint64_t star;
	uint64_t lstar;
	uint64_t cstar;
	uint64_t pat;
	uint64_t shadow_gs;
};
SA(kvmi_vcpu_event_arch_msrs, 72);
OA(kvmi_vcpu_event_arch_msrs, efer, 24);
OA(kvmi_vcpu_event_arch_msrs, shadow_gs, 64);

struct kvmi_vcpu_event_arch {
	uint8_t mode;
	uint8_t padding[7];
	struct kvm_regs regs;
	struct kvm_sregs sregs;
	struct kvmi_vcpu_event_arch_msrs msrs;
};
SA(kvmi_vcpu_event_arch, 536);
OA(kvmi_vcpu_event_arch, regs, 8);
OA(kvmi_vcpu_event_arch, sregs, 152);
OA(kvmi_vcpu_event_arch, msrs, 464);

struct kvmi_vcpu_event {
	uint16_t size;
	uint16_t vcpu;
	uint32_t padding;
	struct kvmi_vcpu_event_arch arch;
};
SA(kvmi_vcpu_event, 544);
OA(kvmi_vcpu_event, vcpu, 2);
OA(kvmi_vcpu_event, arch, 8);

struct kvmi_vcpu_event_reply {
	uint8_t action;
	uint8_t event;
	uint16_t padding1;
	uint32_t padding2;
};
SA(kvmi_vcpu_event_reply, 8);
OA(kvmi_vcpu_event_reply, event, 1);

struct kvmi_vcpu_event_breakpoint {
	uint64_t gpa;
	uint8_t insn_len;
	uint8_t padding[7];
};
SA(kvmi_vcpu_event_breakpoint, 16);

struct kvmi_vcpu_event_cr {
	uint8_t cr;
	uint8_t padding[7];
	uint64_t old_value;
	uint64_t new_value;
};
SA(kvmi_vcpu_event_cr, 24);
OA(kvmi_vcpu_event_cr, old_value, 8);
OA(kvmi_vcpu_event_cr, new_value, 16);

struct kvmi_vcpu_event_cr_reply {
	uint64_t new_val;
};
SA(kvmi_vcpu_event_cr_reply, 8);

struct kvmi_vcpu_event_trap {
	uint8_t nr;
	uint8_t padding1;
	uint16_t padding2;
	uint32_t error_code;
	uint64_t address;
};
SA(kvmi_vcpu_event_trap, 16);
OA(kvmi_vcpu_event_trap, error_code, 4);

struct kvmi_vcpu_event_xsetbv {
	uint8_t xcr;
	uint8_t padding[7];
	uint64_t old_value;
	uint64_t new_value;
};
SA(kvmi_vcpu_event_xsetbv, 24);

struct kvmi_vcpu_event_descriptor {
	uint8_t descriptor;
	uint8_t write;
	uint8_t padding[6];
};
SA(kvmi_vcpu_event_descriptor, 8);

struct kvmi_vcpu_event_msr {
	uint32_t msr;
	uint32_t padding;
	uint64_t old_value;
	uint64_t new_value;
};
SA(kvmi_vcpu_event_msr, 24);

struct kvmi_vcpu_event_msr_reply {
	uint64_t new_val;
};
SA(kvmi_vcpu_event_msr_reply, 8);

struct kvmi_vcpu_event_pf {
	uint64_t gva;
	uint64_t gpa;
	uint8_t access;
	uint8_t padding1;
	uint16_t padding2;
	uint32_t padding3;
};
SA(kvmi_vcpu_event_pf, 24);
OA(kvmi_vcpu_event_pf, access, 16);
OA(kvmi_vcpu_event_pf, padding3, 20);

struct kvmi_vcpu_event_singlestep {
	uint8_t failed;
	uint8_t padding[7];
};
SA(kvmi_vcpu_event_singlestep, 8);

/* ------------------------------------------------------------------------------------------------
 * QEMU <-> introspector handshake (kvmi-v7-libkvmi.md §3)
 * ---------------------------------------------------------------------------------------------- */
struct kvmi_qemu2introspector { /* = QEMU qemu_vmi_to_introspector, older form */
	uint32_t struct_size;
	uint8_t uuid[16];
	uint32_t padding;
	int64_t start_time;
	char name[64];
};
SA(kvmi_qemu2introspector, 96);
OA(kvmi_qemu2introspector, uuid, 4);
OA(kvmi_qemu2introspector, padding, 20);
OA(kvmi_qemu2introspector, start_time, 24);
OA(kvmi_qemu2introspector, name, 32);

struct qemu_vmi_to_introspector { /* current form, with max_gpa */
	uint32_t struct_size;
	uint8_t uuid[16];
	uint32_t padding;
	int64_t start_time;
	char name[64];
	uint64_t max_gpa;
};
SA(qemu_vmi_to_introspector, 104);
OA(qemu_vmi_to_introspector, max_gpa, 96);

struct kvmi_introspector2qemu { /* = QEMU qemu_vmi_from_introspector */
	uint32_t struct_size;
	uint8_t cookie_hash[20];
};
SA(kvmi_introspector2qemu, 24);
OA(kvmi_introspector2qemu, cookie_hash, 4);

/* ------------------------------------------------------------------------------------------------
 * Tiny JSON builder (no stdlib, no stdarg)
 * ---------------------------------------------------------------------------------------------- */
static int g_fail;
static char sb[65536];
static size_t sbn;
static int sfirst[32];
static int sdepth;

static void fail(const char *why, const char *what)
{
	fprintf(stderr, "fixtures: %s: %s\n", why, what ? what : "");
	g_fail = 1;
}

static void sb_reset(void)
{
	sbn = 0;
	sb[0] = 0;
	sdepth = 0;
	sfirst[0] = 1;
}

static void sb_put(const char *s)
{
	size_t l = strlen(s);
	if (sbn + l + 1 > sizeof(sb)) {
		fail("json buffer overflow", s);
		return;
	}
	memcpy(sb + sbn, s, l);
	sbn += l;
	sb[sbn] = 0;
}

static void j_key(const char *k)
{
	if (!sfirst[sdepth])
		sb_put(", ");
	sfirst[sdepth] = 0;
	if (k) {
		sb_put("\"");
		sb_put(k);
		sb_put("\": ");
	}
}

static void j_obj(const char *k)
{
	j_key(k);
	sb_put("{");
	sfirst[++sdepth] = 1;
}

static void j_end(void)
{
	sdepth--;
	sb_put("}");
}

static void j_arr(const char *k)
{
	j_key(k);
	sb_put("[");
	sfirst[++sdepth] = 1;
}

static void j_aend(void)
{
	sdepth--;
	sb_put("]");
}

static void j_u(const char *k, unsigned long long v) /* integers <= 32 bits, unsigned */
{
	char t[32];
	snprintf(t, sizeof(t), "%llu", v);
	j_key(k);
	sb_put(t);
}

static void j_i(const char *k, long long v) /* signed (err) */
{
	char t[32];
	snprintf(t, sizeof(t), "%lld", v);
	j_key(k);
	sb_put(t);
}

static void j_x(const char *k, uint64_t v) /* u64 / s64 as "0x..." lowercase, no leading zeros */
{
	char t[32];
	snprintf(t, sizeof(t), "\"0x%llx\"", (unsigned long long)v);
	j_key(k);
	sb_put(t);
}

static void j_hex(const char *k, const void *p, size_t n) /* byte array as lowercase hex string */
{
	static const char hx[] = "0123456789abcdef";
	const uint8_t *b = p;
	char t[3];
	size_t i;
	j_key(k);
	sb_put("\"");
	t[2] = 0;
	for (i = 0; i < n; i++) {
		t[0] = hx[b[i] >> 4];
		t[1] = hx[b[i] & 15];
		sb_put(t);
	}
	sb_put("\"");
}

static void j_s(const char *k, const char *s, size_t max) /* NUL-terminated char[max] */
{
	char t[8];
	size_t i;
	j_key(k);
	sb_put("\"");
	for (i = 0; i < max && s[i]; i++) {
		unsigned char c = (unsigned char)s[i];
		if (c == '"' || c == '\\') {
			t[0] = '\\';
			t[1] = (char)c;
			t[2] = 0;
		} else if (c < 0x20 || c >= 0x7f) {
			snprintf(t, sizeof(t), "\\u%04x", c);
		} else {
			t[0] = (char)c;
			t[1] = 0;
		}
		sb_put(t);
	}
	sb_put("\"");
}

static void j_null(const char *k)
{
	j_key(k);
	sb_put("null");
}

/* ------------------------------------------------------------------------------------------------
 * Message buffer and fixture emission
 * ---------------------------------------------------------------------------------------------- */
static uint8_t mb[16384];
static size_t mn;
static const char *names[1024];
static int nfix;
static int count_by_kind[8];
static const char *kinds[8] = { "command", "reply", "error-reply", "event", "event-reply", "vm-event", "handshake", 0 };

static void m_begin(void) /* message: reserve the 8-byte kvmi_msg_hdr */
{
	memset(mb, 0, sizeof(mb));
	mn = sizeof(struct kvmi_msg_hdr);
}

static void m_begin_raw(void) /* handshake: no kvmi_msg_hdr */
{
	memset(mb, 0, sizeof(mb));
	mn = 0;
}

static void m_put(const void *p, size_t n)
{
	if (mn + n > sizeof(mb)) {
		fail("message buffer overflow", 0);
		return;
	}
	memcpy(mb + mn, p, n);
	mn += n;
}

static void m_hdr(uint16_t id, uint32_t seq)
{
	struct kvmi_msg_hdr h;
	size_t payload = mn - sizeof(h);
	if (payload > KVMI_MAX_MSG_SIZE)
		fail("payload larger than KVMI_MAX_MSG_SIZE", 0);
	memset(&h, 0, sizeof(h));
	h.id = id;
	h.size = (uint16_t)payload;
	h.seq = seq;
	memcpy(mb, &h, sizeof(h));
}

static void put_vcpu_hdr(uint16_t vcpu)
{
	struct kvmi_vcpu_hdr h;
	memset(&h, 0, sizeof(h));
	h.vcpu = vcpu;
	m_put(&h, sizeof(h));
}

static void put_err(int32_t err)
{
	struct kvmi_error_code e;
	memset(&e, 0, sizeof(e));
	e.err = err;
	m_put(&e, sizeof(e));
}

/* id, seq, vcpu: < 0 means JSON null. message NULL means JSON null. */
static void emit(const char *name, const char *dir, const char *kind, const char *message, long id,
		 long long seq, long vcpu)
{
	static const char hx[] = "0123456789abcdef";
	size_t i;
	int k;

	for (k = 0; k < nfix; k++)
		if (strcmp(names[k], name) == 0)
			fail("duplicate fixture name", name);
	if (nfix >= (int)(sizeof(names) / sizeof(names[0]))) {
		fail("too many fixtures", name);
		return;
	}
	names[nfix] = name;
	for (k = 0; kinds[k]; k++)
		if (strcmp(kinds[k], kind) == 0)
			count_by_kind[k]++;
	if (sdepth != 0)
		fail("unbalanced json", name);

	printf("%s\n    {\"name\": \"%s\", \"direction\": \"%s\", \"kind\": \"%s\", \"message\": ", nfix ? "," : "",
	       name, dir, kind);
	if (message)
		printf("\"%s\"", message);
	else
		printf("null");
	if (id < 0)
		printf(", \"id\": null");
	else
		printf(", \"id\": %ld", id);
	if (seq < 0)
		printf(", \"seq\": null");
	else
		printf(", \"seq\": %lld", seq);
	if (vcpu < 0)
		printf(", \"vcpu\": null");
	else
		printf(", \"vcpu\": %ld", vcpu);
	printf(", \"fields\": %s, \"hex\": \"", sb);
	for (i = 0; i < mn; i++)
		printf("%c%c", hx[mb[i] >> 4], hx[mb[i] & 15]);
	printf("\"}");
	nfix++;
}

/* ------------------------------------------------------------------------------------------------
 * Deterministic value generator (splitmix64): distinct, non-trivial values per field
 * ---------------------------------------------------------------------------------------------- */
static uint64_t rs = 0x5045524953434f50ULL; /* "PERISCOP" */

static uint64_t rnd64(void)
{
	uint64_t z = (rs += 0x9e3779b97f4a7c15ULL);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

static uint32_t rnd32(void)
{
	uint32_t v;
	do
		v = (uint32_t)(rnd64() >> 32);
	while (v == 0 || (v & 0xff) == 0 || (v >> 24) == 0);
	return v;
}

static uint16_t rnd16(void)
{
	uint16_t v;
	do
		v = (uint16_t)(rnd64() >> 48);
	while ((v & 0xff) == 0 || (v >> 8) == 0);
	return v;
}

/* ------------------------------------------------------------------------------------------------
 * Fill + JSON helpers for the big embedded structs
 * ---------------------------------------------------------------------------------------------- */
static void fill_regs(struct kvm_regs *r)
{
	r->rax = rnd64(); r->rbx = rnd64(); r->rcx = rnd64(); r->rdx = rnd64();
	r->rsi = rnd64(); r->rdi = rnd64(); r->rsp = rnd64(); r->rbp = rnd64();
	r->r8 = rnd64(); r->r9 = rnd64(); r->r10 = rnd64(); r->r11 = rnd64();
	r->r12 = rnd64(); r->r13 = rnd64(); r->r14 = rnd64(); r->r15 = rnd64();
	r->rip = rnd64(); r->rflags = rnd64();
}

static void j_regs(const char *k, const struct kvm_regs *r)
{
	j_obj(k);
	j_x("rax", r->rax); j_x("rbx", r->rbx); j_x("rcx", r->rcx); j_x("rdx", r->rdx);
	j_x("rsi", r->rsi); j_x("rdi", r->rdi); j_x("rsp", r->rsp); j_x("rbp", r->rbp);
	j_x("r8", r->r8); j_x("r9", r->r9); j_x("r10", r->r10); j_x("r11", r->r11);
	j_x("r12", r->r12); j_x("r13", r->r13); j_x("r14", r->r14); j_x("r15", r->r15);
	j_x("rip", r->rip); j_x("rflags", r->rflags);
	j_end();
}

/* idx 0..7 makes the u8 fields distinct inside and across segments; dirty puts junk in padding */
static void fill_seg(struct kvm_segment *s, int idx, int dirty)
{
	uint8_t b = (uint8_t)(0x20 + idx * 0x10);
	s->base = rnd64();
	s->limit = rnd32();
	s->selector = rnd16();
	s->type = (uint8_t)(b + 1);
	s->present = (uint8_t)(b + 2);
	s->dpl = (uint8_t)(b + 3);
	s->db = (uint8_t)(b + 4);
	s->s = (uint8_t)(b + 5);
	s->l = (uint8_t)(b + 6);
	s->g = (uint8_t)(b + 7);
	s->avl = (uint8_t)(b + 8);
	s->unusable = (uint8_t)(b + 9);
	s->padding = dirty ? (uint8_t)(0xe1 + idx) : 0;
}

static void fill_dtable(struct kvm_dtable *d, int idx, int dirty)
{
	d->base = rnd64();
	d->limit = rnd16();
	d->padding[0] = dirty ? (uint16_t)(0xd00d + idx) : 0;
	d->padding[1] = dirty ? (uint16_t)0xbeef : 0;
	d->padding[2] = dirty ? (uint16_t)0xcafe : 0;
}

static void fill_sregs(struct kvm_sregs *s, int dirty)
{
	fill_seg(&s->cs, 0, dirty); fill_seg(&s->ds, 1, dirty); fill_seg(&s->es, 2, dirty);
	fill_seg(&s->fs, 3, dirty); fill_seg(&s->gs, 4, dirty); fill_seg(&s->ss, 5, dirty);
	fill_seg(&s->tr, 6, dirty); fill_seg(&s->ldt, 7, dirty);
	fill_dtable(&s->gdt, 0, dirty); fill_dtable(&s->idt, 1, dirty);
	s->cr0 = rnd64(); s->cr2 = rnd64(); s->cr3 = rnd64(); s->cr4 = rnd64(); s->cr8 = rnd64();
	s->efer = rnd64(); s->apic_base = rnd64();
	s->interrupt_bitmap[0] = rnd64(); s->interrupt_bitmap[1] = rnd64();
	s->interrupt_bitmap[2] = rnd64(); s->interrupt_bitmap[3] = rnd64();
}

static void j_seg(const char *k, const struct kvm_segment *s)
{
	j_obj(k);
	j_x("base", s->base); j_u("limit", s->limit); j_u("selector", s->selector);
	j_u("type", s->type); j_u("present", s->present); j_u("dpl", s->dpl); j_u("db", s->db);
	j_u("s", s->s); j_u("l", s->l); j_u("g", s->g); j_u("avl", s->avl); j_u("unusable", s->unusable);
	j_end();
}

static void j_dtable(const char *k, const struct kvm_dtable *d)
{
	j_obj(k);
	j_x("base", d->base); j_u("limit", d->limit);
	j_end();
}

static void j_sregs(const char *k, const struct kvm_sregs *s)
{
	int i;
	j_obj(k);
	j_seg("cs", &s->cs); j_seg("ds", &s->ds); j_seg("es", &s->es); j_seg("fs", &s->fs);
	j_seg("gs", &s->gs); j_seg("ss", &s->ss); j_seg("tr", &s->tr); j_seg("ldt", &s->ldt);
	j_dtable("gdt", &s->gdt); j_dtable("idt", &s->idt);
	j_x("cr0", s->cr0); j_x("cr2", s->cr2); j_x("cr3", s->cr3); j_x("cr4", s->cr4); j_x("cr8", s->cr8);
	j_x("efer", s->efer); j_x("apic_base", s->apic_base);
	j_arr("interrupt_bitmap");
	for (i = 0; i < 4; i++)
		j_x(0, s->interrupt_bitmap[i]);
	j_aend();
	j_end();
}

static void fill_arch_msrs(struct kvmi_vcpu_event_arch_msrs *m)
{
	m->sysenter_cs = rnd64(); m->sysenter_esp = rnd64(); m->sysenter_eip = rnd64();
	m->efer = rnd64(); m->star = rnd64(); m->lstar = rnd64(); m->cstar = rnd64();
	m->pat = rnd64(); m->shadow_gs = rnd64();
}

static void j_arch_msrs(const char *k, const struct kvmi_vcpu_event_arch_msrs *m)
{
	j_obj(k);
	j_x("sysenter_cs", m->sysenter_cs); j_x("sysenter_esp", m->sysenter_esp);
	j_x("sysenter_eip", m->sysenter_eip); j_x("efer", m->efer); j_x("star", m->star);
	j_x("lstar", m->lstar); j_x("cstar", m->cstar); j_x("pat", m->pat); j_x("shadow_gs", m->shadow_gs);
	j_end();
}

/* kvmi_vcpu_event: size = 544 in v12; dirty = put junk in the padding KVM does not clear (§2.2) */
static void fill_vcpu_event(struct kvmi_vcpu_event *e, uint16_t size, uint16_t vcpu, uint8_t mode, int dirty)
{
	int i;
	memset(e, 0, sizeof(*e));
	e->size = size;
	e->vcpu = vcpu;
	e->padding = dirty ? 0x8badf00dU : 0;
	e->arch.mode = mode;
	for (i = 0; i < 7; i++)
		e->arch.padding[i] = dirty ? (uint8_t)(0x71 + i) : 0;
	fill_regs(&e->arch.regs);
	fill_sregs(&e->arch.sregs, dirty);
	fill_arch_msrs(&e->arch.msrs);
}

static void j_vcpu_event(const char *k, const struct kvmi_vcpu_event *e)
{
	j_obj(k);
	j_u("size", e->size);
	j_u("vcpu", e->vcpu);
	j_obj("arch");
	j_u("mode", e->arch.mode);
	j_regs("regs", &e->arch.regs);
	j_sregs("sregs", &e->arch.sregs);
	j_arch_msrs("msrs", &e->arch.msrs);
	j_end();
	j_end();
}

static void fill_xsave(struct kvm_xsave *x, uint32_t mul, uint32_t add)
{
	uint32_t i;
	for (i = 0; i < 1024; i++)
		x->region[i] = i * mul + add;
}

/* ------------------------------------------------------------------------------------------------
 * Shorthands for replies
 * ---------------------------------------------------------------------------------------------- */
static void error_reply(const char *name, const char *message, long id, uint32_t seq, int32_t err)
{
	m_begin();
	put_err(err);
	m_hdr((uint16_t)id, seq);
	sb_reset();
	j_obj(0);
	j_i("err", err);
	j_end();
	emit(name, "kvm-to-tool", "error-reply", message, id, seq, -1);
}

static void ok_reply_nodata(const char *name, const char *message, long id, uint32_t seq)
{
	m_begin();
	put_err(0);
	m_hdr((uint16_t)id, seq);
	sb_reset();
	j_obj(0);
	j_i("err", 0);
	j_end();
	emit(name, "kvm-to-tool", "reply", message, id, seq, -1);
}

/* a vCPU command with no struct after kvmi_vcpu_hdr, or a VM command with an empty payload */
static void cmd_empty(const char *name, const char *message, long id, uint32_t seq, long vcpu)
{
	m_begin();
	if (vcpu >= 0)
		put_vcpu_hdr((uint16_t)vcpu);
	m_hdr((uint16_t)id, seq);
	sb_reset();
	j_obj(0);
	j_end();
	emit(name, "tool-to-kvm", "command", message, id, seq, vcpu);
}

enum { REPLY_NONE, REPLY_CR, REPLY_MSR };

static void event_reply(const char *name, const char *evname, uint8_t event, uint16_t vcpu, uint32_t seq,
			uint8_t action, int reply_kind, uint64_t new_val)
{
	struct kvmi_vcpu_event_reply r;
	m_begin();
	put_vcpu_hdr(vcpu);
	memset(&r, 0, sizeof(r));
	r.action = action;
	r.event = event;
	m_put(&r, sizeof(r));
	if (reply_kind == REPLY_CR) {
		struct kvmi_vcpu_event_cr_reply c;
		memset(&c, 0, sizeof(c));
		c.new_val = new_val;
		m_put(&c, sizeof(c));
	} else if (reply_kind == REPLY_MSR) {
		struct kvmi_vcpu_event_msr_reply m;
		memset(&m, 0, sizeof(m));
		m.new_val = new_val;
		m_put(&m, sizeof(m));
	}
	m_hdr(KVMI_VCPU_EVENT, seq);
	sb_reset();
	j_obj(0);
	j_u("action", action);
	j_u("event", event);
	if (reply_kind != REPLY_NONE) {
		j_obj("reply");
		j_x("new_val", new_val);
		j_end();
	}
	j_end();
	emit(name, "tool-to-kvm", "event-reply", evname, KVMI_VCPU_EVENT, seq, vcpu);
}

/* begin a vCPU event message: msg hdr (later) + kvmi_event_hdr + kvmi_vcpu_event */
static void event_begin(uint16_t event, const struct kvmi_vcpu_event *e)
{
	struct kvmi_event_hdr eh;
	m_begin();
	memset(&eh, 0, sizeof(eh));
	eh.event = event;
	m_put(&eh, sizeof(eh));
	m_put(e, sizeof(*e));
}

/* JSON: {"event": id, "vcpu_event": {...}, "specific": ...} - caller writes "specific" then j_end() */
static void event_json_begin(uint16_t event, const struct kvmi_vcpu_event *e)
{
	sb_reset();
	j_obj(0);
	j_u("event", event);
	j_vcpu_event("vcpu_event", e);
}

/* ------------------------------------------------------------------------------------------------
 * main: all fixtures
 * ---------------------------------------------------------------------------------------------- */
int main(void)
{
	int k;

	printf("{\"generator\": \"fixtures.c\", \"fixtures\": [");

	/* ====================================== VM commands ====================================== */

	/* KVMI_GET_VERSION (2): no payload; reply kvmi_get_version_reply (16). Never fails. */
	cmd_empty("get-version-request", "KVMI_GET_VERSION", KVMI_GET_VERSION, 0x00000001U, -1);
	{
		struct kvmi_get_version_reply r;
		memset(&r, 0, sizeof(r));
		r.version = 1;
		r.max_msg_size = KVMI_MAX_MSG_SIZE;
		r.features.singlestep = 1;
		m_begin(); put_err(0); m_put(&r, sizeof(r)); m_hdr(KVMI_GET_VERSION, 0x00000001U);
		sb_reset(); j_obj(0); j_i("err", 0);
		j_u("version", r.version); j_u("max_msg_size", r.max_msg_size);
		j_obj("features"); j_u("singlestep", r.features.singlestep); j_end();
		j_end();
		emit("get-version-reply", "kvm-to-tool", "reply", "KVMI_GET_VERSION", KVMI_GET_VERSION, 0x00000001U, -1);
	}

	/* KVMI_VM_CHECK_COMMAND (4) */
	{
		struct kvmi_vm_check_command c;
		memset(&c, 0, sizeof(c));
		c.id = KVMI_VCPU_TRANSLATE_GVA; /* 29 */
		m_begin(); m_put(&c, sizeof(c)); m_hdr(KVMI_VM_CHECK_COMMAND, 0x00000102U);
		sb_reset(); j_obj(0); j_u("id", c.id); j_end();
		emit("vm-check-command-request", "tool-to-kvm", "command", "KVMI_VM_CHECK_COMMAND", KVMI_VM_CHECK_COMMAND, 0x00000102U, -1);
		ok_reply_nodata("vm-check-command-reply", "KVMI_VM_CHECK_COMMAND", KVMI_VM_CHECK_COMMAND, 0x00000102U);
		error_reply("vm-check-command-error-enoent", "KVMI_VM_CHECK_COMMAND", KVMI_VM_CHECK_COMMAND, 0x00000103U, -KVM_ENOENT);
	}

	/* KVMI_VM_CHECK_EVENT (6) */
	{
		struct kvmi_vm_check_event c;
		memset(&c, 0, sizeof(c));
		c.id = KVMI_VCPU_EVENT_MSR; /* 15 */
		m_begin(); m_put(&c, sizeof(c)); m_hdr(KVMI_VM_CHECK_EVENT, 0x00010203U);
		sb_reset(); j_obj(0); j_u("id", c.id); j_end();
		emit("vm-check-event-request", "tool-to-kvm", "command", "KVMI_VM_CHECK_EVENT", KVMI_VM_CHECK_EVENT, 0x00010203U, -1);
		ok_reply_nodata("vm-check-event-reply", "KVMI_VM_CHECK_EVENT", KVMI_VM_CHECK_EVENT, 0x00010203U);
		error_reply("vm-check-event-error-eperm", "KVMI_VM_CHECK_EVENT", KVMI_VM_CHECK_EVENT, 0x00010204U, -KVM_EPERM);
	}

	/* KVMI_VM_GET_INFO (8): no payload; reply kvmi_vm_get_info_reply (16) */
	cmd_empty("vm-get-info-request", "KVMI_VM_GET_INFO", KVMI_VM_GET_INFO, 0x01020304U, -1);
	{
		struct kvmi_vm_get_info_reply r;
		memset(&r, 0, sizeof(r));
		r.vcpu_count = 0x87654321U; /* > 2^31: catches a signed read */
		m_begin(); put_err(0); m_put(&r, sizeof(r)); m_hdr(KVMI_VM_GET_INFO, 0x01020304U);
		sb_reset(); j_obj(0); j_i("err", 0); j_u("vcpu_count", r.vcpu_count); j_end();
		emit("vm-get-info-reply", "kvm-to-tool", "reply", "KVMI_VM_GET_INFO", KVMI_VM_GET_INFO, 0x01020304U, -1);
		error_reply("vm-get-info-error-eperm", "KVMI_VM_GET_INFO", KVMI_VM_GET_INFO, 0x01020305U, -KVM_EPERM);
	}

	/* KVMI_VM_CONTROL_EVENTS (10) */
	{
		struct kvmi_vm_control_events c;
		memset(&c, 0, sizeof(c));
		c.event_id = KVMI_VM_EVENT_UNHOOK; /* the only valid VM event id */
		c.enable = 1;
		m_begin(); m_put(&c, sizeof(c)); m_hdr(KVMI_VM_CONTROL_EVENTS, 0x0a0b0c0dU);
		sb_reset(); j_obj(0); j_u("event_id", c.event_id); j_u("enable", c.enable); j_end();
		emit("vm-control-events-request", "tool-to-kvm", "command", "KVMI_VM_CONTROL_EVENTS", KVMI_VM_CONTROL_EVENTS, 0x0a0b0c0dU, -1);
		ok_reply_nodata("vm-control-events-reply", "KVMI_VM_CONTROL_EVENTS", KVMI_VM_CONTROL_EVENTS, 0x0a0b0c0dU);
		error_reply("vm-control-events-error-einval", "KVMI_VM_CONTROL_EVENTS", KVMI_VM_CONTROL_EVENTS, 0x0a0b0c0eU, -KVM_EINVAL);
	}

	/* KVMI_VM_READ_PHYSICAL (12): reply = exactly size raw bytes */
	{
		struct kvmi_vm_read_physical c;
		uint8_t data[48];
		int i;
		memset(&c, 0, sizeof(c));
		c.gpa = 0x000000123456ba80ULL; /* page offset 0xa80 + 48 stays inside the page */
		c.size = sizeof(data);
		for (i = 0; i < (int)sizeof(data); i++)
			data[i] = (uint8_t)(i * 37 + 11);
		m_begin(); m_put(&c, sizeof(c)); m_hdr(KVMI_VM_READ_PHYSICAL, 0x10203040U);
		sb_reset(); j_obj(0); j_x("gpa", c.gpa); j_u("size", c.size); j_end();
		emit("vm-read-physical-request", "tool-to-kvm", "command", "KVMI_VM_READ_PHYSICAL", KVMI_VM_READ_PHYSICAL, 0x10203040U, -1);
		m_begin(); put_err(0); m_put(data, sizeof(data)); m_hdr(KVMI_VM_READ_PHYSICAL, 0x10203040U);
		sb_reset(); j_obj(0); j_i("err", 0); j_hex("data", data, sizeof(data)); j_end();
		emit("vm-read-physical-reply", "kvm-to-tool", "reply", "KVMI_VM_READ_PHYSICAL", KVMI_VM_READ_PHYSICAL, 0x10203040U, -1);
		error_reply("vm-read-physical-error-enoent", "KVMI_VM_READ_PHYSICAL", KVMI_VM_READ_PHYSICAL, 0x10203041U, -KVM_ENOENT);
	}

	/* KVMI_VM_WRITE_PHYSICAL (14): 16-byte struct + size data bytes (16 here) */
	{
		struct kvmi_vm_write_physical c;
		uint8_t data[16];
		int i;
		memset(&c, 0, sizeof(c));
		c.gpa = 0x000000009abcdef0ULL; /* page offset 0xef0 + 16 = 0xf00 */
		c.size = sizeof(data);
		for (i = 0; i < 16; i++)
			data[i] = (uint8_t)(0xf0 ^ (i * 0x11));
		m_begin(); m_put(&c, sizeof(c)); m_put(data, sizeof(data)); m_hdr(KVMI_VM_WRITE_PHYSICAL, 0x20304050U);
		sb_reset(); j_obj(0); j_x("gpa", c.gpa); j_u("size", c.size); j_hex("data", data, sizeof(data)); j_end();
		emit("vm-write-physical-request", "tool-to-kvm", "command", "KVMI_VM_WRITE_PHYSICAL", KVMI_VM_WRITE_PHYSICAL, 0x20304050U, -1);
		ok_reply_nodata("vm-write-physical-reply", "KVMI_VM_WRITE_PHYSICAL", KVMI_VM_WRITE_PHYSICAL, 0x20304050U);
		error_reply("vm-write-physical-error-einval", "KVMI_VM_WRITE_PHYSICAL", KVMI_VM_WRITE_PHYSICAL, 0x20304051U, -KVM_EINVAL);
	}

	/* KVMI_VM_PAUSE_VCPU (16): VM command, vCPU index in the struct */
	{
		struct kvmi_vm_pause_vcpu c;
		memset(&c, 0, sizeof(c));
		c.vcpu = 0x0103; /* 259: two distinct bytes */
		c.wait = 1;
		m_begin(); m_put(&c, sizeof(c)); m_hdr(KVMI_VM_PAUSE_VCPU, 0x30405060U);
		sb_reset(); j_obj(0); j_u("vcpu", c.vcpu); j_u("wait", c.wait); j_end();
		emit("vm-pause-vcpu-request", "tool-to-kvm", "command", "KVMI_VM_PAUSE_VCPU", KVMI_VM_PAUSE_VCPU, 0x30405060U, -1);
		ok_reply_nodata("vm-pause-vcpu-reply", "KVMI_VM_PAUSE_VCPU", KVMI_VM_PAUSE_VCPU, 0x30405060U);
		error_reply("vm-pause-vcpu-error-ebusy", "KVMI_VM_PAUSE_VCPU", KVMI_VM_PAUSE_VCPU, 0x30405061U, -KVM_EBUSY);
	}

	/* KVMI_VM_CONTROL_CLEANUP (18) */
	{
		struct kvmi_vm_control_cleanup c;
		memset(&c, 0, sizeof(c));
		c.enable = 1;
		m_begin(); m_put(&c, sizeof(c)); m_hdr(KVMI_VM_CONTROL_CLEANUP, 0x40506070U);
		sb_reset(); j_obj(0); j_u("enable", c.enable); j_end();
		emit("vm-control-cleanup-request", "tool-to-kvm", "command", "KVMI_VM_CONTROL_CLEANUP", KVMI_VM_CONTROL_CLEANUP, 0x40506070U, -1);
		ok_reply_nodata("vm-control-cleanup-reply", "KVMI_VM_CONTROL_CLEANUP", KVMI_VM_CONTROL_CLEANUP, 0x40506070U);
		error_reply("vm-control-cleanup-error-einval", "KVMI_VM_CONTROL_CLEANUP", KVMI_VM_CONTROL_CLEANUP, 0x40506071U, -KVM_EINVAL);
	}

	/* KVMI_VM_SET_PAGE_ACCESS (20): 8-byte header + 3 entries of 16 */
	{
		struct kvmi_vm_set_page_access c;
		struct kvmi_page_access_entry e[3];
		int i;
		memset(&c, 0, sizeof(c));
		memset(e, 0, sizeof(e));
		c.count = 3;
		e[0].gpa = 0x0000000123456000ULL; e[0].access = KVMI_PAGE_ACCESS_R | KVMI_PAGE_ACCESS_X; /* 5 */
		e[1].gpa = 0x00000004fedcb000ULL; e[1].access = KVMI_PAGE_ACCESS_R | KVMI_PAGE_ACCESS_W; /* 3 */
		e[2].gpa = 0x0000000789abc000ULL; e[2].access = KVMI_PAGE_ACCESS_W | KVMI_PAGE_ACCESS_X; /* 6 */
		m_begin(); m_put(&c, sizeof(c)); m_put(e, sizeof(e)); m_hdr(KVMI_VM_SET_PAGE_ACCESS, 0x50607080U);
		sb_reset(); j_obj(0); j_u("count", c.count);
		j_arr("entries");
		for (i = 0; i < 3; i++) {
			j_obj(0); j_x("gpa", e[i].gpa); j_u("access", e[i].access); j_end();
		}
		j_aend();
		j_end();
		emit("vm-set-page-access-request", "tool-to-kvm", "command", "KVMI_VM_SET_PAGE_ACCESS", KVMI_VM_SET_PAGE_ACCESS, 0x50607080U, -1);
		ok_reply_nodata("vm-set-page-access-reply", "KVMI_VM_SET_PAGE_ACCESS", KVMI_VM_SET_PAGE_ACCESS, 0x50607080U);
		error_reply("vm-set-page-access-error-enomem", "KVMI_VM_SET_PAGE_ACCESS", KVMI_VM_SET_PAGE_ACCESS, 0x50607081U, -KVM_ENOMEM);
	}

	/* KVMI_GET_MAP_TOKEN (22, extension): no payload; reply struct kvmi_mem_token (u64 token[4]) */
	cmd_empty("get-map-token-request", "KVMI_GET_MAP_TOKEN", KVMI_GET_MAP_TOKEN, 0x60708090U, -1);
	{
		struct kvmi_get_map_token_reply r;
		memset(&r, 0, sizeof(r));
		r.token.token[0] = 0x0123456789abcdefULL;
		r.token.token[1] = 0xfedcba9876543210ULL;
		r.token.token[2] = 0xffffffffffffffffULL;
		r.token.token[3] = 0x13579bdf02468aceULL;
		m_begin(); put_err(0); m_put(&r, sizeof(r)); m_hdr(KVMI_GET_MAP_TOKEN, 0x60708090U);
		sb_reset(); j_obj(0); j_i("err", 0); j_hex("token", &r.token, sizeof(r.token)); j_end();
		emit("get-map-token-reply", "kvm-to-tool", "reply", "KVMI_GET_MAP_TOKEN", KVMI_GET_MAP_TOKEN, 0x60708090U, -1);
		error_reply("get-map-token-error-eagain", "KVMI_GET_MAP_TOKEN", KVMI_GET_MAP_TOKEN, 0x60708091U, -KVM_EAGAIN);
		error_reply("get-map-token-error-enosys-plain-v12-kernel", "KVMI_GET_MAP_TOKEN", KVMI_GET_MAP_TOKEN, 0x60708092U, -KVM_ENOSYS);
	}

	/* KVMI_VM_GET_MAX_GFN (24, extension): no payload; reply u64 gfn */
	cmd_empty("vm-get-max-gfn-request", "KVMI_VM_GET_MAX_GFN", KVMI_VM_GET_MAX_GFN, 0x708090a0U, -1);
	{
		struct kvmi_vm_get_max_gfn_reply r;
		memset(&r, 0, sizeof(r));
		r.gfn = 0x000000123456789aULL;
		m_begin(); put_err(0); m_put(&r, sizeof(r)); m_hdr(KVMI_VM_GET_MAX_GFN, 0x708090a0U);
		sb_reset(); j_obj(0); j_i("err", 0); j_x("gfn", r.gfn); j_end();
		emit("vm-get-max-gfn-reply", "kvm-to-tool", "reply", "KVMI_VM_GET_MAX_GFN", KVMI_VM_GET_MAX_GFN, 0x708090a0U, -1);
		error_reply("vm-get-max-gfn-error-enosys-plain-v12-kernel", "KVMI_VM_GET_MAX_GFN", KVMI_VM_GET_MAX_GFN, 0x708090a1U, -KVM_ENOSYS);
		error_reply("vm-get-max-gfn-error-eperm", "KVMI_VM_GET_MAX_GFN", KVMI_VM_GET_MAX_GFN, 0x708090a2U, -KVM_EPERM);
	}

	/* ===================================== vCPU commands ===================================== */

	/* KVMI_VCPU_GET_INFO (3): payload = kvmi_vcpu_hdr only; reply tsc_speed */
	cmd_empty("vcpu-get-info-request", "KVMI_VCPU_GET_INFO", KVMI_VCPU_GET_INFO, 0x8090a0b0U, 2);
	{
		struct kvmi_vcpu_get_info_reply r;
		memset(&r, 0, sizeof(r));
		r.tsc_speed = 0x00000000b2d05e00ULL; /* 3 GHz */
		m_begin(); put_err(0); m_put(&r, sizeof(r)); m_hdr(KVMI_VCPU_GET_INFO, 0x8090a0b0U);
		sb_reset(); j_obj(0); j_i("err", 0); j_x("tsc_speed", r.tsc_speed); j_end();
		emit("vcpu-get-info-reply", "kvm-to-tool", "reply", "KVMI_VCPU_GET_INFO", KVMI_VCPU_GET_INFO, 0x8090a0b0U, -1);
		error_reply("vcpu-get-info-error-eagain", "KVMI_VCPU_GET_INFO", KVMI_VCPU_GET_INFO, 0x8090a0b1U, -KVM_EAGAIN);
	}

	/* KVMI_VCPU_CONTROL_EVENTS (5) */
	{
		struct kvmi_vcpu_control_events c;
		memset(&c, 0, sizeof(c));
		c.event_id = KVMI_VCPU_EVENT_PF; /* 17 */
		c.enable = 1;
		m_begin(); put_vcpu_hdr(1); m_put(&c, sizeof(c)); m_hdr(KVMI_VCPU_CONTROL_EVENTS, 0x90a0b0c0U);
		sb_reset(); j_obj(0); j_u("event_id", c.event_id); j_u("enable", c.enable); j_end();
		emit("vcpu-control-events-request", "tool-to-kvm", "command", "KVMI_VCPU_CONTROL_EVENTS", KVMI_VCPU_CONTROL_EVENTS, 0x90a0b0c0U, 1);
		ok_reply_nodata("vcpu-control-events-reply", "KVMI_VCPU_CONTROL_EVENTS", KVMI_VCPU_CONTROL_EVENTS, 0x90a0b0c0U);
		error_reply("vcpu-control-events-error-eopnotsupp", "KVMI_VCPU_CONTROL_EVENTS", KVMI_VCPU_CONTROL_EVENTS, 0x90a0b0c1U, -KVM_EOPNOTSUPP);
		error_reply("vcpu-control-events-error-ebusy", "KVMI_VCPU_CONTROL_EVENTS", KVMI_VCPU_CONTROL_EVENTS, 0x90a0b0c2U, -KVM_EBUSY);
	}

	/* KVMI_VCPU_GET_REGISTERS (7): nmsrs = 2 */
	{
		struct kvmi_vcpu_get_registers c;
		uint32_t idx[2] = { 0xc0000082U /* LSTAR */, 0x00000277U /* PAT */ };
		struct kvmi_vcpu_get_registers_reply r;
		struct kvm_msr_entry me[2];
		int i;
		memset(&c, 0, sizeof(c));
		c.nmsrs = 2;
		m_begin(); put_vcpu_hdr(0x0102); m_put(&c, sizeof(c)); m_put(idx, sizeof(idx));
		m_hdr(KVMI_VCPU_GET_REGISTERS, 0xa0b0c0d0U);
		sb_reset(); j_obj(0); j_u("nmsrs", c.nmsrs);
		j_arr("msrs_idx"); j_u(0, idx[0]); j_u(0, idx[1]); j_aend();
		j_end();
		emit("vcpu-get-registers-request", "tool-to-kvm", "command", "KVMI_VCPU_GET_REGISTERS", KVMI_VCPU_GET_REGISTERS, 0xa0b0c0d0U, 0x0102);

		memset(&r, 0, sizeof(r));
		memset(me, 0, sizeof(me));
		r.mode = 8;
		fill_regs(&r.regs);
		fill_sregs(&r.sregs, 0);
		r.msrs.nmsrs = 2;
		me[0].index = idx[0]; me[0].data = 0xffffffff81a00040ULL;
		me[1].index = idx[1]; me[1].data = 0x0007040600070406ULL;
		m_begin(); put_err(0); m_put(&r, sizeof(r)); m_put(me, sizeof(me)); m_hdr(KVMI_VCPU_GET_REGISTERS, 0xa0b0c0d0U);
		sb_reset(); j_obj(0); j_i("err", 0); j_u("mode", r.mode);
		j_regs("regs", &r.regs); j_sregs("sregs", &r.sregs);
		j_arr("msrs");
		for (i = 0; i < 2; i++) {
			j_obj(0); j_u("index", me[i].index); j_x("data", me[i].data); j_end();
		}
		j_aend();
		j_end();
		emit("vcpu-get-registers-reply", "kvm-to-tool", "reply", "KVMI_VCPU_GET_REGISTERS", KVMI_VCPU_GET_REGISTERS, 0xa0b0c0d0U, -1);
		error_reply("vcpu-get-registers-error-einval", "KVMI_VCPU_GET_REGISTERS", KVMI_VCPU_GET_REGISTERS, 0xa0b0c0d1U, -KVM_EINVAL);
	}

	/* KVMI_VCPU_SET_REGISTERS (9): kvmi_vcpu_hdr + kvm_regs = 152 */
	{
		struct kvm_regs regs;
		fill_regs(&regs);
		regs.r15 = 0xffffffffffffffffULL;
		m_begin(); put_vcpu_hdr(4); m_put(&regs, sizeof(regs)); m_hdr(KVMI_VCPU_SET_REGISTERS, 0xb0c0d0e0U);
		sb_reset(); j_obj(0); j_regs("regs", &regs); j_end();
		emit("vcpu-set-registers-request", "tool-to-kvm", "command", "KVMI_VCPU_SET_REGISTERS", KVMI_VCPU_SET_REGISTERS, 0xb0c0d0e0U, 4);
		ok_reply_nodata("vcpu-set-registers-reply", "KVMI_VCPU_SET_REGISTERS", KVMI_VCPU_SET_REGISTERS, 0xb0c0d0e0U);
		error_reply("vcpu-set-registers-error-eopnotsupp", "KVMI_VCPU_SET_REGISTERS", KVMI_VCPU_SET_REGISTERS, 0xb0c0d0e1U, -KVM_EOPNOTSUPP);
	}

	/* KVMI_VCPU_GET_CPUID (11) */
	{
		struct kvmi_vcpu_get_cpuid c;
		struct kvmi_vcpu_get_cpuid_reply r;
		memset(&c, 0, sizeof(c));
		c.function = 0x80000008U;
		c.index = 0x00000003U;
		m_begin(); put_vcpu_hdr(6); m_put(&c, sizeof(c)); m_hdr(KVMI_VCPU_GET_CPUID, 0xc0d0e0f0U);
		sb_reset(); j_obj(0); j_u("function", c.function); j_u("index", c.index); j_end();
		emit("vcpu-get-cpuid-request", "tool-to-kvm", "command", "KVMI_VCPU_GET_CPUID", KVMI_VCPU_GET_CPUID, 0xc0d0e0f0U, 6);
		memset(&r, 0, sizeof(r));
		r.eax = 0x01003030U; r.ebx = 0x756e6547U; r.ecx = 0x6c65746eU; r.edx = 0x49656e69U;
		m_begin(); put_err(0); m_put(&r, sizeof(r)); m_hdr(KVMI_VCPU_GET_CPUID, 0xc0d0e0f0U);
		sb_reset(); j_obj(0); j_i("err", 0); j_u("eax", r.eax); j_u("ebx", r.ebx); j_u("ecx", r.ecx); j_u("edx", r.edx); j_end();
		emit("vcpu-get-cpuid-reply", "kvm-to-tool", "reply", "KVMI_VCPU_GET_CPUID", KVMI_VCPU_GET_CPUID, 0xc0d0e0f0U, -1);
		error_reply("vcpu-get-cpuid-error-enoent", "KVMI_VCPU_GET_CPUID", KVMI_VCPU_GET_CPUID, 0xc0d0e0f1U, -KVM_ENOENT);
	}

	/* KVMI_VCPU_CONTROL_CR (13): v12 order is cr THEN enable */
	{
		struct kvmi_vcpu_control_cr c;
		memset(&c, 0, sizeof(c));
		c.cr = 3;
		c.enable = 1;
		m_begin(); put_vcpu_hdr(7); m_put(&c, sizeof(c)); m_hdr(KVMI_VCPU_CONTROL_CR, 0xd0e0f000U);
		sb_reset(); j_obj(0); j_u("cr", c.cr); j_u("enable", c.enable); j_end();
		emit("vcpu-control-cr-request", "tool-to-kvm", "command", "KVMI_VCPU_CONTROL_CR", KVMI_VCPU_CONTROL_CR, 0xd0e0f000U, 7);
		ok_reply_nodata("vcpu-control-cr-reply", "KVMI_VCPU_CONTROL_CR", KVMI_VCPU_CONTROL_CR, 0xd0e0f000U);
		error_reply("vcpu-control-cr-error-einval", "KVMI_VCPU_CONTROL_CR", KVMI_VCPU_CONTROL_CR, 0xd0e0f001U, -KVM_EINVAL);
	}

	/* KVMI_VCPU_INJECT_EXCEPTION (15) */
	{
		struct kvmi_vcpu_inject_exception c;
		memset(&c, 0, sizeof(c));
		c.nr = 14; /* #PF */
		c.error_code = 0x8badc0deU;
		c.address = 0xffffc90012345678ULL;
		m_begin(); put_vcpu_hdr(1); m_put(&c, sizeof(c)); m_hdr(KVMI_VCPU_INJECT_EXCEPTION, 0xe0f00010U);
		sb_reset(); j_obj(0); j_u("nr", c.nr); j_u("error_code", c.error_code); j_x("address", c.address); j_end();
		emit("vcpu-inject-exception-request", "tool-to-kvm", "command", "KVMI_VCPU_INJECT_EXCEPTION", KVMI_VCPU_INJECT_EXCEPTION, 0xe0f00010U, 1);
		ok_reply_nodata("vcpu-inject-exception-reply", "KVMI_VCPU_INJECT_EXCEPTION", KVMI_VCPU_INJECT_EXCEPTION, 0xe0f00010U);
		error_reply("vcpu-inject-exception-error-ebusy", "KVMI_VCPU_INJECT_EXCEPTION", KVMI_VCPU_INJECT_EXCEPTION, 0xe0f00011U, -KVM_EBUSY);
	}

	/* KVMI_VCPU_GET_XCR (17): only xcr 0 is valid */
	{
		struct kvmi_vcpu_get_xcr c;
		struct kvmi_vcpu_get_xcr_reply r;
		memset(&c, 0, sizeof(c));
		c.xcr = 0;
		m_begin(); put_vcpu_hdr(2); m_put(&c, sizeof(c)); m_hdr(KVMI_VCPU_GET_XCR, 0xf0001020U);
		sb_reset(); j_obj(0); j_u("xcr", c.xcr); j_end();
		emit("vcpu-get-xcr-request", "tool-to-kvm", "command", "KVMI_VCPU_GET_XCR", KVMI_VCPU_GET_XCR, 0xf0001020U, 2);
		memset(&r, 0, sizeof(r));
		r.value = 0x00000000000602e7ULL;
		m_begin(); put_err(0); m_put(&r, sizeof(r)); m_hdr(KVMI_VCPU_GET_XCR, 0xf0001020U);
		sb_reset(); j_obj(0); j_i("err", 0); j_x("value", r.value); j_end();
		emit("vcpu-get-xcr-reply", "kvm-to-tool", "reply", "KVMI_VCPU_GET_XCR", KVMI_VCPU_GET_XCR, 0xf0001020U, -1);
		error_reply("vcpu-get-xcr-error-einval", "KVMI_VCPU_GET_XCR", KVMI_VCPU_GET_XCR, 0xf0001021U, -KVM_EINVAL);
	}

	/* KVMI_VCPU_GET_XSAVE (19): payload = kvmi_vcpu_hdr; reply 4096 bytes */
	cmd_empty("vcpu-get-xsave-request", "KVMI_VCPU_GET_XSAVE", KVMI_VCPU_GET_XSAVE, 0x00102030U, 3);
	{
		static struct kvmi_vcpu_get_xsave_reply r;
		fill_xsave(&r.xsave, 0x9e3779b1U, 0x01234567U);
		m_begin(); put_err(0); m_put(&r, sizeof(r)); m_hdr(KVMI_VCPU_GET_XSAVE, 0x00102030U);
		sb_reset(); j_obj(0); j_i("err", 0); j_obj("xsave"); j_hex("region", &r.xsave, sizeof(r.xsave)); j_end(); j_end();
		emit("vcpu-get-xsave-reply", "kvm-to-tool", "reply", "KVMI_VCPU_GET_XSAVE", KVMI_VCPU_GET_XSAVE, 0x00102030U, -1);
		error_reply("vcpu-get-xsave-error-enomem", "KVMI_VCPU_GET_XSAVE", KVMI_VCPU_GET_XSAVE, 0x00102031U, -KVM_ENOMEM);
	}

	/* KVMI_VCPU_SET_XSAVE (21): kvmi_vcpu_hdr + 4096 = 4104 */
	{
		static struct kvmi_vcpu_set_xsave c;
		fill_xsave(&c.xsave, 0x85ebca6bU, 0xfedcba98U);
		m_begin(); put_vcpu_hdr(3); m_put(&c, sizeof(c)); m_hdr(KVMI_VCPU_SET_XSAVE, 0x11213141U);
		sb_reset(); j_obj(0); j_obj("xsave"); j_hex("region", &c.xsave, sizeof(c.xsave)); j_end(); j_end();
		emit("vcpu-set-xsave-request", "tool-to-kvm", "command", "KVMI_VCPU_SET_XSAVE", KVMI_VCPU_SET_XSAVE, 0x11213141U, 3);
		ok_reply_nodata("vcpu-set-xsave-reply", "KVMI_VCPU_SET_XSAVE", KVMI_VCPU_SET_XSAVE, 0x11213141U);
		error_reply("vcpu-set-xsave-error-einval", "KVMI_VCPU_SET_XSAVE", KVMI_VCPU_SET_XSAVE, 0x11213142U, -KVM_EINVAL);
	}

	/* KVMI_VCPU_GET_MTRR_TYPE (23) */
	{
		struct kvmi_vcpu_get_mtrr_type c;
		struct kvmi_vcpu_get_mtrr_type_reply r;
		memset(&c, 0, sizeof(c));
		c.gpa = 0x0000000fedcb1000ULL;
		m_begin(); put_vcpu_hdr(1); m_put(&c, sizeof(c)); m_hdr(KVMI_VCPU_GET_MTRR_TYPE, 0x21314151U);
		sb_reset(); j_obj(0); j_x("gpa", c.gpa); j_end();
		emit("vcpu-get-mtrr-type-request", "tool-to-kvm", "command", "KVMI_VCPU_GET_MTRR_TYPE", KVMI_VCPU_GET_MTRR_TYPE, 0x21314151U, 1);
		memset(&r, 0, sizeof(r));
		r.type = 6; /* WB */
		m_begin(); put_err(0); m_put(&r, sizeof(r)); m_hdr(KVMI_VCPU_GET_MTRR_TYPE, 0x21314151U);
		sb_reset(); j_obj(0); j_i("err", 0); j_u("type", r.type); j_end();
		emit("vcpu-get-mtrr-type-reply", "kvm-to-tool", "reply", "KVMI_VCPU_GET_MTRR_TYPE", KVMI_VCPU_GET_MTRR_TYPE, 0x21314151U, -1);
		error_reply("vcpu-get-mtrr-type-error-eagain", "KVMI_VCPU_GET_MTRR_TYPE", KVMI_VCPU_GET_MTRR_TYPE, 0x21314152U, -KVM_EAGAIN);
	}

	/* KVMI_VCPU_CONTROL_MSR (25): enable first, msr at offset 4 */
	{
		struct kvmi_vcpu_control_msr c;
		memset(&c, 0, sizeof(c));
		c.enable = 1;
		c.msr = 0xc0000103U; /* TSC_AUX, inside 0xc0000000-0xc0001fff */
		m_begin(); put_vcpu_hdr(2); m_put(&c, sizeof(c)); m_hdr(KVMI_VCPU_CONTROL_MSR, 0x31415161U);
		sb_reset(); j_obj(0); j_u("enable", c.enable); j_u("msr", c.msr); j_end();
		emit("vcpu-control-msr-request", "tool-to-kvm", "command", "KVMI_VCPU_CONTROL_MSR", KVMI_VCPU_CONTROL_MSR, 0x31415161U, 2);
		ok_reply_nodata("vcpu-control-msr-reply", "KVMI_VCPU_CONTROL_MSR", KVMI_VCPU_CONTROL_MSR, 0x31415161U);
		error_reply("vcpu-control-msr-error-eperm", "KVMI_VCPU_CONTROL_MSR", KVMI_VCPU_CONTROL_MSR, 0x31415162U, -KVM_EPERM);
	}

	/* KVMI_VCPU_CONTROL_SINGLESTEP (27) */
	{
		struct kvmi_vcpu_control_singlestep c;
		memset(&c, 0, sizeof(c));
		c.enable = 1;
		m_begin(); put_vcpu_hdr(4); m_put(&c, sizeof(c)); m_hdr(KVMI_VCPU_CONTROL_SINGLESTEP, 0x41516171U);
		sb_reset(); j_obj(0); j_u("enable", c.enable); j_end();
		emit("vcpu-control-singlestep-request", "tool-to-kvm", "command", "KVMI_VCPU_CONTROL_SINGLESTEP", KVMI_VCPU_CONTROL_SINGLESTEP, 0x41516171U, 4);
		ok_reply_nodata("vcpu-control-singlestep-reply", "KVMI_VCPU_CONTROL_SINGLESTEP", KVMI_VCPU_CONTROL_SINGLESTEP, 0x41516171U);
		error_reply("vcpu-control-singlestep-error-eopnotsupp", "KVMI_VCPU_CONTROL_SINGLESTEP", KVMI_VCPU_CONTROL_SINGLESTEP, 0x41516172U, -KVM_EOPNOTSUPP);
	}

	/* KVMI_VCPU_TRANSLATE_GVA (29) */
	{
		struct kvmi_vcpu_translate_gva c;
		struct kvmi_vcpu_translate_gva_reply r;
		memset(&c, 0, sizeof(c));
		c.gva = 0xffff888012345abcULL;
		m_begin(); put_vcpu_hdr(6); m_put(&c, sizeof(c)); m_hdr(KVMI_VCPU_TRANSLATE_GVA, 0x51617181U);
		sb_reset(); j_obj(0); j_x("gva", c.gva); j_end();
		emit("vcpu-translate-gva-request", "tool-to-kvm", "command", "KVMI_VCPU_TRANSLATE_GVA", KVMI_VCPU_TRANSLATE_GVA, 0x51617181U, 6);
		memset(&r, 0, sizeof(r));
		r.gpa = 0x0000000012345abcULL;
		m_begin(); put_err(0); m_put(&r, sizeof(r)); m_hdr(KVMI_VCPU_TRANSLATE_GVA, 0x51617181U);
		sb_reset(); j_obj(0); j_i("err", 0); j_x("gpa", r.gpa); j_end();
		emit("vcpu-translate-gva-reply", "kvm-to-tool", "reply", "KVMI_VCPU_TRANSLATE_GVA", KVMI_VCPU_TRANSLATE_GVA, 0x51617181U, -1);
		/* a failed translation is a success reply with gpa = ~0 */
		r.gpa = 0xffffffffffffffffULL;
		m_begin(); put_err(0); m_put(&r, sizeof(r)); m_hdr(KVMI_VCPU_TRANSLATE_GVA, 0x51617182U);
		sb_reset(); j_obj(0); j_i("err", 0); j_x("gpa", r.gpa); j_end();
		emit("vcpu-translate-gva-reply-untranslatable", "kvm-to-tool", "reply", "KVMI_VCPU_TRANSLATE_GVA", KVMI_VCPU_TRANSLATE_GVA, 0x51617182U, -1);
		error_reply("vcpu-translate-gva-error-eperm", "KVMI_VCPU_TRANSLATE_GVA", KVMI_VCPU_TRANSLATE_GVA, 0x51617183U, -KVM_EPERM);
	}

	/* ================================ unknown ids (-KVM_ENOSYS) =============================== */
	error_reply("unknown-id-26-error-enosys", 0, 26, 0x61718191U, -KVM_ENOSYS);
	error_reply("unknown-id-28-error-enosys", 0, 28, 0x61718192U, -KVM_ENOSYS);
	error_reply("unknown-id-31-error-enosys", 0, 31, 0x61718193U, -KVM_ENOSYS);
	error_reply("unknown-id-65535-error-enosys", 0, 65535, 0xffffffffU, -KVM_ENOSYS);

	/* error "reply" to an event reply (§2.5): id 1, size 8 */
	error_reply("event-reply-error-einval", "KVMI_VCPU_EVENT", KVMI_VCPU_EVENT, 0x00000005U, -KVM_EINVAL);
	error_reply("event-reply-error-eagain", "KVMI_VCPU_EVENT", KVMI_VCPU_EVENT, 0x00000006U, -KVM_EAGAIN);

	/* ========================================= events ========================================= */

	/* KVMI_VM_EVENT_UNHOOK: id 0, payload = kvmi_event_hdr only, never replied */
	{
		struct kvmi_event_hdr eh;
		memset(&eh, 0, sizeof(eh));
		eh.event = KVMI_VM_EVENT_UNHOOK;
		m_begin(); m_put(&eh, sizeof(eh)); m_hdr(KVMI_VM_EVENT, 0x2468ace0U);
		sb_reset(); j_obj(0); j_u("event", eh.event); j_end();
		emit("vm-event-unhook", "kvm-to-tool", "vm-event", "KVMI_VM_EVENT_UNHOOK", KVMI_VM_EVENT, 0x2468ace0U, -1);
	}

	/* PAUSE (1): no specific data; clean padding */
	{
		static struct kvmi_vcpu_event e;
		fill_vcpu_event(&e, 544, 3, 8, 0);
		event_begin(KVMI_VCPU_EVENT_PAUSE, &e); m_hdr(KVMI_VCPU_EVENT, 0x00000001U);
		event_json_begin(KVMI_VCPU_EVENT_PAUSE, &e); j_null("specific"); j_end();
		emit("event-pause", "kvm-to-tool", "event", "KVMI_VCPU_EVENT_PAUSE", KVMI_VCPU_EVENT, 0x00000001U, 3);
		event_reply("event-pause-reply-continue", "KVMI_VCPU_EVENT_PAUSE", KVMI_VCPU_EVENT_PAUSE, 3, 0x00000001U, KVMI_EVENT_ACTION_CONTINUE, REPLY_NONE, 0);
		event_reply("event-pause-reply-crash", "KVMI_VCPU_EVENT_PAUSE", KVMI_VCPU_EVENT_PAUSE, 3, 0x00000001U, KVMI_EVENT_ACTION_CRASH, REPLY_NONE, 0);
	}

	/* HYPERCALL (3): no specific data; RAX = 34, RDI = 24, RSI = 0 */
	{
		static struct kvmi_vcpu_event e;
		fill_vcpu_event(&e, 544, 1, 8, 0);
		e.arch.regs.rax = KVM_HC_XEN_HVM_OP;
		e.arch.regs.rdi = KVM_HC_XEN_HVM_OP_GUEST_REQUEST_VM_EVENT;
		e.arch.regs.rsi = 0;
		event_begin(KVMI_VCPU_EVENT_HYPERCALL, &e); m_hdr(KVMI_VCPU_EVENT, 0x00000102U);
		event_json_begin(KVMI_VCPU_EVENT_HYPERCALL, &e); j_null("specific"); j_end();
		emit("event-hypercall", "kvm-to-tool", "event", "KVMI_VCPU_EVENT_HYPERCALL", KVMI_VCPU_EVENT, 0x00000102U, 1);
		event_reply("event-hypercall-reply-continue", "KVMI_VCPU_EVENT_HYPERCALL", KVMI_VCPU_EVENT_HYPERCALL, 1, 0x00000102U, KVMI_EVENT_ACTION_CONTINUE, REPLY_NONE, 0);
		event_reply("event-hypercall-reply-crash", "KVMI_VCPU_EVENT_HYPERCALL", KVMI_VCPU_EVENT_HYPERCALL, 1, 0x00000102U, KVMI_EVENT_ACTION_CRASH, REPLY_NONE, 0);
	}

	/* BREAKPOINT (5) */
	{
		static struct kvmi_vcpu_event e;
		struct kvmi_vcpu_event_breakpoint s;
		fill_vcpu_event(&e, 544, 2, 8, 1);
		memset(&s, 0, sizeof(s));
		s.gpa = 0x000000017a3b5c6dULL;
		s.insn_len = 1;
		event_begin(KVMI_VCPU_EVENT_BREAKPOINT, &e); m_put(&s, sizeof(s)); m_hdr(KVMI_VCPU_EVENT, 0x00010203U);
		event_json_begin(KVMI_VCPU_EVENT_BREAKPOINT, &e);
		j_obj("specific"); j_x("gpa", s.gpa); j_u("insn_len", s.insn_len); j_end();
		j_end();
		emit("event-breakpoint", "kvm-to-tool", "event", "KVMI_VCPU_EVENT_BREAKPOINT", KVMI_VCPU_EVENT, 0x00010203U, 2);
		event_reply("event-breakpoint-reply-continue", "KVMI_VCPU_EVENT_BREAKPOINT", KVMI_VCPU_EVENT_BREAKPOINT, 2, 0x00010203U, KVMI_EVENT_ACTION_CONTINUE, REPLY_NONE, 0);
		event_reply("event-breakpoint-reply-retry", "KVMI_VCPU_EVENT_BREAKPOINT", KVMI_VCPU_EVENT_BREAKPOINT, 2, 0x00010203U, KVMI_EVENT_ACTION_RETRY, REPLY_NONE, 0);
		event_reply("event-breakpoint-reply-crash", "KVMI_VCPU_EVENT_BREAKPOINT", KVMI_VCPU_EVENT_BREAKPOINT, 2, 0x00010203U, KVMI_EVENT_ACTION_CRASH, REPLY_NONE, 0);

		/* untranslatable RIP: gpa = ~0 */
		fill_vcpu_event(&e, 544, 0x0201, 8, 1);
		s.gpa = 0xffffffffffffffffULL;
		s.insn_len = 1;
		event_begin(KVMI_VCPU_EVENT_BREAKPOINT, &e); m_put(&s, sizeof(s)); m_hdr(KVMI_VCPU_EVENT, 0x00010204U);
		event_json_begin(KVMI_VCPU_EVENT_BREAKPOINT, &e);
		j_obj("specific"); j_x("gpa", s.gpa); j_u("insn_len", s.insn_len); j_end();
		j_end();
		emit("event-breakpoint-gpa-unknown", "kvm-to-tool", "event", "KVMI_VCPU_EVENT_BREAKPOINT", KVMI_VCPU_EVENT, 0x00010204U, 0x0201);
	}

	/* CR (7): reply carries new_val; dirty padding */
	{
		static struct kvmi_vcpu_event e;
		struct kvmi_vcpu_event_cr s;
		fill_vcpu_event(&e, 544, 5, 8, 1);
		memset(&s, 0, sizeof(s));
		s.cr = 3;
		s.old_value = 0x00000001234f5000ULL;
		s.new_value = 0x8000000abcdef000ULL; /* > 2^53 */
		e.arch.sregs.cr3 = s.old_value;
		event_begin(KVMI_VCPU_EVENT_CR, &e); m_put(&s, sizeof(s)); m_hdr(KVMI_VCPU_EVENT, 0x01020304U);
		event_json_begin(KVMI_VCPU_EVENT_CR, &e);
		j_obj("specific"); j_u("cr", s.cr); j_x("old_value", s.old_value); j_x("new_value", s.new_value); j_end();
		j_end();
		emit("event-cr", "kvm-to-tool", "event", "KVMI_VCPU_EVENT_CR", KVMI_VCPU_EVENT, 0x01020304U, 5);
		event_reply("event-cr-reply-continue", "KVMI_VCPU_EVENT_CR", KVMI_VCPU_EVENT_CR, 5, 0x01020304U, KVMI_EVENT_ACTION_CONTINUE, REPLY_CR, s.new_value);
		event_reply("event-cr-reply-crash", "KVMI_VCPU_EVENT_CR", KVMI_VCPU_EVENT_CR, 5, 0x01020304U, KVMI_EVENT_ACTION_CRASH, REPLY_CR, s.old_value);
	}

	/* TRAP (9): mode 4 */
	{
		static struct kvmi_vcpu_event e;
		struct kvmi_vcpu_event_trap s;
		fill_vcpu_event(&e, 544, 7, 4, 1);
		memset(&s, 0, sizeof(s));
		s.nr = 14;
		s.error_code = 0x00008005U;
		s.address = 0x00007ffde1f2a3b8ULL;
		event_begin(KVMI_VCPU_EVENT_TRAP, &e); m_put(&s, sizeof(s)); m_hdr(KVMI_VCPU_EVENT, 0x7fffffffU);
		event_json_begin(KVMI_VCPU_EVENT_TRAP, &e);
		j_obj("specific"); j_u("nr", s.nr); j_u("error_code", s.error_code); j_x("address", s.address); j_end();
		j_end();
		emit("event-trap", "kvm-to-tool", "event", "KVMI_VCPU_EVENT_TRAP", KVMI_VCPU_EVENT, 0x7fffffffU, 7);
		event_reply("event-trap-reply-continue", "KVMI_VCPU_EVENT_TRAP", KVMI_VCPU_EVENT_TRAP, 7, 0x7fffffffU, KVMI_EVENT_ACTION_CONTINUE, REPLY_NONE, 0);
		event_reply("event-trap-reply-crash", "KVMI_VCPU_EVENT_TRAP", KVMI_VCPU_EVENT_TRAP, 7, 0x7fffffffU, KVMI_EVENT_ACTION_CRASH, REPLY_NONE, 0);
	}

	/* XSETBV (11) */
	{
		static struct kvmi_vcpu_event e;
		struct kvmi_vcpu_event_xsetbv s;
		fill_vcpu_event(&e, 544, 4, 8, 1);
		memset(&s, 0, sizeof(s));
		s.xcr = 0;
		s.old_value = 0x0000000000000007ULL;
		s.new_value = 0x00000000000602e7ULL;
		event_begin(KVMI_VCPU_EVENT_XSETBV, &e); m_put(&s, sizeof(s)); m_hdr(KVMI_VCPU_EVENT, 0x80000000U);
		event_json_begin(KVMI_VCPU_EVENT_XSETBV, &e);
		j_obj("specific"); j_u("xcr", s.xcr); j_x("old_value", s.old_value); j_x("new_value", s.new_value); j_end();
		j_end();
		emit("event-xsetbv", "kvm-to-tool", "event", "KVMI_VCPU_EVENT_XSETBV", KVMI_VCPU_EVENT, 0x80000000U, 4);
		event_reply("event-xsetbv-reply-continue", "KVMI_VCPU_EVENT_XSETBV", KVMI_VCPU_EVENT_XSETBV, 4, 0x80000000U, KVMI_EVENT_ACTION_CONTINUE, REPLY_NONE, 0);
		event_reply("event-xsetbv-reply-crash", "KVMI_VCPU_EVENT_XSETBV", KVMI_VCPU_EVENT_XSETBV, 4, 0x80000000U, KVMI_EVENT_ACTION_CRASH, REPLY_NONE, 0);
	}

	/* DESCRIPTOR (13): mode 2 */
	{
		static struct kvmi_vcpu_event e;
		struct kvmi_vcpu_event_descriptor s;
		fill_vcpu_event(&e, 544, 6, 2, 1);
		memset(&s, 0, sizeof(s));
		s.descriptor = KVMI_DESC_LDTR; /* 3 */
		s.write = 1;
		event_begin(KVMI_VCPU_EVENT_DESCRIPTOR, &e); m_put(&s, sizeof(s)); m_hdr(KVMI_VCPU_EVENT, 0x0a0b0c0dU);
		event_json_begin(KVMI_VCPU_EVENT_DESCRIPTOR, &e);
		j_obj("specific"); j_u("descriptor", s.descriptor); j_u("write", s.write); j_end();
		j_end();
		emit("event-descriptor", "kvm-to-tool", "event", "KVMI_VCPU_EVENT_DESCRIPTOR", KVMI_VCPU_EVENT, 0x0a0b0c0dU, 6);
		event_reply("event-descriptor-reply-continue", "KVMI_VCPU_EVENT_DESCRIPTOR", KVMI_VCPU_EVENT_DESCRIPTOR, 6, 0x0a0b0c0dU, KVMI_EVENT_ACTION_CONTINUE, REPLY_NONE, 0);
		event_reply("event-descriptor-reply-retry", "KVMI_VCPU_EVENT_DESCRIPTOR", KVMI_VCPU_EVENT_DESCRIPTOR, 6, 0x0a0b0c0dU, KVMI_EVENT_ACTION_RETRY, REPLY_NONE, 0);
		event_reply("event-descriptor-reply-crash", "KVMI_VCPU_EVENT_DESCRIPTOR", KVMI_VCPU_EVENT_DESCRIPTOR, 6, 0x0a0b0c0dU, KVMI_EVENT_ACTION_CRASH, REPLY_NONE, 0);
	}

	/* MSR (15): reply carries new_val */
	{
		static struct kvmi_vcpu_event e;
		struct kvmi_vcpu_event_msr s;
		fill_vcpu_event(&e, 544, 1, 8, 1);
		memset(&s, 0, sizeof(s));
		s.msr = 0xc0000082U;
		s.old_value = 0xffffffff81e00080ULL;
		s.new_value = 0xffffffffc0ffee00ULL;
		event_begin(KVMI_VCPU_EVENT_MSR, &e); m_put(&s, sizeof(s)); m_hdr(KVMI_VCPU_EVENT, 0xfffffffeU);
		event_json_begin(KVMI_VCPU_EVENT_MSR, &e);
		j_obj("specific"); j_u("msr", s.msr); j_x("old_value", s.old_value); j_x("new_value", s.new_value); j_end();
		j_end();
		emit("event-msr", "kvm-to-tool", "event", "KVMI_VCPU_EVENT_MSR", KVMI_VCPU_EVENT, 0xfffffffeU, 1);
		event_reply("event-msr-reply-continue", "KVMI_VCPU_EVENT_MSR", KVMI_VCPU_EVENT_MSR, 1, 0xfffffffeU, KVMI_EVENT_ACTION_CONTINUE, REPLY_MSR, s.new_value);
		event_reply("event-msr-reply-crash", "KVMI_VCPU_EVENT_MSR", KVMI_VCPU_EVENT_MSR, 1, 0xfffffffeU, KVMI_EVENT_ACTION_CRASH, REPLY_MSR, s.old_value);
	}

	/* PF (17): dirty padding */
	{
		static struct kvmi_vcpu_event e;
		struct kvmi_vcpu_event_pf s;
		fill_vcpu_event(&e, 544, 2, 8, 1);
		memset(&s, 0, sizeof(s));
		s.gva = 0xffff88800a1b2c3dULL;
		s.gpa = 0x000000000a1b2c3dULL;
		s.access = KVMI_PAGE_ACCESS_W;
		event_begin(KVMI_VCPU_EVENT_PF, &e); m_put(&s, sizeof(s)); m_hdr(KVMI_VCPU_EVENT, 0xffffffffU);
		event_json_begin(KVMI_VCPU_EVENT_PF, &e);
		j_obj("specific"); j_x("gva", s.gva); j_x("gpa", s.gpa); j_u("access", s.access); j_end();
		j_end();
		emit("event-pf", "kvm-to-tool", "event", "KVMI_VCPU_EVENT_PF", KVMI_VCPU_EVENT, 0xffffffffU, 2);
		event_reply("event-pf-reply-continue", "KVMI_VCPU_EVENT_PF", KVMI_VCPU_EVENT_PF, 2, 0xffffffffU, KVMI_EVENT_ACTION_CONTINUE, REPLY_NONE, 0);
		event_reply("event-pf-reply-retry", "KVMI_VCPU_EVENT_PF", KVMI_VCPU_EVENT_PF, 2, 0xffffffffU, KVMI_EVENT_ACTION_RETRY, REPLY_NONE, 0);
		event_reply("event-pf-reply-crash", "KVMI_VCPU_EVENT_PF", KVMI_VCPU_EVENT_PF, 2, 0xffffffffU, KVMI_EVENT_ACTION_CRASH, REPLY_NONE, 0);
	}

	/* PF from a "future kernel": kvmi_vcpu_event.size = 560, 16 unknown bytes before the specific struct */
	{
		static struct kvmi_vcpu_event e;
		struct kvmi_vcpu_event_pf s;
		uint8_t extra[16];
		int i;
		fill_vcpu_event(&e, 560, 0x0123, 8, 1);
		for (i = 0; i < 16; i++)
			extra[i] = (uint8_t)(0xee - i * 0x0d);
		memset(&s, 0, sizeof(s));
		s.gva = 0xffffffffffffffffULL; /* not reported by the hardware */
		s.gpa = 0x00000003fedc5a00ULL;
		s.access = KVMI_PAGE_ACCESS_X;
		event_begin(KVMI_VCPU_EVENT_PF, &e); m_put(extra, sizeof(extra)); m_put(&s, sizeof(s));
		m_hdr(KVMI_VCPU_EVENT, 0x00abcdefU);
		event_json_begin(KVMI_VCPU_EVENT_PF, &e);
		j_obj("specific"); j_x("gva", s.gva); j_x("gpa", s.gpa); j_u("access", s.access); j_end();
		j_end();
		emit("event-pf-larger-common-size", "kvm-to-tool", "event", "KVMI_VCPU_EVENT_PF", KVMI_VCPU_EVENT, 0x00abcdefU, 0x0123);
	}

	/* SINGLESTEP (19) */
	{
		static struct kvmi_vcpu_event e;
		struct kvmi_vcpu_event_singlestep s;
		fill_vcpu_event(&e, 544, 0x0005, 8, 1);
		memset(&s, 0, sizeof(s));
		s.failed = 1;
		event_begin(KVMI_VCPU_EVENT_SINGLESTEP, &e); m_put(&s, sizeof(s)); m_hdr(KVMI_VCPU_EVENT, 0x13579bdfU);
		event_json_begin(KVMI_VCPU_EVENT_SINGLESTEP, &e);
		j_obj("specific"); j_u("failed", s.failed); j_end();
		j_end();
		emit("event-singlestep", "kvm-to-tool", "event", "KVMI_VCPU_EVENT_SINGLESTEP", KVMI_VCPU_EVENT, 0x13579bdfU, 5);
		event_reply("event-singlestep-reply-continue", "KVMI_VCPU_EVENT_SINGLESTEP", KVMI_VCPU_EVENT_SINGLESTEP, 5, 0x13579bdfU, KVMI_EVENT_ACTION_CONTINUE, REPLY_NONE, 0);
		event_reply("event-singlestep-reply-crash", "KVMI_VCPU_EVENT_SINGLESTEP", KVMI_VCPU_EVENT_SINGLESTEP, 5, 0x13579bdfU, KVMI_EVENT_ACTION_CRASH, REPLY_NONE, 0);
	}

	/* ================================ QEMU handshake (v7 sheet §3) ============================ */
	{
		static const uint8_t uuid1[16] = { 0xa1, 0xb2, 0xc3, 0xd4, 0xe5, 0xf6, 0x47, 0x89,
						   0x9a, 0xbc, 0xde, 0xf0, 0x12, 0x34, 0x56, 0x78 };
		static const uint8_t uuid2[16] = { 0x0f, 0x1e, 0x2d, 0x3c, 0x4b, 0x5a, 0x49, 0x78,
						   0x87, 0x96, 0xa5, 0xb4, 0xc3, 0xd2, 0xe1, 0xf0 };
		/* 63 characters: the longest name QEMU sends (name[63] is the NUL) */
		static const char long_name[] = "win10-x64-analysis-target-with-a-very-long-name-0123456789abcde";
		struct kvmi_qemu2introspector q96;
		struct qemu_vmi_to_introspector q104;
		struct kvmi_introspector2qemu r;
		/* SHA-1 of the ASCII secret "periscope-test-secret" (no trailing newline), computed with
		 *   printf %s periscope-test-secret | sha1sum
		 * = 857881d6691596d4851ba0ec3573d51c55998298 */
		static const uint8_t cookie[20] = { 0x85, 0x78, 0x81, 0xd6, 0x69, 0x15, 0x96, 0xd4, 0x85, 0x1b,
						    0xa0, 0xec, 0x35, 0x73, 0xd5, 0x1c, 0x55, 0x99, 0x82, 0x98 };
		_Static_assert(sizeof(long_name) == 64, "long_name must be 63 chars + NUL");

		memset(&q96, 0, sizeof(q96));
		q96.struct_size = sizeof(q96);
		memcpy(q96.uuid, uuid1, 16);
		q96.start_time = 1732147200123LL; /* ms since the epoch */
		strcpy(q96.name, "periscope-guest-01");
		m_begin_raw(); m_put(&q96, sizeof(q96));
		sb_reset(); j_obj(0); j_u("struct_size", q96.struct_size); j_hex("uuid", q96.uuid, 16);
		j_x("start_time", (uint64_t)q96.start_time); j_s("name", q96.name, sizeof(q96.name)); j_end();
		emit("handshake-qemu-to-tool-96", "qemu-to-tool", "handshake", "qemu_vmi_to_introspector", -1, -1, -1);

		memset(&q104, 0, sizeof(q104));
		q104.struct_size = sizeof(q104);
		memcpy(q104.uuid, uuid2, 16);
		q104.start_time = 0x0000018f2a3b4c5dLL;
		memcpy(q104.name, long_name, sizeof(long_name));
		q104.max_gpa = 0x000000047fffffffULL;
		m_begin_raw(); m_put(&q104, sizeof(q104));
		sb_reset(); j_obj(0); j_u("struct_size", q104.struct_size); j_hex("uuid", q104.uuid, 16);
		j_x("start_time", (uint64_t)q104.start_time); j_s("name", q104.name, sizeof(q104.name));
		j_x("max_gpa", q104.max_gpa); j_end();
		emit("handshake-qemu-to-tool-104", "qemu-to-tool", "handshake", "qemu_vmi_to_introspector", -1, -1, -1);

		memset(&r, 0, sizeof(r));
		r.struct_size = sizeof(r);
		memcpy(r.cookie_hash, cookie, 20);
		m_begin_raw(); m_put(&r, sizeof(r));
		sb_reset(); j_obj(0); j_u("struct_size", r.struct_size); j_hex("cookie_hash", r.cookie_hash, 20); j_end();
		emit("handshake-tool-to-qemu-24", "tool-to-qemu", "handshake", "qemu_vmi_from_introspector", -1, -1, -1);
	}

	printf("\n]}\n");

	fprintf(stderr, "fixtures: %d fixtures:", nfix);
	for (k = 0; kinds[k]; k++)
		fprintf(stderr, " %s=%d", kinds[k], count_by_kind[k]);
	fprintf(stderr, "\n");
	return g_fail ? 1 : 0;
}
