//! The control API for functions (Dispatch v0.1.24): `POST /v1/function` (201),
//! `GET /v1/function[?tags=k=v]`, `GET|PUT|DELETE /v1/function/{name}`. Writes go to the
//! store first, then to the registry the hot path reads.

use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use super::{App, has_tags, parse_json, read_body, tag_filters};
use crate::body::{RespBody, json_response};
use crate::config::LocalStart;
use crate::drivers::local::LocalSpec;
use crate::error::Error;
use crate::model::{Function, Status, unix_now};

fn parse(body: &[u8]) -> Result<Function, Error> {
    if body.is_empty() {
        return Err(Error::BadRequest("function: request body required".into()));
    }
    parse_json(body, "function")
}

pub async fn create(app: &Arc<App>, req: Request<Incoming>) -> Result<Response<RespBody>, Error> {
    let mut function = parse(&read_body(req, app.config.limits.body_bytes).await?)?;
    let now = unix_now();
    function.id = crate::model::new_id().to_string();
    function.kind = "Function".into();
    function.created_time = now;
    function.modified_time = now;
    function.status = initial_status(&function);
    function.reason.clear();
    let _serial = app.writes.lock().await;
    let entry = app.registry.prepare(function)?;
    app.store.create_function(&entry.spec).await?;
    let shown = entry.spec.clone().public();
    let build = entry.local.clone();
    app.registry.insert(entry);
    tracing::info!(function = %shown.name, "function created");
    if let Some(spec) = build {
        tokio::spawn(build_local(app.clone(), spec));
    }
    Ok(json_response(StatusCode::CREATED, &shown))
}

/// A function of the local driver is CREATING until its source is unpacked and its handler
/// loads; the others are READY at once.
fn initial_status(function: &Function) -> Status {
    match function.upstream {
        Some(_) => Status::Ready,
        None => Status::Creating,
    }
}

/// Unpacks a local function's source and loads its handler once, then makes it READY, or
/// ERROR with the reason (no such file, no such function, a syntax error and its line).
/// A function changed or deleted meanwhile is left alone: its own build decides.
async fn build_local(app: Arc<App>, spec: LocalSpec) {
    let supervisor = &app.supervisor;
    // With `local.start = "registration"` (the default, as Dispatch deployed a function when
    // it was created) the function's processes start now, and their loading the handler is
    // the check; with "first-call" a process of its own only loads it and exits.
    let outcome = match spec.unpack().await {
        Ok(()) => match supervisor.config().start {
            LocalStart::Registration => supervisor.warm(&spec).await,
            LocalStart::FirstCall => {
                spec.check(
                    supervisor.config(),
                    supervisor.runtimes(),
                    supervisor.files(),
                )
                .await
            }
        },
        Err(why) => Err(why),
    };
    let _serial = app.writes.lock().await;
    let Some(mut function) = app
        .registry
        .get(&spec.function)
        .filter(|current| current.local.as_ref() == Some(&spec))
        .map(|current| current.spec.clone())
    else {
        // Changed or deleted meanwhile: processes started for this spec are not wanted.
        supervisor.forget_spec(&spec);
        return;
    };
    match &outcome {
        Ok(()) => {
            function.status = Status::Ready;
            function.reason.clear();
        }
        Err(why) => {
            function.status = Status::Error;
            function.reason = vec![why.clone()];
        }
    }
    let entry = match app.registry.prepare(function) {
        Ok(entry) => entry,
        Err(e) => {
            tracing::warn!(function = %spec.function, error = %e, "local function not built");
            return;
        }
    };
    if let Err(e) = app.store.update_function(&entry.spec).await {
        tracing::warn!(function = %spec.function, error = %e, "local function built, status not stored");
        return;
    }
    app.registry.insert(entry);
    drop(_serial);
    match outcome {
        Ok(()) => {
            tracing::info!(function = %spec.function, runtime = spec.runtime.as_str(), "function READY")
        }
        Err(why) => {
            supervisor.forget_spec(&spec);
            tracing::warn!(function = %spec.function, reason = %why, "function ERROR")
        }
    }
}

pub fn list(app: &App, query: Option<&str>) -> Result<Response<RespBody>, Error> {
    let wanted = tag_filters(query)?;
    let functions: Vec<Function> = app
        .registry
        .list()
        .into_iter()
        .filter(|f| has_tags(&f.tags, &wanted))
        .map(Function::public)
        .collect();
    Ok(json_response(StatusCode::OK, &functions))
}

pub fn get(app: &App, name: &str) -> Result<Response<RespBody>, Error> {
    let entry = app
        .registry
        .get(name)
        .ok_or_else(|| Error::NotFound(format!("function \"{name}\" not found")))?;
    Ok(json_response(StatusCode::OK, &entry.spec.clone().public()))
}

pub async fn update(
    app: &Arc<App>,
    name: &str,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, Error> {
    let mut function = parse(&read_body(req, app.config.limits.body_bytes).await?)?;
    let _serial = app.writes.lock().await;
    // Only what the update keeps: holding the old entry would keep its pools from closing.
    let (id, created_time) = app
        .registry
        .get(name)
        .map(|current| (current.spec.id.clone(), current.spec.created_time))
        .ok_or_else(|| Error::NotFound(format!("function \"{name}\" not found")))?;
    super::name_from_path(&mut function.name, name, "functions")?;
    function.id = id;
    function.kind = "Function".into();
    function.created_time = created_time;
    function.modified_time = unix_now();
    function.status = initial_status(&function);
    function.reason.clear();
    let entry = app.registry.prepare(function)?;
    app.store.update_function(&entry.spec).await?;
    let shown = entry.spec.clone().public();
    let build = entry.local.clone();
    app.registry.insert(entry);
    tracing::info!(function = %name, "function updated");
    match build {
        Some(spec) => {
            tokio::spawn(build_local(app.clone(), spec));
        }
        None => app.supervisor.forget(name),
    }
    Ok(json_response(StatusCode::OK, &shown))
}

pub async fn delete(app: &App, name: &str) -> Result<Response<RespBody>, Error> {
    let _serial = app.writes.lock().await;
    // Its spec only: an entry held here would keep its connection pools open.
    let Some(existing) = app.registry.get(name).map(|e| e.spec.clone()) else {
        return Err(Error::NotFound(format!("function \"{name}\" not found")));
    };
    app.store.delete_function(name).await?;
    // The store's change feed may have taken it out of the registry already (on
    // PostgreSQL the notification of this very delete can arrive first).
    let removed = app.registry.remove(name).unwrap_or(existing);
    let mut shown = removed.public();
    shown.status = Status::Deleted;
    tracing::info!(function = %name, "function deleted");
    Ok(json_response(StatusCode::OK, &shown))
}
