/**
 * A host agent as a real child process (`bin/periscope host-agent`), for campaigns that fuzz it, kill
 * it and restart it: the same command line an operator runs.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createWriteStream, existsSync, readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';

export interface AgentProcessOptions {
  readonly repoRoot: string;
  readonly kvmiSocket: string;
  readonly cookieFile: string;
  readonly hostId?: string;
  readonly logLevel?: 'debug' | 'info' | 'warn' | 'error';
  readonly extraArgs?: readonly string[];
  /** Node options before the script (e.g. `--import` of a probe). */
  readonly nodeArgs?: readonly string[];
  /** Extra environment variables for the process. */
  readonly env?: Readonly<Record<string, string>>;
  /** Also append everything the process writes on stderr to this file (every start). */
  readonly stderrFile?: string;
}

export class AgentProcess {
  private child: ChildProcess | null = null;
  private stderr = '';
  private exitCode_: number | null = null;
  private exited_ = true;

  constructor(private readonly opts: AgentProcessOptions) {}

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
    return this.stderr.trim().slice(-800);
  }

  /** Spawn and wait until the KVMI socket exists. */
  async start(timeoutMs = 15_000): Promise<void> {
    rmSync(this.opts.kvmiSocket, { force: true });
    this.stderr = '';
    this.exited_ = false;
    this.exitCode_ = null;
    const child = spawn(
      process.execPath,
      [
        ...(this.opts.nodeArgs ?? []),
        join(this.opts.repoRoot, 'bin/periscope'),
        'host-agent',
        '--kvmi-listen',
        `unix:${this.opts.kvmiSocket}`,
        '--cookie-file',
        this.opts.cookieFile,
        '--log-level',
        this.opts.logLevel ?? 'error',
        '--host-id',
        this.opts.hostId ?? 'reliability',
        ...(this.opts.extraArgs ?? []),
      ],
      { stdio: ['ignore', 'ignore', 'pipe'], ...(this.opts.env ? { env: { ...process.env, ...this.opts.env } } : {}) },
    );
    this.child = child;
    child.stderr!.on('data', (d: Buffer) => (this.stderr = (this.stderr + d.toString()).slice(-4000)));
    if (this.opts.stderrFile) child.stderr!.pipe(createWriteStream(this.opts.stderrFile, { flags: 'a' }));
    child.on('exit', (code) => {
      this.exited_ = true;
      this.exitCode_ = code;
    });
    const t0 = Date.now();
    while (!existsSync(this.opts.kvmiSocket)) {
      if (this.exited_) throw new Error(`host agent exited (${this.exitCode_}) at start: ${this.stderrTail}`);
      if (Date.now() - t0 > timeoutMs) throw new Error('host agent did not create its socket in time');
      await new Promise((r) => setTimeout(r, 10));
    }
  }

  /** Resident set size from /proc, MiB (0 when gone). */
  rssMiB(): number {
    try {
      const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${this.pid}/status`, 'utf8'));
      return m ? Number(m[1]) / 1024 : 0;
    } catch {
      return 0;
    }
  }

  /** kill -9, and wait for the exit. */
  async kill9(): Promise<void> {
    if (this.exited_) return;
    this.child!.kill('SIGKILL');
    await this.waitExit(5000);
  }

  /** SIGTERM; resolves to the exit code, or null if it had to be killed after `graceMs`. */
  async terminate(graceMs = 5000): Promise<number | null> {
    if (this.exited_) return this.exitCode_;
    this.child!.kill('SIGTERM');
    if (await this.waitExit(graceMs)) return this.exitCode_;
    this.child!.kill('SIGKILL');
    await this.waitExit(2000);
    return null;
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
