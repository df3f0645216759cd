//! Spreading calls over a function's endpoints: a fair share each, fewer calls to a slow
//! endpoint (least in flight), and an endpoint that refuses
//! connections set aside for `upstream.eject_seconds`, then used again once it is back.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Method, StatusCode};
use serde_json::json;

/// `workers` clients at once, each making `calls` calls one after another on its own
/// keep-alive connection; every status must be 200.
async fn call_concurrently(addr: SocketAddr, path: &str, workers: usize, calls: usize) {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let path = path.to_string();
        tasks.spawn(async move {
            let mut conn = Connection::open(addr).await;
            for _ in 0..calls {
                let reply = conn.request(Method::GET, &path, Bytes::new()).await;
                assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("worker");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_spread_fairly_over_three_endpoints() {
    let ups = [
        Upstream::start(Behavior::Echo).await,
        Upstream::start(Behavior::Echo).await,
        Upstream::start(Behavior::Echo).await,
    ];
    let gw = Gateway::start().await;
    let addrs: Vec<SocketAddr> = ups.iter().map(|u| u.addr).collect();
    gw.register(&function("spread", &addrs, json!({}))).await;
    call_concurrently(gw.addr, "/function/spread", 10, 30).await;
    let counts: Vec<usize> = ups.iter().map(|u| u.stats.requests()).collect();
    assert_eq!(counts.iter().sum::<usize>(), 300, "{counts:?}");
    for (i, n) in counts.iter().enumerate() {
        assert!(
            *n >= 45,
            "endpoint {i} got {n} of 300 calls (< 15%): {counts:?}"
        );
    }
    let m = gw.metrics().await;
    assert_eq!(
        m.get("gateway_service_count", &[("function_name", "spread")]),
        Some(3.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_endpoint_gets_fewer_calls() {
    let fast_a = Upstream::start(Behavior::Echo).await;
    let fast_b = Upstream::start(Behavior::Echo).await;
    let slow = Upstream::start(Behavior::Slow(Duration::from_millis(150))).await;
    let gw = Gateway::start().await;
    gw.register(&function(
        "mixed",
        &[fast_a.addr, slow.addr, fast_b.addr],
        json!({}),
    ))
    .await;
    call_concurrently(gw.addr, "/function/mixed", 8, 25).await;
    let (a, b, s) = (
        fast_a.stats.requests(),
        fast_b.stats.requests(),
        slow.stats.requests(),
    );
    assert_eq!(a + b + s, 200);
    assert!(
        s < a.min(b) && s < 40,
        "the slow endpoint got {s} calls, the fast ones {a} and {b}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_endpoint_is_ejected_then_used_again_when_back() {
    let up_a = Upstream::start(Behavior::Echo).await;
    let up_b = Upstream::start(Behavior::Echo).await;
    let dead = free_addr();
    let gw = Gateway::start_with(&[("DISPATCH_UPSTREAM_EJECT_SECONDS", "1")]).await;
    gw.register(&function(
        "resilient",
        &[up_a.addr, dead, up_b.addr],
        json!({}),
    ))
    .await;

    let began = Instant::now();
    let mut conn = Connection::open(gw.addr).await;
    for i in 0..100 {
        let reply = conn
            .request(Method::GET, "/function/resilient", Bytes::new())
            .await;
        assert_eq!(reply.status, StatusCode::OK, "call {i}: {}", reply.text());
    }
    let elapsed = began.elapsed();
    assert_eq!(up_a.stats.requests() + up_b.stats.requests(), 100);

    // Each try on the dead endpoint is one refused connection, and ejects it again for a
    // second: over the phase it can only have been tried about once a second.
    let dead_url = format!("http://{dead}");
    let m = gw.metrics().await;
    let tries = m.value(
        "dispatch_upstream_ejections_total",
        &[("endpoint", &dead_url)],
    );
    let allowed = 3.0 + 2.0 * elapsed.as_secs_f64().ceil();
    assert!(
        (1.0..=allowed).contains(&tries),
        "the dead endpoint was tried {tries} times in {elapsed:?} (allowed {allowed})\n{}",
        m.text
    );
    assert_eq!(
        m.value(
            "dispatch_upstream_connect_retries_total",
            &[("function_name", "resilient")]
        ),
        tries,
        "each refused try was retried on another endpoint"
    );

    // The endpoint comes back on the same port; once its ejection is over it gets calls.
    let revived = Upstream::start_on(dead, Behavior::Echo, false).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for i in 0..60 {
        let reply = conn
            .request(Method::GET, "/function/resilient", Bytes::new())
            .await;
        assert_eq!(reply.status, StatusCode::OK, "call {i}: {}", reply.text());
    }
    let back = revived.stats.requests();
    assert!(back >= 5, "the revived endpoint got {back} of 60 calls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_endpoint_down_the_call_is_502_after_trying_each_once() {
    let dead = [free_addr(), free_addr()];
    let gw = Gateway::start().await;
    gw.register(&function("down", &dead, json!({}))).await;
    let reply = request(gw.addr, Method::GET, "/function/down", &[], Bytes::new()).await;
    let message = reply.assert_error(502, "upstream-unavailable");
    assert!(message.contains("\"down\""), "{message}");
    let m = gw.metrics().await;
    let tried: f64 = dead
        .iter()
        .map(|a| {
            m.value(
                "dispatch_upstream_ejections_total",
                &[("endpoint", &format!("http://{a}"))],
            )
        })
        .sum();
    assert_eq!(tried, 2.0, "each endpoint tried once\n{}", m.text);
}
