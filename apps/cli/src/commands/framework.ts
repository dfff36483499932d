/**
 * How an operator command is declared and run: its schema (@periscope/config: flags > PERISCOPE_* env >
 * --config > defaults; --help), the target options every command shares, and one place that turns a
 * CliError into its message and exit code.
 */
import { defineSchema, loadConfig, type OptionsSpec, type PositionalSpec, type ResolvedConfig, type Schema } from '@periscope/config';
import { CliError, DEFAULT_SERVER, EXIT, makeTarget, type ApiTarget } from './client.js';
import { palette, type OutIo, type Palette } from './output.js';

export const targetOptions = {
  server: { kind: 'string', default: DEFAULT_SERVER, description: "analysis' HTTP API: HOST:PORT or http(s)://HOST:PORT" },
  'token-file': { kind: 'path', description: 'file holding the bearer token analysis requires (its --api-token-file)' },
  'tls-ca': { kind: 'path', description: 'CA bundle (PEM) to verify an https:// --server' },
  timeout: { kind: 'duration', min: 100, default: '10s', description: 'how long to wait for an answer' },
  json: { kind: 'boolean', description: 'print JSON (64-bit values as 0x-hex strings) instead of a table' },
} as const satisfies OptionsSpec;

export const EXIT_CODES_TEXT = 'Exit status: 0 ok, 1 error, 2 usage error, 3 not found, 4 analysis unreachable, 5 refused (token missing or wrong, or the agent refused).';

export interface Ctx<O extends OptionsSpec, P extends readonly PositionalSpec[]> {
  readonly cfg: ResolvedConfig<O, P>;
  readonly io: OutIo;
  readonly p: Palette;
  /** Built lazily: commands that never reach analysis do not need a valid --server. */
  target(): ApiTarget;
  /** --json given. */
  readonly json: boolean;
}

class ExitRequest {
  constructor(readonly code: number) {}
}

export interface OpSpec<O extends OptionsSpec, P extends readonly PositionalSpec[]> {
  readonly command: string;
  readonly summary: string;
  readonly examples: readonly string[];
  readonly schema: Schema<O, P>;
  readonly run: (ctx: Ctx<O, P>) => Promise<number>;
}

/** Parse, run, and map errors to exit codes. */
export async function runOp<O extends OptionsSpec, P extends readonly PositionalSpec[]>(spec: OpSpec<O, P>, argv: readonly string[], io: OutIo, env: NodeJS.ProcessEnv = process.env): Promise<number> {
  let cfg: ResolvedConfig<O, P>;
  try {
    cfg = loadConfig(spec.schema, argv, env, {
      command: `periscope ${spec.command}`,
      summary: `${spec.summary}\n\nExamples:\n${spec.examples.map((e) => `  ${e}`).join('\n')}\n\n${EXIT_CODES_TEXT}`,
      io: {
        stdout: (t) => io.out(t.replace(/\n$/, '')),
        stderr: (t) => io.err(t.replace(/\n$/, '')),
        exit: (code: number): never => {
          throw new ExitRequest(code);
        },
      },
    });
  } catch (e) {
    if (e instanceof ExitRequest) return e.code;
    throw e;
  }
  const values = cfg.values as Record<string, unknown>;
  let target: ApiTarget | undefined;
  const ctx: Ctx<O, P> = {
    cfg,
    io,
    p: palette(io.isTTY === true),
    json: values.json === true,
    target: () =>
      (target ??= makeTarget(
        typeof values.server === 'string' ? values.server : DEFAULT_SERVER,
        typeof values['token-file'] === 'string' ? values['token-file'] : undefined,
        typeof values['tls-ca'] === 'string' ? values['tls-ca'] : undefined,
        typeof values.timeout === 'number' ? values.timeout : 10_000,
      )),
  };
  try {
    return await spec.run(ctx);
  } catch (e) {
    if (e instanceof CliError) {
      io.err(`periscope ${spec.command}: ${e.message}`);
      if (e.exitCode === EXIT.usage) io.err(`Run 'periscope ${spec.command} --help' for usage.`);
      return e.exitCode;
    }
    io.err(`periscope ${spec.command}: ${(e as Error).stack ?? String(e)}`);
    return EXIT.error;
  }
}

/** A schema with the shared target options plus the command's own. */
export function opSchema<const O extends OptionsSpec, const P extends readonly PositionalSpec[] = []>(options: O, positionals?: P): Schema<typeof targetOptions & O, P> {
  return defineSchema({ options: { ...targetOptions, ...options }, ...(positionals ? { positionals } : {}) }) as unknown as Schema<typeof targetOptions & O, P>;
}

/** A command with actions (`vm show|label|…`): dispatches on the first argument. */
export interface Group {
  readonly name: string;
  readonly summary: string;
  readonly actions: readonly { readonly name: string; readonly summary: string; readonly run: (argv: string[], io: OutIo) => Promise<number> }[];
}

export async function runGroup(g: Group, argv: string[], io: OutIo): Promise<number> {
  const [action, ...rest] = argv;
  const help = (): string[] => {
    const w = Math.max(...g.actions.map((a) => a.name.length)) + 2;
    return [
      `Usage: periscope ${g.name} <${g.actions.map((a) => a.name).join('|')}> [options]`,
      '',
      `${g.summary}`,
      '',
      'Actions:',
      ...g.actions.map((a) => `  ${a.name.padEnd(w)}${a.summary}`),
      '',
      `Run \`periscope ${g.name} <action> --help\` for each action's arguments, options and examples.`,
      EXIT_CODES_TEXT,
    ];
  };
  if (action === undefined || action === '--help' || action === '-h' || action === 'help') {
    for (const l of help()) (action === undefined ? io.err : io.out)(l);
    return action === undefined ? EXIT.usage : EXIT.ok;
  }
  const a = g.actions.find((x) => x.name === action);
  if (!a) {
    io.err(`periscope ${g.name}: unknown action '${action}'`);
    for (const l of help()) io.err(l);
    return EXIT.usage;
  }
  return a.run(rest, io);
}
