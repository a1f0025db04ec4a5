//! Object stores for source and warehouse URLs.
//!
//! Local paths and `file://` use the local file system. `s3://`, `gs://`, `az://` (and the other
//! schemes object_store knows, with the `cloud` feature) take their settings from the standard
//! environment variables — `AWS_*` (e.g. `AWS_ACCESS_KEY_ID`, `AWS_REGION`, `AWS_ENDPOINT`),
//! `GOOGLE_*`, `AZURE_*` — and from kbcrm.yaml's `storage:` section, which wins over them
//! ([`configure`]). Credentials are never taken from kbcrm.yaml itself, only from environment
//! variables it names, and never printed.
//!
//! Delta tables on object storage commit with conditional writes (put-if-absent): kbcrm
//! registers these schemes with the Delta log store that does so, and refuses settings that
//! would turn that off ([`check_commit_safety`]).
//!
//! A leaf: imports only `error`. Also owns which names a listing skips ([`skip_reason`]).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use object_store::ObjectStore;
use object_store::local::LocalFileSystem;
use url::Url;

use crate::error::{Error, Result};

/// Environment variables passed to object-store builders, by their prefixes.
const ENV_PREFIXES: &[&str] = &["AWS_", "GOOGLE_", "AZURE_"];

/// Object-store schemes kbcrm opens through object_store's cloud stores.
#[cfg(feature = "cloud")]
pub const CLOUD_SCHEMES: &[&str] = &["s3", "s3a", "gs", "az", "adl", "azure", "abfs", "abfss"];

/// Settings from kbcrm.yaml's `storage:` (names lower case, environment references resolved).
static SETTINGS: RwLock<BTreeMap<String, String>> = RwLock::new(BTreeMap::new());

/// Apply kbcrm.yaml's `storage:` settings to every store opened from now on.
pub fn configure(settings: BTreeMap<String, String>) {
    *SETTINGS.write().unwrap_or_else(|e| e.into_inner()) = settings;
}

/// The object-store options in force: the environment's, then kbcrm.yaml's.
fn options() -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = std::env::vars()
        .filter(|(k, _)| ENV_PREFIXES.iter().any(|p| k.starts_with(p)))
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect();
    for (k, v) in SETTINGS.read().unwrap_or_else(|e| e.into_inner()).iter() {
        out.insert(k.clone(), v.clone());
    }
    out
}

/// Stores of URL schemes of their own ([`register_store`]).
static REGISTERED: RwLock<BTreeMap<String, Arc<dyn ObjectStore>>> = RwLock::new(BTreeMap::new());

/// Open every `scheme:///path` URL with `store` (paths taken as they are written), in all of
/// kbcrm: its own reads and writes, its query sessions and the Delta commits. For a program
/// embedding kbcrm with a store of its own: an in-house store, or a store that fails on purpose
/// to test what a failed write leaves behind. Delta commits use put-if-absent, which `store`
/// must honour.
pub fn register_store(scheme: &str, store: Arc<dyn ObjectStore>) {
    let key = Url::parse(&format!("{scheme}://")).expect("a URL scheme");
    REGISTERED
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .insert(scheme.to_string(), store.clone());
    deltalake::logstore::object_store_factories().insert(key.clone(), Arc::new(Fixed(store)));
    deltalake::logstore::logstore_factories().insert(key, Arc::new(DeltaLogStores));
}

/// The store holding `url` (its root: `file:///`, `s3://bucket/`, ...).
pub fn store_for(url: &Url) -> Result<Arc<dyn ObjectStore>> {
    if let Some(store) = REGISTERED
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(url.scheme())
    {
        return Ok(store.clone());
    }
    match url.scheme() {
        "file" => Ok(Arc::new(LocalFileSystem::new())),
        "memory" => Ok(Arc::new(object_store::memory::InMemory::new())),
        _ => {
            let (store, _) = object_store::parse_url_opts(url, options()).map_err(|e| {
                Error::Usage(format!(
                    "cannot open '{}': {e}; check the URL, kbcrm.yaml's `storage:` and the \
                     credentials in the environment (AWS_*, GOOGLE_*, AZURE_*)",
                    redact(url)
                ))
            })?;
            Ok(Arc::from(store))
        }
    }
}

/// Refuse object-store settings under which a Delta commit could overwrite another one: a
/// warehouse on object storage is only safe with conditional writes.
pub fn check_commit_safety(url: &Url) -> Result<()> {
    if matches!(url.scheme(), "file" | "memory") {
        return Ok(());
    }
    let options = options();
    let on = |k: &str| {
        options
            .get(k)
            .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "true" | "1" | "yes"))
    };
    if on("aws_s3_allow_unsafe_rename") || on("aws_allow_unsafe_rename") {
        return Err(Error::Usage(format!(
            "warehouse '{}': AWS_S3_ALLOW_UNSAFE_RENAME is set; kbcrm commits with conditional \
             writes only, because an unsafe rename lets two runs overwrite each other's commit. \
             Unset it (S3, MinIO, R2 and most S3-compatible servers support conditional writes)",
            redact(url)
        )));
    }
    if options
        .get("aws_conditional_put")
        .is_some_and(|v| v.eq_ignore_ascii_case("disabled"))
    {
        return Err(Error::Usage(format!(
            "warehouse '{}': aws_conditional_put is 'disabled'; Delta commits need conditional \
             writes (put if absent). Remove the setting",
            redact(url)
        )));
    }
    Ok(())
}

/// Let the Delta library open tables on the cloud schemes with kbcrm's stores and the log
/// store that commits by conditional write. Done once per process.
pub fn register_delta_schemes() {
    #[cfg(feature = "cloud")]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            let stores = deltalake::logstore::object_store_factories();
            let logs = deltalake::logstore::logstore_factories();
            for scheme in CLOUD_SCHEMES {
                let key = Url::parse(&format!("{scheme}://")).expect("scheme URL");
                stores.insert(key.clone(), Arc::new(DeltaStores));
                logs.insert(key, Arc::new(DeltaLogStores));
            }
        });
    }
}

/// Builds a Delta table's store from kbcrm's settings.
#[cfg(feature = "cloud")]
struct DeltaStores;

#[cfg(feature = "cloud")]
impl deltalake::logstore::ObjectStoreFactory for DeltaStores {
    fn parse_url_opts(
        &self,
        url: &Url,
        config: &deltalake::logstore::StorageConfig,
    ) -> deltalake::DeltaResult<(
        deltalake::logstore::ObjectStoreRef,
        object_store::path::Path,
    )> {
        let mut options = options();
        options.extend(
            config
                .raw
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone())),
        );
        let (store, path) = object_store::parse_url_opts(url, options)?;
        Ok((Arc::from(store), path))
    }
}

/// Gives the Delta library a registered store ([`register_store`]).
#[derive(Debug)]
struct Fixed(Arc<dyn ObjectStore>);

impl deltalake::logstore::ObjectStoreFactory for Fixed {
    fn parse_url_opts(
        &self,
        url: &Url,
        _: &deltalake::logstore::StorageConfig,
    ) -> deltalake::DeltaResult<(
        deltalake::logstore::ObjectStoreRef,
        object_store::path::Path,
    )> {
        let path = object_store::path::Path::from_url_path(url.path())
            .map_err(|e| deltalake::DeltaTableError::Generic(format!("{url}: {e}")))?;
        Ok((self.0.clone(), path))
    }
}

/// The Delta log store that writes each commit file with put-if-absent.
struct DeltaLogStores;

impl deltalake::logstore::LogStoreFactory for DeltaLogStores {
    fn with_options(
        &self,
        prefixed_store: deltalake::logstore::ObjectStoreRef,
        root_store: deltalake::logstore::ObjectStoreRef,
        location: &Url,
        options: &deltalake::logstore::StorageConfig,
    ) -> deltalake::DeltaResult<Arc<dyn deltalake::logstore::LogStore>> {
        Ok(deltalake::logstore::default_logstore(
            prefixed_store,
            root_store,
            location,
            options,
        ))
    }
}

/// A URL without user name or password, for messages.
pub fn redact(url: &Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.to_string()
}

/// DataFusion's object-store registry that also opens the cloud stores on first use, with
/// kbcrm's settings: every session (and every Ballista scheduler and executor) can read any
/// `s3://`, `gs://` or `az://` URL its plans name without registering each bucket first.
#[derive(Debug, Default)]
pub struct StoreRegistry {
    inner: datafusion::execution::object_store::DefaultObjectStoreRegistry,
}

impl datafusion::execution::object_store::ObjectStoreRegistry for StoreRegistry {
    fn register_store(
        &self,
        url: &Url,
        store: Arc<dyn ObjectStore>,
    ) -> Option<Arc<dyn ObjectStore>> {
        self.inner.register_store(url, store)
    }

    fn deregister_store(&self, url: &Url) -> datafusion::error::Result<Arc<dyn ObjectStore>> {
        self.inner.deregister_store(url)
    }

    fn get_store(&self, url: &Url) -> datafusion::error::Result<Arc<dyn ObjectStore>> {
        match self.inner.get_store(url) {
            Ok(store) => Ok(store),
            Err(e) if matches!(url.scheme(), "file" | "memory") => Err(e),
            Err(_) => {
                let store = store_for(url)
                    .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?;
                self.inner.register_store(url, store.clone());
                Ok(store)
            }
        }
    }
}

/// Why a file with this path below a location is skipped, if it is.
pub fn skip_reason(relative: &str) -> Option<&'static str> {
    let segments: Vec<&str> = relative.split('/').collect();
    let (folders, name) = segments.split_at(segments.len().saturating_sub(1));
    if name.first().is_some_and(|n| n.starts_with('_')) {
        Some("starts with _")
    } else if name.first().is_some_and(|n| n.starts_with('.')) {
        Some("starts with .")
    } else if folders.iter().any(|f| f.starts_with('_')) {
        Some("in a folder starting with _")
    } else if folders.iter().any(|f| f.starts_with('.')) {
        Some("in a folder starting with .")
    } else {
        None
    }
}

/// Bytes free to this process on the filesystem holding a local `url` (its nearest existing
/// folder); `None` for object stores or when the system does not say.
pub fn free_space(url: &Url) -> Option<u64> {
    let mut path = url.to_file_path().ok()?;
    while !path.exists() {
        path = path.parent()?.to_path_buf();
    }
    let stat = rustix::fs::statvfs(&path).ok()?;
    Some(stat.f_bavail.saturating_mul(stat.f_frsize))
}
