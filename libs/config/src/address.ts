import { BlockList, isIP, isIPv6 } from 'node:net';

/** A parsed `address`-kind value. */
export type ParsedAddress =
  | { readonly kind: 'unix'; readonly path: string; readonly abstract: boolean }
  | { readonly kind: 'tcp'; readonly host: string; readonly port: number | undefined };

const HOSTNAME =
  /^[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?)*\.?$/;

function parsePort(text: string): number | undefined {
  if (!/^\d{1,5}$/.test(text)) return undefined;
  const port = Number(text);
  return port <= 65535 ? port : undefined;
}

function validHost(host: string): boolean {
  return isIP(host) !== 0 || HOSTNAME.test(host);
}

/**
 * Parses `unix:PATH`, `unix:///abs/path`, `unix-abstract:NAME`, `host:port`, `[ipv6]:port`, and — for
 * host-only checks — a bare `host`, bare IPv6 or `[ipv6]`. Returns undefined when unparseable.
 */
export function parseAddress(address: string): ParsedAddress | undefined {
  if (address.startsWith('unix-abstract:')) {
    const name = address.slice('unix-abstract:'.length);
    return name === '' ? undefined : { kind: 'unix', path: name, abstract: true };
  }
  if (address.startsWith('unix:')) {
    let path = address.slice('unix:'.length);
    if (path.startsWith('//')) {
      // unix://[authority]/path: only an empty authority is meaningful (unix:///abs/path).
      path = path.slice(2);
      if (!path.startsWith('/')) return undefined;
    }
    return path === '' || path.includes('\0') ? undefined : { kind: 'unix', path, abstract: false };
  }
  if (address.startsWith('[')) {
    const close = address.indexOf(']');
    if (close < 0) return undefined;
    const host = address.slice(1, close);
    if (!isIPv6(host)) return undefined;
    const rest = address.slice(close + 1);
    if (rest === '') return { kind: 'tcp', host, port: undefined };
    if (!rest.startsWith(':')) return undefined;
    const port = parsePort(rest.slice(1));
    return port === undefined ? undefined : { kind: 'tcp', host, port };
  }
  const firstColon = address.indexOf(':');
  if (firstColon < 0) return validHost(address) ? { kind: 'tcp', host: address, port: undefined } : undefined;
  if (address.indexOf(':', firstColon + 1) >= 0) {
    // More than one colon and no brackets: only a bare IPv6 literal makes sense.
    return isIPv6(address) ? { kind: 'tcp', host: address, port: undefined } : undefined;
  }
  const host = address.slice(0, firstColon);
  const port = parsePort(address.slice(firstColon + 1));
  if (port === undefined || !validHost(host)) return undefined;
  return { kind: 'tcp', host, port };
}

const loopback = new BlockList();
loopback.addSubnet('127.0.0.0', 8, 'ipv4');
loopback.addAddress('::1', 'ipv6');

/**
 * True when the address cannot be reached from another machine: `unix:` / `unix-abstract:` sockets,
 * `localhost`, 127.0.0.0/8, `::1` (and IPv4-mapped `::ffff:127.x.y.z`). Accepts `host:port`,
 * `[ipv6]:port` or a bare host. Anything unparseable, a wildcard (`0.0.0.0`, `::`) or any other host
 * name is NOT local — the check is conservative.
 */
export function isLocalAddress(address: string): boolean {
  const parsed = parseAddress(address.trim());
  if (parsed === undefined) return false;
  if (parsed.kind === 'unix') return true;
  const host = parsed.host.toLowerCase();
  if (host === 'localhost' || host === 'localhost.') return true;
  const family = isIP(host);
  if (family === 4) return loopback.check(host, 'ipv4');
  if (family === 6) return loopback.check(host, 'ipv6');
  return false;
}

/** Problem description for a value of kind `address` (port required for TCP), or undefined if fine. */
export function addressProblem(value: string): string | undefined {
  const parsed = parseAddress(value);
  if (parsed === undefined || (parsed.kind === 'tcp' && parsed.port === undefined)) {
    return `${JSON.stringify(value)} is not an address (expected host:port, [ipv6]:port, unix:PATH or unix:///abs/path)`;
  }
  return undefined;
}
