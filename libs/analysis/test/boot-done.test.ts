/**
 * The boot-done condition comes from the guest OS profile (docs/profiles.md, `bootDone`): the module
 * exceptions that let boot-time system-call MSR initialisation and firmware descriptor loads through follow
 * the profile's values — checked by evaluating real events against the compiled local policy.
 */
import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { encodeVcpuEvent, structs, VcpuEventView, type EventKey } from '@periscope/kvmi';
import { LINUX_SIM_PROFILE_PATH } from '@periscope/simulator';
import { compilePolicy, Evaluator } from '@periscope/verdicts';
import { AnalysisError, buildHostPolicy, parsePolicyDocument, ProfileRegistry } from '../src/index.js';

const VM = '970dc466-9808-4be9-a5f0-f47295d32aaf';
const LSTAR = 0xffffffff81e00000n;

function view(kind: EventKey, data: Record<string, unknown>, rip: bigint): VcpuEventView {
  const a = structs.kvmi_vcpu_event_arch.zero();
  a.mode = 8;
  a.regs.rip = rip;
  const v = new VcpuEventView();
  if (!v.reset(encodeVcpuEvent({ event: kind, seq: 3, vcpu: 0, arch: a, data }))) throw new Error('bad frame');
  return v;
}

function evaluatorFor(profileName: string, profiles: ProfileRegistry): Evaluator {
  const policy = parsePolicyDocument(`
format: periscope.policy/v1
name: boot-test
select: {}
profile: ${profileName}
modules:
  syscall-msrs: { action: deny }
  descriptor-tables: { action: deny, tables: [IDTR] }
`);
  const hp = buildHostPolicy({ policies: [policy], exceptions: [], vms: [{ uuid: VM, name: 'vm', hostId: 'h', labels: {} }], profiles, version: 1n });
  return new Evaluator(compilePolicy(hp.policy), { vmUuid: VM });
}

const shipped = JSON.parse(readFileSync(LINUX_SIM_PROFILE_PATH, 'utf8')) as Record<string, unknown>;

describe('boot-done condition from the guest OS profile', () => {
  it('the shipped profile states the defaults: MSR unset value 0, firmware below 1 MiB', () => {
    expect(shipped['bootDone']).toEqual({ syscallMsrUnsetValue: '0x0', firmwareRipBelow: '0x100000' });
    const ev = evaluatorFor('linux-sim', new ProfileRegistry());
    expect(ev.evaluate(view('MSR', { msr: 0xc0000082, old_value: 0n, new_value: LSTAR }, 0n)).exceptionId).toBe('boot-test/syscall-msrs/boot');
    expect(ev.evaluate(view('DESCRIPTOR', { descriptor: 1, write: 1 }, 0x7c00n)).exceptionId).toBe('boot-test/descriptor-tables/idtr-firmware');
    expect(ev.evaluate(view('DESCRIPTOR', { descriptor: 1, write: 1 }, 0x100000n)).ruleId).toBe('boot-test/descriptor-tables/idtr');
  });

  it('a profile with another condition changes what counts as boot time', () => {
    const profiles = new ProfileRegistry();
    profiles.addText(JSON.stringify({ ...shipped, name: 'linux-other', bootDone: { syscallMsrUnsetValue: '0xffffffff81000000', firmwareRipBelow: '0x8000' } }), 'linux-other.json');
    const ev = evaluatorFor('linux-other', profiles);
    // Old value 0 is no longer "unset": the write is a hijack, denied.
    let v = ev.evaluate(view('MSR', { msr: 0xc0000082, old_value: 0n, new_value: LSTAR }, 0n));
    expect([v.ruleId, v.kind]).toEqual(['boot-test/syscall-msrs/entry', 'deny']);
    v = ev.evaluate(view('MSR', { msr: 0xc0000082, old_value: 0xffffffff81000000n, new_value: LSTAR }, 0n));
    expect([v.exceptionId, v.kind]).toEqual(['boot-test/syscall-msrs/boot', 'allow']);
    // Firmware range shrank to 32 KiB.
    expect(ev.evaluate(view('DESCRIPTOR', { descriptor: 1, write: 1 }, 0x7c00n)).exceptionId).toBe('boot-test/descriptor-tables/idtr-firmware');
    expect(ev.evaluate(view('DESCRIPTOR', { descriptor: 1, write: 1 }, 0x9000n)).ruleId).toBe('boot-test/descriptor-tables/idtr');
  });

  it('a malformed bootDone is refused with its path', () => {
    const profiles = new ProfileRegistry();
    let err: unknown;
    try {
      profiles.addText(JSON.stringify({ ...shipped, name: 'bad', bootDone: { syscallMsrUnsetValue: '0x0', firmwareRipBelow: 'low' } }), 'bad.json');
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(AnalysisError);
    expect((err as AnalysisError).code).toBe('bad-profile');
    expect((err as AnalysisError).message).toMatch(/bad\.json: .*bootDone\.firmwareRipBelow/);
  });
});
