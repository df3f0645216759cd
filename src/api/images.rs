//! Base images and images (Dispatch v0.1.24): `POST /v1/baseimage` (201),
//! `GET /v1/baseimage[?tags=k=v]`, `GET|DELETE /v1/baseimage/{name}`; the same for
//! `/v1/image`. An image's language comes from its base image, and its status says
//! whether this machine can run it: READY when the runtime's interpreter is found. Writes
//! go to the store first, then to the catalog.

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use super::{App, has_tags, parse_json, read_body, tag_filters};
use crate::body::{RespBody, json_response};
use crate::error::Error;
use crate::model::{BaseImage, Image, Status, new_id, unix_now};

async fn parse<T: serde::de::DeserializeOwned>(
    app: &App,
    req: Request<Incoming>,
    what: &str,
) -> Result<T, Error> {
    let body = read_body(req, app.config.limits.body_bytes).await?;
    if body.is_empty() {
        return Err(Error::BadRequest(format!("{what}: request body required")));
    }
    parse_json(&body, what)
}

pub async fn create_base(app: &App, req: Request<Incoming>) -> Result<Response<RespBody>, Error> {
    let mut base: BaseImage = parse(app, req, "baseImage").await?;
    base.validate()?;
    let now = unix_now();
    base.id = new_id().to_string();
    base.kind = "BaseImage".into();
    base.created_time = now;
    base.modified_time = now;
    // Nothing to pull: the local driver runs the language's runtime, and for OpenFaaS the
    // dockerUrl is recorded only.
    base.status = Status::Ready;
    base.reason.clear();
    let _serial = app.writes.lock().await;
    app.store.create_base_image(&base).await?;
    app.registry.catalog.put_base_image(base.clone());
    tracing::info!(base_image = %base.name, "base image created");
    Ok(json_response(StatusCode::CREATED, &base))
}

pub fn list_base(app: &App, query: Option<&str>) -> Result<Response<RespBody>, Error> {
    let wanted = tag_filters(query)?;
    let all: Vec<BaseImage> = app
        .registry
        .catalog
        .base_images()
        .into_iter()
        .filter(|b| has_tags(&b.tags, &wanted))
        .collect();
    Ok(json_response(StatusCode::OK, &all))
}

pub fn get_base(app: &App, name: &str) -> Result<Response<RespBody>, Error> {
    let base = app
        .registry
        .catalog
        .base_image(name)
        .ok_or_else(|| Error::NotFound(format!("base image \"{name}\" not found")))?;
    Ok(json_response(StatusCode::OK, &base))
}

pub async fn delete_base(app: &App, name: &str) -> Result<Response<RespBody>, Error> {
    let _serial = app.writes.lock().await;
    let catalog = &app.registry.catalog;
    let Some(existing) = catalog.base_image(name) else {
        return Err(Error::NotFound(format!("base image \"{name}\" not found")));
    };
    let users = catalog.images_of(name);
    if !users.is_empty() {
        return Err(Error::Conflict(format!(
            "base image \"{name}\" is used by images {}: delete them first",
            quoted(&users)
        )));
    }
    app.store.delete_base_image(name).await?;
    let mut shown = catalog.remove_base_image(name).unwrap_or(existing);
    shown.status = Status::Deleted;
    tracing::info!(base_image = %name, "base image deleted");
    Ok(json_response(StatusCode::OK, &shown))
}

pub async fn create_image(app: &App, req: Request<Incoming>) -> Result<Response<RespBody>, Error> {
    let mut image: Image = parse(app, req, "image").await?;
    image.validate()?;
    let now = unix_now();
    image.id = new_id().to_string();
    image.kind = "Image".into();
    image.created_time = now;
    image.modified_time = now;
    let _serial = app.writes.lock().await;
    let catalog = &app.registry.catalog;
    // As Dispatch's image manager: an unknown base image is a bad request.
    if catalog.base_image(&image.base_image_name).is_none() {
        return Err(Error::BadRequest(format!(
            "baseImageName: base image \"{}\" not found",
            image.base_image_name
        )));
    }
    catalog.evaluate(&mut image);
    app.store.create_image(&image).await?;
    catalog.put_image(image.clone());
    tracing::info!(image = %image.name, status = image.status.as_str(), "image created");
    Ok(json_response(StatusCode::CREATED, &image))
}

pub fn list_images(app: &App, query: Option<&str>) -> Result<Response<RespBody>, Error> {
    let wanted = tag_filters(query)?;
    let all: Vec<Image> = app
        .registry
        .catalog
        .images()
        .into_iter()
        .filter(|i| has_tags(&i.tags, &wanted))
        .collect();
    Ok(json_response(StatusCode::OK, &all))
}

pub fn get_image(app: &App, name: &str) -> Result<Response<RespBody>, Error> {
    let image = app
        .registry
        .catalog
        .image(name)
        .ok_or_else(|| Error::NotFound(format!("image \"{name}\" not found")))?;
    Ok(json_response(StatusCode::OK, &image))
}

pub async fn delete_image(app: &App, name: &str) -> Result<Response<RespBody>, Error> {
    let _serial = app.writes.lock().await;
    let catalog = &app.registry.catalog;
    let Some(existing) = catalog.image(name) else {
        return Err(Error::NotFound(format!("image \"{name}\" not found")));
    };
    app.store.delete_image(name).await?;
    let mut shown = catalog.remove_image(name).unwrap_or(existing);
    shown.status = Status::Deleted;
    tracing::info!(image = %name, "image deleted");
    Ok(json_response(StatusCode::OK, &shown))
}

/// `"a", "b"`.
fn quoted(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("\"{n}\""))
        .collect::<Vec<_>>()
        .join(", ")
}
