/**
 * grpc.health.v1 on the host agent (`healthListen`): a real grpc-js client sees SERVING while the agent
 * runs, NOT_FOUND for a service it does not serve, and the port closes with the agent.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { credentials, makeGenericClientConstructor, type ServiceError } from '@grpc/grpc-js';
import { describe, expect, it } from 'vitest';
import { HealthService, ServingStatus, type HealthCheckRequest, type HealthCheckResponse } from '@periscope/contracts';
import { loadDefaultPolicy } from '@periscope/verdicts';
import { HostAgent, parseCookies } from '../src/index.js';

const HealthClient = makeGenericClientConstructor(HealthService, 'Health');

function check(port: number, service: string): Promise<HealthCheckResponse | ServiceError> {
  const client = new HealthClient(`127.0.0.1:${port}`, credentials.createInsecure());
  return new Promise((resolve) => {
    (client as unknown as { check(r: HealthCheckRequest, o: { deadline: number }, cb: (e: ServiceError | null, r?: HealthCheckResponse) => void): void }).check(
      { service },
      { deadline: Date.now() + 3000 },
      (err, res) => {
        client.close();
        resolve(err ?? res!);
      },
    );
  });
}

describe('host agent grpc.health.v1', () => {
  it('serves SERVING while running and goes away on stop', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'hh-'));
    const agent = new HostAgent({
      hostId: 'h',
      kvmiPaths: [join(dir, 'k.sock')],
      cookies: parseCookies(Buffer.from('x')),
      policy: loadDefaultPolicy(),
      log: () => undefined,
      healthListen: { host: '127.0.0.1', port: 0 },
    });
    await agent.start();
    const port = agent.healthPort!;
    expect(port).toBeGreaterThan(0);
    expect(await check(port, '')).toEqual({ status: ServingStatus.SERVING });
    expect(await check(port, 'periscope.agent')).toEqual({ status: ServingStatus.SERVING });
    expect((await check(port, 'no.such.Service')) as ServiceError).toMatchObject({ code: 5 }); // NOT_FOUND
    await agent.stop(200);
    const after = await check(port, '');
    expect((after as ServiceError).code).toBe(14); // UNAVAILABLE: nothing listens any more
    rmSync(dir, { recursive: true, force: true });
  });
});
