//! Real Prometheus: Debian's `prometheus` (installed by the test when missing) scrapes a
//! gateway every second, and its HTTP API answers the queries `docs/metrics.md` gives for
//! rate, error ratio and p99 per function; `promtool check metrics` finds nothing to fault
//! in `/metrics`, of a gateway on the embedded queue and of one on RabbitMQ with an AMQP
//! event driver (the series only those have). Prometheus runs with its own config and storage in a temp dir, on a port
//! of its own (never the system service).

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use serde_json::{Value, json};

use common::rabbit::{self, TestQueues};
use common::{Behavior, Gateway, Upstream, apt_install, free_addr, function, request};

/// The examples of `docs/metrics.md`, per function.
const RATE: &str = "sum by (function_name) (rate(gateway_function_invocation_total[5m]))";
const ERROR_RATIO: &str = r#"(sum by (function_name) (rate(gateway_function_invocation_total{code=~"5.."}[5m])) or sum by (function_name) (rate(gateway_function_invocation_total[5m])) * 0) / sum by (function_name) (rate(gateway_function_invocation_total[5m]))"#;
const P99: &str = "histogram_quantile(0.99, sum by (function_name, le) (rate(gateway_functions_seconds_bucket[5m])))";

fn works(cmd: &str) -> bool {
    Command::new(cmd)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Installs Debian's `prometheus` package when `prometheus` or `promtool` is missing.
fn ensure_prometheus() {
    if works("prometheus") && works("promtool") {
        return;
    }
    let why = apt_install("prometheus").err().unwrap_or_default();
    assert!(
        works("prometheus") && works("promtool"),
        "this test needs Debian's prometheus package (prometheus and promtool), and \
         `apt-get install -y --no-install-recommends prometheus` failed: {why}"
    );
}

/// A Prometheus server scraping one target every second. Killed on drop.
struct Prometheus {
    addr: SocketAddr,
    child: Child,
    dir: tempfile::TempDir,
}

impl Prometheus {
    async fn start(target: SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        let mut file = std::fs::File::create(&config).unwrap();
        write!(
            file,
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: dispatch\n    static_configs:\n      - targets: ['{target}']\n"
        )
        .unwrap();
        let addr = free_addr();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting prometheus");
        let mut prometheus = Prometheus { addr, child, dir };
        let until = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(resp) = common::send(addr, get("/-/ready")).await
                && resp.status() == 200
            {
                return prometheus;
            }
            if let Ok(Some(status)) = prometheus.child.try_wait() {
                panic!("prometheus exited ({status}):\n{}", prometheus.log());
            }
            assert!(
                Instant::now() < until,
                "prometheus not ready:\n{}",
                prometheus.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// The result of an instant query, as `(labels, value)`.
    async fn query(&self, promql: &str) -> Vec<(Value, f64)> {
        let q: String = form_urlencoded::byte_serialize(promql.as_bytes()).collect();
        let path = format!("/api/v1/query?query={q}");
        let reply = request(self.addr, Method::GET, &path, &[], Bytes::new()).await;
        assert_eq!(reply.status, 200, "{promql}: {}", reply.text());
        let body = reply.json();
        assert_eq!(body["status"], "success", "{promql}: {body}");
        body["data"]["result"]
            .as_array()
            .unwrap_or_else(|| panic!("{promql}: {body}"))
            .iter()
            .map(|sample| {
                let value = sample["value"][1].as_str().unwrap_or("NaN");
                (sample["metric"].clone(), value.parse().unwrap_or(f64::NAN))
            })
            .collect()
    }

    /// The value of `promql` for function `name`, once Prometheus has one equal to
    /// `wanted` (waits for scrapes; no bound on how fast they come but a generous one).
    async fn wait_for(&self, promql: &str, name: &str, wanted: f64) {
        let until = Instant::now() + Duration::from_secs(120);
        loop {
            let got = of_function(&self.query(promql).await, name);
            if got == Some(wanted) {
                return;
            }
            assert!(
                Instant::now() < until,
                "{promql} for {name}: {got:?}, expected {wanted}; prometheus log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn get(path: &str) -> http::Request<http_body_util::Full<Bytes>> {
    http::Request::get(path)
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap()
}

fn of_function(samples: &[(Value, f64)], name: &str) -> Option<f64> {
    samples
        .iter()
        .find(|(labels, _)| labels["function_name"].as_str().unwrap_or("") == name)
        .map(|(_, v)| *v)
}

/// `calls` calls to each of `hello` (200) and `broken` (500).
async fn call(gw: &Gateway, calls: usize) {
    for _ in 0..calls {
        assert_eq!(gw.get("/function/hello").await.status, 200);
        assert_eq!(gw.get("/function/broken").await.status, 500);
    }
}

/// `/metrics` passes `promtool check metrics`.
fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics: {said}\n/metrics was:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_gateway_and_answers_per_function_queries() {
    ensure_prometheus();
    let ok = Upstream::start(Behavior::Echo).await;
    let failing = Upstream::start(Behavior::Fail500).await;
    let gw = Gateway::start().await;
    gw.register(&function("hello", &[ok.addr], json!({}))).await;
    gw.register(&function("broken", &[failing.addr], json!({})))
        .await;
    let prometheus = Prometheus::start(gw.addr).await;
    // Scraped at least once before the calls, and twice with calls between, so that
    // `rate` has two points apart.
    prometheus.wait_for(r#"up{job="dispatch"}"#, "", 1.0).await;
    call(&gw, 3).await;
    let total = "sum by (function_name) (gateway_function_invocation_total)";
    prometheus.wait_for(total, "hello", 3.0).await;
    call(&gw, 4).await;
    prometheus.wait_for(total, "hello", 7.0).await;
    prometheus.wait_for(total, "broken", 7.0).await;
    let by_code = prometheus
        .query(r#"gateway_function_invocation_total{function_name="broken"}"#)
        .await;
    assert_eq!(by_code.len(), 1, "{by_code:?}");
    assert_eq!(by_code[0].0["code"], "500");
    // The untyped OpenFaaS series are there as well.
    prometheus
        .wait_for("gateway_service_count", "hello", 1.0)
        .await;
    prometheus
        .wait_for("gateway_function_invocation_started", "broken", 7.0)
        .await;

    // The documented queries, per function.
    let rates = prometheus.query(RATE).await;
    assert!(
        of_function(&rates, "hello").is_some_and(|r| r > 0.0),
        "{rates:?}"
    );
    let errors = prometheus.query(ERROR_RATIO).await;
    assert_eq!(of_function(&errors, "broken"), Some(1.0), "{errors:?}");
    assert_eq!(of_function(&errors, "hello"), Some(0.0), "{errors:?}");
    let p99 = prometheus.query(P99).await;
    assert!(
        of_function(&p99, "hello").is_some_and(|s| s.is_finite() && s > 0.0),
        "{p99:?}"
    );

    // And the page is lint-clean, with every kind of series in it: an async run too.
    let reply = gw
        .post_json("/v1/runs?functionName=hello", &json!({"input": {"n": 1}}))
        .await;
    assert_eq!(reply.status, 202, "{}", reply.text());
    common::run_finished(
        &gw,
        reply.json()["name"].as_str().unwrap(),
        Duration::from_secs(30),
    )
    .await;
    promtool_check(&gw.get("/metrics").await.text());
}

/// The series only a gateway on RabbitMQ with an AMQP event driver has (the broker's
/// confirms, connection gauges, event outcomes) are lint-clean too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_finds_nothing_to_fault_on_a_gateway_on_rabbitmq_with_events() {
    ensure_prometheus();
    let queues = TestQueues::new().await;
    let mut env = queues.env();
    env.push(("DISPATCH_EVENTS_AMQP_URL", rabbit::URL.into()));
    env.push(("DISPATCH_EVENTS_QUEUE", format!("{}.events", queues.prefix)));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let gw = Gateway::start_with(&env).await;
    let up = Upstream::start(Behavior::Envelope).await;
    gw.register(&function(
        "hello",
        &[up.addr],
        json!({"upstream": {"protocol": "dispatch"}}),
    ))
    .await;
    let run = common::submit_run(&gw, "hello", json!({"name": "Sansa"})).await;
    let run =
        common::run_finished(&gw, run["name"].as_str().unwrap(), Duration::from_secs(30)).await;
    assert_eq!(run["status"], "READY", "{run}");
    // The event consumer connects on its own; wait for it (bounded), then look.
    let text = common::until_seen(
        "the event consumer connected, in /metrics",
        || async { gw.get("/metrics").await.text() },
        |text| text.contains("dispatch_events_amqp_connected 1"),
    )
    .await;
    for series in [
        "dispatch_queue_confirmed_total 1",
        "dispatch_queue_connected 1",
        "dispatch_events_amqp_connected 1",
        "dispatch_events_amqp_messages_total{outcome=\"accepted\"} 0",
    ] {
        assert!(text.contains(series), "no `{series}` in /metrics:\n{text}");
    }
    promtool_check(&text);
}
