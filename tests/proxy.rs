//! The OpenFaaS surface, `/function/{name}[/rest][?query]`: what a caller and an upstream
//! see through the gateway (paths, bodies, headers both ways), the gateway's own statuses
//! (404, 413, 502, 504), streaming of large bodies in bounded memory, and the upstream
//! connection pool (reuse, h2c multiplexing).

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

fn upstream_headers(seen: &Value) -> &serde_json::Map<String, Value> {
    seen["headers"].as_object().expect("headers object")
}

fn one_header<'a>(seen: &'a Value, name: &str) -> Option<&'a str> {
    let values = seen["headers"][name].as_array()?;
    assert_eq!(values.len(), 1, "{name} sent once: {values:?}");
    values[0].as_str()
}

fn is_traceparent(tp: &str) -> bool {
    let parts: Vec<&str> = tp.split('-').collect();
    parts.len() == 4
        && parts[0] == "00"
        && parts[1].len() == 32
        && parts[2].len() == 16
        && parts[3].len() == 2
        && parts[1..]
            .iter()
            .all(|p| p.chars().all(|c| c.is_ascii_hexdigit()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_path_query_and_body_reach_the_upstream() {
    let up = Upstream::start(Behavior::Echo).await;
    let gw = Gateway::start().await;
    gw.register(&function("echo", &[up.addr], json!({}))).await;

    let reply = request(
        gw.addr,
        Method::POST,
        "/function/echo/a/b?x=1&y=two",
        &[("content-type", "text/plain")],
        Bytes::from_static(b"hello body"),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let seen = reply.json();
    assert_eq!(seen["method"], "POST");
    assert_eq!(seen["path"], "/a/b");
    assert_eq!(seen["query"], "x=1&y=two");
    assert_eq!(seen["body"], "hello body");
    assert_eq!(one_header(&seen, "content-type"), Some("text/plain"));

    for (method, path, want_path, want_query) in [
        (Method::GET, "/function/echo", "/", Value::Null),
        (Method::PUT, "/function/echo?q=1", "/", json!("q=1")),
        (Method::DELETE, "/function/echo/x/", "/x/", Value::Null),
        (
            Method::PATCH,
            "/function/echo/p?a=b&a=c",
            "/p",
            json!("a=b&a=c"),
        ),
    ] {
        let reply = request(gw.addr, method.clone(), path, &[], Bytes::new()).await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "{method} {path}: {}",
            reply.text()
        );
        let seen = reply.json();
        assert_eq!(seen["method"], method.as_str(), "{path}");
        assert_eq!(seen["path"], want_path, "{path}");
        assert_eq!(seen["query"], want_query, "{path}");
    }
    assert_eq!(up.stats.requests(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_are_rewritten_both_ways() {
    let up = Upstream::start(Behavior::Echo).await;
    let gw = Gateway::start().await;
    gw.register(&function("echo", &[up.addr], json!({}))).await;

    let reply = request(
        gw.addr,
        Method::POST,
        "/function/echo",
        &[
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "for the next hop only"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic c2VjcmV0"),
            ("x-custom", "kept"),
            ("authorization", "Bearer token-for-the-function"),
            ("x-echo-hop", "1"),
            ("x-multi", "one"),
            ("x-multi", "two"),
        ],
        Bytes::from_static(b"{}"),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());

    // What the upstream got.
    let seen = reply.json();
    let headers = upstream_headers(&seen);
    for gone in ["x-hop", "keep-alive", "proxy-authorization", "connection"] {
        assert!(
            !headers.contains_key(gone),
            "{gone} reached the upstream: {seen}"
        );
    }
    assert_eq!(one_header(&seen, "x-custom"), Some("kept"));
    assert_eq!(seen["headers"]["x-multi"], json!(["one", "two"]));
    assert_eq!(
        one_header(&seen, "authorization"),
        Some("Bearer token-for-the-function")
    );
    assert_eq!(one_header(&seen, "x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(
        one_header(&seen, "x-forwarded-host"),
        Some(gw.addr.to_string().as_str())
    );
    assert_eq!(
        one_header(&seen, "host"),
        Some(up.addr.to_string().as_str())
    );
    let call_id = one_header(&seen, "x-call-id").expect("x-call-id upstream");
    assert_eq!(call_id.len(), 36, "a uuid: {call_id}");
    let tp = one_header(&seen, "traceparent").expect("traceparent upstream");
    assert!(is_traceparent(tp), "{tp}");

    // What the caller got.
    assert_eq!(reply.header("x-up"), Some("1"));
    let cookies: Vec<&str> = reply
        .headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(cookies, ["a=1", "b=2"]);
    for gone in ["x-up-hop", "keep-alive", "proxy-authenticate", "connection"] {
        assert!(
            reply.header(gone).is_none(),
            "{gone} reached the caller: {:?}",
            reply.headers
        );
    }
    assert_eq!(reply.header("x-call-id"), Some(call_id));
    let start: u128 = reply
        .header("x-start-time")
        .expect("X-Start-Time")
        .parse()
        .expect("X-Start-Time is a number");
    assert!(start > 1_600_000_000 * 1_000_000_000, "unix nanos: {start}");
    let duration: f64 = reply
        .header("x-duration-seconds")
        .expect("X-Duration-Seconds")
        .parse()
        .expect("X-Duration-Seconds is a number");
    assert!(duration >= 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_call_id_trace_and_forwarded_for_are_kept() {
    let up = Upstream::start(Behavior::Echo).await;
    let gw = Gateway::start().await;
    gw.register(&function("echo", &[up.addr], json!({}))).await;
    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let reply = request(
        gw.addr,
        Method::GET,
        "/function/echo",
        &[
            ("x-call-id", "my-call-42"),
            ("traceparent", tp),
            ("x-forwarded-for", "10.1.2.3"),
            ("x-forwarded-host", "app.example.com"),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let seen = reply.json();
    assert_eq!(one_header(&seen, "x-call-id"), Some("my-call-42"));
    assert_eq!(one_header(&seen, "traceparent"), Some(tp));
    assert_eq!(
        one_header(&seen, "x-forwarded-for"),
        Some("10.1.2.3, 127.0.0.1")
    );
    assert_eq!(
        one_header(&seen, "x-forwarded-host"),
        Some("app.example.com")
    );
    assert_eq!(reply.header("x-call-id"), Some("my-call-42"));

    // Two calls without ids get two different ones, and two different traces.
    let a = request(gw.addr, Method::GET, "/function/echo", &[], Bytes::new()).await;
    let b = request(gw.addr, Method::GET, "/function/echo", &[], Bytes::new()).await;
    assert_ne!(a.header("x-call-id"), b.header("x-call-id"));
    assert_ne!(
        one_header(&a.json(), "traceparent"),
        one_header(&b.json(), "traceparent")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_function_is_404() {
    let gw = Gateway::start().await;
    let reply = request(gw.addr, Method::POST, "/function/nope/x", &[], Bytes::new()).await;
    let message = reply.assert_error(404, "not-found");
    assert!(message.contains("\"nope\""), "{message}");
    assert!(
        reply.header("x-call-id").is_some(),
        "errors carry the call id too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_502_naming_function_and_endpoint() {
    let dead = free_addr();
    let gw = Gateway::start().await;
    gw.register(&function("gone", &[dead], json!({}))).await;
    let reply = request(gw.addr, Method::GET, "/function/gone", &[], Bytes::new()).await;
    let message = reply.assert_error(502, "upstream-unavailable");
    assert!(message.contains("\"gone\""), "{message}");
    assert!(message.contains(&dead.to_string()), "{message}");
    let m = gw.metrics().await;
    assert_eq!(
        m.value(
            "gateway_function_invocation_total",
            &[("function_name", "gone"), ("code", "502")]
        ),
        1.0,
        "{}",
        m.text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_closing_or_resetting_the_connection_is_502_and_not_retried() {
    for behavior in [Behavior::CloseWithoutAnswer, Behavior::ResetWithoutAnswer] {
        let up = Upstream::start(behavior).await;
        let gw = Gateway::start().await;
        gw.register(&function("rude", &[up.addr], json!({}))).await;
        let reply = request(
            gw.addr,
            Method::POST,
            "/function/rude",
            &[],
            Bytes::from_static(b"payload"),
        )
        .await;
        let message = reply.assert_error(502, "upstream-unavailable");
        assert!(message.contains("\"rude\""), "{message}");
        assert!(message.contains(&up.addr.to_string()), "{message}");
        // The request reached the function: it must not be sent again.
        assert_eq!(up.stats.requests(), 1, "the upstream saw the request once");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_500_is_passed_through_as_the_functions_answer() {
    let up = Upstream::start(Behavior::Fail500).await;
    let gw = Gateway::start().await;
    gw.register(&function("fails", &[up.addr], json!({}))).await;
    let reply = request(gw.addr, Method::GET, "/function/fails", &[], Bytes::new()).await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(reply.text(), "upstream failed");
    assert!(
        reply.header("x-dispatch-error").is_none(),
        "a function's own 5xx is not a gateway error"
    );
    assert!(reply.header("x-call-id").is_some());
    let m = gw.metrics().await;
    assert_eq!(
        m.value(
            "gateway_function_invocation_total",
            &[("function_name", "fails"), ("code", "500")]
        ),
        1.0,
        "{}",
        m.text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passed_deadline_is_504_and_the_upstream_request_is_dropped() {
    let up = Upstream::start(Behavior::Slow(Duration::from_secs(20))).await;
    let gw = Gateway::start().await;
    gw.register(&function("sleepy", &[up.addr], json!({"timeout": 300})))
        .await;
    let reply = request(gw.addr, Method::GET, "/function/sleepy", &[], Bytes::new()).await;
    let message = reply.assert_error(504, "upstream-timeout");
    assert!(message.contains("\"sleepy\""), "{message}");
    assert!(message.contains("300"), "{message}");
    eventually(
        Duration::from_secs(10),
        "the upstream request dropped",
        || up.stats.dropped() == 1,
    )
    .await;
    assert_eq!(up.stats.completed(), 0);
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
    assert_eq!(
        m.value("dispatch_function_inflight", &[("function_name", "sleepy")]),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_body_over_the_configured_limit_is_413() {
    let up = Upstream::start(Behavior::Echo).await;
    let gw = Gateway::start_with(&[("DISPATCH_LIMITS_RAW_BODY_BYTES", "1024")]).await;
    gw.register(&function("small", &[up.addr], json!({}))).await;

    // Declared too large: refused before the upstream hears of it.
    let big = Bytes::from(vec![b'a'; 2000]);
    let reply = request(gw.addr, Method::POST, "/function/small", &[], big).await;
    let message = reply.assert_error(413, "payload-too-large");
    assert!(message.contains("1024"), "{message}");
    assert_eq!(up.stats.requests(), 0);

    // Streamed (chunked, no length) past the limit: cut off on the way.
    let req = Request::post("/function/small")
        .body(Repeat::new(4 * 512, 512, false))
        .unwrap();
    let resp = send(gw.addr, req).await.expect("an answer, not a reset");
    let reply = read_reply(resp).await;
    reply.assert_error(413, "payload-too-large");

    // Within the limit: through.
    let ok = Bytes::from(vec![b'a'; 1000]);
    let reply = request(gw.addr, Method::POST, "/function/small", &[], ok).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["bodyLen"], 1000);

    let m = gw.metrics().await;
    assert_eq!(
        m.value(
            "dispatch_rejections_total",
            &[("function_name", "small"), ("reason", "body_too_large")]
        ),
        2.0,
        "{}",
        m.text
    );
}

/// How much the gateway's peak memory (VmHWM) may grow while it moves a 50 MiB body: well
/// under the body's size, so a gateway that holds the body (or lets it pile up) fails.
/// Measured against the peak after start-up rather than as an absolute figure, so the
/// choice of allocator and the runtime's threads do not move the bar.
const GROWTH_LIMIT: u64 = 25 * MIB;

fn assert_bounded(gw: &Gateway, base: u64, what: &str) {
    let peak = gw.peak_rss();
    let growth = peak.saturating_sub(base);
    assert!(
        growth < GROWTH_LIMIT,
        "gateway peak RSS grew by {} MiB (from {} to {} MiB) during {what}",
        growth / MIB,
        base / MIB,
        peak / MIB
    );
}

async fn upload_50_mib(exact_length: bool) {
    let up = Upstream::start(Behavior::CountBytes).await;
    let gw = Gateway::start().await;
    gw.register(&function("sink", &[up.addr], json!({}))).await;
    let base = gw.peak_rss();
    let len = 50 * MIB;
    let mut req = Request::post("/function/sink");
    if exact_length {
        req = req.header("content-length", len.to_string());
    }
    let req = req.body(Repeat::new(len, 64 * 1024, exact_length)).unwrap();
    let reply = read_reply(send(gw.addr, req).await.expect("answer")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["bytes"], len);
    assert_eq!(
        up.stats
            .bytes_received
            .load(std::sync::atomic::Ordering::SeqCst),
        len
    );
    assert_bounded(&gw, base, "a 50 MiB upload");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_50_mib_request_body_streams_through_in_bounded_memory() {
    upload_50_mib(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_50_mib_chunked_request_body_streams_through_in_bounded_memory() {
    upload_50_mib(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_50_mib_response_body_streams_back_in_bounded_memory() {
    let len = 50 * MIB;
    let up = Upstream::start(Behavior::Produce(len)).await;
    let gw = Gateway::start().await;
    gw.register(&function("source", &[up.addr], json!({})))
        .await;
    let base = gw.peak_rss();
    let req = Request::get("/function/source")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = send(gw.addr, req).await.expect("answer");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()["content-length"],
        len.to_string().as_str(),
        "the length is passed on"
    );
    let mut body = resp.into_body();
    let mut got = 0u64;
    let mut frames = 0u64;
    let read = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.expect("body frame");
            if let Some(data) = frame.data_ref() {
                got += data.len() as u64;
            }
            frames += 1;
            // A slow reader now and then: a gateway that does not apply backpressure
            // would pile the body up in memory meanwhile.
            if frames % 200 == 1 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    tokio::time::timeout(PATIENCE, read)
        .await
        .expect("the body within the patience");
    assert_eq!(got, len);
    assert_bounded(&gw, base, "a 50 MiB download");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_calls_reuse_a_handful_of_upstream_connections() {
    let up = Upstream::start(Behavior::Echo).await;
    let gw = Gateway::start().await;
    gw.register(&function("echo", &[up.addr], json!({}))).await;
    let mut conn = Connection::open(gw.addr).await;
    for i in 0..1000 {
        let reply = conn
            .request(Method::POST, "/function/echo", Bytes::from(format!("{i}")))
            .await;
        assert_eq!(reply.status, StatusCode::OK, "call {i}: {}", reply.text());
        assert_eq!(reply.json()["body"], i.to_string());
    }
    assert_eq!(up.stats.requests(), 1000);
    let opened = up.stats.connections();
    assert!(
        opened <= 4,
        "1000 sequential calls opened {opened} upstream connections"
    );
    let m = gw.metrics().await;
    let endpoint = up.url();
    assert_eq!(
        m.get(
            "dispatch_upstream_connections_opened_total",
            &[("endpoint", &endpoint)]
        ),
        Some(opened as f64),
        "{}",
        m.text
    );
    let idle = m
        .get(
            "dispatch_upstream_pool_idle_connections",
            &[("endpoint", &endpoint)],
        )
        .expect("idle connections gauge");
    assert!((1.0..=4.0).contains(&idle), "idle connections: {idle}");
    assert_eq!(
        m.value(
            "gateway_function_invocation_total",
            &[("function_name", "echo"), ("code", "200")]
        ),
        1000.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_calls_with_openfaas_names() {
    let a = Upstream::start(Behavior::Echo).await;
    let b = Upstream::start(Behavior::Echo).await;
    let gw = Gateway::start().await;
    gw.register(&function("counted", &[a.addr, b.addr], json!({})))
        .await;
    for _ in 0..3 {
        let reply = request(gw.addr, Method::GET, "/function/counted", &[], Bytes::new()).await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    let reply = gw.get("/metrics").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(
        reply
            .header("content-type")
            .is_some_and(|t| t.starts_with("text/plain")),
        "{:?}",
        reply.headers
    );
    let m = Metrics::parse(&reply.text());
    let f = [("function_name", "counted")];
    let ok = [("function_name", "counted"), ("code", "200")];
    assert_eq!(m.get("gateway_function_invocation_total", &ok), Some(3.0));
    assert_eq!(m.get("gateway_functions_seconds_count", &ok), Some(3.0));
    assert_eq!(m.get("gateway_function_invocation_started", &f), Some(3.0));
    assert_eq!(m.get("gateway_service_count", &f), Some(2.0));
    assert_eq!(m.get("dispatch_function_inflight", &f), Some(0.0));
    let opened = m.value(
        "dispatch_upstream_connections_opened_total",
        &[("endpoint", &a.url())],
    ) + m.value(
        "dispatch_upstream_connections_opened_total",
        &[("endpoint", &b.url())],
    );
    assert_eq!(
        opened as usize,
        a.stats.connections() + b.stats.connections(),
        "{}",
        m.text
    );
    assert!(
        m.text
            .contains("# TYPE gateway_functions_seconds histogram")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_upstream_carries_concurrent_calls_on_one_connection() {
    let up = Upstream::start_h2(Behavior::Slow(Duration::from_millis(200))).await;
    let gw = Gateway::start().await;
    gw.register(&function(
        "h2",
        &[up.addr],
        json!({"upstream": {"http2": true}}),
    ))
    .await;
    // One call first: the connection exists before the burst.
    let reply = request(gw.addr, Method::GET, "/function/h2", &[], Bytes::new()).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let burst = concurrent_calls(gw.addr, "/function/h2", 40).await;
    assert!(burst.iter().all(|s| *s == StatusCode::OK), "{burst:?}");
    assert!(
        up.stats.max_inflight() > 1,
        "the calls overlapped on the upstream"
    );
    assert_eq!(up.stats.connections(), 1, "one multiplexed connection");
    let m = gw.metrics().await;
    assert_eq!(
        m.get(
            "dispatch_upstream_connections_opened_total",
            &[("endpoint", &up.url())]
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_upstream_opens_one_connection_for_a_cold_burst() {
    let up = Upstream::start_h2(Behavior::Slow(Duration::from_millis(200))).await;
    let gw = Gateway::start().await;
    gw.register(&function(
        "h2",
        &[up.addr],
        json!({"upstream": {"http2": true}}),
    ))
    .await;
    let burst = concurrent_calls(gw.addr, "/function/h2", 40).await;
    assert!(burst.iter().all(|s| *s == StatusCode::OK), "{burst:?}");
    assert_eq!(
        up.stats.connections(),
        1,
        "40 concurrent first calls to an h2c endpoint should share one connection"
    );
}

/// `n` calls at once, each on its own client connection; their statuses.
async fn concurrent_calls(addr: std::net::SocketAddr, path: &str, n: usize) -> Vec<StatusCode> {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let path = path.to_string();
        tasks.spawn(async move {
            request(addr, Method::GET, &path, &[], Bytes::new())
                .await
                .status
        });
    }
    tasks.join_all().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_answers_also_give_their_connection_back() {
    let up = Upstream::start(Behavior::ProduceChunked(100 * 1024)).await;
    let gw = Gateway::start().await;
    gw.register(&function("chunky", &[up.addr], json!({})))
        .await;
    let mut conn = Connection::open(gw.addr).await;
    for i in 0..200 {
        let reply = conn
            .request(Method::GET, "/function/chunky", Bytes::new())
            .await;
        assert_eq!(reply.status, StatusCode::OK, "call {i}");
        assert_eq!(reply.body.len(), 100 * 1024, "call {i}");
    }
    let opened = up.stats.connections();
    assert!(
        opened <= 4,
        "200 sequential chunked answers opened {opened} upstream connections"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_closing_after_each_answer_still_gets_every_call() {
    let up = Upstream::start(Behavior::Echo).await;
    let gw = Gateway::start().await;
    gw.register(&function("closer", &[up.addr], json!({})))
        .await;
    let mut conn = Connection::open(gw.addr).await;
    for i in 0..50 {
        let req = Request::post("/function/closer")
            .header("host", gw.addr.to_string())
            .header("x-echo-close", "1")
            .body(Full::new(Bytes::from(format!("{i}"))))
            .unwrap();
        let reply = read_reply(send(gw.addr, req).await.expect("answer")).await;
        assert_eq!(reply.status, StatusCode::OK, "call {i}: {}", reply.text());
        assert_eq!(reply.json()["body"], i.to_string());
        // And interleaved, calls that keep their connection.
        let reply = conn
            .request(Method::GET, "/function/closer", Bytes::new())
            .await;
        assert_eq!(reply.status, StatusCode::OK, "call {i}: {}", reply.text());
    }
    assert_eq!(up.stats.requests(), 100);
    assert!(
        up.stats.connections() >= 50,
        "the upstream closed its connection after each `Connection: close` answer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deadline_also_cuts_an_answer_that_stalls_mid_body() {
    let up = Upstream::start(Behavior::StallBody).await;
    let gw = Gateway::start().await;
    gw.register(&function("stalls", &[up.addr], json!({"timeout": 300})))
        .await;
    let req = Request::get("/function/stalls")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = send(gw.addr, req).await.expect("the head arrives");
    assert_eq!(resp.status(), StatusCode::OK);
    let body = tokio::time::timeout(PATIENCE, resp.into_body().collect())
        .await
        .expect("the body ends within the patience: the deadline cuts it");
    assert!(body.is_err(), "a cut answer is not a complete one");
    let m = gw.metrics().await;
    assert_eq!(
        m.get("dispatch_function_inflight", &[("function_name", "stalls")]),
        Some(0.0),
        "{}",
        m.text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_path_prefix_comes_before_the_callers_path() {
    let up = Upstream::start(Behavior::Echo).await;
    let gw = Gateway::start().await;
    let mut spec = function("prefixed", &[], json!({}));
    spec["upstream"]["endpoints"] = json!([format!("{}/base/fn", up.url())]);
    gw.register(&spec).await;
    let reply = request(
        gw.addr,
        Method::GET,
        "/function/prefixed/x?q=1",
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["path"], "/base/fn/x");
    assert_eq!(reply.json()["query"], "q=1");
    let reply = request(
        gw.addr,
        Method::GET,
        "/function/prefixed",
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(reply.json()["path"], "/base/fn");
    let reply = request(
        gw.addr,
        Method::GET,
        "/function/prefixed?q=2",
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(reply.json()["path"], "/base/fn");
    assert_eq!(reply.json()["query"], "q=2");

    // Without a prefix, a call with a query and no path still sends a path of "/".
    let mut bare = function("bare", &[up.addr], json!({}));
    bare["upstream"]["protocol"] = json!("raw");
    gw.register(&bare).await;
    let reply = request(
        gw.addr,
        Method::GET,
        "/function/bare?q=3",
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(reply.json()["path"], "/");
    assert_eq!(reply.json()["query"], "q=3");
}

/// Registers `name` on `up`, makes a call so the pool keeps one idle connection, and
/// checks the gauge says so.
async fn one_idle_connection(gw: &Gateway, name: &str, up: &Upstream) {
    gw.register(&function(name, &[up.addr], json!({}))).await;
    let path = format!("/function/{name}");
    let reply = request(gw.addr, Method::GET, &path, &[], Bytes::new()).await;
    assert_eq!(reply.status, StatusCode::OK);
    let idle = gw.metrics().await.get(
        "dispatch_upstream_pool_idle_connections",
        &[("endpoint", &up.url())],
    );
    assert_eq!(idle, Some(1.0));
    assert_eq!(up.stats.open(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moving_a_function_off_an_endpoint_closes_its_idle_connections() {
    let old = Upstream::start(Behavior::Echo).await;
    let new = Upstream::start(Behavior::Echo).await;
    let gw = Gateway::start().await;
    one_idle_connection(&gw, "moving", &old).await;
    let reply = gw
        .put_json(
            "/v1/function/moving",
            &function("moving", &[new.addr], json!({})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    eventually(
        Duration::from_secs(5),
        "the old endpoint's idle connection closed after the PUT",
        || old.stats.open() == 0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_function_closes_its_idle_connections() {
    let up = Upstream::start(Behavior::Echo).await;
    let gw = Gateway::start().await;
    one_idle_connection(&gw, "doomed", &up).await;
    let reply = gw.delete("/v1/function/doomed").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    eventually(
        Duration::from_secs(5),
        "the deleted function's idle connection closed",
        || up.stats.open() == 0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idle_gauge_drops_when_a_pool_is_closed() {
    let old = Upstream::start(Behavior::Echo).await;
    let new = Upstream::start(Behavior::Echo).await;
    let gw = Gateway::start().await;
    one_idle_connection(&gw, "moving", &old).await;
    gw.put_json(
        "/v1/function/moving",
        &function("moving", &[new.addr], json!({})),
    )
    .await;
    // Another registry change, so the unused pool is closed whatever the PUT left behind.
    gw.register(&function("bystander", &[new.addr], json!({})))
        .await;
    eventually(
        PATIENCE,
        "the old endpoint's idle connection closed",
        || old.stats.open() == 0,
    )
    .await;
    let m = gw.metrics().await;
    let idle = m.value(
        "dispatch_upstream_pool_idle_connections",
        &[("endpoint", &old.url())],
    );
    assert_eq!(
        idle, 0.0,
        "the gauge still counts the closed pool's connections\n{}",
        m.text
    );
}
