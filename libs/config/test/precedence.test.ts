import { describe, expect, it } from 'vitest';
import { resolveConfig } from '../src/index.js';
import { agentSchema, BASE, tempFiles } from './fixtures.js';

describe('precedence: flag > env > file > default', () => {
  const file = JSON.stringify({ 'max-mapped-pages': 300, 'log-level': 'warn', 'verdict-deadline': '2s' });

  it('uses defaults when nothing else is set', () => {
    const c = resolveConfig(agentSchema, { argv: BASE, env: {} });
    expect(c.values['max-mapped-pages']).toBe(4096);
    expect(c.values['verdict-deadline']).toBe(250);
    expect(c.values['log-level']).toBe('info');
    expect(c.values['kvmi-listen']).toEqual(['unix:/run/periscope/kvmi.sock']);
    expect(c.values['dry-run']).toBe(false);
    expect(c.values['state-dir']).toBeUndefined();
    expect(c.sources['max-mapped-pages']).toEqual({ kind: 'default' });
    expect(c.sources['state-dir']).toEqual({ kind: 'unset' });
    expect(c.configFile).toBeUndefined();
  });

  it('file overrides default', () => {
    const f = tempFiles({ 'c.json': file });
    const c = resolveConfig(agentSchema, { argv: [...BASE, '--config', f.path('c.json')], env: {} });
    expect(c.values['max-mapped-pages']).toBe(300);
    expect(c.values['verdict-deadline']).toBe(2000);
    expect(c.values['log-level']).toBe('warn');
    expect(c.sources['max-mapped-pages']).toEqual({ kind: 'file', path: f.path('c.json') });
    expect(c.configFile).toBe(f.path('c.json'));
  });

  it('env overrides file', () => {
    const f = tempFiles({ 'c.json': file });
    const c = resolveConfig(agentSchema, {
      argv: [...BASE, '--config', f.path('c.json')],
      env: { PERISCOPE_MAX_MAPPED_PAGES: '500' },
    });
    expect(c.values['max-mapped-pages']).toBe(500);
    expect(c.sources['max-mapped-pages']).toEqual({ kind: 'env', variable: 'PERISCOPE_MAX_MAPPED_PAGES' });
    expect(c.values['log-level']).toBe('warn'); // still from file
  });

  it('flag overrides env and file', () => {
    const f = tempFiles({ 'c.json': file });
    const c = resolveConfig(agentSchema, {
      argv: [...BASE, '--config', f.path('c.json'), '--max-mapped-pages=700'],
      env: { PERISCOPE_MAX_MAPPED_PAGES: '500' },
    });
    expect(c.values['max-mapped-pages']).toBe(700);
    expect(c.sources['max-mapped-pages']).toEqual({ kind: 'flag', flag: '--max-mapped-pages' });
  });

  it('a lower layer with an invalid value is ignored when a higher layer sets the option', () => {
    const c = resolveConfig(agentSchema, {
      argv: [...BASE, '--max-mapped-pages', '8'],
      env: { PERISCOPE_MAX_MAPPED_PAGES: 'abc' },
    });
    expect(c.values['max-mapped-pages']).toBe(8);
  });

  it('an empty env var counts as unset', () => {
    const c = resolveConfig(agentSchema, { argv: BASE, env: { PERISCOPE_MAX_MAPPED_PAGES: '' } });
    expect(c.values['max-mapped-pages']).toBe(4096);
  });

  it('the config file can be named with PERISCOPE_CONFIG; --config wins over it', () => {
    const f = tempFiles({ 'a.json': '{"log-level": "debug"}', 'b.json': '{"log-level": "error"}' });
    const viaEnv = resolveConfig(agentSchema, { argv: BASE, env: { PERISCOPE_CONFIG: f.path('a.json') } });
    expect(viaEnv.values['log-level']).toBe('debug');
    const both = resolveConfig(agentSchema, {
      argv: [...BASE, `--config=${f.path('b.json')}`],
      env: { PERISCOPE_CONFIG: f.path('a.json') },
    });
    expect(both.values['log-level']).toBe('error');
  });

  it('lists: repeated flags, comma-separated env, JSON array; highest layer replaces (no merge)', () => {
    const f = tempFiles({ 'c.json': '{"kvmi-listen": ["unix:/a.sock", "127.0.0.1:7000"]}' });
    const fromFile = resolveConfig(agentSchema, { argv: [...BASE, '--config', f.path('c.json')], env: {} });
    expect(fromFile.values['kvmi-listen']).toEqual(['unix:/a.sock', '127.0.0.1:7000']);
    const fromEnv = resolveConfig(agentSchema, {
      argv: [...BASE, '--config', f.path('c.json')],
      env: { PERISCOPE_KVMI_LISTEN: 'unix:/b.sock, [::1]:7001' },
    });
    expect(fromEnv.values['kvmi-listen']).toEqual(['unix:/b.sock', '[::1]:7001']);
    const fromFlags = resolveConfig(agentSchema, {
      argv: [...BASE, '--kvmi-listen', 'unix:/c.sock', '--kvmi-listen=localhost:7002'],
      env: { PERISCOPE_KVMI_LISTEN: 'unix:/b.sock' },
    });
    expect(fromFlags.values['kvmi-listen']).toEqual(['unix:/c.sock', 'localhost:7002']);
  });

  it('booleans: --flag, --no-flag, --flag=false, env true/false/1/0, JSON true', () => {
    const f = tempFiles({ 'c.json': '{"dry-run": true}' });
    const r = (argv: string[], env: Record<string, string> = {}) =>
      resolveConfig(agentSchema, { argv: [...BASE, ...argv], env }).values['dry-run'];
    expect(r(['--dry-run'])).toBe(true);
    expect(r(['--dry-run=false'])).toBe(false);
    expect(r(['--no-dry-run'], { PERISCOPE_DRY_RUN: 'true' })).toBe(false);
    expect(r([], { PERISCOPE_DRY_RUN: '1' })).toBe(true);
    expect(r(['--config', f.path('c.json')])).toBe(true);
    expect(r(['--config', f.path('c.json')], { PERISCOPE_DRY_RUN: '0' })).toBe(false);
  });

  it('relative paths in a config file are relative to the file', () => {
    const f = tempFiles({ 'c.json': '{"state-dir": "state", "log-level": "info"}' });
    const c = resolveConfig(agentSchema, { argv: [...BASE, '--config', f.path('c.json')], env: {} });
    expect(c.values['state-dir']).toBe(f.path('state'));
    const flag = resolveConfig(agentSchema, { argv: [...BASE, '--state-dir', 'state'], env: {} });
    expect(flag.values['state-dir']).toBe('state');
  });

  it('fileContents replaces reading the config file from disk', () => {
    const c = resolveConfig(agentSchema, {
      argv: [...BASE, '--config', '/definitely/not/here.json'],
      env: {},
      fileContents: '{"max-mapped-pages": 12}',
    });
    expect(c.values['max-mapped-pages']).toBe(12);
    expect(c.sources['max-mapped-pages']).toEqual({ kind: 'file', path: '/definitely/not/here.json' });
  });

  it('durations accept units and bare milliseconds', () => {
    const d = (v: string) => resolveConfig(agentSchema, { argv: [...BASE, '--verdict-deadline', v], env: {} }).values['verdict-deadline'];
    expect(d('1500')).toBe(1500);
    expect(d('1.5s')).toBe(1500);
    expect(d('1s250ms')).toBe(1250);
    expect(d('10s')).toBe(10_000);
  });
});
