//! Reading sources into Arrow batches of their declared schema.
//!
//! Text formats (CSV, NDJSON) are parsed row by row: a row that does not fit the declared schema
//! becomes a [`Reject`] with its file, line and reason, and never stops a good row. Columnar
//! formats (Parquet, Delta) are cast to the declared types.

mod columnar;
pub mod convert;
mod csv;
pub mod database;
mod json;
pub mod mysql;
pub mod postgres;
pub mod stores;

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use futures::stream::{self, BoxStream, StreamExt, TryStreamExt};
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt};

use crate::config::pipeline::SourceFormat;
use crate::error::{Error, Result};
use crate::plan::Source;

/// Rows per batch produced by the text readers.
pub const BATCH_ROWS: usize = 32 * 1024;

/// A row that did not fit the declared schema.
#[derive(Debug, Clone, PartialEq)]
pub struct Reject {
    /// The file it came from.
    pub file: String,
    /// 1-based line (CSV, NDJSON) or row number (Parquet, Delta).
    pub line: u64,
    /// The column at fault, when one is.
    pub column: Option<String>,
    /// The row as it was in the file (cut at 4 KiB).
    pub raw: String,
    /// Why it was rejected.
    pub reason: String,
}

/// One file of a source.
#[derive(Debug, Clone)]
pub struct SourceFile {
    /// Path in the store.
    pub path: StorePath,
    /// How to name the file to a person.
    pub display: String,
    /// Size in bytes.
    pub size: u64,
    /// When the file was last changed.
    pub modified: chrono::DateTime<chrono::Utc>,
}

/// What reading one file gave.
#[derive(Debug, Default)]
pub struct FileOutput {
    /// The file.
    pub file: String,
    /// Accepted rows.
    pub batches: Vec<RecordBatch>,
    /// Rejected rows.
    pub rejects: Vec<Reject>,
    /// Rows read (accepted + rejected).
    pub rows_read: u64,
    /// Bytes read.
    pub bytes_read: u64,
}

/// The files of a source, sorted by path. No file at all is an error: a source that is
/// legitimately empty still has its folder.
pub async fn list_files(source: &Source, store: &Arc<dyn ObjectStore>) -> Result<Vec<SourceFile>> {
    let loc = source.file_location()?;
    let prefix = StorePath::from(loc.prefix.trim_end_matches('/'));
    let err = |message: String| Error::Source {
        pipeline: source.pipeline.clone(),
        source_name: source.name.clone(),
        message,
    };
    // A single file?
    if loc.glob.is_none() && !loc.prefix.ends_with('/') {
        match store.head(&prefix).await {
            Ok(meta) => {
                return Ok(vec![SourceFile {
                    display: display_name(source, &meta.location),
                    path: meta.location,
                    size: meta.size,
                    modified: meta.last_modified,
                }]);
            }
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(err(format!("cannot read '{}': {e}", loc.written))),
        }
    }
    let prefix_str = prefix.as_ref().to_string();
    let mut files: Vec<SourceFile> = store
        .list(Some(&prefix))
        .map_err(|e| err(format!("cannot list '{}': {e}", loc.written)))
        .try_filter_map(|meta| {
            let rel = meta
                .location
                .as_ref()
                .strip_prefix(&prefix_str)
                .unwrap_or(meta.location.as_ref())
                .trim_start_matches('/')
                .to_string();
            let keep = loc.matches(&rel) && !rel.split('/').any(|s| s.starts_with(['.', '_']));
            let out = keep.then(|| SourceFile {
                display: display_name(source, &meta.location),
                path: meta.location,
                size: meta.size,
                modified: meta.last_modified,
            });
            async move { Ok(out) }
        })
        .try_collect()
        .await?;
    files.sort_by(|a, b| a.path.as_ref().cmp(b.path.as_ref()));
    if files.is_empty() {
        return Err(err(format!(
            "no files found at '{}'; check `location:` (relative to kbcrm.yaml) or generate the \
             sample data with `kbcrm generate`",
            loc.written
        )));
    }
    Ok(files)
}

fn display_name(source: &Source, path: &StorePath) -> String {
    match &source.location {
        Some(l) if l.store_url.scheme() != "file" => format!("{}{path}", l.store_url),
        _ => format!("/{path}"),
    }
}

/// Read every file of a text source, `parallel` files at a time, in file order.
pub fn read_text_files(
    source: &Source,
    store: Arc<dyn ObjectStore>,
    files: Vec<SourceFile>,
    schema: SchemaRef,
    parallel: usize,
) -> BoxStream<'static, Result<FileOutput>> {
    let source = source.clone();
    stream::iter(files)
        .map(move |file| {
            let store = store.clone();
            let schema = schema.clone();
            let source = source.clone();
            async move {
                let bytes = store.get(&file.path).await?.bytes().await?;
                let out = tokio::task::spawn_blocking(move || {
                    parse_file(&source, &file.display, &bytes, schema)
                })
                .await
                .map_err(|e| Error::Internal(format!("reader task failed: {e}")))??;
                Ok(out)
            }
        })
        .buffered(parallel.max(1))
        .boxed()
}

pub use columnar::read_columnar;

/// One CSV or NDJSON file of `source` into rows of `schema` (see [`table_schema`]) and rejected
/// lines with their reasons: what a load does with each file (and what the fuzz targets feed).
pub fn parse_file(
    source: &Source,
    file: &str,
    bytes: &[u8],
    schema: SchemaRef,
) -> Result<FileOutput> {
    match source.format {
        SourceFormat::Csv => csv::parse(source, file, bytes, schema),
        SourceFormat::Json => json::parse(source, file, bytes, schema),
        other => Err(Error::Internal(format!("{other:?} is not a text format"))),
    }
}

/// The schema of the table a source loads into: its declared columns (Delta-compatible types),
/// and `_deleted_at` when it tracks deletes at a database.
pub fn table_schema(source: &Source) -> SchemaRef {
    let declared = convert::declared_schema(&source.columns);
    let mut fields: Vec<arrow::datatypes::Field> = declared
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    if source
        .database
        .as_ref()
        .is_some_and(|d| d.deletes.is_some())
    {
        fields.push(arrow::datatypes::Field::new(
            crate::plan::DELETED_AT,
            arrow::datatypes::DataType::Timestamp(
                arrow::datatypes::TimeUnit::Microsecond,
                Some(Arc::from(crate::config::types::UTC)),
            ),
            true,
        ));
    }
    crate::warehouse::delta_compatible(&arrow::datatypes::Schema::new(fields))
}

/// An error of a source, for its pipeline.
pub(crate) fn source_error(source: &Source, message: String) -> Error {
    Error::Source {
        pipeline: source.pipeline.clone(),
        source_name: source.name.clone(),
        message,
    }
}

/// Cut a raw row for the quarantine table: at most 4 KiB of text (invalid UTF-8 bytes become
/// U+FFFD, three bytes each, so the text is cut again after the conversion).
pub(crate) fn raw_text(bytes: &[u8]) -> String {
    const MAX: usize = 4096;
    let cut = &bytes[..bytes.len().min(MAX)];
    let mut s = String::from_utf8_lossy(cut).into_owned();
    s.truncate(s.floor_char_boundary(MAX));
    s.trim_end_matches(['\r', '\n']).to_string()
}

#[cfg(test)]
mod tests {
    /// Found by the `csv_quarantine` fuzz target: invalid bytes grew the text past 4 KiB.
    #[test]
    fn raw_text_of_invalid_utf8_stays_within_4_kib() {
        let bytes = vec![0xff_u8; 5000];
        let text = super::raw_text(&bytes);
        assert!(
            text.len() <= 4096 && text.starts_with('\u{fffd}'),
            "{}",
            text.len()
        );
        assert_eq!(super::raw_text(b"a,b\r\n"), "a,b");
    }
}
