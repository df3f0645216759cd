//! HTTP/1.1 to upstreams, written for the proxy.
//!
//! hyper's client runs every connection in a task of its own and hands each request to it
//! over a channel, so a proxied call crosses two tasks and two wake-ups each way, and the
//! request and its futures are moved several times (docs/performance.md measured this as
//! most of what separated the gateway from nginx). Here, as in nginx, the call's own future
//! writes the request head (and a body held in memory) with one write and reads the answer's
//! head; the response body then reads straight from the socket as the server side of the
//! gateway asks for it, and the connection goes back to its pool the moment the body's last
//! byte is read. hyper stays for the gateway's server side and for h2c upstreams.
//!
//! What it speaks: requests with no body, a body in memory, or a streamed body (its length
//! when known, chunked otherwise, sent while the answer is watched for: an upstream that
//! answers early is not made to wait for the rest); answers framed by `Content-Length`,
//! chunked (trailers dropped) or the connection's end; `1xx` heads skipped. A connection is
//! reused only when both messages were complete and the upstream did not say `close`.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::pool::HostPool;
use crate::body::{BoxError, ReqBody};

/// The largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// The most header lines accepted in a response head.
const MAX_HEADERS: usize = 128;
/// What one read asks the socket for.
const READ_SIZE: usize = 16 * 1024;
/// A request body in memory up to this size is copied behind its head: one write, not two.
const COALESCE: usize = 16 * 1024;

/// One upstream connection, idle in its pool or lent to one call.
pub struct Conn {
    io: TcpStream,
    /// Bytes read and not used yet: the rest of a head, or body bytes.
    buf: BytesMut,
    /// The request head being written; kept between calls for its allocation.
    out: Vec<u8>,
    /// Whether a request went over this connection before: a failure with nothing read
    /// back may then be the upstream closing it while it sat idle.
    reused: bool,
}

/// Why a request got no answer.
pub enum Failure {
    /// The connection failed before the request was written in full; the request is
    /// unchanged and may be sent again.
    Unwritten(String),
    /// The request was written, and the connection ended before a byte of the answer came
    /// back; the request is unchanged. On a reused connection this is the upstream closing
    /// it while idle, and sending again is safe; on a new one the function may have run.
    NoAnswer(String),
    /// Anything else: the request may have reached the function, or its body was consumed.
    Failed(BoxError),
}

impl Conn {
    pub fn new(io: TcpStream) -> Self {
        Conn {
            io,
            buf: BytesMut::new(),
            out: Vec::new(),
            reused: false,
        }
    }

    pub fn is_reused(&self) -> bool {
        self.reused
    }

    /// Whether an idle connection can carry a request: the upstream has neither closed it
    /// nor sent anything unasked. Costs no system call unless the socket became readable
    /// while idle.
    pub fn is_usable(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Sends `req` and reads the answer's head. The body stays in `req` unless it was a
    /// stream, so that a [`Failure::Unwritten`] or [`Failure::NoAnswer`] request can go out
    /// again on another connection.
    pub async fn send(
        mut self,
        req: &mut Request<ReqBody>,
        pool: &Arc<HostPool>,
    ) -> Result<Response<Body>, Failure> {
        let streamed = match req.body() {
            ReqBody::Stream { inner, .. } => !inner.is_end_stream(),
            ReqBody::Full(_) => false,
        };
        let written = if streamed {
            self.send_streamed(req).await
        } else {
            self.send_in_memory(req).await
        };
        let complete = written?;
        let head = read_head(&mut self.io, &mut self.buf, req.method()).await;
        let head = match head {
            Err(HeadError::Closed(cause)) if !streamed => return Err(Failure::NoAnswer(cause)),
            Err(HeadError::Closed(cause)) => return Err(Failure::Failed(cause.into())),
            Err(HeadError::Invalid(cause)) => return Err(Failure::Failed(cause.into())),
            Ok(head) => head,
        };
        Ok(self.respond(head, complete, pool))
    }

    /// A request whose body (if any) is in memory: head and body in one write when small.
    async fn send_in_memory(&mut self, req: &Request<ReqBody>) -> Result<bool, Failure> {
        let data = match req.body() {
            ReqBody::Full(Some(data)) => Some(data.clone()),
            _ => None,
        };
        let framing = match &data {
            Some(data) => Framing::Length(data.len() as u64),
            None if needs_length(req.method()) => Framing::Length(0),
            None => Framing::None,
        };
        write_head(&mut self.out, req, framing);
        let mut rest = None;
        if let Some(data) = data {
            if data.len() <= COALESCE {
                self.out.extend_from_slice(&data);
            } else {
                rest = Some(data);
            }
        }
        let write = async {
            self.io.write_all(&self.out).await?;
            if let Some(rest) = rest {
                self.io.write_all(&rest).await?;
            }
            io::Result::Ok(())
        };
        write
            .await
            .map_err(|e| Failure::Unwritten(format!("writing the request: {e}")))?;
        Ok(true)
    }

    /// A request whose body streams from the caller: sent frame by frame while the answer is
    /// watched for. Returns whether the whole body went out (an early answer stops it, and
    /// the connection is then not reused).
    async fn send_streamed(&mut self, req: &mut Request<ReqBody>) -> Result<bool, Failure> {
        let framing = match req.body().size_hint().exact() {
            Some(n) => Framing::Length(n),
            None => Framing::Chunked,
        };
        write_head(&mut self.out, req, framing);
        let method = req.method().clone();
        let Conn { io, buf, out, .. } = self;
        let (mut rd, mut wr) = io.split();
        let sending = write_body(&mut wr, out, req.body_mut(), framing);
        let answered = wait_readable(&mut rd, buf);
        tokio::pin!(sending, answered);
        tokio::select! {
            biased;
            sent = &mut sending => {
                sent.map_err(Failure::Failed)?;
                Ok(true)
            }
            early = &mut answered => {
                // The upstream answered before taking the whole body (a 413 or a redirect):
                // its answer is read below; what was not sent never will be.
                early.map_err(|e| Failure::Failed(format!("reading the answer: {e}").into()))?;
                tracing::debug!(method = %method, "upstream answered before the request body ended");
                Ok(false)
            }
        }
    }

    /// The answer's head and a body reading the rest from this connection.
    fn respond(
        mut self,
        head: Head,
        request_complete: bool,
        pool: &Arc<HostPool>,
    ) -> Response<Body> {
        self.reused = true;
        let reusable = request_complete && head.keep_alive;
        let mut body = Body {
            conn: Some(self),
            pool: reusable.then(|| pool.clone()),
            state: head.framing,
        };
        // An answer without a body (or one already read whole) gives its connection back now.
        body.settle();
        let mut resp = Response::new(body);
        *resp.status_mut() = head.status;
        *resp.version_mut() = head.version;
        *resp.headers_mut() = head.headers;
        resp
    }
}

/// How a request body is framed on the wire.
#[derive(Clone, Copy)]
enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// Methods whose empty body is still announced with `Content-Length: 0`, as clients do.
fn needs_length(method: &Method) -> bool {
    matches!(*method, Method::POST | Method::PUT | Method::PATCH)
}

/// The request line and headers into `out`, framing headers replaced by `framing`'s.
fn write_head(out: &mut Vec<u8>, req: &Request<ReqBody>, framing: Framing) {
    out.clear();
    out.extend_from_slice(req.method().as_str().as_bytes());
    out.push(b' ');
    let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in req.headers() {
        if name == CONTENT_LENGTH || name == TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        Framing::None => {}
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa(n, &mut [0; 20]));
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
}

fn itoa(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// Writes the head in `out`, then the body frame by frame.
async fn write_body<W: AsyncWrite + Unpin>(
    wr: &mut W,
    out: &mut Vec<u8>,
    body: &mut ReqBody,
    framing: Framing,
) -> Result<(), BoxError> {
    wr.write_all(out).await?;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue; // trailers are not forwarded
        };
        if data.is_empty() {
            continue;
        }
        match framing {
            Framing::Chunked => {
                out.clear();
                out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
                if data.len() <= COALESCE {
                    out.extend_from_slice(&data);
                    out.extend_from_slice(b"\r\n");
                    wr.write_all(out).await?;
                } else {
                    wr.write_all(out).await?;
                    wr.write_all(&data).await?;
                    wr.write_all(b"\r\n").await?;
                }
            }
            _ => wr.write_all(&data).await?,
        }
    }
    if let Framing::Chunked = framing {
        wr.write_all(b"0\r\n\r\n").await?;
    }
    Ok(())
}

/// Waits until the upstream sends something (reading it into `buf`), for an answer that
/// comes before the request body has gone out.
async fn wait_readable<R: AsyncRead + Unpin>(rd: &mut R, buf: &mut BytesMut) -> io::Result<()> {
    loop {
        buf.reserve(READ_SIZE);
        if rd.read_buf(buf).await? == 0 {
            return Ok(()); // closed: the head read reports it
        }
        if !buf.is_empty() {
            return Ok(());
        }
    }
}

/// A response head, parsed.
struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    framing: State,
    keep_alive: bool,
}

enum HeadError {
    /// The connection ended before a byte of the answer.
    Closed(String),
    Invalid(String),
}

/// Reads until a final (non-1xx) response head is in `buf`, and parses it.
async fn read_head<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    method: &Method,
) -> Result<Head, HeadError> {
    let mut got_any = false;
    loop {
        if !buf.is_empty() {
            got_any = true;
            if let Some(head) = parse_head(buf, method).map_err(HeadError::Invalid)? {
                return Ok(head);
            }
        }
        if buf.capacity() - buf.len() < READ_SIZE / 4 {
            buf.reserve(READ_SIZE);
        }
        match rd.read_buf(buf).await {
            Ok(0) if got_any => {
                return Err(HeadError::Invalid(
                    "the upstream closed the connection in the middle of its answer's head".into(),
                ));
            }
            Ok(0) => {
                return Err(HeadError::Closed(
                    "the upstream closed the connection without answering".into(),
                ));
            }
            Ok(_) => {}
            Err(e) if got_any => {
                return Err(HeadError::Invalid(format!("reading the answer: {e}")));
            }
            Err(e) => return Err(HeadError::Closed(format!("reading the answer: {e}"))),
        }
    }
}

/// A final head from the front of `buf` (taken off it), `None` while incomplete. A `1xx`
/// head is dropped and the next one looked for.
fn parse_head(buf: &mut BytesMut, method: &Method) -> Result<Option<Head>, String> {
    loop {
        // Uninitialised slots: filling 128 empty headers first showed in the profile.
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut parsed,
            buf,
            &mut slots,
        ) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
                return Err(format!(
                    "the answer's head is larger than {} KiB",
                    MAX_HEAD / 1024
                ));
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(format!("invalid answer head: {e}")),
        };
        let code = parsed.code.unwrap_or(0);
        let status =
            StatusCode::from_u16(code).map_err(|_| format!("invalid answer status {code}"))?;
        if status.is_informational() {
            if status == StatusCode::SWITCHING_PROTOCOLS {
                return Err(
                    "the upstream switched protocols (101); upgrades are not proxied".into(),
                );
            }
            buf.advance(len);
            continue;
        }
        let version = if parsed.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        // Where each header sits in the head, so its value can share the head's bytes.
        let base = buf.as_ptr() as usize;
        let mut spans = Vec::with_capacity(parsed.headers.len());
        for h in parsed.headers.iter() {
            let name = HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|_| format!("invalid header name in the answer: {:?}", h.name))?;
            let start = h.value.as_ptr() as usize - base;
            spans.push((name, start, start + h.value.len()));
        }
        let head = buf.split_to(len).freeze();
        let mut headers = HeaderMap::with_capacity(spans.len());
        for (name, start, end) in spans {
            let value = HeaderValue::from_maybe_shared(head.slice(start..end))
                .map_err(|_| format!("invalid value of header {name} in the answer"))?;
            headers.append(name, value);
        }
        let (framing, length_known) = framing_of(&headers, status, method)?;
        let keep_alive = version == Version::HTTP_11
            && length_known
            && !has_token(&headers, CONNECTION, "close");
        return Ok(Some(Head {
            status,
            version,
            headers,
            framing,
            keep_alive,
        }));
    }
}

/// How the answer's body is delimited (RFC 9112 section 6.3), and whether its end can be
/// known without the connection closing.
fn framing_of(
    headers: &HeaderMap,
    status: StatusCode,
    method: &Method,
) -> Result<(State, bool), String> {
    if *method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok((State::Done, true));
    }
    if headers.contains_key(TRANSFER_ENCODING) {
        let chunked_last = headers
            .get_all(TRANSFER_ENCODING)
            .iter()
            .flat_map(|v| v.to_str().unwrap_or("").split(','))
            .map(str::trim)
            .rfind(|t| !t.is_empty())
            .is_some_and(|t| t.eq_ignore_ascii_case("chunked"));
        return Ok(if chunked_last {
            (State::Chunked(Chunk::Size), true)
        } else {
            (State::UntilClose, false)
        });
    }
    let mut length = None;
    for value in headers.get_all(CONTENT_LENGTH) {
        for part in value.to_str().unwrap_or("x").split(',') {
            let n: u64 = part
                .trim()
                .parse()
                .map_err(|_| format!("invalid Content-Length in the answer: {value:?}"))?;
            if length.is_some_and(|m| m != n) {
                return Err("the answer has two different Content-Length values".into());
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(n) => (State::Length(n), true),
        None => (State::UntilClose, false),
    })
}

fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .unwrap_or("")
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    })
}

/// Where a response body is in its framing.
#[derive(Debug, PartialEq)]
enum State {
    /// This many bytes are still to come.
    Length(u64),
    Chunked(Chunk),
    /// Everything up to the connection's end.
    UntilClose,
    Done,
}

#[derive(Debug, PartialEq)]
enum Chunk {
    /// A chunk-size line is next.
    Size,
    /// This many bytes of the current chunk are still to come.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// Trailer lines, up to an empty one.
    Trailers,
}

/// An answer's body, read from its connection as it is polled. At its end the connection
/// goes back to `pool` (when it may be reused); dropped before, the connection closes.
pub struct Body {
    conn: Option<Conn>,
    pool: Option<Arc<HostPool>>,
    state: State,
}

impl Body {
    /// Moves the framing on as far as the bytes already read allow. Returns a data frame
    /// when one is ready and `take_data` says to take it; without it, this stops before
    /// data, and only passes framing (a chunk's CRLF, the last chunk, trailers) so that
    /// the end is seen as early as possible.
    fn step(&mut self, take_data: bool) -> Result<Option<Bytes>, String> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(None);
        };
        let buf = &mut conn.buf;
        loop {
            match &mut self.state {
                State::Done => return Ok(None),
                State::Length(0) => self.state = State::Done,
                State::Length(rest) => {
                    if buf.is_empty() || !take_data {
                        return Ok(None);
                    }
                    let n = (*rest).min(buf.len() as u64) as usize;
                    *rest -= n as u64;
                    let data = buf.split_to(n).freeze();
                    if *rest == 0 {
                        self.state = State::Done;
                    }
                    return Ok(Some(data));
                }
                State::UntilClose => {
                    if buf.is_empty() || !take_data {
                        return Ok(None);
                    }
                    return Ok(Some(buf.split().freeze()));
                }
                State::Chunked(chunk) => match chunk {
                    Chunk::Size => {
                        let Some(line) = take_line(buf)? else {
                            return Ok(None);
                        };
                        let size = chunk_size(&line)?;
                        *chunk = if size == 0 {
                            Chunk::Trailers
                        } else {
                            Chunk::Data(size)
                        };
                    }
                    Chunk::Data(rest) => {
                        if buf.is_empty() || !take_data {
                            return Ok(None);
                        }
                        let n = (*rest).min(buf.len() as u64) as usize;
                        *rest -= n as u64;
                        if *rest == 0 {
                            *chunk = Chunk::DataEnd;
                        }
                        return Ok(Some(buf.split_to(n).freeze()));
                    }
                    Chunk::DataEnd => {
                        if buf.len() < 2 {
                            return Ok(None);
                        }
                        if &buf[..2] != b"\r\n" {
                            return Err("a chunk of the answer does not end with CRLF".into());
                        }
                        buf.advance(2);
                        *chunk = Chunk::Size;
                    }
                    Chunk::Trailers => {
                        let Some(line) = take_line(buf)? else {
                            return Ok(None);
                        };
                        if line.is_empty() {
                            self.state = State::Done;
                        }
                    }
                },
            }
        }
    }

    /// Passes the framing the bytes already read allow, and gives the connection back if
    /// that reaches the end. A framing error is left for the next poll to report.
    fn settle(&mut self) {
        if self.step(false).is_ok() {
            self.release_if_done();
        }
    }

    fn release_if_done(&mut self) {
        if self.state != State::Done {
            return;
        }
        if let (Some(conn), Some(pool)) = (self.conn.take(), self.pool.take())
            && conn.buf.is_empty()
        {
            pool.put_idle(conn);
        }
    }
}

/// One CRLF-ended line off the front of `buf`, without its CRLF; `None` while incomplete.
fn take_line(buf: &mut BytesMut) -> Result<Option<BytesMut>, String> {
    match buf.iter().position(|&b| b == b'\n') {
        Some(i) => {
            let mut line = buf.split_to(i + 1);
            line.truncate(i);
            if line.last() == Some(&b'\r') {
                line.truncate(i - 1);
            }
            Ok(Some(line))
        }
        None if buf.len() > 4096 => Err("a chunk line of the answer is longer than 4 KiB".into()),
        None => Ok(None),
    }
}

fn chunk_size(line: &[u8]) -> Result<u64, String> {
    let digits = line
        .split(|&b| b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| u64::from_str_radix(s, 16).ok())
        .ok_or_else(|| {
            format!(
                "invalid chunk size in the answer: {:?}",
                String::from_utf8_lossy(line)
            )
        })
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            match this.step(true) {
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e.into())));
                }
                Ok(Some(data)) => {
                    this.settle();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(None) if this.state == State::Done => {
                    this.release_if_done();
                    return Poll::Ready(None);
                }
                Ok(None) => {}
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            if conn.buf.capacity() - conn.buf.len() < READ_SIZE / 4 {
                conn.buf.reserve(READ_SIZE);
            }
            let read = std::task::ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut conn.io),
                cx,
                &mut conn.buf
            ));
            match read {
                Ok(0) if this.state == State::UntilClose => {
                    this.state = State::Done;
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(
                        "the upstream closed the connection before the end of its answer".into(),
                    )));
                }
                Ok(_) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(format!("reading the answer: {e}").into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.state == State::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Length(n) => SizeHint::with_exact(n),
            State::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::config::Config;
    use crate::drivers::Target;
    use crate::invoke::pool::{Pools, SendError};
    use crate::metrics::Metrics;

    /// What a scripted upstream does with the n-th request on a connection: the pieces to
    /// write (with a pause between them), then whether to close.
    type Script = fn(conn: usize, request: usize) -> (Vec<&'static [u8]>, bool);

    /// An upstream that reads request heads (bodies are not expected) and answers from
    /// `script`. Counts the connections it accepted.
    async fn upstream(script: Script) -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let conn = count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream, conn, script));
            }
        });
        (addr, accepted)
    }

    async fn serve(mut stream: TcpStream, conn: usize, script: Script) {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        for request in 0.. {
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
            }
            seen.clear();
            let (pieces, close) = script(conn, request);
            for piece in pieces {
                stream.write_all(piece).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if close {
                return;
            }
        }
    }

    fn pool(addr: &str) -> (Pools, Arc<HostPool>) {
        let pools = Pools::new(Config::defaults().upstream, Arc::new(Metrics::new()));
        let pool = pools.get(
            &Target {
                origin: format!("http://{addr}"),
                authority: addr.to_string(),
                path_prefix: String::new(),
            },
            false,
        );
        (pools, pool)
    }

    fn request(method: Method, body: Option<&'static str>) -> Request<ReqBody> {
        let mut req = Request::new(ReqBody::Full(
            body.map(|b| Bytes::from_static(b.as_bytes())),
        ));
        *req.method_mut() = method;
        *req.uri_mut() = "/x".parse().unwrap();
        req
    }

    async fn call(pool: &Arc<HostPool>, method: Method) -> Result<(u16, String), String> {
        match pool.send(request(method, None)).await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let body = resp
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| e.to_string())?;
                Ok((
                    status,
                    String::from_utf8_lossy(&body.to_bytes()).into_owned(),
                ))
            }
            Err(SendError::Failed(e)) => Err(e.to_string()),
            Err(SendError::NotSent { cause, .. }) => Err(cause),
        }
    }

    #[tokio::test]
    async fn a_chunked_answer_in_pieces_is_read_whole_and_its_connection_reused() {
        let (addr, accepted) = upstream(|_, _| {
            (
                vec![
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhel",
                    b"lo\r\n",
                    b"7\r\n, world\r\n0\r\n",
                    b"trailer: x\r\n\r\n",
                ],
                false,
            )
        })
        .await;
        let (_pools, pool) = pool(&addr);
        for _ in 0..3 {
            assert_eq!(
                call(&pool, Method::GET).await,
                Ok((200, "hello, world".into()))
            );
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn informational_heads_are_skipped() {
        let (addr, _) = upstream(|_, _| {
            (
                vec![
                    b"HTTP/1.1 100 Continue\r\n\r\n",
                    b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok",
                ],
                false,
            )
        })
        .await;
        let (_pools, pool) = pool(&addr);
        assert_eq!(call(&pool, Method::POST).await, Ok((201, "ok".into())));
    }

    #[tokio::test]
    async fn an_answer_without_length_ends_with_its_connection_which_is_not_reused() {
        let (addr, accepted) =
            upstream(|_, _| (vec![b"HTTP/1.1 200 OK\r\n\r\nuntil", b" the end"], true)).await;
        let (_pools, pool) = pool(&addr);
        for _ in 0..2 {
            assert_eq!(
                call(&pool, Method::GET).await,
                Ok((200, "until the end".into()))
            );
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_body_cut_short_is_an_error() {
        let (addr, _) = upstream(|_, _| {
            (
                vec![b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort"],
                true,
            )
        })
        .await;
        let (_pools, pool) = pool(&addr);
        let err = call(&pool, Method::GET).await.unwrap_err();
        assert!(err.contains("before the end of its answer"), "{err}");
    }

    #[tokio::test]
    async fn an_invalid_head_is_an_error_naming_it() {
        let (addr, _) = upstream(|_, _| (vec![b"HTTP/1.1 abc\r\n\r\n"], true)).await;
        let (_pools, pool) = pool(&addr);
        let err = call(&pool, Method::GET).await.unwrap_err();
        assert!(err.contains("invalid answer head"), "{err}");
    }

    /// The first connection answers once, then drops the second request unanswered (as an
    /// upstream closing an idle connection does); later connections answer everything.
    fn closes_when_reused(conn: usize, request: usize) -> (Vec<&'static [u8]>, bool) {
        if conn == 0 && request == 1 {
            return (vec![], true);
        }
        (
            vec![b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"],
            false,
        )
    }

    #[tokio::test]
    async fn an_idempotent_request_on_a_connection_closed_under_it_goes_out_again() {
        let (addr, accepted) = upstream(closes_when_reused).await;
        let (_pools, pool) = pool(&addr);
        assert_eq!(call(&pool, Method::GET).await, Ok((200, "ok".into())));
        assert_eq!(call(&pool, Method::GET).await, Ok((200, "ok".into())));
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_post_on_a_connection_closed_under_it_is_not_sent_twice() {
        let (addr, accepted) = upstream(closes_when_reused).await;
        let (_pools, pool) = pool(&addr);
        assert_eq!(call(&pool, Method::POST).await, Ok((200, "ok".into())));
        let err = call(&pool, Method::POST).await.unwrap_err();
        assert!(
            err.contains("closed the connection without answering"),
            "{err}"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_request_head_carries_its_framing() {
        let mut out = Vec::new();
        let mut req = request(Method::POST, Some("hello"));
        req.headers_mut()
            .insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        req.headers_mut()
            .insert("x-a", HeaderValue::from_static("1"));
        write_head(&mut out, &req, Framing::Length(5));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /x HTTP/1.1\r\nx-a: 1\r\ncontent-length: 5\r\n\r\n"
        );
    }

    #[test]
    fn chunk_sizes_parse_with_extensions_and_refuse_garbage() {
        assert_eq!(chunk_size(b"1a"), Ok(26));
        assert_eq!(chunk_size(b"A;name=value"), Ok(10));
        assert!(chunk_size(b"zz").is_err());
        assert!(chunk_size(b"").is_err());
    }

    #[test]
    fn two_different_lengths_are_refused() {
        let mut headers = HeaderMap::new();
        headers.append(CONTENT_LENGTH, HeaderValue::from_static("3"));
        headers.append(CONTENT_LENGTH, HeaderValue::from_static("4"));
        assert!(framing_of(&headers, StatusCode::OK, &Method::GET).is_err());
    }
}
