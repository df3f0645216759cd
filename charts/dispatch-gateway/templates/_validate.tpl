{{/*
Settings that cannot work together stop the render here, with what to change, rather
than as a crash-looping pod.
*/}}
{{- define "dispatch-gateway.validate" -}}
{{- if and (include "dispatch-gateway.severalReplicas" .) (not (include "dispatch-gateway.postgresql" .)) }}
{{- fail (printf "several gateway replicas (replicaCount=%v, autoscaling.enabled=%v) need a shared PostgreSQL store: set postgresql.url or postgresql.existingSecret. Without it each replica keeps its own SQLite file, so a function registered through one replica is unknown to the others." .Values.replicaCount .Values.autoscaling.enabled) }}
{{- end }}
{{- if and .Values.persistence.enabled (include "dispatch-gateway.postgresql" .) }}
{{- fail "persistence.enabled keeps a SQLite store on a PersistentVolumeClaim, for a single gateway; with postgresql.* set the store is PostgreSQL and the data dir holds nothing to keep: set persistence.enabled=false" }}
{{- end }}
{{- if not (has .Values.queue.backend (list "embedded" "rabbitmq")) }}
{{- fail (printf "queue.backend must be \"embedded\" (async runs in the store) or \"rabbitmq\", not %q" .Values.queue.backend) }}
{{- end }}
{{- if and (eq .Values.queue.backend "rabbitmq") (not (include "dispatch-gateway.rabbitmq" .)) }}
{{- fail "queue.backend=rabbitmq needs the broker: set rabbitmq.url or rabbitmq.existingSecret" }}
{{- end }}
{{- if and .Values.events.enabled (not (or .Values.events.url .Values.events.existingSecret (include "dispatch-gateway.rabbitmq" .))) }}
{{- fail "events.enabled needs a broker: set events.url, events.existingSecret, or rabbitmq.url / rabbitmq.existingSecret" }}
{{- end }}
{{- range $name, $url := dict "postgresql.url" .Values.postgresql.url "rabbitmq.url" .Values.rabbitmq.url "events.url" .Values.events.url }}
{{- if and $url (eq $name "postgresql.url") (not (or (hasPrefix "postgres://" $url) (hasPrefix "postgresql://" $url))) }}
{{- fail "postgresql.url must be a postgres:// URL" }}
{{- end }}
{{- if and $url (ne $name "postgresql.url") (not (hasPrefix "amqp://" $url)) }}
{{- fail (printf "%s must be an amqp:// URL (the gateway has no amqps:// client)" $name) }}
{{- end }}
{{- end }}
{{- if and .Values.openfaas.gateway .Values.openfaas.service }}
{{- fail "set exactly one of openfaas.gateway and openfaas.service (set openfaas.gateway=\"\" to use the service template)" }}
{{- end }}
{{- if not (or .Values.openfaas.gateway .Values.openfaas.service) }}
{{- fail "set one of openfaas.gateway (calls through the OpenFaaS gateway) and openfaas.service (a template such as http://{name}.openfaas-fn:8080)" }}
{{- end }}
{{- if and .Values.openfaas.service (not (contains "{name}" .Values.openfaas.service)) }}
{{- fail "openfaas.service must contain {name}, e.g. http://{name}.openfaas-fn:8080" }}
{{- end }}
{{- if not (has .Values.openfaas.discovery (list "off" "endpointslices")) }}
{{- fail (printf "openfaas.discovery must be \"off\" or \"endpointslices\", not %q" .Values.openfaas.discovery) }}
{{- end }}
{{- if and (eq .Values.openfaas.discovery "endpointslices") (not .Values.openfaas.namespace) }}
{{- fail "openfaas.namespace must name the namespace of the function services (OpenFaaS' default: openfaas-fn)" }}
{{- end }}
{{- if and (eq .Values.openfaas.discovery "endpointslices") (not .Values.rbac.create) }}
{{- if not .Values.serviceAccount.name }}
{{- fail "openfaas.discovery=endpointslices with rbac.create=false: name a service account (serviceAccount.name) that may get, list and watch endpointslices in openfaas.namespace" }}
{{- end }}
{{- end }}
{{- if and .Values.auth.skip (or .Values.auth.token .Values.auth.existingSecret) }}
{{- fail "auth.skip=true turns the control API token off: unset auth.token and auth.existingSecret, or set auth.skip=false" }}
{{- end }}
{{- if and .Values.auth.token .Values.auth.existingSecret }}
{{- fail "set one of auth.token and auth.existingSecret" }}
{{- end }}
{{- $shutdown := include "dispatch-gateway.shutdownSeconds" . | int }}
{{- $grace := include "dispatch-gateway.terminationGracePeriodSeconds" . | int }}
{{- if le $grace $shutdown }}
{{- fail (printf "shutdown.terminationGracePeriodSeconds (%d) must exceed shutdown.preStopSleepSeconds + delaySeconds + drainSeconds (%d), or the kubelet kills the gateway before its calls have drained and its records are written" $grace $shutdown) }}
{{- end }}
{{- if and .Values.autoscaling.enabled (lt (int .Values.autoscaling.maxReplicas) (int .Values.autoscaling.minReplicas)) }}
{{- fail "autoscaling.maxReplicas must be at least autoscaling.minReplicas" }}
{{- end }}
{{- end }}
