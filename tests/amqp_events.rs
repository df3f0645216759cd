//! Events from event drivers over AMQP: a plain AMQP client in another language (Python's
//! pika) publishes CloudEvent messages to the topic exchange `dispatch` of the machine's
//! RabbitMQ (127.0.0.1:5672), and the gateway starts the runs of the subscribed functions.
//! Each test run binds its own queue with its own organization (`{org}.#`), so tests on
//! the shared broker do not see each other's events.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use common::{Behavior, Gateway, Metrics, Upstream, function};

const BROKER: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Publishes messages to, or deletes a queue of, the broker with pika: with confirms and
/// mandatory (a message no queue takes is an error, not a silent loss), again and again
/// while the broker is away (another test may restart it). Messages sent twice that way
/// are what a redelivery looks like to the gateway.
const PIKA: &str = r#"
import json, sys, time
import pika
req = json.loads(sys.argv[1])
deadline = time.time() + 60

def once():
    conn = pika.BlockingConnection(pika.URLParameters(req["url"]))
    ch = conn.channel()
    if req["action"] == "delete":
        ch.queue_delete(queue=req["queue"])
    else:
        ch.exchange_declare(exchange="dispatch", exchange_type="topic", durable=True)
        ch.confirm_delivery()
        for m in req["messages"]:
            props = pika.BasicProperties(
                content_type=m.get("content_type"), type=m.get("type"), message_id=m.get("id"),
                correlation_id=m.get("source"), timestamp=m.get("time"), delivery_mode=2)
            ch.basic_publish(exchange="dispatch", routing_key=m["key"], body=m["body"].encode(),
                             properties=props, mandatory=True)
    conn.close()

# The broker may be restarting (another test's doing): try again until the deadline.
while True:
    try:
        once()
        break
    except (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError,
            pika.exceptions.StreamLostError) as e:
        if time.time() > deadline:
            sys.exit("RabbitMQ at %s: %r" % (req["url"], e))
        time.sleep(0.5)
"#;

/// Makes sure `import pika` works, installing it from PyPI if needed.
fn ensure_pika() {
    let has = || {
        Command::new("python3")
            .args(["-c", "import pika"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if has() {
        return;
    }
    let out = Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "pika"])
        .output()
        .expect("running python3 -m pip");
    assert!(
        out.status.success() && has(),
        "these tests need Python's pika and `python3 -m pip install --quiet pika` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn pika(request: Value) {
    let out = Command::new("python3")
        .args(["-c", PIKA, &request.to_string()])
        .output()
        .expect("running python3");
    assert!(
        out.status.success(),
        "pika {}: {}",
        request["action"],
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn publish(messages: Value) {
    let request = json!({"action": "publish", "url": BROKER, "messages": messages});
    tokio::task::spawn_blocking(move || pika(request))
        .await
        .unwrap();
}

/// The test's own queue on the shared broker, deleted at the end.
struct TestQueue(String);

impl Drop for TestQueue {
    fn drop(&mut self) {
        pika(json!({"action": "delete", "url": BROKER, "queue": self.0}));
    }
}

async fn consuming(gw: &Gateway) {
    wait_for(gw, "a connection to RabbitMQ at 127.0.0.1:5672", |m| {
        m.value("dispatch_events_amqp_connected", &[]) == 1.0
    })
    .await;
}

/// Waits until the gateway's metrics satisfy `check`.
async fn wait_for(gw: &Gateway, what: &str, check: impl Fn(&Metrics) -> bool) {
    let until = Instant::now() + Duration::from_secs(60);
    while !check(&gw.metrics().await) {
        assert!(
            Instant::now() < until,
            "timed out waiting for {what}; log:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn runs_of(gw: &Gateway, function: &str) -> Vec<Value> {
    let path = format!("/v1/runs?functionName={function}&limit=1000");
    let reply = gw.get(&path).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json().as_array().unwrap().clone()
}

/// Waits until `function` has `count` runs, all finished, and gives them.
async fn finished_runs(gw: &Gateway, function: &str, count: usize) -> Vec<Value> {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let runs = runs_of(gw, function).await;
        if runs.len() >= count
            && runs
                .iter()
                .all(|r| r["status"] == "READY" || r["status"] == "ERROR")
        {
            return runs;
        }
        assert!(
            Instant::now() < until,
            "{function}: {count} finished runs expected, have {runs:?}; log:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn messages_counted(gw: &Gateway, outcome: &str, count: f64) {
    let name = "dispatch_events_amqp_messages_total";
    wait_for(
        gw,
        &format!("{name}{{outcome={outcome}}} >= {count}"),
        |m| m.value(name, &[("outcome", outcome)]) >= count,
    )
    .await;
}

/// A gateway consuming its own queue, bound to the `dispatch` exchange for its own
/// organization, with function `greet` subscribed to `user.created`.
struct Setup {
    up: Upstream,
    gw: Gateway,
    org: String,
    queue: TestQueue,
}

async fn setup(env: &[(&str, &str)]) -> Setup {
    ensure_pika();
    let unique = uuid::Uuid::new_v4().simple().to_string();
    let org = format!("org{}", &unique[..12]);
    let queue = TestQueue(format!("dispatch-events-test-{unique}"));
    let binding = format!("{org}.#");
    let up = Upstream::start(Behavior::Envelope).await;
    let mut all = vec![
        ("DISPATCH_EVENTS_AMQP_URL", BROKER),
        ("DISPATCH_EVENTS_QUEUE", queue.0.as_str()),
        ("DISPATCH_EVENTS_BINDING_KEY", binding.as_str()),
        ("DISPATCH_EVENTS_RECONNECT_MAX_MS", "1000"),
    ];
    all.extend_from_slice(env);
    let gw = Gateway::start_with(&all).await;
    gw.register(&function(
        "greet",
        &[up.addr],
        json!({"upstream": {"protocol": "dispatch"}}),
    ))
    .await;
    let subscription = json!({"name": "on-user", "eventType": "user.created", "function": "greet"});
    let reply = gw.post_json("/v1/event/subscriptions", &subscription).await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    consuming(&gw).await;
    Setup { up, gw, org, queue }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_amqp_event_starts_the_runs_of_its_subscribers_once() {
    let Setup {
        up,
        mut gw,
        org,
        queue: _queue,
    } = setup(&[]).await;
    let event = json!({
        "key": format!("{org}.user.created"), "type": "user.created", "id": "event-1",
        "source": "crm", "time": 1_522_949_460, "content_type": "application/json",
        "body": "{\"name\": \"Jon\"}",
    });
    // Not an event: rejected, counted, and no run.
    let bad = json!({"key": format!("{org}.user.created"), "type": "user.created",
                     "content_type": "application/json", "body": "{not json"});
    publish(json!([event, bad])).await;
    let runs = finished_runs(&gw, "greet", 1).await;
    let run = &runs[0];
    assert_eq!(run["status"], "READY", "{run}");
    assert_eq!(run["input"], json!({"name": "Jon"}));
    assert_eq!(run["output"]["greeting"], "Hello, Jon");
    let seen = &run["event"];
    assert_eq!(seen["event-type"], "user.created", "{seen}");
    assert_eq!(seen["event-id"], "event-1");
    assert_eq!(seen["source"], "crm");
    assert_eq!(seen["event-time"], "2018-04-05T17:31:00Z");
    assert_eq!(seen["content-type"], "application/json");
    assert_eq!(seen["extensions"]["organization"], org.as_str());
    assert!(
        seen.get("data").is_none(),
        "the event goes without its data"
    );
    assert_eq!(up.stats.last_context()["event"]["event-id"], "event-1");
    messages_counted(&gw, "rejected", 1.0).await;

    // The same event again (as a redelivery is): acked, and no second run.
    publish(json!([event])).await;
    messages_counted(&gw, "accepted", 2.0).await;
    assert_eq!(runs_of(&gw, "greet").await.len(), 1, "a run started twice");

    // Published while no gateway runs: the durable queue keeps it for the next one.
    gw.terminate();
    assert!(gw.wait_exit(Duration::from_secs(30)).await.success());
    let later = json!({
        "key": format!("{org}.user.created"), "type": "user.created", "id": "event-2",
        "content_type": "application/json", "body": "{\"name\": \"Arya\"}",
    });
    publish(json!([later])).await;
    gw.start_again().await;
    let runs = finished_runs(&gw, "greet", 2).await;
    assert_eq!(runs.len(), 2, "{runs:?}");
    let arya = runs
        .iter()
        .find(|r| r["event"]["event-id"] == "event-2")
        .expect("the run of the event published while the gateway was down");
    assert_eq!(arya["input"], json!({"name": "Arya"}));
    assert_eq!(arya["status"], "READY", "{arya}");

    // Over HTTP, the caller's X-Dispatch-Org is the event's organization likewise.
    let emission =
        json!({"event-type": "user.created", "event-id": "event-3", "data": {"name": "Bran"}});
    let reply = common::request(
        gw.addr,
        http::Method::POST,
        "/v1/event/",
        &[
            ("content-type", "application/json"),
            ("x-dispatch-org", &org),
        ],
        emission.to_string().into(),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let runs = finished_runs(&gw, "greet", 3).await;
    let bran = runs
        .iter()
        .find(|r| r["event"]["event-id"] == "event-3")
        .expect("the run of the event emitted over HTTP");
    assert_eq!(bran["event"]["extensions"]["organization"], org.as_str());
}

/// The broker's name for a gateway's connection (`dispatch gateway {pid}`).
fn connection_of_pid(pid: u32) -> Option<String> {
    let out = Command::new("rabbitmqctl")
        .args(["list_connections", "pid", "client_properties"])
        .output()
        .expect("running rabbitmqctl (RabbitMQ's CLI) to find the gateway's connection");
    let wanted = format!("dispatch gateway {pid}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|line| line.contains(&wanted))
        .and_then(|line| line.split_whitespace().next())
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_connection_or_queue_is_set_up_again() {
    let Setup {
        up: _up,
        gw,
        org,
        queue,
    } = setup(&[]).await;
    let failures = |m: &Metrics| m.value("dispatch_events_amqp_connection_failures_total", &[]);
    // The broker closes the connection (as when it stops), then the queue goes (as when it
    // comes back without it): each time the gateway connects again and declares anew.
    let connection = tokio::task::spawn_blocking({
        let gw_pid = gw.pid();
        move || {
            let until = Instant::now() + Duration::from_secs(30);
            loop {
                let found = connection_of_pid(gw_pid);
                if found.is_some() || Instant::now() > until {
                    return found;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    })
    .await
    .unwrap()
    .expect("the gateway's connection is not listed by rabbitmqctl list_connections");
    let closed = Command::new("rabbitmqctl")
        .args(["close_connection", &connection, "test: connection closed"])
        .output()
        .unwrap();
    assert!(
        closed.status.success(),
        "{}",
        String::from_utf8_lossy(&closed.stderr)
    );
    wait_for(&gw, "a reconnect after the connection was closed", |m| {
        failures(m) >= 1.0 && m.value("dispatch_events_amqp_connected", &[]) == 1.0
    })
    .await;
    let before = failures(&gw.metrics().await);
    tokio::task::spawn_blocking({
        let queue = queue.0.clone();
        move || pika(json!({"action": "delete", "url": BROKER, "queue": queue}))
    })
    .await
    .unwrap();
    wait_for(&gw, "a reconnect after the queue was deleted", |m| {
        failures(m) > before && m.value("dispatch_events_amqp_connected", &[]) == 1.0
    })
    .await;

    let event = json!({
        "key": format!("{org}.user.created"), "type": "user.created", "id": "event-after",
        "content_type": "application/json", "body": "{\"name\": \"Sansa\"}",
    });
    publish(json!([event])).await;
    let runs = finished_runs(&gw, "greet", 1).await;
    assert_eq!(runs[0]["input"], json!({"name": "Sansa"}));
    assert_eq!(runs[0]["status"], "READY", "{}", runs[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_in_hand_when_a_gateway_is_killed_are_run_once_each() {
    const EVENTS: usize = 300;
    // Runs the killed gateway had taken are taken again after this hold.
    let Setup {
        up: _up,
        mut gw,
        org,
        queue: _queue,
    } = setup(&[("DISPATCH_QUEUE_HOLD_SECONDS", "2")]).await;
    // The events wait in the durable queue while the gateway is away...
    gw.terminate();
    assert!(gw.wait_exit(Duration::from_secs(30)).await.success());
    let events: Vec<Value> = (0..EVENTS)
        .map(|i| {
            json!({"key": format!("{org}.user.created"), "type": "user.created",
                   "id": format!("event-{i}"), "content_type": "application/json",
                   "body": format!("{{\"name\": \"n{i}\"}}")})
        })
        .collect();
    publish(Value::Array(events)).await;
    // ...then come at once to the next one, which is killed while it works through them:
    // what it had not acked is delivered again, to the one after it.
    gw.start_again().await;
    messages_counted(&gw, "accepted", 1.0).await;
    gw.crash();
    gw.start_again().await;
    let runs = finished_runs(&gw, "greet", EVENTS).await;
    let events: std::collections::BTreeSet<String> = runs
        .iter()
        .map(|r| r["event"]["event-id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(events.len(), EVENTS, "an event without its run");
    assert_eq!(runs.len(), EVENTS, "an event run twice");
    assert!(
        runs.iter().all(|r| r["status"] == "READY"),
        "{:?}",
        runs.iter().find(|r| r["status"] != "READY")
    );
}
