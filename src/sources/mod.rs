//! Reading sources into Arrow batches of their declared schema.
//!
//! Text formats (CSV, NDJSON) are parsed row by row: a row that does not fit the declared schema
//! becomes a [`Reject`] with its file, line and reason, and never stops a good row. Columnar
//! formats (Parquet, Delta) are cast to the declared types.
//!
//! A stage: owns reading files and databases and `kbcrm freshness` ([`freshness`]). May import
//! `warehouse` (its Delta-compatible types), `engine`, `plan`, `config` and the leaves.

mod chunks;
mod columnar;
pub mod convert;
mod csv;
pub mod sniff;
pub(crate) use csv::delimiter_hint;
pub mod database;
pub mod freshness;
mod json;
pub mod mysql;
pub mod postgres;

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use futures::stream::{self, BoxStream, StreamExt, TryStreamExt};
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt};

use crate::error::{Error, Result};
use crate::plan::{FileFormat, Input, Location, Source};

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

/// A file at a source's location that is not read, and why: names starting with `_` or `.`
/// (or in a folder named so) are the marker and temporary files of other tools (`_SUCCESS`,
/// `.crc`, `_temporary/`), and a local file whose name the file store cannot list.
#[derive(Debug, Clone, PartialEq)]
pub struct Skipped {
    /// The file's path below the location.
    pub name: String,
    /// Why it is skipped.
    pub why: &'static str,
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name, self.why)
    }
}

/// The files of a source's location: those read, and those skipped.
#[derive(Debug, Clone)]
pub struct Listing {
    /// The files read, sorted by path.
    pub files: Vec<SourceFile>,
    /// The files skipped, sorted by name.
    pub skipped: Vec<Skipped>,
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
    /// Whether these rows continue the file of the output before (a large CSV file is read in
    /// pieces, each an output of its own).
    pub continues: bool,
}

/// The files of a source, sorted by path, and those skipped ([`crate::storage::skip_reason`]). No file at all
/// is an error: a source that is legitimately empty still has its folder.
pub async fn list_files(
    source: &Source,
    loc: &Location,
    store: &Arc<dyn ObjectStore>,
) -> Result<Listing> {
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
                return Ok(Listing {
                    files: vec![SourceFile {
                        display: display_name(source, &meta.location),
                        path: meta.location,
                        size: meta.size,
                        modified: meta.last_modified,
                    }],
                    skipped: Vec::new(),
                });
            }
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(err(format!("cannot read '{}': {e}", loc.written))),
        }
    }
    let prefix_str = prefix.as_ref().to_string();
    let listed: Vec<(String, object_store::ObjectMeta)> = store
        .list(Some(&prefix))
        .map_err(|e| err(format!("cannot list '{}': {e}", loc.written)))
        .map_ok(|meta| {
            let rel = meta
                .location
                .as_ref()
                .strip_prefix(&prefix_str)
                .unwrap_or(meta.location.as_ref())
                .trim_start_matches('/')
                .to_string();
            (rel, meta)
        })
        .try_collect()
        .await?;
    let mut files = Vec::new();
    let mut skipped = Vec::new();
    for (rel, meta) in &listed {
        if !loc.matches(rel) {
            continue;
        }
        match crate::storage::skip_reason(rel) {
            Some(why) => skipped.push(Skipped {
                name: rel.clone(),
                why,
            }),
            None => files.push(SourceFile {
                display: display_name(source, &meta.location),
                path: meta.location.clone(),
                size: meta.size,
                modified: meta.last_modified,
            }),
        }
    }
    // A local folder may hold files the file store does not list (names it cannot address).
    if loc.store_url.scheme() == "file"
        && let Ok(base) = loc.store_url.to_file_path()
    {
        let seen: std::collections::HashSet<&str> =
            listed.iter().map(|(rel, _)| rel.as_str()).collect();
        for rel in local_files(&base.join(prefix.as_ref())) {
            if loc.matches(&rel) && !seen.contains(rel.as_str()) {
                skipped.push(Skipped {
                    why: crate::storage::skip_reason(&rel)
                        .unwrap_or("the file store cannot list a file of this name"),
                    name: rel,
                });
            }
        }
    }
    files.sort_by(|a, b| a.path.as_ref().cmp(b.path.as_ref()));
    skipped.sort_by(|a, b| a.name.cmp(&b.name));
    if files.is_empty() {
        let also = if skipped.is_empty() {
            String::new()
        } else {
            format!(
                " (skipped: {})",
                skipped
                    .iter()
                    .take(5)
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        return Err(err(format!(
            "no files found at '{}'{also}; check `location:` (relative to kbcrm.yaml) or \
             generate the sample data with `kbcrm generate`",
            loc.written
        )));
    }
    Ok(Listing { files, skipped })
}

/// The files below a local folder, as paths relative to it with `/` between folders.
fn local_files(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), String::new())];
    while let Some((path, rel)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&path) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let child = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push((e.path(), child)),
                Ok(t) if t.is_file() => out.push(child),
                _ => {}
            }
        }
    }
    out
}

fn display_name(source: &Source, path: &StorePath) -> String {
    match source.location() {
        Some(l) if l.store_url.scheme() != "file" => format!("{}{path}", l.store_url),
        _ => format!("/{path}"),
    }
}

/// The bytes of one file of `source`; an error names the source, its pipeline and the file, and
/// says what fits its store (a local file deleted meanwhile, or a bucket's access).
pub(crate) async fn fetch(
    source: &Source,
    store: &Arc<dyn ObjectStore>,
    file: &SourceFile,
) -> Result<bytes::Bytes> {
    let got = match store.get(&file.path).await {
        Ok(got) => got.bytes().await,
        Err(e) => Err(e),
    };
    got.map_err(|e| read_error(source, file, &e))
}

/// Why a listed file could not be read, and what to do.
pub(super) fn read_error(source: &Source, file: &SourceFile, e: &object_store::Error) -> Error {
    let local = source
        .location()
        .is_some_and(|l| l.store_url.scheme() == "file");
    let message = match (e, local) {
        (object_store::Error::NotFound { .. }, true) => format!(
            "{} was listed and then gone before it was read (deleted or moved while the \
             run read the source); nothing was committed, run again",
            file.display
        ),
        (object_store::Error::NotFound { .. }, false) => format!(
            "{} was listed and then gone before it was read; nothing was committed, run \
             again",
            file.display
        ),
        (_, true) => format!("cannot read {}: {e}", file.display),
        (_, false) => format!(
            "cannot read {}: {e}; check the bucket's access (the credentials in the \
             environment, kbcrm.yaml's `storage:`)",
            file.display
        ),
    };
    Error::Source {
        pipeline: source.pipeline.clone(),
        source_name: source.name.clone(),
        message,
    }
}

/// Parsing one file, or one piece of a large CSV file.
pub(super) type ReadJob = futures::future::BoxFuture<'static, Result<FileOutput>>;

/// Read every file of a text source in file order, `parallel` files (or pieces of a large CSV
/// file) at a time. A CSV file is read [`chunks::PIECE_BYTES`] at a time and its pieces parsed
/// as they arrive, so a load holds a few pieces of a file, never the whole file.
pub fn read_text_files(
    source: &Source,
    store: Arc<dyn ObjectStore>,
    files: Vec<SourceFile>,
    schema: SchemaRef,
    parallel: usize,
) -> BoxStream<'static, Result<FileOutput>> {
    let source = Arc::new(source.clone());
    // A CSV source's options, when its files can be read in pieces.
    let csv = match &source.input {
        Input::Files {
            format: FileFormat::Csv(opts),
            ..
        } if chunks::RecordEnds::new(opts).is_some() => Some(Arc::new(opts.clone())),
        _ => None,
    };
    stream::iter(files)
        .flat_map(move |file| {
            let (source, store, schema) = (source.clone(), store.clone(), schema.clone());
            let ends = csv
                .as_ref()
                .and_then(|o| Some((o.clone(), chunks::RecordEnds::new(o)?)));
            match ends {
                Some((opts, ends)) => {
                    let size = chunks::PIECE_BYTES;
                    chunks::pieces(source, opts, store, file, schema, ends, size)
                }
                None => {
                    let job: ReadJob = Box::pin(async move {
                        let bytes = fetch(&source, &store, &file).await?;
                        blocking(move || parse_file(&source, &file.display, &bytes, schema)).await
                    });
                    stream::iter([job]).boxed()
                }
            }
        })
        .buffered(parallel.max(1))
        .boxed()
}

/// Run a parse on a thread that may block.
pub(super) async fn blocking(
    parse: impl FnOnce() -> Result<FileOutput> + Send + 'static,
) -> Result<FileOutput> {
    tokio::task::spawn_blocking(parse)
        .await
        .map_err(|e| Error::Internal(format!("reader task failed: {e}")))?
}

pub use chunks::PIECE_BYTES;
pub use columnar::read_columnar;

/// One CSV or NDJSON file of `source` into rows of `schema` (see [`table_schema`]) and rejected
/// lines with their reasons: what a load does with each file (and what the fuzz targets feed).
pub fn parse_file(
    source: &Source,
    file: &str,
    bytes: &[u8],
    schema: SchemaRef,
) -> Result<FileOutput> {
    match &source.input {
        Input::Files {
            format: FileFormat::Csv(opts),
            ..
        } => csv::parse(source, opts, file, bytes, schema),
        Input::Files {
            format: FileFormat::Json,
            ..
        } => json::parse(source, file, bytes, schema),
        _ => Err(Error::Internal(format!(
            "source '{}' is not a CSV or JSON source",
            source.name
        ))),
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
    if source.database().is_some_and(|d| d.deletes.is_some()) {
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
/// Bytes of a file's text a message quotes at most: a message names what was expected, and
/// never echoes a whole line of whatever file a location points at.
pub(crate) const SHOWN_BYTES: usize = 200;

/// Text from a file as a message shows it: control characters escaped, cut at
/// [`SHOWN_BYTES`] with `...`.
pub(crate) fn shown(text: &str) -> String {
    let cut = &text[..text.floor_char_boundary(SHOWN_BYTES)];
    let mut out = crate::error::escape_controls(cut);
    if cut.len() < text.len() {
        out.push_str("...");
    }
    out
}

pub(crate) fn raw_text(bytes: &[u8]) -> String {
    const MAX: usize = 4096;
    let cut = &bytes[..bytes.len().min(MAX)];
    let mut s = String::from_utf8_lossy(cut).into_owned();
    s.truncate(s.floor_char_boundary(MAX));
    s.trim_end_matches(['\r', '\n']).to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn skipped_names_say_why() {
        assert_eq!(crate::storage::skip_reason("a.csv"), None);
        assert_eq!(crate::storage::skip_reason("2024/a.csv"), None);
        assert_eq!(
            crate::storage::skip_reason("_SUCCESS"),
            Some("starts with _")
        );
        assert_eq!(
            crate::storage::skip_reason(".a.csv.crc"),
            Some("starts with .")
        );
        assert_eq!(
            crate::storage::skip_reason("_temporary/0/a.csv"),
            Some("in a folder starting with _")
        );
        assert_eq!(
            crate::storage::skip_reason(".git/x.csv"),
            Some("in a folder starting with .")
        );
    }

    /// A project with one CSV source `c` declared with `csv` and `schema`, reading `text`.
    pub(super) fn one_csv_source(
        csv: &str,
        schema: &str,
        text: &[u8],
    ) -> (tempfile::TempDir, crate::plan::Source) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("pipelines")).unwrap();
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        std::fs::write(dir.path().join("kbcrm.yaml"), "name: t\n").unwrap();
        std::fs::write(
            dir.path().join("pipelines/p.yaml"),
            format!(
                "sources:\n  c:\n    format: csv\n    location: data/f.csv\n    csv: {csv}\n    \
                 schema: {schema}\n"
            ),
        )
        .unwrap();
        std::fs::write(dir.path().join("data/f.csv"), text).unwrap();
        let project =
            crate::plan::Project::load(dir.path(), &crate::plan::Overrides::default()).unwrap();
        let source = project.pipelines[0].sources[0].clone();
        (dir, source)
    }

    /// A listed file gone before it is read: the source, its pipeline and the file named, no
    /// advice about cloud credentials for a local file.
    #[test]
    fn a_file_gone_before_it_is_read_is_named_with_its_source() {
        let (dir, source) = one_csv_source("{}", "{ id: int }", b"id\n1\n");
        let location = source.location().unwrap();
        let store = crate::storage::store_for(&location.store_url).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let listing = rt
            .block_on(super::list_files(&source, location, &store))
            .unwrap();
        std::fs::remove_file(dir.path().join("data/f.csv")).unwrap();
        let e = rt
            .block_on(super::fetch(&source, &store, &listing.files[0]))
            .unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("source 'c' of pipeline 'p'")
                && text.contains("f.csv was listed and then gone"),
            "{text}"
        );
        assert!(!text.contains("credentials"), "{text}");
    }

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

    #[test]
    fn text_a_message_shows_is_cut_and_escaped() {
        assert_eq!(super::shown("a\tb"), "a\\tb");
        let long = "é".repeat(300);
        let shown = super::shown(&long);
        assert!(
            shown.ends_with("...") && shown.len() <= super::SHOWN_BYTES + 3,
            "{shown}"
        );
        assert_eq!(super::shown("'a',\u{1b}[2J"), "'a',\\u{1b}[2J");
    }
}
