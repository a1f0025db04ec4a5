//! Warehouse upkeep: `kbcrm tables --files` shows the files no current version references,
//! and `kbcrm vacuum` removes those no retained version needs (files replaced by merges, files
//! of a run killed before it committed) without changing a row, while incremental models can
//! still read the versions they last read. A run into a full disk says so and commits nothing.

use std::path::{Path, PathBuf};

use crate::support::{Project, run_in, stderr};

/// Every run of these tests is as of one date.
const AS_OF: &str = "2026-01-15";

/// What the tables hold, as numbers an analyst would check.
const CHECKS: &[&str] = &[
    "select count(*), sum(net_amount), sum(margin_amount) from fact_sales",
    "select count(*), sum(paid_amount) from fact_invoice",
    "select count(*), count(distinct customer_id) from dim_customer",
    "select count(*) from map_customer_identity",
    "select count(*), sum(amount) from fact_payment",
];

fn contents(p: &Project) -> Vec<Vec<Vec<String>>> {
    CHECKS.iter().map(|q| p.query(q)).collect()
}

/// Every file under `dir`, but kbcrm's own records (`_kbcrm/`: run history, locks).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let path = e.path();
            if path.ends_with("_kbcrm") {
                continue;
            } else if path.is_dir() {
                todo.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// The number before `word` in the last line of `out`, e.g. "removed 12 files".
fn count_before(out: &str, word: &str) -> usize {
    let last = out.lines().last().unwrap_or_default();
    let words: Vec<&str> = last.split_whitespace().collect();
    let at = words
        .iter()
        .position(|w| *w == word)
        .unwrap_or_else(|| panic!("no '{word}' in {last:?}"));
    words[at - 1].parse().unwrap_or_else(|_| panic!("{last:?}"))
}

/// The row of `table` in `kbcrm tables --files`: files, unreferenced files.
fn table_files(p: &Project, table: &str) -> (usize, usize) {
    let out = p.ok(&["tables", "--files"]);
    let line = out
        .lines()
        .find(|l| l.split_whitespace().next() == Some(table))
        .unwrap_or_else(|| panic!("no {table} in\n{out}"));
    let cells: Vec<&str> = line.split_whitespace().collect();
    // table, files, size (number and unit), unreferenced, unreferenced size
    (cells[1].parse().unwrap(), cells[4].parse().unwrap())
}

/// The sources of day `batch` generated (seed 7).
fn generate(p: &Project, batch: &str) {
    generate_seeded(p, 7, batch);
}

fn generate_seeded(p: &Project, seed: u64, batch: &str) {
    let seed = seed.to_string();
    let out = run_in(
        p.path(),
        &[
            "generate", "--scale", "0.01", "--seed", &seed, "--out", "sources", "--batch", batch,
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn vacuum_removes_what_no_retained_version_needs_and_no_row() {
    let p = Project::demo_with_own_data(0.01, 7);
    p.ok(&["run", "--as-of", AS_OF]);
    // A second day merges into the facts and dimensions: the files it replaced stay behind.
    generate(&p, "2");
    p.ok(&["run", "--as-of", AS_OF]);
    // A run killed before it committed left a data file no version references.
    let warehouse = p.path().join("warehouse");
    let data = files_under(&warehouse.join("fact_sales"))
        .into_iter()
        .find(|f| f.extension().is_some_and(|e| e == "parquet"))
        .expect("a data file of fact_sales");
    let orphan = warehouse.join("fact_sales/part-00000-killed-run.zstd.parquet");
    std::fs::copy(&data, &orphan).unwrap();

    let before = contents(&p);
    let all = files_under(&warehouse);
    let (live, unreferenced) = table_files(&p, "fact_sales");
    assert!(live > 0 && unreferenced >= 1, "{live} {unreferenced}");

    // Within the default retention (7 days) every file stays.
    let out = p.ok(&["vacuum"]);
    assert_eq!(count_before(&out, "files"), 0, "{out}");
    assert_eq!(files_under(&warehouse), all);

    // A dry run says what would go and removes nothing.
    let dry = p.ok(&["vacuum", "--retain", "0", "--dry-run"]);
    let would = count_before(&dry, "files");
    assert!(would > 1, "{dry}");
    assert_eq!(files_under(&warehouse), all);

    let out = p.ok(&["vacuum", "--retain", "0"]);
    assert_eq!(count_before(&out, "files"), would, "{out}");
    assert!(!orphan.exists(), "the killed run's file is still there");
    assert_eq!(files_under(&warehouse).len(), all.len() - would);
    assert_eq!(contents(&p), before, "vacuum changed the rows");
    assert_eq!(
        table_files(&p, "fact_sales").0,
        live,
        "files of the current version"
    );
    let runs = p.ok(&["runs"]);
    assert!(runs.contains("vacuum"), "{runs}");

    // The sources of a third day are loaded, the star not rebuilt yet: its incremental models
    // and identity resolution will compare the staging tables with the versions they last
    // read, which the load replaced. Vacuumed in between, those versions keep their files.
    generate(&p, "3");
    p.ok(&["run", "erp", "sales", "service", "--as-of", AS_OF]);
    let out = p.ok(&["vacuum", "--retain", "0"]);
    assert!(count_before(&out, "files") > 0, "{out}");
    p.ok(&["run", "--as-of", AS_OF]);
    let incremental = contents(&p);
    assert_ne!(incremental, before, "day 3 changed nothing");
    p.ok(&["run", "--as-of", AS_OF, "--full-refresh"]);
    assert_eq!(contents(&p), incremental);
}

#[test]
fn vacuum_names_an_unknown_table_and_reports_each_one() {
    let p = Project::demo_with_own_data(0.01, 8);
    p.ok(&["run", "--as-of", AS_OF]);
    p.fails_cleanly(
        &["vacuum", "fact_nothing"],
        &[],
        &["no table 'fact_nothing'"],
        &[],
    );
    let out = p.ok(&["vacuum", "fact_sales", "dim_customer", "--dry-run"]);
    let tables: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(tables, ["dim_customer", "fact_sales", "would"], "{out}");
}

/// A tmpfs of `mib` MiB mounted for the test's life (it needs root, as `.ci/run` has).
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(mib: u32) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            crate::support::may_skip("mounting a small tmpfs (root, `mount`)");
            return None;
        }
        Some(SmallDisk { dir })
    }

    /// Fill the disk but for `keep` bytes.
    fn fill(&self, keep: u64) -> PathBuf {
        let ballast = self.dir.path().join("ballast");
        let out = std::process::Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(self.dir.path())
            .output()
            .unwrap();
        let free: u64 = String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .expect("free bytes from df");
        let file = std::fs::File::create(&ballast).unwrap();
        file.set_len(0).unwrap();
        std::io::Write::write_all(
            &mut std::io::BufWriter::new(file),
            &vec![0u8; free.saturating_sub(keep) as usize],
        )
        .unwrap();
        ballast
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[test]
fn a_run_into_a_full_disk_says_so_and_commits_nothing() {
    let Some(disk) = SmallDisk::mount(96) else {
        return;
    };
    let warehouse = disk.dir.path().join("warehouse");
    let env = [("KBCRM_WAREHOUSE", warehouse.to_str().unwrap())];
    let p = Project::demo_with_own_data(0.01, 9);
    p.ok_with_env(&["run", "--as-of", AS_OF], &env);
    let tables = p.ok_with_env(&["tables"], &env);
    generate_seeded(&p, 9, "2");
    // Room for less than the batch's first data files: the run fails while it builds.
    let ballast = disk.fill(4 << 10);
    let out = p.kbcrm_with_env(&["run", "--as-of", AS_OF], &env);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    for want in [
        "the disk is full",
        "MiB free there",
        warehouse.to_str().unwrap(),
        "Nothing was committed",
    ] {
        assert!(err.contains(want), "'{want}' not in:\n{err}");
    }
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(p.ok_with_env(&["tables"], &env), tables, "a table changed");
    // Space freed, the same run goes through.
    std::fs::remove_file(ballast).unwrap();
    p.ok_with_env(&["run", "--as-of", AS_OF], &env);
    assert_ne!(p.ok_with_env(&["tables"], &env), tables);
}

/// Files no current version references, over all tables (`kbcrm tables --files`).
fn unreferenced_total(p: &Project) -> usize {
    p.ok(&["tables", "--files"])
        .lines()
        .find(|l| l.contains("are referenced by no current version"))
        .map_or(0, |l| l.split_whitespace().next().unwrap().parse().unwrap())
}

#[test]
fn the_scheduler_vacuums_on_the_maintenance_schedule() {
    let p = Project::demo_with_own_data(0.01, 10);
    p.ok(&["run", "--as-of", AS_OF]);
    generate_seeded(&p, 10, "2");
    p.ok(&["run", "--as-of", AS_OF]);
    let before = contents(&p);
    assert!(unreferenced_total(&p) > 0, "the merges replaced no file");
    let yaml = std::fs::read_to_string(p.path().join("kbcrm.yaml")).unwrap();
    p.write(
        "kbcrm.yaml",
        format!("{yaml}\nmaintenance:\n  vacuum:\n    schedule: \"every day\"\n"),
    );
    p.fails_cleanly(
        &["validate"],
        &[],
        &["maintenance.vacuum.schedule", "cron"],
        &[],
    );
    p.write(
        "kbcrm.yaml",
        format!(
            "{yaml}\nmaintenance:\n  vacuum:\n    schedule: \"* * * * *\"\n    retain: \"0\"\n"
        ),
    );
    let out = p.ok(&["schedule", "--once"]);
    assert!(out.contains("maintenance:vacuum"), "{out}");
    assert!(out.contains("vacuum removed"), "{out}");
    // After a whole run every version models read is the current one: nothing is kept.
    assert_eq!(unreferenced_total(&p), 0);
    assert_eq!(contents(&p), before);
    let runs = p.ok(&["runs"]);
    let line = runs
        .lines()
        .find(|l| l.contains("vacuum"))
        .unwrap_or_else(|| panic!("no vacuum in\n{runs}"));
    assert!(line.contains("schedule"), "{line}");
}
