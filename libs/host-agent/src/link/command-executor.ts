/**
 * KVMI commands from analysis (`KvmiCommand`, by VM uuid + session generation + vCPU, with a
 * correlation id) → the VM's KVMI session → `CommandResult` (typed reply, or KVM's error).
 *
 * A command is written to the VM's socket as soon as it arrives, in stream order: commands for a vCPU
 * that is holding an event run while it is held (KVMI requires that for SET_REGISTERS), and a verdict
 * received after them is written after them.
 *
 * Agent-side allow-list: commands that change the guest from analysis — write physical memory, set
 * registers, set XSAVE, inject an exception (and central CRASH verdicts or verdicts choosing a CR/MSR value,
 * checked by the runtime) — are refused with COMMAND_STATUS_REFUSED_BY_AGENT_POLICY unless the host enables
 * them with `--allow-command KEY` (config key `allow-command`). A local policy pushed by analysis whose
 * actions inject, crash or rewrite is refused whole by the same list (`policyRefusal`, used by `PolicyHolder.install`);
 * the operator's own `--policy` file is trusted.
 */
import { commands, KvmiError, type CommandKey, type ReplyResult } from '@periscope/kvmi';
import { CommandStatus, CpuMode, KvmiCommandKind, KvmiEventKind, type CommandResult, type KvmiCommand } from '@periscope/contracts';
import { events, type EventKey } from '@periscope/kvmi';
import { policyActions, type ActionKind, type CompiledPolicy } from '@periscope/verdicts';
import type { VmConnection } from '../vm-connection.js';

/** Allow-list keys (`--allow-command`) for the dangerous operations analysis may request. */
export const DANGEROUS_COMMANDS = {
  writePhysical: 'write-physical',
  setRegisters: 'set-registers',
  setXsave: 'set-xsave',
  injectException: 'inject-exception',
} as const;
export const ALLOW_COMMAND_KEYS = ['write-physical', 'set-registers', 'set-xsave', 'inject-exception', 'crash'] as const;
export type AllowCommandKey = (typeof ALLOW_COMMAND_KEYS)[number];

/**
 * The allow-list key each local-policy action needs when the policy came from analysis (null: none).
 * Every action kind is listed, so a new one must decide. `deny` (the old value, or bits pinned from it) and
 * `skip` (RIP past the instruction) are how a write is refused — the protection itself. `rewrite` makes a
 * CR/MSR write land with bits analysis chose (`fixed` any value: LSTAR pointed anywhere), so it needs the key
 * of VCPU_SET_REGISTERS, as does a central verdict doing the same (held-events.ts).
 */
export const ACTION_ALLOW_KEYS: Readonly<Record<ActionKind, AllowCommandKey | null>> = {
  allow: null,
  deny: null,
  rewrite: 'set-registers',
  skip: null,
  retry: null,
  inject: 'inject-exception',
  crash: 'crash',
};

/** The allow-list keys a compiled policy needs, each with where it is used (rule/exception ids, defaults). */
export function policyAllowKeys(c: CompiledPolicy): Map<AllowCommandKey, string[]> {
  const out = new Map<AllowCommandKey, string[]>();
  for (const u of policyActions(c)) {
    const key = ACTION_ALLOW_KEYS[u.kind];
    if (!key) continue;
    let l = out.get(key);
    if (!l) out.set(key, (l = []));
    l.push(`${u.where} (${u.kind})`);
  }
  return out;
}

/**
 * Why this agent refuses a policy pushed by analysis (an action its allow-list does not enable), naming
 * the key and the config key; undefined = allowed.
 */
export function policyRefusal(c: CompiledPolicy, allow: ReadonlySet<string>): string | undefined {
  const parts: string[] = [];
  for (const [key, where] of policyAllowKeys(c)) {
    if (allow.has(key)) continue;
    const shown = where.length > 3 ? `${where.slice(0, 3).join(', ')} and ${where.length - 3} more` : where.join(', ');
    parts.push(`${shown} needs --allow-command ${key}`);
  }
  if (parts.length === 0) return undefined;
  return `refused by this agent's allow-list (REFUSED_BY_AGENT_POLICY): ${parts.join('; ')} (config key "allow-command"); the previous policy stays active`;
}

type CommandCase = NonNullable<KvmiCommand['command']>['$case'];
type ResultValue = NonNullable<CommandResult['result']>;

const KIND_PREFIX = 'KVMI_EVENT_KIND_';
function eventIdOfKind(k: KvmiEventKind): number | undefined {
  const name = KvmiEventKind[k];
  if (!name || !name.startsWith(KIND_PREFIX)) return undefined;
  const key = name.slice(KIND_PREFIX.length) as EventKey;
  return key in events ? events[key].id : undefined;
}

function commandKeyOfKind(k: KvmiCommandKind): CommandKey | undefined {
  const name = KvmiCommandKind[k];
  if (!name || k === KvmiCommandKind.KVMI_COMMAND_KIND_UNSPECIFIED) return undefined;
  const key = name.slice('KVMI_COMMAND_KIND_'.length);
  return (key === 'VM_GET_MAP_TOKEN' ? 'GET_MAP_TOKEN' : key) as CommandKey;
}

class Invalid extends Error {}

const MODES: Record<number, CpuMode> = { 2: CpuMode.CPU_MODE_16_BIT, 4: CpuMode.CPU_MODE_32_BIT, 8: CpuMode.CPU_MODE_64_BIT };

export interface CommandExecutorOptions {
  /** Enabled allow-list keys. */
  allow: ReadonlySet<string>;
  /** Attached VM by uuid text. */
  vm(uuid: string): VmConnection | undefined;
  /** A relayed VCPU_CONTROL_SINGLESTEP succeeded (the link's fail-open needs to know). */
  onSinglestep?(vm: VmConnection, vcpu: number, enabled: boolean): void;
  defaultTimeoutMs?: number;
}

export class CommandExecutor {
  readonly stats = { executed: 0, failed: 0, refused: 0 };
  constructor(private readonly opts: CommandExecutorOptions) {}

  async execute(cmd: KvmiCommand, uuidText: string): Promise<CommandResult> {
    const t0 = process.hrtime.bigint();
    const base = { correlationId: cmd.correlationId, vmUuid: cmd.vmUuid, sessionGeneration: cmd.sessionGeneration, vcpu: cmd.vcpu, kvmError: 0, latencyNs: 0n, message: '' };
    const done = (status: CommandStatus, extra: Partial<CommandResult> = {}): CommandResult => {
      this.stats.executed++;
      if (status !== CommandStatus.COMMAND_STATUS_OK) this.stats.failed++;
      return { ...base, status, ...extra, latencyNs: process.hrtime.bigint() - t0, result: extra.result };
    };
    const c = cmd.command;
    if (!c) return done(CommandStatus.COMMAND_STATUS_INVALID_ARGUMENT, { message: 'no command' });
    const refusedKey = (DANGEROUS_COMMANDS as Partial<Record<CommandCase, string>>)[c.$case];
    if (refusedKey && !this.opts.allow.has(refusedKey)) {
      this.stats.refused++;
      return done(CommandStatus.COMMAND_STATUS_REFUSED_BY_AGENT_POLICY, {
        message: `${c.$case} from analysis is refused by this agent's allow-list; enable it with --allow-command ${refusedKey} (config key "allow-command")`,
      });
    }
    const vm = this.opts.vm(uuidText);
    if (!vm || !vm.info || vm.session.isClosed) return done(CommandStatus.COMMAND_STATUS_VM_NOT_ATTACHED, { message: `no attached VM ${uuidText}` });
    if (BigInt(vm.info.sessionGeneration) !== cmd.sessionGeneration) {
      return done(CommandStatus.COMMAND_STATUS_STALE_SESSION, { message: `session generation ${cmd.sessionGeneration} is not the current ${vm.info.sessionGeneration}` });
    }
    const s = vm.session;
    const vcpu = cmd.vcpu;
    const timeout = cmd.timeoutMs > 0 ? cmd.timeoutMs : (this.opts.defaultTimeoutMs ?? 5000);
    const req = (key: CommandKey, input: Record<string, unknown>): Promise<ReplyResult<CommandKey>> =>
      (s.tryRequest as (k: CommandKey, i: unknown, t: number) => Promise<ReplyResult<CommandKey>>).call(s, key, input, timeout);
    const allowed = (key: CommandKey): boolean => vm.info!.allowedCommands.includes(key);
    try {
      let r: ReplyResult<CommandKey>;
      let toResult: ((v: Record<string, unknown>) => ResultValue) | undefined;
      switch (c.$case) {
        case 'getVersion':
          r = await req('GET_VERSION', {});
          toResult = (v) => {
            const f = v['features'] as { singlestep: number };
            return { $case: 'getVersion', value: { version: v['version'] as number, maxMsgSize: v['max_msg_size'] as number, features: { singlestep: f.singlestep !== 0 } } };
          };
          break;
        case 'checkCommand': {
          const key = commandKeyOfKind(c.value.command);
          if (!key) throw new Invalid(`unknown command kind ${c.value.command}`);
          r = await req('VM_CHECK_COMMAND', { id: commands[key].id });
          break;
        }
        case 'checkEvent': {
          const id = eventIdOfKind(c.value.event);
          if (id === undefined) throw new Invalid(`unknown event kind ${c.value.event}`);
          r = await req('VM_CHECK_EVENT', { id });
          break;
        }
        case 'vmGetInfo':
          r = await req('VM_GET_INFO', {});
          toResult = (v) => ({ $case: 'vmGetInfo', value: { vcpuCount: v['vcpu_count'] as number } });
          break;
        case 'vmControlEvents': {
          const id = eventIdOfKind(c.value.event);
          if (id === undefined) throw new Invalid(`unknown event kind ${c.value.event}`);
          r = await req('VM_CONTROL_EVENTS', { event_id: id, enable: c.value.enable ? 1 : 0 });
          break;
        }
        case 'readPhysical':
          r = await req('VM_READ_PHYSICAL', { gpa: c.value.gpa, size: c.value.size });
          toResult = (v) => ({ $case: 'readPhysical', value: { data: Buffer.from(v['data'] as Uint8Array) } });
          break;
        case 'writePhysical': {
          // Every byte analysis changes is remembered (and persisted by the link) so that detach, SIGTERM and a
          // restart after kill -9 can restore it (vm-connection.ts writeRemembered, planted-store.ts).
          const w = await vm.writeRemembered(c.value.gpa, c.value.data, timeout);
          r = (w.ok ? { ok: true, value: {} } : w) as ReplyResult<CommandKey>;
          break;
        }
        case 'pauseVcpu':
          r = await req('VM_PAUSE_VCPU', { vcpu, wait: c.value.wait ? 1 : 0 });
          break;
        case 'controlCleanup':
          r = await req('VM_CONTROL_CLEANUP', { enable: c.value.restoreOnUnhook ? 1 : 0 });
          break;
        case 'setPageAccess': {
          const entries = c.value.entries.map((e) => ({ gpa: e.gpa, access: e.allowedAccess }));
          if (entries.length === 0) throw new Invalid('no entries');
          r = { ok: true, value: {} } as ReplyResult<CommandKey>;
          for (let i = 0; i < entries.length; i += 511) {
            const one = await req('VM_SET_PAGE_ACCESS', { entries: entries.slice(i, i + 511) });
            if (!one.ok && r.ok) r = one; // every entry is applied; the first error is reported
          }
          break;
        }
        case 'vcpuGetInfo':
          r = await req('VCPU_GET_INFO', { vcpu });
          toResult = (v) => ({ $case: 'vcpuGetInfo', value: { tscSpeed: v['tsc_speed'] as bigint } });
          break;
        case 'controlEvents': {
          const id = eventIdOfKind(c.value.event);
          if (id === undefined) throw new Invalid(`unknown event kind ${c.value.event}`);
          r = await req('VCPU_CONTROL_EVENTS', { vcpu, event_id: id, enable: c.value.enable ? 1 : 0 });
          break;
        }
        case 'getRegisters':
          if (c.value.msrIndexes.length > 481) throw new Invalid('at most 481 MSRs');
          r = await req('VCPU_GET_REGISTERS', { vcpu, msrs_idx: c.value.msrIndexes });
          toResult = (v) => {
            const regs = v['regs'] as Record<string, bigint>;
            const sregs = v['sregs'] as Record<string, unknown>;
            const entries = v['msr_entries'] as { index: number; data: bigint }[];
            return {
              $case: 'getRegisters',
              value: {
                mode: MODES[v['mode'] as number] ?? CpuMode.CPU_MODE_UNSPECIFIED,
                regs: { ...(regs as object) } as never,
                sregs: sregsOut(sregs),
                msrs: entries.map((e) => ({ index: e.index, data: e.data })),
              },
            };
          };
          break;
        case 'setRegisters': {
          const g = c.value.regs;
          if (!g) throw new Invalid('no registers');
          r = await req('VCPU_SET_REGISTERS', { vcpu, ...g });
          break;
        }
        case 'getCpuid':
          r = await req('VCPU_GET_CPUID', { vcpu, function: c.value.function, index: c.value.index });
          toResult = (v) => ({ $case: 'getCpuid', value: { eax: v['eax'] as number, ebx: v['ebx'] as number, ecx: v['ecx'] as number, edx: v['edx'] as number } });
          break;
        case 'controlCr':
          r = await req('VCPU_CONTROL_CR', { vcpu, cr: c.value.cr, enable: c.value.enable ? 1 : 0 });
          break;
        case 'injectException':
          r = await req('VCPU_INJECT_EXCEPTION', { vcpu, nr: c.value.nr, error_code: c.value.errorCode, address: c.value.address });
          break;
        case 'getXcr':
          r = await req('VCPU_GET_XCR', { vcpu, xcr: c.value.xcr });
          toResult = (v) => ({ $case: 'getXcr', value: { value: v['value'] as bigint } });
          break;
        case 'getXsave':
          r = await req('VCPU_GET_XSAVE', { vcpu });
          toResult = (v) => ({ $case: 'getXsave', value: { xsave: Buffer.from((v['xsave'] as { region: Uint8Array }).region) } });
          break;
        case 'setXsave':
          if (c.value.xsave.length !== 4096) throw new Invalid('xsave must be exactly 4096 bytes');
          r = await req('VCPU_SET_XSAVE', { vcpu, xsave: { region: c.value.xsave } });
          break;
        case 'getMtrrType':
          r = await req('VCPU_GET_MTRR_TYPE', { vcpu, gpa: c.value.gpa });
          toResult = (v) => ({ $case: 'getMtrrType', value: { type: v['type'] as number } });
          break;
        case 'controlMsr':
          r = await req('VCPU_CONTROL_MSR', { vcpu, msr: c.value.msr, enable: c.value.enable ? 1 : 0 });
          break;
        case 'controlSinglestep':
          r = await req('VCPU_CONTROL_SINGLESTEP', { vcpu, enable: c.value.enable ? 1 : 0 });
          if (r.ok) this.opts.onSinglestep?.(vm, vcpu, c.value.enable);
          break;
        case 'translateGva':
          r = await req('VCPU_TRANSLATE_GVA', { vcpu, gva: c.value.gva });
          toResult = (v) => ({ $case: 'translateGva', value: { gpa: v['gpa'] as bigint } });
          break;
        case 'getMapToken':
          if (!allowed('GET_MAP_TOKEN')) {
            return done(CommandStatus.COMMAND_STATUS_UNSUPPORTED, { message: 'this VM does not allow GET_MAP_TOKEN (kvmi-v7 dialect only, and the device manager must allow it)' });
          }
          r = await req('GET_MAP_TOKEN', {});
          toResult = (v) => {
            const words = (v['token'] as { token: readonly bigint[] }).token;
            const out = Buffer.alloc(32);
            words.forEach((w, i) => out.writeBigUInt64LE(w, i * 8));
            return { $case: 'getMapToken', value: { token: out } };
          };
          break;
        case 'getMaxGfn': {
          const g = vm.info.gfnLimit;
          if (g.source === 'handshake') {
            // VmGetMaxGfnReply.max_gfn is the highest frame; the agent keeps the exclusive limit.
            return done(CommandStatus.COMMAND_STATUS_OK, { result: { $case: 'getMaxGfn', value: { maxGfn: g.value - 1n } } });
          }
          if (!allowed('VM_GET_MAX_GFN')) return done(CommandStatus.COMMAND_STATUS_UNSUPPORTED, { message: 'no max_gpa in the handshake and no VM_GET_MAX_GFN on this host' });
          r = await req('VM_GET_MAX_GFN', {});
          toResult = (v) => ({ $case: 'getMaxGfn', value: { maxGfn: (v['gfn'] as bigint) - 1n } });
          break;
        }
        default: {
          const never: never = c;
          return done(CommandStatus.COMMAND_STATUS_UNSUPPORTED, { message: `unknown command ${(never as { $case: string }).$case}` });
        }
      }
      if (!r.ok) return done(CommandStatus.COMMAND_STATUS_KVM_ERROR, { kvmError: r.errno, message: `KVM error ${r.errno}` });
      return done(CommandStatus.COMMAND_STATUS_OK, toResult ? { result: toResult(r.value as Record<string, unknown>) } : {});
    } catch (e) {
      if (e instanceof Invalid) return done(CommandStatus.COMMAND_STATUS_INVALID_ARGUMENT, { message: e.message });
      if (e instanceof KvmiError) {
        if (e.code === 'timeout') return done(CommandStatus.COMMAND_STATUS_TIMEOUT, { message: e.message });
        if (e.code === 'closed') return done(CommandStatus.COMMAND_STATUS_SESSION_ENDED, { message: e.message });
        return done(CommandStatus.COMMAND_STATUS_INVALID_ARGUMENT, { message: e.message });
      }
      return done(CommandStatus.COMMAND_STATUS_INTERNAL, { message: (e as Error).message });
    }
  }
}

function sregsOut(s: Record<string, unknown>): never {
  const seg = (x: Record<string, number | bigint>) => ({
    base: x['base'] as bigint, limit: x['limit'] as number, selector: x['selector'] as number, type: x['type'] as number,
    present: x['present'] !== 0, dpl: x['dpl'] as number, db: x['db'] !== 0, s: x['s'] !== 0, l: x['l'] !== 0, g: x['g'] !== 0,
    avl: x['avl'] !== 0, unusable: x['unusable'] !== 0,
  });
  const dt = (x: Record<string, number | bigint>) => ({ base: x['base'] as bigint, limit: x['limit'] as number });
  const g = (k: string) => s[k] as Record<string, number | bigint>;
  return {
    cs: seg(g('cs')), ds: seg(g('ds')), es: seg(g('es')), fs: seg(g('fs')), gs: seg(g('gs')), ss: seg(g('ss')), tr: seg(g('tr')), ldt: seg(g('ldt')),
    gdt: dt(g('gdt')), idt: dt(g('idt')),
    cr0: s['cr0'], cr2: s['cr2'], cr3: s['cr3'], cr4: s['cr4'], cr8: s['cr8'], efer: s['efer'], apicBase: s['apic_base'],
    interruptBitmap: [...(s['interrupt_bitmap'] as bigint[])],
  } as never;
}
