/**
 * The operator commands of `bin/periscope`, against analysis' HTTP API (libs/analysis/src/servers.ts):
 * fleet, vms, vm show|label|pause|resume, alerts [--follow], alert show, policy apply|show|validate|list,
 * exception add, audit, scan, mem read, regs (guest.ts), trace (trace.ts).
 */
import { readFileSync } from 'node:fs';
import type { Subcommand } from '../commands.js';
import { apiJson, apiLines, CliError, EXIT } from './client.js';
import { auditCmd, memReadCmd, regsCmd } from './guest.js';
import { traceCmd } from './trace.js';
import { opSchema, runGroup, runOp, type Group } from './framework.js';
import { block, jsonText, labelsText, nsTime, severityPaint, str, table, truncate, type OutIo, type Palette } from './output.js';

type Json = Record<string, unknown>;
const obj = (v: unknown): Json => (typeof v === 'object' && v !== null && !Array.isArray(v) ? (v as Json) : {});
const arr = (v: unknown): Json[] => (Array.isArray(v) ? v.map(obj) : []);
const enc = encodeURIComponent;

function printJson(io: OutIo, v: unknown): void {
  io.out(jsonText(v));
}

// ---- fleet, vms, vm ------------------------------------------------------------------------------

const fleetSchema = opSchema({ connected: { kind: 'boolean', description: 'only hosts whose agent is linked now' } });
export const fleetCmd = (argv: string[], io: OutIo) =>
  runOp({
    command: 'fleet',
    summary: 'The hosts analysis knows: agent linked or not, VMs attached, the local policy installed and its state (and why an agent rejected its policy, e.g. a crash response it does not allow).',
    examples: ['periscope fleet', 'periscope fleet --server 10.0.0.5:7401 --token-file ~/.periscope/token', 'periscope fleet --json | jq ".hosts[].hostId"'],
    schema: fleetSchema,
    run: async (c) => {
      const t = c.target();
      const { body } = await apiJson(t, `/v1/hosts${c.cfg.values.connected ? '?connected=true' : ''}`);
      const hosts = arr(body.hosts);
      if (c.json) return printJson(io, { hosts }), EXIT.ok;
      if (hosts.length === 0) {
        io.out(c.p.dim('no hosts yet: no host agent has linked to this analysis service'));
        return EXIT.ok;
      }
      io.out(
        table(
          ['HOST', 'AGENT', 'VMS', 'POLICY', 'STATE', 'LAST SEEN'],
          hosts.map((h) => [
            str(h.hostId),
            h.connected ? c.p.green('linked') : c.p.yellow('down'),
            str(h.attachedVmCount),
            `${str(h.policyId)}${h.policyVersion ? ` v${str(h.policyVersion)}` : ''}`,
            h.policyState === 'active' ? str(h.policyState) : c.p.yellow(str(h.policyState)),
            nsTime(h.lastSeenNs),
          ]),
          c.p,
        ).join('\n'),
      );
      // Why an agent did not take its local policy (e.g. a crash response without --allow-command crash).
      for (const h of hosts) if (h.policyState !== 'active' && h.policyError) io.out(c.p.yellow(`${str(h.hostId)}: local policy ${str(h.policyState)}: ${str(h.policyError)}`));
      return EXIT.ok;
    },
  }, argv, io);

const vmsSchema = opSchema({
  host: { kind: 'string', description: 'only VMs of this host' },
  attached: { kind: 'boolean', description: 'only VMs attached now' },
});
export const vmsCmd = (argv: string[], io: OutIo) =>
  runOp({
    command: 'vms',
    summary: 'The VMs analysis knows: host, attached or not, vCPUs, labels, policy and protection status.',
    examples: ['periscope vms', 'periscope vms --host host-1', 'periscope vms --attached --json'],
    schema: vmsSchema,
    run: async (c) => {
      const v = c.cfg.values;
      const q = new URLSearchParams();
      if (v.host) q.set('host', v.host);
      if (v.attached) q.set('attached', 'true');
      const { body } = await apiJson(c.target(), `/v1/vms${q.size ? `?${q}` : ''}`);
      const vms = arr(body.vms);
      if (c.json) return printJson(io, { vms }), EXIT.ok;
      if (vms.length === 0) {
        io.out(c.p.dim(v.host ? `no VMs on host ${v.host}` : 'no VMs yet'));
        return EXIT.ok;
      }
      io.out(
        table(
          ['NAME', 'UUID', 'HOST', 'STATE', 'VCPUS', 'POLICY', 'PROTECTION', 'LABELS'],
          vms.map((x) => [
            str(x.name),
            str(x.uuid),
            str(x.hostId),
            x.attached ? c.p.green('attached') : c.p.dim('detached'),
            str(x.vcpuCount),
            str(x.policyName) || c.p.dim('-'),
            protectionText(x.protection, c.p),
            labelsText(x.labels),
          ]),
          c.p,
        ).join('\n'),
      );
      return EXIT.ok;
    },
  }, argv, io);

function protectionText(v: unknown, p: Palette): string {
  const e = Object.entries(obj(v));
  if (e.length === 0) return p.dim('-');
  return e.map(([k, s]) => `${k}:${str(s)}`).join(',');
}

const vmIdPos = [{ name: 'vm', description: 'VM name or UUID' }] as const;

const vmShow = (argv: string[], io: OutIo) =>
  runOp({
    command: 'vm show',
    summary: "One VM: identity, host, session, labels, policy, protection, counters, records its agent reported lost (e.g. detections rate-limited), vCPU stall, its latest events and the commands analysis sent it.",
    examples: ['periscope vm show sim-vm-0', 'periscope vm show 67343f0a-d344-491d-a398-98aafb277447 --json'],
    schema: opSchema({}, vmIdPos),
    run: async (c) => {
      const { body } = await apiJson(c.target(), `/v1/vms/${enc(c.cfg.positionals.vm)}`, {}, `VM ${c.cfg.positionals.vm}`);
      if (c.json) return printJson(io, body), EXIT.ok;
      const vm = obj(body.vm);
      const stall = obj(body.stall);
      const out: string[] = block(
        [
          ['name', str(vm.name)],
          ['uuid', str(vm.uuid)],
          ['host', str(vm.hostId)],
          ['state', vm.attached ? c.p.green('attached') : c.p.dim(`detached ${str(vm.detachReason)}`)],
          ['session', `generation ${str(vm.sessionGeneration)}, KVMI ${str(vm.dialect)}, ${str(vm.vcpuCount)} vCPUs, max GFN ${str(vm.maxGfn)}`],
          ['attached at', nsTime(vm.attachedNs)],
          ['labels', labelsText(vm.labels) || c.p.dim('none')],
          ['policy', str(vm.policyName) || c.p.dim('none')],
          ['protection', protectionText(vm.protection, c.p)],
          ['counters', Object.entries(obj(body.counters)).filter(([, n]) => typeof n === 'number' || typeof n === 'string').map(([k, n]) => `${k} ${str(n)}`).join(', ') || c.p.dim('none')],
          ['lost records', arr(body.losses).map((l) => `${str(l.recordType)} ${str(l.reason)} ${str(l.count)}`).join(', ') || c.p.dim('none')],
          ['vCPU stall', stall.verdicts ? `${str(stall.verdicts)} verdicts, mean ${Math.round(Number(stall.totalNs) / Math.max(1, Number(stall.verdicts)) / 1000)} µs, max ${Math.round(Number(stall.maxNs) / 1000)} µs` : c.p.dim('no verdicts reported')],
        ],
        c.p,
      );
      const events = arr(body.recentEvents).slice(-10);
      if (events.length > 0) {
        out.push('', c.p.bold('latest events'));
        out.push(...table(['SEQ', 'VCPU', 'KIND', 'RIP', 'RULE', 'DISPOSITION'], events.map((e) => [str(e.seq), str(e.vcpu), str(e.kind), str(e.rip), str(e.ruleId) || c.p.dim('-'), str(e.disposition)]), c.p).map((l) => `  ${l}`));
      }
      const commands = arr(body.commands).slice(0, 10);
      if (commands.length > 0) {
        out.push('', c.p.bold('commands sent (newest first)'));
        out.push(...table(['SENT', 'KIND', 'VCPU', 'PURPOSE', 'STATUS'], commands.map((x) => [nsTime(x.sentNs), str(x.kind), str(x.vcpu), str(x.purpose), str(x.status)]), c.p).map((l) => `  ${l}`));
      }
      io.out(out.join('\n'));
      return EXIT.ok;
    },
  }, argv, io);

const vmLabel = (argv: string[], io: OutIo) =>
  runOp({
    command: 'vm label',
    summary: "Set (KEY=VALUE) or remove (KEY-) labels of a VM. Labels select which policies apply to it (a policy's `select`); the other labels are kept.",
    examples: ['periscope vm label sim-vm-0 tier=prod team=payments', 'periscope vm label sim-vm-0 team-   # remove the label team'],
    schema: opSchema({}, [...vmIdPos, { name: 'labels', description: 'KEY=VALUE to set, KEY- to remove', variadic: true }] as const),
    run: async (c) => {
      const id = c.cfg.positionals.vm;
      const changes = c.cfg.positionals.labels;
      if (changes.length === 0) throw new CliError(EXIT.usage, 'give at least one KEY=VALUE or KEY-');
      const t = c.target();
      const { body } = await apiJson(t, `/v1/vms/${enc(id)}`, {}, `VM ${id}`);
      const labels: Record<string, string> = {};
      for (const [k, v] of Object.entries(obj(obj(body.vm).labels))) labels[k] = str(v);
      for (const ch of changes) {
        const m = /^([A-Za-z0-9_.\/-]+?)(?:=(.*)|(-))$/.exec(ch);
        if (!m) throw new CliError(EXIT.usage, `${ch}: expected KEY=VALUE or KEY-`);
        if (m[3] === '-') delete labels[m[1]!];
        else labels[m[1]!] = m[2] ?? '';
      }
      const r = await apiJson(t, `/v1/vms/${enc(id)}/labels`, { method: 'PUT', body: JSON.stringify({ labels }) }, `label VM ${id}`);
      const vm = obj(r.body.vm);
      if (c.json) return printJson(io, r.body), EXIT.ok;
      io.out(`${str(vm.name)} (${str(vm.uuid)}): ${labelsText(vm.labels) || 'no labels'}`);
      return EXIT.ok;
    },
  }, argv, io);

const vmPause = (paused: boolean) => (argv: string[], io: OutIo) =>
  runOp({
    command: paused ? 'vm pause' : 'vm resume',
    summary: paused
      ? "Pause a whole VM: analysis sends VmPauseControl to the VM's host agent, which pauses every vCPU (held PAUSE events) and persists it: the VM stays paused across agent restarts and re-attach until `periscope vm resume`."
      : 'Resume a VM paused with `periscope vm pause` (the agent answers the held PAUSE events and forgets the persisted pause).',
    examples: paused ? ['periscope vm pause sim-vm-0', 'periscope vm pause 67343f0a-d344-491d-a398-98aafb277447 --json'] : ['periscope vm resume sim-vm-0'],
    schema: opSchema({ by: { kind: 'string', description: 'who asks (recorded with the command)', default: process.env.USER ?? 'operator' } }, vmIdPos),
    run: async (c) => {
      const id = c.cfg.positionals.vm;
      const r = await apiJson(c.target(), `/v1/vms/${enc(id)}/${paused ? 'pause' : 'resume'}`, { method: 'POST', body: JSON.stringify({ by: c.cfg.values.by }) }, `${paused ? 'pause' : 'resume'} VM ${id}`);
      if (c.json) return printJson(io, r.body), EXIT.ok;
      const vm = obj(r.body.vm);
      const what = `${str(vm.name)} (${str(vm.uuid)}) on ${str(vm.hostId)}`;
      if (r.status === 202) io.out(`${paused ? 'pause' : 'resume'} of ${what} recorded by the agent: ${str(r.body.message) || 'not attached there now'}`);
      else io.out(`${paused ? c.p.yellow('paused') : c.p.green('resumed')} ${what}`);
      return EXIT.ok;
    },
  }, argv, io);

const vmGroup: Group = {
  name: 'vm',
  summary: 'One VM: show it, label it, pause or resume it.',
  actions: [
    { name: 'show', summary: 'identity, session, labels, policy, protection, latest events, commands', run: vmShow },
    { name: 'label', summary: 'set KEY=VALUE / remove KEY- labels', run: vmLabel },
    { name: 'pause', summary: 'pause every vCPU (persisted by the agent across restarts)', run: vmPause(true) },
    { name: 'resume', summary: 'resume a paused VM', run: vmPause(false) },
  ],
};

// ---- alerts ------------------------------------------------------------------------------------

const SEVERITIES = ['info', 'low', 'medium', 'high', 'critical'] as const;

function alertRow(a: Json, p: Palette): string[] {
  const sev = str(a.severity);
  const tech = obj(a.technique);
  return [
    str(a.lastSeen).replace(/\.\d+Z$/, 'Z'),
    severityPaint(p, sev)(sev),
    str(a.hostId),
    str(obj(a.vm).name) || str(obj(a.vm).uuid),
    str(a.ruleId),
    str(a.action),
    str(a.count),
    str(tech.id) || p.dim('-'),
    str(a.state),
    str(a.id),
  ];
}
const ALERT_HEAD = ['LAST SEEN', 'SEVERITY', 'HOST', 'VM', 'RULE', 'ACTION', 'COUNT', 'TECHNIQUE', 'STATE', 'ID'];

const alertsSchema = opSchema({
  severity: { kind: 'enum', values: SEVERITIES, description: 'only alerts at least this severe' },
  vm: { kind: 'string', description: 'only alerts of this VM (name or UUID)' },
  host: { kind: 'string', description: 'only alerts of this host' },
  limit: { kind: 'integer', min: 1, max: 1000, default: 50, description: 'how many (newest first); with --follow, how many to show before following' },
  follow: { kind: 'boolean', description: 'keep running and print every new or updated alert as it happens (Ctrl-C stops); with --json, one JSON object per line' },
});

export const alertsCmd = (argv: string[], io: OutIo, signal?: AbortSignal) =>
  runOp({
    command: 'alerts',
    summary: 'Alerts analysis raised (deduplicated: a repeat folds into its open alert and raises COUNT), newest first; `--follow` streams them live.',
    examples: ['periscope alerts', 'periscope alerts --severity high --vm sim-vm-0', 'periscope alerts --follow', 'periscope alerts --follow --json | jq .alert.title', 'periscope alert show <ID>   # evidence of one'],
    schema: alertsSchema,
    run: async (c) => {
      const v = c.cfg.values;
      const q = new URLSearchParams();
      if (v.severity) q.set('severity', v.severity);
      if (v.vm) q.set('vm', v.vm);
      if (v.host) q.set('host', v.host);
      const t = c.target();
      const { body } = await apiJson(t, `/v1/alerts?${new URLSearchParams([...q, ['limit', String(v.limit)]])}`);
      const alerts = arr(body.alerts);
      if (!v.follow) {
        if (c.json) return printJson(io, { alerts, nextCursor: body.nextCursor ?? null }), EXIT.ok;
        if (alerts.length === 0) io.out(c.p.dim('no alerts'));
        else io.out(table(ALERT_HEAD, alerts.map((a) => alertRow(a, c.p)), c.p).join('\n'));
        return EXIT.ok;
      }
      // Follow: what is there, then the live stream from the newest seq shown (nothing lost in between).
      const shown = [...alerts].reverse();
      let last = 0n;
      for (const a of shown) if (/^\d+$/.test(str(a.seq)) && BigInt(str(a.seq)) > last) last = BigInt(str(a.seq));
      const line = (a: Json, outcome: string): void => {
        if (c.json) io.out(JSON.stringify({ outcome, alert: a }));
        else io.out(`${alertRow(a, c.p).join('  ')}${outcome === 'folded' ? c.p.dim('  (repeat)') : ''}`);
      };
      if (!c.json) io.out(c.p.bold(ALERT_HEAD.join('  ')));
      for (const a of shown) line(a, 'stored');
      if (!c.json && io.isTTY) io.err(c.p.dim('following; Ctrl-C stops'));
      const ac = new AbortController();
      const stop = (): void => ac.abort();
      process.once('SIGINT', stop);
      process.once('SIGTERM', stop);
      signal?.addEventListener('abort', stop);
      try {
        q.set('format', 'jsonl');
        q.set('after', last.toString());
        await apiLines(t, `/v1/alerts/stream?${q}`, (m) => line(obj(m.alert), str(m.outcome)), { signal: ac.signal });
      } finally {
        process.off('SIGINT', stop);
        process.off('SIGTERM', stop);
        signal?.removeEventListener('abort', stop);
      }
      if (ac.signal.aborted) return EXIT.ok;
      throw new CliError(EXIT.unreachable, `analysis at ${t.base.origin} ended the alert stream (stopped or restarted)`);
    },
  }, argv, io);

const alertShow = (argv: string[], io: OutIo) =>
  runOp({
    command: 'alert show',
    summary: 'One alert with its evidence: the attempt (old/new values, RIP), registers and special registers at the event, rule, action, tier, technique, policy.',
    examples: ['periscope alert show 05041ec3-258f-41ff-8987-5c272b3a6149', 'periscope alert show 05041ec3-258f-41ff-8987-5c272b3a6149 --json | jq .alert.evidence'],
    schema: opSchema({}, [{ name: 'id', description: 'alert id (periscope alerts shows them)' }] as const),
    run: async (c) => {
      const id = c.cfg.positionals.id;
      const { body } = await apiJson(c.target(), `/v1/alerts/${enc(id)}`, {}, `alert ${id}`);
      if (c.json) return printJson(io, body), EXIT.ok;
      const a = obj(body.alert);
      const ev = obj(a.evidence);
      const tech = obj(a.technique);
      const pol = obj(a.policy);
      const sev = str(a.severity);
      const out = block(
        [
          ['id', str(a.id)],
          ['title', str(a.title)],
          ['severity', severityPaint(c.p, sev)(sev)],
          ['state', `${str(a.state)}${a.acknowledgedBy ? ` by ${str(a.acknowledgedBy)}` : ''}`],
          ['VM', `${str(obj(a.vm).name)} (${str(obj(a.vm).uuid)}) on ${str(a.hostId)}, vCPU ${str(a.vcpu)}`],
          ['rule', `${str(a.ruleId)}${a.module ? ` (module ${str(a.module)})` : ''}`],
          ['action', `${str(a.action)} (tier ${str(a.tier)})`],
          ['technique', tech.id ? `${str(tech.id)} ${str(tech.name)}` : c.p.dim('-')],
          ['policy', `${str(pol.name) || str(pol.localId)}${pol.version ? ` v${str(pol.version)}` : ''}`],
          ['count', `${str(a.count)} (first ${str(a.firstSeen)}, last ${str(a.lastSeen)})`],
          ['summary', str(ev.summary) || str(a.description)],
        ],
        c.p,
      );
      const section = (title: string, v: unknown): void => {
        const e = Object.entries(obj(v));
        if (e.length === 0) return;
        out.push('', c.p.bold(title), ...block(e.map(([k, x]) => [k, str(x)] as const), c.p, '  '));
      };
      section('attempt', ev.attempt);
      section('registers', ev.registers);
      section('special registers', ev.sregs);
      section('attributes', ev.attributes);
      for (const [k, x] of Object.entries(ev)) if (!['attempt', 'registers', 'sregs', 'attributes', 'summary', 'seqs', 'session'].includes(k)) section(k, typeof x === 'object' ? x : { value: x });
      io.out(out.join('\n'));
      return EXIT.ok;
    },
  }, argv, io);

const alertGroup: Group = { name: 'alert', summary: 'One alert.', actions: [{ name: 'show', summary: 'the alert with its evidence', run: alertShow }] };

// ---- policies and exceptions ----------------------------------------------------------------------

function readText(path: string): string {
  try {
    return readFileSync(path, 'utf8');
  } catch (e) {
    throw new CliError(EXIT.error, `cannot read ${path}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
  }
}

const filePos = [{ name: 'file', description: 'policy document (YAML or JSON, format: periscope.policy/v1)' }] as const;

const policyApply = (argv: string[], io: OutIo) =>
  runOp({
    command: 'policy apply',
    summary: 'Store a policy document as a new version (when it changed) and push the compiled local rules to every agent whose VMs it selects.',
    examples: ['periscope policy apply fleet-default.yaml', 'periscope policy apply fleet-default.yaml --json'],
    schema: opSchema({ by: { kind: 'string', default: process.env.USER ?? 'operator', description: 'who applies it (recorded with the version)' } }, filePos),
    run: async (c) => {
      const text = readText(c.cfg.positionals.file);
      const r = await apiJson(c.target(), `/v1/policies?by=${enc(c.cfg.values.by)}`, { method: 'POST', body: text, contentType: 'application/yaml' }, `apply ${c.cfg.positionals.file}`);
      if (c.json) return printJson(io, r.body), EXIT.ok;
      io.out(r.body.changed ? `${c.p.green('applied')} ${str(r.body.name)} version ${str(r.body.version)}` : `${str(r.body.name)} unchanged (version ${str(r.body.version)})`);
      return EXIT.ok;
    },
  }, argv, io);

const policyValidate = (argv: string[], io: OutIo) =>
  runOp({
    command: 'policy validate',
    summary: 'Check a policy document with analysis (schema, modules, selectors) without storing it. Invalid: each issue with its path, exit status 1.',
    examples: ['periscope policy validate fleet-default.yaml'],
    schema: opSchema({}, filePos),
    run: async (c) => {
      const text = readText(c.cfg.positionals.file);
      const r = await apiJson(c.target(), '/v1/policies/validate', { method: 'POST', body: text, contentType: 'application/yaml' }, `${c.cfg.positionals.file} is not valid`);
      if (c.json) return printJson(io, r.body), EXIT.ok;
      io.out(`${c.p.green('valid')}: ${str(r.body.name)} (modules: ${(Array.isArray(r.body.modules) ? r.body.modules : []).map(str).join(', ')})`);
      return EXIT.ok;
    },
  }, argv, io);

const policyShow = (argv: string[], io: OutIo) =>
  runOp({
    command: 'policy show',
    summary: 'A stored policy: its document (as applied), version and history.',
    examples: ['periscope policy show fleet-default', 'periscope policy show fleet-default --version 1', 'periscope policy show fleet-default --json | jq .spec'],
    schema: opSchema({ version: { kind: 'integer', min: 1, description: 'this version (default: the current one)' } }, [{ name: 'name', description: 'policy name' }] as const),
    run: async (c) => {
      const name = c.cfg.positionals.name;
      const { body } = await apiJson(c.target(), `/v1/policies/${enc(name)}${c.cfg.values.version !== undefined ? `?version=${c.cfg.values.version}` : ''}`, {}, `policy ${name}`);
      if (c.json) return printJson(io, body), EXIT.ok;
      io.out(c.p.dim(`# ${str(body.name)} version ${str(body.version)}; history: ${arr(body.history).map((h) => `v${str(h.version)}${h.createdBy ? ` by ${str(h.createdBy)}` : ''}`).join(', ')}`));
      io.out(str(body.document).replace(/\n$/, ''));
      return EXIT.ok;
    },
  }, argv, io);

const policyList = (argv: string[], io: OutIo) =>
  runOp({
    command: 'policy list',
    summary: 'The current policies: name, version, priority, modules, selector.',
    examples: ['periscope policy list'],
    schema: opSchema({}),
    run: async (c) => {
      const { body } = await apiJson(c.target(), '/v1/policies');
      const ps = arr(body.policies);
      if (c.json) return printJson(io, { policies: ps }), EXIT.ok;
      if (ps.length === 0) io.out(c.p.dim('no policies (the agents run their local policy files)'));
      else io.out(table(['NAME', 'VERSION', 'PRIORITY', 'MODULES', 'SELECT', 'BY'], ps.map((x) => [str(x.name), str(x.version), str(x.priority), (Array.isArray(x.modules) ? x.modules : []).join(','), JSON.stringify(x.select ?? {}), str(x.createdBy)]), c.p).join('\n'));
      return EXIT.ok;
    },
  }, argv, io);

const policyGroup: Group = {
  name: 'policy',
  summary: 'Policies analysis compiles into the agents\' local rules.',
  actions: [
    { name: 'apply', summary: 'store a document as a new version and push it', run: policyApply },
    { name: 'validate', summary: 'check a document without storing it', run: policyValidate },
    { name: 'show', summary: 'a stored policy: document, version, history', run: policyShow },
    { name: 'list', summary: 'the current policies', run: policyList },
  ],
};

const exceptionAdd = (argv: string[], io: OutIo) =>
  runOp({
    command: 'exception add',
    summary: "Allow what an alert saw from now on: an exception of the alert's policy rule for that VM (or --any-vm), matching the same originator/victim; a new policy version is pushed to the agents.",
    examples: ['periscope exception add --from-alert 05041ec3-258f-41ff-8987-5c272b3a6149 --reason "vendor driver patches its text"', 'periscope exception add --from-alert <ID> --expires-in 24h --any-vm'],
    schema: opSchema({
      'from-alert': { kind: 'string', required: true, description: 'the alert whose case to allow' },
      reason: { kind: 'string', description: 'why (recorded)' },
      'expires-in': { kind: 'duration', min: 1000, description: 'expire after this long (default: never)' },
      'any-vm': { kind: 'boolean', description: 'on every VM the policy selects, not only the alert\'s' },
      by: { kind: 'string', default: process.env.USER ?? 'operator', description: 'who adds it (recorded)' },
    }),
    run: async (c) => {
      const v = c.cfg.values;
      const body = { fromAlert: v['from-alert'], by: v.by, anyVm: v['any-vm'], ...(v.reason !== undefined ? { reason: v.reason } : {}), ...(v['expires-in'] !== undefined ? { expiresInSeconds: Math.ceil(v['expires-in'] / 1000) } : {}) };
      const r = await apiJson(c.target(), '/v1/exceptions', { method: 'POST', body: JSON.stringify(body) }, `exception from alert ${v['from-alert']}`);
      if (c.json) return printJson(io, r.body), EXIT.ok;
      const e = obj(r.body.exception);
      io.out(`${c.p.green('added')} exception ${str(e.id)}: policy ${str(e.policy)}, ${str(e.module)}/${str(e.rule)}${Array.isArray(e.vms) && e.vms.length > 0 ? ` on ${e.vms.map(str).join(', ')}` : ' on every selected VM'}`);
      return EXIT.ok;
    },
  }, argv, io);

const exceptionGroup: Group = { name: 'exception', summary: 'Exceptions: cases a policy rule allows.', actions: [{ name: 'add', summary: 'an exception from an alert', run: exceptionAdd }] };

// ---- audit, scan ---------------------------------------------------------------------------------

// `audit` (with --commands), `mem read`, `regs`: guest.ts.
export { auditCmd };

export const scanCmd = (argv: string[], io: OutIo) =>
  runOp({
    command: 'scan',
    summary: "Scan a VM's guest memory for a byte signature (`??` = any byte; HEX/MASK ANDs a bit mask). Without --range: the guest kernel's image (needs kernel-code-integrity in the VM's policy, which derives it). Memory is read by the host's guest agent (/dev/kvmmem) or, without one, VM_READ_PHYSICAL through the host agent. Progress on stderr on a terminal.",
    examples: ['periscope scan sim-vm-0 --signature "0f 05 ?? c3" --range 0x1000000:0x200000', 'periscope scan sim-vm-0 --signature 4889e5 --json'],
    schema: opSchema(
      {
        signature: { kind: 'string', required: true, description: 'bytes as hex, `??` for any byte; optional /MASK' },
        range: { kind: 'list', description: 'GPA:LENGTH to scan (hex or decimal, repeatable); default: the kernel image' },
        'max-matches': { kind: 'integer', min: 1, max: 1000000, default: 1000, description: 'stop after this many matches' },
        timeout: { kind: 'duration', min: 100, default: '5m', description: 'how long the whole scan may take' },
      },
      vmIdPos,
    ),
    run: async (c) => {
      const v = c.cfg.values;
      const ranges = v.range.map((r) => {
        const m = /^(0x[0-9a-f]+|\d+):(0x[0-9a-f]+|\d+)$/i.exec(r.trim());
        if (!m) throw new CliError(EXIT.usage, `--range ${r}: expected GPA:LENGTH (e.g. 0x1000000:0x200000)`);
        return { gpa: `0x${BigInt(m[1]!).toString(16)}`, length: `0x${BigInt(m[2]!).toString(16)}` };
      });
      const t = { ...c.target(), timeoutMs: v.timeout };
      let done: Json | undefined;
      let start: Json | undefined;
      let failure: Json | undefined;
      const fallbacks: string[] = [];
      const progress = io.isTTY && !c.json;
      await apiLines(
        t,
        `/v1/vms/${enc(c.cfg.positionals.vm)}/scan?format=jsonl`,
        (m) => {
          if (m.event === 'start') start = m;
          else if (m.event === 'progress' && progress) {
            const pct = Number(m.totalBytes) > 0 ? Math.floor((Number(m.bytesScanned) * 100) / Number(m.totalBytes)) : 0;
            io.err(`scanning ${pct}% (${str(m.bytesScanned)} of ${str(m.totalBytes)} bytes)`);
          } else if (m.event === 'fallback') fallbacks.push(str(m.reason));
          else if (m.event === 'done') done = m;
          else if (m.event === 'error') failure = m;
        },
        { method: 'POST', body: JSON.stringify({ signature: v.signature, maxMatches: v['max-matches'], ...(ranges.length ? { ranges } : {}) }) },
      );
      if (failure) throw new CliError(EXIT.error, `scan failed: ${str(failure.message)} (${str(failure.code)})`);
      if (!done) throw new CliError(EXIT.unreachable, 'the scan stream ended without a result');
      if (c.json) return printJson(io, { start, done, fallbacks }), EXIT.ok;
      const matches = (Array.isArray(done.matches) ? done.matches : []).map(str);
      io.out(`${matches.length} match${matches.length === 1 ? '' : 'es'}${done.truncated ? ' (truncated)' : ''} in ${str(done.bytesScanned)} bytes of ${str(obj(start?.vm).name)} via ${str(done.via)}${done.fallbackReason ? ` (${str(done.fallbackReason)})` : ''}, ${str(done.ms)} ms`);
      if (matches.length) io.out(table(['GPA'], matches.map((x) => [x]), c.p).join('\n'));
      return EXIT.ok;
    },
  }, argv, io);

const memGroup: Group = { name: 'mem', summary: 'Guest memory.', actions: [{ name: 'read', summary: 'hexdump of guest physical memory (VM_READ_PHYSICAL, 4 KiB pieces, ENOENT gaps)', run: memReadCmd }] };

// ---- the table -----------------------------------------------------------------------------------

type Run = (argv: string[], io: OutIo) => Promise<number>;
const group = (g: Group): Run => (argv, io) => runGroup(g, argv, io);

export function operatorCommands(io: () => OutIo): Subcommand[] {
  const s = (name: string, summary: string, run: Run): Subcommand => ({ name, summary, run: (argv) => run(argv, io()) });
  return [
    s('fleet', 'hosts, their agents and policies (analysis)', fleetCmd),
    s('vms', 'VMs of the fleet or of a --host (analysis)', vmsCmd),
    s('vm', 'show|label|pause|resume one VM', group(vmGroup)),
    s('alerts', 'alerts by --severity/--vm; --follow streams them live', alertsCmd),
    s('alert', 'show ID: one alert with its evidence', group(alertGroup)),
    s('policy', 'apply FILE|validate FILE|show NAME|list', group(policyGroup)),
    s('exception', 'add --from-alert ID', group(exceptionGroup)),
    s('audit', 'who changed which guest, when, with what result [--vm] [--since]; --commands: commands sent to agents', auditCmd),
    s('scan', 'scan a VM\'s memory for a byte signature', scanCmd),
    s('mem', 'read VM GPA LEN: hexdump of guest memory', group(memGroup)),
    s('regs', 'VM VCPU: a vCPU\'s registers', regsCmd),
    s('trace', 'VM FUNCTION: trace a kernel function with a breakpoint (hits with their arguments); stop|list', traceCmd),
  ];
}
