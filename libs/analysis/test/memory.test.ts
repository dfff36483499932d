/**
 * Guest memory end to end (issue #10): the simulator (one VM, its RAM file shared with the simulated
 * /dev/kvmmem of `--kvmmem-listen`), the real host agent (in process, its analysis link over real gRPC),
 * the real guest agent (dialing analysis's GuestMemoryService) and analysis, on PGlite (and PostgreSQL when
 * one answers).
 *
 * - map tokens come from KVMI GET_MAP_TOKEN relayed through the host agent; the kernel's text and rodata
 *   are mapped and hashed by the guest agent; the profile's expected page hashes hold at attach;
 * - benign scenarios (text_poke included: its site is masked) raise nothing, also after a re-hash;
 * - the DMA write into kernel text is found by the periodic re-hash (`kernel-code-integrity/text-hash`)
 *   and nothing else raises an alert;
 * - `POST /v1/vms/{id}/scan` streams progress and finds the planted bytes; `GET /v1/vms/{id}/integrity`;
 * - without a guest agent: VM_READ_PHYSICAL, said in the log and the VM's status, and the DMA is still found;
 * - a pure v12 host (no GET_MAP_TOKEN): "host lacks GET_MAP_TOKEN" and the same fallback.
 */
import { closeSync, mkdtempSync, openSync, readSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { connectSimKvmmem, GuestAgent } from '@periscope/guest-agent';
import { HostAgent, parseCookies } from '@periscope/host-agent';
import { KvmmemServer, loadScenario, parseScenario, runScenario, shippedScenarioFiles, SimQemu, SimVm } from '@periscope/simulator';
import { parsePolicy } from '@periscope/verdicts';
import { Analysis, type AlertRecord, type IntegrityStatus } from '../src/index.js';
import { DB_VARIANTS, resetDatabase, until, type DbVariant } from './support.js';

const POLICY = `
format: periscope.policy/v1
name: mem-default
select: {}
modules:
  kernel-code-integrity: { action: deny, rehash-interval: 0.3 }
  cr-pinning: { action: deny, cr0: [WP], cr4: [SMEP, SMAP] }
  syscall-msrs: { action: deny }
  descriptor-tables: { action: deny, tables: [IDTR, GDTR] }
`;
const BOOTSTRAP = parsePolicy({ id: 'bootstrap', version: 1, rules: [] });
const DMA = shippedScenarioFiles().find((f) => f.endsWith('attack-dma-text-write.yaml'))!;

interface RigOptions {
  guestAgent: boolean;
  pureV12?: boolean;
  abi?: 1 | 2;
  seed: number;
  db?: DbVariant;
}

interface Rig {
  a: Analysis;
  vm: SimVm;
  logs: string[];
  guest?: GuestAgent;
  kvmmem: KvmmemServer;
  stop(): Promise<void>;
  alerts(): Promise<AlertRecord[]>;
  integrity(): Promise<IntegrityStatus>;
  http(path: string, init?: RequestInit): Promise<Response>;
}

async function startRig(o: RigOptions): Promise<Rig> {
  const db = await (o.db ?? DB_VARIANTS[0]!).create();
  await resetDatabase(db.url);
  const logs: string[] = [];
  const a = await Analysis.start({
    db: db.url, grpcListen: '127.0.0.1:0', httpListen: '127.0.0.1:0', keepaliveMs: 200, flushMs: 100,
    log: (level, msg, f) => logs.push(`${level}: ${msg} ${JSON.stringify(f ?? {})}`),
  });
  await a.applyPolicy(POLICY);
  const dir = mkdtempSync(join(tmpdir(), 'an-mem-'));
  const sock = join(dir, 'kvmi.sock');
  const hostId = `mem-host-${o.seed}`;
  const agent = new HostAgent({
    hostId, kvmiPaths: [sock], cookies: parseCookies(Buffer.from('s')), policy: BOOTSTRAP, log: () => undefined,
    link: { address: `127.0.0.1:${a.grpcPort}`, backoff: { initialMs: 20, maxMs: 200 } },
  });
  await agent.start();
  const vm = new SimVm({ vcpus: 2, seed: o.seed, apsOnline: true, jitterMs: 0, name: `mem-vm-${o.seed}`, pureV12: o.pureV12 ?? false });
  const kvmmem = new KvmmemServer({ path: join(dir, 'kvmmem.sock'), vms: () => [vm], abi: o.abi ?? 2 });
  await kvmmem.listen();
  let guest: GuestAgent | undefined;
  if (o.guestAgent) {
    guest = new GuestAgent({ analysis: `127.0.0.1:${a.grpcPort}`, hostId, device: await connectSimKvmmem(join(dir, 'kvmmem.sock')), maxMappedPages: 1 << 16, reconnectBaseMs: 20, reconnectMaxMs: 200 });
    guest.start();
    await a.memory.hub.waitForAgent(hostId);
  }
  const qemu = new SimQemu(vm, { path: sock, key: Buffer.from('s'), reconnectSeconds: 0.05 });
  qemu.start();
  await until(() => a.memory.integrity.status(vm.uuidText)?.state === 'monitoring', 30_000, 'kernel integrity baseline');
  await a.settled();
  const base = `http://${a.httpAddress}`;
  return {
    a, vm, logs, kvmmem, ...(guest ? { guest } : {}),
    alerts: () => a.store.listAlerts({ vm: vm.uuidText, limit: 1000 }),
    integrity: async () => a.memory.integrity.status(vm.uuidText)!,
    http: (path, init) => fetch(`${base}${path}`, init),
    async stop() {
      qemu.stop();
      vm.close();
      await guest?.stop();
      await agent.stop(300);
      await a.stop();
      await kvmmem.close();
      rmSync(dir, { recursive: true, force: true });
      await db.drop();
    },
  };
}

/** A scan through HTTP: the JSON lines it streamed. */
async function scan(r: Rig, body: Record<string, unknown>): Promise<Record<string, unknown>[]> {
  const res = await r.http(`/v1/vms/${r.vm.uuidText}/scan`, { method: 'POST', body: JSON.stringify(body), headers: { 'content-type': 'application/json' } });
  expect(res.status).toBe(200);
  expect(res.headers.get('content-type')).toBe('application/x-ndjson');
  return (await res.text()).trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>);
}

const hex = (v: bigint): string => `0x${v.toString(16)}`;

/** Bytes of the VM's RAM file (read independently of the simulator and the agents). */
function ramHex(vm: SimVm, gpa: bigint, length: number): string {
  const fd = openSync(vm.memory.path, 'r');
  try {
    const b = Buffer.alloc(length);
    readSync(fd, b, 0, length, Number(gpa));
    return b.toString('hex');
  } finally {
    closeSync(fd);
  }
}

describe.each(DB_VARIANTS)('kernel integrity through the guest agent on $name', (variant) => {
  let r: Rig;
  beforeAll(async () => {
    r = await startRig({ guestAgent: true, seed: 11, db: variant });
  }, 60_000);
  afterAll(async () => r?.stop());

  it('baselines text and rodata through the guest agent with tokens from GET_MAP_TOKEN via the host agent', async () => {
    const st = await r.integrity();
    expect(st).toMatchObject({ state: 'monitoring', via: 'guest-agent', fallbackReason: '', pages: 0x14, rehashSeconds: 0.3, profileHashes: { checked: 16, mismatched: 0 }, mismatches: [] });
    expect(st.viaDetail).toMatch(/guest agent .*ABI v2/);
    expect(st.maskedBytes.textPoke).toBe(8);
    expect(st.ranges.map((x) => x.section)).toEqual(['text', 'rodata']);
    expect(BigInt(st.ranges[0]!.gpa)).toBe(r.vm.kernel.textPhys);
    // the tokens were KVMI commands sent to the host agent, and the simulated device took them
    // (the whole command log: with re-hashing every 0.3 s the token commands of the baseline are not among
    // the newest few hundred on a slow machine; command rows are written asynchronously, hence the poll)
    await expect
      .poll(async () => (await r.a.store.listCommands(r.vm.uuidText, 1_000_000)).filter((c) => c['kind'] === 'getMapToken' && c['status'] === 'ok').length, { timeout: 10_000 })
      .toBeGreaterThanOrEqual(1);
    const cmds = await r.a.store.listCommands(r.vm.uuidText, 1_000_000);
    expect(cmds.some((c) => c['kind'] === 'readPhysical' && String(c['purpose']).startsWith('memory'))).toBe(false);
    expect(r.kvmmem.stats().maps).toBeGreaterThanOrEqual(1);
    expect(r.kvmmem.stats().mappedPages).toBeGreaterThanOrEqual(0x14);
    // the VM's status says how
    const vmRes = await (await r.http(`/v1/vms/${r.vm.uuidText}`)).json() as { vm: { protection: Record<string, string> } };
    expect(vmRes.vm.protection['memory-integrity']).toMatch(/20 pages hashed via guest agent; re-hashed every 0.3 s/);
    const http = await (await r.http(`/v1/vms/${r.vm.name}/integrity`)).json() as { integrity: IntegrityStatus };
    expect(http.integrity).toMatchObject({ via: 'guest-agent', pages: 20, state: 'monitoring' });
    await until(async () => (await r.integrity()).checks >= 2, 10_000, 'periodic re-hashes');
  });

  it('benign scenarios raise nothing, text_poke included (its site is masked), also after a re-hash', async () => {
    for (const f of shippedScenarioFiles().filter((x) => /benign-/.test(x))) {
      const rep = await runScenario(r.vm, await loadScenario(f));
      expect(rep.expectations.filter((e) => !e.ok), f).toEqual([]);
    }
    // leave the static key on: the site holds the other known encoding
    const poke = await runScenario(r.vm, parseScenario(`
name: key-on
kind: benign
steps:
  - { id: on, from: text_poke, write: { at: alias:static_key_site, bytes: "eb 06 90 90 90 90 90 90" } }
expect:
  writes: [{ step: on, landed: true }]
`));
    expect(poke.expectations.filter((e) => !e.ok)).toEqual([]);
    const st = (await r.a.memory.integrity.checkNow(r.vm.uuidText))!;
    await r.a.settled();
    expect(st.mismatches).toEqual([]);
    expect(await r.alerts()).toEqual([]);
  }, 30_000);

  it('the DMA write into kernel text is found by the periodic re-hash, and nothing else alerts', async () => {
    const checks = (await r.integrity()).checks;
    const rep = await runScenario(r.vm, await loadScenario(DMA));
    expect(rep.expectations.filter((e) => !e.ok)).toEqual([]);
    let al: AlertRecord | undefined;
    await until(async () => (al = (await r.alerts()).find((x) => x.ruleId.includes('/kernel-code-integrity/text-hash#'))) !== undefined, 10_000, 'text-hash alert');
    expect((await r.integrity()).checks).toBeGreaterThan(checks); // found by a periodic pass, not asked for
    const target = r.vm.kernel.symbolPhys('__x64_sys_getpid');
    expect(al).toMatchObject({
      module: 'kernel-code-integrity', technique: { id: 'T1014', name: 'Rootkit' }, severity: 'critical', action: 'none', tier: 'analysis', hostId: 'mem-host-11',
      vm: { uuid: r.vm.uuidText, name: 'mem-vm-11' }, policy: { name: 'mem-default' }, ruleId: `mem-default/kernel-code-integrity/text-hash#${r.vm.uuidText}`,
    });
    expect(al!.title).toMatch(/^Detected: kernel text changed without a vCPU write/);
    expect(al!.evidence.attempt).toMatchObject({ event: 'HASH', section: '.text', gpa: hex(target & ~0xfffn), via: 'guest-agent' });
    expect(al!.evidence.attempt['symbols']).toContain('__x64_sys_getpid');
    // more passes: the same content is not alerted twice, and nothing else was raised
    await until(async () => (await r.integrity()).checks >= checks + 4, 10_000, 'more re-hashes');
    const all = await r.alerts();
    expect(all.map((x) => x.ruleId)).toEqual([al!.ruleId]);
    expect(all[0]!.count).toBe(1n);
    const st = await r.integrity();
    expect(st.mismatches).toHaveLength(1);
    expect(st.mismatches[0]).toMatchObject({ kind: 'text-hash', gpa: hex(target & ~0xfffn), alertId: al!.id, restored: false });
    const vmRes = await (await r.http(`/v1/vms/${r.vm.uuidText}`)).json() as { vm: { protection: Record<string, string> } };
    expect(vmRes.vm.protection['memory-integrity']).toMatch(/1 page\(s\) changed/);
  }, 30_000);

  it('POST /v1/vms/{id}/scan streams progress and finds the planted bytes (masked too), through the guest agent', async () => {
    const target = r.vm.kernel.symbolPhys('__x64_sys_getpid');
    // the DMA's four int3 bytes followed by what the function had after them (0xcc alone is padding)
    const planted = ramHex(r.vm, target, 12);
    expect(planted.startsWith('cccccccc')).toBe(true);
    const lines = await scan(r, { signature: planted });
    expect(lines[0]).toMatchObject({ event: 'start', via: 'guest-agent', fallbackReason: '' });
    expect(lines.some((l) => l['event'] === 'progress')).toBe(true);
    expect(lines.at(-1)).toMatchObject({ event: 'done', matches: [hex(target)], count: 1, truncated: false, via: 'guest-agent' });
    const wild = `cccccccc??${planted.slice(10, 16)}/ffffffff00${'f'.repeat(6)}`;
    const masked = await scan(r, { signature: wild, ranges: [{ gpa: hex(target & ~0xfffn), length: '0x1000' }] });
    expect(masked.at(-1)).toMatchObject({ event: 'done', via: 'guest-agent', bytesScanned: '4096', matches: [hex(target)] });
    const bad = await r.http(`/v1/vms/${r.vm.uuidText}/scan`, { method: 'POST', body: JSON.stringify({ signature: 'xyz' }) });
    expect(bad.status).toBe(400);
    expect(((await bad.json()) as { error: { code: string } }).error.code).toBe('bad-signature');
    // the explicit range was unmapped again; the kernel image is still hashed (mapped again if needed)
    const st = (await r.a.memory.integrity.checkNow(r.vm.uuidText))!;
    expect(st.via).toBe('guest-agent');
  }, 30_000);
});

describe('kernel integrity without a guest agent: VM_READ_PHYSICAL through the host agent', () => {
  let r: Rig;
  beforeAll(async () => {
    r = await startRig({ guestAgent: false, seed: 12 });
  }, 60_000);
  afterAll(async () => r?.stop());

  it('says so in the log and in the VM status, hashes the same pages and still finds the DMA write', async () => {
    const st = await r.integrity();
    expect(st).toMatchObject({ via: 'read-physical', fallbackReason: 'no guest agent on host mem-host-12', pages: 20, profileHashes: { checked: 16, mismatched: 0 } });
    expect(r.logs.some((l) => l.startsWith('warn: kernel integrity hashes mem-vm-12 through VM_READ_PHYSICAL: no guest agent on host mem-host-12'))).toBe(true);
    expect(r.vm.index >= 0 && (await r.a.store.getVm(r.vm.uuidText))!.protection['memory-integrity']).toMatch(/via VM_READ_PHYSICAL \(fallback: no guest agent on host mem-host-12\)/);
    await runScenario(r.vm, await loadScenario(DMA));
    let al: AlertRecord | undefined;
    await until(async () => (al = (await r.alerts()).find((x) => x.ruleId.includes('/text-hash#'))) !== undefined, 10_000, 'text-hash alert');
    expect(al!.evidence.attempt).toMatchObject({ via: 'read-physical', fallback: 'no guest agent on host mem-host-12' });
    expect((await r.alerts()).length).toBe(1);
    const lines = await scan(r, { signature: ramHex(r.vm, r.vm.kernel.symbolPhys('__x64_sys_getpid'), 12) });
    expect(lines[0]).toMatchObject({ event: 'start', via: 'read-physical', fallbackReason: 'no guest agent on host mem-host-12' });
    expect(lines.at(-1)).toMatchObject({ event: 'done', matches: [hex(r.vm.kernel.symbolPhys('__x64_sys_getpid'))], via: 'read-physical' });
  }, 30_000);
});

describe('kernel integrity on a pure v12 host (no GET_MAP_TOKEN)', () => {
  let r: Rig;
  beforeAll(async () => {
    r = await startRig({ guestAgent: true, pureV12: true, seed: 13 });
  }, 60_000);
  afterAll(async () => r?.stop());

  it('says "host lacks GET_MAP_TOKEN" and falls back to VM_READ_PHYSICAL although a guest agent is there', async () => {
    const st = await r.integrity();
    expect(st).toMatchObject({ via: 'read-physical', fallbackReason: 'host lacks GET_MAP_TOKEN', pages: 20 });
    expect(r.logs.some((l) => l.includes('through VM_READ_PHYSICAL: host lacks GET_MAP_TOKEN'))).toBe(true);
    expect((await r.a.store.getVm(r.vm.uuidText))!.protection['memory-integrity']).toMatch(/fallback: host lacks GET_MAP_TOKEN/);
    expect(r.kvmmem.stats().maps).toBe(0);
    expect(await r.alerts()).toEqual([]);
  });
});
