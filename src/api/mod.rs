//! The HTTP surface of the control/exec listener: one router that sends each request to its
//! handler. `/function/*` goes straight to the invoker; `/v1/*` is the Dispatch API;
//! `/healthz`, `/readyz` and `/metrics` are for operators. Only `/v1/*` asks for a token
//! (see auth.rs).

mod apis;
mod events;
mod functions;
mod health;
mod images;
mod runs;
mod secrets;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use crate::body::RespBody;
use crate::config::Config;
use crate::error::Error;
use crate::invoke::Invoker;
use crate::invoke::headers::Peer;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::store::Store;
use crate::supervisor::Supervisor;

/// Everything a request handler may need, shared by all connections.
pub struct App {
    pub config: Arc<Config>,
    pub registry: Arc<Registry>,
    pub invoker: Invoker,
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    /// The local driver's runtime processes.
    pub supervisor: Arc<Supervisor>,
    /// Wakes this gateway's queue workers when a run is submitted here.
    pub queue_wake: tokio::sync::Notify,
    /// Where async runs wait: the store (embedded) or RabbitMQ.
    pub queue: crate::queue::Queue,
    /// The async runs this gateway's workers are running, by name.
    pub queue_running: dashmap::DashSet<String>,
    /// Who may use the control API (`/v1/*`).
    pub auth: crate::auth::ControlAuth,
    /// The API endpoints' keys and rate limits.
    pub ingress: crate::ingress::Ingress,
    /// True until shutdown starts: `/readyz` answers 503 and the queue workers take no
    /// new runs from then on.
    pub accepting: AtomicBool,
    /// Serializes the control API's writes (store, then registry), so that a PUT and a
    /// DELETE of one function racing each other cannot leave the two disagreeing.
    pub writes: tokio::sync::Mutex<()>,
}

/// Routes one request. The OpenFaaS surface is served inline; everything else is boxed,
/// so that the future of every proxied call stays small (large futures showed in the
/// profile as `memmove`).
pub async fn handle(app: Arc<App>, req: Request<Incoming>, peer: &Peer) -> Response<RespBody> {
    let uri = req.uri().clone();
    let path = uri.path();
    if let Some(rest) = path.strip_prefix("/function/") {
        let (name, suffix) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let forwarded = match uri.query() {
            None => std::borrow::Cow::Borrowed(suffix),
            Some(q) => format!("{suffix}?{q}").into(),
        };
        return app.invoker.proxy(name, &forwarded, req, peer).await;
    }
    Box::pin(control(app, req, uri)).await
}

/// The Dispatch API and the operator endpoints.
async fn control(app: Arc<App>, req: Request<Incoming>, uri: http::Uri) -> Response<RespBody> {
    let path = uri.path();
    if crate::auth::protects(path)
        && let Err(e) = app.auth.check(req.headers())
    {
        return e.into_response();
    }
    let method = req.method().clone();
    let result = match path {
        "/healthz" => Ok(health::healthz()),
        "/readyz" => Ok(health::readyz(&app).await),
        "/metrics" => Ok(health::metrics(&app)),
        "/v1/function" | "/v1/function/" => match method {
            Method::POST => functions::create(&app, req).await,
            Method::GET => functions::list(&app, uri.query()),
            _ => Err(not_allowed(&method, path, "GET, POST")),
        },
        "/v1/baseimage" | "/v1/baseimage/" => match method {
            Method::POST => images::create_base(&app, req).await,
            Method::GET => images::list_base(&app, uri.query()),
            _ => Err(not_allowed(&method, path, "GET, POST")),
        },
        "/v1/image" | "/v1/image/" => match method {
            Method::POST => images::create_image(&app, req).await,
            Method::GET => images::list_images(&app, uri.query()),
            _ => Err(not_allowed(&method, path, "GET, POST")),
        },
        "/v1/secret" | "/v1/secret/" => match method {
            Method::POST => secrets::create(&app, req).await,
            Method::GET => secrets::list(&app, uri.query()),
            _ => Err(not_allowed(&method, path, "GET, POST")),
        },
        "/v1/event" | "/v1/event/" => match method {
            Method::POST => events::emit(&app, req).await,
            _ => Err(not_allowed(&method, path, "POST")),
        },
        "/v1/event/subscriptions" | "/v1/event/subscriptions/" => match method {
            Method::POST => events::create(&app, req).await,
            Method::GET => events::list(&app, uri.query()),
            _ => Err(not_allowed(&method, path, "GET, POST")),
        },
        "/v1/api" | "/v1/api/" => match method {
            Method::POST => apis::create(&app, req).await,
            Method::GET => apis::list(&app, uri.query()),
            _ => Err(not_allowed(&method, path, "GET, POST")),
        },
        "/v1/runs" | "/v1/runs/" => match method {
            Method::POST => runs::create(&app, req, uri.query()).await,
            Method::GET => runs::list(&app, uri.query()).await,
            _ => Err(not_allowed(&method, path, "GET, POST")),
        },
        _ => {
            if let Some(name) = path.strip_prefix("/async-function/") {
                match method {
                    Method::POST => runs::submit_raw(&app, name, req).await,
                    _ => Err(not_allowed(&method, path, "POST")),
                }
            } else if let Some(name) = path.strip_prefix("/v1/event/subscriptions/") {
                match method {
                    Method::GET => events::get(&app, name),
                    Method::PUT => events::update(&app, name, req).await,
                    Method::DELETE => events::delete(&app, name).await,
                    _ => Err(not_allowed(&method, path, "GET, PUT, DELETE")),
                }
            } else if let Some(name) = path.strip_prefix("/v1/api/") {
                match method {
                    Method::GET => apis::get(&app, name),
                    Method::PUT => apis::update(&app, name, req).await,
                    Method::DELETE => apis::delete(&app, name).await,
                    _ => Err(not_allowed(&method, path, "GET, PUT, DELETE")),
                }
            } else if let Some(name) = path.strip_prefix("/v1/function/") {
                match method {
                    Method::GET => functions::get(&app, name),
                    Method::PUT => functions::update(&app, name, req).await,
                    Method::DELETE => functions::delete(&app, name).await,
                    _ => Err(not_allowed(&method, path, "GET, PUT, DELETE")),
                }
            } else if let Some(name) = path.strip_prefix("/v1/baseimage/") {
                match method {
                    Method::GET => images::get_base(&app, name),
                    Method::DELETE => images::delete_base(&app, name).await,
                    _ => Err(not_allowed(&method, path, "GET, DELETE")),
                }
            } else if let Some(name) = path.strip_prefix("/v1/image/") {
                match method {
                    Method::GET => images::get_image(&app, name),
                    Method::DELETE => images::delete_image(&app, name).await,
                    _ => Err(not_allowed(&method, path, "GET, DELETE")),
                }
            } else if let Some(name) = path.strip_prefix("/v1/secret/") {
                match method {
                    Method::GET => secrets::get(&app, name),
                    Method::PUT => secrets::update(&app, name, req).await,
                    Method::DELETE => secrets::delete(&app, name).await,
                    _ => Err(not_allowed(&method, path, "GET, PUT, DELETE")),
                }
            } else if let Some(name) = path
                .strip_prefix("/v1/runs/")
                .and_then(|rest| rest.strip_suffix("/retry"))
            {
                match method {
                    Method::POST => runs::retry(&app, name).await,
                    _ => Err(not_allowed(&method, path, "POST")),
                }
            } else if let Some(name) = path.strip_prefix("/v1/runs/") {
                match method {
                    Method::GET => runs::get(&app, name, uri.query()).await,
                    _ => Err(not_allowed(&method, path, "GET")),
                }
            } else {
                Err(Error::NotFound(format!("no such path: {path}")))
            }
        }
    };
    result.unwrap_or_else(Error::into_response)
}

fn not_allowed(method: &Method, path: &str, allowed: &str) -> Error {
    Error::MethodNotAllowed(format!(
        "{method} is not allowed on {path} (allowed: {allowed})"
    ))
}

/// A whole request body of at most `limit` bytes (413 past it).
async fn read_body(req: Request<Incoming>, limit: u64) -> Result<Bytes, Error> {
    let (parts, body) = req.into_parts();
    read_limited(&parts.headers, body, limit).await
}

/// [`read_body`] for a request already taken apart.
pub(crate) async fn read_limited(
    headers: &http::HeaderMap,
    body: Incoming,
    limit: u64,
) -> Result<Bytes, Error> {
    let too_large =
        || Error::PayloadTooLarge(format!("request body exceeds the limit of {limit} bytes"));
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    match Limited::new(body, limit as usize).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(Error::BadRequest(format!("reading the request body: {e}"))),
    }
}

/// The name in a PUT's body must be the path's (`what`, plural, cannot be renamed); an
/// empty one takes it.
fn name_from_path(given: &mut String, path_name: &str, what: &str) -> Result<(), Error> {
    if given.is_empty() {
        *given = path_name.to_string();
        return Ok(());
    }
    if given != path_name {
        return Err(Error::BadRequest(format!(
            "name: \"{given}\" does not match the path's \"{path_name}\" ({what} cannot be renamed)"
        )));
    }
    Ok(())
}

/// A JSON body; a bad one is a 400 that names the field at fault (`timeout: invalid
/// type...`, `upstream.http2: ...`) or, for malformed JSON, where it breaks.
fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8], what: &str) -> Result<T, Error> {
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { what.to_string() } else { path };
        Error::BadRequest(format!("{field}: {}", e.inner()))
    })
}

/// The `tags` filters of a query: `key=value` or `key`, every one of which must match.
fn tag_filters(query: Option<&str>) -> Result<Vec<(String, Option<String>)>, Error> {
    query_values(query, "tags")
        .into_iter()
        .map(|tag| match tag.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), Some(v.to_string()))),
            None if !tag.is_empty() => Ok((tag, None)),
            _ => Err(Error::BadRequest(format!(
                "tags: \"{tag}\" must be key=value or key"
            ))),
        })
        .collect()
}

/// Whether `tags` hold every one of the `wanted` filters (from [`tag_filters`]).
fn has_tags(tags: &[crate::model::Tag], wanted: &[(String, Option<String>)]) -> bool {
    wanted.iter().all(|(key, value)| {
        tags.iter()
            .any(|t| &t.key == key && value.as_ref().is_none_or(|v| &t.value == v))
    })
}

/// The values of query parameter `key`, decoded.
fn query_values(query: Option<&str>, key: &str) -> Vec<String> {
    form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
        .collect()
}
