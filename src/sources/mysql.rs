//! MySQL and MariaDB tables and queries as sources.
//!
//! The same contract as [`super::postgres`]: the URL comes from an environment variable or a
//! file and never appears in a message; declared columns are checked against the server's column
//! types before anything is read; rows are read with the binary protocol and appended whole to
//! Arrow builders of the declared schema, a value that does not fit sending its row to
//! quarantine. The session runs in UTC and with `ANSI_QUOTES`, so identifiers are quoted as in
//! standard SQL (a `query:` writes its string literals in single quotes).

use std::time::Duration;

use mysql_async::consts::ColumnType as My;
use mysql_async::prelude::Queryable;
use mysql_async::{Column as MyColumn, Conn, OptsBuilder, SslOpts, Value};

use super::convert::{Cell, RowBuilder, parse_text};
use super::csv::recycle;
use super::database::{ReadQuery, bounds_sql, select_sql, url_text};
use super::{BATCH_ROWS, FileOutput, Reject, source_error};
use crate::config::types::ColumnType;
use crate::error::Result;
use crate::plan::{Column, Database, Relation, Source};
use crate::sql::{quote_ident, quote_literal};

/// The binary character set: a BLOB, not text.
const BINARY: u16 = 63;
/// A resolved connection: the options mysql_async takes, and what to name it by.
pub struct Connection {
    opts: mysql_async::Opts,
    timeout: Duration,
    /// `host:port/database` (no user, no password).
    pub display: String,
    /// `mysql://host:port` for lineage.
    pub namespace: String,
    /// The database name.
    pub database: String,
}

/// A column's type as the server describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kind {
    ty: My,
    binary: bool,
}

impl Kind {
    fn of(c: &MyColumn) -> Kind {
        Kind {
            ty: c.column_type(),
            binary: c.character_set() == BINARY,
        }
    }

    /// The type's name in messages, as SQL writes it.
    pub fn name(&self) -> String {
        let text = |t: &str, b: &str| if self.binary { b } else { t }.to_string();
        match self.ty {
            My::MYSQL_TYPE_TINY => "tinyint".into(),
            My::MYSQL_TYPE_SHORT => "smallint".into(),
            My::MYSQL_TYPE_INT24 => "mediumint".into(),
            My::MYSQL_TYPE_LONG => "int".into(),
            My::MYSQL_TYPE_LONGLONG => "bigint".into(),
            My::MYSQL_TYPE_DECIMAL | My::MYSQL_TYPE_NEWDECIMAL => "decimal".into(),
            My::MYSQL_TYPE_FLOAT => "float".into(),
            My::MYSQL_TYPE_DOUBLE => "double".into(),
            My::MYSQL_TYPE_DATE | My::MYSQL_TYPE_NEWDATE => "date".into(),
            My::MYSQL_TYPE_DATETIME | My::MYSQL_TYPE_DATETIME2 => "datetime".into(),
            My::MYSQL_TYPE_TIMESTAMP | My::MYSQL_TYPE_TIMESTAMP2 => "timestamp".into(),
            My::MYSQL_TYPE_VARCHAR | My::MYSQL_TYPE_VAR_STRING => text("varchar", "varbinary"),
            My::MYSQL_TYPE_STRING => text("char", "binary"),
            My::MYSQL_TYPE_TINY_BLOB
            | My::MYSQL_TYPE_MEDIUM_BLOB
            | My::MYSQL_TYPE_LONG_BLOB
            | My::MYSQL_TYPE_BLOB => text("text", "blob"),
            other => format!("{other:?}")
                .trim_start_matches("MYSQL_TYPE_")
                .to_lowercase(),
        }
    }

    /// The SQL type to cast a watermark literal to.
    fn cast_target(&self) -> &'static str {
        match self.ty {
            My::MYSQL_TYPE_DATE | My::MYSQL_TYPE_NEWDATE => "DATE",
            My::MYSQL_TYPE_DATETIME
            | My::MYSQL_TYPE_DATETIME2
            | My::MYSQL_TYPE_TIMESTAMP
            | My::MYSQL_TYPE_TIMESTAMP2 => "DATETIME(6)",
            My::MYSQL_TYPE_TINY
            | My::MYSQL_TYPE_SHORT
            | My::MYSQL_TYPE_LONG
            | My::MYSQL_TYPE_INT24
            | My::MYSQL_TYPE_LONGLONG => "SIGNED",
            My::MYSQL_TYPE_DECIMAL | My::MYSQL_TYPE_NEWDECIMAL => "DECIMAL(65,30)",
            My::MYSQL_TYPE_FLOAT | My::MYSQL_TYPE_DOUBLE => "DOUBLE",
            _ => "CHAR",
        }
    }
}

fn is_int(t: My) -> bool {
    matches!(
        t,
        My::MYSQL_TYPE_TINY
            | My::MYSQL_TYPE_SHORT
            | My::MYSQL_TYPE_LONG
            | My::MYSQL_TYPE_INT24
            | My::MYSQL_TYPE_LONGLONG
            | My::MYSQL_TYPE_YEAR
    )
}

fn is_text(k: Kind) -> bool {
    !k.binary
        && matches!(
            k.ty,
            My::MYSQL_TYPE_VARCHAR
                | My::MYSQL_TYPE_VAR_STRING
                | My::MYSQL_TYPE_STRING
                | My::MYSQL_TYPE_TINY_BLOB
                | My::MYSQL_TYPE_MEDIUM_BLOB
                | My::MYSQL_TYPE_LONG_BLOB
                | My::MYSQL_TYPE_BLOB
                | My::MYSQL_TYPE_ENUM
                | My::MYSQL_TYPE_SET
                | My::MYSQL_TYPE_JSON
        )
}

/// Whether a server column type can be read as a declared type, losslessly.
fn compatible(declared: ColumnType, k: Kind) -> bool {
    let t = k.ty;
    match declared {
        ColumnType::String | ColumnType::Json => is_text(k),
        ColumnType::Int => matches!(
            t,
            My::MYSQL_TYPE_TINY
                | My::MYSQL_TYPE_SHORT
                | My::MYSQL_TYPE_INT24
                | My::MYSQL_TYPE_LONG
                | My::MYSQL_TYPE_YEAR
        ),
        ColumnType::BigInt => is_int(t),
        ColumnType::Double => {
            is_int(t)
                || matches!(
                    t,
                    My::MYSQL_TYPE_FLOAT
                        | My::MYSQL_TYPE_DOUBLE
                        | My::MYSQL_TYPE_DECIMAL
                        | My::MYSQL_TYPE_NEWDECIMAL
                )
        }
        ColumnType::Decimal(..) => {
            is_int(t) || matches!(t, My::MYSQL_TYPE_DECIMAL | My::MYSQL_TYPE_NEWDECIMAL)
        }
        // MySQL's BOOLEAN is TINYINT(1).
        ColumnType::Bool => matches!(t, My::MYSQL_TYPE_TINY | My::MYSQL_TYPE_BIT),
        ColumnType::Date => matches!(t, My::MYSQL_TYPE_DATE | My::MYSQL_TYPE_NEWDATE),
        ColumnType::Timestamp => matches!(
            t,
            My::MYSQL_TYPE_DATETIME
                | My::MYSQL_TYPE_DATETIME2
                | My::MYSQL_TYPE_TIMESTAMP
                | My::MYSQL_TYPE_TIMESTAMP2
                | My::MYSQL_TYPE_DATE
                | My::MYSQL_TYPE_NEWDATE
        ),
    }
}

/// Parse a source's connection URL without ever echoing it (it holds a password).
pub fn connection(source: &Source, db: &Database) -> Result<Connection> {
    let raw = url_text(&db.connection).map_err(|m| source_error(source, m))?;
    Connection::parse(&raw, &db.connection.to_string()).map_err(|m| source_error(source, m))
}

impl Connection {
    /// Parse `mysql://USER:PASSWORD@HOST:PORT/DATABASE?sslmode=...&sslrootcert=...`; `from`
    /// names where it came from in messages.
    pub fn parse(raw: &str, from: &str) -> std::result::Result<Connection, String> {
        let bad = |what: &str| {
            format!(
                "the URL in {from} is not a MySQL URL ({what}); write \
                 mysql://USER:PASSWORD@HOST:PORT/DATABASE"
            )
        };
        let url = url::Url::parse(raw.trim()).map_err(|e| bad(&e.to_string()))?;
        if !matches!(url.scheme(), "mysql" | "mariadb") {
            return Err(bad(&format!("scheme '{}'", url.scheme())));
        }
        let mut sslmode = String::from("prefer");
        let mut rootcert = None;
        let mut timeout = Duration::from_secs(10);
        for (k, v) in url.query_pairs() {
            match k.as_ref() {
                "sslmode" | "ssl-mode" => sslmode = v.to_lowercase().replace('_', "-"),
                "sslrootcert" | "ssl-ca" => rootcert = Some(v.to_string()),
                "connect_timeout" => {
                    timeout = Duration::from_secs(
                        v.parse()
                            .map_err(|_| bad("connect_timeout is not a number"))?,
                    )
                }
                other => return Err(bad(&format!("unknown setting '{other}'"))),
            }
        }
        let host = url.host_str().unwrap_or("localhost").to_string();
        let port = url.port().unwrap_or(3306);
        let database = url.path().trim_start_matches('/').to_string();
        if database.is_empty() {
            return Err(bad("no database name after the host"));
        }
        let decode = percent_decode;
        let ssl = match sslmode.as_str() {
            "disable" | "disabled" | "prefer" | "preferred" if rootcert.is_none() => None,
            "disable" | "disabled" => None,
            "require" | "required" | "prefer" | "preferred" | "verify-ca" | "verify-full"
            | "verify-identity" => {
                let mut ssl = SslOpts::default();
                if let Some(path) = &rootcert {
                    std::fs::metadata(path)
                        .map_err(|e| format!("cannot read sslrootcert {path}: {e}"))?;
                    ssl = ssl
                        .with_root_certs(vec![std::path::PathBuf::from(path).into()])
                        .with_disable_built_in_roots(true);
                }
                let verify_chain = rootcert.is_some()
                    || matches!(
                        sslmode.as_str(),
                        "verify-ca" | "verify-full" | "verify-identity"
                    );
                let verify_host = matches!(sslmode.as_str(), "verify-full" | "verify-identity");
                Some(
                    ssl.with_danger_accept_invalid_certs(!verify_chain)
                        .with_danger_skip_domain_validation(!verify_host),
                )
            }
            other => {
                return Err(bad(&format!(
                    "sslmode '{other}'; use disable, prefer, require, verify-ca or verify-full"
                )));
            }
        };
        let opts = OptsBuilder::default()
            .ip_or_hostname(host.clone())
            .tcp_port(port)
            .user((!url.username().is_empty()).then(|| decode(url.username())))
            .pass(url.password().map(decode))
            .db_name(Some(database.clone()))
            .prefer_socket(false)
            .wait_timeout(Some(28_800))
            .ssl_opts(ssl)
            .init(vec![
                "SET time_zone = '+00:00'",
                "SET SESSION sql_mode = CONCAT(@@SESSION.sql_mode, ',ANSI_QUOTES')",
            ]);
        Ok(Connection {
            opts: opts.into(),
            timeout,
            display: format!("{host}:{port}/{database}"),
            namespace: format!("mysql://{host}:{port}"),
            database,
        })
    }

    /// Open a session.
    pub async fn open(&self) -> std::result::Result<Conn, String> {
        // mysql_async builds its TLS settings with the process's default provider; kbcrm links
        // two (ring, and aws-lc-rs through object_store), so name one. A second call is a no-op.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let connect = Conn::new(self.opts.clone());
        let conn = tokio::time::timeout(self.timeout, connect)
            .await
            .map_err(|_| {
                format!(
                    "cannot connect to the database at {}: timed out; is the host reachable \
                     from here (firewall, VPN)?",
                    self.display
                )
            })?
            .map_err(|e| {
                format!(
                    "cannot connect to the database at {}: {}",
                    self.display,
                    explain(&e)
                )
            })?;
        Ok(conn)
    }

    /// [`Connection::open`] for a source.
    pub async fn connect(&self, source: &Source) -> Result<Conn> {
        self.open().await.map_err(|m| source_error(source, m))
    }
}

fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// The server's message of an error with a hint, never the URL.
fn explain(e: &mysql_async::Error) -> String {
    match e {
        mysql_async::Error::Server(s) => {
            let hint = match s.code {
                1045 => "; check the user and password in the connection URL",
                1049 => "; check the database name in the connection URL",
                1044 | 1142 => "; the user of the connection URL may not read it",
                _ => "",
            };
            format!("{}{hint}", s.message)
        }
        other => {
            let msg = other.to_string();
            let hint = if msg.contains("refused") {
                "; is the server running and listening on that port?"
            } else if msg.to_lowercase().contains("certificate") {
                "; give the server's CA certificate as sslrootcert=PATH in the URL"
            } else {
                ""
            };
            format!("{msg}{hint}")
        }
    }
}

/// The condition for rows past the watermark (less the overlap).
pub fn cursor_condition(
    column: &str,
    ty: ColumnType,
    kind: Kind,
    watermark: &str,
    overlap: Option<Duration>,
) -> String {
    let col = quote_ident(column);
    // Arrow writes timestamps as 2025-01-01T10:00:00.5Z; MySQL wants the space and no zone.
    let text = match ty {
        ColumnType::Timestamp | ColumnType::Date => {
            watermark.trim_end_matches('Z').replacen('T', " ", 1)
        }
        _ => watermark.to_string(),
    };
    let lit = format!("CAST({} AS {})", quote_literal(&text), kind.cast_target());
    match (overlap, ty) {
        (Some(d), ColumnType::Date) => {
            let days = d.as_secs().div_ceil(86_400).max(1);
            format!("{col} > {lit} - INTERVAL {days} DAY")
        }
        (Some(d), _) => format!("{col} > {lit} - INTERVAL {} MICROSECOND", d.as_micros()),
        (None, _) => format!("{col} > {lit}"),
    }
}

/// Check the declared columns against the server: every column exists and its type can be read
/// as declared; all mismatches at once. Returns the server's column types.
pub async fn describe(
    source: &Source,
    db: &Database,
    conn: &mut Conn,
    connection: &Connection,
) -> Result<Vec<Kind>> {
    let sql = select_sql(source, db, None);
    let stmt = conn.prep(&sql).await.map_err(|e| {
        let what = match &db.relation {
            Relation::Table(t) => format!("table {t}"),
            Relation::Query(_) => "its query".to_string(),
        };
        let hint = match &e {
            mysql_async::Error::Server(s) if s.code == 1146 => {
                "; check `location:` (database.table)".to_string()
            }
            mysql_async::Error::Server(s) if s.code == 1054 => format!(
                "; every column under `schema:` must be a column of {what} (or name its \
                 database column with `source:`)"
            ),
            _ => String::new(),
        };
        source_error(
            source,
            format!(
                "cannot read {what} in {}: {}{hint}",
                connection.display,
                explain(&e)
            ),
        )
    })?;
    let kinds: Vec<Kind> = stmt.columns().iter().map(Kind::of).collect();
    let mismatches: Vec<String> = source
        .columns
        .iter()
        .zip(&kinds)
        .filter(|(c, k)| !compatible(c.ty, **k))
        .map(|(c, k)| {
            format!(
                "column '{}' is declared {} but is {} in the database",
                c.name,
                c.ty,
                k.name()
            )
        })
        .collect();
    let _ = conn.close(stmt).await;
    if !mismatches.is_empty() {
        return Err(source_error(
            source,
            format!(
                "{}; change the declared type, or cast the column in `query:`",
                mismatches.join("; ")
            ),
        ));
    }
    Ok(kinds)
}

fn days_from_ymd(y: u16, m: u8, d: u8) -> Option<i32> {
    chrono::NaiveDate::from_ymd_opt(i32::from(y), u32::from(m), u32::from(d))
        .map(crate::engine::epoch_days)
}

/// Decode one value into a cell of the declared type.
fn decode<'a>(col: &Column, kind: Kind, v: &'a Value) -> std::result::Result<Cell<'a>, String> {
    let bad = || {
        format!(
            "column '{}': a {} value cannot be read as {}",
            col.name,
            kind.name(),
            col.ty
        )
    };
    let text = |b: &'a [u8]| {
        std::str::from_utf8(b).map_err(|_| format!("invalid UTF-8 in column '{}'", col.name))
    };
    Ok(match (col.ty, v) {
        (_, Value::NULL) => Cell::Null,
        (ColumnType::Bool, Value::Int(i)) => Cell::Bool(*i != 0),
        (ColumnType::Bool, Value::UInt(i)) => Cell::Bool(*i != 0),
        (ColumnType::Bool, Value::Bytes(b)) => Cell::Bool(b.iter().any(|x| *x != 0)),
        (ColumnType::Int, Value::Int(i)) => {
            i32::try_from(*i).map_err(|_| bad())?;
            Cell::Int(*i)
        }
        (ColumnType::Int | ColumnType::BigInt, Value::UInt(u)) => {
            let i = i64::try_from(*u).map_err(|_| bad())?;
            if col.ty == ColumnType::Int {
                i32::try_from(i).map_err(|_| bad())?;
            }
            Cell::Int(i)
        }
        (ColumnType::BigInt, Value::Int(i)) => Cell::Int(*i),
        (ColumnType::Double, Value::Double(f)) => Cell::Float(*f),
        (ColumnType::Double, Value::Float(f)) => Cell::Float(f64::from(*f)),
        (ColumnType::Double, Value::Int(i)) => Cell::Float(*i as f64),
        (ColumnType::Double, Value::UInt(u)) => Cell::Float(*u as f64),
        (ColumnType::Decimal(_, s), Value::Int(i)) => {
            let v = i128::from(*i)
                .checked_mul(10i128.pow(u32::try_from(s).unwrap_or(0)))
                .ok_or_else(bad)?;
            if let ColumnType::Decimal(p, _) = col.ty
                && v.unsigned_abs() >= 10u128.pow(u32::from(p))
            {
                return Err(format!(
                    "value of column '{}' does not fit {}",
                    col.name, col.ty
                ));
            }
            Cell::Decimal(v)
        }
        (ColumnType::Double | ColumnType::Decimal(..), Value::Bytes(b)) => {
            parse_text(col, text(b)?)?
        }
        (ColumnType::String | ColumnType::Json, Value::Bytes(b)) => parse_text(col, text(b)?)?,
        (ColumnType::Date | ColumnType::Timestamp, Value::Date(y, m, d, hh, mm, ss, us)) => {
            let days = days_from_ymd(*y, *m, *d).ok_or_else(|| {
                format!(
                    "column '{}': {y:04}-{m:02}-{d:02} is not a date (a zero date?)",
                    col.name
                )
            })?;
            if col.ty == ColumnType::Date {
                Cell::Date(days)
            } else {
                Cell::Timestamp(
                    i64::from(days) * 86_400_000_000
                        + (i64::from(*hh) * 3600 + i64::from(*mm) * 60 + i64::from(*ss))
                            * 1_000_000
                        + i64::from(*us),
                )
            }
        }
        // The text protocol (and some servers' binary results) send numbers and dates as text.
        (_, Value::Bytes(b)) => parse_text(col, text(b)?)?,
        _ => return Err(bad()),
    })
}

/// Read `sql` with the binary protocol, decoding rows into batches of the declared schema;
/// batches go to `tx` as they fill. `label` names the read in quarantine rows.
pub async fn read(query: ReadQuery<'_>, conn: &mut Conn, kinds: &[Kind]) -> Result<()> {
    let ReadQuery {
        source,
        sql,
        schema,
        label,
        keys,
        tx,
    } = query;
    let failed = |e: mysql_async::Error| {
        source_error(source, format!("reading {label} failed: {}", explain(&e)))
    };
    let mut result = conn.exec_iter(sql, ()).await.map_err(failed)?;
    let mut builder = RowBuilder::new(&source.columns, schema.clone());
    let fresh = || FileOutput {
        file: label.to_string(),
        ..FileOutput::default()
    };
    let mut out = fresh();
    let mut line = 0u64;
    // Reused between rows (see the CSV reader).
    let mut spare: Vec<Cell<'static>> = Vec::with_capacity(source.columns.len());
    while let Some(row) = result.next().await.map_err(failed)? {
        line += 1;
        out.rows_read += 1;
        let values = row.unwrap();
        let mut cells: Vec<Cell<'_>> = recycle(std::mem::take(&mut spare));
        let mut problem = None;
        for (i, ((col, kind), v)) in source.columns.iter().zip(kinds).zip(&values).enumerate() {
            if let Value::Bytes(b) = v {
                out.bytes_read += b.len() as u64;
            } else {
                out.bytes_read += 8;
            }
            match decode(col, *kind, v) {
                Ok(Cell::Null) if col.required => {
                    problem = Some((
                        i,
                        format!("missing required value in column '{}'", col.name),
                    ));
                    break;
                }
                Ok(c) => cells.push(c),
                Err(reason) => {
                    problem = Some((i, reason));
                    break;
                }
            }
        }
        match problem {
            None => builder.push(&cells),
            Some((i, reason)) => {
                let raw = keys
                    .iter()
                    .map(|&k| {
                        let v = match &values[k] {
                            Value::Bytes(b) => String::from_utf8_lossy(b).into_owned(),
                            Value::Int(n) => n.to_string(),
                            Value::UInt(n) => n.to_string(),
                            Value::NULL => "NULL".to_string(),
                            _ => "?".to_string(),
                        };
                        format!("{}={v}", source.columns[k].name)
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                out.rejects.push(Reject {
                    file: label.to_string(),
                    line,
                    column: Some(source.columns[i].name.clone()),
                    raw,
                    reason,
                });
            }
        }
        spare = recycle(cells);
        if builder.len() >= BATCH_ROWS {
            out.batches.push(builder.finish()?);
            let full = std::mem::replace(&mut out, fresh());
            if tx.send(Ok(full)).await.is_err() {
                return Ok(());
            }
        }
    }
    if !builder.is_empty() {
        out.batches.push(builder.finish()?);
    }
    let _ = tx.send(Ok(out)).await;
    Ok(())
}

/// Bounds of an integer column under a condition: (min, max), `None` when no rows.
pub async fn bounds(
    source: &Source,
    conn: &mut Conn,
    db: &Database,
    column: &str,
    condition: Option<&str>,
) -> Result<Option<(i64, i64)>> {
    let sql = bounds_sql(db, column, condition, "SIGNED");
    let row: Option<(Option<i64>, Option<i64>)> = conn.query_first(sql).await.map_err(|e| {
        source_error(
            source,
            format!("partition bounds of {column}: {}", explain(&e)),
        )
    })?;
    Ok(row.and_then(|(lo, hi)| lo.zip(hi)))
}
