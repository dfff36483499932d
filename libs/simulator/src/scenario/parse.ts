/**
 * Reading scenario files (YAML; every integer is read as a bigint, so 64-bit addresses keep their
 * value). Unknown keys are errors; every error names the file and the key path.
 */
import { readFile } from 'node:fs/promises';

import { events as kvmiEvents, type EventKey } from '@periscope/kvmi';
import { CR0_AM, CR0_CD, CR0_MP, CR0_NE, CR0_NW, CR0_PE, CR0_PG, CR0_TS, CR0_WP, CR4_FSGSBASE, CR4_LA57, CR4_OSFXSR, CR4_OSXMMEXCPT, CR4_OSXSAVE, CR4_PAE, CR4_PCIDE, CR4_PGE, CR4_PSE, CR4_SMAP, CR4_SMEP, CR4_UMIP, isInstructionName, type InstructionName } from '@periscope/x86';
import { parse as parseYaml } from 'yaml';

import { SimError } from '../errors.js';
import { MSR } from '../guest/cpu.js';
import type { RunOutcome } from '../kvm/types.js';
import type { EventExpectation, Expectations, RegisterExpectation, Scenario, Step, StepOrigin, Target } from './types.js';

/** Named control-register bits usable in `set`, `clear` and `keep-bits`. */
export const CR_BITS: Readonly<Record<string, bigint>> = {
  PE: CR0_PE, MP: CR0_MP, TS: CR0_TS, NE: CR0_NE, WP: CR0_WP, AM: CR0_AM, NW: CR0_NW, CD: CR0_CD, PG: CR0_PG,
  PSE: CR4_PSE, PAE: CR4_PAE, PGE: CR4_PGE, OSFXSR: CR4_OSFXSR, OSXMMEXCPT: CR4_OSXMMEXCPT, UMIP: CR4_UMIP, LA57: CR4_LA57,
  FSGSBASE: CR4_FSGSBASE, PCIDE: CR4_PCIDE, OSXSAVE: CR4_OSXSAVE, SMEP: CR4_SMEP, SMAP: CR4_SMAP,
};

const EVENT_KEYS = new Set<string>(Object.keys(kvmiEvents));
const OUTCOMES: ReadonlySet<string> = new Set<RunOutcome | 'skipped'>([
  'completed', 'halted', 'exception', 'gp', 'page-fault', 'mmio', 'userspace-exit', 'unsupported', 'livelock', 'step-limit',
  'vcpu-offline', 'vcpu-crashed', 'vm-stopped', 'skipped',
]);
const VERBS = ['write', 'read', 'execute', 'cr', 'wrmsr', 'lidt', 'lgdt', 'int3', 'vmcall', 'heki-lock-cr', 'xsetbv', 'dma-write', 'delay', 'bring-up', 'load-module'] as const;

type Obj = Record<string, unknown>;

class Ctx {
  constructor(readonly file: string) {}
  fail(path: string, msg: string): never {
    throw new SimError('bad-scenario', `${this.file}: ${path}: ${msg}`);
  }
  obj(v: unknown, path: string, allowed: readonly string[]): Obj {
    if (typeof v !== 'object' || v === null || Array.isArray(v)) this.fail(path, 'expected a mapping');
    for (const k of Object.keys(v as Obj)) if (!allowed.includes(k)) this.fail(`${path}.${k}`, `unknown key (allowed: ${allowed.join(', ')})`);
    return v as Obj;
  }
  list(v: unknown, path: string): unknown[] {
    if (v === undefined || v === null) return [];
    if (!Array.isArray(v)) this.fail(path, 'expected a list');
    return v as unknown[];
  }
  str(v: unknown, path: string): string {
    if (typeof v !== 'string' || v === '') this.fail(path, 'expected a non-empty string');
    return v as string;
  }
  int(v: unknown, path: string, min: number, max: number): number {
    const n = typeof v === 'bigint' ? Number(v) : v;
    if (typeof n !== 'number' || !Number.isInteger(n) || n < min || n > max) this.fail(path, `expected an integer in [${min}, ${max}]`);
    return n as number;
  }
  bool(v: unknown, path: string): boolean {
    if (typeof v !== 'boolean') this.fail(path, 'expected true or false');
    return v as boolean;
  }
  /** An expression: a string, or an integer (kept exactly). */
  expr(v: unknown, path: string): string {
    if (typeof v === 'bigint') return v < 0n ? `0-0x${(-v).toString(16)}` : `0x${v.toString(16)}`;
    if (typeof v === 'number' && Number.isSafeInteger(v)) return String(v);
    if (typeof v === 'string' && v.trim() !== '') {
      checkExprSyntax(v, (m) => this.fail(path, m));
      return v.trim();
    }
    return this.fail(path, 'expected an address/value expression (a number or e.g. "sym:NAME+0x10")');
  }
  /** `at` (a linear address) or `gpa` (physical, through the kernel map): exactly one. */
  target(o: Obj, path: string): Target {
    if ((o['at'] === undefined) === (o['gpa'] === undefined)) this.fail(path, 'give exactly one of at (a linear address) and gpa');
    return o['at'] !== undefined ? { gva: this.expr(o['at'], `${path}.at`) } : { gpa: this.expr(o['gpa'], `${path}.gpa`) };
  }
  hex(v: unknown, path: string): string {
    const s = typeof v === 'string' ? v.replace(/[\s:]/g, '') : '';
    if (s === '' || !/^([0-9a-f]{2})+$/i.test(s)) this.fail(path, 'expected hex bytes, e.g. "90 90 c3"');
    return s.toLowerCase();
  }
  bits(v: unknown, path: string): { mask: bigint; names: string[] } {
    const items = Array.isArray(v) ? v : [v];
    let mask = 0n;
    const names: string[] = [];
    items.forEach((b, i) => {
      if (typeof b === 'string' && b.toUpperCase() in CR_BITS) {
        mask |= CR_BITS[b.toUpperCase()]!;
        names.push(b.toUpperCase());
      } else {
        const n = this.int(b, `${path}[${i}]`, 0, 63);
        mask |= 1n << BigInt(n);
        names.push(`bit ${n}`);
      }
    });
    return { mask, names };
  }
}

const TERM = /^(0x[0-9a-f]+|\d+|(sym|phys|alias|module|user_text|user_data|user_text_phys|user_data_phys|pgd):[A-Za-z0-9_.]+|code|data|stack)$/i;

function checkExprSyntax(s: string, fail: (m: string) => never): void {
  for (const t of s.split(/[+-]/).map((x) => x.trim())) {
    if (!TERM.test(t)) fail(`bad expression term ${JSON.stringify(t)} in ${JSON.stringify(s)}`);
  }
}

/** An MSR by name (LSTAR, STAR, …, as in `MSR`) or number. */
function msrIndex(c: Ctx, v: unknown, path: string): number {
  if (typeof v === 'string' && !/^(0x[0-9a-f]+|\d+)$/i.test(v)) {
    const key = v.toUpperCase().replace(/^IA32_/, '');
    const idx = (MSR as Record<string, number>)[key];
    if (idx === undefined) c.fail(path, `unknown MSR ${JSON.stringify(v)} (known: ${Object.keys(MSR).join(', ')})`);
    return idx!;
  }
  return c.int(typeof v === 'string' ? BigInt(v) : v, path, 0, 0xffffffff);
}

function parseStep(c: Ctx, raw: unknown, i: number, kind: 'attack' | 'benign'): Step {
  const path = `steps[${i}]`;
  const o = c.obj(raw, path, ['id', 'vcpu', 'from', 'note', ...VERBS]);
  const verbs = VERBS.filter((v) => v in o);
  if (verbs.length !== 1) c.fail(path, `expected exactly one of ${VERBS.join(', ')}`);
  const verb = verbs[0]!;
  const id = o['id'] === undefined ? `step-${i + 1}` : c.str(o['id'], `${path}.id`);
  const vcpu = o['vcpu'] === undefined ? 0 : c.int(o['vcpu'], `${path}.vcpu`, 0, 0xffff);
  const fromRaw =
    o['from'] === undefined ? (kind === 'attack' && verb !== 'load-module' ? 'module' : 'kernel') : c.str(o['from'], `${path}.from`);
  if (!['module', 'kernel', 'text_poke'].includes(fromRaw)) c.fail(`${path}.from`, 'expected module, kernel or text_poke');
  const from = fromRaw as StepOrigin;
  const base = { id, vcpu, from, ...(o['note'] !== undefined ? { note: c.str(o['note'], `${path}.note`) } : {}) };
  const vp = `${path}.${verb}`;
  const v = o[verb];
  switch (verb) {
    case 'write': {
      const w = c.obj(v, vp, ['at', 'gpa', 'value', 'bytes']);
      if ((w['value'] === undefined) === (w['bytes'] === undefined)) c.fail(vp, 'give exactly one of value (8 bytes) and bytes');
      if (from === 'text_poke' && w['bytes'] !== undefined && c.hex(w['bytes'], `${vp}.bytes`).length % 16 !== 0) {
        c.fail(`${vp}.bytes`, 'text_poke writes whole 8-byte words');
      }
      return {
        ...base, verb,
        at: c.target(w, vp),
        ...(w['value'] !== undefined ? { value: c.expr(w['value'], `${vp}.value`) } : { bytes: c.hex(w['bytes'], `${vp}.bytes`) }),
      };
    }
    case 'read': {
      const r = c.obj(v, vp, ['at', 'gpa']);
      if (from === 'text_poke') c.fail(`${path}.from`, 'text_poke only writes');
      return { ...base, verb, at: c.target(r, vp) };
    }
    case 'execute': {
      const e = c.obj(v, vp, ['at', 'gpa', 'payload']);
      if (from !== 'module') c.fail(`${path}.from`, 'execute steps run from module code');
      const payload = e['payload'] === undefined ? ['ret'] : c.list(e['payload'], `${vp}.payload`);
      const names = payload.map((p, j) => {
        if (typeof p !== 'string' || !isInstructionName(p)) c.fail(`${vp}.payload[${j}]`, `not a table instruction: ${JSON.stringify(p)}`);
        return p as InstructionName;
      });
      return { ...base, verb, at: c.target(e, vp), payload: names };
    }
    case 'cr': {
      const r = c.obj(v, vp, ['cr', 'value', 'set', 'clear']);
      const cr = c.int(r['cr'], `${vp}.cr`, 0, 4);
      if (cr !== 0 && cr !== 3 && cr !== 4) c.fail(`${vp}.cr`, 'expected 0, 3 or 4');
      if (r['value'] !== undefined && (r['set'] !== undefined || r['clear'] !== undefined)) c.fail(vp, 'give value, or set/clear');
      if (r['value'] === undefined && r['set'] === undefined && r['clear'] === undefined) c.fail(vp, 'give value, or set/clear');
      return {
        ...base, verb, cr: cr as 0 | 3 | 4,
        ...(r['value'] !== undefined ? { value: c.expr(r['value'], `${vp}.value`) } : {}),
        set: r['set'] === undefined ? 0n : c.bits(r['set'], `${vp}.set`).mask,
        clear: r['clear'] === undefined ? 0n : c.bits(r['clear'], `${vp}.clear`).mask,
      };
    }
    case 'wrmsr': {
      const r = c.obj(v, vp, ['msr', 'value']);
      return { ...base, verb, msr: msrIndex(c, r['msr'], `${vp}.msr`), value: c.expr(r['value'], `${vp}.value`) };
    }
    case 'lidt':
    case 'lgdt': {
      const r = c.obj(v, vp, ['base', 'limit']);
      return { ...base, verb, base: c.expr(r['base'], `${vp}.base`), limit: r['limit'] === undefined ? 0xfff : c.int(r['limit'], `${vp}.limit`, 0, 0xffff) };
    }
    case 'int3':
      if (v !== null && v !== true && !(typeof v === 'object' && v !== null && Object.keys(v).length === 0)) c.fail(vp, 'takes no arguments');
      return { ...base, verb };
    case 'vmcall': {
      const r = v === null || v === true ? {} : c.obj(v, vp, ['rax', 'rdi', 'rsi', 'rbx', 'rcx', 'rdx']);
      const reg = (name: string, dflt: string): string => (r[name] === undefined ? dflt : c.expr(r[name], `${vp}.${name}`));
      return { ...base, verb, rax: reg('rax', '34'), rdi: reg('rdi', '24'), rsi: reg('rsi', '0'), rbx: reg('rbx', '0'), rcx: reg('rcx', '0'), rdx: reg('rdx', '0') };
    }
    case 'heki-lock-cr': {
      // { cr: 0|4, bits: [WP] | mask: EXPR, flags: 0|1 }; the probe is { cr: 0, mask: 0, flags: 1 }.
      const r = c.obj(v, vp, ['cr', 'bits', 'mask', 'flags']);
      if (r['bits'] !== undefined && r['mask'] !== undefined) c.fail(vp, 'give bits or mask, not both');
      const mask = r['bits'] !== undefined ? `0x${c.bits(r['bits'], `${vp}.bits`).mask.toString(16)}` : r['mask'] === undefined ? '0' : c.expr(r['mask'], `${vp}.mask`);
      return {
        ...base, verb,
        cr: r['cr'] === undefined ? '0' : c.expr(r['cr'], `${vp}.cr`),
        mask,
        flags: r['flags'] === undefined ? '0' : c.expr(r['flags'], `${vp}.flags`),
      };
    }
    case 'xsetbv': {
      const r = c.obj(v, vp, ['value']);
      return { ...base, verb, value: c.expr(r['value'], `${vp}.value`) };
    }
    case 'dma-write': {
      const r = c.obj(v, vp, ['gpa', 'bytes']);
      return { ...base, verb, gpa: c.expr(r['gpa'], `${vp}.gpa`), bytes: c.hex(r['bytes'], `${vp}.bytes`) };
    }
    case 'delay':
      return { ...base, verb, ms: c.int(v, vp, 0, 600_000) };
    case 'bring-up':
      return { ...base, verb, target: c.int(v, vp, 1, 0xffff) };
    case 'load-module': {
      const r = c.obj(v, vp, ['name', 'size']);
      if (from !== 'kernel') c.fail(`${path}.from`, 'modules are loaded by the kernel (from: kernel)');
      const name = c.str(r['name'], `${vp}.name`);
      if (!/^[A-Za-z0-9_]{1,16}$/.test(name)) c.fail(`${vp}.name`, 'letters, digits and _ (at most 16)');
      const size = r['size'] === undefined ? 4096 : c.int(r['size'], `${vp}.size`, 32, 0x10000);
      if (size % 8 !== 0) c.fail(`${vp}.size`, 'a multiple of 8');
      return { ...base, verb, name, size };
    }
  }
}

function parseExpect(c: Ctx, raw: unknown, stepIds: ReadonlySet<string>): Expectations {
  const o = raw === undefined || raw === null ? {} : c.obj(raw, 'expect', ['events', 'no-events', 'writes', 'registers', 'executed', 'outcomes', 'results']);
  const stepRef = (v: unknown, path: string): string => {
    const s = c.str(v, path);
    if (!stepIds.has(s)) c.fail(path, `no step with id ${JSON.stringify(s)}`);
    return s;
  };
  const eventKey = (v: unknown, path: string): EventKey => {
    const s = c.str(v, path).toUpperCase();
    if (!EVENT_KEYS.has(s)) c.fail(path, `unknown event ${JSON.stringify(v)} (known: ${[...EVENT_KEYS].join(', ')})`);
    return s as EventKey;
  };
  const events = c.list(o['events'], 'expect.events').map((e, i): EventExpectation => {
    const p = `expect.events[${i}]`;
    const x = c.obj(e, p, ['event', 'vcpu', 'step', 'rip', 'gva', 'gpa', 'access', 'cr', 'msr', 'descriptor', 'write', 'old', 'new', 'ended']);
    const out: EventExpectation = { event: eventKey(x['event'], `${p}.event`) };
    if (x['vcpu'] !== undefined) out.vcpu = c.int(x['vcpu'], `${p}.vcpu`, 0, 0xffff);
    if (x['step'] !== undefined) out.step = stepRef(x['step'], `${p}.step`);
    if (x['rip'] !== undefined) {
      const r = typeof x['rip'] === 'string' ? x['rip'].trim() : x['rip'];
      if (typeof r === 'string' && /^action(:\d+)?$/.test(r)) {
        if (out.step === undefined) c.fail(`${p}.rip`, '"action" needs the event\'s step');
        out.rip = r;
      } else out.rip = c.expr(r, `${p}.rip`);
    }
    if (x['gva'] !== undefined) out.gva = c.expr(x['gva'], `${p}.gva`);
    if (x['gpa'] !== undefined) out.gpa = c.expr(x['gpa'], `${p}.gpa`);
    if (x['access'] !== undefined) {
      const a = c.str(x['access'], `${p}.access`);
      if (a !== 'r' && a !== 'w' && a !== 'x') c.fail(`${p}.access`, 'expected r, w or x');
      out.access = a;
    }
    if (x['cr'] !== undefined) out.cr = c.int(x['cr'], `${p}.cr`, 0, 4);
    if (x['msr'] !== undefined) out.msr = msrIndex(c, x['msr'], `${p}.msr`);
    if (x['descriptor'] !== undefined) {
      const d = c.str(x['descriptor'], `${p}.descriptor`).toLowerCase();
      if (!['idtr', 'gdtr', 'ldtr', 'tr'].includes(d)) c.fail(`${p}.descriptor`, 'expected idtr, gdtr, ldtr or tr');
      out.descriptor = d as EventExpectation['descriptor'];
    }
    if (x['write'] !== undefined) out.write = c.bool(x['write'], `${p}.write`);
    if (x['old'] !== undefined) out.old = c.expr(x['old'], `${p}.old`);
    if (x['new'] !== undefined) out.new = c.expr(x['new'], `${p}.new`);
    if (x['ended'] !== undefined) out.ended = c.str(x['ended'], `${p}.ended`);
    return out;
  });
  const noEvents = c.list(o['no-events'], 'expect.no-events').map((e, i) => eventKey(e, `expect.no-events[${i}]`));
  const writes = c.list(o['writes'], 'expect.writes').map((w, i) => {
    const x = c.obj(w, `expect.writes[${i}]`, ['step', 'landed']);
    return { step: stepRef(x['step'], `expect.writes[${i}].step`), landed: c.bool(x['landed'], `expect.writes[${i}].landed`) };
  });
  const registers = c.list(o['registers'], 'expect.registers').map((r, i): RegisterExpectation => {
    const p = `expect.registers[${i}]`;
    const x = c.obj(r, p, ['vcpu', 'reg', 'keep-bits', 'equals', 'not-equals']);
    const reg = c.str(x['reg'], `${p}.reg`).toLowerCase();
    if (!/^(cr[0234]|efer|xcr0|(idtr|gdtr)\.(base|limit)|r[a-z0-9]+|msr:[a-z0-9_]+)$/.test(reg)) c.fail(`${p}.reg`, `unknown register ${JSON.stringify(reg)}`);
    if (reg.startsWith('msr:')) msrIndex(c, reg.slice(4), `${p}.reg`);
    const out: RegisterExpectation = { vcpu: x['vcpu'] === undefined ? 0 : c.int(x['vcpu'], `${p}.vcpu`, 0, 0xffff), reg };
    if (x['keep-bits'] !== undefined) {
      const b = c.bits(x['keep-bits'], `${p}.keep-bits`);
      out.keepBits = b.mask;
      out.keepBitNames = b.names;
    }
    if (x['equals'] !== undefined) out.equals = c.expr(x['equals'], `${p}.equals`);
    if (x['not-equals'] !== undefined) out.notEquals = c.expr(x['not-equals'], `${p}.not-equals`);
    if (out.keepBits === undefined && out.equals === undefined && out.notEquals === undefined) c.fail(p, 'give keep-bits, equals or not-equals');
    return out;
  });
  const executed = c.list(o['executed'], 'expect.executed').map((e, i) => {
    const x = c.obj(e, `expect.executed[${i}]`, ['step', 'executed']);
    return { step: stepRef(x['step'], `expect.executed[${i}].step`), executed: c.bool(x['executed'], `expect.executed[${i}].executed`) };
  });
  const outcomes = c.list(o['outcomes'], 'expect.outcomes').map((e, i) => {
    const x = c.obj(e, `expect.outcomes[${i}]`, ['step', 'outcome']);
    const oc = c.str(x['outcome'], `expect.outcomes[${i}].outcome`);
    if (!OUTCOMES.has(oc)) c.fail(`expect.outcomes[${i}].outcome`, `expected one of ${[...OUTCOMES].join(', ')}`);
    return { step: stepRef(x['step'], `expect.outcomes[${i}].step`), outcome: oc as RunOutcome | 'skipped' };
  });
  const results = c.list(o['results'], 'expect.results').map((e, i) => {
    const x = c.obj(e, `expect.results[${i}]`, ['step', 'rax']);
    return { step: stepRef(x['step'], `expect.results[${i}].step`), rax: c.expr(x['rax'], `expect.results[${i}].rax`) };
  });
  return { events, noEvents, writes, registers, executed, outcomes, results };
}

/** Parse a scenario from YAML text; `file` names it in errors. */
export function parseScenario(text: string, file = '<scenario>'): Scenario {
  const c = new Ctx(file);
  let doc: unknown;
  try {
    doc = parseYaml(text, { intAsBigInt: true });
  } catch (err) {
    throw new SimError('bad-scenario', `${file}: not YAML: ${(err as Error).message}`, { cause: err });
  }
  const o = c.obj(doc, '(top)', ['name', 'kind', 'description', 'vcpus', 'steps', 'expect']);
  const name = c.str(o['name'], 'name');
  const kind = c.str(o['kind'], 'kind');
  if (kind !== 'attack' && kind !== 'benign') c.fail('kind', 'expected attack or benign');
  const steps = c.list(o['steps'], 'steps').map((s, i) => parseStep(c, s, i, kind as 'attack' | 'benign'));
  if (steps.length === 0) c.fail('steps', 'a scenario needs at least one step');
  const ids = new Set<string>();
  steps.forEach((s, i) => {
    if (ids.has(s.id)) c.fail(`steps[${i}].id`, `duplicate id ${JSON.stringify(s.id)}`);
    ids.add(s.id);
  });
  const needed = Math.max(...steps.map((s) => Math.max(s.vcpu, s.verb === 'bring-up' ? s.target : 0))) + 1;
  const vcpus = o['vcpus'] === undefined ? needed : c.int(o['vcpus'], 'vcpus', 1, 0xffff);
  if (vcpus < needed) c.fail('vcpus', `the steps use ${needed} vCPUs`);
  return {
    name,
    kind: kind as 'attack' | 'benign',
    description: o['description'] === undefined ? '' : c.str(o['description'], 'description').trim(),
    vcpus,
    steps,
    expect: parseExpect(c, o['expect'], ids),
    file,
  };
}

/** Read and parse a scenario file. */
export async function loadScenario(path: string): Promise<Scenario> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    throw new SimError('bad-scenario', `${path}: ${(err as Error).message}`, { cause: err });
  }
  return parseScenario(text, path);
}
