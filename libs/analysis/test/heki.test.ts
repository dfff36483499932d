/**
 * Heki end to end on the analysis side (issue #11): the real simulator (Heki KVM, the simulated VMM
 * forwarding exits, KVMI for the correlation cases) + real host agents (`hekiListen`, analysis link over
 * real gRPC) + analysis on PGlite.
 *
 * Shown: a Heki guest pins bits and the fleet view shows the union; a violation gives one alert and the
 * guest a #GP with the register still pinned; the stop policy (pushed by analysis) stops the VM; a host
 * without Heki is reported as "Heki unavailable on host", never "guest did not pin"; the missing-pin
 * alert; KVMI denies (no Heki exit) = one incident; KVMI allows + Heki denies = one incident.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DEFAULT_HOST_PROFILE, HekiVmm, SimQemu, SimVm, hekiGuestInit, hekiLockCr } from '@periscope/simulator';
import { HostAgent, parseCookies } from '@periscope/host-agent';
import { parsePolicy } from '@periscope/verdicts';
import { Analysis, AnalysisError, parsePolicyDocument, type AlertRecord } from '../src/index.js';
import { http, until } from './support.js';

const WP = 1n << 16n;
const UMIP = 1n << 11n;
const SMEP = 1n << 20n;
const SMAP = 1n << 21n;

const POLICIES = [
  `
format: periscope.policy/v1
name: heki-guests
description: Heki guests pin WP, SMEP, SMAP within 1 s; violations re-enter (#GP)
select: { names: ['heki-*'] }
modules:
  heki: { expect: { cr0: [WP], cr4: [SMEP, SMAP] }, pin-within: 1s }
`,
  `
format: periscope.policy/v1
name: heki-stop
select: { names: ['stop-*'] }
modules:
  heki: { denial: stop, pin-within: 0 }
`,
  `
format: periscope.policy/v1
name: heki-lazy
select: { names: ['lazy-*'] }
modules:
  heki: { expect: { cr4: [SMEP] }, pin-within: 300ms, missing-severity: high }
`,
  `
format: periscope.policy/v1
name: kvmi-denies
select: { names: ['both-*'] }
modules:
  cr-pinning: { action: deny, cr0: [WP], cr4: [SMEP] }
  heki: { pin-within: 0 }
`,
  `
format: periscope.policy/v1
name: kvmi-reports
select: { names: ['report-*'] }
modules:
  cr-pinning: { action: report, cr0: [WP], cr4: [SMEP] }
  heki: { pin-within: 0 }
`,
];

const BOOTSTRAP = parsePolicy({ id: 'bootstrap', version: 1, rules: [] });

interface Agent {
  agent: HostAgent;
  kvmi: string;
  heki: string;
}

let a: Analysis;
let base = '';
let dir = '';
let main: Agent;
let old: Agent;
/** An agent without `--allow-command crash`: analysis cannot make its Heki denials stop a VM. */
let strict: Agent;
const cleanups: (() => Promise<void> | void)[] = [];

async function startAgent(hostId: string, allowCommands: string[] = ['crash']): Promise<Agent> {
  const kvmi = join(dir, `${hostId}-kvmi.sock`);
  const heki = join(dir, `${hostId}-heki.sock`);
  const agent = new HostAgent({
    hostId, kvmiPaths: [kvmi], cookies: parseCookies(Buffer.from('s')), policy: BOOTSTRAP, log: () => undefined, hekiListen: heki,
    link: { address: `127.0.0.1:${a.grpcPort}`, backoff: { initialMs: 20, maxMs: 200 }, allowCommands },
  });
  await agent.start();
  cleanups.push(() => agent.stop(300));
  await until(() => a.sessions.has(hostId), 10_000, `agent ${hostId} linked`);
  return { agent, kvmi, heki };
}

async function startVm(at: Agent, name: string, opts: { heki?: boolean; kvmi?: boolean; seed?: number } = {}): Promise<{ vm: SimVm; vmm: HekiVmm }> {
  const vm = new SimVm({ vcpus: 1, seed: opts.seed ?? 7, jitterMs: 0, apsOnline: true, name, profile: { ...DEFAULT_HOST_PROFILE, heki: opts.heki ?? true } });
  const vmm = new HekiVmm(vm, { sink: `unix:${at.heki}` });
  cleanups.push(() => vm.close());
  cleanups.push(() => vmm.close());
  if (opts.kvmi) {
    const qemu = new SimQemu(vm, { path: at.kvmi, key: Buffer.from('s'), reconnectSeconds: 0.05 });
    cleanups.push(() => qemu.stop());
    qemu.start();
  }
  await vmm.start();
  await until(() => a.heki.vm(vm.uuidText) !== undefined, 10_000, `${name} registered at analysis`);
  return { vm, vmm };
}

async function alertsOf(uuid: string): Promise<AlertRecord[]> {
  await a.settled();
  await a.heki.settled();
  return a.store.listAlerts({ vm: uuid, limit: 100 });
}

async function fleetVm(uuid: string): Promise<Record<string, unknown>> {
  const r = await http(base, '/v1/heki');
  expect(r.status).toBe(200);
  const v = (r.body['vms'] as Record<string, unknown>[]).find((x) => x['uuid'] === uuid);
  expect(v, `fleet view has ${uuid}`).toBeDefined();
  return v!;
}

/** The agent runs the local policy analysis sent last (ACTIVE = its interception is in KVM). */
async function policyActive(hostId: string): Promise<void> {
  await a.settled();
  const s = a.sessions.get(hostId)!;
  await until(async () => {
    const h = (await a.store.listHosts()).find((x) => x.hostId === hostId);
    return h?.policyState === 'active' && h.policyVersion === s.lastPolicyVersion;
  }, 10_000, `agent policy ${s.lastPolicyVersion}`);
}

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'an-heki-'));
  a = await Analysis.start({ db: 'pglite:memory', grpcListen: '127.0.0.1:0', httpListen: '127.0.0.1:0', keepaliveMs: 200, flushMs: 100 });
  base = `http://127.0.0.1:${a.httpPort}`;
  for (const p of POLICIES) await a.applyPolicy(p);
  main = await startAgent('heki-host');
  old = await startAgent('old-host');
  strict = await startAgent('strict-host', []);
}, 60_000);

afterAll(async () => {
  while (cleanups.length) await cleanups.pop()!();
  await a?.stop();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

describe('Heki state and the fleet view', () => {
  it('a Heki guest pins bits: the fleet view shows the union, with times, and the policy is satisfied (no alert)', async () => {
    const { vm } = await startVm(main, 'heki-union');
    const c = vm.vcpus[0]!;
    expect(await hekiGuestInit(c)).toMatchObject({ probe: 1n, cr0: 0n, cr4: 0n });
    expect((await c.writeCr(4, c.cpu.sregs.cr4 | UMIP)).outcome).toBe('completed');
    expect((await hekiLockCr(c, 4n, UMIP)).value).toBe(0n); // a second CR4 pin: the union
    await until(() => a.heki.vm(vm.uuidText)?.configureExits === 3, 10_000, 'three configure exits');
    const v = await fleetVm(vm.uuidText);
    expect(v).toMatchObject({
      name: 'heki-union', hostId: 'heki-host', status: 'pinned', statusText: 'pinned', hostHasHeki: true,
      pinnedCr0: `0x${WP.toString(16)}`, pinnedCr4: `0x${(SMEP | SMAP | UMIP).toString(16)}`, configureExits: 3, configureReasons: ['CR0', 'CR4'],
      expected: { policy: 'heki-guests', pins: ['CR0.WP', 'CR4.SMEP', 'CR4.SMAP'], missing: [], compliant: true },
      denialResponse: 'reenter',
    });
    expect(v['pinned']).toEqual(['CR0.WP', 'CR4.UMIP', 'CR4.SMEP', 'CR4.SMAP']);
    expect(BigInt(v['pinnedCr4'] as string)).toBe(vm.heki.pinnedCr4); // analysis's view equals KVM's
    expect(BigInt(v['firstPinNs'] as string)).toBeGreaterThan(0n);
    expect(BigInt(v['lastPinNs'] as string)).toBeGreaterThanOrEqual(BigInt(v['firstPinNs'] as string));
    await new Promise((r) => setTimeout(r, 1200)); // past pin-within
    expect(await alertsOf(vm.uuidText)).toEqual([]);
    const fleet = (await http(base, '/v1/heki')).body;
    expect(fleet['summary']).toMatchObject({ pinned: expect.any(Number) });
    expect((fleet['summary'] as { pinnedAnywhere: string[] }).pinnedAnywhere).toEqual(expect.arrayContaining(['CR0.WP', 'CR4.UMIP', 'CR4.SMEP', 'CR4.SMAP']));
  });

  it('a host without Heki: "Heki unavailable on host", not "guest did not pin", and no missing-pin alert', async () => {
    const { vm, vmm } = await startVm(old, 'heki-oldhost', { heki: false });
    expect(vmm.hostHasHeki).toBe(false);
    await hekiGuestInit(vm.vcpus[0]!); // -KVM_ENOSYS: nothing to pin with
    const v = await fleetVm(vm.uuidText);
    expect(v).toMatchObject({ status: 'heki-unavailable', statusText: 'Heki unavailable on host', hostHasHeki: false, expected: { compliant: null, missing: [] } });
    const host = ((await http(base, '/v1/heki?host=old-host')).body['hosts'] as Record<string, unknown>[])[0];
    expect(host).toMatchObject({ hostId: 'old-host', hekiAvailable: false, statusText: 'Heki unavailable on host' });
    await new Promise((r) => setTimeout(r, 1200)); // past the group's pin-within
    expect(await alertsOf(vm.uuidText)).toEqual([]);
  });

  it('expected pins missing after pin-within: one alert (technique, expected/missing bits); "guest did not pin"', async () => {
    const { vm } = await startVm(main, 'lazy-guest', { seed: 11 });
    await until(async () => (await alertsOf(vm.uuidText)).length === 1, 10_000, 'missing-pin alert');
    const [al] = await alertsOf(vm.uuidText);
    expect(al).toMatchObject({
      module: 'heki', ruleId: 'heki-lazy/heki/missing-pin', severity: 'high', technique: { id: 'T1562.001' }, action: 'alert',
      evidence: { attempt: { event: 'HEKI_MISSING_PIN', missing: ['CR4.SMEP'], expectedCr4: `0x${SMEP.toString(16)}` } },
    });
    expect(al!.title).toContain('no Heki pins');
    expect(await fleetVm(vm.uuidText)).toMatchObject({ status: 'not-pinned', statusText: 'guest did not pin', expected: { compliant: false, missing: ['CR4.SMEP'], missingAlertId: al!.id } });
    // Pinning late completes the VM; the alert stays single.
    await hekiGuestInit(vm.vcpus[0]!);
    await until(() => (a.heki.vm(vm.uuidText)?.configureExits ?? 0) >= 2, 5000, 'late pins');
    expect(await fleetVm(vm.uuidText)).toMatchObject({ status: 'pinned', expected: { compliant: true } });
    expect(await alertsOf(vm.uuidText)).toHaveLength(1);
  });

  it('policy validation names the field', () => {
    expect(() => parsePolicyDocument('name: x\nmodules:\n  heki: { expect: { cr4: [PGE] }, pin-within: soon, denial: crash }\n')).toThrow(AnalysisError);
    try {
      parsePolicyDocument('name: x\nmodules:\n  heki: { expect: { cr4: [PGE] }, pin-within: soon, denial: crash }\n');
    } catch (e) {
      expect((e as AnalysisError).issues.map((i) => i.path)).toEqual(['modules.heki.expect.cr4[0]', 'modules.heki.pin-within', 'modules.heki.denial']);
    }
  });
});

describe('violations', () => {
  it('one alert with technique and evidence; the guest gets #GP with the register still pinned (re-enter, the default)', async () => {
    const { vm, vmm } = await startVm(main, 'heki-violation', { seed: 12 });
    const c = vm.vcpus[0]!;
    await hekiGuestInit(c);
    const cr4 = c.cpu.sregs.cr4;
    const rip = c.cpu.regs.rip;
    const r = await c.writeCr(4, cr4 & ~SMEP);
    expect(r).toMatchObject({ outcome: 'gp', vector: 13, value: cr4 });
    expect(c.cpu.sregs.cr4 & SMEP).toBe(SMEP);
    expect(c.deliveredExceptions.at(-1)).toEqual({ vector: 13, errorCode: 0 });
    expect(vmm.stats).toMatchObject({ denialsAnswered: 1, denialDefaults: 0 });
    await until(async () => (await alertsOf(vm.uuidText)).length === 1, 10_000, 'violation alert');
    const alerts = await alertsOf(vm.uuidText);
    expect(alerts).toHaveLength(1);
    const full = (await a.store.getAlert(alerts[0]!.id))!;
    expect(full).toMatchObject({
      module: 'heki', ruleId: 'heki-guests/heki/cr4', technique: { id: 'T1068' }, severity: 'high', action: 'heki: #GP injected (re-enter)', vcpu: 0,
      evidence: { attempt: { event: 'HEKI_DENIAL', register: 'cr4', new: `0x${(cr4 & ~SMEP).toString(16)}`, rip: `0x${rip.toString(16)}`, clearedPins: `0x${SMEP.toString(16)}` } },
    });
    expect(full.title).toMatch(/^Blocked: /);
    expect(full.detectionIds).toHaveLength(1);
    // The agent's denial is acknowledged (not resent).
    await until(() => main.agent.link!.heki!.pendingDenials === 0, 5000, 'denial acknowledged');
    expect(await fleetVm(vm.uuidText)).toMatchObject({ status: 'pinned', denials: 1, lastDenial: { cr: 'CR4', completion: 'reenter', clearedBits: 'CR4.SMEP' } });
  });

  it('the stop policy (pushed by analysis to the agent) stops the VM; one alert', async () => {
    const { vm, vmm } = await startVm(main, 'stop-guest', { seed: 13 });
    await until(() => main.agent.link!.heki!.completionFor(vm.uuidText) === 'stop', 10_000, 'stop policy at the agent');
    expect(vmm.registered?.defaultCompletion).toBe(1); // the agent's own default stays re-enter
    const c = vm.vcpus[0]!;
    await hekiGuestInit(c);
    const cr0 = c.cpu.sregs.cr0;
    expect((await c.writeCr(0, cr0 & ~WP)).outcome).toBe('vm-stopped');
    expect(vm.stopped).toMatch(/Heki denial: CR0/);
    expect(c.cpu.sregs.cr0).toBe(cr0);
    expect(vmm.stats.stops).toBe(1);
    await until(async () => (await alertsOf(vm.uuidText)).length === 1, 10_000, 'stop alert');
    const [al] = await alertsOf(vm.uuidText);
    expect(al).toMatchObject({ module: 'heki', ruleId: 'heki-stop/heki/cr0', technique: { id: 'T1562' }, action: 'heki: VM stopped', tier: 'central' });
    expect(await fleetVm(vm.uuidText)).toMatchObject({ status: 'stopped', statusText: 'stopped after a Heki violation', stops: 1, denialResponse: 'stop' });
  });

  it('without --allow-command crash the agent refuses the pushed stop: the guest gets #GP, the VM runs on, the refusal is visible', async () => {
    const { vm, vmm } = await startVm(strict, 'stop-refused', { seed: 31 });
    const heki = strict.agent.link!.heki!;
    await until(() => heki.stats.stopRefused >= 1, 10_000, 'the stop policy refused at the agent');
    expect(heki.completionFor(vm.uuidText)).toBeUndefined();
    expect(strict.agent.registry.render()).toMatch(/^periscope_agent_heki_stop_refused_total [1-9]/m);
    const c = vm.vcpus[0]!;
    await hekiGuestInit(c);
    const cr0 = c.cpu.sregs.cr0;
    expect((await c.writeCr(0, cr0 & ~WP)).outcome).toBe('gp');
    expect(vm.stopped).toBeFalsy();
    expect(c.cpu.sregs.cr0).toBe(cr0);
    expect(vmm.stats.stops).toBe(0);
    expect((await c.writeCr(4, c.cpu.sregs.cr4 | UMIP)).outcome).toBe('completed'); // the vCPU runs on
    await until(async () => (await alertsOf(vm.uuidText)).length === 1, 10_000, 'violation alert');
    const [al] = await alertsOf(vm.uuidText);
    expect(al).toMatchObject({ module: 'heki', action: 'heki: #GP injected (re-enter)' });
    expect(await fleetVm(vm.uuidText)).toMatchObject({
      stops: 0, denials: 1, denialResponse: 'reenter',
      denialResponseFrom: 'agent (--heki-denial): policy heki-stop asks stop, refused by the agent (needs --allow-command crash)',
    });
    // The agent that allows it says so at registration; this one does not.
    expect(a.heki.vm(vm.uuidText)?.stopAllowed).toBe(false);
  });
});

describe('correlation with KVMI CR events on the same VM', () => {
  it('KVMI denies (the write never reaches Heki: no exit): one incident, the KVMI alert annotated with the Heki pins', async () => {
    const { vm } = await startVm(main, 'both-guest', { kvmi: true, seed: 14 });
    await until(() => a.liveVms.has(vm.uuidText), 10_000, 'KVMI attached');
    await policyActive('heki-host');
    const c = vm.vcpus[0]!;
    await hekiGuestInit(c);
    await until(() => a.heki.vm(vm.uuidText)?.configureExits === 2, 5000, 'pins');
    const cr4 = c.cpu.sregs.cr4;
    const before = main.agent.heki!.vm(vm.uuidText)!.denials;
    const r = await c.writeCr(4, cr4 & ~SMEP);
    expect(r).toMatchObject({ outcome: 'completed', value: cr4 }); // KVMI forced SMEP back
    expect(r.events.map((e) => e.event)).toEqual(['CR']);
    await until(async () => (await alertsOf(vm.uuidText)).length === 1, 10_000, 'KVMI alert');
    await new Promise((res) => setTimeout(res, 300));
    expect(main.agent.heki!.vm(vm.uuidText)!.denials).toBe(before); // no Heki exit
    const alerts = await alertsOf(vm.uuidText);
    expect(alerts).toHaveLength(1);
    expect(alerts[0]).toMatchObject({ module: 'cr-pinning', ruleId: expect.stringMatching(/^kvmi-denies\/cr-pinning\/cr4/), action: 'deny', evidence: { attributes: { heki_correlation: 'kvmi-denied', heki_cleared: 'CR4.SMEP' } } });
    expect(alerts[0]!.description).toContain('no Heki exit');
    // /v1/vms carries the Heki state of KVMI-attached VMs.
    const vms = (await http(base, '/v1/vms')).body['vms'] as { uuid: string; heki: Record<string, unknown> | null }[];
    expect(vms.find((x) => x.uuid === vm.uuidText)?.heki).toMatchObject({ status: 'pinned', pinnedCr4: `0x${(SMEP | SMAP).toString(16)}` });
    expect((await http(base, `/v1/vms/${vm.uuidText}`)).body['vm']).toMatchObject({ heki: { status: 'pinned' } });
  });

  it('KVMI allows (report) + Heki denies: one incident — one alert carrying both detections, blocked by Heki (#GP)', async () => {
    const { vm } = await startVm(main, 'report-guest', { kvmi: true, seed: 15 });
    await until(() => a.liveVms.has(vm.uuidText), 10_000, 'KVMI attached');
    await policyActive('heki-host');
    const c = vm.vcpus[0]!;
    await hekiGuestInit(c);
    await until(() => a.heki.vm(vm.uuidText)?.configureExits === 2, 5000, 'pins');
    const cr4 = c.cpu.sregs.cr4;
    const r = await c.writeCr(4, cr4 & ~SMEP);
    expect(r).toMatchObject({ outcome: 'gp', vector: 13, value: cr4 }); // KVMI allowed, Heki refused
    expect(c.cpu.sregs.cr4 & SMEP).toBe(SMEP);
    await until(async () => {
      const x = await alertsOf(vm.uuidText);
      return x.length === 1 && ((await a.store.getAlert(x[0]!.id))?.detectionIds?.length ?? 0) === 2;
    }, 10_000, 'one alert with both detections');
    await new Promise((res) => setTimeout(res, 300));
    const alerts = await alertsOf(vm.uuidText);
    expect(alerts).toHaveLength(1);
    const full = (await a.store.getAlert(alerts[0]!.id))!;
    expect(full.detectionIds).toHaveLength(2);
    expect(full.action).toBe('heki: #GP injected (re-enter)');
    expect(full.title).toMatch(/^Blocked: /);
    expect(full.evidence.attributes['heki_correlation']).toBe('kvmi-allowed-heki-denied');

    // KVMI has no rule for UMIP (allowed, nothing reported) + Heki denies: one alert, from Heki alone.
    expect((await c.writeCr(4, c.cpu.sregs.cr4 | UMIP)).outcome).toBe('completed');
    expect((await hekiLockCr(c, 4n, UMIP)).value).toBe(0n);
    const r2 = await c.writeCr(4, c.cpu.sregs.cr4 & ~UMIP);
    expect(r2.outcome).toBe('gp');
    await until(async () => (await alertsOf(vm.uuidText)).length === 2, 10_000, 'Heki alert');
    const umip = (await alertsOf(vm.uuidText)).find((x) => x.id !== full.id)!;
    expect(umip).toMatchObject({ module: 'heki', ruleId: 'kvmi-reports/heki/cr4', action: 'heki: #GP injected (re-enter)' });
  });
});
