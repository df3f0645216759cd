//! The ceiling that async accepts on RabbitMQ are measured against: a bare lapin loop that
//! publishes persistent messages (of about a run's size) to a durable queue of its own,
//! publisher confirms pipelined (at most `WINDOW` awaited at once, as the gateway's
//! `queue.confirm_window`), for `DURATION` seconds, then deletes its queue.
//!
//! `cargo run --release --example confirm_ceiling` (env: AMQP_URL, DURATION=10,
//! WINDOW=1024, BODY_BYTES=300, MESSAGE=plain). Prints `CEILING <confirmed> <per second>
//! <p50 us> <p99 us>`, the percentiles of the time from a publish to its confirm.
//!
//! `MESSAGE=plain` publishes a body and `delivery_mode` 2, nothing else: the most the
//! broker and lapin do. `MESSAGE=gateway` publishes what the gateway publishes for a
//! submit (src/queue/rabbit.rs): `mandatory`, a message id of a run name's length and a
//! timestamp (the function, attempts and submission time are in the gateway's body), so
//! that the broker's cost of those is told apart from the gateway's own. `MESSAGE=headers`
//! publishes the earlier layout, which also had a content type and the three
//! `x-dispatch-*` headers (about 170 bytes of properties, past the 64 where RabbitMQ's
//! cost steps up: docs/performance.md).

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() -> Result<(), lapin::Error> {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let duration = Duration::from_secs(env("DURATION", 10));
    let window: usize = env("WINDOW", 1024);
    let body = vec![b'x'; env("BODY_BYTES", 300)];
    let shape = match std::env::var("MESSAGE").as_deref() {
        Ok("plain") | Err(_) => Shape::Plain,
        Ok("gateway") => Shape::Gateway,
        Ok("headers") => Shape::Headers,
        Ok(other) => panic!("MESSAGE={other}: expected plain, gateway or headers"),
    };
    let conn = Connection::connect(&url, ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    let queue = format!("dispatch-ceiling-{}", std::process::id());
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(queue.as_str().into(), durable, FieldTable::default())
        .await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut pending = FuturesUnordered::new();
    let mut confirmed = 0u64;
    let mut latencies = Vec::new();
    let started = Instant::now();
    while started.elapsed() < duration {
        while pending.len() < window {
            let sent = Instant::now();
            let (options, properties) = message(shape, confirmed + pending.len() as u64);
            let confirm = channel
                .basic_publish("".into(), queue.as_str().into(), options, &body, properties)
                .await?;
            pending.push(async move { (confirm.await, sent.elapsed()) });
        }
        if let Some((confirmation, took)) = pending.next().await {
            assert!(confirmation?.is_ack(), "the broker refused a message");
            confirmed += 1;
            latencies.push(took);
        }
    }
    while let Some((confirmation, took)) = pending.next().await {
        assert!(confirmation?.is_ack(), "the broker refused a message");
        confirmed += 1;
        latencies.push(took);
    }
    let elapsed = started.elapsed().as_secs_f64();
    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    let _ = conn.close(200, "done".into()).await;
    latencies.sort_unstable();
    let us = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize].as_micros();
    println!(
        "CEILING {confirmed} {:.0} {} {}",
        confirmed as f64 / elapsed,
        us(0.5),
        us(0.99)
    );
    Ok(())
}

/// What is published (`MESSAGE`).
#[derive(Clone, Copy, PartialEq)]
enum Shape {
    /// A body and `delivery_mode` 2.
    Plain,
    /// What the gateway publishes for a submit.
    Gateway,
    /// What it published before its properties were kept within 64 bytes.
    Headers,
}

/// The options and properties of the `n`th message.
fn message(shape: Shape, n: u64) -> (BasicPublishOptions, BasicProperties) {
    let properties = BasicProperties::default().with_delivery_mode(2);
    if shape == Shape::Plain {
        return (BasicPublishOptions::default(), properties);
    }
    let options = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    let properties = properties
        .with_message_id(format!("01a24ff0-73de-7d66-930e-{n:012x}").into())
        .with_timestamp(1_796_000_000);
    if shape == Shape::Gateway {
        return (options, properties);
    }
    let mut table = FieldTable::default();
    table.insert(
        "x-dispatch-function".into(),
        AMQPValue::LongString("fast".into()),
    );
    table.insert("x-dispatch-attempts".into(), AMQPValue::LongLongInt(0));
    table.insert(
        "x-dispatch-submitted-us".into(),
        AMQPValue::LongLongInt(1_796_000_000_000_000 + n as i64),
    );
    let properties = properties
        .with_content_type("application/json".into())
        .with_headers(table);
    (options, properties)
}
