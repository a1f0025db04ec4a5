//! `kbcrm freshness`: is each source still delivering? The age of a source is the time since
//! its newest file changed; sources with `freshness:` thresholds are judged against them.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::error::{Error, Result};
use crate::plan::Project;

/// How fresh one source is.
#[derive(Debug, Clone)]
pub struct SourceFreshness {
    /// Pipeline.
    pub pipeline: String,
    /// Source.
    pub source: String,
    /// When its newest file changed (`None`: no file).
    pub newest: Option<DateTime<Utc>>,
    /// Its age.
    pub age: Option<Duration>,
    /// Thresholds.
    pub warn_after: Option<Duration>,
    /// Thresholds.
    pub error_after: Option<Duration>,
    /// `ok`, `warn` or `error`.
    pub status: &'static str,
}

/// Judge every source that declares `freshness:` (all sources with `all`).
pub async fn check(project: &Project, all: bool) -> Result<Vec<SourceFreshness>> {
    let now = Utc::now();
    let mut out = Vec::new();
    for p in &project.pipelines {
        for s in &p.sources {
            let Some(location) = s.location() else {
                continue;
            };
            if s.freshness.is_none() && !all {
                continue;
            }
            let (warn_after, error_after) = s.freshness.unwrap_or((None, None));
            let store = crate::storage::store_for(&location.store_url)?;
            let newest = match crate::sources::list_files(s, location, &store).await {
                Ok(listing) => listing.files.iter().map(|f| f.modified).max(),
                Err(Error::Source { .. }) => None,
                Err(e) => return Err(e),
            };
            let age = newest.map(|t| (now - t).to_std().unwrap_or(Duration::ZERO));
            let over = |limit: Option<Duration>| match (limit, age) {
                (Some(l), Some(a)) => a > l,
                (Some(_), None) => true,
                (None, _) => false,
            };
            let status = if over(error_after) {
                "error"
            } else if over(warn_after) {
                "warn"
            } else {
                "ok"
            };
            out.push(SourceFreshness {
                pipeline: p.name.clone(),
                source: s.name.clone(),
                newest,
                age,
                warn_after,
                error_after,
                status,
            });
        }
    }
    Ok(out)
}

/// The report as text, and the error when any source is past `error_after`.
pub fn report(results: &[SourceFreshness]) -> (String, Result<()>) {
    let show = |d: Option<Duration>| {
        d.map(|d| humantime::format_duration(Duration::from_secs(d.as_secs())).to_string())
            .unwrap_or_else(|| "-".into())
    };
    let mut s = format!(
        "{:<12} {:<20} {:<26} {:>16} {:>12} {:>12}  status\n",
        "pipeline", "source", "newest file", "age", "warn after", "error after"
    );
    for r in results {
        s.push_str(&format!(
            "{:<12} {:<20} {:<26} {:>16} {:>12} {:>12}  {}\n",
            r.pipeline,
            r.source,
            r.newest
                .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
                .unwrap_or_else(|| "no file".into()),
            show(r.age),
            show(r.warn_after),
            show(r.error_after),
            r.status
        ));
    }
    if results.is_empty() {
        s.push_str("no source declares `freshness:`; `kbcrm freshness --all` shows every source\n");
    }
    let stale: Vec<String> = results
        .iter()
        .filter(|r| r.status == "error")
        .map(|r| format!("{}.{}", r.pipeline, r.source))
        .collect();
    let result = if stale.is_empty() {
        Ok(())
    } else {
        Err(Error::DataQuality {
            pipeline: results
                .iter()
                .find(|r| r.status == "error")
                .map(|r| r.pipeline.clone())
                .unwrap_or_default(),
            message: format!("stale sources past their error_after: {}", stale.join(", ")),
        })
    };
    (s, result)
}
