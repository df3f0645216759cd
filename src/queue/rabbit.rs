//! The `rabbitmq` backend: async runs wait in durable RabbitMQ queues.
//!
//! Layout (`P` = `queue.name_prefix`; every queue durable, every message persistent):
//! - `P.runs`, the work queue every gateway consumes (prefetch = `queue.workers`);
//! - `P.delay.<ms>ms`, one delay queue per backoff step: a run to try again is published
//!   there with its jittered wait as its expiration (at most the step's `<ms>`, also the
//!   queue's TTL), and the broker dead-letters it back to `P.runs` when it expires, so no
//!   worker waits meanwhile;
//! - `P.dead`, the dead letters: runs that ended ERROR. The store keeps which runs are
//!   dead (`GET /v1/runs?dead=true`) and their request, from which `POST
//!   /v1/runs/{name}/retry` publishes the run again; the broker keeps the message, for
//!   operators.
//!
//! A message is the run's name as its message id, its submission time (seconds) as its
//! timestamp, and a body of one line `dispatch/1 <attempts made> <submitted, unix us>
//! <function>` followed by the run's job (request and callback, JSON). Nothing else goes
//! into the properties: RabbitMQ keeps a message's encoded properties of up to 64 bytes
//! inside its queue process and larger ones as shared off-heap binaries, and past 64 bytes
//! the same bare publish loop was confirmed 10-17% less often (docs/performance.md). Messages
//! of earlier versions (the three as `x-dispatch-*` headers, the body the job alone) are
//! still read.
//!
//! Records are exactly once by run name: a submit writes the record (INITIALIZED, unless
//! a worker recorded more already) while it publishes, and answers 202 only on the
//! broker's confirm and the write (a submit that fails marks the record ERROR, so a message
//! that reached the broker after all is never run). A worker
//! writes the outcome before it acks; a message delivered again for a run whose record is
//! final (READY or ERROR) is acked without running it again.

use std::sync::Arc;

use http::HeaderMap;
use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::AMQPValue;
use tokio::sync::{Mutex, mpsc};

use super::batch::{FirstRecords, GroupCommit, Records};
use super::broker::{Broker, Outgoing, Topology};
use super::{after_attempt, backoff_ceiling_ms, ended, finish_with};
use crate::api::App;
use crate::config::QueueConfig;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::model::{Run, RunError, Status, unix_micros};
use crate::store::{QueuedRun, Store};

/// The body's first word, naming its layout.
const BODY_LAYOUT: &str = "dispatch/1";
/// The headers of messages published before the body's first line carried them.
const FUNCTION: &str = "x-dispatch-function";
const ATTEMPTS: &str = "x-dispatch-attempts";
const SUBMITTED: &str = "x-dispatch-submitted-us";

pub struct Rabbit {
    broker: Arc<Broker>,
    /// Run records, written in batches: CREATING, outcomes.
    records: GroupCommit<Records>,
    /// First records (INITIALIZED), written in batches, never over a later one.
    first_records: GroupCommit<FirstRecords>,
    /// The work queue's deliveries, taken once by [`Rabbit::work`].
    deliveries: Mutex<Option<mpsc::UnboundedReceiver<Delivery>>>,
    topology: Topology,
    prefix: String,
    store: Arc<dyn Store>,
}

impl Rabbit {
    pub async fn start(
        config: &QueueConfig,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
    ) -> Arc<Rabbit> {
        let prefix = config.name_prefix.clone();
        let mut delays: Vec<(String, u64)> = (1..config.attempts)
            .map(|attempt| {
                let ms = backoff_ceiling_ms(config, attempt).max(1);
                (Topology::delay_queue(&prefix, ms), ms)
            })
            .collect();
        delays.dedup();
        let topology = Topology {
            work: format!("{prefix}.runs"),
            dead: format!("{prefix}.dead"),
            delays,
        };
        let uri = config.amqp_uri().expect("queue.url is checked at start-up");
        let (broker, deliveries) = Broker::start(
            &config.url,
            uri,
            topology.clone(),
            config.workers as u16,
            config.confirm_window,
            std::time::Duration::from_millis(config.confirm_timeout_ms),
            metrics.queue.broker.clone(),
        )
        .await;
        Arc::new(Rabbit {
            broker,
            records: GroupCommit::start(Records(store.clone())),
            first_records: GroupCommit::start(FirstRecords(store.clone())),
            deliveries: Mutex::new(Some(deliveries)),
            topology,
            prefix,
            store,
        })
    }

    /// Accepts a run: its record (visible at once) and its message, confirmed, written
    /// and published at the same time. The record is written only where the run has none
    /// yet: a worker may have taken the message and recorded more already.
    pub async fn accept(&self, run: Run, job: String) -> Result<Run, Error> {
        if !self.broker.connected() {
            return Err(Broker::unavailable("not connected"));
        }
        let submitted_us = run.call.as_ref().map(|c| c.started_us).unwrap_or_default();
        let message = message(
            &self.topology.work,
            &run.name,
            &run.function_name,
            0,
            submitted_us,
            job.into_bytes(),
        );
        let refusal = Run {
            name: run.name.clone(),
            function_name: run.function_name.clone(),
            function_id: run.function_id.clone(),
            executed_time: run.executed_time,
            call: run.call.clone(),
            ..Run::default()
        };
        let (written, published) =
            tokio::join!(self.first_records.write(run), self.broker.publish(message));
        match (written, published) {
            (Ok(run), Ok(())) => Ok(run),
            (Ok(_), Err(e)) | (Err(e), _) => {
                self.refused(refusal, &e).await;
                Err(e)
            }
        }
    }

    /// A run not accepted (the broker did not confirm it, or its record was not written):
    /// its record says so, and being final, keeps a message that got through after all
    /// from running, unless a worker took it already (its confirm was lost after the
    /// broker delivered it): that run ends as it ends, recorded once.
    async fn refused(&self, mut run: Run, why: &Error) {
        finish_with(&mut run, RunError::system(format!("not accepted: {why}")));
        if let Err(e) = self.records.write(run).await {
            tracing::warn!(error = %e, "queue: a refused run's record was not updated");
        }
    }

    /// Sends a dead run again: out of the store's dead letters, INITIALIZED, published to
    /// the work queue with its attempts afresh. Put back with the dead letters if the
    /// broker does not confirm it.
    pub async fn retry(&self, name: &str) -> Result<Option<Run>, Error> {
        if !self.broker.connected() {
            return Err(Broker::unavailable("not connected"));
        }
        let Some(queued) = self.store.unbury_run(name).await? else {
            return Ok(None);
        };
        let Some(dead) = self.store.get_run(name).await? else {
            return Err(Error::NotFound(format!("run \"{name}\" not found")));
        };
        let mut run = dead.clone();
        run.status = Status::Initialized;
        run.reason = vec!["sent again from the dead letters".into()];
        run.error = None;
        run.output = serde_json::Value::Null;
        let message = message(
            &self.topology.work,
            name,
            &queued.function_name,
            0,
            unix_micros(),
            queued.job.clone().into_bytes(),
        );
        let run = self.records.write(run).await?;
        if let Err(e) = self.broker.publish(message).await {
            if let Err(e) = self.store.bury_run(&dead, &queued).await {
                tracing::warn!(run = %name, error = %e, "queue: a run not sent again is not with the dead letters either");
            }
            return Err(e);
        }
        Ok(Some(run))
    }

    /// The workers: each delivery runs in a task of its own; the prefetch bounds how many
    /// at once. When the gateway stops accepting, the consumer is cancelled (the broker
    /// sends no more) and what was delivered and not yet started is handed back at once
    /// (nack, requeue) for another consumer; the runs already running go on (the drain).
    pub async fn work(self: Arc<Self>, app: Arc<App>) {
        let Some(mut deliveries) = self.deliveries.lock().await.take() else {
            return;
        };
        let accepting = || app.accepting.load(std::sync::atomic::Ordering::Acquire);
        while accepting() {
            let delivery = tokio::select! {
                delivery = deliveries.recv() => match delivery {
                    Some(delivery) => delivery,
                    None => return,
                },
                // Woken at shutdown, so the cancel need not wait for a delivery.
                () = app.queue_wake.notified() => continue,
            };
            if !accepting() {
                hand_back(&delivery).await;
                break;
            }
            // From a channel lost since: the broker delivers it again on the new one.
            if !delivery.acker.usable() {
                continue;
            }
            let (app, rabbit) = (app.clone(), self.clone());
            tokio::spawn(async move {
                let in_flight = &app.metrics.queue.in_flight;
                in_flight.inc();
                rabbit.run_delivery(&app, delivery).await;
                in_flight.dec();
            });
        }
        self.broker.stop_consuming();
        // Sent before the broker saw the cancel: not started here, so given back now.
        while let Some(delivery) = deliveries.recv().await {
            hand_back(&delivery).await;
        }
    }

    /// At shutdown: the connection is closed, and the broker delivers the runs not
    /// finished here again.
    pub async fn release(&self) {
        self.broker.close();
    }

    /// One delivery: checked against the run's record, run, and acked once its outcome is
    /// recorded (or its next attempt, or its dead letter, is confirmed by the broker).
    async fn run_delivery(&self, app: &App, delivery: Delivery) {
        let Some(queued) = queued_run(&delivery) else {
            tracing::warn!(
                message = ?delivery.properties.message_id(),
                "queue: a message that is not a run (no run name or function); dropped"
            );
            nack(&delivery, false).await;
            return;
        };
        // Delivered again while the attempt that took it first still runs here (its channel
        // was lost meanwhile): that attempt's end decides.
        while app.queue_running.contains(&queued.name) {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        match self.store.get_run(&queued.name).await {
            Ok(Some(run)) if matches!(run.status, Status::Ready | Status::Error) => {
                app.metrics.queue.broker.duplicates.inc();
                ack(&delivery).await;
                return;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(run = %queued.name, error = %e, "queue: the run's record cannot be read; delivered again later");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                nack(&delivery, true).await;
                return;
            }
        }
        app.queue_running.insert(queued.name.clone());
        self.attempt(app, &delivery, queued.clone()).await;
        app.queue_running.remove(&queued.name);
    }

    async fn attempt(&self, app: &App, delivery: &Delivery, queued: QueuedRun) {
        let config = &app.config.queue;
        let (request, callback, creating) = match super::start_job(&queued) {
            Ok(started) => started,
            Err(unreadable) => {
                self.finish(app, delivery, &queued, *unreadable, None).await;
                return;
            }
        };
        if let Err(e) = self.records.write(creating.clone()).await {
            tracing::warn!(run = %queued.name, error = %e, "queue: run not marked CREATING");
        }
        let outcome = app
            .invoker
            .execute(
                &queued.function_name,
                request,
                &HeaderMap::new(),
                queued.name.clone(),
            )
            .await;
        let (run, delay) = after_attempt(
            config,
            outcome,
            creating,
            queued.attempts,
            queued.submitted_us,
        );
        let Some(delay) = delay else {
            self.finish(app, delivery, &queued, run, callback).await;
            return;
        };
        app.metrics.queue.retries.inc();
        if let Err(e) = self.records.write(run).await {
            tracing::warn!(run = %queued.name, error = %e, "queue: retry not recorded");
        }
        let ceiling = backoff_ceiling_ms(config, queued.attempts).max(1);
        let mut again = message(
            &Topology::delay_queue(&self.prefix, ceiling),
            &queued.name,
            &queued.function_name,
            queued.attempts,
            queued.submitted_us,
            queued.job.into_bytes(),
        );
        let expiration = (delay.as_millis() as u64).clamp(1, ceiling);
        again.properties = again
            .properties
            .with_expiration(expiration.to_string().into());
        match self.broker.publish(again).await {
            Ok(()) => ack(delivery).await,
            Err(e) => {
                // Delivered again now rather than after the backoff: better than lost.
                tracing::warn!(run = %queued.name, error = %e, "queue: retry not published; the run goes back to the work queue");
                nack(delivery, true).await;
            }
        }
    }

    /// A run's end: READY recorded, or ERROR with the dead letters (its message in the
    /// dead queue, confirmed, and the store's dead entry); then acked.
    async fn finish(
        &self,
        app: &App,
        delivery: &Delivery,
        queued: &QueuedRun,
        run: Run,
        callback: Option<super::callback::Callback>,
    ) {
        let dead = run.status == Status::Error;
        let recorded = if dead {
            let message = message(
                &self.topology.dead,
                &queued.name,
                &queued.function_name,
                queued.attempts,
                queued.submitted_us,
                queued.job.clone().into_bytes(),
            );
            match self.broker.publish(message).await {
                Ok(()) => self.store.bury_run(&run, queued).await.map_err(Error::from),
                Err(e) => Err(e),
            }
        } else {
            self.records.write(run.clone()).await.map(|_| ())
        };
        if let Err(e) = recorded {
            tracing::warn!(run = %queued.name, error = %e, "queue: outcome not recorded; the run will be delivered again");
            nack(delivery, true).await;
            return;
        }
        ack(delivery).await;
        ended(app, run, queued.submitted_us, dead, callback);
    }
}

/// A persistent message for `queue`.
fn message(
    queue: &str,
    name: &str,
    function: &str,
    attempts: u32,
    submitted_us: i64,
    body: Vec<u8>,
) -> Outgoing {
    use std::io::Write as _;
    // The first line is at most 24 bytes beside the function's name.
    let mut framed = Vec::with_capacity(body.len() + function.len() + 48);
    let _ = writeln!(framed, "{BODY_LAYOUT} {attempts} {submitted_us} {function}");
    framed.extend_from_slice(&body);
    Outgoing {
        queue: queue.to_string(),
        body: framed,
        properties: BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(name.into())
            .with_timestamp((submitted_us / 1_000_000).max(0) as u64),
    }
}

/// A delivery as a queued run: `attempts` counts this one.
fn queued_run(delivery: &Delivery) -> Option<QueuedRun> {
    parse_message(&delivery.properties, &delivery.data)
}

fn parse_message(props: &BasicProperties, data: &[u8]) -> Option<QueuedRun> {
    let name = props.message_id().as_ref()?.as_str();
    let has_headers = props
        .headers()
        .as_ref()
        .is_some_and(|h| h.inner().contains_key(FUNCTION));
    if has_headers {
        return parse_message_with_headers(name, props, data);
    }
    let end = data.iter().position(|&b| b == b'\n')?;
    let first = std::str::from_utf8(&data[..end]).ok()?;
    let mut words = first.splitn(4, ' ');
    if words.next()? != BODY_LAYOUT {
        return None;
    }
    let attempts: u32 = words.next()?.parse().ok()?;
    let submitted_us: i64 = words.next()?.parse().ok()?;
    let function = words.next()?.to_string();
    Some(QueuedRun {
        name: name.to_string(),
        function_name: function,
        job: String::from_utf8_lossy(&data[end + 1..]).into_owned(),
        attempts: attempts + 1,
        not_before_us: 0,
        submitted_us,
    })
}

/// A message published before the body's first line: its function, attempts and
/// submission time are headers, its body the job alone.
fn parse_message_with_headers(
    name: &str,
    props: &BasicProperties,
    data: &[u8],
) -> Option<QueuedRun> {
    let name = name.to_string();
    let headers = props.headers().as_ref()?.inner();
    let function = match headers.get(FUNCTION)? {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        _ => return None,
    };
    let int = |key: &str| match headers.get(key) {
        Some(AMQPValue::LongLongInt(n)) => Some(*n),
        _ => None,
    };
    let attempts = int(ATTEMPTS).unwrap_or(0).max(0) as u32;
    Some(QueuedRun {
        name,
        function_name: function,
        job: String::from_utf8_lossy(data).into_owned(),
        attempts: attempts + 1,
        not_before_us: 0,
        submitted_us: int(SUBMITTED).unwrap_or_else(unix_micros),
    })
}

async fn ack(delivery: &Delivery) {
    if let Err(e) = delivery.acker.ack(BasicAckOptions::default()).await {
        // The channel is gone: the broker delivers it again, and its final record stops it.
        tracing::warn!(error = %e, "queue: ack failed; the message will be delivered again");
    }
}

/// A delivery this stopping gateway will not start: back to the queue, for the others.
async fn hand_back(delivery: &Delivery) {
    if delivery.acker.usable() {
        nack(delivery, true).await;
        tracing::info!(
            message = ?delivery.properties.message_id(),
            "queue: run handed back at shutdown, not started here"
        );
    }
}

async fn nack(delivery: &Delivery, requeue: bool) {
    let options = BasicNackOptions {
        requeue,
        ..BasicNackOptions::default()
    };
    if let Err(e) = delivery.acker.nack(options).await {
        tracing::warn!(error = %e, "queue: nack failed; the message will be delivered again");
    }
}

#[cfg(test)]
mod tests {
    use lapin::types::FieldTable;

    use super::*;

    #[test]
    fn a_message_reads_back_as_the_run_it_was_made_of_and_its_properties_stay_small() {
        let job = br#"{"request":{"n":1}}"#.to_vec();
        let out = message(
            "p.runs",
            "01a24ff0-73de-7d66-930e-d38545823af2",
            "hello-py",
            2,
            1_796_637_488_094_111,
            job.clone(),
        );
        let run = parse_message(&out.properties, &out.body).expect("a queued run");
        assert_eq!(run.name, "01a24ff0-73de-7d66-930e-d38545823af2");
        assert_eq!(run.function_name, "hello-py");
        assert_eq!(run.attempts, 3, "the delivery counts as an attempt");
        assert_eq!(run.submitted_us, 1_796_637_488_094_111);
        assert_eq!(run.job.as_bytes(), &job[..]);
        // Nothing but these three, which encode as flags (2), delivery mode (1), message
        // id (1 + 36) and timestamp (8): within the 64 bytes past which the broker's cost
        // steps up (see the module doc).
        let expected = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id("01a24ff0-73de-7d66-930e-d38545823af2".into())
            .with_timestamp(1_796_637_488);
        assert_eq!(out.properties, expected);
        let encoded = 2 + 1 + (1 + run.name.len()) + 8;
        assert!(encoded <= 64, "{encoded} bytes of properties");
    }

    #[test]
    fn a_message_of_the_earlier_layout_with_headers_is_still_read() {
        let mut headers = FieldTable::default();
        headers.insert(FUNCTION.into(), AMQPValue::LongString("fast".into()));
        headers.insert(ATTEMPTS.into(), AMQPValue::LongLongInt(1));
        headers.insert(SUBMITTED.into(), AMQPValue::LongLongInt(42));
        let props = BasicProperties::default()
            .with_message_id("run-1".into())
            .with_headers(headers);
        let run = parse_message(&props, br#"{"request":{}}"#).expect("a queued run");
        assert_eq!(
            (
                run.name.as_str(),
                run.function_name.as_str(),
                run.attempts,
                run.submitted_us
            ),
            ("run-1", "fast", 2, 42)
        );
        assert_eq!(run.job, r#"{"request":{}}"#);
    }

    #[test]
    fn a_body_without_the_first_line_is_not_a_run() {
        let props = BasicProperties::default().with_message_id("run-1".into());
        assert!(parse_message(&props, br#"{"request":{}}"#).is_none());
        assert!(parse_message(&props, b"dispatch/2 0 1 fast\n{}").is_none());
        assert!(parse_message(&props, b"dispatch/1 x 1 fast\n{}").is_none());
        let unnamed = BasicProperties::default();
        assert!(parse_message(&unnamed, b"dispatch/1 0 1 fast\n{}").is_none());
    }
}
