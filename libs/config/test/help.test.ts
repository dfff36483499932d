import { describe, expect, it } from 'vitest';
import { defineSchema, envVarName, formatHelp } from '../src/index.js';
import { agentSchema } from './fixtures.js';

describe('formatHelp', () => {
  const text = formatHelp(agentSchema, { command: 'periscope-host-agent', summary: 'Terminates KVMI sockets.' });

  it('starts with a usage line and the summary', () => {
    expect(text.split('\n')[0]).toBe('Usage: periscope-host-agent [options]');
    expect(text).toContain('\nTerminates KVMI sockets.\n');
  });

  it('lists every option with its env var name', () => {
    for (const name of Object.keys(agentSchema.options)) {
      expect(text).toMatch(new RegExp(`^  --${name}\\b`, 'm'));
      expect(text).toContain(`env: ${envVarName(name)}`);
    }
    expect(text).toContain('--config <path>');
    expect(text).toContain('env: PERISCOPE_CONFIG');
    expect(text).toContain('-h, --help');
  });

  it('shows types, ranges, defaults and required', () => {
    expect(text).toContain('--max-mapped-pages <integer 1..65536>');
    expect(text).toContain('default: 4096   env: PERISCOPE_MAX_MAPPED_PAGES');
    expect(text).toContain('--verdict-deadline <duration <=10s>');
    expect(text).toContain('default: 250ms   env: PERISCOPE_VERDICT_DEADLINE');
    expect(text).toContain('--log-level <debug|info|warn|error>');
    expect(text).toContain('--kvmi-listen <address>  (repeatable; env: comma-separated)');
    expect(text).toContain('default: unix:/run/periscope/kvmi.sock   env: PERISCOPE_KVMI_LISTEN');
    expect(text).toContain('--dry-run, --no-dry-run');
    expect(text).toContain('--central <address>');
    expect(text).toContain('--tls-ca <path>');
    expect(text).toMatch(/--node-name <string>\n {6}Kubernetes node this agent runs on\.\n {6}required   env: PERISCOPE_NODE_NAME/);
    // Descriptions appear.
    for (const spec of Object.values(agentSchema.options)) expect(text).toContain(spec.description);
  });

  it('renders positionals in usage and an Arguments section', () => {
    const trace = defineSchema({
      options: {},
      positionals: [
        { name: 'vm', description: 'VM to trace.' },
        { name: 'function', description: 'Guest kernel function.' },
        { name: 'args', description: 'Argument filters.', required: false, variadic: true },
      ],
    });
    const t = formatHelp(trace, { command: 'periscope trace' });
    expect(t.split('\n')[0]).toBe('Usage: periscope trace [options] <vm> <function> [args...]');
    expect(t).toContain('Arguments:\n  <vm>        VM to trace.\n  <function>  Guest kernel function.\n  <args...>   Argument filters. (optional)');
  });
});

describe('envVarName', () => {
  it('upper-cases and turns dashes into underscores', () => {
    expect(envVarName('kvmi-listen')).toBe('PERISCOPE_KVMI_LISTEN');
    expect(envVarName('insecure')).toBe('PERISCOPE_INSECURE');
  });
});
