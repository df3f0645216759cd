//! Events from event drivers over AMQP, in the shape of Dispatch's RabbitMQ transport.
//!
//! Drivers publish to the durable topic exchange `events.exchange` (`dispatch`) with the
//! routing key `{organization}.{eventType}` and the CloudEvent's fields as message
//! properties: `type` = event type, `message_id` = event id, `correlation_id` = source,
//! `timestamp` = event time, `content_type`, and the body = the event's data (headers
//! `dispatch-schema-url` and `dispatch-event-type-version` carry those two fields). Each
//! gateway consumes the durable queue `events.queue`, bound to the exchange with
//! `events.binding_key` (`#`: every organization) and shared by every gateway, so that each
//! event is taken by one of them. An event starts the runs of its subscribers exactly as
//! `POST /v1/event/` does ([`super::deliver`]); the organization goes on the event as
//! `extensions.organization` for the functions to see (subscriptions match the event type
//! whatever the organization; a binding key such as `acme.#` limits a gateway to one).
//!
//! Nothing accepted is lost: a message is acknowledged only once the run of every
//! subscribed function is in the store. A gateway that dies before that leaves it
//! unacknowledged, and the broker delivers it again; the runs' names are derived from the
//! organization, the event id and the subscription, so the runs submitted the first time
//! are found, not started twice (an event without a `message_id` gets a fresh id and has no
//! such guard). A message that is not an event (bad content type, bad JSON) is rejected
//! without requeue, logged and counted; one whose runs cannot be submitted (store down) is
//! handed back after a pause.
//!
//! The connection is this module's own loop, not lapin's recovery: a lost or refused
//! connection is opened again after a backoff (doubling, with jitter), and the exchange,
//! queue, binding and consumer are declared anew each time, so a broker that was restarted
//! or lost its queue is served again as soon as it is back.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use serde_json::{Map, Value, json};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::{Event, RunNames, deliver, set_organization};
use crate::api::App;
use crate::config::EventsConfig;
use crate::model::{new_id, rfc3339};

/// Longest wait for the broker to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a message whose runs could not be submitted is held before it goes back to the
/// queue (so that a store that is down is not asked again in a tight loop).
const REQUEUE_PAUSE: Duration = Duration::from_secs(1);
/// At shutdown, how long the messages in hand may take to be settled.
const STOP_WAIT: Duration = Duration::from_secs(10);

/// This gateway's consumer of AMQP events, while it runs.
pub struct Consumer {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Consumer {
    /// Starts consuming when `events.amqp_url` is set (`None` when it is not).
    pub fn start(app: Arc<App>) -> Option<Consumer> {
        if app.config.events.amqp_url.is_empty() {
            return None;
        }
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(consume(app, stopped));
        Some(Consumer { stop, task })
    }

    /// Stops taking messages: those in hand are settled, then the connection closes and
    /// the broker gives what it had sent ahead to another gateway.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Connects, consumes, and connects again whenever the connection is refused or lost,
/// until the gateway stops.
async fn consume(app: Arc<App>, mut stopped: watch::Receiver<bool>) {
    let config = &app.config.events;
    let metrics = &app.metrics.events;
    let mut backoff = Backoff::new(config);
    loop {
        let lost = session(&app, &mut stopped, &mut backoff).await;
        metrics.connected.set(0);
        let Err(why) = lost else {
            return;
        };
        metrics.connection_failures.inc();
        let delay = backoff.next();
        tracing::warn!(error = %why, retry_in_ms = delay.as_millis() as u64, "events: AMQP connection failed; connecting again");
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stop_asked(&mut stopped) => return,
        }
    }
}

/// Resolves once the gateway stops (or its consumer handle is gone).
async fn stop_asked(stopped: &mut watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stop| *stop).await;
}

/// One connection: declares the topology and consumes until the connection fails (`Err`,
/// why) or the gateway stops (`Ok`).
async fn session(
    app: &Arc<App>,
    stopped: &mut watch::Receiver<bool>,
    backoff: &mut Backoff,
) -> Result<(), String> {
    let config = &app.config.events;
    let properties = ConnectionProperties::default()
        .with_connection_name(format!("dispatch gateway {}", std::process::id()).into());
    let connection = tokio::time::timeout(
        CONNECT_TIMEOUT,
        Connection::connect(&config.amqp_url, properties),
    )
    .await
    .map_err(|_| format!("no connection within {CONNECT_TIMEOUT:?}"))?
    .map_err(|e| format!("connecting: {e}"))?;
    let consumer = subscribe(&connection, config).await;
    let mut consumer = match consumer {
        Ok(consumer) => consumer,
        Err(e) => {
            close(&connection).await;
            return Err(e);
        }
    };
    backoff.reset();
    app.metrics.events.connected.set(1);
    tracing::info!(exchange = %config.exchange, queue = %config.queue, binding_key = %config.binding_key, "events: consuming AMQP events");
    let mut in_hand = JoinSet::new();
    let lost = loop {
        tokio::select! {
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    let app = app.clone();
                    in_hand.spawn(async move { handle(&app, delivery).await });
                }
                Some(Err(e)) => break e.to_string(),
                None => break "the broker cancelled the consumer".to_string(),
            },
            Some(_) = in_hand.join_next(), if !in_hand.is_empty() => {}
            () = stop_asked(stopped) => {
                let settle = async { while in_hand.join_next().await.is_some() {} };
                if tokio::time::timeout(STOP_WAIT, settle).await.is_err() {
                    tracing::warn!("events: messages still in hand at shutdown go back to the queue");
                }
                close(&connection).await;
                return Ok(());
            }
        }
    };
    // What is in hand goes on: its runs are submitted, and its acknowledgement fails on the
    // dead channel; the broker delivers it again, and its runs are found already there.
    in_hand.detach_all();
    close(&connection).await;
    Err(lost)
}

/// Declares the exchange, the queue and its binding, and starts consuming.
async fn subscribe(
    connection: &Connection,
    config: &EventsConfig,
) -> Result<lapin::Consumer, String> {
    let failed = |what: &str, e: lapin::Error| format!("{what}: {e}");
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| failed("opening a channel", e))?;
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(
            short(&config.exchange),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await
        .map_err(|e| failed(&format!("declaring exchange \"{}\"", config.exchange), e))?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(short(&config.queue), durable, FieldTable::default())
        .await
        .map_err(|e| failed(&format!("declaring queue \"{}\"", config.queue), e))?;
    channel
        .queue_bind(
            short(&config.queue),
            short(&config.exchange),
            short(&config.binding_key),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| failed("binding the queue", e))?;
    channel
        .basic_qos(config.prefetch, BasicQosOptions::default())
        .await
        .map_err(|e| failed("setting the prefetch", e))?;
    channel
        .basic_consume(
            short(&config.queue),
            ShortString::default(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| failed("consuming", e))
}

fn short(text: &str) -> ShortString {
    text.into()
}

async fn close(connection: &Connection) {
    let closing = connection.close(200, "dispatch gateway: bye".into());
    let _ = tokio::time::timeout(Duration::from_secs(2), closing).await;
}

/// One message: its runs submitted and acked, or rejected, or handed back.
async fn handle(app: &App, delivery: Delivery) {
    let metrics = &app.metrics.events;
    let limit = app.config.limits.body_bytes;
    let message = match parse(
        delivery.routing_key.as_str(),
        &delivery.properties,
        &delivery.data,
        limit,
    ) {
        Ok(message) => message,
        Err(why) => {
            tracing::warn!(routing_key = %delivery.routing_key, error = %why, "events: AMQP message is not an event; rejected");
            metrics.rejected.inc();
            let reject = BasicRejectOptions { requeue: false };
            settled(delivery.acker.reject(reject).await);
            return;
        }
    };
    let names = match &message.key {
        Some(key) => RunNames::Derived(key),
        None => RunNames::Fresh,
    };
    match deliver(app, &message.event, names).await {
        Ok(runs) => {
            tracing::info!(event_type = %message.event.event_type, routing_key = %delivery.routing_key, redelivered = delivery.redelivered, runs = runs.len(), "events: AMQP event delivered");
            metrics.accepted.inc();
            settled(delivery.acker.ack(BasicAckOptions::default()).await);
        }
        Err(e) => {
            tracing::warn!(event_type = %message.event.event_type, error = %e, "events: runs not submitted; the message goes back to the queue");
            metrics.requeued.inc();
            tokio::time::sleep(REQUEUE_PAUSE).await;
            let requeue = BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            };
            settled(delivery.acker.nack(requeue).await);
        }
    }
}

fn settled(outcome: lapin::Result<bool>) {
    if let Err(e) = outcome {
        tracing::info!(error = %e, "events: message not settled (connection gone); the broker delivers it again");
    }
}

/// An AMQP message read as an event.
#[derive(Debug)]
struct Message {
    event: Event,
    /// The event's identity (`{organization}/{event id}`) when the message has an id:
    /// the runs' names derive from it.
    key: Option<String>,
}

/// Reads a message as a CloudEvent; `Err` says why it is not one.
fn parse(
    routing_key: &str,
    properties: &BasicProperties,
    body: &[u8],
    limit: u64,
) -> Result<Message, String> {
    let (organization, routed_type) = routing_key.split_once('.').unwrap_or(("", routing_key));
    let event_type = text(properties.kind()).unwrap_or(routed_type);
    if event_type.is_empty() {
        return Err(format!(
            "no event type: the message has no type property and its routing key \"{routing_key}\" is not organization.eventType"
        ));
    }
    if body.len() as u64 > limit {
        return Err(format!(
            "the body has {} bytes, over limits.body_bytes ({limit})",
            body.len()
        ));
    }
    let content_type = text(properties.content_type());
    let input = data(content_type, body)?;
    let event_id = text(properties.message_id());
    let mut event = Map::new();
    event.insert("event-type".into(), json!(event_type));
    event.insert("cloud-events-version".into(), json!("0.1"));
    let id = event_id.map_or_else(|| new_id().to_string(), str::to_string);
    event.insert("event-id".into(), json!(id));
    if let Some(source) = text(properties.correlation_id()) {
        event.insert("source".into(), json!(source));
    }
    if let Some(time) = properties.timestamp().and_then(|t| i64::try_from(t).ok()) {
        event.insert("event-time".into(), json!(rfc3339(time)));
    }
    if let Some(content_type) = content_type {
        event.insert("content-type".into(), json!(content_type));
    }
    for (header, field) in [
        ("dispatch-schema-url", "schema-url"),
        ("dispatch-event-type-version", "event-type-version"),
    ] {
        if let Some(value) = header_text(properties.headers().as_ref(), header) {
            event.insert(field.into(), json!(value));
        }
    }
    if !organization.is_empty() {
        set_organization(&mut event, organization.to_string());
    }
    Ok(Message {
        event: Event {
            event_type: event_type.to_string(),
            input,
            described: Value::Object(event),
            tags: Vec::new(),
        },
        key: event_id.map(|id| format!("{organization}/{id}")),
    })
}

/// The body as the event's data: JSON (no content type, `application/json`, `*+json`) or
/// text (`text/*`); anything else is refused.
fn data(content_type: Option<&str>, body: &[u8]) -> Result<Value, String> {
    let essence = content_type
        .and_then(|c| c.split(';').next())
        .map(|c| c.trim().to_ascii_lowercase())
        .unwrap_or_default();
    if essence.is_empty() || essence == "application/json" || essence.ends_with("+json") {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Value::Null);
        }
        return serde_json::from_slice(body).map_err(|e| {
            let said = content_type.map_or_else(
                || "no content type, so JSON".to_string(),
                |c| format!("content type {c}"),
            );
            format!("the body is not JSON ({said}): {e}")
        });
    }
    if essence.starts_with("text/") {
        return String::from_utf8(body.to_vec())
            .map(Value::String)
            .map_err(|e| format!("the body is not UTF-8 text (content type {essence}): {e}"));
    }
    Err(format!(
        "content type \"{essence}\" is not taken: send JSON (application/json, or none) or text (text/*)"
    ))
}

fn text(value: &Option<ShortString>) -> Option<&str> {
    value
        .as_ref()
        .map(ShortString::as_str)
        .filter(|s| !s.is_empty())
}

fn header_text(headers: Option<&FieldTable>, name: &str) -> Option<String> {
    match headers?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
    .filter(|s| !s.is_empty())
}

/// Reconnection delays: doubling from `events.reconnect_ms` up to
/// `events.reconnect_max_ms`, each drawn between half and all of its step so that gateways
/// that lost the broker together do not all come back in the same instant.
struct Backoff {
    first_ms: u64,
    max_ms: u64,
    step_ms: u64,
}

impl Backoff {
    fn new(config: &EventsConfig) -> Backoff {
        Backoff {
            first_ms: config.reconnect_ms,
            max_ms: config.reconnect_max_ms,
            step_ms: config.reconnect_ms,
        }
    }

    fn next(&mut self) -> Duration {
        let step = self.step_ms;
        self.step_ms = step.saturating_mul(2).min(self.max_ms);
        Duration::from_millis(step / 2 + fastrand::u64(..=step / 2))
    }

    fn reset(&mut self) {
        self.step_ms = self.first_ms;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn props() -> BasicProperties {
        BasicProperties::default()
    }

    #[test]
    fn a_message_reads_as_a_cloud_event() {
        let mut headers = FieldTable::default();
        headers.insert(
            "dispatch-event-type-version".into(),
            AMQPValue::LongString("v2".into()),
        );
        let properties = props()
            .with_type("user.created".into())
            .with_message_id("e-1".into())
            .with_correlation_id("crm".into())
            .with_timestamp(1_522_949_460)
            .with_content_type("application/json".into())
            .with_headers(headers);
        let message = parse(
            "acme.user.created",
            &properties,
            br#"{"name": "Jon"}"#,
            1024,
        )
        .unwrap();
        assert_eq!(message.event.event_type, "user.created");
        assert_eq!(message.event.input, json!({"name": "Jon"}));
        assert_eq!(
            message.event.described,
            json!({
                "event-type": "user.created",
                "cloud-events-version": "0.1",
                "event-id": "e-1",
                "source": "crm",
                "event-time": "2018-04-05T17:31:00Z",
                "content-type": "application/json",
                "event-type-version": "v2",
                "extensions": {"organization": "acme"},
            })
        );
        assert_eq!(message.key.as_deref(), Some("acme/e-1"));
    }

    #[test]
    fn the_routing_key_gives_the_type_when_the_message_does_not() {
        let message = parse("acme.order.paid", &props(), b"", 1024).unwrap();
        assert_eq!(message.event.event_type, "order.paid");
        assert_eq!(message.event.input, Value::Null);
        assert!(message.event.described["event-id"].is_string());
        assert_eq!(message.key, None, "no message id: no derived run names");
        let text = props().with_content_type("text/plain; charset=utf-8".into());
        let message = parse("acme.note", &text, b"hello", 1024).unwrap();
        assert_eq!(message.event.input, json!("hello"));
    }

    #[test]
    fn what_is_not_an_event_says_why() {
        let json = props()
            .with_type("a".into())
            .with_content_type("application/json".into());
        let e = parse("acme.a", &json, b"{not json", 1024).unwrap_err();
        assert!(e.contains("not JSON"), "{e}");
        let binary = props()
            .with_type("a".into())
            .with_content_type("application/octet-stream".into());
        let e = parse("acme.a", &binary, b"\x00\x01", 1024).unwrap_err();
        assert!(e.contains("application/octet-stream"), "{e}");
        let e = parse("", &props(), b"{}", 1024).unwrap_err();
        assert!(e.contains("no event type"), "{e}");
        let e = parse("acme.a", &props(), b"[1, 2, 3]", 4).unwrap_err();
        assert!(e.contains("limits.body_bytes"), "{e}");
    }

    #[test]
    fn reconnects_back_off_up_to_the_cap_and_start_over_once_connected() {
        let mut config = Config::defaults().events;
        config.reconnect_ms = 100;
        config.reconnect_max_ms = 1000;
        let mut backoff = Backoff::new(&config);
        let mut steps = Vec::new();
        for _ in 0..6 {
            let d = backoff.next().as_millis() as u64;
            steps.push(d);
        }
        for (d, full) in steps.iter().zip([100u64, 200, 400, 800, 1000, 1000]) {
            assert!(
                *d >= full / 2 && *d <= full,
                "{d} ms, step {full}: {steps:?}"
            );
        }
        backoff.reset();
        assert!(backoff.next() <= Duration::from_millis(100));
    }
}
