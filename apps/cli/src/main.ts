/**
 * `periscope` — the one operator entry point. Dispatches to subcommands; every subcommand has --help.
 */
import { defineSchema, formatHelp, loadConfig } from '@periscope/config';
import { KVMI_VERSION } from '@periscope/kvmi';
import { APPS, PLANNED, type Subcommand } from './commands.js';
import { EXIT_CODES_TEXT } from './commands/framework.js';
import { operatorCommands } from './commands/ops.js';
import { readVersionInfo } from './version.js';

export interface Io {
  out: (line: string) => void;
  err: (line: string) => void;
  /** stdout is a terminal: colours and progress (operator commands). */
  isTTY?: boolean;
}
const stdio: Io = { out: (l) => process.stdout.write(`${l}\n`), err: (l) => process.stderr.write(`${l}\n`), isTTY: process.stdout.isTTY === true };

const versionSchema = defineSchema({
  options: { json: { kind: 'boolean', description: 'print machine-readable JSON' } },
});

function builtin(io: Io): Subcommand[] {
  return [
    {
      name: 'version',
      summary: 'print the Periscope version, protocol versions and build',
      run: async (argv) => {
        const cfg = loadConfig(versionSchema, argv, process.env, { command: 'periscope version', summary: 'Print the Periscope version, the KVMI protocol version spoken, and the build.' });
        const info = { ...readVersionInfo(), kvmiVersion: KVMI_VERSION, kvmiDialect: 'v12', node: process.version };
        if (cfg.values.json) io.out(JSON.stringify(info));
        else {
          io.out(`periscope ${info.version}${info.commit ? ` (${info.commit})` : ''}`);
          io.out(`KVMI protocol: ${info.kvmiDialect}, version ${info.kvmiVersion}`);
          io.out(`node ${info.node}`);
        }
        return 0;
      },
    },
  ];
}

export function usage(commands: readonly Subcommand[]): string {
  const width = Math.max(...commands.map((c) => c.name.length)) + 2;
  const lines = ['Usage: periscope <command> [options]', '', 'Commands:'];
  for (const c of commands) lines.push(`  ${c.name.padEnd(width)}${c.summary}${c.plannedIn ? ` (not built yet: ${c.plannedIn})` : ''}`);
  lines.push(
    '',
    'Run `periscope <command> --help` for the options and examples of a command.',
    'Operator commands talk to analysis\' HTTP API: --server HOST:PORT (env PERISCOPE_SERVER, default 127.0.0.1:7401),',
    '--token-file FILE (env PERISCOPE_TOKEN_FILE), --json for machine-readable output (docs/cli.md).',
    EXIT_CODES_TEXT,
  );
  return lines.join('\n');
}

const plannedSchema = defineSchema({ options: {} });

export async function main(argv: string[], io: Io = stdio): Promise<number> {
  const commands = [...builtin(io), ...APPS, ...operatorCommands(() => io), ...PLANNED];
  const [name, ...rest] = argv;
  if (name === undefined || name === '--help' || name === '-h' || name === 'help') {
    io.out(usage(commands));
    return name === undefined ? 2 : 0;
  }
  const cmd = commands.find((c) => c.name === name);
  if (!cmd) {
    io.err(`periscope: unknown command '${name}'`);
    io.err(usage(commands));
    return 2;
  }
  if (cmd.run) return cmd.run(rest, io);
  if (rest.includes('--help') || rest.includes('-h')) {
    io.out(formatHelp(plannedSchema, { command: `periscope ${cmd.name}`, summary: `${cmd.summary}. Not built yet: ${cmd.plannedIn}.` }));
    return 0;
  }
  io.err(`periscope ${cmd.name}: not built yet — ${cmd.summary}; arrives with issue ${cmd.plannedIn}.`);
  io.err('Built so far: the simulator (`periscope sim --help`), the host agent (`periscope host-agent --help`) and the demo that runs them together (`periscope demo --help`).');
  return 3;
}
