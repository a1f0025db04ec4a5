//! Publishing a run's staged writes, all or (after recovery) all.
//!
//! Delta commits are atomic per table. A run touches several tables, so before the first table
//! is committed the run writes a manifest (`_kbcrm/pending/<run id>.json`) holding every table's
//! actions. If the process dies between two table commits, [`Warehouse::recover`] finds the
//! manifest and commits what is missing: the run ends complete, never half-applied.

use std::collections::HashMap;

use deltalake::DeltaTableBuilder;
use deltalake::kernel::Action;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties, TableReference};
use deltalake::protocol::{DeltaOperation, SaveMode};
use futures::TryStreamExt;
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use url::Url;

use super::{META_DIR, Staged, Warehouse};
use crate::error::{Error, Result};

/// Commit-info key holding the run id.
pub const RUN_ID_KEY: &str = "kbcrm.runId";

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    run_id: String,
    pipeline: String,
    tables: Vec<ManifestTable>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ManifestTable {
    table: String,
    /// Where the table was when the run wrote the manifest; recovery commits to the table of
    /// that name in the warehouse as it is opened then (the same folder may be reached by
    /// another URL: a moved folder, another mount point, `s3a://` for `s3://`).
    url: String,
    read_version: Option<u64>,
    actions: Vec<Action>,
    app_metadata: HashMap<String, serde_json::Value>,
}

fn manifest_path(wh: &Warehouse, run_id: &str) -> object_store::path::Path {
    wh.path(&format!("{META_DIR}/pending/{run_id}.json"))
}

/// Commit every staged write that changes its table, as one run. Returns the new version of each
/// committed table.
pub async fn commit_run(
    wh: &Warehouse,
    run_id: &str,
    pipeline: &str,
    staged: &[Staged],
) -> Result<HashMap<String, u64>> {
    let tables: Vec<ManifestTable> = staged
        .iter()
        .filter(|s| s.changes())
        .map(|s| ManifestTable {
            table: s.table.clone(),
            url: s.url.to_string(),
            read_version: s.read_version,
            actions: s.actions.clone(),
            app_metadata: HashMap::from([
                (RUN_ID_KEY.to_string(), serde_json::json!(run_id)),
                ("kbcrm.pipeline".to_string(), serde_json::json!(pipeline)),
                (
                    "kbcrm.mode".to_string(),
                    serde_json::json!(s.operation.as_str()),
                ),
                (
                    "kbcrm.rowsWritten".to_string(),
                    serde_json::json!(s.metrics.rows_written),
                ),
            ]),
        })
        .collect();
    if tables.is_empty() {
        return Ok(HashMap::new());
    }
    let manifest = Manifest {
        run_id: run_id.to_string(),
        pipeline: pipeline.to_string(),
        tables,
    };
    let path = manifest_path(wh, run_id);
    let bytes = serde_json::to_vec(&manifest).map_err(|e| Error::Internal(e.to_string()))?;
    if let Err(e) = wh.store().put(&path, PutPayload::from(bytes)).await {
        // Nothing is committed: the caller discards the run's files. A put that failed late
        // may still have written the manifest, which would then name files that are gone.
        if let Err(gone) = wh.store().delete(&path).await
            && !matches!(gone, object_store::Error::NotFound { .. })
        {
            return Err(Error::Unfinished {
                run_id: run_id.to_string(),
                message: format!(
                    "writing its manifest failed ({e}), and so did removing it \
                                  ({gone})"
                ),
            });
        }
        return Err(e.into());
    }
    // From here on the manifest promises the commit: its files stay until it is complete.
    let versions = apply(wh, &manifest).await.map_err(|e| Error::Unfinished {
        run_id: run_id.to_string(),
        message: e.to_string(),
    })?;
    if let Err(e) = wh.store().delete(&path).await {
        // Every table is committed; the next run finds that and removes the manifest.
        tracing::warn!(run_id, "the run is committed, but its manifest stays: {e}");
    }
    Ok(versions)
}

/// Commit each table of a manifest that is not committed yet.
async fn apply(wh: &Warehouse, manifest: &Manifest) -> Result<HashMap<String, u64>> {
    let mut versions = HashMap::new();
    for (i, t) in manifest.tables.iter().enumerate() {
        let read = match t.read_version {
            Some(v) => wh.cached_at(&t.table, v).await,
            None => None,
        };
        wh.committing(&t.table).await;
        let v = commit_table(wh.table_url(&t.table), t, &manifest.run_id, read).await?;
        versions.insert(t.table.clone(), v);
        crash_point(i + 1);
    }
    Ok(versions)
}

/// Fault injection for crash tests: with `KBCRM_CRASH_AFTER_TABLE_COMMITS=N` the process dies
/// right after the N-th table commit of a run, as a power cut would leave it. Only in builds with
/// the `fault-injection` feature, which `cargo test` turns on.
#[cfg(feature = "fault-injection")]
fn crash_point(committed: usize) {
    if std::env::var("KBCRM_CRASH_AFTER_TABLE_COMMITS")
        .ok()
        .and_then(|v| v.parse().ok())
        == Some(committed)
    {
        std::process::abort();
    }
}

#[cfg(not(feature = "fault-injection"))]
fn crash_point(_committed: usize) {}

/// Commit one table of a manifest; `read` is the table at its read version when the caller
/// has it loaded already.
async fn commit_table(
    url: Url,
    t: &ManifestTable,
    run_id: &str,
    read: Option<deltalake::DeltaTable>,
) -> Result<u64> {
    let mut table = match read {
        Some(table) => table,
        None => DeltaTableBuilder::from_url(url.clone())?.build()?,
    };
    let latest = table.log_store().get_latest_version(0).await.ok();
    // Already committed by this run (recovery after a crash between commit and cleanup)?
    if let Some(latest) = latest {
        let next = t.read_version.map_or(0, |v| v + 1);
        if latest >= next && committed_by(&table, next, run_id).await? {
            return Ok(next);
        }
    }
    let operation = match t.read_version {
        None => {
            let (protocol, metadata) = t.actions.iter().fold((None, None), |(p, m), a| match a {
                Action::Protocol(x) => (Some(x.clone()), m),
                Action::Metadata(x) => (p, Some(x.clone())),
                _ => (p, m),
            });
            DeltaOperation::Create {
                mode: SaveMode::ErrorIfExists,
                location: url.clone(),
                protocol: protocol
                    .ok_or_else(|| Error::Internal("create without protocol".into()))?,
                metadata: metadata
                    .ok_or_else(|| Error::Internal("create without metadata".into()))?,
            }
        }
        Some(_) => DeltaOperation::Write {
            mode: if t.actions.iter().any(|a| matches!(a, Action::Remove(_))) {
                SaveMode::Overwrite
            } else {
                SaveMode::Append
            },
            partition_by: None,
            predicate: None,
        },
    };
    if let Some(v) = t.read_version
        && table.version() != Some(v)
    {
        table.load_version(v).await?;
    }
    let snapshot = match t.read_version {
        Some(_) => Some(table.snapshot()?),
        None => None,
    };
    // Every 100th version (Delta's `checkpointInterval`) also writes a checkpoint: opening a
    // table then reads it and the commits after it instead of every commit since the first, so a
    // warehouse loaded daily for years opens as fast as a new one. The commit files stay (no
    // expired-log cleanup): older versions remain readable for time travel and for the
    // incremental models that compare with the version they last read.
    let properties = CommitProperties::default()
        .with_create_checkpoint(true)
        .with_cleanup_expired_logs(Some(false));
    let commit = CommitBuilder::from(properties)
        .with_actions(t.actions.clone())
        .with_app_metadata(t.app_metadata.clone())
        .with_max_retries(0)
        .build(
            snapshot.map(|s| s as &dyn TableReference),
            table.log_store(),
            operation,
        )
        .await
        .map_err(|e| match e {
            deltalake::DeltaTableError::VersionAlreadyExists(_) => Error::warehouse(format!(
                "committing table '{}' failed: {e}. Another run changed it at the same time; \
                 run again",
                t.table
            )),
            other => {
                Error::warehouse_caused(format!("committing table '{}' failed", t.table), other)
            }
        })?;
    Ok(commit.version())
}

/// Whether version `v` of `table` was written by run `run_id`.
async fn committed_by(table: &deltalake::DeltaTable, v: u64, run_id: &str) -> Result<bool> {
    let mut t = table.clone();
    if t.load_version(v).await.is_err() {
        return Ok(false);
    }
    let info = t.history(Some(1)).try_next().await?;
    Ok(info
        .and_then(|c| c.info.get(RUN_ID_KEY).cloned())
        .is_some_and(|r| r == serde_json::json!(run_id)))
}

impl Warehouse {
    /// Whether a run is committing its tables right now (or died doing so): until its
    /// manifest is gone, some of its tables may be at the new version and others not.
    pub async fn commit_in_progress(&self) -> Result<bool> {
        let prefix = self.path(&format!("{META_DIR}/pending"));
        Ok(self.store().list(Some(&prefix)).try_next().await?.is_some())
    }

    /// Resolve the commits of runs that died (or failed) while committing, each in full:
    /// completed when every table it has not committed yet is still at the version it read,
    /// otherwise rolled back (its uncommitted files removed) with a warning naming the run.
    /// Never leaves a manifest that the next run would stumble on again.
    pub async fn recover(&self) -> Result<Vec<Resolved>> {
        let prefix = self.path(&format!("{META_DIR}/pending"));
        let metas: Vec<_> = self.store().list(Some(&prefix)).try_collect().await?;
        let mut done = Vec::new();
        for meta in metas {
            let bytes = self.store().get(&meta.location).await?.bytes().await?;
            let manifest: Manifest = match serde_json::from_slice(&bytes) {
                Ok(m) => m,
                Err(e) => {
                    return Err(Error::warehouse(format!(
                        "pending run manifest '{}' is unreadable ({e}); move it away to continue",
                        meta.location
                    )));
                }
            };
            let resolved = resolve(self, &manifest).await?;
            match &resolved {
                Resolved::Completed { run_id } => tracing::warn!(%run_id,
                    pipeline = %manifest.pipeline, "completed the commit of an interrupted run"),
                Resolved::RolledBack {
                    run_id,
                    changed,
                    kept,
                } => tracing::warn!(
                    %run_id,
                    pipeline = %manifest.pipeline,
                    "rolled back the rest of an interrupted run: {} changed since it read \
                     {}; {}",
                    changed.join(", "),
                    if changed.len() == 1 { "it" } else { "them" },
                    if kept.is_empty() {
                        "none of its tables had been committed".to_string()
                    } else {
                        format!("committed before the interruption, kept: {}", kept.join(", "))
                    }
                ),
            }
            self.store().delete(&meta.location).await?;
            done.push(resolved);
        }
        Ok(done)
    }
}

/// How a pending commit was resolved.
#[derive(Debug, Clone, PartialEq)]
pub enum Resolved {
    /// Every table is committed now.
    Completed {
        /// The run.
        run_id: String,
    },
    /// Another run changed tables of it meanwhile: what it had not committed is removed.
    RolledBack {
        /// The run.
        run_id: String,
        /// Its tables another run changed.
        changed: Vec<String>,
        /// Its tables committed before it was interrupted (they keep its rows).
        kept: Vec<String>,
    },
}

/// Where one table of a pending manifest stands.
#[derive(Debug, PartialEq)]
enum Standing {
    /// Its version is the run's own.
    Committed,
    /// Still at the version the run read: the run's commit applies.
    Waiting,
    /// Another run has committed since the run read it.
    Changed,
}

async fn standing(wh: &Warehouse, t: &ManifestTable, run_id: &str) -> Result<Standing> {
    let table = DeltaTableBuilder::from_url(wh.table_url(&t.table))?.build()?;
    let latest = table.log_store().get_latest_version(0).await.ok();
    let next = t.read_version.map_or(0, |v| v + 1);
    Ok(match latest {
        // No table yet: the run was creating it.
        None if t.read_version.is_none() => Standing::Waiting,
        // The table it read is gone.
        None => Standing::Changed,
        Some(l) if Some(l) == t.read_version => Standing::Waiting,
        Some(l) if l >= next && committed_by(&table, next, run_id).await? => Standing::Committed,
        Some(_) => Standing::Changed,
    })
}

/// Complete a manifest's commit, or roll back what it has not committed when another run has
/// changed any of its tables since.
async fn resolve(wh: &Warehouse, manifest: &Manifest) -> Result<Resolved> {
    let mut changed = Vec::new();
    let mut kept = Vec::new();
    for t in &manifest.tables {
        match standing(wh, t, &manifest.run_id).await? {
            Standing::Committed => kept.push(t.table.clone()),
            Standing::Changed => changed.push(t.table.clone()),
            Standing::Waiting => {}
        }
    }
    let run_id = manifest.run_id.clone();
    if changed.is_empty() {
        apply(wh, manifest).await?;
        return Ok(Resolved::Completed { run_id });
    }
    for t in &manifest.tables {
        if !kept.contains(&t.table) {
            super::write::discard_actions(wh, &wh.table_url(&t.table), &t.actions).await?;
        }
    }
    Ok(Resolved::RolledBack {
        run_id,
        changed,
        kept,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Int64Array, RecordBatch};
    use arrow::datatypes::{DataType, Field, Schema};
    use datafusion::prelude::SessionContext;

    use super::*;
    use crate::plan::Write;
    use crate::warehouse::Staged;
    use crate::warehouse::state::stage_batch;

    /// Commit one row, `n`, to table `t` through `wh`, as run `run-N`.
    async fn append_row(wh: &Warehouse, n: i64) {
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        let batch =
            RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(vec![n]))]).expect("batch");
        let staged = stage_batch(wh, &SessionContext::new(), "t", batch, &Write::Append)
            .await
            .expect("stage");
        commit_run(wh, &format!("run-{n}"), "p", &[staged])
            .await
            .expect("commit");
    }

    /// Stage one row, `n`, for table `t` without committing it.
    async fn stage_row(wh: &Warehouse, t: &str, n: i64) -> Staged {
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        let batch =
            RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(vec![n]))]).expect("batch");
        stage_batch(wh, &SessionContext::new(), t, batch, &Write::Append)
            .await
            .expect("stage")
    }

    /// The manifest of run `run_id` for `staged`, written as a run does before its first table
    /// commit (and left, as a run killed then leaves it).
    async fn leave_manifest(wh: &Warehouse, run_id: &str, staged: &[&Staged]) -> Manifest {
        let manifest = Manifest {
            run_id: run_id.into(),
            pipeline: "p".into(),
            tables: staged
                .iter()
                .map(|s| ManifestTable {
                    table: s.table.clone(),
                    url: s.url.to_string(),
                    read_version: s.read_version,
                    actions: s.actions.clone(),
                    app_metadata: HashMap::from([(
                        RUN_ID_KEY.to_string(),
                        serde_json::json!(run_id),
                    )]),
                })
                .collect(),
        };
        let bytes = serde_json::to_vec(&manifest).expect("json");
        wh.store()
            .put(&manifest_path(wh, run_id), PutPayload::from(bytes))
            .await
            .expect("manifest");
        manifest
    }

    /// What a command that opens the warehouse at `root` resolves.
    async fn recover(root: &Url) -> Vec<Resolved> {
        Warehouse::open(root)
            .expect("open")
            .recover()
            .await
            .expect("recover")
    }

    async fn rows(wh: &Warehouse, t: &str) -> usize {
        wh.files_at(t, None).await.expect("files").len()
    }

    #[test]
    fn a_pending_commit_is_completed_or_rolled_back_never_stuck() {
        let dir = tempfile::tempdir().expect("tempdir");
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        runtime.block_on(async {
            let root = Url::from_directory_path(dir.path()).expect("url");
            let wh = Warehouse::open(&root).expect("warehouse");
            append_row(&wh, 0).await;
            let files = |t: &str| -> usize {
                std::fs::read_dir(dir.path().join(t))
                    .map(|d| {
                        d.flatten()
                            .filter(|e| e.file_name().to_string_lossy().ends_with(".parquet"))
                            .count()
                    })
                    .unwrap_or(0)
            };

            // Killed before its first table commit, tables untouched since: completed.
            let a = stage_row(&wh, "t", 1).await;
            leave_manifest(&wh, "run-a", &[&a]).await;
            let resolved = recover(&root).await;
            assert_eq!(
                resolved,
                vec![Resolved::Completed {
                    run_id: "run-a".into()
                }]
            );
            assert_eq!(rows(&wh, "t").await, 2);

            // Another run committed to its table meanwhile (two runs at once): rolled back, its
            // file removed, the manifest gone; the next recovery has nothing to do.
            let b = stage_row(&wh, "t", 2).await;
            leave_manifest(&wh, "run-b", &[&b]).await;
            append_row(&wh, 3).await;
            let before = files("t");
            let resolved = recover(&root).await;
            assert_eq!(
                resolved,
                vec![Resolved::RolledBack {
                    run_id: "run-b".into(),
                    changed: vec!["t".into()],
                    kept: vec![],
                }]
            );
            assert_eq!(
                files("t"),
                before - 1,
                "the rolled-back run's file is removed"
            );
            assert_eq!(rows(&wh, "t").await, 3);
            assert!(!wh.commit_in_progress().await.expect("list"));
            assert!(recover(&root).await.is_empty());

            // One table committed before the kill, the other changed since: the rest rolled
            // back, the committed one kept and named.
            let c_t = stage_row(&wh, "t", 4).await;
            let c_u = stage_row(&wh, "u", 4).await;
            let manifest = leave_manifest(&wh, "run-c", &[&c_t, &c_u]).await;
            commit_table(wh.table_url("t"), &manifest.tables[0], "run-c", None)
                .await
                .expect("first table");
            let other = stage_row(&wh, "u", 5).await;
            commit_run(&wh, "run-d", "p", &[other])
                .await
                .expect("another run");
            let resolved = recover(&root).await;
            assert_eq!(
                resolved,
                vec![Resolved::RolledBack {
                    run_id: "run-c".into(),
                    changed: vec!["u".into()],
                    kept: vec!["t".into()],
                }]
            );
            assert_eq!(rows(&wh, "t").await, 4);
            assert_eq!(rows(&wh, "u").await, 1);
            assert_eq!(files("u"), 1, "only the other run's file is left in u");
        });
    }

    #[test]
    fn the_hundredth_version_writes_a_checkpoint_and_keeps_every_commit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        runtime.block_on(async {
            let root = Url::from_directory_path(dir.path()).expect("url");
            let wh = Warehouse::open(&root).expect("warehouse");
            for n in 0..105_i64 {
                append_row(&wh, n).await;
            }
            let log = dir.path().join("t/_delta_log");
            let names: Vec<String> = std::fs::read_dir(&log)
                .expect("log")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect();
            let commits = names.iter().filter(|n| n.ends_with(".json")).count();
            let checkpoints: Vec<&String> = names
                .iter()
                .filter(|n| n.ends_with(".checkpoint.parquet"))
                .collect();
            assert_eq!(commits, 105, "{names:?}");
            assert_eq!(
                checkpoints,
                vec!["00000000000000000099.checkpoint.parquet"],
                "{names:?}"
            );
            assert!(names.iter().any(|n| n == "_last_checkpoint"), "{names:?}");
            // Read through the checkpoint now, and an older version from the commits.
            let fresh = Warehouse::open(&root).expect("warehouse");
            assert_eq!(fresh.files_at("t", None).await.expect("now").len(), 105);
            assert_eq!(fresh.files_at("t", Some(49)).await.expect("then").len(), 50);
        });
    }

    #[test]
    fn a_run_handle_reads_a_log_again_only_after_committing_to_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        runtime.block_on(async {
            let root = Url::from_directory_path(dir.path()).expect("url");
            let wh = Warehouse::open(&root)
                .expect("warehouse")
                .with_table_cache();
            let other = Warehouse::open(&root).expect("warehouse");
            let version = |wh: Warehouse| async move {
                wh.load("t").await.expect("load").and_then(|t| t.version())
            };
            assert_eq!(version(wh.clone()).await, None);
            append_row(&wh, 0).await;
            assert_eq!(version(wh.clone()).await, Some(0));
            // Pipelines starting together all get the table, read once.
            let (a, b) = futures::join!(version(wh.clone()), version(wh.clone()));
            assert_eq!((a, b), (Some(0), Some(0)));
            append_row(&wh, 1).await;
            assert_eq!(version(wh.clone()).await, Some(1));
            // A commit by another handle is not seen: the run lock keeps other processes out,
            // so the kept table is taken as the latest.
            append_row(&other, 2).await;
            assert_eq!(version(other.clone()).await, Some(2));
            assert_eq!(version(wh.clone()).await, Some(1));
        });
    }
}
