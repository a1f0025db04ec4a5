//! kbcrm's own bookkeeping tables, committed in the same run as the data they describe:
//! `kbcrm_state` (cursors, the input versions each model was built from) and
//! `kbcrm_loaded_files` (which source files were loaded).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arrow::array::{
    ArrayRef, AsArray, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::prelude::SessionContext;

use super::write::{NewData, TableWriter, stage};
use super::{Staged, Warehouse, delta_compatible_batch};
use crate::config::types::UTC;
use crate::error::Result;
use crate::plan::{Severity, Write};

/// Name of the state table.
pub const STATE_TABLE: &str = "kbcrm_state";
/// Name of the loaded-files table.
pub const LOADED_FILES_TABLE: &str = "kbcrm_loaded_files";

/// (scope, name, key): e.g. (pipeline, source or model, "cursor").
pub type StateKey = (String, String, String);

/// Schema of `kbcrm_state`.
pub fn state_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("scope", DataType::Utf8, false),
        Field::new("name", DataType::Utf8, false),
        Field::new("key", DataType::Utf8, false),
        Field::new("value", DataType::Utf8, false),
        Field::new("run_id", DataType::Utf8, false),
    ]))
}

/// Schema of `kbcrm_loaded_files`.
pub fn files_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("pipeline", DataType::Utf8, false),
        Field::new("source", DataType::Utf8, false),
        Field::new("file", DataType::Utf8, false),
        Field::new("size", DataType::Int64, false),
        Field::new("run_id", DataType::Utf8, false),
        Field::new(
            "loaded_at",
            DataType::Timestamp(TimeUnit::Microsecond, Some(Arc::from(UTC))),
            false,
        ),
    ]))
}

/// Every state entry, from the committed table registered in `ctx`.
pub async fn read_state(ctx: &SessionContext) -> Result<HashMap<StateKey, String>> {
    let mut out = HashMap::new();
    if !ctx.table_exist(STATE_TABLE)? {
        return Ok(out);
    }
    let sql = format!("select scope, name, key, value from {STATE_TABLE}");
    for batch in ctx.sql(&sql).await?.collect().await? {
        let b = delta_compatible_batch(&batch)?;
        let col = |i: usize| b.column(i).as_string::<i32>().clone();
        let (s, n, k, v) = (col(0), col(1), col(2), col(3));
        for i in 0..b.num_rows() {
            out.insert(
                (
                    s.value(i).to_string(),
                    n.value(i).to_string(),
                    k.value(i).to_string(),
                ),
                v.value(i).to_string(),
            );
        }
    }
    Ok(out)
}

/// Stage the entries whose value differs from `current`; `None` when none does.
pub async fn stage_state(
    wh: &Warehouse,
    ctx: &SessionContext,
    run_id: &str,
    current: &HashMap<StateKey, String>,
    updates: &HashMap<StateKey, String>,
) -> Result<Option<Staged>> {
    let mut changed: Vec<(&StateKey, &String)> = updates
        .iter()
        .filter(|(k, v)| current.get(*k) != Some(*v))
        .collect();
    if changed.is_empty() {
        return Ok(None);
    }
    changed.sort();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            changed.iter().map(|(k, _)| k.0.as_str()),
        )),
        Arc::new(StringArray::from_iter_values(
            changed.iter().map(|(k, _)| k.1.as_str()),
        )),
        Arc::new(StringArray::from_iter_values(
            changed.iter().map(|(k, _)| k.2.as_str()),
        )),
        Arc::new(StringArray::from_iter_values(
            changed.iter().map(|(_, v)| v.as_str()),
        )),
        Arc::new(StringArray::from(vec![run_id; changed.len()])),
    ];
    let batch = RecordBatch::try_new(state_schema(), columns)?;
    let keys = ["scope", "name", "key"].map(String::from).to_vec();
    stage_batch(wh, ctx, STATE_TABLE, batch, &Write::Merge { keys })
        .await
        .map(Some)
}

/// Files of a source already loaded (store paths as shown to users).
pub async fn loaded_files(
    ctx: &SessionContext,
    pipeline: &str,
    source: &str,
) -> Result<HashSet<String>> {
    let mut out = HashSet::new();
    if !ctx.table_exist(LOADED_FILES_TABLE)? {
        return Ok(out);
    }
    let sql = format!(
        "select file from {LOADED_FILES_TABLE} where pipeline = {} and source = {}",
        literal(pipeline),
        literal(source)
    );
    for batch in ctx.sql(&sql).await?.collect().await? {
        let b = delta_compatible_batch(&batch)?;
        let files = b.column(0).as_string::<i32>();
        out.extend(files.iter().flatten().map(str::to_string));
    }
    Ok(out)
}

/// Stage the files loaded in this run: (pipeline, source, file, size).
pub async fn stage_loaded_files(
    wh: &Warehouse,
    ctx: &SessionContext,
    run_id: &str,
    files: &[(String, String, String, u64)],
) -> Result<Option<Staged>> {
    if files.is_empty() {
        return Ok(None);
    }
    let now = chrono::Utc::now().timestamp_micros();
    let n = files.len();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            files.iter().map(|f| f.0.as_str()),
        )),
        Arc::new(StringArray::from_iter_values(
            files.iter().map(|f| f.1.as_str()),
        )),
        Arc::new(StringArray::from_iter_values(
            files.iter().map(|f| f.2.as_str()),
        )),
        Arc::new(Int64Array::from_iter_values(
            files.iter().map(|f| f.3 as i64),
        )),
        Arc::new(StringArray::from(vec![run_id; n])),
        Arc::new(TimestampMicrosecondArray::from(vec![now; n]).with_timezone(UTC)),
    ];
    let batch = RecordBatch::try_new(files_schema(), columns)?;
    stage_batch(wh, ctx, LOADED_FILES_TABLE, batch, &Write::Append)
        .await
        .map(Some)
}

/// Name of the data-test results table.
pub const TEST_RESULTS_TABLE: &str = "kbcrm_test_results";

/// Schema of `kbcrm_test_results`.
pub fn test_results_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("run_id", DataType::Utf8, false),
        Field::new("pipeline", DataType::Utf8, false),
        Field::new("test", DataType::Utf8, false),
        Field::new("severity", DataType::Utf8, false),
        Field::new("failures", DataType::Int64, false),
        Field::new("passed", DataType::Boolean, false),
        Field::new(
            "checked_at",
            DataType::Timestamp(TimeUnit::Microsecond, Some(Arc::from(UTC))),
            false,
        ),
    ]))
}

/// Outcome of one data test.
#[derive(Debug, Clone)]
pub struct TestReport {
    /// Test name.
    pub name: String,
    /// Offending rows found.
    pub failures: u64,
    /// Its severity.
    pub severity: Severity,
    /// How much it read.
    pub checked: Checked,
}

/// How much of its tables a data test read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    /// The tables whole.
    All,
    /// Only the rows this run added: the tables passed the test at the versions the run started
    /// from and the run only added rows to them.
    AddedRows,
    /// The rows this run added and the values found missing at the versions the run started
    /// from: a relationships test that failed there, on tables the run only added rows to.
    AddedAndFailing,
    /// Nothing: the same query over the same table versions as a run before, whose result this
    /// is.
    Reused,
    /// Nothing: a unique test on a table that was unique at the version the run started from,
    /// which the run changed only by merges on keys among the test's columns (a merge replaces
    /// the rows of the keys it writes, and writes each key once).
    KeptByMerge,
}

/// Stage the data-test results of a run.
pub async fn stage_test_results(
    wh: &Warehouse,
    ctx: &SessionContext,
    run_id: &str,
    pipeline: &str,
    tests: &[TestReport],
) -> Result<Staged> {
    let n = tests.len();
    let now = chrono::Utc::now().timestamp_micros();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(vec![run_id; n])),
        Arc::new(StringArray::from(vec![pipeline; n])),
        Arc::new(StringArray::from_iter_values(
            tests.iter().map(|t| t.name.as_str()),
        )),
        Arc::new(StringArray::from_iter_values(tests.iter().map(
            |t| match t.severity {
                Severity::Error => "error",
                Severity::Warn => "warn",
            },
        ))),
        Arc::new(Int64Array::from_iter_values(
            tests.iter().map(|t| t.failures as i64),
        )),
        Arc::new(arrow::array::BooleanArray::from_iter(
            tests.iter().map(|t| Some(t.failures == 0)),
        )),
        Arc::new(TimestampMicrosecondArray::from(vec![now; n]).with_timezone(UTC)),
    ];
    let batch = RecordBatch::try_new(test_results_schema(), columns)?;
    stage_batch(wh, ctx, TEST_RESULTS_TABLE, batch, &Write::Append).await
}

/// Write one in-memory batch as a staged write of `table`.
pub async fn stage_batch(
    wh: &Warehouse,
    ctx: &SessionContext,
    table: &str,
    batch: RecordBatch,
    write: &Write,
) -> Result<Staged> {
    stage_batch_as(wh, ctx, table, batch, write, false).await
}

/// [`stage_batch`] of rows known to repeat no key and each to be new or to differ from the
/// table's row of its keys (`changes`): a merge then neither checks the keys nor compares the
/// rows with the table.
pub async fn stage_batch_as(
    wh: &Warehouse,
    ctx: &SessionContext,
    table: &str,
    batch: RecordBatch,
    write: &Write,
    changes: bool,
) -> Result<Staged> {
    let schema = batch.schema();
    let mut writer = TableWriter::new(&wh.table_url(table), schema.clone())?;
    writer.write(&batch).await?;
    let (adds, rows) = writer.finish().await?;
    let new = NewData {
        table: table.to_string(),
        schema,
        adds,
        source_files: Vec::new(),
        rows,
        cluster_by: Vec::new(),
        files_by: None,
        keys_unique: changes,
        all_changes: changes,
    };
    stage(wh, ctx, new, write).await
}

/// A SQL string literal.
pub fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}
