/**
 * A peer that stalls mid-message: a transparent proxy between a simulated QEMU/KVM and the host agent
 * that, once armed with `stallNextFrame()`, forwards only the first half of the next frame KVM sends
 * (an event or a command reply) and then nothing more towards the agent — the socket stays open and
 * silent. The real attach sequence runs through it first, so the stall hits an attached, protected VM.
 */
import net from 'node:net';
import { rmSync } from 'node:fs';
import { StreamSplitter } from './proxy.js';

export class StallProxy {
  private server: net.Server | null = null;
  private readonly sockets = new Set<net.Socket>();
  private armed = false;
  /** Frames cut in half so far; after a cut the connection forwards nothing more to the agent. */
  stalledFrames = 0;
  /** Connections the agent closed. */
  closedByAgent = 0;

  constructor(
    readonly listenPath: string,
    readonly agentPath: string,
  ) {}

  async start(): Promise<void> {
    rmSync(this.listenPath, { force: true });
    this.server = net.createServer((qemu) => this.onQemu(qemu));
    await new Promise<void>((resolve, reject) => {
      this.server!.once('error', reject);
      this.server!.listen(this.listenPath, () => resolve());
    });
  }

  /** The next frame from KVM is cut in half; the connection then goes silent towards the agent. */
  stallNextFrame(): void {
    this.armed = true;
  }

  async stop(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((r) => (this.server ? this.server.close(() => r()) : r()));
    rmSync(this.listenPath, { force: true });
  }

  private onQemu(qemu: net.Socket): void {
    const agent = net.createConnection(this.agentPath);
    this.sockets.add(qemu);
    this.sockets.add(agent);
    let silent = false;
    const close = (byAgent: boolean) => {
      if (byAgent && !agent.destroyed) this.closedByAgent++;
      qemu.destroy();
      agent.destroy();
      this.sockets.delete(qemu);
      this.sockets.delete(agent);
    };
    qemu.on('error', () => close(false));
    qemu.on('close', () => close(false));
    agent.on('error', () => close(true));
    agent.on('close', () => close(true));
    const fromQemu = new StreamSplitter(true);
    qemu.on('data', (chunk: Buffer) => {
      if (silent) return;
      fromQemu.push(
        chunk,
        (hs) => agent.write(hs),
        (frame) => {
          if (silent) return;
          if (this.armed) {
            this.armed = false;
            silent = true;
            this.stalledFrames++;
            agent.write(frame.subarray(0, Math.max(1, frame.length >> 1)));
            return;
          }
          agent.write(frame);
        },
        (raw) => agent.write(raw),
      );
    });
    agent.on('data', (chunk: Buffer) => {
      if (!qemu.destroyed) qemu.write(chunk);
    });
  }
}
