//! Staging a table write: new data files are written, the Delta actions that would publish them
//! are computed, and nothing is committed. [`super::commit_run`] publishes a run's staged writes.

mod files;
mod latest;
mod merge;

pub use files::{TableWriter, merge_sorted_files, write_frame};
pub(crate) use latest::{KEYS_IN_MEMORY_ROWS, latest_per_key, latest_rows};

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, UInt32Array};
use arrow::compute::SortColumn;
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use datafusion::common::ScalarValue;
use datafusion::datasource::MemTable;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::prelude::SessionContext;
use deltalake::DeltaTable;
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
use deltalake::kernel::{Action, Add, DeletionVectorDescriptor, Remove, StructType, new_metadata};
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use futures::StreamExt;
use object_store::ObjectStoreExt;
use url::Url;

use super::deletion::{DataFile, Deleted, KeySet};
use super::scd2::same;
use super::schema::{conform_batch, same_columns};
use super::{Warehouse, files_provider, table_files_provider};
use crate::error::{Error, Result};
use crate::plan::Write;
use crate::sql::{column_list, quote_ident};
use files::*;
use merge::*;

/// What a staged write does to its table.
#[derive(Debug, Clone, Default)]
pub struct WriteMetrics {
    /// Rows offered to the table (the load or the model result).
    pub rows_in: u64,
    /// Rows in the files the commit adds.
    pub rows_written: u64,
    /// Bytes of the files the commit adds.
    pub bytes_written: u64,
    /// Files the commit adds.
    pub files_added: usize,
    /// Files the commit removes.
    pub files_removed: usize,
}

/// A table write, ready to commit.
#[derive(Debug, Clone)]
pub struct Staged {
    /// Table name.
    pub table: String,
    /// Table URL.
    pub url: Url,
    /// The version the write was computed against (`None`: the table is new).
    pub read_version: Option<u64>,
    /// The Delta actions to commit; empty when the table does not change.
    pub actions: Vec<Action>,
    /// How the write was made.
    pub operation: Operation,
    /// Figures for the run summary.
    pub metrics: WriteMetrics,
    /// The table's schema after the write.
    pub schema: SchemaRef,
    /// Data files of the table after the write (for reading it before the commit).
    pub files: Vec<DataFile>,
}

/// What a staged write did to its table, as its history records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// The rows were replaced.
    Overwrite,
    /// Rows were added.
    Append,
    /// Rows were merged by keys.
    Merge,
    /// Versions of a type-2 dimension were closed and opened.
    Scd2,
}

impl Operation {
    /// The name as `mode:` writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Overwrite => "overwrite",
            Operation::Append => "append",
            Operation::Merge => "merge",
            Operation::Scd2 => "scd2",
        }
    }
}

impl From<&Write> for Operation {
    fn from(write: &Write) -> Self {
        match write {
            Write::Overwrite => Operation::Overwrite,
            Write::Append => Operation::Append,
            Write::Merge { .. } => Operation::Merge,
        }
    }
}

impl Staged {
    /// Whether committing would change the table.
    pub fn changes(&self) -> bool {
        !self.actions.is_empty()
    }

    /// The paths of the files `Add` actions bring in that the table did not have: a file
    /// added again with a new deletion vector is already there.
    pub fn new_file_paths(&self) -> Vec<&str> {
        let removed = self.removed_paths();
        self.actions
            .iter()
            .filter_map(|a| match a {
                Action::Add(add) if !removed.contains(add.path.as_str()) => Some(add.path.as_str()),
                _ => None,
            })
            .collect()
    }

    /// The paths of the files `Remove` actions take out (some may come back with a deletion
    /// vector).
    pub fn removed_paths(&self) -> HashSet<&str> {
        self.actions
            .iter()
            .filter_map(|a| match a {
                Action::Remove(r) => Some(r.path.as_str()),
                _ => None,
            })
            .collect()
    }

    /// Delete what this write wrote and nothing else: its new data files and the deletion
    /// vector files of the files it marks rows of.
    pub async fn discard(&self, wh: &Warehouse) -> Result<()> {
        discard_actions(wh, &self.url, &self.actions).await
    }
}

/// Delete what the uncommitted `actions` of the table at `url` wrote and nothing else: the new
/// data files they add and the deletion vector files of the files they mark rows of.
pub(crate) async fn discard_actions(wh: &Warehouse, url: &Url, actions: &[Action]) -> Result<()> {
    let removed: HashSet<&str> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Remove(r) => Some(r.path.as_str()),
            _ => None,
        })
        .collect();
    for a in actions {
        let Action::Add(add) = a else { continue };
        let path = if removed.contains(add.path.as_str()) {
            match add
                .deletion_vector
                .as_ref()
                .and_then(|dv| super::deletion::vector_file(url, dv))
            {
                Some(p) => p,
                None => continue,
            }
        } else {
            super::deletion::store_path(&file_url(url, &add.path))?
        };
        delete_path(wh, &path).await?;
    }
    Ok(())
}

/// New data for a table, already in uncommitted files.
pub struct NewData {
    /// Table name.
    pub table: String,
    /// Schema of the files.
    pub schema: SchemaRef,
    /// The files.
    pub adds: Vec<Add>,
    /// For each file, the position (in name order) of the source file its rows came from, when
    /// the rows of several source files of a keyed source may repeat keys; empty otherwise.
    pub source_files: Vec<usize>,
    /// Rows in them.
    pub rows: u64,
    /// Columns the files are sorted by (recorded in the table's metadata; merges keep the
    /// files they write in this order).
    pub cluster_by: Vec<String>,
    /// The expression whose values divide the rows among files (recorded and kept likewise).
    pub files_by: Option<String>,
    /// Whether the rows are known to repeat no key (a keyed source's rows resolved in memory
    /// before they were written): a merge then does not check them again.
    pub keys_unique: bool,
    /// Whether every row is known to differ from the table's row of its keys, if any (the
    /// versions an SCD2 load writes): a merge then does not compare them with the table.
    pub all_changes: bool,
}

/// The table property recording the columns its data files are sorted by.
pub const CLUSTER_BY_PROPERTY: &str = "kbcrm.clusterBy";
/// The table property recording the expression dividing its rows among files.
pub const FILES_BY_PROPERTY: &str = "kbcrm.filesBy";

/// The table configuration recording how new data is laid out.
fn clustering(new: &NewData) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if !new.cluster_by.is_empty() {
        out.push((CLUSTER_BY_PROPERTY.to_string(), new.cluster_by.join(",")));
    }
    if let Some(files_by) = &new.files_by {
        out.push((FILES_BY_PROPERTY.to_string(), files_by.clone()));
    }
    out
}

/// Whether a table's files are laid out as `new`'s, as its metadata records them.
fn same_layout(table: &DeltaTable, new: &NewData) -> Result<bool> {
    let snapshot = table.snapshot()?;
    let config = snapshot.metadata().configuration();
    let cluster_by: Vec<String> = config
        .get(CLUSTER_BY_PROPERTY)
        .map(|v| v.split(',').map(str::to_string).collect())
        .unwrap_or_default();
    Ok(cluster_by == new.cluster_by && config.get(FILES_BY_PROPERTY) == new.files_by.as_ref())
}

/// Work out what writing `new` with `write` does to the table's current version, writing any
/// further files needed (merge), and return the staged write. Nothing is committed.
pub async fn stage(
    wh: &Warehouse,
    ctx: &SessionContext,
    new: NewData,
    write: &Write,
) -> Result<Staged> {
    stage_with(wh, ctx, new, write, None).await
}

async fn stage_with(
    wh: &Warehouse,
    ctx: &SessionContext,
    new: NewData,
    write: &Write,
    gone: Option<RecordBatch>,
) -> Result<Staged> {
    let keys = write.keys();
    let url = wh.table_url(&new.table);
    let current = wh.load(&new.table).await?;
    // A merge needs unique keys.
    let new = if matches!(write, Write::Merge { .. }) && !new.keys_unique {
        let started = std::time::Instant::now();
        let new = latest_per_key(wh, ctx, new, keys).await?;
        step_done(&new.table, "keys checked unique", started);
        new
    } else {
        new
    };
    let Some(current) = current else {
        return create(url, new, write, wh.allows_deletion_vectors());
    };
    let current_schema: SchemaRef = Arc::new(
        current
            .snapshot()?
            .snapshot()
            .arrow_schema()
            .as_ref()
            .clone(),
    );
    let same = same_columns(&current_schema, &new.schema);
    if !same && *write != Write::Overwrite {
        delete_files(wh, &url, &new.adds).await?;
        return Err(Error::warehouse(format!(
            "table '{}' has columns ({}) but the new data has ({}); `mode: {}` cannot change a \
             table's columns. Run with --full-refresh to rebuild it",
            new.table,
            describe(&current_schema),
            describe(&new.schema),
            write.as_str()
        )));
    }
    match write {
        Write::Append => append(url, &current, new).await,
        Write::Overwrite => overwrite(wh, ctx, url, &current, new, same).await,
        Write::Merge { keys } => merge(wh, ctx, url, &current, new, keys, gone).await,
    }
}

/// A merge of `new` (by `keys`) that also removes the rows whose keys are in `gone` (a batch of
/// the key columns). Nothing is committed.
pub async fn stage_merge_removing(
    wh: &Warehouse,
    ctx: &SessionContext,
    new: NewData,
    keys: &[String],
    gone: RecordBatch,
) -> Result<Staged> {
    let gone = (gone.num_rows() > 0).then_some(gone);
    let write = Write::Merge {
        keys: keys.to_vec(),
    };
    stage_with(wh, ctx, new, &write, gone).await
}

/// The rows of `new`'s files (written, not committed) as a table.
pub async fn new_rows(
    wh: &Warehouse,
    new: &NewData,
) -> Result<Arc<dyn datafusion::catalog::TableProvider>> {
    new_rows_at(&wh.table_url(&new.table), new).await
}

/// [`new_rows`] for the table at `url`.
pub(crate) async fn new_rows_at(
    url: &Url,
    new: &NewData,
) -> Result<Arc<dyn datafusion::catalog::TableProvider>> {
    let files: Vec<Url> = new.adds.iter().map(|a| file_url(url, &a.path)).collect();
    files_provider(&files, new.schema.clone()).await
}

fn describe(schema: &SchemaRef) -> String {
    schema
        .fields()
        .iter()
        .map(|f| format!("{} {}", f.name(), f.data_type()))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) fn file_url(url: &Url, path: &str) -> Url {
    url.join(path).unwrap_or_else(|_| url.clone())
}

fn add_metrics(adds: &[Add], rows_in: u64) -> WriteMetrics {
    WriteMetrics {
        rows_in,
        rows_written: adds.iter().map(add_rows).sum(),
        bytes_written: adds.iter().map(|a| a.size as u64).sum(),
        files_added: adds.len(),
        files_removed: 0,
    }
}

/// Rows in a data file, from its statistics.
fn add_rows(add: &Add) -> u64 {
    add_record_count(add).unwrap_or(0)
}

/// Rows in a data file, when its statistics tell.
pub(crate) fn add_record_count(add: &Add) -> Option<u64> {
    add.stats
        .as_deref()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok())
        .and_then(|v| v.get("numRecords").and_then(|n| n.as_u64()))
}

/// The table property that lets writers mark rows deleted instead of rewriting files.
const ENABLE_DELETION_VECTORS: &str = "delta.enableDeletionVectors";

fn create(url: Url, new: NewData, write: &Write, deletion_vectors: bool) -> Result<Staged> {
    let struct_type: StructType = new.schema.as_ref().try_into_kernel()?;
    let mut configuration = clustering(&new);
    // Deletion vectors need reader version 3 and writer version 7 with the feature named.
    let protocol = if deletion_vectors {
        configuration.push((ENABLE_DELETION_VECTORS.to_string(), "true".to_string()));
        serde_json::json!({
            "minReaderVersion": 3,
            "minWriterVersion": 7,
            "readerFeatures": ["deletionVectors"],
            "writerFeatures": ["deletionVectors"]
        })
    } else {
        serde_json::json!({ "minReaderVersion": 1, "minWriterVersion": 2 })
    };
    let metadata = new_metadata(&struct_type, Vec::<String>::new(), configuration)?;
    let protocol = serde_json::from_value(protocol)
        .map_err(|e| Error::Internal(format!("protocol action: {e}")))?;
    let mut actions = vec![Action::Protocol(protocol), Action::Metadata(metadata)];
    let metrics = add_metrics(&new.adds, new.rows);
    let files = new
        .adds
        .iter()
        .map(|a| DataFile::whole(file_url(&url, &a.path)))
        .collect();
    actions.extend(new.adds.into_iter().map(Action::Add));
    Ok(Staged {
        table: new.table,
        url,
        read_version: None,
        actions,
        operation: write.into(),
        metrics,
        schema: new.schema,
        files,
    })
}

/// Data files of the current version, each with the action that would remove it.
async fn current_files(url: &Url, table: &DeltaTable) -> Result<Vec<(DataFile, Remove)>> {
    let files = super::deletion::table_files(table, url).await?;
    let log = table.snapshot()?.log_data();
    let removes: Vec<Remove> = log.iter().map(|f| f.remove_action(true)).collect();
    Ok(files.into_iter().zip(removes).collect())
}

/// Whether merges into `table` may mark replaced rows deleted instead of rewriting files.
fn marks_rows(wh: &Warehouse, table: &DeltaTable) -> Result<bool> {
    if !wh.allows_deletion_vectors() {
        return Ok(false);
    }
    let snapshot = table.snapshot()?;
    let enabled = snapshot
        .metadata()
        .configuration()
        .get(ENABLE_DELETION_VECTORS)
        .is_some_and(|v| v == "true");
    // The protocol's feature lists are reachable through its serialized form only.
    let protocol = serde_json::to_value(snapshot.protocol())
        .map_err(|e| Error::Internal(format!("protocol action: {e}")))?;
    let supported = protocol
        .get("writerFeatures")
        .and_then(|f| f.as_array())
        .is_some_and(|f| f.iter().any(|x| x == "deletionVectors"));
    Ok(enabled && supported)
}

async fn append(url: Url, current: &DeltaTable, new: NewData) -> Result<Staged> {
    let mut files: Vec<DataFile> = current_files(&url, current)
        .await?
        .into_iter()
        .map(|(f, _)| f)
        .collect();
    files.extend(
        new.adds
            .iter()
            .map(|a| DataFile::whole(file_url(&url, &a.path))),
    );
    let metrics = add_metrics(&new.adds, new.rows);
    Ok(Staged {
        table: new.table,
        url,
        read_version: current.version(),
        actions: new.adds.into_iter().map(Action::Add).collect(),
        operation: Operation::Append,
        metrics,
        schema: new.schema,
        files,
    })
}

async fn overwrite(
    wh: &Warehouse,
    ctx: &SessionContext,
    url: Url,
    current: &DeltaTable,
    new: NewData,
    same_schema: bool,
) -> Result<Staged> {
    let old = current_files(&url, current).await?;
    let new_files: Vec<Url> = new.adds.iter().map(|a| file_url(&url, &a.path)).collect();
    // The same rows in another order are a change when the table's declared order changed.
    let same_order = same_layout(current, &new)?;
    let unchanged = same_schema && same_order && {
        let target = table_files_provider(
            &old.iter().map(|(f, _)| f.clone()).collect::<Vec<_>>(),
            new.schema.clone(),
        )
        .await?;
        let fresh = files_provider(&new_files, new.schema.clone()).await?;
        crate::engine::spill_joins_on_retry(ctx, &new.table, || {
            same_rows(ctx, target.clone(), fresh.clone())
        })
        .await?
    };
    let metrics_rows = new.rows;
    if unchanged {
        delete_files(wh, &url, &new.adds).await?;
        return Ok(Staged {
            table: new.table,
            url,
            read_version: current.version(),
            actions: Vec::new(),
            operation: Operation::Overwrite,
            metrics: WriteMetrics {
                rows_in: metrics_rows,
                ..Default::default()
            },
            schema: new.schema,
            files: old.into_iter().map(|(f, _)| f).collect(),
        });
    }
    let mut metrics = add_metrics(&new.adds, new.rows);
    metrics.files_removed = old.len();
    let mut actions = Vec::new();
    if !same_schema || !same_order {
        let struct_type: StructType = new.schema.as_ref().try_into_kernel()?;
        let metadata = new_metadata(&struct_type, Vec::<String>::new(), clustering(&new))?;
        actions.push(Action::Metadata(metadata));
    }
    actions.extend(old.into_iter().map(|(_, r)| Action::Remove(r)));
    actions.extend(new.adds.into_iter().map(Action::Add));
    Ok(Staged {
        table: new.table,
        url,
        read_version: current.version(),
        actions,
        operation: Operation::Overwrite,
        metrics,
        schema: new.schema,
        files: new_files.into_iter().map(DataFile::whole).collect(),
    })
}

/// Whether two providers hold the same multiset of rows: by their digests when every column is
/// flat, otherwise by matching their rows (`EXCEPT ALL`).
async fn same_rows(
    ctx: &SessionContext,
    a: Arc<dyn datafusion::catalog::TableProvider>,
    b: Arc<dyn datafusion::catalog::TableProvider>,
) -> Result<bool> {
    if ctx.read_table(a.clone())?.count().await? != ctx.read_table(b.clone())?.count().await? {
        return Ok(false);
    }
    // Both are read with the same schema: either both have a digest or neither.
    if let Some(digest) = super::digest::rows_digest(ctx, a.clone()).await? {
        return Ok(Some(digest) == super::digest::rows_digest(ctx, b).await?);
    }
    let (na, nb) = ("__kbcrm_compare_a", "__kbcrm_compare_b");
    ctx.register_table(na, a)?;
    ctx.register_table(nb, b)?;
    let diff = match ctx
        .sql(&format!("select * from {na} except all select * from {nb}"))
        .await
    {
        Ok(df) => df.count().await,
        Err(e) => Err(e),
    };
    ctx.deregister_table(na)?;
    ctx.deregister_table(nb)?;
    Ok(diff? == 0)
}

/// The tag of a data file whose rows a merge kept as they were: the table version they are
/// unchanged since (the version the merge read).
const UNCHANGED_SINCE_TAG: &str = "kbcrm.rowsUnchangedSince";

/// `add`, tagged as holding rows unchanged since table version `version`.
fn tag_unchanged_since(mut add: Add, version: Option<u64>) -> Add {
    if let Some(v) = version {
        add.tags
            .get_or_insert_with(Default::default)
            .insert(UNCHANGED_SINCE_TAG.to_string(), Some(v.to_string()));
    }
    add
}

/// The version a data file's rows are unchanged since, when a merge tagged it so.
pub(crate) fn unchanged_since(add: &Add) -> Option<u64> {
    add.tags
        .as_ref()?
        .get(UNCHANGED_SINCE_TAG)?
        .as_deref()?
        .parse()
        .ok()
}

/// A debug event: how long a step of writing `table` took.
pub(crate) fn step_done(table: &str, step: &str, started: std::time::Instant) {
    tracing::debug!(table, step, seconds = started.elapsed().as_secs_f64());
}

fn collect_strings(batches: &[RecordBatch]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for b in batches {
        let col = arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Utf8)?;
        let col = col.as_string::<i32>();
        for i in 0..col.len() {
            if col.is_valid(i) {
                out.push(col.value(i).to_string());
            }
        }
    }
    Ok(out)
}

/// A file path as the scan reports it, as a URL under the table.
fn normalize_file(table_url: &Url, p: &str) -> String {
    if p.contains("://") {
        p.to_string()
    } else {
        file_url(table_url, p.trim_start_matches('/')).to_string()
    }
}

/// Remove uncommitted data files.
pub(crate) async fn delete_files(wh: &Warehouse, url: &Url, adds: &[Add]) -> Result<()> {
    for a in adds {
        let u = file_url(url, &a.path);
        if let Ok(p) = object_store::path::Path::from_url_path(u.path()) {
            delete_path(wh, &p).await?;
        }
    }
    Ok(())
}

/// Delete one file of the warehouse; one already gone is fine.
async fn delete_path(wh: &Warehouse, path: &object_store::path::Path) -> Result<()> {
    match wh.store().delete(path).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};

    #[tokio::test]
    async fn data_files_are_written_with_lz4() {
        let dir = tempfile::tempdir().expect("temporary folder");
        let url = Url::from_directory_path(dir.path()).expect("folder URL");
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("name", DataType::Utf8, true),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from_iter_values(0..1000)),
                Arc::new(StringArray::from_iter_values(
                    (0..1000).map(|i| format!("customer {i}")),
                )),
            ],
        )
        .expect("batch");
        let mut writer = TableWriter::new(&url, schema).expect("writer");
        writer.write(&batch).await.expect("write");
        let (adds, rows) = writer.finish().await.expect("finish");
        assert_eq!((adds.len(), rows), (1, 1000));
        let file = std::fs::File::open(dir.path().join(&adds[0].path)).expect("data file");
        let reader =
            parquet::file::reader::SerializedFileReader::new(file).expect("a Parquet file");
        let meta = parquet::file::reader::FileReader::metadata(&reader);
        for group in meta.row_groups() {
            for column in group.columns() {
                assert_eq!(column.compression(), parquet::basic::Compression::LZ4_RAW);
            }
        }
    }
}
