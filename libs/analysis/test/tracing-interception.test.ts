/**
 * BREAKPOINT interception follows the traces (issue #9): the agent enables it on a VM only while the local
 * policy has a rule about that VM's breakpoints (an active trace), and turns it off (VCPU_CONTROL_EVENTS
 * enable=0) once the last trace of the VM stopped — after that a guest's own INT3 is the guest's business
 * again: KVM delivers #BP without an exit to the introspector. It is never turned off while an INT3 analysis
 * planted is still in the guest (a policy without the tracing rules can arrive first, e.g. right after a
 * failover): that INT3 must keep exiting, to be failed open by the agent, never reach the guest as #BP.
 *
 * Real simulator (2 VMs of 2 vCPUs on one host agent), real host agent in process, analysis on PGlite.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { PolicyInstallState } from '@periscope/contracts';
import { HostAgent, parseCookies } from '@periscope/host-agent';
import { events } from '@periscope/kvmi';
import { callTaggedCopy, SimQemu, SimVm } from '@periscope/simulator';
import { formatPolicy, parsePolicy } from '@periscope/verdicts';
import { Analysis } from '../src/index.js';
import { http, POLICY_ALL, until } from './support.js';

const BOOTSTRAP = parsePolicy({ id: 'bootstrap', version: 1, rules: [] });
const FN = 'sim_copy_tagged';
const BP = events.BREAKPOINT.id;

describe('BREAKPOINT interception follows the traces', () => {
  let a: Analysis;
  let agent: HostAgent;
  let dir = '';
  let base = '';
  const vms: { vm: SimVm; qemu: SimQemu }[] = [];

  beforeAll(async () => {
    a = await Analysis.start({ db: 'pglite:memory', grpcListen: '127.0.0.1:0', httpListen: '127.0.0.1:0', keepaliveMs: 200, flushMs: 100 });
    base = `http://${a.httpAddress}`;
    await a.applyPolicy(POLICY_ALL);
    dir = mkdtempSync(join(tmpdir(), 'an-trace-icpt-'));
    const socks = [join(dir, 'k0.sock'), join(dir, 'k1.sock')];
    agent = new HostAgent({
      hostId: 'icpt-host', kvmiPaths: socks, cookies: parseCookies(Buffer.from('s')), policy: BOOTSTRAP, log: () => undefined,
      link: { address: `127.0.0.1:${a.grpcPort}`, backoff: { initialMs: 20, maxMs: 200 }, allowCommands: ['write-physical'] },
    });
    await agent.start();
    for (const [i, path] of socks.entries()) {
      const vm = new SimVm({ vcpus: 2, seed: 60 + i, apsOnline: true, jitterMs: 0, name: `icpt-${i}` });
      const qemu = new SimQemu(vm, { path, key: Buffer.from('s'), reconnectSeconds: 0.05 });
      qemu.start();
      vms.push({ vm, qemu });
    }
    for (const { vm } of vms) await until(() => a.liveVms.get(vm.uuidText)?.protection['kernel-code-integrity']?.startsWith('protected') ?? false, 30_000, `${vm.name} protected`);
  }, 90_000);

  afterAll(async () => {
    for (const { vm, qemu } of vms) {
      qemu.stop();
      vm.close();
    }
    await agent?.stop(300);
    await a?.stop();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  const intercepts = (vm: SimVm): boolean[] => vm.vcpus.map((c) => c.interceptions.breakpoint);
  const agentBreakpoints = (vm: SimVm): number => agent.listener.vms.get(vm.uuidText)?.stats.eventsByKind.get(BP) ?? 0;
  /** The guest's own INT3 (not at a traced function): the events KVM raised and the vector the guest took. */
  const guestInt3 = async (vm: SimVm) => {
    const r = await vm.vcpus[1]!.int3();
    return { events: r.events.map((e) => e.event), vector: r.vector };
  };
  const startTrace = async (vm: SimVm) => {
    const r = await http(base, `/v1/vms/${vm.uuidText}/traces`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ function: FN, by: 'test' }) });
    expect(r.status, JSON.stringify(r.body)).toBe(201);
  };
  const stopTrace = async (vm: SimVm) => {
    const r = await http(base, `/v1/vms/${vm.uuidText}/traces/${FN}?by=test`, { method: 'DELETE' });
    expect(r.status, JSON.stringify(r.body)).toBe(200);
  };

  it('off before any trace, on only for the traced VM while it is traced, off again after trace stop', async () => {
    const [traced, other] = [vms[0]!.vm, vms[1]!.vm];
    expect(intercepts(traced)).toEqual([false, false]);
    expect(await guestInt3(traced)).toEqual({ events: [], vector: 3 });

    await startTrace(traced);
    // The trace started only once the agent reported its rules ACTIVE, i.e. after KVM intercepts on every vCPU.
    expect(intercepts(traced)).toEqual([true, true]);
    expect(intercepts(other)).toEqual([false, false]); // the host's other VM is not traced: no exits for it
    // The guest's own INT3 exits now; the agent sees it is not ours and re-injects #BP (as without Periscope).
    expect(await guestInt3(traced)).toEqual({ events: ['BREAKPOINT'], vector: 3 });
    const c = await callTaggedCopy(traced, traced.vcpus[0]!, 8, 0);
    expect(c).toMatchObject({ outcome: 'completed', copied: true });

    await stopTrace(traced);
    await until(() => intercepts(traced).every((x) => !x), 15_000, 'BREAKPOINT interception turned off after the last trace stopped');
    const seen = agentBreakpoints(traced);
    expect(await guestInt3(traced)).toEqual({ events: [], vector: 3 });
    expect((await callTaggedCopy(traced, traced.vcpus[1]!, 8, 0)).outcome).toBe('completed');
    expect(agentBreakpoints(traced)).toBe(seen); // nothing reaches the agent any more
    expect(intercepts(other)).toEqual([false, false]);
  }, 60_000);

  it('a policy without the tracing rules while our INT3 is in the guest keeps the interception: the hit fails open, never #BP', async () => {
    const vm = vms[1]!.vm;
    await startTrace(vm);
    const gpa = vm.kernel.symbolPhys(FN);
    expect(vm.memory.read(gpa, 1)![0]).toBe(0xcc);
    // A newer local policy without the tracing rules (what a replica that has not re-established the trace yet
    // sends first after a failover), installed at the agent.
    const current = agent.policies.current.policy;
    const next = parsePolicy({ id: current.id, version: Number(current.version) + 1, rules: [] });
    const st = agent.policies.install({
      policyId: next.id, version: BigInt(next.version), rules: [], exceptions: [], defaultDecision: undefined, defaultReport: undefined,
      maxAskCentralDeadlineMs: 0, maxHeldEvents: 0, interception: undefined, verdictsDocument: formatPolicy(next),
    });
    expect(st.state).toBe(PolicyInstallState.POLICY_INSTALL_STATE_ACTIVE);
    await agent.policies.applied;
    expect(intercepts(vm)).toEqual([true, true]);
    const failOpen = agent.link!.writes.stats.breakpointFailOpen;
    const call = await callTaggedCopy(vm, vm.vcpus[0]!, 16, 3);
    expect(call).toMatchObject({ outcome: 'completed', copied: true });
    expect(agent.link!.writes.stats.breakpointFailOpen).toBe(failOpen + 1);
    for (const c of vm.vcpus) expect(c.deliveredExceptions.filter((x) => x.vector === 3)).toEqual([]);
  }, 60_000);
});
