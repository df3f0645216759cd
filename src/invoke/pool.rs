//! Upstream connections, pooled per endpoint.
//!
//! Each endpoint (`http://host:port`) has its own [`HostPool`]: a short list of idle
//! HTTP/1.1 connections ([`h1::Conn`]) behind that endpoint's own mutex (held for a push or
//! a pop, never across an await), or one shared HTTP/2 connection (hyper's) for h2c
//! upstreams. There is no global
//! lock: hyper-util's legacy client keeps every host's pool behind one mutex and opens extra
//! connections under bursts (hyper#4134); here a call takes an idle connection if there is
//! one and opens a new one otherwise, and a connection goes back to its pool when the
//! response body has been read to the end.
//!
//! The pool also carries what the balancer needs per endpoint: the calls in flight and
//! whether the endpoint is ejected after refusing connections.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use http::{HeaderValue, Method, Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{TrySendError, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use super::h1::{self, Failure};
use crate::body::{BoxError, ReqBody};
use crate::config::UpstreamConfig;
use crate::drivers::Target;
use crate::metrics::{EndpointMetrics, Metrics};

/// Milliseconds since the first call, never 0 (0 means "not ejected").
fn clock_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// Every endpoint's pool, shared by all functions that use the endpoint (every function
/// behind one OpenFaaS gateway shares that gateway's connections).
pub struct Pools {
    by_origin: DashMap<(String, bool), Arc<HostPool>>,
    settings: Arc<UpstreamConfig>,
    metrics: Arc<Metrics>,
}

impl Pools {
    pub fn new(settings: UpstreamConfig, metrics: Arc<Metrics>) -> Self {
        Pools {
            by_origin: DashMap::new(),
            settings: Arc::new(settings),
            metrics,
        }
    }

    /// The pool of `target`, created on first use.
    pub fn get(&self, target: &Target, http2: bool) -> Arc<HostPool> {
        self.by_origin
            .entry((target.origin.clone(), http2))
            .or_insert_with(|| {
                Arc::new(HostPool {
                    origin: target.origin.as_str().into(),
                    host: HeaderValue::from_str(&target.authority)
                        .unwrap_or_else(|_| HeaderValue::from_static("localhost")),
                    connect_to: target.authority.clone(),
                    http2,
                    inflight: AtomicUsize::new(0),
                    ejected_until: AtomicU64::new(0),
                    idle: Mutex::new(Vec::new()),
                    shared_h2: Mutex::new(None),
                    h2_connecting: tokio::sync::Mutex::new(()),
                    settings: self.settings.clone(),
                    metrics: self.metrics.for_endpoint(&target.origin),
                })
            })
            .clone()
    }

    /// Closes the pools no function uses any more.
    pub fn sweep(&self) {
        self.by_origin.retain(|_, pool| Arc::strong_count(pool) > 1);
    }
}

/// One endpoint: its idle connections, its in-flight count and its ejection state.
pub struct HostPool {
    /// `http://host:port`, for metrics, logs, errors and run records (shared, not copied,
    /// by each recorded call).
    pub origin: Arc<str>,
    /// The `Host` header sent upstream.
    pub host: HeaderValue,
    connect_to: String,
    http2: bool,
    /// Calls on this endpoint whose response has not been read to the end: the
    /// least-in-flight balancer compares these.
    inflight: AtomicUsize,
    /// Until when (see [`clock_ms`]) the endpoint is skipped after refusing a connection.
    ejected_until: AtomicU64,
    /// Idle HTTP/1.1 connections, most recently used last (taken first: a warm connection
    /// is reused and the others age out).
    idle: Mutex<Vec<Idle>>,
    /// The one HTTP/2 connection of an h2c endpoint, cloned per call.
    shared_h2: Mutex<Option<http2::SendRequest<ReqBody>>>,
    /// Held while an h2c connection is being opened, so that a burst of calls on a cold
    /// endpoint waits for one connection instead of each opening its own.
    h2_connecting: tokio::sync::Mutex<()>,
    settings: Arc<UpstreamConfig>,
    metrics: EndpointMetrics,
}

impl Drop for HostPool {
    /// A pool no function uses any more: its idle connections close with it.
    fn drop(&mut self) {
        let idle = self.idle.get_mut().map(|v| v.len()).unwrap_or(0);
        self.metrics.idle.sub(idle as i64);
    }
}

struct Idle {
    conn: h1::Conn,
    since: Instant,
}

/// Why a request could not be sent.
pub enum SendError {
    /// Nothing reached the upstream; the request comes back so it can be tried elsewhere.
    NotSent {
        /// Boxed: the error path is rare and the `Result` of every call stays small.
        request: Box<Request<ReqBody>>,
        cause: String,
        /// The endpoint refused or did not answer a new connection (grounds for ejection).
        connect_failed: bool,
    },
    /// The request may have reached the function: it must not be sent again.
    Failed(BoxError),
}

/// An upstream's answer body: read straight from an HTTP/1.1 connection (which goes back
/// to its pool at the body's end), or a stream of the shared h2c connection.
pub enum UpBody {
    H1(h1::Body),
    H2(Incoming),
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpBody::H1(body) => Pin::new(body).poll_frame(cx),
            UpBody::H2(body) => Pin::new(body)
                .poll_frame(cx)
                .map_err(|e| Box::new(e) as BoxError),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpBody::H1(body) => body.is_end_stream(),
            UpBody::H2(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpBody::H1(body) => body.size_hint(),
            UpBody::H2(body) => body.size_hint(),
        }
    }
}

/// Methods a request of which may go out again when a reused connection turns out to have
/// been closed by the upstream (RFC 9110 9.2.2), as nginx does.
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS | Method::TRACE
    )
}

impl HostPool {
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    pub fn start_call(&self) {
        self.inflight.fetch_add(1, Ordering::Relaxed);
    }

    pub fn end_call(&self) {
        self.inflight.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn is_ejected(&self) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && clock_ms() < until
    }

    /// Sets the endpoint aside for the configured time, after it refused a connection.
    pub fn eject(&self) {
        let until = clock_ms() + self.settings.eject_for().as_millis() as u64;
        self.ejected_until.store(until, Ordering::Relaxed);
        self.metrics.ejections.inc();
    }

    /// Sends `request` on an idle connection, or on a new one when none is idle.
    pub async fn send(
        self: &Arc<Self>,
        request: Request<ReqBody>,
    ) -> Result<Response<UpBody>, SendError> {
        if self.http2 {
            return Box::pin(self.send_h2(request)).await;
        }
        let mut request = request;
        loop {
            let conn = match self.take_idle() {
                Some(conn) => conn,
                // Boxed: connecting is rare, and its future would otherwise make every
                // call's bigger.
                None => match Box::pin(self.connect_h1()).await {
                    Ok(conn) => conn,
                    Err(cause) => {
                        return Err(SendError::NotSent {
                            request: Box::new(request),
                            cause,
                            connect_failed: true,
                        });
                    }
                },
            };
            let reused = conn.is_reused();
            match conn.send(&mut request, self).await {
                Ok(resp) => return Ok(resp.map(UpBody::H1)),
                // A reused connection the upstream closed while it sat idle: the next one.
                Err(Failure::Unwritten(_)) if reused => continue,
                Err(Failure::NoAnswer(_)) if reused && is_idempotent(request.method()) => continue,
                Err(Failure::Unwritten(cause)) => {
                    return Err(SendError::NotSent {
                        request: Box::new(request),
                        cause,
                        connect_failed: false,
                    });
                }
                Err(Failure::NoAnswer(cause)) => return Err(SendError::Failed(cause.into())),
                Err(Failure::Failed(e)) => return Err(SendError::Failed(e)),
            }
        }
    }

    async fn send_h2(
        self: &Arc<Self>,
        request: Request<ReqBody>,
    ) -> Result<Response<UpBody>, SendError> {
        let mut sender = match self.live_h2() {
            Some(sender) => sender,
            None => match Box::pin(self.connect_shared_h2()).await {
                Ok(sender) => sender,
                Err(cause) => {
                    return Err(SendError::NotSent {
                        request: Box::new(request),
                        cause,
                        connect_failed: true,
                    });
                }
            },
        };
        if let Err(e) = sender.ready().await {
            return Err(SendError::NotSent {
                request: Box::new(request),
                cause: e.to_string(),
                connect_failed: false,
            });
        }
        let sent = sender.try_send_request(request).await;
        outcome(sent)
    }

    fn live_h2(&self) -> Option<http2::SendRequest<ReqBody>> {
        self.shared_h2
            .lock()
            .expect("pool lock")
            .as_ref()
            .filter(|s| !s.is_closed())
            .cloned()
    }

    /// The shared h2c connection, opened by the first caller that finds none; the others
    /// wait for it.
    async fn connect_shared_h2(&self) -> Result<http2::SendRequest<ReqBody>, String> {
        let _one_at_a_time = self.h2_connecting.lock().await;
        if let Some(sender) = self.live_h2() {
            return Ok(sender);
        }
        let sender = self.connect_h2().await?;
        *self.shared_h2.lock().expect("pool lock") = Some(sender.clone());
        Ok(sender)
    }

    fn take_idle(&self) -> Option<h1::Conn> {
        let max_age = self.settings.idle_timeout();
        let mut idle = self.idle.lock().expect("pool lock");
        while let Some(entry) = idle.pop() {
            self.metrics.idle.dec();
            if entry.conn.is_usable() && entry.since.elapsed() < max_age {
                return Some(entry.conn);
            }
        }
        None
    }

    /// Takes back a connection whose last answer was read to the end.
    pub(super) fn put_idle(&self, conn: h1::Conn) {
        let now = Instant::now();
        let max_age = self.settings.idle_timeout();
        let mut idle = self.idle.lock().expect("pool lock");
        // The oldest sit at the front; drop one that aged out so they do not pile up.
        if idle
            .first()
            .is_some_and(|e| now.duration_since(e.since) >= max_age)
        {
            idle.remove(0);
            self.metrics.idle.dec();
        }
        if idle.len() < self.settings.pool_max_idle {
            idle.push(Idle { conn, since: now });
            self.metrics.idle.inc();
        }
    }

    async fn connect_tcp(&self) -> Result<TcpStream, String> {
        let timeout = self.settings.connect_timeout();
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(&self.connect_to)).await
        {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(format!("connect: {e}")),
            Err(_) => {
                return Err(format!(
                    "connect: no answer within {} ms",
                    timeout.as_millis()
                ));
            }
        };
        let _ = stream.set_nodelay(true);
        self.metrics.opened.inc();
        Ok(stream)
    }

    async fn connect_h1(&self) -> Result<h1::Conn, String> {
        Ok(h1::Conn::new(self.connect_tcp().await?))
    }

    async fn connect_h2(&self) -> Result<http2::SendRequest<ReqBody>, String> {
        let io = TokioIo::new(self.connect_tcp().await?);
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .handshake(io)
            .await
            .map_err(|e| format!("h2c handshake: {e}"))?;
        tokio::spawn(conn);
        Ok(sender)
    }
}

/// An h2c answer, or the request back if it was never written (the connection closed
/// first), or a final error if it may have been.
fn outcome(
    sent: Result<Response<Incoming>, TrySendError<Request<ReqBody>>>,
) -> Result<Response<UpBody>, SendError> {
    match sent {
        Ok(resp) => Ok(resp.map(UpBody::H2)),
        Err(mut e) => match e.take_message() {
            Some(back) => Err(SendError::NotSent {
                request: Box::new(back),
                cause: e.error().to_string(),
                connect_failed: false,
            }),
            None => Err(SendError::Failed(Box::new(e.into_error()))),
        },
    }
}
