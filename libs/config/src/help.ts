import { envVarName, type OptionSpec, type Schema } from './schema.js';
import { formatDuration, parseDuration } from './values.js';

export interface HelpMeta {
  /** Command as typed by the user, e.g. `periscope-host-agent` or `periscope trace`. */
  readonly command: string;
  /** One paragraph describing the command. */
  readonly summary?: string;
}

function range(min: string | undefined, max: string | undefined): string {
  if (min !== undefined && max !== undefined) return ` ${min}..${max}`;
  if (min !== undefined) return ` >=${min}`;
  if (max !== undefined) return ` <=${max}`;
  return '';
}

function durationText(v: number | string | undefined): string | undefined {
  if (v === undefined) return undefined;
  const ms = typeof v === 'string' ? parseDuration(v) : v;
  return ms === undefined ? String(v) : formatDuration(ms);
}

function valueLabel(spec: OptionSpec): string {
  switch (spec.kind) {
    case 'boolean':
      return '';
    case 'integer':
      return ` <integer${range(spec.min?.toString(), spec.max?.toString())}>`;
    case 'duration':
      return ` <duration${range(durationText(spec.min), durationText(spec.max))}>`;
    case 'enum':
      return ` <${spec.values.join('|')}>`;
    case 'list':
      return ` <${spec.items ?? 'string'}>  (repeatable; env: comma-separated)`;
    default:
      return ` <${spec.kind}>`;
  }
}

function defaultText(spec: OptionSpec): string | undefined {
  switch (spec.kind) {
    case 'boolean':
      return String(spec.default ?? false);
    case 'list':
      return spec.default === undefined || spec.default.length === 0 ? undefined : spec.default.join(',');
    case 'duration':
      return durationText(spec.default);
    default:
      if (spec.default === undefined) return undefined;
      return spec.default === '' ? '""' : String(spec.default);
  }
}

function entry(lines: string[], head: string, description: string, facts: string[]): void {
  lines.push(`  ${head}`);
  lines.push(`      ${description}`);
  if (facts.length > 0) lines.push(`      ${facts.join('   ')}`);
}

/**
 * Help text generated from the schema: usage line, summary, positionals, then every option with its
 * value type, default (or `required`) and environment variable, followed by the built-in `--config`
 * and `--help`.
 */
export function formatHelp(schema: Schema, meta: HelpMeta): string {
  const usage = [`Usage: ${meta.command} [options]`];
  for (const p of schema.positionals) {
    const shown = p.variadic === true ? `${p.name}...` : p.name;
    usage.push(p.required === false ? `[${shown}]` : `<${shown}>`);
  }
  const lines = [usage.join(' '), ''];
  if (meta.summary !== undefined && meta.summary !== '') lines.push(meta.summary, '');

  if (schema.positionals.length > 0) {
    lines.push('Arguments:');
    const width = Math.max(...schema.positionals.map((p) => p.name.length + (p.variadic === true ? 5 : 2)));
    for (const p of schema.positionals) {
      const shown = p.variadic === true ? `<${p.name}...>` : `<${p.name}>`;
      const note = p.required === false ? ' (optional)' : '';
      lines.push(`  ${shown.padEnd(width)}  ${p.description}${note}`);
    }
    lines.push('');
  }

  lines.push('Options:');
  for (const [name, spec] of Object.entries(schema.options)) {
    const head =
      spec.kind === 'boolean' ? `--${name}, --no-${name}` : `--${name}${valueLabel(spec)}`;
    const facts: string[] = [];
    const def = defaultText(spec);
    if (spec.required === true) facts.push('required');
    else if (def !== undefined) facts.push(`default: ${def}`);
    facts.push(`env: ${envVarName(name)}`);
    entry(lines, head, spec.description, facts);
  }
  entry(
    lines,
    '--config <path>',
    'Read options from a JSON file whose keys are option names. Precedence: flag > env > file > default.',
    [`env: ${envVarName('config')}`],
  );
  entry(lines, '-h, --help', 'Show this help and exit.', []);
  return lines.join('\n') + '\n';
}
