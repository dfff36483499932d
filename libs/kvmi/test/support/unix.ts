/** Real Unix-socket pairs for tests (short paths under /tmp: the 108-byte limit), closed after each test. */
import { randomBytes } from 'node:crypto';
import { rm } from 'node:fs/promises';
import * as net from 'node:net';
import { afterEach } from 'vitest';

const cleanups: Array<() => Promise<void>> = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

let counter = 0;
/** A connected pair: `client` dialled `server`'s listening socket. `quiet` swallows socket errors (tests provoke resets). */
export async function socketPair(prefix: string, opts: { quiet?: boolean } = {}): Promise<{ client: net.Socket; server: net.Socket }> {
  const path = `/tmp/${prefix}-${process.pid}-${++counter}-${randomBytes(3).toString('hex')}.sock`;
  const srv = net.createServer();
  await new Promise<void>((resolve, reject) => {
    srv.once('error', reject);
    srv.listen(path, resolve);
  });
  const accepted = new Promise<net.Socket>((resolve) => srv.once('connection', resolve));
  const client = net.createConnection(path);
  await new Promise<void>((resolve, reject) => {
    client.once('connect', resolve);
    client.once('error', reject);
  });
  const server = await accepted;
  if (opts.quiet) {
    client.on('error', () => undefined);
    server.on('error', () => undefined);
  }
  cleanups.push(async () => {
    client.destroy();
    server.destroy();
    await new Promise<void>((resolve) => srv.close(() => resolve()));
    await rm(path, { force: true });
  });
  return { client, server };
}

/** Register extra cleanup for the current test. */
export function onCleanup(fn: () => Promise<void> | void): void {
  cleanups.push(async () => {
    await fn();
  });
}
