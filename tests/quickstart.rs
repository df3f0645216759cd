//! The README's quickstart, run as a user runs it: a gateway on its embedded defaults (a
//! data dir and port of its own), then exactly the README's `dispatch` commands with the
//! built binary, against `examples/seed.yaml`. The gateway's address and its control API
//! token reach the CLI as they reach a user's: the gateway's first start writes them into
//! `~/.dispatch/config.json` (in a HOME of the test's own, shared by both), with no step
//! in between.

mod common;

use std::process::{Command, Stdio};

use serde_json::{Value, json};

use common::{Gateway, request};

struct Shell {
    home: tempfile::TempDir,
}

impl Shell {
    /// Runs one command line of the README (split on spaces, with the JSON argument whole).
    async fn run(&self, args: &[&str]) -> (i32, String, String) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_dispatch"));
        cmd.args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("HOME", self.home.path())
            .stdin(Stdio::null());
        for (name, _) in std::env::vars() {
            if name.starts_with("DISPATCH_") {
                cmd.env_remove(name);
            }
        }
        let out = tokio::task::spawn_blocking(move || cmd.output().expect("running dispatch"))
            .await
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_quickstart_works_as_written() {
    let shell = Shell {
        home: tempfile::tempdir().unwrap(),
    };
    let home = shell.home.path().to_str().unwrap();
    // No token configured (the harness's is taken away) and the CLI configuration found
    // through HOME, as for `dispatch serve` with nothing set.
    let gw = Gateway::start_with(&[
        ("DISPATCH_AUTH_TOKEN", ""),
        ("DISPATCH_CONFIG", ""),
        ("HOME", home),
    ])
    .await;
    let written = shell.home.path().join(".dispatch").join("config.json");
    let written: Value = serde_json::from_str(&std::fs::read_to_string(&written).unwrap()).unwrap();
    assert_eq!(written["port"], gw.addr.port(), "{written}");

    let (code, out, err) = shell.run(&["create", "--file", "examples/seed.yaml"]).await;
    assert_eq!(code, 0, "create --file:\n{out}\n{err}");

    let (code, out, err) = shell.run(&["get", "functions"]).await;
    assert_eq!(code, 0, "{err}");
    for name in ["hello-py", "hello-js", "open-door"] {
        let line = out
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("{name} not listed:\n{out}"));
        assert!(line.contains("READY"), "{name} is not READY:\n{out}");
    }

    let (code, out, err) = shell
        .run(&[
            "exec",
            "hello-py",
            "--input",
            r#"{"name": "Jon", "place": "Winterfell"}"#,
            "--wait",
        ])
        .await;
    assert_eq!(code, 0, "{err}");
    let run: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(run["status"], "READY", "{run}");
    assert_eq!(
        run["output"],
        json!({"myField": "Hello, Jon from Winterfell"})
    );

    // The node function, its input schema, and the secret.
    let (_, out, _) = shell
        .run(&[
            "exec",
            "hello-js",
            "--input",
            r#"{"name": "Jon", "place": "Winterfell"}"#,
            "--wait",
        ])
        .await;
    let run: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        run["output"],
        json!({"myField": "Hello, Jon from Winterfell"}),
        "{run}"
    );
    let (_, out, _) = shell
        .run(&[
            "exec",
            "hello-js",
            "--input",
            r#"{"place": "Winterfell"}"#,
            "--wait",
        ])
        .await;
    let run: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(run["error"]["type"], "InputError", "{run}");
    let (_, out, _) = shell.run(&["exec", "open-door", "--wait"]).await;
    let run: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(run["output"], json!({"message": "the door opens"}), "{run}");

    // The seed's API endpoint, over HTTP and over HTTPS with the self-signed certificate.
    let reply = request(
        gw.api_http,
        http::Method::POST,
        "/hello",
        &[("content-type", "application/json")],
        bytes::Bytes::from_static(br#"{"name": "Jon", "place": "Winterfell"}"#),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        reply.json(),
        json!({"myField": "Hello, Jon from Winterfell"})
    );
    let tls = common::tls::TlsClient::trusting(&gw.data_dir().join("tls").join("api.crt"));
    let reply = tls
        .request(
            gw.api_https,
            http::Method::POST,
            "/hello",
            &[("content-type", "application/x-www-form-urlencoded")],
            "name=Arya&place=Braavos",
        )
        .await
        .unwrap();
    assert_eq!(reply.json(), json!({"myField": "Hello, Arya from Braavos"}));

    let (code, out, err) = shell.run(&["get", "runs"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.lines().filter(|l| l.contains("hello-py")).count() >= 1,
        "the hello-py run is listed:\n{out}"
    );
}
