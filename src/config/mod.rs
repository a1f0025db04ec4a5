//! What the user wrote: the project file and pipeline specs, as typed serde structs.
//!
//! Unknown keys are rejected; every parse error becomes a [`Problem`] naming the file, line and
//! column. Nothing here touches the file system beyond reading the one file it is given.

pub mod pipeline;
pub mod project;
pub mod types;

use std::path::Path;
use std::sync::Arc;

use serde::de::DeserializeOwned;

use crate::error::{Position, Problem};

pub use pipeline::PipelineSpec;
pub use project::ProjectSpec;

/// Parse YAML text into a spec type; `display_path` names the file in errors.
pub fn parse_yaml<T: DeserializeOwned>(
    display_path: &Path,
    text: &Arc<String>,
) -> Result<T, Problem> {
    let options = serde_saphyr::options! { with_snippet: false };
    serde_saphyr::from_str_with_options::<T>(text, options).map_err(|e| {
        let message = yaml_message(&e);
        let mut problem = Problem::new(display_path, message);
        if let Some(loc) = e.location() {
            let line = loc.line() as usize;
            let column = loc.column() as usize;
            let pos = match loc.span().byte_offset() {
                Some(off) => {
                    let mut p = Position::of_offset(text, off as usize, 0);
                    p.len = loc.span().byte_len().unwrap_or(0) as usize;
                    p
                }
                None => Position::of_line_col(text, line, column, 0),
            };
            problem = problem.at(pos, text);
        }
        if let Some(help) = yaml_help(&problem.message) {
            problem = problem.help(help);
        }
        problem
    })
}

/// The error text without serde-saphyr's own location suffix (we print the location ourselves).
fn yaml_message(e: &serde_saphyr::Error) -> String {
    let full = e.to_string();
    let trimmed = match full.rfind(" at line ") {
        Some(i) if full[i..].contains("column") => full[..i].to_string(),
        _ => full,
    };
    let mut msg = trimmed.trim().to_string();
    if let Some(first) = msg.get(..1) {
        let lower = first.to_lowercase();
        msg.replace_range(..1, &lower);
    }
    msg
}

fn yaml_help(message: &str) -> Option<&'static str> {
    if message.contains("unknown field") {
        Some("remove the key or fix its spelling; `kbcrm schema` prints every allowed key")
    } else if message.contains("missing field") {
        Some("add the key; `kbcrm schema` describes each one")
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
        parse_yaml(
            &PathBuf::from("pipelines/p.yaml"),
            &Arc::new(text.to_string()),
        )
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
