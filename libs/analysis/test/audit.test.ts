/**
 * The audit log and reading a guest, over the real HTTP API and gRPC (issues #9, #12): the real simulator +
 * host agent + analysis (an API token, PGlite and PostgreSQL).
 *
 * - guest-changing commands are audited with who asked: the kernel-code-integrity module's page restrictions
 *   (`module:kernel-code-integrity`), an operator's pause/resume over HTTP (`alice` via `api-token`);
 *   reads are not; `GET /v1/audit?vm=&since=` and `ListAuditEvents` (filters, paging) show them;
 * - `GET /v1/vms/{id}/memory`: bytes equal the simulator's RAM, split at the page, an unbacked page is an
 *   ENOENT gap, beyond max_gfn is refused (400), unknown VM 404, length capped;
 * - `GET /v1/vms/{id}/vcpus/{n}/registers`: the vCPU's registers and MSRs as the simulator has them.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { credentials, Metadata, status, type ServiceError } from '@grpc/grpc-js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { OperatorServiceClient, uuidToBytes, type ListAuditEventsRequest, type ListAuditEventsResponse } from '@periscope/contracts';
import { HostAgent, parseCookies } from '@periscope/host-agent';
import { MSR, SimQemu, SimVm } from '@periscope/simulator';
import { parsePolicy } from '@periscope/verdicts';
import { Analysis } from '../src/index.js';
import type { AuditEventRecord } from '../src/audit.js';
import { DB_VARIANTS, http, resetDatabase, until } from './support.js';

const TOKEN = 'audit-token';
const POLICY = `
format: periscope.policy/v1
name: audited
select: {}
modules:
  kernel-code-integrity: { action: deny }
  syscall-msrs: { action: deny }
`;

describe.each(DB_VARIANTS)('audit log and guest reads on $name', (variant) => {
  let drop: () => Promise<void> = async () => undefined;
  let a: Analysis;
  let agent: HostAgent;
  let vm: SimVm;
  let qemu: SimQemu;
  let dir = '';
  let base = '';
  let grpc: OperatorServiceClient;
  const auth = { authorization: `Bearer ${TOKEN}` };

  beforeAll(async () => {
    const d = await variant.create();
    drop = d.drop;
    await resetDatabase(d.url);
    a = await Analysis.start({ db: d.url, grpcListen: '127.0.0.1:0', httpListen: '127.0.0.1:0', apiToken: TOKEN, keepaliveMs: 200, flushMs: 100 });
    base = `http://127.0.0.1:${a.httpPort}`;
    grpc = new OperatorServiceClient(`127.0.0.1:${a.grpcPort}`, credentials.createInsecure());
    await a.applyPolicy(POLICY);
    dir = mkdtempSync(join(tmpdir(), 'an-audit-'));
    const sock = join(dir, 'kvmi.sock');
    agent = new HostAgent({
      hostId: 'audit-host', kvmiPaths: [sock], cookies: parseCookies(Buffer.from('s')), policy: parsePolicy({ id: 'bootstrap', version: 1, rules: [] }), stateDir: join(dir, 'state'),
      log: () => undefined, link: { address: `127.0.0.1:${a.grpcPort}`, backoff: { initialMs: 20, maxMs: 200 } },
    });
    await agent.start();
    vm = new SimVm({ vcpus: 2, seed: 5, jitterMs: 0, apsOnline: true, name: 'audit-vm' });
    qemu = new SimQemu(vm, { path: sock, key: Buffer.from('s'), reconnectSeconds: 0.05 });
    qemu.start();
    await until(() => a.liveVms.get(vm.uuidText)?.protection['kernel-code-integrity']?.startsWith('protected') ?? false, 30_000, 'kernel protected');
    await a.settled();
  }, 60_000);

  afterAll(async () => {
    grpc?.close();
    qemu?.stop();
    vm?.close();
    await agent?.stop(300);
    await a?.stop();
    if (dir) rmSync(dir, { recursive: true, force: true });
    await drop();
  });

  const list = (req: Partial<ListAuditEventsRequest>, md = new Metadata()): Promise<ListAuditEventsResponse> => {
    md.set('authorization', `Bearer ${TOKEN}`);
    const full: ListAuditEventsRequest = { pageSize: 0, pageToken: '', actor: '', action: '', sinceUnixNs: 0n, untilUnixNs: 0n, vmUuid: Buffer.alloc(0), ...req };
    return new Promise((resolve, reject) => grpc.listAuditEvents(full, md, (e, r) => (e ? reject(e) : resolve(r!))));
  };

  it('module commands that change the guest are audited as module:NAME; reads are not', async () => {
    await a.audit.flushed();
    const evs = await a.audit.list({ vm: vm.uuidText });
    const restrict = evs.find((e) => e.action === 'set-page-access');
    expect(restrict).toMatchObject({ actor: 'module:kernel-code-integrity', success: true, result: 'ok', hostId: 'audit-host', vcpu: 0, target: `vm/${vm.uuidText}/vcpu/0` });
    expect(Number(restrict!.details['pages'])).toBeGreaterThan(0);
    expect(restrict!.correlationId).toMatch(/^\d+$/);
    expect(evs.every((e) => e.action !== 'read-physical' && e.action !== 'get-registers')).toBe(true);
  });

  it('an operator pause/resume over HTTP is audited with the name given and the token identity', async () => {
    const p = await http(base, `/v1/vms/audit-vm/pause`, { method: 'POST', headers: auth, body: JSON.stringify({ by: 'alice' }) });
    expect(p.status).toBe(200);
    await until(() => vm.vcpus.every((c) => c.waitingFor?.event === 'PAUSE'), 10_000, `both vCPUs held ${JSON.stringify(vm.vcpus.map((c) => [c.waitingFor, c.pendingPauseRequests, c.isOnline]))}`);
    const r = await http(base, `/v1/vms/audit-vm/resume`, { method: 'POST', headers: auth, body: JSON.stringify({ by: 'alice' }) });
    expect(r.status).toBe(200);
    await until(() => vm.vcpus.every((c) => c.waitingFor === null), 10_000, 'vCPUs running');
    await a.audit.flushed();
    const got = await http(base, `/v1/audit?vm=audit-vm&since=1h`, { headers: auth });
    expect(got.status).toBe(200);
    const events = got.body['events'] as AuditEventRecord[];
    expect(events.slice(0, 2).map((e) => [e.action, e.actor, e.principal, e.success])).toEqual([['resume-vm', 'alice', 'api-token', true], ['pause-vm', 'alice', 'api-token', true]]);
    expect(Number(events[0]!.doneNs)).toBeGreaterThanOrEqual(Number(events[0]!.timeNs));
    // since in the future: nothing; bad since: 400; unknown VM: 404; no token: 401.
    expect(((await http(base, `/v1/audit?vm=audit-vm&since=${Date.now() * 1e6 + 3.6e12}`, { headers: auth })).body['events'] as unknown[]).length).toBe(0);
    expect((await http(base, '/v1/audit?since=yesterday-ish', { headers: auth })).status).toBe(400);
    expect((await http(base, '/v1/audit?vm=no-such-vm', { headers: auth })).status).toBe(404);
    expect((await http(base, '/v1/audit')).status).toBe(401);
  });

  it('ListAuditEvents over gRPC: filters by VM, action and actor, pages newest first', async () => {
    await a.audit.flushed();
    const all = await list({ vmUuid: uuidToBytes(vm.uuidText) });
    expect(all.events.length).toBeGreaterThanOrEqual(3);
    expect(all.events[0]).toMatchObject({ action: 'resume-vm', actor: 'alice via api-token', success: true, target: `vm/${vm.uuidText}` });
    expect(all.events[0]!.details).toMatchObject({ principal: 'api-token', vm: vm.uuidText, host: 'audit-host', result: 'ok' });
    const pauses = await list({ action: 'pause-vm', actor: 'alice' });
    expect(pauses.events.map((e) => e.action)).toEqual(['pause-vm']);
    const page1 = await list({ pageSize: 1, vmUuid: uuidToBytes(vm.uuidText) });
    expect(page1.events).toHaveLength(1);
    const page2 = await list({ pageSize: 1, pageToken: page1.nextPageToken, vmUuid: uuidToBytes(vm.uuidText) });
    expect(page2.events[0]!.auditId).toBe(all.events[1]!.auditId);
    const unauth = await new Promise<ServiceError>((resolve) => grpc.listAuditEvents({ pageSize: 0, pageToken: '', actor: '', action: '', sinceUnixNs: 0n, untilUnixNs: 0n, vmUuid: Buffer.alloc(0) }, new Metadata(), (e) => resolve(e!)));
    expect(unauth.code).toBe(status.UNAUTHENTICATED);
  });

  it('GET /v1/vms/{id}/memory: the guest RAM, split at the page, ENOENT gaps, bounds checked', async () => {
    const gpa = 0x1000ff0n;
    const r = await http(base, `/v1/vms/audit-vm/memory?gpa=0x${gpa.toString(16)}&length=32`, { headers: auth });
    expect(r.status).toBe(200);
    const chunks = r.body['chunks'] as { gpa: string; length: number; data?: string; error?: string }[];
    expect(chunks.map((c) => [c.gpa, c.length])).toEqual([['0x1000ff0', 16], ['0x1001000', 16]]);
    expect(chunks.map((c) => c.data).join('')).toBe(vm.memory.read(gpa, 32)!.toString('hex'));
    expect(r.body).toMatchObject({ gpa: '0x1000ff0', length: 32, bytesRead: 32, via: 'VM_READ_PHYSICAL', vm: { name: 'audit-vm', uuid: vm.uuidText } });
    // The legacy VGA hole (gfn 0xa0..0xbf) is not backed: a gap, the page before it is read.
    const hole = await http(base, '/v1/vms/audit-vm/memory?gpa=0x9fff8&length=16', { headers: auth });
    expect(hole.status).toBe(200);
    expect((hole.body['chunks'] as { error?: string; data?: string }[]).map((c) => c.error ?? 'data')).toEqual(['data', 'ENOENT']);
    expect(hole.body['bytesRead']).toBe(8);
    const maxGfn = (await a.store.getVm(vm.uuidText))!.maxGfn!;
    const beyond = await http(base, `/v1/vms/audit-vm/memory?gpa=0x${((maxGfn + 1n) * 4096n - 8n).toString(16)}&length=16`, { headers: auth });
    expect(beyond.status).toBe(400);
    expect(beyond.body.error!.message).toContain('max_gfn');
    expect((await http(base, '/v1/vms/audit-vm/memory?gpa=0x1000&length=70000', { headers: auth })).status).toBe(400);
    expect((await http(base, '/v1/vms/audit-vm/memory?gpa=zz&length=1', { headers: auth })).status).toBe(400);
    expect((await http(base, '/v1/vms/nope/memory?gpa=0&length=1', { headers: auth })).status).toBe(404);
  });

  it('GET /v1/vms/{id}/vcpus/{n}/registers: registers and MSRs as the vCPU has them', async () => {
    const c = vm.vcpus[1]!;
    const r = await http(base, '/v1/vms/audit-vm/vcpus/1/registers', { headers: auth });
    expect(r.status, JSON.stringify(r.body)).toBe(200);
    expect(r.body).toMatchObject({ vcpu: 1, mode: 8 });
    const msrs = r.body['msrs'] as Record<string, string>;
    expect(msrs['LSTAR']).toBe(`0x${c.cpu.readMsr(MSR.LSTAR)!.toString(16)}`);
    expect(msrs['EFER']).toBe(`0x${c.cpu.readMsr(MSR.EFER)!.toString(16)}`);
    const sregs = r.body['sregs'] as Record<string, string>;
    expect(sregs['cr3']).toBe(`0x${c.cpu.sregs.cr3.toString(16)}`);
    expect((r.body['regs'] as Record<string, string>)['rip']).toMatch(/^0x[0-9a-f]+$/);
    expect((await http(base, '/v1/vms/audit-vm/vcpus/7/registers', { headers: auth })).status).toBe(400);
    expect((await http(base, '/v1/vms/nope/vcpus/0/registers', { headers: auth })).status).toBe(404);
    await a.audit.flushed();
    expect((await a.audit.list({ vm: vm.uuidText })).some((e) => e.reason.includes('read'))).toBe(false); // reads are not audited
  });
});
