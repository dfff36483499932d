#!/usr/bin/env node
/**
 * Guest memory bench through analysis (issue #10: "hashing ≥ 64 MiB of guest memory through the same
 * analysis → agent path in three ways"). Unlike libs/guest-agent/bench/run.mjs (which drives the hub and
 * KVMI directly), every byte and every token here goes the way the kernel integrity module's go:
 *
 *   read      analysis → host agent (gRPC AgentLink) → KVMI VM_READ_PHYSICAL, 4 KiB per command, hashed in
 *             analysis (`ReadPhysicalAccess`, WIDTH commands in flight; each command is also recorded in the
 *             database, as in production)
 *   cold v1/2 analysis → guest agent (GuestMemoryService) with nothing mapped: every map token a KVMI
 *             GET_MAP_TOKEN relayed through the host agent (v1: one per page, v2: one per 2 MiB region),
 *             the map calls on the simulated /dev/kvmmem, then HashMemory (`GuestAgentAccess`)
 *   warm      HashMemory again over the mapped range
 *
 * Digests of every path are compared page by page. One process: analysis (PGlite in memory), the host agent,
 * the simulated VM + QEMU + /dev/kvmmem (both ABIs) and the guest agent. Run after the build.
 * Env: MEM_BENCH_MIB (default 64), MEM_BENCH_WIDTH (default 64), MEM_BENCH_V1=0 skips v1-cold (16384 tokens).
 *
 * References in the same process, no I/O: a plain copy of the same number of bytes (`Buffer.copy`, i.e.
 * memcpy), and SHA-256 of every page of an in-memory buffer (`createHash`, one page at a time) — the floor
 * any path that hashes page by page on one core pays. `--json`: the human table goes to stderr and stdout
 * gets one JSON line (read by bench/run.mjs).
 */
import { createHash } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Analysis, GuestAgentAccess, ReadPhysicalAccess } from '@periscope/analysis';
import { connectSimKvmmem, GuestAgent } from '@periscope/guest-agent';
import { HostAgent, parseCookies } from '@periscope/host-agent';
import { KvmmemServer, SimQemu, SimVm } from '@periscope/simulator';
import { parsePolicy } from '@periscope/verdicts';

const MIB = Number(process.env.MEM_BENCH_MIB ?? 64);
const WIDTH = Number(process.env.MEM_BENCH_WIDTH ?? 64);
const V1 = process.env.MEM_BENCH_V1 !== '0';
const BASE = 0x1000000n;
const RANGE = { gpa: BASE, length: BigInt(MIB) << 20n };
const JSON_OUT = process.argv.includes('--json');
const say = JSON_OUT ? (...a) => console.error(...a) : (...a) => console.log(...a);
const progress = (m) => process.stderr.write(`[analysis memory bench] ${m}\n`);
const until = async (cond, ms, what) => {
  const t0 = Date.now();
  while (!(await cond())) {
    if (Date.now() - t0 > ms) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
};

const dir = mkdtempSync(join(tmpdir(), 'an-membench-'));
const a = await Analysis.start({ db: 'pglite:memory', grpcListen: '127.0.0.1:0', keepaliveMs: 1000, commandTimeoutMs: 30_000 });
const host = new HostAgent({
  hostId: 'bench-host', kvmiPaths: [join(dir, 'kvmi.sock')], cookies: parseCookies(Buffer.from('s')), policy: parsePolicy({ id: 'bootstrap', version: 1, rules: [] }), log: () => undefined,
  link: { address: `127.0.0.1:${a.grpcPort}`, backoff: { initialMs: 20, maxMs: 200 } },
});
await host.start();
const vm = new SimVm({ vcpus: 1, seed: 3, jitterMs: 0, memoryMiB: MIB + 32, name: 'bench-vm' });
const chunk = Buffer.alloc(1 << 20);
for (let off = 0n; off < RANGE.length; off += 1n << 20n) {
  for (let i = 0; i < chunk.length; i += 4) chunk.writeUInt32LE(((Number(off >> 12n) + i) * 2654435761) >>> 0, i);
  vm.memory.write(BASE + off, chunk);
}
const kv = { 1: new KvmmemServer({ path: join(dir, 'kvmmem-v1.sock'), vms: () => [vm], abi: 1 }), 2: new KvmmemServer({ path: join(dir, 'kvmmem-v2.sock'), vms: () => [vm], abi: 2 }) };
await kv[1].listen();
await kv[2].listen();
const qemu = new SimQemu(vm, { path: join(dir, 'kvmi.sock'), key: Buffer.from('s'), reconnectSeconds: 0.05 });
qemu.start();
await until(() => a.liveVms.has(vm.uuidText), 20_000, 'the VM attached through the host agent');
const live = a.liveVms.get(vm.uuidText);

const results = [];
const time = async (name, fn) => {
  const t0 = performance.now();
  const digests = await fn();
  const s = (performance.now() - t0) / 1000;
  results.push({ name, s, mibs: MIB / s, digests });
  progress(`${name}: ${s.toFixed(2)} s, ${(MIB / s).toFixed(1)} MiB/s`);
  return digests;
};

async function withGuestAgent(abi, fn) {
  const g = new GuestAgent({ analysis: `127.0.0.1:${a.grpcPort}`, hostId: 'bench-host', agentId: `bench-v${abi}`, device: await connectSimKvmmem(join(dir, `kvmmem-v${abi}.sock`)), maxMappedPages: 1 << 20, reconnectBaseMs: 20, reconnectMaxMs: 200 });
  g.start();
  await until(() => a.memory.hub.agentFor('bench-host')?.hello.agentId === `bench-v${abi}`, 10_000, 'the guest agent');
  try {
    await fn(new GuestAgentAccess(live, a.memory.hub.agentFor('bench-host')));
  } finally {
    await g.stop();
  }
}

try {
  progress(`${MIB} MiB at 0x${BASE.toString(16)}; read path ${WIDTH} commands in flight`);
  const rp = new ReadPhysicalAccess(live, 'bench');
  rp.width = WIDTH;
  const ref = await time('read (VM_READ_PHYSICAL via host agent)', () => rp.hashPages(RANGE));
  await withGuestAgent(2, async (acc) => {
    await time('cold v2 (tokens via host agent, map, hash)', () => acc.hashPages(RANGE));
    await time('warm v2 (hash only)', () => acc.hashPages(RANGE));
    progress(`v2 tokens fetched through the host agent: ${acc.tokensFetched}`);
    await acc.close();
  });
  if (V1) {
    await withGuestAgent(1, async (acc) => {
      await time('cold v1 (a token per page via host agent)', () => acc.hashPages(RANGE));
      await time('warm v1 (hash only)', () => acc.hashPages(RANGE));
      progress(`v1 tokens fetched through the host agent: ${acc.tokensFetched}`);
      await acc.close();
    });
  }
  for (const r of results) {
    if (r.digests.length !== ref.length || r.digests.some((d, i) => !d.equals(ref[i]))) throw new Error(`${r.name}: digests differ from the read path`);
  }
  const base = results[0].s;
  say(`\nhashing ${MIB} MiB through analysis → agents (digests equal on every path)\n`);
  say('| path | s | MiB/s | × read |');
  say('| --- | --- | --- | --- |');
  for (const r of results) say(`| ${r.name} | ${r.s.toFixed(2)} | ${r.mibs.toFixed(1)} | ${(base / r.s).toFixed(1)} |`);
  const v2cold = results.find((r) => r.name.startsWith('cold v2'));
  const warm = results.find((r) => r.name.startsWith('warm v2'));
  // References, no I/O: memcpy of the same size, and SHA-256 page by page in this process (median of 3).
  const src = Buffer.alloc(MIB << 20, 0x5a);
  const dst = Buffer.alloc(MIB << 20);
  const best = (fn) => {
    const xs = [];
    for (let i = 0; i < 3; i++) {
      const t0 = performance.now();
      fn();
      xs.push((performance.now() - t0) / 1000);
    }
    return xs.sort((x, y) => x - y)[1];
  };
  const copyS = best(() => src.copy(dst));
  const hashS = best(() => {
    for (let off = 0; off < src.length; off += 4096) createHash('sha256').update(src.subarray(off, off + 4096)).digest();
  });
  say(`| plain memory copy (Buffer.copy, no I/O) | ${copyS.toFixed(3)} | ${(MIB / copyS).toFixed(0)} | ${(base / copyS).toFixed(1)} |`);
  say(`| SHA-256 per page in process (no I/O) | ${hashS.toFixed(3)} | ${(MIB / hashS).toFixed(0)} | ${(base / hashS).toFixed(1)} |`);
  say(`\ntarget ≥ 10× read: v2-cold ${(base / v2cold.s).toFixed(1)}× ${base / v2cold.s >= 10 ? 'ok' : 'MISSED'}, warm ${(base / warm.s).toFixed(1)}× ${base / warm.s >= 10 ? 'ok' : 'MISSED'}`);
  const secs = (prefix) => results.find((r) => r.name.startsWith(prefix))?.s ?? null;
  console.log(JSON.stringify({ bench: 'analysis-memory', mib: MIB, width: WIDTH, seconds: { read: base, v2cold: secs('cold v2'), v2warm: secs('warm v2'), v1cold: secs('cold v1'), v1warm: secs('warm v1'), memcpy: copyS, sha256: hashS } }));
} finally {
  qemu.stop();
  vm.close();
  await host.stop(300);
  await a.stop();
  await kv[1].close();
  await kv[2].close();
  rmSync(dir, { recursive: true, force: true });
}
