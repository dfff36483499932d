/**
 * `periscope host-agent --analysis` as a real process when analysis never came up (issue #7): SIGTERM stops
 * the agent at once whatever the link state. Before the fix, grpc-js's `waitForReady` deadline timer (the
 * link backoff maximum) survived `close()` and kept the process alive until it fired. The backoff maximum
 * here is 60 s, so the old behaviour would blow the generous bound below; the time itself is reported by the
 * bench/manual run, not asserted tightly (machines are loaded). Also: `--analysis` takes a comma-separated
 * list of replicas, tried in turn.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterEach, describe, expect, it } from 'vitest';
import { splitAnalysisFlag } from '../src/main.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '../../..');
const bin = join(root, 'bin/periscope');
const cleanups: (() => void)[] = [];
afterEach(() => {
  while (cleanups.length) cleanups.pop()!();
});

/** A loopback port nobody listens on (bound, then released). */
async function deadPort(): Promise<number> {
  const s = createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  const port = (s.address() as { port: number }).port;
  await new Promise<void>((r) => s.close(() => r()));
  return port;
}

async function until(cond: () => boolean, ms: number, what: string): Promise<void> {
  const t0 = Date.now();
  while (!cond()) {
    if (Date.now() - t0 > ms) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

describe('periscope host-agent: link shutdown and replica list', () => {
  it('splits --analysis A,B into one flag per replica (also --analysis=A,B); leaves single values alone', () => {
    expect(splitAnalysisFlag(['--analysis', '10.0.0.1:7400,10.0.0.2:7400', '--x', 'y'])).toEqual(['--analysis', '10.0.0.1:7400', '--analysis', '10.0.0.2:7400', '--x', 'y']);
    expect(splitAnalysisFlag(['--analysis=a:1, b:2'])).toEqual(['--analysis', 'a:1', '--analysis', 'b:2']);
    expect(splitAnalysisFlag(['--analysis', 'a:1', '--analysis=b:2'])).toEqual(['--analysis', 'a:1', '--analysis=b:2']);
    expect(splitAnalysisFlag(['--analysis'])).toEqual(['--analysis']);
  });

  for (const when of ['while connecting', 'after several failed rounds'] as const) {
    it(`SIGTERM exits at once when analysis never came up (${when}; a list of two replicas)`, async () => {
      const dir = mkdtempSync(join(tmpdir(), 'hal-'));
      cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
      const [p1, p2] = [await deadPort(), await deadPort()];
      const child: ChildProcess = spawn(
        process.execPath,
        [bin, 'host-agent', '--kvmi-listen', `unix:${dir}/k.sock`, '--analysis', `127.0.0.1:${p1},127.0.0.1:${p2}`, '--link-backoff-max', '60s'],
        { stdio: ['ignore', 'ignore', 'pipe'] },
      );
      cleanups.push(() => child.kill('SIGKILL'));
      let stderr = '';
      child.stderr!.on('data', (c: Buffer) => (stderr += c.toString()));
      await until(() => stderr.includes('host agent running'), 30_000, 'the agent running');
      expect(stderr).toContain(`"analysis":["127.0.0.1:${p1}","127.0.0.1:${p2}"]`);
      await until(() => stderr.includes('cannot connect, retrying'), 30_000, 'a failed connection attempt');
      if (when === 'after several failed rounds') await new Promise((r) => setTimeout(r, 1500));
      const exited = new Promise<number | null>((res) => child.once('exit', (c) => res(c)));
      const t0 = Date.now();
      child.kill('SIGTERM');
      const code = await Promise.race([exited, new Promise<'hung'>((res) => setTimeout(() => res('hung'), 20_000))]);
      const ms = Date.now() - t0;
      expect(code, `still running ${ms} ms after SIGTERM`).toBe(0);
      expect(stderr).toContain('SIGTERM: detaching every VM');
      expect(stderr).not.toContain('second SIGTERM');
    }, 60_000);
  }
});
