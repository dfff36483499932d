/** Small SVG charts (no chart library): a time series line and horizontal bars. */
import { esc, html, raw, type Raw } from './dom.js';

export interface Point {
  t: number; // ms
  v: number;
}

/** A line chart of the last `windowMs`; `fmt` formats the y axis. */
export function lineChart(points: readonly Point[], o: { label: string; fmt: (v: number) => string; windowMs?: number; width?: number; height?: number; colour?: string }): Raw {
  const w = o.width ?? 420;
  const h = o.height ?? 120;
  const pad = { l: 56, r: 8, t: 8, b: 18 };
  const now = points.length ? points[points.length - 1]!.t : Date.now();
  const span = o.windowMs ?? 60_000;
  const t0 = now - span;
  const vis = points.filter((p) => p.t >= t0);
  const max = Math.max(1e-9, ...vis.map((p) => p.v));
  const x = (t: number) => pad.l + ((t - t0) / span) * (w - pad.l - pad.r);
  const y = (v: number) => h - pad.b - (v / max) * (h - pad.t - pad.b);
  const d = vis.map((p, i) => `${i ? 'L' : 'M'}${x(p.t).toFixed(1)},${y(p.v).toFixed(1)}`).join('');
  const last = vis.length ? vis[vis.length - 1]!.v : undefined;
  const summary = `${o.label}: ${last === undefined ? 'no data yet' : `now ${o.fmt(last)}, peak ${o.fmt(max)} over the last ${Math.round(span / 1000)} s`}`;
  return html`<svg class="chart" viewBox="0 0 ${w} ${h}" width="${w}" height="${h}" role="img" aria-label="${summary}">
    <title>${summary}</title>
    <line class="axis" x1="${pad.l}" y1="${h - pad.b}" x2="${w - pad.r}" y2="${h - pad.b}"></line>
    <line class="grid" x1="${pad.l}" y1="${pad.t}" x2="${w - pad.r}" y2="${pad.t}"></line>
    <text class="tick" x="${pad.l - 4}" y="${pad.t + 4}" text-anchor="end">${o.fmt(max)}</text>
    <text class="tick" x="${pad.l - 4}" y="${h - pad.b}" text-anchor="end">0</text>
    <text class="tick" x="${pad.l}" y="${h - 4}">-${Math.round(span / 1000)} s</text>
    <text class="tick" x="${w - pad.r}" y="${h - 4}" text-anchor="end">now</text>
    ${vis.length > 1 ? raw(`<path class="line" d="${d}" stroke="${esc(o.colour ?? 'currentColor')}"></path>`) : raw(`<text class="tick" x="${(w / 2).toFixed(0)}" y="${(h / 2).toFixed(0)}" text-anchor="middle">waiting for samples…</text>`)}
  </svg>`;
}

/** Horizontal bars: one per (label, value). */
export function barChart(rows: readonly { label: string; value: number; cls?: string }[], o: { label: string; width?: number }): Raw {
  const w = o.width ?? 420;
  const bh = 20;
  const lw = 150;
  const h = Math.max(1, rows.length) * (bh + 6) + 4;
  const max = Math.max(1, ...rows.map((r) => r.value));
  const summary = `${o.label}: ${rows.map((r) => `${r.label} ${r.value}`).join(', ') || 'none'}`;
  return html`<svg class="chart bars" viewBox="0 0 ${w} ${h}" width="${w}" height="${h}" role="img" aria-label="${summary}">
    <title>${summary}</title>
    ${rows.map((r, i) => {
      const y = 2 + i * (bh + 6);
      const bw = Math.max(2, (r.value / max) * (w - lw - 70));
      return html`<text class="tick" x="${lw - 6}" y="${y + 14}" text-anchor="end">${r.label}</text>
        <rect class="bar ${r.cls ?? ''}" x="${lw}" y="${y}" width="${bw.toFixed(1)}" height="${bh}" rx="3"></rect>
        <text class="tick" x="${(lw + bw + 6).toFixed(1)}" y="${y + 14}">${r.value.toLocaleString('en-US')}</text>`;
    })}
    ${rows.length ? '' : raw('<text class="tick" x="8" y="16">none yet</text>')}
  </svg>`;
}
