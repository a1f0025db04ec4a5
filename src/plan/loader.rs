//! Reading and checking each project file: the project file, pipelines, sources, models,
//! identity resolutions and data tests.

mod models;
mod sources;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use url::Url;

use super::identity::{Identity, RecordSource};
use crate::config::pipeline::{
    ConnectionFrom, ConnectionSpec, DeletesSpec, IdentitySpec, IncrementalSpec, ModelEntry,
    ModelSpec, PipelineSpec, SourceFormat, SourceSpec, Survivorship, WriteMode,
};
use crate::config::project::parse_byte_size;
use crate::config::types::ColumnType;
use crate::config::{ProjectSpec, parse_yaml};
use crate::error::{Error, Position, Problem, Result};
use crate::plan::MemoryPoolKind;

use super::data_tests::data_test;
use super::*;

/// A YAML setting's value as text: strings as they are, numbers and booleans as written.
fn setting_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn valid_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

pub(super) fn yaml_pos(loc: &serde_saphyr::Location, text: &str) -> Position {
    match loc.span().byte_offset() {
        Some(off) => {
            let mut p = Position::of_offset(text, off as usize, 0);
            p.len = loc.span().byte_len().unwrap_or(0) as usize;
            p
        }
        None => Position::of_line_col(text, loc.line() as usize, loc.column() as usize, 0),
    }
}

/// Where key `key` of the mapping at `map` is written: the first line from the mapping's start
/// on that holds the key followed by `:` (bare or quoted). The mapping's own place when not
/// found (a flow mapping of many keys on one line is found on that line too).
pub(super) fn key_pos(map: &serde_saphyr::Location, text: &str, key: &str) -> Position {
    let start = yaml_pos(map, text);
    let spellings = [
        format!("{key}:"),
        format!("\"{}\":", key.replace('"', "\\\"")),
        format!("'{}':", key.replace('\'', "''")),
    ];
    let mut offset = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        if i + 1 >= start.line {
            let mut from = if i + 1 == start.line {
                start.column.saturating_sub(1).min(line.len())
            } else {
                0
            };
            while let Some(found) = spellings
                .iter()
                .filter_map(|s| line[from..].find(s.as_str()).map(|at| (at, s.len())))
                .min()
            {
                let at = from + found.0;
                // A key begins its line's text, or follows `{`, `,` or a space.
                let before = line[..at].chars().last();
                if before.is_none_or(|c| c == ' ' || c == '{' || c == ',' || c == '\t') {
                    let mut p = Position::of_offset(text, offset + at, 0);
                    p.len = key.len();
                    return p;
                }
                from = at + 1;
            }
        }
        offset += line.len();
    }
    start
}

/// Where the block-mapping key path `keys` (`["serve", "listen"]`) is written: each key found on
/// a line below the one before it, more indented than it. `None` when it is not written so.
pub(super) fn path_pos(text: &str, keys: &[&str]) -> Option<Position> {
    let mut offset = 0;
    let mut next = 0;
    let mut indent: Option<usize> = None;
    for line in text.split_inclusive('\n') {
        let body = line.trim_end_matches(['\n', '\r']);
        let depth = body.len() - body.trim_start_matches(' ').len();
        let key = keys.get(next)?;
        let rest = &body[depth..];
        let named = [key.to_string(), format!("\"{key}\""), format!("'{key}'")]
            .iter()
            .any(|k| rest.starts_with(&format!("{k}:")));
        // A line back at (or out of) the parent's depth ends the parent's block.
        if let Some(parent) = indent
            && !body.trim().is_empty()
            && depth <= parent
            && !named
        {
            return None;
        }
        if named && indent.is_none_or(|parent| depth > parent) {
            if next + 1 == keys.len() {
                let mut p = Position::of_offset(text, offset + depth, 0);
                p.len = key.len();
                return Some(p);
            }
            next += 1;
            indent = Some(depth);
        }
        offset += line.len();
    }
    None
}

/// One pipeline file as read, before the cross-pipeline checks.
pub(super) struct RawPipeline {
    pub(super) file: PathBuf,
    pub(super) text: Arc<String>,
    pub(super) spec: PipelineSpec,
    pub(super) name: String,
}

impl RawPipeline {
    /// A problem at `loc` in the pipeline file.
    pub(super) fn here(&self, msg: String, loc: &serde_saphyr::Location) -> Problem {
        Problem::new(&self.file, msg).at(yaml_pos(loc, &self.text), &self.text)
    }
}

pub(super) struct Loader {
    pub(super) root: PathBuf,
    pub(super) problems: Vec<Problem>,
    /// Tables each model reads, with positions in its SQL, for the graph check.
    pub(super) model_refs: HashMap<String, Vec<dag::TableRef>>,
    /// (table, pipeline file, position, pipeline text) of each data test.
    pub(super) test_positions: Vec<(String, PathBuf, Position, Arc<String>)>,
}

impl Loader {
    pub(super) fn new(root: PathBuf) -> Self {
        Loader {
            root,
            problems: Vec::new(),
            model_refs: HashMap::new(),
            test_positions: Vec::new(),
        }
    }

    fn read(&mut self, rel: &Path) -> Option<Arc<String>> {
        let path = self.root.join(rel);
        let limit = max_file_bytes();
        if let Ok(meta) = std::fs::metadata(&path)
            && meta.len() > limit
        {
            self.problems.push(Problem::new(
                rel,
                format!(
                    "the file is {} bytes, more than the {limit} a project file may have; a \
                     pipeline, kbcrm.yaml or SQL model is text a person writes (data goes in the \
                     files a source reads). Raise the limit with {MAX_FILE_BYTES_ENV} if it must \
                     be this large",
                    meta.len()
                ),
            ));
            return None;
        }
        match std::fs::read_to_string(path) {
            Ok(t) => Some(Arc::new(t)),
            Err(e) => {
                self.problems
                    .push(Problem::new(rel, format!("cannot read the file: {e}")));
                None
            }
        }
    }

    pub(super) fn load(mut self, overrides: &Overrides) -> Result<Project> {
        let project_file = PathBuf::from(PROJECT_FILE);
        let text = self.read(&project_file).unwrap_or_default();
        let spec: ProjectSpec = parse_yaml(&project_file, &text).map_err(Error::Invalid)?;
        let warehouse = self.warehouse(&spec, &text, overrides);
        let storage = self.storage(&spec, &text);
        let engine = self.engine(&spec, &text, overrides);
        let access = super::access::build(&spec, &text, &self.root, &mut self.problems);
        let pipelines_dir = spec.pipelines.clone().unwrap_or_else(|| "pipelines".into());
        let raw = self.read_pipelines(Path::new(&pipelines_dir));
        let pipelines = self.build_pipelines(raw);
        let name = spec.name.clone().unwrap_or_else(|| {
            self.root
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "kbcrm".into())
        });
        let extracts =
            super::extracts::build(&spec, &text, &self.root, &name, &access, &mut self.problems);
        let timezone = match &spec.timezone {
            None => chrono_tz::Tz::UTC,
            Some(tz) => tz.value.parse().unwrap_or_else(|_| {
                self.problems.push(
                    Problem::new(
                        PROJECT_FILE,
                        format!(
                            "timezone: '{}' is not a time zone; write an IANA name such as \
                             Europe/Berlin or UTC",
                            tz.value
                        ),
                    )
                    .at(yaml_pos(&tz.referenced, &text), &text),
                );
                chrono_tz::Tz::UTC
            }),
        };
        let openlineage = spec.openlineage.as_ref().and_then(|o| {
            let url = match o.url.as_deref().map(Url::parse) {
                Some(Ok(u)) if matches!(u.scheme(), "http" | "https") => Some(u),
                Some(_) => {
                    self.problems.push(Problem::new(
                        PROJECT_FILE,
                        format!(
                            "openlineage.url: '{}' is not an http(s) URL; write e.g. \
                             http://localhost:5000/api/v1/lineage",
                            o.url.as_deref().unwrap_or_default()
                        ),
                    ));
                    None
                }
                None => None,
            };
            if o.file.is_none() && o.url.is_none() {
                self.problems.push(Problem::new(
                    PROJECT_FILE,
                    "openlineage: give a `file:` or a `url:` for the events".to_string(),
                ));
                return None;
            }
            Some(OpenLineageTarget {
                file: o.file.as_ref().map(|f| self.root.join(f)),
                url,
                api_key_env: o.api_key_env.clone(),
                namespace: o.namespace.clone().unwrap_or_else(|| name.clone()),
            })
        });
        let vacuum = self.vacuum(&spec, &text);
        if !self.problems.is_empty() {
            return Err(Error::Invalid(self.problems));
        }
        crate::storage::configure(storage);
        Ok(Project {
            root: self.root,
            name,
            warehouse: warehouse.expect("warehouse problems reported above"),
            engine,
            pipelines,
            access,
            extracts,
            timezone,
            openlineage,
            vacuum,
        })
    }

    /// `maintenance.vacuum`: its cron expression and retention, each checked.
    fn vacuum(
        &mut self,
        spec: &ProjectSpec,
        text: &Arc<String>,
    ) -> Option<(String, std::time::Duration)> {
        let v = spec.maintenance.vacuum.as_ref()?;
        let mut problem = |msg: String, at: &serde_saphyr::Location| {
            self.problems
                .push(Problem::new(PROJECT_FILE, msg).at(yaml_pos(at, text), text));
        };
        if let Err(msg) = super::check_cron(&v.schedule.value) {
            problem(
                format!("maintenance.vacuum.schedule: {msg}"),
                &v.schedule.referenced,
            );
        }
        let retain = match &v.retain {
            None => super::DEFAULT_RETAIN,
            Some(r) => match super::access::parse_duration(&r.value) {
                Ok(d) => d.unwrap_or_default(),
                Err(msg) => {
                    problem(format!("maintenance.vacuum.retain: {msg}"), &r.referenced);
                    super::DEFAULT_RETAIN
                }
            },
        };
        Some((v.schedule.value.clone(), retain))
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

    /// kbcrm.yaml's `storage:` settings with the environment variables they name read. Its
    /// problems name the line but do not show it or its neighbours: they may hold a secret.
    fn storage(&mut self, spec: &ProjectSpec, text: &Arc<String>) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for (key, value) in &spec.storage {
            let key = key.to_ascii_lowercase();
            let at = yaml_pos(&value.referenced, text);
            if let Some(name) = key.strip_suffix("_env") {
                match std::env::var(&value.value) {
                    Ok(v) => {
                        out.insert(name.to_string(), v);
                    }
                    Err(_) => {
                        let mut p = Problem::new(
                            PROJECT_FILE,
                            format!(
                                "storage.{key}: the environment variable {} is not set; set it \
                                 to the {name} before running kbcrm",
                                value.value
                            ),
                        );
                        p.position = Some(at);
                        self.problems.push(p);
                    }
                }
            } else if is_credential(&key) {
                let mut p = Problem::new(
                    PROJECT_FILE,
                    format!(
                        "storage.{key}: credentials are not written in kbcrm.yaml; put the \
                         value in an environment variable and write `{key}_env: VARIABLE`"
                    ),
                );
                p.position = Some(at);
                self.problems.push(p);
            } else {
                out.insert(key, value.value.clone());
            }
        }
        out
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
        let cluster = self.cluster(spec, text, o);
        let rollups = match o.rollups.as_deref().map(str::trim) {
            None => e.rollups.unwrap_or(true),
            Some("on" | "true" | "1") => true,
            Some("off" | "false" | "0") => false,
            Some(other) => {
                self.problems.push(Problem::new(
                    "KBCRM_ROLLUPS",
                    format!("'{other}' is neither on nor off"),
                ));
                true
            }
        };
        let memory_pool = match o.memory_pool.as_deref() {
            Some(kind) => kind
                .parse::<MemoryPoolKind>()
                .map_err(|msg| self.problems.push(Problem::new("KBCRM_MEMORY_POOL", msg)))
                .ok(),
            None => e.memory_pool,
        };
        EngineSettings {
            rollups,
            cluster,
            memory_limit,
            memory_pool,
            spill_dir: e.spill_dir.as_ref().map(|d| self.root.join(d)),
            target_partitions: e.target_partitions,
            threads: e.threads,
            batch_size: e.batch_size,
            datafusion: spec
                .datafusion
                .iter()
                .map(|(k, v)| (k.clone(), setting_text(v)))
                .collect(),
        }
    }

    /// `engine.kind` / `engine.scheduler`, or `--engine` / `KBCRM_ENGINE`.
    fn cluster(
        &mut self,
        spec: &ProjectSpec,
        text: &Arc<String>,
        o: &Overrides,
    ) -> Option<Cluster> {
        let e = &spec.engine;
        let (cluster, problem) = match &o.engine {
            Some(written) => match written.trim() {
                "local" => (None, None),
                "ballista" => (Some(Cluster::Standalone), None),
                url if url.starts_with("df://") => {
                    (Some(Cluster::Scheduler(url.to_string())), None)
                }
                other => (
                    None,
                    Some(Problem::new(
                        "KBCRM_ENGINE / --engine",
                        format!(
                            "'{other}' is not an engine; write local, ballista (a cluster in \
                             this process) or a scheduler URL such as df://scheduler:50050"
                        ),
                    )),
                ),
            },
            None => match (e.kind.as_ref().map(|k| k.value.as_str()), &e.scheduler) {
                (None | Some("local"), None) => (None, None),
                (Some("ballista"), None) => (Some(Cluster::Standalone), None),
                (Some("ballista"), Some(s)) if s.value.starts_with("df://") => {
                    (Some(Cluster::Scheduler(s.value.clone())), None)
                }
                (_, Some(s)) if !s.value.starts_with("df://") => (
                    None,
                    Some(
                        Problem::new(
                            PROJECT_FILE,
                            format!(
                                "engine.scheduler: '{}' is not a scheduler URL; write e.g. \
                                 df://scheduler:50050",
                                s.value
                            ),
                        )
                        .at(yaml_pos(&s.referenced, text), text),
                    ),
                ),
                (None | Some("local"), Some(s)) => (
                    None,
                    Some(
                        Problem::new(
                            PROJECT_FILE,
                            "engine.scheduler is set but engine.kind is not ballista; add \
                             `kind: ballista`"
                                .to_string(),
                        )
                        .at(yaml_pos(&s.referenced, text), text),
                    ),
                ),
                (Some(other), _) => {
                    let k = e.kind.as_ref().expect("matched Some");
                    (
                        None,
                        Some(
                            Problem::new(
                                PROJECT_FILE,
                                format!(
                                    "engine.kind: '{other}' is not an engine; write local or \
                                     ballista"
                                ),
                            )
                            .at(yaml_pos(&k.referenced, text), text),
                        ),
                    )
                }
            },
        };
        if let Some(p) = problem {
            self.problems.push(p);
        }
        if cluster.is_some() && !cfg!(feature = "ballista") {
            self.problems.push(Problem::new(
                PROJECT_FILE,
                "engine: this kbcrm was built without the `ballista` feature; rebuild it with \
                 `--features ballista` or use the local engine"
                    .to_string(),
            ));
            return None;
        }
        cluster
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
                    if spec.sources.is_empty()
                        && spec.models.is_empty()
                        && spec.identity.is_empty()
                        && spec.tests.is_empty()
                    {
                        let start = Position {
                            line: 1,
                            column: 1,
                            offset: 0,
                            len: 0,
                        };
                        self.problems.push(
                            Problem::new(
                                &rel,
                                "the pipeline declares nothing: no sources, models, identity or \
                                 tests; fill it in or delete the file",
                            )
                            .at(start, &text),
                        );
                        continue;
                    }
                    out.push(RawPipeline {
                        file: rel,
                        text,
                        spec,
                        name,
                    });
                }
                Err(ps) => self.problems.extend(ps),
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
            let at = |loc: &serde_saphyr::Location| yaml_pos(loc, &r.text);
            if let Some(c) = &r.spec.schedule
                && let Err(msg) = check_cron(&c.value)
            {
                self.problems.push(
                    Problem::new(&r.file, format!("schedule: {msg}"))
                        .at(at(&c.referenced), &r.text),
                );
            }
            let retry_delay = match &r.spec.retry_delay {
                None => std::time::Duration::from_secs(60),
                Some(d) => match super::access::parse_duration(&d.value) {
                    Ok(v) => v.unwrap_or_default(),
                    Err(msg) => {
                        self.problems.push(
                            Problem::new(&r.file, format!("retry_delay: {msg}"))
                                .at(at(&d.referenced), &r.text),
                        );
                        std::time::Duration::ZERO
                    }
                },
            };
            pipelines.push(Pipeline {
                name: r.name.clone(),
                file: r.file.clone(),
                schedule: r.spec.schedule.as_ref().map(|s| s.value.clone()),
                retries: r.spec.retries.unwrap_or(0),
                retry_delay,
                misfire: r.spec.misfire.unwrap_or_default(),
                sources,
                models,
                tests,
                identities,
                steps: Vec::new(),
                vars: r
                    .spec
                    .vars
                    .iter()
                    .map(|(k, v)| (k.clone(), setting_text(v)))
                    .collect(),
                depends_on: Vec::new(),
            });
        }
        self.check_graph(&raw, pipelines)
    }
}

/// The environment variable that sets the largest project file kbcrm reads, in bytes.
pub const MAX_FILE_BYTES_ENV: &str = "KBCRM_MAX_FILE_BYTES";

/// The largest project file (kbcrm.yaml, a pipeline, an SQL model) read: 8 MiB, or
/// [`MAX_FILE_BYTES_ENV`].
fn max_file_bytes() -> u64 {
    std::env::var(MAX_FILE_BYTES_ENV)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(8 << 20)
}

/// How a model's table is written, from its options; the problem when they do not fit together.
fn model_write(spec: &ModelSpec) -> std::result::Result<ModelWrite, String> {
    let what = format!("model '{}'", spec.path);
    let keyed = matches!(spec.mode, WriteMode::Merge | WriteMode::Scd2);
    let problem = match spec.mode {
        _ if keyed && spec.keys.is_empty() => Some(format!(
            "{what}: `mode: {}` needs `keys:` (the columns that identify a row)",
            spec.mode.as_str()
        )),
        _ if !keyed && !spec.keys.is_empty() => Some(format!(
            "{what}: `keys:` is only used with `mode: merge` or `mode: scd2`"
        )),
        WriteMode::Scd2 if spec.scd2.is_none() => Some(format!(
            "{what}: `mode: scd2` needs `scd2: {{ tracked: [columns] }}`"
        )),
        m if m != WriteMode::Scd2 && spec.scd2.is_some() => {
            Some(format!("{what}: `scd2:` options need `mode: scd2`"))
        }
        _ if !keyed && spec.incremental.is_some() => Some(format!(
            "{what}: `incremental:` needs `mode: merge` or `mode: scd2` (new rows are merged by \
             key)"
        )),
        m if spec.rollup && m != WriteMode::Overwrite => Some(format!(
            "{what}: a rollup is rebuilt whole (`mode: overwrite`, the default), so that it \
             always sums every row of its tables"
        )),
        _ if spec
            .incremental
            .as_ref()
            .is_some_and(|i| i.tables.is_empty()) =>
        {
            Some(format!(
                "{what}: `incremental:` lists no table; name the tables whose new rows refresh it"
            ))
        }
        _ => None,
    };
    if let Some(problem) = problem {
        return Err(problem);
    }
    let keys = spec.keys.clone();
    Ok(match (spec.mode, &spec.scd2) {
        (WriteMode::Overwrite, _) => ModelWrite::Table(Write::Overwrite),
        (WriteMode::Append, _) => ModelWrite::Table(Write::Append),
        (WriteMode::Merge, _) => ModelWrite::Table(Write::Merge { keys }),
        (WriteMode::Scd2, Some(s)) => ModelWrite::Scd2(Scd2 {
            keys,
            tracked: s.tracked.clone(),
            valid_from: s.valid_from.clone(),
            surrogate_key: s.surrogate_key.clone(),
        }),
        (WriteMode::Scd2, None) => {
            return Err(format!(
                "{what}: `mode: scd2` needs `scd2: {{ tracked: [columns] }}`"
            ));
        }
    })
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

/// Whether an object-store setting holds a credential (kept out of kbcrm.yaml).
fn is_credential(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    if key.ends_with("kms_key_id") || key.contains("sse_") {
        return false;
    }
    ["secret", "key", "token", "password", "sas"]
        .iter()
        .any(|w| key.contains(w))
}

#[cfg(test)]
mod tests;
