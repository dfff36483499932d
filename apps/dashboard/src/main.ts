/**
 * Periscope dashboard: a single-page app served by analysis at `/`. Routes (History API; analysis answers
 * index.html for them): / fleet, /vms/ID, /alerts, /alerts/ID, /exceptions, /policies[/NAME].
 * Keyboard: every row that opens something is focusable (Tab) and opens with Enter.
 */
import './style.css';
import { setUnauthorizedHandler, token, type StreamState } from './api.js';
import { exceptionsView, policiesView } from './admin.js';
import { alertsView, alertView } from './alerts.js';
import { html, setHtml } from './dom.js';
import { fleetView } from './fleet.js';
import { alerts, navigate } from './state.js';
import { vmView } from './vm.js';

const main = document.getElementById('main')!;
const live = document.getElementById('live')!;
let cleanup: () => void = () => undefined;
let asking = false;
let navT0 = performance.now();

type View = (main: HTMLElement, m: RegExpExecArray) => () => void;
const ROUTES: [RegExp, string, View][] = [
  [/^\/(?:fleet)?$/, 'fleet', (el) => fleetView(el)],
  [/^\/vms\/([^/]+)$/, 'fleet', (el, m) => vmView(el, decodeURIComponent(m[1]!))],
  [/^\/alerts$/, 'alerts', (el) => alertsView(el)],
  [/^\/alerts\/([^/]+)$/, 'alerts', (el, m) => alertView(el, decodeURIComponent(m[1]!), navT0)],
  [/^\/exceptions$/, 'exceptions', (el) => exceptionsView(el)],
  [/^\/policies(?:\/([^/]+))?$/, 'policies', (el, m) => policiesView(el, m[1] ? decodeURIComponent(m[1]) : undefined)],
];

function route(): void {
  cleanup();
  cleanup = () => undefined;
  if (asking) return;
  const path = location.pathname;
  for (const [re, nav, view] of ROUTES) {
    const m = re.exec(path);
    if (!m) continue;
    for (const a of document.querySelectorAll<HTMLAnchorElement>('nav a')) {
      if (a.dataset['nav'] === nav) a.setAttribute('aria-current', 'page');
      else a.removeAttribute('aria-current');
    }
    document.title = `Periscope · ${nav}`;
    cleanup = view(main, m);
    return;
  }
  setHtml(main, html`<h1 tabindex="-1">Not found</h1><p>No page ${path}. <a href="/">Fleet</a></p>`);
}

function go(path: string): void {
  navT0 = performance.now();
  navigate(path);
}

/** The API answered 401: ask for the bearer token (kept in this browser's localStorage). */
function askToken(): void {
  if (asking) return;
  asking = true;
  cleanup();
  cleanup = () => undefined;
  setHtml(main, html`<h1 tabindex="-1">API token required</h1>
    <p>This analysis service requires a bearer token (<code>--api-token-file</code>). It stays in this browser.</p>
    <form id="token-form" class="inline"><label for="token-in">API token</label> <input id="token-in" type="password" autocomplete="off" required>
    <button type="submit">Use token</button></form>${token.get() ? html`<p class="error" role="alert">The stored token was refused.</p>` : ''}`);
  const input = main.querySelector<HTMLInputElement>('#token-in')!;
  input.focus();
  main.querySelector('#token-form')!.addEventListener('submit', (e) => {
    e.preventDefault();
    token.set(input.value.trim());
    asking = false;
    startStream();
    route();
  });
}

function setLive(s: StreamState): void {
  live.textContent = s === 'live' ? '● live' : s === 'connecting' ? '○ connecting…' : s === 'unauthorized' ? '○ token required' : '○ reconnecting…';
  live.className = `live ${s}`;
}

/** Follow new alerts after the ones loaded (no replay of the whole history into the page). */
function startStream(): void {
  void alerts.load().then(
    () => alerts.follow(setLive),
    () => setLive('down'),
  );
}

// Links inside the app and rows with data-href: client-side navigation; Enter on a focused row opens it.
document.addEventListener('click', (e) => {
  if (e.defaultPrevented || e.button !== 0 || e.metaKey || e.ctrlKey || e.shiftKey || e.altKey) return;
  const t = e.target as HTMLElement;
  const a = t.closest<HTMLAnchorElement>('a[href]');
  if (a && a.origin === location.origin && !a.hasAttribute('download') && a.getAttribute('href')!.startsWith('/')) {
    if (a.classList.contains('skip')) return;
    e.preventDefault();
    go(a.pathname);
    return;
  }
  const row = t.closest<HTMLElement>('[data-href]');
  if (row && !t.closest('button, input, select, textarea, label')) go(row.dataset['href']!);
});
document.addEventListener('keydown', (e) => {
  if (e.key !== 'Enter' && e.key !== ' ') return;
  const t = e.target as HTMLElement;
  if (t.matches('[data-href]')) {
    e.preventDefault();
    go(t.dataset['href']!);
  }
});
window.addEventListener('popstate', route);
window.addEventListener('periscope:navigate', () => {
  route();
  main.querySelector<HTMLElement>('h1')?.focus({ preventScroll: true });
  window.scrollTo(0, 0);
});
setUnauthorizedHandler(askToken);

startStream();
route();
