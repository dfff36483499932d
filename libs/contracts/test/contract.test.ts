import { spawnSync } from 'node:child_process';
import { mkdtempSync, mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  Server,
  ServerCredentials,
  credentials,
  type ServerDuplexStream,
} from '@grpc/grpc-js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  AgentLinkServiceClient,
  AgentLinkServiceService,
  EventAction,
  LinkRequest,
  LinkResponse,
  type AgentLinkServiceServer,
  type KvmiEvent,
  U64_MAX,
  uuidToBytes,
} from '../src/index.js';

// 2^64 - 1 does not survive a signed 64-bit path (it becomes -1) and 2^53 + 1 does not survive a double
// (it becomes 2^53): only an exact unsigned 64-bit bigint path carries both unchanged.
const ALL_ONES = 0xffff_ffff_ffff_ffffn;
const ABOVE_DOUBLE = 2n ** 53n + 1n;

const REPO_ROOT = fileURLToPath(new URL('../../../', import.meta.url));
const BUF = join(REPO_ROOT, 'node_modules', '.bin', 'buf');
const VM_UUID = uuidToBytes('6f1c2a8e-3b4d-4e5f-8a9b-0c1d2e3f4a5b');

function eventBatch(): LinkRequest {
  const context = { hostId: 'host-a', vmUuid: VM_UUID, sessionGeneration: ALL_ONES, vcpu: 3 };
  return LinkRequest.fromPartial({
    streamSeq: 2n,
    message: {
      $case: 'eventBatch',
      value: {
        events: [
          {
            ...context,
            seq: 41,
            regs: { rax: ALL_ONES, rip: ABOVE_DOUBLE, rflags: 2n },
            sregs: { cr3: ABOVE_DOUBLE, interruptBitmap: [ALL_ONES, 0n, ABOVE_DOUBLE, 1n] },
            payload: { $case: 'pf', value: { gpa: ABOVE_DOUBLE, gva: ALL_ONES, access: 2 } },
          },
          {
            ...context,
            seq: 42,
            regs: { rax: ABOVE_DOUBLE, rip: ALL_ONES },
            payload: { $case: 'breakpoint', value: { gpa: ALL_ONES, insnLen: 1 } },
          },
        ],
      },
    },
  });
}

describe('AgentLinkService over real grpc-js', () => {
  let server: Server;
  let client: AgentLinkServiceClient;
  const receivedByServer: LinkRequest[] = [];

  beforeAll(async () => {
    // The analysis side: records what the agent sent and, for each event batch, answers with commands and
    // a verdict built from the values it DECODED (so the reverse direction re-encodes them).
    const impl: AgentLinkServiceServer = {
      link(call: ServerDuplexStream<LinkRequest, LinkResponse>) {
        let seq = 0n;
        const send = (message: Parameters<typeof LinkResponse.fromPartial>[0]['message']) => {
          seq += 1n;
          call.write(LinkResponse.fromPartial({ streamSeq: seq, message }));
        };
        call.on('data', (request: LinkRequest) => {
          receivedByServer.push(request);
          if (request.message?.$case !== 'eventBatch') return;
          const [pf, bp] = request.message.value.events;
          if (pf?.payload?.$case !== 'pf' || bp?.payload?.$case !== 'breakpoint') {
            call.destroy(new Error('unexpected batch shape'));
            return;
          }
          send({
            $case: 'command',
            value: {
              correlationId: ALL_ONES,
              vmUuid: pf.vmUuid,
              sessionGeneration: pf.sessionGeneration,
              vcpu: pf.vcpu,
              command: { $case: 'setRegisters', value: { regs: pf.regs } },
            },
          });
          send({
            $case: 'command',
            value: {
              correlationId: ABOVE_DOUBLE,
              vmUuid: bp.vmUuid,
              sessionGeneration: bp.sessionGeneration,
              command: {
                $case: 'setPageAccess',
                value: {
                  entries: [
                    { gpa: pf.payload.value.gpa, allowedAccess: 5 },
                    { gpa: bp.payload.value.gpa, allowedAccess: 7 },
                  ],
                },
              },
            },
          });
          send({
            $case: 'verdict',
            value: {
              vmUuid: pf.vmUuid,
              sessionGeneration: pf.sessionGeneration,
              seq: pf.seq,
              decision: {
                action: EventAction.EVENT_ACTION_CONTINUE,
                replyValue: { policy: { $case: 'fixed', value: pf.regs?.rax ?? 0n } },
              },
            },
          });
        });
        call.on('end', () => call.end());
      },
    };
    server = new Server();
    server.addService(AgentLinkServiceService, impl);
    const port = await new Promise<number>((resolve, reject) => {
      server.bindAsync('127.0.0.1:0', ServerCredentials.createInsecure(), (error, boundPort) =>
        error ? reject(error) : resolve(boundPort),
      );
    });
    client = new AgentLinkServiceClient(`127.0.0.1:${port}`, credentials.createInsecure());
  });

  afterAll(async () => {
    client?.close();
    await new Promise<void>((resolve) => (server ? server.tryShutdown(() => resolve()) : resolve()));
  });

  it('carries 2^64-1 and 2^53+1 exactly, agent -> analysis and analysis -> agent', async () => {
    const call = client.link();
    const responses: LinkResponse[] = [];
    const done = new Promise<void>((resolve, reject) => {
      call.on('data', (response: LinkResponse) => {
        responses.push(response);
        if (responses.length === 3) call.end();
      });
      call.on('error', reject);
      call.on('end', resolve);
    });
    call.write(
      LinkRequest.fromPartial({
        streamSeq: 1n,
        message: { $case: 'hello', value: { hostId: 'host-a', agentVersion: '0.1.0', startedUnixNs: ALL_ONES } },
      }),
    );
    call.write(eventBatch());
    await done;

    // Agent -> analysis: what the server decoded.
    expect(receivedByServer.map((r) => r.streamSeq)).toStrictEqual([1n, 2n]);
    const hello = receivedByServer[0]?.message;
    expect(hello?.$case === 'hello' && hello.value.startedUnixNs).toBe(ALL_ONES);
    const batch = receivedByServer[1]?.message;
    if (batch?.$case !== 'eventBatch') throw new Error(`expected an event batch, got ${batch?.$case}`);
    const [pf, bp] = batch.value.events as [KvmiEvent, KvmiEvent];
    expect(pf.sessionGeneration).toBe(ALL_ONES);
    expect(pf.regs?.rax).toBe(ALL_ONES);
    expect(pf.regs?.rip).toBe(ABOVE_DOUBLE);
    expect(pf.sregs?.cr3).toBe(ABOVE_DOUBLE);
    expect(pf.sregs?.interruptBitmap).toStrictEqual([ALL_ONES, 0n, ABOVE_DOUBLE, 1n]);
    expect(pf.payload).toStrictEqual({ $case: 'pf', value: { gva: ALL_ONES, gpa: ABOVE_DOUBLE, access: 2 } });
    expect(bp.regs?.rax).toBe(ABOVE_DOUBLE);
    expect(bp.regs?.rip).toBe(ALL_ONES);
    expect(bp.payload).toStrictEqual({ $case: 'breakpoint', value: { gpa: ALL_ONES, insnLen: 1 } });
    expect(Buffer.compare(pf.vmUuid, VM_UUID)).toBe(0);

    // Analysis -> agent: what the client decoded.
    expect(responses.map((r) => r.streamSeq)).toStrictEqual([1n, 2n, 3n]);
    const [setRegs, setAccess, verdict] = responses.map((r) => r.message);
    if (setRegs?.$case !== 'command' || setRegs.value.command?.$case !== 'setRegisters') {
      throw new Error('expected set_registers');
    }
    expect(setRegs.value.correlationId).toBe(ALL_ONES);
    expect(setRegs.value.sessionGeneration).toBe(ALL_ONES);
    expect(setRegs.value.vcpu).toBe(3);
    expect(setRegs.value.command.value.regs?.rax).toBe(ALL_ONES);
    expect(setRegs.value.command.value.regs?.rip).toBe(ABOVE_DOUBLE);
    expect(setRegs.value.command.value.regs?.rflags).toBe(2n);
    if (setAccess?.$case !== 'command' || setAccess.value.command?.$case !== 'setPageAccess') {
      throw new Error('expected set_page_access');
    }
    expect(setAccess.value.correlationId).toBe(ABOVE_DOUBLE);
    expect(setAccess.value.command.value.entries).toStrictEqual([
      { gpa: ABOVE_DOUBLE, allowedAccess: 5 },
      { gpa: ALL_ONES, allowedAccess: 7 },
    ]);
    if (verdict?.$case !== 'verdict') throw new Error('expected a verdict');
    expect(verdict.value.seq).toBe(41);
    expect(verdict.value.decision?.action).toBe(EventAction.EVENT_ACTION_CONTINUE);
    expect(verdict.value.decision?.replyValue?.policy).toStrictEqual({ $case: 'fixed', value: ALL_ONES });
  });

  it('refuses to encode a value that does not fit uint64', () => {
    expect(U64_MAX).toBe(ALL_ONES);
    const tooBig = LinkRequest.fromPartial({ streamSeq: U64_MAX + 1n });
    expect(() => LinkRequest.encode(tooBig)).toThrow(/uint64/);
    const negative = LinkRequest.fromPartial({ streamSeq: -1n });
    expect(() => LinkRequest.encode(negative)).toThrow(/uint64/);
  });
});

describe('buf lint', () => {
  it('passes on protos/ with the repository buf.yaml', () => {
    const result = spawnSync(BUF, ['lint'], { cwd: REPO_ROOT, encoding: 'utf8', timeout: 60_000 });
    expect(result.error).toBeUndefined();
    expect(result.stdout + result.stderr).toBe('');
    expect(result.status).toBe(0);
  }, 60_000);

  it('fails on a proto that breaks the STANDARD rules (control: the linter really runs)', () => {
    const dir = mkdtempSync(join(tmpdir(), 'periscope-buf-lint-'));
    try {
      mkdirSync(join(dir, 'bad', 'v1'), { recursive: true });
      writeFileSync(join(dir, 'buf.yaml'), 'version: v2\nlint:\n  use: [STANDARD]\n');
      writeFileSync(
        join(dir, 'bad', 'v1', 'bad.proto'),
        'syntax = "proto3";\npackage bad.v1;\nenum Kind { FIRST = 0; }\nservice Agent { rpc Go(Kind2) returns (Kind2); }\nmessage Kind2 {}\n',
      );
      const result = spawnSync(BUF, ['lint', '--error-format=json'], { cwd: dir, encoding: 'utf8', timeout: 60_000 });
      expect(result.error).toBeUndefined();
      expect(result.status).not.toBe(0);
      const rules = result.stdout
        .split('\n')
        .filter((line) => line.trim() !== '')
        .map((line) => (JSON.parse(line) as { type: string }).type);
      expect(rules).toContain('ENUM_ZERO_VALUE_SUFFIX');
      expect(rules).toContain('SERVICE_SUFFIX');
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }, 60_000);
});
