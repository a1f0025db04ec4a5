//! Rewrites of client catalog queries into forms the engine plans.

use super::*;

/// Rewrite the constructs of client catalog queries the engine cannot plan:
/// - `ARRAY(SELECT x ...)` becomes `(SELECT array_agg(x) FROM (SELECT x ...))`;
/// - a table function over an options column (`pg_options_to_table(srvoptions)`, which the
///   engine cannot call with a column) becomes an empty table of its columns: no object here
///   has options;
/// - `to_regclass('name')` becomes a lookup in `pg_class`.
pub fn rewrite(stmt: &mut Statement) {
    let catalogs = reads_catalogs(stmt);
    let _ = visit_expressions_mut(stmt, |e: &mut Expr| {
        if let Some(new) = array_of_subquery(e)
            .or_else(|| to_regclass(e))
            .or_else(|| catalogs.then(|| null_array_comparison(e)).flatten())
        {
            *e = new;
        }
        catalog_expression(e, catalogs);
        // PostgreSQL's one-byte `"char"` type, which catalog queries cast codes to: text.
        if let Expr::Cast { data_type, .. } = e
            && let datafusion::sql::sqlparser::ast::DataType::Custom(name, args) = data_type
            && args.is_empty()
            && name.to_string() == "\"char\""
        {
            *data_type = datafusion::sql::sqlparser::ast::DataType::Text;
        }
        ControlFlow::<()>::Continue(())
    });
    struct Options;
    impl VisitorMut for Options {
        type Break = ();
        fn pre_visit_table_factor(&mut self, t: &mut TableFactor) -> ControlFlow<()> {
            // `UNNEST(c.evttags) AS t(x)` of an always-NULL catalog array: no rows.
            if let TableFactor::UNNEST {
                alias, array_exprs, ..
            } = t
                && let [arg] = array_exprs.as_slice()
                && is_null_array_column(arg)
            {
                let alias = alias.take();
                let column = alias
                    .as_ref()
                    .map(|a| match a.columns.first() {
                        Some(c) => c.name.value.clone(),
                        None => a.name.value.clone(),
                    })
                    .unwrap_or_else(|| "unnest".into());
                if let Ok(q) = parse_query(&format!(
                    "SELECT CAST(NULL AS TEXT) AS {} WHERE false",
                    crate::sql::quote_ident(&column)
                )) {
                    *t = TableFactor::Derived {
                        lateral: false,
                        subquery: Box::new(q),
                        alias,
                        sample: None,
                    };
                }
                return ControlFlow::Continue(());
            }
            let name = match t {
                TableFactor::Table {
                    name,
                    args: Some(_),
                    ..
                }
                | TableFactor::Function { name, .. } => name.to_string(),
                _ => return ControlFlow::Continue(()),
            };
            let bare = name.rsplit('.').next().unwrap_or_default().to_lowercase();
            let empty = match bare.as_str() {
                "pg_options_to_table" => Some(
                    "SELECT CAST(NULL AS TEXT) AS option_name, CAST(NULL AS TEXT) AS \
                     option_value WHERE false"
                        .to_string(),
                ),
                // `unnest(c.reloptions)` and the like: those arrays are always NULL here.
                "unnest" if unnests_null_array(t) => {
                    // A one-column function's alias names its column too (`unnest(a) x`).
                    let column = match t {
                        TableFactor::Table { alias: Some(a), .. }
                        | TableFactor::Function { alias: Some(a), .. }
                            if a.columns.is_empty() =>
                        {
                            a.name.value.clone()
                        }
                        _ => "unnest".to_string(),
                    };
                    Some(format!(
                        "SELECT CAST(NULL AS TEXT) AS {} WHERE false",
                        crate::sql::quote_ident(&column)
                    ))
                }
                _ => None,
            };
            if let Some(sql) = empty
                && let Ok(q) = parse_query(&sql)
            {
                let alias = match t {
                    TableFactor::Table { alias, .. } | TableFactor::Function { alias, .. } => {
                        alias.take()
                    }
                    _ => None,
                };
                *t = TableFactor::Derived {
                    lateral: false,
                    subquery: Box::new(q),
                    alias,
                    sample: None,
                };
            }
            ControlFlow::Continue(())
        }
    }
    let _ = stmt.visit(&mut Options);
    qualify_extra_tables(stmt);
    if catalogs {
        aggregate_scalar_subqueries(stmt);
    }
}

/// Rewrites of expressions in catalog queries (`catalogs`: the statement reads a catalog):
/// - a test of an always-NULL array for NOT NULL is false, and a CASE branch that is never
///   taken is dropped (pg_dump's `CASE WHEN pr.prattrs IS NOT NULL THEN (SELECT ... FROM
///   generate_series(0, array_upper(pr.prattrs, 1)))`, which the engine cannot plan);
/// - `typname[0]` (a `name`'s first character) is `substr(typname, 1, 1)`;
/// - a column cast to `oid` or a `reg*` type is a TRY_CAST: the emulation keeps some such
///   columns as names (pg_dump's `oprcode::oid`), and no system object is dumped anyway.
pub(super) fn catalog_expression(e: &mut Expr, catalogs: bool) {
    use datafusion::sql::sqlparser::ast::{AccessExpr, CastKind, Subscript, Value};
    if catalogs
        && let Expr::IsNotNull(inner) = e
        && is_null_array_column(inner)
    {
        *e = Expr::Value(Value::Boolean(false).into());
        return;
    }
    if let Expr::Case {
        conditions,
        else_result,
        ..
    } = e
    {
        let never = |c: &Expr| matches!(c, Expr::Value(v) if v.value == Value::Boolean(false));
        if conditions.iter().any(|w| never(&w.condition)) {
            conditions.retain(|w| !never(&w.condition));
            if conditions.is_empty() {
                *e = else_result
                    .take()
                    .map(|b| *b)
                    .unwrap_or(Expr::Value(Value::Null.into()));
            }
        }
        return;
    }
    if !catalogs {
        return;
    }
    if let Expr::CompoundFieldAccess { root, access_chain } = e
        && matches!(root.as_ref(), Expr::Identifier(i) if i.value == "typname")
        && let [AccessExpr::Subscript(Subscript::Index { index })] = access_chain.as_slice()
        && index.to_string() == "0"
        && let Ok(first) = Parser::new(&PostgreSqlDialect {})
            .try_with_sql(&format!("substr({root}, 1, 1)"))
            .and_then(|mut p| p.parse_expr())
    {
        *e = first;
        return;
    }
    if let Expr::Cast {
        kind,
        expr,
        data_type,
        ..
    } = e
        && !matches!(expr.as_ref(), Expr::Value(_))
    {
        let target = data_type.to_string().to_lowercase();
        let target = target.trim_start_matches("pg_catalog.");
        if matches!(
            target,
            "oid"
                | "regproc"
                | "regprocedure"
                | "regtype"
                | "regclass"
                | "regnamespace"
                | "regrole"
        ) {
            *kind = CastKind::TryCast;
        }
    }
}

/// Whether a statement reads a system catalog (`pg_*`, `pg_catalog.*`, `information_schema.*`).
pub(super) fn reads_catalogs(stmt: &Statement) -> bool {
    use datafusion::sql::sqlparser::ast::{ObjectName, visit_relations};
    visit_relations(stmt, |r: &ObjectName| {
        let text = r.to_string().to_lowercase();
        let last = text.rsplit('.').next().unwrap_or_default();
        if last.starts_with("pg_")
            || text.starts_with("pg_catalog.")
            || text.starts_with("information_schema.")
        {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .is_break()
}

/// Aggregate functions, which make a scalar subquery one row already.
pub(super) const AGGREGATES: &[&str] = &[
    "count",
    "sum",
    "min",
    "max",
    "avg",
    "array_agg",
    "string_agg",
    "bool_and",
    "bool_or",
    "every",
];

/// Scalar subqueries of one plain column as `(SELECT max(x) ...)`. In catalog queries they look
/// an object up by its oid (one row or none), often correlated, and the engine decorrelates only
/// aggregated ones; the answer is the same.
pub(super) fn aggregate_scalar_subqueries(stmt: &mut Statement) {
    use datafusion::sql::sqlparser::ast::{GroupByExpr, SelectItem, SetExpr};
    let _ = visit_expressions_mut(stmt, |e: &mut Expr| {
        if let Expr::Subquery(q) = e
            && q.limit_clause.is_none()
            && q.order_by.is_none()
            && let SetExpr::Select(select) = q.body.as_mut()
            && select.distinct.is_none()
            && select.having.is_none()
            && matches!(&select.group_by, GroupByExpr::Expressions(g, m) if g.is_empty() && m.is_empty())
            && let [item] = select.projection.as_mut_slice()
        {
            let (value, alias) = match item {
                SelectItem::UnnamedExpr(v) => (v.clone(), None),
                SelectItem::ExprWithAlias { expr, alias } => (expr.clone(), Some(alias.clone())),
                _ => return ControlFlow::Continue(()),
            };
            let text = value.to_string().to_lowercase();
            if AGGREGATES.iter().any(|a| text.contains(&format!("{a}("))) {
                return ControlFlow::Continue(());
            }
            if let Ok(max) = Parser::new(&PostgreSqlDialect {})
                .try_with_sql(&format!("max({value})"))
                .and_then(|mut p| p.parse_expr())
            {
                *item = match alias {
                    Some(alias) => SelectItem::ExprWithAlias { expr: max, alias },
                    None => SelectItem::UnnamedExpr(max),
                };
            }
        }
        ControlFlow::<()>::Continue(())
    });
}

/// A comparison of an always-NULL catalog array with an array literal (`pol.polroles =
/// '{0}'`): NULL, as PostgreSQL answers it.
pub(super) fn null_array_comparison(e: &Expr) -> Option<Expr> {
    use datafusion::sql::sqlparser::ast::BinaryOperator;
    let null = || {
        Parser::new(&PostgreSqlDialect {})
            .try_with_sql(NULL_BOOLEAN)
            .and_then(|mut p| p.parse_expr())
            .ok()
    };
    let (left, right) = match e {
        Expr::BinaryOp {
            left,
            op: BinaryOperator::Eq | BinaryOperator::NotEq,
            right,
        } => (left, right),
        // `x = ANY(c.polroles)`, which the compatibility rewrites make `array_has(...)`.
        Expr::AnyOp { right, .. } | Expr::AllOp { right, .. } => {
            return is_null_array_column(right).then(null).flatten();
        }
        Expr::Function(f)
            if function_name(e).is_some_and(|n| n == "array_has" || n == "array_contains") =>
        {
            let FunctionArguments::List(list) = &f.args else {
                return None;
            };
            return match list.args.first() {
                Some(FunctionArg::Unnamed(FunctionArgExpr::Expr(a))) if is_null_array_column(a) => {
                    null()
                }
                _ => None,
            };
        }
        _ => return None,
    };
    let is_text = |x: &Expr| matches!(x, Expr::Value(v) if v.value.to_string().starts_with('\''));
    if (is_null_array_column(left) && is_text(right))
        || (is_null_array_column(right) && is_text(left))
    {
        null()
    } else {
        None
    }
}

/// How a NULL boolean is written by the rewrites here.
pub(super) const NULL_BOOLEAN: &str = "CAST(NULL AS BOOLEAN)";

/// Whether `x` is a column of one of the always-NULL catalog arrays.
pub(super) fn is_null_array_column(x: &Expr) -> bool {
    let x = match x {
        Expr::Nested(inner) => inner.as_ref(),
        other => other,
    };
    let column = match x {
        Expr::Identifier(i) => &i.value,
        Expr::CompoundIdentifier(parts) => match parts.last() {
            Some(i) => &i.value,
            None => return false,
        },
        _ => return false,
    };
    NULL_ARRAYS.iter().any(|(_, c)| c == column)
}

/// Whether a FROM-clause `unnest(...)` unnests one of the catalog arrays that are always NULL.
pub(super) fn unnests_null_array(t: &TableFactor) -> bool {
    let arg = match t {
        TableFactor::Table {
            args: Some(args), ..
        } => match args.args.as_slice() {
            [FunctionArg::Unnamed(FunctionArgExpr::Expr(e))] => e.clone(),
            _ => return false,
        },
        TableFactor::Function { args, .. } => match args.as_slice() {
            [FunctionArg::Unnamed(FunctionArgExpr::Expr(e))] => e.clone(),
            _ => return false,
        },
        _ => return false,
    };
    let column = match &arg {
        Expr::Identifier(i) => i.value.clone(),
        Expr::CompoundIdentifier(parts) => {
            parts.last().map(|i| i.value.clone()).unwrap_or_default()
        }
        _ => return false,
    };
    NULL_ARRAYS.iter().any(|(_, c)| *c == column)
}

/// Unqualified names of the catalogs added here, as `pg_catalog.name` (the engine looks for
/// unqualified names in `public`; the emulation qualifies only its own).
pub(super) fn qualify_extra_tables(stmt: &mut Statement) {
    use datafusion::sql::sqlparser::ast::{Ident, ObjectName, ObjectNamePart};
    let names: Vec<&str> = extra_tables().iter().map(|(n, _)| *n).collect();
    let _ = datafusion::sql::sqlparser::ast::visit_relations_mut(stmt, |r: &mut ObjectName| {
        if let [ObjectNamePart::Identifier(i)] = r.0.as_slice()
            && names.contains(&i.value.as_str())
        {
            *r = ObjectName(vec![
                ObjectNamePart::Identifier(Ident::new("pg_catalog")),
                ObjectNamePart::Identifier(i.clone()),
            ]);
        }
        ControlFlow::<()>::Continue(())
    });
}

pub(super) fn parse_query(sql: &str) -> std::result::Result<Query, ()> {
    Parser::new(&PostgreSqlDialect {})
        .try_with_sql(sql)
        .and_then(|mut p| p.parse_query())
        .map(|q| *q)
        .map_err(|_| ())
}

pub(super) fn function_name(e: &Expr) -> Option<String> {
    match e {
        Expr::Function(f) => Some(
            f.name
                .0
                .last()?
                .to_string()
                .trim_matches('"')
                .to_lowercase(),
        ),
        _ => None,
    }
}

pub(super) fn array_of_subquery(e: &Expr) -> Option<Expr> {
    let Expr::Function(f) = e else {
        return None;
    };
    if function_name(e)? != "array" {
        return None;
    }
    let FunctionArguments::Subquery(q) = &f.args else {
        return None;
    };
    // A subquery filtered by a comparison with an always-NULL array has no rows.
    if let datafusion::sql::sqlparser::ast::SetExpr::Select(select) = q.body.as_ref()
        && select
            .selection
            .as_ref()
            .is_some_and(|w| w.to_string() == NULL_BOOLEAN)
    {
        return Some(Expr::Value(
            datafusion::sql::sqlparser::ast::Value::Null.into(),
        ));
    }
    if let Some(direct) = aggregated(q) {
        return Some(direct);
    }
    let sql = format!("(SELECT array_agg(__kbcrm_a.__v) FROM ({q}) AS __kbcrm_a(__v))");
    Parser::new(&PostgreSqlDialect {})
        .try_with_sql(&sql)
        .and_then(|mut p| p.parse_expr())
        .ok()
}

/// `ARRAY(SELECT x FROM ... WHERE ... ORDER BY y)` as `(SELECT array_agg(x ORDER BY y) FROM
/// ... WHERE ...)`: the same array, and a correlated subquery the engine can decorrelate (a
/// derived table in between hides the correlation from it). `None` when the subquery groups,
/// limits or is not one plain SELECT of one column.
pub(super) fn aggregated(q: &Query) -> Option<Expr> {
    use datafusion::sql::sqlparser::ast::{GroupByExpr, OrderByKind, SelectItem, SetExpr};
    if q.limit_clause.is_some() || q.fetch.is_some() || q.with.is_some() {
        return None;
    }
    let SetExpr::Select(select) = q.body.as_ref() else {
        return None;
    };
    let plain_group =
        matches!(&select.group_by, GroupByExpr::Expressions(e, m) if e.is_empty() && m.is_empty());
    if select.distinct.is_some() || !plain_group || select.having.is_some() {
        return None;
    }
    let [item] = select.projection.as_slice() else {
        return None;
    };
    let (value, alias) = match item {
        SelectItem::UnnamedExpr(e) => (e.clone(), None),
        SelectItem::ExprWithAlias { expr, alias } => (expr.clone(), Some(alias.value.clone())),
        _ => return None,
    };
    let order = match q.order_by.as_ref().map(|o| &o.kind) {
        None => String::new(),
        Some(OrderByKind::Expressions(items)) => {
            let keys: Vec<String> = items
                .iter()
                .map(|o| {
                    let key = match &o.expr {
                        Expr::Value(v) if v.value.to_string() == "1" => value.to_string(),
                        Expr::Identifier(i) if alias.as_deref() == Some(i.value.as_str()) => {
                            value.to_string()
                        }
                        other => other.to_string(),
                    };
                    format!("{key} {}", o.options)
                })
                .collect();
            format!(" ORDER BY {}", keys.join(", "))
        }
        Some(_) => return None,
    };
    let mut select = select.as_ref().clone();
    let aggregate = Parser::new(&PostgreSqlDialect {})
        .try_with_sql(&format!("array_agg({value}{order})"))
        .and_then(|mut p| p.parse_expr())
        .ok()?;
    select.projection = vec![SelectItem::UnnamedExpr(aggregate)];
    let mut query = q.clone();
    query.order_by = None;
    query.body = Box::new(SetExpr::Select(Box::new(select)));
    Some(Expr::Subquery(Box::new(query)))
}

pub(super) fn to_regclass(e: &Expr) -> Option<Expr> {
    let Expr::Function(f) = e else {
        return None;
    };
    if function_name(e)? != "to_regclass" {
        return None;
    }
    let FunctionArguments::List(list) = &f.args else {
        return None;
    };
    let [FunctionArg::Unnamed(FunctionArgExpr::Expr(arg))] = list.args.as_slice() else {
        return None;
    };
    let sql = format!(
        "(SELECT max(c.oid) FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON \
         c.relnamespace = n.oid WHERE c.relname = split_part(({arg}), '.', -1) AND \
         (strpos(({arg}), '.') = 0 OR n.nspname = split_part(({arg}), '.', 1)))"
    );
    Parser::new(&PostgreSqlDialect {})
        .try_with_sql(&sql)
        .and_then(|mut p| p.parse_expr())
        .ok()
}
