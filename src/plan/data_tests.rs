//! Data tests as queries returning the offending rows.

use crate::config::pipeline::TestSpec;

use super::DataTest;

/// The table a data test's `added_rows` query reads the rows a run added to its table from.
pub const ADDED_ROWS: &str = "__kbcrm_added";

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
            // A repeated key the table did not have before involves an added row.
            added_rows: Some(format!(
                "select {t_cols}, count(*) as n from {t} t \
                 join (select distinct {cols} from {ADDED_ROWS}) k on {on} \
                 group by {t_cols} having count(*) > 1",
                cols = quote_list(&c.columns),
                t = c.table,
                t_cols = c
                    .columns
                    .iter()
                    .map(|c| format!("t.{c}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                on = c
                    .columns
                    .iter()
                    .map(|c| format!("(t.{c} is not distinct from k.{c})"))
                    .collect::<Vec<_>>()
                    .join(" and "),
            )),
            severity: c.severity,
            reads: Vec::new(),
            referenced: None,
            unique_columns: c.columns.clone(),
        },
        TestSpec::NotNull(c) => per_row(
            format!("not_null({}: {})", c.table, quote_list(&c.columns)),
            &c.table,
            c.severity,
            |t| {
                format!(
                    "select * from {t} where {}",
                    c.columns
                        .iter()
                        .map(|c| format!("{c} is null"))
                        .collect::<Vec<_>>()
                        .join(" or ")
                )
            },
        ),
        TestSpec::AcceptedValues(a) => per_row(
            format!("accepted_values({}.{})", a.table, a.column),
            &a.table,
            a.severity,
            |t| {
                format!(
                    "select {c}, count(*) as n from {t} where {c} is not null and cast({c} as varchar) not in ({v}) group by {c}",
                    c = a.column,
                    v = a
                        .values
                        .iter()
                        .map(|v| format!("'{}'", v.replace('\'', "''")))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            },
        ),
        TestSpec::Relationships(r) => {
            let (to_table, to_col) = r.to.split_once('.').unwrap_or((r.to.as_str(), ""));
            let mut test = per_row(
                format!("relationships({}.{} -> {})", r.table, r.column, r.to),
                &r.table,
                r.severity,
                |t| {
                    format!(
                        "select a.{c}, count(*) as n from {t} a left anti join {tt} b on a.{c} = b.{tc} \
                         where a.{c} is not null group by a.{c}",
                        c = r.column,
                        tt = to_table,
                        tc = to_col
                    )
                },
            );
            test.referenced = Some(super::Reference {
                column: r.column.clone(),
                to_table: to_table.to_string(),
                to_column: to_col.to_string(),
            });
            test
        }
        TestSpec::Sql(s) => DataTest {
            name: format!("sql({})", s.name),
            table: String::new(),
            query: s.query.clone(),
            added_rows: None,
            severity: s.severity,
            reads: Vec::new(),
            referenced: None,
            unique_columns: Vec::new(),
        },
    }
}

/// A test whose rows each pass or fail on their own (and on tables that only grow): the same
/// query checks the whole table or only the rows a run added.
fn per_row(
    name: String,
    table: &str,
    severity: crate::config::pipeline::Severity,
    query: impl Fn(&str) -> String,
) -> DataTest {
    DataTest {
        name,
        table: table.to_string(),
        query: query(table),
        added_rows: Some(query(ADDED_ROWS)),
        severity,
        reads: Vec::new(),
        referenced: None,
        unique_columns: Vec::new(),
    }
}
