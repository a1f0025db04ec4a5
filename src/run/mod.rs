//! Running pipelines: the only sequencer. A pipeline run loads its sources, builds its models
//! and identity resolutions in DAG order, checks each data test once the tables it reads are
//! built, and then commits every table it changed, with the bookkeeping that describes them (cursors, loaded files), as one run.
//!
//! Owns the run lock, pending commits' recovery, data tests, backfills, [`lineage`] and
//! [`validate`]. May import every stage and everything below; only the faces import it.

pub mod backfill;
mod board;
mod data_tests;
use data_tests::TestChecked;
mod database;
pub mod lineage;
mod lock;
mod model;
mod places;
mod progress;
mod quarantine;
mod source;
mod staging;
mod steps;
pub mod upkeep;
pub mod validate;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use datafusion::prelude::SessionContext;
use tracing::{Instrument, info, instrument};

use crate::engine;
use crate::error::{Error, Result};
use crate::identity::IdentityStats;
use crate::plan::{Pipeline, Project, Severity, Step, Write};
use crate::sources;
use crate::warehouse::history::{RunKind, RunRecord, RunStatus, TableRecord};
use crate::warehouse::state::{self, StateKey};
use crate::warehouse::write::Operation;
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
                        files_removed: 0,
                        bytes_removed: 0,
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

    /// A build that failed because the warehouse's filesystem refused a write, said in words:
    /// where, the free space, and that nothing was committed.
    fn refused_write(&self, e: Error) -> Error {
        let Some(what) = e.storage_refusal() else {
            return e;
        };
        let url = self.wh.url();
        let free = crate::storage::free_space(url)
            .map(|b| format!(" ({} MiB free there)", b >> 20))
            .unwrap_or_default();
        Error::warehouse(format!(
            "writing the warehouse at {url} failed: {what}{free}. Nothing was committed: every \
             table is at its previous version, and the files this run wrote are referenced by \
             none (`kbcrm tables --files` shows them, `kbcrm vacuum` removes them). Free space \
             and run again. The store said: {e}"
        ))
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
            (Err(e), true) => return Some(Err(self.refused_write(e))),
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
}

/// Run a pipeline's commit on a runtime of its own, one worker that does nothing else. A commit
/// is a few small reads and writes of the tables' logs; on the run's runtime each would wait
/// behind the query tasks of the pipelines still building beside it (both workers busy) and
/// take many times as long. The pipelines after it commit in turn, so the last one's commit
/// would wait for all of those.
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
mod tests;
