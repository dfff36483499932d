/**
 * The dashboard in a real browser against a running fleet (2 hosts × 2 VMs, real agents, simulator and
 * analysis): the token prompt, VMs appear, a blocked attack's alert arrives live and its evidence opens,
 * the same by keyboard only (Tab and Enter), a VM's live charts, an exception from the alert, policies.
 * Screenshots go to docs/screenshots/.
 */
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Browser, BrowserContext, Page } from 'playwright-core';
import { loadScenario, runScenario, shippedScenarioFiles } from '@periscope/simulator';
import { fleetProtected, launchChromium, SCREENSHOTS, startFleet, until, type Fleet } from './support.js';

const TOKEN = 'dashboard-test-token';

describe('dashboard against a running fleet', () => {
  let fleet: Fleet;
  let browser: Browser;
  let ctx: BrowserContext;
  let page: Page;
  let alertId = '';

  beforeAll(async () => {
    mkdirSync(SCREENSHOTS, { recursive: true });
    [browser, fleet] = await Promise.all([launchChromium(), startFleet({ hosts: 2, vmsPerHost: 2, activity: 5, apiToken: TOKEN })]);
    ctx = await browser.newContext({ viewport: { width: 1280, height: 860 }, deviceScaleFactor: 1 });
    page = await ctx.newPage();
  }, 180_000);

  afterAll(async () => {
    await browser?.close();
    await fleet?.stop();
  });

  const shot = (p: Page, name: string) => p.screenshot({ path: join(SCREENSHOTS, `${name}.png`) });

  it('asks for the API token when the API answers 401, then shows the fleet: hosts and their VMs appear', async () => {
    await page.goto(fleet.base + '/');
    await page.getByRole('heading', { name: 'API token required' }).waitFor();
    await page.getByLabel('API token').fill(TOKEN);
    await page.getByRole('button', { name: 'Use token' }).click();
    await page.getByRole('heading', { name: 'Fleet' }).waitFor();
    await until(async () => (await page.locator('tr.vm-row').count()) === 4, 60_000, '4 VM rows');
    expect(await page.getByTestId('hosts-connected').textContent()).toBe('2/2');
    await fleetProtected(fleet);
    await page.reload();
    await until(async () => (await page.locator('.prot-protected').count()) >= 4, 15_000, 'protected badges');
    expect(await page.locator('table[aria-label="VMs on host-1"] tr.vm-row').count()).toBe(2);
    await shot(page, 'fleet');
  });

  it('a blocked attack\'s alert appears live on the alert timeline and its evidence opens', async () => {
    await page.getByRole('link', { name: 'Alerts' }).click();
    await page.getByRole('heading', { name: 'Alerts' }).waitFor();
    await until(async () => (await page.locator('#live').textContent())?.includes('live') ?? false, 10_000, 'stream live');
    const vm = fleet.hosts[0]!.sim.vms[0]!;
    const file = shippedScenarioFiles().find((f) => f.endsWith('attack-lstar-hijack.yaml'))!;
    const report = await runScenario(vm, await loadScenario(file));
    expect(report.expectations.filter((e) => !e.ok)).toEqual([]);
    // No reload: the row arrives over the stream.
    const row = page.locator('tr.alert-row', { hasText: 'Blocked' }).filter({ hasText: vm.name }).first();
    await row.waitFor({ timeout: 20_000 });
    alertId = (await row.getAttribute('data-alert-id'))!;
    expect(await row.textContent()).toContain('syscall-msrs');
    await shot(page, 'alerts');
    await row.click();
    await page.waitForURL(`**/alerts/${alertId}`);
    await page.getByRole('heading', { name: /Blocked/ }).waitFor();
    const verdict = await page.getByTestId('verdict').textContent();
    expect(verdict).toContain('fleet-default/syscall-msrs/entry');
    expect(verdict).toMatch(/action\s*deny/);
    expect(verdict).toMatch(/tier\s*local/);
    expect(await page.getByTestId('old-new').textContent()).toMatch(/LSTAR old 0x[0-9a-f]+ → new 0x[0-9a-f]+/i);
    expect(await page.getByTestId('registers').textContent()).toMatch(/rip\s*0x[0-9a-f]+/);
    await page.getByTestId('instruction').waitFor();
    await shot(page, 'alert-evidence');
  });

  it('keyboard only: Tab and Enter reach the alert and open its evidence, with a visible focus', async () => {
    const kb = await ctx.newPage();
    await kb.goto(fleet.base + '/');
    await kb.getByRole('heading', { name: 'Fleet' }).waitFor();
    await kb.locator('tr.vm-row').first().waitFor();
    const active = () => kb.evaluate(() => {
      const el = document.activeElement as HTMLElement | null;
      return { tag: el?.tagName ?? '', text: (el?.textContent ?? '').trim().slice(0, 60), cls: el?.className ?? '', id: el?.dataset['alertId'] ?? '', outline: el ? getComputedStyle(el).outlineStyle : '' };
    });
    const tabTo = async (pred: (a: Awaited<ReturnType<typeof active>>) => boolean, what: string, max = 40) => {
      for (let i = 0; i < max; i++) {
        await kb.keyboard.press('Tab');
        const a = await active();
        if (pred(a)) return a;
      }
      throw new Error(`Tab never reached ${what}`);
    };
    await tabTo((a) => a.tag === 'A' && a.text === 'Alerts', 'the Alerts link');
    await kb.keyboard.press('Enter');
    await kb.getByRole('heading', { name: 'Alerts' }).waitFor();
    await kb.locator('tr.alert-row').first().waitFor();
    const focused = await tabTo((a) => a.tag === 'TR' && a.cls.includes('alert-row') && a.id === alertId, 'the attack\'s alert row');
    expect(focused.outline).not.toBe('none');
    await shot(kb, 'keyboard-focus');
    await kb.keyboard.press('Enter');
    await kb.waitForURL(`**/alerts/${alertId}`);
    await kb.getByTestId('old-new').waitFor();
    expect(await kb.getByTestId('verdict').textContent()).toContain('syscall-msrs');
    await kb.close();
  });

  it('a VM page shows live event-rate and vCPU-stall charts and verdicts by tier', async () => {
    const vm = fleet.hosts[0]!.sim.vms[0]!;
    await page.goto(`${fleet.base}/vms/${vm.uuidText}`);
    await page.getByRole('heading', { name: new RegExp(vm.name) }).waitFor();
    // More attacks on this VM while the page samples: reported events and verdicts move the charts.
    const files = shippedScenarioFiles().filter((f) => /attack-(cr4-smep-smap-clear|idt-replacement|lstar-hijack)\.yaml$/.test(f));
    for (let i = 0; i < 2; i++) for (const f of files) await runScenario(vm, await loadScenario(f));
    await until(async () => /[1-9][\d.]* events\/s/.test((await page.getByTestId('event-rate').textContent()) ?? ''), 15_000, 'a non-zero event rate');
    await until(async () => /mean .* max/.test((await page.getByTestId('stall').textContent()) ?? ''), 15_000, 'stall');
    await until(async () => (await page.locator('svg[aria-label^="KVMI events per second"] path.line').count()) === 1, 15_000, 'rate line');
    expect(await page.locator('svg[aria-label^="Verdicts by tier"]').getAttribute('aria-label')).toMatch(/local rule \d+/);
    await shot(page, 'vm');
  });

  it('an exception is created from the alert and listed; policies show the fleet policy', async () => {
    await page.goto(`${fleet.base}/alerts/${alertId}`);
    await page.getByLabel('Reason').fill('known kernel self-patching (test)');
    await page.getByRole('button', { name: 'Create exception from this alert' }).click();
    await page.locator('#respond-result', { hasText: 'created for fleet-default/syscall-msrs/entry' }).waitFor();
    await page.getByRole('link', { name: 'Exceptions' }).click();
    await page.getByRole('table', { name: 'Exceptions' }).locator('tr', { hasText: 'known kernel self-patching (test)' }).waitFor();
    await shot(page, 'exceptions');
    await page.getByRole('link', { name: 'Policies' }).click();
    const row = page.locator('tr[data-href="/policies/fleet-default"]');
    await row.waitFor();
    await row.focus();
    await page.keyboard.press('Enter');
    await page.locator('pre.doc', { hasText: 'format: periscope.policy/v1' }).waitFor();
    await shot(page, 'policies');
  });
});
