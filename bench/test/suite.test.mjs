// The benchmark suite checks itself (issue #14): the CI-sized run produces every figure and validates
// against the schema; the validator and bench:check catch what they exist to catch; the committed results
// and the docs table agree. Nothing here depends on how fast anything ran.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TABLE_END, TABLE_START, renderTable } from '../lib/results.mjs';
import { validate } from '../lib/schema.mjs';

const here = dirname(fileURLToPath(import.meta.url));
const bench = join(here, '..');
const root = join(bench, '..');
const schema = JSON.parse(readFileSync(join(bench, 'schema.json'), 'utf8'));
const node = (args) => spawnSync(process.execPath, args, { cwd: root, encoding: 'utf8', env: { ...process.env, FORCE_COLOR: '0' } });

// Every figure the issue names: B1 local verdict (CR deny, PF skip, raw responder, C ping-pong; the KVMI
// and verdict codec per message, ns and bytes allocated, with their raw baselines), B2, B3 (agent and
// analysis ingest, with their baselines), B4 (cold, warm, read, memcpy), B5 (1024 VMs, streams).
const REQUIRED = [
  'B1.cr-deny.agent', 'B1.cr-deny.raw-responder', 'B1.c-pingpong', 'B1.pf-skip.agent',
  'B1.codec.kvmi-event', 'B1.codec.kvmi-event-alloc', 'B1.codec.kvmi-raw', 'B1.codec.verdict', 'B1.codec.verdict-alloc', 'B1.codec.verdict-raw',
  'B2.ask-central', 'B2.ask-central.simulator', 'B2.grpc-pingpong', 'B2.local-deny',
  'B3.agent-throughput', 'B3.raw-echo', 'B3.analysis-ingest', 'B3.grpc-sink',
  'B4.v2-cold', 'B4.v2-warm', 'B4.read', 'B4.memcpy',
  'B5.agent-rss', 'B5.attach', 'B5.idle-cpu', 'B5.streams.analysis', 'B5.streams.peer', 'B5.streams.analysis-cpu', 'B5.streams.analysis-rss',
];
const clone = (x) => JSON.parse(JSON.stringify(x));

describe('bench --short', () => {
  let dir;
  let out;
  let run;
  let results;
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'bench-test-'));
    out = join(dir, 'short.json');
    run = node([join(bench, 'run.mjs'), '--short', '--out', out]);
    // Without a results file the first test fails on the exit status and prints the run's stderr (the step that failed).
    results = existsSync(out) ? JSON.parse(readFileSync(out, 'utf8')) : undefined;
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('exits 0, produces every figure with finite values and validates against the schema', () => {
    expect(run.status, run.stderr.slice(-3000)).toBe(0);
    expect(validate(schema, results)).toEqual([]);
    expect(results.short).toBe(true);
    for (const id of REQUIRED) {
      const f = results.figures.find((x) => x.id === id);
      expect(f, id).toBeDefined();
      for (const sp of Object.values(f.stats)) for (const v of sp.runs) expect(Number.isFinite(v) && v >= 0, `${id}: ${v}`).toBe(true);
    }
    // Each figure beside its baseline: the ratios the issue asks for are there.
    const ratio = (id, against) => results.figures.find((x) => x.id === id).compare.find((c) => c.against === against)?.ratio;
    expect(ratio('B1.cr-deny.agent', 'B1.cr-deny.raw-responder')?.p99).toBeDefined();
    expect(ratio('B1.cr-deny.agent', 'B1.c-pingpong')?.p50).toBeDefined();
    expect(ratio('B2.ask-central', 'B2.grpc-pingpong')?.p99).toBeDefined();
    expect(ratio('B3.agent-throughput', 'B3.raw-echo')?.value).toBeDefined();
    expect(ratio('B4.v2-cold', 'B4.read')?.value).toBeDefined();
    expect(ratio('B1.codec.kvmi-event', 'B1.codec.kvmi-raw')?.value).toBeDefined();
    expect(ratio('B1.codec.verdict', 'B1.codec.verdict-raw')?.value).toBeDefined();
    for (const id of ['B1.codec.kvmi-event-alloc', 'B1.codec.verdict-alloc']) expect(results.figures.find((x) => x.id === id).unit, id).toBe('B/msg');
    expect(results.targets.map((t) => t.id).sort()).toEqual(['B1-p50', 'B1-p99', 'B2-p99', 'B3-agent', 'B4-cold', 'B4-warm', 'B5-rss']);
    expect(run.stdout).toMatch(/B1\.cr-deny\.agent .*× B1\.cr-deny\.raw-responder/);
  });

  it('the validator rejects broken results (a check that cannot fail is a defect)', () => {
    const noMachine = clone(results);
    delete noMachine.machine;
    expect(validate(schema, noMachine).join('\n')).toMatch(/missing 'machine'/);
    const badUnit = clone(results);
    badUnit.figures[0].unit = 'furlongs';
    expect(validate(schema, badUnit).join('\n')).toMatch(/figures\[0\]\.unit/);
    const emptyRuns = clone(results);
    emptyRuns.figures[0].stats[emptyRuns.figures[0].primary].runs = [];
    expect(validate(schema, emptyRuns).join('\n')).toMatch(/fewer than 1 items/);
    const notANumber = clone(results);
    notANumber.figures[0].stats[notANumber.figures[0].primary].median = 'fast';
    expect(validate(schema, notANumber).join('\n')).toMatch(/expected number/);
  });

  it('bench:check passes an identical run and fails a > 25 % regression of a ratio', () => {
    const same = node([join(bench, 'check.mjs'), out, '--baseline', out]);
    expect(same.status, same.stdout + same.stderr).toBe(0);
    expect(same.stdout).toMatch(/no regression/);

    // B1 agent 30 % slower relative to the raw responder in the same run: a regression.
    const worse = clone(results);
    const f = worse.figures.find((x) => x.id === 'B1.cr-deny.agent');
    const r = f.compare.find((c) => c.against === 'B1.cr-deny.raw-responder').ratio.p50;
    for (const k of ['min', 'median', 'max']) r[k] *= 1.3;
    r.runs = r.runs.map((v) => v * 1.3);
    const worsePath = join(dir, 'worse.json');
    writeFileSync(worsePath, JSON.stringify(worse));
    const bad = node([join(bench, 'check.mjs'), worsePath, '--baseline', out]);
    expect(bad.status, bad.stdout + bad.stderr).toBe(1);
    expect(bad.stdout).toMatch(/B1\.cr-deny\.agent .*REGRESSION/);

    // A memory footprint 20 % higher: within the limit; 30 %: a regression. A baseline figure (the raw C echo,
    // a measure of the machine) 3× slower is printed, not gated. A figure missing: a failure.
    const slightly = clone(results);
    slightly.figures.find((x) => x.id === 'B5.streams.analysis-rss').stats.value.median *= 1.2;
    slightly.figures.find((x) => x.id === 'B3.raw-echo').stats.value.median /= 3;
    const fatter = clone(results);
    fatter.figures.find((x) => x.id === 'B5.streams.analysis-rss').stats.value.median *= 1.3;
    writeFileSync(join(dir, 'fatter.json'), JSON.stringify(fatter));
    const fat = node([join(bench, 'check.mjs'), join(dir, 'fatter.json'), '--baseline', out]);
    expect(fat.status).toBe(1);
    expect(fat.stdout).toMatch(/B5\.streams\.analysis-rss .*REGRESSION/);
    // Bytes allocated per message are gated by value: a hot path that starts allocating (0 → 16 B/msg) fails
    // whatever the ratio would say; the current run is compared with a baseline whose figure is 0.
    const zeroAlloc = clone(results);
    for (const id of ['B1.codec.kvmi-event-alloc', 'B1.codec.verdict-alloc']) {
      const z = zeroAlloc.figures.find((x) => x.id === id).stats.value;
      z.runs = z.runs.map(() => 0);
      z.min = z.median = z.max = 0;
    }
    const allocating = clone(zeroAlloc);
    const a = allocating.figures.find((x) => x.id === 'B1.codec.kvmi-event-alloc').stats.value;
    a.runs = a.runs.map(() => 16);
    a.min = a.median = a.max = 16;
    writeFileSync(join(dir, 'zero-alloc.json'), JSON.stringify(zeroAlloc));
    writeFileSync(join(dir, 'allocating.json'), JSON.stringify(allocating));
    const allocSame = node([join(bench, 'check.mjs'), join(dir, 'zero-alloc.json'), '--baseline', join(dir, 'zero-alloc.json')]);
    expect(allocSame.status, allocSame.stdout + allocSame.stderr).toBe(0);
    const alloc = node([join(bench, 'check.mjs'), join(dir, 'allocating.json'), '--baseline', join(dir, 'zero-alloc.json')]);
    expect(alloc.status, alloc.stdout + alloc.stderr).toBe(1);
    expect(alloc.stdout).toMatch(/B1\.codec\.kvmi-event-alloc .*REGRESSION/);
    expect(alloc.stdout).not.toMatch(/B1\.codec\.verdict-alloc .*REGRESSION/);

    // A figure new in the current run (not in the baseline, e.g. the codec figures before the baseline was
    // regenerated) is shown as new, not a failure.
    const older = clone(results);
    older.figures = older.figures.filter((x) => !x.id.startsWith('B1.codec.'));
    writeFileSync(join(dir, 'older.json'), JSON.stringify(older));
    const newer = node([join(bench, 'check.mjs'), out, '--baseline', join(dir, 'older.json')]);
    expect(newer.status, newer.stdout + newer.stderr).toBe(0);
    expect(newer.stdout).toMatch(/B1\.codec\.kvmi-event-alloc .* new/);

    const missing = clone(results);
    missing.figures = missing.figures.filter((x) => x.id !== 'B5.agent-rss');
    writeFileSync(join(dir, 'slightly.json'), JSON.stringify(slightly));
    writeFileSync(join(dir, 'missing.json'), JSON.stringify(missing));
    expect(node([join(bench, 'check.mjs'), join(dir, 'slightly.json'), '--baseline', out]).status).toBe(0);
    const gone = node([join(bench, 'check.mjs'), join(dir, 'missing.json'), '--baseline', out]);
    expect(gone.status).toBe(1);
    expect(gone.stdout).toMatch(/B5\.agent-rss .*MISSING/);

    // A short run is never compared with a full one.
    const full = clone(results);
    full.short = false;
    writeFileSync(join(dir, 'full.json'), JSON.stringify(full));
    expect(node([join(bench, 'check.mjs'), out, '--baseline', join(dir, 'full.json')]).status).toBe(2);
  });
});

describe('committed results', () => {
  const dated = readdirSync(join(bench, 'results')).filter((n) => /^\d{4}-\d{2}-\d{2}.*\.json$/.test(n) && !n.endsWith('.tmp.json')).sort();
  const newest = join(bench, 'results', dated[dated.length - 1] ?? 'none.json');

  it('the newest results file and the baseline are full runs with every figure, valid against the schema', () => {
    expect(dated.length).toBeGreaterThan(0);
    for (const path of [newest, join(bench, 'results', 'baseline.json')]) {
      const doc = JSON.parse(readFileSync(path, 'utf8'));
      expect(validate(schema, doc), path).toEqual([]);
      expect(doc.short, path).toBe(false);
      for (const id of REQUIRED) expect(doc.figures.some((f) => f.id === id), `${path}: ${id}`).toBe(true);
    }
  });

  it('docs/benchmarks.md carries the table generated from the newest results file', () => {
    const doc = readFileSync(join(root, 'docs/benchmarks.md'), 'utf8');
    const table = doc.slice(doc.indexOf(TABLE_START), doc.indexOf(TABLE_END) + TABLE_END.length);
    expect(table).toBe(renderTable(JSON.parse(readFileSync(newest, 'utf8')), relative(root, newest)));
  });
});
