/**
 * Test support: a fresh database per test file on both drivers, a scripted agent speaking LinkRequest
 * over a real grpc-js client (a legitimate test peer of the contract), and small waiting helpers.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { credentials, makeGenericClientConstructor, type ClientDuplexStream } from '@grpc/grpc-js';
import pg from 'pg';
import {
  AgentLinkServiceClient,
  CommandStatus,
  LinkRequest,
  uuidToBytes,
  type CommandResult,
  type KvmiCommand,
  type LinkResponse,
} from '@periscope/contracts';
import { linuxSimProfile } from '@periscope/simulator';
import { HealthService, migrate, openDb } from '../src/index.js';

export const PG_DSN = process.env['PERISCOPE_TEST_POSTGRES'] || 'postgres://postgres@127.0.0.1:5432/postgres';

export interface DbVariant {
  readonly name: 'pglite' | 'postgres';
  /** Opens a fresh database; returns its URL and a drop function. */
  create(): Promise<{ url: string; drop: () => Promise<void> }>;
}

let pgAvailable: Promise<boolean> | undefined;
/** Whether the test PostgreSQL (PG_DSN) answers; asked once per test file. */
export async function postgresAnswers(): Promise<boolean> {
  pgAvailable ??= (async () => {
    const c = new pg.Client({ connectionString: PG_DSN, connectionTimeoutMillis: 2000 });
    try {
      await c.connect();
      await c.query('select 1');
      return true;
    } catch {
      return false;
    } finally {
      await c.end().catch(() => undefined);
    }
  })();
  return pgAvailable;
}

const pgliteVariant: DbVariant = { name: 'pglite', create: async () => ({ url: 'pglite:memory', drop: async () => undefined }) };

const postgresVariant: DbVariant = {
  name: 'postgres',
  async create() {
    if (!(await postgresAnswers())) {
      if (process.env['PERISCOPE_TEST_POSTGRES']) throw new Error(`PERISCOPE_TEST_POSTGRES=${PG_DSN} does not answer`);
      console.warn(`note: no PostgreSQL answers at ${PG_DSN}: the PostgreSQL variant runs on PGlite`);
      return pgliteVariant.create();
    }
    return freshPostgresDatabase();
  },
};

/** A fresh database on the test PostgreSQL: periscope_test_<random>, dropped (FORCE) by `drop`. */
export async function freshPostgresDatabase(): Promise<{ url: string; drop: () => Promise<void> }> {
  const name = `periscope_test_${Date.now().toString(36)}_${randomBytes(4).toString('hex')}`;
  const admin = new pg.Client({ connectionString: PG_DSN });
  await admin.connect();
  await admin.query(`CREATE DATABASE ${name}`);
  await admin.end();
  const u = new URL(PG_DSN);
  u.pathname = `/${name}`;
  return {
    url: u.toString(),
    drop: async () => {
      const c = new pg.Client({ connectionString: PG_DSN });
      await c.connect();
      await c.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`);
      await c.end();
    },
  };
}

/** `periscope analysis` as a real process (bin/periscope, the built tree). */
export interface ReplicaProcess {
  readonly id: string;
  readonly child: ChildProcess;
  readonly grpc: string;
  readonly http: string;
  /** The last 20,000 characters of its stderr. */
  stderr: string;
}

const PERISCOPE_BIN = join(dirname(fileURLToPath(import.meta.url)), '../../../bin/periscope');

/** Start an analysis replica process on `dbUrl` importing `policyDir`; resolves once it printed its addresses. */
export async function startReplicaProcess(id: string, dbUrl: string, policyDir: string): Promise<ReplicaProcess> {
  const child = spawn(
    process.execPath,
    [PERISCOPE_BIN, 'analysis', '--db', dbUrl, '--listen', '127.0.0.1:0', '--http', '127.0.0.1:0', '--replica-id', id, '--policy', policyDir, '--log-level', 'warn'],
    { stdio: ['ignore', 'pipe', 'pipe'] },
  );
  let stdout = '';
  const p: { stderr: string } = { stderr: '' };
  child.stderr!.on('data', (c: Buffer) => (p.stderr = (p.stderr + c.toString()).slice(-20_000)));
  child.stdout!.on('data', (c: Buffer) => (stdout += c.toString()));
  await until(() => stdout.includes('\n') || child.exitCode !== null, 60_000, `replica ${id} started`);
  if (child.exitCode !== null) throw new Error(`replica ${id} exited ${child.exitCode}: ${p.stderr}`);
  const info = JSON.parse(stdout.split('\n')[0]!) as { grpc: string; http: string; replica: string };
  if (info.replica !== id) throw new Error(`replica ${id} reports replica id ${info.replica}`);
  return Object.assign(p, { id, child, grpc: info.grpc, http: info.http });
}

/** Empty every table (tests in one file share their database). */
export async function resetDatabase(url: string): Promise<void> {
  if (!url.startsWith('postgres')) return;
  const db = await openDb(url);
  try {
    await migrate(db);
    await db.exec('TRUNCATE hosts, vms, vcpus, event_counts, verdict_counts, losses, alert_detections, alerts, policies, exceptions, commands, heki_vms, replicas, routed_operations, vm_page_restrictions');
  } finally {
    await db.close();
  }
}

export const DB_VARIANTS: readonly DbVariant[] = [pgliteVariant, postgresVariant];

export async function until(cond: () => boolean | Promise<boolean>, ms = 10_000, what = 'condition'): Promise<void> {
  const t0 = Date.now();
  while (!(await cond())) {
    if (Date.now() - t0 > ms) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

type Msg = NonNullable<LinkResponse['message']>;
type MsgValue<K> = Extract<Msg, { $case: K }> extends { value: infer V } ? V : never;
export type CommandCase = NonNullable<KvmiCommand['command']>;
export type CommandAnswer = Omit<CommandResult, 'correlationId' | 'vmUuid' | 'sessionGeneration' | 'vcpu' | 'latencyNs' | 'kvmError' | 'message'> & Partial<Pick<CommandResult, 'kvmError' | 'message'>>;

/**
 * A scripted host agent: sends what the test says, records every response, answers commands with
 * `onCommand` (default: OK without data).
 */
export class ScriptedAgent {
  readonly client: AgentLinkServiceClient;
  readonly stream: ClientDuplexStream<LinkRequest, LinkResponse>;
  readonly received: LinkResponse[] = [];
  private seq = 0n;
  ended = false;
  onCommand: (c: KvmiCommand) => CommandAnswer | Promise<CommandAnswer> = () => ({ status: CommandStatus.COMMAND_STATUS_OK });

  constructor(address: string, readonly hostId: string) {
    this.client = new AgentLinkServiceClient(address, credentials.createInsecure());
    this.stream = this.client.link();
    this.stream.on('data', (r: LinkResponse) => {
      this.received.push(r);
      if (r.message?.$case === 'command') void this.answer(r.message.value);
    });
    this.stream.on('error', () => (this.ended = true));
    this.stream.on('end', () => (this.ended = true));
  }

  private async answer(c: KvmiCommand): Promise<void> {
    const a = await this.onCommand(c);
    this.send({ $case: 'commandResult', value: { correlationId: c.correlationId, vmUuid: c.vmUuid, sessionGeneration: c.sessionGeneration, vcpu: c.vcpu, latencyNs: 1000n, kvmError: 0, message: '', ...a } });
  }

  send(message: NonNullable<LinkRequest['message']>): void {
    this.seq += 1n;
    this.stream.write(LinkRequest.fromPartial({ streamSeq: this.seq, message }) as LinkRequest);
  }

  hello(instance = 'inst-1'): void {
    this.send({ $case: 'hello', value: { hostId: this.hostId, agentVersion: 'test', agentInstanceId: instance, startedUnixNs: 1n, capabilities: [3, 4], activePolicyId: '', activePolicyVersion: 0n } });
  }

  attach(vm: { uuid: string; name: string; generation?: bigint; vcpus?: number; startTimeMs?: bigint }): void {
    this.send({
      $case: 'vmAttached',
      value: {
        hostId: this.hostId, vmUuid: uuidToBytes(vm.uuid), sessionGeneration: vm.generation ?? 1n, name: vm.name, qemuStartTimeMs: vm.startTimeMs ?? 1000n,
        vcpuCount: vm.vcpus ?? 2, maxGfn: 0x2000n, dialect: 1, kvmiVersion: { version: 1, maxMsgSize: 4096, features: { singlestep: true } }, allowedCommands: [1, 10, 13, 24], allowedEvents: [5, 9, 10], attachedUnixNs: 5n,
      },
    });
  }

  of<K extends Msg['$case']>(k: K): MsgValue<K>[] {
    const out: MsgValue<K>[] = [];
    for (const r of this.received) if (r.message?.$case === k) out.push(r.message.value as MsgValue<K>);
    return out;
  }

  close(): void {
    this.stream.end();
    this.client.close();
  }
}

/** A fake guest for the scripted agent, consistent with the linux-sim profile at a given slide. */
export function fakeGuest(slide: bigint, opts: { allOnesOnVcpu0?: boolean } = {}) {
  const p = linuxSimProfile();
  const textBase = p.defaultTextBase + slide;
  const textPhys = textBase - p.kernelMap;
  const entry = textBase + p.offsetOf(p.syscallEntry.symbol);
  const commands: KvmiCommand[] = [];
  const answer = (c: KvmiCommand): CommandAnswer => {
    commands.push(c);
    const cmd = c.command!;
    switch (cmd.$case) {
      case 'getRegisters':
        return {
          status: CommandStatus.COMMAND_STATUS_OK,
          result: { $case: 'getRegisters', value: { mode: 8, msrs: cmd.value.msrIndexes.map((index) => ({ index, data: index === 0xc0000082 ? entry : 0n })), sregs: { cs: { base: 0n, limit: 0, selector: 0x10, type: 11, present: true, dpl: c.vcpu === 0 && opts.allOnesOnVcpu0 ? 3 : 0, db: false, s: true, l: true, g: true, avl: false, unusable: false } } as never } },
        };
      case 'translateGva':
        if (opts.allOnesOnVcpu0 && c.vcpu === 0) return { status: CommandStatus.COMMAND_STATUS_OK, result: { $case: 'translateGva', value: { gpa: 0xffff_ffff_ffff_ffffn } } };
        return { status: CommandStatus.COMMAND_STATUS_OK, result: { $case: 'translateGva', value: { gpa: cmd.value.gva - p.kernelMap } } };
      case 'readPhysical': {
        const off = cmd.value.gpa - (entry - p.kernelMap);
        const data = off === 0n ? Buffer.from(p.syscallEntry.signature.subarray(0, cmd.value.size)) : Buffer.alloc(cmd.value.size);
        return { status: CommandStatus.COMMAND_STATUS_OK, result: { $case: 'readPhysical', value: { data } } };
      }
      default:
        return { status: CommandStatus.COMMAND_STATUS_OK };
    }
  };
  return { profile: p, textBase, textPhys, entry, commands, answer };
}

export function healthClient(address: string) {
  const Ctor = makeGenericClientConstructor(HealthService, 'grpc.health.v1.Health');
  const c = new Ctor(address, credentials.createInsecure()) as unknown as {
    check(req: { service: string }, cb: (err: Error | null, res?: { status: number }) => void): void;
    close(): void;
  };
  return {
    check: (service: string) => new Promise<number>((resolve, reject) => c.check({ service }, (err, res) => (err ? reject(err) : resolve(res!.status)))),
    close: () => c.close(),
  };
}

export async function http(base: string, path: string, init: RequestInit = {}): Promise<{ status: number; body: Record<string, unknown> & { error?: { code: string; message: string; issues: { path: string; message: string }[] } } }> {
  const res = await fetch(`${base}${path}`, init);
  const text = await res.text();
  return { status: res.status, body: text ? (JSON.parse(text) as Record<string, unknown>) : {} };
}

export const POLICY_ALL = `
format: periscope.policy/v1
name: fleet-default
description: every module on every VM
select: {}
modules:
  kernel-code-integrity: { action: deny }
  cr-pinning: { action: deny, cr0: [WP], cr4: [SMEP, SMAP] }
  syscall-msrs: { action: deny }
  descriptor-tables: { action: deny, tables: [IDTR, GDTR] }
`;
