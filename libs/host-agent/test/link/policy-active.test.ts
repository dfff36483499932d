/**
 * A policy install reports ACTIVE only once the interception it needs is enabled on every attached VM
 * (issue #8 leftover): before, `PolicyStatus ACTIVE` went up while `extendPlan` was still turning the new
 * interception on, and events of that window never reached the agent.
 */
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { PolicyInstallState, type LocalPolicy } from '@periscope/contracts';
import { formatPolicy, parsePolicy } from '@periscope/verdicts';
import type { ProtectionPlan } from '../../src/vm-connection.js';
import { cleanup, protectedVm, startAgent, startPeer, startVm, tempDir } from './fixture.js';

afterEach(cleanup);

const LSTAR = 0xc0000082;

function localPolicy(doc: string, id: string, version: bigint): LocalPolicy {
  return {
    policyId: id, version, rules: [], exceptions: [], defaultDecision: undefined, defaultReport: undefined, maxAskCentralDeadlineMs: 0,
    maxHeldEvents: 0, interception: undefined, verdictsDocument: doc,
  };
}

describe('policy install: ACTIVE after the interception is applied', () => {
  it('the first event after ACTIVE is seen: every vCPU already intercepts the new MSR, and the write is denied', async () => {
    const peer = await startPeer();
    const dir = tempDir();
    const sock = join(dir, 'k.sock');
    const h = await startAgent({ socketPath: sock, peer });
    const { vm } = await startVm(sock, { vcpus: 4, seed: 9 });
    await protectedVm(h, vm);
    await peer.waitFor(() => peer.vmAttached().length === 1);
    // Make turning the interception on slow (as on a busy host with many vCPUs): the window is wide.
    const conn = h.agent.listener.vms.get(vm.uuidText)!;
    const extend = conn.extendPlan.bind(conn);
    let extended = false;
    conn.extendPlan = async (plan: ProtectionPlan) => {
      await new Promise((r) => setTimeout(r, 300));
      await extend(plan);
      extended = true;
    };
    const v2 = parsePolicy({
      id: 'link-test', version: 2, defaultReport: 'never',
      rules: [{ id: 'lstar', match: { kind: 'MSR', msr: '0xc0000082' }, action: 'deny' }],
      interception: { events: ['CR', 'MSR'], crs: [0], msrs: ['0xc0000082'] },
    });
    const t0 = Date.now();
    const st = await peer.installPolicy(localPolicy(formatPolicy(v2), 'link-test', 2n));
    expect(st).toMatchObject({ state: PolicyInstallState.POLICY_INSTALL_STATE_ACTIVE, activeVersion: 2n });
    // No waiting here: at ACTIVE the interception is in KVM on every vCPU.
    expect(extended).toBe(true);
    expect(Date.now() - t0).toBeGreaterThanOrEqual(290);
    expect(vm.vcpus.every((c) => c.interceptions.msrs.has(LSTAR))).toBe(true);
    const cpu = vm.vcpus[3]!;
    const before = cpu.cpu.msrs.get(LSTAR) ?? 0n;
    const r = await cpu.wrmsr(LSTAR, 0xffffffffc0de0000n);
    expect(r.events.map((e) => e.event)).toEqual(['MSR']);
    expect(cpu.cpu.msrs.get(LSTAR) ?? 0n).toBe(before);
  });

  it('STALE and REJECTED are answered at once and in order with ACTIVE ones', async () => {
    const peer = await startPeer();
    const dir = tempDir();
    const sock = join(dir, 'k.sock');
    const h = await startAgent({ socketPath: sock, peer });
    const { vm } = await startVm(sock, { vcpus: 1, seed: 3 });
    await protectedVm(h, vm);
    const v2 = parsePolicy({ id: 'link-test', version: 2, rules: [], interception: { events: ['CR', 'MSR'], crs: [0], msrs: ['0xc0000082'] } });
    const [a, b] = await Promise.all([
      peer.installPolicy(localPolicy(formatPolicy(v2), 'link-test', 2n)),
      peer.installPolicy(localPolicy(formatPolicy(v2), 'link-test', 2n)),
    ]);
    expect(a.state).toBe(PolicyInstallState.POLICY_INSTALL_STATE_ACTIVE);
    expect(b.state).toBe(PolicyInstallState.POLICY_INSTALL_STATE_STALE);
  });
});
