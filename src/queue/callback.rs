//! OpenFaaS' `X-Callback-Url`: when an async run ends, its answer is POSTed to the URL the
//! caller gave, with `X-Call-Id`, `X-Function-Status`, `X-Function-Name` and
//! `X-Duration-Seconds`. A callback that fails (no connection, no answer in time, a status
//! of 500 or more) is tried again with backoff; its failure is written on the run.
//! `https://` URLs are checked against the system's trust store (rustls-native-certs, so
//! `SSL_CERT_FILE` / `SSL_CERT_DIR` can point elsewhere), loaded once.

use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Uri};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::model::Run;

/// Where a run's answer goes, as the caller asked.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Callback {
    pub url: String,
}

/// The caller's `X-Callback-Url`, checked (see [`parse`]); `None` when it sent none.
pub fn from_headers(headers: &http::HeaderMap) -> Result<Option<Callback>, String> {
    headers
        .get("x-callback-url")
        .map(|url| parse(url.to_str().unwrap_or_default()))
        .transpose()
}

/// Checks a callback URL when the run is submitted, so a bad one is a 400 then, not a
/// failure later.
pub fn parse(url: &str) -> Result<Callback, String> {
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("X-Callback-Url: \"{url}\" is not a URL ({e})"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => {
            return Err(format!(
                "X-Callback-Url: \"{url}\" must be an http:// or https:// URL"
            ));
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("X-Callback-Url: \"{url}\" has no host"));
    }
    Ok(Callback {
        url: url.to_string(),
    })
}

/// Tries the callback `attempts` times (waiting 200 ms, then twice as long each time);
/// says why it failed in the end, if it did.
pub async fn deliver(callback: &Callback, run: &Run, attempts: u32) -> Result<(), String> {
    let mut last = String::new();
    for attempt in 0..attempts {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(200 << (attempt - 1).min(8))).await;
        }
        match tokio::time::timeout(Duration::from_secs(10), post(callback, run)).await {
            Ok(Ok(status)) if status < 500 => return Ok(()),
            Ok(Ok(status)) => last = format!("it answered HTTP {status}"),
            Ok(Err(e)) => last = e,
            Err(_) => last = "no answer within 10 s".into(),
        }
    }
    Err(format!(
        "callback to {} failed after {attempts} attempts: {last}",
        callback.url
    ))
}

/// The body a callback carries, and its type: the function's output as the raw surface
/// would have answered it (a string as is, anything else as JSON), or its error.
fn body_of(run: &Run) -> (Bytes, &'static str) {
    const JSON: &str = "application/json";
    match (&run.error, &run.output) {
        (Some(error), _) => (serde_json::to_vec(error).unwrap_or_default().into(), JSON),
        (None, serde_json::Value::String(text)) => {
            (Bytes::from(text.clone()), "text/plain; charset=utf-8")
        }
        (None, output) => (serde_json::to_vec(output).unwrap_or_default().into(), JSON),
    }
}

async fn post(callback: &Callback, run: &Run) -> Result<u16, String> {
    let uri: Uri = callback.url.parse().map_err(|e| format!("{e}"))?;
    let secure = uri.scheme_str() == Some("https");
    // An IPv6 literal comes in brackets, which neither connect nor TLS names take.
    let host = uri
        .host()
        .unwrap_or_default()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
    let stream = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let call = run.call.clone().unwrap_or_default();
    let status = if run.error.is_some() && call.http_status < 400 {
        500
    } else {
        call.http_status
    };
    let authority = uri
        .authority()
        .map(|a| a.as_str().to_string())
        .unwrap_or_default();
    let target = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let (body, content_type) = body_of(run);
    let req = Request::builder()
        .method(Method::POST)
        .uri(target)
        .header(http::header::HOST, authority)
        .header(http::header::CONTENT_TYPE, content_type)
        .header("x-call-id", run.name.as_str())
        .header("x-function-status", status.to_string())
        .header("x-function-name", run.function_name.as_str())
        .header(
            "x-duration-seconds",
            HeaderValue::from_str(&format!("{:.6}", call.duration_ms / 1e3))
                .unwrap_or(HeaderValue::from_static("0")),
        )
        .body(Full::new(body))
        .map_err(|e| format!("{e}"))?;
    if !secure {
        return send(stream, req).await;
    }
    let name = rustls::pki_types::ServerName::try_from(host.clone())
        .map_err(|_| format!("\"{host}\" is not a name TLS can check"))?;
    let tls = connector()?
        .connect(name, stream)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    send(tls, req).await
}

/// One request over a connection made (plain or TLS); the answer's status.
async fn send<IO>(io: IO, req: Request<Full<Bytes>>) -> Result<u16, String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.map_err(|e| format!("{e}"))?;
    Ok(resp.status().as_u16())
}

/// The TLS client of https callbacks: the system's trusted certificates, read at the
/// first https callback (an error then stays, as the store would not change).
fn connector() -> Result<TlsConnector, String> {
    static CONNECTOR: OnceLock<Result<TlsConnector, String>> = OnceLock::new();
    CONNECTOR
        .get_or_init(|| crate::tls::connector(crate::tls::Trust::System))
        .clone()
}
