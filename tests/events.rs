//! Dispatch's event manager: subscriptions say which functions an event type starts, and
//! an emitted event starts an async run of each, with the event's data as input.

mod common;

use std::time::Duration;

use serde_json::{Value, json};

use common::{Behavior, Gateway, Upstream, dispatch_cli, function, run_finished};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_starts_a_run_of_every_subscribed_function() {
    let up = Upstream::start(Behavior::Envelope).await;
    let mut gw = Gateway::start().await;
    for name in ["greet", "audit"] {
        gw.register(&function(
            name,
            &[up.addr],
            json!({"upstream": {"protocol": "dispatch"}}),
        ))
        .await;
    }
    let reply = gw
        .post_json(
            "/v1/event/subscriptions",
            &json!({"name": "on-user", "eventType": "user.created", "function": "greet"}),
        )
        .await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    assert_eq!(reply.json()["status"], "READY");
    // Dispatch's kebab-case spelling is taken too; `*` takes every event type.
    let reply = gw
        .post_json(
            "/v1/event/subscriptions",
            &json!({"name": "audit-all", "event-type": "*", "source-type": "*", "function": "audit"}),
        )
        .await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    // Refused: a duplicate, a function that does not exist, a bad event type.
    let sub = json!({"name": "on-user", "eventType": "user.created", "function": "greet"});
    gw.post_json("/v1/event/subscriptions", &sub)
        .await
        .assert_error(409, "conflict");
    let bad = json!({"name": "x", "eventType": "a", "function": "nope"});
    assert!(
        gw.post_json("/v1/event/subscriptions", &bad)
            .await
            .assert_error(400, "bad-request")
            .contains("function")
    );
    let bad = json!({"name": "x", "eventType": "a b", "function": "greet"});
    assert!(
        gw.post_json("/v1/event/subscriptions", &bad)
            .await
            .assert_error(400, "bad-request")
            .contains("eventType")
    );

    let emitted = gw
        .post_json(
            "/v1/event/",
            &json!({"event": {"event-type": "user.created", "source-type": "test",
                              "content-type": "application/json", "data": "{\"name\": \"Jon\"}"},
                    "tags": [{"key": "env", "value": "test"}]}),
        )
        .await;
    assert_eq!(emitted.status, 200, "{}", emitted.text());
    let emitted = emitted.json();
    let runs = emitted["runs"].as_array().unwrap().clone();
    assert_eq!(runs.len(), 2, "{emitted}");
    assert!(emitted["event"]["event-id"].is_string());
    for run in &runs {
        let run = run_finished(&gw, run.as_str().unwrap(), Duration::from_secs(10)).await;
        assert_eq!(run["status"], "READY", "{run}");
        assert_eq!(run["input"], json!({"name": "Jon"}));
        assert_eq!(run["output"]["greeting"], "Hello, Jon");
        assert_eq!(run["event"]["event-type"], "user.created");
        assert!(
            run["event"].get("data").is_none(),
            "the event goes without its data"
        );
        assert_eq!(run["tags"], json!([{"key": "env", "value": "test"}]));
    }
    // The function saw the event in its context.
    assert_eq!(
        up.stats.last_context()["event"]["event-type"],
        "user.created"
    );

    // Another type: only the `*` subscription.
    let emitted = gw
        .post_json(
            "/v1/event/",
            &json!({"eventType": "order.paid", "data": {"n": 1}}),
        )
        .await
        .json();
    assert_eq!(emitted["runs"].as_array().unwrap().len(), 1, "{emitted}");
    gw.post_json("/v1/event/", &json!({"event": {"data": 1}}))
        .await
        .assert_error(400, "bad-request");

    // Listed, read, changed, and still there after a restart; deleted, gone.
    let listed = gw.get("/v1/event/subscriptions").await.json();
    assert_eq!(listed.as_array().unwrap().len(), 2);
    let changed = gw
        .put_json(
            "/v1/event/subscriptions/on-user",
            &json!({"eventType": "user.deleted", "function": "audit"}),
        )
        .await;
    assert_eq!(changed.status, 200, "{}", changed.text());
    gw.restart().await;
    let kept = gw.get("/v1/event/subscriptions/on-user").await.json();
    assert_eq!(kept["eventType"], "user.deleted");
    assert_eq!(kept["function"], "audit");
    assert_eq!(
        gw.delete("/v1/event/subscriptions/on-user").await.status,
        200
    );
    gw.get("/v1/event/subscriptions/on-user")
        .await
        .assert_error(404, "not-found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_creates_subscriptions_lists_them_and_emits_events() {
    let up = Upstream::start(Behavior::Envelope).await;
    let gw = Gateway::start().await;
    gw.register(&function(
        "greet",
        &[up.addr],
        json!({"upstream": {"protocol": "dispatch"}}),
    ))
    .await;
    let port = gw.addr.port().to_string();
    let (code, out) = dispatch_cli(&[
        "create",
        "subscription",
        "hi",
        "greet",
        "--event-type",
        "user.created",
        "--port",
        &port,
    ])
    .await;
    assert_eq!(code, 0, "{out}");
    let (code, out) = dispatch_cli(&["get", "subscriptions", "--port", &port]).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("hi") && out.contains("user.created") && out.contains("greet"),
        "{out}"
    );
    let (code, out) = dispatch_cli(&[
        "emit",
        "user.created",
        "--payload",
        r#"{"name": "Sansa"}"#,
        "--port",
        &port,
    ])
    .await;
    assert_eq!(code, 0, "{out}");
    let emitted: Value = serde_json::from_str(&out).unwrap();
    let run = run_finished(
        &gw,
        emitted["runs"][0].as_str().unwrap(),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(run["output"]["greeting"], "Hello, Sansa", "{run}");
}
