//! API endpoints (Dispatch's API manager): `POST /v1/api` (200, as Dispatch's CLI
//! expects), `GET /v1/api`, `GET|PUT|DELETE /v1/api/{name}` (200). An API says which
//! requests to the ingress listeners run which function (see `ingress/`). APIs live in
//! the store and in the catalog, whose route table every gateway sharing the store
//! recompiles on each change. An API that would match the same requests as another is
//! refused with 409 naming it.

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use super::{App, has_tags, parse_json, read_body, tag_filters};
use crate::body::{RespBody, json_response};
use crate::error::Error;
use crate::ingress::routes;
use crate::model::{Api, Status, new_id, unix_now};

async fn parse(app: &App, req: Request<Incoming>) -> Result<Api, Error> {
    let body = read_body(req, app.config.limits.body_bytes).await?;
    if body.is_empty() {
        return Err(Error::BadRequest("api: request body required".into()));
    }
    parse_json(&body, "api")
}

/// Checks a new or changed API: its fields, its function, and that no other API takes
/// the same requests.
fn check(app: &App, api: &mut Api) -> Result<(), Error> {
    api.normalize()?;
    if app.registry.get(&api.function).is_none() {
        return Err(Error::BadRequest(format!(
            "function: \"{}\" not found",
            api.function
        )));
    }
    let others = app.registry.catalog.apis();
    if let Some(other) = routes::conflict(api, &others) {
        return Err(Error::Conflict(format!(
            "API \"{}\" would match the same requests as API \"{other}\" (same host, path and method over a shared protocol)",
            api.name
        )));
    }
    Ok(())
}

pub async fn create(app: &App, req: Request<Incoming>) -> Result<Response<RespBody>, Error> {
    let mut api = parse(app, req).await?;
    let _serial = app.writes.lock().await;
    if app.registry.catalog.api(&api.name).is_some() {
        return Err(Error::Conflict(format!(
            "API \"{}\" already exists",
            api.name
        )));
    }
    check(app, &mut api)?;
    let now = unix_now();
    api.id = new_id().to_string();
    api.kind = "API".into();
    api.status = Status::Ready;
    api.created_time = now;
    api.modified_time = now;
    crate::store::create_api(&*app.store, &api).await?;
    app.registry.catalog.put_api(api.clone());
    tracing::info!(api = %api.name, function = %api.function, uris = ?api.uris, "API created");
    Ok(json_response(StatusCode::OK, &api))
}

pub fn list(app: &App, query: Option<&str>) -> Result<Response<RespBody>, Error> {
    let wanted = tag_filters(query)?;
    let all: Vec<Api> = app
        .registry
        .catalog
        .apis()
        .into_iter()
        .filter(|a| has_tags(&a.tags, &wanted))
        .collect();
    Ok(json_response(StatusCode::OK, &all))
}

fn current(app: &App, name: &str) -> Result<Api, Error> {
    app.registry
        .catalog
        .api(name)
        .ok_or_else(|| Error::NotFound(format!("API \"{name}\" not found")))
}

pub fn get(app: &App, name: &str) -> Result<Response<RespBody>, Error> {
    Ok(json_response(StatusCode::OK, &current(app, name)?))
}

pub async fn update(
    app: &App,
    name: &str,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, Error> {
    let mut api = parse(app, req).await?;
    super::name_from_path(&mut api.name, name, "APIs")?;
    let _serial = app.writes.lock().await;
    let was = current(app, name)?;
    check(app, &mut api)?;
    api.id = was.id;
    api.kind = "API".into();
    api.status = Status::Ready;
    api.created_time = was.created_time;
    api.modified_time = unix_now();
    crate::store::update_api(&*app.store, &api).await?;
    app.registry.catalog.put_api(api.clone());
    tracing::info!(api = %name, "API updated");
    Ok(json_response(StatusCode::OK, &api))
}

pub async fn delete(app: &App, name: &str) -> Result<Response<RespBody>, Error> {
    let _serial = app.writes.lock().await;
    let mut was = current(app, name)?;
    app.store
        .delete_document(crate::store::CatalogKind::Api, name)
        .await?;
    app.registry.catalog.remove_api(name);
    tracing::info!(api = %name, "API deleted");
    was.status = Status::Deleted;
    Ok(json_response(StatusCode::OK, &was))
}
