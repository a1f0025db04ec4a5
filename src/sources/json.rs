//! Newline-delimited JSON into declared columns, rejecting bad lines.

use arrow::datatypes::SchemaRef;

use super::convert::{Cell, RowBuilder, parse_json, parse_text};
use super::csv::recycle;
use super::{BATCH_ROWS, FileOutput, Reject, raw_text};
use crate::config::types::ColumnType;
use crate::error::Result;
use crate::plan::Source;

/// Parse one NDJSON file.
pub(super) fn parse(
    source: &Source,
    file: &str,
    bytes: &[u8],
    schema: SchemaRef,
) -> Result<FileOutput> {
    let mut out = FileOutput {
        file: file.to_string(),
        bytes_read: bytes.len() as u64,
        ..Default::default()
    };
    let mut rows = RowBuilder::new(&source.columns, schema);
    let mut spare: Vec<Cell<'static>> = Vec::with_capacity(source.columns.len());
    let body = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    for (i, line_bytes) in body.split(|b| *b == b'\n').enumerate() {
        let line = i as u64 + 1;
        let trimmed = line_bytes.trim_ascii();
        if trimmed.is_empty() {
            continue;
        }
        out.rows_read += 1;
        let reject = |column: Option<String>, reason: String| Reject {
            file: file.to_string(),
            line,
            column,
            raw: raw_text(line_bytes),
            reason,
        };
        let value: serde_json::Value = match std::str::from_utf8(trimmed) {
            Err(_) => {
                out.rejects.push(reject(None, "invalid UTF-8".into()));
                continue;
            }
            Ok(text) => match serde_json::from_str(text) {
                Ok(v) => v,
                Err(e) => {
                    out.rejects.push(reject(None, format!("invalid JSON: {e}")));
                    continue;
                }
            },
        };
        let Some(obj) = value.as_object() else {
            out.rejects
                .push(reject(None, "expected a JSON object on the line".into()));
            continue;
        };
        // Text columns given numbers, objects or arrays keep their JSON text.
        let texts: Vec<Option<String>> = source
            .columns
            .iter()
            .map(|c| match (obj.get(&c.source_name), c.ty) {
                (Some(v), ColumnType::String | ColumnType::Json)
                    if !v.is_string() && !v.is_null() =>
                {
                    Some(v.to_string())
                }
                _ => None,
            })
            .collect();
        let mut cells: Vec<Cell<'_>> = recycle(std::mem::take(&mut spare));
        let mut failed = None;
        for (col, text) in source.columns.iter().zip(&texts) {
            let parsed = match (text, obj.get(&col.source_name)) {
                (Some(t), _) => parse_text(col, t),
                (None, Some(v)) => parse_json(col, v),
                (None, None) => Ok(Cell::Null),
            };
            match parsed {
                Ok(Cell::Null) if col.required => {
                    failed = Some((
                        col.name.clone(),
                        format!("missing required value for column '{}'", col.name),
                    ));
                    break;
                }
                Ok(c) => cells.push(c),
                Err(reason) => {
                    failed = Some((col.name.clone(), reason));
                    break;
                }
            }
        }
        if let Some((column, reason)) = failed {
            spare = recycle(cells);
            out.rejects.push(reject(Some(column), reason));
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
