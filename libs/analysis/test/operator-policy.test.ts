/**
 * OperatorService.ApplyPolicy over real gRPC: periscope.policy/v1 documents validated (validate_only stores
 * nothing), stored as versions with optimistic concurrency (expected_version), unchanged documents keep their
 * version, and a typed LocalPolicy is refused with a message saying what to send instead.
 */
import { credentials, Metadata, status, type ServiceError } from '@grpc/grpc-js';
import { afterEach, describe, expect, it } from 'vitest';
import { OperatorServiceClient, type ApplyPolicyRequest, type ApplyPolicyResponse } from '@periscope/contracts';
import { Analysis } from '../src/index.js';
import { POLICY_ALL } from './support.js';

const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  while (cleanups.length) await cleanups.pop()!();
});

function apply(c: OperatorServiceClient, req: Partial<ApplyPolicyRequest>, md = new Metadata()): Promise<ApplyPolicyResponse> {
  const full: ApplyPolicyRequest = { expectedVersion: 0n, validateOnly: false, reason: '', description: '', document: '', ...req };
  return new Promise((resolve, reject) => c.applyPolicy(full, md, (e, r) => (e ? reject(e) : resolve(r!))));
}

describe('OperatorService.ApplyPolicy', () => {
  it('validates, versions with expected_version, keeps unchanged documents, refuses typed LocalPolicy', async () => {
    const a = await Analysis.start({ db: 'pglite:memory', grpcListen: '127.0.0.1:0' });
    cleanups.push(() => a.stop());
    const c = new OperatorServiceClient(`127.0.0.1:${a.grpcPort}`, credentials.createInsecure());
    cleanups.push(() => c.close());
    const md = new Metadata();
    md.set('x-periscope-actor', 'alice');

    const bad = await apply(c, { document: 'name: Bad Name\nmodules: {}\n' }).catch((e: ServiceError) => e);
    expect((bad as ServiceError).code).toBe(status.INVALID_ARGUMENT);
    expect((bad as ServiceError).details).toContain('name');

    const checked = await apply(c, { document: POLICY_ALL, validateOnly: true }, md);
    expect(checked.policy?.policy?.policyId).toBe('fleet-default');
    expect(a.currentPolicies()).toHaveLength(0); // validate_only stored nothing

    const v1 = await apply(c, { document: POLICY_ALL, expectedVersion: 0n }, md);
    expect(v1.policy?.policy?.version).toBe(1n);
    expect(v1.policy?.createdBy).toBe('alice');
    expect(a.currentPolicies().map((p) => p.name)).toEqual(['fleet-default']);

    // expected_version 0 means "must not exist yet": a second create is a conflict, not a silent overwrite.
    const again = await apply(c, { document: POLICY_ALL.replace('tables: [IDTR, GDTR]', 'tables: [IDTR]'), expectedVersion: 0n }).catch((e: ServiceError) => e);
    expect((again as ServiceError).code).toBe(status.FAILED_PRECONDITION);
    expect((again as ServiceError).details).toMatch(/already exists \(version 1\)/);

    const stale = await apply(c, { document: POLICY_ALL.replace('tables: [IDTR, GDTR]', 'tables: [IDTR]'), expectedVersion: 7n }).catch((e: ServiceError) => e);
    expect((stale as ServiceError).code).toBe(status.FAILED_PRECONDITION);
    expect((stale as ServiceError).details).toMatch(/at version 1, not 7/);

    const v2 = await apply(c, { document: POLICY_ALL.replace('tables: [IDTR, GDTR]', 'tables: [IDTR]'), expectedVersion: 1n }, md);
    expect(v2.policy?.policy?.version).toBe(2n);
    const same = await apply(c, { document: POLICY_ALL.replace('tables: [IDTR, GDTR]', 'tables: [IDTR]'), expectedVersion: 2n }, md);
    expect(same.policy?.policy?.version).toBe(2n);
    expect(same.warnings[0]).toMatch(/unchanged/);
    expect((await a.store.policyHistory('fleet-default')).length).toBe(2);

    const typed = await apply(c, { policy: { policyId: 'x', version: 1n, rules: [], exceptions: [], maxAskCentralDeadlineMs: 0, maxHeldEvents: 0, verdictsDocument: '' } }).catch((e: ServiceError) => e);
    expect((typed as ServiceError).code).toBe(status.INVALID_ARGUMENT);
    expect((typed as ServiceError).details).toMatch(/ApplyPolicyRequest\.document/);
  });
});
