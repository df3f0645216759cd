//! The gateway process: registrations kept in the store across a restart or a crash,
//! draining on SIGTERM (calls in flight finish, new connections are refused, exit 0, and
//! never longer than `server.drain_seconds`), and start-up refusing a bad configuration.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Method, StatusCode};
use serde_json::{Value, json};

fn by_name(list: &Value) -> Vec<(String, Value)> {
    list.as_array()
        .expect("a list")
        .iter()
        .map(|f| (f["name"].as_str().unwrap().to_string(), f.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_survive_a_restart() {
    let up = Upstream::start(Behavior::Echo).await;
    let moved_to = Upstream::start(Behavior::Echo).await;
    let mut gw = Gateway::start().await;
    let kept = gw
        .register(&function(
            "kept",
            &[up.addr],
            json!({"timeout": 7000, "tags": [{"key": "team", "value": "blue"}]}),
        ))
        .await;
    gw.register(&function("moved", &[up.addr], json!({}))).await;
    gw.register(&function("dropped", &[up.addr], json!({})))
        .await;
    let moved = gw
        .put_json(
            "/v1/function/moved",
            &function("moved", &[moved_to.addr], json!({})),
        )
        .await
        .json();
    assert_eq!(
        gw.delete("/v1/function/dropped").await.status,
        StatusCode::OK
    );
    let before = gw.get("/v1/function").await.json();

    gw.restart().await;

    let after = gw.get("/v1/function").await.json();
    assert_eq!(after, before, "the same functions after the restart");
    let listed = by_name(&after);
    assert_eq!(
        listed.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["kept", "moved"]
    );
    assert_eq!(listed[0].1, kept);
    assert_eq!(listed[1].1, moved);
    assert_eq!(
        by_name(&gw.get("/v1/function?tags=team=blue").await.json()).len(),
        1
    );

    // Calls work and go where the stored registrations say.
    let reply = request(gw.addr, Method::GET, "/function/kept/x", &[], Bytes::new()).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["path"], "/x");
    let reply = request(gw.addr, Method::GET, "/function/moved", &[], Bytes::new()).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(moved_to.stats.requests(), 1);
    request(gw.addr, Method::GET, "/function/dropped", &[], Bytes::new())
        .await
        .assert_error(404, "not-found");
    assert_eq!(up.stats.requests(), 1);
    let m = gw.metrics().await;
    assert_eq!(
        m.get("gateway_service_count", &[("function_name", "kept")]),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_survive_a_crash() {
    let up = Upstream::start(Behavior::Echo).await;
    let mut gw = Gateway::start().await;
    let created = gw
        .register(&function("durable", &[up.addr], json!({})))
        .await;
    gw.crash();
    gw.start_again().await;
    assert_eq!(gw.get("/v1/function/durable").await.json(), created);
    let reply = request(gw.addr, Method::GET, "/function/durable", &[], Bytes::new()).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    // The name is still taken.
    gw.post_json("/v1/function", &function("durable", &[up.addr], json!({})))
        .await
        .assert_error(409, "conflict");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_calls_in_flight_then_exits_0() {
    let gate = Gate::default();
    let up = Upstream::start(Behavior::Gated(gate.clone())).await;
    let mut gw = Gateway::start().await;
    gw.register(&function("slow", &[up.addr], json!({}))).await;

    let addr = gw.addr;
    let in_flight = tokio::spawn(async move {
        request(
            addr,
            Method::POST,
            "/function/slow",
            &[],
            Bytes::from_static(b"x"),
        )
        .await
    });
    eventually(PATIENCE, "the call at the upstream", || {
        up.stats.inflight() == 1
    })
    .await;

    gw.terminate();
    // While the call is held, the gateway stops accepting but keeps running.
    let mut refused = false;
    for _ in 0..200 {
        match tokio::net::TcpStream::connect(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                refused = true;
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(25)).await,
        }
    }
    assert!(refused, "new connections are refused after SIGTERM");
    assert!(
        gw.exited().is_none(),
        "the gateway waits for the call in flight"
    );
    assert!(!in_flight.is_finished());

    gate.open();
    let reply = in_flight.await.unwrap();
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.text(), "gated");
    let status = gw.wait_exit(PATIENCE).await;
    assert!(status.success(), "exit status after draining: {status}");
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_gives_up_on_calls_after_the_drain_period() {
    let gate = Gate::default();
    let up = Upstream::start(Behavior::Gated(gate.clone())).await;
    let mut gw = Gateway::start_with(&[("DISPATCH_SERVER_DRAIN_SECONDS", "1")]).await;
    gw.register(&function("stuck", &[up.addr], json!({}))).await;
    let addr = gw.addr;
    let in_flight = tokio::spawn(async move {
        let req = http::Request::get("/function/stuck")
            .body(http_body_util::Full::new(Bytes::new()))
            .unwrap();
        send(addr, req).await.map(|r| r.status())
    });
    eventually(PATIENCE, "the call at the upstream", || {
        up.stats.inflight() == 1
    })
    .await;
    gw.terminate();
    let status = gw.wait_exit(PATIENCE).await;
    assert_eq!(status.code(), Some(0), "exit status: {status}");
    // The caller learns its call was cut (no answer), rather than hanging.
    let outcome = tokio::time::timeout(PATIENCE, in_flight)
        .await
        .expect("the caller is not left hanging")
        .unwrap();
    assert!(outcome.is_err(), "{outcome:?}");
    gate.open();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_overrides_apply_and_bad_values_stop_start_up() {
    // A good override takes effect: a 50 ms default deadline makes a slow call 504.
    let up = Upstream::start(Behavior::Slow(Duration::from_millis(500))).await;
    let gw = Gateway::start_with(&[("DISPATCH_LIMITS_DEFAULT_TIMEOUT_MS", "50")]).await;
    gw.register(&function("slow", &[up.addr], json!({}))).await;
    request(gw.addr, Method::GET, "/function/slow", &[], Bytes::new())
        .await
        .assert_error(504, "upstream-timeout");

    let (status, stderr) = start_failing(&[("DISPATCH_LIMITS_BODY_BYTES", "lots")]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("limits.body_bytes"), "{stderr}");
    let (status, stderr) = start_failing(&[("DISPATCH_UPSTREAM_CONNECT_ATTEMPTS", "0")]);
    assert!(!status.success());
    assert!(stderr.contains("upstream.connect_attempts"), "{stderr}");
}
