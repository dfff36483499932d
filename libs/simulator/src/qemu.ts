/**
 * The simulated device manager (QEMU with the KVM-VMI introspection object), one per VM
 * (kvmi-v7-libkvmi.md §3, kvmi-v12.md §7.1):
 *
 * - connects to the introspector's Unix socket (`-chardev socket,path=…,reconnect=N`) and retries every
 *   `reconnectSeconds` while it is refused, after a failed handshake and after every disconnect;
 * - performs the handshake (104-byte form by default, 96 optionally) under a 10 s deadline, checking the
 *   cookie hash when it has a key (without one it accepts any hash and logs that the tool is not
 *   authenticated);
 * - hooks the VM with the connected socket and allows commands and events (all by default, as QEMU's
 *   `id = −1`); any bytes the tool sent after the handshake go to the kernel side first;
 * - on disconnect: UNHOOK, then reconnect later;
 * - on shutdown: PREUNHOOK; if the UNHOOK event was sent, waits (bounded) for the tool to close the
 *   socket, then UNHOOK; otherwise disconnects and unhooks at once.
 */
import net from 'node:net';

import { performQemuHandshake, type KvmiWireError } from '@periscope/kvmi';

import { hostErrnoName } from './errors.js';
import type { SimVm } from './kvm/vm.js';

export interface SimQemuOptions {
  /** The introspector's Unix socket path. */
  path: string;
  /** Handshake struct: 104 (current QEMU, with max_gpa) or 96 (older). Default 104. */
  handshake?: 96 | 104;
  /** The secret of QEMU's `key=` object; without it any cookie hash is accepted. */
  key?: Uint8Array;
  /** Chardev `reconnect=N`. Default 1 s. */
  reconnectSeconds?: number;
  /** QEMU `handshake_timeout`. Default 10 000 ms. */
  handshakeTimeoutMs?: number;
  /** QEMU `unhook_timeout`: how long shutdown waits for the tool after PREUNHOOK. Default 60 000 ms. */
  unhookTimeoutMs?: number;
  /** Command ids to allow after HOOK; default 'all' (KVM_INTROSPECTION_COMMAND id −1). */
  allowCommands?: 'all' | readonly number[];
  /** Event ids to allow after HOOK; default 'all'. */
  allowEvents?: 'all' | readonly number[];
  /** Delay between seeing a disconnect and calling UNHOOK (tests observe the state in between). Default 0. */
  unhookDelayMs?: number;
  log?: (line: string) => void;
}

export type SimQemuState = 'idle' | 'connecting' | 'handshake' | 'hooked' | 'waiting-reconnect' | 'shutting-down' | 'stopped';

export interface SimQemuStats {
  connectAttempts: number;
  handshakes: number;
  handshakeFailures: number;
  hooks: number;
  hookFailures: number;
  disconnects: number;
  /** The last handshake was authenticated (a key was set and matched). */
  authenticated: boolean;
  lastError: string | undefined;
}

export interface ShutdownReport {
  /** PREUNHOOK result: 0 (UNHOOK event sent), or the errno name; 'not-hooked' when there was nothing to do. */
  preunhook: string;
  /** The tool closed the socket before the unhook timeout. */
  closedByTool: boolean;
  waitedMs: number;
}

export class SimQemu {
  readonly vm: SimVm;
  private readonly opts: Required<Omit<SimQemuOptions, 'key' | 'log'>> & Pick<SimQemuOptions, 'key'>;
  private readonly log: (line: string) => void;
  private state_: SimQemuState = 'idle';
  private socket: net.Socket | null = null;
  private timer: NodeJS.Timeout | null = null;
  private running = false;
  private hookedWaiters: Array<() => void> = [];
  readonly stats: SimQemuStats = {
    connectAttempts: 0, handshakes: 0, handshakeFailures: 0, hooks: 0, hookFailures: 0, disconnects: 0,
    authenticated: false, lastError: undefined,
  };

  constructor(vm: SimVm, options: SimQemuOptions) {
    this.vm = vm;
    this.opts = {
      path: options.path,
      handshake: options.handshake ?? 104,
      key: options.key,
      reconnectSeconds: options.reconnectSeconds ?? 1,
      handshakeTimeoutMs: options.handshakeTimeoutMs ?? 10_000,
      unhookTimeoutMs: options.unhookTimeoutMs ?? 60_000,
      allowCommands: options.allowCommands ?? 'all',
      allowEvents: options.allowEvents ?? 'all',
      unhookDelayMs: options.unhookDelayMs ?? 0,
    };
    this.log = options.log ?? (() => undefined);
    vm.on('connection-lost', this.onConnectionLost);
  }

  get state(): SimQemuState {
    return this.state_;
  }

  /** Start connecting (and keep reconnecting until `shutdown`/`stop`). */
  start(): void {
    if (this.running) return;
    this.running = true;
    this.connect();
  }

  /** Resolves the next time the VM is hooked (immediately if it is). */
  waitHooked(): Promise<void> {
    if (this.state_ === 'hooked' && this.vm.connected) return Promise.resolve();
    return new Promise((resolve) => this.hookedWaiters.push(resolve));
  }

  /**
   * Guest shutdown with `unhook_on_shutdown`: PREUNHOOK, wait for the tool to close (bounded by the
   * unhook timeout), UNHOOK. Stops reconnecting.
   */
  async shutdown(): Promise<ShutdownReport> {
    this.running = false;
    this.clearTimer();
    this.state_ = 'shutting-down';
    const vm = this.vm;
    let report: ShutdownReport = { preunhook: 'not-hooked', closedByTool: false, waitedMs: 0 };
    if (vm.hooked) {
      const r = vm.preunhook();
      if (r !== 0 || !vm.connected) {
        report = { preunhook: hostErrnoName(r), closedByTool: false, waitedMs: 0 };
        vm.unhook();
      } else {
        const started = Date.now();
        const closed = await new Promise<boolean>((resolve) => {
          if (!vm.connected) return resolve(true);
          const onLost = (): void => {
            clearTimeout(t);
            resolve(true);
          };
          const t = setTimeout(() => {
            vm.off('connection-lost', onLost);
            resolve(false);
          }, this.opts.unhookTimeoutMs);
          vm.once('connection-lost', onLost);
        });
        report = { preunhook: '0', closedByTool: closed, waitedMs: Date.now() - started };
        vm.unhook();
      }
    }
    this.socket?.destroy();
    this.socket = null;
    this.state_ = 'stopped';
    vm.off('connection-lost', this.onConnectionLost);
    return report;
  }

  /** Stop at once: disconnect and unhook without PREUNHOOK (a killed QEMU / destroyed VM). */
  stop(): void {
    this.running = false;
    this.clearTimer();
    this.state_ = 'stopped';
    this.vm.unhook();
    this.socket?.destroy();
    this.socket = null;
    this.vm.off('connection-lost', this.onConnectionLost);
  }

  private clearTimer(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
  }

  private scheduleReconnect(): void {
    if (!this.running) return;
    this.state_ = 'waiting-reconnect';
    this.clearTimer();
    this.timer = setTimeout(() => {
      this.timer = null;
      this.connect();
    }, this.opts.reconnectSeconds * 1000);
  }

  private connect(): void {
    if (!this.running) return;
    this.state_ = 'connecting';
    this.stats.connectAttempts++;
    const socket = net.createConnection(this.opts.path);
    this.socket = socket;
    const onError = (err: Error): void => {
      this.stats.lastError = err.message;
      socket.destroy();
      if (this.socket === socket) this.socket = null;
      this.scheduleReconnect();
    };
    socket.once('error', onError);
    socket.once('connect', () => {
      socket.off('error', onError);
      // Late socket errors (resets) are seen by whoever owns the socket; never crash the process.
      socket.on('error', (err) => {
        this.stats.lastError = err.message;
      });
      void this.handshake(socket);
    });
  }

  private async handshake(socket: net.Socket): Promise<void> {
    this.state_ = 'handshake';
    const vm = this.vm;
    let leftover: Buffer;
    try {
      const r = await performQemuHandshake(socket, {
        form: this.opts.handshake,
        uuid: vm.uuid,
        name: vm.name,
        startTimeMs: vm.startTimeMs,
        maxGpa: vm.memory.maxGpa,
        ...(this.opts.key ? { key: this.opts.key } : {}),
        timeoutMs: this.opts.handshakeTimeoutMs,
      });
      leftover = r.leftover;
      this.stats.authenticated = r.authenticated;
      if (!r.authenticated) this.log(`${vm.name}: the introspection tool is not authenticated (no key set)`);
    } catch (err) {
      this.stats.handshakeFailures++;
      const e = err as KvmiWireError;
      this.stats.lastError = `handshake: ${e.message}`;
      this.log(`${vm.name}: handshake failed (${e.code ?? 'error'}): ${e.message}`);
      socket.destroy();
      if (this.socket === socket) this.socket = null;
      this.scheduleReconnect();
      return;
    }
    this.stats.handshakes++;
    if (!this.running) {
      socket.destroy();
      return;
    }
    const rc = vm.hook(socket, vm.uuid, { leftover });
    if (rc !== 0) {
      this.stats.hookFailures++;
      this.stats.lastError = `KVM_INTROSPECTION_HOOK: ${hostErrnoName(rc)}`;
      this.log(`${vm.name}: KVM_INTROSPECTION_HOOK failed: ${hostErrnoName(rc)}` + (rc === 1 ? ' (reload kvm with kvm.introspection=on)' : ''));
      socket.destroy();
      if (this.socket === socket) this.socket = null;
      this.scheduleReconnect();
      return;
    }
    this.stats.hooks++;
    this.allow('command', this.opts.allowCommands);
    this.allow('event', this.opts.allowEvents);
    this.state_ = 'hooked';
    const waiters = this.hookedWaiters;
    this.hookedWaiters = [];
    for (const w of waiters) w();
  }

  private allow(kind: 'command' | 'event', ids: 'all' | readonly number[]): void {
    const call = (id: number): number => (kind === 'command' ? this.vm.allowCommand(id, 1) : this.vm.allowEvent(id, 1));
    for (const id of ids === 'all' ? [-1] : ids) {
      const rc = call(id);
      if (rc !== 0) this.log(`${this.vm.name}: KVM_INTROSPECTION_${kind.toUpperCase()} ${id}: ${hostErrnoName(rc)}`);
    }
  }

  /** The chardev saw HUP: UNHOOK and reconnect later. */
  private readonly onConnectionLost = (): void => {
    if (this.state_ !== 'hooked') return;
    this.stats.disconnects++;
    this.socket = null;
    const unhookNow = (): void => {
      if (this.state_ === 'shutting-down' || this.state_ === 'stopped') return;
      this.vm.unhook();
      this.scheduleReconnect();
    };
    this.state_ = 'waiting-reconnect';
    if (this.opts.unhookDelayMs > 0) setTimeout(unhookNow, this.opts.unhookDelayMs);
    else unhookNow();
  };
}
