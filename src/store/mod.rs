//! Where registrations live: the [`Store`] trait and its backends. SQLite (one file under
//! the data dir) is the embedded default; PostgreSQL joins for several replicas. Runs,
//! APIs, secrets and subscriptions will live here too. The hot path never queries the
//! store: the registry caches what it needs.

pub mod sqlite;

use async_trait::async_trait;

use crate::error::Error;
use crate::model::Function;

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
    /// Adds a function; `Conflict` if the name is taken.
    async fn create_function(&self, function: &Function) -> Result<(), StoreError>;
    /// Replaces a function; `NotFound` if there is none by that name.
    async fn update_function(&self, function: &Function) -> Result<(), StoreError>;
    /// Removes a function; `NotFound` if there is none by that name.
    async fn delete_function(&self, name: &str) -> Result<(), StoreError>;
    /// Whether the store answers (for `/readyz`).
    async fn ping(&self) -> Result<(), StoreError>;
}
