//! Identity resolutions in a run: the records added or edited since the last resolution matched
//! again, or every record, and the map, match keys and golden records staged.

use super::*;

impl Runner {
    /// The ids of records whose golden fields differ from the versions of their tables the last
    /// resolution read (new records included): the rows added to each table since, less those
    /// equal to a row of that version. Fails when that cannot be told (no record of those
    /// versions, or their files are gone), and the caller rebuilds everything.
    pub(super) async fn edited_records(
        &self,
        ctx: &SessionContext,
        state: &RunState,
        identity: &Identity,
        key: &StateKey,
        record_ids: &RecordIds,
    ) -> Result<HashSet<String>> {
        let print = state
            .state_before
            .get(key)
            .ok_or_else(|| Error::Internal("no record of the last resolution".into()))?;
        let mut edited: Vec<HashSet<String>> = Vec::new();
        for s in &identity.sources {
            let before = recorded_version(print, &s.table)
                .ok_or_else(|| Error::Internal(format!("no version of '{}' recorded", s.table)))?;
            let now = ctx.table_provider(s.table.as_str()).await?;
            // A row not among those added since that version was in it, as it is.
            let added = self.added_files(state, &s.table, before).await?;
            let now = table_files_provider(&added, now.schema()).await?;
            let old_files = self.wh.files_at(&s.table, Some(before)).await?;
            let old = table_files_provider(&old_files, now.schema()).await?;
            let mut cols: Vec<&str> = vec![s.id.as_str()];
            cols.extend(s.fields.iter().map(|(_, c)| c.as_str()));
            cols.extend(s.updated_at.as_deref());
            cols.sort_unstable();
            cols.dedup();
            let pick =
                |df: DataFrame| df.select(cols.iter().map(|c| ident(*c)).collect::<Vec<_>>());
            let changed = pick(ctx.read_table(now)?)?
                .except(pick(ctx.read_table(old)?)?)?
                .select(vec![cast(ident(&s.id), DataType::Utf8).alias("id")])?
                .collect()
                .await?;
            let mut ids = HashSet::new();
            for b in &changed {
                let col = b.column(0).as_string::<i32>();
                ids.extend(col.iter().flatten().map(str::to_string));
            }
            edited.push(ids);
        }
        record_ids.ids_of(&edited).ok_or_else(|| {
            Error::Internal("an edited record is not among the records matched again".into())
        })
    }

    /// Rows of a table from the log's record counts, less the rows deletion vectors remove:
    /// at a committed version, or (`None`) as this run leaves it. `None` when a file's count is
    /// not recorded.
    pub(super) async fn live_rows(
        &self,
        state: &RunState,
        table: &str,
        version: Option<u64>,
    ) -> Result<Option<u64>> {
        let staged = match version {
            Some(_) => None,
            None => state.staged(table).filter(|s| s.changes()),
        };
        // A committed version's count is in its log; a staged write's files are counted from
        // the log it read and the files it adds.
        let Some(s) = staged else {
            let version = version.or(state.committed.get(table).copied().flatten());
            return match version {
                Some(v) => self.wh.live_rows(table, Some(v)).await,
                None => Ok(None),
            };
        };
        let mut counts = match s.read_version {
            Some(v) => self.wh.record_counts(table, Some(v)).await?,
            None => Default::default(),
        };
        for a in &s.actions {
            if let Action::Add(add) = a
                && let Some(n) = add_record_count(add)
            {
                counts.insert(file_url(&s.url, &add.path), n);
            }
        }
        let files = &s.files;
        let mut rows = 0u64;
        for f in files {
            let Some(n) = counts.get(&f.url) else {
                return Ok(None);
            };
            rows += n.saturating_sub(f.deleted.as_ref().map_or(0, |d| d.count()));
        }
        Ok(Some(rows))
    }

    /// What the record tables of `identity` gained since its last resolution, each added-rows
    /// table registered in `ctx` (for the caller to deregister), when the match-key table that
    /// resolution wrote is still the table's current version and the definition is the same.
    pub(super) async fn match_since(
        &self,
        ctx: &SessionContext,
        state: &RunState,
        identity: &Identity,
        key: &StateKey,
        keys_state: &StateKey,
    ) -> Result<Option<Since>> {
        if self.options.full_refresh {
            return Ok(None);
        }
        let (Some(print), Some(written)) = (
            state.state_before.get(key),
            state.state_before.get(keys_state),
        ) else {
            return Ok(None);
        };
        let same_definition = serde_json::from_str::<serde_json::Value>(print)
            .ok()
            .and_then(|p| p.get("definition")?.as_str().map(str::to_string))
            == Some(definition_hash(&identity.definition()));
        let written: serde_json::Value = serde_json::from_str(written).unwrap_or_default();
        let current = |table: &str, field: &str| {
            written.get(field).and_then(|v| v.as_u64()).is_some()
                && written.get(field).and_then(|v| v.as_u64()) == state.version_after(table)
        };
        if !same_definition
            || !current(&identity.map_table, "map")
            || !current(&identity.keys_table(), "keys")
        {
            return Ok(None);
        }
        let mut since = Since {
            added: Vec::new(),
            rows_then: Vec::new(),
            rows_now: Vec::new(),
            last: written
                .get("figures")
                .and_then(|f| <LastFigures as serde::Deserialize>::deserialize(f).ok()),
        };
        let mut providers = Vec::new();
        for s in &identity.sources {
            let Some(before) = recorded_version(print, &s.table) else {
                return Ok(None);
            };
            let (Some(then), Some(now)) = (
                self.live_rows(state, &s.table, Some(before)).await?,
                self.live_rows(state, &s.table, None).await?,
            ) else {
                return Ok(None);
            };
            let files = self.added_files(state, &s.table, before).await?;
            let full = ctx.table_provider(s.table.as_str()).await?;
            providers.push(table_files_provider(&files, full.schema()).await?);
            since.rows_then.push(then);
            since.rows_now.push(now);
        }
        for (i, provider) in providers.into_iter().enumerate() {
            let name = format!("__kbcrm_added_{}_{i}", identity.entity);
            ctx.deregister_table(name.as_str())?;
            ctx.register_table(name.as_str(), provider)?;
            since.added.push(name);
        }
        Ok(Some(since))
    }

    #[instrument(skip_all, fields(entity = %identity.entity))]
    pub(in crate::run) async fn resolve_identity(
        &self,
        identity: &Identity,
        ctx: &SessionContext,
        state: &mut RunState,
    ) -> Result<()> {
        let started = Instant::now();
        let step = format!("identity:{}", identity.entity);
        let key = inputs_key(&identity.pipeline, &step);
        let keys_state: StateKey = (
            identity.pipeline.clone(),
            step.clone(),
            "match keys".to_string(),
        );
        let keys_table = identity.keys_table();
        let inputs: Vec<String> = identity.sources.iter().map(|s| s.table.clone()).collect();
        let golden_sql = identity.golden_sql();
        let print = fingerprint(&identity.definition(), &inputs, state);
        if self.up_to_date(
            state,
            &key,
            &print,
            &[&identity.map_table, &identity.golden_table, &keys_table],
        ) {
            for table in [&identity.map_table, &identity.golden_table, &keys_table] {
                self.skip(state, table, "identity", "up to date");
            }
            return Ok(());
        }
        let bar = self.progress.step(&format!("match {}", identity.entity));
        let since = self
            .match_since(ctx, state, identity, &key, &keys_state)
            .await?;
        // Matching only the records added since the last resolution runs on one partition,
        // beside the run's other steps, as a narrowed model does.
        let one_partition =
            (since.is_some() && self.threads(state) > 1).then(|| crate::engine::one_partition(ctx));
        let resolution = identity
            .resolve(ctx, state.run_micros, since.as_ref())
            .await;
        for name in since.iter().flat_map(|s| &s.added) {
            ctx.deregister_table(name.as_str())?;
        }
        let Resolution {
            map,
            keys,
            whole,
            stats,
            regrouped,
            record_ids,
        } = resolution?;
        info!(%stats, "identity resolved");
        // A whole resolution replaces both tables; one from the added rows merges the records
        // whose id or rule changed (and, into the key table, the added ones).
        let write = match whole {
            true => Write::Overwrite,
            false => Write::Merge {
                keys: vec!["source".to_string(), "source_id".to_string()],
            },
        };
        // The key table is staged on a task of its own (only the next run reads it) while
        // the map is staged and the records edited since the last run are found here.
        let edited_wanted = regrouped.is_some()
            && !self.options.full_refresh
            && state.version_after(&identity.golden_table).is_some();
        let stage_keys =
            match !whole && keys.num_rows() == 0 {
                true => None,
                false => {
                    let (wh, keys_ctx) = (self.wh.clone(), crate::engine::fork_session(ctx).await?);
                    let (table, write) = (keys_table.clone(), write.clone());
                    Some(tokio::spawn(
                        async move {
                            stage_batch_as(&wh, &keys_ctx, &table, keys, &write, !whole).await
                        }
                        .in_current_span(),
                    ))
                }
            };
        let stage_map = async {
            match !whole && map.num_rows() == 0 {
                true => Ok(None),
                false => stage_batch_as(&self.wh, ctx, &identity.map_table, map, &write, !whole)
                    .await
                    .map(Some),
            }
        };
        let edited = async {
            match edited_wanted {
                true => Some(
                    self.edited_records(ctx, state, identity, &key, &record_ids)
                        .await,
                ),
                false => None,
            }
        };
        let (map_staged, edited) = futures::join!(stage_map, edited);
        let keys_staged = match stage_keys {
            Some(task) => task
                .await
                .map_err(|e| Error::Internal(format!("staging the match keys failed: {e}")))
                .and_then(|staged| staged.map(Some)),
            None => Ok(None),
        };
        // What was staged is recorded (and so removed if the run fails), or removed now once
        // one of them failed.
        let mut failed = None;
        for (table, staged) in [
            (&identity.map_table, map_staged),
            (&keys_table, keys_staged),
        ] {
            match staged {
                Ok(Some(staged)) if failed.is_none() => {
                    let rows = stats.records as u64;
                    let recorded = self
                        .record(
                            ctx,
                            state,
                            staged,
                            StepFigures {
                                kind: "identity",
                                rows_in: rows,
                                rows_rejected: 0,
                                started,
                            },
                        )
                        .await;
                    failed = recorded.err();
                }
                Ok(Some(staged)) => self.discard(std::slice::from_ref(&staged)).await,
                Ok(None) => self.skip(state, table, "identity", "unchanged"),
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        let written = serde_json::json!({
            "map": state.version_after(&identity.map_table),
            "keys": state.version_after(&keys_table),
            "figures": stats.last(),
        });
        state.state_after.insert(keys_state, written.to_string());
        let started = Instant::now();
        // Golden records change only for ids whose records changed: rebuild just those when
        // that is known (the table exists, no id or record disappeared, and the record tables'
        // previous versions can be compared with the current ones).
        let only = match (regrouped, edited) {
            (Some(mut regrouped), Some(edited)) => match edited {
                Ok(edited) => {
                    regrouped.changed.extend(edited);
                    Some(regrouped)
                }
                Err(e) => {
                    info!(reason = %e, "rebuilding every golden record");
                    None
                }
            },
            _ => None,
        };
        // Rebuilding only the golden records of changed ids is on one partition too; all of
        // them, on the session's.
        drop(one_partition);
        let _one_partition =
            (only.is_some() && self.threads(state) > 1).then(|| crate::engine::one_partition(ctx));
        let full_map = match &only {
            Some(Regrouped { changed: ids, gone }) => {
                info!(
                    ids = ids.len(),
                    gone = gone.len(),
                    "rebuilding the golden records of changed ids, removing those of merged ids"
                );
                let full = ctx.table_provider(identity.map_table.as_str()).await?;
                // The map's rows of those ids, from the resolution (which matched every record
                // of them), in memory with their count known: the golden SQL hashes these few
                // rows and streams the record tables past them.
                let rows = record_ids.map_rows(identity, ids)?;
                let narrowed = MemTable::try_new(rows.schema(), vec![vec![rows]])?;
                ctx.deregister_table(identity.map_table.as_str())?;
                ctx.register_table(identity.map_table.as_str(), Arc::new(narrowed))?;
                Some(full)
            }
            None => None,
        };
        // The records of changed ids are few: gathered first, in one partition, the golden
        // fields are then picked in one aggregation instead of a partial and a final one.
        const RECORDS: &str = "__kbcrm_golden_records";
        let written = async {
            match full_map {
                Some(_) => {
                    let records = ctx
                        .sql(&identity.records_sql())
                        .await?
                        .create_physical_plan()
                        .await?;
                    let schema = records.schema();
                    let rows = datafusion::physical_plan::collect(records, ctx.task_ctx()).await?;
                    tracing::debug!(
                        records = rows.iter().map(RecordBatch::num_rows).sum::<usize>(),
                        seconds = started.elapsed().as_secs_f64(),
                        "golden: records of changed ids gathered"
                    );
                    ctx.deregister_table(RECORDS)?;
                    ctx.register_table(RECORDS, Arc::new(MemTable::try_new(schema, vec![rows])?))?;
                    // Typed as the whole query types the golden fields (the table's columns;
                    // its union types a date beside a timestamp as the first).
                    let typed = ctx.sql(&golden_sql).await?.schema().clone();
                    let picked = ctx.sql(&identity.golden_select(RECORDS)).await?.select(
                        typed
                            .fields()
                            .iter()
                            .map(|f| match f.data_type() {
                                // A field only some sources have is left as it comes.
                                DataType::Null => ident(f.name()),
                                t => cast(ident(f.name()), t.clone()).alias(f.name()),
                            })
                            .collect::<Vec<_>>(),
                    )?;
                    write_frame(&self.wh, &identity.golden_table, picked, &[], None).await
                }
                None => {
                    self.write_sql(ctx, &golden_sql, &identity.golden_table, &[], None)
                        .await
                }
            }
        }
        .await
        .map_err(|e| {
            tracing::debug!(entity = %identity.entity, sql = %golden_sql, "the golden-record SQL failed");
            Error::Identity {
                entity: identity.entity.clone(),
                cause: Box::new(e),
            }
        });
        if let Some(full) = full_map {
            ctx.deregister_table(RECORDS)?;
            ctx.deregister_table(identity.map_table.as_str())?;
            ctx.register_table(identity.map_table.as_str(), full)?;
        }
        let new = written?;
        let rows = new.rows;
        let staged = match only {
            Some(Regrouped { gone, .. }) => {
                let keys = [identity.id_column.clone()];
                let schema = Arc::new(Schema::new(vec![Field::new(
                    identity.id_column.as_str(),
                    DataType::Utf8,
                    false,
                )]));
                let gone = StringArray::from_iter_values(gone.iter());
                let gone = RecordBatch::try_new(schema, vec![Arc::new(gone)])?;
                stage_merge_removing(&self.wh, ctx, new, &keys, gone).await?
            }
            None => stage(&self.wh, ctx, new, &Write::Overwrite).await?,
        };
        bar.finish();
        self.record(
            ctx,
            state,
            staged,
            StepFigures {
                kind: "identity",
                rows_in: rows,
                rows_rejected: 0,
                started,
            },
        )
        .await?;
        state.identities.push(stats);
        state.state_after.insert(key, print);
        Ok(())
    }
}
