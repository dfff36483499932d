export { ConfigError, describeSource, type ConfigErrorCode, type ConfigErrorDetails, type ValueSource } from './errors.js';
export {
  defineSchema,
  envVarName,
  type AddressOption,
  type BooleanOption,
  type DurationOption,
  type EnumOption,
  type IntegerOption,
  type ListOption,
  type OptionKind,
  type OptionSpec,
  type OptionsSpec,
  type OptionValue,
  type OptionValues,
  type PathOption,
  type PositionalSpec,
  type PositionalValues,
  type Schema,
  type SchemaDefinition,
  type StringOption,
  type Validator,
} from './schema.js';
export { networkOptions, type TlsMaterial, type TlsPaths } from './network.js';
export { isLocalAddress, parseAddress, type ParsedAddress } from './address.js';
export { parseDuration, formatDuration } from './values.js';
export { resolveConfig, type ConfigOf, type ResolvedConfig, type ResolveInput } from './resolve.js';
export { formatHelp, type HelpMeta } from './help.js';
export { loadConfig, CONFIG_ERROR_EXIT_CODE, type LoadOptions } from './load.js';
