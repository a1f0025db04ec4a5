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
use crate::sources::{self, Reject};
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
    let batch = rejects_batch(run_id, pipeline, &rejects)?;
    stage_batch(wh, ctx, QUARANTINE_TABLE, batch, &Write::Append)
        .await
        .map(Some)
}

/// Keep the rejects of a run that fails on them where `kbcrm rejects --run ID` finds them,
/// committing nothing; a failure to keep them is logged, and the run's own error stands.
pub(super) async fn keep_failed(
    wh: &Warehouse,
    pipeline: &str,
    run_id: &str,
    rejects: &[&(String, Reject)],
) {
    let kept = match rejects_batch(run_id, pipeline, rejects) {
        Ok(batch) => wh.keep_rejected(run_id, &batch).await,
        Err(e) => Err(e),
    };
    if let Err(e) = kept {
        tracing::warn!("the rejected rows of run {run_id} could not be kept: {e}");
    }
}

/// Rejects as rows of the `quarantine` table.
fn rejects_batch(
    run_id: &str,
    pipeline: &str,
    rejects: &[&(String, Reject)],
) -> Result<RecordBatch> {
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
    Ok(RecordBatch::try_new(schema, columns)?)
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

/// Reasons listed in a failed run's message, and rows shown as examples.
const REASONS_SHOWN: usize = 5;
const EXAMPLES_SHOWN: usize = 3;

/// Rejected rows in words, for a run that failed on them: how many for each reason and column
/// (the value a reason quotes left out), most first, and the first rows with their file, line
/// and raw text (cut and escaped).
pub(super) fn in_words<'a>(rejects: impl Iterator<Item = &'a Reject>) -> String {
    let mut counts: Vec<((Option<&str>, String), u64)> = Vec::new();
    let mut examples = Vec::new();
    for r in rejects {
        let key = (r.column.as_deref(), without_value(&r.reason));
        match counts.iter_mut().find(|(k, _)| *k == key) {
            Some((_, n)) => *n += 1,
            None => counts.push((key, 1)),
        }
        if examples.len() < EXAMPLES_SHOWN {
            examples.push(r);
        }
    }
    counts.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    let mut out = String::from("Why, by rows:");
    for ((column, reason), n) in counts.iter().take(REASONS_SHOWN) {
        match column {
            Some(c) => out.push_str(&format!("\n  {n} × column '{c}': {reason}")),
            None => out.push_str(&format!("\n  {n} × {reason}")),
        }
    }
    if counts.len() > REASONS_SHOWN {
        out.push_str(&format!(
            "\n  and {} other reasons",
            counts.len() - REASONS_SHOWN
        ));
    }
    out.push_str("\nThe first rejected rows:");
    for r in examples {
        out.push_str(&format!(
            "\n  {}:{}: {} ({})",
            r.file,
            r.line,
            shown_raw(&r.raw),
            r.reason
        ));
    }
    out
}

/// A reason with the value it quotes at its start replaced by `<value>`.
fn without_value(reason: &str) -> String {
    let quoted = reason
        .strip_prefix('\'')
        .and_then(|rest| rest.find('\'').map(|end| &rest[end + 1..]));
    match quoted {
        Some(rest) => format!("<value>{rest}"),
        None => reason.to_string(),
    }
}

/// A row's raw text as a message shows it: quoted, escaped, cut at [`sources::SHOWN_BYTES`].
fn shown_raw(raw: &str) -> String {
    let shown = sources::shown(raw);
    match shown.strip_suffix("...") {
        Some(cut) if raw.len() > sources::SHOWN_BYTES => format!("\"{cut}\"..."),
        _ => format!("\"{shown}\""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reject(line: u64, column: Option<&str>, reason: &str, raw: &str) -> Reject {
        Reject {
            file: "data/a.csv".into(),
            line,
            column: column.map(String::from),
            raw: raw.into(),
            reason: reason.into(),
        }
    }

    #[test]
    fn rejects_in_words_count_reasons_and_show_the_first_rows() {
        let rejects = [
            reject(2, None, "expected 3 fields, found 4", "1|2|3|"),
            reject(3, Some("amount"), "'x' is not a decimal(10,2)", "2,x"),
            reject(4, Some("amount"), "'y' is not a decimal(10,2)", "3,y"),
            reject(
                5,
                Some("amount"),
                "'z' is not a decimal(10,2)",
                &"\u{1b}".repeat(300),
            ),
        ];
        let words = in_words(rejects.iter());
        let lines: Vec<&str> = words.lines().collect();
        assert_eq!(
            lines[1],
            "  3 × column 'amount': <value> is not a decimal(10,2)"
        );
        assert_eq!(lines[2], "  1 × expected 3 fields, found 4");
        assert_eq!(
            lines[4],
            "  data/a.csv:2: \"1|2|3|\" (expected 3 fields, found 4)"
        );
        assert_eq!(lines.len(), 7, "{words}");
        let long = shown_raw(&"\u{1b}".repeat(300));
        assert!(
            long.ends_with("...") && long.len() <= 6 * sources::SHOWN_BYTES + 5,
            "{long}"
        );
        assert_eq!(without_value("no quote"), "no quote");
    }
}
