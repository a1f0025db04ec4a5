//! What a client may run: queries, `SHOW`, transactions and cursors; harmless per-session
//! `SET`s. Everything that writes, reads files or changes the engine is refused before it is
//! planned.

use std::collections::BTreeSet;
use std::ops::ControlFlow;

use datafusion::sql::sqlparser::ast::{
    CopySource, Expr, LockTableMode, ObjectName, Query, Reset, Set, SetExpr, Statement,
    TableFactor, Value, Visit, Visitor,
};

/// Client settings a session may change; the second item is the name reported back to the
/// client in a ParameterStatus message, when PostgreSQL reports it.
const SESSION_SETTINGS: &[(&str, Option<&str>)] = &[
    ("application_name", Some("application_name")),
    ("datestyle", Some("DateStyle")),
    ("intervalstyle", Some("IntervalStyle")),
    ("timezone", Some("TimeZone")),
    ("client_encoding", Some("client_encoding")),
    (
        "standard_conforming_strings",
        Some("standard_conforming_strings"),
    ),
    ("extra_float_digits", None),
    ("search_path", None),
    ("statement_timeout", None),
    ("client_min_messages", None),
    ("bytea_output", None),
    ("lock_timeout", None),
    ("idle_in_transaction_session_timeout", None),
    ("default_transaction_read_only", None),
    ("default_transaction_isolation", None),
    ("transaction_isolation", None),
    ("jit", None),
    ("geqo", None),
    ("row_security", None),
    ("synchronize_seqscans", None),
    ("work_mem", None),
    ("maintenance_work_mem", None),
    ("enable_seqscan", None),
    ("max_parallel_workers_per_gather", None),
    ("idle_session_timeout", None),
    ("session_replication_role", None),
    ("vacuum_cost_delay", None),
];

/// Table functions a query may call: none of them reads files.
/// (`pg_options_to_table` is rewritten into an empty table before it is planned.)
const TABLE_FUNCTIONS: &[&str] = &[
    "generate_series",
    "range",
    "unnest",
    "pg_get_keywords",
    "pg_options_to_table",
];

/// What to do with one statement.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    /// A query, `SHOW`, `EXPLAIN`, a transaction or cursor statement: plan and run it.
    Run,
    /// A client setting for this session only.
    Set {
        /// Lower-case setting name.
        name: String,
        /// The value; `None` for `DEFAULT` / `RESET`.
        value: Option<String>,
        /// Name to report in ParameterStatus.
        report: Option<&'static str>,
    },
    /// Nothing to do but answer with this command tag.
    Reply(&'static str),
    /// Refused, with SQLSTATE and message.
    Refuse(&'static str, String),
}

/// Judge one parsed statement. `hidden` are tables that exist but the role may not read.
pub fn judge(stmt: &Statement, hidden: &BTreeSet<String>) -> Verdict {
    match stmt {
        Statement::Query(_) => check_relations(stmt, hidden),
        Statement::Explain { statement, .. } => match judge(statement, hidden) {
            Verdict::Run => Verdict::Run,
            Verdict::Refuse(c, m) => Verdict::Refuse(c, m),
            _ => Verdict::Refuse("0A000", "only queries can be explained".into()),
        },
        Statement::ShowVariable { .. }
        | Statement::ShowStatus { .. }
        | Statement::ShowTables { .. }
        | Statement::ShowColumns { .. }
        | Statement::ShowCatalogs { .. }
        | Statement::ShowSchemas { .. } => check_relations(stmt, hidden),
        Statement::StartTransaction { .. }
        | Statement::Commit { .. }
        | Statement::Rollback { .. } => Verdict::Run,
        Statement::Declare { stmts } => {
            for d in stmts {
                if let Some(q) = &d.for_query {
                    let v = check_relations(&Statement::Query(q.clone()), hidden);
                    if v != Verdict::Run {
                        return v;
                    }
                }
            }
            Verdict::Run
        }
        Statement::Fetch { .. } | Statement::Close { .. } => Verdict::Run,
        Statement::Discard { .. } => Verdict::Reply("DISCARD ALL"),
        // Nothing is ever written, so savepoints have nothing to keep.
        Statement::Savepoint { .. } => Verdict::Reply("SAVEPOINT"),
        Statement::ReleaseSavepoint { .. } => Verdict::Reply("RELEASE"),
        Statement::Deallocate { .. } => Verdict::Reply("DEALLOCATE"),
        Statement::Set(set) => judge_set(set),
        Statement::Reset(reset) => match &reset.reset {
            Reset::ConfigurationParameter(name) => {
                session_setting(&name.to_string().to_lowercase(), None)
            }
            // Every setting back to its default is what a new session has; DISCARD ALL does
            // the same for pooled connections.
            Reset::ALL => Verdict::Reply("RESET"),
        },
        Statement::Copy {
            source: CopySource::Table { table_name, .. },
            ..
        } if super::copy::is_copy_out(stmt) => {
            let last = table_name
                .0
                .last()
                .map(|p| p.to_string().trim_matches('"').to_string())
                .unwrap_or_default();
            if hidden.contains(&last) {
                Verdict::Refuse("42501", format!("permission denied for table {last}"))
            } else {
                check_relations(stmt, hidden)
            }
        }
        Statement::Copy { .. } if super::copy::is_copy_out(stmt) => check_relations(stmt, hidden),
        Statement::Copy { .. } => Verdict::Refuse(
            "42501",
            "COPY is allowed only out of a query or table TO STDOUT: the server is read-only \
             and does not read or write files"
                .into(),
        ),
        // Nothing is ever written, so a lock that only keeps writers out has nothing to do.
        Statement::Lock(lock)
            if lock
                .lock_mode
                .as_ref()
                .is_none_or(|m| matches!(m, LockTableMode::AccessShare)) =>
        {
            Verdict::Reply("LOCK TABLE")
        }
        other => {
            let word = other
                .to_string()
                .split_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" ")
                .to_uppercase();
            Verdict::Refuse(
                "25006",
                format!(
                    "cannot execute {word}: the kbcrm server is read-only; tables change only \
                     through `kbcrm run`"
                ),
            )
        }
    }
}

fn judge_set(set: &Set) -> Verdict {
    match set {
        Set::SingleAssignment {
            hivevar: false,
            variable,
            values,
            ..
        } => {
            let name = variable.to_string().to_lowercase();
            let value = match values.as_slice() {
                [] => None,
                [Expr::Identifier(i)] if i.value.eq_ignore_ascii_case("default") => None,
                vs => Some(vs.iter().map(literal_text).collect::<Vec<_>>().join(", ")),
            };
            session_setting(&name, value)
        }
        Set::SetTimeZone { value, .. } => session_setting("timezone", Some(literal_text(value))),
        Set::SetTransaction { .. } => Verdict::Reply("SET"),
        Set::SetNames { charset_name, .. } => {
            session_setting("client_encoding", Some(charset_name.value.clone()))
        }
        other => Verdict::Refuse(
            "42501",
            format!("{other} is not allowed on the kbcrm server"),
        ),
    }
}

fn session_setting(name: &str, value: Option<String>) -> Verdict {
    let Some((_, report)) = SESSION_SETTINGS.iter().find(|(n, _)| *n == name) else {
        return if name.starts_with("datafusion.") || name.contains('.') {
            Verdict::Refuse(
                "42501",
                format!(
                    "SET {name} is not allowed: engine and memory settings are fixed in \
                     kbcrm.yaml, not per client"
                ),
            )
        } else {
            Verdict::Refuse(
                "42704",
                format!("unrecognized configuration parameter \"{name}\""),
            )
        };
    };
    if name == "client_encoding"
        && let Some(v) = &value
        && !matches!(
            v.to_ascii_uppercase().replace('-', "").as_str(),
            "UTF8" | "UNICODE"
        )
    {
        return Verdict::Refuse(
            "22023",
            format!("client encoding \"{v}\" is not supported; the server speaks UTF8"),
        );
    }
    Verdict::Set {
        name: name.to_string(),
        value,
        report: *report,
    }
}

/// The text of a SET value: strings without quotes, identifiers and numbers as written.
fn literal_text(e: &Expr) -> String {
    match e {
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(s) | Value::DoubleQuotedString(s) => s.clone(),
            other => other.to_string(),
        },
        Expr::Identifier(i) => i.value.clone(),
        other => other.to_string(),
    }
}

struct Relations<'a> {
    hidden: &'a BTreeSet<String>,
}

impl Visitor for Relations<'_> {
    type Break = Verdict;

    fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<Verdict> {
        let last = relation
            .0
            .last()
            .map(|p| p.to_string().trim_matches('"').to_string())
            .unwrap_or_default();
        if self.hidden.contains(&last) {
            return ControlFlow::Break(Verdict::Refuse(
                "42501",
                format!("permission denied for table {last}"),
            ));
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<Verdict> {
        if let SetExpr::Select(select) = query.body.as_ref()
            && select.into.is_some()
        {
            return ControlFlow::Break(Verdict::Refuse(
                "25006",
                "cannot execute SELECT INTO: the kbcrm server is read-only".into(),
            ));
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<Verdict> {
        let name = match factor {
            TableFactor::Table {
                name,
                args: Some(_),
                ..
            } => Some(name.to_string()),
            TableFactor::Function { name, .. } => Some(name.to_string()),
            TableFactor::TableFunction { expr, .. } => Some(expr.to_string()),
            _ => None,
        };
        if let Some(n) = name {
            let bare = n
                .split('(')
                .next()
                .unwrap_or_default()
                .rsplit('.')
                .next()
                .unwrap_or_default()
                .trim_matches('"')
                .to_lowercase();
            if !TABLE_FUNCTIONS.contains(&bare.as_str()) {
                return ControlFlow::Break(Verdict::Refuse(
                    "42501",
                    format!(
                        "table function {bare} is not allowed: queries read warehouse tables only"
                    ),
                ));
            }
        }
        ControlFlow::Continue(())
    }
}

fn check_relations(stmt: &Statement, hidden: &BTreeSet<String>) -> Verdict {
    match stmt.visit(&mut Relations { hidden }) {
        ControlFlow::Break(v) => v,
        ControlFlow::Continue(()) => Verdict::Run,
    }
}

/// Catalogs that are always empty on the kbcrm server: warehouse columns have no defaults,
/// identity sequences or collations.
const EMPTY_CATALOGS: &[&str] = &["pg_attrdef", "pg_sequence", "pg_collation"];

/// Replace scalar subqueries over always-empty catalogs with NULL, which is what they return.
/// Client catalog queries (SQLAlchemy's column reflection) use them correlated inside `CASE`,
/// which the engine cannot plan. The subquery's parameters stay in the replacement (in a branch
/// never taken), so the statement keeps the parameters, and their types, the client binds.
pub fn simplify_catalog_subqueries(stmt: &mut Statement) {
    use datafusion::sql::sqlparser::ast::visit_expressions_mut;
    let _ = visit_expressions_mut(stmt, |e: &mut Expr| {
        let replace = match e {
            Expr::Subquery(q) => {
                let text = q.to_string();
                EMPTY_CATALOGS.iter().any(|c| text.contains(c))
            }
            // DataFusion's LIKE takes only the backslash as escape character; SQLAlchemy's
            // catalog queries use `ESCAPE '/'`. Rewrite the pattern to backslash escapes.
            Expr::Like {
                pattern,
                escape_char,
                ..
            }
            | Expr::ILike {
                pattern,
                escape_char,
                ..
            } => {
                if let Some(c) = escape_char.as_ref().and_then(|v| match &v.value {
                    Value::SingleQuotedString(s) if s.chars().count() == 1 && s != "\\" => {
                        s.chars().next()
                    }
                    _ => None,
                }) && let Some(p) = backslash_pattern(pattern, c)
                {
                    **pattern = p;
                    *escape_char = None;
                }
                false
            }
            // A CASE left with nothing but NULL results (its subqueries replaced above, as
            // expressions are visited inner first) is NULL, whatever its conditions ask.
            Expr::Case {
                conditions,
                else_result,
                ..
            } => {
                conditions.iter().all(|w| is_null_like(&w.result))
                    && else_result.as_deref().is_none_or(is_null_like)
            }
            _ => false,
        };
        if replace && let Some(expr) = null_keeping_parameters(e) {
            *e = expr;
        }
        ControlFlow::<()>::Continue(())
    });
}

/// `pattern` (written with escape character `c`) as a pattern with backslash escapes:
/// backslashes doubled, then `c` followed by a character turned into a backslash before it.
fn backslash_pattern(pattern: &Expr, c: char) -> Option<Expr> {
    use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
    use datafusion::sql::sqlparser::parser::Parser;
    let sql = format!(
        "regexp_replace(replace(({pattern}), '\\', '\\\\'), '\\x{{{:x}}}(.)', '\\\\\\1', 'g')",
        c as u32
    );
    Parser::new(&PostgreSqlDialect {})
        .try_with_sql(&sql)
        .ok()?
        .parse_expr()
        .ok()
}

/// Catalogs of indexes and constraints: always empty, since warehouse tables have neither.
const NO_INDEX_CATALOGS: &[&str] = &["pg_index", "pg_constraint"];

/// Replace derived tables over the index and constraint catalogs with empty ones of the same
/// columns. Client reflection queries (SQLAlchemy's primary keys and unique constraints)
/// unnest `int2vector` columns the engine cannot plan; the answer is no rows either way, since
/// warehouse tables have no indexes or constraints. The typed parameters stay in the
/// replacement, so the statement keeps its parameter list.
pub fn empty_index_catalog_queries(stmt: &mut Statement) {
    use datafusion::sql::sqlparser::ast::{SelectItem, SetExpr, TableFactor, VisitMut, VisitorMut};
    use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
    use datafusion::sql::sqlparser::parser::Parser;
    struct Empty;
    impl VisitorMut for Empty {
        type Break = ();
        fn pre_visit_table_factor(&mut self, t: &mut TableFactor) -> ControlFlow<()> {
            let TableFactor::Derived { subquery, .. } = t else {
                return ControlFlow::Continue(());
            };
            let text = subquery.to_string();
            if !NO_INDEX_CATALOGS.iter().any(|c| text.contains(c)) {
                return ControlFlow::Continue(());
            }
            let SetExpr::Select(select) = subquery.body.as_ref() else {
                return ControlFlow::Continue(());
            };
            let names: Option<Vec<String>> = select
                .projection
                .iter()
                .map(|item| match item {
                    SelectItem::ExprWithAlias { alias, .. } => Some(alias.value.clone()),
                    SelectItem::UnnamedExpr(Expr::Identifier(i)) => Some(i.value.clone()),
                    SelectItem::UnnamedExpr(Expr::CompoundIdentifier(parts)) => {
                        parts.last().map(|i| i.value.clone())
                    }
                    _ => None,
                })
                .collect();
            let (Some(names), Some(none)) = (
                names,
                null_keeping_parameters(&Expr::Subquery(subquery.clone())),
            ) else {
                return ControlFlow::Continue(());
            };
            let columns: Vec<String> = names
                .iter()
                .map(|n| format!("NULL AS {}", crate::sql::quote_ident(n)))
                .collect();
            let sql = format!("SELECT {} WHERE {none}", columns.join(", "));
            if let Ok(q) = Parser::new(&PostgreSqlDialect {})
                .try_with_sql(&sql)
                .and_then(|mut p| p.parse_query())
            {
                *subquery = q;
            }
            ControlFlow::Continue(())
        }
    }
    let _ = stmt.visit(&mut Empty);
}

fn is_null_like(e: &Expr) -> bool {
    matches!(e, Expr::Value(v) if matches!(v.value, Value::Null))
        || e.to_string().starts_with(NULL_WITH_PARAMETERS)
}

const NULL_WITH_PARAMETERS: &str = "CASE WHEN false AND ";

/// NULL, written so that it still names the typed parameters of `e`.
fn null_keeping_parameters(e: &Expr) -> Option<Expr> {
    use datafusion::sql::sqlparser::ast::visit_expressions;
    use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
    use datafusion::sql::sqlparser::parser::Parser;
    let mut params = Vec::new();
    let _ = visit_expressions(e, |p: &Expr| {
        if let Expr::Cast { expr, .. } = p
            && matches!(expr.as_ref(), Expr::Value(v) if matches!(v.value, Value::Placeholder(_)))
        {
            params.push(format!("({p}) IS NULL"));
        }
        ControlFlow::<()>::Continue(())
    });
    let text = if params.is_empty() {
        "NULL".to_string()
    } else {
        format!(
            "{NULL_WITH_PARAMETERS}{} THEN NULL END",
            params.join(" AND ")
        )
    };
    Parser::new(&PostgreSqlDialect {})
        .try_with_sql(&text)
        .and_then(|mut p| p.parse_expr())
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion_postgres::datafusion_pg_catalog::sql::PostgresCompatibilityParser;

    fn verdict(sql: &str) -> Verdict {
        let hidden: BTreeSet<String> = ["fact_payment".to_string()].into();
        let stmts = PostgresCompatibilityParser::new().parse(sql).unwrap();
        judge(&stmts[0], &hidden)
    }

    fn code(sql: &str) -> &'static str {
        match verdict(sql) {
            Verdict::Refuse(c, _) => c,
            other => panic!("{sql}: expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn queries_run_and_writes_are_refused() {
        assert_eq!(verdict("select 1"), Verdict::Run);
        assert_eq!(
            verdict("with a as (select 1) select * from a"),
            Verdict::Run
        );
        assert_eq!(verdict("begin"), Verdict::Run);
        for sql in [
            "insert into t values (1)",
            "update t set a = 1",
            "delete from t",
            "create table t (a int)",
            "create view v as select 1",
            "drop table fact_sales",
            "truncate fact_sales",
            "alter table t add column b int",
        ] {
            assert_eq!(code(sql), "25006", "{sql}");
        }
        assert_eq!(code("copy fact_sales to '/tmp/x.csv'"), "42501");
        assert_eq!(code("copy fact_sales from stdin"), "42501");
        assert_eq!(code("copy fact_payment to stdout"), "42501");
        assert_eq!(code("copy (select * from fact_payment) to stdout"), "42501");
        assert_eq!(verdict("copy fact_sales to stdout"), Verdict::Run);
        assert_eq!(
            verdict("copy (select 1) to stdout (format binary)"),
            Verdict::Run
        );
        assert_eq!(
            verdict("lock table fact_sales in access share mode"),
            Verdict::Reply("LOCK TABLE")
        );
        assert_eq!(code("lock table fact_sales in exclusive mode"), "25006");
        assert_eq!(code("select * from read_csv('/etc/passwd')"), "42501");
        assert_eq!(code("select 1 as a into t"), "25006");
        assert_eq!(verdict("select * from generate_series(1, 3)"), Verdict::Run);
    }

    #[test]
    fn ungranted_tables_are_refused_everywhere() {
        for sql in [
            "select * from fact_payment",
            "select * from fact_sales s join fact_payment p on s.order_id = p.order_id",
            "select * from fact_sales where order_id in (select order_id from public.fact_payment)",
            "with p as (select * from fact_payment) select * from p",
            "explain select * from fact_payment",
        ] {
            assert_eq!(code(sql), "42501", "{sql}");
        }
    }

    #[test]
    fn subqueries_over_empty_catalogs_become_null_and_keep_their_parameters() {
        let sql = "SELECT a.attname, CASE WHEN a.atthasdef THEN (SELECT pg_get_expr(d.adbin, d.adrelid) \
                   FROM pg_catalog.pg_attrdef d WHERE d.adrelid = a.attrelid) ELSE NULL END AS dflt, \
                   CASE WHEN a.attcollation != $1::INTEGER AND (SELECT t.typcollation FROM pg_type t \
                   WHERE t.oid = a.atttypid) != a.attcollation THEN (SELECT json_build_object($2::VARCHAR, \
                   c.collname) FROM pg_catalog.pg_collation c WHERE c.oid = a.attcollation) ELSE NULL END AS coll \
                   FROM pg_catalog.pg_attribute a WHERE a.attnum > $3::SMALLINT";
        let mut stmt = PostgresCompatibilityParser::new()
            .parse(sql)
            .unwrap()
            .remove(0);
        simplify_catalog_subqueries(&mut stmt);
        let text = stmt.to_string();
        assert!(
            !text.contains("pg_attrdef") && !text.contains("pg_collation"),
            "{text}"
        );
        assert!(!text.contains("typcollation"), "{text}");
        for p in ["$1", "$2", "$3"] {
            assert!(text.contains(p), "{p} lost: {text}");
        }
    }

    #[test]
    fn session_settings() {
        assert_eq!(
            verdict("SET application_name = 'bi'"),
            Verdict::Set {
                name: "application_name".into(),
                value: Some("bi".into()),
                report: Some("application_name")
            }
        );
        assert!(matches!(
            verdict("SET statement_timeout TO 1000"),
            Verdict::Set { value: Some(v), .. } if v == "1000"
        ));
        assert!(matches!(
            verdict("SET TIME ZONE 'UTC'"),
            Verdict::Set { .. }
        ));
        assert_eq!(code("SET datafusion.execution.batch_size = 1"), "42501");
        assert!(matches!(
            verdict("RESET statement_timeout"),
            Verdict::Set { value: None, .. }
        ));
        assert_eq!(code("RESET datafusion.execution.batch_size"), "42501");
        assert_eq!(code("SET work_mem_of_doom = 1"), "42704");
    }
}
