//! The run history: every pipeline run and extract recorded, successful or not, listed by
//! `kbcrm runs`, shown by `kbcrm runs show`, queryable as `kbcrm_runs`.

use crate::support::{Project, stderr, stdout};

const PIPELINE: &str = "\
sources:
  orders:
    format: csv
    location: data/orders.csv
    rejects: { max_ratio: 0.5 }
    schema:
      order_id: { type: string, required: true }
      amount: \"decimal(10,2)\"
models:
  - sql/stg_orders.sql
tests:
  - not_null: { table: stg_orders, columns: [order_id] }
";

#[test]
fn runs_are_recorded_listed_and_shown() {
    let p = Project::empty();
    p.write("pipelines/p.yaml", PIPELINE);
    p.write(
        "sql/stg_orders.sql",
        "select order_id, amount from raw_p_orders\n",
    );
    p.write("data/orders.csv", "order_id,amount\nA,1.50\nB,2.00\nC,x\n");
    p.ok(&["run", "--as-of", "2025-06-30"]);
    // A second run finds nothing new: recorded too, changing no table.
    p.ok(&["run"]);
    let rows = p.query(
        "select kind, name, trigger, cast(as_of as varchar), status, rows_read, rows_written, \
         rows_rejected, tables_changed, tests_passed, tests_failed, error \
         from kbcrm_runs order by started_at",
    );
    assert_eq!(rows.len(), 2, "{rows:?}");
    let first = &rows[0];
    assert_eq!(
        &first[..5],
        ["pipeline", "p", "cli", "2025-06-30", "succeeded"]
    );
    // Three rows read from the file, one rejected, two loaded and two modelled.
    assert_eq!(first[7], "1", "{first:?}");
    assert!(
        first[8].contains("raw_p_orders@0") && first[8].contains("stg_orders@0"),
        "{first:?}"
    );
    assert_eq!(
        (first[9].as_str(), first[10].as_str(), first[11].as_str()),
        ("1", "0", "")
    );
    assert_eq!(rows[1][4], "succeeded");
    assert_eq!(
        rows[1][8], "",
        "the second run changed no table: {:?}",
        rows[1]
    );

    // `kbcrm runs` lists them newest first; `runs show` takes a prefix of the id.
    let listed = p.ok(&["runs", "--format", "csv"]);
    let ids: Vec<&str> = listed
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap())
        .collect();
    assert_eq!(ids.len(), 2);
    let shown = p.ok(&["runs", "show", &ids[1][..18]]);
    assert!(shown.contains(&format!("run {}", ids[1])), "{shown}");
    assert!(
        shown.contains("status: succeeded") && shown.contains("as of: 2025-06-30"),
        "{shown}"
    );
    let stg = shown
        .lines()
        .find(|l| l.trim_start().starts_with("stg_orders"))
        .unwrap_or_else(|| panic!("{shown}"));
    let fields: Vec<&str> = stg.split_whitespace().collect();
    assert_eq!(fields, ["stg_orders", "0", "2", "2", "0", "yes"], "{stg}");
    assert!(shown.contains("data tests: 1 passed, 0 failed"), "{shown}");

    // A failing run changes no table but is recorded with its error.
    p.write(
        "sql/stg_orders.sql",
        "select order_id, amount / 0 as amount, nosuch from raw_p_orders\n",
    );
    p.write("data/orders2.csv", "order_id,amount\nD,3.00\n");
    let before = p.warehouse_files();
    let out = p.kbcrm(&["run"]);
    assert_ne!(out.status.code(), Some(0));
    assert_eq!(before, p.warehouse_files());
    let failed = p.query("select name, status, error from kbcrm_runs where status = 'failed'");
    assert_eq!(
        failed.len(),
        0,
        "a run stopped by validation never started: {failed:?}"
    );

    // A model that fails while it runs (after validation) is a failed run.
    p.write(
        "sql/stg_orders.sql",
        "select order_id, cast(amount as int) / cast(0 as int) as amount from raw_p_orders\n",
    );
    p.write(
        "data/orders.csv",
        "order_id,amount\nA,1.50\nB,2.00\nC,x\nE,4.00\n",
    );
    let out = p.kbcrm(&["run"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}\n{}",
        stdout(&out),
        stderr(&out)
    );
    let failed = p.query(
        "select name, status, error, tables_changed from kbcrm_runs where status = 'failed'",
    );
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0][0], "p");
    assert!(
        failed[0][2].contains("stg_orders") && failed[0][2].contains("zero"),
        "{failed:?}"
    );
    assert_eq!(failed[0][3], "");
    let listed = p.ok(&["runs", "--failed"]);
    assert!(
        listed.contains("failed") && !listed.contains("succeeded"),
        "{listed}"
    );
    let err = p.kbcrm(&["runs", "show", "nosuch"]);
    assert_eq!(err.status.code(), Some(2));
    assert!(stderr(&err).contains("no run 'nosuch'"), "{}", stderr(&err));
}

#[test]
fn the_contract_for_outside_schedulers() {
    let p = Project::empty();
    p.write("pipelines/p.yaml", PIPELINE);
    p.write(
        "sql/stg_orders.sql",
        "select order_id, amount from raw_p_orders\n",
    );
    p.write("data/orders.csv", "order_id,amount\nA,1.50\nB,2.00\n");
    let out = p.kbcrm(&[
        "-v",
        "--log-format",
        "json",
        "run",
        "--output",
        "json",
        "--exit-code-unchanged",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // stdout: one JSON document with the run, its tables, versions and rows.
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    let run = &doc["runs"][0];
    assert_eq!(run["pipeline"], "p");
    assert_eq!(run["changed"], true);
    let stg = run["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == "stg_orders")
        .unwrap();
    assert_eq!(
        (stg["version"].as_u64(), stg["rows_written"].as_u64()),
        (Some(0), Some(2))
    );
    let id = run["run_id"].as_str().unwrap();
    assert_eq!(
        p.query(&format!(
            "select status from kbcrm_runs where run_id = '{id}'"
        ))[0][0],
        "succeeded"
    );
    // stderr: one JSON object per line.
    let log = stderr(&out);
    let events: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        events
            .iter()
            .any(|e| e["fields"]["message"] == "run committed"),
        "{log}"
    );
    // Nothing new: exit code 4 when asked for, 0 otherwise.
    let again = p.kbcrm(&["run", "--exit-code-unchanged"]);
    assert_eq!(again.status.code(), Some(4), "{}", stderr(&again));
    assert!(stderr(&again).contains("nothing to do"));
    assert_eq!(p.kbcrm(&["run"]).status.code(), Some(0));
}
