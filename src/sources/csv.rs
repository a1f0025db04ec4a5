//! CSV files into declared columns, rejecting bad rows with their line.

use std::borrow::Cow;

use arrow::datatypes::SchemaRef;

use super::convert::{Cell, RowBuilder, parse_text};
use super::{BATCH_ROWS, FileOutput, Reject, raw_text};
use crate::error::{Error, Result};
use crate::plan::{Column, CsvSettings, Delimiter, Source, TextEncoding};

/// The field separator a `delimiter: whitespace` file is read with, after each run of blanks
/// between two fields begins with it (the ASCII unit separator).
const BLANK_RUN: u8 = 0x1f;

/// Parse one CSV file held whole.
pub(super) fn parse(
    source: &Source,
    opts: &CsvSettings,
    file: &str,
    bytes: &[u8],
    schema: SchemaRef,
) -> Result<FileOutput> {
    let whole = Piece {
        bytes,
        first_line: 1,
        before: Before::Nothing,
        last: true,
    };
    parse_piece(source, opts, file, whole, schema, |_| {})
}

/// A piece of a CSV file that ends after a record ([`super::chunks`]).
pub(super) struct Piece<'a> {
    /// Its bytes as they are in the file.
    pub bytes: &'a [u8],
    /// The file's line its first byte is on.
    pub first_line: u64,
    /// What the pieces before it told.
    pub before: Before,
    /// Whether it is the file's last piece.
    pub last: bool,
}

/// What the pieces of a file before this one told it.
#[derive(Debug, Clone)]
pub(super) enum Before {
    /// It is the first piece: it holds the lines `skip_rows` skips, and the header.
    Nothing,
    /// They held no record (comment or blank lines only); the header is yet to come.
    NoRecord,
    /// Where the fields are (whether lines end with a delimiter may still be open).
    Layout(Layout),
}

/// Parse a piece of a CSV file. It tells `found` what the next piece needs to know as soon as
/// it knows (after the header, or without one after the first record), so that the file's
/// pieces are parsed side by side.
pub(super) fn parse_piece(
    source: &Source,
    opts: &CsvSettings,
    file: &str,
    piece: Piece<'_>,
    schema: SchemaRef,
    found: impl FnOnce(Before),
) -> Result<FileOutput> {
    let first = matches!(piece.before, Before::Nothing);
    let mut out = FileOutput {
        file: file.to_string(),
        bytes_read: piece.bytes.len() as u64,
        continues: !first,
        ..Default::default()
    };
    // The text as UTF-8 from its first line after `skip_rows`, and the same bytes with the
    // separators a whitespace-delimited file is read with (byte for byte the same length).
    let (text, start, skipped_lines) = piece_text(opts, piece.bytes, first);
    let bytes = &text[start..];
    let input = separated(opts, bytes);
    let mut reader = csv_reader(opts, &input);
    let mut record = ::csv::ByteRecord::new();
    let source_err = |message: String| Error::Source {
        pipeline: source.pipeline.clone(),
        source_name: source.name.clone(),
        message,
    };
    // Map declared columns to field positions.
    let first_line = piece.first_line + skipped_lines;
    let layout = match piece.before {
        Before::Layout(layout) => Some(layout),
        Before::Nothing | Before::NoRecord => field_positions(
            source,
            opts,
            (file, first_line),
            &mut reader,
            &mut record,
            &source_err,
        )?,
    };
    let Some(layout) = layout else {
        found(Before::NoRecord);
        return Ok(out); // empty: nothing to load
    };
    // The next piece waits for the layout: told at once when it is known, else after the
    // first record says whether lines end with a delimiter.
    let mut teller = Teller(Some(found));
    teller.tell(&layout.positions, layout.width, layout.trailing, false);
    let Layout {
        positions,
        width,
        mut trailing,
    } = layout;
    let mut rows = RowBuilder::new(&source.columns, schema);
    // Reused between rows; emptied before each reuse so its lifetime can change.
    let mut spare: Vec<Cell<'static>> = Vec::with_capacity(source.columns.len());
    // Where each field of the current record starts in its bytes.
    let mut starts: Vec<usize> = Vec::with_capacity(width);
    // A rejected row's raw text runs to the start of the next record.
    let mut open_reject: Option<(usize, usize)> = None; // (reject index, byte start)
    // Line numbers counted from the bytes (the reader's own count is off for CRLF files).
    let (mut counted_to, mut line) = (0usize, first_line);
    loop {
        let read = reader.read_byte_record(&mut record);
        let start = record_start(&record, &input);
        line += count_newlines(&bytes[counted_to..start.max(counted_to)]);
        counted_to = start.max(counted_to);
        let next = matches!(read, Ok(true))
            .then_some(start)
            .unwrap_or(bytes.len());
        if let Some((i, s)) = open_reject.take() {
            out.rejects[i].raw = raw_text(&bytes[s..next.max(s)]);
        }
        // The csv reader only fails on I/O, not on content; report and stop this file.
        if !read.map_err(|e| source_err(format!("{file}: cannot read: {e}")))? {
            break;
        }
        if record.len() == 1 && record.get(0).is_some_and(<[u8]>::is_empty) {
            continue; // blank line
        }
        out.rows_read += 1;
        let end = (reader.position().byte() as usize).min(bytes.len());
        let at_end = piece.last && end == bytes.len();
        let problem = unterminated(&bytes[start..end], at_end, opts, line)
            .or_else(|| field_count_problem(&record, width, &mut trailing));
        teller.tell(&positions, width, trailing, false);
        if let Some(reason) = problem {
            open_reject = Some((push_reject(&mut out, file, line, None, reason), start));
            continue;
        }
        let mut cells: Vec<Cell<'_>> = recycle(std::mem::take(&mut spare));
        let failed = fields_to_cells(
            &record,
            &source.columns,
            &positions,
            &opts.null_values,
            &mut starts,
            &mut cells,
        );
        if let Some((column, reason)) = failed {
            spare = recycle(cells);
            open_reject = Some((
                push_reject(&mut out, file, line, Some(column), reason),
                start,
            ));
            continue;
        }
        rows.push(&cells);
        spare = recycle(cells);
        if rows.len() >= BATCH_ROWS {
            out.batches.push(rows.finish()?);
        }
    }
    if !rows.is_empty() {
        out.batches.push(rows.finish()?);
    }
    teller.tell(&positions, width, trailing, true);
    Ok(out)
}

/// Add a rejected row (its raw text is filled in once the next record's start is known); its
/// index.
fn push_reject(
    out: &mut FileOutput,
    file: &str,
    line: u64,
    column: Option<String>,
    reason: String,
) -> usize {
    out.rejects.push(Reject {
        file: file.to_string(),
        line,
        column,
        raw: String::new(),
        reason,
    });
    out.rejects.len() - 1
}

/// A piece's text as UTF-8 (a byte-order mark dropped from the first piece), where its records
/// start after the lines `skip_rows` skips in the first piece, and how many lines those are.
fn piece_text<'a>(opts: &CsvSettings, bytes: &'a [u8], first: bool) -> (Cow<'a, [u8]>, usize, u64) {
    let text = match (first, opts.encoding) {
        (false, TextEncoding::Utf8) => Cow::Borrowed(bytes),
        _ => utf8_text(opts.encoding, bytes),
    };
    if !first {
        return (text, 0, 0);
    }
    let (skipped, rest) = skip_lines(&text, opts.skip_rows);
    let start = text.len() - rest.len();
    (text, start, skipped)
}

/// Tells the next piece of a file where its fields are, once: as soon as whether lines end
/// with a delimiter is known, or at the piece's end.
struct Teller<F: FnOnce(Before)>(Option<F>);

impl<F: FnOnce(Before)> Teller<F> {
    fn tell(&mut self, positions: &[usize], width: usize, trailing: Option<bool>, at_end: bool) {
        if (trailing.is_some() || at_end)
            && let Some(tell) = self.0.take()
        {
            tell(Before::Layout(Layout {
                positions: positions.to_vec(),
                width,
                trailing,
            }));
        }
    }
}

/// Why a record does not have `width` fields (and, when lines end with a delimiter, an empty
/// one after them), if it does not. Without a header, whether lines end with a delimiter is told
/// by the first record.
fn field_count_problem(
    record: &::csv::ByteRecord,
    width: usize,
    trailing: &mut Option<bool>,
) -> Option<String> {
    let ends_empty = record
        .len()
        .checked_sub(1)
        .and_then(|last| record.get(last))
        .is_some_and(<[u8]>::is_empty);
    let trailing = *trailing.get_or_insert(record.len() == width + 1 && ends_empty);
    let found = record.len() - usize::from(trailing && ends_empty);
    if found == width && (ends_empty || !trailing) {
        return None;
    }
    let wanted = match trailing {
        true => format!("{width} fields and a delimiter at the end of the line"),
        false => format!("{width} fields"),
    };
    Some(format!("expected {wanted}, found {}", record.len()))
}

/// A CSV reader of `bytes` that yields every line (the header too), of any number of fields.
fn csv_reader<'a>(opts: &CsvSettings, bytes: &'a [u8]) -> ::csv::Reader<&'a [u8]> {
    let (delimiter, trim) = match opts.delimiter {
        Delimiter::Byte(d) => (d, ::csv::Trim::None),
        Delimiter::Whitespace => (BLANK_RUN, ::csv::Trim::Fields),
    };
    ::csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .delimiter(delimiter)
        .quote(opts.quote)
        .comment(opts.comment)
        .trim(trim)
        .from_reader(bytes)
}

/// The file's bytes as UTF-8: transcoded from Latin-1 or Windows-1252, a UTF-8 byte-order mark
/// dropped.
pub(super) fn utf8_text(encoding: TextEncoding, bytes: &[u8]) -> Cow<'_, [u8]> {
    match encoding {
        TextEncoding::Utf8 => Cow::Borrowed(bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes)),
        // Latin-1 is the first 256 code points, byte for byte.
        TextEncoding::Latin1 if bytes.is_ascii() => Cow::Borrowed(bytes),
        TextEncoding::Latin1 => Cow::Owned(
            bytes
                .iter()
                .map(|&b| char::from(b))
                .collect::<String>()
                .into_bytes(),
        ),
        TextEncoding::Windows1252 => {
            let (text, _, _) = encoding_rs::WINDOWS_1252.decode(bytes);
            match text {
                Cow::Borrowed(t) => Cow::Borrowed(t.as_bytes()),
                Cow::Owned(t) => Cow::Owned(t.into_bytes()),
            }
        }
    }
}

/// The text after its first `n` lines, with the number of lines skipped.
fn skip_lines(text: &[u8], n: u64) -> (u64, &[u8]) {
    let mut at = 0;
    for skipped in 0..n {
        match text[at..].iter().position(|b| *b == b'\n') {
            Some(i) => at += i + 1,
            None => return (skipped, &text[text.len()..]),
        }
    }
    (n, &text[at..])
}

/// The bytes to read fields from: for `delimiter: whitespace`, each run of blanks between two
/// fields of a line (outside quotes) ends with [`BLANK_RUN`], so that the next field starts at
/// the separator (a quoted value at its quote); the rest of the run and the blanks at either end
/// of a line are trimmed from the values by the reader.
fn separated<'a>(opts: &CsvSettings, bytes: &'a [u8]) -> Cow<'a, [u8]> {
    if opts.delimiter != Delimiter::Whitespace {
        return Cow::Borrowed(bytes);
    }
    let blank = |b: u8| b == b' ' || b == b'\t';
    let mut out = bytes.to_vec();
    let (mut quoted, mut in_field, mut i) = (false, false, 0);
    while i < bytes.len() {
        let b = bytes[i];
        if b == opts.quote {
            quoted = !quoted;
            in_field = true;
        } else if quoted {
            // Blanks and line breaks inside quotes belong to the value.
        } else if b == b'\n' || b == b'\r' {
            in_field = false;
        } else if blank(b) {
            let run = bytes[i..].iter().take_while(|c| blank(**c)).count();
            // Blanks before a quoted first value go after it, so that it starts at its quote.
            let line_start = i == 0 || bytes[i - 1] == b'\n';
            if line_start
                && bytes.get(i + run) == Some(&opts.quote)
                && let Some(close) = closing_quote(&bytes[i + run..], opts.quote)
            {
                let value = &bytes[i + run..=i + run + close];
                out[i..i + value.len()].copy_from_slice(value);
                out[i + value.len()..=i + run + close].fill(b' ');
                i += run + close + 1;
                in_field = true;
                continue;
            }
            // A run that ends before the line does separates two fields.
            let ends_line = matches!(bytes.get(i + run), None | Some(b'\n' | b'\r'));
            if in_field && !ends_line {
                out[i + run - 1] = BLANK_RUN;
            }
            in_field = false;
            i += run;
            continue;
        } else {
            in_field = true;
        }
        i += 1;
    }
    Cow::Owned(out)
}

/// Where the quoted value at the start of `s` closes (escaped quotes come in pairs), when it
/// closes on its line.
fn closing_quote(s: &[u8], quote: u8) -> Option<usize> {
    let mut j = 1;
    while j < s.len() {
        match s[j] {
            b'\n' => return None,
            c if c == quote && s.get(j + 1) == Some(&quote) => j += 2,
            c if c == quote => return Some(j),
            _ => j += 1,
        }
    }
    None
}

/// Where a file's fields are.
#[derive(Debug, Clone)]
pub(super) struct Layout {
    /// Each declared column's field position.
    positions: Vec<usize>,
    /// Fields in a record.
    width: usize,
    /// Whether lines end with a delimiter (`None`: not known before the first row).
    trailing: Option<bool>,
}

/// The [`Layout`] of a file, from its header if it has one; `None` for an empty file. `at` is
/// the file and the line of its first record.
fn field_positions(
    source: &Source,
    opts: &CsvSettings,
    at: (&str, u64),
    reader: &mut ::csv::Reader<&[u8]>,
    record: &mut ::csv::ByteRecord,
    source_err: &impl Fn(String) -> Error,
) -> Result<Option<Layout>> {
    let (file, line) = at;
    if !opts.header {
        let width = source.columns.len();
        return Ok(Some(Layout {
            positions: (0..width).collect(),
            width,
            trailing: opts.trailing_delimiter,
        }));
    }
    match reader.read_byte_record(record) {
        Ok(true) => {}
        Ok(false) => return Ok(None),
        Err(e) => {
            return Err(source_err(format!(
                "{file}:{line}: cannot read the header: {e}"
            )));
        }
    }
    let mut header: Vec<String> = record
        .iter()
        .map(|f| String::from_utf8_lossy(f).trim().to_string())
        .collect();
    // A header ending with a delimiter names no last column.
    let trailing = opts
        .trailing_delimiter
        .unwrap_or_else(|| header.len() > 1 && header.last().is_some_and(String::is_empty));
    if trailing && header.last().is_some_and(String::is_empty) {
        header.pop();
    }
    let missing: Vec<&str> = source
        .columns
        .iter()
        .filter(|c| !header.iter().any(|h| h == &c.source_name))
        .map(|c| c.source_name.as_str())
        .collect();
    if !missing.is_empty() {
        let line_text = String::from_utf8_lossy(record.as_slice());
        return Err(source_err(format!(
            "{file}:{line}: the CSV header does not match the declared schema: missing column(s) \
             {}; the file has {}. {}",
            quote_all(&missing),
            super::shown(&quote_all(
                &header.iter().map(String::as_str).collect::<Vec<_>>()
            )),
            header_hint(opts, &header, &line_text)
        )));
    }
    // A declared name the header holds twice: which field is meant is not known.
    for c in &source.columns {
        let mut at = header
            .iter()
            .enumerate()
            .filter(|(_, h)| **h == c.source_name);
        if let (Some((first, _)), Some((second, _))) = (at.next(), at.next()) {
            return Err(source_err(format!(
                "{file}:{line}: the CSV header names column '{}' twice (fields {} and {}), so which \
                 one to load is not known. Rename one in the file, or read the fields by position: \
                 `csv: {{ header: false, skip_rows: 1 }}` with the columns declared in the file's \
                 order",
                c.source_name,
                first + 1,
                second + 1
            )));
        }
    }
    let positions = source
        .columns
        .iter()
        .map(|c| header.iter().position(|h| h == &c.source_name).unwrap_or(0))
        .collect();
    Ok(Some(Layout {
        positions,
        width: header.len(),
        trailing: Some(trailing),
    }))
}

/// What to change when a header does not name the declared columns: another delimiter when the
/// line splits into more fields by it, `header: false` when the line looks like data, else the
/// schema.
fn header_hint(opts: &CsvSettings, header: &[String], line: &str) -> String {
    let other = other_delimiter(opts, header.len(), line);
    let fields: Vec<&str> = match other {
        Some((d, _)) => line.split(char::from(d)).collect(),
        None => header.iter().map(String::as_str).collect(),
    };
    // Data, not names: a field that is a number, or a date.
    let data = fields.iter().any(|f| super::sniff::is_data(f));
    let mut fixes: Vec<String> = other.map(delimiter_fix).into_iter().collect();
    if data {
        fixes.push(
            "the first line looks like data, not column names: if the files have no header, set \
             `csv: { header: false }` (the columns are then taken in the declared order)"
                .to_string(),
        );
    }
    if fixes.is_empty() {
        "Fix `schema:` in the pipeline (or `source:` to map a field name)".to_string()
    } else {
        fixes.join("; ")
    }
}

/// The likely delimiter of a line that split into `fields` fields by the declared one, when
/// another common delimiter (`,` `;` `|` tab) splits it into more: the fix to write.
pub(crate) fn delimiter_hint(opts: &CsvSettings, fields: usize, line: &str) -> Option<String> {
    other_delimiter(opts, fields, line).map(delimiter_fix)
}

/// A common delimiter other than the declared one that splits `line` into more than `fields`
/// fields (at least two), and into how many; the one giving most.
fn other_delimiter(opts: &CsvSettings, fields: usize, line: &str) -> Option<(u8, usize)> {
    let current = match opts.delimiter {
        Delimiter::Byte(d) => Some(d),
        Delimiter::Whitespace => None,
    };
    [b',', b';', b'|', b'\t']
        .into_iter()
        .filter(|d| Some(*d) != current)
        .map(|d| (d, line.split(char::from(d)).count()))
        .filter(|(_, n)| *n >= 2 && *n > fields)
        .max_by_key(|(_, n)| *n)
}

/// The words suggesting delimiter `d`, which splits the line into `n` fields.
fn delimiter_fix((d, n): (u8, usize)) -> String {
    let shown = match d {
        b'\t' => "\"\\t\"".to_string(),
        d => format!("'{}'", char::from(d)),
    };
    format!(
        "the line splits into {n} fields by {shown}: is that the delimiter (`csv: {{ delimiter: \
         {shown} }}`)?"
    )
}

/// Where the record just read starts in the bytes.
#[inline]
fn record_start(record: &::csv::ByteRecord, bytes: &[u8]) -> usize {
    let mut start = record
        .position()
        .map_or(bytes.len(), |p| p.byte() as usize)
        .min(bytes.len());
    // After a CRLF the reported start can sit on the line break itself.
    while start < bytes.len() && matches!(bytes[start], b'\r' | b'\n') {
        start += 1;
    }
    start
}

/// The number of line breaks (`\n`) in the bytes.
#[inline]
fn count_newlines(bytes: &[u8]) -> u64 {
    bytes.iter().filter(|b| **b == b'\n').count() as u64
}

/// Why a record is cut off, if it is: a quote opened and never closed runs to the end of the
/// file, so the last record (`last`) then holds an odd number of quote characters (escaped
/// quotes come in pairs).
fn unterminated(record: &[u8], last: bool, opts: &CsvSettings, line: u64) -> Option<String> {
    (last && odd_quotes(record, opts.quote)).then(|| {
        format!(
            "unterminated quoted field: the quote opened on line {line} is never closed, so the \
             rest of the file would be one value"
        )
    })
}

/// Whether the bytes hold an odd number of `quote` characters.
#[inline]
fn odd_quotes(bytes: &[u8], quote: u8) -> bool {
    bytes.iter().filter(|b| **b == quote).count() % 2 == 1
}

/// Convert a record's declared fields into `cells`; the column and reason of a failure.
#[inline]
fn fields_to_cells<'r>(
    record: &'r ::csv::ByteRecord,
    columns: &[Column],
    positions: &[usize],
    null_values: &[String],
    starts: &mut Vec<usize>,
    cells: &mut Vec<Cell<'r>>,
) -> Option<(String, String)> {
    let mut failed = None;
    // The record's fields are checked as UTF-8 in one pass; a field is then taken from that
    // text when it starts and ends on character boundaries (else checked on its own).
    // (`as_slice` holds the fields one after the other.)
    let whole = std::str::from_utf8(record.as_slice()).ok();
    starts.clear();
    let mut at = 0;
    for f in record {
        starts.push(at);
        at += f.len();
    }
    for (col, &pos) in columns.iter().zip(positions) {
        let raw = record.get(pos).unwrap_or_default();
        let from_whole = whole.and_then(|w| {
            let start = *starts.get(pos)?;
            w.get(start..start + raw.len())
        });
        let Some(text) = from_whole.or_else(|| std::str::from_utf8(raw).ok()) else {
            failed = Some((
                col.name.clone(),
                format!("invalid UTF-8 in column '{}'", col.name),
            ));
            break;
        };
        if null_values.iter().any(|n| n == text) {
            if col.required {
                failed = Some((
                    col.name.clone(),
                    format!("missing required value for column '{}'", col.name),
                ));
                break;
            }
            cells.push(Cell::Null);
            continue;
        }
        match parse_text(col, text) {
            Ok(c) => cells.push(c),
            Err(reason) => {
                failed = Some((col.name.clone(), reason));
                break;
            }
        }
    }
    failed
}

/// Empty a vector and reuse its allocation for another lifetime (the in-place collect keeps it).
pub(super) fn recycle<'b>(mut v: Vec<Cell<'_>>) -> Vec<Cell<'b>> {
    v.clear();
    v.into_iter().map(|_| Cell::Null).collect()
}

fn quote_all(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("'{n}'"))
        .collect::<Vec<_>>()
        .join(", ")
}
