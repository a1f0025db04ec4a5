//! What a CSV file looks like, guessed from its first bytes: encoding, delimiter, header, a
//! delimiter at each line end, and each column's name, type (with its date format) and whether
//! it is ever empty. Every type guessed is checked by parsing each sampled value as a load
//! would, so a file the guess came from loads with it.

use std::borrow::Cow;
use std::collections::HashMap;

use crate::config::types::ColumnType;
use crate::plan::{Column, Delimiter, TextEncoding};

use super::convert::parse_text;

/// Lines of a sample looked at.
const SAMPLE_LINES: usize = 1000;

/// Share of sampled lines that must have the same number of fields for a delimiter to be taken.
const CONSISTENT: f64 = 0.9;

/// Date formats tried, most common first (`%m/%d/%Y` before `%d/%m/%Y`: a sample that fits
/// both says so).
const DATE_FORMATS: &[&str] = &["%Y-%m-%d", "%d.%m.%Y", "%m/%d/%Y", "%d/%m/%Y", "%Y/%m/%d"];

/// Timestamp formats tried after the ones read without a format (ISO 8601, RFC 3339).
const TIMESTAMP_FORMATS: &[&str] = &[
    "%d.%m.%Y %H:%M:%S",
    "%d.%m.%Y %H:%M",
    "%m/%d/%Y %H:%M:%S",
    "%m/%d/%Y %H:%M",
    "%d/%m/%Y %H:%M:%S",
];

/// A CSV file's shape as guessed.
#[derive(Debug, Clone, PartialEq)]
pub struct Sniffed {
    /// The text encoding.
    pub encoding: TextEncoding,
    /// The field separator.
    pub delimiter: Delimiter,
    /// Whether the first line names the columns.
    pub header: bool,
    /// Whether every line ends with a delimiter.
    pub trailing_delimiter: bool,
    /// The columns in the file's order.
    pub columns: Vec<SniffedColumn>,
    /// Data rows looked at.
    pub rows: usize,
    /// What was guessed and how sure, one sentence each.
    pub reasons: Vec<String>,
}

/// A column as guessed.
#[derive(Debug, Clone, PartialEq)]
pub struct SniffedColumn {
    /// Its name as a table column (lowercase letters, digits and `_`).
    pub name: String,
    /// Its name in the header, when that differs.
    pub source: Option<String>,
    /// Its type.
    pub ty: ColumnType,
    /// The chrono format of a date or timestamp that needs one.
    pub format: Option<String>,
    /// No sampled row left it empty.
    pub required: bool,
}

/// Guess the shape of a CSV file from its first bytes (whole lines); `None` when they hold no
/// line.
pub fn sniff_csv(bytes: &[u8]) -> Option<Sniffed> {
    let (text, encoding) = decode(bytes);
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(SAMPLE_LINES)
        .collect();
    if lines.is_empty() {
        return None;
    }
    let mut reasons = vec![match encoding {
        TextEncoding::Utf8 => "text: UTF-8".to_string(),
        TextEncoding::Latin1 => "text: not UTF-8, read as Latin-1".to_string(),
        TextEncoding::Windows1252 => {
            "text: not UTF-8, read as Windows-1252 (it has bytes 0x80-0x9f)".to_string()
        }
    }];
    let (delimiter, width, share) = choose_delimiter(&lines);
    reasons.push(delimiter_reason(delimiter, width, share, lines.len()));
    let mut records: Vec<Vec<String>> = lines.iter().map(|l| split(l, delimiter)).collect();
    let trailing_delimiter = width > 1
        && delimiter != Delimiter::Whitespace
        && records
            .iter()
            .all(|r| r.last().is_some_and(String::is_empty));
    if trailing_delimiter {
        records.iter_mut().for_each(|r| {
            r.pop();
        });
        reasons.push("every line ends with the delimiter: trailing_delimiter".to_string());
    }
    let header = looks_like_header(&records[0]) && records.len() > 1;
    reasons.push(match header {
        true => "header: the first line holds names, no numbers or dates".to_string(),
        false => "no header: the first line holds numbers or dates".to_string(),
    });
    let width = records[0].len();
    let names = column_names(header.then(|| records[0].as_slice()), width);
    let data = &records[usize::from(header)..];
    let columns = names
        .into_iter()
        .enumerate()
        .map(|(i, (name, source))| {
            let values: Vec<&str> = data
                .iter()
                .filter(|r| r.len() == width)
                .map(|r| r[i].as_str())
                .collect();
            column(name, source, &values, &mut reasons)
        })
        .collect();
    Some(Sniffed {
        encoding,
        delimiter,
        header,
        trailing_delimiter,
        columns,
        rows: data.len(),
        reasons,
    })
}

/// The text of the bytes and its encoding: UTF-8 when valid (a byte-order mark dropped), else
/// Windows-1252 when it has bytes 0x80-0x9f, else Latin-1; transcoded as a load reads it.
fn decode(bytes: &[u8]) -> (Cow<'_, str>, TextEncoding) {
    let body = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let encoding = match std::str::from_utf8(body) {
        Ok(_) => TextEncoding::Utf8,
        Err(_) if body.iter().any(|b| (0x80..0xa0).contains(b)) => TextEncoding::Windows1252,
        Err(_) => TextEncoding::Latin1,
    };
    let text = match super::csv::utf8_text(encoding, bytes) {
        Cow::Borrowed(t) => String::from_utf8_lossy(t),
        Cow::Owned(t) => Cow::Owned(String::from_utf8_lossy(&t).into_owned()),
    };
    (text, encoding)
}

/// The delimiter that splits the lines into the most fields consistently (the same number on
/// at least 90% of them), with that number and the share of lines that have it. Runs of blanks
/// are taken only when no single character does; one column when nothing does.
fn choose_delimiter(lines: &[&str]) -> (Delimiter, usize, f64) {
    let candidates = [b',', b';', b'|', b'\t'].map(Delimiter::Byte);
    let consistent = |d: Delimiter| {
        let counts: Vec<usize> = lines.iter().map(|l| split(l, d).len()).collect();
        let (width, share) = mode(&counts);
        (width >= 2 && share >= CONSISTENT).then_some((d, width, share))
    };
    candidates
        .into_iter()
        .filter_map(consistent)
        .fold(
            None,
            |best: Option<(Delimiter, usize, f64)>, c| match best {
                Some(b) if b.1 >= c.1 => Some(b),
                _ => Some(c),
            },
        )
        .or_else(|| consistent(Delimiter::Whitespace))
        .unwrap_or((Delimiter::Byte(b','), 1, 1.0))
}

/// The most common value and the share of values that are it.
fn mode(counts: &[usize]) -> (usize, f64) {
    let mut seen: HashMap<usize, usize> = HashMap::new();
    for c in counts {
        *seen.entry(*c).or_default() += 1;
    }
    let (value, n) = seen
        .into_iter()
        .max_by_key(|(v, n)| (*n, *v))
        .unwrap_or((0, 0));
    (value, n as f64 / counts.len().max(1) as f64)
}

/// The fields of one line (quotes honoured for a single-character delimiter).
fn split(line: &str, delimiter: Delimiter) -> Vec<String> {
    match delimiter {
        Delimiter::Whitespace => line
            .split_whitespace()
            .map(|f| f.trim_matches('"').to_string())
            .collect(),
        Delimiter::Byte(d) => {
            let mut reader = ::csv::ReaderBuilder::new()
                .has_headers(false)
                .flexible(true)
                .delimiter(d)
                .from_reader(line.as_bytes());
            let mut record = ::csv::StringRecord::new();
            match reader.read_record(&mut record) {
                Ok(true) => record.iter().map(str::to_string).collect(),
                _ => vec![line.to_string()],
            }
        }
    }
}

/// The words for the delimiter chosen and how sure it is.
fn delimiter_reason(d: Delimiter, width: usize, share: f64, lines: usize) -> String {
    let name = match d {
        Delimiter::Whitespace => "runs of blanks".to_string(),
        Delimiter::Byte(b'\t') => "tab".to_string(),
        Delimiter::Byte(b) => format!("'{}'", char::from(b)),
    };
    if width == 1 {
        return format!("one column: no delimiter splits the {lines} sampled lines alike");
    }
    let sure = match share >= 1.0 {
        true => format!("every one of {lines} sampled lines has {width} fields"),
        false => format!(
            "{:.0}% of {lines} sampled lines have {width} fields; the others will be rejected",
            share * 100.0
        ),
    };
    format!("delimiter {name}: {sure}")
}

/// Whether a first line reads as column names: every field filled, none repeated, none a
/// number or a date.
fn looks_like_header(first: &[String]) -> bool {
    let mut seen = std::collections::HashSet::new();
    first.iter().all(|f| {
        let f = f.trim();
        !f.is_empty() && seen.insert(f) && !is_data(f)
    })
}

/// Whether a field reads as a value rather than a name: a number or a date.
pub(super) fn is_data(field: &str) -> bool {
    let f = field.trim();
    f.parse::<f64>().is_ok() || date_format(f).is_some()
}

/// The first date format `value` reads with.
fn date_format(value: &str) -> Option<&'static str> {
    DATE_FORMATS
        .iter()
        .find(|f| chrono::NaiveDate::parse_from_str(value, f).is_ok())
        .copied()
}

/// Column names (identifiers) with the header's own names where they differ; `column_N`
/// without a header. Repeated names get `_2`, `_3`, ...
fn column_names(header: Option<&[String]>, width: usize) -> Vec<(String, Option<String>)> {
    let mut used: HashMap<String, usize> = HashMap::new();
    (0..width)
        .map(|i| {
            let raw = header.and_then(|h| h.get(i)).map(|s| s.trim().to_string());
            let mut name = raw
                .as_deref()
                .map(identifier)
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| format!("column_{}", i + 1));
            let n = used.entry(name.clone()).or_default();
            *n += 1;
            if *n > 1 {
                name = format!("{name}_{n}");
            }
            let source = raw.filter(|r| *r != name);
            (name, source)
        })
        .collect()
}

/// A name as an identifier: lowercase ASCII letters, digits and `_`, not starting with a digit
/// (`c_` put before one that would); empty when the name has no letter or digit.
pub fn identifier(name: &str) -> String {
    identifier_led(name, "c_")
}

/// [`identifier`] with `lead` put before a name that would start with a digit.
pub fn identifier_led(name: &str, lead: &str) -> String {
    let mut out = String::new();
    for c in name.chars() {
        match c {
            c if c.is_ascii_alphanumeric() => out.push(c.to_ascii_lowercase()),
            _ if !out.ends_with('_') => out.push('_'),
            _ => {}
        }
    }
    let out = out.trim_matches('_').to_string();
    match out.chars().next() {
        Some(c) if c.is_ascii_digit() => format!("{lead}{out}"),
        _ => out,
    }
}

/// A column from its sampled values: the first type every filled value loads as.
fn column(
    name: String,
    source: Option<String>,
    values: &[&str],
    reasons: &mut Vec<String>,
) -> SniffedColumn {
    let filled: Vec<&str> = values.iter().copied().filter(|v| !v.is_empty()).collect();
    let (ty, format) = column_type(&filled);
    if let Some(f) = &format
        && ty == ColumnType::Date
        && f == "%m/%d/%Y"
        && filled.iter().all(|v| date_of(v, "%d/%m/%Y"))
    {
        reasons.push(format!(
            "column {name}: every date reads as month/day/year and as day/month/year; \
             month/day/year taken, check `format:`"
        ));
    }
    SniffedColumn {
        required: !filled.is_empty() && filled.len() == values.len(),
        name,
        source,
        ty,
        format,
    }
}

/// Whether `value` is a date in `format`.
fn date_of(value: &str, format: &str) -> bool {
    chrono::NaiveDate::parse_from_str(value, format).is_ok()
}

/// The narrowest type all `values` load as, with its format: a number with a leading zero stays
/// text (an identifier), eight digits that are all dates are dates (`%Y%m%d`).
fn column_type(values: &[&str]) -> (ColumnType, Option<String>) {
    if values.is_empty() {
        return (ColumnType::String, None);
    }
    let loads = |ty: ColumnType, format: Option<&str>| {
        let col = Column {
            name: String::new(),
            source_name: String::new(),
            ty,
            required: false,
            format: format.map(str::to_string),
        };
        values.iter().all(|v| parse_text(&col, v).is_ok())
    };
    let digits = |v: &&str| v.bytes().all(|b| b.is_ascii_digit());
    if values.iter().all(|v| v.len() == 8 && digits(v)) && loads(ColumnType::Date, Some("%Y%m%d")) {
        return (ColumnType::Date, Some("%Y%m%d".to_string()));
    }
    let leading_zero = values.iter().any(|v| {
        let v = v.trim_start_matches('-');
        v.len() > 1 && v.starts_with('0') && !v.starts_with("0.")
    });
    if !leading_zero {
        for ty in [ColumnType::Int, ColumnType::BigInt] {
            if loads(ty, None) {
                return (ty, None);
            }
        }
        if let Some(scale) = money_scale(values)
            && loads(ColumnType::Decimal(18, scale), None)
        {
            return (ColumnType::Decimal(18, scale), None);
        }
        let plain = values
            .iter()
            .all(|v| v.parse::<f64>().is_ok_and(f64::is_finite));
        if plain && loads(ColumnType::Double, None) {
            return (ColumnType::Double, None);
        }
    }
    let words = values.iter().all(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "true" | "false" | "yes" | "no" | "t" | "f"
        )
    });
    if words {
        return (ColumnType::Bool, None);
    }
    if let Some(f) = DATE_FORMATS
        .iter()
        .find(|f| loads(ColumnType::Date, Some(f)))
    {
        return (ColumnType::Date, Some(f.to_string()));
    }
    if loads(ColumnType::Timestamp, None) {
        return (ColumnType::Timestamp, None);
    }
    if let Some(f) = TIMESTAMP_FORMATS
        .iter()
        .find(|f| loads(ColumnType::Timestamp, Some(f)))
    {
        return (ColumnType::Timestamp, Some(f.to_string()));
    }
    (ColumnType::String, None)
}

/// The scale of amounts written with a point and at most four decimals, the same number in
/// every value that has any (`12.50`, `3.10`, `7`), else `None`.
fn money_scale(values: &[&str]) -> Option<i8> {
    let mut scale = None;
    for v in values {
        let v = v.trim().trim_start_matches('-');
        let (int, frac) = v.split_once('.').unwrap_or((v, ""));
        if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        if !frac.bytes().all(|b| b.is_ascii_digit()) || frac.len() > 4 {
            return None;
        }
        if !frac.is_empty() {
            match scale {
                None => scale = Some(frac.len()),
                Some(s) if s != frac.len() => return None,
                _ => {}
            }
        }
    }
    scale.filter(|s| *s >= 2).map(|s| s as i8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_headerless_pipe_file_with_a_trailing_delimiter() {
        let s = sniff_csv(
            b"1|Customer#1|711.56|BUILDING|1997-01-02|\n2|Customer#2|121.65|AUTO|1998-12-31|\n",
        )
        .unwrap();
        assert_eq!(s.delimiter, Delimiter::Byte(b'|'));
        assert!(!s.header && s.trailing_delimiter);
        let types: Vec<String> = s.columns.iter().map(|c| c.ty.to_string()).collect();
        assert_eq!(types, ["int", "string", "decimal(18,2)", "string", "date"]);
        assert_eq!(s.columns[0].name, "column_1");
        assert_eq!(s.columns[4].format.as_deref(), Some("%Y-%m-%d"));
    }

    #[test]
    fn whitespace_columns_with_crlf_leading_zeros_and_compact_dates() {
        let s =
            sniff_csv(b" 00001   19970101   1   11.77\r\n 00002  19970112  2  12.00\r\n").unwrap();
        assert_eq!(s.delimiter, Delimiter::Whitespace);
        assert!(!s.header);
        let types: Vec<String> = s.columns.iter().map(|c| c.ty.to_string()).collect();
        assert_eq!(types, ["string", "date", "int", "decimal(18,2)"]);
        assert_eq!(s.columns[1].format.as_deref(), Some("%Y%m%d"));
    }

    #[test]
    fn a_header_with_names_to_map_latin1_and_empty_values() {
        let s = sniff_csv(
            b"Kunden-Nr.;Name;Umsatz;Seit\n7;M\xFCller;1,5;01.02.2024\n8;;2;03.04.2024\n",
        )
        .unwrap();
        assert_eq!(s.encoding, TextEncoding::Latin1);
        assert_eq!(s.delimiter, Delimiter::Byte(b';'));
        assert!(s.header);
        let c = &s.columns;
        assert_eq!(
            (c[0].name.as_str(), c[0].source.as_deref()),
            ("kunden_nr", Some("Kunden-Nr."))
        );
        assert_eq!(c[0].ty, ColumnType::Int);
        assert!(c[0].required && !c[1].required);
        // A decimal comma is text: kbcrm reads decimals with a point.
        assert_eq!(c[2].ty, ColumnType::String);
        assert_eq!(
            (c[3].ty, c[3].format.as_deref()),
            (ColumnType::Date, Some("%d.%m.%Y"))
        );
    }
}
