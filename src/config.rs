//! Server configuration: the embedded defaults of `config/dispatch.toml`, overlaid by the
//! file given with `--config`, then by `DISPATCH_*` environment variables, then by flags.
//! Every layer is merged as TOML before one typed, validated [`Config`] comes out, so a bad
//! value anywhere is reported with the key it belongs to.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::{Table, Value};

/// The defaults, compiled into the binary.
pub const DEFAULTS: &str = include_str!("../config/dispatch.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub store: StoreConfig,
    pub limits: LimitsConfig,
    pub upstream: UpstreamConfig,
    pub records: RecordsConfig,
    pub openfaas: OpenfaasConfig,
    pub local: LocalConfig,
    pub runtimes: RuntimesConfig,
    pub queue: QueueConfig,
    pub auth: AuthConfig,
    pub events: EventsConfig,
    pub api: ApiConfig,
}

/// The listeners of API endpoints (`ingress/`). Its `Debug` hides the keys.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// `host:port`, or empty / `off` for no listener.
    pub http: String,
    pub https: String,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub keys: Vec<String>,
}

impl ApiConfig {
    /// The plain HTTP listener's address, if there is one (checked at load).
    pub fn http_addr(&self) -> Option<SocketAddr> {
        listener_addr(&self.http)
    }

    pub fn https_addr(&self) -> Option<SocketAddr> {
        listener_addr(&self.https)
    }
}

fn listener_addr(value: &str) -> Option<SocketAddr> {
    match value.trim() {
        "" | "off" => None,
        addr => addr.parse().ok(),
    }
}

impl std::fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiConfig")
            .field("http", &self.http)
            .field("https", &self.https)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("keys", &format_args!("<{} hidden>", self.keys.len()))
            .finish()
    }
}

/// Who may use the control API (`/v1/*`): see [`crate::auth`]. Its `Debug` hides the
/// tokens, so printing a [`Config`] never shows one.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    pub skip: bool,
    pub token: String,
    pub tokens: Vec<String>,
    pub token_file: PathBuf,
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("skip", &self.skip)
            .field("token", &(!self.token.is_empty()).then_some("<hidden>"))
            .field("tokens", &format_args!("<{} hidden>", self.tokens.len()))
            .field("token_file", &self.token_file)
            .finish()
    }
}

/// Events that event drivers publish over AMQP (`events::amqp`): off while `amqp_url` is
/// empty.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsConfig {
    pub amqp_url: String,
    pub exchange: String,
    pub queue: String,
    pub binding_key: String,
    pub prefetch: u16,
    pub reconnect_ms: u64,
    pub reconnect_max_ms: u64,
}

/// Async runs: where they wait, how many run at once, how failures are tried again.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    pub backend: QueueBackend,
    pub workers: usize,
    pub attempts: u32,
    pub backoff_ms: u64,
    pub backoff_max_ms: u64,
    pub max_age_seconds: u64,
    pub hold_seconds: u64,
    pub poll_ms: u64,
    pub callback_attempts: u32,
    /// RabbitMQ (`backend = "rabbitmq"`): the broker, the prefix of every queue name, and
    /// how many publishes may await their confirm at once.
    pub url: String,
    pub name_prefix: String,
    pub confirm_window: usize,
    /// How long the broker may leave a connection attempt or the oldest publish
    /// unanswered before the connection is given up and opened again.
    pub confirm_timeout_ms: u64,
    /// The AMQP heartbeat asked for, unless `url` has its own `heartbeat`.
    pub heartbeat_seconds: u16,
}

impl QueueConfig {
    /// `url` as lapin takes it, asking for `heartbeat_seconds` unless it has its own
    /// `heartbeat`. Checked at start-up, so an error here means a bad `url`.
    pub fn amqp_uri(&self) -> Result<lapin::uri::AMQPUri, String> {
        let mut uri: lapin::uri::AMQPUri = self.url.parse()?;
        uri.query.heartbeat.get_or_insert(self.heartbeat_seconds);
        Ok(uri)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueBackend {
    /// In the store: durable with it, taken again after a restart.
    Embedded,
    /// In RabbitMQ queues (`queue.url`): durable, persistent, confirmed before the 202.
    Rabbitmq,
}

/// The `local` driver: runtime processes this server starts for functions registered
/// without an `upstream`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalConfig {
    pub start: LocalStart,
    pub processes: usize,
    pub process_concurrency: usize,
    pub idle_seconds: u64,
    pub start_timeout_ms: u64,
    pub max_log_bytes: u64,
}

/// When a local function's processes start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LocalStart {
    FirstCall,
    Registration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub workers: usize,
    pub drain_seconds: u64,
    /// On SIGTERM, how long the listener keeps accepting (with `/readyz` answering 503)
    /// before it closes: time for load balancers and Kubernetes to take this replica out.
    pub shutdown_delay_seconds: u64,
    pub log_format: LogFormat,
    /// PEM certificate chain and key: the control listener speaks TLS when both are set.
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    pub body_bytes: u64,
    pub raw_body_bytes: u64,
    pub default_timeout_ms: u64,
    pub max_queue: u32,
    pub queue_wait_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub connect_timeout_ms: u64,
    pub pool_max_idle: usize,
    pub pool_idle_timeout_seconds: u64,
    pub eject_seconds: u64,
    pub connect_attempts: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    pub url: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordsConfig {
    pub raw: crate::model::RecordMode,
    pub queue: usize,
    pub batch: usize,
    pub linger_ms: u64,
    pub wait_ms: u64,
    pub body_bytes: usize,
    pub retention_seconds: u64,
    pub max_runs: u64,
    pub idempotency_seconds: u64,
    pub prune_seconds: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenfaasConfig {
    pub gateway: String,
    pub service: String,
    /// Pod discovery: calls go to the ready pods of each function's service, as the
    /// Kubernetes API's EndpointSlices list them (see `drivers::discovery`).
    pub discovery: DiscoveryMode,
    /// The namespace of the function services whose EndpointSlices are watched.
    pub namespace: String,
    /// The Kubernetes API, `https://host:port` or `http://host:port`; empty: in the
    /// cluster, from `KUBERNETES_SERVICE_HOST` and `KUBERNETES_SERVICE_PORT`.
    pub kube_api: String,
    /// The service account token sent to the API (read again on each request, as it rotates).
    pub kube_token_file: PathBuf,
    /// The CA that signs the API server's certificate (https only).
    pub kube_ca_file: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiscoveryMode {
    /// One target per function: the OpenFaaS gateway or the function's service.
    Off,
    /// The ready addresses of the function service's EndpointSlices (discovery.k8s.io/v1).
    Endpointslices,
}

/// The interpreters of the local runtimes: a command looked up on `PATH`, or a path. An
/// image is READY when its runtime's interpreter is found.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimesConfig {
    pub python3: String,
    pub nodejs: String,
}

impl RuntimesConfig {
    /// The interpreter command configured for `runtime`.
    pub fn interpreter(&self, runtime: crate::model::Runtime) -> &str {
        match runtime {
            crate::model::Runtime::Python3 => &self.python3,
            crate::model::Runtime::Nodejs => &self.nodejs,
        }
    }
}

impl UpstreamConfig {
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.pool_idle_timeout_seconds)
    }
    pub fn eject_for(&self) -> Duration {
        Duration::from_secs(self.eject_seconds)
    }
}

/// Values given on the command line; they win over every other layer.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<String>,
    pub data_dir: Option<String>,
    pub log_format: Option<String>,
    pub api_http: Option<String>,
    pub api_https: Option<String>,
}

/// Why the configuration could not be loaded: always names the file or the key.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(String);

impl Config {
    /// The embedded defaults alone (what `dispatch serve` runs with when given nothing).
    pub fn defaults() -> Self {
        Self::load(None, &Overrides::default(), std::iter::empty())
            .expect("the embedded defaults are valid")
    }

    /// Loads every layer. `env` is the process environment (passed in so tests can give
    /// their own).
    pub fn load(
        file: Option<&Path>,
        flags: &Overrides,
        env: impl Iterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut merged: Table = DEFAULTS
            .parse()
            .map_err(|e| ConfigError(format!("embedded defaults: {e}")))?;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
            let table: Table = text
                .parse()
                .map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
            merge(&mut merged, table, "", path)?;
        }
        apply_env(&mut merged, env)?;
        apply_flags(&mut merged, flags);
        let mut config: Config = serde_path_to_error::deserialize(Value::Table(merged))
            .map_err(|e| ConfigError(format!("{}: {}", e.path(), e.inner().message())))?;
        config.server.data_dir = expand_home(&config.server.data_dir);
        config.auth.token_file = expand_home(&config.auth.token_file);
        for path in [
            &mut config.api.tls_cert,
            &mut config.api.tls_key,
            &mut config.server.tls_cert,
            &mut config.server.tls_key,
        ] {
            *path = expand_home(path);
        }
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| Err(ConfigError(format!("{key}: {why}")));
        if self.limits.body_bytes == 0 {
            return bad("limits.body_bytes", "must be greater than 0");
        }
        if self.limits.default_timeout_ms == 0 {
            return bad("limits.default_timeout_ms", "must be greater than 0");
        }
        if self.upstream.connect_timeout_ms == 0 {
            return bad("upstream.connect_timeout_ms", "must be greater than 0");
        }
        let url = &self.store.url;
        if !url.is_empty() && !url.starts_with("postgres://") && !url.starts_with("postgresql://") {
            return bad(
                "store.url",
                "must be empty (SQLite in the data dir) or a postgres:// URL",
            );
        }
        if self.records.queue == 0 {
            return bad("records.queue", "must be at least 1");
        }
        if self.records.prune_seconds == 0 {
            return bad("records.prune_seconds", "must be at least 1");
        }
        if self.records.batch == 0 {
            return bad("records.batch", "must be at least 1");
        }
        if self.queue.workers == 0 && self.queue.backend != QueueBackend::Rabbitmq {
            return bad(
                "queue.workers",
                "must be at least 1 with the embedded queue (0, a replica that accepts runs and runs none, needs queue.backend = \"rabbitmq\")",
            );
        }
        if self.queue.attempts == 0 {
            return bad("queue.attempts", "must be at least 1");
        }
        if self.queue.backend == QueueBackend::Rabbitmq {
            if !self.queue.url.starts_with("amqp://") {
                return bad("queue.url", "must be an amqp:// URL");
            }
            if let Err(e) = self.queue.amqp_uri() {
                return bad("queue.url", &format!("is not a valid AMQP URL: {e}"));
            }
            let prefix = &self.queue.name_prefix;
            if prefix.is_empty() || prefix.len() > 200 {
                return bad("queue.name_prefix", "must be 1 to 200 characters");
            }
            if self.queue.confirm_window == 0 || self.queue.workers > u16::MAX as usize {
                return bad(
                    "queue",
                    "confirm_window must be at least 1, workers at most 65535 (the prefetch)",
                );
            }
            if self.queue.confirm_timeout_ms == 0 {
                return bad("queue.confirm_timeout_ms", "must be greater than 0");
            }
        }
        if self.queue.poll_ms == 0 || self.queue.hold_seconds == 0 {
            return bad("queue", "poll_ms and hold_seconds must be greater than 0");
        }
        self.events.validate()?;
        for (key, value) in [("api.http", &self.api.http), ("api.https", &self.api.https)] {
            let value = value.trim();
            if !matches!(value, "" | "off") && value.parse::<SocketAddr>().is_err() {
                return Err(ConfigError(format!(
                    "{key}: \"{value}\" must be host:port (127.0.0.1:8443), or \"\" or \"off\" for no listener"
                )));
            }
        }
        for (section, cert, key) in [
            ("api", &self.api.tls_cert, &self.api.tls_key),
            ("server", &self.server.tls_cert, &self.server.tls_key),
        ] {
            if cert.as_os_str().is_empty() != key.as_os_str().is_empty() {
                return Err(ConfigError(format!(
                    "{section}.tls_cert and {section}.tls_key: set both (PEM files) or neither"
                )));
            }
        }
        for (i, key) in self.api.keys.iter().enumerate() {
            if key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(ConfigError(format!(
                    "api.keys[{i}]: an API key must be visible ASCII characters, with no spaces"
                )));
            }
        }
        if self.local.processes == 0 {
            return bad("local.processes", "must be at least 1");
        }
        if self.local.process_concurrency == 0 {
            return bad("local.process_concurrency", "must be at least 1");
        }
        if self.upstream.connect_attempts == 0 {
            return bad("upstream.connect_attempts", "must be at least 1");
        }
        if self.runtimes.python3.is_empty() {
            return bad("runtimes.python3", "must name the python3 interpreter");
        }
        if self.runtimes.nodejs.is_empty() {
            return bad("runtimes.nodejs", "must name the node interpreter");
        }
        let (gateway, service) = (&self.openfaas.gateway, &self.openfaas.service);
        if gateway.is_empty() == service.is_empty() {
            return bad(
                "openfaas",
                "set exactly one of openfaas.gateway and openfaas.service",
            );
        }
        if !service.is_empty() {
            if !service.contains("{name}") {
                return bad("openfaas.service", "must contain {name}");
            }
            if let Err(why) =
                crate::drivers::parse_endpoint_url(&service.replace("{name}", "function"))
            {
                return bad("openfaas.service", &format!("\"{service}\" {why}"));
            }
        } else if let Err(why) = crate::drivers::parse_endpoint_url(gateway) {
            return bad("openfaas.gateway", &format!("\"{gateway}\" {why}"));
        }
        let kube_api = &self.openfaas.kube_api;
        if !kube_api.is_empty()
            && !kube_api.starts_with("http://")
            && !kube_api.starts_with("https://")
        {
            return bad(
                "openfaas.kube_api",
                &format!(
                    "\"{kube_api}\" must be empty (in the cluster) or an http:// or https:// URL"
                ),
            );
        }
        if self.openfaas.discovery == DiscoveryMode::Endpointslices
            && self.openfaas.namespace.is_empty()
        {
            return bad(
                "openfaas.namespace",
                "must name the namespace of the function services",
            );
        }
        Ok(())
    }
}

impl EventsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| Err(ConfigError(format!("events.{key}: {why}")));
        if self.amqp_url.is_empty() {
            return Ok(());
        }
        if !self.amqp_url.starts_with("amqp://") {
            return bad(
                "amqp_url",
                "must be empty (off) or an amqp:// URL (amqps:// is not built in)",
            );
        }
        if self.exchange.is_empty() || self.queue.is_empty() || self.binding_key.is_empty() {
            return bad(
                "exchange",
                "exchange, queue and binding_key must not be empty",
            );
        }
        if self.prefetch == 0 {
            return bad("prefetch", "must be at least 1");
        }
        if self.reconnect_ms == 0 || self.reconnect_max_ms < self.reconnect_ms {
            return bad(
                "reconnect_ms",
                "must be at least 1, and reconnect_max_ms at least as much",
            );
        }
        Ok(())
    }
}

/// Overlays `from` onto `into`, refusing keys the defaults do not have.
fn merge(into: &mut Table, from: Table, prefix: &str, file: &Path) -> Result<(), ConfigError> {
    for (key, value) in from {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match (into.get_mut(&key), value) {
            (Some(Value::Table(dst)), Value::Table(src)) => merge(dst, src, &path, file)?,
            (Some(Value::Table(_)), _) => {
                return Err(ConfigError(format!(
                    "{}: {path}: must be a section",
                    file.display()
                )));
            }
            (Some(slot), value) => *slot = value,
            (None, _) => {
                return Err(ConfigError(format!(
                    "{}: unknown key {path}",
                    file.display()
                )));
            }
        }
    }
    Ok(())
}

/// `DISPATCH_<SECTION>_<KEY>` for every key of the defaults, plus the short forms
/// `DISPATCH_LISTEN` and `DISPATCH_DATA_DIR`. A value is read as the type of the default
/// (a list: comma-separated).
fn apply_env(
    merged: &mut Table,
    env: impl Iterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    for (name, raw) in env {
        let Some(rest) = name.strip_prefix("DISPATCH_") else {
            continue;
        };
        let rest = rest.to_ascii_lowercase();
        let target = match rest.as_str() {
            "listen" => Some(("server".to_string(), "listen".to_string())),
            "data_dir" => Some(("server".to_string(), "data_dir".to_string())),
            _ => merged.iter().find_map(|(section, _)| {
                rest.strip_prefix(&format!("{section}_"))
                    .map(|key| (section.clone(), key.to_string()))
            }),
        };
        let Some((section, key)) = target else {
            continue;
        };
        let Some(Value::Table(table)) = merged.get_mut(&section) else {
            continue;
        };
        let Some(slot) = table.get_mut(&key) else {
            continue;
        };
        *slot = match slot {
            Value::Integer(_) => Value::Integer(raw.trim().parse().map_err(|_| {
                ConfigError(format!(
                    "{name}: {section}.{key} must be a whole number, got \"{raw}\""
                ))
            })?),
            Value::Boolean(_) => Value::Boolean(raw.trim().parse().map_err(|_| {
                ConfigError(format!(
                    "{name}: {section}.{key} must be true or false, got \"{raw}\""
                ))
            })?),
            Value::Array(_) => Value::Array(
                raw.split(',')
                    .map(str::trim)
                    .filter(|item| !item.is_empty())
                    .map(|item| Value::String(item.to_string()))
                    .collect(),
            ),
            _ => Value::String(raw),
        };
    }
    Ok(())
}

fn apply_flags(merged: &mut Table, flags: &Overrides) {
    let api = merged
        .get_mut("api")
        .and_then(Value::as_table_mut)
        .expect("defaults have [api]");
    for (key, value) in [("http", &flags.api_http), ("https", &flags.api_https)] {
        if let Some(v) = value {
            api.insert(key.to_string(), Value::String(v.clone()));
        }
    }
    let server = merged
        .get_mut("server")
        .and_then(Value::as_table_mut)
        .expect("defaults have [server]");
    for (key, value) in [
        ("listen", &flags.listen),
        ("data_dir", &flags.data_dir),
        ("log_format", &flags.log_format),
    ] {
        if let Some(v) = value {
            server.insert(key.to_string(), Value::String(v.clone()));
        }
    }
}

fn expand_home(path: &Path) -> PathBuf {
    match path.strip_prefix("~") {
        Ok(rest) => std::env::var_os("HOME")
            .map(|home| PathBuf::from(home).join(rest))
            .unwrap_or_else(|| path.to_path_buf()),
        Err(_) => path.to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Iterator<Item = (String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<Vec<_>>()
            .into_iter()
    }

    #[test]
    fn defaults_load() {
        let c = Config::defaults();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.limits.body_bytes, 6 * 1024 * 1024);
    }

    #[test]
    fn flags_beat_env_which_beats_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("d.toml");
        std::fs::write(
            &file,
            "[server]\nlisten = \"127.0.0.1:1111\"\ndrain_seconds = 5\n[upstream]\neject_seconds = 7\n",
        )
        .unwrap();
        let flags = Overrides {
            listen: Some("127.0.0.1:3333".into()),
            ..Default::default()
        };
        let c = Config::load(
            Some(&file),
            &flags,
            env(&[
                ("DISPATCH_LISTEN", "127.0.0.1:2222"),
                ("DISPATCH_UPSTREAM_EJECT_SECONDS", "9"),
            ]),
        )
        .unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:3333");
        assert_eq!(c.upstream.eject_seconds, 9);
        assert_eq!(c.server.drain_seconds, 5);
    }

    #[test]
    fn bad_values_name_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("d.toml");
        std::fs::write(&file, "[server]\nlisen = \"x\"\n").unwrap();
        let e = Config::load(Some(&file), &Overrides::default(), env(&[])).unwrap_err();
        assert!(e.to_string().contains("unknown key server.lisen"), "{e}");

        let e = Config::load(
            None,
            &Overrides::default(),
            env(&[("DISPATCH_LIMITS_BODY_BYTES", "lots")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("limits.body_bytes"), "{e}");

        let flags = Overrides {
            listen: Some("nowhere".into()),
            ..Default::default()
        };
        let e = Config::load(None, &flags, env(&[])).unwrap_err();
        assert!(e.to_string().contains("listen"), "{e}");

        let e = Config::load(
            None,
            &Overrides::default(),
            env(&[("DISPATCH_OPENFAAS_SERVICE", "http://x:8080")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("openfaas"), "{e}");

        // On RabbitMQ, each bad setting is refused naming what is wrong.
        for (key, value, named) in [
            ("DISPATCH_QUEUE_URL", "http://broker", "queue.url"),
            (
                "DISPATCH_QUEUE_URL",
                "amqp://broker/%2f?heartbeat=often",
                "not a valid AMQP URL",
            ),
            (
                "DISPATCH_QUEUE_CONFIRM_TIMEOUT_MS",
                "0",
                "queue.confirm_timeout_ms",
            ),
        ] {
            let rabbit = ("DISPATCH_QUEUE_BACKEND", "rabbitmq");
            let e = Config::load(None, &Overrides::default(), env(&[rabbit, (key, value)]))
                .unwrap_err();
            assert!(e.to_string().contains(named), "{key}={value}: {e}");
        }

        // No workers: only where another replica can take the runs, from the broker.
        let none = ("DISPATCH_QUEUE_WORKERS", "0");
        let e = Config::load(None, &Overrides::default(), env(&[none])).unwrap_err();
        assert!(e.to_string().contains("queue.workers"), "{e}");
        let c = Config::load(
            None,
            &Overrides::default(),
            env(&[none, ("DISPATCH_QUEUE_BACKEND", "rabbitmq")]),
        )
        .unwrap();
        assert_eq!(c.queue.workers, 0);
    }

    #[test]
    fn auth_tokens_come_from_the_environment_as_a_comma_separated_list() {
        let c = Config::load(
            None,
            &Overrides::default(),
            env(&[
                ("DISPATCH_AUTH_TOKENS", "old-one, new-one,"),
                ("DISPATCH_AUTH_SKIP", "false"),
            ]),
        )
        .unwrap();
        assert_eq!(c.auth.tokens, ["old-one", "new-one"]);
        assert!(!c.auth.skip);
        assert_eq!(Config::defaults().auth.token, "");
        assert!(
            !format!("{c:?}").contains("old-one"),
            "Debug hides the tokens"
        );
    }

    #[test]
    fn discovery_settings_load_and_bad_ones_name_their_key() {
        let c = Config::defaults();
        assert_eq!(c.openfaas.discovery, DiscoveryMode::Off);
        assert_eq!(c.server.shutdown_delay_seconds, 0);
        let c = Config::load(
            None,
            &Overrides::default(),
            env(&[
                ("DISPATCH_OPENFAAS_DISCOVERY", "endpointslices"),
                ("DISPATCH_OPENFAAS_KUBE_API", "http://127.0.0.1:8001"),
                ("DISPATCH_SERVER_SHUTDOWN_DELAY_SECONDS", "5"),
            ]),
        )
        .unwrap();
        assert_eq!(c.openfaas.discovery, DiscoveryMode::Endpointslices);
        assert_eq!(c.openfaas.kube_api, "http://127.0.0.1:8001");
        assert_eq!(c.server.shutdown_delay_seconds, 5);
        for (name, value, key) in [
            ("DISPATCH_OPENFAAS_DISCOVERY", "yes", "openfaas.discovery"),
            (
                "DISPATCH_OPENFAAS_KUBE_API",
                "kube:6443",
                "openfaas.kube_api",
            ),
        ] {
            let e = Config::load(None, &Overrides::default(), env(&[(name, value)])).unwrap_err();
            assert!(e.to_string().contains(key), "{e}");
        }
    }
}
