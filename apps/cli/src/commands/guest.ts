/**
 * Operator commands that read a guest or the audit log through analysis' HTTP API
 * (libs/analysis/src/operator-http.ts): `mem read VM GPA LEN` (hexdump; VM_READ_PHYSICAL split at 4 KiB,
 * unbacked pages shown as ENOENT gaps), `regs VM VCPU` (VCPU_GET_REGISTERS), `audit [--vm] [--since]`
 * (who changed which guest, when, with what result; `--commands` = the raw command log).
 */
import { apiJson, CliError, EXIT } from './client.js';
import { opSchema, runOp } from './framework.js';
import { block, jsonText, nsTime, str, table, truncate, type OutIo, type Palette } from './output.js';

type Json = Record<string, unknown>;
const obj = (v: unknown): Json => (typeof v === 'object' && v !== null && !Array.isArray(v) ? (v as Json) : {});
const arr = (v: unknown): Json[] => (Array.isArray(v) ? v.map(obj) : []);
const enc = encodeURIComponent;

/** The most `mem read` asks for at once (analysis refuses more). */
export const MAX_READ = 64 * 1024;

function parseAddress(s: string, what: string): bigint {
  const t = s.trim().replace(/_/g, '');
  if (!/^(0x[0-9a-f]+|\d+)$/i.test(t)) throw new CliError(EXIT.usage, `${what} ${s}: expected a number (0x-hex or decimal)`);
  return BigInt(t);
}

/** 16 bytes a line: address, hex bytes, printable ASCII. */
export function hexdump(gpa: bigint, data: Buffer, p: Palette): string[] {
  const out: string[] = [];
  for (let off = 0; off < data.length; off += 16) {
    const row = data.subarray(off, off + 16);
    const hex = [...row].map((b) => b.toString(16).padStart(2, '0'));
    const left = hex.slice(0, 8).join(' ');
    const right = hex.slice(8).join(' ');
    const ascii = [...row].map((b) => (b >= 0x20 && b < 0x7f ? String.fromCharCode(b) : '.')).join('');
    out.push(`${p.dim(`0x${(gpa + BigInt(off)).toString(16).padStart(12, '0')}`)}  ${left.padEnd(23)}  ${right.padEnd(23)}  |${ascii}|`);
  }
  return out;
}

export const memReadCmd = (argv: string[], io: OutIo) =>
  runOp({
    command: 'mem read',
    summary: `Read guest physical memory of a VM as a hexdump: analysis sends VM_READ_PHYSICAL through the VM's host agent, split at 4 KiB pages; a page KVM does not back is shown as an ENOENT gap. At most ${MAX_READ} bytes (64 KiB) at once; an address beyond the VM's memory (max_gfn) is refused.`,
    examples: ['periscope mem read sim-vm-0 0x1000000 256', 'periscope mem read sim-vm-0 0x9f000 0x2000   # across the VGA hole: a gap', 'periscope mem read sim-vm-0 0x1000000 64 --json | jq -r ".chunks[].data"'],
    schema: opSchema({}, [
      { name: 'vm', description: 'VM name or UUID' },
      { name: 'gpa', description: 'guest physical address (0x-hex or decimal)' },
      { name: 'length', description: `bytes (0x-hex or decimal, 1..${MAX_READ})` },
    ] as const),
    run: async (c) => {
      const { vm, gpa: gpaText, length: lenText } = c.cfg.positionals;
      const gpa = parseAddress(gpaText, 'GPA');
      const length = parseAddress(lenText, 'LEN');
      if (length < 1n || length > BigInt(MAX_READ)) throw new CliError(EXIT.usage, `LEN ${lenText}: must be 1..${MAX_READ} bytes (read larger areas in pieces)`);
      const { body } = await apiJson(c.target(), `/v1/vms/${enc(vm)}/memory?gpa=0x${gpa.toString(16)}&length=${length}`, {}, `read ${lenText} bytes at ${gpaText} of VM ${vm}`);
      if (c.json) return io.out(jsonText(body)), EXIT.ok;
      const v = obj(body.vm);
      const out = [c.p.dim(`# ${str(v.name)} (${str(v.uuid)}) on ${str(v.hostId)}: ${str(body.bytesRead)} of ${str(body.length)} bytes at ${str(body.gpa)} via ${str(body.via)}`)];
      for (const ch of arr(body.chunks)) {
        const at = BigInt(str(ch.gpa));
        if (typeof ch.data === 'string') out.push(...hexdump(at, Buffer.from(ch.data, 'hex'), c.p));
        else out.push(c.p.yellow(`0x${at.toString(16).padStart(12, '0')}  -- ${str(ch.error)}: ${str(ch.message) || 'not readable'} (${str(ch.length)} bytes) --`));
      }
      io.out(out.join('\n'));
      return EXIT.ok;
    },
  }, argv, io);

const GPRS = ['rax', 'rbx', 'rcx', 'rdx', 'rsi', 'rdi', 'rsp', 'rbp', 'r8', 'r9', 'r10', 'r11', 'r12', 'r13', 'r14', 'r15', 'rip', 'rflags'];

export const regsCmd = (argv: string[], io: OutIo) =>
  runOp({
    command: 'regs',
    summary: "A vCPU's registers: general purpose, control registers, segments, descriptor tables and the system-call MSRs (VCPU_GET_REGISTERS through the VM's host agent).",
    examples: ['periscope regs sim-vm-0 0', 'periscope regs sim-vm-0 1 --json | jq .msrs.LSTAR'],
    schema: opSchema({}, [{ name: 'vm', description: 'VM name or UUID' }, { name: 'vcpu', description: 'vCPU index' }] as const),
    run: async (c) => {
      const { vm, vcpu } = c.cfg.positionals;
      if (!/^\d+$/.test(vcpu)) throw new CliError(EXIT.usage, `VCPU ${vcpu}: expected a vCPU index (0, 1, …)`);
      const { body } = await apiJson(c.target(), `/v1/vms/${enc(vm)}/vcpus/${vcpu}/registers`, {}, `registers of VM ${vm} vCPU ${vcpu}`);
      if (c.json) return io.out(jsonText(body)), EXIT.ok;
      const v = obj(body.vm);
      const regs = obj(body.regs);
      const sregs = obj(body.sregs);
      const rows: string[][] = [];
      const gprs = GPRS.filter((r) => regs[r] !== undefined);
      for (let i = 0; i < gprs.length; i += 4) rows.push(gprs.slice(i, i + 4).flatMap((r) => [r.toUpperCase(), str(regs[r])]));
      const out = [c.p.dim(`# ${str(v.name)} (${str(v.uuid)}) vCPU ${str(body.vcpu)}, mode ${str(body.mode)}`)];
      out.push(...table(['REG', 'VALUE', 'REG', 'VALUE', 'REG', 'VALUE', 'REG', 'VALUE'], rows, c.p));
      out.push('');
      out.push(...block(['cr0', 'cr2', 'cr3', 'cr4', 'cr8', 'efer'].filter((k) => sregs[k] !== undefined).map((k) => [k, str(sregs[k])] as const), c.p));
      for (const t of ['gdt', 'idt']) if (sregs[t]) out.push(...block([[t, `base ${str(obj(sregs[t]).base)} limit ${str(obj(sregs[t]).limit)}`]], c.p));
      const segs = ['cs', 'ss', 'ds', 'es', 'fs', 'gs', 'tr', 'ldt'].filter((s) => sregs[s]);
      if (segs.length) {
        out.push('');
        out.push(...table(['SEG', 'SELECTOR', 'BASE', 'LIMIT', 'TYPE', 'DPL', 'L'], segs.map((s) => {
          const g = obj(sregs[s]);
          return [s, str(g.selector), str(g.base), str(g.limit), str(g.type), str(g.dpl), g.l ? '1' : '0'];
        }), c.p));
      }
      const msrs = Object.entries(obj(body.msrs));
      if (msrs.length) {
        out.push('');
        out.push(...table(['MSR', 'VALUE'], msrs.map(([k, x]) => [k, str(x)]), c.p));
      }
      io.out(out.join('\n'));
      return EXIT.ok;
    },
  }, argv, io);

const DURATION = /^(\d+(?:\.\d+)?)(ms|s|m|h|d)$/;
const UNIT_MS = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 } as const;

/** `--since`: a duration ago (15m, 2h, 7d) or a time (ISO 8601) → Unix ns. */
export function sinceNs(s: string, now = Date.now()): bigint {
  const t = s.trim();
  const d = DURATION.exec(t);
  if (d) return BigInt(Math.round(now - Number(d[1]) * UNIT_MS[d[2] as keyof typeof UNIT_MS])) * 1_000_000n;
  const ms = /\d{4}-\d{2}-\d{2}/.test(t) ? Date.parse(t) : Number.NaN;
  if (Number.isNaN(ms)) throw new CliError(EXIT.usage, `--since ${s}: expected a duration ago (15m, 2h, 7d) or a time (2025-01-31T12:00:00Z)`);
  return BigInt(ms) * 1_000_000n;
}

export const auditCmd = (argv: string[], io: OutIo) =>
  runOp({
    command: 'audit',
    summary:
      "The audit log: every command that changed a guest — memory writes, registers, injected exceptions, page access changes, singlestep, VM pause/resume, and the responses policies applied (inject, crash, pause, quarantine) — with who asked (an operator's name and token or certificate identity, or policy:NAME / module:NAME), what, when and the result; newest first. `--commands` shows the raw command log instead: every KVMI command and pause control analysis sent to the agents (reads too), with its purpose and result.",
    examples: ['periscope audit', 'periscope audit --vm sim-vm-0 --since 1h', 'periscope audit --since 2025-01-31T12:00:00Z --json', 'periscope audit --commands --vm 67343f0a-d344-491d-a398-98aafb277447'],
    schema: opSchema({
      vm: { kind: 'string', description: 'only this VM (name or UUID)' },
      since: { kind: 'string', description: 'only entries from this long ago (15m, 2h, 7d) or this time (ISO 8601)' },
      limit: { kind: 'integer', min: 1, max: 1000, default: 100, description: 'how many (newest first)' },
      commands: { kind: 'boolean', description: 'the command log: KVMI commands and pause controls sent to agents (newest first, at most 200)' },
    }),
    run: async (c) => {
      const t = c.target();
      const v = c.cfg.values;
      if (v.commands) {
        let vm = v.vm;
        if (vm && !/^[0-9a-f-]{36}$/i.test(vm)) vm = str(obj((await apiJson(t, `/v1/vms/${enc(vm)}`, {}, `VM ${vm}`)).body.vm).uuid);
        const { body } = await apiJson(t, `/v1/commands${vm ? `?vm=${enc(vm)}` : ''}`);
        const cmds = arr(body.commands);
        if (c.json) return io.out(jsonText({ commands: cmds })), EXIT.ok;
        if (cmds.length === 0) io.out(c.p.dim('no commands sent yet'));
        else io.out(table(['SENT', 'VM', 'VCPU', 'KIND', 'PURPOSE', 'STATUS', 'MESSAGE'], cmds.map((x) => [nsTime(x.sentNs), str(x.vm), str(x.vcpu), str(x.kind), str(x.purpose), str(x.status), truncate(str(x.message), 60)]), c.p).join('\n'));
        return EXIT.ok;
      }
      const q = new URLSearchParams({ limit: String(v.limit) });
      if (v.vm) q.set('vm', v.vm);
      if (v.since) q.set('since', sinceNs(v.since).toString());
      const { body } = await apiJson(t, `/v1/audit?${q}`, {}, v.vm ? `audit log of VM ${v.vm}` : 'audit log');
      const evs = arr(body.events);
      if (c.json) return io.out(jsonText({ events: evs, nextCursor: body.nextCursor ?? null })), EXIT.ok;
      if (evs.length === 0) {
        io.out(c.p.dim(`no audit entries${v.vm ? ` for ${v.vm}` : ''}${v.since ? ` since ${v.since}` : ''}`));
        return EXIT.ok;
      }
      io.out(table(['TIME', 'ACTOR', 'VIA', 'ACTION', 'TARGET', 'RESULT'], evs.map((e) => [
        nsTime(e.timeNs), str(e.actor), str(e.principal) || c.p.dim('-'), str(e.action), str(e.target).replace(/^vm\//, ''),
        e.success === true ? c.p.green(truncate(str(e.result), 60)) : e.success === false ? c.p.red(truncate(str(e.result), 60)) : c.p.yellow(truncate(str(e.result), 60)),
      ]), c.p).join('\n'));
      return EXIT.ok;
    },
  }, argv, io);
