//! From specs to a validated project: paths resolved, SQL read and parsed, the DAG ordered.
//!
//! A [`Project`] cannot be half-valid: loading collects every problem in every file and fails with
//! all of them, or returns a project whose pipelines, sources and models are ready to run.

pub mod dag;
pub mod location;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use url::Url;

use crate::config::pipeline::{
    IdentitySpec, IncrementalSpec, ModelEntry, ModelSpec, PipelineSpec, Severity, SourceFormat,
    SourceSpec, Survivorship, TestSpec, WriteMode,
};
use crate::config::project::parse_byte_size;
use crate::config::types::ColumnType;
use crate::config::{ProjectSpec, parse_yaml};
use crate::error::{Error, Position, Problem, Result};
use crate::identity::{Identity, RecordSource};

pub use location::Location;

/// Tables kbcrm itself writes, which models may read.
pub const BUILTIN_TABLES: &[&str] = &[
    "quarantine",
    "kbcrm_state",
    "kbcrm_loaded_files",
    "kbcrm_test_results",
    "model_evaluation",
];

/// The project file's name.
pub const PROJECT_FILE: &str = "kbcrm.yaml";

/// Settings that override the project file (environment, then command line).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// Warehouse location.
    pub warehouse: Option<String>,
    /// Engine memory limit, e.g. "2GiB".
    pub memory_limit: Option<String>,
}

impl Overrides {
    /// Read `KBCRM_WAREHOUSE` and `KBCRM_MEMORY_LIMIT`.
    pub fn from_env() -> Self {
        Overrides {
            warehouse: std::env::var("KBCRM_WAREHOUSE")
                .ok()
                .filter(|s| !s.is_empty()),
            memory_limit: std::env::var("KBCRM_MEMORY_LIMIT")
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
        self
    }
}

/// Engine settings after validation.
#[derive(Debug, Clone, Default)]
pub struct EngineSettings {
    /// Memory pool limit in bytes.
    pub memory_limit: Option<usize>,
    /// Spill folder.
    pub spill_dir: Option<PathBuf>,
    /// Plan parallelism.
    pub target_partitions: Option<usize>,
    /// Batch size.
    pub batch_size: Option<usize>,
    /// DataFusion settings passed through.
    pub datafusion: Vec<(String, String)>,
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
}

/// A validated pipeline.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// Name.
    pub name: String,
    /// Its file, relative to the project root.
    pub file: PathBuf,
    /// Cron schedule, when declared.
    pub schedule: Option<String>,
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

/// Options of a type-2 slowly changing dimension model.
#[derive(Debug, Clone)]
pub struct Scd2 {
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
    /// File format.
    pub format: SourceFormat,
    /// Where the files are.
    pub location: Location,
    /// Write mode.
    pub mode: WriteMode,
    /// Merge keys.
    pub keys: Vec<String>,
    /// Declared columns in order.
    pub columns: Vec<Column>,
    /// CSV options.
    pub csv: CsvSettings,
    /// Highest share of rejected rows before the run fails.
    pub max_reject_ratio: f64,
    /// What is new since the last run, when the source is incremental.
    pub incremental: Option<Incremental>,
}

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
    pub delimiter: u8,
    /// Quote character.
    pub quote: u8,
    /// First line is a header.
    pub header: bool,
    /// Values meaning null.
    pub null_values: Vec<String>,
}

impl Default for CsvSettings {
    fn default() -> Self {
        CsvSettings {
            delimiter: b',',
            quote: b'"',
            header: true,
            null_values: vec![String::new()],
        }
    }
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
    /// Write mode.
    pub mode: WriteMode,
    /// Merge keys.
    pub keys: Vec<String>,
    /// Tables it reads.
    pub depends_on: Vec<String>,
    /// The table whose new rows suffice to refresh it (merge models).
    pub incremental: Option<String>,
    /// Type-2 options (`mode: scd2`).
    pub scd2: Option<Scd2>,
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
    /// What failure means.
    pub severity: Severity,
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

fn valid_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn yaml_pos(loc: &serde_saphyr::Location, text: &str) -> Position {
    match loc.span().byte_offset() {
        Some(off) => {
            let mut p = Position::of_offset(text, off as usize, 0);
            p.len = loc.span().byte_len().unwrap_or(0) as usize;
            p
        }
        None => Position::of_line_col(text, loc.line() as usize, loc.column() as usize, 0),
    }
}

/// One pipeline file as read, before the cross-pipeline checks.
struct RawPipeline {
    file: PathBuf,
    text: Arc<String>,
    spec: PipelineSpec,
    name: String,
}

struct Loader {
    root: PathBuf,
    problems: Vec<Problem>,
    /// Tables each model reads, with positions in its SQL, for the graph check.
    model_refs: HashMap<String, Vec<dag::TableRef>>,
    /// (table, pipeline file, position, pipeline text) of each data test.
    test_positions: Vec<(String, PathBuf, Position, Arc<String>)>,
}

impl Loader {
    fn new(root: PathBuf) -> Self {
        Loader {
            root,
            problems: Vec::new(),
            model_refs: HashMap::new(),
            test_positions: Vec::new(),
        }
    }

    fn read(&mut self, rel: &Path) -> Option<Arc<String>> {
        match std::fs::read_to_string(self.root.join(rel)) {
            Ok(t) => Some(Arc::new(t)),
            Err(e) => {
                self.problems
                    .push(Problem::new(rel, format!("cannot read the file: {e}")));
                None
            }
        }
    }

    fn load(mut self, overrides: &Overrides) -> Result<Project> {
        let project_file = PathBuf::from(PROJECT_FILE);
        let text = self.read(&project_file).unwrap_or_default();
        let spec: ProjectSpec = parse_yaml(&project_file, &text).map_err(Error::invalid)?;
        let warehouse = self.warehouse(&spec, &text, overrides);
        let engine = self.engine(&spec, &text, overrides);
        let pipelines_dir = spec.pipelines.clone().unwrap_or_else(|| "pipelines".into());
        let raw = self.read_pipelines(Path::new(&pipelines_dir));
        let pipelines = self.build_pipelines(raw);
        if !self.problems.is_empty() {
            return Err(Error::Invalid(self.problems));
        }
        let name = spec.name.clone().unwrap_or_else(|| {
            self.root
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "kbcrm".into())
        });
        Ok(Project {
            root: self.root,
            name,
            warehouse: warehouse.expect("warehouse problems reported above"),
            engine,
            pipelines,
        })
    }

    fn warehouse(&mut self, spec: &ProjectSpec, text: &Arc<String>, o: &Overrides) -> Option<Url> {
        let (written, pos) = match (&o.warehouse, &spec.warehouse) {
            (Some(w), _) => (w.clone(), None),
            (None, Some(w)) => (w.value.clone(), Some(yaml_pos(&w.referenced, text))),
            (None, None) => ("warehouse/".to_string(), None),
        };
        match resolve_warehouse(&written, &self.root) {
            Ok(u) => Some(u),
            Err(msg) => {
                let mut p = Problem::new(PROJECT_FILE, format!("warehouse: {msg}"));
                if let Some(pos) = pos {
                    p = p.at(pos, text);
                }
                self.problems.push(p);
                None
            }
        }
    }

    fn engine(&mut self, spec: &ProjectSpec, text: &Arc<String>, o: &Overrides) -> EngineSettings {
        let e = &spec.engine;
        let memory_limit = match (&o.memory_limit, &e.memory_limit) {
            (Some(m), _) => parse_byte_size(m)
                .map_err(|msg| Problem::new("KBCRM_MEMORY_LIMIT / --memory-limit", msg)),
            (None, Some(m)) => parse_byte_size(&m.value).map_err(|msg| {
                Problem::new(PROJECT_FILE, format!("engine.memory_limit: {msg}"))
                    .at(yaml_pos(&m.referenced, text), text)
            }),
            (None, None) => Ok(0),
        };
        let memory_limit = match memory_limit {
            Ok(0) => None,
            Ok(n) => Some(n),
            Err(p) => {
                self.problems.push(p);
                None
            }
        };
        EngineSettings {
            memory_limit,
            spill_dir: e.spill_dir.as_ref().map(|d| self.root.join(d)),
            target_partitions: e.target_partitions,
            batch_size: e.batch_size,
            datafusion: spec
                .datafusion
                .iter()
                .map(|(k, v)| {
                    let v = match v {
                        serde_json::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    (k.clone(), v)
                })
                .collect(),
        }
    }

    fn read_pipelines(&mut self, dir: &Path) -> Vec<RawPipeline> {
        let abs = self.root.join(dir);
        let mut files: Vec<PathBuf> = match std::fs::read_dir(&abs) {
            Ok(rd) => rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
                .collect(),
            Err(e) => {
                self.problems.push(
                    Problem::new(dir, format!("cannot read the pipelines folder: {e}"))
                        .help("create it, or set `pipelines:` in kbcrm.yaml"),
                );
                return Vec::new();
            }
        };
        files.sort();
        let mut out = Vec::new();
        for path in files {
            let rel = path.strip_prefix(&self.root).unwrap_or(&path).to_path_buf();
            let Some(text) = self.read(&rel) else {
                continue;
            };
            match parse_yaml::<PipelineSpec>(&rel, &text) {
                Ok(spec) => {
                    let stem = rel.file_stem().map(|s| s.to_string_lossy().into_owned());
                    let name = spec.name.clone().or(stem).unwrap_or_default();
                    if !valid_identifier(&name) {
                        self.problems.push(Problem::new(
                            &rel,
                            format!(
                                "pipeline name '{name}' must be lowercase letters, digits and '_'"
                            ),
                        ));
                    }
                    out.push(RawPipeline {
                        file: rel,
                        text,
                        spec,
                        name,
                    });
                }
                Err(p) => self.problems.push(p),
            }
        }
        let mut seen: HashMap<String, PathBuf> = HashMap::new();
        for p in &out {
            if let Some(first) = seen.insert(p.name.clone(), p.file.clone()) {
                self.problems.push(Problem::new(
                    &p.file,
                    format!(
                        "pipeline '{}' is also defined in {}",
                        p.name,
                        first.display()
                    ),
                ));
            }
        }
        out
    }

    fn build_pipelines(&mut self, raw: Vec<RawPipeline>) -> Vec<Pipeline> {
        let mut pipelines = Vec::new();
        for r in &raw {
            let sources = r
                .spec
                .sources
                .iter()
                .filter_map(|(name, s)| self.source(r, name, &s.value, &s.referenced))
                .collect();
            let models = self.models(r);
            let tests = self.tests(r);
            let identities = r
                .spec
                .identity
                .iter()
                .filter_map(|(entity, spec)| {
                    self.identity(r, entity, &spec.value, &spec.referenced)
                })
                .collect();
            pipelines.push(Pipeline {
                name: r.name.clone(),
                file: r.file.clone(),
                schedule: r.spec.schedule.clone(),
                sources,
                models,
                tests,
                identities,
                steps: Vec::new(),
                vars: r
                    .spec
                    .vars
                    .iter()
                    .map(|(k, v)| {
                        let v = match v {
                            serde_json::Value::String(s) => s.clone(),
                            other => other.to_string(),
                        };
                        (k.clone(), v)
                    })
                    .collect(),
                depends_on: Vec::new(),
            });
        }
        self.check_graph(&raw, pipelines)
    }

    fn source(
        &mut self,
        r: &RawPipeline,
        name: &str,
        s: &SourceSpec,
        at: &serde_saphyr::Location,
    ) -> Option<Source> {
        let here = |msg: String, loc: &serde_saphyr::Location| {
            Problem::new(&r.file, msg).at(yaml_pos(loc, &r.text), &r.text)
        };
        let before = self.problems.len();
        if !valid_identifier(name) {
            self.problems.push(here(
                format!("source name '{name}' must be lowercase letters, digits and '_'"),
                at,
            ));
        }
        let table = match &s.table {
            Some(t) if !valid_identifier(&t.value) => {
                self.problems.push(here(
                    format!(
                        "table name '{}' must be lowercase letters, digits and '_'",
                        t.value
                    ),
                    &t.referenced,
                ));
                t.value.clone()
            }
            Some(t) => t.value.clone(),
            None => format!("raw_{}_{}", r.name, name),
        };
        let location = match Location::resolve(&s.location.value, &self.root) {
            Ok(l) => Some(l),
            Err(msg) => {
                self.problems.push(here(msg, &s.location.referenced));
                None
            }
        };
        let mut columns = Vec::new();
        for (col, c) in &s.schema.value {
            if !valid_identifier(col) {
                self.problems.push(here(
                    format!("column name '{col}' must be lowercase letters, digits and '_'"),
                    &s.schema.referenced,
                ));
            }
            let c = c.clone().into_full();
            if c.format.is_some() && !matches!(c.ty, ColumnType::Date | ColumnType::Timestamp) {
                self.problems.push(here(
                    format!("column '{col}': `format:` applies to date and timestamp columns only"),
                    &s.schema.referenced,
                ));
            }
            columns.push(Column {
                name: col.clone(),
                source_name: c.source.clone().unwrap_or_else(|| col.clone()),
                ty: c.ty,
                required: c.required,
                format: c.format,
            });
        }
        if columns.is_empty() {
            self.problems.push(here(
                format!("source '{name}' declares no columns under `schema:`"),
                &s.schema.referenced,
            ));
        }
        self.check_keys(r, &format!("source '{name}'"), s.mode, &s.keys, at, |k| {
            s.schema.value.contains_key(k)
        });
        if s.csv.is_some() && s.format != SourceFormat::Csv {
            self.problems.push(here(
                format!("source '{name}': `csv:` options need `format: csv`"),
                at,
            ));
        }
        let csv = s.csv.as_ref().map_or_else(CsvSettings::default, |o| {
            let mut c = CsvSettings::default();
            for (opt, v, slot) in [
                ("delimiter", o.delimiter, &mut c.delimiter),
                ("quote", o.quote, &mut c.quote),
            ] {
                if let Some(ch) = v {
                    if ch.is_ascii() {
                        *slot = ch as u8;
                    } else {
                        self.problems.push(here(
                            format!("source '{name}': csv {opt} must be one ASCII character"),
                            at,
                        ));
                    }
                }
            }
            c.header = o.header.unwrap_or(true);
            if let Some(n) = &o.null_values {
                c.null_values = n.clone();
            }
            c
        });
        let incremental = match &s.incremental {
            None => None,
            Some(IncrementalSpec::Files(_)) => Some(Incremental::NewFiles),
            Some(IncrementalSpec::Cursor(c)) => {
                if !s.schema.value.contains_key(c) {
                    self.problems.push(here(
                        format!(
                            "source '{name}': incremental cursor '{c}' is not among its columns"
                        ),
                        at,
                    ));
                }
                Some(Incremental::Cursor(c.clone()))
            }
        };
        if incremental.is_some() && s.mode == WriteMode::Overwrite {
            self.problems.push(here(
                format!(
                    "source '{name}': an incremental source adds to its table; use `mode: append` \
                     or `mode: merge` (with `keys:`)"
                ),
                at,
            ));
        }
        if incremental == Some(Incremental::NewFiles) && s.format == SourceFormat::Delta {
            self.problems.push(here(
                format!("source '{name}': `files: new` needs a file format; use `cursor:` for a Delta table"),
                at,
            ));
        }
        let max_reject_ratio = s.rejects.as_ref().map_or(0.05, |r| r.max_ratio);
        if !(0.0..=1.0).contains(&max_reject_ratio) {
            self.problems.push(here(
                format!("source '{name}': rejects.max_ratio must be between 0 and 1"),
                at,
            ));
        }
        if self.problems.len() > before {
            return None;
        }
        Some(Source {
            pipeline: r.name.clone(),
            name: name.to_string(),
            table,
            format: s.format,
            location: location?,
            mode: s.mode,
            keys: s.keys.clone(),
            columns,
            csv,
            max_reject_ratio,
            incremental,
        })
    }

    fn check_keys(
        &mut self,
        r: &RawPipeline,
        what: &str,
        mode: WriteMode,
        keys: &[String],
        at: &serde_saphyr::Location,
        known: impl Fn(&str) -> bool,
    ) {
        let problem = if mode == WriteMode::Merge && keys.is_empty() {
            Some(format!(
                "{what}: `mode: merge` needs `keys:` (the columns that identify a row)"
            ))
        } else if mode != WriteMode::Merge && !keys.is_empty() {
            Some(format!("{what}: `keys:` is only used with `mode: merge`"))
        } else {
            keys.iter()
                .find(|k| !known(k))
                .map(|k| format!("{what}: key column '{k}' is not among its columns"))
        };
        if let Some(msg) = problem {
            self.problems
                .push(Problem::new(&r.file, msg).at(yaml_pos(at, &r.text), &r.text));
        }
    }

    fn models(&mut self, r: &RawPipeline) -> Vec<Model> {
        let mut out = Vec::new();
        // A file named on its own (usually with options) is not taken again from a glob.
        let named: Vec<PathBuf> = r
            .spec
            .models
            .iter()
            .map(|e| match &e.value {
                ModelEntry::Path(p) => p.as_str(),
                ModelEntry::Full(m) => m.path.as_str(),
            })
            .filter(|p| !p.contains(['*', '?', '[', '{']))
            .map(PathBuf::from)
            .collect();
        for entry in &r.spec.models {
            let spec = match &entry.value {
                ModelEntry::Path(p) => ModelSpec {
                    path: p.clone(),
                    mode: WriteMode::Overwrite,
                    keys: Vec::new(),
                    incremental: None,
                    scd2: None,
                },
                ModelEntry::Full(m) => m.clone(),
            };
            let here = |msg: String| {
                Problem::new(&r.file, msg).at(yaml_pos(&entry.referenced, &r.text), &r.text)
            };
            let files = match expand_model_path(&self.root, &spec.path) {
                Ok(f) if f.is_empty() => {
                    self.problems
                        .push(here(format!("no SQL file matches '{}'", spec.path)));
                    continue;
                }
                Ok(f) if spec.path.contains(['*', '?', '[', '{']) => {
                    f.into_iter().filter(|p| !named.contains(p)).collect()
                }
                Ok(f) => f,
                Err(msg) => {
                    self.problems.push(here(msg));
                    continue;
                }
            };
            if let Some(msg) = model_options_problem(&spec) {
                self.problems.push(here(msg));
                continue;
            }
            if files.len() > 1 && matches!(spec.mode, WriteMode::Merge | WriteMode::Scd2) {
                self.problems.push(here(format!(
                    "'{}' matches {} files; `mode: merge` with `keys:` needs one model per entry",
                    spec.path,
                    files.len()
                )));
                continue;
            }
            for rel in files {
                let name = rel
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if !valid_identifier(&name) {
                    self.problems.push(Problem::new(
                        &rel,
                        format!(
                            "model file name '{name}' is the table it builds and must be \
                             lowercase letters, digits and '_'"
                        ),
                    ));
                    continue;
                }
                let Some(sql) = self.read(&rel) else { continue };
                match dag::parse_model_sql(&rel, &sql) {
                    Ok(refs) => out.push((
                        Model {
                            pipeline: r.name.clone(),
                            name,
                            file: rel,
                            sql,
                            mode: spec.mode,
                            keys: spec.keys.clone(),
                            depends_on: refs.iter().map(|t| t.name.clone()).collect(),
                            incremental: spec.incremental.clone(),
                            scd2: spec.scd2.as_ref().map(|s| Scd2 {
                                tracked: s.tracked.clone(),
                                valid_from: s.valid_from.clone(),
                                surrogate_key: s.surrogate_key.clone(),
                            }),
                        },
                        refs,
                    )),
                    Err(p) => self.problems.push(p),
                }
            }
        }
        // Positions of references are only needed for the graph check; keep them alongside.
        self.model_refs
            .extend(out.iter().map(|(m, refs)| (m.name.clone(), refs.clone())));
        out.into_iter().map(|(m, _)| m).collect()
    }

    fn identity(
        &mut self,
        r: &RawPipeline,
        entity: &str,
        spec: &IdentitySpec,
        at: &serde_saphyr::Location,
    ) -> Option<Identity> {
        let before = self.problems.len();
        let mut problem = |msg: String| {
            self.problems.push(
                Problem::new(&r.file, format!("identity '{entity}': {msg}"))
                    .at(yaml_pos(at, &r.text), &r.text),
            );
        };
        if !valid_identifier(entity) {
            problem("the entity name must be lowercase letters, digits and '_'".into());
        }
        let map_table = spec
            .map
            .clone()
            .unwrap_or_else(|| format!("map_{entity}_identity"));
        let golden_table = spec
            .golden
            .clone()
            .unwrap_or_else(|| format!("int_{entity}_golden"));
        for t in [&map_table, &golden_table] {
            if !valid_identifier(t) {
                problem(format!(
                    "table name '{t}' must be lowercase letters, digits and '_'"
                ));
            }
        }
        let sources: Vec<RecordSource> = spec
            .records
            .iter()
            .map(|(name, rec)| RecordSource {
                name: name.clone(),
                table: rec.table.clone(),
                id: rec.id.clone(),
                updated_at: rec.updated_at.clone(),
                fields: rec
                    .fields
                    .iter()
                    .map(|(f, c)| (f.clone(), c.clone()))
                    .collect(),
            })
            .collect();
        if sources.is_empty() {
            problem("`records:` names no source of records".into());
        }
        let known = |f: &str| sources.iter().any(|s| s.fields.iter().any(|(g, _)| g == f));
        if spec.rules.is_empty() {
            problem(
                "`rules:` is empty; add at least one rule such as { name: email, on: [email] }"
                    .into(),
            );
        }
        for rule in &spec.rules {
            if rule.on.is_empty() {
                problem(format!("rule '{}' matches on no field", rule.name));
            }
            if let Some(f) = rule.on.iter().find(|f| !known(f)) {
                problem(format!(
                    "rule '{}' uses field '{f}', which no record source lists under `fields:`",
                    rule.name
                ));
            }
        }
        for (field, s) in &spec.survivorship {
            if !known(field) {
                problem(format!(
                    "survivorship names field '{field}', which no record source lists"
                ));
            }
            if let Survivorship::Prefer(order) = s
                && let Some(x) = order.iter().find(|x| !spec.records.contains_key(*x))
            {
                problem(format!(
                    "survivorship of '{field}' prefers '{x}', which is not a record source"
                ));
            }
            if *s == Survivorship::MostRecent && sources.iter().all(|s| s.updated_at.is_none()) {
                problem(format!(
                    "survivorship of '{field}' is most_recent but no record source has `updated_at:`"
                ));
            }
        }
        for f in spec.normalize.keys() {
            if !known(f) {
                problem(format!(
                    "`normalize:` names field '{f}', which no record source lists"
                ));
            }
        }
        if self.problems.len() > before {
            return None;
        }
        Some(Identity {
            pipeline: r.name.clone(),
            entity: entity.to_string(),
            map_table,
            golden_table,
            id_column: format!("{entity}_id"),
            id_prefix: spec.id_prefix.clone().unwrap_or_else(|| {
                entity
                    .chars()
                    .next()
                    .map(|c| c.to_ascii_uppercase().to_string())
                    .unwrap_or_default()
            }),
            rules: spec
                .rules
                .iter()
                .map(|r| (r.name.clone(), r.on.clone()))
                .collect(),
            normalize: spec
                .normalize
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
            default_cc: spec
                .default_country_code
                .clone()
                .unwrap_or_else(|| "49".into())
                .trim_start_matches('+')
                .to_string(),
            survivorship: spec
                .survivorship
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            max_group: spec.max_group.unwrap_or(20),
            sources,
        })
    }

    fn tests(&mut self, r: &RawPipeline) -> Vec<DataTest> {
        r.spec
            .tests
            .iter()
            .map(|t| {
                let mut test = data_test(&t.value);
                test.name = format!(
                    "{} [{}:{}]",
                    test.name,
                    r.file.display(),
                    t.referenced.line()
                );
                self.test_positions.push((
                    test.table.clone(),
                    r.file.clone(),
                    yaml_pos(&t.referenced, &r.text),
                    r.text.clone(),
                ));
                test
            })
            .collect()
    }
}

impl Loader {
    /// Cross-file checks: one producer per table, every read table built somewhere, no cycles.
    /// Orders models and pipelines.
    fn check_graph(&mut self, raw: &[RawPipeline], mut pipelines: Vec<Pipeline>) -> Vec<Pipeline> {
        // table -> (pipeline, file)
        let mut producers: BTreeMap<String, (String, PathBuf)> = BTreeMap::new();
        let mut deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for p in &pipelines {
            let identity_outputs = p.identities.iter().flat_map(|i| {
                let inputs: Vec<String> = i.sources.iter().map(|s| s.table.clone()).collect();
                let mut golden_inputs = inputs.clone();
                golden_inputs.push(i.map_table.clone());
                [
                    (i.map_table.clone(), p.file.clone(), inputs),
                    (i.golden_table.clone(), p.file.clone(), golden_inputs),
                ]
            });
            let outputs = p
                .sources
                .iter()
                .map(|s| (s.table.clone(), p.file.clone(), Vec::new()))
                .chain(
                    p.models
                        .iter()
                        .map(|m| (m.name.clone(), m.file.clone(), m.depends_on.clone())),
                )
                .chain(identity_outputs)
                .collect::<Vec<_>>();
            for (table, file, d) in outputs {
                if let Some((_, first)) = producers.get(&table) {
                    self.problems.push(
                        Problem::new(
                            &file,
                            format!("table '{table}' is also built by {}", first.display()),
                        )
                        .help("every table has one source or model; rename one of them"),
                    );
                    continue;
                }
                producers.insert(table.clone(), (p.name.clone(), file));
                deps.insert(table, d);
            }
        }
        let names: Vec<&str> = producers.keys().map(String::as_str).collect();
        for p in &pipelines {
            for i in &p.identities {
                for s in &i.sources {
                    if !producers.contains_key(&s.table) {
                        self.problems.push(Problem::new(
                            &p.file,
                            format!(
                                "identity '{}': record source '{}' reads table '{}', which no source or model builds",
                                i.entity, s.name, s.table
                            ),
                        ));
                    }
                }
            }
            for m in &p.models {
                if let Some(t) = &m.incremental
                    && !m.depends_on.contains(t)
                {
                    self.problems.push(Problem::new(
                        &p.file,
                        format!(
                            "model '{}': `incremental: {t}` names a table its SQL does not read",
                            m.name
                        ),
                    ));
                }
                for r in self.model_refs.get(&m.name).into_iter().flatten() {
                    if !producers.contains_key(&r.name)
                        && !BUILTIN_TABLES.contains(&r.name.as_str())
                    {
                        let mut prob = Problem::new(
                            &m.file,
                            format!(
                                "model '{}' reads table '{}', which no source or model builds",
                                m.name, r.name
                            ),
                        );
                        if r.position.line > 0 {
                            prob = prob.at(r.position, &m.sql);
                        }
                        prob = prob.help(match closest(&r.name, &names) {
                            Some(c) => format!("did you mean '{c}'?"),
                            None => "add a source or a model that builds it".to_string(),
                        });
                        self.problems.push(prob);
                    }
                }
            }
        }
        for (table, file, pos, text) in std::mem::take(&mut self.test_positions) {
            if !table.is_empty() && !producers.contains_key(&table) {
                self.problems.push(
                    Problem::new(
                        &file,
                        format!("data test on table '{table}', which no source or model builds"),
                    )
                    .at(pos, &text),
                );
            }
        }
        for r in raw {
            for t in &r.spec.tests {
                if let TestSpec::Relationships(rel) = &t.value {
                    let target = rel.to.split_once('.').map(|(t, _)| t);
                    match target {
                        Some(tt) if producers.contains_key(tt) => {}
                        _ => self.problems.push(
                            Problem::new(
                                &r.file,
                                format!("relationships test: `to: {}` must name a built table and column as table.column", rel.to),
                            )
                            .at(yaml_pos(&t.referenced, &r.text), &r.text),
                        ),
                    }
                }
            }
        }
        let order = match dag::topo_order(&deps) {
            Ok(o) => o,
            Err(cycle) => {
                let file = producers
                    .get(&cycle[0])
                    .map(|(_, f)| f.clone())
                    .unwrap_or_default();
                let text = cycle
                    .iter()
                    .map(|t| match producers.get(t) {
                        Some((_, f)) => format!("{t} ({})", f.display()),
                        None => t.clone(),
                    })
                    .collect::<Vec<_>>()
                    .join(" -> ");
                self.problems.push(
                    Problem::new(
                        file,
                        format!("models depend on each other in a cycle: {text}"),
                    )
                    .help("a model cannot read, directly or through others, the table it builds"),
                );
                return pipelines;
            }
        };
        let rank: HashMap<&str, usize> = order
            .iter()
            .enumerate()
            .map(|(i, t)| (t.as_str(), i))
            .collect();
        for p in &mut pipelines {
            p.models
                .sort_by_key(|m| rank.get(m.name.as_str()).copied().unwrap_or(usize::MAX));
            let of = |t: &str| rank.get(t).copied().unwrap_or(usize::MAX);
            let mut steps: Vec<(usize, Step)> = p
                .models
                .iter()
                .enumerate()
                .map(|(i, m)| (of(&m.name), Step::Model(i)))
                .chain(
                    p.identities
                        .iter()
                        .enumerate()
                        .map(|(i, id)| (of(&id.map_table), Step::Identity(i))),
                )
                .collect();
            steps.sort_by_key(|(r, _)| *r);
            p.steps = steps.into_iter().map(|(_, s)| s).collect();
            let identity_inputs: Vec<String> = p
                .identities
                .iter()
                .flat_map(|i| i.sources.iter().map(|s| s.table.clone()))
                .collect();
            let mut up: Vec<String> = p
                .models
                .iter()
                .flat_map(|m| m.depends_on.iter())
                .chain(identity_inputs.iter())
                .filter_map(|t| producers.get(t).map(|(pl, _)| pl.clone()))
                .filter(|pl| *pl != p.name)
                .collect();
            up.sort();
            up.dedup();
            p.depends_on = up;
        }
        let graph: BTreeMap<String, Vec<String>> = pipelines
            .iter()
            .map(|p| (p.name.clone(), p.depends_on.clone()))
            .collect();
        match dag::topo_order(&graph) {
            Ok(order) => {
                let rank: HashMap<&str, usize> = order
                    .iter()
                    .enumerate()
                    .map(|(i, t)| (t.as_str(), i))
                    .collect();
                pipelines.sort_by_key(|p| rank.get(p.name.as_str()).copied().unwrap_or(usize::MAX));
            }
            Err(cycle) => self.problems.push(Problem::new(
                "pipelines/",
                format!(
                    "pipelines read each other's tables in a cycle: {}",
                    cycle.join(" -> ")
                ),
            )),
        }
        pipelines
    }
}

/// The known name closest to `name`, when it is close enough to be a typo.
fn closest<'a>(name: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (strsim::levenshtein(name, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min()
        .map(|(_, k)| k)
}

/// What is wrong with a model entry's options, if anything.
fn model_options_problem(spec: &ModelSpec) -> Option<String> {
    let what = format!("model '{}'", spec.path);
    match spec.mode {
        WriteMode::Merge | WriteMode::Scd2 if spec.keys.is_empty() => Some(format!(
            "{what}: `mode: {}` needs `keys:` (the columns that identify a row)",
            spec.mode.as_str()
        )),
        WriteMode::Overwrite | WriteMode::Append if !spec.keys.is_empty() => Some(format!(
            "{what}: `keys:` is only used with `mode: merge` or `mode: scd2`"
        )),
        WriteMode::Scd2 if spec.scd2.is_none() => Some(format!(
            "{what}: `mode: scd2` needs `scd2: {{ tracked: [columns] }}`"
        )),
        m if m != WriteMode::Scd2 && spec.scd2.is_some() => {
            Some(format!("{what}: `scd2:` options need `mode: scd2`"))
        }
        m if m != WriteMode::Merge && spec.incremental.is_some() => Some(format!(
            "{what}: `incremental:` needs `mode: merge` (new rows are merged by key)"
        )),
        _ => None,
    }
}

/// Expand a model path or glob relative to the project root into sorted relative file paths.
fn expand_model_path(root: &Path, pattern: &str) -> Result<Vec<PathBuf>, String> {
    if !pattern.contains(['*', '?', '[', '{']) {
        let rel = PathBuf::from(pattern);
        if !root.join(&rel).is_file() {
            return Err(format!("SQL file '{pattern}' does not exist"));
        }
        return Ok(vec![rel]);
    }
    let glob = globset::Glob::new(pattern)
        .map_err(|e| format!("invalid glob '{pattern}': {e}"))?
        .compile_matcher();
    let base: PathBuf = Path::new(pattern)
        .components()
        .take_while(|c| {
            !c.as_os_str()
                .to_string_lossy()
                .contains(['*', '?', '[', '{'])
        })
        .collect();
    let mut out = Vec::new();
    let mut stack = vec![root.join(&base)];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(rel) = p.strip_prefix(root)
                && glob.is_match(rel)
                && rel.extension().is_some_and(|e| e == "sql")
            {
                out.push(rel.to_path_buf());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The query of a data test: it returns the offending rows.
fn data_test(t: &TestSpec) -> DataTest {
    let quote_list = |cols: &[String]| cols.join(", ");
    match t {
        TestSpec::Unique(c) => DataTest {
            name: format!("unique({}: {})", c.table, quote_list(&c.columns)),
            table: c.table.clone(),
            query: format!(
                "select {cols}, count(*) as n from {t} group by {cols} having count(*) > 1",
                cols = quote_list(&c.columns),
                t = c.table
            ),
            severity: c.severity,
        },
        TestSpec::NotNull(c) => DataTest {
            name: format!("not_null({}: {})", c.table, quote_list(&c.columns)),
            table: c.table.clone(),
            query: format!(
                "select * from {} where {}",
                c.table,
                c.columns
                    .iter()
                    .map(|c| format!("{c} is null"))
                    .collect::<Vec<_>>()
                    .join(" or ")
            ),
            severity: c.severity,
        },
        TestSpec::AcceptedValues(a) => DataTest {
            name: format!("accepted_values({}.{})", a.table, a.column),
            table: a.table.clone(),
            query: format!(
                "select {c}, count(*) as n from {t} where {c} is not null and cast({c} as varchar) not in ({v}) group by {c}",
                c = a.column,
                t = a.table,
                v = a
                    .values
                    .iter()
                    .map(|v| format!("'{}'", v.replace('\'', "''")))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            severity: a.severity,
        },
        TestSpec::Relationships(r) => {
            let (to_table, to_col) = r.to.split_once('.').unwrap_or((r.to.as_str(), ""));
            DataTest {
                name: format!("relationships({}.{} -> {})", r.table, r.column, r.to),
                table: r.table.clone(),
                query: format!(
                    "select a.{c}, count(*) as n from {t} a left anti join {tt} b on a.{c} = b.{tc} \
                     where a.{c} is not null group by a.{c}",
                    c = r.column,
                    t = r.table,
                    tt = to_table,
                    tc = to_col
                ),
                severity: r.severity,
            }
        }
        TestSpec::Sql(s) => DataTest {
            name: format!("sql({})", s.name),
            table: String::new(),
            query: s.query.clone(),
            severity: s.severity,
        },
    }
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
