/** Where a configuration value came from. */
export type ValueSource =
  | { readonly kind: 'flag'; readonly flag: string }
  | { readonly kind: 'env'; readonly variable: string }
  | { readonly kind: 'file'; readonly path: string }
  | { readonly kind: 'default' }
  | { readonly kind: 'unset' };

/** Stable error codes; callers branch on these, never on message text. */
export type ConfigErrorCode =
  /** A flag or config-file key that the schema does not declare. */
  | 'unknown-option'
  /** A value that does not parse or fails validation (range, enum, custom validator, PEM check). */
  | 'invalid-value'
  /** A non-boolean flag at the end of argv, or followed by another `--flag`. */
  | 'missing-value'
  /** A non-repeatable flag given more than once on the command line. */
  | 'duplicate-option'
  /** A required option or positional argument that no source provides. */
  | 'missing-required'
  /** More positional arguments than the schema declares. */
  | 'unexpected-argument'
  /** The `--config` file cannot be read, is not JSON, or is not a JSON object. */
  | 'bad-config-file'
  /** A non-local address without mTLS and without `--insecure`. */
  | 'tls-required'
  /** Some but not all of `--tls-ca`, `--tls-cert`, `--tls-key`. */
  | 'tls-incomplete'
  /** Options that must not be combined (`--insecure` together with TLS). */
  | 'conflicting-options'
  /** A file named by an option (TLS material) cannot be read. */
  | 'unreadable-file'
  /** `--help` / `-h` was given; `loadConfig` prints the help text instead. */
  | 'help-requested'
  /** The schema itself is wrong (programmer error, raised by `defineSchema`). */
  | 'invalid-schema';

export interface ConfigErrorDetails {
  /** The option (flag name without dashes), config-file key or positional name concerned. */
  readonly key?: string | undefined;
  /** Where the offending value came from. */
  readonly source?: ValueSource | undefined;
  /** A close match for an unknown name ("did you mean"). */
  readonly suggestion?: string | undefined;
  readonly cause?: unknown;
}

export class ConfigError extends Error {
  override readonly name = 'ConfigError';
  readonly code: ConfigErrorCode;
  readonly key: string | undefined;
  readonly source: ValueSource | undefined;
  readonly suggestion: string | undefined;

  constructor(code: ConfigErrorCode, message: string, details: ConfigErrorDetails = {}) {
    super(message, details.cause === undefined ? undefined : { cause: details.cause });
    this.code = code;
    this.key = details.key;
    this.source = details.source;
    this.suggestion = details.suggestion;
  }
}

/** Human-readable origin, as used inside error messages: `command line`, `env PERISCOPE_X`, ... */
export function describeSource(source: ValueSource): string {
  switch (source.kind) {
    case 'flag':
      return 'command line';
    case 'env':
      return `env ${source.variable}`;
    case 'file':
      return `config file ${source.path}`;
    case 'default':
      return 'default';
    case 'unset':
      return 'unset';
  }
}
