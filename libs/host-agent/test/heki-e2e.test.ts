/**
 * Heki end to end (issue #11): the simulator's KVM + VMM (HekiVmm, gRPC over a Unix socket) against the
 * host agent's Heki sink (`HostAgent` with `hekiListen`), real sockets and real gRPC throughout.
 * Bit values are written out from ../shared/spec/heki.md.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { request } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { credentials, Metadata, status, type ServiceError } from '@grpc/grpc-js';
import { HekiReason, HekiSinkServiceClient } from '@periscope/contracts';
import { DEFAULT_HOST_PROFILE, HekiVmm, SimQemu, SimVm, hekiGuestInit, hekiLockCr, type HekiExit } from '@periscope/simulator';
import { loadDefaultPolicy } from '@periscope/verdicts';
import { HekiForwarder, HostAgent, decodeHekiKvmRun, parseCookies, type HekiConfigureRecord, type HekiDenialRecord } from '../src/index.js';

const WP = 1n << 16n;
const UMIP = 1n << 11n;
const SMEP = 1n << 20n;
const SMAP = 1n << 21n;
const neg = (e: bigint): bigint => BigInt.asUintN(64, -e);

const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  while (cleanups.length) await cleanups.pop()!();
});

async function until(cond: () => boolean, ms = 5000): Promise<void> {
  const t0 = Date.now();
  while (!cond()) {
    if (Date.now() - t0 > ms) throw new Error('timed out waiting');
    await new Promise((r) => setTimeout(r, 5));
  }
}

interface Agent {
  agent: HostAgent;
  dir: string;
  kvmi: string;
  heki: string;
  api: string;
  configures: HekiConfigureRecord[];
  denials: HekiDenialRecord[];
}

async function startAgent(opts: { denial?: 'reenter' | 'stop'; start?: boolean } = {}): Promise<Agent> {
  const dir = mkdtempSync(join(tmpdir(), 'heki-'));
  const a: Agent = {
    dir,
    kvmi: join(dir, 'kvmi.sock'),
    heki: join(dir, 'heki.sock'),
    api: join(dir, 'api.sock'),
    configures: [],
    denials: [],
    agent: undefined as unknown as HostAgent,
  };
  a.agent = new HostAgent({
    hostId: 'host-1',
    kvmiPaths: [a.kvmi],
    cookies: parseCookies(Buffer.from('s')),
    policy: loadDefaultPolicy(),
    log: () => undefined,
    apiPath: a.api,
    hekiListen: a.heki,
    hekiPolicy: { denial: opts.denial ?? 'reenter' },
  });
  a.agent.heki!.on('configure', (e) => a.configures.push(e));
  a.agent.heki!.on('denial', (e) => a.denials.push(e));
  if (opts.start !== false) await a.agent.start();
  cleanups.push(async () => {
    await a.agent.stop(200);
    rmSync(dir, { recursive: true, force: true });
  });
  return a;
}

async function startVm(sink: string, opts: { heki?: boolean; seed?: number; kvmi?: string; name?: string } = {}): Promise<{ vm: SimVm; vmm: HekiVmm }> {
  const vm = new SimVm({ vcpus: 1, seed: opts.seed ?? 7, jitterMs: 0, name: opts.name ?? 'heki-vm', profile: { ...DEFAULT_HOST_PROFILE, heki: opts.heki ?? true } });
  const vmm = new HekiVmm(vm, { sink: `unix:${sink}` });
  cleanups.push(() => vm.close());
  cleanups.push(() => vmm.close());
  if (opts.kvmi) {
    const qemu = new SimQemu(vm, { path: opts.kvmi, key: Buffer.from('s'), reconnectSeconds: 0.05 });
    cleanups.push(() => qemu.stop());
    qemu.start();
  }
  await vmm.start();
  return { vm, vmm };
}

function apiGet(socketPath: string, path: string): Promise<{ status: number; body: Record<string, unknown> }> {
  return new Promise((resolve, reject) => {
    const req = request({ socketPath, path, method: 'GET' }, (res) => {
      let data = '';
      res.on('data', (c: Buffer) => (data += c.toString()));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: JSON.parse(data) as Record<string, unknown> }));
    });
    req.on('error', reject);
    req.end();
  });
}

describe('Heki sink ↔ simulated VMM', () => {
  it('a Heki guest pins bits: configure exits are acknowledged and the agent keeps the union (local API, metrics, events)', async () => {
    const a = await startAgent();
    const { vm, vmm } = await startVm(a.heki);
    expect(vmm.hostHasHeki).toBe(true);
    expect(vmm.extensions).toEqual({ configure: 3, denial: 3 });
    expect(vmm.registered).toMatchObject({ denialTimeoutMs: 50, defaultCompletion: 1 });
    const c = vm.vcpus[0]!;
    const init = await hekiGuestInit(c);
    expect(init).toEqual({ probe: 1n, cr0: 0n, cr4: 0n, cr4Requested: SMEP | SMAP });
    // A second CR4 pin (UMIP, set by the guest first): the agent's state is the union.
    expect((await c.writeCr(4, c.cpu.sregs.cr4 | UMIP)).outcome).toBe('completed');
    expect((await hekiLockCr(c, 4n, UMIP)).value).toBe(0n);
    await until(() => a.configures.length === 3);
    expect(a.configures.map((e) => [e.cr, e.bits])).toEqual([['CR0', WP], ['CR4', SMEP | SMAP], ['CR4', UMIP]]);
    const s = a.agent.heki!.vm(vm.uuidText)!;
    expect(s).toMatchObject({ status: 'pinned', hostHasHeki: true, pinnedCr0: WP, pinnedCr4: SMEP | SMAP | UMIP, configureExits: 3, configureReasons: ['CR0', 'CR4'] });
    expect(s.pinnedCr4).toBe(vm.heki.pinnedCr4); // the agent's view equals KVM's
    const api = await apiGet(a.api, '/v1/vms');
    expect(api.body['vms']).toEqual([
      expect.objectContaining({ uuid: vm.uuidText, name: 'heki-vm', state: 'heki-only', heki: expect.objectContaining({ status: 'pinned', pinnedCr0: '0x10000', pinnedCr4: '0x300800' }) }),
    ]);
    expect((await apiGet(a.api, `/v1/vms/${vm.uuidText}`)).body).toMatchObject({ heki: { pinnedCr4: '0x300800' } });
    const metrics = a.agent.registry.render();
    expect(metrics).toContain('periscope_agent_heki_configure_exits_total{cr="CR4"} 2');
    expect(metrics).toContain('periscope_agent_heki_vms{status="pinned"} 1');
  });

  it('a violation: the guest receives #GP(0) with the register still pinned; the agent records the denial (re-enter by default)', async () => {
    const a = await startAgent();
    const { vm, vmm } = await startVm(a.heki);
    const c = vm.vcpus[0]!;
    await hekiGuestInit(c);
    const cr4 = c.cpu.sregs.cr4;
    const rip = c.cpu.regs.rip;
    const r = await c.writeCr(4, cr4 & ~SMEP);
    expect(r).toMatchObject({ outcome: 'gp', vector: 13, value: cr4 });
    expect(c.cpu.sregs.cr4 & SMEP).toBe(SMEP);
    expect(c.cpu.regs.rip).toBe(rip); // the fault is at the MOV
    expect(c.deliveredExceptions.at(-1)).toEqual({ vector: 13, errorCode: 0 });
    expect(a.denials).toHaveLength(1);
    expect(a.denials[0]).toMatchObject({ uuid: vm.uuidText, cr: 'CR4', attemptedValue: cr4 & ~SMEP, clearedPins: SMEP, rip, completion: 'reenter', decidedBy: 'policy' });
    expect(a.denials[0]!.detectionId).toMatch(/^[0-9a-f-]{36}$/);
    expect(vmm.stats).toMatchObject({ denialsAnswered: 1, denialDefaults: 0 });
    expect(a.agent.heki!.vm(vm.uuidText)).toMatchObject({ denials: 1, status: 'pinned' });
    expect(a.agent.registry.render()).toContain('periscope_agent_heki_denials_total{completion="reenter",cr="CR4"} 1');
  });

  it('the stop policy stops the VM: no vCPU runs again, the agent marks it stopped', async () => {
    const a = await startAgent({ denial: 'stop' });
    const { vm, vmm } = await startVm(a.heki);
    expect(vmm.registered?.defaultCompletion).toBe(2); // STOP_VM
    const c = vm.vcpus[0]!;
    await hekiGuestInit(c);
    const cr0 = c.cpu.sregs.cr0;
    expect((await c.writeCr(0, cr0 & ~WP)).outcome).toBe('vm-stopped');
    expect(vm.stopped).toMatch(/Heki denial: CR0/);
    expect(c.cpu.sregs.cr0).toBe(cr0);
    expect((await c.wrmsr(0xc0000103, 1n)).outcome).toBe('vm-stopped');
    expect(a.agent.heki!.vm(vm.uuidText)).toMatchObject({ status: 'stopped', stops: 1 });
    expect(vmm.stats.stops).toBe(1);
  });

  it('the agent down: the VMM completes as the RFC does (re-enter → #GP) and nothing hangs; after a registration the default it gave applies', async () => {
    const a = await startAgent({ start: false }); // nothing listens on the Heki socket
    const { vm, vmm } = await startVm(a.heki);
    expect(vmm.registered).toBeNull();
    const c = vm.vcpus[0]!;
    const t0 = Date.now();
    expect(await hekiGuestInit(c)).toMatchObject({ probe: 1n, cr0: 0n, cr4: 0n }); // configure never waits
    const r = await c.writeCr(4, c.cpu.sregs.cr4 & ~SMAP);
    expect(r.outcome).toBe('gp');
    expect(Date.now() - t0).toBeLessThan(2000);
    expect(vmm.stats.denialDefaults).toBe(1);
    expect(c.cpu.sregs.cr4 & SMAP).toBe(SMAP);

    // An agent with the stop policy registers the VM, then goes away: the registration's default (stop).
    const b = await startAgent({ denial: 'stop' });
    const second = await startVm(b.heki, { seed: 8, name: 'second' });
    await hekiGuestInit(second.vm.vcpus[0]!);
    await b.agent.stop(100);
    const c2 = second.vm.vcpus[0]!;
    const t1 = Date.now();
    expect((await c2.writeCr(0, c2.cpu.sregs.cr0 & ~WP)).outcome).toBe('vm-stopped');
    expect(Date.now() - t1).toBeLessThan(2000);
    expect(second.vmm.stats).toMatchObject({ denialDefaults: 1, stops: 1 });
  });

  it('a host without Heki: ENABLE_CAP fails, the VM is registered as "Heki unavailable on host"; the guest\'s probe gets -KVM_ENOSYS', async () => {
    const a = await startAgent();
    const { vm, vmm } = await startVm(a.heki, { heki: false, name: 'no-heki' });
    expect(vmm.extensions).toEqual({ configure: 3, denial: 3 }); // CHECK_EXTENSION proves nothing
    expect(vmm.hostHasHeki).toBe(false);
    expect(await hekiGuestInit(vm.vcpus[0]!)).toEqual({ probe: neg(1000n) });
    expect(a.agent.heki!.vm(vm.uuidText)).toMatchObject({ hostHasHeki: false, status: 'heki-unavailable', configureReasons: [], denialReasons: [] });
    const api = await apiGet(a.api, '/v1/vms');
    expect(api.body['vms']).toEqual([expect.objectContaining({ name: 'no-heki', heki: expect.objectContaining({ status: 'heki-unavailable', hostHasHeki: false }) })]);
    expect(a.agent.registry.render()).toContain('periscope_agent_heki_vms{status="heki-unavailable"} 1');
  });
});

describe('malformed sink requests', () => {
  it('get INVALID_ARGUMENT / FAILED_PRECONDITION with a message naming the field', async () => {
    const a = await startAgent();
    const client = new HekiSinkServiceClient(`unix:${a.heki}`, credentials.createInsecure());
    cleanups.push(() => client.close());
    type Call<Req> = (req: Req, md: Metadata, o: { deadline: number }, cb: (e: ServiceError | null) => void) => unknown;
    const err = <Req>(fn: Call<Req>, req: Req): Promise<{ code: number; details: string } | null> =>
      new Promise((resolve) => fn.call(client, req, new Metadata(), { deadline: Date.now() + 2000 }, (e) => resolve(e ? { code: e.code, details: e.details } : null)));
    const uuid = Buffer.alloc(16, 0xab);
    const reg = { vmUuid: uuid, vmName: 'x', hostHasHeki: true, configureReasons: [HekiReason.HEKI_REASON_CR0], denialReasons: [], qemuStartTimeMs: 1n };
    const cfg = { vmUuid: uuid, vcpu: 0, reason: HekiReason.HEKI_REASON_CR0, crPinned: WP, rip: 0n, exitUnixNs: 0n };
    const den = { vmUuid: uuid, vcpu: 0, reason: HekiReason.HEKI_REASON_CR4, attemptedValue: 0n, rip: 0n, exitUnixNs: 0n };
    // Reports before a registration: FAILED_PRECONDITION.
    expect(await err(client.reportConfigureExit, cfg)).toEqual({ code: status.FAILED_PRECONDITION, details: expect.stringMatching(/not registered: call RegisterVm first/) });
    expect(await err(client.reportDenialExit, den)).toMatchObject({ code: status.FAILED_PRECONDITION });
    // Malformed registrations.
    expect(await err(client.registerVm, { ...reg, vmUuid: Buffer.alloc(3) })).toEqual({ code: status.INVALID_ARGUMENT, details: 'vm_uuid: 3 bytes, expected 16' });
    expect(await err(client.registerVm, { ...reg, configureReasons: [HekiReason.HEKI_REASON_UNSPECIFIED] })).toEqual({
      code: status.INVALID_ARGUMENT, details: 'configure_reasons[0]: 0 is not HEKI_REASON_CR0 (1) or HEKI_REASON_CR4 (2)',
    });
    expect(await err(client.registerVm, { ...reg, denialReasons: [2, 2] })).toMatchObject({ code: status.INVALID_ARGUMENT, details: 'denial_reasons[1]: CR4 is listed twice' });
    expect(await err(client.registerVm, { ...reg, hostHasHeki: false })).toMatchObject({ code: status.INVALID_ARGUMENT, details: expect.stringMatching(/host_has_heki is false/) });
    expect(await err(client.registerVm, reg)).toBeNull();
    // Malformed reports.
    expect(await err(client.reportConfigureExit, { ...cfg, reason: 3 })).toEqual({ code: status.INVALID_ARGUMENT, details: 'reason: 3 is not HEKI_REASON_CR0 (1) or HEKI_REASON_CR4 (2)' });
    expect(await err(client.reportConfigureExit, { ...cfg, crPinned: 1n })).toMatchObject({ code: status.INVALID_ARGUMENT, details: expect.stringMatching(/^cr_pinned: 0x1 is a CR0 pin without CR0.WP/) });
    expect(await err(client.reportConfigureExit, { ...cfg, reason: HekiReason.HEKI_REASON_CR4, crPinned: 1n << 7n })).toMatchObject({ code: status.INVALID_ARGUMENT, details: expect.stringMatching(/^cr_pinned: 0x80 has CR4 bits that cannot be pinned/) });
    expect(await err(client.reportDenialExit, { ...den, vmUuid: Buffer.alloc(0) })).toMatchObject({ code: status.INVALID_ARGUMENT, details: 'vm_uuid: 0 bytes, expected 16' });
    expect(await err(client.reportConfigureExit, cfg)).toBeNull();
    expect(a.agent.heki!.vm('abababab-abab-abab-abab-abababababab')).toMatchObject({ pinnedCr0: WP, configureExits: 1 });
    const m = a.agent.registry.render();
    expect(m).toContain('periscope_agent_heki_invalid_requests_total{code="INVALID_ARGUMENT",method="RegisterVm"} 4');
    expect(m).toContain('periscope_agent_heki_invalid_requests_total{code="FAILED_PRECONDITION",method="ReportConfigureExit"} 1');
  });
});

describe('KVMI CR interception and Heki pins on one VM (heki unconfirmed `kvmi-heki-ordering`)', () => {
  it('KVMI denies (default policy forces SMEP back): no Heki exit; KVMI allows (UMIP, no rule) + Heki denies: the CR event first, then the denial, #GP', async () => {
    const a = await startAgent();
    const { vm } = await startVm(a.heki, { kvmi: a.kvmi, name: 'both' });
    await until(() => [...a.agent.listener.vms.values()].some((v) => v.state === 'protected'));
    const order: string[] = [];
    vm.on('guest-event', (e) => order.push(`kvmi:${e.event}:${String(e.data?.['cr'])}`));
    vm.on('heki-exit', (e: HekiExit) => order.push(`heki:${e.kind}`));
    const c = vm.vcpus[0]!;
    await hekiGuestInit(c); // pins WP, SMEP|SMAP
    expect((await c.writeCr(4, c.cpu.sregs.cr4 | UMIP)).outcome).toBe('completed'); // KVMI event, allowed
    expect((await hekiLockCr(c, 4n, UMIP)).value).toBe(0n);
    await until(() => a.configures.length === 3);
    order.length = 0;
    // 1. KVMI denies: the tool forces SMEP back, the value KVM checks keeps the pin → no Heki exit, no #GP.
    const cr4 = c.cpu.sregs.cr4;
    const r1 = await c.writeCr(4, cr4 & ~SMEP);
    expect(r1).toMatchObject({ outcome: 'completed', value: cr4 });
    expect(r1.events.map((e) => e.event)).toEqual(['CR']);
    expect(order).toEqual(['kvmi:CR:4']);
    expect(a.denials).toHaveLength(0);
    // 2. KVMI allows (no rule for UMIP) + Heki denies: #GP, UMIP still set, one denial at the sink.
    order.length = 0;
    const r2 = await c.writeCr(4, cr4 & ~UMIP);
    expect(r2).toMatchObject({ outcome: 'gp', vector: 13, value: cr4 });
    expect(order).toEqual(['kvmi:CR:4', 'heki:denial']);
    expect(c.cpu.sregs.cr4 & UMIP).toBe(UMIP);
    expect(a.denials).toEqual([expect.objectContaining({ cr: 'CR4', attemptedValue: cr4 & ~UMIP, clearedPins: UMIP, completion: 'reenter' })]);
    const api = await apiGet(a.api, `/v1/vms/${vm.uuidText}`);
    expect(api.body).toMatchObject({ state: 'protected', heki: { status: 'pinned', denials: 1, lastDenial: { cr: 'CR4', clearedPins: '0x800' } } });
  });
});

describe('the reference client', () => {
  it('decodes kvm_run, registers, reports configure without waiting and gets the denial completion', async () => {
    const a = await startAgent({ denial: 'stop' });
    const run = Buffer.alloc(96);
    run.writeUInt32LE(39, 8);
    run.writeBigUInt64LE(2n, 32);
    run.writeBigUInt64LE(SMEP, 40);
    expect(decodeHekiKvmRun(run)).toEqual({ exitReason: 39, reason: 2n, value: SMEP });
    expect(decodeHekiKvmRun(Buffer.alloc(96))).toBeNull();
    const f = new HekiForwarder({ sink: `unix:${a.heki}`, vmUuid: Buffer.alloc(16, 1), vmName: 'ref', qemuStartTimeMs: 5n });
    cleanups.push(() => f.close());
    expect(await f.register({ hostHasHeki: true, configure: 3n, denial: 3n })).toBe(true);
    expect(await f.onExit(0, 0x1000n, decodeHekiKvmRun(run)!)).toBe('reenter');
    await until(() => a.configures.length === 1);
    run.writeUInt32LE(40, 8);
    run.writeBigUInt64LE(0n, 40);
    expect(await f.onExit(0, 0x2000n, decodeHekiKvmRun(run)!)).toBe('stop');
    expect(a.denials[0]).toMatchObject({ rip: 0x2000n, clearedPins: SMEP, completion: 'stop' });
  });
});
