/**
 * Responses end to end (issue #9): the real simulator + the real host agent (its analysis link over real
 * gRPC) + analysis. One VM per response, each selected by its own policy answering an LSTAR write:
 *
 * - inject #GP: the simulator delivers #GP(0) at the WRMSR (the TRAP event's RIP, the vCPU's RIP after the
 *   write), LSTAR is unchanged, and the TRAP's vector is in the alert (`evidence.response.trap`);
 * - pause (resume-after): the VM's vCPU is held on a PAUSE event, then runs again, both by `policy:NAME`;
 * - quarantine: held + a critical quarantine alert; it stays paused until an operator resumes it;
 * - crash: the vCPU is crashed (CRASH action).
 *
 * Inject and crash come with the local policy analysis pushes, so the agent must allow them
 * (`--allow-command inject-exception,crash`); an agent without `crash` rejects the whole policy naming the
 * key, and analysis logs it and shows it in the host listing (`policyState`/`policyError`).
 *
 * Every response and operator action is in the audit log with who asked.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { HostAgent, parseCookies } from '@periscope/host-agent';
import { MSR, SimQemu, SimVm, type GuestEventRecord } from '@periscope/simulator';
import { parsePolicy } from '@periscope/verdicts';
import { Analysis, type AlertRecord } from '../src/index.js';
import type { AuditEventRecord } from '../src/audit.js';
import { DB_VARIANTS, resetDatabase, until } from './support.js';

const BOOTSTRAP = parsePolicy({ id: 'bootstrap', version: 1, rules: [] });
const policy = (name: string, vm: string, response: string) => `
format: periscope.policy/v1
name: ${name}
select: { names: [${vm}] }
modules:
  syscall-msrs: { action: deny, msrs: [LSTAR], response: ${response} }
`;
const VMS = {
  inject: { vm: 'resp-inject', policy: 'answer-inject', response: '{ kind: inject, vector: GP, error-code: 0 }' },
  pause: { vm: 'resp-pause', policy: 'answer-pause', response: '{ kind: pause, resume-after: 1500ms }' },
  quarantine: { vm: 'resp-quarantine', policy: 'answer-quarantine', response: 'quarantine' },
  crash: { vm: 'resp-crash', policy: 'answer-crash', response: 'crash' },
} as const;
type Which = keyof typeof VMS;

describe.each(DB_VARIANTS)('responses end to end on $name', (variant) => {
  let drop: () => Promise<void> = async () => undefined;
  let a: Analysis;
  let agent: HostAgent;
  const vms = {} as Record<Which, { vm: SimVm; qemu: SimQemu; events: GuestEventRecord[] }>;
  let dir = '';
  const agentLogs: string[] = [];
  const analysisLogs: { level: string; msg: string; fields: Record<string, unknown> }[] = [];

  beforeAll(async () => {
    const d = await variant.create();
    drop = d.drop;
    await resetDatabase(d.url);
    a = await Analysis.start({ db: d.url, grpcListen: '127.0.0.1:0', httpListen: '127.0.0.1:0', keepaliveMs: 200, flushMs: 100, log: (level, msg, f) => analysisLogs.push({ level, msg, fields: f ?? {} }) });
    for (const w of Object.values(VMS)) await a.applyPolicy(policy(w.policy, w.vm, w.response));
    dir = mkdtempSync(join(tmpdir(), 'an-resp-'));
    const sock = join(dir, 'kvmi.sock');
    agent = new HostAgent({
      hostId: 'resp-host', kvmiPaths: [sock], cookies: parseCookies(Buffer.from('s')), policy: BOOTSTRAP, stateDir: join(dir, 'state'),
      log: (level, msg, f) => agentLogs.push(`${level}: ${msg} ${JSON.stringify(f ?? {}, (_k, v: unknown) => (typeof v === 'bigint' ? v.toString() : v))}`),
      // The inject and crash responses are applied by the agent from the pushed policy: it must allow them.
      link: { address: `127.0.0.1:${a.grpcPort}`, backoff: { initialMs: 20, maxMs: 200 }, allowCommands: ['inject-exception', 'crash'] },
    });
    await agent.start();
    let seed = 11;
    for (const [k, w] of Object.entries(VMS) as [Which, (typeof VMS)[Which]][]) {
      const vm = new SimVm({ vcpus: 1, seed: seed++, jitterMs: 0, name: w.vm });
      const events: GuestEventRecord[] = [];
      vm.on('guest-event', (r) => events.push(r));
      const qemu = new SimQemu(vm, { path: sock, key: Buffer.from('s'), reconnectSeconds: 0.05 });
      qemu.start();
      vms[k] = { vm, qemu, events };
    }
    await until(() => Object.values(vms).every((x) => a.liveVms.get(x.vm.uuidText)?.policyName !== undefined && a.liveVms.get(x.vm.uuidText)?.policyName !== ''), 20_000, 'VMs assigned');
    await a.settled();
    const s = a.sessions.get('resp-host')!;
    await until(async () => {
      const h = (await a.store.listHosts()).find((x) => x.hostId === 'resp-host');
      return h?.policyState === 'active' && h.policyVersion === s.lastPolicyVersion;
    }, 15_000, 'agent policy active');
    await until(() => Object.values(vms).every((x) => x.vm.vcpus[0]!.interceptions.msrs.has(MSR.LSTAR)), 10_000, 'LSTAR interception');
  }, 60_000);

  afterAll(async () => {
    for (const x of Object.values(vms)) {
      x.qemu?.stop();
      x.vm?.close();
    }
    await agent?.stop(300);
    await a?.stop();
    if (dir) rmSync(dir, { recursive: true, force: true });
    await drop();
  });

  async function alertOf(which: Which, rule = 'syscall-msrs/entry'): Promise<AlertRecord> {
    let found: AlertRecord | undefined;
    await until(async () => (found = (await a.store.listAlerts({ vm: vms[which].vm.uuidText, limit: 100 })).find((x) => x.ruleId.endsWith(rule))) !== undefined, 15_000, `${which} alert`);
    return found!;
  }
  async function audit(which: Which, pred: (e: AuditEventRecord) => boolean, what: string): Promise<AuditEventRecord> {
    let found: AuditEventRecord | undefined;
    await until(async () => {
      await a.audit.flushed();
      found = (await a.audit.list({ vm: vms[which].vm.uuidText })).find(pred);
      return found !== undefined;
    }, 15_000, what);
    return found!;
  }
  const hijack = (which: Which) => {
    const c = vms[which].vm.vcpus[0]!;
    const entry = c.cpu.readMsr(MSR.LSTAR)!;
    const rip = c.cpu.regs.rip;
    return { c, entry, rip, result: c.wrmsr(MSR.LSTAR, vms[which].vm.kernel.text + 0x123400n) };
  };
  /** A guest action that needs the vCPU running (a hypercall KVM answers -ENOSYS, no KVMI event). */
  const probe = (which: Which) => vms[which].vm.vcpus[0]!.vmcall({ rax: 0n });

  it('inject #GP: #GP(0) delivered at the WRMSR, LSTAR unchanged, the TRAP vector in the alert', async () => {
    const { c, entry, rip, result } = hijack('inject');
    await result;
    await until(() => vms.inject.events.some((e) => e.event === 'TRAP'), 10_000, 'TRAP event');
    const trap = vms.inject.events.find((e) => e.event === 'TRAP')!;
    expect(trap.rip).toBe(rip); // delivered at the writing instruction
    expect(trap.data).toMatchObject({ nr: 13, error_code: 0 });
    expect(c.deliveredExceptions.at(-1)).toEqual({ vector: 13, errorCode: 0 });
    expect(c.cpu.regs.rip).toBe(rip); // the guest resumes at the WRMSR (its #GP handler would run)
    expect(c.cpu.readMsr(MSR.LSTAR)).toBe(entry);
    const msr = vms.inject.events.find((e) => e.event === 'MSR')!;
    expect(msr.ended).toBe('CONTINUE');

    const al = await alertOf('inject');
    expect(al.action).toBe('inject #GP(0)');
    expect(al.title).toMatch(/^Blocked: /);
    await until(async () => ((await a.store.getAlert(al.id))!.evidence as unknown as { response: { trap: unknown } }).response.trap !== null, 10_000, 'trap in the alert');
    const ev = (await a.store.getAlert(al.id))!.evidence as unknown as { response: Record<string, unknown> };
    expect(ev.response).toMatchObject({ kind: 'inject', decidedAt: 'agent', exception: '#GP(0)', trap: { vector: 13, exception: '#GP(0)', errorCode: 0, rip: `0x${rip.toString(16)}` } });
    const e = await audit('inject', (x) => x.action === 'inject-exception' && x.success === true, 'inject audited');
    expect(e).toMatchObject({ actor: 'policy:answer-inject', principal: 'agent:resp-host', result: expect.stringContaining('#GP(0)') });
  }, 40_000);

  it('pause with resume-after: the vCPU is held on a PAUSE event, then runs again (both by the policy)', async () => {
    const { result } = hijack('pause');
    await result;
    const paused = await audit('pause', (x) => x.action === 'pause-vm' && x.success === true, 'pause audited');
    expect(paused.actor).toBe('policy:answer-pause');
    const running = probe('pause'); // blocks while held, completes after the resume
    const resumed = await audit('pause', (x) => x.action === 'resume-vm' && x.success === true, 'resume audited');
    expect(resumed.actor).toBe('policy:answer-pause');
    expect((await running).outcome).toBe('completed');
    expect(vms.pause.events.some((e) => e.event === 'PAUSE' && e.ended === 'CONTINUE')).toBe(true); // held, then answered
    const al = await alertOf('pause');
    expect(al.action).toBe('deny + pause');
    await until(async () => String(((await a.store.getAlert(al.id))!.evidence as unknown as { response: { resumed?: string } }).response.resumed ?? '').startsWith('resumed'), 10_000, 'resume in the alert');
  }, 40_000);

  it('quarantine: held, a critical quarantine alert, paused until an operator resumes', async () => {
    const c = vms.quarantine.vm.vcpus[0]!;
    const { result } = hijack('quarantine');
    await result;
    const q = await alertOf('quarantine', 'responses/quarantine');
    expect(q).toMatchObject({ severity: 'critical', module: 'responses', action: 'quarantine', tier: 'analysis' });
    await until(() => c.waitingFor?.event === 'PAUSE', 10_000, 'vCPU held on PAUSE');
    let done = false;
    const running = probe('quarantine').then((r) => ((done = true), r));
    await new Promise((r) => setTimeout(r, 500));
    expect(done).toBe(false); // no resume-after: still held
    expect(c.waitingFor?.event).toBe('PAUSE');
    await a.operations.run(vms.quarantine.vm.uuidText, 'resume', {}, 'alice via api-token');
    expect((await running).outcome).toBe('completed');
    const r = await audit('quarantine', (x) => x.action === 'resume-vm' && x.success === true, 'operator resume audited');
    expect(r).toMatchObject({ actor: 'alice', principal: 'api-token' });
    expect((await a.audit.list({ vm: vms.quarantine.vm.uuidText, action: 'pause-vm' }))[0]).toMatchObject({ actor: 'policy:answer-quarantine', success: true });
  }, 40_000);

  it('crash: the CRASH action stops the vCPU; the alert and the audit log say so', async () => {
    const c = vms.crash.vm.vcpus[0]!;
    const { result } = hijack('crash');
    const r = await result;
    expect(r.crashed).toBe(true);
    expect(c.isCrashed).toBe(true);
    expect((await probe('crash')).outcome).toBe('vcpu-crashed');
    const al = await alertOf('crash');
    expect(al.action).toBe('crash');
    const e = await audit('crash', (x) => x.action === 'crash', 'crash audited');
    expect(e).toMatchObject({ actor: 'policy:answer-crash', success: true, result: 'the agent replied CRASH' });
  }, 40_000);

  it('an agent without --allow-command crash rejects a policy with a crash response: logged, the host listing says why, and alerts say what the agent really did', async () => {
    const sock = join(dir, 'strict.sock');
    const strict = new HostAgent({
      hostId: 'resp-strict-host', kvmiPaths: [sock], cookies: parseCookies(Buffer.from('s')), policy: BOOTSTRAP, log: () => undefined,
      link: { address: `127.0.0.1:${a.grpcPort}`, backoff: { initialMs: 20, maxMs: 200 }, allowCommands: ['write-physical', 'inject-exception'] },
    });
    const vm = new SimVm({ vcpus: 1, seed: 21, jitterMs: 0, name: 'resp-strict' });
    const qemu = new SimQemu(vm, { path: sock, key: Buffer.from('s'), reconnectSeconds: 0.05 });
    try {
      // First the module with a plain deny: the agent installs it.
      await a.applyPolicy(policy('answer-strict', 'resp-strict', 'deny'));
      await strict.start();
      qemu.start();
      let host: Awaited<ReturnType<typeof a.store.listHosts>>[number] | undefined;
      await until(async () => (host = (await a.store.listHosts()).find((x) => x.hostId === 'resp-strict-host'))?.policyState === 'active' && vm.vcpus[0]!.interceptions.msrs.has(MSR.LSTAR), 20_000, 'deny policy active');
      // Then the same module with a crash response: refused whole, the deny policy stays.
      await a.applyPolicy(policy('answer-strict', 'resp-strict', 'crash'));
      await until(async () => (host = (await a.store.listHosts()).find((x) => x.hostId === 'resp-strict-host'))?.policyState === 'rejected', 20_000, 'policy rejected');
      expect(host!.policyError).toMatch(/rule answer-strict\/syscall-msrs\/entry \(crash\).* needs --allow-command crash/);
      expect(host!.policyError).toContain('config key "allow-command"');
      // The version in effect is an older one (the previous policy stays active), not the refused one.
      expect(host!.policyVersion < a.sessions.get('resp-strict-host')!.lastPolicyVersion).toBe(true);
      expect(analysisLogs).toContainEqual(expect.objectContaining({ level: 'error', msg: 'agent rejected the local policy', fields: expect.objectContaining({ host: 'resp-strict-host', error: expect.stringContaining('--allow-command crash') }) }));
      // The operator's view over HTTP too: GET /v1/hosts.
      const r = await fetch(`http://127.0.0.1:${a.httpPort}/v1/hosts`).then((x) => x.json() as Promise<{ hosts: { hostId: string; policyState: string; policyError: string }[] }>);
      expect(r.hosts.find((x) => x.hostId === 'resp-strict-host')).toMatchObject({ policyState: 'rejected', policyError: expect.stringContaining('--allow-command crash') });
      // Nothing crashes the guest: its LSTAR write is denied by the policy still active.
      const c = vm.vcpus[0]!;
      const entry = c.cpu.readMsr(MSR.LSTAR)!;
      const w = await c.wrmsr(MSR.LSTAR, vm.kernel.text + 0x123400n);
      expect(w.crashed).toBe(false);
      expect(c.isCrashed).toBe(false);
      expect(c.cpu.readMsr(MSR.LSTAR)).toBe(entry);
      // The alert says so (deny, not the crash the current fleet policy asks for), and why the crash did not happen.
      let al: AlertRecord | undefined;
      await until(async () => (al = (await a.store.listAlerts({ vm: vm.uuidText, limit: 100 })).find((x) => x.ruleId === 'answer-strict/syscall-msrs/entry')) !== undefined, 15_000, 'strict alert');
      expect(al!.action).toBe('deny');
      expect(al!.title).toMatch(/^Blocked: /);
      expect(al!.evidence.attributes['policy_action']).toBe('deny');
      expect((al!.evidence as unknown as { response: Record<string, unknown> }).response).toMatchObject({ kind: 'crash', decidedAt: 'agent', policy: 'answer-strict', status: expect.stringMatching(/^not applied: the agent's active local policy answered deny, not crash/) });
      await a.audit.flushed();
      expect((await a.audit.list({ vm: vm.uuidText })).filter((x) => x.action === 'crash')).toEqual([]);
    } finally {
      qemu.stop();
      vm.close();
      await strict.stop(300);
    }
  }, 40_000);

  it('policy validation names the path of a bad response', async () => {
    const bad = `format: periscope.policy/v1
name: bad-response
modules:
  syscall-msrs: { action: report, response: inject }
  cr-pinning: { response: { kind: inject, vector: NOPE } }
  descriptor-tables: { response: { kind: pause, resume-after: forever } }
  kernel-code-integrity: { response: explode }
`;
    const issues = await a.applyPolicy(bad).then(() => [], (e: { issues?: { path: string; message: string }[] }) => e.issues ?? []);
    expect(issues.map((i) => i.path).sort()).toEqual([
      'modules.cr-pinning.response.vector', 'modules.descriptor-tables.response.resume-after', 'modules.kernel-code-integrity.response', 'modules.syscall-msrs.response',
    ]);
  });
});
