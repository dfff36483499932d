/**
 * Analysis policy documents (`periscope.policy/v1`, YAML or JSON): which VMs (names, labels, hosts) get
 * which protection modules with which parameters. Validation collects every problem with its path
 * (`modules.cr-pinning.cr4[1]: unknown bit "SMEPP"`); `AnalysisError('bad-policy')` carries them all.
 * The database stores each version; the spec below is what the modules compile (docs/profiles.md and
 * the README of this library describe the format).
 */
import { createHash } from 'node:crypto';
import { parseDocument } from 'yaml';
import { CR_BITS, MSR } from '@periscope/simulator';
import type { Severity } from '@periscope/verdicts';
import { AnalysisError, type PolicyIssue } from './errors.js';
import { hekiParamsFromJson, validateHekiModule, type HekiModuleParams } from './heki-policy.js';
import { parseResponse, type ResponseSpec } from './responses.js';

export const POLICY_FORMAT = 'periscope.policy/v1';

export type ModuleAction = 'deny' | 'report';

export interface KernelCodeIntegrityParams {
  readonly action: ModuleAction;
  readonly severity: Severity;
  /** What else happens on a detection (inject, pause, quarantine, crash; responses.ts); absent = deny. */
  readonly response?: ResponseSpec;
  /** Profile sections write-protected (default `.text`, `.rodata`). */
  readonly sections: readonly string[];
  /** Also write-protect the pages of the profile's `protectedData` symbols. */
  readonly protectedData: boolean;
  /** RIP ranges (kernel symbols of the profile) allowed to write the protected text (default `text_poke`). */
  readonly allowWriters: readonly string[];
  /**
   * Re-hash the text and rodata pages every this many seconds (`rehash-interval`; memory/integrity.ts);
   * 0 = baseline at attach only. Absent = the module's default (DEFAULT_REHASH_SECONDS).
   */
  readonly rehashSeconds?: number;
}

export interface CrPinningParams {
  readonly action: ModuleAction;
  readonly severity: Severity;
  /** What else happens on a detection (inject, pause, quarantine, crash; responses.ts); absent = deny. */
  readonly response?: ResponseSpec;
  readonly cr0: bigint;
  readonly cr4: bigint;
}

export interface SyscallMsrParams {
  readonly action: ModuleAction;
  readonly severity: Severity;
  /** What else happens on a detection (inject, pause, quarantine, crash; responses.ts); absent = deny. */
  readonly response?: ResponseSpec;
  readonly msrs: readonly number[];
  readonly eferNxe: boolean;
}

export interface DescriptorTableParams {
  readonly action: ModuleAction;
  readonly severity: Severity;
  /** What else happens on a detection (inject, pause, quarantine, crash; responses.ts); absent = deny. */
  readonly response?: ResponseSpec;
  /** `IDTR` (1), `GDTR` (2). */
  readonly tables: readonly ('IDTR' | 'GDTR')[];
}

export interface PolicyModules {
  readonly kernelCodeIntegrity?: KernelCodeIntegrityParams;
  readonly crPinning?: CrPinningParams;
  readonly syscallMsrs?: SyscallMsrParams;
  readonly descriptorTables?: DescriptorTableParams;
  /** Heki pins expected per VM group, and the denial response (heki-policy.ts). */
  readonly heki?: HekiModuleParams;
}

export interface VmSelector {
  /** Globs on the VM name (`*`, `?`); empty = any. */
  readonly names: readonly string[];
  /** Every label must be equal; empty = any. */
  readonly labels: Readonly<Record<string, string>>;
  /** Host ids; empty = any. */
  readonly hosts: readonly string[];
}

export interface PolicySpec {
  readonly name: string;
  readonly description: string;
  /** Lower first; a VM gets the first policy (priority, then name) that selects it. Default 100. */
  readonly priority: number;
  readonly select: VmSelector;
  /** Guest OS profile name (default `linux-sim`). */
  readonly profile: string;
  readonly modules: PolicyModules;
}

export const MODULE_NAMES = ['kernel-code-integrity', 'cr-pinning', 'syscall-msrs', 'descriptor-tables', 'heki'] as const;
export type ModuleName = (typeof MODULE_NAMES)[number];

export const MSR_NAMES: Readonly<Record<string, number>> = {
  LSTAR: MSR.LSTAR,
  CSTAR: MSR.CSTAR,
  STAR: MSR.STAR,
  SYSENTER_CS: MSR.SYSENTER_CS,
  SYSENTER_ESP: MSR.SYSENTER_ESP,
  SYSENTER_EIP: MSR.SYSENTER_EIP,
  EFER: MSR.EFER,
};
export const DEFAULT_SYSCALL_MSRS = ['LSTAR', 'CSTAR', 'STAR', 'SYSENTER_CS', 'SYSENTER_ESP', 'SYSENTER_EIP'];
const CR0_NAMES = ['PE', 'MP', 'TS', 'NE', 'WP', 'AM', 'NW', 'CD', 'PG'];
const CR4_NAMES = ['PSE', 'PAE', 'PGE', 'OSFXSR', 'OSXMMEXCPT', 'UMIP', 'LA57', 'FSGSBASE', 'PCIDE', 'OSXSAVE', 'SMEP', 'SMAP'];
const SEVERITIES: readonly Severity[] = ['info', 'low', 'medium', 'high', 'critical'];

type Obj = Record<string, unknown>;

class Checker {
  readonly issues: PolicyIssue[] = [];
  fail(path: string, message: string): void {
    this.issues.push({ path, message });
  }
  obj(v: unknown, path: string): Obj | undefined {
    if (v === undefined || v === null) return undefined;
    if (typeof v !== 'object' || Array.isArray(v)) {
      this.fail(path, 'must be a mapping');
      return undefined;
    }
    return v as Obj;
  }
  keys(o: Obj, path: string, allowed: readonly string[]): void {
    for (const k of Object.keys(o)) {
      if (!allowed.includes(k)) this.fail(path ? `${path}.${k}` : k, `unknown key (allowed: ${allowed.join(', ')})`);
    }
  }
  str(v: unknown, path: string, def?: string): string | undefined {
    if (v === undefined || v === null) return def;
    if (typeof v !== 'string') {
      this.fail(path, 'must be a string');
      return def;
    }
    return v;
  }
  strList(v: unknown, path: string): string[] {
    if (v === undefined || v === null) return [];
    const arr = Array.isArray(v) ? v : [v];
    const out: string[] = [];
    arr.forEach((x, i) => {
      if (typeof x === 'string' && x.length > 0) out.push(x);
      else this.fail(Array.isArray(v) ? `${path}[${i}]` : path, 'must be a non-empty string');
    });
    return out;
  }
  bool(v: unknown, path: string, def: boolean): boolean {
    if (v === undefined || v === null) return def;
    if (typeof v !== 'boolean') {
      this.fail(path, 'must be true or false');
      return def;
    }
    return v;
  }
  oneOf<T extends string>(v: unknown, path: string, values: readonly T[], def: T): T {
    if (v === undefined || v === null) return def;
    if (typeof v !== 'string' || !(values as readonly string[]).includes(v)) {
      this.fail(path, `must be one of ${values.join(', ')} (got ${JSON.stringify(v)})`);
      return def;
    }
    return v as T;
  }
}

function parseBits(c: Checker, v: unknown, path: string, names: readonly string[], def: readonly string[]): bigint {
  const list = v === undefined || v === null ? def : Array.isArray(v) ? v : [v];
  let mask = 0n;
  list.forEach((b, i) => {
    const p = Array.isArray(v) ? `${path}[${i}]` : path;
    if (typeof b === 'string' && names.includes(b.toUpperCase())) mask |= CR_BITS[b.toUpperCase()]!;
    else if (typeof b === 'number' && Number.isInteger(b) && b >= 0 && b < 64) mask |= 1n << BigInt(b);
    else c.fail(p, `unknown bit ${JSON.stringify(b)} (known: ${names.join(', ')}, or a bit number)`);
  });
  return mask;
}

function moduleCommon(c: Checker, o: Obj, path: string, defAction: ModuleAction, defSeverity: Severity): { action: ModuleAction; severity: Severity; response?: ResponseSpec } {
  const action = c.oneOf(o['action'], `${path}.action`, ['deny', 'report'] as const, defAction);
  const response = parseResponse(o['response'], `${path}.response`, action, (p, m) => c.fail(p, m));
  return {
    action,
    severity: c.oneOf(o['severity'], `${path}.severity`, SEVERITIES, defSeverity),
    ...(response ? { response } : {}),
  };
}

/** Validate a parsed document (a plain object). */
export function validatePolicy(doc: unknown, source = 'policy'): PolicySpec {
  const c = new Checker();
  const root = c.obj(doc, '(document)');
  if (!root) throw new AnalysisError('bad-policy', `${source}: the document must be a mapping`, { issues: c.issues.length ? c.issues : [{ path: '(document)', message: 'must be a mapping' }] });
  c.keys(root, '', ['format', 'name', 'description', 'priority', 'select', 'profile', 'modules', '$comment']);
  if (root['format'] !== undefined && root['format'] !== POLICY_FORMAT) c.fail('format', `must be ${POLICY_FORMAT}`);
  const name = c.str(root['name'], 'name');
  if (name === undefined) c.fail('name', 'is required');
  else if (!/^[a-z0-9][a-z0-9._-]{0,62}$/.test(name)) c.fail('name', 'must be 1-63 characters of a-z 0-9 . _ - starting with a letter or digit');
  let priority = 100;
  if (root['priority'] !== undefined) {
    if (typeof root['priority'] === 'number' && Number.isInteger(root['priority']) && root['priority'] >= 0 && root['priority'] <= 1_000_000) priority = root['priority'];
    else c.fail('priority', 'must be an integer 0..1000000');
  }
  const sel = c.obj(root['select'], 'select') ?? {};
  c.keys(sel, 'select', ['names', 'labels', 'hosts']);
  const labels: Record<string, string> = {};
  const lo = c.obj(sel['labels'], 'select.labels');
  if (lo) for (const [k, v] of Object.entries(lo)) {
    if (typeof v === 'string' || typeof v === 'number' || typeof v === 'boolean') labels[k] = String(v);
    else c.fail(`select.labels.${k}`, 'must be a string');
  }
  const select: VmSelector = { names: c.strList(sel['names'], 'select.names'), labels, hosts: c.strList(sel['hosts'], 'select.hosts') };
  const profile = c.str(root['profile'], 'profile', 'linux-sim')!;
  const mods = c.obj(root['modules'], 'modules');
  const modules: { -readonly [K in keyof PolicyModules]: PolicyModules[K] } = {};
  if (!mods) c.fail('modules', 'is required: enable at least one of ' + MODULE_NAMES.join(', '));
  else {
    c.keys(mods, 'modules', MODULE_NAMES);
    const enabled = (k: ModuleName): Obj | undefined => {
      const v = mods[k];
      if (v === undefined || v === null || v === false) return undefined;
      if (v === true) return {};
      const o = c.obj(v, `modules.${k}`);
      if (o && o['enabled'] === false) return undefined;
      return o;
    };
    let m = enabled('kernel-code-integrity');
    if (m) {
      const p = 'modules.kernel-code-integrity';
      c.keys(m, p, ['enabled', 'action', 'severity', 'sections', 'protected-data', 'allow-writers', 'rehash-interval', 'response']);
      const rehash = m['rehash-interval'];
      if (rehash !== undefined && (typeof rehash !== 'number' || !Number.isFinite(rehash) || rehash < 0 || (rehash > 0 && rehash < 0.1) || rehash > 86_400)) {
        c.fail(`${p}.rehash-interval`, 'must be 0 (baseline only) or a number of seconds 0.1..86400');
      }
      const sections = m['sections'] === undefined ? ['.text', '.rodata'] : c.strList(m['sections'], `${p}.sections`);
      modules.kernelCodeIntegrity = {
        ...moduleCommon(c, m, p, 'deny', 'critical'),
        sections,
        protectedData: c.bool(m['protected-data'], `${p}.protected-data`, true),
        allowWriters: m['allow-writers'] === undefined ? ['text_poke'] : c.strList(m['allow-writers'], `${p}.allow-writers`),
        ...(typeof rehash === 'number' ? { rehashSeconds: rehash } : {}),
      };
    }
    m = enabled('cr-pinning');
    if (m) {
      const p = 'modules.cr-pinning';
      c.keys(m, p, ['enabled', 'action', 'severity', 'cr0', 'cr4', 'response']);
      modules.crPinning = {
        ...moduleCommon(c, m, p, 'deny', 'high'),
        cr0: parseBits(c, m['cr0'], `${p}.cr0`, CR0_NAMES, ['WP']),
        cr4: parseBits(c, m['cr4'], `${p}.cr4`, CR4_NAMES, ['SMEP', 'SMAP']),
      };
    }
    m = enabled('syscall-msrs');
    if (m) {
      const p = 'modules.syscall-msrs';
      c.keys(m, p, ['enabled', 'action', 'severity', 'msrs', 'efer-nxe', 'response']);
      const names = m['msrs'] === undefined ? DEFAULT_SYSCALL_MSRS : c.strList(m['msrs'], `${p}.msrs`);
      const msrs: number[] = [];
      names.forEach((n, i) => {
        const idx = MSR_NAMES[n.toUpperCase()];
        if (idx === undefined || n.toUpperCase() === 'EFER') c.fail(`${p}.msrs[${i}]`, `unknown MSR ${JSON.stringify(n)} (known: ${DEFAULT_SYSCALL_MSRS.join(', ')}; EFER.NXE is efer-nxe)`);
        else msrs.push(idx);
      });
      modules.syscallMsrs = { ...moduleCommon(c, m, p, 'deny', 'high'), msrs, eferNxe: c.bool(m['efer-nxe'], `${p}.efer-nxe`, true) };
    }
    m = enabled('descriptor-tables');
    if (m) {
      const p = 'modules.descriptor-tables';
      c.keys(m, p, ['enabled', 'action', 'severity', 'tables', 'response']);
      const tables = (m['tables'] === undefined ? ['IDTR', 'GDTR'] : c.strList(m['tables'], `${p}.tables`)).map((t, i) => {
        const u = t.toUpperCase();
        if (u !== 'IDTR' && u !== 'GDTR') c.fail(`${p}.tables[${i}]`, `must be IDTR or GDTR (got ${JSON.stringify(t)})`);
        return u as 'IDTR' | 'GDTR';
      });
      modules.descriptorTables = { ...moduleCommon(c, m, p, 'report', 'high'), tables };
    }
    m = enabled('heki');
    if (m) {
      const r = validateHekiModule(m, 'modules.heki');
      for (const i of r.issues) c.fail(i.path, i.message);
      modules.heki = r.params;
    }
  }
  const description = c.str(root['description'], 'description', '')!;
  if (c.issues.length) {
    throw new AnalysisError('bad-policy', `${source}: ${c.issues.map((i) => `${i.path}: ${i.message}`).join('; ')}`, { issues: c.issues });
  }
  return { name: name!, description, priority, select, profile, modules };
}

/** Parse YAML (or JSON, a subset) and validate. Syntax errors carry line and column. */
export function parsePolicyDocument(text: string, source = 'policy'): PolicySpec {
  const doc = parseDocument(text, { prettyErrors: true, uniqueKeys: true });
  if (doc.errors.length) {
    const issues = doc.errors.map((e) => ({ path: e.linePos ? `line ${e.linePos[0].line}, column ${e.linePos[0].col}` : '(document)', message: e.message.split('\n')[0]! }));
    throw new AnalysisError('bad-policy', `${source}: ${issues.map((i) => `${i.path}: ${i.message}`).join('; ')}`, { issues });
  }
  return validatePolicy(doc.toJS(), source);
}

/** Canonical JSON of a spec (bigint as hex): the stored form and the digest input. */
export function specToJson(s: PolicySpec): Obj {
  return JSON.parse(JSON.stringify(s, (_k, v: unknown) => (typeof v === 'bigint' ? `0x${v.toString(16)}` : v))) as Obj;
}

export function specFromJson(j: Obj): PolicySpec {
  const revive = (o: unknown): unknown => o;
  const s = revive(j) as PolicySpec & { modules: Obj };
  const m = s.modules as Obj;
  const cr = m['crPinning'] as { cr0: string; cr4: string } | undefined;
  return {
    ...s,
    modules: {
      ...(s.modules as PolicyModules),
      ...(cr ? { crPinning: { ...(m['crPinning'] as CrPinningParams), cr0: BigInt(cr.cr0), cr4: BigInt(cr.cr4) } } : {}),
      ...(m['heki'] ? { heki: hekiParamsFromJson(m['heki'] as Obj) } : {}),
    },
  };
}

export function specDigest(s: PolicySpec): string {
  return createHash('sha256').update(JSON.stringify(specToJson(s))).digest('hex');
}

function glob(pattern: string): RegExp {
  return new RegExp(`^${pattern.replace(/[.+^${}()|[\]\\]/g, '\\$&').replace(/\*/g, '.*').replace(/\?/g, '.')}$`);
}

export interface VmIdentity {
  readonly name: string;
  readonly hostId: string;
  readonly labels: Readonly<Record<string, string>>;
}

export function selects(s: VmSelector, vm: VmIdentity): boolean {
  if (s.names.length && !s.names.some((n) => glob(n).test(vm.name))) return false;
  if (s.hosts.length && !s.hosts.includes(vm.hostId)) return false;
  for (const [k, v] of Object.entries(s.labels)) if (vm.labels[k] !== v) return false;
  return true;
}

/** The policy a VM gets: the first (priority, then name) whose selector holds. */
export function choosePolicy(policies: readonly PolicySpec[], vm: VmIdentity): PolicySpec | undefined {
  return [...policies].sort((a, b) => a.priority - b.priority || a.name.localeCompare(b.name)).find((p) => selects(p.select, vm));
}
