#!/usr/bin/env node
// Local-verdict benchmark (run after `tsc -b`; `npm run bench` does both through nx).
//
// For 100+-rule policies (generatePolicy: seeded filler rules in front of the shipped default policy) and
// CR / PF events built with @periscope/kvmi's encodeVcpuEvent:
//   - ns per verdict: VcpuEventView.reset + Evaluator.evaluate(view), median of 5 × 100k after 20k warm-up;
//   - bytes per verdict: V8 young-generation bytes across 5 000 verdicts after a full GC, in a child with a
//     fixed 128 MiB semi-space so no scavenge runs inside the loop (the method of libs/kvmi/bench/run.mjs);
//   - the same with the reply written (`verdict.writeReply`: materialises new_val for CR/MSR);
//   - the same-run baseline: the decisions of the four mixed-policy events hand-coded (the frame's header
//     and the matching rule's fields read with readUInt*/readInt32LE, compared with the rule's constants),
//     timed in runs alternating with the mixed-policy verdict of the same event.
// The child runs with --no-concurrent-recompilation: hot functions are optimised synchronously, so the
// allocation loop always runs optimised code (with background compilation it sometimes ran the
// unoptimised code, which boxes numbers, and read 16–32 B per verdict that the optimised code never makes).
//
//   node libs/verdicts/bench/run.mjs [--json] [--short]
// `--json`: the human table goes to stderr and stdout gets one JSON line (read by bench/run.mjs, figures
// B1.codec.verdict*: the `mixed` summary). `--short`: median of 5 × 10k instead of 5 × 100k.
import { spawnSync } from 'node:child_process';
import { cpus } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import v8 from 'node:v8';
import { microTimer } from '../../../bench/lib/micro.mjs';

const here = dirname(fileURLToPath(import.meta.url));
const SHORT = process.argv.includes('--short');
const JSON_OUT = process.argv.includes('--json');
const say = JSON_OUT ? (...a) => console.error(...a) : (...a) => console.log(...a);

function newSpaceUsed() {
  return v8.getHeapSpaceStatistics().find((sp) => sp.space_name === 'new_space').space_used_size;
}

async function child() {
  const kvmi = await import('@periscope/kvmi');
  const lib = await import(join(here, '../dist/index.js'));
  const arch = kvmi.structs.kvmi_vcpu_event_arch.zero();
  arch.mode = 8;
  arch.regs.rip = 0xffffffff81234567n;
  const ev = (event, data) => kvmi.encodeVcpuEvent({ event, seq: 7, vcpu: 1, arch, data });
  const events = {
    'CR4 clears SMEP → deny (forceBits)': ev('CR', { cr: 4, old_value: 0x3406f0n, new_value: 0x2406f0n }),
    'CR0 benign write → default allow': ev('CR', { cr: 0, old_value: 0x80050033n, new_value: 0x80050031n }),
    'PF write to kernel text → skip': ev('PF', { gva: 0xffffffff81000000n, gpa: 0x1000000n, access: 2 }),
    'PF read elsewhere → default allow': ev('PF', { gva: 0x7f0000001000n, gpa: 0x5000000n, access: 1 }),
  };
  const policies = {
    mixed: lib.generatePolicy({ count: 120 }),
    'CR-only': lib.generatePolicy({ count: 120, kinds: ['CR'] }),
    'PF-only': lib.generatePolicy({ count: 120, kinds: ['PF'] }),
  };
  const view = new kvmi.VcpuEventView();
  const reply = Buffer.alloc(64);
  const N = SHORT ? 10_000 : 100_000;
  const prepare = (fn) => {
    for (let i = 0; i < 20_000; i++) fn();
    const A = 5_000;
    globalThis.gc();
    const h0 = newSpaceUsed();
    for (let i = 0; i < A; i++) fn();
    const h1 = newSpaceUsed();
    // Rounded down: a one-off allocation of less than A bytes reads 0; any per-verdict object (≥ 16 B) does not.
    return Math.max(0, Math.floor((h1 - h0) / A));
  };
  const timeRun = (fn) => {
    const t0 = process.hrtime.bigint();
    for (let i = 0; i < N; i++) fn();
    return Number(process.hrtime.bigint() - t0) / N;
  };
  const result = (runs, bytes) => ({ ns: Math.round(runs.sort((a, b) => a - b)[2] * 10) / 10, bytes });
  // Five runs each, the median kept; a path and its baseline in alternating runs (bench/lib/micro.mjs).
  const { measure, measurePair } = microTimer({ prepare, timeRun, result });
  // The hand-coded baseline: the shipped rules these four events hit, written out for one frame layout.
  const S = kvmi.structs;
  const EVENT_ID_AT = kvmi.KVMI_MSG_HDR_SIZE + S.kvmi_event_hdr.field('event').offset;
  const COMMON_SIZE_AT = kvmi.KVMI_MSG_HDR_SIZE + S.kvmi_event_hdr.size + S.kvmi_vcpu_event.field('size').offset;
  const SPECIFIC_BASE = kvmi.KVMI_MSG_HDR_SIZE + S.kvmi_event_hdr.size;
  const CR = { id: kvmi.events.CR.id, cr: S.kvmi_vcpu_event_cr.field('cr').offset, old: S.kvmi_vcpu_event_cr.field('old_value').offset, new: S.kvmi_vcpu_event_cr.field('new_value').offset };
  const PF = { id: kvmi.events.PF.id, gva: S.kvmi_vcpu_event_pf.field('gva').offset, access: S.kvmi_vcpu_event_pf.field('access').offset };
  const ALLOW = 0;
  const DENY = 1;
  const SKIP = 2;
  const rawDecide = (f) => {
    const at = SPECIFIC_BASE + f.readUInt16LE(COMMON_SIZE_AT);
    const id = f.readUInt16LE(EVENT_ID_AT);
    // cr4-smep-smap-clear: CR4 write clearing SMEP (bit 20) or SMAP (bit 21) → deny.
    if (id === CR.id) return f[at + CR.cr] === 4 && (f.readInt32LE(at + CR.old) & ~f.readInt32LE(at + CR.new) & 0x300000) !== 0 ? DENY : ALLOW;
    // kernel-text-write: PF with write access, gva in [0xffffffff80000000, 0xffffffffc0000000) → skip.
    // (The top byte of the low half read alone: a u32 ≥ 2^30 would be a heap number if not inlined.)
    if (id === PF.id) return (f[at + PF.access] & 2) !== 0 && f.readInt32LE(at + PF.gva + 4) === -1 && f[at + PF.gva + 3] >> 6 === 2 ? SKIP : ALLOW;
    return ALLOW;
  };
  const RAW_KIND = ['allow', 'deny', 'skip'];
  const out = [];
  const baseline = measure(() => view.reset(events['PF write to kernel text → skip']));
  const raw = [];
  // Every branch seen before the first measurement, so no later event deoptimises it mid-measure.
  for (let i = 0; i < 20_000; i++) for (const frame of Object.values(events)) rawDecide(frame);
  for (const [pname, policy] of Object.entries(policies)) {
    if (SHORT && pname !== 'mixed') continue;
    const compiled = lib.compilePolicy(policy);
    const evaluator = new lib.Evaluator(compiled);
    for (const [ename, frame] of Object.entries(events)) {
      const kind = ename.slice(0, 2);
      if ((pname === 'CR-only' && kind !== 'CR') || (pname === 'PF-only' && kind !== 'PF')) continue;
      view.reset(frame);
      const v = evaluator.evaluate(view);
      const decided = `${v.ruleId ?? `default(${kind})`} → ${v.kind}${v.newVal !== null ? ` 0x${v.newVal.toString(16)}` : ''}`;
      const rulesOfKind = policy.rules.filter((r) => r.match.kind === undefined || r.match.kind === kind).length;
      let sink = 0;
      const verdictFn = () => {
        view.reset(frame);
        sink ^= evaluator.evaluate(view).action;
      };
      let verdictOnly;
      if (pname === 'mixed') {
        // With the mixed policy, the hand-coded baseline of the same event in alternating runs.
        const [v1, r1] = measurePair(verdictFn, () => (sink ^= rawDecide(frame)));
        verdictOnly = v1;
        raw.push({ event: ename, decided: RAW_KIND[rawDecide(frame)], ...r1 });
      } else verdictOnly = measure(verdictFn);
      const withReply = measure(() => {
        view.reset(frame);
        sink ^= evaluator.evaluate(view).writeReply(reply, 0);
      });
      if (sink === 42) console.error('');
      out.push({ policy: pname, rules: policy.rules.length, rulesOfKind, event: ename, decided, kind: v.kind, verdictOnly, withReply });
    }
  }
  // The baseline makes the same decisions as the evaluator with the mixed policy (which holds the shipped rules).
  for (const r of raw) {
    const m = out.find((x) => x.policy === 'mixed' && x.event === r.event);
    if (m.kind !== r.decided) throw new Error(`hand-coded baseline decides ${r.decided} for '${r.event}', the evaluator ${m.kind}`);
  }
  // The suite's figures (B1.codec.verdict*): the mixed policy over its four events — mean ns, largest allocation.
  const mixed = out.filter((x) => x.policy === 'mixed');
  const mean = (xs) => Math.round((xs.reduce((a, b) => a + b, 0) / xs.length) * 10) / 10;
  const summary = {
    policy: 'mixed',
    rules: mixed[0].rules,
    events: mixed.length,
    verdictNs: mean(mixed.map((x) => x.verdictOnly.ns)),
    verdictBytes: Math.max(...mixed.map((x) => x.verdictOnly.bytes)),
    withReplyNs: mean(mixed.map((x) => x.withReply.ns)),
    withReplyBytes: Math.max(...mixed.map((x) => x.withReply.bytes)),
    rawNs: mean(raw.map((x) => x.ns)),
    viewResetNs: baseline.ns,
  };
  process.stdout.write(JSON.stringify({ short: SHORT, iterations: N, baseline, raw, rows: out, mixed: summary }));
}

if (process.argv.includes('--child')) {
  await child();
} else {
  const r = spawnSync(process.execPath, ['--expose-gc', '--no-concurrent-recompilation', '--min-semi-space-size=128', '--max-semi-space-size=128', fileURLToPath(import.meta.url), '--child', ...(SHORT ? ['--short'] : [])], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(r.stderr);
  const { iterations, baseline, raw, rows, mixed } = JSON.parse(r.stdout);
  const cell = (m) => `${m.ns.toFixed(1).padStart(7)} ns ${String(m.bytes).padStart(3)} B`;
  say(`\nLocal-verdict benchmark — ${cpus()[0]?.model ?? 'cpu'} × ${cpus().length}, node ${process.version}${SHORT ? ' (--short: mixed policy only)' : ''}`);
  say(`ns/verdict: view.reset + evaluate(view), median of 5 × ${iterations / 1000}k after 20k warm-up; B/verdict: young-generation bytes over 5 000 verdicts\n`);
  say(`baseline: view.reset alone ${baseline.ns} ns, ${baseline.bytes} B`);
  say('baseline: the same decisions hand-coded (header + the rule\'s fields read with readUInt*, compared with constants):');
  for (const x of raw) say(`  ${x.event.padEnd(38)} ${cell(x)}   ${x.decided}`);
  say('\npolicy (rules, of the kind)   event                                    verdict           + reply        decided');
  for (const x of rows) {
    const pol = `${x.policy} (${x.rules}, ${x.rulesOfKind})`.padEnd(29);
    say(`${pol} ${x.event.padEnd(38)} ${cell(x.verdictOnly)}  ${cell(x.withReply)}   ${x.decided}`);
  }
  say(`\nmixed policy, mean of its ${mixed.events} events: verdict ${mixed.verdictNs} ns (at most ${mixed.verdictBytes} B), + reply ${mixed.withReplyNs} ns (at most ${mixed.withReplyBytes} B); hand-coded ${mixed.rawNs} ns → ${(mixed.verdictNs / mixed.rawNs).toFixed(2)}×`);
  console.log(JSON.stringify({ bench: 'verdicts', short: SHORT, iterations, baseline, raw, rows, mixed }));
}
