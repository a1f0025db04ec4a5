//! From specs to a validated project: paths resolved, SQL read and parsed, the DAG ordered.
//!
//! A [`Project`] cannot be half-valid: loading collects every problem in every file and fails with
//! all of them, or returns a project whose pipelines, sources and models are ready to run.
//!
//! May import `config` and the leaves only: the engine, the stages and `run` take a [`Project`].

pub mod access;
pub mod dag;
mod data_tests;
pub use data_tests::ADDED_ROWS;
pub mod extracts;
mod graph;
mod identity;
pub use identity::{Identity, RecordSource};
mod loader;
pub mod location;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use url::Url;

pub use crate::config::pipeline::{Misfire, Normalizer, Severity, Survivorship, TextEncoding};
pub use crate::config::project::MemoryPoolKind;
pub use crate::config::project::{ExtractFormat, SmtpTls};
use crate::config::types::ColumnType;
use crate::error::{Error, Result};

pub use location::Location;

use loader::Loader;

/// Tables kbcrm itself writes, which models may read.
pub const BUILTIN_TABLES: &[&str] = &[
    "quarantine",
    "kbcrm_state",
    "kbcrm_loaded_files",
    "kbcrm_test_results",
    "model_evaluation",
];

pub use crate::config::PROJECT_FILE;

/// Settings that override the project file (environment, then command line).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// Warehouse location.
    pub warehouse: Option<String>,
    /// Engine memory limit, e.g. "2GiB".
    pub memory_limit: Option<String>,
    /// Where queries run: `local`, `ballista` (a cluster in this process) or `df://host:port`.
    pub engine: Option<String>,
    /// Whether queries are answered from rollups (`on`/`off`).
    pub rollups: Option<String>,
    /// How operators share the memory limit (`greedy`/`fair`).
    pub memory_pool: Option<String>,
}

impl Overrides {
    /// Read `KBCRM_WAREHOUSE`, `KBCRM_MEMORY_LIMIT`, `KBCRM_MEMORY_POOL`, `KBCRM_ENGINE` and
    /// `KBCRM_ROLLUPS`.
    pub fn from_env() -> Self {
        Overrides {
            engine: std::env::var("KBCRM_ENGINE").ok().filter(|s| !s.is_empty()),
            warehouse: std::env::var("KBCRM_WAREHOUSE")
                .ok()
                .filter(|s| !s.is_empty()),
            memory_limit: std::env::var("KBCRM_MEMORY_LIMIT")
                .ok()
                .filter(|s| !s.is_empty()),
            rollups: std::env::var("KBCRM_ROLLUPS")
                .ok()
                .filter(|s| !s.is_empty()),
            memory_pool: std::env::var("KBCRM_MEMORY_POOL")
                .ok()
                .filter(|s| !s.is_empty()),
        }
    }

    /// Layer `other` on top of `self`.
    pub fn with(mut self, other: Overrides) -> Self {
        if other.warehouse.is_some() {
            self.warehouse = other.warehouse;
        }
        if other.memory_limit.is_some() {
            self.memory_limit = other.memory_limit;
        }
        if other.engine.is_some() {
            self.engine = other.engine;
        }
        if other.rollups.is_some() {
            self.rollups = other.rollups;
        }
        if other.memory_pool.is_some() {
            self.memory_pool = other.memory_pool;
        }
        self
    }
}

/// Where queries run when not in this process's own engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cluster {
    /// A Ballista scheduler and executor started inside this process.
    Standalone,
    /// The Ballista scheduler at this `df://host:port` URL.
    Scheduler(String),
}

/// Engine settings after validation.
#[derive(Debug, Clone, Default)]
pub struct EngineSettings {
    /// The Ballista cluster queries run on; `None` runs them here.
    pub cluster: Option<Cluster>,
    /// Memory pool limit in bytes.
    pub memory_limit: Option<usize>,
    /// How operators share the limit; `None`: greedy for queries, fair for runs.
    pub memory_pool: Option<MemoryPoolKind>,
    /// Spill folder.
    pub spill_dir: Option<PathBuf>,
    /// Plan parallelism.
    pub target_partitions: Option<usize>,
    /// Steps of a pipeline run at once.
    pub threads: Option<usize>,
    /// Batch size.
    pub batch_size: Option<usize>,
    /// DataFusion settings passed through.
    pub datafusion: Vec<(String, String)>,
    /// Whether `kbcrm query` and `kbcrm serve` answer aggregates from rollups.
    pub rollups: bool,
}

impl EngineSettings {
    /// The memory pool of queries (`kbcrm query`, the server, extracts): greedy by default.
    pub fn query_memory_pool(&self) -> MemoryPoolKind {
        self.memory_pool.unwrap_or(MemoryPoolKind::Greedy)
    }
}

/// A validated project.
#[derive(Debug, Clone)]
pub struct Project {
    /// The folder holding kbcrm.yaml (absolute).
    pub root: PathBuf,
    /// Project name.
    pub name: String,
    /// Warehouse root URL (ends with '/').
    pub warehouse: Url,
    /// Engine settings.
    pub engine: EngineSettings,
    /// Pipelines, in the order they must run.
    pub pipelines: Vec<Pipeline>,
    /// The SQL server's settings, roles, PII columns and users.
    pub access: access::Access,
    /// Extracts declared in kbcrm.yaml, in the order written.
    pub extracts: Vec<extracts::Extract>,
    /// Time zone of the cron schedules.
    pub timezone: chrono_tz::Tz,
    /// Where OpenLineage events go, when anywhere.
    pub openlineage: Option<OpenLineageTarget>,
    /// `kbcrm vacuum` on a schedule: its cron expression and retention.
    pub vacuum: Option<(String, std::time::Duration)>,
}

/// The retention of `kbcrm vacuum` when none is given.
pub const DEFAULT_RETAIN: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// A validated pipeline.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// Name.
    pub name: String,
    /// Its file, relative to the project root.
    pub file: PathBuf,
    /// Cron schedule, when declared.
    pub schedule: Option<String>,
    /// Further attempts of a failed scheduled run.
    pub retries: u32,
    /// Wait before the first retry (doubled for each further one).
    pub retry_delay: std::time::Duration,
    /// What the scheduler does about missed times.
    pub misfire: crate::config::pipeline::Misfire,
    /// Sources in declaration order.
    pub sources: Vec<Source>,
    /// Models in dependency order (within the pipeline).
    pub models: Vec<Model>,
    /// Data tests.
    pub tests: Vec<DataTest>,
    /// Identity resolutions.
    pub identities: Vec<Identity>,
    /// Models and identity resolutions in the order they run.
    pub steps: Vec<Step>,
    /// Variables for `kbcrm_var('name')`, as text.
    pub vars: std::collections::BTreeMap<String, String>,
    /// Pipelines whose tables this one reads.
    pub depends_on: Vec<String>,
}

/// A step of a pipeline after its sources are loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// `models[i]`.
    Model(usize),
    /// `identities[i]`.
    Identity(usize),
}

/// How a source finds what is new.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incremental {
    /// Files not loaded before.
    NewFiles,
    /// Rows above the highest value of this column loaded before.
    Cursor(String),
}

/// How new rows meet a table's current rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Replace the table's content.
    Overwrite,
    /// Add the rows.
    Append,
    /// Upsert by `keys`: new keys are inserted, existing keys replaced when changed.
    Merge {
        /// The columns that identify a row.
        keys: Vec<String>,
    },
}

impl Write {
    /// The name as written in YAML (`mode:`).
    pub fn as_str(&self) -> &'static str {
        match self {
            Write::Overwrite => "overwrite",
            Write::Append => "append",
            Write::Merge { .. } => "merge",
        }
    }

    /// The merge keys; empty for the other writes.
    pub fn keys(&self) -> &[String] {
        match self {
            Write::Merge { keys } => keys,
            _ => &[],
        }
    }
}

/// How a model's table is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelWrite {
    /// As a source's table is.
    Table(Write),
    /// As a type-2 slowly changing dimension.
    Scd2(Scd2),
}

impl ModelWrite {
    /// The name as written in YAML (`mode:`).
    pub fn as_str(&self) -> &'static str {
        match self {
            ModelWrite::Table(w) => w.as_str(),
            ModelWrite::Scd2(_) => "scd2",
        }
    }

    /// The columns that identify a row (merge and type-2); empty otherwise.
    pub fn keys(&self) -> &[String] {
        match self {
            ModelWrite::Table(w) => w.keys(),
            ModelWrite::Scd2(s) => &s.keys,
        }
    }

    /// Whether the model's table is merged by keys.
    pub fn is_merge(&self) -> bool {
        matches!(self, ModelWrite::Table(Write::Merge { .. }))
    }
}

/// Options of a type-2 slowly changing dimension model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scd2 {
    /// The columns that identify an entity (its business key).
    pub keys: Vec<String>,
    /// Columns whose change opens a new version.
    pub tracked: Vec<String>,
    /// Column holding when a change took effect (else the run time).
    pub valid_from: Option<String>,
    /// Surrogate key column to add.
    pub surrogate_key: Option<String>,
}

/// A validated source.
#[derive(Debug, Clone)]
pub struct Source {
    /// Pipeline name.
    pub pipeline: String,
    /// Source name.
    pub name: String,
    /// Table it loads into.
    pub table: String,
    /// What it reads: files or a database.
    pub input: Input,
    /// How its rows meet the table's.
    pub write: Write,
    /// Declared columns in order.
    pub columns: Vec<Column>,
    /// Highest share of rejected rows before the run fails.
    pub max_reject_ratio: f64,
    /// What is new since the last run, when the source is incremental.
    pub incremental: Option<Incremental>,
    /// Freshness thresholds: (warn after, error after).
    pub freshness: Option<(Option<std::time::Duration>, Option<std::time::Duration>)>,
}

/// What a source reads.
#[derive(Debug, Clone)]
pub enum Input {
    /// Files in a location.
    Files {
        /// Their format.
        format: FileFormat,
        /// Where they are.
        location: Location,
    },
    /// A table or query of a database.
    Database(Database),
}

/// The format of a file source.
#[derive(Debug, Clone)]
pub enum FileFormat {
    /// Separated values, with their options.
    Csv(CsvSettings),
    /// Newline-delimited JSON.
    Json,
    /// Apache Parquet.
    Parquet,
    /// A Delta Lake table.
    Delta,
}

/// The kind of database a source reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatabaseKind {
    /// PostgreSQL.
    Postgres,
    /// MySQL or MariaDB.
    Mysql,
}

impl DatabaseKind {
    /// The name as written in YAML (`format:`).
    pub fn as_str(&self) -> &'static str {
        match self {
            DatabaseKind::Postgres => "postgres",
            DatabaseKind::Mysql => "mysql",
        }
    }
}

impl Source {
    /// Where a file source's files are; `None` for a database source.
    pub fn location(&self) -> Option<&Location> {
        match &self.input {
            Input::Files { location, .. } => Some(location),
            Input::Database(_) => None,
        }
    }

    /// What a database source reads; `None` for a file source.
    pub fn database(&self) -> Option<&Database> {
        match &self.input {
            Input::Database(db) => Some(db),
            Input::Files { .. } => None,
        }
    }

    /// Where the source reads from, for people: the location as written, or the database table
    /// or query (never the connection URL).
    pub fn origin(&self) -> String {
        match &self.input {
            Input::Files { location, .. } => location.written.clone(),
            Input::Database(db) => db.origin(),
        }
    }
}

/// A database source's settings.
#[derive(Debug, Clone)]
pub struct Database {
    /// `postgres` or `mysql`.
    pub kind: DatabaseKind,
    /// Where the connection URL comes from.
    pub connection: ConnectionRef,
    /// The table or query read.
    pub relation: Relation,
    /// Parallel reads: (integer column, number of ranges).
    pub partition: Option<(String, u32)>,
    /// How far below the watermark an incremental read starts again.
    pub overlap: Option<std::time::Duration>,
    /// How deletes at the source are found.
    pub deletes: Option<Deletes>,
}

impl Database {
    /// `postgres erp.customers` or `mysql query`.
    pub fn origin(&self) -> String {
        let kind = self.kind.as_str();
        match &self.relation {
            Relation::Table(t) => format!("{kind} {t}"),
            Relation::Query(_) => format!("{kind} query"),
        }
    }
}

/// Where a connection URL comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionRef {
    /// An environment variable.
    Env(String),
    /// A file (absolute path).
    File(PathBuf),
}

impl std::fmt::Display for ConnectionRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectionRef::Env(v) => write!(f, "environment variable {v}"),
            ConnectionRef::File(p) => write!(f, "file {}", p.display()),
        }
    }
}

/// A table (`schema.table`) or a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Relation {
    /// Table name parts, unquoted.
    Table(String),
    /// A SELECT.
    Query(String),
}

/// How deletes at a database source are found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deletes {
    /// A column the source sets on deleted rows.
    SoftColumn(String),
    /// A full key comparison at most this often (`None`: every run).
    CompareKeys(Option<std::time::Duration>),
}

/// The column marking rows deleted at a database source.
pub const DELETED_AT: &str = "_deleted_at";

/// A declared column.
#[derive(Debug, Clone)]
pub struct Column {
    /// Column name in the table.
    pub name: String,
    /// Field name in the source.
    pub source_name: String,
    /// Type.
    pub ty: ColumnType,
    /// Rows without a value are rejected.
    pub required: bool,
    /// chrono format for dates and timestamps.
    pub format: Option<String>,
}

/// CSV options with defaults applied.
#[derive(Debug, Clone)]
pub struct CsvSettings {
    /// Field separator.
    pub delimiter: Delimiter,
    /// Quote character.
    pub quote: u8,
    /// First line is a header.
    pub header: bool,
    /// Values meaning null.
    pub null_values: Vec<String>,
    /// Every line ends with a delimiter; `None`: detected per file.
    pub trailing_delimiter: Option<bool>,
    /// Lines skipped at the start of each file.
    pub skip_rows: u64,
    /// Lines starting with this byte are skipped.
    pub comment: Option<u8>,
    /// The files' text encoding.
    pub encoding: TextEncoding,
}

impl Default for CsvSettings {
    fn default() -> Self {
        CsvSettings {
            delimiter: Delimiter::Byte(b','),
            quote: b'"',
            header: true,
            null_values: vec![String::new()],
            trailing_delimiter: None,
            skip_rows: 0,
            comment: None,
            encoding: TextEncoding::Utf8,
        }
    }
}

/// What separates the fields of a CSV line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delimiter {
    /// One ASCII character.
    Byte(u8),
    /// A run of blanks (spaces and tabs).
    Whitespace,
}

/// A validated SQL model.
#[derive(Debug, Clone)]
pub struct Model {
    /// Pipeline name.
    pub pipeline: String,
    /// Table it builds (the file stem).
    pub name: String,
    /// SQL file relative to the project root.
    pub file: PathBuf,
    /// The SQL text.
    pub sql: Arc<String>,
    /// How its table is written.
    pub write: ModelWrite,
    /// Tables it reads.
    pub depends_on: Vec<String>,
    /// What suffices to refresh it (merge models): driving tables, and a key to widen to.
    pub incremental: Option<ModelIncremental>,
    /// A rollup that aggregate queries are routed to ([`crate::engine::rollup`]).
    pub rollup: bool,
    /// Columns its data files are sorted by.
    pub cluster_by: Vec<String>,
    /// The expression whose values divide its rows among data files.
    pub files_by: Option<String>,
    /// Built a slice of a key at a time when its inputs are large.
    pub slices: Option<Slices>,
}

/// What refreshes an incremental model: its driving tables' new rows, optionally widened to
/// every row of the keys those new rows carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelIncremental {
    /// Tables whose added rows drive the refresh.
    pub tables: Vec<String>,
    /// With a key: rebuild every row of the keys among the added rows.
    pub key: Option<String>,
}

/// How a model is built a slice of a key at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slices {
    /// The column the slices divide (a join key of the model's large tables).
    pub by: String,
    /// The most rows of the largest sliced table in one slice.
    pub rows: u64,
}

/// A data test with its table resolved.
#[derive(Debug, Clone)]
pub struct DataTest {
    /// Short description, e.g. "unique(stg_orders: order_id)".
    pub name: String,
    /// The table it checks.
    pub table: String,
    /// A query returning the offending rows.
    pub query: String,
    /// The same check over only the rows a run added to `table`, read from
    /// [`ADDED_ROWS`]: enough when the tables passed the test before and have only
    /// gained rows since (`None`: the test always reads its tables whole).
    pub added_rows: Option<String>,
    /// What failure means.
    pub severity: Severity,
    /// The tables its query reads.
    pub reads: Vec<String>,
    /// For a relationships test, its column and the table and column its rows refer to. A run
    /// may rewrite that table and the test still check only added rows, so long as every value
    /// of the column is still there.
    pub referenced: Option<Reference>,
    /// For a unique test, its columns (empty for other tests).
    pub unique_columns: Vec<String>,
}

/// What a relationships test's column refers to.
#[derive(Debug, Clone)]
pub struct Reference {
    /// The column of the test's table holding the references.
    pub column: String,
    /// The table referred to.
    pub to_table: String,
    /// Its column the references name.
    pub to_column: String,
}

/// What builds a table: a source load or a model.
#[derive(Debug, Clone, Copy)]
pub enum Producer<'a> {
    /// A source load.
    Source(&'a Source),
    /// A SQL model.
    Model(&'a Model),
}

impl Project {
    /// Load and validate the project whose kbcrm.yaml is in `dir` or one of its parents.
    pub fn load(dir: &Path, overrides: &Overrides) -> Result<Project> {
        let root = find_root(dir)?;
        Loader::new(root).load(overrides)
    }

    /// Every pipeline, by name.
    pub fn pipeline(&self, name: &str) -> Option<&Pipeline> {
        self.pipelines.iter().find(|p| p.name == name)
    }

    /// Every table the project builds, with its producer.
    pub fn producers(&self) -> BTreeMap<&str, Producer<'_>> {
        let mut out = BTreeMap::new();
        for p in &self.pipelines {
            for s in &p.sources {
                out.insert(s.table.as_str(), Producer::Source(s));
            }
            for m in &p.models {
                out.insert(m.name.as_str(), Producer::Model(m));
            }
        }
        out
    }

    /// A path relative to the project root when it is inside it.
    pub fn relative(&self, path: &Path) -> PathBuf {
        path.strip_prefix(&self.root).unwrap_or(path).to_path_buf()
    }
}

fn find_root(dir: &Path) -> Result<PathBuf> {
    let start = std::path::absolute(dir).map_err(|e| Error::io(dir, e))?;
    let mut cur = Some(start.as_path());
    while let Some(d) = cur {
        if d.join(PROJECT_FILE).is_file() {
            return Ok(d.to_path_buf());
        }
        cur = d.parent();
    }
    Err(Error::Usage(format!(
        "no {PROJECT_FILE} found in '{}' or its parents; run `kbcrm init` to start a project, \
         or pass --project DIR",
        start.display()
    )))
}

/// Resolve the warehouse location to a URL ending in '/'.
pub fn resolve_warehouse(written: &str, root: &Path) -> Result<Url, String> {
    let w = written.trim();
    if w.is_empty() {
        return Err("the location is empty".into());
    }
    let mut url = if w.contains("://") {
        Url::parse(w).map_err(|e| format!("'{w}' is not a valid URL: {e}"))?
    } else {
        let p = Path::new(w);
        let abs = if p.is_absolute() {
            p.to_path_buf()
        } else {
            root.join(p)
        };
        let abs = std::path::absolute(&abs).map_err(|e| e.to_string())?;
        Url::from_directory_path(&abs).map_err(|_| format!("'{w}' is not a usable folder"))?
    };
    if !url.path().ends_with('/') {
        let p = format!("{}/", url.path());
        url.set_path(&p);
    }
    Ok(url)
}

/// Where OpenLineage events go.
#[derive(Debug, Clone)]
pub struct OpenLineageTarget {
    /// File to append to (absolute).
    pub file: Option<PathBuf>,
    /// Endpoint to POST to.
    pub url: Option<Url>,
    /// Variable holding a Bearer token.
    pub api_key_env: Option<String>,
    /// Job namespace.
    pub namespace: String,
}

/// Check a cron expression as `kbcrm schedule` reads it.
pub fn check_cron(expr: &str) -> Result<croner::Cron, String> {
    use std::str::FromStr;
    croner::Cron::from_str(expr).map_err(|e| {
        format!(
            "'{expr}' is not a cron expression ({e}); write minute hour day month weekday, \
             e.g. \"0 2 * * *\" for 02:00 every day"
        )
    })
}
