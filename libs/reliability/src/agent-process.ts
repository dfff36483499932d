/**
 * A host agent as a real child process (`bin/periscope host-agent`), for campaigns that fuzz it, kill
 * it and restart it: the same command line an operator runs. Spawning, stderr capture, `kill9` and
 * `terminate` come from `ManagedProcess`.
 */
import { existsSync, readFileSync, rmSync } from 'node:fs';
import { ManagedProcess, type ManagedProcessOptions } from './managed-process.js';

export interface AgentProcessOptions extends ManagedProcessOptions {
  readonly kvmiSocket: string;
  readonly cookieFile: string;
  readonly hostId?: string;
  readonly logLevel?: 'debug' | 'info' | 'warn' | 'error';
}

export class AgentProcess extends ManagedProcess<AgentProcessOptions> {
  constructor(opts: AgentProcessOptions) {
    super(opts, { killWaitMs: 5000, termGraceMs: 5000, termKillWaitMs: 2000, stderrKeep: 4000, tailChars: 800 });
  }

  /** Spawn and wait until the KVMI socket exists. */
  async start(timeoutMs = 15_000): Promise<void> {
    rmSync(this.opts.kvmiSocket, { force: true });
    this.spawnPeriscope('host-agent', [
      '--kvmi-listen',
      `unix:${this.opts.kvmiSocket}`,
      '--cookie-file',
      this.opts.cookieFile,
      '--log-level',
      this.opts.logLevel ?? 'error',
      '--host-id',
      this.opts.hostId ?? 'reliability',
    ]);
    await this.waitReady(() => existsSync(this.opts.kvmiSocket), timeoutMs, 10, 'host agent', () => 'host agent did not create its socket in time');
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
}
