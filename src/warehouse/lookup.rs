//! Merging a batch small enough to hold in memory by the positions of its keys.
//!
//! Each data file of the target is read once for its key columns, and every row holding a key
//! of the new rows is found by its position. Those rows alone are then read in full, by row
//! selection, and compared with the new rows in memory: a new row equal to the stored row of
//! its key changes nothing. The positions of the replaced rows are what the deletion vectors
//! mark, so no file is scanned a second time to find them; a file that is rewritten instead
//! is read once more through the warehouse's file scan, less those rows.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, UInt64Array};
use arrow::datatypes::SchemaRef;
use arrow::row::{RowConverter, SortField};
use datafusion::execution::memory_pool::MemoryConsumer;
use datafusion::prelude::SessionContext;
use deltalake::kernel::Remove;
use futures::TryStreamExt;
use object_store::ObjectStore;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{RowSelection, RowSelector};
use tokio::task::JoinSet;
use url::Url;

use super::Warehouse;
use super::deletion::{DataFile, Deleted, KeySet, open_parquet, store_path};
use super::write::{
    MAX_MARKED_SHARE, MIN_MARKED_FILE_ROWS, Merged, NewData, delete_files, new_rows_at, step_done,
    tag_unchanged_since, write_ordered,
};
use crate::error::{Error, Result};

/// New rows up to this many are merged by position; more go through SQL joins, which spill.
pub(crate) const MERGE_BY_POSITION_ROWS: u64 = 500_000;

/// Whether rows of `schema` can be compared in memory (Arrow's row format takes nearly every
/// type; maps, for one, it does not).
pub(crate) fn comparable(schema: &SchemaRef) -> bool {
    let fields: Vec<SortField> = schema
        .fields()
        .iter()
        .map(|f| SortField::new(f.data_type().clone()))
        .collect();
    RowConverter::supports_fields(&fields)
}

/// The rows of one data file that hold a key of the set.
struct Found {
    /// Index of the file in the target's files.
    file: usize,
    /// Rows the file holds, those its deletion vector removed included.
    file_rows: u64,
    /// The rows' positions (ascending, none of them removed already) and key indexes.
    matches: Vec<(u64, usize)>,
    /// The rows themselves, in the order of `matches`, with the table's columns.
    rows: RecordBatch,
}

/// What [`merge_by_position`] did.
pub(crate) enum ByPosition {
    /// The merge, written.
    Merged(Merged),
    /// No row of the table holds a key of the new rows (or of the removed keys): the new rows
    /// are added as they are.
    NoneKnown,
    /// The new rows, held with their stored counterparts, would not fit in the session's
    /// memory pool: the merge goes through SQL joins, which spill.
    TooBig,
}

/// Merge `new` (keys unique) into the table at `url`, whose current files are `old`, removing
/// the rows of the keys in `gone` too. New rows equal to their key's stored row are left out;
/// the files holding replaced rows get their rows marked deleted when `marks` allows (see
/// [`MAX_MARKED_SHARE`]), or are rewritten without them. The rows held are reserved in the
/// session's memory pool first.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn merge_by_position(
    wh: &Warehouse,
    ctx: &SessionContext,
    url: &Url,
    new: &NewData,
    keys: &[String],
    gone: Option<&RecordBatch>,
    old: &[(DataFile, Remove)],
    marks: bool,
    read_version: Option<u64>,
) -> Result<ByPosition> {
    let started = std::time::Instant::now();
    let schema = new.schema.clone();
    let batches = ctx
        .read_table(new_rows_at(url, new).await?)?
        .collect()
        .await?;
    let fresh = arrow::compute::concat_batches(&schema, &batches)?;
    drop(batches);
    // The new rows, their row-format copy and key set, and as many stored rows.
    let reservation = MemoryConsumer::new(format!("merge into {} by position", new.table))
        .register(&ctx.runtime_env().memory_pool);
    if reservation
        .try_grow(4 * fresh.get_array_memory_size())
        .is_err()
    {
        return Ok(ByPosition::TooBig);
    }
    let key_columns = |b: &RecordBatch| -> Result<Vec<ArrayRef>> {
        keys.iter()
            .map(|k| {
                b.column_by_name(k)
                    .cloned()
                    .ok_or_else(|| Error::Internal(format!("merge key '{k}' is not a column")))
            })
            .collect()
    };
    let fresh_keys = key_columns(&fresh)?;
    let types = fresh_keys.iter().map(|c| c.data_type().clone()).collect();
    let mut set = KeySet::empty(keys, types)?;
    let fresh_index = set.insert(&fresh_keys)?;
    if fresh_index.iter().enumerate().any(|(i, k)| *k != i) {
        return Err(Error::Internal(format!(
            "the rows merged into '{}' repeat a key",
            new.table
        )));
    }
    // Keys whose stored rows go whatever the new rows hold.
    let mut removed_keys: HashSet<usize> = HashSet::new();
    if let Some(g) = gone {
        removed_keys.extend(set.insert(&key_columns(g)?)?);
    }
    let set = Arc::new(set);
    let found = find_rows(wh.store(), old, &set, &schema).await?;
    step_done(&new.table, "merge: keys looked up", started);
    if found.is_empty() {
        return Ok(ByPosition::NoneKnown);
    }

    let started = std::time::Instant::now();
    let converter = RowConverter::new(
        schema
            .fields()
            .iter()
            .map(|f| SortField::new(f.data_type().clone()))
            .collect(),
    )?;
    let fresh_rows = converter.convert_columns(fresh.columns())?;
    let fresh_count = fresh.num_rows();
    let mut unchanged = vec![false; fresh_count];
    for f in &found {
        let stored = converter.convert_columns(f.rows.columns())?;
        for (j, (_, k)) in f.matches.iter().enumerate() {
            if *k < fresh_count && stored.row(j) == fresh_rows.row(*k) {
                unchanged[*k] = true;
            }
        }
    }
    let changed: Vec<u64> = (0..fresh_count as u64)
        .filter(|i| !unchanged[*i as usize])
        .collect();
    let changed_rows = changed.len() as u64;
    for (k, same) in unchanged.iter().enumerate() {
        if !same {
            removed_keys.insert(k);
        }
    }
    step_done(&new.table, "merge: changed rows found", started);

    let started = std::time::Instant::now();
    // Per touched file: all the rows it no longer holds afterwards.
    let mut marked: HashMap<String, Arc<Deleted>> = HashMap::new();
    let mut rewrite: Vec<DataFile> = Vec::new();
    for f in &found {
        let positions: Vec<u64> = f
            .matches
            .iter()
            .filter(|(_, k)| removed_keys.contains(k))
            .map(|(p, _)| *p)
            .collect();
        if positions.is_empty() {
            continue;
        }
        let file = &old[f.file].0;
        let deleted = match &file.deleted {
            Some(d) => d.with(&positions)?,
            None => Deleted::new(positions, f.file_rows)?,
        };
        let mark = marks
            && deleted.file_rows() >= MIN_MARKED_FILE_ROWS
            && deleted.count() as f64 <= MAX_MARKED_SHARE * deleted.file_rows() as f64;
        if mark {
            marked.insert(file.url.to_string(), Arc::new(deleted));
        } else {
            rewrite.push(DataFile {
                url: file.url.clone(),
                deleted: Some(Arc::new(deleted)),
            });
        }
    }
    if changed_rows == 0 && marked.is_empty() && rewrite.is_empty() {
        return Ok(ByPosition::Merged(Merged {
            rewritten: HashSet::new(),
            adds: Vec::new(),
            reused_new_files: false,
            marked: HashMap::new(),
            changed_rows: 0,
        }));
    }
    // Every new row is a change: its files go in as they were written.
    let reused_new_files = changed_rows == new.rows;
    let mut adds = if reused_new_files {
        new.adds.clone()
    } else {
        let indices = UInt64Array::from(changed);
        let rows = arrow::compute::take_record_batch(&fresh, &indices)?;
        let (adds, _) = write_ordered(
            url,
            schema.clone(),
            ctx.read_batch(rows)?,
            &new.cluster_by,
            new.files_by.as_deref(),
        )
        .await?;
        adds
    };
    let written = async {
        let mut more = Vec::new();
        if !rewrite.is_empty() {
            let kept = super::table_files_provider(&rewrite, schema.clone()).await?;
            let (kept, _) = write_ordered(
                url,
                schema.clone(),
                ctx.read_table(kept)?,
                &new.cluster_by,
                new.files_by.as_deref(),
            )
            .await?;
            more.extend(
                kept.into_iter()
                    .map(|add| tag_unchanged_since(add, read_version)),
            );
        }
        let marked = if marked.is_empty() {
            HashMap::new()
        } else {
            let (urls, vectors): (Vec<String>, Vec<Arc<Deleted>>) = marked.into_iter().unzip();
            let refs: Vec<&Deleted> = vectors.iter().map(Arc::as_ref).collect();
            let descriptors =
                super::deletion::write_deletion_vectors(wh.store(), url, &refs).await?;
            urls.into_iter()
                .zip(vectors.into_iter().zip(descriptors))
                .collect()
        };
        Ok::<_, Error>((more, marked))
    }
    .await;
    let (more, marked) = match written {
        Ok(w) => w,
        Err(e) => {
            if !reused_new_files {
                delete_files(wh, url, &adds).await?;
            }
            return Err(e);
        }
    };
    adds.extend(more);
    step_done(&new.table, "merge: files rewritten", started);
    Ok(ByPosition::Merged(Merged {
        rewritten: rewrite.iter().map(|f| f.url.to_string()).collect(),
        adds,
        reused_new_files,
        marked,
        changed_rows,
    }))
}

/// The rows of each of `files` holding a key of `set`, read in full with `schema`'s columns;
/// files holding none are left out. Files are read side by side, one task each, as many at a
/// time as there are cores.
async fn find_rows(
    store: &Arc<dyn ObjectStore>,
    files: &[(DataFile, Remove)],
    set: &Arc<KeySet>,
    schema: &SchemaRef,
) -> Result<Vec<Found>> {
    let width = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut running: JoinSet<Result<Option<Found>>> = JoinSet::new();
    let mut found = Vec::new();
    let mut next = 0;
    loop {
        while next < files.len() && running.len() < width {
            let (file, remove) = &files[next];
            let size = remove.size.and_then(|s| u64::try_from(s).ok());
            let path = store_path(&file.url)?;
            let (store, set, schema) = (store.clone(), set.clone(), schema.clone());
            let (deleted, index) = (file.deleted.clone(), next);
            running.spawn(async move {
                let (mut matches, file_rows) =
                    set.matches_in(store.clone(), path.clone(), size).await?;
                if let Some(d) = &deleted {
                    matches.retain(|(p, _)| !d.contains(*p));
                }
                if matches.is_empty() {
                    return Ok(None);
                }
                let positions: Vec<u64> = matches.iter().map(|(p, _)| *p).collect();
                let rows = rows_at(store, path, size, &positions, &schema).await?;
                Ok(Some(Found {
                    file: index,
                    file_rows,
                    matches,
                    rows,
                }))
            });
            next += 1;
        }
        let Some(done) = running.join_next().await else {
            break;
        };
        let done =
            done.map_err(|e| Error::Internal(format!("a merge's key lookup failed: {e}")))?;
        if let Some(f) = done? {
            found.push(f);
        }
    }
    found.sort_by_key(|f| f.file);
    Ok(found)
}

/// The rows at `positions` (ascending) of the Parquet file at `path`, with `schema`'s columns
/// (found by name, cast to its types).
async fn rows_at(
    store: Arc<dyn ObjectStore>,
    path: object_store::path::Path,
    size: Option<u64>,
    positions: &[u64],
    schema: &SchemaRef,
) -> Result<RecordBatch> {
    let builder = open_parquet(store, path.clone(), size).await?;
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    let mask = ProjectionMask::columns(builder.parquet_schema(), names.iter().copied());
    let mut selectors = Vec::with_capacity(positions.len() * 2);
    let mut at = 0u64;
    for &p in positions {
        if p > at {
            selectors.push(RowSelector::skip((p - at) as usize));
        }
        selectors.push(RowSelector::select(1));
        at = p + 1;
    }
    let stream = builder
        .with_projection(mask)
        .with_row_selection(RowSelection::from(selectors))
        .build()?;
    let batches: Vec<RecordBatch> = stream.try_collect().await?;
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    for field in schema.fields() {
        let parts = batches
            .iter()
            .map(|b| {
                b.column_by_name(field.name()).cloned().ok_or_else(|| {
                    Error::Warehouse(format!(
                        "data file {path} has no column '{}' of its table; rebuild the table \
                         with `kbcrm run --full-refresh`",
                        field.name()
                    ))
                })
            })
            .collect::<Result<Vec<ArrayRef>>>()?;
        let refs: Vec<&dyn arrow::array::Array> = parts.iter().map(|a| a.as_ref()).collect();
        let column = if refs.is_empty() {
            arrow::array::new_empty_array(field.data_type())
        } else {
            arrow::compute::concat(&refs)?
        };
        columns.push(arrow::compute::cast(&column, field.data_type())?);
    }
    let rows = RecordBatch::try_new(schema.clone(), columns)?;
    if rows.num_rows() != positions.len() {
        return Err(Error::Warehouse(format!(
            "data file {path}: {} of {} rows read at their positions",
            rows.num_rows(),
            positions.len()
        )));
    }
    Ok(rows)
}
