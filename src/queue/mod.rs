//! Async runs. A run submitted without `blocking` (or on `/async-function/{name}`) is
//! accepted only once it is durable: with the `embedded` backend, its record (INITIALIZED)
//! and its place in the queue are written to the store in one transaction before the 202.
//! Workers take due runs from the queue (holding each for `queue.hold_seconds`, so that a
//! gateway that dies lets go of its runs), mark them CREATING, run them through the same
//! invoker as blocking runs (pool, limits, deadlines, schemas, secrets), and then either
//! record the outcome and take the run out of the queue, or put it back for a retry after an
//! exponential backoff with jitter (failures worth trying again: the function could not be
//! reached, or answered 429, 502, 503 or 504). Delivery is at least once; the record is one
//! per run name, whatever the number of attempts.

pub mod callback;

use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, Semaphore};

use crate::api::App;
use crate::config::QueueConfig;
use crate::error::Error;
use crate::model::{
    CallFacts, Run, RunError, RunErrorType, RunRequest, Status, unix_micros, unix_now,
};
use crate::store::{QueuedRun, Store, StoreError};

/// What a queued run carries: the run request, as the client sent it, and where its
/// answer goes when it ends.
#[derive(Serialize, Deserialize)]
struct Job {
    request: RunRequest,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    callback: Option<callback::Callback>,
}

/// Writes submitted runs to the store in batches: a submit waits for the next commit, and
/// runs submitted while a commit is under way share the one after it (group commit), so a
/// burst costs a commit per batch, not per run.
pub struct Submitter {
    tx: tokio::sync::mpsc::Sender<Submission>,
}

struct Submission {
    run: Run,
    queued: QueuedRun,
    /// The run back once written (no copy of a possibly large input is kept meanwhile).
    done: tokio::sync::oneshot::Sender<Result<Run, StoreError>>,
}

/// Runs written per transaction, at most.
const SUBMIT_BATCH: usize = 256;

impl Submitter {
    pub fn start(store: Arc<dyn Store>) -> Submitter {
        let (tx, rx) = tokio::sync::mpsc::channel(4 * SUBMIT_BATCH);
        tokio::spawn(write_submissions(store, rx));
        Submitter { tx }
    }

    /// Returns the run once it is in the store (or why it could not be written).
    async fn accept(&self, run: Run, queued: QueuedRun) -> Result<Run, Error> {
        let (done, written) = tokio::sync::oneshot::channel();
        let stopped = || Error::Store("the queue writer has stopped".into());
        self.tx
            .send(Submission { run, queued, done })
            .await
            .map_err(|_| stopped())?;
        written.await.map_err(|_| stopped())?.map_err(Error::from)
    }
}

async fn write_submissions(store: Arc<dyn Store>, mut rx: tokio::sync::mpsc::Receiver<Submission>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < SUBMIT_BATCH {
            match rx.try_recv() {
                Ok(more) => batch.push(more),
                Err(_) => break,
            }
        }
        let (runs, replies): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .map(|s| ((s.run, s.queued), s.done))
            .unzip();
        match store.enqueue_runs(&runs).await {
            Ok(()) => {
                for ((run, _), reply) in runs.into_iter().zip(replies) {
                    let _ = reply.send(Ok(run));
                }
            }
            // One bad run (a caller's X-Call-Id used twice) must not fail the others:
            // each goes again on its own and gets its own answer.
            Err(_) if runs.len() > 1 => {
                for (pair, reply) in runs.into_iter().zip(replies) {
                    let written = store.enqueue_runs(std::slice::from_ref(&pair)).await;
                    let _ = reply.send(written.map(|()| pair.0));
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

/// Accepts an async run of function `name`: 404 for a function that does not exist or is
/// not READY (never a 202 for a run that cannot run), 503 when the store cannot take it.
/// Returns the run as recorded (INITIALIZED).
pub async fn submit(
    app: &App,
    name: &str,
    mut request: RunRequest,
    run_name: String,
    callback: Option<callback::Callback>,
) -> Result<Run, Error> {
    let function = app.invoker.resolve(name)?;
    let now_us = unix_micros();
    request.blocking = false;
    let run = Run {
        name: run_name.clone(),
        function_name: function.spec.name.clone(),
        function_id: function.spec.id.clone(),
        blocking: false,
        status: Status::Initialized,
        input: request.input.clone(),
        tags: request.tags.clone(),
        secrets: function
            .spec
            .secrets
            .iter()
            .chain(&request.secrets)
            .cloned()
            .collect(),
        http_context: request.http_context.clone(),
        event: request.event.clone(),
        executed_time: unix_now(),
        call: Some(CallFacts {
            call_id: run_name.clone(),
            started_us: now_us,
            ..CallFacts::default()
        }),
        ..Run::default()
    };
    let job = serde_json::to_string(&Job { request, callback })
        .map_err(|e| Error::Internal(format!("encoding the run: {e}")))?;
    let queued = QueuedRun {
        name: run_name,
        function_name: function.spec.name.clone(),
        job,
        attempts: 0,
        not_before_us: now_us,
        submitted_us: now_us,
    };
    let run = app.submitter.accept(run, queued).await?;
    app.metrics.queue.submitted.inc();
    app.queue_wake.notify_one();
    Ok(run)
}

/// The workers of this gateway: take due runs while there are free slots, run each in a
/// task of its own. Runs until the process ends; a store that is down is retried.
pub async fn work(app: Arc<App>) {
    let config = app.config.queue.clone();
    let slots = Arc::new(Semaphore::new(config.workers));
    let poll = Duration::from_millis(config.poll_ms);
    // Until the server stops accepting (shutdown): runs taken and not finished by the
    // time the process exits are taken again, here or elsewhere, when their hold ends.
    while app.accepting.load(std::sync::atomic::Ordering::Acquire) {
        // At least one free slot before taking anything.
        let first = match slots.clone().acquire_owned().await {
            Ok(permit) => permit,
            Err(_) => return,
        };
        let free = slots.available_permits() + 1;
        let now = unix_micros();
        let hold_until = now + config.hold_seconds as i64 * 1_000_000;
        let taken = match app.store.take_queued(now, hold_until, free as u32).await {
            Ok(taken) => taken,
            Err(e) => {
                tracing::warn!(error = %e, "queue: cannot take runs; trying again");
                drop(first);
                tokio::time::sleep(poll.max(Duration::from_secs(1))).await;
                continue;
            }
        };
        if taken.is_empty() {
            drop(first);
            wait(&app.queue_wake, poll).await;
            continue;
        }
        let mut first = Some(first);
        for queued in taken {
            let permit = match first.take() {
                Some(permit) => permit,
                None => match slots.clone().acquire_owned().await {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
            };
            let app = app.clone();
            tokio::spawn(async move {
                let in_flight = &app.metrics.queue.in_flight;
                in_flight.inc();
                app.queue_running.insert(queued.name.clone());
                let name = queued.name.clone();
                run_queued(&app, queued).await;
                app.queue_running.remove(&name);
                in_flight.dec();
                drop(permit);
            });
        }
    }
}

/// At shutdown, after the drain: the runs still running here go back to the queue, due
/// now, so that another gateway (or this one's next start) takes them at once instead of
/// after their hold. They may have reached their function: delivery is at least once.
pub async fn release(app: &App) {
    let names: Vec<String> = app.queue_running.iter().map(|n| n.clone()).collect();
    for name in names {
        match app.store.requeue_run(&name, unix_micros()).await {
            Ok(()) => tracing::info!(run = %name, "queue: run given back at shutdown"),
            Err(e) => {
                tracing::warn!(run = %name, error = %e, "queue: run not given back; taken again after its hold")
            }
        }
    }
}

async fn wait(wake: &Notify, poll: Duration) {
    tokio::select! {
        () = wake.notified() => {}
        () = tokio::time::sleep(poll) => {}
    }
}

/// Sends a dead run again (`POST /v1/runs/{name}/retry`): its attempts start afresh, and
/// its record says INITIALIZED again. `None` when no dead run has that name.
pub async fn retry(app: &App, name: &str) -> Result<Option<Run>, Error> {
    if !app.store.revive_run(name, unix_micros()).await? {
        return Ok(None);
    }
    let mut run = app
        .store
        .get_run(name)
        .await?
        .ok_or_else(|| Error::NotFound(format!("run \"{name}\" not found")))?;
    run.status = Status::Initialized;
    run.reason = vec!["sent again from the dead letters".into()];
    run.error = None;
    run.output = serde_json::Value::Null;
    app.store.put_runs(std::slice::from_ref(&run)).await?;
    app.queue_wake.notify_one();
    Ok(Some(run))
}

/// One attempt of a queued run, and what follows it: recorded and done, or put back.
async fn run_queued(app: &App, queued: QueuedRun) {
    let config = &app.config.queue;
    let (request, callback) = match serde_json::from_str::<Job>(&queued.job) {
        Ok(job) => (job.request, job.callback),
        Err(e) => {
            // Not ours to run (written by something else): say so on the run, and let go.
            let mut run = base_run(&queued);
            finish_with(
                &mut run,
                RunError::system(format!("the queued run cannot be read: {e}")),
            );
            finish(app, &queued, run, None).await;
            return;
        }
    };
    let mut creating = base_run(&queued);
    creating.status = Status::Creating;
    creating.input = request.input.clone();
    creating.tags = request.tags.clone();
    creating.event = request.event.clone();
    creating.http_context = request.http_context.clone();
    if let Err(e) = app.store.put_runs(std::slice::from_ref(&creating)).await {
        tracing::warn!(run = %queued.name, error = %e, "queue: run not marked CREATING");
    }
    // The hold is renewed while the run goes on, so a run longer than `queue.hold_seconds`
    // is not taken again by a worker that thinks its holder died.
    let no_headers = HeaderMap::new();
    let outcome = {
        // The run it gives back carries the request's input, event and context.
        let run = app.invoker.execute(
            &queued.function_name,
            request,
            &no_headers,
            queued.name.clone(),
        );
        tokio::pin!(run);
        let hold = Duration::from_secs(config.hold_seconds);
        let mut renew = tokio::time::interval(hold / 3);
        renew.tick().await; // the first tick is now: the hold was just taken
        loop {
            tokio::select! {
                outcome = &mut run => break outcome,
                _ = renew.tick() => {
                    let until = unix_micros() + hold.as_micros() as i64;
                    if let Err(e) = app.store.hold_run(&queued.name, until).await {
                        tracing::warn!(run = %queued.name, error = %e, "queue: hold not renewed");
                    }
                }
            }
        }
    };
    let (mut run, retryable) = match outcome {
        Ok(run) => {
            let code = run.call.as_ref().map(|c| c.http_status).unwrap_or(0);
            let retryable = run
                .error
                .as_ref()
                .is_some_and(|e| e.kind == RunErrorType::SystemError)
                && matches!(code, 0 | 429 | 502 | 503 | 504);
            (run, retryable)
        }
        Err(e) => {
            // Never started: the function is gone or not READY (final), or at its limit
            // (worth trying again).
            let retryable = matches!(e, Error::TooManyRequests { .. });
            let mut run = creating;
            finish_with(&mut run, RunError::system(e.to_string()));
            (run, retryable)
        }
    };
    run.blocking = false;
    let age = Duration::from_micros((unix_micros() - queued.submitted_us).max(0) as u64);
    if retryable
        && queued.attempts < config.attempts
        && age < Duration::from_secs(config.max_age_seconds)
    {
        let delay = backoff(config, queued.attempts);
        let error = run
            .error
            .as_ref()
            .map(|e| e.message.clone())
            .unwrap_or_default();
        run.status = Status::Initialized;
        run.reason = vec![format!(
            "attempt {} of {} failed ({error}); next in {} ms",
            queued.attempts,
            config.attempts,
            delay.as_millis()
        )];
        tracing::info!(run = %queued.name, attempt = queued.attempts, delay_ms = delay.as_millis() as u64, "queue: run will be tried again");
        app.metrics.queue.retries.inc();
        if let Err(e) = app.store.put_runs(std::slice::from_ref(&run)).await {
            tracing::warn!(run = %queued.name, error = %e, "queue: retry not recorded");
        }
        let due = unix_micros() + delay.as_micros() as i64;
        if let Err(e) = app.store.requeue_run(&queued.name, due).await {
            // Still held: it is taken again when the hold ends.
            tracing::warn!(run = %queued.name, error = %e, "queue: run not put back; taken again after its hold");
        }
        return;
    }
    if retryable {
        let why = if queued.attempts >= config.attempts {
            format!("gave up after {} attempts", queued.attempts)
        } else {
            format!("gave up: older than {} s", config.max_age_seconds)
        };
        run.reason.push(why);
    }
    finish(app, &queued, run, callback).await;
}

/// Records a run's outcome and, in the same transaction, takes it out of the queue (READY)
/// or keeps it with the dead letters (ERROR); then calls its callback (off the worker: a
/// slow callback URL holds no worker).
async fn finish(app: &App, queued: &QueuedRun, mut run: Run, callback: Option<callback::Callback>) {
    // A run that ended ERROR goes to the dead letters, from where it can be sent again.
    let dead = run.status == Status::Error;
    if let Err(e) = app.store.finish_queued(&run, dead).await {
        // Left in the queue: taken again after its hold, and recorded then.
        tracing::warn!(run = %queued.name, error = %e, "queue: outcome not recorded; the run will be taken again");
        return;
    }
    let metrics = &app.metrics.queue;
    metrics
        .finished
        .with_label_values(&[run.status.as_str()])
        .inc();
    let since_submitted = (unix_micros() - queued.submitted_us).max(0) as f64 / 1e6;
    metrics.run_seconds.observe(since_submitted);
    if dead {
        metrics.dead_lettered.inc();
    }
    let Some(callback) = callback else {
        return;
    };
    let store = app.store.clone();
    let attempts = app.config.queue.callback_attempts;
    let failures = metrics.callback_failures.clone();
    tokio::spawn(async move {
        if let Err(why) = callback::deliver(&callback, &run, attempts).await {
            failures.inc();
            tracing::warn!(run = %run.name, error = %why, "queue: callback failed");
            run.reason.push(why);
            if let Err(e) = store.put_runs(std::slice::from_ref(&run)).await {
                tracing::warn!(run = %run.name, error = %e, "queue: callback failure not recorded");
            }
        }
    });
}

/// The run's fields known from the queue alone.
fn base_run(queued: &QueuedRun) -> Run {
    Run {
        name: queued.name.clone(),
        function_name: queued.function_name.clone(),
        blocking: false,
        executed_time: queued.submitted_us / 1_000_000,
        call: Some(CallFacts {
            call_id: queued.name.clone(),
            started_us: queued.submitted_us,
            ..CallFacts::default()
        }),
        ..Run::default()
    }
}

fn finish_with(run: &mut Run, error: RunError) {
    run.status = Status::Error;
    run.reason = vec![error.message.clone()];
    run.error = Some(error);
    run.finished_time = unix_now();
}

/// The wait before attempt `attempts + 1`: `backoff_ms` doubled per attempt made, capped,
/// with full jitter in its upper half so that runs failing together do not retry together.
fn backoff(config: &QueueConfig, attempts: u32) -> Duration {
    let base = config
        .backoff_ms
        .saturating_mul(1u64 << attempts.saturating_sub(1).min(20))
        .min(config.backoff_max_ms);
    Duration::from_millis(base / 2 + fastrand::u64(..=base / 2))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let config = Config::defaults().queue;
        for attempts in 1..12 {
            let d = backoff(&config, attempts).as_millis() as u64;
            let full = (config.backoff_ms << (attempts - 1)).min(config.backoff_max_ms);
            assert!(
                d >= full / 2 && d <= full,
                "attempt {attempts}: {d} ms, full {full}"
            );
        }
    }
}
