//! The integration-test harness: the real `dispatch` binary on port 0 with its own data
//! dir ([`Gateway`]), upstream functions on port 0 that count what they see ([`Upstream`]),
//! a small HTTP/1.1 client ([`request`], [`Connection`]) and a reader for `/metrics`
//! ([`Metrics`]). Every test owns its ports and temp dirs, so tests run in parallel.
//!
//! Auth is on, as in production: every gateway starts with the control API token [`TOKEN`]
//! (`DISPATCH_AUTH_TOKEN`, which a test may override), and the harness's clients add
//! `Authorization: Bearer TOKEN` to every `/v1/*` request that has none ([`authorize`], the
//! one place). [`raw_exchange`] sends its hand-written head as is.
//!
//! Each test file compiles this module on its own and uses part of it.
#![allow(dead_code)]

pub mod pg;
pub mod rabbit;
pub mod tls;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// The control API token of the harness's gateways (and of [`dispatch_cli`]).
pub const TOKEN: &str = "harness-control-api-token";

/// Adds `Authorization: Bearer TOKEN` to a control API request (`/v1/*`) that carries no
/// `Authorization` of its own.
pub fn authorize(path: &str, headers: &mut HeaderMap) {
    if (path == "/v1" || path.starts_with("/v1/"))
        && !headers.contains_key(http::header::AUTHORIZATION)
    {
        let bearer = format!("Bearer {TOKEN}").parse().expect("a header value");
        headers.insert(http::header::AUTHORIZATION, bearer);
    }
}

/// Upper bound for anything a test waits on, so a bug shows as a failure, not a hang.
pub const PATIENCE: Duration = Duration::from_secs(30);

pub const MIB: u64 = 1024 * 1024;

// ---------------------------------------------------------------------------------------
// The gateway process
// ---------------------------------------------------------------------------------------

/// The `dispatch serve` process, on `127.0.0.1:0`, with a temp data dir. Killed on drop.
pub struct Gateway {
    pub addr: SocketAddr,
    /// The API endpoints' listeners (`--api-http` and `--api-https` on port 0).
    pub api_http: SocketAddr,
    pub api_https: SocketAddr,
    child: Child,
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
    /// How many times the process was started (each start appends to the same log).
    starts: usize,
}

impl Gateway {
    pub async fn start() -> Gateway {
        Self::start_with(&[]).await
    }

    /// Starts with `DISPATCH_*` overrides (and anything else) in the environment.
    pub async fn start_with(env: &[(&str, &str)]) -> Gateway {
        let dir = tempfile::tempdir().expect("temp dir");
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let (child, addr, (api_http, api_https)) =
            spawn(dir.path(), env.clone(), 1, "127.0.0.1:0".parse().unwrap())
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        Gateway {
            addr,
            api_http,
            api_https,
            child,
            dir,
            env,
            starts: 1,
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the gateway wrote on stderr so far (its logs, RUST_LOG=warn).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gateway.log")).unwrap_or_default()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -TERM {} failed", self.pid());
    }

    /// Sends SIGKILL and reaps the process.
    pub fn crash(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the process has exited (and how), without waiting.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Waits for the process to exit, at most `within`.
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let until = Instant::now() + within;
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            assert!(
                Instant::now() < until,
                "the gateway did not exit within {within:?}; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, wait for a clean exit, then start again on the same data dir (on a new port).
    pub async fn restart(&mut self) {
        self.terminate();
        let status = self.wait_exit(PATIENCE).await;
        assert!(status.success(), "exit status on SIGTERM: {status}");
        self.start_again().await;
    }

    /// Starts a new process on the same data dir; the previous one must have exited.
    pub async fn start_again(&mut self) {
        self.start_again_on("127.0.0.1:0".parse().unwrap()).await;
    }

    /// [`Gateway::start_again`], listening on `listen` (the previous address, for a
    /// proxy in front).
    pub async fn start_again_on(&mut self, listen: SocketAddr) {
        assert!(self.exited().is_some(), "the previous process still runs");
        self.starts += 1;
        let (child, addr, (api_http, api_https)) =
            spawn(self.dir.path(), self.env.clone(), self.starts, listen)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        self.child = child;
        self.addr = addr;
        self.api_http = api_http;
        self.api_https = api_https;
    }

    /// The process's peak resident memory (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("reading /proc/<pid>/status");
        let line = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .expect("VmHWM in /proc/<pid>/status");
        let kib: u64 = line
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .expect("VmHWM value");
        kib * 1024
    }

    pub async fn get(&self, path: &str) -> Reply {
        request(self.addr, Method::GET, path, &[], Bytes::new()).await
    }

    pub async fn delete(&self, path: &str) -> Reply {
        request(self.addr, Method::DELETE, path, &[], Bytes::new()).await
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Reply {
        let body = Bytes::from(serde_json::to_vec(body).unwrap());
        request(self.addr, Method::POST, path, &JSON, body).await
    }

    pub async fn put_json(&self, path: &str, body: &Value) -> Reply {
        let body = Bytes::from(serde_json::to_vec(body).unwrap());
        request(self.addr, Method::PUT, path, &JSON, body).await
    }

    /// Registers a function, asserting the 201.
    pub async fn register(&self, spec: &Value) -> Value {
        let reply = self.post_json("/v1/function", spec).await;
        assert_eq!(
            reply.status,
            StatusCode::CREATED,
            "registering {spec}: {}",
            reply.text()
        );
        reply.json()
    }

    /// A blocking Dispatch run of `function` with `input`.
    pub async fn run(&self, function: &str, input: Value) -> Reply {
        self.post_json(
            &format!("/v1/runs?functionName={function}"),
            &json!({"blocking": true, "input": input}),
        )
        .await
    }

    pub async fn metrics(&self) -> Metrics {
        let reply = self.get("/metrics").await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        Metrics::parse(&reply.text())
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- gateway log ---\n{}--- end of gateway log ---",
                self.log()
            );
        }
    }
}

const JSON: [(&str, &str); 1] = [("content-type", "application/json")];

/// The addresses of the API endpoints' HTTP and HTTPS listeners.
type ApiAddrs = (SocketAddr, SocketAddr);

/// Starts `dispatch serve` and reads the ports from its two stdout lines.
async fn spawn(
    dir: &Path,
    env: Vec<(String, String)>,
    start: usize,
    listen: SocketAddr,
) -> Result<(Child, SocketAddr, ApiAddrs), String> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || spawn_blocking(&dir, &env, start, listen))
        .await
        .expect("spawn task")
}

fn spawn_blocking(
    dir: &Path,
    env: &[(String, String)],
    start: usize,
    listen: SocketAddr,
) -> Result<(Child, SocketAddr, ApiAddrs), String> {
    let log_path = dir.join("gateway.log");
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("log file: {e}"))?;
    use std::io::Write;
    let _ = writeln!(log, "=== start {start} ===");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dispatch"));
    cmd.arg("serve")
        .arg("--listen")
        .arg(listen.to_string())
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(["--api-http", "127.0.0.1:0", "--api-https", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log));
    for (name, _) in std::env::vars() {
        if name.starts_with("DISPATCH_") {
            cmd.env_remove(name);
        }
    }
    cmd.env("RUST_LOG", "warn")
        .env("DISPATCH_AUTH_TOKEN", TOKEN)
        .env("DISPATCH_CONFIG", dir.join("cli-config.json"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().map_err(|e| format!("starting dispatch: {e}"))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let _ = tx.send(lines.next());
        let _ = tx.send(lines.next());
        // Keep reading so the gateway never writes into a closed pipe.
        for _ in lines {}
    });
    let line = match rx.recv_timeout(PATIENCE) {
        Ok(Some(Ok(line))) => line,
        other => {
            let _ = child.kill();
            let status = child.wait().ok();
            return Err(format!(
                "the gateway printed no listening line ({other:?}); exit {status:?}; log:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            ));
        }
    };
    let addr = line
        .strip_prefix("dispatch: listening on http://")
        .or_else(|| line.strip_prefix("dispatch: listening on https://"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| format!("unexpected first line: {line:?}"))?;
    let apis = match rx.recv_timeout(PATIENCE) {
        Ok(Some(Ok(line))) => line,
        other => {
            return Err(format!(
                "the gateway printed no API endpoints line: {other:?}"
            ));
        }
    };
    let api_addr = |scheme: &str| {
        apis.split_whitespace()
            .find_map(|word| word.strip_prefix(scheme))
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| format!("no {scheme} address in the second line: {apis:?}"))
    };
    let api_addrs = (api_addr("http://")?, api_addr("https://")?);
    let sqlite_here = format!(
        "(store: sqlite {})",
        dir.join("data").join("dispatch.db").display()
    );
    assert!(
        line.contains(&sqlite_here) || line.contains("(store: postgres://"),
        "the listening line names the store: {line}"
    );
    Ok((child, addr, api_addrs))
}

/// Runs `dispatch serve` expecting it to refuse to start; returns (exit status, stderr).
pub fn start_failing(env: &[(&str, &str)]) -> (ExitStatus, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dispatch"));
    cmd.arg("serve")
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--api-http", "127.0.0.1:0", "--api-https", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("RUST_LOG", "warn");
    for (name, _) in std::env::vars() {
        if name.starts_with("DISPATCH_") {
            cmd.env_remove(name);
        }
    }
    cmd.env("DISPATCH_AUTH_TOKEN", TOKEN)
        .env("DISPATCH_CONFIG", dir.path().join("cli-config.json"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("running dispatch");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A function spec on the static driver, raw protocol, with `extra` top-level fields merged in.
pub fn function(name: &str, endpoints: &[SocketAddr], extra: Value) -> Value {
    let mut spec = json!({
        "name": name,
        "upstream": {
            "driver": "static",
            "endpoints": endpoints.iter().map(|a| format!("http://{a}")).collect::<Vec<_>>(),
            "protocol": "raw",
        },
    });
    merge(&mut spec, extra);
    spec
}

/// Merges `extra` into `into`, object keys recursively.
pub fn merge(into: &mut Value, extra: Value) {
    match (into, extra) {
        (Value::Object(into), Value::Object(extra)) => {
            for (k, v) in extra {
                match into.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        into.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

/// A loopback address nothing listens on (bound, then released).
pub fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr")
}

/// Waits until `check` holds, at most `within`; panics with `what` otherwise.
pub async fn eventually(within: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let until = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < until, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Asks `probe` until `check` holds on what it gives, at most [`PATIENCE`] (a bound
/// against hangs, not a timing assertion); gives what was seen, or panics naming `what`
/// and the last thing seen.
pub async fn until_seen<T: std::fmt::Debug, F: Future<Output = T>>(
    what: &str,
    mut probe: impl FnMut() -> F,
    check: impl Fn(&T) -> bool,
) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let seen = probe().await;
        if check(&seen) {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: never seen (last: {seen:?})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------------------

/// A whole response.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {}: body is not JSON ({e}): {}",
                self.status,
                self.text()
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .map(|v| v.to_str().expect("ASCII header"))
    }

    /// Asserts a gateway error: the status, the `X-Dispatch-Error` kind and the Dispatch
    /// error body `{"code","message"}`; returns the message.
    pub fn assert_error(&self, status: u16, kind: &str) -> String {
        assert_eq!(self.status.as_u16(), status, "{}", self.text());
        assert_eq!(
            self.header("x-dispatch-error"),
            Some(kind),
            "X-Dispatch-Error of {}",
            self.text()
        );
        let body = self.json();
        assert_eq!(body["code"], status, "{body}");
        body["message"]
            .as_str()
            .unwrap_or_else(|| panic!("message in {body}"))
            .to_string()
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Sends one request on a new connection and returns the response head (body unread).
pub async fn send<B>(addr: SocketAddr, mut req: Request<B>) -> Result<Response<Incoming>, String>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let work = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        let path = req.uri().path().to_string();
        authorize(&path, req.headers_mut());
        if !req.headers().contains_key(http::header::HOST) {
            req.headers_mut()
                .insert(http::header::HOST, addr.to_string().parse().unwrap());
        }
        sender
            .send_request(req)
            .await
            .map_err(|e| format!("request: {}", error_chain(&e)))
    };
    tokio::time::timeout(PATIENCE, work)
        .await
        .map_err(|_| format!("no answer from {addr} within {PATIENCE:?}"))?
}

/// Sends a request with a whole body and reads the whole response. Panics on a transport
/// error (use [`send`] to see those).
pub async fn request(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Reply {
    let mut req = Request::builder().method(method.clone()).uri(path);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body)).expect("request");
    let resp = send(addr, req)
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    read_reply(resp).await
}

pub async fn read_reply(resp: Response<Incoming>) -> Reply {
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(PATIENCE, body.collect())
        .await
        .expect("response body within the patience")
        .expect("response body")
        .to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// One keep-alive client connection to the gateway, for calls one after another.
pub struct Connection {
    addr: SocketAddr,
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl Connection {
    pub async fn open(addr: SocketAddr) -> Connection {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        Connection { addr, sender }
    }

    pub async fn request(&mut self, method: Method, path: &str, body: Bytes) -> Reply {
        self.request_with(method, path, &[], body).await
    }

    /// The same, with `headers`.
    pub async fn request_with(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Reply {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, self.addr.to_string());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let mut req = req.body(Full::new(body)).expect("request");
        authorize(path, req.headers_mut());
        let work = async {
            self.sender.ready().await.expect("connection still open");
            let resp = self.sender.send_request(req).await.expect("response");
            read_reply(resp).await
        };
        tokio::time::timeout(PATIENCE, work)
            .await
            .expect("answer within the patience")
    }
}

/// A request written by hand on a raw connection: `head` (request line and headers, up to
/// the blank line), then `body` in pieces. Write errors are ignored (a server may answer
/// and close before reading everything); then the answer is read to the end of the
/// connection or of its declared length. Returns the status, the head and the body.
pub async fn raw_exchange(
    addr: SocketAddr,
    head: &str,
    body: impl Iterator<Item = Bytes>,
) -> Result<(u16, String, Vec<u8>), String> {
    use tokio::io::AsyncWriteExt;
    let work = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let (mut reader, mut writer) = stream.into_split();
        let head = head.to_string();
        let parts: Vec<Bytes> = body.collect();
        let write = tokio::spawn(async move {
            if writer.write_all(head.as_bytes()).await.is_err() {
                return writer;
            }
            for part in parts {
                if writer.write_all(&part).await.is_err() {
                    break;
                }
            }
            writer
        });
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        let answer = loop {
            match reader.read(&mut buf).await {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    if let Some(len) = complete_response_len(&got) {
                        got.truncate(len);
                        break Ok(());
                    }
                }
                Err(e) => break Err(e),
            }
        };
        let _writer = write.await;
        if let Err(e) = answer
            && got.is_empty()
        {
            return Err(format!("reading the answer: {e}"));
        }
        let mut text = String::from_utf8_lossy(&got).into_owned();
        loop {
            let (head, body) = text
                .split_once("\r\n\r\n")
                .ok_or_else(|| format!("no complete answer head in {text:?}"))?;
            let status: u16 = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("no status in {head:?}"))?;
            if (100..200).contains(&status) {
                text = body.to_string();
                continue;
            }
            return Ok((status, head.to_string(), body.as_bytes().to_vec()));
        }
    };
    tokio::time::timeout(PATIENCE, work)
        .await
        .map_err(|_| "no answer within the patience".to_string())?
}

/// The length of a whole response (head and Content-Length body) once `got` holds it,
/// skipping interim 1xx answers.
fn complete_response_len(got: &[u8]) -> Option<usize> {
    let mut start = 0;
    loop {
        let rest = &got[start..];
        let end = rest.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
        let head = String::from_utf8_lossy(&rest[..end]).to_ascii_lowercase();
        if head.starts_with("http/1.1 1") {
            start += end;
            continue;
        }
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())?;
        return (rest.len() >= end + len).then_some(start + end + len);
    }
}

pub use dispatch::error::error_chain;

/// A body of `len` bytes made on the fly from one shared chunk: nothing is held whole.
/// `exact` announces the length (Content-Length); otherwise it goes chunked.
pub struct Repeat {
    remaining: u64,
    chunk: Bytes,
    exact: bool,
}

impl Repeat {
    pub fn new(len: u64, chunk_size: usize, exact: bool) -> Repeat {
        Repeat {
            remaining: len,
            chunk: Bytes::from(vec![b'x'; chunk_size]),
            exact,
        }
    }
}

impl Body for Repeat {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(self.chunk.len() as u64);
        self.remaining -= n;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n as usize)))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        if self.exact {
            SizeHint::with_exact(self.remaining)
        } else {
            SizeHint::default()
        }
    }
}

/// A body that sends a first chunk and then nothing, forever.
pub struct Stall {
    sent: bool,
}

impl Body for Stall {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.sent {
            return Poll::Pending;
        }
        self.sent = true;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"partial")))))
    }
}

// ---------------------------------------------------------------------------------------
// Upstream functions
// ---------------------------------------------------------------------------------------

/// What an upstream does with each request.
#[derive(Clone)]
pub enum Behavior {
    /// Answers 200 with JSON: method, path, query, headers (name -> [values]), body.
    /// A request with `x-echo-hop: 1` also gets hop-by-hop headers in the answer; one with
    /// `x-echo-close: 1` gets `Connection: close` (and the connection is closed after it).
    Echo,
    /// Sleeps, then answers 200 "slow".
    Slow(Duration),
    /// Waits until the gate opens, then answers 200 "gated".
    Gated(Gate),
    /// Reads the request head, then closes the connection without answering.
    CloseWithoutAnswer,
    /// Reads the request head, then resets the connection (RST) without answering.
    ResetWithoutAnswer,
    /// Answers 500 "upstream failed".
    Fail500,
    /// Speaks the Dispatch pod contract: answers output and logs, or a FunctionError when
    /// the input has `"fail": true`; sleeps first when the input has `"sleepMs"`.
    Envelope,
    /// Waits a moment, then reads the body to its end, counting bytes; answers `{"bytes": n}`.
    CountBytes,
    /// Answers 200 with a body of this many bytes, made on the fly (with Content-Length).
    Produce(u64),
    /// The same without a length: chunked.
    ProduceChunked(u64),
    /// Answers 200 with the first bytes of a body that never ends.
    StallBody,
}

/// What an upstream saw.
#[derive(Default)]
pub struct Stats {
    /// TCP connections accepted.
    pub connections: AtomicUsize,
    /// TCP connections open now.
    pub open: AtomicUsize,
    /// Requests received (heads read).
    pub requests: AtomicUsize,
    pub inflight: AtomicUsize,
    pub max_inflight: AtomicUsize,
    /// Requests answered.
    pub completed: AtomicUsize,
    /// Requests whose handling was dropped before answering (the caller went away).
    pub dropped: AtomicUsize,
    pub bytes_received: AtomicU64,
    /// The last request, as [`Behavior::Echo`] shows it.
    pub last: Mutex<Option<Value>>,
}

impl Stats {
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::SeqCst)
    }
    pub fn max_inflight(&self) -> usize {
        self.max_inflight.load(Ordering::SeqCst)
    }
    pub fn completed(&self) -> usize {
        self.completed.load(Ordering::SeqCst)
    }
    pub fn dropped(&self) -> usize {
        self.dropped.load(Ordering::SeqCst)
    }
    pub fn last(&self) -> Value {
        self.last
            .lock()
            .unwrap()
            .clone()
            .expect("the upstream saw a request")
    }

    /// The `context` of the last envelope a [`Behavior::Envelope`] upstream got (its
    /// `secrets`, `deadline`, `event`, `httpContext`).
    pub fn last_context(&self) -> Value {
        let body = self.last()["body"].as_str().unwrap_or_default().to_string();
        let sent: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("the last request is not an envelope ({e}): {body}"));
        sent["context"].clone()
    }
}

/// A gate that gated upstreams wait on; opened once, stays open.
#[derive(Clone)]
pub struct Gate(Arc<tokio::sync::watch::Sender<bool>>);

impl Default for Gate {
    fn default() -> Self {
        Gate(Arc::new(tokio::sync::watch::channel(false).0))
    }
}

impl Gate {
    pub fn open(&self) {
        self.0.send_replace(true);
    }

    async fn wait(&self) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|open| *open).await;
    }
}

/// An upstream function server on loopback. Dropping it closes its listener and every
/// connection it has.
pub struct Upstream {
    pub addr: SocketAddr,
    pub stats: Arc<Stats>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Upstream {
    /// An HTTP/1.1 upstream on a new port.
    pub async fn start(behavior: Behavior) -> Upstream {
        Self::start_on("127.0.0.1:0".parse().unwrap(), behavior, false).await
    }

    /// An h2c (HTTP/2 with prior knowledge) upstream on a new port.
    pub async fn start_h2(behavior: Behavior) -> Upstream {
        Self::start_on("127.0.0.1:0".parse().unwrap(), behavior, true).await
    }

    pub async fn start_on(addr: SocketAddr, behavior: Behavior, h2: bool) -> Upstream {
        let listener = TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("binding an upstream on {addr}: {e}"));
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(Stats::default());
        let server = tokio::spawn(serve(listener, behavior, h2, stats.clone()));
        Upstream {
            addr,
            stats,
            server,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

async fn serve(listener: TcpListener, behavior: Behavior, h2: bool, stats: Arc<Stats>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                stats.connections.fetch_add(1, Ordering::SeqCst);
                stats.open.fetch_add(1, Ordering::SeqCst);
                let (behavior, stats) = (behavior.clone(), stats.clone());
                connections.spawn(async move {
                    connection(stream, behavior, h2, stats.clone()).await;
                    stats.open.fetch_sub(1, Ordering::SeqCst);
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn connection(mut stream: TcpStream, behavior: Behavior, h2: bool, stats: Arc<Stats>) {
    if let Behavior::CloseWithoutAnswer | Behavior::ResetWithoutAnswer = behavior {
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        stats.requests.fetch_add(1, Ordering::SeqCst);
        if let Behavior::ResetWithoutAnswer = behavior {
            stream.set_zero_linger().expect("SO_LINGER 0");
        }
        return; // dropped: closed (or reset) without a word
    }
    let service = service_fn(move |req| handle(behavior.clone(), stats.clone(), req));
    let io = TokioIo::new(stream);
    if h2 {
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(io, service)
            .await;
    } else {
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(io, service)
            .await;
    }
}

/// Counts a request in flight; on drop, as answered or as dropped.
struct InFlight {
    stats: Arc<Stats>,
    answered: bool,
}

impl InFlight {
    fn new(stats: &Arc<Stats>) -> InFlight {
        stats.requests.fetch_add(1, Ordering::SeqCst);
        let now = stats.inflight.fetch_add(1, Ordering::SeqCst) + 1;
        stats.max_inflight.fetch_max(now, Ordering::SeqCst);
        InFlight {
            stats: stats.clone(),
            answered: false,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.stats.inflight.fetch_sub(1, Ordering::SeqCst);
        if self.answered {
            self.stats.completed.fetch_add(1, Ordering::SeqCst);
        } else {
            self.stats.dropped.fetch_add(1, Ordering::SeqCst);
        }
    }
}

type UpBody = BoxBody<Bytes, Infallible>;

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<UpBody> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()).boxed())
        .unwrap()
}

async fn handle(
    behavior: Behavior,
    stats: Arc<Stats>,
    req: Request<Incoming>,
) -> Result<Response<UpBody>, Infallible> {
    let mut inflight = InFlight::new(&stats);
    let resp = match behavior {
        Behavior::Echo => echo(&stats, req).await,
        Behavior::Slow(pause) => {
            tokio::time::sleep(pause).await;
            full(StatusCode::OK, "text/plain", "slow")
        }
        Behavior::Gated(gate) => {
            gate.wait().await;
            full(StatusCode::OK, "text/plain", "gated")
        }
        Behavior::CloseWithoutAnswer | Behavior::ResetWithoutAnswer => {
            unreachable!("handled on the connection")
        }
        Behavior::Fail500 => full(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            "upstream failed",
        ),
        Behavior::Envelope => envelope(&stats, req).await,
        Behavior::CountBytes => {
            // A pause before reading: a gateway that does not stream would buffer meanwhile.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let mut body = req.into_body();
            let mut n = 0u64;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(frame) => {
                        if let Some(data) = frame.data_ref() {
                            n += data.len() as u64;
                            stats
                                .bytes_received
                                .fetch_add(data.len() as u64, Ordering::SeqCst);
                        }
                    }
                    Err(_) => break,
                }
            }
            full(
                StatusCode::OK,
                "application/json",
                json!({ "bytes": n }).to_string(),
            )
        }
        Behavior::Produce(len) => Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/octet-stream")
            .body(Repeat::new(len, 64 * 1024, true).boxed())
            .unwrap(),
        Behavior::ProduceChunked(len) => Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/octet-stream")
            .body(Repeat::new(len, 16 * 1024, false).boxed())
            .unwrap(),
        Behavior::StallBody => Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "text/plain")
            .body(Stall { sent: false }.boxed())
            .unwrap(),
    };
    inflight.answered = true;
    Ok(resp)
}

/// The request as JSON: what [`Behavior::Echo`] answers and records.
fn describe(parts: &http::request::Parts, body: &[u8]) -> Value {
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in &parts.headers {
        headers
            .entry(name.as_str().to_string())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "headers": headers,
        "body": String::from_utf8_lossy(body),
        "bodyLen": body.len(),
    })
}

async fn echo(stats: &Stats, req: Request<Incoming>) -> Response<UpBody> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    stats
        .bytes_received
        .fetch_add(body.len() as u64, Ordering::SeqCst);
    let seen = describe(&parts, &body);
    *stats.last.lock().unwrap() = Some(seen.clone());
    let mut resp = full(StatusCode::OK, "application/json", seen.to_string());
    let h = resp.headers_mut();
    h.insert("x-up", "1".parse().unwrap());
    if parts.headers.contains_key("x-echo-close") {
        h.insert("connection", "close".parse().unwrap());
    }
    if parts.headers.contains_key("x-echo-hop") {
        h.insert("connection", "x-up-hop".parse().unwrap());
        h.insert("x-up-hop", "secret".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("proxy-authenticate", "Basic".parse().unwrap());
        h.append("set-cookie", "a=1".parse().unwrap());
        h.append("set-cookie", "b=2".parse().unwrap());
    }
    resp
}

async fn envelope(stats: &Stats, req: Request<Incoming>) -> Response<UpBody> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    *stats.last.lock().unwrap() = Some(describe(&parts, &body));
    let Ok(sent) = serde_json::from_slice::<Value>(&body) else {
        return full(StatusCode::BAD_REQUEST, "text/plain", "not JSON");
    };
    let input = &sent["payload"];
    if let Some(ms) = input["sleepMs"].as_u64() {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let answer = if input["fail"] == json!(true) {
        json!({
            "context": {
                "logs": {"stdout": ["starting"], "stderr": ["about to fail"]},
                "error": {
                    "type": "FunctionError",
                    "message": "input asked to fail",
                    "stacktrace": ["at handle (hello.py:3)"],
                },
            },
            "payload": null,
        })
    } else {
        json!({
            "context": {
                "logs": {"stdout": ["called"], "stderr": ["a warning"]},
                "error": null,
            },
            "payload": {
                "greeting": format!("Hello, {}", input["name"].as_str().unwrap_or("nobody")),
                "input": input,
            },
        })
    };
    full(StatusCode::OK, "application/json", answer.to_string())
}

// ---------------------------------------------------------------------------------------
// /metrics
// ---------------------------------------------------------------------------------------

/// A scrape of `/metrics` in the Prometheus text format.
pub struct Metrics {
    pub text: String,
    series: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let mut series = Vec::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (head, value) = line.rsplit_once(' ').expect("a sample line");
            let value: f64 = value.parse().expect("a sample value");
            let (name, labels) = match head.split_once('{') {
                Some((name, rest)) => {
                    let inner = rest.strip_suffix('}').expect("closing brace");
                    let mut labels = BTreeMap::new();
                    for pair in inner.split("\",").filter(|p| !p.is_empty()) {
                        let (k, v) = pair.split_once("=\"").expect("label=\"value\"");
                        labels.insert(k.to_string(), v.trim_end_matches('"').to_string());
                    }
                    (name.to_string(), labels)
                }
                None => (head.to_string(), BTreeMap::new()),
            };
            series.push((name, labels, value));
        }
        Metrics {
            text: text.to_string(),
            series,
        }
    }

    /// The sum of the series called `name` whose labels include `labels`; None if none.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let matching: Vec<f64> = self
            .series
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).is_some_and(|have| have == v))
            })
            .map(|(_, _, v)| *v)
            .collect();
        (!matching.is_empty()).then(|| matching.iter().sum())
    }

    /// Like [`Metrics::get`], 0 when there is no such series.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }
}

// ---------------------------------------------------------------------------------------
// Runs and the client
// ---------------------------------------------------------------------------------------

/// Submits an async run of `function` with `input`, asserting the 202; gives the run.
pub async fn submit_run(gw: &Gateway, function: &str, input: Value) -> Value {
    let reply = gw
        .post_json(
            &format!("/v1/runs?functionName={function}"),
            &json!({"input": input}),
        )
        .await;
    assert_eq!(reply.status, 202, "{}", reply.text());
    reply.json()
}

/// Waits until run `name` is READY or ERROR, and gives it.
pub async fn run_finished(gw: &Gateway, name: &str, within: Duration) -> Value {
    let until = Instant::now() + within;
    loop {
        let reply = gw.get(&format!("/v1/runs/{name}")).await;
        if reply.status == 200 {
            let run = reply.json();
            if run["status"] == "READY" || run["status"] == "ERROR" {
                return run;
            }
        }
        assert!(
            Instant::now() < until,
            "run {name} not finished: {}",
            reply.text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Dead run `name` (input `{"name": "Hodor"}`) of a function whose upstream is to be at
/// `addr`: listed by `dispatch get runs --dead`; then, an envelope upstream started on
/// `addr`, sent again by `dispatch retry` and READY, having called it once. Gives the
/// upstream.
pub async fn dead_run_sent_again_by_the_cli(
    gw: &Gateway,
    name: &str,
    addr: SocketAddr,
) -> Upstream {
    let port = gw.addr.port().to_string();
    let (code, out) = dispatch_cli(&["get", "runs", "--dead", "-o", "json", "--port", &port]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(name), "{out}");
    let up = Upstream::start_on(addr, Behavior::Envelope, false).await;
    let (code, out) = dispatch_cli(&["retry", name, "--port", &port]).await;
    assert_eq!(code, 0, "{out}");
    let accepted: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(accepted["status"], "INITIALIZED");
    let run = run_finished(gw, name, Duration::from_secs(20)).await;
    assert_eq!(run["status"], "READY", "{run}");
    assert_eq!(run["output"]["greeting"], "Hello, Hodor");
    assert_eq!(up.stats.requests(), 1);
    up
}

/// Runs the `dispatch` client with `args` (in a HOME of its own, so no real config.json
/// is read, and with the harness's [`TOKEN`]): its exit code, and its stdout then stderr.
pub async fn dispatch_cli(args: &[&str]) -> (i32, String) {
    let home = tempfile::tempdir().unwrap();
    dispatch_cli_in(home.path(), &[("DISPATCH_TOKEN", TOKEN)], args).await
}

/// Runs the `dispatch` client with `args`, HOME `home` and `env`, and none of the test
/// process's `DISPATCH_*` variables: its exit code, and its stdout then stderr.
pub async fn dispatch_cli_in(home: &Path, env: &[(&str, &str)], args: &[&str]) -> (i32, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_dispatch"));
    cmd.args(args).env("HOME", home).stdin(Stdio::null());
    for (name, _) in std::env::vars() {
        if name.starts_with("DISPATCH_") {
            cmd.env_remove(name);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Installs a Debian package with apt-get (waiting up to 5 minutes for another apt's lock,
/// and running `apt-get update` once if the first try fails); the error is apt's stderr.
pub fn apt_install(package: &str) -> Result<(), String> {
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(["-o", "DPkg::Lock::Timeout=300"])
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
    };
    let install = ["install", "-y", "--no-install-recommends", package];
    let mut out = apt(&install);
    if !out.as_ref().is_ok_and(|o| o.status.success()) {
        let _ = apt(&["update"]);
        out = apt(&install);
    }
    match out {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(String::from_utf8_lossy(&o.stderr).into_owned()),
        Err(e) => Err(format!("running apt-get: {e}")),
    }
}
