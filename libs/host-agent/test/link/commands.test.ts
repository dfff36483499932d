/**
 * Commands from analysis: results and KVM errors by correlation id, commands on a vCPU that is holding
 * an event, the agent's allow-list refusing dangerous commands (naming the config key), GET_MAP_TOKEN,
 * stale sessions, policy installs (atomic, versioned, from a periscope.verdicts/v1 document).
 */
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { CommandStatus, EventAction, EventDisposition, KvmError, PolicyInstallState, type KvmiEvent, type LocalPolicy } from '@periscope/contracts';
import { formatPolicy, parsePolicy } from '@periscope/verdicts';
import { cleanup, CR4_PGE, CR0_WP, protectedVm, startAgent, startPeer, startVm, tempDir, testPolicy, uuidBytes } from './fixture.js';

afterEach(cleanup);

function localPolicy(doc: string, id: string, version: bigint): LocalPolicy {
  return {
    policyId: id, version, rules: [], exceptions: [], defaultDecision: undefined, defaultReport: undefined, maxAskCentralDeadlineMs: 0,
    maxHeldEvents: 0, interception: undefined, verdictsDocument: doc,
  };
}

describe('agent link: commands from analysis', () => {
  it('runs KVMI commands by VM and vCPU (also on a vCPU holding an event), refuses dangerous ones unless allowed', async () => {
    const heldEvents: KvmiEvent[] = [];
    const peer = await startPeer({ onHeldEvent: (e) => heldEvents.push(e) });
    const dir = tempDir();
    const sock = join(dir, 'k.sock');
    const h = await startAgent({ socketPath: sock, peer, policy: testPolicy({ askDeadlineMs: 1000 }), link: { allowCommands: ['write-physical'] } });
    const { vm } = await startVm(sock, { vcpus: 2, seed: 6 });
    await protectedVm(h, vm);
    await peer.waitFor(() => peer.vmAttached().length === 1);
    const vmUuid = uuidBytes(vm);
    const base = { vmUuid, sessionGeneration: peer.vmAttached()[0]!.sessionGeneration };
    // A VM-scoped read, with its typed result.
    vm.memory.write(0x7000n, Buffer.from('periscope'));
    const read = await peer.command({ ...base, vcpu: 0, command: { $case: 'readPhysical', value: { gpa: 0x7000n, size: 9 } } });
    expect(read.status).toBe(CommandStatus.COMMAND_STATUS_OK);
    expect(read.result?.$case === 'readPhysical' && read.result.value.data.toString()).toBe('periscope');
    // KVM's error comes back as KVM_ERROR (SET_REGISTERS outside an event: EOPNOTSUPP needs the allow-list first, so use a bad CPUID leaf).
    const cpuid = await peer.command({ ...base, vcpu: 0, command: { $case: 'getCpuid', value: { function: 0x7fffffff, index: 0 } } });
    expect(cpuid.status).toBe(CommandStatus.COMMAND_STATUS_KVM_ERROR);
    expect(cpuid.kvmError).toBe(KvmError.KVM_ERROR_ENOENT);
    // Allowed by --allow-command write-physical.
    const wr = await peer.command({ ...base, vcpu: 0, command: { $case: 'writePhysical', value: { gpa: 0x7000n, data: Buffer.from('PERISCOPE') } } });
    expect(wr.status).toBe(CommandStatus.COMMAND_STATUS_OK);
    expect(vm.memory.read(0x7000n, 9)!.toString()).toBe('PERISCOPE');
    // Hold vCPU 1 on an ask-central event (1 s deadline) and work on it while it waits.
    const cpu1 = vm.vcpus[1]!;
    const rip = cpu1.cpu.regs.rip;
    const pending = cpu1.writeCr(4, cpu1.cpu.sregs.cr4 ^ CR4_PGE);
    await peer.waitFor(() => heldEvents.length === 1, 3000, 'held event');
    const regs = await peer.command({ ...base, vcpu: 1, command: { $case: 'getRegisters', value: { msrIndexes: [0xc0000082] } } });
    expect(regs.status).toBe(CommandStatus.COMMAND_STATUS_OK);
    expect(regs.result?.$case === 'getRegisters' && regs.result.value.regs?.rip).toBe(rip);
    expect(regs.result?.$case === 'getRegisters' && regs.result.value.msrs[0]?.index).toBe(0xc0000082);
    // SET_REGISTERS is dangerous: refused, naming the config key; the vCPU is still held.
    const set = await peer.command({ ...base, vcpu: 1, command: { $case: 'setRegisters', value: { regs: { ...(regs.result?.$case === 'getRegisters' ? regs.result.value.regs! : ({} as never)), rax: 1n } } } });
    expect(set.status).toBe(CommandStatus.COMMAND_STATUS_REFUSED_BY_AGENT_POLICY);
    expect(set.message).toContain('--allow-command set-registers');
    expect(set.message).toContain('allow-command');
    const inj = await peer.command({ ...base, vcpu: 1, command: { $case: 'injectException', value: { nr: 13, errorCode: 0, address: 0n } } });
    expect(inj.status).toBe(CommandStatus.COMMAND_STATUS_REFUSED_BY_AGENT_POLICY);
    expect(cpu1.waitingFor?.event).toBe('CR');
    // Release it with a verdict; the guest goes on.
    const e = heldEvents[0]!;
    peer.verdict({ vmUuid: e.vmUuid, sessionGeneration: e.sessionGeneration, seq: e.seq, decision: { action: EventAction.EVENT_ACTION_CONTINUE, replyValue: undefined }, ruleId: 'ok', detectionId: '' });
    expect((await pending).outcome).toBe('completed');
    // Stale session, unknown VM, GET_MAP_TOKEN (the simulator's kernel has the legacy command), max gfn.
    const stale = await peer.command({ vmUuid, sessionGeneration: base.sessionGeneration - 1n, vcpu: 0, command: { $case: 'vmGetInfo', value: {} } });
    expect(stale.status).toBe(CommandStatus.COMMAND_STATUS_STALE_SESSION);
    const none = await peer.command({ vmUuid: Buffer.alloc(16, 7), sessionGeneration: base.sessionGeneration, vcpu: 0, command: { $case: 'vmGetInfo', value: {} } });
    expect(none.status).toBe(CommandStatus.COMMAND_STATUS_VM_NOT_ATTACHED);
    const token = await peer.command({ ...base, vcpu: 0, command: { $case: 'getMapToken', value: {} } });
    expect(token.status).toBe(CommandStatus.COMMAND_STATUS_OK);
    expect(token.result?.$case === 'getMapToken' && token.result.value.token.length).toBe(32);
    const gfn = await peer.command({ ...base, vcpu: 0, command: { $case: 'getMaxGfn', value: {} } });
    expect(gfn.status).toBe(CommandStatus.COMMAND_STATUS_OK);
    // Correlation ids are echoed.
    expect(peer.commandResults().every((r) => r.correlationId > 0n)).toBe(true);
    expect(new Set(peer.commandResults().map((r) => r.correlationId)).size).toBe(peer.commandResults().length);
    void EventDisposition;
  });

  it('installs policies atomically and versioned: ACTIVE, STALE, REJECTED (the previous policy stays)', async () => {
    const peer = await startPeer();
    const dir = tempDir();
    const sock = join(dir, 'k.sock');
    const h = await startAgent({ socketPath: sock, peer });
    const { vm } = await startVm(sock, { vcpus: 1, seed: 7 });
    await protectedVm(h, vm);
    await peer.waitFor(() => peer.vmAttached().length === 1);
    const cpu = vm.vcpus[0]!;
    // v1 denies CR0.WP clears. v2 allows them and denies LSTAR writes (new interception: MSR).
    const v2 = parsePolicy({
      id: 'link-test', version: 2, defaultReport: 'never',
      rules: [{ id: 'lstar', match: { kind: 'MSR', msr: '0xc0000082' }, action: 'deny' }],
      interception: { events: ['CR', 'MSR'], crs: [0], msrs: ['0xc0000082'] },
    });
    const ok = await peer.installPolicy(localPolicy(formatPolicy(v2), 'link-test', 2n));
    expect(ok).toMatchObject({ state: PolicyInstallState.POLICY_INSTALL_STATE_ACTIVE, activeVersion: 2n });
    const cr0 = cpu.cpu.sregs.cr0 | CR0_WP;
    cpu.cpu.sregs.cr0 = cr0;
    await cpu.writeCr(0, cr0 & ~CR0_WP);
    expect(cpu.cpu.sregs.cr0 & CR0_WP).toBe(0n); // v2 allows it
    const lstar = cpu.cpu.msrs.get(0xc0000082) ?? 0n;
    await peer.waitFor(() => vm.vcpus[0]!.interceptions.msrs.size === 1, 3000, 'MSR interception added');
    await cpu.wrmsr(0xc0000082, 0xffffffffc0de0000n);
    expect(cpu.cpu.msrs.get(0xc0000082) ?? 0n).toBe(lstar);
    const stale = await peer.installPolicy(localPolicy(formatPolicy({ ...v2, version: 2n }), 'link-test', 2n));
    expect(stale.state).toBe(PolicyInstallState.POLICY_INSTALL_STATE_STALE);
    const bad = await peer.installPolicy(localPolicy('{"id": "link-test", "version": 3, "rules": [{"id": "x", "match": {"kind": "PAUSE"}, "action": "deny"}]}', 'link-test', 3n));
    expect(bad.state).toBe(PolicyInstallState.POLICY_INSTALL_STATE_REJECTED);
    expect(bad.error).toContain('x');
    expect(bad.activeVersion).toBe(2n);
    expect(h.agent.policies.current.policy.version).toBe(2n);
  });
  it('records a byte analysis writes in the state directory before KVM receives the write (write-ahead for kill -9)', async () => {
    const peer = await startPeer();
    const dir = tempDir();
    const sock = join(dir, 'k.sock');
    const stateDir = join(dir, 'state');
    const h = await startAgent({ socketPath: sock, peer, stateDir, link: { allowCommands: ['write-physical'] } });
    const { vm } = await startVm(sock, { vcpus: 1, seed: 8 });
    await protectedVm(h, vm);
    await peer.waitFor(() => peer.vmAttached().length === 1);
    const base = { vmUuid: uuidBytes(vm), sessionGeneration: peer.vmAttached()[0]!.sessionGeneration, vcpu: 0 };
    const gpa = 0x7100n;
    const original = vm.memory.read(gpa, 1)![0]!;
    const written = original === 0xcc ? 0x90 : 0xcc;
    // What planted.json said at the moment the simulated KVM received each write at gpa (before it applies it).
    const onDisk: unknown[] = [];
    vm.on('command', (key, _vcpu, req) => {
      if (key !== 'VM_WRITE_PHYSICAL' || (req['gpa'] as bigint) !== gpa) return;
      const f = join(stateDir, 'planted.json');
      const all = existsSync(f) ? (JSON.parse(readFileSync(f, 'utf8')) as Record<string, { bytes: Record<string, unknown> }>) : {};
      onDisk.push(all[vm.uuidText]?.bytes[`0x${gpa.toString(16)}`] ?? null);
    });
    const w = await peer.command({ ...base, command: { $case: 'writePhysical', value: { gpa, data: Buffer.of(written) } } });
    expect(w.status).toBe(CommandStatus.COMMAND_STATUS_OK);
    expect(vm.memory.read(gpa, 1)![0]).toBe(written);
    expect(onDisk).toEqual([{ original, written }]);
    // Writing the original back forgets the byte, on disk only once KVM has applied the write (until then the
    // guest may still hold the written byte, so the record stays).
    const back = await peer.command({ ...base, command: { $case: 'writePhysical', value: { gpa, data: Buffer.of(original) } } });
    expect(back.status).toBe(CommandStatus.COMMAND_STATUS_OK);
    expect(vm.memory.read(gpa, 1)![0]).toBe(original);
    expect(onDisk).toEqual([{ original, written }, { original, written }]);
    expect(JSON.parse(readFileSync(join(stateDir, 'planted.json'), 'utf8'))).toEqual({});
  });
});
