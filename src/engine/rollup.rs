//! Rollups: pre-aggregated tables that aggregate queries are answered from, like Cube's
//! pre-aggregations.
//!
//! A rollup is a model marked `rollup: true` whose SQL is one aggregate over inner joins of
//! tables, e.g.
//!
//! ```sql
//! select d.date_day, d.year, d.month, f.status,
//!        sum(f.net_amount) as net_amount, count(*) as line_count
//! from fact_sales f join dim_date d on f.date_key = d.date_key
//! group by d.date_day, d.year, d.month, f.status
//! ```
//!
//! A query's aggregate is answered from a rollup when it reads the rollup's tables joined on the
//! same columns (and any further tables, joined on columns the rollup keeps), groups and filters
//! the rollup's tables only by columns the rollup keeps, and computes from them only what the
//! rollup's measures give: `sum`, `count`, `count(*)`, `min`, `max`, `avg` (from a sum and a
//! count), and `count(distinct ...)`, `min`, `max` of kept columns. The rollup's rows stand in
//! for the joined rows of its tables: every joined row of a rollup group has the same kept
//! columns, so further inner joins and filters on those columns take or drop whole groups, and
//! sums of the group sums are the sums over the rows.
//!
//! A rollup is used only when it was built from the versions of its tables that the session
//! reads (recorded by the run in `kbcrm_state`) from the SQL it has now, and only for roles that
//! read its tables and the rollup itself unmasked and unfiltered. The routing is an analyzer
//! rule, so DataFusion's optimizer then plans the rewritten query as any other; `EXPLAIN` shows
//! the rollup's scan, and kbcrm adds a `rollup_routing` row saying which rollup answered each
//! aggregate or why none did.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;

use arrow::array::{RecordBatch, StringArray};
use arrow::datatypes::DataType;
use datafusion::common::ExprSchema;
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, DFSchemaRef, DataFusionError, TableReference};
use datafusion::datasource::provider_as_source;
use datafusion::functions_aggregate::sum::sum_udaf;
use datafusion::logical_expr::expr::{AggregateFunction, AggregateFunctionParams};
use datafusion::logical_expr::utils::{conjunction, split_conjunction};
use datafusion::logical_expr::{
    Aggregate, BinaryExpr, Expr, ExprSchemable, JoinType, LogicalPlan, LogicalPlanBuilder,
    Operator, Projection, TableSource, cast, lit,
};
use datafusion::optimizer::analyzer::{Analyzer, AnalyzerRule};
use datafusion::prelude::SessionContext;
use sha2::{Digest, Sha256};

use crate::error::Result;
use crate::plan::{Model, Project};

/// Name of the analyzer rule (also what `EXPLAIN VERBOSE` shows).
pub const RULE_NAME: &str = "kbcrm_rollup_routing";

/// A column of a table: (table, column).
type ColRef = (String, String);

/// What a rollup measure computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Sum,
    Count,
    CountStar,
    Min,
    Max,
}

/// One rollup as a session can use it.
#[derive(Debug, Clone)]
pub struct Rollup {
    /// Its table.
    pub name: String,
    /// The tables it aggregates.
    tables: BTreeSet<String>,
    /// Its join conditions, each pair ordered.
    edges: BTreeSet<(ColRef, ColRef)>,
    /// Kept columns: the rollup's column for each table column it groups by.
    groups: HashMap<ColRef, String>,
    /// Measures: the rollup's column for each aggregate it keeps.
    measures: HashMap<(Kind, Option<ColRef>), String>,
    /// Rows, to prefer the smallest rollup that answers.
    rows: usize,
    /// The types of the rollup table's columns (as the session reads them).
    types: HashMap<String, DataType>,
    /// Why it must not be used now (built from other versions, or from other SQL).
    stale: Option<String>,
}

/// A relation in a FROM clause.
struct Leaf {
    /// The table it scans, when it is a plain scan of one.
    table: Option<String>,
    /// Its plan as the query has it.
    plan: LogicalPlan,
    /// Its output schema (with the qualifier the query uses).
    schema: DFSchemaRef,
    /// The qualifier the query uses.
    qualifier: Option<TableReference>,
}

/// An aggregate's input taken apart: the relations joined and every condition on them.
struct JoinTree {
    leaves: Vec<Leaf>,
    conjuncts: Vec<Expr>,
}

fn has_subquery(e: &Expr) -> bool {
    e.exists(|e| {
        Ok(matches!(
            e,
            Expr::ScalarSubquery(_) | Expr::InSubquery(_) | Expr::Exists(_)
        ))
    })
    .unwrap_or(true)
}

/// The table a scan reads, when `plan` is a plain scan (under aliases).
fn plain_table(plan: &LogicalPlan) -> Option<String> {
    match plan {
        LogicalPlan::TableScan(ts) if ts.filters.is_empty() && ts.fetch.is_none() => {
            Some(ts.table_name.table().to_string())
        }
        LogicalPlan::SubqueryAlias(sa) => plain_table(&sa.input),
        _ => None,
    }
}

fn decompose(plan: &LogicalPlan, tree: &mut JoinTree) -> std::result::Result<(), String> {
    match plan {
        LogicalPlan::Filter(f) => {
            if has_subquery(&f.predicate) {
                return Err("it filters with a subquery".into());
            }
            tree.conjuncts
                .extend(split_conjunction(&f.predicate).into_iter().cloned());
            decompose(&f.input, tree)
        }
        LogicalPlan::Join(j) => {
            if j.join_type != JoinType::Inner {
                return Err(format!("it has a {} join", j.join_type));
            }
            for (l, r) in &j.on {
                tree.conjuncts.push(l.clone().eq(r.clone()));
            }
            if let Some(f) = &j.filter {
                if has_subquery(f) {
                    return Err("it joins on a subquery".into());
                }
                tree.conjuncts
                    .extend(split_conjunction(f).into_iter().cloned());
            }
            decompose(&j.left, tree)?;
            decompose(&j.right, tree)
        }
        LogicalPlan::TableScan(ts) => {
            tree.leaves.push(Leaf {
                table: plain_table(plan),
                plan: plan.clone(),
                schema: plan.schema().clone(),
                qualifier: Some(ts.table_name.clone()),
            });
            Ok(())
        }
        LogicalPlan::SubqueryAlias(sa) => {
            tree.leaves.push(Leaf {
                table: plain_table(plan),
                plan: plan.clone(),
                schema: plan.schema().clone(),
                qualifier: Some(sa.alias.clone()),
            });
            Ok(())
        }
        other => Err(format!(
            "it aggregates a {} rather than joined tables",
            other
                .display()
                .to_string()
                .split(':')
                .next()
                .unwrap_or("plan")
        )),
    }
}

impl JoinTree {
    fn of(plan: &LogicalPlan) -> std::result::Result<Self, String> {
        let mut tree = JoinTree {
            leaves: Vec::new(),
            conjuncts: Vec::new(),
        };
        decompose(plan, &mut tree)?;
        Ok(tree)
    }

    /// The leaf a column belongs to.
    fn leaf_of(&self, c: &Column) -> Option<usize> {
        self.leaves.iter().position(|l| l.schema.has_column(c))
    }

    /// The (table, column) of a column of a plain leaf.
    fn col_ref(&self, c: &Column) -> Option<(usize, ColRef)> {
        let i = self.leaf_of(c)?;
        let table = self.leaves[i].table.clone()?;
        Some((i, (table, c.name.clone())))
    }

    /// `a = b` between columns of two different plain leaves, as an ordered pair.
    fn edge(&self, e: &Expr) -> Option<((usize, ColRef), (usize, ColRef))> {
        let Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::Eq,
            right,
        }) = e
        else {
            return None;
        };
        let (Expr::Column(a), Expr::Column(b)) = (strip_cast(left), strip_cast(right)) else {
            return None;
        };
        let a = self.col_ref(a)?;
        let b = self.col_ref(b)?;
        (a.0 != b.0).then(|| if a.1 <= b.1 { (a, b) } else { (b, a) })
    }
}

fn strip_cast(e: &Expr) -> &Expr {
    match e {
        Expr::Cast(c) => strip_cast(&c.expr),
        Expr::TryCast(c) => strip_cast(&c.expr),
        Expr::Alias(a) => strip_cast(&a.expr),
        other => other,
    }
}

/// An aggregate function call without FILTER or ORDER BY: (name, arguments, distinct).
fn aggregate_parts(e: &Expr) -> Option<(&AggregateFunction, String, &[Expr], bool)> {
    match e {
        Expr::Alias(a) => aggregate_parts(&a.expr),
        Expr::AggregateFunction(
            f @ AggregateFunction {
                func,
                params:
                    AggregateFunctionParams {
                        args,
                        distinct,
                        filter: None,
                        order_by,
                        ..
                    },
            },
        ) if order_by.is_empty() => Some((f, func.name().to_lowercase(), args, *distinct)),
        _ => None,
    }
}

/// The measure an aggregate over `tree` is, if it is one a rollup can keep.
fn measure_of(e: &Expr, tree: &JoinTree) -> Option<(Kind, Option<ColRef>)> {
    let (_, name, args, distinct) = aggregate_parts(e)?;
    if distinct {
        return None;
    }
    match (name.as_str(), args) {
        ("count", []) => Some((Kind::CountStar, None)),
        ("count", [Expr::Literal(v, _)]) if !v.is_null() => Some((Kind::CountStar, None)),
        (f, [arg]) => {
            let kind = match f {
                "sum" => Kind::Sum,
                "count" => Kind::Count,
                "min" => Kind::Min,
                "max" => Kind::Max,
                _ => return None,
            };
            let Expr::Column(c) = strip_cast(arg) else {
                return None;
            };
            Some((kind, Some(tree.col_ref(c)?.1)))
        }
        _ => None,
    }
}

impl Rollup {
    /// Read a rollup's definition from its analyzed plan. Errors say why the SQL is not one.
    fn from_plan(name: &str, plan: &LogicalPlan) -> std::result::Result<Self, String> {
        let mut top = plan;
        while let LogicalPlan::Sort(s) = top {
            top = &s.input;
        }
        let LogicalPlan::Projection(proj) = top else {
            return Err("it is not one SELECT ... GROUP BY".into());
        };
        let LogicalPlan::Aggregate(agg) = proj.input.as_ref() else {
            return Err("it is not one SELECT ... GROUP BY (HAVING is not allowed either)".into());
        };
        if matches!(agg.group_expr.first(), Some(Expr::GroupingSet(_))) {
            return Err("it uses GROUPING SETS, ROLLUP or CUBE".into());
        }
        let tree = JoinTree::of(&agg.input)?;
        let mut tables = BTreeSet::new();
        for leaf in &tree.leaves {
            let Some(t) = &leaf.table else {
                return Err("it reads something other than tables (a subquery or view)".into());
            };
            if !tables.insert(t.clone()) {
                return Err(format!("it reads table '{t}' twice"));
            }
        }
        let mut edges = BTreeSet::new();
        for c in &tree.conjuncts {
            match tree.edge(c) {
                Some((a, b)) => {
                    edges.insert((a.1, b.1));
                }
                None => {
                    return Err(format!(
                        "it filters rows ({c}); a rollup keeps every row of its tables: filter \
                         in the queries instead"
                    ));
                }
            }
        }
        let ngroups = agg.group_expr.len();
        let mut groups = HashMap::new();
        let mut measures = HashMap::new();
        for (i, e) in proj.expr.iter().enumerate() {
            let out = proj.schema.field(i).name().clone();
            let Expr::Column(c) = strip_cast(e) else {
                continue;
            };
            let Ok(j) = agg.schema.index_of_column(c) else {
                continue;
            };
            if j < ngroups {
                if let Expr::Column(g) = strip_cast(&agg.group_expr[j])
                    && let Some((_, r)) = tree.col_ref(g)
                {
                    groups.insert(r, out);
                }
            } else if let Some(m) = measure_of(&agg.aggr_expr[j - ngroups], &tree) {
                measures.insert(m, out);
            }
        }
        if groups.is_empty() {
            return Err("it keeps no column of its tables (GROUP BY plain columns)".into());
        }
        if measures.is_empty() {
            return Err("it has no sum, count, min or max of a column of its tables".into());
        }
        Ok(Rollup {
            name: name.to_string(),
            tables,
            edges,
            groups,
            measures,
            rows: 0,
            types: HashMap::new(),
            stale: None,
        })
    }

    fn rollup_col(&self, col: &str) -> Expr {
        Expr::Column(Column::new(
            Some(TableReference::bare(self.name.as_str())),
            col,
        ))
    }

    /// The plan answering `agg` from this rollup, or why it cannot.
    fn answer(
        &self,
        agg: &Aggregate,
        source: &Arc<dyn TableSource>,
    ) -> std::result::Result<LogicalPlan, String> {
        if matches!(agg.group_expr.first(), Some(Expr::GroupingSet(_))) {
            return Err("the query uses GROUPING SETS, ROLLUP or CUBE".into());
        }
        let tree = JoinTree::of(&agg.input)?;
        // The rollup's tables among the query's relations, each exactly once.
        let mut mine: BTreeSet<usize> = BTreeSet::new();
        for t in &self.tables {
            let at: Vec<usize> = (0..tree.leaves.len())
                .filter(|&i| tree.leaves[i].table.as_deref() == Some(t.as_str()))
                .collect();
            match at.as_slice() {
                [i] => {
                    mine.insert(*i);
                }
                [] => {
                    let through_view = tree.leaves.iter().any(|l| {
                        l.table.is_none()
                            && l.plan
                                .exists(|n| {
                                    Ok(matches!(n, LogicalPlan::TableScan(ts)
                                        if ts.table_name.table() == t.as_str()))
                                })
                                .unwrap_or(false)
                    });
                    return Err(if through_view {
                        format!(
                            "the query reads '{t}' through a view (the role's row filter or masking)"
                        )
                    } else {
                        format!("the query does not read '{t}'")
                    });
                }
                _ => return Err(format!("the query reads '{t}' more than once")),
            }
        }
        if tree
            .leaves
            .iter()
            .any(|l| l.qualifier.as_ref().is_some_and(|q| q.table() == self.name))
        {
            return Err("the query reads the rollup itself".into());
        }
        // Join conditions among the rollup's tables must be the rollup's own; everything else
        // becomes a condition on the rollup's kept columns.
        let mut joined = BTreeSet::new();
        let mut rest = Vec::new();
        for c in &tree.conjuncts {
            match tree.edge(c) {
                Some((a, b)) if mine.contains(&a.0) && mine.contains(&b.0) => {
                    if !self.edges.contains(&(a.1.clone(), b.1.clone())) {
                        return Err(format!(
                            "the query joins {}.{} = {}.{}, which the rollup does not",
                            a.1.0, a.1.1, b.1.0, b.1.1
                        ));
                    }
                    joined.insert((a.1, b.1));
                }
                _ => rest.push(c.clone()),
            }
        }
        if joined != self.edges {
            return Err("the query joins the rollup's tables on fewer columns than it".into());
        }
        let rewrite = |e: &Expr| self.rewrite_kept(e, &tree, &mine);
        let predicates = rest.iter().map(rewrite).collect::<Result<Vec<_>, _>>()?;
        let group_expr = agg
            .group_expr
            .iter()
            .map(rewrite)
            .collect::<Result<Vec<_>, _>>()?;
        // Each aggregate becomes aggregates over the rollup and an expression over those.
        let mut new_aggs: Vec<Expr> = Vec::new();
        let mut finals: Vec<Expr> = Vec::new();
        for e in &agg.aggr_expr {
            let fin = self.aggregate(e, &tree, &mine, &mut new_aggs)?;
            finals.push(fin);
        }
        // The rollup, then the query's other relations, with every condition.
        let mut builder = LogicalPlanBuilder::scan(self.name.as_str(), source.clone(), None)
            .map_err(|e| e.to_string())?;
        for (i, leaf) in tree.leaves.iter().enumerate() {
            if !mine.contains(&i) {
                builder = builder
                    .cross_join(leaf.plan.clone())
                    .map_err(|e| e.to_string())?;
            }
        }
        if let Some(p) = conjunction(predicates) {
            builder = builder.filter(p).map_err(|e| e.to_string())?;
        }
        let input = builder.build().map_err(|e| e.to_string())?;
        let new_agg = Aggregate::try_new(Arc::new(input), group_expr, new_aggs)
            .map_err(|e| format!("the rewritten aggregate does not plan: {e}"))?;
        let ngroups = agg.group_expr.len();
        let mut exprs = Vec::with_capacity(agg.schema.fields().len());
        for i in 0..agg.schema.fields().len() {
            let (qualifier, field) = agg.schema.qualified_field(i);
            let value = if i < ngroups {
                let (q, f) = new_agg.schema.qualified_field(i);
                Expr::Column(Column::new(q.cloned(), f.name()))
            } else {
                finals[i - ngroups].clone()
            };
            let typed = match value.get_type(new_agg.schema.as_ref()) {
                Ok(t) if &t == field.data_type() => value,
                Ok(_) => cast(value, field.data_type().clone()),
                Err(e) => return Err(e.to_string()),
            };
            exprs.push(typed.alias_qualified(qualifier.cloned(), field.name()));
        }
        let projection = Projection::try_new(exprs, Arc::new(LogicalPlan::Aggregate(new_agg)))
            .map_err(|e| format!("the rewritten aggregate does not plan: {e}"))?;
        Ok(LogicalPlan::Projection(projection))
    }

    /// `e` with the columns of the rollup's tables replaced by the rollup's kept columns.
    fn rewrite_kept(
        &self,
        e: &Expr,
        tree: &JoinTree,
        mine: &BTreeSet<usize>,
    ) -> std::result::Result<Expr, String> {
        if has_subquery(e) {
            return Err("the query uses a subquery inside the aggregate's input".into());
        }
        e.clone()
            .transform(|e| match &e {
                Expr::Column(c) => match tree.col_ref(c) {
                    Some((i, r)) if mine.contains(&i) => match self.groups.get(&r) {
                        Some(col) => {
                            // The kept column as the query's column was typed.
                            let kept = self.rollup_col(col);
                            let want = tree.leaves[i]
                                .schema
                                .field_from_column(c)
                                .map(|f| f.data_type().clone());
                            Ok(Transformed::yes(match (want, self.types.get(col)) {
                                (Ok(want), Some(have)) if &want != have => cast(kept, want),
                                _ => kept,
                            }))
                        }
                        None => Err(DataFusionError::Plan(format!(
                            "the query uses {}.{} (to group, join, filter or count distinct \
                             values), which the rollup does not keep",
                            r.0, r.1
                        ))),
                    },
                    _ => Ok(Transformed::no(e)),
                },
                _ => Ok(Transformed::no(e)),
            })
            .map(|t| t.data)
            .map_err(|e| {
                e.strip_backtrace()
                    .trim_start_matches("Error during planning: ")
                    .to_string()
            })
    }

    /// Aggregates over the rollup computing `e` (pushed to `out`), and the expression over
    /// their results that gives its value.
    fn aggregate(
        &self,
        e: &Expr,
        tree: &JoinTree,
        mine: &BTreeSet<usize>,
        out: &mut Vec<Expr>,
    ) -> std::result::Result<Expr, String> {
        let cannot = || format!("the rollup cannot give {e}");
        let (f, name, args, distinct) = aggregate_parts(e).ok_or_else(cannot)?;
        let touches_mine = |a: &Expr| {
            a.column_refs()
                .iter()
                .any(|c| tree.leaf_of(c).is_some_and(|i| mine.contains(&i)))
        };
        let mut push = |agg: Expr| {
            let alias = format!("__kbcrm_rollup_{}", out.len());
            out.push(agg.alias(alias.as_str()));
            Expr::Column(Column::from_name(alias))
        };
        let call = |func, args: Vec<Expr>, distinct| {
            Expr::AggregateFunction(AggregateFunction::new_udf(
                func,
                args,
                distinct,
                None,
                vec![],
                None,
            ))
        };
        // Set functions of kept columns (or of the other relations' columns) are the same over
        // the rollup's rows: each group stands for at least one joined row.
        let set_function = distinct
            && matches!(name.as_str(), "count" | "sum" | "avg" | "min" | "max")
            || (!distinct && matches!(name.as_str(), "min" | "max"));
        if set_function {
            if let Some(m) = measure_of(e, tree).and_then(|m| self.measures.get(&m)) {
                return Ok(push(call(f.func.clone(), vec![self.rollup_col(m)], false)));
            }
            let new_args = args
                .iter()
                .map(|a| self.rewrite_kept(a, tree, mine))
                .collect::<Result<Vec<_>, _>>()?;
            return Ok(push(call(f.func.clone(), new_args, distinct)));
        }
        if distinct {
            return Err(cannot());
        }
        if !args.iter().all(touches_mine)
            && !matches!(
                (name.as_str(), args),
                ("count", [Expr::Literal(..)]) | ("count", [])
            )
        {
            return Err(format!(
                "{e} is over columns of tables the rollup does not aggregate"
            ));
        }
        let measure = |m: (Kind, Option<ColRef>)| {
            self.measures.get(&m).cloned().ok_or_else(|| {
                let what = match &m.1 {
                    Some((t, c)) => format!("{t}.{c}"),
                    None => "*".to_string(),
                };
                let kind = match m.0 {
                    Kind::Sum => "sum",
                    Kind::Count | Kind::CountStar => "count",
                    Kind::Min => "min",
                    Kind::Max => "max",
                };
                format!("the rollup has no {kind}({what}) for {e}")
            })
        };
        let summed = |col: String| call(sum_udaf(), vec![self.rollup_col(&col)], false);
        match name.as_str() {
            "sum" => {
                let (k, c) = measure_of(e, tree).ok_or_else(cannot)?;
                Ok(push(summed(measure((k, c))?)))
            }
            "count" => {
                let m = measure_of(e, tree).ok_or_else(cannot)?;
                let total = push(summed(measure(m)?));
                // A count over no rows is 0, a sum over no rows NULL.
                Ok(datafusion::functions::expr_fn::coalesce(vec![
                    total,
                    lit(0i64),
                ]))
            }
            "avg" => {
                let [arg] = args else { return Err(cannot()) };
                let Expr::Column(c) = strip_cast(arg) else {
                    return Err(cannot());
                };
                let (_, r) = tree.col_ref(c).ok_or_else(cannot)?;
                let s = measure((Kind::Sum, Some(r.clone())))?;
                let n = match measure((Kind::Count, Some(r.clone()))) {
                    Ok(n) => n,
                    Err(err) => {
                        let nullable = tree
                            .leaf_of(c)
                            .and_then(|i| tree.leaves[i].schema.field_from_column(c).ok())
                            .is_none_or(|f| f.is_nullable());
                        if nullable {
                            return Err(err);
                        }
                        measure((Kind::CountStar, None))?
                    }
                };
                let s = push(summed(s));
                let n = push(summed(n));
                Ok(cast(s, DataType::Float64) / cast(n, DataType::Float64))
            }
            _ => Err(cannot()),
        }
    }
}

/// The rollups one session may use, in the order they are tried (fewest rows first), with
/// the table each is read from in that session.
pub struct Router {
    rollups: Vec<(Rollup, Arc<dyn TableSource>)>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.rollups.iter().map(|(r, _)| &r.name))
            .finish()
    }
}

impl Router {
    /// `plan` with every aggregate a rollup answers read from it, and one line per aggregate
    /// saying what answered it.
    pub fn route(
        &self,
        plan: LogicalPlan,
    ) -> datafusion::common::Result<(LogicalPlan, Vec<String>)> {
        let mut lines = Vec::new();
        let routed = plan.transform_up(|node| {
            let LogicalPlan::Aggregate(agg) = &node else {
                return Ok(Transformed::no(node));
            };
            let what = if agg.group_expr.is_empty() {
                "aggregate".to_string()
            } else {
                let by: Vec<String> = agg.group_expr.iter().map(|e| e.to_string()).collect();
                format!("aggregate by {}", by.join(", "))
            };
            let mut why = Vec::new();
            for (r, source) in &self.rollups {
                if let Some(stale) = &r.stale {
                    why.push(format!("{}: {stale}", r.name));
                    continue;
                }
                match r.answer(agg, source) {
                    Ok(p) => {
                        lines.push(format!("{what}: answered by rollup {}", r.name));
                        return Ok(Transformed::new(p, true, TreeNodeRecursion::Continue));
                    }
                    Err(reason) => why.push(format!("{}: {reason}", r.name)),
                }
            }
            lines.push(format!("{what}: no rollup answered ({})", why.join("; ")));
            Ok(Transformed::no(node))
        })?;
        Ok((routed.data, lines))
    }
}

/// The analyzer rule routing a session's aggregates to its rollups.
#[derive(Debug)]
pub struct RoutingRule(pub Arc<Router>);

impl AnalyzerRule for RoutingRule {
    fn analyze(
        &self,
        plan: LogicalPlan,
        _config: &ConfigOptions,
    ) -> datafusion::common::Result<LogicalPlan> {
        Ok(self.0.route(plan)?.0)
    }

    fn name(&self) -> &str {
        RULE_NAME
    }
}

/// The project's rollups as read from one set of table versions: each one's definition,
/// whether it may be used, and its size. Built once and given to each session of those
/// versions ([`Rollups::attach`]).
#[derive(Debug, Default)]
pub struct Rollups {
    defs: Vec<Rollup>,
}

fn rollup_models(project: &Project) -> impl Iterator<Item = &Model> {
    project
        .pipelines
        .iter()
        .flat_map(|p| &p.models)
        .filter(|m| m.rollup)
}

/// Why a rollup built from `recorded` (its `kbcrm_state` inputs entry) must not be used with
/// the tables at `version_of`, or `None` when it is current.
fn staleness(
    model: &Model,
    recorded: Option<&String>,
    version_of: &(dyn Fn(&str) -> Option<u64> + Sync),
) -> Option<String> {
    let Some(recorded) = recorded else {
        return Some("no run has recorded what it was built from; run its pipeline".into());
    };
    let v: serde_json::Value = serde_json::from_str(recorded).unwrap_or_default();
    // A rollup reads no run parameters (refused when the project loads).
    let definition =
        crate::engine::udf::model_definition(model, &crate::engine::udf::RunParams::default());
    let hash = hex::encode(Sha256::digest(definition.as_bytes()));
    if v.get("definition").and_then(|d| d.as_str()) != Some(hash.as_str()) {
        return Some(format!(
            "its SQL ({}) changed since it was built; run pipeline '{}'",
            model.file.display(),
            model.pipeline
        ));
    }
    let inputs = v.get("inputs").and_then(|i| i.as_object());
    for t in &model.depends_on {
        let built = inputs.and_then(|i| i.get(t)).and_then(|v| v.as_u64());
        let now = version_of(t);
        if built != now {
            let show = |v: Option<u64>| v.map_or("none".to_string(), |v| format!("version {v}"));
            return Some(format!(
                "built from {t} {}, the table is at {}; run pipeline '{}'",
                show(built),
                show(now),
                model.pipeline
            ));
        }
    }
    None
}

impl Rollups {
    /// Whether the project declares any rollup.
    pub fn declared(project: &Project) -> bool {
        rollup_models(project).next().is_some()
    }

    /// Read every rollup of the project from `ctx`, whose tables are at `version_of`.
    /// Rollups not built yet are left out; SQL that is not a rollup is an error naming the
    /// file (a run refuses it before it is ever built).
    /// `state` is the warehouse's `kbcrm_state` (read only when [`Rollups::declared`]).
    pub async fn load(
        ctx: &SessionContext,
        project: &Project,
        version_of: &(dyn Fn(&str) -> Option<u64> + Sync),
        state: &HashMap<(String, String, String), String>,
    ) -> Result<Self> {
        let mut defs = Vec::new();
        for model in rollup_models(project) {
            if !ctx.table_exist(model.name.as_str())? {
                continue;
            }
            let mut def = definition(ctx, model).await?;
            let key = (
                model.pipeline.clone(),
                model.name.clone(),
                "inputs".to_string(),
            );
            def.stale = staleness(model, state.get(&key), version_of);
            if def.stale.is_none() {
                let sql = format!(
                    "select count(*) from {}",
                    crate::sql::quote_ident(&model.name)
                );
                let batches = ctx.sql(&sql).await?.collect().await?;
                def.rows = batches
                    .first()
                    .and_then(|b| {
                        b.column(0)
                            .as_any()
                            .downcast_ref::<arrow::array::Int64Array>()
                            .map(|a| a.value(0))
                    })
                    .unwrap_or(0) as usize;
            }
            defs.push(def);
        }
        defs.sort_by_key(|d| (d.stale.is_some(), d.rows));
        Ok(Self { defs })
    }

    /// Whether there is any rollup.
    pub fn is_empty(&self) -> bool {
        self.defs.is_empty()
    }

    /// Route `ctx`'s aggregate queries to the rollups `usable` allows that `ctx` has tables
    /// for (a role's session: only rollups it reads unrestricted).
    pub async fn attach(&self, ctx: &SessionContext, usable: impl Fn(&str) -> bool) -> Result<()> {
        let mut rollups = Vec::new();
        for def in &self.defs {
            if !usable(&def.name) || !ctx.table_exist(def.name.as_str())? {
                continue;
            }
            let provider = ctx.table_provider(def.name.as_str()).await?;
            let mut def = def.clone();
            def.types = provider
                .schema()
                .fields()
                .iter()
                .map(|f| (f.name().clone(), f.data_type().clone()))
                .collect();
            rollups.push((def, provider_as_source(provider)));
        }
        if rollups.is_empty() {
            return Ok(());
        }
        let router = Arc::new(Router { rollups });
        ctx.add_analyzer_rule(Arc::new(RoutingRule(router.clone())));
        ctx.state_ref().write().config_mut().set_extension(router);
        Ok(())
    }
}

/// What a rollup's SQL must be.
pub const SHAPE: &str = "a rollup is one SELECT of plain columns and sum/count/min/max of \
    columns, from tables joined with inner joins on equal columns, grouped by those columns, \
    without WHERE or HAVING";

/// A rollup model's definition, read by planning its SQL in `ctx`; or why it is not one.
pub async fn check(ctx: &SessionContext, model: &Model) -> std::result::Result<Rollup, String> {
    let state = ctx.state();
    let plan = state
        .create_logical_plan(&model.sql)
        .await
        .map_err(|e| format!("its SQL does not plan: {}", e.strip_backtrace()))?;
    let analyzed = without_routing(&state)
        .execute_and_check(plan, state.config_options(), |_, _| {})
        .map_err(|e| format!("its SQL does not plan: {}", e.strip_backtrace()))?;
    Rollup::from_plan(&model.name, &analyzed).map_err(|why| format!("it is not a rollup: {why}"))
}

/// [`check`] as a model error naming the file (what a run reports).
pub async fn definition(ctx: &SessionContext, model: &Model) -> Result<Rollup> {
    check(ctx, model)
        .await
        .map_err(|message| crate::error::Error::Model {
            model: model.name.clone(),
            file: model.file.clone(),
            message,
            help: Some(SHAPE.into()),
        })
}

/// The session's analyzer without the routing rule.
fn without_routing(state: &datafusion::execution::SessionState) -> Analyzer {
    let mut analyzer = Analyzer::with_rules(
        state
            .analyzer()
            .rules
            .iter()
            .filter(|r| r.name() != RULE_NAME)
            .cloned()
            .collect(),
    );
    for f in state.analyzer().function_rewrites() {
        analyzer.add_function_rewrite(f.clone());
    }
    analyzer
}

/// The statement an `EXPLAIN` (without ANALYZE) explains, as SQL; `None` for any other
/// statement.
pub fn explained(stmt: &datafusion::sql::sqlparser::ast::Statement) -> Option<String> {
    match stmt {
        datafusion::sql::sqlparser::ast::Statement::Explain {
            statement,
            analyze: false,
            ..
        } => Some(statement.to_string()),
        _ => None,
    }
}

/// For an `EXPLAIN` of `inner_sql` in `ctx`: the `rollup_routing` row saying, per aggregate,
/// which rollup answered it or why none did. `None` when the session has no rollups.
pub async fn explain_row(ctx: &SessionContext, inner_sql: &str) -> Result<Option<String>> {
    let state = ctx.state();
    let Some(router) = state.config().get_extension::<Router>() else {
        return Ok(None);
    };
    let plan = state.create_logical_plan(inner_sql).await?;
    let analyzed =
        without_routing(&state).execute_and_check(plan, state.config_options(), |_, _| {})?;
    let (_, lines) = router.route(analyzed)?;
    let mut text = String::new();
    for l in &lines {
        let _ = writeln!(text, "{l}");
    }
    if lines.is_empty() {
        text.push_str("no aggregate to answer from a rollup");
    }
    Ok(Some(text.trim_end().to_string()))
}

/// `batches` of an EXPLAIN result (plan_type, plan) with the `rollup_routing` row added.
pub fn with_explain_row(batches: Vec<RecordBatch>, row: &str) -> Result<Vec<RecordBatch>> {
    let Some(schema) = batches.first().map(|b| b.schema()) else {
        return Ok(batches);
    };
    if schema.fields().len() != 2 {
        return Ok(batches);
    }
    let extra = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from(vec!["rollup_routing"])),
            Arc::new(StringArray::from(vec![row])),
        ],
    )?;
    let mut out = batches;
    out.push(extra);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::util::pretty::pretty_format_batches;

    /// A rollup model of `sql` reading `depends_on`.
    fn rollup_model(name: &str, sql: &str, depends_on: &[&str]) -> Model {
        Model {
            pipeline: "p".into(),
            name: name.into(),
            file: format!("sql/{name}.sql").into(),
            sql: Arc::new(sql.to_string()),
            mode: crate::config::pipeline::WriteMode::Overwrite,
            keys: vec![],
            depends_on: depends_on.iter().map(|t| t.to_string()).collect(),
            incremental: None,
            scd2: None,
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
}
