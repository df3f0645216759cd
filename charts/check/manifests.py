"""The checks of charts/check.sh that schemas cannot make, on one rendered case.

    manifests.py split MANIFESTS DIR
        DIR/core.yaml: the objects of Kubernetes' own kinds (for kubernetes-validate);
        DIR/crds.json: the ServiceMonitors (for servicemonitor.mjs). Any other kind fails.
    manifests.py check DIR KUBE_VERSION EXISTING_SECRETS
        Checks that the objects hold together as a running gateway needs, and writes
        DIR/launch.json (the container's flags, environment with the Secrets' values, and
        configuration file), which tests/chart.rs loads with the gateway's own code.

Every failure prints what is wrong, naming the object, and exits 1.
"""

import base64
import json
import sys

import yaml

problems = []


def fail(message):
    problems.append(message)


def done():
    for message in problems:
        print(f"manifests.py: {message}", file=sys.stderr)
    sys.exit(1 if problems else 0)


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def split(manifests, out):
    core, crds = [], []
    for doc in load(manifests):
        group = doc.get("apiVersion", "").split("/")[0]
        if doc.get("apiVersion") == "monitoring.coreos.com/v1" and doc.get("kind") == "ServiceMonitor":
            crds.append(doc)
        elif "." in group and not group.endswith(".k8s.io"):
            fail(f"{doc.get('kind')} {doc.get('apiVersion')}: a kind no validator here knows")
        else:
            core.append(doc)
    with open(f"{out}/core.yaml", "w") as f:
        yaml.safe_dump_all(core, f, sort_keys=False)
    with open(f"{out}/crds.json", "w") as f:
        if crds:
            json.dump(crds, f)


def secret_values(docs):
    """name -> {key: value} of the Secrets among docs (data is base64, stringData not)."""
    secrets = {}
    for doc in docs:
        if doc.get("kind") != "Secret":
            continue
        values = {k: base64.b64decode(v).decode() for k, v in (doc.get("data") or {}).items()}
        values.update(doc.get("stringData") or {})
        secrets[doc["metadata"]["name"]] = values
    return secrets


def one(docs, kind):
    found = [d for d in docs if d["kind"] == kind]
    return found[0] if len(found) == 1 else None


def matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check(out, kube, existing):
    docs = load(f"{out}/core.yaml")
    try:
        with open(f"{out}/crds.json") as f:
            docs += json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        pass
    kinds = {}
    for doc in docs:
        kinds.setdefault(doc["kind"], []).append(doc)
    deployment = one(docs, "Deployment")
    if deployment is None:
        fail("exactly one Deployment expected")
        return
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    pod_labels = pod["metadata"]["labels"]
    if not matches(deployment["spec"]["selector"]["matchLabels"], pod_labels):
        fail("Deployment: its selector does not match its pods' labels")
    [container] = spec["containers"]
    name = f"Deployment {deployment['metadata']['name']}"

    # Security: non-root with a numeric user, read-only root, no escalation, no capabilities.
    psc, csc = spec.get("securityContext", {}), container.get("securityContext", {})
    if not (psc.get("runAsNonRoot") and csc.get("runAsNonRoot", True)):
        fail(f"{name}: runAsNonRoot must be true")
    if not isinstance(csc.get("runAsUser", psc.get("runAsUser")), int) or csc.get("runAsUser", psc.get("runAsUser")) == 0:
        fail(f"{name}: runAsUser must be a numeric user other than root")
    if csc.get("readOnlyRootFilesystem") is not True:
        fail(f"{name}: readOnlyRootFilesystem must be true")
    if csc.get("allowPrivilegeEscalation") is not False:
        fail(f"{name}: allowPrivilegeEscalation must be false")
    if "ALL" not in csc.get("capabilities", {}).get("drop", []) or csc.get("capabilities", {}).get("add"):
        fail(f"{name}: capabilities must drop ALL and add none")
    seccomp = csc.get("seccompProfile", psc.get("seccompProfile", {}))
    if seccomp.get("type") != "RuntimeDefault":
        fail(f"{name}: seccompProfile must be RuntimeDefault")

    # The flags: the file, the addresses, the data dir.
    flags = {}
    for arg in container.get("args", []):
        key, _, value = arg.partition("=")
        flags[key] = value
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    listen = flags.get("--listen", "")
    if listen != f"0.0.0.0:{ports.get('http')}":
        fail(f"{name}: --listen={listen} is not all addresses on the http port {ports.get('http')}")


    # Volumes: every mount backed by a volume; the data dir and /tmp writable.
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
    for mount in mounts.values():
        if mount["name"] not in volumes:
            fail(f"{name}: mount {mount['mountPath']} names no volume {mount['name']}")
    for path in [flags.get("--data-dir"), "/tmp"]:
        mount = mounts.get(path)
        volume = volumes.get(mount["name"], {}) if mount else {}
        if not mount or mount.get("readOnly") or not ("emptyDir" in volume or "persistentVolumeClaim" in volume):
            fail(f"{name}: {path} must be a writable emptyDir or PersistentVolumeClaim mount")
    config_file = flags.get("--config", "")
    config_dir, _, config_name = config_file.rpartition("/")
    config_mount = mounts.get(config_dir)
    config_map = one(docs, "ConfigMap")
    if not config_mount or volumes[config_mount["name"]].get("configMap", {}).get("name") != config_map["metadata"]["name"]:
        fail(f"{name}: --config={config_file} is not in the chart's ConfigMap")
        return
    config_toml = config_map["data"][config_name]

    # The Secrets the pod reads, and their keys: the chart's own, or existing ones.
    secrets = secret_values(docs)
    provided = secret_values(load(existing))

    def secret(name_, key):
        values = secrets.get(name_, provided.get(name_))
        if values is None or key not in values:
            fail(f"{name}: reads key {key} of Secret {name_}, which neither the chart nor check/existing-secrets.yaml has")
            return ""
        return values[key]

    env = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = secret(ref["name"], ref["key"])
    files = {}
    for mount in mounts.values():
        source = volumes.get(mount["name"], {}).get("secret")
        if source:
            for item in source.get("items", []):
                files[f"{mount['mountPath']}/{item['path']}"] = secret(source["secretName"], item["key"])
            if not source.get("items"):
                values = secrets.get(source["secretName"], provided.get(source["secretName"]))
                if values is None:
                    fail(f"{name}: mounts Secret {source['secretName']}, which neither the chart nor check/existing-secrets.yaml has")

    # Shutdown: the grace period covers preStop + shutdown delay + drain.
    server = {}
    section = None
    for line in config_toml.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "server" and "=" in line:
            key, _, value = line.partition("=")
            value = value.strip()
            server[key.strip()] = value.strip('"') if value.startswith('"') else int(value)
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    sleep_action = tuple(int(x) for x in kube.split(".")[:2]) >= (1, 30)
    if sleep_action != bool(pre_stop):
        fail(f"{name}: on Kubernetes {kube} the preStop sleep must be {'set' if sleep_action else 'absent'}")
    grace = spec.get("terminationGracePeriodSeconds", 30)
    need = pre_stop + server["shutdown_delay_seconds"] + server["drain_seconds"]
    if server["shutdown_delay_seconds"] < 1 or grace <= need:
        fail(f"{name}: terminationGracePeriodSeconds {grace} must exceed preStop {pre_stop} + delay "
             f"{server['shutdown_delay_seconds']} + drain {server['drain_seconds']}, with a delay of 1 s or more")

    # Probes on the gateway's own paths and port, in the scheme its control listener speaks
    # (HTTPS when server.tls_cert is set, a file mounted in the pod).
    tls_cert = server.get("tls_cert", "")
    scheme = "HTTPS" if tls_cert else "HTTP"
    if tls_cert and tls_cert.rpartition("/")[0] not in mounts:
        fail(f"{name}: server.tls_cert={tls_cert} is not in a mounted volume")
    for probe, path in [("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")]:
        got = container.get(probe, {}).get("httpGet", {})
        if got.get("path") != path or got.get("port") != "http" or got.get("scheme") != scheme:
            fail(f"{name}: {probe} must GET {path} on port http over {scheme}, not {got}")
    monitors = [d for d in docs if d.get("kind") == "ServiceMonitor"]
    for monitor in monitors:
        for endpoint in monitor["spec"]["endpoints"]:
            if endpoint.get("scheme", "http") != scheme.lower():
                fail(f"{name}: the ServiceMonitor scrapes {endpoint.get('scheme', 'http')}, the listener speaks {scheme}")

    # Service: selects the pods, and every port goes to a named container port.
    service = one(docs, "Service")
    if not matches(service["spec"]["selector"], pod_labels):
        fail("Service: its selector does not match the pods")
    for port in service["spec"]["ports"]:
        if port["targetPort"] not in ports:
            fail(f"Service: port {port['name']} goes to {port['targetPort']}, which the container does not have")
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    for ingress in kinds.get("Ingress", []):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                if backend["name"] != service["metadata"]["name"] or backend["port"]["name"] not in service_ports:
                    fail(f"Ingress: path {path['path']} goes to {backend}, not a port of the Service")

    # Pod discovery: RBAC in the function namespace for the pod's service account.
    discovery = 'discovery = "endpointslices"' in config_toml
    account = spec.get("serviceAccountName")
    if discovery:
        namespace = next(line.split("=")[1].strip().strip('"') for line in config_toml.splitlines()
                         if line.startswith("namespace ="))
        roles = [r for r in kinds.get("Role", []) if r["metadata"]["namespace"] == namespace and any(
            "discovery.k8s.io" in rule["apiGroups"] and "endpointslices" in rule["resources"]
            and {"get", "list", "watch"} <= set(rule["verbs"]) for rule in r["rules"])]
        bound = [b for b in kinds.get("RoleBinding", []) if b["metadata"]["namespace"] == namespace
                 and any(b["roleRef"]["name"] == r["metadata"]["name"] for r in roles)
                 and any(s["kind"] == "ServiceAccount" and s["name"] == account for s in b["subjects"])]
        if not bound:
            fail(f"discovery is on but no Role in {namespace} lets service account {account} get, list and watch endpointslices")
        if spec.get("automountServiceAccountToken") is not True:
            fail(f"{name}: discovery needs automountServiceAccountToken: true")
    elif kinds.get("Role") or spec.get("automountServiceAccountToken"):
        fail("discovery is off: no Role and no service account token expected")
    if account not in {a["metadata"]["name"] for a in kinds.get("ServiceAccount", [])}:
        fail(f"{name}: service account {account} is not rendered")

    # Autoscaler, disruption budget, ServiceMonitor: aimed at this Deployment and Service.
    for hpa in kinds.get("HorizontalPodAutoscaler", []):
        if hpa["spec"]["scaleTargetRef"]["name"] != deployment["metadata"]["name"]:
            fail("HorizontalPodAutoscaler: it scales another Deployment")
        if "replicas" in deployment["spec"]:
            fail(f"{name}: with an autoscaler the Deployment must not set replicas")
    for pdb in kinds.get("PodDisruptionBudget", []):
        if not matches(pdb["spec"]["selector"]["matchLabels"], pod_labels):
            fail("PodDisruptionBudget: its selector does not match the pods")
    for monitor in kinds.get("ServiceMonitor", []):
        if not matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"]):
            fail("ServiceMonitor: its selector does not match the Service")
        for endpoint in monitor["spec"]["endpoints"]:
            if endpoint["port"] not in service_ports or endpoint.get("path") != "/metrics":
                fail(f"ServiceMonitor: endpoint {endpoint} is not /metrics on a port of the Service")
    for claim in kinds.get("PersistentVolumeClaim", []):
        if deployment["spec"]["strategy"]["type"] != "Recreate":
            fail(f"{name}: with a ReadWriteOnce claim the strategy must be Recreate")
        if deployment["spec"].get("replicas", 0) != 1:
            fail(f"{name}: a claim for the SQLite store takes exactly one replica")

    launch = {
        "args": container.get("args", []),
        "env": env,
        "files": files,
        "config_file": config_file,
        "config_toml": config_toml,
        "service_ports": {p["name"]: p["port"] for p in service["spec"]["ports"]},
        "replicas": deployment["spec"].get("replicas"),
        "autoscaled": bool(kinds.get("HorizontalPodAutoscaler")),
    }
    with open(f"{out}/launch.json", "w") as f:
        json.dump(launch, f, indent=2)


if __name__ == "__main__":
    if sys.argv[1] == "split":
        split(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "check":
        check(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit(f"manifests.py: unknown command {sys.argv[1]}")
    done()
