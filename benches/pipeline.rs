//! End-to-end timings: sample-data generation, a full load of the sources into the star schema
//! (pipelines erp, sales, service, star) and then the cubes, and the same for an incremental
//! batch of ten days of change files (about 1% of the rows) loaded by one run.
//!
//! ```sh
//! cargo bench --bench pipeline                  # scale 1 (100,000 customers, ~5M order lines)
//! KBCRM_BENCH_SCALE=0.1 cargo bench --bench pipeline
//! ```
//!
//! Prints one line per phase with seconds and rows per second, and the ratios batch / full for
//! the star schema alone and with the cubes. The loads into the star schema are measured more
//! than once, as the machine's own noise (5-10% from run to run) is as large as the differences
//! looked for: the full load three times, each into an empty warehouse, and the batch five times,
//! each on a copy of the full load's warehouse. Their medians are reported, and every time.
//! `KBCRM_BENCH_RUNS=1` measures each once.

use std::path::Path;
use std::time::Instant;

use kbcrm::generate::{GenerateOptions, generate};
use kbcrm::plan::{Overrides, Project};
use kbcrm::run::{Progress, RunOptions, Runner};

mod support;
use support::{copy_tree, project_dir};

/// The `kbcrm` binary's allocator, so that the timings are those of `kbcrm run`.
#[global_allocator]
static GLOBAL: kbcrm_alloc::MiMalloc = kbcrm_alloc::MiMalloc;

/// The pipelines that load the sources into the star schema; the cubes come after them.
const STAR: [&str; 4] = ["erp", "sales", "service", "star"];

/// The days of change files that make the incremental batch.
const INCREMENTAL_DAYS: std::ops::RangeInclusive<u32> = 2..=11;

/// Full loads and batches measured, unless `KBCRM_BENCH_RUNS` says how many of each.
const FULL_RUNS: usize = 3;
const BATCH_RUNS: usize = 5;

/// The median of some timings, and all of them as text.
fn median(mut secs: Vec<f64>) -> (f64, String) {
    let all: Vec<String> = secs.iter().map(|s| format!("{s:.2}")).collect();
    secs.sort_by(f64::total_cmp);
    (secs[secs.len() / 2], all.join(" "))
}

async fn run_some(dir: &Path, names: &[&str]) -> (f64, u64) {
    let project = Project::load(dir, &Overrides::default()).expect("project loads");
    let runner = Runner::new(&project, RunOptions::default(), Progress::hidden())
        .await
        .expect("runner");
    let started = Instant::now();
    let reports = runner
        .run(&names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
        .await
        .unwrap_or_else(|e| panic!("run failed: {e}"));
    let secs = started.elapsed().as_secs_f64();
    let rows = reports
        .iter()
        .flat_map(|r| r.tables.iter())
        .filter(|t| t.kind == "source")
        .map(|t| t.rows_in)
        .sum();
    (secs, rows)
}

fn line(phase: &str, secs: f64, rows: u64) {
    println!(
        "{phase:<34} {secs:>8.2} s {rows:>12} rows {:>12.0} rows/s",
        rows as f64 / secs.max(1e-9)
    );
}

/// A phase measured several times: its median, then every run.
fn median_line(phase: &str, secs: Vec<f64>, rows: u64) -> f64 {
    let (median, all) = median(secs);
    line(phase, median, rows);
    if all.contains(' ') {
        println!("{:<34} median of {all}", "");
    }
    median
}

fn main() {
    // As `kbcrm run` sets them, before any other thread starts.
    kbcrm_alloc::return_freed_memory_soon();
    kbcrm_alloc::no_transparent_huge_pages();
    // `cargo bench` passes --bench; nothing else is accepted.
    let scale: f64 = std::env::var("KBCRM_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let runs = |default: usize| {
        std::env::var("KBCRM_BENCH_RUNS")
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .unwrap_or(default)
            .max(1)
    };
    let dir = project_dir(&format!("kbcrm-bench-{scale}"));
    let warehouse = dir.join("warehouse");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "kbcrm pipeline benchmark: scale {scale}, {cores} cores, in {}",
        dir.display()
    );

    let started = Instant::now();
    let summary = generate(&GenerateOptions {
        scale,
        seed: 42,
        out: dir.join("sources"),
        batch: 1,
    })
    .expect("generate");
    let generated: u64 = summary.files.iter().map(|f| f.rows).sum();
    line(
        "generate (batch 1)",
        started.elapsed().as_secs_f64(),
        generated,
    );

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (mut fulls, mut rows) = (Vec::new(), 0);
    for _ in 0..runs(FULL_RUNS) {
        let _ = std::fs::remove_dir_all(&warehouse);
        let (secs, loaded) = rt.block_on(run_some(&dir, &STAR));
        fulls.push(secs);
        rows = loaded;
    }
    let star = median_line("full load: sources -> star", fulls, rows);
    let (cubes, _) = rt.block_on(run_some(&dir, &["cubes"]));
    line("full load: cubes", cubes, 0);
    // Each batch starts from this copy of the full load.
    let full_copy = dir.join("warehouse-full");
    copy_tree(&warehouse, &full_copy);

    // The incremental batch: ten days of change files (days 2 to 11), about 1% of the
    // full load's rows, loaded by one run.
    let started = Instant::now();
    let mut generated = 0u64;
    for batch in INCREMENTAL_DAYS {
        let summary = generate(&GenerateOptions {
            scale,
            seed: 42,
            out: dir.join("sources"),
            batch,
        })
        .unwrap_or_else(|e| panic!("generate batch {batch}: {e}"));
        generated += summary.files.iter().map(|f| f.rows).sum::<u64>();
    }
    line(
        "generate (batches 2-11)",
        started.elapsed().as_secs_f64(),
        generated,
    );

    let (mut batches, mut inc_rows) = (Vec::new(), 0);
    for _ in 0..runs(BATCH_RUNS) {
        let _ = std::fs::remove_dir_all(&warehouse);
        copy_tree(&full_copy, &warehouse);
        let (secs, loaded) = rt.block_on(run_some(&dir, &STAR));
        batches.push(secs);
        inc_rows = loaded;
    }
    let inc_star = median_line("1% batch: sources -> star", batches, inc_rows);
    let (inc_cubes, _) = rt.block_on(run_some(&dir, &["cubes"]));
    line("1% batch: cubes", inc_cubes, 0);
    println!(
        "batch rows / full rows         = {:.4}",
        inc_rows as f64 / rows.max(1) as f64
    );
    println!("batch / full, star schema      = {:.3}", inc_star / star);
    println!(
        "batch / full, star and cubes   = {:.3}",
        (inc_star + inc_cubes) / (star + cubes)
    );

    let (noop, rows) = rt.block_on(run_some(&dir, &[]));
    line("run with nothing new", noop, rows);
    let _ = std::fs::remove_dir_all(&dir);
}
