/**
 * Page restrictions, applied once per KVMI session. EPT restrictions live in KVM for as long as the agent's
 * KVMI session with QEMU lasts; an agent whose analysis link dropped (a replica died, a network blip) keeps
 * that session and reconnects — to the same replica or another one — with the same session. Re-sending
 * `VM_SET_PAGE_ACCESS` then would only duplicate what KVM already holds, so the session that was protected
 * is recorded in the database (`vm_page_restrictions`: agent instance + session generation + digest of the
 * pages) and whichever replica sees the VM next skips the commands when the record matches.
 *
 * A new session (QEMU reconnected, the agent restarted: a new agent instance id) or a different set of pages
 * (a new policy, a rebooted guest with another slide) is applied again. The record is written after the
 * commands succeed: a replica killed between the two makes the next replica apply the same pages once more
 * (idempotent in KVM; the only window where a restriction is sent twice).
 */
import { createHash } from 'node:crypto';
import type { Queryable } from './db.js';
import { restrictPages } from './kci.js';
import type { AgentSession, LiveVm } from './link.js';
import { protectedRanges } from './modules.js';
import type { PolicySpec } from './policy.js';
import { pagesOf, type KernelFacts, type ProfileRegistry } from './profiles.js';
import { nowNs } from './schema.js';

export interface RestrictionOutcome {
  /** Pages write-protected for this session. */
  readonly pages: number;
  /** False: the session already had exactly these restrictions (nothing was sent). */
  readonly applied: boolean;
}

export function pagesDigest(pages: readonly bigint[]): string {
  const h = createHash('sha256');
  for (const p of [...pages].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0))) h.update(`${p.toString(16)}\n`);
  return h.digest('hex');
}

/** Write-protect the policy's pages for this VM session unless the database says this session already has them. */
export async function restrictPagesOnce(
  db: Queryable,
  replicaId: string,
  s: AgentSession,
  vm: LiveVm,
  spec: PolicySpec,
  facts: KernelFacts,
  profiles: ProfileRegistry,
): Promise<RestrictionOutcome> {
  const pages = pagesOf([...protectedRanges(spec, facts, profiles).values()].flat());
  const digest = pagesDigest(pages);
  // Without an agent instance id a restarted agent could not be told from a reconnected one: always apply.
  if (s.agentInstanceId) {
    const rows = await db.query<{ agent_instance_id: string; session_generation: bigint; pages_digest: string }>(
      'SELECT agent_instance_id, session_generation, pages_digest FROM vm_page_restrictions WHERE vm_uuid = $1',
      [vm.uuid],
    );
    const r = rows[0];
    if (r && r.agent_instance_id === s.agentInstanceId && r.session_generation === vm.generation && r.pages_digest === digest) {
      return { pages: pages.length, applied: false };
    }
  }
  const n = await restrictPages(s, vm, spec, facts, profiles);
  await db.query(
    `INSERT INTO vm_page_restrictions (vm_uuid, agent_instance_id, session_generation, pages_digest, pages, replica_id, applied_ns)
     VALUES ($1, $2, $3, $4, $5, $6, $7)
     ON CONFLICT (vm_uuid) DO UPDATE SET agent_instance_id = $2, session_generation = $3, pages_digest = $4, pages = $5, replica_id = $6, applied_ns = $7`,
    [vm.uuid, s.agentInstanceId, vm.generation, digest, n, replicaId, nowNs()],
  );
  return { pages: n, applied: true };
}
