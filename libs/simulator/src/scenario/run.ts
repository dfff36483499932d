/**
 * Running a scenario on one simulated VM: each step becomes real table instructions (assembled into
 * this run's code page in the module area, or the kernel's own routines called with their registers
 * loaded), executed by the vCPU with every rule and exit of the guest CPU; then the hand-written
 * expectations are checked against what happened (the events sent, guest memory, registers, how each
 * step's code ended) and reported.
 */
import type { InstructionName } from '@periscope/x86';

import { assemble, type AsmInsn } from '../guest/asm.js';
import { MSR } from '../guest/cpu.js';
import { KERNEL_BASE, MODULES_VADDR, USER_DATA, USER_TEXT, type KernelLayout } from '../guest/kernel.js';
import type { GuestEventRecord } from '../kvm/types.js';
import type { SimVcpu } from '../kvm/vcpu.js';
import type { SimVm } from '../kvm/vm.js';
import type {
  Target,
  EventExpectation,
  ExpectationResult,
  RegisterExpectation,
  Scenario,
  ScenarioReport,
  Step,
  StepReport,
} from './types.js';

const hex = (v: bigint): string => `0x${v.toString(16)}`;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Scenario code pages: 64 runs × (16 KiB code + 16 KiB data) in the upper half of the module area. */
const SCENARIO_AREA = MODULES_VADDR + 0x200000n;
const SCENARIO_SLOT = 0x8000n;
const SCENARIO_SLOTS = 64;
const STEP_CODE = 0x100n;
const MODULE_SLOT = 0x10000n;
const MODULE_SLOTS = 32;

const counters = new WeakMap<SimVm, { runs: number; modules: number }>();
function counter(vm: SimVm): { runs: number; modules: number } {
  let c = counters.get(vm);
  if (!c) counters.set(vm, (c = { runs: 0, modules: 0 }));
  return c;
}

class StepError extends Error {}

interface Ctx {
  vm: SimVm;
  k: KernelLayout;
  code: bigint;
  data: bigint;
  modules: Map<string, bigint>;
}

/** Evaluate an expression (see `Expr`) for a step on `vcpu`. */
function evalExpr(c: Ctx, expr: string, vcpu: number): bigint {
  const parts = expr.split(/\s*([+-])\s*/);
  let acc = 0n;
  let sign = 1n;
  for (const p of parts) {
    if (p === '+') sign = 1n;
    else if (p === '-') sign = -1n;
    else if (p !== '') acc += sign * term(c, p, vcpu);
  }
  return BigInt.asUintN(64, acc);
}

function term(c: Ctx, t: string, vcpu: number): bigint {
  if (/^(0x[0-9a-f]+|\d+)$/i.test(t)) return BigInt(t);
  const [kind, arg = ''] = t.split(':') as [string, string?];
  const proc = (): NonNullable<KernelLayout['processes'][number]> => {
    const p = c.k.processes[Number(arg) - 1];
    if (!p) throw new StepError(`no process ${arg} (there are ${c.k.processes.length})`);
    return p;
  };
  switch (kind.toLowerCase()) {
    case 'sym':
      return c.k.symbol(arg);
    case 'phys':
    case 'alias':
      return c.k.symbolPhys(arg);
    case 'module': {
      const m = c.modules.get(arg);
      if (m === undefined) throw new StepError(`module ${arg} is not loaded (a load-module step must come first)`);
      return m;
    }
    case 'user_text':
      proc();
      return USER_TEXT;
    case 'user_data':
      proc();
      return USER_DATA;
    case 'user_text_phys':
      return proc().text.gpa;
    case 'user_data_phys':
      return proc().data.gpa;
    case 'pgd':
      return arg === 'kernel' ? c.k.cr3 : proc().cr3;
    case 'code':
      return c.code;
    case 'data':
      return c.data;
    case 'stack':
      return c.k.taskStackTop(vcpu);
  }
  throw new StepError(`bad term ${t}`);
}

/** A register's value as the expectations name it; undefined when the vCPU lacks it. */
function readReg(v: SimVcpu, reg: string): bigint | undefined {
  const s = v.cpu.sregs;
  switch (reg) {
    case 'cr0':
      return s.cr0;
    case 'cr2':
      return s.cr2;
    case 'cr3':
      return s.cr3;
    case 'cr4':
      return s.cr4;
    case 'efer':
      return s.efer;
    case 'xcr0':
      return v.cpu.xcr0;
    case 'idtr.base':
      return s.idt.base;
    case 'idtr.limit':
      return BigInt(s.idt.limit);
    case 'gdtr.base':
      return s.gdt.base;
    case 'gdtr.limit':
      return BigInt(s.gdt.limit);
  }
  if (reg.startsWith('msr:')) {
    const name = reg.slice(4);
    const idx = /^(0x[0-9a-f]+|\d+)$/.test(name) ? Number(name) : (MSR as Record<string, number>)[name.toUpperCase().replace(/^IA32_/, '')];
    return idx === undefined ? undefined : v.cpu.readMsr(idx);
  }
  const r = (v.cpu.regs as unknown as Record<string, unknown>)[reg];
  return typeof r === 'bigint' ? r : undefined;
}

export interface RunScenarioOptions {
  /** Progress lines. */
  log?: (line: string) => void;
}

/** Run `scenario` on `vm` and check its expectations. Never throws for guest behaviour; see `error`. */
export async function runScenario(vm: SimVm, scenario: Scenario, opts: RunScenarioOptions = {}): Promise<ScenarioReport> {
  const started = Date.now();
  const report: ScenarioReport = {
    scenario: scenario.name,
    kind: scenario.kind,
    ...(scenario.file ? { file: scenario.file } : {}),
    vm: vm.name,
    uuid: vm.uuidText,
    passed: false,
    startedAt: new Date(started).toISOString(),
    durationMs: 0,
    steps: [],
    expectations: [],
    events: [],
    livelocks: 0,
  };
  if (vm.vcpus.length < scenario.vcpus) {
    report.error = `the scenario needs ${scenario.vcpus} vCPUs, ${vm.name} has ${vm.vcpus.length}`;
    report.durationMs = Date.now() - started;
    return report;
  }
  const cnt = counter(vm);
  const code = SCENARIO_AREA + BigInt(cnt.runs++ % SCENARIO_SLOTS) * SCENARIO_SLOT;
  const c: Ctx = { vm, k: vm.kernel, code, data: code + SCENARIO_SLOT / 2n, modules: new Map() };
  const records: Array<GuestEventRecord & { step: string | null }> = [];
  const running = new Map<number, string>();
  const onEvent = (r: GuestEventRecord): void => {
    records.push({ ...r, step: running.get(r.vcpu) ?? null });
  };
  const livelocksBefore = vm.stats.livelocks;
  vm.on('guest-event', onEvent);
  const keepFailures = new Map<RegisterExpectation, string>();
  const checkKeep = (when: string): void => {
    for (const r of scenario.expect.registers) {
      if (r.keepBits === undefined || keepFailures.has(r)) continue;
      const v = vm.vcpus[r.vcpu] ? readReg(vm.vcpus[r.vcpu]!, r.reg) : undefined;
      if (v === undefined) keepFailures.set(r, `${r.reg} unreadable ${when}`);
      else if ((v & r.keepBits) !== r.keepBits) keepFailures.set(r, `${r.reg} = ${hex(v)} ${when} (missing ${hex(r.keepBits & ~v)})`);
    }
  };
  try {
    checkKeep('at the start');
    for (const [i, step] of scenario.steps.entries()) {
      opts.log?.(`${vm.name}: ${scenario.name}: ${step.id} (${step.verb} on vCPU ${step.vcpu})`);
      running.set(step.vcpu, step.id);
      let sr: StepReport;
      try {
        sr = await runStep(c, step, i);
      } catch (err) {
        if (!(err instanceof StepError) && !(err instanceof Error && err.name === 'SimError')) throw err;
        sr = { id: step.id, verb: step.verb, vcpu: step.vcpu, from: step.from, outcome: 'skipped', actions: [], instructions: 0, events: 0, error: err.message };
      } finally {
        running.delete(step.vcpu);
      }
      sr.events = records.filter((r) => r.step === step.id).length;
      report.steps.push(sr);
      checkKeep(`after step ${step.id}`);
    }
  } finally {
    vm.off('guest-event', onEvent);
  }
  report.livelocks = vm.stats.livelocks - livelocksBefore;
  report.events = records.map((r) => ({
    vcpu: r.vcpu,
    event: r.event,
    seq: r.seq,
    rip: hex(r.rip),
    step: r.step,
    ended: r.ended,
    ...(r.data ? { data: Object.fromEntries(Object.entries(r.data).map(([k, v]) => [k, typeof v === 'bigint' ? hex(v) : (v as number)])) } : {}),
  }));
  report.expectations = check(c, scenario, report, records, keepFailures);
  report.passed = report.expectations.every((e) => e.ok) && report.steps.every((s) => s.error === undefined);
  report.durationMs = Date.now() - started;
  return report;
}

// ---- steps ------------------------------------------------------------------------------------------

interface Call {
  entry: bigint;
  regs: Record<string, bigint>;
}

async function runStep(c: Ctx, step: Step, index: number): Promise<StepReport> {
  const { vm, k } = c;
  const sr: StepReport = { id: step.id, verb: step.verb, vcpu: step.vcpu, from: step.from, outcome: 'completed', actions: [], instructions: 0, events: 0 };
  const v = vm.vcpus[step.vcpu];
  if (!v) throw new StepError(`no vCPU ${step.vcpu}`);
  const e = (x: string): bigint => evalExpr(c, x, step.vcpu);
  /** A target's linear address: a gpa goes through the kernel map. */
  const linear = (t: Target): bigint => {
    if ('gva' in t) return e(t.gva);
    const gpa = e(t.gpa);
    if (gpa >= k.identityBytes) throw new StepError(`gpa ${hex(gpa)} is beyond the kernel map (${hex(k.identityBytes)})`);
    return KERNEL_BASE + gpa;
  };
  const sentinel = k.symbol('cpu_idle');
  const at = c.code + BigInt(index % 64) * STEP_CODE;

  // Non-code steps.
  switch (step.verb) {
    case 'delay':
      await sleep(step.ms);
      return sr;
    case 'bring-up':
      vm.bringUpVcpu(step.target);
      return sr;
    case 'dma-write': {
      const gpa = e(step.gpa);
      const bytes = Buffer.from(step.bytes, 'hex');
      const before = vm.memory.read(gpa, bytes.length);
      if (!before) throw new StepError(`gpa ${hex(gpa)} is not RAM`);
      vm.memory.write(gpa, bytes);
      const after = vm.memory.read(gpa, bytes.length)!;
      sr.write = { at: hex(gpa), bytes: step.bytes, before: before.toString('hex'), after: after.toString('hex'), landed: landed(before, after, bytes) };
      return sr;
    }
    default:
      break;
  }

  /** Module code: assemble at this step's slot, end with `ret`, call it. Actions are the insns named in `actions`. */
  const moduleCode = (insns: AsmInsn[], actions: ReadonlySet<InstructionName>): Call[] => {
    const a = assemble(at, [...insns, { name: 'ret' }]);
    if (!v.pokeLinear(at, a.bytes)) throw new StepError(`the code page ${hex(at)} is not mapped on vCPU ${step.vcpu}`);
    sr.code = hex(at);
    for (const i of a.insns) if (actions.has(i.name)) sr.actions.push({ rip: hex(i.at), name: i.name, length: i.length });
    return [{ entry: at, regs: {} }];
  };
  /** A kernel routine: its first instruction is the action. */
  const routine = (name: string, regs: Record<string, bigint>): Call => {
    const entry = k.symbol(name);
    return { entry, regs };
  };
  const routineAction = (name: string, insn: InstructionName, length: number): void => {
    const rip = hex(k.symbol(name));
    if (!sr.actions.some((x) => x.rip === rip)) sr.actions.push({ rip, name: insn, length });
  };
  const lengthOf = (n: InstructionName): number => assemble(0n, [{ name: n }]).bytes.length;

  let calls: Call[];
  let write: { gva: bigint; bytes: Buffer } | undefined;
  let execTarget: bigint | undefined;
  switch (step.verb) {
    case 'write':
    case 'load-module': {
      let target: bigint;
      let bytes: Buffer;
      if (step.verb === 'write') {
        target = linear(step.at);
        if (step.value !== undefined) {
          bytes = Buffer.alloc(8);
          bytes.writeBigUInt64LE(e(step.value));
        } else bytes = Buffer.from(step.bytes!, 'hex');
      } else {
        const cnt = counter(vm);
        target = MODULES_VADDR + BigInt(cnt.modules++ % MODULE_SLOTS) * MODULE_SLOT;
        bytes = moduleImage(step.name, step.size);
        c.modules.set(step.name, target);
      }
      write = { gva: target, bytes };
      const words: Array<{ at: bigint; word: bigint; size: 1 | 8 }> = [];
      for (let off = 0; off < bytes.length; ) {
        const size: 1 | 8 = bytes.length - off >= 8 ? 8 : 1;
        words.push({ at: target + BigInt(off), word: size === 8 ? bytes.readBigUInt64LE(off) : BigInt(bytes[off]!), size });
        off += size;
      }
      if (step.from === 'module' && step.verb === 'write') {
        const insns: AsmInsn[] = [];
        for (const w of words) {
          insns.push({ name: 'mov rdi, imm64', imm: w.at }, { name: 'mov rax, imm64', imm: w.word }, { name: w.size === 8 ? 'mov [rdi], rax' : 'mov [rdi], al' });
        }
        calls = moduleCode(insns, new Set(['mov [rdi], rax', 'mov [rdi], al']));
      } else {
        const poke = step.from === 'text_poke';
        calls = words.map((w) => {
          const name = poke ? 'text_poke' : w.size === 8 ? 'memcpy_word' : 'memcpy_byte';
          routineAction(name, w.size === 8 ? 'mov [rdi], rax' : 'mov [rdi], al', lengthOf(w.size === 8 ? 'mov [rdi], rax' : 'mov [rdi], al'));
          return routine(name, { rdi: w.at, rax: w.word });
        });
      }
      break;
    }
    case 'read': {
      const target = linear(step.at);
      if (step.from === 'module') calls = moduleCode([{ name: 'mov rdi, imm64', imm: target }, { name: 'mov rax, [rdi]' }], new Set(['mov rax, [rdi]']));
      else {
        routineAction('memread_word', 'mov rax, [rdi]', lengthOf('mov rax, [rdi]'));
        calls = [routine('memread_word', { rdi: target })];
      }
      break;
    }
    case 'execute': {
      const target = linear(step.at);
      const payload = assemble(target, step.payload.map((name) => ({ name })));
      if (!v.pokeLinear(target, payload.bytes)) throw new StepError(`cannot place the payload at ${hex(target)}: not mapped on vCPU ${step.vcpu}`);
      execTarget = target;
      calls = moduleCode([{ name: 'call rel32', target }], new Set(['call rel32']));
      break;
    }
    case 'cr': {
      const cur = v.cpu.readCr(step.cr);
      const value = step.value !== undefined ? e(step.value) : (cur | step.set) & ~step.clear;
      const insn = `mov cr${step.cr}, rax` as const;
      if (step.from === 'module') calls = moduleCode([{ name: 'mov rax, imm64', imm: value }, { name: insn }], new Set([insn]));
      else {
        const name = `native_write_cr${step.cr}`;
        routineAction(name, insn, lengthOf(insn));
        calls = [routine(name, { rax: value })];
      }
      break;
    }
    case 'wrmsr': {
      const value = e(step.value);
      const lo = value & 0xffffffffn;
      const hi = value >> 32n;
      if (step.from === 'module') {
        calls = moduleCode(
          [{ name: 'mov ecx, imm32', imm: step.msr }, { name: 'mov eax, imm32', imm: lo }, { name: 'mov edx, imm32', imm: hi }, { name: 'wrmsr' }],
          new Set(['wrmsr']),
        );
      } else {
        routineAction('native_write_msr', 'wrmsr', lengthOf('wrmsr'));
        calls = [routine('native_write_msr', { rcx: BigInt(step.msr), rax: lo, rdx: hi })];
      }
      break;
    }
    case 'lidt':
    case 'lgdt': {
      const desc = Buffer.alloc(10);
      desc.writeUInt16LE(step.limit, 0);
      desc.writeBigUInt64LE(e(step.base), 2);
      const insn = step.verb === 'lidt' ? 'lidt [rax]' : 'lgdt [rax]';
      const where = step.from === 'module' ? c.data + BigInt(index % 64) * 0x10n : k.symbol('desc_scratch', (step.vcpu % 256) * 16);
      if (!v.pokeLinear(where, desc)) throw new StepError(`cannot place the descriptor at ${hex(where)}`);
      if (step.from === 'module') calls = moduleCode([{ name: 'mov rax, imm64', imm: where }, { name: insn }], new Set([insn]));
      else {
        const name = step.verb === 'lidt' ? 'load_idt' : 'load_gdt';
        routineAction(name, insn, lengthOf(insn));
        calls = [routine(name, { rax: where })];
      }
      break;
    }
    case 'int3':
      if (step.from === 'module') calls = moduleCode([{ name: 'int3' }], new Set(['int3']));
      else {
        routineAction('kprobe_site', 'int3', 1);
        calls = [routine('kprobe_site', {})];
      }
      break;
    case 'vmcall':
    case 'heki-lock-cr': {
      const heki = step.verb === 'heki-lock-cr';
      const rax = heki ? 13n : e(step.rax);
      const rbx = heki ? e(step.cr) : e(step.rbx);
      const rcx = heki ? e(step.mask) : e(step.rcx);
      const rdx = heki ? e(step.flags) : e(step.rdx);
      const rdi = heki ? 0n : e(step.rdi);
      const rsi = heki ? 0n : e(step.rsi);
      if (step.from === 'module') {
        calls = moduleCode(
          [
            { name: 'mov rax, imm64', imm: rax },
            { name: 'mov rbx, imm64', imm: BigInt.asUintN(64, rbx) },
            { name: 'mov rcx, imm64', imm: BigInt.asUintN(64, rcx) },
            { name: 'mov rdx, imm64', imm: BigInt.asUintN(64, rdx) },
            { name: 'mov rdi, imm64', imm: rdi },
            { name: 'vmcall' },
          ],
          new Set(['vmcall']),
        );
        calls[0]!.regs = { rsi };
      } else {
        routineAction('kvm_hypercall', 'vmcall', lengthOf('vmcall'));
        calls = [routine('kvm_hypercall', { rax, rbx, rcx, rdx, rdi, rsi })];
      }
      break;
    }
    case 'xsetbv': {
      const value = e(step.value);
      const lo = value & 0xffffffffn;
      const hi = value >> 32n;
      if (step.from === 'module') {
        calls = moduleCode(
          [{ name: 'mov ecx, imm32', imm: 0 }, { name: 'mov eax, imm32', imm: lo }, { name: 'mov edx, imm32', imm: hi }, { name: 'xsetbv' }],
          new Set(['xsetbv']),
        );
      } else {
        routineAction('xsetbv_xcr0', 'xsetbv', lengthOf('xsetbv'));
        calls = [routine('xsetbv_xcr0', { rcx: 0n, rax: lo, rdx: hi })];
      }
      break;
    }
  }

  const before = write ? v.peekLinear(write.gva, write.bytes.length) : null;
  if (write && !before) throw new StepError(`the write target ${hex(write.gva)} is not mapped on vCPU ${step.vcpu}`);
  for (const call of calls) {
    const r = await v.run({ entry: call.entry, returnTo: sentinel, regs: { rsp: k.taskStackTop(step.vcpu), ...call.regs } });
    sr.instructions += r.instructions;
    if (execTarget !== undefined && r.trace.some((t) => t.rip === execTarget && t.result === 'retired')) sr.executed = true;
    if (r.outcome !== 'completed') {
      sr.outcome = r.outcome;
      break;
    }
  }
  if (execTarget !== undefined) sr.executed ??= false;
  if (step.verb === 'vmcall' || step.verb === 'heki-lock-cr') sr.rax = hex(v.cpu.regs.rax);
  if (write && before) {
    const after = v.peekLinear(write.gva, write.bytes.length) ?? Buffer.alloc(0);
    sr.write = {
      at: hex(write.gva),
      bytes: write.bytes.length > 64 ? `${write.bytes.subarray(0, 32).toString('hex')}… (${write.bytes.length} bytes)` : write.bytes.toString('hex'),
      before: write.bytes.length > 64 ? `(${write.bytes.length} bytes)` : before.toString('hex'),
      after: write.bytes.length > 64 ? `(${write.bytes.length} bytes)` : after.toString('hex'),
      landed: landed(before, after, write.bytes),
    };
  }
  return sr;
}

function landed(before: Buffer, after: Buffer, intended: Buffer): boolean | 'partial' {
  if (after.equals(intended)) return true;
  if (after.equals(before)) return false;
  return 'partial';
}

/** A module image: "\x7fSIMMOD\0", the name (16 bytes), then int3 padding. */
function moduleImage(name: string, size: number): Buffer {
  const b = Buffer.alloc(size, 0xcc);
  b.write('\x7fSIMMOD\0', 0, 'latin1');
  b.fill(0, 8, 24);
  b.write(name, 8, 'latin1');
  return b;
}

// ---- expectations ------------------------------------------------------------------------------------

const ACCESS_BITS = { r: 1, w: 2, x: 4 } as const;
const DESCRIPTORS = { idtr: 1, gdtr: 2, ldtr: 3, tr: 4 } as const;

function describeEvent(e: EventExpectation): string {
  const parts: string[] = [];
  for (const [k, v] of Object.entries(e)) {
    if (k !== 'event' && v !== undefined) parts.push(`${k} ${k === 'msr' ? `0x${(v as number).toString(16)}` : String(v)}`);
  }
  return parts.length ? `${e.event} (${parts.join(', ')})` : e.event;
}

function check(
  c: Ctx,
  sc: Scenario,
  report: ScenarioReport,
  records: ReadonlyArray<GuestEventRecord & { step: string | null }>,
  keepFailures: ReadonlyMap<RegisterExpectation, string>,
): ExpectationResult[] {
  const out: ExpectationResult[] = [];
  const stepOf = (id: string): StepReport | undefined => report.steps.find((s) => s.id === id);
  const safeEval = (x: string, vcpu: number): bigint | string => {
    try {
      return evalExpr(c, x, vcpu);
    } catch (err) {
      return (err as Error).message;
    }
  };
  const matches = (e: EventExpectation, r: GuestEventRecord & { step: string | null }): boolean => {
    if (r.event !== e.event) return false;
    if (e.vcpu !== undefined && r.vcpu !== e.vcpu) return false;
    if (e.step !== undefined && r.step !== e.step) return false;
    if (e.ended !== undefined && r.ended !== e.ended) return false;
    const d = r.data ?? {};
    const eq = (field: string, x: string | undefined): boolean => {
      if (x === undefined) return true;
      const want = safeEval(x, r.vcpu);
      return typeof want === 'bigint' && d[field] === want;
    };
    if (e.rip !== undefined) {
      const m = /^action(?::(\d+))?$/.exec(e.rip);
      if (m) {
        const acts = stepOf(e.step!)?.actions ?? [];
        const ok = m[1] === undefined ? acts.some((a) => BigInt(a.rip) === r.rip) : acts[Number(m[1])] !== undefined && BigInt(acts[Number(m[1])]!.rip) === r.rip;
        if (!ok) return false;
      } else {
        const want = safeEval(e.rip, r.vcpu);
        if (want !== r.rip) return false;
      }
    }
    if (!eq('gva', e.gva) || !eq('gpa', e.gpa) || !eq('old_value', e.old) || !eq('new_value', e.new)) return false;
    if (e.access !== undefined && d['access'] !== ACCESS_BITS[e.access]) return false;
    if (e.cr !== undefined && d['cr'] !== e.cr) return false;
    if (e.msr !== undefined && d['msr'] !== e.msr) return false;
    if (e.descriptor !== undefined && d['descriptor'] !== DESCRIPTORS[e.descriptor]) return false;
    if (e.write !== undefined && d['write'] !== (e.write ? 1 : 0)) return false;
    return true;
  };

  if (sc.expect.events.length > 0) {
    let from = 0;
    const seen: string[] = [];
    let missing: string | undefined;
    for (const e of sc.expect.events) {
      const i = records.findIndex((r, j) => j >= from && matches(e, r));
      if (i < 0) {
        missing = describeEvent(e);
        break;
      }
      seen.push(`${e.event}#${records[i]!.seq}`);
      from = i + 1;
    }
    out.push({
      kind: 'events',
      expected: sc.expect.events.map(describeEvent).join(' → '),
      ok: missing === undefined,
      observed:
        missing === undefined
          ? `seen in order: ${seen.join(', ')}`
          : `not seen: ${missing}; events sent: ${records.length === 0 ? 'none' : records.map((r) => `${r.event}@${hex(r.rip)}(${r.ended})`).join(', ')}`,
    });
  }
  if (sc.expect.noEvents.length > 0) {
    const bad = records.filter((r) => sc.expect.noEvents.includes(r.event));
    out.push({
      kind: 'no-events',
      expected: `no ${sc.expect.noEvents.join('/')} event`,
      ok: bad.length === 0,
      observed: bad.length === 0 ? 'none sent' : `${bad.length} sent`,
    });
  }
  for (const w of sc.expect.writes) {
    const s = stepOf(w.step);
    const got = s?.write?.landed;
    const observed = s === undefined || s.outcome === 'skipped' ? `step did not run${s?.error ? `: ${s.error}` : ''}` : got === true ? 'landed' : got === 'partial' ? 'landed partly' : 'blocked (memory unchanged)';
    out.push({
      kind: 'write',
      expected: w.landed ? `the write of ${w.step} lands` : `the write of ${w.step} must not land`,
      ok: s !== undefined && s.outcome !== 'skipped' && (w.landed ? got === true : got === false),
      observed: `${observed}${s?.write ? ` at ${s.write.at}` : ''}; step ${s?.outcome ?? 'missing'}`,
    });
  }
  for (const r of sc.expect.registers) {
    const v = c.vm.vcpus[r.vcpu];
    const val = v ? readReg(v, r.reg) : undefined;
    if (r.keepBits !== undefined) {
      const f = keepFailures.get(r);
      out.push({
        kind: 'register',
        expected: `vCPU ${r.vcpu} ${r.reg} keeps ${r.keepBitNames?.join('|') ?? hex(r.keepBits)}`,
        ok: f === undefined,
        observed: f ?? `kept (${r.reg} = ${val === undefined ? '?' : hex(val)})`,
      });
    }
    for (const [which, x] of [['equals', r.equals], ['not-equals', r.notEquals]] as const) {
      if (x === undefined) continue;
      const want = safeEval(x, r.vcpu);
      const ok = typeof want === 'bigint' && val !== undefined && (which === 'equals' ? val === want : val !== want);
      out.push({
        kind: 'register',
        expected: `vCPU ${r.vcpu} ${r.reg} ${which === 'equals' ? '=' : '≠'} ${x}${typeof want === 'bigint' ? ` (${hex(want)})` : ''}`,
        ok,
        observed: typeof want === 'string' ? want : `${r.reg} = ${val === undefined ? 'unreadable' : hex(val)}`,
      });
    }
  }
  for (const x of sc.expect.executed) {
    const s = stepOf(x.step);
    out.push({
      kind: 'executed',
      expected: x.executed ? `the code at the target of ${x.step} runs` : `the code at the target of ${x.step} must not run`,
      ok: s?.executed === x.executed,
      observed: `${s?.executed ? 'executed' : 'not executed'}; step ${s?.outcome ?? 'missing'}`,
    });
  }
  for (const o of sc.expect.outcomes) {
    const s = stepOf(o.step);
    out.push({ kind: 'outcome', expected: `${o.step} ends ${o.outcome}`, ok: s?.outcome === o.outcome, observed: s?.outcome ?? 'missing' });
  }
  for (const x of sc.expect.results) {
    const s = stepOf(x.step);
    const want = safeEval(x.rax, s?.vcpu ?? 0);
    const ok = typeof want === 'bigint' && s?.rax !== undefined && BigInt(s.rax) === BigInt.asUintN(64, want);
    out.push({ kind: 'result', expected: `RAX after ${x.step} = ${x.rax}`, ok, observed: s?.rax !== undefined ? `RAX ${s.rax}; step ${s.outcome}` : `no RAX (${s?.outcome ?? 'missing'})` });
  }
  return out;
}
