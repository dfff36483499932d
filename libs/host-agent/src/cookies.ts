/**
 * The shared secrets QEMU checks in the handshake (`--cookie-file`). QEMU hashes the raw bytes of its
 * secret object, so a plain file is used byte for byte (no trimming). A JSON object maps VM uuids to
 * secrets, with an optional "*" default.
 */
import { readFileSync } from 'node:fs';

export type CookieLookup = (uuidText: string) => Buffer | undefined;

export class CookieFileError extends Error {
  readonly code = 'bad-cookie-file';
  constructor(message: string) {
    super(message);
    this.name = 'CookieFileError';
  }
}

export function parseCookies(contents: Buffer, source = 'cookie file'): CookieLookup {
  const text = contents.toString('utf8');
  if (text.trimStart().startsWith('{')) {
    let map: unknown;
    try {
      map = JSON.parse(text);
    } catch (e) {
      throw new CookieFileError(`${source}: looks like JSON but does not parse: ${(e as Error).message}`);
    }
    if (typeof map !== 'object' || map === null || Array.isArray(map)) throw new CookieFileError(`${source}: expected an object of uuid → secret`);
    const secrets = new Map<string, Buffer>();
    for (const [k, v] of Object.entries(map)) {
      if (typeof v !== 'string' || v.length === 0) throw new CookieFileError(`${source}: the secret for "${k}" must be a non-empty string`);
      const key = k === '*' ? '*' : k.toLowerCase();
      if (key !== '*' && !/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/.test(key)) {
        throw new CookieFileError(`${source}: "${k}" is not a VM uuid (8-4-4-4-12 hex) or "*"`);
      }
      secrets.set(key, Buffer.from(v, 'utf8'));
    }
    return (uuid) => secrets.get(uuid.toLowerCase()) ?? secrets.get('*');
  }
  if (contents.length === 0) throw new CookieFileError(`${source}: empty secret`);
  const secret = Buffer.from(contents);
  return () => secret;
}

export function loadCookieFile(path: string): CookieLookup {
  let contents: Buffer;
  try {
    contents = readFileSync(path);
  } catch (e) {
    throw new CookieFileError(`cannot read cookie file ${path}: ${(e as Error).message}`);
  }
  return parseCookies(contents, path);
}
