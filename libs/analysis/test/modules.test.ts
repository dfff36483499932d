/**
 * The modules' local policy, evaluated by the real verdicts evaluator over real KVMI frames (encoded with
 * @periscope/kvmi's kernel-side encoder): what each module denies, and what an exception lets through.
 */
import { describe, expect, it } from 'vitest';
import { encodeVcpuEvent, structs, VcpuEventView, type EventKey } from '@periscope/kvmi';
import { compilePolicy, Evaluator } from '@periscope/verdicts';
import { buildHostPolicy, parsePolicyDocument, ProfileRegistry, renderTechniqueTable, TECHNIQUES, type ExceptionSpec, type KernelFacts } from '../src/index.js';
import { readFileSync } from 'node:fs';
import { POLICY_ALL } from './support.js';

const VM = '970dc466-9808-4be9-a5f0-f47295d32aaf';
const profiles = new ProfileRegistry();
const sim = profiles.get('linux-sim')!;
const SLIDE = 0x1200000n;
const facts: KernelFacts = { profile: 'linux-sim', qemuStartTimeMs: 1n, slide: SLIDE, textBase: sim.defaultTextBase + SLIDE, textPhys: sim.defaultTextBase + SLIDE - sim.kernelMap };

function view(kind: EventKey, data: Record<string, unknown>, rip: bigint): VcpuEventView {
  const a = structs.kvmi_vcpu_event_arch.zero();
  a.mode = 8;
  a.regs.rip = rip;
  const v = new VcpuEventView();
  if (!v.reset(encodeVcpuEvent({ event: kind, seq: 3, vcpu: 0, arch: a, data }))) throw new Error('bad frame');
  return v;
}

function evaluator(exceptions: ExceptionSpec[] = []): Evaluator {
  const hp = buildHostPolicy({ policies: [parsePolicyDocument(POLICY_ALL)], exceptions, vms: [{ uuid: VM, name: 'vm', hostId: 'h', labels: {}, facts }], profiles, version: 1000n });
  return new Evaluator(compilePolicy(hp.policy), { vmUuid: VM });
}

describe('module rules under the verdicts evaluator', () => {
  it('CR pinning, syscall MSRs (boot writes allowed), descriptor tables, per-GPA text protection with text_poke allowed', () => {
    const ev = evaluator();
    let v = ev.evaluate(view('CR', { cr: 4, old_value: 0x3406e0n, new_value: 0x2406e0n }, 0xffffffffc0200014n));
    expect([v.ruleId, v.kind, v.newVal, v.severity]).toEqual(['fleet-default/cr-pinning/cr4', 'deny', 0x3406e0n, 4]);
    v = ev.evaluate(view('CR', { cr: 4, old_value: 0x3406e0n, new_value: 0x3406e0n | 0x80n }, 0n));
    expect(v.ruleId).toBe(null);
    const lstar = facts.textBase + sim.offsetOf('entry_SYSCALL_64');
    v = ev.evaluate(view('MSR', { msr: 0xc0000082, old_value: lstar, new_value: 0xffffffffc0200800n }, 0n));
    expect([v.ruleId, v.kind, v.newVal]).toEqual(['fleet-default/syscall-msrs/entry', 'deny', lstar]);
    v = ev.evaluate(view('MSR', { msr: 0xc0000082, old_value: 0n, new_value: lstar }, 0n));
    expect([v.exceptionId, v.kind, v.severity]).toEqual(['fleet-default/syscall-msrs/boot', 'allow', 0]);
    v = ev.evaluate(view('MSR', { msr: 0xc0000082, old_value: lstar, new_value: lstar }, 0n));
    expect(v.ruleId).toBe(null);
    v = ev.evaluate(view('MSR', { msr: 0xc0000080, old_value: 0xd01n, new_value: 0x501n }, 0n));
    expect([v.ruleId, v.newVal]).toEqual(['fleet-default/syscall-msrs/efer-nxe', 0xd01n]);
    v = ev.evaluate(view('DESCRIPTOR', { descriptor: 1, write: 1 }, 0xffffffffc0200010n));
    expect([v.ruleId, v.kind]).toEqual(['fleet-default/descriptor-tables/idtr', 'skip']);
    const textGpa = facts.textPhys + sim.offsetOf('__x64_sys_getpid');
    v = ev.evaluate(view('PF', { gva: textGpa, gpa: textGpa, access: 2 }, 0xffffffffc0200014n));
    expect([v.ruleId, v.kind]).toEqual([`fleet-default/kernel-code-integrity/text#${VM}`, 'skip']);
    const poke = facts.textBase + sim.offsetOf('text_poke');
    v = ev.evaluate(view('PF', { gva: textGpa, gpa: textGpa, access: 2 }, poke));
    expect([v.exceptionId, v.kind, v.report]).toEqual([`fleet-default/kernel-code-integrity/writers#${VM}`, 'allow', false]);
    const table = facts.textPhys + sim.offsetOf('sys_call_table') + 0x138n;
    v = ev.evaluate(view('PF', { gva: table, gpa: table, access: 2 }, 0xffffffffc0200014n));
    expect(v.ruleId).toBe(`fleet-default/kernel-code-integrity/rodata#${VM}`);
  });

  it('an exception (RIP + victim) lets exactly the identical event through, reported but not detected', () => {
    const exc: ExceptionSpec = {
      id: 'exc-1', policy: 'fleet-default', module: 'cr-pinning', rule: 'cr4', vms: [VM], originator: { rip: { start: 0xffffffff82200220n, end: 0xffffffff82200221n } },
      victim: { cr: 4, newValue: 0x2406e0n }, action: 'allow', expiresNs: 0n, reason: 't', createdBy: 't',
    };
    const ev = evaluator([exc]);
    let v = ev.evaluate(view('CR', { cr: 4, old_value: 0x3406e0n, new_value: 0x2406e0n }, 0xffffffff82200220n));
    expect([v.exceptionId, v.kind, v.newVal, v.report, v.severity]).toEqual(['exception/exc-1', 'allow', 0x2406e0n, true, 0]);
    v = ev.evaluate(view('CR', { cr: 4, old_value: 0x3406e0n, new_value: 0x2406e0n }, 0xffffffff82200224n));
    expect([v.exceptionId, v.kind]).toEqual([null, 'deny']);
    v = ev.evaluate(view('CR', { cr: 4, old_value: 0x3406e0n, new_value: 0x1406e0n }, 0xffffffff82200220n));
    expect(v.kind).toBe('deny');
  });

  it('docs/alerts.md carries the technique table', () => {
    const doc = readFileSync(new URL('../../../docs/alerts.md', import.meta.url), 'utf8');
    expect(doc).toContain(renderTechniqueTable());
    expect(Object.keys(TECHNIQUES).length).toBeGreaterThanOrEqual(9);
  });
});
