/**
 * The operator commands' HTTP client for analysis' API (libs/analysis/src/servers.ts): target
 * selection (`--server`, `--token-file`, `--tls-ca`), and the one mapping from what happened to an exit
 * code (EXIT): 404 → not found, 401/403 → refused, no answer → unreachable.
 */
import { readFileSync } from 'node:fs';
import { request as httpRequest, type IncomingMessage, type RequestOptions } from 'node:http';
import { request as httpsRequest } from 'node:https';

/** The CLI's exit codes (documented in `periscope --help` and docs/cli.md). */
export const EXIT = { ok: 0, error: 1, usage: 2, notFound: 3, unreachable: 4, refused: 5 } as const;

export class CliError extends Error {
  override readonly name = 'CliError';
  constructor(
    readonly exitCode: number,
    message: string,
  ) {
    super(message);
  }
}

export interface ApiTarget {
  readonly base: URL;
  readonly token?: string;
  readonly ca?: Buffer;
  readonly timeoutMs: number;
}

export const DEFAULT_SERVER = 'http://127.0.0.1:7401';

/** `HOST:PORT` or a URL; http:// when no scheme is given. */
export function parseServer(s: string): URL {
  const text = /^[a-z][a-z0-9+.-]*:\/\//i.test(s) ? s : `http://${s}`;
  let u: URL;
  try {
    u = new URL(text);
  } catch {
    throw new CliError(EXIT.usage, `--server ${s}: not HOST:PORT or an http(s):// URL`);
  }
  if (u.protocol !== 'http:' && u.protocol !== 'https:') throw new CliError(EXIT.usage, `--server ${s}: only http:// and https:// are supported`);
  return u;
}

export function makeTarget(server: string, tokenFile: string | undefined, caFile: string | undefined, timeoutMs = 10_000): ApiTarget {
  const base = parseServer(server);
  let token: string | undefined;
  if (tokenFile !== undefined) {
    try {
      token = readFileSync(tokenFile, 'utf8').trim();
    } catch (e) {
      throw new CliError(EXIT.usage, `--token-file ${tokenFile}: ${(e as Error).message}`);
    }
    if (token === '') throw new CliError(EXIT.usage, `--token-file ${tokenFile} is empty`);
  }
  let ca: Buffer | undefined;
  if (caFile !== undefined) {
    try {
      ca = readFileSync(caFile);
    } catch (e) {
      throw new CliError(EXIT.usage, `--tls-ca ${caFile}: ${(e as Error).message}`);
    }
  }
  return { base, timeoutMs, ...(token !== undefined ? { token } : {}), ...(ca ? { ca } : {}) };
}

export interface RequestSpec {
  readonly method?: string;
  readonly body?: string;
  readonly contentType?: string;
  readonly accept?: string;
  /** No overall timeout (streams); the connect timeout still applies. */
  readonly stream?: boolean;
  readonly signal?: AbortSignal;
}

/** Open a request; resolves with the response (any status) or rejects with a CliError(unreachable). */
export function open(t: ApiTarget, path: string, spec: RequestSpec = {}): Promise<IncomingMessage> {
  const url = new URL(path, t.base);
  const headers: Record<string, string> = { accept: spec.accept ?? 'application/json' };
  if (t.token) headers.authorization = `Bearer ${t.token}`;
  if (spec.body !== undefined) {
    headers['content-type'] = spec.contentType ?? 'application/json';
    headers['content-length'] = String(Buffer.byteLength(spec.body));
  }
  const options: RequestOptions & { ca?: Buffer } = { method: spec.method ?? 'GET', headers, ...(t.ca ? { ca: t.ca } : {}) };
  const req = (url.protocol === 'https:' ? httpsRequest : httpRequest)(url, options);
  return new Promise((resolve, reject) => {
    let settled = false;
    const fail = (why: string): void => {
      if (settled) return;
      settled = true;
      req.destroy();
      reject(new CliError(EXIT.unreachable, `analysis at ${t.base.origin} is unreachable: ${why}`));
    };
    const timer = setTimeout(() => fail(`no answer within ${t.timeoutMs} ms`), t.timeoutMs);
    req.on('error', (e: NodeJS.ErrnoException) => fail(e.message || e.code || 'connection failed'));
    req.on('response', (res) => {
      settled = true;
      if (spec.stream) clearTimeout(timer);
      else res.on('end', () => clearTimeout(timer)).on('close', () => clearTimeout(timer));
      resolve(res);
    });
    spec.signal?.addEventListener('abort', () => {
      clearTimeout(timer);
      req.destroy();
    });
    req.end(spec.body);
  });
}

async function readAll(res: IncomingMessage): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const c of res) chunks.push(c as Buffer);
  return Buffer.concat(chunks).toString('utf8');
}

/** An error answer of the API as a CliError with the right exit code. */
export function httpFailure(status: number, body: string, what: string): CliError {
  let message = body.trim();
  let code = '';
  try {
    const j = JSON.parse(body) as { error?: { code?: string; message?: string; issues?: { path?: string; message?: string }[] } | string };
    if (typeof j.error === 'object' && j.error) {
      code = j.error.code ?? '';
      message = j.error.message ?? message;
      const issues = (j.error.issues ?? []).map((i) => `\n  ${i.path ?? ''}: ${i.message ?? ''}`).join('');
      message += issues;
    } else if (typeof j.error === 'string') message = j.error;
  } catch {
    // not JSON: the text itself
  }
  const text = `${what}: ${message || `HTTP ${status}`}${code ? ` (${code})` : ''}`;
  if (status === 404) return new CliError(EXIT.notFound, text);
  if (status === 401 || status === 403) return new CliError(EXIT.refused, status === 401 ? `${text} — give --token-file (or PERISCOPE_TOKEN_FILE)` : text);
  return new CliError(EXIT.error, text);
}

/** One JSON request; a non-2xx answer throws a CliError. */
export async function apiJson<T = Record<string, unknown>>(t: ApiTarget, path: string, spec: RequestSpec = {}, what = `${spec.method ?? 'GET'} ${path}`): Promise<{ status: number; body: T }> {
  const res = await open(t, path, spec);
  const text = await readAll(res);
  const status = res.statusCode ?? 0;
  if (status < 200 || status >= 300) throw httpFailure(status, text, what);
  try {
    return { status, body: JSON.parse(text) as T };
  } catch {
    throw new CliError(EXIT.error, `${what}: the answer is not JSON (is ${t.base.origin} the analysis HTTP API?)`);
  }
}

/** A JSON-lines stream: calls `onLine` per parsed line until the server ends it or `signal` aborts. */
export async function apiLines(t: ApiTarget, path: string, onLine: (v: Record<string, unknown>) => void, spec: RequestSpec = {}): Promise<void> {
  const res = await open(t, path, { ...spec, stream: true, accept: 'application/x-ndjson' });
  const status = res.statusCode ?? 0;
  if (status < 200 || status >= 300) throw httpFailure(status, await readAll(res), `${spec.method ?? 'GET'} ${path}`);
  let buf = '';
  await new Promise<void>((resolve, reject) => {
    res.on('data', (c: Buffer) => {
      buf += c.toString('utf8');
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl).trim();
        buf = buf.slice(nl + 1);
        if (line === '') continue;
        try {
          onLine(JSON.parse(line) as Record<string, unknown>);
        } catch (e) {
          reject(e instanceof CliError ? e : new CliError(EXIT.error, `bad stream line: ${(e as Error).message}`));
          res.destroy();
          return;
        }
      }
    });
    res.on('end', () => resolve());
    res.on('close', () => resolve());
    res.on('error', (e) => (spec.signal?.aborted ? resolve() : reject(new CliError(EXIT.unreachable, `stream from ${t.base.origin} broke: ${e.message}`))));
  });
}
