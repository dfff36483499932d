/**
 * Alert sinks: JSON-lines export (a file or stdout) and a webhook (POST, JSON body) with retries and
 * exponential backoff. Sinks never block ingest: each has its own queue; a webhook that stays down drops
 * the oldest queued alerts beyond `maxQueue` and counts them.
 */
import { appendFile } from 'node:fs/promises';
import type { AlertJson, AlertRecord } from './alert-types.js';

export interface WebhookOptions {
  readonly url: string;
  /** Attempts per alert (default 5). */
  readonly attempts?: number;
  /** First backoff, doubled per attempt (default 200 ms). */
  readonly backoffMs?: number;
  readonly timeoutMs?: number;
  readonly maxQueue?: number;
  readonly headers?: Readonly<Record<string, string>>;
}

type Log = (level: 'debug' | 'info' | 'warn' | 'error', msg: string, fields?: Record<string, unknown>) => void;

export const jsonReplacer = (_k: string, v: unknown): unknown => (typeof v === 'bigint' ? v.toString() : v);

/** The alert as the API and the sinks show it (Unix-ns times as decimal strings, ISO times added). */
export function alertJson(a: AlertRecord): AlertJson {
  const iso = (ns: bigint) => new Date(Number(ns / 1_000_000n)).toISOString();
  return JSON.parse(JSON.stringify({ ...a, firstSeen: iso(a.firstSeenNs), lastSeen: iso(a.lastSeenNs) }, jsonReplacer)) as AlertJson;
}

export class AlertSinks {
  private readonly queue: { body: string; attempt: number }[] = [];
  private running = false;
  private jsonlChain: Promise<void> = Promise.resolve();
  private closed = false;
  readonly stats = { webhookDelivered: 0, webhookFailed: 0, webhookDropped: 0, jsonlWritten: 0 };
  private wake: (() => void) | undefined;

  constructor(private readonly o: { webhook?: WebhookOptions; jsonl?: string; log: Log }) {}

  publish(n: { alert: AlertRecord; outcome: string }): void {
    const line = JSON.stringify({ outcome: n.outcome, alert: alertJson(n.alert) });
    if (this.o.jsonl) {
      const target = this.o.jsonl;
      this.jsonlChain = this.jsonlChain.then(async () => {
        if (target === '-') process.stdout.write(`${line}\n`);
        else await appendFile(target, `${line}\n`);
        this.stats.jsonlWritten++;
      }).catch((e: unknown) => this.o.log('warn', 'alert export failed', { error: (e as Error).message }));
    }
    if (this.o.webhook) {
      this.queue.push({ body: line, attempt: 0 });
      const max = this.o.webhook.maxQueue ?? 10_000;
      while (this.queue.length > max) {
        this.queue.shift();
        this.stats.webhookDropped++;
      }
      void this.drain();
    }
  }

  private async drain(): Promise<void> {
    if (this.running || !this.o.webhook) return;
    this.running = true;
    const w = this.o.webhook;
    const attempts = w.attempts ?? 5;
    const backoff = w.backoffMs ?? 200;
    try {
      while (this.queue.length && !this.closed) {
        const item = this.queue[0]!;
        item.attempt++;
        let ok = false;
        let why = '';
        try {
          const res = await fetch(w.url, { method: 'POST', headers: { 'content-type': 'application/json', ...(w.headers ?? {}) }, body: item.body, signal: AbortSignal.timeout(w.timeoutMs ?? 5000) });
          ok = res.ok;
          why = `HTTP ${res.status}`;
          await res.arrayBuffer().catch(() => undefined);
        } catch (e) {
          why = (e as Error).message;
        }
        if (ok) {
          this.queue.shift();
          this.stats.webhookDelivered++;
          continue;
        }
        if (item.attempt >= attempts) {
          this.queue.shift();
          this.stats.webhookFailed++;
          this.o.log('warn', 'webhook gave up on an alert', { attempts: item.attempt, error: why });
          continue;
        }
        await new Promise<void>((r) => {
          const t = setTimeout(r, backoff * 2 ** (item.attempt - 1));
          this.wake = () => {
            clearTimeout(t);
            r();
          };
        });
      }
    } finally {
      this.running = false;
    }
  }

  async close(): Promise<void> {
    this.closed = true;
    this.wake?.();
    await this.jsonlChain;
  }
}
