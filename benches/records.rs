//! Run records: writing a batch of runs, and a batch of raw calls, to the store, per backend. `cargo bench --bench records`.
//! The PostgreSQL case needs the machine's server (127.0.0.1:5432, user postgres); without
//! it the bench stops with a message naming it.

use std::sync::Arc;
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use dispatch::model::{CallFacts, Run, Status};
use dispatch::store::Store;
use dispatch::store::calls::{CallBatch, CallRecord};
use dispatch::store::postgres::PostgresStore;
use dispatch::store::sqlite::SqliteStore;
use serde_json::json;

/// A batch of runs like the raw surface records: small input and output, call facts.
fn batch(n: usize) -> Vec<Run> {
    (0..n)
        .map(|i| Run {
            name: dispatch::model::new_run_name().to_string(),
            function_name: "echo".into(),
            function_id: "3f1c".into(),
            blocking: true,
            input: json!({"name": "Jon", "i": i}),
            output: json!({"myField": "Hello, Jon from Winterfell"}),
            status: Status::Ready,
            call: Some(CallFacts {
                call_id: format!("call-{i}"),
                http_status: 200,
                duration_ms: 0.4,
                endpoint: "http://127.0.0.1:9000".into(),
                started_us: 1_795_570_878_000_000 + i as i64,
                ..CallFacts::default()
            }),
            ..Run::default()
        })
        .collect()
}

/// The same calls as the raw surface hands them to the store: one function's batch.
fn calls(n: usize) -> Vec<CallBatch> {
    let mut batch = CallBatch::new("echo");
    for i in 0..n {
        let call = CallRecord {
            function_id: "3f1c".into(),
            call_id: format!("call-{i}"),
            method: "POST".into(),
            path: "/function/echo".into(),
            started_us: 1_795_570_878_000_000 + i as i64,
            duration_us: 400,
            status: 200,
            endpoint: "http://127.0.0.1:9000".into(),
            input: bytes::Bytes::from(format!(r#"{{"name":"Jon","i":{i}}}"#)),
            output: bytes::Bytes::from_static(br#"{"myField":"Hello, Jon from Winterfell"}"#),
            complete: true,
            ..CallRecord::default()
        };
        batch.push(&(&call).into()).unwrap();
    }
    vec![batch]
}

fn put_runs(c: &mut Criterion, name: &str, store: Arc<dyn Store>, rt: &tokio::runtime::Runtime) {
    let mut group = c.benchmark_group("records");
    group.measurement_time(Duration::from_secs(4));
    group.warm_up_time(Duration::from_secs(1));
    group.throughput(criterion::Throughput::Elements(256));
    group.bench_function(format!("put_runs_256/{name}"), |b| {
        b.iter_batched(
            || batch(256),
            |runs| rt.block_on(store.put_runs(&runs)).unwrap(),
            BatchSize::SmallInput,
        )
    });
    group.bench_function(format!("put_records_256_raw_calls/{name}"), |b| {
        b.iter_batched(
            || calls(256),
            |calls| rt.block_on(store.put_records(&[], &calls)).unwrap(),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sqlite: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path()).unwrap());
    put_runs(c, "sqlite", sqlite, &rt);

    let db = format!("dispatch_bench_{}", std::process::id());
    let admin = "postgres://postgres@127.0.0.1:5432/postgres";
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(admin, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at 127.0.0.1:5432 is not reachable: {e}"));
        tokio::spawn(conn);
        // Two statements: neither may run inside a multi-statement batch.
        for sql in [
            format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
            format!("CREATE DATABASE {db}"),
        ] {
            client.batch_execute(&sql).await.unwrap();
        }
    });
    let url = format!("postgres://postgres@127.0.0.1:5432/{db}");
    let postgres: Arc<dyn Store> = Arc::new(rt.block_on(PostgresStore::connect(&url)).unwrap());
    put_runs(c, "postgres", postgres.clone(), &rt);
    drop(postgres);
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(admin, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let _ = client
            .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .await;
    });
}

criterion_group!(records, benches);
criterion_main!(records);
