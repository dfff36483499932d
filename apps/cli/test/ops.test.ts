/**
 * The operator commands on real processes: `periscope analysis` (PGlite, an API token), one
 * `periscope host-agent` linked to it (a state dir, so pauses persist) and one `periscope sim` with the
 * LSTAR-hijack attack on a loop on sim-vm-0. Every command runs as `bin/periscope …` and is checked for
 * its table, its --json and its exit code (0 ok, 1 error, 2 usage, 3 not found, 4 unreachable,
 * 5 refused); `alerts --follow` prints an alert as it happens; `vm pause` holds across an agent restart.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { request } from 'node:http';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { main } from '../src/main.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '../../..');
const bin = join(root, 'bin/periscope');

interface Proc {
  name: string;
  proc: ChildProcess;
  out: string;
  err: string;
  exited: Promise<number | null>;
}
const procs: Proc[] = [];

function start(name: string, args: string[]): Proc {
  const proc = spawn(process.execPath, [bin, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  const p: Proc = { name, proc, out: '', err: '', exited: new Promise((r) => proc.on('exit', (code) => r(code))) };
  proc.stdout!.on('data', (c: Buffer) => (p.out += c.toString('utf8')));
  proc.stderr!.on('data', (c: Buffer) => (p.err += c.toString('utf8')));
  procs.push(p);
  return p;
}

async function stop(p: Proc, ms = 8000): Promise<void> {
  if (p.proc.exitCode !== null || p.proc.signalCode !== null) return;
  p.proc.kill('SIGTERM');
  const t = setTimeout(() => p.proc.kill('SIGKILL'), ms);
  await p.exited;
  clearTimeout(t);
}

async function until<T>(what: string, f: () => Promise<T | undefined> | T | undefined, ms: number, every = 250): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = await f();
    if (v !== undefined && v !== false) return v;
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, every));
  }
}

let dir = '';
let env: NodeJS.ProcessEnv = {};
let analysis: Proc;
let agent: Proc;
let sim: Proc;
let http = '';
let grpc = '';

interface Run {
  code: number | null;
  out: string;
  err: string;
}
/** `bin/periscope ARGS` against the test's analysis (PERISCOPE_SERVER, PERISCOPE_TOKEN_FILE). */
function cli(args: string[], extraEnv: NodeJS.ProcessEnv = {}): Promise<Run> {
  return new Promise((resolve) => {
    const p = spawn(process.execPath, [bin, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...env, ...extraEnv } });
    let out = '';
    let err = '';
    p.stdout.on('data', (c: Buffer) => (out += c.toString('utf8')));
    p.stderr.on('data', (c: Buffer) => (err += c.toString('utf8')));
    p.on('exit', (code) => resolve({ code, out, err }));
  });
}
async function cliJson<T = Record<string, unknown>>(args: string[]): Promise<T> {
  const r = await cli([...args, '--json']);
  if (r.code !== 0) throw new Error(`periscope ${args.join(' ')} --json: exit ${r.code}: ${r.err}`);
  return JSON.parse(r.out) as T;
}

function agentApi(path: string): Promise<Record<string, unknown> | undefined> {
  return new Promise((resolve) => {
    const req = request({ socketPath: join(dir, 'api.sock'), path }, (res) => {
      let b = '';
      res.on('data', (c: Buffer) => (b += c.toString('utf8')));
      res.on('end', () => {
        try {
          resolve(JSON.parse(b) as Record<string, unknown>);
        } catch {
          resolve(undefined);
        }
      });
    });
    req.on('error', () => resolve(undefined));
    req.end();
  });
}
/** The agent's view of one VM (its local API): held events include the PAUSE events of a paused VM. */
async function agentVm(name: string): Promise<{ name: string; heldEvents: number; events: number } | undefined> {
  const r = await agentApi('/v1/vms');
  return ((r?.vms as { name: string; heldEvents: number; events: number }[] | undefined) ?? []).find((v) => v.name === name);
}

function startAgent(): Proc {
  return start('agent', [
    'host-agent', '--host-id', 'host-t', '--kvmi-listen', `unix:${join(dir, 'kvmi.sock')}`, '--cookie-file', join(dir, 'cookie'),
    '--api-listen', `unix:${join(dir, 'api.sock')}`, '--analysis', grpc, '--state-dir', join(dir, 'state'), '--link-backoff-max', '500ms',
  ]);
}

const POLICY = `format: periscope.policy/v1
name: cli-test
description: syscall MSRs and CR pinning on every VM
select: {}
modules:
  syscall-msrs: { action: deny }
  cr-pinning: { action: deny, cr0: [WP], cr4: [SMEP, SMAP] }
`;

beforeAll(async () => {
  if (!existsSync(join(root, 'apps/cli/dist/main.js'))) throw new Error('apps/cli is not built: run npm run build (npm test builds first)');
  dir = mkdtempSync(join(tmpdir().length <= 40 ? tmpdir() : '/tmp', 'psc-'));
  writeFileSync(join(dir, 'cookie'), 'cli-test-secret');
  writeFileSync(join(dir, 'token'), 'tok-123\n');
  writeFileSync(join(dir, 'policy.yaml'), POLICY);
  writeFileSync(join(dir, 'bad.yaml'), 'format: periscope.policy/v1\nname: bad\nmodules:\n  no-such-module: {}\n');
  analysis = start('analysis', ['analysis', '--db', `pglite:${join(dir, 'db')}`, '--listen', '127.0.0.1:0', '--http', '127.0.0.1:0', '--api-token-file', join(dir, 'token')]);
  const first = await until('analysis to print its ports', () => (analysis.out.includes('\n') ? analysis.out.split('\n')[0] : analysis.proc.exitCode !== null ? Promise.reject(new Error(analysis.err)) : undefined), 90_000);
  const ports = JSON.parse(first) as { grpc: string; http: string };
  http = ports.http;
  grpc = ports.grpc;
  env = { ...process.env, PERISCOPE_SERVER: http, PERISCOPE_TOKEN_FILE: join(dir, 'token') };
  agent = startAgent();
  await until('the agent API', () => agentApi('/v1/vms'), 30_000);
  sim = start('sim', [
    'sim', '--introspector', join(dir, 'kvmi.sock'), '--qemu-key-file', join(dir, 'cookie'), '--vms', '2', '--vcpus', '1', '--activity', '20',
    '--scenario', join(root, 'libs/simulator/scenarios/attack-lstar-hijack.yaml'), '--scenario-vms', '0', '--scenario-delay', '1s', '--scenario-loop', '3s', '--run-dir', join(dir, 'ram'),
  ]);
  await until('both VMs known to analysis', async () => {
    if (sim.proc.exitCode !== null || agent.proc.exitCode !== null) throw new Error(`a process exited: sim ${sim.err}\nagent ${agent.err}`);
    return (await cliJson<{ vms: { attached: boolean }[] }>(['vms'])).vms.filter((v) => v.attached).length === 2 ? true : undefined;
  }, 60_000, 500);
}, 180_000);

afterAll(async () => {
  for (const p of [sim, agent, analysis]) if (p) await stop(p);
  for (const p of procs) if (p.proc.exitCode === null && p.proc.signalCode === null) p.proc.kill('SIGKILL');
  if (dir) rmSync(dir, { recursive: true, force: true });
}, 30_000);

describe('periscope operator commands (real analysis, host agent and simulator)', () => {
  it('target selection and exit codes: unreachable 4, refused 5, usage 2, not found 3', async () => {
    const down = await cli(['fleet', '--server', '127.0.0.1:1']);
    expect(down.code).toBe(4);
    expect(down.err).toMatch(/unreachable/);
    const noToken = await cli(['fleet'], { PERISCOPE_TOKEN_FILE: '' });
    expect(noToken.code).toBe(5);
    expect(noToken.err).toMatch(/token/);
    const wrong = join(dir, 'wrong-token');
    writeFileSync(wrong, 'nope');
    expect((await cli(['vms', '--token-file', wrong])).code).toBe(5);
    expect((await cli(['vms', '--bogus'])).code).toBe(2);
    expect((await cli(['vm'])).code).toBe(2);
    expect((await cli(['vm', 'frob', 'x'])).code).toBe(2);
    expect((await cli(['vm', 'show'])).code).toBe(2);
    const missing = await cli(['vm', 'show', 'no-such-vm']);
    expect(missing.code).toBe(3);
    expect(missing.err).toContain('no VM no-such-vm');
    expect((await cli(['alert', 'show', '00000000-0000-0000-0000-000000000000'])).code).toBe(3);
  }, 60_000);

  it('fleet and vms: tables and JSON', async () => {
    const fleet = await cli(['fleet']);
    expect(fleet.code).toBe(0);
    const [head, row] = fleet.out.trim().split('\n');
    expect(head).toMatch(/^HOST\s+AGENT\s+VMS\s+POLICY\s+STATE\s+LAST SEEN$/);
    expect(row).toMatch(/^host-t\s+linked\s+2\s/);
    expect(fleet.out).not.toContain('\x1b['); // no colours off a terminal
    const fj = await cliJson<{ hosts: { hostId: string; connected: boolean; attachedVmCount: number }[] }>(['fleet']);
    expect(fj.hosts).toEqual([expect.objectContaining({ hostId: 'host-t', connected: true, attachedVmCount: 2 })]);

    const vms = await cli(['vms', '--host', 'host-t']);
    expect(vms.code).toBe(0);
    const lines = vms.out.trim().split('\n');
    expect(lines[0]).toMatch(/^NAME\s+UUID\s+HOST\s+STATE\s+VCPUS/);
    expect(lines.slice(1).map((l) => l.split(/\s+/)[0]).sort()).toEqual(['sim-vm-0', 'sim-vm-1']);
    for (const l of lines.slice(1)) expect(l).toMatch(/[0-9a-f-]{36}\s+host-t\s+attached\s+1\s/);
    const vj = await cliJson<{ vms: { name: string; maxGfn: string; uuid: string }[] }>(['vms']);
    expect(vj.vms).toHaveLength(2);
    const other = await cli(['vms', '--host', 'no-such-host']);
    expect(other.code).toBe(0);
    expect(other.out).toContain('no VMs on host no-such-host');
  }, 60_000);

  it('vm show and vm label', async () => {
    const show = await cli(['vm', 'show', 'sim-vm-0']);
    expect(show.code).toBe(0);
    expect(show.out).toMatch(/^name\s+sim-vm-0$/m);
    expect(show.out).toMatch(/^host\s+host-t$/m);
    expect(show.out).toMatch(/^state\s+attached$/m);
    const sj = await cliJson<{ vm: { uuid: string; name: string } }>(['vm', 'show', 'sim-vm-0']);
    expect(sj.vm.name).toBe('sim-vm-0');
    expect((await cli(['vm', 'show', sj.vm.uuid])).code).toBe(0); // by UUID too

    const set = await cliJson<{ vm: { labels: Record<string, string> } }>(['vm', 'label', 'sim-vm-0', 'tier=prod', 'team=payments']);
    expect(set.vm.labels).toEqual({ tier: 'prod', team: 'payments' });
    const del = await cli(['vm', 'label', 'sim-vm-0', 'team-']);
    expect(del.code).toBe(0);
    expect(del.out.trim()).toBe(`sim-vm-0 (${sj.vm.uuid}): tier=prod`);
    expect((await cli(['vm', 'label', 'sim-vm-0', '=x'])).code).toBe(2);
    expect((await cli(['vm', 'label', 'no-such-vm', 'a=b'])).code).toBe(3);
  }, 60_000);

  it('policy validate, apply, show, list', async () => {
    const ok = await cli(['policy', 'validate', join(dir, 'policy.yaml')]);
    expect(ok.code).toBe(0);
    expect(ok.out).toMatch(/^valid: cli-test \(modules: .*syscallMsrs/m);
    const bad = await cli(['policy', 'validate', join(dir, 'bad.yaml')]);
    expect(bad.code).toBe(1);
    expect(bad.err).toMatch(/not valid/);
    expect((await cli(['policy', 'validate', join(dir, 'missing.yaml')])).code).toBe(1);
    const applied = await cliJson<{ name: string; version: string; changed: boolean }>(['policy', 'apply', join(dir, 'policy.yaml')]);
    expect(applied).toMatchObject({ name: 'cli-test', changed: true });
    const again = await cli(['policy', 'apply', join(dir, 'policy.yaml')]);
    expect(again.code).toBe(0);
    expect(again.out).toContain('cli-test unchanged');
    const show = await cli(['policy', 'show', 'cli-test']);
    expect(show.code).toBe(0);
    expect(show.out).toContain('syscall-msrs: { action: deny }');
    expect((await cli(['policy', 'show', 'no-such-policy'])).code).toBe(3);
    const list = await cli(['policy', 'list']);
    expect(list.out).toMatch(/^cli-test\s+\d+\s/m);
  }, 60_000);

  it('fleet shows why an agent rejected its local policy (a crash response without --allow-command crash), until fixed', async () => {
    // The agent runs without --allow-command: a pushed policy with a crash action is rejected whole, the old one stays.
    writeFileSync(join(dir, 'crash.yaml'), POLICY.replace('syscall-msrs: { action: deny }', 'syscall-msrs: { action: deny, response: crash }'));
    expect((await cli(['policy', 'apply', join(dir, 'crash.yaml')])).code).toBe(0);
    const rejected = await until('the agent to reject the policy', async () => {
      const f = await cli(['fleet']);
      return /local policy rejected/.test(f.out) ? f : undefined;
    }, 30_000);
    expect(rejected.code).toBe(0);
    expect(rejected.out).toMatch(/^host-t: local policy rejected: .*syscall-msrs.*\(crash\) needs --allow-command crash \(config key "allow-command"\)/m);
    const fj = await cliJson<{ hosts: { hostId: string; policyState: string; policyError: string }[] }>(['fleet']);
    expect(fj.hosts.find((h) => h.hostId === 'host-t')).toMatchObject({ policyState: 'rejected', policyError: expect.stringContaining('needs --allow-command crash') });
    // Back to the deny policy: active again, the line is gone.
    expect((await cli(['policy', 'apply', join(dir, 'policy.yaml')])).code).toBe(0);
    const fixed = await until('the agent to install the deny policy', async () => {
      const h = (await cliJson<{ hosts: { hostId: string; policyState: string }[] }>(['fleet'])).hosts.find((x) => x.hostId === 'host-t');
      return h?.policyState === 'active' ? true : undefined;
    }, 30_000);
    expect(fixed).toBe(true);
    expect((await cli(['fleet'])).out).not.toMatch(/local policy rejected/);
  }, 90_000);

  it('alerts, alert show and exception add; the attack raises alerts with evidence', async () => {
    // The agent runs the pushed policy: the next LSTAR write is blocked by syscall-msrs/entry.
    const alerts = await until('an alert of the pushed policy', async () => {
      const j = await cliJson<{ alerts: { id: string; ruleId: string; severity: string; vm: { name: string } }[] }>(['alerts', '--vm', 'sim-vm-0']);
      return j.alerts.some((a) => a.ruleId === 'cli-test/syscall-msrs/entry') ? j.alerts : undefined;
    }, 60_000, 1000);
    const table = await cli(['alerts']);
    expect(table.code).toBe(0);
    const [head, ...rows] = table.out.trim().split('\n');
    expect(head).toMatch(/^LAST SEEN\s+SEVERITY\s+HOST\s+VM\s+RULE\s+ACTION\s+COUNT\s+TECHNIQUE\s+STATE\s+ID$/);
    expect(rows.some((r) => /\shost-t\s+sim-vm-0\s+cli-test\/syscall-msrs\/entry\s+deny\s+\d+\s+T1014\s+open\s+[0-9a-f-]{36}$/.test(r)), table.out).toBe(true);
    const none = await cliJson<{ alerts: unknown[] }>(['alerts', '--vm', 'sim-vm-1']);
    expect(none.alerts).toEqual([]); // the attack runs on sim-vm-0 only
    const crit = await cliJson<{ alerts: { severity: string }[] }>(['alerts', '--severity', 'critical']);
    for (const a of crit.alerts) expect(a.severity).toBe('critical');
    expect((await cli(['alerts', '--severity', 'bogus'])).code).toBe(2);

    const module = alerts.find((a) => a.ruleId === 'cli-test/syscall-msrs/entry')!;
    const show = await cli(['alert', 'show', module.id]);
    expect(show.code).toBe(0);
    expect(show.out).toMatch(/^rule\s+cli-test\/syscall-msrs\/entry \(module syscall-msrs\)$/m);
    expect(show.out).toMatch(/^technique\s+T1014/m);
    expect(show.out).toMatch(/^ {2}rip\s+0x[0-9a-f]+$/m); // registers, 0x-hex
    const sj = await cliJson<{ alert: { evidence: { attempt: Record<string, unknown> } } }>(['alert', 'show', module.id]);
    expect(sj.alert.evidence.attempt.new).toMatch(/^0x[0-9a-f]+$/);

    const local = (await cliJson<{ alerts: { id: string; ruleId: string }[] }>(['alerts', '--limit', '1000'])).alerts.find((a) => !a.ruleId.includes('/'));
    if (local) {
      const refused = await cli(['exception', 'add', '--from-alert', local.id]);
      expect(refused.code).toBe(1); // a local-file rule has no policy to carry an exception
      expect(refused.err).toContain('not by a module rule');
    }
    expect((await cli(['exception', 'add'])).code).toBe(2);
    expect((await cli(['exception', 'add', '--from-alert', '00000000-0000-0000-0000-000000000000'])).code).toBe(3);
    const ex = await cliJson<{ exception: { id: string; rule: string; module: string; policy: string } }>(['exception', 'add', '--from-alert', module.id, '--reason', 'test']);
    expect(ex.exception).toMatchObject({ policy: 'cli-test', module: 'syscall-msrs', rule: 'entry' });
  }, 90_000);

  it('alerts --follow prints an alert as it happens, and stops cleanly on SIGINT', async () => {
    const f = start('follow', ['alerts', '--follow', '--json', '--limit', '1', '--server', http, '--token-file', join(dir, 'token')]);
    const t0 = Date.now();
    const live = await until('a live alert line', () => {
      const lines = f.out.split('\n').filter((l) => l.trim() !== '').map((l) => JSON.parse(l) as { outcome: string; alert: { ruleId: string; lastSeen: string } });
      return lines.find((l) => l.outcome !== 'stored');
    }, 30_000);
    expect(['created', 'folded']).toContain(live.outcome);
    expect(Date.parse(live.alert.lastSeen)).toBeGreaterThan(t0 - 2000); // it happened while following
    f.proc.kill('SIGINT');
    expect(await f.exited).toBe(0);
  }, 60_000);

  it('vm pause: held vCPUs, persisted across an agent restart; vm resume', async () => {
    expect((await agentVm('sim-vm-1'))?.heldEvents).toBe(0);
    const paused = await cli(['vm', 'pause', 'sim-vm-1']);
    expect(paused.code).toBe(0);
    expect(paused.out).toMatch(/^paused sim-vm-1 \([0-9a-f-]{36}\) on host-t$/m);
    // Its one vCPU sent a PAUSE event that the agent holds unanswered: the vCPU is stopped.
    await until('the PAUSE event held', async () => ((await agentVm('sim-vm-1'))?.heldEvents === 1 ? true : undefined), 10_000);
    const uuid = (await cliJson<{ vm: { uuid: string } }>(['vm', 'show', 'sim-vm-1'])).vm.uuid;
    expect(JSON.parse(readFileSync(join(dir, 'state/paused.json'), 'utf8'))).toEqual([uuid]);
    const cmds = await cliJson<{ commands: { kind: string; status: string; vm: string }[] }>(['audit', '--commands']);
    expect(cmds.commands).toContainEqual(expect.objectContaining({ kind: 'pauseControl', status: 'ok', vm: uuid }));

    // Restart the agent: the VM re-attaches and is paused again from the state dir.
    await stop(agent);
    agent = startAgent();
    await until('the new agent to pause it again at re-attach', () => (agent.err.includes('VM re-attached while paused by analysis') ? true : undefined), 30_000);
    await until('the PAUSE event held by the new agent', async () => ((await agentVm('sim-vm-1'))?.heldEvents === 1 ? true : undefined), 10_000);
    expect((await agentVm('sim-vm-0'))?.heldEvents).toBe(0); // only that VM

    // Resume, once analysis sees the VM live again through the new link.
    const resumed = await until('vm resume to succeed', async () => {
      const r = await cli(['vm', 'resume', 'sim-vm-1']);
      return r.code === 0 ? r : undefined;
    }, 30_000, 1000);
    expect(resumed.out).toMatch(/^resumed sim-vm-1 /m);
    await until('the PAUSE event answered', async () => ((await agentVm('sim-vm-1'))?.heldEvents === 0 ? true : undefined), 10_000);
    expect(JSON.parse(readFileSync(join(dir, 'state/paused.json'), 'utf8'))).toEqual([]);
    expect((await cli(['vm', 'pause', 'no-such-vm'])).code).toBe(3);
  }, 120_000);

  it('scan reads guest memory; trace against an agent refusing writes exits 5 (refused) with the refusal', async () => {
    const scan = await cli(['scan', 'sim-vm-0', '--signature', '??', '--range', '0x0:0x2000', '--max-matches', '4']);
    expect(scan.code).toBe(0);
    expect(scan.out).toMatch(/^4 matches \(truncated\) in \d+ bytes of sim-vm-0 via /m);
    expect(scan.out).toMatch(/^GPA\n0x0\n0x1\n0x2\n0x3$/m);
    const sj = await cliJson<{ done: { matches: string[] } }>(['scan', 'sim-vm-0', '--signature', '??', '--range', '0x1000:16', '--max-matches', '2']);
    expect(sj.done.matches).toEqual(['0x1000', '0x1001']);
    expect((await cli(['scan', 'sim-vm-0', '--signature', '??', '--range', 'junk'])).code).toBe(2);
    expect((await cli(['scan', 'no-such-vm', '--signature', '00', '--range', '0:1'])).code).toBe(3);

    // This agent does not allow guest memory writes: trace exits 5 (refused) with the agent's refusal, nothing stays active.
    // (sim-vm-1: sim-vm-0's LSTAR is hijacked by the attack loop, so its KASLR slide cannot be derived.)
    const trace = await cli(['trace', 'sim-vm-1', 'sim_copy_tagged', '--for', '2s']);
    expect(trace.code).toBe(5);
    expect(trace.err).toMatch(/refused: .*--allow-command write-physical/);
    expect(trace.err).not.toMatch(/\n\s+at /); // no stack trace
    const list = await cli(['trace', 'list']);
    expect(list.code).toBe(0);
    expect(list.out).toContain('no active traces');
    expect((await cli(['trace', 'sim-vm-1', 'no_such_function'])).code).toBe(3);
    expect((await cli(['trace', 'stop', 'sim-vm-1', 'sim_copy_tagged'])).code).toBe(3);
    expect((await cli(['trace', 'sim-vm-1', 'sim_copy_tagged', '--args', '9'])).code).toBe(2);
    const help = await cli(['trace', '--help']);
    expect(help.code).toBe(0);
    expect(help.out).toContain('--allow-command write-physical');
  }, 60_000);

  it('audit: the pause and resume above with who asked; --vm, --since, --json; clear errors', async () => {
    const who = process.env.USER ?? 'operator';
    const j = await cliJson<{ events: { action: string; actor: string; principal: string; success: boolean; vm: string; target: string }[] }>(['audit', '--vm', 'sim-vm-1', '--since', '1h']);
    const uuid = (await cliJson<{ vm: { uuid: string } }>(['vm', 'show', 'sim-vm-1'])).vm.uuid;
    const mine = j.events.filter((e) => e.actor === who);
    expect(mine[0]).toMatchObject({ action: 'resume-vm', principal: 'api-token', vm: uuid, target: `vm/${uuid}` }); // newest first
    expect(mine.some((e) => e.action === 'pause-vm' && e.success && e.principal === 'api-token')).toBe(true);
    const t = await cli(['audit', '--vm', 'sim-vm-1']);
    expect(t.code).toBe(0);
    const [head, ...rows] = t.out.trim().split('\n');
    expect(head).toMatch(/^TIME\s+ACTOR\s+VIA\s+ACTION\s+TARGET\s+RESULT$/);
    expect(rows.some((r) => new RegExp(`^\\S+Z\\s+${who}\\s+api-token\\s+resume-vm\\s+${uuid}\\s+\\S+`).test(r))).toBe(true);
    expect(rows.some((r) => new RegExp(`^\\S+Z\\s+${who}\\s+api-token\\s+pause-vm\\s+${uuid}\\s+ok$`).test(r))).toBe(true);
    expect((await cliJson<{ events: unknown[] }>(['audit', '--vm', 'sim-vm-0', '--since', '2000-01-01T00:00:00Z'])).events.every((e) => (e as { vm: string }).vm !== uuid)).toBe(true);
    expect((await cli(['audit', '--since', 'yesterday'])).code).toBe(2);
    expect((await cli(['audit', '--vm', 'no-such-vm'])).code).toBe(3);
    const cmds = await cliJson<{ commands: { kind: string; vm: string }[] }>(['audit', '--commands', '--vm', 'sim-vm-1']);
    expect(cmds.commands.some((c) => c.kind === 'pauseControl' && c.vm === uuid)).toBe(true); // --commands takes a name too
  }, 60_000);

  it('mem read: a hexdump split at the page, ENOENT gaps, --json; bounds and usage errors', async () => {
    const r = await cli(['mem', 'read', 'sim-vm-0', '0x1000ff8', '16']);
    expect(r.code).toBe(0);
    const lines = r.out.trim().split('\n');
    expect(lines[0]).toMatch(/^# sim-vm-0 \([0-9a-f-]{36}\) on host-t: 16 of 16 bytes at 0x1000ff8 via VM_READ_PHYSICAL$/);
    expect(lines.slice(1)).toHaveLength(2); // 8 bytes before the page boundary, 8 after
    expect(lines[1]).toMatch(/^0x000001000ff8 {2}([0-9a-f]{2} ){7}[0-9a-f]{2} {2}\s+\|.{8}\|$/);
    const j = await cliJson<{ chunks: { gpa: string; length: number; data: string }[] }>(['mem', 'read', 'sim-vm-0', '0x1000ff8', '16']);
    expect(j.chunks.map((c) => [c.gpa, c.length])).toEqual([['0x1000ff8', 8], ['0x1001000', 8]]);
    expect(lines[1]!.slice(16, 39).replace(/ /g, '')).toBe(j.chunks[0]!.data);
    const gap = await cli(['mem', 'read', 'sim-vm-0', '0x9fff0', '32']);
    expect(gap.code).toBe(0);
    expect(gap.out).toMatch(/^0x0000000a0000 {2}-- ENOENT: not backed by guest memory \(16 bytes\) --$/m);
    const maxGfn = BigInt((await cliJson<{ vm: { maxGfn: string } }>(['vm', 'show', 'sim-vm-0'])).vm.maxGfn);
    const beyond = await cli(['mem', 'read', 'sim-vm-0', `0x${((maxGfn + 1n) * 4096n).toString(16)}`, '16']);
    expect(beyond.code).toBe(1);
    expect(beyond.err).toContain('max_gfn');
    expect((await cli(['mem', 'read', 'sim-vm-0', '0x1000', '70000'])).code).toBe(2);
    expect((await cli(['mem', 'read', 'sim-vm-0', 'zz', '16'])).code).toBe(2);
    expect((await cli(['mem', 'read', 'no-such-vm', '0x1000', '16'])).code).toBe(3);
    expect((await cli(['mem', 'read', 'sim-vm-0'])).code).toBe(2);
  }, 60_000);

  it('regs: a register table and --json with the MSRs; clear errors', async () => {
    const r = await cli(['regs', 'sim-vm-0', '0']);
    expect(r.code).toBe(0);
    expect(r.out).toMatch(/^# sim-vm-0 \([0-9a-f-]{36}\) vCPU 0, mode 8$/m);
    expect(r.out).toMatch(/^REG\s+VALUE\s+REG\s+VALUE/m);
    expect(r.out).toMatch(/^RSI\s+0x[0-9a-f]+\s+RDI\s+0x[0-9a-f]+/m);
    expect(r.out).toMatch(/^cr3\s+0x[0-9a-f]+$/m);
    expect(r.out).toMatch(/^LSTAR\s+0xffffffff[0-9a-f]+$/m);
    const j = await cliJson<{ vcpu: number; regs: Record<string, string>; msrs: Record<string, string> }>(['regs', 'sim-vm-0', '0']);
    expect(j.vcpu).toBe(0);
    expect(j.msrs.LSTAR).toMatch(/^0xffffffff[0-9a-f]+$/);
    expect(j.regs.rip).toMatch(/^0x[0-9a-f]+$/);
    const bad = await cli(['regs', 'sim-vm-0', '5']);
    expect(bad.code).toBe(1);
    expect(bad.err).toContain('vCPU 5 does not exist');
    expect((await cli(['regs', 'sim-vm-0', 'x'])).code).toBe(2);
    expect((await cli(['regs', 'no-such-vm', '0'])).code).toBe(3);
  }, 60_000);

  it('every operator command has --help with examples and the exit codes', async () => {
    for (const c of [['fleet'], ['vms'], ['vm', 'show'], ['vm', 'label'], ['vm', 'pause'], ['vm', 'resume'], ['alerts'], ['alert', 'show'], ['policy', 'apply'], ['policy', 'show'], ['policy', 'validate'], ['exception', 'add'], ['audit'], ['scan'], ['mem', 'read'], ['regs'], ['trace'], ['trace', 'stop'], ['trace', 'list']]) {
      const out: string[] = [];
      const code = await main([...c, '--help'], { out: (l) => out.push(l), err: (l) => out.push(l) });
      const r = { code, out: out.join('\n') };
      expect(r.code, c.join(' ')).toBe(0);
      expect(r.out).toContain(`Usage: periscope ${c.join(' ')}`);
      expect(r.out).toContain('Examples:');
      expect(r.out).toContain('Exit status: 0 ok, 1 error, 2 usage error, 3 not found, 4 analysis unreachable, 5 refused');
    }
  }, 30_000);
});
