//! The command line: arguments, logging, and one function per command.
//!
//! Owns the commands' arguments and output, `kbcrm demo` ([`demo`]) and `kbcrm init` ([`init`]).
//! A face: it may import every other module; none imports it.

mod commands;
pub mod demo;
pub mod init;
mod output;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::error::{Error, Result};
use crate::plan::{Overrides, Project};
use crate::run::{Progress, RunOptions, Runner};

use commands::*;
pub use output::OutputFormat;

/// kbcrm: customer data warehouse ETL and OLAP engine.
#[derive(Debug, Parser)]
#[command(name = "kbcrm", version, about, long_about = None)]
pub struct Cli {
    /// Project folder (holding kbcrm.yaml); default: the current folder or a parent.
    #[arg(
        short = 'C',
        long,
        global = true,
        value_name = "DIR",
        env = "KBCRM_PROJECT"
    )]
    pub project: Option<PathBuf>,
    /// Warehouse location, overriding kbcrm.yaml (also KBCRM_WAREHOUSE).
    #[arg(long, global = true, value_name = "URL")]
    pub warehouse: Option<String>,
    /// Engine memory limit, e.g. 2GiB (also KBCRM_MEMORY_LIMIT).
    #[arg(long, global = true, value_name = "SIZE")]
    pub memory_limit: Option<String>,
    /// Where queries run: local, ballista (a Ballista cluster inside this process) or a
    /// scheduler's df://host:port (also KBCRM_ENGINE; overrides kbcrm.yaml's engine.kind).
    #[arg(long, global = true, value_name = "ENGINE")]
    pub engine: Option<String>,
    /// More log output (-v info, -vv debug, -vvv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only errors.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

impl Command {
    /// Whether the command builds tables (runs pipelines): a long load whose resident memory
    /// should follow `engine.memory_limit`, rather than a query or the server, which answer
    /// faster when freed memory is kept for reuse.
    pub fn builds_tables(&self) -> bool {
        matches!(
            self,
            Command::Run(_) | Command::Cubes { .. } | Command::Schedule { .. }
        )
    }
}

/// What `kbcrm run` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RunOutput {
    /// A summary per pipeline and table.
    Text,
    /// One JSON document.
    Json,
}

/// The processes of a Ballista cluster.
#[cfg(feature = "ballista")]
#[derive(Debug, Subcommand)]
pub enum BallistaRole {
    /// The scheduler: plans queries into stages and hands their tasks to executors.
    Scheduler {
        /// Address to listen on.
        #[arg(long, default_value = "0.0.0.0:50050")]
        bind: std::net::SocketAddr,
        /// Host name executors and clients reach the scheduler by.
        #[arg(long, default_value = "localhost")]
        external_host: String,
    },
    /// An executor: runs tasks, keeps their shuffle output, serves results over Arrow Flight.
    Executor {
        /// The scheduler, host:port.
        #[arg(long, default_value = "localhost:50050")]
        scheduler: String,
        /// Host to listen on.
        #[arg(long, default_value = "0.0.0.0")]
        bind_host: String,
        /// Arrow Flight port: results and shuffle data.
        #[arg(long, default_value_t = 50051)]
        port: u16,
        /// gRPC port: the scheduler hands tasks here.
        #[arg(long, default_value_t = 50052)]
        grpc_port: u16,
        /// Host name the scheduler, other executors and clients reach this one by; default
        /// the address the scheduler sees.
        #[arg(long)]
        external_host: Option<String>,
        /// Folder for shuffle files; default a temporary folder.
        #[arg(long, value_name = "DIR")]
        work_dir: Option<PathBuf>,
        /// Tasks run at once; default the number of cores.
        #[arg(long)]
        vcores: Option<usize>,
    },
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per event, for schedulers.
    Json,
}

/// The arguments of `kbcrm run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Pipelines to run.
    pub pipelines: Vec<String>,
    /// Source files read at once; default the number of cores.
    #[arg(long)]
    pub parallel: Option<usize>,
    /// Steps run at once (sources loaded, models built), across the pipelines building
    /// side by side; default `engine.threads` in kbcrm.yaml, else the number of cores.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Reload every source file and rebuild every model, ignoring cursors and loaded files.
    #[arg(long)]
    pub full_refresh: bool,
    /// The date the run is as of (`kbcrm_as_of()` in SQL), e.g. 2025-12-31; default today.
    #[arg(long, value_name = "DATE", conflicts_with_all = ["from", "rerun"])]
    pub as_of: Option<chrono::NaiveDate>,
    /// Backfill: one run per as-of date from this date to --to, in order; the same command
    /// resumes after a failure.
    #[arg(long, value_name = "DATE", requires = "to", conflicts_with = "rerun")]
    pub from: Option<chrono::NaiveDate>,
    /// Last as-of date of a backfill.
    #[arg(long, value_name = "DATE", requires = "from")]
    pub to: Option<chrono::NaiveDate>,
    /// Days between backfill dates, e.g. 1d or 1w.
    #[arg(long, default_value = "1d", requires = "from")]
    pub every: String,
    /// Repeat a recorded run (its pipeline, its as-of date); a prefix of the id will do.
    #[arg(long, value_name = "RUN_ID")]
    pub rerun: Option<String>,
    /// What to print on stdout: a summary, or one JSON document (run ids, tables, versions,
    /// rows) for the scheduler that called kbcrm.
    #[arg(long, value_enum, default_value_t = RunOutput::Text)]
    pub output: RunOutput,
    /// Exit with code 4 when the run changed no table (Airflow: skip_on_exit_code=4).
    #[arg(long)]
    pub exit_code_unchanged: bool,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate sample data, run every pipeline and show what was built.
    Demo {
        /// Scale of the sample data (1 = about 100,000 customers).
        #[arg(long, default_value_t = 0.05)]
        scale: f64,
        /// Random seed.
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
    /// Serve the warehouse over the PostgreSQL wire protocol (read-only, SCRAM logins).
    Serve {
        /// Address to listen on; default serve.listen in kbcrm.yaml, else 127.0.0.1:5433.
        #[arg(long, value_name = "HOST:PORT")]
        listen: Option<String>,
    },
    /// Write the executive extracts (workbook, dashboard, tables) and deliver them.
    Extract {
        /// The extract (a key of `extracts:` in kbcrm.yaml); default all, or the built-in
        /// executive pack when none is declared.
        name: Option<String>,
        /// Folder to write into; each extract gets a folder of its own name in it.
        #[arg(long, default_value = "extracts", value_name = "DIR")]
        out: PathBuf,
        /// The cubes' as-of date to report on; default the extract's, else the newest.
        #[arg(long, value_name = "DATE")]
        as_of: Option<chrono::NaiveDate>,
        /// Write the files only; skip the deliveries declared in kbcrm.yaml.
        #[arg(long)]
        no_deliver: bool,
    },
    /// Run pipelines and extracts on their `schedule:` cron expressions until SIGTERM or
    /// Ctrl-C (the run under way finishes first).
    Schedule {
        /// Run what is due now, then exit (for cron or an outside scheduler).
        #[arg(long)]
        once: bool,
        /// Folder scheduled extracts are written in.
        #[arg(long, default_value = "extracts", value_name = "DIR")]
        out: PathBuf,
    },
    /// Run a process of an Apache DataFusion Ballista cluster that knows kbcrm's functions
    /// and object stores (queries use it with `--engine df://host:port`).
    #[cfg(feature = "ballista")]
    Ballista {
        /// Which process.
        #[command(subcommand)]
        role: BallistaRole,
    },
    /// Manage the users of `kbcrm serve`.
    User {
        /// What to do.
        #[command(subcommand)]
        action: UserAction,
    },
    /// Start a project in a folder: kbcrm.yaml, one pipeline, one model, a little data.
    Init {
        /// The folder (created when missing).
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Write a pipeline from these files or folders instead of the example: each becomes a
        /// source whose format, CSV options and column types are guessed from its first lines.
        #[arg(long, num_args = 1.., value_name = "PATH")]
        from: Vec<PathBuf>,
    },
    /// Check the project: YAML specs, SQL models and the DAG. Exits 2 with the problems.
    Validate,
    /// Run pipelines (all, in dependency order, when none are named).
    Run(RunArgs),
    /// Build the cubes (the `cubes` pipeline), or check how well they predict.
    Cubes {
        /// The date the cubes are as of; default today.
        #[arg(long, value_name = "DATE")]
        as_of: Option<chrono::NaiveDate>,
        /// What to do instead of building.
        #[command(subcommand)]
        action: Option<CubesAction>,
    },
    /// List rows rejected to quarantine: where they came from and why.
    Rejects {
        /// Only this pipeline.
        #[arg(long)]
        pipeline: Option<String>,
        /// Only this run; also a run that failed on `rejects.max_ratio` and committed nothing.
        #[arg(long)]
        run: Option<String>,
        /// Count rows per source and reason instead of listing them.
        #[arg(long)]
        summary: bool,
        /// Most rows listed.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = OutputFormat::Table)]
        format: OutputFormat,
    },
    /// Run a SQL query over the warehouse.
    Query {
        /// The SQL; `-` reads it from stdin. It may start with a `--` comment.
        #[arg(allow_hyphen_values = true, required_unless_present = "file")]
        sql: Option<String>,
        /// Read the SQL from this file instead.
        #[arg(long, value_name = "FILE.sql", conflicts_with = "sql")]
        file: Option<std::path::PathBuf>,
        /// Print on stderr what the query took and read: planning and execution time, rows,
        /// rows and bytes scanned, files and row groups pruned.
        #[arg(long)]
        timing: bool,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = OutputFormat::Table)]
        format: OutputFormat,
    },
    /// List the warehouse's tables: version, rows, size, last run.
    Tables {
        /// Show each table's files instead: the current version's, and those no current version
        /// references (which `kbcrm vacuum` removes).
        #[arg(long)]
        files: bool,
    },
    /// Remove the data files no table version within the retention period references: files
    /// replaced by merges and overwrites, and files of runs killed before they committed.
    /// Takes the run lock; versions committed within the retention stay readable.
    Vacuum {
        /// Only these tables (default: all).
        tables: Vec<String>,
        /// Keep the files of versions committed within this period, e.g. 7d, 12h, 0 for none
        /// (time travel to older versions then fails).
        #[arg(long, default_value = "7d", value_name = "DURATION")]
        retain: String,
        /// Only say what would be removed.
        #[arg(long)]
        dry_run: bool,
    },
    /// The run history: pipeline runs and extracts, newest first (also the table kbcrm_runs).
    Runs {
        /// Show one run in full instead.
        #[command(subcommand)]
        action: Option<RunsAction>,
        /// Only runs of this pipeline or extract.
        #[arg(long)]
        name: Option<String>,
        /// Only failed runs.
        #[arg(long)]
        failed: bool,
        /// Most runs listed.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = OutputFormat::Table)]
        format: OutputFormat,
    },
    /// How old each source's newest file is, against its `freshness:` thresholds; exits 3
    /// when one is past `error_after`.
    Freshness {
        /// Every source, not only those with thresholds.
        #[arg(long)]
        all: bool,
    },
    /// Print where every table comes from: sources, models, identity resolutions, extracts.
    Lineage {
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = crate::run::lineage::LineageFormat::Text)]
        format: crate::run::lineage::LineageFormat,
    },
    /// Print the JSON Schema of pipeline files (or of kbcrm.yaml) for editors.
    Schema {
        /// The schema of kbcrm.yaml instead of pipeline files.
        #[arg(long)]
        project_file: bool,
    },
    /// Generate realistic ERP, sales and service source files.
    Generate {
        /// Scale (1 = about 100,000 customers and 5 million order lines).
        #[arg(long, default_value_t = 0.05)]
        scale: f64,
        /// Random seed.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Output folder.
        #[arg(long, default_value = "sources")]
        out: PathBuf,
        /// 1 writes the history; N > 1 writes the files of the (N-1)th day after it.
        #[arg(long, default_value_t = 1)]
        batch: u32,
        /// Also load the batch's ERP data into this PostgreSQL database (tables erp.customers,
        /// erp.invoices, erp.payments, erp.employees; a later batch upserts). Read from the
        /// environment variable KBCRM_ERP_POSTGRES_URL when not given, which keeps the password
        /// out of the process list.
        #[arg(
            long,
            value_name = "URL",
            env = "KBCRM_ERP_POSTGRES_URL",
            hide_env_values = true
        )]
        erp_postgres: Option<String>,
    },
}

/// `kbcrm user` actions.
#[derive(Debug, Subcommand)]
pub enum UserAction {
    /// Add a user of `kbcrm serve` (or change a user's password and role): the password's
    /// SCRAM-SHA-256 verifier is written to kbcrm.yaml, never the password.
    Add {
        /// User name.
        name: String,
        /// Role (declared under `roles:` in kbcrm.yaml).
        #[arg(long)]
        role: String,
        /// Read the password from the first line of standard input instead of prompting.
        #[arg(long)]
        password_stdin: bool,
    },
}

/// `kbcrm runs` actions.
#[derive(Debug, Subcommand)]
pub enum RunsAction {
    /// Everything recorded about one run: tables, versions, rows, tests, deliveries, error.
    Show {
        /// The run id, or its first characters.
        id: String,
    },
}

/// `kbcrm cubes` actions.
#[derive(Debug, Subcommand)]
pub enum CubesAction {
    /// Build the cubes as of (last purchase − holdout) and score them on what happened next:
    /// purchases predicted against actual, and the churn warning's ROC AUC, precision and recall.
    Evaluate {
        /// Length of the holdout, e.g. 90d or 12w.
        #[arg(long, default_value = "90d")]
        holdout: String,
    },
}

/// Start logging on stderr: `-v`/`-q` and `RUST_LOG` set the level.
pub fn init_tracing(cli: &Cli) {
    use tracing_subscriber::EnvFilter;
    let default = match (cli.quiet, cli.verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, 2) => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env()
        // Ballista's scheduler reports, as an error, when it cannot print a finished stage's
        // metrics; nothing is wrong with the query. delta-rs's vacuum warns that keeping
        // versions is an experimental API (`kbcrm vacuum` keeps the ones models read).
        .unwrap_or_else(|_| {
            EnvFilter::new(format!(
                "kbcrm={default},warn,ballista_scheduler::display=off,\
                 deltalake_core::operations::vacuum=error"
            ))
        });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_target(false).compact().init(),
    }
}

impl Cli {
    fn project_dir(&self) -> PathBuf {
        self.project.clone().unwrap_or_else(|| PathBuf::from("."))
    }

    fn overrides(&self) -> Overrides {
        Overrides::from_env().with(Overrides {
            warehouse: self.warehouse.clone(),
            memory_limit: self.memory_limit.clone(),
            engine: self.engine.clone(),
            rollups: None,
            memory_pool: None,
        })
    }

    fn load(&self) -> Result<Project> {
        Project::load(&self.project_dir(), &self.overrides())
    }
}

/// Run the parsed command.
pub async fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Init { dir, from } => init(dir, from),
        Command::Validate => {
            let project = cli.load()?;
            crate::run::validate::check_models(&project).await?;
            crate::run::validate::check_source_files(&project).await?;
            let models: usize = project.pipelines.iter().map(|p| p.models.len()).sum();
            let sources: usize = project.pipelines.iter().map(|p| p.sources.len()).sum();
            output::line(&format!(
                "ok: {} pipelines, {sources} sources, {models} models",
                project.pipelines.len()
            ))
        }
        Command::Run(args) => run_pipelines(&cli, args).await,
        Command::Query {
            sql,
            file,
            timing,
            format,
        } => query(&cli, sql.as_deref(), file.as_deref(), *timing, *format).await,
        Command::Rejects {
            pipeline,
            run,
            summary,
            limit,
            format,
        } => {
            let sql = rejects_sql(pipeline.as_deref(), run.as_deref(), *summary, *limit);
            rejects(&cli, &sql, run.as_deref(), *format).await
        }
        Command::Cubes { as_of, action } => cubes(&cli, *as_of, action.as_ref()).await,
        Command::Extract {
            name,
            out,
            as_of,
            no_deliver,
        } => extract(&cli, name.as_deref(), out, *as_of, !*no_deliver).await,
        Command::Schedule { once, out } => schedule(&cli, *once, out).await,
        Command::Runs {
            action,
            name,
            failed,
            limit,
            format,
        } => {
            let project = cli.load()?;
            match action {
                Some(RunsAction::Show { id }) => output::run_record(&project, id).await,
                None => runs_list(&project, name.as_deref(), *failed, *limit, *format).await,
            }
        }
        Command::Freshness { all } => {
            let project = cli.load()?;
            let results = crate::sources::freshness::check(&project, *all).await?;
            let (text, verdict) = crate::sources::freshness::report(&results);
            output::line(text.trim_end())?;
            verdict
        }
        Command::Lineage { format } => {
            let project = cli.load()?;
            output::line(crate::run::lineage::render(&project, *format).trim_end())
        }
        Command::Tables { files } => {
            let project = cli.load()?;
            output::tables(&project, *files).await
        }
        Command::Vacuum {
            tables,
            retain,
            dry_run,
        } => vacuum(&cli, tables, retain, *dry_run).await,
        Command::Schema { project_file } => {
            let schema = if *project_file {
                crate::config::project_json_schema()
            } else {
                crate::config::pipeline_json_schema()
            };
            output::line(&serde_json::to_string_pretty(&schema).unwrap_or_default())
        }
        Command::Generate {
            scale,
            seed,
            out,
            batch,
            erp_postgres,
        } => {
            let opts = crate::generate::GenerateOptions {
                scale: *scale,
                seed: *seed,
                out: out.clone(),
                batch: *batch,
            };
            generate(&opts, erp_postgres.as_deref()).await
        }
        Command::Demo { scale, seed } => crate::cli::demo::demo(&cli, *scale, *seed).await,
        Command::Serve { listen } => serve(&cli, listen.as_deref()).await,
        #[cfg(feature = "ballista")]
        Command::Ballista { role } => ballista(&cli, role).await,
        Command::User {
            action:
                UserAction::Add {
                    name,
                    role,
                    password_stdin,
                },
        } => add_user(&cli, name, role, *password_stdin),
    }
}

fn read_password(name: &str, from_stdin: bool) -> Result<String> {
    if from_stdin {
        let mut line = String::new();
        std::io::stdin()
            .read_line(&mut line)
            .map_err(|e| Error::Usage(format!("cannot read the password from stdin: {e}")))?;
        return Ok(line.trim_end_matches(['\n', '\r']).to_string());
    }
    let first = rpassword::prompt_password(format!("Password for {name}: ")).map_err(|e| {
        Error::Usage(format!(
            "cannot read the password: {e}; use --password-stdin"
        ))
    })?;
    let again = rpassword::prompt_password("Again: ")
        .map_err(|e| Error::Usage(format!("cannot read the password: {e}")))?;
    if first != again {
        return Err(Error::Usage(
            "the two passwords differ; nothing written".into(),
        ));
    }
    Ok(first)
}

/// A value quoted at the start of a reject reason.
const QUOTED_VALUE: &str = "^'[^']*'";

/// The query behind `kbcrm rejects`.
fn rejects_sql(pipeline: Option<&str>, run: Option<&str>, summary: bool, limit: usize) -> String {
    use crate::warehouse::state::literal;
    let mut filters = Vec::new();
    if let Some(p) = pipeline {
        filters.push(format!("pipeline = {}", literal(p)));
    }
    if let Some(r) = run {
        filters.push(format!("run_id = {}", literal(r)));
    }
    let filter = if filters.is_empty() {
        String::new()
    } else {
        format!(" where {}", filters.join(" and "))
    };
    if summary {
        // The offending value is quoted at the start of most reasons; group without it.
        format!(
            "select pipeline, source, coalesce(column_name, '') as column_name, \
             regexp_replace(reason, {pattern}, '<value>') as reason, count(*) as rows \
             from quarantine{filter} group by 1, 2, 3, 4 order by rows desc, 1, 2, 3 limit {limit}",
            pattern = literal(QUOTED_VALUE)
        )
    } else {
        format!(
            "select pipeline, source, file, line, column_name, reason, raw from quarantine{filter} \
             order by rejected_at desc, file, line limit {limit}"
        )
    }
}

/// Project loading for the demo.
pub(crate) fn load_project(cli: &Cli) -> Result<Project> {
    cli.load()
}

/// Print run summaries on stdout.
pub(crate) fn print_run_summary(reports: &[crate::run::RunReport]) -> Result<()> {
    output::run_summary(reports)
}

/// Print what extracts wrote on stdout.
pub(crate) fn print_extract_summary(reports: &[crate::extract::ExtractReport]) -> Result<()> {
    output::extract_summary(reports)
}

/// Print query results on stdout.
pub(crate) fn print_batches(
    batches: &[arrow::record_batch::RecordBatch],
    format: OutputFormat,
) -> Result<()> {
    output::batches(batches, format)
}
