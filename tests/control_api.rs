//! The control API for functions (`/v1/function`), as Dispatch v0.1.24 clients use it:
//! 201 on create, 409 on a duplicate, 400 naming the bad field, 404 for unknown names,
//! tag filters, PUT and DELETE taking effect on the next call; plus the operator
//! endpoints `/healthz`, `/readyz` and `/metrics`.

mod common;

use bytes::Bytes;
use common::*;
use http::{Method, StatusCode};
use serde_json::{Value, json};

async fn call(gw: &Gateway, name: &str) -> Reply {
    request(
        gw.addr,
        Method::GET,
        &format!("/function/{name}"),
        &[],
        Bytes::new(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_answers_201_with_the_function() {
    let up = Upstream::start(Behavior::Echo).await;
    let gw = Gateway::start().await;
    let spec = function(
        "hello",
        &[up.addr],
        json!({
            "timeout": 5000,
            "maxInflight": 4,
            "maxQueue": 2,
            "source": "H4sIAAAAAAAA",
            "tags": [{"key": "team", "value": "blue"}],
        }),
    );
    let reply = gw.post_json("/v1/function", &spec).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    let created = reply.json();
    assert_eq!(created["name"], "hello");
    assert_eq!(created["kind"], "Function");
    assert_eq!(created["status"], "READY");
    assert_eq!(created["timeout"], 5000);
    assert_eq!(created["maxInflight"], 4);
    assert_eq!(created["maxQueue"], 2);
    assert_eq!(created["tags"], json!([{"key": "team", "value": "blue"}]));
    assert_eq!(created["upstream"]["endpoints"], json!([up.url()]));
    assert_eq!(created["upstream"]["protocol"], "raw");
    assert!(created.get("source").is_none(), "the source is never shown");
    assert_eq!(created["id"].as_str().map(str::len), Some(36), "{created}");
    assert!(created["createdTime"].as_i64().unwrap() > 1_600_000_000);

    let got = gw.get("/v1/function/hello").await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.json(), created);

    let reply = call(&gw, "hello").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let m = gw.metrics().await;
    assert_eq!(
        m.get("gateway_service_count", &[("function_name", "hello")]),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_name_is_409() {
    let up = Upstream::start(Behavior::Echo).await;
    let other = Upstream::start(Behavior::Echo).await;
    let gw = Gateway::start().await;
    gw.register(&function("hello", &[up.addr], json!({}))).await;
    let reply = gw
        .post_json("/v1/function", &function("hello", &[other.addr], json!({})))
        .await;
    let message = reply.assert_error(409, "conflict");
    assert!(message.contains("\"hello\""), "{message}");
    // The first registration stands.
    call(&gw, "hello").await;
    assert_eq!((up.stats.requests(), other.stats.requests()), (1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_body_is_400_naming_the_field() {
    let gw = Gateway::start().await;
    let ok = function("f", &["127.0.0.1:9".parse().unwrap()], json!({}));
    let cases: Vec<(Value, &str)> = vec![
        (
            {
                let mut s = ok.clone();
                merge(&mut s, json!({"maxInFlight": 3}));
                s
            },
            "maxInFlight",
        ),
        (
            function("f", &[], json!({"upstream": {"endpoints": ["ftp://x:1"]}})),
            "upstream.endpoints[0]",
        ),
        (
            function(
                "f",
                &[],
                json!({"upstream": {"endpoints": ["http://127.0.0.1:9", "not a url"]}}),
            ),
            "upstream.endpoints[1]",
        ),
        (
            function(
                "f",
                &[],
                json!({"upstream": {"endpoints": ["https://example.com"]}}),
            ),
            "https",
        ),
        (function("f", &[], json!({})), "upstream.endpoints"),
        (json!({"name": "f"}), "upstream"),
        (
            function("bad name", &["127.0.0.1:9".parse().unwrap()], json!({})),
            "name",
        ),
        (
            {
                let mut s = ok.clone();
                merge(&mut s, json!({"upstream": {"color": "red"}}));
                s
            },
            "color",
        ),
    ];
    for (body, names) in cases {
        let reply = gw.post_json("/v1/function", &body).await;
        let message = reply.assert_error(400, "bad-request");
        assert!(message.contains(names), "{body} -> {message}");
    }
    let reply = request(
        gw.addr,
        Method::POST,
        "/v1/function",
        &[("content-type", "application/json")],
        Bytes::from_static(b"{\"name\": "),
    )
    .await;
    reply.assert_error(400, "bad-request");
    let reply = request(gw.addr, Method::POST, "/v1/function", &[], Bytes::new()).await;
    reply.assert_error(400, "bad-request");
    // Nothing was stored.
    assert_eq!(gw.get("/v1/function").await.json(), json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrongly_typed_value_is_400_naming_its_field() {
    let gw = Gateway::start().await;
    let ok = function("f", &["127.0.0.1:9".parse().unwrap()], json!({}));
    for (extra, field) in [
        (json!({"timeout": "soon"}), "timeout"),
        (json!({"maxInflight": -1}), "maxInflight"),
        (json!({"tags": "team=blue"}), "tags"),
        (json!({"upstream": {"http2": "yes"}}), "upstream.http2"),
    ] {
        let mut body = ok.clone();
        merge(&mut body, extra);
        let message = gw
            .post_json("/v1/function", &body)
            .await
            .assert_error(400, "bad-request");
        assert!(message.contains(field), "{body} -> {message}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_filters_by_tags() {
    let up = Upstream::start(Behavior::Echo).await;
    let gw = Gateway::start().await;
    let tagged = |name: &str, tags: Value| function(name, &[up.addr], json!({"tags": tags}));
    gw.register(&tagged(
        "a",
        json!([{"key": "team", "value": "blue"}, {"key": "tier", "value": "1"}]),
    ))
    .await;
    gw.register(&tagged("b", json!([{"key": "team", "value": "red"}])))
        .await;
    gw.register(&tagged("c", json!([]))).await;

    let names = |reply: Reply| -> Vec<String> {
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        reply
            .json()
            .as_array()
            .expect("a list")
            .iter()
            .map(|f| f["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names(gw.get("/v1/function").await), ["a", "b", "c"]);
    assert_eq!(names(gw.get("/v1/function?tags=team=blue").await), ["a"]);
    assert_eq!(names(gw.get("/v1/function?tags=team").await), ["a", "b"]);
    assert_eq!(
        names(gw.get("/v1/function?tags=team=blue&tags=tier=1").await),
        ["a"]
    );
    assert!(names(gw.get("/v1/function?tags=team=blue&tags=tier=2").await).is_empty());
    assert!(names(gw.get("/v1/function?tags=team=green").await).is_empty());
    let listed = gw.get("/v1/function").await.json();
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f.get("source").is_none()),
        "{listed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_names_are_404_on_get_put_and_delete() {
    let gw = Gateway::start().await;
    let message = gw
        .get("/v1/function/ghost")
        .await
        .assert_error(404, "not-found");
    assert!(message.contains("\"ghost\""), "{message}");
    gw.put_json(
        "/v1/function/ghost",
        &function("ghost", &["127.0.0.1:9".parse().unwrap()], json!({})),
    )
    .await
    .assert_error(404, "not-found");
    gw.delete("/v1/function/ghost")
        .await
        .assert_error(404, "not-found");
    // Nothing was created by the PUT.
    gw.get("/v1/function/ghost")
        .await
        .assert_error(404, "not-found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_changes_the_endpoints_at_once() {
    let old = Upstream::start(Behavior::Echo).await;
    let new = Upstream::start(Behavior::Echo).await;
    let gw = Gateway::start().await;
    let created = gw
        .register(&function("moving", &[old.addr], json!({})))
        .await;
    // A keep-alive caller, so the next call reuses everything it can.
    let mut conn = Connection::open(gw.addr).await;
    let reply = conn
        .request(Method::GET, "/function/moving", Bytes::new())
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(old.stats.requests(), 1);

    let reply = gw
        .put_json(
            "/v1/function/moving",
            &function("moving", &[new.addr], json!({"timeout": 1234})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let updated = reply.json();
    assert_eq!(updated["upstream"]["endpoints"], json!([new.url()]));
    assert_eq!(updated["id"], created["id"], "the id is kept");
    assert_eq!(updated["createdTime"], created["createdTime"]);
    assert_eq!(updated["timeout"], 1234);

    for _ in 0..5 {
        let reply = conn
            .request(Method::GET, "/function/moving", Bytes::new())
            .await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    assert_eq!(old.stats.requests(), 1, "no call went to the old endpoint");
    assert_eq!(new.stats.requests(), 5);
    assert_eq!(gw.get("/v1/function/moving").await.json(), updated);

    // Renaming through PUT is refused.
    let message = gw
        .put_json(
            "/v1/function/moving",
            &function("other", &[new.addr], json!({})),
        )
        .await
        .assert_error(400, "bad-request");
    assert!(message.contains("name"), "{message}");
    // A bad body is refused and the function stays as it was.
    gw.put_json(
        "/v1/function/moving",
        &function("moving", &[], json!({"upstream": {"endpoints": ["nope"]}})),
    )
    .await
    .assert_error(400, "bad-request");
    assert_eq!(gw.get("/v1/function/moving").await.json(), updated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_then_call_is_404() {
    let up = Upstream::start(Behavior::Echo).await;
    let gw = Gateway::start().await;
    gw.register(&function("short-lived", &[up.addr], json!({})))
        .await;
    assert_eq!(call(&gw, "short-lived").await.status, StatusCode::OK);
    let reply = gw.delete("/v1/function/short-lived").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["name"], "short-lived");
    call(&gw, "short-lived")
        .await
        .assert_error(404, "not-found");
    gw.run("short-lived", json!({}))
        .await
        .assert_error(404, "not-found");
    gw.get("/v1/function/short-lived")
        .await
        .assert_error(404, "not-found");
    gw.delete("/v1/function/short-lived")
        .await
        .assert_error(404, "not-found");
    assert_eq!(gw.get("/v1/function").await.json(), json!([]));
    assert_eq!(up.stats.requests(), 1);
    // The name is free again.
    gw.register(&function("short-lived", &[up.addr], json!({})))
        .await;
    assert_eq!(call(&gw, "short-lived").await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics_answer() {
    let up = Upstream::start(Behavior::Echo).await;
    let gw = Gateway::start().await;
    let reply = gw.get("/healthz").await;
    assert_eq!(reply.status, StatusCode::OK);

    gw.register(&function("one", &[up.addr], json!({}))).await;
    let reply = gw.get("/readyz").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let ready = reply.json();
    assert_eq!(ready["ready"], true, "{ready}");
    assert_eq!(ready["functions"], 1, "{ready}");

    let reply = gw.get("/metrics").await;
    assert_eq!(reply.status, StatusCode::OK);
    let m = Metrics::parse(&reply.text());
    assert_eq!(
        m.get("gateway_service_count", &[("function_name", "one")]),
        Some(1.0),
        "{}",
        m.text
    );

    gw.get("/no/such/path").await.assert_error(404, "not-found");
    request(gw.addr, Method::PATCH, "/v1/function", &[], Bytes::new())
        .await
        .assert_error(405, "method-not-allowed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_of_one_name_give_one_201() {
    let up = Upstream::start(Behavior::Echo).await;
    let gw = Gateway::start().await;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let addr = gw.addr;
        let body = Bytes::from(function("racy", &[up.addr], json!({})).to_string());
        tasks.spawn(async move {
            request(addr, Method::POST, "/v1/function", &[], body)
                .await
                .status
        });
    }
    let mut statuses = tasks.join_all().await;
    statuses.sort();
    assert_eq!(statuses[0], StatusCode::CREATED, "{statuses:?}");
    assert!(
        statuses[1..].iter().all(|s| *s == StatusCode::CONFLICT),
        "{statuses:?}"
    );
    assert_eq!(
        gw.get("/v1/function")
            .await
            .json()
            .as_array()
            .unwrap()
            .len(),
        1
    );
}
