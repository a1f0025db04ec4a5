use super::data_tests::row_local_table;
use super::*;

async fn checked_table(sql: &str) -> Option<String> {
    let ctx = SessionContext::new();
    crate::engine::udf::register(&ctx, &crate::engine::udf::RunParams::default());
    for ddl in [
        "create table sales (id int, net double, gross double, day date)",
        "create table customers (id int, name varchar)",
    ] {
        ctx.sql(ddl)
            .await
            .expect("create")
            .collect()
            .await
            .expect("created");
    }
    let t = crate::plan::DataTest {
        name: "t".into(),
        table: "sales".into(),
        query: sql.into(),
        added_rows: None,
        severity: Severity::Error,
        reads: vec!["sales".into()],
        referenced: None,
        unique_columns: Vec::new(),
    };
    row_local_table(&ctx, &t).await.map(str::to_string)
}

#[tokio::test]
async fn only_queries_that_judge_each_row_alone_are_narrowed_to_added_rows() {
    let row_local = [
        "select * from sales where net > gross",
        "select id, abs(net) as a from sales s where coalesce(net, 0) < 0 order by id limit 5",
        "select distinct id from sales where day > date '2030-01-01'",
    ];
    for sql in row_local {
        assert_eq!(checked_table(sql).await.as_deref(), Some("sales"), "{sql}");
    }
    let whole = [
        // Rows judged together, or against another table, or against the run's date.
        "select id from sales group by id having count(*) > 1",
        "select * from sales where net > (select avg(net) from sales)",
        "select * from sales where id not in (select id from sales where net < 0)",
        "select s.* from sales s join customers c on s.id = c.id",
        "select * from sales where day > kbcrm_as_of()",
        "select * from sales where day > now()",
        "select * from sales where random() < 0.5",
        "select id, row_number() over (order by id) as n from sales",
        "select * from sales order by id limit 5 offset 2",
        "select * from sales union all select * from sales",
        "not sql",
    ];
    for sql in whole {
        assert_eq!(checked_table(sql).await, None, "{sql}");
    }
}
