/**
 * The host agent's KVMI endpoint: Unix sockets QEMU connects to. The agent is the *server* of the
 * QEMU handshake (kvmi-v7-libkvmi.md §3): it reads QEMU's struct, answers SHA-1 of the VM's secret and,
 * in the same write, the first KVMI command (GET_VERSION, seq 1), then attaches the VM.
 *
 * QEMU checks the hash; on a mismatch it closes instead of hooking, so the GET_VERSION never gets an
 * answer: that VM is logged as "handshake refused by QEMU (cookie?)" and counted; others are unaffected.
 */
import { chmodSync, chownSync, existsSync, statSync, unlinkSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { dirname } from 'node:path';
import { acceptQemuHandshake, encodeCommand, KvmiError, uuidToText, type QemuHello } from '@periscope/kvmi';
import type { CookieLookup } from './cookies.js';
import { SessionGenerations } from './session-generations.js';
import { VmConnection, type Decide, type ProtectionPlan, type VmInfo } from './vm-connection.js';

export type Log = (level: 'info' | 'warn' | 'error', msg: string, fields?: Record<string, unknown>) => void;

export interface KvmiListenerOptions {
  /** Unix socket paths to listen on (`unix:` prefix accepted). */
  paths: string[];
  cookies: CookieLookup;
  plan: ProtectionPlan;
  decide: Decide;
  log: Log;
  /** Numeric gid for the socket files (QEMU's group); mode is 0660. */
  socketGid?: number;
  handshakeTimeoutMs?: number;
  /** Per-VM bound on queued writes (see VmConnectionOptions.maxQueuedBytes). */
  maxQueuedBytes?: number;
  /** Session generations (persisted under `--state-dir`); default: in memory, with the wall-clock floor. */
  generations?: SessionGenerations;
  onAttached?: (vm: VmConnection, info: VmInfo) => void;
  onDetached?: (vm: VmConnection, reason: string) => void;
}

export class ListenerError extends Error {
  constructor(
    readonly code: 'bad-socket-dir' | 'socket-in-use' | 'listen-failed',
    message: string,
  ) {
    super(message);
    this.name = 'ListenerError';
  }
}

export class KvmiListener {
  private readonly servers: Server[] = [];
  readonly vms = new Map<string, VmConnection>();
  private readonly generations: SessionGenerations;
  readonly counters = { connections: 0, handshakeFailures: 0, handshakeRefusedByQemu: 0, attachFailures: 0, attached: 0 };

  constructor(private readonly opts: KvmiListenerOptions) {
    this.generations = opts.generations ?? new SessionGenerations({ log: opts.log });
  }

  /** The plan for VMs attaching from now on (a policy install); attached VMs are extended separately. */
  setPlan(plan: ProtectionPlan): void {
    this.opts.plan = plan;
  }

  async start(): Promise<void> {
    for (const raw of this.opts.paths) {
      const path = raw.startsWith('unix:') ? raw.slice('unix:'.length).replace(/^\/\/(?=\/)/, '') : raw;
      const dir = dirname(path);
      let st;
      try {
        st = statSync(dir);
      } catch {
        throw new ListenerError('bad-socket-dir', `socket directory ${dir} does not exist (create it, group-owned by QEMU's group)`);
      }
      if (!st.isDirectory()) throw new ListenerError('bad-socket-dir', `${dir} is not a directory`);
      if ((st.mode & 0o002) !== 0 && (st.mode & 0o1000) === 0) {
        throw new ListenerError('bad-socket-dir', `socket directory ${dir} is world-writable without the sticky bit: anyone could replace the socket`);
      }
      if (existsSync(path)) {
        if (!statSync(path).isSocket()) throw new ListenerError('socket-in-use', `${path} exists and is not a socket`);
        unlinkSync(path); // a stale socket from a previous run
      }
      const server = createServer((socket) => this.onConnection(socket));
      await new Promise<void>((resolve, reject) => {
        server.once('error', (e) => reject(new ListenerError('listen-failed', `cannot listen on ${path}: ${e.message}`)));
        server.listen(path, () => resolve());
      });
      chmodSync(path, 0o660);
      if (this.opts.socketGid !== undefined) chownSync(path, process.getuid?.() ?? 0, this.opts.socketGid);
      this.servers.push(server);
      this.opts.log('info', 'listening for QEMU', { path });
    }
  }

  private onConnection(socket: Socket): void {
    this.counters.connections++;
    socket.on('error', () => undefined); // reported through the handshake/session paths
    const getVersion = encodeCommand('GET_VERSION', 1, {});
    acceptQemuHandshake(socket, {
      cookieFor: (uuid) => this.opts.cookies(uuidToText(uuid)),
      afterReply: getVersion,
      ...(this.opts.handshakeTimeoutMs !== undefined ? { timeoutMs: this.opts.handshakeTimeoutMs } : {}),
    })
      .then((hello) => this.attach(socket, hello))
      .catch((e: unknown) => {
        this.counters.handshakeFailures++;
        this.opts.log('warn', `handshake failed: ${(e as Error).message}`, { code: (e as KvmiError).code });
        socket.destroy();
      });
  }

  private attach(socket: Socket, hello: QemuHello): void {
    const generation = this.generations.next(hello.uuidText);
    const previous = this.vms.get(hello.uuidText);
    if (previous) void previous.detach('replaced by a new connection of the same VM');
    const vm = new VmConnection({
      hello,
      socket,
      sessionGeneration: generation,
      plan: this.opts.plan,
      decide: this.opts.decide,
      log: this.opts.log,
      ...(this.opts.maxQueuedBytes !== undefined ? { maxQueuedBytes: this.opts.maxQueuedBytes } : {}),
      onDetached: (v, reason) => {
        if (this.vms.get(v.uuid) === v) this.vms.delete(v.uuid);
        this.opts.onDetached?.(v, reason);
      },
    });
    this.vms.set(hello.uuidText, vm);
    vm.attach()
      .then((info) => {
        this.counters.attached++;
        this.opts.log('info', 'VM attached', { vm: info.uuid, name: info.name, vcpus: info.vcpuCount, generation });
        this.opts.onAttached?.(vm, info);
      })
      .catch((e: unknown) => {
        const closedEarly = e instanceof KvmiError && e.code === 'closed' && vm.session.stats.replies === 0;
        if (closedEarly) {
          this.counters.handshakeRefusedByQemu++;
          this.opts.log('warn', 'handshake refused by QEMU (cookie?)', { vm: hello.uuidText, name: hello.name });
        } else {
          this.counters.attachFailures++;
          this.opts.log('error', `attach failed: ${(e as Error).message}`, { vm: hello.uuidText });
        }
        vm.session.close();
        socket.destroy();
      });
  }

  /** Detach every VM (SIGTERM path), then stop listening. */
  async stop(deadlineMs = 1000): Promise<void> {
    for (const s of this.servers) s.close();
    await Promise.all([...this.vms.values()].map((vm) => vm.detach('agent shutting down', deadlineMs)));
  }
}
