//! The ingress: the HTTP and HTTPS listeners of API endpoints (what Kong did for
//! Dispatch). A request finds its API in the catalog's route table (`routes.rs`), then goes
//! through the API's own steps, each a small function below, top to bottom: CORS
//! preflight, authentication (API keys), rate limit (`limit.rs`), the request turned into
//! a run's input and `httpContext` (as Dispatch's Kong plugin did), the run through the
//! one invoker (or the queue, for `X-Dispatch-Blocking: false`), and the run turned into
//! the response: its output as JSON (200), or its error (400 for an input error, 502 for
//! a function error, 502 or 504 for the platform's).

pub mod limit;
pub mod routes;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{Map, Value, json};

use crate::api::App;
use crate::auth::{Credentials, Refusal};
use crate::body::{RespBody, json_response};
use crate::error::Error;
use crate::invoke::headers::Peer;
use crate::model::{RunErrorType, RunRequest, Status};
use limit::{Caller, RateLimits};
use routes::{Found, Route};

const CHALLENGE: &str = "Bearer realm=\"dispatch-api\"";
const CHALLENGE_INVALID: &str = "Bearer realm=\"dispatch-api\", error=\"invalid_token\"";

/// How long browsers may keep a preflight's answer.
const PREFLIGHT_MAX_AGE: &str = "600";

/// What the API listeners share beside the [`App`]: the API keys and the rate limits'
/// buckets.
pub struct Ingress {
    keys: Credentials,
    limits: RateLimits,
}

impl Ingress {
    pub fn new(keys: &[String]) -> Ingress {
        Ingress {
            keys: Credentials::new(keys.iter().map(String::as_str)),
            limits: RateLimits::default(),
        }
    }

    /// Drops the rate limits' idle buckets now and then, for as long as the app lives.
    pub fn sweep_limits(app: &Arc<App>) {
        let app = Arc::downgrade(app);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(10));
            loop {
                every.tick().await;
                let Some(app) = app.upgrade() else { return };
                app.ingress.limits.sweep(tokio::time::Instant::now());
            }
        });
    }
}

/// Serves one request to an API listener; `secure` when it came over TLS.
pub async fn handle(
    app: Arc<App>,
    req: Request<Incoming>,
    peer: &Peer,
    secure: bool,
) -> Response<RespBody> {
    let protocol = if secure { "https" } else { "http" };
    let host = host_of(&req);
    let preflight = preflight_method(&req);
    let method = preflight
        .clone()
        .unwrap_or_else(|| req.method().to_string());
    let path = req.uri().path().to_string();
    let found = app
        .registry
        .catalog
        .routes()
        .find(&host, &path, &method, protocol);
    let route = match found {
        Found::Api(route) => route,
        Found::NeedsHttps(route) => {
            return Error::UpgradeRequired(format!(
                "API \"{}\" is served over HTTPS only: call https://{host}{path}",
                route.api.name
            ))
            .into_response();
        }
        Found::MethodNotAllowed(allow) => {
            let mut resp = Error::MethodNotAllowed(format!(
                "{method} is not allowed on {path} (allowed: {})",
                allow.join(", ")
            ))
            .into_response();
            if let Ok(v) = HeaderValue::from_str(&allow.join(", ")) {
                resp.headers_mut().insert(header::ALLOW, v);
            }
            return resp;
        }
        Found::NotFound => {
            return Error::NotFound(format!("no API serves {method} {host}{path}")).into_response();
        }
    };
    let origin = route
        .api
        .cors
        .then(|| req.headers().get(header::ORIGIN).cloned())
        .flatten();
    if preflight.is_some() {
        return preflight_response(&route, &req);
    }
    let mut resp = match serve(&app, &route, req, peer).await {
        Ok(resp) => resp,
        Err(e) => e.into_response(),
    };
    if let Some(origin) = origin {
        allow_origin(resp.headers_mut(), origin);
    }
    resp
}

/// The steps of one API call after routing.
async fn serve(
    app: &App,
    route: &Route,
    req: Request<Incoming>,
    peer: &Peer,
) -> Result<Response<RespBody>, Error> {
    let api = &route.api;
    let key = authenticate(app, route, req.headers())?;
    admit(app, route, peer, key)?;
    let blocking = blocking(req.headers())?;
    let callback =
        crate::queue::callback::from_headers(req.headers()).map_err(Error::BadRequest)?;
    let (parts, body) = req.into_parts();
    let body = crate::api::read_limited(&parts.headers, body, app.config.limits.body_bytes).await?;
    let request = RunRequest {
        blocking,
        input: input_of(&parts, &body)?,
        http_context: Some(http_context(route, &parts)),
        ..RunRequest::default()
    };
    let run_name = crate::model::new_run_name().to_string();
    if !blocking {
        let run = crate::queue::submit(app, &api.function, request, run_name, callback)
            .await
            .map_err(|e| missing_function(route, e))?;
        let mut resp = json_response(StatusCode::ACCEPTED, &run);
        set_run_header(&mut resp, &run.name);
        return Ok(resp);
    }
    let run = app
        .invoker
        .run(&api.function, request, &parts.headers, run_name)
        .await
        .map_err(|e| missing_function(route, e))?;
    Ok(response_of(route, &run))
}

/// A bearer API lets in a request with one of `api.keys`; the answer names the key (for
/// rate limits by key).
fn authenticate(app: &App, route: &Route, headers: &HeaderMap) -> Result<Option<[u8; 32]>, Error> {
    if route.api.authentication != "bearer" {
        return Ok(None);
    }
    let refused = |message: String, challenge| Error::Unauthorized { message, challenge };
    match app.ingress.keys.verify(headers) {
        Ok(digest) => Ok(Some(digest)),
        Err(Refusal::Missing) => Err(refused(
            format!(
                "API \"{}\" needs an API key: `Authorization: Bearer <key>`",
                route.api.name
            ),
            CHALLENGE,
        )),
        Err(Refusal::Malformed) => Err(refused(
            "Authorization: expected `Bearer <key>`".into(),
            CHALLENGE_INVALID,
        )),
        Err(Refusal::Wrong) => Err(refused(
            format!("the API key is not valid for API \"{}\"", route.api.name),
            CHALLENGE_INVALID,
        )),
    }
}

/// The API's rate limit, for this caller: its key when limited by key, else its address.
fn admit(app: &App, route: &Route, peer: &Peer, key: Option<[u8; 32]>) -> Result<(), Error> {
    let Some(limit) = &route.api.rate_limit else {
        return Ok(());
    };
    let caller = match key {
        Some(digest) if limit.by == "key" => {
            Caller::Key(digest[..16].try_into().expect("16 of 32 bytes"))
        }
        _ => Caller::Address(peer.ip),
    };
    app.ingress
        .limits
        .admit(&route.api.name, caller, limit, tokio::time::Instant::now())
        .map_err(|wait| Error::RateLimited {
            message: format!(
                "API \"{}\" allows {} requests a second (burst {}) per {}; try again in {} ms",
                route.api.name,
                limit.per_second,
                limit.burst,
                if matches!(caller, Caller::Key(_)) {
                    "API key"
                } else {
                    "client address"
                },
                wait.as_millis().max(1)
            ),
            retry_after: wait,
        })
}

/// `X-Dispatch-Blocking: false` makes the call an async run.
fn blocking(headers: &HeaderMap) -> Result<bool, Error> {
    match headers.get("x-dispatch-blocking").map(|v| v.to_str()) {
        None => Ok(true),
        Some(Ok(v)) if v.eq_ignore_ascii_case("true") => Ok(true),
        Some(Ok(v)) if v.eq_ignore_ascii_case("false") => Ok(false),
        Some(_) => Err(Error::BadRequest(
            "X-Dispatch-Blocking: must be true or false".into(),
        )),
    }
}

/// The run's input, as Dispatch's Kong plugin made it: a JSON body as it is, a form as an
/// object, no body the query's arguments (an object; none: null). Another content type is
/// 415, bad JSON 400.
fn input_of(parts: &http::request::Parts, body: &Bytes) -> Result<Value, Error> {
    if body.is_empty() {
        return Ok(match parts.uri.query() {
            Some(q) if !q.is_empty() => form_object(q.as_bytes()),
            _ => Value::Null,
        });
    }
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if essence == "application/json" || essence.ends_with("+json") {
        return serde_json::from_slice(body)
            .map_err(|e| Error::BadRequest(format!("the body is not valid JSON: {e}")));
    }
    if essence == "application/x-www-form-urlencoded" {
        return Ok(form_object(body));
    }
    Err(Error::UnsupportedMediaType(format!(
        "Content-Type: \"{content_type}\" is not taken; send application/json or application/x-www-form-urlencoded"
    )))
}

/// `a=1&b=2&b=3` as `{"a": "1", "b": ["2", "3"]}`.
fn form_object(encoded: &[u8]) -> Value {
    let mut object = Map::new();
    for (k, v) in form_urlencoded::parse(encoded) {
        let v = Value::String(v.into_owned());
        match object.get_mut(k.as_ref()) {
            None => {
                object.insert(k.into_owned(), v);
            }
            Some(Value::Array(values)) => values.push(v),
            Some(first) => *first = Value::Array(vec![first.take(), v]),
        }
    }
    Value::Object(object)
}

/// What the function sees of the request: method, path, query, headers (the API key left
/// out of a bearer API's), host and protocol, and the API's name.
fn http_context(route: &Route, parts: &http::request::Parts) -> Value {
    let mut headers = Map::new();
    for (name, value) in &parts.headers {
        if name == header::AUTHORIZATION && route.api.authentication == "bearer" {
            continue;
        }
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        match headers.get_mut(name.as_str()) {
            Some(Value::String(first)) => {
                first.push_str(", ");
                first.push_str(&value);
            }
            _ => {
                headers.insert(name.as_str().to_string(), Value::String(value));
            }
        }
    }
    json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query().unwrap_or(""),
        "headers": headers,
        "api": route.api.name,
    })
}

/// An API whose function is gone is the platform's failure (502), not a path that does
/// not exist.
fn missing_function(route: &Route, e: Error) -> Error {
    match e {
        Error::NotFound(why) => Error::Upstream {
            function: route.api.function.clone(),
            endpoint: format!("API \"{}\"", route.api.name),
            cause: why,
        },
        other => other,
    }
}

/// A finished run as the caller of an API sees it.
fn response_of(route: &Route, run: &crate::model::Run) -> Response<RespBody> {
    let mut resp = match (&run.status, &run.error) {
        (Status::Ready, _) | (_, None) => json_response(StatusCode::OK, &run.output),
        (_, Some(error)) => {
            let status = match error.kind {
                RunErrorType::InputError => StatusCode::BAD_REQUEST,
                RunErrorType::FunctionError => StatusCode::BAD_GATEWAY,
                RunErrorType::SystemError => match run.call.as_ref().map(|c| c.http_status) {
                    Some(504) => StatusCode::GATEWAY_TIMEOUT,
                    _ => StatusCode::BAD_GATEWAY,
                },
            };
            let mut resp = json_response(
                status,
                &json!({
                    "code": status.as_u16(),
                    "message": format!(
                        "function \"{}\" (API \"{}\"): {}",
                        route.api.function, route.api.name, error.message
                    ),
                    "error": error,
                }),
            );
            let kind = match error.kind {
                RunErrorType::InputError => "input-error",
                RunErrorType::FunctionError => "function-error",
                RunErrorType::SystemError => "system-error",
            };
            resp.headers_mut()
                .insert("x-dispatch-error", HeaderValue::from_static(kind));
            resp
        }
    };
    set_run_header(&mut resp, &run.name);
    resp
}

fn set_run_header(resp: &mut Response<RespBody>, run: &str) {
    if let Ok(v) = HeaderValue::from_str(run) {
        resp.headers_mut().insert("x-dispatch-run", v);
    }
}

/// The request's host, lower case and without its port: `Host`, or the URI's authority
/// (HTTP/2).
fn host_of(req: &Request<Incoming>) -> String {
    let raw = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri().host())
        .unwrap_or("");
    let without_port = if raw.starts_with('[') {
        raw.split_once(']').map(|(h, _)| &h[1..]).unwrap_or(raw)
    } else {
        raw.rsplit_once(':').map(|(h, _)| h).unwrap_or(raw)
    };
    without_port.to_ascii_lowercase()
}

/// The method a CORS preflight asks about (`OPTIONS` with `Origin` and
/// `Access-Control-Request-Method`).
fn preflight_method(req: &Request<Incoming>) -> Option<String> {
    if req.method() != Method::OPTIONS || !req.headers().contains_key(header::ORIGIN) {
        return None;
    }
    req.headers()
        .get(header::ACCESS_CONTROL_REQUEST_METHOD)
        .and_then(|v| v.to_str().ok())
        .map(|m| m.trim().to_ascii_uppercase())
}

/// The answer to a preflight: 204 with what the API allows, when it takes CORS; 403 when
/// it does not (the browser then refuses the call).
fn preflight_response(route: &Route, req: &Request<Incoming>) -> Response<RespBody> {
    let Some(origin) = req.headers().get(header::ORIGIN).cloned() else {
        unreachable!("a preflight has an Origin");
    };
    if !route.api.cors {
        let mut resp = Error::BadRequest(format!(
            "API \"{}\" does not take cross-origin requests (cors is off)",
            route.api.name
        ))
        .into_response();
        *resp.status_mut() = StatusCode::FORBIDDEN;
        return resp;
    }
    let mut resp = Response::new(RespBody::empty());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    let h = resp.headers_mut();
    allow_origin(h, origin);
    if let Ok(v) = HeaderValue::from_str(&route.api.methods.join(", ")) {
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, v);
    }
    let asked = req
        .headers()
        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static("content-type, authorization"));
    h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked);
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static(PREFLIGHT_MAX_AGE),
    );
    resp
}

/// The CORS headers of an answer to `origin`: the origin itself, and `Vary: Origin` for
/// caches. Never `Allow-Credentials`: these APIs take API keys in a header, not cookies,
/// and a credentialed call from any origin is what CORS exists to stop.
fn allow_origin(h: &mut HeaderMap, origin: HeaderValue) {
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("x-dispatch-run, x-dispatch-error, retry-after"),
    );
    h.append(header::VARY, HeaderValue::from_static("Origin"));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str, content_type: Option<&str>) -> http::request::Parts {
        let mut req = Request::builder().uri(uri);
        if let Some(ct) = content_type {
            req = req.header(header::CONTENT_TYPE, ct);
        }
        req.body(()).unwrap().into_parts().0
    }

    #[test]
    fn inputs_from_json_forms_and_queries() {
        let json = input_of(
            &parts("/x", Some("application/json; charset=utf-8")),
            &Bytes::from_static(br#"{"a":1}"#),
        )
        .unwrap();
        assert_eq!(json, json!({"a": 1}));
        let form = input_of(
            &parts("/x", Some("application/x-www-form-urlencoded")),
            &Bytes::from_static(b"name=Jon+Snow&tag=a&tag=b"),
        )
        .unwrap();
        assert_eq!(form, json!({"name": "Jon Snow", "tag": ["a", "b"]}));
        let query = input_of(&parts("/x?name=Jon&n=1", None), &Bytes::new()).unwrap();
        assert_eq!(query, json!({"name": "Jon", "n": "1"}));
        assert_eq!(
            input_of(&parts("/x", None), &Bytes::new()).unwrap(),
            Value::Null
        );
        let bad = input_of(
            &parts("/x", Some("application/json")),
            &Bytes::from_static(b"{"),
        );
        assert!(matches!(bad, Err(Error::BadRequest(_))));
        let other = input_of(&parts("/x", Some("text/plain")), &Bytes::from_static(b"hi"));
        assert!(matches!(other, Err(Error::UnsupportedMediaType(_))));
    }
}
