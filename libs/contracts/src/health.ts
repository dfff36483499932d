/**
 * `grpc.health.v1.Health` without generated code: the two messages are tiny, so they are encoded and
 * decoded here by hand (HealthCheckRequest { string service = 1 }, HealthCheckResponse { ServingStatus
 * status = 1 }).
 */
import { status as GrpcStatus, type sendUnaryData, type ServerUnaryCall, type ServerWritableStream, type ServiceDefinition, type UntypedServiceImplementation } from '@grpc/grpc-js';

export enum ServingStatus {
  UNKNOWN = 0,
  SERVING = 1,
  NOT_SERVING = 2,
  SERVICE_UNKNOWN = 3,
}

export interface HealthCheckRequest {
  service: string;
}
export interface HealthCheckResponse {
  status: ServingStatus;
}

function readVarint(buf: Buffer, pos: number): [number, number] {
  let result = 0;
  let shift = 0;
  for (;;) {
    if (pos >= buf.length) throw new Error('truncated varint');
    const b = buf[pos++]!;
    result += (b & 0x7f) * 2 ** shift;
    if (b < 0x80) return [result, pos];
    shift += 7;
    if (shift > 63) throw new Error('varint too long');
  }
}

function writeVarint(n: number): number[] {
  const out: number[] = [];
  while (n >= 0x80) {
    out.push((n & 0x7f) | 0x80);
    n = Math.floor(n / 128);
  }
  out.push(n);
  return out;
}

export function decodeHealthCheckRequest(buf: Buffer): HealthCheckRequest {
  let pos = 0;
  let service = '';
  while (pos < buf.length) {
    const [tag, p1] = readVarint(buf, pos);
    pos = p1;
    const field = Math.floor(tag / 8);
    const wire = tag & 7;
    if (wire === 0) [, pos] = readVarint(buf, pos);
    else if (wire === 2) {
      const [len, p2] = readVarint(buf, pos);
      if (field === 1) service = buf.subarray(p2, p2 + len).toString('utf8');
      pos = p2 + len;
    } else if (wire === 1) pos += 8;
    else if (wire === 5) pos += 4;
    else throw new Error(`unsupported wire type ${wire}`);
  }
  return { service };
}

export function encodeHealthCheckRequest(r: HealthCheckRequest): Buffer {
  if (!r.service) return Buffer.alloc(0);
  const s = Buffer.from(r.service, 'utf8');
  return Buffer.concat([Buffer.from([0x0a, ...writeVarint(s.length)]), s]);
}

export function encodeHealthCheckResponse(r: HealthCheckResponse): Buffer {
  return r.status ? Buffer.from([0x08, ...writeVarint(r.status)]) : Buffer.alloc(0);
}

export function decodeHealthCheckResponse(buf: Buffer): HealthCheckResponse {
  let pos = 0;
  let status = 0;
  while (pos < buf.length) {
    const [tag, p1] = readVarint(buf, pos);
    pos = p1;
    if ((tag & 7) !== 0) throw new Error('unexpected wire type');
    const [v, p2] = readVarint(buf, pos);
    pos = p2;
    if (tag >> 3 === 1) status = v;
  }
  return { status };
}

export const HealthService = {
  check: {
    path: '/grpc.health.v1.Health/Check',
    requestStream: false,
    responseStream: false,
    requestSerialize: encodeHealthCheckRequest,
    requestDeserialize: decodeHealthCheckRequest,
    responseSerialize: encodeHealthCheckResponse,
    responseDeserialize: decodeHealthCheckResponse,
  },
  watch: {
    path: '/grpc.health.v1.Health/Watch',
    requestStream: false,
    responseStream: true,
    requestSerialize: encodeHealthCheckRequest,
    requestDeserialize: decodeHealthCheckRequest,
    responseSerialize: encodeHealthCheckResponse,
    responseDeserialize: decodeHealthCheckResponse,
  },
} satisfies ServiceDefinition;

/** Health implementation: `''` and the listed services are SERVING while `serving()` is true. */
export function healthImplementation(services: readonly string[], serving: () => boolean): UntypedServiceImplementation {
  const statusOf = (svc: string): ServingStatus | undefined => (svc === '' || services.includes(svc) ? (serving() ? ServingStatus.SERVING : ServingStatus.NOT_SERVING) : undefined);
  return {
    check(call: ServerUnaryCall<HealthCheckRequest, HealthCheckResponse>, cb: sendUnaryData<HealthCheckResponse>) {
      const st = statusOf(call.request.service);
      if (st === undefined) cb({ code: GrpcStatus.NOT_FOUND, details: `unknown service ${call.request.service}` });
      else cb(null, { status: st });
    },
    watch(call: ServerWritableStream<HealthCheckRequest, HealthCheckResponse>) {
      let last = -1;
      const tick = () => {
        const st = statusOf(call.request.service) ?? ServingStatus.SERVICE_UNKNOWN;
        if (st !== last) {
          last = st;
          call.write({ status: st });
        }
      };
      tick();
      const t = setInterval(tick, 1000);
      call.on('cancelled', () => clearInterval(t));
      call.on('close', () => clearInterval(t));
    },
  };
}
