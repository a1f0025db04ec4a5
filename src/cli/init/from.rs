//! `kbcrm init --from PATH...`: a pipeline written from the user's own files. Each file, or
//! folder of files, becomes a source whose format, CSV options and columns are guessed from its
//! first bytes ([`crate::sources::sniff`]) and written out as YAML the user reviews and owns,
//! with a staging model per source.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::config::types::ColumnType;
use crate::error::{Error, Result};
use crate::plan::{Delimiter, TextEncoding};
use crate::sources::sniff::{Sniffed, SniffedColumn, sniff_csv};

/// Bytes read from the start of each sampled file.
const SAMPLE_BYTES: usize = 256 * 1024;

/// One source to write: its name, where it reads, and what it holds.
pub(super) struct Guessed {
    /// Source name (an identifier).
    pub name: String,
    /// `location:` as written (relative to the project when inside it).
    pub location: String,
    /// The file sampled.
    pub sampled: PathBuf,
    /// What the file holds.
    pub shape: Shape,
}

/// What a source's files hold.
pub(super) enum Shape {
    /// Delimited text.
    Csv(Sniffed),
    /// Parquet, with its columns read from the file's schema.
    Parquet(Vec<SniffedColumn>),
}

/// Guess a source for each path: a file, or a folder (all its files, the first one sampled).
pub(super) fn guess(project: &Path, paths: &[PathBuf]) -> Result<Vec<Guessed>> {
    let mut out: Vec<Guessed> = Vec::new();
    for path in paths {
        let (sampled, location) = match path.is_dir() {
            true => (first_file(path)?, format!("{}/", written(project, path))),
            false => (path.clone(), written(project, path)),
        };
        let stem = match path.is_dir() {
            true => path.file_name(),
            false => path.file_stem(),
        };
        let mut name = source_name(&stem.map(|s| s.to_string_lossy()).unwrap_or_default());
        while out.iter().any(|g| g.name == name) {
            name.push_str("_2");
        }
        let shape = shape_of(&sampled)?;
        out.push(Guessed {
            name,
            location,
            sampled,
            shape,
        });
    }
    Ok(out)
}

/// The first file of a folder in name order, not counting other tools' marker files.
fn first_file(dir: &Path) -> Result<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
            name.is_some_and(|n| crate::storage::skip_reason(&n).is_none())
        })
        .collect();
    files.sort();
    files.into_iter().next().ok_or_else(|| {
        Error::Usage(format!(
            "'{}' holds no file to read; give a file or a folder with files",
            dir.display()
        ))
    })
}

/// How a location is written: relative to the project when the path is inside it.
fn written(project: &Path, path: &Path) -> String {
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let (project, path) = (abs(project), abs(path));
    match path.strip_prefix(&project) {
        Ok(rel) => rel.to_string_lossy().replace('\\', "/"),
        Err(_) => path.to_string_lossy().into_owned(),
    }
}

/// The pipeline's name from the project folder's.
pub(super) fn pipeline_name(project: &str) -> String {
    match source_name(project).as_str() {
        "source" => "data".to_string(),
        name => name.to_string(),
    }
}

/// A source name from a file or folder name.
fn source_name(stem: &str) -> String {
    match crate::sources::sniff::identifier_led(stem, "s_") {
        name if name.is_empty() => "source".to_string(),
        name => name,
    }
}

/// The shape of a sampled file: Parquet by its magic bytes, otherwise delimited text.
fn shape_of(file: &Path) -> Result<Shape> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(file)
        .and_then(|f| f.take(SAMPLE_BYTES as u64).read_to_end(&mut bytes))
        .map_err(|e| Error::io(file, e))?;
    if bytes.starts_with(b"PAR1") {
        return parquet_columns(file).map(Shape::Parquet);
    }
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
        return Err(Error::Usage(format!(
            "'{}' holds JSON lines; kbcrm init --from guesses CSV and Parquet sources only, so \
             declare this one by hand (`format: json`, docs/pipelines.md)",
            file.display()
        )));
    }
    // A cut sample ends at its last whole line.
    if bytes.len() == SAMPLE_BYTES
        && let Some(end) = bytes.iter().rposition(|b| *b == b'\n')
    {
        bytes.truncate(end + 1);
    }
    sniff_csv(&bytes).map(Shape::Csv).ok_or_else(|| {
        Error::Usage(format!(
            "'{}' is empty: kbcrm init --from guesses a source from a file's first lines",
            file.display()
        ))
    })
}

/// The columns of a Parquet file, from its schema; a column of a type kbcrm does not declare is
/// read as text.
fn parquet_columns(file: &Path) -> Result<Vec<SniffedColumn>> {
    use arrow::datatypes::DataType as D;
    let f = std::fs::File::open(file).map_err(|e| Error::io(file, e))?;
    let builder = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)?;
    Ok(builder
        .schema()
        .fields()
        .iter()
        .map(|field| {
            let ty = match field.data_type() {
                D::Int8 | D::Int16 | D::Int32 | D::UInt8 | D::UInt16 => ColumnType::Int,
                D::Int64 | D::UInt32 => ColumnType::BigInt,
                D::Float16 | D::Float32 | D::Float64 => ColumnType::Double,
                D::Decimal128(p, s) => ColumnType::Decimal(*p, *s),
                D::Boolean => ColumnType::Bool,
                D::Date32 | D::Date64 => ColumnType::Date,
                D::Timestamp(..) => ColumnType::Timestamp,
                _ => ColumnType::String,
            };
            let name = crate::sources::sniff::identifier(field.name());
            SniffedColumn {
                source: (name != *field.name()).then(|| field.name().clone()),
                name,
                ty,
                format: None,
                required: !field.is_nullable(),
            }
        })
        .collect())
}

/// The pipeline file for the sources, with a staging model listed for each.
pub(super) fn pipeline_yaml(pipeline: &str, sources: &[Guessed]) -> String {
    let mut y = String::from(
        "# Written by `kbcrm init --from` from the first lines of each source's files: review the\n\
         # guesses (the comment above each source says what was guessed and how sure); the file is\n\
         # yours to edit. Every key: docs/pipelines.md\n",
    );
    let _ = writeln!(y, "name: {pipeline}\nsources:");
    for s in sources {
        let _ = writeln!(y, "  {}:", s.name);
        match &s.shape {
            Shape::Csv(sniffed) => csv_source(&mut y, s, sniffed),
            Shape::Parquet(columns) => {
                let _ = writeln!(
                    y,
                    "    # {}: Parquet; columns from its schema",
                    s.sampled.display()
                );
                let _ = writeln!(
                    y,
                    "    format: parquet\n    location: {}",
                    quoted(&s.location)
                );
                schema(&mut y, columns);
            }
        }
    }
    y.push_str("models:\n");
    for s in sources {
        let _ = writeln!(y, "  - sql/staging/stg_{}.sql", s.name);
    }
    y
}

/// A CSV source's lines of the pipeline file.
fn csv_source(y: &mut String, s: &Guessed, sniffed: &Sniffed) {
    let _ = writeln!(
        y,
        "    # {}: {}; types from {} rows",
        s.sampled.display(),
        sniffed.reasons.join("; "),
        sniffed.rows
    );
    let _ = writeln!(y, "    format: csv\n    location: {}", quoted(&s.location));
    let mut options = Vec::new();
    match sniffed.delimiter {
        Delimiter::Byte(b',') => {}
        Delimiter::Byte(b'\t') => options.push("delimiter: \"\\t\"".to_string()),
        Delimiter::Byte(b) => {
            options.push(format!("delimiter: {}", quoted(&char::from(b).to_string())))
        }
        Delimiter::Whitespace => options.push("delimiter: whitespace".to_string()),
    }
    if !sniffed.header {
        options.push("header: false".to_string());
    }
    if sniffed.trailing_delimiter {
        options.push("trailing_delimiter: true".to_string());
    }
    match sniffed.encoding {
        TextEncoding::Utf8 => {}
        TextEncoding::Latin1 => options.push("encoding: latin1".to_string()),
        TextEncoding::Windows1252 => options.push("encoding: windows-1252".to_string()),
    }
    if !options.is_empty() {
        let _ = writeln!(y, "    csv: {{ {} }}", options.join(", "));
    }
    schema(y, &sniffed.columns);
}

/// The `schema:` lines of a source.
fn schema(y: &mut String, columns: &[SniffedColumn]) {
    y.push_str("    schema:\n");
    for c in columns {
        let mut parts = vec![format!("type: {}", quoted(&c.ty.to_string()))];
        if let Some(f) = &c.format {
            parts.push(format!("format: {}", quoted(f)));
        }
        if c.required {
            parts.push("required: true".to_string());
        }
        if let Some(source) = &c.source {
            parts.push(format!("source: {}", quoted(source)));
        }
        let _ = writeln!(y, "      {}: {{ {} }}", c.name, parts.join(", "));
    }
}

/// A YAML double-quoted string.
fn quoted(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The staging model of a source: its columns selected by name, to rename, cast and clean.
pub(super) fn staging_sql(pipeline: &str, s: &Guessed) -> String {
    let columns: Vec<String> = match &s.shape {
        Shape::Csv(sniffed) => sniffed.columns.iter().map(|c| c.name.clone()).collect(),
        Shape::Parquet(columns) => columns.iter().map(|c| c.name.clone()).collect(),
    };
    format!(
        "-- Staging model of source '{}' (written by kbcrm init --from): rename, cast and clean\n\
         -- its columns here; the table it builds is named after this file.\n\
         select\n    {}\nfrom raw_{pipeline}_{}\n",
        s.name,
        columns.join(",\n    "),
        s.name
    )
}

/// What was guessed, for the terminal.
pub(super) fn summary(sources: &[Guessed]) -> String {
    let mut out = String::new();
    for s in sources {
        match &s.shape {
            Shape::Csv(sniffed) => {
                let _ = writeln!(out, "{} ({}):", s.name, s.sampled.display());
                for r in &sniffed.reasons {
                    let _ = writeln!(out, "  {r}");
                }
                let columns: Vec<String> = sniffed
                    .columns
                    .iter()
                    .map(|c| format!("{} {}", c.name, c.ty))
                    .collect();
                let _ = writeln!(out, "  columns: {}", columns.join(", "));
            }
            Shape::Parquet(columns) => {
                let _ = writeln!(
                    out,
                    "{} ({}): Parquet, {} columns from its schema",
                    s.name,
                    s.sampled.display(),
                    columns.len()
                );
            }
        }
    }
    out
}
