//! What commands print on stdout. A closed pipe (`kbcrm query ... | head`) is not an error.

use std::io::Write;

use arrow::record_batch::RecordBatch;
use clap::ValueEnum;

use crate::error::{Error, Result};
use crate::plan::Project;
use crate::run::{Checked, RunReport};
use crate::warehouse::Warehouse;

/// Query result formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// An aligned text table.
    Table,
    /// CSV with a header line.
    Csv,
    /// One JSON object per row.
    Json,
}

fn write_out(f: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> Result<()> {
    let stdout = std::io::stdout();
    let mut lock = stdout.lock();
    match f(&mut lock).and_then(|()| lock.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Error::io("<stdout>", e)),
    }
}

/// Print one line.
pub fn line(s: &str) -> Result<()> {
    write_out(|w| writeln!(w, "{s}"))
}

/// Print query results.
pub fn batches(batches: &[RecordBatch], format: OutputFormat) -> Result<()> {
    match format {
        OutputFormat::Table => {
            let table = arrow::util::pretty::pretty_format_batches(batches)?;
            write_out(|w| writeln!(w, "{table}"))
        }
        OutputFormat::Csv => {
            let mut buf = Vec::new();
            {
                let mut writer = arrow::csv::WriterBuilder::new()
                    .with_header(true)
                    .build(&mut buf);
                for b in batches {
                    writer.write(b)?;
                }
            }
            write_out(|w| w.write_all(&buf))
        }
        OutputFormat::Json => {
            let mut buf = Vec::new();
            {
                // Every column in every line, a missing value as `null`.
                let mut writer = arrow::json::WriterBuilder::new()
                    .with_explicit_nulls(true)
                    .build::<_, arrow::json::writer::LineDelimited>(&mut buf);
                for b in batches {
                    writer.write(b)?;
                }
                writer.finish()?;
            }
            write_out(|w| w.write_all(&buf))
        }
    }
}

/// Human size.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// One line per table of each run.
pub fn run_summary(reports: &[RunReport]) -> Result<()> {
    let mut out = String::new();
    for r in reports {
        out.push_str(&format!(
            "pipeline {} (run {}) committed in {:.1}s\n",
            r.pipeline, r.run_id, r.seconds
        ));
        for t in &r.tables {
            let version = t.version.map_or("-".to_string(), |v| v.to_string());
            let change = match (t.skipped, t.changed) {
                (Some(why), _) => format!("  ({why})"),
                (None, true) => String::new(),
                (None, false) => "  (unchanged)".to_string(),
            };
            let rejected = if t.rows_rejected > 0 {
                format!("  {} rejected", t.rows_rejected)
            } else {
                String::new()
            };
            out.push_str(&format!(
                "  {:<10} {:<28} {:>9} read {:>9} written {:>10} {:>6.2}s  v{version}{rejected}{change}\n",
                t.kind,
                t.table,
                t.rows_in,
                t.rows_written,
                bytes(t.bytes_written),
                t.seconds
            ));
            if !t.files_skipped.is_empty() {
                out.push_str(&format!(
                    "             skipped {} file{}: {}\n",
                    t.files_skipped.len(),
                    if t.files_skipped.len() == 1 { "" } else { "s" },
                    t.files_skipped.join(", ")
                ));
            }
        }
        for i in &r.identities {
            out.push_str(&format!("  {i}\n"));
        }
        for t in &r.tests {
            let mut status = if t.failures == 0 {
                "pass".to_string()
            } else {
                format!("{} failing", t.failures)
            };
            match t.checked {
                Checked::All => {}
                Checked::AddedRows => status.push_str(" (rows added by this run)"),
                Checked::AddedAndFailing => {
                    status.push_str(" (rows added by this run, and the values failing before)")
                }
                Checked::Reused => status.push_str(" (tables unchanged since it last ran)"),
                Checked::KeptByMerge => status.push_str(" (kept unique by the merge on its keys)"),
            }
            out.push_str(&format!("  test     {:<60} {status}\n", t.name));
        }
    }
    write_out(|w| w.write_all(out.as_bytes()))
}

/// `kbcrm tables`.
pub async fn tables(project: &Project, files: bool) -> Result<()> {
    let wh = Warehouse::open(&project.warehouse)?;
    if files {
        return table_files(&wh).await;
    }
    let names = wh.table_names().await?;
    let mut out = format!(
        "{:<32} {:>7} {:>12} {:>10} {:>6}  {}\n",
        "table", "version", "rows", "size", "files", "last run"
    );
    for n in names {
        if let Some(i) = wh.info(&n).await? {
            let when = i
                .committed_at
                .and_then(chrono::DateTime::from_timestamp_millis)
                .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                .unwrap_or_default();
            out.push_str(&format!(
                "{:<32} {:>7} {:>12} {:>10} {:>6}  {} {}\n",
                i.name,
                i.version,
                i.rows,
                bytes(i.bytes),
                i.files,
                when,
                i.last_run.unwrap_or_default()
            ));
        }
    }
    write_out(|w| w.write_all(out.as_bytes()))
}

/// Print run results as one JSON document.
/// `kbcrm tables --files`: the files of each table's current version and the unreferenced
/// ones in its folder, which `kbcrm vacuum` removes once they are older than its retention.
async fn table_files(wh: &Warehouse) -> Result<()> {
    let mut out = format!(
        "{:<32} {:>7} {:>10} {:>13} {:>16}\n",
        "table", "files", "size", "unreferenced", "unreferenced size"
    );
    let (mut files, mut size) = (0, 0);
    for t in wh.table_files().await? {
        out.push_str(&format!(
            "{:<32} {:>7} {:>10} {:>13} {:>16}\n",
            t.table,
            t.files,
            bytes(t.bytes),
            t.unreferenced_files,
            bytes(t.unreferenced_bytes)
        ));
        files += t.unreferenced_files;
        size += t.unreferenced_bytes;
    }
    if files > 0 {
        out.push_str(&format!(
            "{files} files ({}) are referenced by no current version: `kbcrm vacuum` removes \
             those older than its retention (7 days unless --retain says otherwise)\n",
            bytes(size)
        ));
    }
    write_out(|w| w.write_all(out.as_bytes()))
}

pub fn run_json(reports: &[RunReport]) -> Result<()> {
    let runs: Vec<serde_json::Value> = reports
        .iter()
        .map(|r| {
            serde_json::json!({
                "run_id": r.run_id,
                "pipeline": r.pipeline,
                "seconds": r.seconds,
                "changed": r.tables.iter().any(|t| t.changed),
                "tables": r.tables.iter().map(|t| serde_json::json!({
                    "table": t.table,
                    "kind": t.kind,
                    "version": t.version,
                    "changed": t.changed,
                    "skipped": t.skipped,
                    "files_skipped": t.files_skipped,
                    "rows_read": t.rows_in,
                    "rows_written": t.rows_written,
                    "rows_rejected": t.rows_rejected,
                    "bytes_written": t.bytes_written,
                })).collect::<Vec<_>>(),
                "tests": r.tests.iter().map(|t| serde_json::json!({
                    "test": t.name,
                    "failures": t.failures,
                    "passed": t.failures == 0,
                    "reused": t.checked == Checked::Reused,
                    "checked": match t.checked {
                        Checked::All => "all rows",
                        Checked::AddedRows => "added rows",
                        Checked::AddedAndFailing => "added rows and failing values",
                        Checked::Reused => "reused",
                        Checked::KeptByMerge => "kept by merge",
                    },
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let doc = serde_json::json!({ "status": "succeeded", "runs": runs });
    write_out(|w| writeln!(w, "{doc}"))
}

/// Print what `kbcrm extract` wrote, its headline figures and its deliveries.
pub fn extract_summary(reports: &[crate::extract::ExtractReport]) -> Result<()> {
    let mut s = String::new();
    for r in reports {
        s.push_str(&format!(
            "extract '{}' as of {}{}: {} files in {}\n",
            r.name,
            r.as_of,
            r.role
                .as_ref()
                .map(|role| format!(" for role {role}"))
                .unwrap_or_default(),
            r.files.len(),
            r.dir.display()
        ));
        for f in r
            .files
            .iter()
            .filter(|f| f.parent() == Some(std::path::Path::new("")))
        {
            s.push_str(&format!("  {}\n", r.dir.join(f).display()));
        }
        let tables = r.files.len()
            - r.files
                .iter()
                .filter(|f| f.parent() == Some(std::path::Path::new("")))
                .count();
        if tables > 0 {
            s.push_str(&format!(
                "  {} table files in {}\n",
                tables,
                r.dir.join("tables").display()
            ));
        }
        for f in &r.headline {
            s.push_str(&format!(
                "  {:<34} {:>14}  {}\n",
                f.label,
                f.show(f.value),
                f.show_change().unwrap_or_default()
            ));
        }
        for (section, why) in &r.omitted {
            s.push_str(&format!("  left out: {section}: {why}\n"));
        }
        for d in &r.deliveries {
            match &d.error {
                None => s.push_str(&format!(
                    "  delivered to {} ({} attempts)\n",
                    d.target, d.attempts
                )),
                Some(_) => s.push_str(&format!(
                    "  NOT delivered to {} ({} attempts)\n",
                    d.target, d.attempts
                )),
            }
        }
    }
    write_out(|w| write!(w, "{s}"))
}

/// Print one recorded run in full.
pub async fn run_record(project: &Project, id: &str) -> Result<()> {
    use crate::warehouse::history::RunStatus;
    let wh = Warehouse::open(&project.warehouse)?;
    let r = &wh.find_run(id, None).await?;
    let mut s = format!(
        "run {}\n  {:?} {} (trigger {})\n  status: {}\n",
        r.run_id,
        r.kind,
        r.name,
        r.trigger,
        match r.status {
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
        }
    );
    if let Some(d) = r.as_of {
        s.push_str(&format!("  as of: {d}\n"));
    }
    s.push_str(&format!(
        "  started: {}\n  ended: {} ({:.1}s)\n",
        r.started_at.to_rfc3339(),
        r.ended_at.to_rfc3339(),
        (r.ended_at - r.started_at).num_milliseconds() as f64 / 1000.0
    ));
    if r.kind == crate::warehouse::history::RunKind::Vacuum {
        for t in &r.tables {
            s.push_str(&format!(
                "  {:<32} {:>8} files removed, {}\n",
                t.table,
                t.files_removed,
                bytes(t.bytes_removed)
            ));
        }
    } else if !r.tables.is_empty() {
        s.push_str(&format!(
            "  {:<32} {:>8} {:>10} {:>10} {:>9}  changed\n",
            "table", "version", "read", "written", "rejected"
        ));
        for t in &r.tables {
            s.push_str(&format!(
                "  {:<32} {:>8} {:>10} {:>10} {:>9}  {}\n",
                t.table,
                t.version
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "-".into()),
                t.rows_read,
                t.rows_written,
                t.rows_rejected,
                if t.changed { "yes" } else { "no" }
            ));
        }
        s.push_str(&format!(
            "  data tests: {} passed, {} failed\n",
            r.tests_passed, r.tests_failed
        ));
    }
    for f in &r.files {
        s.push_str(&format!("  file: {f}\n"));
    }
    for d in &r.deliveries {
        s.push_str(&format!("  delivery: {d}\n"));
    }
    if let Some(e) = &r.error {
        s.push_str(&format!("  error: {e}\n"));
    }
    write_out(|w| write!(w, "{s}"))
}
