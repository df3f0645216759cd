//! `/healthz` (the process is alive), `/readyz` (the store answers and the server is not
//! shutting down) and `/metrics` (Prometheus text format).

use std::sync::atomic::Ordering;

use http::{Response, StatusCode};

use super::App;
use crate::body::{RespBody, json_response, text_response};

pub fn healthz() -> Response<RespBody> {
    text_response(StatusCode::OK, "text/plain", "ok\n")
}

pub async fn readyz(app: &App) -> Response<RespBody> {
    let store = app.store.ping().await;
    let accepting = app.accepting.load(Ordering::Acquire);
    let ready = store.is_ok() && accepting;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(
        status,
        &serde_json::json!({
            "ready": ready,
            "store": match &store { Ok(()) => "ok".to_string(), Err(e) => e.to_string() },
            "listener": if accepting { "accepting" } else { "shutting down" },
            "functions": app.registry.len(),
        }),
    )
}

pub fn metrics(app: &App) -> Response<RespBody> {
    app.invoker.recorder().update_pending();
    text_response(
        StatusCode::OK,
        "text/plain; version=0.0.4; charset=utf-8",
        app.metrics.render(),
    )
}
