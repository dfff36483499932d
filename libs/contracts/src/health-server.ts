/**
 * `--health-listen HOST:PORT`: a plaintext gRPC server that serves only `grpc.health.v1.Health`. Kubernetes
 * gRPC probes cannot present a client certificate, so in fleet mode (mTLS on the main port) the kubelet
 * probes this port instead. It exposes nothing but the serving status.
 */
import { Server, ServerCredentials } from '@grpc/grpc-js';
import { healthImplementation, HealthService } from './health.js';

export interface HealthServer {
  readonly port: number;
  readonly address: string;
  close(): Promise<void>;
}

export async function startHealthServer(listen: { host: string; port: number }, services: readonly string[], serving: () => boolean): Promise<HealthServer> {
  const server = new Server();
  server.addService(HealthService, healthImplementation(services, serving));
  const host = listen.host.includes(':') ? `[${listen.host}]` : listen.host;
  const port = await new Promise<number>((resolve, reject) => server.bindAsync(`${host}:${listen.port}`, ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))));
  return {
    port,
    address: `${listen.host}:${port}`,
    close: () =>
      new Promise<void>((resolve) => {
        server.tryShutdown(() => resolve());
        setTimeout(() => {
          server.forceShutdown();
          resolve();
        }, 1000).unref();
      }),
  };
}
