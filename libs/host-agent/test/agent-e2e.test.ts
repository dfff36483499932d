/**
 * The host agent's KVMI side against the simulator, over real Unix sockets: handshake (both forms,
 * keyed QEMU refusing a wrong secret), attach, local CR denials, detach restoring the guest exactly.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { EventAction, events, structs } from '@periscope/kvmi';
import { SimQemu, SimVm } from '@periscope/simulator';
import { KvmiListener, parseCookies, type Decide, type ProtectionPlan, type VmConnection } from '../src/index.js';

const CR0_WP = 1n << 16n;
const CR4_SMEP = 1n << 20n;

const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  while (cleanups.length) await cleanups.pop()!();
});

/** A minimal local rule for the test: deny clearing CR0.WP / CR4.SMEP by keeping the old value. */
const denyPinnedClears: Decide = (view) => {
  if (view.eventId === events.CR.id) {
    const cr = view.specificUint(structs.kvmi_vcpu_event_cr, 'cr');
    const oldV = view.specificU64(structs.kvmi_vcpu_event_cr, 'old_value');
    const newV = view.specificU64(structs.kvmi_vcpu_event_cr, 'new_value');
    const pinned = cr === 0 ? CR0_WP : cr === 4 ? CR4_SMEP : 0n;
    if ((oldV & pinned) !== 0n && (newV & pinned) === 0n) return { kind: 'reply', action: EventAction.CONTINUE, newVal: oldV, ruleId: 'pin' };
    return { kind: 'reply', action: EventAction.CONTINUE, newVal: newV };
  }
  return { kind: 'reply', action: EventAction.CONTINUE };
};

const plan: ProtectionPlan = { vcpuEvents: ['CR', 'MSR', 'PF'], crs: [0, 4], msrs: [0xc0000082], pageAccess: [] };

async function startAgent(opts: { secret: string; plan?: ProtectionPlan; maxQueuedBytes?: number; decide?: Decide }) {
  const dir = mkdtempSync(join(tmpdir(), 'ha-'));
  const path = join(dir, 'kvmi.sock');
  const logs: string[] = [];
  const attached: VmConnection[] = [];
  const listener = new KvmiListener({
    paths: [path],
    cookies: parseCookies(Buffer.from(opts.secret)),
    plan: opts.plan ?? plan,
    decide: opts.decide ?? denyPinnedClears,
    log: (level, msg) => logs.push(`${level}: ${msg}`),
    onAttached: (vm) => attached.push(vm),
    ...(opts.maxQueuedBytes !== undefined ? { maxQueuedBytes: opts.maxQueuedBytes } : {}),
  });
  await listener.start();
  cleanups.push(async () => {
    await listener.stop(200);
    rmSync(dir, { recursive: true, force: true });
  });
  return { listener, path, logs, attached };
}

async function until(cond: () => boolean, ms = 5000): Promise<void> {
  const t0 = Date.now();
  while (!cond()) {
    if (Date.now() - t0 > ms) throw new Error('timed out waiting');
    await new Promise((r) => setTimeout(r, 5));
  }
}

describe('host agent ↔ simulator', () => {
  it.each([96, 104] as const)('attaches through the %i-byte handshake and learns the VM', async (form) => {
    const agent = await startAgent({ secret: 'fleet-secret' });
    const vm = new SimVm({ vcpus: 2, seed: 3, apsOnline: true, name: `vm-${form}` });
    const qemu = new SimQemu(vm, { path: agent.path, handshake: form, key: Buffer.from('fleet-secret'), reconnectSeconds: 0.05 });
    cleanups.push(() => qemu.stop());
    const beforeAttachMs = Date.now();
    qemu.start();
    await until(() => agent.attached.length === 1);
    const info = agent.attached[0]!.info!;
    expect(info).toMatchObject({ name: `vm-${form}`, version: 1, vcpuCount: 2 });
    // No state directory: the session generation is at least the wall clock (ms) at attach (session-generations.ts).
    expect(Number.isSafeInteger(info.sessionGeneration)).toBe(true);
    expect(info.sessionGeneration).toBeGreaterThanOrEqual(beforeAttachMs);
    expect(info.gfnLimit.source).toBe(form === 104 ? 'handshake' : 'VM_GET_MAX_GFN');
    expect(info.allowedCommands).toContain('VCPU_CONTROL_CR');
    expect(vm.currentHook?.unhookEventEnabled).toBe(true);
  });

  it('a keyed QEMU refuses a wrong secret; the agent logs it and other VMs are unaffected', async () => {
    const agent = await startAgent({ secret: 'right' });
    const bad = new SimVm({ vcpus: 1, seed: 1, name: 'bad' });
    const good = new SimVm({ vcpus: 1, seed: 2, name: 'good' });
    const qBad = new SimQemu(bad, { path: agent.path, key: Buffer.from('wrong'), reconnectSeconds: 10 });
    const qGood = new SimQemu(good, { path: agent.path, key: Buffer.from('right'), reconnectSeconds: 10 });
    cleanups.push(() => qBad.stop(), () => qGood.stop());
    qBad.start();
    qGood.start();
    await until(() => agent.attached.length === 1 && agent.listener.counters.handshakeRefusedByQemu === 1);
    expect(agent.logs).toContain('warn: handshake refused by QEMU (cookie?)');
    expect(bad.hooked).toBe(false);
    expect(agent.attached[0]!.info!.name).toBe('good');
  });

  it('denies clearing CR0.WP and CR4.SMEP locally: the bits stay set in the guest', async () => {
    const agent = await startAgent({ secret: 's' });
    const vm = new SimVm({ vcpus: 1, seed: 5 });
    const qemu = new SimQemu(vm, { path: agent.path, key: Buffer.from('s'), reconnectSeconds: 10 });
    cleanups.push(() => qemu.stop());
    qemu.start();
    await until(() => agent.attached.length === 1 && agent.attached[0]!.state === 'protected');
    const cpu = vm.vcpus[0]!;
    const cr0 = cpu.cpu.sregs.cr0;
    expect(cr0 & CR0_WP).toBe(CR0_WP);
    const r = await cpu.writeCr(0, cr0 & ~CR0_WP);
    expect(r.outcome).toBe('completed');
    expect(r.events.map((e) => e.event)).toEqual(['CR']);
    expect(cpu.cpu.sregs.cr0).toBe(cr0);
    const cr4 = cpu.cpu.sregs.cr4 | CR4_SMEP;
    await cpu.writeCr(4, cr4);
    await cpu.writeCr(4, cr4 & ~CR4_SMEP);
    expect(cpu.cpu.sregs.cr4 & CR4_SMEP).toBe(CR4_SMEP);
    // An unrelated CR4 change is allowed through with the guest's own value.
    await cpu.writeCr(4, cr4 | (1n << 7n));
    expect(cpu.cpu.sregs.cr4).toBe(cr4 | (1n << 7n));
  });

  it('detach on UNHOOK restores planted bytes, resets page access and interceptions, and closes', async () => {
    const agent = await startAgent({ secret: 's', plan: { ...plan, pageAccess: [{ gpa: 0x200000n, access: 5 }] } });
    const vm = new SimVm({ vcpus: 2, seed: 9, apsOnline: true });
    const qemu = new SimQemu(vm, { path: agent.path, key: Buffer.from('s'), reconnectSeconds: 10, unhookTimeoutMs: 3000 });
    cleanups.push(() => qemu.stop());
    qemu.start();
    await until(() => agent.attached.length === 1 && agent.attached[0]!.state === 'protected');
    const conn = agent.attached[0]!;
    const before = Buffer.from(vm.memory.read(0x300000n, 16)!);
    await conn.plant(0x300000n, new Uint8Array([0xcc]));
    expect(vm.memory.read(0x300000n, 1)![0]).toBe(0xcc);
    expect(vm.restrictions.size).toBe(1);
    expect(vm.vcpus[0]!.enabledEvents.length).toBeGreaterThan(0);
    expect(vm.vcpus[0]!.interceptions.msrs.size).toBe(1);
    // Snapshot the guest when the agent closes the socket, before QEMU's UNHOOK cleans up after it:
    // what we see here is the agent's own cleanup.
    let atClose: { memory: Buffer; restrictions: number; events: number[][]; msrs: number[] } | undefined;
    vm.once('connection-lost', () => {
      atClose = {
        memory: Buffer.from(vm.memory.read(0x300000n, 16)!),
        restrictions: vm.restrictions.size,
        events: vm.vcpus.map((v) => v.enabledEvents),
        msrs: vm.vcpus.map((v) => v.interceptions.msrs.size),
      };
    });
    const t0 = Date.now();
    await qemu.shutdown();
    await until(() => conn.session.isClosed);
    expect(Date.now() - t0).toBeLessThan(1000);
    expect(atClose).toBeDefined();
    expect(atClose!.memory.equals(before)).toBe(true);
    expect(atClose!.restrictions).toBe(0);
    expect(atClose!.events).toEqual([[], []]);
    expect(atClose!.msrs).toEqual([0, 0]);
  });
});

describe('host agent: denying a kernel write by skipping the instruction', () => {
  it('decodes the instruction at RIP (iced-x86), moves RIP past it with SET_REGISTERS and answers RETRY; the bytes never change', async () => {
    const KERNEL_BASE = 0xffffffff80000000n;
    const TEXT = 0x400000n; // guest-physical "kernel text" page, mapped at KERNEL_BASE + TEXT
    const CODE = 0x500000n; // where the writing instruction lives
    const skipWrites: Decide = (view) =>
      view.eventId === events.PF.id ? { kind: 'skip', fallback: EventAction.CONTINUE, ruleId: 'text-write' } : { kind: 'reply', action: EventAction.CONTINUE };
    const { path, attached } = await startAgent({
      secret: 's',
      plan: { vcpuEvents: ['PF'], crs: [], msrs: [], pageAccess: [{ gpa: TEXT, access: 5 }] }, // R+X: no writes
      decide: skipWrites,
    });
    const vm = new SimVm({ vcpus: 1, seed: 4 });
    const qemu = new SimQemu(vm, { path, key: Buffer.from('s'), reconnectSeconds: 10 });
    cleanups.push(() => qemu.stop());
    qemu.start();
    await until(() => attached.length === 1 && attached[0]!.state === 'protected');
    // mov [rdi], rax — 48 89 07, 3 bytes (Intel SDM: REX.W 89 /r, ModRM 00 000 111), at RIP.
    vm.memory.write(CODE, Buffer.from([0x48, 0x89, 0x07, 0x90]));
    const cpu = vm.vcpus[0]!;
    cpu.cpu.regs.rip = KERNEL_BASE + CODE;
    cpu.cpu.regs.rdi = KERNEL_BASE + TEXT + 0x10n;
    const before = Buffer.from(vm.memory.read(TEXT, 32)!);
    const r = await cpu.access({ gva: KERNEL_BASE + TEXT + 0x10n }, 'w', { data: Buffer.alloc(8, 0xee) });
    expect(r.events.map((e) => e.event)).toEqual(['PF']);
    expect(r.outcome).toBe('retry');
    expect(cpu.cpu.regs.rip).toBe(KERNEL_BASE + CODE + 3n);
    expect(Buffer.from(vm.memory.read(TEXT, 32)!).equals(before)).toBe(true);
    expect(attached[0]!.stats.skips).toBe(1);
  });
});

describe('host agent with the shipped default policy (compiled local rules)', () => {
  it('denies LSTAR hijack, CR0.WP and CR4.SMEP clears; allows benign writes', async () => {
    const { loadDefaultPolicy, compilePolicy, deriveInterception } = await import('@periscope/verdicts');
    const { policyDecider, planFromPolicy } = await import('../src/index.js');
    const policy = loadDefaultPolicy();
    const decide = policyDecider(compilePolicy(policy));
    const { path, attached } = await startAgent({ secret: 's', plan: planFromPolicy(deriveInterception(policy)), decide });
    const vm = new SimVm({ vcpus: 1, seed: 8 });
    const qemu = new SimQemu(vm, { path, key: Buffer.from('s'), reconnectSeconds: 10 });
    cleanups.push(() => qemu.stop());
    qemu.start();
    await until(() => attached.length === 1 && attached[0]!.state === 'protected');
    const cpu = vm.vcpus[0]!;
    const LSTAR = 0xc0000082;
    const lstar = cpu.cpu.msrs.get(LSTAR) ?? 0n;
    const hijack = await cpu.wrmsr(LSTAR, 0xffffffffc0de0000n);
    expect(hijack.events.map((e) => e.event)).toEqual(['MSR']);
    expect(cpu.cpu.msrs.get(LSTAR) ?? 0n).toBe(lstar);
    const cr0 = cpu.cpu.sregs.cr0;
    await cpu.writeCr(0, cr0 & ~CR0_WP);
    expect(cpu.cpu.sregs.cr0).toBe(cr0);
    const cr4 = cpu.cpu.sregs.cr4;
    await cpu.writeCr(4, cr4 | CR4_SMEP);
    expect(cpu.cpu.sregs.cr4 & CR4_SMEP).toBe(CR4_SMEP);
    await cpu.writeCr(4, (cr4 | CR4_SMEP | (1n << 7n)) & ~CR4_SMEP);
    // SMEP forced back, the benign bit 7 (PGE) change goes through.
    expect(cpu.cpu.sregs.cr4).toBe(cr4 | CR4_SMEP | (1n << 7n));
  });
});

describe('host agent: misbehaving peers are isolated', () => {
  it('a garbage-spewing peer and a peer that stops reading are closed with a logged reason; a healthy VM is unaffected', async () => {
    const { connect } = await import('node:net');
    const { performQemuHandshake, encodeVcpuEvent, encodeReply, structs: S } = await import('@periscope/kvmi');
    const agent = await startAgent({ secret: 'unused: these QEMUs have no key', maxQueuedBytes: 128 * 1024 });
    // Healthy VM.
    const vm = new SimVm({ vcpus: 1, seed: 21, name: 'healthy' });
    const qemu = new SimQemu(vm, { path: agent.path, reconnectSeconds: 10 });
    cleanups.push(() => qemu.stop());
    qemu.start();
    await until(() => agent.attached.some((a) => a.info?.name === 'healthy' && a.state === 'protected'));
    // Peer 1: handshake, then garbage.
    const garbage = connect(agent.path);
    garbage.on('error', () => undefined);
    cleanups.push(() => void garbage.destroy());
    await new Promise<void>((r) => garbage.once('connect', () => r()));
    await performQemuHandshake(garbage, { form: 104, uuid: new Uint8Array(16).fill(0xaa), name: 'garbage', startTimeMs: 1n, maxGpa: 1n << 30n });
    garbage.resume();
    const junk = Buffer.alloc(64 * 1024);
    for (let i = 0; i < junk.length; i++) junk[i] = (i * 2654435761) >>> 24;
    garbage.write(junk);
    // Peer 2: handshake, answers GET_VERSION then floods events without ever reading again.
    const mute = connect(agent.path);
    mute.on('error', () => undefined);
    cleanups.push(() => void mute.destroy());
    await new Promise<void>((r) => mute.once('connect', () => r()));
    const hs = await performQemuHandshake(mute, { form: 104, uuid: new Uint8Array(16).fill(0xbb), name: 'mute', startTimeMs: 1n, maxGpa: 1n << 30n });
    expect(hs.leftover.subarray(0, 8).readUInt16LE(0)).toBe(2); // the agent's GET_VERSION
    mute.write(encodeReply('GET_VERSION', 1, { version: 1, max_msg_size: 8184, features: { singlestep: 0 } }));
    mute.pause();
    const arch = S.kvmi_vcpu_event_arch.zero();
    let seq = 1000;
    const floodUntil = Date.now() + 4000;
    while (!mute.destroyed && Date.now() < floodUntil && agent.logs.filter((l) => l.includes('stopped reading') || l.includes('closed')).length < 1) {
      mute.write(Buffer.concat(Array.from({ length: 512 }, () => encodeVcpuEvent({ event: 'PAUSE', seq: seq++, vcpu: 0, arch }))));
      await new Promise((r) => setTimeout(r, 1));
    }
    await until(() => agent.logs.filter((l) => l.startsWith('error: KVMI protocol error')).length >= 2, 8000);
    const reasons = agent.logs.filter((l) => l.startsWith('error: KVMI protocol error'));
    expect(reasons.some((l) => l.includes('stopped reading'))).toBe(true);
    expect(reasons.some((l) => !l.includes('stopped reading'))).toBe(true);
    // The healthy VM still gets its CR0.WP clear denied.
    const cpu = vm.vcpus[0]!;
    const cr0 = cpu.cpu.sregs.cr0;
    await cpu.writeCr(0, cr0 & ~CR0_WP);
    expect(cpu.cpu.sregs.cr0).toBe(cr0);
    expect(agent.listener.vms.size).toBeGreaterThanOrEqual(1);
    expect([...agent.listener.vms.values()].some((v) => v.info?.name === 'healthy')).toBe(true);
  });
});

describe('host agent: the guest continues at the next instruction after a skipped write', () => {
  it('runs real guest code: mov [rdi], rax to protected text is skipped (RIP += 3), the nop after it runs, the text is unchanged', async () => {
    const KERNEL_BASE = 0xffffffff80000000n;
    const TEXT = 0x400000n;
    const CODE = 0x500000n;
    const skipWrites: Decide = (view) =>
      view.eventId === events.PF.id ? { kind: 'skip', fallback: EventAction.CONTINUE } : { kind: 'reply', action: EventAction.CONTINUE };
    const { path, attached } = await startAgent({ secret: 's', plan: { vcpuEvents: ['PF'], crs: [], msrs: [], pageAccess: [{ gpa: TEXT, access: 5 }] }, decide: skipWrites });
    const vm = new SimVm({ vcpus: 1, seed: 6 });
    const qemu = new SimQemu(vm, { path, key: Buffer.from('s'), reconnectSeconds: 10 });
    cleanups.push(() => qemu.stop());
    qemu.start();
    await until(() => attached.length === 1 && attached[0]!.state === 'protected');
    // mov [rdi], rax (48 89 07) ; nop (90) ; hlt (f4) — encodings from the Intel SDM, written by hand.
    vm.memory.write(CODE, Buffer.from([0x48, 0x89, 0x07, 0x90, 0xf4]));
    const before = Buffer.from(vm.memory.read(TEXT, 32)!);
    const r = await vm.vcpus[0]!.run({
      entry: KERNEL_BASE + CODE,
      regs: { rdi: KERNEL_BASE + TEXT + 0x10n, rax: 0x4141414141414141n },
      until: KERNEL_BASE + CODE + 4n, // just past the nop: the guest went on after the skipped write
      maxInstructions: 50,
    });
    expect(r.events.map((e) => e.event)).toEqual(['PF']);
    expect(r.rip).toBe(KERNEL_BASE + CODE + 4n);
    expect(r.crashed).toBe(false);
    expect(Buffer.from(vm.memory.read(TEXT, 32)!).equals(before)).toBe(true);
    expect(attached[0]!.stats.skips).toBe(1);
  });
});

describe('host agent: attaches a fleet', () => {
  it('256 VMs attach and are protected, each on its own socket', async () => {
    const { Simulator } = await import('@periscope/simulator');
    const agent = await startAgent({ secret: 'fleet' });
    const fleet = new Simulator({ introspector: agent.path, vms: 256, vcpus: 1, key: Buffer.from('fleet'), jitterMs: 0, apsOnline: true, memoryMiB: 32 });
    cleanups.push(() => fleet.shutdown().then(() => undefined));
    await fleet.start();
    await until(() => agent.listener.vms.size === 256 && [...agent.listener.vms.values()].every((v) => v.state === 'protected'), 60_000);
    expect(new Set([...agent.listener.vms.values()].map((v) => v.uuid)).size).toBe(256);
  }, 90_000);
});
