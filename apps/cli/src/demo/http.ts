/** A small HTTP GET over TCP or a Unix socket, for readiness probes and the summary collector. */
import { request, type RequestOptions } from 'node:http';

export type HttpTarget = { readonly socket: string; readonly path: string } | { readonly url: string };

export interface HttpAnswer {
  readonly status: number;
  readonly body: string;
}

/** Resolves with the answer, or `null` when there is none (refused, reset, timed out). */
export function httpGet(target: HttpTarget, timeoutMs = 1000, maxBytes = 8 << 20): Promise<HttpAnswer | null> {
  return new Promise((resolve) => {
    let options: RequestOptions;
    if ('socket' in target) options = { socketPath: target.socket, path: target.path };
    else {
      const u = new URL(target.url);
      options = { host: u.hostname, port: u.port, path: `${u.pathname}${u.search}` };
    }
    const req = request({ ...options, method: 'GET', timeout: timeoutMs, headers: { accept: 'application/json, text/plain' } }, (res) => {
      const chunks: Buffer[] = [];
      let size = 0;
      res.on('data', (c: Buffer) => {
        size += c.length;
        if (size <= maxBytes) chunks.push(c);
      });
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks).toString('utf8') }));
      res.on('error', () => resolve(null));
    });
    req.on('timeout', () => req.destroy());
    req.on('error', () => resolve(null));
    req.end();
  });
}
