//! A function's `schema.in` and `schema.out` (JSON Schema): an invalid schema is a 400 at
//! registration naming the field; a Dispatch run whose input fails `schema.in` ends in an
//! InputError without calling the function, one whose output fails `schema.out` in a
//! FunctionError; on the raw surface a body failing `schema.in` is a 400.

mod common;

use bytes::Bytes;
use common::*;
use http::{Method, StatusCode};
use serde_json::{Value, json};

fn schema() -> Value {
    json!({
        "in": {
            "type": "object",
            "properties": {"name": {"type": "string"}},
            "required": ["name"],
        },
        "out": {
            "type": "object",
            "properties": {"greeting": {"type": "string", "pattern": "^Hello"}},
            "required": ["greeting"],
        },
    })
}

fn with_schema(name: &str, up: &Upstream, protocol: &str, schema: Value) -> Value {
    function(
        name,
        &[up.addr],
        json!({"upstream": {"protocol": protocol}, "schema": schema}),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_schema_is_400_naming_it() {
    let up = Upstream::start(Behavior::Envelope).await;
    let gw = Gateway::start().await;
    for (schema, field) in [
        (json!({"in": {"type": "strin"}}), "schema.in"),
        (json!({"out": {"required": "name"}}), "schema.out"),
    ] {
        let reply = gw
            .post_json("/v1/function", &with_schema("f", &up, "dispatch", schema))
            .await;
        let message = reply.assert_error(400, "bad-request");
        assert!(message.starts_with(&format!("{field}:")), "{message}");
    }
    gw.get("/v1/function/f")
        .await
        .assert_error(404, "not-found");
    // Empty schemas are no schemas.
    gw.register(&with_schema(
        "f",
        &up,
        "dispatch",
        json!({"in": {}, "out": {}}),
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_check_input_and_output() {
    let up = Upstream::start(Behavior::Envelope).await;
    let gw = Gateway::start().await;
    gw.register(&with_schema("hello", &up, "dispatch", schema()))
        .await;

    let run = gw.run("hello", json!({"name": "Jon"})).await.json();
    assert_eq!(run["status"], "READY", "{run}");
    assert_eq!(up.stats.requests(), 1);

    let reply = gw.run("hello", json!({"name": 42})).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let run = reply.json();
    assert_eq!(run["status"], "ERROR", "{run}");
    assert_eq!(run["error"]["type"], "InputError", "{run}");
    let message = run["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("input does not match schema.in: /name: "),
        "{message}"
    );
    assert_eq!(up.stats.requests(), 1, "the function is not called");
    assert!(
        reply.header("x-dispatch-error").is_none(),
        "not a system error"
    );

    // The envelope upstream greets "Hello, ..." in an object; a function whose schema wants
    // another greeting fails on its output.
    let mut strict = schema();
    strict["out"]["properties"]["greeting"]["pattern"] = json!("^Bonjour");
    gw.register(&with_schema("strict", &up, "dispatch", strict))
        .await;
    let run = gw.run("strict", json!({"name": "Jon"})).await.json();
    assert_eq!(run["status"], "ERROR", "{run}");
    assert_eq!(run["error"]["type"], "FunctionError", "{run}");
    let message = run["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("output does not match schema.out: /greeting: "),
        "{message}"
    );
    assert_eq!(up.stats.requests(), 2, "the function was called");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_calls_failing_schema_in_are_400() {
    let up = Upstream::start(Behavior::Echo).await;
    let gw = Gateway::start().await;
    gw.register(&with_schema("echo", &up, "raw", schema()))
        .await;
    let call = |body: &'static str| {
        request(
            gw.addr,
            Method::POST,
            "/function/echo",
            &[("content-type", "application/json")],
            Bytes::from_static(body.as_bytes()),
        )
    };

    let ok = call(r#"{"name":"Jon"}"#).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    assert_eq!(
        ok.json()["body"],
        r#"{"name":"Jon"}"#,
        "the body reaches it whole"
    );
    assert_eq!(up.stats.requests(), 1);

    let bad = call(r#"{"name":42}"#).await;
    let message = bad.assert_error(400, "bad-request");
    assert!(
        message.contains("schema.in") && message.contains("/name"),
        "{message}"
    );
    let garbage = call("not json").await;
    let message = garbage.assert_error(400, "bad-request");
    assert!(message.contains("not JSON"), "{message}");
    assert_eq!(up.stats.requests(), 1, "neither reached the function");

    // A function without a schema takes any body.
    gw.register(&function("plain", &[up.addr], json!({}))).await;
    let reply = request(
        gw.addr,
        Method::POST,
        "/function/plain",
        &[],
        Bytes::from_static(b"not json"),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
}
