/** Exceptions (list, create from an alert, delete) and policies (list, document and history, apply). */
import { api } from './api.js';
import { fmtTimeNs, html, rerender, setHtml } from './dom.js';
import { toast } from './state.js';

interface ExceptionJson {
  id: string;
  policy: string;
  module: string;
  rule: string;
  vms: string[];
  originator: Record<string, unknown>;
  victim: Record<string, unknown>;
  reason: string;
  createdBy: string;
  expiresNs: string;
  createdNs?: string;
}

const brief = (o: Record<string, unknown>) => Object.entries(o).map(([k, v]) => `${k} ${typeof v === 'object' && v ? Object.values(v as Record<string, unknown>).join('–') : String(v)}`).join(', ') || 'any';

export function exceptionsView(main: HTMLElement): () => void {
  let stopped = false;
  const load = async () => {
    const r = await api<{ exceptions: ExceptionJson[] }>('/v1/exceptions');
    if (stopped) return;
    rerender(main, html`
      <h1 tabindex="-1">Exceptions</h1>
      <p class="muted">An exception lets a rule's matching events through (no alert). The agents get it with their next local policy.</p>
      <form id="from-alert" class="inline" aria-label="Create an exception from an alert">
        <label>Alert ID <input name="alert" required data-key="fa-id" placeholder="alert id"></label>
        <label>Reason <input name="reason" data-key="fa-reason"></label>
        <label><input type="checkbox" name="anyVm" data-key="fa-any"> on any VM</label>
        <button type="submit" data-key="fa-btn">Create from alert</button>
      </form>
      <table class="grid" aria-label="Exceptions"><thead><tr><th scope="col">id</th><th scope="col">rule</th><th scope="col">VMs</th><th scope="col">originator</th><th scope="col">victim</th><th scope="col">reason</th><th scope="col">by</th><th scope="col">expires</th><th scope="col"><span class="sr-only">delete</span></th></tr></thead>
      <tbody>${r.exceptions.map((e) => html`<tr><td><code>${e.id}</code></td><td><code>${e.policy}/${e.module}/${e.rule}</code></td><td>${e.vms.length ? e.vms.join(', ') : 'any'}</td><td><code>${brief(e.originator)}</code></td><td><code>${brief(e.victim)}</code></td><td>${e.reason}</td><td>${e.createdBy}</td><td>${e.expiresNs === '0' ? 'never' : fmtTimeNs(e.expiresNs)}</td>
        <td><button type="button" class="del" data-id="${e.id}" data-key="del:${e.id}" aria-label="Delete exception ${e.id}">Delete</button></td></tr>`)}
      ${r.exceptions.length ? '' : html`<tr><td colspan="9" class="muted">no exceptions</td></tr>`}</tbody></table>`);
    main.querySelector<HTMLFormElement>('#from-alert')!.addEventListener('submit', (ev) => {
      ev.preventDefault();
      const f = new FormData(ev.target as HTMLFormElement);
      void api('/v1/exceptions', { method: 'POST', body: JSON.stringify({ fromAlert: f.get('alert'), reason: f.get('reason') || '', anyVm: f.get('anyVm') === 'on', by: 'dashboard' }) }).then(
        () => (toast('Exception created'), load()),
        (e: unknown) => toast(`Could not create the exception: ${(e as Error).message}`),
      );
    });
    for (const b of main.querySelectorAll<HTMLButtonElement>('button.del')) {
      b.addEventListener('click', () => {
        if (!confirm(`Delete exception ${b.dataset['id']}?`)) return;
        void api(`/v1/exceptions/${encodeURIComponent(b.dataset['id']!)}`, { method: 'DELETE' }).then(() => (toast('Exception deleted'), load()), (e: unknown) => toast((e as Error).message));
      });
    }
  };
  setHtml(main, html`<h1 tabindex="-1">Exceptions</h1><p class="muted">Loading…</p>`);
  void load().catch((e: unknown) => setHtml(main, html`<h1 tabindex="-1">Exceptions</h1><p class="error" role="alert">${(e as Error).message}</p>`));
  return () => {
    stopped = true;
  };
}

interface PolicyRow {
  name: string;
  version: string;
  description: string;
  priority: number;
  select: Record<string, unknown>;
  profile: string;
  modules: string[];
  createdBy: string;
  createdNs: string;
  source: string;
}

export function policiesView(main: HTMLElement, name?: string): () => void {
  let stopped = false;
  const load = async () => {
    const r = await api<{ policies: PolicyRow[] }>('/v1/policies');
    const one = name ? await api<{ name: string; version: string; document: string; history: { version: string; createdNs: string; createdBy: string; source: string; deleted: boolean }[] }>(`/v1/policies/${encodeURIComponent(name)}`) : undefined;
    if (stopped) return;
    rerender(main, html`
      ${name ? html`<p class="crumbs"><a href="/policies">Policies</a> › ${name}</p>` : ''}
      <h1 tabindex="-1">${name ? `Policy ${name}` : 'Policies'}</h1>
      <table class="grid" aria-label="Policies"><thead><tr><th scope="col">name</th><th scope="col">version</th><th scope="col">priority</th><th scope="col">selects</th><th scope="col">modules</th><th scope="col">description</th><th scope="col">by</th></tr></thead>
      <tbody>${r.policies.map((p) => html`<tr class="${p.name === name ? 'current' : ''}" tabindex="0" data-key="pol:${p.name}" data-href="/policies/${encodeURIComponent(p.name)}" aria-label="Policy ${p.name} version ${p.version}. Enter shows its document.">
        <td><a href="/policies/${encodeURIComponent(p.name)}" tabindex="-1">${p.name}</a></td><td>${p.version}</td><td>${p.priority}</td><td><code>${JSON.stringify(p.select)}</code></td><td>${p.modules.join(', ')}</td><td>${p.description}</td><td>${p.createdBy}</td></tr>`)}
      ${r.policies.length ? '' : html`<tr><td colspan="7" class="muted">no policies</td></tr>`}</tbody></table>
      ${one ? html`<section aria-labelledby="doc-h"><h2 id="doc-h">Document (v${one.version})</h2><pre class="doc" tabindex="0" data-key="doc">${one.document}</pre>
        <h3>History</h3><ul>${one.history.map((h) => html`<li>v${h.version} · ${fmtTimeNs(h.createdNs)} · ${h.createdBy} · ${h.source}${h.deleted ? ' · deleted' : ''}</li>`)}</ul></section>` : ''}
      <section aria-labelledby="apply-h"><h2 id="apply-h">Apply a policy</h2>
        <form id="apply"><label for="doc-in">periscope.policy/v1 document (YAML)</label>
          <textarea id="doc-in" name="doc" rows="12" data-key="doc-in" spellcheck="false">${one?.document ?? ''}</textarea>
          <p><button type="button" id="validate" data-key="validate">Validate</button> <button type="submit" data-key="apply">Apply</button></p>
          <p id="apply-result" role="status" aria-live="polite"></p></form></section>`);
    const form = main.querySelector<HTMLFormElement>('#apply')!;
    const out = main.querySelector<HTMLElement>('#apply-result')!;
    const doc = () => main.querySelector<HTMLTextAreaElement>('#doc-in')!.value;
    main.querySelector('#validate')!.addEventListener('click', () => {
      void api<{ name: string; modules: string[] }>('/v1/policies/validate', { method: 'POST', body: doc(), contentType: 'application/yaml' }).then(
        (v) => (out.textContent = `valid: ${v.name} (${v.modules.join(', ')})`),
        (e: unknown) => (out.textContent = `invalid: ${(e as Error).message}`),
      );
    });
    form.addEventListener('submit', (ev) => {
      ev.preventDefault();
      void api<{ name: string; version: string; changed: boolean }>('/v1/policies?by=dashboard', { method: 'POST', body: doc(), contentType: 'application/yaml' }).then(
        (v) => (toast(v.changed ? `${v.name} v${v.version} applied` : `${v.name} unchanged (v${v.version})`), load()),
        (e: unknown) => (out.textContent = `refused: ${(e as Error).message}`),
      );
    });
  };
  setHtml(main, html`<h1 tabindex="-1">Policies</h1><p class="muted">Loading…</p>`);
  void load().catch((e: unknown) => setHtml(main, html`<h1 tabindex="-1">Policies</h1><p class="error" role="alert">${(e as Error).message}</p>`));
  return () => {
    stopped = true;
  };
}
