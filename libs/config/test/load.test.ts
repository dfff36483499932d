import { describe, expect, expectTypeOf, it } from 'vitest';
import { type ConfigOf, defineSchema, loadConfig, networkOptions, resolveConfig } from '../src/index.js';
import { agentSchema, BASE } from './fixtures.js';

class Exit extends Error {
  constructor(readonly status: number) {
    super(`exit ${status}`);
  }
}

function io() {
  const out = { stdout: '', stderr: '' };
  return {
    out,
    io: {
      stdout: (t: string) => void (out.stdout += t),
      stderr: (t: string) => void (out.stderr += t),
      exit: (code: number): never => {
        throw new Exit(code);
      },
    },
  };
}

describe('loadConfig', () => {
  it('returns the resolved config', () => {
    const h = io();
    const c = loadConfig(agentSchema, BASE, { PERISCOPE_LOG_LEVEL: 'debug' }, { command: 'agent', io: h.io });
    expect(c.values['log-level']).toBe('debug');
    expect(h.out).toEqual({ stdout: '', stderr: '' });
  });

  it('--help prints help to stdout and exits 0', () => {
    const h = io();
    expect(() => loadConfig(agentSchema, ['--help'], {}, { command: 'agent', summary: 'S.', io: h.io })).toThrow(
      new Exit(0),
    );
    expect(h.out.stdout).toContain('Usage: agent [options]');
    expect(h.out.stdout).toContain('env: PERISCOPE_MAX_MAPPED_PAGES');
    expect(h.out.stderr).toBe('');
  });

  it('a ConfigError prints the message to stderr and exits 2', () => {
    const h = io();
    let status: number | undefined;
    try {
      loadConfig(agentSchema, BASE, { PERISCOPE_MAX_MAPPED_PAGES: 'abc' }, { command: 'agent', io: h.io });
    } catch (e) {
      status = (e as Exit).status;
    }
    expect(status).toBe(2);
    expect(h.out.stderr).toBe(
      'agent: invalid value for --max-mapped-pages (from env PERISCOPE_MAX_MAPPED_PAGES): "abc" is not an integer\n' +
        "Run 'agent --help' for usage.\n",
    );
  });
});

describe('inferred types', () => {
  it('values and positionals are typed from the schema', () => {
    const s = defineSchema({
      options: {
        ...networkOptions,
        listen: { kind: 'list', items: 'address', description: 'l' },
        central: { kind: 'address', description: 'c' },
        pages: { kind: 'integer', default: 4, description: 'p' },
        level: { kind: 'enum', values: ['a', 'b'], default: 'a', description: 'e' },
        mode: { kind: 'enum', values: ['x', 'y'], description: 'm' },
        name: { kind: 'string', required: true, description: 'n' },
        wait: { kind: 'duration', description: 'w' },
      },
      positionals: [
        { name: 'vm', description: 'v' },
        { name: 'fn', description: 'f', required: false },
        { name: 'rest', description: 'r', variadic: true, required: false },
      ],
    });
    const c = resolveConfig(s, { argv: ['--name', 'x', 'vm1'] });
    expectTypeOf(c.values.listen).toEqualTypeOf<string[]>();
    expectTypeOf(c.values.central).toEqualTypeOf<string | undefined>();
    expectTypeOf(c.values.pages).toEqualTypeOf<number>();
    expectTypeOf(c.values.level).toEqualTypeOf<'a' | 'b'>();
    expectTypeOf(c.values.mode).toEqualTypeOf<'x' | 'y' | undefined>();
    expectTypeOf(c.values.name).toEqualTypeOf<string>();
    expectTypeOf(c.values.wait).toEqualTypeOf<number | undefined>();
    expectTypeOf(c.values.insecure).toEqualTypeOf<boolean>();
    expectTypeOf(c.values['tls-ca']).toEqualTypeOf<string | undefined>();
    expectTypeOf(c.positionals).toEqualTypeOf<{ vm: string; fn: string | undefined; rest: string[] }>();
    expectTypeOf(c).toEqualTypeOf<ConfigOf<typeof s>>();
    expect(c.positionals).toEqual({ vm: 'vm1', fn: undefined, rest: [] });
    expect(c.values).toMatchObject({ listen: [], pages: 4, level: 'a', name: 'x', insecure: false });
  });
});
