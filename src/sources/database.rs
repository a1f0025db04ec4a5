//! What the database sources share: where the connection URL comes from, the SQL that reads a
//! table or query (standard quoting; MySQL sessions run with `ANSI_QUOTES`), key ranges, and
//! lineage names.

use super::mysql;
use super::postgres::Connection;
use crate::plan::{ConnectionRef, Database, DatabaseKind, Relation, Source};
use crate::sql::quote_ident;

/// One read of a database source: the SQL to run, the batches' schema, and where they go.
pub struct ReadQuery<'a> {
    /// The source read.
    pub source: &'a Source,
    /// The SELECT (or COPY body) to run.
    pub sql: &'a str,
    /// The declared columns the rows are decoded into.
    pub schema: arrow::datatypes::SchemaRef,
    /// The table or query as messages and rejects name it.
    pub label: &'a str,
    /// Positions of the key columns in `schema` (rows missing a key are rejected).
    pub keys: &'a [usize],
    /// Where each batch of rows (and each failure) is sent.
    pub tx: tokio::sync::mpsc::Sender<crate::error::Result<super::FileOutput>>,
}

/// The URL from where the pipeline says, or what is wrong.
pub fn url_text(connection: &ConnectionRef) -> std::result::Result<String, String> {
    let url = match connection {
        ConnectionRef::Env(var) => std::env::var(var).map_err(|_| {
            format!(
                "environment variable {var} is not set; set it to the database URL, e.g. \
                 postgres://USER:PASSWORD@HOST:5432/DATABASE?sslmode=require"
            )
        })?,
        ConnectionRef::File(path) => std::fs::read_to_string(path).map_err(|e| {
            format!(
                "cannot read the connection URL from {}: {e}",
                path.display()
            )
        })?,
    };
    let url = url.trim().to_string();
    if url.is_empty() {
        return Err(format!("the connection URL in {connection} is empty"));
    }
    Ok(url)
}

/// The relation as SQL: a quoted table name or the query as a derived table.
pub fn relation_sql(db: &Database) -> String {
    match &db.relation {
        Relation::Table(t) => t.split('.').map(quote_ident).collect::<Vec<_>>().join("."),
        Relation::Query(q) => format!("({q}) AS kbcrm_source"),
    }
}

/// The lineage dataset of a database source, named as OpenLineage names PostgreSQL tables:
/// (`postgres://host:port`, `database.schema.table`), never with credentials. When the URL
/// cannot be read here, the namespace names where it comes from.
pub fn lineage_dataset(db: &Database) -> (String, String) {
    let url = url_text(&db.connection).ok();
    let conn = match db.kind {
        DatabaseKind::Mysql => url
            .and_then(|u| mysql::Connection::parse(&u, "").ok())
            .map(|c| (c.namespace, c.database)),
        DatabaseKind::Postgres => url
            .and_then(|u| Connection::parse(&u, "").ok())
            .map(|c| (c.namespace, c.database)),
    };
    let table = match &db.relation {
        Relation::Table(t) if t.contains('.') => t.clone(),
        Relation::Table(t) if db.kind == DatabaseKind::Postgres => {
            format!("public.{t}")
        }
        Relation::Table(t) => t.clone(),
        Relation::Query(_) => "query".to_string(),
    };
    match conn {
        Some((namespace, database)) => (namespace, format!("{database}.{table}")),
        None => (format!("{} ({})", db.origin(), db.connection), table),
    }
}

/// The SELECT of the declared columns from the relation, with an optional condition.
pub fn select_sql(source: &Source, db: &Database, condition: Option<&str>) -> String {
    let cols: Vec<String> = source
        .columns
        .iter()
        .map(|c| quote_ident(&c.source_name))
        .collect();
    format!("SELECT {}{}", cols.join(", "), from_where(db, condition))
}

/// The SELECT of the smallest and largest value of an integer column under an optional
/// condition, both cast to the dialect's 64-bit integer type (`bigint`, MySQL's `SIGNED`).
pub fn bounds_sql(db: &Database, column: &str, condition: Option<&str>, int64: &str) -> String {
    let col = quote_ident(column);
    format!(
        "SELECT CAST(MIN({col}) AS {int64}), CAST(MAX({col}) AS {int64}){}",
        from_where(db, condition)
    )
}

/// ` FROM relation` and ` WHERE condition` when there is one.
fn from_where(db: &Database, condition: Option<&str>) -> String {
    match condition {
        Some(c) => format!(" FROM {} WHERE {c}", relation_sql(db)),
        None => format!(" FROM {}", relation_sql(db)),
    }
}

/// Split [lo, hi] into `parts` conditions; the first also takes the rows where the column is
/// null.
pub fn ranges(column: &str, lo: i64, hi: i64, parts: u32) -> Vec<String> {
    let col = quote_ident(column);
    let span = (i128::from(hi) - i128::from(lo) + 1).max(1);
    let parts = i128::from(parts).min(span);
    let mut out = Vec::new();
    for p in 0..parts {
        let a = i128::from(lo) + span * p / parts;
        let b = i128::from(lo) + span * (p + 1) / parts;
        let mut cond = if p + 1 == parts {
            format!("{col} >= {a}")
        } else {
            format!("({col} >= {a} AND {col} < {b})")
        };
        if p == 0 {
            cond = format!("({cond} OR {col} IS NULL)");
        }
        out.push(cond);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_the_span_once() {
        let r = ranges("id", 1, 10, 4);
        assert_eq!(r.len(), 4);
        assert_eq!(r[0], "((\"id\" >= 1 AND \"id\" < 3) OR \"id\" IS NULL)");
        assert_eq!(r[3], "\"id\" >= 8");
        assert_eq!(ranges("id", 5, 5, 4).len(), 1);
    }
}
