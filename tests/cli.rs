//! The `dispatch` client verbs, run as a user runs them: the built binary against a real
//! gateway (create --file, get, exec, delete, errors), or against a small scripted HTTP
//! server that records what it was sent (headers, which address the configuration
//! chose, a function that takes a while to become READY).

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// What one run of the CLI did.
struct Outcome {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Outcome {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", self.stdout))
    }
}

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// A user's shell: a HOME of its own (so no real ~/.dispatch/config.json is read) and
/// none of the caller's DISPATCH_* variables.
struct Shell {
    home: tempfile::TempDir,
    env: Vec<(String, String)>,
}

impl Shell {
    fn new() -> Shell {
        Shell {
            home: tempfile::tempdir().unwrap(),
            env: Vec::new(),
        }
    }

    fn dir(&self) -> &Path {
        self.home.path()
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Runs `dispatch ARGS` off the test's runtime (the upstreams it calls live there).
    async fn run(&self, args: &[&str]) -> Outcome {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_dispatch"));
        cmd.args(args)
            .current_dir(self.dir())
            .env("HOME", self.dir())
            .stdin(Stdio::null());
        for (name, _) in std::env::vars() {
            if name.starts_with("DISPATCH_") {
                cmd.env_remove(name);
            }
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let out = tokio::task::spawn_blocking(move || cmd.output().expect("running dispatch"))
            .await
            .unwrap();
        Outcome {
            code: out.status.code().expect("an exit code"),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs `dispatch ARGS --port <the gateway's> --token <the harness's>`.
    async fn at(&self, gw: SocketAddr, args: &[&str]) -> Outcome {
        let port = gw.port().to_string();
        let mut all = args.to_vec();
        all.extend(["--port", &port, "--token", TOKEN]);
        self.run(&all).await
    }
}

fn seed(fns: &[(&str, &Upstream)], with_subscription: bool) -> String {
    let mut yaml = String::new();
    for (name, up) in fns {
        yaml.push_str(&format!(
            "kind: Function\nname: {name}\nsourcePath: code/hello.py\nimage: python3\n\
             handler: hello.handle\ntags:\n  - key: role\n    value : test\n\
             upstream:\n  driver: static\n  endpoints: ['{}']\n  protocol: dispatch\n---\n",
            up.url()
        ));
    }
    if with_subscription {
        // An API endpoint: it depends on its function.
        yaml.push_str(
            "kind: API\nname: post-hello\nfunction: hello-py\nmethods: [POST]\nuris: [/hello]\n---\n",
        );
    }
    yaml
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_file_creates_functions_then_the_apis_that_need_them() {
    let gw = Gateway::start().await;
    let up = Upstream::start(Behavior::Envelope).await;
    let sh = Shell::new();
    sh.write(
        "code/hello.py",
        "def handle(ctx, payload):\n    return payload\n",
    );
    // The API comes first in the file: it is made after the functions it runs.
    let yaml = format!(
        "{}{}",
        seed(&[], true),
        seed(&[("hello-py", &up), ("hello-two", &up)], false)
    );
    let file = sh.write("seed.yaml", &yaml);
    let file = file.to_str().unwrap();

    let out = sh.at(gw.addr, &["create", "--file", file]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        out.stdout,
        "Created Function: hello-py\nCreated Function: hello-two\nCreated API: post-hello\n",
        "{out:?}"
    );
    let api = gw.get("/v1/api/post-hello").await.json();
    assert_eq!(api["uris"], json!(["/hello"]), "{api}");
    assert_eq!(api["methods"], json!(["POST"]), "{api}");
    let listed = gw.get("/v1/function").await.json();
    let mut names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["hello-py", "hello-two"]);
    assert_eq!(
        listed[0]["tags"][0],
        json!({"key": "role", "value": "test"})
    );

    // Again: the functions and the API exist (409), reported and counted unless
    // --skip-existing.
    let out = sh.at(gw.addr, &["create", "--file", file]).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr
            .contains("Function \"hello-py\": [Code: 409] function \"hello-py\" already exists"),
        "{out:?}"
    );
    assert!(
        out.stderr
            .contains("API \"post-hello\": [Code: 409] API \"post-hello\" already exists"),
        "{out:?}"
    );
    let only_functions = sh.write("functions.yaml", &seed(&[("hello-py", &up)], false));
    let only_functions = only_functions.to_str().unwrap();
    let out = sh.at(gw.addr, &["create", "-f", only_functions]).await;
    assert_eq!(out.code, 1, "{out:?}");
    let out = sh
        .at(
            gw.addr,
            &["create", "-f", only_functions, "--skip-existing"],
        )
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("exists already"), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_file_stops_on_a_missing_source_before_creating_anything() {
    let gw = Gateway::start().await;
    let up = Upstream::start(Behavior::Envelope).await;
    let sh = Shell::new();
    let file = sh.write("seed.yaml", &seed(&[("hello-py", &up)], false));
    let out = sh
        .at(gw.addr, &["create", "-f", file.to_str().unwrap()])
        .await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("function \"hello-py\": sourcePath ")
            && out.stderr.contains("code/hello.py"),
        "{out:?}"
    );
    assert_eq!(gw.get("/v1/function").await.json(), json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_functions_prints_an_aligned_table_or_json() {
    let gw = Gateway::start().await;
    let up = Upstream::start(Behavior::Envelope).await;
    let sh = Shell::new();
    let endpoint = up.url();
    for name in ["a", "a-much-longer-name"] {
        let out = sh
            .at(
                gw.addr,
                &[
                    "create",
                    "function",
                    name,
                    "--endpoint",
                    &endpoint,
                    "--image",
                    "python3",
                ],
            )
            .await;
        assert_eq!(out.code, 0, "{out:?}");
        assert_eq!(out.stdout, format!("Created Function: {name}\n"));
    }

    let out = sh.at(gw.addr, &["get", "functions"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{out:?}");
    assert!(
        lines[0].starts_with("NAME                 IMAGE     STATUS   CREATED DATE"),
        "{out:?}"
    );
    let status_at = lines[0].find("STATUS").unwrap();
    for row in &lines[1..] {
        assert_eq!(row.find("READY"), Some(status_at), "{out:?}");
        assert!(
            row.ends_with(" UTC 2026") || row.contains(" UTC "),
            "{out:?}"
        );
    }
    assert!(lines[1].starts_with("a "), "{out:?}");

    let out = sh.at(gw.addr, &["get", "functions", "-o", "json"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let listed = out.json();
    assert_eq!(listed.as_array().unwrap().len(), 2, "{out:?}");
    assert!(listed[0]["upstream"]["endpoints"][0].is_string(), "{out:?}");

    let out = sh
        .at(gw.addr, &["get", "function", "a", "-o", "json"])
        .await;
    assert_eq!(out.json()["name"], "a", "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_wait_prints_the_run_and_get_runs_lists_it_page_by_page() {
    let gw = Gateway::start().await;
    let up = Upstream::start(Behavior::Envelope).await;
    let sh = Shell::new();
    let endpoint = up.url();
    let out = sh
        .at(
            gw.addr,
            &[
                "create",
                "function",
                "hello",
                "--endpoint",
                &endpoint,
                "--protocol",
                "dispatch",
            ],
        )
        .await;
    assert_eq!(out.code, 0, "{out:?}");

    let mut ids = Vec::new();
    for who in ["Ann", "Bob", "Cy"] {
        let input = json!({"name": who}).to_string();
        let out = sh
            .at(gw.addr, &["exec", "hello", "--input", &input, "--wait"])
            .await;
        assert_eq!(out.code, 0, "{out:?}");
        let run = out.json();
        assert_eq!(run["status"], "READY", "{out:?}");
        assert_eq!(
            run["output"]["greeting"],
            format!("Hello, {who}"),
            "{out:?}"
        );
        assert_eq!(run["logs"]["stdout"], json!(["called"]), "{out:?}");
        assert!(out.stdout.starts_with("{\n  \""), "pretty JSON: {out:?}");
        ids.push(run["name"].as_str().unwrap().to_string());
    }

    // Records are written off the request path: wait until all three are listed.
    let deadline = std::time::Instant::now() + PATIENCE;
    let out = loop {
        let out = sh.at(gw.addr, &["get", "runs", "hello"]).await;
        if out.stdout.lines().count() == 4 || std::time::Instant::now() > deadline {
            break out;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(out.code, 0, "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{out:?}");
    assert!(lines[0].starts_with("ID "), "{out:?}");
    assert!(lines[0].contains("FUNCTION   STATUS   STARTED"), "{out:?}");
    for id in &ids {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(id.as_str()) && l.contains(" hello ")),
            "run {id} listed: {out:?}"
        );
    }

    // One page of one, and a note that there is more; --all follows the cursors.
    let out = sh
        .at(
            gw.addr,
            &["get", "runs", "hello", "--limit", "1", "-o", "json"],
        )
        .await;
    assert_eq!(out.json().as_array().unwrap().len(), 1, "{out:?}");
    assert!(out.stderr.contains("more runs"), "{out:?}");
    let out = sh
        .at(
            gw.addr,
            &[
                "get", "runs", "hello", "--limit", "1", "--all", "-o", "json",
            ],
        )
        .await;
    let mut listed: Vec<String> = out
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect();
    listed.sort();
    ids.sort();
    assert_eq!(listed, ids, "{out:?}");
    assert!(!out.stderr.contains("more runs"), "{out:?}");

    // One run by id.
    let out = sh
        .at(gw.addr, &["get", "runs", "hello", &ids[0], "-o", "json"])
        .await;
    assert_eq!(out.json()["name"], ids[0].as_str(), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_print_the_dispatch_code_and_message_and_exit_1() {
    let gw = Gateway::start().await;
    let up = Upstream::start(Behavior::Envelope).await;
    let sh = Shell::new();

    let out = sh.at(gw.addr, &["get", "function", "nope"]).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(out.stderr, "[Code: 404] function \"nope\" not found\n");
    assert_eq!(out.stdout, "");

    let out = sh
        .at(gw.addr, &["exec", "nope", "--input", "{}", "--wait"])
        .await;
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(out.stderr, "[Code: 404] function \"nope\" not found\n");

    // Without --wait the run is queued: the accepted run is printed.
    let endpoint = up.url();
    sh.at(
        gw.addr,
        &["create", "function", "f", "--endpoint", &endpoint],
    )
    .await;
    let out = sh.at(gw.addr, &["exec", "f", "--input", "{}"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json()["status"], "INITIALIZED", "{out:?}");

    // API endpoints: made with Dispatch's flags, listed, and served.
    let out = sh
        .at(
            gw.addr,
            &[
                "create",
                "api",
                "hello",
                "f",
                "--method",
                "post",
                "--path",
                "/hi",
                "--domain",
                "localhost",
                "--https-only",
                "--cors",
                "--auth",
                "bearer",
            ],
        )
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout, "Created API: hello\n", "{out:?}");
    let api = gw.get("/v1/api/hello").await.json();
    assert_eq!(api["methods"], json!(["POST"]), "{api}");
    assert_eq!(api["uris"], json!(["/hi"]), "{api}");
    assert_eq!(api["hosts"], json!(["localhost"]), "{api}");
    assert_eq!(api["protocols"], json!(["https"]), "{api}");
    assert_eq!(api["cors"], true, "{api}");
    assert_eq!(api["authentication"], "bearer", "{api}");
    let out = sh.at(gw.addr, &["get", "apis"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let row = out
        .stdout
        .lines()
        .find(|l| l.split_whitespace().next() == Some("hello"))
        .unwrap_or_else(|| panic!("hello listed: {out:?}"));
    for cell in ["f", "/hi", "bearer", "READY"] {
        assert!(row.contains(cell), "{cell} in {row:?}");
    }
    let out = sh
        .at(gw.addr, &["create", "api", "bad", "f", "--auth", "magic"])
        .await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("--auth"), "{out:?}");

    let out = sh.at(gw.addr, &["exec", "f", "--input", "{oops"]).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.starts_with("--input: not JSON"), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_removes_one_object_or_a_files_objects() {
    let gw = Gateway::start().await;
    let up = Upstream::start(Behavior::Envelope).await;
    let sh = Shell::new();
    sh.write(
        "code/hello.py",
        "def handle(ctx, payload):\n    return payload\n",
    );
    let file = sh.write(
        "seed.yaml",
        &seed(&[("hello-py", &up), ("hello-two", &up)], true),
    );
    let file = file.to_str().unwrap();
    sh.at(gw.addr, &["create", "-f", file]).await;
    assert_eq!(
        gw.get("/v1/function")
            .await
            .json()
            .as_array()
            .unwrap()
            .len(),
        2
    );

    let out = sh.at(gw.addr, &["delete", "function", "hello-two"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout, "Deleted function: hello-two\n");
    assert_eq!(
        gw.get("/v1/function/hello-two").await.status,
        StatusCode::NOT_FOUND
    );

    // The file, in reverse order: the API first, then the functions; hello-two is gone
    // already.
    let out = sh.at(gw.addr, &["delete", "--file", file]).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(
        out.stdout, "Deleted API: post-hello\nDeleted Function: hello-py\n",
        "{out:?}"
    );
    assert!(
        out.stderr.contains("Function \"hello-two\": [Code: 404]"),
        "{out:?}"
    );
    assert_eq!(gw.get("/v1/api").await.json(), json!([]));
    assert_eq!(gw.get("/v1/function").await.json(), json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_is_not_there_is_named() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let sh = Shell::new();
    let out = sh
        .run(&["get", "functions", "--port", &port.to_string()])
        .await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.starts_with(&format!(
            "cannot reach the gateway at http://127.0.0.1:{port}: "
        )),
        "{out:?}"
    );
    assert!(out.stderr.contains("refused"), "{out:?}");

    // `create api --host` names the gateway: the message says which flag is the API's.
    let out = sh
        .run(&[
            "create",
            "api",
            "a",
            "f",
            "--path",
            "/a",
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
        ])
        .await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("the API's own host name is --domain"),
        "{out:?}"
    );

    let out = sh
        .run(&[
            "get",
            "functions",
            "--scheme",
            "gopher",
            "--port",
            &port.to_string(),
        ])
        .await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr
            .contains("scheme \"gopher\" is not one this client speaks"),
        "{out:?}"
    );
}

// ---------------------------------------------------------------------------------------
// A scripted gateway that records what it is sent
// ---------------------------------------------------------------------------------------

/// One request as the fake gateway saw it.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    path: String,
    headers: http::HeaderMap,
    body: Value,
}

type Script = Arc<dyn Fn(&Seen, usize) -> (u16, Value) + Send + Sync>;

/// An HTTP server on loopback that answers by `script(request, how many it saw before)`.
struct FakeGateway {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeGateway {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeGateway {
    async fn start(script: impl Fn(&Seen, usize) -> (u16, Value) + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let script: Script = Arc::new(script);
        let task = tokio::spawn({
            let seen = seen.clone();
            async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let (seen, script) = (seen.clone(), script.clone());
                    let service = service_fn(move |req: Request<Incoming>| {
                        let (seen, script) = (seen.clone(), script.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.unwrap().to_bytes();
                            let request = Seen {
                                method: parts.method.to_string(),
                                path: parts.uri.to_string(),
                                headers: parts.headers,
                                body: serde_json::from_slice(&body).unwrap_or(Value::Null),
                            };
                            let before = seen.lock().unwrap().len();
                            let (status, answer) = script(&request, before);
                            seen.lock().unwrap().push(request);
                            Ok::<_, Infallible>(
                                Response::builder()
                                    .status(status)
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(answer.to_string())))
                                    .unwrap(),
                            )
                        }
                    });
                    tokio::spawn(
                        hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service),
                    );
                }
            }
        });
        FakeGateway { addr, seen, task }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn header<'a>(seen: &'a Seen, name: &str) -> Option<&'a str> {
    seen.headers.get(name).map(|v| v.to_str().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_json_flags_and_headers() {
    let list = |_: &Seen, _: usize| (200, json!([]));
    let from_file = FakeGateway::start(list).await;
    let from_flag = FakeGateway::start(list).await;
    let mut sh = Shell::new();
    let config = json!({
        "host": "127.0.0.1",
        "port": from_file.addr.port(),
        "organization": "acme",
        "token": "file-token",
        "cookie": "ignored",
    });
    let config_path = sh.write("elsewhere/config.json", &config.to_string());
    let config_path = config_path.to_str().unwrap().to_string();

    // --config: the file's gateway, organization and token.
    let out = sh
        .run(&["get", "functions", "--config", &config_path])
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    let seen = from_file.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/v1/function");
    assert_eq!(header(&seen[0], "x-dispatch-org"), Some("acme"));
    assert_eq!(header(&seen[0], "authorization"), Some("Bearer file-token"));

    // Flags override the file key by key: another port and organization, the file's token.
    let port = from_flag.addr.port().to_string();
    let out = sh
        .run(&[
            "get",
            "functions",
            "--config",
            &config_path,
            "--port",
            &port,
            "--organization",
            "other",
        ])
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        from_file.seen().len(),
        1,
        "the file's gateway was not asked again"
    );
    let seen = from_flag.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(header(&seen[0], "x-dispatch-org"), Some("other"));
    assert_eq!(header(&seen[0], "authorization"), Some("Bearer file-token"));

    // $DISPATCH_CONFIG names the file too.
    sh.env = vec![("DISPATCH_CONFIG".into(), config_path.clone())];
    let out = sh.run(&["get", "runs"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(from_file.seen().len(), 2, "{out:?}");
    sh.env.clear();

    // Without any: ~/.dispatch/config.json; here without a token or organization, so the
    // default organization is sent and no Authorization.
    sh.write(
        ".dispatch/config.json",
        &json!({"port": from_flag.addr.port()}).to_string(),
    );
    let out = sh.run(&["get", "functions"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let seen = from_flag.seen();
    assert_eq!(seen.len(), 2, "{out:?}");
    assert_eq!(header(&seen[1], "x-dispatch-org"), Some("dispatch"));
    assert_eq!(header(&seen[1], "authorization"), None);

    // A --config that is not there is an error, not a silent fallback.
    let out = sh
        .run(&["get", "functions", "--config", "/nonexistent/config.json"])
        .await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("/nonexistent/config.json"), "{out:?}");
}

fn args(argv: &[String]) -> Vec<&str> {
    argv.iter().map(String::as_str).collect()
}

/// A function that the scripted gateway builds for `polls` GETs, then READY or ERROR.
fn building(polls: usize, end: &'static str) -> impl Fn(&Seen, usize) -> (u16, Value) {
    move |req: &Seen, before: usize| {
        let name = req.body["name"].as_str().unwrap_or("slow").to_string();
        match req.method.as_str() {
            "POST" => (201, json!({"name": name, "status": "CREATING"})),
            _ if before <= polls => (200, json!({"name": "slow", "status": "CREATING"})),
            _ if end == "READY" => (200, json!({"name": "slow", "status": "READY"})),
            _ => (
                200,
                json!({"name": "slow", "status": "ERROR", "reason": ["image python9 not found"]}),
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_waits_for_a_building_function_and_shows_how_it_ended() {
    let sh = Shell::new();
    let create = |port: u16| {
        vec![
            "create".to_string(),
            "function".into(),
            "slow".into(),
            "--endpoint".into(),
            "http://127.0.0.1:9".into(),
            "--port".into(),
            port.to_string(),
        ]
    };

    let fake = FakeGateway::start(building(2, "READY")).await;
    let argv = create(fake.addr.port());
    let out = sh.run(&args(&argv)).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout, "Created Function: slow\n");
    assert_eq!(
        out.stderr, "Waiting for function slow to become READY... READY\n",
        "{out:?}"
    );
    let seen = fake.seen();
    assert_eq!(seen.len(), 4, "one POST, three GETs: {seen:?}");
    assert_eq!(seen[1].path, "/v1/function/slow");

    let fake = FakeGateway::start(building(1, "ERROR")).await;
    let out = sh.run(&args(&create(fake.addr.port()))).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(
        out.stderr,
        "Waiting for function slow to become READY... ERROR: image python9 not found\n"
    );

    let fake = FakeGateway::start(building(100, "READY")).await;
    let mut argv = create(fake.addr.port());
    argv.push("--wait-timeout".into());
    argv.push("1".into());
    let out = sh.run(&args(&argv)).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("still CREATING after 1s"), "{out:?}");

    let fake = FakeGateway::start(building(100, "READY")).await;
    let mut argv = create(fake.addr.port());
    argv.push("--no-wait".into());
    let out = sh.run(&args(&argv)).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stderr, "", "{out:?}");
    assert_eq!(fake.seen().len(), 1);
}
