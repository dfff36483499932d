/** Client state shared by the views: alerts loaded so far and followed live, and navigation. */
import { api, followAlerts, type Alert, type StreamState } from './api.js';

const SEV_RANK = { info: 1, low: 2, medium: 3, high: 4, critical: 5 } as const;
export const severityRank = (s: Alert['severity']): number => SEV_RANK[s] ?? 0;
export const SEVERITIES: readonly Alert['severity'][] = ['critical', 'high', 'medium', 'low', 'info'];

type Listener = (a: Alert, outcome: string) => void;

class AlertState {
  readonly byId = new Map<string, Alert>();
  /** Ids of alerts that arrived over the live stream in this page's life (highlighted). */
  readonly fresh = new Set<string>();
  nextCursor: string | null = null;
  loaded = false;
  private listeners = new Set<Listener>();
  private stop: (() => void) | undefined;
  private loading: Promise<void> | undefined;

  /** Newest first. */
  list(): Alert[] {
    return [...this.byId.values()].sort((a, b) => Number(BigInt(b.seq) - BigInt(a.seq)));
  }

  maxSeq(): string {
    let m = 0n;
    for (const a of this.byId.values()) if (BigInt(a.seq) > m) m = BigInt(a.seq);
    return m ? m.toString() : '';
  }

  load(): Promise<void> {
    this.loading ??= (async () => {
      const r = await api<{ alerts: Alert[]; nextCursor: string | null }>('/v1/alerts?limit=500');
      for (const a of r.alerts) this.byId.set(a.id, a);
      this.nextCursor = r.nextCursor;
      this.loaded = true;
    })().finally(() => (this.loading = undefined));
    return this.loading;
  }

  async loadOlder(): Promise<number> {
    if (!this.nextCursor) return 0;
    const r = await api<{ alerts: Alert[]; nextCursor: string | null }>(`/v1/alerts?limit=500&cursor=${this.nextCursor}`);
    for (const a of r.alerts) this.byId.set(a.id, a);
    this.nextCursor = r.nextCursor;
    return r.alerts.length;
  }

  upsert(a: Alert): void {
    this.byId.set(a.id, a);
  }

  follow(onState: (s: StreamState) => void): void {
    this.stop?.();
    this.stop = followAlerts(
      (a, outcome) => {
        this.byId.set(a.id, a);
        this.fresh.add(a.id);
        for (const l of this.listeners) l(a, outcome);
      },
      onState,
      () => this.maxSeq() || '0',
    );
  }

  on(l: Listener): () => void {
    this.listeners.add(l);
    return () => this.listeners.delete(l);
  }

  /** Like `on`, but calls `fn` at most once per `ms` however many alerts arrive (a replay, a storm). */
  onBatched(fn: () => void, ms = 250): () => void {
    let timer: number | undefined;
    const off = this.on(() => {
      timer ??= window.setTimeout(() => {
        timer = undefined;
        fn();
      }, ms);
    });
    return () => {
      off();
      if (timer !== undefined) window.clearTimeout(timer);
    };
  }
}

export const alerts = new AlertState();

export function navigate(path: string, replace = false): void {
  if (replace) history.replaceState(null, '', path);
  else history.pushState(null, '', path);
  window.dispatchEvent(new Event('periscope:navigate'));
}

export function toast(msg: string): void {
  const t = document.getElementById('toast');
  if (!t) return;
  t.textContent = msg;
  t.classList.add('show');
  window.setTimeout(() => t.classList.remove('show'), 4000);
}

/** Protection status of a VM from its modules' states. */
export function protectionOf(p: Record<string, string>): { status: 'protected' | 'pending' | 'failed' | 'unprotected'; detail: string } {
  const entries = Object.entries(p).filter(([k]) => k !== 'heki');
  const detail = entries.map(([k, v]) => `${k}: ${v}`).join('; ');
  if (!entries.length) return { status: 'unprotected', detail: 'no protection module applies' };
  if (entries.some(([, v]) => v.startsWith('failed'))) return { status: 'failed', detail };
  if (entries.some(([, v]) => v === 'pending' || v.startsWith('deriving'))) return { status: 'pending', detail };
  return { status: 'protected', detail };
}

/** Heki coverage if analysis reports it for the VM (a `heki` protection entry or derived fact). */
export function hekiOf(vm: { protection: Record<string, string>; derived: Record<string, unknown> | null; heki?: Record<string, unknown> | null }): string {
  // /v1/vms and /v1/vms/ID carry `heki` (analysis's per-VM Heki view: status, pinned CR bits, denials).
  const h = vm.heki;
  if (h && typeof h['status'] === 'string') {
    const pinned = Array.isArray(h['pinned']) ? (h['pinned'] as string[]) : [];
    return h['status'] === 'pinned' && pinned.length ? `pinned ${pinned.join(' ')}` : String(h['statusText'] ?? h['status']);
  }
  const p = vm.protection['heki'];
  if (p) return p;
  const d = vm.derived?.['heki'];
  if (typeof d === 'string') return d;
  if (d && typeof d === 'object') return Object.entries(d as Record<string, unknown>).map(([k, v]) => `${k} ${String(v)}`).join(', ');
  return '';
}
