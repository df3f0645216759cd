//! Dispatch's event manager: subscriptions (`POST /v1/event/subscriptions` 201, `GET` 200,
//! `GET|PUT|DELETE /v1/event/subscriptions/{name}` 200) say which functions an event type
//! starts; `POST /v1/event/` (200) emits an event: every subscribed function gets an async
//! run, with `input` = the event's data and `event` = the event without its data.
//! Subscriptions live in the store and in the catalog (so every gateway sharing the store
//! sees them at once, and they survive restarts).

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{Map, Value, json};

use super::{App, has_tags, parse_json, read_body, tag_filters};
use crate::body::{RespBody, json_response};
use crate::error::Error;
use crate::events::{Event, RunNames};
use crate::model::{Status, Subscription, Tag, new_id, unix_now};

async fn parse(app: &App, req: Request<Incoming>) -> Result<Subscription, Error> {
    let body = read_body(req, app.config.limits.body_bytes).await?;
    if body.is_empty() {
        return Err(Error::BadRequest(
            "subscription: request body required".into(),
        ));
    }
    parse_json(&body, "subscription")
}

/// The function must exist when the subscription is made (its runs would all fail
/// otherwise); it may go later, and its events' runs then fail with 404 in the emission.
fn check_function(app: &App, subscription: &Subscription) -> Result<(), Error> {
    if app.registry.get(&subscription.function).is_none() {
        return Err(Error::BadRequest(format!(
            "function: \"{}\" not found",
            subscription.function
        )));
    }
    Ok(())
}

pub async fn create(app: &App, req: Request<Incoming>) -> Result<Response<RespBody>, Error> {
    let mut subscription = parse(app, req).await?;
    subscription.validate()?;
    check_function(app, &subscription)?;
    let now = unix_now();
    subscription.id = new_id().to_string();
    subscription.kind = "Subscription".into();
    subscription.status = Status::Ready;
    subscription.created_time = now;
    subscription.modified_time = now;
    let _serial = app.writes.lock().await;
    app.store.create_subscription(&subscription).await?;
    app.registry.catalog.put_subscription(subscription.clone());
    tracing::info!(subscription = %subscription.name, event_type = %subscription.event_type, function = %subscription.function, "subscription created");
    Ok(json_response(StatusCode::CREATED, &subscription))
}

pub fn list(app: &App, query: Option<&str>) -> Result<Response<RespBody>, Error> {
    let wanted = tag_filters(query)?;
    let all: Vec<Subscription> = app
        .registry
        .catalog
        .subscriptions()
        .into_iter()
        .filter(|s| has_tags(&s.tags, &wanted))
        .collect();
    Ok(json_response(StatusCode::OK, &all))
}

fn current(app: &App, name: &str) -> Result<Subscription, Error> {
    app.registry
        .catalog
        .subscription(name)
        .ok_or_else(|| Error::NotFound(format!("subscription \"{name}\" not found")))
}

pub fn get(app: &App, name: &str) -> Result<Response<RespBody>, Error> {
    Ok(json_response(StatusCode::OK, &current(app, name)?))
}

pub async fn update(
    app: &App,
    name: &str,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, Error> {
    let mut subscription = parse(app, req).await?;
    super::name_from_path(&mut subscription.name, name, "subscriptions")?;
    subscription.validate()?;
    check_function(app, &subscription)?;
    let _serial = app.writes.lock().await;
    let was = current(app, name)?;
    subscription.id = was.id;
    subscription.kind = "Subscription".into();
    subscription.status = Status::Ready;
    subscription.created_time = was.created_time;
    subscription.modified_time = unix_now();
    app.store.update_subscription(&subscription).await?;
    app.registry.catalog.put_subscription(subscription.clone());
    tracing::info!(subscription = %name, "subscription updated");
    Ok(json_response(StatusCode::OK, &subscription))
}

pub async fn delete(app: &App, name: &str) -> Result<Response<RespBody>, Error> {
    let _serial = app.writes.lock().await;
    let mut was = current(app, name)?;
    app.store.delete_subscription(name).await?;
    app.registry.catalog.remove_subscription(name);
    tracing::info!(subscription = %name, "subscription deleted");
    was.status = Status::Deleted;
    Ok(json_response(StatusCode::OK, &was))
}

/// `POST /v1/event/`: an Emission (`{"event": {CloudEvent}, "tags": [...]}`, or the
/// CloudEvent alone). The event's type is `event-type` (or `eventType`); its data is
/// `data`, parsed as JSON when it is a string and the content type says JSON. Answers 200
/// with the emission (its `id`, the event with an `event-id` if it had none, and
/// `emitted-time`) and the names of the runs it started in `runs`. The caller's
/// `X-Dispatch-Org` goes on the event as `extensions.organization`, as an AMQP event's
/// organization does (see `events::amqp`).
pub async fn emit(app: &App, req: Request<Incoming>) -> Result<Response<RespBody>, Error> {
    let organization = req
        .headers()
        .get("x-dispatch-org")
        .and_then(|v| v.to_str().ok())
        .filter(|org| !org.is_empty())
        .map(str::to_string);
    let body = read_body(req, app.config.limits.body_bytes).await?;
    let sent: Value = parse_json(&body, "emission")?;
    let Value::Object(mut sent) = sent else {
        return Err(Error::BadRequest("emission: must be a JSON object".into()));
    };
    let tags: Vec<Tag> = match sent.remove("tags") {
        None | Some(Value::Null) => Vec::new(),
        Some(tags) => {
            serde_json::from_value(tags).map_err(|e| Error::BadRequest(format!("tags: {e}")))?
        }
    };
    let mut event = match sent.remove("event") {
        Some(Value::Object(event)) => event,
        Some(_) => return Err(Error::BadRequest("event: must be an object".into())),
        None => sent,
    };
    let event_type = field(&event, &["event-type", "eventType"])
        .filter(|t| !t.is_empty())
        .ok_or_else(|| Error::BadRequest("event.event-type: required".into()))?;
    if field(&event, &["event-id", "eventID", "eventId"]).is_none() {
        event.insert("event-id".into(), json!(new_id().to_string()));
    }
    if let Some(organization) = organization {
        crate::events::set_organization(&mut event, organization);
    }
    let data = event.remove("data").unwrap_or(Value::Null);
    let input = match data {
        Value::String(text)
            if field(&event, &["content-type", "contentType"])
                .is_some_and(|c| c.contains("json")) =>
        {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        }
        other => other,
    };
    let delivered = Event {
        event_type,
        input,
        described: Value::Object(event.clone()),
        tags,
    };
    let runs = crate::events::deliver(app, &delivered, RunNames::Fresh).await?;
    tracing::info!(event_type = %delivered.event_type, runs = runs.len(), "event emitted");
    let mut emitted = event;
    emitted.insert("data".into(), delivered.input);
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "id": new_id().to_string(),
            "event": emitted,
            "emitted-time": unix_now(),
            "tags": delivered.tags,
            "runs": runs,
        }),
    ))
}

fn field(event: &Map<String, Value>, names: &[&str]) -> Option<String> {
    names
        .iter()
        .find_map(|n| event.get(*n).and_then(Value::as_str).map(str::to_string))
}
