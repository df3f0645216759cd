//! The function registry the hot path reads: an in-memory map from name to a ready-to-call
//! [`FunctionEntry`] (endpoints resolved to their pools, limiter built, metric handles
//! resolved). The store is the source of truth; the control API writes the store first,
//! then the registry. A call's lookup is one sharded read in a `DashMap`, no store query.
//! With a store that several gateways share, [`Registry::follow`] applies the changes the
//! others make (PostgreSQL LISTEN/NOTIFY).

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;

use crate::catalog::Catalog;
use crate::config::Config;
use crate::drivers::Drivers;
use crate::drivers::local::{LocalFiles, LocalSpec};
use crate::error::Error;
use crate::invoke::balance::Endpoint;
use crate::invoke::limit::Limiter;
use crate::invoke::pool::Pools;
use crate::metrics::{FunctionMetrics, Metrics};
use crate::model::{DriverKind, Function, Protocol, RecordMode, Status};
use crate::schema::Schema;
use crate::store::{FunctionChange, Store};

/// A function ready to be called.
pub struct FunctionEntry {
    /// The function as registered (and as the API shows it).
    pub spec: Function,
    pub endpoints: Box<[Endpoint]>,
    /// A function of the local driver: what its runtime processes run (no `endpoints`).
    pub local: Option<LocalSpec>,
    pub protocol: Protocol,
    /// The run deadline: the function's `timeout`, or the server default.
    pub timeout: Duration,
    /// Shared with the entry this one replaces when the limits did not change.
    pub limiter: Arc<Limiter>,
    /// Which raw calls get a run record: the function's setting or the server's.
    pub record: RecordMode,
    /// The function's name and id, shared (not copied) by the records of its raw calls.
    pub record_name: Arc<str>,
    pub record_id: Arc<str>,
    /// Shared with the entry this one replaces, so an update keeps the series.
    pub metrics: Arc<FunctionMetrics>,
    /// `schema.in`, compiled; `None` when the function has none (nothing is checked, and
    /// raw calls stream untouched).
    pub schema_in: Option<Schema>,
    /// `schema.out`, compiled.
    pub schema_out: Option<Schema>,
}

pub struct Registry {
    functions: DashMap<String, Arc<FunctionEntry>>,
    /// Base images, images and secrets: what functions refer to by name.
    pub catalog: Arc<Catalog>,
    pools: Pools,
    drivers: Drivers,
    /// Where local functions' sources unpack.
    local_files: LocalFiles,
    metrics: Arc<Metrics>,
    default_timeout: Duration,
    default_max_queue: u32,
    default_record: RecordMode,
}

impl Registry {
    pub fn new(config: &Config, local_files: LocalFiles, metrics: Arc<Metrics>) -> Self {
        Registry {
            functions: DashMap::new(),
            catalog: Arc::new(Catalog::new(config.runtimes.clone())),
            pools: Pools::new(config.upstream.clone(), metrics.clone()),
            drivers: Drivers::new(config.openfaas.clone()),
            local_files,
            metrics,
            default_timeout: Duration::from_millis(config.limits.default_timeout_ms),
            default_max_queue: config.limits.max_queue,
            default_record: config.records.raw,
        }
    }

    pub fn get(&self, name: &str) -> Option<Arc<FunctionEntry>> {
        self.functions.get(name).map(|e| e.value().clone())
    }

    /// Builds the entry for `function` without publishing it: what the control API calls
    /// before it writes the store, so a function that cannot be called is never stored.
    pub fn prepare(&self, mut function: Function) -> Result<FunctionEntry, Error> {
        function.validate()?;
        let schema = function.schema.as_ref();
        let schema_in = Schema::compile("schema.in", schema.and_then(|s| s.input.as_ref()))?;
        let schema_out = Schema::compile("schema.out", schema.and_then(|s| s.output.as_ref()))?;
        let (endpoints, local, protocol) = match &function.upstream {
            Some(upstream) => {
                let targets = self
                    .drivers
                    .get(upstream.driver)
                    .targets(&function, upstream)?;
                let endpoints: Box<[Endpoint]> = targets
                    .iter()
                    .map(|t| Endpoint {
                        pool: self.pools.get(t, upstream.http2),
                        path_prefix: t.path_prefix.clone(),
                    })
                    .collect();
                (endpoints, None, upstream.protocol)
            }
            // A local function whose image is unknown (or not READY) is kept, ERROR with
            // the reason, as Dispatch kept it: registering it again once the image is
            // there makes it READY.
            None => match self.local_spec(&function) {
                Ok(spec) => (Box::default(), Some(spec), Protocol::Dispatch),
                Err(e) => {
                    function.status = Status::Error;
                    function.reason = vec![e.to_string()];
                    (Box::default(), None, Protocol::Dispatch)
                }
            },
        };
        let previous = self.get(&function.name);
        let metrics = match &previous {
            Some(old) => old.metrics.clone(),
            None => Arc::new(self.metrics.for_function(&function.name)),
        };
        metrics
            .service_count
            .set(endpoints.len().max(usize::from(local.is_some())) as i64);
        let timeout = match function.timeout {
            Some(ms) if ms > 0 => Duration::from_millis(ms),
            _ => self.default_timeout,
        };
        let max_inflight = function.max_inflight.unwrap_or(0);
        let max_queue = function.max_queue.unwrap_or(self.default_max_queue);
        let limiter = match previous {
            Some(old) if old.limiter.has_limits(max_inflight, max_queue) => old.limiter.clone(),
            _ => Arc::new(Limiter::new(max_inflight, max_queue)),
        };
        Ok(FunctionEntry {
            record: function.record.unwrap_or(self.default_record),
            record_name: function.name.as_str().into(),
            record_id: function.id.as_str().into(),
            protocol,
            spec: function,
            endpoints,
            local,
            timeout,
            limiter,
            metrics,
            schema_in,
            schema_out,
        })
    }

    /// What a local function runs: its image's runtime (from the catalog), handler and
    /// source.
    fn local_spec(&self, function: &Function) -> Result<LocalSpec, Error> {
        let image = function.image.as_deref().unwrap_or_default();
        let runtime = self.catalog.runtime_of_image(image)?;
        Ok(self.local_files.spec(
            &function.name,
            runtime,
            function.handler.as_deref().unwrap_or_default(),
            function.source.as_deref().unwrap_or_default(),
        ))
    }

    pub fn local_files(&self) -> &LocalFiles {
        &self.local_files
    }

    /// Publishes a function read from the store, unless it is what the registry has already.
    /// A stored function that cannot be prepared is left out, with a warning.
    pub fn load(&self, function: Function) {
        if self.get(&function.name).is_some_and(|e| e.spec == function) {
            return;
        }
        let name = function.name.clone();
        match self.prepare(function) {
            Ok(entry) => self.insert(entry),
            Err(e) => tracing::warn!(function = %name, error = %e, "stored function not loaded"),
        }
    }

    /// [`Registry::load`], unless the registry holds a newer version (registered here
    /// while the store was being read).
    fn load_unless_newer(&self, function: Function) {
        if self
            .get(&function.name)
            .is_some_and(|e| e.spec.modified_time > function.modified_time)
        {
            return;
        }
        self.load(function);
    }

    /// Publishes an entry; calls that already hold the old one finish on it.
    pub fn insert(&self, entry: FunctionEntry) {
        let service = self.discovered_service(&entry.spec).map(str::to_string);
        self.functions
            .insert(entry.spec.name.clone(), Arc::new(entry));
        self.pools.sweep();
        // The entry was built from the pods known then; if pod discovery changed them
        // before it was published, its change passed this function by: catch up.
        if let Some(service) = service {
            self.repoint(&[service]);
        }
    }

    /// The service whose pods `function` goes to, when pod discovery is on and it is on
    /// the `openfaas` driver.
    fn discovered_service<'a>(&self, function: &'a Function) -> Option<&'a str> {
        self.drivers.discovery()?;
        let upstream = function.upstream.as_ref()?;
        (upstream.driver == DriverKind::Openfaas)
            .then(|| crate::drivers::openfaas_service(function, upstream))
    }

    /// Unpublishes a function and closes the pools no function uses any more (those of
    /// calls still in flight close when the next change sweeps). Gives back what it was.
    pub fn remove(&self, name: &str) -> Option<Function> {
        let (_, removed) = self.functions.remove(name)?;
        let spec = removed.spec.clone();
        drop(removed);
        self.metrics.forget_function(name);
        self.pools.sweep();
        Some(spec)
    }

    /// Every function, by name.
    pub fn list(&self) -> Vec<Function> {
        let mut all: Vec<Function> = self.functions.iter().map(|e| e.spec.clone()).collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Keeps the registry in step with a store that other gateways share: each change
    /// is read back from the store, the source of truth, and a resync reads everything.
    pub async fn follow(
        self: Arc<Self>,
        store: Arc<dyn Store>,
        mut changes: tokio::sync::mpsc::UnboundedReceiver<FunctionChange>,
    ) {
        while let Some(change) = changes.recv().await {
            match change {
                FunctionChange::Changed(name) => match store.get_function(&name).await {
                    Ok(Some(function)) => self.load(function),
                    Ok(None) => {
                        self.remove(&name);
                    }
                    Err(e) => {
                        tracing::warn!(function = %name, error = %e, "reading a changed function failed")
                    }
                },
                FunctionChange::Resync => {
                    // What the registry held before reading the store: a function this
                    // gateway registers while the list is read is not in the list, and
                    // must not be taken for one deleted elsewhere.
                    let before: Vec<String> =
                        self.functions.iter().map(|e| e.key().clone()).collect();
                    match store.list_functions().await {
                        Ok(all) => {
                            let stored: std::collections::HashSet<String> =
                                all.iter().map(|f| f.name.clone()).collect();
                            for function in all {
                                self.load_unless_newer(function);
                            }
                            for gone in before.iter().filter(|name| !stored.contains(*name)) {
                                self.remove(gone);
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "reading the functions again failed"),
                    }
                }
            }
        }
    }

    /// What pod discovery knows, when `openfaas.discovery` is on.
    pub fn discovery(&self) -> Option<Arc<crate::drivers::discovery::Discovery>> {
        self.drivers.discovery().cloned()
    }

    /// Rebuilds the endpoints of the `openfaas` functions behind `services`, whose ready
    /// pods changed (pod discovery). Calls that already hold the old entry finish on it;
    /// an entry replaced meanwhile (by the control API) is left as it is, since it was
    /// built from the pods as they are now.
    pub fn repoint(&self, services: &[String]) {
        if services.is_empty() {
            return;
        }
        let affected: Vec<Arc<FunctionEntry>> = self
            .functions
            .iter()
            .filter(|e| {
                self.discovered_service(&e.spec)
                    .is_some_and(|service| services.iter().any(|s| s == service))
            })
            .map(|e| e.value().clone())
            .collect();
        let origins = |e: &FunctionEntry| -> Vec<String> {
            e.endpoints
                .iter()
                .map(|p| p.pool.origin.to_string())
                .collect()
        };
        for old in affected {
            let name = old.spec.name.clone();
            match self.prepare(old.spec.clone()) {
                Ok(entry) if origins(&entry) == origins(&old) => {}
                Ok(entry) => {
                    if let Some(mut slot) = self.functions.get_mut(&name)
                        && Arc::ptr_eq(&slot, &old)
                    {
                        tracing::info!(function = %name, endpoints = entry.endpoints.len(), "pod discovery: endpoints changed");
                        *slot = Arc::new(entry);
                    }
                }
                Err(e) => {
                    tracing::warn!(function = %name, error = %e, "pod discovery: endpoints not rebuilt")
                }
            }
        }
        self.pools.sweep();
    }

    pub fn len(&self) -> usize {
        self.functions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.functions.is_empty()
    }
}
