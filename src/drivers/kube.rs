//! A small Kubernetes API client: `GET` over HTTP/1.1 with the service account's bearer
//! token, over TLS (rustls, trusting the cluster CA) for `https://` and plain TCP for
//! `http://` (tests, `kubectl proxy`). Pod discovery needs two calls, a list and a watch,
//! both `GET`s whose answer is JSON: a client this size is all it takes, where kube-rs
//! would bring its own HTTP stack, TLS and a large dependency tree.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::OpenfaasConfig;

/// Time to open a connection (TCP and TLS) to the API server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time for the API server to answer with a response head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest error body read back for a message.
const ERROR_BODY_BYTES: usize = 64 * 1024;

pub struct KubeClient {
    /// `host:port` to connect to (and the `Host` header).
    authority: String,
    /// `https://host:port` or `http://host:port`, for messages.
    base: String,
    /// The TLS connector and the name the server's certificate must carry; `None` for http.
    tls: Option<(TlsConnector, ServerName<'static>)>,
    /// Read on every request: projected service account tokens rotate.
    token_file: PathBuf,
}

impl KubeClient {
    /// The client `config` describes; an empty `kube_api` means the in-cluster address,
    /// taken from `env` (`KUBERNETES_SERVICE_HOST`, `KUBERNETES_SERVICE_PORT`). The error
    /// names the setting that is missing or wrong.
    pub fn new(
        config: &OpenfaasConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<KubeClient, String> {
        let base = if config.kube_api.is_empty() {
            let host = env("KUBERNETES_SERVICE_HOST").filter(|h| !h.is_empty()).ok_or(
                "openfaas.discovery is on but openfaas.kube_api is empty and KUBERNETES_SERVICE_HOST is not set (not in a cluster?)",
            )?;
            let port = env("KUBERNETES_SERVICE_PORT").unwrap_or_else(|| "443".into());
            let host = if host.contains(':') {
                format!("[{host}]")
            } else {
                host
            };
            format!("https://{host}:{port}")
        } else {
            config.kube_api.trim_end_matches('/').to_string()
        };
        let uri: http::Uri = base
            .parse()
            .map_err(|e| format!("openfaas.kube_api: \"{base}\" is not a URL ({e})"))?;
        let https = uri.scheme_str() == Some("https");
        let authority = uri
            .authority()
            .ok_or_else(|| format!("openfaas.kube_api: \"{base}\" has no host"))?;
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let host = authority.host().to_string();
        let tls = if https {
            let name = ServerName::try_from(host.trim_matches(['[', ']']).to_string())
                .map_err(|e| format!("openfaas.kube_api: \"{host}\" is not a server name ({e})"))?;
            Some((tls_connector(config)?, name))
        } else {
            None
        };
        Ok(KubeClient {
            authority: format!("{host}:{port}"),
            base: format!("{}://{host}:{port}", if https { "https" } else { "http" }),
            tls,
            token_file: config.kube_token_file.clone(),
        })
    }

    /// Where the API is, for messages.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `GET path` (with its query). Gives the response once its head is in, whatever its
    /// status; the body streams (a watch's never ends on its own).
    pub async fn get(&self, path: &str) -> Result<Response<Incoming>, String> {
        let mut req = Request::get(path)
            .header(header::HOST, &self.authority)
            .header(header::ACCEPT, "application/json")
            .header(header::USER_AGENT, "dispatch-gateway")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("bad API path {path}: {e}"))?;
        // No token file outside a cluster (a test API, kubectl proxy): no header.
        if let Ok(token) = std::fs::read_to_string(&self.token_file) {
            let value = format!("Bearer {}", token.trim());
            let value = value
                .parse()
                .map_err(|_| format!("{}: not a token", self.token_file.display()))?;
            req.headers_mut().insert(header::AUTHORIZATION, value);
        }
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.authority))
            .await
            .map_err(|_| format!("connecting to {}: timed out", self.base))?
            .map_err(|e| format!("connecting to {}: {e}", self.base))?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => self.send(tcp, req).await,
            Some((connector, name)) => {
                let tls =
                    tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name.clone(), tcp))
                        .await
                        .map_err(|_| format!("TLS handshake with {}: timed out", self.base))?
                        .map_err(|e| format!("TLS handshake with {}: {e}", self.base))?;
                self.send(tls, req).await
            }
        }
    }

    async fn send<IO>(
        &self,
        io: IO,
        req: Request<Empty<Bytes>>,
    ) -> Result<Response<Incoming>, String>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| format!("{}: {e}", self.base))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "Kubernetes API connection ended");
            }
        });
        tokio::time::timeout(HEAD_TIMEOUT, sender.send_request(req))
            .await
            .map_err(|_| format!("{}: no answer within {HEAD_TIMEOUT:?}", self.base))?
            .map_err(|e| format!("{}: {e}", self.base))
    }
}

/// The text of an answer that is not a success, for a message: the API's `Status`
/// message when it sent one, else the start of the body.
pub async fn error_text(resp: Response<Incoming>) -> String {
    let status = resp.status();
    let body = match Limited::new(resp.into_body(), ERROR_BODY_BYTES)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let message = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned());
    format!("HTTP {status}: {message}")
}

/// TLS that trusts the cluster CA alone.
fn tls_connector(config: &OpenfaasConfig) -> Result<TlsConnector, String> {
    crate::tls::connector(crate::tls::Trust::File(&config.kube_ca_file))
        .map_err(|e| format!("openfaas.kube_ca_file: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(kube_api: &str, ca: &str) -> OpenfaasConfig {
        let mut c = crate::config::Config::defaults().openfaas;
        c.kube_api = kube_api.into();
        c.kube_ca_file = ca.into();
        c
    }

    #[test]
    fn in_cluster_address_comes_from_the_environment() {
        let none = |_: &str| None;
        let e = KubeClient::new(&config("", "/nonexistent"), none)
            .err()
            .unwrap();
        assert!(e.contains("KUBERNETES_SERVICE_HOST"), "{e}");
        let env = |k: &str| match k {
            "KUBERNETES_SERVICE_HOST" => Some("10.96.0.1".to_string()),
            "KUBERNETES_SERVICE_PORT" => Some("6443".to_string()),
            _ => None,
        };
        // https needs the CA: its absence is named.
        let e = KubeClient::new(&config("", "/nonexistent/ca.crt"), env)
            .err()
            .unwrap();
        assert!(
            e.contains("kube_ca_file") && e.contains("/nonexistent/ca.crt"),
            "{e}"
        );
        let c = KubeClient::new(&config("http://127.0.0.1:8001/", ""), none).unwrap();
        assert_eq!(c.base(), "http://127.0.0.1:8001");
        assert_eq!(c.authority, "127.0.0.1:8001");
    }
}
