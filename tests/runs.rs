//! The Dispatch surface, `POST /v1/runs?functionName=f`: blocking runs answer 200 with a
//! Run whatever happened to the function (READY with output and logs, ERROR with a
//! FunctionError or a SystemError); the pod contract's envelope for protocol "dispatch",
//! the bare input for "raw"; 4xx/5xx only for calls that never started.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Method, StatusCode};
use serde_json::{Value, json};

fn dispatch_function(name: &str, up: &Upstream, extra: Value) -> Value {
    let mut spec = function(
        name,
        &[up.addr],
        json!({"upstream": {"protocol": "dispatch"}}),
    );
    merge(&mut spec, extra);
    spec
}

fn assert_run_shape(run: &Value, function: &str) {
    assert_eq!(run["functionName"], function, "{run}");
    let name = run["name"].as_str().expect("run name");
    assert!(uuid_like(name), "run name is a uuid: {name}");
    assert_eq!(run["blocking"], true);
    assert!(
        run["executedTime"].as_i64().unwrap() > 1_600_000_000,
        "{run}"
    );
    assert!(run["finishedTime"].as_i64().unwrap() >= run["executedTime"].as_i64().unwrap());
}

fn uuid_like(s: &str) -> bool {
    s.len() == 36 && s.chars().filter(|c| *c == '-').count() == 4
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_returns_output_and_logs_through_the_envelope() {
    let up = Upstream::start(Behavior::Envelope).await;
    let gw = Gateway::start().await;
    let created = gw
        .register(&dispatch_function("hello", &up, json!({})))
        .await;
    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let reply = request(
        gw.addr,
        Method::POST,
        "/v1/runs?functionName=hello",
        &[("content-type", "application/json"), ("traceparent", tp)],
        Bytes::from(json!({"blocking": true, "input": {"name": "Jon"}}).to_string()),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert!(reply.header("x-dispatch-error").is_none());
    let run = reply.json();
    assert_run_shape(&run, "hello");
    assert_eq!(run["functionId"], created["id"]);
    assert_eq!(run["status"], "READY", "{run}");
    assert_eq!(run["error"], Value::Null);
    assert_eq!(run["input"], json!({"name": "Jon"}));
    assert_eq!(run["output"]["greeting"], "Hello, Jon", "{run}");
    assert_eq!(
        run["logs"],
        json!({"stdout": ["called"], "stderr": ["a warning"]})
    );

    // What the function received: the envelope, on POST /.
    let seen = up.stats.last();
    assert_eq!(seen["method"], "POST");
    assert_eq!(seen["path"], "/");
    let sent: Value = serde_json::from_str(seen["body"].as_str().unwrap()).unwrap();
    assert_eq!(sent["payload"], json!({"name": "Jon"}), "{sent}");
    let context = sent["context"].as_object().expect("context object");
    assert!(
        context["deadline"].as_u64().unwrap() > 1_600_000_000_000,
        "{sent}"
    );
    assert_eq!(seen["headers"]["x-call-id"][0], run["name"]);
    assert_eq!(seen["headers"]["traceparent"][0], tp);
    assert_eq!(seen["headers"]["content-type"][0], "application/json");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_error_is_reported_in_the_run() {
    let up = Upstream::start(Behavior::Envelope).await;
    let gw = Gateway::start().await;
    gw.register(&dispatch_function("hello", &up, json!({})))
        .await;
    let reply = gw.run("hello", json!({"fail": true})).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert!(
        reply.header("x-dispatch-error").is_none(),
        "a function's own failure is not a platform error"
    );
    let run = reply.json();
    assert_run_shape(&run, "hello");
    assert_eq!(run["status"], "ERROR", "{run}");
    assert_eq!(run["error"]["type"], "FunctionError");
    assert_eq!(run["error"]["message"], "input asked to fail");
    assert_eq!(
        run["error"]["stacktrace"],
        json!(["at handle (hello.py:3)"])
    );
    assert_eq!(run["logs"]["stderr"], json!(["about to fail"]));
    assert_eq!(run["output"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_is_a_system_error() {
    let dead = free_addr();
    let gw = Gateway::start().await;
    gw.register(&function(
        "gone",
        &[dead],
        json!({"upstream": {"protocol": "dispatch"}}),
    ))
    .await;
    let reply = gw.run("gone", json!({"x": 1})).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.header("x-dispatch-error"), Some("system-error"));
    let run = reply.json();
    assert_run_shape(&run, "gone");
    assert_eq!(run["status"], "ERROR", "{run}");
    assert_eq!(run["error"]["type"], "SystemError");
    let message = run["error"]["message"].as_str().unwrap();
    assert!(message.contains(&dead.to_string()), "{message}");
    assert_eq!(run["input"], json!({"x": 1}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_past_its_deadline_is_a_system_error_and_the_upstream_is_dropped() {
    let up = Upstream::start(Behavior::Slow(Duration::from_secs(20))).await;
    let gw = Gateway::start().await;
    gw.register(&dispatch_function("sleepy", &up, json!({"timeout": 300})))
        .await;
    let reply = gw.run("sleepy", json!({})).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.header("x-dispatch-error"), Some("system-error"));
    let run = reply.json();
    assert_eq!(run["status"], "ERROR", "{run}");
    assert_eq!(run["error"]["type"], "SystemError");
    let message = run["error"]["message"].as_str().unwrap();
    assert!(message.contains("deadline"), "{message}");
    eventually(
        Duration::from_secs(10),
        "the upstream request dropped",
        || up.stats.dropped() == 1,
    )
    .await;
    let m = gw.metrics().await;
    assert_eq!(
        m.value(
            "gateway_function_invocation_total",
            &[("function_name", "sleepy"), ("code", "504")]
        ),
        1.0,
        "{}",
        m.text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_function_gets_the_bare_input_and_its_body_is_the_output() {
    let up = Upstream::start(Behavior::Echo).await;
    let gw = Gateway::start().await;
    gw.register(&function("plain", &[up.addr], json!({}))).await;
    let input = json!({"a": [1, 2], "b": "two"});
    let reply = gw.run("plain", input.clone()).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let run = reply.json();
    assert_run_shape(&run, "plain");
    assert_eq!(run["status"], "READY", "{run}");
    // The echo upstream answers with what it got: a POST of the input as is.
    let output = &run["output"];
    assert_eq!(output["method"], "POST");
    assert_eq!(output["path"], "/");
    let sent: Value = serde_json::from_str(output["body"].as_str().unwrap()).unwrap();
    assert_eq!(sent, input, "no envelope around a raw function's input");
    assert_eq!(run["logs"], json!({"stdout": [], "stderr": []}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_function_answering_500_is_a_function_error() {
    let up = Upstream::start(Behavior::Fail500).await;
    let gw = Gateway::start().await;
    gw.register(&function("fails", &[up.addr], json!({}))).await;
    let reply = gw.run("fails", json!(1)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let run = reply.json();
    assert_eq!(run["status"], "ERROR", "{run}");
    assert_eq!(run["error"]["type"], "FunctionError");
    let message = run["error"]["message"].as_str().unwrap();
    assert!(message.contains("500"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_that_cannot_start_get_4xx() {
    let up = Upstream::start(Behavior::Envelope).await;
    let gw = Gateway::start().await;
    gw.register(&dispatch_function("hello", &up, json!({})))
        .await;

    let message = gw
        .run("nope", json!({}))
        .await
        .assert_error(404, "not-found");
    assert!(message.contains("\"nope\""), "{message}");

    let message = gw
        .post_json("/v1/runs", &json!({"blocking": true, "input": {}}))
        .await
        .assert_error(400, "bad-request");
    assert!(message.contains("functionName"), "{message}");

    let reply = request(
        gw.addr,
        Method::POST,
        "/v1/runs?functionName=hello",
        &[("content-type", "application/json")],
        Bytes::from_static(b"{\"blocking\": true, \"input\": "),
    )
    .await;
    reply.assert_error(400, "bad-request");

    let reply = request(
        gw.addr,
        Method::POST,
        "/v1/runs?functionName=hello",
        &[],
        Bytes::new(),
    )
    .await;
    reply.assert_error(400, "bad-request");
    assert_eq!(up.stats.requests(), 0);
}

const SIX_MIB: usize = 6 * 1024 * 1024;

fn run_head(gw: &Gateway, extra: &str) -> String {
    format!(
        "POST /v1/runs?functionName=hello HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer {TOKEN}\r\n\
         content-type: application/json\r\n{extra}\r\n",
        gw.addr
    )
}

fn assert_413(status: u16, head: &str, body: &[u8]) {
    assert_eq!(status, 413, "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("x-dispatch-error: payload-too-large"),
        "{head}"
    );
    let body: Value = serde_json::from_slice(body).expect("a JSON error body");
    assert_eq!(body["code"], 413);
    assert!(
        body["message"].as_str().unwrap().contains("6291456"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_body_declared_over_the_default_6_mib_is_413() {
    let up = Upstream::start(Behavior::Envelope).await;
    let gw = Gateway::start().await;
    gw.register(&dispatch_function("hello", &up, json!({})))
        .await;
    // A careful client (curl does this for large bodies) asks before sending.
    let head = run_head(
        &gw,
        &format!(
            "content-length: {}\r\nexpect: 100-continue\r\n",
            7 * 1024 * 1024
        ),
    );
    let (status, head, body) = raw_exchange(gw.addr, &head, std::iter::empty())
        .await
        .expect("an answer");
    assert_413(status, &head, &body);
    assert_eq!(up.stats.requests(), 0);

    // Under the limit, a large input goes through.
    let fits = "y".repeat(1024 * 1024);
    let reply = gw.run("hello", json!({"name": fits})).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["status"], "READY");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_body_streamed_past_the_default_6_mib_is_413() {
    let up = Upstream::start(Behavior::Envelope).await;
    let gw = Gateway::start().await;
    gw.register(&dispatch_function("hello", &up, json!({})))
        .await;
    // Chunked, no length: one byte more than the limit, and nothing after it, so the
    // gateway has read all that was sent when it answers.
    let mut data = br#"{"blocking": true, "input": ""#.to_vec();
    data.resize(SIX_MIB + 1, b'x');
    let chunks = data.chunks(256 * 1024).map(|c| {
        let mut chunk = format!("{:x}\r\n", c.len()).into_bytes();
        chunk.extend_from_slice(c);
        chunk.extend_from_slice(b"\r\n");
        Bytes::from(chunk)
    });
    let head = run_head(&gw, "transfer-encoding: chunked\r\n");
    let (status, head, body) = raw_exchange(gw.addr, &head, chunks)
        .await
        .expect("an answer");
    assert_413(status, &head, &body);
    assert_eq!(up.stats.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sending_a_7_mib_run_body_gets_the_413_not_a_reset() {
    let up = Upstream::start(Behavior::Envelope).await;
    let gw = Gateway::start().await;
    gw.register(&dispatch_function("hello", &up, json!({})))
        .await;
    let len = 7 * 1024 * 1024;
    let mut data = br#"{"blocking": true, "input": ""#.to_vec();
    data.resize(len - 2, b'x');
    data.extend_from_slice(b"\"}");
    let data = Bytes::from(data);
    let parts = (0..len)
        .step_by(64 * 1024)
        .map(move |i| data.slice(i..(i + 64 * 1024).min(len)));
    let head = run_head(&gw, &format!("content-length: {len}\r\n"));
    let (status, head, body) = raw_exchange(gw.addr, &head, parts)
        .await
        .unwrap_or_else(|e| panic!("the client got no 413, only: {e}"));
    assert_413(status, &head, &body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_that_is_not_an_envelope_is_a_system_error() {
    // Answers 200 "slow": plain text where the pod contract wants an envelope.
    let up = Upstream::start(Behavior::Slow(Duration::ZERO)).await;
    let gw = Gateway::start().await;
    gw.register(&dispatch_function("confused", &up, json!({})))
        .await;
    let reply = gw.run("confused", json!({})).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let run = reply.json();
    assert_eq!(run["status"], "ERROR", "{run}");
    assert_eq!(run["error"]["type"], "SystemError");
    let message = run["error"]["message"].as_str().unwrap();
    assert!(message.contains("envelope"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_over_the_body_limit_is_a_system_error() {
    let up = Upstream::start(Behavior::Produce(7 * 1024 * 1024)).await;
    let gw = Gateway::start().await;
    gw.register(&dispatch_function("verbose", &up, json!({})))
        .await;
    let reply = gw.run("verbose", json!({})).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.header("x-dispatch-error"), Some("system-error"));
    let run = reply.json();
    assert_eq!(run["status"], "ERROR");
    assert_eq!(run["error"]["type"], "SystemError");
    let message = run["error"]["message"].as_str().unwrap();
    assert!(message.contains("6291456"), "{message}");
}
