//! CSV files into declared columns, rejecting bad rows with their line.

use arrow::datatypes::SchemaRef;

use super::convert::{Cell, RowBuilder, parse_text};
use super::{BATCH_ROWS, FileOutput, Reject, raw_text};
use crate::error::{Error, Result};
use crate::plan::{Column, CsvSettings, Source};

/// Parse one CSV file.
pub(super) fn parse(
    source: &Source,
    opts: &CsvSettings,
    file: &str,
    bytes: &[u8],
    schema: SchemaRef,
) -> Result<FileOutput> {
    let mut reader = csv_reader(opts, bytes);
    let mut record = ::csv::ByteRecord::new();
    let mut out = FileOutput {
        file: file.to_string(),
        bytes_read: bytes.len() as u64,
        ..Default::default()
    };
    let source_err = |message: String| Error::Source {
        pipeline: source.pipeline.clone(),
        source_name: source.name.clone(),
        message,
    };

    // Map declared columns to field positions.
    let Some((positions, width)) =
        field_positions(source, opts, file, &mut reader, &mut record, &source_err)?
    else {
        return Ok(out); // empty file: nothing to load
    };

    let mut rows = RowBuilder::new(&source.columns, schema);
    // Reused between rows; emptied before each reuse so its lifetime can change.
    let mut spare: Vec<Cell<'static>> = Vec::with_capacity(source.columns.len());
    // Where each field of the current record starts in its bytes.
    let mut starts: Vec<usize> = Vec::with_capacity(width);
    // A rejected row's raw text runs to the start of the next record.
    let mut open_reject: Option<(usize, usize)> = None; // (reject index, byte start)
    // Line numbers counted from the bytes (the reader's own count is off for CRLF files).
    let (mut counted_to, mut line) = (0usize, 1u64);
    loop {
        let read = reader.read_byte_record(&mut record);
        let start = record_start(&record, bytes);
        line += count_newlines(&bytes[counted_to..start.max(counted_to)]);
        counted_to = start.max(counted_to);
        if let Some((i, s)) = open_reject.take() {
            let end = if matches!(read, Ok(true)) {
                start
            } else {
                bytes.len()
            };
            out.rejects[i].raw = raw_text(&bytes[s..end.max(s)]);
        }
        match read {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => {
                // The csv reader only fails on I/O, not on content; report and stop this file.
                return Err(source_err(format!("{file}: cannot read: {e}")));
            }
        }
        if record.len() == 1 && record.get(0).is_some_and(<[u8]>::is_empty) {
            continue; // blank line
        }
        out.rows_read += 1;
        // A quote opened and never closed runs to the end of the file: the last record then
        // holds an odd number of quote characters (escaped quotes come in pairs).
        let end = (reader.position().byte() as usize).min(bytes.len());
        let unterminated = end == bytes.len() && odd_quotes(&bytes[start..end], opts.quote);
        let mut reject = |column: Option<String>, reason: String, out: &mut FileOutput| {
            out.rejects.push(Reject {
                file: file.to_string(),
                line,
                column,
                raw: String::new(),
                reason,
            });
            open_reject = Some((out.rejects.len() - 1, start));
        };
        if unterminated {
            reject(
                None,
                format!(
                    "unterminated quoted field: the quote opened on line {line} is never closed, \
                     so the rest of the file would be one value"
                ),
                &mut out,
            );
            continue;
        }
        if record.len() != width {
            reject(
                None,
                format!("expected {width} fields, found {}", record.len()),
                &mut out,
            );
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
            reject(Some(column), reason, &mut out);
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
    Ok(out)
}

/// A CSV reader of `bytes` that yields every line (the header too), of any number of fields.
fn csv_reader<'a>(opts: &CsvSettings, bytes: &'a [u8]) -> ::csv::Reader<&'a [u8]> {
    ::csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .delimiter(opts.delimiter)
        .quote(opts.quote)
        .from_reader(bytes)
}

/// Each declared column's field position and the record width; `None` for an empty file.
fn field_positions(
    source: &Source,
    opts: &CsvSettings,
    file: &str,
    reader: &mut ::csv::Reader<&[u8]>,
    record: &mut ::csv::ByteRecord,
    source_err: &impl Fn(String) -> Error,
) -> Result<Option<(Vec<usize>, usize)>> {
    let width;
    let positions: Vec<usize> = if opts.header {
        match reader.read_byte_record(record) {
            Ok(true) => {}
            Ok(false) => return Ok(None),
            Err(e) => return Err(source_err(format!("{file}:1: cannot read the header: {e}"))),
        }
        let header: Vec<String> = record
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let f = if i == 0 {
                    f.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(f)
                } else {
                    f
                };
                String::from_utf8_lossy(f).trim().to_string()
            })
            .collect();
        width = header.len();
        let missing: Vec<&str> = source
            .columns
            .iter()
            .filter(|c| !header.iter().any(|h| h == &c.source_name))
            .map(|c| c.source_name.as_str())
            .collect();
        if !missing.is_empty() {
            return Err(source_err(format!(
                "{file}:1: the CSV header does not match the declared schema: missing column(s) {}; \
                 the file has {}. Fix `schema:` in the pipeline (or `source:` to map a field name)",
                quote_all(&missing),
                quote_all(&header.iter().map(String::as_str).collect::<Vec<_>>())
            )));
        }
        source
            .columns
            .iter()
            .map(|c| header.iter().position(|h| h == &c.source_name).unwrap_or(0))
            .collect()
    } else {
        width = source.columns.len();
        (0..source.columns.len()).collect()
    };
    Ok(Some((positions, width)))
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
