/**
 * A local policy pushed by analysis may only inject exceptions, crash a guest or rewrite a CR/MSR value when
 * the host allows it (`--allow-command inject-exception` / `crash` / `set-registers`), as for the same
 * operations sent as commands: otherwise
 * the whole install is REJECTED naming the key, and the previous policy stays active (shown with a
 * simulator event the old policy decides). The operator's own `--policy` file is trusted.
 */
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { PolicyInstallState, type LocalPolicy } from '@periscope/contracts';
import { compilePolicy, formatPolicy, parsePolicy, type Policy } from '@periscope/verdicts';
import { policyAllowKeys } from '../../src/link/command-executor.js';
import { cleanup, CR0_WP, protectedVm, startAgent, startPeer, startVm, tempDir, until } from './fixture.js';

afterEach(cleanup);

const LSTAR = 0xc0000082;
const HIJACK = 0xffffffffc0de0000n;

function localPolicy(p: Policy): LocalPolicy {
  return {
    policyId: p.id, version: BigInt(p.version), rules: [], exceptions: [], defaultDecision: undefined, defaultReport: undefined, maxAskCentralDeadlineMs: 0,
    maxHeldEvents: 0, interception: undefined, verdictsDocument: formatPolicy(p),
  };
}

/** v2: LSTAR writes answered with `action` (CR0.WP clears are no longer denied). */
function lstarPolicy(version: number, action: unknown): Policy {
  return parsePolicy({
    id: 'link-test', version, defaultReport: 'never',
    rules: [{ id: 'lstar', match: { kind: 'MSR', msr: '0xc0000082' }, action }],
    interception: { events: ['CR', 'MSR'], crs: [0], msrs: ['0xc0000082'] },
  });
}

async function setup(allowCommands: string[]) {
  const peer = await startPeer();
  const dir = tempDir();
  const sock = join(dir, 'k.sock');
  // The local --policy (the fixture's testPolicy v1): CR0.WP clears are denied.
  const h = await startAgent({ socketPath: sock, peer, link: { allowCommands } });
  const { vm } = await startVm(sock, { vcpus: 1, seed: 12 });
  await protectedVm(h, vm);
  await peer.waitFor(() => peer.vmAttached().length === 1);
  return { peer, h, vm, cpu: vm.vcpus[0]! };
}

describe('policy installs from analysis are checked against the allow-list', () => {
  it('the key each action needs is derived from the compiled policy: rules, ask-central defaults, exceptions, defaults', () => {
    const p = parsePolicy({
      id: 'x', version: 1,
      rules: [
        { id: 'a', match: { kind: 'MSR' }, action: 'crash' },
        { id: 'b', match: { kind: 'CR' }, askCentral: { deadlineMs: 5, default: 'crash' } },
        { id: 'c', match: { kind: 'PF' }, action: { kind: 'inject', vector: '#GP', errorCode: 0 } },
        { id: 'd', match: { kind: 'DESCRIPTOR' }, action: 'skip' },
      ],
      exceptions: [{ id: 'e', rules: ['d'], match: { kind: 'DESCRIPTOR' }, action: 'crash' }],
      defaultActions: { XSETBV: 'crash' },
    });
    const keys = policyAllowKeys(compilePolicy(p));
    expect([...keys.keys()].sort()).toEqual(['crash', 'inject-exception']);
    expect(keys.get('crash')).toEqual(['rule a (crash)', 'rule b (ask-central default) (crash)', 'exception e (crash)', 'default for XSETBV (crash)']);
    expect(keys.get('inject-exception')).toEqual(['rule c (inject)']);
    expect(policyAllowKeys(compilePolicy(lstarPolicy(2, 'deny'))).size).toBe(0);
    expect(policyAllowKeys(compilePolicy(lstarPolicy(2, { kind: 'deny', forceBits: '0xff' }))).size).toBe(0);
    // rewrite chooses the value a CR/MSR write lands with: the key of VCPU_SET_REGISTERS.
    expect([...policyAllowKeys(compilePolicy(lstarPolicy(2, { kind: 'rewrite', clearBits: '0xffffffffffffffff', setBits: '0xffffffffc0de0000' })))]).toEqual([['set-registers', ['rule lstar (rewrite)']]]);
  });

  it('rewrite: refused without --allow-command set-registers (the guest keeps its value); with it, the write lands with the chosen value', async () => {
    const REWRITE = { kind: 'rewrite', clearBits: '0xffffffffffffffff', setBits: `0x${HIJACK.toString(16)}` };
    const refused = await setup(['write-physical', 'crash', 'inject-exception']);
    const no = await refused.peer.installPolicy(localPolicy(lstarPolicy(2, REWRITE)));
    expect(no.state).toBe(PolicyInstallState.POLICY_INSTALL_STATE_REJECTED);
    expect(no.error).toContain('rule lstar (rewrite) needs --allow-command set-registers');
    expect(no.activeVersion).toBe(1n);
    expect(refused.vm.vcpus[0]!.interceptions.msrs.has(LSTAR)).toBe(false);
    const mine = 0xffffffff81a00000n;
    await refused.cpu.wrmsr(LSTAR, mine);
    expect(refused.cpu.cpu.msrs.get(LSTAR)).toBe(mine); // not intercepted: the guest's own value
    await cleanup();

    const allowed = await setup(['set-registers']);
    const ok = await allowed.peer.installPolicy(localPolicy(lstarPolicy(2, REWRITE)));
    expect(ok).toMatchObject({ state: PolicyInstallState.POLICY_INSTALL_STATE_ACTIVE, activeVersion: 2n });
    await until(() => allowed.vm.vcpus[0]!.interceptions.msrs.has(LSTAR), 3000, 'LSTAR intercepted');
    const r = await allowed.cpu.wrmsr(LSTAR, mine);
    expect(r.events.map((e) => e.event)).toEqual(['MSR']);
    expect(allowed.cpu.cpu.msrs.get(LSTAR)).toBe(HIJACK);
  });

  it('without the keys: a pushed crash or inject policy is rejected naming the key, the old policy stays active', async () => {
    const { peer, h, vm, cpu } = await setup(['write-physical']);
    const crash = await peer.installPolicy(localPolicy(lstarPolicy(2, 'crash')));
    expect(crash.state).toBe(PolicyInstallState.POLICY_INSTALL_STATE_REJECTED);
    expect(crash.error).toContain('rule lstar (crash) needs --allow-command crash');
    expect(crash.error).toContain('config key "allow-command"');
    expect(crash.activeVersion).toBe(1n);
    const inject = await peer.installPolicy(localPolicy(lstarPolicy(3, { kind: 'inject', vector: '#GP', errorCode: 0 })));
    expect(inject.state).toBe(PolicyInstallState.POLICY_INSTALL_STATE_REJECTED);
    expect(inject.error).toContain('rule lstar (inject) needs --allow-command inject-exception');
    expect(inject.activeVersion).toBe(1n);
    // Crash hidden in an exception and in an ask-central default: refused the same way.
    const hidden = parsePolicy({
      id: 'link-test', version: 4,
      rules: [
        { id: 'cr0', match: { kind: 'CR', cr: 0 }, action: 'allow' },
        { id: 'cr4', match: { kind: 'CR', cr: 4 }, askCentral: { deadlineMs: 5, default: 'crash' } },
      ],
      exceptions: [{ id: 'boom', rules: ['cr0'], match: { kind: 'CR' }, action: 'crash' }],
      interception: { events: ['CR'], crs: [0, 4], msrs: [] },
    });
    const hid = await peer.installPolicy(localPolicy(hidden));
    expect(hid.state).toBe(PolicyInstallState.POLICY_INSTALL_STATE_REJECTED);
    expect(hid.error).toContain('rule cr4 (ask-central default) (crash), exception boom (crash) needs --allow-command crash');
    expect(h.logs.some((l) => l.startsWith('warn: policy install link-test v2: POLICY_INSTALL_STATE_REJECTED') && l.includes('--allow-command crash'))).toBe(true);

    // The old policy (v1, the --policy file) still decides: a CR0.WP clear is denied, as v1 says and none of
    // the refused ones would, and LSTAR is not intercepted (the refused interception was never applied).
    expect(h.agent.policies.current.policy.version).toBe(1n);
    const cr0 = cpu.cpu.sregs.cr0 | CR0_WP;
    cpu.cpu.sregs.cr0 = cr0;
    const w = await cpu.writeCr(0, cr0 & ~CR0_WP);
    expect(w.events.map((e) => e.event)).toEqual(['CR']);
    expect(cpu.cpu.sregs.cr0 & CR0_WP).toBe(CR0_WP);
    expect(vm.vcpus[0]!.interceptions.msrs.has(LSTAR)).toBe(false);
    const r = await cpu.wrmsr(LSTAR, HIJACK);
    expect(r.crashed).toBe(false);
    expect(cpu.isCrashed).toBe(false);

    // A policy without those actions installs (the refusals did not wedge anything).
    const ok = await peer.installPolicy(localPolicy(lstarPolicy(5, 'deny')));
    expect(ok).toMatchObject({ state: PolicyInstallState.POLICY_INSTALL_STATE_ACTIVE, activeVersion: 5n });
  });

  it('with --allow-command crash: the crash policy installs and a LSTAR write crashes the vCPU; inject is still refused', async () => {
    const { peer, h, vm, cpu } = await setup(['crash']);
    const inject = await peer.installPolicy(localPolicy(lstarPolicy(2, { kind: 'inject', vector: '#GP', errorCode: 0 })));
    expect(inject.state).toBe(PolicyInstallState.POLICY_INSTALL_STATE_REJECTED);
    expect(inject.error).toContain('--allow-command inject-exception');
    const st = await peer.installPolicy(localPolicy(lstarPolicy(3, 'crash')));
    expect(st).toMatchObject({ state: PolicyInstallState.POLICY_INSTALL_STATE_ACTIVE, activeVersion: 3n });
    expect(h.agent.policies.current.policy.version).toBe(3n);
    expect(vm.vcpus[0]!.interceptions.msrs.has(LSTAR)).toBe(true);
    const before = cpu.cpu.msrs.get(LSTAR) ?? 0n;
    const r = await cpu.wrmsr(LSTAR, HIJACK);
    expect(r.events.map((e) => e.event)).toEqual(['MSR']);
    expect(r.crashed).toBe(true);
    expect(cpu.isCrashed).toBe(true);
    expect(cpu.cpu.msrs.get(LSTAR) ?? 0n).toBe(before);
  });

  it('with --allow-command inject-exception: the inject policy installs and #GP(0) is delivered at the WRMSR', async () => {
    const { peer, vm, cpu } = await setup(['inject-exception']);
    const crash = await peer.installPolicy(localPolicy(lstarPolicy(2, 'crash')));
    expect(crash.state).toBe(PolicyInstallState.POLICY_INSTALL_STATE_REJECTED);
    expect(crash.error).toContain('--allow-command crash');
    const st = await peer.installPolicy(localPolicy(lstarPolicy(3, { kind: 'inject', vector: '#GP', errorCode: 0 })));
    expect(st).toMatchObject({ state: PolicyInstallState.POLICY_INSTALL_STATE_ACTIVE, activeVersion: 3n });
    expect(vm.vcpus[0]!.interceptions.msrs.has(LSTAR)).toBe(true);
    const before = cpu.cpu.msrs.get(LSTAR) ?? 0n;
    const rip = cpu.cpu.regs.rip;
    const r = await cpu.wrmsr(LSTAR, HIJACK);
    expect(r.events.map((e) => e.event)).toEqual(['MSR']);
    // KVM delivers the injected exception when the vCPU enters the guest again (a later turn).
    await until(() => cpu.deliveredExceptions.length > 0, 5000, 'the injected exception delivered');
    expect(cpu.deliveredExceptions.at(-1)).toEqual({ vector: 13, errorCode: 0 });
    expect(cpu.cpu.regs.rip).toBe(rip);
    expect(cpu.isCrashed).toBe(false);
    expect(cpu.cpu.msrs.get(LSTAR) ?? 0n).toBe(before);
  });
});
