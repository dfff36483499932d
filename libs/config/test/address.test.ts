import { describe, expect, it } from 'vitest';
import { isLocalAddress, parseAddress } from '../src/index.js';

describe('isLocalAddress', () => {
  it.each([
    '127.0.0.1:8080',
    '127.255.255.254:1',
    '127.0.0.1',
    'localhost:50051',
    'LOCALHOST',
    'localhost',
    '[::1]:443',
    '::1',
    '[0:0:0:0:0:0:0:1]:443',
    '[::ffff:127.0.0.1]:80',
    'unix:/run/periscope.sock',
    'unix:///run/periscope.sock',
    'unix:relative.sock',
    'unix-abstract:periscope',
  ])('%s is local', (a) => expect(isLocalAddress(a)).toBe(true));

  it.each([
    '10.0.0.1:443',
    '10.0.0.1',
    '0.0.0.0:7000',
    '[::]:7000',
    '::',
    '128.0.0.1:80',
    '[2001:db8::1]:443',
    '[::ffff:10.0.0.1]:80',
    'central.periscope.svc:443',
    'localhost.example.com:80',
    'unix:',
    'unix://host/path',
    '',
    'garbage:port',
    ':8080',
  ])('%s is not local', (a) => expect(isLocalAddress(a)).toBe(false));
});

describe('parseAddress', () => {
  it('parses the supported forms', () => {
    expect(parseAddress('unix:///run/a.sock')).toEqual({ kind: 'unix', path: '/run/a.sock', abstract: false });
    expect(parseAddress('unix:a.sock')).toEqual({ kind: 'unix', path: 'a.sock', abstract: false });
    expect(parseAddress('[::1]:80')).toEqual({ kind: 'tcp', host: '::1', port: 80 });
    expect(parseAddress('host.example:65535')).toEqual({ kind: 'tcp', host: 'host.example', port: 65535 });
    expect(parseAddress('host.example:65536')).toBeUndefined();
    expect(parseAddress('host')).toEqual({ kind: 'tcp', host: 'host', port: undefined });
  });
});
