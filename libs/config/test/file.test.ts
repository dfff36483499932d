import { describe, expect, it } from 'vitest';
import { resolveConfig } from '../src/index.js';
import { agentSchema, BASE, configError, tempFiles } from './fixtures.js';

describe('config file errors', () => {
  it('missing file is bad-config-file naming the path and where it was set', () => {
    const f = tempFiles({});
    const missing = f.path('nope.json');
    const e = configError(() => resolveConfig(agentSchema, { argv: [...BASE, '--config', missing], env: {} }));
    expect(e.code).toBe('bad-config-file');
    expect(e.key).toBe('config');
    expect(e.message).toMatch(new RegExp(`^cannot read config file ${missing} \\(from command line\\): ENOENT`));

    const viaEnv = configError(() => resolveConfig(agentSchema, { argv: BASE, env: { PERISCOPE_CONFIG: missing } }));
    expect(viaEnv.code).toBe('bad-config-file');
    expect(viaEnv.message).toContain('(from env PERISCOPE_CONFIG)');
  });

  it('a directory is bad-config-file', () => {
    const f = tempFiles({});
    const e = configError(() => resolveConfig(agentSchema, { argv: [...BASE, '--config', f.dir], env: {} }));
    expect(e.code).toBe('bad-config-file');
    expect(e.message).toContain('EISDIR');
  });

  it('bad JSON says JSON only', () => {
    const f = tempFiles({ 'c.yaml': 'max-mapped-pages: 12\n' });
    const e = configError(() =>
      resolveConfig(agentSchema, { argv: [...BASE, '--config', f.path('c.yaml')], env: {} }),
    );
    expect(e.code).toBe('bad-config-file');
    expect(e.message).toContain(`config file ${f.path('c.yaml')} is not valid JSON`);
    expect(e.message).toContain('only JSON config files are supported; YAML is not');
  });

  it('JSON that is not an object', () => {
    const f = tempFiles({ 'c.json': '["max-mapped-pages"]' });
    const e = configError(() => resolveConfig(agentSchema, { argv: [...BASE, '--config', f.path('c.json')], env: {} }));
    expect(e.code).toBe('bad-config-file');
    expect(e.message).toContain('must contain a JSON object');
  });

  it('unknown key is unknown-option with a suggestion', () => {
    const f = tempFiles({ 'c.json': '{"log-level": "info", "max_mapped_pages": 3}' });
    const e = configError(() => resolveConfig(agentSchema, { argv: [...BASE, '--config', f.path('c.json')], env: {} }));
    expect(e.code).toBe('unknown-option');
    expect(e.key).toBe('max_mapped_pages');
    expect(e.source).toEqual({ kind: 'file', path: f.path('c.json') });
    expect(e.message).toBe(
      `unknown key "max_mapped_pages" (from config file ${f.path('c.json')}); did you mean "max-mapped-pages"?`,
    );
  });

  it('unknown key with nothing close has no suggestion', () => {
    const f = tempFiles({ 'c.json': '{"bogus": 1}' });
    const e = configError(() => resolveConfig(agentSchema, { argv: [...BASE, '--config', f.path('c.json')], env: {} }));
    expect(e.code).toBe('unknown-option');
    expect(e.suggestion).toBeUndefined();
  });

  it('a config file may not name another config file', () => {
    const f = tempFiles({ 'c.json': '{"config": "/other.json"}' });
    const e = configError(() => resolveConfig(agentSchema, { argv: [...BASE, '--config', f.path('c.json')], env: {} }));
    expect(e.code).toBe('bad-config-file');
  });

  it('accepts a UTF-8 BOM', () => {
    const f = tempFiles({ 'c.json': '\uFEFF{"max-mapped-pages": 9}' });
    const c = resolveConfig(agentSchema, { argv: [...BASE, '--config', f.path('c.json')], env: {} });
    expect(c.values['max-mapped-pages']).toBe(9);
  });
});
