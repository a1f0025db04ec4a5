//! The extracts of kbcrm.yaml, checked when the project loads: roles exist, dates parse,
//! addresses are addresses, query names are table names.

use std::path::PathBuf;
use std::sync::Arc;

use chrono::NaiveDate;

use crate::config::ProjectSpec;
use crate::config::project::{DeliverySpec, EmailSpec, ExtractFormat, ExtractSpec, SmtpTls};
use crate::error::Problem;

use super::PROJECT_FILE;
use super::access::Access;
use super::loader::yaml_pos;

/// Name of the extract `kbcrm extract` writes when kbcrm.yaml declares none.
pub const DEFAULT_EXTRACT: &str = "executive";

/// A validated extract.
#[derive(Debug, Clone)]
pub struct Extract {
    /// Name (a key of `extracts:`).
    pub name: String,
    /// Title of the workbook and dashboard.
    pub title: String,
    /// Recipient role; `None`: every table, PII masked.
    pub role: Option<String>,
    /// Fixed as-of date; `None`: the newest in the cubes.
    pub as_of: Option<NaiveDate>,
    /// Files to write, without repeats, in a fixed order.
    pub formats: Vec<ExtractFormat>,
    /// Rows of the dashboard's customer lists.
    pub top: usize,
    /// Further tables: (name, SQL).
    pub queries: Vec<(String, String)>,
    /// Where the files go.
    pub deliver: Vec<Delivery>,
    /// Attempts per delivery.
    pub attempts: u32,
    /// Cron schedule for `kbcrm schedule`.
    pub schedule: Option<String>,
}

impl Extract {
    /// The executive pack with every default: every table, PII masked, the newest as-of date.
    pub fn default_pack(project_name: &str) -> Extract {
        Extract {
            name: DEFAULT_EXTRACT.into(),
            title: format!("{project_name}: executive pack"),
            role: None,
            as_of: None,
            formats: vec![ExtractFormat::Xlsx, ExtractFormat::Html, ExtractFormat::Csv],
            top: 25,
            queries: Vec::new(),
            deliver: Vec::new(),
            attempts: 3,
            schedule: None,
        }
    }
}

/// A destination of an extract's files.
#[derive(Debug, Clone)]
pub enum Delivery {
    /// A local folder (absolute).
    Folder(PathBuf),
    /// An object-store URL (ends with '/').
    Url(url::Url),
    /// An e-mail.
    Email(Email),
}

/// E-mail delivery settings.
#[derive(Debug, Clone)]
pub struct Email {
    /// Recipients as written.
    pub to: Vec<String>,
    /// Sender as written.
    pub from: String,
    /// Subject, when not the default.
    pub subject: Option<String>,
    /// SMTP host.
    pub host: String,
    /// SMTP port.
    pub port: u16,
    /// Connection security.
    pub tls: SmtpTls,
    /// Variable holding the user name.
    pub username_env: Option<String>,
    /// Variable holding the password.
    pub password_env: Option<String>,
    /// Extra certificate authority (absolute path).
    pub ca_file: Option<PathBuf>,
}

/// Tables the executive pack writes; further queries may not take these names.
pub const PACK_TABLES: &[&str] = &[
    "headline",
    "churn_warnings",
    "risk_by_region",
    "loyalty_tiers",
    "pareto",
    "purchasing_power_bands",
    "top_clv",
    "clv_distribution",
    "knowledge_sources",
    "notes",
];

/// The tables the executive pack reads.
pub const PACK_INPUTS: &[&str] = &[
    "cube_churn_warning",
    "cube_loyalty",
    "cube_purchasing_power",
    "cube_knowledge_source",
    "dim_customer",
];

/// Problems found in kbcrm.yaml, placed at their YAML position when one is known.
struct Reporter<'a> {
    text: &'a Arc<String>,
    problems: &'a mut Vec<Problem>,
}

impl Reporter<'_> {
    /// Records a problem in kbcrm.yaml, at `loc` when given.
    fn at(&mut self, msg: String, loc: Option<&serde_saphyr::Location>) {
        let mut p = Problem::new(PROJECT_FILE, msg);
        if let Some(l) = loc {
            p = p.at(yaml_pos(l, self.text), self.text);
        }
        self.problems.push(p);
    }
}

pub(super) fn build(
    spec: &ProjectSpec,
    text: &Arc<String>,
    root: &std::path::Path,
    project_name: &str,
    access: &Access,
    problems: &mut Vec<Problem>,
) -> Vec<Extract> {
    let mut at = Reporter { text, problems };
    let mut out = Vec::new();
    for (name, e) in &spec.extracts {
        out.push(extract(name, e, root, project_name, access, &mut at));
    }
    out
}

/// One extract from its spec, with every setting checked.
fn extract(
    name: &str,
    e: &ExtractSpec,
    root: &std::path::Path,
    project_name: &str,
    access: &Access,
    at: &mut Reporter<'_>,
) -> Extract {
    let mut x = Extract::default_pack(project_name);
    x.name = name.to_string();
    if !valid_name(name) {
        at.at(
            format!(
                "extracts.{name}: an extract's name names its files; use lower-case letters, \
                 digits, '_' and '-'"
            ),
            None,
        );
    }
    if let Some(t) = &e.title {
        x.title = t.clone();
    }
    if let Some(role) = &e.role {
        check_role(name, role, access, at);
        x.role = Some(role.value.clone());
    }
    if let Some(d) = &e.as_of
        && let Some(date) = as_of(name, d, at)
    {
        x.as_of = Some(date);
    }
    if let Some(f) = &e.formats {
        let mut formats = f.clone();
        formats.sort();
        formats.dedup();
        if formats.is_empty() {
            at.at(
                format!(
                    "extracts.{name}.formats is empty; name at least one of xlsx, html, csv, parquet"
                ),
                None,
            );
        }
        x.formats = formats;
    }
    if let Some(top) = e.top {
        if top == 0 {
            at.at(format!("extracts.{name}.top must be at least 1"), None);
        }
        x.top = top.max(1);
    }
    for (q, sql) in &e.queries {
        check_query_name(name, q, at);
        x.queries.push((q.clone(), sql.clone()));
    }
    if let Some(c) = &e.schedule {
        if let Err(msg) = super::check_cron(&c.value) {
            at.at(
                format!("extracts.{name}.schedule: {msg}"),
                Some(&c.referenced),
            );
        }
        x.schedule = Some(c.value.clone());
    }
    if let Some(n) = e.attempts {
        if n == 0 {
            at.at(format!("extracts.{name}.attempts must be at least 1"), None);
        }
        x.attempts = n.max(1);
    }
    for d in &e.deliver {
        if let Some(delivery) = delivery(name, d, root, at) {
            x.deliver.push(delivery);
        }
    }
    x
}

/// Reports an extract's role that `roles:` does not declare.
fn check_role(
    name: &str,
    role: &serde_saphyr::Spanned<String>,
    access: &Access,
    at: &mut Reporter<'_>,
) {
    if !access.roles.contains_key(&role.value) {
        let known: Vec<&str> = access.roles.keys().map(String::as_str).collect();
        at.at(
            format!(
                "extracts.{name}.role: no role '{}' under roles: (declared: {})",
                role.value,
                if known.is_empty() {
                    "none".into()
                } else {
                    known.join(", ")
                }
            ),
            Some(&role.referenced),
        );
    }
}

/// The fixed as-of date of `as_of:`; `None` for `latest` or a date that does not parse.
fn as_of(
    name: &str,
    d: &serde_saphyr::Spanned<String>,
    at: &mut Reporter<'_>,
) -> Option<NaiveDate> {
    let v = d.value.trim();
    if v == "latest" {
        return None;
    }
    match NaiveDate::parse_from_str(v, "%Y-%m-%d") {
        Ok(date) => Some(date),
        Err(_) => {
            at.at(
                format!(
                    "extracts.{name}.as_of: '{v}' is neither `latest` nor a date like \
                     2025-12-31"
                ),
                Some(&d.referenced),
            );
            None
        }
    }
}

/// Reports a query name that is no table name or that the executive pack already uses.
fn check_query_name(name: &str, q: &str, at: &mut Reporter<'_>) {
    if !valid_table(q) {
        at.at(
            format!(
                "extracts.{name}.queries.{q}: a query's name becomes a sheet and a file; \
                 use lower-case letters, digits and '_'"
            ),
            None,
        );
    } else if PACK_TABLES.contains(&q) {
        at.at(
            format!(
                "extracts.{name}.queries.{q}: the executive pack already writes a table \
                 '{q}'; choose another name"
            ),
            None,
        );
    }
}

/// One destination of an extract; `None` for a URL that does not parse.
fn delivery(
    name: &str,
    d: &DeliverySpec,
    root: &std::path::Path,
    at: &mut Reporter<'_>,
) -> Option<Delivery> {
    match d {
        DeliverySpec::Folder(f) => Some(Delivery::Folder(root.join(f))),
        DeliverySpec::Url(u) => match url::Url::parse(u) {
            Ok(mut url) => {
                if !url.path().ends_with('/') {
                    url.set_path(&format!("{}/", url.path()));
                }
                Some(Delivery::Url(url))
            }
            Err(err) => {
                at.at(
                    format!(
                        "extracts.{name}.deliver: '{u}' is not a URL ({err}); write e.g. \
                         s3://bucket/packs/ or use `folder:` for a local folder"
                    ),
                    None,
                );
                None
            }
        },
        DeliverySpec::Email(m) => Some(Delivery::Email(email(name, m, root, at))),
    }
}

/// E-mail delivery settings, with recipients, sender and SMTP server checked.
fn email(name: &str, m: &EmailSpec, root: &std::path::Path, at: &mut Reporter<'_>) -> Email {
    if m.to.is_empty() {
        at.at(
            format!("extracts.{name}.deliver.email.to names no recipient"),
            None,
        );
    }
    for addr in m.to.iter().chain(std::iter::once(&m.from)) {
        if let Err(err) = addr.value.parse::<lettre::message::Mailbox>() {
            at.at(
                format!(
                    "extracts.{name}.deliver.email: '{}' is not an e-mail \
                     address ({err})",
                    addr.value
                ),
                Some(&addr.referenced),
            );
        }
    }
    let (host, port) = match m.smtp.value.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => {
            (h.to_string(), p.parse().unwrap_or(25))
        }
        _ => {
            at.at(
                format!(
                    "extracts.{name}.deliver.email.smtp: '{}' is not host:port; \
                     write e.g. smtp.example.com:587",
                    m.smtp.value
                ),
                Some(&m.smtp.referenced),
            );
            (String::new(), 0)
        }
    };
    Email {
        to: m.to.iter().map(|t| t.value.clone()).collect(),
        from: m.from.value.clone(),
        subject: m.subject.clone(),
        host,
        port,
        tls: m.tls,
        username_env: m.username_env.clone(),
        password_env: m.password_env.clone(),
        ca_file: m.ca_file.as_ref().map(|f| root.join(f)),
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

fn valid_table(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}
