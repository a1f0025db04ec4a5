//! Rollups on the demo project: aggregate queries answered from them give the rows the star
//! schema gives, stale rollups are not used, and a role reading the facts through a row filter
//! is never answered from them.

use std::collections::BTreeSet;

use crate::serve::{add_user_with_env, connect, rt, serve_with_env, texts};
use crate::support::{Project, repo, stderr};

const OFF: &[(&str, &str)] = &[("KBCRM_ROLLUPS", "off")];

/// The benchmark's OLAP queries: (name, SQL without its comment lines).
fn olap_queries() -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = std::fs::read_dir(repo().join("benches/olap"))
        .expect("benches/olap")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .map(|p| {
            let sql: String = std::fs::read_to_string(&p)
                .expect("read")
                .lines()
                .filter(|l| !l.trim_start().starts_with("--"))
                .collect::<Vec<_>>()
                .join("\n");
            let name = p.file_stem().unwrap().to_string_lossy().into_owned();
            (name, sql)
        })
        .collect();
    out.sort();
    out
}

/// The `rollup_routing` row of `kbcrm query "explain ..."`.
fn routing(p: &Project, sql: &str) -> String {
    let rows = p.query(&format!("explain {sql}"));
    rows.iter()
        .find(|r| r[0] == "rollup_routing")
        .map(|r| r[1].clone())
        .unwrap_or_else(|| panic!("no rollup_routing row for {sql}: {rows:?}"))
}

/// More aggregates over the star schema, answered from the rollups.
const MORE: &[&str] = &[
    // no rows: count 0, sums NULL
    "select count(*) as n, sum(f.net_amount) as revenue from fact_sales f \
     join dim_date d on f.date_key = d.date_key where d.year = 1990",
    // min/max kept by the rollup, an average from its sum and count, a distinct count
    "select p.category, min(f.order_ts) as first_sale, max(f.order_ts) as last_sale, \
     round(avg(f.quantity), 6) as avg_units, count(distinct f.product_id) as products \
     from fact_sales f join dim_product p on f.product_id = p.product_id \
     where f.status <> 'cancelled' group by p.category order by p.category",
    // a month filter and HAVING
    "select d.year_month, ch.channel_type, sum(f.margin_amount) as margin from fact_sales f \
     join dim_date d on f.date_key = d.date_key join dim_product p on f.product_id = p.product_id \
     join dim_channel ch on f.channel_id = ch.channel_id where d.month in (11, 12) \
     group by d.year_month, ch.channel_type having count(*) > 3 order by 1, 2",
];

#[test]
fn aggregate_queries_are_answered_from_current_rollups_with_the_star_schemas_rows() {
    let p = Project::demo_with_own_data(0.01, 11);
    let star = ["run", "erp", "sales", "service", "star"];
    p.ok(&star);
    p.ok(&["run", "rollups"]);

    // Every OLAP query of the benchmark gives the same rows with and without rollups; the
    // three a rollup can answer are answered from one, the others say why not.
    let mut answered = BTreeSet::new();
    let customer = &p.query("select min(customer_id) from fact_sales")[0][0];
    for (name, sql) in olap_queries() {
        let sql = sql.replace(":customer_id", &format!("'{customer}'"));
        assert_eq!(p.query(&sql), p.query_with_env(&sql, OFF), "{name}");
        let why = routing(&p, &sql);
        if why.contains("answered by rollup") {
            answered.insert(name);
        } else {
            assert!(
                why.contains("no rollup answered (")
                    || why == "no aggregate to answer from a rollup",
                "{name}: {why}"
            );
        }
    }
    let want: BTreeSet<String> = [
        "q03_online_category_quarter",
        "q05_rolling_90d",
        "q06_top_products_per_category",
    ]
    .map(String::from)
    .into();
    assert_eq!(answered, want);
    for sql in MORE {
        assert!(routing(&p, sql).contains("answered by rollup"), "{sql}");
        assert_eq!(p.query(sql), p.query_with_env(sql, OFF), "{sql}");
    }
    let empty = p.query(MORE[0]);
    assert_eq!(empty, vec![vec!["0".to_string(), String::new()]]);

    // New sales make the rollups stale: queries read the star schema until they are rebuilt.
    let q05 = olap_queries()
        .into_iter()
        .find(|(n, _)| n == "q05_rolling_90d")
        .unwrap()
        .1;
    let out = p.kbcrm(&[
        "generate", "--scale", "0.01", "--seed", "11", "--batch", "2", "--out", "sources",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    p.ok(&star);
    let why = routing(&p, &q05);
    assert!(
        why.contains("rollup_sales_daily: built from ") && why.contains("run pipeline 'rollups'"),
        "{why}"
    );
    assert_eq!(p.query(&q05), p.query_with_env(&q05, OFF));
    p.ok(&["run", "rollups"]);
    assert!(routing(&p, &q05).contains("answered by rollup rollup_sales_daily"));
    assert_eq!(p.query(&q05), p.query_with_env(&q05, OFF));

    // Over the SQL server: the admin is answered from the rollup; a role whose facts carry a
    // row filter reads them through it, even when it may read the rollup itself.
    let yaml = std::fs::read_to_string(p.path().join("kbcrm.yaml")).unwrap();
    let granted = yaml.replace(
        "tables: [\"dim_*\", \"fact_sales\",",
        "tables: [\"rollup_*\", \"dim_*\", \"fact_sales\",",
    );
    assert_ne!(
        yaml, granted,
        "the north_manager role of kbcrm.yaml changed"
    );
    p.write("kbcrm.yaml", granted);
    add_user_with_env(&p, "ada", "admin", "ada long password", &[]);
    add_user_with_env(&p, "nils", "north_manager", "nils pw", &[]);
    let s = serve_with_env(&p, &[]);
    rt().block_on(async {
        let explain = format!("explain {q05}");
        let ada = connect(s.port, "ada", "ada long password").await.unwrap();
        let rows = texts(&ada, &explain).await;
        let row = rows
            .iter()
            .find(|r| r[0] == "rollup_routing")
            .expect("routing row");
        assert!(
            row[1].contains("answered by rollup rollup_sales_daily"),
            "{row:?}"
        );
        assert!(
            rows.iter()
                .any(|r| r[1].contains("TableScan: rollup_sales_daily")),
            "{rows:?}"
        );
        assert_eq!(
            texts(&ada, &q05).await.len(),
            p.query_with_env(&q05, OFF).len()
        );
        let nils = connect(s.port, "nils", "nils pw").await.unwrap();
        let q = "select d.year, sum(f.net_amount) from fact_sales f \
                 join dim_date d on f.date_key = d.date_key group by d.year";
        let rows = texts(&nils, &format!("explain {q}")).await;
        let row = rows
            .iter()
            .find(|r| r[0] == "rollup_routing")
            .expect("routing row");
        assert!(row[1].contains("through a view"), "{row:?}");
    });
}

#[test]
fn a_rollup_that_is_not_one_fails_its_run_naming_the_file() {
    let p = Project::demo();
    p.ok(&["run", "erp", "sales", "service", "star"]);
    p.write(
        "sql/rollups/rollup_sales_daily.sql",
        "select d.year, sum(f.net_amount) as revenue from fact_sales f \
         join dim_date d on f.date_key = d.date_key where f.status = 'completed' group by d.year\n",
    );
    let out = p.kbcrm(&["validate"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    for want in ["sql/rollups/rollup_sales_daily.sql", "it filters rows"] {
        assert!(err.contains(want), "validate: '{want}' not in {err}");
    }
    let before = p.warehouse_files();
    let out = p.kbcrm(&["run", "rollups"]);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    for want in [
        "sql/rollups/rollup_sales_daily.sql",
        "it filters rows",
        "filter in the queries instead",
    ] {
        assert!(err.contains(want), "'{want}' not in {err}");
    }
    assert_eq!(p.warehouse_files(), before, "nothing may be committed");

    // A rollup merged by key could miss rows: refused when the project loads.
    p.write(
        "pipelines/rollups.yaml",
        "name: rollups\nmodels:\n  - { path: sql/rollups/rollup_sales_daily.sql, rollup: true, mode: merge, keys: [year] }\n",
    );
    p.fails_cleanly(
        &["run", "rollups"],
        &[],
        &["pipelines/rollups.yaml", "a rollup is rebuilt whole"],
        &[],
    );
}
