//! `POST /v1/runs?functionName=X`: a Dispatch run. Blocking runs answer 200 with the whole
//! run even when the function failed (status ERROR, `error` filled), as Dispatch does; a
//! failure of the platform itself (unreachable upstream, deadline) is also marked with
//! `X-Dispatch-Error`.

use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;

use super::{App, parse_json, query_values, read_body};
use crate::body::{RespBody, json_response};
use crate::error::Error;
use crate::model::{RunErrorType, RunRequest};

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
    if !request.blocking {
        return Err(Error::NotImplemented(
            "non-blocking runs are not available yet in this gateway; send \"blocking\": true"
                .into(),
        ));
    }
    let run = app.invoker.run(&name, request, &headers).await?;
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
