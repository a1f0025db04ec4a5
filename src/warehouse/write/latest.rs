//! Keys that come again within new data: found, reported, or resolved to the latest row per key.

use super::*;

/// Up to three keys the files of `new` repeat (with their counts); `by_file` counts repeats
/// within one source file only (`new.source_files` tells the files apart).
pub(super) async fn repeated_keys(
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
pub(super) async fn ranked_view(
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

pub(super) fn repeats_error(
    new: &NewData,
    keys: &[String],
    batches: &[RecordBatch],
    what: &str,
) -> Error {
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
pub(super) async fn latest_in_memory(
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
pub(super) async fn keep_latest(
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
