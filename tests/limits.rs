//! Per-function concurrency limits: `maxInflight` calls run, `maxQueue` callers wait for a
//! slot (never longer than `limits.queue_wait_ms`), the rest get 429 with `Retry-After`,
//! counted in `dispatch_rejections_total`.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Method, StatusCode};
use serde_json::json;
use tokio::task::JoinHandle;

fn spawn_call(gw: &Gateway, path: &'static str) -> JoinHandle<Reply> {
    let addr = gw.addr;
    tokio::spawn(async move { request(addr, Method::GET, path, &[], Bytes::new()).await })
}

fn assert_429(reply: &Reply) {
    let message = reply.assert_error(429, "concurrency-limit");
    assert!(message.contains("\"limited\""), "{message}");
    let retry_after: u64 = reply
        .header("retry-after")
        .expect("Retry-After on a 429")
        .parse()
        .expect("Retry-After in seconds");
    assert!(retry_after >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_inflight_runs_some_queues_one_and_refuses_the_rest() {
    let gate = Gate::default();
    let up = Upstream::start(Behavior::Gated(gate.clone())).await;
    let gw = Gateway::start_with(&[("DISPATCH_LIMITS_QUEUE_WAIT_MS", "20000")]).await;
    gw.register(&function(
        "limited",
        &[up.addr],
        json!({"maxInflight": 2, "maxQueue": 1}),
    ))
    .await;

    let running = [
        spawn_call(&gw, "/function/limited"),
        spawn_call(&gw, "/function/limited"),
    ];
    eventually(PATIENCE, "two calls at the upstream", || {
        up.stats.inflight() == 2
    })
    .await;
    // Four more while both slots are taken: one finds room in the queue, three do not.
    let more: Vec<JoinHandle<Reply>> = (0..4)
        .map(|_| spawn_call(&gw, "/function/limited"))
        .collect();
    eventually(PATIENCE, "three calls refused", || {
        more.iter().filter(|t| t.is_finished()).count() == 3
    })
    .await;
    assert_eq!(
        up.stats.requests(),
        2,
        "nothing past the limit reached the upstream"
    );
    gate.open();

    for call in running {
        let reply = call.await.unwrap();
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
    let mut ok = 0;
    for call in more {
        let reply = call.await.unwrap();
        if reply.status == StatusCode::OK {
            ok += 1;
        } else {
            assert_429(&reply);
        }
    }
    assert_eq!(ok, 1, "the queued call ran once a slot came free");
    assert_eq!(up.stats.requests(), 3);
    assert!(up.stats.max_inflight() <= 2, "{}", up.stats.max_inflight());

    let m = gw.metrics().await;
    assert_eq!(
        m.value(
            "dispatch_rejections_total",
            &[("function_name", "limited"), ("reason", "queue_full")]
        ),
        3.0,
        "{}",
        m.text
    );
    assert_eq!(
        m.value(
            "gateway_function_invocation_total",
            &[("function_name", "limited"), ("code", "429")]
        ),
        3.0
    );
    assert_eq!(
        m.value(
            "gateway_function_invocation_total",
            &[("function_name", "limited"), ("code", "200")]
        ),
        3.0
    );
    assert_eq!(
        m.get(
            "dispatch_function_inflight",
            &[("function_name", "limited")]
        ),
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_call_waits_no_longer_than_the_configured_wait() {
    let gate = Gate::default();
    let up = Upstream::start(Behavior::Gated(gate.clone())).await;
    let gw = Gateway::start_with(&[("DISPATCH_LIMITS_QUEUE_WAIT_MS", "200")]).await;
    gw.register(&function(
        "limited",
        &[up.addr],
        json!({"maxInflight": 1, "maxQueue": 5}),
    ))
    .await;
    let first = spawn_call(&gw, "/function/limited");
    eventually(PATIENCE, "the first call at the upstream", || {
        up.stats.inflight() == 1
    })
    .await;
    let waited = request(gw.addr, Method::GET, "/function/limited", &[], Bytes::new()).await;
    assert_429(&waited);
    gate.open();
    assert_eq!(first.await.unwrap().status, StatusCode::OK);
    let m = gw.metrics().await;
    assert_eq!(
        m.value(
            "dispatch_rejections_total",
            &[("function_name", "limited"), ("reason", "queue_timeout")]
        ),
        1.0,
        "{}",
        m.text
    );
    // The slot was given back: the next call runs.
    let reply = request(gw.addr, Method::GET, "/function/limited", &[], Bytes::new()).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limit_holds_on_the_dispatch_surface_too() {
    let gate = Gate::default();
    let up = Upstream::start(Behavior::Gated(gate.clone())).await;
    let gw = Gateway::start().await;
    gw.register(&function(
        "limited",
        &[up.addr],
        json!({"maxInflight": 1, "maxQueue": 0}),
    ))
    .await;
    let first = spawn_call(&gw, "/function/limited");
    eventually(PATIENCE, "the first call at the upstream", || {
        up.stats.inflight() == 1
    })
    .await;
    let run = gw.run("limited", json!({"x": 1})).await;
    assert_429(&run);
    gate.open();
    assert_eq!(first.await.unwrap().status, StatusCode::OK);
    assert_eq!(up.stats.requests(), 1);
    // Slots are freed by the end of each call.
    let run = gw.run("limited", json!({"x": 2})).await;
    assert_eq!(run.status, StatusCode::OK, "{}", run.text());
    assert_eq!(run.json()["status"], "READY");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updating_a_function_keeps_its_calls_in_flight_under_the_limit() {
    let gate = Gate::default();
    let up = Upstream::start(Behavior::Gated(gate.clone())).await;
    let gw = Gateway::start().await;
    let spec = function(
        "limited",
        &[up.addr],
        json!({"maxInflight": 1, "maxQueue": 0}),
    );
    gw.register(&spec).await;
    let first = spawn_call(&gw, "/function/limited");
    eventually(PATIENCE, "the first call at the upstream", || {
        up.stats.inflight() == 1
    })
    .await;
    // An update that changes nothing about the limit (a tag).
    let mut retagged = spec.clone();
    merge(&mut retagged, json!({"tags": [{"key": "k", "value": "v"}]}));
    let reply = gw.put_json("/v1/function/limited", &retagged).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());

    let second = spawn_call(&gw, "/function/limited");
    eventually(
        PATIENCE,
        "the second call refused or at the upstream",
        || second.is_finished() || up.stats.inflight() == 2,
    )
    .await;
    let let_through = up.stats.inflight() == 2;
    gate.open();
    assert_eq!(first.await.unwrap().status, StatusCode::OK);
    let second = second.await.unwrap();
    assert!(
        !let_through,
        "the call after the update was let through while the first still ran \
         (2 calls at once at the upstream, maxInflight 1); it got {}",
        second.status
    );
    assert_429(&second);
    assert_eq!(
        up.stats.max_inflight(),
        1,
        "maxInflight 1 held across the update"
    );
}

/// Sends a request by hand on a raw connection, left open for the caller to drop.
async fn raw_call(gw: &Gateway, path: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let head = format!("GET {path} HTTP/1.1\r\nhost: {}\r\n\r\n", gw.addr);
    stream.write_all(head.as_bytes()).await.unwrap();
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_goes_away_frees_its_slot_and_its_upstream_request() {
    let gate = Gate::default();
    let up = Upstream::start(Behavior::Gated(gate.clone())).await;
    let gw = Gateway::start().await;
    gw.register(&function(
        "limited",
        &[up.addr],
        json!({"maxInflight": 1, "maxQueue": 0}),
    ))
    .await;
    let caller = raw_call(&gw, "/function/limited").await;
    eventually(PATIENCE, "the call at the upstream", || {
        up.stats.inflight() == 1
    })
    .await;
    drop(caller);
    eventually(PATIENCE, "the upstream request dropped", || {
        up.stats.dropped() == 1
    })
    .await;
    gate.open();
    let reply = request(gw.addr, Method::GET, "/function/limited", &[], Bytes::new()).await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "the slot was freed: {}",
        reply.text()
    );
    let m = gw.metrics().await;
    assert_eq!(
        m.get(
            "dispatch_function_inflight",
            &[("function_name", "limited")]
        ),
        Some(0.0),
        "{}",
        m.text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_caller_that_goes_away_leaves_the_queue() {
    let gate = Gate::default();
    let up = Upstream::start(Behavior::Gated(gate.clone())).await;
    let gw = Gateway::start_with(&[("DISPATCH_LIMITS_QUEUE_WAIT_MS", "20000")]).await;
    gw.register(&function(
        "limited",
        &[up.addr],
        json!({"maxInflight": 1, "maxQueue": 1}),
    ))
    .await;
    let running = spawn_call(&gw, "/function/limited");
    eventually(PATIENCE, "the first call at the upstream", || {
        up.stats.inflight() == 1
    })
    .await;
    let queued = raw_call(&gw, "/function/limited").await;
    // Let it reach the queue (an ordering aid, not an assertion), then check the queue is full.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let probe = request(gw.addr, Method::GET, "/function/limited", &[], Bytes::new()).await;
    assert_429(&probe);

    drop(queued);
    // Once the gateway has seen the caller go, its place in the queue is free again: a new
    // caller waits for the slot instead of being refused.
    let until = std::time::Instant::now() + Duration::from_secs(5);
    let waiting = loop {
        let mut next = spawn_call(&gw, "/function/limited");
        match tokio::time::timeout(Duration::from_secs(1), &mut next).await {
            Err(_) => break next,
            Ok(reply) => {
                assert_429(&reply.unwrap());
                assert!(
                    std::time::Instant::now() < until,
                    "the queue stays full after its only waiter went away"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    gate.open();
    assert_eq!(running.await.unwrap().status, StatusCode::OK);
    let reply = waiting.await.unwrap();
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
}
