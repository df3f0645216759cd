//! A rolling restart with zero failed requests: two gateways behind nginx (installed with
//! apt-get when missing, run with its own config on a loopback port), steady POST load
//! through nginx, each gateway restarted in turn (SIGTERM, exit, start again on the same
//! port). nginx does not read `/readyz`: what keeps every request whole is the gateway's
//! shutdown (docs/architecture.md, "Shutdown") and nginx retrying refused connections on
//! the other gateway.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpStream;

/// nginx, from PATH or its Debian place; installed with apt-get when it is not there.
fn nginx_binary() -> PathBuf {
    let find = || {
        ["/usr/sbin/nginx", "/usr/bin/nginx", "/usr/local/sbin/nginx"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
    };
    if let Some(found) = find() {
        return found;
    }
    let installed = apt_install("nginx");
    find().unwrap_or_else(|| {
        panic!(
            "nginx is not installed and `apt-get install nginx` did not install it: {}",
            installed.err().unwrap_or_default()
        )
    })
}

/// nginx in front of `upstreams`, as a deployment would run it: upstream keep-alive,
/// passive health checks, the next upstream tried on a connection error or a 502/503.
struct Nginx {
    addr: SocketAddr,
    child: Child,
    dir: tempfile::TempDir,
}

impl Nginx {
    async fn start(upstreams: &[SocketAddr]) -> Nginx {
        let binary = nginx_binary();
        let dir = tempfile::tempdir().unwrap();
        let addr = free_addr();
        let servers: String = upstreams
            .iter()
            .map(|u| format!("        server {u} max_fails=1 fail_timeout=2s;\n"))
            .collect();
        let d = dir.path().display();
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\nevents {{ worker_connections 1024; }}\n\
             http {{\n    access_log off;\n    client_body_temp_path {d}/body;\n\
             proxy_temp_path {d}/proxy;\n    fastcgi_temp_path {d}/fastcgi;\n\
             uwsgi_temp_path {d}/uwsgi;\n    scgi_temp_path {d}/scgi;\n\
             upstream gateways {{\n{servers}        keepalive 32;\n    }}\n\
             server {{\n        listen {addr};\n        location / {{\n\
             proxy_pass http://gateways;\n            proxy_http_version 1.1;\n\
             proxy_set_header Connection \"\";\n\
             proxy_next_upstream error timeout http_502 http_503;\n\
             proxy_connect_timeout 2s;\n        }}\n    }}\n}}\n"
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let child = Command::new(&binary)
            .arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        let mut nginx = Nginx { addr, child, dir };
        let deadline = std::time::Instant::now() + PATIENCE;
        while TcpStream::connect(addr).await.is_err() {
            if let Ok(Some(status)) = nginx.child.try_wait() {
                panic!("nginx exited ({status}): {}", nginx.errors());
            }
            assert!(
                std::time::Instant::now() < deadline,
                "nginx never listened on {addr}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        nginx
    }

    fn errors(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the load saw.
#[derive(Default)]
struct Tally {
    ok: AtomicUsize,
    failed: AtomicUsize,
    /// The first failures, for the message.
    examples: std::sync::Mutex<Vec<String>>,
}

impl Tally {
    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Ordering::SeqCst);
        let mut examples = self.examples.lock().unwrap();
        if examples.len() < 10 {
            examples.push(what);
        }
    }
}

/// One client: POSTs through nginx on a keep-alive connection (a new one after a
/// transport error) until `stop`.
async fn client(nginx: SocketAddr, n: usize, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    let mut sender = None;
    let mut i = 0;
    while !stop.load(Ordering::SeqCst) {
        i += 1;
        if sender.is_none() {
            let stream = TcpStream::connect(nginx).await.expect("nginx accepts");
            let (s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .expect("handshake with nginx");
            tokio::spawn(conn);
            sender = Some(s);
        }
        let s = sender.as_mut().unwrap();
        let body = format!("{{\"client\":{n},\"call\":{i}}}");
        let req = Request::post("/function/echo")
            .header("host", nginx.to_string())
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.clone())))
            .unwrap();
        let outcome = async {
            s.ready().await.map_err(|e| format!("connection: {e}"))?;
            let resp = s
                .send_request(req)
                .await
                .map_err(|e| format!("request: {e}"))?;
            // nginx ends a client connection after `keepalive_requests` calls, saying so.
            let last = resp
                .headers()
                .get("connection")
                .is_some_and(|v| v == "close");
            let status = resp.status();
            let got = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("body: {e}"))?;
            let got = String::from_utf8_lossy(&got.to_bytes()).into_owned();
            if status != StatusCode::OK || !got.contains(&format!("\"call\\\":{i}}}")) {
                return Err(format!("{status}: {got}"));
            }
            Ok(last)
        };
        match tokio::time::timeout(PATIENCE, outcome).await {
            Ok(Ok(last)) => {
                tally.ok.fetch_add(1, Ordering::SeqCst);
                if last {
                    sender = None;
                }
            }
            Ok(Err(e)) => {
                tally.fail(format!("client {n} call {i}: {e}"));
                sender = None;
            }
            Err(_) => {
                tally.fail(format!(
                    "client {n} call {i}: no answer within {PATIENCE:?}"
                ));
                sender = None;
            }
        }
    }
}

/// Calls that reached the `echo` function through `gw` so far.
async fn served(gw: &Gateway) -> f64 {
    gw.metrics().await.value(
        "gateway_function_invocation_total",
        &[("function_name", "echo"), ("code", "200")],
    )
}

/// SIGTERM, wait for a clean exit (checking `/readyz` turned 503 while it still served),
/// start again on the same port, and wait until nginx sends it calls again.
async fn roll(gw: &mut Gateway) {
    let addr = gw.addr;
    gw.terminate();
    // The shutdown delay: still answering, and unready.
    loop {
        let req = Request::get("/readyz")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = send(addr, req)
            .await
            .unwrap_or_else(|e| panic!("no answer on /readyz before it turned unready: {e}"));
        let ready = read_reply(resp).await;
        if ready.status == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(ready.json()["listener"], "shutting down");
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = gw.wait_exit(PATIENCE).await;
    assert!(
        status.success(),
        "exit status on SIGTERM: {status}; log:\n{}",
        gw.log()
    );
    gw.start_again_on(addr).await;
    assert_eq!(gw.addr, addr);
    until_seen(
        "the restarted gateway ready, and getting calls from nginx",
        || async {
            let ready = request(addr, Method::GET, "/readyz", &[], Bytes::new()).await;
            (ready.status, served(gw).await)
        },
        |(status, served)| *status == StatusCode::OK && *served > 50.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_behind_nginx_fails_no_request() {
    let up = Upstream::start(Behavior::Echo).await;
    let env = [
        ("DISPATCH_SERVER_SHUTDOWN_DELAY_SECONDS", "1"),
        ("DISPATCH_SERVER_DRAIN_SECONDS", "10"),
        ("DISPATCH_RECORDS_RAW", "none"),
    ];
    let mut gateways = [
        Gateway::start_with(&env).await,
        Gateway::start_with(&env).await,
    ];
    for gw in &gateways {
        gw.register(&function("echo", &[up.addr], json!({}))).await;
    }
    let nginx = Nginx::start(&[gateways[0].addr, gateways[1].addr]).await;

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut clients = tokio::task::JoinSet::new();
    for n in 0..4 {
        clients.spawn(client(nginx.addr, n, stop.clone(), tally.clone()));
    }
    // Load on both before the first restart.
    for gw in &gateways {
        until_seen(
            "calls from nginx on each gateway",
            || served(gw),
            |n| *n > 50.0,
        )
        .await;
    }
    for gw in &mut gateways {
        roll(gw).await;
    }
    stop.store(true, Ordering::SeqCst);
    while let Some(done) = clients.join_next().await {
        done.expect("client task");
    }

    let ok = tally.ok.load(Ordering::SeqCst);
    let failed = tally.failed.load(Ordering::SeqCst);
    assert!(ok > 200, "the load ran: {ok} requests");
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed during the rolling restart: {:?}\nnginx errors:\n{}",
        ok + failed,
        tally.examples.lock().unwrap(),
        nginx.errors()
    );
    eprintln!("rolling restart: {ok} requests, 0 failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_the_shutdown_delay_calls_are_served_and_async_runs_wait_for_the_next_start() {
    let up = Upstream::start(Behavior::Echo).await;
    let mut gw = Gateway::start_with(&[("DISPATCH_SERVER_SHUTDOWN_DELAY_SECONDS", "2")]).await;
    gw.register(&function("echo", &[up.addr], json!({}))).await;
    gw.terminate();
    until_seen(
        "/readyz answering 503 after SIGTERM",
        || request(gw.addr, Method::GET, "/readyz", &[], Bytes::new()),
        |r| r.status == StatusCode::SERVICE_UNAVAILABLE,
    )
    .await;
    // Still serving, each answer ending its connection.
    let sync = request(
        gw.addr,
        Method::POST,
        "/function/echo",
        &[],
        Bytes::from("hi"),
    )
    .await;
    assert_eq!(sync.status, StatusCode::OK, "{}", sync.text());
    assert_eq!(sync.header("connection"), Some("close"));
    let seen = up.stats.requests();
    // An async call is accepted (and stored) but not taken by this gateway's workers.
    let accepted = request(
        gw.addr,
        Method::POST,
        "/async-function/echo",
        &[],
        Bytes::from("later"),
    )
    .await;
    assert_eq!(accepted.status, StatusCode::ACCEPTED, "{}", accepted.text());
    let status = gw.wait_exit(PATIENCE).await;
    assert!(status.success(), "exit status on SIGTERM: {status}");
    assert_eq!(
        up.stats.requests(),
        seen,
        "a stopping gateway took a new async run"
    );
    gw.start_again().await;
    until_seen(
        "the async run, by the next start",
        || async { up.stats.requests() },
        |n| *n == seen + 1,
    )
    .await;
}
