//! Where a source's files are: a store URL, a prefix inside it and an optional glob.

use std::path::Path;

use globset::{Glob, GlobMatcher};
use url::Url;

/// A resolved source location.
#[derive(Debug, Clone)]
pub struct Location {
    /// What the user wrote, for messages.
    pub written: String,
    /// The object store's root URL (`file:///`, `s3://bucket/`).
    pub store_url: Url,
    /// Prefix inside the store (a folder or a single file), without leading slash.
    pub prefix: String,
    /// A pattern the remaining path must match, when the user wrote a glob.
    pub glob: Option<GlobMatcher>,
}

fn has_glob(s: &str) -> bool {
    s.contains(['*', '?', '[', '{'])
}

impl Location {
    /// Resolve `written` relative to the project root `root` (an absolute folder).
    pub fn resolve(written: &str, root: &Path) -> Result<Self, String> {
        let trimmed = written.trim();
        if trimmed.is_empty() {
            return Err("the location is empty; write a path, a folder, a glob or a URL".into());
        }
        let url = if trimmed.contains("://") {
            Url::parse(trimmed).map_err(|e| format!("'{trimmed}' is not a valid URL: {e}"))?
        } else {
            let path = Path::new(trimmed);
            let abs = if path.is_absolute() {
                path.to_path_buf()
            } else {
                root.join(path)
            };
            let mut s = abs.to_string_lossy().replace('\\', "/");
            if trimmed.ends_with('/') && !s.ends_with('/') {
                s.push('/');
            }
            // Url::from_file_path would percent-encode glob characters; build it by hand.
            Url::parse(&format!("file://{s}"))
                .map_err(|e| format!("'{trimmed}' is not a valid path: {e}"))?
        };
        let store_url = Url::parse(&format!("{}://{}/", url.scheme(), url.authority()))
            .map_err(|e| format!("'{trimmed}': {e}"))?;
        let path = percent_decode(url.path());
        let path = path.trim_start_matches('/');
        let segments: Vec<&str> = path.split('/').collect();
        let first_glob = segments.iter().position(|s| has_glob(s));
        let (prefix, glob) = match first_glob {
            None => (path.to_string(), None),
            Some(i) => {
                let prefix = segments[..i].join("/");
                let pattern = segments[i..].join("/");
                let glob = Glob::new(&pattern)
                    .map_err(|e| format!("'{trimmed}' has an invalid glob: {e}"))?
                    .compile_matcher();
                (prefix, Some(glob))
            }
        };
        Ok(Location {
            written: trimmed.to_string(),
            store_url,
            prefix,
            glob,
        })
    }

    /// Whether a file found under the prefix is one the location names (its glob, if any);
    /// files of other tools' names are skipped apart (`crate::storage::skip_reason`). `relative`
    /// is the path below the prefix.
    pub fn matches(&self, relative: &str) -> bool {
        match &self.glob {
            Some(g) => g.is_match(relative),
            None => true,
        }
    }

    /// A local folder or file path, when the store is the local file system.
    pub fn local_path(&self) -> Option<std::path::PathBuf> {
        (self.store_url.scheme() == "file").then(|| Path::new("/").join(&self.prefix))
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_relative_globs_and_urls() {
        let root = Path::new("/proj");
        let l = Location::resolve("sources/sales/*.csv", root).unwrap();
        assert_eq!(l.store_url.as_str(), "file:///");
        assert_eq!(l.prefix, "proj/sources/sales");
        assert!(l.matches("a.csv") && !l.matches("a.json"));
        assert_eq!(
            crate::storage::skip_reason("_tmp.csv"),
            Some("starts with _")
        );
        let l = Location::resolve("s3://bucket/raw/orders/", root).unwrap();
        assert_eq!(l.store_url.as_str(), "s3://bucket/");
        assert_eq!(l.prefix, "raw/orders/");
        assert!(l.glob.is_none());
        let l = Location::resolve("sources/x y/**/*.csv", root).unwrap();
        assert_eq!(l.prefix, "proj/sources/x y");
        assert!(l.matches("2024/01/a.csv"));
    }
}
