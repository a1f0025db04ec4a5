//! `kbcrm vacuum` as a run: under the run lock, after completing any run a kill interrupted
//! while committing, each table's unreferenced files older than the retention removed, except
//! those of the versions incremental models last read; recorded in the run history. The CLI
//! and the scheduler (`maintenance.vacuum`) both run it.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::plan::Project;
use crate::warehouse::history::{RunKind, RunRecord, RunStatus, TableRecord};
use crate::warehouse::state::STATE_TABLE;
use crate::warehouse::{Vacuumed, Warehouse};

/// What a vacuum removed (or would remove), per table.
#[derive(Debug, Clone, Default)]
pub struct Vacuum {
    /// The run id it is recorded under (none for a dry run).
    pub run_id: Option<String>,
    /// Per table, in name order.
    pub tables: Vec<Vacuumed>,
}

impl Vacuum {
    /// Files removed.
    pub fn files(&self) -> usize {
        self.tables.iter().map(|t| t.files).sum()
    }

    /// Their bytes.
    pub fn bytes(&self) -> u64 {
        self.tables.iter().map(|t| t.bytes).sum()
    }
}

/// Vacuum `tables` (all when empty) keeping the files of versions committed within `retain`;
/// with `dry_run` only count. `trigger` is recorded (`cli`, `schedule`).
pub async fn vacuum(
    project: &Project,
    tables: &[String],
    retain: Duration,
    dry_run: bool,
    trigger: &str,
) -> Result<Vacuum> {
    let wh = Warehouse::open(&project.warehouse)?;
    let names = wh.table_names().await?;
    if let Some(t) = tables.iter().find(|t| !names.contains(t)) {
        return Err(Error::Usage(format!(
            "the warehouse has no table '{t}' (`kbcrm tables` lists them)"
        )));
    }
    let _lock = super::lock::RunLock::acquire(&wh).await?;
    // Files an interrupted run staged are committed first: they are referenced after that.
    wh.recover().await?;
    // The versions incremental models read at their next run keep their files.
    let ctx = crate::engine::session(&project.engine, &crate::engine::today_params())?;
    if let Some(table) = wh.load(STATE_TABLE).await? {
        wh.register(&ctx, STATE_TABLE, &table).await?;
    }
    let state = crate::warehouse::state::read_state(&ctx).await?;
    let keep = crate::warehouse::upkeep::recorded_inputs(&state);
    let run_id = uuid::Uuid::now_v7().to_string();
    let mut record = RunRecord::new(
        run_id.clone(),
        RunKind::Vacuum,
        "vacuum",
        trigger,
        None,
        chrono::Utc::now(),
    );
    let mut done = Vacuum {
        run_id: (!dry_run).then_some(run_id),
        tables: Vec::new(),
    };
    for name in names
        .iter()
        .filter(|n| tables.is_empty() || tables.contains(n))
    {
        let kept = keep.get(name).map(Vec::as_slice).unwrap_or_default();
        let table = match wh.vacuum_table(name, retain, kept, dry_run).await {
            Ok(t) => t,
            Err(e) => {
                record.status = RunStatus::Failed;
                record.error = Some(e.to_string());
                record.ended_at = chrono::Utc::now();
                if !dry_run {
                    wh.record_run(&record).await;
                }
                return Err(e);
            }
        };
        record.tables.push(TableRecord {
            table: table.table.clone(),
            version: wh.load(name).await?.and_then(|t| t.version()),
            rows_read: 0,
            rows_written: 0,
            rows_rejected: 0,
            changed: false,
            files_removed: table.files as u64,
            bytes_removed: table.bytes,
        });
        done.tables.push(table);
    }
    record.ended_at = chrono::Utc::now();
    if !dry_run {
        wh.record_run(&record).await;
    }
    Ok(done)
}
