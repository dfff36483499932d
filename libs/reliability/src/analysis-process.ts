/**
 * The analysis service as a real child process (`bin/periscope analysis`), for campaigns that kill it
 * with SIGKILL and start it again on the same addresses and database: the command line an operator runs.
 * Spawning, stderr capture, `kill9` and `terminate` come from `ManagedProcess`.
 */
import { ManagedProcess, type ManagedProcessOptions } from './managed-process.js';

export interface AnalysisProcessOptions extends ManagedProcessOptions {
  /** `postgres://…` or `pglite:DIR`. */
  readonly db: string;
  /** gRPC `127.0.0.1:PORT` (fixed, so agents reconnect to the same address after a restart). */
  readonly listen: string;
  readonly http: string;
  readonly policyDir?: string;
}

export class AnalysisProcess extends ManagedProcess<AnalysisProcessOptions> {
  private starts = 0;

  constructor(opts: AnalysisProcessOptions) {
    super(opts, { killWaitMs: 10_000, termGraceMs: 10_000, termKillWaitMs: 5000, stderrKeep: 8000, tailChars: 1500 });
  }

  get httpBase(): string {
    return `http://${this.opts.http}`;
  }

  /** Spawn and wait for the start line (`{"grpc":…,"http":…}` on stdout). */
  async start(timeoutMs = 30_000): Promise<void> {
    this.starts++;
    const child = this.spawnPeriscope(
      'analysis',
      [
        '--db', this.opts.db,
        '--listen', this.opts.listen,
        '--http', this.opts.http,
        '--replica-id', `reliability-${this.starts}`,
        ...(this.opts.policyDir ? ['--policy', this.opts.policyDir] : []),
      ],
      true,
    );
    let out = '';
    child.stdout!.on('data', (d: Buffer) => (out = (out + d.toString()).slice(-4000)));
    await this.waitReady(() => out.includes('\n'), timeoutMs, 20, 'analysis', () => `analysis printed no start line within ${timeoutMs} ms: ${this.stderrTail}`);
  }

  /** GET a JSON document from the HTTP API. */
  async get<T>(path: string): Promise<T> {
    const r = await fetch(`${this.httpBase}${path}`);
    if (!r.ok) throw new Error(`GET ${path}: ${r.status} ${await r.text()}`);
    return (await r.json()) as T;
  }
}
