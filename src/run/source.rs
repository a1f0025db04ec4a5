//! Loading one source: list, read, quarantine, keep only what is new, stage.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{Array, ArrayRef, StringArray};
use arrow::compute::{cast, filter_record_batch};
use arrow::datatypes::{DataType, SchemaRef};
use arrow::record_batch::RecordBatch;
use datafusion::prelude::SessionContext;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::ObjectStore;
use tokio::sync::mpsc::Sender;
use tokio::task::JoinHandle;
use tracing::{info, instrument};

use super::progress::Step;
use super::{RunState, Runner, StepFigures, default_parallelism};
use crate::error::{Error, Result};
use crate::plan::{FileFormat, Incremental, Input, Location, Source, Write};
use crate::sources::{self, FileOutput, SourceFile, convert::declared_schema};
use crate::storage::store_for;
use crate::warehouse::delta_compatible;
use crate::warehouse::state::loaded_files;
use crate::warehouse::write::{
    KEYS_IN_MEMORY_ROWS, NewData, TableWriter, delete_files, latest_per_key, latest_rows, stage,
};

/// Keeps rows whose cursor column is above the last watermark, and finds the new watermark.
pub(super) struct CursorFilter {
    column: usize,
    data_type: DataType,
    above: Option<ArrayRef>,
    max: Option<ArrayRef>,
}

impl CursorFilter {
    pub(super) fn new(
        column: usize,
        data_type: &DataType,
        watermark: Option<&String>,
    ) -> Result<Self> {
        let above = match watermark {
            Some(w) => Some(cast(
                &(Arc::new(StringArray::from(vec![w.as_str()])) as ArrayRef),
                data_type,
            )?),
            None => None,
        };
        Ok(CursorFilter {
            column,
            data_type: data_type.clone(),
            above,
            max: None,
        })
    }

    /// Start the maximum at an earlier watermark, so the new one never goes below it.
    pub(super) fn seed(&mut self, watermark: &str) -> Result<()> {
        let field_type = self.data_type.clone();
        self.max = Some(cast(
            &(Arc::new(StringArray::from(vec![watermark])) as ArrayRef),
            &field_type,
        )?);
        Ok(())
    }

    pub(super) fn apply(&mut self, batch: &RecordBatch) -> Result<RecordBatch> {
        let col = batch.column(self.column);
        let kept = match &self.above {
            Some(w) => {
                let mask =
                    arrow::compute::kernels::cmp::gt(col, &arrow::array::Scalar::new(w.clone()))?;
                filter_record_batch(batch, &mask)?
            }
            None => batch.clone(),
        };
        let col = kept.column(self.column);
        if col.len() > col.null_count() {
            let batch_max = max_of(col)?;
            self.max = Some(match self.max.take() {
                Some(m)
                    if !arrow::compute::kernels::cmp::gt(
                        &batch_max,
                        &arrow::array::Scalar::new(m.clone()),
                    )?
                    .value(0) =>
                {
                    m
                }
                _ => batch_max,
            });
        }
        Ok(kept)
    }

    /// The new watermark as text.
    pub(super) fn watermark(&self) -> Result<Option<String>> {
        let Some(m) = &self.max else { return Ok(None) };
        let s = cast(m, &DataType::Utf8)?;
        let s = s
            .as_any()
            .downcast_ref::<StringArray>()
            .map(|a| a.value(0).to_string());
        Ok(s)
    }
}

/// The largest non-null value of an array, as a one-element array.
fn max_of(col: &ArrayRef) -> Result<ArrayRef> {
    let mut best: Option<usize> = None;
    for i in 0..col.len() {
        if col.is_null(i) {
            continue;
        }
        best = match best {
            None => Some(i),
            Some(b) => {
                let gt = arrow::compute::kernels::cmp::gt(&col.slice(i, 1), &col.slice(b, 1))?;
                Some(if gt.value(0) { i } else { b })
            }
        };
    }
    Ok(col.slice(best.unwrap_or(0), 1))
}

impl Runner {
    /// After a source is read: above its reject limit the staged files go and the run fails
    /// (nothing committed); otherwise the new watermark is kept for the commit.
    pub(super) async fn settle_read(
        &self,
        source: &Source,
        state: &mut RunState,
        url: &url::Url,
        adds: &[deltalake::kernel::Add],
        (rows_read, rejected): (u64, u64),
        cursor: Option<&CursorFilter>,
    ) -> Result<()> {
        if rows_read > 0 && rejected as f64 / rows_read as f64 > source.max_reject_ratio {
            delete_files(&self.wh, url, adds).await?;
            let rejects: Vec<&(String, sources::Reject)> = state
                .rejects
                .iter()
                .filter(|(name, _)| *name == source.name)
                .collect();
            super::quarantine::keep_failed(&self.wh, &source.pipeline, &state.run_id, &rejects)
                .await;
            return Err(Error::DataQuality {
                pipeline: source.pipeline.clone(),
                message: format!(
                    "source '{}' rejected {rejected} of {rows_read} rows ({:.2}%), more than \
                     rejects.max_ratio {}, so nothing was committed.\n{}\n`kbcrm rejects --run \
                     {}` lists every rejected row. Fix the files or the source's `schema:` and \
                     `csv:` options, or raise `rejects.max_ratio` to commit the rows that fit and \
                     keep the others in `quarantine`",
                    source.name,
                    100.0 * rejected as f64 / rows_read as f64,
                    source.max_reject_ratio,
                    super::quarantine::in_words(rejects.iter().map(|(_, r)| r)),
                    state.run_id
                ),
            });
        }
        if let Some(wm) = cursor.map(CursorFilter::watermark).transpose()?.flatten() {
            state.state_after.insert(
                (
                    source.pipeline.clone(),
                    source.name.clone(),
                    "cursor".to_string(),
                ),
                wm,
            );
        }
        Ok(())
    }

    #[instrument(skip_all, fields(source = %source.name, table = %source.table))]
    pub(super) async fn load_source(
        &self,
        source: &Source,
        ctx: &SessionContext,
        state: &mut RunState,
    ) -> Result<()> {
        let started = Instant::now();
        let full = self.options.full_refresh;
        let (format, location) = match &source.input {
            Input::Database(db) => return self.load_database_source(source, db, ctx, state).await,
            Input::Files { format, location } => (format, location),
        };
        let store_url = location.store_url.clone();
        let store = store_for(&store_url)?;
        let files = match format {
            FileFormat::Delta => Vec::new(),
            _ => list_source_files(source, location, &store, state).await?,
        };
        let Some((files, mut only_added)) = self
            .files_to_load(source, ctx, state, &store_url, files)
            .await?
        else {
            return Ok(());
        };
        let bar = self.progress.step(&format!("load {}", source.table));
        let schema = declared_schema(&source.columns);
        let table_schema = delta_compatible(&schema);
        let mut cursor = match file_cursor(source, state, full, &table_schema)? {
            Some((filter, after_watermark)) => {
                only_added = after_watermark;
                Some(filter)
            }
            None => None,
        };
        // Rows added since the last load are few: their merge plans on one partition, beside
        // the run's other steps.
        let _one_partition =
            (only_added && self.threads(state) > 1).then(|| crate::engine::one_partition(ctx));
        let parallel = self.options.parallel.unwrap_or_else(default_parallelism);
        let pieces = files.iter().any(|f| f.size > sources::PIECE_BYTES as u64);
        let encoder_count = if files.len() > 1 || pieces { 2 } else { 1 };
        // Keeps the reading task of a text source until the load ends.
        let (_reader_task, mut stream) = read_files(source, format, store, files, schema, parallel);
        let url = self.wh.table_url(&source.table);
        // The Parquet files are encoded in a task of their own, while the next files are read
        // and parsed: a load keeps every core busy instead of parsing and encoding in turn.
        // Two encoders (files, or pieces of a large CSV file, alternate between them) when
        // there is more than one file or a file read in pieces. A keyed source's files are
        // written apart, each source file into files of its own, so that a key several of them
        // repeat keeps the last file's row.
        let keyed = matches!(source.write, Write::Merge { .. });
        let (senders, encoders) = spawn_encoders(&url, &table_schema, encoder_count, parallel);
        let (totals, held) = feed_encoders(
            source,
            state,
            &mut stream,
            &senders,
            &mut cursor,
            &bar,
            keyed,
        )
        .await?;
        drop(senders);
        let encoded = join_encoders(encoders, keyed).await?;
        self.settle_read(
            source,
            state,
            &url,
            &encoded.adds,
            (totals.rows_read, totals.rejected),
            cursor.as_ref(),
        )
        .await?;
        let new = new_data(source, &url, table_schema, held, encoded, totals).await?;
        let write = match full {
            true => Write::Overwrite,
            false => source.write.clone(),
        };
        // A full refresh of a keyed source loads all its files again: a key that several of
        // them repeat keeps the last file's row, as a merge of each in turn would.
        let new = match full && keyed && !new.keys_unique {
            true => latest_per_key(&self.wh, ctx, new, source.write.keys()).await?,
            false => new,
        };
        let staged = stage(&self.wh, ctx, new, &write)
            .await
            .map_err(|e| super::in_pipeline(e, &source.pipeline))?;
        bar.finish();
        self.record(
            ctx,
            state,
            staged,
            StepFigures {
                kind: "source",
                rows_in: totals.rows_read,
                rows_rejected: totals.rejected,
                started,
            },
        )
        .await
    }

    /// Of the files listed, those to load: for a load of new files those not loaded before
    /// (all of them on a full refresh), each recorded as loaded by this run; and whether the
    /// load reads only what came after the loads before it. `None` when a load of new files
    /// finds none: the step is then skipped.
    async fn files_to_load(
        &self,
        source: &Source,
        ctx: &SessionContext,
        state: &mut RunState,
        store_url: &url::Url,
        mut files: Vec<SourceFile>,
    ) -> Result<Option<(Vec<SourceFile>, bool)>> {
        let full = self.options.full_refresh;
        // Whether this load reads only what came after the loads before it.
        let mut only_added = false;
        if source.incremental == Some(Incremental::NewFiles) {
            let done = loaded_files(ctx, &source.pipeline, &source.name).await?;
            // Local files are remembered relative to the project, so a moved or copied project
            // does not load them again; earlier records hold absolute paths and still count.
            let local = store_url.scheme() == "file";
            let record = |f: &sources::SourceFile| match Path::new(&f.display)
                .strip_prefix(&self.project.root)
            {
                Ok(rel) if local => rel.to_string_lossy().replace('\\', "/"),
                _ => f.display.clone(),
            };
            let fresh: Vec<_> = files
                .iter()
                .filter(|f| !done.contains(&record(f)) && !done.contains(&f.display))
                .cloned()
                .collect();
            state.loaded_files.extend(fresh.iter().map(|f| {
                (
                    source.pipeline.clone(),
                    source.name.clone(),
                    record(f),
                    f.size,
                )
            }));
            if !full {
                only_added = !done.is_empty();
                files = fresh;
                if files.is_empty() {
                    self.skip(state, &source.table, "source", "no new files");
                    return Ok(None);
                }
            }
        }
        Ok(Some((files, only_added)))
    }
}

/// The files at the source's location that it reads; those it skips are logged and kept for
/// the run's report.
async fn list_source_files(
    source: &Source,
    location: &Location,
    store: &Arc<dyn ObjectStore>,
    state: &mut RunState,
) -> Result<Vec<SourceFile>> {
    let listing = sources::list_files(source, location, store).await?;
    if !listing.skipped.is_empty() {
        let named: Vec<String> = listing.skipped.iter().map(ToString::to_string).collect();
        tracing::info!(
            "source {}: skipped {} file(s): {}",
            source.name,
            named.len(),
            named.join(", ")
        );
        state.skipped_files.insert(source.table.clone(), named);
    }
    Ok(listing.files)
}

/// A cursor source's filter, above the watermark of the loads before it unless on a full
/// refresh, and whether there was one (the load then reads only what came after them).
fn file_cursor(
    source: &Source,
    state: &RunState,
    full: bool,
    table_schema: &SchemaRef,
) -> Result<Option<(CursorFilter, bool)>> {
    let cursor_key = (
        source.pipeline.clone(),
        source.name.clone(),
        "cursor".to_string(),
    );
    match &source.incremental {
        Some(Incremental::Cursor(c)) => {
            let idx = source
                .columns
                .iter()
                .position(|x| &x.name == c)
                .unwrap_or(0);
            let wm = if full {
                None
            } else {
                state.state_before.get(&cursor_key)
            };
            let after_watermark = wm.is_some();
            let filter = CursorFilter::new(idx, table_schema.field(idx).data_type(), wm)?;
            Ok(Some((filter, after_watermark)))
        }
        _ => Ok(None),
    }
}

/// What each file of the source gave, as a stream; with the task reading a text source, to
/// keep until the load ends.
fn read_files<'a>(
    source: &'a Source,
    format: &FileFormat,
    store: Arc<dyn ObjectStore>,
    files: Vec<SourceFile>,
    schema: SchemaRef,
    parallel: usize,
) -> (
    Option<tokio_util::task::AbortOnDropHandle<()>>,
    BoxStream<'a, Result<FileOutput>>,
) {
    match format {
        FileFormat::Csv(_) | FileFormat::Json => {
            // Read and parsed in a task of its own, so files keep being parsed while this
            // one hands batches to the encoders.
            let mut files = sources::read_text_files(source, store, files, schema, parallel);
            let (tx, rx) = tokio::sync::mpsc::channel(parallel.max(1));
            let reader = tokio::spawn(async move {
                while let Some(out) = files.next().await {
                    if tx.send(out).await.is_err() {
                        break;
                    }
                }
            });
            let stream = futures::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|out| (out, rx))
            })
            .boxed();
            (
                Some(tokio_util::task::AbortOnDropHandle::new(reader)),
                stream,
            )
        }
        FileFormat::Parquet | FileFormat::Delta => {
            (None, sources::read_columnar(source, store, files, schema))
        }
    }
}

/// What an encoder wrote: for each source file (0 unless the source is keyed) its files' `Add`
/// actions and rows.
type Written = Vec<(usize, (Vec<deltalake::kernel::Add>, u64))>;

/// The encoders of a load: where to send each (source file, batch), and their tasks.
type Encoders = (
    Vec<Sender<(usize, RecordBatch)>>,
    Vec<JoinHandle<Result<Written>>>,
);

/// Start `count` encoders, each writing the batches sent to it into new files of the table at
/// `url`, new files for each source file: their senders and tasks.
fn spawn_encoders(
    url: &url::Url,
    table_schema: &SchemaRef,
    count: usize,
    parallel: usize,
) -> Encoders {
    let mut senders = Vec::new();
    let mut encoders = Vec::new();
    for _ in 0..count {
        let (url, schema) = (url.clone(), table_schema.clone());
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(usize, RecordBatch)>(parallel.max(1) * 2);
        senders.push(tx);
        encoders.push(tokio::spawn(async move {
            let mut written = Vec::new();
            let mut current: Option<(usize, TableWriter)> = None;
            while let Some((file, batch)) = rx.recv().await {
                if current.as_ref().is_none_or(|(f, _)| *f != file) {
                    if let Some((f, writer)) = current.take() {
                        written.push((f, writer.finish().await?));
                    }
                    current = Some((file, TableWriter::new(&url, schema.clone())?));
                }
                if let Some((_, writer)) = current.as_mut() {
                    writer.write(&batch).await?;
                }
            }
            if let Some((f, writer)) = current {
                written.push((f, writer.finish().await?));
            }
            Ok::<_, Error>(written)
        }));
    }
    (senders, encoders)
}

/// What a source's files or tables held: rows read and rejected, bytes read.
#[derive(Clone, Copy)]
pub(super) struct ReadTotals {
    pub(super) rows_read: u64,
    pub(super) rejected: u64,
    pub(super) bytes_read: u64,
}

/// Hand the rows of each file read (those past the cursor, when there is one) to the encoders,
/// the files in turn, and its rejected rows to the run; the rows of a keyed source are held
/// instead while they are few, and returned.
async fn feed_encoders(
    source: &Source,
    state: &mut RunState,
    stream: &mut BoxStream<'_, Result<FileOutput>>,
    senders: &[Sender<(usize, RecordBatch)>],
    cursor: &mut Option<CursorFilter>,
    bar: &Step,
    keyed: bool,
) -> Result<(ReadTotals, Option<Vec<(usize, RecordBatch)>>)> {
    let (mut rows_read, mut rejected, mut bytes_read) = (0u64, 0u64, 0u64);
    // Files seen, and outputs (a large CSV file comes in pieces, each an output).
    let (mut file_no, mut outputs) = (0usize, 0usize);
    // A keyed source's rows are held while they are few: keys that several files repeat
    // are then resolved in memory and the kept rows written once, instead of every file
    // being written, read back and written again. Past the limit they go to the encoders.
    let mut held: Option<Vec<(usize, RecordBatch)>> = keyed.then(Vec::new);
    let mut held_rows = 0u64;
    'files: while let Some(out) = stream.next().await {
        let out = out?;
        if !out.continues || file_no == 0 {
            file_no += 1;
        }
        // A keyed source's file goes to one encoder whole; other outputs alternate.
        let (tx, file) = match keyed {
            true => (&senders[(file_no - 1) % senders.len()], file_no - 1),
            false => (&senders[outputs % senders.len()], 0),
        };
        outputs += 1;
        rows_read += out.rows_read;
        bytes_read += out.bytes_read;
        rejected += out.rejects.len() as u64;
        for b in out.batches {
            let b = match cursor.as_mut() {
                Some(c) => c.apply(&b)?,
                None => b,
            };
            if let Some(h) = held.as_mut() {
                held_rows += b.num_rows() as u64;
                h.push((file, b));
                if held_rows <= KEYS_IN_MEMORY_ROWS {
                    continue;
                }
                for (f, b) in held.take().unwrap_or_default() {
                    if senders[f % senders.len()].send((f, b)).await.is_err() {
                        break 'files;
                    }
                }
                continue;
            }
            if tx.send((file, b)).await.is_err() {
                // The encoder stopped on an error, returned as the encoders are joined.
                break 'files;
            }
        }
        bar.inc(out.rows_read, out.bytes_read);
        state
            .rejects
            .extend(out.rejects.into_iter().map(|r| (source.name.clone(), r)));
    }
    let totals = ReadTotals {
        rows_read,
        rejected,
        bytes_read,
    };
    Ok((totals, held))
}

/// What the encoders wrote: the files' `Add` actions, each file's source file (for a keyed
/// source) and the rows.
struct Encoded {
    adds: Vec<deltalake::kernel::Add>,
    source_files: Vec<usize>,
    rows: u64,
}

/// Wait for the encoders to write what they were sent.
async fn join_encoders(encoders: Vec<JoinHandle<Result<Written>>>, keyed: bool) -> Result<Encoded> {
    let (mut adds, mut source_files, mut rows) = (Vec::new(), Vec::new(), 0u64);
    for encoder in encoders {
        let written = encoder
            .await
            .map_err(|e| Error::Internal(format!("the Parquet encoder failed: {e}")))??;
        for (file, (a, r)) in written {
            if keyed {
                source_files.extend(std::iter::repeat_n(file, a.len()));
            }
            adds.extend(a);
            rows += r;
        }
    }
    Ok(Encoded {
        adds,
        source_files,
        rows,
    })
}

/// The source's new data: the encoders' files and those of the rows held in memory. Logs what
/// the source read.
async fn new_data(
    source: &Source,
    url: &url::Url,
    table_schema: SchemaRef,
    held: Option<Vec<(usize, RecordBatch)>>,
    encoded: Encoded,
    totals: ReadTotals,
) -> Result<NewData> {
    let Encoded {
        mut adds,
        mut source_files,
        mut rows,
    } = encoded;
    let ReadTotals {
        rows_read,
        rejected,
        bytes_read,
    } = totals;
    let mut keys_unique = false;
    if let Some(held) = held {
        let written = write_held(url, &table_schema, held, source.write.keys()).await?;
        adds.extend(written.adds);
        source_files.extend(written.source_files);
        rows += written.rows;
        keys_unique = written.keys_unique;
    }
    info!(
        rows_read,
        rejected,
        bytes_read,
        rows_kept = rows,
        "source read"
    );
    Ok(NewData {
        table: source.table.clone(),
        schema: table_schema,
        adds,
        source_files,
        rows,
        cluster_by: Vec::new(),
        files_by: None,
        keys_unique,
        all_changes: false,
    })
}

/// What [`write_held`] wrote.
struct Held {
    adds: Vec<deltalake::kernel::Add>,
    source_files: Vec<usize>,
    rows: u64,
    keys_unique: bool,
}

/// Write the rows a keyed source held in memory (each batch with the position of its source
/// file): the last file's row of each key, in files marked as repeating no key; or, when a file
/// repeats a key within itself, each file's rows into files of their own, for the merge to
/// name the repeated keys.
async fn write_held(
    url: &url::Url,
    schema: &arrow::datatypes::SchemaRef,
    held: Vec<(usize, RecordBatch)>,
    keys: &[String],
) -> Result<Held> {
    let mut out = Held {
        adds: Vec::new(),
        source_files: Vec::new(),
        rows: 0,
        keys_unique: true,
    };
    let kept = match latest_rows(&held, keys)? {
        Some(None) => None,
        Some(Some(kept)) => Some(kept),
        None => {
            out.keys_unique = false;
            let mut files: Vec<usize> = held.iter().map(|(f, _)| *f).collect();
            files.dedup();
            for file in files {
                let batches: Vec<&RecordBatch> = held
                    .iter()
                    .filter(|(f, _)| *f == file)
                    .map(|(_, b)| b)
                    .collect();
                let (adds, rows) = write_batches(url, schema, batches).await?;
                out.source_files
                    .extend(std::iter::repeat_n(file, adds.len()));
                out.adds.extend(adds);
                out.rows += rows;
            }
            return Ok(out);
        }
    };
    let batches: Vec<&RecordBatch> = match &kept {
        Some(kept) => kept.iter().collect(),
        None => held.iter().map(|(_, b)| b).collect(),
    };
    (out.adds, out.rows) = write_batches(url, schema, batches).await?;
    Ok(out)
}

/// Write `batches` into new files of the table at `url`: their `Add` actions and rows.
async fn write_batches(
    url: &url::Url,
    schema: &arrow::datatypes::SchemaRef,
    batches: Vec<&RecordBatch>,
) -> Result<(Vec<deltalake::kernel::Add>, u64)> {
    let mut writer = TableWriter::new(url, schema.clone())?;
    for b in batches {
        writer.write(b).await?;
    }
    writer.finish().await
}
