//! A real TLS client for the gateway's HTTPS listeners: rustls, trusting only the
//! certificate given (the gateway's self-signed one, or a test's own), HTTP/1.1 or HTTP/2
//! by ALPN, and the TLS versions asked for.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::{PATIENCE, Reply, read_reply};

/// How a [`TlsClient`] connects.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Versions {
    Any,
    Tls12Only,
    Tls13Only,
}

#[derive(Clone)]
pub struct TlsClient {
    connector: TlsConnector,
    server_name: ServerName<'static>,
}

/// What a TLS connection agreed on.
pub struct Agreed {
    pub version: rustls::ProtocolVersion,
    pub alpn: Option<Vec<u8>>,
    /// The certificate the server presented (DER).
    pub certificate: Vec<u8>,
}

impl TlsClient {
    /// Trusts the certificates of the PEM file `ca` alone; names the server `localhost`.
    pub fn trusting(ca: &Path) -> TlsClient {
        Self::with(ca, Versions::Any, &[b"http/1.1"])
    }

    pub fn with(ca: &Path, versions: Versions, alpn: &[&[u8]]) -> TlsClient {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).expect("CA file") {
            roots.add(cert.expect("CA certificate")).expect("add CA");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let versions: &[&'static rustls::SupportedProtocolVersion] = match versions {
            Versions::Any => &[&rustls::version::TLS13, &rustls::version::TLS12],
            Versions::Tls12Only => &[&rustls::version::TLS12],
            Versions::Tls13Only => &[&rustls::version::TLS13],
        };
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        // Every connection a full handshake: a resumed one shows no certificate.
        config.resumption = rustls::client::Resumption::disabled();
        TlsClient {
            connector: TlsConnector::from(Arc::new(config)),
            server_name: ServerName::try_from("localhost").expect("name"),
        }
    }

    /// Connects and shakes hands; the error says why (a refused certificate shows here).
    pub async fn connect(&self, addr: SocketAddr) -> Result<TlsConnection, String> {
        let work = async {
            let tcp = TcpStream::connect(addr)
                .await
                .map_err(|e| format!("connect {addr}: {e}"))?;
            let tls = self
                .connector
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(|e| format!("TLS handshake with {addr}: {e}"))?;
            let (_, session) = tls.get_ref();
            let agreed = Agreed {
                version: session.protocol_version().expect("after the handshake"),
                alpn: session.alpn_protocol().map(|p| p.to_vec()),
                certificate: session
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| c.to_vec())
                    .unwrap_or_default(),
            };
            let io = TokioIo::new(tls);
            let sender = if agreed.alpn.as_deref() == Some(b"h2") {
                let (sender, conn) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                        .await
                        .map_err(|e| format!("h2 handshake: {e}"))?;
                tokio::spawn(conn);
                Sender::H2(sender)
            } else {
                let (sender, conn) = hyper::client::conn::http1::handshake(io)
                    .await
                    .map_err(|e| format!("http1 handshake: {e}"))?;
                tokio::spawn(conn);
                Sender::H1(sender)
            };
            Ok(TlsConnection {
                addr,
                sender,
                agreed,
            })
        };
        tokio::time::timeout(PATIENCE, work)
            .await
            .map_err(|_| format!("no TLS connection to {addr} within {PATIENCE:?}"))?
    }

    /// One request on a new connection.
    pub async fn request(
        &self,
        addr: SocketAddr,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Result<Reply, String> {
        let mut conn = self.connect(addr).await?;
        conn.request(method, path, headers, body).await
    }
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

/// A kept-alive TLS connection.
pub struct TlsConnection {
    addr: SocketAddr,
    sender: Sender,
    pub agreed: Agreed,
}

impl TlsConnection {
    pub async fn request(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Result<Reply, String> {
        let h2 = matches!(self.sender, Sender::H2(_));
        let uri = if h2 {
            format!("https://localhost:{}{path}", self.addr.port())
        } else {
            path.to_string()
        };
        let mut req = Request::builder().method(method).uri(uri);
        if !h2 && !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            req = req.header("host", format!("localhost:{}", self.addr.port()));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("request");
        let sender = &mut self.sender;
        let send = async move {
            match sender {
                Sender::H1(s) => s.send_request(req).await,
                Sender::H2(s) => s.send_request(req).await,
            }
        };
        let resp = tokio::time::timeout(PATIENCE, send)
            .await
            .map_err(|_| "no answer".to_string())?
            .map_err(|e| format!("request: {e}"))?;
        Ok(read_reply(resp).await)
    }
}
