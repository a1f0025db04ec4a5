//! The `quarantine` table: every rejected row with where it came from and why.

use std::sync::Arc;

use std::collections::HashSet;

use arrow::array::{ArrayRef, AsArray, Int64Array, StringArray, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use datafusion::prelude::SessionContext;

use crate::config::types::UTC;
use crate::error::Result;
use crate::plan::Write;
use crate::sources::Reject;
use crate::warehouse::state::stage_batch;
use crate::warehouse::{Staged, Warehouse};

/// Name of the quarantine table.
pub const QUARANTINE_TABLE: &str = "quarantine";

/// Schema of the quarantine table.
pub fn quarantine_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("run_id", DataType::Utf8, false),
        Field::new("pipeline", DataType::Utf8, false),
        Field::new("source", DataType::Utf8, false),
        Field::new("file", DataType::Utf8, false),
        Field::new("line", DataType::Int64, false),
        Field::new("column_name", DataType::Utf8, true),
        Field::new("raw", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, false),
        Field::new(
            "rejected_at",
            DataType::Timestamp(TimeUnit::Microsecond, Some(Arc::from(UTC))),
            false,
        ),
    ]))
}

/// Stage the run's rejects as an append to `quarantine`. A row already quarantined (same
/// pipeline, source, file and line) is not added again, so re-reading a file is idempotent.
pub(super) async fn stage_rejects(
    wh: &Warehouse,
    ctx: &SessionContext,
    pipeline: &str,
    run_id: &str,
    rejects: &[(String, Reject)],
) -> Result<Option<Staged>> {
    let known = known_rejects(ctx, pipeline).await?;
    let rejects: Vec<&(String, Reject)> = rejects
        .iter()
        .filter(|(s, r)| !known.contains(&(s.clone(), r.file.clone(), r.line as i64)))
        .collect();
    if rejects.is_empty() {
        return Ok(None);
    }
    let schema = quarantine_schema();
    let n = rejects.len();
    let now = chrono::Utc::now().timestamp_micros();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(vec![run_id; n])),
        Arc::new(StringArray::from(vec![pipeline; n])),
        Arc::new(StringArray::from_iter_values(
            rejects.iter().map(|(s, _)| s.as_str()),
        )),
        Arc::new(StringArray::from_iter_values(
            rejects.iter().map(|(_, r)| r.file.as_str()),
        )),
        Arc::new(Int64Array::from_iter_values(
            rejects.iter().map(|(_, r)| r.line as i64),
        )),
        Arc::new(StringArray::from_iter(
            rejects.iter().map(|(_, r)| r.column.as_deref()),
        )),
        Arc::new(StringArray::from_iter_values(
            rejects.iter().map(|(_, r)| r.raw.as_str()),
        )),
        Arc::new(StringArray::from_iter_values(
            rejects.iter().map(|(_, r)| r.reason.as_str()),
        )),
        Arc::new(TimestampMicrosecondArray::from(vec![now; n]).with_timezone(UTC)),
    ];
    let batch = RecordBatch::try_new(schema, columns)?;
    stage_batch(wh, ctx, QUARANTINE_TABLE, batch, &Write::Append)
        .await
        .map(Some)
}

/// (source, file, line) of the rows of `pipeline` already in quarantine.
async fn known_rejects(
    ctx: &SessionContext,
    pipeline: &str,
) -> Result<HashSet<(String, String, i64)>> {
    let mut out = HashSet::new();
    if !ctx.table_exist(QUARANTINE_TABLE)? {
        return Ok(out);
    }
    let sql = format!(
        "select source, file, line from {QUARANTINE_TABLE} where pipeline = '{}'",
        pipeline.replace('\'', "''")
    );
    for batch in ctx.sql(&sql).await?.collect().await? {
        let batch = crate::warehouse::delta_compatible_batch(&batch)?;
        let source = batch.column(0).as_string::<i32>();
        let file = batch.column(1).as_string::<i32>();
        let line = batch
            .column(2)
            .as_primitive::<arrow::datatypes::Int64Type>();
        for i in 0..batch.num_rows() {
            out.insert((
                source.value(i).to_string(),
                file.value(i).to_string(),
                line.value(i),
            ));
        }
    }
    Ok(out)
}
