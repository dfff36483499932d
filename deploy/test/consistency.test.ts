/**
 * The rendered manifests and the guest agent's systemd unit must be accepted by the apps' own
 * configuration schemas (libs/config `resolveConfig`): container args, PERISCOPE_* env, ports, socket and
 * certificate paths. A renamed flag, a port that no longer matches its probe, or a socket outside the
 * host directory fails here, before any cluster sees it.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ConfigError, parseAddress, resolveConfig, type OptionsSpec, type PositionalSpec, type Schema } from '@periscope/config';
import { hostAgentSchema } from '@periscope/app-host-agent';
import { DEPLOY, names, NAMESPACE, one, render, VALUES_FILES, type K8sObject } from './support.js';

/** Sample values the kubelet would substitute for downward-API fields. */
const FIELD_SAMPLES: Record<string, string> = {
  'status.podIP': '10.244.3.17',
  'spec.nodeName': 'hv-rack12-07',
  'metadata.name': 'rel-periscope-analysis-7d9f8-x2x4q',
  'metadata.namespace': NAMESPACE,
};

interface Launch {
  argv: string[];
  env: Record<string, string>;
}

/** argv and env of a container as the kubelet starts it: $(VAR) expanded, valueFrom resolved to samples or rendered Secrets. */
function launch(container: any, objects: K8sObject[]): Launch {
  const env: Record<string, string> = {};
  for (const e of container.env ?? []) {
    if (e.value !== undefined) env[e.name] = String(e.value);
    else if (e.valueFrom?.fieldRef) {
      const v = FIELD_SAMPLES[e.valueFrom.fieldRef.fieldPath];
      if (v === undefined) throw new Error(`no sample for fieldRef ${e.valueFrom.fieldRef.fieldPath}`);
      env[e.name] = v;
    } else if (e.valueFrom?.secretKeyRef) {
      const { name, key } = e.valueFrom.secretKeyRef;
      const secret = objects.find((o) => o.kind === 'Secret' && o.metadata.name === name);
      const fromRender = secret?.stringData?.[key] ?? (secret?.data?.[key] ? Buffer.from(secret.data[key], 'base64').toString() : undefined);
      // An operator-provided Secret: the DSN shape docs/deploy.md asks for.
      env[e.name] = fromRender ?? (e.name === 'PERISCOPE_DB' ? 'postgres://periscope:s3cret@db.example.internal:5432/periscope?sslmode=verify-full' : 'sample');
    } else throw new Error(`unsupported env source for ${e.name}`);
  }
  // Kubernetes expands $(VAR) in args from the container's env; $$ escapes.
  const argv = (container.args ?? []).map((a: string) =>
    a.replace(/\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)/g, (m, v: string | undefined) => (m === '$$' ? '$' : (env[v!] ?? m))),
  );
  return { argv, env };
}

function resolve<O extends OptionsSpec, P extends readonly PositionalSpec[]>(schema: Schema<O, P>, l: Launch) {
  return resolveConfig(schema, { argv: l.argv, env: l.env, readTlsFiles: false, readFile: () => { throw new Error('no --config file expected'); } });
}

function portOf(address: string): number {
  const p = parseAddress(address);
  if (!p || p.kind !== 'tcp' || p.port === undefined) throw new Error(`${address} is not host:port`);
  return p.port;
}

function unixPath(address: string): string {
  const p = parseAddress(address);
  if (!p || p.kind !== 'unix') throw new Error(`${address} is not unix:`);
  return p.path;
}

/** The volume mounted at the deepest mountPath containing `path`. */
function volumeFor(pod: any, container: any, path: string): any {
  const mounts = (container.volumeMounts ?? [])
    .filter((m: any) => path === m.mountPath || path.startsWith(`${m.mountPath.replace(/\/$/, '')}/`))
    .sort((a: any, b: any) => b.mountPath.length - a.mountPath.length);
  if (mounts.length === 0) return undefined;
  return { mount: mounts[0], volume: pod.volumes.find((v: any) => v.name === mounts[0].name) };
}

/** The key a file path under a Secret/ConfigMap mount reads. */
function keyAt(mount: any, path: string): string {
  return path.slice(mount.mountPath.replace(/\/$/, '').length + 1);
}

function expectTlsWired(cfg: { fleetMode: boolean; tlsPaths?: { ca: string; cert: string; key: string } | undefined }, pod: any, c: any, tlsExpected: boolean) {
  expect(cfg.fleetMode).toBe(tlsExpected);
  if (!tlsExpected) return;
  for (const [file, key] of [[cfg.tlsPaths!.ca, 'ca.crt'], [cfg.tlsPaths!.cert, 'tls.crt'], [cfg.tlsPaths!.key, 'tls.key']] as const) {
    const at = volumeFor(pod, c, file);
    expect(at?.volume?.secret, `${file} is on a Secret volume`).toBeTruthy();
    expect(keyAt(at.mount, file)).toBe(key);
  }
}

describe.each(VALUES_FILES)('values %s', (valuesFile) => {
  const objects = () => render(valuesFile);
  const tlsOn = () => !one(objects(), 'DaemonSet', names.hostAgent).spec.template.spec.containers[0].args.includes('--insecure');

  it('host agent: the DaemonSet command line is accepted by hostAgentSchema and wired to its volumes and ports', () => {
    const ds = one(objects(), 'DaemonSet', names.hostAgent);
    const pod = ds.spec.template.spec;
    const c = pod.containers.find((x: any) => x.name === 'host-agent');
    const l = launch(c, objects());
    const cfg = resolve(hostAgentSchema, l);
    const v = cfg.values;

    // Host id from the downward API (env PERISCOPE_HOST_ID), not a flag.
    expect(v['host-id']).toBe(FIELD_SAMPLES['spec.nodeName']);
    expect(cfg.sources['host-id']).toEqual({ kind: 'env', variable: 'PERISCOPE_HOST_ID' });

    // Every socket lives in the hostPath directory QEMU sees, under the same path inside and outside.
    const hostDir = pod.volumes.find((x: any) => x.name === 'sockets').hostPath.path;
    const sockets = [...v['kvmi-listen'], v['api-listen'], v['heki-listen']].filter((a): a is string => a !== undefined).map(unixPath);
    expect(sockets.length).toBeGreaterThanOrEqual(2);
    for (const s of sockets) {
      const at = volumeFor(pod, c, s);
      expect(at?.volume?.hostPath?.path, s).toBe(hostDir);
      expect(at.mount.mountPath).toBe(hostDir);
      expect(Buffer.byteLength(s), `${s} fits sun_path`).toBeLessThan(108);
    }
    // Socket group = the pod's supplemental group (the agent may chgrp only to a group it is in).
    expect(v['socket-group']).toBeDefined();
    expect(pod.securityContext.supplementalGroups).toContain(v['socket-group']);
    // State that survives restarts (--state-dir: spool, paused VMs, planted breakpoint bytes): its own hostPath,
    // mounted at the same path, not the socket directory; prepared by the init container.
    const stateDir = v['state-dir'];
    expect(stateDir, 'the DaemonSet passes --state-dir').toBeDefined();
    const state = volumeFor(pod, c, stateDir!);
    expect(state?.volume?.hostPath?.path).toBe(stateDir);
    expect(state.mount.mountPath).toBe(stateDir);
    expect(state.mount.readOnly ?? false).toBe(false);
    expect(stateDir).not.toBe(hostDir);
    const init = (pod.initContainers ?? []).find((x: any) => x.name === 'socket-dir');
    if (init) expect(init.command.slice(-3)).toEqual([hostDir, String(v['socket-group']), stateDir]);

    // Metrics: bound to the pod IP on the port the probes and the metrics Service use.
    const metricsPort = portOf(v['metrics-listen']!);
    expect(v['metrics-listen']).toBe(`${FIELD_SAMPLES['status.podIP']}:${metricsPort}`);
    expect(c.ports.find((p: any) => p.name === 'metrics').containerPort).toBe(metricsPort);
    expect(c.readinessProbe.httpGet.path).toBe('/healthz');
    expect(c.readinessProbe.httpGet.port).toBe('metrics');

    // Analysis: the headless Service, on its gRPC port.
    const headless = one(objects(), 'Service', names.headless);
    expect(v.analysis).toEqual([`${names.headless}.${NAMESPACE}.svc:${headless.spec.ports.find((p: any) => p.name === 'grpc').port}`]);

    if (v['cookie-file']) {
      const at = volumeFor(pod, c, v['cookie-file']);
      expect(at.volume.secret.secretName).toBeTruthy();
    }
    if (v.policy) {
      const at = volumeFor(pod, c, v.policy);
      const cm = one(objects(), 'ConfigMap', at.volume.configMap.name);
      expect(Object.keys(cm.data!)).toContain(keyAt(at.mount, v.policy));
    }
    expectTlsWired(cfg, pod, c, tlsOn());
  });

  it('analysis: the Deployment command line is accepted by analysisSchema and wired to its Services and probes', async () => {
    const { analysisSchema } = (await import('@periscope/app-analysis')) as { analysisSchema?: Schema };
    expect(analysisSchema, 'apps/analysis/src/main.ts must export analysisSchema (issue #8)').toBeDefined();
    const dep = one(objects(), 'Deployment', names.analysis);
    const pod = dep.spec.template.spec;
    const c = pod.containers[0];
    const cfg = resolve(analysisSchema!, launch(c, objects()));
    const v = cfg.values as Record<string, unknown>;
    const port = (name: string) => c.ports.find((p: any) => p.name === name).containerPort;
    expect(portOf(v.listen as string)).toBe(port('grpc'));
    expect(portOf(v.http as string)).toBe(port('http'));
    expect(portOf(v['health-listen'] as string)).toBe(c.readinessProbe.grpc.port);
    expect(v['replica-id']).toBe(FIELD_SAMPLES['metadata.name']);
    expect(String(v.db)).toMatch(/^postgres(ql)?:\/\//);
    expect(cfg.sources.db).toEqual({ kind: 'env', variable: 'PERISCOPE_DB' });
    const token = volumeFor(pod, c, v['api-token-file'] as string);
    expect(token.volume.secret.secretName).toBeTruthy();
    expect(typeof v['grpc-max-connection-age']).toBe('number');
    expect(v['grpc-max-connection-age-grace'] as number).toBeLessThan(v['grpc-max-connection-age'] as number);
    for (const svc of objects().filter((o) => o.kind === 'Service' && o.metadata.name.startsWith(names.analysis))) {
      for (const p of svc.spec.ports) expect(c.ports.map((x: any) => x.name), `${svc.metadata.name}:${p.name}`).toContain(p.targetPort);
    }
    expectTlsWired(cfg, pod, c, tlsOn());
  });
});

it('a renamed flag is caught: the host agent schema refuses an unknown option', () => {
  const ds = one(render('default-values.yaml'), 'DaemonSet', names.hostAgent);
  const c = structuredClone(ds.spec.template.spec.containers[0]);
  c.args = c.args.map((a: string) => a.replace('--kvmi-listen=', '--kvmi-socket='));
  expect(() => resolve(hostAgentSchema, launch(c, render('default-values.yaml')))).toThrow(ConfigError);
});

it('without TLS the chart must say --insecure, or the agent refuses its non-loopback addresses', () => {
  const ds = one(render('minimal-values.yaml'), 'DaemonSet', names.hostAgent);
  const c = structuredClone(ds.spec.template.spec.containers[0]);
  c.args = c.args.filter((a: string) => a !== '--insecure');
  expect(() => resolve(hostAgentSchema, launch(c, render('minimal-values.yaml')))).toThrow(/TLS is not configured/);
});

describe('guest agent systemd unit (introspection VM)', () => {
  const unit = readFileSync(join(DEPLOY, 'guest-agent', 'periscope-guest-agent.service'), 'utf8');
  const envFile = readFileSync(join(DEPLOY, 'guest-agent', 'guest-agent.env'), 'utf8');

  /** ExecStart split like systemd does (no shell), with ${VAR} from the EnvironmentFile, cut at the image. */
  function execStart(): { podman: string[]; image: string; args: string[]; env: Record<string, string> } {
    const env: Record<string, string> = {};
    for (const line of envFile.split('\n')) {
      const m = /^([A-Z_][A-Z0-9_]*)=(.*)$/.exec(line.trim());
      if (m) env[m[1]!] = m[2]!.replace(/^"(.*)"$/, '$1');
    }
    const joined = unit.replace(/\\\n\s*/g, ' ');
    const line = joined.split('\n').find((l) => l.startsWith('ExecStart='));
    if (!line) throw new Error('no ExecStart');
    const words = line
      .slice('ExecStart='.length)
      .trim()
      .split(/\s+/)
      .map((w) => w.replace(/\$\{([A-Z_][A-Z0-9_]*)\}/g, (_m, v: string) => {
        if (env[v] === undefined) throw new Error(`\${${v}} is not set in guest-agent.env`);
        return env[v]!;
      }));
    const at = words.findIndex((a) => /^[\w.-]+(\/[\w.-]+)*\/guest-agent(@sha256:[0-9a-f]{64}|:[\w.-]+)$/.test(a));
    if (at < 0) throw new Error('no guest-agent image reference in ExecStart');
    return { podman: words.slice(0, at), image: words[at]!, args: words.slice(at + 1), env };
  }

  it('runs the image non-root, read-only, with only /dev/kvmmem', () => {
    const { podman, image } = execStart();
    expect(podman.slice(0, 2)).toEqual(['/usr/bin/podman', 'run']);
    expect(image).not.toMatch(/:latest$/);
    expect(podman).toContain('--read-only');
    expect(podman).toContain('--cap-drop=ALL');
    expect(podman).toContain('--security-opt=no-new-privileges');
    expect(podman.filter((a) => a.startsWith('--device='))).toEqual(['--device=/dev/kvmmem:/dev/kvmmem:rw']);
    expect(podman).toContain('--user=65532:65532');
    expect(podman.some((a) => a.startsWith('--group-add=') && /^\d+$/.test(a.slice('--group-add='.length)))).toBe(true);
    expect(podman.some((a) => a.startsWith('--privileged') || a.startsWith('--cap-add'))).toBe(false);
  });

  it('its arguments are accepted by guestAgentSchema', async () => {
    const { guestAgentSchema } = (await import('@periscope/app-guest-agent')) as { guestAgentSchema?: Schema };
    expect(guestAgentSchema, 'apps/guest-agent/src/main.ts must export guestAgentSchema (issue #10)').toBeDefined();
    const { podman, args, env } = execStart();
    const cfg = resolve(guestAgentSchema!, { argv: args, env: {} });
    const v = cfg.values as Record<string, unknown>;
    expect(v.device).toBe('/dev/kvmmem');
    expect(v['host-id']).toBe(env.PERISCOPE_HOST_ID);
    expect(cfg.fleetMode).toBe(true);
    expect(podman).toContain('--volume=/etc/periscope/tls:/etc/periscope/tls:ro');
    for (const p of Object.values(cfg.tlsPaths!)) expect(p.startsWith('/etc/periscope/tls/')).toBe(true);
  });
});
