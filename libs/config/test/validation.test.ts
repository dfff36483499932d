import { describe, expect, it } from 'vitest';
import { ConfigError, defineSchema, resolveConfig } from '../src/index.js';
import { agentSchema, BASE, configError, tempFiles } from './fixtures.js';

const resolve = (argv: string[], env: Record<string, string> = {}) => resolveConfig(agentSchema, { argv, env });

describe('invalid-value', () => {
  it('names the key and the env source', () => {
    const e = configError(() => resolve(BASE, { PERISCOPE_MAX_MAPPED_PAGES: 'abc' }));
    expect(e).toBeInstanceOf(ConfigError);
    expect(e.code).toBe('invalid-value');
    expect(e.key).toBe('max-mapped-pages');
    expect(e.source).toEqual({ kind: 'env', variable: 'PERISCOPE_MAX_MAPPED_PAGES' });
    expect(e.message).toBe(
      'invalid value for --max-mapped-pages (from env PERISCOPE_MAX_MAPPED_PAGES): "abc" is not an integer',
    );
  });

  it('names the command line as the source of a flag', () => {
    const e = configError(() => resolve([...BASE, '--max-mapped-pages', '70000']));
    expect(e.code).toBe('invalid-value');
    expect(e.message).toBe(
      'invalid value for --max-mapped-pages (from command line): 70000 is above the maximum 65536',
    );
  });

  it('names the config file as the source', () => {
    const f = tempFiles({ 'c.json': '{"max-mapped-pages": 0}' });
    const e = configError(() => resolve([...BASE, '--config', f.path('c.json')]));
    expect(e.code).toBe('invalid-value');
    expect(e.source).toEqual({ kind: 'file', path: f.path('c.json') });
    expect(e.message).toBe(
      `invalid value for --max-mapped-pages (from config file ${f.path('c.json')}): 0 is below the minimum 1`,
    );
  });

  it('rejects a JSON string where a number is expected', () => {
    const f = tempFiles({ 'c.json': '{"max-mapped-pages": "12"}' });
    const e = configError(() => resolve([...BASE, '--config', f.path('c.json')]));
    expect(e.code).toBe('invalid-value');
    expect(e.message).toContain('expected a JSON number, got a string "12"');
  });

  it('enum values suggest the closest choice', () => {
    const e = configError(() => resolve([...BASE, '--log-level', 'wran']));
    expect(e.code).toBe('invalid-value');
    expect(e.message).toBe(
      'invalid value for --log-level (from command line): "wran" is not one of debug, info, warn, error; did you mean "warn"?',
    );
  });

  it('bad durations, booleans and addresses', () => {
    expect(configError(() => resolve([...BASE, '--verdict-deadline', '5 parsecs'])).message).toContain(
      '"5 parsecs" is not a duration',
    );
    expect(configError(() => resolve([...BASE, '--verdict-deadline', '11s'])).message).toContain(
      'is above the maximum 10s',
    );
    const b = configError(() => resolve(BASE, { PERISCOPE_DRY_RUN: 'maybe' }));
    expect(b.message).toBe(
      'invalid value for --dry-run (from env PERISCOPE_DRY_RUN): "maybe" is not a boolean (use true, false, 1 or 0)',
    );
    const a = configError(() => resolve([...BASE, '--central', 'central-no-port']));
    expect(a.code).toBe('invalid-value');
    expect(a.key).toBe('central');
    expect(a.message).toContain('"central-no-port" is not an address');
    const l = configError(() => resolve(BASE, { PERISCOPE_KVMI_LISTEN: 'unix:/ok.sock,bogus:99999' }));
    expect(l.key).toBe('kvmi-listen');
    expect(l.message).toContain('(from env PERISCOPE_KVMI_LISTEN): item 2: "bogus:99999" is not an address');
  });

  it('runs custom validators and reports their message with key and source', () => {
    const e = configError(() => resolve([...BASE, '--cluster-id', 'Prod-1']));
    expect(e.code).toBe('invalid-value');
    expect(e.message).toBe(
      'invalid value for --cluster-id (from command line): must be lower-case letters and digits',
    );
    expect(resolve([...BASE, '--cluster-id', 'prod1']).values['cluster-id']).toBe('prod1');
  });
});

describe('unknown-option', () => {
  it('unknown flag with a did-you-mean suggestion', () => {
    const e = configError(() => resolve([...BASE, '--max-maped-pages', '3']));
    expect(e.code).toBe('unknown-option');
    expect(e.key).toBe('max-maped-pages');
    expect(e.suggestion).toBe('max-mapped-pages');
    expect(e.message).toBe('unknown option --max-maped-pages (from command line); did you mean --max-mapped-pages?');
  });

  it('unknown flag with nothing close has no suggestion', () => {
    const e = configError(() => resolve([...BASE, '--frobnicate']));
    expect(e.code).toBe('unknown-option');
    expect(e.suggestion).toBeUndefined();
    expect(e.message).toBe('unknown option --frobnicate (from command line)');
  });

  it('--no-X only exists for booleans; single-dash words are rejected', () => {
    expect(configError(() => resolve([...BASE, '--no-log-level'])).code).toBe('unknown-option');
    const e = configError(() => resolve([...BASE, '-v']));
    expect(e.code).toBe('unknown-option');
    expect(e.message).toContain('unknown option -v');
  });
});

describe('missing-required, missing-value, duplicate-option', () => {
  it('missing required option says how to set it', () => {
    const e = configError(() => resolve([]));
    expect(e.code).toBe('missing-required');
    expect(e.key).toBe('node-name');
    expect(e.message).toBe(
      'missing required option --node-name (set --node-name, env PERISCOPE_NODE_NAME, or "node-name" in the config file)',
    );
  });

  it('required option satisfied by env', () => {
    expect(resolve([], { PERISCOPE_NODE_NAME: 'n9' }).values['node-name']).toBe('n9');
  });

  it('a flag without its value', () => {
    const atEnd = configError(() => resolve([...BASE, '--max-mapped-pages']));
    expect(atEnd.code).toBe('missing-value');
    expect(atEnd.key).toBe('max-mapped-pages');
    const beforeFlag = configError(() => resolve(['--node-name', '--dry-run']));
    expect(beforeFlag.code).toBe('missing-value');
    expect(beforeFlag.message).toBe('option --node-name needs a value (from command line)');
  });

  it('a non-list flag given twice', () => {
    const e = configError(() => resolve([...BASE, '--log-level', 'info', '--log-level=debug']));
    expect(e.code).toBe('duplicate-option');
    expect(e.key).toBe('log-level');
  });
});

describe('positionals', () => {
  const trace = defineSchema({
    options: { 'timeout': { kind: 'duration', default: '30s', description: 'Stop tracing after this long.' } },
    positionals: [
      { name: 'vm', description: 'VM to trace.' },
      { name: 'function', description: 'Guest kernel function.' },
      { name: 'args', description: 'Argument filters.', required: false, variadic: true },
    ],
  });

  it('assigns positionals interleaved with flags and after --', () => {
    const c = resolveConfig(trace, { argv: ['vm-7', '--timeout', '5s', 'do_sys_open', '--', '--literal', 'x'] });
    expect(c.positionals).toEqual({ vm: 'vm-7', function: 'do_sys_open', args: ['--literal', 'x'] });
    expect(c.values.timeout).toBe(5000);
  });

  it('optional variadic may be empty', () => {
    expect(resolveConfig(trace, { argv: ['vm', 'fn'] }).positionals.args).toEqual([]);
  });

  it('missing positional is missing-required', () => {
    const e = configError(() => resolveConfig(trace, { argv: ['vm-7'] }));
    expect(e.code).toBe('missing-required');
    expect(e.key).toBe('function');
    expect(e.message).toBe('missing required argument <function>');
  });

  it('extra positional is unexpected-argument', () => {
    const e = configError(() => resolve([...BASE, 'stray']));
    expect(e.code).toBe('unexpected-argument');
    expect(e.message).toBe('unexpected argument "stray" (this command takes no positional arguments)');
  });
});

describe('help-requested', () => {
  it('--help and -h win over other errors', () => {
    expect(configError(() => resolve(['--help'])).code).toBe('help-requested');
    expect(configError(() => resolve(['--bogus', '-h'])).code).toBe('help-requested');
  });
  it('--help after -- is a positional, not help', () => {
    expect(configError(() => resolve([...BASE, '--', '--help'])).code).toBe('unexpected-argument');
  });
});

describe('invalid-schema', () => {
  const bad = (options: Parameters<typeof defineSchema>[0]['options']) => configError(() => defineSchema({ options }));
  it('rejects schema mistakes eagerly', () => {
    expect(bad({ Bad_Name: { kind: 'string', description: 'x' } }).code).toBe('invalid-schema');
    expect(bad({ config: { kind: 'string', description: 'x' } }).code).toBe('invalid-schema');
    expect(bad({ 'no-color': { kind: 'boolean', description: 'x' } }).code).toBe('invalid-schema');
    expect(bad({ n: { kind: 'integer', min: 5, default: 1, description: 'x' } }).message).toContain(
      'default of --n: 1 is below the minimum 5',
    );
    expect(bad({ e: { kind: 'enum', values: ['a', 'b'], default: 'c', description: 'x' } }).code).toBe(
      'invalid-schema',
    );
    expect(bad({ s: { kind: 'string', required: true, default: 'x', description: 'x' } }).code).toBe(
      'invalid-schema',
    );
  });
  it('requires networkOptions when the schema has address options', () => {
    const e = bad({ listen: { kind: 'address', default: '127.0.0.1:1', description: 'x' } });
    expect(e.code).toBe('invalid-schema');
    expect(e.message).toContain('must include networkOptions');
  });
  it('rejects a required positional after an optional one, and a non-final variadic', () => {
    expect(
      configError(() =>
        defineSchema({
          options: {},
          positionals: [
            { name: 'a', description: 'a', required: false },
            { name: 'b', description: 'b' },
          ],
        }),
      ).code,
    ).toBe('invalid-schema');
    expect(
      configError(() =>
        defineSchema({
          options: {},
          positionals: [
            { name: 'a', description: 'a', variadic: true },
            { name: 'b', description: 'b' },
          ],
        }),
      ).code,
    ).toBe('invalid-schema');
  });
});
