//! Pod discovery for the `openfaas` driver: the ready addresses of each function service,
//! from the Kubernetes API's EndpointSlices (`discovery.k8s.io/v1`) in the function
//! namespace. One list, then one namespace-wide watch from its `resourceVersion`; a watch
//! that ends is started again from the last version seen, and one the API no longer can
//! serve (410 Gone) is replaced by a new list. While the API cannot be reached, no address
//! is known and every function falls back to its service (or the OpenFaaS gateway); the
//! loop tries again with a growing pause.
//!
//! What is known is kept here, per service name; the registry asks for it when it builds
//! a function's endpoints ([`super::OpenfaasDriver`]) and is told by the `on_change`
//! callback of [`Discovery::run`] which services changed, to rebuild their functions.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::BytesMut;
use http::StatusCode;
use http_body_util::BodyExt;
use serde::Deserialize;

use super::Target;
use super::kube::{KubeClient, error_text};

/// The label Kubernetes puts on each EndpointSlice: the name of its service.
const SERVICE_LABEL: &str = "kubernetes.io/service-name";
/// The first pause after a failure; each next one twice as long, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Asked of the API server for each watch; it ends the watch then, and it is started again.
const WATCH_SECONDS: u64 = 300;
/// A watch that sends nothing (not even a bookmark) for this long is taken for dead.
const WATCH_IDLE: Duration = Duration::from_secs(WATCH_SECONDS + 60);
/// The longest watch event accepted (a slice holds at most 1000 endpoints).
const MAX_EVENT_BYTES: usize = 16 * 1024 * 1024;

/// The ready pods of each function service, as last seen.
#[derive(Default)]
pub struct Discovery {
    services: RwLock<HashMap<String, Arc<[Target]>>>,
}

/// Why the list or the watch stopped.
enum Interruption {
    /// The API forgot the version the watch started from (410 Gone): list again.
    Gone,
    /// The API could not be reached or answered with an error.
    Failed(String),
}

impl Discovery {
    /// The ready pods of `service`; empty when none is known.
    pub fn targets(&self, service: &str) -> Option<Arc<[Target]>> {
        self.services
            .read()
            .expect("discovery lock")
            .get(service)
            .cloned()
    }

    /// Lists and watches the EndpointSlices of `namespace` until the process ends.
    /// `on_change` is given the services whose ready pods changed.
    pub async fn run(
        self: Arc<Self>,
        client: KubeClient,
        namespace: String,
        on_change: impl Fn(&[String]) + Send + Sync + 'static,
    ) {
        let path = format!(
            "/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices?labelSelector={}",
            SERVICE_LABEL.replace('/', "%2F")
        );
        let mut backoff = FIRST_BACKOFF;
        loop {
            let interruption = match list(&client, &path).await {
                Ok((listed, mut version)) => {
                    backoff = FIRST_BACKOFF;
                    let mut slices = Slices::from_list(listed);
                    on_change(&self.publish(&slices));
                    tracing::info!(api = client.base(), %namespace, services = slices.by_service().len(), "pod discovery: EndpointSlices listed");
                    loop {
                        match watch(&client, &path, &mut version, &mut slices, |s| {
                            on_change(&self.publish(s))
                        })
                        .await
                        {
                            // The server ended the watch (its timeout): go on from where it was.
                            Ok(()) => continue,
                            Err(e) => break e,
                        }
                    }
                }
                Err(e) => e,
            };
            match interruption {
                Interruption::Gone => {
                    tracing::info!("pod discovery: watch version expired (410 Gone); listing again")
                }
                Interruption::Failed(why) => {
                    tracing::warn!(api = client.base(), error = %why, retry_in_ms = backoff.as_millis() as u64, "pod discovery: Kubernetes API unreachable; calls go to the function services until it answers");
                    // What was known may be stale: fall back to the services meanwhile.
                    on_change(&self.publish(&Slices::default()));
                    let jitter = backoff.mul_f64(fastrand::f64() * 0.2);
                    tokio::time::sleep(backoff + jitter).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Makes `slices` what [`Discovery::targets`] answers; gives the services that changed.
    fn publish(&self, slices: &Slices) -> Vec<String> {
        let now = slices.by_service();
        let mut services = self.services.write().expect("discovery lock");
        let mut changed: Vec<String> = services
            .keys()
            .filter(|s| !now.contains_key(*s))
            .cloned()
            .collect();
        for gone in &changed {
            services.remove(gone);
        }
        for (service, targets) in now {
            if services.get(&service).is_some_and(|t| **t == *targets) {
                continue;
            }
            changed.push(service.clone());
            services.insert(service, targets.into());
        }
        changed
    }
}

/// Every EndpointSlice known, by slice name: its service and its ready pods.
#[derive(Default)]
struct Slices(HashMap<String, (String, Vec<Target>)>);

impl Slices {
    fn from_list(items: Vec<EndpointSlice>) -> Slices {
        let mut slices = Slices::default();
        for slice in items {
            slices.apply("ADDED", slice);
        }
        slices
    }

    fn apply(&mut self, event: &str, slice: EndpointSlice) {
        let name = slice.metadata.name.clone();
        let service = slice.metadata.labels.get(SERVICE_LABEL).cloned();
        match (event, service) {
            ("ADDED" | "MODIFIED", Some(service)) => {
                self.0.insert(name, (service, slice.ready_targets()));
            }
            _ => {
                self.0.remove(&name);
            }
        }
    }

    /// The ready pods of each service that has at least one, sorted, each once.
    fn by_service(&self) -> HashMap<String, Vec<Target>> {
        let mut sets: HashMap<&str, BTreeSet<&Target>> = HashMap::new();
        for (service, targets) in self.0.values() {
            sets.entry(service).or_default().extend(targets);
        }
        sets.into_iter()
            .filter(|(_, set)| !set.is_empty())
            .map(|(service, set)| (service.to_string(), set.into_iter().cloned().collect()))
            .collect()
    }
}

async fn list(
    client: &KubeClient,
    path: &str,
) -> Result<(Vec<EndpointSlice>, String), Interruption> {
    let resp = client.get(path).await.map_err(Interruption::Failed)?;
    if !resp.status().is_success() {
        return Err(Interruption::Failed(format!(
            "listing EndpointSlices: {}",
            error_text(resp).await
        )));
    }
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| Interruption::Failed(format!("reading the EndpointSlice list: {e}")))?
        .to_bytes();
    let list: SliceList = serde_json::from_slice(&body)
        .map_err(|e| Interruption::Failed(format!("the EndpointSlice list is not one: {e}")))?;
    Ok((list.items, list.metadata.resource_version))
}

/// Watches from `version`, applying each event to `slices` and calling `published`
/// after each change; `version` follows the events. `Ok` when the server ends the watch.
async fn watch(
    client: &KubeClient,
    path: &str,
    version: &mut String,
    slices: &mut Slices,
    published: impl Fn(&Slices),
) -> Result<(), Interruption> {
    let url = format!(
        "{path}&watch=1&allowWatchBookmarks=true&timeoutSeconds={WATCH_SECONDS}&resourceVersion={version}"
    );
    let resp = client.get(&url).await.map_err(Interruption::Failed)?;
    match resp.status() {
        StatusCode::GONE => return Err(Interruption::Gone),
        s if !s.is_success() => {
            return Err(Interruption::Failed(format!(
                "watching EndpointSlices: {}",
                error_text(resp).await
            )));
        }
        _ => {}
    }
    let mut body = resp.into_body();
    let mut buf = BytesMut::new();
    loop {
        while let Some(end) = buf.iter().position(|&b| b == b'\n') {
            let line = buf.split_to(end + 1);
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let event: WatchEvent = serde_json::from_slice(&line)
                .map_err(|e| Interruption::Failed(format!("a watch event is not JSON: {e}")))?;
            match event.kind.as_str() {
                "ERROR" => {
                    return Err(if event.object["code"] == 410 {
                        Interruption::Gone
                    } else {
                        Interruption::Failed(format!("watch error: {}", event.object["message"]))
                    });
                }
                "BOOKMARK" => {}
                kind @ ("ADDED" | "MODIFIED" | "DELETED") => {
                    let slice: EndpointSlice =
                        serde_json::from_value(event.object).map_err(|e| {
                            Interruption::Failed(format!(
                                "a watch event holds no EndpointSlice: {e}"
                            ))
                        })?;
                    if !slice.metadata.resource_version.is_empty() {
                        version.clone_from(&slice.metadata.resource_version);
                    }
                    slices.apply(kind, slice);
                    published(slices);
                    continue;
                }
                other => tracing::debug!(event = other, "pod discovery: watch event ignored"),
            }
            if let Some(v) = event.object["metadata"]["resourceVersion"].as_str() {
                *version = v.to_string();
            }
        }
        if buf.len() > MAX_EVENT_BYTES {
            return Err(Interruption::Failed(format!(
                "a watch event longer than {MAX_EVENT_BYTES} bytes"
            )));
        }
        match tokio::time::timeout(WATCH_IDLE, body.frame()).await {
            Err(_) => {
                return Err(Interruption::Failed(format!(
                    "the watch sent nothing for {WATCH_IDLE:?}"
                )));
            }
            Ok(None) => return Ok(()),
            Ok(Some(Err(e))) => return Err(Interruption::Failed(format!("watch: {e}"))),
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    buf.extend_from_slice(&data);
                }
            }
        }
    }
}

#[derive(Deserialize)]
struct SliceList {
    metadata: ListMeta,
    #[serde(default)]
    items: Vec<EndpointSlice>,
}

#[derive(Deserialize)]
struct ListMeta {
    #[serde(default, rename = "resourceVersion")]
    resource_version: String,
}

#[derive(Deserialize)]
struct WatchEvent {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    object: serde_json::Value,
}

#[derive(Deserialize)]
struct EndpointSlice {
    metadata: SliceMeta,
    #[serde(default, rename = "addressType")]
    address_type: String,
    #[serde(default)]
    endpoints: Option<Vec<SliceEndpoint>>,
    #[serde(default)]
    ports: Option<Vec<SlicePort>>,
}

#[derive(Deserialize)]
struct SliceMeta {
    #[serde(default)]
    name: String,
    #[serde(default, rename = "resourceVersion")]
    resource_version: String,
    #[serde(default)]
    labels: HashMap<String, String>,
}

#[derive(Deserialize)]
struct SliceEndpoint {
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    conditions: Conditions,
}

#[derive(Deserialize, Default)]
struct Conditions {
    /// Absent means ready (the API's own rule).
    ready: Option<bool>,
}

#[derive(Deserialize)]
struct SlicePort {
    name: Option<String>,
    port: Option<u16>,
    protocol: Option<String>,
}

impl EndpointSlice {
    /// The port calls go to: the one named `http`, else the first TCP one.
    fn port(&self) -> Option<u16> {
        let ports = self.ports.as_deref().unwrap_or_default();
        let tcp = |p: &&SlicePort| p.protocol.as_deref().unwrap_or("TCP") == "TCP";
        ports
            .iter()
            .filter(tcp)
            .find(|p| p.name.as_deref() == Some("http"))
            .or_else(|| ports.iter().find(tcp))
            .and_then(|p| p.port)
    }

    fn ready_targets(&self) -> Vec<Target> {
        let Some(port) = self.port() else {
            return Vec::new();
        };
        let ipv6 = self.address_type == "IPv6";
        self.endpoints
            .iter()
            .flatten()
            .filter(|e| e.conditions.ready != Some(false))
            .flat_map(|e| &e.addresses)
            .map(|address| {
                let authority = if ipv6 {
                    format!("[{address}]:{port}")
                } else {
                    format!("{address}:{port}")
                };
                Target {
                    origin: format!("http://{authority}"),
                    authority,
                    path_prefix: String::new(),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(name: &str, service: &str, endpoints: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {SERVICE_LABEL: service}, "resourceVersion": "7"},
            "addressType": "IPv4",
            "ports": [{"name": "metrics", "port": 8081, "protocol": "TCP"}, {"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints,
        }))
        .unwrap()
    }

    #[test]
    fn ready_addresses_of_every_slice_of_a_service_are_merged() {
        let mut slices = Slices::default();
        slices.apply(
            "ADDED",
            slice(
                "hello-a",
                "hello",
                serde_json::json!([
                    {"addresses": ["10.0.0.2"], "conditions": {"ready": true}},
                    {"addresses": ["10.0.0.3"], "conditions": {"ready": false}},
                    {"addresses": ["10.0.0.4"]},
                ]),
            ),
        );
        slices.apply(
            "ADDED",
            slice(
                "hello-b",
                "hello",
                serde_json::json!([{"addresses": ["10.0.0.1"]}]),
            ),
        );
        slices.apply("ADDED", slice("other-a", "other", serde_json::json!(null)));
        let by = slices.by_service();
        let origins: Vec<&str> = by["hello"].iter().map(|t| t.origin.as_str()).collect();
        assert_eq!(
            origins,
            [
                "http://10.0.0.1:8080",
                "http://10.0.0.2:8080",
                "http://10.0.0.4:8080"
            ]
        );
        assert!(
            !by.contains_key("other"),
            "a service with no ready pod falls back"
        );

        let discovery = Discovery::default();
        let mut changed = discovery.publish(&slices);
        changed.sort();
        assert_eq!(changed, ["hello"]);
        assert!(discovery.publish(&slices).is_empty(), "nothing changed");
        slices.apply("DELETED", slice("hello-b", "hello", serde_json::json!([])));
        assert_eq!(discovery.publish(&slices), ["hello"]);
        assert_eq!(discovery.targets("hello").unwrap().len(), 2);
        slices.apply("DELETED", slice("hello-a", "hello", serde_json::json!([])));
        assert_eq!(discovery.publish(&slices), ["hello"]);
        assert!(discovery.targets("hello").is_none());
    }
}
