/** Fleet overview: hosts → VMs with protection status and Heki coverage; alert and verdict summaries. */
import { allVms, api, type Host, type Vm } from './api.js';
import { barChart } from './charts.js';
import { fmtNum, fmtTimeNs, html, rerender, setHtml } from './dom.js';
import { alerts, hekiOf, protectionOf, SEVERITIES } from './state.js';

export function fleetView(main: HTMLElement): () => void {
  let hosts: Host[] = [];
  let vms: Vm[] = [];
  let filter = '';
  let first = true;
  setHtml(main, html`<h1 tabindex="-1">Fleet</h1><p class="muted" id="fleet-loading">Loading hosts and VMs…</p>`);

  const render = () => {
    const openByVm = new Map<string, number>();
    const sevCount = new Map<string, number>();
    const tierCount = new Map<string, number>();
    for (const a of alerts.byId.values()) {
      if (a.state === 'open') openByVm.set(a.vm.uuid, (openByVm.get(a.vm.uuid) ?? 0) + 1);
      sevCount.set(a.severity, (sevCount.get(a.severity) ?? 0) + 1);
      const k = `${a.tier} · ${a.action}`;
      tierCount.set(k, (tierCount.get(k) ?? 0) + Number(a.count));
    }
    const attached = vms.filter((v) => v.attached);
    const prot = attached.map((v) => protectionOf(v.protection).status);
    const q = filter.toLowerCase();
    const shown = q ? vms.filter((v) => v.name.toLowerCase().includes(q) || v.hostId.toLowerCase().includes(q) || v.uuid.includes(q) || v.policyName.toLowerCase().includes(q)) : vms;
    const byHost = new Map<string, Vm[]>();
    for (const h of hosts) byHost.set(h.hostId, []);
    for (const v of shown) {
      const l = byHost.get(v.hostId) ?? [];
      l.push(v);
      byHost.set(v.hostId, l);
    }
    const hostRec = new Map(hosts.map((h) => [h.hostId, h]));
    rerender(main, html`
      <h1 tabindex="-1">Fleet</h1>
      <section class="cards" aria-label="Fleet summary">
        <div class="card"><span class="big" data-testid="hosts-connected">${hosts.filter((h) => h.connected).length}/${hosts.length}</span><span>host agents connected</span></div>
        <div class="card"><span class="big" data-testid="vms-attached">${attached.length}/${vms.length}</span><span>VMs attached</span></div>
        <div class="card"><span class="big ok">${prot.filter((s) => s === 'protected').length}</span><span>protected${prot.some((s) => s === 'pending') ? html` · ${prot.filter((s) => s === 'pending').length} pending` : ''}${prot.some((s) => s === 'failed') ? html` · <b class="bad">${prot.filter((s) => s === 'failed').length} failed</b>` : ''}</span></div>
        <div class="card"><span class="big">${fmtNum([...openByVm.values()].reduce((a, b) => a + b, 0))}</span><span>open alerts${alerts.nextCursor ? ' (newest 500 loaded)' : ''}</span></div>
      </section>
      <div class="two">
        <section aria-labelledby="sev-h"><h2 id="sev-h">Alerts by severity</h2>
          ${barChart(SEVERITIES.map((s) => ({ label: s, value: sevCount.get(s) ?? 0, cls: `sev-${s}` })), { label: 'Alerts by severity' })}</section>
        <section aria-labelledby="tier-h"><h2 id="tier-h">Detections by verdict tier and action</h2>
          ${barChart([...tierCount].sort((a, b) => b[1] - a[1]).map(([label, value]) => ({ label, value })), { label: 'Detections by verdict tier and action' })}
          <p class="muted small">Every verdict of a VM, by tier (local rule, central, default), is on its VM page.</p></section>
      </div>
      <h2>Hosts and VMs</h2>
      <label class="filter">Filter <input id="fleet-filter" type="search" placeholder="VM, host, UUID or policy" value="${filter}" aria-controls="fleet-tables"></label>
      <div id="fleet-tables">
      ${[...byHost].map(([hostId, list]) => {
        const h = hostRec.get(hostId);
        return html`<section class="host" aria-label="Host ${hostId}">
          <h3><span class="dot ${h?.connected ? 'up' : 'down'}" aria-hidden="true"></span>${hostId}
            <span class="muted small">${h ? (h.connected ? 'agent connected' : 'agent disconnected') : 'no agent record'} · ${list.filter((v) => v.attached).length}/${list.length} VMs attached${h?.policyVersion && h.policyVersion !== '0' ? ` · local policy v${h.policyVersion} ${h.policyState}` : ''}${h?.agentVersion ? ` · agent ${h.agentVersion}` : ''}</span></h3>
          ${list.length ? html`<table class="grid vms" aria-label="VMs on ${hostId}">
            <thead><tr><th scope="col">VM</th><th scope="col">state</th><th scope="col">vCPUs</th><th scope="col">policy</th><th scope="col">protection</th><th scope="col">Heki</th><th scope="col">open alerts</th><th scope="col">last seen</th></tr></thead>
            <tbody>${list.map((v) => {
              const p = protectionOf(v.protection);
              const heki = hekiOf(v);
              const open = openByVm.get(v.uuid) ?? 0;
              return html`<tr class="vm-row" tabindex="0" data-key="vm:${v.uuid}" data-href="/vms/${encodeURIComponent(v.uuid)}" aria-label="VM ${v.name}, ${v.attached ? 'attached' : 'detached'}, ${p.status}${open ? `, ${open} open alerts` : ''}. Enter opens it.">
                <td><a href="/vms/${encodeURIComponent(v.uuid)}" tabindex="-1">${v.name || v.uuid}</a></td>
                <td>${v.attached ? html`<span class="badge ok">attached</span>` : html`<span class="badge muted" title="${v.detachReason}">detached</span>`}</td>
                <td>${v.vcpuCount}</td><td>${v.policyName || '—'}</td>
                <td><span class="badge prot-${p.status}" title="${p.detail}">${p.status}</span></td>
                <td>${heki ? html`<span class="badge ok" title="${heki}">${heki}</span>` : html`<span class="muted">—</span>`}</td>
                <td>${open ? html`<span class="badge sev-high">${open}</span>` : '0'}</td>
                <td>${fmtTimeNs(v.lastSeenNs)}</td></tr>`;
            })}</tbody></table>` : html`<p class="muted">no VMs${q ? ' match the filter' : ''}</p>`}
        </section>`;
      })}
      </div>`);
    const input = main.querySelector<HTMLInputElement>('#fleet-filter')!;
    input.addEventListener('input', () => {
      filter = input.value;
      render();
      const again = main.querySelector<HTMLInputElement>('#fleet-filter')!;
      again.focus();
      again.setSelectionRange(again.value.length, again.value.length);
    });
    if (first) {
      first = false;
      // Painted: the frame after this render (rAF runs before the paint, the next task after it).
      requestAnimationFrame(() => setTimeout(() => {
        performance.mark('fleet-painted');
        document.body.dataset['fleetPainted'] = String(performance.now());
      }));
    }
  };

  let stopped = false;
  const load = async () => {
    const [h, v] = await Promise.all([api<{ hosts: Host[] }>('/v1/hosts'), allVms(), alerts.loaded ? Promise.resolve() : alerts.load().catch(() => undefined)]);
    if (stopped) return;
    hosts = h.hosts;
    vms = v;
    render();
  };
  const errorOut = (e: unknown) => {
    if (!stopped && first) setHtml(main, html`<h1 tabindex="-1">Fleet</h1><p class="error" role="alert">Could not load the fleet: ${(e as Error).message}</p>`);
  };
  void load().catch(errorOut);
  const timer = window.setInterval(() => void load().catch(() => undefined), 5000);
  const off = alerts.onBatched(() => {
    if (!first) render();
  }, 1000);
  return () => {
    stopped = true;
    window.clearInterval(timer);
    off();
  };
}
