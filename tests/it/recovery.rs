//! A run killed while committing its tables is completed by the next run: every table ends as a
//! never-killed run leaves it.

use crate::support::{Project, stderr};

const PIPELINE: &str = "\
sources:
  orders:
    format: csv
    location: data/
    mode: merge
    keys: [id]
    incremental: { files: new }
    rejects: { max_ratio: 0.5 }
    schema:
      id: { type: int, required: true }
      amount: \"decimal(8,2)\"
models:
  - sql/totals.sql
  - sql/big_orders.sql
";

fn project() -> Project {
    let p = Project::empty();
    p.write("pipelines/p.yaml", PIPELINE);
    p.write(
        "sql/totals.sql",
        "select count(*) as orders, sum(amount) as amount from raw_p_orders\n",
    );
    p.write(
        "sql/big_orders.sql",
        "select id, amount from raw_p_orders where amount > 10\n",
    );
    p.write("data/a.csv", "id,amount\n1,5.00\n2,20.00\n");
    p.ok(&["run"]);
    p.write("data/b.csv", "id,amount\n3,30.00\n4,1.00\n,bad\n");
    p
}

fn contents(p: &Project) -> Vec<Vec<Vec<String>>> {
    contents_with(p, &[])
}

fn contents_with(p: &Project, env: &[(&str, &str)]) -> Vec<Vec<Vec<String>>> {
    [
        "select id, amount from raw_p_orders order by id",
        "select * from totals",
        "select id from big_orders order by id",
        "select regexp_replace(file, '^.*/', '') as f from kbcrm_loaded_files order by f",
        "select line from quarantine order by line",
    ]
    .iter()
    .map(|q| p.query_with_env(q, env))
    .collect()
}

#[test]
fn a_run_killed_between_table_commits_is_completed_by_the_next() {
    let reference = project();
    reference.ok(&["run"]);
    for crash_after in 1..=4 {
        let p = project();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kbcrm"))
            .arg("run")
            .current_dir(p.path())
            .env("KBCRM_CRASH_AFTER_TABLE_COMMITS", crash_after.to_string())
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "the run was meant to die: {}",
            stderr(&out)
        );
        let pending = std::fs::read_dir(p.path().join("warehouse/_kbcrm/pending"))
            .unwrap()
            .count();
        assert_eq!(pending, 1, "the run manifest is left behind");
        // Once, the warehouse folder is moved before the next run: the manifest's tables are
        // found where the warehouse is now.
        let folder = if crash_after == 2 {
            std::fs::rename(p.path().join("warehouse"), p.path().join("moved")).unwrap();
            "moved"
        } else {
            "warehouse"
        };
        let env = [("KBCRM_WAREHOUSE", folder)];
        // The next run completes the interrupted one, then finds nothing new.
        let out = p.ok_with_env(&["run"], &env);
        assert!(out.contains("(no new files)"), "{out}");
        assert_eq!(
            contents_with(&p, &env),
            contents(&reference),
            "after a crash after {crash_after} commits"
        );
        assert_eq!(
            std::fs::read_dir(p.path().join(folder).join("_kbcrm/pending"))
                .unwrap()
                .count(),
            0
        );
    }
}

#[test]
fn a_second_run_is_refused_while_one_holds_the_warehouse_and_a_dead_holder_is_taken_over() {
    let p = project();
    p.ok(&["run"]);
    let rows_before = p.scalar("select count(*) from raw_p_orders");
    let before = p.warehouse_files();
    // A run in progress: this test process holds the lock.
    let lock = p.path().join("warehouse/_kbcrm/run.lock");
    let held = crate::support::hold_run_lock(p.path());
    let holder = std::fs::read_to_string(&lock).unwrap();
    p.write("data/c.csv", "id,amount\n9,90.00\n");
    let out = p.kbcrm(&["run"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("another kbcrm run (process"),
        "{}",
        stderr(&out)
    );
    let after: Vec<_> = p
        .warehouse_files()
        .into_iter()
        .filter(|(f, _)| f != "_kbcrm/run.lock")
        .collect();
    assert_eq!(after, before, "a refused run wrote something");
    assert!(lock.exists(), "the holder's lock was removed");
    // The holder died: its lock is gone with it, though the file still names it (and this
    // test process, whose number it names, lives on): the next run takes over and releases it.
    drop(held);
    assert_eq!(std::fs::read_to_string(&lock).unwrap(), holder);
    p.ok(&["run"]);
    assert_eq!(
        p.scalar("select count(*) from raw_p_orders"),
        rows_before + 1
    );
    assert!(!lock.exists(), "the lock outlived the run");
}
