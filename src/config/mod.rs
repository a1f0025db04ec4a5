//! What the user wrote: the project file and pipeline specs, as typed serde structs.
//!
//! Unknown keys are rejected; every parse error becomes a [`Problem`] naming the file, line and
//! column. Nothing here touches the file system beyond reading the one file it is given.
//!
//! May import only the leaves (`error`); everything above reads these types through `plan`.

pub mod pipeline;
pub mod project;
pub mod types;

use std::path::Path;
use std::sync::Arc;

use serde::de::DeserializeOwned;

use crate::error::{Position, Problem};

/// The project file's name.
pub const PROJECT_FILE: &str = "kbcrm.yaml";

pub use pipeline::PipelineSpec;
pub use project::ProjectSpec;

/// Parse YAML text into a spec type; `display_path` names the file in errors. Every unknown
/// or repeated key of the file is reported, not only the first: each one found is blanked out
/// (its lines, offsets kept) and the text parsed again.
pub fn parse_yaml<T: DeserializeOwned>(
    display_path: &Path,
    text: &Arc<String>,
) -> Result<T, Vec<Problem>> {
    let options = serde_saphyr::options! { with_snippet: false };
    let mut current = text.to_string();
    let mut problems = Vec::new();
    for _ in 0..20 {
        let e = match serde_saphyr::from_str_with_options::<T>(&current, options.clone()) {
            Ok(spec) if problems.is_empty() => return Ok(spec),
            Ok(_) => return Err(problems),
            Err(e) => e,
        };
        let problem = yaml_problem(display_path, text, &e);
        let blanked = match (&problem.position, repeatable(&problem.message)) {
            (Some(pos), true) => blank_key(&current, pos.line, pos.column),
            _ => None,
        };
        problems.push(problem);
        match blanked {
            Some(next) => current = next,
            None => break,
        }
    }
    Err(problems)
}

/// Whether parsing can go on past this error once its key is taken out.
fn repeatable(message: &str) -> bool {
    message.contains("unknown field") || message.contains("duplicate mapping key")
}

/// `text` with the block-mapping key at `line`/`column` (1-based) and the lines nested under it
/// replaced by spaces (byte offsets and line numbers kept), or `None` when the key does not
/// start its line.
fn blank_key(text: &str, line: usize, column: usize) -> Option<String> {
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let first = lines.get(line.checked_sub(1)?)?;
    let indent = first.len() - first.trim_start_matches(' ').len();
    if column.checked_sub(1)? != indent {
        return None;
    }
    // The key's line, and after it the lines more indented than it (or empty).
    let mut end = line;
    while let Some(l) = lines.get(end) {
        let body = l.trim_end_matches(['\n', '\r']);
        let deeper = body.len() - body.trim_start_matches(' ').len() > indent;
        if body.trim().is_empty() || deeper {
            end += 1;
        } else {
            break;
        }
    }
    let mut out = String::with_capacity(text.len());
    for (i, l) in lines.iter().enumerate() {
        if i + 1 >= line && i < end {
            // One space per byte keeps every later offset where it was.
            for b in l.bytes() {
                out.push(if b == b'\n' || b == b'\r' {
                    b as char
                } else {
                    ' '
                });
            }
        } else {
            out.push_str(l);
        }
    }
    Some(out)
}

/// One parse error as a problem at its place, in the user's words.
fn yaml_problem(display_path: &Path, text: &Arc<String>, e: &serde_saphyr::Error) -> Problem {
    let project = display_path.file_name().is_some_and(|n| n == PROJECT_FILE);
    let mut message = yaml_message(e);
    let mut pos = e.location().map(|loc| match loc.span().byte_offset() {
        Some(off) => {
            let mut p = Position::of_offset(text, off as usize, 0);
            p.len = loc.span().byte_len().unwrap_or(0) as usize;
            p
        }
        None => Position::of_line_col(text, loc.line() as usize, loc.column() as usize, 0),
    });
    // A tab is often reported where the scanner was, lines before it: point at the tab.
    if message.contains("tab") {
        let from = pos.as_ref().map_or(1, |p| p.line);
        if let Some((line, column)) = indentation_tab(text, from) {
            pos = Some(Position::of_line_col(text, line, column, 1));
            message =
                format!("a tab in the indentation of line {line}; YAML indents with spaces only");
        }
    }
    let mut problem = Problem::new(display_path, message);
    if let Some(p) = pos {
        problem = problem.at(p, text);
    }
    if let Some(help) = yaml_help(&problem.message, project) {
        problem = problem.help(help);
    }
    problem
}

/// The first tab in a line's indentation at or after `from` (line and column, 1-based).
fn indentation_tab(text: &str, from: usize) -> Option<(usize, usize)> {
    text.lines()
        .enumerate()
        .skip(from.saturating_sub(1))
        .find_map(|(i, l)| {
            let indent = l.len() - l.trim_start_matches([' ', '\t']).len();
            l[..indent].find('\t').map(|c| (i + 1, c + 1))
        })
}

/// The error text without serde-saphyr's own location suffix (we print the location
/// ourselves) or its advice about its own options.
fn yaml_message(e: &serde_saphyr::Error) -> String {
    let full = e.to_string();
    let trimmed = match full.rfind(" at line ") {
        Some(i) if full[i..].contains("column") => full[..i].to_string(),
        _ => full,
    };
    let trimmed = trimmed
        .split(", set DuplicateKeyPolicy")
        .next()
        .unwrap_or_default()
        .to_string();
    let mut msg = trimmed.trim().to_string();
    if let Some(first) = msg.get(..1) {
        let lower = first.to_lowercase();
        msg.replace_range(..1, &lower);
    }
    msg
}

fn yaml_help(message: &str, project: bool) -> Option<&'static str> {
    let unknown = if project {
        "remove the key or fix its spelling; `kbcrm schema --project-file` prints every allowed key"
    } else {
        "remove the key or fix its spelling; `kbcrm schema` prints every allowed key"
    };
    let missing = if project {
        "add the key; `kbcrm schema --project-file` describes each one"
    } else {
        "add the key; `kbcrm schema` describes each one"
    };
    if message.contains("unknown field") {
        Some(unknown)
    } else if message.contains("missing field") {
        Some(missing)
    } else if message.contains("duplicate mapping key") {
        Some("a key may appear once in a mapping: keep one of the two")
    } else {
        None
    }
}

/// The JSON Schema of the pipeline spec, for editors.
pub fn pipeline_json_schema() -> serde_json::Value {
    let schema = schemars::schema_for!(PipelineSpec);
    serde_json::to_value(schema).unwrap_or(serde_json::Value::Null)
}

/// The JSON Schema of the project file.
pub fn project_json_schema() -> serde_json::Value {
    let schema = schemars::schema_for!(ProjectSpec);
    serde_json::to_value(schema).unwrap_or(serde_json::Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn parse(text: &str) -> Result<PipelineSpec, Problem> {
        parse_all(text).map_err(|mut ps| ps.remove(0))
    }

    fn parse_all(text: &str) -> Result<PipelineSpec, Vec<Problem>> {
        parse_yaml(
            &PathBuf::from("pipelines/p.yaml"),
            &Arc::new(text.to_string()),
        )
    }

    #[test]
    fn every_unknown_and_repeated_key_is_reported_with_its_line() {
        let text = "name: p\nsources:\n  o:\n    format: csv\n    locaton: x\n    \
                    schema: { a: int }\n    mdoe: append\n    format: json\nmodles: []\n";
        let ps = parse_all(text).unwrap_err();
        let lines: Vec<usize> = ps
            .iter()
            .map(|p| p.position.as_ref().unwrap().line)
            .collect();
        assert_eq!(lines, [5, 7, 8, 9], "{ps:?}");
        assert!(
            ps[2].message.starts_with("duplicate mapping key"),
            "{}",
            ps[2]
        );
        assert!(!ps[2].message.contains("DuplicateKeyPolicy"), "{}", ps[2]);
        let project = parse_yaml::<ProjectSpec>(
            &PathBuf::from(PROJECT_FILE),
            &Arc::new("name: p\nservve: {}\nenginee: {}\n".to_string()),
        )
        .unwrap_err();
        assert_eq!(project.len(), 2, "{project:?}");
        assert!(
            project[0]
                .help
                .as_deref()
                .is_some_and(|h| h.contains("kbcrm schema --project-file")),
            "{:?}",
            project[0]
        );
    }

    #[test]
    fn a_tab_is_reported_on_its_own_line() {
        let text = "sources:\n  o:\n    format: csv\n    schema:\n      id: int\n\t  v: int\n";
        let p = parse(text).unwrap_err();
        assert_eq!(p.position.as_ref().unwrap().line, 6, "{p}");
        assert!(
            p.message.contains("a tab in the indentation of line 6"),
            "{p}"
        );
    }

    #[test]
    fn unknown_key_names_line_and_column() {
        let text = "name: p\nsources:\n  orders:\n    format: csv\n    locaton: x\n";
        let p = parse(text).unwrap_err();
        let pos = p.position.expect("position");
        assert_eq!(pos.line, 5, "{p}");
        assert!(p.message.contains("locaton"), "{p}");
        assert!(p.to_string().starts_with("pipelines/p.yaml:5:"), "{p}");
    }

    #[test]
    fn wrong_type_and_bad_column_type() {
        let p = parse("name: [1, 2]\n").unwrap_err();
        assert_eq!(p.position.unwrap().line, 1, "{p}");
        let text =
            "sources:\n  o:\n    format: csv\n    location: x\n    schema:\n      a: strnig\n";
        let p = parse(text).unwrap_err();
        assert_eq!(p.position.unwrap().line, 6, "{p}");
        assert!(p.message.contains("strnig"), "{p}");
    }

    #[test]
    fn full_spec_parses() {
        let text = r#"
name: sales
schedule: "0 2 * * *"
sources:
  orders:
    format: csv
    location: sources/sales/orders/
    mode: merge
    keys: [order_id]
    schema:
      order_id: { type: string, required: true }
      amount: decimal(18,2)
      ts: { type: timestamp, format: "%Y-%m-%d %H:%M:%S" }
    csv: { delimiter: ";" }
    rejects: { max_ratio: 0.01 }
models:
  - sql/staging/stg_orders.sql
  - { path: sql/facts/fact_sales.sql, mode: merge, keys: [order_id] }
tests:
  - unique: { table: stg_orders, columns: [order_id] }
  - relationships: { table: a, column: b, to: c.d, severity: warn }
"#;
        let spec = parse(text).unwrap();
        assert_eq!(spec.sources["orders"].value.schema.value.len(), 3);
        assert_eq!(spec.models.len(), 2);
        assert_eq!(spec.tests.len(), 2);
    }

    #[test]
    fn schema_lists_keys() {
        let s = pipeline_json_schema().to_string();
        assert!(
            s.contains("\"sources\"") && s.contains("\"max_ratio\""),
            "{s}"
        );
    }
}
