/** One VM: identity, protection modules, live event-rate and vCPU-stall charts, verdicts by tier, alerts, events. */
import { api, ApiError, type VmDetail } from './api.js';
import { barChart, lineChart, type Point } from './charts.js';
import { fmtDuration, fmtNum, fmtTimeNs, html, rerender, setHtml } from './dom.js';
import { alerts, hekiOf, protectionOf } from './state.js';

const TIER_NAMES: Record<string, string> = { local: 'local rule', central: 'central (analysis)', default: 'default', unknown: 'unknown' };

export function vmView(main: HTMLElement, id: string): () => void {
  const rate: Point[] = [];
  const stall: Point[] = [];
  const perVcpu = new Map<number, number>();
  let prev: { t: number; events: number; vcpus: Map<number, number>; verdicts: number; totalNs: number } | undefined;
  let stopped = false;
  let rendered = false;
  setHtml(main, html`<h1 tabindex="-1">VM ${id}</h1><p class="muted">Loading…</p>`);

  const render = (d: VmDetail) => {
    const v = d.vm;
    const p = protectionOf(v.protection);
    const heki = hekiOf(v);
    const byTier = new Map<string, number>();
    const byAction = new Map<string, number>();
    for (const r of d.counters.verdicts) {
      byTier.set(r.tier, (byTier.get(r.tier) ?? 0) + Number(r.count));
      byAction.set(r.action, (byAction.get(r.action) ?? 0) + Number(r.count));
    }
    const vmAlerts = alerts.list().filter((a) => a.vm.uuid === v.uuid).slice(0, 20);
    const lastRate = rate.length ? rate[rate.length - 1]!.v : undefined;
    const meanStall = d.stall && d.stall.verdicts ? d.stall.totalNs / d.stall.verdicts : undefined;
    rerender(main, html`
      <p class="crumbs"><a href="/">Fleet</a> › ${v.hostId}</p>
      <h1 tabindex="-1">${v.name || v.uuid} <span class="badge prot-${p.status}">${p.status}</span> ${v.attached ? html`<span class="badge ok">attached</span>` : html`<span class="badge muted">detached</span>`}</h1>
      <dl class="facts">
        <dt>UUID</dt><dd><code>${v.uuid}</code></dd><dt>host</dt><dd>${v.hostId}</dd><dt>vCPUs</dt><dd>${v.vcpuCount}</dd>
        <dt>policy</dt><dd>${v.policyName || '—'}</dd><dt>attached</dt><dd>${fmtTimeNs(v.attachedNs)}</dd><dt>last seen</dt><dd>${fmtTimeNs(v.lastSeenNs)}</dd>
        <dt>labels</dt><dd>${Object.entries(v.labels).map(([k, x]) => html`<span class="badge">${k}=${x}</span> `)}${Object.keys(v.labels).length ? '' : '—'}</dd>
        <dt>kernel</dt><dd>${v.derived ? `${String(v.derived['profile'] ?? '')} · text ${String(v.derived['textBase'] ?? '')} · slide ${String(v.derived['slide'] ?? '')}` : '—'}</dd>
        <dt>Heki</dt><dd>${heki || html`<span class="muted">not reported</span>`}</dd>
      </dl>
      <section aria-labelledby="prot-h"><h2 id="prot-h">Protection modules</h2>
        <table class="grid"><thead><tr><th scope="col">module</th><th scope="col">state</th></tr></thead><tbody>
        ${Object.entries(v.protection).map(([k, x]) => html`<tr><td>${k}</td><td>${x}</td></tr>`)}
        ${Object.keys(v.protection).length ? '' : html`<tr><td colspan="2" class="muted">no module applies to this VM</td></tr>`}
        </tbody></table></section>
      <div class="two">
        <section aria-labelledby="rate-h"><h2 id="rate-h">Reported event rate <span class="muted small" data-testid="event-rate">${lastRate === undefined ? '' : `${lastRate.toFixed(1)} events/s`}</span></h2>
          ${lineChart(rate, { label: 'KVMI events per second', fmt: (x) => `${x.toFixed(x < 10 ? 1 : 0)}/s`, colour: '#5aa9ff' })}
          <p class="muted small">KVMI events the host agent reported to analysis (the rules that report, held and detected events), per second.</p>
          <p class="small">${[...perVcpu].map(([c, r]) => html`<span class="badge">vCPU ${c}: ${r.toFixed(1)}/s</span> `)}</p></section>
        <section aria-labelledby="stall-h"><h2 id="stall-h">vCPU stall <span class="muted small" data-testid="stall">${meanStall === undefined ? '' : `mean ${fmtDuration(meanStall)} · max ${fmtDuration(d.stall!.maxNs)} over ${fmtNum(d.stall!.verdicts)} verdicts`}</span></h2>
          ${lineChart(stall, { label: 'mean vCPU stall per second (event read to reply written)', fmt: fmtDuration, colour: '#f0a030' })}
          <p class="muted small">Time a vCPU waited for its verdict, as the host agent measured it.</p></section>
      </div>
      <div class="two">
        <section aria-labelledby="tier-h"><h2 id="tier-h">Verdicts by tier</h2>
          ${barChart([...byTier].sort((a, b) => b[1] - a[1]).map(([k, x]) => ({ label: TIER_NAMES[k] ?? k, value: x, cls: `tier-${k}` })), { label: 'Verdicts by tier' })}</section>
        <section aria-labelledby="act-h"><h2 id="act-h">Verdicts by action</h2>
          ${barChart([...byAction].sort((a, b) => b[1] - a[1]).map(([k, x]) => ({ label: k, value: x })), { label: 'Verdicts by action' })}</section>
      </div>
      <section aria-labelledby="va-h"><h2 id="va-h">Alerts on this VM</h2>
        ${vmAlerts.length ? html`<table class="grid"><thead><tr><th scope="col">last seen</th><th scope="col">severity</th><th scope="col">alert</th><th scope="col">action</th><th scope="col">count</th></tr></thead><tbody>
          ${vmAlerts.map((a) => html`<tr class="alert-row" tabindex="0" data-key="alert:${a.id}" data-href="/alerts/${a.id}" aria-label="${a.severity} alert: ${a.title}. Enter opens its evidence."><td>${new Date(a.lastSeen).toLocaleTimeString(undefined, { hour12: false })}</td><td><span class="badge sev-${a.severity}">${a.severity}</span></td><td>${a.title}</td><td>${a.action}</td><td>${a.count}</td></tr>`)}
          </tbody></table>` : html`<p class="muted">none</p>`}</section>
      <div class="two">
        <section aria-labelledby="ev-h"><h2 id="ev-h">Recent events</h2>
          <table class="grid small"><thead><tr><th scope="col">seq</th><th scope="col">vCPU</th><th scope="col">kind</th><th scope="col">RIP</th><th scope="col">rule</th><th scope="col">detail</th></tr></thead><tbody>
          ${d.recentEvents.slice(-15).reverse().map((e) => html`<tr><td>${e.seq}</td><td>${e.vcpu}</td><td>${e.kind}</td><td><code>${e.rip}</code></td><td>${e.ruleId || '—'}</td><td><code>${Object.entries(e.detail).map(([k, x]) => `${k}=${String(x)}`).join(' ')}</code></td></tr>`)}
          </tbody></table></section>
        <section aria-labelledby="cmd-h"><h2 id="cmd-h">Commands</h2>
          <table class="grid small"><thead><tr><th scope="col">kind</th><th scope="col">purpose</th><th scope="col">status</th></tr></thead><tbody>
          ${d.commands.slice(0, 12).map((c) => html`<tr><td>${String(c['kind'] ?? '')}</td><td>${String(c['purpose'] ?? '')}</td><td>${String(c['status'] ?? '')}</td></tr>`)}
          </tbody></table></section>
      </div>`);
    if (!rendered) {
      rendered = true;
      main.querySelector<HTMLElement>('h1')?.focus({ preventScroll: true });
    }
  };

  const poll = async () => {
    try {
      const d = await api<VmDetail>(`/v1/vms/${encodeURIComponent(id)}`);
      if (stopped) return;
      const t = Date.now();
      const vc = new Map(d.counters.vcpus.map((c) => [c.vcpu, Number(c.events)]));
      const events = [...vc.values()].reduce((a, b) => a + b, 0);
      const verdicts = d.stall?.verdicts ?? 0;
      const totalNs = d.stall?.totalNs ?? 0;
      if (prev && t > prev.t) {
        const dt = (t - prev.t) / 1000;
        rate.push({ t, v: Math.max(0, events - prev.events) / dt });
        for (const [c, n] of vc) perVcpu.set(c, Math.max(0, n - (prev.vcpus.get(c) ?? n)) / dt);
        const dv = verdicts - prev.verdicts;
        if (dv > 0) stall.push({ t, v: (totalNs - prev.totalNs) / dv });
        else stall.push({ t, v: 0 });
        while (rate.length > 240) rate.shift();
        while (stall.length > 240) stall.shift();
      }
      prev = { t, events, vcpus: vc, verdicts, totalNs };
      render(d);
    } catch (e) {
      if (!stopped && !rendered) setHtml(main, html`<h1 tabindex="-1">VM ${id}</h1><p class="error" role="alert">${e instanceof ApiError && e.status === 404 ? `No VM ${id}.` : `Could not load the VM: ${(e as Error).message}`}</p>`);
    }
  };
  void poll();
  const timer = window.setInterval(() => void poll(), 1000);
  return () => {
    stopped = true;
    window.clearInterval(timer);
  };
}
