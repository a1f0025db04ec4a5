//! `COPY (query) TO STDOUT` and `COPY table TO STDOUT`: a query's rows in PostgreSQL's copy
//! formats (text, csv, binary), the way psql's `\copy ... to` and DuckDB's postgres extension
//! read tables. Only these reads are COPY here; nothing is copied from a client or to a file.

use bytes::{BufMut, BytesMut};
use datafusion::sql::sqlparser::ast::{
    CopyLegacyCsvOption, CopyLegacyOption, CopyOption, CopySource, CopyTarget, Statement,
};
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::parser::Parser;
use pgwire::error::{PgWireError, PgWireResult};
use pgwire::messages::copy::CopyData;
use pgwire::messages::data::DataRow;

use super::auth::pg_error;

/// The format of a COPY's output.
#[derive(Debug, Clone, PartialEq)]
pub enum CopyFormat {
    /// Tab-separated text (PostgreSQL's default), NULL as `\N`.
    Text {
        /// Column separator.
        delimiter: u8,
        /// What NULL is written as.
        null: String,
    },
    /// CSV.
    Csv {
        /// Column separator.
        delimiter: u8,
        /// Quote character.
        quote: u8,
        /// What NULL is written as.
        null: String,
        /// A first line of column names.
        header: bool,
    },
    /// PostgreSQL's binary copy format.
    Binary,
}

impl CopyFormat {
    /// The copy format code of CopyOutResponse: 1 binary, 0 text.
    pub fn code(&self) -> i8 {
        matches!(self, CopyFormat::Binary).into()
    }
}

/// Whether `stmt` is a COPY a client may run: out of a query or table, to the client.
pub fn is_copy_out(stmt: &Statement) -> bool {
    matches!(
        stmt,
        Statement::Copy {
            to: true,
            target: CopyTarget::Stdout,
            ..
        }
    )
}

/// The query a COPY out reads and the format it writes, or why it cannot run.
pub fn query_of(stmt: &Statement) -> PgWireResult<(Statement, CopyFormat)> {
    let Statement::Copy {
        source,
        options,
        legacy_options,
        ..
    } = stmt
    else {
        return Err(pg_error("ERROR", "0A000", "not a COPY statement"));
    };
    let query = match source {
        CopySource::Query(q) => Statement::Query(q.clone()),
        CopySource::Table {
            table_name,
            columns,
        } => {
            let list = if columns.is_empty() {
                "*".to_string()
            } else {
                columns
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            Parser::parse_sql(
                &PostgreSqlDialect {},
                &format!("SELECT {list} FROM {table_name}"),
            )
            .ok()
            .and_then(|mut s| s.pop())
            .ok_or_else(|| pg_error("ERROR", "42601", "cannot read the COPY's table"))?
        }
    };
    Ok((query, format(options, legacy_options)?))
}

fn one_byte(c: char, what: &str) -> PgWireResult<u8> {
    u8::try_from(c).ok().filter(u8::is_ascii).ok_or_else(|| {
        pg_error(
            "ERROR",
            "0A000",
            format!("COPY {what} must be a single one-byte character"),
        )
    })
}

fn format(options: &[CopyOption], legacy: &[CopyLegacyOption]) -> PgWireResult<CopyFormat> {
    let mut kind = "text".to_string();
    let mut delimiter = None;
    let mut null = None;
    let mut header = false;
    let mut quote = b'"';
    for o in options {
        match o {
            CopyOption::Format(f) => kind = f.value.to_lowercase(),
            CopyOption::Delimiter(c) => delimiter = Some(one_byte(*c, "delimiter")?),
            CopyOption::Null(n) => null = Some(n.clone()),
            CopyOption::Header(h) => header = *h,
            CopyOption::Quote(c) => quote = one_byte(*c, "quote")?,
            CopyOption::Escape(_) | CopyOption::Encoding(_) => {}
            other => {
                return Err(pg_error(
                    "ERROR",
                    "0A000",
                    format!("COPY option {other} is not supported by the kbcrm server"),
                ));
            }
        }
    }
    for o in legacy {
        match o {
            CopyLegacyOption::Binary => kind = "binary".into(),
            CopyLegacyOption::Csv(csv) => {
                kind = "csv".into();
                for c in csv {
                    match c {
                        CopyLegacyCsvOption::Header => header = true,
                        CopyLegacyCsvOption::Quote(q) => quote = one_byte(*q, "quote")?,
                        _ => {}
                    }
                }
            }
            CopyLegacyOption::Delimiter(c) => delimiter = Some(one_byte(*c, "delimiter")?),
            CopyLegacyOption::Null(n) => null = Some(n.clone()),
            _ => {}
        }
    }
    match kind.as_str() {
        "text" => Ok(CopyFormat::Text {
            delimiter: delimiter.unwrap_or(b'\t'),
            null: null.unwrap_or_else(|| "\\N".into()),
        }),
        "csv" => Ok(CopyFormat::Csv {
            delimiter: delimiter.unwrap_or(b','),
            quote,
            null: null.unwrap_or_default(),
            header,
        }),
        "binary" => Ok(CopyFormat::Binary),
        other => Err(pg_error(
            "ERROR",
            "22023",
            format!("COPY format \"{other}\" not recognized"),
        )),
    }
}

/// The signature and header of a binary copy: `PGCOPY\n\377\r\n\0`, flags, extension length.
const BINARY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

/// Turns rows (encoded as DataRows: binary fields for the binary format, text fields else) into
/// copy data. Like PostgreSQL, the binary header goes out in one message with the first row
/// (or with the trailer when there are no rows): clients such as DuckDB read it from there.
pub struct CopyWriter {
    format: CopyFormat,
    started: bool,
    names: Vec<String>,
}

/// The end of a binary copy: a field count of -1.
const BINARY_TRAILER: &[u8] = &[0xff, 0xff];

impl CopyWriter {
    /// A writer of `format` for columns named `names` (for a CSV header).
    pub fn new(format: CopyFormat, names: Vec<String>) -> Self {
        CopyWriter {
            format,
            started: false,
            names,
        }
    }

    /// What comes before the first row in a message of its own: the CSV header line.
    pub fn start(&mut self) -> Option<CopyData> {
        // The binary header goes with the first row ([`CopyWriter::row`]).
        if self.started || matches!(self.format, CopyFormat::Binary) {
            return None;
        }
        self.started = true;
        match &self.format {
            CopyFormat::Csv {
                header: true,
                delimiter,
                quote,
                null,
            } => {
                let mut out = BytesMut::new();
                for (i, n) in self.names.iter().enumerate() {
                    if i > 0 {
                        out.put_u8(*delimiter);
                    }
                    csv_field(&mut out, n.as_bytes(), *delimiter, *quote, null);
                }
                out.put_u8(b'\n');
                Some(CopyData::new(out.freeze()))
            }
            _ => None,
        }
    }

    /// The end of the copy: the binary trailer (after the header, if no row carried it).
    pub fn finish(&mut self) -> Option<CopyData> {
        if !matches!(self.format, CopyFormat::Binary) {
            return None;
        }
        let mut out = BytesMut::new();
        if !self.started {
            self.started = true;
            out.put_slice(BINARY_HEADER);
        }
        out.put_slice(BINARY_TRAILER);
        Some(CopyData::new(out.freeze()))
    }

    /// One row as copy data.
    pub fn row(&mut self, row: &DataRow) -> PgWireResult<CopyData> {
        if let CopyFormat::Binary = self.format {
            let mut out = BytesMut::with_capacity(row.data.len() + 2 + BINARY_HEADER.len());
            if !self.started {
                self.started = true;
                out.put_slice(BINARY_HEADER);
            }
            out.put_i16(row.field_count);
            out.put_slice(&row.data);
            return Ok(CopyData::new(out.freeze()));
        }
        let mut out = BytesMut::with_capacity(row.data.len() + 8);
        let mut at = 0usize;
        let data = &row.data[..];
        for i in 0..row.field_count {
            let len = data
                .get(at..at + 4)
                .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or_else(malformed)?;
            at += 4;
            let value = if len < 0 {
                None
            } else {
                let v = data.get(at..at + len as usize).ok_or_else(malformed)?;
                at += len as usize;
                Some(v)
            };
            match &self.format {
                CopyFormat::Text { delimiter, null } => {
                    if i > 0 {
                        out.put_u8(*delimiter);
                    }
                    match value {
                        None => out.put_slice(null.as_bytes()),
                        Some(v) => text_field(&mut out, v, *delimiter),
                    }
                }
                CopyFormat::Csv {
                    delimiter,
                    quote,
                    null,
                    ..
                } => {
                    if i > 0 {
                        out.put_u8(*delimiter);
                    }
                    match value {
                        None => out.put_slice(null.as_bytes()),
                        Some(v) => csv_field(&mut out, v, *delimiter, *quote, null),
                    }
                }
                CopyFormat::Binary => unreachable!("handled above"),
            }
        }
        out.put_u8(b'\n');
        Ok(CopyData::new(out.freeze()))
    }
}

fn malformed() -> PgWireError {
    pg_error("ERROR", "XX000", "a row could not be written as copy data")
}

/// A text-format field: backslash, newline, carriage return, tab and the delimiter escaped.
fn text_field(out: &mut BytesMut, v: &[u8], delimiter: u8) {
    for &b in v {
        match b {
            b'\\' => out.put_slice(b"\\\\"),
            b'\n' => out.put_slice(b"\\n"),
            b'\r' => out.put_slice(b"\\r"),
            b'\t' => out.put_slice(b"\\t"),
            b if b == delimiter => {
                out.put_u8(b'\\');
                out.put_u8(b);
            }
            b => out.put_u8(b),
        }
    }
}

/// A CSV field, quoted when it holds the delimiter, a quote, a line break, or reads as NULL.
fn csv_field(out: &mut BytesMut, v: &[u8], delimiter: u8, quote: u8, null: &str) {
    let needs = v.is_empty() && null.is_empty()
        || v == null.as_bytes()
        || v.iter()
            .any(|&b| b == delimiter || b == quote || b == b'\n' || b == b'\r');
    if !needs {
        out.put_slice(v);
        return;
    }
    out.put_u8(quote);
    for &b in v {
        if b == quote {
            out.put_u8(quote);
        }
        out.put_u8(b);
    }
    out.put_u8(quote);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(fields: &[Option<&[u8]>]) -> DataRow {
        let mut data = BytesMut::new();
        for f in fields {
            match f {
                None => data.put_i32(-1),
                Some(v) => {
                    data.put_i32(v.len() as i32);
                    data.put_slice(v);
                }
            }
        }
        DataRow::new(data, fields.len() as i16)
    }

    fn copy_format(sql: &str) -> CopyFormat {
        let stmt = Parser::parse_sql(&PostgreSqlDialect {}, sql)
            .unwrap()
            .remove(0);
        assert!(is_copy_out(&stmt), "{sql}");
        query_of(&stmt).unwrap().1
    }

    #[test]
    fn text_and_csv_rows_are_escaped_as_postgresql_writes_them() {
        let r = row(&[Some(b"a\tb\\c\nd"), None, Some(b"")]);
        let mut text = CopyWriter::new(copy_format("COPY (select 1) TO STDOUT"), vec![]);
        assert_eq!(text.start(), None);
        assert_eq!(&text.row(&r).unwrap().data[..], b"a\\tb\\\\c\\nd\t\\N\t\n");
        let mut csv = CopyWriter::new(
            copy_format("COPY t TO STDOUT (FORMAT csv, HEADER true)"),
            vec!["x".into(), "y".into(), "z".into()],
        );
        assert_eq!(&csv.start().unwrap().data[..], b"x,y,z\n");
        let r = row(&[Some(b"a,\"b\""), None, Some(b"")]);
        assert_eq!(&csv.row(&r).unwrap().data[..], b"\"a,\"\"b\"\"\",,\"\"\n");
    }

    #[test]
    fn binary_rows_carry_their_field_count_after_the_header() {
        let format = copy_format("COPY (SELECT a FROM t) TO STDOUT (FORMAT \"binary\")");
        let mut w = CopyWriter::new(format.clone(), vec![]);
        assert_eq!(w.start(), None);
        let r = row(&[Some(&[0, 0, 0, 7]), None]);
        let first = w.row(&r).unwrap().data;
        assert_eq!(&first[..19], BINARY_HEADER);
        assert_eq!(
            &first[19..],
            &[0, 2, 0, 0, 0, 4, 0, 0, 0, 7, 0xff, 0xff, 0xff, 0xff]
        );
        assert_eq!(&w.row(&r).unwrap().data[..2], &[0, 2]);
        assert_eq!(&w.finish().unwrap().data[..], BINARY_TRAILER);
        // No rows: the header and the trailer in one message.
        let mut empty = CopyWriter::new(format, vec![]);
        assert_eq!(empty.finish().unwrap().data.len(), 21);
    }

    #[test]
    fn only_copies_to_the_client_are_reads() {
        for sql in [
            "COPY t FROM STDIN",
            "COPY t TO '/tmp/x'",
            "COPY (select 1) TO PROGRAM 'id'",
        ] {
            let stmt = Parser::parse_sql(&PostgreSqlDialect {}, sql)
                .unwrap()
                .remove(0);
            assert!(!is_copy_out(&stmt), "{sql}");
        }
    }
}
