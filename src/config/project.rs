//! The project file, `kbcrm.yaml`.

use indexmap::IndexMap;
use serde::Deserialize;
use serde_saphyr::Spanned;

/// The project file as written.
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProjectSpec {
    /// Project name.
    #[serde(default)]
    pub name: Option<String>,
    /// Warehouse location: a folder (relative to kbcrm.yaml) or an object-store URL.
    /// Default `warehouse/`.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub warehouse: Option<Spanned<String>>,
    /// Time zone of the cron schedules, e.g. Europe/Berlin; default UTC.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub timezone: Option<Spanned<String>>,
    /// Folder of pipeline files; default `pipelines/`.
    #[serde(default)]
    pub pipelines: Option<String>,
    /// Folder of SQL models; default `sql/`.
    #[serde(default)]
    pub sql: Option<String>,
    /// Object-store settings for an `s3://`, `gs://` or `az://` warehouse or sources, e.g.
    /// `aws_endpoint: http://127.0.0.1:9000`, `aws_region: eu-central-1`. They win over the
    /// `AWS_*`, `GOOGLE_*` and `AZURE_*` environment variables. Credentials are never written
    /// here: a setting ending in `_env` names the environment variable holding the value, e.g.
    /// `aws_secret_access_key_env: WAREHOUSE_SECRET`.
    #[serde(default)]
    #[schemars(with = "IndexMap<String, String>")]
    pub storage: IndexMap<String, Spanned<String>>,
    /// Engine limits.
    #[serde(default)]
    pub engine: EngineSpec,
    /// DataFusion settings passed through, e.g. `datafusion.execution.batch_size: 8192`.
    #[serde(default)]
    pub datafusion: IndexMap<String, serde_json::Value>,
    /// The SQL server (`kbcrm serve`).
    #[serde(default)]
    pub serve: ServeSpec,
    /// Roles of the SQL server's users: which tables they read, PII, row filters.
    #[serde(default)]
    pub roles: IndexMap<String, RoleSpec>,
    /// Columns holding personal data, per table; masked for roles without `pii: true`.
    #[serde(default)]
    pub pii: IndexMap<String, Vec<String>>,
    /// Users of the SQL server, written by `kbcrm user add`.
    #[serde(default)]
    pub users: IndexMap<String, UserSpec>,
    /// OpenLineage run events of every pipeline run (START, then COMPLETE or FAIL).
    #[serde(default)]
    pub openlineage: Option<OpenLineageSpec>,
    /// Decision-support extracts written by `kbcrm extract` (and `kbcrm demo`): the executive
    /// pack of the cubes' findings as a workbook, a dashboard and tables, for one recipient role.
    #[serde(default)]
    pub extracts: IndexMap<String, ExtractSpec>,
    /// Upkeep `kbcrm schedule` runs on its own schedule: `vacuum`.
    #[serde(default)]
    pub maintenance: MaintenanceSpec,
}

/// Scheduled upkeep of the warehouse.
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceSpec {
    /// `kbcrm vacuum` on a schedule.
    #[serde(default)]
    pub vacuum: Option<VacuumSpec>,
}

/// When `kbcrm schedule` vacuums the warehouse, and what it keeps.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VacuumSpec {
    /// Cron expression in the project's time zone, e.g. "0 3 * * 0" (Sundays at 03:00).
    #[schemars(with = "String")]
    pub schedule: Spanned<String>,
    /// Files of versions committed within this period stay, e.g. "7d" (the default).
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub retain: Option<Spanned<String>>,
}

/// Where OpenLineage events go: a file (one JSON event per line) or an HTTP endpoint.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OpenLineageSpec {
    /// File the events are appended to, relative to kbcrm.yaml.
    #[serde(default)]
    pub file: Option<String>,
    /// Endpoint the events are POSTed to, e.g. http://marquez:5000/api/v1/lineage.
    #[serde(default)]
    pub url: Option<String>,
    /// Environment variable holding an API key, sent as a Bearer token.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Namespace of the jobs; default the project name.
    #[serde(default)]
    pub namespace: Option<String>,
}

/// One extract: what goes in, for whom, as of when, in which files, and where they go.
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExtractSpec {
    /// Title of the workbook and the dashboard; default `<project name>: executive pack`.
    #[serde(default)]
    pub title: Option<String>,
    /// The recipient's role (a key of `roles:`): the extract reads only that role's tables,
    /// with its row filters and PII masking. Without a role: every table, PII masked.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub role: Option<Spanned<String>>,
    /// `latest` (the newest as-of date in the cubes; the default) or a date, e.g. 2025-12-31.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub as_of: Option<Spanned<String>>,
    /// Files to write: xlsx, html, csv, parquet. Default [xlsx, html, csv].
    #[serde(default)]
    pub formats: Option<Vec<ExtractFormat>>,
    /// Rows of the customer lists on the dashboard (top CLV, knowledge sources, the
    /// dashboard's churn list); default 25. The workbook lists every red and amber customer.
    #[serde(default)]
    pub top: Option<usize>,
    /// Further tables, name: SQL query over the role's tables. Each becomes a sheet, a
    /// dashboard table and a file.
    #[serde(default)]
    pub queries: IndexMap<String, String>,
    /// Where to send the files once written.
    #[serde(default)]
    pub deliver: Vec<DeliverySpec>,
    /// Attempts per delivery before it counts as failed; default 3.
    #[serde(default)]
    pub attempts: Option<u32>,
    /// Cron expression: `kbcrm schedule` writes and delivers the extract then, after the
    /// pipelines due at the same time.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub schedule: Option<Spanned<String>>,
}

/// How the operators of a query share the engine's memory limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum MemoryPoolKind {
    /// First come, first served; an operator spills when the pool is full.
    Greedy,
    /// Each operator that can spill gets an equal share of the pool.
    Fair,
}

impl std::str::FromStr for MemoryPoolKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "greedy" => Ok(MemoryPoolKind::Greedy),
            "fair" => Ok(MemoryPoolKind::Fair),
            other => Err(format!("'{other}' is neither greedy nor fair")),
        }
    }
}

/// A file format of an extract.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum ExtractFormat {
    /// Excel workbook with native charts.
    Xlsx,
    /// One self-contained HTML dashboard.
    Html,
    /// One CSV file per table.
    Csv,
    /// One Parquet file per table.
    Parquet,
}

/// Where an extract's files go.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum DeliverySpec {
    /// Copy into a folder (relative to kbcrm.yaml, or absolute).
    Folder(String),
    /// Upload under an object-store URL: s3://, gs://, az://, file://.
    Url(String),
    /// Send by e-mail: the workbook attached, the headline figures in the message.
    Email(Box<EmailSpec>),
}

/// E-mail delivery over SMTP.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EmailSpec {
    /// Recipients.
    #[schemars(with = "Vec<String>")]
    pub to: Vec<Spanned<String>>,
    /// Sender, e.g. "kbcrm <reports@example.com>".
    #[schemars(with = "String")]
    pub from: Spanned<String>,
    /// Subject; default `<title>, as of <date>`.
    #[serde(default)]
    pub subject: Option<String>,
    /// SMTP server as host:port.
    #[schemars(with = "String")]
    pub smtp: Spanned<String>,
    /// starttls (default), tls (implicit, usually port 465) or none (loopback relays only).
    #[serde(default)]
    pub tls: SmtpTls,
    /// Environment variable holding the SMTP user name.
    #[serde(default)]
    pub username_env: Option<String>,
    /// Environment variable holding the SMTP password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// PEM file of a certificate authority to trust besides the public ones (relative to
    /// kbcrm.yaml).
    #[serde(default)]
    pub ca_file: Option<String>,
}

/// How the SMTP connection is secured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// Plain connection upgraded with STARTTLS (required).
    #[default]
    Starttls,
    /// TLS from the first byte.
    Tls,
    /// No encryption.
    None,
}

/// Settings of `kbcrm serve`.
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServeSpec {
    /// Address to listen on; default `127.0.0.1:5433` (loopback only).
    #[serde(default)]
    pub listen: Option<String>,
    /// Most clients connected at once; more are refused with error 53300. Default 64.
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// Statement timeout, e.g. "30s" or "5min"; "0" for none. Default 5min. A ceiling: a
    /// session may lower it with `SET statement_timeout`, not raise or remove it.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub statement_timeout: Option<Spanned<String>>,
    /// How often to look for table versions committed by later runs; default "2s".
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub refresh_interval: Option<Spanned<String>>,
    /// TLS certificate and key (PEM files, relative to kbcrm.yaml).
    #[serde(default)]
    pub tls: Option<TlsSpec>,
    /// Refuse clients that do not use TLS.
    #[serde(default)]
    pub require_tls: bool,
    /// Time a client has from connecting to being logged in, e.g. "5s" (the default).
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub login_timeout: Option<Spanned<String>>,
    /// Connections still logging in at once, besides `max_connections`; when more arrive, the
    /// one waiting longest is closed. Default 32.
    #[serde(default)]
    pub max_pending_logins: Option<usize>,
    /// Largest message a logged-in client may send, e.g. "64MiB" (the default); a larger one is
    /// refused with error 08P01 before it is read. Before login the limit is 16 KiB.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub max_message_size: Option<Spanned<String>>,
    /// The name of the one database the server holds, which clients connect to
    /// (`dbname=kbcrm`); default "kbcrm".
    #[serde(default)]
    pub database: Option<String>,
    /// Memory for the decoded columns of the tables queries read, kept between queries so
    /// that a query on an unchanged table does not read and decode its files again, e.g.
    /// "4GiB"; default "1GiB", "0" for none. Apart from `engine.memory_limit`, which bounds
    /// each query's own work.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub cache: Option<Spanned<String>>,
}

/// A TLS certificate chain and its private key.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TlsSpec {
    /// PEM file with the certificate chain.
    pub cert: String,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: String,
}

/// What a role may read.
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RoleSpec {
    /// Tables the role reads: names or globs such as `cube_*`.
    #[serde(default)]
    pub tables: Vec<String>,
    /// Whether the role sees columns listed under `pii:` unmasked.
    #[serde(default)]
    pub pii: bool,
    /// Per table, a SQL condition rows must meet to be seen, e.g. `region = 'North'`.
    #[serde(default)]
    pub row_filter: IndexMap<String, String>,
    /// The role's statement timeout, e.g. "30s"; default `serve.statement_timeout`. A ceiling:
    /// the role's sessions may lower it with `SET statement_timeout`, not raise or remove it.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub statement_timeout: Option<Spanned<String>>,
}

/// A user of the SQL server.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UserSpec {
    /// The user's role (a key of `roles:`).
    #[schemars(with = "String")]
    pub role: Spanned<String>,
    /// The SCRAM-SHA-256 verifier (`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`),
    /// as PostgreSQL stores it; never the password.
    #[schemars(with = "String")]
    pub scram: Spanned<String>,
}

/// Engine limits and tuning.
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EngineSpec {
    /// Where queries run: `local` (default) or `ballista`, an Apache DataFusion Ballista
    /// cluster: the one at `scheduler:`, or without it one started inside the process.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub kind: Option<Spanned<String>>,
    /// The Ballista scheduler, e.g. `df://scheduler:50050` (with `kind: ballista`).
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub scheduler: Option<Spanned<String>>,
    /// Memory the engine may use for queries, e.g. "4GiB" or "512MB"; beyond it sorts,
    /// aggregates and repartitions spill to disk.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub memory_limit: Option<Spanned<String>>,
    /// How operators share `memory_limit`: `greedy` (an operator takes what is free and spills
    /// only when the pool is full) or `fair` (each spilling operator gets an equal share, so
    /// concurrent sorts never starve one another, at the cost of spilling early when one of
    /// them needs most of it). Default: greedy for queries and the server, fair for runs.
    #[serde(default)]
    pub memory_pool: Option<MemoryPoolKind>,
    /// Folder for spill files; default the system temporary folder.
    #[serde(default)]
    pub spill_dir: Option<String>,
    /// Parallelism of query plans; default the number of cores.
    #[serde(default)]
    pub target_partitions: Option<usize>,
    /// Steps of a pipeline run at once: sources loaded and models built side by side, each as
    /// soon as the tables it reads are built; default the number of cores. They share
    /// `memory_limit`; a step that runs out of memory beside others runs again alone.
    #[serde(default)]
    pub threads: Option<usize>,
    /// Rows per record batch; default 8192.
    #[serde(default)]
    pub batch_size: Option<usize>,
    /// Answer aggregate queries from rollups (models with `rollup: true`) where they can;
    /// default true. `KBCRM_ROLLUPS=off` turns it off for one command.
    #[serde(default)]
    pub rollups: Option<bool>,
}

/// Parse a byte size such as "4GiB", "512 MB", "1073741824".
pub fn parse_byte_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size; write e.g. 4GiB, 512MiB or 2GB"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tb" => 1e12,
        "tib" => 1024f64.powi(4),
        other => {
            return Err(format!(
                "unknown size unit '{other}' in '{s}'; use B, KB, KiB, MB, MiB, GB, GiB, TB or TiB"
            ));
        }
    };
    Ok((num * mult) as usize)
}

#[cfg(test)]
mod tests {
    use super::parse_byte_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_byte_size("4GiB"), Ok(4 << 30));
        assert_eq!(parse_byte_size("512 MB"), Ok(512_000_000));
        assert_eq!(parse_byte_size("1.5kib"), Ok(1536));
        assert!(parse_byte_size("lots").is_err());
        assert!(parse_byte_size("4 parsecs").is_err());
    }
}
