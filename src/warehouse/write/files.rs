//! Writing batches into new Parquet data files of a table, ordered or split by value, without
//! committing them.

use super::*;

/// Streams batches into new Parquet data files of a table, without committing them.
pub struct TableWriter {
    pub(super) url: Url,
    pub(super) schema: SchemaRef,
    pub(super) rows: u64,
    /// The file being written, or with `split`, one per value of that column.
    pub(super) writers: Vec<(ScalarValue, RecordBatchWriter)>,
    /// The column of the incoming batches whose values divide the rows among files (not
    /// written).
    pub(super) split: Option<usize>,
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
    pub(super) fn split_by(&mut self, column: usize) {
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

    pub(super) async fn write_rows(
        &mut self,
        value: ScalarValue,
        batch: &RecordBatch,
    ) -> Result<()> {
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
/// looks up its keys among every row of the large tables), and LZ4 decompresses faster, for
/// slightly larger files (measured in BENCHMARKS.md). Files written before keep their codec;
/// readers handle both, as do DuckDB, Spark and pyarrow.
pub(super) fn data_file_properties() -> parquet::file::properties::WriterProperties {
    parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::LZ4_RAW)
        .build()
}

/// The most `files_by` values one write may have (each has files of its own, open at once).
pub(super) const MAX_FILES_BY_VALUES: usize = 256;

/// The column carrying each row's `files_by` value while it is written.
pub(super) const FILES_BY_COLUMN: &str = "__kbcrm_files_by";

/// Run `df` and write its rows in the table's order into new files of the table at `url`:
/// sorted by `cluster_by`, and with `files_by`, one run of files per value of that expression.
pub(super) async fn write_ordered(
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
pub(super) async fn write_like(
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
    let schema = super::super::delta_compatible(df.schema().as_arrow());
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
        let file = super::super::sorted_file(
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
