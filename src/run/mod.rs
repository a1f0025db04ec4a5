//! Running pipelines: the only sequencer. A pipeline run loads its sources, builds its models in
//! DAG order, checks its data tests and then commits every table it changed as one run.

mod progress;
mod quarantine;

use std::time::Instant;

use datafusion::prelude::SessionContext;
use futures::StreamExt;
use tracing::{info, instrument};

use crate::config::pipeline::{Severity, SourceFormat};
use crate::engine;
use crate::error::{Error, Result};
use crate::plan::{Model, Pipeline, Project, Source};
use crate::sources::{self, convert::declared_schema, stores::store_for};
use crate::warehouse::write::{NewData, TableWriter, stage};
use crate::warehouse::{Staged, Warehouse, commit_run, delta_compatible, files_provider};

pub use progress::Progress;
pub use quarantine::{QUARANTINE_TABLE, quarantine_schema};

/// How to run.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Files read at once per source; default the number of cores.
    pub parallel: Option<usize>,
}

/// What happened to one table in a run.
#[derive(Debug, Clone)]
pub struct TableReport {
    /// Table name.
    pub table: String,
    /// "source", "model" or "quarantine".
    pub kind: &'static str,
    /// Rows read (sources) or computed (models).
    pub rows_in: u64,
    /// Rows rejected to quarantine (sources).
    pub rows_rejected: u64,
    /// Rows in the files committed.
    pub rows_written: u64,
    /// Bytes committed.
    pub bytes_written: u64,
    /// Seconds spent.
    pub seconds: f64,
    /// Whether the table changed.
    pub changed: bool,
    /// Version after the run.
    pub version: Option<u64>,
}

/// Outcome of one data test.
#[derive(Debug, Clone)]
pub struct TestReport {
    /// Test name.
    pub name: String,
    /// Offending rows found.
    pub failures: u64,
    /// Its severity.
    pub severity: Severity,
}

/// What a pipeline run did.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// Run id (UUID v7).
    pub run_id: String,
    /// Pipeline name.
    pub pipeline: String,
    /// Per table, in the order they were built.
    pub tables: Vec<TableReport>,
    /// Data tests.
    pub tests: Vec<TestReport>,
    /// Seconds for the whole run.
    pub seconds: f64,
}

/// Runs pipelines of one project against one warehouse.
pub struct Runner<'a> {
    project: &'a Project,
    wh: Warehouse,
    options: RunOptions,
    progress: Progress,
}

/// Work in progress of one pipeline run: staged writes, reports, rejects.
struct RunState {
    run_id: String,
    staged: Vec<Staged>,
    tables: Vec<TableReport>,
    rejects: Vec<(String, sources::Reject)>,
}

impl<'a> Runner<'a> {
    /// A runner; completes any interrupted commit first.
    pub async fn new(
        project: &'a Project,
        options: RunOptions,
        progress: Progress,
    ) -> Result<Self> {
        let wh = Warehouse::open(&project.warehouse)?;
        for run in wh.recover().await? {
            info!(run_id = %run, "completed the commit of an interrupted run");
        }
        Ok(Runner {
            project,
            wh,
            options,
            progress,
        })
    }

    /// Run the named pipelines (all when empty), in dependency order.
    pub async fn run(&self, names: &[String]) -> Result<Vec<RunReport>> {
        for n in names {
            if self.project.pipeline(n).is_none() {
                let known: Vec<&str> = self
                    .project
                    .pipelines
                    .iter()
                    .map(|p| p.name.as_str())
                    .collect();
                return Err(Error::Usage(format!(
                    "no pipeline named '{n}'; the project has: {}",
                    known.join(", ")
                )));
            }
        }
        let mut reports = Vec::new();
        for p in &self.project.pipelines {
            if names.is_empty() || names.contains(&p.name) {
                reports.push(self.run_pipeline(p).await?);
            }
        }
        Ok(reports)
    }

    /// Run one pipeline and commit it.
    #[instrument(skip(self, pipeline), fields(pipeline = %pipeline.name))]
    pub async fn run_pipeline(&self, pipeline: &Pipeline) -> Result<RunReport> {
        let started = Instant::now();
        let ctx = engine::session(&self.project.engine)?;
        self.wh.register_all(&ctx).await?;
        let mut state = RunState {
            run_id: uuid::Uuid::now_v7().to_string(),
            staged: Vec::new(),
            tables: Vec::new(),
            rejects: Vec::new(),
        };
        info!(run_id = %state.run_id, "run started");
        let result = self.build(pipeline, &ctx, &mut state).await;
        let tests = match result {
            Ok(tests) => tests,
            Err(e) => {
                self.abort(&state).await;
                return Err(e);
            }
        };
        let versions =
            match commit_run(&self.wh, &state.run_id, &pipeline.name, &state.staged).await {
                Ok(v) => v,
                Err(e) => {
                    self.abort(&state).await;
                    return Err(e);
                }
            };
        for t in &mut state.tables {
            t.version = versions.get(&t.table).copied().or(t.version);
        }
        info!(run_id = %state.run_id, seconds = started.elapsed().as_secs_f64(), "run committed");
        Ok(RunReport {
            run_id: state.run_id,
            pipeline: pipeline.name.clone(),
            tables: state.tables,
            tests,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    async fn build(
        &self,
        pipeline: &Pipeline,
        ctx: &SessionContext,
        state: &mut RunState,
    ) -> Result<Vec<TestReport>> {
        for source in &pipeline.sources {
            self.load_source(source, ctx, state).await?;
        }
        if !state.rejects.is_empty() {
            let started = Instant::now();
            let rejects = std::mem::take(&mut state.rejects);
            let staged =
                quarantine::stage_rejects(&self.wh, ctx, &pipeline.name, &state.run_id, &rejects)
                    .await?;
            if let Some(staged) = staged {
                self.record(
                    ctx,
                    state,
                    staged,
                    "quarantine",
                    rejects.len() as u64,
                    0,
                    started,
                )
                .await?;
            }
        }
        for model in &pipeline.models {
            self.build_model(model, ctx, state).await?;
        }
        self.check_tests(pipeline, ctx).await
    }

    /// Delete the data files of writes that will not be committed.
    async fn abort(&self, state: &RunState) {
        for s in &state.staged {
            let adds: Vec<_> = s
                .actions
                .iter()
                .filter_map(|a| match a {
                    deltalake::kernel::Action::Add(add) => Some(add.clone()),
                    _ => None,
                })
                .collect();
            if let Err(e) = crate::warehouse::write::delete_files(&self.wh, &s.url, &adds).await {
                tracing::warn!(table = %s.table, error = %e, "could not remove uncommitted files");
            }
        }
    }

    #[instrument(skip_all, fields(source = %source.name, table = %source.table))]
    async fn load_source(
        &self,
        source: &Source,
        ctx: &SessionContext,
        state: &mut RunState,
    ) -> Result<()> {
        let started = Instant::now();
        let bar = self.progress.step(&format!("load {}", source.table));
        let store = store_for(&source.location.store_url)?;
        let files = match source.format {
            SourceFormat::Delta => Vec::new(),
            _ => sources::list_files(source, &store).await?,
        };
        let schema = declared_schema(&source.columns);
        let table_schema = delta_compatible(&schema);
        let parallel = self.options.parallel.unwrap_or_else(default_parallelism);
        let mut stream = match source.format {
            SourceFormat::Csv | SourceFormat::Json => {
                sources::read_text_files(source, store, files, schema.clone(), parallel)
            }
            SourceFormat::Parquet | SourceFormat::Delta => {
                sources::read_columnar(source, store, files, schema.clone())
            }
        };
        let url = self.wh.table_url(&source.table);
        let mut writer = TableWriter::new(&url, table_schema.clone())?;
        let (mut rows_read, mut rejected, mut bytes_read) = (0u64, 0u64, 0u64);
        while let Some(out) = stream.next().await {
            let out = out?;
            rows_read += out.rows_read;
            bytes_read += out.bytes_read;
            rejected += out.rejects.len() as u64;
            for b in &out.batches {
                writer.write(b).await?;
            }
            bar.inc(out.rows_read, out.bytes_read);
            state
                .rejects
                .extend(out.rejects.into_iter().map(|r| (source.name.clone(), r)));
        }
        let (adds, rows) = writer.finish().await?;
        if rows_read > 0 && rejected as f64 / rows_read as f64 > source.max_reject_ratio {
            crate::warehouse::write::delete_files(&self.wh, &url, &adds).await?;
            return Err(Error::DataQuality {
                pipeline: source.pipeline.clone(),
                message: format!(
                    "source '{}' rejected {rejected} of {rows_read} rows ({:.2}%), more than \
                     rejects.max_ratio {}; see the reasons with `kbcrm run` logs or raise the limit",
                    source.name,
                    100.0 * rejected as f64 / rows_read as f64,
                    source.max_reject_ratio
                ),
            });
        }
        info!(rows_read, rejected, bytes_read, "source read");
        let new = NewData {
            table: source.table.clone(),
            schema: table_schema,
            adds,
            rows,
        };
        let staged = stage(&self.wh, ctx, new, source.mode, &source.keys).await?;
        bar.finish();
        self.record(ctx, state, staged, "source", rows_read, rejected, started)
            .await
    }

    #[instrument(skip_all, fields(model = %model.name))]
    async fn build_model(
        &self,
        model: &Model,
        ctx: &SessionContext,
        state: &mut RunState,
    ) -> Result<()> {
        let started = Instant::now();
        let bar = self.progress.step(&format!("build {}", model.name));
        let model_err = |e: &dyn std::fmt::Display| Error::Model {
            model: model.name.clone(),
            file: model.file.clone(),
            message: e.to_string(),
        };
        let df = ctx.sql(&model.sql).await.map_err(|e| model_err(&e))?;
        let schema = delta_compatible(df.schema().as_arrow());
        let stream = df.execute_stream().await.map_err(|e| model_err(&e))?;
        let url = self.wh.table_url(&model.name);
        let mut writer = TableWriter::new(&url, schema.clone())?;
        writer
            .write_stream(stream)
            .await
            .map_err(|e| model_err(&e))?;
        let (adds, rows) = writer.finish().await?;
        let new = NewData {
            table: model.name.clone(),
            schema,
            adds,
            rows,
        };
        let staged = stage(&self.wh, ctx, new, model.mode, &model.keys)
            .await
            .map_err(|e| match e {
                Error::DataQuality { message, .. } => Error::DataQuality {
                    pipeline: model.pipeline.clone(),
                    message,
                },
                other => other,
            })?;
        bar.inc(rows, 0);
        bar.finish();
        self.record(ctx, state, staged, "model", rows, 0, started)
            .await
    }

    /// Keep a staged write, make its new state readable by later models, and report it.
    #[allow(clippy::too_many_arguments)]
    async fn record(
        &self,
        ctx: &SessionContext,
        state: &mut RunState,
        staged: Staged,
        kind: &'static str,
        rows_in: u64,
        rows_rejected: u64,
        started: Instant,
    ) -> Result<()> {
        if staged.changes() {
            let provider = files_provider(&staged.files, staged.schema.clone()).await?;
            ctx.deregister_table(&staged.table)?;
            ctx.register_table(&staged.table, provider)?;
        }
        let report = TableReport {
            table: staged.table.clone(),
            kind,
            rows_in,
            rows_rejected,
            rows_written: staged.metrics.rows_written,
            bytes_written: staged.metrics.bytes_written,
            seconds: started.elapsed().as_secs_f64(),
            changed: staged.changes(),
            version: staged.read_version,
        };
        self.progress.table_done(&report);
        state.tables.push(report);
        state.staged.push(staged);
        Ok(())
    }

    async fn check_tests(
        &self,
        pipeline: &Pipeline,
        ctx: &SessionContext,
    ) -> Result<Vec<TestReport>> {
        let mut reports = Vec::new();
        let mut failed = Vec::new();
        for t in &pipeline.tests {
            let df = ctx.sql(&t.query).await.map_err(|e| Error::DataQuality {
                pipeline: pipeline.name.clone(),
                message: format!("data test {} cannot run: {e}", t.name),
            })?;
            let failures = df.count().await? as u64;
            if failures > 0 {
                match t.severity {
                    Severity::Error => failed.push(format!("{} ({failures} failing)", t.name)),
                    Severity::Warn => {
                        tracing::warn!(test = %t.name, failures, "data test failed (severity warn)")
                    }
                }
            }
            reports.push(TestReport {
                name: t.name.clone(),
                failures,
                severity: t.severity,
            });
        }
        if !failed.is_empty() {
            return Err(Error::DataQuality {
                pipeline: pipeline.name.clone(),
                message: format!("data tests failed: {}", failed.join("; ")),
            });
        }
        Ok(reports)
    }
}

/// Cores available, at least 1.
pub fn default_parallelism() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
