//! A query's way through the query pool ([`super::pool`]): its text measured, parsed and judged,
//! its plan made, its rows computed and encoded there, and streamed to the connection through a
//! channel of two batches, so a slow client holds back the computation rather than piling up
//! rows. Dropping the rows stops the computation.

use std::collections::BTreeSet;
use std::sync::Arc;

use datafusion::arrow::datatypes::DataType;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::error::DataFusionError;
use datafusion::execution::context::SQLOptions;
use datafusion::logical_expr::{Expr as PlanExpr, LogicalPlan};
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::{
    Expr, FunctionArguments, Query, SelectItem, SetExpr, Statement,
};
use datafusion::sql::sqlparser::parser::ParserError;
use datafusion_postgres::arrow_pg::datatypes::{arrow_schema_to_pg_fields, encode_recordbatch};
use futures::{Stream, StreamExt};
use pgwire::api::portal::Format;
use pgwire::api::results::FieldInfo;
use pgwire::error::{PgWireError, PgWireResult};
use pgwire::messages::data::DataRow;
use pgwire::types::format::FormatOptions;

use super::Shared;
use super::auth::pg_error;
use super::complexity;
use super::policy::{self, Verdict};
use super::pool::{Job, QueryPool};

/// Plans a client may run: queries only, whatever the statement said.
fn read_only() -> SQLOptions {
    SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
}

/// An engine error with PostgreSQL's SQLSTATE for it.
pub fn engine_error(e: DataFusionError) -> PgWireError {
    super::queries::engine_error(PgWireError::ApiError(Box::new(e)))
}

/// One statement of a query string, judged and ready to run.
pub struct Prepared {
    /// The statement, rewritten for the engine when it runs.
    pub stmt: Statement,
    /// What to do with it.
    pub verdict: Verdict,
    /// The names PostgreSQL gives its columns, where they differ from the engine's.
    pub names: Vec<Option<String>>,
}

/// The statements of `sql`, each judged by the policy and, when it runs, rewritten for the
/// engine. Refused with 54001 before parsing when it nests too deep or is too long.
pub fn prepare(
    shared: &Shared,
    sql: &str,
    hidden: &BTreeSet<String>,
) -> PgWireResult<Vec<Prepared>> {
    complexity::check(sql).map_err(|e| pg_error("ERROR", "54001", e.to_string()))?;
    let statements = shared.parser.parse(sql).map_err(|e| match e {
        ParserError::RecursionLimitExceeded => pg_error(
            "ERROR",
            "54001",
            "statement too complex: its parentheses or subqueries nest too deep",
        ),
        e => pg_error("ERROR", "42601", format!("syntax error: {e}")),
    })?;
    // Column names come from the statements as written: the compatibility rewrites rename
    // some functions (`current_user` runs as `session_user`).
    let written = column_names_of(sql);
    let count = statements.len();
    Ok(statements
        .into_iter()
        .enumerate()
        .map(|(i, mut stmt)| {
            let verdict = policy::judge(&stmt, hidden);
            if verdict == Verdict::Run {
                policy::simplify_catalog_subqueries(&mut stmt);
                policy::empty_index_catalog_queries(&mut stmt);
                super::pgcompat::rewrite(&mut stmt);
                alias_duplicate_columns(&mut stmt);
            }
            let names = match &written {
                Some(all) if all.len() == count => all[i].clone(),
                _ => Vec::new(),
            };
            Prepared {
                stmt,
                verdict,
                names,
            }
        })
        .collect())
}

/// The PostgreSQL column names of each statement in `sql` as written (see [`column_names`]);
/// `None` when the text does not parse as plain PostgreSQL.
pub fn column_names_of(sql: &str) -> Option<Vec<Vec<Option<String>>>> {
    use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
    let statements =
        datafusion::sql::sqlparser::parser::Parser::parse_sql(&PostgreSqlDialect {}, sql).ok()?;
    Some(statements.iter().map(column_names).collect())
}

/// Give the unaliased items of a query's select list that the engine would name alike
/// (`select count(*), count(*)`, or `current_user, session_user`, which run as one function)
/// aliases of their own: PostgreSQL allows such columns, the engine's projections need unique
/// names. The client sees PostgreSQL's names either way ([`fields`]).
fn alias_duplicate_columns(stmt: &mut Statement) {
    use datafusion::sql::sqlparser::ast::Ident;
    let Statement::Query(q) = stmt else {
        return;
    };
    let SetExpr::Select(select) = q.body.as_mut() else {
        return;
    };
    let mut seen = std::collections::HashMap::<String, usize>::new();
    for item in &select.projection {
        if let SelectItem::UnnamedExpr(e) = item {
            *seen.entry(e.to_string()).or_default() += 1;
        }
    }
    for (i, item) in select.projection.iter_mut().enumerate() {
        if let SelectItem::UnnamedExpr(e) = item
            && seen.get(&e.to_string()).is_some_and(|n| *n > 1)
        {
            *item = SelectItem::ExprWithAlias {
                expr: e.clone(),
                alias: Ident::with_quote('"', format!("{e} #{}", i + 1)),
            };
        }
    }
}

/// Whether kbcrm plans and runs `stmt` itself (a query), rather than datafusion-postgres's
/// hooks answering it (`SHOW` of a setting, cursors, transactions).
pub fn is_query(stmt: &Statement) -> bool {
    matches!(
        stmt,
        Statement::Query(_)
            | Statement::Explain { .. }
            | Statement::ShowTables { .. }
            | Statement::ShowColumns { .. }
    ) || super::copy::is_copy_out(stmt)
}

/// The plan of a query in `ctx` (of the query a `COPY ... TO STDOUT` reads), checked to be
/// read-only.
pub async fn plan(ctx: &SessionContext, stmt: Statement) -> PgWireResult<LogicalPlan> {
    let stmt = if super::copy::is_copy_out(&stmt) {
        super::copy::query_of(&stmt)?.0
    } else {
        stmt
    };
    let plan = ctx
        .state()
        .statement_to_plan(DfStatement::Statement(Box::new(stmt)))
        .await
        .map_err(engine_error)?;
    read_only().verify_plan(&plan).map_err(engine_error)?;
    Ok(plan)
}

/// The columns of `plan`'s result as a client sees them: named as PostgreSQL names them
/// (`names`, from [`column_names`]: `count`, `sum`, `?column?`), encoded in `format`.
pub fn fields(
    plan: &LogicalPlan,
    names: &[Option<String>],
    format: &Format,
    options: Option<Arc<FormatOptions>>,
) -> PgWireResult<Vec<FieldInfo>> {
    let fields = arrow_schema_to_pg_fields(plan.schema().as_arrow(), format, options)?;
    if names.len() != fields.len() {
        return Ok(fields);
    }
    Ok(fields
        .into_iter()
        .zip(names)
        .map(|(f, name)| match name {
            Some(n) if n != f.name() => FieldInfo::new(
                n.clone(),
                f.table_id(),
                f.column_id(),
                f.datatype().clone(),
                f.format(),
            )
            .with_format_options(f.format_options().clone())
            .with_type_size(f.type_size())
            .with_type_modifier(f.type_modifier()),
            _ => f,
        })
        .collect())
}

/// The rows of `plan` run in `ctx`, computed on the pool once the first is asked for (a
/// query string's statements run one after another, as PostgreSQL runs them).
pub fn rows(
    pool: Arc<QueryPool>,
    ctx: Arc<SessionContext>,
    plan: LogicalPlan,
    fields: Arc<Vec<FieldInfo>>,
) -> impl Stream<Item = PgWireResult<DataRow>> + Send + 'static {
    type Chunk = PgWireResult<Vec<DataRow>>;
    let start = async move {
        let (tx, rx) = tokio::sync::mpsc::channel::<Chunk>(2);
        // Cancelled when the rows are dropped (the statement ended, timed out or was
        // cancelled): every operator of the plan stops at its next batch.
        let stop = tokio_util::sync::CancellationToken::new();
        let stopper = stop.clone().drop_guard();
        let job: Job<()> = pool.spawn(async move {
            let stream = async {
                let df = ctx.execute_logical_plan(plan).await?;
                let task = Arc::new(df.task_ctx());
                let physical = df.create_physical_plan().await?;
                let physical = super::stop::stoppable(physical, &stop)?;
                datafusion::physical_plan::execute_stream(physical, task)
            }
            .await;
            let mut stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(Err(engine_error(e))).await;
                    return;
                }
            };
            while let Some(batch) = stream.next().await {
                let chunk = match batch {
                    Ok(b) => {
                        encode_recordbatch(fields.clone(), b).collect::<PgWireResult<Vec<_>>>()
                    }
                    Err(e) => Err(engine_error(e)),
                };
                let failed = chunk.is_err();
                if tx.send(chunk).await.is_err() || failed {
                    return;
                }
            }
        });
        futures::stream::unfold(Some((rx, job, stopper)), |state| async move {
            let (mut rx, job, stopper) = state?;
            match rx.recv().await {
                Some(chunk) => Some((chunk, Some((rx, job, stopper)))),
                // The channel closes when the job ends: normally, or by a panic that must
                // not pass for the end of the rows.
                None => match job.await {
                    Ok(()) => None,
                    Err(e) => Some((Err(e), None)),
                },
            }
        })
    };
    futures::stream::once(start)
        .flatten()
        .flat_map(|chunk: Chunk| match chunk {
            Ok(rows) => futures::stream::iter(rows.into_iter().map(Ok)).left_stream(),
            Err(e) => futures::stream::iter(vec![Err(e)]).right_stream(),
        })
}

/// The types of a plan's parameters `$1, $2, ...` in order, as the engine inferred them or as
/// a cast of the parameter names them.
pub fn parameter_types(plan: &LogicalPlan) -> PgWireResult<Vec<Option<DataType>>> {
    let mut types = plan.get_parameter_types().map_err(engine_error)?;
    if types.values().any(Option::is_none) {
        let _ = plan.apply(|node| {
            for expr in node.expressions() {
                let _ = expr.apply(|e| {
                    if let PlanExpr::Cast(cast) = e
                        && let PlanExpr::Placeholder(p) = cast.expr.as_ref()
                        && let Some(slot @ None) = types.get_mut(&p.id)
                    {
                        *slot = Some(cast.field.data_type().clone());
                    }
                    Ok(TreeNodeRecursion::Continue)
                });
            }
            Ok(TreeNodeRecursion::Continue)
        });
    }
    let mut ordered: Vec<(u32, Option<DataType>)> = types
        .into_iter()
        .map(|(id, t)| {
            (
                id.trim_start_matches('$')
                    .parse::<u32>()
                    .unwrap_or(u32::MAX),
                t,
            )
        })
        .collect();
    ordered.sort_by_key(|(n, _)| *n);
    Ok(ordered.into_iter().map(|(_, t)| t).collect())
}

/// The names PostgreSQL gives the columns of a query's select list, where it names them
/// differently from the engine (`count(*)` is `count`, `1 + 1` is `?column?`); `None` keeps
/// the engine's name. Empty when the list has a `*` (its columns cannot be matched up).
pub fn column_names(stmt: &Statement) -> Vec<Option<String>> {
    use datafusion::sql::sqlparser::ast::CopySource;
    let query = match stmt {
        Statement::Query(q)
        | Statement::Copy {
            source: CopySource::Query(q),
            ..
        } => q,
        _ => return Vec::new(),
    };
    let Some(items) = select_list(query) else {
        return Vec::new();
    };
    let mut names = Vec::with_capacity(items.len());
    for item in items {
        match item {
            SelectItem::UnnamedExpr(e) => names.push(Some(column_name(e))),
            SelectItem::ExprWithAlias { .. } => names.push(None),
            _ => return Vec::new(),
        }
    }
    names
}

/// The select list that names a query's columns: of its first SELECT.
fn select_list(query: &Query) -> Option<&Vec<SelectItem>> {
    let mut body = query.body.as_ref();
    loop {
        match body {
            SetExpr::Select(s) => return Some(&s.projection),
            SetExpr::Query(q) => body = q.body.as_ref(),
            SetExpr::SetOperation { left, .. } => body = left.as_ref(),
            _ => return None,
        }
    }
}

/// PostgreSQL's name for an unaliased select-list expression (its `FigureColname`).
fn column_name(e: &Expr) -> String {
    figure(e).unwrap_or_else(|| "?column?".to_string())
}

fn figure(e: &Expr) -> Option<String> {
    match e {
        Expr::Identifier(i) => Some(i.value.clone()),
        Expr::CompoundIdentifier(parts) => parts.last().map(|i| i.value.clone()),
        Expr::Nested(inner) => figure(inner),
        Expr::Function(f) => {
            let name = f.name.0.last()?.to_string();
            let name = name.trim_matches('"').to_string();
            if let FunctionArguments::None = f.args
                && matches!(
                    name.to_lowercase().as_str(),
                    "current_user" | "session_user" | "user" | "current_role"
                )
            {
                return Some(name.to_lowercase());
            }
            Some(if f.name.0.last()?.to_string().starts_with('"') {
                name
            } else {
                name.to_lowercase()
            })
        }
        Expr::Cast {
            expr, data_type, ..
        } => figure(expr).or_else(|| {
            let t = data_type.to_string().to_lowercase();
            Some(pg_type_name(&t))
        }),
        Expr::Case { .. } => Some("case".into()),
        Expr::Exists { .. } => Some("exists".into()),
        Expr::Array(_) => Some("array".into()),
        Expr::Extract { .. } => Some("extract".into()),
        Expr::Substring { .. } => Some("substring".into()),
        Expr::Position { .. } => Some("position".into()),
        Expr::Trim { .. } => Some("btrim".into()),
        Expr::Overlay { .. } => Some("overlay".into()),
        Expr::Ceil { .. } => Some("ceil".into()),
        Expr::Floor { .. } => Some("floor".into()),
        Expr::Interval(_) => Some("interval".into()),
        Expr::TypedString(t) => Some(pg_type_name(&t.data_type.to_string().to_lowercase())),
        Expr::AtTimeZone { .. } => Some("timezone".into()),
        _ => None,
    }
}

/// PostgreSQL's internal name of a type as a column is named after it (`int` is `int4`).
fn pg_type_name(t: &str) -> String {
    let base = t.split('(').next().unwrap_or(t).trim();
    match base {
        "int" | "integer" | "int4" => "int4",
        "bigint" | "int8" => "int8",
        "smallint" | "int2" => "int2",
        "real" | "float4" => "float4",
        "double precision" | "float8" | "double" | "float" => "float8",
        "boolean" | "bool" => "bool",
        "character varying" | "varchar" => "varchar",
        "character" | "char" | "bpchar" => "bpchar",
        "decimal" | "numeric" => "numeric",
        "timestamp" | "timestamp without time zone" => "timestamp",
        "timestamptz" | "timestamp with time zone" => "timestamptz",
        other => other,
    }
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(sql: &str) -> Vec<Option<String>> {
        column_names_of(sql).unwrap().remove(0)
    }

    fn s(n: &str) -> Option<String> {
        Some(n.to_string())
    }

    #[test]
    fn columns_are_named_as_postgresql_names_them() {
        assert_eq!(
            names("select count(*), SUM(x), t.a, b, 1 + 1, 'x', x::int, 1::int, y as z from t"),
            vec![
                s("count"),
                s("sum"),
                s("a"),
                s("b"),
                s("?column?"),
                s("?column?"),
                s("x"),
                s("int4"),
                None
            ]
        );
        assert_eq!(
            names("select case when a then 1 end, coalesce(a, b), current_user, exists(select 1)"),
            vec![s("case"), s("coalesce"), s("current_user"), s("exists")]
        );
        assert!(names("select *, count(*) from t").is_empty());
        assert_eq!(
            names("select count(*) from t union all select 1"),
            vec![s("count")]
        );
    }
}
