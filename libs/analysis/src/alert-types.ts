/**
 * The alert as stored (`AlertRecord`) and as the HTTP API, the live streams and the sinks show it
 * (`AlertJson`, from `alertJson` in sinks.ts). Types only and no imports, so the browser dashboard can
 * share them (`@periscope/analysis/alert-types`) instead of mirroring them by hand.
 */

export type SeverityName = 'info' | 'low' | 'medium' | 'high' | 'critical';

export interface AlertEvidence {
  /** What was attempted: the event kind and its data (64-bit values as 0x-hex). */
  attempt: Record<string, unknown>;
  registers: Record<string, string>;
  sregs: Record<string, string>;
  summary: string;
  attributes: Record<string, string>;
  session: string;
  seqs: number[];
}

export interface AlertRecord {
  id: string;
  seq: bigint;
  state: 'open' | 'acknowledged' | 'resolved';
  severity: SeverityName;
  title: string;
  description: string;
  technique: { id: string; name: string };
  module: string;
  ruleId: string;
  exceptionId: string;
  policy: { name: string; localId: string; version: bigint };
  hostId: string;
  vm: { uuid: string; name: string };
  vcpu: number | null;
  action: string;
  tier: string;
  evidence: AlertEvidence;
  count: bigint;
  firstSeenNs: bigint;
  lastSeenNs: bigint;
  createdNs: bigint;
  acknowledgedBy: string;
  acknowledgedNs: bigint;
  ackComment: string;
  detectionIds?: string[];
}

/** A value after `JSON.stringify` with the service's replacer: `bigint` becomes a decimal string. */
export type Jsonified<T> = T extends bigint
  ? string
  : T extends (infer U)[]
    ? Jsonified<U>[]
    : T extends object
      ? { [K in keyof T]: Jsonified<T[K]> }
      : T;

/** The alert in the API's JSON: Unix-ns times as decimal strings, plus ISO-8601 `firstSeen` / `lastSeen`. */
export type AlertJson = Jsonified<AlertRecord> & { firstSeen: string; lastSeen: string };
