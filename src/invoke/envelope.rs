//! The function pod contract (DESIGN.md section 3): what a Dispatch run sends upstream and
//! how the answer becomes the run's output, logs and error. `raw` functions get the input
//! as the body and their body back as the output.

use http::StatusCode;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::model::{Logs, Protocol, RunError};

/// What the function is told besides its input.
pub struct Context<'a> {
    /// Unix milliseconds after which the gateway stops waiting.
    pub deadline_unix_ms: u64,
    pub event: Option<&'a Value>,
    pub http_context: Option<&'a Value>,
    /// The values of the secrets the function and the run name, merged (key -> value).
    pub secrets: &'a Map<String, Value>,
}

/// The request body for a run's upstream.
pub fn encode(protocol: Protocol, input: &Value, ctx: &Context<'_>) -> Vec<u8> {
    let body = match protocol {
        Protocol::Raw => return serde_json::to_vec(input).expect("a Value always encodes"),
        Protocol::Dispatch => json!({
            "context": {
                "secrets": ctx.secrets,
                "deadline": ctx.deadline_unix_ms,
                "event": ctx.event,
                "httpContext": ctx.http_context,
            },
            "payload": input,
        }),
    };
    serde_json::to_vec(&body).expect("a Value always encodes")
}

/// What became of a run, read from the upstream's answer.
#[derive(Debug, Default, PartialEq)]
pub struct Outcome {
    pub output: Value,
    pub logs: Logs,
    pub error: Option<RunError>,
}

#[derive(Deserialize)]
struct Envelope {
    #[serde(default)]
    context: EnvelopeContext,
    #[serde(default)]
    payload: Value,
}

#[derive(Deserialize, Default)]
struct EnvelopeContext {
    #[serde(default)]
    logs: Option<Logs>,
    #[serde(default)]
    error: Option<RunError>,
}

/// A raw body as a run's input or output: its JSON, or else its text as a string.
pub fn value_of_body(body: &[u8]) -> Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
}

/// Reads an upstream's answer. Never fails: an answer that is not what the contract says
/// becomes the run's error.
pub fn decode(protocol: Protocol, status: StatusCode, body: &[u8]) -> Outcome {
    match protocol {
        Protocol::Raw => {
            let output = value_of_body(body);
            let error = (!status.is_success()).then(|| {
                RunError::function(format!(
                    "function answered HTTP {}: {}",
                    status.as_u16(),
                    excerpt(body)
                ))
            });
            Outcome {
                output,
                logs: Logs::default(),
                error,
            }
        }
        Protocol::Dispatch => match serde_json::from_slice::<Envelope>(body) {
            Ok(envelope) => {
                let error = envelope.context.error.or_else(|| {
                    (!status.is_success()).then(|| {
                        RunError::function(format!("function answered HTTP {}", status.as_u16()))
                    })
                });
                Outcome {
                    output: envelope.payload,
                    logs: envelope.context.logs.unwrap_or_default(),
                    error,
                }
            }
            Err(e) => Outcome {
                output: Value::Null,
                logs: Logs::default(),
                error: Some(if status.is_success() {
                    RunError::system(format!(
                        "function answered HTTP {} with a body that is not a Dispatch envelope ({e}): {}",
                        status.as_u16(),
                        excerpt(body)
                    ))
                } else {
                    RunError::function(format!(
                        "function answered HTTP {}: {}",
                        status.as_u16(),
                        excerpt(body)
                    ))
                }),
            },
        },
    }
}

/// The start of a body, for an error message.
fn excerpt(body: &[u8]) -> String {
    const MAX: usize = 512;
    let text = String::from_utf8_lossy(&body[..body.len().min(MAX)]);
    if body.len() > MAX {
        format!("{text}...")
    } else {
        text.into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::RunErrorType;

    #[test]
    fn a_dispatch_envelope_round_trips() {
        let input = json!({"name": "Jon"});
        let mut secrets = Map::new();
        secrets.insert("password".into(), json!("hunter2"));
        let ctx = Context {
            deadline_unix_ms: 5,
            event: None,
            http_context: None,
            secrets: &secrets,
        };
        let sent: Value =
            serde_json::from_slice(&encode(Protocol::Dispatch, &input, &ctx)).unwrap();
        assert_eq!(sent["payload"], input);
        assert_eq!(sent["context"]["deadline"], 5);
        assert_eq!(sent["context"]["secrets"], json!({"password": "hunter2"}));
        let answer = br#"{"context":{"logs":{"stdout":["hi"],"stderr":[]},"error":null},"payload":{"myField":"Hello"}}"#;
        let out = decode(Protocol::Dispatch, StatusCode::OK, answer);
        assert_eq!(out.output, json!({"myField": "Hello"}));
        assert_eq!(out.logs.stdout, vec!["hi"]);
        assert!(out.error.is_none());
    }

    #[test]
    fn a_function_error_and_garbage_are_told_apart() {
        let answer = br#"{"context":{"error":{"type":"FunctionError","message":"boom","stacktrace":["at x"]}},"payload":null}"#;
        let out = decode(Protocol::Dispatch, StatusCode::OK, answer);
        let err = out.error.unwrap();
        assert_eq!(err.kind, RunErrorType::FunctionError);
        assert_eq!(err.stacktrace, vec!["at x"]);
        let out = decode(Protocol::Dispatch, StatusCode::OK, b"not json");
        assert_eq!(out.error.unwrap().kind, RunErrorType::SystemError);
    }

    #[test]
    fn raw_functions_get_the_bare_input() {
        let ctx = Context {
            deadline_unix_ms: 0,
            event: None,
            http_context: None,
            secrets: &Map::new(),
        };
        assert_eq!(encode(Protocol::Raw, &json!([1, 2]), &ctx), b"[1,2]");
        let out = decode(Protocol::Raw, StatusCode::OK, b"plain text");
        assert_eq!(out.output, json!("plain text"));
        let out = decode(Protocol::Raw, StatusCode::INTERNAL_SERVER_ERROR, b"oops");
        assert_eq!(out.error.unwrap().kind, RunErrorType::FunctionError);
    }
}
