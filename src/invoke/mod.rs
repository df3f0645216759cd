//! The invoker: the one path every call takes, whatever surface it came in on (the
//! OpenFaaS `/function/*` proxy and Dispatch `POST /v1/runs` today; async workers, API
//! endpoints and events later). It reads top to bottom in fixed phases:
//!
//! 1. **resolve**: the function by name from the registry (404 unknown, 404 not READY);
//! 2. **admit**: a slot under the function's `maxInflight`, waiting in a bounded queue (429);
//! 3. **forward**: pick an endpoint (least in flight), take a pooled connection,
//!    send under the deadline; only failures to connect are tried again elsewhere (502, 504);
//! 4. **respond**: stream the upstream's answer back as is ([`Invoker::proxy`]), or read it
//!    into a Dispatch [`Run`] ([`Invoker::run`]);
//! 5. **record**: when the call ends (the response body read to the end, or dropped), its
//!    [`CallGuard`] counts it in the metrics and frees its slot. Run records join here.

pub mod balance;
pub mod envelope;
pub mod h1;
pub mod headers;
pub mod limit;
pub mod pool;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, Sleep};

use crate::body::{BodyTooLarge, BoxError, ReqBody, RespBody};
use crate::config::LimitsConfig;
use crate::drivers::local::LocalSpec;
use crate::error::{Error, error_chain};
use crate::metrics::Rejection;
use crate::model::{
    CallFacts, RecordMode, Run, RunError, RunErrorType, RunRequest, Status, unix_now,
};
use crate::records::{Captured, RawCall, Recorder};
use crate::registry::{FunctionEntry, Registry};
use crate::supervisor::{Lease, LeaseError, Supervisor};
use balance::Endpoint;
use pool::{SendError, UpBody};

pub struct Invoker {
    registry: Arc<Registry>,
    limits: LimitsConfig,
    connect_attempts: u32,
    recorder: Recorder,
    supervisor: Arc<Supervisor>,
}

/// One call in flight. Created when the call is admitted; dropped when it ends, which is
/// when it is recorded (phase 5).
pub struct CallGuard {
    function: Arc<FunctionEntry>,
    /// The function's concurrency slot, freed on drop.
    _permit: Option<OwnedSemaphorePermit>,
    started: Instant,
    /// The status the caller got: the upstream's, or the gateway's own error status.
    code: u16,
    /// The endpoint whose in-flight count this call holds.
    endpoint: Option<Arc<pool::HostPool>>,
    /// A local function's call: its slot on a runtime process.
    lease: Option<Lease>,
}

impl CallGuard {
    fn on_endpoint(&mut self, endpoint: &Arc<pool::HostPool>) {
        self.leave_endpoint();
        endpoint.start_call();
        self.endpoint = Some(endpoint.clone());
    }

    fn leave_endpoint(&mut self) {
        if let Some(endpoint) = self.endpoint.take() {
            endpoint.end_call();
        }
    }

    /// Notes the status a failed call answers with, for the metrics. A local call past its
    /// deadline takes its runtime process down: nothing else stops a handler that loops.
    fn fail(&mut self, e: Error) -> Error {
        self.code = e.status().as_u16();
        if let (Error::Timeout { .. }, Some(lease)) = (&e, &self.lease) {
            lease.kill();
        }
        e
    }

    /// Phase 5: what is left to do once the call is over.
    fn record(&mut self) {
        self.leave_endpoint();
        let metrics = &self.function.metrics;
        metrics.inflight.dec();
        metrics.observe(self.code, self.started.elapsed());
    }
}

impl CallGuard {
    /// How the runtime process of a local call ended, if it did: a process that crashes
    /// closes its connections a moment before its exit is seen, so this waits briefly.
    async fn runtime_exit(&self) -> Option<String> {
        let lease = self.lease.as_ref()?;
        for _ in 0..20 {
            if let Some(exit) = lease.exit() {
                return Some(exit.to_string());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.record();
    }
}

impl Invoker {
    pub fn new(
        registry: Arc<Registry>,
        limits: LimitsConfig,
        connect_attempts: u32,
        recorder: Recorder,
        supervisor: Arc<Supervisor>,
    ) -> Self {
        Invoker {
            registry,
            limits,
            connect_attempts,
            recorder,
            supervisor,
        }
    }

    /// The OpenFaaS surface: `req` goes to function `name` with `rest` (what follows
    /// `/function/{name}`: a path suffix and the query, either may be empty) appended to the
    /// endpoint's path, and the upstream's answer streams
    /// back. Errors become responses here, with the call id.
    pub async fn proxy(
        &self,
        name: &str,
        rest: &str,
        req: Request<Incoming>,
        peer: &headers::Peer,
    ) -> Response<RespBody> {
        let started = Instant::now();
        let mut call_id = headers::call_id(req.headers());
        let mut resp = match self
            .proxy_inner(name, rest, req, peer, &mut call_id, started)
            .await
        {
            Ok(resp) => resp,
            Err(e) => {
                if e.status().is_server_error() {
                    tracing::warn!(function = name, error = %e, "call failed");
                }
                e.into_response()
            }
        };
        resp.headers_mut()
            .insert(headers::X_CALL_ID.clone(), call_id);
        resp
    }

    /// Where runs and raw calls are recorded.
    pub fn recorder(&self) -> &Recorder {
        &self.recorder
    }

    async fn proxy_inner(
        &self,
        name: &str,
        rest: &str,
        req: Request<Incoming>,
        peer: &headers::Peer,
        call_id: &mut HeaderValue,
        started: Instant,
    ) -> Result<Response<RespBody>, Error> {
        let function = self.resolve(name)?;
        if function.local.is_some() {
            return Box::pin(self.proxy_local(&function, rest, req, call_id)).await;
        }
        let now_ns = unix_nanos();
        // What a record of this call needs from the request, taken before it moves on.
        let recording = (function.record != RecordMode::None).then(|| {
            let captured = (!req.body().is_end_stream())
                .then(|| Arc::new(std::sync::Mutex::new(Captured::default())));
            Recording {
                mode: function.record,
                recorder: self.recorder.clone(),
                call: RawCall {
                    function_name: function.record_name.clone(),
                    function_id: function.record_id.clone(),
                    call_id: call_id.clone(),
                    method: req.method().clone(),
                    uri: req.uri().clone(),
                    started_us: (now_ns / 1_000) as i64,
                    duration: Duration::ZERO,
                    status: 0,
                    endpoint: None,
                    request: captured,
                    response: Captured::default(),
                    failure: None,
                    complete: false,
                },
            }
        });
        let sent = self
            .proxy_call(
                &function,
                rest,
                req,
                peer,
                call_id,
                started,
                now_ns,
                recording.as_ref(),
            )
            .await;
        match sent {
            Ok((resp, call, timer)) => {
                Ok(self.respond_raw(call, resp, started, now_ns, timer, recording))
            }
            Err((e, endpoint)) => {
                if let Some(mut rec) = recording {
                    rec.call.status = e.status().as_u16();
                    rec.call.duration = started.elapsed();
                    rec.call.endpoint = endpoint;
                    rec.call.failure = Some(e.to_string());
                    rec.call.complete = true;
                    rec.recorder.record_raw(rec.call);
                }
                Err(e)
            }
        }
    }

    /// A raw call to a local function, whose runtime speaks the pod contract: the body
    /// (JSON, or else taken as a string) becomes a Dispatch run's input, and the run's output
    /// comes back as JSON; a function error is 500 with the error (400 for bad input), as an
    /// OpenFaaS function that fails answers. The call is recorded as the run it is.
    async fn proxy_local(
        &self,
        function: &FunctionEntry,
        rest: &str,
        req: Request<Incoming>,
        call_id: &mut HeaderValue,
    ) -> Result<Response<RespBody>, Error> {
        let (parts, body) = req.into_parts();
        let limit = self.limits.body_bytes;
        let body = http_body_util::Limited::new(body, limit as usize)
            .collect()
            .await
            .map_err(
                |e| match e.downcast_ref::<http_body_util::LengthLimitError>() {
                    Some(_) => Error::PayloadTooLarge(format!(
                        "function \"{}\": request body exceeds the limit of {limit} bytes",
                        function.spec.name
                    )),
                    None => Error::BadRequest(format!("reading the request body: {e}")),
                },
            )?
            .to_bytes();
        let input = envelope::value_of_body(&body);
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let request = RunRequest {
            blocking: true,
            input,
            http_context: Some(serde_json::json!({
                "method": parts.method.as_str(),
                "path": path,
                "query": query,
            })),
            ..RunRequest::default()
        };
        let run_name = headers::run_name_of(&parts.headers)
            .unwrap_or_else(|| crate::model::new_run_name().to_string());
        let run = self
            .run(&function.spec.name, request, &parts.headers, run_name)
            .await?;
        // The call's id is the run's name, so the caller can read it back
        // (`GET /v1/runs/{X-Call-Id}`): a caller's id that is not a uuid gives way.
        *call_id = HeaderValue::from_str(&run.name).expect("a uuid is a header value");
        Ok(match &run.error {
            None => crate::body::json_response(http::StatusCode::OK, &run.output),
            Some(error) => {
                let status = match error.kind {
                    RunErrorType::InputError => http::StatusCode::BAD_REQUEST,
                    _ => http::StatusCode::INTERNAL_SERVER_ERROR,
                };
                crate::body::json_response(status, error)
            }
        })
    }

    /// Phases 2 and 3 of a raw call. A failure comes with the endpoint it happened on.
    #[allow(clippy::too_many_arguments)]
    async fn proxy_call(
        &self,
        function: &Arc<FunctionEntry>,
        rest: &str,
        req: Request<Incoming>,
        peer: &headers::Peer,
        call_id: &HeaderValue,
        started: Instant,
        now_ns: u128,
        recording: Option<&Recording>,
    ) -> Result<(Response<UpBody>, CallGuard, Pin<Box<Sleep>>), (Error, Option<Arc<str>>)> {
        let limit = self.limits.raw_body_bytes;
        if limit > 0 && content_length(req.headers()).is_some_and(|n| n > limit) {
            return Err((self.too_large(function, limit, started), None));
        }
        let deadline = started + function.timeout;
        let mut call = self
            .admit(function, started, deadline)
            .await
            .map_err(|e| (e, None))?;

        let start_time = HeaderValue::from(now_ns as u64);
        let (mut parts, body) = req.into_parts();
        headers::to_upstream(&mut parts.headers, peer, call_id, &start_time);
        let capture = recording
            .and_then(|r| r.call.request.clone())
            .map(|c| (c, self.recorder.body_bytes()));
        let body = match &function.schema_in {
            None => ReqBody::stream(body, limit, capture),
            Some(schema) => match self
                .read_checked(function, schema, body, capture, deadline)
                .await
            {
                Ok(checked) => ReqBody::full(checked),
                Err(e) => return Err((call.fail(e), None)),
            },
        };
        let upstream_req = Request::from_parts(parts, body);
        // One timer for the whole call: it bounds the wait for the head, then the body.
        let mut timer = Box::pin(tokio::time::sleep_until(deadline));
        match self
            .forward(&mut call, upstream_req, rest, &mut timer)
            .await
        {
            Ok(resp) => Ok((resp, call, timer)),
            Err(e) => {
                let endpoint = call.endpoint.as_ref().map(|p| p.origin.clone());
                Err((e, endpoint))
            }
        }
    }

    /// The body of a raw call to a function with `schema.in`: read whole (at most
    /// `limits.body_bytes`, and `limits.raw_body_bytes` when set), within the deadline,
    /// and checked; a body that is not JSON or fails the schema is a 400 saying why.
    async fn read_checked(
        &self,
        function: &FunctionEntry,
        schema: &crate::schema::Schema,
        body: Incoming,
        capture: Option<(Arc<std::sync::Mutex<Captured>>, usize)>,
        deadline: Instant,
    ) -> Result<Bytes, Error> {
        let name = &function.spec.name;
        let limit = match self.limits.raw_body_bytes {
            0 => self.limits.body_bytes,
            raw => raw.min(self.limits.body_bytes),
        };
        let read = http_body_util::Limited::new(body, limit as usize).collect();
        let bytes = match tokio::time::timeout_at(deadline, read).await {
            Err(_) => {
                return Err(Error::BadRequest(format!(
                    "function \"{name}\": the request body did not arrive within the deadline"
                )));
            }
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                function.metrics.reject(Rejection::TooLarge);
                return Err(Error::PayloadTooLarge(format!(
                    "function \"{name}\": request body exceeds the limit of {limit} bytes"
                )));
            }
            Ok(Err(e)) => {
                return Err(Error::BadRequest(format!(
                    "function \"{name}\": reading the request body: {e}"
                )));
            }
            Ok(Ok(collected)) => collected.to_bytes(),
        };
        if let Some((kept, max)) = capture
            && let Ok(mut kept) = kept.lock()
        {
            kept.keep(&bytes, max);
        }
        let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
            Error::BadRequest(format!(
                "function \"{name}\": the body is not JSON, and schema.in needs JSON: {e}"
            ))
        })?;
        schema.check(&value).map_err(|why| {
            Error::BadRequest(format!(
                "function \"{name}\": body does not match schema.in: {why}"
            ))
        })?;
        Ok(bytes)
    }

    /// The Dispatch surface: one blocking run of function `name`. A function that failed,
    /// timed out or could not be reached still gives a run (status ERROR, `error` filled);
    /// only a call that never started (unknown function, limits) is an `Err`.
    pub async fn run(
        &self,
        name: &str,
        request: RunRequest,
        client_headers: &HeaderMap,
        run_name: String,
    ) -> Result<Run, Error> {
        let run = self
            .execute(name, request, client_headers, run_name)
            .await?;
        self.record(run.clone()).await;
        Ok(run)
    }

    /// Phases 1 to 4 of a Dispatch run, without its record: what [`Invoker::run`] and the
    /// async workers (which decide on retries before recording) share.
    pub async fn execute(
        &self,
        name: &str,
        mut request: RunRequest,
        client_headers: &HeaderMap,
        run_name: String,
    ) -> Result<Run, Error> {
        let started = Instant::now();
        let started_us = crate::model::unix_micros();
        let function = self.resolve(name)?;
        let deadline = started + function.timeout;
        let mut call = self.admit(&function, started, deadline).await?;

        let mut run = Run {
            name: run_name,
            function_name: function.spec.name.clone(),
            function_id: function.spec.id.clone(),
            blocking: true,
            executed_time: unix_now(),
            secrets: function.spec.secrets.clone(),
            tags: std::mem::take(&mut request.tags),
            ..Run::default()
        };
        run.secrets.extend(std::mem::take(&mut request.secrets));
        let outcome = match self.check_run(&function, &request.input, &run.secrets) {
            Err(refused) => {
                call.code = 400;
                Ok(envelope::Outcome {
                    error: Some(refused),
                    ..envelope::Outcome::default()
                })
            }
            Ok(secrets) => self
                .call_run(
                    &mut call,
                    &request,
                    &secrets,
                    &run.name,
                    client_headers,
                    deadline,
                )
                .await
                .map(|outcome| check_output(&function, outcome)),
        };
        match outcome {
            Ok(outcome) => {
                run.output = outcome.output;
                run.logs = outcome.logs;
                run.error = outcome.error;
            }
            Err(e) => {
                tracing::warn!(function = name, run = %run.name, error = %e, "run failed");
                let e = call.fail(e);
                run.error = Some(RunError::system(e.to_string()));
            }
        }
        run.input = request.input;
        run.event = request.event;
        run.http_context = request.http_context;
        run.finished_time = unix_now();
        match &run.error {
            None => run.status = Status::Ready,
            Some(error) => {
                run.status = Status::Error;
                run.reason = vec![error.message.clone()];
            }
        }
        run.call = Some(CallFacts {
            call_id: run.name.clone(),
            http_status: call.code,
            duration_ms: started.elapsed().as_secs_f64() * 1e3,
            endpoint: call
                .endpoint
                .as_ref()
                .map(|e| e.origin.to_string())
                .unwrap_or_default(),
            started_us,
            ..CallFacts::default()
        });
        Ok(run)
    }

    /// What a run needs before its function is called: input that passes `schema.in`,
    /// and the values of the secrets it names. Either failing ends the run with an
    /// InputError, without calling the function.
    fn check_run(
        &self,
        function: &FunctionEntry,
        input: &serde_json::Value,
        secrets: &[String],
    ) -> Result<serde_json::Map<String, serde_json::Value>, RunError> {
        if let Some(schema) = &function.schema_in {
            schema
                .check(input)
                .map_err(|why| RunError::input(format!("input does not match schema.in: {why}")))?;
        }
        self.registry
            .catalog
            .secret_values(secrets)
            .map_err(RunError::input)
    }

    /// Phases 3 and 4 of a Dispatch run: the envelope sent to the function, its answer read.
    async fn call_run(
        &self,
        call: &mut CallGuard,
        request: &RunRequest,
        secrets: &serde_json::Map<String, serde_json::Value>,
        run_name: &str,
        client_headers: &HeaderMap,
        deadline: Instant,
    ) -> Result<envelope::Outcome, Error> {
        let function = call.function.clone();
        let body = envelope::encode(
            function.protocol,
            &request.input,
            &envelope::Context {
                deadline_unix_ms: (unix_nanos() / 1_000_000) as u64
                    + function.timeout.as_millis() as u64,
                event: request.event.as_ref(),
                http_context: request.http_context.as_ref(),
                secrets,
            },
        );
        let mut upstream_req = Request::new(ReqBody::full(body));
        *upstream_req.method_mut() = Method::POST;
        let h = upstream_req.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(
            headers::X_CALL_ID.clone(),
            HeaderValue::from_str(run_name).expect("uuid"),
        );
        h.insert(
            headers::TRACEPARENT.clone(),
            client_headers
                .get(&headers::TRACEPARENT)
                .cloned()
                .unwrap_or_else(headers::new_traceparent),
        );

        let mut timer = Box::pin(tokio::time::sleep_until(deadline));
        let resp = self.forward(call, upstream_req, "", &mut timer).await?;
        self.respond_run(call, resp, &mut timer).await
    }

    /// Phase 5 for a Dispatch run: its record, written off the hot path (this waits only
    /// when the writer is behind by `records.queue` runs).
    async fn record(&self, run: Run) {
        self.recorder.record(run).await;
    }

    /// Phase 1: the function, if it exists and is READY.
    pub fn resolve(&self, name: &str) -> Result<Arc<FunctionEntry>, Error> {
        let function = self
            .registry
            .get(name)
            .ok_or_else(|| Error::NotFound(format!("function \"{name}\" not found")))?;
        if function.spec.status != Status::Ready {
            return Err(Error::NotFound(format!(
                "function \"{name}\" is not READY (status {})",
                function.spec.status.as_str()
            )));
        }
        Ok(function)
    }

    /// Phase 2: a slot under the function's concurrency limit.
    async fn admit(
        &self,
        function: &Arc<FunctionEntry>,
        started: Instant,
        deadline: Instant,
    ) -> Result<CallGuard, Error> {
        let wait_until = deadline.min(started + Duration::from_millis(self.limits.queue_wait_ms));
        let permit = match function.limiter.acquire(wait_until).await {
            Ok(permit) => permit,
            Err(why) => {
                function.metrics.reject(why);
                function.metrics.observe(429, started.elapsed());
                let name = &function.spec.name;
                let max = function.spec.max_inflight.unwrap_or(0);
                let message = match why {
                    Rejection::QueueFull => format!(
                        "function \"{name}\" is at its limit of {max} calls in flight and its wait queue is full"
                    ),
                    _ => format!(
                        "function \"{name}\" is at its limit of {max} calls in flight; no slot came free in {} ms",
                        (wait_until - started).as_millis()
                    ),
                };
                return Err(Error::TooManyRequests {
                    message,
                    retry_after: Duration::from_secs(1),
                });
            }
        };
        function.metrics.started.inc();
        function.metrics.inflight.inc();
        Ok(CallGuard {
            function: function.clone(),
            _permit: permit,
            started,
            code: 0,
            endpoint: None,
            lease: None,
        })
    }

    /// Phase 3: sends `req` to one of the function's endpoints with `rest` as its path.
    /// A failure to connect moves on to another endpoint (and sets the refusing one aside);
    /// anything that may have reached the function is final. A failure sets the call's code.
    async fn forward(
        &self,
        call: &mut CallGuard,
        mut req: Request<ReqBody>,
        rest: &str,
        timer: &mut Pin<Box<Sleep>>,
    ) -> Result<Response<UpBody>, Error> {
        let function = call.function.clone();
        if let Some(spec) = &function.local {
            return self.forward_local(call, req, spec, timer).await;
        }
        let endpoints = &function.endpoints;
        let mut tried = 0u64;
        let mut last_failure = String::new();
        let mut last_endpoint = "";
        for attempt in 0..self.connect_attempts {
            let i = balance::pick(endpoints, tried);
            let endpoint = &endpoints[i];
            tried |= 1 << (i % 64);
            last_endpoint = &endpoint.pool.origin;
            *req.uri_mut() = upstream_uri(endpoint, rest)?;
            req.headers_mut()
                .insert(http::header::HOST, endpoint.pool.host.clone());
            call.on_endpoint(&endpoint.pool);
            if attempt > 0 {
                function.metrics.connect_retries.inc();
            }
            let sent = tokio::select! {
                biased;
                // Boxed: the send future is the largest part of a call's state, and every
                // level above would otherwise copy it (see docs/performance.md).
                sent = Box::pin(endpoint.pool.send(req)) => Ok(sent),
                () = timer.as_mut() => Err(()),
            };
            let failure = match sent {
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(SendError::Failed(e))) => {
                    return Err(call.fail(self.send_failed(&function, endpoint, e)));
                }
                Err(()) => {
                    return Err(call.fail(Error::Timeout {
                        function: function.spec.name.clone(),
                        endpoint: endpoint.pool.origin.to_string(),
                        after_ms: function.timeout.as_millis() as u64,
                    }));
                }
                Ok(Err(SendError::NotSent {
                    request,
                    cause,
                    connect_failed,
                })) => {
                    req = *request;
                    if connect_failed {
                        endpoint.pool.eject();
                        tracing::warn!(
                            function = %function.spec.name,
                            endpoint = %endpoint.pool.origin,
                            cause = %cause,
                            "endpoint refused a connection; set aside"
                        );
                        if balance::all_tried(endpoints, tried) {
                            last_failure = cause;
                            break;
                        }
                    }
                    cause
                }
            };
            last_failure = failure;
        }
        Err(call.fail(Error::Upstream {
            function: function.spec.name.clone(),
            endpoint: last_endpoint.to_string(),
            cause: last_failure,
        }))
    }

    /// Phase 3 for a local function: a slot on one of its runtime processes (started if
    /// none runs), then the request on that process's pooled connection.
    async fn forward_local(
        &self,
        call: &mut CallGuard,
        mut req: Request<ReqBody>,
        spec: &LocalSpec,
        timer: &mut Pin<Box<Sleep>>,
    ) -> Result<Response<UpBody>, Error> {
        let function = call.function.clone();
        let name = &function.spec.name;
        let endpoint = format!("local {} runtime", spec.runtime.as_str());
        let timeout = || Error::Timeout {
            function: name.clone(),
            endpoint: endpoint.clone(),
            after_ms: function.timeout.as_millis() as u64,
        };
        let lease = match self.supervisor.lease(spec, timer.deadline()).await {
            Ok(lease) => lease,
            Err(LeaseError::Deadline) => return Err(call.fail(timeout())),
            Err(LeaseError::Start(why)) => {
                return Err(call.fail(Error::Upstream {
                    function: name.clone(),
                    endpoint,
                    cause: format!("the runtime did not start: {why}"),
                }));
            }
        };
        let pool = lease.pool().clone();
        call.on_endpoint(&pool);
        call.lease = Some(lease);
        *req.uri_mut() = Uri::from_static("/");
        req.headers_mut()
            .insert(http::header::HOST, pool.host.clone());
        let sent = tokio::select! {
            biased;
            sent = Box::pin(pool.send(req)) => sent,
            () = timer.as_mut() => return Err(call.fail(timeout())),
        };
        match sent {
            Ok(resp) => Ok(resp),
            Err(SendError::Failed(e)) => {
                let mut cause = error_chain(&*e);
                if let Some(exit) = call.runtime_exit().await {
                    cause = format!("the runtime process exited ({exit}) during the call");
                }
                Err(call.fail(Error::Upstream {
                    function: name.clone(),
                    endpoint,
                    cause,
                }))
            }
            Err(SendError::NotSent { cause, .. }) => Err(call.fail(Error::Upstream {
                function: name.clone(),
                endpoint,
                cause,
            })),
        }
    }

    fn send_failed(&self, function: &FunctionEntry, endpoint: &Endpoint, e: BoxError) -> Error {
        if let Some(too_large) = find_cause::<BodyTooLarge>(&*e) {
            function.metrics.reject(Rejection::TooLarge);
            return Error::PayloadTooLarge(format!(
                "function \"{}\": {too_large}",
                function.spec.name
            ));
        }
        Error::Upstream {
            function: function.spec.name.clone(),
            endpoint: endpoint.pool.origin.to_string(),
            cause: error_chain(&*e),
        }
    }

    fn too_large(&self, function: &FunctionEntry, limit: u64, started: Instant) -> Error {
        function.metrics.reject(Rejection::TooLarge);
        function.metrics.observe(413, started.elapsed());
        Error::PayloadTooLarge(format!(
            "function \"{}\": request body exceeds the limit of {limit} bytes",
            function.spec.name
        ))
    }

    /// Phase 4, raw: the upstream's head with hop-by-hop headers removed and OpenFaaS'
    /// headers added; its body streams through, and the connection goes back to the pool
    /// when the body ends.
    #[allow(clippy::too_many_arguments)]
    fn respond_raw(
        &self,
        mut call: CallGuard,
        resp: Response<UpBody>,
        started: Instant,
        now_ns: u128,
        timer: Pin<Box<Sleep>>,
        recording: Option<Recording>,
    ) -> Response<RespBody> {
        let (mut parts, body) = resp.into_parts();
        call.code = parts.status.as_u16();
        headers::strip_hop_by_hop(&mut parts.headers);
        parts.headers.insert(
            headers::X_DURATION_SECONDS.clone(),
            headers::seconds(started.elapsed()),
        );
        parts.headers.insert(
            headers::X_START_TIME.clone(),
            HeaderValue::from(now_ns as u64),
        );
        let record = recording.map(|mut rec| {
            rec.call.status = call.code;
            rec.call.endpoint = call.endpoint.as_ref().map(|p| p.origin.clone());
            Box::new(rec)
        });
        let body = UpstreamBody {
            inner: body,
            call: Some(call),
            deadline: timer,
            record,
        };
        Response::from_parts(parts, RespBody::Upstream(body))
    }

    /// Phase 4, Dispatch: the upstream's whole answer (up to the body limit, within the
    /// deadline), read as the pod contract says.
    async fn respond_run(
        &self,
        call: &mut CallGuard,
        resp: Response<UpBody>,
        timer: &mut Pin<Box<Sleep>>,
    ) -> Result<envelope::Outcome, Error> {
        let status = resp.status();
        call.code = status.as_u16();
        let retryable = resp
            .headers()
            .get("x-dispatch-retryable")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
        let function = &call.function;
        let endpoint = call
            .endpoint
            .as_ref()
            .map(|e| e.origin.to_string())
            .unwrap_or_default();
        let limit = self.limits.body_bytes;
        let read = tokio::select! {
            biased;
            read = read_limited(resp.into_body(), limit) => Ok(read),
            () = timer.as_mut() => Err(()),
        };
        let body = match read {
            Err(()) => {
                return Err(Error::Timeout {
                    function: function.spec.name.clone(),
                    endpoint,
                    after_ms: function.timeout.as_millis() as u64,
                });
            }
            Ok(Err(cause)) => {
                return Err(Error::Upstream {
                    function: function.spec.name.clone(),
                    endpoint,
                    cause,
                });
            }
            Ok(Ok(body)) => body,
        };
        let mut outcome = envelope::decode(function.protocol, status, &body);
        // A raw function marks a failure worth another attempt with a header.
        if retryable && let Some(error) = &mut outcome.error {
            error.retryable = true;
        }
        Ok(outcome)
    }
}

/// A function's answer that fails its `schema.out` is the function's error.
fn check_output(function: &FunctionEntry, mut outcome: envelope::Outcome) -> envelope::Outcome {
    if outcome.error.is_none()
        && let Some(schema) = &function.schema_out
        && let Err(why) = schema.check(&outcome.output)
    {
        outcome.error = Some(RunError::function(format!(
            "output does not match schema.out: {why}"
        )));
    }
    outcome
}

/// The upstream request's URI: the endpoint's path prefix, then the caller's path suffix
/// (`rest`, possibly empty, possibly just `?query`) exactly as it came.
fn upstream_uri(endpoint: &Endpoint, rest: &str) -> Result<Uri, Error> {
    let pq = if endpoint.path_prefix.is_empty() {
        match rest {
            "" => Ok(PathAndQuery::from_static("/")),
            _ if rest.starts_with('?') => PathAndQuery::try_from(format!("/{rest}")),
            _ => PathAndQuery::try_from(rest),
        }
    } else {
        PathAndQuery::try_from(format!("{}{rest}", endpoint.path_prefix))
    };
    pq.map(Uri::from)
        .map_err(|e| Error::BadRequest(format!("path \"{rest}\": {e}")))
}

/// Reads a body to its end, refusing more than `limit` bytes.
async fn read_limited(mut body: UpBody, limit: u64) -> Result<Bytes, String> {
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("reading the answer: {}", error_chain(&*e)))?;
        if let Ok(data) = frame.into_data() {
            if (buf.len() + data.len()) as u64 > limit {
                return Err(format!("the answer exceeds the limit of {limit} bytes"));
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn find_cause<'a, T: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut current = Some(e);
    while let Some(err) = current {
        if let Some(found) = err.downcast_ref::<T>() {
            return Some(found);
        }
        current = err.source();
    }
    None
}

/// An upstream's response body on its way to the caller. It holds what the call still
/// owns: the upstream body (whose connection goes back to its pool at the body's end, and
/// closes if the body is dropped early) and the [`CallGuard`] (recorded when this is
/// dropped). The
/// deadline covers the body too: an upstream that stalls mid-body is cut off.
pub struct UpstreamBody {
    inner: UpBody,
    call: Option<CallGuard>,
    deadline: Pin<Box<Sleep>>,
    /// The call's record, finished and handed to the recorder when the body ends.
    record: Option<Box<Recording>>,
}

/// A raw call being recorded.
pub struct Recording {
    mode: RecordMode,
    recorder: Recorder,
    call: RawCall,
}

impl UpstreamBody {
    fn finish(&mut self, complete: bool) {
        if let Some(rec) = self.record.take() {
            let Recording {
                mode,
                recorder,
                mut call,
            } = *rec;
            call.complete = complete;
            if let Some(guard) = &self.call {
                call.duration = guard.started.elapsed();
            }
            if mode == RecordMode::All || call.failed() {
                recorder.record_raw(call);
            }
        }
        self.call.take();
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.call.is_some() && this.deadline.as_mut().poll(cx).is_ready() {
            let function = this.call.as_ref().map(|c| c.function.spec.name.clone());
            this.finish(false);
            return Poll::Ready(Some(Err(format!(
                "function \"{}\": deadline passed while streaming the answer",
                function.unwrap_or_default()
            )
            .into())));
        }
        match std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let (Some(rec), Some(data)) = (this.record.as_mut(), frame.data_ref()) {
                    let limit = rec.recorder.body_bytes();
                    rec.call.response.keep(data, limit);
                }
                if this.inner.is_end_stream() {
                    this.finish(true);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                this.finish(false);
                Poll::Ready(Some(Err(e)))
            }
            None => {
                this.finish(true);
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        let complete = self.inner.is_end_stream();
        self.finish(complete);
    }
}
