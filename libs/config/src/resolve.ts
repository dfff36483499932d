import { readFileSync } from 'node:fs';
import { dirname } from 'node:path';
import { isLocalAddress } from './address.js';
import { ConfigError, describeSource, type ValueSource } from './errors.js';
import type { TlsMaterial, TlsPaths } from './network.js';
import {
  CONFIG_OPTION,
  checkSchema,
  envVarName,
  hasNetworkOptions,
  HELP_OPTION,
  type OptionSpec,
  type OptionsSpec,
  type OptionValues,
  type PositionalSpec,
  type PositionalValues,
  type Schema,
} from './schema.js';
import { closest } from './suggest.js';
import { type Converted, defaultValue, fromEnv, fromFlag, fromJson, validatorProblem } from './values.js';

export interface ResolveInput {
  /** Command-line arguments without the node binary and script (`process.argv.slice(2)`). */
  readonly argv: readonly string[];
  /** Environment; only `PERISCOPE_*` variables named by the schema (and `PERISCOPE_CONFIG`) are read. */
  readonly env?: Readonly<Record<string, string | undefined>>;
  /**
   * Contents of the config file. When given, it is used instead of reading the `--config` file from
   * disk (and even when no `--config` was given); error messages name the `--config` path if any.
   */
  readonly fileContents?: string;
  /** File reader for the config file and TLS files. Default: `fs.readFileSync`. */
  readonly readFile?: (path: string) => string | Uint8Array;
  /** Read and check the TLS files (default true). False: `tls` stays undefined; `tlsPaths`/`fleetMode` are still set. */
  readonly readTlsFiles?: boolean;
}

export interface ResolvedConfig<O extends OptionsSpec, P extends readonly PositionalSpec[]> {
  /** Option values keyed by flag name (kebab-case), typed from the schema. */
  readonly values: OptionValues<O>;
  /** Positional arguments keyed by positional name. */
  readonly positionals: PositionalValues<P>;
  /** Where each option's value came from (`unset` for an optional option nobody set). */
  readonly sources: { readonly [K in keyof O & string]: ValueSource };
  /** The config file used (`--config` or `PERISCOPE_CONFIG`), if any. */
  readonly configFile: string | undefined;
  /** True when mTLS is configured (all of --tls-ca, --tls-cert, --tls-key). */
  readonly fleetMode: boolean;
  readonly tlsPaths: TlsPaths | undefined;
  /** The TLS files' contents (undefined without TLS, or with `readTlsFiles: false`). */
  readonly tls: TlsMaterial | undefined;
}

/** The resolved-config type of a schema: `type Cfg = ConfigOf<typeof schema>`. */
export type ConfigOf<S> = S extends Schema<infer O, infer P> ? ResolvedConfig<O, P> : never;

const CONFIG_SPEC: OptionSpec = { kind: 'path', description: 'JSON config file' };

const flagSource = (name: string): ValueSource => ({ kind: 'flag', flag: `--${name}` });

function invalid(key: string, source: ValueSource, problem: string): ConfigError {
  return new ConfigError('invalid-value', `invalid value for --${key} (from ${describeSource(source)}): ${problem}`, {
    key,
    source,
  });
}

interface Tokens {
  readonly flags: Map<string, string[]>;
  readonly positionals: string[];
  readonly help: boolean;
  readonly errors: ConfigError[];
}

/**
 * GNU-style scan: `--name value`, `--name=value`, `--flag`, `--no-flag`, `--flag=false`; flags and
 * positionals may interleave; `--` ends options. A non-boolean flag's value may not start with `--`
 * (write `--name=--value`). `-h` means `--help`; other single-dash words are unknown options, except
 * `-` and negative numbers, which are positionals.
 */
function tokenize(argv: readonly string[], options: OptionsSpec): Tokens {
  const flags = new Map<string, string[]>();
  const positionals: string[] = [];
  const errors: ConfigError[] = [];
  let help = false;
  const known = [...Object.keys(options), CONFIG_OPTION, HELP_OPTION];
  const specOf = (name: string): OptionSpec | undefined =>
    name === CONFIG_OPTION ? CONFIG_SPEC : Object.hasOwn(options, name) ? options[name] : undefined;

  const record = (name: string, spec: OptionSpec, value: string): void => {
    const prior = flags.get(name);
    if (prior === undefined) flags.set(name, [value]);
    else if (spec.kind === 'list') prior.push(value);
    else {
      errors.push(
        new ConfigError('duplicate-option', `option --${name} given more than once on the command line`, {
          key: name,
          source: flagSource(name),
        }),
      );
    }
  };

  for (let i = 0; i < argv.length; i++) {
    const tok = argv[i]!;
    if (tok === '--') {
      positionals.push(...argv.slice(i + 1));
      break;
    }
    if (tok.startsWith('--')) {
      const body = tok.slice(2);
      const eq = body.indexOf('=');
      const name = eq >= 0 ? body.slice(0, eq) : body;
      const inline = eq >= 0 ? body.slice(eq + 1) : undefined;
      if (name === HELP_OPTION) {
        help = true;
        continue;
      }
      const spec = specOf(name);
      if (spec === undefined) {
        const positive = name.startsWith('no-') ? name.slice(3) : undefined;
        const positiveSpec = positive === undefined ? undefined : specOf(positive);
        if (positive !== undefined && positiveSpec?.kind === 'boolean') {
          if (inline !== undefined) {
            errors.push(invalid(positive, flagSource(name), `--${name} does not take a value`));
          } else {
            record(positive, positiveSpec, 'false');
          }
          continue;
        }
        const guess = closest(name, known);
        errors.push(
          new ConfigError(
            'unknown-option',
            `unknown option --${name} (from command line)` + (guess === undefined ? '' : `; did you mean --${guess}?`),
            { key: name, source: flagSource(name), suggestion: guess },
          ),
        );
        // Skip a following value-looking token so it is not misread as a positional.
        if (inline === undefined && i + 1 < argv.length && !argv[i + 1]!.startsWith('-')) i++;
        continue;
      }
      if (spec.kind === 'boolean') {
        record(name, spec, inline ?? 'true');
        continue;
      }
      if (inline !== undefined) {
        record(name, spec, inline);
        continue;
      }
      const next = argv[i + 1];
      if (next === undefined || next.startsWith('--')) {
        errors.push(
          new ConfigError('missing-value', `option --${name} needs a value (from command line)`, {
            key: name,
            source: flagSource(name),
          }),
        );
        continue;
      }
      record(name, spec, next);
      i++;
      continue;
    }
    if (tok === '-h') {
      help = true;
      continue;
    }
    if (tok.startsWith('-') && tok.length > 1 && !/^-\d/.test(tok)) {
      errors.push(
        new ConfigError('unknown-option', `unknown option ${tok} (from command line); options are spelled --name`, {
          key: tok.slice(1),
          source: { kind: 'flag', flag: tok },
        }),
      );
      continue;
    }
    positionals.push(tok);
  }
  return { flags, positionals, help, errors };
}

function readConfigFile(
  path: string | undefined,
  pathSource: ValueSource | undefined,
  input: ResolveInput,
  options: OptionsSpec,
): { values: Map<string, unknown>; label: string } | undefined {
  if (path === undefined && input.fileContents === undefined) return undefined;
  const label = path ?? '(inline config)';
  const fileSource: ValueSource = { kind: 'file', path: label };
  let text: string;
  if (input.fileContents !== undefined) {
    text = input.fileContents;
  } else {
    const read = input.readFile ?? ((p: string) => readFileSync(p));
    try {
      const raw = read(path!);
      text = typeof raw === 'string' ? raw : Buffer.from(raw).toString('utf8');
    } catch (err) {
      const why = err instanceof Error ? err.message : String(err);
      throw new ConfigError(
        'bad-config-file',
        `cannot read config file ${path} (from ${describeSource(pathSource!)}): ${why}`,
        { key: CONFIG_OPTION, source: pathSource, cause: err },
      );
    }
  }
  if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (err) {
    const why = err instanceof Error ? err.message : String(err);
    throw new ConfigError(
      'bad-config-file',
      `config file ${label} is not valid JSON (only JSON config files are supported; YAML is not): ${why}`,
      { key: CONFIG_OPTION, source: fileSource, cause: err },
    );
  }
  if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed)) {
    throw new ConfigError(
      'bad-config-file',
      `config file ${label} must contain a JSON object whose keys are option names (e.g. {"log-level": "info"})`,
      { key: CONFIG_OPTION, source: fileSource },
    );
  }
  const values = new Map<string, unknown>();
  for (const [key, value] of Object.entries(parsed)) {
    if (key === CONFIG_OPTION) {
      throw new ConfigError('bad-config-file', `config file ${label} cannot name another config file ("config" key)`, {
        key,
        source: fileSource,
      });
    }
    if (!Object.hasOwn(options, key)) {
      const guess = closest(key, Object.keys(options));
      throw new ConfigError(
        'unknown-option',
        `unknown key ${JSON.stringify(key)} (from config file ${label})` +
          (guess === undefined ? '' : `; did you mean ${JSON.stringify(guess)}?`),
        { key, source: fileSource, suggestion: guess },
      );
    }
    values.set(key, value);
  }
  return { values, label };
}

function nonEmptyEnv(env: ResolveInput['env'], name: string): string | undefined {
  const v = env?.[name];
  return v === undefined || v === '' ? undefined : v;
}

/**
 * Resolves configuration from argv, env and an optional JSON config file against a schema, with
 * precedence flag > env > file > default. Pure apart from reading the config/TLS files through
 * `input.readFile` (default `fs.readFileSync`); never reads `process.argv`/`process.env`, never exits.
 * Throws `ConfigError` (see `ConfigErrorCode`); `--help` throws code `help-requested`.
 */
export function resolveConfig<O extends OptionsSpec, P extends readonly PositionalSpec[]>(
  schema: Schema<O, P>,
  input: ResolveInput,
): ResolvedConfig<O, P> {
  checkSchema(schema);
  const options: OptionsSpec = schema.options;
  const env = input.env ?? {};
  const tokens = tokenize(input.argv, options);
  if (tokens.help) throw new ConfigError('help-requested', 'help requested (--help)');
  if (tokens.errors.length > 0) throw tokens.errors[0]!;

  // Config file location: --config > PERISCOPE_CONFIG.
  let configPath: string | undefined;
  let configPathSource: ValueSource | undefined;
  const configFlag = tokens.flags.get(CONFIG_OPTION);
  const configEnvName = envVarName(CONFIG_OPTION);
  if (configFlag !== undefined) {
    configPath = configFlag[0]!;
    configPathSource = flagSource(CONFIG_OPTION);
  } else if (nonEmptyEnv(env, configEnvName) !== undefined) {
    configPath = nonEmptyEnv(env, configEnvName);
    configPathSource = { kind: 'env', variable: configEnvName };
  }
  if (configPath === '') throw invalid(CONFIG_OPTION, configPathSource!, 'an empty string is not a path');
  const file = readConfigFile(configPath, configPathSource, input, options);
  const fileDir = configPath === undefined ? undefined : dirname(configPath);

  const values: Record<string, unknown> = {};
  const sources: Record<string, ValueSource> = {};
  for (const [name, spec] of Object.entries(options)) {
    let source: ValueSource;
    let converted: Converted;
    const flag = tokens.flags.get(name);
    const envName = envVarName(name);
    const envValue = nonEmptyEnv(env, envName);
    if (flag !== undefined) {
      source = flagSource(name);
      converted = fromFlag(spec, flag);
    } else if (envValue !== undefined) {
      source = { kind: 'env', variable: envName };
      converted = fromEnv(spec, envValue);
    } else if (file !== undefined && file.values.has(name)) {
      source = { kind: 'file', path: file.label };
      converted = fromJson(spec, file.values.get(name), fileDir);
    } else {
      const value = defaultValue(spec);
      source = value === undefined ? { kind: 'unset' } : { kind: 'default' };
      converted = { ok: true, value };
    }
    if (!converted.ok) throw invalid(name, source, converted.problem);
    const value = converted.value;
    if (spec.required === true && (value === undefined || (Array.isArray(value) && value.length === 0))) {
      const where = `--${name}, env ${envName}, or ${JSON.stringify(name)} in the config file`;
      throw new ConfigError('missing-required', `missing required option --${name} (set ${where})`, {
        key: name,
        source,
      });
    }
    if (value !== undefined && source.kind !== 'default') {
      const problem = validatorProblem(spec, value);
      if (problem !== undefined) throw invalid(name, source, problem);
    }
    values[name] = value;
    sources[name] = source;
  }

  const positionals = assignPositionals(schema.positionals, tokens.positionals);

  // TLS / insecure rule.
  let tlsPaths: TlsPaths | undefined;
  let insecure = false;
  if (hasNetworkOptions(options)) {
    const parts = ['tls-ca', 'tls-cert', 'tls-key'] as const;
    const set = parts.filter((p) => values[p] !== undefined);
    if (set.length > 0 && set.length < parts.length) {
      const missing = parts.filter((p) => values[p] === undefined);
      const given = set.map((p) => `--${p} (from ${describeSource(sources[p]!)})`).join(' and ');
      throw new ConfigError(
        'tls-incomplete',
        `incomplete TLS configuration: ${given} ${set.length === 1 ? 'is' : 'are'} set but ` +
          `${missing.map((p) => `--${p}`).join(' and ')} ${missing.length === 1 ? 'is' : 'are'} not; ` +
          'mutual TLS needs all three of --tls-ca, --tls-cert and --tls-key (or none)',
        { key: missing[0], source: sources[set[0]!] },
      );
    }
    insecure = values['insecure'] === true;
    if (set.length === parts.length) {
      tlsPaths = { ca: values['tls-ca'] as string, cert: values['tls-cert'] as string, key: values['tls-key'] as string };
      if (insecure) {
        throw new ConfigError(
          'conflicting-options',
          `--insecure (from ${describeSource(sources['insecure']!)}) cannot be combined with TLS ` +
            '(--tls-ca, --tls-cert, --tls-key); use one or the other',
          { key: 'insecure', source: sources['insecure'] },
        );
      }
    }
  }
  const fleetMode = tlsPaths !== undefined;
  if (!fleetMode && !insecure) {
    for (const [name, spec] of Object.entries(options)) {
      const isAddress = spec.kind === 'address' || (spec.kind === 'list' && spec.items === 'address');
      if (!isAddress) continue;
      const value = values[name];
      const list = Array.isArray(value) ? (value as string[]) : value === undefined ? [] : [value as string];
      for (const addr of list) {
        if (isLocalAddress(addr)) continue;
        throw new ConfigError(
          'tls-required',
          `refusing --${name} ${JSON.stringify(addr)} (from ${describeSource(sources[name]!)}): ` +
            'it is not a loopback (127.0.0.0/8, ::1, localhost) or unix: address, and TLS is not configured; ' +
            'set --tls-ca, --tls-cert and --tls-key for mutual TLS, or pass --insecure to allow plaintext',
          { key: name, source: sources[name] },
        );
      }
    }
  }

  let tls: TlsMaterial | undefined;
  if (tlsPaths !== undefined && input.readTlsFiles !== false) {
    const read = input.readFile ?? ((p: string) => readFileSync(p));
    const load = (option: 'tls-ca' | 'tls-cert' | 'tls-key', path: string): Buffer => {
      const source = sources[option]!;
      let data: Buffer;
      try {
        const raw = read(path);
        data = typeof raw === 'string' ? Buffer.from(raw, 'utf8') : Buffer.from(raw);
      } catch (err) {
        const why = err instanceof Error ? err.message : String(err);
        throw new ConfigError(
          'unreadable-file',
          `cannot read --${option} file ${JSON.stringify(path)} (from ${describeSource(source)}): ${why}`,
          { key: option, source, cause: err },
        );
      }
      if (!data.includes('-----BEGIN ')) {
        throw invalid(option, source, `${JSON.stringify(path)} does not contain PEM data (no "-----BEGIN " line)`);
      }
      return data;
    };
    tls = { ca: load('tls-ca', tlsPaths.ca), cert: load('tls-cert', tlsPaths.cert), key: load('tls-key', tlsPaths.key) };
  }

  return {
    values: values as OptionValues<O>,
    positionals: positionals as PositionalValues<P>,
    sources: sources as { [K in keyof O & string]: ValueSource },
    configFile: configPath ?? (file === undefined ? undefined : file.label),
    fleetMode,
    tlsPaths,
    tls,
  };
}

function assignPositionals(specs: readonly PositionalSpec[], args: readonly string[]): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  let i = 0;
  for (const spec of specs) {
    if (spec.variadic === true) {
      const rest = args.slice(i);
      i = args.length;
      if (spec.required !== false && rest.length === 0) {
        throw new ConfigError('missing-required', `missing required argument <${spec.name}>...`, { key: spec.name });
      }
      out[spec.name] = rest;
      continue;
    }
    const arg = args[i];
    if (arg === undefined) {
      if (spec.required !== false) {
        throw new ConfigError('missing-required', `missing required argument <${spec.name}>`, { key: spec.name });
      }
      out[spec.name] = undefined;
      continue;
    }
    out[spec.name] = arg;
    i++;
  }
  if (i < args.length) {
    const extra = args[i]!;
    throw new ConfigError(
      'unexpected-argument',
      `unexpected argument ${JSON.stringify(extra)}` +
        (specs.length === 0 ? ' (this command takes no positional arguments)' : ` (expects at most ${specs.length})`),
      { key: extra },
    );
  }
  return out;
}
