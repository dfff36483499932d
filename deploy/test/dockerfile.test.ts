/**
 * The Dockerfiles, checked without a Docker engine: parse each one, check pinning and non-root, then
 * replay its stages in a temporary directory — COPY for real (from a .dockerignore-filtered copy of the
 * repository as the build context), RUN through explicit replay rules — and run the final ENTRYPOINT
 * with `--help` from the resulting runtime layout, where only what the image would contain is visible.
 *
 * RUN replay rules (a RUN matching none fails the test, so a new build step needs a rule here):
 * - `apt-get ...`: installs base-image packages (compilers for the native addon); no effect on the layout.
 * - `npm ci ...`: the checkout's installed node_modules (the same lockfile) stand in for a fresh install.
 * - `npm run build`: the checkout's build outputs (dist/, native/build/) are copied in; `npm test` builds first.
 * - `node deploy/scripts/bundle.mjs ...`: runs for real, absolute paths mapped into the stage's root.
 */
import { spawnSync } from 'node:child_process';
import { cpSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, symlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, relative } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { DEPLOY, REPO } from './support.js';

const DOCKER_DIR = join(DEPLOY, 'docker');
const APPS = ['host-agent', 'analysis', 'guest-agent'] as const;
const DIGEST = /^[\w.\-/:]+@sha256:[0-9a-f]{64}$/;

interface Instruction {
  op: string;
  args: string;
  line: number;
}

/** Dockerfile → instructions: comments and parser directives dropped, `\` continuations joined. */
export function parseDockerfile(text: string): Instruction[] {
  const out: Instruction[] = [];
  const lines = text.split('\n');
  for (let i = 0; i < lines.length; i++) {
    const start = i;
    let line = lines[i]!;
    if (/^\s*(#|$)/.test(line)) continue;
    while (/\\\s*$/.test(line) && i + 1 < lines.length) {
      i++;
      if (/^\s*#/.test(lines[i]!)) continue;
      line = line.replace(/\\\s*$/, ' ') + lines[i]!.trim();
    }
    const m = /^\s*([A-Za-z]+)\s+(.*)$/.exec(line);
    if (!m) throw new Error(`line ${start + 1}: not an instruction: ${line}`);
    const op = m[1]!.toUpperCase();
    const known = ['FROM', 'RUN', 'COPY', 'WORKDIR', 'ENV', 'LABEL', 'USER', 'EXPOSE', 'ENTRYPOINT', 'CMD', 'ARG'];
    if (!known.includes(op)) throw new Error(`line ${start + 1}: instruction ${op} has no replay rule`);
    out.push({ op, args: m[2]!.trim(), line: start + 1 });
  }
  return out;
}

interface Stage {
  name: string;
  image: string;
  steps: Instruction[];
}

function stages(instructions: Instruction[]): Stage[] {
  const out: Stage[] = [];
  for (const ins of instructions) {
    if (ins.op === 'FROM') {
      const m = /^(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?$/i.exec(ins.args);
      if (!m) throw new Error(`line ${ins.line}: bad FROM`);
      out.push({ name: m[2] ?? String(out.length), image: m[1]!, steps: [] });
    } else {
      if (out.length === 0) throw new Error(`line ${ins.line}: ${ins.op} before FROM`);
      out[out.length - 1]!.steps.push(ins);
    }
  }
  return out;
}

function jsonForm(ins: Instruction): string[] {
  const v = JSON.parse(ins.args) as unknown;
  if (!Array.isArray(v) || !v.every((x) => typeof x === 'string')) throw new Error(`line ${ins.line}: ${ins.op} must be exec (JSON) form`);
  return v;
}

/** .dockerignore patterns (the subset we use: literal paths, `*`, leading `**\/`) → matcher on relative paths. */
function ignoreMatcher(text: string): (rel: string) => boolean {
  const res = text
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l !== '' && !l.startsWith('#'))
    .map((p) => {
      if (p.startsWith('!')) throw new Error('negated .dockerignore patterns have no replay rule');
      const body = p
        .replace(/^\.?\//, '')
        .split('/')
        .map((seg) => (seg === '**' ? '\u0000' : seg.replace(/[.+^${}()|[\]\\]/g, '\\$&').replace(/\*/g, '[^/]*').replace(/\?/g, '[^/]')))
        .join('/')
        .replace(/\u0000\//g, '(?:.*/)?')
        .replace(/\u0000/g, '.*');
      return new RegExp(`^${body}(?:/.*)?$`);
    });
  return (rel) => res.some((r) => r.test(rel));
}

/** Every workspace path from the lockfile (e.g. libs/config). */
function workspaces(): string[] {
  const lock = JSON.parse(readFileSync(join(REPO, 'package-lock.json'), 'utf8')) as { packages: Record<string, unknown> };
  return Object.keys(lock.packages).filter((k) => k !== '' && !k.startsWith('node_modules/') && !k.includes('/node_modules/'));
}

interface Replay {
  root: string;
  runtime: { dir: string; workdir: string; user: string | undefined; entrypoint: string[]; cmd: string[]; env: Record<string, string> };
}

function replay(app: string, work: string): Replay {
  const dockerfile = readFileSync(join(DOCKER_DIR, `${app}.Dockerfile`), 'utf8');
  const ignored = ignoreMatcher(readFileSync(join(DOCKER_DIR, `${app}.Dockerfile.dockerignore`), 'utf8'));
  const all = stages(parseDockerfile(dockerfile));
  // The build context: the repository as `docker build .` would send it.
  const context = join(work, 'context');
  cpSync(REPO, context, {
    recursive: true,
    filter: (src) => {
      const rel = relative(REPO, src);
      return rel === '' || !ignored(rel);
    },
  });
  const stageRoot = (name: string) => join(work, 'stages', name);
  let last: Replay['runtime'] | undefined;
  for (const stage of all) {
    const root = stageRoot(stage.name);
    mkdirSync(root, { recursive: true });
    let workdir = '/';
    let user: string | undefined;
    let entrypoint: string[] = [];
    let cmd: string[] = [];
    const env: Record<string, string> = {};
    const inRoot = (p: string) => join(root, p.startsWith('/') ? p : join(workdir, p));
    for (const step of stage.steps) {
      const at = `${app}.Dockerfile:${step.line}`;
      switch (step.op) {
        case 'WORKDIR':
          workdir = step.args.startsWith('/') ? step.args : join(workdir, step.args);
          mkdirSync(join(root, workdir), { recursive: true });
          break;
        case 'ENV': {
          for (const m of step.args.matchAll(/(\w+)=("[^"]*"|\S+)/g)) env[m[1]!] = m[2]!.replace(/^"|"$/g, '');
          break;
        }
        case 'USER':
          user = step.args;
          break;
        case 'ENTRYPOINT':
          entrypoint = jsonForm(step);
          break;
        case 'CMD':
          cmd = jsonForm(step);
          break;
        case 'LABEL':
        case 'EXPOSE':
        case 'ARG':
          break;
        case 'COPY': {
          const words = step.args.split(/\s+/);
          const flags = words.filter((w) => w.startsWith('--'));
          const paths = words.filter((w) => !w.startsWith('--'));
          const from = flags.find((f) => f.startsWith('--from='))?.slice('--from='.length);
          const dest = paths.pop()!;
          for (const f of flags) if (!/^--(from|chown|chmod|link)=/.test(f) && f !== '--link') throw new Error(`${at}: COPY flag ${f} has no replay rule`);
          for (const src of paths) {
            const source = from === undefined ? join(context, src) : join(stageRoot(from), src);
            if (!existsSync(source)) throw new Error(`${at}: COPY source ${from ? `${from}:` : ''}${src} does not exist`);
            const target = inRoot(dest);
            if (statSync(source).isDirectory()) cpSync(source, target, { recursive: true });
            else {
              mkdirSync(dest.endsWith('/') ? target : join(target, '..'), { recursive: true });
              cpSync(source, dest.endsWith('/') ? join(target, src.split('/').pop()!) : target);
            }
          }
          break;
        }
        case 'RUN': {
          const cwd = join(root, workdir);
          const command = step.args;
          if (/^apt-get\s/.test(command)) break; // base-image packages only
          if (/^npm ci(\s|$)/.test(command)) {
            symlinkSync(join(REPO, 'node_modules'), join(cwd, 'node_modules'));
            // Nested installs inside workspaces (npm ci makes them from the same lockfile).
            for (const ws of workspaces()) {
              const nested = join(REPO, ws, 'node_modules');
              if (existsSync(nested)) cpSync(nested, join(cwd, ws, 'node_modules'), { recursive: true, dereference: true });
            }
            break;
          }
          if (/^npm run build$/.test(command)) {
            for (const ws of workspaces()) {
              for (const out of ['dist', 'native/build']) {
                const built = join(REPO, ws, out);
                if (existsSync(built)) cpSync(built, join(cwd, ws, out), { recursive: true });
              }
            }
            break;
          }
          const bundle = /^node (deploy\/scripts\/bundle\.mjs)((?:\s+\S+)+)$/.exec(command);
          if (bundle) {
            const args = bundle[2]!.trim().split(/\s+/).map((a) => (a.startsWith('/') ? join(root, a) : a));
            const r = spawnSync(process.execPath, [bundle[1]!, ...args], { cwd, encoding: 'utf8', env: { PATH: process.env.PATH ?? '/usr/bin:/bin' } });
            if (r.status !== 0) throw new Error(`${at}: ${command} failed (${r.status}):\n${r.stderr}${r.stdout}`);
            break;
          }
          throw new Error(`${at}: RUN ${command} has no replay rule`);
        }
        default:
          throw new Error(`${at}: ${step.op} has no replay rule`);
      }
    }
    last = { dir: root, workdir, user, entrypoint, cmd, env };
  }
  return { root: work, runtime: last! };
}

const work = mkdtempSync(join(tmpdir(), 'periscope-docker-'));
afterAll(() => rmSync(work, { recursive: true, force: true }));

describe.each(APPS)('%s.Dockerfile', (app) => {
  const text = () => readFileSync(join(DOCKER_DIR, `${app}.Dockerfile`), 'utf8');

  it('is multi-stage, digest-pinned, never latest, non-root, exec-form entry point', () => {
    const all = stages(parseDockerfile(text()));
    expect(all.length).toBeGreaterThanOrEqual(2);
    for (const s of all) {
      expect(s.image, `stage ${s.name}`).toMatch(DIGEST);
      expect(s.image.split('@')[0]).not.toMatch(/:latest$/);
    }
    expect(text()).not.toMatch(/:latest\b/);
    const final = all[all.length - 1]!;
    const users = final.steps.filter((s) => s.op === 'USER');
    expect(users.length, 'final stage sets USER').toBeGreaterThan(0);
    const user = users[users.length - 1]!.args;
    expect(user).toMatch(/^[1-9]\d*(:[1-9]\d*)?$/); // numeric, so runAsNonRoot can verify it
    const entry = final.steps.filter((s) => s.op === 'ENTRYPOINT');
    expect(entry).toHaveLength(1);
    expect(jsonForm(entry[0]!)[0]).toBe('node');
    // Only the build stage installs anything; the runtime stage adds no packages and runs no commands.
    expect(final.steps.filter((s) => s.op === 'RUN')).toEqual([]);
  });

  it('uses the same base digest as the other Dockerfiles', () => {
    const base = (a: string) => stages(parseDockerfile(readFileSync(join(DOCKER_DIR, `${a}.Dockerfile`), 'utf8'))).map((s) => s.image);
    expect(new Set([...base('host-agent'), ...base('analysis'), ...base('guest-agent')]).size).toBe(1);
  });

  it('replays into a runtime layout that runs `--help` on its own', () => {
    const dir = join(work, app);
    const { runtime } = replay(app, dir);
    expect(runtime.user).toMatch(/^65532/);
    const [bin, script, ...rest] = runtime.entrypoint;
    expect(bin).toBe('node');
    const entry = join(runtime.dir, script!);
    expect(existsSync(entry), `${script} exists in the image`).toBe(true);
    // Nothing outside the runtime layout is reachable: it lives under the OS temp dir, not the repository.
    expect(relative(REPO, entry).startsWith('..')).toBe(true);
    const r = spawnSync(process.execPath, [entry, ...rest, '--help'], {
      cwd: join(runtime.dir, runtime.workdir),
      encoding: 'utf8',
      env: { PATH: process.env.PATH ?? '/usr/bin:/bin', ...runtime.env },
      timeout: 30_000,
    });
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    expect(r.stdout).toContain(`Usage: periscope ${app}`);
    expect(r.stdout).toContain('--tls-ca');
    // The image carries the app's closure, not the development tree.
    const modules = readdirSync(join(runtime.dir, 'opt/periscope/node_modules'));
    for (const dev of ['vitest', 'typescript', 'nx', '@nx', '@bufbuild/buf']) expect(modules).not.toContain(dev);
  });
});
