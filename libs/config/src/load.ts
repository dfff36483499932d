import { ConfigError } from './errors.js';
import { formatHelp } from './help.js';
import { resolveConfig, type ResolvedConfig, type ResolveInput } from './resolve.js';
import type { OptionsSpec, PositionalSpec, Schema } from './schema.js';

export interface LoadOptions {
  /** Command name for the usage line and error prefix. Default: `process.argv[1]`'s base name. */
  readonly command?: string;
  readonly summary?: string;
  /** Where help and errors go and how to exit; defaults to the real process. */
  readonly io?: {
    readonly stdout: (text: string) => void;
    readonly stderr: (text: string) => void;
    readonly exit: (code: number) => never;
  };
  /** Passed through to `resolveConfig`. */
  readonly readFile?: ResolveInput['readFile'];
}

/** Exit status for a configuration error (usage error, as in sysexits/BSD convention for CLIs). */
export const CONFIG_ERROR_EXIT_CODE = 2;

/**
 * The entry-point convenience: `resolveConfig` on the real argv/env. `--help` prints the help text to
 * stdout and exits 0; a `ConfigError` prints `<command>: <message>` to stderr and exits 2. Other
 * errors propagate.
 */
export function loadConfig<O extends OptionsSpec, P extends readonly PositionalSpec[]>(
  schema: Schema<O, P>,
  argv: readonly string[] = process.argv.slice(2),
  env: Readonly<Record<string, string | undefined>> = process.env,
  options: LoadOptions = {},
): ResolvedConfig<O, P> {
  const command = options.command ?? defaultCommand();
  const io = options.io ?? {
    stdout: (t: string) => void process.stdout.write(t),
    stderr: (t: string) => void process.stderr.write(t),
    exit: (code: number): never => process.exit(code),
  };
  try {
    return resolveConfig(schema, { argv, env, ...(options.readFile ? { readFile: options.readFile } : {}) });
  } catch (err) {
    if (!(err instanceof ConfigError)) throw err;
    if (err.code === 'help-requested') {
      io.stdout(formatHelp(schema, { command, ...(options.summary !== undefined ? { summary: options.summary } : {}) }));
      return io.exit(0);
    }
    io.stderr(`${command}: ${err.message}\nRun '${command} --help' for usage.\n`);
    return io.exit(CONFIG_ERROR_EXIT_CODE);
  }
}

function defaultCommand(): string {
  const script = process.argv[1];
  if (script === undefined) return 'periscope';
  const base = script.split(/[\\/]/).pop() ?? script;
  return base.replace(/\.(c|m)?js$/, '');
}
