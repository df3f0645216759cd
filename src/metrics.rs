//! Prometheus metrics. The `gateway_*` series keep OpenFaaS' names and labels so its
//! Grafana dashboards work unchanged; our own series carry the `dispatch_` prefix.
//!
//! Label lookups in the `prometheus` crate hash the label values and take a lock, so the
//! hot path never does them: each function resolves its handles once ([`FunctionMetrics`]),
//! each upstream endpoint likewise ([`EndpointMetrics`]), and the per-status-code pair is
//! resolved on the first call that sees that code and then kept.

use std::sync::OnceLock;
use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    invocation_total: IntCounterVec,
    functions_seconds: HistogramVec,
    invocation_started: IntCounterVec,
    service_count: IntGaugeVec,
    inflight: IntGaugeVec,
    rejections: IntCounterVec,
    connect_retries: IntCounterVec,
    connections_opened: IntCounterVec,
    pool_idle: IntGaugeVec,
    ejections: IntCounterVec,
    records_written: IntCounter,
    records_dropped: IntCounter,
    records_pending: IntGauge,
    record_write_failures: IntCounter,
    /// The async runs' series.
    pub queue: QueueMetrics,
    /// The series of events taken from AMQP.
    pub events: EventMetrics,
}

/// Async runs (`queue/`): what was accepted, tried again, given up, and how long runs take
/// from their 202 to their end.
pub struct QueueMetrics {
    pub submitted: IntCounter,
    pub finished: IntCounterVec,
    pub retries: IntCounter,
    pub dead_lettered: IntCounter,
    pub callback_failures: IntCounter,
    pub in_flight: IntGauge,
    pub run_seconds: Histogram,
    /// RabbitMQ only: the broker's side of it.
    pub broker: BrokerMetrics,
}

/// The RabbitMQ backend's series: publishes and what the broker said of them, the
/// connection, and the depth of its queues.
#[derive(Clone)]
pub struct BrokerMetrics {
    pub published: IntCounter,
    pub confirmed: IntCounter,
    pub returned: IntCounter,
    pub nacked: IntCounter,
    /// Publishes waiting for their confirm now.
    pub unconfirmed: IntGauge,
    pub reconnects: IntCounter,
    pub connected: IntGauge,
    /// Messages delivered again for runs already finished: acked, not run again.
    pub duplicates: IntCounter,
    /// Messages ready in each queue (`runs`, `dead`), as the broker last told.
    pub depth: IntGaugeVec,
}

/// Events from event drivers over AMQP (`events::amqp`): what became of each message, and
/// the state of the connection.
pub struct EventMetrics {
    /// Acknowledged: the runs of every subscribed function submitted.
    pub accepted: IntCounter,
    /// Rejected without requeue: not an event (bad content type, bad JSON...).
    pub rejected: IntCounter,
    /// Handed back to the broker: a run could not be submitted (the store is down).
    pub requeued: IntCounter,
    pub connected: IntGauge,
    pub connection_failures: IntCounter,
}

/// Why the gateway turned a call away before it reached a function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// `maxInflight` reached and the wait queue full.
    QueueFull,
    /// Waited for a slot until the wait limit or the deadline.
    QueueTimeout,
    /// Body over the configured limit.
    TooLarge,
}

impl Rejection {
    fn label(self) -> &'static str {
        match self {
            Rejection::QueueFull => "queue_full",
            Rejection::QueueTimeout => "queue_timeout",
            Rejection::TooLarge => "body_too_large",
        }
    }
}

fn simple_counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    register(registry, IntCounter::new(name, help).expect("valid metric"))
}

fn register<C: prometheus::core::Collector + Clone + 'static>(registry: &Registry, c: C) -> C {
    registry
        .register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            register(
                &registry,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            register(
                &registry,
                IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        Metrics {
            invocation_total: counter(
                "gateway_function_invocation_total",
                "Function invocations, by function and HTTP status code",
                &["function_name", "code"],
            ),
            functions_seconds: register(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "gateway_functions_seconds",
                        "Function invocation time taken, by function and HTTP status code",
                    )
                    .buckets(vec![
                        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                        10.0, 30.0, 60.0,
                    ]),
                    &["function_name", "code"],
                )
                .expect("valid metric"),
            ),
            invocation_started: counter(
                "gateway_function_invocation_started",
                "Function invocations started",
                &["function_name"],
            ),
            service_count: gauge(
                "gateway_service_count",
                "Endpoints (replicas) known for each function",
                &["function_name"],
            ),
            inflight: gauge(
                "dispatch_function_inflight",
                "Calls in flight, by function",
                &["function_name"],
            ),
            rejections: counter(
                "dispatch_rejections_total",
                "Calls refused before reaching a function, by function and reason",
                &["function_name", "reason"],
            ),
            connect_retries: counter(
                "dispatch_upstream_connect_retries_total",
                "Calls sent to another connection or endpoint after a failure to connect",
                &["function_name"],
            ),
            connections_opened: counter(
                "dispatch_upstream_connections_opened_total",
                "Upstream connections opened, by endpoint",
                &["endpoint"],
            ),
            pool_idle: gauge(
                "dispatch_upstream_pool_idle_connections",
                "Idle keep-alive connections in the pool, by endpoint",
                &["endpoint"],
            ),
            ejections: counter(
                "dispatch_upstream_ejections_total",
                "Times an endpoint was set aside after refusing connections",
                &["endpoint"],
            ),
            records_written: register(
                &registry,
                IntCounter::new(
                    "dispatch_run_records_written_total",
                    "Run records written to the store",
                )
                .expect("valid metric"),
            ),
            records_dropped: register(
                &registry,
                IntCounter::new(
                    "dispatch_run_records_dropped_total",
                    "Records of raw calls dropped because the record queue was full",
                )
                .expect("valid metric"),
            ),
            records_pending: register(
                &registry,
                IntGauge::new(
                    "dispatch_run_records_pending",
                    "Run records waiting to be written",
                )
                .expect("valid metric"),
            ),
            record_write_failures: register(
                &registry,
                IntCounter::new(
                    "dispatch_run_record_write_failures_total",
                    "Batches of run records the store refused (they are tried again)",
                )
                .expect("valid metric"),
            ),
            queue: QueueMetrics {
                submitted: simple_counter(
                    &registry,
                    "dispatch_queue_submitted_total",
                    "Async runs accepted (written to the queue before their 202)",
                ),
                finished: counter(
                    "dispatch_queue_finished_total",
                    "Async runs that ended, by status (READY or ERROR)",
                    &["status"],
                ),
                retries: simple_counter(
                    &registry,
                    "dispatch_queue_retries_total",
                    "Async run attempts that failed and were put back for another",
                ),
                dead_lettered: simple_counter(
                    &registry,
                    "dispatch_queue_dead_lettered_total",
                    "Async runs that ended ERROR and went to the dead letters",
                ),
                callback_failures: simple_counter(
                    &registry,
                    "dispatch_queue_callback_failures_total",
                    "X-Callback-Url deliveries that failed after every attempt",
                ),
                in_flight: register(
                    &registry,
                    IntGauge::new(
                        "dispatch_queue_in_flight",
                        "Async runs this gateway's workers are running now",
                    )
                    .expect("valid metric"),
                ),
                run_seconds: register(
                    &registry,
                    Histogram::with_opts(
                        HistogramOpts::new(
                            "dispatch_queue_run_seconds",
                            "Time from an async run's acceptance to its end, retries included",
                        )
                        .buckets(vec![
                            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                            60.0, 300.0, 3600.0,
                        ]),
                    )
                    .expect("valid metric"),
                ),
                broker: BrokerMetrics {
                    published: simple_counter(
                        &registry,
                        "dispatch_queue_published_total",
                        "Messages published to RabbitMQ (runs, retries, dead letters)",
                    ),
                    confirmed: simple_counter(
                        &registry,
                        "dispatch_queue_confirmed_total",
                        "Publishes RabbitMQ confirmed (acked)",
                    ),
                    returned: simple_counter(
                        &registry,
                        "dispatch_queue_returned_total",
                        "Mandatory publishes RabbitMQ returned as unroutable",
                    ),
                    nacked: simple_counter(
                        &registry,
                        "dispatch_queue_nacked_total",
                        "Publishes RabbitMQ refused (nacked)",
                    ),
                    unconfirmed: register(
                        &registry,
                        IntGauge::new(
                            "dispatch_queue_unconfirmed",
                            "Publishes waiting for RabbitMQ's confirm now",
                        )
                        .expect("valid metric"),
                    ),
                    reconnects: simple_counter(
                        &registry,
                        "dispatch_queue_reconnects_total",
                        "Connections to RabbitMQ opened again after one was lost",
                    ),
                    connected: register(
                        &registry,
                        IntGauge::new(
                            "dispatch_queue_connected",
                            "1 while the gateway is connected to RabbitMQ",
                        )
                        .expect("valid metric"),
                    ),
                    duplicates: simple_counter(
                        &registry,
                        "dispatch_queue_duplicates_total",
                        "Messages delivered again for runs already finished (acked, not run)",
                    ),
                    depth: gauge(
                        "dispatch_queue_depth",
                        "Messages ready in each RabbitMQ queue, as last declared",
                        &["queue"],
                    ),
                },
            },
            events: EventMetrics::new(&registry),
            registry,
        }
    }

    /// The run record writer's handles.
    pub fn records(&self) -> crate::records::RecordMetrics {
        crate::records::RecordMetrics {
            written: self.records_written.clone(),
            dropped: self.records_dropped.clone(),
            pending: self.records_pending.clone(),
            write_failures: self.record_write_failures.clone(),
        }
    }

    /// Handles for one function, resolved now so the hot path never looks them up.
    pub fn for_function(&self, name: &str) -> FunctionMetrics {
        FunctionMetrics {
            name: name.to_string(),
            started: self.invocation_started.with_label_values(&[name]),
            inflight: self.inflight.with_label_values(&[name]),
            service_count: self.service_count.with_label_values(&[name]),
            connect_retries: self.connect_retries.with_label_values(&[name]),
            invocation_total: self.invocation_total.clone(),
            functions_seconds: self.functions_seconds.clone(),
            rejections: self.rejections.clone(),
            by_code: Default::default(),
        }
    }

    /// Handles for one upstream endpoint.
    pub fn for_endpoint(&self, endpoint: &str) -> EndpointMetrics {
        EndpointMetrics {
            opened: self.connections_opened.with_label_values(&[endpoint]),
            idle: self.pool_idle.with_label_values(&[endpoint]),
            ejections: self.ejections.with_label_values(&[endpoint]),
        }
    }

    /// Drops every series of a deleted function so /metrics stops showing it.
    pub fn forget_function(&self, name: &str) {
        let _ = self.invocation_started.remove_label_values(&[name]);
        let _ = self.inflight.remove_label_values(&[name]);
        let _ = self.service_count.remove_label_values(&[name]);
        let _ = self.connect_retries.remove_label_values(&[name]);
    }

    /// The Prometheus text exposition of every series. Two of OpenFaaS' names break
    /// Prometheus' naming rules for their types: `gateway_function_invocation_started` is a
    /// counter without `_total`, and `gateway_service_count` a gauge ending in a
    /// histogram's `_count`. They are declared `untyped` (the rules are for typed series),
    /// so the names OpenFaaS dashboards query stay, and `promtool check metrics` finds
    /// nothing to fault.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into a Vec cannot fail");
        let mut text = String::from_utf8(out).expect("the text encoder writes UTF-8");
        for (name, kind) in UNTYPED {
            let typed = format!("# TYPE {name} {kind}\n");
            if let Some(at) = text.find(&typed) {
                text.replace_range(at..at + typed.len(), &format!("# TYPE {name} untyped\n"));
            }
        }
        text.into_bytes()
    }
}

impl EventMetrics {
    fn new(registry: &Registry) -> Self {
        let messages = register(
            registry,
            IntCounterVec::new(
                Opts::new(
                    "dispatch_events_amqp_messages_total",
                    "AMQP event messages taken, by outcome: accepted (runs submitted, acked), rejected (not an event, dropped), requeued (runs not submitted, handed back)",
                ),
                &["outcome"],
            )
            .expect("valid metric"),
        );
        EventMetrics {
            accepted: messages.with_label_values(&["accepted"]),
            rejected: messages.with_label_values(&["rejected"]),
            requeued: messages.with_label_values(&["requeued"]),
            connected: register(
                registry,
                IntGauge::new(
                    "dispatch_events_amqp_connected",
                    "1 while this gateway consumes events from the AMQP broker, else 0",
                )
                .expect("valid metric"),
            ),
            connection_failures: simple_counter(
                registry,
                "dispatch_events_amqp_connection_failures_total",
                "AMQP event connections refused or lost (each followed by a reconnect)",
            ),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The OpenFaaS series exposed as `untyped`, and the type they are kept as (see
/// [`Metrics::render`]).
const UNTYPED: [(&str, &str); 2] = [
    ("gateway_function_invocation_started", "counter"),
    ("gateway_service_count", "gauge"),
];

/// Status codes whose handles a function keeps at hand. A function answers with a few
/// codes, so a short list scanned in order is both small (a slot per code seen, not per
/// code possible: 10,000 functions must not cost 120 MB) and fast; codes beyond it are
/// looked up the slow way.
const CODE_SLOTS: usize = 8;

/// The handles of one status code.
struct CodeMetrics {
    code: u16,
    count: IntCounter,
    seconds: Histogram,
}

/// One function's metric handles.
pub struct FunctionMetrics {
    name: String,
    pub started: IntCounter,
    pub inflight: IntGauge,
    pub service_count: IntGauge,
    pub connect_retries: IntCounter,
    invocation_total: IntCounterVec,
    functions_seconds: HistogramVec,
    rejections: IntCounterVec,
    /// The handles of the first status codes seen, each slot taken once for good.
    by_code: [OnceLock<CodeMetrics>; CODE_SLOTS],
}

impl FunctionMetrics {
    /// Counts one finished call with its status code and duration.
    pub fn observe(&self, code: u16, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        for slot in &self.by_code {
            // An empty slot is claimed for this code; a slot another code claimed first
            // (maybe just now, on another thread) is passed over.
            let found = slot.get_or_init(|| self.resolve(code));
            if found.code == code {
                found.count.inc();
                found.seconds.observe(seconds);
                return;
            }
        }
        let slow = self.resolve(code);
        slow.count.inc();
        slow.seconds.observe(seconds);
    }

    fn resolve(&self, code: u16) -> CodeMetrics {
        let text = code.to_string();
        let labels = [self.name.as_str(), text.as_str()];
        CodeMetrics {
            code,
            count: self.invocation_total.with_label_values(&labels),
            seconds: self.functions_seconds.with_label_values(&labels),
        }
    }

    pub fn reject(&self, why: Rejection) {
        self.rejections
            .with_label_values(&[self.name.as_str(), why.label()])
            .inc();
    }
}

/// One upstream endpoint's metric handles.
#[derive(Clone)]
pub struct EndpointMetrics {
    pub opened: IntCounter,
    pub idle: IntGauge,
    pub ejections: IntCounter,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observed_calls_appear_with_openfaas_names() {
        let m = Metrics::new();
        let f = m.for_function("hello");
        f.started.inc();
        f.service_count.set(2);
        f.observe(200, Duration::from_millis(3));
        f.observe(200, Duration::from_millis(4));
        f.observe(502, Duration::from_millis(1));
        // More codes than there are slots still count.
        for code in [201, 202, 204, 301, 302, 400, 401, 403, 404, 409] {
            f.observe(code, Duration::from_millis(1));
        }
        f.observe(409, Duration::from_millis(1));
        f.reject(Rejection::QueueFull);
        let text = String::from_utf8(m.render()).unwrap();
        assert!(
            text.contains(
                r#"gateway_function_invocation_total{code="200",function_name="hello"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"gateway_function_invocation_total{code="502",function_name="hello"} 1"#
            )
        );
        assert!(
            text.contains(r#"gateway_functions_seconds_count{code="200",function_name="hello"} 2"#)
        );
        assert!(text.contains(r#"gateway_function_invocation_started{function_name="hello"} 1"#));
        assert!(text.contains("# TYPE gateway_function_invocation_started untyped\n"));
        assert!(text.contains("# TYPE gateway_function_invocation_total counter\n"));
        assert!(text.contains("# TYPE gateway_service_count untyped\n"));
        assert!(text.contains(r#"gateway_service_count{function_name="hello"} 2"#));
        assert!(
            text.contains(
                r#"gateway_function_invocation_total{code="409",function_name="hello"} 2"#
            )
        );
        assert!(
            text.contains(
                r#"gateway_function_invocation_total{code="204",function_name="hello"} 1"#
            )
        );
        assert!(
            text.contains(
                r#"dispatch_rejections_total{function_name="hello",reason="queue_full"} 1"#
            )
        );
    }
}
