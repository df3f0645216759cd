//! The catalog: base images, images, secrets, subscriptions and APIs (with their compiled
//! route table), cached in memory beside the function
//! registry. The store is the source of truth; the control API writes the store first,
//! then the catalog, and [`Catalog::follow`] applies what other gateways sharing the store
//! change (PostgreSQL LISTEN/NOTIFY on `dispatch_catalog`). A run reads its secrets here,
//! and the local driver asks here which runtime an image needs: neither queries the store.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dashmap::DashMap;
use serde_json::{Map, Value};

use crate::config::RuntimesConfig;
use crate::error::Error;
use crate::ingress::routes::RouteTable;
use crate::model::{Api, BaseImage, Image, Runtime, Secret, Status, Subscription};
use crate::store::{CatalogKind, Change, Store, StoreError};

pub struct Catalog {
    base_images: DashMap<String, BaseImage>,
    images: DashMap<String, Image>,
    /// Shared, so a run takes its values without copying the whole secret under the lock.
    secrets: DashMap<String, Arc<Secret>>,
    subscriptions: DashMap<String, Subscription>,
    apis: DashMap<String, Api>,
    /// The enabled APIs compiled for the ingress listeners, swapped whole on every change
    /// to `apis` (see `ingress/routes.rs`).
    routes: arc_swap::ArcSwap<RouteTable>,
    /// Taken by whoever compiles `routes` (writers only, never a request), so that two
    /// changes at once cannot store their tables in the wrong order.
    compiling: std::sync::Mutex<()>,
    /// Where the runtimes' interpreters are, for an image's status.
    runtimes: RuntimesConfig,
}

impl Catalog {
    pub fn new(runtimes: RuntimesConfig) -> Self {
        Catalog {
            base_images: DashMap::new(),
            images: DashMap::new(),
            secrets: DashMap::new(),
            subscriptions: DashMap::new(),
            apis: DashMap::new(),
            routes: arc_swap::ArcSwap::from_pointee(RouteTable::default()),
            compiling: std::sync::Mutex::new(()),
            runtimes,
        }
    }

    /// Reads everything from the store, replacing what the catalog held.
    pub async fn load(&self, store: &dyn Store) -> Result<(), StoreError> {
        // What the catalog held before reading the store: only those may go for being
        // absent from it (something created here meanwhile is not in the lists yet).
        let before = (
            names(&self.base_images),
            names(&self.images),
            names(&self.secrets),
            names(&self.subscriptions),
            names(&self.apis),
        );
        let (bases, images, secrets, subscriptions, apis) = (
            store.list_base_images().await?,
            store.list_images().await?,
            store.list_secrets().await?,
            store.list_subscriptions().await?,
            crate::store::list_apis(store).await?,
        );
        replace_all(
            &self.base_images,
            &before.0,
            bases.into_iter().map(|b| (b.name.clone(), b)).collect(),
        );
        // After the base images: an image's status is worked out from its base image.
        let images = images
            .into_iter()
            .map(|mut image| {
                self.evaluate(&mut image);
                (image.name.clone(), image)
            })
            .collect();
        replace_all(&self.images, &before.1, images);
        replace_all(
            &self.secrets,
            &before.2,
            secrets
                .into_iter()
                .map(|s| (s.name.clone(), Arc::new(s)))
                .collect(),
        );
        replace_all(
            &self.subscriptions,
            &before.3,
            subscriptions
                .into_iter()
                .map(|s| (s.name.clone(), s))
                .collect(),
        );
        replace_all(
            &self.apis,
            &before.4,
            apis.into_iter().map(|a| (a.name.clone(), a)).collect(),
        );
        self.compile_routes();
        Ok(())
    }

    // --- base images -------------------------------------------------------------------

    pub fn base_image(&self, name: &str) -> Option<BaseImage> {
        self.base_images.get(name).map(|b| b.clone())
    }

    /// Every base image, by name.
    pub fn base_images(&self) -> Vec<BaseImage> {
        let mut all: Vec<BaseImage> = self.base_images.iter().map(|b| b.clone()).collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    pub fn put_base_image(&self, base: BaseImage) {
        self.base_images.insert(base.name.clone(), base);
    }

    pub fn remove_base_image(&self, name: &str) -> Option<BaseImage> {
        self.base_images.remove(name).map(|(_, b)| b)
    }

    /// The names of the images built on base image `base`, sorted.
    pub fn images_of(&self, base: &str) -> Vec<String> {
        let mut names: Vec<String> = self
            .images
            .iter()
            .filter(|i| i.base_image_name == base)
            .map(|i| i.name.clone())
            .collect();
        names.sort();
        names
    }

    // --- images ------------------------------------------------------------------------

    pub fn image(&self, name: &str) -> Option<Image> {
        self.images.get(name).map(|i| i.clone())
    }

    /// Every image, by name.
    pub fn images(&self) -> Vec<Image> {
        let mut all: Vec<Image> = self.images.iter().map(|i| i.clone()).collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    pub fn put_image(&self, image: Image) {
        self.images.insert(image.name.clone(), image);
    }

    pub fn remove_image(&self, name: &str) -> Option<Image> {
        self.images.remove(name).map(|(_, i)| i)
    }

    /// Sets `image`'s language, runtime, status and reason from its base image (as the
    /// catalog has it) and from this machine: READY when the runtime's interpreter is found.
    pub fn evaluate(&self, image: &mut Image) {
        let base = self.base_image(&image.base_image_name);
        let verdict = match &base {
            None => Err(format!(
                "base image \"{}\" not found",
                image.base_image_name
            )),
            Some(base) => match Runtime::of_language(&base.language) {
                None => Err(format!(
                    "language \"{}\" (of base image \"{}\") is not supported by the local \
                     driver (python3, nodejs, nodejs6)",
                    base.language, base.name
                )),
                Some(runtime) => find_interpreter(self.runtimes.interpreter(runtime))
                    .map(|_| runtime)
                    .map_err(|why| format!("runtime {}: {why}", runtime.as_str())),
            },
        };
        if let Some(base) = &base {
            image.language = base.language.clone();
        }
        match verdict {
            Ok(runtime) => {
                image.runtime = Some(runtime);
                image.status = Status::Ready;
                image.reason.clear();
            }
            Err(why) => {
                image.runtime = base
                    .as_ref()
                    .and_then(|b| Runtime::of_language(&b.language));
                image.status = Status::Error;
                image.reason = vec![why];
            }
        }
    }

    /// The runtime that runs functions of image `name`: what the local driver calls when a
    /// function names an image. A 400 naming the `image` field when the image is unknown
    /// or not READY (its reason says why: unsupported language, interpreter not found).
    pub fn runtime_of_image(&self, name: &str) -> Result<Runtime, Error> {
        let image = self
            .images
            .get(name)
            .ok_or_else(|| Error::BadRequest(format!("image: \"{name}\" not found")))?;
        match (image.status, image.runtime) {
            (Status::Ready, Some(runtime)) => Ok(runtime),
            (status, _) => Err(Error::BadRequest(format!(
                "image: \"{name}\" is not READY (status {}: {})",
                status.as_str(),
                image.reason.join("; ")
            ))),
        }
    }

    // --- secrets -----------------------------------------------------------------------

    pub fn secret(&self, name: &str) -> Option<Arc<Secret>> {
        self.secrets.get(name).map(|s| s.clone())
    }

    /// Every secret, by name (values included: the API masks them).
    pub fn secrets(&self) -> Vec<Arc<Secret>> {
        let mut all: Vec<Arc<Secret>> = self.secrets.iter().map(|s| s.clone()).collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    pub fn put_secret(&self, secret: Secret) {
        self.secrets.insert(secret.name.clone(), Arc::new(secret));
    }

    pub fn remove_secret(&self, name: &str) -> Option<Arc<Secret>> {
        self.secrets.remove(name).map(|(_, s)| s)
    }

    /// The values of the secrets `names`, merged into one map as a function's
    /// `context.secrets` gets them (a key of a later secret wins). An unknown name is an
    /// error naming it.
    pub fn secret_values(&self, names: &[String]) -> Result<Map<String, Value>, String> {
        let mut values = Map::new();
        for name in names {
            let secret = self
                .secrets
                .get(name)
                .ok_or_else(|| format!("secret \"{name}\" not found"))?;
            for (key, value) in &secret.secrets {
                values.insert(key.clone(), Value::String(value.clone()));
            }
        }
        Ok(values)
    }

    // --- subscriptions -----------------------------------------------------------------

    pub fn subscription(&self, name: &str) -> Option<Subscription> {
        self.subscriptions.get(name).map(|s| s.clone())
    }

    /// Every subscription, by name.
    pub fn subscriptions(&self) -> Vec<Subscription> {
        let mut all: Vec<Subscription> = self.subscriptions.iter().map(|s| s.clone()).collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// The subscriptions an event of `event_type` starts runs for, by name.
    pub fn subscribed_to(&self, event_type: &str) -> Vec<Subscription> {
        let mut all: Vec<Subscription> = self
            .subscriptions
            .iter()
            .filter(|s| s.takes(event_type))
            .map(|s| s.clone())
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    pub fn put_subscription(&self, subscription: Subscription) {
        self.subscriptions
            .insert(subscription.name.clone(), subscription);
    }

    pub fn remove_subscription(&self, name: &str) -> Option<Subscription> {
        self.subscriptions.remove(name).map(|(_, s)| s)
    }

    // --- APIs ---------------------------------------------------------------------------

    pub fn api(&self, name: &str) -> Option<Api> {
        self.apis.get(name).map(|a| a.clone())
    }

    /// Every API, by name.
    pub fn apis(&self) -> Vec<Api> {
        let mut all: Vec<Api> = self.apis.iter().map(|a| a.clone()).collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    pub fn put_api(&self, api: Api) {
        self.apis.insert(api.name.clone(), api);
        self.compile_routes();
    }

    pub fn remove_api(&self, name: &str) -> Option<Api> {
        let removed = self.apis.remove(name).map(|(_, a)| a);
        self.compile_routes();
        removed
    }

    /// The route table now in force: one atomic load, no lock.
    pub fn routes(&self) -> arc_swap::Guard<Arc<RouteTable>> {
        self.routes.load()
    }

    fn compile_routes(&self) {
        let _one_at_a_time = self.compiling.lock().unwrap_or_else(|e| e.into_inner());
        let (table, left_out) = RouteTable::compile(self.apis());
        for (api, other) in left_out {
            tracing::warn!(%api, conflicts_with = %other, "API not served: it matches the same requests as another (created at the same moment on another gateway); change or delete one");
        }
        self.routes.store(Arc::new(table));
    }

    // --- following other gateways ------------------------------------------------------

    /// Keeps the catalog in step with a store that other gateways share: each change is
    /// read back from the store, and a resync reads everything.
    pub async fn follow(
        self: Arc<Self>,
        store: Arc<dyn Store>,
        mut changes: tokio::sync::mpsc::UnboundedReceiver<Change>,
    ) {
        while let Some(change) = changes.recv().await {
            let done = match &change {
                Change::Resync => self.load(&*store).await,
                Change::Changed(what) => match CatalogKind::parse(what) {
                    Some((kind, name)) => self.reload(&*store, kind, name).await,
                    None => Ok(()),
                },
            };
            if let Err(e) = done {
                tracing::warn!(change = ?change, error = %e, "reading a catalog change failed");
            }
        }
    }

    async fn reload(
        &self,
        store: &dyn Store,
        kind: CatalogKind,
        name: &str,
    ) -> Result<(), StoreError> {
        match kind {
            CatalogKind::BaseImage => {
                match store.get_base_image(name).await? {
                    Some(base) => self.put_base_image(base),
                    None => {
                        self.remove_base_image(name);
                    }
                }
                for image in self.images_of(name) {
                    if let Some(mut entry) = self.images.get_mut(&image) {
                        self.evaluate(&mut entry);
                    }
                }
            }
            CatalogKind::Image => match store.get_image(name).await? {
                Some(mut image) => {
                    self.evaluate(&mut image);
                    self.put_image(image);
                }
                None => {
                    self.remove_image(name);
                }
            },
            CatalogKind::Secret => match store.get_secret(name).await? {
                Some(secret) => self.put_secret(secret),
                None => {
                    self.remove_secret(name);
                }
            },
            CatalogKind::Api => match crate::store::get_api(store, name).await? {
                Some(api) => self.put_api(api),
                None => {
                    self.remove_api(name);
                }
            },
            CatalogKind::Subscription => match store.get_subscription(name).await? {
                Some(subscription) => self.put_subscription(subscription),
                None => {
                    self.remove_subscription(name);
                }
            },
        }
        Ok(())
    }
}

fn names<V>(cache: &DashMap<String, V>) -> HashSet<String> {
    cache.iter().map(|e| e.key().clone()).collect()
}

/// Puts `stored` in `cache`, and takes out the names it held `before` that the store no
/// longer has.
fn replace_all<V>(cache: &DashMap<String, V>, before: &HashSet<String>, stored: Vec<(String, V)>) {
    let kept: HashSet<&String> = stored.iter().map(|(name, _)| name).collect();
    cache.retain(|name, _| !before.contains(name) || kept.contains(name));
    for (name, value) in stored {
        cache.insert(name, value);
    }
}

/// Where interpreter `command` is: a path (it contains a `/`) that must be an executable
/// file, or a name looked up on `PATH`. The error says what was not found.
pub fn find_interpreter(command: &str) -> Result<PathBuf, String> {
    if command.contains('/') {
        let path = Path::new(command);
        return if is_executable(path) {
            Ok(path.to_path_buf())
        } else {
            Err(format!("interpreter {command} not found"))
        };
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(command))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| format!("interpreter {command} not found on PATH"))
}

#[cfg(unix)]
fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(not(unix))]
fn is_executable(path: &Path) -> bool {
    path.is_file()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog(python3: &str) -> Catalog {
        Catalog::new(RuntimesConfig {
            python3: python3.into(),
            nodejs: "node".into(),
        })
    }

    fn image(base: &str) -> Image {
        Image {
            name: "img".into(),
            base_image_name: base.into(),
            ..Image::default()
        }
    }

    #[test]
    fn an_image_takes_its_runtime_from_its_base_image() {
        let c = catalog("sh");
        for (language, runtime) in [("python3", Some(Runtime::Python3)), ("java", None)] {
            c.put_base_image(BaseImage {
                name: "base".into(),
                language: language.into(),
                ..BaseImage::default()
            });
            let mut img = image("base");
            c.evaluate(&mut img);
            assert_eq!(img.language, language);
            match runtime {
                Some(runtime) => {
                    assert_eq!((img.status, img.runtime), (Status::Ready, Some(runtime)));
                }
                None => {
                    assert_eq!(img.status, Status::Error);
                    assert!(img.reason[0].contains("not supported"), "{:?}", img.reason);
                }
            }
        }
    }

    #[test]
    fn a_missing_interpreter_is_an_error_naming_it() {
        let c = catalog("/nonexistent/python3");
        c.put_base_image(BaseImage {
            name: "base".into(),
            language: "python3".into(),
            ..BaseImage::default()
        });
        let mut img = image("base");
        c.evaluate(&mut img);
        assert_eq!(img.status, Status::Error);
        assert!(img.reason[0].contains("/nonexistent/python3"), "{:?}", img);
        c.put_image(img);
        let e = c.runtime_of_image("img").unwrap_err();
        assert!(e.to_string().contains("not READY"), "{e}");
        assert!(find_interpreter("no-such-interpreter-here").is_err());
    }

    #[test]
    fn secret_values_merge_and_a_missing_secret_is_named() {
        let c = catalog("sh");
        let mut s = Secret {
            name: "db".into(),
            ..Secret::default()
        };
        s.secrets.insert("password".into(), "hunter2".into());
        c.put_secret(s);
        let values = c.secret_values(&["db".into()]).unwrap();
        assert_eq!(values["password"], "hunter2");
        let e = c.secret_values(&["db".into(), "nope".into()]).unwrap_err();
        assert_eq!(e, "secret \"nope\" not found");
    }
}
