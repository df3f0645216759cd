//! Async runs on the embedded queue (the store): accepted only once durable, run by the
//! gateway's workers through the same invoker, tried again on failures worth it, and never
//! lost across a gateway killed mid-way.

mod common;

use std::time::Duration;

use serde_json::{Value, json};

use common::{
    Behavior, Gateway, Upstream, free_addr, function, run_finished, submit_run as submit,
};

fn dispatch_fn(name: &str, addr: std::net::SocketAddr) -> Value {
    function(name, &[addr], json!({"upstream": {"protocol": "dispatch"}}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_run_is_accepted_then_runs_and_its_record_says_how_it_went() {
    let up = Upstream::start(Behavior::Envelope).await;
    let gw = Gateway::start().await;
    gw.register(&dispatch_fn("hello", up.addr)).await;
    let accepted = submit(&gw, "hello", json!({"name": "Jon"})).await;
    assert_eq!(accepted["status"], "INITIALIZED");
    assert_eq!(accepted["blocking"], false);
    let name = accepted["name"].as_str().unwrap().to_string();
    let run = run_finished(&gw, &name, Duration::from_secs(10)).await;
    assert_eq!(run["status"], "READY", "{run}");
    assert_eq!(run["output"]["greeting"], "Hello, Jon");
    assert_eq!(run["input"], json!({"name": "Jon"}));
    assert_eq!(run["logs"]["stdout"], json!(["called"]));
    // A function error is final: one attempt, ERROR with the function's error.
    let failing = submit(&gw, "hello", json!({"fail": true})).await;
    let run = run_finished(
        &gw,
        failing["name"].as_str().unwrap(),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(run["status"], "ERROR");
    assert_eq!(run["error"]["type"], "FunctionError");
    assert_eq!(up.stats.requests(), 2);
    // Listed like any run.
    let listed = gw.get("/v1/runs?functionName=hello").await.json();
    assert_eq!(listed.as_array().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openfaas_async_surface_answers_202_with_the_call_id() {
    let up = Upstream::start(Behavior::Echo).await;
    let gw = Gateway::start().await;
    gw.register(&function("echo", &[up.addr], json!({}))).await;
    let reply = common::request(
        gw.addr,
        http::Method::POST,
        "/async-function/echo",
        &[],
        bytes::Bytes::from_static(b"{\"a\": 1}"),
    )
    .await;
    assert_eq!(reply.status, 202, "{}", reply.text());
    let id = reply.header("x-call-id").expect("X-Call-Id").to_string();
    let run = run_finished(&gw, &id, Duration::from_secs(10)).await;
    assert_eq!(run["status"], "READY", "{run}");
    assert_eq!(run["input"], json!({"a": 1}));
    // Unknown functions are 404, never a 202 for a run that cannot run.
    let reply = common::request(
        gw.addr,
        http::Method::POST,
        "/async-function/nope",
        &[],
        bytes::Bytes::new(),
    )
    .await;
    reply.assert_error(404, "not-found");
    let reply = gw
        .post_json("/v1/runs?functionName=nope", &json!({"input": {}}))
        .await;
    reply.assert_error(404, "not-found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_function_is_tried_again_until_it_answers_or_the_attempts_run_out() {
    let addr = free_addr();
    let gw = Gateway::start_with(&[
        ("DISPATCH_QUEUE_BACKOFF_MS", "100"),
        ("DISPATCH_QUEUE_ATTEMPTS", "8"),
    ])
    .await;
    gw.register(&dispatch_fn("later", addr)).await;
    let accepted = submit(&gw, "later", json!({"name": "Arya"})).await;
    let name = accepted["name"].as_str().unwrap().to_string();
    // Nothing listens yet: the run waits for its next attempt, saying why.
    let until = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let run = gw.get(&format!("/v1/runs/{name}")).await.json();
        if run["reason"].to_string().contains("attempt 1 of 8 failed") {
            break;
        }
        assert!(std::time::Instant::now() < until, "no retry noted: {run}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let up = Upstream::start_on(addr, Behavior::Envelope, false).await;
    let run = run_finished(&gw, &name, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "READY", "{run}");
    assert_eq!(run["output"]["greeting"], "Hello, Arya");
    assert_eq!(up.stats.requests(), 1);

    // With no upstream at all, it gives up after the configured attempts.
    let never = free_addr();
    gw.register(&dispatch_fn("never", never)).await;
    let accepted = submit(&gw, "never", json!({})).await;
    let run = run_finished(
        &gw,
        accepted["name"].as_str().unwrap(),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(run["status"], "ERROR");
    assert!(
        run["reason"]
            .to_string()
            .contains("gave up after 8 attempts"),
        "{run}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_accepted_by_a_gateway_killed_mid_way_are_all_finished_after_it_starts_again() {
    let addr = free_addr();
    let mut gw = Gateway::start_with(&[
        ("DISPATCH_QUEUE_BACKOFF_MS", "200"),
        ("DISPATCH_QUEUE_ATTEMPTS", "50"),
        ("DISPATCH_QUEUE_HOLD_SECONDS", "1"),
    ])
    .await;
    gw.register(&dispatch_fn("slow-start", addr)).await;
    let mut names = Vec::new();
    for i in 0..30 {
        let accepted = submit(&gw, "slow-start", json!({"name": format!("n{i}")})).await;
        names.push(accepted["name"].as_str().unwrap().to_string());
    }
    // Killed with runs queued, some held by its workers.
    gw.crash();
    let up = Upstream::start_on(addr, Behavior::Envelope, false).await;
    gw.start_again().await;
    for (i, name) in names.iter().enumerate() {
        let run = run_finished(&gw, name, Duration::from_secs(60)).await;
        assert_eq!(run["status"], "READY", "{run}");
        assert_eq!(run["output"]["greeting"], format!("Hello, n{i}"));
    }
    // Each ran once: the upstream appeared after the crash, and nothing ran twice since.
    assert_eq!(up.stats.requests(), names.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_answer_goes_to_the_callback_url_and_a_failing_callback_is_noted_on_the_run() {
    let up = Upstream::start(Behavior::Envelope).await;
    let receiver = Upstream::start(Behavior::Echo).await;
    let gw = Gateway::start_with(&[("DISPATCH_QUEUE_CALLBACK_ATTEMPTS", "2")]).await;
    gw.register(&dispatch_fn("hello", up.addr)).await;
    let reply = common::request(
        gw.addr,
        http::Method::POST,
        "/async-function/hello",
        &[("x-callback-url", &format!("{}/done?x=1", receiver.url()))],
        bytes::Bytes::from_static(b"{\"name\": \"Bran\"}"),
    )
    .await;
    assert_eq!(reply.status, 202, "{}", reply.text());
    let id = reply.header("x-call-id").unwrap().to_string();
    common::eventually(Duration::from_secs(10), "the callback", || {
        receiver.stats.requests() == 1
    })
    .await;
    let got = receiver.stats.last();
    assert_eq!(got["method"], "POST");
    assert_eq!(got["path"], "/done");
    assert_eq!(got["headers"]["x-call-id"], json!([id]));
    assert_eq!(got["headers"]["x-function-name"], json!(["hello"]));
    assert_eq!(got["headers"]["x-function-status"], json!(["200"]));
    assert!(
        got["headers"]["x-duration-seconds"][0]
            .as_str()
            .unwrap()
            .parse::<f64>()
            .is_ok()
    );
    let body: Value = serde_json::from_str(got["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["greeting"], "Hello, Bran");

    // A callback URL nobody answers: the run still ends READY, and says the callback failed.
    let nobody = free_addr();
    let reply = common::request(
        gw.addr,
        http::Method::POST,
        "/async-function/hello",
        &[("x-callback-url", &format!("http://{nobody}/cb"))],
        bytes::Bytes::from_static(b"{}"),
    )
    .await;
    let id = reply.header("x-call-id").unwrap().to_string();
    let until = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let run = gw.get(&format!("/v1/runs/{id}")).await.json();
        if run["reason"]
            .to_string()
            .contains("failed after 2 attempts")
        {
            assert_eq!(run["status"], "READY");
            break;
        }
        assert!(
            std::time::Instant::now() < until,
            "callback failure not noted: {run}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A URL that is not one: 400 at once, nothing queued.
    let reply = common::request(
        gw.addr,
        http::Method::POST,
        "/async-function/hello",
        &[("x-callback-url", "ftp://x")],
        bytes::Bytes::new(),
    )
    .await;
    assert!(
        reply
            .assert_error(400, "bad-request")
            .contains("X-Callback-Url")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_that_end_in_error_wait_with_the_dead_letters_and_can_be_sent_again() {
    let addr = free_addr();
    let gw = Gateway::start_with(&[
        ("DISPATCH_QUEUE_BACKOFF_MS", "50"),
        ("DISPATCH_QUEUE_ATTEMPTS", "2"),
    ])
    .await;
    gw.register(&dispatch_fn("flaky", addr)).await;
    let accepted = submit(&gw, "flaky", json!({"name": "Hodor"})).await;
    let name = accepted["name"].as_str().unwrap().to_string();
    let run = run_finished(&gw, &name, Duration::from_secs(20)).await;
    assert_eq!(run["status"], "ERROR", "{run}");
    let dead = gw.get("/v1/runs?dead=true").await.json();
    assert_eq!(dead.as_array().unwrap().len(), 1, "{dead}");
    assert_eq!(dead[0]["name"], name.as_str());
    assert_eq!(
        gw.get("/v1/runs?dead=true&functionName=other").await.json(),
        json!([])
    );

    let m = gw.metrics().await;
    assert_eq!(m.value("dispatch_queue_submitted_total", &[]), 1.0);
    assert_eq!(m.value("dispatch_queue_retries_total", &[]), 1.0);
    assert_eq!(m.value("dispatch_queue_dead_lettered_total", &[]), 1.0);
    assert_eq!(
        m.value("dispatch_queue_finished_total", &[("status", "ERROR")]),
        1.0
    );
    // The CLI lists it...
    // ...and, the function being back, sends it again: it ends READY.
    let _up = common::dead_run_sent_again_by_the_cli(&gw, &name, addr).await;
    assert_eq!(gw.get("/v1/runs?dead=true").await.json(), json!([]));
    let m = gw.metrics().await;
    assert_eq!(
        m.value("dispatch_queue_finished_total", &[("status", "READY")]),
        1.0
    );
    assert_eq!(m.value("dispatch_queue_run_seconds_count", &[]), 2.0);
    assert_eq!(m.value("dispatch_queue_in_flight", &[]), 0.0);

    // Only dead runs go again.
    let reply = gw
        .post_json(&format!("/v1/runs/{name}/retry"), &json!({}))
        .await;
    assert!(reply.assert_error(409, "conflict").contains("dead letters"));
    let reply = gw
        .post_json(
            "/v1/runs/00000000-0000-0000-0000-000000000000/retry",
            &json!({}),
        )
        .await;
    reply.assert_error(404, "not-found");
    gw.get("/v1/runs?dead=maybe")
        .await
        .assert_error(400, "bad-request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_submits_are_all_accepted_and_a_reused_call_id_is_409() {
    let up = Upstream::start(Behavior::Envelope).await;
    let gw = Gateway::start().await;
    gw.register(&dispatch_fn("hello", up.addr)).await;
    // Submitted at once: they share commits, and each gets its own answer.
    let submits: Vec<_> = (0..64)
        .map(|i| {
            let addr = gw.addr;
            tokio::spawn(async move {
                let body = json!({"input": {"name": format!("n{i}")}}).to_string();
                common::request(
                    addr,
                    http::Method::POST,
                    "/v1/runs?functionName=hello",
                    &[("content-type", "application/json")],
                    body.into(),
                )
                .await
            })
        })
        .collect();
    let mut names = Vec::new();
    for submit in submits {
        let reply = submit.await.unwrap();
        assert_eq!(reply.status, 202, "{}", reply.text());
        names.push(reply.json()["name"].as_str().unwrap().to_string());
    }
    for name in &names {
        assert_eq!(
            run_finished(&gw, name, Duration::from_secs(20)).await["status"],
            "READY"
        );
    }
    assert_eq!(up.stats.requests(), 64);

    // A caller's X-Call-Id names the run; used again, it is refused rather than run twice.
    let id = "0199aa00-0000-7000-8000-000000000001";
    let headers = [("x-call-id", id)];
    let send = || {
        common::request(
            gw.addr,
            http::Method::POST,
            "/async-function/hello",
            &headers,
            bytes::Bytes::from_static(b"{}"),
        )
    };
    let first = send().await;
    assert_eq!(first.status, 202, "{}", first.text());
    assert_eq!(first.header("x-call-id"), Some(id));
    send().await.assert_error(409, "conflict");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_cut_by_a_shutdown_goes_back_to_the_queue_at_once() {
    let gate = common::Gate::default();
    let up = Upstream::start(Behavior::Gated(gate.clone())).await;
    // The hold is long (the default, 300 s): only giving the run back makes it run again soon.
    let mut gw = Gateway::start_with(&[("DISPATCH_SERVER_DRAIN_SECONDS", "1")]).await;
    gw.register(&function("gated", &[up.addr], json!({"timeout": 20000})))
        .await;
    let accepted = submit(&gw, "gated", json!({})).await;
    let name = accepted["name"].as_str().unwrap().to_string();
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
    gw.start_again().await;
    let run = run_finished(&gw, &name, Duration::from_secs(20)).await;
    assert_eq!(run["status"], "READY", "{run}");
    assert_eq!(run["output"], "gated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_longer_than_its_hold_is_not_taken_twice() {
    let up = Upstream::start(Behavior::Slow(Duration::from_millis(2500))).await;
    // Held for 1 s at a time, looked for every 100 ms: without renewals its own worker loop
    // would take it again while it runs.
    let gw = Gateway::start_with(&[
        ("DISPATCH_QUEUE_HOLD_SECONDS", "1"),
        ("DISPATCH_QUEUE_POLL_MS", "100"),
    ])
    .await;
    gw.register(&function("slow", &[up.addr], json!({"timeout": 10000})))
        .await;
    let accepted = submit(&gw, "slow", json!({})).await;
    let run = run_finished(
        &gw,
        accepted["name"].as_str().unwrap(),
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(run["status"], "READY", "{run}");
    assert_eq!(
        up.stats.requests(),
        1,
        "the run went to its function more than once"
    );
}
