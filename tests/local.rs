//! The local driver end to end: functions registered from source (a base64 tar.gz, as
//! Dispatch's CLI sends it) with no `upstream` run in python3 and nodejs runtime processes
//! the gateway starts itself. Needs `python3` and `node` on the PATH.

mod common;

use std::io::Write;
use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};

use common::{Gateway, eventually};

/// A base64 tar.gz holding `files`, as `dispatch create function` sends it.
fn source(files: &[(&str, &str)]) -> String {
    let mut tar = tar::Builder::new(Vec::new());
    for (name, text) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(text.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, name, text.as_bytes()).unwrap();
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar.into_inner().unwrap()).unwrap();
    base64::engine::general_purpose::STANDARD.encode(gz.finish().unwrap())
}

const HELLO_PY: &str = r#"
def handle(ctx, payload):
    name = "Noone"
    place = "Nowhere"
    if payload:
        name = payload.get("name", name)
        place = payload.get("place", place)
    print("saying hello to", name)
    return {"myField": "Hello, %s from %s" % (name, place)}
"#;

const HELLO_JS: &str = r#"
module.exports = function (context, params) {
  let name = "Noone";
  let place = "Nowhere";
  if (params.name) name = params.name;
  if (params.place) place = params.place;
  console.log("saying hello to", name);
  return { myField: "Hello, " + name + " from " + place };
};
"#;

/// The base images and images of the seed: `python3` and `nodejs`.
async fn images(gw: &Gateway) {
    for (base, language) in [("python3-base", "python3"), ("nodejs-base", "nodejs")] {
        let reply = gw
            .post_json(
                "/v1/baseimage",
                &json!({"name": base, "dockerUrl": format!("dispatchframework/{language}-base:0.0.13"), "language": language}),
            )
            .await;
        assert_eq!(reply.status, 201, "{}", reply.text());
        let image = language.trim_end_matches('3');
        let image = if image == "python" { "python3" } else { image };
        let reply = gw
            .post_json("/v1/image", &json!({"name": image, "baseImageName": base}))
            .await;
        assert_eq!(reply.status, 201, "{}", reply.text());
    }
}

/// Registers a local function and waits until it leaves CREATING; gives it as it is then.
async fn create(
    gw: &Gateway,
    name: &str,
    image: &str,
    handler: &str,
    files: &[(&str, &str)],
    extra: Value,
) -> Value {
    let mut spec =
        json!({"name": name, "image": image, "handler": handler, "source": source(files)});
    common::merge(&mut spec, extra);
    let reply = gw.post_json("/v1/function", &spec).await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    assert_eq!(reply.json()["status"], "CREATING");
    let path = format!("/v1/function/{name}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let now = gw.get(&path).await.json();
        if now["status"] != "CREATING" {
            return now;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name} still CREATING after 20 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_and_node_functions_from_source_run_with_their_logs() {
    let gw = Gateway::start().await;
    images(&gw).await;
    let py = create(
        &gw,
        "hello-py",
        "python3",
        "hello.handle",
        &[("hello.py", HELLO_PY)],
        json!({}),
    )
    .await;
    assert_eq!(py["status"], "READY", "{py}");
    let js = create(
        &gw,
        "hello-js",
        "nodejs",
        "hello.handle",
        &[("hello.js", HELLO_JS)],
        json!({}),
    )
    .await;
    assert_eq!(js["status"], "READY", "{js}");
    for name in ["hello-py", "hello-js"] {
        let run = gw
            .run(name, json!({"name": "Jon", "place": "Winterfell"}))
            .await
            .json();
        assert_eq!(run["status"], "READY", "{run}");
        assert_eq!(
            run["output"],
            json!({"myField": "Hello, Jon from Winterfell"})
        );
        let stdout = run["logs"]["stdout"].to_string();
        assert!(stdout.contains("saying hello to Jon"), "{name}: {run}");
    }
    // The OpenFaaS surface: the body is the input, the output is the answer.
    let reply = gw
        .post_json(
            "/function/hello-py",
            &json!({"name": "Arya", "place": "Braavos"}),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json(), json!({"myField": "Hello, Arya from Braavos"}));
    // Its X-Call-Id names the run it was, even when the caller's id could not (not a uuid).
    let reply = common::request(
        gw.addr,
        http::Method::POST,
        "/function/hello-py",
        &[("x-call-id", "my-call")],
        bytes::Bytes::from_static(b"{\"name\": \"Arya\"}"),
    )
    .await;
    let id = reply.header("x-call-id").expect("X-Call-Id").to_string();
    assert_ne!(id, "my-call");
    let run = gw.get(&format!("/v1/runs/{id}")).await.json();
    assert_eq!(run["functionName"], "hello-py", "{run}");
    assert_eq!(run["output"]["myField"], "Hello, Arya from Nowhere");
    // The source is not echoed back.
    assert!(
        gw.get("/v1/function/hello-py")
            .await
            .json()
            .get("source")
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_function_is_error_with_the_reason() {
    let gw = Gateway::start().await;
    images(&gw).await;
    let syntax = create(
        &gw,
        "syntax",
        "python3",
        "bad.handle",
        &[("bad.py", "def handle(ctx, p):\n    x = 1\n    return (\n")],
        json!({}),
    )
    .await;
    assert_eq!(syntax["status"], "ERROR", "{syntax}");
    let reason = syntax["reason"].to_string();
    assert!(
        reason.contains("SyntaxError") && reason.contains("line"),
        "{reason}"
    );
    let missing = create(
        &gw,
        "missing",
        "nodejs",
        "nothere.handle",
        &[("hello.js", HELLO_JS)],
        json!({}),
    )
    .await;
    assert_eq!(missing["status"], "ERROR");
    assert!(
        missing["reason"]
            .to_string()
            .contains("nothere.js not found"),
        "{missing}"
    );
    let nofunc = create(
        &gw,
        "nofunc",
        "python3",
        "hello.other",
        &[("hello.py", HELLO_PY)],
        json!({}),
    )
    .await;
    assert!(
        nofunc["reason"]
            .to_string()
            .contains("has no function other"),
        "{nofunc}"
    );
    // Not READY: a run is refused.
    assert_eq!(gw.run("syntax", json!({})).await.status, 404);
    // An image that does not exist: the function is kept, ERROR, saying so.
    let reply = gw
        .post_json(
            "/v1/function",
            &json!({"name": "x", "image": "cobol", "handler": "a.b", "source": source(&[("a.py", "")])}),
        )
        .await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    assert_eq!(reply.json()["status"], "ERROR");
    assert!(
        reply.json()["reason"].to_string().contains("cobol"),
        "{}",
        reply.text()
    );
    assert_eq!(gw.run("x", json!({})).await.status, 404);
}

const MISBEHAVING_PY: &str = r#"
import os, sys, time
def handle(ctx, payload):
    what = payload.get("do")
    if what == "raise":
        raise ValueError("boom")
    if what == "loop":
        while True:
            time.sleep(0.01)
    if what == "exit":
        os._exit(7)
    if what == "flood":
        for i in range(200000):
            print("x" * 100)
        return "flooded"
    if what == "set":
        return {1, 2}
    return "fine"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_functions_get_clear_run_errors_and_the_next_call_works() {
    let gw = Gateway::start().await;
    images(&gw).await;
    let f = create(
        &gw,
        "wild",
        "python3",
        "wild.handle",
        &[("wild.py", MISBEHAVING_PY)],
        json!({"timeout": 1000}),
    )
    .await;
    assert_eq!(f["status"], "READY", "{f}");
    let fine = |run: &Value| {
        assert_eq!(run["status"], "READY", "{run}");
        assert_eq!(run["output"], "fine");
    };

    let run = gw.run("wild", json!({"do": "raise"})).await.json();
    assert_eq!(run["status"], "ERROR");
    assert_eq!(run["error"]["type"], "FunctionError");
    assert!(
        run["error"]["message"]
            .as_str()
            .unwrap()
            .contains("ValueError: boom"),
        "{run}"
    );
    assert!(
        !run["error"]["stacktrace"].as_array().unwrap().is_empty(),
        "{run}"
    );

    let run = gw.run("wild", json!({"do": "set"})).await.json();
    assert!(
        run["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not JSON"),
        "{run}"
    );

    let run = gw.run("wild", json!({"do": "flood"})).await.json();
    assert_eq!(run["output"], "flooded", "{}", run["error"]);
    let last = run["logs"]["stdout"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .to_string();
    assert!(last.contains("logs cut at"), "{last}");
    fine(&gw.run("wild", json!({})).await.json());

    let run = gw.run("wild", json!({"do": "loop"})).await.json();
    assert_eq!(run["status"], "ERROR");
    assert!(
        run["error"]["message"]
            .as_str()
            .unwrap()
            .contains("deadline exceeded after 1000 ms"),
        "{run}"
    );
    fine(&gw.run("wild", json!({})).await.json());

    let run = gw.run("wild", json!({"do": "exit"})).await.json();
    assert_eq!(run["status"], "ERROR");
    assert!(
        run["error"]["message"].as_str().unwrap().contains("exited"),
        "{run}"
    );
    fine(&gw.run("wild", json!({})).await.json());

    // Another function kept working all along.
    let other = create(
        &gw,
        "calm",
        "python3",
        "hello.handle",
        &[("hello.py", HELLO_PY)],
        json!({}),
    )
    .await;
    assert_eq!(other["status"], "READY");
    assert_eq!(gw.run("calm", json!({})).await.json()["status"], "READY");
}

/// The live child processes of `pid` (whichever of its threads started them).
fn children(pid: u32) -> Vec<u32> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    tasks
        .flatten()
        .flat_map(|task| {
            std::fs::read_to_string(task.path().join("children"))
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .filter(|&child| alive(child))
        .collect()
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_runtimes_stop_and_runtimes_die_with_a_killed_gateway() {
    let mut gw = Gateway::start_with(&[("DISPATCH_LOCAL_IDLE_SECONDS", "1")]).await;
    images(&gw).await;
    create(
        &gw,
        "idle",
        "python3",
        "hello.handle",
        &[("hello.py", HELLO_PY)],
        json!({}),
    )
    .await;
    assert_eq!(gw.run("idle", json!({})).await.json()["status"], "READY");
    let pid = gw.pid();
    assert_eq!(
        children(pid).len(),
        1,
        "one runtime process after the first call"
    );
    eventually(Duration::from_secs(10), "the idle runtime to stop", || {
        children(pid).is_empty()
    })
    .await;
    // Started again on the next call.
    assert_eq!(gw.run("idle", json!({})).await.json()["status"], "READY");
    let runtime = children(pid);
    assert_eq!(runtime.len(), 1);
    gw.crash(); // SIGKILL: no chance to stop its children
    eventually(
        Duration::from_secs(10),
        "the runtime to exit with its gateway",
        || !alive(runtime[0]),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_first_call_start_a_check_makes_it_ready_and_the_first_call_starts_it() {
    let gw = Gateway::start_with(&[("DISPATCH_LOCAL_START", "first-call")]).await;
    images(&gw).await;
    let f = create(
        &gw,
        "lazy",
        "nodejs",
        "hello.handle",
        &[("hello.js", HELLO_JS)],
        json!({}),
    )
    .await;
    assert_eq!(f["status"], "READY", "{f}");
    let pid = gw.pid();
    eventually(
        Duration::from_secs(5),
        "no runtime before the first call",
        || children(pid).is_empty(),
    )
    .await;
    let run = gw.run("lazy", json!({"name": "Jon"})).await.json();
    assert_eq!(run["output"]["myField"], "Hello, Jon from Nowhere", "{run}");
    assert_eq!(children(pid).len(), 1);
    let broken = create(
        &gw,
        "broken",
        "python3",
        "bad.handle",
        &[("bad.py", "def handle(:\n")],
        json!({}),
    )
    .await;
    assert_eq!(broken["status"], "ERROR");
    assert!(broken["reason"].to_string().contains("line 1"), "{broken}");
}

const SERIAL_PY: &str = r#"
import os, time
def handle(ctx, payload):
    path = payload["file"]
    with open(path, "a") as f:
        f.write("start\n")
    time.sleep(0.2)
    with open(path, "a") as f:
        f.write("end\n")
    return os.getpid()
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_serves_at_most_its_concurrency() {
    let gw = Gateway::start_with(&[("DISPATCH_LOCAL_PROCESS_CONCURRENCY", "1")]).await;
    images(&gw).await;
    create(
        &gw,
        "serial",
        "python3",
        "serial.handle",
        &[("serial.py", SERIAL_PY)],
        json!({}),
    )
    .await;
    let file = gw.data_dir().join("serial.log");
    let file = file.to_str().unwrap().to_string();
    let calls: Vec<_> = (0..3)
        .map(|_| {
            let (addr, file) = (gw.addr, file.clone());
            tokio::spawn(async move {
                let body = json!({"blocking": true, "input": {"file": file}}).to_string();
                common::request(
                    addr,
                    http::Method::POST,
                    "/v1/runs?functionName=serial",
                    &[("content-type", "application/json")],
                    body.into(),
                )
                .await
            })
        })
        .collect();
    for call in calls {
        let reply = call.await.unwrap();
        assert_eq!(reply.json()["status"], "READY", "{}", reply.text());
    }
    // One process, one call at a time: the marks never interleave.
    let marks = std::fs::read_to_string(&file).unwrap();
    assert_eq!(
        marks,
        "start\nend\n".repeat(3),
        "calls overlapped:\n{marks}"
    );
}
