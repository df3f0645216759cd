//! RabbitMQ for the tests: the machine's broker (127.0.0.1:5672, guest/guest), shared by
//! every test and every engineer on the machine. Each test gets queues of its own (a
//! unique `queue.name_prefix`), deleted when it ends. Without the broker, the test fails
//! and says so.

use std::time::{Duration, Instant};

use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};

pub const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The queues of one test: `<prefix>.runs`, `<prefix>.dead`, `<prefix>.delay.*`.
pub struct TestQueues {
    pub prefix: String,
}

impl TestQueues {
    /// Waits for the broker (another test may be restarting it) up to a minute.
    pub async fn new() -> Self {
        connect().await;
        TestQueues {
            prefix: format!("dispatch-test-{}", uuid::Uuid::new_v4().simple()),
        }
    }

    /// The gateway's environment for the `rabbitmq` backend on these queues.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("DISPATCH_QUEUE_BACKEND", "rabbitmq".into()),
            ("DISPATCH_QUEUE_URL", URL.into()),
            ("DISPATCH_QUEUE_NAME_PREFIX", self.prefix.clone()),
        ]
    }

    /// Messages ready in `<prefix>.<suffix>` (`runs`, `dead`), as the broker says now.
    pub async fn depth(&self, suffix: &str) -> u32 {
        let conn = connect().await;
        let channel = conn.create_channel().await.expect("a channel");
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let queue = channel
            .queue_declare(
                format!("{}.{suffix}", self.prefix).into(),
                passive,
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("queue {}.{suffix}: {e}", self.prefix));
        let _ = conn.close(200, "done".into()).await;
        queue.message_count()
    }
}

/// A connection to the broker, waiting for it up to a minute; panics naming it.
pub async fn connect() -> Connection {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        match Connection::connect(URL, ConnectionProperties::default()).await {
            Ok(conn) => return conn,
            Err(e) if Instant::now() > until => {
                panic!("RabbitMQ at 127.0.0.1:5672 (guest/guest) is unreachable: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// Lists the broker's queues with `rabbitmqctl`.
pub fn queue_names() -> Vec<String> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["list_queues", "name", "-q", "--no-table-headers"])
        .output()
        .expect("running rabbitmqctl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

impl Drop for TestQueues {
    fn drop(&mut self) {
        let prefix = format!("{}.", self.prefix);
        // Drop cannot await, and the test's runtime may be unwinding: a thread and a
        // runtime of its own.
        let _ = std::thread::spawn(move || {
            let names: Vec<String> = queue_names()
                .into_iter()
                .filter(|n| n.starts_with(&prefix))
                .collect();
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(async {
                    let Ok(conn) = Connection::connect(URL, ConnectionProperties::default()).await
                    else {
                        return;
                    };
                    let Ok(channel) = conn.create_channel().await else {
                        return;
                    };
                    for name in names {
                        let _ = channel
                            .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                            .await;
                    }
                    let _ = conn.close(200, "done".into()).await;
                })
        })
        .join();
    }
}

/// A TCP proxy in front of the broker that can go silent: once [`StallingProxy::stall`]
/// is called, the connections it carries stop moving bytes either way and new ones are
/// taken and never answered, all without a close or a reset, as a network that drops
/// packets (or a frozen broker) would do. After [`StallingProxy::resume`], new
/// connections go through again; the stalled ones stay stalled.
pub struct StallingProxy {
    port: u16,
    stalled: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl StallingProxy {
    pub async fn start() -> StallingProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let (stalled, watch) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                let mut watch = watch.clone();
                tokio::spawn(async move {
                    let stalled = *watch.borrow();
                    let _broker = if stalled {
                        None
                    } else {
                        let mut broker = tokio::net::TcpStream::connect("127.0.0.1:5672")
                            .await
                            .expect("RabbitMQ at 127.0.0.1:5672 is unreachable");
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut broker) => return,
                            _ = watch.wait_for(|stalled| *stalled) => {}
                        }
                        Some(broker)
                    };
                    // Stalled: both sockets held open, carrying nothing, until the test ends.
                    std::future::pending::<()>().await;
                });
            }
        });
        StallingProxy {
            port,
            stalled,
            task,
        }
    }

    /// The broker's URL through this proxy.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    pub fn stall(&self) {
        self.stalled.send_replace(true);
    }

    pub fn resume(&self) {
        self.stalled.send_replace(false);
    }
}

impl Drop for StallingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
