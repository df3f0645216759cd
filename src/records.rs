//! Run records, written off the hot path. A finished run goes into a bounded channel; one
//! writer task takes what has piled up (up to `records.batch` runs) and writes it in one
//! transaction. When the writer falls behind, the channel fills and a Dispatch run waits
//! for room: its record is never dropped. A write that fails (the store is down) is tried
//! again with backoff, holding its batch, so nothing within the bound is lost. On shutdown
//! the writer drains the channel and writes everything before the process exits.
//!
//! A blocking run waits (up to `records.wait_ms`) for its record to be committed before it
//! answers, so a caller that lists runs right after finds it.
//!
//! A call on the raw surface is recorded as a [`RawCall`]: what the call kept (the first
//! bytes of each body, as the frames that carried them). When the call ends it is packed at
//! once, as a compact [`CallRecord`] (no JSON is parsed or written: the Run is built when the
//! record is read), into the open batch of its function ([`OpenCalls`]), which the writer
//! takes whole: a raw call costs no allocation, no channel send and no hand-off of its own.
//! A raw call never waits: when `records.queue` calls are already waiting to be written,
//! its record is dropped and counted.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::borrow::Cow;

use bytes::Bytes;
use http::{HeaderValue, Method, Uri};
use prometheus::{IntCounter, IntGauge};
use serde_json::Value;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::config::RecordsConfig;
use crate::model::Run;
use crate::store::calls::{ByteStr, CallBatch, CallRef};

use crate::store::Store;

/// Hands runs to the writer. Cheap to clone (one reference count): every recorded call
/// holds one until it ends.
#[derive(Clone)]
pub struct Recorder(Arc<Shared>);

struct Shared {
    tx: mpsc::Sender<Pending>,
    /// Raw calls, packed as they end, until the writer takes them.
    calls: Arc<OpenCalls>,
    /// Raw-call records dropped because the queue was full.
    dropped: IntCounter,
    /// Records queued and not yet written (`dispatch_run_records_pending`).
    pending: IntGauge,
    /// How long `record` waits for the commit.
    wait: Duration,
    /// Largest input or output kept, as JSON text; longer ones are cut and flagged.
    body_bytes: usize,
}

/// A Dispatch run on its way to the store, and whom to tell once it is written.
struct Pending {
    run: Box<Run>,
    written: Option<oneshot::Sender<()>>,
}

/// The raw calls packed and not yet written, shared by the calls (which pack into it as
/// they end) and the writer (which takes it whole). The lock is held for one call's packing
/// (a few hundred nanoseconds) or for a swap of two vectors; nothing waits under it.
struct OpenCalls {
    open: Mutex<Open>,
    /// Raw calls packed and not yet written (open, or in the writer's hands): the bound of
    /// `records.queue` applies to these.
    pending: AtomicUsize,
    bound: usize,
    /// The number of open calls at which the writer is woken before its linger ends.
    full_at: usize,
    /// Wakes the writer: at the first open call (it then lingers for more), and when
    /// `full_at` calls are open.
    wake: tokio::sync::Notify,
}

#[derive(Default)]
struct Open {
    batches: Vec<CallBatch>,
    calls: usize,
    /// The writer has stopped: a call ending now is dropped (and counted).
    closed: bool,
}

impl OpenCalls {
    /// Packs `call`; false when it cannot be kept (the queue is full, or the writer gone).
    fn pack(&self, call: &RawCall) -> bool {
        if self.pending.load(Ordering::Relaxed) >= self.bound {
            return false;
        }
        let Ok(mut open) = self.open.lock() else {
            return false;
        };
        if open.closed {
            return false;
        }
        call.pack_into(&mut open.batches);
        open.calls += 1;
        let calls = open.calls;
        drop(open);
        self.pending.fetch_add(1, Ordering::Relaxed);
        if calls == 1 || calls == self.full_at {
            self.wake.notify_one();
        }
        true
    }

    fn open_calls(&self) -> usize {
        self.open.lock().map(|o| o.calls).unwrap_or(0)
    }

    /// Takes every open batch (leaving `spare`'s room in their place), and with `close`
    /// makes every later call a dropped one.
    fn take(&self, spare: &mut Vec<CallBatch>, close: bool) {
        if let Ok(mut open) = self.open.lock() {
            std::mem::swap(&mut open.batches, spare);
            open.calls = 0;
            open.closed |= close;
        }
    }

    /// `n` taken calls are written (or given up on).
    fn done(&self, n: usize) {
        self.pending.fetch_sub(n, Ordering::Relaxed);
    }
}

/// The first bytes of a body, as the frames that carried them. They are slices of the
/// frames, not copies: a call's record is packed the moment the call ends, so a slice keeps
/// its read buffer no longer than the frame itself lives.
#[derive(Debug, Default)]
pub struct Captured {
    /// The first frame's piece (the whole body, for most calls), and any others.
    first: Bytes,
    more: Vec<Bytes>,
    len: usize,
    truncated: bool,
}

impl Captured {
    /// Keeps `data`, or what of it fits under `limit`.
    pub fn keep(&mut self, data: &Bytes, limit: usize) {
        let room = limit.saturating_sub(self.len);
        if data.len() > room {
            self.truncated = true;
        }
        let take = data.len().min(room);
        if take > 0 {
            let piece = data.slice(..take);
            match self.len {
                0 => self.first = piece,
                _ => self.more.push(piece),
            }
            self.len += take;
        }
    }

    /// The kept bytes, in one piece (no copy when one frame carried them).
    fn bytes(&self) -> Cow<'_, [u8]> {
        if self.more.is_empty() {
            return Cow::Borrowed(&self.first);
        }
        let mut all = Vec::with_capacity(self.len);
        all.extend_from_slice(&self.first);
        for chunk in &self.more {
            all.extend_from_slice(chunk);
        }
        Cow::Owned(all)
    }
}

/// A call on the raw surface, as the invoker saw it.
pub struct RawCall {
    /// The function's name and id: not its registry entry, which a queued record would
    /// keep alive (and, with it, the pools of endpoints the function has left).
    pub function_name: Arc<str>,
    pub function_id: Arc<str>,
    pub call_id: HeaderValue,
    pub method: Method,
    pub uri: Uri,
    pub started_us: i64,
    pub duration: Duration,
    /// The status the caller got.
    pub status: u16,
    pub endpoint: Option<Arc<str>>,
    /// The request body, kept by the body as the upstream connection sends it.
    pub request: Option<Arc<std::sync::Mutex<Captured>>>,
    pub response: Captured,
    /// Why the gateway failed the call, if it did.
    pub failure: Option<String>,
    /// Whether the answer was read to its end.
    pub complete: bool,
}

impl RawCall {
    /// Whether the call failed: an HTTP status of 400 or more, a failure of the gateway,
    /// or an answer cut off (what `"record": "errors"` keeps).
    pub fn failed(&self) -> bool {
        self.status >= 400 || self.failure.is_some() || !self.complete
    }

    /// Packs the call's record into the batch of its function (a new batch when there is
    /// none, or when that one is full).
    fn pack_into(&self, batches: &mut Vec<CallBatch>) {
        let request = self.request.as_ref().and_then(|c| c.lock().ok());
        let (input, input_truncated) = match &request {
            Some(kept) => (kept.bytes(), kept.truncated),
            None => (Cow::Borrowed(&[][..]), false),
        };
        let output = self.response.bytes();
        let call = CallRef {
            function_id: &self.function_id,
            call_id: self.call_id.to_str().unwrap_or_default(),
            method: self.method.as_str(),
            path: self.uri.path(),
            query: self.uri.query().unwrap_or(""),
            started_us: self.started_us,
            duration_us: self.duration.as_micros() as u64,
            status: self.status,
            endpoint: self.endpoint.as_deref().unwrap_or_default(),
            input: ByteStr(&input),
            input_truncated,
            output: ByteStr(&output),
            output_truncated: self.response.truncated,
            failure: self.failure.as_deref(),
            complete: self.complete,
        };
        let batch = match batches
            .iter_mut()
            .rposition(|b| *b.function_name == *self.function_name && !b.is_full())
        {
            Some(at) => &mut batches[at],
            None => {
                batches.push(CallBatch::new(&self.function_name));
                batches.last_mut().expect("just pushed")
            }
        };
        if let Err(e) = batch.push(&call) {
            tracing::error!(error = %e, function = %self.function_name, "a raw call's record could not be packed");
        }
    }
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
    pub dropped: IntCounter,
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
        let calls = Arc::new(OpenCalls {
            open: Mutex::new(Open::default()),
            pending: AtomicUsize::new(0),
            bound: config.queue.max(1),
            full_at: config.batch.max(1),
            wake: Notify::new(),
        });
        let recorder = Recorder(Arc::new(Shared {
            tx,
            calls: calls.clone(),
            dropped: metrics.dropped.clone(),
            pending: metrics.pending.clone(),
            wait: Duration::from_millis(config.wait_ms),
            body_bytes: config.body_bytes,
        }));
        let task = tokio::spawn(write_loop(
            store,
            rx,
            calls,
            Batching {
                max: config.batch.max(1),
                linger: Duration::from_millis(config.linger_ms),
            },
            metrics,
            stop.clone(),
        ));
        (recorder, Writer { task, stop })
    }

    /// Records a run: waits for room when the writer is behind (back-pressure), then for
    /// the commit, up to the configured wait.
    pub async fn record(&self, mut run: Run) {
        let (input_cut, output_cut) = (
            cut(&mut run.input, self.0.body_bytes),
            cut(&mut run.output, self.0.body_bytes),
        );
        if let Some(call) = run.call.as_mut() {
            call.input_truncated = input_cut;
            call.output_truncated = output_cut;
        }
        let (written, committed) = match self.0.wait.is_zero() {
            true => (None, None),
            false => {
                let (tx, rx) = oneshot::channel();
                (Some(tx), Some(rx))
            }
        };
        let run = Box::new(run);
        if self.0.tx.send(Pending { run, written }).await.is_err() {
            tracing::error!("run record lost: the writer has stopped");
            return;
        }
        if let Some(committed) = committed {
            // Past the wait the record stays queued and is written when the store answers.
            let _ = tokio::time::timeout(self.0.wait, committed).await;
        }
    }
}

impl Recorder {
    /// Records a raw call without waiting: when the queue is full the record is dropped
    /// (and counted), never the call held up.
    pub fn record_raw(&self, call: RawCall) {
        if !self.0.calls.pack(&call) {
            self.0.dropped.inc();
        }
    }

    /// The largest body a record keeps.
    pub fn body_bytes(&self) -> usize {
        self.0.body_bytes
    }

    /// Brings `dispatch_run_records_pending` up to date (before a scrape: the calls do
    /// not touch it, to stay cheap).
    pub fn update_pending(&self) {
        let runs = self.0.tx.max_capacity() - self.0.tx.capacity();
        let calls = self.0.calls.pending.load(Ordering::Relaxed);
        self.0.pending.set((runs + calls) as i64);
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

/// How the writer groups records into transactions.
struct Batching {
    max: usize,
    /// How long to wait for more after the first record of a batch.
    linger: Duration,
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
    calls: Arc<OpenCalls>,
    batching: Batching,
    metrics: RecordMetrics,
    stop: Arc<Notify>,
) {
    let Batching {
        max: batch_max,
        linger,
    } = batching;
    let mut batch: Vec<Pending> = Vec::with_capacity(batch_max);
    let mut taken: Vec<CallBatch> = Vec::new();
    let mut stopping = false;
    loop {
        if !stopping && batch.is_empty() && calls.open_calls() == 0 {
            tokio::select! {
                received = rx.recv() => match received {
                    Some(run) => batch.push(run),
                    None => stopping = true,
                },
                () = calls.wake.notified() => {}
                () = stop.notified() => {
                    // No new records from now on; what is queued is still written.
                    stopping = true;
                    rx.close();
                }
            }
            if !stopping && batch.is_empty() && calls.open_calls() == 0 {
                continue;
            }
        }
        // A caller waiting for its run to be written is not made to wait for company too:
        // only batches of records nobody waits for linger (under load, batches fill anyway
        // while the previous one commits).
        let awaited = batch.iter().any(|p| p.written.is_some());
        if !stopping
            && !awaited
            && !linger.is_zero()
            && rx.len() + batch.len() + calls.open_calls() < batch_max
        {
            // A shutdown cuts the wait short, and so do enough raw calls (a wake-up may also
            // be the first call since the last take, which says nothing of how many are in).
            let until = tokio::time::Instant::now() + linger;
            loop {
                tokio::select! {
                    () = tokio::time::sleep_until(until) => break,
                    () = calls.wake.notified() => {
                        if rx.len() + batch.len() + calls.open_calls() >= batch_max {
                            break;
                        }
                    }
                    () = stop.notified() => {
                        stopping = true;
                        rx.close();
                        break;
                    }
                }
            }
        }
        while batch.len() < batch_max {
            match rx.try_recv() {
                Ok(run) => batch.push(run),
                Err(_) => break,
            }
        }
        // At the end the open calls are taken for the last time: a call ending later is
        // dropped (and counted), not left unwritten.
        let last = stopping && rx.is_empty();
        calls.take(&mut taken, last);
        let runs: Vec<Run> = batch
            .iter_mut()
            .map(|pending| std::mem::take(&mut *pending.run))
            .collect();
        let raw: usize = taken.iter().map(|b| b.calls).sum();
        if !runs.is_empty() || raw > 0 {
            write(&*store, &runs, &taken, &metrics, stopping).await;
        }
        calls.done(raw);
        taken.clear();
        for pending in batch.drain(..) {
            if let Some(written) = pending.written {
                let _ = written.send(());
            }
        }
        if last {
            break;
        }
    }
    metrics.pending.set(0);
}

/// Writes one batch, trying again with backoff until it is written. At shutdown it gives
/// up after a few tries rather than hold the process forever, and says what was lost.
async fn write(
    store: &dyn Store,
    runs: &[Run],
    calls: &[CallBatch],
    metrics: &RecordMetrics,
    stopping: bool,
) {
    let records = runs.len() + calls.iter().map(|b| b.calls).sum::<usize>();
    let mut delay = Duration::from_millis(50);
    for attempt in 1.. {
        match store.put_records(runs, calls).await {
            Ok(()) => {
                metrics.written.inc_by(records as u64);
                return;
            }
            Err(e) => {
                metrics.write_failures.inc();
                if stopping && attempt >= 5 {
                    tracing::error!(runs = records, error = %e, "run records lost at shutdown: the store does not answer");
                    return;
                }
                tracing::warn!(runs = records, error = %e, attempt, "writing run records failed; trying again");
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
