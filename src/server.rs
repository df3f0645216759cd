//! The server: opens the store, fills the registry from it, binds the listeners (control,
//! and the API endpoints' HTTP and HTTPS) and serves connections until shutdown, then
//! shuts down in steps: unready (`/readyz` 503) while still serving for the shutdown
//! delay, then stop accepting, then let calls in flight finish within the drain period,
//! and return. Every listener goes through the same steps. SIGHUP reads the TLS
//! certificates again.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::HeaderValue;
use http::header::CONNECTION;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::api::{self, App};
use crate::config::Config;
use crate::drivers::kube::KubeClient;
use crate::drivers::local::LocalFiles;
use crate::invoke::Invoker;
use crate::invoke::headers::Peer;
use crate::metrics::Metrics;
use crate::records::{self, Recorder, Writer};
use crate::registry::Registry;
use crate::store::Store;
use crate::store::postgres::PostgresStore;
use crate::store::sqlite::SqliteStore;
use crate::supervisor::Supervisor;
use crate::tls::Certificate;

/// After the listener closes, how long open connections get to end by themselves (after
/// their next answer) before the idle ones are closed.
const IDLE_CLOSE_AFTER: Duration = Duration::from_secs(1);

/// How long a client gets to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the server could not start; the message names the path, address or key.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StartError(String);

/// A server that is bound and ready to serve.
pub struct Server {
    app: Arc<App>,
    listener: TcpListener,
    /// The control listener's certificate, when it speaks TLS.
    control_tls: Option<Arc<Certificate>>,
    /// The API endpoints' listeners (either may be off).
    api_http: Option<TcpListener>,
    api_https: Option<(TcpListener, Arc<Certificate>)>,
    /// The API certificate was made just now, self-signed (for the start-up line).
    api_cert_made: bool,
    drain: Duration,
    /// On SIGTERM, how long the listener keeps accepting before it closes.
    shutdown_delay: Duration,
    /// The run record writer, flushed after the drain.
    writer: Writer,
    store_name: String,
}

impl Server {
    pub async fn start(config: Config) -> Result<Server, StartError> {
        let metrics = Arc::new(Metrics::new());
        let (store, store_name) = open_store(&config).await?;
        let local_files = LocalFiles::new(&config.server.data_dir).map_err(|e| {
            StartError(format!(
                "server.data_dir: cannot write the local runtimes under {}: {e}",
                config.server.data_dir.display()
            ))
        })?;
        let supervisor = Supervisor::new(
            config.local.clone(),
            config.runtimes.clone(),
            local_files.clone(),
            config.upstream.clone(),
            metrics.clone(),
        );
        let registry = Arc::new(Registry::new(&config, local_files, metrics.clone()));
        // The catalog first: functions name its images and secrets.
        registry
            .catalog
            .load(&*store)
            .await
            .map_err(|e| StartError(format!("store {store_name}: {e}")))?;
        if let Some(changes) = store.watch_catalog() {
            tokio::spawn(registry.catalog.clone().follow(store.clone(), changes));
        }
        let functions = store
            .list_functions()
            .await
            .map_err(|e| StartError(format!("store {store_name}: {e}")))?;
        for function in functions {
            registry.load(function);
        }
        if let Some(changes) = store.watch_functions() {
            tokio::spawn(registry.clone().follow(store.clone(), changes));
        }
        let (auth, kept_token) =
            crate::auth::ControlAuth::load(&config.auth, &config.server.data_dir)
                .map_err(StartError)?;
        if let Some(discovery) = registry.discovery() {
            let client =
                KubeClient::new(&config.openfaas, |k| std::env::var(k).ok()).map_err(StartError)?;
            let registry = registry.clone();
            tokio::spawn(discovery.run(
                client,
                config.openfaas.namespace.clone(),
                move |services| registry.repoint(services),
            ));
        }
        let listen = config.server.listen;
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|e| StartError(format!("server.listen: cannot listen on {listen}: {e}")))?;
        let control_tls = match (&config.server.tls_cert, &config.server.tls_key) {
            (cert, _) if cert.as_os_str().is_empty() => None,
            (cert, key) => Some(
                Certificate::load(cert, key)
                    .map_err(|e| StartError(format!("server.tls_cert: {e}")))?,
            ),
        };
        let (api_http, api_https, api_cert_made) = bind_api(&config).await?;
        if let Some(kept) = kept_token {
            let bound = listener
                .local_addr()
                .map_err(|e| StartError(format!("server.listen: {e}")))?;
            kept.share_with_cli(bound, control_tls.as_ref().map(|cert| cert.cert_file()));
        }

        let (recorder, writer) = Recorder::start(store.clone(), &config.records, metrics.records());
        records::spawn_retention(store.clone(), &config.records);
        let invoker = Invoker::new(
            registry.clone(),
            config.limits.clone(),
            config.upstream.connect_attempts,
            recorder,
            supervisor.clone(),
        );
        let drain = Duration::from_secs(config.server.drain_seconds);
        let shutdown_delay_seconds = config.server.shutdown_delay_seconds;
        let queue = crate::queue::Queue::start(&config, store.clone(), metrics.clone()).await;
        let ingress = crate::ingress::Ingress::new(&config.api.keys);
        let app = Arc::new(App {
            config: Arc::new(config),
            registry,
            invoker,
            store,
            metrics,
            supervisor,
            queue_wake: tokio::sync::Notify::new(),
            queue,
            queue_running: dashmap::DashSet::new(),
            auth,
            ingress,
            accepting: AtomicBool::new(true),
            writes: tokio::sync::Mutex::new(()),
        });
        crate::ingress::Ingress::sweep_limits(&app);
        Ok(Server {
            app,
            listener,
            control_tls,
            api_http,
            api_https,
            api_cert_made,
            drain,
            shutdown_delay: Duration::from_secs(shutdown_delay_seconds),
            writer,
            store_name,
        })
    }

    /// The store, as the start-up line shows it (never with a password).
    pub fn store_name(&self) -> &str {
        &self.store_name
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// `http` or `https`: what the control listener speaks.
    pub fn scheme(&self) -> &'static str {
        if self.control_tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// The API endpoints' listeners, for the start-up line: `http://ADDR`, `https://ADDR
    /// (certificate FILE)`, or that they are off.
    pub fn api_summary(&self) -> String {
        let mut parts = Vec::new();
        if let Some(l) = &self.api_http
            && let Ok(addr) = l.local_addr()
        {
            parts.push(format!("http://{addr}"));
        }
        if let Some((l, cert)) = &self.api_https
            && let Ok(addr) = l.local_addr()
        {
            let made = if self.api_cert_made {
                "self-signed, made now: "
            } else {
                ""
            };
            parts.push(format!(
                "https://{addr} (certificate: {made}{})",
                cert.cert_file().display()
            ));
        }
        if parts.is_empty() {
            "off".to_string()
        } else {
            parts.join(" ")
        }
    }

    /// Serves until `shutdown` resolves, then shuts down in steps (docs/architecture.md,
    /// "Shutdown"): `/readyz` turns 503 and queue workers take no new runs; the listener
    /// keeps accepting for `server.shutdown_delay_seconds`, every response now saying
    /// `Connection: close`; the listener closes; calls in flight drain.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Server {
            app,
            listener,
            control_tls,
            api_http,
            api_https,
            drain,
            shutdown_delay,
            writer,
            ..
        } = self;
        tokio::spawn(crate::queue::work(app.clone()));
        let events = crate::events::amqp::Consumer::start(app.clone());
        let reload = reload_on_hangup(
            control_tls
                .iter()
                .chain(api_https.iter().map(|(_, c)| c))
                .cloned()
                .collect(),
        );
        let mut listeners = vec![Listener {
            tcp: listener,
            role: Role {
                surface: Surface::Control,
                tls: control_tls.as_ref().map(Certificate::acceptor),
            },
        }];
        if let Some(tcp) = api_http {
            listeners.push(Listener {
                tcp,
                role: Role {
                    surface: Surface::Api,
                    tls: None,
                },
            });
        }
        if let Some((tcp, cert)) = api_https {
            listeners.push(Listener {
                tcp,
                role: Role {
                    surface: Surface::Api,
                    tls: Some(cert.acceptor()),
                },
            });
        }
        let graceful = GracefulShutdown::new();
        let mut builder = http1::Builder::new();
        builder.timer(TokioTimer::new()).keep_alive(true);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new());
        // Set once shutting down: each response then ends its keep-alive connection, so a
        // client (a proxy's pool) never sends a request on a connection this server is
        // about to close.
        let closing = Arc::new(AtomicBool::new(false));
        let serve = |stream: TcpStream, peer: SocketAddr, role: &Role| {
            let _ = stream.set_nodelay(true);
            let app = app.clone();
            let closing = closing.clone();
            let client = Arc::new(Peer::new(peer.ip()));
            let surface = role.surface;
            let secure = role.tls.is_some();
            let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let app = app.clone();
                let client = client.clone();
                let closing = closing.clone();
                async move {
                    let http1 = req.version() <= http::Version::HTTP_11;
                    let mut resp = match surface {
                        Surface::Control => api::handle(app, req, &client).await,
                        Surface::Api => crate::ingress::handle(app, req, &client, secure).await,
                    };
                    if http1 && closing.load(Ordering::Relaxed) {
                        resp.headers_mut()
                            .insert(CONNECTION, HeaderValue::from_static("close"));
                    }
                    Ok::<_, Infallible>(resp)
                }
            });
            let Some(acceptor) = role.tls.clone() else {
                let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, %peer, "connection ended with an error");
                    }
                });
                return;
            };
            let watcher = graceful.watcher();
            let (builder, h2) = (builder.clone(), h2.clone());
            tokio::spawn(async move {
                let tls =
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, %peer, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                let negotiated_h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                let io = TokioIo::new(tls);
                let ended = if negotiated_h2 {
                    watcher.watch(h2.serve_connection(io, service)).await
                } else {
                    watcher.watch(builder.serve_connection(io, service)).await
                };
                if let Err(e) = ended {
                    tracing::debug!(error = %e, %peer, "connection ended with an error");
                }
            });
        };
        accept_until(&listeners, shutdown, &serve).await;

        app.accepting.store(false, Ordering::Release);
        closing.store(true, Ordering::Relaxed);
        // The queue workers take no new runs either (they look at `accepting`).
        app.queue_wake.notify_one();
        // Nor does the AMQP event consumer: what it holds is settled, the rest goes back.
        if let Some(events) = events {
            events.stop().await;
        }
        tracing::info!(
            shutdown_delay_seconds = shutdown_delay.as_secs(),
            "shutting down: /readyz answers 503; still accepting until the delay is over"
        );
        accept_until(&listeners, tokio::time::sleep(shutdown_delay), &serve).await;
        for listener in listeners {
            close_listener(listener, &serve);
        }
        tracing::info!(
            drain_seconds = drain.as_secs(),
            "shutting down: listener closed, draining calls in flight"
        );
        // Each connection ends after its next answer (`Connection: close`), so first let
        // them end by themselves: one accepted a moment ago may carry a request not read
        // yet, and closing it as idle would fail that request. What is still open after
        // a moment is idle in some client's pool, and is closed.
        let drained = async {
            let linger_until = tokio::time::Instant::now() + IDLE_CLOSE_AFTER.min(drain);
            while graceful.count() > 0 && tokio::time::Instant::now() < linger_until {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            graceful.shutdown().await;
        };
        let drain_until = tokio::time::Instant::now() + drain;
        tokio::select! {
            () = drained => tracing::info!("drained"),
            () = tokio::time::sleep_until(drain_until) => tracing::warn!("drain period over; cutting the calls still in flight"),
        }
        // The async runs running here get what is left of the drain period to end (the
        // workers took no new ones since `accepting` was cleared).
        if !app.queue_running.is_empty() {
            tracing::info!(
                running = app.queue_running.len(),
                "shutting down: waiting for the async runs still running"
            );
            while !app.queue_running.is_empty() && tokio::time::Instant::now() < drain_until {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        // Those still running go back to the queue now, for another gateway (or this
        // one's next start) to take at once, rather than after their hold.
        crate::queue::release(&app).await;
        writer.flush_and_stop().await;
        tracing::info!("run records flushed");
        reload.abort();
    }
}

/// Which handler a listener's requests go to.
#[derive(Clone, Copy)]
enum Surface {
    /// The control API, the OpenFaaS surface and the operator endpoints.
    Control,
    /// API endpoints (`ingress/`).
    Api,
}

/// A bound listener and its role.
struct Listener {
    tcp: TcpListener,
    role: Role,
}

/// What a listener serves, and its TLS (when it speaks it).
struct Role {
    surface: Surface,
    tls: Option<TlsAcceptor>,
}

/// Binds the API endpoints' listeners that are on, with the HTTPS one's certificate: the
/// configured files, or else the self-signed pair of the data dir (made if missing).
async fn bind_api(
    config: &Config,
) -> Result<
    (
        Option<TcpListener>,
        Option<(TcpListener, Arc<Certificate>)>,
        bool,
    ),
    StartError,
> {
    let bind = |key: &'static str, addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|e| StartError(format!("{key}: cannot listen on {addr}: {e}")))
    };
    let http = match config.api.http_addr() {
        Some(addr) => Some(bind("api.http", addr).await?),
        None => None,
    };
    let Some(addr) = config.api.https_addr() else {
        return Ok((http, None, false));
    };
    let (cert, key, made) = if config.api.tls_cert.as_os_str().is_empty() {
        crate::tls::self_signed(&config.server.data_dir)
            .map_err(|e| StartError(format!("api.tls_cert (none set, so self-signed): {e}")))?
    } else {
        (
            config.api.tls_cert.clone(),
            config.api.tls_key.clone(),
            false,
        )
    };
    let certificate =
        Certificate::load(&cert, &key).map_err(|e| StartError(format!("api.tls_cert: {e}")))?;
    if made {
        tracing::info!(cert = %cert.display(), key = %key.display(), "made a self-signed certificate for localhost for the API endpoints");
    }
    Ok((
        http,
        Some((bind("api.https", addr).await?, certificate)),
        made,
    ))
}

/// Reads every certificate again on each SIGHUP; one that fails keeps serving its old
/// pair, and says why.
fn reload_on_hangup(certificates: Vec<Arc<Certificate>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            let Ok(mut hangup) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            else {
                tracing::warn!("cannot install a SIGHUP handler: certificates will not reload");
                return;
            };
            while hangup.recv().await.is_some() {
                for certificate in &certificates {
                    match certificate.reload() {
                        Ok(()) => {
                            tracing::info!(cert = %certificate.cert_file().display(), "certificate reloaded")
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "certificate not reloaded; the one in use stays")
                        }
                    }
                }
            }
        }
        #[cfg(not(unix))]
        drop(certificates);
    })
}

/// Accepts connections on every listener and hands each to `serve` until `until`
/// resolves.
async fn accept_until(
    listeners: &[Listener],
    until: impl Future<Output = ()>,
    serve: &impl Fn(TcpStream, SocketAddr, &Role),
) {
    tokio::pin!(until);
    let accept_any = || {
        std::future::poll_fn(|cx| {
            for listener in listeners {
                if let std::task::Poll::Ready(accepted) = listener.tcp.poll_accept(cx) {
                    return std::task::Poll::Ready((&listener.role, accepted));
                }
            }
            std::task::Poll::Pending
        })
    };
    loop {
        tokio::select! {
            (role, accepted) = accept_any() => match accepted {
                Ok((stream, peer)) => serve(stream, peer, role),
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = &mut until => return,
        }
    }
}

/// Closes a listener after serving the connections the kernel has already completed:
/// their clients may have sent a request on them, and closing would reset them, a
/// failure a proxy does not retry for a POST. A client connecting after this is refused,
/// which a proxy retries on another upstream.
fn close_listener(listener: Listener, serve: &impl Fn(TcpStream, SocketAddr, &Role)) {
    let Listener { tcp, role } = listener;
    let Ok(tcp) = tcp.into_std() else {
        return;
    };
    // Still non-blocking: `accept` answers WouldBlock once the queue is empty.
    while let Ok((stream, peer)) = tcp.accept() {
        match stream
            .set_nonblocking(true)
            .and_then(|()| TcpStream::from_std(stream))
        {
            Ok(stream) => serve(stream, peer, &role),
            Err(e) => tracing::warn!(error = %e, %peer, "a last connection could not be served"),
        }
    }
}

/// The configured store: SQLite in the data dir, or PostgreSQL at `store.url`. Also gives
/// its name for messages (a PostgreSQL URL without its password).
async fn open_store(config: &Config) -> Result<(Arc<dyn Store>, String), StartError> {
    if config.store.url.is_empty() {
        let store = SqliteStore::open(&config.server.data_dir)
            .map_err(|e| StartError(format!("store: {e}")))?;
        let name = format!("sqlite {}", store.path.display());
        return Ok((Arc::new(store), name));
    }
    let store = PostgresStore::connect(&config.store.url)
        .await
        .map_err(|e| StartError(format!("store.url: {e}")))?;
    let name = store.url().to_string();
    Ok((Arc::new(store), name))
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
