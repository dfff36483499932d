/**
 * Scenario files: steps a simulated guest performs on its vCPUs, and expectations written by hand that
 * the simulator checks against what happened. The YAML format is documented in docs/simulator.md.
 */
import type { EventKey } from '@periscope/kvmi';
import type { InstructionName } from '@periscope/x86';

import type { RunOutcome } from '../kvm/types.js';

/**
 * An address or value expression: terms joined by `+` / `-`. A term is a number (`0x…` or decimal) or
 * one of: `sym:NAME` (kernel virtual address), `phys:NAME` (its gpa), `alias:NAME` (its address in the
 * kernel's physmap alias, the identity map: gva = gpa), `code` / `data` (this run's code and data pages
 * in the module area), `module:NAME` (a module loaded by a `load-module` step), `user_text:P`,
 * `user_data:P`, `user_text_phys:P`, `user_data_phys:P` (process P's pages), `pgd:kernel`, `pgd:P`
 * (CR3 values), `stack` (the vCPU's task stack top).
 */
export type Expr = string;

/**
 * Where a write, read or execute goes: a linear address (`at:` in the file), or a guest-physical one
 * (`gpa:`), reached through the kernel map (`KERNEL_BASE + gpa`, RAM below 1 GiB), as kernel code
 * reaches physical memory.
 */
export type Target = { gva: Expr } | { gpa: Expr };

/** Where a step's instructions run. */
export type StepOrigin =
  /** Code assembled into this run's code page in the module area (an attacker's module). */
  | 'module'
  /** The kernel's own routines in its text (native_write_cr4, memcpy_word, …), registers loaded by its caller. */
  | 'kernel'
  /** The kernel's text_poke routine (writes only). */
  | 'text_poke';

interface StepBase {
  /** Names the step in expectations and reports (default `step-N`). */
  id: string;
  /** The vCPU it runs on (default 0). */
  vcpu: number;
  from: StepOrigin;
  note?: string;
}

export type Step = StepBase &
  (
    | { verb: 'write'; at: Target; bytes?: string; value?: Expr }
    | { verb: 'read'; at: Target }
    | { verb: 'execute'; at: Target; payload: InstructionName[] }
    | { verb: 'cr'; cr: 0 | 3 | 4; value?: Expr; set: bigint; clear: bigint }
    | { verb: 'wrmsr'; msr: number; value: Expr }
    | { verb: 'lidt' | 'lgdt'; base: Expr; limit: number }
    | { verb: 'int3' }
    | { verb: 'vmcall'; rax: Expr; rdi: Expr; rsi: Expr; rbx: Expr; rcx: Expr; rdx: Expr }
    /** KVM_HC_LOCK_CR_UPDATE (Heki): VMCALL with RAX = 13, RBX = cr, RCX = mask, RDX = flags. */
    | { verb: 'heki-lock-cr'; cr: Expr; mask: Expr; flags: Expr }
    | { verb: 'xsetbv'; value: Expr }
    | { verb: 'dma-write'; gpa: Expr; bytes: string }
    | { verb: 'delay'; ms: number }
    | { verb: 'bring-up'; target: number }
    | { verb: 'load-module'; name: string; size: number }
  );

export type StepVerb = Step['verb'];

export interface EventExpectation {
  event: EventKey;
  vcpu?: number;
  /** The step running when the event was sent. */
  step?: string;
  /** `action` (any action instruction of the step), `action:N` (the N-th, from 0), or an expression. */
  rip?: string;
  gva?: Expr;
  gpa?: Expr;
  /** PF access bit: r, w or x. */
  access?: 'r' | 'w' | 'x';
  cr?: number;
  msr?: number;
  descriptor?: 'idtr' | 'gdtr' | 'ldtr' | 'tr';
  write?: boolean;
  old?: Expr;
  new?: Expr;
  /** How the wait ended (CONTINUE, RETRY, CRASH, send-failed, …). */
  ended?: string;
}

export interface RegisterExpectation {
  vcpu: number;
  /** cr0, cr3, cr4, efer, xcr0, idtr.base, idtr.limit, gdtr.base, gdtr.limit, rip, rsp, rax…, msr:NAME or msr:0x… */
  reg: string;
  /** The bits must be set at the start and after every step. */
  keepBits?: bigint;
  keepBitNames?: string[];
  /** At the end. */
  equals?: Expr;
  notEquals?: Expr;
}

export interface Expectations {
  /** In this order (other events may come in between). */
  events: EventExpectation[];
  /** No event of these kinds during the scenario. */
  noEvents: EventKey[];
  writes: Array<{ step: string; landed: boolean }>;
  registers: RegisterExpectation[];
  executed: Array<{ step: string; executed: boolean }>;
  outcomes: Array<{ step: string; outcome: RunOutcome | 'skipped' }>;
  /** RAX after the step (a hypercall's result). */
  results: Array<{ step: string; rax: Expr }>;
}

export interface Scenario {
  name: string;
  kind: 'attack' | 'benign';
  description: string;
  /** vCPUs the VM needs. */
  vcpus: number;
  steps: Step[];
  expect: Expectations;
  /** Where it was loaded from. */
  file?: string;
}

// ---- reports ----------------------------------------------------------------------------------------

export interface ExpectationResult {
  kind: 'events' | 'no-events' | 'write' | 'register' | 'executed' | 'outcome' | 'result';
  /** The expectation in words. */
  expected: string;
  ok: boolean;
  /** What happened. */
  observed: string;
}

export interface StepReport {
  id: string;
  verb: StepVerb;
  vcpu: number;
  from: StepOrigin;
  /** How the step's code ended (the first run that did not complete, else `completed`). */
  outcome: RunOutcome | 'skipped';
  /** Where the step's module code starts (module steps). */
  code?: string;
  /** Action instructions (the instructions the step is about), with their table lengths. */
  actions: Array<{ rip: string; name: InstructionName; length: number }>;
  /** Instructions executed (retries included). */
  instructions: number;
  events: number;
  /** For writes and dma-write: the target and what happened to it. */
  write?: { at: string; bytes: string; before: string; after: string; landed: boolean | 'partial' };
  /** For vmcall and heki-lock-cr: RAX after the step. */
  rax?: string;
  /** For execute: whether the first instruction at the target retired. */
  executed?: boolean;
  error?: string;
}

export interface ScenarioEventReport {
  vcpu: number;
  event: EventKey;
  seq: number;
  rip: string;
  step: string | null;
  ended: string;
  data?: Record<string, string | number>;
}

export interface ScenarioReport {
  scenario: string;
  kind: 'attack' | 'benign';
  file?: string;
  vm: string;
  uuid: string;
  /** Every expectation held. */
  passed: boolean;
  startedAt: string;
  durationMs: number;
  steps: StepReport[];
  expectations: ExpectationResult[];
  events: ScenarioEventReport[];
  livelocks: number;
  /** The scenario could not run (e.g. the VM has too few vCPUs). */
  error?: string;
}
