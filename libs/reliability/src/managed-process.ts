/**
 * A `bin/periscope <subcommand>` child process that a campaign starts, kills with SIGKILL, stops with
 * SIGTERM and starts again: the part `AgentProcess` and `AnalysisProcess` share.
 *
 * What it owns: spawning `node [nodeArgs…] bin/periscope <subcommand> <args…> [extraArgs…]` with the
 * caller's extra environment, keeping the last characters of stderr (optionally appending all of it to
 * `stderrFile`), tracking exit and exit code, waiting for readiness, `kill9` (SIGKILL, then wait for the
 * exit) and `terminate` (SIGTERM, SIGKILL after a grace period). Every wait polls. Subclasses build
 * the command line and say what "ready" means (a socket exists, a start line on stdout); the timeouts
 * are theirs too (`ManagedProcessTiming`).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createWriteStream } from 'node:fs';
import { join } from 'node:path';
import { sleep, waitFor } from './wait.js';

/** Options every managed `bin/periscope` process takes. */
export interface ManagedProcessOptions {
  readonly repoRoot: string;
  /** Arguments after the ones the wrapper builds. */
  readonly extraArgs?: readonly string[];
  /** Node options before the script (e.g. `--import` of a probe). */
  readonly nodeArgs?: readonly string[];
  /** Extra environment variables for the process. */
  readonly env?: Readonly<Record<string, string>>;
  /** Also append everything the process writes on stderr to this file (every start). */
  readonly stderrFile?: string;
}

/** How long a wrapper waits, and how much stderr it keeps. */
export interface ManagedProcessTiming {
  /** `kill9`: how long to wait for the exit after SIGKILL. */
  readonly killWaitMs: number;
  /** `terminate`: default grace after SIGTERM before SIGKILL. */
  readonly termGraceMs: number;
  /** `terminate`: how long to wait for the exit after the fallback SIGKILL. */
  readonly termKillWaitMs: number;
  /** Characters of stderr kept in memory. */
  readonly stderrKeep: number;
  /** Characters of (trimmed) stderr `stderrTail` returns. */
  readonly tailChars: number;
}

export abstract class ManagedProcess<O extends ManagedProcessOptions = ManagedProcessOptions> {
  private child: ChildProcess | null = null;
  private stderr = '';
  private exited_ = true;
  private exitCode_: number | null = null;

  protected constructor(
    protected readonly opts: O,
    private readonly timing: ManagedProcessTiming,
  ) {}

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
    return this.stderr.trim().slice(-this.timing.tailChars);
  }

  /**
   * Spawn `bin/periscope <subcommand> <args…> [extraArgs…]` (stderr piped and kept; stdout piped only
   * when `pipeStdout`), resetting the exit state and the kept stderr. Returns the child so a subclass
   * can read stdout.
   */
  protected spawnPeriscope(subcommand: string, args: readonly string[], pipeStdout = false): ChildProcess {
    this.stderr = '';
    this.exited_ = false;
    this.exitCode_ = null;
    const child = spawn(
      process.execPath,
      [...(this.opts.nodeArgs ?? []), join(this.opts.repoRoot, 'bin/periscope'), subcommand, ...args, ...(this.opts.extraArgs ?? [])],
      { stdio: ['ignore', pipeStdout ? 'pipe' : 'ignore', 'pipe'], ...(this.opts.env ? { env: { ...process.env, ...this.opts.env } } : {}) },
    );
    this.child = child;
    child.stderr!.on('data', (d: Buffer) => (this.stderr = (this.stderr + d.toString()).slice(-this.timing.stderrKeep)));
    if (this.opts.stderrFile) child.stderr!.pipe(createWriteStream(this.opts.stderrFile, { flags: 'a' }));
    child.on('exit', (code) => {
      this.exited_ = true;
      this.exitCode_ = code;
    });
    return child;
  }

  /**
   * Poll `ready` every `pollMs` until it holds. Throws `<name> exited (<code>) at start: <stderr tail>` if
   * the process exits first, and `timeoutMessage()` once `timeoutMs` has passed.
   */
  protected async waitReady(ready: () => boolean, timeoutMs: number, pollMs: number, name: string, timeoutMessage: () => string): Promise<void> {
    const t0 = Date.now();
    while (!ready()) {
      if (this.exited_) throw new Error(`${name} exited (${this.exitCode_}) at start: ${this.stderrTail}`);
      if (Date.now() - t0 > timeoutMs) throw new Error(timeoutMessage());
      await sleep(pollMs);
    }
  }

  /** kill -9, and wait for the exit. */
  async kill9(): Promise<void> {
    if (this.exited_) return;
    this.child!.kill('SIGKILL');
    await this.waitExit(this.timing.killWaitMs);
  }

  /** SIGTERM; resolves to the exit code, or null if it had to be killed after `graceMs`. */
  async terminate(graceMs = this.timing.termGraceMs): Promise<number | null> {
    if (this.exited_) return this.exitCode_;
    this.child!.kill('SIGTERM');
    if (await this.waitExit(graceMs)) return this.exitCode_;
    this.child!.kill('SIGKILL');
    await this.waitExit(this.timing.termKillWaitMs);
    return null;
  }

  /** Whether the process exited within `ms`. */
  protected waitExit(ms: number): Promise<boolean> {
    return waitFor(() => this.exited_, ms);
  }
}
