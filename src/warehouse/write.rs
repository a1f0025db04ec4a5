//! Staging a table write: new data files are written, the Delta actions that would publish them
//! are computed, and nothing is committed. [`super::commit_run`] publishes a run's staged writes.

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
use crate::config::pipeline::WriteMode;
use crate::error::{Error, Result};
use crate::sql::{column_list, quote_ident};

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
    pub mode: WriteMode,
    /// Figures for the run summary.
    pub metrics: WriteMetrics,
    /// The table's schema after the write.
    pub schema: SchemaRef,
    /// Data files of the table after the write (for reading it before the commit).
    pub files: Vec<DataFile>,
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

/// Streams batches into new Parquet data files of a table, without committing them.
pub struct TableWriter {
    url: Url,
    schema: SchemaRef,
    rows: u64,
    /// The file being written, or with `split`, one per value of that column.
    writers: Vec<(ScalarValue, RecordBatchWriter)>,
    /// The column of the incoming batches whose values divide the rows among files (not
    /// written).
    split: Option<usize>,
}

impl TableWriter {
    /// A writer of files with `schema` (already Delta-compatible) into the table at `url`.
    pub fn new(url: &Url, schema: SchemaRef) -> Result<Self> {
        Ok(TableWriter {
            url: url.clone(),
            schema,
            rows: 0,
            writers: Vec::new(),
            split: None,
        })
    }

    /// Write the rows of each value of this column of the incoming batches into files of their
    /// own, each in the order the rows come; the column itself is not written.
    fn split_by(&mut self, column: usize) {
        self.split = Some(column);
    }

    /// Write one batch (cast to the table schema when its types differ).
    pub async fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        let Some(split) = self.split else {
            return self.write_rows(ScalarValue::Null, batch).await;
        };
        let values = batch.column(split);
        let rest: Vec<usize> = (0..batch.num_columns()).filter(|c| *c != split).collect();
        let batch = batch.project(&rest)?;
        // Row numbers grouped by value, each group in the batch's order.
        let positions: ArrayRef =
            Arc::new(UInt32Array::from_iter_values(0..batch.num_rows() as u32));
        let by_value = arrow::compute::lexsort_to_indices(
            &[
                SortColumn {
                    values: values.clone(),
                    options: None,
                },
                SortColumn {
                    values: positions,
                    options: None,
                },
            ],
            None,
        )?;
        let sorted = arrow::compute::take(values, &by_value, None)?;
        for range in arrow::compute::partition(std::slice::from_ref(&sorted))?.ranges() {
            let value = ScalarValue::try_from_array(&sorted, range.start)?;
            let part = if range.len() == batch.num_rows() {
                batch.clone()
            } else {
                let rows = by_value.slice(range.start, range.len());
                arrow::compute::take_record_batch(&batch, &rows)?
            };
            self.write_rows(value, &part).await?;
        }
        Ok(())
    }

    async fn write_rows(&mut self, value: ScalarValue, batch: &RecordBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let batch = conform_batch(batch, &self.schema)?;
        self.rows += batch.num_rows() as u64;
        let i = match self.writers.iter().position(|(v, _)| *v == value) {
            Some(i) => i,
            None if self.writers.len() >= MAX_FILES_BY_VALUES => {
                return Err(Error::warehouse(format!(
                    "`files_by` divides the rows written to {} among more than \
                     {MAX_FILES_BY_VALUES} values, each with files of its own; it is meant for a \
                     few values (years, regions): use a coarser expression",
                    self.url
                )));
            }
            None => {
                let writer =
                    RecordBatchWriter::try_new(self.url.as_str(), self.schema.clone(), None, None)?
                        .with_writer_properties(data_file_properties());
                self.writers.push((value, writer));
                self.writers.len() - 1
            }
        };
        self.writers[i].1.write(batch).await?;
        Ok(())
    }

    /// Write a whole stream.
    pub async fn write_stream(&mut self, mut stream: SendableRecordBatchStream) -> Result<()> {
        while let Some(batch) = stream.next().await {
            self.write(&batch?).await?;
        }
        Ok(())
    }

    /// Close the files; their `Add` actions and the number of rows written.
    pub async fn finish(self) -> Result<(Vec<Add>, u64)> {
        let mut adds = Vec::new();
        for (_, mut writer) in self.writers {
            adds.extend(writer.flush().await?);
        }
        Ok((adds, self.rows))
    }
}

/// How kbcrm writes its Parquet data files: compressed with LZ4 (the `LZ4_RAW` codec) instead of
/// the Delta writer's Snappy. Reading is where an incremental run spends its time (a 1% batch
/// looks up its keys among every row of the large tables), and LZ4 decompresses faster: the
/// scale-1 batch took 2.40 s instead of 2.49 s (median of 7, alternated), a full load the same
/// (23.5 s), for files 6% larger. Files written before keep their codec; readers handle both,
/// as do DuckDB, Spark and pyarrow.
fn data_file_properties() -> parquet::file::properties::WriterProperties {
    parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::LZ4_RAW)
        .build()
}

/// The most `files_by` values one write may have (each has files of its own, open at once).
const MAX_FILES_BY_VALUES: usize = 256;

/// The column carrying each row's `files_by` value while it is written.
const FILES_BY_COLUMN: &str = "__kbcrm_files_by";

/// Run `df` and write its rows in the table's order into new files of the table at `url`:
/// sorted by `cluster_by`, and with `files_by`, one run of files per value of that expression.
async fn write_ordered(
    url: &Url,
    schema: SchemaRef,
    df: datafusion::dataframe::DataFrame,
    cluster_by: &[String],
    files_by: Option<&str>,
) -> Result<(Vec<Add>, u64)> {
    use datafusion::prelude::ident;
    // Sorted by `cluster_by` only: the writer sends each row to its value's file, where the
    // order is kept. The value is computed after the sort, so that the rows the sort holds
    // (and spills) are no wider.
    let df = if cluster_by.is_empty() {
        df
    } else {
        df.sort(
            cluster_by
                .iter()
                .map(|c| ident(c).sort(true, false))
                .collect(),
        )?
    };
    let df = match files_by {
        Some(expr) => {
            let value = df.parse_sql_expr(expr)?;
            df.with_column(FILES_BY_COLUMN, value)?
        }
        None => df,
    };
    let (stream, plan) = crate::engine::stream(df).await?;
    let mut writer = TableWriter::new(url, schema)?;
    if files_by.is_some() {
        writer.split_by(stream.schema().index_of(FILES_BY_COLUMN)?);
    }
    writer.write_stream(stream).await?;
    if let Some(plan) = plan {
        crate::engine::trace_plan(plan.as_ref(), url.as_str());
    }
    writer.finish().await
}

/// Run `sql` and write its rows into new files of the table at `url`, laid out as `new`'s
/// (sorted by its `cluster_by`, a run of files per value of its `files_by`).
async fn write_like(
    ctx: &SessionContext,
    url: &Url,
    new: &NewData,
    sql: &str,
) -> Result<(Vec<Add>, u64)> {
    let df = ctx.sql(sql).await?;
    write_ordered(
        url,
        new.schema.clone(),
        df,
        &new.cluster_by,
        new.files_by.as_deref(),
    )
    .await
}

/// Run `df` and write its rows into new, uncommitted files of `table`, sorted by `cluster_by`,
/// a run of files per value of `files_by`.
pub async fn write_frame(
    wh: &Warehouse,
    table: &str,
    df: datafusion::dataframe::DataFrame,
    cluster_by: &[String],
    files_by: Option<&str>,
) -> Result<NewData> {
    let schema = super::delta_compatible(df.schema().as_arrow());
    let (adds, rows) = write_ordered(
        &wh.table_url(table),
        schema.clone(),
        df,
        cluster_by,
        files_by,
    )
    .await?;
    Ok(NewData {
        table: table.to_string(),
        schema,
        adds,
        source_files: Vec::new(),
        rows,
        cluster_by: cluster_by.to_vec(),
        files_by: files_by.map(str::to_string),
        keys_unique: false,
        all_changes: false,
    })
}

/// Merge `new`'s files, each sorted by `new.cluster_by` on its own (a model built in slices
/// writes a sorted run per slice), into new files holding one run in that order, and remove
/// the files merged. The merge streams (a sort-preserving merge of the files, no sort), so it
/// holds a few batches per file whatever the table's size. With one file or no `cluster_by`
/// there is nothing to merge.
pub async fn merge_sorted_files(
    wh: &Warehouse,
    ctx: &SessionContext,
    new: NewData,
) -> Result<NewData> {
    let [first, second, rest @ ..] = new.adds.as_slice() else {
        return Ok(new);
    };
    if new.cluster_by.is_empty() {
        return Ok(new);
    }
    let url = wh.table_url(&new.table);
    let run = |add: &Add| -> Result<datafusion::dataframe::DataFrame> {
        let file = super::sorted_file(
            &file_url(&url, &add.path),
            new.schema.clone(),
            &new.cluster_by,
        )?;
        Ok(ctx.read_table(file)?)
    };
    let written = async {
        let mut runs = run(first)?.union(run(second)?)?;
        for add in rest {
            runs = runs.union(run(add)?)?;
        }
        write_ordered(
            &url,
            new.schema.clone(),
            runs,
            &new.cluster_by,
            new.files_by.as_deref(),
        )
        .await
    }
    .await;
    let (adds, rows) = match written {
        Ok(done) => done,
        Err(e) => {
            delete_files(wh, &url, &new.adds).await?;
            return Err(e);
        }
    };
    delete_files(wh, &url, &new.adds).await?;
    Ok(NewData { adds, rows, ..new })
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

/// Work out what writing `new` with `mode` does to the table's current version, writing any
/// further files needed (merge), and return the staged write. Nothing is committed.
pub async fn stage(
    wh: &Warehouse,
    ctx: &SessionContext,
    new: NewData,
    mode: WriteMode,
    keys: &[String],
) -> Result<Staged> {
    stage_with(wh, ctx, new, mode, keys, None).await
}

async fn stage_with(
    wh: &Warehouse,
    ctx: &SessionContext,
    new: NewData,
    mode: WriteMode,
    keys: &[String],
    gone: Option<RecordBatch>,
) -> Result<Staged> {
    let url = wh.table_url(&new.table);
    let current = wh.load(&new.table).await?;
    // A merge needs unique keys; so does the full refresh of a keyed source, which loads all
    // its files again.
    let new = if (mode == WriteMode::Merge || !new.source_files.is_empty()) && !new.keys_unique {
        let started = std::time::Instant::now();
        let new = latest_per_key(wh, ctx, new, keys).await?;
        step_done(&new.table, "keys checked unique", started);
        new
    } else {
        new
    };
    let Some(current) = current else {
        return create(url, new, mode, wh.allows_deletion_vectors());
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
    if !same && mode != WriteMode::Overwrite {
        delete_files(wh, &url, &new.adds).await?;
        return Err(Error::warehouse(format!(
            "table '{}' has columns ({}) but the new data has ({}); `mode: {}` cannot change a \
             table's columns. Run with --full-refresh to rebuild it",
            new.table,
            describe(&current_schema),
            describe(&new.schema),
            mode.as_str()
        )));
    }
    match mode {
        WriteMode::Append => append(url, &current, new).await,
        WriteMode::Overwrite => overwrite(wh, ctx, url, &current, new, same).await,
        WriteMode::Merge => merge(wh, ctx, url, &current, new, keys, gone).await,
        WriteMode::Scd2 => Err(Error::Internal(
            "type-2 writes go through warehouse::scd2::stage_scd2".into(),
        )),
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
    stage_with(wh, ctx, new, WriteMode::Merge, keys, gone).await
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

fn create(url: Url, new: NewData, mode: WriteMode, deletion_vectors: bool) -> Result<Staged> {
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
        mode,
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
        mode: WriteMode::Append,
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
            mode: WriteMode::Overwrite,
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
        mode: WriteMode::Overwrite,
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

/// Up to three keys the files of `new` repeat (with their counts); `by_file` counts repeats
/// within one source file only (`new.source_files` tells the files apart).
async fn repeated_keys(
    ctx: &SessionContext,
    url: &Url,
    new: &NewData,
    keys: &[String],
    by_file: bool,
) -> Result<Vec<RecordBatch>> {
    let name = format!("__kbcrm_keys_{}", new.table);
    ctx.register_table(&name, ranked_view(ctx, url, new, by_file).await?)?;
    let cols = column_list(keys);
    let group = if by_file {
        format!("{cols}, {}", quote_ident(SOURCE_FILE_COLUMN))
    } else {
        cols.clone()
    };
    let sql = format!(
        "select {cols}, count(*) as n from {name} group by {group} having count(*) > 1 limit 3"
    );
    let batches = match ctx.sql(&sql).await {
        Ok(df) => df.collect().await,
        Err(e) => Err(e),
    };
    ctx.deregister_table(&name)?;
    Ok(batches?)
}

/// The rows of `new`'s files; `ranked` adds the column of each row's source file position.
async fn ranked_view(
    ctx: &SessionContext,
    url: &Url,
    new: &NewData,
    ranked: bool,
) -> Result<Arc<dyn datafusion::catalog::TableProvider>> {
    if !ranked {
        return new_rows_at(url, new).await;
    }
    let mut ranks: Vec<usize> = new.source_files.clone();
    ranks.sort_unstable();
    ranks.dedup();
    let mut union: Option<datafusion::dataframe::DataFrame> = None;
    for rank in ranks {
        let files: Vec<Url> = new
            .adds
            .iter()
            .zip(&new.source_files)
            .filter(|(_, r)| **r == rank)
            .map(|(a, _)| file_url(url, &a.path))
            .collect();
        let provider = files_provider(&files, new.schema.clone()).await?;
        let df = ctx
            .read_table(provider)?
            .with_column(SOURCE_FILE_COLUMN, datafusion::prelude::lit(rank as u64))?;
        union = Some(match union {
            Some(u) => u.union(df)?,
            None => df,
        });
    }
    let union = union.ok_or_else(|| Error::Internal("no files to rank".into()))?;
    Ok(union.into_view())
}

fn repeats_error(new: &NewData, keys: &[String], batches: &[RecordBatch], what: &str) -> Error {
    let sample = arrow::util::pretty::pretty_format_batches(batches)
        .map(|t| t.to_string())
        .unwrap_or_default();
    Error::DataQuality {
        pipeline: String::new(),
        message: format!(
            "`mode: merge` into '{}' needs unique keys ({}), but {what} repeats some:\n{sample}",
            new.table,
            keys.join(", ")
        ),
    }
}

/// The rows of `new` with unique keys. A key that several source files repeat keeps the row of
/// the last file in name order, as if each file had been loaded by a run of its own; a key
/// repeated within one file is an error (which of its rows holds is not known).
pub(crate) async fn latest_per_key(
    wh: &Warehouse,
    ctx: &SessionContext,
    new: NewData,
    keys: &[String],
) -> Result<NewData> {
    let url = wh.table_url(&new.table);
    let several_files = new
        .source_files
        .first()
        .is_some_and(|first| new.source_files.iter().any(|r| r != first));
    if several_files && new.rows <= KEYS_IN_MEMORY_ROWS {
        match latest_in_memory(ctx, &url, &new, keys).await {
            Ok(Some(None)) => return Ok(new),
            Ok(Some(Some(kept))) => {
                let kept = keep_latest(ctx, &url, &new, keys, Some(kept)).await;
                delete_files(wh, &url, &new.adds).await?;
                return kept;
            }
            // A file repeats a key within itself: the queries below name the keys.
            Ok(None) => {}
            Err(e) => {
                delete_files(wh, &url, &new.adds).await?;
                return Err(e);
            }
        }
    }
    let mut batches = repeated_keys(ctx, &url, &new, keys, false).await;
    if several_files && matches!(&batches, Ok(b) if b.iter().any(|b| b.num_rows() > 0)) {
        batches = repeated_keys(ctx, &url, &new, keys, true).await;
        if matches!(&batches, Ok(b) if b.iter().all(|b| b.num_rows() == 0)) {
            let kept = keep_latest(ctx, &url, &new, keys, None).await;
            delete_files(wh, &url, &new.adds).await?;
            return kept;
        }
    }
    let batches = match batches {
        Ok(b) => b,
        Err(e) => {
            delete_files(wh, &url, &new.adds).await?;
            return Err(e);
        }
    };
    if batches.iter().any(|b| b.num_rows() > 0) {
        delete_files(wh, &url, &new.adds).await?;
        let what = if several_files {
            "one file"
        } else {
            "the new data"
        };
        return Err(repeats_error(&new, keys, &batches, what));
    }
    Ok(new)
}

/// Up to this many new rows of a keyed table from several source files have their repeated
/// keys resolved in memory, in one pass over the rows, rather than by three queries (each of
/// which reads them again).
pub(crate) const KEYS_IN_MEMORY_ROWS: u64 = 500_000;

/// The rows of `new` with repeated keys resolved in memory, as [`latest_per_key`] resolves
/// them: `Some(None)` when no key repeats, `Some(Some(kept))` with the last source file's row
/// of each key when only different files repeat keys, and `None` when a file repeats a key
/// within itself (or the key columns cannot be compared in memory).
async fn latest_in_memory(
    ctx: &SessionContext,
    url: &Url,
    new: &NewData,
    keys: &[String],
) -> Result<Option<Option<Vec<RecordBatch>>>> {
    // Each file's rows in source file order (a file's rank, or 0 for all when there is one).
    let rank = |i: usize| new.source_files.get(i).copied().unwrap_or(0);
    let mut order: Vec<usize> = (0..new.adds.len()).collect();
    order.sort_by_key(|&i| rank(i));
    let mut batches: Vec<(usize, RecordBatch)> = Vec::new();
    for i in order {
        let files = [file_url(url, &new.adds[i].path)];
        let provider = files_provider(&files, new.schema.clone()).await?;
        for batch in ctx.read_table(provider)?.collect().await? {
            batches.push((rank(i), batch));
        }
    }
    latest_rows(&batches, keys)
}

/// The last row of each key of `keys` among `batches`, each with the position of the source
/// file it came from (in order of that position): `Some(None)` when no key repeats,
/// `Some(Some(kept))` with the kept rows when only different files repeat keys, and `None`
/// when a file repeats a key within itself (or the key columns cannot be compared in memory).
pub(crate) fn latest_rows(
    batches: &[(usize, RecordBatch)],
    keys: &[String],
) -> Result<Option<Option<Vec<RecordBatch>>>> {
    use arrow::row::{RowConverter, SortField};
    use std::collections::hash_map::{Entry, HashMap};
    let Some((_, first)) = batches.first() else {
        return Ok(Some(None));
    };
    let schema = first.schema();
    let Ok(key_columns) = keys
        .iter()
        .map(|k| schema.index_of(k))
        .collect::<std::result::Result<Vec<_>, _>>()
    else {
        return Ok(None);
    };
    let fields = key_columns
        .iter()
        .map(|&i| SortField::new(schema.field(i).data_type().clone()))
        .collect();
    let Ok(converter) = RowConverter::new(fields) else {
        return Ok(None);
    };
    // Each key's latest row: (batch, row); a later file's row replaces an earlier one's.
    let mut latest: HashMap<Box<[u8]>, (usize, u32)> = HashMap::new();
    let mut replaced = 0usize;
    for (b, (file, batch)) in batches.iter().enumerate() {
        let columns: Vec<ArrayRef> = key_columns
            .iter()
            .map(|&i| batch.column(i).clone())
            .collect();
        let rows = converter.convert_columns(&columns)?;
        for (r, row) in rows.iter().enumerate() {
            match latest.entry(row.as_ref().into()) {
                Entry::Occupied(mut e) => {
                    if batches[e.get().0].0 == *file {
                        return Ok(None);
                    }
                    replaced += 1;
                    e.insert((b, r as u32));
                }
                Entry::Vacant(e) => {
                    e.insert((b, r as u32));
                }
            }
        }
    }
    if replaced == 0 {
        return Ok(Some(None));
    }
    let mut kept_rows: Vec<Vec<u32>> = vec![Vec::new(); batches.len()];
    for (b, r) in latest.into_values() {
        kept_rows[b].push(r);
    }
    let mut kept = Vec::new();
    for ((_, batch), mut rows) in batches.iter().zip(kept_rows) {
        if rows.is_empty() {
            continue;
        }
        rows.sort_unstable();
        kept.push(arrow::compute::take_record_batch(
            batch,
            &UInt32Array::from(rows),
        )?);
    }
    Ok(Some(Some(kept)))
}

/// Write the row of the last source file for each key of `new` into new files: the rows `kept`
/// when they were chosen in memory, otherwise chosen by a query.
async fn keep_latest(
    ctx: &SessionContext,
    url: &Url,
    new: &NewData,
    keys: &[String],
    kept: Option<Vec<RecordBatch>>,
) -> Result<NewData> {
    let name = format!("__kbcrm_latest_{}", new.table);
    let cols = column_list(new.schema.fields().iter().map(|f| f.name()));
    let sql = match kept {
        Some(kept) => {
            ctx.register_table(
                &name,
                Arc::new(MemTable::try_new(new.schema.clone(), vec![kept])?),
            )?;
            format!("select {cols} from {name}")
        }
        None => {
            ctx.register_table(&name, ranked_view(ctx, url, new, true).await?)?;
            let partition = column_list(keys);
            format!(
                "select {cols} from (select *, row_number() over (partition by {partition} \
                 order by {} desc) as __kbcrm_row from {name}) where __kbcrm_row = 1",
                quote_ident(SOURCE_FILE_COLUMN)
            )
        }
    };
    let written = write_like(ctx, url, new, &sql).await;
    ctx.deregister_table(&name)?;
    let (adds, rows) = written?;
    tracing::info!(
        table = %new.table,
        rows_in = new.rows,
        rows_kept = rows,
        "keys repeated by several source files keep the last file's row"
    );
    Ok(NewData {
        table: new.table.clone(),
        schema: new.schema.clone(),
        source_files: Vec::new(),
        adds,
        rows,
        cluster_by: new.cluster_by.clone(),
        files_by: new.files_by.clone(),
        keys_unique: true,
        all_changes: false,
    })
}

/// The column of a row's source file position while repeated keys are resolved.
const SOURCE_FILE_COLUMN: &str = "__kbcrm_source_file";

const FILE_COLUMN: &str = "__kbcrm_file";

async fn merge(
    wh: &Warehouse,
    ctx: &SessionContext,
    url: Url,
    current: &DeltaTable,
    new: NewData,
    keys: &[String],
    gone: Option<RecordBatch>,
) -> Result<Staged> {
    let old = current_files(&url, current).await?;
    let new_name = format!("__kbcrm_new_{}", new.table);
    let target_name = format!("__kbcrm_target_{}", new.table);
    ctx.register_table(&new_name, new_rows_at(&url, &new).await?)?;
    current.update_datafusion_session(&ctx.state())?;
    let target = current
        .table_provider()
        .with_file_column(FILE_COLUMN)
        .await?;
    ctx.register_table(&target_name, target)?;
    // New rows whose keys the table does not hold yet are added as they were written: only the
    // target's key columns are read to find out. In a table of several files, the files holding
    // those keys are found too, and the merge then reads only them: a batch that changes rows
    // of a few files (this year's open invoices) does not read the others again.
    let started = std::time::Instant::now();
    // The files holding any key of the new rows, when they were looked up.
    let mut with_keys: Option<Vec<String>> = None;
    let any_known = match gone {
        Some(_) => Ok(true),
        None if old.len() > 1 => {
            let files = crate::engine::spill_joins_on_retry(ctx, &new.table, || {
                files_with_keys(ctx, keys, &new_name, &target_name)
            })
            .await;
            match files {
                Ok(files) if !files.is_empty() && files.len() < old.len() => {
                    ctx.deregister_table(&target_name)?;
                    let only = current
                        .table_provider()
                        .with_file_column(FILE_COLUMN)
                        .with_file_paths(files.clone())
                        .await?;
                    ctx.register_table(&target_name, only)?;
                    with_keys = Some(files);
                    Ok(true)
                }
                Ok(files) => {
                    let any = !files.is_empty();
                    with_keys = Some(files);
                    Ok(any)
                }
                Err(e) => Err(e),
            }
        }
        None => {
            crate::engine::spill_joins_on_retry(ctx, &new.table, || {
                known_keys(ctx, keys, &new_name, &target_name)
            })
            .await
        }
    };
    step_done(&new.table, "merge: keys looked up", started);
    if !matches!(any_known, Ok(true)) {
        ctx.deregister_table(&new_name)?;
        ctx.deregister_table(&target_name)?;
        if let Err(e) = any_known {
            delete_files(wh, &url, &new.adds).await?;
            return Err(e);
        }
        let mut staged = append(url, current, new).await?;
        staged.mode = WriteMode::Merge;
        return Ok(staged);
    }
    // Tried again with sort-merge joins when a hash join does not fit; `new`'s files are deleted
    // only after.
    let gone_name = format!("__kbcrm_gone_{}", new.table);
    if let Some(gone) = gone {
        let table = MemTable::try_new(gone.schema(), vec![vec![gone]])?;
        ctx.register_table(&gone_name, Arc::new(table))?;
    }
    let removing = ctx.table_exist(gone_name.as_str())?;
    // Files the merge may mark rows of instead of rewriting them, with their sizes.
    let markable: HashMap<String, (&DataFile, Option<u64>)> = if marks_rows(wh, current)? {
        old.iter()
            .map(|(f, r)| {
                let size = r.size.and_then(|s| u64::try_from(s).ok());
                (f.url.to_string(), (f, size))
            })
            .collect()
    } else {
        HashMap::new()
    };
    let result = crate::engine::spill_joins_on_retry(ctx, &new.table, || {
        let gone = removing.then_some(gone_name.as_str());
        let names = (new_name.as_str(), target_name.as_str(), gone);
        let job = MergeJob {
            url: &url,
            new: &new,
            keys,
            names,
            read_version: current.version(),
            markable: &markable,
            with_keys: with_keys.as_deref(),
        };
        merge_sql(wh, ctx, job)
    })
    .await;
    if removing {
        ctx.deregister_table(&gone_name)?;
    }
    ctx.deregister_table(&new_name)?;
    ctx.deregister_table(&target_name)?;
    delete_files(wh, &url, &new.adds).await?;
    let merged = result?;
    // A file with rows marked deleted is removed and added again with its new deletion vector.
    let mut marked_adds = marked_file_adds(current, &url, &merged.marked)?;
    let mut files = Vec::with_capacity(old.len() + merged.adds.len());
    let mut actions = Vec::new();
    let mut removed = 0;
    for (file, remove) in old {
        let key = file.url.to_string();
        if merged.rewritten.contains(&key) {
            actions.push(Action::Remove(remove));
            removed += 1;
        } else if let Some((deleted, _)) = merged.marked.get(&key) {
            let add = marked_adds
                .remove(&key)
                .ok_or_else(|| Error::Internal(format!("no add action for {key}")))?;
            actions.push(Action::Remove(remove));
            actions.push(Action::Add(add));
            files.push(DataFile {
                url: file.url,
                deleted: Some(deleted.clone()),
            });
        } else {
            files.push(file);
        }
    }
    files.extend(
        merged
            .adds
            .iter()
            .map(|a| DataFile::whole(file_url(&url, &a.path))),
    );
    let mut metrics = add_metrics(&merged.adds, new.rows);
    metrics.files_removed = removed;
    metrics.rows_written = merged.changed_rows;
    actions.extend(merged.adds.into_iter().map(Action::Add));
    Ok(Staged {
        table: new.table,
        url,
        read_version: current.version(),
        actions,
        mode: WriteMode::Merge,
        metrics,
        schema: new.schema,
        files,
    })
}

/// Whether any key of the new rows is already in the target table.
async fn known_keys(
    ctx: &SessionContext,
    keys: &[String],
    new_name: &str,
    target_name: &str,
) -> Result<bool> {
    let on = same(keys, "n", "t");
    let sql = format!("select 1 from {target_name} t join {new_name} n on {on} limit 1");
    let batches = crate::engine::collect(ctx.sql(&sql).await?, "known keys").await?;
    Ok(batches.iter().any(|b| b.num_rows() > 0))
}

/// The data files (as the scan names them) of the target rows whose keys the new rows have.
async fn files_with_keys(
    ctx: &SessionContext,
    keys: &[String],
    new_name: &str,
    target_name: &str,
) -> Result<Vec<String>> {
    let on = same(keys, "n", "t");
    let key_list = column_list(keys);
    let sql = format!(
        "select distinct t.{FILE_COLUMN} from {target_name} t \
         join (select distinct {key_list} from {new_name}) n on {on}"
    );
    collect_strings(&crate::engine::collect(ctx.sql(&sql).await?, "files with keys").await?)
}

/// What a merge wrote.
struct Merged {
    /// The files it rewrote (their URLs): their kept rows are in `adds`.
    rewritten: HashSet<String>,
    /// The files it wrote.
    adds: Vec<Add>,
    /// The files it marked rows of (their URLs): all their marked rows, and the descriptor of
    /// the deletion vector that lists them.
    marked: HashMap<String, (Arc<Deleted>, DeletionVectorDescriptor)>,
    /// New or changed rows.
    changed_rows: u64,
}

/// The `Add` actions that bring back each file of `marked` with its new deletion vector.
fn marked_file_adds(
    current: &DeltaTable,
    url: &Url,
    marked: &HashMap<String, (Arc<Deleted>, DeletionVectorDescriptor)>,
) -> Result<HashMap<String, Add>> {
    let mut out = HashMap::new();
    if marked.is_empty() {
        return Ok(out);
    }
    for f in current.snapshot()?.log_data().iter() {
        let key = file_url(url, &f.path()).to_string();
        let Some((_, dv)) = marked.get(&key) else {
            continue;
        };
        // The tags are only reachable through the whole action.
        #[allow(deprecated)]
        let mut add = f.add_action();
        add.deletion_vector = Some(dv.clone());
        add.data_change = true;
        // The file's statistics still count the marked rows: its bounds are no longer tight.
        if let Some(stats) = &add.stats
            && let Ok(serde_json::Value::Object(mut map)) =
                serde_json::from_str::<serde_json::Value>(stats)
        {
            map.insert("tightBounds".into(), serde_json::Value::Bool(false));
            add.stats = Some(serde_json::Value::Object(map).to_string());
        }
        out.insert(key, add);
    }
    Ok(out)
}

/// At most this share of a file's rows may be marked deleted; a file that would have more is
/// rewritten.
const MAX_MARKED_SHARE: f64 = 0.5;

/// Files of fewer rows are rewritten rather than marked: rewriting them costs little, and a
/// deletion vector is one more file for every later read to fetch (bookkeeping tables change a
/// few of their rows on every run).
const MIN_MARKED_FILE_ROWS: u64 = 1024;

/// What one merge works on.
struct MergeJob<'a> {
    /// The table.
    url: &'a Url,
    /// The rows to merge, written as files already.
    new: &'a NewData,
    /// The merge keys.
    keys: &'a [String],
    /// The session's names of the new rows, the table, and the rows gone at the source.
    names: (&'a str, &'a str, Option<&'a str>),
    /// The table's version the merge reads.
    read_version: Option<u64>,
    /// The files that may get a deletion vector instead of being rewritten, by URL.
    markable: &'a HashMap<String, (&'a DataFile, Option<u64>)>,
    /// The files holding keys that come again, when they were looked up from the files.
    with_keys: Option<&'a [String]>,
}

/// Run the merge: the files it rewrites or marks rows of, the files it writes, and the number
/// of new or changed rows. The files of `markable` (by URL) keep their rows and get a deletion
/// vector for the replaced ones, unless that would mark more than half of their rows.
async fn merge_sql(wh: &Warehouse, ctx: &SessionContext, job: MergeJob<'_>) -> Result<Merged> {
    let MergeJob {
        url,
        new,
        keys,
        names: (new_name, target_name, gone_name),
        read_version,
        markable,
        with_keys,
    } = job;
    let cols = column_list(new.schema.fields().iter().map(|f| f.name()));
    let on = same(keys, "c", "t");
    // Only target rows whose keys come again can be equal to new rows.
    let key_list = column_list(keys);
    let on_kt = same(keys, "k", "t");
    let t_cols = new
        .schema
        .fields()
        .iter()
        .map(|f| format!("t.{}", quote_ident(f.name())))
        .collect::<Vec<_>>()
        .join(", ");
    let started = std::time::Instant::now();
    // Rows known to be changes are the new rows as written; others are compared with the table.
    let (changed_df, changed_rows) = match new.all_changes {
        true => (
            ctx.sql(&format!("select {cols} from {new_name}")).await?,
            new.rows,
        ),
        false => {
            let changed = format!(
                "select {cols} from {new_name} except \
                 select {t_cols} from (select distinct {key_list} from {new_name}) k join {target_name} t on {on_kt}"
            );
            let df = ctx.sql(&changed).await?.cache().await?;
            let rows = df.clone().count().await? as u64;
            (df, rows)
        }
    };
    step_done(&new.table, "merge: changed rows found", started);
    let started = std::time::Instant::now();
    if changed_rows == 0 && gone_name.is_none() {
        return Ok(Merged {
            rewritten: HashSet::new(),
            adds: Vec::new(),
            marked: HashMap::new(),
            changed_rows: 0,
        });
    }
    ctx.register_table("__kbcrm_changed", changed_df.clone().into_view())?;
    // Rows of removed keys go, with the files that hold them.
    let (touched_gone, keep_gone) = match gone_name {
        Some(g) => (
            format!(
                " union select distinct t.{FILE_COLUMN} from {target_name} t join {g} c on {on}"
            ),
            format!(" and not exists (select 1 from {g} c where {on})"),
        ),
        None => (String::new(), String::new()),
    };
    let touched_sql = format!(
        "select distinct t.{FILE_COLUMN} from {target_name} t join __kbcrm_changed c on {on}{touched_gone}"
    );
    // When every new row is a change (keys are unique among them), the changed keys are the
    // new rows' keys, whose files were looked up already.
    let touched = match with_keys {
        Some(files) if gone_name.is_none() && changed_rows == new.rows => Ok(files.to_vec()),
        _ => match ctx.sql(&touched_sql).await {
            Ok(df) => crate::engine::collect(df, "touched files").await,
            Err(e) => Err(e.into()),
        }
        .and_then(|b| collect_strings(&b)),
    };
    let touched = match touched {
        Ok(t) => t,
        Err(e) => {
            ctx.deregister_table("__kbcrm_changed")?;
            return Err(e);
        }
    };
    step_done(&new.table, "merge: touched files found", started);
    let started = std::time::Instant::now();
    let marks = match mark_rows(wh, ctx, url, keys, gone_name, &touched, markable).await {
        Ok(m) => m,
        Err(e) => {
            ctx.deregister_table("__kbcrm_changed")?;
            return Err(e);
        }
    };
    step_done(&new.table, "merge: rows to mark found", started);
    let started = std::time::Instant::now();
    let touched: Vec<&String> = touched
        .iter()
        .filter(|p| !marks.contains_key(&normalize_file(url, p)))
        .collect();
    let touched_urls: HashSet<String> = touched.iter().map(|p| normalize_file(url, p)).collect();
    let list = touched
        .iter()
        .map(|p| format!("'{}'", p.replace('\'', "''")))
        .collect::<Vec<_>>()
        .join(", ");
    // The new and changed rows, and the rows kept from the touched files, go to files of their
    // own, each laid out as the table declares: the kept rows' files are tagged with the
    // version they are unchanged since, so that a model reading only what changed skips them.
    let result = async {
        let (mut adds, _) = write_like(ctx, url, new, "select * from __kbcrm_changed").await?;
        if !touched.is_empty() {
            let kept_sql = format!(
                "select {t_cols} from {target_name} t where t.{FILE_COLUMN} in ({list}) \
                 and not exists (select 1 from __kbcrm_changed c where {on}){keep_gone}"
            );
            let (kept, _) = match write_like(ctx, url, new, &kept_sql).await {
                Ok(kept) => kept,
                Err(e) => {
                    delete_files(wh, url, &adds).await?;
                    return Err(e);
                }
            };
            adds.extend(
                kept.into_iter()
                    .map(|add| tag_unchanged_since(add, read_version)),
            );
        }
        if marks.is_empty() {
            return Ok((adds, HashMap::new()));
        }
        let vectors: Vec<&Deleted> = marks.values().map(Arc::as_ref).collect();
        match super::deletion::write_deletion_vectors(wh.store(), url, &vectors).await {
            Ok(descriptors) => {
                let marked = marks
                    .into_iter()
                    .zip(descriptors)
                    .map(|((u, d), dv)| (u, (d, dv)))
                    .collect();
                Ok((adds, marked))
            }
            Err(e) => {
                delete_files(wh, url, &adds).await?;
                Err(e)
            }
        }
    }
    .await;
    step_done(&new.table, "merge: files rewritten", started);
    ctx.deregister_table("__kbcrm_changed")?;
    let (adds, marked) = result?;
    Ok(Merged {
        rewritten: touched_urls,
        adds,
        marked,
        changed_rows,
    })
}

/// All the rows of `file` (its URL `url`) to mark deleted once the rows of the keys in `set`
/// are, or `None` when that would be more than [`MAX_MARKED_SHARE`] of its rows or the file is
/// smaller than [`MIN_MARKED_FILE_ROWS`].
async fn rows_to_mark(
    wh: &Warehouse,
    set: &KeySet,
    url: &str,
    (file, size): (&DataFile, Option<u64>),
) -> Result<(String, Option<Arc<Deleted>>)> {
    let path = super::deletion::store_path(&file.url)?;
    let (rows, file_rows) = set.rows_in(wh.store().clone(), path, size).await?;
    let deleted = match &file.deleted {
        Some(d) => d.with(&rows)?,
        None => Deleted::new(rows, file_rows)?,
    };
    let keep = deleted.file_rows() >= MIN_MARKED_FILE_ROWS
        && deleted.count() as f64 <= MAX_MARKED_SHARE * deleted.file_rows() as f64;
    Ok((url.to_string(), keep.then(|| Arc::new(deleted))))
}

/// The files of `touched` (paths as the scan names them) that keep their rows, with all the
/// rows to mark deleted in each (those already marked included): the rows of the changed and
/// removed keys. Only files of `markable` qualify (see [`rows_to_mark`]).
async fn mark_rows(
    wh: &Warehouse,
    ctx: &SessionContext,
    url: &Url,
    keys: &[String],
    gone_name: Option<&str>,
    touched: &[String],
    markable: &HashMap<String, (&DataFile, Option<u64>)>,
) -> Result<HashMap<String, Arc<Deleted>>> {
    let candidates: Vec<(String, (&DataFile, Option<u64>))> = touched
        .iter()
        .filter_map(|p| {
            let u = normalize_file(url, p);
            markable.get(&u).map(|f| (u, *f))
        })
        .collect();
    if candidates.is_empty() {
        return Ok(HashMap::new());
    }
    let key_list = column_list(keys);
    let mut sql = format!("select distinct {key_list} from __kbcrm_changed");
    if let Some(g) = gone_name {
        sql.push_str(&format!(" union select {key_list} from {g}"));
    }
    let batches = crate::engine::collect(ctx.sql(&sql).await?, "keys to mark").await?;
    let Some(set) = KeySet::new(keys, &batches)? else {
        return Ok(HashMap::new());
    };
    let mut found = Vec::with_capacity(candidates.len());
    for chunk in candidates.chunks(4) {
        let reads = chunk
            .iter()
            .map(|(u, file)| rows_to_mark(wh, &set, u, *file));
        found.extend(futures::future::try_join_all(reads).await?);
    }
    Ok(found
        .into_iter()
        .filter_map(|(u, d)| Some((u, d?)))
        .collect())
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
