//! Async runs. A run submitted without `blocking` (or on `/async-function/{name}`) is
//! accepted only once it is durable, in one of two backends (`queue.backend`):
//! - `embedded` ([`embedded`]): its record (INITIALIZED) and its place in the queue are
//!   written to the store in one transaction before the 202;
//! - `rabbitmq` ([`rabbit`]): its record is written, then its message is published to a
//!   durable RabbitMQ queue and confirmed by the broker before the 202.
//!
//! Either way the workers mark a run CREATING, run it through the same invoker as blocking
//! runs (pool, limits, deadlines, schemas, secrets), and then either record the outcome, or
//! put it back for a retry after an exponential backoff with jitter (failures worth trying
//! again: see [`worth_retrying`]). A run that ends ERROR goes to the dead letters, from
//! where `POST /v1/runs/{name}/retry` sends it again. Delivery is at least once; the record
//! is one per run name, whatever the number of attempts.

pub mod batch;
pub mod broker;
pub mod callback;
pub mod embedded;
pub mod rabbit;

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::api::App;
use crate::config::{Config, QueueBackend, QueueConfig};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::model::{
    CallFacts, Run, RunError, RunErrorType, RunRequest, Status, unix_micros, unix_now,
};
use crate::store::{QueuedRun, Store};

/// The configured backend.
pub enum Queue {
    Embedded(embedded::Embedded),
    Rabbit(Arc<rabbit::Rabbit>),
}

impl Queue {
    /// Starts the backend `queue.backend` names. RabbitMQ: connects (waiting a moment for
    /// the first connection, so a gateway that starts beside its broker accepts at once),
    /// and keeps reconnecting whenever the connection is lost.
    pub async fn start(config: &Config, store: Arc<dyn Store>, metrics: Arc<Metrics>) -> Queue {
        match config.queue.backend {
            QueueBackend::Embedded => Queue::Embedded(embedded::Embedded::start(store)),
            QueueBackend::Rabbitmq => {
                Queue::Rabbit(rabbit::Rabbit::start(&config.queue, store, metrics).await)
            }
        }
    }
}

/// What a queued run carries: the run request, as the client sent it, and where its
/// answer goes when it ends.
#[derive(Serialize, Deserialize)]
struct Job {
    request: RunRequest,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    callback: Option<callback::Callback>,
}

/// Accepts an async run of function `name`: 404 for a function that does not exist or is
/// not READY (never a 202 for a run that cannot run), 503 when the store or the broker
/// cannot take it.
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
    let run = match &app.queue {
        Queue::Embedded(embedded) => embedded.accept(app, run, job).await?,
        Queue::Rabbit(rabbit) => rabbit.accept(run, job).await?,
    };
    app.metrics.queue.submitted.inc();
    Ok(run)
}

/// The workers of this gateway, until it stops accepting (shutdown).
pub async fn work(app: Arc<App>) {
    match &app.queue {
        Queue::Embedded(_) => embedded::work(app).await,
        Queue::Rabbit(rabbit) => rabbit.clone().work(app).await,
    }
}

/// At shutdown, after the drain: the runs still running here go back to the queue at once
/// (embedded: due now; RabbitMQ: the connection is closed, so the broker delivers their
/// messages again), for another gateway or this one's next start. They may have reached
/// their function: delivery is at least once.
pub async fn release(app: &App) {
    match &app.queue {
        Queue::Embedded(_) => embedded::release(app).await,
        Queue::Rabbit(rabbit) => rabbit.release().await,
    }
}

/// Sends a dead run again (`POST /v1/runs/{name}/retry`): its attempts start afresh, and
/// its record says INITIALIZED again. `None` when no dead run has that name.
pub async fn retry(app: &App, name: &str) -> Result<Option<Run>, Error> {
    match &app.queue {
        Queue::Embedded(_) => embedded::retry(app, name).await,
        Queue::Rabbit(rabbit) => rabbit.retry(name).await,
    }
}

/// Whether a failed attempt is worth another: the function could not be reached (no
/// answer at all), it answered 429, 502, 503 or 504, or it marked its error retryable
/// (`"retryable": true` in its envelope's error, or an `X-Dispatch-Retryable: true`
/// header). Other failures (a function error, a 4xx, bad input) are final.
pub fn worth_retrying(run: &Run) -> bool {
    let Some(error) = &run.error else {
        return false;
    };
    let code = run.call.as_ref().map(|c| c.http_status).unwrap_or(0);
    error.retryable
        || matches!(code, 429 | 502 | 503 | 504)
        || (code == 0 && error.kind == RunErrorType::SystemError)
}

/// What follows attempt `attempt` (counted from 1) of a run submitted at `submitted_us`:
/// the run to record, and the wait before the next attempt, if there is one (the run then
/// says INITIALIZED and why). `creating` is the run as it was marked CREATING, for an
/// attempt that never started.
fn after_attempt(
    config: &QueueConfig,
    outcome: Result<Run, Error>,
    creating: Run,
    attempt: u32,
    submitted_us: i64,
) -> (Run, Option<Duration>) {
    let (mut run, retryable) = match outcome {
        Ok(run) => {
            let retryable = worth_retrying(&run);
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
    if !retryable {
        return (run, None);
    }
    let age = Duration::from_micros((unix_micros() - submitted_us).max(0) as u64);
    if attempt >= config.attempts {
        run.reason.push(format!("gave up after {attempt} attempts"));
        return (run, None);
    }
    if age >= Duration::from_secs(config.max_age_seconds) {
        run.reason
            .push(format!("gave up: older than {} s", config.max_age_seconds));
        return (run, None);
    }
    let delay = backoff(config, attempt);
    let error = run
        .error
        .as_ref()
        .map(|e| e.message.clone())
        .unwrap_or_default();
    run.status = Status::Initialized;
    run.reason = vec![format!(
        "attempt {attempt} of {} failed ({error}); next in {} ms",
        config.attempts,
        delay.as_millis()
    )];
    tracing::info!(run = %run.name, attempt, delay_ms = delay.as_millis() as u64, "queue: run will be tried again");
    (run, Some(delay))
}

/// A run's end, once recorded: counted, timed from its submission, and its answer sent to
/// its callback (off the worker: a slow callback URL holds no worker; a callback that
/// fails for good is noted on the run).
fn ended(
    app: &App,
    mut run: Run,
    submitted_us: i64,
    dead: bool,
    callback: Option<callback::Callback>,
) {
    let metrics = &app.metrics.queue;
    metrics
        .finished
        .with_label_values(&[run.status.as_str()])
        .inc();
    let since_submitted = (unix_micros() - submitted_us).max(0) as f64 / 1e6;
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

/// What a queued run asks for, and the run as its attempt starts (CREATING); or, when its
/// job cannot be read (written by something else), the run ended ERROR saying so.
fn start_job(
    queued: &QueuedRun,
) -> Result<(RunRequest, Option<callback::Callback>, Run), Box<Run>> {
    let job = serde_json::from_str::<Job>(&queued.job).map_err(|e| {
        let mut run = base_run(queued);
        finish_with(
            &mut run,
            RunError::system(format!("the queued run cannot be read: {e}")),
        );
        Box::new(run)
    })?;
    let request = job.request;
    let mut creating = base_run(queued);
    creating.status = Status::Creating;
    creating.input = request.input.clone();
    creating.tags = request.tags.clone();
    creating.event = request.event.clone();
    creating.http_context = request.http_context.clone();
    Ok((request, job.callback, creating))
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
    let base = backoff_ceiling_ms(config, attempts);
    Duration::from_millis(base / 2 + fastrand::u64(..=base / 2))
}

/// The longest wait before attempt `attempts + 1`, in milliseconds: `backoff_ms` doubled
/// per attempt made, up to `backoff_max_ms`.
fn backoff_ceiling_ms(config: &QueueConfig, attempts: u32) -> u64 {
    config
        .backoff_ms
        .saturating_mul(1u64 << attempts.saturating_sub(1).min(20))
        .min(config.backoff_max_ms)
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
