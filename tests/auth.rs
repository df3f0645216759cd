//! The control API's bearer token: `/v1/*` answers 401 with `WWW-Authenticate` without it or
//! with a wrong one, the raw surface and the operator endpoints stay open, `auth.skip`
//! opens everything, several tokens may be valid at once, and a gateway with none
//! configured makes one, keeps it (0600) across restarts and hands it to the CLI. The token
//! never shows in the gateway's log, even at trace level.

mod common;

use std::path::{Path, PathBuf};

use bytes::Bytes;
use common::*;
use http::{Method, StatusCode};
use serde_json::{Value, json};

/// GET `path` with exactly the headers written here (the harness adds no token to it).
async fn bare_get(gw: &Gateway, path: &str, extra: &str) -> (u16, String, Value) {
    let head = format!("GET {path} HTTP/1.1\r\nhost: {}\r\n{extra}\r\n", gw.addr);
    let (status, head, body) = raw_exchange(gw.addr, &head, std::iter::empty())
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
    (status, head.to_ascii_lowercase(), body)
}

async fn get_with(gw: &Gateway, path: &str, token: &str) -> Reply {
    let bearer = format!("Bearer {token}");
    request(
        gw.addr,
        Method::GET,
        path,
        &[("authorization", &bearer)],
        Bytes::new(),
    )
    .await
}

/// Where the harness points a gateway's CLI configuration ($DISPATCH_CONFIG).
fn cli_config(gw: &Gateway) -> PathBuf {
    gw.data_dir().parent().unwrap().join("cli-config.json")
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_api_wants_the_token_and_the_raw_surface_does_not() {
    let up = Upstream::start(Behavior::Echo).await;
    let gw = Gateway::start().await;
    gw.register(&function("echo", &[up.addr], json!({}))).await;

    // No token: 401, the challenge, the Dispatch error body; whatever the /v1 path.
    for path in [
        "/v1/function",
        "/v1/function/echo",
        "/v1/runs",
        "/v1/nowhere",
        "/v1",
    ] {
        let (status, head, body) = bare_get(&gw, path, "").await;
        assert_eq!(status, 401, "{path}: {head}");
        assert!(
            head.contains("www-authenticate: bearer realm=\"dispatch\"\r\n")
                || head.ends_with("www-authenticate: bearer realm=\"dispatch\""),
            "{path}: {head}"
        );
        assert_eq!(body["code"], 401, "{body}");
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .contains("Authorization: Bearer"),
            "{body}"
        );
    }

    // A wrong token, or another scheme: 401, invalid_token.
    for wrong in ["Bearer not-the-token", "Basic aGFybmVzczp4", "Bearer"] {
        let (status, head, body) =
            bare_get(&gw, "/v1/function", &format!("authorization: {wrong}\r\n")).await;
        assert_eq!(status, 401, "{wrong}: {head}");
        assert!(
            head.contains("www-authenticate: bearer realm=\"dispatch\", error=\"invalid_token\""),
            "{wrong}: {head}"
        );
        assert_eq!(body["code"], 401, "{body}");
    }
    let reply = get_with(&gw, "/v1/function", &format!("{TOKEN}x")).await;
    reply.assert_error(401, "unauthorized");

    // The right one.
    let reply = get_with(&gw, "/v1/function/echo", TOKEN).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let (status, _, _) = bare_get(
        &gw,
        "/v1/function",
        &format!("authorization: bearer {TOKEN}\r\n"),
    )
    .await;
    assert_eq!(status, 200, "the scheme is case-insensitive");

    // Open without a token: the OpenFaaS surface and the operator endpoints.
    for path in ["/function/echo", "/healthz", "/readyz", "/metrics"] {
        let (status, head, _) = bare_get(&gw, path, "").await;
        assert_eq!(status, 200, "{path}: {head}");
    }
    let head = format!(
        "POST /async-function/echo HTTP/1.1\r\nhost: {}\r\ncontent-length: 2\r\n\r\n",
        gw.addr
    );
    let (status, head, _) = raw_exchange(gw.addr, &head, [Bytes::from_static(b"{}")].into_iter())
        .await
        .unwrap();
    assert_eq!(status, 202, "{head}");

    // A configured token never writes the CLI's configuration.
    assert!(!cli_config(&gw).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_lets_every_caller_in() {
    let gw = Gateway::start_with(&[("DISPATCH_AUTH_SKIP", "true")]).await;
    let (status, head, body) = bare_get(&gw, "/v1/function", "").await;
    assert_eq!(status, 200, "{head}");
    assert_eq!(body, json!([]));
    assert!(!gw.data_dir().join("token").exists(), "no token made");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_tokens_from_the_list_and_a_file_are_valid_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens");
    std::fs::write(&file, "# from the vault\nfile-token\n").unwrap();
    let gw = Gateway::start_with(&[
        ("DISPATCH_AUTH_TOKEN", "the-new-one"),
        ("DISPATCH_AUTH_TOKENS", "the-old-one,another-one"),
        ("DISPATCH_AUTH_TOKEN_FILE", file.to_str().unwrap()),
    ])
    .await;
    for token in ["the-new-one", "the-old-one", "another-one", "file-token"] {
        let reply = get_with(&gw, "/v1/function", token).await;
        assert_eq!(reply.status, StatusCode::OK, "{token}: {}", reply.text());
    }
    get_with(&gw, "/v1/function", TOKEN)
        .await
        .assert_error(401, "unauthorized");
    get_with(&gw, "/v1/function", "# from the vault")
        .await
        .assert_error(401, "unauthorized");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_file_that_cannot_be_read_stops_start_up_naming_it() {
    let (status, stderr) = start_failing(&[("DISPATCH_AUTH_TOKEN_FILE", "/nonexistent/tokens")]);
    assert!(!status.success());
    assert!(
        stderr.contains("auth.token_file") && stderr.contains("/nonexistent/tokens"),
        "{stderr}"
    );
    let (status, stderr) = start_failing(&[("DISPATCH_AUTH_TOKEN", "two words")]);
    assert!(!status.success());
    assert!(stderr.contains("auth.token:"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_made_token_is_kept_private_reused_after_a_restart_and_given_to_the_cli() {
    let mut gw = Gateway::start_with(&[("DISPATCH_AUTH_TOKEN", "")]).await;
    let token_file = gw.data_dir().join("token");
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(token.len(), 43, "256 bits, base64url: {token}");
    assert_eq!(mode(&token_file), 0o600);
    assert_eq!(get_with(&gw, "/v1/function", &token).await.status, 200);
    get_with(&gw, "/v1/function", TOKEN)
        .await
        .assert_error(401, "unauthorized");

    // The CLI's configuration did not exist: it now names this gateway and its token.
    let config_path = cli_config(&gw);
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    assert_eq!(
        config,
        json!({"host": "127.0.0.1", "port": gw.addr.port(), "token": token})
    );
    assert_eq!(mode(&config_path), 0o600);
    let home = tempfile::tempdir().unwrap();
    let config_env = config_path.to_str().unwrap();
    let (code, out) = dispatch_cli_in(
        home.path(),
        &[("DISPATCH_CONFIG", config_env)],
        &["get", "functions"],
    )
    .await;
    assert_eq!(code, 0, "{out}");

    // Restarted (on another port): the same token.
    gw.restart().await;
    assert_eq!(std::fs::read_to_string(&token_file).unwrap().trim(), token);
    assert_eq!(get_with(&gw, "/v1/function", &token).await.status, 200);
    // The CLI configuration points at the old port now: left as it was.
    let again: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    assert_eq!(again, config);
    assert!(!gw.log().contains(&token), "the token is not in the log");
}

/// A self-signed pair for localhost and 127.0.0.1 in `dir`: (certificate file, key file).
fn self_signed(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let made =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_speaks_https_to_a_control_api_over_tls_trusting_its_certificate() {
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(certs.path(), "control");
    let (other, _) = self_signed(certs.path(), "other");
    let gw = Gateway::start_with(&[
        ("DISPATCH_AUTH_TOKEN", ""),
        ("DISPATCH_SERVER_TLS_CERT", cert.to_str().unwrap()),
        ("DISPATCH_SERVER_TLS_KEY", key.to_str().unwrap()),
    ])
    .await;
    let token = std::fs::read_to_string(gw.data_dir().join("token")).unwrap();

    // The gateway wrote the CLI's configuration for https, trusting its certificate.
    let config_path = cli_config(&gw);
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    assert_eq!(
        config,
        json!({"host": "127.0.0.1", "port": gw.addr.port(), "token": token.trim(),
            "scheme": "https", "cacert": cert.to_str().unwrap()})
    );
    let home = tempfile::tempdir().unwrap();
    let with_config = [("DISPATCH_CONFIG", config_path.to_str().unwrap())];
    let (code, out) = dispatch_cli_in(home.path(), &with_config, &["get", "functions"]).await;
    assert_eq!(code, 0, "{out}");
    let (code, out) = dispatch_cli_in(
        home.path(),
        &with_config,
        &["create", "secret", "over-tls", "--value", "k=v"],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let (code, out) = dispatch_cli_in(home.path(), &with_config, &["get", "secrets"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("over-tls"), "{out}");

    // Another certificate trusted: the handshake fails, and the message says so.
    let (code, out) = dispatch_cli_in(
        home.path(),
        &with_config,
        &["get", "functions", "--cacert", other.to_str().unwrap()],
    )
    .await;
    assert_eq!(code, 1, "{out}");
    let url = format!("https://127.0.0.1:{}", gw.addr.port());
    assert!(
        out.contains(&format!("TLS with the gateway at {url}")) && out.contains("certificate"),
        "{out}"
    );
    // Nothing to trust but the system's, which does not hold this self-signed one.
    let port = gw.addr.port().to_string();
    let (code, out) = dispatch_cli_in(
        home.path(),
        &[("DISPATCH_TOKEN", token.trim())],
        &["get", "functions", "--scheme", "https", "--port", &port],
    )
    .await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("TLS with the gateway"), "{out}");
    // A cacert that holds no certificate is named.
    let (code, out) = dispatch_cli_in(
        home.path(),
        &with_config,
        &["get", "functions", "--cacert", key.to_str().unwrap()],
    )
    .await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("cacert {}", key.display())), "{out}");
    // Plain HTTP to the TLS listener gets no answer.
    let (code, out) = dispatch_cli_in(
        home.path(),
        &with_config,
        &["get", "functions", "--scheme", "http"],
    )
    .await;
    assert_eq!(code, 1, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_sends_the_token_of_its_flag_variable_or_configuration() {
    let gw = Gateway::start().await;
    let home = tempfile::tempdir().unwrap();
    let port = gw.addr.port().to_string();

    let (code, out) =
        dispatch_cli_in(home.path(), &[], &["get", "functions", "--port", &port]).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("[Code: 401]") && out.contains("--token"),
        "{out}"
    );

    let (code, out) = dispatch_cli_in(
        home.path(),
        &[],
        &["get", "functions", "--port", &port, "--token", TOKEN],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let (code, out) = dispatch_cli_in(
        home.path(),
        &[("DISPATCH_TOKEN", TOKEN)],
        &["get", "functions", "--port", &port],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    // The flag wins over the variable.
    let (code, out) = dispatch_cli_in(
        home.path(),
        &[("DISPATCH_TOKEN", TOKEN)],
        &["get", "functions", "--port", &port, "--token", "wrong"],
    )
    .await;
    assert_eq!(code, 1, "{out}");

    let dot = home.path().join(".dispatch");
    std::fs::create_dir_all(&dot).unwrap();
    std::fs::write(
        dot.join("config.json"),
        json!({"port": gw.addr.port(), "token": TOKEN}).to_string(),
    )
    .unwrap();
    let (code, out) = dispatch_cli_in(home.path(), &[], &["get", "functions"]).await;
    assert_eq!(code, 0, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_is_never_logged() {
    let up = Upstream::start(Behavior::Envelope).await;
    let gw = Gateway::start_with(&[("DISPATCH_AUTH_TOKEN", ""), ("RUST_LOG", "trace")]).await;
    let token = std::fs::read_to_string(gw.data_dir().join("token"))
        .unwrap()
        .trim()
        .to_string();
    let bearer = format!("Bearer {token}");
    let auth = [
        ("authorization", bearer.as_str()),
        ("content-type", "application/json"),
    ];
    let spec = serde_json::to_vec(&function(
        "hello",
        &[up.addr],
        json!({"upstream": {"protocol": "dispatch"}}),
    ))
    .unwrap();
    let reply = request(gw.addr, Method::POST, "/v1/function", &auth, spec.into()).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    let run = br#"{"blocking": true, "input": {"name": "Jon"}}"#;
    let reply = request(
        gw.addr,
        Method::POST,
        "/v1/runs?functionName=hello",
        &auth,
        Bytes::from_static(run),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let wrong = "Bearer a-wrong-token-someone-tried";
    get_with(&gw, "/v1/function", "a-wrong-token-someone-tried")
        .await
        .assert_error(401, "unauthorized");
    // The raw surface passes a caller's Authorization on to the function: not logged either.
    let reply = request(
        gw.addr,
        Method::POST,
        "/function/hello",
        &auth,
        Bytes::from_static(b"{}"),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());

    let log = gw.log();
    assert!(
        log.contains(&gw.data_dir().join("token").display().to_string()),
        "the log says where the token is:\n{log}"
    );
    assert!(!log.contains(&token), "the token is in the log:\n{log}");
    assert!(!log.contains(wrong), "a presented token is in the log");
}
