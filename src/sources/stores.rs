//! Object stores for source and warehouse URLs.

use std::sync::Arc;

use object_store::ObjectStore;
use object_store::local::LocalFileSystem;
use url::Url;

use crate::error::{Error, Result};

/// The store holding `url` (its root: `file:///`, `s3://bucket/`, ...).
pub fn store_for(url: &Url) -> Result<Arc<dyn ObjectStore>> {
    match url.scheme() {
        "file" => Ok(Arc::new(LocalFileSystem::new())),
        "memory" => Ok(Arc::new(object_store::memory::InMemory::new())),
        scheme => {
            let (store, _) = object_store::parse_url(url).map_err(|e| {
                Error::Usage(format!(
                    "cannot open '{url}': {e}; this build of kbcrm reads file:// and local paths \
                     (the '{scheme}' scheme needs the cloud feature)"
                ))
            })?;
            Ok(Arc::from(store))
        }
    }
}
