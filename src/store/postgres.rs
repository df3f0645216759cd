//! The PostgreSQL store, for several gateway replicas sharing their registrations and runs.
//! It behaves as the SQLite store does (same tables, same errors, same run order), so the
//! rest of the gateway cannot tell them apart. Calls go through a pool of connections, so
//! concurrent calls don't wait on each other; migrations run at start-up under an advisory
//! lock, so gateways starting together apply each version once.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime,
};
use tokio::sync::mpsc;
use tokio_postgres::config::Host;
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, NoTls};

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::{
    CatalogKind, Change, Claim, FunctionChange, QueuedRun, RunQuery, Store, StoreError,
    run_started_us, tag_pattern, tags_key,
};
use crate::error::error_chain as chain;
use crate::model::{BaseImage, Function, Image, Run, Secret, Subscription};

/// Schema versions, in order; `schema_migrations` holds the versions that have run.
/// Names compare byte by byte (`COLLATE "C"`), as SQLite's do, so runs list in the same
/// order on both backends whatever the database's locale.
const MIGRATIONS: &[&str] = &[
    r#"CREATE TABLE functions (
        name TEXT COLLATE "C" PRIMARY KEY,
        spec TEXT NOT NULL,
        created_time BIGINT NOT NULL,
        modified_time BIGINT NOT NULL
    );"#,
    // Runs outlive their functions: no foreign key. `tags` is `tags_key` (see store/mod.rs).
    r#"CREATE TABLE runs (
        name TEXT COLLATE "C" PRIMARY KEY,
        function_name TEXT NOT NULL,
        status TEXT NOT NULL,
        started_us BIGINT NOT NULL,
        tags TEXT NOT NULL,
        record TEXT NOT NULL
    );
    CREATE INDEX runs_by_start ON runs (started_us DESC, name DESC);
    CREATE INDEX runs_by_function ON runs (function_name, started_us DESC, name DESC);"#,
    // Every change to a function, whoever makes it, tells the gateways listening on
    // `dispatch_functions` which one changed (see `watch_functions`).
    r#"CREATE FUNCTION dispatch_function_changed() RETURNS trigger AS $$
    BEGIN
        PERFORM pg_notify('dispatch_functions', COALESCE(NEW.name, OLD.name));
        RETURN NULL;
    END $$ LANGUAGE plpgsql;
    CREATE TRIGGER function_changed AFTER INSERT OR UPDATE OR DELETE ON functions
        FOR EACH ROW EXECUTE FUNCTION dispatch_function_changed();"#,
    r#"CREATE TABLE idempotency_keys (
        function_name TEXT NOT NULL,
        key TEXT NOT NULL,
        run_name TEXT NOT NULL,
        created_us BIGINT NOT NULL,
        PRIMARY KEY (function_name, key)
    );"#,
    // Base images, images and secrets: one JSON document per name (see `CatalogKind`).
    // Every change tells the gateways listening on `dispatch_catalog` which entry changed,
    // as `<kind>:<name>` (see `watch_catalog`).
    r#"CREATE TABLE base_images (name TEXT COLLATE "C" PRIMARY KEY, spec TEXT NOT NULL);
    CREATE TABLE images (name TEXT COLLATE "C" PRIMARY KEY, spec TEXT NOT NULL);
    CREATE TABLE secrets (name TEXT COLLATE "C" PRIMARY KEY, spec TEXT NOT NULL);
    CREATE FUNCTION dispatch_catalog_changed() RETURNS trigger AS $$
    BEGIN
        PERFORM pg_notify('dispatch_catalog', TG_ARGV[0] || ':' || COALESCE(NEW.name, OLD.name));
        RETURN NULL;
    END $$ LANGUAGE plpgsql;
    CREATE TRIGGER base_image_changed AFTER INSERT OR UPDATE OR DELETE ON base_images
        FOR EACH ROW EXECUTE FUNCTION dispatch_catalog_changed('baseimage');
    CREATE TRIGGER image_changed AFTER INSERT OR UPDATE OR DELETE ON images
        FOR EACH ROW EXECUTE FUNCTION dispatch_catalog_changed('image');
    CREATE TRIGGER secret_changed AFTER INSERT OR UPDATE OR DELETE ON secrets
        FOR EACH ROW EXECUTE FUNCTION dispatch_catalog_changed('secret');"#,
    // The embedded queue of async runs. `held_until_us` 0: nobody holds it.
    r#"CREATE TABLE queue (
        name TEXT COLLATE "C" PRIMARY KEY,
        function_name TEXT NOT NULL,
        job TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        not_before_us BIGINT NOT NULL,
        held_until_us BIGINT NOT NULL DEFAULT 0,
        submitted_us BIGINT NOT NULL,
        dead BOOLEAN NOT NULL DEFAULT false
    );
    CREATE INDEX queue_due ON queue (not_before_us);"#,
    r#"CREATE TABLE subscriptions (name TEXT COLLATE "C" PRIMARY KEY, spec TEXT NOT NULL);
    CREATE TRIGGER subscription_changed AFTER INSERT OR UPDATE OR DELETE ON subscriptions
        FOR EACH ROW EXECUTE FUNCTION dispatch_catalog_changed('subscription');"#,
    r#"CREATE TABLE apis (name TEXT COLLATE "C" PRIMARY KEY, spec TEXT NOT NULL);
    CREATE TRIGGER api_changed AFTER INSERT OR UPDATE OR DELETE ON apis
        FOR EACH ROW EXECUTE FUNCTION dispatch_catalog_changed('api');"#,
];

/// The advisory lock that serializes migrations between gateways: "dispatch" in ASCII.
const MIGRATION_LOCK: i64 = 0x6469_7370_6174_6368;

/// Connections kept open to the database. The store is control-plane only, and several
/// gateways share the server's `max_connections` (100 by default).
const POOL_SIZE: usize = 16;

/// How long a call waits for a connection (or to make one) before it fails, so that
/// `/readyz` answers while the database is away instead of hanging.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    /// The URL without its password, for messages.
    url: String,
    /// For the listener's own connection (LISTEN needs one outside the pool).
    config: tokio_postgres::Config,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn pg(e: tokio_postgres::Error) -> StoreError {
    StoreError::Backend(chain(&e))
}

impl PostgresStore {
    /// Writes runs in one statement; `on_conflict` says what becomes of a stored name.
    async fn write_runs(&self, runs: &[Run], on_conflict: &'static str) -> Result<(), StoreError> {
        if runs.is_empty() {
            return Ok(());
        }
        let c = RunColumns::of(runs)?;
        let client = self.client().await?;
        // One statement is one transaction: every run is written, or none is.
        let stmt = client
            .prepare_cached(&format!(
                "INSERT INTO runs (name, function_name, status, started_us, tags, record)
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[],
                                      $5::text[], $6::text[])
                 {on_conflict}"
            ))
            .await
            .map_err(pg)?;
        client
            .execute(
                &stmt,
                &[
                    &c.name,
                    &c.function_name,
                    &c.status,
                    &c.started_us,
                    &c.tags,
                    &c.record,
                ],
            )
            .await
            .map_err(pg)?;
        Ok(())
    }

    /// Connects to the database at `url` (`postgres://user:password@host:port/db` or
    /// `host=... user=...`) and brings its schema up to date.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| {
            backend(format!(
                "invalid PostgreSQL URL {}: {}",
                redact_unparsed(url),
                chain(&e)
            ))
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        let shown = describe(&config);
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| backend(format!("cannot connect to {shown}: {e}")))?;
        let store = PostgresStore {
            pool,
            url: shown,
            config,
        };
        let mut client = store.client().await?;
        migrate(&mut client)
            .await
            .map_err(|e| backend(format!("{}: migration: {}", store.url, chain(&e))))?;
        Ok(store)
    }

    /// The database's URL without its password.
    pub fn url(&self) -> &str {
        &self.url
    }

    async fn client(&self) -> Result<Object, StoreError> {
        self.pool.get().await.map_err(|e| {
            let why = match e {
                PoolError::Backend(e) => chain(&e),
                PoolError::Timeout(_) => "timed out".to_string(),
                e => e.to_string(),
            };
            backend(format!("cannot connect to {}: {why}", self.url))
        })
    }
}

/// The documents of the catalog tables (base images, images, secrets): one JSON `spec`
/// per name. Table names come from [`CatalogKind`], never from a request.
impl PostgresStore {
    async fn doc_list<T: DeserializeOwned>(&self, kind: CatalogKind) -> Result<Vec<T>, StoreError> {
        let client = self.client().await?;
        let sql = format!("SELECT name, spec FROM {} ORDER BY name", kind.table());
        let rows = client.query(&sql, &[]).await.map_err(pg)?;
        rows.iter()
            .map(|row| {
                let (name, spec): (&str, &str) = (row.get(0), row.get(1));
                serde_json::from_str(spec)
                    .map_err(|e| backend(format!("{} \"{name}\" is unreadable: {e}", kind.noun())))
            })
            .collect()
    }

    async fn doc_get<T: DeserializeOwned>(
        &self,
        kind: CatalogKind,
        name: &str,
    ) -> Result<Option<T>, StoreError> {
        let client = self.client().await?;
        let sql = format!("SELECT spec FROM {} WHERE name = $1", kind.table());
        let row = client.query_opt(&sql, &[&name]).await.map_err(pg)?;
        row.map(|r| serde_json::from_str(r.get::<_, &str>(0)).map_err(backend))
            .transpose()
    }

    async fn doc_create(
        &self,
        kind: CatalogKind,
        name: &str,
        doc: &(impl Serialize + Sync),
    ) -> Result<(), StoreError> {
        let spec = serde_json::to_string(doc).map_err(backend)?;
        let client = self.client().await?;
        let sql = format!(
            "INSERT INTO {} (name, spec) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
            kind.table()
        );
        if client.execute(&sql, &[&name, &spec]).await.map_err(pg)? == 0 {
            return Err(StoreError::Conflict(format!("{} \"{name}\"", kind.noun())));
        }
        Ok(())
    }

    async fn doc_update(
        &self,
        kind: CatalogKind,
        name: &str,
        doc: &(impl Serialize + Sync),
    ) -> Result<(), StoreError> {
        let spec = serde_json::to_string(doc).map_err(backend)?;
        let client = self.client().await?;
        let sql = format!("UPDATE {} SET spec = $2 WHERE name = $1", kind.table());
        if client.execute(&sql, &[&name, &spec]).await.map_err(pg)? == 0 {
            return Err(StoreError::NotFound(format!("{} \"{name}\"", kind.noun())));
        }
        Ok(())
    }

    async fn doc_delete(&self, kind: CatalogKind, name: &str) -> Result<(), StoreError> {
        let client = self.client().await?;
        let sql = format!("DELETE FROM {} WHERE name = $1", kind.table());
        if client.execute(&sql, &[&name]).await.map_err(pg)? == 0 {
            return Err(StoreError::NotFound(format!("{} \"{name}\"", kind.noun())));
        }
        Ok(())
    }
}

async fn migrate(client: &mut Object) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.batch_execute(&format!(
        "SELECT pg_advisory_xact_lock({MIGRATION_LOCK});
         CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY);"
    ))
    .await?;
    let done: i32 = tx
        .query_one(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            &[],
        )
        .await?
        .get(0);
    for (version, sql) in MIGRATIONS.iter().enumerate().skip(done as usize) {
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO schema_migrations (version) VALUES ($1)",
            &[&(version as i32 + 1)],
        )
        .await?;
    }
    tx.commit().await
}

/// `postgres://user@host:port/db` from a parsed configuration: what the URL names,
/// without its password.
fn describe(config: &tokio_postgres::Config) -> String {
    let ports = config.get_ports();
    let port = |i: usize| ports.get(i).or(ports.first()).copied().unwrap_or(5432);
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| match host {
            Host::Tcp(name) => format!("{name}:{}", port(i)),
            #[cfg(unix)]
            Host::Unix(dir) => format!("{}:{}", dir.display(), port(i)),
        })
        .collect();
    let hosts = if hosts.is_empty() {
        format!("localhost:{}", port(0))
    } else {
        hosts.join(",")
    };
    let user = config
        .get_user()
        .map(|u| format!("{u}@"))
        .unwrap_or_default();
    let db = config
        .get_dbname()
        .or(config.get_user())
        .unwrap_or_default();
    format!("postgres://{user}{hosts}/{db}")
}

/// A URL that did not parse, with anything that may be a password taken out.
fn redact_unparsed(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let rest = match rest.rsplit_once('@') {
                Some((userinfo, hosts)) => {
                    let user = userinfo.split(':').next().unwrap_or_default();
                    format!("{user}@{hosts}")
                }
                None => rest.to_string(),
            };
            let rest = rest
                .split_once("password=")
                .map_or(rest.clone(), |(kept, _)| format!("{kept}password=..."));
            format!("{scheme}://{rest}")
        }
        None => url
            .split_once("password")
            .map_or(url.to_string(), |(kept, _)| format!("{kept}password=...")),
    }
}

fn encode(function: &Function) -> Result<String, StoreError> {
    serde_json::to_string(function).map_err(backend)
}

/// Runs as the columns of one `INSERT ... SELECT FROM UNNEST(...)`: one statement, one
/// round trip, however many runs are written.
#[derive(Default)]
struct RunColumns {
    name: Vec<String>,
    function_name: Vec<String>,
    status: Vec<&'static str>,
    started_us: Vec<i64>,
    tags: Vec<String>,
    record: Vec<String>,
}

impl RunColumns {
    /// One row per run name, the last written winning, as it does in SQLite: PostgreSQL
    /// refuses a statement that would update one row twice.
    fn of(runs: &[Run]) -> Result<Self, StoreError> {
        let last: HashMap<&str, usize> = runs
            .iter()
            .enumerate()
            .map(|(i, run)| (run.name.as_str(), i))
            .collect();
        let mut columns = RunColumns::default();
        for (i, run) in runs.iter().enumerate() {
            if last[run.name.as_str()] != i {
                continue;
            }
            columns.name.push(run.name.clone());
            columns.function_name.push(run.function_name.clone());
            columns.status.push(run.status.as_str());
            columns.started_us.push(run_started_us(run));
            columns.tags.push(tags_key(run));
            columns
                .record
                .push(serde_json::to_string(run).map_err(backend)?);
        }
        Ok(columns)
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn list_functions(&self) -> Result<Vec<Function>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached("SELECT name, spec FROM functions ORDER BY name")
            .await
            .map_err(pg)?;
        let rows = client.query(&stmt, &[]).await.map_err(pg)?;
        rows.iter()
            .map(|row| {
                let (name, spec): (&str, &str) = (row.get(0), row.get(1));
                serde_json::from_str(spec)
                    .map_err(|e| backend(format!("function \"{name}\" is unreadable: {e}")))
            })
            .collect()
    }

    async fn create_function(&self, function: &Function) -> Result<(), StoreError> {
        let spec = encode(function)?;
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "INSERT INTO functions (name, spec, created_time, modified_time)
                 VALUES ($1, $2, $3, $4) ON CONFLICT (name) DO NOTHING",
            )
            .await
            .map_err(pg)?;
        let added = client
            .execute(
                &stmt,
                &[
                    &function.name,
                    &spec,
                    &function.created_time,
                    &function.modified_time,
                ],
            )
            .await
            .map_err(pg)?;
        if added == 0 {
            return Err(StoreError::Conflict(format!(
                "function \"{}\"",
                function.name
            )));
        }
        Ok(())
    }

    async fn update_function(&self, function: &Function) -> Result<(), StoreError> {
        let spec = encode(function)?;
        let client = self.client().await?;
        let stmt = client
            .prepare_cached("UPDATE functions SET spec = $2, modified_time = $3 WHERE name = $1")
            .await
            .map_err(pg)?;
        let changed = client
            .execute(&stmt, &[&function.name, &spec, &function.modified_time])
            .await
            .map_err(pg)?;
        if changed == 0 {
            return Err(StoreError::NotFound(format!(
                "function \"{}\"",
                function.name
            )));
        }
        Ok(())
    }

    async fn delete_function(&self, name: &str) -> Result<(), StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached("DELETE FROM functions WHERE name = $1")
            .await
            .map_err(pg)?;
        let changed = client.execute(&stmt, &[&name]).await.map_err(pg)?;
        if changed == 0 {
            return Err(StoreError::NotFound(format!("function \"{name}\"")));
        }
        Ok(())
    }

    async fn put_runs(&self, runs: &[Run]) -> Result<(), StoreError> {
        self.write_runs(
            runs,
            "ON CONFLICT (name) DO UPDATE SET function_name = excluded.function_name,
               status = excluded.status, started_us = excluded.started_us,
               tags = excluded.tags, record = excluded.record",
        )
        .await
    }

    async fn add_runs(&self, runs: &[Run]) -> Result<(), StoreError> {
        self.write_runs(runs, "ON CONFLICT (name) DO NOTHING").await
    }

    async fn enqueue_runs(&self, runs: &[(Run, QueuedRun)]) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        let record = tx
            .prepare_cached(
                "INSERT INTO runs (name, function_name, status, started_us, tags, record)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .await
            .map_err(pg)?;
        let queue = tx
            .prepare_cached(
                "INSERT INTO queue (name, function_name, job, attempts, not_before_us, submitted_us)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .await
            .map_err(pg)?;
        // One commit for the batch: what a submit costs is mostly that commit.
        for (run, queued) in runs {
            let json = serde_json::to_string(run).map_err(backend)?;
            tx.execute(
                &record,
                &[
                    &run.name,
                    &run.function_name,
                    &run.status.as_str(),
                    &run_started_us(run),
                    &tags_key(run),
                    &json,
                ],
            )
            .await
            .map_err(pg)?;
            let attempts = queued.attempts as i32;
            tx.execute(&queue, &queue_params(queued, &attempts))
                .await
                .map_err(pg)?;
        }
        tx.commit().await.map_err(pg)
    }

    async fn take_queued(
        &self,
        now_us: i64,
        hold_until_us: i64,
        limit: u32,
    ) -> Result<Vec<QueuedRun>, StoreError> {
        let client = self.client().await?;
        // SKIP LOCKED: gateways taking at the same time each get other runs.
        let rows = client
            .query(
                "UPDATE queue SET held_until_us = $2, attempts = attempts + 1
                 WHERE name IN (SELECT name FROM queue
                                WHERE not_before_us <= $1 AND held_until_us <= $1 AND NOT dead
                                ORDER BY not_before_us LIMIT $3 FOR UPDATE SKIP LOCKED)
                 RETURNING name, function_name, job, attempts, not_before_us, submitted_us",
                &[&now_us, &hold_until_us, &(limit as i64)],
            )
            .await
            .map_err(pg)?;
        Ok(rows.iter().map(queued_run).collect())
    }

    async fn hold_run(&self, name: &str, until_us: i64) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE queue SET held_until_us = $2 WHERE name = $1",
                &[&name, &until_us],
            )
            .await
            .map_err(pg)?;
        Ok(())
    }

    async fn requeue_run(&self, name: &str, not_before_us: i64) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE queue SET not_before_us = $2, held_until_us = 0 WHERE name = $1",
                &[&name, &not_before_us],
            )
            .await
            .map_err(pg)?;
        Ok(())
    }

    async fn dead_runs(&self, limit: u32) -> Result<Vec<String>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT name FROM queue WHERE dead ORDER BY submitted_us DESC LIMIT $1",
                &[&(limit as i64)],
            )
            .await
            .map_err(pg)?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn revive_run(&self, name: &str, now_us: i64) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let changed = client
            .execute(
                "UPDATE queue SET dead = false, attempts = 0, not_before_us = $2,
                   held_until_us = 0, submitted_us = $2
                 WHERE name = $1 AND dead",
                &[&name, &now_us],
            )
            .await
            .map_err(pg)?;
        Ok(changed == 1)
    }

    async fn bury_run(&self, run: &Run, queued: &QueuedRun) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO queue (name, function_name, job, attempts, not_before_us,
                                    submitted_us, dead)
                 VALUES ($1, $2, $3, $4, $5, $6, true)
                 ON CONFLICT (name) DO UPDATE SET job = excluded.job,
                   attempts = excluded.attempts, dead = true, held_until_us = 0",
                &queue_params(queued, &(queued.attempts as i32)),
            )
            .await
            .map_err(pg)?;
        drop(client);
        // The record and the (now dead) entry, as the embedded queue's end writes them.
        self.finish_queued(run, true).await
    }

    async fn unbury_run(&self, name: &str) -> Result<Option<QueuedRun>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "DELETE FROM queue WHERE name = $1 AND dead
                 RETURNING name, function_name, job, attempts, not_before_us, submitted_us",
                &[&name],
            )
            .await
            .map_err(pg)?;
        Ok(row.map(|r| queued_run(&r)))
    }

    async fn finish_queued(&self, run: &Run, dead: bool) -> Result<(), StoreError> {
        let json = serde_json::to_string(run).map_err(backend)?;
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        tx.execute(
            "INSERT INTO runs (name, function_name, status, started_us, tags, record)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (name) DO UPDATE SET function_name = excluded.function_name,
               status = excluded.status, started_us = excluded.started_us,
               tags = excluded.tags, record = excluded.record",
            &[
                &run.name,
                &run.function_name,
                &run.status.as_str(),
                &run_started_us(run),
                &tags_key(run),
                &json,
            ],
        )
        .await
        .map_err(pg)?;
        let leave = if dead {
            "UPDATE queue SET dead = true, held_until_us = 0 WHERE name = $1"
        } else {
            "DELETE FROM queue WHERE name = $1"
        };
        tx.execute(leave, &[&run.name]).await.map_err(pg)?;
        tx.commit().await.map_err(pg)
    }

    async fn claim_key(
        &self,
        function: &str,
        key: &str,
        run_name: &str,
        now_us: i64,
        window_start_us: i64,
    ) -> Result<Claim, StoreError> {
        let client = self.client().await?;
        // Inserted, or taken over from a claim older than the window: ours. The row lock
        // of ON CONFLICT makes concurrent claims (from any gateway) wait for each other.
        let ours = client
            .query_opt(
                "INSERT INTO idempotency_keys (function_name, key, run_name, created_us)
                 VALUES ($1, $2, $3, $4) ON CONFLICT (function_name, key)
                 DO UPDATE SET run_name = EXCLUDED.run_name, created_us = EXCLUDED.created_us
                 WHERE idempotency_keys.created_us < $5
                 RETURNING run_name",
                &[&function, &key, &run_name, &now_us, &window_start_us],
            )
            .await
            .map_err(pg)?;
        if ours.is_some() {
            return Ok(Claim::New);
        }
        let holder = client
            .query_one(
                "SELECT run_name FROM idempotency_keys WHERE function_name = $1 AND key = $2",
                &[&function, &key],
            )
            .await
            .map_err(pg)?;
        Ok(Claim::Existing(holder.get(0)))
    }

    async fn release_key(
        &self,
        function: &str,
        key: &str,
        run_name: &str,
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "DELETE FROM idempotency_keys WHERE function_name = $1 AND key = $2 AND run_name = $3",
                &[&function, &key, &run_name],
            )
            .await
            .map(|_| ())
            .map_err(pg)
    }

    async fn prune_keys(&self, before_us: i64) -> Result<u64, StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "DELETE FROM idempotency_keys WHERE created_us < $1",
                &[&before_us],
            )
            .await
            .map_err(pg)
    }

    async fn get_function(&self, name: &str) -> Result<Option<Function>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt("SELECT spec FROM functions WHERE name = $1", &[&name])
            .await
            .map_err(pg)?;
        row.map(|r| serde_json::from_str(r.get::<_, &str>(0)).map_err(backend))
            .transpose()
    }

    fn watch_functions(&self) -> Option<mpsc::UnboundedReceiver<FunctionChange>> {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(listen(
            self.config.clone(),
            self.url.clone(),
            "dispatch_functions",
            tx,
        ));
        Some(rx)
    }

    fn watch_catalog(&self) -> Option<mpsc::UnboundedReceiver<Change>> {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(listen(
            self.config.clone(),
            self.url.clone(),
            "dispatch_catalog",
            tx,
        ));
        Some(rx)
    }

    async fn list_base_images(&self) -> Result<Vec<BaseImage>, StoreError> {
        self.doc_list(CatalogKind::BaseImage).await
    }

    async fn get_base_image(&self, name: &str) -> Result<Option<BaseImage>, StoreError> {
        self.doc_get(CatalogKind::BaseImage, name).await
    }

    async fn create_base_image(&self, image: &BaseImage) -> Result<(), StoreError> {
        self.doc_create(CatalogKind::BaseImage, &image.name, image)
            .await
    }

    async fn delete_base_image(&self, name: &str) -> Result<(), StoreError> {
        self.doc_delete(CatalogKind::BaseImage, name).await
    }

    async fn list_images(&self) -> Result<Vec<Image>, StoreError> {
        self.doc_list(CatalogKind::Image).await
    }

    async fn get_image(&self, name: &str) -> Result<Option<Image>, StoreError> {
        self.doc_get(CatalogKind::Image, name).await
    }

    async fn create_image(&self, image: &Image) -> Result<(), StoreError> {
        self.doc_create(CatalogKind::Image, &image.name, image)
            .await
    }

    async fn delete_image(&self, name: &str) -> Result<(), StoreError> {
        self.doc_delete(CatalogKind::Image, name).await
    }

    async fn list_secrets(&self) -> Result<Vec<Secret>, StoreError> {
        self.doc_list(CatalogKind::Secret).await
    }

    async fn get_secret(&self, name: &str) -> Result<Option<Secret>, StoreError> {
        self.doc_get(CatalogKind::Secret, name).await
    }

    async fn create_secret(&self, secret: &Secret) -> Result<(), StoreError> {
        self.doc_create(CatalogKind::Secret, &secret.name, secret)
            .await
    }

    async fn update_secret(&self, secret: &Secret) -> Result<(), StoreError> {
        self.doc_update(CatalogKind::Secret, &secret.name, secret)
            .await
    }

    async fn delete_secret(&self, name: &str) -> Result<(), StoreError> {
        self.doc_delete(CatalogKind::Secret, name).await
    }

    async fn list_subscriptions(&self) -> Result<Vec<Subscription>, StoreError> {
        self.doc_list(CatalogKind::Subscription).await
    }

    async fn get_subscription(&self, name: &str) -> Result<Option<Subscription>, StoreError> {
        self.doc_get(CatalogKind::Subscription, name).await
    }

    async fn create_subscription(&self, subscription: &Subscription) -> Result<(), StoreError> {
        self.doc_create(CatalogKind::Subscription, &subscription.name, subscription)
            .await
    }

    async fn update_subscription(&self, subscription: &Subscription) -> Result<(), StoreError> {
        self.doc_update(CatalogKind::Subscription, &subscription.name, subscription)
            .await
    }

    async fn delete_subscription(&self, name: &str) -> Result<(), StoreError> {
        self.doc_delete(CatalogKind::Subscription, name).await
    }

    async fn list_documents(&self, kind: CatalogKind) -> Result<Vec<Value>, StoreError> {
        self.doc_list(kind).await
    }

    async fn get_document(
        &self,
        kind: CatalogKind,
        name: &str,
    ) -> Result<Option<Value>, StoreError> {
        self.doc_get(kind, name).await
    }

    async fn create_document(
        &self,
        kind: CatalogKind,
        name: &str,
        document: &Value,
    ) -> Result<(), StoreError> {
        self.doc_create(kind, name, document).await
    }

    async fn update_document(
        &self,
        kind: CatalogKind,
        name: &str,
        document: &Value,
    ) -> Result<(), StoreError> {
        self.doc_update(kind, name, document).await
    }

    async fn delete_document(&self, kind: CatalogKind, name: &str) -> Result<(), StoreError> {
        self.doc_delete(kind, name).await
    }

    async fn prune_runs(
        &self,
        started_before_us: Option<i64>,
        keep: Option<u64>,
    ) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let mut removed = 0;
        if let Some(before) = started_before_us {
            removed += client
                .execute("DELETE FROM runs WHERE started_us < $1", &[&before])
                .await
                .map_err(pg)?;
        }
        if let Some(keep) = keep {
            let keep = i64::try_from(keep).unwrap_or(i64::MAX);
            removed += client
                .execute(
                    "DELETE FROM runs WHERE name IN (SELECT name FROM runs
                     ORDER BY started_us DESC, name DESC OFFSET $1)",
                    &[&keep],
                )
                .await
                .map_err(pg)?;
        }
        Ok(removed)
    }

    async fn get_run(&self, name: &str) -> Result<Option<Run>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached("SELECT record FROM runs WHERE name = $1")
            .await
            .map_err(pg)?;
        let row = client.query_opt(&stmt, &[&name]).await.map_err(pg)?;
        row.map(|r| serde_json::from_str(r.get::<_, &str>(0)).map_err(backend))
            .transpose()
    }

    async fn list_runs(&self, query: &RunQuery) -> Result<Vec<Run>, StoreError> {
        let mut sql = String::from("SELECT record FROM runs WHERE true");
        let mut args: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
        let mut bind = |sql: &mut String, clause: &str, value: Box<dyn ToSql + Sync + Send>| {
            args.push(value);
            sql.push_str(&clause.replace('?', &format!("${}", args.len())));
        };
        if let Some(f) = &query.function_name {
            bind(&mut sql, " AND function_name = ?", Box::new(f.clone()));
        }
        if let Some(since) = query.since {
            bind(
                &mut sql,
                " AND started_us >= ?",
                Box::new(since.saturating_mul(1_000_000)),
            );
        }
        if let Some(status) = query.status {
            bind(&mut sql, " AND status = ?", Box::new(status.as_str()));
        }
        for (key, value) in &query.tags {
            let pattern = tag_pattern(key, value.as_deref());
            bind(&mut sql, " AND tags LIKE ? ESCAPE '\\'", Box::new(pattern));
        }
        if let Some(after) = &query.after {
            // A row comparison: the same order as SQLite's `started_us < ? OR (started_us = ?
            // AND name < ?)`, in a form PostgreSQL reads straight off `runs_by_start`.
            bind(
                &mut sql,
                " AND (started_us, name) < (?",
                Box::new(after.started_us),
            );
            bind(&mut sql, ", ?)", Box::new(after.name.clone()));
        }
        bind(
            &mut sql,
            " ORDER BY started_us DESC, name DESC LIMIT ?",
            Box::new(i64::from(query.limit)),
        );
        let client = self.client().await?;
        let stmt = client.prepare_cached(&sql).await.map_err(pg)?;
        let params: Vec<&(dyn ToSql + Sync)> = args
            .iter()
            .map(|a| a.as_ref() as &(dyn ToSql + Sync))
            .collect();
        let rows = client.query(&stmt, &params).await.map_err(pg)?;
        rows.iter()
            .map(|row| serde_json::from_str(row.get::<_, &str>(0)).map_err(backend))
            .collect()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        client.simple_query("SELECT 1").await.map_err(pg)?;
        Ok(())
    }
}

/// Listens on `channel` (`dispatch_functions`, `dispatch_catalog`) on a connection of its
/// own, forwarding each change, and after every (re)connection asks for a full resync
/// (notifications sent while it was away are lost). Ends when nobody receives any more.
async fn listen(
    config: tokio_postgres::Config,
    url: String,
    channel: &'static str,
    tx: mpsc::UnboundedSender<Change>,
) {
    let mut delay = Duration::from_millis(100);
    while !tx.is_closed() {
        match listen_once(&config, channel, &tx).await {
            Ok(()) => return,
            Err(why) => {
                tracing::warn!(store = %url, %channel, error = %why, "change listener lost; reconnecting");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// One listening connection: `Ok` when the receiver is gone, `Err` when the connection is.
async fn listen_once(
    config: &tokio_postgres::Config,
    channel: &str,
    tx: &mpsc::UnboundedSender<Change>,
) -> Result<(), String> {
    let (client, mut connection) = config.connect(NoTls).await.map_err(|e| chain(&e))?;
    let (names_tx, mut names) = mpsc::unbounded_channel::<String>();
    // The connection must be polled for the LISTEN to complete and for notifications.
    let driver = tokio::spawn(async move {
        while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    if names_tx.send(n.payload().to_string()).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN {channel}"))
        .await
        .map_err(|e| chain(&e))?;
    if tx.send(Change::Resync).is_err() {
        return Ok(());
    }
    while let Some(name) = names.recv().await {
        if tx.send(Change::Changed(name)).is_err() {
            driver.abort();
            return Ok(());
        }
    }
    Err("the listening connection closed".to_string())
}

/// The values of a queue row, in that order; `attempts` as the column's type.
fn queue_params<'a>(
    q: &'a QueuedRun,
    attempts: &'a i32,
) -> [&'a (dyn tokio_postgres::types::ToSql + Sync); 6] {
    [
        &q.name,
        &q.function_name,
        &q.job,
        attempts,
        &q.not_before_us,
        &q.submitted_us,
    ]
}

/// A queue row: name, function_name, job, attempts, not_before_us, submitted_us.
fn queued_run(r: &tokio_postgres::Row) -> QueuedRun {
    QueuedRun {
        name: r.get(0),
        function_name: r.get(1),
        job: r.get(2),
        attempts: r.get::<_, i32>(3) as u32,
        not_before_us: r.get(4),
        submitted_us: r.get(5),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_shown_without_their_password() {
        let config: tokio_postgres::Config = "postgres://postgres:s3cret@127.0.0.1/dispatch"
            .parse()
            .unwrap();
        assert_eq!(
            describe(&config),
            "postgres://postgres@127.0.0.1:5432/dispatch"
        );
        let config: tokio_postgres::Config =
            "host=db port=6432 user=gw password=s3cret".parse().unwrap();
        assert_eq!(describe(&config), "postgres://gw@db:6432/gw");
        let shown = redact_unparsed("postgres://gw:s3cret@db:x/dispatch");
        assert!(!shown.contains("s3cret"), "{shown}");
        let shown = redact_unparsed("host=db password=s3cret bogus");
        assert!(!shown.contains("s3cret"), "{shown}");
    }
}
