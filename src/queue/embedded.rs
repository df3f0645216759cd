//! The `embedded` backend: the store is the queue. A run is accepted once its record
//! (INITIALIZED) and its queue entry are written in one transaction (group commit, see
//! [`super::batch`]). Workers take due runs from the queue, holding each for
//! `queue.hold_seconds` (so that a gateway that dies lets go of its runs), run them through
//! the invoker, and then either record the outcome and take the run out of the queue, or
//! put it back for a retry after a backoff.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use tokio::sync::{Notify, Semaphore};

use super::batch::{Enqueue, GroupCommit};
use crate::api::App;
use crate::error::Error;
use crate::model::{Run, Status, unix_micros};
use crate::store::{QueuedRun, Store};

/// The embedded backend's writer of accepted runs.
pub struct Embedded {
    submits: GroupCommit<Enqueue>,
}

impl Embedded {
    pub fn start(store: Arc<dyn Store>) -> Embedded {
        Embedded {
            submits: GroupCommit::start(Enqueue(store)),
        }
    }

    /// Returns the run once it and its queue entry are in the store.
    pub async fn accept(&self, app: &App, run: Run, job: String) -> Result<Run, Error> {
        let queued = QueuedRun {
            name: run.name.clone(),
            function_name: run.function_name.clone(),
            job,
            attempts: 0,
            not_before_us: run.call.as_ref().map(|c| c.started_us).unwrap_or_default(),
            submitted_us: run.call.as_ref().map(|c| c.started_us).unwrap_or_default(),
        };
        let (run, _) = self.submits.write((run, queued)).await?;
        app.queue_wake.notify_one();
        Ok(run)
    }
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
    let (request, callback, creating) = match super::start_job(&queued) {
        Ok(started) => started,
        Err(unreadable) => {
            finish(app, &queued, *unreadable, None).await;
            return;
        }
    };
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
    let (run, delay) = super::after_attempt(
        config,
        outcome,
        creating,
        queued.attempts,
        queued.submitted_us,
    );
    if let Some(delay) = delay {
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
    finish(app, &queued, run, callback).await;
}

/// Records a run's outcome and, in the same transaction, takes it out of the queue (READY)
/// or keeps it with the dead letters (ERROR); then calls its callback (off the worker: a
/// slow callback URL holds no worker).
async fn finish(
    app: &App,
    queued: &QueuedRun,
    run: Run,
    callback: Option<super::callback::Callback>,
) {
    // A run that ended ERROR goes to the dead letters, from where it can be sent again.
    let dead = run.status == Status::Error;
    if let Err(e) = app.store.finish_queued(&run, dead).await {
        // Left in the queue: taken again after its hold, and recorded then.
        tracing::warn!(run = %queued.name, error = %e, "queue: outcome not recorded; the run will be taken again");
        return;
    }
    super::ended(app, run, queued.submitted_us, dead, callback);
}
