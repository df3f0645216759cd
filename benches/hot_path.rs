//! Micro-benchmarks of the per-request work the gateway does outside the network: the
//! registry lookup, the header rewrite, the endpoint pick, the metrics record and the
//! Dispatch envelope. Run with `cargo bench --bench hot_path` (add `-- --quick` for a
//! short run); `cargo test --benches` runs each once as a smoke test.
//!
//! Ids are `group/name[/parameter]`, e.g. `registry/get_hit/10000`; keep them stable so
//! runs can be compared with `--save-baseline` / `--baseline`.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use criterion::{BatchSize, BenchmarkId, Criterion, criterion_group, criterion_main};
use http::StatusCode;
use http::header::{self, HeaderMap, HeaderValue};
use serde_json::{Value, json};

use dispatch::config::Config;
use dispatch::invoke::{balance, envelope, headers};
use dispatch::metrics::Metrics;
use dispatch::model::{Function, Protocol};
use dispatch::registry::{FunctionEntry, Registry};

/// As the server binary: allocation-heavy benches (header maps, JSON) then measure the
/// allocator production uses.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn new_registry() -> Registry {
    let data = std::env::temp_dir().join("dispatch-bench-registry");
    let files = dispatch::drivers::local::LocalFiles::new(&data).expect("temp dir");
    Registry::new(&Config::defaults(), files, Arc::new(Metrics::new()))
}

/// A static, raw function with the given endpoints, as the control API would receive it.
fn static_function(name: &str, endpoints: &[String]) -> Function {
    serde_json::from_value(json!({
        "name": name,
        "upstream": {"driver": "static", "endpoints": endpoints, "protocol": "raw"},
    }))
    .expect("a valid function")
}

/// Registers `function` the way the control API does: prepare, then publish.
fn register(registry: &Registry, function: Function) {
    let entry = registry.prepare(function).expect("a callable function");
    registry.insert(entry);
}

fn registry_get(c: &mut Criterion) {
    let mut group = c.benchmark_group("registry");
    let endpoint = vec!["http://127.0.0.1:9000".to_string()];
    for n in [1usize, 100, 10_000] {
        let registry = new_registry();
        for i in 0..n {
            register(&registry, static_function(&format!("fn-{i}"), &endpoint));
        }
        assert_eq!(registry.len(), n);
        let hit = format!("fn-{}", n / 2);
        // Same shape and length as a hit, but not registered.
        let miss = format!("fn-{n}");
        assert!(registry.get(&hit).is_some() && registry.get(&miss).is_none());

        group.bench_with_input(BenchmarkId::new("get_hit", n), &hit, |b, name| {
            b.iter(|| registry.get(black_box(name)))
        });
        group.bench_with_input(BenchmarkId::new("get_miss", n), &miss, |b, name| {
            b.iter(|| registry.get(black_box(name)))
        });
    }
    group.finish();
}

/// A request as wrk or curl sends it to `/function/{name}`.
fn client_request_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
    h.insert(header::USER_AGENT, HeaderValue::from_static("curl/8.5.0"));
    h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("36"));
    h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
    h
}

/// A function's answer as a Go HTTP server (the OpenFaaS watchdog) sends it: no
/// hop-by-hop headers, so `strip_hop_by_hop` takes its fast path.
fn upstream_response_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("42"));
    h.insert(
        header::DATE,
        HeaderValue::from_static("Mon, 06 Jan 2025 10:00:00 GMT"),
    );
    h.insert("x-duration-seconds", HeaderValue::from_static("0.000412"));
    h
}

/// The same answer from a server that announces keep-alive (Node's http module does):
/// `Connection` and `Keep-Alive` must go.
fn upstream_response_headers_keep_alive() -> HeaderMap {
    let mut h = upstream_response_headers();
    h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
    h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
    h
}

fn header_work(c: &mut Criterion) {
    let mut group = c.benchmark_group("headers");
    let request = client_request_headers();
    let peer = headers::Peer::new(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let call_id = HeaderValue::from_static("7f0c5d0e-2f4b-4a51-9b0e-3c2d1e0f4a5b");
    let start_time = HeaderValue::from(1_736_157_600_000_000_000u64);

    // The clone alone, to subtract from `to_upstream` (which includes it).
    group.bench_function("request_clone", |b| b.iter(|| black_box(&request).clone()));
    group.bench_function("to_upstream", |b| {
        b.iter(|| {
            let mut h = black_box(&request).clone();
            headers::to_upstream(&mut h, &peer, &call_id, &start_time);
            h
        })
    });

    // No X-Call-Id from the client: a new uuid v4 becomes the call id.
    group.bench_function("call_id_new", |b| {
        b.iter(|| headers::call_id(black_box(&request)))
    });

    // The map is cloned outside the timing; only the strip is measured.
    for (name, response) in [
        ("strip_hop_by_hop/none", upstream_response_headers()),
        (
            "strip_hop_by_hop/keep_alive",
            upstream_response_headers_keep_alive(),
        ),
    ] {
        group.bench_function(name, |b| {
            b.iter_batched_ref(
                || response.clone(),
                headers::strip_hop_by_hop,
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn endpoint_pick(c: &mut Criterion) {
    let mut group = c.benchmark_group("balance");
    let registry = new_registry();
    let sizes = [1usize, 3, 8, 16];
    for n in sizes {
        let endpoints: Vec<String> = (0..n)
            .map(|i| format!("http://127.0.0.1:{}", 9100 + i))
            .collect();
        register(&registry, static_function(&format!("pick-{n}"), &endpoints));
    }
    for n in sizes {
        let function: Arc<FunctionEntry> = registry.get(&format!("pick-{n}")).expect("registered");
        assert_eq!(function.endpoints.len(), n);
        let endpoints = &function.endpoints[..];
        // A first attempt: nothing tried yet.
        group.bench_with_input(BenchmarkId::new("pick", n), &endpoints, |b, endpoints| {
            b.iter(|| balance::pick(black_box(endpoints), black_box(0)))
        });
    }
    group.finish();
}

fn metrics_work(c: &mut Criterion) {
    let mut group = c.benchmark_group("metrics");

    let metrics = Metrics::new();
    let handle = metrics.for_function("fn-0");
    // The first call with a code resolves its handles; the bench measures the steady state.
    handle.observe(200, Duration::from_millis(3));
    group.bench_function("observe", |b| {
        b.iter(|| handle.observe(black_box(200), black_box(Duration::from_micros(2_750))))
    });

    let metrics = Metrics::new();
    let functions: Vec<_> = (0..100)
        .map(|i| {
            let f = metrics.for_function(&format!("fn-{i}"));
            f.service_count.set(1);
            for k in 0..20u64 {
                f.started.inc();
                f.observe(200, Duration::from_micros(500 + 997 * k));
            }
            f.started.inc();
            f.observe(502, Duration::from_millis(2));
            f
        })
        .collect();
    let size = metrics.render().len();
    assert!(size > 100 * 1024 / 10, "render gave only {size} bytes");
    group.bench_function(BenchmarkId::new("render", functions.len()), |b| {
        b.iter(|| metrics.render())
    });
    group.finish();
}

/// A ~10 KiB input: a page of records, as a batch job might send.
fn large_input() -> Value {
    let items: Vec<Value> = (0..80)
        .map(|i| {
            json!({
                "id": i,
                "sku": format!("SKU-{i:06}"),
                "name": format!("Item number {i} of the catalogue"),
                "price": 10.0 + i as f64 * 0.25,
                "tags": ["north", "winter", "stock"],
                "inStock": i % 3 != 0,
            })
        })
        .collect();
    json!({"page": 1, "items": items})
}

/// What an echo-style Dispatch function answers: its logs and `payload` as its output.
fn answer_for(payload: &Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "context": {
            "logs": {"stdout": ["handled one call"], "stderr": []},
            "error": null,
        },
        "payload": payload,
    }))
    .expect("a Value always encodes")
}

fn envelope_work(c: &mut Criterion) {
    let mut group = c.benchmark_group("envelope");
    let no_secrets = serde_json::Map::new();
    let ctx = envelope::Context {
        deadline_unix_ms: 1_736_157_630_000,
        event: None,
        http_context: None,
        secrets: &no_secrets,
    };
    let small = json!({"name": "Jon", "place": "Winterfell"});
    let large = large_input();
    let large_len = serde_json::to_vec(&large).expect("encodes").len();
    assert!(
        (9 * 1024..=11 * 1024).contains(&large_len),
        "the large input is {large_len} bytes"
    );

    for (size, input) in [("small", &small), ("10k", &large)] {
        group.bench_with_input(BenchmarkId::new("encode", size), input, |b, input| {
            b.iter(|| envelope::encode(Protocol::Dispatch, black_box(input), &ctx))
        });
        let answer = answer_for(input);
        let decoded = envelope::decode(Protocol::Dispatch, StatusCode::OK, &answer);
        assert!(decoded.error.is_none() && &decoded.output == input);
        group.bench_with_input(BenchmarkId::new("decode", size), &answer, |b, answer| {
            b.iter(|| envelope::decode(Protocol::Dispatch, StatusCode::OK, black_box(answer)))
        });
    }
    group.finish();
}

criterion_group! {
    name = hot_path;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    targets = registry_get, header_work, endpoint_pick, metrics_work, envelope_work
}
criterion_main!(hot_path);
