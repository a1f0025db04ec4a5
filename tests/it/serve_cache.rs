//! `serve.cache`: a server keeping decoded columns in memory answers as one that reads the
//! files every time, before and after a run commits new table versions (with rows deleted
//! from files by merges), and keeps nothing beyond its budget.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::serve::{add_user_with_env, connect, rt, serve_with_env, texts};
use crate::support::{Project, run_in, stderr};

/// Every run of the test is as of one date (a run after midnight would recompute the cubes).
const AS_OF: &str = "2026-01-15";

/// Queries over the demo star: scans, filters, joins of the fact with its dimensions,
/// aggregates, distinct counts, windows and a sort with a limit.
const QUERIES: &[&str] = &[
    "select status, count(*), sum(net_amount), min(order_ts), max(order_ts) \
     from fact_sales group by status order by status",
    "select p.category, count(distinct f.customer_id), sum(f.margin_amount), avg(f.quantity) \
     from fact_sales f join dim_product p on f.product_id = p.product_id \
     where f.status = 'completed' group by p.category order by p.category",
    "select c.segment, c.region, count(*), sum(f.net_amount) \
     from fact_sales f join dim_customer c on f.customer_key = c.customer_key \
     where f.discount_pct > 0 group by 1, 2 order by 1, 2",
    "select order_id, line_no, net_amount from fact_sales \
     order by net_amount desc, order_id, line_no limit 7",
    "select customer_id, n, rank() over (order by n desc, customer_id) from \
     (select customer_id, count(*) as n from fact_sales group by customer_id) t \
     order by 3, 1 limit 10",
    "select count(*), count(email), sum(credit_limit) from dim_customer",
    "select invoice_id, paid_amount from fact_invoice order by invoice_id limit 20",
    "select count(*), sum(paid_amount) from fact_invoice",
];

/// The rows of every query.
async fn answers(c: &Client) -> Vec<Vec<Vec<String>>> {
    let mut out = Vec::new();
    for q in QUERIES {
        out.push(texts(c, q).await);
    }
    out
}

/// Whether every table scan of `sql`'s plan reads the cache.
async fn from_cache(c: &Client, sql: &str) -> bool {
    let plan: String = texts(c, &format!("explain {sql}"))
        .await
        .iter()
        .map(|r| r.join(" "))
        .collect::<Vec<_>>()
        .join("\n");
    plan.contains("CachedScan") && !plan.contains("DataSourceExec")
}

/// Ask every query until all of them are answered from the cache.
async fn until_cached(c: &Client) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut all = true;
        for q in QUERIES {
            if !from_cache(c, q).await {
                all = false;
                texts(c, q).await;
            }
        }
        if all {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the queries are still read from the files"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A demo warehouse at scale 0.01 served twice: with the cache, and reading the files only.
fn demo() -> Project {
    let p = Project::demo_with_own_data(0.01, 5);
    p.ok(&["run", "--as-of", AS_OF]);
    add_user_with_env(&p, "ada", "admin", "ada long password", &[]);
    p
}

/// The demo's kbcrm.yaml with `settings` added to its `serve:` section.
fn with_serve(yaml: &str, settings: &str) -> String {
    let own: String = yaml
        .lines()
        .filter(|l| !l.starts_with("  cache:"))
        .map(|l| format!("{l}\n"))
        .collect();
    let out = own.replacen("\nserve:\n", &format!("\nserve:\n  {settings}\n"), 1);
    assert_ne!(out, yaml, "the demo's kbcrm.yaml has a serve: section");
    out
}

#[test]
fn hot_columns_are_served_from_memory_with_the_rows_the_files_hold() {
    let p = demo();
    // Rollups would answer some aggregates without any scan.
    let env = [("KBCRM_ROLLUPS", "off")];
    let yaml = std::fs::read_to_string(p.path().join("kbcrm.yaml")).unwrap();
    let served = |cache: &str| {
        p.write(
            "kbcrm.yaml",
            with_serve(&yaml, &format!("refresh_interval: 200ms\n  cache: {cache}")),
        );
        serve_with_env(&p, &env)
    };
    let files_only = served("0");
    let cached = served("256MiB");
    let runtime = rt();
    runtime.block_on(async {
        let plain = connect(files_only.port, "ada", "ada long password")
            .await
            .expect("login");
        let hot = connect(cached.port, "ada", "ada long password")
            .await
            .expect("login");
        let expected = answers(&plain).await;
        let day_one = expected.clone();
        // The first query reads the files and starts loading what it read.
        assert!(!from_cache(&hot, QUERIES[0]).await);
        assert_eq!(answers(&hot).await, expected);
        until_cached(&hot).await;
        assert_eq!(answers(&hot).await, expected, "the cache answers otherwise");
        for q in QUERIES {
            assert!(!from_cache(&plain, q).await, "serve.cache: 0 cached {q}");
        }

        // A second day's batch merges into the facts and dimensions (rows of their files are
        // deleted by deletion vectors); both servers serve the new versions.
        let out = run_in(
            p.path(),
            &[
                "generate", "--scale", "0.01", "--seed", "5", "--out", "sources", "--batch", "2",
            ],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        let count = "select count(*) from fact_invoice";
        let before = texts(&hot, count).await;
        p.ok_with_env(&["run", "--as-of", AS_OF], &env);
        let deadline = Instant::now() + Duration::from_secs(60);
        while texts(&hot, count).await == before || texts(&plain, count).await == before {
            assert!(Instant::now() < deadline, "the new versions are not served");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let expected = answers(&plain).await;
        assert_ne!(expected, day_one, "day 2 changed nothing");
        assert_eq!(answers(&hot).await, expected);
        until_cached(&hot).await;
        assert_eq!(answers(&hot).await, expected, "the cache answers otherwise");
        // The served count is the one the files hold (an independent reader).
        assert_eq!(texts(&hot, count).await[0][0], p.scalar(count).to_string());
    });
}

#[test]
fn columns_beyond_the_budget_are_read_from_the_files() {
    let p = demo();
    let yaml = std::fs::read_to_string(p.path().join("kbcrm.yaml")).unwrap();
    p.write("kbcrm.yaml", with_serve(&yaml, "cache: 100B"));
    let server = serve_with_env(&p, &[("KBCRM_ROLLUPS", "off")]);
    rt().block_on(async {
        let c = connect(server.port, "ada", "ada long password")
            .await
            .expect("login");
        let first = answers(&c).await;
        // Time for any load to finish: none may, every column is larger than 100 bytes.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(answers(&c).await, first);
        for q in QUERIES {
            assert!(!from_cache(&c, q).await, "cached beyond the budget: {q}");
        }
    });
}
