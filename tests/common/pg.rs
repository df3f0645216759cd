//! A PostgreSQL database of one test's own, on the machine's server (127.0.0.1:5432, user
//! `postgres`, trust auth). Without the server, the test fails and says so.

use std::time::Duration;

pub use dispatch::error::error_chain as chain;
use tokio_postgres::NoTls;

/// A database of one test's own, dropped (connections and all) when the test ends.
pub struct TestDatabase {
    pub name: String,
}

impl TestDatabase {
    pub async fn create() -> Self {
        let name = format!("dispatch_test_{}", uuid::Uuid::new_v4().simple());
        admin()
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|e| panic!("cannot create database {name}: {e}"));
        TestDatabase { name }
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:5432/{}", self.name)
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Drop cannot await, and the test's runtime may be unwinding a failed assertion:
        // drop the database from a thread and runtime of its own.
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        let dropped = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(async { admin().await.batch_execute(&sql).await })
        })
        .join();
        if let Ok(Err(e)) = dropped {
            eprintln!("cannot drop test database {}: {e}", self.name);
        }
    }
}

/// A connection to the `postgres` database, to create and drop test databases.
pub async fn admin() -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(5432)
        .user("postgres")
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(5))
        .connect(NoTls)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "PostgreSQL at 127.0.0.1:5432 is not reachable: {} \
                 (these tests need it, user postgres with trust auth)",
                chain(&e)
            )
        });
    tokio::spawn(connection);
    client
}

/// A TCP relay to the PostgreSQL server that a test can cut and restore: the store "goes
/// away" for the gateway behind it without touching the server the other tests share.
pub struct Relay {
    pub port: u16,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Bumped by every cut: relayed connections of an older generation close.
    generation: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Relay {
    pub async fn start() -> Relay {
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = std::sync::Arc::new(AtomicBool::new(true));
        let generation = std::sync::Arc::new(tokio::sync::watch::channel(0u64).0);
        let accept = {
            let (up, generation) = (up.clone(), generation.clone());
            tokio::spawn(async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    if !up.load(Ordering::SeqCst) {
                        continue; // dropped: the connection closes at once
                    }
                    let mut cut = generation.subscribe();
                    let born = *cut.borrow();
                    tokio::spawn(async move {
                        let Ok(mut server) = tokio::net::TcpStream::connect("127.0.0.1:5432").await
                        else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                            _ = cut.wait_for(|g| *g != born) => {}
                        }
                    });
                }
            })
        };
        Relay {
            port,
            up,
            generation,
            accept,
        }
    }

    /// The URL of `db` through the relay.
    pub fn url(&self, db: &TestDatabase) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{}", self.port, db.name)
    }

    /// Closes every relayed connection and refuses new ones.
    pub fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    pub fn restore(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
        self.generation.send_modify(|g| *g += 1);
    }
}
