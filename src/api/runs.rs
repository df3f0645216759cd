//! Dispatch runs. `POST /v1/runs?functionName=X` runs a function: a blocking run answers
//! 200 with the whole run even when the function failed (status ERROR, `error` filled), as
//! Dispatch does; a failure of the platform itself (unreachable upstream, deadline) is also
//! marked with `X-Dispatch-Error`. `GET /v1/runs` lists recorded runs, newest first, a page
//! at a time (`limit`, and `X-Next-Cursor` to pass back as `cursor`); `GET /v1/runs/{name}`
//! shows one.

use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;

use super::{App, parse_json, query_values, read_body, tag_filters};
use crate::body::{RespBody, json_response};
use crate::error::Error;
use crate::invoke::envelope::value_of_body;
use crate::invoke::headers;
use crate::queue::callback;
use std::time::Duration;

use http::HeaderMap;
use tokio::time::Instant;

use crate::model::{Run, RunErrorType, RunRequest, Status};
use crate::store::{Claim, RunPosition, RunQuery};

/// Runs per page when the client does not say, and the most it may ask for.
const DEFAULT_LIMIT: u32 = 100;
const MAX_LIMIT: u32 = 1000;

pub async fn create(
    app: &App,
    req: Request<Incoming>,
    query: Option<&str>,
) -> Result<Response<RespBody>, Error> {
    let name = query_values(query, "functionName")
        .into_iter()
        .next()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| Error::BadRequest("functionName: required query parameter".into()))?;
    let headers = req.headers().clone();
    let body = read_body(req, app.config.limits.body_bytes).await?;
    if body.is_empty() {
        return Err(Error::BadRequest(
            "run: request body required, e.g. {\"blocking\": true, \"input\": {...}}".into(),
        ));
    }
    let request: RunRequest = parse_json(&body, "run")?;
    let run_name = crate::model::new_run_name().to_string();
    if !request.blocking {
        // Accepted once durable; the run goes on in a queue worker.
        let callback = callback::from_headers(&headers).map_err(Error::BadRequest)?;
        let run = crate::queue::submit(app, &name, request, run_name, callback).await?;
        return Ok(json_response(StatusCode::ACCEPTED, &run));
    }
    let run = match idempotency_key(&headers)? {
        None => app.invoker.run(&name, request, &headers, run_name).await?,
        Some(key) => run_once(app, &name, &key, request, &headers, run_name).await?,
    };
    let mut resp = json_response(StatusCode::OK, &run);
    if run
        .error
        .as_ref()
        .is_some_and(|e| e.kind == RunErrorType::SystemError)
    {
        resp.headers_mut()
            .insert("x-dispatch-error", HeaderValue::from_static("system-error"));
    }
    Ok(resp)
}

/// `GET /v1/runs?dead=true[&functionName=F][&limit=N]`: the async runs that ended ERROR
/// and wait in the dead letters, most recently submitted first.
async fn list_dead(
    app: &App,
    function: Option<String>,
    limit: Option<String>,
) -> Result<Response<RespBody>, Error> {
    let limit = match limit {
        None => DEFAULT_LIMIT,
        Some(v) => v
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| Error::BadRequest(format!("limit: \"{v}\" must be 1 to {MAX_LIMIT}")))?,
    };
    let mut runs = Vec::new();
    for name in app.store.dead_runs(limit).await? {
        if let Some(run) = app.store.get_run(&name).await?
            && function.as_ref().is_none_or(|f| &run.function_name == f)
        {
            runs.push(run);
        }
    }
    Ok(json_response(StatusCode::OK, &runs))
}

/// `POST /v1/runs/{name}/retry`: sends a dead run again; 202 with the run (INITIALIZED).
/// 404 for no such run, 409 for a run that is not with the dead letters.
pub async fn retry(app: &App, name: &str) -> Result<Response<RespBody>, Error> {
    match crate::queue::retry(app, name).await? {
        Some(run) => Ok(json_response(StatusCode::ACCEPTED, &run)),
        None => match app.store.get_run(name).await? {
            None => Err(Error::NotFound(format!("run \"{name}\" not found"))),
            Some(run) => Err(Error::Conflict(format!(
                "run \"{name}\" is not with the dead letters (status {}); only async runs that ended ERROR can be sent again",
                run.status.as_str()
            ))),
        },
    }
}

/// OpenFaaS' async surface: `POST /async-function/{name}` queues a run with the body as its
/// input (JSON, or else a string) and answers 202 with its name in `X-Call-Id` (the
/// caller's own, when it sent a uuid), once the run is durable. Its outcome is the run's
/// record: `GET /v1/runs/{name}`.
pub async fn submit_raw(
    app: &App,
    name: &str,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, Error> {
    let callback = callback::from_headers(req.headers()).map_err(Error::BadRequest)?;
    let given = headers::run_name_of(req.headers());
    if let Some(id) = &given
        && app.store.get_run(id).await?.is_some()
    {
        return Err(Error::Conflict(format!(
            "X-Call-Id: run \"{id}\" exists already; send a new id to run again"
        )));
    }
    let run_name = given.unwrap_or_else(|| crate::model::new_run_name().to_string());
    let method = req.method().to_string();
    let body = read_body(req, app.config.limits.body_bytes).await?;
    let request = RunRequest {
        input: value_of_body(&body),
        http_context: Some(
            serde_json::json!({"method": method, "path": format!("/async-function/{name}")}),
        ),
        ..RunRequest::default()
    };
    let run = crate::queue::submit(app, name, request, run_name, callback).await?;
    let mut resp = Response::new(RespBody::empty());
    *resp.status_mut() = StatusCode::ACCEPTED;
    resp.headers_mut().insert(
        "x-call-id",
        HeaderValue::from_str(&run.name).expect("a uuid is a header value"),
    );
    Ok(resp)
}

/// The client's `Idempotency-Key`, or else Dispatch's `X-Call-Id`.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, Error> {
    let Some((header, value)) = ["idempotency-key", "x-call-id"]
        .iter()
        .find_map(|h| headers.get(*h).map(|v| (*h, v)))
    else {
        return Ok(None);
    };
    match value.to_str() {
        Ok(key) if !key.is_empty() && key.len() <= 256 => Ok(Some(key.to_string())),
        _ => Err(Error::BadRequest(format!(
            "{header}: must be 1 to 256 visible ASCII characters"
        ))),
    }
}

/// A run asked for with an idempotency key: the first request with the key runs the
/// function; the others (concurrent or later, on any gateway sharing the store, within
/// `records.idempotency_seconds`) answer with that same run once it is recorded.
async fn run_once(
    app: &App,
    function: &str,
    key: &str,
    request: RunRequest,
    headers: &HeaderMap,
    run_name: String,
) -> Result<Run, Error> {
    // An unknown function is a 404 before any key is claimed for it.
    let timeout = app
        .registry
        .get(function)
        .map(|f| f.timeout)
        .ok_or_else(|| Error::NotFound(format!("function \"{function}\" not found")))?;
    let now_us = (crate::model::unix_now()) * 1_000_000;
    let window_us = app.config.records.idempotency_seconds as i64 * 1_000_000;
    let claim = app
        .store
        .claim_key(function, key, &run_name, now_us, now_us - window_us)
        .await?;
    match claim {
        Claim::New => {
            let ran = app
                .invoker
                .run(function, request, headers, run_name.clone())
                .await;
            if ran.is_err() {
                // It never started (not READY, limits): the key must not point at nothing.
                app.store.release_key(function, key, &run_name).await?;
            }
            ran
        }
        Claim::Existing(holder) => {
            // The first request may still be running: wait for its record, as long as a
            // run of this function can take.
            let give_up = Instant::now() + timeout + Duration::from_secs(5);
            loop {
                if let Some(run) = app.store.get_run(&holder).await? {
                    return Ok(run);
                }
                if Instant::now() >= give_up {
                    return Err(Error::Conflict(format!(
                        "run \"{holder}\" holds this idempotency key for function \"{function}\" and has not finished"
                    )));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

pub async fn list(app: &App, query: Option<&str>) -> Result<Response<RespBody>, Error> {
    let one = |key: &str| {
        query_values(query, key)
            .into_iter()
            .next()
            .filter(|v| !v.is_empty())
    };
    match one("dead").as_deref() {
        None | Some("false") => {}
        Some("true") => return list_dead(app, one("functionName"), one("limit")).await,
        Some(other) => {
            return Err(Error::BadRequest(format!(
                "dead: \"{other}\" must be true or false"
            )));
        }
    }
    let since = one("since")
        .map(|v| {
            v.parse::<i64>().ok().filter(|s| *s >= 0).ok_or_else(|| {
                Error::BadRequest(format!("since: \"{v}\" is not a unix time in seconds"))
            })
        })
        .transpose()?;
    let status = one("status")
        .map(|v| {
            serde_json::from_value::<Status>(serde_json::Value::String(v.clone())).map_err(|_| {
                Error::BadRequest(format!(
                    "status: \"{v}\" is not one of INITIALIZED, CREATING, READY, ERROR"
                ))
            })
        })
        .transpose()?;
    let limit = match one("limit") {
        None => DEFAULT_LIMIT,
        Some(v) => v
            .parse::<u32>()
            .ok()
            .filter(|l| (1..=MAX_LIMIT).contains(l))
            .ok_or_else(|| {
                Error::BadRequest(format!(
                    "limit: \"{v}\" must be a number from 1 to {MAX_LIMIT}"
                ))
            })?,
    };
    let after = one("cursor")
        .map(|v| {
            RunPosition::from_cursor(&v).ok_or_else(|| {
                Error::BadRequest(format!(
                    "cursor: \"{v}\" is not a cursor this server gave (take it from X-Next-Cursor)"
                ))
            })
        })
        .transpose()?;
    let tags = tag_filters(query)?;
    let runs = app
        .store
        .list_runs(&RunQuery {
            function_name: one("functionName"),
            since,
            status,
            tags,
            limit,
            after,
        })
        .await?;
    let next = (runs.len() == limit as usize)
        .then(|| runs.last().map(|last| RunPosition::of(last).to_cursor()))
        .flatten();
    let mut resp = json_response(StatusCode::OK, &runs);
    if let Some(next) = next {
        resp.headers_mut().insert(
            "x-next-cursor",
            HeaderValue::from_str(&next).expect("a hex cursor is a valid header value"),
        );
    }
    Ok(resp)
}

pub async fn get(app: &App, name: &str, query: Option<&str>) -> Result<Response<RespBody>, Error> {
    let wanted_function = query_values(query, "functionName").into_iter().next();
    let run = app
        .store
        .get_run(name)
        .await?
        .filter(|run| {
            wanted_function
                .as_deref()
                .is_none_or(|f| f.is_empty() || f == run.function_name)
        })
        .ok_or_else(|| Error::NotFound(format!("run \"{name}\" not found")))?;
    Ok(json_response(StatusCode::OK, &run))
}
