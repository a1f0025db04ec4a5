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

mod answer;
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
mod tests;
