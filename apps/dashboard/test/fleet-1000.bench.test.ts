/**
 * Benchmark (reported in docs/benchmarks.md, not a CI gate): the dashboard with 1,000 VMs on 20 hosts and
 * 2,000 alerts, inserted through analysis's store API (the same rows agents' attach messages and
 * detections produce). Measures in Chromium: first paint of the fleet view (navigation start → the frame
 * after the 1,000-row fleet is rendered) and alert drill-down (Enter on an alert row → the frame after
 * its evidence is rendered). Run: `npm run bench -w @periscope/dashboard`.
 */
import { randomUUID } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Browser } from 'playwright-core';
import { Analysis } from '@periscope/analysis';
import { DASHBOARD_DIST, launchChromium, POLICY_ALL } from './support.js';

const HOSTS = 20;
const VMS = 1000;
const ALERTS = 2000;

const stats = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  const q = (p: number) => s[Math.min(s.length - 1, Math.floor(p * s.length))]!;
  return { n: s.length, median: +q(0.5).toFixed(1), p95: +q(0.95).toFixed(1), max: +s[s.length - 1]!.toFixed(1) };
};

describe('dashboard with 1,000 VMs', () => {
  let a: Analysis;
  let browser: Browser;
  let dir = '';
  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), 'psdash-bench-'));
    writeFileSync(join(dir, 'p.yaml'), POLICY_ALL);
    [browser, a] = await Promise.all([launchChromium(), Analysis.start({ db: 'pglite:memory', grpcListen: '127.0.0.1:0', httpListen: '127.0.0.1:0', policyDir: dir, dashboardDir: DASHBOARD_DIST })]);
    const now = BigInt(Date.now()) * 1_000_000n;
    const t0 = Date.now();
    for (let h = 1; h <= HOSTS; h++) await a.store.upsertHost({ hostId: `host-${String(h).padStart(2, '0')}`, agentVersion: '0.1.0', agentInstanceId: randomUUID(), capabilities: [], policyId: 'periscope-analysis', policyVersion: 1n, replicaId: a.replicaId, nowNs: now });
    const uuids: { uuid: string; name: string; host: string }[] = [];
    for (let i = 0; i < VMS; i++) {
      const host = `host-${String((i % HOSTS) + 1).padStart(2, '0')}`;
      const v = { uuid: randomUUID(), name: `vm-${String(i).padStart(4, '0')}`, host };
      uuids.push(v);
      await a.store.upsertVm({ uuid: v.uuid, name: v.name, hostId: host, sessionGeneration: 1n, qemuStartTimeMs: 1000n, vcpuCount: 2, maxGfn: 0x4000n, dialect: 'v12', kvmiVersion: {}, allowedCommands: [], allowedEvents: [], attachedNs: now, nowNs: now });
      await a.store.setVmPolicy(v.uuid, 'fleet-default');
      await a.store.setVmProtection(v.uuid, { 'cr-pinning': 'local rules', 'syscall-msrs': 'local rules', 'descriptor-tables': 'local rules', 'kernel-code-integrity': i % 97 === 0 ? 'pending' : 'protected (21 pages write-protected)' });
    }
    for (let i = 0; i < ALERTS; i++) {
      const v = uuids[(i * 7) % VMS]!;
      const rip = `0xffffffffc02${(i % 4096).toString(16).padStart(5, '0')}`;
      await a.store.ingestDetection(randomUUID(), {
        dedupKey: `${v.uuid}|syscall-msrs/entry|msr:0xc0000082|${rip}|deny`, severity: i % 10 === 0 ? 'critical' : 'high',
        title: `Blocked: system-call entry MSR pointed at attacker code on ${v.name} vCPU ${i % 2}`, description: `fleet-default/syscall-msrs/entry: MSR on VM ${v.name} vCPU ${i % 2}, answered CONTINUE`,
        technique: { id: 'T1014', name: 'Rootkit' }, module: 'syscall-msrs', hostId: v.host, vmUuid: v.uuid, vmName: v.name, vcpu: i % 2,
        ruleId: 'fleet-default/syscall-msrs/entry', exceptionId: '', policyId: 'periscope-analysis', policyVersion: 1n, policyName: 'fleet-default', action: 'deny', tier: 'local',
        evidence: {
          attempt: { event: 'MSR', rip, register: 'LSTAR', msr: '0xc0000082', old: '0xffffffff81201000', new: '0xffffffffc0200800' },
          registers: Object.fromEntries(['rax', 'rbx', 'rcx', 'rdx', 'rsi', 'rdi', 'rbp', 'rsp', 'r8', 'r9', 'r10', 'r11', 'r12', 'r13', 'r14', 'r15', 'rip', 'rflags'].map((r, k) => [r, r === 'rip' ? rip : `0x${(k * 0x1000).toString(16)}`])),
          sregs: { cr0: '0x80050033', cr3: '0x88000', cr4: '0x3406e0', efer: '0xd01', lstar: '0xffffffff81201000' },
          summary: '', attributes: {}, session: '1', seqs: [i],
        },
        detectedNs: now - BigInt(ALERTS - i) * 500_000_000n,
      });
    }
    console.log(`inserted ${HOSTS} hosts, ${VMS} VMs, ${ALERTS} alerts in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
  }, 600_000);

  afterAll(async () => {
    await browser?.close();
    await a?.stop();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it('first paint of the fleet view and alert drill-down', async () => {
    const base = `http://${a.httpAddress}`;
    const ctx = await browser.newContext({ viewport: { width: 1280, height: 860 } });
    const page = await ctx.newPage();
    page.on('pageerror', (e) => console.log(`page error: ${e.message}`));
    page.on('console', (m) => m.type() === 'error' && console.log(`console: ${m.text()}`));
    const paints: number[] = [];
    const fcps: number[] = [];
    for (let run = 0; run < 6; run++) {
      await page.goto(`${base}/`);
      await page.waitForFunction(() => document.body.dataset['fleetPainted'] !== undefined, undefined, { timeout: 60_000 });
      expect(await page.locator('tr.vm-row').count()).toBe(VMS);
      const r = await page.evaluate(() => ({ painted: Number(document.body.dataset['fleetPainted']), fcp: performance.getEntriesByName('first-contentful-paint')[0]?.startTime ?? NaN }));
      if (run > 0) {
        // run 0 warms the HTTP cache and the database's plans; the rest are measured
        paints.push(r.painted);
        fcps.push(r.fcp);
      }
    }
    const drill: number[] = [];
    await page.goto(`${base}/alerts`);
    for (let i = 0; i < 12; i++) {
      await page.locator('tr.alert-row').nth(i * 17).waitFor();
      await page.evaluate(() => delete document.body.dataset['drilldownMs']);
      await page.locator('tr.alert-row').nth(i * 17).focus();
      await page.keyboard.press('Enter');
      await page.waitForFunction(() => document.body.dataset['drilldownMs'] !== undefined, undefined, { timeout: 10_000 });
      expect(await page.getByTestId('old-new').count()).toBe(1);
      drill.push(Number(await page.evaluate(() => document.body.dataset['drilldownMs'])));
      await page.goBack();
    }
    const out = { vms: VMS, hosts: HOSTS, alerts: ALERTS, fleetFirstPaintMs: stats(paints), firstContentfulPaintMs: stats(fcps), alertDrillDownMs: stats(drill) };
    console.log(`BENCH ${JSON.stringify(out)}`);
    await ctx.close();
  }, 300_000);
});
