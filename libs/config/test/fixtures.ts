import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach } from 'vitest';
import { ConfigError, defineSchema, networkOptions } from '../src/index.js';

export const agentSchema = defineSchema({
  options: {
    ...networkOptions,
    'kvmi-listen': {
      kind: 'list',
      items: 'address',
      description: 'Where QEMU connects with its KVMI socket.',
      default: ['unix:/run/periscope/kvmi.sock'],
    },
    central: { kind: 'address', description: 'Analysis service to stream events to.' },
    'max-mapped-pages': {
      kind: 'integer',
      min: 1,
      max: 65536,
      default: 4096,
      description: 'Maximum guest pages mapped at once.',
    },
    'verdict-deadline': {
      kind: 'duration',
      default: '250ms',
      max: '10s',
      description: 'How long to wait for central before applying the default action.',
    },
    'log-level': {
      kind: 'enum',
      values: ['debug', 'info', 'warn', 'error'],
      default: 'info',
      description: 'Log verbosity.',
    },
    'node-name': { kind: 'string', required: true, description: 'Kubernetes node this agent runs on.' },
    'state-dir': { kind: 'path', description: 'Directory for local state.' },
    'dry-run': { kind: 'boolean', description: 'Observe only; never deny.' },
    'cluster-id': {
      kind: 'string',
      description: 'Cluster identifier (lower-case letters and digits).',
      validate: (v) => (/^[a-z0-9]+$/.test(v) ? undefined : 'must be lower-case letters and digits'),
    },
  },
});

/** Minimal valid argv for agentSchema. */
export const BASE = ['--node-name', 'n1'];

/** Runs fn, expecting a ConfigError; returns it for assertions. */
export function configError(fn: () => unknown): ConfigError {
  try {
    fn();
  } catch (err) {
    if (err instanceof ConfigError) return err;
    throw err;
  }
  throw new Error('expected a ConfigError, but nothing was thrown');
}

const dirs: string[] = [];
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

/** A fresh temp directory (removed after each test) with the given files written into it. */
export function tempFiles(files: Record<string, string>): { dir: string; path: (name: string) => string } {
  const dir = mkdtempSync(join(tmpdir(), 'periscope-config-'));
  dirs.push(dir);
  for (const [name, text] of Object.entries(files)) writeFileSync(join(dir, name), text);
  return { dir, path: (name) => join(dir, name) };
}

export const pem = (label: string): string =>
  `-----BEGIN ${label}-----\nTUlJQ0FET0NDQWVP\n-----END ${label}-----\n`;
