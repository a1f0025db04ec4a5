//! Text and JSON values into declared column types, a row at a time: a row is either appended
//! whole or rejected with the reason, never half-appended.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanBuilder, Date32Builder, Decimal128Builder, Float64Builder, Int32Builder,
    Int64Builder, StringBuilder, TimestampMicrosecondBuilder,
};
use arrow::datatypes::{Decimal128Type, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime};

use crate::config::types::{ColumnType, UTC};
use crate::plan::Column;

/// A value parsed for one cell, before the row is accepted.
#[derive(Debug, Clone, Copy)]
pub enum Cell<'a> {
    /// No value.
    Null,
    /// Text (also JSON text).
    Str(&'a str),
    /// Integer.
    Int(i64),
    /// Float.
    Float(f64),
    /// Decimal mantissa.
    Decimal(i128),
    /// Boolean.
    Bool(bool),
    /// Days since the epoch.
    Date(i32),
    /// Microseconds since the epoch, UTC.
    Timestamp(i64),
}

/// The Arrow schema of a source's declared columns.
pub fn declared_schema(columns: &[Column]) -> SchemaRef {
    Arc::new(Schema::new(
        columns
            .iter()
            .map(|c| Field::new(&c.name, c.ty.arrow_type(), !c.required))
            .collect::<Vec<_>>(),
    ))
}

/// Parse one text value for a column. `Err` holds the reason, in words.
pub fn parse_text<'a>(col: &Column, text: &'a str) -> Result<Cell<'a>, String> {
    if col.ty == ColumnType::String {
        return Ok(Cell::Str(text));
    }
    let t = text.trim();
    let bad = |what: &str| {
        format!(
            "'{}' is not a valid {what} for column '{}'",
            shorten(text),
            col.name
        )
    };
    match col.ty {
        ColumnType::String => unreachable!("returned above"),
        ColumnType::Json => serde_json::from_str::<serde::de::IgnoredAny>(text)
            .map(|_| Cell::Str(text))
            .map_err(|e| format!("invalid JSON in column '{}': {e}", col.name)),
        ColumnType::Int => t
            .parse::<i32>()
            .map(|v| Cell::Int(v as i64))
            .map_err(|_| bad("int")),
        ColumnType::BigInt => t.parse::<i64>().map(Cell::Int).map_err(|_| bad("bigint")),
        ColumnType::Double => t
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite())
            .map(Cell::Float)
            .ok_or_else(|| bad("double")),
        ColumnType::Decimal(p, s) => parse_decimal(t, p, s)
            .map(Cell::Decimal)
            .ok_or_else(|| bad(&format!("decimal({p},{s})"))),
        ColumnType::Bool => parse_bool(t).map(Cell::Bool).ok_or_else(|| bad("bool")),
        ColumnType::Date => parse_date(t, col.format.as_deref())
            .map(Cell::Date)
            .ok_or_else(|| bad(&date_what("date", col.format.as_deref()))),
        ColumnType::Timestamp => parse_timestamp(t, col.format.as_deref())
            .map(Cell::Timestamp)
            .ok_or_else(|| bad(&date_what("timestamp", col.format.as_deref()))),
    }
}

fn date_what(kind: &str, format: Option<&str>) -> String {
    match format {
        Some(f) => format!("{kind} (format \"{f}\")"),
        None => kind.to_string(),
    }
}

/// Cut long values in messages.
pub fn shorten(s: &str) -> String {
    if s.chars().count() > 60 {
        let head: String = s.chars().take(57).collect();
        format!("{head}...")
    } else {
        s.to_string()
    }
}

fn parse_bool(t: &str) -> Option<bool> {
    match t.to_ascii_lowercase().as_str() {
        "true" | "t" | "1" | "yes" | "y" => Some(true),
        "false" | "f" | "0" | "no" | "n" => Some(false),
        _ => None,
    }
}

fn days(d: NaiveDate) -> i32 {
    crate::engine::epoch_days(d)
}

/// A decimal from its text, `None` when it is not one or does not fit.
///
/// arrow's parser counts digits in a u8 and reads the exponent of `1e...` text into an i16,
/// without checking for overflow (a panic in debug builds; in release builds `1e65536` wrapped
/// to `1e0` and loaded as 1.00). Text longer than any decimal needs (38 digits, a sign, a point,
/// an exponent; 128 characters allowed) and exponents beyond 76 are refused before it gets there.
pub fn parse_decimal(t: &str, precision: u8, scale: i8) -> Option<i128> {
    if t.len() > 128 {
        return None;
    }
    if let Some(at) = t.find(['e', 'E']) {
        let exponent: i64 = t[at + 1..].parse().ok()?;
        if exponent.abs() > 2 * i64::from(arrow::datatypes::DECIMAL128_MAX_PRECISION) {
            return None;
        }
    }
    arrow::compute::kernels::cast_utils::parse_decimal::<Decimal128Type>(t, precision, scale).ok()
}

/// Parse a date; without a format, ISO `YYYY-MM-DD` (a time part is ignored).
pub fn parse_date(t: &str, format: Option<&str>) -> Option<i32> {
    let d = match format {
        Some(f) => NaiveDate::parse_from_str(t, f)
            .ok()
            .or_else(|| NaiveDateTime::parse_from_str(t, f).ok().map(|dt| dt.date())),
        None => NaiveDate::parse_from_str(t.get(..10)?, "%Y-%m-%d").ok(),
    }?;
    Some(days(d))
}

/// Parse a timestamp to UTC microseconds. Without a format: RFC 3339 with offset, the same with
/// a space and a short offset (`2025-01-01 10:00:00+01`, as PostgreSQL prints), or
/// `YYYY-MM-DD[ T]HH:MM[:SS[.f]]` (taken as UTC), or a bare date (midnight UTC).
pub fn parse_timestamp(t: &str, format: Option<&str>) -> Option<i64> {
    if let Some(f) = format {
        if f.contains("%z") || f.contains("%:z") || f.contains("%#z") {
            return DateTime::parse_from_str(t, f)
                .ok()
                .map(|d| d.timestamp_micros());
        }
        return NaiveDateTime::parse_from_str(t, f)
            .ok()
            .or_else(|| {
                NaiveDate::parse_from_str(t, f)
                    .ok()
                    .map(|d| d.and_time(NaiveTime::MIN))
            })
            .map(|d| d.and_utc().timestamp_micros());
    }
    if let Ok(d) = DateTime::parse_from_rfc3339(t) {
        return Some(d.timestamp_micros());
    }
    // With an offset as databases print it: `2025-01-01 10:00:00+01` or `+05:30`.
    for f in ["%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%dT%H:%M:%S%.f%#z"] {
        if let Ok(d) = DateTime::parse_from_str(t, f) {
            return Some(d.timestamp_micros());
        }
    }
    for f in [
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%dT%H:%M",
    ] {
        if let Ok(d) = NaiveDateTime::parse_from_str(t, f) {
            return Some(d.and_utc().timestamp_micros());
        }
    }
    if t.len() == 10 {
        return NaiveDate::parse_from_str(t, "%Y-%m-%d")
            .ok()
            .map(|d| d.and_time(NaiveTime::MIN).and_utc().timestamp_micros());
    }
    None
}

/// Parse one JSON value for a column. Text columns given a non-string value are the caller's
/// to render (see the JSON reader), since the text must outlive this call.
pub fn parse_json<'a>(col: &Column, v: &'a serde_json::Value) -> Result<Cell<'a>, String> {
    use serde_json::Value;
    match (v, col.ty) {
        (Value::Null, _) => Ok(Cell::Null),
        (Value::String(s), _) => parse_text(col, s),
        (Value::Bool(b), ColumnType::Bool) => Ok(Cell::Bool(*b)),
        (Value::Number(n), ColumnType::Int | ColumnType::BigInt) => match n.as_i64() {
            Some(i) if col.ty == ColumnType::BigInt || i32::try_from(i).is_ok() => Ok(Cell::Int(i)),
            _ => Err(format!(
                "{n} is not a valid {} for column '{}'",
                col.ty, col.name
            )),
        },
        (Value::Number(n), ColumnType::Double) => n
            .as_f64()
            .map(Cell::Float)
            .ok_or_else(|| format!("{n} is not a valid double for column '{}'", col.name)),
        (Value::Number(n), ColumnType::Decimal(p, s)) => parse_decimal(&n.to_string(), p, s)
            .map(Cell::Decimal)
            .ok_or_else(|| {
                format!(
                    "{n} is not a valid decimal({p},{s}) for column '{}'",
                    col.name
                )
            }),
        (other, ty) => Err(format!(
            "{} is not a valid {ty} for column '{}'",
            shorten(&other.to_string()),
            col.name
        )),
    }
}

/// Builders for one batch of declared columns.
pub struct RowBuilder {
    schema: SchemaRef,
    columns: Vec<Builder>,
    rows: usize,
}

enum Builder {
    Str(StringBuilder),
    I32(Int32Builder),
    I64(Int64Builder),
    F64(Float64Builder),
    Dec(Decimal128Builder, u8, i8),
    Bool(BooleanBuilder),
    Date(Date32Builder),
    Ts(TimestampMicrosecondBuilder),
}

impl RowBuilder {
    /// Empty builders for `columns`.
    pub fn new(columns: &[Column], schema: SchemaRef) -> Self {
        let columns = columns
            .iter()
            .map(|c| match c.ty {
                ColumnType::String | ColumnType::Json => Builder::Str(StringBuilder::new()),
                ColumnType::Int => Builder::I32(Int32Builder::new()),
                ColumnType::BigInt => Builder::I64(Int64Builder::new()),
                ColumnType::Double => Builder::F64(Float64Builder::new()),
                ColumnType::Decimal(p, s) => Builder::Dec(Decimal128Builder::new(), p, s),
                ColumnType::Bool => Builder::Bool(BooleanBuilder::new()),
                ColumnType::Date => Builder::Date(Date32Builder::new()),
                ColumnType::Timestamp => Builder::Ts(TimestampMicrosecondBuilder::new()),
            })
            .collect();
        RowBuilder {
            schema,
            columns,
            rows: 0,
        }
    }

    /// Rows appended since the last [`RowBuilder::finish`].
    pub fn len(&self) -> usize {
        self.rows
    }

    /// Whether no rows are buffered.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Append one accepted row; `cells` are in column order and already match their types.
    pub fn push(&mut self, cells: &[Cell<'_>]) {
        for (b, cell) in self.columns.iter_mut().zip(cells) {
            match (b, *cell) {
                (Builder::Str(b), Cell::Str(s)) => b.append_value(s),
                (Builder::Str(b), _) => b.append_null(),
                (Builder::I32(b), Cell::Int(v)) => b.append_value(v as i32),
                (Builder::I32(b), _) => b.append_null(),
                (Builder::I64(b), Cell::Int(v)) => b.append_value(v),
                (Builder::I64(b), _) => b.append_null(),
                (Builder::F64(b), Cell::Float(v)) => b.append_value(v),
                (Builder::F64(b), _) => b.append_null(),
                (Builder::Dec(b, ..), Cell::Decimal(v)) => b.append_value(v),
                (Builder::Dec(b, ..), _) => b.append_null(),
                (Builder::Bool(b), Cell::Bool(v)) => b.append_value(v),
                (Builder::Bool(b), _) => b.append_null(),
                (Builder::Date(b), Cell::Date(v)) => b.append_value(v),
                (Builder::Date(b), _) => b.append_null(),
                (Builder::Ts(b), Cell::Timestamp(v)) => b.append_value(v),
                (Builder::Ts(b), _) => b.append_null(),
            }
        }
        self.rows += 1;
    }

    /// The buffered rows as a batch; the builders start over.
    pub fn finish(&mut self) -> Result<RecordBatch, arrow::error::ArrowError> {
        let arrays: Vec<ArrayRef> = self
            .columns
            .iter_mut()
            .map(|b| -> Result<ArrayRef, arrow::error::ArrowError> {
                Ok(match b {
                    Builder::Str(b) => Arc::new(b.finish()),
                    Builder::I32(b) => Arc::new(b.finish()),
                    Builder::I64(b) => Arc::new(b.finish()),
                    Builder::F64(b) => Arc::new(b.finish()),
                    Builder::Dec(b, p, s) => Arc::new(b.finish().with_precision_and_scale(*p, *s)?),
                    Builder::Bool(b) => Arc::new(b.finish()),
                    Builder::Date(b) => Arc::new(b.finish()),
                    Builder::Ts(b) => Arc::new(b.finish().with_timezone(UTC)),
                })
            })
            .collect::<Result<_, _>>()?;
        self.rows = 0;
        RecordBatch::try_new(self.schema.clone(), arrays)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(ty: ColumnType, format: Option<&str>) -> Column {
        Column {
            name: "c".into(),
            source_name: "c".into(),
            ty,
            required: false,
            format: format.map(String::from),
        }
    }

    /// Found by the `csv_quarantine` fuzz target: exponents and digit counts that overflow
    /// arrow's parser.
    #[test]
    fn decimals_with_exponents_beyond_any_decimal_are_rejected_not_wrapped() {
        let d = col(ColumnType::Decimal(10, 2), None);
        assert!(matches!(parse_text(&d, "2.5e1"), Ok(Cell::Decimal(2500))));
        assert!(matches!(parse_text(&d, "25E-1"), Ok(Cell::Decimal(250))));
        for t in [
            "1e65536",
            "1E50235023",
            "1e-5000",
            "1e99999999999999999999",
            "1e",
            &"9".repeat(300),
            &format!("0.{}", "5".repeat(300)),
        ] {
            let e = parse_text(&d, t).expect_err(t);
            assert!(e.contains("decimal(10,2)"), "{t}: {e}");
        }
    }

    #[test]
    fn parses_values_and_explains_failures() {
        let d = col(ColumnType::Decimal(18, 2), None);
        assert!(matches!(parse_text(&d, "12.50"), Ok(Cell::Decimal(1250))));
        let e = parse_text(&d, "12,5x").unwrap_err();
        assert!(e.contains("'12,5x'") && e.contains("decimal(18,2)"), "{e}");
        let ts = col(ColumnType::Timestamp, Some("%d.%m.%Y %H:%M"));
        assert!(matches!(
            parse_text(&ts, "02.01.1970 00:00"),
            Ok(Cell::Timestamp(86_400_000_000))
        ));
        let ts = col(ColumnType::Timestamp, None);
        assert!(matches!(
            parse_text(&ts, "1970-01-01T01:00:00+01:00"),
            Ok(Cell::Timestamp(0))
        ));
        assert!(matches!(
            parse_text(&ts, "1970-01-01 00:00:01"),
            Ok(Cell::Timestamp(1_000_000))
        ));
        let date = col(ColumnType::Date, None);
        assert!(matches!(
            parse_text(&date, "1970-01-11"),
            Ok(Cell::Date(10))
        ));
        assert!(parse_text(&date, "2024-13-45").is_err());
        assert!(matches!(
            parse_text(&col(ColumnType::Int, None), " 42 "),
            Ok(Cell::Int(42))
        ));
        assert!(parse_text(&col(ColumnType::Int, None), "3000000000").is_err());
        assert!(parse_text(&col(ColumnType::Json, None), "{\"a\":").is_err());
        assert!(matches!(
            parse_text(&col(ColumnType::Bool, None), "Yes"),
            Ok(Cell::Bool(true))
        ));
    }

    #[test]
    fn timestamps_with_offsets_as_databases_print_them() {
        let utc = parse_timestamp("2025-01-01 10:00:00+00", None);
        assert_eq!(utc, parse_timestamp("2025-01-01T10:00:00Z", None));
        assert_eq!(utc, parse_timestamp("2025-01-01 11:00:00+01", None));
        assert_eq!(utc, parse_timestamp("2025-01-01 15:30:00.000+05:30", None));
        assert_eq!(utc, parse_timestamp("2025-01-01 10:00:00", None));
        assert!(utc.is_some());
    }
}
