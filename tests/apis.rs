//! API endpoints: `/v1/api` managed like Dispatch's API manager, and the ingress
//! listeners (plain HTTP and HTTPS by rustls) routing requests to functions, with a real
//! TLS client: matching by host, path and method, 404/405/415/426, inputs from JSON,
//! forms and queries, async calls, CORS, API keys, rate limits, TLS versions, certificate
//! reload under load, the control API over TLS, and two gateways on one PostgreSQL.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::pg::TestDatabase;
use common::tls::{TlsClient, Versions};
use common::*;
use http::Method;
use serde_json::{Value, json};

async fn with_function(gw: &Gateway, up: &Upstream) {
    gw.register(&function(
        "hello",
        &[up.addr],
        json!({"upstream": {"protocol": "dispatch"}}),
    ))
    .await;
}

async fn call(
    addr: std::net::SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    request(addr, method, path, headers, Bytes::from(body.to_string())).await
}

async fn get(addr: std::net::SocketAddr, path: &str, headers: &[(&str, &str)]) -> Reply {
    call(addr, Method::GET, path, headers, "").await
}

async fn post_json(addr: std::net::SocketAddr, path: &str, body: &str) -> Reply {
    call(
        addr,
        Method::POST,
        path,
        &[("content-type", "application/json")],
        body,
    )
    .await
}

fn self_signed_ca(gw: &Gateway) -> PathBuf {
    gw.data_dir().join("tls").join("api.crt")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apis_are_managed_and_route_requests_to_functions() {
    let gw = Gateway::start().await;
    let up = Upstream::start(Behavior::Envelope).await;
    with_function(&gw, &up).await;

    // Created with Dispatch's status code (200) and the defaults filled in.
    let made = gw
        .post_json(
            "/v1/api",
            &json!({"name": "post-hello", "function": "hello", "methods": ["post"], "uris": ["/hello"]}),
        )
        .await;
    assert_eq!(made.status, 200, "{}", made.text());
    let api = made.json();
    assert_eq!(api["kind"], "API");
    assert_eq!(api["status"], "READY");
    assert_eq!(api["methods"], json!(["POST"]));
    assert_eq!(api["protocols"], json!(["http", "https"]));
    assert_eq!(api["authentication"], "public");
    assert_eq!(api["enabled"], true);
    assert!(!api["id"].as_str().unwrap().is_empty());

    // Refusals, each naming the problem.
    let again = gw
        .post_json(
            "/v1/api",
            &json!({"name": "post-hello", "function": "hello"}),
        )
        .await;
    assert!(
        again
            .assert_error(409, "conflict")
            .contains("already exists")
    );
    let overlap = gw
        .post_json(
            "/v1/api",
            &json!({"name": "other", "function": "hello", "methods": ["POST", "PUT"], "uris": ["/hello/"]}),
        )
        .await;
    let why = overlap.assert_error(409, "conflict");
    assert!(why.contains("\"post-hello\""), "{why}");
    let bad = gw
        .post_json(
            "/v1/api",
            &json!({"name": "bad", "function": "hello", "uris": ["hello"]}),
        )
        .await;
    assert!(
        bad.assert_error(400, "bad-request")
            .starts_with("uris: \"hello\"")
    );
    let no_fn = gw
        .post_json("/v1/api", &json!({"name": "nofn", "function": "nope"}))
        .await;
    assert!(
        no_fn
            .assert_error(400, "bad-request")
            .contains("\"nope\" not found")
    );
    assert_eq!(gw.get("/v1/api/nope").await.status, 404);

    let listed = gw.get("/v1/api").await.json();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(
        gw.get("/v1/api/post-hello").await.json()["uris"],
        json!(["/hello"])
    );

    // A JSON call over plain HTTP: the output, and the request in httpContext.
    let reply = call(
        gw.api_http,
        Method::POST,
        "/hello?lang=en",
        &[("content-type", "application/json"), ("x-trace-me", "yes")],
        r#"{"name": "Jon"}"#,
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["greeting"], "Hello, Jon");
    let run_name = reply
        .header("x-dispatch-run")
        .expect("run header")
        .to_string();
    let context = up.stats.last_context();
    let http = &context["httpContext"];
    assert_eq!(http["method"], "POST");
    assert_eq!(http["path"], "/hello");
    assert_eq!(http["query"], "lang=en");
    assert_eq!(http["headers"]["x-trace-me"], "yes");
    assert_eq!(http["api"], "post-hello");
    let run = gw.get(&format!("/v1/runs/{run_name}")).await;
    assert_eq!(
        run.status,
        200,
        "the API call's run is recorded: {}",
        run.text()
    );
    assert_eq!(run.json()["input"], json!({"name": "Jon"}));

    // The same over HTTPS, trusting the self-signed certificate the gateway made.
    let tls = TlsClient::trusting(&self_signed_ca(&gw));
    let reply = tls
        .request(
            gw.api_https,
            Method::POST,
            "/hello",
            &[("content-type", "application/json")],
            r#"{"name": "Arya"}"#,
        )
        .await
        .expect("HTTPS call");
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["greeting"], "Hello, Arya");

    // Forms become objects; other types are 415; bad JSON is 400.
    let form = call(
        gw.api_http,
        Method::POST,
        "/hello",
        &[("content-type", "application/x-www-form-urlencoded")],
        "name=Sansa&tag=a&tag=b",
    )
    .await;
    assert_eq!(form.status, 200, "{}", form.text());
    assert_eq!(
        form.json()["input"],
        json!({"name": "Sansa", "tag": ["a", "b"]})
    );
    let text = call(
        gw.api_http,
        Method::POST,
        "/hello",
        &[("content-type", "text/plain")],
        "hi",
    )
    .await;
    assert!(
        text.assert_error(415, "unsupported-media-type")
            .contains("text/plain")
    );
    let broken = post_json(gw.api_http, "/hello", "{oops").await;
    assert!(
        broken
            .assert_error(400, "bad-request")
            .contains("not valid JSON")
    );

    // Wrong method: 405 with Allow. No API: 404 with the Dispatch error body.
    let wrong_method = get(gw.api_http, "/hello", &[]).await;
    assert!(
        wrong_method
            .assert_error(405, "method-not-allowed")
            .contains("GET")
    );
    assert_eq!(wrong_method.header("allow"), Some("POST"));
    let none = get(gw.api_http, "/nothing", &[]).await;
    assert!(none.assert_error(404, "not-found").contains("/nothing"));

    // A function error is 502 with the error; an input error of the function's own.
    let failed = post_json(gw.api_http, "/hello", r#"{"fail": true}"#).await;
    assert_eq!(failed.status, 502, "{}", failed.text());
    assert_eq!(failed.header("x-dispatch-error"), Some("function-error"));
    let body = failed.json();
    assert_eq!(body["code"], 502);
    assert_eq!(body["error"]["type"], "FunctionError");
    assert_eq!(body["error"]["message"], "input asked to fail");

    // X-Dispatch-Blocking: false is an async run: 202 with its name, then READY.
    let accepted = call(
        gw.api_http,
        Method::POST,
        "/hello",
        &[
            ("content-type", "application/json"),
            ("x-dispatch-blocking", "false"),
        ],
        r#"{"name": "Bran"}"#,
    )
    .await;
    assert_eq!(accepted.status, 202, "{}", accepted.text());
    let name = accepted.json()["name"].as_str().unwrap().to_string();
    let mut status = Value::Null;
    for _ in 0..200 {
        status = gw.get(&format!("/v1/runs/{name}")).await.json()["status"].clone();
        if status == "READY" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, "READY");

    // Changed at once: GET now, with the query as input.
    let put = gw
        .put_json(
            "/v1/api/post-hello",
            &json!({"function": "hello", "methods": ["GET", "POST"], "uris": ["/hello"]}),
        )
        .await;
    assert_eq!(put.status, 200, "{}", put.text());
    assert_eq!(put.json()["createdTime"], api["createdTime"]);
    let query = get(gw.api_http, "/hello?name=Rickon", &[]).await;
    assert_eq!(query.status, 200, "{}", query.text());
    assert_eq!(query.json()["greeting"], "Hello, Rickon");

    // The function goes: the API answers 502 naming it; the API goes: 404.
    assert_eq!(gw.delete("/v1/function/hello").await.status, 200);
    let orphan = get(gw.api_http, "/hello", &[]).await;
    let why = orphan.assert_error(502, "upstream-unavailable");
    assert!(why.contains("\"hello\""), "{why}");
    let deleted = gw.delete("/v1/api/post-hello").await;
    assert_eq!(deleted.status, 200);
    assert_eq!(deleted.json()["status"], "DELETED");
    assert_eq!(get(gw.api_http, "/hello", &[]).await.status, 404);
    assert_eq!(gw.get("/v1/api/post-hello").await.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_only_hosts_prefixes_and_cors() {
    let gw = Gateway::start().await;
    let up = Upstream::start(Behavior::Envelope).await;
    with_function(&gw, &up).await;
    for spec in [
        json!({"name": "pay", "function": "hello", "methods": ["POST"], "uris": ["/pay"], "protocols": ["https"]}),
        json!({"name": "exact", "function": "hello", "uris": ["/who"], "hosts": ["api.example.com"]}),
        json!({"name": "wild", "function": "hello", "uris": ["/who"], "hosts": ["*.example.com"]}),
        json!({"name": "docs", "function": "hello", "uris": ["/docs/*"], "cors": true, "methods": ["GET", "PUT"]}),
    ] {
        let made = gw.post_json("/v1/api", &spec).await;
        assert_eq!(made.status, 200, "{}", made.text());
    }
    let json_type = [("content-type", "application/json")];

    // https-only over HTTP: 426 with Upgrade, as Kong answers; over HTTPS: served.
    let plain = call(gw.api_http, Method::POST, "/pay", &json_type, "{}").await;
    let why = plain.assert_error(426, "https-required");
    assert!(why.contains("HTTPS"), "{why}");
    assert_eq!(plain.header("upgrade"), Some("TLS/1.2, HTTP/1.1"));
    let tls = TlsClient::trusting(&self_signed_ca(&gw));
    let secure = tls
        .request(gw.api_https, Method::POST, "/pay", &json_type, "{}")
        .await
        .unwrap();
    assert_eq!(secure.status, 200, "{}", secure.text());

    // Hosts: the exact one, a wildcard, and no API for another host.
    for (host, api) in [
        ("api.example.com", "exact"),
        ("API.example.com:8081", "exact"),
        ("web.example.com", "wild"),
    ] {
        let reply = get(gw.api_http, "/who", &[("host", host)]).await;
        assert_eq!(reply.status, 200, "{host}: {}", reply.text());
        assert_eq!(up.stats.last_context()["httpContext"]["api"], api, "{host}");
    }
    let wrong = get(gw.api_http, "/who", &[("host", "example.org")]).await;
    assert!(
        wrong
            .assert_error(404, "not-found")
            .contains("example.org/who")
    );

    // A prefix takes the paths under it.
    let deep = get(gw.api_http, "/docs/a/b?x=1", &[]).await;
    assert_eq!(deep.status, 200, "{}", deep.text());
    assert_eq!(up.stats.last_context()["httpContext"]["path"], "/docs/a/b");

    // CORS: the preflight is answered, and answers carry the origin.
    let preflight = call(
        gw.api_http,
        Method::OPTIONS,
        "/docs/page",
        &[
            ("origin", "https://app.example.com"),
            ("access-control-request-method", "PUT"),
            ("access-control-request-headers", "content-type, x-custom"),
        ],
        "",
    )
    .await;
    assert_eq!(preflight.status, 204, "{}", preflight.text());
    assert_eq!(
        preflight.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    assert_eq!(
        preflight.header("access-control-allow-methods"),
        Some("GET, PUT")
    );
    assert_eq!(
        preflight.header("access-control-allow-headers"),
        Some("content-type, x-custom")
    );
    assert_eq!(
        up.stats.requests(),
        5,
        "a preflight does not run the function"
    );
    let cors_get = get(
        gw.api_http,
        "/docs/page",
        &[("origin", "https://app.example.com")],
    )
    .await;
    assert_eq!(cors_get.status, 200);
    assert_eq!(
        cors_get.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    // An API without cors gives no CORS headers, and refuses preflights.
    let no_cors = get(
        gw.api_http,
        "/who",
        &[
            ("host", "api.example.com"),
            ("origin", "https://app.example.com"),
        ],
    )
    .await;
    assert_eq!(no_cors.header("access-control-allow-origin"), None);
    let refused = call(
        gw.api_http,
        Method::OPTIONS,
        "/who",
        &[
            ("host", "api.example.com"),
            ("origin", "https://app.example.com"),
            ("access-control-request-method", "GET"),
        ],
        "",
    )
    .await;
    assert_eq!(refused.status, 403, "{}", refused.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_and_rate_limits() {
    let gw = Gateway::start_with(&[("DISPATCH_API_KEYS", "key-one,key-two")]).await;
    let up = Upstream::start(Behavior::Envelope).await;
    with_function(&gw, &up).await;
    for spec in [
        json!({"name": "private", "function": "hello", "uris": ["/private"], "authentication": "bearer"}),
        json!({"name": "limited", "function": "hello", "uris": ["/limited"],
               "rateLimit": {"perSecond": 0.5, "burst": 2}}),
        json!({"name": "per-key", "function": "hello", "uris": ["/per-key"], "authentication": "bearer",
               "rateLimit": {"perSecond": 0.5, "burst": 1, "by": "key"}}),
    ] {
        let made = gw.post_json("/v1/api", &spec).await;
        assert_eq!(made.status, 200, "{}", made.text());
    }

    let missing = get(gw.api_http, "/private", &[]).await;
    assert!(
        missing
            .assert_error(401, "unauthorized")
            .contains("API key")
    );
    assert_eq!(
        missing.header("www-authenticate"),
        Some("Bearer realm=\"dispatch-api\"")
    );
    for wrong in [
        "Bearer nope",
        "Bearer key-one-and-more",
        "Basic a2V5LW9uZQ==",
        &format!("Bearer {TOKEN}"),
    ] {
        let reply = get(gw.api_http, "/private", &[("authorization", wrong)]).await;
        reply.assert_error(401, "unauthorized");
        assert!(
            reply
                .header("www-authenticate")
                .unwrap()
                .contains("invalid_token"),
            "{wrong}"
        );
        assert!(!reply.text().contains("key-one"), "no key in the answer");
    }
    for key in ["key-one", "key-two"] {
        let ok = get(
            gw.api_http,
            "/private",
            &[("authorization", &format!("Bearer {key}"))],
        )
        .await;
        assert_eq!(ok.status, 200, "{}", ok.text());
    }
    let headers = &up.stats.last_context()["httpContext"]["headers"];
    assert!(
        headers.get("authorization").is_none(),
        "the key is not passed on: {headers}"
    );
    assert!(!gw.log().contains("key-two"), "keys are never logged");

    // A burst of 2, then 429 with Retry-After (0.5 per second: 2 s).
    for _ in 0..2 {
        assert_eq!(get(gw.api_http, "/limited", &[]).await.status, 200);
    }
    let limited = get(gw.api_http, "/limited", &[]).await;
    let why = limited.assert_error(429, "rate-limit");
    assert!(why.contains("\"limited\""), "{why}");
    assert_eq!(limited.header("retry-after"), Some("2"));
    // Other APIs have their own buckets.
    let other = get(
        gw.api_http,
        "/per-key",
        &[("authorization", "Bearer key-one")],
    )
    .await;
    assert_eq!(other.status, 200);
    // By key: key-one's bucket is spent, key-two's is not.
    let again = get(
        gw.api_http,
        "/per-key",
        &[("authorization", "Bearer key-one")],
    )
    .await;
    again.assert_error(429, "rate-limit");
    let second_key = get(
        gw.api_http,
        "/per-key",
        &[("authorization", "Bearer key-two")],
    )
    .await;
    assert_eq!(second_key.status, 200, "{}", second_key.text());
}

/// A self-signed pair for localhost, as PEM (certificate, key).
fn pair() -> (String, String) {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    (made.cert.pem(), made.signing_key.serialize_pem())
}

fn der_of(pem: &str) -> Vec<u8> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_versions_and_certificate_reload_under_load() {
    let dir = tempfile::tempdir().unwrap();
    let (cert_a, key_a) = pair();
    let (cert_b, key_b) = pair();
    let cert = write(dir.path(), "api.crt", &cert_a);
    let key = write(dir.path(), "api.key", &key_a);
    let ca = write(dir.path(), "ca.pem", &format!("{cert_a}{cert_b}"));
    let gw = Gateway::start_with(&[
        ("DISPATCH_API_TLS_CERT", cert.to_str().unwrap()),
        ("DISPATCH_API_TLS_KEY", key.to_str().unwrap()),
    ])
    .await;
    let up = Upstream::start(Behavior::Envelope).await;
    with_function(&gw, &up).await;
    let made = gw
        .post_json(
            "/v1/api",
            &json!({"name": "hi", "function": "hello", "uris": ["/hi"]}),
        )
        .await;
    assert_eq!(made.status, 200, "{}", made.text());
    assert!(
        !gw.data_dir().join("tls").exists(),
        "no self-signed pair when files are configured"
    );

    // TLS 1.2 and 1.3 both; HTTP/2 by ALPN too.
    for (versions, want) in [
        (Versions::Tls12Only, rustls::ProtocolVersion::TLSv1_2),
        (Versions::Tls13Only, rustls::ProtocolVersion::TLSv1_3),
    ] {
        let mut conn = TlsClient::with(&ca, versions, &[b"http/1.1"])
            .connect(gw.api_https)
            .await
            .unwrap();
        assert_eq!(conn.agreed.version, want);
        assert_eq!(conn.agreed.certificate, der_of(&cert_a));
        let reply = conn
            .request(Method::GET, "/hi?name=tls", &[], "")
            .await
            .unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    let mut h2 = TlsClient::with(&ca, Versions::Any, &[b"h2", b"http/1.1"])
        .connect(gw.api_https)
        .await
        .unwrap();
    assert_eq!(h2.agreed.alpn.as_deref(), Some(&b"h2"[..]));
    let reply = h2
        .request(Method::GET, "/hi?name=h2", &[], "")
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());

    // Under load: clients on new connections all along, and one kept-alive connection.
    let client = TlsClient::trusting(&ca);
    let mut kept = client.connect(gw.api_https).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (done, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let seen_b = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (client, stop, done, failed, seen_b) = (
            client.clone(),
            stop.clone(),
            done.clone(),
            failed.clone(),
            seen_b.clone(),
        );
        let (addr, b) = (gw.api_https, der_of(&cert_b));
        load.push(tokio::spawn(async move {
            let mut errors = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                match client.connect(addr).await {
                    Ok(mut conn) => {
                        if conn.agreed.certificate == b {
                            seen_b.fetch_add(1, Ordering::SeqCst);
                        }
                        match conn.request(Method::GET, "/hi", &[], "").await {
                            Ok(r) if r.status == 200 => {
                                done.fetch_add(1, Ordering::SeqCst);
                            }
                            Ok(r) => errors.push(format!("{}: {}", r.status, r.text())),
                            Err(e) => errors.push(e),
                        }
                    }
                    Err(e) => errors.push(e),
                }
                if !errors.is_empty() {
                    failed.fetch_add(1, Ordering::SeqCst);
                }
            }
            errors
        }));
    }
    eventually(Duration::from_secs(30), "calls before the reload", || {
        done.load(Ordering::SeqCst) >= 20
    })
    .await;
    std::fs::write(&key, &key_b).unwrap();
    std::fs::write(&cert, &cert_b).unwrap();
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &gw.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    eventually(
        Duration::from_secs(30),
        "a connection with the new certificate",
        || seen_b.load(Ordering::SeqCst) >= 10,
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    let mut errors = Vec::new();
    for task in load {
        errors.extend(task.await.unwrap());
    }
    assert!(
        errors.is_empty(),
        "failed calls during the reload: {errors:?}"
    );
    assert_eq!(failed.load(Ordering::SeqCst), 0);
    // The connection opened before the reload goes on, with the old certificate.
    assert_eq!(kept.agreed.certificate, der_of(&cert_a));
    let reply = kept.request(Method::GET, "/hi", &[], "").await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());

    // A broken file on the next SIGHUP: the pair in use stays, and the log says why.
    std::fs::write(&cert, "garbage").unwrap();
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &gw.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    eventually(
        Duration::from_secs(30),
        "the refused reload in the log",
        || gw.log().contains("certificate not reloaded"),
    )
    .await;
    let conn = client.connect(gw.api_https).await.unwrap();
    assert_eq!(conn.agreed.certificate, der_of(&cert_b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_certificates_stop_start_up_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = pair();
    let (_, other_key) = pair();
    let cert = write(dir.path(), "good.crt", &cert);
    let key = write(dir.path(), "good.key", &key);
    let garbage = write(dir.path(), "garbage.pem", "not PEM at all");
    let other_key = write(dir.path(), "other.key", &other_key);
    let missing = dir.path().join("missing.crt");
    for (cert_file, key_file, named) in [
        (&garbage, &key, &garbage),
        (&cert, &garbage, &garbage),
        (&missing, &key, &missing),
        (&cert, &other_key, &other_key),
    ] {
        let (status, stderr) = start_failing(&[
            ("DISPATCH_API_TLS_CERT", cert_file.to_str().unwrap()),
            ("DISPATCH_API_TLS_KEY", key_file.to_str().unwrap()),
        ]);
        assert!(!status.success());
        assert!(
            stderr.contains(named.to_str().unwrap()),
            "the message names {}: {stderr}",
            named.display()
        );
    }
    let (status, stderr) = start_failing(&[("DISPATCH_API_TLS_CERT", cert.to_str().unwrap())]);
    assert!(!status.success());
    assert!(stderr.contains("api.tls_key"), "{stderr}");
    let (status, stderr) = start_failing(&[
        ("DISPATCH_SERVER_TLS_CERT", garbage.to_str().unwrap()),
        ("DISPATCH_SERVER_TLS_KEY", key.to_str().unwrap()),
    ]);
    assert!(!status.success());
    assert!(stderr.contains("garbage.pem"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_api_can_speak_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = pair();
    let ca = write(dir.path(), "control.crt", &cert);
    let key = write(dir.path(), "control.key", &key);
    let gw = Gateway::start_with(&[
        ("DISPATCH_SERVER_TLS_CERT", ca.to_str().unwrap()),
        ("DISPATCH_SERVER_TLS_KEY", key.to_str().unwrap()),
    ])
    .await;
    let tls = TlsClient::trusting(&ca);
    let auth = format!("Bearer {TOKEN}");
    let listed = tls
        .request(
            gw.addr,
            Method::GET,
            "/v1/function",
            &[("authorization", &auth)],
            "",
        )
        .await
        .unwrap();
    assert_eq!(listed.status, 200, "{}", listed.text());
    let denied = tls
        .request(gw.addr, Method::GET, "/v1/function", &[], "")
        .await
        .unwrap();
    assert_eq!(denied.status, 401);
    // Plain HTTP to it gets no answer.
    let plain = send(
        gw.addr,
        http::Request::get("/healthz")
            .body(http_body_util::Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert!(plain.is_err() || plain.unwrap().status() != 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_on_postgres_share_apis() {
    let db = TestDatabase::create().await;
    let url = db.url();
    let up = Upstream::start(Behavior::Envelope).await;
    let a = Gateway::start_with(&[("DISPATCH_STORE_URL", &url)]).await;
    let b = Gateway::start_with(&[("DISPATCH_STORE_URL", &url)]).await;
    with_function(&a, &up).await;
    let made = a
        .post_json(
            "/v1/api",
            &json!({"name": "shared", "function": "hello", "uris": ["/shared"]}),
        )
        .await;
    assert_eq!(made.status, 200, "{}", made.text());

    // Made on A, served by B at once (LISTEN/NOTIFY), and refused on B as a duplicate.
    let mut status = 0;
    for _ in 0..100 {
        status = get(b.api_http, "/shared?name=B", &[]).await.status.as_u16();
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, 200, "B serves the API made on A");
    let dup = b
        .post_json(
            "/v1/api",
            &json!({"name": "again", "function": "hello", "uris": ["/shared"]}),
        )
        .await;
    assert!(dup.assert_error(409, "conflict").contains("\"shared\""));

    // Deleted on B: gone on A.
    assert_eq!(b.delete("/v1/api/shared").await.status, 200);
    for _ in 0..100 {
        status = get(a.api_http, "/shared", &[]).await.status.as_u16();
        if status == 404 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, 404, "A no longer serves the API deleted on B");
}

/// `X-Callback-Url: https://...`: the callback goes over TLS, checked against the trust
/// store (here `SSL_CERT_FILE`: another gateway's self-signed certificate), to that
/// gateway's API endpoint, which runs a function with the answer as its input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_runs_callback_can_go_to_an_https_api_endpoint() {
    let sink_up = Upstream::start(Behavior::Envelope).await;
    let sink = Gateway::start().await;
    with_function(&sink, &sink_up).await;
    let made = sink
        .post_json(
            "/v1/api",
            &json!({"name": "cb", "function": "hello", "methods": ["POST"], "uris": ["/cb"],
                "protocols": ["https"]}),
        )
        .await;
    assert_eq!(made.status, 200, "{}", made.text());

    let trust = self_signed_ca(&sink);
    let up = Upstream::start(Behavior::Envelope).await;
    let gw = Gateway::start_with(&[("SSL_CERT_FILE", trust.to_str().unwrap())]).await;
    with_function(&gw, &up).await;
    let url = format!("https://localhost:{}/cb?from=gw", sink.api_https.port());
    let reply = call(
        gw.addr,
        Method::POST,
        "/async-function/hello",
        &[("x-callback-url", &url)],
        r#"{"name": "Arya"}"#,
    )
    .await;
    assert_eq!(reply.status, 202, "{}", reply.text());
    let id = reply.header("x-call-id").unwrap().to_string();
    eventually(
        Duration::from_secs(20),
        "the callback's run on the sink",
        || sink_up.stats.requests() == 1,
    )
    .await;
    let sent: Value = serde_json::from_str(sink_up.stats.last()["body"].as_str().unwrap()).unwrap();
    // The function's answer, as the sink's input.
    assert_eq!(sent["payload"]["greeting"], "Hello, Arya", "{sent}");
    let context = &sent["context"]["httpContext"];
    assert_eq!(context["api"], "cb", "{context}");
    assert_eq!(context["query"], "from=gw", "{context}");
    assert_eq!(context["headers"]["x-call-id"], id.as_str(), "{context}");
    assert_eq!(context["headers"]["x-function-name"], "hello", "{context}");
    let run = run_finished(&gw, &id, Duration::from_secs(10)).await;
    assert_eq!(run["status"], "READY", "{run}");
    assert!(!run["reason"].to_string().contains("callback"), "{run}");

    // A certificate nobody trusts: the callback fails, and the run says why.
    let untrusting = Gateway::start_with(&[("DISPATCH_QUEUE_CALLBACK_ATTEMPTS", "1")]).await;
    with_function(&untrusting, &up).await;
    let reply = call(
        untrusting.addr,
        Method::POST,
        "/async-function/hello",
        &[("x-callback-url", &url)],
        "{}",
    )
    .await;
    let id = reply.header("x-call-id").unwrap().to_string();
    let mut reason = String::new();
    for _ in 0..200 {
        reason = untrusting.get(&format!("/v1/runs/{id}")).await.json()["reason"].to_string();
        if reason.contains("callback") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        reason.contains("TLS") && reason.contains("certificate"),
        "{reason}"
    );
    assert_eq!(sink_up.stats.requests(), 1);
}
