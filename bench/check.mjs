#!/usr/bin/env node
// `npm run bench:check [-- FILE] [--baseline FILE] [--limit 0.25]`: compares a results file (default: the
// newest bench/results/<YYYY-MM-DD>.json) with the committed baseline (bench/results/baseline.json) and
// exits 1 when any figure regressed by more than 25 %.
//
// Each figure is compared on its gated statistic (p50 for latencies, the value otherwise), median over the
// repeats: as its ratio to its same-run baseline figure where it has one (so the machine's speed cancels
// out: the agent's stall / the raw responder's, events/s / the raw echo's), memory footprints (MiB) and
// allocations per message (B/msg; a rise from 0 B is always a regression) as values; the baselines
// themselves and other absolute times / CPU % are printed, not gated (lib/results.mjs gateOf). p99s are
// recorded but not gated: on two shared cores they move by more than 25 % between identical runs (see the
// min–max columns of docs/benchmarks.md).
// Exit codes: 0 no regression, 1 a regression or a figure missing, 2 bad input.
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import { REGRESSION_LIMIT, compareResults } from './lib/results.mjs';
import { validate } from './lib/schema.mjs';

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, '..');
const USAGE = 'usage: node bench/check.mjs [RESULTS.json] [--baseline FILE] [--limit FRACTION]';
const argv = process.argv.slice(2);
if (argv.includes('--help') || argv.includes('-h')) {
  console.log(USAGE);
  process.exit(0);
}
let file;
let baselinePath = join(here, 'results', 'baseline.json');
let limit = REGRESSION_LIMIT;
for (let i = 0; i < argv.length; i++) {
  if (argv[i] === '--baseline') baselinePath = argv[++i];
  else if (argv[i] === '--limit') limit = Number(argv[++i]);
  else if (argv[i].startsWith('--')) fail(`unknown option ${argv[i]}`);
  else if (file) fail('one results file at most');
  else file = argv[i];
}
if (!baselinePath) fail('--baseline needs a file');
if (!Number.isFinite(limit) || limit <= 0) fail('--limit must be a positive fraction, e.g. 0.25');

function fail(msg) {
  console.error(`bench:check: ${msg}\n${USAGE}`);
  process.exit(2);
}

function load(path, what) {
  if (!path || !existsSync(path)) fail(`${what} ${path ?? ''} not found`);
  let doc;
  try {
    doc = JSON.parse(readFileSync(path, 'utf8'));
  } catch (e) {
    fail(`${what} ${path} is not JSON: ${e.message}`);
  }
  const schema = JSON.parse(readFileSync(join(here, 'schema.json'), 'utf8'));
  const errors = validate(schema, doc);
  if (errors.length) fail(`${what} ${path} does not match bench/schema.json:\n  ${errors.slice(0, 10).join('\n  ')}`);
  return doc;
}

if (!file) {
  const dated = existsSync(join(here, 'results')) ? readdirSync(join(here, 'results')).filter((n) => /^\d{4}-\d{2}-\d{2}.*\.json$/.test(n) && !n.endsWith('.tmp.json')).sort() : [];
  if (!dated.length) fail('no bench/results/<date>.json yet: run `npm run bench` first, or name a file');
  file = join(here, 'results', dated[dated.length - 1]);
}
const current = load(file, 'results file');
const baseline = load(baselinePath, 'baseline');
if (current.short !== baseline.short) fail(`${relative(root, file)} is ${current.short ? 'a --short run' : 'a full run'} but the baseline is not: sizes differ, figures are not comparable`);

const rows = compareResults(baseline, current, limit);
const fmt = (v) => (v === null ? '—' : Math.abs(v) >= 100 ? v.toFixed(0) : v.toFixed(3));
const pctChange = (c) => (Number.isFinite(c) ? `${c >= 0 ? '+' : ''}${(c * 100).toFixed(1)}%` : 'worse');
console.log(`bench:check ${relative(root, file)} against ${relative(root, baselinePath)} (fail above +${Math.round(limit * 100)} %; medians; + = worse)`);
console.log(`  baseline: ${baseline.startedAt} ${baseline.machine.cpuModel} × ${baseline.machine.cores}, load ${baseline.machine.loadBefore[0]}; current: ${current.startedAt} ${current.machine.cpuModel} × ${current.machine.cores}, load ${current.machine.loadBefore[0]}\n`);
console.log(`  ${'figure'.padEnd(28)} ${'compared'.padEnd(44)} ${'baseline'.padStart(10)} ${'current'.padStart(10)} ${'change'.padStart(8)}`);
for (const r of rows) {
  const change = r.change === null ? (r.of === 'missing' ? 'MISSING' : 'new') : pctChange(r.change);
  console.log(`  ${r.id.padEnd(28)} ${`${r.stat}, ${r.of}`.padEnd(44)} ${fmt(r.baseline).padStart(10)} ${fmt(r.current).padStart(10)} ${change.padStart(8)}${r.regressed ? '  REGRESSION' : ''}`);
}
const bad = rows.filter((r) => r.regressed);
console.log(bad.length ? `\n${bad.length} figure(s) regressed by more than ${Math.round(limit * 100)} % or are missing` : '\nno regression');
process.exit(bad.length ? 1 : 0);
