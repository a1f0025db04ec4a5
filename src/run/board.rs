//! Tables that the pipelines of one run stage for the pipelines after them. A pipeline that
//! reads another's tables need not wait for that one to commit: it builds beside it, each of
//! its steps once the tables the step reads are staged, and commits after it. What it commits
//! is what it would have built from the other's committed tables: the staged writes it read are
//! the ones committed, which is checked before it commits.
//!
//! Every table written by exactly one pipeline of the run is on the board. A pipeline posts each
//! such table when the step writing it ends: its staged write, or that it does not change. When
//! a pipeline fails or builds again alone (after running out of memory beside others), the board
//! closes: pipelines that read from others stop waiting, and build again once those committed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::plan::Pipeline;
use crate::warehouse::Staged;

/// What a pipeline made of one of its tables in its build.
#[derive(Clone)]
enum Posted {
    Pending,
    /// The staged write, `None` when the table does not change.
    Ready(Option<Arc<Staged>>),
}

/// The tables of a run's pipelines, as each pipeline stages them.
pub(super) struct Board {
    /// Each table's writer (its index among the run's pipelines) and what it posted.
    tables: Mutex<HashMap<String, (usize, Posted)>>,
    /// Tables a pipeline waits for: their writers build them first.
    wanted: Mutex<std::collections::HashSet<String>>,
    /// Tables that several of the run's pipelines write.
    shared: std::collections::HashSet<String>,
    /// Each table's chain: the steps on the longest chain from its writer to the run's end.
    chains: HashMap<String, usize>,
    /// Bumped at each post and when the board closes.
    changed: watch::Sender<u64>,
    closed: std::sync::atomic::AtomicBool,
}

/// Outcome of looking up tables on the board.
pub(super) enum Lookup {
    /// Each table's staged write (the tables that change).
    Ready(Vec<Arc<Staged>>),
    /// A table is not staged yet.
    Pending,
}

impl Board {
    /// The board of a run of `pipelines` (in their order).
    pub fn new(pipelines: &[&Pipeline]) -> Board {
        let mut writers: HashMap<String, Vec<usize>> = HashMap::new();
        let mut steps: Vec<(Vec<String>, Vec<String>)> = Vec::new();
        for p in pipelines {
            steps.extend(
                p.sources
                    .iter()
                    .map(|s| (Vec::new(), vec![s.table.clone()])),
            );
            steps.extend(
                p.models
                    .iter()
                    .map(|m| (m.depends_on.clone(), vec![m.name.clone()])),
            );
            steps.extend(p.identities.iter().map(|id| {
                let reads = id.sources.iter().map(|s| s.table.clone()).collect();
                let writes = vec![
                    id.map_table.clone(),
                    id.golden_table.clone(),
                    id.keys_table(),
                ];
                (reads, writes)
            }));
        }
        for (i, p) in pipelines.iter().enumerate() {
            let tables = p
                .sources
                .iter()
                .map(|s| s.table.clone())
                .chain(p.models.iter().map(|m| m.name.clone()))
                .chain(p.identities.iter().flat_map(|id| {
                    [
                        id.map_table.clone(),
                        id.golden_table.clone(),
                        id.keys_table(),
                    ]
                }));
            for t in tables {
                let w = writers.entry(t).or_default();
                if !w.contains(&i) {
                    w.push(i);
                }
            }
        }
        Board {
            chains: super::places::chain_lengths(&steps),
            ..Board::of(writers)
        }
    }

    /// The board of tables written by the pipelines (indices) given for each.
    fn of(writers: HashMap<String, Vec<usize>>) -> Board {
        let (single, shared): (HashMap<_, _>, HashMap<_, _>) =
            writers.into_iter().partition(|(_, w)| w.len() == 1);
        let tables = single
            .into_iter()
            .map(|(t, w)| (t, (w[0], Posted::Pending)))
            .collect();
        Board {
            tables: Mutex::new(tables),
            wanted: Mutex::default(),
            shared: shared.into_keys().collect(),
            chains: HashMap::new(),
            changed: watch::Sender::new(0),
            closed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (usize, Posted)>> {
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `pipeline` can read what it reads of the run's other pipelines from the board:
    /// none of it is written by several, nor is kbcrm's own (quarantine, state, history),
    /// which every pipeline writes in its turn.
    pub fn serves(&self, pipeline: &Pipeline) -> bool {
        pipeline
            .models
            .iter()
            .flat_map(|m| m.depends_on.iter())
            .chain(
                pipeline
                    .identities
                    .iter()
                    .flat_map(|id| id.sources.iter().map(|s| &s.table)),
            )
            .chain(pipeline.tests.iter().flat_map(|t| t.reads.iter()))
            .all(|t| {
                !self.shared.contains(t)
                    && (self.writer(t).is_some()
                        || !(t.starts_with("kbcrm_") || t == super::QUARANTINE_TABLE))
            })
    }

    /// The pipeline that writes `table`, when it is on the board.
    pub fn writer(&self, table: &str) -> Option<usize> {
        self.lock().get(table).map(|(w, _)| *w)
    }

    /// Post what `pipeline` made of `table` (`None`: it does not change).
    pub fn post(&self, pipeline: usize, table: &str, staged: Option<Staged>) {
        {
            let mut tables = self.lock();
            match tables.get_mut(table) {
                Some((w, posted)) if *w == pipeline => {
                    *posted = Posted::Ready(staged.filter(Staged::changes).map(Arc::new))
                }
                _ => return,
            }
        }
        self.changed.send_modify(|n| *n += 1);
    }

    /// `pipeline` built (`ok`) or failed; a failure, or a table it did not post, closes the
    /// board.
    pub fn finish(&self, pipeline: usize, ok: bool) {
        let unposted = self
            .lock()
            .values()
            .any(|(w, p)| *w == pipeline && matches!(p, Posted::Pending));
        if !ok || unposted {
            self.close();
        }
    }

    /// Stop every wait: pipelines that read others' tables build again once those committed.
    pub fn close(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        self.changed.send_modify(|n| *n += 1);
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The staged writes of `tables`, or `Pending` when one is not posted yet; an error once
    /// the board is closed, unless `tables` is empty (a pipeline that reads nothing of the
    /// others' staged tables builds on whatever happens to them).
    pub fn look_up(&self, tables: &[String]) -> Result<Lookup> {
        if tables.is_empty() {
            return Ok(Lookup::Ready(Vec::new()));
        }
        if self.is_closed() {
            return Err(Error::UpstreamWithdrawn);
        }
        let posted = self.lock();
        let mut ready = Vec::new();
        let mut pending = Vec::new();
        for t in tables {
            match posted.get(t) {
                Some((_, Posted::Pending)) => pending.push(t.clone()),
                Some((_, Posted::Ready(Some(s)))) => ready.push(s.clone()),
                Some((_, Posted::Ready(None))) | None => {}
            }
        }
        drop(posted);
        if pending.is_empty() {
            return Ok(Lookup::Ready(ready));
        }
        self.wanted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(pending);
        Ok(Lookup::Pending)
    }

    /// The longest chain of steps, over the run's pipelines, from a step writing `tables` to
    /// the run's end (0 when none is known).
    pub fn chain(&self, tables: &[String]) -> usize {
        tables
            .iter()
            .filter_map(|t| self.chains.get(t))
            .max()
            .copied()
            .unwrap_or(0)
    }

    /// Whether a pipeline waits for any of `tables`.
    pub fn wanted(&self, tables: &[String]) -> bool {
        let wanted = self.wanted.lock().unwrap_or_else(|p| p.into_inner());
        tables.iter().any(|t| wanted.contains(t))
    }

    /// A receiver that wakes at the next post or close.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The staged writes of `tables`, once each is posted.
    pub async fn wait(&self, tables: &[String]) -> Result<Vec<Arc<Staged>>> {
        let mut changed = self.subscribe();
        loop {
            if let Lookup::Ready(ready) = self.look_up(tables)? {
                return Ok(ready);
            }
            if changed.changed().await.is_err() {
                return Err(Error::UpstreamWithdrawn);
            }
        }
    }
}

/// One pipeline's place on its run's board.
#[derive(Clone)]
pub(super) struct BoardView {
    pub board: Arc<Board>,
    /// The pipeline's index in the run.
    pub me: usize,
    /// The pipelines it reads from before they commit.
    pub upstream: Vec<usize>,
    /// Places for the steps of the run's pipelines: each step holds one while it builds.
    pub places: Arc<super::places::Places>,
}

impl BoardView {
    /// Of `tables`, those an upstream pipeline writes.
    pub fn upstream_tables<'a>(&self, tables: impl IntoIterator<Item = &'a str>) -> Vec<String> {
        tables
            .into_iter()
            .filter(|t| {
                self.board
                    .writer(t)
                    .is_some_and(|w| self.upstream.contains(&w))
            })
            .map(str::to_string)
            .collect()
    }
}

impl super::Runner {
    /// Wait until the upstream pipelines have staged those of `tables` they write, and read
    /// their staged writes from then on (in `ctx`, and through `state` for what they changed).
    pub(super) async fn wait_for_upstream(
        &self,
        ctx: &datafusion::prelude::SessionContext,
        state: &mut super::RunState,
        tables: &[&str],
    ) -> Result<()> {
        let Some(view) = &state.board else {
            return Ok(());
        };
        let tables = view.upstream_tables(tables.iter().copied());
        if tables.is_empty() {
            return Ok(());
        }
        let staged = view.board.wait(&tables).await?;
        self.adopt(ctx, state, staged).await
    }

    /// Read `staged` (upstream pipelines' writes) from now on.
    pub(super) async fn adopt(
        &self,
        ctx: &datafusion::prelude::SessionContext,
        state: &mut super::RunState,
        staged: Vec<Arc<Staged>>,
    ) -> Result<()> {
        for s in staged {
            if state.upstream.iter().any(|u| u.table == s.table) {
                continue;
            }
            let provider =
                crate::warehouse::table_files_provider(&s.files, s.schema.clone()).await?;
            ctx.deregister_table(s.table.as_str())?;
            ctx.register_table(s.table.as_str(), provider)?;
            state.upstream.push((*s).clone());
        }
        Ok(())
    }

    /// Post `tables`, which a step of this run just wrote or left as they were, for the
    /// pipelines after it.
    pub(super) fn post(&self, state: &super::RunState, tables: &[String]) {
        let Some(view) = &state.board else {
            return;
        };
        for t in tables {
            view.board.post(view.me, t, state.own_staged(t).cloned());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn staged(table: &str, changes: bool) -> Staged {
        Staged {
            table: table.to_string(),
            url: url::Url::parse(&format!("file:///w/{table}/")).unwrap(),
            read_version: Some(3),
            actions: match changes {
                true => vec![deltalake::kernel::Action::Remove(Default::default())],
                false => Vec::new(),
            },
            operation: crate::warehouse::write::Operation::Append,
            metrics: Default::default(),
            schema: Arc::new(arrow::datatypes::Schema::empty()),
            files: Vec::new(),
        }
    }

    fn board() -> Board {
        Board::of(HashMap::from([
            ("stg_a".to_string(), vec![0]),
            ("stg_b".to_string(), vec![1]),
            ("both".to_string(), vec![0, 1]),
        ]))
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_table_is_ready_once_its_one_writer_posts_it() {
        let b = board();
        assert_eq!(b.writer("stg_a"), Some(0));
        // Written by two pipelines, or by none of the run's: not on the board.
        assert_eq!(b.writer("both"), None);
        assert_eq!(b.writer("elsewhere"), None);
        assert!(matches!(
            b.look_up(&names(&["stg_a", "stg_b"])),
            Ok(Lookup::Pending)
        ));
        assert!(b.wanted(&names(&["stg_a"])) && b.wanted(&names(&["stg_b"])));
        // Only the writer's post counts.
        b.post(1, "stg_a", Some(staged("stg_a", true)));
        assert!(matches!(b.look_up(&names(&["stg_a"])), Ok(Lookup::Pending)));
        b.post(0, "stg_a", Some(staged("stg_a", true)));
        b.post(1, "stg_b", Some(staged("stg_b", false)));
        // A table that does not change is read as committed: no staged write.
        match b.look_up(&names(&["stg_a", "stg_b", "elsewhere"])) {
            Ok(Lookup::Ready(s)) => {
                assert_eq!(
                    s.iter().map(|s| s.table.as_str()).collect::<Vec<_>>(),
                    ["stg_a"]
                )
            }
            _ => panic!("both tables are posted"),
        }
    }

    #[tokio::test]
    async fn waits_end_at_the_post_or_when_the_board_closes() {
        let b = Arc::new(board());
        let waiting = tokio::spawn({
            let b = b.clone();
            async move { b.wait(&names(&["stg_a"])).await.map(|s| s.len()) }
        });
        tokio::task::yield_now().await;
        b.post(0, "stg_a", Some(staged("stg_a", true)));
        assert_eq!(waiting.await.unwrap().unwrap(), 1);
        let waiting = tokio::spawn({
            let b = b.clone();
            async move { b.wait(&names(&["stg_b"])).await.map(|s| s.len()) }
        });
        tokio::task::yield_now().await;
        // Pipeline 1 built without posting stg_b: the board closes, and waits fail.
        b.finish(1, true);
        assert!(b.is_closed());
        assert!(waiting.await.unwrap().is_err());
        assert!(b.look_up(&names(&["stg_a"])).is_err());
        // A step that reads none of the others' tables is not stopped.
        assert!(matches!(b.look_up(&[]), Ok(Lookup::Ready(s)) if s.is_empty()));
    }

    #[test]
    fn a_failed_pipeline_closes_the_board() {
        let b = board();
        b.post(0, "stg_a", None);
        b.finish(0, true);
        assert!(!b.is_closed());
        b.finish(0, false);
        assert!(b.is_closed());
    }
}
