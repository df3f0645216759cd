//! The supervisor of local runtime processes: for each local function, a group of
//! `local.processes` runtime processes, started on first use (or at registration), each
//! serving at most `local.process_concurrency` calls at once. A call takes a [`Lease`] on a
//! process (the least busy one), goes through that process's connection pool like any
//! upstream call, and gives the lease back when it ends.
//!
//! A process that dies is replaced, after a backoff that grows while it keeps dying; a call
//! past its deadline kills the process that runs it (a runtime cannot stop a handler that
//! loops), and idle groups are stopped after `local.idle_seconds`. Each process holds a pipe
//! to the gateway on its stdin and exits when it closes, so runtimes die with the gateway,
//! however it dies.

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::config::{LocalConfig, RuntimesConfig, UpstreamConfig};
use crate::drivers::Target;
use crate::drivers::local::{LocalFiles, LocalSpec, Said};
use crate::invoke::pool::{HostPool, Pools};
use crate::metrics::Metrics;

/// Why a call could not get a process.
#[derive(Debug)]
pub enum LeaseError {
    /// The function's processes could not be started; says why.
    Start(String),
    /// No process had a free slot before the call's deadline.
    Deadline,
}

pub struct Supervisor {
    config: LocalConfig,
    runtimes: RuntimesConfig,
    files: LocalFiles,
    pools: Pools,
    groups: DashMap<String, Arc<Group>>,
    /// Milliseconds since this clock's start, for idle times and backoff.
    clock: Instant,
}

/// One function's processes.
struct Group {
    spec: LocalSpec,
    procs: Mutex<Vec<Arc<Proc>>>,
    /// Held while processes are being started, so a burst of first calls starts them once.
    starting: tokio::sync::Mutex<()>,
    last_used_ms: AtomicU64,
    /// Set when the function is gone or changed: its processes are not replaced.
    retired: AtomicBool,
    /// Consecutive early deaths or failed starts: the backoff grows with them.
    failures: AtomicU32,
    /// No start before this time (the backoff), in the supervisor's clock.
    not_before_ms: AtomicU64,
}

/// One runtime process.
struct Proc {
    pool: Arc<HostPool>,
    /// Free call slots; closed when the process is gone, which wakes its waiters.
    slots: Arc<Semaphore>,
    kill: Notify,
    /// Set when the gateway stops the process on purpose (idle, retired, deadline).
    stopping: AtomicBool,
    /// How it ended, once it has.
    exit: OnceLock<String>,
    started: Instant,
}

impl Proc {
    /// Takes the process out of service at once (no new call gets it), then kills it.
    fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.slots.close();
        self.kill.notify_one();
    }
}

/// A call's hold on one process slot.
pub struct Lease {
    proc: Arc<Proc>,
    _slot: OwnedSemaphorePermit,
}

impl Lease {
    pub fn pool(&self) -> &Arc<HostPool> {
        &self.proc.pool
    }

    /// Kills the process: what a call past its deadline does, since the runtime cannot
    /// stop the handler (the process is replaced for the calls that follow).
    pub fn kill(&self) {
        self.proc.stop();
    }

    /// How the process ended, if it has (for the error of a call it took down with it).
    pub fn exit(&self) -> Option<&str> {
        self.proc.exit.get().map(String::as_str)
    }
}

impl Supervisor {
    pub fn new(
        config: LocalConfig,
        runtimes: RuntimesConfig,
        files: LocalFiles,
        upstream: UpstreamConfig,
        metrics: Arc<Metrics>,
    ) -> Arc<Supervisor> {
        let supervisor = Arc::new(Supervisor {
            config,
            runtimes,
            files,
            pools: Pools::new(upstream, metrics),
            groups: DashMap::new(),
            clock: Instant::now(),
        });
        if supervisor.config.idle_seconds > 0 {
            tokio::spawn(sweep_idle(Arc::downgrade(&supervisor)));
        }
        supervisor
    }

    pub fn config(&self) -> &LocalConfig {
        &self.config
    }

    pub fn runtimes(&self) -> &RuntimesConfig {
        &self.runtimes
    }

    pub fn files(&self) -> &LocalFiles {
        &self.files
    }

    fn now_ms(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    /// The group running `spec`; a group for an older spec of the same function is retired.
    fn group(&self, spec: &LocalSpec) -> Arc<Group> {
        if let Some(group) = self.groups.get(&spec.function)
            && group.spec == *spec
        {
            return group.clone();
        }
        let group = Arc::new(Group {
            spec: spec.clone(),
            procs: Mutex::new(Vec::new()),
            starting: tokio::sync::Mutex::new(()),
            last_used_ms: AtomicU64::new(self.now_ms()),
            retired: AtomicBool::new(false),
            failures: AtomicU32::new(0),
            not_before_ms: AtomicU64::new(0),
        });
        if let Some(old) = self.groups.insert(spec.function.clone(), group.clone()) {
            old.retire();
        }
        group
    }

    /// Starts a function's processes now (`local.start = "registration"`).
    pub async fn warm(self: &Arc<Self>, spec: &LocalSpec) -> Result<(), String> {
        let group = self.group(spec);
        self.start(&group).await
    }

    /// Stops a function's processes: it was deleted or changed.
    pub fn forget(&self, function: &str) {
        if let Some((_, group)) = self.groups.remove(function) {
            group.retire();
        }
    }

    /// Stops the processes of `spec` if they are still what its function runs (a build that
    /// turned out unwanted; a newer registration's processes are left alone).
    pub fn forget_spec(&self, spec: &LocalSpec) {
        if let Some((_, group)) = self
            .groups
            .remove_if(&spec.function, |_, g| g.spec == *spec)
        {
            group.retire();
        }
    }

    /// A slot on one of the function's processes, starting them if none runs; waits for a
    /// free slot until `deadline`.
    pub async fn lease(
        self: &Arc<Self>,
        spec: &LocalSpec,
        deadline: tokio::time::Instant,
    ) -> Result<Lease, LeaseError> {
        let group = self.group(spec);
        group.last_used_ms.store(self.now_ms(), Ordering::Relaxed);
        loop {
            let procs = group.live();
            if procs.is_empty() {
                tokio::select! {
                    started = self.start(&group) => started.map_err(LeaseError::Start)?,
                    () = tokio::time::sleep_until(deadline) => return Err(LeaseError::Deadline),
                }
                continue;
            }
            // The least busy process, if it has a free slot.
            let least_busy = procs
                .iter()
                .max_by_key(|p| p.slots.available_permits())
                .expect("not empty");
            if let Ok(slot) = least_busy.slots.clone().try_acquire_owned() {
                return Ok(Lease {
                    proc: least_busy.clone(),
                    _slot: slot,
                });
            }
            // All busy: wait for a slot on one of them (a process that dies closes its slots,
            // which sends this round again).
            let proc = procs[fastrand::usize(..procs.len())].clone();
            tokio::select! {
                slot = proc.slots.clone().acquire_owned() => {
                    if let Ok(slot) = slot {
                        return Ok(Lease { proc, _slot: slot });
                    }
                }
                () = tokio::time::sleep_until(deadline) => return Err(LeaseError::Deadline),
            }
        }
    }

    /// Starts the group's processes unless they run; one caller starts them, the others
    /// wait for it. Waits out the backoff after failures.
    async fn start(self: &Arc<Self>, group: &Arc<Group>) -> Result<(), String> {
        let _one_at_a_time = group.starting.lock().await;
        if !group.live().is_empty() {
            return Ok(());
        }
        let wait = group
            .not_before_ms
            .load(Ordering::Relaxed)
            .saturating_sub(self.now_ms());
        if wait > 0 {
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
        group.spec.unpack().await?;
        let first = self.spawn(group).await;
        if let Err(why) = &first {
            group.backoff(self, true);
            tracing::warn!(function = %group.spec.function, error = %why, "runtime did not start");
        }
        first?;
        for _ in 1..self.config.processes {
            if let Err(why) = self.spawn(group).await {
                tracing::warn!(function = %group.spec.function, error = %why, "runtime did not start");
            }
        }
        Ok(())
    }

    /// Starts one process and waits until it listens.
    async fn spawn(self: &Arc<Self>, group: &Arc<Group>) -> Result<(), String> {
        let spec = &group.spec;
        let interpreter = self.runtimes.interpreter(spec.runtime);
        let mut child = Command::new(interpreter)
            .arg(self.files.script(spec.runtime))
            .arg("--dir")
            .arg(&spec.dir)
            .arg("--handler")
            .arg(&spec.handler)
            .arg("--max-log-bytes")
            .arg(self.config.max_log_bytes.to_string())
            .arg("--exit-with-stdin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot run the {} interpreter \"{interpreter}\": {e}",
                    spec.runtime.as_str()
                )
            })?;
        let pid = child.id().unwrap_or(0);
        tokio::spawn(relay_stderr(
            spec.function.clone(),
            pid,
            child.stderr.take().expect("stderr is piped"),
        ));
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout is piped")).lines();
        let timeout = Duration::from_millis(self.config.start_timeout_ms);
        let said = match tokio::time::timeout(timeout, stdout.next_line()).await {
            Err(_) => Err(format!(
                "the runtime did not listen within {} ms",
                timeout.as_millis()
            )),
            Ok(Ok(Some(line))) => serde_json::from_str::<Said>(&line)
                .map_err(|_| format!("the runtime said something unexpected: {line}")),
            Ok(_) => {
                let status = child.wait().await.map_err(|e| e.to_string())?;
                Err(format!("the runtime exited ({status}) before listening"))
            }
        }?;
        let addr = match said {
            Said {
                listening: Some(addr),
                ..
            } => addr,
            Said {
                reason: Some(reason),
                ..
            } => return Err(reason),
            _ => return Err("the runtime said neither where it listens nor why not".into()),
        };
        let pool = self.pools.get(
            &Target {
                origin: format!("http://{addr}"),
                authority: addr.clone(),
                path_prefix: String::new(),
            },
            false,
        );
        let proc = Arc::new(Proc {
            pool,
            slots: Arc::new(Semaphore::new(self.config.process_concurrency)),
            kill: Notify::new(),
            stopping: AtomicBool::new(false),
            exit: OnceLock::new(),
            started: Instant::now(),
        });
        group.procs.lock().expect("procs lock").push(proc.clone());
        tracing::info!(function = %spec.function, pid, addr = %addr, runtime = spec.runtime.as_str(), "runtime started");
        tokio::spawn(watch(self.clone(), group.clone(), proc, child, pid, stdout));
        Ok(())
    }

    /// Stops the processes of groups unused for `local.idle_seconds` with no call in flight.
    fn stop_idle(&self) {
        let idle_ms = self.config.idle_seconds * 1000;
        let now = self.now_ms();
        for group in self.groups.iter() {
            let procs = group.live();
            let quiet = procs
                .iter()
                .all(|p| p.slots.available_permits() == self.config.process_concurrency);
            if !procs.is_empty()
                && quiet
                && now.saturating_sub(group.last_used_ms.load(Ordering::Relaxed)) >= idle_ms
            {
                tracing::info!(function = %group.spec.function, "runtime idle: stopped");
                group.stop_all();
            }
        }
    }
}

impl Group {
    /// The processes that take calls (not those being stopped).
    fn live(&self) -> Vec<Arc<Proc>> {
        let procs = self.procs.lock().expect("procs lock");
        procs
            .iter()
            .filter(|p| !p.slots.is_closed())
            .cloned()
            .collect()
    }

    fn stop_all(&self) {
        for proc in self.live() {
            proc.stop();
        }
    }

    fn retire(&self) {
        self.retired.store(true, Ordering::SeqCst);
        self.stop_all();
    }

    /// After a failed start or an early death: the next start waits 100 ms, doubling up to
    /// 10 s while failures go on. A process that ran a minute resets it.
    fn backoff(&self, supervisor: &Supervisor, failed: bool) {
        let failures = if failed {
            self.failures.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            self.failures.store(0, Ordering::Relaxed);
            0
        };
        let delay = match failures {
            0 => 0,
            n => (100u64 << (n - 1).min(7)).min(10_000),
        };
        self.not_before_ms
            .store(supervisor.now_ms() + delay, Ordering::Relaxed);
    }
}

/// Waits for a process to end (or to be told to), then takes it out of its group and, if
/// it died on its own while the function is still wanted, starts a new one after the
/// backoff. Holds the process's stdin: dropping it is the process's signal to exit.
/// A boxed trait object: starting a process spawns its watcher, and a restart starts a
/// process, so the two futures' types would otherwise contain each other.
fn watch(
    supervisor: Arc<Supervisor>,
    group: Arc<Group>,
    proc: Arc<Proc>,
    mut child: Child,
    pid: u32,
    mut stdout: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    Box::pin(async move {
        // Held until the process ends: `Child::wait` would close it first, and the runtime
        // takes a closed stdin for the gateway gone.
        let _stdin = child.stdin.take();
        let status = tokio::select! {
            status = child.wait() => status,
            () = proc.kill.notified() => {
                let _ = child.start_kill();
                child.wait().await
            }
        };
        // Nothing more is expected on stdout; read it out so the pipe never blocks the child.
        while let Ok(Some(_)) = stdout.next_line().await {}
        let exit = match status {
            Ok(status) => status.to_string(),
            Err(e) => format!("unknown ({e})"),
        };
        let _ = proc.exit.set(exit.clone());
        proc.slots.close();
        group
            .procs
            .lock()
            .expect("procs lock")
            .retain(|p| !Arc::ptr_eq(p, &proc));
        if proc.stopping.load(Ordering::SeqCst) {
            return;
        }
        let lived = proc.started.elapsed();
        tracing::warn!(function = %group.spec.function, pid, status = %exit, lived_ms = lived.as_millis() as u64, "runtime process died");
        group.backoff(&supervisor, lived < Duration::from_secs(60));
        if group.retired.load(Ordering::SeqCst) {
            return;
        }
        // Replaced at once (after the backoff) so the function keeps its processes; a call
        // arriving meanwhile starts them itself.
        if let Err(why) = supervisor.start(&group).await {
            tracing::warn!(function = %group.spec.function, error = %why, "runtime did not restart");
        }
    })
}

/// Relays what a runtime prints outside calls (its own diagnostics) to the gateway's log,
/// a line at a time and cut at 2 KiB, so a flood cannot fill memory or block the process.
async fn relay_stderr(function: String, pid: u32, stderr: tokio::process::ChildStderr) {
    let mut reader = BufReader::new(stderr);
    let mut line = Vec::new();
    loop {
        line.clear();
        let mut limited = (&mut reader).take(2048);
        match limited.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                tracing::info!(function = %function, pid, "runtime: {}", text.trim_end());
            }
        }
    }
}

async fn sweep_idle(supervisor: std::sync::Weak<Supervisor>) {
    let every = {
        let Some(s) = supervisor.upgrade() else {
            return;
        };
        Duration::from_millis((s.config.idle_seconds * 1000 / 4).clamp(200, 30_000))
    };
    loop {
        tokio::time::sleep(every).await;
        match supervisor.upgrade() {
            Some(s) => s.stop_idle(),
            None => return,
        }
    }
}
