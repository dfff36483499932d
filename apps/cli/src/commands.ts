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

import { runHostAgent } from '@periscope/app-host-agent';
import { runSimCli } from '@periscope/simulator';

export const APPS: readonly Subcommand[] = [
  { name: 'sim', summary: 'run simulated VMs (KVM + QEMU + guest) against an introspector socket', run: (argv) => runSimCli(argv) },
  { name: 'host-agent', summary: 'the per-host agent: terminate KVMI sockets, decide locally', run: (argv) => runHostAgent(argv) },
];

export const PLANNED: readonly Subcommand[] = [
  { name: 'analysis', summary: 'the central analysis service', plannedIn: '#8 Analysis service, part 1' },
  { name: 'guest-agent', summary: 'the introspection-VM agent: /dev/kvmmem mapping and scanning', plannedIn: '#10 Guest agent' },
  { name: 'demo', summary: 'the embedded demo: a simulated fleet under attack', plannedIn: '#12 Operators\' experience' },
];
