//! Run records, written off the hot path. A finished run goes into a bounded channel; one
//! writer task takes what has piled up (up to `records.batch` runs) and writes it in one
//! transaction. When the writer falls behind, the channel fills and a Dispatch run waits
//! for room: its record is never dropped. A write that fails (the store is down) is tried
//! again with backoff, holding its batch, so nothing within the bound is lost. On shutdown
//! the writer drains the channel and writes everything before the process exits.
//!
//! A blocking run waits (up to `records.wait_ms`) for its record to be committed before it
//! answers, so a caller that lists runs right after finds it.

use std::sync::Arc;
use std::time::Duration;

use prometheus::{IntCounter, IntGauge};
use serde_json::Value;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::config::RecordsConfig;
use crate::model::Run;
use crate::store::Store;

/// Hands runs to the writer.
#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::Sender<Pending>,
    /// How long `record` waits for the commit.
    wait: Duration,
    /// Largest input or output kept, as JSON text; longer ones are cut and flagged.
    body_bytes: usize,
}

/// A run on its way to the store, and whom to tell once it is there.
struct Pending {
    run: Run,
    written: Option<oneshot::Sender<()>>,
}

/// The writer task, to be stopped (and flushed) at shutdown.
pub struct Writer {
    task: JoinHandle<()>,
    stop: Arc<Notify>,
}

/// The writer's metric handles.
#[derive(Clone)]
pub struct RecordMetrics {
    pub written: IntCounter,
    pub pending: IntGauge,
    pub write_failures: IntCounter,
}

impl Recorder {
    pub fn start(
        store: Arc<dyn Store>,
        config: &RecordsConfig,
        metrics: RecordMetrics,
    ) -> (Recorder, Writer) {
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        let stop = Arc::new(Notify::new());
        let task = tokio::spawn(write_loop(
            store,
            rx,
            config.batch.max(1),
            metrics,
            stop.clone(),
        ));
        let recorder = Recorder {
            tx,
            wait: Duration::from_millis(config.wait_ms),
            body_bytes: config.body_bytes,
        };
        (recorder, Writer { task, stop })
    }

    /// Records a run: waits for room when the writer is behind (back-pressure), then for
    /// the commit, up to the configured wait.
    pub async fn record(&self, mut run: Run) {
        let (input_cut, output_cut) = (
            cut(&mut run.input, self.body_bytes),
            cut(&mut run.output, self.body_bytes),
        );
        if let Some(call) = run.call.as_mut() {
            call.input_truncated = input_cut;
            call.output_truncated = output_cut;
        }
        let (written, committed) = match self.wait.is_zero() {
            true => (None, None),
            false => {
                let (tx, rx) = oneshot::channel();
                (Some(tx), Some(rx))
            }
        };
        if self.tx.send(Pending { run, written }).await.is_err() {
            tracing::error!("run record lost: the writer has stopped");
            return;
        }
        if let Some(committed) = committed {
            // Past the wait the record stays queued and is written when the store answers.
            let _ = tokio::time::timeout(self.wait, committed).await;
        }
    }
}

impl Writer {
    /// Writes every run still queued, then returns.
    pub async fn flush_and_stop(self) {
        self.stop.notify_one();
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "run record writer failed");
        }
    }
}

/// Removes old runs every `records.prune_seconds`: older than `records.retention_seconds`,
/// and beyond the newest `records.max_runs`. Runs until the process ends.
pub fn spawn_retention(store: Arc<dyn Store>, config: &RecordsConfig) -> JoinHandle<()> {
    let every = Duration::from_secs(config.prune_seconds);
    let max_age = (config.retention_seconds > 0).then_some(config.retention_seconds as i64);
    let keep = (config.max_runs > 0).then_some(config.max_runs);
    let key_window = config.idempotency_seconds as i64;
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let before = max_age.map(|age| (crate::model::unix_now() - age) * 1_000_000);
            match store.prune_runs(before, keep).await {
                Ok(0) => {}
                Ok(removed) => tracing::info!(removed, "old run records removed"),
                Err(e) => tracing::warn!(error = %e, "removing old run records failed"),
            }
            let keys_before = (crate::model::unix_now() - key_window) * 1_000_000;
            if let Err(e) = store.prune_keys(keys_before).await {
                tracing::warn!(error = %e, "removing old idempotency keys failed");
            }
        }
    })
}

/// Replaces `value` by the start of its JSON text when that is longer than `limit` bytes.
fn cut(value: &mut Value, limit: usize) -> bool {
    if matches!(value, Value::Null | Value::Bool(_) | Value::Number(_)) {
        return false;
    }
    let text = value.to_string();
    if text.len() <= limit {
        return false;
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    *value = Value::String(text[..end].to_string());
    true
}

async fn write_loop(
    store: Arc<dyn Store>,
    mut rx: mpsc::Receiver<Pending>,
    batch_max: usize,
    metrics: RecordMetrics,
    stop: Arc<Notify>,
) {
    let mut batch = Vec::with_capacity(batch_max);
    let mut stopping = false;
    loop {
        if batch.is_empty() {
            tokio::select! {
                received = rx.recv() => match received {
                    Some(run) => batch.push(run),
                    None => break,
                },
                () = stop.notified(), if !stopping => {
                    // No new runs from now on; what is queued is still written.
                    stopping = true;
                    rx.close();
                    continue;
                }
            }
        }
        while batch.len() < batch_max {
            match rx.try_recv() {
                Ok(run) => batch.push(run),
                Err(_) => break,
            }
        }
        metrics.pending.set(rx.len() as i64);
        let runs: Vec<Run> = batch
            .iter_mut()
            .map(|p| std::mem::take(&mut p.run))
            .collect();
        write(&*store, &runs, &metrics, stopping).await;
        for pending in batch.drain(..) {
            if let Some(written) = pending.written {
                let _ = written.send(());
            }
        }
    }
    metrics.pending.set(0);
}

/// Writes one batch, trying again with backoff until it is written. At shutdown it gives
/// up after a few tries rather than hold the process forever, and says what was lost.
async fn write(
    store: &dyn Store,
    batch: &[crate::model::Run],
    metrics: &RecordMetrics,
    stopping: bool,
) {
    let mut delay = Duration::from_millis(50);
    for attempt in 1.. {
        match store.put_runs(batch).await {
            Ok(()) => {
                metrics.written.inc_by(batch.len() as u64);
                return;
            }
            Err(e) => {
                metrics.write_failures.inc();
                if stopping && attempt >= 5 {
                    tracing::error!(runs = batch.len(), error = %e, "run records lost at shutdown: the store does not answer");
                    return;
                }
                tracing::warn!(runs = batch.len(), error = %e, attempt, "writing run records failed; trying again");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn long_values_are_cut_and_short_ones_kept() {
        let mut short = json!({"a": 1});
        assert!(!cut(&mut short, 64));
        assert_eq!(short, json!({"a": 1}));
        let mut long = json!({"text": "é".repeat(100)});
        assert!(cut(&mut long, 21));
        let kept = long.as_str().unwrap();
        assert!(
            kept.len() <= 21 && kept.starts_with("{\"text\":\"é"),
            "{kept}"
        );
    }
}
