//! Secrets (`/v1/secret`), as Dispatch v0.1.24 clients use them: 201 on create and on
//! PUT, 204 on DELETE, 409 on a duplicate, 404 for unknown names; values masked in every
//! answer and never logged; a function's secrets (and a run's) reach the function in the
//! envelope's `context.secrets`, and a run naming a missing secret ends in an InputError.

mod common;

use common::*;
use http::StatusCode;
use serde_json::{Value, json};

const VALUE: &str = "s3cr3t-Value-never-shown";

fn dispatch_function(name: &str, up: &Upstream, extra: Value) -> Value {
    let mut spec = function(
        name,
        &[up.addr],
        json!({"upstream": {"protocol": "dispatch"}}),
    );
    merge(&mut spec, extra);
    spec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_created_shown_masked_replaced_and_deleted() {
    let gw = Gateway::start_with(&[("RUST_LOG", "debug")]).await;
    let mut answers = Vec::new();

    let created = gw
        .post_json(
            "/v1/secret/",
            &json!({"name": "db", "secrets": {"password": VALUE, "user": "app"},
                    "tags": [{"key": "env", "value": "prod"}]}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
    answers.push(created.text());
    let created = created.json();
    assert_eq!(created["name"], "db");
    assert_eq!(created["kind"], "Secret");
    assert_eq!(created["id"].as_str().map(str::len), Some(36), "{created}");
    assert_eq!(
        created["secrets"],
        json!({"password": "********", "user": "********"})
    );

    let dup = gw
        .post_json(
            "/v1/secret",
            &json!({"name": "db", "secrets": {"k": VALUE}}),
        )
        .await;
    answers.push(dup.text());
    dup.assert_error(409, "conflict");
    for bad in [
        json!({"secrets": {"k": "v"}}),
        json!({"name": "no spaces", "secrets": {}}),
        json!({"name": "x", "secrets": {"k": 12345}}),
    ] {
        let reply = gw.post_json("/v1/secret", &bad).await;
        let message = reply.assert_error(400, "bad-request");
        assert!(
            message.starts_with("name:") || message.starts_with("secrets.k:"),
            "{message}"
        );
        assert!(
            !message.contains("12345"),
            "a bad value is not echoed: {message}"
        );
    }

    for path in ["/v1/secret", "/v1/secret/", "/v1/secret?tags=env=prod"] {
        let list = gw.get(path).await;
        assert_eq!(list.status, StatusCode::OK);
        answers.push(list.text());
        assert_eq!(list.json(), json!([created]), "{path}");
    }
    assert_eq!(gw.get("/v1/secret?tags=env=dev").await.json(), json!([]));
    let one = gw.get("/v1/secret/db").await;
    answers.push(one.text());
    assert_eq!(one.json(), created);

    let replaced = gw
        .put_json("/v1/secret/db", &json!({"secrets": {"token": VALUE}}))
        .await;
    assert_eq!(replaced.status, StatusCode::CREATED, "{}", replaced.text());
    answers.push(replaced.text());
    let replaced = replaced.json();
    assert_eq!(replaced["secrets"], json!({"token": "********"}));
    assert_eq!(replaced["id"], created["id"]);
    gw.put_json("/v1/secret/nope", &json!({"secrets": {}}))
        .await
        .assert_error(404, "not-found");
    gw.put_json("/v1/secret/db", &json!({"name": "other", "secrets": {}}))
        .await
        .assert_error(400, "bad-request");

    let deleted = gw.delete("/v1/secret/db").await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT, "{}", deleted.text());
    assert!(deleted.body.is_empty());
    gw.get("/v1/secret/db").await.assert_error(404, "not-found");
    gw.delete("/v1/secret/db")
        .await
        .assert_error(404, "not-found");

    for answer in &answers {
        assert!(!answer.contains(VALUE), "a value in an answer: {answer}");
    }
    let log = gw.log();
    assert!(log.contains("secret created"), "debug log is on: {log}");
    assert!(!log.contains(VALUE), "a value in the log:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_functions_secrets_reach_its_envelope() {
    let up = Upstream::start(Behavior::Envelope).await;
    let gw = Gateway::start_with(&[("RUST_LOG", "debug")]).await;
    for (name, secrets) in [
        ("db", json!({"password": VALUE})),
        ("api", json!({"token": "t0k"})),
    ] {
        let reply = gw
            .post_json("/v1/secret", &json!({"name": name, "secrets": secrets}))
            .await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    }
    gw.register(&dispatch_function("hello", &up, json!({"secrets": ["db"]})))
        .await;

    let run = gw.run("hello", json!({"name": "Jon"})).await;
    assert_eq!(run.status, StatusCode::OK, "{}", run.text());
    assert_eq!(run.json()["status"], "READY", "{}", run.text());
    assert_eq!(run.json()["secrets"], json!(["db"]));
    assert!(!run.text().contains(VALUE), "{}", run.text());
    assert_eq!(
        up.stats.last_context()["secrets"],
        json!({"password": VALUE})
    );

    // A run may name more secrets: they are merged.
    let run = gw
        .post_json(
            "/v1/runs?functionName=hello",
            &json!({"blocking": true, "input": {}, "secrets": ["api"]}),
        )
        .await;
    assert_eq!(run.json()["status"], "READY", "{}", run.text());
    assert_eq!(
        up.stats.last_context()["secrets"],
        json!({"password": VALUE, "token": "t0k"})
    );

    // A new value reaches the next run.
    let reply = gw
        .put_json(
            "/v1/secret/db",
            &json!({"secrets": {"password": "rotated"}}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    gw.run("hello", json!({})).await;
    assert_eq!(
        up.stats.last_context()["secrets"],
        json!({"password": "rotated"})
    );

    // The recorded run holds the names only.
    let runs = gw.get("/v1/runs?functionName=hello").await;
    assert_eq!(runs.status, StatusCode::OK);
    assert!(!runs.text().contains(VALUE), "{}", runs.text());
    assert!(!runs.text().contains("rotated"), "{}", runs.text());
    assert!(!gw.log().contains(VALUE), "a value in the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_naming_a_missing_secret_ends_in_an_input_error() {
    let up = Upstream::start(Behavior::Envelope).await;
    let gw = Gateway::start().await;
    gw.register(&dispatch_function(
        "hello",
        &up,
        json!({"secrets": ["missing"]}),
    ))
    .await;
    let reply = gw.run("hello", json!({"name": "Jon"})).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let run = reply.json();
    assert_eq!(run["status"], "ERROR", "{run}");
    assert_eq!(run["error"]["type"], "InputError", "{run}");
    assert_eq!(run["error"]["message"], "secret \"missing\" not found");
    assert_eq!(up.stats.requests(), 0, "the function is not called");

    // Once the secret exists, the same function runs.
    gw.post_json(
        "/v1/secret",
        &json!({"name": "missing", "secrets": {"k": "v"}}),
    )
    .await;
    let run = gw.run("hello", json!({})).await.json();
    assert_eq!(run["status"], "READY", "{run}");
    assert_eq!(up.stats.last_context()["secrets"], json!({"k": "v"}));
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_holding_secrets_is_readable_by_its_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let gw = Gateway::start().await;
    let reply = gw
        .post_json(
            "/v1/secret",
            &json!({"name": "db", "secrets": {"k": VALUE}}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED);
    let db = gw.data_dir().join("dispatch.db");
    let mode = std::fs::metadata(&db).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{}", db.display());
    let dir_mode = std::fs::metadata(gw.data_dir())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(dir_mode & 0o077, 0, "the data dir is private");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_survive_a_restart() {
    let up = Upstream::start(Behavior::Envelope).await;
    let mut gw = Gateway::start().await;
    gw.post_json(
        "/v1/secret",
        &json!({"name": "db", "secrets": {"k": VALUE}}),
    )
    .await;
    gw.register(&dispatch_function("hello", &up, json!({"secrets": ["db"]})))
        .await;
    gw.restart().await;
    let run = gw.run("hello", json!({})).await.json();
    assert_eq!(run["status"], "READY", "{run}");
    assert_eq!(up.stats.last_context()["secrets"], json!({"k": VALUE}));
}
