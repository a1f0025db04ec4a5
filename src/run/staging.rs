//! What a run stages beside its tables (its rejects, its bookkeeping), how each staged write is
//! recorded and reported, and what a failed run discards.

use super::*;

impl Runner {
    /// Stage the rows the run's sources rejected into the quarantine table.
    pub(super) async fn stage_rejects(
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
    pub(super) async fn stage_bookkeeping(
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
    pub(super) async fn abort(&self, state: &RunState) {
        self.discard(&state.staged).await;
    }

    /// Delete the data files of `staged`.
    pub(super) async fn discard(&self, staged: &[Staged]) {
        for s in staged {
            if let Err(e) = s.discard(&self.wh).await {
                tracing::warn!(table = %s.table, error = %e, "could not remove uncommitted files");
            }
        }
    }

    /// A session on the project's Ballista cluster with every committed table, when the
    /// project runs its SQL on one.
    #[cfg_attr(not(feature = "ballista"), allow(clippy::unused_async))]
    pub(super) async fn cluster_session(
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
    pub(super) async fn record(
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
    pub(super) fn skip(
        &self,
        state: &mut RunState,
        table: &str,
        kind: &'static str,
        why: &'static str,
    ) {
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
}
