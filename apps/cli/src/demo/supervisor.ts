/**
 * Runs the demo's processes: each spec is `node bin/periscope <command> <args>` in its own process
 * group, started once the specs it depends on are ready; stderr/stdout go to a log file per process and
 * the last lines are kept for the report when a process dies unexpectedly. Shutdown is by phase
 * (SIGTERM to the group, SIGKILL after a grace period), within an overall budget.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createWriteStream, existsSync, statSync, type WriteStream } from 'node:fs';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { httpGet } from './http.js';
import type { ProcessSpec, ReadyCheck } from './plan.js';

export type ChildState = 'waiting' | 'starting' | 'ready' | 'exited';

export interface ChildExit {
  readonly name: string;
  readonly pid: number | undefined;
  readonly code: number | null;
  readonly signal: NodeJS.Signals | null;
  /** The demo did not ask it to stop. */
  readonly unexpected: boolean;
  /** Its last output lines (stderr and stdout, interleaved). */
  readonly lastLines: readonly string[];
}

export interface SupervisorOptions {
  /** The `bin/periscope` script. */
  readonly bin: string;
  /** Where `<name>.log` files go. */
  readonly logDir: string;
  /**
   * A module preloaded into every child (`node --import`) that stops it when the demo disappears
   * without cleaning up (SIGKILL); absent = none.
   */
  readonly guard?: string;
  /** How long a process may take to become ready. Default 20 s. */
  readonly readyTimeoutMs?: number;
  /** Lines kept per process for the failure report. Default 12. */
  readonly keepLines?: number;
  readonly env?: NodeJS.ProcessEnv;
  /** Called once per process that exits while the demo is not stopping. */
  readonly onUnexpectedExit?: (exit: ChildExit) => void;
}

class Child {
  state: ChildState = 'waiting';
  proc: ChildProcess | undefined;
  log: WriteStream | undefined;
  readonly lines: string[] = [];
  exit: ChildExit | undefined;
  readonly exited: Promise<void>;
  markExited!: () => void;
  constructor(readonly spec: ProcessSpec) {
    this.exited = new Promise((resolve) => (this.markExited = resolve));
  }
}

/** `p`, or nothing after `ms`; the timer is cleared either way (a pending one would keep the demo alive). */
export async function within(p: Promise<unknown>, ms: number): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  await Promise.race([p, new Promise<void>((r) => (timer = setTimeout(r, ms)))]);
  clearTimeout(timer);
}

export class Supervisor {
  private readonly children = new Map<string, Child>();
  private stopping = false;

  constructor(private readonly opts: SupervisorOptions) {}

  /** Start every spec in dependency order; rejects when one does not become ready (or dies first). */
  async start(specs: readonly ProcessSpec[]): Promise<void> {
    for (const s of specs) {
      if (this.children.has(s.name)) throw new Error(`duplicate process name ${s.name}`);
      this.children.set(s.name, new Child(s));
    }
    for (const s of specs) for (const d of s.after) if (!this.children.has(d)) throw new Error(`${s.name} depends on unknown ${d}`);
    const started = new Map<string, Promise<void>>();
    const startOne = (c: Child): Promise<void> => {
      let p = started.get(c.spec.name);
      if (!p) {
        p = (async () => {
          await Promise.all(c.spec.after.map((d) => startOne(this.children.get(d)!)));
          if (this.stopping) return;
          this.spawn(c);
          await this.waitReady(c);
        })();
        started.set(c.spec.name, p);
      }
      return p;
    };
    await Promise.all([...this.children.values()].map(startOne));
  }

  /** Name, pid and state of every process. */
  list(): { name: string; pid: number | undefined; state: ChildState }[] {
    return [...this.children.values()].map((c) => ({ name: c.spec.name, pid: c.proc?.pid, state: c.state }));
  }

  /** How every started process ended (so far). */
  exits(): { name: string; code: number | null; signal: NodeJS.Signals | null }[] {
    return [...this.children.values()].flatMap((c) => (c.exit ? [{ name: c.exit.name, code: c.exit.code, signal: c.exit.signal }] : []));
  }

  /** Processes that exited while the demo was not stopping. */
  failures(): ChildExit[] {
    return [...this.children.values()].flatMap((c) => (c.exit?.unexpected ? [c.exit] : []));
  }

  /**
   * Stop every process: by phase, SIGTERM to the process group, then SIGKILL once the phase's grace
   * period or the overall budget runs out; finally wait (briefly) for every exit.
   */
  async stop(budgetMs = 7000, graceMs = 3000): Promise<void> {
    this.stopping = true;
    const deadline = Date.now() + budgetMs;
    const live = (): Child[] => [...this.children.values()].filter((c) => c.proc !== undefined && c.state !== 'exited');
    const phases = [...new Set(live().map((c) => c.spec.stopPhase))].sort((a, b) => a - b);
    for (const phase of phases) {
      const group = live().filter((c) => c.spec.stopPhase === phase);
      for (const c of group) signalGroup(c, 'SIGTERM');
      const wait = Math.max(0, Math.min(graceMs, deadline - Date.now()));
      await within(Promise.all(group.map((c) => c.exited)), wait);
      for (const c of group) signalGroup(c, 'SIGKILL');
    }
    for (const c of live()) signalGroup(c, 'SIGKILL');
    await within(Promise.all([...this.children.values()].filter((c) => c.proc).map((c) => c.exited)), 2000);
    await Promise.all([...this.children.values()].map((c) => (c.log ? new Promise<void>((r) => c.log!.end(() => r())) : undefined)));
  }

  /** SIGKILL every process group at once (a second Ctrl-C). */
  killAll(): void {
    this.stopping = true;
    for (const c of this.children.values()) if (c.proc && c.state !== 'exited') signalGroup(c, 'SIGKILL');
  }

  private spawn(c: Child): void {
    const s = c.spec;
    const args = [...(this.opts.guard && existsSync(this.opts.guard) ? ['--import', pathToFileURL(this.opts.guard).href] : []), this.opts.bin, s.command, ...s.args];
    c.log = createWriteStream(join(this.opts.logDir, `${s.name.replace(/\//g, '.')}.log`), { flags: 'a' });
    c.log.on('error', () => undefined);
    c.log.write(`$ periscope ${s.command} ${s.args.join(' ')}\n`);
    const proc = spawn(process.execPath, args, {
      detached: true, // its own process group: Ctrl-C reaches the demo only, which stops the fleet in order
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...(this.opts.env ?? process.env), PERISCOPE_DEMO_CHILD: s.name },
    });
    c.proc = proc;
    c.state = 'starting';
    const keep = this.opts.keepLines ?? 12;
    const take = (chunk: Buffer): void => {
      c.log?.write(chunk);
      for (const line of chunk.toString('utf8').split('\n')) {
        const l = line.replace(/\r/g, '').replace(/\x1b\[[0-9;]*[A-Za-z]/g, '').trimEnd();
        if (l === '') continue;
        c.lines.push(l);
        if (c.lines.length > keep) c.lines.shift();
      }
    };
    proc.stdout?.on('data', take);
    proc.stderr?.on('data', take);
    proc.on('error', (err) => {
      take(Buffer.from(`spawn failed: ${err.message}\n`));
      if (c.state !== 'exited') this.onExit(c, null, null);
    });
    proc.on('exit', (code, signal) => this.onExit(c, code, signal));
  }

  private onExit(c: Child, code: number | null, signal: NodeJS.Signals | null): void {
    if (c.state === 'exited') return;
    c.state = 'exited';
    c.exit = { name: c.spec.name, pid: c.proc?.pid, code, signal, unexpected: !this.stopping, lastLines: [...c.lines] };
    c.log?.write(`# exited: code ${code ?? '-'} signal ${signal ?? '-'}\n`);
    c.markExited();
    if (c.exit.unexpected) this.opts.onUnexpectedExit?.(c.exit);
  }

  private async waitReady(c: Child): Promise<void> {
    const timeout = c.spec.readyTimeoutMs ?? this.opts.readyTimeoutMs ?? 20_000;
    const until = Date.now() + timeout;
    for (;;) {
      if (c.state === 'exited') throw new Error(`${c.spec.name} exited before it was ready`);
      if (this.stopping) return;
      if (await probe(c.spec.ready)) {
        if (c.state === 'starting') c.state = 'ready';
        return;
      }
      if (Date.now() > until) throw new Error(`${c.spec.name} was not ready after ${timeout} ms`);
      await within(c.exited, 100);
    }
  }
}

function signalGroup(c: Child, signal: NodeJS.Signals): void {
  const pid = c.proc?.pid;
  if (pid === undefined) return;
  try {
    process.kill(-pid, signal);
  } catch {
    // the group is gone already
  }
}

/** One readiness probe: any HTTP answer counts. */
export async function probe(check: ReadyCheck, timeoutMs = 1000): Promise<boolean> {
  if (check.kind === 'started') return true;
  if (check.kind === 'unix-socket') {
    try {
      return statSync(check.path).isSocket();
    } catch {
      return false;
    }
  }
  const target = check.kind === 'unix-http' ? { socket: check.socket, path: check.path } : { url: check.url };
  return (await httpGet(target, timeoutMs)) !== null;
}
