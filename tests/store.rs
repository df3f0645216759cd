//! The store's contract, run against both backends: the embedded SQLite file and the
//! machine's PostgreSQL (127.0.0.1:5432, user `postgres`, trust auth). Each test gets a
//! fresh store: a temporary directory, or a database of its own that is dropped when the
//! test ends, passed or failed. Without PostgreSQL the PostgreSQL tests fail, naming it.

mod common;

use common::pg::TestDatabase;

use std::sync::Arc;

use dispatch::model::{BaseImage, CallFacts, Function, Image, Run, Secret, Status, Tag};
use dispatch::store::calls::{CallBatch, CallRecord};
use dispatch::store::postgres::PostgresStore;
use dispatch::store::sqlite::SqliteStore;
use dispatch::store::{Change, QueuedRun, RunPosition, RunQuery, Store, StoreError};

/// Runs each test on a SQLite store and on a PostgreSQL store. `stores` tests take the
/// open store; `backends` tests open (and reopen) it themselves.
macro_rules! on_both_backends {
    (stores: [$($store_test:ident),* $(,)?], backends: [$($backend_test:ident),* $(,)?] $(,)?) => {
        mod sqlite {
            $(#[tokio::test]
            async fn $store_test() {
                let backend = super::Backend::sqlite();
                super::$store_test(&*backend.open().await).await;
            })*
            $(#[tokio::test]
            async fn $backend_test() {
                super::$backend_test(&super::Backend::sqlite()).await;
            })*
        }
        mod postgres {
            $(#[tokio::test]
            async fn $store_test() {
                let backend = super::Backend::postgres().await;
                super::$store_test(&*backend.open().await).await;
            })*
            $(#[tokio::test]
            async fn $backend_test() {
                super::$backend_test(&super::Backend::postgres().await).await;
            })*
        }
    };
}

on_both_backends! {
    stores: [
        functions_are_created_updated_and_deleted,
        writing_a_run_twice_leaves_one_updated_record,
        a_run_is_read_back_by_name,
        runs_list_newest_first,
        paging_returns_each_run_once_while_new_runs_arrive,
        runs_filter_by_function_since_status_and_tags,
        a_run_outlives_its_function,
        old_runs_are_pruned_by_age_and_by_count,
        an_idempotency_key_is_claimed_once_per_window,
        base_images_and_images_are_created_and_deleted,
        secrets_are_created_replaced_and_deleted,
        catalog_changes_are_announced_to_other_gateways,
        queued_runs_are_taken_once_held_put_back_and_taken_again_after_a_hold_ends,
        raw_calls_are_read_listed_paged_and_pruned_with_the_runs,
    ],
    backends: [migrations_are_idempotent],
}

/// Where a test's store lives.
enum Backend {
    Sqlite(tempfile::TempDir),
    Postgres(TestDatabase),
}

impl Backend {
    fn sqlite() -> Self {
        Backend::Sqlite(tempfile::tempdir().expect("temporary directory"))
    }

    async fn postgres() -> Self {
        Backend::Postgres(TestDatabase::create().await)
    }

    async fn open(&self) -> Arc<dyn Store> {
        match self {
            Backend::Sqlite(dir) => Arc::new(SqliteStore::open(dir.path()).expect("open sqlite")),
            Backend::Postgres(db) => Arc::new(
                PostgresStore::connect(&db.url())
                    .await
                    .expect("connect to postgres"),
            ),
        }
    }
}

/// Microseconds: a start time well after the epoch, for runs to count from.
const T0: i64 = 1_795_000_000_000_000;

fn function(name: &str) -> Function {
    serde_json::from_value(serde_json::json!({
        "name": name,
        "createdTime": 1_795_000_000,
        "modifiedTime": 1_795_000_000,
        "upstream": {"driver": "static", "endpoints": ["http://127.0.0.1:9"]}
    }))
    .unwrap()
}

fn run(function: &str, started_us: i64, status: Status, tags: &[(&str, &str)]) -> Run {
    Run {
        name: uuid::Uuid::new_v4().to_string(),
        function_name: function.into(),
        status,
        executed_time: started_us / 1_000_000,
        tags: tags
            .iter()
            .map(|(key, value)| Tag {
                key: key.to_string(),
                value: value.to_string(),
            })
            .collect(),
        call: Some(CallFacts {
            call_id: uuid::Uuid::new_v4().to_string(),
            http_status: 200,
            started_us,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn names(runs: &[Run]) -> Vec<&str> {
    runs.iter().map(|r| r.name.as_str()).collect()
}

/// `runs` in listing order: newest first, then by name, byte by byte, descending.
fn newest_first(runs: &[Run]) -> Vec<Run> {
    let mut sorted = runs.to_vec();
    sorted.sort_by(|a, b| {
        (RunPosition::of(b).started_us, &b.name).cmp(&(RunPosition::of(a).started_us, &a.name))
    });
    sorted
}

fn query(limit: u32) -> RunQuery {
    RunQuery {
        limit,
        ..Default::default()
    }
}

async fn functions_are_created_updated_and_deleted(store: &dyn Store) {
    store.ping().await.unwrap();
    assert!(store.list_functions().await.unwrap().is_empty());
    store.create_function(&function("a")).await.unwrap();
    match store.create_function(&function("a")).await {
        Err(e @ StoreError::Conflict(_)) => {
            assert_eq!(e.to_string(), "function \"a\" already exists")
        }
        other => panic!("a second \"a\" is a conflict, got {other:?}"),
    }
    let mut b = function("b");
    store.create_function(&b).await.unwrap();
    b.timeout = Some(50);
    b.modified_time = 1_795_000_060;
    store.update_function(&b).await.unwrap();

    let all = store.list_functions().await.unwrap();
    assert_eq!(
        all.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert_eq!(all[1], b);

    match store.update_function(&function("zz")).await {
        Err(e @ StoreError::NotFound(_)) => assert_eq!(e.to_string(), "function \"zz\" not found"),
        other => panic!("updating \"zz\" is not found, got {other:?}"),
    }
    store.delete_function("a").await.unwrap();
    assert!(matches!(
        store.delete_function("a").await,
        Err(StoreError::NotFound(_))
    ));
    let all = store.list_functions().await.unwrap();
    assert_eq!(all, [b]);
}

async fn writing_a_run_twice_leaves_one_updated_record(store: &dyn Store) {
    let mut r = run("f", T0, Status::Ready, &[]);
    store.put_runs(&[r.clone()]).await.unwrap();
    store.put_runs(&[r.clone()]).await.unwrap();
    assert_eq!(store.list_runs(&query(10)).await.unwrap(), [r.clone()]);

    r.status = Status::Error;
    r.output = serde_json::json!({"answer": 42});
    store.put_runs(&[r.clone()]).await.unwrap();
    assert_eq!(store.list_runs(&query(10)).await.unwrap(), [r.clone()]);

    // The same run twice in one batch: the later write wins.
    let mut later = r.clone();
    later.finished_time = 1_795_000_009;
    store.put_runs(&[r.clone(), later.clone()]).await.unwrap();
    assert_eq!(store.list_runs(&query(10)).await.unwrap(), [later]);
}

async fn a_run_is_read_back_by_name(store: &dyn Store) {
    let mut r = run("f", T0, Status::Ready, &[("env", "prod")]);
    r.input = serde_json::json!({"name": "Jon"});
    r.output = serde_json::json!({"myField": "Hello, Jon"});
    r.logs.stdout = vec!["hello".into()];
    let other = run("f", T0 + 1, Status::Ready, &[]);
    store.put_runs(&[r.clone(), other]).await.unwrap();
    assert_eq!(store.get_run(&r.name).await.unwrap(), Some(r));
    assert_eq!(store.get_run("no-such-run").await.unwrap(), None);
}

async fn runs_list_newest_first(store: &dyn Store) {
    // Out of order, and two pairs started in the same microsecond: ties go by name.
    let runs = [
        run("f", T0 + 5, Status::Ready, &[]),
        run("f", T0 + 1, Status::Ready, &[]),
        run("f", T0 + 9, Status::Ready, &[]),
        run("f", T0 + 5, Status::Ready, &[]),
        run("f", T0 + 1, Status::Ready, &[]),
        run("f", T0 + 7, Status::Ready, &[]),
    ];
    store.put_runs(&runs).await.unwrap();
    let expected = newest_first(&runs);
    let listed = store.list_runs(&query(100)).await.unwrap();
    assert_eq!(names(&listed), names(&expected));
    let listed = store.list_runs(&query(2)).await.unwrap();
    assert_eq!(names(&listed), names(&expected[..2]));
}

async fn paging_returns_each_run_once_while_new_runs_arrive(store: &dyn Store) {
    // 25 runs, in pairs that started in the same microsecond, so pages split ties.
    let runs: Vec<Run> = (0..25)
        .map(|i| run("f", T0 + i / 2, Status::Ready, &[]))
        .collect();
    store.put_runs(&runs).await.unwrap();
    let expected = newest_first(&runs);

    let mut seen = Vec::new();
    let mut pages = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .list_runs(&RunQuery {
                limit: 10,
                after: after.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        pages.push(page.len());
        let Some(last) = page.last() else { break };
        after = Some(RunPosition::of(last));
        seen.extend(page.iter().map(|r| r.name.clone()));
        // Newer runs arrive between pages: they belong before the first page, not later.
        let newer: Vec<Run> = (0..3)
            .map(|i| run("f", T0 + 1_000 + i, Status::Ready, &[]))
            .collect();
        store.put_runs(&newer).await.unwrap();
    }
    assert_eq!(pages, [10, 10, 5, 0]);
    assert_eq!(seen, names(&expected));
}

async fn runs_filter_by_function_since_status_and_tags(store: &dyn Store) {
    let since = T0 / 1_000_000 + 100;
    let old = run(
        "f1",
        since * 1_000_000 - 1,
        Status::Ready,
        &[("env", "prod")],
    );
    let at_since = run("f1", since * 1_000_000, Status::Ready, &[("env", "prod")]);
    let failed = run(
        "f2",
        since * 1_000_000 + 5,
        Status::Error,
        &[("env", "dev"), ("team", "a_b")],
    );
    let near_team = run(
        "f2",
        since * 1_000_000 + 6,
        Status::Ready,
        &[("team", "axb")],
    );
    let percent = run(
        "f1",
        since * 1_000_000 + 7,
        Status::Ready,
        &[("load", "50%")],
    );
    let near_percent = run(
        "f1",
        since * 1_000_000 + 8,
        Status::Ready,
        &[("load", "500")],
    );
    let all = [
        old.clone(),
        at_since.clone(),
        failed.clone(),
        near_team.clone(),
        percent.clone(),
        near_percent.clone(),
    ];
    store.put_runs(&all).await.unwrap();

    let list = |q: RunQuery| async move {
        let runs = store
            .list_runs(&RunQuery { limit: 100, ..q })
            .await
            .unwrap();
        runs.into_iter().map(|r| r.name).collect::<Vec<_>>()
    };
    let expect = |runs: &[&Run]| {
        let owned: Vec<Run> = runs.iter().map(|r| (*r).clone()).collect();
        newest_first(&owned)
            .into_iter()
            .map(|r| r.name)
            .collect::<Vec<_>>()
    };
    let tags = |tags: &[(&str, Option<&str>)]| {
        tags.iter()
            .map(|(k, v)| (k.to_string(), v.map(str::to_string)))
            .collect::<Vec<_>>()
    };

    assert_eq!(
        list(RunQuery {
            function_name: Some("f1".into()),
            ..Default::default()
        })
        .await,
        expect(&[&old, &at_since, &percent, &near_percent])
    );
    assert_eq!(
        list(RunQuery {
            since: Some(since),
            ..Default::default()
        })
        .await,
        expect(&[&at_since, &failed, &near_team, &percent, &near_percent])
    );
    assert_eq!(
        list(RunQuery {
            status: Some(Status::Error),
            ..Default::default()
        })
        .await,
        expect(&[&failed])
    );
    assert_eq!(
        list(RunQuery {
            tags: tags(&[("env", Some("prod"))]),
            ..Default::default()
        })
        .await,
        expect(&[&old, &at_since])
    );
    assert_eq!(
        list(RunQuery {
            tags: tags(&[("team", None)]),
            ..Default::default()
        })
        .await,
        expect(&[&failed, &near_team])
    );
    // `_` and `%` in a filter are literal characters, not LIKE wildcards.
    assert_eq!(
        list(RunQuery {
            tags: tags(&[("team", Some("a_b"))]),
            ..Default::default()
        })
        .await,
        expect(&[&failed])
    );
    assert_eq!(
        list(RunQuery {
            tags: tags(&[("load", Some("50%"))]),
            ..Default::default()
        })
        .await,
        expect(&[&percent])
    );
    assert_eq!(
        list(RunQuery {
            tags: tags(&[("t_am", None)]),
            ..Default::default()
        })
        .await,
        Vec::<String>::new()
    );
    // Every filter must hold.
    assert_eq!(
        list(RunQuery {
            function_name: Some("f2".into()),
            status: Some(Status::Error),
            since: Some(since),
            tags: tags(&[("env", Some("dev")), ("team", Some("a_b"))]),
            ..Default::default()
        })
        .await,
        expect(&[&failed])
    );
    assert_eq!(
        list(RunQuery {
            function_name: Some("f1".into()),
            tags: tags(&[("env", Some("dev"))]),
            ..Default::default()
        })
        .await,
        Vec::<String>::new()
    );
}

async fn a_run_outlives_its_function(store: &dyn Store) {
    store.create_function(&function("f")).await.unwrap();
    let r = run("f", T0, Status::Ready, &[]);
    store.put_runs(std::slice::from_ref(&r)).await.unwrap();
    store.delete_function("f").await.unwrap();
    assert_eq!(store.get_run(&r.name).await.unwrap(), Some(r.clone()));
    let by_function = store
        .list_runs(&RunQuery {
            function_name: Some("f".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(by_function, [r]);
}

async fn old_runs_are_pruned_by_age_and_by_count(store: &dyn Store) {
    let runs: Vec<Run> = (0..10)
        .map(|i| run("f", T0 + i * 1_000_000, Status::Ready, &[]))
        .collect();
    store.put_runs(&runs).await.unwrap();
    let left = |n: usize| {
        let names: Vec<String> = runs[10 - n..]
            .iter()
            .rev()
            .map(|r| r.name.clone())
            .collect();
        names
    };
    let listed = || async {
        store
            .list_runs(&RunQuery {
                limit: 100,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.name)
            .collect::<Vec<_>>()
    };
    // Older than the 3rd run: the first two go.
    assert_eq!(
        store.prune_runs(Some(T0 + 2_000_000), None).await.unwrap(),
        2
    );
    assert_eq!(listed().await, left(8));
    // Keep the newest 5.
    assert_eq!(store.prune_runs(None, Some(5)).await.unwrap(), 3);
    assert_eq!(listed().await, left(5));
    // Nothing left to remove.
    assert_eq!(store.prune_runs(Some(T0), Some(5)).await.unwrap(), 0);
}

async fn an_idempotency_key_is_claimed_once_per_window(store: &dyn Store) {
    use dispatch::store::Claim;
    let claim = |run: &'static str, now: i64| store.claim_key("f", "key", run, now, now - 100);
    assert_eq!(claim("r1", 1_000).await.unwrap(), Claim::New);
    assert_eq!(
        claim("r2", 1_050).await.unwrap(),
        Claim::Existing("r1".into())
    );
    // Another function's key of the same name is its own.
    assert_eq!(
        store.claim_key("g", "key", "r3", 1_050, 950).await.unwrap(),
        Claim::New
    );
    // Past the window the key is free again, for the next run.
    assert_eq!(claim("r4", 1_200).await.unwrap(), Claim::New);
    assert_eq!(
        claim("r5", 1_250).await.unwrap(),
        Claim::Existing("r4".into())
    );
    // Released by a run that never started: free at once; a release by another run is ignored.
    store.release_key("f", "key", "r5").await.unwrap();
    assert_eq!(
        claim("r6", 1_260).await.unwrap(),
        Claim::Existing("r4".into())
    );
    store.release_key("f", "key", "r4").await.unwrap();
    assert_eq!(claim("r7", 1_270).await.unwrap(), Claim::New);
    // Old keys are forgotten.
    assert_eq!(store.prune_keys(1_265).await.unwrap(), 1);
    assert_eq!(store.prune_keys(1_265).await.unwrap(), 0);
}

async fn base_images_and_images_are_created_and_deleted(store: &dyn Store) {
    let base = |name: &str| BaseImage {
        name: name.into(),
        id: uuid::Uuid::new_v4().to_string(),
        language: "python3".into(),
        docker_url: "dispatchframework/python3-base:0.0.13".into(),
        status: Status::Ready,
        tags: vec![Tag {
            key: "k".into(),
            value: "v".into(),
        }],
        ..Default::default()
    };
    assert!(store.list_base_images().await.unwrap().is_empty());
    store.create_base_image(&base("py")).await.unwrap();
    store.create_base_image(&base("js")).await.unwrap();
    match store.create_base_image(&base("py")).await {
        Err(e @ StoreError::Conflict(_)) => {
            assert_eq!(e.to_string(), "base image \"py\" already exists")
        }
        other => panic!("a second \"py\" is a conflict, got {other:?}"),
    }
    let all = store.list_base_images().await.unwrap();
    assert_eq!(
        all.iter().map(|b| b.name.as_str()).collect::<Vec<_>>(),
        ["js", "py"]
    );
    assert_eq!(
        store.get_base_image("py").await.unwrap().unwrap().language,
        "python3"
    );
    assert_eq!(store.get_base_image("nope").await.unwrap(), None);

    let image = Image {
        name: "hello".into(),
        base_image_name: "py".into(),
        language: "python3".into(),
        status: Status::Error,
        reason: vec!["interpreter python3 not found on PATH".into()],
        ..Default::default()
    };
    store.create_image(&image).await.unwrap();
    assert!(matches!(
        store.create_image(&image).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(
        store.list_images().await.unwrap(),
        std::slice::from_ref(&image)
    );
    assert_eq!(store.get_image("hello").await.unwrap(), Some(image));
    store.delete_image("hello").await.unwrap();
    match store.delete_image("hello").await {
        Err(e @ StoreError::NotFound(_)) => assert_eq!(e.to_string(), "image \"hello\" not found"),
        other => panic!("deleting \"hello\" twice is not found, got {other:?}"),
    }
    store.delete_base_image("py").await.unwrap();
    assert!(matches!(
        store.delete_base_image("py").await,
        Err(StoreError::NotFound(_))
    ));
    let left = store.list_base_images().await.unwrap();
    assert_eq!(left, [all[0].clone()]);
    assert_eq!(left[0].name, "js");
}

async fn secrets_are_created_replaced_and_deleted(store: &dyn Store) {
    let mut secret = Secret {
        name: "db".into(),
        id: uuid::Uuid::new_v4().to_string(),
        ..Default::default()
    };
    secret.secrets.insert("password".into(), "hunter2".into());
    store.create_secret(&secret).await.unwrap();
    assert!(matches!(
        store.create_secret(&secret).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(store.get_secret("db").await.unwrap(), Some(secret.clone()));
    secret.secrets.insert("password".into(), "rotated".into());
    store.update_secret(&secret).await.unwrap();
    assert_eq!(store.list_secrets().await.unwrap(), [secret.clone()]);
    let unknown = Secret {
        name: "nope".into(),
        ..Default::default()
    };
    match store.update_secret(&unknown).await {
        Err(e @ StoreError::NotFound(_)) => assert_eq!(e.to_string(), "secret \"nope\" not found"),
        other => panic!("updating \"nope\" is not found, got {other:?}"),
    }
    store.delete_secret("db").await.unwrap();
    assert!(matches!(
        store.delete_secret("db").await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(store.get_secret("db").await.unwrap(), None);
}

async fn catalog_changes_are_announced_to_other_gateways(store: &dyn Store) {
    // SQLite has one gateway: nothing to announce.
    let Some(mut changes) = store.watch_catalog() else {
        return;
    };
    async fn next(changes: &mut tokio::sync::mpsc::UnboundedReceiver<Change>) -> Change {
        tokio::time::timeout(std::time::Duration::from_secs(10), changes.recv())
            .await
            .expect("a change within 10 s")
            .expect("the listener runs")
    }
    // The listener announces a resync once it listens; changes made after it arrive.
    assert_eq!(next(&mut changes).await, Change::Resync);
    let secret = Secret {
        name: "db".into(),
        ..Default::default()
    };
    store.create_secret(&secret).await.unwrap();
    assert_eq!(
        next(&mut changes).await,
        Change::Changed("secret:db".into())
    );
    store
        .create_base_image(&BaseImage {
            name: "py".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        next(&mut changes).await,
        Change::Changed("baseimage:py".into())
    );
    store.delete_secret("db").await.unwrap();
    assert_eq!(
        next(&mut changes).await,
        Change::Changed("secret:db".into())
    );
}

async fn migrations_are_idempotent(backend: &Backend) {
    // Several gateways starting at once on a fresh store.
    let (a, b, c) = tokio::join!(backend.open(), backend.open(), backend.open());
    a.create_function(&function("f")).await.unwrap();
    let r = run("f", T0, Status::Ready, &[]);
    b.put_runs(std::slice::from_ref(&r)).await.unwrap();
    assert_eq!(c.list_functions().await.unwrap(), [function("f")]);
    drop((a, b, c));

    let again = backend.open().await;
    assert_eq!(again.list_functions().await.unwrap(), [function("f")]);
    assert_eq!(again.get_run(&r.name).await.unwrap(), Some(r));
}

#[tokio::test]
async fn postgres_connect_errors_name_the_url_without_its_password() {
    let Err(e) = PostgresStore::connect("postgres://postgres:s3cret@127.0.0.1:1/dispatch").await
    else {
        panic!("nothing listens on port 1");
    };
    let message = e.to_string();
    assert!(
        message.starts_with("cannot connect to postgres://postgres@127.0.0.1:1/dispatch: "),
        "{message}"
    );
    assert!(message.contains("refused"), "says why: {message}");
    assert!(!message.contains("s3cret"), "{message}");
}

#[tokio::test]
async fn postgres_names_its_url_without_its_password() {
    let db = TestDatabase::create().await;
    let url = db.url().replace("postgres@", "postgres:unused@");
    let store = PostgresStore::connect(&url).await.unwrap();
    assert_eq!(store.url(), db.url());
}

fn queued(run: &Run, not_before_us: i64) -> QueuedRun {
    QueuedRun {
        name: run.name.clone(),
        function_name: run.function_name.clone(),
        job: format!("{{\"run\":\"{}\"}}", run.name),
        attempts: 0,
        not_before_us,
        submitted_us: not_before_us,
    }
}

async fn queued_runs_are_taken_once_held_put_back_and_taken_again_after_a_hold_ends(
    store: &dyn Store,
) {
    let (a, b) = (
        run("f", 1_000, Status::Initialized, &[]),
        run("f", 2_000, Status::Initialized, &[]),
    );
    // Accepted together, in one transaction.
    store
        .enqueue_runs(&[
            (a.clone(), queued(&a, 1_000)),
            (b.clone(), queued(&b, 5_000)),
        ])
        .await
        .unwrap();
    // The record is there at once, INITIALIZED.
    let stored = store.get_run(&a.name).await.unwrap().expect("record of a");
    assert_eq!(stored.status, Status::Initialized);
    // The same run accepted twice is refused: it would run twice. With it, a batch is
    // refused whole: the new run in it is not accepted either.
    let c = run("f", 3_000, Status::Initialized, &[]);
    assert!(
        store
            .enqueue_runs(&[
                (c.clone(), queued(&c, 3_000)),
                (a.clone(), queued(&a, 1_000))
            ])
            .await
            .is_err()
    );
    assert!(store.get_run(&c.name).await.unwrap().is_none());

    // At 2_000 only `a` is due; taken, it is held until 10_000.
    let taken = store.take_queued(2_000, 10_000, 10).await.unwrap();
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].name, a.name);
    assert_eq!(taken[0].attempts, 1);
    assert_eq!(taken[0].job, format!("{{\"run\":\"{}\"}}", a.name));
    // Held: nobody else takes it; `b` is due by now.
    let taken = store.take_queued(6_000, 10_000, 10).await.unwrap();
    assert_eq!(
        taken.iter().map(|q| &q.name).collect::<Vec<_>>(),
        vec![&b.name]
    );
    // Put back for a retry at 7_000: taken again then, counting a second attempt.
    store.requeue_run(&a.name, 7_000).await.unwrap();
    assert!(
        store
            .take_queued(6_500, 20_000, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let again = store.take_queued(7_000, 20_000, 10).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].attempts, 2);
    // A hold renewed (the run goes on) keeps it: not taken at 10_000.
    store.hold_run(&b.name, 12_000).await.unwrap();
    assert!(
        store
            .take_queued(10_000, 30_000, 10)
            .await
            .unwrap()
            .iter()
            .all(|q| q.name != b.name)
    );
    // `b`'s holder died: after its hold ends, it is taken again.
    let retaken = store.take_queued(12_000, 30_000, 10).await.unwrap();
    assert_eq!(
        retaken.iter().map(|q| &q.name).collect::<Vec<_>>(),
        vec![&b.name]
    );
    // Given up: with the dead letters, never taken; revived, taken again.
    let mut failed = a.clone();
    failed.status = Status::Error;
    store.finish_queued(&failed, true).await.unwrap();
    assert_eq!(
        store.get_run(&a.name).await.unwrap().unwrap().status,
        Status::Error,
        "the record is written with the burial"
    );
    assert!(
        store
            .take_queued(40_000, 50_000, 10)
            .await
            .unwrap()
            .iter()
            .all(|q| q.name != a.name)
    );
    assert_eq!(store.dead_runs(10).await.unwrap(), vec![a.name.clone()]);
    assert!(store.revive_run(&a.name, 60_000).await.unwrap());
    assert!(
        !store.revive_run(&a.name, 60_000).await.unwrap(),
        "only the dead revive"
    );
    assert!(store.dead_runs(10).await.unwrap().is_empty());
    let revived = store.take_queued(60_000, 70_000, 10).await.unwrap();
    let revived: Vec<_> = revived.iter().filter(|q| q.name == a.name).collect();
    assert_eq!(revived.len(), 1);
    assert_eq!(revived[0].attempts, 1, "attempts start afresh");
    // Done: out of the queue for good.
    let mut done = b.clone();
    done.status = Status::Ready;
    store.finish_queued(&a, false).await.unwrap();
    store.finish_queued(&done, false).await.unwrap();
    assert_eq!(
        store.get_run(&b.name).await.unwrap().unwrap().status,
        Status::Ready
    );
    assert!(
        store
            .take_queued(i64::MAX / 2, i64::MAX / 2, 10)
            .await
            .unwrap()
            .is_empty()
    );
    // The records stay.
    assert!(store.get_run(&b.name).await.unwrap().is_some());
}

fn call(started_us: i64, status: u16) -> CallRecord {
    CallRecord {
        function_id: "f-id".into(),
        call_id: format!("call-{started_us}"),
        method: "POST".into(),
        path: "/function/echo".into(),
        started_us,
        duration_us: 250,
        status,
        endpoint: "http://127.0.0.1:9".into(),
        input: bytes::Bytes::from(format!(r#"{{"at":{started_us}}}"#)),
        output: bytes::Bytes::from_static(b"plain text"),
        complete: true,
        ..Default::default()
    }
}

/// Raw-call records (which SQLite packs) read, list, page and prune like any run, mixed
/// with the runs of the Dispatch surface in one order.
async fn raw_calls_are_read_listed_paged_and_pruned_with_the_runs(store: &dyn Store) {
    // Runs and calls interleaved in time; two functions; the calls' batches overlap in time.
    let runs: Vec<Run> = (0..4)
        .map(|i| run("echo", T0 + i * 10_000_000, Status::Ready, &[("k", "v")]))
        .collect();
    let batch = |function: &str, offsets: &[(i64, u16)]| {
        let mut batch = CallBatch::new(function);
        for &(at, status) in offsets {
            batch.push(&(&call(T0 + at, status)).into()).unwrap();
        }
        batch
    };
    let calls = vec![
        batch("echo", &[(5_000_000, 200), (25_000_000, 502), (1_000, 200)]),
        batch("other", &[(15_000_000, 200)]),
    ];
    store.put_records(&runs, &calls).await.unwrap();
    store
        .put_records(&[], &[batch("echo", &[(35_000_000, 200), (2_000, 404)])])
        .await
        .unwrap();

    let everything = store.list_runs(&query(100)).await.unwrap();
    assert_eq!(everything.len(), 10, "{:?}", names(&everything));
    assert_eq!(names(&everything), names(&newest_first(&everything)));
    // Each listed call reads back by its name, as the listing showed it.
    for listed in everything.iter().filter(|r| r.tags.is_empty()) {
        let read = store.get_run(&listed.name).await.unwrap();
        assert_eq!(read.as_ref(), Some(listed), "{}", listed.name);
        let facts = listed.call.as_ref().unwrap();
        assert_eq!(listed.input, serde_json::json!({"at": facts.started_us}));
        assert_eq!(listed.output, serde_json::json!("plain text"));
        assert_eq!(listed.status == Status::Error, facts.http_status >= 400);
    }
    let starts: Vec<i64> = everything
        .iter()
        .map(|r| RunPosition::of(r).started_us - T0)
        .collect();
    assert_eq!(
        starts,
        [
            35_000_000, 30_000_000, 25_000_000, 20_000_000, 15_000_000, 10_000_000, 5_000_000,
            2_000, 1_000, 0
        ]
    );

    // Pages of 3 give each once, in the same order, while more calls arrive.
    let mut paged = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .list_runs(&RunQuery {
                limit: 3,
                after: after.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        store
            .put_records(&[], &[batch("echo", &[(90_000_000, 200)])])
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        after = Some(RunPosition::of(last));
        paged.extend(page);
    }
    assert_eq!(names(&paged), names(&everything));

    // Filters: function, status, since, tags.
    let filtered = |q: RunQuery| async move { store.list_runs(&q).await.unwrap() };
    let other = filtered(RunQuery {
        function_name: Some("other".into()),
        ..query(100)
    })
    .await;
    assert_eq!(other.len(), 1);
    assert_eq!(other[0].function_name, "other");
    let failed = filtered(RunQuery {
        status: Some(Status::Error),
        ..query(100)
    })
    .await;
    let codes: Vec<u16> = failed
        .iter()
        .map(|r| r.call.as_ref().unwrap().http_status)
        .collect();
    assert_eq!(codes, [502, 404]);
    let recent = filtered(RunQuery {
        since: Some((T0 + 30_000_000) / 1_000_000),
        ..query(100)
    })
    .await;
    // The five calls made while paging, the call at 35 s and the run at 30 s.
    assert_eq!(recent.len(), 7, "{:?}", names(&recent));
    let tagged = filtered(RunQuery {
        tags: vec![("k".into(), Some("v".into()))],
        ..query(100)
    })
    .await;
    assert_eq!(tagged.len(), 4);
    assert!(
        store
            .get_run("5f0e0000-0000-8000-8000-000000000099")
            .await
            .unwrap()
            .is_none()
    );

    // Retention by age: runs started before, and batches of calls that all did.
    let before = store.list_runs(&query(1000)).await.unwrap();
    assert_eq!(before.len(), 15); // five more calls arrived while paging
    // (A backend that packs calls removes a batch once all its calls are that old.)
    let removed = store.prune_runs(Some(T0 + 12_000_000), None).await.unwrap() as usize;
    let aged = store.list_runs(&query(1000)).await.unwrap();
    assert_eq!(removed, before.len() - aged.len());
    assert!((2..=5).contains(&removed), "{removed} removed");
    assert!(
        aged.iter()
            .all(|r| r.tags.is_empty() || RunPosition::of(r).started_us >= T0 + 12_000_000)
    );
    // By count: calls and runs together, the oldest first (a batch goes whole).
    let removed = store.prune_runs(None, Some(6)).await.unwrap();
    let left = store.list_runs(&query(1000)).await.unwrap();
    assert_eq!(removed as usize, aged.len() - left.len());
    assert!((1..=6).contains(&left.len()), "{} left", left.len());
    assert_eq!(names(&left), names(&before[..left.len()]));
}
