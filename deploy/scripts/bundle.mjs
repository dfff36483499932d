#!/usr/bin/env node
/**
 * Assembles the runtime layout of one Periscope app for its container image (deploy/docker/<app>.Dockerfile):
 *
 *   <out>/<app>.mjs            entry: imports the app's run function and passes argv through
 *   <out>/package.json         {"type": "module"}, name and version
 *   <out>/node_modules/...     the app's production dependency closure, exactly as installed by `npm ci`
 *
 * Run from a built checkout (after `npm ci` and `npm run build`): `node deploy/scripts/bundle.mjs <app> <out>`.
 *
 * The closure is computed from package-lock.json the way Node will resolve it at run time: start from the
 * app's workspace and the root package's `dependencies` (the monorepo's shared runtime deps, e.g.
 * @grpc/grpc-js for the generated contracts), follow `dependencies`, `optionalDependencies` (skipped when
 * not installed for this platform) and required `peerDependencies`, looking each name up through the
 * nested node_modules chain. devDependencies are never followed. Workspace packages (`link: true`) are
 * copied as real directories under node_modules/<name> with their package.json, build output and runtime
 * data (policies, profiles, native builds) — not their sources, tests, benchmarks or tsconfig files.
 */
import { cpSync, existsSync, mkdirSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

/** One row per app: its workspace, package name and exported run function (argv → exit code). */
export const APPS = {
  'host-agent': { workspace: 'apps/host-agent', pkg: '@periscope/app-host-agent', run: 'runHostAgent' },
  analysis: { workspace: 'apps/analysis', pkg: '@periscope/app-analysis', run: 'runAnalysis' },
  'guest-agent': { workspace: 'apps/guest-agent', pkg: '@periscope/app-guest-agent', run: 'runGuestAgent' },
};

/** Names never copied from a workspace package: sources, tests, tooling. */
const WORKSPACE_EXCLUDE = new Set(['src', 'test', 'bench', 'scripts', 'node_modules', 'coverage', 'vitest.config.ts', '.gitignore']);
const WORKSPACE_EXCLUDE_RE = /^tsconfig.*\.json$|\.tsbuildinfo$/;
/** Inside a workspace's dist/: type declarations are not needed at run time. */
const DIST_EXCLUDE_RE = /\.d\.ts(\.map)?$|\.tsbuildinfo$/;

export class BundleError extends Error {}

function readJson(path) {
  return JSON.parse(readFileSync(path, 'utf8'));
}

/** Lock key a `name` required from lock key `from` resolves to, following Node's node_modules walk. */
function resolveKey(packages, from, name) {
  let dir = from;
  for (;;) {
    const key = dir === '' ? `node_modules/${name}` : `${dir}/node_modules/${name}`;
    if (Object.hasOwn(packages, key)) return key;
    if (dir === '') return undefined;
    // node_modules/a/node_modules/b -> node_modules/a; node_modules/a or a workspace path -> the root.
    const idx = dir.lastIndexOf('/node_modules/');
    dir = idx >= 0 ? dir.slice(0, idx) : '';
  }
}

/**
 * The production closure of `roots` (lock keys). Returns lock keys of every package to ship, workspace
 * packages as their workspace path (e.g. `libs/config`), and the link location of each workspace.
 */
export function closure(lock, roots, isInstalled) {
  const packages = lock.packages;
  const seen = new Set();
  const links = new Map(); // workspace path -> link location (node_modules/<name>)
  const missing = [];
  const queue = [...roots];
  while (queue.length > 0) {
    const key = queue.shift();
    if (seen.has(key)) continue;
    seen.add(key);
    const entry = packages[key];
    if (entry === undefined) throw new BundleError(`package-lock.json has no entry ${key}`);
    const deps = [];
    for (const name of Object.keys(entry.dependencies ?? {})) deps.push({ name, optional: false });
    for (const name of Object.keys(entry.optionalDependencies ?? {})) deps.push({ name, optional: true });
    for (const name of Object.keys(entry.peerDependencies ?? {})) {
      deps.push({ name, optional: entry.peerDependenciesMeta?.[name]?.optional === true });
    }
    for (const { name, optional } of deps) {
      let target = resolveKey(packages, key, name);
      if (target === undefined) {
        if (!optional) missing.push(`${name} (needed by ${key || 'the root package'})`);
        continue;
      }
      const t = packages[target];
      if (t.link === true) {
        links.set(t.resolved, target);
        target = t.resolved;
      } else if (!isInstalled(target)) {
        if (!optional && !t.optional) missing.push(`${target} (not installed)`);
        continue;
      }
      queue.push(target);
    }
  }
  if (missing.length > 0) throw new BundleError(`unresolved production dependencies: ${missing.join(', ')}`);
  seen.delete('');
  return { keys: [...seen].sort(), links };
}

/** Where a lock key lands in the bundle: workspace paths move to their node_modules link location. */
function outKey(key, links) {
  for (const [ws, link] of links) {
    if (key === ws) return link;
    if (key.startsWith(`${ws}/`)) return link + key.slice(ws.length);
  }
  return key;
}

function copyWorkspace(src, dest) {
  mkdirSync(dest, { recursive: true });
  for (const name of readdirSync(src)) {
    if (WORKSPACE_EXCLUDE.has(name) || WORKSPACE_EXCLUDE_RE.test(name)) continue;
    cpSync(join(src, name), join(dest, name), {
      recursive: true,
      dereference: true,
      filter: (p) => !(name === 'dist' && DIST_EXCLUDE_RE.test(p)),
    });
  }
  if (!existsSync(join(dest, 'package.json'))) throw new BundleError(`${src} has no package.json`);
}

function copyPackage(src, dest) {
  // Nested node_modules are separate lock entries, copied only when reached.
  cpSync(src, dest, { recursive: true, dereference: true, filter: (p) => relative(src, p).split('/')[0] !== 'node_modules' });
}

/** Builds the bundle of `app` from the checkout at `root` into `out` (removed first). Returns what it shipped. */
export function bundle(app, root, out) {
  const spec = APPS[app];
  if (spec === undefined) throw new BundleError(`unknown app ${app}; one of ${Object.keys(APPS).join(', ')}`);
  const lockPath = join(root, 'package-lock.json');
  if (!existsSync(lockPath)) throw new BundleError(`${lockPath} not found: run from the repository root`);
  const lock = readJson(lockPath);
  const rootPkg = readJson(join(root, 'package.json'));
  const roots = [spec.workspace];
  // The root package's runtime dependencies (not its devDependencies), found from the root.
  const rootEntry = { dependencies: rootPkg.dependencies ?? {} };
  const packages = { ...lock.packages, '': rootEntry };
  roots.push('');
  const { keys, links } = closure({ packages }, roots, (k) => existsSync(join(root, k, 'package.json')));
  const appLink = `node_modules/${spec.pkg}`;
  if (packages[appLink]?.resolved !== spec.workspace) {
    throw new BundleError(`package-lock.json does not link ${spec.pkg} to ${spec.workspace}: is it a workspace?`);
  }
  links.set(spec.workspace, appLink);
  const dist = join(root, spec.workspace, 'dist');
  if (!existsSync(dist)) throw new BundleError(`${dist} is missing: build first (npm run build)`);

  rmSync(out, { recursive: true, force: true });
  mkdirSync(join(out, 'node_modules'), { recursive: true });
  const workspaces = new Set(links.keys());
  for (const key of keys) {
    const dest = join(out, outKey(key, links));
    if (workspaces.has(key)) copyWorkspace(join(root, key), dest);
    else copyPackage(join(root, key), dest);
  }
  writeFileSync(
    join(out, 'package.json'),
    `${JSON.stringify({ name: `periscope-${app}`, version: rootPkg.version, private: true, type: 'module' }, null, 2)}\n`,
  );
  writeFileSync(
    join(out, `${app}.mjs`),
    [
      '#!/usr/bin/env node',
      `// periscope ${app}: container entry point generated by deploy/scripts/bundle.mjs`,
      `import { ${spec.run} } from '${spec.pkg}';`,
      '',
      `if (typeof ${spec.run} !== 'function') {`,
      `  process.stderr.write('${spec.pkg} does not export ${spec.run}\\n');`,
      '  process.exit(70);',
      '}',
      `process.exitCode = await ${spec.run}(process.argv.slice(2));`,
      '',
    ].join('\n'),
  );
  return { keys, links: Object.fromEntries(links) };
}

function sizeOf(path) {
  const st = statSync(path);
  if (!st.isDirectory()) return st.size;
  return readdirSync(path).reduce((n, name) => n + sizeOf(join(path, name)), 0);
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const [app, out] = process.argv.slice(2);
  if (!app || !out || app === '--help') {
    process.stderr.write(`usage: node deploy/scripts/bundle.mjs <${Object.keys(APPS).join('|')}> <out-dir>\n`);
    process.exit(app === '--help' ? 0 : 2);
  }
  try {
    const shipped = bundle(app, process.cwd(), resolve(out));
    const mib = (sizeOf(resolve(out)) / 1048576).toFixed(1);
    process.stdout.write(`bundled ${app}: ${shipped.keys.length} packages, ${mib} MiB in ${out}\n`);
  } catch (e) {
    if (e instanceof BundleError) {
      process.stderr.write(`bundle: ${e.message}\n`);
      process.exit(1);
    }
    throw e;
  }
}

