//! `kbcrm extract`: the cubes' findings for people who open files, not SQL clients.
//!
//! ```text
//! warehouse snapshot ─► role's view (grants, row filters, PII) ─► pack (tables + headline)
//!     ─► files in a staging folder: workbook, dashboard, CSV/Parquet ─► renamed into place
//!     ─► deliveries (folder, object store, e-mail), each retried; the files stay either way
//! ```
//!
//! Everything in the files comes from the table versions read and the as-of date, so the same
//! versions give the same bytes.
//!
//! A face: may import `run` and everything below it; `schedule` and `cli` call it.

mod deliver;
mod html;
mod pack;
mod svg;
mod tables;
mod xlsx;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use chrono::NaiveDate;

use crate::engine;
use crate::error::{Error, Result};
use crate::plan::ExtractFormat;
use crate::plan::Project;
use crate::plan::access::Role;
use crate::plan::extracts::{DEFAULT_EXTRACT, Extract};
use crate::warehouse::Warehouse;
use crate::warehouse::history::{RunKind, RunRecord, RunStatus};

pub use deliver::DeliveryReport;
pub use pack::{Figure, FigureKind, Pack, PackTable, group_digits};

/// What `kbcrm extract` was asked for.
#[derive(Debug, Clone)]
pub struct ExtractOptions {
    /// Folder the extract's folder is written in.
    pub out: PathBuf,
    /// As-of date overriding the extract's own.
    pub as_of: Option<NaiveDate>,
    /// Run the declared deliveries.
    pub deliver: bool,
    /// What started it, for the run history (`cli`, `demo`, `schedule`).
    pub trigger: String,
}

/// What one extract wrote and where it went.
#[derive(Debug)]
pub struct ExtractReport {
    /// Extract name.
    pub name: String,
    /// The pack's as-of date.
    pub as_of: NaiveDate,
    /// The recipient role.
    pub role: Option<String>,
    /// Its folder.
    pub dir: PathBuf,
    /// Files written, relative to `dir`.
    pub files: Vec<PathBuf>,
    /// The headline figures.
    pub headline: Vec<Figure>,
    /// Sections left out and why.
    pub omitted: Vec<(String, String)>,
    /// Each delivery's outcome.
    pub deliveries: Vec<DeliveryReport>,
}

/// The extracts to write: the named one, or all declared, or the default executive pack.
pub fn selected(project: &Project, name: Option<&str>) -> Result<Vec<Extract>> {
    let declared = &project.extracts;
    match name {
        None if declared.is_empty() => Ok(vec![Extract::default_pack(&project.name)]),
        None => Ok(declared.clone()),
        Some(n) => match declared.iter().find(|e| e.name == n) {
            Some(e) => Ok(vec![e.clone()]),
            None if n == DEFAULT_EXTRACT && declared.is_empty() => {
                Ok(vec![Extract::default_pack(&project.name)])
            }
            None => Err(Error::Usage(format!(
                "no extract '{n}' in kbcrm.yaml (declared: {}); declare it under `extracts:`",
                if declared.is_empty() {
                    format!("none; `{DEFAULT_EXTRACT}` is the built-in default")
                } else {
                    declared
                        .iter()
                        .map(|e| e.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            ))),
        },
    }
}

/// Write the selected extracts and run their deliveries. A failed delivery is in its report;
/// [`delivery_failures`] turns the reports into the command's error.
pub async fn extract(
    project: &Project,
    name: Option<&str>,
    options: &ExtractOptions,
) -> Result<Vec<ExtractReport>> {
    let wh = Warehouse::open(&project.warehouse)?;
    let mut reports = Vec::new();
    for x in selected(project, name)? {
        let started_at = chrono::Utc::now();
        let result = write_one(project, &x, options).await;
        let mut record = RunRecord::new(
            uuid::Uuid::now_v7().to_string(),
            RunKind::Extract,
            &x.name,
            &options.trigger,
            options.as_of.or(x.as_of),
            started_at,
        );
        match &result {
            Ok(r) => {
                record.as_of = Some(r.as_of);
                record.files = r.files.iter().map(|f| f.display().to_string()).collect();
                for d in &r.deliveries {
                    record.deliveries.push(match &d.error {
                        None => format!("{}: delivered ({} attempts)", d.target, d.attempts),
                        Some(e) => {
                            format!("{}: failed after {} attempts: {e}", d.target, d.attempts)
                        }
                    });
                }
                if r.deliveries.iter().any(|d| d.error.is_some()) {
                    record.status = RunStatus::Failed;
                    record.error = Some("a delivery failed; the files were written".into());
                }
            }
            Err(e) => {
                record.status = RunStatus::Failed;
                record.error = Some(e.to_string());
            }
        }
        wh.record_run(&record).await;
        reports.push(result?);
    }
    Ok(reports)
}

/// The error for deliveries that failed after their attempts, if any did.
pub fn delivery_failures(reports: &[ExtractReport]) -> Result<()> {
    let failed: Vec<String> = reports
        .iter()
        .flat_map(|r| {
            r.deliveries.iter().filter_map(move |d| {
                d.error.as_ref().map(|e| {
                    format!(
                        "extract '{}' to {} ({} attempts): {e}; the files are kept in {}",
                        r.name,
                        d.target,
                        d.attempts,
                        r.dir.display()
                    )
                })
            })
        })
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Error::Delivery(failed.join("; ")))
    }
}

async fn write_one(
    project: &Project,
    x: &Extract,
    options: &ExtractOptions,
) -> Result<ExtractReport> {
    let role = match &x.role {
        Some(r) => project.access.roles.get(r).cloned().ok_or_else(|| {
            Error::Usage(format!("extract '{}': no role '{r}' in kbcrm.yaml", x.name))
        })?,
        None => Role::every_table(false),
    };
    // One partition: sums add up in the same order every time, so the files are identical
    // for the same table versions.
    let mut settings = project.engine.clone();
    settings.target_partitions = Some(1);
    let params = engine::today_params();
    let runtime = engine::runtime(&settings)?;
    let base = engine::session_with_runtime(&settings, &params, runtime.clone())?;
    let wh = Warehouse::open(&project.warehouse)?;
    let versions: BTreeMap<String, u64> = wh.register_snapshots(&base).await?;
    let ctx = engine::session_with_runtime(&settings, &params, runtime)?;
    let role_name = x.role.as_deref().unwrap_or("(none)");
    crate::engine::roles::register_views(&base, &ctx, &versions, role_name, &role, project).await?;
    let run_tests = pack::test_status(&wh, &base, &versions).await?;
    let pack = pack::gather(&ctx, x, options.as_of, &versions, run_tests).await?;

    let dir = options.out.join(&x.name);
    let staging = Staging::new(&options.out, &x.name)?;
    let written = write_files(&pack, x, staging.path()).await;
    let files = match written {
        Ok(f) => f,
        Err(e) => {
            let _ = std::fs::remove_dir_all(staging.path());
            return Err(e);
        }
    };
    replace_dir(staging.path(), &dir)?;
    drop(staging);
    let deliveries = if options.deliver {
        deliver::deliver_all(x, &pack, &dir, &files).await
    } else {
        Vec::new()
    };
    Ok(ExtractReport {
        name: x.name.clone(),
        as_of: pack.as_of,
        role: x.role.clone(),
        dir,
        files,
        headline: pack.headline.clone(),
        omitted: pack.omitted.clone(),
        deliveries,
    })
}

/// The file name stem of an extract's workbook and dashboard.
fn stem(pack: &Pack, x: &Extract) -> String {
    format!("{}-{}", x.name, pack.as_of)
}

/// Write the extract's files into the (new, empty) folder `dir`.
async fn write_files(pack: &Pack, x: &Extract, dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for format in &x.formats {
        match format {
            ExtractFormat::Xlsx => {
                let name = PathBuf::from(format!("{}.xlsx", stem(pack, x)));
                let bytes = xlsx::workbook(pack)?;
                write(&dir.join(&name), &bytes)?;
                files.push(name);
            }
            ExtractFormat::Html => {
                let name = PathBuf::from(format!("{}.html", stem(pack, x)));
                write(&dir.join(&name), html::dashboard(pack, x.top).as_bytes())?;
                files.push(name);
            }
            ExtractFormat::Csv | ExtractFormat::Parquet => {
                let sub = PathBuf::from("tables");
                std::fs::create_dir_all(dir.join(&sub)).map_err(|e| Error::io(dir, e))?;
                for t in &pack.tables {
                    let name = sub.join(format!(
                        "{}.{}",
                        t.name,
                        if *format == ExtractFormat::Csv {
                            "csv"
                        } else {
                            "parquet"
                        }
                    ));
                    let bytes = if *format == ExtractFormat::Csv {
                        tables::csv(t)?
                    } else {
                        tables::parquet(t)?
                    };
                    write(&dir.join(&name), &bytes)?;
                    files.push(name);
                }
            }
        }
    }
    Ok(files)
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

/// A folder where an extract's files are written before they replace the last ones
/// (`.NAME.partial-PID-TOKEN` beside them), locked by the operating system for as long as the
/// writing process lives. Folders of writers that were killed (nobody holds their lock) are
/// removed when the next one starts.
pub(crate) struct Staging {
    path: PathBuf,
    _lock: std::fs::File,
}

impl Staging {
    /// A new staging folder for extract `name` in `parent`, after removing abandoned ones.
    pub(crate) fn new(parent: &Path, name: &str) -> Result<Staging> {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        remove_abandoned(parent, name);
        let token = uuid::Uuid::new_v4().simple().to_string();
        let path = parent.join(format!(
            ".{name}.partial-{}-{}",
            std::process::id(),
            &token[..12]
        ));
        std::fs::create_dir(&path).map_err(|e| Error::io(&path, e))?;
        let lock = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        lock.try_lock().map_err(|e| {
            Error::io(
                &path,
                std::io::Error::other(format!("cannot lock a new folder: {e}")),
            )
        })?;
        Ok(Staging { path, _lock: lock })
    }

    /// The folder.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

/// Remove the staging folders of extract `name` in `parent` that no live process holds, and,
/// when no other writer of it is at work, the earlier versions a killed writer was replacing.
fn remove_abandoned(parent: &Path, name: &str) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    let partial = format!(".{name}.partial-");
    let old = format!(".{name}.old-");
    let mut busy = false;
    let mut olds = Vec::new();
    for e in entries.flatten() {
        let file_name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        if file_name.starts_with(&partial) {
            match std::fs::File::open(&path).map(|f| f.try_lock().map(|()| f)) {
                // Nobody holds it: its writer is gone (or was an older kbcrm, which held no lock).
                Ok(Ok(_held)) => {
                    tracing::info!(folder = %path.display(), "removing an interrupted extract's folder");
                    let _ = std::fs::remove_dir_all(&path);
                }
                Ok(Err(_)) => busy = true,
                Err(_) => {}
            }
        } else if file_name.starts_with(&old) {
            olds.push(path);
        }
    }
    if !busy {
        for path in olds {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

/// Put the finished staging folder where the extract lives, replacing an earlier one.
fn replace_dir(staging: &Path, dir: &Path) -> Result<()> {
    if dir.exists() {
        let old = dir.with_file_name(format!(
            ".{}.old-{}",
            dir.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default(),
            std::process::id()
        ));
        std::fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
        std::fs::rename(staging, dir).map_err(|e| Error::io(dir, e))?;
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    } else {
        std::fs::rename(staging, dir).map_err(|e| Error::io(dir, e))?;
    }
    Ok(())
}
