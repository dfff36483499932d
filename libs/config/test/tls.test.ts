import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { defineSchema, networkOptions, resolveConfig } from '../src/index.js';
import { agentSchema, BASE, configError, pem, tempFiles } from './fixtures.js';

const resolve = (argv: string[], env: Record<string, string> = {}) =>
  resolveConfig(agentSchema, { argv: [...BASE, ...argv], env });

function tlsFiles() {
  const f = tempFiles({ 'ca.pem': pem('CERTIFICATE'), 'cert.pem': pem('CERTIFICATE'), 'key.pem': pem('PRIVATE KEY') });
  return {
    ...f,
    flags: ['--tls-ca', f.path('ca.pem'), '--tls-cert', f.path('cert.pem'), '--tls-key', f.path('key.pem')],
  };
}

describe('TLS / insecure rule', () => {
  it.each([
    '127.0.0.1:7000',
    '127.8.9.10:7000',
    'localhost:7000',
    '[::1]:7000',
    'unix:/run/periscope/central.sock',
    'unix:///run/periscope/central.sock',
    'unix:relative.sock',
  ])('local address %s is accepted without TLS', (addr) => {
    const c = resolve(['--central', addr]);
    expect(c.values.central).toBe(addr);
    expect(c.fleetMode).toBe(false);
    expect(c.tls).toBeUndefined();
  });

  it('10.0.0.1:443 is refused without TLS, naming the key and source', () => {
    const e = configError(() => resolve(['--central', '10.0.0.1:443']));
    expect(e.code).toBe('tls-required');
    expect(e.key).toBe('central');
    expect(e.message).toMatch(/^refusing --central "10\.0\.0\.1:443" \(from command line\): it is not a loopback/);
    expect(e.message).toContain('--insecure');
    expect(e.message).toContain('--tls-ca, --tls-cert and --tls-key');
  });

  it('refuses non-local items of an address list, and wildcard binds', () => {
    const e = configError(() => resolve([], { PERISCOPE_KVMI_LISTEN: 'unix:/a.sock,0.0.0.0:7000' }));
    expect(e.code).toBe('tls-required');
    expect(e.key).toBe('kvmi-listen');
    expect(e.message).toContain('"0.0.0.0:7000" (from env PERISCOPE_KVMI_LISTEN)');
    expect(configError(() => resolve(['--central', 'central.periscope.svc:443'])).code).toBe('tls-required');
    expect(configError(() => resolve(['--central', '[::]:443'])).code).toBe('tls-required');
  });

  it('a non-local default is refused too, reported as from default', () => {
    const s = defineSchema({
      options: { ...networkOptions, listen: { kind: 'address', default: '0.0.0.0:9000', description: 'Listen.' } },
    });
    const e = configError(() => resolveConfig(s, { argv: [] }));
    expect(e.code).toBe('tls-required');
    expect(e.message).toContain('(from default)');
    expect(resolveConfig(s, { argv: ['--insecure'] }).values.listen).toBe('0.0.0.0:9000');
  });

  it('10.0.0.1:443 is accepted with --insecure (flag or env), not fleet mode', () => {
    const c = resolve(['--central', '10.0.0.1:443', '--insecure']);
    expect(c.values.central).toBe('10.0.0.1:443');
    expect(c.values.insecure).toBe(true);
    expect(c.fleetMode).toBe(false);
    expect(c.tls).toBeUndefined();
    expect(resolve(['--central', '10.0.0.1:443'], { PERISCOPE_INSECURE: 'true' }).values.central).toBe('10.0.0.1:443');
  });

  it('10.0.0.1:443 is accepted with TLS: fleet mode with the files loaded', () => {
    const t = tlsFiles();
    const c = resolve(['--central', '10.0.0.1:443', ...t.flags]);
    expect(c.fleetMode).toBe(true);
    expect(c.tlsPaths).toEqual({ ca: t.path('ca.pem'), cert: t.path('cert.pem'), key: t.path('key.pem') });
    expect(c.tls?.ca.toString()).toBe(pem('CERTIFICATE'));
    expect(c.tls?.key.toString()).toBe(pem('PRIVATE KEY'));
    expect(Buffer.isBuffer(c.tls?.cert)).toBe(true);
  });

  it('TLS paths may come from a config file, relative to it', () => {
    const t = tlsFiles();
    const cfg = join(t.dir, 'periscope.json');
    writeFileSync(
      cfg,
      JSON.stringify({ 'tls-ca': 'ca.pem', 'tls-cert': 'cert.pem', 'tls-key': 'key.pem', central: '10.0.0.1:443' }),
    );
    const c = resolve(['--config', cfg]);
    expect(c.fleetMode).toBe(true);
    expect(c.tlsPaths?.ca).toBe(t.path('ca.pem'));
  });

  it('partial TLS is refused (tls-incomplete) naming what is missing', () => {
    const t = tlsFiles();
    const e = configError(() => resolve(['--tls-ca', t.path('ca.pem')], { PERISCOPE_TLS_CERT: t.path('cert.pem') }));
    expect(e.code).toBe('tls-incomplete');
    expect(e.key).toBe('tls-key');
    expect(e.message).toBe(
      'incomplete TLS configuration: --tls-ca (from command line) and --tls-cert (from env PERISCOPE_TLS_CERT) ' +
        'are set but --tls-key is not; mutual TLS needs all three of --tls-ca, --tls-cert and --tls-key (or none)',
    );
    // Even with only local addresses, partial TLS is a mistake.
    expect(configError(() => resolve(['--tls-key', t.path('key.pem')])).code).toBe('tls-incomplete');
  });

  it('--insecure together with TLS is conflicting-options', () => {
    const t = tlsFiles();
    const e = configError(() => resolve([...t.flags], { PERISCOPE_INSECURE: '1' }));
    expect(e.code).toBe('conflicting-options');
    expect(e.key).toBe('insecure');
    expect(e.message).toContain('--insecure (from env PERISCOPE_INSECURE) cannot be combined with TLS');
    // --no-insecure is fine.
    expect(resolve([...t.flags, '--no-insecure']).fleetMode).toBe(true);
  });

  it('unreadable TLS file is unreadable-file naming the option, path and source', () => {
    const t = tlsFiles();
    const missing = t.path('missing.pem');
    const e = configError(() =>
      resolve(['--tls-ca', t.path('ca.pem'), '--tls-cert', missing, '--tls-key', t.path('key.pem')]),
    );
    expect(e.code).toBe('unreadable-file');
    expect(e.key).toBe('tls-cert');
    expect(e.message).toMatch(
      new RegExp(`^cannot read --tls-cert file "${missing}" \\(from command line\\): ENOENT`),
    );
  });

  it('a TLS file without PEM data is invalid-value', () => {
    const t = tlsFiles();
    const junk = tempFiles({ 'junk.pem': 'not a certificate' });
    const e = configError(() =>
      resolve(['--tls-ca', junk.path('junk.pem'), '--tls-cert', t.path('cert.pem'), '--tls-key', t.path('key.pem')]),
    );
    expect(e.code).toBe('invalid-value');
    expect(e.key).toBe('tls-ca');
    expect(e.message).toContain('does not contain PEM data');
  });

  it('readTlsFiles: false checks the rule without touching the files (manifest checks)', () => {
    const c = resolveConfig(agentSchema, {
      argv: [...BASE, '--central', '10.0.0.1:443', '--tls-ca', '/x/ca', '--tls-cert', '/x/cert', '--tls-key', '/x/key'],
      readTlsFiles: false,
    });
    expect(c.fleetMode).toBe(true);
    expect(c.tls).toBeUndefined();
    expect(c.tlsPaths?.key).toBe('/x/key');
  });
});

