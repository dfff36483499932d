/**
 * `OperatorService.WatchAlerts`: the live alert stream over gRPC (the HTTP API has `/v1/alerts/stream`).
 * Stored alerts after `after_seq` are replayed first (oldest first), then every new or folded alert is
 * written as it happens; alerts raised during the replay are buffered and written after it, once. The
 * stream ends when the caller cancels or the server stops.
 */
import { status as GrpcStatus, type ServerWritableStream } from '@grpc/grpc-js';
import { uuidFromBytes, type WatchAlertsRequest, type WatchAlertsResponse } from '@periscope/contracts';
import type { Analysis } from './service.js';
import { SEVERITY_NAMES, severityNumber, type AlertFilter, type AlertRecord } from './store.js';

/** `live` holds the open streams: the server ends them when it stops (a watch never ends by itself). */
export function watchAlertsImplementation(a: Analysis, authorized: (authHeader: string | undefined) => boolean, toProto: (x: AlertRecord) => WatchAlertsResponse['alert'], live: Set<{ end(): void }>) {
  return (call: ServerWritableStream<WatchAlertsRequest, WatchAlertsResponse>): void => {
    const auth = call.metadata.get('authorization')[0];
    if (!authorized(typeof auth === 'string' ? auth : undefined)) {
      call.emit('error', { code: GrpcStatus.UNAUTHENTICATED, details: 'a bearer token is required (authorization: Bearer TOKEN)' });
      return;
    }
    const req = call.request;
    const f: AlertFilter = {};
    if (req.minSeverity) f.minSeverity = SEVERITY_NAMES[Math.min(req.minSeverity, SEVERITY_NAMES.length) - 1]!;
    if (req.hostId) f.host = req.hostId;
    if (req.vmUuid.length) {
      try {
        f.vm = uuidFromBytes(req.vmUuid);
      } catch {
        call.emit('error', { code: GrpcStatus.INVALID_ARGUMENT, details: `vm_uuid: ${req.vmUuid.length} bytes, expected 16` });
        return;
      }
    }
    const matches = (x: AlertRecord): boolean =>
      (!f.minSeverity || severityNumber(x.severity) >= severityNumber(f.minSeverity)) && (!f.host || x.hostId === f.host) && (!f.vm || x.vm.uuid === f.vm);
    let open = true;
    let replaying = true;
    const buffered: { alert: AlertRecord; outcome: string }[] = [];
    const write = (x: AlertRecord, outcome: string): void => {
      if (open) call.write({ alert: toProto(x), outcome });
    };
    const off = a.onAlert((n) => {
      if (!matches(n.alert)) return;
      if (replaying) buffered.push(n);
      else write(n.alert, n.outcome);
    });
    const done = (): void => {
      if (!open) return;
      open = false;
      live.delete(call);
      off();
    };
    live.add(call);
    call.on('cancelled', done);
    call.on('close', done);
    call.on('error', done);
    void (async () => {
      let last = 0n;
      if (req.afterSeq > 0n) {
        let after = req.afterSeq;
        for (;;) {
          const page = await a.store.listAlerts({ ...f, after, limit: 500 });
          for (const x of page) write(x, 'stored');
          if (page.length) after = last = page[page.length - 1]!.seq;
          if (page.length < 500) break;
        }
      }
      replaying = false;
      for (const n of buffered.splice(0)) if (n.alert.seq > last || n.outcome === 'folded') write(n.alert, n.outcome);
    })().catch((e: unknown) => {
      done();
      call.emit('error', { code: GrpcStatus.INTERNAL, details: (e as Error).message });
    });
  };
}
