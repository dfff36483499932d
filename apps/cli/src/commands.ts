/**
 * The subcommand table of `bin/periscope`. Each row is one command; `run` receives the arguments after
 * the command name and returns the process exit code. Commands whose app has not landed yet say so
 * and which issue brings them, instead of pretending.
 */
export interface Subcommand {
  readonly name: string;
  readonly summary: string;
  /** Issue that brings it, for commands not built yet. */
  readonly plannedIn?: string;
  /** `io`: where the command writes (the CLI's; absent = the process's stdout/stderr). */
  readonly run?: (argv: string[], io?: CommandIo) => Promise<number>;
}

/** Line-oriented output of a command (main.ts's Io). */
export interface CommandIo {
  out: (line: string) => void;
  err: (line: string) => void;
  isTTY?: boolean;
}

const textIo = (io: CommandIo) => ({ stdout: (t: string) => io.out(t.replace(/\n$/, '')), stderr: (t: string) => io.err(t.replace(/\n$/, '')) });

import { runAnalysis } from '@periscope/app-analysis';
import { runGuestAgent } from '@periscope/app-guest-agent';
import { runHostAgent } from '@periscope/app-host-agent';
import { runSimCli } from '@periscope/simulator';
import { runDemo } from './demo/command.js';

export const APPS: readonly Subcommand[] = [
  { name: 'sim', summary: 'run simulated VMs (KVM + QEMU + guest) against an introspector socket', run: (argv) => runSimCli(argv) },
  { name: 'host-agent', summary: 'the per-host agent: terminate KVMI sockets, decide locally', run: (argv) => runHostAgent(argv) },
  { name: 'analysis', summary: 'the central analysis service: inventory, policies, alerts, exceptions', run: (argv, io) => runAnalysis(argv, io ? textIo(io) : undefined) },
  { name: 'guest-agent', summary: 'the introspection-VM agent: /dev/kvmmem mapping, hashing and scanning for analysis', run: (argv, io) => runGuestAgent(argv, io ? textIo(io) : undefined) },
  // The demo starts a part only when its command is in this table (analysis, guest-agent join as they land).
  { name: 'demo', summary: 'the embedded demo: a simulated fleet under attack, as separate processes', run: (argv) => runDemo(argv, { commands: new Set(APPS.map((c) => c.name)) }) },
];

export const PLANNED: readonly Subcommand[] = [];
