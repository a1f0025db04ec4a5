//! The commands whose work is more than a few lines, one function each; [`super::run`]
//! dispatches to them.

use super::*;

/// `kbcrm run`: pipelines, a backfill or a rerun; the summary or JSON on stdout.
pub(super) async fn run_pipelines(cli: &Cli, args: &RunArgs) -> Result<()> {
    let RunArgs {
        pipelines,
        parallel,
        threads,
        full_refresh,
        as_of,
        from,
        to,
        every,
        rerun,
        output: run_output,
        exit_code_unchanged,
    } = args;
    let project = cli.load()?;
    crate::run::validate::check_models(&project).await?;
    let options = RunOptions {
        parallel: *parallel,
        threads: *threads,
        full_refresh: *full_refresh,
        as_of: *as_of,
        trigger: None,
    };
    let progress = Progress::auto(cli.quiet);
    let reports = if let Some(id) = rerun {
        if !pipelines.is_empty() {
            return Err(Error::Usage(
                "--rerun repeats the recorded run's own pipeline; name no pipelines".into(),
            ));
        }
        crate::run::backfill::rerun(&project, id, progress).await?
    } else if let (Some(from), Some(to)) = (from, to) {
        let every = crate::cubes::evaluate::parse_days(every)?;
        let dates = crate::run::backfill::dates(*from, *to, every)?;
        crate::run::backfill::backfill(&project, pipelines, &dates, options, progress).await?
    } else {
        let runner = Runner::new(&project, options, progress).await?;
        runner.run(pipelines).await?
    };
    match run_output {
        RunOutput::Text => output::run_summary(&reports)?,
        RunOutput::Json => output::run_json(&reports)?,
    }
    let changed = reports.iter().any(|r| r.tables.iter().any(|t| t.changed));
    if *exit_code_unchanged && !changed {
        return Err(Error::Unchanged);
    }
    Ok(())
}

/// `kbcrm runs`: the run history, newest first.
pub(super) async fn runs_list(
    project: &Project,
    name: Option<&str>,
    failed: bool,
    limit: usize,
    format: OutputFormat,
) -> Result<()> {
    let mut filters = Vec::new();
    if let Some(n) = name {
        filters.push(format!("name = {}", crate::warehouse::state::literal(n)));
    }
    if failed {
        filters.push("status = 'failed'".to_string());
    }
    let sql = format!(
        "select run_id, kind, name, trigger, as_of, started_at, \
         round(seconds, 1) as seconds, status, rows_written, tables_changed, \
         error from kbcrm_runs{} order by started_at desc limit {limit}",
        if filters.is_empty() {
            String::new()
        } else {
            format!(" where {}", filters.join(" and "))
        }
    );
    let batches = crate::warehouse::query::query(project, &sql).await?;
    output::batches(&batches, format)
}

/// `kbcrm ballista scheduler|executor`: a process of a Ballista cluster.
#[cfg(feature = "ballista")]
pub(super) async fn ballista(cli: &Cli, role: &BallistaRole) -> Result<()> {
    // A project is optional: its `storage:` settings and memory limit apply when the
    // process starts in one.
    let project = if cli.project_dir().join("kbcrm.yaml").exists() {
        Some(cli.load()?)
    } else {
        None
    };
    match role {
        BallistaRole::Scheduler {
            bind,
            external_host,
        } => {
            output::line(&format!("Ballista scheduler listening on {bind}"))?;
            crate::engine::distributed::scheduler(crate::engine::distributed::SchedulerOptions {
                bind: *bind,
                external_host: external_host.clone(),
            })
            .await
        }
        BallistaRole::Executor {
            scheduler,
            bind_host,
            port,
            grpc_port,
            external_host,
            work_dir,
            vcores,
        } => {
            output::line(&format!(
                "Ballista executor on {bind_host}:{port} (gRPC {grpc_port}) joining {scheduler}"
            ))?;
            crate::engine::distributed::executor(crate::engine::distributed::ExecutorOptions {
                scheduler: scheduler.clone(),
                bind_host: bind_host.clone(),
                port: *port,
                grpc_port: *grpc_port,
                external_host: external_host.clone(),
                work_dir: work_dir.clone(),
                vcores: *vcores,
                memory_limit: project.as_ref().and_then(|p| p.engine.memory_limit),
            })
            .await
        }
    }
}

/// `kbcrm cubes`: build the cubes, or evaluate their predictions on a holdout.
pub(super) async fn cubes(
    cli: &Cli,
    as_of: Option<chrono::NaiveDate>,
    action: Option<&CubesAction>,
) -> Result<()> {
    match action {
        Some(CubesAction::Evaluate { holdout }) => {
            let project = cli.load()?;
            crate::run::validate::check_models(&project).await?;
            let days = crate::cubes::evaluate::parse_days(holdout)?;
            let as_of = crate::cubes::evaluate::calibration_end(&project, days).await?;
            let options = RunOptions {
                as_of: Some(as_of),
                trigger: Some("evaluate".into()),
                ..RunOptions::default()
            };
            Runner::new(&project, options, Progress::auto(cli.quiet))
                .await?
                .run(&[crate::cubes::evaluate::CUBES_PIPELINE.to_string()])
                .await?;
            let e = crate::cubes::evaluate::score(&project, as_of, days).await?;
            output::line(e.to_string().trim_end())
        }
        None => {
            let project = cli.load()?;
            crate::run::validate::check_models(&project).await?;
            let options = RunOptions {
                as_of,
                ..RunOptions::default()
            };
            let runner = Runner::new(&project, options, Progress::auto(cli.quiet)).await?;
            let reports = runner
                .run(&[crate::cubes::evaluate::CUBES_PIPELINE.to_string()])
                .await?;
            output::run_summary(&reports)
        }
    }
}

/// `kbcrm generate`: the sample sources, and the ERP tables into PostgreSQL when asked.
pub(super) async fn generate(
    opts: &crate::generate::GenerateOptions,
    erp_postgres: Option<&str>,
) -> Result<()> {
    let summary = crate::generate::generate(opts)?;
    output::line(&summary.to_string())?;
    if let Some(url) = erp_postgres {
        let loaded = crate::generate::postgres::load_erp(url, &summary, opts.batch).await?;
        for (table, rows, malformed) in loaded {
            output::line(&format!(
                "  {table:<28} {rows:>10} rows loaded into PostgreSQL ({malformed} malformed left out)"
            ))?;
        }
    }
    Ok(())
}

/// `kbcrm user add`: a user's SCRAM verifier written to kbcrm.yaml.
pub(super) fn add_user(cli: &Cli, name: &str, role: &str, password_stdin: bool) -> Result<()> {
    let project = cli.load()?;
    let password = read_password(name, password_stdin)?;
    crate::serve::users::add_user(&project, name, role, &password)?;
    output::line(&format!(
        "user '{name}' (role {role}) written to kbcrm.yaml; a running server picks it up within seconds"
    ))
}

/// `kbcrm serve`: the SQL server, until it is stopped.
pub(super) async fn serve(cli: &Cli, listen: Option<&str>) -> Result<()> {
    let project = cli.load()?;
    let server = crate::serve::Server::bind(project, cli.overrides(), listen).await?;
    let addr = server.local_addr()?;
    output::line(&format!(
        "kbcrm serve: listening on {addr}; connect with psql \"host={} port={} user=NAME dbname=kbcrm\"",
        addr.ip(),
        addr.port()
    ))?;
    server.run().await
}

/// `kbcrm extract`: one extract or every one, written and (unless told not to) delivered.
pub(super) async fn extract(
    cli: &Cli,
    name: Option<&str>,
    out: &std::path::Path,
    as_of: Option<chrono::NaiveDate>,
    deliver: bool,
) -> Result<()> {
    let project = cli.load()?;
    let options = crate::extract::ExtractOptions {
        out: std::path::absolute(out).map_err(|e| Error::io(out, e))?,
        as_of,
        deliver,
        trigger: "cli".into(),
    };
    let reports = crate::extract::extract(&project, name, &options).await?;
    output::extract_summary(&reports)?;
    crate::extract::delivery_failures(&reports)
}

/// `kbcrm schedule`: pipelines and extracts on their cron schedules, until stopped (or once).
pub(super) async fn schedule(cli: &Cli, once: bool, out: &std::path::Path) -> Result<()> {
    let project = cli.load()?;
    crate::run::validate::check_models(&project).await?;
    let options = crate::schedule::ScheduleOptions {
        once,
        out: std::path::absolute(out).map_err(|e| Error::io(out, e))?,
    };
    crate::schedule::schedule(&project, &options).await
}

/// `kbcrm query`: the SQL from the argument, stdin (`-`) or `file`; `timing` adds what it took
/// and read on stderr.
pub(super) async fn query(
    cli: &Cli,
    sql: Option<&str>,
    file: Option<&std::path::Path>,
    timing: bool,
    format: OutputFormat,
) -> Result<()> {
    let project = cli.load()?;
    let sql = match (sql, file) {
        (_, Some(path)) => std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?,
        (Some("-"), None) => {
            std::io::read_to_string(std::io::stdin()).map_err(|e| Error::io("<stdin>", e))?
        }
        (sql, None) => sql.unwrap_or_default().to_string(),
    };
    let (batches, figures) = crate::warehouse::query::query_timed(&project, &sql).await?;
    output::batches(&batches, format)?;
    if timing {
        eprintln!("{figures}");
    }
    Ok(())
}

/// `kbcrm rejects`: the rows `sql` selects from quarantine, or from the rows a failed `run`
/// kept; in words when there is none yet.
pub(super) async fn rejects(
    cli: &Cli,
    sql: &str,
    run: Option<&str>,
    format: OutputFormat,
) -> Result<()> {
    let project = cli.load()?;
    let wh = crate::warehouse::Warehouse::open(&project.warehouse)?;
    if let Some(kept) = match run {
        Some(id) => wh.rejected_by(id).await?,
        None => None,
    } {
        let ctx = datafusion::prelude::SessionContext::new();
        let table =
            datafusion::datasource::MemTable::try_new(crate::run::quarantine_schema(), vec![kept])?;
        ctx.register_table(crate::run::QUARANTINE_TABLE, std::sync::Arc::new(table))?;
        let batches = ctx.sql(sql).await?.collect().await?;
        return output::batches(&batches, format);
    }
    if wh.load(crate::run::QUARANTINE_TABLE).await?.is_none() {
        eprintln!(
            "no row has been rejected here: the warehouse has no quarantine table yet. A run \
             commits rejected rows to it when they are within rejects.max_ratio; a run that fails \
             on the limit names its reasons and first rows in its error, and `kbcrm rejects --run \
             ID` lists them"
        );
        return Ok(());
    }
    let batches = crate::warehouse::query::query(&project, sql).await?;
    output::batches(&batches, format)
}

/// `kbcrm init`: the example project, or (`from` not empty) a pipeline guessed from those files
/// with what was guessed on stderr.
pub(super) fn init(dir: &std::path::Path, from: &[std::path::PathBuf]) -> Result<()> {
    if from.is_empty() {
        let written = crate::cli::init::init(dir)?;
        return output::line(&format!(
            "created {} in {}; next: cd {} && kbcrm run && kbcrm query \"select * from \
             stg_crm_customers\"",
            written.join(", "),
            dir.display(),
            dir.display()
        ));
    }
    let (written, guessed) = crate::cli::init::init_from(dir, from)?;
    eprint!("{guessed}");
    output::line(&format!(
        "created {} in {}; review the guesses in the pipeline file, then: cd {} && kbcrm validate \
         && kbcrm run",
        written.join(", "),
        dir.display(),
        dir.display()
    ))
}

/// `kbcrm vacuum`: the files removed (or that would be) per table, and the total.
pub(super) async fn vacuum(
    cli: &Cli,
    tables: &[String],
    retain: &str,
    dry_run: bool,
) -> Result<()> {
    let retain = crate::plan::access::parse_duration(retain)
        .map_err(|m| Error::Usage(format!("--retain: {m}")))?
        .unwrap_or_default();
    let project = cli.load()?;
    let done = crate::run::upkeep::vacuum(&project, tables, retain, dry_run, "cli").await?;
    let mut out = String::new();
    for t in &done.tables {
        out.push_str(&format!(
            "{:<32} {:>7} files {:>10}\n",
            t.table,
            t.files,
            output::bytes(t.bytes)
        ));
    }
    let verb = if dry_run { "would remove" } else { "removed" };
    out.push_str(&format!(
        "{verb} {} files ({}) no version of the last {} references",
        done.files(),
        output::bytes(done.bytes()),
        humantime::format_duration(retain)
    ));
    output::line(&out)
}
