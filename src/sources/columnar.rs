//! Parquet files and Delta tables, cast to the declared columns.

use std::sync::Arc;

use arrow::array::{Array, BooleanArray};
use arrow::compute::{CastOptions, cast_with_options, filter_record_batch};
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use arrow::util::display::FormatOptions;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::ObjectStore;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::{FileOutput, Reject, SourceFile};
use crate::error::{Error, Result};
use crate::plan::{FileFormat, Input, Location, Source};

/// Read a Parquet or Delta source: one output per Parquet file, or one for the Delta table.
pub fn read_columnar<'a>(
    source: &'a Source,
    store: Arc<dyn ObjectStore>,
    files: Vec<SourceFile>,
    schema: SchemaRef,
) -> BoxStream<'a, Result<FileOutput>> {
    match &source.input {
        Input::Files {
            format: FileFormat::Delta,
            location,
        } => futures::stream::once(read_delta(source, location, schema)).boxed(),
        _ => futures::stream::iter(files)
            .then(move |f| read_parquet(source, store.clone(), f, schema.clone()))
            .boxed(),
    }
}

async fn read_parquet(
    source: &Source,
    store: Arc<dyn ObjectStore>,
    file: SourceFile,
    schema: SchemaRef,
) -> Result<FileOutput> {
    let bad_file = |e: &dyn std::fmt::Display| Error::Source {
        pipeline: source.pipeline.clone(),
        source_name: source.name.clone(),
        message: format!("{}: not a readable Parquet file: {e}", file.display),
    };
    let bytes = super::fetch(source, &store, &file).await?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
        .and_then(|b| b.build())
        .map_err(|e| bad_file(&e))?;
    let mut out = FileOutput {
        file: file.display.clone(),
        bytes_read: file.size,
        ..Default::default()
    };
    for batch in reader {
        let batch = batch.map_err(|e| bad_file(&e))?;
        conform(source, &file.display, &batch, &schema, &mut out)?;
    }
    Ok(out)
}

async fn read_delta(source: &Source, location: &Location, schema: SchemaRef) -> Result<FileOutput> {
    let display = location.written.clone();
    let url = location
        .store_url
        .join(&location.prefix)
        .map_err(|e| Error::Source {
            pipeline: source.pipeline.clone(),
            source_name: source.name.clone(),
            message: format!("'{display}' is not a location a Delta table can be read from: {e}"),
        })?;
    let table = deltalake::open_table(url)
        .await
        .map_err(|e| Error::Source {
            pipeline: source.pipeline.clone(),
            source_name: source.name.clone(),
            message: format!("'{display}' is not a readable Delta table: {e}"),
        })?;
    let ctx = datafusion::prelude::SessionContext::new();
    table.update_datafusion_session(&ctx.state())?;
    let provider = table.table_provider().await?;
    let mut stream = ctx.read_table(provider)?.execute_stream().await?;
    let mut out = FileOutput {
        file: display.clone(),
        ..Default::default()
    };
    while let Some(batch) = stream.next().await {
        conform(source, &display, &batch?, &schema, &mut out)?;
    }
    Ok(out)
}

/// Select and cast the declared columns of `batch`; rows missing a required value are rejected.
fn conform(
    source: &Source,
    file: &str,
    batch: &RecordBatch,
    schema: &SchemaRef,
    out: &mut FileOutput,
) -> Result<()> {
    let first_row = out.rows_read;
    out.rows_read += batch.num_rows() as u64;
    let err = |message: String| Error::Source {
        pipeline: source.pipeline.clone(),
        source_name: source.name.clone(),
        message: format!("{file}: {message}"),
    };
    let opts = CastOptions {
        safe: false,
        format_options: FormatOptions::default(),
    };
    let mut columns = Vec::with_capacity(source.columns.len());
    for (col, field) in source.columns.iter().zip(schema.fields()) {
        let Some(array) = batch.column_by_name(&col.source_name) else {
            let have: Vec<String> = batch
                .schema()
                .fields()
                .iter()
                .map(|f| format!("'{}'", f.name()))
                .collect();
            return Err(err(format!(
                "column '{}' is not in the file; it has {}. Fix `schema:` in the pipeline",
                col.source_name,
                have.join(", ")
            )));
        };
        let cast = cast_with_options(array, field.data_type(), &opts).map_err(|e| {
            err(format!(
                "column '{}' is {} in the file and does not convert to the declared {}: {e}",
                col.source_name,
                array.data_type(),
                col.ty
            ))
        })?;
        columns.push(cast);
    }
    let mut keep = vec![true; batch.num_rows()];
    for (col, array) in source.columns.iter().zip(&columns) {
        if col.required && array.null_count() > 0 {
            for (row, k) in keep.iter_mut().enumerate() {
                if *k && array.is_null(row) {
                    *k = false;
                    out.rejects.push(Reject {
                        file: file.to_string(),
                        line: first_row + row as u64 + 1,
                        column: Some(col.name.clone()),
                        raw: String::new(),
                        reason: format!("missing required value for column '{}'", col.name),
                    });
                }
            }
        }
    }
    let conformed = RecordBatch::try_new(all_nullable(schema), columns)?;
    let conformed = if keep.iter().all(|k| *k) {
        conformed
    } else {
        filter_record_batch(&conformed, &BooleanArray::from(keep))?
    };
    // Required columns are declared non-null; after filtering they hold no nulls.
    let conformed = RecordBatch::try_new(schema.clone(), conformed.columns().to_vec())?;
    if conformed.num_rows() > 0 {
        out.batches.push(conformed);
    }
    Ok(())
}

/// The schema with every field nullable, to hold rows before required-null rows are dropped.
fn all_nullable(schema: &SchemaRef) -> SchemaRef {
    Arc::new(arrow::datatypes::Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone().with_nullable(true))
            .collect::<Vec<_>>(),
    ))
}
