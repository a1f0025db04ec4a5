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
    let ctx = session(project).await?;
    let df = ctx
        .sql_with_options(sql, read_only())
        .await
        .map_err(|e| Error::Usage(format!("query failed: {}", e.strip_backtrace())))?;
    let batches = df.collect().await?;
    match explained(sql) {
        Some(inner) => match crate::engine::rollup::explain_row(&ctx, &inner).await? {
            Some(row) => crate::engine::rollup::with_explain_row(batches, &row),
            None => Ok(batches),
        },
        None => Ok(batches),
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
