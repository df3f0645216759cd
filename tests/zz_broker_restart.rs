//! RabbitMQ restarted (`rabbitmqctl stop_app`, then `start_app`) while thousands of async
//! runs are submitted and processed: every run answered 202 ends READY, once; the
//! submissions made while the broker is away get 503 with `Retry-After`; and the gateway
//! reconnects by itself. A submit whose confirm was lost with the connection is a 503 too,
//! though its message may have reached the broker: such a run may still run (at least
//! once), and is then recorded once like any other.
//!
//! The broker is shared by every test on the machine, so this test is `#[ignore]`d in the
//! suite and run alone after it: `cargo test --locked --test zz_broker_restart --
//! --ignored` (README, `.ci/run`). Whatever happens, it leaves the broker running.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use serde_json::{Value, json};
use tokio::sync::Mutex;

use common::rabbit::TestQueues;
use common::{Behavior, Connection, Gateway, Upstream, function};

/// Runs `rabbitmqctl <command>` (bounded by its own `--timeout`), asserting it worked.
fn rabbitmqctl(command: &str) {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["--timeout", "120", command])
        .output()
        .unwrap_or_else(|e| panic!("running rabbitmqctl {command}: {e}"));
    assert!(
        out.status.success(),
        "rabbitmqctl {command}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts the broker's app again if the test ends (panics) while it is stopped.
struct StartAppOnDrop;

impl Drop for StartAppOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["--timeout", "120", "start_app"])
            .output();
    }
}

/// What the submitting clients saw.
#[derive(Default)]
struct Seen {
    accepted: Mutex<Vec<String>>,
    refused: AtomicUsize,
    refused_names: Mutex<Vec<String>>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "restarts the shared RabbitMQ: run alone, after the suite (README, .ci/run)"]
async fn broker_restart_loses_no_accepted_run_and_the_gateway_reconnects() {
    let queues = TestQueues::new().await;
    let up = Upstream::start(Behavior::Echo).await;
    let env: Vec<(&str, String)> = queues.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let gw = Gateway::start_with(&env).await;
    gw.register(&function("fast", &[up.addr], json!({}))).await;

    const TARGET: usize = 3000;
    const CLIENTS: usize = 16;
    let seen = Arc::new(Seen::default());
    let restarted = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    // Bounds against a hang, not timing assertions: a gateway that never takes runs again,
    // or a submit never answered, fails the test saying so instead of holding CI up.
    let until = std::time::Instant::now() + Duration::from_secs(300);
    for _ in 0..CLIENTS {
        let (seen, restarted, addr) = (seen.clone(), restarted.clone(), gw.addr);
        clients.push(tokio::spawn(async move {
            let mut conn = Connection::open(addr).await;
            // Until enough were accepted and the restart is over (so some are accepted
            // after it, by the reconnected gateway).
            while !(restarted.load(Ordering::SeqCst) && seen.accepted.lock().await.len() >= TARGET)
            {
                assert!(
                    std::time::Instant::now() < until,
                    "after 300 s, {} accepted (of {TARGET}), {} refused, restart over: {}",
                    seen.accepted.lock().await.len(),
                    seen.refused.load(Ordering::SeqCst),
                    restarted.load(Ordering::SeqCst)
                );
                // Our own run names, to know those of refused submits too.
                let id = uuid::Uuid::new_v4().to_string();
                let headers = [("x-call-id", id.as_str())];
                let submit = conn.request_with(
                    Method::POST,
                    "/async-function/fast",
                    &headers,
                    Bytes::from_static(b"{}"),
                );
                let reply = tokio::time::timeout(Duration::from_secs(60), submit)
                    .await
                    .expect("a submit unanswered after 60 s");
                match reply.status.as_u16() {
                    202 => {
                        assert_eq!(reply.header("x-call-id"), Some(id.as_str()));
                        seen.accepted.lock().await.push(id);
                    }
                    503 => {
                        assert!(
                            reply.header("retry-after").is_some(),
                            "a 503 without Retry-After: {}",
                            reply.text()
                        );
                        reply.assert_error(503, "queue-unavailable");
                        seen.refused.fetch_add(1, Ordering::SeqCst);
                        seen.refused_names.lock().await.push(id);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    other => panic!("unexpected {other}: {}", reply.text()),
                }
            }
        }));
    }

    // The broker goes away once runs flow, and comes back a few seconds later.
    common::eventually(
        Duration::from_secs(60),
        "runs accepted before the restart",
        || {
            seen.accepted
                .try_lock()
                .is_ok_and(|a| a.len() >= TARGET / 4)
        },
    )
    .await;
    let guard = StartAppOnDrop;
    tokio::task::spawn_blocking(|| rabbitmqctl("stop_app"))
        .await
        .unwrap();
    let refused_before = seen.refused.load(Ordering::SeqCst);
    common::eventually(
        Duration::from_secs(30),
        "submits refused while away",
        || seen.refused.load(Ordering::SeqCst) > refused_before + 10,
    )
    .await;
    tokio::task::spawn_blocking(|| rabbitmqctl("start_app"))
        .await
        .unwrap();
    std::mem::forget(guard);
    restarted.store(true, Ordering::SeqCst);
    for client in clients {
        if let Err(e) = client.await {
            panic!("a client failed: {e}\n--- gateway log ---\n{}", gw.log());
        }
    }
    let accepted = seen.accepted.lock().await.clone();
    assert!(accepted.len() >= TARGET);

    // Every accepted run ends READY.
    let until = std::time::Instant::now() + Duration::from_secs(180);
    for name in &accepted {
        loop {
            let run = gw.get(&format!("/v1/runs/{name}")).await.json();
            if run["status"] == "READY" {
                break;
            }
            assert_ne!(run["status"], "ERROR", "{run}");
            assert!(std::time::Instant::now() < until, "not finished: {run}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Once each: the READY records are exactly the accepted runs.
    let mut ready = Vec::new();
    let mut cursor = String::new();
    loop {
        let reply = gw
            .get(&format!(
                "/v1/runs?functionName=fast&status=READY&limit=1000{cursor}"
            ))
            .await;
        let page: Value = reply.json();
        ready.extend(
            page.as_array()
                .unwrap()
                .iter()
                .map(|r| r["name"].as_str().unwrap().to_string()),
        );
        match reply.header("x-next-cursor") {
            Some(next) => cursor = format!("&cursor={next}"),
            None => break,
        }
    }
    // Once each: every accepted run is READY once; any other READY run is one whose submit
    // was refused after its message reached the broker (its confirm lost).
    let refused: HashSet<String> = seen.refused_names.lock().await.iter().cloned().collect();
    let listed = ready.len();
    let ready: HashSet<String> = ready.into_iter().collect();
    assert_eq!(ready.len(), listed, "a run recorded twice");
    let accepted_set: HashSet<String> = accepted.iter().cloned().collect();
    assert!(accepted_set.is_subset(&ready));
    let ran_anyway: Vec<&String> = ready.difference(&accepted_set).collect();
    assert!(
        ran_anyway.iter().all(|name| refused.contains(*name)),
        "READY runs nobody submitted: {ran_anyway:?}"
    );
    assert!(up.stats.requests() >= accepted.len());

    let m = gw.metrics().await;
    assert!(m.value("dispatch_queue_reconnects_total", &[]) >= 1.0);
    assert_eq!(m.value("dispatch_queue_connected", &[]), 1.0);
    eprintln!(
        "accepted {}, refused {} while the broker was away ({} of them ran all the same), upstream calls {}, redelivered duplicates {}",
        accepted.len(),
        seen.refused.load(Ordering::SeqCst),
        ran_anyway.len(),
        up.stats.requests(),
        m.value("dispatch_queue_duplicates_total", &[])
    );
}
