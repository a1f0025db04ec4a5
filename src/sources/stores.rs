//! Object stores for source and warehouse URLs.
//!
//! Local paths and `file://` use the local file system. `s3://`, `gs://`, `az://` (and the other
//! schemes object_store knows) take their settings from the standard environment variables:
//! `AWS_*` (e.g. `AWS_ACCESS_KEY_ID`, `AWS_REGION`, `AWS_ENDPOINT`), `GOOGLE_*`, `AZURE_*`.

use std::sync::Arc;

use object_store::ObjectStore;
use object_store::local::LocalFileSystem;
use url::Url;

use crate::error::{Error, Result};

/// Environment variables passed to object-store builders, by their prefixes.
const ENV_PREFIXES: &[&str] = &["AWS_", "GOOGLE_", "AZURE_"];

/// The store holding `url` (its root: `file:///`, `s3://bucket/`, ...).
pub fn store_for(url: &Url) -> Result<Arc<dyn ObjectStore>> {
    match url.scheme() {
        "file" => Ok(Arc::new(LocalFileSystem::new())),
        "memory" => Ok(Arc::new(object_store::memory::InMemory::new())),
        _ => {
            let options = std::env::vars()
                .filter(|(k, _)| ENV_PREFIXES.iter().any(|p| k.starts_with(p)))
                .map(|(k, v)| (k.to_ascii_lowercase(), v));
            let (store, _) = object_store::parse_url_opts(url, options).map_err(|e| {
                Error::Usage(format!(
                    "cannot open '{}': {e}; check the URL and the credentials in the environment \
                     (AWS_*, GOOGLE_*, AZURE_*)",
                    redact(url)
                ))
            })?;
            Ok(Arc::from(store))
        }
    }
}

/// A URL without user name or password, for messages.
pub fn redact(url: &Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.to_string()
}
