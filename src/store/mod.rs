//! Where registrations live: the [`Store`] trait and its backends. SQLite (one file under
//! the data dir) is the embedded default; PostgreSQL joins for several replicas. Functions,
//! runs, base images, images, secrets, subscriptions and APIs live here. The
//! hot path never queries the store: the registry and the catalog cache what it needs.

pub mod calls;
pub mod postgres;
pub mod sqlite;

use async_trait::async_trait;
use serde_json::Value;

use crate::error::Error;
use crate::model::{Api, BaseImage, Function, Image, Run, Secret, Status, Subscription};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} already exists")]
    Conflict(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Backend(String),
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(what) => Error::Conflict(format!("{what} already exists")),
            StoreError::NotFound(what) => Error::NotFound(format!("{what} not found")),
            StoreError::Backend(why) => Error::Store(why),
        }
    }
}

#[async_trait]
pub trait Store: Send + Sync {
    /// Every registered function.
    async fn list_functions(&self) -> Result<Vec<Function>, StoreError>;
    /// One function by name.
    async fn get_function(&self, name: &str) -> Result<Option<Function>, StoreError>;
    /// Changes to functions made by anyone sharing this store (other gateways), for the
    /// registry to follow; `None` when nobody else can share it (SQLite).
    fn watch_functions(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<FunctionChange>> {
        None
    }
    /// Adds a function; `Conflict` if the name is taken.
    async fn create_function(&self, function: &Function) -> Result<(), StoreError>;
    /// Replaces a function; `NotFound` if there is none by that name.
    async fn update_function(&self, function: &Function) -> Result<(), StoreError>;
    /// Removes a function; `NotFound` if there is none by that name.
    async fn delete_function(&self, name: &str) -> Result<(), StoreError>;
    /// Claims `key` for a run of `function`: `Claim::New` when no run holds it since
    /// `window_start_us` (the key now names `run_name`), else the run that does. Atomic:
    /// of concurrent claims, one gets `New`.
    async fn claim_key(
        &self,
        function: &str,
        key: &str,
        run_name: &str,
        now_us: i64,
        window_start_us: i64,
    ) -> Result<Claim, StoreError>;
    /// Gives a key back, if `run_name` still holds it (the run never started).
    async fn release_key(
        &self,
        function: &str,
        key: &str,
        run_name: &str,
    ) -> Result<(), StoreError>;
    /// Forgets the keys claimed before `before_us`.
    async fn prune_keys(&self, before_us: i64) -> Result<u64, StoreError>;
    /// Whether the store answers (for `/readyz`).
    async fn ping(&self) -> Result<(), StoreError>;

    /// Every base image, by name.
    async fn list_base_images(&self) -> Result<Vec<BaseImage>, StoreError>;
    async fn get_base_image(&self, name: &str) -> Result<Option<BaseImage>, StoreError>;
    /// Adds a base image; `Conflict` if the name is taken.
    async fn create_base_image(&self, image: &BaseImage) -> Result<(), StoreError>;
    /// Removes a base image; `NotFound` if there is none by that name.
    async fn delete_base_image(&self, name: &str) -> Result<(), StoreError>;

    /// Every image, by name.
    async fn list_images(&self) -> Result<Vec<Image>, StoreError>;
    async fn get_image(&self, name: &str) -> Result<Option<Image>, StoreError>;
    /// Adds an image; `Conflict` if the name is taken.
    async fn create_image(&self, image: &Image) -> Result<(), StoreError>;
    /// Removes an image; `NotFound` if there is none by that name.
    async fn delete_image(&self, name: &str) -> Result<(), StoreError>;

    /// Every secret, by name, values included (for the catalog only: the API masks them).
    async fn list_secrets(&self) -> Result<Vec<Secret>, StoreError>;
    async fn get_secret(&self, name: &str) -> Result<Option<Secret>, StoreError>;
    /// Adds a secret; `Conflict` if the name is taken.
    async fn create_secret(&self, secret: &Secret) -> Result<(), StoreError>;
    /// Replaces a secret; `NotFound` if there is none by that name.
    async fn update_secret(&self, secret: &Secret) -> Result<(), StoreError>;
    /// Removes a secret; `NotFound` if there is none by that name.
    async fn delete_secret(&self, name: &str) -> Result<(), StoreError>;

    async fn list_subscriptions(&self) -> Result<Vec<Subscription>, StoreError>;
    async fn get_subscription(&self, name: &str) -> Result<Option<Subscription>, StoreError>;
    /// `Conflict` if the name is taken.
    async fn create_subscription(&self, subscription: &Subscription) -> Result<(), StoreError>;
    /// `NotFound` if there is no such subscription.
    async fn update_subscription(&self, subscription: &Subscription) -> Result<(), StoreError>;
    /// `NotFound` if there is no such subscription.
    async fn delete_subscription(&self, name: &str) -> Result<(), StoreError>;
    /// The documents of one catalog kind, as JSON (what [`list_apis`] and its siblings
    /// read and write). `create_document` answers `Conflict` for a name taken,
    /// `update_document` and `delete_document` `NotFound` for a name absent.
    async fn list_documents(&self, kind: CatalogKind) -> Result<Vec<Value>, StoreError>;
    async fn get_document(
        &self,
        kind: CatalogKind,
        name: &str,
    ) -> Result<Option<Value>, StoreError>;
    async fn create_document(
        &self,
        kind: CatalogKind,
        name: &str,
        document: &Value,
    ) -> Result<(), StoreError>;
    async fn update_document(
        &self,
        kind: CatalogKind,
        name: &str,
        document: &Value,
    ) -> Result<(), StoreError>;
    async fn delete_document(&self, kind: CatalogKind, name: &str) -> Result<(), StoreError>;
    /// Changes to base images, images and secrets made by anyone sharing this store, as
    /// `Changed("<kind>:<name>")` with kind `baseimage`, `image` or `secret` (see
    /// [`CatalogKind`]); `None` when nobody else can share it (SQLite).
    fn watch_catalog(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<Change>> {
        None
    }

    /// Accepts async runs for the embedded queue: each one's record (INITIALIZED) and its
    /// place in the queue, all in one transaction (all or none), so an accepted run is
    /// never lost and never queued without a record. A name already queued or recorded
    /// fails the whole batch.
    async fn enqueue_runs(&self, runs: &[(Run, QueuedRun)]) -> Result<(), StoreError>;

    /// Takes up to `limit` queued runs due by `now_us` that nobody holds (or whose holder's
    /// hold ended: a gateway that died), holding them until `hold_until_us`. Each taken
    /// run's `attempts` counts one more. Several gateways may take at once: each run goes
    /// to one of them.
    async fn take_queued(
        &self,
        now_us: i64,
        hold_until_us: i64,
        limit: u32,
    ) -> Result<Vec<QueuedRun>, StoreError>;

    /// Holds a taken run longer (it is still running): nobody takes it before `until_us`.
    async fn hold_run(&self, name: &str, until_us: i64) -> Result<(), StoreError>;

    /// Puts a taken run back in the queue, due at `not_before_us` (a retry after a backoff).
    async fn requeue_run(&self, name: &str, not_before_us: i64) -> Result<(), StoreError>;

    /// A queued run's end in one transaction: its record written (or rewritten), and the
    /// run out of the queue, or kept aside with the dead letters when `dead` (never taken
    /// again unless revived).
    async fn finish_queued(&self, run: &Run, dead: bool) -> Result<(), StoreError>;

    /// A run of another queue (RabbitMQ) that ended ERROR, kept with the dead letters:
    /// `queued` written as a dead entry (or an entry of that name made dead), then the
    /// record as [`Store::finish_queued`] writes it. Doing it again is harmless.
    async fn bury_run(&self, run: &Run, queued: &QueuedRun) -> Result<(), StoreError>;

    /// Takes a dead run out of the dead letters, for another queue to send again; `None`
    /// when no dead run has that name.
    async fn unbury_run(&self, name: &str) -> Result<Option<QueuedRun>, StoreError>;

    /// The dead runs' names, most recently submitted first.
    async fn dead_runs(&self, limit: u32) -> Result<Vec<String>, StoreError>;

    /// Sends a dead run again: due at `now_us`, its attempts counted afresh. False when
    /// no dead run has that name.
    async fn revive_run(&self, name: &str, now_us: i64) -> Result<bool, StoreError>;

    /// Writes runs in one transaction. A run whose name is stored already is replaced, so
    /// writing the same run twice leaves one record.
    async fn put_runs(&self, runs: &[Run]) -> Result<(), StoreError>;
    /// Writes run records and records of raw calls (see [`calls`]). The default writes
    /// each call as a run of its own; a backend may keep calls packed instead, as long as
    /// `get_run` and `list_runs` show them as runs.
    async fn put_records(
        &self,
        runs: &[Run],
        calls: &[calls::CallBatch],
    ) -> Result<(), StoreError> {
        let mut as_runs = Vec::new();
        for batch in calls {
            as_runs.extend(batch.to_runs().map_err(|e| {
                StoreError::Backend(format!("unpacking the records of raw calls: {e}"))
            })?);
        }
        match (runs.is_empty(), as_runs.is_empty()) {
            (_, true) => self.put_runs(runs).await,
            (true, false) => self.put_runs(&as_runs).await,
            (false, false) => {
                self.put_runs(runs).await?;
                self.put_runs(&as_runs).await
            }
        }
    }
    /// Writes runs in one transaction, except those whose name is stored already: their
    /// record stays (a run's first record, written while it may already be running).
    async fn add_runs(&self, runs: &[Run]) -> Result<(), StoreError>;
    /// One run by name.
    async fn get_run(&self, name: &str) -> Result<Option<Run>, StoreError>;
    /// Runs matching `query`, newest first (start time, then name), at most `query.limit`.
    async fn list_runs(&self, query: &RunQuery) -> Result<Vec<Run>, StoreError>;
    /// Removes the runs that started before `started_before_us`, then all but the newest
    /// `keep` (each when given). Returns how many were removed.
    async fn prune_runs(
        &self,
        started_before_us: Option<i64>,
        keep: Option<u64>,
    ) -> Result<u64, StoreError>;
}

/// Every API endpoint.
pub async fn list_apis(store: &dyn Store) -> Result<Vec<Api>, StoreError> {
    store
        .list_documents(CatalogKind::Api)
        .await?
        .into_iter()
        .map(api_of)
        .collect()
}

pub async fn get_api(store: &dyn Store, name: &str) -> Result<Option<Api>, StoreError> {
    store
        .get_document(CatalogKind::Api, name)
        .await?
        .map(api_of)
        .transpose()
}

pub async fn create_api(store: &dyn Store, api: &Api) -> Result<(), StoreError> {
    store
        .create_document(CatalogKind::Api, &api.name, &document_of(api)?)
        .await
}

pub async fn update_api(store: &dyn Store, api: &Api) -> Result<(), StoreError> {
    store
        .update_document(CatalogKind::Api, &api.name, &document_of(api)?)
        .await
}

fn api_of(document: Value) -> Result<Api, StoreError> {
    serde_json::from_value(document)
        .map_err(|e| StoreError::Backend(format!("a stored API does not read back: {e}")))
}

fn document_of(api: &Api) -> Result<Value, StoreError> {
    serde_json::to_value(api).map_err(|e| StoreError::Backend(format!("API to JSON: {e}")))
}

/// An async run in the embedded queue.
#[derive(Debug, Clone, PartialEq)]
pub struct QueuedRun {
    pub name: String,
    pub function_name: String,
    /// What to run, as the queue encodes it (see `queue/mod.rs`).
    pub job: String,
    /// Attempts started so far.
    pub attempts: u32,
    pub not_before_us: i64,
    pub submitted_us: i64,
}

/// The outcome of claiming an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The key is this run's: run it.
    New,
    /// The key belongs to this run (finished, or still running): answer with it.
    Existing(String),
}

/// What changed in the store, as another gateway sharing it tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// This entry was created, updated or deleted: read it again.
    Changed(String),
    /// Changes may have been missed (the listener reconnected): read them all again.
    Resync,
}

/// What changed in the store's functions: the function's name.
pub type FunctionChange = Change;

/// The kinds of catalog entries a [`Change`] from [`Store::watch_catalog`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatalogKind {
    BaseImage,
    Image,
    Secret,
    Subscription,
    Api,
}

impl CatalogKind {
    /// The table each kind lives in, and the prefix its changes carry.
    pub fn table(self) -> &'static str {
        match self {
            CatalogKind::BaseImage => "base_images",
            CatalogKind::Image => "images",
            CatalogKind::Secret => "secrets",
            CatalogKind::Subscription => "subscriptions",
            CatalogKind::Api => "apis",
        }
    }

    pub fn prefix(self) -> &'static str {
        match self {
            CatalogKind::BaseImage => "baseimage",
            CatalogKind::Image => "image",
            CatalogKind::Secret => "secret",
            CatalogKind::Subscription => "subscription",
            CatalogKind::Api => "api",
        }
    }

    /// What messages call it: `base image "python3"`.
    pub fn noun(self) -> &'static str {
        match self {
            CatalogKind::BaseImage => "base image",
            CatalogKind::Image => "image",
            CatalogKind::Secret => "secret",
            CatalogKind::Subscription => "subscription",
            CatalogKind::Api => "API",
        }
    }

    /// Reads `<kind>:<name>` back.
    pub fn parse(change: &str) -> Option<(CatalogKind, &str)> {
        let (prefix, name) = change.split_once(':')?;
        let kind = [
            CatalogKind::BaseImage,
            CatalogKind::Image,
            CatalogKind::Secret,
            CatalogKind::Subscription,
            CatalogKind::Api,
        ]
        .into_iter()
        .find(|k| k.prefix() == prefix)?;
        Some((kind, name))
    }
}

/// Which runs to list. `after` is the position of the last run of the previous page:
/// keyset paging, so a page stays correct while new runs arrive.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunQuery {
    pub function_name: Option<String>,
    /// Unix seconds: runs started at or after.
    pub since: Option<i64>,
    pub status: Option<Status>,
    /// `key=value` (or `key`): every one must match.
    pub tags: Vec<(String, Option<String>)>,
    pub limit: u32,
    pub after: Option<RunPosition>,
}

/// Where a run sits in the listing order (newest first: start time, then name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunPosition {
    pub started_us: i64,
    pub name: String,
}

impl RunPosition {
    pub fn of(run: &Run) -> Self {
        RunPosition {
            started_us: run_started_us(run),
            name: run.name.clone(),
        }
    }

    /// The opaque cursor a client passes back: `<started_us>.<name>`, hex-encoded.
    pub fn to_cursor(&self) -> String {
        format!("{}.{}", self.started_us, self.name)
            .bytes()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    pub fn from_cursor(cursor: &str) -> Option<Self> {
        if !cursor.len().is_multiple_of(2) || cursor.len() > 512 {
            return None;
        }
        let bytes: Option<Vec<u8>> = (0..cursor.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(cursor.get(i..i + 2)?, 16).ok())
            .collect();
        let text = String::from_utf8(bytes?).ok()?;
        let (us, name) = text.split_once('.')?;
        Some(RunPosition {
            started_us: us.parse().ok()?,
            name: name.to_string(),
        })
    }
}

/// The start of a run in microseconds: recorded with the call, or its executed time.
pub fn run_started_us(run: &Run) -> i64 {
    run.call
        .as_ref()
        .map(|c| c.started_us)
        .unwrap_or(run.executed_time * 1_000_000)
}

/// A run's tags as one string, `|k=v|k2=v2|`, which `LIKE '%|k=v|%'` (or `'%|k=%'`)
/// matches: one tag filter that every backend can run.
pub fn tags_key(run: &Run) -> String {
    let mut key = String::from("|");
    for tag in &run.tags {
        key.push_str(&tag.key.replace('|', "/"));
        key.push('=');
        key.push_str(&tag.value.replace('|', "/"));
        key.push('|');
    }
    key
}

/// The `LIKE` pattern of one tag filter; `\` is the escape character.
pub fn tag_pattern(key: &str, value: Option<&str>) -> String {
    let escape = |s: &str| {
        s.replace('|', "/")
            .replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_")
    };
    match value {
        Some(v) => format!("%|{}={}|%", escape(key), escape(v)),
        None => format!("%|{}=%", escape(key)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let p = RunPosition {
            started_us: 1_795_570_878_123_456,
            name: "0ac6391f-a56e-4b2e-806f-c2312e588edb".into(),
        };
        assert_eq!(RunPosition::from_cursor(&p.to_cursor()), Some(p));
        assert_eq!(RunPosition::from_cursor("zz"), None);
        assert_eq!(RunPosition::from_cursor("abc"), None);
        assert_eq!(RunPosition::from_cursor("6162"), None);
    }

    #[test]
    fn tag_patterns_escape_like_wildcards() {
        assert_eq!(tag_pattern("a_b", Some("50%")), r"%|a\_b=50\%|%");
        assert_eq!(tag_pattern("k", None), "%|k=%");
    }
}
