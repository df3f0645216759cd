{{/*
Names, labels and the pieces of the pod spec that several templates share. The checks
that stop a render with a message (`fail`) are in `dispatch-gateway.validate`, run by
the Deployment.
*/}}

{{- define "dispatch-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "dispatch-gateway.fullname" -}}
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

{{- define "dispatch-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dispatch-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "dispatch-gateway.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "dispatch-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "dispatch-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "dispatch-gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "dispatch-gateway.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Several gateways run at once: replicas above 1, or an autoscaler. */}}
{{- define "dispatch-gateway.severalReplicas" -}}
{{- if or .Values.autoscaling.enabled (gt (int .Values.replicaCount) 1) }}true{{- end }}
{{- end }}

{{- define "dispatch-gateway.postgresql" -}}
{{- if or .Values.postgresql.url .Values.postgresql.existingSecret }}true{{- end }}
{{- end }}

{{- define "dispatch-gateway.rabbitmq" -}}
{{- if or .Values.rabbitmq.url .Values.rabbitmq.existingSecret }}true{{- end }}
{{- end }}

{{/* The data dir is a PersistentVolumeClaim only for a lone gateway on SQLite. */}}
{{- define "dispatch-gateway.persistent" -}}
{{- if and .Values.persistence.enabled (not (include "dispatch-gateway.postgresql" .)) }}true{{- end }}
{{- end }}

{{/* The Secret this chart makes, for the values given in clear (a token, URLs). */}}
{{- define "dispatch-gateway.secretName" -}}
{{- include "dispatch-gateway.fullname" . }}
{{- end }}

{{/*
preStop sleeps with the kubelet's own sleep action (on by default from Kubernetes 1.30;
the image has no shell and no sleep binary). On an older cluster there is no preStop and
the gateway's own shutdown delay is lengthened by the same time: it keeps accepting and
serving (unready) while the endpoint removal spreads, which is what the sleep is for.
*/}}
{{- define "dispatch-gateway.preStopSleepAction" -}}
{{- if and (gt (int .Values.shutdown.preStopSleepSeconds) 0) (semverCompare ">=1.30-0" .Capabilities.KubeVersion.Version) }}true{{- end }}
{{- end }}

{{- define "dispatch-gateway.shutdownDelaySeconds" -}}
{{- if include "dispatch-gateway.preStopSleepAction" . }}
{{- int .Values.shutdown.delaySeconds }}
{{- else }}
{{- add (int .Values.shutdown.delaySeconds) (int .Values.shutdown.preStopSleepSeconds) }}
{{- end }}
{{- end }}

{{/* preStop + shutdown delay + drain: what terminationGracePeriodSeconds must exceed. */}}
{{- define "dispatch-gateway.shutdownSeconds" -}}
{{- add (int .Values.shutdown.preStopSleepSeconds) (int .Values.shutdown.delaySeconds) (int .Values.shutdown.drainSeconds) }}
{{- end }}

{{- define "dispatch-gateway.terminationGracePeriodSeconds" -}}
{{- if kindIs "invalid" .Values.shutdown.terminationGracePeriodSeconds }}
{{- add (include "dispatch-gateway.shutdownSeconds" . | int) (int .Values.shutdown.marginSeconds) }}
{{- else }}
{{- int .Values.shutdown.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/*
A TOML value from a values value. Helm reads every number of values.yaml as a float, and
its toToml would write `30.0` where the gateway wants an integer, so whole numbers are
written as integers here.
*/}}
{{- define "dispatch-gateway.tomlValue" -}}
{{- $v := . }}
{{- if kindIs "string" $v }}
{{- toJson $v }}
{{- else if kindIs "bool" $v }}
{{- ternary "true" "false" $v }}
{{- else if or (kindIs "float64" $v) (kindIs "float32" $v) }}
{{- if eq (float64 (int64 $v)) (float64 $v) }}{{ int64 $v }}{{ else }}{{ $v }}{{ end }}
{{- else if or (kindIs "int" $v) (kindIs "int64" $v) }}
{{- $v }}
{{- else if kindIs "slice" $v }}
{{- $items := list }}
{{- range $v }}{{ $items = append $items (include "dispatch-gateway.tomlValue" .) }}{{ end }}
{{- printf "[%s]" (join ", " $items) }}
{{- else }}
{{- fail (printf "config: %v is not a string, number, boolean or list; the gateway's settings are `section.key = value`" $v) }}
{{- end }}
{{- end }}

{{/*
The settings the chart derives from its own values; `config` adds any other key of
config/dispatch.toml. Listen addresses and the data dir are flags (they win over the
file); connection URLs and tokens come from Secrets through the environment.
*/}}
{{- define "dispatch-gateway.managedConfig" -}}
{{- $openfaas := dict "namespace" .Values.openfaas.namespace "discovery" .Values.openfaas.discovery }}
{{- if .Values.openfaas.service }}
{{- $_ := set $openfaas "service" .Values.openfaas.service }}
{{- $_ := set $openfaas "gateway" "" }}
{{- else }}
{{- $_ := set $openfaas "gateway" .Values.openfaas.gateway }}
{{- $_ := set $openfaas "service" "" }}
{{- end }}
{{- $auth := dict "skip" (.Values.auth.skip | default false) }}
{{- if not .Values.auth.skip }}
{{- $_ := set $auth "token_file" "/etc/dispatch/auth/tokens" }}
{{- end }}
server:
  drain_seconds: {{ int .Values.shutdown.drainSeconds }}
  shutdown_delay_seconds: {{ include "dispatch-gateway.shutdownDelaySeconds" . }}
  {{- with .Values.service.tls.secretName }}
  tls_cert: {{ printf "%s/tls.crt" $.Values.service.tls.mountPath | quote }}
  tls_key: {{ printf "%s/tls.key" $.Values.service.tls.mountPath | quote }}
  {{- end }}
queue:
  backend: {{ .Values.queue.backend | quote }}
openfaas:
  {{- toYaml $openfaas | nindent 2 }}
auth:
  {{- toYaml $auth | nindent 2 }}
{{- if and .Values.api.https.enabled .Values.api.https.tls.secretName }}
api:
  tls_cert: {{ printf "%s/tls.crt" .Values.api.https.tls.mountPath | quote }}
  tls_key: {{ printf "%s/tls.key" .Values.api.https.tls.mountPath | quote }}
{{- end }}
{{- end }}

{{/* Keys of `config` that the chart sets from its values: set those values instead. */}}
{{- define "dispatch-gateway.managedKeys" -}}
server.listen: "the --listen flag the chart passes (service.port)"
server.data_dir: "the --data-dir flag the chart passes (the data volume)"
server.log_format: "logFormat"
server.drain_seconds: "shutdown.drainSeconds"
server.shutdown_delay_seconds: "shutdown.delaySeconds (and shutdown.preStopSleepSeconds)"
server.tls_cert: "service.tls.secretName (its tls.crt)"
server.tls_key: "service.tls.secretName (its tls.key)"
store.url: "postgresql.url or postgresql.existingSecret"
queue.backend: "queue.backend"
queue.url: "rabbitmq.url or rabbitmq.existingSecret"
events.amqp_url: "events.enabled with events.url, events.existingSecret or the rabbitmq.* broker"
auth.skip: "auth.skip"
auth.token: "auth.token or auth.existingSecret"
auth.tokens: "auth.token or auth.existingSecret (one token per line)"
auth.token_file: "auth.existingSecret"
openfaas.gateway: "openfaas.gateway"
openfaas.service: "openfaas.service"
openfaas.namespace: "openfaas.namespace"
openfaas.discovery: "openfaas.discovery"
api.http: "api.http.enabled and api.http.port (the --api-http flag the chart passes)"
api.https: "api.https.enabled and api.https.port (the --api-https flag the chart passes)"
api.tls_cert: "api.https.tls.secretName (its tls.crt)"
api.tls_key: "api.https.tls.secretName (its tls.key)"
{{- end }}

{{/* The gateway's TOML configuration file: the managed settings, then `config`. */}}
{{- define "dispatch-gateway.configToml" -}}
{{- $managedKeys := include "dispatch-gateway.managedKeys" . | fromYaml }}
{{- range $section, $keys := .Values.config }}
{{- if not (kindIs "map" $keys) }}
{{- fail (printf "config.%s: must be a section of keys, as in config/dispatch.toml ([%s])" $section $section) }}
{{- end }}
{{- range $key, $_ := $keys }}
{{- $full := printf "%s.%s" $section $key }}
{{- if hasKey $managedKeys $full }}
{{- fail (printf "config.%s is set by the chart: use %s" $full (get $managedKeys $full)) }}
{{- end }}
{{- end }}
{{- end }}
{{- $merged := mergeOverwrite (include "dispatch-gateway.managedConfig" . | fromYaml) (deepCopy .Values.config) -}}
# The gateway's settings: config/dispatch.toml's embedded defaults, overlaid by this file,
# then by DISPATCH_* variables (the URLs from Secrets), then by the flags.
{{- range $section := keys $merged | sortAlpha }}

{{ printf "[%s]" $section }}
{{- $keys := get $merged $section }}
{{- range $key := keys $keys | sortAlpha }}
{{- $value := get $keys $key }}
{{- if kindIs "map" $value }}
{{- fail (printf "config.%s.%s: the gateway's settings are two levels deep (section.key)" $section $key) }}
{{- end }}
{{ $key }} = {{ include "dispatch-gateway.tomlValue" $value }}
{{- end }}
{{- end }}
{{- end }}

{{/* The container's environment: connection URLs from Secrets, then extraEnv. */}}
{{- define "dispatch-gateway.env" -}}
{{- $secret := include "dispatch-gateway.secretName" . }}
{{- if include "dispatch-gateway.postgresql" . }}
- name: DISPATCH_STORE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.postgresql.existingSecret | default $secret }}
      key: {{ ternary .Values.postgresql.existingSecretKey "store-url" (not (empty .Values.postgresql.existingSecret)) }}
{{- end }}
{{- if eq .Values.queue.backend "rabbitmq" }}
- name: DISPATCH_QUEUE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.rabbitmq.existingSecret | default $secret }}
      key: {{ ternary .Values.rabbitmq.existingSecretKey "rabbitmq-url" (not (empty .Values.rabbitmq.existingSecret)) }}
{{- end }}
{{- if .Values.events.enabled }}
- name: DISPATCH_EVENTS_AMQP_URL
  valueFrom:
    secretKeyRef:
      {{- if .Values.events.existingSecret }}
      name: {{ .Values.events.existingSecret }}
      key: {{ .Values.events.existingSecretKey }}
      {{- else if .Values.events.url }}
      name: {{ $secret }}
      key: events-url
      {{- else }}
      name: {{ .Values.rabbitmq.existingSecret | default $secret }}
      key: {{ ternary .Values.rabbitmq.existingSecretKey "rabbitmq-url" (not (empty .Values.rabbitmq.existingSecret)) }}
      {{- end }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}
