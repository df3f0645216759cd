//! Events start runs. Every function subscribed to an event's type gets an async run with
//! `input` = the event's data and `event` = the event without its data. Events come in two
//! ways: `POST /v1/event/` (`api/events.rs`) and the messages event drivers publish to the
//! AMQP topic exchange `dispatch` ([`amqp`]); both hand them to [`deliver`].

pub mod amqp;

use serde_json::{Map, Value};

use crate::api::App;
use crate::error::Error;
use crate::model::{RunRequest, Tag, new_run_name};

/// An event as the runs it starts see it.
#[derive(Debug)]
pub struct Event {
    pub event_type: String,
    /// The event's data: the runs' `input`.
    pub input: Value,
    /// The event without its data: the runs' `event`.
    pub described: Value,
    pub tags: Vec<Tag>,
}

/// How the runs an event starts are named.
#[derive(Clone, Copy)]
pub enum RunNames<'a> {
    /// A fresh name per run: an event sent twice starts its runs twice.
    Fresh,
    /// A name derived from this key (the event's identity) and the subscription's name, so
    /// that an event delivered again finds its runs already submitted and starts none twice.
    Derived(&'a str),
}

/// The namespace of derived run names (a version 5 uuid of the key and the subscription).
const RUN_NAMES: uuid::Uuid = uuid::Uuid::from_u128(0x6a0d_3c52_8f1e_4b7a_9d25_e1c4_70b3_f9a8);

impl RunNames<'_> {
    fn name(self, subscription: &str) -> String {
        match self {
            RunNames::Fresh => new_run_name().to_string(),
            RunNames::Derived(key) => {
                uuid::Uuid::new_v5(&RUN_NAMES, format!("{key}\n{subscription}").as_bytes())
                    .to_string()
            }
        }
    }
}

/// Submits an async run of every function subscribed to the event's type and returns the
/// runs' names (with [`RunNames::Derived`], runs submitted by an earlier delivery of the
/// same event are among them). A subscription whose function is gone or not READY is
/// passed over (its event is logged); a store that cannot take a run is an error
/// (`Error::Store`, 503), so the sender can send the event again.
pub async fn deliver(app: &App, event: &Event, names: RunNames<'_>) -> Result<Vec<String>, Error> {
    let derived = matches!(names, RunNames::Derived(_));
    let mut runs = Vec::new();
    for subscription in app.registry.catalog.subscribed_to(&event.event_type) {
        let request = RunRequest {
            input: event.input.clone(),
            event: Some(event.described.clone()),
            secrets: subscription.secrets.clone(),
            tags: event.tags.clone(),
            ..RunRequest::default()
        };
        let name = names.name(&subscription.name);
        match crate::queue::submit(app, &subscription.function, request, name.clone(), None).await {
            Ok(run) => runs.push(run.name),
            // The name is taken: an earlier delivery of this event submitted the run.
            Err(_) if derived && already_submitted(app, &name).await? => runs.push(name),
            Err(e @ Error::Store(_)) => return Err(e),
            // The subscription outlived its function: the others still run.
            Err(e) => {
                tracing::warn!(subscription = %subscription.name, function = %subscription.function, error = %e, "event not delivered to a subscription")
            }
        }
    }
    Ok(runs)
}

/// Records the organization an event came from as `extensions.organization` (CloudEvents
/// 0.1 keeps what the spec does not name under `extensions`), unless the event names one.
pub fn set_organization(event: &mut Map<String, Value>, organization: String) {
    let extensions = event
        .entry("extensions")
        .or_insert_with(|| Value::Object(Map::new()));
    if let Value::Object(extensions) = extensions {
        extensions
            .entry("organization")
            .or_insert(Value::String(organization));
    }
}

async fn already_submitted(app: &App, name: &str) -> Result<bool, Error> {
    Ok(app.store.get_run(name).await?.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_names_depend_on_the_event_and_the_subscription_only() {
        let a = RunNames::Derived("acme/e-1");
        assert_eq!(a.name("greet"), a.name("greet"));
        assert_ne!(a.name("greet"), a.name("audit"));
        assert_ne!(a.name("greet"), RunNames::Derived("acme/e-2").name("greet"));
        assert!(uuid::Uuid::parse_str(&a.name("greet")).is_ok());
        assert_ne!(RunNames::Fresh.name("greet"), RunNames::Fresh.name("greet"));
    }
}
