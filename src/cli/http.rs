//! The client side of the Dispatch API: where the gateway is (`~/.dispatch/config.json`,
//! overridden by flags), one HTTP/1.1 request per call over hyper's connection API (over
//! rustls for `https`), and the errors a user sees (`[Code: 404] ...`, or which address
//! could not be reached).
//!
//! A CLI makes a handful of calls and exits, so there is no pool: each call opens a
//! connection, sends the request and reads the whole answer. The verbs stay synchronous;
//! [`Client`] blocks on a current-thread runtime of its own.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde::Deserialize;
use serde_json::Value;
use tokio_rustls::TlsConnector;

use crate::error::error_chain;

/// How long connecting may take before the gateway counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What a client verb can fail with. Each prints as one line on stderr and exits 1.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The gateway answered with an error status; `message` is its Dispatch error body's.
    #[error("[Code: {code}] {message}")]
    Api { code: u16, message: String },
    /// Nothing answered at the gateway's address.
    #[error(
        "cannot reach the gateway at {url}: {cause} (is `dispatch serve` running there? \
         set --host/--port or ~/.dispatch/config.json)"
    )]
    Connect { url: String, cause: String },
    /// The user asked for something the CLI cannot do as said.
    #[error("{0}")]
    Usage(String),
    /// A local file could not be read, or an answer could not be understood.
    #[error("{0}")]
    Other(String),
}

impl CliError {
    pub fn code(&self) -> Option<u16> {
        match self {
            CliError::Api { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// Connection flags, accepted by every client verb and its subcommands. Each one
/// overrides the same key of the configuration file.
#[derive(Args, Clone, Debug, Default)]
pub struct ConnArgs {
    /// Client configuration (JSON) [default: ~/.dispatch/config.json].
    #[arg(long, env = "DISPATCH_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Gateway host [default: 127.0.0.1].
    #[arg(long, global = true)]
    pub host: Option<String>,
    /// Gateway port [default: 8080].
    #[arg(long, global = true)]
    pub port: Option<u16>,
    /// http or https [default: http].
    #[arg(long, global = true)]
    pub scheme: Option<String>,
    /// For https: a PEM file of the certificates to trust, instead of the system's
    /// [default: the configuration's "cacert"].
    #[arg(long, env = "DISPATCH_CACERT", global = true)]
    pub cacert: Option<PathBuf>,
    /// Sent as X-Dispatch-Org [default: dispatch].
    #[arg(long, global = true)]
    pub organization: Option<String>,
    /// The gateway's control API token, sent as `Authorization: Bearer <token>`
    /// [default: the configuration's "token", which `dispatch serve` writes there on its
    /// first start].
    #[arg(long, env = "DISPATCH_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
}

/// `config.json`, as Dispatch's CLI kept it. Keys this client does not use (`cookie`,
/// `skipauth`, `json`...) are accepted and ignored, so an existing file keeps working.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct FileConfig {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub scheme: Option<String>,
    pub organization: Option<String>,
    pub token: Option<String>,
    /// For https: the certificates to trust (PEM), as with `--cacert`.
    pub cacert: Option<PathBuf>,
    /// Dispatch's "skip certificate checks". Not done: with https it stops with a message
    /// saying to trust the gateway's certificate with `cacert` instead.
    pub insecure: Option<bool>,
}

/// Where the gateway is and who is asking: the flags over the file over the defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub scheme: String,
    pub host: String,
    pub port: u16,
    pub organization: String,
    pub token: Option<String>,
    /// The certificates an https gateway is checked against; `None`: the system's.
    pub cacert: Option<PathBuf>,
    /// The configuration asked for no certificate checks (refused for https).
    pub insecure: bool,
}

impl Settings {
    pub fn resolve(file: FileConfig, flags: &ConnArgs) -> Settings {
        Settings {
            scheme: flags
                .scheme
                .clone()
                .or(file.scheme)
                .unwrap_or_else(|| "http".into()),
            host: flags
                .host
                .clone()
                .or(file.host)
                .unwrap_or_else(|| "127.0.0.1".into()),
            port: flags.port.or(file.port).unwrap_or(8080),
            organization: flags
                .organization
                .clone()
                .or(file.organization)
                .unwrap_or_else(|| "dispatch".into()),
            token: flags.token.clone().or(file.token).filter(|t| !t.is_empty()),
            cacert: flags
                .cacert
                .clone()
                .or(file.cacert)
                .filter(|p| !p.as_os_str().is_empty()),
            insecure: file.insecure.unwrap_or(false),
        }
    }

    /// Reads the configuration file named by `--config` (or `$DISPATCH_CONFIG`), which must
    /// exist, or else `~/.dispatch/config.json` if there is one, and applies the flags.
    pub fn load(flags: &ConnArgs) -> Result<Settings, CliError> {
        let file = match &flags.config {
            Some(path) => read_config(path)?,
            None => match std::env::var_os("HOME")
                .map(|home| Path::new(&home).join(".dispatch").join("config.json"))
            {
                Some(path) if path.exists() => read_config(&path)?,
                _ => FileConfig::default(),
            },
        };
        Ok(Settings::resolve(file, flags))
    }

    pub fn base_url(&self) -> String {
        format!("{}://{}:{}", self.scheme, self.host, self.port)
    }
}

fn read_config(path: &Path) -> Result<FileConfig, CliError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        CliError::Usage(format!("reading the configuration {}: {e}", path.display()))
    })?;
    serde_json::from_str(&text)
        .map_err(|e| CliError::Usage(format!("configuration {}: {e}", path.display())))
}

/// An answer, read whole.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Result<Value, CliError> {
        serde_json::from_slice(&self.body).map_err(|e| {
            CliError::Other(format!(
                "the gateway answered {} with a body that is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            ))
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The Dispatch error this answer carries, if its status is one.
    fn error(&self) -> Option<CliError> {
        if self.status.as_u16() < 400 {
            return None;
        }
        #[derive(Deserialize)]
        struct Body {
            code: Option<u16>,
            message: Option<String>,
        }
        let parsed = serde_json::from_slice::<Body>(&self.body).ok();
        let text = String::from_utf8_lossy(&self.body).trim().to_string();
        let mut message = parsed
            .as_ref()
            .and_then(|b| b.message.clone())
            .or_else(|| (!text.is_empty()).then_some(text))
            .unwrap_or_else(|| {
                self.status
                    .canonical_reason()
                    .unwrap_or("error")
                    .to_string()
            });
        if self.status == StatusCode::UNAUTHORIZED {
            message.push_str(
                " (give the gateway's token with --token, DISPATCH_TOKEN or \"token\" in \
                 ~/.dispatch/config.json; `dispatch serve` keeps the one it made in \
                 <data_dir>/token)",
            );
        }
        Some(CliError::Api {
            code: parsed.and_then(|b| b.code).unwrap_or(self.status.as_u16()),
            message,
        })
    }
}

/// The gateway, as this invocation of the CLI reaches it.
pub struct Client {
    pub settings: Settings,
    /// For https: the trust the gateway's certificate is checked against.
    tls: Option<TlsConnector>,
    runtime: tokio::runtime::Runtime,
}

impl Client {
    pub fn new(settings: Settings) -> Result<Client, CliError> {
        let tls = match settings.scheme.as_str() {
            "http" => None,
            "https" => Some(tls_connector(&settings)?),
            other => {
                return Err(CliError::Usage(format!(
                    "scheme \"{other}\" is not one this client speaks: http or https"
                )));
            }
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| CliError::Other(format!("cannot start the runtime: {e}")))?;
        Ok(Client {
            settings,
            tls,
            runtime,
        })
    }

    /// Sends a request and returns the answer whatever its status.
    pub fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Reply, CliError> {
        let req = self.build(method, path, body)?;
        self.runtime.block_on(self.exchange(req))
    }

    /// Sends a request; an error status becomes [`CliError::Api`].
    pub fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Reply, CliError> {
        let reply = self.send(method, path, body)?;
        match reply.error() {
            Some(e) => Err(e),
            None => Ok(reply),
        }
    }

    fn build(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Request<Full<Bytes>>, CliError> {
        let s = &self.settings;
        let bad_header = |what: &str| CliError::Usage(format!("{what}: not a valid header value"));
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, format!("{}:{}", s.host, s.port))
            .header(http::header::ACCEPT, "application/json")
            .header(
                http::header::USER_AGENT,
                concat!("dispatch-cli/", env!("CARGO_PKG_VERSION")),
            )
            .header(
                "x-dispatch-org",
                HeaderValue::from_str(&s.organization).map_err(|_| bad_header("organization"))?,
            );
        if let Some(token) = &s.token {
            req = req.header(
                http::header::AUTHORIZATION,
                HeaderValue::from_str(&format!("Bearer {token}"))
                    .map_err(|_| bad_header("token"))?,
            );
        }
        let bytes = match body {
            Some(value) => {
                req = req.header(http::header::CONTENT_TYPE, "application/json");
                Bytes::from(serde_json::to_vec(value).expect("a JSON value serializes"))
            }
            None => Bytes::new(),
        };
        req.body(Full::new(bytes))
            .map_err(|e| CliError::Usage(format!("bad request to {path}: {e}")))
    }

    async fn exchange(&self, req: Request<Full<Bytes>>) -> Result<Reply, CliError> {
        let s = &self.settings;
        let unreachable = |cause: String| CliError::Connect {
            url: s.base_url(),
            cause,
        };
        let connect = tokio::net::TcpStream::connect((s.host.as_str(), s.port));
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(unreachable(e.to_string())),
            Err(_) => {
                return Err(unreachable(format!(
                    "no connection within {}s",
                    CONNECT_TIMEOUT.as_secs()
                )));
            }
        };
        match &self.tls {
            None => self.over(stream, req).await,
            Some(connector) => {
                let name = ServerName::try_from(s.host.clone()).map_err(|_| {
                    CliError::Usage(format!("host \"{}\": not a name TLS can check", s.host))
                })?;
                let handshake = connector.connect(name, stream);
                let tls = match tokio::time::timeout(CONNECT_TIMEOUT, handshake).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        return Err(CliError::Other(format!(
                            "TLS with the gateway at {}: {e} (is its certificate trusted? \
                             --cacert FILE or \"cacert\" in the configuration)",
                            s.base_url()
                        )));
                    }
                    Err(_) => {
                        return Err(unreachable(format!(
                            "no TLS handshake within {}s",
                            CONNECT_TIMEOUT.as_secs()
                        )));
                    }
                };
                self.over(tls, req).await
            }
        }
    }

    /// One request over a connection made (plain or TLS).
    async fn over<IO>(&self, io: IO, req: Request<Full<Bytes>>) -> Result<Reply, CliError>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| CliError::Connect {
                url: self.settings.base_url(),
                cause: error_chain(&e),
            })?;
        tokio::spawn(conn);
        let what = format!("{} {}", req.method(), req.uri());
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| CliError::Other(format!("{what}: {}", error_chain(&e))))?;
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| {
                CliError::Other(format!("{what}: reading the answer: {}", error_chain(&e)))
            })?
            .to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }
}

/// The trust for an https gateway: the certificates of `cacert`, else the system's.
fn tls_connector(settings: &Settings) -> Result<TlsConnector, CliError> {
    if settings.insecure {
        return Err(CliError::Usage(
            "\"insecure\" (no certificate checks) is not supported: trust the gateway's \
             certificate with --cacert FILE or \"cacert\" in the configuration"
                .into(),
        ));
    }
    match &settings.cacert {
        Some(path) => crate::tls::connector(crate::tls::Trust::File(path))
            .map_err(|e| CliError::Usage(format!("cacert {e}"))),
        None => crate::tls::connector(crate::tls::Trust::System).map_err(|e| {
            CliError::Usage(format!(
                "https: {e}; give the gateway's certificate with --cacert FILE"
            ))
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_which_overrides_the_defaults() {
        let file = FileConfig {
            host: Some("gw.example".into()),
            port: Some(9000),
            organization: Some("acme".into()),
            token: Some("from-file".into()),
            ..FileConfig::default()
        };
        let flags = ConnArgs {
            port: Some(9100),
            token: Some("from-flag".into()),
            ..ConnArgs::default()
        };
        let s = Settings::resolve(file, &flags);
        assert_eq!(s.host, "gw.example");
        assert_eq!(s.port, 9100);
        assert_eq!(s.organization, "acme");
        assert_eq!(s.token.as_deref(), Some("from-flag"));
        assert_eq!(s.scheme, "http");

        let s = Settings::resolve(FileConfig::default(), &ConnArgs::default());
        assert_eq!(s.base_url(), "http://127.0.0.1:8080");
        assert_eq!(s.organization, "dispatch");
        assert_eq!(s.token, None);
    }

    #[test]
    fn a_dispatch_config_file_with_other_keys_is_read() {
        let file: FileConfig = serde_json::from_str(
            r#"{"host":"h","port":443,"organization":"o","cookie":"c","insecure":true,"skipauth":false,"Json":false}"#,
        )
        .unwrap();
        assert_eq!(file.port, Some(443));
        assert_eq!(file.insecure, Some(true));
    }

    #[test]
    fn an_error_answer_prints_as_dispatch_did() {
        let reply = Reply {
            status: StatusCode::NOT_FOUND,
            headers: HeaderMap::new(),
            body: Bytes::from_static(br#"{"code":404,"message":"function \"x\" not found"}"#),
        };
        assert_eq!(
            reply.error().unwrap().to_string(),
            "[Code: 404] function \"x\" not found"
        );
        let reply = Reply {
            status: StatusCode::BAD_GATEWAY,
            headers: HeaderMap::new(),
            body: Bytes::from_static(b"upstream down"),
        };
        assert_eq!(
            reply.error().unwrap().to_string(),
            "[Code: 502] upstream down"
        );
    }
}
