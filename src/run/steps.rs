//! Running a pipeline's steps side by side: each as soon as the tables it reads are built, at
//! most `threads` at once, each in a session and a copy of the run's state of its own. What a
//! step staged is taken into the run when it ends; its report keeps the pipeline's step order.

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::prelude::SessionContext;
use tokio::task::JoinSet;
use tracing::Instrument;

use super::board::Lookup;
use super::{RunState, Runner, default_parallelism};
use crate::error::{Error, Result};
use crate::plan::Identity;
use crate::plan::{Model, Pipeline, Source};
use crate::warehouse::Staged;

/// One step of a pipeline run.
#[derive(Clone)]
pub(super) enum Work {
    Source(Box<Source>),
    Model(Box<Model>),
    Identity(Box<Identity>),
    /// The pipeline's data test of this index: it checks the tables it reads as soon as they
    /// are built, beside the steps still running.
    Test(Arc<Pipeline>, usize),
}

impl Work {
    /// Tables the step writes.
    fn writes(&self) -> Vec<String> {
        match self {
            Work::Source(s) => vec![s.table.clone()],
            Work::Model(m) => vec![m.name.clone()],
            Work::Identity(i) => vec![i.map_table.clone(), i.golden_table.clone(), i.keys_table()],
            Work::Test(..) => Vec::new(),
        }
    }

    /// Tables the step reads that a step of the same run may write.
    pub(super) fn reads(&self) -> Vec<&str> {
        match self {
            // Sources read files; their bookkeeping is read as committed.
            Work::Source(_) => Vec::new(),
            Work::Model(m) => m.depends_on.iter().map(String::as_str).collect(),
            Work::Identity(i) => i.sources.iter().map(|s| s.table.as_str()).collect(),
            Work::Test(p, t) => p.tests[*t].reads.iter().map(String::as_str).collect(),
        }
    }
}

/// For each step, the earlier steps that write a table it reads.
fn dependencies(work: &[Work]) -> Vec<Vec<usize>> {
    let mut writer: HashMap<String, usize> = HashMap::new();
    let mut deps = Vec::with_capacity(work.len());
    for (i, w) in work.iter().enumerate() {
        let mut d: Vec<usize> = w
            .reads()
            .into_iter()
            .filter_map(|t| writer.get(t).copied())
            .collect();
        d.sort_unstable();
        d.dedup();
        deps.push(d);
        for t in w.writes() {
            writer.insert(t, i);
        }
    }
    deps
}

/// Register `table` of `from` in `to`, in place of what `to` had under that name.
async fn share_table(from: &SessionContext, to: &SessionContext, table: &str) -> Result<()> {
    let provider = from.table_provider(table).await?;
    to.deregister_table(table)?;
    to.register_table(table, provider)?;
    Ok(())
}

impl RunState {
    /// A copy for one step that runs beside others: what the run has staged so far, and none
    /// of what the run has reported, rejected or recorded.
    fn fork(&self) -> RunState {
        RunState {
            run_id: self.run_id.clone(),
            run_micros: self.run_micros,
            staged: self.staged.clone(),
            tables: Vec::new(),
            rejects: Vec::new(),
            identities: Vec::new(),
            committed: self.committed.clone(),
            state_before: self.state_before.clone(),
            state_after: HashMap::new(),
            loaded_files: Vec::new(),
            skipped_files: HashMap::new(),
            tests: Vec::new(),
            params: self.params.clone(),
            cluster: self.cluster.clone(),
            board: self.board.clone(),
            upstream: self.upstream.clone(),
        }
    }

    /// Take in the reports and records of a fork (its staged writes are taken as it ends).
    fn join(&mut self, fork: RunState) {
        self.tables.extend(fork.tables);
        self.rejects.extend(fork.rejects);
        self.identities.extend(fork.identities);
        self.state_after.extend(fork.state_after);
        self.loaded_files.extend(fork.loaded_files);
        self.tests.extend(fork.tests);
    }
}

/// What a step returns from its task: its index, how many writes its state held when it
/// started, its state and session, and how it went.
type Done = (usize, usize, RunState, SessionContext, Result<()>);

impl Runner {
    /// The steps' indices, first those that write a table another pipeline waits for and the
    /// steps these wait for, then the others; each by the longest chain of steps they start
    /// (`chains`), then in step order.
    fn urgent_first(
        &self,
        state: &RunState,
        work: &[Work],
        deps: &[Vec<usize>],
        chains: &[usize],
    ) -> Vec<usize> {
        let mut urgent = vec![false; work.len()];
        if let Some(view) = &state.board {
            for (i, w) in work.iter().enumerate().rev() {
                urgent[i] |= view.board.wanted(&w.writes());
                if urgent[i] {
                    for d in &deps[i] {
                        urgent[*d] = true;
                    }
                }
            }
        }
        let mut order: Vec<usize> = (0..work.len()).collect();
        order.sort_by_key(|&i| (!urgent[i], std::cmp::Reverse(chains[i]), i));
        order
    }

    /// Each step's chain: the steps on the longest chain from it to the end of the run, over
    /// the run's pipelines when they build side by side (the board counted them), else over
    /// `work`.
    fn chains(&self, state: &RunState, work: &[Work]) -> Vec<usize> {
        let writes: Vec<Vec<String>> = work.iter().map(Work::writes).collect();
        if let Some(view) = &state.board {
            return writes.iter().map(|t| view.board.chain(t)).collect();
        }
        let steps: Vec<(Vec<String>, Vec<String>)> = work
            .iter()
            .zip(&writes)
            .map(|(w, t)| {
                (
                    w.reads().into_iter().map(str::to_string).collect(),
                    t.clone(),
                )
            })
            .collect();
        let local = super::places::chain_lengths(&steps);
        writes
            .iter()
            .map(|t| {
                t.iter()
                    .filter_map(|t| local.get(t))
                    .max()
                    .copied()
                    .unwrap_or(0)
            })
            .collect()
    }

    /// Steps run at once.
    pub(super) fn threads(&self, state: &RunState) -> usize {
        // A cluster session is shared by every step; its steps run one at a time.
        if state.cluster.is_some() {
            return 1;
        }
        self.steps_at_once()
    }

    /// `--threads`, else `engine.threads`, else the number of cores: steps of a pipeline run
    /// at once, and pipelines building at once.
    pub(super) fn steps_at_once(&self) -> usize {
        self.options
            .threads
            .or(self.project.engine.threads)
            .unwrap_or_else(default_parallelism)
            .max(1)
    }

    /// Run one step of chain `chain` (see [`Runner::chains`]).
    async fn run_work(
        &self,
        work: &Work,
        chain: usize,
        ctx: &SessionContext,
        state: &mut RunState,
    ) -> Result<()> {
        // A place among the steps of the pipelines building side by side.
        let _place = match &state.board {
            Some(view) => Some(view.places.take(chain).await),
            None => None,
        };
        match work {
            Work::Source(s) => self.load_source(s, ctx, state).await,
            Work::Model(m) => self.build_model(m, ctx, state).await,
            Work::Identity(i) => self.resolve_identity(i, ctx, state).await,
            Work::Test(p, t) => {
                // In a session of its own: a check may put a table's added rows in its place.
                let ctx = crate::engine::fork_session(ctx).await?;
                let checked = self.check_test(p, &ctx, state, &p.tests[*t]).await?;
                state.tests.push((*t, checked));
                Ok(())
            }
        }
    }

    /// Run `work`, each step after the earlier steps that write what it reads. On an error no
    /// further step starts; those running finish (their writes are staged, for the caller to
    /// discard) and the first error is returned. A step that runs out of memory beside others
    /// is run again alone.
    pub(super) async fn run_steps(
        &self,
        work: Vec<Work>,
        ctx: &SessionContext,
        state: &mut RunState,
    ) -> Result<()> {
        let threads = self.threads(state);
        let chains = self.chains(state, &work);
        if threads <= 1 || work.len() <= 1 {
            for (w, chain) in work.iter().zip(&chains) {
                self.wait_for_upstream(ctx, state, &w.reads()).await?;
                self.run_work(w, *chain, ctx, state).await?;
                self.post(state, &w.writes());
            }
            return Ok(());
        }
        let mut run = SideBySide::new(work, chains, threads, state.staged.len());
        // Posts of the pipelines this one reads from before they commit.
        let mut posted = state.board.as_ref().map(|v| v.board.subscribe());
        loop {
            // Whether a step waits only for tables an upstream pipeline has not staged yet.
            let waiting = run.error.is_none() && self.start_ready(&mut run, ctx, state).await;
            let joined = match (&mut posted, waiting && run.error.is_none()) {
                // Wake at a post, or when a running step ends.
                (Some(posted), true) => {
                    if run.running.is_empty() {
                        if posted.changed().await.is_err() {
                            break;
                        }
                        continue;
                    }
                    tokio::select! {
                        joined = run.running.join_next() => joined,
                        _ = posted.changed() => continue,
                    }
                }
                _ => run.running.join_next().await,
            };
            let Some(joined) = joined else {
                break;
            };
            self.step_ended(&mut run, joined, ctx, state).await;
        }
        run.finish(state)
    }

    /// Start the steps that may start, urgent ones first: when no step waits to run again
    /// alone, each whose earlier steps are done, up to `threads` at once; else that step, once
    /// none runs. Whether a step waits only for tables an upstream pipeline has not staged yet.
    /// On an error no further step starts, and `run` keeps the error.
    async fn start_ready(
        &self,
        run: &mut SideBySide,
        ctx: &SessionContext,
        state: &mut RunState,
    ) -> bool {
        let mut waiting = false;
        let exclusive = run
            .alone
            .first()
            .copied()
            .filter(|_| run.running.is_empty());
        for i in self.urgent_first(state, &run.work, &run.deps, &run.chains) {
            let ready = match exclusive {
                Some(e) => i == e,
                None => {
                    run.alone.is_empty()
                        && run.running.len() < run.threads
                        && !run.started[i]
                        && run.deps[i].iter().all(|d| run.done[*d])
                }
            };
            if !ready {
                continue;
            }
            let upstream = match &state.board {
                Some(view) => {
                    let tables = view.upstream_tables(run.work[i].reads());
                    match view.board.look_up(&tables) {
                        Ok(Lookup::Ready(staged)) => staged,
                        Ok(Lookup::Pending) => {
                            waiting = true;
                            continue;
                        }
                        Err(e) => {
                            run.error = Some(e);
                            break;
                        }
                    }
                }
                None => Vec::new(),
            };
            if let Err(e) = self.adopt(ctx, state, upstream).await {
                run.error = Some(e);
                break;
            }
            if exclusive.is_some() {
                run.alone.remove(0);
            }
            let fork_ctx = match crate::engine::fork_session(ctx).await {
                Ok(c) => c,
                Err(e) => {
                    run.error = Some(e);
                    break;
                }
            };
            self.spawn_step(run, i, fork_ctx, state);
            if exclusive.is_some() {
                break;
            }
        }
        waiting
    }

    /// Start step `i` in a task of its own, in `fork_ctx` and a fork of the run's state.
    fn spawn_step(
        &self,
        run: &mut SideBySide,
        i: usize,
        fork_ctx: SessionContext,
        state: &RunState,
    ) {
        run.started[i] = true;
        if !run.in_flight.is_empty() {
            run.overlapped[i] = true;
            for j in &run.in_flight {
                run.overlapped[*j] = true;
            }
        }
        run.in_flight.push(i);
        let fork = state.fork();
        let at = fork.staged.len();
        let (runner, step, chain) = (self.clone(), run.work[i].clone(), run.chains[i]);
        run.running.spawn(
            async move {
                let mut fork = fork;
                let result = runner.run_work(&step, chain, &fork_ctx, &mut fork).await;
                (i, at, fork, fork_ctx, result)
            }
            .in_current_span(),
        );
    }

    /// Take in a step that ended: what it staged (shared with the run's session) and its
    /// state. A step that ran out of memory beside others is set to run again alone instead.
    async fn step_ended(
        &self,
        run: &mut SideBySide,
        joined: std::result::Result<Done, tokio::task::JoinError>,
        ctx: &SessionContext,
        state: &mut RunState,
    ) {
        let (i, at, mut fork, fork_ctx, result) = match joined {
            Ok(d) => d,
            Err(e) => {
                run.error
                    .get_or_insert(Error::Internal(format!("a step of the run failed: {e}")));
                return;
            }
        };
        run.in_flight.retain(|j| *j != i);
        match result {
            Err(e) if e.is_out_of_memory() && run.overlapped[i] && run.error.is_none() => {
                tracing::info!(
                    step = run.work[i].writes().join(", "),
                    "a step ran out of memory beside other steps; it runs again alone"
                );
                let fork_staged: Vec<Staged> = fork.staged.drain(at..).collect();
                self.discard(&fork_staged).await;
                run.overlapped[i] = false;
                run.alone.push(i);
                return;
            }
            Err(e) => {
                run.error.get_or_insert(e);
            }
            Ok(()) => {}
        }
        let succeeded = run.error.is_none();
        // Later steps read what this one staged, in the run's session.
        for s in fork.staged.drain(at..) {
            if s.changes()
                && let Err(e) = share_table(&fork_ctx, ctx, &s.table).await
            {
                run.error.get_or_insert(e);
            }
            run.origin.push(i);
            state.staged.push(s);
        }
        if succeeded {
            self.post(state, &run.work[i].writes());
        }
        run.done[i] = true;
        run.finished[i] = Some(fork);
    }
}

/// The steps of a run going side by side: each step's earlier steps and chain, which started
/// and which are done, what those that ended gave, and the first error.
struct SideBySide {
    work: Vec<Work>,
    deps: Vec<Vec<usize>>,
    chains: Vec<usize>,
    /// Steps run at once.
    threads: usize,
    started: Vec<bool>,
    done: Vec<bool>,
    /// Steps to run again once nothing else runs.
    alone: Vec<usize>,
    /// What each finished step reported, joined in step order at the end.
    finished: Vec<Option<RunState>>,
    /// The step each staged write of this call came from, to put them in step order.
    first_staged: usize,
    origin: Vec<usize>,
    error: Option<Error>,
    running: JoinSet<Done>,
    /// Steps running, and whether each ran beside another at some time.
    in_flight: Vec<usize>,
    overlapped: Vec<bool>,
}

impl SideBySide {
    /// Nothing started yet; the run's state held `first_staged` writes.
    fn new(work: Vec<Work>, chains: Vec<usize>, threads: usize, first_staged: usize) -> Self {
        let deps = dependencies(&work);
        let n = work.len();
        SideBySide {
            work,
            deps,
            chains,
            threads,
            started: vec![false; n],
            done: vec![false; n],
            alone: Vec::new(),
            finished: (0..n).map(|_| None).collect(),
            first_staged,
            origin: Vec::new(),
            error: None,
            running: JoinSet::new(),
            in_flight: Vec::new(),
            overlapped: vec![false; n],
        }
    }

    /// Take what the steps gave into the run's state; the first error, if a step failed.
    fn finish(self, state: &mut RunState) -> Result<()> {
        // Reports, records and writes in the pipeline's step order, however the steps ended.
        let mut staged: Vec<(usize, Staged)> = self
            .origin
            .into_iter()
            .zip(state.staged.drain(self.first_staged..))
            .collect();
        staged.sort_by_key(|(i, _)| *i);
        state.staged.extend(staged.into_iter().map(|(_, s)| s));
        for fork in self.finished.into_iter().flatten() {
            state.join(fork);
        }
        match self.error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(name: &str, reads: &[&str]) -> Work {
        Work::Model(Box::new(Model {
            pipeline: "p".to_string(),
            name: name.to_string(),
            file: format!("{name}.sql").into(),
            sql: std::sync::Arc::new(String::new()),
            write: crate::plan::ModelWrite::Table(crate::plan::Write::Overwrite),
            depends_on: reads.iter().map(|s| s.to_string()).collect(),
            incremental: None,
            rollup: false,
            cluster_by: Vec::new(),
            files_by: None,
            slices: None,
        }))
    }

    #[test]
    fn a_step_waits_for_the_earlier_steps_that_write_what_it_reads() {
        let work = vec![
            model("stg_a", &["raw_a"]),
            model("stg_b", &["raw_b"]),
            model("dim", &["stg_a", "stg_b", "raw_c"]),
            model("fact", &["stg_b", "dim"]),
            model("other", &["elsewhere"]),
        ];
        assert_eq!(
            dependencies(&work),
            vec![vec![], vec![], vec![0, 1], vec![1, 2], vec![]]
        );
    }
}
