/**
 * Options every networked app takes. Merge into a schema: `options: { ...networkOptions, ... }`.
 *
 * Rule (enforced by `resolveConfig` for every `address` option and `address` list item): without mTLS
 * (`--tls-ca` + `--tls-cert` + `--tls-key`, all three or none) and without `--insecure`, an address
 * that is not local (see `isLocalAddress`) is refused with `tls-required`. TLS configured = fleet mode.
 * `--insecure` together with TLS is refused (`conflicting-options`).
 */
export const networkOptions = {
  'tls-ca': {
    kind: 'path',
    description: 'CA bundle (PEM) that peers must chain to (mutual TLS). Needs --tls-cert and --tls-key.',
  },
  'tls-cert': {
    kind: 'path',
    description: "This component's certificate chain (PEM) for mutual TLS. Needs --tls-ca and --tls-key.",
  },
  'tls-key': {
    kind: 'path',
    description: 'Private key (PEM) for --tls-cert. Needs --tls-ca and --tls-cert.',
  },
  insecure: {
    kind: 'boolean',
    description: 'Allow plaintext on non-loopback addresses without TLS. Development only.',
  },
} as const;

/** TLS material read from the `--tls-*` files. */
export interface TlsMaterial {
  readonly ca: Buffer;
  readonly cert: Buffer;
  readonly key: Buffer;
}

/** The `--tls-*` file paths as resolved. */
export interface TlsPaths {
  readonly ca: string;
  readonly cert: string;
  readonly key: string;
}
