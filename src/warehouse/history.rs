//! The run history: one JSON record per pipeline run and per extract, written under
//! `_kbcrm/runs/` in the warehouse whether the run succeeded or failed, and read back as the
//! table `kbcrm_runs` (`kbcrm runs`, `kbcrm query`, the SQL server).
//!
//! Records are files rather than rows of a Delta table so that a failed run, which must leave
//! every table as it was, can still say that it failed, and so that an extract writing its
//! record never races a pipeline run's commit.

use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::MemTable;
use datafusion::logical_expr::{Expr, TableType};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::SessionContext;
use futures::TryStreamExt;
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use super::{META_DIR, Warehouse};
use crate::error::{Error, Result};

/// Name under which the history is queried.
pub const RUNS_TABLE: &str = "kbcrm_runs";

/// What a record is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunKind {
    /// A pipeline run.
    Pipeline,
    /// An extract written (and delivered).
    Extract,
    /// Unreferenced files removed (`kbcrm vacuum`).
    Vacuum,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// Committed (a pipeline) or written and delivered (an extract).
    Succeeded,
    /// Nothing committed (a pipeline), or a delivery failed (an extract; its files exist).
    Failed,
}

/// One table a run wrote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableRecord {
    /// Table name.
    pub table: String,
    /// Version after the run (`None`: the table does not exist yet).
    pub version: Option<u64>,
    /// Rows read or computed.
    pub rows_read: u64,
    /// Rows written.
    pub rows_written: u64,
    /// Rows rejected to quarantine.
    pub rows_rejected: u64,
    /// Whether the run changed it.
    pub changed: bool,
    /// Files removed from its folder (a vacuum).
    #[serde(default)]
    pub files_removed: u64,
    /// Their bytes.
    #[serde(default)]
    pub bytes_removed: u64,
}

/// One run, as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// Run id (UUID v7 for pipeline runs).
    pub run_id: String,
    /// Pipeline or extract.
    pub kind: RunKind,
    /// The pipeline's or the extract's name.
    pub name: String,
    /// What started it: `cli`, `demo`, `schedule`, ...
    pub trigger: String,
    /// The as-of date.
    pub as_of: Option<chrono::NaiveDate>,
    /// Start.
    pub started_at: chrono::DateTime<chrono::Utc>,
    /// End.
    pub ended_at: chrono::DateTime<chrono::Utc>,
    /// Outcome.
    pub status: RunStatus,
    /// Tables the run wrote or left as they were (pipelines).
    #[serde(default)]
    pub tables: Vec<TableRecord>,
    /// Data tests that passed.
    pub tests_passed: u64,
    /// Data tests that failed (errors and warnings).
    pub tests_failed: u64,
    /// Files written, relative to the extract's folder (extracts).
    #[serde(default)]
    pub files: Vec<String>,
    /// Deliveries and their outcomes, in words (extracts).
    #[serde(default)]
    pub deliveries: Vec<String>,
    /// The error, when it failed.
    pub error: Option<String>,
}

impl RunRecord {
    /// A record of a run that started at `started_at` and ends now, succeeded until told
    /// otherwise.
    pub fn new(
        run_id: String,
        kind: RunKind,
        name: &str,
        trigger: &str,
        as_of: Option<chrono::NaiveDate>,
        started_at: chrono::DateTime<chrono::Utc>,
    ) -> Self {
        RunRecord {
            run_id,
            kind,
            name: name.to_string(),
            trigger: trigger.to_string(),
            as_of,
            started_at,
            ended_at: chrono::Utc::now(),
            status: RunStatus::Succeeded,
            tables: Vec::new(),
            tests_passed: 0,
            tests_failed: 0,
            files: Vec::new(),
            deliveries: Vec::new(),
            error: None,
        }
    }

    /// Rows read over all tables.
    pub fn rows_read(&self) -> u64 {
        self.tables.iter().map(|t| t.rows_read).sum()
    }

    /// Rows written over all tables.
    pub fn rows_written(&self) -> u64 {
        self.tables.iter().map(|t| t.rows_written).sum()
    }

    /// Rows rejected over all tables.
    pub fn rows_rejected(&self) -> u64 {
        self.tables.iter().map(|t| t.rows_rejected).sum()
    }
}

impl Warehouse {
    /// Write a run's record. A record that cannot be written is logged, never fatal: the run's
    /// own outcome stands.
    pub async fn record_run(&self, record: &RunRecord) {
        let name = format!(
            "{}-{}.json",
            record.started_at.format("%Y%m%dT%H%M%S%.6fZ"),
            record.run_id
        );
        let path = self.path(&format!("{META_DIR}/runs/{name}"));
        let body = match serde_json::to_vec_pretty(record) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!("cannot encode the run record of {}: {e}", record.run_id);
                return;
            }
        };
        if let Err(e) = self.store().put(&path, PutPayload::from(body)).await {
            tracing::warn!("cannot write the run record {path}: {e}");
        }
    }

    /// Every recorded run, oldest first.
    pub async fn runs(&self) -> Result<Vec<RunRecord>> {
        let dir = self.path(&format!("{META_DIR}/runs"));
        let mut entries: Vec<_> = self.store().list(Some(&dir)).try_collect().await?;
        entries.sort_by(|a, b| a.location.cmp(&b.location));
        let mut out = Vec::new();
        for e in entries {
            if e.location.extension() != Some("json") {
                continue;
            }
            let bytes = self.store().get(&e.location).await?.bytes().await?;
            let record: RunRecord = serde_json::from_slice(&bytes).map_err(|err| {
                Error::warehouse(format!(
                    "the run record {} is not readable ({err}); move it away",
                    e.location
                ))
            })?;
            out.push(record);
        }
        Ok(out)
    }

    /// The recorded run whose id starts with `prefix` (of `kind`, when given).
    pub async fn find_run(&self, prefix: &str, kind: Option<RunKind>) -> Result<RunRecord> {
        let mut found: Vec<RunRecord> = self
            .runs()
            .await?
            .into_iter()
            .filter(|r| r.run_id.starts_with(prefix) && kind.is_none_or(|k| r.kind == k))
            .collect();
        match found.len() {
            1 => Ok(found.remove(0)),
            0 => Err(Error::Usage(format!(
                "no run '{prefix}' in the run history; `kbcrm runs` lists them"
            ))),
            n => Err(Error::Usage(format!(
                "'{prefix}' starts {n} run ids; give more of it"
            ))),
        }
    }

    /// Register the history as the table `kbcrm_runs` (one row per run), read afresh by
    /// every query.
    pub async fn register_runs(&self, ctx: &SessionContext) -> Result<()> {
        ctx.deregister_table(RUNS_TABLE)?;
        ctx.register_table(RUNS_TABLE, Arc::new(RunsTable(self.clone())))?;
        Ok(())
    }
}

/// `kbcrm_runs`: the run records as they are when a query scans them.
#[derive(Debug)]
struct RunsTable(Warehouse);

#[async_trait::async_trait]
impl TableProvider for RunsTable {
    fn schema(&self) -> SchemaRef {
        runs_schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        let runs = self
            .0
            .runs()
            .await
            .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?;
        let batch = runs_batch(&runs)
            .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?;
        MemTable::try_new(runs_schema(), vec![vec![batch]])?
            .scan(state, projection, filters, limit)
            .await
    }
}

/// Schema of `kbcrm_runs`.
pub fn runs_schema() -> SchemaRef {
    let ts = || DataType::Timestamp(TimeUnit::Microsecond, Some(Arc::from("UTC")));
    Arc::new(Schema::new(vec![
        Field::new("run_id", DataType::Utf8, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("name", DataType::Utf8, false),
        Field::new("trigger", DataType::Utf8, false),
        Field::new("as_of", DataType::Date32, true),
        Field::new("started_at", ts(), false),
        Field::new("ended_at", ts(), false),
        Field::new("seconds", DataType::Float64, false),
        Field::new("status", DataType::Utf8, false),
        Field::new("rows_read", DataType::Int64, false),
        Field::new("rows_written", DataType::Int64, false),
        Field::new("rows_rejected", DataType::Int64, false),
        Field::new("tables_changed", DataType::Utf8, false),
        Field::new("tests_passed", DataType::Int64, false),
        Field::new("tests_failed", DataType::Int64, false),
        Field::new("deliveries", DataType::Utf8, false),
        Field::new("error", DataType::Utf8, true),
    ]))
}

fn runs_batch(runs: &[RunRecord]) -> Result<RecordBatch> {
    let text = |f: &dyn Fn(&RunRecord) -> String| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(runs.iter().map(f)))
    };
    let int = |f: &dyn Fn(&RunRecord) -> u64| -> ArrayRef {
        Arc::new(Int64Array::from_iter_values(
            runs.iter().map(|r| f(r) as i64),
        ))
    };
    let time = |f: &dyn Fn(&RunRecord) -> i64| -> ArrayRef {
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(runs.iter().map(f)).with_timezone("UTC"),
        )
    };
    let columns: Vec<ArrayRef> = vec![
        text(&|r| r.run_id.clone()),
        text(&|r| {
            match r.kind {
                RunKind::Pipeline => "pipeline",
                RunKind::Extract => "extract",
                RunKind::Vacuum => "vacuum",
            }
            .into()
        }),
        text(&|r| r.name.clone()),
        text(&|r| r.trigger.clone()),
        Arc::new(arrow::array::Date32Array::from_iter(
            runs.iter().map(|r| r.as_of.map(crate::engine::epoch_days)),
        )),
        time(&|r| r.started_at.timestamp_micros()),
        time(&|r| r.ended_at.timestamp_micros()),
        Arc::new(arrow::array::Float64Array::from_iter_values(
            runs.iter()
                .map(|r| (r.ended_at - r.started_at).num_microseconds().unwrap_or(0) as f64 / 1e6),
        )),
        text(&|r| {
            match r.status {
                RunStatus::Succeeded => "succeeded",
                RunStatus::Failed => "failed",
            }
            .into()
        }),
        int(&RunRecord::rows_read),
        int(&RunRecord::rows_written),
        int(&RunRecord::rows_rejected),
        text(&|r| {
            r.tables
                .iter()
                .filter(|t| t.changed)
                .map(|t| match t.version {
                    Some(v) => format!("{}@{v}", t.table),
                    None => t.table.clone(),
                })
                .collect::<Vec<_>>()
                .join(", ")
        }),
        int(&|r| r.tests_passed),
        int(&|r| r.tests_failed),
        text(&|r| r.deliveries.join("; ")),
        Arc::new(StringArray::from_iter(runs.iter().map(|r| r.error.clone()))),
    ];
    Ok(RecordBatch::try_new(runs_schema(), columns)?)
}

impl Warehouse {
    /// Keep the rows a failed run rejected (`_kbcrm/rejects/<run id>.parquet`), outside every
    /// table: nothing is committed, and `kbcrm rejects --run ID` still lists them.
    pub async fn keep_rejected(&self, run_id: &str, batch: &RecordBatch) -> Result<()> {
        let mut body = Vec::new();
        let mut writer = parquet::arrow::ArrowWriter::try_new(&mut body, batch.schema(), None)?;
        writer.write(batch)?;
        writer.close()?;
        let path = self.path(&format!("{META_DIR}/rejects/{run_id}.parquet"));
        self.store().put(&path, PutPayload::from(body)).await?;
        Ok(())
    }

    /// The rows a failed run rejected, when it kept them ([`Warehouse::keep_rejected`]).
    pub async fn rejected_by(&self, run_id: &str) -> Result<Option<Vec<RecordBatch>>> {
        let path = self.path(&format!("{META_DIR}/rejects/{run_id}.parquet"));
        let bytes = match self.store().get(&path).await {
            Ok(got) => got.bytes().await?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)?
            .build()?;
        Ok(Some(reader.collect::<std::result::Result<Vec<_>, _>>()?))
    }
}
