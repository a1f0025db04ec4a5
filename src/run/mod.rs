//! Running pipelines: the only sequencer. A pipeline run loads its sources, builds its models
//! and identity resolutions in DAG order, checks each data test once the tables it reads are
//! built, and then commits every table it changed, with the bookkeeping that describes them (cursors, loaded files), as one run.
//!
//! Owns the run lock, pending commits' recovery, data tests, backfills, [`lineage`] and
//! [`validate`]. May import every stage and everything below; only the faces import it.

pub mod backfill;
mod board;
mod database;
pub mod lineage;
mod lock;
mod model;
mod places;
mod progress;
mod quarantine;
mod source;
mod steps;
pub mod validate;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use datafusion::prelude::SessionContext;
use tracing::{Instrument, info, instrument};

use crate::config::pipeline::{Severity, WriteMode};
use crate::engine;
use crate::error::{Error, Result};
use crate::identity::IdentityStats;
use crate::plan::{Pipeline, Project, Step};
use crate::sources;
use crate::warehouse::history::{RunKind, RunRecord, RunStatus, TableRecord};
use crate::warehouse::state::{self, StateKey};
use crate::warehouse::{DataFile, Staged, Warehouse, commit_run, file_url, table_files_provider};
use deltalake::kernel::Action;
use steps::Work;

pub use progress::Progress;
pub use quarantine::{QUARANTINE_TABLE, quarantine_schema};

/// How to run.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Files read at once per source; default the number of cores.
    pub parallel: Option<usize>,
    /// Steps of a pipeline run at once (sources loaded, models and identities built, each as
    /// soon as what it reads is built); default `engine.threads`, else the number of cores.
    pub threads: Option<usize>,
    /// Ignore cursors, loaded files and up-to-date models: reload and rebuild everything.
    pub full_refresh: bool,
    /// The date the run is as of (`kbcrm_as_of()` in SQL); default today.
    pub as_of: Option<chrono::NaiveDate>,
    /// What started the run, for the run history; default `cli`.
    pub trigger: Option<String>,
}

/// What happened to one table in a run.
#[derive(Debug, Clone)]
pub struct TableReport {
    /// Table name.
    pub table: String,
    /// "source", "model", "identity", "quarantine" or "state".
    pub kind: &'static str,
    /// Rows read (sources) or computed (models).
    pub rows_in: u64,
    /// Rows rejected to quarantine (sources).
    pub rows_rejected: u64,
    /// Rows in the files committed (new or changed rows for merges).
    pub rows_written: u64,
    /// Bytes committed.
    pub bytes_written: u64,
    /// Seconds spent.
    pub seconds: f64,
    /// Whether the table changed.
    pub changed: bool,
    /// Version after the run.
    pub version: Option<u64>,
    /// Why nothing was done, when nothing was: "no new files", "up to date".
    pub skipped: Option<&'static str>,
    /// Files at a source's location it did not read, each "name (why)".
    pub files_skipped: Vec<String>,
}

pub use crate::warehouse::state::{Checked, TestReport};

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
    /// Identity resolutions.
    pub identities: Vec<IdentityStats>,
    /// Seconds for the whole run.
    pub seconds: f64,
}

/// How a step that staged a write went, for its [`TableReport`].
struct StepFigures {
    /// What built the table: "source", "model", "identity", "quarantine", "state".
    kind: &'static str,
    /// Rows read.
    rows_in: u64,
    /// Rows rejected to the quarantine.
    rows_rejected: u64,
    /// When the step started.
    started: Instant,
}

/// Runs pipelines of one project against one warehouse.
#[derive(Clone)]
pub struct Runner {
    project: Arc<Project>,
    wh: Warehouse,
    options: RunOptions,
    progress: Progress,
    /// Memory pool and spill folder of every pipeline's session: pipelines running side by
    /// side share the memory limit.
    runtime: Arc<datafusion::execution::runtime_env::RuntimeEnv>,
    _lock: Option<Arc<lock::RunLock>>,
}

/// Work in progress of one pipeline run.
struct RunState {
    run_id: String,
    /// Start of the run, µs since the epoch (the SCD2 change time when none is given).
    run_micros: i64,
    staged: Vec<Staged>,
    tables: Vec<TableReport>,
    rejects: Vec<(String, sources::Reject)>,
    identities: Vec<IdentityStats>,
    /// Committed versions of every warehouse table at the start of the run.
    committed: HashMap<String, Option<u64>>,
    /// kbcrm_state as committed, and the entries this run sets.
    state_before: HashMap<StateKey, String>,
    state_after: HashMap<StateKey, String>,
    /// (pipeline, source, file, size) loaded in this run.
    loaded_files: Vec<(String, String, String, u64)>,
    /// Per source table, the files at its location it skipped ("name (why)").
    skipped_files: HashMap<String, Vec<String>>,
    /// The data tests checked, by their index in the pipeline.
    tests: Vec<(usize, TestChecked)>,
    /// The as-of date and variables the SQL sees.
    params: crate::engine::udf::RunParams,
    /// A session on the project's Ballista cluster, when it has one: the models' SQL runs
    /// there, over the same table versions (committed, then this run's staged ones).
    cluster: Option<SessionContext>,
    /// The run's place on the board of pipelines building side by side, when it has one.
    board: Option<board::BoardView>,
    /// Writes of pipelines before this one that it read before they committed: this run reads
    /// them as if committed, and does not commit them.
    upstream: Vec<Staged>,
}

impl RunState {
    /// The version a table will have once this run commits.
    fn version_after(&self, table: &str) -> Option<u64> {
        match self.staged(table) {
            Some(s) if s.changes() => Some(s.read_version.map_or(0, |v| v + 1)),
            Some(s) => s.read_version,
            None => self.committed.get(table).copied().flatten(),
        }
    }

    /// The staged write of `table` this run reads: its own, or an upstream pipeline's.
    fn staged(&self, table: &str) -> Option<&Staged> {
        self.own_staged(table)
            .or_else(|| self.upstream.iter().find(|s| s.table == table))
    }

    /// This run's own staged write of `table`.
    fn own_staged(&self, table: &str) -> Option<&Staged> {
        self.staged.iter().rev().find(|s| s.table == table)
    }
}

/// Resolves to whether a pipeline run beside others committed.
type Committed = futures::future::Shared<futures::future::BoxFuture<'static, bool>>;

/// When a pipeline run beside others may build and commit (the default: at once).
#[derive(Default)]
struct Turn {
    /// Read while building; written to build again alone.
    alone: Option<Arc<tokio::sync::RwLock<()>>>,
    /// Whether the pipeline before this one in the order committed.
    previous: Option<Committed>,
    /// The pipeline's place on the board of the run's staged tables.
    board: Option<board::BoardView>,
    /// Whether each pipeline it reads from committed.
    upstream: Vec<Committed>,
}

impl Turn {
    /// Wait until the pipeline may build beside the others; hold what is returned while
    /// building.
    async fn building(&self) -> impl Sized {
        match &self.alone {
            Some(a) => Some(a.clone().read_owned().await),
            None => None,
        }
    }

    /// Whether other pipelines may build at the same time.
    fn beside_others(&self) -> bool {
        self.alone.is_some()
    }

    /// Wait until no other pipeline builds; none starts building while this is held.
    async fn alone(&self) -> Option<tokio::sync::OwnedRwLockWriteGuard<()>> {
        match &self.alone {
            Some(a) => Some(a.clone().write_owned().await),
            None => None,
        }
    }

    /// Wait for the pipeline before this one; whether it committed.
    async fn previous_committed(&self) -> bool {
        match &self.previous {
            Some(p) => p.clone().await,
            None => true,
        }
    }

    /// Wait for the pipelines this one reads from; whether they all committed.
    async fn upstream_committed(&self) -> bool {
        futures::future::join_all(self.upstream.iter().cloned())
            .await
            .into_iter()
            .all(|ok| ok)
    }

    /// Whether the pipeline reads tables of others before they commit, and one of those
    /// failed or builds again alone: it then builds again once they committed.
    fn upstream_withdrawn(&self) -> bool {
        self.board
            .as_ref()
            .is_some_and(|v| !v.upstream.is_empty() && v.board.is_closed())
    }
}

impl Runner {
    /// A runner; completes any interrupted commit first.
    pub async fn new(project: &Project, options: RunOptions, progress: Progress) -> Result<Self> {
        let mut wh = Warehouse::open(&project.warehouse)?.with_table_cache();
        // A Ballista cluster reads data files as plain Parquet: no deletion vectors.
        if project.engine.cluster.is_some() {
            wh = wh.copy_on_write();
        }
        // Held until the runner is dropped: recovery and every commit happen under it.
        let lock = lock::RunLock::acquire(&wh).await?;
        // Each resolution is logged by `recover`, a rollback as a warning.
        wh.recover().await?;
        Ok(Runner {
            project: Arc::new(project.clone()),
            wh,
            options,
            progress,
            runtime: engine::run_runtime(&project.engine)?,
            _lock: lock.map(Arc::new),
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
        let chosen: Vec<&Pipeline> = self
            .project
            .pipelines
            .iter()
            .filter(|p| names.is_empty() || names.contains(&p.name))
            .collect();
        // A cluster session runs one step at a time; so do its pipelines.
        let width = match self.project.engine.cluster {
            Some(_) => 1,
            None => self.steps_at_once(),
        };
        if width <= 1 || chosen.len() <= 1 {
            let mut reports = Vec::new();
            for p in chosen {
                reports.push(self.run_pipeline(p).await?);
            }
            return Ok(reports);
        }
        self.run_beside(&chosen, width).await
    }

    /// Run `chosen` (in dependency order) side by side, with as many steps building at once
    /// across them as `width`, and each commits in its turn, after the pipeline before it in
    /// the order. A pipeline that reads others' tables builds beside them too, each of its
    /// steps once the tables it reads are staged (see [`board`]); unless it reads a table that
    /// several pipelines write, or kbcrm's own: it then starts once those have committed.
    /// What is committed is what running them one after another commits: when one fails, those
    /// after it commit nothing (their files are removed, and the run history does not list them,
    /// as they would not have run).
    async fn run_beside(&self, chosen: &[&Pipeline], width: usize) -> Result<Vec<RunReport>> {
        use futures::FutureExt;
        let n = chosen.len();
        let mut senders = Vec::with_capacity(n);
        let mut committed: Vec<Committed> = Vec::with_capacity(n);
        for _ in 0..n {
            let (tx, rx) = tokio::sync::oneshot::channel::<bool>();
            senders.push(tx);
            committed.push(rx.map(|r| r.unwrap_or(false)).boxed().shared());
        }
        let alone = Arc::new(tokio::sync::RwLock::new(()));
        let board = Arc::new(board::Board::new(chosen));
        let places = places::Places::new(width);
        let mut tasks = tokio::task::JoinSet::new();
        for (i, (p, tx)) in chosen.iter().zip(senders).enumerate() {
            let upstream: Vec<usize> = p
                .depends_on
                .iter()
                .filter_map(|d| chosen.iter().position(|c| &c.name == d))
                .collect();
            let early = !upstream.is_empty() && board.serves(p);
            let turn = Turn {
                alone: Some(alone.clone()),
                previous: i.checked_sub(1).map(|j| committed[j].clone()),
                board: Some(board::BoardView {
                    board: board.clone(),
                    me: i,
                    upstream: if early { upstream.clone() } else { Vec::new() },
                    places: places.clone(),
                }),
                upstream: upstream.iter().map(|j| committed[*j].clone()).collect(),
            };
            let (runner, pipeline) = (self.clone(), (*p).clone());
            tasks.spawn(
                async move {
                    let go = early || turn.upstream_committed().await;
                    let result = match go {
                        true => runner.run_in_turn(&pipeline, turn).await,
                        false => None,
                    };
                    let _ = tx.send(matches!(result, Some(Ok(_))));
                    (i, result)
                }
                .in_current_span(),
            );
        }
        let mut results: Vec<Option<Result<RunReport>>> = (0..n).map(|_| None).collect();
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((i, result)) => results[i] = result,
                Err(e) => return Err(Error::Internal(format!("a pipeline run failed: {e}"))),
            }
        }
        let mut reports = Vec::with_capacity(n);
        for result in results {
            match result {
                Some(report) => reports.push(report?),
                // Only after a failure, which was returned above.
                None => break,
            }
        }
        Ok(reports)
    }

    /// Run one pipeline and commit it; the run history records how it went either way.
    pub async fn run_pipeline(&self, pipeline: &Pipeline) -> Result<RunReport> {
        self.run_in_turn(pipeline, Turn::default())
            .await
            .unwrap_or_else(|| Err(Error::Internal("a run alone was not committed".into())))
    }

    /// [`Runner::run_pipeline`] beside others: `None` when a pipeline before it failed, and it
    /// committed and recorded nothing.
    async fn run_in_turn(&self, pipeline: &Pipeline, turn: Turn) -> Option<Result<RunReport>> {
        let run_id = uuid::Uuid::now_v7().to_string();
        let started_at = chrono::Utc::now();
        crate::run::lineage::emit(&self.project, &pipeline.name, &run_id, "START", None).await;
        let Some(result) = self.run_pipeline_as(pipeline, run_id.clone(), turn).await else {
            crate::run::lineage::emit(&self.project, &pipeline.name, &run_id, "ABORT", None).await;
            return None;
        };
        let error = result.as_ref().err().map(|e| e.to_string());
        let event = if error.is_some() { "FAIL" } else { "COMPLETE" };
        crate::run::lineage::emit(
            &self.project,
            &pipeline.name,
            &run_id,
            event,
            error.as_deref(),
        )
        .await;
        let as_of = self
            .options
            .as_of
            .unwrap_or_else(|| started_at.date_naive());
        let trigger = self.options.trigger.as_deref().unwrap_or("cli");
        let mut record = RunRecord::new(
            run_id,
            RunKind::Pipeline,
            &pipeline.name,
            trigger,
            Some(as_of),
            started_at,
        );
        match &result {
            Ok(report) => {
                record.tables = report
                    .tables
                    .iter()
                    .map(|t| TableRecord {
                        table: t.table.clone(),
                        version: t.version,
                        rows_read: t.rows_in,
                        rows_written: t.rows_written,
                        rows_rejected: t.rows_rejected,
                        changed: t.changed,
                    })
                    .collect();
                record.tests_passed =
                    report.tests.iter().filter(|t| t.failures == 0).count() as u64;
                record.tests_failed = report.tests.len() as u64 - record.tests_passed;
            }
            Err(e) => {
                record.status = RunStatus::Failed;
                record.error = Some(e.to_string());
            }
        }
        self.wh.record_run(&record).await;
        Some(result)
    }

    #[instrument(skip(self, pipeline, run_id, turn), fields(pipeline = %pipeline.name))]
    async fn run_pipeline_as(
        &self,
        pipeline: &Pipeline,
        run_id: String,
        turn: Turn,
    ) -> Option<Result<RunReport>> {
        let started = Instant::now();
        let mut built = {
            let _building = turn.building().await;
            self.build(pipeline, &run_id, turn.board.clone()).await
        };
        if turn.beside_others() && matches!(&built, Err(e) if e.is_out_of_memory()) {
            info!("the pipeline ran out of memory beside other pipelines; it runs again alone");
            // Pipelines reading its tables before it commits stop, and build again after it.
            if let Some(view) = &turn.board {
                view.board.close();
            }
            let _alone = turn.alone().await;
            built = self.build(pipeline, &run_id, None).await;
        }
        if let Some(view) = &turn.board {
            view.board.finish(view.me, built.is_ok());
        }
        if turn.upstream_withdrawn() {
            if let Ok((_, state, _)) = &built {
                self.abort(state).await;
            }
            if !turn.upstream_committed().await {
                return None;
            }
            info!("building again on the committed tables of the pipelines it reads from");
            built = self.build_again(pipeline, &run_id, &turn).await;
        }
        // Commits, the shared bookkeeping tables' included, follow the pipelines' order.
        let go = turn.previous_committed().await;
        // What it read of others' staged writes must be what they committed.
        if go
            && let Ok((_, state, _)) = &built
            && !state.upstream.is_empty()
        {
            match self.committed_as_read(state).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(
                        "a pipeline this one read from committed other than what it had \
                         staged; building again on what it committed"
                    );
                    self.abort(state).await;
                    built = self.build_again(pipeline, &run_id, &turn).await;
                }
                Err(e) => {
                    self.abort(state).await;
                    built = Err(e);
                }
            }
        }
        let (ctx, mut state, tests) = match (built, go) {
            (Ok(b), true) => b,
            (Ok((_, state, _)), false) => {
                self.abort(&state).await;
                return None;
            }
            (Err(_), false) => return None,
            (Err(e), true) => return Some(Err(e)),
        };
        let staged = self
            .stage_bookkeeping(&ctx, &mut state, &pipeline.name, &tests)
            .await;
        let versions = match staged {
            Ok(()) => {
                let (wh, run_id) = (self.wh.clone(), state.run_id.clone());
                let (name, staged) = (pipeline.name.clone(), state.staged.clone());
                commit_aside(async move { commit_run(&wh, &run_id, &name, &staged).await }).await
            }
            Err(e) => Err(e),
        };
        let versions = match versions {
            Ok(v) => v,
            // The manifest holds the run's files: they stay for the next run to commit.
            Err(e @ Error::Unfinished { .. }) => return Some(Err(e)),
            Err(e) => {
                self.abort(&state).await;
                return Some(Err(e));
            }
        };
        for t in &mut state.tables {
            t.version = versions.get(&t.table).copied().or(t.version);
        }
        info!(run_id = %state.run_id, seconds = started.elapsed().as_secs_f64(), "run committed");
        Some(Ok(RunReport {
            run_id: state.run_id,
            pipeline: pipeline.name.clone(),
            tables: state.tables,
            tests,
            identities: state.identities,
            seconds: started.elapsed().as_secs_f64(),
        }))
    }

    /// Build once more, on the committed tables of the pipelines it reads from.
    async fn build_again(
        &self,
        pipeline: &Pipeline,
        run_id: &str,
        turn: &Turn,
    ) -> Result<(SessionContext, RunState, Vec<TestReport>)> {
        let _building = turn.building().await;
        self.build(pipeline, run_id, None).await
    }

    /// Whether each write of another pipeline that `state` read is now committed as the
    /// version it was staged to be.
    async fn committed_as_read(&self, state: &RunState) -> Result<bool> {
        for s in state.upstream.iter().filter(|s| s.changes()) {
            let now = self.wh.load(&s.table).await?.and_then(|t| t.version());
            if now != Some(s.read_version.map_or(0, |v| v + 1)) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Load the pipeline's sources, build its models and identities and check its data tests,
    /// staging every write; on an error, what was staged is removed.
    async fn build(
        &self,
        pipeline: &Pipeline,
        run_id: &str,
        board: Option<board::BoardView>,
    ) -> Result<(SessionContext, RunState, Vec<TestReport>)> {
        let params = crate::engine::udf::RunParams {
            as_of_days: engine::epoch_days(
                self.options
                    .as_of
                    .unwrap_or_else(|| chrono::Utc::now().date_naive()),
            ),
            vars: pipeline.vars.clone(),
        };
        let ctx =
            engine::session_with_runtime(&self.project.engine, &params, self.runtime.clone())?;
        let started = Instant::now();
        let committed = self.wh.register_all(&ctx).await?;
        tracing::debug!(
            tables = committed.len(),
            seconds = started.elapsed().as_secs_f64(),
            "tables registered"
        );
        let cluster = self.cluster_session(&params).await?;
        let mut state = RunState {
            run_id: run_id.to_string(),
            run_micros: chrono::Utc::now().timestamp_micros(),
            staged: Vec::new(),
            tables: Vec::new(),
            rejects: Vec::new(),
            identities: Vec::new(),
            committed,
            state_before: state::read_state(&ctx).await?,
            state_after: HashMap::new(),
            loaded_files: Vec::new(),
            skipped_files: HashMap::new(),
            tests: Vec::new(),
            params,
            cluster,
            board,
            upstream: Vec::new(),
        };
        info!(run_id = %state.run_id, "run started");
        match self.build_steps(pipeline, &ctx, &mut state).await {
            Ok(tests) => Ok((ctx, state, tests)),
            Err(e) => {
                self.abort(&state).await;
                Err(e)
            }
        }
    }

    async fn build_steps(
        &self,
        pipeline: &Pipeline,
        ctx: &SessionContext,
        state: &mut RunState,
    ) -> Result<Vec<TestReport>> {
        let sources: Vec<Work> = pipeline
            .sources
            .iter()
            .map(|s| Work::Source(Box::new(s.clone())))
            .collect();
        let shared = Arc::new(pipeline.clone());
        // Each data test runs as soon as the tables it reads are built, as a step that writes
        // nothing: the tables a test reads are those the run will commit (its own writes and
        // the staged writes of the pipelines before it that it reads).
        let steps: Vec<Work> = pipeline
            .steps
            .iter()
            .map(|step| match *step {
                Step::Model(i) => Work::Model(Box::new(pipeline.models[i].clone())),
                Step::Identity(i) => Work::Identity(Box::new(pipeline.identities[i].clone())),
            })
            .chain((0..pipeline.tests.len()).map(|t| Work::Test(shared.clone(), t)))
            .collect();
        // Models and tests start as soon as the sources they read are loaded, unless one reads
        // this run's rejects: those are staged once every source is loaded.
        let reads_rejects = steps.iter().any(|w| w.reads().contains(&QUARANTINE_TABLE));
        let steps = if reads_rejects {
            self.run_steps(sources, ctx, state).await?;
            steps
        } else {
            self.run_steps(sources.into_iter().chain(steps).collect(), ctx, state)
                .await?;
            Vec::new()
        };
        self.stage_rejects(pipeline, ctx, state).await?;
        self.run_steps(steps, ctx, state).await?;
        self.test_reports(pipeline, state)
    }

    /// Stage the rows the run's sources rejected into the quarantine table.
    async fn stage_rejects(
        &self,
        pipeline: &Pipeline,
        ctx: &SessionContext,
        state: &mut RunState,
    ) -> Result<()> {
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
                    StepFigures {
                        kind: "quarantine",
                        rows_in: rejects.len() as u64,
                        rows_rejected: 0,
                        started,
                    },
                )
                .await?;
            }
        }
        Ok(())
    }

    /// Stage kbcrm_state, kbcrm_loaded_files and, when the run changes any table, the data-test
    /// results (a run that changes nothing commits nothing). In the pipeline's turn, against
    /// their latest versions: pipelines beside each other build apart, and stage these and
    /// commit one after another.
    async fn stage_bookkeeping(
        &self,
        ctx: &SessionContext,
        state: &mut RunState,
        pipeline: &str,
        tests: &[TestReport],
    ) -> Result<()> {
        // The rows quarantined are appended to the table as it is now: a pipeline that ran
        // beside this one may have committed rows of its own since they were staged.
        for s in state.staged.iter_mut() {
            if s.table != QUARANTINE_TABLE || !s.changes() {
                continue;
            }
            let latest = self.wh.load(&s.table).await?.and_then(|t| t.version());
            if latest != s.read_version && latest.is_some() {
                s.actions.retain(|a| matches!(a, Action::Add(_)));
                s.read_version = latest;
            }
        }
        let started = Instant::now();
        if state.staged.iter().any(Staged::changes) && !tests.is_empty() {
            let s =
                state::stage_test_results(&self.wh, ctx, &state.run_id, pipeline, tests).await?;
            self.record(
                ctx,
                state,
                s,
                StepFigures {
                    kind: "state",
                    rows_in: tests.len() as u64,
                    rows_rejected: 0,
                    started,
                },
            )
            .await?;
        }
        let staged = state::stage_state(
            &self.wh,
            ctx,
            &state.run_id,
            &state.state_before,
            &state.state_after,
        )
        .await?;
        if let Some(s) = staged {
            let rows = s.metrics.rows_in;
            self.record(
                ctx,
                state,
                s,
                StepFigures {
                    kind: "state",
                    rows_in: rows,
                    rows_rejected: 0,
                    started,
                },
            )
            .await?;
        }
        let files = std::mem::take(&mut state.loaded_files);
        if let Some(s) = state::stage_loaded_files(&self.wh, ctx, &state.run_id, &files).await? {
            self.record(
                ctx,
                state,
                s,
                StepFigures {
                    kind: "state",
                    rows_in: files.len() as u64,
                    rows_rejected: 0,
                    started,
                },
            )
            .await?;
        }
        Ok(())
    }

    /// Delete the data files of writes that will not be committed.
    async fn abort(&self, state: &RunState) {
        self.discard(&state.staged).await;
    }

    /// Delete the data files of `staged`.
    async fn discard(&self, staged: &[Staged]) {
        for s in staged {
            if let Err(e) = s.discard(&self.wh).await {
                tracing::warn!(table = %s.table, error = %e, "could not remove uncommitted files");
            }
        }
    }

    /// A session on the project's Ballista cluster with every committed table, when the
    /// project runs its SQL on one.
    #[cfg_attr(not(feature = "ballista"), allow(clippy::unused_async))]
    async fn cluster_session(
        &self,
        params: &crate::engine::udf::RunParams,
    ) -> Result<Option<SessionContext>> {
        #[cfg(feature = "ballista")]
        if let Some(cluster) = &self.project.engine.cluster {
            let ctx =
                crate::engine::distributed::session(&self.project.engine, params, cluster).await?;
            self.wh.register_for_cluster(&ctx).await?;
            return Ok(Some(ctx));
        }
        #[cfg(not(feature = "ballista"))]
        let _ = params;
        Ok(None)
    }

    /// Keep a staged write, make its new state readable by later steps, and report it.
    async fn record(
        &self,
        ctx: &SessionContext,
        state: &mut RunState,
        staged: Staged,
        step: StepFigures,
    ) -> Result<()> {
        let StepFigures {
            kind,
            rows_in,
            rows_rejected,
            started,
        } = step;
        if staged.changes() {
            let provider = table_files_provider(&staged.files, staged.schema.clone()).await?;
            ctx.deregister_table(&staged.table)?;
            ctx.register_table(&staged.table, provider)?;
            if let Some(cluster) = &state.cluster {
                let provider = crate::warehouse::listing(&staged.files, staged.schema.clone())?;
                cluster.deregister_table(&staged.table)?;
                cluster.register_table(&staged.table, provider)?;
            }
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
            skipped: None,
            files_skipped: state
                .skipped_files
                .remove(&staged.table)
                .unwrap_or_default(),
        };
        self.progress.table_done(&report);
        state.tables.push(report);
        state.staged.push(staged);
        Ok(())
    }

    /// Report a table the run did not need to touch.
    fn skip(&self, state: &mut RunState, table: &str, kind: &'static str, why: &'static str) {
        let report = TableReport {
            table: table.to_string(),
            kind,
            rows_in: 0,
            rows_rejected: 0,
            rows_written: 0,
            bytes_written: 0,
            seconds: 0.0,
            changed: false,
            version: state.version_after(table),
            skipped: Some(why),
            files_skipped: state.skipped_files.remove(table).unwrap_or_default(),
        };
        self.progress.table_done(&report);
        state.tables.push(report);
    }

    /// The reports of the pipeline's data tests, in the pipeline's order, with their results
    /// recorded for the next run; an error when a test of severity `error` failed.
    fn test_reports(&self, pipeline: &Pipeline, state: &mut RunState) -> Result<Vec<TestReport>> {
        let mut checked: Vec<Option<TestChecked>> =
            (0..pipeline.tests.len()).map(|_| None).collect();
        for (i, c) in std::mem::take(&mut state.tests) {
            checked[i] = Some(c);
        }
        let mut reports = Vec::new();
        let mut failed = Vec::new();
        for (t, checked) in pipeline.tests.iter().zip(checked) {
            let c = checked
                .ok_or_else(|| Error::Internal(format!("data test {} did not run", t.name)))?;
            let (failures, checked) = (c.failures, c.checked);
            state.state_after.insert(c.key, c.print);
            state.state_after.insert(c.result_key, failures.to_string());
            if let Some((key, values)) = c.failing {
                state.state_after.insert(key, values);
            }
            if failures > 0 {
                match t.severity {
                    Severity::Error => failed.push(format!("{} ({failures} failing)", t.name)),
                    Severity::Warn => {
                        tracing::warn!(test = %t.name, failures, "data test failed (severity warn)")
                    }
                }
            }
            tracing::debug!(
                test = %t.name,
                failures,
                checked = ?checked,
                seconds = c.seconds,
                "data test checked"
            );
            reports.push(TestReport {
                name: t.name.clone(),
                failures,
                severity: t.severity,
                checked,
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

    /// Check one data test in `ctx`, a session of its own. A test whose query and tables (at
    /// the versions this run leaves them) are those of a run before is not run again: its
    /// result is that run's. A test that passed on the versions this run started from, whose
    /// tables the run only added rows to, checks only the added rows; a relationships test
    /// that failed there checks the added rows and the values that failed.
    async fn check_test(
        &self,
        pipeline: &Pipeline,
        ctx: &SessionContext,
        state: &RunState,
        t: &crate::plan::DataTest,
    ) -> Result<TestChecked> {
        let started = Instant::now();
        let scope = format!("test {}", t.name);
        let key = (pipeline.name.clone(), scope.clone(), "inputs".to_string());
        let result_key = (pipeline.name.clone(), scope.clone(), "failures".to_string());
        let failing_key = (pipeline.name.clone(), scope, FAILING_VALUES.to_string());
        let print = model::fingerprint(&t.query, &t.reads, state);
        let before = (!t.reads.is_empty() && !self.options.full_refresh)
            .then(|| state.state_before.get(&key))
            .flatten();
        let failures_before = state
            .state_before
            .get(&result_key)
            .and_then(|n| n.parse::<u64>().ok());
        // The values a relationships test found missing when it last ran, all of them.
        let failing_before = match (&t.referenced, &t.added_rows, failures_before, before) {
            (Some(r), Some(_), Some(n), Some(_)) if n > 0 => {
                match state.state_before.get(&failing_key) {
                    Some(kept) => failing_values(ctx, &t.table, &r.column, kept)
                        .await
                        .filter(|v| v.num_rows() as u64 == n)
                        .map(|values| (values, r)),
                    None => None,
                }
            }
            _ => None,
        };
        // A custom SQL test that filters the rows of one table, each on its own, checks
        // added rows like the built-in per-row tests (its query is planned to tell only
        // when it passed before on other table versions).
        let added = match before {
            Some(b) if *b != print && (failures_before == Some(0) || failing_before.is_some()) => {
                let table = match &t.added_rows {
                    Some(_) => Some(t.table.as_str()),
                    None => row_local_table(ctx, t).await,
                };
                table.and_then(|table| {
                    added_rows(b, t, table, state).map(|narrowed| (table, narrowed))
                })
            }
            _ => None,
        };
        // A relationships test whose referenced table was rewritten narrows only when none
        // of the values its rows may refer to went away.
        let added = match added {
            Some((table, narrowed)) => match (narrowed.referenced_removed, &t.referenced) {
                (None, _) => Some((table, narrowed.added)),
                (Some(removed), Some(r)) => values_kept(ctx, &r.to_table, &r.to_column, removed)
                    .await
                    .then_some((table, narrowed.added)),
                (Some(_), None) => None,
            },
            None => None,
        };
        let (failures, failing, checked) = if before == Some(&print) && failures_before.is_some() {
            (failures_before.unwrap_or_default(), None, Checked::Reused)
        } else if failures_before == Some(0)
            && before.is_some_and(|b| kept_unique_by_merges(b, t, pipeline, state))
        {
            (0, None, Checked::KeptByMerge)
        } else if let Some((table, files)) = added {
            // A few added rows: on one partition, beside the run's other steps.
            let _one_partition =
                (self.threads(state) > 1).then(|| crate::engine::one_partition(ctx));
            let checked = match failing_before {
                Some(_) => Checked::AddedAndFailing,
                None => Checked::AddedRows,
            };
            let (failures, failing) = match (files, &t.added_rows, failing_before) {
                (files, Some(query), failing) => {
                    let added = match files {
                        Some((files, schema)) => {
                            Some(ctx.read_table(table_files_provider(&files, schema).await?)?)
                        }
                        None => None,
                    };
                    // The values that failed join those of the added rows: the old rows'
                    // other values are still in the table they refer to.
                    let rows = match (added, failing) {
                        (Some(added), Some((values, r))) => Some(
                            added
                                .select_columns(&[r.column.as_str()])?
                                .union(ctx.read_batch(values)?)?,
                        ),
                        (None, Some((values, _))) => Some(ctx.read_batch(values)?),
                        (added, None) => added,
                    };
                    match rows {
                        Some(rows) => {
                            ctx.register_table(crate::plan::ADDED_ROWS, rows.into_view())?;
                            let n = failing_rows(ctx, query, pipeline, t).await;
                            ctx.deregister_table(crate::plan::ADDED_ROWS)?;
                            n?
                        }
                        None => (0, None),
                    }
                }
                // The test's own query, over only the added rows of its one table.
                (Some((files, schema)), None, _) => {
                    let added = table_files_provider(&files, schema).await?;
                    let whole = ctx.table_provider(table).await?;
                    ctx.deregister_table(table)?;
                    ctx.register_table(table, added)?;
                    let n = failing_rows(ctx, &t.query, pipeline, t).await;
                    ctx.deregister_table(table)?;
                    ctx.register_table(table, whole)?;
                    n?
                }
                (None, None, _) => (0, None),
            };
            (failures, failing, checked)
        } else {
            let (failures, failing) = failing_rows(ctx, &t.query, pipeline, t).await?;
            (failures, failing, Checked::All)
        };
        // Kept for the next run; emptied when there are none, or too many to keep.
        let failing = t.referenced.as_ref().and_then(|_| match checked {
            Checked::Reused | Checked::KeptByMerge => None,
            _ => Some((failing_key, failing.unwrap_or_default())),
        });
        let seconds = started.elapsed().as_secs_f64();
        Ok(TestChecked {
            key,
            print,
            result_key,
            failures,
            failing,
            checked,
            seconds,
        })
    }
}

/// What checking one data test found, and the state entries that record it.
struct TestChecked {
    key: StateKey,
    print: String,
    result_key: StateKey,
    failures: u64,
    /// For a relationships test that was checked, its failing values' state entry (empty when
    /// none failed or too many did to keep).
    failing: Option<(StateKey, String)>,
    checked: Checked,
    seconds: f64,
}

/// Up to this many failing values of a relationships test are kept for the next run, which then
/// checks them and its added rows instead of the tables whole.
const MAX_FAILING_KEPT: u64 = 10_000;
/// The state entry keeping them.
const FAILING_VALUES: &str = "failing values";

/// The rows of a data test's query; for a relationships test also its failing values (the
/// query's first column) as kept in the state, JSON lines, unless there are none or more than
/// [`MAX_FAILING_KEPT`].
async fn failing_rows(
    ctx: &SessionContext,
    query: &str,
    pipeline: &Pipeline,
    t: &crate::plan::DataTest,
) -> Result<(u64, Option<String>)> {
    use futures::TryStreamExt;
    let df = ctx.sql(query).await.map_err(|e| Error::DataQuality {
        pipeline: pipeline.name.clone(),
        message: format!("data test {} cannot run: {e}", t.name),
    })?;
    if t.referenced.is_none() {
        return Ok((df.count().await? as u64, None));
    }
    let value = df.schema().columns().into_iter().next();
    let df = match value {
        Some(c) => df.select(vec![datafusion::prelude::Expr::Column(c)])?,
        None => return Ok((df.count().await? as u64, None)),
    };
    let mut rows = df.execute_stream().await?;
    let (mut failures, mut kept) = (0u64, Vec::new());
    while let Some(batch) = rows.try_next().await? {
        failures += batch.num_rows() as u64;
        match failures <= MAX_FAILING_KEPT {
            true => kept.push(batch),
            false => kept.clear(),
        }
    }
    if kept.is_empty() {
        return Ok((failures, None));
    }
    let mut json = arrow::json::LineDelimitedWriter::new(Vec::new());
    json.write_batches(&kept.iter().collect::<Vec<_>>())?;
    json.finish()?;
    Ok((failures, String::from_utf8(json.into_inner()).ok()))
}

/// The failing values a relationships test kept (see [`failing_rows`]), typed as `column` of
/// `table` now; `None` when they cannot be read so: the test then reads its tables whole.
async fn failing_values(
    ctx: &SessionContext,
    table: &str,
    column: &str,
    kept: &str,
) -> Option<arrow::record_batch::RecordBatch> {
    let provider = ctx.table_provider(table).await.ok()?;
    let field = provider.schema().field_with_name(column).ok()?.clone();
    let schema = Arc::new(arrow::datatypes::Schema::new(vec![
        field.with_nullable(true),
    ]));
    let read = arrow::json::ReaderBuilder::new(schema.clone())
        .build(std::io::Cursor::new(kept.as_bytes()))
        .and_then(|batches| batches.collect::<std::result::Result<Vec<_>, _>>())
        .and_then(|batches| arrow::compute::concat_batches(&schema, &batches));
    match read {
        Ok(values) => Some(values),
        Err(e) => {
            tracing::debug!(table, column, error = %e, "cannot read the failing values kept");
            None
        }
    }
}

/// The one table a custom SQL test reads when its query keeps or drops each row of that table
/// on its own: scans, filters, projections, sorts, limits and `distinct` over one scan, no
/// subqueries, and only functions whose result depends on their arguments alone (not
/// `now()` or `kbcrm_as_of()`). Such a query returns no rows for a table that passed it
/// before and only gained rows exactly when it returns none for the added rows.
async fn row_local_table<'t>(
    ctx: &SessionContext,
    t: &'t crate::plan::DataTest,
) -> Option<&'t str> {
    use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
    use datafusion::logical_expr::{Expr, LogicalPlan, SkipType, Volatility};
    let [table] = t.reads.as_slice() else {
        return None;
    };
    let plan = ctx.state().create_logical_plan(&t.query).await.ok()?;
    let per_row_expr = |e: &Expr| {
        !e.exists(|e| {
            Ok(match e {
                Expr::ScalarSubquery(_)
                | Expr::InSubquery(_)
                | Expr::Exists(_)
                | Expr::OuterReferenceColumn(..)
                | Expr::Placeholder(_)
                | Expr::AggregateFunction(_)
                | Expr::WindowFunction(_) => true,
                Expr::ScalarFunction(f) => f.func.signature().volatility != Volatility::Immutable,
                _ => false,
            })
        })
        .unwrap_or(true)
    };
    let mut scans = 0;
    let mut local = true;
    let _ = plan.apply(|node| {
        local &= match node {
            LogicalPlan::TableScan(s) => {
                scans += 1;
                s.table_name.table() == table.as_str() && s.filters.is_empty()
            }
            // An offset keeps the first failures from counting, and which rows are first
            // depends on the whole table.
            LogicalPlan::Limit(l) => {
                matches!(l.get_skip_type(), Ok(SkipType::Literal(0)))
                    && node.expressions().iter().all(per_row_expr)
            }
            LogicalPlan::Projection(_)
            | LogicalPlan::Filter(_)
            | LogicalPlan::Sort(_)
            | LogicalPlan::Distinct(_)
            | LogicalPlan::SubqueryAlias(_) => node.expressions().iter().all(per_row_expr),
            _ => false,
        };
        Ok(if local {
            TreeNodeRecursion::Continue
        } else {
            TreeNodeRecursion::Stop
        })
    });
    (local && scans == 1).then_some(table.as_str())
}

/// Files with their schema.
type Files = (Vec<DataFile>, arrow::datatypes::SchemaRef);

/// What a data test may check instead of its tables whole.
struct Narrowed {
    /// The files this run added to the table it checks, with their schema (`None`: it gained
    /// none).
    added: Option<Files>,
    /// The files this run removed from the table a relationships test refers to (`None` when it
    /// only gained rows): the added rows are enough only if every value of the referenced column
    /// in them is still in that table. A file the run marked rows of is here whole: its rows
    /// still in the table are kept, and rows marked before are checked again.
    referenced_removed: Option<Files>,
}

/// Whether a data test may check only the rows this run added: its last check (`before`, its
/// fingerprint) was of the same query over the table versions this run started from, and the run
/// only added files to the tables it reads (the table a relationships test refers to may also
/// have been rewritten: see [`Narrowed::referenced_removed`]).
fn added_rows(
    before: &str,
    t: &crate::plan::DataTest,
    table_checked: &str,
    state: &RunState,
) -> Option<Narrowed> {
    if !last_ran_on_start_versions(before, t, state) {
        return None;
    }
    let referenced = t
        .referenced
        .as_ref()
        .map(|r| r.to_table.as_str())
        .filter(|r| *r != table_checked);
    let mut added: Option<Files> = None;
    let mut referenced_removed: Option<Files> = None;
    for table in &t.reads {
        let committed = state.committed.get(table).copied().flatten()?;
        for s in state
            .staged
            .iter()
            .chain(&state.upstream)
            .filter(|s| &s.table == table && s.changes())
        {
            let add_only = s.actions.iter().all(|a| matches!(a, Action::Add(_)));
            if s.read_version != Some(committed) {
                return None;
            }
            if !add_only {
                if Some(table.as_str()) != referenced {
                    return None;
                }
                let (files, _) =
                    referenced_removed.get_or_insert_with(|| (Vec::new(), s.schema.clone()));
                files.extend(s.actions.iter().filter_map(|a| match a {
                    Action::Remove(r) => Some(DataFile::whole(file_url(&s.url, &r.path))),
                    _ => None,
                }));
            }
            if table == table_checked {
                let (files, _) = added.get_or_insert_with(|| (Vec::new(), s.schema.clone()));
                // A file added again with a deletion vector brings no new row.
                for path in s.new_file_paths() {
                    let url = file_url(&s.url, path);
                    let file = s.files.iter().find(|f| f.url == url).cloned();
                    files.push(file.unwrap_or_else(|| DataFile::whole(url)));
                }
            }
        }
    }
    Some(Narrowed {
        added,
        referenced_removed,
    })
}

/// Whether a data test's last check (`before`, its fingerprint) ran the same query over the
/// versions of its tables this run started from.
fn last_ran_on_start_versions(before: &str, t: &crate::plan::DataTest, state: &RunState) -> bool {
    let Ok(before) = serde_json::from_str::<serde_json::Value>(before) else {
        return false;
    };
    before.get("definition").and_then(|d| d.as_str())
        == Some(model::definition_hash(&t.query).as_str())
        && t.reads.iter().all(|table| {
            let committed = state.committed.get(table).copied().flatten();
            committed.is_some()
                && before
                    .get("inputs")
                    .and_then(|i| i.get(table))
                    .and_then(|v| v.as_u64())
                    == committed
        })
}

/// Whether a unique test (that passed when it last ran, `before` its fingerprint) holds by
/// construction: it last ran on the version of its table this run started from, and the run
/// changed the table only by merges of this pipeline on keys that are among the test's columns.
fn kept_unique_by_merges(
    before: &str,
    t: &crate::plan::DataTest,
    pipeline: &Pipeline,
    state: &RunState,
) -> bool {
    if t.unique_columns.is_empty()
        || t.reads.as_slice() != [t.table.as_str()]
        || !last_ran_on_start_versions(before, t, state)
    {
        return false;
    }
    let Some(committed) = state.committed.get(&t.table).copied().flatten() else {
        return false;
    };
    // An identity's map and key table are merged on the record when only some records moved
    // (and replaced whole otherwise, which the writes below then show).
    let record = vec!["source".to_string(), "source_id".to_string()];
    let merge_keys = pipeline
        .sources
        .iter()
        .filter(|s| s.table == t.table)
        .map(|s| (s.mode, &s.keys))
        .chain(
            pipeline
                .models
                .iter()
                .filter(|m| m.name == t.table)
                .map(|m| (m.mode, &m.keys)),
        )
        .chain(
            pipeline
                .identities
                .iter()
                .filter(|i| i.map_table == t.table || i.keys_table() == t.table)
                .map(|_| (WriteMode::Merge, &record)),
        )
        .next();
    let Some((WriteMode::Merge, keys)) = merge_keys else {
        return false;
    };
    if keys.is_empty() || !keys.iter().all(|k| t.unique_columns.contains(k)) {
        return false;
    }
    let mut writes = state
        .staged
        .iter()
        .filter(|s| s.table == t.table && s.changes())
        .peekable();
    writes.peek().is_some()
        && writes.all(|s| s.mode == WriteMode::Merge && s.read_version == Some(committed))
}

/// Whether every non-null value of `column` in `removed` (files a run took out of `table`) is
/// still in `table` as the run leaves it. `false` when that cannot be told: the test then reads
/// its tables whole, and reports what is wrong with them.
async fn values_kept(ctx: &SessionContext, table: &str, column: &str, removed: Files) -> bool {
    const REMOVED: &str = "__kbcrm_removed";
    let (files, schema) = removed;
    // Named as the test's own query names them.
    let query = format!(
        "select {column} from {REMOVED} where {column} is not null \
         except select {column} from {table}"
    );
    let gone = async {
        ctx.register_table(REMOVED, table_files_provider(&files, schema).await?)?;
        Ok::<_, Error>(ctx.sql(&query).await?.limit(0, Some(1))?.count().await?)
    }
    .await;
    let _ = ctx.deregister_table(REMOVED);
    match gone {
        Ok(n) => n == 0,
        Err(e) => {
            tracing::debug!(table, column, error = %e, "cannot tell whether referenced values are kept");
            false
        }
    }
}

/// Run a pipeline's commit on a runtime of its own, one worker that does nothing else. A commit
/// is a few small reads and writes of the tables' logs; on the run's runtime each would wait
/// behind the query tasks of the pipelines still building beside it (both workers busy), and a
/// commit that takes 0.03 s alone took 0.3 s. The pipelines after it commit in turn, so the
/// last one's commit waited for all of those.
async fn commit_aside<T: Send + 'static>(
    commit: impl std::future::Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    static COMMITS: std::sync::OnceLock<std::io::Result<tokio::runtime::Runtime>> =
        std::sync::OnceLock::new();
    let runtime = COMMITS.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("kbcrm-commit")
            .enable_all()
            .build()
    });
    match runtime {
        Ok(rt) => rt
            .spawn(commit.in_current_span())
            .await
            .map_err(|e| Error::Internal(format!("the commit stopped: {e}")))?,
        // Without a thread of its own the commit runs where it is.
        Err(_) => commit.await,
    }
}

/// `e` naming `pipeline` when it is a data-quality failure (the warehouse's checks, e.g. a
/// merge's unique keys, do not know which pipeline wrote).
pub(super) fn in_pipeline(e: Error, pipeline: &str) -> Error {
    match e {
        Error::DataQuality { message, .. } => Error::DataQuality {
            pipeline: pipeline.to_string(),
            message,
        },
        other => other,
    }
}

/// Cores available, at least 1.
pub fn default_parallelism() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn checked_table(sql: &str) -> Option<String> {
        let ctx = SessionContext::new();
        crate::engine::udf::register(&ctx, &crate::engine::udf::RunParams::default());
        for ddl in [
            "create table sales (id int, net double, gross double, day date)",
            "create table customers (id int, name varchar)",
        ] {
            ctx.sql(ddl)
                .await
                .expect("create")
                .collect()
                .await
                .expect("created");
        }
        let t = crate::plan::DataTest {
            name: "t".into(),
            table: "sales".into(),
            query: sql.into(),
            added_rows: None,
            severity: Severity::Error,
            reads: vec!["sales".into()],
            referenced: None,
            unique_columns: Vec::new(),
        };
        row_local_table(&ctx, &t).await.map(str::to_string)
    }

    #[tokio::test]
    async fn only_queries_that_judge_each_row_alone_are_narrowed_to_added_rows() {
        let row_local = [
            "select * from sales where net > gross",
            "select id, abs(net) as a from sales s where coalesce(net, 0) < 0 order by id limit 5",
            "select distinct id from sales where day > date '2030-01-01'",
        ];
        for sql in row_local {
            assert_eq!(checked_table(sql).await.as_deref(), Some("sales"), "{sql}");
        }
        let whole = [
            // Rows judged together, or against another table, or against the run's date.
            "select id from sales group by id having count(*) > 1",
            "select * from sales where net > (select avg(net) from sales)",
            "select * from sales where id not in (select id from sales where net < 0)",
            "select s.* from sales s join customers c on s.id = c.id",
            "select * from sales where day > kbcrm_as_of()",
            "select * from sales where day > now()",
            "select * from sales where random() < 0.5",
            "select id, row_number() over (order by id) as n from sales",
            "select * from sales order by id limit 5 offset 2",
            "select * from sales union all select * from sales",
            "not sql",
        ];
        for sql in whole {
            assert_eq!(checked_table(sql).await, None, "{sql}");
        }
    }
}
