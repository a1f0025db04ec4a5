//! `kbcrm schedule`: due pipelines run in dependency order, failures are retried and recorded,
//! a run the warehouse lock refuses is skipped, missed times follow the misfire policy,
//! `--once` runs what is due and exits, SIGTERM stops it between runs.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{Project, stderr, stdout};

/// Pipelines `a` (loads a file, builds stg_a) and `b` (reads stg_a), and `flaky`, whose model
/// fails on the data; every one on `schedule`.
fn project(schedule: &str, extra_b: &str) -> Project {
    let p = Project::empty();
    p.write(
        "pipelines/a.yaml",
        format!(
            "schedule: \"{schedule}\"\nsources:\n  x:\n    format: csv\n    location: data/a.csv\n    \
             schema:\n      id: {{ type: string, required: true }}\n      amount: \"decimal(10,2)\"\n\
             models:\n  - sql/stg_a.sql\n"
        ),
    );
    p.write("sql/stg_a.sql", "select id, amount from raw_a_x\n");
    p.write(
        "pipelines/b.yaml",
        format!("schedule: \"{schedule}\"\n{extra_b}models:\n  - sql/b_out.sql\n"),
    );
    p.write(
        "sql/b_out.sql",
        "select count(*) as n, sum(amount) as total from stg_a\n",
    );
    p.write("data/a.csv", "id,amount\nA,1.50\nB,2.00\n");
    p
}

fn with_flaky(p: &Project, schedule: &str) {
    p.write(
        "pipelines/flaky.yaml",
        format!(
            "schedule: \"{schedule}\"\nretries: 1\nretry_delay: 1s\nmodels:\n  - sql/flaky_out.sql\n"
        ),
    );
    p.write(
        "sql/flaky_out.sql",
        "select cast(amount as int) / cast(0 as int) as boom from stg_a\n",
    );
}

/// (name, trigger, status) of every recorded pipeline run, in start order.
fn history(p: &Project) -> Vec<(String, String, String)> {
    p.query(
        "select name, trigger, status from kbcrm_runs where kind = 'pipeline' order by started_at",
    )
    .into_iter()
    .map(|r| (r[0].clone(), r[1].clone(), r[2].clone()))
    .collect()
}

/// A daily cron time three hours ago: missed by a scheduler that never ran, and not due again
/// for a day, whatever time the test runs at.
fn daily_three_hours_ago() -> String {
    use chrono::Timelike;
    let t = chrono::Utc::now() - chrono::Duration::hours(3);
    format!("{} {} * * *", t.minute(), t.hour())
}

#[test]
fn once_runs_what_is_due_in_order_and_then_nothing() {
    let cron = daily_three_hours_ago();
    let p = project(&cron, "misfire: run_once\n");
    p.write(
        "pipelines/c.yaml",
        format!("schedule: \"{cron}\"\nmisfire: skip\nmodels:\n  - sql/c_out.sql\n"),
    );
    p.write("sql/c_out.sql", "select count(*) as n from stg_a\n");
    // The scheduler has never run: 02:00 was missed; a and b catch up once, c skips it.
    let out = p.ok(&["schedule", "--once"]);
    let a = out
        .find("pipeline a committed")
        .unwrap_or_else(|| panic!("{out}"));
    let b = out
        .find("pipeline b committed")
        .unwrap_or_else(|| panic!("{out}"));
    assert!(a < b, "b ran before a:\n{out}");
    assert!(
        out.contains("pipeline:c missed") && out.contains("skipped (misfire: skip)"),
        "{out}"
    );
    assert_eq!(
        history(&p),
        [
            (
                "a".to_string(),
                "schedule".to_string(),
                "succeeded".to_string()
            ),
            ("b".into(), "schedule".into(), "succeeded".into()),
        ]
    );
    assert_eq!(p.scalar("select n from b_out"), 2);
    // Until the next 02:00 nothing is due.
    let again = p.ok(&["schedule", "--once"]);
    assert!(again.contains("nothing is due"), "{again}");
    assert_eq!(history(&p).len(), 2);
}

#[test]
fn a_run_the_warehouse_lock_refuses_is_skipped() {
    let p = project(&daily_three_hours_ago(), "");
    // A run in progress: this test process holds the lock.
    let held = crate::support::hold_run_lock(p.path());
    let out = p.ok(&["schedule", "--once"]);
    assert!(
        out.contains("pipeline a skipped: another run holds the warehouse"),
        "{out}"
    );
    assert!(
        out.contains("pipeline b skipped until its next time: its upstream pipeline a did not run"),
        "{out}"
    );
    assert!(history(&p).is_empty());
    // That 02:00 is done with: the next --once does not run it again.
    drop(held);
    let again = p.ok(&["schedule", "--once"]);
    assert!(again.contains("nothing is due"), "{again}");
}

#[test]
fn every_second_in_order_retried_and_stopped_by_sigterm() {
    let p = project("* * * * * *", "");
    with_flaky(&p, "*/5 * * * * *");
    let mut child = Command::new(env!("CARGO_BIN_EXE_kbcrm"))
        .args(["schedule"])
        .current_dir(p.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let h = history(&p);
        let count = |n: &str, status: &str| h.iter().filter(|r| r.0 == n && r.2 == status).count();
        if count("a", "succeeded") >= 3
            && count("b", "succeeded") >= 3
            && count("flaky", "failed") >= 2
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "the scheduler did not get there: {h:?}"
        );
    }
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the scheduler did not stop after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = child.wait_with_output().unwrap();
    assert!(status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let printed = stdout(&out);
    assert!(
        printed.contains("stopping after the current run")
            && printed.ends_with("kbcrm schedule: stopped\n"),
        "{printed}"
    );

    let h = history(&p);
    // Each b run follows an a run of the same tick.
    for (i, r) in h.iter().enumerate() {
        if r.0 == "b" {
            assert!(h[..i].iter().any(|x| x.0 == "a"), "{h:?}");
        }
    }
    // The flaky pipeline: tried, retried after its delay, both recorded as failed.
    assert!(
        h.iter()
            .any(|r| r.0 == "flaky" && r.1 == "schedule" && r.2 == "failed"),
        "{h:?}"
    );
    assert!(
        h.iter()
            .any(|r| r.0 == "flaky" && r.1 == "schedule retry 1" && r.2 == "failed"),
        "{h:?}"
    );
    assert!(
        printed.contains("pipeline flaky failed (attempt 1 of 2)")
            && printed.contains("retrying in 1s"),
        "{printed}"
    );
    // Stopped between runs: nothing half-committed, the lock released, the tables readable.
    let pending = p.path().join("warehouse/_kbcrm/pending");
    assert!(
        !pending.exists() || std::fs::read_dir(&pending).unwrap().next().is_none(),
        "a run was left half-committed"
    );
    assert!(!p.path().join("warehouse/_kbcrm/run.lock").exists());
    assert_eq!(p.scalar("select n from b_out"), 2);
    p.ok(&["run", "a"]);
}

#[test]
fn bad_schedules_name_the_file_and_line() {
    let p = project("every night", "retry_delay: soon\n");
    p.write("kbcrm.yaml", "name: test\ntimezone: Mars/Olympus\n");
    let out = p.kbcrm(&["validate"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    for needle in [
        "pipelines/a.yaml:1",
        "'every night' is not a cron expression",
        "pipelines/b.yaml:2",
        "retry_delay: 'soon' is not a duration",
        "kbcrm.yaml:2",
        "'Mars/Olympus' is not a time zone",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
    let q = Project::empty();
    let out = q.kbcrm(&["schedule", "--once"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("nothing is scheduled"),
        "{}",
        stderr(&out)
    );
}
