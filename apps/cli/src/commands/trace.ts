/**
 * `periscope trace`: breakpoint tracing of a guest kernel function (libs/analysis/src/tracing.ts,
 * docs/tracing.md), against analysis' HTTP API.
 *
 *   periscope trace VM FUNCTION [--args N] [--for DURATION] [--detach]   start, print hits as they come
 *   periscope trace stop VM FUNCTION                                       restore the original byte
 *   periscope trace list [--vm VM] [--all]                                 active (and stopped) traces
 */
import { apiJson, CliError, EXIT } from './client.js';
import { opSchema, runOp } from './framework.js';
import { jsonText, nsTime, str, table, type OutIo } from './output.js';

type Json = Record<string, unknown>;
const obj = (v: unknown): Json => (typeof v === 'object' && v !== null && !Array.isArray(v) ? (v as Json) : {});
const arr = (v: unknown): Json[] => (Array.isArray(v) ? v.map(obj) : []);
const enc = encodeURIComponent;
const POLL_MS = 500;
const by = process.env.USER ?? 'operator';

/** `sim_copy_tagged(0x…, 0x…)` with the registers the trace reads. */
function callText(h: Json): string {
  return `${str(h.function)}(${(Array.isArray(h.args) ? h.args : []).map(str).join(', ')})`;
}

const startSchema = opSchema(
  {
    args: { kind: 'integer', min: 0, max: 6, default: 6, description: 'how many SysV argument registers to record (rdi, rsi, rdx, rcx, r8, r9)' },
    for: { kind: 'duration', min: 1, description: 'trace this long, then stop the trace and exit (default: until Ctrl-C)' },
    detach: { kind: 'boolean', description: 'start the trace and exit at once; it stays active until `periscope trace stop`' },
    by: { kind: 'string', default: by, description: 'who asks (recorded with the trace and its commands)' },
  },
  [{ name: 'vm', description: 'VM name or UUID' }, { name: 'function', description: "kernel function (a symbol of the VM's guest OS profile)" }] as const,
);

const traceStart = (argv: string[], io: OutIo, signal?: AbortSignal) =>
  runOp({
    command: 'trace',
    summary:
      "Trace calls of a guest kernel function with a breakpoint: analysis plants an INT3 at the function (its address from the guest OS profile and the VM's KASLR slide) through the VM's host agent, records each call with its argument registers and steps the vCPU over the original instruction (VCPU_CONTROL_SINGLESTEP, the other vCPUs paused meanwhile). Hits are printed as they come; Ctrl-C (or --for) stops the trace and restores the byte.\n\nThe agent must allow guest memory writes (`--allow-command write-physical`); a refusal is printed and the exit status is 5 (refused). A VM whose KVM lacks the singlestep feature is refused too.\n\nAlso: `periscope trace stop VM FUNCTION`, `periscope trace list [--vm VM] [--all]`.",
    examples: ['periscope trace sim-vm-0 sim_copy_tagged --args 4', 'periscope trace sim-vm-0 sim_copy_tagged --for 10s --json', 'periscope trace sim-vm-0 native_write_cr4 --detach', 'periscope trace stop sim-vm-0 native_write_cr4', 'periscope trace list --all'],
    schema: startSchema,
    run: async (c) => {
      const v = c.cfg.values;
      const { vm, function: fn } = c.cfg.positionals;
      const t = c.target();
      // The agent's (or analysis') refusal is the message; exit 5 (refused), like every other command.
      const r = await apiJson(t, `/v1/vms/${enc(vm)}/traces`, { method: 'POST', body: JSON.stringify({ function: fn, args: v.args, by: v.by }) }, `trace ${fn} on ${vm}`);
      const tr = obj(r.body.trace);
      if (c.json) io.out(JSON.stringify({ event: 'started', trace: tr }));
      else io.out(`tracing ${str(tr.function)} on ${str(tr.vmName) || vm} at ${str(tr.gva)} (gpa ${str(tr.gpa)}, original byte ${str(tr.originalByte)}), recording ${(Array.isArray(tr.registers) ? tr.registers : []).map(str).join(', ') || 'no registers'}`);
      if (v.detach) return EXIT.ok;
      if (!c.json) io.out(c.p.bold(['TIME', 'VCPU', 'CALL', 'RIP'].join('  ')));
      const ac = new AbortController();
      const stop = (): void => ac.abort();
      process.once('SIGINT', stop);
      process.once('SIGTERM', stop);
      signal?.addEventListener('abort', stop);
      const deadline = typeof v.for === 'number' ? Date.now() + v.for : Infinity;
      let after = '0';
      let shown = 0;
      try {
        while (!ac.signal.aborted && Date.now() < deadline) {
          const { body } = await apiJson(t, `/v1/traces/hits?trace=${enc(str(tr.id))}&after=${after}&limit=1000`, {}, 'trace hits');
          for (const h of arr(body.hits)) {
            shown++;
            if (c.json) io.out(JSON.stringify({ event: 'hit', hit: h }));
            else io.out(`${nsTime(h.hitNs)}  ${str(h.vcpu).padStart(4)}  ${callText(h)}  ${c.p.dim(str(h.rip))}`);
          }
          after = str(body.next) || after;
          await new Promise<void>((res) => {
            const timer = setTimeout(res, Math.max(0, Math.min(POLL_MS, deadline - Date.now())));
            ac.signal.addEventListener('abort', () => {
              clearTimeout(timer);
              res();
            }, { once: true });
          });
        }
      } finally {
        process.off('SIGINT', stop);
        process.off('SIGTERM', stop);
        signal?.removeEventListener('abort', stop);
      }
      const s = await apiJson(t, `/v1/vms/${enc(vm)}/traces/${enc(fn)}?by=${enc(v.by)}`, { method: 'DELETE' }, `trace stop ${fn} on ${vm}`);
      const st = obj(s.body.trace);
      if (c.json) io.out(JSON.stringify({ event: 'stopped', trace: st }));
      else io.out(`stopped: ${str(st.hits)} call${str(st.hits) === '1' ? '' : 's'} of ${fn} recorded (${shown} shown); original byte restored`);
      return EXIT.ok;
    },
  }, argv, io);

const traceStop = (argv: string[], io: OutIo) =>
  runOp({
    command: 'trace stop',
    summary: 'Stop tracing a function: the original byte goes back into the guest, then the breakpoint rules leave the local policy. The recorded hits stay.',
    examples: ['periscope trace stop sim-vm-0 sim_copy_tagged'],
    schema: opSchema({ by: { kind: 'string', default: by, description: 'who asks' } }, [{ name: 'vm', description: 'VM name or UUID' }, { name: 'function', description: 'the traced function' }] as const),
    run: async (c) => {
      const { vm, function: fn } = c.cfg.positionals;
      const r = await apiJson(c.target(), `/v1/vms/${enc(vm)}/traces/${enc(fn)}?by=${enc(c.cfg.values.by)}`, { method: 'DELETE' }, `trace stop ${fn} on ${vm}`);
      const tr = obj(r.body.trace);
      if (c.json) return io.out(jsonText(r.body)), EXIT.ok;
      io.out(`stopped tracing ${fn} on ${str(tr.vmName) || vm}: ${str(tr.hits)} call(s) recorded; ${str(tr.status)}`);
      return EXIT.ok;
    },
  }, argv, io);

const traceList = (argv: string[], io: OutIo) =>
  runOp({
    command: 'trace list',
    summary: 'Active traces (with --all also stopped ones): VM, function, address, state, hits, who started them.',
    examples: ['periscope trace list', 'periscope trace list --vm sim-vm-0 --all --json'],
    schema: opSchema({ vm: { kind: 'string', description: 'only traces of this VM (name or UUID)' }, all: { kind: 'boolean', description: 'stopped traces too' } }),
    run: async (c) => {
      const q = new URLSearchParams();
      if (c.cfg.values.vm) q.set('vm', c.cfg.values.vm);
      if (c.cfg.values.all) q.set('all', 'true');
      const { body } = await apiJson(c.target(), `/v1/traces?${q}`, {}, 'trace list');
      const traces = arr(body.traces);
      if (c.json) return io.out(jsonText({ traces })), EXIT.ok;
      if (!traces.length) {
        io.out(c.p.dim(c.cfg.values.all ? 'no traces' : 'no active traces'));
        return EXIT.ok;
      }
      io.out(
        table(
          ['VM', 'FUNCTION', 'GVA', 'STATE', 'STATUS', 'HITS', 'BY', 'STARTED'],
          traces.map((t) => [str(t.vmName) || str(t.vm), str(t.function), str(t.gva), str(t.state), str(t.status), str(t.hits), str(t.createdBy), nsTime(t.createdNs)]),
          c.p,
        ).join('\n'),
      );
      return EXIT.ok;
    },
  }, argv, io);

/** `trace VM FUNCTION …`, `trace stop …`, `trace list …`. */
export function traceCmd(argv: string[], io: OutIo): Promise<number> {
  const [first, ...rest] = argv;
  if (first === 'stop') return traceStop(rest, io);
  if (first === 'list') return traceList(rest, io);
  return traceStart(argv, io);
}
