import { ConfigError } from './errors.js';
import { defaultProblem } from './values.js';

/**
 * A custom validator: return a problem description (it becomes the tail of an `invalid-value`
 * message) or nothing when the value is fine. A thrown Error is treated the same way.
 */
export type Validator<T> = (value: T) => string | undefined | void;

interface OptionBase {
  /** One line for `--help`. */
  readonly description: string;
  /** No source may leave it unset. Must not be combined with `default`. */
  readonly required?: boolean;
}

export interface StringOption extends OptionBase {
  readonly kind: 'string';
  readonly default?: string;
  readonly validate?: Validator<string>;
}
/** A file-system path (non-empty). Relative paths from a config file are taken relative to that file. */
export interface PathOption extends OptionBase {
  readonly kind: 'path';
  readonly default?: string;
  readonly validate?: Validator<string>;
}
/** A listen/dial address: `host:port`, `[ipv6]:port`, `unix:PATH`, `unix:///abs/path`. Subject to the TLS rule. */
export interface AddressOption extends OptionBase {
  readonly kind: 'address';
  readonly default?: string;
  readonly validate?: Validator<string>;
}
export interface IntegerOption extends OptionBase {
  readonly kind: 'integer';
  readonly min?: number;
  readonly max?: number;
  readonly default?: number;
  readonly validate?: Validator<number>;
}
/** A duration, resolved to whole milliseconds. Text: `250ms`, `5s`, `2m`, `1h`, `1m30s`, or a bare number of ms. */
export interface DurationOption extends OptionBase {
  readonly kind: 'duration';
  readonly min?: number | string;
  readonly max?: number | string;
  readonly default?: number | string;
  readonly validate?: Validator<number>;
}
/** `--flag`, `--flag=true|false`, `--no-flag`; env/text values `true|false|1|0`. Defaults to false. */
export interface BooleanOption extends OptionBase {
  readonly kind: 'boolean';
  readonly default?: boolean;
  readonly validate?: Validator<boolean>;
}
export interface EnumOption<V extends string = string> extends OptionBase {
  readonly kind: 'enum';
  readonly values: readonly V[];
  readonly default?: V;
  readonly validate?: Validator<V>;
}
/**
 * A list of strings: a repeatable flag (`--x a --x b`), a comma-separated env var, or a JSON array in
 * the config file. `items` selects per-item validation (`address` items are subject to the TLS rule).
 * Defaults to []. The highest-precedence source that sets it wins outright (no merging).
 */
export interface ListOption extends OptionBase {
  readonly kind: 'list';
  readonly items?: 'string' | 'path' | 'address';
  readonly default?: readonly string[];
  readonly validate?: Validator<string[]>;
}

export type OptionSpec =
  | StringOption
  | PathOption
  | AddressOption
  | IntegerOption
  | DurationOption
  | BooleanOption
  | EnumOption
  | ListOption;

export type OptionKind = OptionSpec['kind'];

/** Options keyed by flag name (kebab-case, without the leading `--`). */
export type OptionsSpec = { readonly [name: string]: OptionSpec };

export interface PositionalSpec {
  readonly name: string;
  readonly description: string;
  /** Default true. Optional positionals must follow the required ones. */
  readonly required?: boolean;
  /** Collects all remaining arguments into a string[]; only the last positional may be variadic. */
  readonly variadic?: boolean;
}

export interface SchemaDefinition<O extends OptionsSpec, P extends readonly PositionalSpec[]> {
  readonly options: O;
  readonly positionals?: P;
}

/** A validated schema; build it with `defineSchema` so the result type can be inferred. */
export interface Schema<O extends OptionsSpec = OptionsSpec, P extends readonly PositionalSpec[] = readonly PositionalSpec[]> {
  readonly options: O;
  readonly positionals: P;
}

// ---- result types ---------------------------------------------------------------------------------

type KindValue<S> = S extends { readonly kind: 'integer' | 'duration' }
  ? number
  : S extends { readonly kind: 'boolean' }
    ? boolean
    : S extends { readonly kind: 'enum'; readonly values: readonly (infer V)[] }
      ? V
      : S extends { readonly kind: 'list' }
        ? string[]
        : string;

type AlwaysSet<S> = S extends { readonly kind: 'boolean' | 'list' }
  ? true
  : S extends { readonly required: true }
    ? true
    : S extends { readonly default: string | number | boolean | readonly string[] }
      ? true
      : false;

/** The value of one option: its kind's type, `| undefined` unless required, defaulted, boolean or list. */
export type OptionValue<S> = AlwaysSet<S> extends true ? KindValue<S> : KindValue<S> | undefined;

/** Resolved option values keyed by flag name, e.g. `{ 'kvmi-listen': string[]; insecure: boolean }`. */
export type OptionValues<O extends OptionsSpec> = { -readonly [K in keyof O & string]: OptionValue<O[K]> };

type PositionalValue<P> = P extends { readonly variadic: true }
  ? string[]
  : P extends { readonly required: false }
    ? string | undefined
    : string;

/** Positional values keyed by positional name. */
export type PositionalValues<P extends readonly PositionalSpec[]> = {
  -readonly [E in P[number] as E['name']]: PositionalValue<E>;
};

// ---- helpers --------------------------------------------------------------------------------------

/** `kvmi-listen` → `PERISCOPE_KVMI_LISTEN`. */
export function envVarName(option: string): string {
  return `PERISCOPE_${option.toUpperCase().replace(/-/g, '_')}`;
}

/** Built-in options every schema gets; they cannot be redeclared. */
export const CONFIG_OPTION = 'config';
export const HELP_OPTION = 'help';
const RESERVED = new Set([CONFIG_OPTION, HELP_OPTION]);

const NAME = /^[a-z][a-z0-9]*(?:-[a-z0-9]+)*$/;
const KINDS: ReadonlySet<string> = new Set<OptionKind>([
  'string', 'path', 'address', 'integer', 'duration', 'boolean', 'enum', 'list',
]);

/**
 * Declares an app's configuration schema. Checks it eagerly (names, kinds, defaults against their own
 * rules, positional order, and that a schema with `address` options includes `networkOptions`) and
 * throws `ConfigError('invalid-schema')` on a mistake. The `const` type parameters keep literal types so
 * `resolveConfig` can infer precise value types.
 */
export function defineSchema<const O extends OptionsSpec, const P extends readonly PositionalSpec[] = []>(
  definition: SchemaDefinition<O, P>,
): Schema<O, P> {
  const schema: Schema<O, P> = {
    options: definition.options,
    positionals: (definition.positionals ?? []) as P,
  };
  checkSchema(schema);
  return schema;
}

function schemaError(message: string, key?: string): ConfigError {
  return new ConfigError('invalid-schema', `invalid config schema: ${message}`, { key });
}

export const NETWORK_OPTION_KINDS = {
  'tls-ca': 'path',
  'tls-cert': 'path',
  'tls-key': 'path',
  insecure: 'boolean',
} as const satisfies Record<string, OptionKind>;

export function usesAddresses(options: OptionsSpec): boolean {
  return Object.values(options).some(
    (s) => s.kind === 'address' || (s.kind === 'list' && s.items === 'address'),
  );
}

export function hasNetworkOptions(options: OptionsSpec): boolean {
  return Object.entries(NETWORK_OPTION_KINDS).every(([name, kind]) => options[name]?.kind === kind);
}

export function checkSchema(schema: Schema): void {
  for (const [name, spec] of Object.entries(schema.options)) {
    if (!NAME.test(name)) throw schemaError(`option name "${name}" must be kebab-case ([a-z][a-z0-9-]*)`, name);
    if (RESERVED.has(name)) throw schemaError(`option name "--${name}" is built in and cannot be redeclared`, name);
    if (name.startsWith('no-')) throw schemaError(`option name "--${name}" clashes with boolean negation (--no-X)`, name);
    if (!KINDS.has(spec.kind)) throw schemaError(`option --${name} has unknown kind "${String(spec.kind)}"`, name);
    if (typeof spec.description !== 'string' || spec.description === '') {
      throw schemaError(`option --${name} needs a description`, name);
    }
    if (spec.required === true && spec.default !== undefined) {
      throw schemaError(`option --${name} is required and has a default; choose one`, name);
    }
    // A required list needs at least one item; a required boolean is meaningless.
    if (spec.required === true && spec.kind === 'boolean') {
      throw schemaError(`boolean option --${name} cannot be required`, name);
    }
    if (spec.kind === 'enum') {
      if (!Array.isArray(spec.values) || spec.values.length === 0) {
        throw schemaError(`enum option --${name} needs at least one value`, name);
      }
    }
    if (spec.kind === 'list' && spec.items !== undefined && !['string', 'path', 'address'].includes(spec.items)) {
      throw schemaError(`list option --${name} has unknown items kind "${String(spec.items)}"`, name);
    }
    const problem = defaultProblem(spec);
    if (problem !== undefined) throw schemaError(`default of --${name}: ${problem}`, name);
  }
  if (usesAddresses(schema.options) && !hasNetworkOptions(schema.options)) {
    throw schemaError(
      'a schema with address options must include networkOptions (--tls-ca, --tls-cert, --tls-key, --insecure)',
    );
  }
  const seen = new Set<string>();
  let optionalSeen = false;
  schema.positionals.forEach((p, i) => {
    if (!NAME.test(p.name)) throw schemaError(`positional name "${p.name}" must be kebab-case`, p.name);
    if (seen.has(p.name)) throw schemaError(`positional "${p.name}" declared twice`, p.name);
    seen.add(p.name);
    if (p.variadic === true && i !== schema.positionals.length - 1) {
      throw schemaError(`only the last positional may be variadic ("${p.name}" is not last)`, p.name);
    }
    const required = p.required !== false;
    if (required && optionalSeen) {
      throw schemaError(`required positional "${p.name}" follows an optional one`, p.name);
    }
    if (!required) optionalSeen = true;
  });
}
