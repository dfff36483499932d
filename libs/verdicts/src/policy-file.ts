/**
 * The policy file: a small JSON form of `Policy` for tests and standalone runs (`--policy FILE`).
 * README.md ("Policy file format") documents it; `parsePolicy` checks shape (keys, types, u64 syntax) and
 * `compilePolicy` checks meaning. 64-bit values are strings (`"0xffffffff81000000"` or decimal) or JSON
 * numbers that are safe integers — never a lossy double.
 */
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { VerdictsError } from './errors.js';
import {
  ACTION_KINDS,
  DESCRIPTOR_NAMES,
  EXCEPTION_VECTORS,
  REGISTER_NAMES,
  VCPU_EVENT_KINDS,
  type Action,
  type AskCentral,
  type BitsMatch,
  type CpuMode,
  type EventMatch,
  type Interception,
  type Policy,
  type PolicyException,
  type RegisterMatch,
  type RegisterName,
  type ReportSetting,
  type Rule,
  type Severity,
  type U64Range,
  type VcpuEventKind,
  U64_MAX,
} from './model.js';

/** The value of the optional `format` key. */
export const POLICY_FILE_FORMAT = 'periscope.verdicts/v1';

/** The shipped default policy (`libs/verdicts/policies/default.json`). */
export const DEFAULT_POLICY_PATH = fileURLToPath(new URL('../policies/default.json', import.meta.url));

type Json = null | boolean | number | string | Json[] | { [k: string]: Json };
type Obj = { [k: string]: Json };

class Reader {
  constructor(readonly source: string) {}
  fail(path: string, message: string): never {
    throw new VerdictsError([{ code: 'bad-policy-file', ruleId: null, path: path || '(root)', message: `${this.source}: ${message}` }]);
  }
  obj(v: Json | undefined, path: string, keys: readonly string[]): Obj {
    if (v === null || typeof v !== 'object' || Array.isArray(v)) this.fail(path, 'expected an object');
    for (const k of Object.keys(v)) if (!keys.includes(k)) this.fail(path ? `${path}.${k}` : k, `unknown key (allowed: ${keys.join(', ')})`);
    return v;
  }
  str(v: Json | undefined, path: string): string {
    if (typeof v !== 'string') this.fail(path, 'expected a string');
    return v;
  }
  bool(v: Json | undefined, path: string): boolean {
    if (typeof v !== 'boolean') this.fail(path, 'expected true or false');
    return v;
  }
  /** A 64-bit (or larger, checked later) value: "0x…", decimal string, or a safe-integer number. */
  big(v: Json | undefined, path: string): bigint {
    if (typeof v === 'number') {
      if (!Number.isSafeInteger(v)) this.fail(path, `${v} is not a safe integer; write 64-bit values as strings ("0x…")`);
      return BigInt(v);
    }
    if (typeof v === 'string' && /^(0x[0-9a-f_]+|[0-9_]+)$/i.test(v.trim())) return BigInt(v.trim().replaceAll('_', ''));
    if (typeof v === 'string' && /^-[0-9]+$/.test(v.trim())) return BigInt(v.trim());
    return this.fail(path, `expected a number or a "0x…"/decimal string, got ${JSON.stringify(v)}`);
  }
  /** A small integer (fits a JS number exactly): number or "0x…" string. */
  int(v: Json | undefined, path: string): number {
    const b = this.big(v, path);
    if (b > BigInt(Number.MAX_SAFE_INTEGER) || b < BigInt(Number.MIN_SAFE_INTEGER)) this.fail(path, 'out of range');
    return Number(b);
  }
  list<T>(v: Json | undefined, path: string, one: (x: Json, p: string) => T, single = true): T[] {
    if (Array.isArray(v)) return v.map((x, i) => one(x, `${path}[${i}]`));
    if (single && v !== undefined) return [one(v, path)];
    return this.fail(path, 'expected a list');
  }
}

const MATCH_KEYS = ['kind', 'vms', 'vcpus', 'rip', 'mode', 'regs', 'cr', 'msr', 'xcr', 'old', 'new', 'clears', 'sets', 'changes', 'gpa', 'gva', 'access', 'descriptor', 'write', 'vector', 'failed'] as const;

function range(r: Reader, v: Json, p: string): U64Range {
  const o = r.obj(v, p, ['start', 'end']);
  if (o['start'] === undefined || o['end'] === undefined) r.fail(p, 'a range needs start (inclusive) and end (exclusive)');
  return { start: r.big(o['start'], `${p}.start`), end: r.big(o['end'], `${p}.end`) };
}

function bits(r: Reader, v: Json | undefined, p: string): BitsMatch {
  const o = r.obj(v, p, ['mask', 'value']);
  if (o['mask'] === undefined || o['value'] === undefined) r.fail(p, 'needs mask and value');
  return { mask: r.big(o['mask'], `${p}.mask`), value: r.big(o['value'], `${p}.value`) };
}

function accessBits(r: Reader, v: Json | undefined, p: string): number {
  if (typeof v === 'string' && /^[rwx]+$/i.test(v)) {
    let m = 0;
    for (const ch of v.toLowerCase()) m |= ch === 'r' ? 1 : ch === 'w' ? 2 : 4;
    return m;
  }
  return r.int(v, p);
}

function descriptorValue(r: Reader, v: Json, p: string): number {
  if (typeof v === 'string' && v.toUpperCase() in DESCRIPTOR_NAMES) return DESCRIPTOR_NAMES[v.toUpperCase() as keyof typeof DESCRIPTOR_NAMES];
  return r.int(v, p);
}

function vectorValue(r: Reader, v: Json | undefined, p: string): number {
  if (typeof v === 'string' && v.toUpperCase() in EXCEPTION_VECTORS) return EXCEPTION_VECTORS[v.toUpperCase()]!.vector;
  return r.int(v, p);
}

function match(r: Reader, v: Json | undefined, p: string): EventMatch {
  const o = r.obj(v ?? {}, p, MATCH_KEYS);
  const m: { -readonly [K in keyof EventMatch]: EventMatch[K] } = {};
  const ints = (k: string) => r.list(o[k], `${p}.${k}`, (x, q) => r.int(x, q));
  if (o['kind'] !== undefined) m.kind = r.str(o['kind'], `${p}.kind`).toUpperCase() as VcpuEventKind;
  if (o['vms'] !== undefined) m.vms = r.list(o['vms'], `${p}.vms`, (x, q) => r.str(x, q));
  if (o['vcpus'] !== undefined) m.vcpus = ints('vcpus');
  if (o['rip'] !== undefined) m.rip = r.list(o['rip'], `${p}.rip`, (x, q) => range(r, x, q));
  if (o['mode'] !== undefined) m.mode = r.int(o['mode'], `${p}.mode`) as CpuMode;
  if (o['regs'] !== undefined) {
    const one = (reg: string, x: Json | undefined, q: string): RegisterMatch => {
      if (x !== null && typeof x === 'object' && !Array.isArray(x)) return { reg: reg as RegisterName, ...bits(r, x, q) };
      return { reg: reg as RegisterName, mask: U64_MAX, value: r.big(x, q) };
    };
    if (Array.isArray(o['regs'])) {
      // List form, for several predicates on one register: [{"reg": "rax", "mask": …, "value": …}].
      m.regs = o['regs'].map((x, i) => {
        const q = `${p}.regs[${i}]`;
        const e = r.obj(x, q, ['reg', 'mask', 'value']);
        const reg = r.str(e['reg'], `${q}.reg`);
        if (!(REGISTER_NAMES as readonly string[]).includes(reg)) r.fail(`${q}.reg`, `unknown register (${REGISTER_NAMES.join(', ')})`);
        return e['mask'] === undefined ? one(reg, e['value'], `${q}.value`) : one(reg, { mask: e['mask'], value: e['value'] ?? null }, q);
      });
    } else {
      const regs = r.obj(o['regs'], `${p}.regs`, REGISTER_NAMES);
      m.regs = Object.entries(regs).map(([reg, x]) => one(reg, x, `${p}.regs.${reg}`));
    }
  }
  if (o['cr'] !== undefined) m.cr = ints('cr');
  if (o['msr'] !== undefined) m.msr = ints('msr');
  if (o['xcr'] !== undefined) m.xcr = ints('xcr');
  if (o['old'] !== undefined) m.old = bits(r, o['old'], `${p}.old`);
  if (o['new'] !== undefined) m.new = bits(r, o['new'], `${p}.new`);
  if (o['clears'] !== undefined) m.clears = r.big(o['clears'], `${p}.clears`);
  if (o['sets'] !== undefined) m.sets = r.big(o['sets'], `${p}.sets`);
  if (o['changes'] !== undefined) m.changes = r.big(o['changes'], `${p}.changes`);
  if (o['gpa'] !== undefined) m.gpa = r.list(o['gpa'], `${p}.gpa`, (x, q) => range(r, x, q));
  if (o['gva'] !== undefined) m.gva = r.list(o['gva'], `${p}.gva`, (x, q) => range(r, x, q));
  if (o['access'] !== undefined) m.access = accessBits(r, o['access'], `${p}.access`);
  if (o['descriptor'] !== undefined) m.descriptor = r.list(o['descriptor'], `${p}.descriptor`, (x, q) => descriptorValue(r, x, q));
  if (o['write'] !== undefined) m.write = r.bool(o['write'], `${p}.write`);
  if (o['vector'] !== undefined) m.vector = r.list(o['vector'], `${p}.vector`, (x, q) => vectorValue(r, x, q));
  if (o['failed'] !== undefined) m.failed = r.bool(o['failed'], `${p}.failed`);
  return m;
}

function action(r: Reader, v: Json | undefined, p: string): Action {
  if (typeof v === 'string') {
    if (v === 'allow' || v === 'deny' || v === 'skip' || v === 'retry' || v === 'crash') return { kind: v };
    if (v === 'rewrite' || v === 'inject') r.fail(p, `'${v}' needs parameters: use an object {"kind": "${v}", …}`);
    return r.fail(p, `unknown action ${JSON.stringify(v)} (${ACTION_KINDS.join(', ')})`);
  }
  const kind = r.obj(v, p, ['kind', 'forceBits', 'clearBits', 'setBits', 'vector', 'errorCode'])['kind'];
  switch (kind) {
    case 'allow':
    case 'skip':
    case 'retry':
    case 'crash':
      r.obj(v, p, ['kind']);
      return { kind };
    case 'deny': {
      const o = r.obj(v, p, ['kind', 'forceBits']);
      return o['forceBits'] === undefined ? { kind } : { kind, forceBits: r.big(o['forceBits'], `${p}.forceBits`) };
    }
    case 'rewrite': {
      const o = r.obj(v, p, ['kind', 'clearBits', 'setBits']);
      return {
        kind,
        ...(o['clearBits'] !== undefined ? { clearBits: r.big(o['clearBits'], `${p}.clearBits`) } : {}),
        ...(o['setBits'] !== undefined ? { setBits: r.big(o['setBits'], `${p}.setBits`) } : {}),
      };
    }
    case 'inject': {
      const o = r.obj(v, p, ['kind', 'vector', 'errorCode']);
      if (o['vector'] === undefined) r.fail(`${p}.vector`, 'inject needs a vector ("#PF", "#UD", "#GP", … or a number)');
      return {
        kind,
        vector: vectorValue(r, o['vector'], `${p}.vector`),
        ...(o['errorCode'] !== undefined ? { errorCode: r.int(o['errorCode'], `${p}.errorCode`) } : {}),
      };
    }
    default:
      return r.fail(`${p}.kind`, `unknown action ${JSON.stringify(kind)} (${ACTION_KINDS.join(', ')})`);
  }
}

function report(r: Reader, v: Json | undefined, p: string): ReportSetting {
  if (v === 'always' || v === 'never') return { mode: v };
  if (v === 'event') return { mode: 'always', withEvent: true };
  const o = r.obj(v, p, ['mode', 'oneIn', 'withEvent']);
  const mode = r.str(o['mode'], `${p}.mode`);
  if (mode !== 'always' && mode !== 'never' && mode !== 'sampled') r.fail(`${p}.mode`, 'expected always, sampled or never');
  return {
    mode,
    ...(o['oneIn'] !== undefined ? { oneIn: r.int(o['oneIn'], `${p}.oneIn`) } : {}),
    ...(o['withEvent'] !== undefined ? { withEvent: r.bool(o['withEvent'], `${p}.withEvent`) } : {}),
  };
}

function askCentral(r: Reader, v: Json | undefined, p: string): AskCentral {
  const o = r.obj(v, p, ['deadlineMs', 'default']);
  return {
    ...(o['deadlineMs'] !== undefined ? { deadlineMs: r.int(o['deadlineMs'], `${p}.deadlineMs`) } : {}),
    ...(o['default'] !== undefined ? { default: action(r, o['default'], `${p}.default`) } : {}),
  };
}

function rule(r: Reader, v: Json, p: string): Rule {
  const o = r.obj(v, p, ['id', 'description', 'match', 'action', 'askCentral', 'report', 'severity']);
  return {
    id: r.str(o['id'], `${p}.id`),
    ...(o['description'] !== undefined ? { description: r.str(o['description'], `${p}.description`) } : {}),
    match: match(r, o['match'], `${p}.match`),
    ...(o['action'] !== undefined ? { action: action(r, o['action'], `${p}.action`) } : {}),
    ...(o['askCentral'] !== undefined ? { askCentral: askCentral(r, o['askCentral'], `${p}.askCentral`) } : {}),
    ...(o['report'] !== undefined ? { report: report(r, o['report'], `${p}.report`) } : {}),
    ...(o['severity'] !== undefined ? { severity: r.str(o['severity'], `${p}.severity`) as Severity } : {}),
  };
}

function exception(r: Reader, v: Json, p: string): PolicyException {
  const o = r.obj(v, p, ['id', 'rules', 'match', 'action', 'report', 'expiresUnixNs', 'reason', 'createdBy']);
  if (o['action'] === undefined) r.fail(`${p}.action`, 'an exception needs an action');
  return {
    id: r.str(o['id'], `${p}.id`),
    ...(o['rules'] !== undefined ? { rules: r.list(o['rules'], `${p}.rules`, (x, q) => r.str(x, q)) } : {}),
    match: match(r, o['match'], `${p}.match`),
    action: action(r, o['action'], `${p}.action`),
    ...(o['report'] !== undefined ? { report: report(r, o['report'], `${p}.report`) } : {}),
    ...(o['expiresUnixNs'] !== undefined ? { expiresUnixNs: r.big(o['expiresUnixNs'], `${p}.expiresUnixNs`) } : {}),
    ...(o['reason'] !== undefined ? { reason: r.str(o['reason'], `${p}.reason`) } : {}),
    ...(o['createdBy'] !== undefined ? { createdBy: r.str(o['createdBy'], `${p}.createdBy`) } : {}),
  };
}

/** Turn parsed JSON into a `Policy` (shape only: compile it to check meaning). */
export function parsePolicy(json: unknown, source = 'policy'): Policy {
  const r = new Reader(source);
  const o = r.obj(json as Json, '', [
    '$comment', 'format', 'id', 'version', 'description', 'rules', 'exceptions', 'defaultAction', 'defaultActions',
    'defaultReport', 'maxAskCentralDeadlineMs', 'maxHeldEvents', 'interception',
  ]);
  if (o['format'] !== undefined && o['format'] !== POLICY_FILE_FORMAT) r.fail('format', `expected ${JSON.stringify(POLICY_FILE_FORMAT)}`);
  let defaultActions: Partial<Record<VcpuEventKind, Action>> | undefined;
  if (o['defaultActions'] !== undefined) {
    const d = r.obj(o['defaultActions'], 'defaultActions', VCPU_EVENT_KINDS);
    defaultActions = {};
    for (const [k, a] of Object.entries(d)) defaultActions[k as VcpuEventKind] = action(r, a, `defaultActions.${k}`);
  }
  let interception: Interception | undefined;
  if (o['interception'] !== undefined) {
    const i = r.obj(o['interception'], 'interception', ['events', 'crs', 'msrs']);
    interception = {
      events: r.list(i['events'] ?? [], 'interception.events', (x, q) => r.str(x, q).toUpperCase() as VcpuEventKind, false),
      crs: r.list(i['crs'] ?? [], 'interception.crs', (x, q) => r.int(x, q), false),
      msrs: r.list(i['msrs'] ?? [], 'interception.msrs', (x, q) => r.int(x, q), false),
    };
  }
  return {
    id: r.str(o['id'], 'id'),
    version: o['version'] === undefined ? 0n : r.big(o['version'], 'version'),
    ...(o['description'] !== undefined ? { description: r.str(o['description'], 'description') } : {}),
    rules: r.list(o['rules'] ?? [], 'rules', (x, q) => rule(r, x, q), false),
    ...(o['exceptions'] !== undefined ? { exceptions: r.list(o['exceptions'], 'exceptions', (x, q) => exception(r, x, q), false) } : {}),
    ...(o['defaultAction'] !== undefined ? { defaultAction: action(r, o['defaultAction'], 'defaultAction') } : {}),
    ...(defaultActions !== undefined ? { defaultActions } : {}),
    ...(o['defaultReport'] !== undefined ? { defaultReport: report(r, o['defaultReport'], 'defaultReport') } : {}),
    ...(o['maxAskCentralDeadlineMs'] !== undefined ? { maxAskCentralDeadlineMs: r.int(o['maxAskCentralDeadlineMs'], 'maxAskCentralDeadlineMs') } : {}),
    ...(o['maxHeldEvents'] !== undefined ? { maxHeldEvents: r.int(o['maxHeldEvents'], 'maxHeldEvents') } : {}),
    ...(interception !== undefined ? { interception } : {}),
  };
}

/** Parse policy-file text. */
export function parsePolicyText(text: string, source = 'policy'): Policy {
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new VerdictsError([{ code: 'bad-policy-file', ruleId: null, path: '(root)', message: `${source}: not JSON: ${(e as Error).message}` }]);
  }
  return parsePolicy(json, source);
}

/** Read and parse a policy file (`--policy FILE`). Compile the result with `compilePolicy`. */
export function loadPolicyFile(path: string): Policy {
  return parsePolicyText(readFileSync(path, 'utf8'), path);
}

/** The shipped default policy, parsed. */
export function loadDefaultPolicy(): Policy {
  return loadPolicyFile(DEFAULT_POLICY_PATH);
}

// ---- writing ------------------------------------------------------------------------------------

const hex = (x: bigint): string => `0x${x.toString(16)}`;
const rangeJson = (r: U64Range) => ({ start: hex(r.start), end: hex(r.end) });
const bitsJson = (b: BitsMatch) => ({ mask: hex(b.mask), value: hex(b.value) });

function matchJson(m: EventMatch): Obj {
  const o: Obj = {};
  if (m.kind !== undefined) o['kind'] = m.kind;
  if (m.vms !== undefined) o['vms'] = [...m.vms];
  if (m.vcpus !== undefined) o['vcpus'] = [...m.vcpus];
  if (m.rip !== undefined) o['rip'] = m.rip.map(rangeJson);
  if (m.mode !== undefined) o['mode'] = m.mode;
  if (m.regs !== undefined) {
    const value = (r: RegisterMatch): Json => (r.mask === U64_MAX ? hex(r.value) : bitsJson(r));
    if (new Set(m.regs.map((r) => r.reg)).size === m.regs.length) {
      const regs: Obj = {};
      for (const r of m.regs) regs[r.reg] = value(r);
      o['regs'] = regs;
    } else {
      o['regs'] = m.regs.map((r) => ({ reg: r.reg, mask: hex(r.mask), value: hex(r.value) }));
    }
  }
  if (m.cr !== undefined) o['cr'] = [...m.cr];
  if (m.msr !== undefined) o['msr'] = m.msr.map((x) => `0x${x.toString(16)}`);
  if (m.xcr !== undefined) o['xcr'] = [...m.xcr];
  if (m.old !== undefined) o['old'] = bitsJson(m.old);
  if (m.new !== undefined) o['new'] = bitsJson(m.new);
  if (m.clears !== undefined) o['clears'] = hex(m.clears);
  if (m.sets !== undefined) o['sets'] = hex(m.sets);
  if (m.changes !== undefined) o['changes'] = hex(m.changes);
  if (m.gpa !== undefined) o['gpa'] = m.gpa.map(rangeJson);
  if (m.gva !== undefined) o['gva'] = m.gva.map(rangeJson);
  if (m.access !== undefined) o['access'] = m.access;
  if (m.descriptor !== undefined) o['descriptor'] = [...m.descriptor];
  if (m.write !== undefined) o['write'] = m.write;
  if (m.vector !== undefined) o['vector'] = [...m.vector];
  if (m.failed !== undefined) o['failed'] = m.failed;
  return o;
}

function actionJson(a: Action): Json {
  switch (a.kind) {
    case 'deny':
      return a.forceBits === undefined ? 'deny' : { kind: 'deny', forceBits: hex(a.forceBits) };
    case 'rewrite':
      return { kind: 'rewrite', ...(a.clearBits !== undefined ? { clearBits: hex(a.clearBits) } : {}), ...(a.setBits !== undefined ? { setBits: hex(a.setBits) } : {}) };
    case 'inject':
      return { kind: 'inject', vector: a.vector, ...(a.errorCode !== undefined ? { errorCode: a.errorCode } : {}) };
    default:
      return a.kind;
  }
}

function reportJson(r: ReportSetting): Json {
  if (r.withEvent === undefined && r.oneIn === undefined && r.mode !== 'sampled') return r.mode;
  return { mode: r.mode, ...(r.oneIn !== undefined ? { oneIn: r.oneIn } : {}), ...(r.withEvent !== undefined ? { withEvent: r.withEvent } : {}) };
}

/** Write a policy as policy-file JSON (parsePolicyText(formatPolicy(p)) is equivalent to p). */
export function formatPolicy(p: Policy): string {
  const o: Obj = { format: POLICY_FILE_FORMAT, id: p.id, version: p.version.toString() };
  if (p.description !== undefined) o['description'] = p.description;
  if (p.defaultAction !== undefined) o['defaultAction'] = actionJson(p.defaultAction);
  if (p.defaultActions !== undefined) {
    const d: Obj = {};
    for (const [k, a] of Object.entries(p.defaultActions)) if (a) d[k] = actionJson(a);
    o['defaultActions'] = d;
  }
  if (p.defaultReport !== undefined) o['defaultReport'] = reportJson(p.defaultReport);
  if (p.maxAskCentralDeadlineMs !== undefined) o['maxAskCentralDeadlineMs'] = p.maxAskCentralDeadlineMs;
  if (p.maxHeldEvents !== undefined) o['maxHeldEvents'] = p.maxHeldEvents;
  if (p.interception !== undefined) o['interception'] = { events: [...p.interception.events], crs: [...p.interception.crs], msrs: p.interception.msrs.map((x) => `0x${x.toString(16)}`) };
  o['rules'] = p.rules.map((r) => {
    const x: Obj = { id: r.id };
    if (r.description !== undefined) x['description'] = r.description;
    x['match'] = matchJson(r.match);
    if (r.action !== undefined) x['action'] = actionJson(r.action);
    if (r.askCentral !== undefined) {
      x['askCentral'] = {
        ...(r.askCentral.deadlineMs !== undefined ? { deadlineMs: r.askCentral.deadlineMs } : {}),
        ...(r.askCentral.default !== undefined ? { default: actionJson(r.askCentral.default) } : {}),
      };
    }
    if (r.report !== undefined) x['report'] = reportJson(r.report);
    if (r.severity !== undefined) x['severity'] = r.severity;
    return x;
  });
  if (p.exceptions !== undefined) {
    o['exceptions'] = p.exceptions.map((e) => {
      const x: Obj = { id: e.id };
      if (e.rules !== undefined) x['rules'] = [...e.rules];
      x['match'] = matchJson(e.match);
      x['action'] = actionJson(e.action);
      if (e.report !== undefined) x['report'] = reportJson(e.report);
      if (e.expiresUnixNs !== undefined) x['expiresUnixNs'] = e.expiresUnixNs.toString();
      if (e.reason !== undefined) x['reason'] = e.reason;
      if (e.createdBy !== undefined) x['createdBy'] = e.createdBy;
      return x;
    });
  }
  return `${JSON.stringify(o, null, 2)}\n`;
}
