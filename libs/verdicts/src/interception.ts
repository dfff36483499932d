/**
 * What a policy needs intercepted, derived from its rules: the host agent enables these at attach when the
 * policy does not say (`policy.interception` wins when present).
 */
import type { Interception, Policy, VcpuEventKind } from './model.js';

const ALL_CRS = [0, 3, 4] as const;

export function deriveInterception(policy: Policy): Interception {
  if (policy.interception) return policy.interception;
  const kinds = new Set<VcpuEventKind>();
  const crs = new Set<number>();
  const msrs = new Set<number>();
  const consider = (m: { kind?: VcpuEventKind; cr?: readonly number[]; msr?: readonly number[] }) => {
    if (m.kind === undefined) return; // a rule for any kind enables nothing by itself
    kinds.add(m.kind);
    if (m.kind === 'CR') for (const c of m.cr && m.cr.length > 0 ? m.cr : ALL_CRS) crs.add(c);
    if (m.kind === 'MSR') for (const x of m.msr ?? []) msrs.add(x);
  };
  for (const r of policy.rules) consider(r.match);
  for (const [k, a] of Object.entries(policy.defaultActions ?? {})) if (a && a.kind !== 'allow') kinds.add(k as VcpuEventKind);
  const num = (a: number, b: number) => a - b;
  return { events: [...kinds], crs: [...crs].sort(num), msrs: [...msrs].sort(num) };
}
