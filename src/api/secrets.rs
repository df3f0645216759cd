//! Secrets (Dispatch v0.1.24): `POST /v1/secret` (201), `GET /v1/secret[?tags=k=v]`,
//! `GET /v1/secret/{name}`, `PUT /v1/secret/{name}` (201, as Dispatch's spec says),
//! `DELETE /v1/secret/{name}` (204). Values go in and never come out: every answer shows
//! a secret's keys with `********` for each value, and no log line names a value. Runs
//! read the values from the catalog, updated here after each write.

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use super::{App, has_tags, parse_json, read_body, tag_filters};
use crate::body::{RespBody, json_response};
use crate::error::Error;
use crate::model::{Secret, new_id, unix_now};

async fn parse(app: &App, req: Request<Incoming>) -> Result<Secret, Error> {
    let body = read_body(req, app.config.limits.body_bytes).await?;
    if body.is_empty() {
        return Err(Error::BadRequest("secret: request body required".into()));
    }
    // A bad value must not be echoed back in the message (serde quotes what it got).
    parse_json(&body, "secret").map_err(|e| match e {
        Error::BadRequest(m) if m.starts_with("secrets.") => {
            let field = m.split(':').next().unwrap_or("secrets");
            Error::BadRequest(format!("{field}: must be a string"))
        }
        e => e,
    })
}

pub async fn create(app: &App, req: Request<Incoming>) -> Result<Response<RespBody>, Error> {
    let mut secret = parse(app, req).await?;
    secret.validate()?;
    let now = unix_now();
    secret.id = new_id().to_string();
    secret.kind = "Secret".into();
    secret.created_time = now;
    secret.modified_time = now;
    let _serial = app.writes.lock().await;
    app.store.create_secret(&secret).await?;
    let shown = secret.public();
    app.registry.catalog.put_secret(secret);
    tracing::info!(secret = %shown.name, "secret created");
    Ok(json_response(StatusCode::CREATED, &shown))
}

pub fn list(app: &App, query: Option<&str>) -> Result<Response<RespBody>, Error> {
    let wanted = tag_filters(query)?;
    let all: Vec<Secret> = app
        .registry
        .catalog
        .secrets()
        .iter()
        .filter(|s| has_tags(&s.tags, &wanted))
        .map(|s| s.public())
        .collect();
    Ok(json_response(StatusCode::OK, &all))
}

pub fn get(app: &App, name: &str) -> Result<Response<RespBody>, Error> {
    let secret = app
        .registry
        .catalog
        .secret(name)
        .ok_or_else(|| Error::NotFound(format!("secret \"{name}\" not found")))?;
    Ok(json_response(StatusCode::OK, &secret.public()))
}

/// Replaces the secret's values and tags.
pub async fn update(
    app: &App,
    name: &str,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, Error> {
    let mut secret = parse(app, req).await?;
    super::name_from_path(&mut secret.name, name, "secrets")?;
    secret.validate()?;
    let _serial = app.writes.lock().await;
    let current = app
        .registry
        .catalog
        .secret(name)
        .ok_or_else(|| Error::NotFound(format!("secret \"{name}\" not found")))?;
    secret.id = current.id.clone();
    secret.kind = "Secret".into();
    secret.created_time = current.created_time;
    secret.modified_time = unix_now();
    app.store.update_secret(&secret).await?;
    let shown = secret.public();
    app.registry.catalog.put_secret(secret);
    tracing::info!(secret = %name, "secret updated");
    Ok(json_response(StatusCode::CREATED, &shown))
}

pub async fn delete(app: &App, name: &str) -> Result<Response<RespBody>, Error> {
    let _serial = app.writes.lock().await;
    app.store.delete_secret(name).await?;
    app.registry.catalog.remove_secret(name);
    tracing::info!(secret = %name, "secret deleted");
    let mut resp = Response::new(RespBody::empty());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    Ok(resp)
}
