/**
 * Hand-written byte helpers for the raw-frame conformance suite. Every layout below was typed from the
 * fact sheet (`../shared/spec/kvmi-v12.md`, tables cited per helper); nothing here imports
 * `@periscope/kvmi`. Values are lowercase hex strings of little-endian bytes (§2.1: host order, x86-64).
 *
 * The struct builders are checked against the C fixture generator's output (golden-frames.json) in
 * `oracle-helpers.test.ts`, so an error in a helper cannot hide an error in the simulator.
 */

// ---- scalars ----------------------------------------------------------------------------------

function fixed(n: bigint, bytes: number): string {
  const v = BigInt.asUintN(bytes * 8, n);
  let out = '';
  for (let i = 0; i < bytes; i++) out += Number((v >> BigInt(8 * i)) & 0xffn).toString(16).padStart(2, '0');
  return out;
}
export const u8 = (n: number): string => fixed(BigInt(n), 1);
export const le16 = (n: number): string => fixed(BigInt(n), 2);
/** u32 or s32 (negative values are written in two's complement, e.g. an `err`). */
export const le32 = (n: number): string => fixed(BigInt(n), 4);
export const le64 = (n: bigint | number): string => fixed(BigInt(n), 8);
export const zeros = (bytes: number): string => '00'.repeat(bytes);
export const bytesOf = (hex: string): number => hex.length / 2;
export const hexOf = (b: Uint8Array): string => Buffer.from(b.buffer, b.byteOffset, b.length).toString('hex');

// ---- §2.4 error codes (positive; `err` on the wire is the negated value) -------------------------

export const E = {
  PERM: 1,
  NOENT: 2,
  '2BIG': 7,
  AGAIN: 11,
  NOMEM: 12,
  FAULT: 14,
  BUSY: 16,
  INVAL: 22,
  OPNOTSUPP: 95,
  NOSYS: 1000,
} as const;

// ---- §3.1 message ids, §3.2 event ids, §3.3 actions ---------------------------------------------

export const ID = {
  VM_EVENT: 0,
  VCPU_EVENT: 1,
  GET_VERSION: 2,
  VCPU_GET_INFO: 3,
  VM_CHECK_COMMAND: 4,
  VCPU_CONTROL_EVENTS: 5,
  VM_CHECK_EVENT: 6,
  VCPU_GET_REGISTERS: 7,
  VM_GET_INFO: 8,
  VCPU_SET_REGISTERS: 9,
  VM_CONTROL_EVENTS: 10,
  VCPU_GET_CPUID: 11,
  VM_READ_PHYSICAL: 12,
  VCPU_CONTROL_CR: 13,
  VM_WRITE_PHYSICAL: 14,
  VCPU_INJECT_EXCEPTION: 15,
  VM_PAUSE_VCPU: 16,
  VCPU_GET_XCR: 17,
  VM_CONTROL_CLEANUP: 18,
  VCPU_GET_XSAVE: 19,
  VM_SET_PAGE_ACCESS: 20,
  VCPU_SET_XSAVE: 21,
  /** Seed extension (kvmmem.md §1), not in upstream v12. */
  GET_MAP_TOKEN: 22,
  VCPU_GET_MTRR_TYPE: 23,
  /** Removed in v12; the simulator keeps it as a seed extension. */
  VM_GET_MAX_GFN: 24,
  VCPU_CONTROL_MSR: 25,
  VCPU_CONTROL_SINGLESTEP: 27,
  VCPU_TRANSLATE_GVA: 29,
} as const;

export const EV = {
  UNHOOK: 0,
  PAUSE: 1,
  HYPERCALL: 3,
  BREAKPOINT: 5,
  CR: 7,
  TRAP: 9,
  XSETBV: 11,
  DESCRIPTOR: 13,
  MSR: 15,
  PF: 17,
  SINGLESTEP: 19,
} as const;

export const ACTION = { CONTINUE: 0, RETRY: 1, CRASH: 2 } as const;

/** §3.5 / §5.4: what the guest sees in RAX after a hypercall the tool refused: −KVM_ENOSYS as a u64. */
export const RAX_ENOSYS = BigInt.asUintN(64, -1000n);
/** §4.1 TRANSLATE_GVA / §5.4 PF: "all ones". */
export const ALL_ONES = 0xffffffffffffffffn;

// ---- guest instructions: the encodings a guest action places at RIP ------------------------------
//
// Typed from the Intel SDM Vol. 2 opcode tables (not from @periscope/x86, not from a decoder). A guest
// action that retires moves RIP by exactly this many bytes; the bytes are what a tool reads at the
// event's RIP.

export const INSN = {
  'mov cr0, rax': '0f22c0', // 0F 22 /r, ModR/M 11 000 000
  'mov cr3, rax': '0f22d8', // 0F 22 /r, ModR/M 11 011 000
  'mov cr4, rax': '0f22e0', // 0F 22 /r, ModR/M 11 100 000
  wrmsr: '0f30',
  xsetbv: '0f01d1',
  vmcall: '0f01c1',
  int3: 'cc',
  'mov [rdi], rax': '488907', // REX.W 89 /r, ModR/M 00 000 111
  'mov [rdi], eax': '8907', // 89 /r
  'mov [rdi], ax': '668907', // 66 89 /r
  'mov [rdi], al': '8807', // 88 /r
  'mov rax, [rdi]': '488b07', // REX.W 8B /r
} as const;
/** The ground-truth length of an instruction a guest action runs. */
export const insnLen = (name: keyof typeof INSN): bigint => BigInt(INSN[name].length / 2);

// ---- §2.1 kvmi_msg_hdr, §2.3 kvmi_error_code, §2.5 kvmi_vcpu_hdr --------------------------------

/** `struct kvmi_msg_hdr {u16 id; u16 size; u32 seq}`. */
export const hdr = (id: number, size: number, seq: number): string => le16(id) + le16(size) + le32(seq);
/** A whole message: header (size computed from the payload) + payload. */
export const frame = (id: number, seq: number, payload = ''): string => hdr(id, bytesOf(payload), seq) + payload;
/** `struct kvmi_error_code {s32 err; u32 padding}`; `errno` is positive (written negated) or 0. */
export const errCode = (errno: number): string => le32(-errno) + le32(0);
/** A command reply: error code, then the reply data only when err == 0 (§2.3). */
export const reply = (id: number, seq: number, errno: number, data = ''): string => {
  if (errno !== 0 && data !== '') throw new Error('an error reply carries no data (§2.3)');
  return frame(id, seq, errCode(errno) + data);
};
/** `struct kvmi_vcpu_hdr {u16 vcpu; u16 padding1; u32 padding2}`. */
export const vhdr = (vcpu: number, padding1 = 0, padding2 = 0): string => le16(vcpu) + le16(padding1) + le32(padding2);
/** A vCPU command: kvmi_vcpu_hdr, then the command struct. */
export const vcmd = (id: number, seq: number, vcpu: number, body = ''): string => frame(id, seq, vhdr(vcpu) + body);

/**
 * §5.3 event reply: id 1, the event's seq, kvmi_vcpu_hdr, `kvmi_vcpu_event_reply {u8 action; u8 event;
 * u16 padding1; u32 padding2}`, then the event-specific reply data (CR/MSR: `u64 new_val`).
 */
export function eventReply(
  seq: number,
  vcpu: number,
  action: number,
  event: number,
  opts: { data?: string; padding1?: number; padding2?: number; hdrPadding1?: number } = {},
): string {
  return frame(
    ID.VCPU_EVENT,
    seq,
    vhdr(vcpu, opts.hdrPadding1 ?? 0) + u8(action) + u8(event) + le16(opts.padding1 ?? 0) + le32(opts.padding2 ?? 0) + (opts.data ?? ''),
  );
}

/**
 * Replace `hdr.seq` (bytes 4..7 of a message, §2.1) with `seq`. Used to reuse a golden request or reply
 * whose seq differs from the one a test needs (an event's seq comes from KVM's counter; an error reply
 * fixture was generated with its request's seq + 1).
 */
export function patchSeq(hexFrame: string, seq: number): string {
  return hexFrame.slice(0, 8) + le32(seq) + hexFrame.slice(16);
}
/** hdr.seq of a hex message. */
export const seqOf = (hexFrame: string): number => Buffer.from(hexFrame.slice(8, 16), 'hex').readUInt32LE(0);
/** hdr.id of a hex message. */
export const idOf = (hexFrame: string): number => Buffer.from(hexFrame.slice(0, 4), 'hex').readUInt16LE(0);

// ---- §6 embedded KVM structs ---------------------------------------------------------------------

export const REG_NAMES = [
  'rax', 'rbx', 'rcx', 'rdx', 'rsi', 'rdi', 'rsp', 'rbp', 'r8', 'r9', 'r10', 'r11', 'r12', 'r13', 'r14', 'r15', 'rip', 'rflags',
] as const;
export type Regs = Record<(typeof REG_NAMES)[number], bigint>;

export interface Segment {
  base: bigint;
  limit: number;
  selector: number;
  type: number;
  present: number;
  dpl: number;
  db: number;
  s: number;
  l: number;
  g: number;
  avl: number;
  unusable: number;
}
export interface DTable {
  base: bigint;
  limit: number;
}
export interface Sregs {
  cs: Segment;
  ds: Segment;
  es: Segment;
  fs: Segment;
  gs: Segment;
  ss: Segment;
  tr: Segment;
  ldt: Segment;
  gdt: DTable;
  idt: DTable;
  cr0: bigint;
  cr2: bigint;
  cr3: bigint;
  cr4: bigint;
  cr8: bigint;
  efer: bigint;
  apic_base: bigint;
  interrupt_bitmap: readonly bigint[];
}

/** `struct kvm_regs` (144): 18 × u64 in table order. */
export const regsHex = (r: Regs): string => REG_NAMES.map((n) => le64(r[n])).join('');

/** `struct kvm_segment` (24); `padding` is the last byte. */
export const segmentHex = (s: Segment, padding = 0): string =>
  le64(s.base) + le32(s.limit) + le16(s.selector) +
  [s.type, s.present, s.dpl, s.db, s.s, s.l, s.g, s.avl, s.unusable, padding].map(u8).join('');

/** `struct kvm_dtable` (16): base, limit, u16 padding[3]. */
export const dtableHex = (d: DTable, padding = 0): string => le64(d.base) + le16(d.limit) + u8(padding).repeat(6);

/** `struct kvm_sregs` (312). */
export function sregsHex(s: Sregs, padding = 0): string {
  const segs = [s.cs, s.ds, s.es, s.fs, s.gs, s.ss, s.tr, s.ldt].map((x) => segmentHex(x, padding)).join('');
  return (
    segs + dtableHex(s.gdt, padding) + dtableHex(s.idt, padding) +
    [s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer, s.apic_base].map((v) => le64(v)).join('') +
    s.interrupt_bitmap.map((v) => le64(v)).join('')
  );
}

/** `kvmi_vcpu_event_arch.msrs` (72), in table order. Architectural MSR indexes (Intel SDM). */
export const EVENT_MSRS = {
  sysenter_cs: 0x174,
  sysenter_esp: 0x175,
  sysenter_eip: 0x176,
  efer: 0xc0000080,
  star: 0xc0000081,
  lstar: 0xc0000082,
  cstar: 0xc0000083,
  pat: 0x277,
  shadow_gs: 0xc0000102, // MSR_KERNEL_GS_BASE
} as const;
export type EventMsrs = Record<keyof typeof EVENT_MSRS, bigint>;
export const eventMsrsHex = (m: EventMsrs): string => (Object.keys(EVENT_MSRS) as Array<keyof EventMsrs>).map((k) => le64(m[k])).join('');

export interface Arch {
  mode: number;
  regs: Regs;
  sregs: Sregs;
  msrs: EventMsrs;
}

/** `struct kvmi_vcpu_event_arch` (536): u8 mode, u8 padding[7], kvm_regs, kvm_sregs, msrs. */
export const archHex = (a: Arch, padding = 0): string =>
  u8(a.mode) + u8(padding).repeat(7) + regsHex(a.regs) + sregsHex(a.sregs, padding) + eventMsrsHex(a.msrs);

/**
 * §5.2 vCPU event message: id 1, KVM's seq, payload = kvmi_event_hdr {u16 event; u16 padding[3]}
 * + kvmi_vcpu_event {u16 size = 544; u16 vcpu; u32 padding; arch} + the event-specific struct.
 * Padding KVM does not clear is written as `padding` (0 by default; compare with `maskEventPadding`).
 */
export function vcpuEventFrame(e: { seq: number; event: number; vcpu: number; arch: Arch; specific?: string }, padding = 0): string {
  const common = le16(544) + le16(e.vcpu) + u8(padding).repeat(4) + archHex(e.arch, padding);
  return frame(ID.VCPU_EVENT, e.seq, le16(e.event) + zeros(6) + common + (e.specific ?? ''));
}

/**
 * Byte ranges (message offsets) of the padding KVM sends uninitialised in a vCPU event (§2.2):
 * `kvmi_vcpu_event.padding` (payload 12..15), `arch.padding` (payload 17..23), the padding byte of the 8
 * segments and the 6 padding bytes of the 2 dtables inside `arch.sregs` (payload 168.. per §5.2).
 */
export function eventPaddingRanges(): Array<[number, number]> {
  const P = 8; // message header
  const sregs = P + 16 + 8 + 144; // payload 16 = arch; arch 8 = regs; regs 144 → sregs
  const r: Array<[number, number]> = [
    [P + 12, P + 16],
    [P + 17, P + 24],
  ];
  for (let i = 0; i < 8; i++) r.push([sregs + 24 * i + 23, sregs + 24 * i + 24]);
  for (const d of [192, 208]) r.push([sregs + d + 10, sregs + d + 16]);
  return r;
}

/** Zero the padding the tool must ignore (§2.2) in a vCPU event message (hex). */
export function maskEventPadding(hexFrame: string): string {
  const b = Buffer.from(hexFrame, 'hex');
  for (const [s, e] of eventPaddingRanges()) b.fill(0, s, Math.min(e, b.length));
  return b.toString('hex');
}

// ---- §5.4 event-specific structs ------------------------------------------------------------------

export const specific = {
  breakpoint: (gpa: bigint, insnLen: number): string => le64(gpa) + u8(insnLen) + zeros(7),
  cr: (cr: number, oldValue: bigint, newValue: bigint): string => u8(cr) + zeros(7) + le64(oldValue) + le64(newValue),
  trap: (nr: number, errorCode: number, address: bigint): string => u8(nr) + u8(0) + le16(0) + le32(errorCode) + le64(address),
  xsetbv: (xcr: number, oldValue: bigint, newValue: bigint): string => u8(xcr) + zeros(7) + le64(oldValue) + le64(newValue),
  descriptor: (descriptor: number, write: number): string => u8(descriptor) + u8(write) + zeros(6),
  msr: (msr: number, oldValue: bigint, newValue: bigint): string => le32(msr) + le32(0) + le64(oldValue) + le64(newValue),
  pf: (gva: bigint, gpa: bigint, access: number): string => le64(gva) + le64(gpa) + u8(access) + u8(0) + le16(0) + le32(0),
  singlestep: (failed: number): string => u8(failed) + zeros(7),
} as const;

/** §5.1 VM event: id 0, payload = kvmi_event_hdr {u16 event = 0; u16 padding[3]}. */
export const vmEventUnhook = (seq: number): string => frame(ID.VM_EVENT, seq, le16(EV.UNHOOK) + zeros(6));

// ---- §4.2 reply structs -----------------------------------------------------------------------------

/** VCPU_GET_REGISTERS reply data: {u32 mode; u32 padding; kvm_regs; kvm_sregs; kvm_msrs {u32 nmsrs; u32 pad}} + entries. */
export function getRegistersReplyData(mode: number, regs: Regs, sregs: Sregs, msrs: ReadonlyArray<{ index: number; data: bigint }>): string {
  return (
    le32(mode) + le32(0) + regsHex(regs) + sregsHex(sregs) + le32(msrs.length) + le32(0) +
    msrs.map((m) => le32(m.index) + le32(0) + le64(m.data)).join('')
  );
}

// ---- §4.2 request builders (struct layouts typed from the sheet's tables) --------------------------

export const req = {
  readPhys: (seq: number, gpa: bigint, size: number, p1 = 0, p2 = 0): string =>
    frame(ID.VM_READ_PHYSICAL, seq, le64(gpa) + le16(size) + le16(p1) + le32(p2)),
  writePhys: (seq: number, gpa: bigint, size: number, data: string, p1 = 0, p2 = 0): string =>
    frame(ID.VM_WRITE_PHYSICAL, seq, le64(gpa) + le16(size) + le16(p1) + le32(p2) + data),
  pause: (seq: number, vcpu: number, wait = 0, p1 = 0, p2 = 0): string => frame(ID.VM_PAUSE_VCPU, seq, le16(vcpu) + u8(wait) + u8(p1) + le32(p2)),
  checkCommand: (seq: number, id: number, p1 = 0, p2 = 0): string => frame(ID.VM_CHECK_COMMAND, seq, le16(id) + le16(p1) + le32(p2)),
  checkEvent: (seq: number, id: number, p1 = 0, p2 = 0): string => frame(ID.VM_CHECK_EVENT, seq, le16(id) + le16(p1) + le32(p2)),
  vmControlEvents: (seq: number, event: number, enable: number, p1 = 0, p2 = 0): string =>
    frame(ID.VM_CONTROL_EVENTS, seq, le16(event) + u8(enable) + u8(p1) + le32(p2)),
  controlCleanup: (seq: number, enable: number, lastPad = 0): string => frame(ID.VM_CONTROL_CLEANUP, seq, u8(enable) + zeros(6) + u8(lastPad)),
  pageEntry: (gpa: bigint, access: number, pad = 0): string => le64(gpa) + u8(access) + u8(pad) + zeros(6),
  setPageAccess: (seq: number, entries: string[], count = entries.length, p1 = 0, p2 = 0): string =>
    frame(ID.VM_SET_PAGE_ACCESS, seq, le16(count) + le16(p1) + le32(p2) + entries.join('')),
  controlEvents: (seq: number, vcpu: number, event: number, enable: number, p1 = 0, p2 = 0): string =>
    vcmd(ID.VCPU_CONTROL_EVENTS, seq, vcpu, le16(event) + u8(enable) + u8(p1) + le32(p2)),
  getRegs: (seq: number, vcpu: number, msrs: number[], nmsrs = msrs.length, p1 = 0, p2 = 0): string =>
    vcmd(ID.VCPU_GET_REGISTERS, seq, vcpu, le16(nmsrs) + le16(p1) + le32(p2) + msrs.map(le32).join('')),
  setRegs: (seq: number, vcpu: number, regs: Regs): string => vcmd(ID.VCPU_SET_REGISTERS, seq, vcpu, regsHex(regs)),
  cpuid: (seq: number, vcpu: number, fn: number, index: number): string => vcmd(ID.VCPU_GET_CPUID, seq, vcpu, le32(fn) + le32(index)),
  controlCr: (seq: number, vcpu: number, cr: number, enable: number, p1 = 0, p2 = 0): string =>
    vcmd(ID.VCPU_CONTROL_CR, seq, vcpu, u8(cr) + u8(enable) + le16(p1) + le32(p2)),
  inject: (seq: number, vcpu: number, nr: number, errorCode: number, address: bigint, p1 = 0, p2 = 0): string =>
    vcmd(ID.VCPU_INJECT_EXCEPTION, seq, vcpu, u8(nr) + u8(p1) + le16(p2) + le32(errorCode) + le64(address)),
  getXcr: (seq: number, vcpu: number, xcr: number, lastPad = 0): string => vcmd(ID.VCPU_GET_XCR, seq, vcpu, u8(xcr) + zeros(6) + u8(lastPad)),
  getXsave: (seq: number, vcpu: number): string => vcmd(ID.VCPU_GET_XSAVE, seq, vcpu),
  setXsave: (seq: number, vcpu: number, region: string): string => vcmd(ID.VCPU_SET_XSAVE, seq, vcpu, region),
  mtrr: (seq: number, vcpu: number, gpa: bigint): string => vcmd(ID.VCPU_GET_MTRR_TYPE, seq, vcpu, le64(gpa)),
  controlMsr: (seq: number, vcpu: number, msr: number, enable: number, p1 = 0, p2 = 0): string =>
    vcmd(ID.VCPU_CONTROL_MSR, seq, vcpu, u8(enable) + u8(p1) + le16(p2) + le32(msr)),
  singlestep: (seq: number, vcpu: number, enable: number, lastPad = 0): string =>
    vcmd(ID.VCPU_CONTROL_SINGLESTEP, seq, vcpu, u8(enable) + zeros(6) + u8(lastPad)),
  translate: (seq: number, vcpu: number, gva: bigint): string => vcmd(ID.VCPU_TRANSLATE_GVA, seq, vcpu, le64(gva)),
  getInfo: (seq: number, vcpu: number): string => vcmd(ID.VCPU_GET_INFO, seq, vcpu),
} as const;
