//! Backfills (`kbcrm run --from --to`): one run per as-of date, in order, resumed by the same
//! command after a failure; re-runs of a recorded run (`kbcrm run --rerun ID`).

use crate::support::{Project, stderr};

const PIPELINE: &str = "\
sources:
  orders:
    format: csv
    location: data/orders.csv
    schema:
      order_id: { type: string, required: true }
      day: { type: date }
models:
  - { path: sql/daily.sql, mode: merge, keys: [as_of] }
";

/// One row per as-of date: the orders up to that day. 2025-01-03 fails while `broken`.
fn daily_sql(broken: bool) -> String {
    format!(
        "select kbcrm_as_of() as as_of, count(*) as orders{} from raw_p_orders \
         where day <= kbcrm_as_of()\n",
        if broken {
            ", sum(case when kbcrm_as_of() = date '2025-01-03' then cast(order_id as int) \
             else 0 end) as boom"
        } else {
            ", sum(0) as boom"
        }
    )
}

fn runs(p: &Project) -> Vec<(String, String, String)> {
    p.query(
        "select cast(as_of as varchar), trigger, status from kbcrm_runs \
         where kind = 'pipeline' order by started_at",
    )
    .into_iter()
    .map(|r| (r[0].clone(), r[1].clone(), r[2].clone()))
    .collect()
}

#[test]
fn backfill_five_dates_resumes_after_a_failure_and_reruns() {
    let p = Project::empty();
    p.write("pipelines/p.yaml", PIPELINE);
    p.write("sql/daily.sql", daily_sql(true));
    p.write(
        "data/orders.csv",
        "order_id,day\nA,2025-01-01\nB,2025-01-02\nC,2025-01-02\nD,2025-01-04\nE,2025-01-05\n",
    );
    let out = p.kbcrm(&["run", "--from", "2025-01-01", "--to", "2025-01-05"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let printed = crate::support::stdout(&out);
    assert!(
        printed.contains("backfill stopped at 2025-01-03 (3 of 5 dates)"),
        "{printed}"
    );
    let r = runs(&p);
    assert_eq!(
        r.iter()
            .map(|x| (x.0.as_str(), x.2.as_str()))
            .collect::<Vec<_>>(),
        [
            ("2025-01-01", "succeeded"),
            ("2025-01-02", "succeeded"),
            ("2025-01-03", "failed")
        ]
    );
    assert!(r.iter().all(|x| x.1 == "backfill"));
    // Fixed, the same command resumes at the failed date.
    p.write("sql/daily.sql", daily_sql(false));
    let printed = p.ok(&["run", "--from", "2025-01-01", "--to", "2025-01-05"]);
    assert!(
        printed.contains("backfill 2025-01-01: already done"),
        "{printed}"
    );
    assert!(
        printed.contains("backfill 2025-01-02: already done"),
        "{printed}"
    );
    let r = runs(&p);
    assert_eq!(r.len(), 6, "{r:?}");
    assert_eq!(
        r[3..].iter().map(|x| x.0.as_str()).collect::<Vec<_>>(),
        ["2025-01-03", "2025-01-04", "2025-01-05"]
    );
    let rows = p.query("select cast(as_of as varchar) as d, orders from daily order by d");
    assert_eq!(
        rows,
        [
            ["2025-01-01", "1"],
            ["2025-01-02", "3"],
            ["2025-01-03", "3"],
            ["2025-01-04", "4"],
            ["2025-01-05", "5"]
        ]
    );
    // A re-run of the failed run repeats its date.
    let failed = p.query("select run_id from kbcrm_runs where status = 'failed'");
    let id = &failed[0][0];
    p.ok(&["run", "--rerun", &id[..20]]);
    let last = p.query(
        "select cast(as_of as varchar), trigger, status from kbcrm_runs order by started_at desc limit 1",
    );
    assert_eq!(last[0][0], "2025-01-03");
    assert_eq!(last[0][1], format!("rerun of {id}"));
    assert_eq!(last[0][2], "succeeded");
    // Weekly steps; dates in the wrong order are a usage error.
    let printed = p.ok(&[
        "run",
        "--from",
        "2025-01-01",
        "--to",
        "2025-01-15",
        "--every",
        "1w",
    ]);
    assert!(printed.contains("(3 of 3 dates)"), "{printed}");
    let out = p.kbcrm(&["run", "--from", "2025-01-05", "--to", "2025-01-01"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("--to 2025-01-01 is before --from 2025-01-05"),
        "{}",
        stderr(&out)
    );
}
