{{/* Names ------------------------------------------------------------------------------------------ */}}

{{- define "periscope.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "periscope.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "periscope.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* <fullname>-<component>, kept within the 63-character DNS label limit. */}}
{{- define "periscope.component" -}}
{{- printf "%s-%s" (include "periscope.fullname" .root | trunc (int (sub 62 (len .component)))) .component | trimSuffix "-" }}
{{- end }}

{{/* Labels --------------------------------------------------------------------------------------------- */}}

{{- define "periscope.labels" -}}
helm.sh/chart: {{ include "periscope.chart" .root }}
app.kubernetes.io/name: {{ include "periscope.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: periscope
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "periscope.selectorLabels" -}}
app.kubernetes.io/name: {{ include "periscope.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Images: <registry>/<repository>@<digest> or :<tag>; `latest` is refused. */}}
{{- define "periscope.image" -}}
{{- $img := .image }}
{{- $tag := default .root.Chart.AppVersion .root.Values.image.tag }}
{{- if eq (toString $tag) "latest" }}
{{- fail "image.tag: `latest` is not allowed; use a release tag or a digest" }}
{{- end }}
{{- $repo := printf "%s/%s" (trimSuffix "/" .root.Values.image.registry) $img.repository }}
{{- if $img.digest }}
{{- if not (regexMatch "^sha256:[0-9a-f]{64}$" $img.digest) }}
{{- fail (printf "image digest %q is not sha256:<64 hex>" $img.digest) }}
{{- end }}
{{- printf "%s@%s" $repo $img.digest }}
{{- else }}
{{- printf "%s:%s" $repo (toString $tag) }}
{{- end }}
{{- end }}

{{/* Service accounts */}}
{{- define "periscope.hostAgent.serviceAccountName" -}}
{{- if .Values.hostAgent.serviceAccount.create }}
{{- default (include "periscope.component" (dict "root" . "component" "host-agent")) .Values.hostAgent.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.hostAgent.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "periscope.analysis.serviceAccountName" -}}
{{- if .Values.analysis.serviceAccount.create }}
{{- default (include "periscope.component" (dict "root" . "component" "analysis")) .Values.analysis.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.analysis.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* TLS -------------------------------------------------------------------------------------------------- */}}

{{- define "periscope.tls.enabled" -}}
{{- if ne .Values.tls.mode "disabled" }}true{{ end }}
{{- end }}

{{- define "periscope.tls.analysisSecret" -}}
{{- if eq .Values.tls.mode "certManager" }}
{{- include "periscope.component" (dict "root" . "component" "analysis-tls") }}
{{- else }}
{{- .Values.tls.secret.analysis }}
{{- end }}
{{- end }}

{{- define "periscope.tls.hostAgentSecret" -}}
{{- if eq .Values.tls.mode "certManager" }}
{{- include "periscope.component" (dict "root" . "component" "host-agent-tls") }}
{{- else }}
{{- .Values.tls.secret.hostAgent }}
{{- end }}
{{- end }}

{{/* The shared --tls-* flags (libs/config networkOptions), or --insecure when TLS is disabled. */}}
{{- define "periscope.tls.args" -}}
{{- if include "periscope.tls.enabled" . }}
- --tls-ca={{ .Values.tls.mountPath }}/ca.crt
- --tls-cert={{ .Values.tls.mountPath }}/tls.crt
- --tls-key={{ .Values.tls.mountPath }}/tls.key
{{- else }}
- --insecure
{{- end }}
{{- end }}

{{/* Service DNS names ------------------------------------------------------------------------------------ */}}

{{- define "periscope.analysis.headlessName" -}}
{{- include "periscope.component" (dict "root" . "component" "analysis-headless") }}
{{- end }}

{{/* Address the host agents dial: every replica's IP through the headless Service (client-side balancing). */}}
{{- define "periscope.analysis.address" -}}
{{- printf "%s.%s.svc:%d" (include "periscope.analysis.headlessName" .) .Release.Namespace (int .Values.analysis.grpc.port) }}
{{- end }}

{{- define "periscope.apiTokenSecret" -}}
{{- default (include "periscope.component" (dict "root" . "component" "api-token")) .Values.analysis.apiToken.existingSecret }}
{{- end }}

{{- define "periscope.databaseSecret" -}}
{{- if .Values.postgresqlEvaluation.enabled }}
{{- include "periscope.component" (dict "root" . "component" "postgresql-eval") }}
{{- else }}
{{- required "analysis.database.existingSecret is required (a Secret with the PostgreSQL DSN)" .Values.analysis.database.existingSecret }}
{{- end }}
{{- end }}

{{/* Restricted pod-security container context (every Periscope container). */}}
{{- define "periscope.containerSecurityContext" -}}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}
