//! Base images and images (`/v1/baseimage`, `/v1/image`), as Dispatch v0.1.24 clients use
//! them: 201 on create, 409 on a duplicate, 400 naming the bad field, 404 for unknown
//! names, DELETE answering the object with status DELETED; an image READY when its
//! runtime's interpreter is on this machine, ERROR saying why otherwise.

mod common;

use common::*;
use http::StatusCode;
use serde_json::{Value, json};

async fn base(gw: &Gateway, name: &str, language: &str) -> Value {
    let reply = gw
        .post_json(
            "/v1/baseimage",
            &json!({
                "name": name,
                "dockerUrl": format!("dispatchframework/{language}-base:0.0.13"),
                "language": language,
                "tags": [{"key": "role", "value": "test"}],
            }),
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    reply.json()
}

async fn image(gw: &Gateway, name: &str, base: &str) -> Reply {
    gw.post_json(
        "/v1/image",
        &json!({
            "name": name,
            "baseImageName": base,
            "runtimeDependencies": {"manifest": "requests==2.31.0"},
            "tags": [{"key": "team", "value": "blue"}],
        }),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base_images_are_created_listed_and_deleted() {
    let gw = Gateway::start().await;
    let created = base(&gw, "python3-base", "python3").await;
    assert_eq!(created["name"], "python3-base");
    assert_eq!(created["kind"], "BaseImage");
    assert_eq!(created["language"], "python3");
    assert_eq!(
        created["dockerUrl"],
        "dispatchframework/python3-base:0.0.13"
    );
    assert_eq!(created["status"], "READY");
    assert_eq!(created["reason"], json!([]));
    assert_eq!(created["id"].as_str().map(str::len), Some(36), "{created}");
    assert!(created["createdTime"].as_i64().unwrap() > 1_600_000_000);
    assert!(created["modifiedTime"].as_i64().unwrap() > 1_600_000_000);
    base(&gw, "nodejs-base", "nodejs").await;

    let got = gw.get("/v1/baseimage/python3-base").await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.json(), created);
    let all = gw.get("/v1/baseimage").await.json();
    assert_eq!(all.as_array().map(Vec::len), Some(2), "{all}");
    let filtered = gw.get("/v1/baseimage?tags=role=test").await.json();
    assert_eq!(filtered.as_array().map(Vec::len), Some(2), "{filtered}");
    let none = gw.get("/v1/baseimage?tags=role=prod").await.json();
    assert_eq!(none, json!([]));

    let dup = gw
        .post_json(
            "/v1/baseimage",
            &json!({"name": "python3-base", "language": "python3"}),
        )
        .await;
    let message = dup.assert_error(409, "conflict");
    assert!(message.contains("\"python3-base\""), "{message}");

    let deleted = gw.delete("/v1/baseimage/python3-base").await;
    assert_eq!(deleted.status, StatusCode::OK, "{}", deleted.text());
    assert_eq!(deleted.json()["status"], "DELETED");
    assert_eq!(deleted.json()["name"], "python3-base");
    gw.get("/v1/baseimage/python3-base")
        .await
        .assert_error(404, "not-found");
    gw.delete("/v1/baseimage/python3-base")
        .await
        .assert_error(404, "not-found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bodies_are_400_naming_the_field() {
    let gw = Gateway::start().await;
    for (path, body, field) in [
        ("/v1/baseimage", json!({"language": "python3"}), "name"),
        ("/v1/baseimage", json!({"name": "b"}), "language"),
        (
            "/v1/baseimage",
            json!({"name": "-b", "language": "python3"}),
            "name",
        ),
        (
            "/v1/baseimage",
            json!({"name": "b", "language": 3}),
            "language",
        ),
        ("/v1/image", json!({"name": "i"}), "baseImageName"),
        (
            "/v1/image",
            json!({"name": "i", "baseImageName": "nope"}),
            "baseImageName",
        ),
        ("/v1/image", json!({"baseImageName": "nope"}), "name"),
    ] {
        let reply = gw.post_json(path, &body).await;
        let message = reply.assert_error(400, "bad-request");
        assert!(
            message.starts_with(&format!("{field}:")),
            "{path} {body}: {message}"
        );
    }
    let unknown_base = gw
        .post_json("/v1/image", &json!({"name": "i", "baseImageName": "nope"}))
        .await
        .assert_error(400, "bad-request");
    assert!(
        unknown_base.contains("\"nope\" not found"),
        "{unknown_base}"
    );
    gw.get("/v1/image/nope")
        .await
        .assert_error(404, "not-found");
    gw.delete("/v1/image/nope")
        .await
        .assert_error(404, "not-found");
    assert_eq!(gw.get("/v1/image").await.json(), json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_is_ready_when_its_interpreter_is_found() {
    // `sh` stands for the python3 interpreter: it is on every machine's PATH.
    let gw = Gateway::start_with(&[("DISPATCH_RUNTIMES_PYTHON3", "sh")]).await;
    base(&gw, "py", "python3").await;
    let reply = image(&gw, "hello-py", "py").await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    let created = reply.json();
    assert_eq!(created["kind"], "Image");
    assert_eq!(created["baseImageName"], "py");
    assert_eq!(created["language"], "python3", "from the base image");
    assert_eq!(created["runtime"], "python3");
    assert_eq!(created["status"], "READY", "{created}");
    assert_eq!(created["reason"], json!([]));
    assert_eq!(
        created["runtimeDependencies"],
        json!({"manifest": "requests==2.31.0"})
    );
    assert_eq!(gw.get("/v1/image/hello-py").await.json(), created);
    assert_eq!(
        gw.get("/v1/image?tags=team=blue").await.json(),
        json!([created])
    );
    assert_eq!(gw.get("/v1/image?tags=team=red").await.json(), json!([]));
    image(&gw, "hello-py", "py")
        .await
        .assert_error(409, "conflict");

    // A base image in use cannot go; once its images are gone, it can.
    let message = gw
        .delete("/v1/baseimage/py")
        .await
        .assert_error(409, "conflict");
    assert!(
        message.contains("\"hello-py\""),
        "names the image: {message}"
    );
    let deleted = gw.delete("/v1/image/hello-py").await;
    assert_eq!(deleted.status, StatusCode::OK, "{}", deleted.text());
    assert_eq!(deleted.json()["status"], "DELETED");
    assert_eq!(gw.delete("/v1/baseimage/py").await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_is_error_when_its_interpreter_or_language_is_missing() {
    let gw = Gateway::start_with(&[("DISPATCH_RUNTIMES_NODEJS", "/nonexistent/bin/node")]).await;
    base(&gw, "node", "nodejs6").await;
    base(&gw, "java", "java").await;

    let created = image(&gw, "hello-js", "node").await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
    let created = created.json();
    assert_eq!(created["status"], "ERROR", "{created}");
    assert_eq!(created["runtime"], "nodejs", "nodejs6 runs on nodejs");
    let reason = created["reason"][0].as_str().unwrap();
    assert!(
        reason.contains("interpreter /nonexistent/bin/node not found"),
        "{reason}"
    );

    let created = image(&gw, "hello-java", "java").await.json();
    assert_eq!(created["status"], "ERROR", "{created}");
    let reason = created["reason"][0].as_str().unwrap();
    assert!(
        reason.contains("\"java\"") && reason.contains("not supported by the local driver"),
        "{reason}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_survive_a_restart_and_are_evaluated_again() {
    let mut gw = Gateway::start_with(&[("DISPATCH_RUNTIMES_PYTHON3", "sh")]).await;
    base(&gw, "py", "python3").await;
    assert_eq!(image(&gw, "i", "py").await.json()["status"], "READY");
    gw.restart().await;
    let got = gw.get("/v1/image/i").await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text());
    assert_eq!(got.json()["status"], "READY");
    assert_eq!(gw.get("/v1/baseimage/py").await.status, StatusCode::OK);
}
