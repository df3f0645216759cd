//! The SQLite store: one file (`dispatch.db` in the data dir, mode 0600, WAL journal),
//! versioned migrations run at start-up, one connection behind a mutex. The calls are
//! control-plane only, so each runs on tokio's blocking pool.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, params};

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

mod calls;

use super::calls::CallBatch;
use super::{
    CatalogKind, Claim, QueuedRun, RunPosition, RunQuery, Store, StoreError, run_started_us,
    tag_pattern, tags_key,
};
use crate::model::{BaseImage, Function, Image, Run, Secret, Subscription};

/// Schema versions, in order; `PRAGMA user_version` says how many have run.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE functions (
        name TEXT PRIMARY KEY,
        spec TEXT NOT NULL,
        created_time INTEGER NOT NULL,
        modified_time INTEGER NOT NULL
    );",
    // Runs outlive their functions: no foreign key. `tags` is `tags_key` (see store/mod.rs).
    "CREATE TABLE runs (
        name TEXT PRIMARY KEY,
        function_name TEXT NOT NULL,
        status TEXT NOT NULL,
        started_us INTEGER NOT NULL,
        tags TEXT NOT NULL,
        record TEXT NOT NULL
    );
    CREATE INDEX runs_by_start ON runs (started_us DESC, name DESC);
    CREATE INDEX runs_by_function ON runs (function_name, started_us DESC, name DESC);",
    "CREATE TABLE idempotency_keys (
        function_name TEXT NOT NULL,
        key TEXT NOT NULL,
        run_name TEXT NOT NULL,
        created_us INTEGER NOT NULL,
        PRIMARY KEY (function_name, key)
    );",
    // Base images, images and secrets: one JSON document per name (see `CatalogKind`).
    "CREATE TABLE base_images (name TEXT PRIMARY KEY, spec TEXT NOT NULL);
    CREATE TABLE images (name TEXT PRIMARY KEY, spec TEXT NOT NULL);
    CREATE TABLE secrets (name TEXT PRIMARY KEY, spec TEXT NOT NULL);",
    // The embedded queue of async runs. `held_until_us` 0: nobody holds it.
    "CREATE TABLE queue (
        name TEXT PRIMARY KEY,
        function_name TEXT NOT NULL,
        job TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        not_before_us INTEGER NOT NULL,
        held_until_us INTEGER NOT NULL DEFAULT 0,
        submitted_us INTEGER NOT NULL,
        dead INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX queue_due ON queue (not_before_us);",
    "CREATE TABLE subscriptions (name TEXT PRIMARY KEY, spec TEXT NOT NULL);",
    // Raw-call records, packed: one row per function per write (see `sqlite/calls.rs`).
    "CREATE TABLE call_batches (
        id INTEGER PRIMARY KEY,
        function_name TEXT NOT NULL,
        first_us INTEGER NOT NULL,
        last_us INTEGER NOT NULL,
        calls INTEGER NOT NULL,
        errors INTEGER NOT NULL,
        records BLOB NOT NULL
    );
    CREATE INDEX call_batches_by_last ON call_batches (last_us);
    CREATE INDEX call_batches_by_function ON call_batches (function_name, last_us);",
    "CREATE TABLE apis (name TEXT PRIMARY KEY, spec TEXT NOT NULL);",
];

/// What writing a run over a stored one of the same name does: replaces it.
const REPLACE_RUN: &str = "ON CONFLICT (name) DO UPDATE SET function_name = excluded.function_name,
    status = excluded.status, started_us = excluded.started_us, tags = excluded.tags,
    record = excluded.record";

#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    pub path: PathBuf,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl SqliteStore {
    /// Opens (creating if needed) `dispatch.db` in `data_dir` and brings its schema up to date.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        create_private_dir(data_dir)
            .map_err(|e| backend(format!("cannot create {}: {e}", data_dir.display())))?;
        let path = data_dir.join("dispatch.db");
        let conn = Connection::open(&path)
            .map_err(|e| backend(format!("cannot open {}: {e}", path.display())))?;
        restrict_to_owner(&path)
            .map_err(|e| backend(format!("cannot set the mode of {}: {e}", path.display())))?;
        // WAL: readers never wait for the writer. Pages are read through a memory map and
        // kept in a 64 MiB cache: run records otherwise cost a read() per index page.
        conn.pragma_update(None, "journal_mode", "WAL")
            .and_then(|_| conn.pragma_update(None, "synchronous", "NORMAL"))
            .and_then(|_| conn.pragma_update(None, "mmap_size", 268_435_456))
            .and_then(|_| conn.pragma_update(None, "cache_size", -65_536))
            .and_then(|_| conn.busy_timeout(std::time::Duration::from_secs(5)))
            .map_err(|e| backend(format!("{}: {e}", path.display())))?;
        migrate(&conn).map_err(|e| backend(format!("{}: migration: {e}", path.display())))?;
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
            path,
        })
    }

    async fn with<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let conn = conn.lock().map_err(|_| backend("store lock poisoned"))?;
            work(&conn)
        })
        .await
        .map_err(backend)?
    }
}

/// The documents of the catalog tables (base images, images, secrets): one JSON `spec`
/// per name. Table names come from [`CatalogKind`], never from a request.
impl SqliteStore {
    async fn doc_list<T: DeserializeOwned + Send + 'static>(
        &self,
        kind: CatalogKind,
    ) -> Result<Vec<T>, StoreError> {
        self.with(move |conn| {
            let sql = format!("SELECT name, spec FROM {} ORDER BY name", kind.table());
            let mut stmt = conn.prepare(&sql).map_err(backend)?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
                .map_err(backend)?;
            rows.map(|row| {
                let (name, spec) = row.map_err(backend)?;
                serde_json::from_str(&spec)
                    .map_err(|e| backend(format!("{} \"{name}\" is unreadable: {e}", kind.noun())))
            })
            .collect()
        })
        .await
    }

    async fn doc_get<T: DeserializeOwned + Send + 'static>(
        &self,
        kind: CatalogKind,
        name: &str,
    ) -> Result<Option<T>, StoreError> {
        let name = name.to_string();
        self.with(move |conn| {
            let sql = format!("SELECT spec FROM {} WHERE name = ?1", kind.table());
            let spec: Option<String> = conn
                .query_row(&sql, [&name], |r| r.get(0))
                .optional()
                .map_err(backend)?;
            spec.map(|s| serde_json::from_str(&s).map_err(backend))
                .transpose()
        })
        .await
    }

    async fn doc_create(
        &self,
        kind: CatalogKind,
        name: &str,
        doc: &impl Serialize,
    ) -> Result<(), StoreError> {
        let (name, spec) = (
            name.to_string(),
            serde_json::to_string(doc).map_err(backend)?,
        );
        self.with(move |conn| {
            let sql = format!(
                "INSERT INTO {} (name, spec) VALUES (?1, ?2) ON CONFLICT (name) DO NOTHING",
                kind.table()
            );
            if conn.execute(&sql, params![name, spec]).map_err(backend)? == 0 {
                return Err(StoreError::Conflict(format!("{} \"{name}\"", kind.noun())));
            }
            Ok(())
        })
        .await
    }

    async fn doc_update(
        &self,
        kind: CatalogKind,
        name: &str,
        doc: &impl Serialize,
    ) -> Result<(), StoreError> {
        let (name, spec) = (
            name.to_string(),
            serde_json::to_string(doc).map_err(backend)?,
        );
        self.with(move |conn| {
            let sql = format!("UPDATE {} SET spec = ?2 WHERE name = ?1", kind.table());
            if conn.execute(&sql, params![name, spec]).map_err(backend)? == 0 {
                return Err(StoreError::NotFound(format!("{} \"{name}\"", kind.noun())));
            }
            Ok(())
        })
        .await
    }

    async fn doc_delete(&self, kind: CatalogKind, name: &str) -> Result<(), StoreError> {
        let name = name.to_string();
        self.with(move |conn| {
            let sql = format!("DELETE FROM {} WHERE name = ?1", kind.table());
            if conn.execute(&sql, [&name]).map_err(backend)? == 0 {
                return Err(StoreError::NotFound(format!("{} \"{name}\"", kind.noun())));
            }
            Ok(())
        })
        .await
    }
}

/// Removes the oldest runs and packed calls until at most `keep` are left: runs that
/// started before the oldest batch of calls ended go first, then that batch, and so on (a
/// batch goes whole, so a few more than needed may go).
fn prune_beyond(conn: &Connection, keep: u64) -> Result<u64, StoreError> {
    let runs: i64 = conn
        .query_row("SELECT COUNT(*) FROM runs", [], |r| r.get(0))
        .map_err(backend)?;
    let total = runs as u64 + calls::count(conn)?;
    let mut excess = total.saturating_sub(keep);
    let mut removed = 0;
    while excess > 0 {
        let oldest = calls::oldest(conn)?;
        let bound = oldest.map_or(i64::MAX, |(_, last_us, _)| last_us);
        let gone = conn
            .execute(
                "DELETE FROM runs WHERE name IN (SELECT name FROM runs WHERE started_us <= ?1
                 ORDER BY started_us, name LIMIT ?2)",
                params![bound, i64::try_from(excess).unwrap_or(i64::MAX)],
            )
            .map_err(backend)? as u64;
        excess -= gone.min(excess);
        removed += gone;
        match oldest {
            Some((id, _, calls)) if excess > 0 => {
                calls::remove(conn, id)?;
                excess = excess.saturating_sub(calls);
                removed += calls;
            }
            _ => break,
        }
    }
    Ok(removed)
}

/// A run as the `runs` table holds it.
struct RunRow {
    name: String,
    function_name: String,
    status: &'static str,
    started_us: i64,
    tags: String,
    record: String,
}

impl RunRow {
    fn of(run: &Run) -> Result<RunRow, StoreError> {
        Ok(RunRow {
            name: run.name.clone(),
            function_name: run.function_name.clone(),
            status: run.status.as_str(),
            started_us: run_started_us(run),
            tags: tags_key(run),
            record: serde_json::to_string(run).map_err(backend)?,
        })
    }

    /// Runs an `INSERT INTO runs` statement taking the columns in table order.
    fn insert_with(&self, insert: &mut rusqlite::CachedStatement<'_>) -> Result<(), StoreError> {
        insert
            .execute(params![
                self.name,
                self.function_name,
                self.status,
                self.started_us,
                self.tags,
                self.record
            ])
            .map(drop)
            .map_err(backend)
    }
}

/// Writes runs (inside the caller's transaction); `on_conflict` says what becomes of a
/// stored name.
fn insert_runs(conn: &Connection, rows: &[RunRow], on_conflict: &str) -> Result<(), StoreError> {
    let mut insert = conn
        .prepare_cached(&format!(
            "INSERT INTO runs (name, function_name, status, started_us, tags, record)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) {on_conflict}"
        ))
        .map_err(backend)?;
    for r in rows {
        r.insert_with(&mut insert)?;
    }
    Ok(())
}

fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let done: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    for (version, sql) in MIGRATIONS.iter().enumerate().skip(done) {
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", version + 1)?;
        tx.commit()?;
    }
    Ok(())
}

#[cfg(unix)]
pub(crate) fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(unix)]
fn restrict_to_owner(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

fn encode(function: &Function) -> Result<String, StoreError> {
    serde_json::to_string(function).map_err(backend)
}

#[async_trait]
impl Store for SqliteStore {
    async fn list_functions(&self) -> Result<Vec<Function>, StoreError> {
        self.with(|conn| {
            let mut stmt = conn
                .prepare("SELECT name, spec FROM functions ORDER BY name")
                .map_err(backend)?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
                .map_err(backend)?;
            rows.map(|row| {
                let (name, spec) = row.map_err(backend)?;
                serde_json::from_str(&spec)
                    .map_err(|e| backend(format!("function \"{name}\" is unreadable: {e}")))
            })
            .collect()
        })
        .await
    }

    async fn get_function(&self, name: &str) -> Result<Option<Function>, StoreError> {
        let name = name.to_string();
        self.with(move |conn| {
            let spec: Option<String> = conn
                .query_row("SELECT spec FROM functions WHERE name = ?1", [&name], |r| {
                    r.get(0)
                })
                .optional()
                .map_err(backend)?;
            spec.map(|s| serde_json::from_str(&s).map_err(backend))
                .transpose()
        })
        .await
    }

    async fn create_function(&self, function: &Function) -> Result<(), StoreError> {
        let (name, spec) = (function.name.clone(), encode(function)?);
        let (created, modified) = (function.created_time, function.modified_time);
        self.with(move |conn| {
            let exists = conn
                .query_row("SELECT 1 FROM functions WHERE name = ?1", [&name], |_| Ok(()))
                .optional()
                .map_err(backend)?
                .is_some();
            if exists {
                return Err(StoreError::Conflict(format!("function \"{name}\"")));
            }
            conn.execute(
                "INSERT INTO functions (name, spec, created_time, modified_time) VALUES (?1, ?2, ?3, ?4)",
                params![name, spec, created, modified],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn update_function(&self, function: &Function) -> Result<(), StoreError> {
        let (name, spec, modified) = (
            function.name.clone(),
            encode(function)?,
            function.modified_time,
        );
        self.with(move |conn| {
            let changed = conn
                .execute(
                    "UPDATE functions SET spec = ?2, modified_time = ?3 WHERE name = ?1",
                    params![name, spec, modified],
                )
                .map_err(backend)?;
            if changed == 0 {
                return Err(StoreError::NotFound(format!("function \"{name}\"")));
            }
            Ok(())
        })
        .await
    }

    async fn delete_function(&self, name: &str) -> Result<(), StoreError> {
        let name = name.to_string();
        self.with(move |conn| {
            let changed = conn
                .execute("DELETE FROM functions WHERE name = ?1", [&name])
                .map_err(backend)?;
            if changed == 0 {
                return Err(StoreError::NotFound(format!("function \"{name}\"")));
            }
            Ok(())
        })
        .await
    }

    async fn put_runs(&self, runs: &[Run]) -> Result<(), StoreError> {
        self.put_records(runs, &[]).await
    }

    async fn put_records(&self, runs: &[Run], calls: &[CallBatch]) -> Result<(), StoreError> {
        let rows = runs.iter().map(RunRow::of).collect::<Result<Vec<_>, _>>()?;
        let batches = calls.to_vec();
        self.with(move |conn| {
            let tx = conn.unchecked_transaction().map_err(backend)?;
            insert_runs(&tx, &rows, REPLACE_RUN)?;
            calls::insert(&tx, &batches)?;
            tx.commit().map_err(backend)
        })
        .await
    }

    async fn add_runs(&self, runs: &[Run]) -> Result<(), StoreError> {
        let rows = runs.iter().map(RunRow::of).collect::<Result<Vec<_>, _>>()?;
        self.with(move |conn| {
            let tx = conn.unchecked_transaction().map_err(backend)?;
            insert_runs(&tx, &rows, "ON CONFLICT (name) DO NOTHING")?;
            tx.commit().map_err(backend)
        })
        .await
    }

    async fn get_run(&self, name: &str) -> Result<Option<Run>, StoreError> {
        let name = name.to_string();
        self.with(move |conn| {
            let record: Option<String> = conn
                .query_row("SELECT record FROM runs WHERE name = ?1", [&name], |r| {
                    r.get(0)
                })
                .optional()
                .map_err(backend)?;
            match record {
                Some(r) => serde_json::from_str(&r).map(Some).map_err(backend),
                None => calls::get(conn, &name),
            }
        })
        .await
    }

    async fn list_runs(&self, query: &RunQuery) -> Result<Vec<Run>, StoreError> {
        let query = query.clone();
        self.with(move |conn| {
            let mut sql = String::from("SELECT record FROM runs WHERE 1 = 1");
            let mut args: Vec<rusqlite::types::Value> = Vec::new();
            let mut bind = |sql: &mut String, clause: &str, value: rusqlite::types::Value| {
                args.push(value);
                sql.push_str(&clause.replace('?', &format!("?{}", args.len())));
            };
            if let Some(f) = &query.function_name {
                bind(&mut sql, " AND function_name = ?", f.clone().into());
            }
            if let Some(since) = query.since {
                bind(&mut sql, " AND started_us >= ?", (since * 1_000_000).into());
            }
            if let Some(status) = query.status {
                bind(
                    &mut sql,
                    " AND status = ?",
                    status.as_str().to_string().into(),
                );
            }
            for (key, value) in &query.tags {
                let pattern = tag_pattern(key, value.as_deref());
                bind(&mut sql, " AND tags LIKE ? ESCAPE '\\'", pattern.into());
            }
            if let Some(after) = &query.after {
                bind(&mut sql, " AND (started_us < ?", after.started_us.into());
                bind(&mut sql, " OR (started_us = ?", after.started_us.into());
                bind(&mut sql, " AND name < ?))", after.name.clone().into());
            }
            bind(
                &mut sql,
                " ORDER BY started_us DESC, name DESC LIMIT ?",
                i64::from(query.limit).into(),
            );
            let mut stmt = conn.prepare(&sql).map_err(backend)?;
            let rows = stmt
                .query_map(rusqlite::params_from_iter(args), |r| r.get::<_, String>(0))
                .map_err(backend)?;
            let runs = rows
                .map(|row| serde_json::from_str(&row.map_err(backend)?).map_err(backend))
                .collect::<Result<Vec<Run>, StoreError>>()?;
            // The packed raw calls, merged in the same order.
            let mut all: Vec<(RunPosition, Run)> = runs
                .into_iter()
                .map(|run| (RunPosition::of(&run), run))
                .chain(calls::list(conn, &query)?)
                .collect();
            all.sort_by(|a, b| (b.0.started_us, &b.0.name).cmp(&(a.0.started_us, &a.0.name)));
            all.truncate(query.limit as usize);
            Ok(all.into_iter().map(|(_, run)| run).collect())
        })
        .await
    }

    async fn prune_runs(
        &self,
        started_before_us: Option<i64>,
        keep: Option<u64>,
    ) -> Result<u64, StoreError> {
        self.with(move |conn| {
            let mut removed = 0;
            if let Some(before) = started_before_us {
                removed += conn
                    .execute("DELETE FROM runs WHERE started_us < ?1", [before])
                    .map_err(backend)? as u64;
                removed += calls::prune_before(conn, before)?;
            }
            if let Some(keep) = keep {
                removed += prune_beyond(conn, keep)?;
            }
            Ok(removed)
        })
        .await
    }

    async fn enqueue_runs(&self, runs: &[(Run, QueuedRun)]) -> Result<(), StoreError> {
        let rows = runs
            .iter()
            .map(|(run, queued)| Ok((RunRow::of(run)?, queued.clone())))
            .collect::<Result<Vec<_>, StoreError>>()?;
        self.with(move |conn| {
            let tx = conn.unchecked_transaction().map_err(backend)?;
            {
                let mut record = tx
                    .prepare_cached(
                        "INSERT INTO runs (name, function_name, status, started_us, tags, record)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    )
                    .map_err(backend)?;
                let mut queue = tx
                    .prepare_cached(
                        "INSERT INTO queue (name, function_name, job, attempts, not_before_us,
                                            submitted_us)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    )
                    .map_err(backend)?;
                for (r, q) in &rows {
                    r.insert_with(&mut record)?;
                    queue.execute(queue_params(q)).map_err(backend)?;
                }
            }
            tx.commit().map_err(backend)
        })
        .await
    }

    async fn take_queued(
        &self,
        now_us: i64,
        hold_until_us: i64,
        limit: u32,
    ) -> Result<Vec<QueuedRun>, StoreError> {
        self.with(move |conn| {
            let mut take = conn
                .prepare_cached(
                    "UPDATE queue SET held_until_us = ?2, attempts = attempts + 1
                     WHERE name IN (SELECT name FROM queue
                                    WHERE not_before_us <= ?1 AND held_until_us <= ?1 AND dead = 0
                                    ORDER BY not_before_us LIMIT ?3)
                     RETURNING name, function_name, job, attempts, not_before_us, submitted_us",
                )
                .map_err(backend)?;
            let rows = take
                .query_map(params![now_us, hold_until_us, limit], queued_row)
                .map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
        .await
    }

    async fn hold_run(&self, name: &str, until_us: i64) -> Result<(), StoreError> {
        let name = name.to_string();
        self.with(move |conn| {
            conn.execute(
                "UPDATE queue SET held_until_us = ?2 WHERE name = ?1",
                params![name, until_us],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn requeue_run(&self, name: &str, not_before_us: i64) -> Result<(), StoreError> {
        let name = name.to_string();
        self.with(move |conn| {
            conn.execute(
                "UPDATE queue SET not_before_us = ?2, held_until_us = 0 WHERE name = ?1",
                params![name, not_before_us],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn dead_runs(&self, limit: u32) -> Result<Vec<String>, StoreError> {
        self.with(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT name FROM queue WHERE dead = 1 ORDER BY submitted_us DESC LIMIT ?1",
                )
                .map_err(backend)?;
            let names = stmt
                .query_map(params![limit], |r| r.get(0))
                .map_err(backend)?;
            names.collect::<Result<Vec<String>, _>>().map_err(backend)
        })
        .await
    }

    async fn revive_run(&self, name: &str, now_us: i64) -> Result<bool, StoreError> {
        let name = name.to_string();
        self.with(move |conn| {
            let changed = conn
                .execute(
                    "UPDATE queue SET dead = 0, attempts = 0, not_before_us = ?2,
                       held_until_us = 0, submitted_us = ?2
                     WHERE name = ?1 AND dead = 1",
                    params![name, now_us],
                )
                .map_err(backend)?;
            Ok(changed == 1)
        })
        .await
    }

    async fn bury_run(&self, run: &Run, queued: &QueuedRun) -> Result<(), StoreError> {
        let q = queued.clone();
        self.with(move |conn| {
            conn.execute(
                "INSERT INTO queue (name, function_name, job, attempts, not_before_us,
                                    submitted_us, dead)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 1)
                 ON CONFLICT (name) DO UPDATE SET job = excluded.job,
                   attempts = excluded.attempts, dead = 1, held_until_us = 0",
                queue_params(&q),
            )
            .map_err(backend)?;
            Ok(())
        })
        .await?;
        // The record and the (now dead) entry, as the embedded queue's end writes them.
        self.finish_queued(run, true).await
    }

    async fn unbury_run(&self, name: &str) -> Result<Option<QueuedRun>, StoreError> {
        let name = name.to_string();
        self.with(move |conn| {
            conn.query_row(
                "DELETE FROM queue WHERE name = ?1 AND dead = 1
                 RETURNING name, function_name, job, attempts, not_before_us, submitted_us",
                params![name],
                queued_row,
            )
            .optional()
            .map_err(backend)
        })
        .await
    }

    async fn finish_queued(&self, run: &Run, dead: bool) -> Result<(), StoreError> {
        let row = RunRow::of(run)?;
        let name = run.name.clone();
        self.with(move |conn| {
            let tx = conn.unchecked_transaction().map_err(backend)?;
            insert_runs(&tx, std::slice::from_ref(&row), REPLACE_RUN)?;
            let leave = if dead {
                "UPDATE queue SET dead = 1, held_until_us = 0 WHERE name = ?1"
            } else {
                "DELETE FROM queue WHERE name = ?1"
            };
            tx.execute(leave, params![name]).map_err(backend)?;
            tx.commit().map_err(backend)
        })
        .await
    }

    async fn claim_key(
        &self,
        function: &str,
        key: &str,
        run_name: &str,
        now_us: i64,
        window_start_us: i64,
    ) -> Result<Claim, StoreError> {
        let (function, key, run_name) =
            (function.to_string(), key.to_string(), run_name.to_string());
        self.with(move |conn| {
            // One connection behind a mutex: this read and write cannot interleave with
            // another claim's.
            let held: Option<(String, i64)> = conn
                .query_row(
                    "SELECT run_name, created_us FROM idempotency_keys
                     WHERE function_name = ?1 AND key = ?2",
                    [&function, &key],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()
                .map_err(backend)?;
            if let Some((holder, created)) = held
                && created >= window_start_us
            {
                return Ok(Claim::Existing(holder));
            }
            conn.execute(
                "INSERT INTO idempotency_keys (function_name, key, run_name, created_us)
                 VALUES (?1, ?2, ?3, ?4) ON CONFLICT (function_name, key)
                 DO UPDATE SET run_name = excluded.run_name, created_us = excluded.created_us",
                params![function, key, run_name, now_us],
            )
            .map_err(backend)?;
            Ok(Claim::New)
        })
        .await
    }

    async fn release_key(
        &self,
        function: &str,
        key: &str,
        run_name: &str,
    ) -> Result<(), StoreError> {
        let (function, key, run_name) =
            (function.to_string(), key.to_string(), run_name.to_string());
        self.with(move |conn| {
            conn.execute(
                "DELETE FROM idempotency_keys WHERE function_name = ?1 AND key = ?2 AND run_name = ?3",
                [&function, &key, &run_name],
            )
            .map(|_| ())
            .map_err(backend)
        })
        .await
    }

    async fn prune_keys(&self, before_us: i64) -> Result<u64, StoreError> {
        self.with(move |conn| {
            conn.execute(
                "DELETE FROM idempotency_keys WHERE created_us < ?1",
                [before_us],
            )
            .map(|n| n as u64)
            .map_err(backend)
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.with(|conn| conn.query_row("SELECT 1", [], |_| Ok(())).map_err(backend))
            .await
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
}

/// A queue row: name, function_name, job, attempts, not_before_us, submitted_us.
fn queued_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<QueuedRun> {
    Ok(QueuedRun {
        name: r.get(0)?,
        function_name: r.get(1)?,
        job: r.get(2)?,
        attempts: r.get(3)?,
        not_before_us: r.get(4)?,
        submitted_us: r.get(5)?,
    })
}

/// The values of a queue row, in the order name, function_name, job, attempts,
/// not_before_us, submitted_us.
fn queue_params(q: &QueuedRun) -> [&dyn rusqlite::ToSql; 6] {
    [
        &q.name,
        &q.function_name,
        &q.job,
        &q.attempts,
        &q.not_before_us,
        &q.submitted_us,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn function(name: &str) -> Function {
        serde_json::from_value(serde_json::json!({
            "name": name,
            "upstream": {"driver": "static", "endpoints": ["http://127.0.0.1:9"]}
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn functions_survive_reopening_and_conflicts_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        store.create_function(&function("a")).await.unwrap();
        assert!(matches!(
            store.create_function(&function("a")).await,
            Err(StoreError::Conflict(_))
        ));
        let mut b = function("b");
        store.create_function(&b).await.unwrap();
        b.timeout = Some(50);
        store.update_function(&b).await.unwrap();
        drop(store);

        let store = SqliteStore::open(dir.path()).unwrap();
        let all = store.list_functions().await.unwrap();
        assert_eq!(
            all.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(all[1].timeout, Some(50));
        store.delete_function("a").await.unwrap();
        assert!(matches!(
            store.delete_function("a").await,
            Err(StoreError::NotFound(_))
        ));
        assert!(matches!(
            store.update_function(&function("zz")).await,
            Err(StoreError::NotFound(_))
        ));
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn the_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("data")).unwrap();
        let mode = std::fs::metadata(&store.path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
