#!/usr/bin/env node
// Local-verdict benchmark (run after `tsc -b`; `npm run bench` does both through nx).
//
// For 100+-rule policies (generatePolicy: seeded filler rules in front of the shipped default policy) and
// CR / PF events built with @periscope/kvmi's encodeVcpuEvent:
//   - ns per verdict: VcpuEventView.reset + Evaluator.evaluate(view), median of 5 × 100k after 20k warm-up;
//   - bytes per verdict: V8 young-generation bytes across 5 000 verdicts after a full GC, in a child with a
//     fixed 128 MiB semi-space so no scavenge runs inside the loop (the method of libs/kvmi/bench/run.mjs);
//   - the same with the reply written (`verdict.writeReply`: materialises new_val for CR/MSR).
import { spawnSync } from 'node:child_process';
import { cpus } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import v8 from 'node:v8';

const here = dirname(fileURLToPath(import.meta.url));

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
  const N = 100_000;
  const measure = (fn) => {
    for (let i = 0; i < 20_000; i++) fn();
    const A = 5_000;
    globalThis.gc();
    const h0 = newSpaceUsed();
    for (let i = 0; i < A; i++) fn();
    const h1 = newSpaceUsed();
    const runs = [];
    for (let r = 0; r < 5; r++) {
      const t0 = process.hrtime.bigint();
      for (let i = 0; i < N; i++) fn();
      runs.push(Number(process.hrtime.bigint() - t0) / N);
    }
    runs.sort((a, b) => a - b);
    return { ns: Math.round(runs[2]), bytes: Math.max(0, Math.round((h1 - h0) / A)) };
  };
  const out = [];
  const baseline = measure(() => view.reset(events['PF write to kernel text → skip']));
  for (const [pname, policy] of Object.entries(policies)) {
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
      const verdictOnly = measure(() => {
        view.reset(frame);
        sink ^= evaluator.evaluate(view).action;
      });
      const withReply = measure(() => {
        view.reset(frame);
        sink ^= evaluator.evaluate(view).writeReply(reply, 0);
      });
      if (sink === 42) console.error('');
      out.push({ policy: pname, rules: policy.rules.length, rulesOfKind, event: ename, decided, verdictOnly, withReply });
    }
  }
  process.stdout.write(JSON.stringify({ baseline, rows: out }));
}

if (process.argv.includes('--child')) {
  await child();
} else {
  const r = spawnSync(process.execPath, ['--expose-gc', '--min-semi-space-size=128', '--max-semi-space-size=128', fileURLToPath(import.meta.url), '--child'], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(r.stderr);
  const { baseline, rows } = JSON.parse(r.stdout);
  console.log(`\nLocal-verdict benchmark — ${cpus()[0]?.model ?? 'cpu'} × ${cpus().length}, node ${process.version}`);
  console.log('ns/verdict: view.reset + evaluate(view), median of 5 × 100k after 20k warm-up; B/verdict: young-generation bytes over 5 000 verdicts\n');
  console.log(`baseline: view.reset alone ${baseline.ns} ns, ${baseline.bytes} B\n`);
  console.log('policy (rules, of the kind)   event                                  verdict       + reply      decided');
  for (const x of rows) {
    const pol = `${x.policy} (${x.rules}, ${x.rulesOfKind})`.padEnd(29);
    const cell = (m) => `${String(m.ns).padStart(5)} ns ${String(m.bytes).padStart(3)} B`;
    console.log(`${pol} ${x.event.padEnd(38)} ${cell(x.verdictOnly)}  ${cell(x.withReply)}   ${x.decided}`);
  }
  console.log(JSON.stringify({ bench: 'verdicts', baseline, rows }));
}
