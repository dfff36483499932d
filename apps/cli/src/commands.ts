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
  readonly run?: (argv: string[]) => Promise<number>;
}

import { runAnalysis } from '@periscope/app-analysis';
import { runGuestAgent } from '@periscope/app-guest-agent';
import { runHostAgent } from '@periscope/app-host-agent';
import { runSimCli } from '@periscope/simulator';
import { runDemo } from './demo/command.js';

export const APPS: readonly Subcommand[] = [
  { name: 'sim', summary: 'run simulated VMs (KVM + QEMU + guest) against an introspector socket', run: (argv) => runSimCli(argv) },
  { name: 'host-agent', summary: 'the per-host agent: terminate KVMI sockets, decide locally', run: (argv) => runHostAgent(argv) },
  { name: 'analysis', summary: 'the central analysis service: inventory, policies, alerts, exceptions', run: (argv) => runAnalysis(argv) },
  { name: 'guest-agent', summary: 'the introspection-VM agent: /dev/kvmmem mapping, hashing and scanning for analysis', run: (argv) => runGuestAgent(argv) },
  // The demo starts a part only when its command is in this table (analysis, guest-agent join as they land).
  { name: 'demo', summary: 'the embedded demo: a simulated fleet under attack, as separate processes', run: (argv) => runDemo(argv, { commands: new Set(APPS.map((c) => c.name)) }) },
];

export const PLANNED: readonly Subcommand[] = [];
