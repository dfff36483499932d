/** Tiny DOM helpers: an escaping `html` template (strings are text unless wrapped in `raw`). */
export class Raw {
  constructor(readonly html: string) {}
  toString(): string {
    return this.html;
  }
}
export const raw = (s: string): Raw => new Raw(s);

const ESC: Record<string, string> = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' };
export const esc = (s: string): string => s.replace(/[&<>"']/g, (c) => ESC[c]!);

type Part = string | number | boolean | null | undefined | Raw | readonly Part[];

function part(v: Part): string {
  if (v === null || v === undefined || v === false) return '';
  if (v instanceof Raw) return v.html;
  if (Array.isArray(v)) return (v as readonly Part[]).map(part).join('');
  return esc(String(v));
}

export function html(strings: TemplateStringsArray, ...values: Part[]): Raw {
  let out = strings[0]!;
  for (let i = 0; i < values.length; i++) out += part(values[i]) + strings[i + 1]!;
  return new Raw(out);
}

export function $(sel: string, root: ParentNode = document): HTMLElement | null {
  return root.querySelector<HTMLElement>(sel);
}

export function setHtml(el: Element, r: Raw): void {
  el.innerHTML = r.html;
}

export function fmtTimeNs(ns: string | number | bigint | undefined): string {
  if (ns === undefined || ns === '' || ns === '0' || ns === 0) return '—';
  const ms = Number(BigInt(ns) / 1_000_000n);
  return new Date(ms).toLocaleString(undefined, { hour12: false });
}

export function fmtAgo(iso: string | undefined): string {
  if (!iso) return '—';
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86_400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86_400)} d ago`;
}

export const fmtNum = (n: number | string | bigint): string => Number(n).toLocaleString('en-US');

export function fmtDuration(ns: number): string {
  if (!Number.isFinite(ns)) return '—';
  if (ns < 1_000) return `${ns.toFixed(0)} ns`;
  if (ns < 1_000_000) return `${(ns / 1_000).toFixed(ns < 10_000 ? 1 : 0)} µs`;
  return `${(ns / 1_000_000).toFixed(1)} ms`;
}

const FOCUSABLE = 'a[href], button, input, select, textarea, [tabindex]';

/** Replaces `el`'s content and keeps keyboard focus where it was (by data-key, else by position). */
export function rerender(el: HTMLElement, r: Raw): void {
  const active = document.activeElement as HTMLElement | null;
  let key: string | undefined;
  let index = -1;
  if (active && el.contains(active)) {
    key = active.dataset['key'];
    index = [...el.querySelectorAll<HTMLElement>(FOCUSABLE)].indexOf(active);
  }
  const wasHeading = active?.tagName === 'H1' && el.contains(active);
  el.innerHTML = r.html;
  if (wasHeading) return el.querySelector<HTMLElement>('h1')?.focus({ preventScroll: true });
  if (key) {
    const again = el.querySelector<HTMLElement>(`[data-key="${CSS.escape(key)}"]`);
    if (again) return again.focus({ preventScroll: true });
  }
  if (index >= 0) el.querySelectorAll<HTMLElement>(FOCUSABLE)[index]?.focus({ preventScroll: true });
}
