//! Upkeep of the tables' files: what each table's folder holds beyond its current version, and
//! removing what no version within a retention period needs (`kbcrm vacuum`).
//!
//! Which files may go is Delta's VACUUM rule, as delta-rs computes it (its full mode): a data
//! or deletion-vector file that the current version does not reference and that no version
//! committed within the retention period references, last written before that period. Files
//! a killed run wrote and never committed fall under it as well as files replaced by merges
//! and overwrites. The versions incremental models last read (recorded in `kbcrm_state`,
//! compared with the current ones at their next run) keep their files whatever their age.
//! kbcrm deletes the files itself instead of letting delta-rs commit
//! `VACUUM START`/`VACUUM END` versions: a vacuum changes no table's version, so the next run
//! rebuilds nothing because of it.

use std::collections::HashMap;
use std::time::Duration;

use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use object_store::path::Path as StorePath;

use super::Warehouse;
use super::state::StateKey;
use crate::error::{Error, Result};

/// The files of one table's folder.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableFiles {
    /// Table name.
    pub table: String,
    /// Files the current version reads (data and deletion vectors).
    pub files: usize,
    /// Their bytes.
    pub bytes: u64,
    /// Files in the folder the current version does not reference.
    pub unreferenced_files: usize,
    /// Their bytes.
    pub unreferenced_bytes: u64,
}

/// What vacuuming one table removed (or would remove).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Vacuumed {
    /// Table name.
    pub table: String,
    /// Files removed.
    pub files: usize,
    /// Their bytes.
    pub bytes: u64,
}

/// The table versions the state entries record as read (a model's inputs when it was last
/// built), by table.
pub fn recorded_inputs(state: &HashMap<StateKey, String>) -> HashMap<String, Vec<u64>> {
    let mut out: HashMap<String, Vec<u64>> = HashMap::new();
    for value in state.values() {
        let Ok(serde_json::Value::Object(print)) = serde_json::from_str(value) else {
            continue;
        };
        let Some(serde_json::Value::Object(inputs)) = print.get("inputs") else {
            continue;
        };
        for (table, version) in inputs {
            if let Some(v) = version.as_u64() {
                out.entry(table.clone()).or_default().push(v);
            }
        }
    }
    for versions in out.values_mut() {
        versions.sort_unstable();
        versions.dedup();
    }
    out
}

impl Warehouse {
    /// Every file in the folder of `table` outside its log, with its size, by path relative to
    /// the folder.
    async fn folder_files(&self, table: &deltalake::DeltaTable) -> Result<HashMap<String, u64>> {
        let store = table.object_store();
        let listed: Vec<_> = store.list(None).try_collect().await?;
        Ok(listed
            .into_iter()
            .filter(|m| !m.location.as_ref().starts_with("_delta_log/"))
            .map(|m| (m.location.to_string(), m.size))
            .collect())
    }

    /// The files `table` could lose: those no version committed within `retain` references,
    /// last written before it (a dry run of Delta's VACUUM in full mode).
    async fn removable(
        &self,
        table: &deltalake::DeltaTable,
        retain: Duration,
        keep: &[u64],
    ) -> Result<Vec<String>> {
        let retain = chrono::Duration::from_std(retain)
            .map_err(|_| Error::Usage("the retention period is too long".into()))?;
        let mut vacuum = table
            .clone()
            .vacuum()
            .with_mode(deltalake::operations::vacuum::VacuumMode::Full)
            .with_retention_period(retain)
            .with_enforce_retention_duration(false)
            .with_dry_run(true);
        if !keep.is_empty() {
            vacuum = vacuum.with_keep_versions(keep);
        }
        let (_, metrics) = vacuum.await?;
        Ok(metrics.files_deleted)
    }

    /// The files of every table: the current version's, and the unreferenced ones.
    pub async fn table_files(&self) -> Result<Vec<TableFiles>> {
        let mut out = Vec::new();
        for name in self.table_names().await? {
            let Some(table) = self.load(&name).await? else {
                continue;
            };
            let listed = self.folder_files(&table).await?;
            let mut unreferenced = self.removable(&table, Duration::ZERO, &[]).await?;
            unreferenced.retain(|f| listed.contains_key(f));
            let gone: u64 = unreferenced.iter().filter_map(|f| listed.get(f)).sum();
            let total: u64 = listed.values().sum();
            out.push(TableFiles {
                table: name,
                files: listed.len().saturating_sub(unreferenced.len()),
                bytes: total.saturating_sub(gone),
                unreferenced_files: unreferenced.len(),
                unreferenced_bytes: gone,
            });
        }
        Ok(out)
    }

    /// Remove the files of `name` that no version committed within `retain` references (only
    /// count them with `dry_run`). The caller holds the run lock, so no writer has files in
    /// the folder that it may still commit.
    /// The files of the versions in `keep` stay.
    pub async fn vacuum_table(
        &self,
        name: &str,
        retain: Duration,
        keep: &[u64],
        dry_run: bool,
    ) -> Result<Vacuumed> {
        let Some(table) = self.load(name).await? else {
            return Ok(Vacuumed {
                table: name.to_string(),
                ..Default::default()
            });
        };
        let listed = self.folder_files(&table).await?;
        let mut removable = self.removable(&table, retain, keep).await?;
        // Removed files stay in the log as tombstones: only those still there count.
        removable.retain(|f| listed.contains_key(f));
        let bytes = removable.iter().filter_map(|f| listed.get(f)).sum();
        if !dry_run {
            let store = table.object_store();
            for file in &removable {
                match store.delete(&StorePath::from(file.as_str())).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => {
                        return Err(Error::warehouse(format!(
                            "cannot remove '{file}' of table '{name}': {e}; the files removed \
                             so far were unreferenced, the table is as it was"
                        )));
                    }
                }
            }
        }
        Ok(Vacuumed {
            table: name.to_string(),
            files: removable.len(),
            bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_versions_models_last_read_are_found_in_their_fingerprints() {
        let key = |n: &str| ("sales".to_string(), n.to_string(), "built".to_string());
        let state = HashMap::from([
            (
                key("a"),
                r#"{"definition":"x","inputs":{"t":3,"u":null}}"#.to_string(),
            ),
            (
                key("b"),
                r#"{"definition":"y","inputs":{"t":1}}"#.to_string(),
            ),
            (
                key("c"),
                r#"{"definition":"z","inputs":{"t":3,"v":7}}"#.to_string(),
            ),
            (key("d"), "2025-01-01T00:00:00Z".to_string()),
        ]);
        let found = recorded_inputs(&state);
        assert_eq!(found.get("t"), Some(&vec![1, 3]));
        assert_eq!(found.get("v"), Some(&vec![7]));
        assert_eq!(found.len(), 2, "{found:?}");
    }
}
