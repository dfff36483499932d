/**
 * The analysis service as a real child process (`bin/periscope analysis`), for campaigns that kill it
 * with SIGKILL and start it again on the same addresses and database: the command line an operator runs.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createWriteStream } from 'node:fs';
import { join } from 'node:path';

export interface AnalysisProcessOptions {
  readonly repoRoot: string;
  /** `postgres://…` or `pglite:DIR`. */
  readonly db: string;
  /** gRPC `127.0.0.1:PORT` (fixed, so agents reconnect to the same address after a restart). */
  readonly listen: string;
  readonly http: string;
  readonly policyDir?: string;
  readonly extraArgs?: readonly string[];
  /** Node options before the script (e.g. `--import` of a probe). */
  readonly nodeArgs?: readonly string[];
  /** Extra environment variables for the process. */
  readonly env?: Readonly<Record<string, string>>;
  /** Also append everything the process writes on stderr to this file (every start). */
  readonly stderrFile?: string;
}

export class AnalysisProcess {
  private child: ChildProcess | null = null;
  private stderr = '';
  private exited_ = true;
  private exitCode_: number | null = null;
  private starts = 0;

  constructor(private readonly opts: AnalysisProcessOptions) {}

  get pid(): number {
    return this.child?.pid ?? 0;
  }
  get exited(): boolean {
    return this.exited_;
  }
  get exitCode(): number | null {
    return this.exitCode_;
  }
  get stderrTail(): string {
    return this.stderr.trim().slice(-1500);
  }
  get httpBase(): string {
    return `http://${this.opts.http}`;
  }

  /** Spawn and wait for the start line (`{"grpc":…,"http":…}` on stdout). */
  async start(timeoutMs = 30_000): Promise<void> {
    this.stderr = '';
    this.exited_ = false;
    this.exitCode_ = null;
    this.starts++;
    const args = [
      ...(this.opts.nodeArgs ?? []),
      join(this.opts.repoRoot, 'bin/periscope'),
      'analysis',
      '--db', this.opts.db,
      '--listen', this.opts.listen,
      '--http', this.opts.http,
      '--replica-id', `reliability-${this.starts}`,
      ...(this.opts.policyDir ? ['--policy', this.opts.policyDir] : []),
      ...(this.opts.extraArgs ?? []),
    ];
    const child = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'pipe'], ...(this.opts.env ? { env: { ...process.env, ...this.opts.env } } : {}) });
    this.child = child;
    let out = '';
    child.stdout!.on('data', (d: Buffer) => (out = (out + d.toString()).slice(-4000)));
    child.stderr!.on('data', (d: Buffer) => (this.stderr = (this.stderr + d.toString()).slice(-8000)));
    if (this.opts.stderrFile) child.stderr!.pipe(createWriteStream(this.opts.stderrFile, { flags: 'a' }));
    child.on('exit', (code) => {
      this.exited_ = true;
      this.exitCode_ = code;
    });
    const t0 = Date.now();
    while (!out.includes('\n')) {
      if (this.exited_) throw new Error(`analysis exited (${this.exitCode_}) at start: ${this.stderrTail}`);
      if (Date.now() - t0 > timeoutMs) throw new Error(`analysis printed no start line within ${timeoutMs} ms: ${this.stderrTail}`);
      await new Promise((r) => setTimeout(r, 20));
    }
  }

  /** kill -9, and wait for the exit. */
  async kill9(): Promise<void> {
    if (this.exited_) return;
    this.child!.kill('SIGKILL');
    await this.waitExit(10_000);
  }

  /** SIGTERM; the exit code, or null if it had to be killed after `graceMs`. */
  async terminate(graceMs = 10_000): Promise<number | null> {
    if (this.exited_) return this.exitCode_;
    this.child!.kill('SIGTERM');
    if (await this.waitExit(graceMs)) return this.exitCode_;
    this.child!.kill('SIGKILL');
    await this.waitExit(5000);
    return null;
  }

  /** GET a JSON document from the HTTP API. */
  async get<T>(path: string): Promise<T> {
    const r = await fetch(`${this.httpBase}${path}`);
    if (!r.ok) throw new Error(`GET ${path}: ${r.status} ${await r.text()}`);
    return (await r.json()) as T;
  }

  private async waitExit(ms: number): Promise<boolean> {
    const t0 = Date.now();
    while (!this.exited_) {
      if (Date.now() - t0 > ms) return false;
      await new Promise((r) => setTimeout(r, 10));
    }
    return true;
  }
}
