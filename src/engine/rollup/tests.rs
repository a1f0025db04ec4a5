use super::*;
use arrow::util::pretty::pretty_format_batches;

/// A rollup model of `sql` reading `depends_on`.
fn rollup_model(name: &str, sql: &str, depends_on: &[&str]) -> Model {
    Model {
        pipeline: "p".into(),
        name: name.into(),
        file: format!("sql/{name}.sql").into(),
        sql: Arc::new(sql.to_string()),
        write: crate::plan::ModelWrite::Table(crate::plan::Write::Overwrite),
        depends_on: depends_on.iter().map(|t| t.to_string()).collect(),
        incremental: None,
        rollup: true,
        cluster_by: vec![],
        files_by: None,
        slices: None,
    }
}

/// A fact and two dimensions in memory, and the rollup `daily` over fact and dates.
async fn sessions() -> (SessionContext, SessionContext) {
    let setup = [
        "create table fact as select * from (values \
               (1, 'P1', 'done', 10.50, 2, 'O1'), (1, 'P2', 'done', 3.25, 1, 'O1'), \
               (2, 'P1', 'open', 7.00, 5, 'O2'), (2, 'P3', 'done', 1.00, 1, 'O3'), \
               (3, 'P2', 'done', 4.75, 3, 'O4'), (3, 'P2', 'done', 2.25, 2, 'O4'), \
               (4, 'P9', 'done', 5.00, 1, 'O5')) \
               as t(date_key, product_id, status, amount, qty, order_id)",
        "create table dim_date as select * from (values \
               (1, 2024, 1), (2, 2024, 2), (3, 2025, 1), (4, 2025, 2)) as t(date_key, year, month)",
        "create table dim_product as select * from (values \
               ('P1', 'tools'), ('P2', 'toys'), ('P3', 'tools')) as t(product_id, category)",
    ];
    let rollup_sql = "select d.year, d.month, f.product_id, f.status, sum(f.amount) as amount, \
            sum(f.qty) as qty, count(f.qty) as qty_count, count(*) as line_count, \
            min(f.amount) as min_amount, max(f.qty) as max_qty \
            from fact f join dim_date d on f.date_key = d.date_key \
            group by d.year, d.month, f.product_id, f.status";
    let plain = SessionContext::new();
    let routed = SessionContext::new();
    for ctx in [&plain, &routed] {
        for sql in setup {
            ctx.sql(sql).await.unwrap().collect().await.unwrap();
        }
    }
    // The table keeps `month` as Int32 where the query sees Int64: kept columns are cast
    // back to the query's types.
    let table_sql = rollup_sql.replacen("d.month,", "cast(d.month as int) as month,", 1);
    assert_ne!(table_sql, rollup_sql);
    routed
        .sql(&format!("create table daily as {table_sql}"))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let model = rollup_model("daily", rollup_sql, &["fact", "dim_date"]);
    let def = definition(&routed, &model).await.unwrap();
    Rollups { defs: vec![def] }
        .attach(&routed, |_| true)
        .await
        .unwrap();
    (plain, routed)
}

/// The result as lines, sorted (queries without ORDER BY come in any order).
async fn text(ctx: &SessionContext, sql: &str) -> String {
    let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
    let table = pretty_format_batches(&batches).unwrap().to_string();
    let mut lines: Vec<&str> = table.lines().collect();
    lines.sort_unstable();
    lines.join("\n")
}

#[tokio::test]
async fn answered_queries_give_the_rows_of_the_tables() {
    let (plain, routed) = sessions().await;
    for sql in [
        // measures by kept columns, with a filter on a kept column
        "select d.year, d.month, sum(f.amount) as s, count(*) as n, sum(f.qty) as q \
             from fact f join dim_date d on f.date_key = d.date_key where f.status = 'done' \
             group by d.year, d.month order by 1, 2",
        // min, max, avg (from sum and count), count(distinct) of a kept column, HAVING
        "select d.year, min(f.amount), max(f.qty), avg(f.qty), count(distinct f.product_id), \
             count(f.qty) from fact f join dim_date d on f.date_key = d.date_key \
             group by d.year having sum(f.amount) > 5 order by 1",
        // a further table joined on a kept column (P9 has no product: the inner join drops it)
        "select p.category, sum(f.amount), count(*) from fact f \
             join dim_date d on f.date_key = d.date_key \
             join dim_product p on f.product_id = p.product_id \
             where d.year = 2024 group by p.category order by 1",
        // tables without aliases, joined in WHERE
        "select dim_date.month, sum(fact.amount) from fact, dim_date \
             where fact.date_key = dim_date.date_key group by dim_date.month order by 1",
        // no group: over no rows a count is 0 and a sum NULL
        "select count(*), sum(f.amount), count(f.qty) from fact f \
             join dim_date d on f.date_key = d.date_key where d.year = 1990",
        // expressions of kept columns
        "select d.year * 100 + d.month as ym, sum(f.amount) from fact f \
             join dim_date d on f.date_key = d.date_key group by d.year * 100 + d.month order by 1",
    ] {
        let explain = explain_row(&routed, sql).await.unwrap().unwrap();
        assert!(
            explain.contains("answered by rollup daily"),
            "{sql}: {explain}"
        );
        let plan = text(&routed, &format!("explain {sql}")).await;
        assert!(plan.contains("TableScan: daily"), "{sql}: {plan}");
        assert_eq!(text(&routed, sql).await, text(&plain, sql).await, "{sql}");
    }
}

#[tokio::test]
async fn queries_a_rollup_cannot_answer_say_why() {
    let (plain, routed) = sessions().await;
    for (sql, why) in [
        (
            "select d.year, count(distinct f.order_id) from fact f \
                 join dim_date d on f.date_key = d.date_key group by d.year",
            "uses fact.order_id",
        ),
        (
            "select d.year, sum(f.amount) from fact f \
                 left join dim_date d on f.date_key = d.date_key group by d.year",
            "Left join",
        ),
        (
            "select f.status, sum(f.amount) from fact f group by f.status",
            "does not read 'dim_date'",
        ),
        (
            "select d.year, sum(d.month) from fact f \
                 join dim_date d on f.date_key = d.date_key group by d.year",
            "no sum(dim_date.month)",
        ),
        (
            "select d.year, sum(p.category_len) from fact f \
                 join dim_date d on f.date_key = d.date_key \
                 join (select product_id, length(category) as category_len from dim_product) p \
                   on f.product_id = p.product_id group by d.year",
            "tables the rollup does not aggregate",
        ),
        (
            "select d.year, sum(f.amount) from fact f \
                 join dim_date d on f.date_key = d.date_key and f.qty > 1 group by d.year",
            "uses fact.qty",
        ),
        (
            "select d.year, sum(f.amount) from fact f join dim_date d on f.date_key = d.date_key \
                 where f.product_id in (select product_id from dim_product) group by d.year",
            "subquery",
        ),
    ] {
        let explain = explain_row(&routed, sql).await.unwrap().unwrap();
        assert!(explain.contains("no rollup answered"), "{sql}: {explain}");
        assert!(explain.contains(why), "{sql}: want '{why}' in {explain}");
        assert_eq!(text(&routed, sql).await, text(&plain, sql).await, "{sql}");
    }
}

#[tokio::test]
async fn sql_that_is_not_a_rollup_is_refused_with_the_reason() {
    let (_, routed) = sessions().await;
    for (sql, why) in [
        (
            "select d.year, sum(f.amount) from fact f join dim_date d \
                 on f.date_key = d.date_key where f.status = 'done' group by d.year",
            "it filters rows",
        ),
        (
            "select d.year, sum(f.amount) from fact f left join dim_date d \
                 on f.date_key = d.date_key group by d.year",
            "Left join",
        ),
        ("select * from fact", "not one SELECT ... GROUP BY"),
        (
            "select f.status, length(f.status) from fact f group by f.status",
            "no sum, count, min or max",
        ),
    ] {
        let model = rollup_model("r", sql, &[]);
        let err = definition(&routed, &model).await.unwrap_err().to_string();
        assert!(err.contains(why), "{sql}: want '{why}' in {err}");
    }
}

#[test]
fn a_rollup_built_from_other_versions_or_sql_is_stale() {
    let model = rollup_model("r", "select 1", &["fact"]);
    let hash = hex::encode(Sha256::digest(b"select 1"));
    let built = |def: &str, v: u64| {
        serde_json::json!({"definition": def, "inputs": {"fact": v}}).to_string()
    };
    let at = |v: u64| move |_: &str| Some(v);
    assert_eq!(staleness(&model, Some(&built(&hash, 3)), &at(3)), None);
    let moved = staleness(&model, Some(&built(&hash, 3)), &at(4)).unwrap();
    assert!(
        moved.contains("built from fact version 3, the table is at version 4"),
        "{moved}"
    );
    let edited = staleness(&model, Some(&built("other", 3)), &at(3)).unwrap();
    assert!(edited.contains("SQL (sql/r.sql) changed"), "{edited}");
    assert!(staleness(&model, None, &at(3)).unwrap().contains("no run"));
}
