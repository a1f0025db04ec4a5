//! The one error type of the library.
//!
//! Variants are split by who is at fault, because that decides the exit code and what the user
//! should do next: the project's own files ([`Error::Invalid`]: YAML, SQL, the DAG), the data
//! ([`Error::DataQuality`]), or the run itself (engine, storage, I/O).

use std::fmt;
use std::path::{Path, PathBuf};

use miette::{Diagnostic, NamedSource, SourceSpan};

/// Result with the library's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in kbcrm.
#[derive(Debug, thiserror::Error, Diagnostic)]
pub enum Error {
    /// The project's files (kbcrm.yaml, a pipeline, a SQL model) are wrong. Exit code 2.
    #[error("{}", render_problems(.0))]
    Invalid(#[related] Vec<Problem>),

    /// Data broke a rule the pipeline declared (reject ratio, a data test). Exit code 3.
    #[error("data quality check failed in pipeline '{pipeline}': {message}")]
    #[diagnostic(help(
        "nothing was committed; fix the source data or relax the rule in the pipeline"
    ))]
    DataQuality {
        /// The pipeline whose check failed.
        pipeline: String,
        /// What failed, in words.
        message: String,
    },

    /// A source could not be read (missing file, unreadable store). Exit code 2.
    #[error("source '{source_name}' of pipeline '{pipeline}': {message}")]
    Source {
        /// Pipeline of the source.
        pipeline: String,
        /// Name of the source in the pipeline.
        source_name: String,
        /// What is wrong.
        message: String,
    },

    /// A model failed while it ran (its SQL planned but failed on the data). Exit code 1.
    #[error("model '{model}' ({}) failed: {message}", .file.display())]
    Model {
        /// Table the model builds.
        model: String,
        /// Its SQL file.
        file: PathBuf,
        /// The engine's message.
        message: String,
        /// What to do, when kbcrm can tell (e.g. the memory limit was reached).
        #[help]
        help: Option<String>,
    },

    /// A command-line usage error found after argument parsing. Exit code 2.
    #[error("{0}")]
    Usage(String),

    /// Another run holds the warehouse. Exit code 1.
    #[error("{0}")]
    Busy(String),

    /// The run changed no table and `--exit-code-unchanged` asked to say so. Exit code 4.
    #[error("nothing to do: the run changed no table")]
    Unchanged,

    /// An extract was written but could not be delivered. Exit code 1.
    #[error("delivery failed: {0}")]
    #[diagnostic(help("fix the destination or its credentials and run `kbcrm extract` again"))]
    Delivery(String),

    /// An extract's workbook could not be written: a table of it exceeds what a worksheet holds.
    /// Exit code 1.
    #[error("writing the workbook failed: {0}")]
    #[diagnostic(help(
        "a worksheet holds at most 1,048,576 rows, 16,384 columns and 32,767 characters in a \
         cell; narrow the extract's tables or choose csv or parquet"
    ))]
    Workbook(#[source] rust_xlsxwriter::XlsxError),

    /// The warehouse store refused an operation or holds something unexpected. Exit code 1.
    #[error("warehouse: {message}")]
    Warehouse {
        /// What failed; when a library reported it, its words are part of this.
        message: String,
        /// The library's error, when one reported it.
        #[source]
        cause: Option<Box<dyn std::error::Error + Send + Sync>>,
    },

    /// A run's commit failed after its manifest was written: some of its tables may be
    /// committed, the others will be from the manifest. Exit code 1.
    #[error("the commit of run {run_id} did not finish: {message}")]
    #[diagnostic(help(
        "the next `kbcrm run` on this warehouse resolves it from \
         `_kbcrm/pending/{run_id}.json` first: it completes the commit, or, if another run \
         changed one of its tables meanwhile, rolls back what was not committed and says so; \
         keep that file, and the run's data files"
    ))]
    Unfinished {
        /// The run.
        run_id: String,
        /// What failed.
        message: String,
    },

    /// The golden records of an identity resolution could not be built (its SQL failed, e.g. for
    /// memory or a survivorship rule the data does not fit). Exit code 1.
    #[error("identity '{entity}': building its golden records failed: {cause}")]
    Identity {
        /// The entity resolved.
        entity: String,
        /// What failed.
        #[source]
        cause: Box<Error>,
    },

    /// A pipeline read tables another pipeline of the run had not committed yet, and that one
    /// failed or builds again alone; this pipeline builds again once it has committed. The run
    /// handles it: it reaches a user only if the rebuild cannot happen. Exit code 1.
    #[error(
        "a pipeline this one reads from failed or builds again alone; this one builds again once \
         it has committed"
    )]
    UpstreamWithdrawn,

    /// DataFusion failed.
    #[error(transparent)]
    DataFusion(#[from] datafusion::error::DataFusionError),

    /// Arrow failed.
    #[error(transparent)]
    Arrow(#[from] arrow::error::ArrowError),

    /// Parquet failed.
    #[error(transparent)]
    Parquet(#[from] parquet::errors::ParquetError),

    /// Delta Lake failed.
    #[error(transparent)]
    Delta(#[from] deltalake::DeltaTableError),

    /// The Delta kernel failed.
    #[error(transparent)]
    DeltaKernel(#[from] deltalake::kernel::Error),

    /// An object store failed.
    #[error(transparent)]
    #[diagnostic(help(
        "check the URL and that its bucket exists, the endpoint (AWS_ENDPOINT or `storage:` in \
         kbcrm.yaml) and the credentials in the environment"
    ))]
    ObjectStore(#[from] object_store::Error),

    /// Local I/O failed.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    /// A bug in kbcrm: please report it.
    #[error("internal error (a bug in kbcrm, please report it): {0}")]
    Internal(String),
}

impl Error {
    /// The process exit code for this error: 1 run failed, 2 usage or configuration, 3 data
    /// quality, 4 nothing to do (when asked for).
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Invalid(_) | Error::Source { .. } | Error::Usage(_) => 2,
            Error::DataQuality { .. } => 3,
            Error::Unchanged => 4,
            _ => 1,
        }
    }

    /// Whether the engine ran out of its memory limit (an operator that could not spill).
    pub fn is_out_of_memory(&self) -> bool {
        matches!(
            self,
            Error::DataFusion(e)
                if matches!(e.find_root(), datafusion::error::DataFusionError::ResourcesExhausted(_))
        ) || matches!(self, Error::Identity { cause, .. } if cause.is_out_of_memory())
    }

    /// What refused a write, when the cause is the store's filesystem: full, over a quota, or
    /// read-only (as the system words it anywhere in the error's causes).
    pub fn storage_refusal(&self) -> Option<&'static str> {
        const REFUSALS: &[(&[&str], &str)] = &[
            (
                &["os error 28", "No space left on device"],
                "the disk is full",
            ),
            (
                &["os error 122", "Disk quota exceeded"],
                "the disk quota is used up",
            ),
            (
                &["os error 30", "Read-only file system"],
                "the filesystem is read-only",
            ),
        ];
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = cause {
            let text = e.to_string();
            for (words, what) in REFUSALS {
                if words.iter().any(|w| text.contains(w)) {
                    return Some(what);
                }
            }
            cause = e.source();
        }
        None
    }

    /// One problem as an error.
    pub fn invalid(problem: Problem) -> Self {
        Error::Invalid(vec![problem])
    }

    /// A warehouse error kbcrm found itself.
    pub fn warehouse(message: impl Into<String>) -> Self {
        Error::Warehouse {
            message: message.into(),
            cause: None,
        }
    }

    /// A warehouse error a library reported: `what` failed, and `cause` says why.
    pub fn warehouse_caused(
        what: impl std::fmt::Display,
        cause: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error::Warehouse {
            message: format!("{what}: {cause}"),
            cause: Some(Box::new(cause)),
        }
    }

    /// Wrap an I/O error with the path it concerns.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }
}

fn render_problems(problems: &[Problem]) -> String {
    match problems {
        [one] => one.to_string(),
        many => {
            let mut out = format!("{} problems in the project:", many.len());
            for p in many {
                out.push_str("\n  ");
                out.push_str(&p.to_string());
            }
            out
        }
    }
}

/// A position in a project file: 1-based line and column plus the byte span for rendering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Position {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// Byte offset of the start.
    pub offset: usize,
    /// Length in bytes (0 for a point).
    pub len: usize,
}

impl Position {
    /// The position of a byte offset in `text`.
    pub fn of_offset(text: &str, offset: usize, len: usize) -> Self {
        let offset = offset.min(text.len());
        let before = &text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        Position {
            line,
            column,
            offset,
            len,
        }
    }

    /// The position of a 1-based line and column in `text`.
    pub fn of_line_col(text: &str, line: usize, column: usize, len: usize) -> Self {
        let mut offset = 0;
        for (i, l) in text.split_inclusive('\n').enumerate() {
            if i + 1 == line {
                let col_bytes: usize = l
                    .chars()
                    .take(column.saturating_sub(1))
                    .map(char::len_utf8)
                    .sum();
                offset += col_bytes;
                break;
            }
            offset += l.len();
        }
        Position {
            line: line.max(1),
            column: column.max(1),
            offset: offset.min(text.len()),
            len,
        }
    }
}

/// One thing wrong in one project file, with where it is and what to do about it.
#[derive(Debug, Clone)]
pub struct Problem {
    /// The file, relative to the project root where possible.
    pub file: PathBuf,
    /// Where in the file, when known.
    pub position: Option<Position>,
    /// What is wrong (lowercase, the offending key or name quoted).
    pub message: String,
    /// What to do about it.
    pub help: Option<String>,
    /// The file's text, for the source snippet.
    pub text: Option<std::sync::Arc<String>>,
}

impl Problem {
    /// A problem in `file` with no position.
    pub fn new(file: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Problem {
            file: file.into(),
            position: None,
            message: message.into(),
            help: None,
            text: None,
        }
    }

    /// Attach a position and the file text for the snippet. When a line the snippet would show
    /// is longer than [`SNIPPET_LINE_BYTES`], the snippet is left out and the message shows the
    /// error's line cut around its column instead.
    pub fn at(mut self, position: Position, text: &std::sync::Arc<String>) -> Self {
        self.position = Some(position);
        match near(text, position) {
            None => self.text = Some(text.clone()),
            Some(window) => {
                self.message = format!(
                    "{} (line {} is too long to show; near column {}: {window})",
                    self.message, position.line, position.column
                );
            }
        }
        self
    }

    /// Attach advice.
    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(p) = self.position {
            write!(f, ":{}:{}", p.line, p.column)?;
        }
        write!(f, ": {}", self.message)?;
        if let Some(help) = &self.help {
            write!(f, " ({help})")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problem {}

impl Diagnostic for Problem {
    fn source_code(&self) -> Option<&dyn miette::SourceCode> {
        self.text
            .as_ref()
            .map(|t| t.as_ref() as &dyn miette::SourceCode)
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = miette::LabeledSpan> + '_>> {
        let p = self.position?;
        self.text.as_ref()?;
        let span = SourceSpan::new(p.offset.into(), p.len);
        Some(Box::new(std::iter::once(
            miette::LabeledSpan::new_with_span(Some("here".to_string()), span),
        )))
    }
}

/// Lines longer than this are not shown whole in a message.
pub const SNIPPET_LINE_BYTES: usize = 400;

/// Characters shown on each side of an error's column in a long line.
const NEAR_CHARS: usize = 40;

/// When the error's line or a line beside it is longer than [`SNIPPET_LINE_BYTES`]: the
/// error's line cut to [`NEAR_CHARS`] characters either side of its offset, control characters
/// escaped.
fn near(text: &str, position: Position) -> Option<String> {
    let offset = text.floor_char_boundary(position.offset.min(text.len()));
    let start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    // The snippet shows a line either side: any of the three too long leaves it out.
    let before = text[..start.saturating_sub(1)]
        .rfind('\n')
        .map_or(0, |i| i + 1);
    let after = text[(end + 1).min(text.len())..]
        .find('\n')
        .map_or(text.len(), |i| end + 1 + i);
    let longest = text[before..after.max(before)]
        .split('\n')
        .map(str::len)
        .max()
        .unwrap_or(0);
    if longest <= SNIPPET_LINE_BYTES {
        return None;
    }
    let left: String = text[start..offset].chars().rev().take(NEAR_CHARS).collect();
    let left: String = left.chars().rev().collect();
    let right: String = text[offset..end].chars().take(NEAR_CHARS).collect();
    let cut_left = left.len() < offset - start;
    let cut_right = right.len() < end - offset;
    let mut out = String::from(if cut_left { "..." } else { "" });
    out.push_str(&escape_controls(&format!("{left}\u{25b8}{right}")));
    if cut_right {
        out.push_str("...");
    }
    Some(out)
}

/// Text from a file as a message shows it: control characters escaped (`\t`, `\u{1b}`), the
/// rest as it is.
pub fn escape_controls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c.is_control() {
            true => out.extend(c.escape_debug()),
            false => out.push(c),
        }
    }
    out
}

/// A named source for miette rendering of a project file (used by the CLI).
pub fn named_source(file: &Path, text: &str) -> NamedSource<String> {
    NamedSource::new(file.display().to_string(), text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_line_is_cut_around_the_error_and_not_given_to_the_snippet() {
        let line = format!("{}\u{1b}bad{}", "x".repeat(70_000), "y".repeat(5_000_000));
        let text = std::sync::Arc::new(format!("name: p\nsql: {line}\nnext: 1\n"));
        let offset = text.find('\u{1b}').unwrap();
        let position = Position::of_offset(&text, offset, 3);
        let problem = Problem::new("p.yaml", "bad value").at(position, &text);
        assert!(problem.text.is_none(), "no snippet of a 5 MB line");
        assert!(problem.labels().is_none());
        let shown = problem.to_string();
        assert!(shown.len() < 400, "{}", shown.len());
        assert!(
            shown.contains(&format!("near column {}", position.column)),
            "{shown}"
        );
        assert!(
            shown.contains("...xxxx") && shown.contains("\\u{1b}bad"),
            "{shown}"
        );
        // Short lines keep their snippet.
        let short = std::sync::Arc::new("a: 1\nb: x\n".to_string());
        let p = Problem::new("p.yaml", "bad").at(Position::of_offset(&short, 8, 1), &short);
        assert!(p.text.is_some() && p.labels().is_some());
        // A long line beside the error's is not shown either.
        let beside = std::sync::Arc::new(format!("a: 1\nb: {}\n", "z".repeat(1000)));
        let p = Problem::new("p.yaml", "bad").at(Position::of_offset(&beside, 3, 1), &beside);
        assert!(p.text.is_none(), "{p}");
    }
}
