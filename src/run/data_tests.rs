//! Data tests: each checked once the tables it reads are built, on the rows a run added where
//! that gives the whole tables' answer, on the tables whole otherwise.

use super::*;

impl Runner {
    /// The reports of the pipeline's data tests, in the pipeline's order, with their results
    /// recorded for the next run; an error when a test of severity `error` failed.
    pub(super) fn test_reports(
        &self,
        pipeline: &Pipeline,
        state: &mut RunState,
    ) -> Result<Vec<TestReport>> {
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
    pub(super) async fn check_test(
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
        let failing_before =
            kept_failing_values(ctx, t, state, &failing_key, failures_before, before).await;
        let added = added_to_check(
            ctx,
            t,
            state,
            before,
            &print,
            failures_before,
            failing_before.is_some(),
        )
        .await;
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
            let (failures, failing) =
                check_added(ctx, pipeline, t, table, files, failing_before).await?;
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

/// The values a relationships test that checks added rows found missing when it last ran (on
/// other table versions: `before`), all of them, with the test's reference; `None` when it
/// found none, or they cannot be read.
async fn kept_failing_values<'t>(
    ctx: &SessionContext,
    t: &'t crate::plan::DataTest,
    state: &RunState,
    failing_key: &StateKey,
    failures_before: Option<u64>,
    before: Option<&String>,
) -> Option<(arrow::record_batch::RecordBatch, &'t crate::plan::Reference)> {
    match (&t.referenced, &t.added_rows, failures_before, before) {
        (Some(r), Some(_), Some(n), Some(_)) if n > 0 => {
            match state.state_before.get(failing_key) {
                Some(kept) => failing_values(ctx, &t.table, &r.column, kept)
                    .await
                    .filter(|v| v.num_rows() as u64 == n)
                    .map(|values| (values, r)),
                None => None,
            }
        }
        _ => None,
    }
}

/// The table whose added rows a test may check instead of its tables whole, with the files the
/// run added to it: when its last check (`before`) was on other table versions and passed, or
/// kept the values that failed (`failing`).
async fn added_to_check<'t>(
    ctx: &SessionContext,
    t: &'t crate::plan::DataTest,
    state: &RunState,
    before: Option<&String>,
    print: &str,
    failures_before: Option<u64>,
    failing: bool,
) -> Option<(&'t str, Option<Files>)> {
    // A custom SQL test that filters the rows of one table, each on its own, checks
    // added rows like the built-in per-row tests (its query is planned to tell only
    // when it passed before on other table versions).
    let added = match before {
        Some(b) if *b != print && (failures_before == Some(0) || failing) => {
            let table = match &t.added_rows {
                Some(_) => Some(t.table.as_str()),
                None => row_local_table(ctx, t).await,
            };
            table.and_then(|table| added_rows(b, t, table, state).map(|narrowed| (table, narrowed)))
        }
        _ => None,
    };
    // A relationships test whose referenced table was rewritten narrows only when none
    // of the values its rows may refer to went away.
    match added {
        Some((table, narrowed)) => match (narrowed.referenced_removed, &t.referenced) {
            (None, _) => Some((table, narrowed.added)),
            (Some(removed), Some(r)) => values_kept(ctx, &r.to_table, &r.to_column, removed)
                .await
                .then_some((table, narrowed.added)),
            (Some(_), None) => None,
        },
        None => None,
    }
}

/// Check only the rows added to `table` (in `files`; `None` when it gained none): with the
/// test's query for added rows, over them and the values that failed before; else with its own
/// query, over them in place of the table. The failures and failing values.
async fn check_added(
    ctx: &SessionContext,
    pipeline: &Pipeline,
    t: &crate::plan::DataTest,
    table: &str,
    files: Option<Files>,
    failing_before: Option<(arrow::record_batch::RecordBatch, &crate::plan::Reference)>,
) -> Result<(u64, Option<String>)> {
    Ok(match (files, &t.added_rows, failing_before) {
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
    })
}

/// What checking one data test found, and the state entries that record it.
pub(super) struct TestChecked {
    pub(super) key: StateKey,
    pub(super) print: String,
    pub(super) result_key: StateKey,
    pub(super) failures: u64,
    /// For a relationships test that was checked, its failing values' state entry (empty when
    /// none failed or too many did to keep).
    pub(super) failing: Option<(StateKey, String)>,
    pub(super) checked: Checked,
    pub(super) seconds: f64,
}

/// Up to this many failing values of a relationships test are kept for the next run, which then
/// checks them and its added rows instead of the tables whole.
pub(super) const MAX_FAILING_KEPT: u64 = 10_000;
/// The state entry keeping them.
pub(super) const FAILING_VALUES: &str = "failing values";

/// The rows of a data test's query; for a relationships test also its failing values (the
/// query's first column) as kept in the state, JSON lines, unless there are none or more than
/// [`MAX_FAILING_KEPT`].
pub(super) async fn failing_rows(
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
pub(super) async fn failing_values(
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
pub(super) async fn row_local_table<'t>(
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
pub(super) type Files = (Vec<DataFile>, arrow::datatypes::SchemaRef);

/// What a data test may check instead of its tables whole.
pub(super) struct Narrowed {
    /// The files this run added to the table it checks, with their schema (`None`: it gained
    /// none).
    pub(super) added: Option<Files>,
    /// The files this run removed from the table a relationships test refers to (`None` when it
    /// only gained rows): the added rows are enough only if every value of the referenced column
    /// in them is still in that table. A file the run marked rows of is here whole: its rows
    /// still in the table are kept, and rows marked before are checked again.
    pub(super) referenced_removed: Option<Files>,
}

/// Whether a data test may check only the rows this run added: its last check (`before`, its
/// fingerprint) was of the same query over the table versions this run started from, and the run
/// only added files to the tables it reads (the table a relationships test refers to may also
/// have been rewritten: see [`Narrowed::referenced_removed`]).
pub(super) fn added_rows(
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
pub(super) fn last_ran_on_start_versions(
    before: &str,
    t: &crate::plan::DataTest,
    state: &RunState,
) -> bool {
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
pub(super) fn kept_unique_by_merges(
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
    let record = ["source".to_string(), "source_id".to_string()];
    let merge_keys = pipeline
        .sources
        .iter()
        .filter(|s| s.table == t.table)
        .map(|s| match &s.write {
            Write::Merge { keys } => Some(keys.as_slice()),
            _ => None,
        })
        .chain(
            pipeline
                .models
                .iter()
                .filter(|m| m.name == t.table)
                .map(|m| m.write.is_merge().then(|| m.write.keys())),
        )
        .chain(
            pipeline
                .identities
                .iter()
                .filter(|i| i.map_table == t.table || i.keys_table() == t.table)
                .map(|_| Some(record.as_slice())),
        )
        .next();
    let Some(Some(keys)) = merge_keys else {
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
        && writes.all(|s| s.operation == Operation::Merge && s.read_version == Some(committed))
}

/// Whether every non-null value of `column` in `removed` (files a run took out of `table`) is
/// still in `table` as the run leaves it. `false` when that cannot be told: the test then reads
/// its tables whole, and reports what is wrong with them.
pub(super) async fn values_kept(
    ctx: &SessionContext,
    table: &str,
    column: &str,
    removed: Files,
) -> bool {
    pub(super) const REMOVED: &str = "__kbcrm_removed";
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
