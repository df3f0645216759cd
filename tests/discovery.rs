//! Pod discovery for `openfaas` functions: the gateway lists and watches EndpointSlices on
//! a Kubernetes API (here a small local HTTP server that answers the list and watch calls
//! with EndpointSlice JSON), calls the ready pods (local servers that answer their own
//! name), follows pods added and removed while calls flow, and falls back to the function
//! service when the API cannot be reached.

mod common;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use common::*;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use http_body_util::combinators::BoxBody;
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

const NAMESPACE: &str = "fns";
const TOKEN: &str = "test-token-123";

// ---------------------------------------------------------------------------------------
// Pods: each answers its own name and counts its calls.
// ---------------------------------------------------------------------------------------

struct Pod {
    addr: SocketAddr,
    calls: Arc<AtomicUsize>,
}

impl Pod {
    async fn start(name: &'static str) -> Pod {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |_req: Request<Incoming>| {
                        counter.fetch_add(1, Ordering::SeqCst);
                        async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(name)))) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Pod { addr, calls }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

// ---------------------------------------------------------------------------------------
// The Kubernetes API: list and watch of EndpointSlices in one namespace.
// ---------------------------------------------------------------------------------------

type Body = BoxBody<Bytes, Infallible>;

#[derive(Default)]
struct ApiState {
    /// The slices, by name.
    slices: BTreeMap<String, Value>,
    version: u64,
    /// Open watches.
    watchers: Vec<mpsc::UnboundedSender<Bytes>>,
    /// Every request: path and query, Authorization header.
    requests: Vec<(String, Option<String>)>,
    /// Answer the next watch with a 410 Gone event.
    gone_next_watch: bool,
    addr: Option<SocketAddr>,
}

#[derive(Clone, Default)]
struct Api(Arc<Mutex<ApiState>>);

impl Api {
    async fn start_at(addr: SocketAddr) -> Api {
        Self::serve(addr, None).await
    }

    /// Serves HTTPS with a certificate for 127.0.0.1 that `ca` signed.
    async fn start_tls(ca: &TestCa) -> Api {
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&key, &ca.0)
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der().clone()], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        Self::serve("127.0.0.1:0".parse().unwrap(), Some(acceptor)).await
    }

    async fn serve(addr: SocketAddr, tls: Option<tokio_rustls::TlsAcceptor>) -> Api {
        let listener = TcpListener::bind(addr)
            .await
            .expect("binding the API address");
        let api = Api::default();
        api.0.lock().unwrap().addr = Some(listener.local_addr().unwrap());
        let state = api.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = state.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(state.answer(req)) }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    let _ = match tls {
                        None => http.serve_connection(TokioIo::new(stream), service).await,
                        Some(tls) => match tls.accept(stream).await {
                            Ok(stream) => {
                                http.serve_connection(TokioIo::new(stream), service).await
                            }
                            Err(_) => return,
                        },
                    };
                });
            }
        });
        api
    }

    async fn start() -> Api {
        Self::start_at("127.0.0.1:0".parse().unwrap()).await
    }

    fn answer(&self, req: Request<Incoming>) -> Response<Body> {
        let uri = req.uri().to_string();
        let auth = req
            .headers()
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_string());
        let mut state = self.0.lock().unwrap();
        state.requests.push((uri.clone(), auth));
        let expected = format!("/apis/discovery.k8s.io/v1/namespaces/{NAMESPACE}/endpointslices");
        if req.uri().path() != expected {
            return json_answer(
                StatusCode::NOT_FOUND,
                json!({"kind": "Status", "code": 404, "message": "not found"}),
            );
        }
        if !uri.contains("watch=1") {
            let items: Vec<Value> = state.slices.values().cloned().collect();
            return json_answer(
                StatusCode::OK,
                json!({"kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1",
                       "metadata": {"resourceVersion": state.version.to_string()}, "items": items}),
            );
        }
        let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
        if std::mem::take(&mut state.gone_next_watch) {
            let _ = tx.send(event("ERROR", json!({"kind": "Status", "code": 410, "reason": "Expired", "message": "too old resource version"})));
            drop(tx);
        } else {
            state.watchers.push(tx);
        }
        Response::builder()
            .header("content-type", "application/json")
            .body(BoxBody::new(WatchBody(rx)))
            .unwrap()
    }

    /// Puts the slice `name` of `service`: one pod, ready or not. (Pods on loopback differ
    /// by port, and a slice has one port for all its endpoints: so one slice per pod, as
    /// a service with several slices.) Sent to the open watches as an event.
    fn put_pod(&self, name: &str, service: &str, pod: SocketAddr, ready: bool) {
        let slice = json!({
            "kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
            "metadata": {"name": name, "namespace": NAMESPACE,
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": pod.port(), "protocol": "TCP"}],
            "endpoints": [{"addresses": [pod.ip().to_string()], "conditions": {"ready": ready},
                           "targetRef": {"kind": "Pod", "name": name}}],
        });
        self.change(name, Some(slice));
    }

    fn delete_slice(&self, name: &str) {
        self.change(name, None);
    }

    fn change(&self, name: &str, slice: Option<Value>) {
        let mut state = self.0.lock().unwrap();
        state.version += 1;
        let version = state.version.to_string();
        let (kind, mut object) = match slice {
            Some(slice) => match state.slices.insert(name.to_string(), slice.clone()) {
                Some(_) => ("MODIFIED", slice),
                None => ("ADDED", slice),
            },
            None => (
                "DELETED",
                state.slices.remove(name).expect("a slice to delete"),
            ),
        };
        object["metadata"]["resourceVersion"] = json!(version);
        if let Some(kept) = state.slices.get_mut(name) {
            kept["metadata"]["resourceVersion"] = json!(version);
        }
        let line = event(kind, object);
        state.watchers.retain(|w| w.send(line.clone()).is_ok());
    }

    fn requests(&self) -> Vec<(String, Option<String>)> {
        self.0.lock().unwrap().requests.clone()
    }

    fn watches(&self) -> usize {
        self.requests()
            .iter()
            .filter(|(u, _)| u.contains("watch=1"))
            .count()
    }
}

fn event(kind: &str, object: Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap();
    line.push(b'\n');
    Bytes::from(line)
}

fn json_answer(status: StatusCode, body: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(BoxBody::new(Full::new(Bytes::from(body.to_string()))))
        .unwrap()
}

/// A watch's body: the events sent to it, as they come.
struct WatchBody(mpsc::UnboundedReceiver<Bytes>);

impl http_body::Body for WatchBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|line| line.map(|l| Ok(Frame::data(l))))
    }
}

// ---------------------------------------------------------------------------------------
// The gateway
// ---------------------------------------------------------------------------------------

/// A gateway with pod discovery on, against the API at `api`; functions fall back to
/// `service` (as the OpenFaaS gateway: `/function/{name}`).
async fn gateway(api: SocketAddr, service: SocketAddr, dir: &tempfile::TempDir) -> Gateway {
    let token = dir.path().join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    let gw = Gateway::start_with(&[
        ("DISPATCH_OPENFAAS_GATEWAY", &format!("http://{service}")),
        ("DISPATCH_OPENFAAS_DISCOVERY", "endpointslices"),
        ("DISPATCH_OPENFAAS_NAMESPACE", NAMESPACE),
        ("DISPATCH_OPENFAAS_KUBE_API", &format!("http://{api}")),
        ("DISPATCH_OPENFAAS_KUBE_TOKEN_FILE", token.to_str().unwrap()),
    ])
    .await;
    gw.register(&json!({"name": "hello", "upstream": {"driver": "openfaas", "protocol": "raw"}}))
        .await;
    gw
}

/// Who answered one call.
async fn call(gw: &Gateway) -> String {
    let reply = gw.get("/function/hello").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    reply.text()
}

/// The endpoints the gateway has for `hello` (`gateway_service_count`).
async fn endpoints(gw: &Gateway) -> f64 {
    gw.metrics()
        .await
        .value("gateway_service_count", &[("function_name", "hello")])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_follow_pods_added_and_removed_while_they_flow() {
    let api = Api::start().await;
    let (a, b, c, d) = (
        Pod::start("a").await,
        Pod::start("b").await,
        Pod::start("c").await,
        Pod::start("d").await,
    );
    let service = Pod::start("service").await;
    api.put_pod("hello-a", "hello", a.addr, true);
    api.put_pod("hello-b", "hello", b.addr, true);
    api.put_pod("hello-c", "hello", c.addr, false);
    // The first watch finds its version expired: the gateway lists again.
    api.0.lock().unwrap().gone_next_watch = true;
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(api_addr(&api), service.addr, &dir).await;

    until_seen("the two ready pods", || endpoints(&gw), |n| *n == 2.0).await;
    until_seen(
        "a second list after 410 Gone, then a watch",
        || async { api.watches() },
        |n| *n >= 2,
    )
    .await;
    let requests = api.requests();
    let lists = requests
        .iter()
        .filter(|(u, _)| !u.contains("watch=1"))
        .count();
    assert!(
        lists >= 2,
        "410 Gone makes the gateway list again: {requests:?}"
    );
    assert!(
        requests.iter().all(
            |(u, auth)| u.contains("labelSelector=kubernetes.io%2Fservice-name")
                && auth.as_deref() == Some(&format!("Bearer {TOKEN}"))
        ),
        "every API call selects service slices and carries the token: {requests:?}"
    );

    let mut seen = BTreeMap::new();
    for _ in 0..40 {
        *seen.entry(call(&gw).await).or_insert(0) += 1;
    }
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        ["a", "b"],
        "ready pods only: {seen:?}"
    );
    assert_eq!(
        c.calls() + service.calls(),
        0,
        "no call to the unready pod or the service"
    );

    // Steady calls from four clients while pods come and go. Each call notes whether it
    // started after the removal of pod a was applied.
    let removed = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let answers: Arc<Mutex<Vec<(bool, String)>>> = Arc::default();
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (removed, stop, answers, addr) =
            (removed.clone(), stop.clone(), answers.clone(), gw.addr);
        clients.spawn(async move {
            let mut conn = Connection::open(addr).await;
            while !stop.load(Ordering::SeqCst) {
                let after_removal = removed.load(Ordering::SeqCst);
                let reply = conn
                    .request(Method::GET, "/function/hello", Bytes::new())
                    .await;
                assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
                answers.lock().unwrap().push((after_removal, reply.text()));
            }
        });
    }

    api.put_pod("hello-d", "hello", d.addr, true);
    until_seen("pod d added", || endpoints(&gw), |n| *n == 3.0).await;
    until_seen("pod d receives calls", || async { d.calls() }, |n| *n > 10).await;

    api.delete_slice("hello-a");
    until_seen("pod a removed", || endpoints(&gw), |n| *n == 2.0).await;
    removed.store(true, Ordering::SeqCst);
    let after = |answers: &Mutex<Vec<(bool, String)>>| {
        answers.lock().unwrap().iter().filter(|(r, _)| *r).count()
    };
    until_seen(
        "calls after the removal",
        || async { after(&answers) },
        |n| *n >= 200,
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    while let Some(done) = clients.join_next().await {
        done.expect("client");
    }
    let answers = answers.lock().unwrap().clone();
    let to_a_after: usize = answers.iter().filter(|(r, who)| *r && who == "a").count();
    let total_after = answers.iter().filter(|(r, _)| *r).count();
    assert_eq!(
        to_a_after, 0,
        "{to_a_after} of {total_after} calls after the removal went to the removed pod"
    );
    let d_share = answers.iter().filter(|(r, who)| *r && who == "d").count();
    assert!(
        d_share > 0,
        "the added pod serves calls after the removal ({total_after} calls)"
    );

    // And when nothing else is in flight: pod a hears nothing more at all.
    let a_before = a.calls();
    for _ in 0..50 {
        assert_ne!(call(&gw).await, "a");
    }
    assert_eq!(a.calls(), a_before, "calls reached the removed pod");

    // No slice left: the function service again.
    api.delete_slice("hello-b");
    api.delete_slice("hello-c");
    api.delete_slice("hello-d");
    until_seen(
        "fallback to the service",
        || call(&gw),
        |who| who == "service",
    )
    .await;
    for _ in 0..20 {
        assert_eq!(call(&gw).await, "service");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_go_to_the_service_while_the_api_is_unreachable() {
    let api_addr = free_addr();
    let service = Pod::start("service").await;
    let pod = Pod::start("pod").await;
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(api_addr, service.addr, &dir).await;

    for _ in 0..20 {
        assert_eq!(call(&gw).await, "service");
    }
    until_seen(
        "a warning that the API is unreachable",
        || async { gw.log() },
        |log| log.contains("Kubernetes API unreachable"),
    )
    .await;

    // The API comes up: the gateway's retry finds it and the pod.
    let api = Api::start_at(api_addr).await;
    api.put_pod("hello-1", "hello", pod.addr, true);
    until_seen(
        "calls to the discovered pod",
        || call(&gw),
        |who| who == "pod",
    )
    .await;
    assert_eq!(endpoints(&gw).await, 1.0);
}

/// A cluster CA: what signs the API server's certificate; its PEM goes in `ca.crt`.
struct TestCa(rcgen::CertifiedIssuer<'static, rcgen::KeyPair>);

impl TestCa {
    fn new(dir: &Path) -> (TestCa, PathBuf) {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "test cluster CA");
        let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
            .unwrap();
        let path = dir.join("ca.crt");
        std::fs::write(&path, ca.pem()).unwrap();
        (TestCa(ca), path)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_the_cluster_the_api_is_reached_over_https_trusting_the_cluster_ca_only() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, ca_file) = TestCa::new(dir.path());
    let api = Api::start_tls(&ca).await;
    let pod = Pod::start("pod").await;
    let service = Pod::start("service").await;
    api.put_pod("hello-1", "hello", pod.addr, true);
    let token = dir.path().join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let port = api_addr(&api).port().to_string();
    let in_cluster = |ca: &Path| {
        vec![
            (
                "DISPATCH_OPENFAAS_GATEWAY".to_string(),
                format!("http://{}", service.addr),
            ),
            (
                "DISPATCH_OPENFAAS_DISCOVERY".into(),
                "endpointslices".into(),
            ),
            ("DISPATCH_OPENFAAS_NAMESPACE".into(), NAMESPACE.into()),
            (
                "DISPATCH_OPENFAAS_KUBE_TOKEN_FILE".into(),
                token.display().to_string(),
            ),
            (
                "DISPATCH_OPENFAAS_KUBE_CA_FILE".into(),
                ca.display().to_string(),
            ),
            ("KUBERNETES_SERVICE_HOST".into(), "127.0.0.1".into()),
            ("KUBERNETES_SERVICE_PORT".into(), port.clone()),
        ]
    };
    let start = |env: Vec<(String, String)>| async move {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let gw = Gateway::start_with(&env).await;
        gw.register(
            &json!({"name": "hello", "upstream": {"driver": "openfaas", "protocol": "raw"}}),
        )
        .await;
        gw
    };

    let gw = start(in_cluster(&ca_file)).await;
    until_seen("calls to the pod", || call(&gw), |who| who == "pod").await;
    assert!(
        api.requests()
            .iter()
            .all(|(_, auth)| auth.as_deref() == Some(&format!("Bearer {TOKEN}"))),
        "{:?}",
        api.requests()
    );

    // A gateway that trusts another CA refuses the server, and keeps to the service.
    let other = tempfile::tempdir().unwrap();
    let (_, other_ca) = TestCa::new(other.path());
    let distrustful = start(in_cluster(&other_ca)).await;
    until_seen(
        "a warning naming the TLS failure",
        || async { distrustful.log() },
        |log| log.contains("Kubernetes API unreachable") && log.contains("TLS handshake"),
    )
    .await;
    for _ in 0..10 {
        assert_eq!(call(&distrustful).await, "service");
    }
}

fn api_addr(api: &Api) -> SocketAddr {
    api.0.lock().unwrap().addr.expect("bound")
}
