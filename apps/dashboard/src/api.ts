/**
 * The analysis HTTP API as the dashboard uses it: JSON with an optional bearer token (kept in
 * localStorage, asked for when the API answers 401) and the live alert stream (server-sent events read
 * with fetch, because EventSource cannot send an Authorization header), resumed after the last seq.
 */
import type { AlertJson } from '@periscope/analysis/alert-types';

export interface Host {
  hostId: string;
  agentVersion: string;
  connected: boolean;
  policyId: string;
  policyVersion: string;
  policyState: string;
  policyError: string;
  counters: Record<string, unknown>;
  lastSeenNs: string;
  attachedVmCount: number;
}

export interface Vm {
  uuid: string;
  name: string;
  hostId: string;
  attached: boolean;
  vcpuCount: number;
  labels: Record<string, string>;
  policyName: string;
  protection: Record<string, string>;
  derived: Record<string, unknown> | null;
  heki?: Record<string, unknown> | null;
  attachedNs: string;
  detachedNs: string;
  detachReason: string;
  lastSeenNs: string;
}

export interface VmDetail {
  vm: Vm;
  counters: {
    events: Record<string, string>;
    vcpus: { vcpu: number; events: string; lastSeenNs: string }[];
    verdicts: { ruleId: string; exceptionId: string; tier: string; action: string; count: string }[];
  };
  stall: { verdicts: number; totalNs: number; maxNs: number } | null;
  recentEvents: { seq: number; vcpu: number; kind: string; receivedNs: string; rip: string; ruleId: string; disposition: string; detail: Record<string, unknown> }[];
  commands: Record<string, unknown>[];
}

/** An alert as the API sends it: the type analysis's `alertJson` returns, shared (types only, erased). */
export type Alert = AlertJson;

export class ApiError extends Error {
  constructor(readonly status: number, readonly code: string, message: string) {
    super(message);
  }
}

const TOKEN_KEY = 'periscope.token';
export const token = {
  get: (): string => localStorage.getItem(TOKEN_KEY) ?? '',
  set: (t: string): void => (t ? localStorage.setItem(TOKEN_KEY, t) : localStorage.removeItem(TOKEN_KEY)),
};

let onUnauthorized: () => void = () => undefined;
export function setUnauthorizedHandler(fn: () => void): void {
  onUnauthorized = fn;
}

function headers(extra: Record<string, string> = {}): Record<string, string> {
  const t = token.get();
  return { ...(t ? { authorization: `Bearer ${t}` } : {}), ...extra };
}

export async function api<T>(path: string, init: { method?: string; body?: string; contentType?: string; signal?: AbortSignal } = {}): Promise<T> {
  const res = await fetch(path, {
    method: init.method ?? 'GET',
    headers: headers(init.body !== undefined ? { 'content-type': init.contentType ?? 'application/json' } : {}),
    ...(init.body !== undefined ? { body: init.body } : {}),
    ...(init.signal ? { signal: init.signal } : {}),
  });
  const text = await res.text();
  let body: unknown = undefined;
  try {
    body = text ? JSON.parse(text) : {};
  } catch {
    body = { error: { code: 'bad-response', message: text.slice(0, 200) } };
  }
  if (!res.ok) {
    const err = (body as { error?: { code?: string; message?: string } }).error;
    if (res.status === 401) onUnauthorized();
    throw new ApiError(res.status, err?.code ?? String(res.status), err?.message ?? res.statusText);
  }
  return body as T;
}

/** Every VM, page by page (the API answers at most 1,000 per request). */
export async function allVms(): Promise<Vm[]> {
  const out: Vm[] = [];
  let after = '';
  for (;;) {
    const page = await api<{ vms: Vm[] }>(`/v1/vms?limit=1000${after ? `&after=${encodeURIComponent(after)}` : ''}`);
    out.push(...page.vms);
    if (page.vms.length < 1000) return out;
    after = page.vms[page.vms.length - 1]!.uuid;
  }
}

export type StreamState = 'connecting' | 'live' | 'down' | 'unauthorized';

/**
 * Follows /v1/alerts/stream (SSE) for as long as the page lives; reconnects with backoff and resumes
 * after the last sequence number seen, so nothing is missed across a reconnect.
 */
export function followAlerts(onAlert: (a: Alert, outcome: string) => void, onState: (s: StreamState) => void, startAfter: () => string): () => void {
  let stopped = false;
  let ctl: AbortController | undefined;
  let last = '';
  let delay = 500;
  const run = async (): Promise<void> => {
    while (!stopped) {
      onState('connecting');
      ctl = new AbortController();
      try {
        const after = last || startAfter();
        const res = await fetch(`/v1/alerts/stream${after ? `?after=${after}` : ''}`, { headers: headers({ accept: 'text/event-stream' }), signal: ctl.signal });
        if (res.status === 401) {
          onState('unauthorized');
          onUnauthorized();
          return;
        }
        if (!res.ok || !res.body) throw new Error(`stream: HTTP ${res.status}`);
        onState('live');
        delay = 500;
        const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
        let buf = '';
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += value;
          let i: number;
          while ((i = buf.indexOf('\n\n')) >= 0) {
            const block = buf.slice(0, i);
            buf = buf.slice(i + 2);
            let id = '';
            let event = 'message';
            let data = '';
            for (const line of block.split('\n')) {
              if (line.startsWith('id:')) id = line.slice(3).trim();
              else if (line.startsWith('event:')) event = line.slice(6).trim();
              else if (line.startsWith('data:')) data += line.slice(5).trimStart();
            }
            if (event === 'alert' && data) {
              if (id) last = id;
              const m = JSON.parse(data) as { outcome: string; alert: Alert };
              onAlert(m.alert, m.outcome);
            }
          }
        }
      } catch {
        if (stopped) return;
      }
      if (stopped) return;
      onState('down');
      await new Promise((r) => setTimeout(r, delay));
      delay = Math.min(delay * 2, 10_000);
    }
  };
  void run();
  return () => {
    stopped = true;
    ctl?.abort();
  };
}
