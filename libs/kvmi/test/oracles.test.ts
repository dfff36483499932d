/**
 * Independent oracles (libs/kvmi/test/oracles/, see its README): byte vectors produced by a C program
 * from declarations written from the fact sheet, a hand-written hex set, and a hand-transcribed table.
 * None of it comes from the encoder under test. Each fixture is checked in the direction it travels:
 * what the library *sends* must equal the fixture's bytes; what it *receives* must decode to the
 * fixture's fields.
 */
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import {
  EventAction,
  KvmErrno,
  PageAccess,
  Descriptor,
  KVMI_MAX_MSG_SIZE,
  KVMI_NUM_COMMANDS,
  KVMI_NUM_EVENTS,
  KVMI_VERSION,
  checkEventReply,
  commandDefById,
  commands,
  decodeEvent,
  decodeReply,
  encodeCommand,
  encodeErrorReply,
  encodeEventReply,
  encodeReply,
  encodeVmEvent,
  eventDefById,
  events,
  receiveKernelMessage,
  structs,
  type CommandKey,
  type Layout,
} from '@periscope/kvmi';

const here = dirname(fileURLToPath(import.meta.url));
const oracleDir = join(here, 'oracles');

interface Fixture {
  name: string;
  direction: 'tool-to-kvm' | 'kvm-to-tool' | 'qemu-to-tool' | 'tool-to-qemu';
  kind: 'command' | 'reply' | 'error-reply' | 'event' | 'event-reply' | 'vm-event' | 'handshake';
  message: string | null;
  id: number | null;
  seq: number | null;
  vcpu: number | null;
  fields: Record<string, unknown>;
  hex: string;
}
const load = (f: string) => (JSON.parse(readFileSync(join(oracleDir, f), 'utf8')) as { fixtures: Fixture[] }).fixtures;
const golden = load('golden-frames.json');
const handWritten = load('hand-written-frames.json');
const table = JSON.parse(readFileSync(join(oracleDir, 'transcribed-table.json'), 'utf8'));

// ---- converting the fixtures' JSON conventions into the library's value types -----------------

function hexBytes(h: string): Uint8Array {
  return Uint8Array.from(Buffer.from(h, 'hex'));
}
/** Convert a fixture object to a layout's value type (u64 "0x…" → bigint, hex → bytes), recursively. */
function toValue(layout: Layout<unknown>, json: Record<string, unknown>): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const f of layout.fields) {
    if (f.isPadding) continue;
    const v = json[f.name];
    if (v === undefined) throw new Error(`fixture lacks ${layout.name}.${f.name}`);
    const s = f.spec;
    switch (s.kind) {
      case 'u64':
      case 's64':
        out[f.name] = BigInt(v as string);
        break;
      case 'bytes':
        out[f.name] = hexBytes(v as string);
        break;
      case 'u64[]': {
        if (Array.isArray(v)) {
          out[f.name] = v.map((x) => BigInt(x as string));
          break;
        }
        const b = Buffer.from(v as string, 'hex');
        out[f.name] = Array.from({ length: s.count }, (_, i) => b.readBigUInt64LE(8 * i));
        break;
      }
      case 'struct':
        out[f.name] = toValue(s.layout as Layout<unknown>, v as Record<string, unknown>);
        break;
      default:
        out[f.name] = v;
    }
  }
  return out;
}

function keyOf(message: string): CommandKey {
  const k = (Object.keys(commands) as CommandKey[]).find((c) => commands[c].name === message || `KVMI_VM_${c}` === message);
  if (!k) throw new Error(`no catalog command named ${message}`);
  return k;
}

/** The library's command input for a command fixture. */
function commandInput(key: CommandKey, fx: Fixture): Record<string, unknown> {
  const def = commands[key];
  const f = fx.fields;
  let input: Record<string, unknown> = {};
  if (key === 'VCPU_SET_REGISTERS') input = toValue(structs.kvm_regs as Layout<unknown>, f['regs'] as Record<string, unknown>);
  else if (def.request) {
    const reqJson = { ...f };
    const tail = 'requestTail' in def ? def.requestTail : undefined;
    if (tail) delete reqJson[tail.countField];
    const lay = def.request as Layout<unknown>;
    for (const fld of lay.fields) if (!fld.isPadding && reqJson[fld.name] === undefined && tail?.countField === fld.name) reqJson[fld.name] = 0;
    input = toValue(lay, reqJson);
    if (tail) {
      delete input[tail.countField];
      const t = f[tail.prop];
      if (tail.kind === 'bytes') input[tail.prop] = hexBytes(t as string);
      else if (tail.kind === 'u32') input[tail.prop] = t;
      else input[tail.prop] = (t as Record<string, unknown>[]).map((e) => toValue(tail.layout, e));
    }
  }
  if (def.scope === 'vcpu') input['vcpu'] = fx.vcpu;
  return input;
}

/** The library's reply value for a success-reply fixture. */
function replyValue(key: CommandKey, fx: Fixture): Record<string, unknown> {
  const def = commands[key];
  const { err: _err, ...f } = fx.fields;
  if (key === 'VM_READ_PHYSICAL') return { data: hexBytes(f['data'] as string) };
  if (key === 'GET_MAP_TOKEN') return toValue(def.reply as Layout<unknown>, { token: { token: f['token'] } });
  if (key === 'VCPU_GET_REGISTERS') {
    const entries = f['msrs'] as { index: number; data: string }[];
    const base = toValue(def.reply as Layout<unknown>, { ...f, msrs: { nmsrs: entries.length } });
    return { ...base, msr_entries: entries.map((e) => ({ index: e.index, data: BigInt(e.data) })) };
  }
  return def.reply ? toValue(def.reply as Layout<unknown>, f) : {};
}

const allFixtures = [...golden.map((f) => ({ set: 'golden', f })), ...handWritten.map((f) => ({ set: 'hand-written', f }))];
const kernel = { isCommandAllowed: () => true, isEventAllowed: () => true, vcpuCount: () => 0x10000, isVcpuReady: () => true, extensionsEnabled: () => true };

// ---- the C generator itself ------------------------------------------------------------------

describe('C fixture generator', () => {
  const work = mkdtempSync(join(tmpdir(), 'kvmi-fixtures-'));
  afterAll(() => rmSync(work, { recursive: true, force: true }));
  it('compiles with the system compiler and reproduces the committed golden-frames.json', () => {
    const bin = join(work, 'fixtures');
    execFileSync('cc', ['-std=c11', '-Wall', '-Wextra', '-Werror', '-O0', '-o', bin, join(oracleDir, 'fixtures.c')]);
    const out = execFileSync(bin, { maxBuffer: 64 << 20 }).toString();
    expect(JSON.parse(out)).toEqual(JSON.parse(readFileSync(join(oracleDir, 'golden-frames.json'), 'utf8')));
  });
  it('covers every command in both directions and every event with each allowed action', () => {
    for (const c of Object.values(commands)) {
      expect(golden.some((f) => f.kind === 'command' && f.id === c.id), `${c.name} request`).toBe(true);
      expect(golden.some((f) => f.kind === 'reply' && f.id === c.id), `${c.name} reply`).toBe(true);
    }
    for (const e of Object.values(events)) {
      if (e.scope === 'vm') {
        expect(golden.some((f) => f.kind === 'vm-event')).toBe(true);
        continue;
      }
      expect(golden.some((f) => f.kind === 'event' && f.message === e.name), `${e.name} event`).toBe(true);
      for (const a of e.actions) {
        expect(golden.some((f) => f.kind === 'event-reply' && f.message === e.name && f.fields['action'] === EventAction[a]), `${e.name} ${a}`).toBe(true);
      }
    }
  });
});

// ---- every fixture, in the direction it travels -----------------------------------------------

describe.each(allFixtures)('$set fixture $f.name', ({ f: fx }) => {
  const bytes = Buffer.from(fx.hex, 'hex');
  it(`${fx.kind} (${fx.direction})`, () => {
    switch (fx.kind) {
      case 'command': {
        const key = keyOf(fx.message!);
        const input = commandInput(key, fx);
        // Tool side sends exactly these bytes...
        expect(encodeCommand(key, fx.seq!, input as never).toString('hex')).toBe(fx.hex);
        // ...and the kernel side decodes them back.
        const m = receiveKernelMessage(bytes, kernel);
        expect(m.kind).toBe('command');
        if (m.kind !== 'command') return;
        expect(m.def.key).toBe(key);
        expect(m.seq).toBe(fx.seq);
        expect(m.paddingZero).toBe(true);
        const fields = { ...input };
        if (commands[key].scope === 'vcpu') {
          expect(m.vcpu).toBe(fields['vcpu']);
          delete fields['vcpu'];
        } else expect(m.vcpu).toBe(null);
        expect(m.request).toEqual(key === 'VCPU_SET_REGISTERS' ? fields : { ...fields, ...pickCount(key, m.request) });
        return;
      }
      case 'reply': {
        const key = keyOf(fx.message!);
        const value = replyValue(key, fx);
        expect(encodeReply(key, fx.seq!, value as never).toString('hex')).toBe(fx.hex);
        expect(decodeReply(key, bytes)).toEqual({ ok: true, value });
        return;
      }
      case 'error-reply': {
        const err = fx.fields['err'] as number;
        expect(encodeErrorReply(fx.id!, fx.seq!, -err).toString('hex')).toBe(fx.hex);
        if (fx.id === 1) expect(decodeEvent(bytes)).toEqual({ kind: 'event-reply-error', seq: fx.seq, errno: -err });
        else if (fx.message) expect(decodeReply(keyOf(fx.message), bytes)).toEqual({ ok: false, errno: -err });
        return;
      }
      case 'vm-event': {
        expect(encodeVmEvent(fx.seq!).toString('hex')).toBe(fx.hex);
        expect(decodeEvent(bytes)).toMatchObject({ kind: 'vm-event', seq: fx.seq, event: { id: 0 } });
        return;
      }
      case 'event': {
        const e = decodeEvent(bytes);
        const ve = fx.fields['vcpu_event'] as Record<string, unknown>;
        const def = eventDefById(fx.fields['event'] as number)!;
        expect(e.kind).toBe('vcpu-event');
        if (e.kind !== 'vcpu-event') return;
        expect(e.event.name).toBe(fx.message);
        expect(e.seq).toBe(fx.seq);
        expect(e.vcpu).toBe(ve['vcpu']);
        expect(e.commonSize).toBe(ve['size']);
        expect(e.arch).toEqual(toValue(structs.kvmi_vcpu_event_arch as Layout<unknown>, ve['arch'] as Record<string, unknown>));
        const specific = fx.fields['specific'] as Record<string, unknown> | null;
        expect(e.data).toEqual(specific && def.payload ? toValue(def.payload as Layout<unknown>, specific) : null);
        return;
      }
      case 'event-reply': {
        const def = eventDefById(fx.fields['event'] as number)!;
        const action = (Object.keys(EventAction) as (keyof typeof EventAction)[]).find((a) => EventAction[a] === fx.fields['action'])!;
        const reply = fx.fields['reply'] as { new_val: string } | undefined;
        const out = encodeEventReply({ seq: fx.seq!, vcpu: fx.vcpu!, event: def }, action, reply ? { new_val: BigInt(reply.new_val) } : undefined);
        expect(out.toString('hex')).toBe(fx.hex);
        const m = receiveKernelMessage(bytes, kernel);
        expect(m.kind).toBe('event-reply');
        if (m.kind !== 'event-reply') return;
        expect(m.vcpu).toBe(fx.vcpu);
        expect(checkEventReply(m, { seq: fx.seq!, event: def })).toEqual({ kind: 'reply', action, newVal: reply ? BigInt(reply.new_val) : null });
        return;
      }
      case 'handshake': {
        const layout =
          fx.direction === 'tool-to-qemu'
            ? structs.kvmi_introspector2qemu
            : bytes.length >= 104
              ? structs.qemu_vmi_to_introspector_newer
              : structs.kvmi_qemu2introspector;
        const value = toValue(layout as Layout<unknown>, fx.fields);
        expect((layout as Layout<unknown>).encode(value).toString('hex')).toBe(fx.hex);
        expect((layout as Layout<unknown>).read(bytes)).toEqual(value);
        return;
      }
    }
  });
});

function pickCount(key: CommandKey, req: Record<string, unknown>): Record<string, unknown> {
  const def = commands[key];
  const tail = 'requestTail' in def ? def.requestTail : undefined;
  return tail ? { [tail.countField]: req[tail.countField] } : {};
}

// ---- the hand-transcribed table against the catalog ------------------------------------------

describe('hand-transcribed table (§2.4, §3.1, §3.2, §3.3, §3.4, §4.1) equals the catalog', () => {
  it('constants', () => {
    expect(table.constants).toMatchObject({ KVMI_VERSION, KVMI_NUM_COMMANDS, KVMI_NUM_EVENTS, KVMI_MAX_MSG_SIZE });
  });
  it('error codes', () => {
    expect(table.error_codes.codes).toEqual(Object.fromEntries(Object.entries(KvmErrno).map(([k, v]) => [`KVM_${k}`, v])));
  });
  it('actions, page access bits, descriptors', () => {
    expect(table.event_actions.values).toEqual(Object.fromEntries(Object.entries(EventAction).map(([k, v]) => [`KVMI_EVENT_ACTION_${k}`, v])));
    expect(table.page_access.values).toEqual({ KVMI_PAGE_ACCESS_R: PageAccess.R, KVMI_PAGE_ACCESS_W: PageAccess.W, KVMI_PAGE_ACCESS_X: PageAccess.X });
    for (const [k, v] of Object.entries(Descriptor)) expect(table.other_constants.values[`KVMI_DESC_${k}`]).toBe(v);
  });
  it('message ids and scopes', () => {
    const msgs = table.message_ids.messages as { id: number; name: string; scope: string; kind: string }[];
    const cmds = msgs.filter((m) => m.kind === 'command');
    expect(cmds.length).toBe(Object.keys(commands).length);
    for (const m of cmds) {
      const def = commandDefById(m.id);
      expect(def, `command id ${m.id}`).toBeDefined();
      expect(def!.scope, m.name).toBe(m.scope);
      expect([def!.name, def!.name.replace('KVMI_', 'KVMI_VM_')]).toContain(m.name);
    }
  });
  it('events: ids, scopes, payload and reply-data sizes, allowed actions', () => {
    const list = (table.events.events ?? table.events.list) as Record<string, unknown>[];
    expect(list.length).toBe(Object.keys(events).length);
    for (const te of list) {
      const def = eventDefById(te['id'] as number);
      expect(def, `event ${te['id'] as number}`).toBeDefined();
      expect(def!.name).toBe(te['name']);
      expect(def!.scope).toBe(te['scope']);
      expect(def!.payload?.size ?? 0).toBe(te['specific_size'] as number);
      const reply = te['reply_data_size'] as number | null;
      expect(reply === null ? def!.scope === 'vm' : (def!.replyData?.size ?? 0) === reply).toBe(true);
      const actions = (te['allowed_actions'] as string[] | null) ?? [];
      expect([...def!.actions].sort()).toEqual(actions.map((a) => a.replace('KVMI_EVENT_ACTION_', '')).sort());
    }
  });
  it('commands: request payload sizes, short-payload rules, reply data sizes', () => {
    const list = table.commands.list as Record<string, unknown>[];
    for (const tc of list) {
      const def = commandDefById(tc['id'] as number)!;
      expect(def, `command ${tc['id'] as number}`).toBeDefined();
      const req = tc['request'] as Record<string, unknown>;
      const hdr = def.scope === 'vcpu' ? 8 : 0;
      if (req['kind'] === 'fixed') expect(hdr + (def.request?.size ?? 0), def.name).toBe(req['payload_size']);
      else {
        expect(hdr + (def.request?.size ?? 0), def.name).toBe(req['base_size']);
        const tail = 'requestTail' in def ? def.requestTail : undefined;
        expect(tail?.countField, def.name).toBe(req['count_field']);
      }
      expect(def.shortPayload, def.name).toBe(req['short_payload']);
      const rep = tc['reply'] as Record<string, unknown>;
      if (rep['reply_data_size'] !== null) expect(def.reply?.size ?? 0, def.name).toBe(rep['reply_data_size']);
      else if (rep['base_size'] !== undefined) expect(def.reply?.size ?? 0, def.name).toBe(rep['base_size']);
      expect(def.alwaysAllowed, def.name).toBe(Boolean(tc['always_allowed']));
      expect(Boolean(def.extension), def.name).toBe(Boolean(tc['extension']));
      // Every documented error code appears among the catalog's checks (or is the generic EPERM/EINVAL/EAGAIN).
      const documented = ((tc['errors'] as string[] | undefined) ?? []).map((e) => e.replace('KVM_', ''));
      const catalogErrnos = new Set<string>(def.checks.map((c) => c.errno));
      for (const e of documented) {
        const generic = e === 'EPERM' || (def.scope === 'vcpu' && (e === 'EINVAL' || e === 'EAGAIN'));
        const lengthRule = e === 'EINVAL' && def.shortPayload === 'einval';
        expect(catalogErrnos.has(e) || generic || lengthRule || (def.key === 'VM_PAUSE_VCPU' && e === 'EAGAIN'), `${def.name} documents ${e}`).toBe(true);
      }
    }
  });
});
