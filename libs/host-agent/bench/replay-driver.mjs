// The C replay generator's driver, shared by the host agent benches that play KVM + QEMU from C
// (throughput.mjs: B3 events/s; link.mjs: B2 ask-central stall). Nothing here is encoded by hand: the
// frames the generator sends come from a transcript recorded against the real simulator through a tapping
// proxy (recordingProxy), written to a templates file (templatesFile) that replay.c reads.
//
//   buildReplay(dir)          compile replay.c with the system cc into dir → the binary's path
//   recordingProxy(front, back), templatesFile(rec, path, eventIdx)
//   startGen(bin, args) / measured(g, pids, extra) / stopGen(g)
//   track(child)              kill the child with this process; cpuSample/cpuPercent, loadavg, vmStates, metric
import { execFileSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { request } from 'node:http';
import { createConnection, createServer } from 'node:net';
import { dirname, join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { spawn } from 'node:child_process';

const here = dirname(fileURLToPath(import.meta.url));

/** Compile replay.c (-O2, warnings as errors) into `dir`; returns the binary's path. */
export function buildReplay(dir) {
  const bin = join(dir, 'replay');
  execFileSync('cc', ['-std=c11', '-O2', '-Wall', '-Wextra', '-Werror', '-o', bin, join(here, 'replay.c')], { stdio: 'inherit' });
  return bin;
}

/**
 * A loopback TCP port free right now (bound to 0 by the kernel, then released) for an agent's --metrics-listen.
 * A random port could be one of the many ephemeral ports a concurrent test run has open (`npm test` runs the
 * short bench beside everything else), and the agent would not start.
 */
export async function freePort() {
  const { createServer } = await import('node:net');
  const s = createServer();
  await new Promise((r, reject) => s.once('error', reject).listen(0, '127.0.0.1', r));
  const { port } = s.address();
  await new Promise((r) => s.close(r));
  return port;
}
export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
export async function until(cond, ms = 60000, what = 'condition') {
  const t0 = Date.now();
  while (!(await cond())) {
    if (Date.now() - t0 > ms) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

const children = new Set();
process.on('exit', () => {
  for (const c of children) c.kill('SIGKILL');
});
export function track(child) {
  children.add(child);
  child.once('exit', () => children.delete(child));
  return child;
}


// ---- /proc CPU accounting ----------------------------------------------------------------------------
const CLK_TCK = (() => {
  try {
    return Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100;
  } catch {
    return 100;
  }
})();
export function cpuTicks(pid) {
  const s = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const f = s.slice(s.lastIndexOf(')') + 2).split(' ');
  return Number(f[11]) + Number(f[12]); // utime, stime (fields 14, 15)
}
export const cpuSample = (pids) => ({ t: performance.now(), ticks: Object.fromEntries(Object.entries(pids).map(([k, p]) => [k, cpuTicks(p)])) });
export function cpuPercent(a, b) {
  const secs = (b.t - a.t) / 1000;
  return Object.fromEntries(Object.keys(a.ticks).map((k) => [k, Math.round(((b.ticks[k] - a.ticks[k]) / CLK_TCK / secs) * 1000) / 10]));
}
export function loadavg() {
  return readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).map(Number);
}

// ---- HTTP helpers ------------------------------------------------------------------------------------
export function get(opts) {
  return new Promise((resolve, reject) => {
    const req = request(opts, (res) => {
      let b = '';
      res.on('data', (c) => (b += c));
      res.on('end', () => resolve(b));
    });
    req.on('error', reject);
    req.end();
  });
}
export async function vmStates(dir) {
  return JSON.parse(await get({ socketPath: join(dir, 'api.sock'), path: '/v1/vms' })).vms;
}
/** The sum of a metric's series from the agent's /metrics; `label` (e.g. 'outcome="central"') picks series. */
export async function metric(port, name, label) {
  const text = await get({ host: '127.0.0.1', port, path: '/metrics' });
  let sum = 0;
  for (const line of text.split('\n')) {
    if (!line.startsWith(name) || (line[name.length] !== ' ' && line[name.length] !== '{')) continue;
    if (label && !line.slice(name.length, line.lastIndexOf(' ')).includes(label)) continue;
    sum += Number(line.slice(line.lastIndexOf(' ') + 1));
  }
  return sum;
}

// ---- 1. recording the transcript ---------------------------------------------------------------------
/** A tapping proxy between the simulated QEMU (connecting to `front`) and the agent (listening on `back`). */
export function recordingProxy(front, back) {
  const rec = { handshake: null, hsReply: null, cmdReplies: new Map(), events: [], eventReplies: [] };
  const pending = new Map(); // seq → command id (agent → sim)
  const parser = (skip, onFirst, onFrame) => {
    let buf = Buffer.alloc(0);
    let first = true;
    return (chunk) => {
      buf = Buffer.concat([buf, chunk]);
      if (first) {
        if (buf.length < skip) return;
        onFirst(Buffer.from(buf.subarray(0, skip)));
        buf = buf.subarray(skip);
        first = false;
      }
      while (buf.length >= 8) {
        const size = buf.readUInt16LE(2);
        if (buf.length < 8 + size) break;
        onFrame(Buffer.from(buf.subarray(0, 8 + size)));
        buf = buf.subarray(8 + size);
      }
    };
  };
  const server = createServer((qemu) => {
    const agent = createConnection(back);
    qemu.on('error', () => agent.destroy());
    agent.on('error', () => qemu.destroy());
    qemu.on('close', () => agent.destroy());
    agent.on('close', () => qemu.destroy());
    const fromQemu = parser(104, (hs) => (rec.handshake ??= hs), (f) => {
      const id = f.readUInt16LE(0);
      const seq = f.readUInt32LE(4);
      if (id === 1) rec.events.push(f);
      else if (pending.get(seq) === id) {
        pending.delete(seq);
        const ok = f.length >= 12 && f.readInt32LE(8) === 0;
        const have = rec.cmdReplies.get(id);
        if (!have || (ok && !have.ok)) rec.cmdReplies.set(id, { ok, frame: f });
      }
    });
    const fromAgent = parser(24, (r) => (rec.hsReply ??= r), (f) => {
      const id = f.readUInt16LE(0);
      if (id === 1) rec.eventReplies.push(f);
      else pending.set(f.readUInt32LE(4), id);
    });
    qemu.on('data', (c) => {
      fromQemu(c);
      agent.write(c);
    });
    agent.on('data', (c) => {
      fromAgent(c);
      qemu.write(c);
    });
  });
  return { rec, server, listen: () => new Promise((r) => server.listen(front, r)) };
}

export function templatesFile(rec, path, eventIdx) {
  const parts = [];
  const put = (type, key, bytes) => {
    const h = Buffer.alloc(12);
    h.writeUInt32LE(type, 0);
    h.writeUInt32LE(key, 4);
    h.writeUInt32LE(bytes.length, 8);
    parts.push(h, bytes);
  };
  put(1, 0, rec.handshake);
  put(2, 0, rec.hsReply);
  for (const [id, r] of rec.cmdReplies) put(3, id, r.frame);
  eventIdx.forEach((i, k) => {
    put(4, k, rec.events[i]);
    put(5, k, rec.eventReplies[i]);
  });
  writeFileSync(path, Buffer.concat(parts));
}

// ---- the generator ------------------------------------------------------------------------------------
export function startGen(bin, args) {
  const gen = track(spawn(bin, ['gen', ...args], { stdio: ['pipe', 'pipe', 'inherit'] }));
  const lines = createInterface({ input: gen.stdout });
  const waiters = [];
  const seen = [];
  lines.on('line', (l) => {
    const w = waiters.findIndex((x) => x.test(l));
    if (w >= 0) waiters.splice(w, 1)[0].resolve(l);
    else seen.push(l);
  });
  const exited = new Promise((_, reject) => gen.once('exit', (code) => reject(new Error(`replay generator exited (${code})`))));
  exited.catch(() => undefined);
  const line = (test) => {
    const i = seen.findIndex((l) => test(l));
    if (i >= 0) return Promise.resolve(seen.splice(i, 1)[0]);
    return Promise.race([new Promise((resolve) => waiters.push({ test, resolve })), exited]);
  };
  return { gen, line, go: () => gen.stdin.write('go\n') };
}

export async function stopGen(g) {
  g.gen.stdin.end();
  if (g.gen.exitCode === null) await new Promise((r) => g.gen.once('exit', r));
}

/** Run the generator's go → measure → result cycle, sampling CPU (and `extra`) at both ends. */
export async function measured(g, pids, extra = async () => ({})) {
  g.go();
  await g.line((l) => l === 'measure');
  const a = cpuSample({ ...pids, generator: g.gen.pid });
  const ea = await extra();
  const result = JSON.parse(await g.line((l) => l.startsWith('{')));
  const b = cpuSample({ ...pids, generator: g.gen.pid });
  const eb = await extra();
  return { result, cpu: cpuPercent(a, b), seconds: (b.t - a.t) / 1000, extraBefore: ea, extraAfter: eb };
}
