//! `kbcrm generate --erp-postgres URL`: the generated ERP data loaded into a PostgreSQL database,
//! as a real ERP system would hold it.
//!
//! Tables `erp.customers`, `erp.invoices`, `erp.payments` and `erp.employees` get the columns of
//! the ERP export files with database types, a primary key, and `modified_at` (when the row last
//! changed, as ERP systems keep it): a history row on its own business date (last update,
//! invoice, payment or hire date), a row of batch N on the (N-1)th day after the history; the
//! time of day spreads the rows of one day over working hours. Rows the generator planted as malformed cannot be held by typed columns and are
//! left out. A later batch upserts its rows, so the database moves on the way the files do.

use bytes::Bytes;
use futures::SinkExt;

use super::Summary;
use crate::error::{Error, Result};
use crate::sources::convert::parse_date;
use crate::sources::postgres::Connection;
use crate::sql::quote_ident;

/// Database types of a column.
#[derive(Clone, Copy)]
enum Kind {
    Text,
    Money,
    Int,
    Date(&'static str),
}

struct Table {
    name: &'static str,
    folder: &'static str,
    key: &'static str,
    /// The date column that says when a row of the history last changed.
    changed: &'static str,
    columns: &'static [(&'static str, Kind, bool)],
}

const DE: &str = "%d.%m.%Y";
const ISO: &str = "%Y-%m-%d";

const TABLES: &[Table] = &[
    Table {
        name: "customers",
        folder: "erp/customers/",
        changed: "updated_at",
        key: "erp_customer_id",
        columns: &[
            ("erp_customer_id", Kind::Text, true),
            ("legal_name", Kind::Text, false),
            ("tax_id", Kind::Text, false),
            ("email", Kind::Text, false),
            ("phone", Kind::Text, false),
            ("street", Kind::Text, false),
            ("postcode", Kind::Text, false),
            ("city", Kind::Text, false),
            ("country", Kind::Text, false),
            ("region", Kind::Text, false),
            ("segment", Kind::Text, false),
            ("credit_limit", Kind::Money, false),
            ("payment_terms_days", Kind::Int, false),
            ("created_at", Kind::Date(ISO), false),
            ("updated_at", Kind::Date(ISO), false),
        ],
    },
    Table {
        name: "invoices",
        folder: "erp/invoices/",
        changed: "invoice_date",
        key: "invoice_id",
        columns: &[
            ("invoice_id", Kind::Text, true),
            ("erp_customer_id", Kind::Text, true),
            ("order_ref", Kind::Text, false),
            ("invoice_date", Kind::Date(DE), true),
            ("due_date", Kind::Date(DE), true),
            ("amount", Kind::Money, true),
            ("currency", Kind::Text, false),
        ],
    },
    Table {
        name: "payments",
        folder: "erp/payments/",
        changed: "paid_date",
        key: "payment_id",
        columns: &[
            ("payment_id", Kind::Text, true),
            ("invoice_id", Kind::Text, true),
            ("erp_customer_id", Kind::Text, true),
            ("paid_date", Kind::Date(DE), true),
            ("amount", Kind::Money, true),
            ("method", Kind::Text, false),
        ],
    },
    Table {
        name: "employees",
        folder: "erp/employees/",
        changed: "hire_date",
        key: "employee_id",
        columns: &[
            ("employee_id", Kind::Text, true),
            ("full_name", Kind::Text, false),
            ("role", Kind::Text, false),
            ("region", Kind::Text, false),
            ("email", Kind::Text, false),
            ("hire_date", Kind::Date(ISO), false),
        ],
    },
];

fn ddl(t: &Table) -> String {
    let cols: Vec<String> = t
        .columns
        .iter()
        .map(|(name, kind, required)| {
            let ty = match kind {
                Kind::Text => "text",
                Kind::Money => "numeric(14,2)",
                Kind::Int => "integer",
                Kind::Date(_) => "date",
            };
            let nn = if *required { " NOT NULL" } else { "" };
            format!("{} {ty}{nn}", quote_ident(name))
        })
        .collect();
    format!(
        "CREATE TABLE IF NOT EXISTS erp.{} ({}, modified_at timestamptz NOT NULL, \
         PRIMARY KEY ({}))",
        t.name,
        cols.join(", "),
        quote_ident(t.key)
    )
}

/// One CSV record in database form, or `None` when a value cannot be held by its column.
fn convert(t: &Table, rec: &csv::StringRecord, out: &mut Vec<String>) -> bool {
    out.clear();
    if rec.len() != t.columns.len() {
        return false;
    }
    for ((_, kind, required), v) in t.columns.iter().zip(rec.iter()) {
        let v = v.trim();
        if v.is_empty() {
            if *required {
                return false;
            }
            out.push(String::new());
            continue;
        }
        let ok = match kind {
            Kind::Text => Some(v.to_string()),
            Kind::Money => arrow::compute::kernels::cast_utils::parse_decimal::<
                arrow::datatypes::Decimal128Type,
            >(v, 14, 2)
            .ok()
            .map(|_| v.to_string()),
            Kind::Int => v.parse::<i32>().ok().map(|n| n.to_string()),
            Kind::Date(f) => parse_date(v, Some(f)).map(|d| {
                (chrono::DateTime::UNIX_EPOCH.date_naive() + chrono::Duration::days(i64::from(d)))
                    .format("%Y-%m-%d")
                    .to_string()
            }),
        };
        match ok {
            Some(s) => out.push(s),
            None => return false,
        }
    }
    true
}

/// CSV text for COPY: every field quoted, empty unquoted fields are NULL.
fn copy_line(fields: &[String], modified_at: &str, buf: &mut Vec<u8>) {
    for f in fields {
        if !f.is_empty() {
            buf.push(b'"');
            for b in f.bytes() {
                if b == b'"' {
                    buf.push(b'"');
                }
                buf.push(b);
            }
            buf.push(b'"');
        }
        buf.push(b',');
    }
    buf.extend_from_slice(modified_at.as_bytes());
    buf.push(b'\n');
}

/// What was loaded into each table: (table, rows upserted, malformed rows left out).
pub type Loaded = Vec<(String, u64, u64)>;

/// Load the ERP files of one generated batch into the database at `url`.
pub async fn load_erp(url: &str, summary: &Summary, batch: u32) -> Result<Loaded> {
    let fail = |m: String| Error::Usage(format!("--erp-postgres: {m}"));
    let conn = Connection::parse(url, "--erp-postgres").map_err(fail)?;
    let client = conn.open().await.map_err(fail)?;
    let db = |e: tokio_postgres::Error| {
        fail(
            e.as_db_error()
                .map_or_else(|| e.to_string(), |d| d.message().to_string()),
        )
    };
    client
        .batch_execute("CREATE SCHEMA IF NOT EXISTS erp")
        .await
        .map_err(db)?;
    let batch_day = (super::history_end() + chrono::Duration::days(i64::from(batch) - 1))
        .format("%Y-%m-%d")
        .to_string();
    let mut loaded = Vec::new();
    for t in TABLES {
        client.batch_execute(&ddl(t)).await.map_err(db)?;
        let files: Vec<&str> = summary
            .files
            .iter()
            .filter(|f| f.file.starts_with(t.folder))
            .map(|f| f.file.as_str())
            .collect();
        let cols: Vec<String> = t.columns.iter().map(|(c, ..)| quote_ident(c)).collect();
        let staging = format!("kbcrm_load_{}", t.name);
        client
            .batch_execute(&format!(
                "DROP TABLE IF EXISTS {staging}; \
                 CREATE TEMP TABLE {staging} (LIKE erp.{} INCLUDING DEFAULTS); \
                 ALTER TABLE {staging} ADD COLUMN kbcrm_ord bigserial",
                t.name
            ))
            .await
            .map_err(db)?;
        let sink = client
            .copy_in::<_, Bytes>(&format!(
                "COPY {staging} ({}, modified_at) FROM STDIN (FORMAT csv)",
                cols.join(", ")
            ))
            .await
            .map_err(db)?;
        futures::pin_mut!(sink);
        let (mut rows, mut malformed) = (0u64, 0u64);
        let mut fields = Vec::new();
        let changed = t
            .columns
            .iter()
            .position(|(c, ..)| *c == t.changed)
            .ok_or_else(|| Error::Internal(format!("{}: no column {}", t.name, t.changed)))?;
        let mut buf = Vec::with_capacity(1 << 20);
        for file in files {
            let path = summary.out.join(file);
            let mut reader = csv::ReaderBuilder::new()
                .flexible(true)
                .from_path(&path)
                .map_err(|e| fail(format!("{}: {e}", path.display())))?;
            for rec in reader.records() {
                match rec {
                    Ok(rec) if convert(t, &rec, &mut fields) => {
                        let day = match (&fields[changed], batch) {
                            (d, 1) if !d.is_empty() => d.as_str(),
                            _ => batch_day.as_str(),
                        };
                        // 08:00 to 18:00, a row every 7 seconds.
                        let secs = 8 * 3600 + (rows * 7) % 36_000;
                        let stamp = format!(
                            "{day} {:02}:{:02}:{:02}+00",
                            secs / 3600,
                            secs / 60 % 60,
                            secs % 60
                        );
                        copy_line(&fields, &stamp, &mut buf);
                        rows += 1;
                    }
                    _ => malformed += 1,
                }
                if buf.len() > (1 << 20) {
                    sink.send(Bytes::from(std::mem::take(&mut buf)))
                        .await
                        .map_err(db)?;
                }
            }
        }
        if !buf.is_empty() {
            sink.send(Bytes::from(buf)).await.map_err(db)?;
        }
        sink.finish().await.map_err(db)?;
        let key = quote_ident(t.key);
        let set: Vec<String> = t
            .columns
            .iter()
            .filter(|(c, ..)| *c != t.key)
            .map(|(c, ..)| format!("{q} = EXCLUDED.{q}", q = quote_ident(c)))
            .chain(std::iter::once(
                "modified_at = EXCLUDED.modified_at".to_string(),
            ))
            .collect();
        client
            .batch_execute(&format!(
                "INSERT INTO erp.{name} ({cols}, modified_at) \
                 SELECT DISTINCT ON ({key}) {cols}, modified_at FROM {staging} \
                 ORDER BY {key}, kbcrm_ord DESC \
                 ON CONFLICT ({key}) DO UPDATE SET {set}; \
                 DROP TABLE {staging}; ANALYZE erp.{name}",
                name = t.name,
                cols = cols.join(", "),
                set = set.join(", ")
            ))
            .await
            .map_err(db)?;
        loaded.push((format!("erp.{}", t.name), rows, malformed));
    }
    Ok(loaded)
}
