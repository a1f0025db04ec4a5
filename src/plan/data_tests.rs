//! Data tests as queries returning the offending rows.

use crate::config::pipeline::TestSpec;

use super::DataTest;

pub(super) fn data_test(t: &TestSpec) -> DataTest {
    let mut test = query_of(t);
    // The tables its query reads (none when it does not parse: it then fails when it runs).
    test.reads = super::dag::parse_model_sql(
        std::path::Path::new(&test.name),
        &std::sync::Arc::new(test.query.clone()),
    )
    .map(|refs| refs.into_iter().map(|r| r.name).collect())
    .unwrap_or_default();
    test
}

fn query_of(t: &TestSpec) -> DataTest {
    let quote_list = |cols: &[String]| cols.join(", ");
    match t {
        TestSpec::Unique(c) => DataTest {
            name: format!("unique({}: {})", c.table, quote_list(&c.columns)),
            table: c.table.clone(),
            query: format!(
                "select {cols}, count(*) as n from {t} group by {cols} having count(*) > 1",
                cols = quote_list(&c.columns),
                t = c.table
            ),
            severity: c.severity,
            reads: Vec::new(),
        },
        TestSpec::NotNull(c) => DataTest {
            name: format!("not_null({}: {})", c.table, quote_list(&c.columns)),
            table: c.table.clone(),
            query: format!(
                "select * from {} where {}",
                c.table,
                c.columns
                    .iter()
                    .map(|c| format!("{c} is null"))
                    .collect::<Vec<_>>()
                    .join(" or ")
            ),
            severity: c.severity,
            reads: Vec::new(),
        },
        TestSpec::AcceptedValues(a) => DataTest {
            name: format!("accepted_values({}.{})", a.table, a.column),
            table: a.table.clone(),
            query: format!(
                "select {c}, count(*) as n from {t} where {c} is not null and cast({c} as varchar) not in ({v}) group by {c}",
                c = a.column,
                t = a.table,
                v = a
                    .values
                    .iter()
                    .map(|v| format!("'{}'", v.replace('\'', "''")))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            severity: a.severity,
            reads: Vec::new(),
        },
        TestSpec::Relationships(r) => {
            let (to_table, to_col) = r.to.split_once('.').unwrap_or((r.to.as_str(), ""));
            DataTest {
                name: format!("relationships({}.{} -> {})", r.table, r.column, r.to),
                table: r.table.clone(),
                query: format!(
                    "select a.{c}, count(*) as n from {t} a left anti join {tt} b on a.{c} = b.{tc} \
                     where a.{c} is not null group by a.{c}",
                    c = r.column,
                    t = r.table,
                    tt = to_table,
                    tc = to_col
                ),
                severity: r.severity,
                reads: Vec::new(),
            }
        }
        TestSpec::Sql(s) => DataTest {
            name: format!("sql({})", s.name),
            table: String::new(),
            query: s.query.clone(),
            severity: s.severity,
            reads: Vec::new(),
        },
    }
}
