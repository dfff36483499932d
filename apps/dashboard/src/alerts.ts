/** The alert timeline (live) and one alert's drill-down to its evidence, with ack and "except this". */
import { api, ApiError, type Alert } from './api.js';
import { esc, fmtAgo, html, raw, rerender, setHtml, type Raw } from './dom.js';
import { alerts, SEVERITIES, severityRank, toast } from './state.js';

const SEV_COLOUR: Record<string, string> = { critical: '#ff4d6d', high: '#ff8c42', medium: '#ffd166', low: '#8ecae6', info: '#adb5bd' };

/** Dots on a time axis (last 30 minutes), one per alert, coloured by severity. */
function timeline(list: readonly Alert[]): Raw {
  const w = 1200;
  const h = 70;
  const span = 30 * 60_000;
  const now = Date.now();
  const x = (t: number) => 10 + ((t - (now - span)) / span) * (w - 20);
  const recent = list.filter((a) => Date.parse(a.lastSeen) >= now - span);
  const rows = SEVERITIES.length;
  const summary = `Alert timeline, last 30 minutes: ${recent.length} alerts`;
  return html`<svg class="chart timeline" viewBox="0 0 ${w} ${h}" role="img" aria-label="${summary}"><title>${summary}</title>
    <line class="axis" x1="10" y1="${h - 14}" x2="${w - 10}" y2="${h - 14}"></line>
    ${[0, 10, 20, 30].map((m) => raw(`<text class="tick" x="${x(now - m * 60_000).toFixed(0)}" y="${h - 2}" text-anchor="${m === 0 ? 'end' : m === 30 ? 'start' : 'middle'}">${m ? `-${m} min` : 'now'}</text>`))}
    ${recent.map((a) => raw(`<circle cx="${x(Date.parse(a.lastSeen)).toFixed(1)}" cy="${(6 + (SEVERITIES.indexOf(a.severity) / rows) * (h - 26)).toFixed(1)}" r="4" fill="${SEV_COLOUR[a.severity]}"><title>${esc(a.title)}</title></circle>`))}
  </svg>`;
}

export function alertsView(main: HTMLElement): () => void {
  let minSev = '';
  let state = '';
  let text = '';
  const render = () => {
    const q = text.toLowerCase();
    const list = alerts.list().filter((a) => (!minSev || severityRank(a.severity) >= severityRank(minSev as Alert['severity'])) && (!state || a.state === state) && (!q || `${a.title} ${a.vm.name} ${a.hostId} ${a.ruleId} ${a.technique.id}`.toLowerCase().includes(q)));
    rerender(main, html`
      <h1 tabindex="-1">Alerts</h1>
      <form class="filters" aria-label="Filter alerts" data-key="filters">
        <label>Minimum severity <select id="f-sev" data-key="f-sev"><option value="">any</option>${SEVERITIES.map((s) => html`<option value="${s}" ${minSev === s ? raw('selected') : ''}>${s}</option>`)}</select></label>
        <label>State <select id="f-state" data-key="f-state"><option value="">any</option>${['open', 'acknowledged', 'resolved'].map((s) => html`<option value="${s}" ${state === s ? raw('selected') : ''}>${s}</option>`)}</select></label>
        <label>Search <input id="f-text" data-key="f-text" type="search" value="${text}" placeholder="title, VM, host, rule, technique"></label>
      </form>
      ${timeline(list)}
      <p class="muted small" aria-live="polite">${list.length} alerts shown · newest first · live${alerts.nextCursor ? '' : ''}</p>
      <table class="grid alerts" aria-label="Alerts, newest first">
        <thead><tr><th scope="col">last seen</th><th scope="col">severity</th><th scope="col">alert</th><th scope="col">VM</th><th scope="col">host</th><th scope="col">rule</th><th scope="col">action</th><th scope="col">tier</th><th scope="col">count</th><th scope="col">state</th></tr></thead>
        <tbody>${list.slice(0, 500).map((a) => html`<tr class="alert-row ${alerts.fresh.has(a.id) ? 'fresh' : ''}" tabindex="0" data-key="alert:${a.id}" data-href="/alerts/${a.id}" data-alert-id="${a.id}" aria-label="${a.severity} alert: ${a.title}, ${a.action}, ${a.tier} tier. Enter opens its evidence.">
          <td title="${a.lastSeen}">${new Date(a.lastSeen).toLocaleTimeString(undefined, { hour12: false })} <span class="muted small">${fmtAgo(a.lastSeen)}</span></td>
          <td><span class="badge sev-${a.severity}">${a.severity}</span></td><td>${a.title}</td><td>${a.vm.name || a.vm.uuid}</td><td>${a.hostId}</td>
          <td><code>${a.module}/${a.ruleId.split('/').slice(2).join('/')}</code></td><td>${a.action}</td><td>${a.tier}</td><td>${a.count}</td><td>${a.state}</td></tr>`)}
        </tbody></table>
      ${alerts.nextCursor ? html`<p><button type="button" id="older" data-key="older">Load older alerts</button></p>` : ''}`);
    const sev = main.querySelector<HTMLSelectElement>('#f-sev')!;
    const st = main.querySelector<HTMLSelectElement>('#f-state')!;
    const tx = main.querySelector<HTMLInputElement>('#f-text')!;
    sev.addEventListener('change', () => ((minSev = sev.value), render()));
    st.addEventListener('change', () => ((state = st.value), render()));
    tx.addEventListener('input', () => ((text = tx.value), render()));
    main.querySelector('form')!.addEventListener('submit', (e) => e.preventDefault());
    main.querySelector('#older')?.addEventListener('click', () => void alerts.loadOlder().then(render));
  };
  setHtml(main, html`<h1 tabindex="-1">Alerts</h1><p class="muted">Loading…</p>`);
  let stopped = false;
  void (alerts.loaded ? Promise.resolve() : alerts.load()).then(
    () => !stopped && render(),
    (e: unknown) => !stopped && setHtml(main, html`<h1 tabindex="-1">Alerts</h1><p class="error" role="alert">Could not load alerts: ${(e as Error).message}</p>`),
  );
  const off = alerts.onBatched(() => alerts.loaded && render());
  const timer = window.setInterval(() => alerts.loaded && render(), 15_000);
  return () => {
    stopped = true;
    off();
    window.clearInterval(timer);
  };
}

const FIRST = ['event', 'register', 'descriptor', 'old', 'new', 'rip', 'gva', 'gpa', 'access', 'rsp', 'rbp', 'rax', 'rbx', 'rcx', 'rdx', 'rsi', 'rdi', 'rflags'];
const order = (k: string) => (FIRST.includes(k) ? FIRST.indexOf(k) : FIRST.length);

function kv(o: Record<string, unknown>, testid: string): Raw {
  const entries = Object.entries(o).filter(([, v]) => v !== undefined && v !== '').sort((a, b) => order(a[0]) - order(b[0]) || a[0].localeCompare(b[0], 'en', { numeric: true }));
  if (!entries.length) return html`<p class="muted">none recorded</p>`;
  return html`<table class="grid kv" data-testid="${testid}"><tbody>${entries.map(([k, v]) => html`<tr><th scope="row">${k}</th><td><code>${typeof v === 'object' ? JSON.stringify(v) : String(v)}</code></td></tr>`)}</tbody></table>`;
}

export function alertView(main: HTMLElement, id: string, t0: number): () => void {
  let stopped = false;
  setHtml(main, html`<h1 tabindex="-1">Alert</h1><p class="muted">Loading…</p>`);
  const render = (a: Alert, fresh: boolean) => {
    const at = a.evidence.attempt;
    const insn = at['instruction'] as { bytes?: string; text?: string } | undefined;
    const { instruction: _i, ...attempt } = at;
    void _i;
    const change = at['old'] !== undefined || at['new'] !== undefined;
    rerender(main, html`
      <p class="crumbs"><a href="/alerts">Alerts</a> › ${a.id}</p>
      <h1 tabindex="-1" id="alert-title"><span class="badge sev-${a.severity}">${a.severity}</span> ${a.title}</h1>
      <p>${a.description}</p>
      <div class="two">
      <section aria-labelledby="what-h"><h2 id="what-h">Verdict</h2>
        <dl class="facts" data-testid="verdict">
          <dt>rule</dt><dd><code>${a.ruleId}</code></dd>
          <dt>action</dt><dd><b>${a.action}</b></dd>
          <dt>tier</dt><dd>${a.tier}</dd>
          <dt>module</dt><dd>${a.module}</dd>
          <dt>technique</dt><dd>${a.technique.id ? `${a.technique.id} ${a.technique.name}` : '—'}</dd>
          <dt>policy</dt><dd>${a.policy.name} v${a.policy.version} (${a.policy.localId})</dd>
          <dt>VM</dt><dd><a href="/vms/${encodeURIComponent(a.vm.uuid)}">${a.vm.name || a.vm.uuid}</a> on ${a.hostId}${a.vcpu !== null ? `, vCPU ${a.vcpu}` : ''}</dd>
          <dt>seen</dt><dd>${a.count}× · first ${new Date(a.firstSeen).toLocaleString(undefined, { hour12: false })} · last ${new Date(a.lastSeen).toLocaleString(undefined, { hour12: false })}</dd>
          <dt>state</dt><dd>${a.state}${a.acknowledgedBy ? ` by ${a.acknowledgedBy}${a.ackComment ? `: ${a.ackComment}` : ''}` : ''}</dd>
          ${a.exceptionId ? html`<dt>exception</dt><dd>${a.exceptionId}</dd>` : ''}
        </dl></section>
      <section aria-labelledby="att-h" id="evidence"><h2 id="att-h">Evidence: the attempt</h2>
        ${change ? html`<p class="change" data-testid="old-new"><code>${String(at['register'] ?? at['xcr'] ?? '')}</code> old <code>${String(at['old'] ?? '—')}</code> → new <code>${String(at['new'] ?? '—')}</code></p>` : ''}
        ${kv(attempt, 'attempt')}
        <h3>Decoded instruction</h3>
        ${insn && (insn.text || insn.bytes) ? html`<p data-testid="instruction"><code>${insn.text || '(not decoded)'}</code> <span class="muted">bytes</span> <code>${insn.bytes || '—'}</code></p>` : html`<p class="muted" data-testid="instruction">not captured by the agent for this event</p>`}
        ${a.evidence.summary && a.evidence.summary !== a.description ? html`<p>${a.evidence.summary}</p>` : ''}
      </section>
      </div>
      <div class="two">
        <section aria-labelledby="reg-h"><h2 id="reg-h">Registers</h2>${kv(a.evidence.registers, 'registers')}</section>
        <section aria-labelledby="sreg-h"><h2 id="sreg-h">Special registers</h2>${kv(a.evidence.sregs, 'sregs')}
          <h3>Attributes</h3>${kv(a.evidence.attributes, 'attributes')}
          <p class="muted small">session ${a.evidence.session} · event seqs ${a.evidence.seqs.join(', ')}</p></section>
      </div>
      <section aria-labelledby="act-h"><h2 id="act-h">Respond</h2>
        <form id="ack" class="inline"><label>Comment <input name="comment" data-key="ack-comment" placeholder="why"></label>
          <button type="submit" data-key="ack-btn" ${a.state !== 'open' ? raw('disabled') : ''}>Acknowledge</button></form>
        <form id="except" class="inline"><label>Reason <input name="reason" data-key="exc-reason" placeholder="why this is legitimate"></label>
          <label><input type="checkbox" name="anyVm" data-key="exc-any"> on any VM</label>
          <button type="submit" data-key="exc-btn">Create exception from this alert</button></form>
        <p id="respond-result" role="status" aria-live="polite"></p>
      </section>`);
    main.querySelector<HTMLFormElement>('#ack')!.addEventListener('submit', (e) => {
      e.preventDefault();
      const comment = (new FormData(e.target as HTMLFormElement).get('comment') as string) ?? '';
      void api<{ alert: Alert }>(`/v1/alerts/${encodeURIComponent(a.id)}/ack`, { method: 'POST', body: JSON.stringify({ comment, by: 'dashboard' }) }).then(
        (r) => (alerts.upsert(r.alert), render(r.alert, false), toast('Alert acknowledged')),
        (err: unknown) => toast(`Acknowledge failed: ${(err as Error).message}`),
      );
    });
    main.querySelector<HTMLFormElement>('#except')!.addEventListener('submit', (e) => {
      e.preventDefault();
      const f = new FormData(e.target as HTMLFormElement);
      void api<{ exception: { id: string; policy: string; module: string; rule: string } }>('/v1/exceptions', { method: 'POST', body: JSON.stringify({ fromAlert: a.id, reason: (f.get('reason') as string) || `from alert ${a.id}`, anyVm: f.get('anyVm') === 'on', by: 'dashboard' }) }).then(
        (r) => {
          const out = main.querySelector('#respond-result');
          if (out) setHtml(out, html`Exception <a href="/exceptions" data-key="exc-link">${r.exception.id}</a> created for ${r.exception.policy}/${r.exception.module}/${r.exception.rule}; the agents get it with their next local policy.`);
        },
        (err: unknown) => toast(`Exception failed: ${(err as Error).message}`),
      );
    });
    if (fresh) {
      main.querySelector<HTMLElement>('h1')?.focus({ preventScroll: true });
      requestAnimationFrame(() => setTimeout(() => {
        performance.measure('alert-drilldown', { start: t0, end: performance.now() });
        document.body.dataset['drilldownMs'] = String(performance.now() - t0);
      }));
    }
  };
  const cached = alerts.byId.get(id);
  void api<{ alert: Alert }>(`/v1/alerts/${encodeURIComponent(id)}`).then(
    (r) => {
      if (stopped) return;
      alerts.upsert(r.alert);
      render(r.alert, true);
    },
    (e: unknown) => {
      if (stopped) return;
      if (cached) return render(cached, true);
      setHtml(main, html`<h1 tabindex="-1">Alert</h1><p class="error" role="alert">${e instanceof ApiError && e.status === 404 ? `No alert ${id}.` : `Could not load the alert: ${(e as Error).message}`}</p>`);
    },
  );
  const off = alerts.on((x) => {
    if (x.id === id) render(x, false);
  });
  return () => {
    stopped = true;
    off();
  };
}
