//! Async runs on the `rabbitmq` backend, with the machine's real broker: accepted once the
//! broker confirmed them, run by the gateway's consumers, tried again through delay
//! queues, kept with the dead letters after the last attempt, and never lost nor recorded
//! twice when a gateway is killed mid-way, nor waited on for ever when the broker goes
//! silent. Also: function-marked retryable errors, on both backends.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

use common::pg::TestDatabase;
use common::rabbit::{StallingProxy, TestQueues};
use common::{Behavior, Gateway, Upstream, free_addr, function, run_finished};

fn dispatch_fn(name: &str, addr: SocketAddr) -> Value {
    function(name, &[addr], json!({"upstream": {"protocol": "dispatch"}}))
}

/// A gateway on the test's queues, with `extra` settings.
async fn gateway(queues: &TestQueues, extra: &[(&str, &str)]) -> Gateway {
    let mut env: Vec<(&str, String)> = queues.env();
    env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Gateway::start_with(&env).await
}

async fn submit(gw: &Gateway, function: &str, input: Value) -> String {
    let run = common::submit_run(gw, function, input).await;
    assert_eq!(run["status"], "INITIALIZED");
    run["name"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_go_through_rabbitmq_and_their_records_say_how_they_went() {
    let queues = TestQueues::new().await;
    let up = Upstream::start(Behavior::Envelope).await;
    let receiver = Upstream::start(Behavior::Echo).await;
    let gw = gateway(&queues, &[]).await;
    gw.register(&dispatch_fn("hello", up.addr)).await;

    let name = submit(&gw, "hello", json!({"name": "Jon"})).await;
    // Visible at once, before any worker is done with it.
    let seen = gw.get(&format!("/v1/runs/{name}")).await;
    assert_eq!(seen.status, 200, "{}", seen.text());
    let run = run_finished(&gw, &name, Duration::from_secs(20)).await;
    assert_eq!(run["status"], "READY", "{run}");
    assert_eq!(run["output"]["greeting"], "Hello, Jon");
    assert_eq!(run["input"], json!({"name": "Jon"}));

    // A function error is final: ERROR, with the dead letters.
    let failing = submit(&gw, "hello", json!({"fail": true})).await;
    let run = run_finished(&gw, &failing, Duration::from_secs(20)).await;
    assert_eq!(run["status"], "ERROR");
    assert_eq!(run["error"]["type"], "FunctionError");
    assert_eq!(up.stats.requests(), 2);

    // The OpenFaaS surface, with a callback.
    let reply = common::request(
        gw.addr,
        http::Method::POST,
        "/async-function/hello",
        &[("x-callback-url", &format!("{}/done", receiver.url()))],
        Bytes::from_static(b"{\"name\": \"Bran\"}"),
    )
    .await;
    assert_eq!(reply.status, 202, "{}", reply.text());
    let id = reply.header("x-call-id").expect("X-Call-Id").to_string();
    common::eventually(Duration::from_secs(20), "the callback", || {
        receiver.stats.requests() == 1
    })
    .await;
    let got = receiver.stats.last();
    assert_eq!(got["headers"]["x-call-id"], json!([id]));
    assert_eq!(got["headers"]["x-function-status"], json!(["200"]));
    let body: Value = serde_json::from_str(got["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["greeting"], "Hello, Bran");

    // Unknown functions: 404 on both surfaces, nothing published.
    let published = gw
        .metrics()
        .await
        .value("dispatch_queue_published_total", &[]);
    gw.post_json("/v1/runs?functionName=nope", &json!({"input": {}}))
        .await
        .assert_error(404, "not-found");
    common::request(
        gw.addr,
        http::Method::POST,
        "/async-function/nope",
        &[],
        Bytes::new(),
    )
    .await
    .assert_error(404, "not-found");

    let m = gw.metrics().await;
    assert_eq!(m.value("dispatch_queue_published_total", &[]), published);
    // Three runs, and the dead letter of the failing one.
    assert_eq!(published, 4.0);
    assert_eq!(m.value("dispatch_queue_confirmed_total", &[]), 4.0);
    assert_eq!(m.value("dispatch_queue_returned_total", &[]), 0.0);
    assert_eq!(m.value("dispatch_queue_connected", &[]), 1.0);
    assert_eq!(m.value("dispatch_queue_submitted_total", &[]), 3.0);
    assert_eq!(
        m.value("dispatch_queue_finished_total", &[("status", "READY")]),
        2.0
    );
    assert_eq!(m.value("dispatch_queue_run_seconds_count", &[]), 3.0);
    assert_eq!(queues.depth("runs").await, 0);
    assert_eq!(queues.depth("dead").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_wait_in_delay_queues_and_the_last_attempt_goes_to_the_dead_letters() {
    let queues = TestQueues::new().await;
    let addr = free_addr();
    let gw = gateway(
        &queues,
        &[
            ("DISPATCH_QUEUE_BACKOFF_MS", "100"),
            ("DISPATCH_QUEUE_ATTEMPTS", "3"),
        ],
    )
    .await;
    gw.register(&dispatch_fn("flaky", addr)).await;
    let name = submit(&gw, "flaky", json!({"name": "Hodor"})).await;
    let run = run_finished(&gw, &name, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "ERROR", "{run}");
    assert!(
        run["reason"]
            .to_string()
            .contains("gave up after 3 attempts"),
        "{run}"
    );
    let m = gw.metrics().await;
    assert_eq!(m.value("dispatch_queue_retries_total", &[]), 2.0);
    assert_eq!(m.value("dispatch_queue_dead_lettered_total", &[]), 1.0);
    // Two delay queues (100 and 200 ms), each used once; the message is now a dead letter.
    let names = common::rabbit::queue_names();
    let delays: Vec<&String> = names
        .iter()
        .filter(|n| n.starts_with(&format!("{}.delay.", queues.prefix)))
        .collect();
    assert_eq!(delays.len(), 2, "{names:?}");
    assert_eq!(queues.depth("dead").await, 1);

    // Listed with the dead letters, by the API and the CLI...
    let dead = gw.get("/v1/runs?dead=true").await.json();
    assert_eq!(dead.as_array().unwrap().len(), 1, "{dead}");
    assert_eq!(dead[0]["name"], name.as_str());
    // ...and, the function being back, sends it again: it ends READY.
    let _up = common::dead_run_sent_again_by_the_cli(&gw, &name, addr).await;
    assert_eq!(gw.get("/v1/runs?dead=true").await.json(), json!([]));
    // Only dead runs go again.
    gw.post_json(&format!("/v1/runs/{name}/retry"), &json!({}))
        .await
        .assert_error(409, "conflict");
}

/// An upstream that fails its first `fails` calls with an error it marks retryable (in the
/// envelope for the Dispatch protocol, with `X-Dispatch-Retryable` for raw), then succeeds.
async fn flaky_upstream(fails: usize, raw: bool) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let calls = counted.clone();
            tokio::spawn(async move {
                let service = service_fn(move |_req| {
                    let n = calls.fetch_add(1, Ordering::SeqCst);
                    let failing = n < fails;
                    let resp = match (raw, failing) {
                        (true, true) => http::Response::builder()
                            .status(500)
                            .header("x-dispatch-retryable", "true")
                            .body(Full::new(Bytes::from_static(b"busy"))),
                        (true, false) => http::Response::builder()
                            .body(Full::new(Bytes::from_static(b"\"done\""))),
                        (false, true) => http::Response::builder().body(Full::new(Bytes::from(
                            json!({"context": {"error": {"type": "FunctionError",
                                "message": "busy", "retryable": true}}, "payload": null})
                            .to_string(),
                        ))),
                        (false, false) => http::Response::builder().body(Full::new(Bytes::from(
                            json!({"context": {"error": null}, "payload": "done"}).to_string(),
                        ))),
                    };
                    async move { Ok::<_, Infallible>(resp.unwrap()) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, calls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_error_marked_retryable_is_tried_again_on_both_backends() {
    let queues = TestQueues::new().await;
    let retry_fast = [
        ("DISPATCH_QUEUE_BACKOFF_MS", "50"),
        ("DISPATCH_QUEUE_ATTEMPTS", "4"),
    ];
    let embedded = Gateway::start_with(&retry_fast).await;
    let rabbit = gateway(&queues, &retry_fast).await;
    for gw in [&embedded, &rabbit] {
        for raw in [false, true] {
            let (addr, calls) = flaky_upstream(2, raw).await;
            let spec = if raw {
                function("flaky", &[addr], json!({}))
            } else {
                dispatch_fn("flaky", addr)
            };
            gw.register(&spec).await;
            let name = submit(gw, "flaky", json!({})).await;
            let run = run_finished(gw, &name, Duration::from_secs(20)).await;
            assert_eq!(run["status"], "READY", "raw {raw}: {run}");
            assert_eq!(run["output"], "done");
            assert_eq!(calls.load(Ordering::SeqCst), 3, "raw {raw}");
            gw.delete("/v1/function/flaky").await;
        }
        // Not marked: final at once.
        let up = Upstream::start(Behavior::Fail500).await;
        gw.register(&function("fails", &[up.addr], json!({}))).await;
        let name = submit(gw, "fails", json!({})).await;
        let run = run_finished(gw, &name, Duration::from_secs(20)).await;
        assert_eq!(run["status"], "ERROR", "{run}");
        assert_eq!(up.stats.requests(), 1);
        gw.delete("/v1/function/fails").await;
        let m = gw.metrics().await;
        assert_eq!(m.value("dispatch_queue_retries_total", &[]), 4.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_mid_work_leaves_every_run_to_another_each_recorded_once() {
    let queues = TestQueues::new().await;
    let db = TestDatabase::create().await;
    let url = db.url();
    let up = Upstream::start(Behavior::Slow(Duration::from_millis(200))).await;
    let shared = [
        ("DISPATCH_STORE_URL", url.as_str()),
        ("DISPATCH_QUEUE_WORKERS", "8"),
    ];
    let mut a = gateway(&queues, &shared).await;
    a.register(&function("slow", &[up.addr], json!({"timeout": 10000})))
        .await;
    const RUNS: usize = 120;
    let mut names = Vec::new();
    for i in 0..RUNS {
        names.push(submit(&a, "slow", json!({"i": i})).await);
    }
    // Killed while its workers hold runs (8 at a time, 200 ms each: 3 s of work).
    common::eventually(Duration::from_secs(20), "a few runs done", || {
        up.stats.completed() >= 16
    })
    .await;
    a.crash();
    let b = gateway(&queues, &shared).await;
    for name in &names {
        let run = run_finished(&b, name, Duration::from_secs(60)).await;
        assert_eq!(run["status"], "READY", "{run}");
    }
    // One record per run, each READY; nothing left in the queue.
    let listed = b.get("/v1/runs?functionName=slow&limit=1000").await.json();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), RUNS);
    assert!(listed.iter().all(|r| r["status"] == "READY"));
    assert_eq!(queues.depth("runs").await, 0);
    // Every run reached the function; the ones A had in hand when it died, maybe twice.
    assert!(up.stats.requests() >= RUNS, "{}", up.stats.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_cut_by_a_shutdown_is_delivered_again_to_the_next_start() {
    let queues = TestQueues::new().await;
    let gate = common::Gate::default();
    let up = Upstream::start(Behavior::Gated(gate.clone())).await;
    let mut gw = gateway(&queues, &[("DISPATCH_SERVER_DRAIN_SECONDS", "1")]).await;
    gw.register(&function("gated", &[up.addr], json!({"timeout": 20000})))
        .await;
    let name = submit(&gw, "gated", json!({})).await;
    common::eventually(
        Duration::from_secs(10),
        "the run to reach its function",
        || up.stats.inflight() == 1,
    )
    .await;
    gw.terminate();
    let status = gw.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "{status}");
    gate.open();
    // Its connection closed, the broker gave the unacked message back.
    gw.start_again().await;
    let run = run_finished(&gw, &name, Duration::from_secs(20)).await;
    assert_eq!(run["status"], "READY", "{run}");
    assert_eq!(run["output"], "gated");
}

/// SIGTERM: the stopping gateway cancels its consumer, so runs published after it wait in
/// the queue for the next consumer although it has free slots; the runs it holds finish
/// during the drain (acked, READY), each reaching its function once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_gateway_takes_no_new_runs_and_finishes_the_ones_it_holds() {
    let queues = TestQueues::new().await;
    let gate = common::Gate::default();
    let up = Upstream::start(Behavior::Gated(gate.clone())).await;
    let mut gw = gateway(
        &queues,
        &[
            ("DISPATCH_QUEUE_WORKERS", "4"),
            ("DISPATCH_SERVER_SHUTDOWN_DELAY_SECONDS", "2"),
            ("DISPATCH_SERVER_DRAIN_SECONDS", "60"),
            ("RUST_LOG", "info"),
        ],
    )
    .await;
    gw.register(&function("gated", &[up.addr], json!({"timeout": 60000})))
        .await;
    let held = [
        submit(&gw, "gated", json!({})).await,
        submit(&gw, "gated", json!({})).await,
    ];
    common::eventually(
        Duration::from_secs(10),
        "both runs to reach their function",
        || up.stats.inflight() == 2,
    )
    .await;

    gw.terminate();
    common::eventually(Duration::from_secs(10), "the consumer's cancel", || {
        gw.log().contains("consumer cancelled")
    })
    .await;
    // Still accepting during the delay; two of its four slots are free, yet nothing new
    // is delivered to it.
    let later = [
        submit(&gw, "gated", json!({})).await,
        submit(&gw, "gated", json!({})).await,
    ];
    common::eventually(
        Duration::from_secs(30),
        "the drain, waiting for the runs held",
        || {
            gw.log()
                .contains("waiting for the async runs still running")
        },
    )
    .await;
    assert_eq!(queues.depth("runs").await, 2, "{}", gw.log());
    assert_eq!(up.stats.requests(), 2);

    // The held runs end during the drain, and the gateway exits cleanly after them.
    gate.open();
    let status = gw.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "{status}");
    assert_eq!(up.stats.requests(), 2, "only the held runs ran");
    assert!(!gw.log().contains("handed back"), "{}", gw.log());

    gw.start_again().await;
    for name in held.iter().chain(&later) {
        let run = run_finished(&gw, name, Duration::from_secs(20)).await;
        assert_eq!(run["status"], "READY", "{run}");
    }
    assert_eq!(up.stats.requests(), 4, "a run reached its function twice");
}

/// `queue.workers = 0`: a replica that accepts runs (each confirmed by the broker) and
/// runs none, as OpenFaaS' gateway beside its queue-workers; another replica on the same
/// broker and store runs them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_no_workers_accepts_runs_that_another_runs() {
    let queues = TestQueues::new().await;
    let db = TestDatabase::create().await;
    let url = db.url();
    let up = Upstream::start(Behavior::Envelope).await;
    let store = ("DISPATCH_STORE_URL", url.as_str());
    let submitter = gateway(&queues, &[store, ("DISPATCH_QUEUE_WORKERS", "0")]).await;
    submitter.register(&dispatch_fn("hello", up.addr)).await;
    const RUNS: usize = 20;
    let mut names = Vec::new();
    for i in 0..RUNS {
        names.push(submit(&submitter, "hello", json!({"name": format!("n{i}")})).await);
    }
    // Accepted and waiting: no consumer takes them.
    let mut depth = 0;
    for _ in 0..50 {
        depth = queues.depth("runs").await;
        if depth == RUNS as u32 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(depth, RUNS as u32);
    assert_eq!(up.stats.requests(), 0);
    let run = submitter
        .get(&format!("/v1/runs/{}", names[0]))
        .await
        .json();
    assert_eq!(run["status"], "INITIALIZED", "{run}");
    let m = submitter.metrics().await;
    assert_eq!(m.value("dispatch_queue_submitted_total", &[]), RUNS as f64);
    assert_eq!(m.value("dispatch_queue_confirmed_total", &[]), RUNS as f64);

    let worker = gateway(&queues, &[store, ("DISPATCH_QUEUE_WORKERS", "4")]).await;
    for (i, name) in names.iter().enumerate() {
        let run = run_finished(&submitter, name, Duration::from_secs(30)).await;
        assert_eq!(run["status"], "READY", "{run}");
        assert_eq!(run["output"]["greeting"], format!("Hello, n{i}"));
    }
    assert_eq!(up.stats.requests(), RUNS);
    assert_eq!(queues.depth("runs").await, 0);
    let m = worker.metrics().await;
    assert_eq!(
        m.value("dispatch_queue_finished_total", &[("status", "READY")]),
        RUNS as f64
    );
}

/// Submits a run, bounded against a hang (the bound is not a timing assertion: the
/// gateway's own is a second); gives the reply.
async fn try_submit(gw: &Gateway, function: &str) -> common::Reply {
    let path = format!("/v1/runs?functionName={function}");
    tokio::time::timeout(
        Duration::from_secs(60),
        gw.post_json(&path, &json!({"input": {"name": "x"}})),
    )
    .await
    .expect("a submit still unanswered after 60 s: the gateway waits on a silent broker")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_gone_silent_gets_503s_not_hangs_and_the_gateway_connects_again() {
    let queues = TestQueues::new().await;
    let proxy = StallingProxy::start().await;
    let up = Upstream::start(Behavior::Envelope).await;
    // A short heartbeat (queue.heartbeat_seconds, the URL having none), so that the broker
    // soon gives up the silent connection and hands the runs it had delivered there to the
    // new one: with the broker's own 60 s, a run accepted after the reconnect can wait that
    // long with the silent connection's consumer.
    let url = proxy.url();
    let gw = gateway(
        &queues,
        &[
            ("DISPATCH_QUEUE_URL", url.as_str()),
            ("DISPATCH_QUEUE_CONFIRM_TIMEOUT_MS", "1000"),
            ("DISPATCH_QUEUE_HEARTBEAT_SECONDS", "2"),
        ],
    )
    .await;
    gw.register(&dispatch_fn("hello", up.addr)).await;
    let mut accepted = Vec::new();
    for _ in 0..10 {
        accepted.push(submit(&gw, "hello", json!({"name": "before"})).await);
    }
    for name in &accepted {
        let run = run_finished(&gw, name, Duration::from_secs(30)).await;
        assert_eq!(run["status"], "READY", "{run}");
    }

    // Silent: no confirm comes and nothing is closed. The submit waiting on it is a 503,
    // and so is every one after, until the broker answers again.
    proxy.stall();
    for _ in 0..5 {
        let reply = try_submit(&gw, "hello").await;
        assert_eq!(reply.status, 503, "{}", reply.text());
        assert!(reply.header("retry-after").is_some(), "{}", reply.text());
        reply.assert_error(503, "queue-unavailable");
    }
    let m = gw.metrics().await;
    assert_eq!(m.value("dispatch_queue_connected", &[]), 0.0);
    // The log says why the connection was given up; connection attempts into the
    // silence give up too, and are tried again.
    common::until_seen(
        "the log naming the missing confirm, then a connection attempt given up",
        || async { gw.log() },
        |log| log.contains("no confirm for 1000 ms") && log.contains("no answer within 1000 ms"),
    )
    .await;

    proxy.resume();
    let first = common::until_seen(
        "a submit accepted after the broker answers again",
        || try_submit(&gw, "hello"),
        |reply| reply.status == 202,
    )
    .await;
    accepted.push(first.json()["name"].as_str().unwrap().to_string());
    for _ in 0..10 {
        accepted.push(submit(&gw, "hello", json!({"name": "after"})).await);
    }
    for name in &accepted {
        let run = run_finished(&gw, name, Duration::from_secs(30)).await;
        assert_eq!(run["status"], "READY", "{run}");
    }
    let m = gw.metrics().await;
    assert!(m.value("dispatch_queue_reconnects_total", &[]) >= 1.0);
    assert_eq!(m.value("dispatch_queue_connected", &[]), 1.0);
    // (A refused submit whose message got through before the silence may run too.)
    assert!(up.stats.requests() >= accepted.len());
}
