/** Analysis serves the built dashboard: content types, index.html for client routes, no escape, API untouched. */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Analysis } from '@periscope/analysis';
import { DASHBOARD_DIST } from './support.js';
import { existsSync, readdirSync } from 'node:fs';
import { join } from 'node:path';

describe('static dashboard files', () => {
  let a: Analysis;
  let base = '';
  beforeAll(async () => {
    expect(existsSync(join(DASHBOARD_DIST, 'index.html')), 'build the dashboard first (nx build)').toBe(true);
    a = await Analysis.start({ db: 'pglite:memory', grpcListen: '127.0.0.1:0', httpListen: '127.0.0.1:0', dashboardDir: DASHBOARD_DIST, apiToken: 'tok' });
    base = `http://${a.httpAddress}`;
  });
  afterAll(async () => a?.stop());

  it('serves index.html at / and for client routes, assets with their types, and keeps the API behind the token', async () => {
    for (const p of ['/', '/alerts', '/vms/some-vm', '/alerts/abc']) {
      const r = await fetch(base + p);
      expect(r.status, p).toBe(200);
      expect(r.headers.get('content-type')).toBe('text/html; charset=utf-8');
      expect(await r.text()).toContain('<title>Periscope</title>');
    }
    const assets = readdirSync(join(DASHBOARD_DIST, 'assets'));
    const js = assets.find((f) => f.endsWith('.js'))!;
    const css = assets.find((f) => f.endsWith('.css'))!;
    const rj = await fetch(`${base}/assets/${js}`);
    expect(rj.headers.get('content-type')).toBe('text/javascript; charset=utf-8');
    expect(rj.headers.get('cache-control')).toContain('immutable');
    expect((await fetch(`${base}/assets/${css}`)).headers.get('content-type')).toBe('text/css; charset=utf-8');
    expect((await fetch(`${base}/assets/missing.js`)).status).toBe(401); // not a file: falls through to the API (token first)
    expect((await fetch(`${base}/v1/vms`)).status).toBe(401);
    expect((await fetch(`${base}/v1/vms`, { headers: { authorization: 'Bearer tok' } })).status).toBe(200);
    expect((await fetch(`${base}/healthz`)).status).toBe(200);
    const head = await fetch(base + '/', { method: 'HEAD' });
    expect(head.status).toBe(200);
  });

  it('no path leaves the dashboard directory', async () => {
    for (const p of ['/..%2f..%2fpackage.json', '/%2e%2e/%2e%2e/package.json', '/assets/..%2f..%2f..%2fpackage.json']) {
      const r = await fetch(base + p);
      expect(await r.text(), p).not.toContain('"name": "@periscope/dashboard"');
    }
  });
});
