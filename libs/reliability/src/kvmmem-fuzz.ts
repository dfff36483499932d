/**
 * Fuzzing the guest agent's `/dev/kvmmem` path against the simulated device (libs/simulator/src/kvmmem):
 *
 * - through the guest agent's own device layer (`connectSimKvmmem`, the N-API addon doing the mmaps):
 *   random sequences of open / map / unmap / close with hostile arguments — tokens spent, of another VM,
 *   of random bytes and lengths; gpas out of RAM, in a memslot hole, unaligned, 2^64-1, negative;
 *   UUIDs of the wrong VM or length; unmap of unknown, foreign and already-unmapped keys; calls on closed
 *   files. Every failure must be a typed error (`KvmmemError` with an errno name, or `GuestAgentError`
 *   with a code), never a crash or an untyped exception; every buffer of an unmapped mapping is detached;
 * - raw request frames into the simulated device's socket (bad request numbers, bad or missing
 *   arguments, non-JSON bodies, oversized and truncated frames): the device answers with an errno or
 *   closes, and never throws.
 *
 * At the end, with every file closed, no page may be mapped on the device and the process may hold no
 * more mappings of guest RAM than before (no leak of mappings).
 */
import net from 'node:net';
import { readFileSync } from 'node:fs';
import { connectSimKvmmem, GuestAgentError, KvmmemError, type KvmmemFile, type KvmmemMapping } from '@periscope/guest-agent';
import { mulberry32 } from './mutate.js';
import { sleep, waitFor, withTimeout } from './wait.js';

export interface KvmmemFuzzTarget {
  /** The simulated device's socket. */
  readonly kvmmemPath: string;
  /** UUIDs of the simulated host's VMs. */
  readonly vmUuids: readonly Uint8Array[];
  /** `n` fresh map tokens of VM `i` (KVMI GET_MAP_TOKEN). */
  tokens(i: number, n: number): Promise<Uint8Array[]>;
  /** Pages mapped on the device right now, over every connection. */
  mappedPages(): number;
}

export interface KvmmemFuzzOptions {
  readonly target: KvmmemFuzzTarget;
  readonly operations: number;
  readonly rawFrames: number;
  readonly seed?: number;
}

export interface KvmmemFuzzReport {
  readonly operations: number;
  /** Outcome counts: `ok`, or the error's errno name / code. */
  readonly outcomes: Record<string, number>;
  readonly mapsOk: number;
  /** GET_MAP_TOKEN answered EAGAIN (KVM bounds the tokens outstanding; foreign and random tokens leave some unused). */
  readonly tokenPoolExhausted: number;
  readonly rawFrames: number;
  /** Raw frames answered with an errno (vs the device closing the connection). */
  readonly rawAnswered: number;
  readonly rawClosed: number;
  readonly mappedPagesEnd: number;
  /** Lines of /proc/self/maps naming a guest RAM file, before and after. */
  readonly ramMappingsBefore: number;
  readonly ramMappingsAfter: number;
  /** The most guest RAM mappings seen while mapped (shows the count measures something). */
  readonly ramMappingsPeak: number;
  readonly failures: readonly string[];
}

const PAGE = 4096n;

function ramMappings(): number {
  return readFileSync('/proc/self/maps', 'utf8').split('\n').filter((l) => l.endsWith('.ram') || l.includes('.ram ')).length;
}

export async function runKvmmemFuzz(opts: KvmmemFuzzOptions): Promise<KvmmemFuzzReport> {
  const prng = mulberry32(opts.seed ?? 1);
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(prng() * xs.length)]!;
  const bytes = (n: number): Uint8Array => Uint8Array.from({ length: n }, () => Math.floor(prng() * 256));
  const t = opts.target;
  const failures: string[] = [];
  const outcomes: Record<string, number> = {};
  const uncaught = (e: unknown) => failures.push(`uncaught: ${(e as Error)?.stack ?? String(e)}`.slice(0, 800));
  process.on('uncaughtException', uncaught);
  process.on('unhandledRejection', uncaught);
  const ramBefore = ramMappings();
  const device = await connectSimKvmmem(t.kvmmemPath);
  const files: { f: KvmmemFile; opened: number | null; maps: KvmmemMapping[]; unmapped: KvmmemMapping[] }[] = [];
  const spent: Uint8Array[] = [];
  let mapsOk = 0;
  let tokenPoolExhausted = 0;
  let ramPeak = 0;

  const gpa = (): bigint => {
    const r = prng();
    if (r < 0.55) return BigInt(Math.floor(prng() * 0x1f00)) * PAGE + BigInt(Math.floor(prng() * 4096)); // in RAM (32 MiB guests)
    return pick([0xa0000n, 0xbf000n, 1n << 40n, (1n << 64n) - 1n, (1n << 64n) - PAGE, 1n << 64n, -1n, -PAGE, 0x1ffffffn, 0x2000000n]);
  };
  // Tokens KVM issued and no map consumed (refused before the hypercall): reused, as the guest agent's pool does;
  // KVM bounds the tokens outstanding per VM.
  const unused = t.vmUuids.map(() => [] as Uint8Array[]);
  const issued = new WeakSet<Uint8Array>();
  const issuedByVm = t.vmUuids.map(() => [] as Uint8Array[]);
  /** A token of VM `vm` nobody used yet, or undefined when KVM has none to give (EAGAIN). */
  const fresh = async (vm: number): Promise<Uint8Array | undefined> => {
    const pooled = unused[vm]!.pop();
    if (pooled) return pooled;
    try {
      const tk = (await t.tokens(vm, 1))[0]!;
      issued.add(tk);
      tokenOwner.set(tk, vm);
      issuedByVm[vm]!.push(tk);
      return tk;
    } catch {
      tokenPoolExhausted++;
      return undefined;
    }
  };
  const token = async (vm: number): Promise<Uint8Array> => {
    const r = prng();
    const tk = r < 0.5 ? await fresh(vm) : r < 0.65 ? spent[Math.floor(prng() * spent.length)] : r < 0.75 ? await fresh((vm + 1) % t.vmUuids.length) : undefined;
    return tk ?? bytes(pick([0, 1, 7, 8, 15, 16, 17, 32, 40]));
  };
  const tokenVm = (tk: Uint8Array): number => t.vmUuids.findIndex((_u, i) => tokenOwner.get(tk) === i);
  const tokenOwner = new WeakMap<Uint8Array, number>();
  const record = (name: string) => (outcomes[name] = (outcomes[name] ?? 0) + 1);
  /** Run one call; the outcome's name (`ok`, an errno name, `GuestAgentError:<code>`), or `failure`. */
  const attempt = async (what: string, p: Promise<unknown>): Promise<string> => {
    const r = await withTimeout(
      p.then(
        () => 'ok' as const,
        (e: unknown) => e,
      ),
      10_000,
    );
    let name = 'failure';
    if (r === 'timeout') failures.push(`${what}: no answer within 10 s`);
    else if (r === 'ok') name = 'ok';
    else if (r instanceof KvmmemError) name = r.code;
    else if (r instanceof GuestAgentError) name = `GuestAgentError:${r.code}`;
    else failures.push(`${what}: untyped error ${(r as Error)?.name}: ${(r as Error)?.message}`);
    if (name !== 'failure') record(name);
    return name;
  };

  try {
    for (let i = 0; i < opts.operations && failures.length < 10; i++) {
      const r = prng();
      if (files.length === 0 || (r < 0.05 && files.length < 4)) {
        files.push({ f: await device.openFile(), opened: null, maps: [], unmapped: [] });
        continue;
      }
      const file = pick(files);
      if (r < 0.15) {
        // OPEN: the right VM, another VM (twice = EALREADY), random or wrong-length UUIDs.
        const vm = Math.floor(prng() * t.vmUuids.length);
        const uuid = prng() < 0.7 ? t.vmUuids[vm]! : bytes(pick([0, 15, 16, 17, 64]));
        if ((await attempt('open', file.f.open(uuid))) === 'ok') file.opened ??= vm;
      } else if (r < 0.6) {
        const vm = file.opened ?? Math.floor(prng() * t.vmUuids.length);
        const tk = await token(vm);
        const g = gpa();
        let m: KvmmemMapping | undefined;
        const outcome = await attempt(
          'map',
          file.f.map(tk, g).then((x) => {
            m = x;
          }),
        );
        const ok = outcome === 'ok';
        // Refused before the hypercall (kvmmem.md: argument checks, EALREADY, OPEN first): the token is intact.
        const consumed = !['EINVAL', 'EALREADY', 'GuestAgentError:closed'].includes(outcome);
        if (issued.has(tk) && !consumed && tokenVm(tk) >= 0) unused[tokenVm(tk)]!.push(tk);
        else spent.push(tk);
        if (spent.length > 64) spent.shift();
        if (ok && m) {
          mapsOk++;
          // Touch the zero-copy view: first and last byte.
          const view = new Uint8Array(m.buffer);
          if (view.length !== m.length) failures.push(`map: buffer of ${view.length} bytes for a ${m.length}-byte mapping`);
          void (view[0]! + view[view.length - 1]!);
          file.maps.push(m);
          ramPeak = Math.max(ramPeak, ramMappings());
        }
      } else if (r < 0.85) {
        // UNMAP: a live mapping, one already unmapped, or a raw key (unknown, unaligned, negative, huge).
        const s = prng();
        if (s < 0.5 && file.maps.length) {
          const m = file.maps.splice(Math.floor(prng() * file.maps.length), 1)[0]!;
          await attempt('unmap', file.f.unmap(m));
          if (m.buffer.byteLength !== 0) failures.push('unmap: the buffer of an unmapped mapping is still attached');
          file.unmapped.push(m);
        } else if (s < 0.7 && file.unmapped.length) await attempt('unmap twice', file.f.unmap(pick(file.unmapped)));
        else await attempt('unmap raw', file.f.unmap(pick([0n, 1n, PAGE, -1n, (1n << 64n) - 1n, 1n << 64n, BigInt(Math.floor(prng() * 2 ** 40))])));
      } else if (r < 0.93) {
        // Close (mappings detached), then keep the closed file around for calls on it.
        await attempt('close', file.f.close());
        for (const m of file.maps) if (m.buffer.byteLength !== 0) failures.push('close: a buffer of the closed file is still attached');
        file.maps = [];
        if (prng() < 0.5) {
          await attempt('map on a closed file', file.f.map(bytes(16), 0x1000n));
          await attempt('open on a closed file', file.f.open(t.vmUuids[0]!));
        }
        files.splice(files.indexOf(file), 1);
      } else await attempt('unmap foreign', file.f.unmap(pick(files).maps[0] ?? 0x1000n));
    }
    for (const file of files) await attempt('close', file.f.close());
    files.length = 0;

    // Raw frames into the simulated device.
    let rawAnswered = 0;
    let rawClosed = 0;
    const reqs = [0x4008690a, 0x4008690b, 0x40086901, 0xc0306902, 0x40086903, 0, 1, 0xffffffff, -1, 0x6901, 2 ** 53];
    for (let sent = 0; sent < opts.rawFrames && failures.length < 10; ) {
      const sock = net.createConnection(t.kvmmemPath);
      sock.on('error', () => undefined);
      await new Promise<void>((r) => sock.once('connect', () => r()));
      let answers = 0;
      let buf = Buffer.alloc(0);
      sock.on('data', (d: Buffer) => {
        buf = Buffer.concat([buf, d]);
        while (buf.length >= 4 && buf.length >= 4 + buf.readUInt32LE(0)) {
          buf = buf.subarray(4 + buf.readUInt32LE(0));
          answers++;
        }
      });
      const closedP = new Promise<void>((r) => sock.once('close', () => r()));
      let expected = 0;
      for (let k = 0; k < 10 && sent < opts.rawFrames; k++, sent++) {
        const s = prng();
        let body: Buffer;
        if (s < 0.6) {
          const args: Record<string, unknown> = { id: k + 1, pid: prng() < 0.9 ? process.pid : Math.floor(prng() * 1e6), req: pick(reqs) };
          for (const key of ['token', 'gpa', 'gva', 'uuid', 'start', 'addr']) {
            if (prng() < 0.5) args[key] = pick(['', '0x', '0xzz', '0x1000', '-1', '0xffffffffffffffffff', Buffer.from(bytes(16)).toString('hex'), 12, null, [], {}, 'x'.repeat(5000)]);
          }
          body = Buffer.from(JSON.stringify(args));
          expected++;
        } else if (s < 0.8) body = Buffer.from(bytes(Math.floor(prng() * 200)));
        else body = Buffer.from('{"id": 1, "req": ');
        const frame = Buffer.alloc(4 + body.length);
        const lie = prng() < 0.1;
        frame.writeUInt32LE(lie ? pick([0, 70_000, 0xffffffff]) : body.length, 0);
        body.copy(frame, 4);
        if (!sock.destroyed) sock.write(frame);
      }
      sock.end();
      await withTimeout(closedP, 5000);
      sock.destroy();
      rawAnswered += answers;
      if (answers < expected) rawClosed++;
    }
    // The device still serves a well-formed request after all that.
    const f = await device.openFile();
    await f.open(t.vmUuids[0]!);
    // A token KVM still honours: a fresh one, or (KVM's bound on outstanding tokens reached: tokens refused
    // without being consumed stay outstanding) one issued earlier and never consumed.
    let m: KvmmemMapping | undefined;
    for (const tk of [await fresh(0), ...issuedByVm[0]!.slice().reverse()]) {
      if (!tk) continue;
      try {
        m = await f.map(tk, 0x100000n);
        break;
      } catch (e) {
        if (!(e instanceof KvmmemError) || e.code !== 'EPERM') throw e;
      }
    }
    if (!m) throw new Error('the final healthy map found no usable token');
    if (m.length <= 0) failures.push('a healthy map after the fuzzing returned an empty mapping');
    await f.close();
    mapsOk++;

    await waitFor(() => t.mappedPages() === 0, 5000);
    await sleep(50);
    const ramAfter = ramMappings();
    if (t.mappedPages() !== 0) failures.push(`${t.mappedPages()} pages still mapped on the device after every file was closed`);
    if (ramAfter > ramBefore) failures.push(`${ramAfter - ramBefore} guest RAM mappings left in this process (${ramBefore} before)`);
    return { operations: opts.operations, outcomes, mapsOk, tokenPoolExhausted, rawFrames: opts.rawFrames, rawAnswered, rawClosed, mappedPagesEnd: t.mappedPages(), ramMappingsBefore: ramBefore, ramMappingsAfter: ramAfter, ramMappingsPeak: ramPeak, failures };
  } catch (e) {
    failures.push(`campaign: ${(e as Error).stack ?? String(e)}`);
    return { operations: opts.operations, outcomes, mapsOk, tokenPoolExhausted, rawFrames: opts.rawFrames, rawAnswered: 0, rawClosed: 0, mappedPagesEnd: t.mappedPages(), ramMappingsBefore: ramBefore, ramMappingsAfter: ramMappings(), ramMappingsPeak: ramPeak, failures };
  } finally {
    for (const file of files) await file.f.close().catch(() => undefined);
    process.off('uncaughtException', uncaught);
    process.off('unhandledRejection', uncaught);
  }
}
