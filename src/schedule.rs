//! `kbcrm schedule`: run pipelines and extracts on their cron schedules.
//!
//! Each tick, the jobs whose latest scheduled time has not been run yet are due. Due pipelines
//! run in dependency order (a pipeline whose upstream failed in the same tick waits for its
//! next time), then due extracts. A failed pipeline run is retried with a doubling delay; a run the
//! warehouse's run lock refuses (another run is going on) is skipped for that time. Times
//! missed while the scheduler was down are caught up once (`misfire: run_once`) or not at all
//! (`misfire: skip`). The last time each job ran is kept in the warehouse
//! (`_kbcrm/schedule.json`), so a restarted scheduler, or `--once` under cron, knows what is due.
//!
//! SIGTERM or Ctrl-C stops the scheduler between runs: a run under way finishes and commits
//! (or fails and commits nothing) first. A second signal exits at once; the run's commit is
//! all-or-nothing either way (an interrupted commit is completed by the next run).
//!
//! A face: may import `run`, `extract` and everything below them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use object_store::{ObjectStoreExt, PutPayload};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::plan::Misfire;
use crate::plan::{Pipeline, Project};
use crate::run::{Progress, RunOptions, Runner};
use crate::warehouse::{META_DIR, Warehouse};

/// How to schedule.
#[derive(Debug, Clone)]
pub struct ScheduleOptions {
    /// Run what is due now and return.
    pub once: bool,
    /// Folder scheduled extracts are written in.
    pub out: PathBuf,
}

/// A scheduled thing.
enum Job<'a> {
    Pipeline(&'a Pipeline),
    Extract(&'a crate::plan::extracts::Extract),
    /// `maintenance.vacuum`, with its retention.
    Vacuum(Duration),
}

impl Job<'_> {
    fn key(&self) -> String {
        match self {
            Job::Pipeline(p) => format!("pipeline:{}", p.name),
            Job::Extract(x) => format!("extract:{}", x.name),
            Job::Vacuum(_) => "maintenance:vacuum".to_string(),
        }
    }

    fn misfire(&self) -> Misfire {
        match self {
            Job::Pipeline(p) => p.misfire,
            Job::Extract(_) | Job::Vacuum(_) => Misfire::RunOnce,
        }
    }
}

/// A tick older than this when it is looked at was missed, not just reached.
const MISSED_AFTER: chrono::TimeDelta = chrono::TimeDelta::seconds(60);

fn state_path(wh: &Warehouse) -> object_store::path::Path {
    wh.path(&format!("{META_DIR}/schedule.json"))
}

async fn read_state(wh: &Warehouse) -> Result<BTreeMap<String, DateTime<Utc>>> {
    match wh.store().get(&state_path(wh)).await {
        Ok(r) => {
            let bytes = r.bytes().await?;
            serde_json::from_slice(&bytes).map_err(|e| {
                Error::warehouse(format!(
                    "{} is not readable ({e}); move it away to start the schedule afresh",
                    state_path(wh)
                ))
            })
        }
        Err(object_store::Error::NotFound { .. }) => Ok(BTreeMap::new()),
        Err(e) => Err(e.into()),
    }
}

async fn write_state(wh: &Warehouse, state: &BTreeMap<String, DateTime<Utc>>) -> Result<()> {
    let body = serde_json::to_vec_pretty(state).map_err(|e| Error::Internal(e.to_string()))?;
    wh.store()
        .put(&state_path(wh), PutPayload::from(body))
        .await?;
    Ok(())
}

/// Run the scheduler until stopped (or, with `once`, until what is due has run).
pub async fn schedule(project: &Project, options: &ScheduleOptions) -> Result<()> {
    let tz = project.timezone;
    let jobs = scheduled_jobs(project)?;
    print_next_times(&jobs, tz);

    let stop = CancellationToken::new();
    spawn_signal_watch(stop.clone());
    let wh = Warehouse::open(&project.warehouse)?;
    let mut state = read_state(&wh).await?;
    loop {
        let (due, skipped) = due_jobs(&jobs, tz, &mut state);
        if due.is_empty() && options.once {
            println!("kbcrm schedule: nothing is due");
        }
        let mut failed: Vec<String> = Vec::new();
        for (i, tick) in due {
            if stop.is_cancelled() {
                break;
            }
            let job = &jobs[i].0;
            let ok = run_job(project, job, &failed, &stop, options).await;
            if !ok && let Job::Pipeline(p) = job {
                failed.push(p.name.clone());
            }
            state.insert(job.key(), tick);
            write_state(&wh, &state).await?;
        }
        // Runs wrote their times above; only skipped misfires are left to keep.
        if skipped {
            write_state(&wh, &state).await?;
        }
        if options.once || stop.is_cancelled() {
            break;
        }
        let Some(next) = next_fire(&jobs, tz) else {
            println!("kbcrm schedule: no schedule fires again");
            break;
        };
        let wait = (next - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => break,
        }
    }
    println!("kbcrm schedule: stopped");
    Ok(())
}

/// The pipelines and extracts that have a schedule, with their cron expressions; an error when
/// none has.
fn scheduled_jobs(project: &Project) -> Result<Vec<(Job<'_>, croner::Cron)>> {
    let mut jobs: Vec<(Job, croner::Cron)> = Vec::new();
    for p in &project.pipelines {
        if let Some(expr) = &p.schedule {
            jobs.push((Job::Pipeline(p), parse(expr)?));
        }
    }
    for x in &project.extracts {
        if let Some(expr) = &x.schedule {
            jobs.push((Job::Extract(x), parse(expr)?));
        }
    }
    if let Some((expr, retain)) = &project.vacuum {
        jobs.push((Job::Vacuum(*retain), parse(expr)?));
    }
    if jobs.is_empty() {
        return Err(Error::Usage(
            "nothing is scheduled: give a pipeline (or an extract, or `maintenance.vacuum` in \
             kbcrm.yaml) a `schedule:` cron expression, e.g. schedule: \"0 2 * * *\""
                .into(),
        ));
    }
    Ok(jobs)
}

/// Prints each job with its cron expression and next time.
fn print_next_times(jobs: &[(Job<'_>, croner::Cron)], tz: chrono_tz::Tz) {
    for (job, cron) in jobs {
        let next = cron
            .find_next_occurrence(&Utc::now().with_timezone(&tz), false)
            .map(|t| t.with_timezone(&Utc).to_rfc3339())
            .unwrap_or_else(|_| "never".into());
        println!(
            "kbcrm schedule: {} ({}), next {next}",
            job.key(),
            cron.pattern
        );
    }
}

/// The jobs due now (index, scheduled time), and whether a missed time of a `misfire: skip` job
/// was marked as done in `state` instead.
fn due_jobs(
    jobs: &[(Job<'_>, croner::Cron)],
    tz: chrono_tz::Tz,
    state: &mut BTreeMap<String, DateTime<Utc>>,
) -> (Vec<(usize, DateTime<Utc>)>, bool) {
    let now = Utc::now();
    let local = now.with_timezone(&tz);
    let mut due: Vec<(usize, DateTime<Utc>)> = Vec::new();
    let mut skipped = false;
    for (i, (job, cron)) in jobs.iter().enumerate() {
        let Ok(tick) = cron.find_previous_occurrence(&local, true) else {
            continue;
        };
        let tick = tick.with_timezone(&Utc);
        if state.get(&job.key()).is_some_and(|last| *last >= tick) {
            continue;
        }
        if now - tick > MISSED_AFTER && job.misfire() == Misfire::Skip {
            info!("{}: skipping the missed run of {tick}", job.key());
            println!(
                "kbcrm schedule: {} missed {tick}; skipped (misfire: skip)",
                job.key()
            );
            state.insert(job.key(), tick);
            skipped = true;
            continue;
        }
        due.push((i, tick));
    }
    (due, skipped)
}

/// Runs one due job, unless a pipeline it reads from failed in this tick. Returns whether it
/// ran and succeeded.
async fn run_job(
    project: &Project,
    job: &Job<'_>,
    failed: &[String],
    stop: &CancellationToken,
    options: &ScheduleOptions,
) -> bool {
    match job {
        Job::Pipeline(p) => {
            if let Some(up) = p.depends_on.iter().find(|d| failed.contains(d)) {
                println!(
                    "kbcrm schedule: pipeline {} skipped until its next time: its \
                     upstream pipeline {up} did not run",
                    p.name
                );
                false
            } else {
                run_pipeline(project, p, stop).await
            }
        }
        Job::Extract(x) => {
            let producers = project.producers();
            let upstream = crate::plan::extracts::PACK_INPUTS.iter().find_map(|t| {
                let p = match producers.get(t)? {
                    crate::plan::Producer::Source(s) => &s.pipeline,
                    crate::plan::Producer::Model(m) => &m.pipeline,
                };
                failed.contains(p).then_some(p)
            });
            if let Some(up) = upstream {
                println!(
                    "kbcrm schedule: extract {} skipped until its next time: pipeline \
                     {up}, which builds what it reads, did not run",
                    x.name
                );
                false
            } else {
                run_extract(project, x, options).await
            }
        }
        Job::Vacuum(retain) => run_vacuum(project, *retain).await,
    }
}

/// The scheduled vacuum; a run holding the warehouse skips it until its next time.
async fn run_vacuum(project: &Project, retain: Duration) -> bool {
    match crate::run::upkeep::vacuum(project, &[], retain, false, "schedule").await {
        Ok(done) => {
            println!(
                "kbcrm schedule: vacuum removed {} files ({} bytes), run {}",
                done.files(),
                done.bytes(),
                done.run_id.unwrap_or_default()
            );
            true
        }
        Err(Error::Busy(why)) => {
            println!("kbcrm schedule: vacuum skipped until its next time: {why}");
            false
        }
        Err(e) => {
            warn!("scheduled vacuum failed: {e}");
            println!("kbcrm schedule: vacuum failed: {e}");
            false
        }
    }
}

/// The next time any job fires, if one ever does.
fn next_fire(jobs: &[(Job<'_>, croner::Cron)], tz: chrono_tz::Tz) -> Option<DateTime<Utc>> {
    let now = Utc::now().with_timezone(&tz);
    jobs.iter()
        .filter_map(|(_, c)| c.find_next_occurrence(&now, false).ok())
        .min()
        .map(|t| t.with_timezone(&Utc))
}

fn parse(expr: &str) -> Result<croner::Cron> {
    croner::Cron::from_str(expr).map_err(|e| Error::Usage(format!("schedule '{expr}': {e}")))
}

/// First signal: stop after the current run. Second: exit now.
fn spawn_signal_watch(stop: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    warn!("cannot watch SIGTERM: {e}");
                    return;
                }
            };
        for n in 0.. {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            if n == 0 {
                println!(
                    "kbcrm schedule: stopping after the current run (signal again to stop now)"
                );
                stop.cancel();
            } else {
                println!("kbcrm schedule: stopping now");
                std::process::exit(130);
            }
        }
    });
}

/// One scheduled pipeline run with its retries. Returns whether it committed.
async fn run_pipeline(project: &Project, p: &Pipeline, stop: &CancellationToken) -> bool {
    let attempts = p.retries + 1;
    for attempt in 1..=attempts {
        let options = RunOptions {
            trigger: Some(if attempt == 1 {
                "schedule".into()
            } else {
                format!("schedule retry {}", attempt - 1)
            }),
            ..RunOptions::default()
        };
        let result = match Runner::new(project, options, Progress::hidden()).await {
            Ok(runner) => runner.run_pipeline(p).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(report) => {
                let changed = report.tables.iter().filter(|t| t.changed).count();
                println!(
                    "kbcrm schedule: pipeline {} committed run {} ({changed} tables changed, {:.1}s)",
                    p.name, report.run_id, report.seconds
                );
                return true;
            }
            Err(Error::Busy(why)) => {
                println!(
                    "kbcrm schedule: pipeline {} skipped: another run holds the warehouse ({why})",
                    p.name
                );
                return false;
            }
            Err(e) if attempt < attempts && !stop.is_cancelled() => {
                let wait = p.retry_delay * 2u32.saturating_pow(attempt - 1);
                println!(
                    "kbcrm schedule: pipeline {} failed (attempt {attempt} of {attempts}): {e}; \
                     retrying in {}",
                    p.name,
                    humantime::format_duration(wait)
                );
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.cancelled() => return false,
                }
            }
            Err(e) => {
                println!(
                    "kbcrm schedule: pipeline {} failed (attempt {attempt} of {attempts}): {e}",
                    p.name
                );
                return false;
            }
        }
    }
    false
}

/// One scheduled extract: written, delivered, recorded. Returns whether every delivery went.
async fn run_extract(
    project: &Project,
    x: &crate::plan::extracts::Extract,
    options: &ScheduleOptions,
) -> bool {
    let extract_options = crate::extract::ExtractOptions {
        out: options.out.clone(),
        as_of: None,
        deliver: true,
        trigger: "schedule".into(),
    };
    match crate::extract::extract(project, Some(&x.name), &extract_options).await {
        Ok(reports) => {
            let failed = crate::extract::delivery_failures(&reports);
            for r in &reports {
                println!(
                    "kbcrm schedule: extract {} as of {} written to {}",
                    r.name,
                    r.as_of,
                    r.dir.display()
                );
            }
            match failed {
                Ok(()) => true,
                Err(e) => {
                    println!("kbcrm schedule: extract {}: {e}", x.name);
                    false
                }
            }
        }
        Err(e) => {
            println!("kbcrm schedule: extract {} failed: {e}", x.name);
            false
        }
    }
}
