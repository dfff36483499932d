/**
 * Reading a guest for an operator (`periscope mem read`, `periscope regs`; issue #12): two VM operations
 * registered in `VmOperations` (so they run on the replica that owns the VM), with plain-JSON arguments and
 * results (64-bit values as 0x-hex strings).
 *
 * - `mem-read` `{gpa, length}` → VM_READ_PHYSICAL, split at 4 KiB page boundaries (KVMI reads within one
 *   page), at most MAX_READ_BYTES; a page KVM does not back (ENOENT) is a gap in the result, not a failure.
 * - `regs` `{vcpu}` → VCPU_GET_REGISTERS with the system-call and segment-base MSRs.
 *
 * Neither changes the guest, so neither is in the audit log (the command log has them).
 */
import { CommandStatus, KvmError, type CommandResult, type Segment } from '@periscope/contracts';
import { AnalysisError } from './errors.js';
import { hex } from './evidence.js';
import { CommandError, enumName, type LiveVm } from './link.js';
import type { JsonObject, JsonValue, VmOperations } from './operations.js';

export const MAX_READ_BYTES = 64 * 1024;
const PAGE = 4096n;

/** MSRs `regs` reads besides the register file (all readable on every x86-64 vCPU). */
export const REGS_MSRS: readonly { readonly name: string; readonly index: number }[] = [
  { name: 'EFER', index: 0xc0000080 },
  { name: 'STAR', index: 0xc0000081 },
  { name: 'LSTAR', index: 0xc0000082 },
  { name: 'CSTAR', index: 0xc0000083 },
  { name: 'SFMASK', index: 0xc0000084 },
  { name: 'FS_BASE', index: 0xc0000100 },
  { name: 'GS_BASE', index: 0xc0000101 },
  { name: 'KERNEL_GS_BASE', index: 0xc0000102 },
  { name: 'SYSENTER_CS', index: 0x174 },
  { name: 'SYSENTER_ESP', index: 0x175 },
  { name: 'SYSENTER_EIP', index: 0x176 },
];

/** `0x…` or decimal text (or a safe integer) as a bigint; `what` names the argument in the error. */
export function bigArg(v: JsonValue | undefined, what: string): bigint {
  if (typeof v === 'number' && Number.isSafeInteger(v) && v >= 0) return BigInt(v);
  if (typeof v === 'string' && /^(0x[0-9a-f]+|\d+)$/i.test(v.trim())) return BigInt(v.trim());
  throw new AnalysisError('bad-request', `${what} must be a non-negative integer (0x-hex or decimal), got ${JSON.stringify(v ?? null)}`);
}

function refusedOrFailed(e: unknown, what: string): never {
  if (e instanceof CommandError && e.result.status === CommandStatus.COMMAND_STATUS_REFUSED_BY_AGENT_POLICY) throw new AnalysisError('refused', `${what}: the agent refused: ${e.result.message}`);
  if (e instanceof CommandError && e.result.status === CommandStatus.COMMAND_STATUS_VM_NOT_ATTACHED) throw new AnalysisError('not-attached', `${what}: the VM is not attached at its agent now`);
  throw e;
}

export interface MemoryChunk extends JsonObject {
  gpa: string;
  length: number;
}

/** Read `length` bytes at `gpa`, page by page. */
export async function readGuestPhysical(vm: LiveVm, gpa: bigint, length: number, maxGfn: bigint | null, by: string): Promise<JsonObject> {
  if (!Number.isInteger(length) || length < 1 || length > MAX_READ_BYTES) throw new AnalysisError('bad-request', `length must be 1..${MAX_READ_BYTES} bytes (got ${length})`);
  const end = gpa + BigInt(length); // exclusive
  if (maxGfn !== null && end - 1n > ((maxGfn + 1n) * PAGE) - 1n) {
    throw new AnalysisError('bad-request', `${hex(gpa)}+${length} goes beyond the VM's memory (max_gfn ${hex(maxGfn)}: last address ${hex((maxGfn + 1n) * PAGE - 1n)})`);
  }
  const chunks: JsonObject[] = [];
  let bytesRead = 0;
  for (let at = gpa; at < end; ) {
    const pageEnd = (at / PAGE + 1n) * PAGE;
    const size = Number((pageEnd < end ? pageEnd : end) - at);
    let r: CommandResult;
    try {
      r = await vm.session.command(vm, 0, { $case: 'readPhysical', value: { gpa: at, size } }, `operator: read physical (${by})`, undefined, by);
      const data = r.result?.$case === 'readPhysical' ? Buffer.from(r.result.value.data) : Buffer.alloc(0);
      chunks.push({ gpa: hex(at), length: size, data: data.toString('hex') });
      bytesRead += data.length;
    } catch (e) {
      if (e instanceof CommandError && e.result.status === CommandStatus.COMMAND_STATUS_KVM_ERROR && e.result.kvmError === KvmError.KVM_ERROR_ENOENT) {
        chunks.push({ gpa: hex(at), length: size, error: 'ENOENT', message: 'not backed by guest memory' });
      } else refusedOrFailed(e, `read ${hex(at)}+${size} of ${vm.name}`);
    }
    at += BigInt(size);
  }
  return { vm: { uuid: vm.uuid, name: vm.name, hostId: vm.hostId }, gpa: hex(gpa), length, bytesRead, maxGfn: maxGfn === null ? null : hex(maxGfn), via: 'VM_READ_PHYSICAL', chunks };
}

function segmentJson(s: Segment | undefined): JsonObject | null {
  if (!s) return null;
  return { selector: hex(s.selector), base: hex(s.base), limit: hex(s.limit), type: s.type, dpl: s.dpl, present: s.present, l: s.l, db: s.db };
}

/** A vCPU's registers as JSON. */
export async function readRegisters(vm: LiveVm, vcpu: number, by: string): Promise<JsonObject> {
  if (!Number.isInteger(vcpu) || vcpu < 0 || vcpu >= vm.vcpuCount) throw new AnalysisError('bad-request', `vCPU ${vcpu} does not exist on ${vm.name} (vCPUs 0..${vm.vcpuCount - 1})`);
  let r: CommandResult;
  try {
    r = await vm.session.command(vm, vcpu, { $case: 'getRegisters', value: { msrIndexes: REGS_MSRS.map((m) => m.index) } }, `operator: read registers (${by})`, undefined, by);
  } catch (e) {
    if (e instanceof CommandError && e.result.status === CommandStatus.COMMAND_STATUS_KVM_ERROR && e.result.kvmError === KvmError.KVM_ERROR_EAGAIN) {
      throw new AnalysisError('conflict', `registers of ${vm.name} vCPU ${vcpu}: the vCPU is not running yet (KVM answered EAGAIN: the guest has not brought it up)`);
    }
    refusedOrFailed(e, `registers of ${vm.name} vCPU ${vcpu}`);
  }
  if (r.result?.$case !== 'getRegisters') throw new AnalysisError('command-failed', `registers of ${vm.name} vCPU ${vcpu}: the agent answered without registers`);
  const g = r.result.value;
  const regs: JsonObject = {};
  if (g.regs) for (const [k, v] of Object.entries(g.regs)) if (typeof v === 'bigint') regs[k] = hex(v);
  const sregs: JsonObject = {};
  const s = g.sregs;
  if (s) {
    for (const k of ['cr0', 'cr2', 'cr3', 'cr4', 'cr8', 'efer', 'apicBase'] as const) sregs[k] = hex(s[k]);
    for (const k of ['cs', 'ds', 'es', 'fs', 'gs', 'ss', 'tr', 'ldt'] as const) sregs[k] = segmentJson(s[k]);
    if (s.gdt) sregs['gdt'] = { base: hex(s.gdt.base), limit: hex(s.gdt.limit) };
    if (s.idt) sregs['idt'] = { base: hex(s.idt.base), limit: hex(s.idt.limit) };
  }
  const msrs: JsonObject = {};
  for (const m of g.msrs) msrs[REGS_MSRS.find((x) => x.index === m.index)?.name ?? hex(m.index)] = hex(m.data);
  return { vm: { uuid: vm.uuid, name: vm.name, hostId: vm.hostId }, vcpu, mode: g.mode, regs, sregs, msrs, status: enumName.commandStatus(r.status) };
}

/** Register `mem-read` and `regs`. `maxGfn` looks the VM's max_gfn up (the inventory). */
export function registerInspectOperations(ops: VmOperations, maxGfn: (uuid: string) => Promise<bigint | null>): void {
  ops.register('mem-read', async ({ vm, by }, args) => {
    const length = Number(bigArg(args['length'], 'length'));
    return readGuestPhysical(vm, bigArg(args['gpa'], 'gpa'), length, await maxGfn(vm.uuid), by);
  });
  ops.register('regs', async ({ vm, by }, args) => readRegisters(vm, Number(bigArg(args['vcpu'], 'vcpu')), by));
}
