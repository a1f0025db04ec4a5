//! Read-only SQL over the warehouse's committed tables.

use arrow::record_batch::RecordBatch;
use datafusion::execution::context::SQLOptions;
use datafusion::prelude::SessionContext;

use crate::engine;
use crate::engine::rollup::Rollups;
use crate::error::{Error, Result};
use crate::plan::Project;
use crate::warehouse::Warehouse;

/// A session over the project's warehouse with every committed table registered; on the
/// project's Ballista cluster when it has one (there the run history, `kbcrm_runs`, is not
/// available: it is not a table the cluster can read).
pub async fn session(project: &Project) -> Result<SessionContext> {
    let wh = Warehouse::open(&project.warehouse)?;
    #[cfg(feature = "ballista")]
    if let Some(cluster) = &project.engine.cluster {
        let ctx =
            crate::engine::distributed::session(&project.engine, &engine::today_params(), cluster)
                .await?;
        wh.register_for_cluster(&ctx).await?;
        return Ok(ctx);
    }
    let ctx = engine::session(&project.engine, &engine::today_params())?;
    let versions = wh.register_all(&ctx).await?;
    wh.register_runs(&ctx).await?;
    if project.engine.rollups && Rollups::declared(project) {
        let version_of = |t: &str| versions.get(t).copied().flatten();
        let state = super::state::read_state(&ctx).await?;
        let rollups = Rollups::load(&ctx, project, &version_of, &state).await?;
        rollups.attach(&ctx, |_| true).await?;
    }
    Ok(ctx)
}

/// Options that refuse anything but queries.
pub fn read_only() -> SQLOptions {
    SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
}

/// Run one read-only query and collect its result.
pub async fn query(project: &Project, sql: &str) -> Result<Vec<RecordBatch>> {
    Ok(query_timed(project, sql).await?.0)
}

/// What answering a query took and read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueryFigures {
    /// From the start to the physical plan: the session and the warehouse's tables opened, the
    /// SQL parsed, planned and optimised.
    pub planning: std::time::Duration,
    /// Running the plan to its last row.
    pub execution: std::time::Duration,
    /// Rows of the answer.
    pub rows: usize,
    /// Rows the table scans gave, after what their filters skipped.
    pub rows_scanned: usize,
    /// Bytes read from data files.
    pub bytes_scanned: usize,
    /// Data files (or ranges of them) skipped by their statistics, and all considered.
    pub files_pruned: (usize, usize),
    /// Parquet row groups skipped by their statistics, and all considered.
    pub row_groups_pruned: (usize, usize),
}

impl std::fmt::Display for QueryFigures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
        write!(
            f,
            "planning {:.1} ms, execution {:.1} ms; {} rows; scanned {} rows, {} bytes",
            ms(self.planning),
            ms(self.execution),
            self.rows,
            self.rows_scanned,
            self.bytes_scanned
        )?;
        for (what, (pruned, all)) in [
            ("files", self.files_pruned),
            ("row groups", self.row_groups_pruned),
        ] {
            if all > 0 {
                write!(f, "; {what} pruned {pruned} of {all}")?;
            }
        }
        Ok(())
    }
}

/// [`query`], with what it took and read.
pub async fn query_timed(project: &Project, sql: &str) -> Result<(Vec<RecordBatch>, QueryFigures)> {
    let started = std::time::Instant::now();
    let ctx = session(project).await?;
    let df = ctx
        .sql_with_options(sql, read_only())
        .await
        .map_err(|e| Error::Usage(format!("query failed: {}", e.strip_backtrace())))?;
    let task = std::sync::Arc::new(df.task_ctx());
    let plan = df.create_physical_plan().await?;
    let planning = started.elapsed();
    let executed = std::time::Instant::now();
    let batches = datafusion::physical_plan::collect(plan.clone(), task).await?;
    let mut figures = QueryFigures {
        planning,
        execution: executed.elapsed(),
        rows: batches.iter().map(RecordBatch::num_rows).sum(),
        ..Default::default()
    };
    add_scan_figures(plan.as_ref(), &mut figures);
    let batches = match explained(sql) {
        Some(inner) => match crate::engine::rollup::explain_row(&ctx, &inner).await? {
            Some(row) => crate::engine::rollup::with_explain_row(batches, &row)?,
            None => batches,
        },
        None => batches,
    };
    Ok((batches, figures))
}

/// Add what the scans of `plan` (and of its inputs) read and pruned to `figures`.
fn add_scan_figures(
    plan: &dyn datafusion::physical_plan::ExecutionPlan,
    figures: &mut QueryFigures,
) {
    use datafusion::physical_plan::metrics::MetricValue;
    if let Some(metrics) = plan.metrics()
        && plan.children().is_empty()
    {
        figures.rows_scanned += metrics.output_rows().unwrap_or(0);
        for metric in metrics.iter() {
            match metric.value() {
                MetricValue::Count { name, count } if name == "bytes_scanned" => {
                    figures.bytes_scanned += count.value();
                }
                MetricValue::PruningMetrics {
                    name,
                    pruning_metrics,
                } => {
                    let slot = match name.as_ref() {
                        "files_ranges_pruned_statistics" => &mut figures.files_pruned,
                        "row_groups_pruned_statistics" => &mut figures.row_groups_pruned,
                        _ => continue,
                    };
                    slot.0 += pruning_metrics.pruned();
                    slot.1 += pruning_metrics.pruned() + pruning_metrics.matched();
                }
                _ => {}
            }
        }
    }
    for child in plan.children() {
        add_scan_figures(child.as_ref(), figures);
    }
}

/// The statement `sql` explains, when it is one `EXPLAIN` (without ANALYZE).
fn explained(sql: &str) -> Option<String> {
    use datafusion::sql::sqlparser::dialect::GenericDialect;
    use datafusion::sql::sqlparser::parser::Parser;
    match Parser::parse_sql(&GenericDialect {}, sql).ok()?.as_slice() {
        [stmt] => crate::engine::rollup::explained(stmt),
        _ => None,
    }
}
