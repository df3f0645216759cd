//! Group commit: writes to the store that many tasks wait on go in batches. A write waits
//! for the next commit, and writes handed in while a commit is under way share the one
//! after it, so a burst costs a transaction per batch, not per item. The embedded queue
//! writes accepted runs this way (record and queue entry); the RabbitMQ backend writes run
//! records (INITIALIZED at submit, never over a later one; CREATING; the outcome before the
//! ack).

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};

use crate::error::Error;
use crate::model::Run;
use crate::store::{QueuedRun, Store, StoreError};

/// Items written per transaction, at most.
const BATCH: usize = 256;

/// One kind of batched write.
#[async_trait]
pub trait BatchWrite: Send + Sync + 'static {
    type Item: Send + 'static;
    /// Writes every item in one transaction, all or none.
    async fn write(&self, items: &[Self::Item]) -> Result<(), StoreError>;
}

/// Hands items to a task that writes them in batches; each caller gets its item back once
/// it is written (no copy of a possibly large run is kept meanwhile).
pub struct GroupCommit<W: BatchWrite> {
    tx: mpsc::Sender<Pending<W::Item>>,
}

type Pending<T> = (T, oneshot::Sender<Result<T, StoreError>>);

impl<W: BatchWrite> GroupCommit<W> {
    pub fn start(writer: W) -> Self {
        let (tx, rx) = mpsc::channel(4 * BATCH);
        tokio::spawn(write_batches(writer, rx));
        GroupCommit { tx }
    }

    /// Returns the item once it is in the store (or why it could not be written).
    pub async fn write(&self, item: W::Item) -> Result<W::Item, Error> {
        let (done, written) = oneshot::channel();
        let stopped = || Error::Store("the batch writer has stopped".into());
        self.tx.send((item, done)).await.map_err(|_| stopped())?;
        written.await.map_err(|_| stopped())?.map_err(Error::from)
    }
}

async fn write_batches<W: BatchWrite>(writer: W, mut rx: mpsc::Receiver<Pending<W::Item>>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(more) => batch.push(more),
                Err(_) => break,
            }
        }
        let (items, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        match writer.write(&items).await {
            Ok(()) => {
                for (item, reply) in items.into_iter().zip(replies) {
                    let _ = reply.send(Ok(item));
                }
            }
            // One bad item (a caller's X-Call-Id used twice) must not fail the others:
            // each goes again on its own and gets its own answer.
            Err(_) if items.len() > 1 => {
                for (item, reply) in items.into_iter().zip(replies) {
                    let written = writer.write(std::slice::from_ref(&item)).await;
                    let _ = reply.send(written.map(|()| item));
                }
            }
            Err(e) => {
                if let Some(reply) = replies.into_iter().next() {
                    let _ = reply.send(Err(e));
                }
            }
        }
    }
}

/// Accepted runs of the embedded queue: each one's record and its queue entry.
pub struct Enqueue(pub Arc<dyn Store>);

#[async_trait]
impl BatchWrite for Enqueue {
    type Item = (Run, QueuedRun);
    async fn write(&self, items: &[Self::Item]) -> Result<(), StoreError> {
        self.0.enqueue_runs(items).await
    }
}

/// Run records, each replacing the one of its name.
pub struct Records(pub Arc<dyn Store>);

#[async_trait]
impl BatchWrite for Records {
    type Item = Run;
    async fn write(&self, items: &[Self::Item]) -> Result<(), StoreError> {
        self.0.put_runs(items).await
    }
}

/// First records of runs: a name recorded already keeps its record (the run got further
/// meanwhile).
pub struct FirstRecords(pub Arc<dyn Store>);

#[async_trait]
impl BatchWrite for FirstRecords {
    type Item = Run;
    async fn write(&self, items: &[Self::Item]) -> Result<(), StoreError> {
        self.0.add_runs(items).await
    }
}
