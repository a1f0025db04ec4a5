//! `kbcrm generate`: realistic, deterministic ERP, sales and service source files.
//!
//! The same customer appears under different ids and spellings in each system; attributes change
//! over time; about 0.1% of transactional rows are malformed; some rows arrive late; a loyal core
//! buys steadily and planted churners buy less and complain more before they stop. The ground
//! truth (who is who, who churned when, which rows are malformed) goes to `truth/` beside the
//! sources so tests can score against it.
//!
//! A face: may import `run` and everything below it; `cli` calls it.

mod emit;
mod names;
pub mod postgres;
mod sink;
pub(crate) mod world;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use crate::error::{Error, Result};
use sink::{FileCount, Malformed};
use world::Catalog;

/// Customers per part file.
pub const CUSTOMERS_PER_PART: usize = 20_000;

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// 1 = about 100,000 customers and 5 million order lines.
    pub scale: f64,
    /// Random seed.
    pub seed: u64,
    /// Output folder for the sources; the truth goes to `<out>/../truth` when `out` is named
    /// `sources`, else `<out>/truth`.
    pub out: PathBuf,
    /// Batch: 1 writes the history up to 2025-12-31; batch N (2..=31) writes the files of day N-1
    /// after it (new and late rows, changed customers).
    pub batch: u32,
}

/// What was generated.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Customers simulated.
    pub customers: usize,
    /// Rows per file.
    pub files: Vec<FileCount>,
    /// Malformed rows planted.
    pub malformed: usize,
    /// Seconds taken.
    pub seconds: f64,
    /// Where the sources went.
    pub out: PathBuf,
    /// Where the truth went.
    pub truth: PathBuf,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rows: u64 = self.files.iter().map(|c| c.rows).sum();
        writeln!(
            f,
            "generated {} customers: {rows} rows in {} files ({} malformed) in {:.1}s",
            self.customers,
            self.files.len(),
            self.malformed,
            self.seconds
        )?;
        let mut per_dir: Vec<(String, u64)> = Vec::new();
        for c in &self.files {
            let dir = c
                .file
                .rsplit_once('/')
                .map_or(c.file.as_str(), |(d, _)| d)
                .to_string();
            match per_dir.iter_mut().find(|(d, _)| *d == dir) {
                Some((_, n)) => *n += c.rows,
                None => per_dir.push((dir, c.rows)),
            }
        }
        for (dir, n) in per_dir {
            writeln!(f, "  {dir:<28} {n:>10} rows")?;
        }
        write!(
            f,
            "sources in {}, ground truth in {}",
            self.out.display(),
            self.truth.display()
        )
    }
}

/// The last day of the generated history (batch 1).
pub fn history_end() -> chrono::NaiveDate {
    world::end()
}

/// Number of customers at a scale.
pub fn customers_at(scale: f64) -> usize {
    ((100_000.0 * scale).round() as usize).max(50)
}

/// The truth folder for an output folder.
pub fn truth_dir(out: &Path) -> PathBuf {
    if out.file_name().is_some_and(|n| n == "sources") {
        out.parent().unwrap_or(Path::new(".")).join("truth")
    } else {
        out.join("truth")
    }
}

/// Generate the files.
pub fn generate(opts: &GenerateOptions) -> Result<Summary> {
    let started = Instant::now();
    if !(opts.scale > 0.0 && opts.scale <= 1000.0) {
        return Err(Error::Usage(format!(
            "--scale {} is out of range; use a number above 0 (1 = 100,000 customers)",
            opts.scale
        )));
    }
    if opts.batch == 0 || i64::from(opts.batch) > world::HORIZON_DAYS + 1 {
        return Err(Error::Usage(format!(
            "--batch {} is out of range; use 1 (the history) to {}",
            opts.batch,
            world::HORIZON_DAYS + 1
        )));
    }
    let n = customers_at(opts.scale);
    let catalog = Catalog::new(opts.scale, opts.seed);
    let truth = truth_dir(&opts.out);
    std::fs::create_dir_all(&opts.out).map_err(|e| Error::io(&opts.out, e))?;
    std::fs::create_dir_all(&truth).map_err(|e| Error::io(&truth, e))?;
    let mut files = emit::catalog_files(&opts.out, &catalog, opts.seed, opts.batch)?;
    let parts = n.div_ceil(CUSTOMERS_PER_PART);
    let results: Mutex<Vec<(usize, Result<emit::PartOutput>)>> = Mutex::new(Vec::new());
    let next = AtomicUsize::new(0);
    let workers = crate::run::default_parallelism().min(parts).max(1);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                loop {
                    let part = next.fetch_add(1, Ordering::Relaxed);
                    if part >= parts {
                        break;
                    }
                    let lo = part * CUSTOMERS_PER_PART;
                    let hi = ((part + 1) * CUSTOMERS_PER_PART).min(n);
                    let out = emit::part(&opts.out, &catalog, opts.seed, opts.batch, part, lo..hi);
                    results
                        .lock()
                        .expect("no panics while holding the lock")
                        .push((part, out));
                }
            });
        }
    });
    let mut results = results.into_inner().expect("threads joined");
    results.sort_by_key(|(p, _)| *p);
    let mut malformed: Vec<Malformed> = Vec::new();
    let mut identity = Vec::new();
    let mut truth_rows = Vec::new();
    let mut changes = Vec::new();
    for (_, r) in results {
        let r = r?;
        files.extend(r.files);
        malformed.extend(r.malformed);
        identity.extend(r.identity);
        truth_rows.extend(r.truth);
        changes.extend(r.changes);
    }
    emit::truth_files(
        &truth,
        opts.batch,
        &files,
        &malformed,
        &identity,
        &truth_rows,
        &changes,
    )?;
    Ok(Summary {
        customers: n,
        malformed: malformed.len(),
        files,
        seconds: started.elapsed().as_secs_f64(),
        out: opts.out.clone(),
        truth,
    })
}
