//! Run records: every Dispatch run is recorded, listed newest first a page at a time,
//! found by name, kept after its function is gone and after a restart, and flushed on
//! SIGTERM.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

async fn gateway_with_envelope_function(env: &[(&str, &str)]) -> (Gateway, Upstream) {
    let up = Upstream::start(Behavior::Envelope).await;
    let gw = Gateway::start_with(env).await;
    let dispatch = json!({"upstream": {"protocol": "dispatch"}});
    gw.register(&function("hello", &[up.addr], dispatch)).await;
    (gw, up)
}

fn names(runs: &Value) -> Vec<String> {
    runs.as_array()
        .expect("a list of runs")
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dispatch_run_is_recorded_and_found_by_name() {
    let (gw, _up) = gateway_with_envelope_function(&[]).await;
    let ran = gw.run("hello", json!({"name": "Jon"})).await.json();
    let failed = gw.run("hello", json!({"fail": true})).await.json();
    assert_eq!(failed["status"], "ERROR");

    let listed = gw.get("/v1/runs").await;
    assert_eq!(listed.status, 200, "{}", listed.text());
    let runs = listed.json();
    // Newest first.
    assert_eq!(
        names(&runs),
        [
            failed["name"].as_str().unwrap(),
            ran["name"].as_str().unwrap()
        ]
    );
    let first = &runs[1];
    assert_eq!(first["functionName"], "hello");
    assert_eq!(first["status"], "READY");
    assert_eq!(first["input"], json!({"name": "Jon"}));
    assert_eq!(first["output"], ran["output"]);
    assert_eq!(first["logs"], ran["logs"]);
    assert_eq!(first["call"]["httpStatus"], 200);
    assert!(
        first["call"]["endpoint"]
            .as_str()
            .unwrap()
            .starts_with("http://127.0.0.1:")
    );
    assert_eq!(runs[0]["error"]["type"], "FunctionError");

    let name = ran["name"].as_str().unwrap();
    let one = gw.get(&format!("/v1/runs/{name}")).await;
    assert_eq!(one.status, 200, "{}", one.text());
    assert_eq!(one.json()["output"], ran["output"]);
    let matched = gw.get(&format!("/v1/runs/{name}?functionName=hello")).await;
    assert_eq!(matched.status, 200);
    gw.get(&format!("/v1/runs/{name}?functionName=other"))
        .await
        .assert_error(404, "not-found");
    gw.get("/v1/runs/no-such-run")
        .await
        .assert_error(404, "not-found");

    let m = gw.metrics().await;
    assert_eq!(
        m.value("dispatch_run_records_written_total", &[]),
        2.0,
        "{}",
        m.text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_give_every_run_once_while_new_runs_arrive() {
    let (gw, _up) = gateway_with_envelope_function(&[]).await;
    let mut made = Vec::new();
    for i in 0..25 {
        made.push(
            gw.run("hello", json!({"i": i})).await.json()["name"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let mut seen = Vec::new();
    let mut path = "/v1/runs?functionName=hello&limit=10".to_string();
    let mut pages = 0;
    loop {
        let page = gw.get(&path).await;
        assert_eq!(page.status, 200, "{}", page.text());
        seen.extend(names(&page.json()));
        pages += 1;
        // A run made between pages is newer than every listed one: later pages skip it.
        gw.run("hello", json!({"late": pages})).await;
        match page.header("x-next-cursor") {
            Some(cursor) => path = format!("/v1/runs?functionName=hello&limit=10&cursor={cursor}"),
            None => break,
        }
        assert!(pages < 10, "paging does not end");
    }
    made.reverse();
    assert_eq!(seen, made, "each run once, newest first");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_are_filtered_by_function_status_tags_and_time() {
    let (gw, up) = gateway_with_envelope_function(&[]).await;
    let dispatch = json!({"upstream": {"protocol": "dispatch"}});
    gw.register(&function("other", &[up.addr], dispatch)).await;
    gw.run("hello", json!({})).await;
    gw.run("hello", json!({"fail": true})).await;
    gw.run("other", json!({})).await;
    let tagged = gw
        .post_json(
            "/v1/runs?functionName=other",
            &json!({"blocking": true, "input": {}, "tags": [{"key": "team", "value": "50%_off"}]}),
        )
        .await
        .json();

    let count = |path: String| {
        let gw = &gw;
        async move {
            let reply = gw.get(&path).await;
            assert_eq!(reply.status, 200, "{path}: {}", reply.text());
            reply.json().as_array().unwrap().len()
        }
    };
    assert_eq!(count("/v1/runs?functionName=hello".into()).await, 2);
    assert_eq!(count("/v1/runs?status=ERROR".into()).await, 1);
    assert_eq!(
        count("/v1/runs?functionName=other&status=READY".into()).await,
        2
    );
    let one = gw.get("/v1/runs?tags=team%3D50%25_off").await.json();
    assert_eq!(names(&one), [tagged["name"].as_str().unwrap()]);
    assert_eq!(count("/v1/runs?tags=team".into()).await, 1);
    assert_eq!(count("/v1/runs?tags=team%3D50%25%25off".into()).await, 0);
    assert_eq!(count("/v1/runs?since=0".into()).await, 4);
    assert_eq!(count("/v1/runs?since=4102444800".into()).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_listing_parameters_are_400_naming_them() {
    let gw = Gateway::start().await;
    for (query, named) in [
        ("since=yesterday", "since"),
        ("since=-5", "since"),
        ("limit=0", "limit"),
        ("limit=5000", "limit"),
        ("limit=ten", "limit"),
        ("status=DONE", "status"),
        ("cursor=xyz", "cursor"),
        ("tags=%3Dv", "tags"),
    ] {
        let message = gw
            .get(&format!("/v1/runs?{query}"))
            .await
            .assert_error(400, "bad-request");
        assert!(message.starts_with(named), "{query}: {message}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_outlives_its_function_and_a_restart() {
    let (mut gw, _up) = gateway_with_envelope_function(&[]).await;
    let name = gw.run("hello", json!({"name": "Arya"})).await.json()["name"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(gw.delete("/v1/function/hello").await.status, 200);
    assert_eq!(gw.get(&format!("/v1/runs/{name}")).await.status, 200);
    gw.restart().await;
    let after = gw.get(&format!("/v1/runs/{name}")).await;
    assert_eq!(after.status, 200, "{}", after.text());
    assert_eq!(after.json()["input"], json!({"name": "Arya"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_inputs_and_outputs_are_cut_and_flagged_in_the_record_only() {
    let (gw, _up) = gateway_with_envelope_function(&[("DISPATCH_RECORDS_BODY_BYTES", "100")]).await;
    let long = "x".repeat(500);
    let ran = gw.run("hello", json!({"name": long})).await.json();
    // The caller gets the whole run.
    assert_eq!(ran["input"]["name"].as_str().unwrap().len(), 500);
    let stored = gw
        .get(&format!("/v1/runs/{}", ran["name"].as_str().unwrap()))
        .await
        .json();
    let kept = stored["input"]
        .as_str()
        .expect("a cut input is kept as text");
    assert!(
        kept.len() <= 100 && kept.starts_with("{\"name\":\"xxx"),
        "{kept}"
    );
    assert_eq!(stored["call"]["inputTruncated"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_writes_every_queued_record_before_exit() {
    // Runs answer without waiting for their records, and the writer waits a minute for
    // a full batch: at SIGTERM every record is still queued, and only the flush writes it.
    let (mut gw, _up) = gateway_with_envelope_function(&[
        ("DISPATCH_RECORDS_BATCH", "1000"),
        ("DISPATCH_RECORDS_LINGER_MS", "60000"),
        ("DISPATCH_RECORDS_WAIT_MS", "0"),
    ])
    .await;
    let mut calls = Vec::new();
    for i in 0..200 {
        let addr = gw.addr;
        calls.push(tokio::spawn(async move {
            let body = serde_json::to_vec(&json!({"blocking": true, "input": {"i": i}})).unwrap();
            request(
                addr,
                hyper::Method::POST,
                "/v1/runs?functionName=hello",
                &[],
                body.into(),
            )
            .await
        }));
    }
    let mut answered = HashSet::new();
    for (i, call) in calls.into_iter().enumerate() {
        let reply = call.await.unwrap();
        assert_eq!(reply.status, 200, "run {i}: {}", reply.text());
        answered.insert(reply.json()["name"].as_str().unwrap().to_string());
    }
    let m = gw.metrics().await;
    assert_eq!(
        m.value("dispatch_run_records_written_total", &[]),
        0.0,
        "still queued"
    );
    gw.terminate();
    let status = gw.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "exit: {status:?}\n{}", gw.log());
    gw.start_again().await;
    let listed = gw.get("/v1/runs?limit=1000").await.json();
    let stored: HashSet<String> = names(&listed).into_iter().collect();
    assert_eq!(stored.len(), answered.len());
    assert_eq!(stored, answered, "every answered run is recorded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgresql_runs_and_functions_survive_a_restart() {
    let db = common::pg::TestDatabase::create().await;
    let url = db.url();
    let (mut gw, _up) = gateway_with_envelope_function(&[("DISPATCH_STORE_URL", &url)]).await;
    let ran = gw.run("hello", json!({"name": "Sansa"})).await.json();
    assert_eq!(ran["status"], "READY", "{ran}");
    let listed = gw.get("/v1/runs").await.json();
    assert_eq!(names(&listed), [ran["name"].as_str().unwrap()]);
    gw.restart().await;
    let after = gw
        .get(&format!("/v1/runs/{}", ran["name"].as_str().unwrap()))
        .await;
    assert_eq!(after.status, 200, "{}", after.text());
    assert_eq!(after.json()["input"], json!({"name": "Sansa"}));
    assert_eq!(gw.get("/v1/function/hello").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_runs_are_removed_by_the_retention_task() {
    let (gw, _up) = gateway_with_envelope_function(&[
        ("DISPATCH_RECORDS_MAX_RUNS", "3"),
        ("DISPATCH_RECORDS_PRUNE_SECONDS", "1"),
    ])
    .await;
    let mut made = Vec::new();
    for i in 0..6 {
        made.push(
            gw.run("hello", json!({"i": i})).await.json()["name"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let newest: Vec<String> = made[3..].iter().rev().cloned().collect();
    let mut listed = Vec::new();
    for _ in 0..100 {
        listed = names(&gw.get("/v1/runs").await.json());
        if listed == newest {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(listed, newest, "only the newest 3 are kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_runs_the_function_once() {
    let (gw, up) = gateway_with_envelope_function(&[]).await;
    let run_with_key = |key: &'static str, function: &'static str, input: Value| {
        let addr = gw.addr;
        async move {
            let body = serde_json::to_vec(&json!({"blocking": true, "input": input})).unwrap();
            request(
                addr,
                hyper::Method::POST,
                &format!("/v1/runs?functionName={function}"),
                &[("idempotency-key", key)],
                body.into(),
            )
            .await
        }
    };
    // Sequential: the second answer is the first run.
    let first = run_with_key("k-1", "hello", json!({"name": "Jon"})).await;
    let again = run_with_key("k-1", "hello", json!({"name": "Jon"})).await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(again.json()["name"], first.json()["name"]);
    assert_eq!(again.json()["output"], first.json()["output"]);
    assert_eq!(up.stats.requests(), 1);

    // Concurrent duplicates of a slow run: one run, every caller gets it.
    let calls: Vec<_> = (0..8)
        .map(|_| tokio::spawn(run_with_key("k-2", "hello", json!({"sleepMs": 300}))))
        .collect();
    let mut names = HashSet::new();
    for call in calls {
        let reply = call.await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text());
        names.insert(reply.json()["name"].as_str().unwrap().to_string());
    }
    assert_eq!(names.len(), 1, "{names:?}");
    assert_eq!(up.stats.requests(), 2);

    // The same key for another function is another run; an unknown function claims nothing.
    assert_eq!(run_with_key("k-3", "nope", json!({})).await.status, 404);
    let dispatch = json!({"upstream": {"protocol": "dispatch"}});
    gw.register(&function("nope", &[up.addr], dispatch)).await;
    let other = run_with_key("k-3", "nope", json!({})).await;
    assert_eq!(other.status, 200, "{}", other.text());
    let mine = run_with_key("k-3", "hello", json!({})).await;
    assert_ne!(mine.json()["name"], other.json()["name"]);
    assert_eq!(up.stats.requests(), 4);

    let long = "k".repeat(300);
    let body = serde_json::to_vec(&json!({"blocking": true, "input": {}})).unwrap();
    let bad = request(
        gw.addr,
        hyper::Method::POST,
        "/v1/runs?functionName=hello",
        &[("idempotency-key", long.as_str())],
        body.into(),
    )
    .await;
    let message = bad.assert_error(400, "bad-request");
    assert!(message.starts_with("idempotency-key"), "{message}");
}

/// The runs of `function`, once there are `n` of them (raw calls are recorded without
/// waiting, so a record lands a moment after the answer).
async fn runs_of(gw: &Gateway, function: &str, n: usize) -> Vec<Value> {
    let path = format!("/v1/runs?functionName={function}");
    for _ in 0..100 {
        let runs = gw.get(&path).await.json();
        if runs.as_array().map(Vec::len) == Some(n) {
            return runs.as_array().unwrap().clone();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{function}: never {n} runs: {}", gw.get(&path).await.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_calls_are_recorded_with_what_went_in_and_out() {
    let echo = Upstream::start(Behavior::Echo).await;
    let gw = Gateway::start().await;
    gw.register(&function("echo", &[echo.addr], json!({})))
        .await;
    let body = bytes::Bytes::from_static(br#"{"name":"Jon"}"#);
    let reply = request(
        gw.addr,
        hyper::Method::POST,
        "/function/echo/greet?loud=1",
        &[("x-call-id", "call-42")],
        body,
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());

    let runs = runs_of(&gw, "echo", 1).await;
    let run = &runs[0];
    assert_eq!(run["status"], "READY");
    assert_eq!(run["input"], json!({"name": "Jon"}));
    assert_eq!(
        run["output"],
        reply.json(),
        "the output is what the caller got"
    );
    assert_eq!(
        run["httpContext"],
        json!({"method": "POST", "path": "/function/echo/greet", "query": "loud=1"})
    );
    assert_eq!(run["call"]["callId"], "call-42");
    assert_eq!(run["call"]["httpStatus"], 200);
    assert_eq!(run["call"]["endpoint"], format!("http://{}", echo.addr));
    let m = gw.metrics().await;
    assert_eq!(m.value("dispatch_run_records_dropped_total", &[]), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_records_follow_the_functions_record_setting() {
    let ok = Upstream::start(Behavior::Echo).await;
    let failing = Upstream::start(Behavior::Fail500).await;
    let gw = Gateway::start().await;
    gw.register(&function("quiet", &[ok.addr], json!({"record": "none"})))
        .await;
    gw.register(&function("fine", &[ok.addr], json!({"record": "errors"})))
        .await;
    gw.register(&function(
        "broken",
        &[failing.addr],
        json!({"record": "errors"}),
    ))
    .await;
    let dead = free_addr();
    gw.register(&function("gone", &[dead], json!({}))).await;
    for path in [
        "/function/quiet",
        "/function/fine",
        "/function/broken",
        "/function/gone",
    ] {
        gw.get(path).await;
    }
    let broken = runs_of(&gw, "broken", 1).await;
    assert_eq!(broken[0]["status"], "ERROR");
    assert_eq!(broken[0]["error"]["type"], "FunctionError");
    assert_eq!(broken[0]["call"]["httpStatus"], 500);
    let gone = runs_of(&gw, "gone", 1).await;
    assert_eq!(gone[0]["error"]["type"], "SystemError");
    assert_eq!(gone[0]["call"]["httpStatus"], 502);
    assert!(
        gone[0]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("gone")
    );
    // By now the records of the other calls would have landed too, had they been made.
    assert_eq!(
        gw.get("/v1/runs?functionName=quiet").await.json(),
        json!([])
    );
    assert_eq!(gw.get("/v1/runs?functionName=fine").await.json(), json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_calls_beyond_the_queue_are_dropped_and_counted_and_sigterm_writes_the_rest() {
    // The writer waits a minute for company and takes at most 50 raw calls in hand: of 80
    // calls, 30 find the queue full, and the 50 kept are written only by the flush.
    let echo = Upstream::start(Behavior::Echo).await;
    let mut gw = Gateway::start_with(&[
        ("DISPATCH_RECORDS_QUEUE", "50"),
        ("DISPATCH_RECORDS_BATCH", "1000"),
        ("DISPATCH_RECORDS_LINGER_MS", "60000"),
    ])
    .await;
    gw.register(&function("echo", &[echo.addr], json!({})))
        .await;
    let mut ids = Vec::new();
    for i in 0..80 {
        let id = format!("call-{i}");
        let reply = request(
            gw.addr,
            hyper::Method::POST,
            "/function/echo",
            &[("x-call-id", id.as_str())],
            bytes::Bytes::from(format!(r#"{{"i":{i}}}"#)),
        )
        .await;
        assert_eq!(reply.status, 200, "call {i}: {}", reply.text());
        ids.push(id);
    }
    let m = gw.metrics().await;
    assert_eq!(m.value("dispatch_run_records_dropped_total", &[]), 30.0);
    assert_eq!(m.value("dispatch_run_records_written_total", &[]), 0.0);
    assert_eq!(m.value("dispatch_run_records_pending", &[]), 50.0);
    gw.terminate();
    let status = gw.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "exit: {status:?}\n{}", gw.log());
    gw.start_again().await;
    let runs = runs_of(&gw, "echo", 50).await;
    let mut kept: Vec<String> = runs
        .iter()
        .map(|r| r["call"]["callId"].as_str().unwrap().to_string())
        .collect();
    kept.reverse();
    assert_eq!(kept, ids[..50], "the first 50 calls, in order");
    assert_eq!(runs[0]["input"], json!({"i": 49}));
}
