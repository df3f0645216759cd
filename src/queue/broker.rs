//! The RabbitMQ connection of the `rabbitmq` queue backend, and the loop that keeps it.
//!
//! One task owns the connection ([`Broker::start`]). Each time it connects it declares the
//! topology (every queue durable), opens a publishing channel in confirm mode and a
//! consuming channel whose prefetch is the workers' in-flight bound, and then serves both
//! until the connection is lost; then it waits (exponential backoff with jitter) and does
//! it all again. lapin's own recovery is not used: this loop is the one place that knows
//! whether the gateway is connected, and while it is not, publishes fail at once (a 503
//! with `Retry-After` for a submit) instead of waiting on a connection that may not come.
//!
//! Publishing is pipelined: callers hand messages to the owning task through a channel;
//! the task publishes what has queued up, in order, and keeps each publish (its write,
//! then its confirm) in a set it polls beside everything else, queue depths included, so
//! the loop never waits on one thing; it answers each caller when its own confirm
//! arrives. At most `queue.confirm_window` publishes await their confirm at once; more
//! wait in the channel. A publish whose confirm never comes (the connection dropped) is
//! answered with an error, never with a success. Every publish is `mandatory`: a message
//! no queue takes comes back and its caller gets an error, not a 202 for nothing.
//!
//! Nothing here waits on the broker without a bound (`queue.confirm_timeout_ms`): a
//! connection attempt (handshake, declarations, channels) that takes longer is given up,
//! and so is a connection on which publishes wait and no confirm has come for that long
//! (a broker blocked by a resource alarm, or a network that drops packets without a
//! reset, closes nothing): the waiting callers get their error and the loop connects
//! again. The connection asks for a heartbeat (`queue.heartbeat_seconds`, unless the URL
//! has its own): a silent connection is given up by lapin here and by the broker there,
//! which then hands the runs delivered to it and not acknowledged to other consumers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use lapin::message::Delivery;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::error::Error;
use crate::metrics::BrokerMetrics;

/// The queues of one deployment (`queue.name_prefix`), declared on every connect.
#[derive(Debug, Clone)]
pub struct Topology {
    /// Where submitted runs wait for a worker: `<prefix>.runs`.
    pub work: String,
    /// Where runs that ended ERROR are kept: `<prefix>.dead`.
    pub dead: String,
    /// The delay queues, `<prefix>.delay.<ms>ms`, with their longest wait: a message
    /// waits there until it expires, then goes back to the work queue.
    pub delays: Vec<(String, u64)>,
}

impl Topology {
    /// The delay queue for a wait of at most `ceiling_ms`.
    pub fn delay_queue(prefix: &str, ceiling_ms: u64) -> String {
        format!("{prefix}.delay.{ceiling_ms}ms")
    }
}

/// A message to publish to a queue (through the default exchange).
pub struct Outgoing {
    pub queue: String,
    pub body: Vec<u8>,
    pub properties: BasicProperties,
}

struct Publish {
    out: Outgoing,
    done: oneshot::Sender<Result<(), String>>,
}

/// How long a caller is told to wait before submitting again while the broker is away.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// The wait between connection attempts: doubled from the first to the last, with jitter.
const RECONNECT_FIRST: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// How long closing a connection that is being given up may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the depth of the queues is asked for.
const DEPTH_EVERY: Duration = Duration::from_secs(5);

/// The connection's owner, as the rest of the gateway sees it.
pub struct Broker {
    tx: mpsc::Sender<Publish>,
    connected: AtomicBool,
    /// Set by [`Broker::close`]: the loop closes the connection and ends.
    stop: Notify,
    stopping: AtomicBool,
    /// Cleared by [`Broker::stop_consuming`] (the gateway stops taking runs): the loop
    /// cancels the consumer, and a connection made later opens none.
    consuming: AtomicBool,
    stop_consuming: Notify,
    metrics: BrokerMetrics,
}

/// What one connection holds.
struct Session {
    conn: Connection,
    publish: Channel,
    /// None on a replica with `queue.workers = 0`: it accepts runs and runs none (and
    /// once the gateway stops taking runs). With the channel it was opened on, to cancel it.
    consumer: Option<(Consumer, Channel)>,
    /// For passive declares (queue depth), apart from the publishing channel.
    inspect: Channel,
}

impl Broker {
    /// Starts the connection loop and waits for its first attempt (so that a gateway
    /// started beside a running broker accepts at once; one started without waits for
    /// nothing and answers 503 until connected). Deliveries of the work queue go to the
    /// returned receiver.
    pub async fn start(
        url: &str,
        uri: AMQPUri,
        topology: Topology,
        prefetch: u16,
        window: usize,
        timeout: Duration,
        metrics: BrokerMetrics,
    ) -> (Arc<Broker>, mpsc::UnboundedReceiver<Delivery>) {
        let (tx, rx) = mpsc::channel(window.max(64));
        let (deliveries, received) = mpsc::unbounded_channel();
        let broker = Arc::new(Broker {
            tx,
            connected: AtomicBool::new(false),
            stop: Notify::new(),
            stopping: AtomicBool::new(false),
            consuming: AtomicBool::new(true),
            stop_consuming: Notify::new(),
            metrics,
        });
        let (first, tried) = oneshot::channel();
        let keeper = Keeper {
            broker: broker.clone(),
            url: url.to_string(),
            uri,
            topology,
            prefetch,
            window,
            timeout,
        };
        tokio::spawn(keeper.run(rx, deliveries, first));
        let _ = tokio::time::timeout(timeout, tried).await;
        (broker, received)
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// The error a caller gets while the broker is out of reach.
    pub fn unavailable(why: impl std::fmt::Display) -> Error {
        Error::QueueUnavailable {
            message: format!(
                "RabbitMQ is not available ({why}); the run was not accepted, try again"
            ),
            retry_after: RETRY_AFTER,
        }
    }

    /// Publishes `out` and returns once the broker confirmed it (persisted, routed to its
    /// queue); an error when it is not connected, refused it, or the connection dropped
    /// before its confirm.
    pub async fn publish(&self, out: Outgoing) -> Result<(), Error> {
        if !self.connected() {
            return Err(Self::unavailable("not connected"));
        }
        let (done, confirmed) = oneshot::channel();
        self.tx
            .send(Publish { out, done })
            .await
            .map_err(|_| Self::unavailable("the connection task has stopped"))?;
        match confirmed.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(why)) => Err(Self::unavailable(why)),
            Err(_) => Err(Self::unavailable(
                "the connection was lost before the broker confirmed",
            )),
        }
    }

    /// Stops taking deliveries (shutdown begins): the consumer is cancelled, so the broker
    /// sends this gateway no more runs; the ones it sent before the cancel still reach the
    /// deliveries' receiver, to be handed back. Publishing goes on.
    pub fn stop_consuming(&self) {
        self.consuming.store(false, Ordering::Release);
        self.stop_consuming.notify_one();
    }

    /// Closes the connection for good (shutdown): the broker delivers the messages of
    /// runs not finished here again, to whoever consumes.
    pub fn close(&self) {
        self.stopping.store(true, Ordering::Release);
        self.stop.notify_one();
    }
}

/// The task that owns the connection.
struct Keeper {
    broker: Arc<Broker>,
    /// `queue.url`, for the logs (without its password), and as lapin takes it.
    url: String,
    uri: AMQPUri,
    topology: Topology,
    prefetch: u16,
    window: usize,
    /// `queue.confirm_timeout_ms`: the longest a connection attempt, or a connection on
    /// which publishes wait without a confirm, may go unanswered.
    timeout: Duration,
}

impl Keeper {
    async fn run(
        self,
        mut rx: mpsc::Receiver<Publish>,
        deliveries: mpsc::UnboundedSender<Delivery>,
        first: oneshot::Sender<()>,
    ) {
        let mut first = Some(first);
        let mut wait = RECONNECT_FIRST;
        let mut connections = 0u64;
        let metrics = &self.broker.metrics;
        loop {
            match self.connect().await {
                Ok(session) => {
                    connections += 1;
                    if connections > 1 {
                        metrics.reconnects.inc();
                        tracing::info!("queue: reconnected to RabbitMQ");
                    }
                    wait = RECONNECT_FIRST;
                    self.broker.connected.store(true, Ordering::Release);
                    metrics.connected.set(1);
                    if let Some(first) = first.take() {
                        let _ = first.send(());
                    }
                    let why = self.serve(&session, &mut rx, &deliveries).await;
                    self.broker.connected.store(false, Ordering::Release);
                    metrics.connected.set(0);
                    metrics.unconfirmed.set(0);
                    let stopping = self.broker.stopping.load(Ordering::Acquire);
                    if !stopping {
                        tracing::warn!(why = %why, "queue: RabbitMQ connection lost; reconnecting");
                    }
                    // A connection that stopped answering would not answer this either.
                    let closing = session.conn.close(200, "dispatch: reconnecting".into());
                    let _ = tokio::time::timeout(CLOSE_TIMEOUT, closing).await;
                    if stopping {
                        return;
                    }
                }
                Err(e) => {
                    if let Some(first) = first.take() {
                        let _ = first.send(());
                    }
                    tracing::warn!(error = %e, url = %redact(&self.url), retry_ms = wait.as_millis() as u64, "queue: cannot connect to RabbitMQ");
                }
            }
            // Until the next attempt, publishes are answered at once: not connected.
            let jittered = wait / 2 + wait.mul_f64(fastrand::f64() / 2.0);
            let next = tokio::time::Instant::now() + jittered;
            wait = (wait * 2).min(RECONNECT_MAX);
            loop {
                tokio::select! {
                    () = tokio::time::sleep_until(next) => break,
                    () = self.broker.stop.notified() => return,
                    publish = rx.recv() => match publish {
                        Some(p) => { let _ = p.done.send(Err("not connected".into())); }
                        None => return,
                    },
                }
            }
        }
    }

    /// Connects, declares the topology and opens the channels, or says why it could not
    /// within the timeout.
    async fn connect(&self) -> Result<Session, String> {
        match tokio::time::timeout(self.timeout, self.open(self.uri.clone())).await {
            Ok(Ok(session)) => Ok(session),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "no answer within {} ms (queue.confirm_timeout_ms)",
                self.timeout.as_millis()
            )),
        }
    }

    /// [`Self::connect`] without its bound.
    async fn open(&self, uri: AMQPUri) -> Result<Session, lapin::Error> {
        let properties =
            ConnectionProperties::default().with_connection_name("dispatch gateway".into());
        let conn = Connection::connect_uri(uri, properties).await?;
        let setup = conn.create_channel().await?;
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let t = &self.topology;
        for queue in [&t.work, &t.dead] {
            setup
                .queue_declare(queue.as_str().into(), durable, FieldTable::default())
                .await?;
        }
        for (queue, ceiling_ms) in &t.delays {
            // Expired messages go back to the work queue; a message's own expiration
            // (the jittered backoff) is at most the queue's.
            let mut args = FieldTable::default();
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString("".into()),
            );
            args.insert(
                "x-dead-letter-routing-key".into(),
                AMQPValue::LongString(t.work.as_str().into()),
            );
            args.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(*ceiling_ms as i64),
            );
            setup
                .queue_declare(queue.as_str().into(), durable, args)
                .await?;
        }
        let publish = conn.create_channel().await?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        // A prefetch of 0 would mean no bound at all to AMQP: no workers, no consumer.
        let consumer = if self.prefetch == 0 || !self.broker.consuming.load(Ordering::Acquire) {
            None
        } else {
            let consume = conn.create_channel().await?;
            consume
                .basic_qos(self.prefetch, BasicQosOptions::default())
                .await?;
            let tag = format!("dispatch-{}-{}", std::process::id(), crate::model::new_id());
            let consumer = consume
                .basic_consume(
                    t.work.as_str().into(),
                    tag.into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            Some((consumer, consume))
        };
        Ok(Session {
            conn,
            publish,
            consumer,
            inspect: setup,
        })
    }

    /// Publishes, answers confirms and hands deliveries on, until the connection is lost
    /// (or the gateway stops); says why it ended.
    async fn serve(
        &self,
        session: &Session,
        rx: &mut mpsc::Receiver<Publish>,
        deliveries: &mpsc::UnboundedSender<Delivery>,
    ) -> String {
        let metrics = &self.broker.metrics;
        let mut events = session.conn.events_listener().boxed();
        let mut consumer = session.consumer.as_ref().map(|(c, _)| c.clone());
        // Set once the gateway asked for no more deliveries and the cancel was sent: the
        // consumer's end is then expected, not a reason to reconnect.
        let mut cancelled = false;
        let publisher = Arc::new(session.publish.clone());
        let mut pending: FuturesUnordered<BoxFuture<'static, Answer>> = FuturesUnordered::new();
        // Polled beside the rest, so that asking for depths never holds up a confirm.
        let depths = self.poll_depths(&session.inspect);
        tokio::pin!(depths);
        // When the broker last answered a publish, or publishing began after none waited:
        // looked at a few times per timeout, not reset per confirm.
        let mut answered = tokio::time::Instant::now();
        let mut watch = tokio::time::interval(self.timeout / 4);
        watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = events.next() => match event {
                    Some(lapin::Event::Error(e)) => return format!("connection error: {e}"),
                    None => return "the connection closed".into(),
                    Some(_) => {}
                },
                delivery = async { consumer.as_mut()?.next().await }, if consumer.is_some() => match delivery {
                    Some(Ok(delivery)) => { let _ = deliveries.send(delivery); }
                    Some(Err(e)) => return format!("consumer: {e}"),
                    None if cancelled => consumer = None,
                    None => return "the broker cancelled the consumer".into(),
                },
                () = self.broker.stop_consuming.notified(), if consumer.is_some() && !cancelled => {
                    cancelled = true;
                    let (held, channel) = session.consumer.as_ref().expect("a consumer is open");
                    let (channel, tag) = (channel.clone(), held.tag());
                    // Not awaited here: confirms keep flowing while the broker answers.
                    tokio::spawn(async move {
                        match channel.basic_cancel(tag, BasicCancelOptions::default()).await {
                            Ok(()) => tracing::info!("queue: consumer cancelled; this gateway takes no more runs"),
                            Err(e) => tracing::warn!(error = %e, "queue: cancelling the consumer failed; what it is sent is handed back"),
                        }
                    });
                },
                Some(answer) = pending.next(), if !pending.is_empty() => {
                    answered = tokio::time::Instant::now();
                    metrics.unconfirmed.dec();
                    if let Some(why) = self.answer(answer) {
                        return why;
                    }
                }
                publish = rx.recv(), if pending.len() < self.window => {
                    let Some(first) = publish else { return "the gateway stopped".into() };
                    let room = self.window - pending.len();
                    let mut batch = vec![first];
                    while batch.len() < room {
                        match rx.try_recv() {
                            Ok(more) => batch.push(more),
                            Err(_) => break,
                        }
                    }
                    if pending.is_empty() {
                        answered = tokio::time::Instant::now();
                    }
                    self.publish(&publisher, batch, &mut pending);
                }
                _ = watch.tick(), if !pending.is_empty() => {
                    if answered.elapsed() >= self.timeout {
                        return format!(
                            "{} publishes waiting, no confirm for {} ms (queue.confirm_timeout_ms)",
                            pending.len(),
                            self.timeout.as_millis()
                        );
                    }
                }
                e = &mut depths => return format!("queue depth: {e}"),
                () = self.broker.stop.notified() => return "the gateway stopped".into(),
            }
        }
    }

    /// Publishes a batch in order and puts each publish, with its confirm, among the
    /// pending ones. The frames of the whole batch are queued before any is waited on (a
    /// publish's future registers its confirm and queues its frames when first polled, and
    /// they are polled here in order), so the batch goes out in one write; neither that
    /// write nor the confirms are awaited here, so the loop goes on answering meanwhile.
    fn publish(
        &self,
        channel: &Arc<Channel>,
        batch: Vec<Publish>,
        pending: &mut FuturesUnordered<BoxFuture<'static, Answer>>,
    ) {
        let metrics = &self.broker.metrics;
        let mandatory = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        for Publish { out, done } in batch {
            let channel = channel.clone();
            let mut answer = Box::pin(async move {
                let sent = channel
                    .basic_publish(
                        "".into(),
                        out.queue.as_str().into(),
                        mandatory,
                        &out.body,
                        out.properties,
                    )
                    .await;
                let outcome = match sent {
                    Ok(confirm) => confirm.await.map_err(Lost::Confirm),
                    Err(e) => Err(Lost::Send(e)),
                };
                Answer(outcome, done)
            });
            metrics.unconfirmed.inc();
            // The first poll, here and in order; `pending` polls it again with its own waker.
            let mut first = Context::from_waker(Waker::noop());
            match answer.as_mut().poll(&mut first) {
                Poll::Ready(answer) => pending.push(Box::pin(std::future::ready(answer))),
                Poll::Pending => pending.push(answer),
            }
        }
    }

    /// Answers one publisher with what the broker said; says why the connection must be
    /// opened again, if it must.
    fn answer(&self, Answer(confirmation, done): Answer) -> Option<String> {
        let metrics = &self.broker.metrics;
        if !matches!(confirmation, Err(Lost::Send(_))) {
            metrics.published.inc();
        }
        let (result, reopen) = match confirmation {
            Ok(Confirmation::Ack(None)) | Ok(Confirmation::NotRequested) => {
                metrics.confirmed.inc();
                (Ok(()), None)
            }
            Ok(Confirmation::Ack(Some(returned))) | Ok(Confirmation::Nack(Some(returned))) => {
                // No queue took it: the topology is gone (deleted by hand); declare again.
                metrics.returned.inc();
                let why = format!(
                    "the broker returned the message ({} {})",
                    returned.reply_code, returned.reply_text
                );
                (Err(why.clone()), Some(why))
            }
            Ok(Confirmation::Nack(None)) => {
                metrics.nacked.inc();
                (Err("the broker refused the message (nack)".into()), None)
            }
            Err(Lost::Confirm(e)) => (Err(format!("no confirm: {e}")), None),
            // The channel is broken: open everything again.
            Err(Lost::Send(e)) => (
                Err(format!("publish failed: {e}")),
                Some(format!("publish failed: {e}")),
            ),
        };
        let _ = done.send(result);
        reopen
    }

    /// Asks for the depths every [`DEPTH_EVERY`]; returns why it could not.
    async fn poll_depths(&self, channel: &Channel) -> lapin::Error {
        let mut every = tokio::time::interval(DEPTH_EVERY);
        loop {
            every.tick().await;
            if let Err(e) = self.depths(channel).await {
                return e;
            }
        }
    }

    /// Asks the broker how many messages wait in the work, delay and dead queues.
    async fn depths(&self, channel: &Channel) -> Result<(), lapin::Error> {
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let t = &self.topology;
        let mut delayed = 0;
        let queues = [(&t.work, "runs"), (&t.dead, "dead")]
            .into_iter()
            .chain(t.delays.iter().map(|(q, _)| (q, "delay")));
        for (queue, label) in queues {
            let declared = channel
                .queue_declare(queue.as_str().into(), passive, FieldTable::default())
                .await?;
            let count = i64::from(declared.message_count());
            if label == "delay" {
                delayed += count;
            } else {
                self.broker
                    .metrics
                    .depth
                    .with_label_values(&[label])
                    .set(count);
            }
        }
        self.broker
            .metrics
            .depth
            .with_label_values(&["delay"])
            .set(delayed);
        Ok(())
    }
}

/// A publish's confirm (or why none came), with its caller.
struct Answer(
    Result<Confirmation, Lost>,
    oneshot::Sender<Result<(), String>>,
);

/// Why a publish has no confirm.
enum Lost {
    /// Its frames were not sent.
    Send(lapin::Error),
    /// Sent, but the confirm never came (the connection dropped).
    Confirm(lapin::Error),
}

/// An AMQP URL without its password, for logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_stay_out_of_logs() {
        assert_eq!(
            redact("amqp://guest:secret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact("amqp://127.0.0.1"), "amqp://127.0.0.1");
    }
}
