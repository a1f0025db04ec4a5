//! The demo project end to end on generated data, checked against the generator's ground truth.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::support::{Project, stderr, truth_csv};

/// Source folder in the generator output -> table it loads into.
const TEXT_SOURCES: &[(&str, &str)] = &[
    ("erp/customers/", "raw_erp_customers"),
    ("erp/invoices/", "raw_erp_invoices"),
    ("erp/payments/", "raw_erp_payments"),
    ("sales/contacts/", "raw_sales_contacts"),
    ("sales/orders/", "raw_sales_orders"),
    ("sales/order_lines/", "raw_sales_order_lines"),
    ("sales/campaign_touches/", "raw_sales_campaign_touches"),
    ("service/customers/", "raw_service_customers"),
    ("service/tickets/", "raw_service_tickets"),
    ("service/feedback/", "raw_service_feedback"),
];

fn demo_run() -> Project {
    let p = Project::demo();
    p.ok(&["run"]);
    p
}

#[test]
fn loaded_rows_are_generated_rows_minus_malformed() {
    let p = demo_run();
    let files = truth_csv("files_0001.csv");
    let mut total_malformed = 0;
    for (prefix, table) in TEXT_SOURCES {
        let (rows, bad) = files.iter().filter(|f| f["file"].starts_with(prefix)).fold(
            (0i64, 0i64),
            |(r, b), f| {
                (
                    r + f["rows"].parse::<i64>().unwrap(),
                    b + f["malformed"].parse::<i64>().unwrap(),
                )
            },
        );
        assert!(rows > 0, "no generated rows for {prefix}");
        total_malformed += bad;
        let loaded = p.scalar(&format!("select count(*) from {table}"));
        assert_eq!(
            loaded,
            rows - bad,
            "{table}: generated {rows}, malformed {bad}"
        );
        let quarantined = p.scalar(&format!(
            "select count(*) from quarantine where file like '%/{prefix}%'"
        ));
        assert_eq!(quarantined, bad, "{table}: quarantined rows");
    }
    assert!(
        total_malformed > 0,
        "the generator planted no malformed rows"
    );
    // Staging models keep every loaded row.
    assert_eq!(
        p.scalar("select count(*) from stg_sales_order_lines"),
        p.scalar("select count(*) from raw_sales_order_lines")
    );
}

#[test]
fn quarantine_names_file_line_and_reason_of_every_planted_row() {
    let p = demo_run();
    let planted: HashSet<(String, i64)> = truth_csv("malformed_0001.csv")
        .into_iter()
        .map(|m| (m["file"].clone(), m["line"].parse().unwrap()))
        .collect();
    let rows = p.query("select file, line, reason, raw from quarantine");
    let found: HashSet<(String, i64)> = rows
        .iter()
        .map(|r| {
            let file = r[0]
                .split("/sources/")
                .nth(1)
                .expect("file under sources/")
                .to_string();
            (file, r[1].parse().unwrap())
        })
        .collect();
    assert_eq!(found, planted);
    for r in &rows {
        assert!(
            !r[2].is_empty() && !r[3].is_empty(),
            "reject without reason or raw text: {r:?}"
        );
    }
    let kinds: BTreeMap<String, usize> =
        truth_csv("malformed_0001.csv")
            .iter()
            .fold(BTreeMap::new(), |mut m, r| {
                *m.entry(r["kind"].clone()).or_default() += 1;
                m
            });
    assert!(kinds.len() >= 4, "planted kinds: {kinds:?}");
    // Each planted kind is rejected for its own reason.
    let reason_of: HashMap<(String, i64), String> = rows
        .iter()
        .map(|r| {
            let file = r[0].split("/sources/").nth(1).unwrap().to_string();
            ((file, r[1].parse().unwrap()), r[2].clone())
        })
        .collect();
    for m in truth_csv("malformed_0001.csv") {
        let reason = &reason_of[&(m["file"].clone(), m["line"].parse().unwrap())];
        let expected = match m["kind"].as_str() {
            "missing_id" => "missing required value",
            "bad_number" => "'12,5x' is not a valid",
            "bad_date" => "'2024-13-45' is not a valid",
            "wrong_field_count" => "fields, found",
            "truncated_json" => "invalid JSON",
            other => panic!("unknown planted kind {other}"),
        };
        assert!(reason.contains(expected), "{m:?}: {reason}");
    }
}

#[test]
fn second_run_on_unchanged_sources_commits_nothing() {
    // Both runs are as of one date: a second run after midnight recomputes the cubes that read
    // `kbcrm_as_of()`, as it should.
    const AS_OF: &str = "2026-01-15";
    let p = Project::demo();
    p.ok(&["run", "--as-of", AS_OF]);
    let counts = |p: &Project| -> Vec<Vec<String>> {
        [
            "raw_sales_orders",
            "stg_sales_order_lines",
            "raw_erp_customers",
            "quarantine",
            "stg_service_tickets",
        ]
        .iter()
        .flat_map(|t| p.query(&format!("select '{t}', count(*) from {t}")))
        .collect()
    };
    let before_counts = counts(&p);
    let before = p.ok(&["tables"]);
    let out = p.ok(&["run", "--as-of", AS_OF]);
    assert!(out.contains("(unchanged)"), "{out}");
    assert_eq!(before, p.ok(&["tables"]), "table versions changed");
    assert_eq!(before_counts, counts(&p));
}

#[test]
fn merge_updates_changed_rows_and_inserts_new_ones() {
    let p = Project::empty();
    p.write(
        "pipelines/p.yaml",
        "sources:\n  c:\n    format: csv\n    location: data/\n    mode: merge\n    keys: [id]\n    schema:\n      id: { type: int, required: true }\n      name: string\n",
    );
    p.write("data/a.csv", "id,name\n1,anna\n2,ben\n3,carl\n");
    p.ok(&["run"]);
    p.write(
        "data/a.csv",
        "id,name\n1,anna\n2,benjamin\n3,carl\n4,dora\n",
    );
    let out = p.ok(&["run"]);
    assert!(
        out.contains("raw_p_c") && out.contains(" 2 written"),
        "two rows new or changed: {out}"
    );
    assert_eq!(
        p.query("select id, name from raw_p_c order by id"),
        vec![
            vec!["1", "anna"],
            vec!["2", "benjamin"],
            vec!["3", "carl"],
            vec!["4", "dora"]
        ]
        .into_iter()
        .map(|r| r.into_iter().map(String::from).collect::<Vec<_>>())
        .collect::<Vec<_>>()
    );
    // A key that two files repeat keeps the row of the file last in name order, as if each
    // file had been loaded by a run of its own.
    p.write("data/b.csv", "id,name\n4,dorothea\n5,emil\n");
    p.ok(&["run"]);
    assert_eq!(
        p.query("select id, name from raw_p_c where id >= 4 order by id"),
        vec![vec!["4", "dorothea"], vec!["5", "emil"]]
            .into_iter()
            .map(|r| r.into_iter().map(String::from).collect::<Vec<_>>())
            .collect::<Vec<_>>()
    );
    // A key twice in one file is refused with the offending key: which row holds is unknown.
    p.write("data/c.csv", "id,name\n6,fritz\n6,frida\n");
    p.fails_cleanly_with(
        3,
        &["run"],
        &[],
        &[
            "needs unique keys (id), but one file repeats some",
            "in pipeline 'p'",
            "| 6 ",
        ],
        &[],
    );
}

#[test]
fn failing_model_leaves_every_table_at_its_version() {
    let p = demo_run();
    let before = p.warehouse_files();
    // Plans fine, fails on the data: a cast that cannot succeed (in a model rebuilt whole).
    p.write(
        "sql/staging/stg_sales_campaigns.sql",
        "select campaign_id, name as campaign_name, channel, sent_on, \
         cast(concat('x', channel) as int) as broken from raw_sales_campaigns\n",
    );
    let out = p.kbcrm(&["run", "sales"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("model 'stg_sales_campaigns'"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        before,
        p.warehouse_files(),
        "a failed run left files or commits behind"
    );
}

#[test]
fn a_failing_pipeline_stops_the_pipelines_after_it_that_build_beside_it() {
    let p = demo_run();
    let runs_before = p.scalar("select count(*) from kbcrm_runs");
    // erp (first in the order) fails on its data; sales, which reads nothing of erp's,
    // builds beside it and has a change to commit.
    p.write(
        "sql/staging/stg_erp_employees.sql",
        "select employee_id, full_name, role, region, email, hire_date, \
         cast(concat('x', role) as int) as broken from raw_erp_employees\n",
    );
    p.write(
        "sql/staging/stg_sales_channels.sql",
        "select channel_id, name as channel_name, channel_type, upper(channel_type) as code from raw_sales_channels\n",
    );
    let before = p.warehouse_files();
    let out = p.kbcrm(&["run", "--threads", "2"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("model 'stg_erp_employees'"),
        "{}",
        stderr(&out)
    );
    // As one after another: nothing after the failed pipeline is committed or left behind,
    // and the run history holds the failed run alone.
    assert_eq!(
        before,
        p.warehouse_files(),
        "a run stopped by another's failure left files or commits behind"
    );
    let added = p.query(&format!(
        "select name, status from kbcrm_runs order by started_at offset {runs_before}"
    ));
    assert_eq!(added, vec![vec!["erp".to_string(), "failed".to_string()]]);
}

#[test]
fn failing_data_test_exits_3_and_commits_nothing() {
    let p = demo_run();
    let pipeline = std::fs::read_to_string(p.path().join("pipelines/sales.yaml")).unwrap();
    p.write(
        "pipelines/sales.yaml",
        format!("{pipeline}  - unique: {{ table: stg_sales_orders, columns: [status] }}\n"),
    );
    // A changed model, so that the run would commit something if its tests passed.
    p.write(
        "sql/staging/stg_sales_channels.sql",
        "select channel_id, name as channel_name, channel_type, upper(channel_type) as code from raw_sales_channels\n",
    );
    let before = p.warehouse_files();
    let out = p.kbcrm(&["run", "sales"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("unique(stg_sales_orders: status)"),
        "{}",
        stderr(&out)
    );
    assert_eq!(before, p.warehouse_files());
}

#[test]
fn too_many_rejects_exit_3() {
    let p = Project::demo();
    let pipeline = std::fs::read_to_string(p.path().join("pipelines/sales.yaml")).unwrap();
    p.write(
        "pipelines/sales.yaml",
        pipeline.replace("max_ratio: 0.01", "max_ratio: 0.0"),
    );
    let out = p.kbcrm(&["run", "sales"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("more than rejects.max_ratio 0"),
        "{}",
        stderr(&out)
    );
    assert!(
        p.warehouse_files()
            .iter()
            .all(|(f, _)| !f.starts_with("raw_sales")),
        "{:?}",
        p.warehouse_files()
    );
}

#[test]
fn query_formats_and_tables_listing() {
    let p = demo_run();
    let json = p.ok(&[
        "query",
        "--format",
        "json",
        "select channel_id, channel_name from stg_sales_channels order by 1 limit 2",
    ]);
    let rows: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows[0]["channel_id"], "CH01");
    assert_eq!(rows.len(), 2);
    let table = p.ok(&["query", "select count(*) as n from stg_sales_channels"]);
    assert!(
        table.contains("| n |") && table.contains("| 6 |"),
        "{table}"
    );
    // SQL pasted from a file often starts with a comment.
    let commented = p.ok(&[
        "query",
        "-f",
        "csv",
        "-- channels\nselect count(*) as n from stg_sales_channels",
    ]);
    assert_eq!(commented.trim(), "n\n6", "{commented}");
    let tables = p.ok(&["tables"]);
    assert!(
        tables.lines().any(|l| l.starts_with("stg_sales_orders")),
        "{tables}"
    );
    let out = p.kbcrm(&["query", "drop table stg_sales_orders"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(p.scalar("select count(*) from stg_sales_channels"), 6);
}

#[test]
fn demo_generates_runs_and_answers_its_examples() {
    let p = Project::empty();
    for dir in ["pipelines", "sql"] {
        std::fs::remove_dir_all(p.path().join(dir)).unwrap();
    }
    let repo = crate::support::repo();
    let status = std::process::Command::new("cp")
        .args(["-r", "pipelines", "sql", "kbcrm.yaml"])
        .arg(p.path())
        .current_dir(&repo)
        .status()
        .unwrap();
    assert!(status.success());
    let out = p.ok(&["demo", "--scale", "0.01"]);
    for (title, _) in kbcrm::cli::demo::EXAMPLES {
        assert!(out.contains(title), "missing example {title}:\n{out}");
    }
    assert!(out.contains("demo finished in"), "{out}");
    // The executive pack, compared with the quarter before.
    assert!(
        out.contains("extract 'executive' as of 2025-12-31"),
        "{out}"
    );
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with("Revenue at risk"))
        .unwrap_or_else(|| panic!("no revenue at risk figure:\n{out}"));
    assert!(
        line.contains("%)"),
        "no change against the quarter before: {line}"
    );
    for file in [
        "executive-2025-12-31.xlsx",
        "executive-2025-12-31.html",
        "tables/churn_warnings.csv",
    ] {
        assert!(
            p.path().join("extracts/executive").join(file).is_file(),
            "{file}"
        );
    }
    assert!(p.path().join("sources/sales/orders").is_dir());
    // A second demo reuses the data and commits nothing new.
    let before = p.ok(&["tables"]);
    p.ok(&["demo", "--scale", "0.01"]);
    assert_eq!(before, p.ok(&["tables"]));
}

/// A 24 MiB engine. Sorts keep 1 MiB back for merging their spills (10 MiB by default) and
/// merge a batch of each spill file at once: small batches, so that a sort-merge join can fit.
const TIGHT_MEMORY: &str = "name: test\nengine:\n  memory_limit: 24MiB\ndatafusion:\n  datafusion.execution.sort_spill_reservation_bytes: 1048576\n  datafusion.execution.batch_size: 1024\n";

/// A join whose hash table does not fit the memory limit (DataFusion's hash joins cannot spill)
/// is built again with sort-merge joins, which spill, instead of failing the run.
#[test]
fn a_join_bigger_than_the_memory_limit_is_built_with_sort_merge_joins() {
    let p = Project::empty();
    p.write("kbcrm.yaml", TIGHT_MEMORY);
    let mut csv = String::from("k,v\n");
    for i in 0..500_000u64 {
        csv.push_str(&format!("{i},{:060}\n", i * 7));
    }
    p.write("data/a.csv", csv);
    p.write(
        "pipelines/p.yaml",
        "sources:\n  a:\n    format: csv\n    location: data/a.csv\n    schema:\n      k: { type: bigint, required: true }\n      v: string\nmodels:\n  - sql/joined.sql\n",
    );
    p.write(
        "sql/joined.sql",
        "select x.k, x.v, y.k as k2 from raw_p_a x join raw_p_a y on x.v = y.v\n",
    );
    let out = p.kbcrm(&["run"]);
    let err = crate::support::stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("again with sort-merge joins"),
        "the hash join should not have fit in 24 MiB: {err}"
    );
    assert_eq!(p.scalar("select count(*) from joined"), 500_000);
    assert_eq!(p.scalar("select count(*) from joined where k <> k2"), 0);
}

/// The spills EXPLAIN ANALYZE reports for the aggregates of `sql`, and its result.
fn aggregate_spills(p: &Project, sql: &str, env: &[(&str, &str)]) -> (u64, Vec<Vec<String>>) {
    let plan = p.ok_with_env(&["query", &format!("explain analyze {sql}")], env);
    let spills = plan
        .lines()
        .filter(|l| l.contains("AggregateExec"))
        .filter_map(|l| l.split("spill_count=").nth(1))
        .map(|rest| {
            rest.split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .expect("a spill count")
        })
        .sum();
    (spills, p.query_with_env(sql, env))
}

/// `engine.memory_pool`: with `greedy` (the default) the one aggregate that needs memory may
/// take most of the limit; with `fair` every operator that can spill gets an equal share, so
/// the same grouping spills to disk. Both give the same answer; a bad value names its line.
#[test]
fn the_memory_pool_decides_whether_one_large_aggregate_spills() {
    let p = Project::empty();
    p.write(
        "kbcrm.yaml",
        "name: test\nengine:\n  memory_limit: 32MiB\n  target_partitions: 2\n",
    );
    // 400,000 groups in no order (7919 is prime to 400,000, so every remainder occurs once):
    // within 32 MiB for one aggregate, more than an operator's fair share of it.
    let sql = "select count(*) as groups, sum(n) as total from (select (x * 7919) % 400000 \
               as g, count(*) as n from generate_series(1, 400000) t(x) group by g)";
    let want = vec![vec!["400000".to_string(), "400000".to_string()]];
    let (greedy, rows) = aggregate_spills(&p, sql, &[]);
    assert_eq!((greedy, &rows), (0, &want), "greedy: no spill");
    let (fair, rows) = aggregate_spills(&p, sql, &[("KBCRM_MEMORY_POOL", "fair")]);
    assert!(fair > 0, "fair: an equal share is too small, so it spills");
    assert_eq!(rows, want);

    p.write(
        "kbcrm.yaml",
        "name: test\nengine:\n  memory_limit: 32MiB\n  memory_pool: fair\n  target_partitions: 2\n",
    );
    assert!(
        aggregate_spills(&p, sql, &[]).0 > 0,
        "fair, set in kbcrm.yaml"
    );
    p.fails_cleanly(
        &["query", "select 1"],
        &[("KBCRM_MEMORY_POOL", "lots")],
        &["KBCRM_MEMORY_POOL", "'lots' is neither greedy nor fair"],
        &[],
    );
    p.write(
        "kbcrm.yaml",
        "name: test\nengine:\n  memory_limit: 64MiB\n  memory_pool: roomy\n",
    );
    p.fails_cleanly(
        &["query", "select 1"],
        &[],
        &["kbcrm.yaml", "roomy", "greedy", "fair"],
        &[],
    );
}

/// A model whose window function needs all its rows in memory at once, beyond the limit, fails
/// with a resources error that says which setting to raise, and commits nothing.
#[test]
fn a_model_beyond_the_memory_limit_fails_saying_what_to_raise() {
    let p = Project::empty();
    p.write("kbcrm.yaml", TIGHT_MEMORY);
    let mut csv = String::from("k,v\n");
    for i in 0..300_000u64 {
        csv.push_str(&format!("{i},{:060}\n", (i * 7919) % 300_000));
    }
    p.write("data/a.csv", csv);
    p.write(
        "pipelines/p.yaml",
        "sources:\n  a:\n    format: csv\n    location: data/a.csv\n    schema:\n      k: { type: bigint, required: true }\n      v: string\nmodels:\n  - sql/ranked.sql\n",
    );
    p.write(
        "sql/ranked.sql",
        "select k, v, percent_rank() over (order by v) as a, percent_rank() over (order by k desc) \
         as b, cume_dist() over (order by v desc) as c from raw_p_a\n",
    );
    let out = p.kbcrm(&["run"]);
    let err = crate::support::stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("model 'ranked'"), "{err}");
    assert!(
        err.contains("engine.memory_limit") && err.contains("24 MiB"),
        "{err}"
    );
    assert!(
        !p.kbcrm(&["query", "select count(*) from raw_p_a"])
            .status
            .success(),
        "nothing is committed, not even the load"
    );
}

/// A load merged by key into a table too big to hash in the memory limit is tried again with
/// sort-merge joins; whether that fits or not, the table ends either fully merged or unchanged
/// (a retry that reused the first attempt's deleted files once "succeeded" with the new rows lost).
#[test]
fn a_merge_out_of_memory_ends_merged_or_unchanged() {
    let p = Project::empty();
    p.write("kbcrm.yaml", TIGHT_MEMORY);
    let file = |from: u64, to: u64, tag: &str| {
        let mut csv = String::from("k,v\n");
        for i in from..to {
            csv.push_str(&format!("{:060},{tag}\n", i * 7));
        }
        csv
    };
    p.write("data/a_1.csv", file(0, 500_000, "one"));
    p.write(
        "pipelines/p.yaml",
        "sources:\n  a:\n    format: csv\n    location: data/*.csv\n    mode: merge\n    keys: [k]\n    incremental: { files: new }\n    schema:\n      k: { type: string, required: true }\n      v: string\n",
    );
    p.ok(&["run"]);
    // The second file changes the last 100,000 keys and adds 100,000.
    p.write("data/a_2.csv", file(400_000, 600_000, "two"));
    let out = p.kbcrm(&["run"]);
    let err = crate::support::stderr(&out);
    assert!(
        err.contains("again with sort-merge joins"),
        "the merge's hash join should not have fit in 24 MiB: {err}"
    );
    let (rows, two) = (
        p.scalar("select count(*) from raw_p_a"),
        p.scalar("select count(*) from raw_p_a where v = 'two'"),
    );
    if out.status.success() {
        assert_eq!((rows, two), (600_000, 200_000), "{err}");
    } else {
        assert!(err.contains("Resources exhausted"), "{err}");
        assert_eq!((rows, two), (500_000, 0), "{err}");
    }
}

/// The values of `column` in the data files of `table` (removed ones too: nothing is vacuumed),
/// file by file in row order.
fn file_columns(p: &Project, table: &str, column: &str) -> Vec<Vec<String>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let mut files: Vec<_> = std::fs::read_dir(p.path().join("warehouse").join(table))
        .expect("table folder")
        .map(|e| e.expect("entry").path())
        .filter(|f| f.extension().is_some_and(|x| x == "parquet"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|f| {
            let reader = SerializedFileReader::new(std::fs::File::open(f).unwrap()).unwrap();
            let schema = reader.metadata().file_metadata().schema_descr();
            let i = (0..schema.num_columns())
                .find(|&i| schema.column(i).name() == column)
                .expect("column");
            reader
                .get_row_iter(None)
                .unwrap()
                .map(|r| r.unwrap().get_column_iter().nth(i).unwrap().1.to_string())
                .collect()
        })
        .collect()
}

/// A model with `slices:` runs once per slice of its key when its inputs are large, and gives
/// the rows the same SQL gives in one go.
#[test]
fn a_model_built_in_slices_gives_the_rows_of_one_build() {
    let p = Project::empty();
    let pipeline = |rows: u64| {
        format!(
            "sources:\n  lines:\n    format: csv\n    location: data/lines.csv\n    schema: {{ order_id: {{ type: string, required: true }}, line_no: int, qty: int }}\n  \
             orders:\n    format: csv\n    location: data/orders.csv\n    schema: {{ order_id: {{ type: string, required: true }}, customer: string }}\n\
             models:\n  - {{ path: sql/sliced.sql, slices: {{ by: order_id, rows: {rows} }} }}\n  - sql/whole.sql\n  \
             - {{ path: sql/clustered.sql, cluster_by: [customer, qty], slices: {{ by: order_id, rows: {rows} }} }}\n"
        )
    };
    p.write("pipelines/p.yaml", pipeline(3));
    let sql = "select l.order_id, l.line_no, o.customer, l.qty \
               from raw_p_lines l join raw_p_orders o on l.order_id = o.order_id";
    p.write("sql/sliced.sql", sql);
    p.write("sql/whole.sql", sql);
    p.write("sql/clustered.sql", sql);
    let mut lines = String::from("order_id,line_no,qty\n");
    let mut orders = String::from("order_id,customer\n");
    for o in 0..8 {
        orders.push_str(&format!("O{o},C{}\n", o % 3));
        for l in 0..=(o % 4) {
            lines.push_str(&format!("O{o},{l},{}\n", o * 10 + l));
        }
    }
    // A line of an order that does not exist joins nothing in either build.
    lines.push_str("O99,1,5\n");
    p.write("data/lines.csv", &lines);
    p.write("data/orders.csv", &orders);
    p.ok(&["run"]);
    assert_eq!(p.scalar("select count(*) from sliced"), 20);
    for (a, b) in [("sliced", "whole"), ("whole", "sliced")] {
        let diff = p.scalar(&format!(
            "select count(*) from (select * from {a} except all select * from {b})"
        ));
        assert_eq!(diff, 0, "{a} has rows {b} has not");
    }
    // 21 lines, at most 3 per slice: seven slices, each written on its own.
    let files = |table: &str| {
        p.warehouse_files()
            .iter()
            .filter(|(f, _)| f.starts_with(&format!("{table}/")) && f.ends_with(".parquet"))
            .count()
    };
    assert_eq!(files("whole"), 1);
    assert!(files("sliced") > 2, "{:?}", p.warehouse_files());
    // With `cluster_by`, the slices' sorted files are merged into one run in that order: one
    // customer's rows are together, as in a whole build.
    assert_eq!(files("clustered"), 1, "{:?}", p.warehouse_files());
    let diff =
        p.scalar("select count(*) from (select * from clustered except all select * from whole)");
    assert_eq!((p.scalar("select count(*) from clustered"), diff), (20, 0));
    let written: Vec<(String, i64)> = file_columns(&p, "clustered", "customer")[0]
        .iter()
        .cloned()
        .zip(
            file_columns(&p, "clustered", "qty")[0]
                .iter()
                .map(|q| q.parse().unwrap()),
        )
        .collect();
    let mut sorted = written.clone();
    sorted.sort();
    assert_eq!(written, sorted);
    p.write("pipelines/p.yaml", pipeline(0));
    let out = p.kbcrm(&["validate"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("`slices: rows:` must be at least 1"),
        "{}",
        stderr(&out)
    );
}

/// A model refreshed by key (`incremental: { key }`) holds, for each rebuilt key, exactly the rows
/// its SQL gives now: a row the SQL stops giving (an order's only line of a category cancelled)
/// goes, as a whole build would leave it out; other keys' rows are not read or touched.
#[test]
fn a_model_refreshed_by_key_drops_rows_its_sql_no_longer_gives() {
    let p = Project::empty();
    p.write(
        "pipelines/p.yaml",
        "sources:\n  lines:\n    format: csv\n    location: data/\n    mode: merge\n    keys: [line_id]\n    incremental: { files: new }\n    \
         schema: { line_id: { type: int, required: true }, order_id: string, category: string, status: string, amount: int }\n\
         models:\n  - { path: sql/order_category.sql, mode: merge, keys: [order_id, category], incremental: { key: order_id, tables: [raw_p_lines] } }\n  \
         - sql/whole.sql\n",
    );
    let sql = "select order_id, category, sum(amount) as amount, count(*) as lines \
               from raw_p_lines where status = 'completed' group by order_id, category";
    p.write("sql/order_category.sql", sql);
    p.write("sql/whole.sql", sql);
    p.write(
        "data/1.csv",
        "line_id,order_id,category,status,amount\n1,O1,a,completed,10\n2,O1,b,completed,20\n3,O1,a,completed,5\n4,O2,a,completed,7\n5,O2,c,completed,1\n",
    );
    p.ok(&["run"]);
    assert_eq!(p.scalar("select count(*) from order_category"), 4);
    // Day 2: O1's only line of category b is cancelled, O2 gains nothing, O3 is new.
    p.write(
        "data/2.csv",
        "line_id,order_id,category,status,amount\n2,O1,b,cancelled,20\n6,O3,b,completed,3\n",
    );
    let log = p.kbcrm(&["run", "-v"]);
    assert!(log.status.success(), "{}", stderr(&log));
    assert!(
        stderr(&log).contains("removing rows of rebuilt keys that the model no longer gives"),
        "{}",
        stderr(&log)
    );
    let rows =
        p.query("select order_id, category, amount, lines from order_category order by 1, 2");
    assert_eq!(
        rows,
        [
            ["O1", "a", "15", "2"],
            ["O2", "a", "7", "1"],
            ["O2", "c", "1", "1"],
            ["O3", "b", "3", "1"],
        ]
    );
    for (a, b) in [("order_category", "whole"), ("whole", "order_category")] {
        let diff = p.scalar(&format!(
            "select count(*) from (select * from {a} except all select * from {b})"
        ));
        assert_eq!(diff, 0, "{a} has rows {b} has not");
    }
}

/// `files_by` gives each value of its expression files of their own (sorted by `cluster_by`
/// within), and a merge rewrites only the files of the values its changed rows have.
#[test]
fn files_by_keeps_a_value_per_file_and_merges_rewrite_only_its_files() {
    let p = Project::empty();
    let pipeline = |files_by: &str| {
        format!(
            "sources:\n  s:\n    format: csv\n    location: data/\n    mode: merge\n    keys: [id]\n    incremental: {{ files: new }}\n    schema:\n      id: {{ type: int, required: true }}\n      day: date\n      customer: string\n      amount: int\n\
             models:\n  - {{ path: sql/by_year.sql, mode: merge, keys: [id], cluster_by: [customer], files_by: \"{files_by}\", incremental: raw_p_s }}\n"
        )
    };
    p.write("pipelines/p.yaml", pipeline("date_trunc('year', day)"));
    p.write(
        "sql/by_year.sql",
        "select id, day, customer, amount from raw_p_s\n",
    );
    let mut csv = String::from("id,day,customer,amount\n");
    let customers = ["k", "c", "x", "a", "m", "c", "z", "b", "k"];
    for (i, c) in customers.iter().enumerate() {
        csv.push_str(&format!(
            "{i},{}-0{}-1{i},{c},{}\n",
            2022 + i % 3,
            1 + i % 9,
            i * 10
        ));
    }
    p.write("data/a.csv", &csv);
    p.ok(&["run"]);
    let year_of = |day: &String| day[..4].to_string();
    let first = file_columns(&p, "by_year", "day");
    let mut years: Vec<String> = first.iter().map(|f| year_of(&f[0])).collect();
    years.sort();
    assert_eq!(years, ["2022", "2023", "2024"], "{first:?}");
    for f in &first {
        assert!(f.iter().all(|d| year_of(d) == year_of(&f[0])), "{first:?}");
    }
    for f in file_columns(&p, "by_year", "customer") {
        assert!(f.windows(2).all(|w| w[0] <= w[1]), "not sorted: {f:?}");
    }
    let log = std::fs::read_dir(p.path().join("warehouse/by_year/_delta_log"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap_or_default())
        .collect::<String>();
    assert!(
        log.contains("\"kbcrm.filesBy\":\"date_trunc('year', day)\""),
        "{log}"
    );

    // Each file as its (day, amount) pairs: the rewritten 2023 file differs in an amount.
    let rows_of = |p: &Project| -> Vec<Vec<(String, String)>> {
        file_columns(p, "by_year", "day")
            .into_iter()
            .zip(file_columns(p, "by_year", "amount"))
            .map(|(d, a)| d.into_iter().zip(a).collect())
            .collect()
    };
    let before = rows_of(&p);
    // Row 4 (2023) changes and row 9 (2025) is new: the 2023 file is written again (its
    // changed row in a file of its own, its two others in a file of rows kept as they were),
    // 2025 gets a file, and the 2022 and 2024 files stay as they are.
    p.write(
        "data/b.csv",
        "id,day,customer,amount\n4,2023-05-14,m,41\n9,2025-01-02,d,90\n",
    );
    p.ok(&["run"]);
    let after = rows_of(&p);
    let mut added: Vec<(String, usize)> = after
        .iter()
        .filter(|f| !before.contains(f))
        .map(|f| (year_of(&f[0].0), f.len()))
        .collect();
    added.sort();
    assert_eq!(
        added,
        [
            ("2023".to_string(), 1),
            ("2023".to_string(), 2),
            ("2025".to_string(), 1)
        ],
        "{after:?}"
    );
    assert_eq!(
        p.query("select id, amount from by_year where id in (4, 9) order by id"),
        [["4", "41"], ["9", "90"]]
    );
    assert_eq!(p.scalar("select count(*) from by_year"), 10);
    // A row whose value changes moves to its new value's files (once: its 2022 copy goes).
    p.write("data/c.csv", "id,day,customer,amount\n0,2024-02-02,k,1\n");
    p.ok(&["run"]);
    assert_eq!(p.scalar("select count(*) from by_year"), 10);
    assert_eq!(
        p.query("select cast(day as varchar) from by_year where id = 0"),
        [["2024-02-02"]]
    );

    // A value per row is refused: every value keeps a file open.
    p.write("pipelines/p.yaml", pipeline("id"));
    let many: String = (100..400)
        .map(|i| format!("{i},2024-01-01,e,1\n"))
        .collect();
    p.write("data/c.csv", format!("id,day,customer,amount\n{many}"));
    let before = p.warehouse_files();
    let out = p.kbcrm(&["run", "--full-refresh"]);
    assert_ne!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("among more than 256 values"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        p.warehouse_files(),
        before,
        "nothing may be committed or left"
    );
    std::fs::remove_file(p.path().join("data/c.csv")).unwrap();

    // An expression over columns the model does not have is refused before anything runs.
    p.write("pipelines/p.yaml", pipeline("date_trunc('year', dayz)"));
    let out = p.kbcrm(&["validate"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("model 'by_year': files_by 'date_trunc('year', dayz)'"),
        "{err}"
    );
}

#[test]
fn cluster_by_writes_sorted_files_and_a_full_refresh_applies_a_new_order() {
    let p = Project::empty();
    let pipeline = |cluster: &str| {
        format!(
            "sources:\n  s:\n    format: csv\n    location: data/\n    mode: merge\n    keys: [id]\n    schema:\n      id: {{ type: int, required: true }}\n      customer: string\n      amount: int\n\
             models:\n  - {{ path: sql/by_id.sql, mode: merge, keys: [id]{cluster} }}\n"
        )
    };
    p.write("pipelines/p.yaml", pipeline(""));
    p.write(
        "sql/by_id.sql",
        "select id, customer, amount from raw_p_s\n",
    );
    let customers = ["k", "c", "x", "a", "m", "c", "z", "b", "k", "a"];
    let mut csv = String::from("id,customer,amount\n");
    for (i, c) in customers.iter().enumerate() {
        csv.push_str(&format!("{i},{c},{}\n", i * 10));
    }
    p.write("data/a.csv", &csv);
    p.ok(&["run"]);
    let before = p.query("select id, customer, amount from by_id order by id");
    let unsorted = file_columns(&p, "by_id", "customer");
    assert_eq!(unsorted.len(), 1);
    assert_ne!(unsorted[0], {
        let mut s = unsorted[0].clone();
        s.sort();
        s
    });

    // Declared afterwards: the model's definition changed, but a merge of the same rows writes
    // nothing; --full-refresh rewrites the table in the declared order, with the same rows.
    p.write("pipelines/p.yaml", pipeline(", cluster_by: [customer]"));
    p.ok(&["run"]);
    let out = p.ok(&["run", "--full-refresh"]);
    assert!(out.contains("by_id") && out.contains("10 written"), "{out}");
    assert_eq!(
        p.query("select id, customer, amount from by_id order by id"),
        before
    );
    let log = std::fs::read_dir(p.path().join("warehouse/by_id/_delta_log"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap_or_default())
        .collect::<String>();
    assert!(log.contains("\"kbcrm.clusterBy\":\"customer\""), "{log}");
    let live: Vec<Vec<String>> = file_columns(&p, "by_id", "customer")
        .into_iter()
        .filter(|f| f.len() == 10 && f.windows(2).all(|w| w[0] <= w[1]))
        .collect();
    assert!(!live.is_empty(), "no data file is sorted by customer");
    // The order is part of the table now: another full refresh commits nothing.
    let out = p.ok(&["run", "--full-refresh"]);
    assert!(out.contains("unchanged"), "{out}");

    // A merge writes its files in the declared order too: the three new or changed rows in one
    // file, the nine rows it keeps from the rewritten file in another.
    csv.push_str("20,d,2\n21,a,3\n");
    p.write("data/a.csv", csv.replace("\n3,a,30\n", "\n3,y,1\n"));
    p.ok(&["run"]);
    let files = file_columns(&p, "by_id", "customer");
    for rows in [3, 9] {
        assert!(
            files
                .iter()
                .any(|f| f.len() == rows && f.windows(2).all(|w| w[0] <= w[1])),
            "a sorted file of {rows} rows: {files:?}"
        );
    }
    assert_eq!(p.scalar("select count(*) from by_id"), 12);
}

/// The summary line of the data test named `name`.
fn test_line(out: &str, name: &str) -> String {
    out.lines()
        .find(|l| l.contains("test") && l.contains(name))
        .unwrap_or_else(|| panic!("no line for {name}: {out}"))
        .to_string()
}

/// A test whose tables passed it and have only gained rows since checks the added rows alone,
/// and still finds a key an added row repeats or a parent an added row lacks; a table that lost
/// rows (a model rewritten) is checked whole.
#[test]
fn data_tests_check_only_the_added_rows_of_tables_that_only_grew() {
    let p = Project::empty();
    p.write(
        "pipelines/p.yaml",
        "sources:\n  c:\n    format: csv\n    location: data/c/\n    mode: merge\n    keys: [id]\n    incremental: { files: new }\n    schema:\n      id: { type: int, required: true }\n      name: string\n\
         \x20 o:\n    format: csv\n    location: data/o/\n    mode: append\n    incremental: { files: new }\n    schema:\n      id: { type: int, required: true }\n      customer: int\n\
         models:\n  - sql/named.sql\n\
         tests:\n  - unique: { table: raw_p_o, columns: [id] }\n\
         \x20 - relationships: { table: raw_p_o, column: customer, to: named.id }\n",
    );
    p.write(
        "sql/named.sql",
        "select id, name from raw_p_c where name is not null\n",
    );
    p.write("data/c/1.csv", "id,name\n1,anna\n2,ben\n3,cleo\n");
    p.write("data/o/1.csv", "id,customer\n10,1\n11,2\n");
    let first = p.ok(&["run"]);
    for name in ["unique(raw_p_o: id)", "relationships(raw_p_o.customer"] {
        let line = test_line(&first, name);
        assert!(line.ends_with("pass"), "{line}");
    }

    // Orders gained a row and the customers did not change: both tests read the new row only.
    p.write("data/o/2.csv", "id,customer\n12,3\n");
    let out = p.ok(&["run"]);
    for name in ["unique(raw_p_o: id)", "relationships(raw_p_o.customer"] {
        let line = test_line(&out, name);
        assert!(line.ends_with("pass (rows added by this run)"), "{line}");
    }

    // An added row repeating an old key, or naming a customer who does not exist, fails the run
    // as a check of the whole table would.
    for (file, bad, test) in [
        ("data/o/3.csv", "id,customer\n10,2\n", "unique(raw_p_o: id)"),
        (
            "data/o/3.csv",
            "id,customer\n13,99\n",
            "relationships(raw_p_o.customer -> named.id)",
        ),
    ] {
        p.write(file, bad);
        p.fails_cleanly_with(3, &["run"], &[], &[test, "(1 failing)"], &[]);
        std::fs::remove_file(p.path().join(file)).unwrap();
    }

    // Anna loses her name, so `named` is rewritten without her: order 10, an old row, now
    // names a missing customer, which only a check of the whole table sees.
    let lost_customer = ["relationships(raw_p_o.customer -> named.id)", "(1 failing)"];
    p.write("data/c/2.csv", "id,name\n1,\n");
    p.fails_cleanly_with(3, &["run"], &[], &lost_customer, &[]);
    // With her name back, and a new order, the run passes. `named` was rewritten again, but
    // every customer it had is still there: the old orders cannot have lost their customer, and
    // the relationship reads the added order alone.
    p.write("data/c/2.csv", "id,name\n1,anna b\n");
    p.write("data/o/4.csv", "id,customer\n14,1\n");
    let out = p.ok(&["run"]);
    let line = test_line(&out, "relationships(raw_p_o.customer");
    assert!(line.ends_with("pass (rows added by this run)"), "{line}");
    assert_eq!(p.scalar("select count(*) from raw_p_o"), 4);

    // Cleo loses her name while an order of Ben's arrives: `named` lost a value, so the
    // relationship reads every order and finds her old one (12), which the added row alone
    // would not show.
    p.write("data/c/3.csv", "id,name\n3,\n");
    p.write("data/o/5.csv", "id,customer\n15,2\n");
    p.fails_cleanly_with(3, &["run"], &[], &lost_customer, &[]);
}

/// A relationships test that found references missing keeps the values it found; a run that
/// only adds rows checks those values and the added rows' ones, and counts what a check of the
/// whole tables counts. Too many missing values to keep, and the next run reads the tables.
#[test]
fn a_failing_relationships_test_checks_the_values_that_failed_and_the_added_rows() {
    let p = Project::empty();
    p.write(
        "pipelines/p.yaml",
        "sources:\n  c:\n    format: csv\n    location: data/c/\n    mode: append\n    incremental: { files: new }\n    schema:\n      id: { type: int, required: true }\n\
         \x20 o:\n    format: csv\n    location: data/o/\n    mode: append\n    incremental: { files: new }\n    schema:\n      id: { type: int, required: true }\n      customer: int\n\
         tests:\n  - relationships: { table: raw_p_o, column: customer, to: raw_p_c.id, severity: warn }\n",
    );
    let name = "relationships(raw_p_o.customer -> raw_p_c.id)";
    // The customers the orders name that are not there, counted apart from the test.
    let missing = || {
        p.scalar(
            "select count(distinct customer) from raw_p_o o \
             where customer is not null and customer not in (select id from raw_p_c)",
        )
    };
    p.write("data/c/1.csv", "id\n1\n2\n");
    p.write("data/o/1.csv", "id,customer\n10,1\n11,7\n12,8\n13,8\n14,\n");
    let out = p.ok(&["run"]);
    assert!(test_line(&out, name).ends_with("2 failing"), "{out}");
    assert_eq!(missing(), 2);

    let narrowed = "(rows added by this run, and the values failing before)";
    // Customer 7 arrives, an order names customer 9, another names 8 again: 8 and 9 fail.
    p.write("data/c/2.csv", "id\n7\n");
    p.write("data/o/2.csv", "id,customer\n15,9\n16,8\n17,2\n");
    let out = p.ok(&["run"]);
    let line = test_line(&out, name);
    assert!(line.ends_with(&format!("2 failing {narrowed}")), "{line}");
    assert_eq!(missing(), 2);

    // Only orders arrive, one naming a customer that fails already, one a new missing one.
    p.write("data/o/3.csv", "id,customer\n18,8\n19,20\n");
    let out = p.ok(&["run"]);
    let line = test_line(&out, name);
    assert!(line.ends_with(&format!("3 failing {narrowed}")), "{line}");
    assert_eq!(missing(), 3);

    // Only customers arrive: the values that failed are checked again, and all are there.
    p.write("data/c/3.csv", "id\n8\n9\n20\n");
    let out = p.ok(&["run"]);
    let line = test_line(&out, name);
    assert!(line.ends_with(&format!("pass {narrowed}")), "{line}");
    assert_eq!(missing(), 0);

    // More missing customers than a run keeps: the run after reads the tables whole.
    let many: String = (1000..12_000).map(|i| format!("{i},{i}\n")).collect();
    p.write("data/o/4.csv", format!("id,customer\n{many}"));
    let out = p.ok(&["run"]);
    let line = test_line(&out, name);
    assert!(
        line.ends_with("11000 failing (rows added by this run)"),
        "{line}"
    );
    p.write("data/c/4.csv", "id\n1000\n");
    p.write("data/o/5.csv", "id,customer\n30,31\n");
    let out = p.ok(&["run"]);
    assert!(test_line(&out, name).ends_with("11000 failing"), "{out}");
    assert_eq!(missing(), 11_000);
}

/// A unique test on a table that the run changed only by merges on keys among its columns holds
/// by the merge (which writes each key once and replaces the rows of the keys it writes); other
/// unique tests read the table.
#[test]
fn unique_tests_on_the_keys_of_a_merge_hold_by_the_merge() {
    let p = Project::empty();
    p.write(
        "pipelines/p.yaml",
        "sources:\n  c:\n    format: csv\n    location: data/\n    mode: merge\n    keys: [id]\n    incremental: { files: new }\n    schema:\n      id: { type: int, required: true }\n      name: string\n\
         tests:\n  - unique: { table: raw_p_c, columns: [id] }\n\
         \x20 - unique: { table: raw_p_c, columns: [name, id] }\n\
         \x20 - unique: { table: raw_p_c, columns: [name] }\n",
    );
    p.write("data/1.csv", "id,name\n1,anna\n2,ben\n");
    let first = p.ok(&["run"]);
    for name in ["raw_p_c: id)", "raw_p_c: name, id)", "raw_p_c: name)"] {
        assert!(test_line(&first, name).ends_with("pass"), "{first}");
    }

    // A changed and a new row: the merge keeps `id` unique; `name` alone is read.
    p.write("data/2.csv", "id,name\n1,anna b\n3,cleo\n");
    let out = p.ok(&["run"]);
    for name in ["raw_p_c: id)", "raw_p_c: name, id)"] {
        let line = test_line(&out, name);
        assert!(
            line.ends_with("pass (kept unique by the merge on its keys)"),
            "{line}"
        );
    }
    assert!(test_line(&out, "raw_p_c: name)").ends_with("pass"), "{out}");
    assert_eq!(
        p.query("select id, name from raw_p_c order by id"),
        [["1", "anna b"], ["2", "ben"], ["3", "cleo"]]
    );

    // A name repeated by the merge is still found by the test that reads the table.
    p.write("data/3.csv", "id,name\n4,ben\n");
    p.fails_cleanly_with(
        3,
        &["run"],
        &[],
        &["unique(raw_p_c: name)", "(1 failing)"],
        &[],
    );
    std::fs::remove_file(p.path().join("data/3.csv")).unwrap();

    // A full refresh reads every table whole.
    let out = p.ok(&["run", "--full-refresh"]);
    assert!(test_line(&out, "raw_p_c: id)").ends_with("pass"), "{out}");
}

/// A custom SQL test that judges each row of one table alone checks only the rows a run added,
/// and still fails on a bad added row; one that compares rows with each other reads the table
/// whole.
#[test]
fn custom_sql_tests_that_judge_rows_one_by_one_check_only_the_added_rows() {
    let p = Project::empty();
    p.write(
        "pipelines/p.yaml",
        "sources:\n  o:\n    format: csv\n    location: data/\n    mode: append\n    incremental: { files: new }\n    schema:\n      id: { type: int, required: true }\n      net: double\n      gross: double\n\
         tests:\n  - sql: { name: net within gross, query: \"select * from raw_p_o where net > gross\" }\n\
         \x20 - sql: { name: one row per id, query: \"select id from raw_p_o group by id having count(*) > 1\" }\n",
    );
    p.write("data/1.csv", "id,net,gross\n1,5,6\n2,7,7\n");
    let first = p.ok(&["run"]);
    assert!(
        test_line(&first, "net within gross").ends_with("pass"),
        "{first}"
    );

    p.write("data/2.csv", "id,net,gross\n3,1,2\n");
    let out = p.ok(&["run"]);
    let narrowed = test_line(&out, "net within gross");
    assert!(
        narrowed.ends_with("pass (rows added by this run)"),
        "{narrowed}"
    );
    let whole = test_line(&out, "one row per id");
    assert!(whole.ends_with("pass"), "{whole}");

    // A bad added row fails the narrowed test; a repeated old id fails the whole-table one.
    p.write("data/3.csv", "id,net,gross\n4,9,8\n");
    p.fails_cleanly_with(3, &["run"], &[], &["net within gross", "(1 failing)"], &[]);
    p.write("data/3.csv", "id,net,gross\n1,1,1\n");
    p.fails_cleanly_with(3, &["run"], &[], &["one row per id", "(1 failing)"], &[]);
    std::fs::remove_file(p.path().join("data/3.csv")).unwrap();
    assert_eq!(p.scalar("select count(*) from raw_p_o"), 3);
}

#[test]
fn data_tests_over_unchanged_tables_keep_their_last_result() {
    let p = Project::empty();
    let pipeline = |tests: &str| {
        format!(
            "sources:\n  c:\n    format: csv\n    location: data/\n    schema:\n      id: {{ type: int, required: true }}\n      name: string\n\
             tests:\n  - unique: {{ table: raw_p_c, columns: [id] }}\n{tests}"
        )
    };
    let warn = "  - sql: { name: no bens, query: \"select * from raw_p_c where name = 'ben'\", severity: warn }\n";
    p.write("pipelines/p.yaml", pipeline(warn));
    p.write("data/a.csv", "id,name\n1,anna\n2,ben\n");
    let first = p.ok(&["run"]);
    assert!(!first.contains("unchanged since"), "{first}");
    assert!(first.contains("1 failing"), "{first}");

    // Nothing new: the same queries over the same versions are not run again.
    let files = p.warehouse_files();
    let again = p.ok(&["run"]);
    assert!(
        again.contains("pass (tables unchanged since it last ran)")
            && again.contains("1 failing (tables unchanged since it last ran)"),
        "{again}"
    );
    assert_eq!(p.warehouse_files(), files, "nothing may be committed");

    // A test added over the same tables runs; so do all after the table changes.
    let added = format!("{warn}  - not_null: {{ table: raw_p_c, columns: [name] }}\n");
    p.write("pipelines/p.yaml", pipeline(&added));
    let out = p.ok(&["run"]);
    let line = out
        .lines()
        .find(|l| l.contains("not_null(raw_p_c: name)"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(!line.contains("unchanged since"), "{line}");
    p.write("data/b.csv", "id,name\n3,ben\n");
    let out = p.ok(&["run"]);
    assert!(!out.contains("unchanged since"), "{out}");
    assert!(out.contains("2 failing"), "{out}");
    // ... and a full refresh runs every test.
    let out = p.ok(&["run", "--full-refresh"]);
    assert!(!out.contains("unchanged since"), "{out}");
}

#[test]
fn steps_run_side_by_side_build_what_one_at_a_time_builds() {
    let one = Project::demo();
    let many = Project::demo();
    let out_one = one.ok(&["run", "--threads", "1"]);
    // Four at once: pipelines that read nothing of each other's (erp, sales, service) build side
    // by side as well, and commit in their order.
    let out_many = many.ok(&["run", "--threads", "4"]);
    // The summaries list the same tables, in the pipelines' step order, with the same rows
    // read and written (run ids and seconds aside).
    let tables = |out: &str| -> Vec<String> {
        out.lines()
            .filter(|l| {
                l.starts_with("  source") || l.starts_with("  model") || l.starts_with("  identity")
            })
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                format!("{} {} {} {}", f[0], f[1], f[2], f[4])
            })
            .collect()
    };
    assert!(tables(&out_one).len() > 30, "{out_one}");
    assert_eq!(tables(&out_one), tables(&out_many));
    // star reads the tables of erp, sales and service: it started building before they
    // committed, from their staged tables, and committed after them.
    let times = |p: &Project| {
        p.query(
            "select name, cast(started_at as bigint), cast(ended_at as bigint) from kbcrm_runs \
             where name in ('erp', 'sales', 'service', 'star') order by name",
        )
        .into_iter()
        .map(|r| {
            (
                r[0].clone(),
                (r[1].parse::<i64>().unwrap(), r[2].parse::<i64>().unwrap()),
            )
        })
        .collect::<std::collections::HashMap<_, _>>()
    };
    let (one_runs, many_runs) = (times(&one), times(&many));
    let upstream = ["erp", "sales", "service"];
    assert!(
        upstream
            .iter()
            .all(|p| one_runs["star"].0 >= one_runs[*p].1),
        "{one_runs:?}"
    );
    assert!(
        upstream
            .iter()
            .any(|p| many_runs["star"].0 < many_runs[*p].1)
            && upstream
                .iter()
                .all(|p| many_runs["star"].1 >= many_runs[*p].1),
        "{many_runs:?}"
    );
    for sql in [
        "select count(*), sum(net_amount), count(distinct customer_key) from fact_sales",
        "select source, count(*), count(distinct customer_id) from map_customer_identity group by 1 order by 1",
        "select count(*), count(distinct customer_id), sum(case when is_current then 1 else 0 end) from dim_customer",
        "select count(*), sum(amount) from fact_invoice",
        "select count(*) from quarantine",
        "select scope, name, key from kbcrm_state order by 1, 2, 3",
    ] {
        assert_eq!(one.query(sql), many.query(sql), "{sql}");
    }
}
