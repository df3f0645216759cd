//! The wire models of the Dispatch v0.1.24 API (Function, Run, Tag...) plus the fields this
//! gateway adds (`upstream`, `maxInflight`, `maxQueue`). Field names and casing are the
//! contract with Dispatch's clients; see DESIGN.md section 1.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::Error;

/// Function status, as Dispatch's `Status` enum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    #[default]
    Initialized,
    Creating,
    Ready,
    Updating,
    Error,
    Deleting,
    Deleted,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Initialized => "INITIALIZED",
            Status::Creating => "CREATING",
            Status::Ready => "READY",
            Status::Updating => "UPDATING",
            Status::Error => "ERROR",
            Status::Deleting => "DELETING",
            Status::Deleted => "DELETED",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tag {
    pub key: String,
    #[serde(default)]
    pub value: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Schema {
    #[serde(rename = "in", default, skip_serializing_if = "Option::is_none")]
    pub input: Option<Value>,
    #[serde(rename = "out", default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
}

/// Which calls on the raw `/function/{name}` surface get a run record (Dispatch runs
/// always do).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RecordMode {
    #[default]
    All,
    /// Only calls that failed: an HTTP status of 400 or more, or no answer.
    Errors,
    None,
}

/// Which driver runs a function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DriverKind {
    /// A fixed list of URLs given at registration.
    Static,
    /// An OpenFaaS function, reached through the OpenFaaS gateway or its own service,
    /// as the server's `[openfaas]` section says.
    Openfaas,
}

/// What an upstream speaks: the Dispatch envelope of DESIGN.md section 3, or a plain
/// OpenFaaS function that takes the body as is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Dispatch,
    Raw,
}

/// Where a function runs (our addition to Dispatch's Function).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpstreamSpec {
    pub driver: DriverKind,
    /// `static`: base URLs of the function's endpoints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
    /// `openfaas`: the OpenFaaS function's name (defaults to the Dispatch function's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default)]
    pub protocol: Protocol,
    /// Speak HTTP/2 with prior knowledge (h2c) to the endpoints: one multiplexed
    /// connection per endpoint instead of a pool of HTTP/1.1 connections.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub http2: bool,
}

/// A function, in Dispatch's shape plus `upstream` and the concurrency limits.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Function {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub id: String,
    #[serde(default = "function_kind")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handler: Option<String>,
    /// Base64 tar.gz of the function's code (request only: never echoed back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<Schema>,
    #[serde(default)]
    pub secrets: Vec<String>,
    #[serde(default)]
    pub services: Vec<String>,
    /// Deadline of one run, in milliseconds; 0 or absent: the server's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    #[serde(default)]
    pub created_time: i64,
    #[serde(default)]
    pub modified_time: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub faas_id: Option<String>,
    #[serde(
        default,
        rename = "functionImageURL",
        skip_serializing_if = "Option::is_none"
    )]
    pub function_image_url: Option<String>,
    #[serde(default)]
    pub status: Status,
    #[serde(default)]
    pub reason: Vec<String>,
    #[serde(default)]
    pub tags: Vec<Tag>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<UpstreamSpec>,
    /// Calls allowed in flight at once; 0 or absent: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_inflight: Option<u32>,
    /// Calls allowed to wait when `maxInflight` is reached; absent: the server's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_queue: Option<u32>,
    /// Which raw calls are recorded; absent: the server's `records.raw`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<RecordMode>,
}

fn function_kind() -> String {
    "Function".to_string()
}

impl Function {
    /// Checks what a client sent, naming the first bad field.
    pub fn validate(&self) -> Result<(), Error> {
        if self.name.is_empty() {
            return Err(Error::BadRequest("name: required".into()));
        }
        if !self
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            || self.name.len() > 128
        {
            return Err(Error::BadRequest(format!(
                "name: \"{}\" must be 1 to 128 letters, digits, '-' or '_'",
                self.name
            )));
        }
        for (i, tag) in self.tags.iter().enumerate() {
            if tag.key.is_empty() {
                return Err(Error::BadRequest(format!("tags[{i}].key: required")));
            }
        }
        let Some(up) = &self.upstream else {
            // The local driver: built from source, run by this gateway.
            let missing = |field: &str| {
                Error::BadRequest(format!(
                    "{field}: required for function \"{}\" (a function without an `upstream` \
                     runs here, from its image, handler and source)",
                    self.name
                ))
            };
            if self.image.as_deref().is_none_or(str::is_empty) {
                return Err(missing("image"));
            }
            let handler = self.handler.as_deref().unwrap_or("");
            if handler.is_empty() {
                return Err(missing("handler"));
            }
            if !handler.contains('.') || handler.starts_with('.') || handler.ends_with('.') {
                return Err(Error::BadRequest(format!(
                    "handler: \"{handler}\" must be file.function (for example hello.handle)"
                )));
            }
            if self.source.as_deref().is_none_or(str::is_empty) {
                return Err(missing("source"));
            }
            return Ok(());
        };
        match up.driver {
            DriverKind::Static => {
                if up.endpoints.is_empty() {
                    return Err(Error::BadRequest(
                        "upstream.endpoints: the static driver needs at least one URL".into(),
                    ));
                }
                for (i, url) in up.endpoints.iter().enumerate() {
                    crate::drivers::parse_endpoint_url(url).map_err(|why| {
                        Error::BadRequest(format!("upstream.endpoints[{i}]: \"{url}\" {why}"))
                    })?;
                }
            }
            DriverKind::Openfaas => {
                if !up.endpoints.is_empty() {
                    return Err(Error::BadRequest(
                        "upstream.endpoints: not used by the openfaas driver (the server's \
                         [openfaas] section says where functions are)"
                            .into(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The function as the API shows it: without its source.
    pub fn public(mut self) -> Self {
        self.source = None;
        self
    }

    pub fn protocol(&self) -> Protocol {
        self.upstream
            .as_ref()
            .map(|u| u.protocol)
            .unwrap_or_default()
    }
}

/// Checks a name the way Dispatch's `^[\w\d][\w\d\-]*$` pattern does (at most 128
/// characters), naming the field.
fn validate_name(field: &str, name: &str) -> Result<(), Error> {
    if name.is_empty() {
        return Err(Error::BadRequest(format!("{field}: required")));
    }
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_alphanumeric() || c == '_');
    if !first_ok || !chars.all(|c| c.is_alphanumeric() || c == '_' || c == '-') || name.len() > 128
    {
        return Err(Error::BadRequest(format!(
            "{field}: \"{name}\" must be 1 to 128 letters, digits, '_' or '-', not starting with '-'"
        )));
    }
    Ok(())
}

fn validate_tags(tags: &[Tag]) -> Result<(), Error> {
    for (i, tag) in tags.iter().enumerate() {
        if tag.key.is_empty() {
            return Err(Error::BadRequest(format!("tags[{i}].key: required")));
        }
    }
    Ok(())
}

/// The language runtimes the local driver can start (DESIGN.md, Runtimes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    Python3,
    Nodejs,
}

impl Runtime {
    /// The runtime of a Dispatch image language: `python3` -> python3, `nodejs` and
    /// `nodejs6` -> nodejs; anything else has none.
    pub fn of_language(language: &str) -> Option<Runtime> {
        match language {
            "python3" => Some(Runtime::Python3),
            "nodejs" | "nodejs6" => Some(Runtime::Nodejs),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Python3 => "python3",
            Runtime::Nodejs => "nodejs",
        }
    }
}

/// A base image, in Dispatch's shape: a language and, for OpenFaaS, the container image
/// functions of that language are built on (`dockerUrl`, recorded only).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BaseImage {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub id: String,
    #[serde(default = "base_image_kind")]
    pub kind: String,
    #[serde(default)]
    pub docker_url: String,
    #[serde(default)]
    pub language: String,
    #[serde(default)]
    pub created_time: i64,
    #[serde(default)]
    pub modified_time: i64,
    #[serde(default)]
    pub status: Status,
    #[serde(default)]
    pub reason: Vec<String>,
    #[serde(default)]
    pub tags: Vec<Tag>,
}

fn base_image_kind() -> String {
    "BaseImage".to_string()
}

impl BaseImage {
    /// Checks what a client sent, naming the first bad field.
    pub fn validate(&self) -> Result<(), Error> {
        validate_name("name", &self.name)?;
        if self.language.is_empty() {
            return Err(Error::BadRequest(
                "language: required (python3, nodejs or nodejs6 for the local driver)".into(),
            ));
        }
        validate_tags(&self.tags)
    }
}

/// What an image adds to its base image: Dispatch's `runtimeDependencies`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RuntimeDependencies {
    #[serde(default)]
    pub manifest: String,
}

/// An image, in Dispatch's shape: a base image plus dependencies. Its `language` is its
/// base image's; `runtime` (our addition) says which local runtime runs its functions.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Image {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub id: String,
    #[serde(default = "image_kind")]
    pub kind: String,
    #[serde(default)]
    pub base_image_name: String,
    /// An OpenFaaS image reference, recorded only.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub docker_url: String,
    #[serde(default)]
    pub language: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<Runtime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_dependencies: Option<RuntimeDependencies>,
    /// Dispatch's `systemDependencies`, kept as sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_dependencies: Option<Value>,
    #[serde(default)]
    pub created_time: i64,
    #[serde(default)]
    pub modified_time: i64,
    #[serde(default)]
    pub status: Status,
    #[serde(default)]
    pub reason: Vec<String>,
    #[serde(default)]
    pub tags: Vec<Tag>,
}

fn image_kind() -> String {
    "Image".to_string()
}

impl Image {
    /// Checks what a client sent, naming the first bad field.
    pub fn validate(&self) -> Result<(), Error> {
        validate_name("name", &self.name)?;
        validate_name("baseImageName", &self.base_image_name)?;
        validate_tags(&self.tags)
    }
}

/// A secret: named values a function gets in its run's `context.secrets`. The values
/// never leave the gateway except to a function: [`Secret::public`] masks them, and
/// `Debug` leaves them out, so a log line cannot show them.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Secret {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub id: String,
    #[serde(default = "secret_kind")]
    pub kind: String,
    #[serde(default)]
    pub secrets: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub tags: Vec<Tag>,
    #[serde(default)]
    pub created_time: i64,
    #[serde(default)]
    pub modified_time: i64,
}

fn secret_kind() -> String {
    "Secret".to_string()
}

/// What the API shows in place of a secret value.
pub const MASKED: &str = "********";

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret")
            .field("name", &self.name)
            .field("id", &self.id)
            .field("keys", &self.secrets.keys().collect::<Vec<_>>())
            .field("tags", &self.tags)
            .finish_non_exhaustive()
    }
}

impl Secret {
    /// Checks what a client sent, naming the first bad field.
    pub fn validate(&self) -> Result<(), Error> {
        validate_name("name", &self.name)?;
        if self.secrets.keys().any(String::is_empty) {
            return Err(Error::BadRequest("secrets: a key is empty".into()));
        }
        validate_tags(&self.tags)
    }

    /// The secret as the API shows it: its keys, each value replaced by `********`.
    pub fn public(&self) -> Secret {
        Secret {
            secrets: self
                .secrets
                .keys()
                .map(|k| (k.clone(), MASKED.to_string()))
                .collect(),
            ..self.clone()
        }
    }
}

/// `stdout`/`stderr` lines of one run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Logs {
    #[serde(default)]
    pub stdout: Vec<String>,
    #[serde(default)]
    pub stderr: Vec<String>,
}

/// Why a run failed, as Dispatch's runtimes and function manager report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunErrorType {
    InputError,
    FunctionError,
    SystemError,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunError {
    #[serde(rename = "type")]
    pub kind: RunErrorType,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub stacktrace: Vec<String>,
    /// The function says another attempt may succeed (`"retryable": true` in its envelope's
    /// error, or an `X-Dispatch-Retryable: true` header): an async run is then tried again
    /// as after a 502.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retryable: bool,
}

impl RunError {
    pub fn system(message: impl Into<String>) -> Self {
        RunError {
            kind: RunErrorType::SystemError,
            message: message.into(),
            stacktrace: Vec::new(),
            retryable: false,
        }
    }

    pub fn function(message: impl Into<String>) -> Self {
        RunError {
            kind: RunErrorType::FunctionError,
            message: message.into(),
            stacktrace: Vec::new(),
            retryable: false,
        }
    }

    pub fn input(message: impl Into<String>) -> Self {
        RunError {
            kind: RunErrorType::InputError,
            message: message.into(),
            stacktrace: Vec::new(),
            retryable: false,
        }
    }
}

/// What a client sends to `POST /v1/runs`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunRequest {
    #[serde(default)]
    pub blocking: bool,
    #[serde(default)]
    pub input: Value,
    #[serde(default)]
    pub secrets: Vec<String>,
    #[serde(default)]
    pub tags: Vec<Tag>,
    #[serde(default)]
    pub http_context: Option<Value>,
    #[serde(default)]
    pub event: Option<Value>,
}

/// One execution of a function, in Dispatch's Run shape. Times are unix seconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Run {
    pub name: String,
    pub function_name: String,
    pub function_id: String,
    pub blocking: bool,
    pub input: Value,
    pub output: Value,
    pub logs: Logs,
    pub error: Option<RunError>,
    pub event: Option<Value>,
    pub http_context: Option<Value>,
    pub executed_time: i64,
    pub finished_time: i64,
    pub status: Status,
    pub reason: Vec<String>,
    pub secrets: Vec<String>,
    pub tags: Vec<Tag>,
    /// What the gateway saw of the call (our addition to Dispatch's Run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call: Option<CallFacts>,
}

/// What the gateway saw of one call, kept with its run record.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CallFacts {
    pub call_id: String,
    /// The upstream's HTTP status, or the gateway's own when the call failed before it.
    pub http_status: u16,
    pub duration_ms: f64,
    pub endpoint: String,
    /// The stored input or output was cut at `records.body_bytes`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub input_truncated: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub output_truncated: bool,
    /// Microseconds since the epoch when the call started: the order runs are listed in.
    pub started_us: i64,
}

/// A new random (version 4) uuid for run names, call ids and function ids. Drawn from a
/// fast thread-local generator rather than the kernel's: these name things, they guard
/// nothing, and a `getrandom` call per request showed in the profile.
pub fn new_id() -> uuid::Uuid {
    uuid::Builder::from_random_bytes(fastrand::u128(..).to_le_bytes()).into_uuid()
}

/// A new run name: a time-ordered (version 7) uuid. Run records are keyed by name, and
/// names that grow with time are appended to the store's index instead of landing on a
/// random page of it (with random names, index upkeep was most of a record's cost).
pub fn new_run_name() -> uuid::Uuid {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let random: [u8; 10] = fastrand::u128(..).to_le_bytes()[..10]
        .try_into()
        .expect("ten bytes");
    uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid()
}

/// Year, month (1-12) and day (1-31) of a count of days since 1970-01-01, by the
/// proleptic Gregorian calendar (Howard Hinnant's `civil_from_days`).
pub fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A unix time in seconds as RFC 3339 in UTC (`2018-04-05T17:31:00Z`), as CloudEvents'
/// `event-time` is written.
pub fn rfc3339(unix: i64) -> String {
    let (year, month, day) = civil_from_days(unix.div_euclid(86_400));
    let secs = unix.rem_euclid(86_400);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// Seconds since the unix epoch, as Dispatch's times are.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Unix time in microseconds: run start times and queue times.
pub fn unix_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn static_fn(endpoints: &[&str]) -> Function {
        serde_json::from_value(serde_json::json!({
            "name": "hello",
            "upstream": {"driver": "static", "endpoints": endpoints, "protocol": "raw"}
        }))
        .unwrap()
    }

    #[test]
    fn a_good_static_function_validates() {
        static_fn(&["http://127.0.0.1:9000"]).validate().unwrap();
    }

    #[test]
    fn validation_names_the_bad_field() {
        let e = static_fn(&["ftp://x"]).validate().unwrap_err();
        assert!(e.to_string().starts_with("upstream.endpoints[0]"), "{e}");
        let e = static_fn(&[]).validate().unwrap_err();
        assert!(e.to_string().starts_with("upstream.endpoints"), "{e}");
        let mut f = static_fn(&["http://127.0.0.1:1"]);
        f.name = "bad name".into();
        assert!(f.validate().unwrap_err().to_string().starts_with("name:"));
    }

    #[test]
    fn unknown_fields_are_refused_by_name() {
        let e = serde_json::from_str::<Function>(r#"{"name":"x","maxInFlight":3}"#).unwrap_err();
        assert!(e.to_string().contains("maxInFlight"), "{e}");
    }

    #[test]
    fn the_source_is_never_shown() {
        let mut f = static_fn(&["http://127.0.0.1:1"]);
        f.source = Some("H4sI".into());
        let shown = serde_json::to_value(f.public()).unwrap();
        assert!(shown.get("source").is_none());
    }
}

/// A subscription (Dispatch's event manager): events of `eventType` start async runs of
/// `function`, with the event's data as input. `eventType` `*` takes every event.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Subscription {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub id: String,
    #[serde(default = "subscription_kind")]
    pub kind: String,
    #[serde(default, alias = "event-type")]
    pub event_type: String,
    /// Where the events come from (`*`: anywhere), as Dispatch's drivers named it.
    #[serde(default = "any_source", alias = "source-type")]
    pub source_type: String,
    #[serde(default)]
    pub function: String,
    #[serde(default)]
    pub secrets: Vec<String>,
    #[serde(default)]
    pub tags: Vec<Tag>,
    #[serde(default)]
    pub status: Status,
    #[serde(default)]
    pub created_time: i64,
    #[serde(default)]
    pub modified_time: i64,
}

fn subscription_kind() -> String {
    "Subscription".to_string()
}

fn any_source() -> String {
    "*".to_string()
}

impl Subscription {
    /// Checks what a client sent, naming the first bad field.
    pub fn validate(&self) -> Result<(), Error> {
        let word = |s: &str, extra: &[char]| {
            !s.is_empty()
                && s.len() <= 128
                && s.chars().all(|c| {
                    c.is_ascii_alphanumeric() || c == '-' || c == '_' || extra.contains(&c)
                })
        };
        if !word(&self.name, &[]) {
            return Err(Error::BadRequest(format!(
                "name: \"{}\" must be 1 to 128 letters, digits, '-' or '_'",
                self.name
            )));
        }
        if !word(&self.event_type, &['.', '*']) {
            return Err(Error::BadRequest(format!(
                "eventType: \"{}\" must be 1 to 128 letters, digits, '-', '_', '.' (or '*' for any)",
                self.event_type
            )));
        }
        if self.function.is_empty() {
            return Err(Error::BadRequest("function: required".into()));
        }
        Ok(())
    }

    /// Whether an event of `event_type` is for this subscription.
    pub fn takes(&self, event_type: &str) -> bool {
        self.event_type == "*" || self.event_type == event_type
    }
}

/// An API endpoint (Dispatch's API manager, which Kong served): requests to one of its
/// `uris` on one of its `hosts`, with one of its `methods`, over one of its `protocols`,
/// run `function`. Served by the ingress listeners (`ingress/`), not the control API.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Api {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub id: String,
    #[serde(default = "api_kind")]
    pub kind: String,
    #[serde(default)]
    pub function: String,
    /// Upper-case HTTP methods; none given means GET.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Paths: `/hello` matches that path alone (and `/hello/`), `/hello/*` matches it and
    /// everything under it; of several matching prefixes the longest wins.
    #[serde(default)]
    pub uris: Vec<String>,
    /// Host names: `api.example.com`, or `*.example.com` for any name under it; none
    /// means any host. An exact host wins over a wildcard, a wildcard over none.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// `http` and/or `https`; none given means both.
    #[serde(default)]
    pub protocols: Vec<String>,
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default)]
    pub cors: bool,
    /// `public` (anyone) or `bearer` (an API key of `api.keys`, as `Authorization: Bearer`).
    #[serde(default = "public")]
    pub authentication: String,
    /// Dispatch's field for a TLS secret; kept as given, the listeners' certificate serves.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tls: String,
    /// Requests per second per client address (or per API key), with a burst.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    #[serde(default)]
    pub tags: Vec<Tag>,
    #[serde(default)]
    pub status: Status,
    #[serde(default)]
    pub reason: Vec<String>,
    #[serde(default)]
    pub created_time: i64,
    #[serde(default)]
    pub modified_time: i64,
}

/// A token bucket per caller: `perSecond` requests a second on average, up to `burst` at
/// once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimit {
    pub per_second: f64,
    /// Requests allowed at once; at least 1, and by default `perSecond` rounded up.
    #[serde(default)]
    pub burst: u32,
    /// Who has a bucket: `client` (the caller's address, the default) or `key` (the
    /// API key of a bearer API; the address for a public one).
    #[serde(default = "by_client")]
    pub by: String,
}

fn api_kind() -> String {
    "API".to_string()
}

fn yes() -> bool {
    true
}

fn public() -> String {
    "public".to_string()
}

fn by_client() -> String {
    "client".to_string()
}

/// The methods an API may name.
const API_METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

impl Api {
    /// Fills in what a client may leave out (methods GET, protocols both, path `/NAME`,
    /// a burst) and puts methods, hosts and protocols in their one spelling, then checks
    /// every field, naming the first bad one.
    pub fn normalize(&mut self) -> Result<(), Error> {
        let bad = |field: &str, why: String| Err(Error::BadRequest(format!("{field}: {why}")));
        let word = |s: &str| {
            !s.is_empty()
                && s.len() <= 128
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        };
        if !word(&self.name) {
            return bad(
                "name",
                format!(
                    "\"{}\" must be 1 to 128 letters, digits, '-' or '_'",
                    self.name
                ),
            );
        }
        if self.function.is_empty() {
            return bad("function", "required".into());
        }
        if self.methods.is_empty() {
            self.methods.push("GET".into());
        }
        for method in &mut self.methods {
            *method = method.to_ascii_uppercase();
            if !API_METHODS.contains(&method.as_str()) {
                return bad(
                    "methods",
                    format!("\"{method}\" is not one of {}", API_METHODS.join(", ")),
                );
            }
        }
        dedup(&mut self.methods);
        if self.uris.is_empty() {
            self.uris.push(format!("/{}", self.name));
        }
        for uri in &self.uris {
            check_api_path(uri)
                .map_err(|why| Error::BadRequest(format!("uris: \"{uri}\" {why}")))?;
        }
        dedup(&mut self.uris);
        for host in &mut self.hosts {
            *host = host.to_ascii_lowercase();
            check_api_host(host)
                .map_err(|why| Error::BadRequest(format!("hosts: \"{host}\" {why}")))?;
        }
        dedup(&mut self.hosts);
        if self.protocols.is_empty() {
            self.protocols = vec!["http".into(), "https".into()];
        }
        for protocol in &mut self.protocols {
            *protocol = protocol.to_ascii_lowercase();
            if protocol != "http" && protocol != "https" {
                return bad("protocols", format!("\"{protocol}\" must be http or https"));
            }
        }
        dedup(&mut self.protocols);
        if self.authentication.is_empty() {
            self.authentication = public();
        }
        if self.authentication != "public" && self.authentication != "bearer" {
            return bad(
                "authentication",
                format!("\"{}\" must be public or bearer", self.authentication),
            );
        }
        if let Some(limit) = &mut self.rate_limit {
            if !(limit.per_second.is_finite() && limit.per_second > 0.0) {
                return bad(
                    "rateLimit.perSecond",
                    format!("{} must be a number above 0", limit.per_second),
                );
            }
            if limit.burst == 0 {
                limit.burst = limit.per_second.ceil().min(u32::MAX as f64) as u32;
            }
            if limit.by != "client" && limit.by != "key" {
                return bad(
                    "rateLimit.by",
                    format!("\"{}\" must be client or key", limit.by),
                );
            }
        }
        Ok(())
    }

    /// Whether the API answers requests over `protocol` (`http` or `https`).
    pub fn serves(&self, protocol: &str) -> bool {
        self.protocols.iter().any(|p| p == protocol)
    }
}

fn dedup(items: &mut Vec<String>) {
    let mut seen = std::collections::HashSet::new();
    items.retain(|item| seen.insert(item.clone()));
}

/// An API path: absolute, no query, no `.` or `..` segment, and a `*` only as the last
/// segment (`/hello/*`).
fn check_api_path(path: &str) -> Result<(), &'static str> {
    if !path.starts_with('/') {
        return Err("must start with /");
    }
    if path.len() > 1024 {
        return Err("is longer than 1024 characters");
    }
    if path.contains(['?', '#', ' ']) || !path.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("must be visible ASCII without ?, # or spaces");
    }
    let body = path.strip_suffix("/*").unwrap_or(path);
    if body.contains('*') {
        return Err("may hold * only as its last segment (/prefix/*)");
    }
    if body.split('/').any(|s| s == "." || s == "..") {
        return Err("may not hold . or .. segments");
    }
    Ok(())
}

/// A host name, or `*.` and a host name; lower case (normalized before).
fn check_api_host(host: &str) -> Result<(), &'static str> {
    let name = host.strip_prefix("*.").unwrap_or(host);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err("must be a host name (api.example.com) or *. and one (*.example.com)");
    }
    Ok(())
}
