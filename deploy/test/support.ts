/**
 * Shared helpers for the deploy checks: rendering the chart with the real Helm binary, schema validation
 * of rendered objects, and small accessors for the rendered workloads.
 */
import { readdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseAllDocuments } from 'yaml';
import { runHelm } from '../scripts/helm.mjs';

export const DEPLOY = join(dirname(fileURLToPath(import.meta.url)), '..');
export const REPO = join(DEPLOY, '..');
export const CHART = join(DEPLOY, 'helm', 'periscope');
export const RELEASE = 'rel';
export const NAMESPACE = 'periscope';

/** The CI values files (chart-testing convention: <chart>/ci/*-values.yaml). */
export const VALUES_FILES: readonly string[] = readdirSync(join(CHART, 'ci'))
  .filter((f) => f.endsWith('-values.yaml'))
  .sort();

export interface K8sObject {
  apiVersion: string;
  kind: string;
  metadata: { name: string; namespace?: string; labels?: Record<string, string>; annotations?: Record<string, string> };
  spec?: any;
  data?: Record<string, string>;
  stringData?: Record<string, string>;
  [key: string]: unknown;
}

export interface HelmResult {
  status: number;
  stdout: string;
  stderr: string;
}

export function helm(args: string[]): HelmResult {
  return runHelm(args) as HelmResult;
}

const renders = new Map<string, K8sObject[]>();

/** `helm template` with a CI values file (and extra `--set`s); throws with Helm's message on failure. */
export function render(valuesFile: string, extra: string[] = []): K8sObject[] {
  const key = [valuesFile, ...extra].join('\0');
  const cached = renders.get(key);
  if (cached) return cached;
  const args = ['template', RELEASE, CHART, '--namespace', NAMESPACE];
  if (valuesFile !== '') args.push('-f', join(CHART, 'ci', valuesFile));
  const r = helm([...args, ...extra]);
  if (r.status !== 0) throw new Error(`helm template ${valuesFile} ${extra.join(' ')} failed:\n${r.stderr}`);
  const objects: K8sObject[] = [];
  for (const doc of parseAllDocuments(r.stdout)) {
    if (doc.errors.length > 0) throw new Error(`rendered YAML does not parse: ${doc.errors[0]!.message}`);
    const obj = doc.toJS() as K8sObject | null;
    if (obj !== null) objects.push(obj);
  }
  renders.set(key, objects);
  return objects;
}

/** Import path of the kubernetes-models class for an object's apiVersion/kind. */
export function modelModule(apiVersion: string, kind: string): string {
  const [group, version] = apiVersion.includes('/') ? apiVersion.split('/') : ['', apiVersion];
  if (group === 'monitoring.coreos.com') return `@kubernetes-models/prometheus-operator/${apiVersion}/${kind}`;
  if (group === 'cert-manager.io' || group === 'acme.cert-manager.io') return `@kubernetes-models/cert-manager/${apiVersion}/${kind}`;
  return group === '' ? `kubernetes-models/${version}/${kind}` : `kubernetes-models/${group}/${version}/${kind}`;
}

type ModelClass = new (data: unknown) => { validate(): void };

/** Validates one object against its Kubernetes (or CRD) JSON schema; throws the validator's message. */
export async function validateObject(obj: K8sObject): Promise<void> {
  const path = modelModule(obj.apiVersion, obj.kind);
  let mod: Record<string, unknown>;
  try {
    mod = (await import(path)) as Record<string, unknown>;
  } catch (e) {
    throw new Error(`no schema for ${obj.apiVersion} ${obj.kind} (${path}): ${(e as Error).message}`);
  }
  const Model = mod[obj.kind] as ModelClass | undefined;
  if (typeof Model !== 'function') throw new Error(`${path} does not export ${obj.kind}`);
  new Model(obj).validate();
}

export function find(objects: K8sObject[], kind: string, name?: string): K8sObject[] {
  return objects.filter((o) => o.kind === kind && (name === undefined || o.metadata.name === name));
}

export function one(objects: K8sObject[], kind: string, name: string): K8sObject {
  const hit = find(objects, kind, name);
  if (hit.length !== 1) throw new Error(`expected one ${kind} ${name}, found ${hit.length}`);
  return hit[0]!;
}

export const names = {
  hostAgent: `${RELEASE}-periscope-host-agent`,
  analysis: `${RELEASE}-periscope-analysis`,
  headless: `${RELEASE}-periscope-analysis-headless`,
};

/** Workloads that carry a pod template. */
export function podTemplates(objects: K8sObject[]): { owner: K8sObject; pod: any }[] {
  return objects
    .filter((o) => ['Deployment', 'DaemonSet', 'StatefulSet', 'Job', 'CronJob'].includes(o.kind))
    .map((o) => ({ owner: o, pod: o.kind === 'CronJob' ? o.spec.jobTemplate.spec.template : o.spec.template }));
}
