/**
 * Heki state in the agent's local API: `/v1/vms` entries carry `heki` (the VM's Heki state, or null when
 * its VMM never registered it), and VMs known only to the Heki sink (no KVMI connection) are listed too,
 * with `state: 'heki-only'`.
 */
import type { HekiSink, HekiVmState } from './sink.js';

/** JSON shape of a VM's Heki state (bigints as hex strings, like register values elsewhere). */
export function hekiJson(s: HekiVmState): Record<string, unknown> {
  const hex = (v: bigint): string => `0x${v.toString(16)}`;
  return {
    status: s.status,
    hostHasHeki: s.hostHasHeki,
    configureReasons: s.configureReasons,
    denialReasons: s.denialReasons,
    pinnedCr0: hex(s.pinnedCr0),
    pinnedCr4: hex(s.pinnedCr4),
    ...(s.firstPinAtMs !== undefined ? { firstPinAt: new Date(s.firstPinAtMs).toISOString() } : {}),
    ...(s.lastPinAtMs !== undefined ? { lastPinAt: new Date(s.lastPinAtMs).toISOString() } : {}),
    configureExits: s.configureExits,
    denials: s.denials,
    stops: s.stops,
    ...(s.lastDenial
      ? {
          lastDenial: {
            vcpu: s.lastDenial.vcpu,
            cr: s.lastDenial.cr,
            attemptedValue: hex(s.lastDenial.attemptedValue),
            clearedPins: hex(s.lastDenial.clearedPins),
            rip: hex(s.lastDenial.rip),
            completion: s.lastDenial.completion,
            decidedBy: s.lastDenial.decidedBy,
            detectionId: s.lastDenial.detectionId,
          },
        }
      : {}),
  };
}

/** Add `heki` to each attached VM's summary and list the VMs only the Heki sink knows. */
export function vmsWithHeki(vms: ReadonlyArray<Record<string, unknown>>, sink: HekiSink | undefined): Array<Record<string, unknown>> {
  if (!sink) return [...vms];
  const known = new Set<string>();
  const out: Array<Record<string, unknown>> = vms.map((v) => {
    const uuid = String(v['uuid']);
    known.add(uuid);
    const s = sink.vm(uuid);
    return { ...v, heki: s ? hekiJson(s) : null };
  });
  for (const s of sink.vms()) if (!known.has(s.uuid)) out.push({ uuid: s.uuid, name: s.name, state: 'heki-only', heki: hekiJson(s) });
  return out;
}

/** One VM for `/v1/vms/{uuid}`: the attached summary with `heki`, or the Heki-only entry, or undefined. */
export function vmWithHeki(summary: Record<string, unknown> | undefined, uuid: string, sink: HekiSink | undefined): Record<string, unknown> | undefined {
  const s = sink?.vm(uuid);
  if (summary) return sink ? { ...summary, heki: s ? hekiJson(s) : null } : summary;
  return s ? { uuid, name: s.name, state: 'heki-only', heki: hekiJson(s) } : undefined;
}
