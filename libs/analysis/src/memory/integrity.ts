/**
 * Kernel integrity by hashing (issue #10), the memory side of the kernel-code-integrity module.
 *
 * At attach (once kernel-code-integrity derived the KASLR slide and write-protected the pages) the module
 * hashes every 4 KiB page of the guest kernel's `.text` and `.rodata` (the policy's sections, as
 * `protectedRanges` computes them from the profile and the slide) — through the VM's host's guest agent
 * (zero-copy mappings, tokens from GET_MAP_TOKEN via the host agent), or through VM_READ_PHYSICAL when
 * that is not possible (the reason is logged and shown in the VM's `protection["memory-integrity"]`).
 *
 * - **Masks.** Bytes that legitimately change are normalised before hashing: the profile's `text_poke`
 *   sites (when the policy allows `text_poke` as a writer) must hold one of the site's known encodings and
 *   hash as the first one; bytes planted by breakpoint tracing (`breakpoints` hook: none yet) hash as the
 *   original byte. Pages with masks are read and hashed here; the others are hashed by the agent.
 * - **Expected hashes.** When the profile carries per-page hashes (`textPageSha256`, page i at
 *   `_text + i·4096`), a text page that matches none of them at attach raises `profile-hash` (patched
 *   before protection started).
 * - **Re-hash.** Every `rehash-interval` seconds (policy parameter, default 5; 0 = baseline only) the pages
 *   are hashed again. A changed page is *explained* — and becomes the new baseline — when an alert of the
 *   kernel-code-integrity module reports a write to that page that landed (a `report` policy), or an
 *   operator exception of the module covers the page (victim GPA range, or no victim: the whole section).
 *   Any other change raises `text-hash` / `rodata-hash`: a write that bypassed EPT (DMA, another
 *   introspector, a hypervisor bug) — the simulator's `attack-dma-text-write`. The same content is alerted
 *   once; a page that changes again alerts again; a page that comes back to its baseline is marked restored.
 */
import { createHash } from 'node:crypto';
import type { GuestOsProfile } from '@periscope/simulator';
import type { U64Range } from '@periscope/verdicts';
import { hex } from '../evidence.js';
import type { LiveVm } from '../link.js';
import { LOCAL_POLICY_ID, parseRuleId, protectedRanges } from '../modules.js';
import type { KernelCodeIntegrityParams, PolicySpec } from '../policy.js';
import type { KernelFacts, ProfileRegistry } from '../profiles.js';
import { nowNs } from '../schema.js';
import type { AlertDraft, AlertRecord, Store } from '../store.js';
import { techniqueOf } from '../techniques.js';
import { PAGE, type MemoryAccess, type MemoryRouter, type MemRange } from './access.js';

export const DEFAULT_REHASH_SECONDS = 5;
/** Key of the VM's `protection` map this module writes. */
export const STATUS_KEY = 'memory-integrity';
const MODULE = 'kernel-code-integrity';
const MAX_VARIANT_COMBINATIONS = 256;

/** A byte breakpoint tracing planted (0xCC) and the byte it replaced. */
export interface PlantedByte {
  readonly gpa: bigint;
  readonly original: number;
}
/** The breakpoints currently planted in a VM (breakpoint tracing registers here; none exist yet). */
export type BreakpointSource = (vm: LiveVm) => readonly PlantedByte[];

/** What the module needs from the service. */
export interface IntegrityHost {
  readonly profiles: ProfileRegistry;
  readonly store: Store;
  readonly liveVms: ReadonlyMap<string, LiveVm>;
  log(level: 'debug' | 'info' | 'warn' | 'error', msg: string, fields?: Record<string, unknown>): void;
  /** Store and publish an alert analysis raises itself (idempotent by detection id). */
  raiseAlert(detectionId: string, draft: AlertDraft): Promise<AlertRecord>;
}

type Section = 'text' | 'rodata';

interface PageState {
  readonly gpa: bigint;
  readonly section: Section;
  baseline: string;
  baselineNs: bigint;
  current: string;
  /** The content already alerted for this page (not alerted twice). */
  alerted?: string;
  readonly expected?: string;
}

interface PokeSite {
  readonly symbol: string;
  readonly gpa: bigint;
  readonly variants: readonly Uint8Array[];
}

export interface IntegrityMismatch {
  kind: 'profile-hash' | 'text-hash' | 'rodata-hash';
  section: Section;
  gpa: string;
  gva: string;
  symbols: string[];
  expected: string;
  actual: string;
  firstSeenNs: string;
  lastSeenNs: string;
  alertId: string;
  restored: boolean;
}

export interface IntegrityExplained {
  section: Section;
  gpa: string;
  from: string;
  to: string;
  by: string;
  atNs: string;
}

/** `GET /v1/vms/{id}/integrity`. */
export interface IntegrityStatus {
  vm: { uuid: string; name: string; hostId: string; generation: string };
  state: 'baselining' | 'monitoring' | 'baseline only' | 'failed' | 'stopped';
  error: string;
  /** `guest-agent` or `read-physical`, how the last pass read memory, and why the read path if it was used. */
  via: string;
  viaDetail: string;
  fallbackReason: string;
  policy: string;
  rehashSeconds: number;
  ranges: { section: Section; gpa: string; length: string }[];
  pages: number;
  maskedBytes: { textPoke: number; breakpoints: number };
  profileHashes: { checked: number; mismatched: number };
  baselineNs: string;
  lastCheckNs: string;
  lastCheckMs: number;
  checks: number;
  mismatches: IntegrityMismatch[];
  explained: IntegrityExplained[];
}

const digestHex = (b: Uint8Array): string => createHash('sha256').update(b).digest('hex');

class VmIntegrity {
  state: IntegrityStatus['state'] = 'baselining';
  error = '';
  via = '';
  viaDetail = '';
  fallbackReason = '';
  pages: PageState[] = [];
  readonly ranges: { section: Section; range: MemRange }[] = [];
  readonly sites: PokeSite[] = [];
  baselineNs = 0n;
  lastCheckNs = 0n;
  lastCheckMs = 0;
  checks = 0;
  profileChecked = 0;
  profileMismatched = 0;
  lastBreakpoints = 0;
  readonly mismatches = new Map<string, IntegrityMismatch>();
  readonly explained: IntegrityExplained[] = [];
  timer: NodeJS.Timeout | undefined;
  chain: Promise<void> = Promise.resolve();
  stopped = false;

  constructor(
    readonly vm: LiveVm,
    readonly spec: PolicySpec,
    readonly params: KernelCodeIntegrityParams,
    readonly facts: KernelFacts,
    readonly profile: GuestOsProfile,
  ) {}

  get rehashSeconds(): number {
    return this.params.rehashSeconds ?? DEFAULT_REHASH_SECONDS;
  }
}

export class KernelIntegrity {
  /** Hook for breakpoint tracing: the bytes it planted per VM (masked while hashing). */
  breakpoints: BreakpointSource = () => [];
  private readonly vms = new Map<string, VmIntegrity>();

  constructor(private readonly host: IntegrityHost, private readonly router: MemoryRouter) {}

  /** Start (or restart, for a new session) baseline and monitoring of a VM. Resolves after the baseline. */
  async start(vm: LiveVm, spec: PolicySpec, facts: KernelFacts): Promise<void> {
    const params = spec.modules.kernelCodeIntegrity;
    if (!params) return;
    const profile = this.host.profiles.get(facts.profile);
    if (!profile) return;
    const old = this.vms.get(vm.uuid);
    if (old) this.halt(old);
    const st = new VmIntegrity(vm, spec, params, facts, profile);
    this.vms.set(vm.uuid, st);
    for (const [rule, ranges] of protectedRanges(spec, facts, this.host.profiles)) {
      if (rule === 'data') continue;
      for (const r of ranges) st.ranges.push({ section: rule, range: { gpa: r.start, length: r.end - r.start } });
    }
    if (params.allowWriters.includes(profile.textPoke.symbol)) {
      for (const s of profile.textPoke.sites) {
        if (!profile.symbols.has(s.symbol) || s.variants.length === 0) continue;
        st.sites.push({ symbol: s.symbol, gpa: facts.textPhys + profile.offsetOf(s.symbol), variants: s.variants });
      }
    }
    await this.enqueue(st, () => this.baseline(st));
  }

  /** Re-hash now (tests, operators); resolves when the check is done. */
  async checkNow(uuid: string): Promise<IntegrityStatus | undefined> {
    const st = this.vms.get(uuid);
    if (!st) return undefined;
    await this.enqueue(st, () => this.check(st));
    return this.status(uuid);
  }

  status(uuid: string): IntegrityStatus | undefined {
    const st = this.vms.get(uuid);
    if (!st) return undefined;
    const bps = st.lastBreakpoints;
    return {
      vm: { uuid: st.vm.uuid, name: st.vm.name, hostId: st.vm.hostId, generation: st.vm.generation.toString() },
      state: st.state,
      error: st.error,
      via: st.via,
      viaDetail: st.viaDetail,
      fallbackReason: st.fallbackReason,
      policy: st.spec.name,
      rehashSeconds: st.rehashSeconds,
      ranges: st.ranges.map((r) => ({ section: r.section, gpa: hex(r.range.gpa), length: hex(r.range.length) })),
      pages: st.pages.length,
      maskedBytes: { textPoke: st.sites.reduce((a, s) => a + (s.variants[0]?.length ?? 0), 0), breakpoints: bps },
      profileHashes: { checked: st.profileChecked, mismatched: st.profileMismatched },
      baselineNs: st.baselineNs.toString(),
      lastCheckNs: st.lastCheckNs.toString(),
      lastCheckMs: st.lastCheckMs,
      checks: st.checks,
      mismatches: [...st.mismatches.values()],
      explained: [...st.explained],
    };
  }

  stop(): void {
    for (const st of this.vms.values()) this.halt(st);
    this.vms.clear();
  }

  /** Resolves when no pass is running (tests). */
  async idle(): Promise<void> {
    await Promise.all([...this.vms.values()].map((s) => s.chain));
  }

  // ------------------------------------------------------------------------------------------ passes

  private halt(st: VmIntegrity): void {
    st.stopped = true;
    if (st.timer) clearTimeout(st.timer);
    st.timer = undefined;
    if (st.state !== 'failed') st.state = 'stopped';
  }

  private current(st: VmIntegrity): boolean {
    return !st.stopped && this.vms.get(st.vm.uuid) === st && this.host.liveVms.get(st.vm.uuid) === st.vm && !st.vm.session.closed;
  }

  private enqueue(st: VmIntegrity, fn: () => Promise<void>): Promise<void> {
    const next = st.chain.then(async () => {
      if (!this.current(st)) {
        this.halt(st);
        return;
      }
      try {
        await fn();
      } catch (e) {
        st.error = (e as Error).message;
        this.host.log('warn', 'kernel integrity pass failed', { vm: st.vm.name, error: st.error });
        if (st.state === 'baselining') {
          st.state = 'failed';
          await this.setStatus(st, `failed: ${st.error}`);
        }
      }
    });
    st.chain = next;
    return next;
  }

  private schedule(st: VmIntegrity): void {
    if (st.stopped || st.rehashSeconds <= 0) return;
    st.timer = setTimeout(() => {
      st.timer = undefined;
      void this.enqueue(st, () => this.check(st)).finally(() => this.schedule(st));
    }, st.rehashSeconds * 1000);
    st.timer.unref();
  }

  private async setStatus(st: VmIntegrity, text: string): Promise<void> {
    if (this.host.liveVms.get(st.vm.uuid) !== st.vm) return;
    st.vm.protection = { ...st.vm.protection, [STATUS_KEY]: text };
    await this.host.store.setVmProtection(st.vm.uuid, st.vm.protection).catch(() => undefined);
  }

  private statusLine(st: VmIntegrity): string {
    const how = st.via === 'guest-agent' ? 'via guest agent' : `via VM_READ_PHYSICAL (fallback: ${st.fallbackReason || 'read path'})`;
    const every = st.rehashSeconds > 0 ? `re-hashed every ${st.rehashSeconds} s` : 'baseline only';
    const bad = [...st.mismatches.values()].filter((m) => !m.restored).length;
    return `${st.pages.length} pages hashed ${how}; ${every}${bad ? `; ${bad} page(s) changed` : ''}`;
  }

  /** One hashing pass over every range: digests (masked pages normalised) and raw bytes of masked pages. */
  private async pass(st: VmIntegrity): Promise<{ digests: Map<bigint, string>; raw: Map<bigint, Buffer> }> {
    const bps = this.breakpoints(st.vm);
    st.lastBreakpoints = bps.length;
    const masked = new Set<bigint>();
    for (const s of st.sites) for (let g = s.gpa & ~(PAGE - 1n); g < s.gpa + BigInt(s.variants[0]!.length); g += PAGE) masked.add(g);
    for (const b of bps) masked.add(b.gpa & ~(PAGE - 1n));
    const run = await this.router.run(
      st.vm,
      async (access: MemoryAccess) => {
        const digests = new Map<bigint, string>();
        const raw = new Map<bigint, Buffer>();
        for (const { range } of st.ranges) {
          const ds = await access.hashPages(range);
          ds.forEach((d, i) => digests.set(range.gpa + BigInt(i) * PAGE, d.toString('hex')));
          for (const g of masked) {
            if (g < range.gpa || g >= range.gpa + range.length) continue;
            const bytes = await access.read({ gpa: g, length: PAGE });
            raw.set(g, bytes);
            digests.set(g, digestHex(normalise(g, bytes, st.sites, bps, 0)));
          }
        }
        return { digests, raw };
      },
      (reason) => this.host.log('warn', 'kernel integrity: guest agent path unusable, falling back to VM_READ_PHYSICAL', { vm: st.vm.name, host: st.vm.hostId, reason }),
    );
    if (run.access.path !== st.via || run.fallbackReason !== st.fallbackReason) {
      if (run.access.path === 'read-physical') {
        this.host.log('warn', `kernel integrity hashes ${st.vm.name} through VM_READ_PHYSICAL: ${run.fallbackReason}`, { vm: st.vm.name, host: st.vm.hostId, reason: run.fallbackReason });
      } else if (st.via) {
        this.host.log('info', 'kernel integrity hashes through the guest agent again', { vm: st.vm.name, detail: run.access.detail });
      }
    }
    st.via = run.access.path;
    st.viaDetail = run.access.detail;
    st.fallbackReason = run.fallbackReason;
    return run.value;
  }

  private async baseline(st: VmIntegrity): Promise<void> {
    st.state = 'baselining';
    await this.setStatus(st, 'baselining');
    const t0 = performance.now();
    const { digests, raw } = await this.pass(st);
    const now = nowNs();
    const expected = expectedHashes(st);
    st.pages = [...digests].sort((a, b) => (a[0] < b[0] ? -1 : 1)).map(([gpa, d]) => {
      const e = expected.get(gpa);
      return { gpa, section: sectionOf(st, gpa), baseline: d, baselineNs: now, current: d, ...(e ? { expected: e } : {}) };
    });
    st.baselineNs = now;
    st.lastCheckNs = now;
    st.lastCheckMs = performance.now() - t0;
    st.state = st.rehashSeconds > 0 ? 'monitoring' : 'baseline only';
    // The profile's expected page hashes: a page that matches none of its allowed variants was changed
    // before the module started.
    for (const p of st.pages) {
      if (!p.expected) continue;
      st.profileChecked++;
      const bytes = raw.get(p.gpa);
      const ok = bytes ? matchesExpected(p.gpa, bytes, st.sites, this.breakpoints(st.vm), p.expected) : p.current === p.expected;
      if (ok) continue;
      st.profileMismatched++;
      await this.mismatch(st, p, 'profile-hash', p.expected, p.current, now);
    }
    this.host.log('info', 'kernel integrity baseline', { vm: st.vm.name, pages: st.pages.length, via: st.via, fallback: st.fallbackReason || undefined, profileMismatches: st.profileMismatched, ms: Math.round(st.lastCheckMs) });
    await this.setStatus(st, this.statusLine(st));
    this.schedule(st);
  }

  private async check(st: VmIntegrity): Promise<void> {
    if (st.state === 'baselining' || st.state === 'failed') return;
    const t0 = performance.now();
    const { digests } = await this.pass(st);
    const now = nowNs();
    st.checks++;
    st.lastCheckNs = now;
    for (const p of st.pages) {
      const d = digests.get(p.gpa);
      if (d === undefined) continue;
      p.current = d;
      const key = p.gpa.toString();
      if (d === p.baseline) {
        const m = st.mismatches.get(key);
        if (m && !m.restored && m.kind !== 'profile-hash') {
          m.restored = true;
          m.lastSeenNs = now.toString();
          p.alerted = undefined;
          this.host.log('info', 'kernel integrity: page back to its baseline', { vm: st.vm.name, gpa: hex(p.gpa) });
        }
        continue;
      }
      if (d === p.alerted) {
        const m = st.mismatches.get(key);
        if (m) m.lastSeenNs = now.toString();
        continue;
      }
      const by = await this.explanation(st, p);
      if (by) {
        st.explained.push({ section: p.section, gpa: hex(p.gpa), from: p.baseline, to: d, by, atNs: now.toString() });
        if (st.explained.length > 100) st.explained.splice(0, st.explained.length - 100);
        this.host.log('info', 'kernel integrity: change explained, new baseline', { vm: st.vm.name, gpa: hex(p.gpa), by });
        p.baseline = d;
        p.baselineNs = now;
        continue;
      }
      await this.mismatch(st, p, p.section === 'text' ? 'text-hash' : 'rodata-hash', p.baseline, d, now);
    }
    st.lastCheckMs = performance.now() - t0;
    await this.setStatus(st, this.statusLine(st));
  }

  /** An alert of this module whose write to the page landed, or an operator exception covering it. */
  private async explanation(st: VmIntegrity, p: PageState): Promise<string> {
    const alerts = await this.host.store.listAlerts({ vm: st.vm.uuid, module: MODULE, sinceNs: p.baselineNs, limit: 500 });
    for (const a of alerts) {
      const g = a.evidence.attempt['gpa'];
      if (a.evidence.attempt['event'] !== 'PF' || typeof g !== 'string') continue;
      if ((BigInt(g) & ~(PAGE - 1n)) === p.gpa && a.action === 'allow') return `alert ${a.id} (${a.ruleId}: the write landed)`;
    }
    const now = nowNs();
    for (const x of await this.host.store.listExceptions({ policy: st.spec.name })) {
      const e = x.spec;
      if (e.module !== MODULE || (e.expiresNs && e.expiresNs <= now)) continue;
      if (e.vms.length && !e.vms.includes(st.vm.uuid)) continue;
      const rule = e.rule.replace(/-hash$/, '');
      if (rule !== p.section) continue;
      const v: U64Range | undefined = e.victim.gpa;
      if (!v || (v.start < p.gpa + PAGE && v.end > p.gpa)) return `exception ${e.id}`;
    }
    return '';
  }

  private async mismatch(st: VmIntegrity, p: PageState, rule: IntegrityMismatch['kind'], expected: string, actual: string, now: bigint): Promise<void> {
    const vm = st.vm;
    const offset = p.gpa - st.facts.textPhys;
    const gva = st.facts.textBase + offset;
    const symbols = [...st.profile.symbols].filter(([, s]) => s.offset < offset + PAGE && s.offset + BigInt(Math.max(1, s.size)) > offset).map(([n]) => n).slice(0, 16);
    const tech = techniqueOf(MODULE, rule);
    const params = st.params;
    const what = rule === 'profile-hash'
      ? `kernel text differs from the guest OS profile's expected page hash at attach`
      : `kernel ${p.section === 'text' ? 'text' : 'read-only data'} changed in memory without a write any vCPU made (DMA or another EPT bypass)`;
    const summary = `${what}: page ${hex(p.gpa)} (${symbols.slice(0, 3).join(', ') || hex(gva)}) hashed ${actual.slice(0, 16)}…, expected ${expected.slice(0, 16)}… (${st.via === 'guest-agent' ? 'via the guest agent' : `via VM_READ_PHYSICAL: ${st.fallbackReason}`})`;
    const draft: AlertDraft = {
      dedupKey: `${vm.uuid}|${MODULE}/${rule}|gpa:${hex(p.gpa)}|hash`,
      severity: params.severity,
      title: `Detected: ${tech?.why ?? what} on ${vm.name || vm.uuid}`,
      description: summary,
      technique: { id: tech?.id ?? '', name: tech?.name ?? '' },
      module: MODULE,
      hostId: vm.hostId,
      vmUuid: vm.uuid,
      vmName: vm.name,
      vcpu: null,
      ruleId: `${st.spec.name}/${MODULE}/${rule}#${vm.uuid}`,
      exceptionId: '',
      policyId: LOCAL_POLICY_ID,
      policyVersion: vm.session.lastPolicyVersion,
      policyName: st.spec.name,
      action: 'none',
      tier: 'analysis',
      evidence: {
        attempt: { event: 'HASH', section: p.section === 'text' ? '.text' : '.rodata', gpa: hex(p.gpa), gva: hex(gva), symbols, expected, actual, via: st.via, ...(st.fallbackReason ? { fallback: st.fallbackReason } : {}) },
        registers: {},
        sregs: {},
        summary,
        attributes: { via: st.via, section: p.section, rule },
        session: vm.generation.toString(),
        seqs: [],
      },
      detectedNs: now,
    };
    const id = `integrity:${vm.uuid}:${vm.generation}:${hex(p.gpa)}:${actual.slice(0, 32)}`;
    const alert = await this.host.raiseAlert(id, draft);
    p.alerted = actual;
    const key = p.gpa.toString();
    const prev = st.mismatches.get(key);
    st.mismatches.set(key, {
      kind: rule, section: p.section, gpa: hex(p.gpa), gva: hex(gva), symbols, expected, actual,
      firstSeenNs: prev && !prev.restored ? prev.firstSeenNs : now.toString(), lastSeenNs: now.toString(), alertId: alert.id, restored: false,
    });
    this.host.log('warn', 'kernel integrity: unexplained change', { vm: vm.name, rule, gpa: hex(p.gpa), alert: alert.id });
  }
}

function sectionOf(st: VmIntegrity, gpa: bigint): Section {
  return st.ranges.find((r) => gpa >= r.range.gpa && gpa < r.range.gpa + r.range.length)?.section ?? 'text';
}

/** Expected digests by page gpa, from the profile (page i of `.text` at textPhys + offset + i·4096). */
function expectedHashes(st: VmIntegrity): Map<bigint, string> {
  const out = new Map<bigint, string>();
  const text = st.profile.sections.find((s) => s.name === '.text');
  if (!text) return out;
  const hashed = new Set(st.ranges.filter((r) => r.section === 'text').flatMap((r) => pagesIn(r.range)));
  st.profile.textPageSha256.forEach((h, i) => {
    const g = st.facts.textPhys + text.offset + BigInt(i) * PAGE;
    if (hashed.has(g)) out.set(g, h.toLowerCase());
  });
  return out;
}

function pagesIn(r: MemRange): bigint[] {
  const out: bigint[] = [];
  for (let g = r.gpa; g < r.gpa + r.length; g += PAGE) out.push(g);
  return out;
}

/**
 * A copy of one page with planted breakpoints restored and every text_poke site set to variant
 * `choice(site)` when it currently holds one of its known encodings (otherwise left as is: a change).
 */
function normalise(pageGpa: bigint, bytes: Buffer, sites: readonly PokeSite[], bps: readonly PlantedByte[], choice: number | ((i: number) => number)): Buffer {
  const out = Buffer.from(bytes);
  const end = pageGpa + BigInt(out.length);
  for (const b of bps) if (b.gpa >= pageGpa && b.gpa < end && out[Number(b.gpa - pageGpa)] === 0xcc) out[Number(b.gpa - pageGpa)] = b.original;
  sites.forEach((s, i) => {
    const len = s.variants[0]!.length;
    const from = s.gpa > pageGpa ? s.gpa : pageGpa;
    const to = s.gpa + BigInt(len) < end ? s.gpa + BigInt(len) : end;
    if (from >= to) return;
    const a = Number(from - pageGpa);
    const n = Number(to - from);
    const skip = Number(from - s.gpa);
    const cur = out.subarray(a, a + n);
    if (!s.variants.some((v) => Buffer.from(v.subarray(skip, skip + n)).equals(cur))) return;
    const v = s.variants[typeof choice === 'number' ? choice : choice(i)] ?? s.variants[0]!;
    out.set(v.subarray(skip, skip + n), a);
  });
  return out;
}

/** Does the page match the expected digest for some assignment of the text_poke sites' variants? */
function matchesExpected(pageGpa: bigint, bytes: Buffer, sites: readonly PokeSite[], bps: readonly PlantedByte[], expected: string): boolean {
  const here = sites.filter((s) => s.gpa < pageGpa + PAGE && s.gpa + BigInt(s.variants[0]!.length) > pageGpa);
  if (digestHex(normalise(pageGpa, bytes, [], bps, 0)) === expected) return true;
  let combos = 1;
  for (const s of here) combos *= s.variants.length;
  if (combos > MAX_VARIANT_COMBINATIONS) return false;
  for (let c = 0; c < combos; c++) {
    let rest = c;
    const pick = here.map((s) => {
      const k = rest % s.variants.length;
      rest = Math.floor(rest / s.variants.length);
      return k;
    });
    if (digestHex(normalise(pageGpa, bytes, here, bps, (i) => pick[i]!)) === expected) return true;
  }
  return false;
}

/** The rule of an integrity alert, or undefined for other alerts (used by exceptions/explanations). */
export function integrityRuleOf(ruleId: string): string | undefined {
  const p = parseRuleId(ruleId);
  return p && p.module === MODULE && /-hash$/.test(p.rule) ? p.rule : undefined;
}
