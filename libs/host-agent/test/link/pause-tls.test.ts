/**
 * Pause/resume from analysis (held PAUSE events, persisted, re-applied after the VM re-attaches — also
 * to a restarted agent), and mutual TLS in fleet mode (a certificate from another CA is refused).
 */
import { join } from 'node:path';
import { readFileSync } from 'node:fs';
import { afterEach, describe, expect, it } from 'vitest';
import { CommandStatus } from '@periscope/contracts';
import { TestCa } from '@periscope/testing';
import { cleanup, protectedVm, startAgent, startPeer, startVm, tempDir, until, uuidBytes, metric } from './fixture.js';

afterEach(cleanup);

describe('agent link: pause', () => {
  it('pauses every vCPU (PAUSE events held, no deadline), is idempotent, survives an agent restart, and resumes', async () => {
    const peer = await startPeer();
    const dir = tempDir();
    const sock = join(dir, 'k.sock');
    const stateDir = join(dir, 'state');
    const h1 = await startAgent({ socketPath: sock, peer, stateDir });
    const { vm } = await startVm(sock, { vcpus: 3, seed: 8 });
    await protectedVm(h1, vm);
    await peer.waitFor(() => peer.vmAttached().length === 1);
    const allPaused = () => vm.vcpus.every((c) => c.waitingFor?.event === 'PAUSE');
    const r = await peer.pauseVm(uuidBytes(vm), true);
    expect(r.status).toBe(CommandStatus.COMMAND_STATUS_OK);
    await until(allPaused, 3000, 'every vCPU holding a PAUSE event');
    // Held well past any ask-central deadline.
    await new Promise((res) => setTimeout(res, 150));
    expect(allPaused()).toBe(true);
    // Idempotent: a second pause sends no new VM_PAUSE_VCPU.
    expect((await peer.pauseVm(uuidBytes(vm), true)).status).toBe(CommandStatus.COMMAND_STATUS_OK);
    expect(vm.vcpus.map((c) => c.pendingPauseRequests)).toEqual([0, 0, 0]);
    expect(h1.agent.listener.vms.get(vm.uuidText)!.pausedVcpus).toBe(3);
    expect(JSON.parse(readFileSync(join(stateDir, 'paused.json'), 'utf8'))).toEqual([vm.uuidText]);
    // Restart the agent: on stop it releases the vCPUs; QEMU reconnects to the new agent, which pauses again.
    const g1 = h1.agent.listener.vms.get(vm.uuidText)!.info!.sessionGeneration;
    await h1.stop();
    const h2 = await startAgent({ socketPath: sock, peer, stateDir });
    await until(() => h2.agent.listener.vms.get(vm.uuidText)?.info?.sessionGeneration !== undefined && allPaused(), 10_000, 'paused again after the restart');
    expect(metric(h2, 'periscope_agent_vms_paused')).toBe(1);
    expect(h2.agent.listener.vms.get(vm.uuidText)!.info!.sessionGeneration).toBeGreaterThan(g1); // a new session, also after the restart
    // Resume: the held PAUSE events are answered CONTINUE and the guest runs.
    await peer.waitFor(() => peer.connections.filter((c) => !c.ended).length === 1 && peer.vmAttached().length >= 2, 5000, 'second agent connected');
    const resumed = await peer.pauseVm(uuidBytes(vm), false);
    expect(resumed.status).toBe(CommandStatus.COMMAND_STATUS_OK);
    await until(() => vm.vcpus.every((c) => c.waitingFor === null), 3000, 'every vCPU running');
    const w = await vm.vcpus[0]!.writeCr(0, vm.vcpus[0]!.cpu.sregs.cr0 ^ 8n);
    expect(w.outcome).toBe('completed');
    expect(JSON.parse(readFileSync(join(stateDir, 'paused.json'), 'utf8'))).toEqual([]);
    // Pausing a VM that is not attached: answered VM_NOT_ATTACHED, the state is still persisted.
    const other = Buffer.alloc(16, 0x42);
    expect((await peer.pauseVm(other, true)).status).toBe(CommandStatus.COMMAND_STATUS_VM_NOT_ATTACHED);
    expect(JSON.parse(readFileSync(join(stateDir, 'paused.json'), 'utf8'))).toEqual(['42424242-4242-4242-4242-424242424242']);
  }, 30_000);
});

describe('agent link: mutual TLS (fleet mode)', () => {
  it('connects with a certificate from the fleet CA; a certificate from another CA is refused; plaintext is refused', async () => {
    const dir = tempDir();
    const ca = TestCa.create(dir, 'fleet-ca');
    const rogue = TestCa.create(dir, 'rogue-ca');
    const server = ca.issue('analysis');
    const agentCert = ca.issue('agent-1');
    const rogueCert = rogue.issue('agent-rogue');
    const peer = await startPeer({ tls: { ca: ca.cert, cert: server.cert, key: server.key } });
    // The good agent.
    const good = await startAgent({ socketPath: join(dir, 'a.sock'), peer, hostId: 'good', link: { tls: { ca: ca.cert, cert: agentCert.cert, key: agentCert.key } } });
    await peer.waitFor(() => peer.hellos().some((hl) => hl.hostId === 'good'), 10_000, 'hello over mTLS');
    expect(peer.connections[0]!.clientCn).toBe('agent-1');
    expect(good.agent.link!.client.state).toBe('up');
    // An agent with a certificate signed by another CA: the server refuses the handshake.
    const bad = await startAgent({ socketPath: join(dir, 'b.sock'), peer, hostId: 'rogue', link: { tls: { ca: ca.cert, cert: rogueCert.cert, key: rogueCert.key } } });
    // An agent speaking plaintext to the TLS endpoint.
    const plain = await startAgent({ socketPath: join(dir, 'c.sock'), peer, hostId: 'plain' });
    await new Promise((r) => setTimeout(r, 1500));
    expect(peer.hellos().map((hl) => hl.hostId)).toEqual(['good']);
    expect(bad.agent.link!.client.state).not.toBe('up');
    expect(plain.agent.link!.client.state).not.toBe('up');
    expect(bad.agent.link!.client.stats.attempts).toBeGreaterThan(1); // still retrying with backoff
    // And the agent refuses an analysis server whose certificate is not from the fleet CA.
    const rogueServer = rogue.issue('rogue-analysis');
    const fake = await startPeer({ tls: { ca: ca.cert, cert: rogueServer.cert, key: rogueServer.key } });
    const fooled = await startAgent({ socketPath: join(dir, 'd.sock'), peer: fake, hostId: 'fooled', link: { tls: { ca: ca.cert, cert: agentCert.cert, key: agentCert.key } } });
    await new Promise((r) => setTimeout(r, 1000));
    expect(fake.hellos()).toHaveLength(0);
    expect(fooled.agent.link!.client.state).not.toBe('up');
  }, 30_000);
});
