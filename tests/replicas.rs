//! Several gateways, one state: two `dispatch serve` processes sharing one PostgreSQL
//! database see each other's functions (LISTEN/NOTIFY, not per-call queries) and runs.

mod common;

use std::time::Duration;

use common::pg::TestDatabase;
use common::*;
use serde_json::json;

/// Asks `gw` for `path` until `check` holds on the reply (a bound against hangs, not a
/// timing assertion: notifications normally arrive within milliseconds).
async fn until(gw: &Gateway, path: &str, what: &str, check: impl Fn(&Reply) -> bool) -> Reply {
    for _ in 0..100 {
        let reply = gw.get(path).await;
        if check(&reply) {
            return reply;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: never seen on {path}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_share_functions_and_runs() {
    let db = TestDatabase::create().await;
    let url = db.url();
    let up = Upstream::start(Behavior::Envelope).await;
    let a = Gateway::start_with(&[("DISPATCH_STORE_URL", &url)]).await;
    let b = Gateway::start_with(&[("DISPATCH_STORE_URL", &url)]).await;

    // Registered through A, callable through B.
    let dispatch = json!({"upstream": {"protocol": "dispatch"}});
    a.register(&function("hello", &[up.addr], dispatch)).await;
    until(&b, "/v1/function/hello", "the function made on A", |r| {
        r.status == 200
    })
    .await;
    let on_b = b.run("hello", json!({"name": "Bran"})).await;
    assert_eq!(on_b.json()["status"], "READY", "{}", on_b.text());
    let on_a = a.run("hello", json!({"name": "Rickon"})).await;

    // Runs recorded by one are listed by the other.
    let listed = a.get("/v1/runs?functionName=hello").await.json();
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            on_a.json()["name"].as_str().unwrap(),
            on_b.json()["name"].as_str().unwrap()
        ]
    );

    // Updated through B, seen by A.
    let mut updated = function(
        "hello",
        &[up.addr],
        json!({"upstream": {"protocol": "dispatch"}}),
    );
    updated["tags"] = json!([{"key": "v", "value": "2"}]);
    assert_eq!(b.put_json("/v1/function/hello", &updated).await.status, 200);
    until(&a, "/v1/function/hello", "the update made on B", |r| {
        r.json()["tags"] == json!([{"key": "v", "value": "2"}])
    })
    .await;

    // Deleted through A, gone from B: calls get 404.
    assert_eq!(a.delete("/v1/function/hello").await.status, 200);
    until(&b, "/v1/function/hello", "the delete made on A", |r| {
        r.status == 404
    })
    .await;
    b.run("hello", json!({}))
        .await
        .assert_error(404, "not-found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_store_holds_nothing_up_and_loses_no_record() {
    let db = TestDatabase::create().await;
    let relay = common::pg::Relay::start().await;
    let envelope = Upstream::start(Behavior::Envelope).await;
    let echo = Upstream::start(Behavior::Echo).await;
    let gw = Gateway::start_with(&[
        ("DISPATCH_STORE_URL", &relay.url(&db)),
        ("DISPATCH_RECORDS_WAIT_MS", "200"),
    ])
    .await;
    let dispatch = json!({"upstream": {"protocol": "dispatch"}});
    gw.register(&function("hello", &[envelope.addr], dispatch))
        .await;
    gw.register(&function("echo", &[echo.addr], json!({})))
        .await;
    let before = gw.run("hello", json!({"n": 0})).await.json();
    assert_eq!(gw.get("/readyz").await.status, 200);

    relay.cut();
    let down = until(&gw, "/readyz", "the store reported down", |r| {
        r.status == 503
    })
    .await;
    assert_ne!(down.json()["store"], "ok", "{}", down.text());
    // Calls are still served from the registry, and Dispatch runs still answer.
    assert_eq!(gw.get("/function/echo").await.status, 200);
    let mut during = Vec::new();
    for n in 1..=5 {
        let reply = gw.run("hello", json!({"n": n})).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.json()["status"], "READY");
        during.push(reply.json()["name"].as_str().unwrap().to_string());
    }

    relay.restore();
    until(&gw, "/readyz", "the store back", |r| r.status == 200).await;
    let listed = until(
        &gw,
        "/v1/runs?functionName=hello",
        "the queued records",
        |r| r.status == 200 && r.json().as_array().is_some_and(|a| a.len() == 6),
    )
    .await
    .json();
    let mut expected: Vec<String> = during.into_iter().rev().collect();
    expected.push(before["name"].as_str().unwrap().to_string());
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, expected, "every run recorded, none twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_share_secrets_and_images() {
    let db = TestDatabase::create().await;
    let url = db.url();
    let up = Upstream::start(Behavior::Envelope).await;
    let env = [
        ("DISPATCH_STORE_URL", url.as_str()),
        ("DISPATCH_RUNTIMES_PYTHON3", "sh"),
    ];
    let a = Gateway::start_with(&env).await;
    let b = Gateway::start_with(&env).await;

    // A secret made on A reaches B's runs; a new value and a delete too.
    let made = a
        .post_json(
            "/v1/secret",
            &json!({"name": "db", "secrets": {"k": "one"}}),
        )
        .await;
    assert_eq!(made.status, 201, "{}", made.text());
    let dispatch = json!({"upstream": {"protocol": "dispatch"}, "secrets": ["db"]});
    a.register(&function("hello", &[up.addr], dispatch)).await;
    until(&b, "/v1/secret/db", "the secret made on A", |r| {
        r.status == 200
    })
    .await;
    until(&b, "/v1/function/hello", "the function made on A", |r| {
        r.status == 200
    })
    .await;
    assert_eq!(b.run("hello", json!({})).await.json()["status"], "READY");
    assert_eq!(up.stats.last_context()["secrets"], json!({"k": "one"}));

    let put = a
        .put_json("/v1/secret/db", &json!({"secrets": {"k": "two"}}))
        .await;
    assert_eq!(put.status, 201, "{}", put.text());
    for _ in 0..100 {
        b.run("hello", json!({})).await;
        if up.stats.last_context()["secrets"] == json!({"k": "two"}) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(up.stats.last_context()["secrets"], json!({"k": "two"}));

    assert_eq!(a.delete("/v1/secret/db").await.status, 204);
    until(&b, "/v1/secret/db", "the secret deleted on A", |r| {
        r.status == 404
    })
    .await;
    let run = b.run("hello", json!({})).await.json();
    assert_eq!(run["error"]["type"], "InputError", "{run}");

    // Base images and images made on B are seen on A.
    let base = b
        .post_json(
            "/v1/baseimage",
            &json!({"name": "py", "language": "python3"}),
        )
        .await;
    assert_eq!(base.status, 201, "{}", base.text());
    let image = b
        .post_json("/v1/image", &json!({"name": "i", "baseImageName": "py"}))
        .await;
    assert_eq!(image.status, 201, "{}", image.text());
    let seen = until(&a, "/v1/image/i", "the image made on B", |r| {
        r.status == 200
    })
    .await;
    assert_eq!(seen.json()["status"], "READY", "{}", seen.text());
}
