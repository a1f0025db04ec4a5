//! Backfills and re-runs. A backfill runs the pipelines once per as-of date from `from` to `to`,
//! in order; a date whose runs are already in the history as succeeded backfill runs is not run
//! again, so the same command resumes where a failed backfill stopped. A re-run repeats one
//! recorded run with the same pipeline and as-of date.

use chrono::NaiveDate;

use super::{Progress, RunOptions, RunReport, Runner};
use crate::error::{Error, Result};
use crate::plan::Project;
use crate::warehouse::Warehouse;
use crate::warehouse::history::{RunKind, RunStatus};

/// Trigger recorded for backfill runs.
pub const BACKFILL: &str = "backfill";

/// The as-of dates of a backfill: `from`, `from + every`, ... up to `to`.
pub fn dates(from: NaiveDate, to: NaiveDate, every_days: i64) -> Result<Vec<NaiveDate>> {
    if to < from {
        return Err(Error::Usage(format!(
            "--to {to} is before --from {from}; give the earlier date first"
        )));
    }
    let mut out = Vec::new();
    let mut d = from;
    while d <= to {
        out.push(d);
        d += chrono::Duration::days(every_days.max(1));
    }
    Ok(out)
}

/// Run `pipelines` (all when empty) for each date, skipping dates already backfilled.
pub async fn backfill(
    project: &Project,
    pipelines: &[String],
    dates: &[NaiveDate],
    base: RunOptions,
    progress: Progress,
) -> Result<Vec<RunReport>> {
    let names: Vec<String> = if pipelines.is_empty() {
        project.pipelines.iter().map(|p| p.name.clone()).collect()
    } else {
        pipelines.to_vec()
    };
    let wh = Warehouse::open(&project.warehouse)?;
    let history = wh.runs().await?;
    let done = |name: &str, date: NaiveDate| {
        history.iter().any(|r| {
            r.kind == RunKind::Pipeline
                && r.name == name
                && r.as_of == Some(date)
                && r.trigger == BACKFILL
                && r.status == RunStatus::Succeeded
        })
    };
    let mut reports = Vec::new();
    for (i, date) in dates.iter().enumerate() {
        let todo: Vec<String> = names.iter().filter(|n| !done(n, *date)).cloned().collect();
        if todo.is_empty() {
            println!("backfill {date}: already done");
            continue;
        }
        let options = RunOptions {
            as_of: Some(*date),
            trigger: Some(BACKFILL.into()),
            ..base.clone()
        };
        let runner = Runner::new(project, options, progress.clone()).await?;
        match runner.run(&todo).await {
            Ok(r) => {
                println!(
                    "backfill {date}: {} ({} of {} dates)",
                    todo.join(", "),
                    i + 1,
                    dates.len()
                );
                reports.extend(r);
            }
            Err(e) => {
                println!(
                    "backfill stopped at {date} ({} of {} dates); fix the cause and run the same \
                     command again to resume from there",
                    i + 1,
                    dates.len()
                );
                return Err(e);
            }
        }
    }
    Ok(reports)
}

/// Repeat a recorded pipeline run: same pipeline, same as-of date.
pub async fn rerun(project: &Project, id: &str, progress: Progress) -> Result<Vec<RunReport>> {
    let wh = Warehouse::open(&project.warehouse)?;
    let record = wh.find_run(id, Some(RunKind::Pipeline)).await?;
    if project.pipeline(&record.name).is_none() {
        return Err(Error::Usage(format!(
            "run {} was of pipeline '{}', which the project no longer has",
            record.run_id, record.name
        )));
    }
    let options = RunOptions {
        as_of: record.as_of,
        trigger: Some(format!("rerun of {}", record.run_id)),
        ..RunOptions::default()
    };
    let runner = Runner::new(project, options, progress).await?;
    runner.run(std::slice::from_ref(&record.name)).await
}
