//! Records of calls on the raw surface, kept compact. A raw call's record is what the call
//! saw (the bytes that went in and out, the status, the timing), not a Run: the Run JSON is
//! built when somebody reads it, so recording a call costs little more than keeping its
//! bytes. A backend may store such records as they are (SQLite packs the calls of one
//! function in one write into one row) or as runs (the default, [`CallBatch::to_runs`]).
//!
//! The calls of a batch are packed one after the other; a call's function id, method, path
//! and endpoint are left out when they are those of the call before it in the batch (most
//! calls of one function in one write share them), which makes a call about 40% smaller.
//!
//! A packed call's run name says where it is: a UUID (version 8) holding the call's start
//! (milliseconds, first, so names sort by time like the version 7 names of other runs), its
//! batch and its place in the batch. No index of names is written per call.

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::model::{CallFacts, Run, RunError, Status};

/// One call on the raw surface, as recorded.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CallRecord {
    pub function_id: String,
    pub call_id: String,
    pub method: String,
    pub path: String,
    pub query: String,
    pub started_us: i64,
    pub duration_us: u64,
    /// The HTTP status the caller got.
    pub status: u16,
    pub endpoint: String,
    /// The first bytes of the request body (at most `records.body_bytes`).
    pub input: Bytes,
    pub input_truncated: bool,
    pub output: Bytes,
    pub output_truncated: bool,
    /// Why the gateway failed the call, if it did.
    pub failure: Option<String>,
    /// Whether the answer was read to its end.
    pub complete: bool,
}

/// A call as the recorder holds it, borrowed: packed without copying its strings and bodies
/// into a [`CallRecord`] first.
pub struct CallRef<'a> {
    pub function_id: &'a str,
    pub call_id: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub query: &'a str,
    pub started_us: i64,
    pub duration_us: u64,
    pub status: u16,
    pub endpoint: &'a str,
    pub input: ByteStr<'a>,
    pub input_truncated: bool,
    pub output: ByteStr<'a>,
    pub output_truncated: bool,
    pub failure: Option<&'a str>,
    pub complete: bool,
}

/// A call as packed: `None` for a field that is the same as in the call before it in the
/// batch.
#[derive(Serialize)]
struct PackedRef<'a> {
    function_id: Option<&'a str>,
    call_id: &'a str,
    method: Option<&'a str>,
    path: Option<&'a str>,
    query: &'a str,
    started_us: i64,
    duration_us: u64,
    status: u16,
    endpoint: Option<&'a str>,
    input: ByteStr<'a>,
    input_truncated: bool,
    output: ByteStr<'a>,
    output_truncated: bool,
    failure: Option<&'a str>,
    complete: bool,
}

/// [`PackedRef`], read back.
#[derive(Deserialize)]
struct Packed {
    function_id: Option<String>,
    call_id: String,
    method: Option<String>,
    path: Option<String>,
    query: String,
    started_us: i64,
    duration_us: u64,
    status: u16,
    endpoint: Option<String>,
    input: Bytes,
    input_truncated: bool,
    output: Bytes,
    output_truncated: bool,
    failure: Option<String>,
    complete: bool,
}

/// Bytes, packed as `Bytes` is (one length-prefixed run, not a sequence of numbers).
pub struct ByteStr<'a>(pub &'a [u8]);

impl Serialize for ByteStr<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.0)
    }
}

impl CallRef<'_> {
    fn failed(&self) -> bool {
        self.status >= 400 || self.failure.is_some() || !self.complete
    }
}

impl<'a> From<&'a CallRecord> for CallRef<'a> {
    fn from(c: &'a CallRecord) -> Self {
        CallRef {
            function_id: &c.function_id,
            call_id: &c.call_id,
            method: &c.method,
            path: &c.path,
            query: &c.query,
            started_us: c.started_us,
            duration_us: c.duration_us,
            status: c.status,
            endpoint: &c.endpoint,
            input: ByteStr(&c.input),
            input_truncated: c.input_truncated,
            output: ByteStr(&c.output),
            output_truncated: c.output_truncated,
            failure: c.failure.as_deref(),
            complete: c.complete,
        }
    }
}

/// The calls of one function, written together: packed one after the other as they come
/// (postcard), with what a listing needs to skip the batch without unpacking it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CallBatch {
    pub function_name: String,
    /// The earliest and the latest start of its calls.
    pub first_us: i64,
    pub last_us: i64,
    pub calls: usize,
    pub errors: usize,
    /// Shared, so that handing a batch to a store's thread (or writing it again after a
    /// failure) copies no bytes.
    pub packed: Arc<Vec<u8>>,
    /// The function id, method, path and endpoint of the last call packed (what the next
    /// call may leave out).
    last: Shared,
}

/// The fields a packed call leaves out when the call before it had the same.
#[derive(Debug, Clone, Default, PartialEq)]
struct Shared {
    function_id: String,
    method: String,
    path: String,
    endpoint: String,
}

impl Shared {
    /// `value`, or `None` when it is what `field` holds already (which it then holds).
    fn delta<'a>(field: &mut String, value: &'a str, first: bool) -> Option<&'a str> {
        if !first && field == value {
            return None;
        }
        field.clear();
        field.push_str(value);
        Some(value)
    }

    /// `packed`, or the call before's value when it was left out (kept for the next call).
    fn fill(field: &mut String, packed: Option<String>) -> String {
        if let Some(value) = packed {
            *field = value;
        }
        field.clone()
    }
}

/// Calls in one packed batch, at most (the place in a batch is 12 bits of the run name).
pub const MAX_BATCH: usize = 4096;

impl CallRecord {
    /// Whether the call failed: an HTTP status of 400 or more, a failure of the gateway, or
    /// an answer cut off.
    pub fn failed(&self) -> bool {
        self.status >= 400 || self.failure.is_some() || !self.complete
    }

    /// The call as a run named `name`.
    pub fn to_run(&self, name: String, function_name: &str) -> Run {
        let error = match (&self.failure, self.status) {
            (Some(why), _) => Some(RunError::system(why.clone())),
            (None, status) if status >= 400 => Some(RunError::function(format!(
                "function answered HTTP {status}"
            ))),
            (None, _) if !self.complete => Some(RunError::system(
                "the answer was cut off before its end".to_string(),
            )),
            _ => None,
        };
        let finished_us = self.started_us + self.duration_us as i64;
        Run {
            name,
            function_name: function_name.to_string(),
            function_id: self.function_id.clone(),
            blocking: true,
            input: body_value(&self.input),
            output: body_value(&self.output),
            http_context: Some(json!({
                "method": self.method,
                "path": self.path,
                "query": self.query,
            })),
            executed_time: self.started_us.div_euclid(1_000_000),
            finished_time: finished_us.div_euclid(1_000_000),
            status: if error.is_some() {
                Status::Error
            } else {
                Status::Ready
            },
            reason: error.iter().map(|e| e.message.clone()).collect(),
            error,
            call: Some(CallFacts {
                call_id: self.call_id.clone(),
                http_status: self.status,
                duration_ms: self.duration_us as f64 / 1e3,
                endpoint: self.endpoint.clone(),
                input_truncated: self.input_truncated,
                output_truncated: self.output_truncated,
                started_us: self.started_us,
            }),
            ..Run::default()
        }
    }
}

impl CallBatch {
    pub fn new(function_name: &str) -> CallBatch {
        CallBatch {
            function_name: function_name.to_string(),
            first_us: i64::MAX,
            last_us: i64::MIN,
            // Room for a few hundred small calls, so that filling it copies little.
            packed: Arc::new(Vec::with_capacity(64 * 1024)),
            ..CallBatch::default()
        }
    }

    /// Whether the batch takes no more calls.
    pub fn is_full(&self) -> bool {
        self.calls >= MAX_BATCH
    }

    /// Packs one more call.
    pub fn push(&mut self, call: &CallRef<'_>) -> Result<(), postcard::Error> {
        let first = self.calls == 0;
        let last = &mut self.last;
        let wire = PackedRef {
            function_id: Shared::delta(&mut last.function_id, call.function_id, first),
            call_id: call.call_id,
            method: Shared::delta(&mut last.method, call.method, first),
            path: Shared::delta(&mut last.path, call.path, first),
            query: call.query,
            started_us: call.started_us,
            duration_us: call.duration_us,
            status: call.status,
            endpoint: Shared::delta(&mut last.endpoint, call.endpoint, first),
            input: ByteStr(call.input.0),
            input_truncated: call.input_truncated,
            output: ByteStr(call.output.0),
            output_truncated: call.output_truncated,
            failure: call.failure,
            complete: call.complete,
        };
        // Unique while the batch fills: no copy.
        let packed = Arc::make_mut(&mut self.packed);
        *packed = postcard::to_extend(&wire, std::mem::take(packed))?;
        self.calls += 1;
        self.errors += usize::from(call.failed());
        self.first_us = self.first_us.min(call.started_us);
        self.last_us = self.last_us.max(call.started_us);
        Ok(())
    }

    /// The calls, unpacked.
    pub fn records(&self) -> Result<Vec<CallRecord>, postcard::Error> {
        unpack(&self.packed)
    }

    /// The calls as runs with fresh names, for a backend that stores runs only.
    pub fn to_runs(&self) -> Result<Vec<Run>, postcard::Error> {
        Ok(self
            .records()?
            .iter()
            .map(|call| {
                call.to_run(
                    crate::model::new_run_name().to_string(),
                    &self.function_name,
                )
            })
            .collect())
    }
}

/// A body as a run shows it: JSON when it parses, text otherwise, null when empty.
pub fn body_value(body: &[u8]) -> Value {
    if body.is_empty() {
        return Value::Null;
    }
    serde_json::from_slice(body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
}

/// Where a packed call is: its batch, its place in it, and its start in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallPlace {
    pub batch: i64,
    pub index: usize,
    pub started_ms: u64,
}

const MS_BITS: u64 = 0xFFFF_FFFF_FFFF;
const BATCH_BITS: u64 = 0x3FFF_FFFF_FFFF_FFFF;

impl CallPlace {
    /// The run name of the call at this place.
    pub fn name(self) -> String {
        debug_assert!(self.index < MAX_BATCH && self.batch >= 0);
        let high = (self.started_ms & MS_BITS) << 16 | 0x8000 | self.index as u64;
        let low = 0x8000_0000_0000_0000 | (self.batch as u64 & BATCH_BITS);
        uuid::Uuid::from_u64_pair(high, low).to_string()
    }

    /// The place a run name points at, if it is a packed call's name (as [`Self::name`]
    /// writes it, exactly).
    pub fn of(name: &str) -> Option<CallPlace> {
        let uuid = uuid::Uuid::try_parse(name).ok()?;
        if uuid.get_version_num() != 8 {
            return None;
        }
        let (high, low) = uuid.as_u64_pair();
        let place = CallPlace {
            batch: (low & BATCH_BITS) as i64,
            index: (high & 0xFFF) as usize,
            started_ms: high >> 16,
        };
        (place.name() == name).then_some(place)
    }

    /// The place of `call`, the `index`th of batch `batch`.
    pub fn at(batch: i64, index: usize, call: &CallRecord) -> CallPlace {
        CallPlace {
            batch,
            index,
            started_ms: (call.started_us.div_euclid(1000)) as u64 & MS_BITS,
        }
    }
}

/// Unpacks the calls of a batch ([`CallBatch::packed`]).
pub fn unpack(mut packed: &[u8]) -> Result<Vec<CallRecord>, postcard::Error> {
    let mut calls = Vec::new();
    let mut last = Shared::default();
    while !packed.is_empty() {
        let (call, rest): (Packed, _) = postcard::take_from_bytes(packed)?;
        calls.push(CallRecord {
            function_id: Shared::fill(&mut last.function_id, call.function_id),
            call_id: call.call_id,
            method: Shared::fill(&mut last.method, call.method),
            path: Shared::fill(&mut last.path, call.path),
            query: call.query,
            started_us: call.started_us,
            duration_us: call.duration_us,
            status: call.status,
            endpoint: Shared::fill(&mut last.endpoint, call.endpoint),
            input: call.input,
            input_truncated: call.input_truncated,
            output: call.output,
            output_truncated: call.output_truncated,
            failure: call.failure,
            complete: call.complete,
        });
        packed = rest;
    }
    Ok(calls)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(status: u16) -> CallRecord {
        CallRecord {
            function_id: "f-1".into(),
            call_id: "call-1".into(),
            method: "POST".into(),
            path: "/function/echo".into(),
            query: "a=1".into(),
            started_us: 1_795_570_878_123_456,
            duration_us: 1500,
            status,
            endpoint: "http://127.0.0.1:9000".into(),
            input: Bytes::from_static(br#"{"name":"Jon"}"#),
            output: Bytes::from_static(b"hello"),
            complete: true,
            ..CallRecord::default()
        }
    }

    #[test]
    fn a_packed_calls_name_says_where_it_is_and_nothing_else_parses() {
        let place = CallPlace::at(123_456_789, 4095, &call(200));
        let name = place.name();
        assert_eq!(CallPlace::of(&name), Some(place));
        assert_eq!(place.started_ms, 1_795_570_878_123);
        // Names of other runs (version 4 or 7), other spellings and garbage are not places.
        assert_eq!(
            CallPlace::of(&crate::model::new_run_name().to_string()),
            None
        );
        assert_eq!(CallPlace::of(&name.to_uppercase()), None);
        assert_eq!(CallPlace::of(&name.replace('-', "")), None);
        assert_eq!(CallPlace::of("not-a-uuid"), None);
        // Later calls sort after earlier ones, as version 7 names do.
        let later = CallPlace::at(
            1,
            0,
            &CallRecord {
                started_us: 1_795_570_879_000_000,
                ..call(200)
            },
        );
        assert!(later.name() > name);
    }

    #[test]
    fn calls_pack_and_unpack_and_read_as_runs() {
        let calls = vec![
            call(200),
            CallRecord {
                failure: Some("upstream refused".into()),
                ..call(502)
            },
        ];
        let mut batch = CallBatch::new("echo");
        for call in &calls {
            batch.push(&call.into()).unwrap();
        }
        assert_eq!(batch.records().unwrap(), calls);
        assert_eq!((batch.calls, batch.errors), (2, 1));
        assert_eq!(batch.first_us, calls[0].started_us);
        let ok = calls[0].to_run("n".into(), "echo");
        assert_eq!(ok.status, Status::Ready);
        assert_eq!(ok.input, json!({"name": "Jon"}));
        assert_eq!(ok.output, json!("hello"));
        assert_eq!(
            ok.http_context,
            Some(json!({"method": "POST", "path": "/function/echo", "query": "a=1"}))
        );
        let failed = calls[1].to_run("m".into(), "echo");
        assert_eq!(failed.status, Status::Error);
        assert_eq!(failed.error.unwrap().message, "upstream refused");
        assert!(calls[1].failed() && !calls[0].failed());
    }

    #[test]
    fn fields_shared_with_the_call_before_are_left_out_and_read_back() {
        let other = |endpoint: &str, path: &str| CallRecord {
            endpoint: endpoint.into(),
            path: path.into(),
            ..call(200)
        };
        let calls = vec![
            call(200),
            call(200),
            other("", "/function/echo"),
            other("", "/function/echo/x"),
            other("http://127.0.0.1:9001", "/function/echo/x"),
            call(200),
        ];
        let mut batch = CallBatch::new("echo");
        for call in &calls {
            batch.push(&call.into()).unwrap();
        }
        assert_eq!(batch.records().unwrap(), calls);
        let mut one = CallBatch::new("echo");
        one.push(&(&calls[0]).into()).unwrap();
        let first = one.packed.len();
        one.push(&(&calls[1]).into()).unwrap();
        let second = one.packed.len() - first;
        // Each of function id, method, path and endpoint is one byte (`None`) instead of a
        // tag, a length and the text.
        let texts = ["f-1", "POST", "/function/echo", "http://127.0.0.1:9000"];
        let saved: usize = texts.iter().map(|t| 1 + 1 + t.len() - 1).sum();
        assert_eq!(
            first - second,
            saved,
            "first {first} bytes, second {second}"
        );
    }
}
