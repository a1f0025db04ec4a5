//! End-to-end timings: sample-data generation, a full load of every pipeline into the star
//! schema, and the day-2 incremental batch.
//!
//! ```sh
//! cargo bench --bench pipeline                  # scale 1 (100,000 customers, ~5M order lines)
//! KBCRM_BENCH_SCALE=0.1 cargo bench --bench pipeline
//! ```
//!
//! Prints one line per phase with seconds and rows per second.

use std::path::{Path, PathBuf};
use std::time::Instant;

use kbcrm::generate::{GenerateOptions, generate};
use kbcrm::plan::{Overrides, Project};
use kbcrm::run::{Progress, RunOptions, Runner};

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            copy_tree(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).expect("copy");
        }
    }
}

fn project_dir(scale: f64) -> PathBuf {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::temp_dir().join(format!("kbcrm-bench-{scale}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    copy_tree(&repo.join("pipelines"), &dir.join("pipelines"));
    copy_tree(&repo.join("sql"), &dir.join("sql"));
    std::fs::copy(repo.join("kbcrm.yaml"), dir.join("kbcrm.yaml")).expect("copy kbcrm.yaml");
    dir
}

async fn run_all(dir: &Path) -> (f64, u64) {
    let project = Project::load(dir, &Overrides::default()).expect("project loads");
    let runner = Runner::new(&project, RunOptions::default(), Progress::hidden())
        .await
        .expect("runner");
    let started = Instant::now();
    let reports = runner
        .run(&[])
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

fn main() {
    // `cargo bench` passes --bench; nothing else is accepted.
    let scale: f64 = std::env::var("KBCRM_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let dir = project_dir(scale);
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
    let (secs, rows) = rt.block_on(run_all(&dir));
    line("full load: sources -> star", secs, rows);

    let started = Instant::now();
    let summary = generate(&GenerateOptions {
        scale,
        seed: 42,
        out: dir.join("sources"),
        batch: 2,
    })
    .expect("generate batch 2");
    let generated: u64 = summary.files.iter().map(|f| f.rows).sum();
    line(
        "generate (batch 2)",
        started.elapsed().as_secs_f64(),
        generated,
    );

    let (inc_secs, rows) = rt.block_on(run_all(&dir));
    line("incremental day-2 batch", inc_secs, rows);
    println!("incremental / full = {:.3}", inc_secs / secs);

    let (noop, rows) = rt.block_on(run_all(&dir));
    line("run with nothing new", noop, rows);
    let _ = std::fs::remove_dir_all(&dir);
}
