/**
 * A throwaway certificate authority for mutual-TLS tests, made with the system `openssl` CLI (no key
 * material is ever checked in). `TestCa.create(dir)` makes a self-signed CA (EC P-256, 2 days);
 * `issue(name)` signs a leaf usable as both server and client (SAN DNS:localhost, IP:127.0.0.1, ::1).
 * Two `TestCa`s are unrelated: a certificate of one does not chain to the other.
 */
import { execFileSync } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

export interface IssuedCert {
  readonly name: string;
  readonly certPath: string;
  readonly keyPath: string;
  readonly cert: Buffer;
  readonly key: Buffer;
}

export interface IssueOptions {
  /** Extra subjectAltName entries, e.g. `DNS:analysis.example`. Default: localhost, 127.0.0.1, ::1. */
  altNames?: string[];
  /** Validity in days (default 2). */
  days?: number;
}

export class TestCaError extends Error {
  readonly code = 'openssl-failed';
  constructor(message: string) {
    super(message);
    this.name = 'TestCaError';
  }
}

function openssl(args: string[], cwd: string): void {
  try {
    execFileSync('openssl', args, { cwd, stdio: ['ignore', 'pipe', 'pipe'] });
  } catch (e) {
    const err = e as { stderr?: Buffer; message: string };
    throw new TestCaError(`openssl ${args[0]} failed: ${err.stderr?.toString() ?? err.message}`);
  }
}

export class TestCa {
  private serial = 1;
  private constructor(
    readonly dir: string,
    readonly name: string,
    readonly certPath: string,
    private readonly keyPath: string,
  ) {}

  /** The CA certificate (PEM): what peers use as `--tls-ca`. */
  get cert(): Buffer {
    return readFileSync(this.certPath);
  }

  /** Make a new CA in `dir/<name>/` (created). */
  static create(dir: string, name = 'periscope-test-ca'): TestCa {
    const home = join(dir, name);
    mkdirSync(home, { recursive: true });
    openssl(
      [
        'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes',
        '-keyout', 'ca.key', '-out', 'ca.pem', '-days', '2', '-subj', `/CN=${name}`,
        '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign',
      ],
      home,
    );
    return new TestCa(home, name, join(home, 'ca.pem'), join(home, 'ca.key'));
  }

  /** Issue a leaf certificate signed by this CA (server and client usage). */
  issue(name: string, opts: IssueOptions = {}): IssuedCert {
    const alt = opts.altNames ?? ['DNS:localhost', 'IP:127.0.0.1', 'IP:::1'];
    const ext = join(this.dir, `${name}.ext`);
    writeFileSync(
      ext,
      [
        'basicConstraints=critical,CA:FALSE',
        'keyUsage=critical,digitalSignature,keyEncipherment',
        'extendedKeyUsage=serverAuth,clientAuth',
        `subjectAltName=${alt.join(',')}`,
        '',
      ].join('\n'),
    );
    openssl(['req', '-new', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', `${name}.key`, '-out', `${name}.csr`, '-subj', `/CN=${name}`], this.dir);
    openssl(
      ['x509', '-req', '-in', `${name}.csr`, '-CA', this.certPath, '-CAkey', this.keyPath, '-set_serial', String(this.serial++), '-out', `${name}.pem`, '-days', String(opts.days ?? 2), '-extfile', ext],
      this.dir,
    );
    const certPath = join(this.dir, `${name}.pem`);
    const keyPath = join(this.dir, `${name}.key`);
    return { name, certPath, keyPath, cert: readFileSync(certPath), key: readFileSync(keyPath) };
  }
}
