//! The two body types that cross the gateway: [`ReqBody`], what we send upstream (a
//! client's body streamed through, or bytes we built), and [`RespBody`], what we answer
//! (bytes we built, or an upstream's body streamed back with the call's bookkeeping
//! attached). Both are plain enums rather than boxed trait objects: no allocation per
//! request to erase a type.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use std::sync::{Arc, Mutex};

use crate::invoke::UpstreamBody;
use crate::records::Captured;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The error a streamed request body yields once it passes the configured limit; the
/// invoker recognises it in the upstream error chain and answers 413.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds the limit of {limit} bytes")]
pub struct BodyTooLarge {
    pub limit: u64,
}

/// A body sent to an upstream.
pub enum ReqBody {
    Full(Option<Bytes>),
    /// A client's body, streamed through frame by frame. `limit` of 0 means none.
    /// `capture` keeps the first bytes for the call's record (at most its `usize`).
    Stream {
        inner: Incoming,
        seen: u64,
        limit: u64,
        capture: Option<(Arc<Mutex<Captured>>, usize)>,
    },
}

impl ReqBody {
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        ReqBody::Full(Some(bytes.into()))
    }

    pub fn stream(
        inner: Incoming,
        limit: u64,
        capture: Option<(Arc<Mutex<Captured>>, usize)>,
    ) -> Self {
        ReqBody::Stream {
            inner,
            seen: 0,
            limit,
            capture,
        }
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ReqBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ReqBody::Stream {
                inner,
                seen,
                limit,
                capture,
            } => match std::task::ready!(Pin::new(inner).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        if let Some((kept, max)) = capture
                            && let Ok(mut kept) = kept.lock()
                        {
                            kept.keep(data, *max);
                        }
                        *seen += data.len() as u64;
                        if *limit > 0 && *seen > *limit {
                            return Poll::Ready(Some(Err(Box::new(BodyTooLarge {
                                limit: *limit,
                            }))));
                        }
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Some(Err(e)) => Poll::Ready(Some(Err(Box::new(e)))),
                None => Poll::Ready(None),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Full(data) => data.is_none(),
            ReqBody::Stream { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Full(Some(d)) => SizeHint::with_exact(d.len() as u64),
            ReqBody::Full(None) => SizeHint::with_exact(0),
            ReqBody::Stream { inner, .. } => inner.size_hint(),
        }
    }
}

/// A body the gateway answers with.
pub enum RespBody {
    Full(Option<Bytes>),
    Upstream(UpstreamBody),
}

impl RespBody {
    pub fn empty() -> Self {
        RespBody::Full(None)
    }

    pub fn full(bytes: impl Into<Bytes>) -> Self {
        RespBody::Full(Some(bytes.into()))
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RespBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            RespBody::Upstream(up) => Pin::new(up).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RespBody::Full(data) => data.is_none(),
            RespBody::Upstream(up) => up.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RespBody::Full(Some(d)) => SizeHint::with_exact(d.len() as u64),
            RespBody::Full(None) => SizeHint::with_exact(0),
            RespBody::Upstream(up) => up.size_hint(),
        }
    }
}

/// A JSON response with the given status.
pub fn json_response(status: StatusCode, value: &impl serde::Serialize) -> Response<RespBody> {
    let bytes = serde_json::to_vec(value).unwrap_or_else(|e| {
        format!(r#"{{"code":500,"message":"cannot encode response: {e}"}}"#).into_bytes()
    });
    let mut resp = Response::new(RespBody::full(bytes));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// A plain-text response with the given status.
pub fn text_response(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<RespBody> {
    let mut resp = Response::new(RespBody::full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(content_type),
    );
    resp
}
