//! The server: opens the store, fills the registry from it, binds the listener and serves
//! connections until shutdown, then drains: stop accepting, let calls in flight finish
//! within the drain period, return.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::api::{self, App};
use crate::config::Config;
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

/// Why the server could not start; the message names the path, address or key.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StartError(String);

/// A server that is bound and ready to serve.
pub struct Server {
    app: Arc<App>,
    listener: TcpListener,
    drain: Duration,
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
        let listen = config.server.listen;
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|e| StartError(format!("server.listen: cannot listen on {listen}: {e}")))?;

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
        let submitter = crate::queue::Submitter::start(store.clone());
        let app = Arc::new(App {
            config: Arc::new(config),
            registry,
            invoker,
            store,
            metrics,
            supervisor,
            queue_wake: tokio::sync::Notify::new(),
            submitter,
            queue_running: dashmap::DashSet::new(),
            accepting: AtomicBool::new(true),
            writes: tokio::sync::Mutex::new(()),
        });
        Ok(Server {
            app,
            listener,
            drain,
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

    /// Serves until `shutdown` resolves, then drains.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Server {
            app,
            listener,
            drain,
            writer,
            ..
        } = self;
        tokio::spawn(crate::queue::work(app.clone()));
        let events = crate::events::amqp::Consumer::start(app.clone());
        let graceful = GracefulShutdown::new();
        let mut builder = http1::Builder::new();
        builder.timer(TokioTimer::new()).keep_alive(true);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(accepted) => accepted,
                        Err(e) => {
                            // Out of file descriptors and the like: back off instead of spinning.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                                        let app = app.clone();
                    let client = Arc::new(Peer::new(peer.ip()));
                    let service = service_fn(move |req| {
                        let app = app.clone();
                        let client = client.clone();
                        async move { Ok::<_, Infallible>(api::handle(app, req, &client).await) }
                    });
                    let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::debug!(error = %e, %peer, "connection ended with an error");
                        }
                    });
                }
                () = &mut shutdown => break,
            }
        }
        drop(listener);
        app.accepting.store(false, Ordering::Release);
        // The queue workers take no new runs either (they look at `accepting`).
        app.queue_wake.notify_one();
        // Nor does the AMQP event consumer: what it holds is settled, the rest goes back.
        if let Some(events) = events {
            events.stop().await;
        }
        tracing::info!(
            drain_seconds = drain.as_secs(),
            "shutting down: listener closed, draining calls in flight"
        );
        tokio::select! {
            () = graceful.shutdown() => tracing::info!("drained"),
            () = tokio::time::sleep(drain) => tracing::warn!("drain period over; cutting the calls still in flight"),
        }
        // Async runs still running here go back to the queue now, for another gateway (or
        // this one's next start) to take at once, rather than after their hold.
        crate::queue::release(&app).await;
        writer.flush_and_stop().await;
        tracing::info!("run records flushed");
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
