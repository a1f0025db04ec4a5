//! PostgreSQL tables and queries as sources.
//!
//! The connection URL comes from an environment variable or a file named in the pipeline, never
//! from YAML, and never appears in a message. Rows are read with `COPY (SELECT ...) TO STDOUT
//! (FORMAT binary)`, decoded by PostgreSQL's own wire decoders and appended whole to Arrow
//! builders of the declared schema; a value that does not fit (a number beyond the declared
//! precision, an infinite date, a missing required value) sends its row to quarantine. Declared
//! columns are checked against the database's column types before anything is read.

use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, pin_mut};
use postgres_protocol::types as wire;
use tokio_postgres::binary_copy::BinaryCopyOutStream;
use tokio_postgres::config::SslMode;
use tokio_postgres::types::{FromSql, Type};
use tokio_postgres::{Client, Config, NoTls};

use super::convert::{Cell, RowBuilder};
use super::csv::recycle;
use super::database::{ReadQuery, bounds_sql, select_sql, url_text};
use super::{BATCH_ROWS, FileOutput, Reject, source_error};
use crate::config::types::ColumnType;
use crate::error::Result;
use crate::plan::{Column, Database, Relation, Source};
use crate::sql::{quote_ident, quote_literal};

/// Microseconds from 1970-01-01 to 2000-01-01, PostgreSQL's epoch.
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;
/// Days from 1970-01-01 to 2000-01-01.
const PG_EPOCH_DAYS: i32 = 10_957;

/// A resolved connection: the settings tokio-postgres takes, and what to name it by.
pub struct Connection {
    config: Config,
    tls: Option<rustls::ClientConfig>,
    /// `host:port/database` (no user, no password).
    pub display: String,
    /// `postgres://host:port` for lineage.
    pub namespace: String,
    /// The database name.
    pub database: String,
}

/// Read the URL from where the pipeline says.
fn read_url(source: &Source, db: &Database) -> Result<String> {
    url_text(&db.connection).map_err(|m| source_error(source, m))
}

/// Parse a source's connection URL without ever echoing it (it holds a password).
pub fn connection(source: &Source, db: &Database) -> Result<Connection> {
    let raw = read_url(source, db)?;
    Connection::parse(&raw, &db.connection.to_string()).map_err(|m| source_error(source, m))
}

impl Connection {
    /// Parse a URL; `from` names where it came from in messages (the URL itself never appears).
    pub fn parse(raw: &str, from: &str) -> std::result::Result<Connection, String> {
        let bad = |what: &str| {
            format!(
                "the URL in {from} is not a PostgreSQL URL ({what}); write \
                 postgres://USER:PASSWORD@HOST:PORT/DATABASE"
            )
        };
        let mut url = url::Url::parse(raw.trim()).map_err(|e| bad(&e.to_string()))?;
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            return Err(bad(&format!("scheme '{}'", url.scheme())));
        }
        // Settings kbcrm handles itself: TLS verification and the root certificate.
        let mut sslmode = String::from("prefer");
        let mut rootcert = None;
        let kept: Vec<(String, String)> = url
            .query_pairs()
            .filter_map(|(k, v)| match k.as_ref() {
                "sslmode" => {
                    sslmode = v.to_string();
                    None
                }
                "sslrootcert" => {
                    rootcert = Some(v.to_string());
                    None
                }
                _ => Some((k.to_string(), v.to_string())),
            })
            .collect();
        url.set_query(None);
        if !kept.is_empty() {
            url.query_pairs_mut().extend_pairs(kept);
        }
        let mut config: Config = url
            .as_str()
            .parse()
            .map_err(|e: tokio_postgres::Error| bad(&e.to_string()))?;
        let mode = match sslmode.as_str() {
            "disable" => SslMode::Disable,
            "allow" | "prefer" => SslMode::Prefer,
            "require" | "verify-ca" | "verify-full" => SslMode::Require,
            other => {
                return Err(bad(&format!(
                    "sslmode '{other}'; use disable, prefer, require, verify-ca or verify-full"
                )));
            }
        };
        config.ssl_mode(mode);
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        config.application_name("kbcrm");
        let verify = match sslmode.as_str() {
            "verify-full" => Verify::Full,
            "verify-ca" => Verify::Chain,
            // As libpq: a root certificate given means its chain is checked.
            _ if rootcert.is_some() => Verify::Chain,
            _ => Verify::Nothing,
        };
        let tls = match mode {
            SslMode::Disable => None,
            _ => Some(tls_config(rootcert.as_deref(), verify)?),
        };
        let host = url.host_str().unwrap_or("localhost").to_string();
        let port = url.port().unwrap_or(5432);
        let database = config
            .get_dbname()
            .map(str::to_string)
            .or_else(|| config.get_user().map(str::to_string))
            .unwrap_or_else(|| "postgres".to_string());
        Ok(Connection {
            config,
            tls,
            display: format!("{host}:{port}/{database}"),
            namespace: format!("postgres://{host}:{port}"),
            database,
        })
    }

    /// Open a session (time zone UTC, so timestamps without a zone read as UTC).
    pub async fn open(&self) -> std::result::Result<Client, String> {
        let result = match &self.tls {
            None => self.config.connect(NoTls).await.map(|(client, conn)| {
                tokio::spawn(conn);
                client
            }),
            Some(tls) => {
                let make = tokio_postgres_rustls::MakeRustlsConnect::new(tls.clone());
                self.config.connect(make).await.map(|(client, conn)| {
                    tokio::spawn(conn);
                    client
                })
            }
        };
        let client = result.map_err(|e| {
            format!(
                "cannot connect to the database at {}: {}",
                self.display,
                explain_connect(&e)
            )
        })?;
        client
            .batch_execute("SET TIME ZONE 'UTC'; SET DateStyle = 'ISO'")
            .await
            .map_err(|e| format!("session setup: {}", db_message(&e)))?;
        Ok(client)
    }

    /// [`Connection::open`] for a source.
    pub async fn connect(&self, source: &Source) -> Result<Client> {
        self.open().await.map_err(|m| source_error(source, m))
    }
}

/// How much of the server's certificate is checked, as libpq's `sslmode`s do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verify {
    /// `prefer` and `require` without a root certificate: encrypted, not authenticated.
    Nothing,
    /// `verify-ca` (or a root certificate given): signed by a trusted CA.
    Chain,
    /// `verify-full`: signed by a trusted CA and issued for the host.
    Full,
}

/// TLS settings: roots from `sslrootcert` when given, else the system's.
fn tls_config(
    rootcert: Option<&str>,
    verify: Verify,
) -> std::result::Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    match rootcert {
        Some(path) => {
            let pem =
                std::fs::read(path).map_err(|e| format!("cannot read sslrootcert {path}: {e}"))?;
            let mut n = 0;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| format!("sslrootcert {path} is not PEM: {e}"))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("sslrootcert {path}: {e}"))?;
                n += 1;
            }
            if n == 0 {
                return Err(format!("sslrootcert {path} holds no certificate"));
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                // A system certificate rustls cannot use is left out, as every client does.
                let _ = roots.add(cert);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?;
    if verify == Verify::Full {
        return Ok(builder.with_root_certificates(roots).with_no_client_auth());
    }
    let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| format!("TLS setup: {e}"))?;
    Ok(builder
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ServerCert {
            verify,
            webpki,
            provider,
        }))
        .with_no_client_auth())
}

/// Certificate checks of `prefer`, `require` and `verify-ca`. The handshake's signatures are
/// always verified; what is relaxed is whom the certificate must be from.
#[derive(Debug)]
struct ServerCert {
    verify: Verify,
    webpki: Arc<rustls::client::WebPkiServerVerifier>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for ServerCert {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> std::result::Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if self.verify == Verify::Nothing {
            return Ok(rustls::client::danger::ServerCertVerified::assertion());
        }
        match self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The server's message of an error, or the client's.
fn db_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => db.message().to_string(),
        None => {
            // The source chain names the cause (refused, timed out, certificate).
            let mut s = e.to_string();
            let mut cur = std::error::Error::source(e);
            while let Some(c) = cur {
                s = format!("{s}: {c}");
                cur = c.source();
            }
            s
        }
    }
}

fn explain_connect(e: &tokio_postgres::Error) -> String {
    let msg = db_message(e);
    let hint = match e.code().map(|c| c.code()) {
        Some("28P01") | Some("28000") => "; check the user and password in the connection URL",
        Some("3D000") => "; check the database name in the connection URL",
        _ if msg.contains("refused") => "; is the server running and listening on that port?",
        _ if msg.contains("timed out") || msg.contains("timeout") => {
            "; is the host reachable from here (firewall, VPN)?"
        }
        _ if msg.to_lowercase().contains("certificate") => {
            "; give the server's CA certificate as sslrootcert=PATH in the URL"
        }
        _ => "",
    };
    format!("{msg}{hint}")
}

/// The condition for rows past the watermark (less the overlap).
pub fn cursor_condition(
    column: &str,
    ty: ColumnType,
    pg_type: &Type,
    watermark: &str,
    overlap: Option<std::time::Duration>,
) -> String {
    let col = quote_ident(column);
    // The watermark as Arrow wrote it, quoted and cast to the column's type, so it cannot be
    // anything but a value.
    let lit = format!("{}::{}", quote_literal(watermark), pg_type.name());
    match (overlap, ty) {
        (Some(d), ColumnType::Date) => {
            let days = d.as_secs().div_ceil(86_400).max(1);
            format!("{col} > {lit} - {days}")
        }
        (Some(d), _) => format!("{col} > {lit} - interval '{} microseconds'", d.as_micros()),
        (None, _) => format!("{col} > {lit}"),
    }
}

/// Whether a database column type can be read as a declared type, losslessly.
fn compatible(declared: ColumnType, ty: &Type) -> bool {
    let t = ty.clone();
    match declared {
        ColumnType::String => matches!(
            t,
            Type::TEXT
                | Type::VARCHAR
                | Type::BPCHAR
                | Type::NAME
                | Type::CHAR
                | Type::UUID
                | Type::JSON
                | Type::JSONB
                | Type::UNKNOWN
        ),
        ColumnType::Json => matches!(t, Type::JSON | Type::JSONB | Type::TEXT | Type::VARCHAR),
        ColumnType::Int => matches!(t, Type::INT2 | Type::INT4),
        ColumnType::BigInt => matches!(t, Type::INT2 | Type::INT4 | Type::INT8),
        ColumnType::Double => matches!(
            t,
            Type::FLOAT4 | Type::FLOAT8 | Type::INT2 | Type::INT4 | Type::INT8 | Type::NUMERIC
        ),
        ColumnType::Decimal(..) => {
            matches!(t, Type::NUMERIC | Type::INT2 | Type::INT4 | Type::INT8)
        }
        ColumnType::Bool => t == Type::BOOL,
        ColumnType::Date => t == Type::DATE,
        ColumnType::Timestamp => matches!(t, Type::TIMESTAMP | Type::TIMESTAMPTZ | Type::DATE),
    }
}

/// Check the declared columns against the database: every column exists and its type can be
/// read as declared. All mismatches are reported at once. Returns the database types.
pub async fn describe(
    source: &Source,
    db: &Database,
    client: &Client,
    conn: &Connection,
) -> Result<Vec<Type>> {
    let sql = select_sql(source, db, None);
    let stmt = client.prepare(&sql).await.map_err(|e| {
        let what = match &db.relation {
            Relation::Table(t) => format!("table {t}"),
            Relation::Query(_) => "its query".to_string(),
        };
        let hint = match e.code().map(|c| c.code()) {
            Some("42P01") => "; check `location:` (schema.table)".to_string(),
            Some("42703") => format!(
                "; every column under `schema:` must be a column of {what} (or name its \
                 database column with `source:`)"
            ),
            Some("42501") => "; the user of the connection URL may not read it".to_string(),
            _ => String::new(),
        };
        source_error(
            source,
            format!(
                "cannot read {what} in {}: {}{hint}",
                conn.display,
                db_message(&e)
            ),
        )
    })?;
    let types: Vec<Type> = stmt.columns().iter().map(|c| c.type_().clone()).collect();
    let mismatches: Vec<String> = source
        .columns
        .iter()
        .zip(&types)
        .filter(|(c, t)| !compatible(c.ty, t))
        .map(|(c, t)| {
            format!(
                "column '{}' is declared {} but is {} in the database",
                c.name,
                c.ty,
                t.name()
            )
        })
        .collect();
    if !mismatches.is_empty() {
        return Err(source_error(
            source,
            format!(
                "{}; change the declared type, or cast the column in `query:`",
                mismatches.join("; ")
            ),
        ));
    }
    Ok(types)
}

/// Accepts any type and gives its wire bytes.
struct Raw<'a>(&'a [u8]);

impl<'a> FromSql<'a> for Raw<'a> {
    fn from_sql(
        _: &Type,
        raw: &'a [u8],
    ) -> std::result::Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(raw))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

/// A numeric's value as a mantissa at `scale` decimal places, rounded half away from zero;
/// `None` for NaN and infinities.
pub fn numeric_to_i128(raw: &[u8], scale: i8) -> std::result::Result<Option<i128>, String> {
    let rd = |i: usize| -> std::result::Result<i16, String> {
        raw.get(i..i + 2)
            .map(|b| i16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(|| "truncated numeric".to_string())
    };
    let range = || "numeric value out of range".to_string();
    let ndigits = rd(0)?.max(0) as usize;
    let weight = i32::from(rd(2)?);
    let sign = rd(4)? as u16;
    if matches!(sign, 0xC000 | 0xD000 | 0xF000) {
        return Ok(None);
    }
    if ndigits == 0 {
        return Ok(Some(0));
    }
    // The base-10000 digits as one integer; its last digit counts 10^exp.
    let mut digits: i128 = 0;
    for i in 0..ndigits {
        digits = digits
            .checked_mul(10_000)
            .and_then(|v| v.checked_add(i128::from(rd(8 + 2 * i).unwrap_or(0))))
            .ok_or_else(range)?;
    }
    let exp = 4 * (weight - (ndigits as i32 - 1)) + i32::from(scale);
    let value = if exp >= 0 {
        10i128
            .checked_pow(exp as u32)
            .and_then(|p| digits.checked_mul(p))
            .ok_or_else(range)?
    } else if exp < -38 {
        0
    } else {
        let div = 10i128.pow((-exp) as u32);
        let (q, r) = (digits / div, digits % div);
        if r * 2 >= div { q + 1 } else { q }
    };
    Ok(Some(if sign == 0x4000 { -value } else { value }))
}

/// Decode one wire value into a cell of the declared type. `scratch` holds formatted UUIDs.
fn decode<'a>(
    col: &Column,
    ty: &Type,
    raw: &'a [u8],
    scratch: &'a mut [u8; 36],
) -> std::result::Result<Cell<'a>, String> {
    let bad = |e: Box<dyn std::error::Error + Sync + Send>| {
        format!("column '{}': cannot decode {}: {e}", col.name, ty.name())
    };
    let int = |raw: &[u8]| -> std::result::Result<i64, String> {
        Ok(match *ty {
            Type::INT2 => i64::from(wire::int2_from_sql(raw).map_err(bad)?),
            Type::INT4 => i64::from(wire::int4_from_sql(raw).map_err(bad)?),
            _ => wire::int8_from_sql(raw).map_err(bad)?,
        })
    };
    Ok(match col.ty {
        ColumnType::String | ColumnType::Json => match *ty {
            Type::UUID => {
                let b = wire::uuid_from_sql(raw).map_err(bad)?;
                let s = uuid::Uuid::from_bytes(b)
                    .hyphenated()
                    .encode_lower(scratch.as_mut_slice());
                Cell::Str(s)
            }
            Type::JSONB => {
                let (version, text) = raw.split_first().ok_or("empty jsonb")?;
                if *version != 1 {
                    return Err(format!("column '{}': jsonb version {version}", col.name));
                }
                Cell::Str(std::str::from_utf8(text).map_err(|e| e.to_string())?)
            }
            Type::CHAR => Cell::Str(std::str::from_utf8(raw).map_err(|e| e.to_string())?),
            Type::TEXT | Type::VARCHAR if col.ty == ColumnType::Json => {
                let text = wire::text_from_sql(raw).map_err(bad)?;
                serde_json::from_str::<serde::de::IgnoredAny>(text)
                    .map_err(|e| format!("invalid JSON in column '{}': {e}", col.name))?;
                Cell::Str(text)
            }
            _ => Cell::Str(wire::text_from_sql(raw).map_err(bad)?),
        },
        ColumnType::Int => Cell::Int(int(raw)?),
        ColumnType::BigInt => Cell::Int(int(raw)?),
        ColumnType::Double => match *ty {
            Type::FLOAT4 => Cell::Float(f64::from(wire::float4_from_sql(raw).map_err(bad)?)),
            Type::FLOAT8 => Cell::Float(wire::float8_from_sql(raw).map_err(bad)?),
            Type::NUMERIC => {
                let v = numeric_to_i128(raw, 15)?
                    .ok_or_else(|| format!("column '{}': NaN or infinity", col.name))?;
                Cell::Float(v as f64 / 1e15)
            }
            _ => Cell::Float(int(raw)? as f64),
        },
        ColumnType::Decimal(p, s) => {
            let v = match *ty {
                Type::NUMERIC => numeric_to_i128(raw, s)
                    .map_err(|e| format!("column '{}': {e}", col.name))?
                    .ok_or_else(|| {
                        format!("column '{}': NaN or infinity is not a decimal", col.name)
                    })?,
                _ => i128::from(int(raw)?)
                    .checked_mul(10i128.pow(u32::try_from(s).unwrap_or(0)))
                    .ok_or("out of range")?,
            };
            if v.unsigned_abs() >= 10u128.pow(u32::from(p)) {
                return Err(format!(
                    "value of column '{}' does not fit decimal({p},{s})",
                    col.name
                ));
            }
            Cell::Decimal(v)
        }
        ColumnType::Bool => Cell::Bool(wire::bool_from_sql(raw).map_err(bad)?),
        ColumnType::Date => {
            let d = wire::date_from_sql(raw).map_err(bad)?;
            if d == i32::MAX || d == i32::MIN {
                return Err(format!("column '{}': infinite date", col.name));
            }
            Cell::Date(d + PG_EPOCH_DAYS)
        }
        ColumnType::Timestamp => match *ty {
            Type::DATE => {
                let d = wire::date_from_sql(raw).map_err(bad)?;
                if d == i32::MAX || d == i32::MIN {
                    return Err(format!("column '{}': infinite date", col.name));
                }
                Cell::Timestamp(i64::from(d + PG_EPOCH_DAYS) * 86_400_000_000)
            }
            _ => {
                let t = wire::timestamp_from_sql(raw).map_err(bad)?;
                if t == i64::MAX || t == i64::MIN {
                    return Err(format!("column '{}': infinite timestamp", col.name));
                }
                Cell::Timestamp(t + PG_EPOCH_MICROS)
            }
        },
    })
}

/// Read `sql` with binary COPY, decoding rows into batches of the declared schema; batches go to
/// `tx` as they fill. `part` names the read in quarantine rows.
pub async fn copy_out(query: ReadQuery<'_>, client: &Client, types: &[Type]) -> Result<()> {
    let ReadQuery {
        source,
        sql,
        schema,
        label: origin,
        keys,
        tx,
    } = query;
    let copy = format!("COPY ({sql}) TO STDOUT (FORMAT binary)");
    let stream = client.copy_out(&copy).await.map_err(|e| {
        source_error(
            source,
            format!("reading {origin} failed: {}", db_message(&e)),
        )
    })?;
    let rows = BinaryCopyOutStream::new(stream, types);
    pin_mut!(rows);
    let mut builder = RowBuilder::new(&source.columns, schema.clone());
    let mut out = FileOutput {
        file: origin.to_string(),
        ..FileOutput::default()
    };
    let mut scratch = vec![[0u8; 36]; source.columns.len()];
    let mut line = 0u64;
    let mut batch_bytes = 0u64;
    // Reused between rows (see the CSV reader).
    let mut spare: Vec<Cell<'static>> = Vec::with_capacity(source.columns.len());
    while let Some(row) = rows.next().await {
        let row = row.map_err(|e| {
            source_error(
                source,
                format!("reading {origin} failed: {}", db_message(&e)),
            )
        })?;
        line += 1;
        let mut cells: Vec<Cell<'_>> = recycle(std::mem::take(&mut spare));
        let mut problem: Option<(usize, String)> = None;
        for (i, ((col, ty), buf)) in source
            .columns
            .iter()
            .zip(types)
            .zip(scratch.iter_mut())
            .enumerate()
        {
            let raw: Option<Raw<'_>> = row.try_get(i).map_err(|e| {
                source_error(
                    source,
                    format!("reading column {} of {origin} failed: {e}", col.name),
                )
            })?;
            match raw {
                None if col.required => {
                    problem = Some((
                        i,
                        format!("missing required value in column '{}'", col.name),
                    ));
                    break;
                }
                None => cells.push(Cell::Null),
                Some(Raw(bytes)) => {
                    batch_bytes += bytes.len() as u64 + 4;
                    match decode(col, ty, bytes, buf) {
                        Ok(c) => cells.push(c),
                        Err(reason) => {
                            problem = Some((i, reason));
                            break;
                        }
                    }
                }
            }
        }
        out.rows_read += 1;
        match problem {
            None => builder.push(&cells),
            Some((i, reason)) => {
                out.rejects.push(Reject {
                    file: origin.to_string(),
                    line,
                    column: Some(source.columns[i].name.clone()),
                    raw: key_text(source, &row, keys, types),
                    reason,
                });
            }
        }
        spare = recycle(cells);
        if builder.len() >= BATCH_ROWS {
            out.batches.push(builder.finish()?);
            out.bytes_read = batch_bytes;
            batch_bytes = 0;
            let full = std::mem::replace(
                &mut out,
                FileOutput {
                    file: origin.to_string(),
                    ..FileOutput::default()
                },
            );
            if tx.send(Ok(full)).await.is_err() {
                return Ok(());
            }
        }
    }
    if !builder.is_empty() {
        out.batches.push(builder.finish()?);
    }
    out.bytes_read = batch_bytes;
    let _ = tx.send(Ok(out)).await;
    Ok(())
}

/// The key columns of a rejected row as `key=value` text, to find it at the source.
fn key_text(
    source: &Source,
    row: &tokio_postgres::binary_copy::BinaryCopyOutRow,
    keys: &[usize],
    types: &[Type],
) -> String {
    keys.iter()
        .map(|&i| {
            let v = match row.try_get::<Option<Raw<'_>>>(i) {
                Ok(Some(Raw(b))) => {
                    let mut scratch = [0u8; 36];
                    let mut probe = source.columns[i].clone();
                    probe.required = false;
                    match source.columns[i].ty {
                        ColumnType::String | ColumnType::Int | ColumnType::BigInt => {
                            match decode(&probe, &types[i], b, &mut scratch) {
                                Ok(Cell::Str(s)) => s.to_string(),
                                Ok(Cell::Int(n)) => n.to_string(),
                                _ => "?".to_string(),
                            }
                        }
                        _ => "?".to_string(),
                    }
                }
                Ok(None) => "NULL".to_string(),
                Err(_) => "?".to_string(),
            };
            format!("{}={v}", source.columns[i].name)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Bounds of an integer column under a condition: (min, max), `None` when no rows.
pub async fn bounds(
    source: &Source,
    client: &Client,
    db: &Database,
    column: &str,
    condition: Option<&str>,
) -> Result<Option<(i64, i64)>> {
    let sql = bounds_sql(db, column, condition, "bigint");
    let row = client.query_one(&sql, &[]).await.map_err(|e| {
        source_error(
            source,
            format!("partition bounds of {column}: {}", db_message(&e)),
        )
    })?;
    let lo: Option<i64> = row.get(0);
    let hi: Option<i64> = row.get(1);
    Ok(lo.zip(hi))
}

#[cfg(test)]
mod tests;
